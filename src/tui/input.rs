//! Keys: the key map as data ([`BINDINGS`], which the `?` overlay renders) and
//! [`handle_key`], which turns one key press into model changes and [`Effect`]s.
//!
//! Concurrency: none; called by the UI loop with the model it owns. Pure apart from the
//! model, so every flow (allowlist add/delete, session kill, log search) is unit-tested by
//! feeding keys and checking the effects.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::state::{level_name, Confirm, Effect, Input, InputPurpose, Mode, Notice, State, View};
use crate::allowlist::ListType;
use crate::daemon::control::Request;

/// What a key does in normal mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Quit,
    NextView,
    PrevView,
    Go(View),
    Help,
    Up,
    Down,
    PageUp,
    PageDown,
    Top,
    Bottom,
    PrevDaemon,
    NextDaemon,
    Add,
    Delete,
    Kill,
    Follow,
    Level,
    Source,
    Search,
}

/// Where a binding applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Global,
    Only(View),
}

/// One key binding: the keys, how the help names them, where it applies, what it does.
#[derive(Debug, Clone, Copy)]
pub struct Binding {
    pub keys: &'static [KeyCode],
    pub label: &'static str,
    pub scope: Scope,
    pub action: Action,
    pub help: &'static str,
    /// The footer hint of a view-specific key (one or two words).
    pub hint: &'static str,
}

const fn b(
    keys: &'static [KeyCode],
    label: &'static str,
    scope: Scope,
    action: Action,
    help: &'static str,
) -> Binding {
    Binding {
        keys,
        label,
        scope,
        action,
        help,
        hint: "",
    }
}

const fn v(
    keys: &'static [KeyCode],
    label: &'static str,
    view: View,
    action: Action,
    help: &'static str,
    hint: &'static str,
) -> Binding {
    Binding {
        keys,
        label,
        scope: Scope::Only(view),
        action,
        help,
        hint,
    }
}

/// Every key of the dashboard. View-specific bindings come before global ones with the same
/// key, so the first match wins.
#[rustfmt::skip]
pub const BINDINGS: &[Binding] = &[
    v(&[KeyCode::Char('a')], "a", View::Allowlists, Action::Add, "add an entry: type TYPE PATH, Enter", "add"),
    v(&[KeyCode::Char('d')], "d", View::Allowlists, Action::Delete, "delete the selected entry (asks y/n)", "delete"),
    v(&[KeyCode::Left, KeyCode::Char('[')], "← [", View::Allowlists, Action::PrevDaemon, "previous daemon's allowlists", ""),
    v(&[KeyCode::Right, KeyCode::Char(']')], "→ ]", View::Allowlists, Action::NextDaemon, "next daemon's allowlists", "daemon"),
    v(&[KeyCode::Char('k')], "k", View::Uds, Action::Kill, "kill the selected rexec session (asks y/n)", "kill"),
    v(&[KeyCode::Char(' ')], "space", View::Logs, Action::Follow, "follow / pause", "follow/pause"),
    v(&[KeyCode::Char('l')], "l", View::Logs, Action::Level, "cycle the level filter (all, error, warn, info, debug)", "level"),
    v(&[KeyCode::Char('f')], "f", View::Logs, Action::Source, "cycle the daemon filter", "daemon"),
    v(&[KeyCode::Char('/')], "/", View::Logs, Action::Search, "search (Enter applies, empty clears)", "search"),
    b(&[KeyCode::Char('1')], "1", Scope::Global, Action::Go(View::Overview), "Overview: daemons, links, throughput"),
    b(&[KeyCode::Char('2')], "2", Scope::Global, Action::Go(View::Mounts), "Mounts: qtfs mounts, per-operation counters"),
    b(&[KeyCode::Char('3')], "3", Scope::Global, Action::Go(View::Allowlists), "Allowlists: view, add, delete"),
    b(&[KeyCode::Char('4')], "4", Scope::Global, Action::Go(View::Uds), "UDS/rexec: proxied sockets, rexec sessions"),
    b(&[KeyCode::Char('5')], "5", Scope::Global, Action::Go(View::Logs), "Logs: all daemons, merged"),
    b(&[KeyCode::Tab], "Tab", Scope::Global, Action::NextView, "next view"),
    b(&[KeyCode::BackTab], "S-Tab", Scope::Global, Action::PrevView, "previous view"),
    b(&[KeyCode::Up], "↑", Scope::Global, Action::Up, "select / scroll up"),
    b(&[KeyCode::Down], "↓", Scope::Global, Action::Down, "select / scroll down"),
    b(&[KeyCode::PageUp], "PgUp", Scope::Global, Action::PageUp, "page up"),
    b(&[KeyCode::PageDown], "PgDn", Scope::Global, Action::PageDown, "page down"),
    b(&[KeyCode::Home], "Home", Scope::Global, Action::Top, "first row / oldest log line"),
    b(&[KeyCode::End], "End", Scope::Global, Action::Bottom, "last row / newest log line (follow)"),
    b(&[KeyCode::Char('?')], "?", Scope::Global, Action::Help, "this help"),
    b(&[KeyCode::Char('q')], "q", Scope::Global, Action::Quit, "quit (also Ctrl-C)"),
];

/// Rows a page key moves.
pub const PAGE: usize = 10;

/// The action `code` triggers in `view`, if any.
pub fn action_for(view: View, code: KeyCode) -> Option<Action> {
    BINDINGS
        .iter()
        .find(|b| {
            b.keys.contains(&code) && (b.scope == Scope::Global || b.scope == Scope::Only(view))
        })
        .map(|b| b.action)
}

/// Handles one key press; returns what the loop must do.
pub fn handle_key(state: &mut State, key: KeyEvent) -> Vec<Effect> {
    if key.modifiers.contains(KeyModifiers::CONTROL)
        && matches!(key.code, KeyCode::Char('c') | KeyCode::Char('d'))
    {
        return vec![Effect::Quit];
    }
    match std::mem::replace(&mut state.mode, Mode::Normal) {
        Mode::Help => {
            // Any key closes the help; q also quits, as everywhere else.
            if key.code == KeyCode::Char('q') {
                return vec![Effect::Quit];
            }
            Vec::new()
        }
        Mode::Confirm(confirm) => match key.code {
            KeyCode::Char('y') | KeyCode::Char('Y') | KeyCode::Enter => vec![confirm.effect],
            _ => {
                state.notice = Some(Notice::Info("cancelled".into()));
                Vec::new()
            }
        },
        Mode::Input(input) => input_key(state, input, key),
        Mode::Normal => match action_for(state.view, key.code) {
            Some(action) => act(state, action),
            None => Vec::new(),
        },
    }
}

/// A key while an input line is open.
fn input_key(state: &mut State, mut input: Input, key: KeyEvent) -> Vec<Effect> {
    match key.code {
        KeyCode::Esc => {
            return Vec::new();
        }
        KeyCode::Backspace => {
            input.text.pop();
        }
        KeyCode::Char(c) => input.text.push(c),
        KeyCode::Enter => return submit(state, input),
        _ => {}
    }
    input.error = None;
    state.mode = Mode::Input(input);
    Vec::new()
}

/// Submits an input line: a search applies at once; an allowlist entry becomes a request,
/// or the input stays open with the reason it was refused.
fn submit(state: &mut State, mut input: Input) -> Vec<Effect> {
    match &input.purpose {
        InputPurpose::Search => {
            let text = input.text.trim();
            state.logs.search = (!text.is_empty()).then(|| text.to_owned());
            state.logs.follow = true;
            state.logs.offset = 0;
            Vec::new()
        }
        InputPurpose::AllowlistAdd { socket, daemon } => match parse_add(&input.text) {
            Ok((list_type, path)) => vec![Effect::Control {
                socket: socket.clone(),
                what: format!("add {path} to {list_type} on {daemon}"),
                request: Request::AllowlistAdd {
                    list_type,
                    path,
                    persist: false,
                },
            }],
            Err(e) => {
                input.error = Some(e);
                state.mode = Mode::Input(input);
                Vec::new()
            }
        },
    }
}

/// Parses `TYPE PATH` of the allowlist add input.
pub fn parse_add(text: &str) -> Result<(ListType, String), String> {
    let text = text.trim();
    let (t, path) = text
        .split_once(char::is_whitespace)
        .ok_or_else(|| "type TYPE PATH, e.g. udsconnect /var/run/docker.sock".to_owned())?;
    let list_type: ListType = t
        .parse()
        .map_err(|e: crate::allowlist::UnknownListType| e.to_string())?;
    let path = path.trim();
    if !path.starts_with('/') {
        return Err(format!("'{path}' is not an absolute path: start it with /"));
    }
    Ok((list_type, path.to_owned()))
}

fn act(state: &mut State, action: Action) -> Vec<Effect> {
    match action {
        Action::Quit => return vec![Effect::Quit],
        Action::NextView => state.view = state.view.next(),
        Action::PrevView => state.view = state.view.prev(),
        Action::Go(v) => state.view = v,
        Action::Help => state.mode = Mode::Help,
        Action::Up => move_by(state, -1),
        Action::Down => move_by(state, 1),
        Action::PageUp => move_by(state, -(PAGE as isize)),
        Action::PageDown => move_by(state, PAGE as isize),
        Action::Top => move_by(state, isize::MIN / 2),
        Action::Bottom => move_by(state, isize::MAX / 2),
        Action::PrevDaemon | Action::NextDaemon => {
            let n = state.allowlist_daemons().len();
            if n > 0 {
                let cur = state.selection.allow_daemon;
                state.selection.allow_daemon = if action == Action::NextDaemon {
                    (cur + 1) % n
                } else {
                    (cur + n - 1) % n
                };
                state.selection.allow_row = 0;
            }
        }
        Action::Add => {
            let target = state
                .allowlist_daemons()
                .get(state.selection.allow_daemon)
                .map(|d| (d.socket.clone(), d.label(), State::allowlist_rows(d)));
            match target {
                None => {
                    state.notice = Some(Notice::Error(
                        "no daemon with allowlists answers: start the engine or udsproxyd".into(),
                    ))
                }
                Some((socket, daemon, rows)) => {
                    let prefill = rows
                        .get(state.selection.allow_row)
                        .map(|(t, _)| format!("{t} "))
                        .unwrap_or_default();
                    state.mode = Mode::Input(Input {
                        purpose: InputPurpose::AllowlistAdd { socket, daemon },
                        text: prefill,
                        error: None,
                    });
                }
            }
        }
        Action::Delete => {
            let target = state
                .allowlist_daemons()
                .get(state.selection.allow_daemon)
                .map(|d| (d.socket.clone(), d.label(), State::allowlist_rows(d)));
            let Some((socket, daemon, rows)) = target else {
                state.notice = Some(Notice::Error("no daemon with allowlists answers".into()));
                return Vec::new();
            };
            match rows.get(state.selection.allow_row) {
                Some((t, Some((index, path)))) => {
                    state.mode = Mode::Confirm(Confirm {
                        prompt: format!("delete {path} (#{index}) from {t} on {daemon}? y/n"),
                        effect: Effect::Control {
                            socket,
                            what: format!("delete {path} from {t} on {daemon}"),
                            request: Request::AllowlistDelete {
                                list_type: *t,
                                index: *index,
                                persist: false,
                            },
                        },
                    });
                }
                Some((t, None)) => {
                    state.notice = Some(Notice::Error(format!(
                        "{t} has no entries: select an entry to delete"
                    )))
                }
                None => {}
            }
        }
        Action::Kill => {
            let target = state.sessions().get(state.selection.session).map(|(d, s)| {
                (
                    d.socket.clone(),
                    d.label(),
                    s.id,
                    s.argv.join(" "),
                    s.remote_pid,
                )
            });
            match target {
                Some((socket, daemon, id, argv, pid)) => {
                    state.mode = Mode::Confirm(Confirm {
                        prompt: format!(
                            "kill session {id} ({argv}, pid {pid}) on {daemon} with SIGTERM? y/n"
                        ),
                        effect: Effect::Control {
                            socket,
                            what: format!("kill session {id} on {daemon}"),
                            request: Request::SessionKill {
                                id,
                                signal: libc::SIGTERM,
                            },
                        },
                    });
                }
                None => state.notice = Some(Notice::Error("no rexec session is running".into())),
            }
        }
        Action::Follow => {
            state.logs.follow = !state.logs.follow;
            state.logs.offset = 0;
        }
        Action::Level => {
            state.logs.min_rank = match state.logs.min_rank {
                None => Some(1),
                Some(r) if r < 4 => Some(r + 1),
                Some(_) => None,
            };
            state.notice = Some(Notice::Info(format!(
                "log level filter: {}",
                state.logs.min_rank.map_or("all", level_name)
            )));
        }
        Action::Source => {
            let sources = state.logs.sources();
            state.logs.source = match &state.logs.source {
                None => sources.first().cloned(),
                Some(cur) => sources
                    .iter()
                    .position(|s| s == cur)
                    .and_then(|i| sources.get(i + 1))
                    .cloned(),
            };
            state.notice = Some(Notice::Info(format!(
                "log daemon filter: {}",
                state.logs.source.as_deref().unwrap_or("all")
            )));
        }
        Action::Search => {
            state.mode = Mode::Input(Input {
                purpose: InputPurpose::Search,
                text: state.logs.search.clone().unwrap_or_default(),
                error: None,
            })
        }
    }
    Vec::new()
}

/// Moves the current view's selection (or log scroll) by `delta` rows.
fn move_by(state: &mut State, delta: isize) {
    let step = |v: usize, len: usize| -> usize {
        let max = len.saturating_sub(1) as isize;
        (v as isize).saturating_add(delta).clamp(0, max.max(0)) as usize
    };
    match state.view {
        View::Overview => {
            let n = state.daemons.len();
            state.selection.daemon = step(state.selection.daemon, n);
        }
        View::Mounts => {
            let n = state.mounts().len();
            state.selection.mount = step(state.selection.mount, n);
        }
        View::Allowlists => {
            let n = state
                .allowlist_daemons()
                .get(state.selection.allow_daemon)
                .map(|d| State::allowlist_rows(d).len())
                .unwrap_or(0);
            state.selection.allow_row = step(state.selection.allow_row, n);
        }
        View::Uds => {
            let n = state.sessions().len();
            state.selection.session = step(state.selection.session, n);
        }
        View::Logs => {
            if delta < 0 {
                state.logs.scroll_up(delta.unsigned_abs());
            } else {
                state.logs.scroll_down(delta.unsigned_abs());
            }
        }
    }
}
