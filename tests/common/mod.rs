//! Test harness: two "machines" on one box. Each [`Side`] runs a real dpuctl daemon as pid 1
//! of new mount and pid namespaces with a private tmpfs on /run (so each side has its own
//! /var/run/qtfs), sharing loopback with the other side. [`Side::run`] runs a dpuctl command
//! inside a side's mount namespace. Everything is killed and removed on drop, even when a test
//! fails.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The dpuctl binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dpuctl"))
}

/// Why namespace tests cannot run here, if they cannot.
pub fn namespaces_unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root: mount/pid namespaces need CAP_SYS_ADMIN".into());
    }
    for tool in ["unshare", "nsenter"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("{tool} (util-linux) is not installed"));
        }
    }
    let probe = Command::new("unshare")
        .args(["--mount", "--pid", "--fork", "--mount-proc", "true"])
        .stderr(Stdio::piped())
        .output();
    match probe {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "unshare --mount --pid failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run unshare: {e}")),
    }
}

/// Returns early from a test, loudly, when namespaces are unavailable.
#[macro_export]
macro_rules! require_namespaces {
    () => {
        if let Some(why) = common::namespaces_unavailable() {
            eprintln!("SKIPPED {}: {why}", module_path!());
            return;
        }
    };
}

/// A free TCP port on 127.0.0.1 that no outgoing connection can take before a daemon binds it
/// (see [`dpuctl::wire::spare_loopback_port`]).
pub fn free_port() -> u16 {
    dpuctl::wire::spare_loopback_port().expect("a free port on 127.0.0.1")
}

/// A scratch directory with a key and a whitelist.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("dpuctl-test-")
            .tempdir()
            .expect("tempdir");
        Scratch { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a new key file `name` with `dpuctl keygen`.
    pub fn key(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        let out = Command::new(bin())
            .args(["keygen"])
            .arg(&p)
            .output()
            .expect("run keygen");
        assert!(
            out.status.success(),
            "keygen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        p
    }

    /// Writes a file and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).expect("write scratch file");
        p
    }
}

/// One simulated machine running one daemon.
pub struct Side {
    pub name: String,
    unshare: Child,
    log: PathBuf,
}

impl Side {
    /// Starts `dpuctl ARGS...` as pid 1 of new mount+pid namespaces with a private /run.
    pub fn start(name: &str, scratch: &Scratch, args: &[&str]) -> Side {
        let log = scratch.path(&format!("{name}.log"));
        let logf = std::fs::File::create(&log).expect("create log");
        let unshare = Command::new("unshare")
            .args([
                "--mount",
                "--pid",
                "--fork",
                "--mount-proc",
                "--propagation",
                "private",
                "--kill-child=SIGTERM",
                "sh",
                "-c",
                "mount -t tmpfs -o mode=0755 tmpfs /run && exec \"$@\"",
                "side",
            ])
            .arg(bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf)
            .spawn()
            .expect("spawn unshare");
        Side {
            name: name.to_string(),
            unshare,
            log,
        }
    }

    /// The pid (in our namespace) of the daemon: the child of unshare.
    pub fn daemon_pid(&self) -> Option<u32> {
        let pid = self.unshare.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// A path as the test process sees it inside this side's mount namespace.
    #[allow(dead_code)] // not every test binary uses every helper
    pub fn inside(&self, path: &str) -> PathBuf {
        let pid = self.daemon_pid().expect("daemon running");
        PathBuf::from(format!("/proc/{pid}/root{path}"))
    }

    /// This side's udsproxyd request socket (`/run/qtfs/remote_uds.sock` inside it), once it
    /// exists, as the test process reaches it.
    #[allow(dead_code)]
    pub fn request_socket(&self, within: Duration) -> PathBuf {
        let path = self.inside("/run/qtfs/remote_uds.sock");
        wait_for_path(&path, within, || {
            format!("no request socket\n{}", self.log())
        });
        path
    }

    /// Waits (up to 2.5 s) until no process of this side runs `argv` (the start of its
    /// command line); returns what still matches, empty when none does.
    #[allow(dead_code)]
    pub fn wait_no_process(&self, argv: &str) -> String {
        let check = format!("pgrep -f '^[^ ]*{argv}' || true");
        let mut left = String::new();
        for _ in 0..50 {
            left = String::from_utf8_lossy(&self.sh(&check).stdout).into_owned();
            if left.trim().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        left
    }

    /// Runs `dpuctl ARGS...` in this side's mount namespace.
    pub fn run(&self, args: &[&str]) -> Output {
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            if let Some(pid) = self.daemon_pid() {
                break pid;
            }
            assert!(
                Instant::now() < deadline,
                "{}: daemon never started\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Command::new("nsenter")
            .args(["--target", &pid.to_string(), "--mount"])
            .arg(bin())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run nsenter")
    }

    /// Runs `sh -c SCRIPT` in this side's mount and pid namespaces (`$DPUCTL` is the
    /// binary). In its pid namespace `/proc/self` resolves (umount(8) reads mountinfo), and
    /// whatever the script leaves running — a daemonised mount helper — dies with the side.
    pub fn sh(&self, script: &str) -> Output {
        let pid = self.daemon_pid().expect("daemon running");
        Command::new("nsenter")
            .args([
                "--target",
                &pid.to_string(),
                "--mount",
                "--pid",
                "sh",
                "-c",
                script,
            ])
            .env("DPUCTL", bin())
            .stdin(Stdio::null())
            .output()
            .expect("run nsenter sh")
    }

    /// `dpuctl status --json` of this side, parsed.
    pub fn status(&self) -> Option<serde_json::Value> {
        let out = self.run(&["status", "--json"]);
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until `pred(status)` holds; panics with both the status and the log on timeout.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(s) = self.status() {
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{}: timed out waiting for {what}\nlast status: {}\nlog:\n{}",
            self.name,
            last.map(|s| s.to_string()).unwrap_or_default(),
            self.log()
        );
    }

    /// The daemon's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// True while the daemon runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.unshare.try_wait(), Ok(None))
    }

    /// Stops the side: SIGTERM to the daemon (unshare's parent process ignores SIGTERM while
    /// it waits, and exits with the daemon's status).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let target = self.daemon_pid().unwrap_or(self.unshare.id());
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(target as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.unshare.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.unshare.kill();
        self.unshare.wait().ok()
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        if self.alive() {
            self.stop();
        }
    }
}

/// The first peer's state in a status document, for the daemon named `name`.
/// Waits until `path` exists; after `within`, fails with `what` (evaluated only then, e.g. a
/// daemon's log).
#[allow(dead_code)] // not every test binary uses every helper
pub fn wait_for_path(path: &Path, within: Duration, what: impl Fn() -> String) {
    let deadline = Instant::now() + within;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear: {}",
            path.display(),
            what()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn peer_state(status: &serde_json::Value, name: &str) -> Option<String> {
    status["daemons"]
        .as_array()?
        .iter()
        .find(|d| d["name"] == name)?["peers"]
        .as_array()?
        .iter()
        .find(|p| {
            matches!(
                p["role"].as_str(),
                Some("engine") | Some("udsproxyd") | None
            )
        })?["state"]
        .as_str()
        .map(str::to_string)
}

/// Runs dpuctl directly (not in a namespace).
pub fn dpuctl(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().expect("run dpuctl")
}

/// Text of an output's stdout and stderr, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Path helper for readability.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
