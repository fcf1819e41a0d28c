//! `dpuctl tui` end to end: the real binary in a tmux pane (120x40) watching a real engine
//! (HOST side) and udsproxyd (DPU side), each in its own namespaces, through their run
//! directories. Keys go in with `send-keys`, the screen comes back with `capture-pane -p`.
//! Checks: the daemons' rows, an allowlist entry added and deleted from the dashboard as
//! `qtcfg -z` sees it, a killed daemon shown unreachable within 2 s while the dashboard keeps
//! running, and the terminal restored on q, on SIGTERM and on a panic (DPUCTL_TUI_TEST_PANIC).

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{s, text, Scratch, Side};

fn tmux_missing() -> Option<String> {
    let ok = Command::new("tmux")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!ok).then(|| "tmux is not installed (scripts/deps.sh installs it)".to_owned())
}

macro_rules! require {
    () => {
        if let Some(why) = common::namespaces_unavailable().or_else(tmux_missing) {
            eprintln!("SKIPPED {}: {why}", module_path!());
            return;
        }
    };
}

/// A tmux server of our own (its own socket), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// Starts `script` (run by sh) in a detached 120x40 session.
    fn start(name: &str, script: &str) -> Tmux {
        let t = Tmux {
            socket: format!("dpuctl-{name}-{}", std::process::id()),
        };
        let out = t.cmd(&[
            "new-session",
            "-d",
            "-x",
            "120",
            "-y",
            "40",
            "-s",
            "t",
            script,
        ]);
        assert!(out.status.success(), "tmux new-session: {}", text(&out));
        t
    }

    fn cmd(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .env_remove("TMUX")
            .output()
            .expect("run tmux")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", "t"]).stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        for k in keys {
            self.cmd(&["send-keys", "-t", "t", k]);
        }
    }

    fn type_text(&self, text: &str) {
        self.cmd(&["send-keys", "-t", "t", "-l", text]);
    }

    /// Waits until `pred(screen)` holds; panics with the screen on timeout.
    fn wait(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen();
            if pred(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// [`Tmux::wait`], with both sides' logs in the failure message.
    fn wait_or(
        &self,
        what: &str,
        timeout: Duration,
        p: &Pair,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen();
            if pred(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; screen:\n{screen}\nHOST log:\n{}\nDPU log:\n{}",
                p.host.log(),
                p.dpu.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pid of the process the pane runs (the sh around the dashboard).
    fn pane_pid(&self) -> u32 {
        let out = self.cmd(&["list-panes", "-t", "t", "-F", "#{pane_pid}"]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("pane pid")
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.cmd(&["kill-server"]);
    }
}

/// A row of the screen containing every one of `words`.
fn row<'a>(screen: &'a str, words: &[&str]) -> Option<&'a str> {
    screen.lines().find(|l| words.iter().all(|w| l.contains(w)))
}

struct Pair {
    scratch: Scratch,
    host: Side,
    dpu: Side,
}

fn pair() -> Pair {
    let scratch = Scratch::new();
    let key = scratch.key("psk");
    let export = scratch.path("export");
    std::fs::create_dir(&export).expect("export dir");
    let wl = scratch.write(
        "whitelist",
        &format!(
            "[Mount]\nPath={}\n[Udsconnect]\nPath=/var/run/x.sock\n",
            s(&export)
        ),
    );
    let (hu, du, fs) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let (host_run, dpu_run) = (scratch.path("host-run"), scratch.path("dpu-run"));
    let host = Side::start(
        "host",
        &scratch,
        &[
            "engine",
            "2",
            "1",
            "127.0.0.1",
            &hu.to_string(),
            "127.0.0.1",
            &du.to_string(),
            "--listen",
            &format!("tcp://127.0.0.1:{fs}"),
            "--key",
            s(&key),
            "--whitelist",
            s(&wl),
            "--run-dir",
            s(&host_run),
        ],
    );
    let dpu = Side::start(
        "dpu",
        &scratch,
        &[
            "udsproxyd",
            "1",
            "127.0.0.1",
            &du.to_string(),
            "127.0.0.1",
            &hu.to_string(),
            "--key",
            s(&key),
            "--whitelist",
            s(&wl),
            "--run-dir",
            s(&dpu_run),
        ],
    );
    Pair { scratch, host, dpu }
}

/// The shell line running the dashboard on both run directories, then reporting how it
/// ended and whether the terminal is back in canonical (cooked) mode.
fn tui_script(p: &Pair) -> String {
    format!(
        "{} tui --no-color --run-dir HOST={} --run-dir DPU={}; echo \"TUI-EXITED rc=$?\"; stty -a | tr ' ' '\\n' | grep -x -- '-\\?icanon'; sleep 60",
        s(&common::bin()),
        s(&p.scratch.path("host-run")),
        s(&p.scratch.path("dpu-run"))
    )
}

fn qtcfg_open(p: &Pair) -> String {
    let out = common::dpuctl(&[
        "qtcfg",
        "-z",
        "open",
        "--run-dir",
        s(&p.scratch.path("host-run")),
    ]);
    assert!(out.status.success(), "qtcfg -z: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn dashboard_shows_edits_and_survives_a_dead_daemon() {
    require!();
    let mut p = pair();
    let tmux = Tmux::start("e2e", &tui_script(&p));
    let limit = Duration::from_secs(10);

    // Both daemons, their link connected.
    let screen = tmux.wait_or("both daemons up and linked", limit, &p, |sc| {
        row(sc, &["HOST", "engine", " up ", "connected"]).is_some()
            && row(sc, &["DPU", "udsproxyd", " up ", "connected"]).is_some()
    });
    assert!(screen.contains("2 up, 0 down"), "{screen}");

    // Allowlist add from the dashboard; qtcfg sees it.
    tmux.keys(&["3"]);
    tmux.wait("the allowlist view", limit, |sc| {
        sc.contains("allowlists of HOST/engine")
    });
    tmux.keys(&["a"]);
    tmux.wait("the add prompt", limit, |sc| {
        sc.contains("add to HOST/engine (TYPE PATH)> open ")
    });
    tmux.type_text("/srv/e2e-added");
    tmux.keys(&["Enter"]);
    let screen = tmux.wait("the entry in the list", limit, |sc| {
        row(sc, &["open", "0", "/srv/e2e-added"]).is_some()
    });
    assert!(
        screen.contains("add /srv/e2e-added to open on HOST/engine: done, entry #0"),
        "{screen}"
    );
    assert!(qtcfg_open(&p).contains("[index:0][path:/srv/e2e-added]"));

    // Delete it again, confirmed.
    tmux.keys(&["d"]);
    tmux.wait("the confirmation", limit, |sc| {
        sc.contains("delete /srv/e2e-added (#0) from open on HOST/engine? y/n")
    });
    tmux.keys(&["y"]);
    tmux.wait("the entry gone", limit, |sc| {
        sc.contains("removed /srv/e2e-added") && !sc.contains("0    /srv/e2e-added")
    });
    assert!(!qtcfg_open(&p).contains("/srv/e2e-added"));

    // Kill the DPU daemon outright: its row turns unreachable within 2 s.
    tmux.keys(&["1"]);
    tmux.wait("the overview", limit, |sc| sc.contains("daemons in HOST="));
    let pid = p.dpu.daemon_pid().expect("udsproxyd pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill udsproxyd");
    let killed = Instant::now();
    let screen = tmux.wait("udsproxyd unreachable", Duration::from_secs(5), |sc| {
        row(sc, &["DPU", "udsproxyd", "UNREACHABLE"]).is_some()
    });
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(2), "took {took:?}:\n{screen}");
    assert!(screen.contains("1 up, 1 down"), "{screen}");
    // Still running: it answers keys and keeps polling the engine.
    tmux.keys(&["2"]);
    tmux.wait("the mounts view", limit, |sc| {
        sc.contains("no qtfs mounts registered")
    });
    tmux.keys(&["1"]);
    tmux.wait("the engine still up", limit, |sc| {
        row(sc, &["HOST", "engine", " up "]).is_some()
    });

    // q quits with status 0 and gives the terminal back in cooked mode.
    tmux.keys(&["q"]);
    let screen = tmux.wait("the dashboard gone", limit, |sc| {
        sc.lines().any(|l| l.trim().ends_with("icanon"))
    });
    assert!(screen.contains("TUI-EXITED rc=0"), "{screen}");
    assert!(
        screen.lines().any(|l| l.trim() == "icanon"),
        "terminal left in raw mode:\n{screen}"
    );
    p.host.stop();
}

#[test]
fn sigterm_restores_the_terminal() {
    require!();
    let p = pair();
    let tmux = Tmux::start("term", &tui_script(&p));
    tmux.wait("the dashboard", Duration::from_secs(10), |sc| {
        row(sc, &["HOST", "engine", " up "]).is_some()
    });
    // The pane runs sh; the dashboard is its child.
    let sh = tmux.pane_pid();
    let tui = std::fs::read_to_string(format!("/proc/{sh}/task/{sh}/children"))
        .expect("children of the pane's shell");
    let tui: i32 = tui
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("dashboard pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tui),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM the dashboard");
    let screen = tmux.wait("the dashboard gone", Duration::from_secs(5), |sc| {
        sc.lines().any(|l| l.trim().ends_with("icanon"))
    });
    assert!(screen.contains("TUI-EXITED rc=0"), "{screen}");
    assert!(
        screen.lines().any(|l| l.trim() == "icanon"),
        "terminal left in raw mode:\n{screen}"
    );
}

/// A panic in the dashboard gives the terminal back before its message: with
/// DPUCTL_TUI_TEST_PANIC set, `dpuctl tui` panics right after its first frame. Were the
/// terminal restored only by the guard's `Drop` (after the message), the message would be
/// printed on the alternate screen and lost with it.
#[test]
fn a_panic_restores_the_terminal_before_its_message() {
    if let Some(why) = tmux_missing() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let scratch = Scratch::new();
    let script = format!(
        "RUST_BACKTRACE=0 DPUCTL_TUI_TEST_PANIC=1 {} tui --no-color --run-dir X={} 2>&1; echo \"PANIC-EXITED rc=$?\"; stty -a | tr ' ' '\\n' | grep -x -- '-\\?icanon'; sleep 60",
        s(&common::bin()),
        s(&scratch.path("empty-run"))
    );
    let tmux = Tmux::start("panic", &script);
    let screen = tmux.wait("the dashboard gone", Duration::from_secs(10), |sc| {
        sc.lines().any(|l| l.trim().ends_with("icanon"))
    });
    assert!(screen.contains("PANIC-EXITED rc=101"), "{screen}");
    assert!(
        screen.contains("a deliberate panic to test the terminal restore"),
        "panic message not on the normal screen:\n{screen}"
    );
    assert!(
        screen.lines().any(|l| l.trim() == "icanon"),
        "terminal left in raw mode:\n{screen}"
    );
    let alt = tmux.cmd(&["display-message", "-p", "-t", "t", "#{alternate_on}"]);
    assert_eq!(String::from_utf8_lossy(&alt.stdout).trim(), "0");
}
