//! HOST and DPU as two mount+pid namespaces on one box: the engine on one side, udsproxyd on
//! the other, over 127.0.0.1, with real keys, real control sockets and the real binary.

mod common;

use std::time::Duration;

use common::{peer_state, s, text, Scratch, Side};

const CONNECT: Duration = Duration::from_secs(15);

struct Pair {
    host: Side,
    dpu: Side,
}

fn start_pair(scratch: &Scratch, host_key: &str, dpu_key: &str) -> Pair {
    let host_uds = common::free_port().to_string();
    let dpu_uds = common::free_port().to_string();
    let fs = format!("tcp://127.0.0.1:{}", common::free_port());
    let host_wl = scratch.write("host-whitelist", "[Mount]\nPath=/tmp\n");
    let dpu_wl = scratch.write("dpu-whitelist", "");
    let host = Side::start(
        "host",
        scratch,
        &[
            "engine",
            "2",
            "1",
            "127.0.0.1",
            &host_uds,
            "127.0.0.1",
            &dpu_uds,
            "--listen",
            &fs,
            "--key",
            host_key,
            "--whitelist",
            s(&host_wl),
        ],
    );
    let dpu = Side::start(
        "dpu",
        scratch,
        &[
            "udsproxyd",
            "1",
            "127.0.0.1",
            &dpu_uds,
            "127.0.0.1",
            &host_uds,
            "--key",
            dpu_key,
            "--whitelist",
            s(&dpu_wl),
        ],
    );
    Pair { host, dpu }
}

#[test]
fn pair_connects_and_qtcfg_edits_live() {
    require_namespaces!();
    let scratch = Scratch::new();
    let key = scratch.key("psk");
    let pair = start_pair(&scratch, s(&key), s(&key));

    let dpu_status = pair.dpu.wait_status("udsproxyd connected", CONNECT, |st| {
        peer_state(st, "udsproxyd").as_deref() == Some("connected")
    });
    let host_status = pair.host.wait_status("engine connected", CONNECT, |st| {
        peer_state(st, "engine").as_deref() == Some("connected")
    });

    // The fixed JSON shape of DESIGN.md §4.
    for (st, name) in [(&dpu_status, "udsproxyd"), (&host_status, "engine")] {
        let d = &st["daemons"][0];
        assert_eq!(d["name"], name, "{st}");
        assert!(d["pid"].as_u64().is_some(), "{st}");
        assert!(
            d["control"].as_str().unwrap().starts_with("/var/run/qtfs/"),
            "{st}"
        );
        let p = &d["peers"][0];
        assert!(
            p["address"]
                .as_str()
                .unwrap()
                .starts_with("tcp://127.0.0.1:"),
            "{st}"
        );
        assert!(
            p["bytes_in"].as_u64().is_some() && p["bytes_out"].as_u64().is_some(),
            "{st}"
        );
    }
    assert_eq!(dpu_status["daemons"][0]["peers"][0]["role"], "engine");

    // qtcfg on the DPU side: add, list at index 0, JSON twin, delete.
    let out = pair
        .dpu
        .run(&["qtcfg", "-w", "udsconnect", "-x", "/var/run/test"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = pair.dpu.run(&["qtcfg", "-z"]);
    assert!(out.status.success(), "{}", text(&out));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("[index:0][path:/var/run/test]"),
        "{listing}"
    );
    let out = pair.dpu.run(&["qtcfg", "-z", "udsconnect", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("qtcfg --json");
    assert_eq!(v["allowlists"]["udsconnect"][0], "/var/run/test", "{v}");
    // The daemon's status carries the allowlist at once.
    let st = pair.dpu.status().expect("status");
    assert_eq!(
        st["daemons"][0]["allowlists"]["udsconnect"][0],
        "/var/run/test"
    );

    let out = pair.dpu.run(&["qtcfg", "-w", "bogus", "-x", "/a"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bogus") && err.contains("udsconnect"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    let out = pair.dpu.run(&["qtcfg", "-w", "udsconnect", "-y", "5"]);
    assert!(!out.status.success(), "{}", text(&out));
    let out = pair.dpu.run(&["qtcfg", "-w", "udsconnect", "-y", "0"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = pair.dpu.run(&["qtcfg", "-w", "udsconnect", "-z", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("qtcfg --json");
    assert_eq!(v["allowlists"]["udsconnect"], serde_json::json!([]), "{v}");

    // --persist writes the daemon's whitelist file.
    let out = pair.dpu.run(&[
        "qtcfg",
        "-w",
        "udsconnect",
        "-x",
        "/run/persisted",
        "--persist",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let file = std::fs::read_to_string(scratch.path("dpu-whitelist")).unwrap();
    assert!(file.contains("/run/persisted"), "{file}");
}

#[test]
fn different_keys_never_connect_and_both_say_why() {
    require_namespaces!();
    let scratch = Scratch::new();
    let k1 = scratch.key("psk1");
    let k2 = scratch.key("psk2");
    let pair = start_pair(&scratch, s(&k1), s(&k2));
    pair.dpu
        .wait_status("udsproxyd auth_failed", CONNECT, |st| {
            peer_state(st, "udsproxyd").as_deref() == Some("auth_failed")
        });
    pair.host.wait_status("engine auth_failed", CONNECT, |st| {
        peer_state(st, "engine").as_deref() == Some("auth_failed")
    });
    std::thread::sleep(Duration::from_millis(500));
    for side in [&pair.host, &pair.dpu] {
        let st = side.status().expect("status");
        assert_ne!(
            peer_state(&st, st["daemons"][0]["name"].as_str().unwrap()).as_deref(),
            Some("connected")
        );
        let log = side.log().to_lowercase();
        assert!(log.contains("auth"), "{} log says why:\n{log}", side.name);
        assert!(
            log.contains("127.0.0.1"),
            "{} log names the peer:\n{log}",
            side.name
        );
    }
}

#[test]
fn either_side_may_start_first_and_the_link_heals() {
    require_namespaces!();
    let scratch = Scratch::new();
    let key = scratch.key("psk");
    let host_uds = common::free_port().to_string();
    let dpu_uds = common::free_port().to_string();
    let fs = format!("tcp://127.0.0.1:{}", common::free_port());
    let wl = scratch.write("wl", "[Mount]\nPath=/tmp\n");
    let dpu_args = [
        "udsproxyd",
        "1",
        "127.0.0.1",
        &dpu_uds,
        "127.0.0.1",
        &host_uds,
        "--key",
        s(&key),
        "--whitelist",
        s(&wl),
    ];
    let host_args = [
        "engine",
        "2",
        "1",
        "127.0.0.1",
        &host_uds,
        "127.0.0.1",
        &dpu_uds,
        "--listen",
        &fs,
        "--key",
        s(&key),
        "--whitelist",
        s(&wl),
    ];
    // The DPU first: it keeps trying until the HOST appears.
    let dpu = Side::start("dpu", &scratch, &dpu_args);
    dpu.wait_status("udsproxyd connecting", CONNECT, |st| {
        peer_state(st, "udsproxyd").as_deref() == Some("connecting")
    });
    let mut host = Side::start("host", &scratch, &host_args);
    dpu.wait_status("udsproxyd connected", CONNECT, |st| {
        peer_state(st, "udsproxyd").as_deref() == Some("connected")
    });
    // The HOST goes away: the DPU notices, and reconnects when it is back.
    let status = host.stop().expect("engine exit status");
    assert!(
        status.success(),
        "engine exits 0 on SIGTERM: {status:?}\n{}",
        host.log()
    );
    dpu.wait_status("udsproxyd lost the peer", CONNECT, |st| {
        peer_state(st, "udsproxyd").as_deref() != Some("connected")
    });
    let host2 = Side::start("host2", &scratch, &host_args);
    dpu.wait_status("udsproxyd reconnected", CONNECT, |st| {
        peer_state(st, "udsproxyd").as_deref() == Some("connected")
    });
    host2.wait_status("engine connected", CONNECT, |st| {
        peer_state(st, "engine").as_deref() == Some("connected")
    });
}

#[test]
fn second_instance_is_refused_and_sighup_reloads() {
    require_namespaces!();
    let scratch = Scratch::new();
    let key = scratch.key("psk");
    let wl = scratch.write("wl", "[Udsconnect]\nPath=/run/a\n");
    let port = common::free_port().to_string();
    let args = [
        "udsproxyd",
        "--listen",
        &format!("tcp://127.0.0.1:{port}"),
        "--key",
        s(&key),
        "--whitelist",
        s(&wl),
    ];
    let dpu = Side::start("dpu", &scratch, &args);
    dpu.wait_status("udsproxyd up", CONNECT, |st| {
        st["daemons"][0]["name"] == "udsproxyd"
    });

    // A second udsproxyd in the same namespace (same /var/run/qtfs) is refused by the lock.
    let second_port = common::free_port().to_string();
    let out = dpu.run(&[
        "udsproxyd",
        "--listen",
        &format!("tcp://127.0.0.1:{second_port}"),
        "--key",
        s(&key),
        "--whitelist",
        s(&wl),
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already running"), "{err}");

    // Edit the file, SIGHUP, and the new entry is live.
    std::fs::write(&wl, "[Udsconnect]\nPath=/run/a;/run/b\n").unwrap();
    let pid = dpu.daemon_pid().expect("daemon pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    dpu.wait_status("reloaded allowlist", CONNECT, |st| {
        st["daemons"][0]["allowlists"]["udsconnect"] == serde_json::json!(["/run/a", "/run/b"])
    });
}

#[test]
fn no_key_and_no_insecure_refuses_to_start() {
    let scratch = Scratch::new();
    let missing = scratch.path("no-such-psk");
    let run_dir = scratch.path("run");
    let out = common::dpuctl(&[
        "udsproxyd",
        "--listen",
        "tcp://127.0.0.1:0",
        "--key",
        s(&missing),
        "--run-dir",
        s(&run_dir),
        "--whitelist",
        s(&scratch.path("wl")),
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dpuctl keygen"), "says how to fix it: {err}");
    assert!(
        err.contains("insecure"),
        "mentions the test-mode escape: {err}"
    );
}

#[test]
fn engine_without_mount_entries_refuses_to_start_and_says_how_to_fix_it() {
    let scratch = Scratch::new();
    let key = scratch.key("psk");
    let wl = scratch.write("wl", "[Udsconnect]\nPath=/run/x\n");
    let out = common::dpuctl(&[
        "engine",
        "--no-uds",
        "--listen",
        "tcp://127.0.0.1:0",
        "--key",
        s(&key),
        "--whitelist",
        s(&wl),
        "--run-dir",
        s(&scratch.path("run")),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[Mount]") && err.contains("Path="), "{err}");
}
