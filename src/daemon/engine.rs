//! `engine`: the HOST-side server. It serves qtfs clients on its file-service address and runs
//! the built-in udsproxyd peer, so the HOST needs no separate udsproxyd.
//!
//! The built-in peer is the same proxy as `udsproxyd` ([`crate::uds::proxy::UdsProxy`]):
//! it serves the DPU's connects to HOST sockets, and HOST clients reach DPU sockets through
//! its request socket (`[udsproxyd] request_socket`).
//!
//! Concurrency: the file-service accept loop, the peer manager and the request-socket server
//! run as tasks until the daemon's shutdown token is cancelled; each client link is tracked
//! in `Clients` until it closes, so `status` lists exactly the live ones.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use clap::Parser;

use crate::allowlist::ListType;
use crate::config::{optional_addr, Config};
use crate::daemon::peer::PeerManager;
use crate::daemon::runner::{self, CommonArgs, Daemon, StartError, StatusSource};
use crate::daemon::status::{PeerState, PeerStatus};
use crate::fs::link::FsService;
use crate::fs::server::FsPool;
use crate::uds::proxy::{self, UdsProxy};
use crate::wire::{self, Addr, Hello, Link, LinkOptions, Role};

/// The original file-service port (the qtfs kernel module's default).
pub const DEFAULT_FS_PORT: u16 = 12345;

#[derive(Debug, Parser)]
#[command(
    name = "engine",
    version,
    about = "HOST-side dpuctl server: qtfs file service, built-in udsproxyd peer, allowlists",
    long_about = "The HOST side of a dpuctl pair. Serves the shared filesystem to qtfs mounts on the \
DPU, runs the udsproxyd peer that DPU processes reach HOST Unix sockets through, and enforces the \
allowlists of /etc/qtfs/whitelist. Runs in the foreground (systemd Type=notify); SIGTERM or SIGINT \
stop it, SIGHUP reloads the config file's log level and the allowlists.\n\n\
The original positional form is accepted unchanged:\n  \
engine <threads> <uds threads> <host addr> <uds port> <dpu addr> <uds peer port>\n\
where an address is an IP (TCP) or a vsock CID. The file service then listens on \
<host addr>:12345 unless --listen says otherwise.",
    after_help = "Examples:\n  engine 16 1 192.168.10.10 12121 192.168.10.11 12121\n  engine --listen tcp://0.0.0.0:12345 --uds-peer tcp://192.168.10.11:12121\n  engine --config /etc/dpuctl/config.toml\n\nFiles: /etc/dpuctl/config.toml, /etc/dpuctl/psk, /etc/qtfs/whitelist, /var/run/qtfs/engine.ctl, /var/run/qtfs/engine.lock"
)]
struct EngineArgs {
    /// Original form: <threads> <uds threads> [<host addr> <uds port> <dpu addr> <uds peer port>]
    #[arg(value_name = "POSITIONAL", num_args = 0..=6)]
    positional: Vec<String>,
    /// File service address (tcp://HOST:PORT, vsock://CID:PORT, unix:///PATH)
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Where the built-in udsproxyd peer listens
    #[arg(long, value_name = "ADDR")]
    uds_listen: Option<String>,
    /// The DPU's udsproxyd to dial
    #[arg(long, value_name = "ADDR")]
    uds_peer: Option<String>,
    /// Do not run the built-in udsproxyd peer
    #[arg(long)]
    no_uds: bool,
    /// File-service worker pool size
    #[arg(long)]
    threads: Option<usize>,
    /// Runtime threads of the built-in udsproxyd peer
    #[arg(long)]
    uds_threads: Option<usize>,
    #[command(flatten)]
    common: CommonFlags,
}

/// The command line, for the manual page (`dpuctl man`).
pub(crate) fn command() -> clap::Command {
    <EngineArgs as clap::CommandFactory>::command()
}

/// The flags every daemon shares.
#[derive(Debug, clap::Args)]
pub struct CommonFlags {
    /// Config file [default: $DPUCTL_CONFIG, else /etc/dpuctl/config.toml]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Pre-shared key file [default: /etc/dpuctl/psk]
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Do not authenticate links (closed test networks only; both sides must say it)
    #[arg(long)]
    pub insecure: bool,
    /// Directory of control sockets and locks [default: /var/run/qtfs]
    #[arg(long, value_name = "DIR", env = "DPUCTL_RUN_DIR")]
    pub run_dir: Option<PathBuf>,
    /// Log level or tracing directive [default: info]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Allowlist file [default: /etc/qtfs/whitelist]
    #[arg(long, value_name = "FILE")]
    pub whitelist: Option<PathBuf>,
}

impl CommonFlags {
    pub fn to_args(&self) -> CommonArgs {
        CommonArgs {
            config: self.config.clone(),
            key_file: self.key.clone(),
            insecure: self.insecure,
            run_dir: self.run_dir.clone(),
            log_level: self.log_level.clone(),
            whitelist: self.whitelist.clone(),
        }
    }
}

/// Applies the original positional form and the flags to the engine section.
fn apply_args(config: &mut Config, a: &EngineArgs) -> Result<(), StartError> {
    let e = &mut config.engine;
    let p = &a.positional;
    let number = |s: &str, what: &str| -> Result<usize, StartError> {
        s.parse::<usize>()
            .map_err(|_| StartError::Usage(format!("<{what}> must be a number, not {s:?}")))
    };
    match p.len() {
        0 => {}
        2 | 6 => {
            e.threads = number(&p[0], "threads")?;
            e.uds_threads = number(&p[1], "uds threads")?;
            if p.len() == 6 {
                let positional = |addr: &str, port: &str| {
                    Addr::from_positional(addr, port)
                        .map(|a| a.to_string())
                        .map_err(|err| StartError::Usage(err.to_string()))
                };
                e.uds_listen = positional(&p[2], &p[3])?;
                e.uds_peer = positional(&p[4], &p[5])?;
                e.listen = positional(&p[2], &DEFAULT_FS_PORT.to_string())?;
            }
        }
        n => {
            return Err(StartError::Usage(format!(
            "got {n} positional arguments: give <threads> <uds threads>, optionally followed by \
                 <host addr> <uds port> <dpu addr> <uds peer port> (see engine --help)"
        )))
        }
    }
    if let Some(l) = &a.listen {
        e.listen = l.clone();
    }
    if let Some(l) = &a.uds_listen {
        e.uds_listen = l.clone();
    }
    if let Some(l) = &a.uds_peer {
        e.uds_peer = l.clone();
    }
    if a.no_uds {
        e.uds_listen.clear();
        e.uds_peer.clear();
    }
    if let Some(t) = a.threads {
        e.threads = t;
    }
    if let Some(t) = a.uds_threads {
        e.uds_threads = t;
    }
    Ok(())
}

/// Entry point for `engine` and `dpuctl engine`.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let a = match EngineArgs::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => return crate::cli::clap_exit(e),
    };
    crate::cli::run_daemon("engine", None, run_main(a))
}

async fn run_main(a: EngineArgs) -> Result<(), StartError> {
    // Files the engine creates for DPU callers carry the mode the DPU kernel already masked;
    // its own files (lock, sockets, whitelist, log) all get explicit modes. With umask 0
    // the file service may create on runtime threads too (FsPool::creating).
    // SAFETY: umask cannot fail; no other thread creates files yet.
    unsafe { libc::umask(0) };
    let common = a.common.to_args();
    let (mut config, source) = runner::resolve(&common)?;
    apply_args(&mut config, &a)?;
    let (daemon, reloads) = Daemon::start("engine", &config, source, common).await?;
    require_mount_entries(&daemon, &config)?;
    let auth = runner::auth(&config)?;
    let engine = Engine::bind(&config, auth, daemon.clone()).await?;
    daemon.set_status_source(engine.clone());
    daemon.ready();
    let tasks = engine.spawn(daemon.shutdown.clone());
    daemon.serve_until_shutdown(reloads).await;
    engine.clients.close_all();
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

/// The engine serves nothing without a `[Mount]` entry (as the original): refuse to start
/// and say how to add one.
fn require_mount_entries(daemon: &Daemon, config: &Config) -> Result<(), StartError> {
    let empty = daemon
        .allowlist
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .entries(ListType::Mount)
        .is_empty();
    if empty {
        return Err(StartError::Usage(format!(
            "no [Mount] entry in {}: the engine exports nothing without one. Add the directories \
             the DPU may mount, e.g.\n  [Mount]\n  Path=/var/lib/docker;/proc;/sys\nand start \
             the engine again",
            config.common.whitelist.display()
        )));
    }
    Ok(())
}

/// The engine's listeners, peer and clients.
pub struct Engine {
    fs_listener: Mutex<Option<wire::Listener>>,
    fs_addr: String,
    uds_listener: Mutex<Option<wire::Listener>>,
    uds_addr: Option<String>,
    peer: Option<PeerManager>,
    /// The built-in udsproxyd peer's proxy (with `peer`).
    uds: Option<Arc<UdsProxy>>,
    /// Its request socket, until `spawn` serves it; `None` when it could not be bound.
    uds_requests: Mutex<Option<(tokio::net::UnixListener, PathBuf)>>,
    /// `unix://` + the request socket path, for status.
    uds_request_addr: Option<String>,
    clients: Arc<Clients>,
    auth: wire::Auth,
    hello: Hello,
    opts: LinkOptions,
    rejected: Arc<AtomicU64>,
    /// The bounded pool every client's file syscalls run on (the original `<threads>`).
    pool: Arc<FsPool>,
    allowlist: crate::allowlist::SharedAllowlist,
    /// The built-in udsproxyd peer's own runtime (with `peer`).
    peer_rt: Option<PeerRuntime>,
}

/// The runtime of the built-in udsproxyd peer: `<uds threads>` workers of its own (the
/// original's second thread count), apart from the file service's. Its listeners, links and
/// proxied connections are all registered with this runtime's reactor, so a proxied message
/// is received, forwarded and sent by the same few threads, never handed between the two
/// roles' workers (measured: docs/performance.md). Shut down in the background when
/// dropped, which is safe inside the engine's own runtime.
struct PeerRuntime(Option<tokio::runtime::Runtime>);

impl PeerRuntime {
    fn new(threads: usize) -> std::io::Result<PeerRuntime> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("udsproxy")
            .enable_all()
            .build()?;
        Ok(PeerRuntime(Some(rt)))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("the peer runtime lives until dropped")
            .handle()
    }

    /// Runs `f` on this runtime (so what it binds is registered with this runtime's reactor)
    /// and waits for it from any runtime; a task that panicked is an error, not a panic here.
    async fn run<T, F>(&self, f: F) -> std::io::Result<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = T> + Send + 'static,
    {
        self.handle()
            .spawn(f)
            .await
            .map_err(|e| std::io::Error::other(format!("the udsproxyd runtime lost its task: {e}")))
    }
}

impl Drop for PeerRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl Engine {
    /// Binds the file service and the udsproxyd peer port, so a busy port fails the start
    /// before systemd is told the engine is ready.
    pub async fn bind(
        config: &Config,
        auth: wire::Auth,
        daemon: Arc<Daemon>,
    ) -> Result<Arc<Engine>, StartError> {
        let e = &config.engine;
        let pool = FsPool::new(e.threads).map_err(|source| StartError::Bind {
            addr: format!("a pool of {} file-service threads", e.threads),
            source,
        })?;
        let bad = |key: &str, err: wire::AddrError| StartError::Usage(format!("{key}: {err}"));
        let fs_addr: Addr = e.listen.parse().map_err(|err| bad("engine.listen", err))?;
        let fs_listener = fs_addr.bind().await.map_err(|source| StartError::Bind {
            addr: fs_addr.to_string(),
            source,
        })?;
        let fs_bound = fs_listener.local_addr().to_string();
        let uds_listen =
            optional_addr(&e.uds_listen).map_err(|err| bad("engine.uds_listen", err))?;
        let uds_peer = optional_addr(&e.uds_peer).map_err(|err| bad("engine.uds_peer", err))?;
        let peer_rt = if uds_listen.is_some() || uds_peer.is_some() {
            let rt = PeerRuntime::new(e.uds_threads).map_err(|source| StartError::Bind {
                addr: format!("a runtime of {} udsproxyd threads", e.uds_threads),
                source,
            })?;
            Some(rt)
        } else {
            None
        };
        let uds_listener = match (&uds_listen, &peer_rt) {
            (Some(addr), Some(rt)) => {
                let bind_addr = addr.clone();
                let bound = rt.run(async move { bind_addr.bind().await }).await;
                Some(bound.and_then(|b| b).map_err(|source| StartError::Bind {
                    addr: addr.to_string(),
                    source,
                })?)
            }
            _ => None,
        };
        let uds_addr = uds_listener.as_ref().map(|l| l.local_addr().to_string());
        let hello = Hello::new(Role::Engine);
        let opts = LinkOptions::default();
        let uds = (uds_listener.is_some() || uds_peer.is_some())
            .then(|| UdsProxy::new(daemon.allowlist.clone()));
        let peer = uds.as_ref().map(|uds| {
            let mut peer_opts = opts.clone();
            peer_opts.max_in_flight = e.uds_threads.max(1) * 64;
            peer_opts.coalesce_writes = true;
            PeerManager::new(
                hello.clone(),
                auth.clone(),
                uds_peer,
                uds_addr.clone(),
                uds.clone(),
                peer_opts,
            )
        });
        // The request socket is a convenience for HOST clients: the engine's main job is the
        // file service, so a path already served elsewhere costs a warning, not the start.
        let uds_requests = match (&uds, &peer_rt) {
            (Some(_), Some(rt)) => {
                let path = config.udsproxyd.request_socket_path(&config.common.run_dir);
                let (bind_path, mode) = (path.clone(), config.udsproxyd.request_socket_mode);
                let bound = rt
                    .run(async move { proxy::bind_request_socket(&bind_path, mode) })
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|b| b.map_err(|e| e.to_string()));
                match bound {
                    Ok(l) => Some((l, path)),
                    Err(err) => {
                        tracing::warn!(error = %err, "the built-in udsproxyd peer serves no request socket: HOST clients cannot reach DPU sockets");
                        None
                    }
                }
            }
            _ => None,
        };
        tracing::info!(listen = %fs_bound, uds_listen = ?uds_addr, "engine listening");
        Ok(Arc::new(Engine {
            fs_listener: Mutex::new(Some(fs_listener)),
            fs_addr: fs_bound,
            uds_listener: Mutex::new(uds_listener),
            uds_addr,
            peer,
            uds,
            uds_request_addr: uds_requests
                .as_ref()
                .map(|(_, p)| format!("unix://{}", p.display())),
            uds_requests: Mutex::new(uds_requests),
            clients: Arc::new(Clients::default()),
            auth,
            hello,
            opts,
            rejected: Arc::new(AtomicU64::new(0)),
            pool,
            allowlist: daemon.allowlist.clone(),
            peer_rt,
        }))
    }

    /// Starts serving; the tasks end when `shutdown` is cancelled.
    pub fn spawn(
        self: &Arc<Self>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        let fs_listener = self
            .fs_listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(listener) = fs_listener {
            let clients = self.clients.clone();
            let on_link: wire::OnLink = Arc::new(move |link| clients.add(link));
            let rejected = self.rejected.clone();
            let on_reject: wire::OnReject = Arc::new(move |_peer, _e| {
                rejected.fetch_add(1, Ordering::Relaxed);
            });
            let (allowlist, pool) = (self.allowlist.clone(), self.pool.clone());
            let make_service: wire::MakeService = Arc::new(move |_peer| {
                Arc::new(FsService::new(allowlist.clone(), pool.clone())) as Arc<dyn wire::Service>
            });
            tasks.push(tokio::spawn(wire::serve_per_link(
                listener,
                self.auth.clone(),
                self.hello.clone(),
                make_service,
                self.opts.clone(),
                on_link,
                on_reject,
                shutdown.clone(),
            )));
        }
        if let (Some(peer), Some(rt)) = (&self.peer, &self.peer_rt) {
            let rt = rt.handle();
            let listener = self
                .uds_listener
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            let requests = self
                .uds_requests
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let (Some(uds), Some((requests, path))) = (&self.uds, requests) {
                let (uds, peer, shutdown) = (uds.clone(), peer.clone(), shutdown.clone());
                tasks.push(rt.spawn(async move {
                    uds.serve_requests(requests, peer, shutdown).await;
                    let _ = std::fs::remove_file(path);
                }));
            }
            let peer = peer.clone();
            tasks.push(rt.spawn(async move { peer.run(listener, shutdown).await }));
        }
        tasks
    }
}

impl StatusSource for Engine {
    fn listen(&self) -> Vec<String> {
        let mut v = vec![self.fs_addr.clone()];
        v.extend(self.uds_addr.clone());
        v.extend(self.uds_request_addr.clone());
        v
    }

    fn peers(&self) -> Vec<PeerStatus> {
        let mut peers: Vec<PeerStatus> = self.peer.iter().map(PeerManager::status).collect();
        peers.extend(self.clients.status());
        peers
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        let mut c = BTreeMap::from([
            ("clients".to_string(), self.clients.len() as u64),
            ("requests".to_string(), self.clients.requests()),
            (
                "handshakes_refused".to_string(),
                self.rejected.load(Ordering::Relaxed),
            ),
        ]);
        let (busy, queued) = self.pool.load();
        c.insert("fs_pool_threads".to_string(), self.pool.threads() as u64);
        c.insert("fs_pool_busy".to_string(), busy as u64);
        c.insert("fs_pool_queued".to_string(), queued as u64);
        if let Some(uds) = &self.uds {
            c.extend(uds.registry().counters());
        }
        c
    }

    fn connections(&self) -> Vec<crate::daemon::status::ConnectionStatus> {
        self.uds
            .as_ref()
            .map(|u| u.registry().connections())
            .unwrap_or_default()
    }
}

/// The live client links of the file service.
#[derive(Default)]
struct Clients {
    links: Mutex<HashMap<u64, (Link, std::time::Instant)>>,
    next: AtomicU64,
    /// Requests served on links that have since closed (so `requests` never goes back).
    finished_requests: AtomicU64,
}

impl Clients {
    fn add(self: &Arc<Self>, link: Link) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let peer = link.peer().clone();
        tracing::info!(peer = %peer.address, role = peer.role.as_str(), name = %peer.name, "client connected");
        self.lock()
            .insert(id, (link.clone(), std::time::Instant::now()));
        let me = self.clone();
        tokio::spawn(async move {
            let reason = link.closed().await;
            {
                // Under the table lock, so `requests` sees the link in exactly one place.
                let mut links = me.lock();
                links.remove(&id);
                me.finished_requests
                    .fetch_add(link.stats().requests_in, Ordering::Relaxed);
            }
            tracing::info!(peer = %peer.address, reason = %reason, "client disconnected");
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Link, std::time::Instant)>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    /// File-service requests served since the engine started, by every client.
    fn requests(&self) -> u64 {
        let links = self.lock();
        let live: u64 = links.values().map(|(l, _)| l.stats().requests_in).sum();
        live + self.finished_requests.load(Ordering::Relaxed)
    }

    fn status(&self) -> Vec<PeerStatus> {
        let mut v: Vec<PeerStatus> = self
            .lock()
            .values()
            .map(|(link, since)| {
                let s = link.stats();
                PeerStatus {
                    address: link.peer().address.clone(),
                    state: PeerState::Connected,
                    bytes_in: s.bytes_in,
                    bytes_out: s.bytes_out,
                    role: Some(link.peer().role.as_str().to_string()),
                    rtt_us: s
                        .rtt
                        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
                    since_secs: since.elapsed().as_secs(),
                    last_error: None,
                }
            })
            .collect();
        v.sort_by(|a, b| a.address.cmp(&b.address));
        v
    }

    fn close_all(&self) {
        for (link, _) in self.lock().values() {
            link.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, StartError> {
        let a = EngineArgs::try_parse_from(std::iter::once("engine").chain(args.iter().copied()))
            .map_err(|e| StartError::Usage(e.to_string()))?;
        let mut c = Config::default();
        apply_args(&mut c, &a)?;
        Ok(c)
    }

    #[test]
    fn original_six_positionals() {
        let c = parse(&["2", "1", "127.0.0.1", "12122", "127.0.0.1", "12121"]).unwrap();
        assert_eq!(c.engine.threads, 2);
        assert_eq!(c.engine.uds_threads, 1);
        assert_eq!(c.engine.uds_listen, "tcp://127.0.0.1:12122");
        assert_eq!(c.engine.uds_peer, "tcp://127.0.0.1:12121");
        assert_eq!(c.engine.listen, "tcp://127.0.0.1:12345");
    }

    #[test]
    fn vsock_cids_in_positionals() {
        let c = parse(&["16", "1", "2", "12121", "3", "12121"]).unwrap();
        assert_eq!(c.engine.uds_listen, "vsock://2:12121");
        assert_eq!(c.engine.uds_peer, "vsock://3:12121");
    }

    #[test]
    fn two_positionals_set_pools_only() {
        let c = parse(&["4096", "16"]).unwrap();
        assert_eq!(c.engine.threads, 4096);
        assert_eq!(c.engine.uds_threads, 16);
        assert_eq!(
            c.engine.listen,
            crate::config::EngineConfig::default().listen
        );
    }

    #[test]
    fn wrong_positional_count_is_explained() {
        let err = parse(&["2", "1", "127.0.0.1"]).unwrap_err().to_string();
        assert!(err.contains("3 positional arguments"), "{err}");
        let err = parse(&["two", "1"]).unwrap_err().to_string();
        assert!(err.contains("<threads> must be a number"), "{err}");
    }

    #[test]
    fn flags_override_positionals() {
        let c = parse(&[
            "2",
            "1",
            "127.0.0.1",
            "12122",
            "127.0.0.1",
            "12121",
            "--listen",
            "tcp://127.0.0.1:9999",
            "--no-uds",
        ])
        .unwrap();
        assert_eq!(c.engine.listen, "tcp://127.0.0.1:9999");
        assert!(c.engine.uds_listen.is_empty() && c.engine.uds_peer.is_empty());
    }
}
