//! `dpuctl demo`: a HOST and a DPU on one machine, wired together, with a little live
//! traffic, opened in the dashboard — the first thing a newcomer runs.
//!
//! What it starts (all on 127.0.0.1, with a freshly generated key, in a temporary directory):
//! - HOST side: `engine` as pid 1 of new mount+pid namespaces with a private tmpfs on /run,
//!   exporting a demo tree; `rexec_server` in the same namespaces; an echo Unix server bound
//!   at the HOST's `/run/demo-echo.sock` (through `/proc/<pid>/root`, so only the HOST sees it);
//! - DPU side: `udsproxyd` as pid 1 of its own namespaces; the demo tree mounted with
//!   `dpuctl mount` (mount.qtfs) at the DPU's `/run/demo-mnt`.
//!
//! Each side gets its own config file (`DPUCTL_CONFIG`: key, run directory, allowlist) and a
//! run directory under the temporary directory, so the dashboard outside the namespaces sees
//! both sides' control sockets. Traffic, once a second: file writes, reads and listings in
//! the mount; a line echoed through a proxied socket (`dpuctl uds-connect`); every few
//! seconds a `rexec` call, plus one long `rexec sleep` session to look at (and kill with `k`).
//! A tool this build lacks (`dpuctl <tool> --help` fails) is reported as missing in the
//! status line, never simulated.
//!
//! Teardown (q, Ctrl-C, SIGTERM, the end of `--duration`, or an error) runs in `Drop` of
//! `Demo`: stop the traffic, unmount, stop the daemons (SIGTERM to each side's pid 1,
//! which takes every process of its pid namespace with it), remove the temporary directory.
//!
//! Concurrency: setup and teardown are sequential on the calling thread. Traffic runs as
//! tokio tasks sharing one [`Stats`] behind a mutex (held only to copy or bump figures);
//! they stop on a cancellation token. Children run in their own process groups, so a
//! Ctrl-C reaches only the demo, which then tears down in order.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::daemon::control::{socket_path, Client};
use crate::daemon::status::{DaemonStatus, PeerState};

/// The DPU-side mount point of the demo tree (inside the DPU's private /run).
pub const MOUNT_POINT: &str = "/run/demo-mnt";
/// The HOST-side echo socket the DPU reaches through the proxy.
pub const ECHO_SOCKET: &str = "/run/demo-echo.sock";

/// How long each side's daemon may take to answer on its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Period of the file and echo traffic.
const TRAFFIC_PERIOD: Duration = Duration::from_secs(1);
/// Period of the short rexec calls.
const REXEC_PERIOD: Duration = Duration::from_secs(4);
/// Period of the headless status line.
const STATUS_PERIOD: Duration = Duration::from_secs(3);

#[derive(Debug, Parser)]
#[command(
    name = "dpuctl demo",
    about = "Run a HOST and a DPU on this machine with live traffic, and open the dashboard",
    long_about = "Generates a temporary key and directories, starts the engine (HOST) and udsproxyd \
(DPU) in separate mount+pid namespaces on 127.0.0.1, mounts a demo tree from the HOST on the DPU \
with mount.qtfs, starts rexec_server, runs a little traffic (files, a proxied socket, rexec calls) \
and opens `dpuctl tui` on both sides. Quitting tears everything down. Needs root, unshare/nsenter \
(util-linux) and /dev/fuse.",
    after_help = "Examples:\n  dpuctl demo\n  dpuctl demo --no-tui                   # headless until Ctrl-C, a status line every 3 s\n  dpuctl demo --no-tui --duration 10s    # CI: exit 0 when every component came up\n\nExit status: 0 ok, 1 a component failed (the message says which), 2 usage."
)]
struct DemoArgs {
    /// Run headless: print a status line every few seconds until SIGINT/SIGTERM.
    #[arg(long)]
    no_tui: bool,
    /// Keep the temporary directory (logs, key, configs) after exit and print its path.
    #[arg(long)]
    keep_dir: bool,
    /// With --no-tui: stop after this long and exit 0 only if every component came up.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, requires = "no_tui")]
    duration: Option<Duration>,
    /// No colours in the dashboard (also NO_COLOR).
    #[arg(long)]
    no_color: bool,
}

/// The command line, for the manual page (`dpuctl man`).
pub(crate) fn command() -> clap::Command {
    <DemoArgs as clap::CommandFactory>::command()
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("run as root: the demo creates mount and pid namespaces and a FUSE mount")]
    NotRoot,
    #[error("{tool} is not installed: install util-linux (scripts/deps.sh)")]
    MissingTool { tool: &'static str },
    #[error("cannot find this program's own path: {0}")]
    CurrentExe(#[source] std::io::Error),
    #[error("cannot create {path}: {source}; is /tmp writable?")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the demo key: {0}")]
    Key(#[from] crate::wire::KeyError),
    #[error("no free port on 127.0.0.1: {0}")]
    Port(#[source] std::io::Error),
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the {side} side's {daemon} did not answer within {}s; its log ({log}):\n{tail}", START_TIMEOUT.as_secs())]
    NoAnswer {
        side: &'static str,
        daemon: &'static str,
        log: PathBuf,
        tail: String,
    },
    #[error("cannot bind the echo server at {path}: {source}")]
    Echo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Tui(#[from] crate::tui::TuiError),
    #[error("some components did not work: {0}")]
    Check(String),
}

/// `dpuctl demo`.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let a = match DemoArgs::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => return crate::cli::clap_exit(e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return crate::cli::fail("dpuctl demo", &DemoError::Runtime(e)),
    };
    match runtime.block_on(run(a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => crate::cli::fail("dpuctl demo", &e),
    }
}

/// Which optional tools this build has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tools {
    pub uds_connect: bool,
    pub rexec: bool,
    pub rexec_server: bool,
}

/// Outcome counters of the traffic, for the status line and the final check.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub tools: Tools,
    /// Why the mount failed, if it did.
    pub mount_error: Option<String>,
    pub file_ok: u64,
    pub file_err: u64,
    pub echo_ok: u64,
    pub echo_err: u64,
    pub rexec_ok: u64,
    pub rexec_err: u64,
    /// The most recent failure of each kind, for the operator.
    pub last_file_error: Option<String>,
    pub last_echo_error: Option<String>,
    pub last_rexec_error: Option<String>,
}

type SharedStats = Arc<Mutex<Stats>>;

fn lock_stats(s: &SharedStats) -> std::sync::MutexGuard<'_, Stats> {
    // A panicking traffic task leaves plain counters behind: still worth reading.
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One simulated machine: `unshare` running a daemon as pid 1 of new namespaces.
struct SideProc {
    label: &'static str,
    unshare: std::process::Child,
    log: PathBuf,
    run_dir: PathBuf,
    config: PathBuf,
}

impl SideProc {
    /// The daemon's pid in our namespace (the child of unshare).
    fn pid(&self) -> Option<u32> {
        children(self.unshare.id()).into_iter().next()
    }

    /// A command run inside this side's mount and pid namespaces, with its config.
    fn command(&self, program: &Path) -> Result<tokio::process::Command, DemoError> {
        let pid = self.pid().ok_or_else(|| DemoError::Spawn {
            what: format!("a command on the {} side", self.label),
            source: std::io::Error::other("the side's daemon is not running"),
        })?;
        let mut c = tokio::process::Command::new("nsenter");
        c.args(["--target", &pid.to_string(), "--mount", "--pid", "--"])
            .arg(program)
            .env(crate::config::CONFIG_ENV, &self.config)
            .env("DPUCTL_RUN_DIR", &self.run_dir)
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        Ok(c)
    }

    /// The last lines of the side's log.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// SIGTERM to the daemon, then waits; SIGKILL after five seconds.
    fn stop(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.unshare.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(pid) = self.pid() {
            signal(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// The children of process `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Everything the demo started; [`Drop`] tears it down.
struct Demo {
    work: PathBuf,
    keep_dir: bool,
    host: Option<SideProc>,
    dpu: Option<SideProc>,
    mounted: bool,
    /// Stops the traffic tasks (cancelled first in teardown).
    traffic: CancellationToken,
}

impl Demo {
    fn host(&self) -> &SideProc {
        self.host
            .as_ref()
            .expect("the HOST side is started before use")
    }
    fn dpu(&self) -> &SideProc {
        self.dpu
            .as_ref()
            .expect("the DPU side is started before use")
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.traffic.cancel();
        if self.mounted {
            if let Some(pid) = self.dpu.as_ref().and_then(SideProc::pid) {
                // A clean FUSE unmount lets mount.qtfs say goodbye to the engine.
                let _ = Command::new("nsenter")
                    .args([
                        "--target",
                        &pid.to_string(),
                        "--mount",
                        "umount",
                        MOUNT_POINT,
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        // pid 1 of each side takes every other process of its namespace with it.
        for side in [self.dpu.as_mut(), self.host.as_mut()]
            .into_iter()
            .flatten()
        {
            side.stop();
        }
        if self.keep_dir {
            eprintln!("demo: kept {} (logs, key, configs)", self.work.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

fn write(path: &Path, text: &str) -> Result<(), DemoError> {
    std::fs::write(path, text).map_err(|source| DemoError::Write {
        path: path.to_owned(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<(), DemoError> {
    std::fs::create_dir_all(path).map_err(|source| DemoError::Write {
        path: path.to_owned(),
        source,
    })
}

fn free_port() -> Result<u16, DemoError> {
    crate::wire::spare_loopback_port().map_err(DemoError::Port)
}

/// True when `dpuctl <tool> --help` succeeds, i.e. this build has the tool.
pub fn has_tool(bin: &Path, tool: &str) -> bool {
    Command::new(bin)
        .args([tool, "--help"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// True when `program --version` runs.
fn has_program(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn check_prerequisites() -> Result<(), DemoError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(DemoError::NotRoot);
    }
    for tool in ["unshare", "nsenter"] {
        if !has_program(tool) {
            return Err(DemoError::MissingTool { tool });
        }
    }
    Ok(())
}

/// A fresh private directory `/tmp/dpuctl-demo.XXXXXXXX` (mode 0700).
fn work_dir() -> Result<PathBuf, DemoError> {
    let mut bytes = [0u8; 4];
    // Uniqueness only (the directory is created exclusively below); fall back to the pid.
    if getrandom::fill(&mut bytes).is_err() {
        bytes = std::process::id().to_le_bytes();
    }
    let suffix: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let path = std::env::temp_dir().join(format!("dpuctl-demo.{suffix}"));
    std::fs::create_dir(&path)
        .and_then(|_| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)))
        .map_err(|source| DemoError::Write {
            path: path.clone(),
            source,
        })?;
    Ok(path)
}

/// Starts `bin args...` as pid 1 of new mount+pid namespaces with a private /run.
fn start_side(
    label: &'static str,
    work: &Path,
    bin: &Path,
    args: &[String],
    whitelist: &str,
    key: &Path,
) -> Result<SideProc, DemoError> {
    let dir = work.join(label.to_lowercase());
    let run_dir = dir.join("run");
    mkdir(&run_dir)?;
    let wl = dir.join("whitelist");
    write(&wl, whitelist)?;
    // Daemons refuse a whitelist others could rewrite, whatever the caller's umask.
    for (path, mode) in [(&dir, 0o700), (&wl, 0o600)] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(
            |source| DemoError::Write {
                path: path.to_path_buf(),
                source,
            },
        )?;
    }
    let config = dir.join("config.toml");
    write(
        &config,
        &format!(
            "[common]\nkey_file = {:?}\nrun_dir = {:?}\nwhitelist = {:?}\n",
            key.display().to_string(),
            run_dir.display().to_string(),
            wl.display().to_string()
        ),
    )?;
    let log = dir.join("daemon.log");
    let logf = std::fs::File::create(&log).map_err(|source| DemoError::Write {
        path: log.clone(),
        source,
    })?;
    let logf2 = logf.try_clone().map_err(|source| DemoError::Write {
        path: log.clone(),
        source,
    })?;
    // If the demo itself is killed outright (SIGKILL), setpriv's parent-death signal takes
    // unshare down, and unshare's --kill-child takes the side's pid 1 and with it the whole
    // namespace. setpriv comes with unshare (util-linux); without it, teardown relies on Drop.
    let mut command = if has_program("setpriv") {
        let mut c = Command::new("setpriv");
        c.args(["--pdeathsig", "KILL", "unshare"]);
        c
    } else {
        Command::new("unshare")
    };
    let unshare = command
        .args([
            "--mount",
            "--pid",
            "--fork",
            "--mount-proc",
            "--propagation",
            "private",
            "--kill-child=SIGTERM",
            "sh",
            "-c",
            "mount -t tmpfs -o mode=0755 tmpfs /run && exec \"$@\"",
            "side",
        ])
        .arg(bin)
        .args(args)
        .env(crate::config::CONFIG_ENV, &config)
        .env("DPUCTL_RUN_DIR", &run_dir)
        .stdin(Stdio::null())
        .stdout(logf)
        .stderr(logf2)
        .process_group(0)
        .spawn()
        .map_err(|source| DemoError::Spawn {
            what: format!("the {label} side (unshare)"),
            source,
        })?;
    Ok(SideProc {
        label,
        unshare,
        log,
        run_dir,
        config,
    })
}

/// One status request with a short timeout.
async fn status_of(run_dir: &Path, name: &str) -> Result<DaemonStatus, String> {
    let path = socket_path(run_dir, name);
    let ask = async {
        let mut c = Client::connect(&path).await?;
        c.status().await
    };
    match tokio::time::timeout(Duration::from_secs(1), ask).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("{} did not answer within 1s", path.display())),
    }
}

async fn wait_up(side: &SideProc, daemon: &'static str) -> Result<(), DemoError> {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if status_of(&side.run_dir, daemon).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(DemoError::NoAnswer {
        side: side.label,
        daemon,
        log: side.log.clone(),
        tail: side.log_tail(),
    })
}

async fn run(a: DemoArgs) -> Result<(), DemoError> {
    check_prerequisites()?;
    let bin = std::env::current_exe().map_err(DemoError::CurrentExe)?;
    let work = work_dir()?;
    let mut demo = Demo {
        work: work.clone(),
        keep_dir: a.keep_dir,
        host: None,
        dpu: None,
        mounted: false,
        traffic: CancellationToken::new(),
    };
    let say = |m: &str| {
        if a.no_tui {
            println!("demo: {m}");
        }
    };
    let key = work.join("psk");
    crate::wire::Psk::write_new(&key, false)?;
    let export = work.join("export");
    mkdir(&export.join("live"))?;
    mkdir(&export.join("docs"))?;
    write(
        &export.join("hello.txt"),
        "hello from the HOST: this tree is served by the engine and mounted on the DPU\n",
    )?;
    write(
        &export.join("docs/README.txt"),
        "dpuctl demo tree. live/ receives a file a second from the DPU side.\n",
    )?;
    let (fs_port, host_uds, dpu_uds, rexec_port) =
        (free_port()?, free_port()?, free_port()?, free_port()?);
    let tools = Tools {
        uds_connect: has_tool(&bin, "uds-connect"),
        rexec: has_tool(&bin, "rexec"),
        rexec_server: has_tool(&bin, "rexec_server"),
    };
    let stats: SharedStats = Arc::new(Mutex::new(Stats {
        tools,
        ..Stats::default()
    }));

    say(&format!(
        "HOST engine: files on 127.0.0.1:{fs_port}, udsproxyd peer on :{host_uds} (work dir {})",
        work.display()
    ));
    let whitelist = format!(
        "[Mount]\nPath={}\n[Udsconnect]\nPath={ECHO_SOCKET}\n",
        export.display()
    );
    demo.host = Some(start_side(
        "HOST",
        &work,
        &bin,
        &[
            "engine".into(),
            "2".into(),
            "1".into(),
            "127.0.0.1".into(),
            host_uds.to_string(),
            "127.0.0.1".into(),
            dpu_uds.to_string(),
            "--listen".into(),
            format!("tcp://127.0.0.1:{fs_port}"),
        ],
        &whitelist,
        &key,
    )?);
    say(&format!("DPU udsproxyd on 127.0.0.1:{dpu_uds}"));
    demo.dpu = Some(start_side(
        "DPU",
        &work,
        &bin,
        &[
            "udsproxyd".into(),
            "1".into(),
            "127.0.0.1".into(),
            dpu_uds.to_string(),
            "127.0.0.1".into(),
            host_uds.to_string(),
        ],
        &format!("[Udsconnect]\nPath={ECHO_SOCKET}\n"),
        &key,
    )?);
    wait_up(demo.host(), "engine").await?;
    wait_up(demo.dpu(), "udsproxyd").await?;

    // Mount the demo tree on the DPU.
    if !Path::new("/dev/fuse").exists() {
        lock_stats(&stats).mount_error = Some("/dev/fuse is missing: load the fuse module".into());
    } else {
        let opts = format!("server=tcp://127.0.0.1:{fs_port},key={}", key.display());
        let mut c = demo.dpu().command(Path::new("sh"))?;
        c.args([
            "-c",
            "mkdir -p \"$1\" && exec \"$2\" mount \"$3\" \"$1\" -o \"$4\"",
            "mount",
            MOUNT_POINT,
        ])
        .arg(&bin)
        .arg(&export)
        .arg(&opts);
        match output(c, Duration::from_secs(15)).await {
            Ok(_) => {
                demo.mounted = true;
                say(&format!(
                    "mounted the HOST's {} at the DPU's {MOUNT_POINT}",
                    export.display()
                ));
            }
            Err(e) => lock_stats(&stats).mount_error = Some(format!("mount failed: {e}")),
        }
    }

    // The HOST's echo server, bound inside the HOST's private /run.
    let host_pid = demo.host().pid().unwrap_or(0);
    let echo_path = PathBuf::from(format!("/proc/{host_pid}/root{ECHO_SOCKET}"));
    let echo = tokio::net::UnixListener::bind(&echo_path).map_err(|source| DemoError::Echo {
        path: echo_path.clone(),
        source,
    })?;
    tokio::spawn(echo_server(echo, demo.traffic.clone()));

    if tools.rexec_server {
        // The demo's own whitelist: exactly the programs its traffic runs (mode 0400, root,
        // as rexec_server demands).
        let wl = work.join("host/rexec-whitelist");
        write(&wl, "/bin/sh\n/bin/sleep\n/usr/bin/sleep\n/usr/bin/sh\n")?;
        std::fs::set_permissions(&wl, std::fs::Permissions::from_mode(0o400)).map_err(
            |source| DemoError::Write {
                path: wl.clone(),
                source,
            },
        )?;
        let mut c = demo.host().command(&bin)?;
        c.arg("rexec_server")
            .arg("--whitelist")
            .arg(&wl)
            .env("CMD_NET_ADDR", format!("tcp://127.0.0.1:{rexec_port}"))
            .env("REXEC_LOG_FILE", "std")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = c.spawn().map_err(|source| DemoError::Spawn {
            what: "rexec_server on the HOST side".into(),
            source,
        })?;
        tokio::spawn(hold(child, demo.traffic.clone()));
        // Its control socket appears once it listens: no rexec call before that.
        wait_up(demo.host(), "rexec_server").await?;
        say(&format!("HOST rexec_server on 127.0.0.1:{rexec_port}"));
    }

    // Traffic.
    if demo.mounted {
        tokio::spawn(file_traffic(
            demo.dpu().command(Path::new("sh"))?,
            stats.clone(),
            demo.traffic.clone(),
        ));
    }
    if tools.uds_connect {
        let mut c = demo.dpu().command(&bin)?;
        c.args(["uds-connect", ECHO_SOCKET]);
        tokio::spawn(echo_traffic(c, stats.clone(), demo.traffic.clone()));
    }
    if tools.rexec && tools.rexec_server {
        let addr = format!("tcp://127.0.0.1:{rexec_port}");
        let mut short = demo.dpu().command(&bin)?;
        short.env("CMD_NET_ADDR", &addr).arg("rexec");
        let mut long = demo.dpu().command(&bin)?;
        long.env("CMD_NET_ADDR", &addr)
            .args(["rexec", "/bin/sleep", "3600"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        tokio::spawn(rexec_traffic(
            short,
            long,
            stats.clone(),
            demo.traffic.clone(),
        ));
    }

    let (host_run, dpu_run) = (demo.host().run_dir.clone(), demo.dpu().run_dir.clone());
    let started = Instant::now();
    if a.no_tui {
        headless(&host_run, &dpu_run, &stats, a.duration, started).await
    } else {
        let (tx, rx) = tokio::sync::watch::channel(String::new());
        let token = demo.traffic.clone();
        let (h, d, s) = (host_run.clone(), dpu_run.clone(), stats.clone());
        tokio::spawn(async move {
            loop {
                let line = status_line(&h, &d, &s, started).await;
                if tx.send(line).is_err() {
                    return;
                }
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(TRAFFIC_PERIOD) => {}
                }
            }
        });
        let options = crate::tui::TuiOptions {
            dirs: vec![("HOST".into(), host_run), ("DPU".into(), dpu_run)],
            color: crate::tui::use_color(a.no_color, std::env::var_os("NO_COLOR")),
            interval: Duration::from_secs(1),
            banner: Some(rx),
        };
        let shutdown = CancellationToken::new();
        let on_int = shutdown.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                on_int.cancel();
            }
        });
        crate::tui::run(options, shutdown).await?;
        Ok(())
    }
    // `demo` drops here: teardown.
}

/// Headless: a status line every few seconds until SIGINT/SIGTERM or `duration`; with a
/// duration, the final check decides the exit status.
async fn headless(
    host_run: &Path,
    dpu_run: &Path,
    stats: &SharedStats,
    duration: Option<Duration>,
    started: Instant,
) -> Result<(), DemoError> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(DemoError::Runtime)?;
    let end = duration.map(|d| tokio::time::Instant::now() + d);
    let until_end = async {
        match end {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until_end);
    loop {
        println!("{}", status_line(host_run, dpu_run, stats, started).await);
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = &mut until_end => {
                let problems = check(host_run, dpu_run, stats).await;
                println!("{}", status_line(host_run, dpu_run, stats, started).await);
                if problems.is_empty() {
                    println!("demo: ok, every component came up");
                    return Ok(());
                }
                return Err(DemoError::Check(problems.join("; ")));
            }
            _ = tokio::time::sleep(STATUS_PERIOD) => {}
        }
    }
    println!("demo: stopping");
    Ok(())
}

fn link_state(status: &Result<DaemonStatus, String>) -> String {
    match status {
        Err(_) => "DOWN".into(),
        Ok(s) => {
            let link = s
                .peers
                .iter()
                .find(|p| p.role.as_deref() != Some("mount"))
                .map(|p| match p.state {
                    PeerState::Connected => "connected",
                    PeerState::Connecting => "connecting",
                    PeerState::Disconnected => "disconnected",
                    PeerState::AuthFailed => "auth_failed (key mismatch?)",
                });
            format!("up, link {}", link.unwrap_or("none"))
        }
    }
}

/// One line saying how every component is doing.
pub async fn status_line(
    host_run: &Path,
    dpu_run: &Path,
    stats: &SharedStats,
    started: Instant,
) -> String {
    let engine = status_of(host_run, "engine").await;
    let uds = status_of(dpu_run, "udsproxyd").await;
    let s = lock_stats(stats).clone();
    let mount = match &s.mount_error {
        Some(e) => format!("mount: {e}"),
        None => format!("files {} ok/{} failed", s.file_ok, s.file_err),
    };
    let echo = if s.tools.uds_connect {
        format!("uds-connect echo {} ok/{} failed", s.echo_ok, s.echo_err)
    } else {
        "uds-connect: missing from this build".into()
    };
    let rexec = match (s.tools.rexec, s.tools.rexec_server) {
        (true, true) => match (&s.last_rexec_error, s.rexec_err) {
            (Some(e), 1..) => format!("rexec {} ok/{} failed (last: {e})", s.rexec_ok, s.rexec_err),
            _ => format!("rexec {} ok/{} failed", s.rexec_ok, s.rexec_err),
        },
        (false, _) => "rexec: missing from this build".into(),
        (true, false) => "rexec_server: missing from this build".into(),
    };
    format!(
        "demo {}s | HOST engine {} | DPU udsproxyd {} | {mount} | {echo} | {rexec}",
        started.elapsed().as_secs(),
        link_state(&engine),
        link_state(&uds),
    )
}

/// What did not work, for `--duration`: empty when everything this build has came up.
async fn check(host_run: &Path, dpu_run: &Path, stats: &SharedStats) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = status_of(host_run, "engine").await {
        problems.push(format!("HOST engine: {e}"));
    }
    match status_of(dpu_run, "udsproxyd").await {
        Err(e) => problems.push(format!("DPU udsproxyd: {e}")),
        Ok(s) if !s.peers.iter().any(|p| p.state == PeerState::Connected) => {
            problems.push("DPU udsproxyd: its link to the engine is not connected".into())
        }
        Ok(_) => {}
    }
    let s = lock_stats(stats).clone();
    match (&s.mount_error, s.file_ok) {
        (Some(e), _) => problems.push(e.clone()),
        (None, 0) => problems.push(format!(
            "no file traffic went through the mount ({})",
            s.last_file_error
                .unwrap_or_else(|| "no round finished".into())
        )),
        _ => {}
    }
    if s.tools.uds_connect && s.echo_ok == 0 {
        problems.push(format!(
            "no line came back through uds-connect ({})",
            s.last_echo_error
                .unwrap_or_else(|| "no round finished".into())
        ));
    }
    if s.tools.rexec && s.tools.rexec_server && s.rexec_ok == 0 {
        problems.push(format!(
            "no rexec call succeeded ({})",
            s.last_rexec_error
                .unwrap_or_else(|| "no call finished".into())
        ));
    }
    problems
}

/// Runs a command to completion within `limit`; its stdout on success, else why not.
async fn output(mut c: tokio::process::Command, limit: Duration) -> Result<String, String> {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = c.spawn().map_err(|e| format!("cannot run it: {e}"))?;
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Err(_) => Err(format!("no result within {}s", limit.as_secs())),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(o)) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(Ok(o)) => Err(format!(
            "{}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
    }
}

/// Keeps a long-running child until the demo ends (kill_on_drop does the rest).
async fn hold(mut child: tokio::process::Child, token: CancellationToken) {
    tokio::select! {
        _ = token.cancelled() => {}
        _ = child.wait() => {}
    }
}

/// Echoes every connection on `listener`, the HOST-side Unix server of the proxied socket.
async fn echo_server(listener: tokio::net::UnixListener, token: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = token.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let token = token.clone();
        tokio::spawn(async move {
            let (mut r, mut w) = stream.into_split();
            tokio::select! {
                _ = token.cancelled() => {}
                _ = tokio::io::copy(&mut r, &mut w) => {}
            }
        });
    }
}

/// Once a second: write, read back, list and prune files in the DPU's mount.
async fn file_traffic(base: tokio::process::Command, stats: SharedStats, token: CancellationToken) {
    let mut n: u64 = 0;
    loop {
        n += 1;
        let script = format!(
            "set -e; m={MOUNT_POINT}; echo \"tick {n} $(date)\" > $m/live/t{n}.txt; \
             cat $m/live/t{n}.txt > /dev/null; cat $m/hello.txt > /dev/null; \
             ls -l $m $m/live $m/docs > /dev/null; rm -f $m/live/t{}.txt",
            n.saturating_sub(10)
        );
        let cmd = clone_command(&base, &["-c", &script]);
        let result = tokio::select! {
            _ = token.cancelled() => return,
            r = output(cmd, Duration::from_secs(10)) => r,
        };
        {
            let mut s = lock_stats(&stats);
            match result {
                Ok(_) => s.file_ok += 1,
                Err(e) => {
                    s.file_err += 1;
                    s.last_file_error = Some(e);
                }
            }
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(TRAFFIC_PERIOD) => {}
        }
    }
}

/// A copy of `base` (program, arguments, environment) with `extra` arguments appended:
/// tokio's Command is not Clone.
fn clone_command(base: &tokio::process::Command, extra: &[&str]) -> tokio::process::Command {
    let std = base.as_std();
    let mut c = tokio::process::Command::new(std.get_program());
    c.args(std.get_args()).args(extra);
    for (k, v) in std.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c.stdin(Stdio::null()).process_group(0).kill_on_drop(true);
    c
}

/// One long-lived `uds-connect` to the HOST's echo server; a line a second through it.
async fn echo_traffic(base: tokio::process::Command, stats: SharedStats, token: CancellationToken) {
    let mut n: u64 = 0;
    loop {
        let mut c = clone_command(&base, &[]);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawned = c.spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                {
                    let mut s = lock_stats(&stats);
                    s.echo_err += 1;
                    s.last_echo_error = Some(format!("cannot run uds-connect: {e}"));
                }
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(TRAFFIC_PERIOD * 5) => continue,
                }
            }
        };
        let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return;
        };
        let mut lines = BufReader::new(stdout).lines();
        loop {
            n += 1;
            let ping = format!("ping {n}");
            let round = async {
                stdin
                    .write_all(format!("{ping}\n").as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                stdin.flush().await.map_err(|e| e.to_string())?;
                match lines.next_line().await {
                    Ok(Some(l)) if l == ping => Ok(()),
                    Ok(Some(l)) => Err(format!("sent {ping:?}, got {l:?}")),
                    Ok(None) => Err("uds-connect closed the connection".to_owned()),
                    Err(e) => Err(e.to_string()),
                }
            };
            let result = tokio::select! {
                _ = token.cancelled() => return,
                r = tokio::time::timeout(Duration::from_secs(3), round) => {
                    r.unwrap_or_else(|_| Err("no echo within 3s".into()))
                }
            };
            let failed = result.is_err();
            {
                let mut s = lock_stats(&stats);
                match result {
                    Ok(()) => s.echo_ok += 1,
                    Err(e) => {
                        s.echo_err += 1;
                        s.last_echo_error = Some(e);
                    }
                }
            }
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(TRAFFIC_PERIOD) => {}
            }
            if failed {
                // Start over with a new connection.
                let _ = child.start_kill();
                break;
            }
        }
    }
}

/// Short rexec calls every few seconds, and one long session kept running.
async fn rexec_traffic(
    short: tokio::process::Command,
    long: tokio::process::Command,
    stats: SharedStats,
    token: CancellationToken,
) {
    let mut long_child: Option<tokio::process::Child> = None;
    let mut n: u64 = 0;
    loop {
        n += 1;
        let alive = match long_child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        };
        if !alive {
            long_child = clone_command(&long, &[])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok();
        }
        let script = format!("echo demo call {n} from $(hostname); sleep 2");
        let cmd = clone_command(&short, &["/bin/sh", "-c", &script]);
        let result = tokio::select! {
            _ = token.cancelled() => return,
            r = output(cmd, Duration::from_secs(15)) => r,
        };
        {
            let mut s = lock_stats(&stats);
            match result {
                Ok(out) if out.contains(&format!("demo call {n}")) => s.rexec_ok += 1,
                Ok(out) => {
                    s.rexec_err += 1;
                    s.last_rexec_error = Some(format!("unexpected output {out:?}"));
                }
                Err(e) => {
                    s.rexec_err += 1;
                    s.last_rexec_error = Some(e);
                }
            }
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(REXEC_PERIOD) => {}
        }
    }
}
