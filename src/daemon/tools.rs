//! `dpuctl status` and `dpuctl logs`: short-lived clients of every daemon's control socket.
//!
//! Each tool parses its own arguments (clap), builds a single-threaded tokio runtime and talks
//! to the sockets [`discover`](super::control::discover)ed in the run directory, all daemons at once. Rendering is pure
//! (`render_status_table`, `render_status_json`, `format_event`) so it is tested on fixed
//! values; the `*_command` functions take their output streams for the same reason.
//!
//! Exit codes (both tools): 0 every daemon answered; 1 some daemon could not be queried (or
//! the run directory could not be read, or output failed); 2 usage error; 3 no daemon found.
//! A closed stdout (`dpuctl logs | head`) ends the tool quietly with 0.

use std::ffi::OsString;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use clap::Parser;
use tokio::sync::mpsc;

use super::control::{prune_stale, try_discover, Client, ControlError, Request, DEFAULT_RUN_DIR};
use super::logging::no_color;
use super::logring::LogEvent;
use super::status::DaemonStatus;

/// Every daemon answered.
pub const EXIT_OK: u8 = 0;
/// Some daemon could not be queried, the run directory is unreadable, or output failed.
pub const EXIT_UNREACHABLE: u8 = 1;
/// Bad command line.
pub const EXIT_USAGE: u8 = 2;
/// No daemon found (no control socket in the run directory).
pub const EXIT_NONE: u8 = 3;

/// How long `dpuctl status` waits for each daemon.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// `dpuctl status`: what every dpuctl daemon on this machine is doing.
#[derive(Debug, Parser)]
#[command(
    name = "dpuctl status",
    about = "Show the state of every dpuctl daemon on this machine",
    after_help = "Exit status: 0 all daemons answered, 1 some did not, 3 none are running."
)]
struct StatusArgs {
    /// Print one JSON object {"daemons":[...]} for scripts.
    #[arg(long)]
    json: bool,
    /// Directory of the daemons' control sockets.
    #[arg(long, value_name = "DIR", env = "DPUCTL_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
}

/// The command line, for the manual page (`dpuctl man`).
pub(crate) fn status_cli() -> clap::Command {
    <StatusArgs as clap::CommandFactory>::command()
}

/// `dpuctl logs`: the daemons' recent and live log events.
#[derive(Debug, Parser)]
#[command(
    name = "dpuctl logs",
    about = "Show recent log events of the dpuctl daemons, merged by time",
    after_help = "Exit status: 0 all daemons answered, 1 some did not, 3 none are running."
)]
struct LogsArgs {
    /// Keep printing new events as they happen (Ctrl-C to stop).
    #[arg(short = 'f', long)]
    follow: bool,
    /// How many recent events to print first.
    #[arg(short = 'n', long = "lines", value_name = "N", default_value_t = 100)]
    lines: usize,
    /// Only this daemon: a socket name (`engine`, `mount-1234`) or a kind (`mount`).
    #[arg(long, value_name = "NAME")]
    daemon: Option<String>,
    /// Only events at LEVEL or more severe (error, warn, info, debug, trace). This filters
    /// what is shown; the daemons' own level is unchanged.
    #[arg(long, value_name = "LEVEL", value_parser = parse_level)]
    level: Option<u8>,
    /// One JSON event object per line.
    #[arg(long)]
    json: bool,
    /// Directory of the daemons' control sockets.
    #[arg(long, value_name = "DIR", env = "DPUCTL_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
}

/// The command line, for the manual page (`dpuctl man`).
pub(crate) fn logs_cli() -> clap::Command {
    <LogsArgs as clap::CommandFactory>::command()
}

/// Severity rank: lower is more severe; unknown levels rank 0 so they are always shown.
fn level_rank(level: &str) -> u8 {
    match level.to_ascii_lowercase().as_str() {
        "error" => 1,
        "warn" | "warning" => 2,
        "info" => 3,
        "debug" => 4,
        "trace" => 5,
        _ => 0,
    }
}

fn parse_level(text: &str) -> Result<u8, String> {
    match level_rank(text) {
        0 => Err(format!(
            "unknown level {text:?}: use error, warn, info, debug or trace"
        )),
        rank => Ok(rank),
    }
}

/// The daemon kind of a socket name: `mount-1234` -> `mount`, `engine` -> `engine`.
fn daemon_kind(socket_name: &str) -> &str {
    match socket_name.rsplit_once('-') {
        Some((kind, id)) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => kind,
        _ => socket_name,
    }
}

/// What one control socket said.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    Reachable(DaemonStatus),
    Unreachable {
        /// The daemon kind from the socket name (`mount` for `mount-1234.ctl`).
        name: String,
        control: PathBuf,
        error: String,
    },
}

/// Queries every socket at once, each within `timeout`; results in the sockets' order.
pub async fn probe_all(sockets: &[(String, PathBuf)], timeout: Duration) -> Vec<Probe> {
    let probes = sockets.iter().map(|(name, path)| async move {
        let asked = tokio::time::timeout(timeout, async {
            let mut client = Client::connect(path).await?.with_timeout(timeout);
            client.status().await
        })
        .await
        .unwrap_or_else(|_| {
            Err(ControlError::Timeout {
                path: path.clone(),
                after: timeout,
            })
        });
        match asked {
            Ok(mut status) => {
                if status.control.is_empty() {
                    status.control = path.display().to_string();
                }
                Probe::Reachable(status)
            }
            Err(error) => Probe::Unreachable {
                name: daemon_kind(name).to_owned(),
                control: path.clone(),
                error: error.to_string(),
            },
        }
    });
    futures::future::join_all(probes).await
}

/// `{"daemons":[...]}`: each status with `"reachable": true`, or for a socket that did not
/// answer `{"name","control","reachable":false,"error"}`.
pub fn render_status_json(probes: &[Probe]) -> serde_json::Value {
    let daemons: Vec<serde_json::Value> = probes
        .iter()
        .map(|probe| match probe {
            Probe::Reachable(status) => {
                let mut value = serde_json::to_value(status).unwrap_or_default();
                if let Some(object) = value.as_object_mut() {
                    object.insert("reachable".into(), true.into());
                }
                value
            }
            Probe::Unreachable {
                name,
                control,
                error,
            } => serde_json::json!({
                "name": name,
                "control": control.display().to_string(),
                "reachable": false,
                "error": error,
            }),
        })
        .collect();
    serde_json::json!({ "daemons": daemons })
}

/// `1.5 MiB`: binary units, one decimal above bytes.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `250us`, `1.5ms`, `2.01s`.
pub fn human_rtt(micros: u64) -> String {
    if micros < 1_000 {
        format!("{micros}us")
    } else if micros < 1_000_000 {
        format!("{:.1}ms", micros as f64 / 1_000.0)
    } else {
        format!("{:.2}s", micros as f64 / 1_000_000.0)
    }
}

fn human_secs(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// Lays out `rows` in columns two spaces apart; `right[i]` right-aligns column i.
fn table(indent: &str, rows: &[Vec<String>], right: &[bool]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::from(indent);
        for (c, cell) in row.iter().enumerate() {
            if c > 0 {
                line.push_str("  ");
            }
            let pad = widths[c].saturating_sub(cell.chars().count());
            if right.get(c).copied().unwrap_or(false) {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The human `dpuctl status` output: one block per daemon, blank lines between.
pub fn render_status_table(probes: &[Probe]) -> String {
    let blocks: Vec<String> = probes.iter().map(render_probe).collect();
    blocks.join("\n")
}

fn render_probe(probe: &Probe) -> String {
    let status = match probe {
        Probe::Unreachable {
            name,
            control,
            error,
        } => {
            return format!(
                "{name} (unreachable)\n  control:     {}\n  error:       {error}\n",
                control.display()
            )
        }
        Probe::Reachable(status) => status,
    };
    let mut out = format!(
        "{} (pid {}, up {}, version {}, log level {})\n",
        status.name,
        status.pid,
        human_secs(status.uptime_secs),
        if status.version.is_empty() {
            "unknown"
        } else {
            &status.version
        },
        if status.log_level.is_empty() {
            "unknown"
        } else {
            &status.log_level
        },
    );
    out.push_str(&format!("  control:     {}\n", status.control));
    let listen = if status.listen.is_empty() {
        "none".to_owned()
    } else {
        status.listen.join(", ")
    };
    out.push_str(&format!("  listening:   {listen}\n"));
    if !status.allowlists.is_empty() {
        let counts: Vec<String> = status
            .allowlists
            .iter()
            .filter(|(_, paths)| !paths.is_empty())
            .map(|(kind, paths)| format!("{kind} {}", paths.len()))
            .collect();
        let text = if counts.is_empty() {
            "all empty (everything denied)".to_owned()
        } else {
            counts.join(", ")
        };
        out.push_str(&format!("  allowlists:  {text}\n"));
    }
    if !status.counters.is_empty() {
        let counters: Vec<String> = status
            .counters
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        out.push_str(&format!("  counters:    {}\n", counters.join(", ")));
    }
    if let Some(m) = &status.mount {
        out.push_str(&format!(
            "  mount:       {} on {} ({})\n",
            m.remote, m.local, m.state
        ));
        if !m.options.is_empty() {
            out.push_str(&format!("  options:     {}\n", m.options));
        }
    }
    out.push_str(&peers_section(status));
    if let Some(m) = &status.mount {
        if !m.ops.is_empty() {
            out.push_str("  operations:\n");
            let mut rows = vec![["OP", "COUNT", "ERRORS", "P50", "P99"]
                .map(str::to_owned)
                .to_vec()];
            for (name, op) in &m.ops {
                rows.push(vec![
                    name.clone(),
                    op.count.to_string(),
                    op.errors.to_string(),
                    human_rtt(op.p50_us),
                    human_rtt(op.p99_us),
                ]);
            }
            out.push_str(&table("    ", &rows, &[false, true, true, true, true]));
        }
    }
    if !status.connections.is_empty() {
        out.push_str("  connections:\n");
        let mut rows = vec![["ID", "PATH", "TYPE", "DIRECTION", "IN", "OUT", "AGE"]
            .map(str::to_owned)
            .to_vec()];
        for c in &status.connections {
            rows.push(vec![
                c.id.to_string(),
                c.path.clone(),
                c.kind.clone(),
                c.direction.clone(),
                human_bytes(c.bytes_in),
                human_bytes(c.bytes_out),
                human_secs(c.age_secs),
            ]);
        }
        out.push_str(&table(
            "    ",
            &rows,
            &[true, false, false, false, true, true, false],
        ));
    }
    if !status.sessions.is_empty() {
        out.push_str("  sessions:\n");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut rows = vec![["ID", "PID", "CLIENT PID", "FOR", "IN", "OUT", "COMMAND"]
            .map(str::to_owned)
            .to_vec()];
        for x in &status.sessions {
            rows.push(vec![
                x.id.to_string(),
                x.remote_pid.to_string(),
                x.local_pid.map_or_else(|| "-".into(), |p| p.to_string()),
                human_secs(now.saturating_sub(x.started_unix)),
                human_bytes(x.bytes_in),
                human_bytes(x.bytes_out),
                x.argv.join(" "),
            ]);
        }
        out.push_str(&table(
            "    ",
            &rows,
            &[true, true, true, false, true, true, false],
        ));
    }
    out
}

/// The peers table of one daemon (or `peers: none`), with their last errors.
fn peers_section(status: &DaemonStatus) -> String {
    let mut out = String::new();
    if status.peers.is_empty() {
        out.push_str("  peers:       none\n");
        return out;
    }
    out.push_str("  peers:\n");
    let mut rows = vec![["ADDRESS", "ROLE", "STATE", "IN", "OUT", "RTT", "FOR"]
        .map(str::to_owned)
        .to_vec()];
    let mut errors = Vec::new();
    for peer in &status.peers {
        let state = serde_json::to_value(peer.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        rows.push(vec![
            peer.address.clone(),
            peer.role.clone().unwrap_or_else(|| "-".into()),
            state,
            human_bytes(peer.bytes_in),
            human_bytes(peer.bytes_out),
            peer.rtt_us.map(human_rtt).unwrap_or_else(|| "-".into()),
            human_secs(peer.since_secs),
        ]);
        if let Some(error) = &peer.last_error {
            errors.push(format!("    {}: {error}\n", peer.address));
        }
    }
    out.push_str(&table(
        "    ",
        &rows,
        &[false, false, false, true, true, true, false],
    ));
    if !errors.is_empty() {
        out.push_str("  last errors:\n");
        for error in errors {
            out.push_str(&error);
        }
    }
    out
}

/// Runs `dpuctl status` with `args` (`args[0]` is the program name, as clap expects),
/// writing to `out` and `err`; returns the exit code.
pub fn status_command(args: Vec<OsString>, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let args = match StatusArgs::try_parse_from(args) {
        Ok(args) => args,
        Err(e) => return clap_exit(e, out, err),
    };
    for gone in prune_stale(&args.run_dir) {
        let _ = writeln!(
            err,
            "dpuctl status: removed {}: its daemon is gone",
            gone.display()
        );
    }
    let sockets = match try_discover(&args.run_dir) {
        Ok(sockets) => sockets,
        Err(e) => {
            let _ = writeln!(
                err,
                "dpuctl status: cannot read {}: {e}; run as root or pass --run-dir",
                args.run_dir.display()
            );
            return EXIT_UNREACHABLE;
        }
    };
    if sockets.is_empty() {
        if args.json {
            let _ = writeln!(out, "{}", render_status_json(&[]));
        }
        let _ = writeln!(err, "{}", none_running(&args.run_dir));
        return EXIT_NONE;
    }
    let probes = match runtime() {
        Ok(rt) => rt.block_on(probe_all(&sockets, STATUS_TIMEOUT)),
        Err(e) => {
            let _ = writeln!(err, "dpuctl status: {e}");
            return EXIT_UNREACHABLE;
        }
    };
    let text = if args.json {
        let value = render_status_json(&probes);
        let mut text = serde_json::to_string_pretty(&value).unwrap_or_else(|_| value.to_string());
        text.push('\n');
        text
    } else {
        render_status_table(&probes)
    };
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == io::ErrorKind::BrokenPipe {
            return EXIT_OK;
        }
        let _ = writeln!(err, "dpuctl status: cannot write the output: {e}");
        return EXIT_UNREACHABLE;
    }
    if probes.iter().all(|p| matches!(p, Probe::Reachable(_))) {
        EXIT_OK
    } else {
        EXIT_UNREACHABLE
    }
}

/// `dpuctl status` on the process's stdout and stderr.
pub fn status_main(args: Vec<OsString>) -> ExitCode {
    ExitCode::from(status_command(
        args,
        &mut io::stdout().lock(),
        &mut io::stderr().lock(),
    ))
}

fn none_running(run_dir: &Path) -> String {
    format!(
        "no dpuctl daemons are running (no control sockets in {})",
        run_dir.display()
    )
}

fn clap_exit(e: clap::Error, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let text = e.render().to_string();
    if e.use_stderr() {
        let _ = write!(err, "{text}");
        EXIT_USAGE
    } else {
        // --help and --version
        let _ = write!(out, "{text}");
        EXIT_OK
    }
}

fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// A field value as `key=value` shows it: bare when it is a plain word, quoted otherwise.
fn field_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s)
            if !s.is_empty()
                && !s
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '=') =>
        {
            s.clone()
        }
        other => other.to_string(),
    }
}

/// One human log line: `TIME LEVEL daemon: message key=value...`, the level coloured when
/// `colour`. The time is UTC with milliseconds, as RFC 3339.
pub fn format_event(event: &LogEvent, colour: bool) -> String {
    let time = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(event.ts_ms));
    let level = event.level.to_ascii_uppercase();
    let padded = format!("{level:<5}");
    let level = if colour {
        let code = match level_rank(&event.level) {
            1 => "31",
            2 => "33",
            3 => "32",
            4 => "34",
            5 => "35",
            _ => "0",
        };
        format!("\x1b[{code}m{padded}\x1b[0m")
    } else {
        padded
    };
    let mut line = format!("{time} {level} {}: {}", event.daemon, event.message);
    for (key, value) in &event.fields {
        line.push(' ');
        line.push_str(key);
        line.push('=');
        line.push_str(&field_text(value));
    }
    line
}

/// Which sockets `--daemon NAME` selects: exact socket names, else every socket of that kind.
fn select_daemons(sockets: Vec<(String, PathBuf)>, wanted: Option<&str>) -> Vec<(String, PathBuf)> {
    let Some(wanted) = wanted else {
        return sockets;
    };
    if sockets.iter().any(|(name, _)| name == wanted) {
        return sockets.into_iter().filter(|(n, _)| n == wanted).collect();
    }
    sockets
        .into_iter()
        .filter(|(name, _)| daemon_kind(name) == wanted)
        .collect()
}

/// Merges backlogs of several daemons: sorted by time (stable, so each daemon's own order is
/// kept for equal times), filtered by `min_rank`, the last `n`.
pub fn merge_backlogs(
    backlogs: Vec<Vec<LogEvent>>,
    min_rank: Option<u8>,
    n: usize,
) -> Vec<LogEvent> {
    let mut events: Vec<LogEvent> = backlogs
        .into_iter()
        .flatten()
        .filter(|e| min_rank.map_or(true, |max| level_rank(&e.level) <= max))
        .collect();
    events.sort_by_key(|e| e.ts_ms);
    let skip = events.len().saturating_sub(n);
    events.split_off(skip)
}

/// What a per-daemon reader reports to the printing loop.
enum Feed {
    Event(LogEvent),
    /// The daemon's stream ended; `Some` when it ended with an error.
    Ended(String, Option<String>),
}

/// Output that stops quietly on a closed pipe.
struct Printer<'a> {
    out: &'a mut dyn Write,
    json: bool,
    colour: bool,
    min_rank: Option<u8>,
}

impl Printer<'_> {
    fn print(&mut self, event: &LogEvent) -> io::Result<()> {
        if self
            .min_rank
            .is_some_and(|max| level_rank(&event.level) > max)
        {
            return Ok(());
        }
        let line = if self.json {
            serde_json::to_string(event).map_err(io::Error::other)?
        } else {
            format_event(event, self.colour)
        };
        writeln!(self.out, "{line}")
    }
}

/// Runs `dpuctl logs` with `args` (`args[0]` is the program name), writing to `out` and
/// `err`; `colour` says whether human lines may be coloured. Returns the exit code.
pub fn logs_command(
    args: Vec<OsString>,
    out: &mut dyn Write,
    err: &mut dyn Write,
    colour: bool,
) -> u8 {
    let args = match LogsArgs::try_parse_from(args) {
        Ok(args) => args,
        Err(e) => return clap_exit(e, out, err),
    };
    for gone in prune_stale(&args.run_dir) {
        let _ = writeln!(
            err,
            "dpuctl logs: removed {}: its daemon is gone",
            gone.display()
        );
    }
    let sockets = match try_discover(&args.run_dir) {
        Ok(sockets) => sockets,
        Err(e) => {
            let _ = writeln!(
                err,
                "dpuctl logs: cannot read {}: {e}; run as root or pass --run-dir",
                args.run_dir.display()
            );
            return EXIT_UNREACHABLE;
        }
    };
    if sockets.is_empty() {
        let _ = writeln!(err, "{}", none_running(&args.run_dir));
        return EXIT_NONE;
    }
    let running: Vec<String> = sockets.iter().map(|(n, _)| n.clone()).collect();
    let selected = select_daemons(sockets, args.daemon.as_deref());
    if selected.is_empty() {
        let _ = writeln!(
            err,
            "dpuctl logs: no daemon named {:?} in {} (running: {})",
            args.daemon.as_deref().unwrap_or_default(),
            args.run_dir.display(),
            running.join(", ")
        );
        return EXIT_NONE;
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(err, "dpuctl logs: {e}");
            return EXIT_UNREACHABLE;
        }
    };
    let mut printer = Printer {
        out,
        json: args.json,
        colour: colour && !args.json,
        min_rank: args.level,
    };
    let result = rt.block_on(run_logs(&args, selected, &mut printer, err));
    match result {
        Ok(code) => code,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => EXIT_OK,
        Err(e) => {
            let _ = writeln!(err, "dpuctl logs: cannot write the output: {e}");
            EXIT_UNREACHABLE
        }
    }
}

/// Names an event's daemon by its control socket (`mount-1234`, not `mount`), so events of
/// several mounts can be told apart.
fn label(event: &mut LogEvent, socket_name: &str) {
    if event.daemon == daemon_kind(socket_name) && event.daemon != socket_name {
        event.daemon = socket_name.to_owned();
    }
}

/// Connects to one daemon and asks for its logs; returns the client and its backlog.
async fn open_logs(
    path: &Path,
    backlog: usize,
    follow: bool,
) -> Result<(Client, Vec<LogEvent>), ControlError> {
    let mut client = Client::connect(path).await?;
    let fields = client.request(&Request::Logs { backlog, follow }).await?;
    let count = fields
        .get("backlog")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    let mut events = Vec::new();
    for _ in 0..count {
        match client.next_event().await? {
            Some(event) => events.push(event),
            None => break,
        }
    }
    Ok((client, events))
}

async fn run_logs(
    args: &LogsArgs,
    selected: Vec<(String, PathBuf)>,
    printer: &mut Printer<'_>,
    err: &mut dyn Write,
) -> io::Result<u8> {
    // With a level filter, take the whole ring so that -n counts shown events.
    let backlog = if args.level.is_some() {
        args.lines.max(super::logring::DEFAULT_CAPACITY)
    } else {
        args.lines
    };
    let opened = futures::future::join_all(selected.iter().map(|(name, path)| async move {
        (name.clone(), open_logs(path, backlog, args.follow).await)
    }))
    .await;
    let mut code = EXIT_OK;
    let mut backlogs = Vec::new();
    let mut clients = Vec::new();
    for (name, result) in opened {
        match result {
            Ok((client, mut events)) => {
                events.iter_mut().for_each(|e| label(e, &name));
                backlogs.push(events);
                clients.push((name, client));
            }
            Err(e) => {
                writeln!(err, "dpuctl logs: {name}: {e}")?;
                code = EXIT_UNREACHABLE;
            }
        }
    }
    for event in merge_backlogs(backlogs, args.level, args.lines) {
        printer.print(&event)?;
    }
    printer.out.flush()?;
    if !args.follow || clients.is_empty() {
        return Ok(code);
    }

    // Live: one reader task per daemon feeding one channel, printed as events arrive.
    let (tx, mut rx) = mpsc::channel::<Feed>(1024);
    for (name, mut client) in clients {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                match client.next_event().await {
                    Ok(Some(mut event)) => {
                        label(&mut event, &name);
                        if tx.send(Feed::Event(event)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        let _ = tx.send(Feed::Ended(name, None)).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Feed::Ended(name, Some(e.to_string()))).await;
                        return;
                    }
                }
            }
        });
    }
    drop(tx);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let feed = tokio::select! {
            _ = &mut ctrl_c => return Ok(code),
            feed = rx.recv() => feed,
        };
        match feed {
            None => return Ok(code),
            Some(Feed::Event(event)) => {
                printer.print(&event)?;
                printer.out.flush()?;
            }
            Some(Feed::Ended(name, None)) => {
                writeln!(err, "dpuctl logs: {name} closed its log stream (stopped?)")?;
            }
            Some(Feed::Ended(name, Some(e))) => {
                writeln!(err, "dpuctl logs: {name}: {e}")?;
                code = EXIT_UNREACHABLE;
            }
        }
    }
}

/// `dpuctl logs` on the process's stdout and stderr, coloured when stdout is a terminal and
/// `NO_COLOR` is unset.
pub fn logs_main(args: Vec<OsString>) -> ExitCode {
    let colour = io::stdout().is_terminal() && !no_color();
    ExitCode::from(logs_command(
        args,
        &mut io::stdout().lock(),
        &mut io::stderr().lock(),
        colour,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::status::{PeerState, PeerStatus};
    use std::collections::BTreeMap;

    fn fixed_status() -> DaemonStatus {
        let mut allowlists = BTreeMap::new();
        allowlists.insert(
            "open".to_owned(),
            vec!["/var/lib/docker".to_owned(), "/proc".to_owned()],
        );
        allowlists.insert("udsconnect".to_owned(), vec!["/run/containerd".to_owned()]);
        allowlists.insert("write".to_owned(), vec![]);
        let mut counters = BTreeMap::new();
        counters.insert("handshakes_refused".to_owned(), 1);
        counters.insert("requests".to_owned(), 1000);
        DaemonStatus {
            name: "engine".into(),
            pid: 4242,
            control: "/var/run/qtfs/engine.ctl".into(),
            version: "0.1.0".into(),
            uptime_secs: 3661,
            listen: vec!["tcp://0.0.0.0:12345".into(), "tcp://0.0.0.0:12121".into()],
            peers: vec![
                PeerStatus {
                    address: "tcp://10.0.0.2:41000".into(),
                    state: PeerState::Connected,
                    bytes_in: 1_572_864,
                    bytes_out: 524_288,
                    role: Some("mount".into()),
                    rtt_us: Some(250),
                    since_secs: 300,
                    last_error: None,
                },
                PeerStatus {
                    address: "tcp://10.0.0.3:41000".into(),
                    state: PeerState::AuthFailed,
                    bytes_in: 0,
                    bytes_out: 17,
                    role: None,
                    rtt_us: None,
                    since_secs: 10,
                    last_error: Some("handshake refused: wrong key".into()),
                },
            ],
            allowlists,
            log_level: "info".into(),
            counters,
            mount: None,
            connections: Vec::new(),
            sessions: Vec::new(),
        }
    }

    #[test]
    fn status_table_golden() {
        let probes = vec![
            Probe::Reachable(fixed_status()),
            Probe::Unreachable {
                name: "udsproxyd".into(),
                control: "/var/run/qtfs/udsproxyd.ctl".into(),
                error:
                    "stale control socket /var/run/qtfs/udsproxyd.ctl: the daemon is not running"
                        .into(),
            },
        ];
        let expected = "\
engine (pid 4242, up 1h 1m 1s, version 0.1.0, log level info)
  control:     /var/run/qtfs/engine.ctl
  listening:   tcp://0.0.0.0:12345, tcp://0.0.0.0:12121
  allowlists:  open 2, udsconnect 1
  counters:    handshakes_refused 1, requests 1000
  peers:
    ADDRESS               ROLE   STATE             IN        OUT    RTT  FOR
    tcp://10.0.0.2:41000  mount  connected    1.5 MiB  512.0 KiB  250us  5m
    tcp://10.0.0.3:41000  -      auth_failed      0 B       17 B      -  10s
  last errors:
    tcp://10.0.0.3:41000: handshake refused: wrong key

udsproxyd (unreachable)
  control:     /var/run/qtfs/udsproxyd.ctl
  error:       stale control socket /var/run/qtfs/udsproxyd.ctl: the daemon is not running
";
        assert_eq!(render_status_table(&probes), expected);
    }

    #[test]
    fn status_table_without_peers_or_allowlist_entries() {
        let mut status = fixed_status();
        status.peers.clear();
        status.listen.clear();
        status.counters.clear();
        for paths in status.allowlists.values_mut() {
            paths.clear();
        }
        status.version.clear();
        let expected = "\
engine (pid 4242, up 1h 1m 1s, version unknown, log level info)
  control:     /var/run/qtfs/engine.ctl
  listening:   none
  allowlists:  all empty (everything denied)
  peers:       none
";
        assert_eq!(render_status_table(&[Probe::Reachable(status)]), expected);
    }

    #[test]
    fn status_json_keeps_the_fixed_field_names() {
        let probes = vec![
            Probe::Reachable(fixed_status()),
            Probe::Unreachable {
                name: "mount".into(),
                control: "/var/run/qtfs/mount-77.ctl".into(),
                error: "no daemon at /var/run/qtfs/mount-77.ctl (is it running?)".into(),
            },
        ];
        let value = render_status_json(&probes);
        let daemons = value["daemons"].as_array().expect("daemons array");
        assert_eq!(daemons.len(), 2);
        let engine = &daemons[0];
        assert_eq!(engine["name"], "engine");
        assert_eq!(engine["pid"], 4242);
        assert_eq!(engine["control"], "/var/run/qtfs/engine.ctl");
        assert_eq!(engine["reachable"], true);
        assert_eq!(engine["peers"][0]["address"], "tcp://10.0.0.2:41000");
        assert_eq!(engine["peers"][0]["state"], "connected");
        assert_eq!(engine["peers"][0]["bytes_in"], 1_572_864);
        assert_eq!(engine["peers"][0]["bytes_out"], 524_288);
        assert_eq!(engine["peers"][1]["state"], "auth_failed");
        assert_eq!(
            daemons[1],
            serde_json::json!({
                "name": "mount",
                "control": "/var/run/qtfs/mount-77.ctl",
                "reachable": false,
                "error": "no daemon at /var/run/qtfs/mount-77.ctl (is it running?)",
            })
        );
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
        assert_eq!(human_rtt(999), "999us");
        assert_eq!(human_rtt(1_500), "1.5ms");
        assert_eq!(human_rtt(2_010_000), "2.01s");
    }

    fn event(ts_ms: u64, level: &str, daemon: &str, message: &str) -> LogEvent {
        LogEvent {
            ts_ms,
            level: level.into(),
            daemon: daemon.into(),
            target: "dpuctl::test".into(),
            message: message.into(),
            fields: serde_json::Map::new(),
        }
    }

    #[test]
    fn event_lines_golden() {
        let mut e = event(1_700_000_000_123, "warn", "engine", "open refused");
        e.fields.insert("path".into(), "/var/lib/docker".into());
        e.fields.insert("peer".into(), "tcp://10.0.0.2:1".into());
        e.fields.insert("reason".into(), "not in allowlist".into());
        e.fields.insert("uid".into(), 0.into());
        assert_eq!(
            format_event(&e, false),
            "2023-11-14T22:13:20.123Z WARN  engine: open refused path=/var/lib/docker \
             peer=tcp://10.0.0.2:1 reason=\"not in allowlist\" uid=0"
        );
        assert_eq!(
            format_event(&event(0, "error", "udsproxyd", "boom"), true),
            "1970-01-01T00:00:00.000Z \x1b[31mERROR\x1b[0m udsproxyd: boom"
        );
    }

    #[test]
    fn backlogs_merge_by_time_filter_by_level_and_keep_the_last_n() {
        let a = vec![
            event(1, "info", "engine", "a1"),
            event(4, "debug", "engine", "a4"),
            event(6, "error", "engine", "a6"),
        ];
        let b = vec![
            event(2, "warn", "udsproxyd", "b2"),
            event(5, "info", "udsproxyd", "b5"),
        ];
        let messages = |events: Vec<LogEvent>| -> Vec<String> {
            events.into_iter().map(|e| e.message).collect()
        };
        assert_eq!(
            messages(merge_backlogs(vec![a.clone(), b.clone()], None, 10)),
            ["a1", "b2", "a4", "b5", "a6"]
        );
        assert_eq!(
            messages(merge_backlogs(vec![a.clone(), b.clone()], None, 2)),
            ["b5", "a6"]
        );
        assert_eq!(
            messages(merge_backlogs(vec![a, b], Some(level_rank("warn")), 10)),
            ["b2", "a6"]
        );
    }

    #[test]
    fn daemon_selection_by_name_or_kind() {
        let sockets: Vec<(String, PathBuf)> = ["engine", "mount-12", "mount-7", "udsproxyd"]
            .iter()
            .map(|n| (n.to_string(), PathBuf::from(format!("/r/{n}.ctl"))))
            .collect();
        let names =
            |s: Vec<(String, PathBuf)>| -> Vec<String> { s.into_iter().map(|(n, _)| n).collect() };
        assert_eq!(
            names(select_daemons(sockets.clone(), Some("mount"))),
            ["mount-12", "mount-7"]
        );
        assert_eq!(
            names(select_daemons(sockets.clone(), Some("mount-7"))),
            ["mount-7"]
        );
        assert!(select_daemons(sockets.clone(), Some("rexec_server")).is_empty());
        assert_eq!(select_daemons(sockets.clone(), None).len(), 4);
        assert_eq!(daemon_kind("rexec_server"), "rexec_server");
        assert_eq!(daemon_kind("mount-"), "mount-");
    }

    #[test]
    fn usage_errors_and_empty_run_dirs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let run_dir = dir.path().to_str().expect("utf-8 temp path").to_owned();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = status_command(vec!["status".into(), "--bogus".into()], &mut out, &mut err);
        assert_eq!(code, EXIT_USAGE);
        assert!(String::from_utf8_lossy(&err).contains("--bogus"));

        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = status_command(
            vec![
                "status".into(),
                "--json".into(),
                "--run-dir".into(),
                run_dir.clone().into(),
            ],
            &mut out,
            &mut err,
        );
        assert_eq!(code, EXIT_NONE);
        assert_eq!(String::from_utf8_lossy(&out), "{\"daemons\":[]}\n");
        assert_eq!(
            String::from_utf8_lossy(&err),
            format!("no dpuctl daemons are running (no control sockets in {run_dir})\n")
        );

        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = logs_command(
            vec!["logs".into(), "--level".into(), "loud".into()],
            &mut out,
            &mut err,
            false,
        );
        assert_eq!(code, EXIT_USAGE);
        assert!(String::from_utf8_lossy(&err).contains("unknown level \"loud\""));

        let (mut out, mut err) = (Vec::new(), Vec::new());
        let missing = dir.path().join("missing");
        let code = logs_command(
            vec!["logs".into(), "--run-dir".into(), missing.into()],
            &mut out,
            &mut err,
            false,
        );
        assert_eq!(code, EXIT_NONE);
        assert!(String::from_utf8_lossy(&err).starts_with("no dpuctl daemons are running"));
    }
}
