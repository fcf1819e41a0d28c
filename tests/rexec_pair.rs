//! rexec between two simulated machines: the HOST runs `rexec_server` on TCP as pid 1 of its
//! own mount+pid namespaces, the DPU side (another pair of namespaces, with its own /run) runs
//! the client — directly and through a wrapper script, as the management plane does.

mod common;

use std::time::Duration;

use common::{free_port, s, text, Scratch, Side};

#[test]
fn dpu_runs_host_programs_through_rexec() {
    require_namespaces!();
    let scratch = Scratch::new();
    let key = scratch.key("psk");
    let port = free_port();
    let host = Side::start(
        "host",
        &scratch,
        &[
            "rexec_server",
            "--listen",
            &format!("tcp://127.0.0.1:{port}"),
            "--key",
            s(&key),
            "--no-whitelist",
        ],
    );
    // The DPU side needs a pid 1 of its own; a Unix-socket rexec_server serves as one.
    let dpu = Side::start("dpu", &scratch, &["rexec_server"]);
    host.wait_status("host rexec_server", Duration::from_secs(10), |st| {
        st["daemons"][0]["name"] == "rexec_server"
    });
    dpu.wait_status("dpu rexec_server", Duration::from_secs(10), |st| {
        st["daemons"][0]["name"] == "rexec_server"
    });
    let env = format!(
        "export CMD_NET_ADDR=tcp://127.0.0.1:{port}; R=\"$DPUCTL rexec --key {}\";",
        s(&key)
    );
    let o = dpu.sh(&format!("{env} $R /bin/sh -c 'exit 7'; echo rc=$?"));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("rc=7"),
        "{}",
        text(&o)
    );

    // A wrapper script named like the HOST binary: same argv, stdio and exit status.
    let wrapper = scratch.write(
        "containerd-shim",
        &format!(
            "#!/bin/sh\nexec $DPUCTL rexec --key {} /bin/sh -c 'printf \"%s|\" \"$@\"; cat; exit 5' containerd-shim \"$@\"\n",
            s(&key)
        ),
    );
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let o = dpu.sh(&format!(
        "{env} echo piped | {} -a 'b c'; echo rc=$?",
        s(&wrapper)
    ));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "-a|b c|piped\nrc=5\n",
        "{}",
        text(&o)
    );

    // SIGTERM to the DPU-side rexec leaves no sleep on the HOST.
    let o = dpu.sh(&format!(
        "{env} $R sleep 4242 & sleep 0.5; kill -TERM $!; wait $!; echo rc=$?"
    ));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("rc=143"),
        "{}",
        text(&o)
    );
    let left = host.wait_no_process("sleep 4242");
    assert!(left.trim().is_empty(), "sleep left on the HOST: {left}");
}
