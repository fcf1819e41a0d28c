//! Key handling: the allowlist add/delete and session kill flows produce exactly the control
//! requests the daemons expect, refusals stay inline, and the log keys filter and scroll.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use dpuctl::allowlist::ListType;
use dpuctl::daemon::control::Request;
use dpuctl::daemon::logring::LogEvent;
use dpuctl::daemon::status::{DaemonStatus, SessionStatus};
use dpuctl::tui::input::handle_key;
use dpuctl::tui::state::{Effect, InputPurpose, Mode, Notice, State, Update, View};

fn key(code: KeyCode) -> KeyEvent {
    KeyEvent::new(code, KeyModifiers::NONE)
}

fn typed(state: &mut State, text: &str) {
    for c in text.chars() {
        assert!(handle_key(state, key(KeyCode::Char(c))).is_empty());
    }
}

const ENGINE: &str = "/run/h/engine.ctl";
const REXEC: &str = "/run/h/rexec_server.ctl";

fn system() -> State {
    let mut s = State::new(vec![("HOST".into(), "/run/h".into())], false);
    s.apply(
        Update::Dir {
            index: 0,
            result: Ok(vec![
                ("engine".into(), ENGINE.into()),
                ("rexec_server".into(), REXEC.into()),
            ]),
        },
        1,
    );
    let mut allowlists: BTreeMap<String, Vec<String>> = ListType::ALL
        .iter()
        .map(|t| (t.name().to_string(), vec![]))
        .collect();
    allowlists.insert("open".into(), vec!["/srv/a".into(), "/srv/b".into()]);
    let status = |name: &str| DaemonStatus {
        name: name.into(),
        pid: 1,
        control: String::new(),
        version: "0.1.0".into(),
        uptime_secs: 1,
        listen: vec![],
        peers: vec![],
        allowlists: BTreeMap::new(),
        log_level: "info".into(),
        counters: BTreeMap::new(),
        mount: None,
        connections: vec![],
        sessions: vec![],
    };
    let mut engine = status("engine");
    engine.allowlists = allowlists;
    let mut rexec = status("rexec_server");
    rexec.sessions = vec![SessionStatus {
        id: 9,
        argv: vec!["/bin/sleep".into(), "60".into()],
        local_pid: None,
        remote_pid: 777,
        started_unix: 0,
        bytes_in: 0,
        bytes_out: 0,
        peer: String::new(),
    }];
    for (sock, st) in [(ENGINE, engine), (REXEC, rexec)] {
        s.apply(
            Update::Status {
                socket: sock.into(),
                result: Ok(Box::new(st)),
            },
            2,
        );
    }
    s
}

#[test]
fn allowlist_add_sends_the_typed_entry_to_the_selected_daemon() {
    let mut s = system();
    handle_key(&mut s, key(KeyCode::Char('3')));
    assert_eq!(s.view, View::Allowlists);
    // The input starts with the selected row's type.
    handle_key(&mut s, key(KeyCode::Char('a')));
    let Mode::Input(input) = &s.mode else {
        panic!("no input: {:?}", s.mode)
    };
    assert_eq!(input.text, "open ");
    assert!(
        matches!(&input.purpose, InputPurpose::AllowlistAdd { daemon, .. } if daemon == "HOST/engine")
    );
    // Replace the type: backspace over it, then type the whole entry.
    for _ in 0..5 {
        handle_key(&mut s, key(KeyCode::Backspace));
    }
    typed(&mut s, "udsconnect /var/run/docker.sock");
    let effects = handle_key(&mut s, key(KeyCode::Enter));
    assert_eq!(
        effects,
        vec![Effect::Control {
            socket: PathBuf::from(ENGINE),
            request: Request::AllowlistAdd {
                list_type: ListType::Udsconnect,
                path: "/var/run/docker.sock".into(),
                persist: false,
            },
            what: "add /var/run/docker.sock to udsconnect on HOST/engine".into(),
        }]
    );
    assert_eq!(s.mode, Mode::Normal);
    // The daemon's answer (or error) lands in the notice line.
    s.apply(
        Update::Reply {
            what: "add /x to open on HOST/engine".into(),
            result: Err("no such thing: fix it".into()),
        },
        3,
    );
    assert_eq!(
        s.notice,
        Some(Notice::Error(
            "add /x to open on HOST/engine: no such thing: fix it".into()
        ))
    );
}

#[test]
fn a_bad_entry_is_refused_inline_and_the_input_stays_open() {
    let mut s = system();
    s.view = View::Allowlists;
    handle_key(&mut s, key(KeyCode::Char('a')));
    typed(&mut s, "relative/path");
    assert!(handle_key(&mut s, key(KeyCode::Enter)).is_empty());
    let Mode::Input(input) = &s.mode else {
        panic!("input closed")
    };
    assert_eq!(
        input.error.as_deref(),
        Some("'relative/path' is not an absolute path: start it with /")
    );
    // An unknown type says which ones exist.
    for _ in 0..40 {
        handle_key(&mut s, key(KeyCode::Backspace));
    }
    typed(&mut s, "opne /a");
    handle_key(&mut s, key(KeyCode::Enter));
    let Mode::Input(input) = &s.mode else {
        panic!("input closed")
    };
    assert!(input
        .error
        .as_deref()
        .unwrap()
        .contains("unknown allowlist type 'opne'"));
    // Esc abandons it without a request.
    assert!(handle_key(&mut s, key(KeyCode::Esc)).is_empty());
    assert_eq!(s.mode, Mode::Normal);
}

#[test]
fn allowlist_delete_asks_first_and_sends_the_index() {
    let mut s = system();
    s.view = View::Allowlists;
    // Rows: open #0, open #1, write (none), ...: select open #1.
    handle_key(&mut s, key(KeyCode::Down));
    handle_key(&mut s, key(KeyCode::Char('d')));
    let Mode::Confirm(c) = &s.mode else {
        panic!("no confirmation: {:?}", s.mode)
    };
    assert_eq!(c.prompt, "delete /srv/b (#1) from open on HOST/engine? y/n");
    // n cancels.
    assert!(handle_key(&mut s, key(KeyCode::Char('n'))).is_empty());
    assert_eq!(s.notice, Some(Notice::Info("cancelled".into())));
    handle_key(&mut s, key(KeyCode::Char('d')));
    let effects = handle_key(&mut s, key(KeyCode::Char('y')));
    assert_eq!(
        effects,
        vec![Effect::Control {
            socket: PathBuf::from(ENGINE),
            request: Request::AllowlistDelete {
                list_type: ListType::Open,
                index: 1,
                persist: false,
            },
            what: "delete /srv/b from open on HOST/engine".into(),
        }]
    );
    // A type without entries has nothing to delete.
    handle_key(&mut s, key(KeyCode::Down));
    assert!(handle_key(&mut s, key(KeyCode::Char('d'))).is_empty());
    assert_eq!(
        s.notice,
        Some(Notice::Error(
            "write has no entries: select an entry to delete".into()
        ))
    );
}

#[test]
fn session_kill_is_confirmed_and_sends_sigterm() {
    let mut s = system();
    handle_key(&mut s, key(KeyCode::Char('4')));
    handle_key(&mut s, key(KeyCode::Char('k')));
    let effects = handle_key(&mut s, key(KeyCode::Enter));
    assert_eq!(
        effects,
        vec![Effect::Control {
            socket: PathBuf::from(REXEC),
            request: Request::SessionKill {
                id: 9,
                signal: libc::SIGTERM
            },
            what: "kill session 9 on HOST/rexec_server".into(),
        }]
    );
    // `k` means nothing outside that view.
    s.view = View::Overview;
    assert!(handle_key(&mut s, key(KeyCode::Char('k'))).is_empty());
    assert_eq!(s.mode, Mode::Normal);
}

#[test]
fn views_help_and_quit() {
    let mut s = system();
    handle_key(&mut s, key(KeyCode::Tab));
    assert_eq!(s.view, View::Mounts);
    handle_key(&mut s, key(KeyCode::BackTab));
    handle_key(&mut s, key(KeyCode::BackTab));
    assert_eq!(s.view, View::Logs);
    handle_key(&mut s, key(KeyCode::Char('?')));
    assert_eq!(s.mode, Mode::Help);
    // Any key closes the help without acting.
    assert!(handle_key(&mut s, key(KeyCode::Char('1'))).is_empty());
    assert_eq!((s.mode.clone(), s.view), (Mode::Normal, View::Logs));
    assert_eq!(
        handle_key(&mut s, key(KeyCode::Char('q'))),
        vec![Effect::Quit]
    );
    let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
    s.view = View::Allowlists;
    handle_key(&mut s, key(KeyCode::Char('a')));
    assert_eq!(
        handle_key(&mut s, ctrl_c),
        vec![Effect::Quit],
        "Ctrl-C quits even while typing"
    );
}

#[test]
fn log_keys_pause_filter_and_search() {
    let mut s = system();
    let events = (0..30)
        .map(|i| {
            (
                "HOST".to_string(),
                LogEvent {
                    ts_ms: i,
                    level: if i % 10 == 0 { "error" } else { "info" }.into(),
                    daemon: if i % 2 == 0 { "engine" } else { "rexec_server" }.into(),
                    target: "t".into(),
                    message: format!("event {i}"),
                    fields: Default::default(),
                },
            )
        })
        .collect();
    s.apply(Update::Logs(events), 5);
    s.view = View::Logs;
    handle_key(&mut s, key(KeyCode::Char(' ')));
    assert!(!s.logs.follow);
    handle_key(&mut s, key(KeyCode::Char(' ')));
    assert!(s.logs.follow);
    handle_key(&mut s, key(KeyCode::PageUp));
    assert!(!s.logs.follow, "scrolling up pauses");
    assert_eq!(s.logs.visible(1).0[0].text, "event 19");
    handle_key(&mut s, key(KeyCode::End));
    assert!(s.logs.follow, "End resumes following");
    handle_key(&mut s, key(KeyCode::Char('l')));
    assert_eq!(s.logs.min_rank, Some(1));
    assert_eq!(s.logs.visible(100).0.len(), 3, "errors only");
    for _ in 0..4 {
        handle_key(&mut s, key(KeyCode::Char('l')));
    }
    assert_eq!(s.logs.min_rank, None, "the level filter cycles back to all");
    handle_key(&mut s, key(KeyCode::Char('f')));
    assert_eq!(s.logs.source.as_deref(), Some("HOST/engine"));
    handle_key(&mut s, key(KeyCode::Char('/')));
    typed(&mut s, "event 2");
    handle_key(&mut s, key(KeyCode::Enter));
    let shown: Vec<_> = s
        .logs
        .visible(100)
        .0
        .iter()
        .map(|l| l.text.clone())
        .collect();
    assert_eq!(
        shown,
        ["event 2", "event 20", "event 22", "event 24", "event 26", "event 28"]
    );
}
