//! `dpuctl demo --no-tui`: brings up the HOST+DPU pair with live traffic, reports every
//! component in its status line, passes its own check with `--duration`, and leaves nothing
//! behind (no processes, mounts or temporary directory), also when stopped with SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn unavailable() -> Option<String> {
    if !std::path::Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing".into());
    }
    common::namespaces_unavailable()
}

macro_rules! require {
    () => {
        if let Some(why) = unavailable() {
            eprintln!("SKIPPED {}: {why}", module_path!());
            return;
        }
    };
}

/// The work directory the demo announced on its first line.
fn work_dir(line: &str) -> std::path::PathBuf {
    let start = line.find("(work dir ").expect("work dir in the first line") + "(work dir ".len();
    std::path::PathBuf::from(line[start..].trim_end_matches(')'))
}

/// No process of this binary still runs with `dir` on its command line.
fn nothing_left(dir: &std::path::Path) -> Result<(), String> {
    let needle = dir.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc")
        .map_err(|e| e.to_string())?
        .flatten()
    {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            return Err(format!("still running: {cmdline}"));
        }
    }
    Ok(())
}

#[test]
fn headless_demo_checks_every_component_and_cleans_up() {
    require!();
    let out = Command::new(common::bin())
        .args(["demo", "--no-tui", "--duration", "6s"])
        .stdin(Stdio::null())
        .output()
        .expect("run dpuctl demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", common::text(&out));
    assert!(
        stdout.contains("demo: ok, every component came up"),
        "{stdout}"
    );
    let last_status = stdout
        .lines()
        .rfind(|l| l.starts_with("demo ") && l.contains(" | "))
        .expect("a status line");
    assert!(
        last_status.contains("HOST engine up, link connected")
            && last_status.contains("DPU udsproxyd up, link connected"),
        "{last_status}"
    );
    // Files went through the mount and nothing failed.
    assert!(last_status.contains(" ok/0 failed"), "{last_status}");
    // Tools this build lacks are named, never simulated.
    for (tool, label) in [("uds-connect", "uds-connect"), ("rexec", "rexec")] {
        let present = common::dpuctl(&[tool, "--help"]).status.success();
        let missing = format!("{label}: missing from this build");
        assert_eq!(
            !present,
            last_status.contains(&missing),
            "{tool}: {last_status}"
        );
    }
    let dir = work_dir(stdout.lines().next().unwrap_or_default());
    assert!(!dir.exists(), "{} was not removed", dir.display());
    nothing_left(&dir).unwrap();
}

#[test]
fn sigterm_tears_the_demo_down() {
    require!();
    let mut child = Command::new(common::bin())
        .args(["demo", "--no-tui", "--keep-dir"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run dpuctl demo");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let dir = work_dir(&first);
    // Wait for the first status line: everything is up.
    let deadline = Instant::now() + Duration::from_secs(30);
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.contains(" | HOST engine ") {
            break;
        }
        assert!(Instant::now() < deadline, "no status line");
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "demo did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    assert!(
        status.success(),
        "{status:?}\nstdout after SIGTERM: {rest:?}\nstderr: {stderr}"
    );
    assert!(rest.iter().any(|l| l == "demo: stopping"), "{rest:?}");
    // --keep-dir kept the logs; every process is gone.
    assert!(dir.join("host/daemon.log").exists());
    nothing_left(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
