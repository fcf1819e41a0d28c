//! The control plane end to end: a real control server on a temp Unix socket, real clients,
//! the log ring fed through a scoped tracing subscriber, and the `status` / `logs` tools.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dpuctl::daemon::control::{bind, parse_request, serve, MAX_CLIENTS, MAX_REQUEST_LINE};
use dpuctl::daemon::logging::ring_layer;
use dpuctl::daemon::status::{DaemonStatus, PeerState, PeerStatus};
use dpuctl::daemon::tools::{logs_command, status_command, EXIT_OK, EXIT_UNREACHABLE};
use dpuctl::daemon::{
    discover, socket_path, Client, ControlError, ControlHandler, LogHandle, Request,
};
use futures::future::BoxFuture;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;

/// A daemon stand-in: a fixed status, allowlist answers, a reload that can be made to hang.
struct TestHandler {
    reloads: AtomicUsize,
    hang_on_reload: bool,
}

impl TestHandler {
    fn new() -> Arc<TestHandler> {
        Arc::new(TestHandler {
            reloads: AtomicUsize::new(0),
            hang_on_reload: false,
        })
    }
}

impl ControlHandler for TestHandler {
    fn status(&self) -> DaemonStatus {
        DaemonStatus {
            name: "engine".into(),
            pid: std::process::id(),
            control: String::new(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_secs: 42,
            listen: vec!["tcp://127.0.0.1:12345".into()],
            peers: vec![PeerStatus {
                address: "tcp://127.0.0.1:40000".into(),
                state: PeerState::Connected,
                bytes_in: 10,
                bytes_out: 20,
                role: Some("mount".into()),
                rtt_us: Some(100),
                since_secs: 1,
                last_error: None,
            }],
            allowlists: BTreeMap::from([("open".to_owned(), vec!["/var/lib/docker".to_owned()])]),
            log_level: String::new(),
            counters: BTreeMap::new(),
            mount: None,
            connections: Vec::new(),
            sessions: Vec::new(),
        }
    }

    fn handle(
        &self,
        req: Request,
    ) -> BoxFuture<'static, Result<serde_json::Map<String, serde_json::Value>, String>> {
        let result = match req {
            Request::Reload if self.hang_on_reload => {
                return Box::pin(futures::future::pending());
            }
            Request::Reload => {
                self.reloads.fetch_add(1, Ordering::SeqCst);
                Ok(serde_json::Map::new())
            }
            Request::AllowlistAdd { path, .. } if path.starts_with('/') => {
                let mut fields = serde_json::Map::new();
                fields.insert("index".into(), 1.into());
                Ok(fields)
            }
            Request::AllowlistAdd { path, .. } => Err(format!(
                "path {path:?} is not absolute: allowlist entries start with /"
            )),
            other => Err(format!("unexpected request {other:?}")),
        };
        Box::pin(futures::future::ready(result))
    }
}

/// A running control server on a temp socket.
struct Running {
    _dir: tempfile::TempDir,
    path: PathBuf,
    log: LogHandle,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

async fn start(handler: Arc<TestHandler>) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = socket_path(&dir.path().join("run"), "engine");
    let listener = bind(&path).expect("bind the control socket");
    let log = LogHandle::detached("engine");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve(listener, handler, log.clone(), shutdown.clone()));
    Running {
        _dir: dir,
        path,
        log,
        shutdown,
        task,
    }
}

/// Runs `f` with `log`'s ring layer as the thread's subscriber, as a daemon's events would be.
fn emit(log: &LogHandle, f: impl FnOnce()) {
    let subscriber = tracing_subscriber::registry().with(ring_layer(log));
    tracing::subscriber::with_default(subscriber, f);
}

/// A raw line-oriented connection, to send what the typed client never would.
struct Raw {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Raw {
    async fn connect(path: &Path) -> Raw {
        let (reader, writer) = UnixStream::connect(path)
            .await
            .expect("connect")
            .into_split();
        Raw {
            reader: BufReader::new(reader),
            writer,
        }
    }

    async fn send(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("send");
    }

    /// The next line, or `None` at EOF; fails the test after 5 s.
    async fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(5), self.reader.read_line(&mut line))
            .await
            .expect("a line within 5 s")
            .expect("read");
        (n > 0).then(|| line.trim_end().to_owned())
    }

    async fn json(&mut self) -> serde_json::Value {
        let line = self.line().await.expect("an answer line");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("invalid JSON {line:?}: {e}"))
    }
}

#[tokio::test]
async fn status_round_trip() {
    let server = start(TestHandler::new()).await;
    let mut client = Client::connect(&server.path).await.expect("connect");
    let status = client.status().await.expect("status");
    assert_eq!(status.name, "engine");
    assert_eq!(status.pid, std::process::id());
    assert_eq!(
        status.control,
        server.path.display().to_string(),
        "filled in by the server"
    );
    assert_eq!(status.log_level, "info", "answered from the LogHandle");
    assert_eq!(status.peers[0].state, PeerState::Connected);

    // The exact wire shape: ok first, then the status object.
    let mut raw = Raw::connect(&server.path).await;
    raw.send(r#"{"cmd":"status"}"#).await;
    let line = raw.line().await.expect("answer");
    assert!(line.starts_with(r#"{"ok":true,"status":{"#), "{line}");
    server.shutdown.cancel();
}

#[tokio::test]
async fn bad_requests_get_an_error_and_the_connection_stays_usable() {
    let server = start(TestHandler::new()).await;
    let mut raw = Raw::connect(&server.path).await;

    raw.send("this is not json").await;
    let reply = raw.json().await;
    assert_eq!(reply["ok"], false);
    let error = reply["error"].as_str().expect("error text");
    assert!(error.starts_with("malformed JSON"), "{error}");
    assert!(error.contains(r#"{"cmd":"status"}"#), "{error}");

    raw.send(r#"{"cmd":"frobnicate"}"#).await;
    let reply = raw.json().await;
    assert_eq!(
        reply["error"],
        "unknown command \"frobnicate\"; valid commands: status, allowlist_list, \
         allowlist_add, allowlist_delete, log_level, logs, reload, session_kill"
    );

    raw.send(r#"{"list_type":"open"}"#).await;
    let reply = raw.json().await;
    assert!(reply["error"]
        .as_str()
        .expect("error")
        .starts_with("the request has no \"cmd\" field"));

    raw.send(r#"{"cmd":"allowlist_add","list_type":"open"}"#)
        .await;
    let reply = raw.json().await;
    assert!(reply["error"]
        .as_str()
        .expect("error")
        .starts_with("invalid \"allowlist_add\" request: missing field `path`"));

    raw.send("").await; // blank lines are ignored
    raw.send(r#"{"cmd":"status"}"#).await;
    let reply = raw.json().await;
    assert_eq!(reply["ok"], true);
    assert_eq!(reply["status"]["name"], "engine");
    server.shutdown.cancel();
}

#[tokio::test]
async fn an_oversized_line_gets_an_error_and_the_connection_closes() {
    let server = start(TestHandler::new()).await;
    let mut raw = Raw::connect(&server.path).await;
    let big = format!(
        "{{\"cmd\":\"status\",\"pad\":\"{}\"}}",
        "a".repeat(MAX_REQUEST_LINE + 10)
    );
    // The server may close before reading it all; a write error is expected then.
    let _ = raw.writer.write_all(format!("{big}\n").as_bytes()).await;
    let reply = raw.json().await;
    assert_eq!(reply["ok"], false);
    assert_eq!(
        reply["error"],
        "request line longer than 65536 bytes: send one JSON request per line; closing the \
         connection"
    );
    assert_eq!(raw.line().await, None, "closed after the error");

    // The server itself is unaffected.
    let mut client = Client::connect(&server.path).await.expect("connect");
    client
        .status()
        .await
        .expect("status after an oversized line");
    server.shutdown.cancel();
}

#[tokio::test]
async fn handler_requests_log_level_and_remote_errors() {
    let handler = TestHandler::new();
    let server = start(handler.clone()).await;
    let mut client = Client::connect(&server.path).await.expect("connect");

    let fields = client.request(&Request::Reload).await.expect("reload");
    assert!(fields.is_empty());
    assert_eq!(handler.reloads.load(Ordering::SeqCst), 1);

    let added = client
        .request(
            &parse_request(r#"{"cmd":"allowlist_add","list_type":"open","path":"/srv"}"#)
                .expect("parse"),
        )
        .await
        .expect("add");
    assert_eq!(added.get("index"), Some(&serde_json::Value::from(1)));

    let refused = client
        .request(
            &parse_request(r#"{"cmd":"allowlist_add","list_type":"open","path":"srv"}"#)
                .expect("parse"),
        )
        .await
        .expect_err("relative path refused");
    match refused {
        ControlError::Remote(message) => assert_eq!(
            message,
            "path \"srv\" is not absolute: allowlist entries start with /"
        ),
        other => panic!("expected Remote, got {other:?}"),
    }

    let level = client
        .request(&Request::LogLevel { level: None })
        .await
        .expect("get level");
    assert_eq!(level.get("level"), Some(&"info".into()));
    let level = client
        .request(&Request::LogLevel {
            level: Some("debug".into()),
        })
        .await
        .expect("set level");
    assert_eq!(level.get("level"), Some(&"debug".into()));
    assert_eq!(server.log.level(), "debug");
    let bad = client
        .request(&Request::LogLevel {
            level: Some("loud==".into()),
        })
        .await
        .expect_err("bad directive");
    assert!(
        matches!(&bad, ControlError::Remote(m) if m.starts_with("invalid log level \"loud==\"")),
        "{bad}"
    );
    assert_eq!(server.log.level(), "debug", "unchanged by a bad directive");
    server.shutdown.cancel();
}

#[tokio::test]
async fn a_request_that_never_answers_times_out_on_the_client() {
    let handler = Arc::new(TestHandler {
        reloads: AtomicUsize::new(0),
        hang_on_reload: true,
    });
    let server = start(handler).await;
    let mut client = Client::connect(&server.path)
        .await
        .expect("connect")
        .with_timeout(Duration::from_millis(200));
    let err = client.request(&Request::Reload).await.expect_err("timeout");
    assert!(matches!(err, ControlError::Timeout { .. }), "{err:?}");
    assert!(
        err.to_string().contains("did not answer within 200ms"),
        "{err}"
    );
    // Shutdown is not held up by the hanging handler.
    server.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(3), server.task)
        .await
        .expect("serve returns")
        .expect("no panic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_stream_the_backlog_then_live_events() {
    let server = start(TestHandler::new()).await;
    emit(&server.log, || {
        for i in 0..3 {
            tracing::info!(seq = i, "before {i}");
        }
    });

    // Without follow: exactly the backlog, then the connection serves other requests.
    let mut client = Client::connect(&server.path).await.expect("connect");
    let fields = client
        .request(&Request::Logs {
            backlog: 2,
            follow: false,
        })
        .await
        .expect("logs");
    assert_eq!(fields.get("backlog"), Some(&2.into()));
    let mut got = Vec::new();
    while let Some(event) = client.next_event().await.expect("event") {
        got.push(event.message);
    }
    assert_eq!(got, ["before 1", "before 2"]);
    client.status().await.expect("status after logs");

    // With follow: the whole backlog, then what is emitted after subscribing.
    let mut follower = Client::connect(&server.path).await.expect("connect");
    let fields = follower
        .request(&Request::Logs {
            backlog: 100,
            follow: true,
        })
        .await
        .expect("logs follow");
    assert_eq!(fields.get("backlog"), Some(&3.into()));
    for i in 0..3 {
        let event = follower
            .next_event()
            .await
            .expect("event")
            .expect("backlog");
        assert_eq!(event.message, format!("before {i}"));
        assert_eq!(event.daemon, "engine");
        assert_eq!(event.fields.get("seq"), Some(&i.into()));
    }
    emit(&server.log, || {
        tracing::warn!(peer = "tcp://127.0.0.1:1", "after 0");
        tracing::error!("after 1");
    });
    let live: Vec<_> = [
        follower.next_event().await.expect("live").expect("event"),
        follower.next_event().await.expect("live").expect("event"),
    ]
    .into_iter()
    .map(|e| (e.level, e.message))
    .collect();
    assert_eq!(
        live,
        [
            ("warn".to_owned(), "after 0".to_owned()),
            ("error".to_owned(), "after 1".to_owned())
        ]
    );

    // Shutdown ends the stream.
    server.shutdown.cancel();
    let end = tokio::time::timeout(Duration::from_secs(3), follower.next_event())
        .await
        .expect("stream ends promptly");
    assert!(matches!(end, Ok(None)), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_does_not_block_the_daemon() {
    let server = start(TestHandler::new()).await;
    // A subscriber that asks to follow and then never reads.
    let mut stalled = Raw::connect(&server.path).await;
    stalled
        .send(r#"{"cmd":"logs","backlog":0,"follow":true}"#)
        .await;
    // Make sure the subscription exists before emitting (the answer comes after subscribing).
    let head = stalled.json().await;
    assert_eq!(head, serde_json::json!({"ok": true, "backlog": 0}));

    let padding = "x".repeat(200);
    let started = Instant::now();
    emit(&server.log, || {
        for i in 0..10_000 {
            tracing::info!(seq = i, padding = %padding, "event {i}");
        }
    });
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "emitting 10,000 events took {took:?}"
    );
    let last = server.log.recent(1);
    assert_eq!(last[0].message, "event 9999");

    // Another client is served normally meanwhile.
    let mut client = Client::connect(&server.path).await.expect("connect");
    client
        .status()
        .await
        .expect("status while a subscriber is stalled");

    // When the stalled one finally reads, it learns that it lost events.
    let mut saw_drop = false;
    for _ in 0..10_001 {
        let Some(line) = stalled.line().await else {
            break;
        };
        let event: serde_json::Value = serde_json::from_str(&line).expect("event JSON");
        if event["message"]
            .as_str()
            .is_some_and(|m| m.ends_with("events dropped: this log subscriber fell behind"))
        {
            assert!(event["fields"]["dropped"].as_u64().expect("count") > 0);
            saw_drop = true;
            break;
        }
    }
    assert!(
        saw_drop,
        "a lagging subscriber gets an 'events dropped' event"
    );
    server.shutdown.cancel();
}

#[tokio::test]
async fn shutdown_returns_promptly_with_clients_connected_and_removes_the_socket() {
    let server = start(TestHandler::new()).await;
    let mode = std::fs::metadata(&server.path)
        .expect("socket exists")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "control socket mode is {:o}",
        mode & 0o777
    );

    let mut idle = Raw::connect(&server.path).await;
    let mut follower = Raw::connect(&server.path).await;
    follower.send(r#"{"cmd":"logs","follow":true}"#).await;
    assert_eq!(follower.json().await["ok"], true);

    let started = Instant::now();
    server.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), server.task)
        .await
        .expect("serve returns within 2 s")
        .expect("no panic");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(!server.path.exists(), "socket file removed");
    assert_eq!(idle.line().await, None, "idle client closed");
    assert_eq!(follower.line().await, None, "follower closed");
    let err = Client::connect(&server.path).await.expect_err("gone");
    assert_eq!(
        err.to_string(),
        format!("no daemon at {} (is it running?)", server.path.display())
    );
}

#[tokio::test]
async fn clients_beyond_the_cap_are_told_to_retry() {
    let server = start(TestHandler::new()).await;
    let mut held = Vec::new();
    for _ in 0..MAX_CLIENTS {
        let mut raw = Raw::connect(&server.path).await;
        // A round trip proves the connection owns a slot.
        raw.send(r#"{"cmd":"log_level"}"#).await;
        assert_eq!(raw.json().await["ok"], true);
        held.push(raw);
    }
    let mut extra = Raw::connect(&server.path).await;
    let reply = extra.json().await;
    assert_eq!(
        reply["error"],
        format!("too many control clients ({MAX_CLIENTS} connected): try again later")
    );
    drop(held.pop());
    // The freed slot is usable again (the server notices the hang-up asynchronously).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut raw = Raw::connect(&server.path).await;
        raw.send(r#"{"cmd":"log_level"}"#).await;
        if raw.json().await["ok"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown.cancel();
}

#[tokio::test]
async fn a_client_vanishing_mid_stream_is_harmless() {
    let server = start(TestHandler::new()).await;
    emit(&server.log, || {
        for i in 0..2_000 {
            tracing::info!("filler {i}");
        }
    });
    for _ in 0..5 {
        let mut raw = Raw::connect(&server.path).await;
        raw.send(r#"{"cmd":"logs","backlog":2000,"follow":true}"#)
            .await;
        drop(raw); // gone before reading anything
    }
    let mut client = Client::connect(&server.path).await.expect("connect");
    client.status().await.expect("server still serves");
    server.shutdown.cancel();
}

#[tokio::test]
async fn bind_replaces_a_stale_socket_but_not_a_live_one_or_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("engine.ctl");

    // A socket left behind by a dead daemon.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
    let err = Client::connect(&path).await.expect_err("stale");
    assert_eq!(
        err.to_string(),
        format!(
            "stale control socket {}: the daemon is not running",
            path.display()
        )
    );
    let live = bind(&path).expect("stale socket replaced");

    let err = bind(&path).expect_err("live socket kept");
    assert!(matches!(err, ControlError::InUse { .. }), "{err:?}");
    assert!(err
        .to_string()
        .starts_with("a daemon is already answering on"));
    drop(live);

    let file = dir.path().join("notes.ctl");
    std::fs::write(&file, "not a socket").expect("write");
    let err = bind(&file).expect_err("regular file kept");
    assert!(matches!(err, ControlError::NotASocket { .. }), "{err:?}");
    assert_eq!(
        std::fs::read_to_string(&file).expect("read"),
        "not a socket"
    );

    let long = dir.path().join(format!("{}.ctl", "x".repeat(120)));
    assert!(matches!(bind(&long), Err(ControlError::PathTooLong { .. })));
}

#[tokio::test]
async fn discover_lists_control_sockets_sorted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut keep = Vec::new();
    for name in ["udsproxyd", "engine", "mount-12"] {
        keep.push(
            std::os::unix::net::UnixListener::bind(socket_path(dir.path(), name)).expect("bind"),
        );
    }
    std::fs::write(dir.path().join("fake.ctl"), "").expect("regular file");
    std::fs::write(dir.path().join("engine.lock"), "1").expect("lock file");
    let found = discover(dir.path());
    let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["engine", "mount-12", "udsproxyd"]);
    assert_eq!(found[0].1, dir.path().join("engine.ctl"));
    assert!(discover(&dir.path().join("missing")).is_empty());
}

/// A control server on its own thread and runtime, for the blocking tool entry points.
struct ThreadServer {
    log: LogHandle,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ThreadServer {
    fn start(run_dir: &Path, name: &str, events: usize) -> ThreadServer {
        let shutdown = CancellationToken::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = socket_path(run_dir, name);
        let token = shutdown.clone();
        // As real daemons do: every mount process logs as `mount`, whatever its socket.
        let log = LogHandle::detached(name.split('-').next().unwrap_or(name));
        let server_log = log.clone();
        let name = name.to_owned();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = bind(&path).expect("bind");
                let log = server_log;
                emit(&log, || {
                    for i in 0..events {
                        tracing::info!(n = i, "{name} event {i}");
                    }
                });
                ready_tx.send(()).expect("ready");
                serve(listener, TestHandler::new(), log, token).await;
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("server ready");
        ThreadServer {
            log,
            shutdown,
            thread: Some(thread),
        }
    }
}

impl Drop for ThreadServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(
    f: fn(Vec<OsString>, &mut dyn std::io::Write, &mut dyn std::io::Write) -> u8,
    args: &[&str],
) -> (u8, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let args = args.iter().map(OsString::from).collect();
    let code = f(args, &mut out, &mut err);
    (
        code,
        String::from_utf8(out).expect("utf-8 stdout"),
        String::from_utf8(err).expect("utf-8 stderr"),
    )
}

#[test]
fn status_and_logs_tools_against_running_servers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run_dir = dir.path().to_str().expect("utf-8 path").to_owned();
    let engine = ThreadServer::start(dir.path(), "engine", 3);

    let (code, out, err) = run(status_command, &["status", "--json", "--run-dir", &run_dir]);
    assert_eq!(code, EXIT_OK, "stderr: {err}");
    let value: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    let daemons = value["daemons"].as_array().expect("daemons");
    assert_eq!(daemons.len(), 1);
    assert_eq!(daemons[0]["name"], "engine");
    assert_eq!(daemons[0]["reachable"], true);
    assert_eq!(daemons[0]["pid"], std::process::id());
    assert_eq!(daemons[0]["control"], format!("{run_dir}/engine.ctl"));
    assert_eq!(daemons[0]["peers"][0]["address"], "tcp://127.0.0.1:40000");
    assert_eq!(daemons[0]["peers"][0]["state"], "connected");

    // A stale socket makes the run partial: exit 1, reported, others still shown.
    drop(
        std::os::unix::net::UnixListener::bind(socket_path(dir.path(), "udsproxyd"))
            .expect("stale socket"),
    );
    let (code, out, _) = run(status_command, &["status", "--json", "--run-dir", &run_dir]);
    assert_eq!(code, EXIT_UNREACHABLE);
    let value: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(
        value["daemons"][1],
        serde_json::json!({
            "name": "udsproxyd",
            "control": format!("{run_dir}/udsproxyd.ctl"),
            "reachable": false,
            "error": format!("stale control socket {run_dir}/udsproxyd.ctl: the daemon is not running"),
        })
    );

    let (code, out, _) = run(status_command, &["status", "--run-dir", &run_dir]);
    assert_eq!(code, EXIT_UNREACHABLE);
    assert!(
        out.starts_with(&format!("engine (pid {}, up 42s,", std::process::id())),
        "{out}"
    );
    assert!(out.contains("\nudsproxyd (unreachable)\n"), "{out}");
    std::fs::remove_file(socket_path(dir.path(), "udsproxyd")).expect("remove stale");

    // logs: two daemons merged by time, human and JSON, with a level filter.
    let _proxy = ThreadServer::start(dir.path(), "udsproxyd", 2);
    let logs = |extra: &[&str]| {
        let mut args = vec!["logs", "--run-dir", &run_dir];
        args.extend_from_slice(extra);
        run(|a, o, e| logs_command(a, o, e, false), &args)
    };
    let (code, out, err) = logs(&["-n", "10"]);
    assert_eq!(code, EXIT_OK, "stderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    assert!(lines.iter().all(|l| l.contains(" INFO  ")), "{out}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains(" engine: engine event "))
            .count(),
        3
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains(" udsproxyd: udsproxyd event "))
            .count(),
        2
    );
    assert!(lines[0].ends_with("n=0"), "{}", lines[0]);

    let (code, out, _) = logs(&["--daemon", "udsproxyd", "--json", "-n", "1"]);
    assert_eq!(code, EXIT_OK);
    let event: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON event");
    assert_eq!(event["daemon"], "udsproxyd");
    assert_eq!(event["message"], "udsproxyd event 1");

    let (code, out, _) = logs(&["--level", "warn"]);
    assert_eq!(code, EXIT_OK);
    assert_eq!(out, "", "no warnings were logged");

    let (code, _, err) = logs(&["--daemon", "rexec_server"]);
    assert_eq!(code, 3);
    assert_eq!(
        err,
        format!("dpuctl logs: no daemon named \"rexec_server\" in {run_dir} (running: engine, udsproxyd)\n")
    );

    // Mounts are told apart by their sockets' names.
    let mount = ThreadServer::start(dir.path(), "mount-77", 1);
    let (code, out, _) = logs(&["--daemon", "mount"]);
    assert_eq!(code, EXIT_OK);
    assert!(out.contains(" mount-77: mount-77 event 0"), "{out}");
    let (_, out, _) = logs(&["--daemon", "mount", "--json"]);
    let event: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON event");
    assert_eq!(event["daemon"], "mount-77");
    drop(mount);
    drop(engine);
}

/// A `Write` whose bytes another thread can watch.
#[derive(Clone, Default)]
struct Shared(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }
}

#[test]
fn logs_follow_prints_live_events_until_the_daemons_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run_dir = dir.path().to_str().expect("utf-8 path").to_owned();
    let engine = ThreadServer::start(dir.path(), "engine", 2);
    let (out, err) = (Shared::default(), Shared::default());
    let follower = {
        let (mut out, mut err) = (out.clone(), err.clone());
        let args: Vec<OsString> = ["logs", "-f", "-n", "1", "--json", "--run-dir", &run_dir]
            .iter()
            .map(OsString::from)
            .collect();
        std::thread::spawn(move || logs_command(args, &mut out, &mut err, false))
    };
    // The backlog is printed once the follower is subscribed; then emit until it shows a live
    // event (it reads them asynchronously).
    let deadline = Instant::now() + Duration::from_secs(10);
    while out.text().is_empty() {
        assert!(Instant::now() < deadline, "no backlog shown");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut sent = 0;
    while !out.text().contains("\"live ") {
        assert!(
            Instant::now() < deadline,
            "no live event shown: {}",
            out.text()
        );
        emit(&engine.log, || tracing::warn!(seq = sent, "live {sent}"));
        sent += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(engine); // the daemon stops: its stream ends, and so does `logs -f`
    let code = follower.join().expect("no panic");
    assert_eq!(code, EXIT_OK, "stderr: {}", err.text());
    let text = out.text();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect();
    assert_eq!(
        events[0]["message"], "engine event 1",
        "the -n 1 backlog first"
    );
    assert!(events[1..].iter().all(|e| e["level"] == "warn"));
    assert!(events[1]["message"]
        .as_str()
        .expect("message")
        .starts_with("live "));
    assert_eq!(
        err.text(),
        "dpuctl logs: engine closed its log stream (stopped?)\n"
    );
}

/// Standard output of `dpuctl logs | head` once `head` has exited.
struct ClosedPipe;

impl std::io::Write for ClosedPipe {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::BrokenPipe.into())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Err(std::io::ErrorKind::BrokenPipe.into())
    }
}

#[test]
fn a_closed_stdout_ends_the_tools_quietly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run_dir = dir.path().to_str().expect("utf-8 path").to_owned();
    let _engine = ThreadServer::start(dir.path(), "engine", 50);
    let mut err = Vec::new();
    let args = |tool: &str| -> Vec<OsString> {
        [tool, "--run-dir", &run_dir]
            .iter()
            .map(OsString::from)
            .collect()
    };
    assert_eq!(
        logs_command(args("logs"), &mut ClosedPipe, &mut err, false),
        EXIT_OK
    );
    assert_eq!(
        status_command(args("status"), &mut ClosedPipe, &mut err),
        EXIT_OK
    );
    assert!(
        err.is_empty(),
        "nothing on stderr: {}",
        String::from_utf8_lossy(&err)
    );
}
