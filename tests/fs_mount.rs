//! The mount helper's failure path: a mount that cannot connect exits non-zero with one
//! clear line and leaves nothing mounted.

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
