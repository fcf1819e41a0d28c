//! qtfs end to end: the engine on the HOST side, the real `mount.qtfs` (daemonised, one
//! process per mount) on the DPU side, each in its own mount+pid namespace, over 127.0.0.1
//! with a real key.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{s, text, Scratch, Side};

struct Setup {
    scratch: Scratch,
    host: Side,
    dpu: Side,
    fs: String,
    key: std::path::PathBuf,
    export: std::path::PathBuf,
    whitelist: std::path::PathBuf,
}

/// The mount's entry in a side's status (null when there is none).
fn mount_of(st: &serde_json::Value) -> serde_json::Value {
    st["daemons"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["name"] == "mount").cloned())
        .unwrap_or_default()
}

/// The HOST side: an engine serving qtfs only, on `fs`.
fn start_engine(name: &str, scratch: &Scratch, fs: &str, key: &Path, wl: &Path) -> Side {
    let host = Side::start(
        name,
        scratch,
        &[
            "engine",
            "--no-uds",
            "--listen",
            &format!("tcp://{fs}"),
            "--key",
            s(key),
            "--whitelist",
            s(wl),
        ],
    );
    host.wait_status("engine up", Duration::from_secs(10), |st| {
        st["daemons"][0]["name"] == "engine"
    });
    host
}

fn setup() -> Setup {
    let scratch = Scratch::new();
    let key = scratch.key("psk");
    let export = scratch.path("export");
    std::fs::create_dir(&export).unwrap();
    std::fs::write(export.join("hello.txt"), "hello from the HOST\n").unwrap();
    let wl = scratch.write(
        "whitelist",
        &format!("[Mount]\nPath={};/proc;/sys/fs/cgroup\n", s(&export)),
    );
    let fs = format!("127.0.0.1:{}", common::free_port());
    let host = start_engine("host", &scratch, &fs, &key, &wl);
    // The DPU side's anchor process: a udsproxyd that only listens.
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
    Setup {
        scratch,
        host,
        dpu,
        fs,
        key,
        export,
        whitelist: wl,
    }
}

fn fuse_unavailable() -> Option<String> {
    if !std::path::Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing".into());
    }
    common::namespaces_unavailable()
}

macro_rules! require_fuse {
    () => {
        if let Some(why) = fuse_unavailable() {
            eprintln!("SKIPPED {}: {why}", module_path!());
            return;
        }
    };
}

#[test]
fn mount_read_write_and_umount_through_the_engine() {
    require_fuse!();
    let t = setup();
    let opts = format!("server={},key={}", t.fs, s(&t.key));
    let mnt = "/run/mnt";
    let out = t.dpu.sh(&format!(
        "mkdir -p {mnt} && $DPUCTL mount {} {mnt} -o {opts}",
        s(&t.export)
    ));
    assert!(out.status.success(), "mount: {}", text(&out));
    // Its own type in the DPU's mount table, with the remote path exactly as given as the
    // source (what mount(8) compares an fstab line with).
    let pid = t.dpu.daemon_pid().expect("DPU side running");
    let table = std::fs::read_to_string(format!("/proc/{pid}/mounts")).unwrap();
    let line = table
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(mnt))
        .unwrap_or_else(|| panic!("{mnt} not in the DPU's mount table:\n{table}"));
    assert!(
        line.starts_with(&format!("{} {mnt} fuse.qtfs ", s(&t.export))),
        "{line}"
    );
    // Reads see the HOST's file; writes land on the HOST.
    let out = t.dpu.sh(&format!(
        "cat {mnt}/hello.txt && echo written > {mnt}/new.txt && mkdir {mnt}/d && mv {mnt}/new.txt {mnt}/d/moved.txt && ls {mnt}/d"
    ));
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("hello from the HOST") && stdout.contains("moved.txt"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(t.export.join("d/moved.txt")).unwrap(),
        "written\n"
    );
    // O_DIRECT files, new and existing, through the engine's own create and open paths.
    let out = t.dpu.sh(&format!(
        "dd if=/dev/zero of={mnt}/direct bs=1M count=2 oflag=direct status=none && \
         dd if=/dev/zero of={mnt}/direct bs=1M count=1 oflag=direct conv=notrunc status=none && \
         dd if={mnt}/direct of=/dev/null bs=1M iflag=direct status=none"
    ));
    assert!(out.status.success(), "O_DIRECT: {}", text(&out));
    assert_eq!(
        std::fs::metadata(t.export.join("direct")).unwrap().len(),
        2 << 20
    );
    // Errors are the HOST's errno: rmdir of a non-empty directory.
    let out = t.dpu.sh(&format!("rmdir {mnt}/d"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not empty"),
        "{}",
        text(&out)
    );
    // The engine lists the mount as a client.
    let st = t.host.status().unwrap();
    let peers = st["daemons"][0]["peers"].as_array().unwrap().clone();
    assert!(
        peers
            .iter()
            .any(|p| p["role"] == "mount" && p["state"] == "connected"),
        "{st}"
    );
    assert!(
        st["daemons"][0]["counters"]["requests"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "the engine counts the requests it served: {st}"
    );
    // The file pool's gauges: the default 16 threads, none busy or waiting once idle.
    let counters = &st["daemons"][0]["counters"];
    assert_eq!(counters["fs_pool_threads"], 16, "{st}");
    assert_eq!(counters["fs_pool_busy"], 0, "{st}");
    assert_eq!(counters["fs_pool_queued"], 0, "{st}");
    // The mount process registers its own control socket: status shows the mount, its
    // engine link and per-operation figures.
    let st = t.dpu.status().unwrap();
    let mount = st["daemons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "mount")
        .unwrap_or_else(|| panic!("no mount daemon in the DPU's status: {st}"))
        .clone();
    assert_eq!(mount["mount"]["remote"], s(&t.export), "{mount}");
    assert_eq!(mount["mount"]["local"], mnt, "{mount}");
    assert_eq!(mount["mount"]["state"], "mounted", "{mount}");
    assert_eq!(mount["peers"][0]["state"], "connected", "{mount}");
    assert_eq!(mount["peers"][0]["role"], "engine", "{mount}");
    let lookups = mount["mount"]["ops"]["lookup"]["count"]
        .as_u64()
        .unwrap_or(0);
    assert!(lookups > 0, "lookups are counted: {mount}");
    assert!(
        mount["mount"]["ops"]["rmdir"]["errors"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "{mount}"
    );
    // umount ends the mount process.
    let out = t.dpu.sh(&format!("umount {mnt} && ! mountpoint -q {mnt}"));
    assert!(out.status.success(), "{}", text(&out));
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.dpu.status().unwrap()["daemons"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["name"] == "mount")
    {
        assert!(
            Instant::now() < deadline,
            "the mount's control socket outlived umount"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    loop {
        let st = t.host.status().unwrap();
        let mounts = st["daemons"][0]["peers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["role"] == "mount")
            .count();
        if mounts == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the mount's link outlived umount: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(t.scratch);
}

/// Removing the `[Mount]` entry of a mounted export with qtcfg closes it at once: the next
/// open fails with EACCES (logged once on the engine), and adding the entry back reopens it.
#[test]
fn a_removed_mount_entry_closes_existing_mounts_at_their_next_request() {
    require_fuse!();
    let t = setup();
    let out = t.dpu.sh(&format!(
        "mkdir -p /run/mnt && $DPUCTL mount {} /run/mnt -o server={},key={}",
        s(&t.export),
        t.fs,
        s(&t.key)
    ));
    assert!(out.status.success(), "mount: {}", text(&out));
    let read = || t.dpu.sh("cat /run/mnt/hello.txt");
    let hello = "hello from the HOST\n";
    let out = read();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        hello,
        "{}",
        text(&out)
    );

    // The export is the first [Mount] entry.
    let out = t.host.run(&["qtcfg", "-w", "mount", "-y", "0"]);
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
    let warned = t
        .host
        .log()
        .matches("whose [Mount] entry was removed")
        .count();
    assert_eq!(
        warned,
        1,
        "one warning, not one per request:\n{}",
        t.host.log()
    );

    let out = t.host.run(&["qtcfg", "-w", "mount", "-x", s(&t.export)]);
    assert!(out.status.success(), "{}", text(&out));
    let out = read();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        hello,
        "{}",
        text(&out)
    );
    let out = t.dpu.sh("umount /run/mnt");
    assert!(out.status.success(), "umount: {}", text(&out));
}

#[test]
fn mount_t_qtfs_uses_the_helper_and_proc_is_the_hosts() {
    require_fuse!();
    let t = setup();
    // Put the helper where mount(8) looks, inside the DPU namespace only.
    let sbin = t.scratch.path("sbin");
    std::fs::create_dir(&sbin).unwrap();
    std::os::unix::fs::symlink(common::bin(), sbin.join("mount.qtfs")).unwrap();
    let opts = format!("server={},key={}", t.fs, s(&t.key));
    let out = t.dpu.sh(&format!(
        "mount --bind {} /usr/sbin && mkdir -p /run/p && mount -t qtfs -o {opts} /proc /run/p && cat /run/p/meminfo | head -1 && cat /run/p/1/comm",
        s(&sbin)
    ));
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("MemTotal"),
        "size-0 proc files read in full: {stdout}"
    );
    // PID 1 of the HOST namespace is the engine (dpuctl); of the DPU namespace, udsproxyd — also dpuctl,
    // so compare the HOST-side view with what the HOST itself says.
    let host_comm = t.host.sh("cat /proc/1/comm");
    assert!(
        stdout.contains(String::from_utf8_lossy(&host_comm.stdout).trim()),
        "{stdout}"
    );
    let _ = t.dpu.sh("umount /run/p");
}

#[test]
fn refused_and_missing_paths_fail_with_one_line_and_leave_nothing_mounted() {
    require_fuse!();
    let t = setup();
    let opts = format!("server={},key={}", t.fs, s(&t.key));
    for (remote, expect) in [
        ("/etc", "Mount"),
        (&format!("{}/nope", s(&t.export)) as &str, "No such file"),
    ] {
        let out = t.dpu.sh(&format!(
            "mkdir -p /run/m && $DPUCTL mount {remote} /run/m -o {opts}"
        ));
        assert_eq!(out.status.code(), Some(1), "{remote}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(expect), "{remote}: {err}");
        // (/proc/self is not this process here: nsenter entered the mount namespace only.)
        let out = t
            .dpu
            .sh("mountpoint -q /run/m && echo mounted || echo clean");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "clean",
            "nothing mounted"
        );
    }
    // A wrong key is one line too.
    let other = t.scratch.key("other");
    let out = t.dpu.sh(&format!(
        "$DPUCTL mount {} /run/m -o server={},key={}",
        s(&t.export),
        t.fs,
        s(&other)
    ));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("auth"),
        "{}",
        text(&out)
    );
}

#[test]
fn engine_death_fails_operations_instead_of_hanging() {
    require_fuse!();
    let mut t = setup();
    let opts = format!("server={},key={}", t.fs, s(&t.key));
    let out = t.dpu.sh(&format!(
        "mkdir -p /run/m && $DPUCTL mount {} /run/m -o {opts},attr_timeout=0,entry_timeout=0,reconnect_wait=3",
        s(&t.export)
    ));
    assert!(out.status.success(), "{}", text(&out));
    let out = t.dpu.sh("echo durable > /run/m/f && sync /run/m/f");
    assert!(out.status.success(), "{}", text(&out));
    t.host.stop();
    let started = Instant::now();
    let out = t.dpu.sh("timeout 30 cat /run/m/hello.txt; echo rc=$?");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("rc=124"), "operation hung: {}", text(&out));
    assert!(!stdout.contains("rc=0"), "operation failed: {}", text(&out));
    assert!(started.elapsed() < Duration::from_secs(25));
    assert!(
        started.elapsed() >= Duration::from_millis(2500),
        "the first operation waited reconnect_wait for the engine"
    );
    // Once an outage has outlasted the wait, operations fail at once until the mount is back.
    let again = Instant::now();
    let out = t.dpu.sh("cat /run/m/hello.txt; echo rc=$?");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("rc=0"));
    assert!(
        again.elapsed() < Duration::from_secs(2),
        "a later operation waited again: {:?}",
        again.elapsed()
    );
    assert_eq!(
        std::fs::read_to_string(t.export.join("f")).unwrap(),
        "durable\n",
        "fsync'ed data kept"
    );
    let _ = t.dpu.sh("umount -l /run/m");
}

/// The engine restarts under a busy mount: the mount dials it again and gives it back the
/// inodes and open files the DPU kernel holds, so open files, a working directory and
/// inode numbers survive, and new operations work without remounting.
#[test]
fn the_mount_reconnects_to_a_restarted_engine_and_keeps_open_files() {
    require_fuse!();
    let mut t = setup();
    std::fs::create_dir_all(t.export.join("d/sub")).unwrap();
    std::fs::write(t.export.join("d/sub/f"), "deep\n").unwrap();
    let opts = format!("server={},key={}", t.fs, s(&t.key));
    let out = t.dpu.sh(&format!(
        "mkdir -p /run/m && $DPUCTL mount {} /run/m -o {opts}",
        s(&t.export)
    ));
    assert!(out.status.success(), "{}", text(&out));
    // A process in the mount with a read fd, an append fd and its working directory there,
    // waiting for the engine to come back.
    let holder = r#"(
        cd /run/m/d && exec 3</run/m/hello.txt 4>>/run/m/d/log || exit 1
        stat -c %i sub/f > /run/ino.before
        touch /run/ready
        while [ ! -e /run/go ]; do sleep 0.05; done
        cat <&3 > /run/out.read
        echo after >&4
        ls > /run/out.ls
        cat sub/f > /run/out.deep
        stat -c %i sub/f > /run/ino.after
        touch /run/done
    ) </dev/null >/run/holder.log 2>&1 &
    for i in $(seq 200); do [ -e /run/ready ] && exit 0; sleep 0.05; done; exit 1"#;
    let out = t.dpu.sh(holder);
    assert!(out.status.success(), "holder not ready: {}", text(&out));
    // A lookup of a missing name is an answer, not an error.
    let counters = |side: &Side| {
        let seen = std::cell::RefCell::new(serde_json::Value::Null);
        side.wait_status("the mount's counters", Duration::from_secs(5), |st| {
            *seen.borrow_mut() = mount_of(st)["counters"].clone();
            true
        });
        seen.into_inner()
    };
    let before = counters(&t.dpu);
    assert!(!t.dpu.sh("stat /run/m/missing").status.success());
    assert_eq!(counters(&t.dpu)["errors"], before["errors"], "{before}");

    t.host.stop();
    t.dpu
        .wait_status("the mount reconnecting", Duration::from_secs(10), |st| {
            mount_of(st)["mount"]["state"] == "reconnecting"
        });
    // An operation while the engine is away waits for it (reconnect_wait, 10 s by default)
    // instead of failing.
    let out = t.dpu.sh(
        "(cat /run/m/d/sub/f > /run/held.out 2>&1; echo $? > /run/held.rc) </dev/null >/dev/null 2>&1 &",
    );
    assert!(out.status.success(), "{}", text(&out));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !t.dpu.inside("/run/held.rc").exists(),
        "the operation did not wait for the engine"
    );
    t.host = start_engine("host2", &t.scratch, &t.fs, &t.key, &t.whitelist);
    t.dpu
        .wait_status("the mount back", Duration::from_secs(15), |st| {
            let m = mount_of(st);
            m["counters"]["reconnects"] == 1 && m["mount"]["state"] == "mounted"
        });
    // Requests count since the mount started, not since the new link.
    let after = counters(&t.dpu);
    assert!(
        after["requests"].as_u64() >= before["requests"].as_u64(),
        "{before} then {after}"
    );

    let out = t
        .dpu
        .sh("touch /run/go; for i in $(seq 200); do [ -e /run/done ] && break; sleep 0.05; done; cat /run/holder.log");
    assert!(out.status.success(), "{}", text(&out));
    let read = |p: &str| std::fs::read_to_string(t.dpu.inside(p)).unwrap_or_default();
    assert_eq!(
        read("/run/out.read"),
        "hello from the HOST\n",
        "{}",
        read("/run/holder.log")
    );
    assert_eq!(
        std::fs::read_to_string(t.export.join("d/log")).unwrap(),
        "after\n"
    );
    assert!(
        read("/run/out.ls").contains("sub"),
        "{}",
        read("/run/holder.log")
    );
    assert_eq!(read("/run/out.deep"), "deep\n");
    assert_eq!(
        read("/run/ino.after"),
        read("/run/ino.before"),
        "inode numbers kept"
    );
    common::wait_for_path(
        &t.dpu.inside("/run/held.rc"),
        Duration::from_secs(10),
        || "the held operation never finished".into(),
    );
    assert_eq!(read("/run/held.rc"), "0\n", "{}", read("/run/held.out"));
    assert_eq!(read("/run/held.out"), "deep\n");
    // New work needs no remount; the new engine holds what the DPU uses, no more.
    let out = t
        .dpu
        .sh("echo new > /run/m/d/new && cat /run/m/d/new && ls /run/m/d/sub");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "new\nf\n");
    let out = t.dpu.sh("umount /run/m");
    assert!(out.status.success(), "{}", text(&out));
    let engine = t
        .host
        .wait_status("mount gone", Duration::from_secs(10), |st| {
            st["daemons"][0]["peers"]
                .as_array()
                .is_some_and(|p| !p.iter().any(|p| p["role"] == "mount"))
        });
    assert!(engine.is_object());
}

/// `negative_timeout`: absent names are remembered only when asked for, and a create through
/// the mount ends the memory at once; without it a name the HOST creates shows up at once.
#[test]
fn negative_timeout_remembers_absent_names_only_when_asked() {
    require_fuse!();
    let t = setup();
    let opts = format!(
        "server={},key={},attr_timeout=0,entry_timeout=0",
        t.fs,
        s(&t.key)
    );
    let out = t.dpu.sh(&format!(
        "mkdir -p /run/neg /run/fresh && \
         $DPUCTL mount {e} /run/neg -o {opts},negative_timeout=60 && \
         $DPUCTL mount {e} /run/fresh -o {opts}",
        e = s(&t.export)
    ));
    assert!(out.status.success(), "{}", text(&out));
    let absent = |path: &str| {
        let out = t.dpu.sh(&format!("test -e {path}; echo rc=$?"));
        String::from_utf8_lossy(&out.stdout).contains("rc=1")
    };
    assert!(absent("/run/neg/late") && absent("/run/fresh/late"));
    std::fs::write(t.export.join("late"), "made on the HOST\n").unwrap();
    assert!(
        absent("/run/neg/late"),
        "negative_timeout=60: the absent name should still be remembered"
    );
    assert!(
        !absent("/run/fresh/late"),
        "without negative_timeout the HOST's new file must show at once"
    );
    // A create through the mount replaces the remembered absence at once.
    assert!(absent("/run/neg/mine"));
    let out = t
        .dpu
        .sh("echo made on the DPU > /run/neg/mine && cat /run/neg/mine");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "made on the DPU\n",
        "{}",
        text(&out)
    );
    let _ = t.dpu.sh("umount /run/neg; umount /run/fresh");
}

/// A cgroup directory the engine may create groups in: the v2 root, or v1's pids hierarchy.
fn cgroup_base() -> Option<&'static str> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/pids"]
        .into_iter()
        .find(|b| std::path::Path::new(b).join("cgroup.procs").exists())
}

#[test]
fn cgroup_writes_through_the_mount_take_effect_on_the_host() {
    require_fuse!();
    let Some(base) = cgroup_base() else {
        eprintln!("SKIPPED cgroup test: no writable cgroup hierarchy under /sys/fs/cgroup");
        return;
    };
    let t = setup();
    let engine = t.host.daemon_pid().expect("engine pid");
    let group = format!("dpuctl-test-{}", std::process::id());
    let rel = base
        .trim_start_matches("/sys/fs/cgroup")
        .trim_start_matches('/');
    let opts = format!("server={},key={}", t.fs, s(&t.key));
    let dir = if rel.is_empty() {
        format!("/run/cg/{group}")
    } else {
        format!("/run/cg/{rel}/{group}")
    };
    let root = dir.trim_end_matches(&format!("/{group}")).to_string();
    // Create the group on the HOST through the mount, move the engine (pid 1 of the HOST
    // namespace: cgroup.procs takes pids of the writer's namespace) into it, set a limit.
    let out = t.dpu.sh(&format!(
        "mkdir -p /run/cg && $DPUCTL mount /sys/fs/cgroup /run/cg -o {opts} && mkdir {dir} && echo 1 > {dir}/cgroup.procs && cat {dir}/cgroup.procs"
    ));
    let host_dir = std::path::Path::new(base).join(&group);
    let cleanup = |t: &Setup| {
        let _ = t.dpu.sh(&format!(
            "echo 1 > {root}/cgroup.procs; rmdir {dir}; umount -l /run/cg"
        ));
        let _ = std::fs::remove_dir(&host_dir);
    };
    if !out.status.success() {
        cleanup(&t);
        panic!("cgroup through qtfs: {}", text(&out));
    }
    let own = std::fs::read_to_string(format!("/proc/{engine}/cgroup")).unwrap();
    let moved = own.lines().any(|l| l.ends_with(&format!("/{group}")));
    // pids.max exists in v2 groups (when the pids controller is enabled) and in v1's pids.
    let limit_file = "pids.max";
    let limit = t.dpu.sh(&format!(
        "echo 4242 > {dir}/{limit_file} && cat {dir}/{limit_file}"
    ));
    let host_limit = std::fs::read_to_string(host_dir.join(limit_file)).unwrap_or_default();
    cleanup(&t);
    assert!(moved, "the engine moved into {group} on the HOST: {own}");
    assert!(limit.status.success(), "{}", text(&limit));
    assert_eq!(
        host_limit.trim(),
        "4242",
        "the limit written on the DPU is the HOST's"
    );
    assert!(
        !host_dir.exists(),
        "rmdir through the mount removed the group"
    );
}

#[test]
fn a_background_mount_keeps_no_directory_busy_and_shows_absolute_paths() {
    require_fuse!();
    let t = setup();
    // Started from a directory on a file system of its own, with the mount point and the
    // key given relative to it; that file system must unmount while the mount serves.
    let out = t.dpu.sh(&format!(
        "mkdir -p /run/wd /run/rel-mnt && mount -t tmpfs tmpfs /run/wd && cp {key} /run/wd/psk && \
         cd /run/wd && $DPUCTL mount {export} ../rel-mnt -o server={fs},key=psk && \
         cd / && umount /run/wd && cat /run/rel-mnt/hello.txt",
        key = s(&t.key),
        export = s(&t.export),
        fs = t.fs
    ));
    let st = t.dpu.status().unwrap();
    let _ = t.dpu.sh("umount /run/rel-mnt");
    assert!(
        out.status.success(),
        "the directory the mount was started from stayed busy: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hello from the HOST"),
        "{}",
        text(&out)
    );
    let mount = mount_of(&st);
    assert_eq!(mount["mount"]["local"], "/run/rel-mnt", "{st}");
    assert!(
        mount["mount"]["options"]
            .as_str()
            .is_some_and(|o| o.contains("key=psk")),
        "status shows the options as given: {st}"
    );
}

#[test]
fn sigterm_to_a_mount_under_another_leaves_the_other_alone() {
    require_fuse!();
    let t = setup();
    let opts = format!("server={},key={}", t.fs, s(&t.key));
    let export = s(&t.export);
    let out = t.dpu.sh(&format!(
        "mkdir -p /run/stk && $DPUCTL mount {export} /run/stk -o {opts}"
    ));
    assert!(out.status.success(), "{}", text(&out));
    let st = t.dpu.status().unwrap();
    let a = mount_of(&st)["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no mount pid in {st}"));
    // A second mount over the first; then the first one's process is told to stop. (The
    // namespace's first process does not reap, so an ended process stays a zombie.)
    let out = t.dpu.sh(&format!(
        "alive() {{ [ -r /proc/$1/status ] && ! grep -q '^State:[[:space:]]*Z' /proc/$1/status; }}; \
         $DPUCTL mount {export} /run/stk -o {opts},ro && kill -TERM {a} && \
         for i in $(seq 50); do alive {a} || break; sleep 0.1; done; \
         if alive {a}; then echo FIRST-STILL-RUNNING; exit 0; fi; \
         timeout -s KILL 10 cat /run/stk/hello.txt; timeout -s KILL 10 touch /run/stk/x; \
         grep -c ' /run/stk ' /proc/self/mounts"
    ));
    let _ = t.dpu.sh("umount -l /run/stk; umount -l /run/stk");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("hello from the HOST"),
        "the mount on top went away with the other's process: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
        "the read-only mount is the one on top: {}",
        text(&out)
    );
    assert!(
        !stdout.contains("FIRST-STILL-RUNNING"),
        "the signalled process did not end: {}",
        text(&out)
    );
    assert!(
        stdout.trim_end().ends_with('2'),
        "both mounts stay in the table (the lower one dead until unmounted): {}",
        text(&out)
    );
}

#[test]
fn an_fstab_line_mounts_with_plain_mount() {
    require_fuse!();
    let t = setup();
    let sbin = t.scratch.path("sbin");
    std::fs::create_dir(&sbin).unwrap();
    std::os::unix::fs::symlink(common::bin(), sbin.join("mount.qtfs")).unwrap();
    let fstab = t.scratch.write(
        "fstab",
        &format!(
            "# dpuctl test\n{} /run/fst qtfs server={},key={},_netdev,nofail 0 0\n",
            s(&t.export),
            t.fs,
            s(&t.key)
        ),
    );
    // /etc/fstab and /usr/sbin are replaced inside the DPU namespace only.
    let out = t.dpu.sh(&format!(
        "mount --bind {} /usr/sbin && mount --bind {} /etc/fstab && mkdir -p /run/fst && mount /run/fst && cat /run/fst/hello.txt && grep ' /run/fst ' /proc/1/mounts",
        s(&sbin),
        s(&fstab)
    ));
    let _ = t.dpu.sh("umount /run/fst");
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("hello from the HOST"), "{stdout}");
    assert!(
        stdout.contains(&format!("{} /run/fst fuse", s(&t.export))),
        "the fstab entry became a qtfs FUSE mount: {stdout}"
    );
}

/// A directory to bind over /usr/sbin inside a DPU namespace, with the two helper names
/// mount(8) looks for: mount.qtfs (type qtfs) and mount.fuse.qtfs (the mounted fuse.qtfs).
fn helper_dir(t: &Setup) -> std::path::PathBuf {
    let sbin = t.scratch.path("sbin");
    std::fs::create_dir(&sbin).unwrap();
    for name in ["mount.qtfs", "mount.fuse.qtfs"] {
        std::os::unix::fs::symlink(common::bin(), sbin.join(name)).unwrap();
    }
    sbin
}

/// `mount -a` at every boot, or twice by hand, must leave one mount per fstab line: mount(8)
/// skips a line whose source is mounted on its directory, so the mount table's source is the
/// remote path as written (with `qtfs:` before it, each run stacked another mount and process).
#[test]
fn mount_a_twice_mounts_an_fstab_line_once() {
    require_fuse!();
    let t = setup();
    let sbin = helper_dir(&t);
    let fstab = t.scratch.write(
        "fstab",
        &format!(
            "{} /run/fsa qtfs server={},key={},_netdev 0 0\n",
            s(&t.export),
            t.fs,
            s(&t.key)
        ),
    );
    let out = t.dpu.sh(&format!(
        "mount --bind {} /usr/sbin && mount --bind {} /etc/fstab && mkdir -p /run/fsa && \
         mount -av && mount -av && cat /run/fsa/hello.txt && grep -c ' /run/fsa ' /proc/self/mounts",
        s(&sbin),
        s(&fstab)
    ));
    let st = t.dpu.status();
    let _ = t.dpu.sh("umount /run/fsa; umount /run/fsa");
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("hello from the HOST"), "{}", text(&out));
    assert_eq!(
        stdout.lines().last(),
        Some("1"),
        "one mount on /run/fsa after two mount -a: {}",
        text(&out)
    );
    assert!(stdout.contains("already mounted"), "{}", text(&out));
    let mounts = st
        .as_ref()
        .and_then(|st| st["daemons"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|d| d["name"] == "mount")
        .count();
    assert_eq!(mounts, 1, "one mount process: {st:?}");
    // -v (from mount -av) is one line of what was mounted, not FUSE debug logs.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| l.contains("mount.qtfs") || l.contains("DEBUG"))
        .collect();
    assert_eq!(ours.len(), 1, "{}", text(&out));
    assert!(
        ours[0].starts_with(&format!(
            "mount.qtfs: {} mounted on /run/fsa from {}: rw,",
            s(&t.export),
            t.fs
        )) && ours[0].contains("; kernel FUSE 7."),
        "{}",
        ours[0]
    );
}

/// `mount -o remount,ro DIR` runs the helper of the mounted type, mount.fuse.qtfs: one line
/// saying what to do and mount(8)'s failure status, and the mount is left as it was (before,
/// mount.fuse ran a program `qtfs`: "/bin/sh: 1: qtfs: not found", 127).
#[test]
fn remount_through_mount_8_is_refused_in_one_line() {
    require_fuse!();
    let t = setup();
    let sbin = helper_dir(&t);
    let opts = format!("server={},key={}", t.fs, s(&t.key));
    let out = t.dpu.sh(&format!(
        "mount --bind {} /usr/sbin && mkdir -p /run/rm && mount -t qtfs -o {opts} {} /run/rm && \
         {{ mount -o remount,ro /run/rm; echo rc=$?; }} && touch /run/rm/still-rw && \
         grep -c ' /run/rm ' /proc/self/mounts",
        s(&sbin),
        s(&t.export)
    ));
    let _ = t.dpu.sh("umount /run/rm");
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("rc=32"), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        "mount.qtfs: qtfs cannot change the options of a mounted file system: umount /run/rm, then mount it again with the new options",
        "{}",
        text(&out)
    );
    assert!(
        t.export.join("still-rw").exists(),
        "the mount stays as it was"
    );
    assert_eq!(stdout.lines().last(), Some("1"), "{}", text(&out));
}

/// The pjdfstest binary: `$PJDFSTEST`, `pjdfstest` on PATH, or cargo's bin directory.
fn pjdfstest() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("PJDFSTEST") {
        return Some(p.into());
    }
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo")))
        .map(|c| c.join("bin/pjdfstest"));
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("pjdfstest"))
        .chain(cargo_bin)
        .find(|p| p.is_file())
}

/// pjdfstest, the third-party POSIX conformance suite, on a real mount with default options,
/// with `writeback` and with `direct_io`: every test that passes on a local directory must
/// pass through qtfs.
#[test]
fn pjdfstest_passes_on_the_mount_as_on_a_local_directory() {
    require_fuse!();
    let Some(pjd) = pjdfstest() else {
        eprintln!(
            "SKIPPED pjdfstest: the pjdfstest binary is missing (scripts/deps.sh builds it; or set PJDFSTEST=)"
        );
        return;
    };
    let t = setup();
    // Users that exist on Debian/Ubuntu; pjdfstest switches to them for permission tests.
    let config = t.scratch.write(
        "pjdfstest.toml",
        "[features]\nposix_fallocate = {}\nrename_ctime = {}\nutime_now = {}\nutimensat = {}\n\
         [settings]\nnaptime = 0.01\nallow_remount = false\n\
         [dummy_auth]\nentries = [[\"nobody\", \"nogroup\"], [\"daemon\", \"daemon\"]]\n",
    );
    let run = |dir: &str, side: &Side| {
        let out = side.sh(&format!(
            "mkdir -p {dir} && cd {dir} && {} -c {} -p {dir}",
            s(&pjd),
            s(&config)
        ));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let results: Vec<(String, String)> = stdout
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let (name, verdict) = (words.next()?, words.last()?);
                matches!(verdict, "ok" | "FAILED" | "skipped")
                    .then(|| (name.to_string(), verdict.to_string()))
            })
            .collect();
        (results, text(&out))
    };
    let local = t.scratch.path("pjd-local");
    let (baseline, base_text) = run(s(&local), &t.host);
    let passing: Vec<&String> = baseline
        .iter()
        .filter(|(_, v)| v == "ok")
        .map(|(n, _)| n)
        .collect();
    assert!(passing.len() > 300, "pjdfstest on a local dir: {base_text}");

    for extra in ["", ",writeback", ",direct_io"] {
        let opts = format!("server={},key={}{extra}", t.fs, s(&t.key));
        let out = t.dpu.sh(&format!(
            "mkdir -p /run/pjd && $DPUCTL mount {} /run/pjd -o {opts}",
            s(&t.export)
        ));
        assert!(out.status.success(), "mount -o {opts}: {}", text(&out));
        let suite = format!("/run/pjd/suite{}", extra.replace(',', "-"));
        let (through, through_text) = run(&suite, &t.dpu);
        let _ = t.dpu.sh("umount /run/pjd || umount -l /run/pjd");
        let failed: Vec<&String> = through
            .iter()
            .filter(|(n, v)| v == "FAILED" && passing.contains(&n))
            .map(|(n, _)| n)
            .collect();
        let ok = through.iter().filter(|(_, v)| v == "ok").count();
        eprintln!(
            "pjdfstest: {} ok locally, {ok} ok through qtfs (-o {opts})",
            passing.len()
        );
        assert!(
            failed.is_empty(),
            "failing through qtfs -o {opts} only: {failed:?}\n{through_text}"
        );
        // Only FUSE's unknown LINK_MAX may skip a test that runs locally.
        assert!(
            ok + 2 >= passing.len(),
            "-o {opts}: {ok} of {} ran ok: {through_text}",
            passing.len()
        );
    }
}

/// CPython's own regression tests of file-heavy modules, run with their scratch directory on
/// a local directory and then on a qtfs mount (the DPU side, over the engine): every module
/// must run the same number of tests with the same result and the same skips.
#[test]
fn cpython_file_tests_pass_on_the_mount_as_on_a_local_directory() {
    require_fuse!();
    const PYTHON: &str = "/usr/bin/python3";
    let has_suite = std::process::Command::new(PYTHON)
        .args(["-c", "import test.support, test.test_os"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_suite {
        eprintln!(
            "SKIPPED CPython file tests: {PYTHON} has no test package (scripts/deps.sh installs libpython3.X-testsuite)"
        );
        return;
    }
    // test_largefile is left out: it copies gigabytes, a benchmark rather than a check.
    let modules = "test_os test_shutil test_tempfile test_glob test_pathlib test_fileio \
                   test_posix test_tarfile test_zipfile test_mmap test_fcntl test_sqlite3 \
                   test_mailbox test_dbm test_filecmp test_fileinput test_py_compile";
    // Per module, in order: "Ran N tests" and the verdict line ("OK (skipped=K)", ...).
    let run = |dir: &str, side: &Side| {
        let out = side.sh(&format!(
            "mkdir -p {dir} && cd {dir} && TMPDIR={dir} timeout 900 {PYTHON} -m test -v {modules}"
        ));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = stdout.lines().collect();
        let mut summary = Vec::new();
        for (i, l) in lines.iter().enumerate() {
            if l.starts_with("Ran ") && l.contains(" test") {
                let verdict = lines[i + 1..]
                    .iter()
                    .find(|v| v.starts_with("OK") || v.starts_with("FAILED"))
                    .unwrap_or(&"(no verdict)");
                summary.push(format!(
                    "{} / {verdict}",
                    l.split(" in ").next().unwrap_or(l)
                ));
            }
        }
        let failures: Vec<String> = lines
            .iter()
            .filter(|l| l.ends_with("... FAIL") || l.ends_with("... ERROR"))
            .map(|l| l.to_string())
            .collect();
        (summary, failures, text(&out))
    };
    let t = setup();
    let local = t.scratch.path("py-local");
    let (baseline, base_failures, base_text) = run(s(&local), &t.host);
    let ran = |summary: &[String]| -> usize {
        summary
            .iter()
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
            .sum()
    };
    assert!(
        ran(&baseline) > 1000,
        "CPython tests on a local dir ran too few: {baseline:?}\n{base_text}"
    );
    // Default options, and the kernel's writeback cache, whose times and error paths differ.
    for extra in ["", ",writeback"] {
        let opts = format!("server={},key={}{extra}", t.fs, s(&t.key));
        let out = t.dpu.sh(&format!(
            "mkdir -p /run/py && $DPUCTL mount {} /run/py -o {opts}",
            s(&t.export)
        ));
        assert!(out.status.success(), "mount -o {opts}: {}", text(&out));
        let scratch = format!("/run/py/scratch{}", extra.replace(',', "-"));
        let (through, failures, through_text) = run(&scratch, &t.dpu);
        let _ = t.dpu.sh("umount /run/py || umount -l /run/py");
        eprintln!(
            "CPython file tests: {} run locally, {} through qtfs (-o {opts})",
            ran(&baseline),
            ran(&through)
        );
        let new_failures: Vec<&String> = failures
            .iter()
            .filter(|f| !base_failures.contains(f))
            .collect();
        assert!(
            new_failures.is_empty(),
            "failing through qtfs -o {opts} only: {new_failures:#?}\n{through_text}"
        );
        assert_eq!(
            through, baseline,
            "per module (tests run / verdict) through qtfs -o {opts} vs local\n{through_text}"
        );
    }
}

/// A DPU program reading in a loop while the engine restarts sees a pause, not an error:
/// calls issued during the outage wait for the new engine, and reads that were on their way
/// when the link was lost go to it again.
#[test]
fn reads_in_a_loop_see_no_error_across_an_engine_restart() {
    require_fuse!();
    let mut t = setup();
    std::fs::create_dir_all(t.export.join("d")).unwrap();
    let opts = format!("server={},key={}", t.fs, s(&t.key));
    let out = t.dpu.sh(&format!(
        "mkdir -p /run/m && $DPUCTL mount {} /run/m -o {opts},attr_timeout=0,entry_timeout=0",
        s(&t.export)
    ));
    assert!(out.status.success(), "{}", text(&out));
    let reader = r#"(
        i=0
        while [ ! -e /run/stop ]; do
            cat /run/m/hello.txt > /dev/null || echo "cat failed at $i" >> /run/errs
            stat /run/m/d > /dev/null || echo "stat failed at $i" >> /run/errs
            i=$((i+1))
        done
        echo $i > /run/count
    ) </dev/null >/dev/null 2>&1 &"#;
    assert!(t.dpu.sh(reader).status.success());
    std::thread::sleep(Duration::from_millis(500));
    t.host.stop();
    std::thread::sleep(Duration::from_millis(300));
    t.host = start_engine("host2", &t.scratch, &t.fs, &t.key, &t.whitelist);
    t.dpu
        .wait_status("the mount back", Duration::from_secs(15), |st| {
            mount_of(st)["counters"]["reconnects"] == 1
        });
    std::thread::sleep(Duration::from_millis(500));
    let out = t.dpu.sh(
        "touch /run/stop; for i in $(seq 200); do [ -e /run/count ] && break; sleep 0.05; done; cat /run/count",
    );
    let loops: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("the reader did not finish: {}", text(&out)));
    let errs = std::fs::read_to_string(t.dpu.inside("/run/errs")).unwrap_or_default();
    assert!(errs.is_empty(), "errors across the restart:\n{errs}");
    assert!(loops > 10, "only {loops} rounds");
    let _ = t.dpu.sh("umount /run/m");
}
