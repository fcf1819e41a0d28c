//! `dpuctl tui`: the live dashboard of the local dpuctl daemons — their links, mounts,
//! allowlists, proxied sockets, rexec sessions and logs — with allowlist edits and session
//! kills applied through the control sockets.
//!
//! Layout (after the ratatui component pattern): [`state`] is the model and its pure
//! `apply`; [`input`] maps keys (a data table, also rendered as the `?` help) to model
//! changes and effects; [`view`] draws the model; [`poll`] holds the collectors that talk to
//! the daemons; [`term`] owns the terminal. [`run`] is the loop tying them together.
//!
//! Concurrency: a single UI task owns the model and the terminal. Collectors run as their own
//! tasks and only send updates through bounded channels. The loop wakes for a key, a resize,
//! a collector update, a signal or a 250 ms tick; it redraws at once after a key or resize,
//! and after data changes at the next tick only (at most 4 Hz), draining every queued log
//! event in one batch first. So a flood of 10,000 events/s costs one batch per frame, an idle
//! dashboard wakes a few times a second, and a dead daemon never blocks anything.

pub mod input;
pub mod poll;
pub mod state;
pub mod term;
pub mod view;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use crossterm::event::{Event, EventStream, KeyEventKind};
use futures::StreamExt;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::daemon::control::DEFAULT_RUN_DIR;
use crate::daemon::logring::now_ms;
pub use state::{State, Update, View};

/// Redraw period when data changed (and the longest a data change waits to be shown).
pub const FRAME: Duration = Duration::from_millis(250);

/// Most log events drained into one frame; the rest wait for the next one. At 4 frames a
/// second this is far above any daemon's output, and it bounds the work of one wake-up.
const MAX_BATCH: usize = 50_000;

/// Errors of the dashboard.
#[derive(Debug, thiserror::Error)]
pub enum TuiError {
    #[error(transparent)]
    Terminal(#[from] term::TermError),
    #[error("cannot draw on the terminal: {0}; was it closed?")]
    Draw(#[source] std::io::Error),
    #[error("cannot read the keyboard: {0}")]
    Keyboard(#[source] std::io::Error),
    #[error("cannot install the signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// What the dashboard watches and how it looks.
#[derive(Debug, Clone)]
pub struct TuiOptions {
    /// `(label, run directory)` pairs, shown in this order.
    pub dirs: Vec<(String, PathBuf)>,
    /// Draw with colours.
    pub color: bool,
    /// How often each daemon is asked for its status and each directory listed.
    pub interval: Duration,
    /// A line shown above the views, kept up to date by its sender (`dpuctl demo` reports
    /// its components and traffic there).
    pub banner: Option<tokio::sync::watch::Receiver<String>>,
}

#[derive(Debug, Parser)]
#[command(
    name = "dpuctl tui",
    about = "Live dashboard of the local dpuctl daemons",
    long_about = "Shows every daemon whose control socket is in the run directories (engine, \
udsproxyd, mount.qtfs processes, rexec_server): links and latency, throughput, qtfs mounts with \
per-operation counters, allowlists (add with a, delete with d), proxied Unix-socket connections, \
rexec sessions (kill with k) and the merged live logs. Press ? for every key.",
    after_help = "Examples:\n  dpuctl tui\n  dpuctl tui --run-dir HOST=/tmp/host/run --run-dir DPU=/tmp/dpu/run\n  NO_COLOR=1 dpuctl tui\n\nExit status: 0 on q, Ctrl-C or SIGTERM; 1 when the terminal cannot be used."
)]
struct TuiArgs {
    /// A directory of control sockets to watch, optionally named (`HOST=/path`); repeat the
    /// option to watch several machines' directories side by side.
    #[arg(long = "run-dir", value_name = "[LABEL=]DIR", env = "DPUCTL_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
    run_dirs: Vec<String>,
    /// No colours (also when the NO_COLOR environment variable is set and not empty).
    #[arg(long)]
    no_color: bool,
    /// How often each daemon is asked for its status.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
}

/// The command line, for the manual page (`dpuctl man`).
pub(crate) fn command() -> clap::Command {
    <TuiArgs as clap::CommandFactory>::command()
}

/// Parses `--run-dir` values into `(label, dir)`: `LABEL=DIR`, or a bare `DIR` labelled
/// `local` when it is the only one and by its last path component otherwise.
pub fn parse_dirs(values: &[String]) -> Vec<(String, PathBuf)> {
    let single = values.len() == 1;
    values
        .iter()
        .enumerate()
        .map(|(i, v)| match v.split_once('=') {
            Some((label, dir)) if !label.is_empty() && !label.contains('/') => {
                (label.to_owned(), PathBuf::from(dir))
            }
            _ => {
                let dir = PathBuf::from(v);
                let label = if single {
                    "local".to_owned()
                } else {
                    dir.file_name()
                        .and_then(|n| n.to_str())
                        .map_or_else(|| format!("dir{}", i + 1), str::to_owned)
                };
                (label, dir)
            }
        })
        .collect()
}

/// Whether colours are on: not with `--no-color`, nor when NO_COLOR is set to anything
/// but the empty string (<https://no-color.org>).
pub fn use_color(no_color_flag: bool, no_color_env: Option<OsString>) -> bool {
    !no_color_flag && no_color_env.map_or(true, |v| v.is_empty())
}

/// `dpuctl tui`.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let a = match TuiArgs::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => return crate::cli::clap_exit(e),
    };
    let options = TuiOptions {
        dirs: parse_dirs(&a.run_dirs),
        color: use_color(a.no_color, std::env::var_os("NO_COLOR")),
        interval: a.interval,
        banner: None,
    };
    match run_blocking(options, CancellationToken::new()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => crate::cli::fail("dpuctl tui", &e),
    }
}

/// Runs the dashboard on a runtime of its own until the user quits, SIGTERM/SIGHUP arrive
/// or `shutdown` is cancelled.
pub fn run_blocking(options: TuiOptions, shutdown: CancellationToken) -> Result<(), TuiError> {
    // One thread is plenty: the work is a few small JSON messages a second per daemon.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(TuiError::Runtime)?;
    runtime.block_on(run(options, shutdown))
}

/// Set (to anything) in the environment, the dashboard panics after its first frame: the
/// end-to-end test of the panic path. Not for operators.
pub const TEST_PANIC_ENV: &str = "DPUCTL_TUI_TEST_PANIC";

/// The dashboard loop; see the module documentation.
pub async fn run(options: TuiOptions, shutdown: CancellationToken) -> Result<(), TuiError> {
    let mut sigterm = signal(SignalKind::terminate()).map_err(TuiError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(TuiError::Signals)?;
    let mut guard = term::TerminalGuard::enter()?;
    let mut state = State::new(options.dirs.clone(), options.color);
    let (tx, mut updates) = mpsc::channel::<Update>(256);
    let (log_tx, mut logs) = mpsc::channel(8_192);
    let mut collectors = poll::Collectors::new(tx, log_tx, options.interval);
    for (i, (_, dir)) in options.dirs.iter().enumerate() {
        collectors.discover(i, dir.clone());
    }
    let mut keys = EventStream::new();
    let mut tick = tokio::time::interval(FRAME);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut dirty = true;
    let mut banner = options.banner.clone();
    // Test hook (tests/tui_e2e.rs): panic right after the first frame, to check that the
    // panic hook gives the terminal back before the message is printed.
    let panic_after_draw = std::env::var_os(TEST_PANIC_ENV).is_some();
    let result = loop {
        let mut draw_now = false;
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
            _ = sighup.recv() => break Ok(()),
            event = keys.next() => match event {
                Some(Ok(Event::Key(key))) if key.kind != KeyEventKind::Release => {
                    let mut quit = false;
                    for effect in input::handle_key(&mut state, key) {
                        match effect {
                            state::Effect::Quit => quit = true,
                            state::Effect::Control { socket, request, what } => {
                                state.notice = Some(state::Notice::Info(format!("{what}: sent")));
                                collectors.control(socket, request, what);
                            }
                        }
                    }
                    if quit {
                        break Ok(());
                    }
                    draw_now = true;
                }
                Some(Ok(Event::Resize(..))) => draw_now = true,
                Some(Ok(_)) => {}
                Some(Err(e)) => break Err(TuiError::Keyboard(e)),
                // The terminal went away: nothing left to draw on.
                None => break Ok(()),
            },
            Some(update) = updates.recv() => {
                let changes = state.apply(update, now_ms());
                for (side, socket) in changes.added {
                    collectors.watch(side, socket);
                }
                for socket in changes.removed {
                    collectors.unwatch(&socket);
                }
                dirty = true;
            }
            Some(first) = logs.recv() => {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match logs.try_recv() {
                        Ok(ev) => batch.push(ev),
                        Err(_) => break,
                    }
                }
                state.apply(Update::Logs(batch), now_ms());
                dirty = true;
            }
            changed = async {
                match banner.as_mut() {
                    Some(rx) => rx.changed().await,
                    None => std::future::pending().await,
                }
            } => match changed {
                Ok(()) => {
                    state.banner = banner.as_mut().map(|rx| rx.borrow_and_update().clone());
                    dirty = true;
                }
                // The sender is gone: keep the last line, stop watching.
                Err(_) => banner = None,
            },
            _ = tick.tick() => draw_now = dirty,
        }
        if draw_now {
            state.now_ms = now_ms();
            if let Err(e) = guard.terminal().draw(|f| view::draw(f, &state)) {
                break Err(TuiError::Draw(e));
            }
            dirty = false;
            if panic_after_draw {
                panic!("{TEST_PANIC_ENV} is set: a deliberate panic to test the terminal restore");
            }
        }
    };
    collectors.close().await;
    drop(guard);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dirs_take_labels_or_get_one() {
        assert_eq!(
            parse_dirs(&["/var/run/qtfs".into()]),
            vec![("local".to_owned(), PathBuf::from("/var/run/qtfs"))]
        );
        assert_eq!(
            parse_dirs(&["HOST=/a/run".into(), "/b/dpu-run".into()]),
            vec![
                ("HOST".to_owned(), PathBuf::from("/a/run")),
                ("dpu-run".to_owned(), PathBuf::from("/b/dpu-run"))
            ]
        );
        // An `=` inside a path is not a label.
        assert_eq!(
            parse_dirs(&["/x=y/run".into()]),
            vec![("local".to_owned(), PathBuf::from("/x=y/run"))]
        );
    }

    #[test]
    fn no_color_follows_the_flag_and_the_convention() {
        assert!(use_color(false, None));
        assert!(!use_color(true, None));
        assert!(!use_color(false, Some("1".into())));
        assert!(use_color(false, Some("".into())), "empty NO_COLOR is unset");
    }
}
