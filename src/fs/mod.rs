//! qtfs: HOST directories mounted on the DPU with local-file semantics.
//!
//! - [`proto`]: request/response messages and their binary encoding (ops 0x0100..=0x01FF).
//! - [`server`]: the engine-side executor ([`server::FsServer`]): node and file-handle tables,
//!   escape-proof resolution (openat2 RESOLVE_BENEATH), the per-op allowlist gate, the
//!   caller's credentials per syscall on a bounded pool of dedicated threads.
//! - [`client`]: the FUSE filesystem (fuser) that turns kernel requests into fs requests and
//!   answers them asynchronously from tokio tasks.
//! - [`mount`]: `mount.qtfs` / `dpuctl mount`: option parsing, daemonising, one process per
//!   mount, and its control socket (`mount-<pid>.ctl`).
//! - [`stats`]: per-operation counters and latency percentiles of a mount.
//! - [`locks`]: DPU processes' POSIX and OFD locks, held on the HOST per owner and file.
//! - [`known`]: what a mount hands back to a restarted engine (inodes the kernel holds, open
//!   handles), kept up to date by the client.
//!
//! The fs code talks to the link only through [`FsTransport`], so it runs unchanged over the
//! authenticated wire link or in-process ([`InProcessTransport`], used by tests).
//!
//! - [`link`]: the bridge over the wire: `LinkTransport` and `connect` on the client,
//!   `FsService` (one per client link) on the engine.
//!
//! Concurrency: see each submodule; all shared state is behind `Arc` and short `Mutex`es.

pub mod client;
pub mod fresh;
pub mod known;
pub mod link;
pub mod locks;
pub mod mount;
pub mod proto;
pub mod server;
pub mod stats;
mod sys;

/// The calling thread's umask, for other modules spawning children (rexec_server).
pub(crate) use sys::thread_umask;

use bytes::Bytes;
use futures::future::BoxFuture;
use std::sync::Arc;

/// A failed fs call: the HOST's errno (or a local one: ENOTCONN for a dead link, EIO for a
/// malformed reply) plus a message for logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (errno {errno})")]
pub struct FsCallError {
    pub errno: i32,
    pub message: String,
    /// The link to the engine ended before the answer came (errno is ENOTCONN); a HOST
    /// file system answering ENOTCONN itself (a dead FUSE mount there) is not this.
    pub link_lost: bool,
}

impl FsCallError {
    pub fn errno(errno: i32) -> Self {
        FsCallError {
            errno,
            message: std::io::Error::from_raw_os_error(errno).to_string(),
            link_lost: false,
        }
    }

    /// An error of a call, with a message for logs.
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        FsCallError {
            errno,
            message: message.into(),
            link_lost: false,
        }
    }
}

/// An errno returned by the engine-side executor; the wire layer carries it unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", std::io::Error::from_raw_os_error(self.0))]
pub struct Errno(pub i32);

impl From<std::io::Error> for Errno {
    fn from(e: std::io::Error) -> Self {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

/// A call's answer callback ([`FsTransport::call_then`]).
pub type FsDone = Box<dyn FnOnce(Result<Bytes, FsCallError>) + Send>;

/// How the fs client reaches an engine: one request, one response, many in flight.
pub trait FsTransport: Send + Sync + 'static {
    fn call(&self, op: u16, payload: Bytes) -> BoxFuture<'static, Result<Bytes, FsCallError>>;

    /// Sends a call from any thread and runs `done` with its answer, quick and non-blocking.
    /// By default a task on `rt` awaits [`FsTransport::call`]; a transport that can answer
    /// without a task of the caller's (the link) overrides it.
    fn call_then(&self, rt: &tokio::runtime::Handle, op: u16, payload: Bytes, done: FsDone) {
        let call = self.call(op, payload);
        rt.spawn(async move { done(call.await) });
    }
}

/// Calls an [`server::FsServer`] in the same process (tests, benchmarks, loopback setups).
pub struct InProcessTransport {
    server: Arc<server::FsServer>,
}

impl InProcessTransport {
    pub fn new(server: Arc<server::FsServer>) -> Self {
        InProcessTransport { server }
    }
}

impl FsTransport for InProcessTransport {
    fn call(&self, op: u16, payload: Bytes) -> BoxFuture<'static, Result<Bytes, FsCallError>> {
        let server = self.server.clone();
        Box::pin(async move {
            server
                .handle(op, payload)
                .await
                .map_err(|e| FsCallError::errno(e.0))
        })
    }
}
