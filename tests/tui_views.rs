//! The dashboard's views drawn with ratatui's TestBackend for representative states: a full
//! HOST+DPU system, an unreachable daemon, an empty system, and the 80x24 minimum. Each
//! screen is compared with a text snapshot in tests/snapshots/ (regenerate with
//! `UPDATE_SNAPSHOTS=1 cargo test --test tui_views` and review the diff) and checked for the
//! concrete content an operator relies on.

use std::collections::BTreeMap;
use std::path::PathBuf;

use dpuctl::daemon::logring::LogEvent;
use dpuctl::daemon::status::{
    ConnectionStatus, DaemonStatus, MountStatus, OpStats, PeerState, PeerStatus, SessionStatus,
};
use dpuctl::tui::state::{Mode, State, Update, View};
use ratatui::backend::TestBackend;
use ratatui::Terminal;

/// A fixed "now" (2026-11-22 18:00:00 UTC) so ages and clocks are stable.
const NOW_MS: u64 = 1_795_370_400_000;

fn screen(state: &State, width: u16, height: u16) -> String {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("test terminal");
    terminal
        .draw(|f| dpuctl::tui::view::draw(f, state))
        .expect("draw");
    let buffer = terminal.backend().buffer();
    let mut out = String::new();
    for y in 0..height {
        let mut line = String::new();
        for x in 0..width {
            line.push_str(buffer[(x, y)].symbol());
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Compares `text` with tests/snapshots/NAME.txt (or writes it with UPDATE_SNAPSHOTS=1).
fn snapshot(name: &str, text: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run UPDATE_SNAPSHOTS=1 cargo test --test tui_views\nscreen:\n{text}",
            path.display()
        )
    });
    assert_eq!(
        text,
        expected,
        "screen differs from {} (UPDATE_SNAPSHOTS=1 regenerates it)\nscreen:\n{text}",
        path.display()
    );
}

fn peer(address: &str, role: &str, state: PeerState, bytes: u64) -> PeerStatus {
    PeerStatus {
        address: address.into(),
        state,
        bytes_in: bytes,
        bytes_out: bytes / 2,
        role: Some(role.into()),
        rtt_us: Some(180),
        since_secs: 30,
        last_error: None,
    }
}

fn base(name: &str, pid: u32, control: &str) -> DaemonStatus {
    DaemonStatus {
        name: name.into(),
        pid,
        control: control.into(),
        version: "0.1.0".into(),
        uptime_secs: 754,
        listen: vec![],
        peers: vec![],
        allowlists: BTreeMap::new(),
        log_level: "info".into(),
        counters: BTreeMap::new(),
        mount: None,
        connections: vec![],
        sessions: vec![],
    }
}

fn lists(entries: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = dpuctl::allowlist::ListType::ALL
        .iter()
        .map(|t| (t.name().to_string(), Vec::new()))
        .collect();
    for (t, paths) in entries {
        m.insert(t.to_string(), paths.iter().map(|p| p.to_string()).collect());
    }
    m
}

const HOST: &str = "/tmp/demo/host/run";
const DPU: &str = "/tmp/demo/dpu/run";

fn sock(dir: &str, name: &str) -> PathBuf {
    PathBuf::from(format!("{dir}/{name}.ctl"))
}

/// A whole HOST+DPU system: engine, rexec_server; udsproxyd and one mount; logs.
fn full_system() -> State {
    let mut s = State::new(
        vec![("HOST".into(), HOST.into()), ("DPU".into(), DPU.into())],
        false,
    );
    s.apply(
        Update::Dir {
            index: 0,
            result: Ok(vec![
                ("engine".into(), sock(HOST, "engine")),
                ("rexec_server".into(), sock(HOST, "rexec_server")),
            ]),
        },
        NOW_MS,
    );
    s.apply(
        Update::Dir {
            index: 1,
            result: Ok(vec![
                ("udsproxyd".into(), sock(DPU, "udsproxyd")),
                ("mount-4242".into(), sock(DPU, "mount-4242")),
            ]),
        },
        NOW_MS,
    );
    let mut engine = base("engine", 101, &sock(HOST, "engine").display().to_string());
    engine.listen = vec!["tcp://127.0.0.1:12345".into()];
    engine.peers = vec![
        peer(
            "tcp://127.0.0.1:12121",
            "udsproxyd",
            PeerState::Connected,
            4096,
        ),
        peer(
            "tcp://127.0.0.1:50210",
            "mount",
            PeerState::Connected,
            2 << 20,
        ),
    ];
    engine.allowlists = lists(&[
        ("mount", &["/tmp/demo/export"]),
        (
            "udsconnect",
            &["/run/demo-echo.sock", "/var/run/docker.sock"],
        ),
    ]);
    let mut rexec = base("rexec_server", 102, "");
    rexec.sessions = vec![SessionStatus {
        id: 7,
        argv: vec!["/bin/sleep".into(), "3600".into()],
        local_pid: Some(5151),
        remote_pid: 6161,
        started_unix: NOW_MS / 1000 - 95,
        bytes_in: 0,
        bytes_out: 12,
        peer: "tcp://127.0.0.1:40000".into(),
    }];
    let mut uds = base("udsproxyd", 201, "");
    uds.peers = vec![peer(
        "tcp://127.0.0.1:43000",
        "engine",
        PeerState::Connected,
        8192,
    )];
    uds.allowlists = lists(&[("udsconnect", &["/run/demo-echo.sock"])]);
    uds.connections = vec![ConnectionStatus {
        id: 1,
        path: "/run/demo-echo.sock".into(),
        kind: "stream".into(),
        direction: "outbound".into(),
        bytes_in: 700,
        bytes_out: 700,
        age_secs: 70,
    }];
    let mut mount = base("mount", 4242, "");
    mount.peers = vec![peer(
        "tcp://127.0.0.1:12345",
        "engine",
        PeerState::Connected,
        2 << 20,
    )];
    mount.mount = Some(Box::new(MountStatus {
        remote: "/tmp/demo/export".into(),
        local: "/run/demo-mnt".into(),
        options: "server=tcp://127.0.0.1:12345,key=/tmp/demo/psk".into(),
        state: "mounted".into(),
        ops: BTreeMap::from([
            (
                "lookup".to_string(),
                OpStats {
                    count: 1200,
                    errors: 3,
                    p50_us: 95,
                    p99_us: 1_400,
                },
            ),
            (
                "write".to_string(),
                OpStats {
                    count: 60,
                    errors: 0,
                    p50_us: 210,
                    p99_us: 2_500,
                },
            ),
        ]),
    }));
    // Two polls a second apart, so the rates are known.
    for (i, at) in [NOW_MS - 1000, NOW_MS].into_iter().enumerate() {
        let grow = |mut st: DaemonStatus| {
            for p in &mut st.peers {
                p.bytes_in += i as u64 * 2048;
                p.bytes_out += i as u64 * 1024;
            }
            if let Some(m) = st.mount.as_mut() {
                m.ops.get_mut("lookup").unwrap().count += i as u64 * 40;
            }
            Box::new(st)
        };
        for (dir, name, st) in [
            (HOST, "engine", &engine),
            (HOST, "rexec_server", &rexec),
            (DPU, "udsproxyd", &uds),
            (DPU, "mount-4242", &mount),
        ] {
            s.apply(
                Update::Status {
                    socket: sock(dir, name),
                    result: Ok(grow(st.clone())),
                },
                at,
            );
        }
    }
    let ev = |ts: u64, level: &str, daemon: &str, msg: &str| LogEvent {
        ts_ms: ts,
        level: level.into(),
        daemon: daemon.into(),
        target: "dpuctl".into(),
        message: msg.into(),
        fields: serde_json::Map::from_iter([(
            "peer".to_string(),
            serde_json::Value::from("tcp://127.0.0.1:43000"),
        )]),
    };
    s.apply(
        Update::Logs(vec![
            (
                "HOST".into(),
                ev(NOW_MS - 3000, "info", "engine", "client connected"),
            ),
            (
                "DPU".into(),
                ev(NOW_MS - 2000, "warn", "udsproxyd", "peer slow"),
            ),
            (
                "HOST".into(),
                ev(NOW_MS - 1000, "error", "engine", "handshake refused"),
            ),
        ]),
        NOW_MS,
    );
    s.now_ms = NOW_MS;
    s
}

#[test]
fn overview_of_a_full_system() {
    let s = full_system();
    let text = screen(&s, 120, 30);
    snapshot("overview_full_120x30", &text);
    for want in [
        "1 Overview",
        "4 up, 0 down",
        "HOST=/tmp/demo/host/run DPU=/tmp/demo/dpu/run",
        "127.0.0.1:12121 +1",
        "connected",
        "180us",
        "12m34s",
        "2.0K/s",
    ] {
        assert!(text.contains(want), "missing {want:?}:\n{text}");
    }
    let engine_row = text
        .lines()
        .find(|l| l.contains("engine") && l.contains("HOST"))
        .unwrap();
    assert!(
        engine_row.contains("101") && engine_row.contains("up"),
        "{engine_row}"
    );
    // The mount reports operations: its request rate is known (40 lookups in a second).
    let mount_row = text.lines().find(|l| l.contains("mount-4242")).unwrap();
    assert!(mount_row.contains("  40 "), "{mount_row}");
}

#[test]
fn an_unreachable_daemon_is_marked_and_keeps_its_last_figures_as_stale() {
    let mut s = full_system();
    s.apply(
        Update::Status {
            socket: sock(DPU, "udsproxyd"),
            result: Err(format!(
                "stale control socket {}: the daemon is not running",
                sock(DPU, "udsproxyd").display()
            )),
        },
        NOW_MS - 3000,
    );
    s.selection.daemon = s
        .daemons
        .iter()
        .position(|d| d.name == "udsproxyd")
        .unwrap();
    s.now_ms = NOW_MS;
    let text = screen(&s, 120, 30);
    snapshot("overview_unreachable_120x30", &text);
    assert!(text.contains("3 up, 1 down"), "{text}");
    let row = text
        .lines()
        .find(|l| l.contains("udsproxyd") && l.contains("DPU"))
        .unwrap();
    assert!(row.contains("UNREACHABLE"), "{row}");
    assert!(
        !row.contains("connected"),
        "no live link state for a dead daemon: {row}"
    );
    assert!(
        text.contains("unreachable for 3s: stale control socket"),
        "{text}"
    );
    assert!(text.contains("figures below are the last answer (stale)"));
}

#[test]
fn an_empty_system_says_where_it_looked() {
    let mut s = State::new(vec![("local".into(), "/var/run/qtfs".into())], false);
    s.apply(
        Update::Dir {
            index: 0,
            result: Ok(vec![]),
        },
        NOW_MS,
    );
    let text = screen(&s, 80, 24);
    snapshot("overview_empty_80x24", &text);
    assert!(text.contains("no dpuctl daemons found"));
    assert!(text.contains("local: no control sockets (*.ctl) in /var/run/qtfs"));
    // The other views say what is absent too, instead of drawing empty tables.
    for (view, want) in [
        (View::Mounts, "no qtfs mounts registered"),
        (View::Allowlists, "no daemon reports allowlists"),
        (View::Uds, "no rexec_server registered"),
        (View::Logs, "no log events yet"),
    ] {
        s.view = view;
        let text = screen(&s, 80, 24);
        assert!(text.contains(want), "{view:?}: {text}");
    }
    // An unreadable directory is an error with its reason.
    s.view = View::Overview;
    s.apply(
        Update::Dir {
            index: 0,
            result: Err("cannot read it: Permission denied".into()),
        },
        NOW_MS,
    );
    assert!(screen(&s, 80, 24).contains("/var/run/qtfs: cannot read it: Permission denied"));
}

#[test]
fn every_view_fits_80x24() {
    let mut s = full_system();
    for view in View::ALL {
        s.view = view;
        let text = screen(&s, 80, 24);
        snapshot(
            &format!("{}_80x24", view.title().replace('/', "_").to_lowercase()),
            &text,
        );
        // The tab bar and the footer are always there.
        assert!(text.lines().next().unwrap().contains("5 Logs"), "{text}");
        assert!(
            text.lines().nth(23).unwrap().contains("q quit"),
            "{view:?}:\n{text}"
        );
    }
    s.view = View::Mounts;
    let text = screen(&s, 80, 24);
    assert!(text.contains("/tmp/demo/export") && text.contains("/run/demo-mnt"));
    assert!(text.contains("mounted"));
    let lookup = text.lines().find(|l| l.contains("lookup")).unwrap();
    assert!(
        lookup.contains("1240") && lookup.contains("95us") && lookup.contains("1.4ms"),
        "{lookup}"
    );

    s.view = View::Allowlists;
    let text = screen(&s, 80, 24);
    assert!(text.contains("allowlists of HOST/engine (1 of 2"), "{text}");
    let row = text
        .lines()
        .find(|l| l.contains("/var/run/docker.sock"))
        .unwrap();
    assert!(row.contains("udsconnect") && row.contains(" 1 "), "{row}");
    assert!(text.contains("(none)"));

    s.view = View::Uds;
    let text = screen(&s, 80, 24);
    assert!(text.contains("/run/demo-echo.sock") && text.contains("outbound"));
    let session = text
        .lines()
        .find(|l| l.contains("/bin/sleep 3600"))
        .unwrap();
    assert!(
        session.contains("6161") && session.contains("1m35s"),
        "{session}"
    );

    s.view = View::Logs;
    let text = screen(&s, 80, 24);
    assert!(text.contains("logs: following"));
    let err = text
        .lines()
        .find(|l| l.contains("handshake refused"))
        .unwrap();
    assert!(
        err.contains("ERROR") && err.contains("HOST/engine") && err.contains("17:59:59.000"),
        "{err}"
    );
}

#[test]
fn help_lists_every_key_and_inline_prompts_show_in_the_footer() {
    let mut s = full_system();
    s.mode = Mode::Help;
    let text = screen(&s, 100, 40);
    snapshot("help_100x40", &text);
    for b in dpuctl::tui::input::BINDINGS {
        assert!(text.contains(b.help), "help lacks {:?}:\n{text}", b.help);
    }
    s.mode = Mode::Normal;
    s.view = View::Allowlists;
    s.notice = Some(dpuctl::tui::state::Notice::Error(
        "add x to open on HOST/engine: 'x' is not an absolute path".into(),
    ));
    let text = screen(&s, 80, 24);
    assert!(text
        .lines()
        .nth(23)
        .unwrap()
        .contains("'x' is not an absolute path"));
}

#[test]
fn colours_mark_state_unless_disabled() {
    let mut s = full_system();
    s.apply(
        Update::Status {
            socket: sock(DPU, "udsproxyd"),
            result: Err("no daemon".into()),
        },
        NOW_MS,
    );
    let red_cells = |s: &State| {
        let mut t = Terminal::new(TestBackend::new(120, 30)).unwrap();
        t.draw(|f| dpuctl::tui::view::draw(f, s)).unwrap();
        t.backend()
            .buffer()
            .content()
            .iter()
            .filter(|c| c.fg == ratatui::style::Color::Red)
            .count()
    };
    assert_eq!(red_cells(&s), 0, "--no-color draws no colour");
    s.color = true;
    assert!(red_cells(&s) > 0, "an unreachable daemon is red");
}

#[test]
fn a_long_banner_wraps_onto_a_second_line() {
    let mut s = full_system();
    s.banner = Some(format!(
        "demo 8s | {} | the end",
        "word ".repeat(20).trim_end()
    ));
    let text = screen(&s, 80, 24);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[1].starts_with("demo 8s | word"), "{text}");
    assert!(lines[2].contains("the end"), "{text}");
    assert!(lines[3].contains("daemons in"), "{text}");
}

#[test]
fn tiny_terminals_do_not_break_drawing() {
    // Below 80x24 the layout is cramped, but drawing must never panic (a resize can pass
    // through any size).
    let mut s = full_system();
    s.banner = Some("demo status line".into());
    for (w, h) in [(1, 1), (10, 3), (40, 10), (79, 23)] {
        for view in View::ALL {
            s.view = view;
            for mode in [Mode::Normal, Mode::Help] {
                s.mode = mode;
                let text = screen(&s, w, h);
                assert_eq!(text.lines().count(), h as usize);
            }
        }
    }
}
