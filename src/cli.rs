//! argv\[0\] / subcommand dispatch, and the small tools that belong to no bridge:
//! `dpuctl install`, `dpuctl keygen`, `dpuctl config check|show`.
//!
//! Every tool owns its clap parser and takes its whole argv (`args[0]` is the name it was
//! called by), so `qtcfg -z` and `dpuctl qtcfg -z` reach the same code with the same flags.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// A tool of the multi-call binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Engine,
    Udsproxyd,
    Qtcfg,
    Status,
    Logs,
    Install,
    Keygen,
    Config,
    Mount,
    Rexec,
    RexecServer,
    Tui,
    Demo,
    UdsConnect,
    Man,
    Completions,
}

/// The names under which the binary is installed as a link, and the tool each selects.
pub const LINK_NAMES: &[(&str, Tool)] = &[
    ("engine", Tool::Engine),
    ("udsproxyd", Tool::Udsproxyd),
    ("qtcfg", Tool::Qtcfg),
    ("mount.qtfs", Tool::Mount),
    // What mount(8) runs for a mount of type fuse.qtfs (the mount table's type), such as
    // `mount -o remount,ro DIR`; without it, it falls back to mount.fuse, which runs a
    // program called `qtfs`.
    ("mount.fuse.qtfs", Tool::Mount),
    ("rexec", Tool::Rexec),
    ("rexec_server", Tool::RexecServer),
];

/// The tool an argv\[0\] basename selects, if it is one of the link names.
pub fn tool_for_name(argv0: &OsStr) -> Option<Tool> {
    let base = Path::new(argv0).file_name()?.to_str()?;
    LINK_NAMES
        .iter()
        .find(|(name, _)| *name == base)
        .map(|(_, tool)| *tool)
}

/// Runs the tool named by argv\[0\]'s basename or, for `dpuctl`, by the first argument.
pub fn dispatch(args: Vec<OsString>) -> ExitCode {
    let argv0 = args.first().cloned().unwrap_or_else(|| "dpuctl".into());
    if let Some(tool) = tool_for_name(&argv0) {
        return run(tool, args);
    }
    let top = match Top::try_parse_from(args.iter().take(2)) {
        Ok(top) => top,
        Err(e) => return clap_exit(e),
    };
    // The tool sees "dpuctl <tool>" as its name and every argument after the tool's name.
    let tool_name = args.get(1).cloned().unwrap_or_default();
    let mut tool_args: Vec<OsString> =
        vec![format!("dpuctl {}", tool_name.to_string_lossy()).into()];
    tool_args.extend(args.into_iter().skip(2));
    run(top.tool.tool(), tool_args)
}

fn run(tool: Tool, args: Vec<OsString>) -> ExitCode {
    match tool {
        Tool::Engine => crate::daemon::engine::main(args),
        Tool::Udsproxyd => crate::uds::main(args),
        Tool::Qtcfg => crate::allowlist::qtcfg::main(args),
        Tool::Status => crate::daemon::tools::status_main(args),
        Tool::Logs => crate::daemon::tools::logs_main(args),
        Tool::Install => install_main(args),
        Tool::Keygen => keygen_main(args),
        Tool::Config => config_main(args),
        Tool::Mount => crate::fs::mount::main(args),
        Tool::Rexec => crate::exec::client::main(args),
        Tool::RexecServer => crate::exec::server::main(args),
        Tool::Tui => crate::tui::main(args),
        Tool::Demo => crate::demo::main(args),
        Tool::UdsConnect => crate::uds::connect::main(args),
        Tool::Man => man_main(args),
        Tool::Completions => completions_main(args),
    }
}

/// Prints a clap error or help the way clap would and returns its exit code.
pub fn clap_exit(e: clap::Error) -> ExitCode {
    let code = e.exit_code();
    let _ = e.print();
    ExitCode::from(u8::try_from(code).unwrap_or(2))
}

/// The top-level `dpuctl` command: only picks the tool; the tool parses the rest.
#[derive(Debug, Parser)]
#[command(
    name = "dpuctl",
    version,
    about = "Run a machine's management plane on a DPU while its workloads stay on the HOST",
    long_about = "dpuctl bridges a HOST and a DPU (or any second machine) so that dockerd, containerd, \
kubelet or libvirtd can run on the DPU while the containers and VMs they manage run on the HOST: \
a shared filesystem (qtfs), a Unix socket proxy (udsproxyd) and remote execution (rexec), all over \
one authenticated link, guarded by default-deny allowlists.\n\n\
Each tool is also reachable by its own name through a link (`dpuctl install` creates them): \
engine, udsproxyd, qtcfg, mount.qtfs, rexec, rexec_server.",
    after_help = "Run `dpuctl <tool> --help` for a tool's options.",
    disable_help_subcommand = true
)]
struct Top {
    #[command(subcommand)]
    tool: TopTool,
}

/// The command line, for the manual page (`dpuctl man`).
pub(crate) fn top_command() -> clap::Command {
    <Top as clap::CommandFactory>::command()
}

/// Each variant swallows the tool's own arguments; the tool parses them.
#[derive(Debug, Subcommand)]
enum TopTool {
    /// HOST-side server: file service for qtfs mounts, built-in udsproxyd peer, allowlists
    Engine(Rest),
    /// Cross-host Unix domain socket proxy peer
    Udsproxyd(Rest),
    /// Allowlist administration (add, delete, list), applied live
    Qtcfg(Rest),
    /// Status of every local daemon (--json for scripts)
    Status(Rest),
    /// Structured log events of the local daemons (-f to follow)
    Logs(Rest),
    /// Create the tool links (engine, qtcfg, mount.qtfs, ...) for this binary
    Install(Rest),
    /// Write a new pre-shared key file (mode 0600)
    Keygen(Rest),
    /// Check or show the configuration file
    Config(Rest),
    /// Mount a HOST directory from the engine (the mount.qtfs helper of `mount -t qtfs`)
    Mount(Rest),
    /// Run a program on the other machine (remote execution client)
    Rexec(Rest),
    /// Remote execution server: runs whitelisted programs for rexec clients
    #[command(name = "rexec_server")]
    RexecServer(Rest),
    /// Live dashboard of the local daemons: links, mounts, allowlists, sessions, logs
    Tui(Rest),
    /// A HOST and a DPU on this machine, with live traffic, opened in the dashboard
    Demo(Rest),
    /// Connect stdin/stdout to a Unix socket on the peer machine through udsproxyd
    UdsConnect(Rest),
    /// Print a tool's manual page, or write them all (--out-dir)
    Man(Rest),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions(Rest),
}

impl TopTool {
    fn tool(&self) -> Tool {
        match self {
            TopTool::Engine(_) => Tool::Engine,
            TopTool::Udsproxyd(_) => Tool::Udsproxyd,
            TopTool::Qtcfg(_) => Tool::Qtcfg,
            TopTool::Status(_) => Tool::Status,
            TopTool::Logs(_) => Tool::Logs,
            TopTool::Install(_) => Tool::Install,
            TopTool::Keygen(_) => Tool::Keygen,
            TopTool::Config(_) => Tool::Config,
            TopTool::Mount(_) => Tool::Mount,
            TopTool::Rexec(_) => Tool::Rexec,
            TopTool::RexecServer(_) => Tool::RexecServer,
            TopTool::Tui(_) => Tool::Tui,
            TopTool::Demo(_) => Tool::Demo,
            TopTool::UdsConnect(_) => Tool::UdsConnect,
            TopTool::Man(_) => Tool::Man,
            TopTool::Completions(_) => Tool::Completions,
        }
    }
}

#[derive(Debug, Args)]
#[command(disable_help_flag = true)]
struct Rest {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    _args: Vec<OsString>,
}

// ---------------------------------------------------------------------------------------------
// dpuctl install

#[derive(Debug, Parser)]
#[command(
    name = "dpuctl install",
    about = "Create the tool links for this binary",
    long_about = "Copies this binary to PREFIX/bin/dpuctl (unless it already runs from there), \
creates the links engine, udsproxyd, qtcfg, rexec, rexec_server in PREFIX/bin and mount.qtfs and \
mount.fuse.qtfs in PREFIX/sbin, so that mount(8) finds its helper for `mount -t qtfs` and for the \
mounted type fuse.qtfs, writes the manual pages under \
PREFIX/share/man and the bash, zsh and fish completion scripts under PREFIX/share (see \
`dpuctl completions --help`). Idempotent: links, pages and scripts that are already right are \
left alone; a different file in the way of a link is an error unless --force.",
    after_help = "Examples:\n  dpuctl install                 # /usr/bin/{dpuctl,engine,...}, /usr/sbin/mount.{qtfs,fuse.qtfs}\n  dpuctl install --prefix /opt/dpuctl --dry-run"
)]
struct InstallArgs {
    /// Installation prefix
    #[arg(long, default_value = "/usr")]
    prefix: PathBuf,
    /// Replace files that are in the way
    #[arg(long)]
    force: bool,
    /// Say what would be done, change nothing
    #[arg(long)]
    dry_run: bool,
    /// Print the actions as JSON
    #[arg(long)]
    json: bool,
}

/// The command line, for the manual page (`dpuctl man`).
pub(crate) fn install_command() -> clap::Command {
    <InstallArgs as clap::CommandFactory>::command()
}

/// What `install` did (or would do) at one path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InstallAction {
    pub path: PathBuf,
    /// `copied`, `linked`, `unchanged` or `replaced`.
    pub action: &'static str,
    pub target: PathBuf,
}

/// Why `install` stopped.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot find this program's own path: {0}")]
    CurrentExe(std::io::Error),
    #[error("cannot create directory {path}: {source}")]
    Mkdir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot copy {from} to {to}: {source}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} exists and is not a link to dpuctl: remove it, or run again with --force")]
    InTheWay { path: PathBuf },
    #[error("cannot create link {path}: {source}")]
    Link {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the shell completion scripts under {path}: {source}")]
    Completions {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the manual pages under {path}: {source}")]
    Man {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The links `install` creates: (directory under the prefix, name, link target).
fn install_links() -> Vec<(&'static str, &'static str, &'static str)> {
    LINK_NAMES
        .iter()
        .map(|(name, tool)| match tool {
            // mount(8) looks for its helpers in /sbin (/usr/sbin with a merged /usr).
            Tool::Mount => ("sbin", *name, "../bin/dpuctl"),
            _ => ("bin", *name, "dpuctl"),
        })
        .collect()
}

/// Installs the binary and its links under `prefix`; see `dpuctl install --help`.
pub fn install(
    prefix: &Path,
    exe: &Path,
    force: bool,
    dry_run: bool,
) -> Result<Vec<InstallAction>, InstallError> {
    let mut actions = Vec::new();
    let bin = prefix.join("bin");
    let installed = bin.join("dpuctl");
    for dir in ["bin", "sbin"] {
        let path = prefix.join(dir);
        if !dry_run {
            std::fs::create_dir_all(&path).map_err(|source| InstallError::Mkdir {
                path: path.clone(),
                source,
            })?;
        }
    }
    let same = match (
        std::fs::canonicalize(exe),
        std::fs::canonicalize(&installed),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        actions.push(InstallAction {
            path: installed.clone(),
            action: "unchanged",
            target: exe.to_path_buf(),
        });
    } else {
        if !dry_run {
            // Copy beside the destination, then rename: a running dpuctl is never half-written.
            let tmp = bin.join(format!(".dpuctl.install.{}", std::process::id()));
            let copy_err = |source| InstallError::Copy {
                from: exe.to_path_buf(),
                to: installed.clone(),
                source,
            };
            std::fs::copy(exe, &tmp).map_err(copy_err)?;
            std::fs::rename(&tmp, &installed).map_err(|source| {
                let _ = std::fs::remove_file(&tmp);
                copy_err(source)
            })?;
        }
        actions.push(InstallAction {
            path: installed.clone(),
            action: "copied",
            target: exe.to_path_buf(),
        });
    }
    for (dir, name, target) in install_links() {
        let path = prefix.join(dir).join(name);
        let target = PathBuf::from(target);
        let action = match std::fs::symlink_metadata(&path) {
            Err(_) => "linked",
            Ok(meta) => {
                let current = std::fs::read_link(&path).ok();
                if meta.file_type().is_symlink() && current.as_deref() == Some(target.as_path()) {
                    "unchanged"
                } else if force || points_at(&path, &installed) {
                    "replaced"
                } else {
                    return Err(InstallError::InTheWay { path });
                }
            }
        };
        if !dry_run && action != "unchanged" {
            if action == "replaced" {
                std::fs::remove_file(&path).map_err(|source| InstallError::Link {
                    path: path.clone(),
                    source,
                })?;
            }
            std::os::unix::fs::symlink(&target, &path).map_err(|source| InstallError::Link {
                path: path.clone(),
                source,
            })?;
        }
        actions.push(InstallAction {
            path,
            action,
            target,
        });
    }
    let scripts = crate::completions::write_all(prefix, dry_run).map_err(|source| {
        InstallError::Completions {
            path: prefix.join("share"),
            source,
        }
    })?;
    for w in scripts {
        actions.push(InstallAction {
            path: w.path,
            action: if w.changed { "written" } else { "unchanged" },
            target: PathBuf::from(format!("{} completion of {}", w.shell, w.program)),
        });
    }
    let man_dir = prefix.join("share/man");
    let pages = crate::man::write_all(&man_dir, dry_run).map_err(|source| InstallError::Man {
        path: man_dir.clone(),
        source,
    })?;
    for ((path, changed), page) in pages.into_iter().zip(crate::man::pages()) {
        actions.push(InstallAction {
            path,
            action: if changed { "written" } else { "unchanged" },
            target: PathBuf::from(format!("{}({})", page.name, page.section)),
        });
    }
    Ok(actions)
}

/// True when `path` resolves to the installed dpuctl (e.g. an absolute link to it).
fn points_at(path: &Path, installed: &Path) -> bool {
    match (
        std::fs::canonicalize(path),
        std::fs::canonicalize(installed),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn install_main(args: Vec<OsString>) -> ExitCode {
    let a = match InstallArgs::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => return clap_exit(e),
    };
    let result = std::env::current_exe()
        .map_err(InstallError::CurrentExe)
        .and_then(|exe| install(&a.prefix, &exe, a.force, a.dry_run));
    match result {
        Ok(actions) => {
            if a.json {
                let v = serde_json::json!({ "dry_run": a.dry_run, "actions": actions });
                println!("{v}");
            } else {
                for act in &actions {
                    println!(
                        "{:<10} {} -> {}",
                        act.action,
                        act.path.display(),
                        act.target.display()
                    );
                }
                if a.dry_run {
                    println!("(dry run: nothing was changed)");
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail("install", &e),
    }
}

/// Runs a daemon's async main on a multi-threaded runtime (`threads` workers, or one per
/// core) and turns its outcome into the exit status, printing the error chain on failure.
pub fn run_daemon<E, F>(tool: &str, threads: Option<usize>, main: F) -> ExitCode
where
    E: std::error::Error,
    F: std::future::Future<Output = Result<(), E>>,
{
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        builder.worker_threads(n.max(1));
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(tool, &e),
    };
    match rt.block_on(main) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(tool, &e),
    }
}

/// Prints `<tool>: <error>: <cause>...` on stderr (causes already in the message are not
/// repeated) and returns exit code 1.
pub fn fail(tool: &str, e: &dyn std::error::Error) -> ExitCode {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    eprintln!("{tool}: {msg}");
    ExitCode::FAILURE
}

// ---------------------------------------------------------------------------------------------
// dpuctl man

#[derive(Debug, Parser)]
#[command(
    name = "dpuctl man",
    about = "Print a tool's manual page, or write them all",
    long_about = "Prints the manual page of PAGE as roff on stdout, to read with `man -l -`, or with \
--out-dir writes every page under DIR/man1 and DIR/man8 (pages already up to date are left \
alone). `dpuctl install` installs them under PREFIX/share/man. The pages are made from the same \
text as each tool's --help.",
    after_help = "Examples:\n  dpuctl man rexec | man -l -\n  dpuctl man status | man -l -          # dpuctl-status(8)\n  dpuctl man --out-dir /usr/local/share/man\n  dpuctl man --list\n\nExit status: 0 done, 1 no such page or a page could not be written, 2 usage error."
)]
struct ManArgs {
    /// The page: a tool (rexec, mount.qtfs, status) or a page name (dpuctl-status.8)
    #[arg(required_unless_present_any = ["out_dir", "list"], conflicts_with_all = ["out_dir", "list"])]
    page: Option<String>,
    /// Write every page under DIR (DIR/man1, DIR/man8)
    #[arg(long, value_name = "DIR", conflicts_with = "list")]
    out_dir: Option<PathBuf>,
    /// List the pages
    #[arg(long)]
    list: bool,
    /// Print the list, or the pages written, as JSON
    #[arg(long)]
    json: bool,
}

/// The command line, for the manual page (`dpuctl man`).
pub(crate) fn man_command() -> clap::Command {
    <ManArgs as clap::CommandFactory>::command()
}

fn man_main(args: Vec<OsString>) -> ExitCode {
    let a = match ManArgs::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => return clap_exit(e),
    };
    if a.list {
        let pages = crate::man::pages();
        if a.json {
            let v: Vec<_> = pages
                .iter()
                .map(|p| serde_json::json!({ "name": p.name, "section": p.section, "file": p.file_name() }))
                .collect();
            println!("{}", serde_json::Value::Array(v));
        } else {
            for p in &pages {
                println!("{}({})", p.name, p.section);
            }
        }
        return ExitCode::SUCCESS;
    }
    if let Some(dir) = &a.out_dir {
        return match crate::man::write_all(dir, false) {
            Ok(written) => {
                if a.json {
                    let v: Vec<_> = written
                        .iter()
                        .map(|(path, changed)| serde_json::json!({ "path": path, "changed": changed }))
                        .collect();
                    println!("{}", serde_json::json!({ "pages": v }));
                } else {
                    for (path, changed) in &written {
                        let what = if *changed { "written" } else { "unchanged" };
                        println!("{what:<10} {}", path.display());
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "dpuctl man: cannot write the pages under {}: {e}",
                    dir.display()
                );
                ExitCode::FAILURE
            }
        };
    }
    let name = a.page.unwrap_or_default();
    match crate::man::find(&name) {
        Some(page) => {
            print!("{}", page.render());
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("dpuctl man: no manual page for {name:?}; `dpuctl man --list` shows them");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// dpuctl completions

#[derive(Debug, Parser)]
#[command(
    name = "dpuctl completions",
    about = "Print a shell completion script",
    long_about = "Prints the completion script of PROGRAM for SHELL on stdout: for dpuctl (every \
tool's options after its name) or for one of the tool links (engine, udsproxyd, qtcfg, rexec, \
rexec_server). `dpuctl install` writes the bash, zsh and fish scripts of all of them where those \
shells look (PREFIX/share/bash-completion/completions, PREFIX/share/zsh/vendor-completions, \
PREFIX/share/fish/vendor_completions.d). The scripts are made from the same text as each \
tool's --help.",
    after_help = "Examples:\n  source <(dpuctl completions bash)           # this shell only\n  dpuctl completions bash rexec > /etc/bash_completion.d/rexec\n  dpuctl completions zsh > ~/.zfunc/_dpuctl\n  dpuctl completions fish qtcfg > ~/.config/fish/completions/qtcfg.fish\n\nExit status: 0 done, 1 no script for that program, 2 usage error."
)]
struct CompletionsArgs {
    /// The shell
    #[arg(value_enum)]
    shell: crate::completions::Shell,
    /// dpuctl, or a tool link: engine, udsproxyd, qtcfg, rexec, rexec_server
    #[arg(default_value = "dpuctl")]
    program: String,
}

/// The command line, for the manual page (`dpuctl man`).
pub(crate) fn completions_command() -> clap::Command {
    <CompletionsArgs as clap::CommandFactory>::command()
}

fn completions_main(args: Vec<OsString>) -> ExitCode {
    let a = match CompletionsArgs::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => return clap_exit(e),
    };
    match crate::completions::script(a.shell, &a.program) {
        Some(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        None => {
            eprintln!(
                "dpuctl completions: no completion script for {:?}; give one of: {}",
                a.program,
                crate::completions::programs().join(", ")
            );
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// dpuctl keygen

#[derive(Debug, Parser)]
#[command(
    name = "dpuctl keygen",
    about = "Write a new random pre-shared key (mode 0600)",
    long_about = "Writes 32 random bytes, hex-encoded, to PATH with mode 0600. Copy the same file \
to the other side (HOST and DPU must share it); every link is authenticated with it.",
    after_help = "Examples:\n  dpuctl keygen\n  dpuctl keygen /tmp/test.psk\n  scp /etc/dpuctl/psk dpu:/etc/dpuctl/psk"
)]
struct KeygenArgs {
    /// Where to write the key
    #[arg(default_value = crate::wire::key::DEFAULT_KEY_PATH)]
    path: PathBuf,
    /// Replace an existing key (links using the old key stop authenticating)
    #[arg(long)]
    force: bool,
    /// Print the result as JSON
    #[arg(long)]
    json: bool,
}

/// The command line, for the manual page (`dpuctl man`).
pub(crate) fn keygen_command() -> clap::Command {
    <KeygenArgs as clap::CommandFactory>::command()
}

fn keygen_main(args: Vec<OsString>) -> ExitCode {
    let a = match KeygenArgs::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => return clap_exit(e),
    };
    match crate::wire::Psk::write_new(&a.path, a.force) {
        Ok(_) => {
            if a.json {
                println!("{}", serde_json::json!({ "path": a.path, "mode": "0600" }));
            } else {
                println!(
                    "wrote a new key to {} (mode 0600): copy this file to the other side",
                    a.path.display()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail("keygen", &e),
    }
}

// ---------------------------------------------------------------------------------------------
// dpuctl config

#[derive(Debug, Parser)]
#[command(name = "dpuctl config", about = "Check or show the configuration file")]
struct ConfigArgs {
    #[command(subcommand)]
    action: ConfigAction,
}

/// The command line, for the manual page (`dpuctl man`).
pub(crate) fn config_command() -> clap::Command {
    <ConfigArgs as clap::CommandFactory>::command()
}

#[derive(Debug, Subcommand)]
enum ConfigAction {
    /// Validate a config file: syntax, unknown keys, values, key file, whitelist
    #[command(
        after_help = "Exit status: 0 valid, 1 problems found (each printed with its key or line)."
    )]
    Check {
        /// The file (default: DPUCTL_CONFIG, else /etc/dpuctl/config.toml)
        file: Option<PathBuf>,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Print the effective configuration (file merged over defaults) as TOML
    Show {
        /// The file (default: DPUCTL_CONFIG, else /etc/dpuctl/config.toml)
        file: Option<PathBuf>,
    },
}

fn config_main(args: Vec<OsString>) -> ExitCode {
    let a = match ConfigArgs::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => return clap_exit(e),
    };
    match a.action {
        ConfigAction::Check { file, json } => {
            // Each problem is printed as one line that starts with the file it concerns.
            let (problems, source) = match crate::config::Config::load(file.as_deref()) {
                Ok((config, source)) => {
                    let at = source.path.display().to_string();
                    let lines = config
                        .validate()
                        .into_iter()
                        .map(|p| format!("{at}: {p}"))
                        .collect::<Vec<_>>();
                    (lines, Some(source))
                }
                Err(e) => (vec![e.to_string()], None),
            };
            let path = source
                .as_ref()
                .map(|s| s.path.display().to_string())
                .or_else(|| file.as_ref().map(|f| f.display().to_string()))
                .unwrap_or_default();
            let present = source
                .as_ref()
                .map_or_else(|| Path::new(&path).exists(), |s| s.present);
            if json {
                let v = serde_json::json!({
                    "file": path, "present": present,
                    "valid": problems.is_empty(), "problems": problems,
                });
                println!("{v}");
            } else {
                if source.is_some() && !present {
                    println!("{path}: not present, checking the defaults");
                }
                for p in &problems {
                    println!("{p}");
                }
                if problems.is_empty() {
                    println!("{path}: ok");
                }
            }
            if problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        ConfigAction::Show { file } => match crate::config::Config::load(file.as_deref()) {
            Ok((config, _)) => match toml::to_string_pretty(&config) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail("config", &e),
            },
            Err(e) => fail("config", &e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_link_name_selects_its_tool() {
        for (name, tool) in LINK_NAMES {
            assert_eq!(tool_for_name(OsStr::new(name)), Some(*tool));
            let full = format!("/usr/local/bin/{name}");
            assert_eq!(tool_for_name(OsStr::new(&full)), Some(*tool));
        }
        // mount(8)'s helper for the mounted type fuse.qtfs (`mount -o remount DIR`).
        assert_eq!(
            tool_for_name(OsStr::new("/sbin/mount.fuse.qtfs")),
            Some(Tool::Mount)
        );
        assert_eq!(tool_for_name(OsStr::new("/usr/bin/dpuctl")), None);
        assert_eq!(tool_for_name(OsStr::new("qtcfg2")), None);
    }

    #[test]
    fn every_link_name_is_a_subcommand() {
        for (name, tool) in LINK_NAMES {
            // `mount.qtfs` and `mount.fuse.qtfs` are `dpuctl mount`.
            let name = if *tool == Tool::Mount { "mount" } else { name };
            let top = Top::try_parse_from(["dpuctl", name]).unwrap();
            assert_eq!(top.tool.tool(), *tool);
        }
    }

    #[test]
    fn install_is_idempotent_and_refuses_strangers() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("src-dpuctl");
        std::fs::write(&exe, b"#!/bin/sh\n").unwrap();
        let prefix = dir.path().join("prefix");
        let first = install(&prefix, &exe, false, false).unwrap();
        assert_eq!(first[0].action, "copied");
        assert!(first[1..]
            .iter()
            .all(|a| a.action == "linked" || a.action == "written"));
        assert!(prefix.join("share/man/man1/rexec.1").is_file());
        assert!(prefix.join("share/man/man8/mount.qtfs.8").is_file());
        for helper in ["sbin/mount.qtfs", "sbin/mount.fuse.qtfs"] {
            assert_eq!(
                std::fs::read_link(prefix.join(helper)).unwrap(),
                PathBuf::from("../bin/dpuctl"),
                "{helper}"
            );
        }
        assert_eq!(
            std::fs::canonicalize(prefix.join("bin/qtcfg")).unwrap(),
            std::fs::canonicalize(prefix.join("bin/dpuctl")).unwrap()
        );
        // Running the installed copy again changes nothing.
        let installed = prefix.join("bin/dpuctl");
        let second = install(&prefix, &installed, false, false).unwrap();
        assert!(second.iter().all(|a| a.action == "unchanged"), "{second:?}");
        // A foreign file in the way is refused, then replaced with --force.
        std::fs::remove_file(prefix.join("bin/engine")).unwrap();
        std::fs::write(prefix.join("bin/engine"), b"other").unwrap();
        let err = install(&prefix, &installed, false, false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        let third = install(&prefix, &installed, true, false).unwrap();
        assert!(third
            .iter()
            .any(|a| a.action == "replaced" && a.path.ends_with("bin/engine")));
    }

    #[test]
    fn dry_run_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("dpuctl");
        std::fs::write(&exe, b"x").unwrap();
        let prefix = dir.path().join("p");
        let actions = install(&prefix, &exe, false, true).unwrap();
        assert!(!actions.is_empty());
        assert!(!prefix.exists());
    }
}
