//! The control socket: newline-delimited JSON over a Unix socket (mode 0600) under
//! `/var/run/qtfs/`. One request object per line; one response object per line, except
//! `logs` with `follow`, which streams one event object per line until the client goes away.
//!
//! This module holds the protocol ([`Request`], [`ErrorReply`]), the server every daemon runs
//! ([`bind`], [`serve`], answering through a [`ControlHandler`]), the [`Client`] used by
//! `dpuctl status`, `dpuctl logs` and the TUI, and [`discover`]. The protocol is described
//! line by line in `docs/status.md`.
//!
//! Concurrency: [`serve`] runs one task per client, tracked by a `TaskTracker` and capped by a
//! semaphore ([`MAX_CLIENTS`]). Every await of a client task (read, handler, write) races the
//! shutdown token, so a client that never reads cannot hold up shutdown, and a client can only
//! ever block its own task. Log streaming reads a `broadcast` receiver: the daemon's logging
//! never waits for a subscriber (see [`super::logring`]). The server must not log per
//! streamed event: its own events would feed the stream they are written to.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use nix::sys::socket::{self as sock, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::logging::LogHandle;
use super::logring::{next_live, LogEvent};
use super::status::DaemonStatus;
use crate::allowlist::ListType;

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// -> `{"ok":true,"status":DaemonStatus}`
    Status,
    /// -> `{"ok":true,"allowlists":{"udsconnect":["/a", ...], ...}}`; all types when `list_type` is absent.
    AllowlistList {
        #[serde(default)]
        list_type: Option<ListType>,
    },
    /// -> `{"ok":true,"index":N}`
    AllowlistAdd {
        list_type: ListType,
        path: String,
        /// Also write the daemon's whitelist file atomically.
        #[serde(default)]
        persist: bool,
    },
    /// -> `{"ok":true,"removed":"/path"}`
    AllowlistDelete {
        list_type: ListType,
        index: usize,
        #[serde(default)]
        persist: bool,
    },
    /// Get (no `level`) or set the log level (an EnvFilter directive such as `debug`).
    /// -> `{"ok":true,"level":"debug"}`
    LogLevel {
        #[serde(default)]
        level: Option<String>,
    },
    /// Recent events from the ring (`backlog` at most), then, with `follow`, live events.
    /// Each event is one line: a [`super::logring::LogEvent`] object.
    Logs {
        #[serde(default = "default_backlog")]
        backlog: usize,
        #[serde(default)]
        follow: bool,
    },
    /// Re-read config and allowlists, as SIGHUP does. -> `{"ok":true}`
    Reload,
    /// Send `signal` (a number, default SIGTERM) to the process of rexec session `id`.
    /// -> `{"ok":true}`
    SessionKill {
        id: u64,
        #[serde(default = "default_kill_signal")]
        signal: i32,
    },
}

fn default_kill_signal() -> i32 {
    libc::SIGTERM
}

fn default_backlog() -> usize {
    200
}

/// Error answer: `{"ok":false,"error":"what went wrong and what to do"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub ok: bool,
    pub error: String,
}

/// What a daemon implements so the control server can answer for it. Status, log level and
/// log streaming are answered by the server itself from [`super::logring`].
pub trait ControlHandler: Send + Sync + 'static {
    /// A fresh snapshot of this daemon's status.
    fn status(&self) -> DaemonStatus;
    /// Allowlist requests and `reload`: returns the fields to merge into `{"ok":true, ...}`,
    /// or an error message that tells the operator what to do.
    fn handle(
        &self,
        req: Request,
    ) -> futures::future::BoxFuture<
        'static,
        Result<serde_json::Map<String, serde_json::Value>, String>,
    >;
}

/// Default directory of control sockets and lock files.
pub const DEFAULT_RUN_DIR: &str = "/var/run/qtfs";

/// Longest request line the server accepts (bytes, without the newline). Requests are small
/// objects; the biggest legitimate one is an `allowlist_add` with a path (≤ 4 KiB on Linux).
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// Longest answer line a [`Client`] accepts: a status with large allowlists stays far below.
pub const MAX_REPLY_LINE: usize = 16 * 1024 * 1024;

/// Concurrent control clients per daemon; more are told to retry. Only root can connect, so
/// this bounds mistakes (a runaway script), not attacks.
pub const MAX_CLIENTS: usize = 64;

/// How long [`Client`] waits for the daemon to accept a connection or answer a request.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`serve`] waits for its client tasks after shutdown; they only need to notice the
/// token, so this is a safety net, not a grace period.
const CLIENT_DRAIN: Duration = Duration::from_secs(2);

/// The value of `cmd` for every [`Request`], in documentation order.
pub const COMMANDS: [&str; 8] = [
    "status",
    "allowlist_list",
    "allowlist_add",
    "allowlist_delete",
    "log_level",
    "logs",
    "reload",
    "session_kill",
];

/// Errors of the control socket: binding it (daemon side) and talking to it (client side).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    // --- binding (daemon side) ---
    #[error("cannot create the directory {path} for the control socket: {source}; run as root or pick another --run-dir")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot inspect {path}: {source}; run as root or pick another --run-dir")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} exists and is not a socket: move it away, or pick another --run-dir")]
    NotASocket { path: PathBuf },
    #[error("a daemon is already answering on {path}: stop it first, or start this one with another --run-dir")]
    InUse { path: PathBuf },
    #[error("cannot tell whether the control socket {path} is still in use: {source}; remove it if no daemon is running")]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the stale control socket {path}: {source}; remove it by hand")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("control socket path {path} is too long for a Unix socket (at most 107 bytes): pick a shorter --run-dir")]
    PathTooLong { path: PathBuf },
    #[error("cannot create a Unix socket: {source}; is the process out of file descriptors?")]
    Socket {
        #[source]
        source: nix::Error,
    },
    #[error(
        "cannot bind the control socket {path}: {source}; check that the directory is writable"
    )]
    Bind {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot restrict {path} to mode 0600: {source}")]
    Chmod {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on the control socket {path}: {source}")]
    Listen {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot register the control socket {path} with the runtime: {source}; bind must run inside a tokio runtime")]
    Register {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    // --- talking to a daemon (client side) ---
    #[error("no daemon at {path} (is it running?)")]
    NoDaemon { path: PathBuf },
    #[error("permission denied on {path}: run as root")]
    PermissionDenied { path: PathBuf },
    #[error("stale control socket {path}: the daemon is not running")]
    Stale { path: PathBuf },
    #[error("cannot connect to the control socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot encode the request: {source}")]
    Encode {
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot send the request to {path}: {source}; the daemon may have stopped")]
    Send {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the answer from {path}: {source}; the daemon may have stopped")]
    Receive {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the daemon at {path} closed the connection before answering; see its log (journalctl or `dpuctl logs`)")]
    Closed { path: PathBuf },
    #[error("the daemon at {path} did not answer within {}: it may be overloaded or stuck; see its log (journalctl)", humantime::format_duration(*.after))]
    Timeout { path: PathBuf, after: Duration },
    #[error("the daemon at {path} sent an answer dpuctl does not understand ({reason}); are dpuctl and the daemon the same version?")]
    BadReply { path: PathBuf, reason: String },
    /// The daemon answered `{"ok":false,"error":...}`: its message.
    #[error("{0}")]
    Remote(String),
}

// ---------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------

/// Binds the control socket at `path`, mode 0600, ready for [`serve`].
///
/// Creates the parent directory (0755) if missing. An existing socket is removed only when
/// nobody answers on it (a daemon that died without cleaning up); a live one is
/// [`ControlError::InUse`], and anything that is not a socket is left alone.
///
/// The mode is set race-free without touching the process-wide umask (which other threads
/// may be using): the socket is `fchmod`ed to 0600 *before* `bind`, and Linux creates the
/// socket file with the socket inode's mode (masked by the umask), so the file never exists
/// with a wider mode, not even for an instant. It is `chmod`ed again after bind so that a
/// kernel that ignored the first step still ends up right.
///
/// Must be called inside a tokio runtime (the listener registers with its reactor).
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|source| ControlError::CreateDir {
                path: parent.to_owned(),
                source,
            })?;
    }
    remove_if_stale(path)?;

    let fd = sock::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|source| ControlError::Socket { source })?;
    let owner_only = Mode::from_bits_truncate(0o600);
    // Best effort: if it fails, the chmod below still fixes the mode, with a short window.
    let _ = nix::sys::stat::fchmod(&fd, owner_only);
    let addr = UnixAddr::new(path).map_err(|_| ControlError::PathTooLong {
        path: path.to_owned(),
    })?;
    sock::bind(fd.as_raw_fd(), &addr).map_err(|source| ControlError::Bind {
        path: path.to_owned(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ControlError::Chmod {
            path: path.to_owned(),
            source,
        }
    })?;
    sock::listen(&fd, Backlog::MAXCONN).map_err(|source| ControlError::Listen {
        path: path.to_owned(),
        source,
    })?;
    let listener = std::os::unix::net::UnixListener::from(fd);
    UnixListener::from_std(listener).map_err(|source| ControlError::Register {
        path: path.to_owned(),
        source,
    })
}

/// Removes `path` if it is a socket nobody listens on; see [`bind`].
fn remove_if_stale(path: &Path) -> Result<(), ControlError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ControlError::Inspect {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ControlError::NotASocket {
            path: path.to_owned(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ControlError::InUse {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .map_err(|source| ControlError::RemoveStale {
                path: path.to_owned(),
                source,
            }),
        Err(source) => Err(ControlError::Probe {
            path: path.to_owned(),
            source,
        }),
    }
}

/// What every client task needs.
struct Server {
    handler: Arc<dyn ControlHandler>,
    log: LogHandle,
    /// The socket path, reported as `control` in statuses that leave it empty.
    control: String,
}

/// Serves the control protocol on `listener` until `shutdown` is cancelled; then stops
/// accepting, ends every client connection, removes the socket file (if it is still the one
/// we bound) and returns.
pub async fn serve(
    listener: UnixListener,
    handler: Arc<dyn ControlHandler>,
    log: LogHandle,
    shutdown: CancellationToken,
) {
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
    // Identify our socket file so that shutdown never removes a successor's socket.
    let identity = path
        .as_deref()
        .and_then(|p| std::fs::symlink_metadata(p).ok())
        .map(|m| (m.dev(), m.ino()));
    let server = Arc::new(Server {
        handler,
        log,
        control: path
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    });
    let tracker = TaskTracker::new();
    // Caps concurrent clients; a permit lives as long as its client task.
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    tracing::debug!(control = %server.control, "control socket serving");

    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning; the daemon keeps running.
                tracing::warn!(%error, "control socket: cannot accept a client");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let server = server.clone();
                let shutdown = shutdown.clone();
                tracker.spawn(async move {
                    serve_client(stream, &server, &shutdown).await;
                    drop(permit);
                });
            }
            Err(_) => {
                let shutdown = shutdown.clone();
                tracker.spawn(async move {
                    let (_, writer) = stream.into_split();
                    let mut writer = BufWriter::new(writer);
                    let line = error_line(&format!(
                        "too many control clients ({MAX_CLIENTS} connected): try again later"
                    ));
                    write_or_shutdown(&mut writer, &line, &shutdown).await;
                });
            }
        }
    }

    if let (Some(path), Some(identity)) = (&path, identity) {
        let ours = std::fs::symlink_metadata(path)
            .map(|m| (m.dev(), m.ino()) == identity)
            .unwrap_or(false);
        if ours {
            if let Err(error) = std::fs::remove_file(path) {
                tracing::warn!(%error, path = %path.display(), "cannot remove the control socket");
            }
        }
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(CLIENT_DRAIN, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("control clients did not finish after shutdown; leaving them behind");
    }
    tracing::debug!("control socket closed");
}

/// Writes `text` and flushes, unless shutdown comes first. `false` when the client is gone
/// or shutdown was requested: the connection must end.
async fn write_or_shutdown(
    out: &mut BufWriter<OwnedWriteHalf>,
    text: &str,
    shutdown: &CancellationToken,
) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        done = async {
            out.write_all(text.as_bytes()).await?;
            out.flush().await
        } => done.is_ok(),
    }
}

/// One client connection: requests one per line until EOF, a framing error or shutdown.
async fn serve_client(stream: UnixStream, server: &Server, shutdown: &CancellationToken) {
    let (reader, writer) = stream.into_split();
    let mut lines = FramedRead::new(reader, LinesCodec::new_with_max_length(MAX_REQUEST_LINE));
    let mut out = BufWriter::new(writer);
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = lines.next() => next,
        };
        let line = match next {
            None => return,
            Some(Ok(line)) => line,
            Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                let message = format!(
                    "request line longer than {MAX_REQUEST_LINE} bytes: send one JSON request \
                     per line; closing the connection"
                );
                write_or_shutdown(&mut out, &error_line(&message), shutdown).await;
                return;
            }
            Some(Err(LinesCodecError::Io(e))) if e.kind() == io::ErrorKind::InvalidData => {
                let message = "request is not valid UTF-8: send one JSON request per line; \
                               closing the connection";
                write_or_shutdown(&mut out, &error_line(message), shutdown).await;
                return;
            }
            // The client went away mid-line; nothing to answer.
            Some(Err(LinesCodecError::Io(_))) => return,
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let request = match parse_request(line) {
            Ok(request) => request,
            Err(message) => {
                if !write_or_shutdown(&mut out, &error_line(&message), shutdown).await {
                    return;
                }
                continue;
            }
        };
        let keep_going = match request {
            Request::Logs { backlog, follow } => {
                stream_logs(&mut lines, &mut out, server, backlog, follow, shutdown).await
            }
            request => {
                let reply = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    reply = answer(request, server) => reply,
                };
                write_or_shutdown(&mut out, &reply, shutdown).await
            }
        };
        if !keep_going {
            return;
        }
    }
}

/// Parses one request line; the error names what was wrong and what is valid.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
        format!(
            "malformed JSON ({e}): send one JSON object per line, such as {{\"cmd\":\"status\"}}"
        )
    })?;
    let valid = COMMANDS.join(", ");
    let cmd = match value.get("cmd") {
        None if !value.is_object() => {
            return Err(format!(
                "a request must be a JSON object with a \"cmd\" field; valid commands: {valid}"
            ))
        }
        None => {
            return Err(format!(
                "the request has no \"cmd\" field; valid commands: {valid}"
            ))
        }
        Some(serde_json::Value::String(cmd)) => cmd.clone(),
        Some(other) => {
            return Err(format!(
                "\"cmd\" must be a string, not {other}; valid commands: {valid}"
            ))
        }
    };
    if !COMMANDS.contains(&cmd.as_str()) {
        return Err(format!("unknown command {cmd:?}; valid commands: {valid}"));
    }
    serde_json::from_value(value).map_err(|e| format!("invalid {cmd:?} request: {e}"))
}

/// `{"ok":false,"error":message}` and a newline.
fn error_line(message: &str) -> String {
    let reply = ErrorReply {
        ok: false,
        error: message.to_owned(),
    };
    let mut line = serde_json::to_string(&reply)
        .unwrap_or_else(|_| r#"{"ok":false,"error":"internal error"}"#.to_owned());
    line.push('\n');
    line
}

/// `{"ok":true, ...fields}` and a newline, with `ok` first so the answer reads well.
fn ok_line(fields: serde_json::Map<String, serde_json::Value>) -> String {
    let mut line = String::from("{\"ok\":true");
    for (key, value) in fields {
        if key == "ok" {
            continue;
        }
        line.push(',');
        line.push_str(&serde_json::Value::String(key).to_string());
        line.push(':');
        line.push_str(&value.to_string());
    }
    line.push_str("}\n");
    line
}

/// The answer line to any request but `logs`.
async fn answer(request: Request, server: &Server) -> String {
    let mut fields = serde_json::Map::new();
    match request {
        Request::Status => {
            let mut status = server.handler.status();
            status.log_level = server.log.level();
            if status.control.is_empty() {
                status.control = server.control.clone();
            }
            match serde_json::to_value(&status) {
                Ok(value) => fields.insert("status".into(), value),
                Err(e) => return error_line(&format!("cannot encode the status: {e}")),
            };
        }
        Request::LogLevel { level: None } => {
            fields.insert("level".into(), server.log.level().into());
        }
        Request::LogLevel { level: Some(level) } => {
            let before = server.log.level();
            if let Err(e) = server.log.set_level(&level) {
                return error_line(&e.to_string());
            }
            let now = server.log.level();
            tracing::info!(from = %before, to = %now, "log level changed");
            fields.insert("level".into(), now.into());
        }
        Request::Logs { .. } => {
            // Streamed by stream_logs; not an answer of one line.
            return error_line("internal error: logs is streamed, not answered");
        }
        other @ (Request::AllowlistList { .. }
        | Request::AllowlistAdd { .. }
        | Request::AllowlistDelete { .. }
        | Request::Reload
        | Request::SessionKill { .. }) => match server.handler.handle(other).await {
            Ok(more) => fields = more,
            Err(message) => return error_line(&message),
        },
    }
    ok_line(fields)
}

/// How many live events are written together before a flush, so that a burst costs one
/// write, not one per event.
const LIVE_BATCH: usize = 256;

/// Serialises one event as a line onto `batch`.
fn push_event(batch: &mut String, event: &LogEvent) {
    if let Ok(json) = serde_json::to_string(event) {
        batch.push_str(&json);
        batch.push('\n');
    }
}

/// Answers `logs`: `{"ok":true,"backlog":N}`, N backlog events, then live ones while
/// `follow`. Returns whether the connection may serve another request.
async fn stream_logs(
    lines: &mut FramedRead<OwnedReadHalf, LinesCodec>,
    out: &mut BufWriter<OwnedWriteHalf>,
    server: &Server,
    backlog: usize,
    follow: bool,
    shutdown: &CancellationToken,
) -> bool {
    let (events, mut live) = server.log.backlog_and_subscribe(backlog);
    let mut head = serde_json::Map::new();
    head.insert("backlog".into(), events.len().into());
    let mut batch = ok_line(head);
    for event in &events {
        push_event(&mut batch, event);
    }
    drop(events);
    if !write_or_shutdown(out, &batch, shutdown).await {
        return false;
    }
    if !follow {
        return true;
    }
    let daemon = server.log.daemon().to_owned();
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return false,
            input = lines.next() => match input {
                // Input while following is ignored: the stream ends when the client hangs up.
                Some(Ok(_)) => continue,
                _ => return false,
            },
            event = next_live(&mut live, &daemon) => event,
        };
        let Some(event) = event else { return false };
        batch.clear();
        push_event(&mut batch, &event);
        for _ in 1..LIVE_BATCH {
            match live.try_recv() {
                Ok(event) => push_event(&mut batch, &event),
                Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => {
                    push_event(&mut batch, &super::logring::dropped_event(&daemon, n))
                }
                Err(_) => break,
            }
        }
        // While this write waits on a slow client, the broadcast keeps the daemon going and
        // this receiver falls behind; the next recv reports how many events it lost.
        if !write_or_shutdown(out, &batch, shutdown).await {
            return false;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------

/// Where a client stands after a `logs` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    /// No `logs` request: no events are coming.
    Idle,
    /// `logs` without follow: this many backlog events are still to be read.
    Backlog(usize),
    /// `logs` with follow: events until the daemon closes.
    Follow,
}

/// A client of one daemon's control socket.
pub struct Client {
    path: PathBuf,
    lines: FramedRead<OwnedReadHalf, LinesCodec>,
    writer: OwnedWriteHalf,
    timeout: Duration,
    stream: Stream,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("path", &self.path)
            .field("timeout", &self.timeout)
            .field("stream", &self.stream)
            .finish()
    }
}

impl Client {
    /// Connects to the control socket at `path` (waiting at most [`DEFAULT_CLIENT_TIMEOUT`]).
    pub async fn connect(path: &Path) -> Result<Client, ControlError> {
        let connected = tokio::time::timeout(DEFAULT_CLIENT_TIMEOUT, UnixStream::connect(path))
            .await
            .map_err(|_| ControlError::Timeout {
                path: path.to_owned(),
                after: DEFAULT_CLIENT_TIMEOUT,
            })?;
        let stream = connected.map_err(|source| connect_error(path, source))?;
        let (reader, writer) = stream.into_split();
        Ok(Client {
            path: path.to_owned(),
            lines: FramedRead::new(reader, LinesCodec::new_with_max_length(MAX_REPLY_LINE)),
            writer,
            timeout: DEFAULT_CLIENT_TIMEOUT,
            stream: Stream::Idle,
        })
    }

    /// Uses `timeout` instead of [`DEFAULT_CLIENT_TIMEOUT`] for the answers to requests.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The socket this client is connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one request and reads its answer; `{"ok":false}` becomes an error carrying the
    /// daemon's message. On success returns the answer's fields without `ok`.
    ///
    /// After a `logs` request, read the events with [`Client::next_event`]; after one with
    /// `follow`, the connection carries only events. After a timeout the connection is out of
    /// step: connect again.
    pub async fn request(
        &mut self,
        req: &Request,
    ) -> Result<serde_json::Map<String, serde_json::Value>, ControlError> {
        let mut line =
            serde_json::to_string(req).map_err(|source| ControlError::Encode { source })?;
        line.push('\n');
        let path = self.path.clone();
        let timeout = self.timeout;
        let exchange = async {
            self.writer
                .write_all(line.as_bytes())
                .await
                .map_err(|source| ControlError::Send {
                    path: path.clone(),
                    source,
                })?;
            self.read_line()
                .await?
                .ok_or(ControlError::Closed { path: path.clone() })
        };
        let reply = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ControlError::Timeout {
                path: path.clone(),
                after: timeout,
            })??;
        let fields = parse_reply(&path, &reply)?;
        if let Request::Logs { follow, .. } = req {
            self.stream = if *follow {
                Stream::Follow
            } else {
                let count = fields
                    .get("backlog")
                    .and_then(serde_json::Value::as_u64)
                    .ok_or_else(|| ControlError::BadReply {
                        path: path.clone(),
                        reason: "the logs answer has no \"backlog\" count".into(),
                    })?;
                Stream::Backlog(usize::try_from(count).unwrap_or(usize::MAX))
            };
        }
        Ok(fields)
    }

    /// Asks for the daemon's status.
    pub async fn status(&mut self) -> Result<DaemonStatus, ControlError> {
        let mut fields = self.request(&Request::Status).await?;
        let status = fields
            .remove("status")
            .ok_or_else(|| ControlError::BadReply {
                path: self.path.clone(),
                reason: "the answer has no \"status\"".into(),
            })?;
        serde_json::from_value(status).map_err(|e| ControlError::BadReply {
            path: self.path.clone(),
            reason: format!("invalid status: {e}"),
        })
    }

    /// After a `logs` request: the next streamed event, `None` when the daemon closed (or,
    /// without `follow`, after the last backlog event; or when no `logs` request was made).
    /// Waits as long as it takes: live events come when they come.
    pub async fn next_event(&mut self) -> Result<Option<super::logring::LogEvent>, ControlError> {
        match self.stream {
            Stream::Idle => return Ok(None),
            Stream::Backlog(0) => {
                self.stream = Stream::Idle;
                return Ok(None);
            }
            Stream::Backlog(_) | Stream::Follow => {}
        }
        let Some(line) = self.read_line().await? else {
            self.stream = Stream::Idle;
            return Ok(None);
        };
        if let Stream::Backlog(n) = self.stream {
            self.stream = Stream::Backlog(n - 1);
        }
        serde_json::from_str(&line).map_err(|e| ControlError::BadReply {
            path: self.path.clone(),
            reason: format!("invalid log event: {e}"),
        })
    }

    /// The next line from the daemon; `None` at EOF.
    async fn read_line(&mut self) -> Result<Option<String>, ControlError> {
        match self.lines.next().await {
            None => Ok(None),
            Some(Ok(line)) => Ok(Some(line)),
            Some(Err(LinesCodecError::MaxLineLengthExceeded)) => Err(ControlError::BadReply {
                path: self.path.clone(),
                reason: format!("an answer line is longer than {MAX_REPLY_LINE} bytes"),
            }),
            Some(Err(LinesCodecError::Io(source))) => Err(ControlError::Receive {
                path: self.path.clone(),
                source,
            }),
        }
    }
}

/// The operator-facing error for a failed `connect(2)` to `path`.
fn connect_error(path: &Path, source: io::Error) -> ControlError {
    let path = path.to_owned();
    match source.kind() {
        io::ErrorKind::NotFound => ControlError::NoDaemon { path },
        io::ErrorKind::PermissionDenied => ControlError::PermissionDenied { path },
        io::ErrorKind::ConnectionRefused => ControlError::Stale { path },
        _ => ControlError::Connect { path, source },
    }
}

/// The fields of an answer line without `ok`; `ok:false` becomes [`ControlError::Remote`].
fn parse_reply(
    path: &Path,
    line: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, ControlError> {
    let bad = |reason: String| ControlError::BadReply {
        path: path.to_owned(),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| bad(format!("malformed JSON: {e}")))?;
    let serde_json::Value::Object(mut fields) = value else {
        return Err(bad("not a JSON object".into()));
    };
    match fields.remove("ok") {
        Some(serde_json::Value::Bool(true)) => Ok(fields),
        Some(serde_json::Value::Bool(false)) => Err(ControlError::Remote(
            fields
                .get("error")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("the daemon refused without saying why")
                .to_owned(),
        )),
        _ => Err(bad("no boolean \"ok\" field".into())),
    }
}

// ---------------------------------------------------------------------------------------
// Discovery
// ---------------------------------------------------------------------------------------

/// The control sockets found in `run_dir`: `(daemon name, socket path)`, sorted by name.
/// Sockets are named `<name>.ctl` (`engine.ctl`, `udsproxyd.ctl`, `mount-<pid>.ctl`).
/// A missing or unreadable directory has none; see [`try_discover`] to tell them apart.
pub fn discover(run_dir: &std::path::Path) -> Vec<(String, std::path::PathBuf)> {
    try_discover(run_dir).unwrap_or_default()
}

/// [`discover`], but an unreadable directory is an error (a missing one is still empty).
pub fn try_discover(run_dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let entries = match std::fs::read_dir(run_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if path.extension() != Some(std::ffi::OsStr::new("ctl")) {
            continue;
        }
        // Entries can vanish between readdir and stat (a daemon exiting): skip them.
        let is_socket = entry.file_type().map(|t| t.is_socket()).unwrap_or(false);
        let name = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned);
        if let (true, Some(name)) = (is_socket, name) {
            found.push((name, path));
        }
    }
    found.sort();
    Ok(found)
}

/// Removes the control sockets in `run_dir` whose daemon is provably gone, and returns
/// them: `mount-<pid>.ctl` when no process `pid` exists, `<name>.ctl` when nobody holds
/// `<name>.lock` (every daemon holds its instance lock before it binds its socket, and the
/// kernel drops the lock when it dies, however it dies). A daemon killed with SIGKILL, or
/// one that failed at start, otherwise leaves a socket that makes `dpuctl status` fail until
/// someone deletes it. Anything not provably stale is left alone.
pub fn prune_stale(run_dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for (name, path) in discover(run_dir) {
        let gone = match name.strip_prefix("mount-").map(str::parse::<i32>) {
            Some(Ok(pid)) if pid > 0 => {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                    == Err(nix::errno::Errno::ESRCH)
            }
            Some(_) => false,
            None => lock_is_free(&run_dir.join(format!("{name}.lock"))),
        };
        // Nobody listening is the last check: a socket that answers is never removed.
        let refused = || {
            std::os::unix::net::UnixStream::connect(&path)
                .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused)
        };
        if gone && refused() && std::fs::remove_file(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// True when the instance lock file `path` exists and nobody holds it.
fn lock_is_free(path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok()
}

/// The control socket path of daemon `name` in `run_dir`.
pub fn socket_path(run_dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    run_dir.join(format!("{name}.ctl"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sockets_of_daemons_that_are_gone_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        // A socket file nobody listens on.
        let dead_socket = |name: &str| {
            drop(std::os::unix::net::UnixListener::bind(run.join(name)).unwrap());
        };
        dead_socket("engine.ctl");
        std::fs::write(run.join("engine.lock"), "1").unwrap();
        dead_socket("udsproxyd.ctl");
        let _held = crate::daemon::lock::Lock::acquire(run, "udsproxyd").unwrap();
        dead_socket("rexec_server.ctl"); // no lock file: not provably gone
        let child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        let mut child = child;
        child.wait().unwrap();
        dead_socket(&format!("mount-{dead}.ctl"));
        dead_socket(&format!("mount-{}.ctl", std::process::id()));
        // A socket that answers is never removed, whatever its lock says.
        let _live = std::os::unix::net::UnixListener::bind(run.join("tui.ctl")).unwrap();
        std::fs::write(run.join("tui.lock"), "1").unwrap();

        let mut removed = prune_stale(run);
        removed.sort();
        let mut want = vec![
            run.join("engine.ctl"),
            run.join(format!("mount-{dead}.ctl")),
        ];
        want.sort();
        assert_eq!(removed, want);
        let left: Vec<String> = discover(run).into_iter().map(|(n, _)| n).collect();
        let mut expect = vec![
            format!("mount-{}", std::process::id()),
            "rexec_server".to_string(),
            "tui".to_string(),
            "udsproxyd".to_string(),
        ];
        expect.sort();
        assert_eq!(left, expect);
    }

    #[test]
    fn every_listed_command_parses_and_round_trips() {
        let examples = [
            r#"{"cmd":"status"}"#,
            r#"{"cmd":"allowlist_list"}"#,
            r#"{"cmd":"allowlist_add","list_type":"udsconnect","path":"/run/x.sock"}"#,
            r#"{"cmd":"allowlist_delete","list_type":"open","index":0,"persist":true}"#,
            r#"{"cmd":"log_level","level":"debug"}"#,
            r#"{"cmd":"logs","follow":true}"#,
            r#"{"cmd":"reload"}"#,
            r#"{"cmd":"session_kill","id":3,"signal":9}"#,
        ];
        for (example, cmd) in examples.iter().zip(COMMANDS) {
            let request = parse_request(example).unwrap_or_else(|e| panic!("{example}: {e}"));
            let line = serde_json::to_string(&request).expect("encode");
            let value: serde_json::Value = serde_json::from_str(&line).expect("json");
            assert_eq!(value["cmd"], cmd, "COMMANDS lists {cmd}");
            assert_eq!(parse_request(&line), Ok(request));
        }
        assert_eq!(
            parse_request(r#"{"cmd":"logs"}"#),
            Ok(Request::Logs {
                backlog: 200,
                follow: false
            })
        );
    }

    #[test]
    fn request_errors_say_what_is_wrong() {
        let valid = "valid commands: status, allowlist_list, allowlist_add, allowlist_delete, \
                     log_level, logs, reload, session_kill";
        assert_eq!(
            parse_request("[1,2]"),
            Err(format!(
                "a request must be a JSON object with a \"cmd\" field; {valid}"
            ))
        );
        assert_eq!(
            parse_request(r#"{"cmd":7}"#),
            Err(format!("\"cmd\" must be a string, not 7; {valid}"))
        );
        let unknown =
            parse_request(r#"{"cmd":"allowlist_add","list_type":"open","path":"/a","pth":1}"#)
                .expect_err("unknown field");
        assert!(
            unknown.starts_with("invalid \"allowlist_add\" request: unknown field `pth`"),
            "{unknown}"
        );
        let bad_type = parse_request(r#"{"cmd":"allowlist_list","list_type":"opne"}"#)
            .expect_err("bad list type");
        assert!(
            bad_type.starts_with("invalid \"allowlist_list\" request: "),
            "{bad_type}"
        );
    }

    #[test]
    fn answer_lines_put_ok_first() {
        let mut fields = serde_json::Map::new();
        fields.insert("removed".into(), "/a".into());
        fields.insert("ok".into(), false.into()); // a handler cannot override ok
        assert_eq!(ok_line(fields), "{\"ok\":true,\"removed\":\"/a\"}\n");
        assert_eq!(ok_line(serde_json::Map::new()), "{\"ok\":true}\n");
        assert_eq!(
            error_line("say \"why\""),
            "{\"ok\":false,\"error\":\"say \\\"why\\\"\"}\n"
        );
    }

    #[test]
    fn replies_parse_into_fields_or_errors() {
        let path = Path::new("/run/qtfs/engine.ctl");
        let fields = parse_reply(path, r#"{"ok":true,"level":"info"}"#).expect("ok");
        assert_eq!(fields.get("level"), Some(&"info".into()));
        assert!(!fields.contains_key("ok"));
        match parse_reply(
            path,
            r#"{"ok":false,"error":"no such entry: list it first"}"#,
        ) {
            Err(ControlError::Remote(message)) => {
                assert_eq!(message, "no such entry: list it first")
            }
            other => panic!("expected Remote, got {other:?}"),
        }
        for bad in ["nope", "[]", r#"{"level":"info"}"#] {
            let err = parse_reply(path, bad).expect_err(bad);
            assert!(
                matches!(err, ControlError::BadReply { .. }),
                "{bad}: {err:?}"
            );
            assert!(err
                .to_string()
                .contains("are dpuctl and the daemon the same version?"));
        }
    }

    #[test]
    fn connect_failures_name_the_cause() {
        let path = Path::new("/var/run/qtfs/engine.ctl");
        let cases = [
            (
                io::ErrorKind::NotFound,
                "no daemon at /var/run/qtfs/engine.ctl (is it running?)",
            ),
            (
                io::ErrorKind::PermissionDenied,
                "permission denied on /var/run/qtfs/engine.ctl: run as root",
            ),
            (
                io::ErrorKind::ConnectionRefused,
                "stale control socket /var/run/qtfs/engine.ctl: the daemon is not running",
            ),
        ];
        for (kind, message) in cases {
            assert_eq!(
                connect_error(path, io::Error::from(kind)).to_string(),
                message
            );
        }
        let other = connect_error(path, io::Error::other("weird"));
        assert!(matches!(other, ControlError::Connect { .. }));
    }
}
