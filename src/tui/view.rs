//! Drawing: [`draw`] renders a [`State`] into a ratatui [`Frame`]. One function per view,
//! plus the tab bar, the footer (hints, notice, inline input, confirmation) and the `?`
//! overlay, which is rendered from [`super::input::BINDINGS`].
//!
//! Concurrency: none; views read the model and never change it, so they are snapshot-tested
//! with ratatui's `TestBackend`. Absent data is shown as absent (`-`, "not reported"),
//! never invented; a daemon that does not answer is shown in red (and in capitals, for
//! terminals without colour) with its last known figures marked stale.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Clear, Paragraph, Row, Sparkline, Table, TableState, Tabs};
use ratatui::Frame;

use super::input::{Scope, BINDINGS};
use super::state::{level_name, Daemon, InputPurpose, Mode, Notice, Reach, State, View};
use crate::daemon::status::{PeerState, PeerStatus};

/// Below this width the overview drops its pid and peer columns (the detail panel shows them).
const WIDE: u16 = 110;

/// Colours, or none (`--no-color`, NO_COLOR). Attributes (bold, reverse) stay: they are not colour.
#[derive(Debug, Clone, Copy)]
struct Theme {
    color: bool,
}

impl Theme {
    fn fg(self, c: Color) -> Style {
        if self.color {
            Style::new().fg(c)
        } else {
            Style::new()
        }
    }
    fn bad(self) -> Style {
        self.fg(Color::Red).add_modifier(Modifier::BOLD)
    }
    fn good(self) -> Style {
        self.fg(Color::Green)
    }
    fn warn(self) -> Style {
        self.fg(Color::Yellow)
    }
    fn dim(self) -> Style {
        if self.color {
            Style::new().fg(Color::DarkGray)
        } else {
            Style::new()
        }
    }
    fn title(self) -> Style {
        Style::new().add_modifier(Modifier::BOLD)
    }
    fn selected(self) -> Style {
        Style::new().add_modifier(Modifier::REVERSED)
    }
    fn level(self, level: &str) -> Style {
        match level {
            "error" => self.bad(),
            "warn" | "warning" => self.warn(),
            "info" => self.fg(Color::Green),
            "debug" => self.fg(Color::Cyan),
            _ => self.dim(),
        }
    }
}

/// Draws the whole dashboard.
pub fn draw(frame: &mut Frame, state: &State) {
    let theme = Theme { color: state.color };
    // The banner wraps onto a second line when it does not fit on one.
    let width = frame.area().width.max(1) as usize;
    let banner_height = state
        .banner
        .as_ref()
        .map_or(0, |b| b.chars().count().div_ceil(width).clamp(1, 2) as u16);
    let [header, banner, body, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(banner_height),
        Constraint::Min(1),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    draw_tabs(frame, header, state, theme);
    if let Some(text) = &state.banner {
        frame.render_widget(
            Paragraph::new(text.as_str())
                .style(theme.fg(Color::Cyan))
                .wrap(ratatui::widgets::Wrap { trim: true }),
            banner,
        );
    }
    match state.view {
        View::Overview => draw_overview(frame, body, state, theme),
        View::Mounts => draw_mounts(frame, body, state, theme),
        View::Allowlists => draw_allowlists(frame, body, state, theme),
        View::Uds => draw_uds(frame, body, state, theme),
        View::Logs => draw_logs(frame, body, state, theme),
    }
    draw_footer(frame, footer, state, theme);
    if state.mode == Mode::Help {
        draw_help(frame, body, state, theme);
    }
}

fn draw_tabs(frame: &mut Frame, area: Rect, state: &State, theme: Theme) {
    let titles = View::ALL
        .iter()
        .enumerate()
        .map(|(i, v)| format!("{} {}", i + 1, v.title()));
    let up = state.daemons.iter().filter(|d| d.is_up()).count();
    let down = state
        .daemons
        .iter()
        .filter(|d| matches!(d.reach, Reach::Unreachable(_)))
        .count();
    let summary = format!(" {up} up, {down} down ");
    let [tabs_area, summary_area] = Layout::horizontal([
        Constraint::Min(10),
        Constraint::Length(summary.chars().count() as u16),
    ])
    .areas(area);
    let tabs = Tabs::new(titles)
        .select(state.view.index())
        .highlight_style(theme.selected().add_modifier(Modifier::BOLD))
        .divider("|");
    frame.render_widget(tabs, tabs_area);
    let style = if down > 0 { theme.bad() } else { theme.dim() };
    frame.render_widget(Paragraph::new(summary).style(style), summary_area);
}

fn draw_footer(frame: &mut Frame, area: Rect, state: &State, theme: Theme) {
    let line = match &state.mode {
        Mode::Input(input) => {
            let prompt = match &input.purpose {
                InputPurpose::AllowlistAdd { daemon, .. } => {
                    format!("add to {daemon} (TYPE PATH)> ")
                }
                InputPurpose::Search => "search> ".to_owned(),
            };
            let mut spans = vec![
                Span::styled(prompt.clone(), theme.title()),
                Span::raw(input.text.clone()),
                Span::styled("_", Style::new().add_modifier(Modifier::SLOW_BLINK)),
            ];
            if let Some(e) = &input.error {
                spans.push(Span::styled(format!("  {e}"), theme.bad()));
            }
            Line::from(spans)
        }
        Mode::Confirm(c) => Line::from(Span::styled(
            c.prompt.clone(),
            theme.warn().add_modifier(Modifier::BOLD),
        )),
        Mode::Help | Mode::Normal => match &state.notice {
            Some(Notice::Error(e)) => Line::from(Span::styled(e.clone(), theme.bad())),
            Some(Notice::Info(i)) => Line::from(Span::styled(i.clone(), theme.good())),
            None => Line::from(Span::styled(hints(state.view), theme.dim())),
        },
    };
    frame.render_widget(Paragraph::new(line), area);
}

/// The key hints of a view's footer, from the key map.
fn hints(view: View) -> String {
    let mut parts: Vec<String> = BINDINGS
        .iter()
        .filter(|b| b.scope == Scope::Only(view) && !b.hint.is_empty())
        .map(|b| format!("{} {}", b.label, b.hint))
        .collect();
    parts.extend(["Tab views".into(), "? help".into(), "q quit".into()]);
    parts.join("  ")
}

// ---------------------------------------------------------------------------------------
// Overview
// ---------------------------------------------------------------------------------------

fn state_cell(d: &Daemon, theme: Theme) -> Cell<'static> {
    match &d.reach {
        Reach::Waiting => Cell::from("waiting").style(theme.dim()),
        Reach::Up => Cell::from("up").style(theme.good()),
        Reach::Unreachable(_) if !d.present => Cell::from("GONE").style(theme.bad()),
        Reach::Unreachable(_) => Cell::from("UNREACHABLE").style(theme.bad()),
    }
}

/// The peer the overview shows for a daemon: its own link (not the mount clients of an
/// engine), or the first one.
fn primary_peer(peers: &[PeerStatus]) -> Option<&PeerStatus> {
    peers
        .iter()
        .find(|p| p.role.as_deref() != Some("mount"))
        .or_else(|| peers.first())
}

fn peer_state_style(s: PeerState, theme: Theme) -> Style {
    match s {
        PeerState::Connected => theme.good(),
        PeerState::Connecting => theme.warn(),
        PeerState::Disconnected | PeerState::AuthFailed => theme.bad(),
    }
}

fn peer_state_name(s: PeerState) -> &'static str {
    match s {
        PeerState::Connected => "connected",
        PeerState::Connecting => "connecting",
        PeerState::Disconnected => "disconnected",
        PeerState::AuthFailed => "auth_failed",
    }
}

fn short_addr(a: &str) -> &str {
    a.strip_prefix("tcp://").unwrap_or(a)
}

fn draw_overview(frame: &mut Frame, area: Rect, state: &State, theme: Theme) {
    if state.daemons.is_empty() {
        frame.render_widget(empty_system(state, theme), area);
        return;
    }
    // The detail panel (peers, sparklines) gets 8 to 14 rows, the table the rest.
    let peers = state
        .daemons
        .get(state.selection.daemon)
        .and_then(|d| d.status.as_ref())
        .map_or(0, |s| s.peers.len() as u16);
    let detail_height = peers
        .saturating_add(5)
        .clamp(8, 14)
        .min(area.height.saturating_sub(4));
    let [table_area, detail_area] =
        Layout::vertical([Constraint::Min(4), Constraint::Length(detail_height)]).areas(area);
    let wide = area.width >= WIDE;
    let mut header = vec!["side", "daemon"];
    if wide {
        header.push("pid");
    }
    header.push("state");
    if wide {
        header.push("peer");
    }
    header.extend(["link", "rtt"]);
    if wide {
        header.push("uptime");
    }
    header.extend(["in/s", "out/s", "req/s"]);
    let rows = state.daemons.iter().map(|d| {
        let status = d.status.as_ref();
        let live = d.is_up();
        let peer = status.and_then(|s| primary_peer(&s.peers));
        let mut cells = vec![Cell::from(d.side.clone()), Cell::from(d.name.clone())];
        if wide {
            cells.push(Cell::from(status.map_or("-".into(), |s| s.pid.to_string())));
        }
        cells.push(state_cell(d, theme));
        if wide {
            let more = status.map_or(0, |s| s.peers.len().saturating_sub(1));
            let text = match peer {
                Some(p) if more > 0 => format!("{} +{more}", short_addr(&p.address)),
                Some(p) => short_addr(&p.address).to_owned(),
                None => "-".into(),
            };
            cells.push(Cell::from(text));
        }
        cells.push(match (peer, live) {
            (Some(p), true) => {
                Cell::from(peer_state_name(p.state)).style(peer_state_style(p.state, theme))
            }
            (Some(_), false) => Cell::from("?").style(theme.dim()),
            (None, _) => Cell::from("-"),
        });
        cells.push(Cell::from(
            peer.and_then(|p| p.rtt_us)
                .filter(|_| live)
                .map_or("-".into(), fmt_us),
        ));
        if wide {
            cells.push(Cell::from(
                status
                    .filter(|_| live)
                    .map_or("-".into(), |s| fmt_secs(s.uptime_secs)),
            ));
        }
        let last = |q: &std::collections::VecDeque<u64>| {
            q.back()
                .filter(|_| live)
                .map_or("-".into(), |v| fmt_bytes(*v))
        };
        cells.push(Cell::from(last(&d.rates.bytes_in)));
        cells.push(Cell::from(last(&d.rates.bytes_out)));
        cells.push(Cell::from(
            d.rates
                .requests
                .back()
                .filter(|_| live)
                .map_or("-".into(), |v| v.to_string()),
        ));
        let row = Row::new(cells);
        if matches!(d.reach, Reach::Unreachable(_)) {
            row.style(theme.bad())
        } else {
            row
        }
    });
    // At 80 columns: 5+13+11+12+6+7+7+5 plus 7 spaces = 73 of the 78 inside the border.
    let mut widths = vec![Constraint::Length(5), Constraint::Length(13)];
    if wide {
        widths.push(Constraint::Length(7));
    }
    widths.push(Constraint::Length(11));
    if wide {
        widths.push(Constraint::Min(16));
    }
    widths.extend([Constraint::Length(12), Constraint::Length(6)]);
    if wide {
        widths.push(Constraint::Length(8));
    }
    widths.extend([
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(5),
    ]);
    let table = Table::new(rows, widths)
        .header(Row::new(header).style(theme.title()))
        .row_highlight_style(theme.selected())
        .block(Block::bordered().title(format!(" daemons in {} ", dirs_label(state))));
    let mut ts = TableState::default().with_selected(Some(state.selection.daemon));
    frame.render_stateful_widget(table, table_area, &mut ts);
    if let Some(d) = state.daemons.get(state.selection.daemon) {
        draw_detail(frame, detail_area, d, state, theme);
    }
}

fn dirs_label(state: &State) -> String {
    state
        .dirs
        .iter()
        .map(|d| format!("{}={}", d.label, d.dir.display()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn empty_system(state: &State, theme: Theme) -> Paragraph<'static> {
    let mut lines = vec![Line::from(Span::styled(
        "no dpuctl daemons found",
        theme.title(),
    ))];
    for d in &state.dirs {
        let text = match &d.error {
            Some(e) => Line::from(Span::styled(
                format!("  {}: {}: {e}", d.label, d.dir.display()),
                theme.bad(),
            )),
            None => Line::from(format!(
                "  {}: no control sockets (*.ctl) in {}",
                d.label,
                d.dir.display()
            )),
        };
        lines.push(text);
    }
    lines.push(Line::from(""));
    lines.push(Line::from(
        "start a daemon (engine, udsproxyd, mount.qtfs, rexec_server), or pass --run-dir DIR;",
    ));
    lines.push(Line::from("this view updates by itself when one appears"));
    Paragraph::new(lines).block(Block::bordered().title(" daemons "))
}

fn draw_detail(frame: &mut Frame, area: Rect, d: &Daemon, state: &State, theme: Theme) {
    let title = match &d.status {
        Some(s) if d.is_up() => format!(
            " {} (pid {}, {} {}, up {}) ",
            d.label(),
            s.pid,
            s.name,
            s.version,
            fmt_secs(s.uptime_secs)
        ),
        Some(s) => format!(" {} (pid {}, {} {}) ", d.label(), s.pid, s.name, s.version),
        None => format!(" {} ", d.label()),
    };
    let block = Block::bordered().title(title);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)])
            .spacing(2)
            .areas(inner);
    let mut lines: Vec<Line> = Vec::new();
    if let Reach::Unreachable(e) = &d.reach {
        let ago = fmt_secs(state.now_ms.saturating_sub(d.since_ms) / 1000);
        lines.push(Line::from(Span::styled(
            format!("unreachable for {ago}: {e}"),
            theme.bad(),
        )));
        if d.status.is_some() {
            lines.push(Line::from(Span::styled(
                "figures below are the last answer (stale)",
                theme.dim(),
            )));
        }
    }
    match &d.status {
        None if d.reach == Reach::Waiting => lines.push(Line::from("waiting for the first answer")),
        None => {}
        Some(s) => {
            if s.peers.is_empty() {
                lines.push(Line::from(format!(
                    "no peers; listening on {}",
                    if s.listen.is_empty() {
                        "-".to_owned()
                    } else {
                        s.listen.join(", ")
                    }
                )));
            }
            for p in &s.peers {
                let mut spans = vec![
                    Span::raw(format!("{} ", short_addr(&p.address))),
                    Span::raw(format!("{} ", p.role.as_deref().unwrap_or("peer"))),
                    Span::styled(peer_state_name(p.state), peer_state_style(p.state, theme)),
                    Span::raw(format!(
                        " rtt {} in {} out {}",
                        p.rtt_us.map_or("-".into(), fmt_us),
                        fmt_total(p.bytes_in),
                        fmt_total(p.bytes_out)
                    )),
                ];
                if let Some(e) = &p.last_error {
                    spans.push(Span::styled(format!(" ({e})"), theme.bad()));
                }
                lines.push(Line::from(spans));
            }
        }
    }
    frame.render_widget(Paragraph::new(lines), left);
    let [a, b, c] = Layout::vertical([
        Constraint::Fill(1),
        Constraint::Fill(1),
        Constraint::Fill(1),
    ])
    .areas(right);
    spark(frame, a, "in", &d.rates.bytes_in, true, theme, Color::Cyan);
    spark(
        frame,
        b,
        "out",
        &d.rates.bytes_out,
        true,
        theme,
        Color::Magenta,
    );
    spark(
        frame,
        c,
        "req",
        &d.rates.requests,
        false,
        theme,
        Color::Yellow,
    );
}

fn spark(
    frame: &mut Frame,
    area: Rect,
    name: &str,
    data: &std::collections::VecDeque<u64>,
    bytes: bool,
    theme: Theme,
    color: Color,
) {
    let [label, graph] = Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(area);
    let now = match data.back() {
        None if !bytes => "not reported".to_owned(),
        None => "-".to_owned(),
        Some(v) if bytes => fmt_bytes(*v),
        Some(v) => format!("{v}/s"),
    };
    frame.render_widget(
        Paragraph::new(format!("{name} {now}")).style(theme.dim()),
        label,
    );
    // The newest samples that fit, right-aligned like a strip chart.
    let width = graph.width as usize;
    let skip = data.len().saturating_sub(width);
    let points: Vec<u64> = data.iter().skip(skip).copied().collect();
    frame.render_widget(
        Sparkline::default().data(&points).style(theme.fg(color)),
        graph,
    );
}

// ---------------------------------------------------------------------------------------
// Mounts
// ---------------------------------------------------------------------------------------

fn draw_mounts(frame: &mut Frame, area: Rect, state: &State, theme: Theme) {
    let mounts = state.mounts();
    if mounts.is_empty() {
        let lines = vec![
            Line::from(Span::styled("no qtfs mounts registered", theme.title())),
            Line::from(format!("  no mount-<pid>.ctl in {}", dirs_label(state))),
            Line::from(""),
            Line::from(
                "mount one on the DPU: mount -t qtfs -o server=HOST:12345 /remote/dir /local/dir",
            ),
        ];
        frame.render_widget(
            Paragraph::new(lines).block(Block::bordered().title(" mounts ")),
            area,
        );
        return;
    }
    let [top, bottom] = Layout::vertical([
        Constraint::Length((mounts.len() as u16).saturating_add(3).min(10)),
        Constraint::Min(3),
    ])
    .areas(area);
    // Below WIDE columns the options move to the operations panel's title.
    let wide = area.width >= WIDE;
    let rows = mounts.iter().map(|d| {
        let m = d.status.as_ref().and_then(|s| s.mount.as_deref());
        let state_cell = match (&d.reach, m) {
            (Reach::Unreachable(_), _) => state_cell(d, theme),
            (_, Some(m)) => {
                let style = match m.state.as_str() {
                    "mounted" => theme.good(),
                    "reconnecting" => theme.warn(),
                    _ => theme.bad(),
                };
                Cell::from(m.state.clone()).style(style)
            }
            (_, None) => Cell::from("not reported").style(theme.dim()),
        };
        let mut cells = vec![
            Cell::from(d.label()),
            Cell::from(m.map_or("-".into(), |m| m.remote.clone())),
            Cell::from(m.map_or("-".into(), |m| m.local.clone())),
            state_cell,
        ];
        if wide {
            cells.push(Cell::from(m.map_or("-".into(), |m| m.options.clone())));
        }
        Row::new(cells)
    });
    let mut widths = vec![
        Constraint::Length(16),
        Constraint::Fill(2),
        Constraint::Fill(2),
        Constraint::Length(12),
    ];
    let mut header = vec!["mount", "remote (HOST)", "local", "state"];
    if wide {
        widths.push(Constraint::Fill(3));
        header.push("options");
    }
    let table = Table::new(rows, widths)
        .header(Row::new(header).style(theme.title()))
        .row_highlight_style(theme.selected())
        .block(Block::bordered().title(" qtfs mounts "));
    let mut ts = TableState::default().with_selected(Some(state.selection.mount));
    frame.render_stateful_widget(table, top, &mut ts);

    let Some(d) = mounts.get(state.selection.mount) else {
        return;
    };
    let m = d.status.as_ref().and_then(|s| s.mount.as_deref());
    let title = match m {
        Some(m) if !wide => format!(" operations of {} (-o {}) ", d.label(), m.options),
        _ => format!(" operations of {} ", d.label()),
    };
    let block = Block::bordered().title(title);
    let Some(m) = m else {
        frame.render_widget(
            Paragraph::new("this mount process reports no operation figures").block(block),
            bottom,
        );
        return;
    };
    if m.ops.is_empty() {
        frame.render_widget(Paragraph::new("no operations yet").block(block), bottom);
        return;
    }
    let mut ops: Vec<_> = m.ops.iter().collect();
    ops.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
    let rows = ops.into_iter().map(|(name, o)| {
        let errors = Cell::from(o.errors.to_string()).style(if o.errors > 0 {
            theme.warn()
        } else {
            Style::new()
        });
        Row::new(vec![
            Cell::from(name.clone()),
            Cell::from(o.count.to_string()),
            errors,
            Cell::from(fmt_us(o.p50_us)),
            Cell::from(fmt_us(o.p99_us)),
        ])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(14),
            Constraint::Length(12),
            Constraint::Length(8),
            Constraint::Length(10),
            Constraint::Length(10),
        ],
    )
    .header(Row::new(["operation", "count", "errors", "p50", "p99"]).style(theme.title()))
    .block(block);
    frame.render_widget(table, bottom);
}

// ---------------------------------------------------------------------------------------
// Allowlists
// ---------------------------------------------------------------------------------------

fn draw_allowlists(frame: &mut Frame, area: Rect, state: &State, theme: Theme) {
    let daemons = state.allowlist_daemons();
    let Some(d) = daemons.get(state.selection.allow_daemon) else {
        let lines = vec![
            Line::from(Span::styled("no daemon reports allowlists", theme.title())),
            Line::from("the engine and udsproxyd hold them; start one, or wait for it to answer"),
        ];
        frame.render_widget(
            Paragraph::new(lines).block(Block::bordered().title(" allowlists ")),
            area,
        );
        return;
    };
    let rows = State::allowlist_rows(d);
    let table_rows = rows.iter().map(|(t, entry)| match entry {
        Some((i, path)) => Row::new(vec![
            Cell::from(t.name()),
            Cell::from(i.to_string()),
            Cell::from(path.clone()),
        ]),
        None => Row::new(vec![
            Cell::from(t.name()),
            Cell::from(""),
            Cell::from("(none)").style(theme.dim()),
        ]),
    });
    let mut title = format!(
        " allowlists of {} ({} of {}, ←/→ switch) ",
        d.label(),
        state.selection.allow_daemon + 1,
        daemons.len()
    );
    if !d.is_up() {
        title.push_str("[UNREACHABLE: last known] ");
    }
    let block = Block::bordered().title(title);
    let block = if d.is_up() {
        block
    } else {
        block.border_style(theme.bad())
    };
    let table = Table::new(
        table_rows,
        [
            Constraint::Length(12),
            Constraint::Length(4),
            Constraint::Min(10),
        ],
    )
    .header(Row::new(["type", "#", "path"]).style(theme.title()))
    .row_highlight_style(theme.selected())
    .block(block);
    let mut ts = TableState::default().with_selected(Some(state.selection.allow_row));
    frame.render_stateful_widget(table, area, &mut ts);
}

// ---------------------------------------------------------------------------------------
// UDS proxy and rexec
// ---------------------------------------------------------------------------------------

fn draw_uds(frame: &mut Frame, area: Rect, state: &State, theme: Theme) {
    let [top, bottom] =
        Layout::vertical([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(area);
    let conns: Vec<_> = state
        .daemons
        .iter()
        .filter_map(|d| d.status.as_ref().map(|s| (d, s)))
        .flat_map(|(d, s)| s.connections.iter().map(move |c| (d, c)))
        .collect();
    let proxies = state
        .daemons
        .iter()
        .filter(|d| matches!(d.kind(), "udsproxyd" | "engine"))
        .count();
    let block = Block::bordered().title(format!(
        " proxied Unix-socket connections ({}) ",
        conns.len()
    ));
    if conns.is_empty() {
        let text = if proxies == 0 {
            "no udsproxyd or engine registered".to_owned()
        } else {
            format!("no live proxied connections reported by the {proxies} proxy daemon(s)")
        };
        frame.render_widget(Paragraph::new(text).block(block), top);
    } else {
        let rows = conns.iter().map(|(d, c)| {
            Row::new(vec![
                Cell::from(d.label()),
                Cell::from(c.path.clone()),
                Cell::from(c.kind.clone()),
                Cell::from(c.direction.clone()),
                Cell::from(fmt_total(c.bytes_in)),
                Cell::from(fmt_total(c.bytes_out)),
                Cell::from(fmt_secs(c.age_secs)),
            ])
        });
        let table = Table::new(
            rows,
            [
                Constraint::Length(15),
                Constraint::Min(20),
                Constraint::Length(7),
                Constraint::Length(8),
                Constraint::Length(6),
                Constraint::Length(6),
                Constraint::Length(6),
            ],
        )
        .header(
            Row::new(["daemon", "path", "type", "dir", "in", "out", "age"]).style(theme.title()),
        )
        .block(block);
        frame.render_widget(table, top);
    }

    let sessions = state.sessions();
    let servers = state
        .daemons
        .iter()
        .filter(|d| d.kind() == "rexec_server")
        .count();
    let block = Block::bordered().title(format!(" rexec sessions ({}) — k kills ", sessions.len()));
    if sessions.is_empty() {
        let text = if servers == 0 {
            "no rexec_server registered in the watched run directories".to_owned()
        } else {
            "no rexec sessions running".to_owned()
        };
        frame.render_widget(Paragraph::new(text).block(block), bottom);
        return;
    }
    let now_secs = state.now_ms / 1000;
    let rows = sessions.iter().map(|(d, s)| {
        Row::new(vec![
            Cell::from(d.label()),
            Cell::from(s.id.to_string()),
            Cell::from(s.argv.join(" ")),
            Cell::from(s.local_pid.map_or("-".into(), |p| p.to_string())),
            Cell::from(s.remote_pid.to_string()),
            Cell::from(fmt_secs(now_secs.saturating_sub(s.started_unix))),
            Cell::from(fmt_total(s.bytes_in)),
            Cell::from(fmt_total(s.bytes_out)),
        ])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(17),
            Constraint::Length(4),
            Constraint::Min(16),
            Constraint::Length(6),
            Constraint::Length(6),
            Constraint::Length(7),
            Constraint::Length(6),
            Constraint::Length(6),
        ],
    )
    .header(
        Row::new([
            "daemon", "id", "argv", "l.pid", "r.pid", "runtime", "in", "out",
        ])
        .style(theme.title()),
    )
    .row_highlight_style(theme.selected())
    .block(block);
    let mut ts = TableState::default().with_selected(Some(state.selection.session));
    frame.render_stateful_widget(table, bottom, &mut ts);
}

// ---------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------

fn draw_logs(frame: &mut Frame, area: Rect, state: &State, theme: Theme) {
    let logs = &state.logs;
    let height = area.height.saturating_sub(2) as usize;
    let (lines, above_bottom) = logs.visible(height);
    let mode = if logs.follow {
        "following".to_owned()
    } else {
        format!("PAUSED {above_bottom} lines up")
    };
    let title = format!(
        " logs: {mode} · level {} · daemon {} · search {} · {} lines ",
        logs.min_rank.map_or("all", level_name),
        logs.source.as_deref().unwrap_or("all"),
        logs.search.as_deref().unwrap_or("-"),
        logs.len()
    );
    let text: Vec<Line> = if lines.is_empty() {
        vec![Line::from(Span::styled(
            if logs.is_empty() {
                "no log events yet"
            } else {
                "no log events match the filters"
            },
            theme.dim(),
        ))]
    } else {
        lines
            .into_iter()
            .map(|l| {
                Line::from(vec![
                    Span::styled(fmt_clock(l.ts_ms), theme.dim()),
                    Span::raw(" "),
                    Span::styled(
                        format!("{:<5}", l.level.to_uppercase()),
                        theme.level(&l.level),
                    ),
                    Span::raw(" "),
                    Span::styled(format!("{:<16}", l.source), theme.fg(Color::Blue)),
                    Span::raw(" "),
                    Span::raw(l.text.clone()),
                ])
            })
            .collect()
    };
    frame.render_widget(
        Paragraph::new(text).block(Block::bordered().title(title)),
        area,
    );
}

// ---------------------------------------------------------------------------------------
// Help
// ---------------------------------------------------------------------------------------

fn draw_help(frame: &mut Frame, area: Rect, _state: &State, theme: Theme) {
    let height = (BINDINGS.len() as u16 + 3).min(area.height);
    let width = 76.min(area.width);
    let popup = Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    };
    let rows = BINDINGS.iter().map(|b| {
        let scope = match b.scope {
            Scope::Global => "all".to_owned(),
            Scope::Only(v) => v.title().to_owned(),
        };
        Row::new(vec![
            Cell::from(b.label),
            Cell::from(scope),
            Cell::from(b.help),
        ])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(6),
            Constraint::Length(11),
            Constraint::Min(10),
        ],
    )
    .header(Row::new(["key", "view", "what it does"]).style(theme.title()))
    .block(Block::bordered().title(" keys (any key closes) "));
    frame.render_widget(Clear, popup);
    frame.render_widget(table, popup);
}

// ---------------------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------------------

/// `1.5K/s`, `12M/s`: a byte rate in four or five characters.
pub fn fmt_bytes(per_sec: u64) -> String {
    format!("{}/s", fmt_total(per_sec))
}

/// `812`, `1.5K`, `12M`, `3.0G`: a byte count in binary units.
pub fn fmt_total(n: u64) -> String {
    const UNITS: [&str; 5] = ["", "K", "M", "G", "T"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}")
    } else if v < 10.0 {
        format!("{v:.1}{}", UNITS[unit])
    } else {
        format!("{v:.0}{}", UNITS[unit])
    }
}

/// `850us`, `1.2ms`, `3.41s` (as `dpuctl status` prints them).
pub fn fmt_us(us: u64) -> String {
    crate::daemon::tools::human_rtt(us)
}

/// `42s`, `3m05s`, `2h07m`, `3d04h`.
pub fn fmt_secs(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// `HH:MM:SS.mmm` (UTC) of a timestamp in ms since the epoch.
pub fn fmt_clock(ts_ms: u64) -> String {
    let day_ms = ts_ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        (day_ms / 60_000) % 60,
        (day_ms / 1000) % 60,
        day_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_short_and_exact() {
        assert_eq!(fmt_total(812), "812");
        assert_eq!(fmt_total(1536), "1.5K");
        assert_eq!(fmt_total(12 * 1024 * 1024), "12M");
        assert_eq!(fmt_bytes(0), "0/s");
        assert_eq!(fmt_us(850), "850us");
        assert_eq!(fmt_us(1_200), "1.2ms");
        assert_eq!(fmt_secs(185), "3m05s");
        assert_eq!(fmt_secs(7_620), "2h07m");
        assert_eq!(fmt_clock(3_723_004), "01:02:03.004");
    }
}
