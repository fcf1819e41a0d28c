//! The dashboard's model: every daemon seen in the watched run directories with its last
//! status and throughput history, the merged log tail, the current view, selection, mode
//! (help, inline input, confirmation) and the last notice.
//!
//! Concurrency: none. [`State`] is owned by the UI loop alone; collectors never touch it,
//! they send [`Update`]s that the loop applies with [`State::apply`]. Everything here is
//! pure (time comes in as an argument), so it is unit-tested without a terminal or daemons.

use std::collections::VecDeque;
use std::path::PathBuf;

use crate::daemon::control::Request;
use crate::daemon::logring::LogEvent;
use crate::daemon::status::DaemonStatus;

/// The five views, in key order (`1`..`5`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Overview,
    Mounts,
    Allowlists,
    Uds,
    Logs,
}

impl View {
    /// Every view, in the order of the number keys and of Tab.
    pub const ALL: [View; 5] = [
        View::Overview,
        View::Mounts,
        View::Allowlists,
        View::Uds,
        View::Logs,
    ];

    /// The tab title.
    pub fn title(self) -> &'static str {
        match self {
            View::Overview => "Overview",
            View::Mounts => "Mounts",
            View::Allowlists => "Allowlists",
            View::Uds => "UDS/rexec",
            View::Logs => "Logs",
        }
    }

    /// Position in [`View::ALL`].
    pub fn index(self) -> usize {
        View::ALL.iter().position(|v| *v == self).unwrap_or(0)
    }

    /// The view after this one (Tab).
    pub fn next(self) -> View {
        View::ALL[(self.index() + 1) % View::ALL.len()]
    }

    /// The view before this one (Shift-Tab).
    pub fn prev(self) -> View {
        View::ALL[(self.index() + View::ALL.len() - 1) % View::ALL.len()]
    }
}

/// A watched run directory and the name it is shown under (`HOST`, `DPU`, `local`).
#[derive(Debug, Clone, PartialEq)]
pub struct SourceDir {
    pub label: String,
    pub dir: PathBuf,
    /// Why the directory could not be read at the last attempt.
    pub error: Option<String>,
}

/// Whether a daemon answers on its control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// Discovered, first status not in yet.
    Waiting,
    /// The last status request was answered.
    Up,
    /// The last status request failed: why.
    Unreachable(String),
}

/// How long a daemon whose control socket disappeared stays on screen (in red) before its
/// row is dropped: long enough for an operator to notice that it went away.
pub const GONE_KEEP_MS: u64 = 120_000;

/// Samples of throughput history kept per daemon (one per status poll).
pub const HISTORY: usize = 120;

/// Log lines kept for scrollback. At 10,000 events/s this is a few seconds of a flood and
/// hours of a normal day; memory stays bounded (a line is well under 1 KiB).
pub const LOG_CAPACITY: usize = 20_000;

/// Per-second rates computed from successive cumulative counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rates {
    last: Option<(u64, u64, u64, Option<u64>)>,
    /// Bytes received per second, oldest first.
    pub bytes_in: VecDeque<u64>,
    /// Bytes sent per second, oldest first.
    pub bytes_out: VecDeque<u64>,
    /// Requests per second, oldest first; empty when the daemon reports no request counter.
    pub requests: VecDeque<u64>,
}

impl Rates {
    /// Adds a sample of cumulative totals taken at `at_ms`. After a restart of the daemon
    /// (`restarted`: its uptime went down) the history starts over instead of showing a bogus
    /// spike. A total that shrinks without a restart (a peer left and took its bytes with it)
    /// counts as no traffic for that interval.
    pub fn sample(
        &mut self,
        at_ms: u64,
        restarted: bool,
        bytes_in: u64,
        bytes_out: u64,
        requests: Option<u64>,
    ) {
        if restarted {
            *self = Rates::default();
        }
        if let Some((t0, i0, o0, r0)) = self.last {
            if at_ms > t0 {
                let per_sec = |delta: u64| delta.saturating_mul(1000) / (at_ms - t0);
                push(&mut self.bytes_in, per_sec(bytes_in.saturating_sub(i0)));
                push(&mut self.bytes_out, per_sec(bytes_out.saturating_sub(o0)));
                if let (Some(a), Some(b)) = (r0, requests) {
                    push(&mut self.requests, per_sec(b.saturating_sub(a)));
                }
            }
        }
        self.last = Some((at_ms, bytes_in, bytes_out, requests));
    }
}

fn push(q: &mut VecDeque<u64>, v: u64) {
    if q.len() == HISTORY {
        q.pop_front();
    }
    q.push_back(v);
}

/// One daemon found in a watched run directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Daemon {
    /// Label of the run directory it was found in.
    pub side: String,
    /// The control socket's name (`engine`, `mount-1234`).
    pub name: String,
    pub socket: PathBuf,
    pub reach: Reach,
    /// When `reach` last changed (ms since the epoch).
    pub since_ms: u64,
    /// The last status it answered; kept (and shown as stale) while it is unreachable.
    pub status: Option<DaemonStatus>,
    pub rates: Rates,
    /// Whether its socket was in the directory at the last discovery.
    pub present: bool,
    /// When it was last seen missing from its directory.
    pub missing_since_ms: Option<u64>,
}

impl Daemon {
    /// The daemon kind: `mount-1234` -> `mount`.
    pub fn kind(&self) -> &str {
        match self.name.rsplit_once('-') {
            Some((kind, id)) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => kind,
            _ => &self.name,
        }
    }

    /// `side/name`, the name used in logs and notices.
    pub fn label(&self) -> String {
        format!("{}/{}", self.side, self.name)
    }

    /// True when its last status request was answered.
    pub fn is_up(&self) -> bool {
        self.reach == Reach::Up
    }
}

/// The cumulative request count a status reports: the `requests` counter, or the sum of a
/// mount's per-operation counts; `None` when the daemon reports neither.
pub fn requests_total(status: &DaemonStatus) -> Option<u64> {
    if let Some(n) = status.counters.get("requests") {
        return Some(*n);
    }
    status
        .mount
        .as_ref()
        .map(|m| m.ops.values().map(|o| o.count).sum())
}

/// Severity rank of a level name: lower is more severe; unknown levels rank 0 (always shown).
pub fn level_rank(level: &str) -> u8 {
    match level.to_ascii_lowercase().as_str() {
        "error" => 1,
        "warn" | "warning" => 2,
        "info" => 3,
        "debug" => 4,
        "trace" => 5,
        _ => 0,
    }
}

/// The name of a level rank (for the filter indicator).
pub fn level_name(rank: u8) -> &'static str {
    match rank {
        1 => "error",
        2 => "warn",
        3 => "info",
        4 => "debug",
        5 => "trace",
        _ => "all",
    }
}

/// One log line, formatted once when it arrives so drawing a flood costs nothing extra.
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    pub ts_ms: u64,
    pub rank: u8,
    pub level: String,
    /// `side/daemon`.
    pub source: String,
    /// The message followed by its fields (`key=value ...`).
    pub text: String,
}

impl LogLine {
    /// Formats an event received from the daemon of side `side`.
    pub fn from_event(side: &str, ev: &LogEvent) -> LogLine {
        let mut text = ev.message.clone();
        for (k, v) in &ev.fields {
            text.push(' ');
            text.push_str(k);
            text.push('=');
            match v {
                serde_json::Value::String(s) => text.push_str(s),
                other => text.push_str(&other.to_string()),
            }
        }
        LogLine {
            ts_ms: ev.ts_ms,
            rank: level_rank(&ev.level),
            level: ev.level.to_ascii_lowercase(),
            source: format!("{side}/{}", ev.daemon),
            text,
        }
    }
}

/// The merged log tail with its filters and scroll position.
#[derive(Debug, Clone, PartialEq)]
pub struct Logs {
    lines: VecDeque<LogLine>,
    capacity: usize,
    /// Stay at the newest line (space toggles).
    pub follow: bool,
    /// While paused: how many matching lines the view is above the newest one.
    pub offset: usize,
    /// Show only lines at this rank or more severe (`None`: all).
    pub min_rank: Option<u8>,
    /// Show only this source (`side/daemon`).
    pub source: Option<String>,
    /// Show only lines containing this text (case-insensitive).
    pub search: Option<String>,
    /// Every line received, including those scrolled out of the buffer.
    pub received: u64,
}

impl Default for Logs {
    fn default() -> Logs {
        Logs::with_capacity(LOG_CAPACITY)
    }
}

impl Logs {
    /// An empty tail keeping at most `capacity` lines.
    pub fn with_capacity(capacity: usize) -> Logs {
        Logs {
            lines: VecDeque::new(),
            capacity: capacity.max(1),
            follow: true,
            offset: 0,
            min_rank: None,
            source: None,
            search: None,
            received: 0,
        }
    }

    /// Whether `line` passes the current filters.
    pub fn matches(&self, line: &LogLine) -> bool {
        if let Some(min) = self.min_rank {
            if line.rank > min {
                return false;
            }
        }
        if let Some(src) = &self.source {
            if &line.source != src {
                return false;
            }
        }
        if let Some(needle) = &self.search {
            let needle = needle.to_lowercase();
            if !line.text.to_lowercase().contains(&needle)
                && !line.source.to_lowercase().contains(&needle)
            {
                return false;
            }
        }
        true
    }

    /// Appends lines (oldest first), dropping the oldest beyond the capacity. While paused,
    /// the view stays on the lines it shows.
    pub fn extend(&mut self, lines: impl IntoIterator<Item = LogLine>) {
        for line in lines {
            self.received += 1;
            if !self.follow && self.matches(&line) {
                self.offset += 1;
            }
            if self.lines.len() == self.capacity {
                self.lines.pop_front();
            }
            self.lines.push_back(line);
        }
    }

    /// Lines held.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// True when no line is held.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// The `height` matching lines to show, oldest first, honouring the scroll offset, and
    /// the number of matching lines below them. Scans from the newest line and stops once
    /// the screen is full, so the cost is bounded by the offset plus the height.
    pub fn visible(&self, height: usize) -> (Vec<&LogLine>, usize) {
        let skip = if self.follow { 0 } else { self.offset };
        let mut out: Vec<&LogLine> = self
            .lines
            .iter()
            .rev()
            .filter(|l| self.matches(l))
            .skip(skip)
            .take(height)
            .collect();
        out.reverse();
        (out, skip)
    }

    /// Matching lines held (for clamping the scroll offset).
    pub fn matching(&self) -> usize {
        self.lines.iter().filter(|l| self.matches(l)).count()
    }

    /// Scrolls up (towards older lines) by `n`; pauses following.
    pub fn scroll_up(&mut self, n: usize) {
        if self.follow {
            self.follow = false;
            self.offset = 0;
        }
        self.offset = (self.offset + n).min(self.matching().saturating_sub(1));
    }

    /// Scrolls down by `n`; reaching the newest line resumes following.
    pub fn scroll_down(&mut self, n: usize) {
        self.offset = self.offset.saturating_sub(n);
        if self.offset == 0 {
            self.follow = true;
        }
    }

    /// The distinct sources seen, sorted (for the daemon filter).
    pub fn sources(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lines.iter().map(|l| l.source.clone()).collect();
        v.sort();
        v.dedup();
        v
    }
}

/// What an inline input line is for.
#[derive(Debug, Clone, PartialEq)]
pub enum InputPurpose {
    /// `TYPE PATH` to add to the allowlist of the daemon at this socket.
    AllowlistAdd { socket: PathBuf, daemon: String },
    /// Text for the log search.
    Search,
}

/// An inline input line.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub purpose: InputPurpose,
    pub text: String,
    /// Why the last submission was refused (the input stays open).
    pub error: Option<String>,
}

/// A side effect the UI loop carries out for the model.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send `request` to the daemon at `socket`; `what` describes it for the notice.
    Control {
        socket: PathBuf,
        request: Request,
        what: String,
    },
    /// Leave the dashboard.
    Quit,
}

/// An action waiting for `y`.
#[derive(Debug, Clone, PartialEq)]
pub struct Confirm {
    pub prompt: String,
    pub effect: Effect,
}

/// What keys currently go to.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    Normal,
    Help,
    Input(Input),
    Confirm(Confirm),
}

/// The last result or error, shown inline until the next one.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    Info(String),
    Error(String),
}

/// Selected rows per view.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selection {
    pub daemon: usize,
    pub mount: usize,
    /// Which allowlist-holding daemon the allowlist view shows.
    pub allow_daemon: usize,
    pub allow_row: usize,
    pub session: usize,
}

/// Something a collector learned, applied with [`State::apply`].
#[derive(Debug, Clone)]
pub enum Update {
    /// The control sockets found in watched directory `index`, or why it is unreadable.
    Dir {
        index: usize,
        result: Result<Vec<(String, PathBuf)>, String>,
    },
    /// The answer to a status request, or why there was none.
    Status {
        socket: PathBuf,
        result: Result<Box<DaemonStatus>, String>,
    },
    /// Log events, each with the label of the side it came from.
    Logs(Vec<(String, LogEvent)>),
    /// The outcome of an [`Effect::Control`]: a description of what happened, or the error.
    Reply {
        what: String,
        result: Result<String, String>,
    },
}

/// Daemons the collectors should start or stop watching after an update.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes {
    /// `(side label, socket)` newly discovered.
    pub added: Vec<(String, PathBuf)>,
    /// Sockets dropped from the model.
    pub removed: Vec<PathBuf>,
}

/// The whole dashboard model.
#[derive(Debug, Clone)]
pub struct State {
    pub view: View,
    pub dirs: Vec<SourceDir>,
    /// Sorted by directory order, then kind, then name.
    pub daemons: Vec<Daemon>,
    pub logs: Logs,
    pub mode: Mode,
    pub notice: Option<Notice>,
    pub selection: Selection,
    /// Draw with colours (`--no-color` and NO_COLOR turn them off).
    pub color: bool,
    /// The time drawing uses for ages (ms since the epoch).
    pub now_ms: u64,
    /// A line shown above the views (`dpuctl demo`'s component status).
    pub banner: Option<String>,
}

impl State {
    /// A model watching `dirs` (`(label, directory)`), nothing discovered yet.
    pub fn new(dirs: Vec<(String, PathBuf)>, color: bool) -> State {
        State {
            view: View::Overview,
            dirs: dirs
                .into_iter()
                .map(|(label, dir)| SourceDir {
                    label,
                    dir,
                    error: None,
                })
                .collect(),
            daemons: Vec::new(),
            logs: Logs::default(),
            mode: Mode::Normal,
            notice: None,
            selection: Selection::default(),
            color,
            now_ms: 0,
            banner: None,
        }
    }

    /// The daemon at `socket`.
    pub fn daemon(&self, socket: &std::path::Path) -> Option<&Daemon> {
        self.daemons.iter().find(|d| d.socket == socket)
    }

    /// Applies a collector's update received at `now_ms`; says which daemons to start or
    /// stop watching.
    pub fn apply(&mut self, update: Update, now_ms: u64) -> Changes {
        self.now_ms = self.now_ms.max(now_ms);
        let mut changes = Changes::default();
        match update {
            Update::Dir { index, result } => {
                let Some(dir) = self.dirs.get_mut(index) else {
                    return changes;
                };
                let label = dir.label.clone();
                match result {
                    Err(e) => dir.error = Some(e),
                    Ok(found) => {
                        dir.error = None;
                        for d in self.daemons.iter_mut().filter(|d| d.side == label) {
                            let present = found.iter().any(|(_, p)| *p == d.socket);
                            d.present = present;
                            if present {
                                d.missing_since_ms = None;
                            } else if d.missing_since_ms.is_none() {
                                d.missing_since_ms = Some(now_ms);
                            }
                        }
                        for (name, socket) in found {
                            if self.daemon(&socket).is_none() {
                                self.daemons.push(Daemon {
                                    side: label.clone(),
                                    name,
                                    socket: socket.clone(),
                                    reach: Reach::Waiting,
                                    since_ms: now_ms,
                                    status: None,
                                    rates: Rates::default(),
                                    present: true,
                                    missing_since_ms: None,
                                });
                                changes.added.push((label.clone(), socket));
                            }
                        }
                        // Drop rows whose socket has been gone (and the daemon silent) long enough.
                        let before: Vec<PathBuf> =
                            self.daemons.iter().map(|d| d.socket.clone()).collect();
                        self.daemons.retain(|d| {
                            d.is_up()
                                || d.missing_since_ms
                                    .map_or(true, |t| now_ms.saturating_sub(t) < GONE_KEEP_MS)
                        });
                        changes.removed = before
                            .into_iter()
                            .filter(|s| self.daemon(s).is_none())
                            .collect();
                        self.sort_daemons();
                    }
                }
            }
            Update::Status { socket, result } => {
                if let Some(d) = self.daemons.iter_mut().find(|d| d.socket == socket) {
                    let reach = match result {
                        Ok(status) => {
                            let bytes_in = status.peers.iter().map(|p| p.bytes_in).sum();
                            let bytes_out = status.peers.iter().map(|p| p.bytes_out).sum();
                            let restarted = d.status.as_ref().is_some_and(|old| {
                                old.pid != status.pid || old.uptime_secs > status.uptime_secs
                            });
                            d.rates.sample(
                                now_ms,
                                restarted,
                                bytes_in,
                                bytes_out,
                                requests_total(&status),
                            );
                            d.status = Some(*status);
                            Reach::Up
                        }
                        Err(e) => Reach::Unreachable(e),
                    };
                    if d.reach != reach {
                        d.since_ms = now_ms;
                        d.reach = reach;
                    }
                }
            }
            Update::Logs(events) => {
                let mut lines: Vec<LogLine> = events
                    .iter()
                    .map(|(side, ev)| LogLine::from_event(side, ev))
                    .collect();
                // A batch holds several daemons' events: merge them by time. Stable, so one
                // daemon's events keep their order.
                lines.sort_by_key(|l| l.ts_ms);
                self.logs.extend(lines);
            }
            Update::Reply { what, result } => {
                self.notice = Some(match result {
                    Ok(done) => Notice::Info(format!("{what}: {done}")),
                    Err(e) => Notice::Error(format!("{what}: {e}")),
                });
            }
        }
        self.clamp_selection();
        changes
    }

    fn sort_daemons(&mut self) {
        let order: Vec<String> = self.dirs.iter().map(|d| d.label.clone()).collect();
        let kind_rank = |k: &str| match k {
            "engine" => 0,
            "udsproxyd" => 1,
            "mount" => 2,
            "rexec_server" => 3,
            _ => 4,
        };
        self.daemons.sort_by(|a, b| {
            let side = |d: &Daemon| {
                order
                    .iter()
                    .position(|l| *l == d.side)
                    .unwrap_or(usize::MAX)
            };
            (side(a), kind_rank(a.kind()), &a.name).cmp(&(side(b), kind_rank(b.kind()), &b.name))
        });
    }

    /// Daemons that hold allowlists (they report them in their status).
    pub fn allowlist_daemons(&self) -> Vec<&Daemon> {
        self.daemons
            .iter()
            .filter(|d| d.status.as_ref().is_some_and(|s| !s.allowlists.is_empty()))
            .collect()
    }

    /// The rows of the allowlist view for daemon `d`: every type in the original's order,
    /// with `(index, path)` for each entry or `None` for a type without entries.
    pub fn allowlist_rows(
        d: &Daemon,
    ) -> Vec<(crate::allowlist::ListType, Option<(usize, String)>)> {
        let mut rows = Vec::new();
        let Some(status) = &d.status else {
            return rows;
        };
        for t in crate::allowlist::ListType::ALL {
            let entries = status
                .allowlists
                .get(t.name())
                .map(Vec::as_slice)
                .unwrap_or_default();
            if entries.is_empty() {
                rows.push((t, None));
            }
            for (i, p) in entries.iter().enumerate() {
                rows.push((t, Some((i, p.clone()))));
            }
        }
        rows
    }

    /// Mount daemons (those reporting a mount).
    pub fn mounts(&self) -> Vec<&Daemon> {
        self.daemons
            .iter()
            .filter(|d| d.kind() == "mount" || d.status.as_ref().is_some_and(|s| s.mount.is_some()))
            .collect()
    }

    /// Every rexec session: `(daemon, session)`.
    pub fn sessions(&self) -> Vec<(&Daemon, &crate::daemon::status::SessionStatus)> {
        self.daemons
            .iter()
            .filter_map(|d| d.status.as_ref().map(|s| (d, s)))
            .flat_map(|(d, s)| s.sessions.iter().map(move |x| (d, x)))
            .collect()
    }

    /// Keeps every selection within its list after the lists changed.
    pub fn clamp_selection(&mut self) {
        let clamp = |v: &mut usize, len: usize| *v = (*v).min(len.saturating_sub(1));
        let n = self.daemons.len();
        clamp(&mut self.selection.daemon, n);
        let n = self.mounts().len();
        clamp(&mut self.selection.mount, n);
        let allow = self.allowlist_daemons();
        let n = allow.len();
        let rows = allow
            .get(self.selection.allow_daemon.min(n.saturating_sub(1)))
            .map(|d| State::allowlist_rows(d).len())
            .unwrap_or(0);
        clamp(&mut self.selection.allow_daemon, n);
        clamp(&mut self.selection.allow_row, rows);
        let n = self.sessions().len();
        clamp(&mut self.selection.session, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(name: &str, bytes: u64) -> DaemonStatus {
        DaemonStatus {
            name: name.into(),
            pid: 1,
            control: String::new(),
            version: "0.1.0".into(),
            uptime_secs: 5,
            listen: vec![],
            peers: vec![crate::daemon::status::PeerStatus {
                address: "tcp://127.0.0.1:1".into(),
                state: crate::daemon::status::PeerState::Connected,
                bytes_in: bytes,
                bytes_out: bytes * 2,
                role: None,
                rtt_us: Some(100),
                since_secs: 1,
                last_error: None,
            }],
            allowlists: Default::default(),
            log_level: "info".into(),
            counters: Default::default(),
            mount: None,
            connections: vec![],
            sessions: vec![],
        }
    }

    fn found(names: &[&str]) -> Result<Vec<(String, PathBuf)>, String> {
        Ok(names
            .iter()
            .map(|n| (n.to_string(), PathBuf::from(format!("/run/q/{n}.ctl"))))
            .collect())
    }

    #[test]
    fn discovery_adds_daemons_and_keeps_vanished_ones_red_for_a_while() {
        let mut s = State::new(vec![("HOST".into(), "/run/q".into())], false);
        let ch = s.apply(
            Update::Dir {
                index: 0,
                result: found(&["mount-12", "engine"]),
            },
            1_000,
        );
        assert_eq!(ch.added.len(), 2);
        // Sorted by kind: the engine first.
        assert_eq!(s.daemons[0].name, "engine");
        assert_eq!(s.daemons[1].kind(), "mount");
        let engine = PathBuf::from("/run/q/engine.ctl");
        s.apply(
            Update::Status {
                socket: engine.clone(),
                result: Ok(Box::new(status("engine", 0))),
            },
            1_000,
        );
        assert!(s.daemon(&engine).unwrap().is_up());
        // The engine's socket disappears and it stops answering: shown unreachable, kept.
        s.apply(
            Update::Dir {
                index: 0,
                result: found(&["mount-12"]),
            },
            2_000,
        );
        s.apply(
            Update::Status {
                socket: engine.clone(),
                result: Err("no daemon".into()),
            },
            2_000,
        );
        let d = s.daemon(&engine).unwrap();
        assert_eq!(d.reach, Reach::Unreachable("no daemon".into()));
        assert!(!d.present);
        // Long after, the row goes and the collectors are told to stop.
        let ch = s.apply(
            Update::Dir {
                index: 0,
                result: found(&["mount-12"]),
            },
            2_000 + GONE_KEEP_MS,
        );
        assert_eq!(ch.removed, vec![engine.clone()]);
        assert!(s.daemon(&engine).is_none());
    }

    #[test]
    fn rates_are_per_second_and_restart_with_the_daemon() {
        let mut r = Rates::default();
        r.sample(0, false, 0, 0, Some(0));
        r.sample(2_000, false, 2_000, 4_000, Some(10));
        assert_eq!(r.bytes_in, [1_000]);
        assert_eq!(r.bytes_out, [2_000]);
        assert_eq!(r.requests, [5]);
        // A peer left with its bytes: no traffic, not a negative rate.
        r.sample(3_000, false, 1_000, 4_000, Some(10));
        assert_eq!(r.bytes_in, [1_000, 0]);
        // The daemon restarted: the history starts over.
        r.sample(4_000, true, 10, 10, Some(1));
        assert!(r.bytes_in.is_empty());
        r.sample(5_000, false, 110, 10, None);
        assert_eq!(r.bytes_in, [100]);
        assert!(r.requests.is_empty(), "no request counter, no request rate");
    }

    fn event(level: &str, daemon: &str, msg: &str, ts: u64) -> LogEvent {
        LogEvent {
            ts_ms: ts,
            level: level.into(),
            daemon: daemon.into(),
            target: "t".into(),
            message: msg.into(),
            fields: Default::default(),
        }
    }

    #[test]
    fn logs_merge_by_time_filter_and_stay_put_while_paused() {
        let mut s = State::new(vec![], false);
        s.apply(
            Update::Logs(vec![
                ("DPU".into(), event("info", "udsproxyd", "b", 20)),
                ("HOST".into(), event("error", "engine", "a", 10)),
            ]),
            0,
        );
        let (lines, _) = s.logs.visible(10);
        assert_eq!(
            lines.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(lines[0].source, "HOST/engine");
        s.logs.min_rank = Some(1);
        assert_eq!(s.logs.visible(10).0.len(), 1);
        s.logs.min_rank = None;
        // Paused one line up: new lines do not move the view.
        s.logs.scroll_up(1);
        assert_eq!(s.logs.visible(1).0[0].text, "a");
        s.apply(
            Update::Logs(vec![("HOST".into(), event("info", "engine", "c", 30))]),
            0,
        );
        assert_eq!(s.logs.visible(1).0[0].text, "a");
        s.logs.scroll_down(5);
        assert!(s.logs.follow);
        assert_eq!(s.logs.visible(1).0[0].text, "c");
        s.logs.search = Some("B".into());
        assert_eq!(s.logs.visible(10).0.len(), 1);
    }

    #[test]
    fn the_log_buffer_is_bounded() {
        let mut logs = Logs::with_capacity(3);
        let line = |t: &str| LogLine {
            ts_ms: 0,
            rank: 3,
            level: "info".into(),
            source: "x/y".into(),
            text: t.into(),
        };
        logs.extend(["1", "2", "3", "4"].map(line));
        assert_eq!(logs.len(), 3);
        assert_eq!(logs.received, 4);
        assert_eq!(logs.visible(5).0[0].text, "2");
    }
}
