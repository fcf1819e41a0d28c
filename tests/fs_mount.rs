//! The mount helper's failure path: a mount that cannot connect exits non-zero with one
//! clear line and leaves nothing mounted; refused command lines say what is wrong.

use std::ffi::OsString;
use std::process::ExitCode;

#[test]
fn unreachable_engine_fails_cleanly_in_the_foreground() {
    let mnt = tempfile::tempdir().unwrap();
    let args: Vec<OsString> = [
        "mount.qtfs",
        "/var/lib/docker",
        mnt.path().to_str().unwrap(),
        "-f",
        "-o",
        "server=127.0.0.1:9,rw,_netdev",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    assert_eq!(dpuctl::fs::mount::main(args), ExitCode::FAILURE);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(mnt.path().to_str().unwrap()),
        "nothing may stay mounted"
    );
}

#[test]
fn usage_errors_exit_2() {
    let args: Vec<OsString> = ["mount.qtfs", "/only-one"]
        .iter()
        .map(OsString::from)
        .collect();
    assert_eq!(dpuctl::fs::mount::main(args), ExitCode::from(2));
}

/// Runs the real binary under `name` (a link to it in `dir`), so argv[0] picks the tool.
fn run_as(dir: &std::path::Path, name: &str, args: &[&str]) -> std::process::Output {
    let link = dir.join(name);
    if !link.exists() {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_dpuctl"), &link).unwrap();
    }
    std::process::Command::new(&link)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

/// stderr as its lines; every refusal must be exactly one.
fn one_line(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "one line on stderr: {err:?}");
    err.trim_end().to_string()
}

#[test]
fn option_errors_name_the_option_and_what_is_accepted_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mnt = mnt.to_str().unwrap();
    for (opts, want) in [
        (
            "attr_timeout=abc",
            "mount.qtfs: bad mount option 'attr_timeout=abc': not a duration; use seconds like 1 or 0.5, or 1s/500ms",
        ),
        (
            "server=",
            "mount.qtfs: bad mount option 'server=': needs a value: server=ADDR (HOST:PORT, tcp://HOST:PORT or vsock://CID:PORT)",
        ),
        (
            "writeback,direct_io",
            "mount.qtfs: options writeback and direct_io exclude each other: direct_io bypasses the page cache that writeback keeps, and file times would go stale; choose one",
        ),
    ] {
        let out = run_as(dir.path(), "mount.qtfs", &["/srv/x", mnt, "-o", opts]);
        assert_eq!(out.status.code(), Some(2), "-o {opts}");
        assert_eq!(one_line(&out), want, "-o {opts}");
    }
}

#[test]
fn a_mount_point_that_is_a_file_is_not_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    let out = run_as(
        dir.path(),
        "mount.qtfs",
        &[
            "/srv/x",
            file.to_str().unwrap(),
            "-f",
            "-o",
            "server=127.0.0.1:9",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        one_line(&out),
        format!(
            "mount.qtfs: mount point {} is not a directory",
            file.display()
        )
    );
}

/// `mount -o remount,ro DIR` on a fuse.qtfs mount runs `mount.fuse.qtfs`: it must be the
/// helper, and refuse with mount(8)'s failure status instead of running a program `qtfs`.
#[test]
fn remount_through_mount_fuse_qtfs_is_refused_with_exit_32() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_as(
        dir.path(),
        "mount.fuse.qtfs",
        &[
            "/srv/x",
            "/mnt/x",
            "-o",
            "rw,remount,ro,user_id=0,group_id=0,default_permissions,allow_other",
        ],
    );
    assert_eq!(out.status.code(), Some(32));
    assert_eq!(
        one_line(&out),
        "mount.qtfs: qtfs cannot change the options of a mounted file system: umount /mnt/x, then mount it again with the new options"
    );
}

/// Proc mode with no procfs at `local_proc` would link `self` and local PIDs to nothing:
/// refused before the engine is dialled.
#[test]
fn proc_mode_without_a_local_procfs_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    let not_proc = dir.path().join("lp");
    std::fs::create_dir(&mnt).unwrap();
    std::fs::create_dir(&not_proc).unwrap();
    for (lp, problem) in [
        (not_proc.clone(), "it is not a procfs"),
        (dir.path().join("none"), "it does not exist"),
    ] {
        let opts = format!("proc,local_proc={},server=127.0.0.1:9", lp.display());
        let out = run_as(
            dir.path(),
            "mount.qtfs",
            &["/proc", mnt.to_str().unwrap(), "-f", "-o", &opts],
        );
        assert_eq!(out.status.code(), Some(1), "{lp:?}");
        let lp = lp.display();
        assert_eq!(
            one_line(&out),
            format!("mount.qtfs: proc mode needs the DPU's own procfs at {lp}, but {problem}: mount it there (mkdir -p {lp} && mount -t proc proc {lp}), or use -o local_proc=/proc")
        );
    }
}
