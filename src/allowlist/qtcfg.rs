//! `qtcfg`: allowlist administration with the original tool's flags, applied live through a
//! running daemon's control socket.
//!
//! The tool is split so that everything but the socket round trip is a pure function with
//! unit tests: [`parse_args`] turns argv into an [`Invocation`], [`select_sockets`] picks the
//! daemon, [`Outcome::from_answer`] reads the daemon's answer and [`Outcome::render_text`] /
//! [`Outcome::render_json`] print it.
//!
//! Concurrency: a short-lived client; [`main`] runs one request on a current-thread tokio
//! runtime and exits. Exit status: 0 success, 1 runtime failure (no daemon, refused, daemon
//! error), 2 usage error (bad flags, unknown type, bad path or index).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde::Serialize;
use serde_json::{Map, Value};

use super::{normalize_entry, ListType};
use crate::daemon::control::{socket_path, Client, Request, DEFAULT_RUN_DIR};

/// Exit status of a runtime failure.
const EXIT_RUNTIME: u8 = 1;
/// Exit status of a usage error.
const EXIT_USAGE: u8 = 2;

/// How long one request may take, connect included: a daemon that is alive answers
/// allowlist requests from memory in microseconds, so this only catches a hung daemon.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

const ABOUT: &str = "Show and change the allowlists of a running engine or udsproxyd";

const LONG_ABOUT: &str = "\
Show and change the default-deny path allowlists (/etc/qtfs/whitelist) of a running dpuctl \
engine or udsproxyd, with the flags of openEuler's qtcfg. Changes apply to the next request \
at once; with --persist the daemon also rewrites its whitelist file, otherwise the change \
lasts until the daemon restarts or reloads.

Types (case-insensitive): open write read readdir mkdir rmdir create unlink rename setattr \
setxattr mount (checked by the qtfs engine), kill (rexec), udsconnect (udsproxyd).

An entry allows the path itself and everything below it by whole components: /var/lib/docker \
covers /var/lib/docker/x but not /var/lib/dockerx.";

const AFTER_HELP: &str = "\
Examples:
  qtcfg -z                                  list every allowlist
  qtcfg -z udsconnect                       list one type (same as: qtcfg -w udsconnect -z)
  qtcfg -w udsconnect -x /var/run/rexec     allow connecting to sockets below /var/run/rexec
  qtcfg -w open -x /var/lib/docker --persist
                                            allow opening below /var/lib/docker, and save it
  qtcfg -w udsconnect -y 0                  delete entry [index:0] (later entries move up)
  qtcfg --json -z open                      machine-readable output

Exit status: 0 success, 1 runtime failure (no daemon, permission, daemon error), 2 usage error.
See docs/qtcfg.md and docs/allowlists.md.";

/// The command line, with the original's short flags.
#[derive(Debug, Parser)]
#[command(
    name = "qtcfg",
    bin_name = "qtcfg",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP
)]
struct Cli {
    /// Allowlist type for -x, -y or -z (case-insensitive): open, write, read, readdir, mkdir,
    /// rmdir, create, unlink, rename, setattr, setxattr, mount, kill, udsconnect
    #[arg(short = 'w', value_name = "TYPE", value_parser = parse_type)]
    list_type: Option<ListType>,

    /// Add an absolute PATH (and everything below it) to the -w TYPE allowlist
    #[arg(short = 'x', value_name = "PATH", group = "action")]
    add: Option<String>,

    /// Delete entry INDEX (the N of [index:N] in the -z listing) from the -w TYPE allowlist
    #[arg(
        short = 'y',
        value_name = "INDEX",
        group = "action",
        allow_hyphen_values = true
    )]
    delete: Option<String>,

    /// List the allowlist of TYPE (or of -w TYPE), or all of them
    #[arg(short = 'z', value_name = "TYPE", num_args = 0..=1, group = "action", value_parser = parse_type)]
    list: Option<Option<ListType>>,

    /// Print machine-readable JSON on stdout (and JSON errors on stderr)
    #[arg(long)]
    json: bool,

    /// Daemon to talk to: engine, udsproxyd, or the path of a control socket [default: the
    /// running one; udsproxyd first for udsconnect, the engine first otherwise]
    #[arg(long, value_name = "engine|udsproxyd|SOCKET", value_parser = parse_target)]
    target: Option<Target>,

    /// Directory holding the daemons' control sockets
    #[arg(long, value_name = "DIR", env = "DPUCTL_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
    run_dir: PathBuf,

    /// With -x or -y: also have the daemon rewrite its whitelist file (atomically)
    #[arg(long)]
    persist: bool,
}

/// The command line, for the manual page (`dpuctl man`).
pub(crate) fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

fn parse_type(s: &str) -> Result<ListType, String> {
    s.parse::<ListType>().map_err(|e| e.to_string())
}

fn parse_target(s: &str) -> Result<Target, String> {
    if s.eq_ignore_ascii_case("engine") {
        Ok(Target::Daemon(DaemonName::Engine))
    } else if s.eq_ignore_ascii_case("udsproxyd") {
        Ok(Target::Daemon(DaemonName::Udsproxyd))
    } else if s.contains('/') {
        Ok(Target::Socket(PathBuf::from(s)))
    } else {
        Err(format!(
            "unknown target '{s}': use engine, udsproxyd or the path of a control socket \
             (e.g. {DEFAULT_RUN_DIR}/engine.ctl)"
        ))
    }
}

fn parse_index(s: &str) -> Result<usize, String> {
    s.parse::<usize>().map_err(|_| {
        format!(
            "index '{s}' is not a number: give the N of [index:N] shown by `qtcfg -z TYPE` (0, 1, ...)"
        )
    })
}

/// A daemon with a well-known control socket name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonName {
    Engine,
    Udsproxyd,
}

impl DaemonName {
    /// The control socket's base name (`engine.ctl`) without `.ctl`.
    pub fn name(self) -> &'static str {
        match self {
            DaemonName::Engine => "engine",
            DaemonName::Udsproxyd => "udsproxyd",
        }
    }
}

/// Which daemon to ask (`--target`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Whichever runs, preferring the one that enforces the type.
    Auto,
    /// That daemon's socket in the run directory.
    Daemon(DaemonName),
    /// An explicit control socket path.
    Socket(PathBuf),
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `-z [TYPE]` / `-w TYPE -z`: list one type or all.
    List(Option<ListType>),
    /// `-w TYPE -x PATH`: add the normalised PATH.
    Add { list_type: ListType, path: String },
    /// `-w TYPE -y INDEX`: delete entry INDEX.
    Delete { list_type: ListType, index: usize },
}

impl Action {
    /// The type the action is about, which decides the preferred daemon.
    fn list_type(&self) -> Option<ListType> {
        match self {
            Action::List(t) => *t,
            Action::Add { list_type, .. } | Action::Delete { list_type, .. } => Some(*list_type),
        }
    }

    fn request(&self, persist: bool) -> Request {
        match self {
            Action::List(t) => Request::AllowlistList { list_type: *t },
            Action::Add { list_type, path } => Request::AllowlistAdd {
                list_type: *list_type,
                path: path.clone(),
                persist,
            },
            Action::Delete { list_type, index } => Request::AllowlistDelete {
                list_type: *list_type,
                index: *index,
                persist,
            },
        }
    }
}

/// A parsed, validated command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub action: Action,
    pub json: bool,
    pub target: Target,
    pub run_dir: PathBuf,
    pub persist: bool,
}

/// Why [`parse_args`] did not produce an [`Invocation`].
#[derive(Debug)]
pub enum ParseStop {
    /// `--help` or `--version`: clap's own text, printed by clap on stdout.
    Clap(clap::Error),
    /// No arguments at all: the short help, for stderr, as a usage error.
    NoArguments(String),
    /// A usage error, as one line (without the `qtcfg: ` prefix).
    Usage(String),
}

/// Parses and validates argv (`args[0]` is the program name).
pub fn parse_args(args: Vec<OsString>) -> Result<Invocation, ParseStop> {
    // Checked here, not by clap's arg_required_else_help: DPUCTL_RUN_DIR in the environment
    // counts as an argument for clap.
    if args.len() <= 1 {
        let help = <Cli as clap::CommandFactory>::command().render_help();
        return Err(ParseStop::NoArguments(help.to_string()));
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            return Err(match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ParseStop::Clap(e)
                }
                _ => ParseStop::Usage(one_line(&e.render().to_string())),
            })
        }
    };
    let usage = |s: String| ParseStop::Usage(s);
    let need_type = |flag: &str, example: &str| {
        usage(format!(
            "{flag} needs -w TYPE to say which allowlist, e.g. `qtcfg -w udsconnect {flag} {example}`"
        ))
    };
    let action = if let Some(path) = cli.add {
        let list_type = cli
            .list_type
            .ok_or_else(|| need_type("-x", "/var/run/rexec"))?;
        let normal = normalize_entry(&path).map_err(|e| usage(e.to_string()))?;
        let path = normal
            .to_str()
            .ok_or_else(|| usage(format!("{path:?} is not valid UTF-8")))?
            .to_string();
        Action::Add { list_type, path }
    } else if let Some(index) = cli.delete {
        let list_type = cli.list_type.ok_or_else(|| need_type("-y", "0"))?;
        let index = parse_index(&index).map_err(usage)?;
        Action::Delete { list_type, index }
    } else if let Some(z) = cli.list {
        match (cli.list_type, z) {
            (Some(w), Some(z)) if w != z => {
                return Err(usage(format!(
                "-w {w} and -z {z} name different types: give the type once, e.g. `qtcfg -z {z}`"
            )))
            }
            (w, z) => Action::List(z.or(w)),
        }
    } else {
        return Err(usage(
            "nothing to do: add -x PATH (add), -y INDEX (delete) or -z (list)".to_string(),
        ));
    };
    if cli.persist && matches!(action, Action::List(_)) {
        return Err(usage(
            "--persist only applies to -x and -y: listing changes nothing".to_string(),
        ));
    }
    Ok(Invocation {
        action,
        json: cli.json,
        target: cli.target.unwrap_or(Target::Auto),
        run_dir: cli.run_dir,
        persist: cli.persist,
    })
}

/// Squeezes a rendered clap error to one line: the text before the first blank line
/// (dropping the usage and `--help` hints), whitespace collapsed, `error: ` removed.
fn one_line(rendered: &str) -> String {
    let head = rendered.split("\n\n").next().unwrap_or(rendered);
    let head = head.trim().trim_start_matches("error:").trim();
    head.split_whitespace().collect::<Vec<_>>().join(" ") + "; see `qtcfg --help`"
}

/// Errors of a qtcfg run after its arguments were accepted.
#[derive(Debug, thiserror::Error)]
pub enum QtcfgError {
    /// No control socket of either daemon in the run directory.
    #[error("no engine or udsproxyd is running (no control socket in {}): start one, or pass --run-dir/--target", run_dir.display())]
    NoDaemon { run_dir: PathBuf },
    /// Control sockets exist but nothing listens on them (daemons gone, stale files).
    #[error("no engine or udsproxyd is running ({} refused the connection: a stale socket?): start one, or pass --run-dir/--target", socket.display())]
    Stale { socket: PathBuf },
    /// The socket is not accessible to this user.
    #[error("permission denied on control socket {}: run qtcfg as root", socket.display())]
    PermissionDenied { socket: PathBuf },
    /// Connecting to an explicitly chosen daemon failed.
    #[error("cannot connect to {daemon} at {}: {reason}: is it running? start it, or pass --run-dir/--target", socket.display())]
    Connect {
        daemon: String,
        socket: PathBuf,
        reason: String,
    },
    /// The daemon refused or failed the request; its message says why.
    #[error("{daemon}: {reason}")]
    Request { daemon: String, reason: String },
    /// The daemon did not answer in time.
    #[error("{daemon} did not answer within {}s: check it with `dpuctl status` or `dpuctl logs`", REQUEST_TIMEOUT.as_secs())]
    Timeout { daemon: String },
    /// The answer lacked the fields this request expects (a version mismatch).
    #[error("unexpected answer from {daemon} ({what}): are qtcfg and the daemon the same dpuctl version?")]
    BadAnswer { daemon: String, what: String },
    /// The tokio runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] io::Error),
}

/// The control sockets to try, in order. `exists` tells whether a socket file is present
/// (injected so the choice is testable without daemons).
pub fn select_sockets(
    target: &Target,
    list_type: Option<ListType>,
    run_dir: &Path,
    exists: impl Fn(&Path) -> bool,
) -> Result<Vec<(String, PathBuf)>, QtcfgError> {
    match target {
        Target::Socket(p) => Ok(vec![(p.display().to_string(), p.clone())]),
        Target::Daemon(d) => Ok(vec![(d.name().to_string(), socket_path(run_dir, d.name()))]),
        Target::Auto => {
            // The daemon that enforces the type knows its list best; the other is a fallback
            // (the engine has an integrated udsproxyd, a standalone udsproxyd only udsconnect).
            let order = if list_type == Some(ListType::Udsconnect) {
                [DaemonName::Udsproxyd, DaemonName::Engine]
            } else {
                [DaemonName::Engine, DaemonName::Udsproxyd]
            };
            let found: Vec<_> = order
                .into_iter()
                .map(|d| (d.name().to_string(), socket_path(run_dir, d.name())))
                .filter(|(_, p)| exists(p))
                .collect();
            if found.is_empty() {
                Err(QtcfgError::NoDaemon {
                    run_dir: run_dir.to_path_buf(),
                })
            } else {
                Ok(found)
            }
        }
    }
}

/// The io::ErrorKind somewhere in an error's source chain, if any.
fn io_kind(err: &(dyn std::error::Error + 'static)) -> Option<io::ErrorKind> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(io.kind());
        }
        cur = e.source();
    }
    None
}

/// Turns a failed connect into the error the operator sees. `auto` is true when the socket
/// was found by looking in the run directory (not named by `--target`): refusal then means
/// a stale socket file left by a daemon that is gone.
fn connect_failure(
    daemon: &str,
    socket: &Path,
    err: &(dyn std::error::Error + 'static),
    auto: bool,
) -> QtcfgError {
    use crate::daemon::ControlError;
    let kind = match err.downcast_ref::<ControlError>() {
        Some(ControlError::Stale { .. }) => Some(io::ErrorKind::ConnectionRefused),
        Some(ControlError::PermissionDenied { .. }) => Some(io::ErrorKind::PermissionDenied),
        _ => io_kind(err),
    };
    match kind {
        Some(io::ErrorKind::PermissionDenied) => QtcfgError::PermissionDenied {
            socket: socket.to_path_buf(),
        },
        Some(io::ErrorKind::ConnectionRefused) if auto => QtcfgError::Stale {
            socket: socket.to_path_buf(),
        },
        _ => QtcfgError::Connect {
            daemon: daemon.to_string(),
            socket: socket.to_path_buf(),
            reason: err.to_string(),
        },
    }
}

/// True for connect failures worth trying the next socket after: nobody usable listens
/// there. Permission problems stop at once, since the other daemon's socket has the same mode.
fn is_absent(err: &QtcfgError) -> bool {
    matches!(err, QtcfgError::Stale { .. } | QtcfgError::Connect { .. })
}

/// A successful result, ready to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The lists the daemon returned, restricted to the requested type if any.
    Listed {
        only: Option<ListType>,
        lists: BTreeMap<ListType, Vec<String>>,
    },
    Added {
        list_type: ListType,
        path: String,
        index: usize,
        persist: bool,
    },
    Removed {
        list_type: ListType,
        path: String,
        index: usize,
        persist: bool,
    },
}

/// `{"added":{...}}` / `{"removed":{...}}`, serialised straight from structs so the keys
/// keep the documented order (type, path, index).
#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum ChangeJson<'a> {
    Added(EntryJson<'a>),
    Removed(EntryJson<'a>),
}

#[derive(Serialize)]
struct EntryJson<'a> {
    #[serde(rename = "type")]
    list_type: ListType,
    path: &'a str,
    index: usize,
}

impl<'a> EntryJson<'a> {
    fn new(list_type: ListType, path: &'a str, index: usize) -> Self {
        EntryJson {
            list_type,
            path,
            index,
        }
    }
}

impl Outcome {
    /// Reads the daemon's answer (the fields besides `ok`) to `action`.
    pub fn from_answer(
        action: &Action,
        persist: bool,
        daemon: &str,
        answer: &Map<String, Value>,
    ) -> Result<Outcome, QtcfgError> {
        let bad = |what: &str| QtcfgError::BadAnswer {
            daemon: daemon.to_string(),
            what: what.to_string(),
        };
        match action {
            Action::List(only) => {
                let obj = answer
                    .get("allowlists")
                    .and_then(Value::as_object)
                    .ok_or_else(|| bad("no \"allowlists\" object"))?;
                let mut lists = BTreeMap::new();
                for (name, paths) in obj {
                    // A type this qtcfg does not know (a newer daemon) is skipped.
                    let Ok(t) = name.parse::<ListType>() else {
                        continue;
                    };
                    if only.is_some_and(|o| o != t) {
                        continue;
                    }
                    let paths = paths
                        .as_array()
                        .and_then(|a| {
                            a.iter()
                                .map(|v| v.as_str().map(str::to_string))
                                .collect::<Option<Vec<_>>>()
                        })
                        .ok_or_else(|| bad(&format!("\"{name}\" is not a list of paths")))?;
                    lists.insert(t, paths);
                }
                Ok(Outcome::Listed { only: *only, lists })
            }
            Action::Add { list_type, path } => {
                let index = answer
                    .get("index")
                    .and_then(Value::as_u64)
                    .and_then(|i| usize::try_from(i).ok())
                    .ok_or_else(|| bad("no \"index\" number"))?;
                Ok(Outcome::Added {
                    list_type: *list_type,
                    path: path.clone(),
                    index,
                    persist,
                })
            }
            Action::Delete { list_type, index } => {
                let path = answer
                    .get("removed")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("no \"removed\" path"))?;
                Ok(Outcome::Removed {
                    list_type: *list_type,
                    path: path.to_string(),
                    index: *index,
                    persist,
                })
            }
        }
    }

    /// Human output. Listings use the original qtinfo/qtcfg lines, so scripts grepping
    /// `[index:N][path:P]` keep working.
    pub fn render_text(&self) -> String {
        let saved = |persist: bool| {
            if persist {
                "Saved to the daemon's whitelist file.\n"
            } else {
                "Live only: pass --persist to also save it in the whitelist file.\n"
            }
        };
        match self {
            Outcome::Listed { only, lists } => {
                let mut out = String::new();
                for t in ListType::ALL {
                    let entries = lists.get(&t);
                    // A requested type is always shown, even when the daemon has no entry.
                    if entries.is_none() && *only != Some(t) {
                        continue;
                    }
                    out.push_str(&format!("Get qtfs <{}> white list:\n", t.section()));
                    for (i, p) in entries.into_iter().flatten().enumerate() {
                        out.push_str(&format!("  [index:{i}][path:{p}]\n"));
                    }
                }
                out
            }
            Outcome::Added {
                list_type,
                path,
                index,
                persist,
            } => format!(
                "Added [index:{index}][path:{path}] to the <{}> white list.\n{}",
                list_type.section(),
                saved(*persist)
            ),
            Outcome::Removed {
                list_type,
                path,
                index,
                persist,
            } => {
                let mut out = format!(
                    "Removed [index:{index}][path:{path}] from the <{}> white list; later entries moved up by one.\n{}",
                    list_type.section(),
                    saved(*persist)
                );
                if *list_type == ListType::Mount {
                    out.push_str(
                        "Mounts no longer covered by a [Mount] entry lose access at their next request (EACCES).\n\
                         An engine refuses to start without any [Mount] entry: keep at least one, or its next start fails.\n",
                    );
                }
                out
            }
        }
    }

    /// Machine output: one JSON object and a newline.
    pub fn render_json(&self) -> String {
        // Maps of strings and structs of strings and numbers always serialise.
        let text = match self {
            Outcome::Listed { lists, .. } => {
                let m: BTreeMap<&str, &Vec<String>> =
                    lists.iter().map(|(t, ps)| (t.name(), ps)).collect();
                serde_json::to_string(&serde_json::json!({ "allowlists": m }))
            }
            Outcome::Added {
                list_type,
                path,
                index,
                ..
            } => {
                serde_json::to_string(&ChangeJson::Added(EntryJson::new(*list_type, path, *index)))
            }
            Outcome::Removed {
                list_type,
                path,
                index,
                ..
            } => serde_json::to_string(&ChangeJson::Removed(EntryJson::new(
                *list_type, path, *index,
            ))),
        };
        text.unwrap_or_default() + "\n"
    }
}

/// Connects to the first usable socket and runs the request.
async fn run(inv: &Invocation) -> Result<Outcome, QtcfgError> {
    let sockets = select_sockets(&inv.target, inv.action.list_type(), &inv.run_dir, |p| {
        p.symlink_metadata().is_ok()
    })?;
    let auto = inv.target == Target::Auto;
    let mut last = None;
    for (daemon, socket) in sockets {
        // access(2) catches a root-only socket even if the control client's error does
        // not carry the errno.
        if let Err(nix::errno::Errno::EACCES) =
            nix::unistd::access(&socket, nix::unistd::AccessFlags::W_OK)
        {
            return Err(QtcfgError::PermissionDenied { socket });
        }
        let connected = tokio::time::timeout(REQUEST_TIMEOUT, Client::connect(&socket)).await;
        let mut client = match connected {
            Err(_) => return Err(QtcfgError::Timeout { daemon }),
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let err = connect_failure(&daemon, &socket, &e, auto);
                if auto && is_absent(&err) {
                    last = Some(err);
                    continue;
                }
                return Err(err);
            }
        };
        let req = inv.action.request(inv.persist);
        let answer = match tokio::time::timeout(REQUEST_TIMEOUT, client.request(&req)).await {
            Err(_) => return Err(QtcfgError::Timeout { daemon }),
            Ok(Err(e)) => {
                return Err(QtcfgError::Request {
                    daemon,
                    reason: e.to_string(),
                })
            }
            Ok(Ok(a)) => a,
        };
        return Outcome::from_answer(&inv.action, inv.persist, &daemon, &answer);
    }
    Err(last.unwrap_or(QtcfgError::NoDaemon {
        run_dir: inv.run_dir.clone(),
    }))
}

/// Prints an error on stderr as one line (JSON under `--json`).
fn report(json: bool, msg: &str) {
    let line = if json {
        format!("{}\n", serde_json::json!({ "error": msg }))
    } else {
        format!("qtcfg: {msg}\n")
    };
    write_stderr(&line);
}

/// Writes to stderr, ignoring a closed stderr (nothing better can be done with the error).
fn write_stderr(text: &str) {
    let _ = io::Write::write_all(&mut io::stderr().lock(), text.as_bytes());
}

/// Entry point for `qtcfg ...` and `dpuctl qtcfg ...` (`args[0]` is the program name).
pub fn main(args: Vec<OsString>) -> ExitCode {
    let json_flag = args.iter().any(|a| a == "--json");
    let inv = match parse_args(args) {
        Ok(inv) => inv,
        Err(ParseStop::Clap(e)) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(EXIT_USAGE));
        }
        Err(ParseStop::NoArguments(help)) => {
            write_stderr(&help);
            return ExitCode::from(EXIT_USAGE);
        }
        Err(ParseStop::Usage(msg)) => {
            report(json_flag, &msg);
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(QtcfgError::Runtime)
        .and_then(|rt| rt.block_on(run(&inv)));
    match result {
        Ok(outcome) => {
            let text = if inv.json {
                outcome.render_json()
            } else {
                outcome.render_text()
            };
            // A closed stdout (`qtcfg -z | head -1`) is not an error worth a panic.
            let _ = io::Write::write_all(&mut io::stdout().lock(), text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            report(inv.json, &e.to_string());
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

#[cfg(test)]
mod tests;
