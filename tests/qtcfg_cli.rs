//! `qtcfg` run as the real binary (`dpuctl qtcfg ...` and through an argv[0] symlink).
//!
//! The first group needs no daemon. The second group talks to a scripted fake daemon on a
//! temp Unix socket and needs the control client (`src/daemon/control.rs`); it is ignored
//! until that lands: run it with `cargo test --test qtcfg_cli -- --include-ignored`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Output};
use std::thread;

const BIN: &str = env!("CARGO_BIN_EXE_dpuctl");

fn qtcfg(args: &[&str], run_dir: &Path) -> Output {
    Command::new(BIN)
        .arg("qtcfg")
        .args(args)
        // Never touch a real /var/run/qtfs from a test.
        .env("DPUCTL_RUN_DIR", run_dir)
        .output()
        .expect("run dpuctl")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a single-line error on stderr, nothing on stdout, and the exit status.
fn assert_fails(o: &Output, code: i32, fragment: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert!(err.contains(fragment), "stderr lacks {fragment:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(o.stdout.is_empty(), "stdout: {}", stdout(o));
}

#[test]
fn help_shows_usage_flags_and_examples() {
    let dir = tempfile::tempdir().unwrap();
    let o = qtcfg(&["--help"], dir.path());
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    for needle in [
        "Usage: qtcfg [OPTIONS]",
        "-w <TYPE>",
        "-x <PATH>",
        "-y <INDEX>",
        "-z [<TYPE>]",
        "--target",
        "--run-dir",
        "--persist",
        "--json",
        "qtcfg -w udsconnect -x /var/run/rexec",
    ] {
        assert!(out.contains(needle), "help lacks {needle:?}:\n{out}");
    }
}

#[test]
fn no_arguments_prints_help_and_fails_as_usage() {
    let dir = tempfile::tempdir().unwrap();
    let o = qtcfg(&[], dir.path());
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("Usage: qtcfg"), "{}", stderr(&o));
}

#[test]
fn unknown_type_is_a_usage_error_listing_valid_types() {
    let dir = tempfile::tempdir().unwrap();
    let o = qtcfg(&["-w", "bogus", "-x", "/a"], dir.path());
    assert_fails(
        &o,
        2,
        "unknown allowlist type 'bogus': expected one of open, write, read, readdir, mkdir, \
         rmdir, create, unlink, rename, setattr, setxattr, mount, kill, udsconnect",
    );
    let o = qtcfg(&["-z", "nope"], dir.path());
    assert_fails(&o, 2, "unknown allowlist type 'nope'");
}

#[test]
fn relative_path_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = qtcfg(&["-w", "udsconnect", "-x", "relative"], dir.path());
    assert_fails(
        &o,
        2,
        "\"relative\" is a relative path: allowlist paths must be absolute",
    );
}

#[test]
fn bad_index_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = qtcfg(&["-w", "udsconnect", "-y", "first"], dir.path());
    assert_fails(&o, 2, "index 'first' is not a number");
}

#[test]
fn no_daemon_running_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let want = format!(
        "qtcfg: no engine or udsproxyd is running (no control socket in {}): start one, or pass --run-dir/--target\n",
        dir.path().display()
    );
    let o = qtcfg(&["-z"], dir.path());
    assert_fails(&o, 1, "no engine or udsproxyd is running");
    assert_eq!(stderr(&o), want);

    // --run-dir overrides the environment.
    let other = tempfile::tempdir().unwrap();
    let o = Command::new(BIN)
        .args([
            "qtcfg",
            "-w",
            "udsconnect",
            "-x",
            "/var/run/rexec",
            "--run-dir",
        ])
        .arg(other.path())
        .env("DPUCTL_RUN_DIR", "/nonexistent/run")
        .output()
        .unwrap();
    assert_fails(
        &o,
        1,
        &format!("no control socket in {}", other.path().display()),
    );

    let o = qtcfg(&["--json", "-z"], dir.path());
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stderr).expect("JSON error");
    assert!(v["error"]
        .as_str()
        .unwrap()
        .starts_with("no engine or udsproxyd is running"));
}

#[test]
fn argv0_named_qtcfg_runs_qtcfg() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("qtcfg");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    let o = Command::new(&link)
        .args(["-w", "bogus", "-z"])
        .env("DPUCTL_RUN_DIR", dir.path())
        .output()
        .unwrap();
    assert_fails(&o, 2, "unknown allowlist type 'bogus'");
}

// ------------------------------------------------------------- with a (fake) daemon

/// A one-connection fake daemon at `<run_dir>/<name>.ctl`: reads one request line, checks
/// it against `want`, answers `answer`. Returns the request it saw.
fn fake_daemon(
    run_dir: &Path,
    name: &str,
    want: serde_json::Value,
    answer: serde_json::Value,
) -> thread::JoinHandle<serde_json::Value> {
    let listener = UnixListener::bind(run_dir.join(format!("{name}.ctl"))).unwrap();
    thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let req: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(req, want);
        let mut w = stream;
        writeln!(w, "{answer}").unwrap();
        req
    })
}

#[test]
fn lists_through_the_preferred_daemon() {
    let dir = tempfile::tempdir().unwrap();
    // Both run; udsconnect goes to udsproxyd.
    let _engine = UnixListener::bind(dir.path().join("engine.ctl")).unwrap();
    let d = fake_daemon(
        dir.path(),
        "udsproxyd",
        serde_json::json!({"cmd": "allowlist_list", "list_type": "udsconnect"}),
        serde_json::json!({"ok": true, "allowlists": {"udsconnect": ["/var/run/test"]}}),
    );
    let o = qtcfg(&["-w", "UDSCONNECT", "-z"], dir.path());
    d.join().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "Get qtfs <Udsconnect> white list:\n  [index:0][path:/var/run/test]\n"
    );
}

#[test]
fn add_sends_the_normalised_path_and_prints_json() {
    let dir = tempfile::tempdir().unwrap();
    let d = fake_daemon(
        dir.path(),
        "engine",
        serde_json::json!({"cmd": "allowlist_add", "list_type": "open", "path": "/var/lib/docker", "persist": true}),
        serde_json::json!({"ok": true, "index": 3}),
    );
    let o = qtcfg(
        &[
            "--json",
            "--persist",
            "-w",
            "open",
            "-x",
            "/var//lib/docker/",
        ],
        dir.path(),
    );
    d.join().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "{\"added\":{\"type\":\"open\",\"path\":\"/var/lib/docker\",\"index\":3}}\n"
    );
}

#[test]
fn daemon_errors_are_passed_on_with_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let msg = "index 9 out of range: [Udsconnect] has 1 entries (0..0); list them with `qtcfg -z udsconnect`";
    let d = fake_daemon(
        dir.path(),
        "udsproxyd",
        serde_json::json!({"cmd": "allowlist_delete", "list_type": "udsconnect", "index": 9, "persist": false}),
        serde_json::json!({"ok": false, "error": msg}),
    );
    let o = qtcfg(&["-w", "udsconnect", "-y", "9"], dir.path());
    d.join().unwrap();
    assert_fails(&o, 1, msg);
}

#[test]
fn stale_socket_is_reported_as_no_daemon() {
    let dir = tempfile::tempdir().unwrap();
    // Bind then drop: the socket file stays, nobody listens.
    drop(UnixListener::bind(dir.path().join("engine.ctl")).unwrap());
    let o = qtcfg(&["-z"], dir.path());
    assert_fails(&o, 1, "refused the connection");
    assert!(stderr(&o).contains("start one, or pass --run-dir/--target"));
}
