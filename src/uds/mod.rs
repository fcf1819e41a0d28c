//! `udsproxyd`: the cross-host Unix domain socket proxy peer, and `dpuctl uds-connect`.
//!
//! Two peers (a DPU's udsproxyd and the HOST's engine, or two udsproxyd) keep one
//! authenticated link between them through [`PeerManager`]; either may start first. Local
//! clients ask for remote connections on the request socket; each proxied connection is one
//! flow-controlled stream on the link ([`proxy`]; formats in [`proto`]; docs/udsproxyd.md).
//! - [`proxy`]: the proxy shared with the engine's built-in peer.
//! - [`proto`]: request, reply and record formats.
//! - [`connect`]: `dpuctl uds-connect`, stdin/stdout bridged to a remote socket.
//! - [`fdpass`]: descriptors passed over proxied connections (pipes, regular files).
//!
//! Concurrency: the peer manager and the request-socket server run as tasks until the
//! daemon's shutdown token fires; each proxied connection is one task (see [`proxy`]).

use std::ffi::OsString;
use std::process::ExitCode;

pub mod connect;
pub mod fdpass;
pub mod proto;
pub mod proxy;
use std::sync::{Arc, Mutex};

use clap::Parser;

use crate::config::{optional_addr, Config};
use crate::daemon::engine::CommonFlags;
use crate::daemon::peer::PeerManager;
use crate::daemon::runner::{self, Daemon, StartError, StatusSource};
use crate::daemon::status::PeerStatus;
use crate::wire::{self, Addr, Hello, LinkOptions, Role};
use proxy::UdsProxy;

#[derive(Debug, Parser)]
#[command(
    name = "udsproxyd",
    version,
    about = "Cross-host Unix domain socket proxy peer",
    long_about = "Keeps an authenticated link to its peer (the HOST's engine, or another udsproxyd) \
so that processes on one side can connect to Unix sockets bound on the other. Either side may \
start first; the link is re-established after a peer restart. Runs in the foreground \
(systemd Type=notify); SIGTERM or SIGINT stop it, SIGHUP reloads the allowlists.\n\n\
The original positional form is accepted unchanged:\n  \
udsproxyd <thread num> <addr> <port> <peer addr> <peer port>\n\
where an address is an IP (TCP) or a vsock CID.",
    after_help = "Examples:\n  udsproxyd 1 192.168.10.11 12121 192.168.10.10 12121\n  udsproxyd --listen tcp://0.0.0.0:12121 --peer tcp://192.168.10.10:12121\n  udsproxyd 1 3 12121 2 12121          # vsock: CID 3 here, CID 2 the HOST\n\nFiles: /etc/dpuctl/config.toml, /etc/dpuctl/psk, /etc/qtfs/whitelist, /var/run/qtfs/udsproxyd.ctl, /var/run/qtfs/udsproxyd.lock"
)]
struct UdsArgs {
    /// Original form: <thread num> [<addr> <port> <peer addr> <peer port>]
    #[arg(value_name = "POSITIONAL", num_args = 0..=5)]
    positional: Vec<String>,
    /// Where to listen for the peer (tcp://HOST:PORT, vsock://CID:PORT, unix:///PATH)
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// The peer to dial
    #[arg(long, value_name = "ADDR")]
    peer: Option<String>,
    /// Worker pool size
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    common: CommonFlags,
}

/// The command line, for the manual page (`dpuctl man`).
pub(crate) fn command() -> clap::Command {
    <UdsArgs as clap::CommandFactory>::command()
}

fn apply_args(config: &mut Config, a: &UdsArgs) -> Result<(), StartError> {
    let u = &mut config.udsproxyd;
    let p = &a.positional;
    match p.len() {
        0 => {}
        1 | 5 => {
            u.threads = p[0].parse().map_err(|_| {
                StartError::Usage(format!("<thread num> must be a number, not {:?}", p[0]))
            })?;
            if p.len() == 5 {
                let positional = |addr: &str, port: &str| {
                    Addr::from_positional(addr, port)
                        .map(|a| a.to_string())
                        .map_err(|e| StartError::Usage(e.to_string()))
                };
                u.listen = positional(&p[1], &p[2])?;
                u.peer = positional(&p[3], &p[4])?;
            }
        }
        n => {
            return Err(StartError::Usage(format!(
                "got {n} positional arguments: give <thread num>, optionally followed by \
                 <addr> <port> <peer addr> <peer port> (see udsproxyd --help)"
            )))
        }
    }
    if let Some(l) = &a.listen {
        u.listen = l.clone();
    }
    if let Some(l) = &a.peer {
        u.peer = l.clone();
    }
    if let Some(t) = a.threads {
        u.threads = t;
    }
    Ok(())
}

/// Entry point for `udsproxyd` and `dpuctl udsproxyd`.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let a = match UdsArgs::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => return crate::cli::clap_exit(e),
    };
    // The original <thread num> sizes the runtime: the proxy is I/O-bound, and on a small
    // DPU fewer threads mean fewer cross-thread wake-ups per proxied message.
    let threads = worker_threads(&a);
    crate::cli::run_daemon("udsproxyd", Some(threads), run_main(a))
}

/// Runtime worker threads: `--threads`, else the positional `<thread num>`, else the config
/// file's `threads` (clamped to 1..=64; a bad value is reported later by the full parse).
fn worker_threads(a: &UdsArgs) -> usize {
    let from_args = a
        .threads
        .or_else(|| a.positional.first().and_then(|t| t.parse().ok()));
    let n = from_args.unwrap_or_else(|| {
        runner::resolve(&a.common.to_args())
            .map(|(c, _)| c.udsproxyd.threads)
            .unwrap_or(1)
    });
    n.clamp(1, 64)
}

async fn run_main(a: UdsArgs) -> Result<(), StartError> {
    let common = a.common.to_args();
    let (mut config, source) = runner::resolve(&common)?;
    apply_args(&mut config, &a)?;
    let (daemon, reloads) = Daemon::start("udsproxyd", &config, source, common).await?;
    let auth = runner::auth(&config)?;
    let u = &config.udsproxyd;
    let bad = |key: &str, e: wire::AddrError| StartError::Usage(format!("{key}: {e}"));
    let listen = optional_addr(&u.listen).map_err(|e| bad("udsproxyd.listen", e))?;
    let peer_addr = optional_addr(&u.peer).map_err(|e| bad("udsproxyd.peer", e))?;
    let listener = match &listen {
        Some(addr) => Some(addr.bind().await.map_err(|source| StartError::Bind {
            addr: addr.to_string(),
            source,
        })?),
        None => None,
    };
    let listen_addr = listener.as_ref().map(|l| l.local_addr().to_string());
    let hello = Hello::new(Role::Udsproxyd);
    let opts = LinkOptions {
        max_in_flight: u.threads.max(1) * 64,
        coalesce_writes: true,
        ..LinkOptions::default()
    };
    let uds = UdsProxy::new(daemon.allowlist.clone());
    let peer = PeerManager::new(
        hello,
        auth,
        peer_addr,
        listen_addr.clone(),
        uds.clone(),
        opts,
    );
    let request_path = u.request_socket_path(&config.common.run_dir);
    let requests = proxy::bind_request_socket(&request_path, u.request_socket_mode)
        .map_err(|e| StartError::Usage(e.to_string()))?;
    let mut listening: Vec<String> = listen_addr.into_iter().collect();
    listening.push(format!("unix://{}", request_path.display()));
    let status = Arc::new(Proxy {
        peer: peer.clone(),
        listen: Mutex::new(listening),
        uds: uds.clone(),
    });
    daemon.set_status_source(status);
    tracing::info!(listen = ?listen.map(|a| a.to_string()), peer = %u.peer, request_socket = %request_path.display(), "udsproxyd starting");
    daemon.ready();
    let shutdown = daemon.shutdown.clone();
    let serving = tokio::spawn(uds.serve_requests(requests, peer.clone(), shutdown.clone()));
    let task = tokio::spawn(async move { peer.run(listener, shutdown).await });
    daemon.serve_until_shutdown(reloads).await;
    let _ = task.await;
    let _ = serving.await;
    let _ = std::fs::remove_file(&request_path);
    Ok(())
}

struct Proxy {
    peer: PeerManager,
    listen: Mutex<Vec<String>>,
    uds: Arc<UdsProxy>,
}

impl StatusSource for Proxy {
    fn listen(&self) -> Vec<String> {
        self.listen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    fn peers(&self) -> Vec<PeerStatus> {
        vec![self.peer.status()]
    }
    fn counters(&self) -> std::collections::BTreeMap<String, u64> {
        self.uds.registry().counters()
    }
    fn connections(&self) -> Vec<crate::daemon::status::ConnectionStatus> {
        self.uds.registry().connections()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, StartError> {
        let a = UdsArgs::try_parse_from(std::iter::once("udsproxyd").chain(args.iter().copied()))
            .map_err(|e| StartError::Usage(e.to_string()))?;
        let mut c = Config::default();
        apply_args(&mut c, &a)?;
        Ok(c)
    }

    #[test]
    fn original_positional_form() {
        let c = parse(&["1", "127.0.0.1", "12121", "127.0.0.1", "12122"]).unwrap();
        assert_eq!(c.udsproxyd.threads, 1);
        assert_eq!(c.udsproxyd.listen, "tcp://127.0.0.1:12121");
        assert_eq!(c.udsproxyd.peer, "tcp://127.0.0.1:12122");
    }

    #[test]
    fn flags_form() {
        let c = parse(&["--listen", "tcp://127.0.0.1:1", "--peer", "vsock://2:12121"]).unwrap();
        assert_eq!(c.udsproxyd.listen, "tcp://127.0.0.1:1");
        assert_eq!(c.udsproxyd.peer, "vsock://2:12121");
    }

    #[test]
    fn bad_positional_counts() {
        assert!(parse(&["1", "127.0.0.1"])
            .unwrap_err()
            .to_string()
            .contains("2 positional arguments"));
        assert!(parse(&["x"])
            .unwrap_err()
            .to_string()
            .contains("must be a number"));
    }
}
