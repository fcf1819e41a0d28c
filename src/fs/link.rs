//! The fs bridge over the authenticated wire link: the client side ([`LinkTransport`], and
//! [`connect`] used by `mount.qtfs`) and the engine side ([`FsService`], one per client link so
//! that everything a client held is closed when its link ends).
//!
//! Concurrency: `FsService` forwards every call to its [`FsServer`], which runs syscalls on
//! the engine's shared, bounded [`FsPool`]; the link itself runs calls concurrently.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;

use super::server::{FsPool, FsServer, FsServerOptions};
use super::{FsCallError, FsDone, FsTransport};
use crate::allowlist::SharedAllowlist;
use crate::wire::{self, Addr, Auth, CallError, Hello, Link, LinkOptions, Psk, RemoteError, Role};

/// A client's fs calls over a [`Link`] to the engine.
pub struct LinkTransport(pub Link);

impl FsTransport for LinkTransport {
    fn call(&self, op: u16, payload: Bytes) -> BoxFuture<'static, Result<Bytes, FsCallError>> {
        let link = self.0.clone();
        Box::pin(async move { link.call(op, payload).await.map_err(fs_error) })
    }

    /// Straight onto the link from the FUSE thread; the answer is handled on the link's reader
    /// (no task hand-off either way).
    fn call_then(&self, _rt: &tokio::runtime::Handle, op: u16, payload: Bytes, done: FsDone) {
        self.0
            .call_then(op, payload, move |r| done(r.map_err(fs_error)));
    }
}

fn fs_error(e: CallError) -> FsCallError {
    match e {
        CallError::Remote(r) => FsCallError::new(r.errno, r.message),
        CallError::Closed(why) => FsCallError {
            link_lost: true,
            ..FsCallError::new(libc::ENOTCONN, format!("link to the engine closed: {why}"))
        },
        CallError::Timeout => {
            FsCallError::new(libc::ETIMEDOUT, "the engine did not answer in time")
        }
        CallError::TooLarge { len, max } => FsCallError::new(
            libc::EFBIG,
            format!("request of {len} bytes exceeds the frame limit {max}"),
        ),
    }
}

/// Why `mount.qtfs` could not reach the engine.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bad server address {server:?}: {source}")]
    Address {
        server: String,
        source: wire::AddrError,
    },
    #[error("{0}")]
    Key(#[from] wire::KeyError),
    #[error("{0}")]
    Dial(#[from] wire::DialError),
}

/// Dials the engine at `server` and authenticates with the key file (or in insecure mode).
pub async fn connect(
    server: &str,
    key: &Path,
    insecure: bool,
) -> Result<Arc<dyn FsTransport>, ConnectError> {
    Ok(Arc::new(LinkTransport(dial(server, key, insecure).await?)))
}

/// [`connect`], returning the link itself (for its status).
pub async fn dial(server: &str, key: &Path, insecure: bool) -> Result<Link, ConnectError> {
    let addr: Addr = server.parse().map_err(|source| ConnectError::Address {
        server: server.to_string(),
        source,
    })?;
    let auth = if insecure {
        Auth::Insecure
    } else {
        Auth::Psk(Arc::new(Psk::load(key)?))
    };
    let link = wire::dial(
        &addr,
        &auth,
        &Hello::new(Role::Mount),
        Arc::new(wire::NoService),
        LinkOptions::default(),
    )
    .await?;
    Ok(link)
}

/// The engine's fs service for one client link.
pub struct FsService {
    server: Arc<FsServer>,
}

impl FsService {
    /// A service with its own node and handle tables, sharing the engine's pool and allowlist.
    pub fn new(allowlist: SharedAllowlist, pool: Arc<FsPool>) -> FsService {
        FsService {
            server: Arc::new(FsServer::new(allowlist, FsServerOptions { pool })),
        }
    }
}

impl wire::Service for FsService {
    fn call(&self, op: u16, payload: Bytes) -> BoxFuture<'static, Result<Bytes, RemoteError>> {
        if !super::proto::op::is_fs(op) {
            return Box::pin(async move {
                Err(RemoteError::new(
                    libc::ENOSYS,
                    format!("op {op:#06x} is not a file-service operation"),
                ))
            });
        }
        let server = self.server.clone();
        Box::pin(async move {
            server
                .handle(op, payload)
                .await
                .map_err(|e| RemoteError::new(e.0, nix::errno::Errno::from_raw(e.0).desc()))
        })
    }
}
