//! qtfs allowlist changes on a running engine reach mounts that already exist: the engine on
//! the HOST side, the real `mount.qtfs` on the DPU side, each in its own mount+pid
//! namespace, over 127.0.0.1 with a real key.

mod common;

use std::time::Duration;

use common::{s, text, Scratch, Side};

fn fuse_unavailable() -> Option<String> {
    if !std::path::Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing".into());
    }
    common::namespaces_unavailable()
}

/// Removing the `[Mount]` entry of a mounted export with qtcfg closes it at once: the next
/// open fails with EACCES (logged once on the engine), and adding the entry back reopens it.
#[test]
fn a_removed_mount_entry_closes_existing_mounts_at_their_next_request() {
    if let Some(why) = fuse_unavailable() {
        eprintln!("SKIPPED {}: {why}", module_path!());
        return;
    }
    let scratch = Scratch::new();
    let key = scratch.key("psk");
    let export = scratch.path("export");
    std::fs::create_dir(&export).unwrap();
    std::fs::write(export.join("hello.txt"), "hello\n").unwrap();
    let wl = scratch.write("whitelist", &format!("[Mount]\nPath={}\n", s(&export)));
    let fs = format!("127.0.0.1:{}", common::free_port());
    let host = Side::start(
        "host",
        &scratch,
        &[
            "engine",
            "--no-uds",
            "--listen",
            &format!("tcp://{fs}"),
            "--key",
            s(&key),
            "--whitelist",
            s(&wl),
        ],
    );
    host.wait_status("engine up", Duration::from_secs(10), |st| {
        st["daemons"][0]["name"] == "engine"
    });
    let dpu_wl = scratch.write("dpu-whitelist", "");
    let dpu = Side::start(
        "dpu",
        &scratch,
        &[
            "udsproxyd",
            "--listen",
            &format!("tcp://127.0.0.1:{}", common::free_port()),
            "--key",
            s(&key),
            "--whitelist",
            s(&dpu_wl),
        ],
    );
    dpu.wait_status("udsproxyd up", Duration::from_secs(10), |st| {
        st["daemons"][0]["name"] == "udsproxyd"
    });
    let out = dpu.sh(&format!(
        "mkdir -p /run/mnt && $DPUCTL mount {} /run/mnt -o server={fs},key={}",
        s(&export),
        s(&key)
    ));
    assert!(out.status.success(), "mount: {}", text(&out));
    let read = || dpu.sh("cat /run/mnt/hello.txt");
    let out = read();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello\n",
        "{}",
        text(&out)
    );

    let out = host.run(&["qtcfg", "-w", "mount", "-y", "0"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("lose access at their next request"),
        "qtcfg says what removing a [Mount] entry does: {}",
        text(&out)
    );
    for _ in 0..3 {
        let out = read();
        assert!(
            !out.status.success(),
            "read after the removal: {}",
            text(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "{}",
            text(&out)
        );
    }
    let warned = host
        .log()
        .matches("whose [Mount] entry was removed")
        .count();
    assert_eq!(
        warned,
        1,
        "one warning, not one per request:\n{}",
        host.log()
    );

    let out = host.run(&["qtcfg", "-w", "mount", "-x", s(&export)]);
    assert!(out.status.success(), "{}", text(&out));
    let out = read();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello\n",
        "{}",
        text(&out)
    );
    let out = dpu.sh("umount /run/mnt");
    assert!(out.status.success(), "umount: {}", text(&out));
}
