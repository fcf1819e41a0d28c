//! rexec end to end: a real `rexec_server` (the built binary, started through a
//! `rexec_server` symlink) on a temp Unix socket and on 127.0.0.1 TCP with a temp key, driven
//! by the real `rexec` client. Every server is killed on drop, even when a test fails.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, free_port, text, Scratch};
use sha2::{Digest, Sha256};

/// A running rexec_server with its scratch directory.
struct Server {
    scratch: Scratch,
    child: Child,
    port: u16,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Server::start_with(Scratch::new(), extra)
    }

    fn start_with(scratch: Scratch, extra: &[&str]) -> Server {
        let key = scratch.key("psk");
        let link = scratch.path("rexec_server");
        std::os::unix::fs::symlink(bin(), &link).expect("symlink rexec_server");
        let port = free_port();
        let log = std::fs::File::create(scratch.path("server.log")).expect("log");
        // Independent of this machine's /etc/rexec/whitelist unless a test names one.
        let open: &[&str] = if extra.contains(&"--whitelist") {
            &[]
        } else {
            &["--no-whitelist"]
        };
        let child = Command::new(&link)
            .args(["--run-dir", s(&scratch.path("run"))])
            .args(["--key", s(&key)])
            .args(["--listen", &format!("tcp://127.0.0.1:{port}"), "--uds"])
            .args(["--kill-grace", "500ms"])
            .args(open)
            .args(extra)
            .env("REXEC_RUN_DIR", scratch.path("rexec"))
            .env_remove("CMD_NET_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn rexec_server");
        let server = Server {
            scratch,
            child,
            port,
        };
        let sock = server.scratch.path("rexec/rexec_uds.sock");
        common::wait_for_path(&sock, Duration::from_secs(10), || {
            format!("rexec_server did not start:\n{}", server.log())
        });
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.scratch.path("server.log")).unwrap_or_default()
    }

    /// A `rexec` command on the Unix socket.
    fn uds(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.arg("rexec")
            .args(args)
            .env("REXEC_RUN_DIR", self.scratch.path("rexec"))
            .env_remove("CMD_NET_ADDR");
        c
    }

    /// A `rexec` command over TCP with the key.
    fn tcp(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.arg("rexec")
            .args(["--key", s(&self.scratch.path("psk"))])
            .args(args)
            .env("REXEC_RUN_DIR", self.scratch.path("rexec"))
            .env("CMD_NET_ADDR", format!("tcp://127.0.0.1:{}", self.port));
        c
    }

    fn status(&self) -> serde_json::Value {
        let out = Command::new(bin())
            .args([
                "status",
                "--json",
                "--run-dir",
                s(&self.scratch.path("run")),
            ])
            .output()
            .expect("status");
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn run(mut c: Command, stdin: &[u8]) -> Output {
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rexec");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait rexec");
    let _ = feeder.join();
    out
}

fn alive(pid: i32) -> bool {
    // A zombie is dead for our purposes; /proc/PID/stat field 3 is the state.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn wait_for(what: &str, timeout: Duration, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The remote pid from the pid map entry of local rexec `local`.
fn remote_pid(server: &Server, local: u32) -> i32 {
    let path = server.scratch.path(&format!("rexec/pids/{local}"));
    wait_for("the pid map entry", Duration::from_secs(10), || {
        path.exists()
    });
    std::fs::read_to_string(&path)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid")
}

#[test]
fn exit_status_signals_and_errors_like_a_shell() {
    let srv = Server::start(&[]);
    for (mk, name) in [
        (Server::uds as fn(&Server, &[&str]) -> Command, "uds"),
        (Server::tcp, "tcp"),
    ] {
        let o = run(mk(&srv, &["/bin/sh", "-c", "exit 7"]), b"");
        assert_eq!(o.status.code(), Some(7), "{name}: {}", text(&o));
        let o = run(mk(&srv, &["/bin/sh", "-c", "kill -9 $$"]), b"");
        assert_eq!(o.status.code(), Some(137), "{name}: {}", text(&o));
        let o = run(mk(&srv, &["no-such-command-xyz"]), b"");
        assert_eq!(o.status.code(), Some(127), "{name}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.contains("command not found"), "{err}");
        let o = run(mk(&srv, &["/etc/passwd"]), b"");
        assert_eq!(o.status.code(), Some(126), "{name}: {}", text(&o));
        let o = run(
            mk(&srv, &["sh", "-c", "echo out; echo err >&2; exit 3"]),
            b"",
        );
        assert_eq!(o.status.code(), Some(3));
        assert_eq!(o.stdout, b"out\n");
        assert_eq!(o.stderr, b"err\n");
    }
    // Environment, cwd and --env-only.
    let mut c = srv.uds(&["--env-only", "REXEC_T1", "/usr/bin/env"]);
    c.env("REXEC_T1", "one").env("REXEC_T2", "two");
    let o = run(c, b"");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "REXEC_T1=one\n");
    let mut c = srv.uds(&["sh", "-c", "echo $REXEC_T2; pwd"]);
    c.env("REXEC_T2", "two").current_dir("/usr");
    assert_eq!(run(c, b"").stdout, b"two\n/usr\n");

    // Unreachable server and bad key: 255 with one line.
    let mut c = srv.uds(&["true"]);
    c.env("REXEC_RUN_DIR", "/nonexistent-rexec");
    let o = run(c, b"");
    assert_eq!(o.status.code(), Some(255), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot connect"));
    let other = srv.scratch.key("other.psk");
    let mut c = Command::new(bin());
    c.args(["rexec", "--key", s(&other), "true"])
        .env("CMD_NET_ADDR", format!("tcp://127.0.0.1:{}", srv.port));
    let o = run(c, b"");
    assert_eq!(o.status.code(), Some(255), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("authentication"),
        "{}",
        text(&o)
    );
}

#[test]
fn stdin_and_large_streams_keep_every_byte() {
    let srv = Server::start(&[]);
    let o = run(srv.uds(&["cat"]), b"hi\n");
    assert_eq!(o.stdout, b"hi\n");
    assert!(o.status.success());

    let mut data = vec![0u8; 48 << 20];
    getrandom::fill(&mut data).expect("random");
    let want = Sha256::digest(&data);
    let file = srv.scratch.path("big");
    std::fs::write(&file, &data).expect("write big");
    for mk in [Server::uds as fn(&Server, &[&str]) -> Command, Server::tcp] {
        // stdin -> remote -> stdout
        let o = run(mk(&srv, &["cat"]), &data);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(Sha256::digest(&o.stdout), want);
        // remote file -> stdout
        let o = run(mk(&srv, &["cat", s(&file)]), b"");
        assert_eq!(Sha256::digest(&o.stdout), want);
        // stdin -> remote sha256sum
        let o = run(mk(&srv, &["sha256sum"]), &data);
        let hex: String = want.iter().map(|b| format!("{b:02x}")).collect();
        assert!(String::from_utf8_lossy(&o.stdout).starts_with(&hex));
    }
}

/// Standard output on a full disk: the program only sees its output close (as when a local
/// reader goes away) and ends with SIGPIPE, so the client says what happened on stderr. A
/// reader that goes away is not reported, as a local program would not. The program writes
/// without end, so only the closed output can end it.
#[test]
fn a_full_disk_on_stdout_is_reported_and_a_gone_reader_is_not() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED a_full_disk_on_stdout_is_reported_and_a_gone_reader_is_not: mounting a small tmpfs needs root");
        return;
    }
    let srv = Server::start(&[]);
    let small = srv.scratch.path("small");
    std::fs::create_dir(&small).expect("mkdir");
    nix::mount::mount(
        Some("tmpfs"),
        &small,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=64k"),
    )
    .expect("mount a small tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount(small.clone());

    let out = std::fs::File::create(small.join("out")).expect("create out");
    let o = srv
        .uds(&["cat", "/dev/zero"])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::piped())
        .output()
        .expect("run rexec");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("rexec: writing standard output: No space left on device"),
        "{err}"
    );
    assert_eq!(o.status.code(), Some(128 + libc::SIGPIPE), "{err}");

    let mut child = srv
        .uds(&["cat", "/dev/zero"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rexec");
    let mut first = [0u8; 10];
    std::io::Read::read_exact(child.stdout.as_mut().expect("stdout"), &mut first).expect("read");
    drop(child.stdout.take());
    let o = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("writing standard output"), "{err}");
    assert_eq!(o.status.code(), Some(128 + libc::SIGPIPE), "{err}");
}

#[test]
fn killing_the_client_kills_the_remote_process() {
    let srv = Server::start(&[]);
    // Forwarded SIGTERM: the remote sleep dies of it and the client reports 143.
    let mut child = srv
        .uds(&["sleep", "1000"])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = remote_pid(&srv, child.id());
    assert!(alive(pid));
    // The session is listed for the TUI.
    let st = srv.status();
    let sessions = &st["daemons"][0]["sessions"];
    assert_eq!(sessions[0]["remote_pid"], pid, "{st}");
    assert_eq!(sessions[0]["argv"][0], "sleep", "{st}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(143));
    wait_for("remote sleep to die", Duration::from_secs(5), || {
        !alive(pid)
    });
    assert!(
        !srv.scratch
            .path(&format!("rexec/pids/{}", child.id()))
            .exists(),
        "pid map entry removed"
    );

    // SIGKILL: nothing can be forwarded; the server kills the whole group on disconnect,
    // including a child that ignores SIGTERM (after the grace period).
    let mut child = srv
        .uds(&["sh", "-c", "trap '' TERM; sleep 1000 & echo $!; wait"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = remote_pid(&srv, child.id());
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().expect("stdout")),
        &mut line,
    )
    .expect("read");
    let grandchild: i32 = line.trim().parse().expect("pid");
    child.kill().expect("kill client");
    let _ = child.wait();
    wait_for("the remote group to die", Duration::from_secs(5), || {
        !alive(pid) && !alive(grandchild)
    });
    // The killed client could not remove its pid map entry: --kill says the session is
    // gone and removes the stale entry.
    let stale = srv.scratch.path(&format!("rexec/pids/{}", child.id()));
    assert!(stale.exists(), "a SIGKILLed client leaves its entry");
    let o = run(srv.uds(&["--kill", "TERM", &child.id().to_string()]), b"");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "no rexec session with local pid {}: that process is gone (removed its stale entry",
            child.id()
        )),
        "{err}"
    );
    assert!(!stale.exists(), "the stale entry is removed");

    // rexec --kill SIGNAL LOCALPID signals the remote process of another rexec.
    let mut child = srv
        .uds(&["sleep", "1000"])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = remote_pid(&srv, child.id());
    let o = run(srv.uds(&["--kill", "USR1", &child.id().to_string()]), b"");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(child.wait().expect("wait").code(), Some(128 + 10));
    assert!(!alive(pid));
    // Only our own sessions' pids may be signalled.
    std::fs::write(srv.scratch.path("rexec/pids/1"), "1\n").expect("write");
    let o = run(srv.uds(&["--kill", "TERM", "1"]), b"");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
}

/// The exit statuses of docs/rexec.md for `--kill` and address mistakes.
#[test]
fn kill_and_address_mistakes_exit_as_documented() {
    let srv = Server::start(&[]);
    // A bad signal name is a usage error.
    let o = run(srv.uds(&["--kill", "BOGUS", "123"]), b"");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not a signal name"),
        "{}",
        text(&o)
    );
    // No pid map entry: no such session.
    let o = run(srv.uds(&["--kill", "TERM", "999999"]), b"");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let entry = srv.scratch.path("rexec/pids/999999");
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        format!(
            "rexec: no rexec session with local pid 999999 (no {})\n",
            entry.display()
        )
    );
    // A bad server address is a usage error, from the option or the environment.
    let o = run(srv.uds(&["--server", "bogus://x", "true"]), b"");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("bad server address"),
        "{}",
        text(&o)
    );
    let mut c = srv.uds(&["true"]);
    c.env("CMD_NET_ADDR", "bogus://x");
    assert_eq!(run(c, b"").status.code(), Some(2));
}

#[test]
fn fifty_concurrent_sessions_with_data_both_ways() {
    let srv = Server::start(&[]);
    let handles: Vec<_> = (0..50)
        .map(|i| {
            let mut c = if i % 2 == 0 {
                srv.tcp(&["sha256sum"])
            } else {
                srv.uds(&["sha256sum"])
            };
            let mut data = vec![0u8; 256 * 1024 + i * 977];
            getrandom::fill(&mut data).expect("random");
            let want: String = Sha256::digest(&data)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let child = c
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn");
            (child, data, want)
        })
        .collect();
    let mut feeders = Vec::new();
    let mut children = Vec::new();
    for (mut child, data, want) in handles {
        let mut input = child.stdin.take().expect("stdin");
        feeders.push(std::thread::spawn(move || input.write_all(&data)));
        children.push((child, want));
    }
    for (child, want) in children {
        let o = child.wait_with_output().expect("wait");
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).starts_with(&want),
            "{}",
            text(&o)
        );
    }
    for f in feeders {
        f.join().expect("feeder").expect("write");
    }
}

fn write_whitelist(scratch: &Scratch, body: &str, mode: u32) -> PathBuf {
    let p = scratch.write("whitelist", body);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    p
}

#[test]
fn whitelist_refuses_and_is_checked_at_start() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: the whitelist must be owned by root; run the tests as root");
        return;
    }
    let scratch = Scratch::new();
    let wl = write_whitelist(&scratch, "# allowed\ntrue\n/bin/sh\n", 0o400);
    let srv = Server::start_with(scratch, &["--whitelist", s(&wl)]);
    assert!(run(srv.uds(&["true"]), b"").status.success());
    assert_eq!(
        run(srv.uds(&["/bin/sh", "-c", "exit 4"]), b"")
            .status
            .code(),
        Some(4)
    );
    let o = run(srv.tcp(&["cat"]), b"");
    assert_eq!(o.status.code(), Some(126), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("whitelist"));
    // A bare name does not let a client pick its own binary of that name.
    let fake = srv.scratch.path("true");
    std::fs::copy("/bin/true", &fake).expect("copy");
    let o = run(srv.uds(&[s(&fake)]), b"");
    assert_eq!(o.status.code(), Some(126), "{}", text(&o));
    assert!(srv.log().contains("rexec command refused"));
    drop(srv);

    for (mode, owner, dir_mode, needle) in [
        (0o666, 0, 0o755, "writable by group or others"),
        (0o400, 65534, 0o755, "not root"),
        // The directory above: others may write it without the sticky bit.
        (
            0o400,
            0,
            0o777,
            "which group or others may write without the sticky bit",
        ),
        // Named explicitly but missing.
        (0, 0, 0o755, "does not exist"),
    ] {
        let scratch = Scratch::new();
        let wl = if mode == 0 {
            scratch.path("whitelist")
        } else {
            let wl = write_whitelist(&scratch, "true\n", mode);
            std::os::unix::fs::chown(&wl, Some(owner), None).expect("chown");
            wl
        };
        std::fs::set_permissions(scratch.path(""), std::fs::Permissions::from_mode(dir_mode))
            .expect("chmod dir");
        let o = Command::new(bin())
            .args(["rexec_server", "--whitelist", s(&wl)])
            .args(["--run-dir", s(&scratch.path("run"))])
            .env("REXEC_RUN_DIR", scratch.path("rexec"))
            .env_remove("CMD_NET_ADDR")
            .output()
            .expect("run server");
        assert!(!o.status.success());
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(needle),
            "{}",
            text(&o)
        );
    }
}

/// A whitelist in force stays in force: renamed or deleted while the server runs, it
/// refuses every command (it used to mean "no whitelist", letting everything run).
#[test]
fn a_whitelist_that_disappears_refuses_everything() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: the whitelist must be owned by root; run the tests as root");
        return;
    }
    let scratch = Scratch::new();
    let wl = write_whitelist(&scratch, "true\n", 0o400);
    let srv = Server::start_with(scratch, &["--whitelist", s(&wl)]);
    assert!(run(srv.uds(&["true"]), b"").status.success());
    let bak = srv.scratch.path("whitelist.bak");
    std::fs::rename(&wl, &bak).expect("mv");
    for argv in [&["/bin/ls"][..], &["true"]] {
        let o = run(srv.uds(argv), b"");
        assert_eq!(o.status.code(), Some(126), "{}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!("the rexec whitelist {} is missing", wl.display())),
            "{err}"
        );
        assert!(o.stdout.is_empty());
    }
    let log = srv.log();
    assert!(
        log.contains("rexec whitelist unusable: refusing every command"),
        "{log}"
    );
    assert!(log.contains(s(&wl)), "{log}");
    // Back in place: in force again.
    std::fs::rename(&bak, &wl).expect("mv back");
    assert!(run(srv.uds(&["true"]), b"").status.success());
    assert_eq!(run(srv.uds(&["/bin/ls"]), b"").status.code(), Some(126));
}

/// `--max-sessions` counts running sessions only: a client over the limit waits for a slot
/// (longer than its connect timeout) instead of failing, and connections that never send a
/// byte take no slot and cannot keep clients out.
#[test]
fn session_limit_makes_clients_wait_and_idle_connections_take_no_slot() {
    let srv = Server::start(&["--max-sessions", "1"]);
    let holder = srv
        .tcp(&["sleep", "2.5"])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut holder = holder;
    let _ = remote_pid(&srv, holder.id());
    let started = Instant::now();
    for mk in [Server::tcp as fn(&Server, &[&str]) -> Command, Server::uds] {
        let o = run(
            mk(&srv, &["--connect-timeout", "1s", "echo", "waited"]),
            b"",
        );
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        assert_eq!(o.stdout, b"waited\n");
    }
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the second client ran while the first held the only slot"
    );
    assert!(holder.wait().expect("wait").success());
    assert!(srv.log().contains("session limit reached"), "{}", srv.log());

    // Many idle connections: more than may be pending at once, and many more than slots.
    let idle: Vec<std::net::TcpStream> = (0..100)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", srv.port)).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let o = run(srv.tcp(&["--connect-timeout", "2s", "true"]), b"");
    assert!(o.status.success(), "{}", text(&o));
    let o = run(srv.uds(&["true"]), b"");
    assert!(o.status.success(), "{}", text(&o));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let st = srv.status();
    assert!(
        st["daemons"][0]["counters"]["pending_evicted"].as_u64() >= Some(100 - 64),
        "{st}"
    );
    drop(idle);
}

/// A closed or failing stdout or stderr on the client is the program's closed output: its
/// writes fail (EPIPE/SIGPIPE), as locally, and rexec says why when it can.
#[test]
fn closed_and_failing_outputs_reach_the_program() {
    let srv = Server::start(&[]);
    // rexec's stdout closed: the program's first write fails; it does not see success.
    let mut c = Command::new("sh");
    c.args([
        "-c",
        "exec \"$@\" >&-",
        "sh",
        s(&bin()),
        "rexec",
        "sh",
        "-c",
        "echo x; echo rc=$? >&2",
    ])
    .env("REXEC_RUN_DIR", srv.scratch.path("rexec"))
    .env_remove("CMD_NET_ADDR");
    let o = run(c, b"");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("rc=0"), "{err}");
    assert!(err.contains("rexec: standard output is closed"), "{err}");
    assert_eq!(o.status.code(), Some(128 + libc::SIGPIPE), "{err}");
    // rexec's stderr closed: the same for the program's stderr.
    let mut c = Command::new("sh");
    c.args([
        "-c",
        "exec \"$@\" 2>&-",
        "sh",
        s(&bin()),
        "rexec",
        "sh",
        "-c",
        "echo x >&2; echo rc=$?",
    ])
    .env("REXEC_RUN_DIR", srv.scratch.path("rexec"))
    .env_remove("CMD_NET_ADDR");
    let o = run(c, b"");
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("rc=0"),
        "{}",
        text(&o)
    );
    // rexec's stderr fails while the program writes it: the program's stderr is closed
    // (it used to be read and discarded forever).
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let mut child = srv
        .uds(&["sh", "-c", "cat /dev/zero >&2"])
        .stdin(Stdio::null())
        .stderr(full)
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("rexec with a failing stderr did not end");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(128 + libc::SIGPIPE));
}

/// `rexec -t yes | head -c1`: with the terminal's output gone, the session ends (the
/// program's terminal is hung up) instead of output being read and discarded forever.
#[test]
fn a_gone_reader_hangs_up_a_terminal_session() {
    let srv = Server::start(&[]);
    for script in ["yes", "trap '' HUP; yes"] {
        let mut child = srv
            .uds(&["-t", "sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut first = [0u8; 1];
        std::io::Read::read_exact(child.stdout.as_mut().expect("stdout"), &mut first)
            .expect("read");
        drop(child.stdout.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("rexec -t {script:?} did not end after its reader went away");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // SIGHUP, or SIGKILL after the grace period for a program that ignores it.
        let expected = if script == "yes" {
            libc::SIGHUP
        } else {
            libc::SIGKILL
        };
        assert_eq!(status.code(), Some(128 + expected), "{script}");
    }
}

#[test]
fn pty_sessions_get_a_terminal() {
    let ok = Command::new("script")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: script(1) from util-linux is not installed");
        return;
    }
    let srv = Server::start(&[]);
    let cmd = format!("{} rexec -t sh -c 'tty; stty size'", bin().display());
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("REXEC_RUN_DIR", srv.scratch.path("rexec"))
        .env_remove("CMD_NET_ADDR")
        .stdin(Stdio::null())
        .output()
        .expect("script");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("/dev/pts/"), "{}", text(&o));
    // Without a terminal and without -t, stdio are pipes.
    let o = run(srv.uds(&["sh", "-c", "tty"]), b"");
    assert_eq!(o.stdout, b"not a tty\n", "{}", text(&o));
}

/// `echo ... | rexec -t cat`: the end of a piped stdin reaches a program on a terminal as the
/// terminal's EOF character, after a complete and after a partial last line.
#[test]
fn end_of_piped_stdin_ends_a_terminal_session() {
    let srv = Server::start(&[]);
    for input in [&b"first line\n"[..], b"first line\npartial"] {
        let mut child = srv
            .uds(&["-t", "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn rexec");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write stdin"); // dropped here: end of file
        let deadline = Instant::now() + Duration::from_secs(15);
        while child.try_wait().expect("try_wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "rexec -t cat did not end after stdin closed ({:?})\n{}",
                    String::from_utf8_lossy(input),
                    srv.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let o = child.wait_with_output().expect("wait rexec");
        assert!(o.status.success(), "{}", text(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("first line"), "{}", text(&o));
        if input.ends_with(b"partial") {
            assert!(out.contains("partial"), "{}", text(&o));
        }
    }
}

#[test]
fn tool_names_answer_help() {
    let scratch = Scratch::new();
    for name in ["rexec", "rexec_server"] {
        let link = scratch.path(name);
        std::os::unix::fs::symlink(bin(), &link).expect("symlink");
        let o = Command::new(&link).arg("--help").output().expect("help");
        assert!(o.status.success(), "{}", text(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains(&format!("Usage: {name}")), "{out}");
    }
}
