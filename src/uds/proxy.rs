//! The proxy itself, shared by `udsproxyd` and the engine's built-in peer.
//!
//! - **Outbound** ([`UdsProxy::serve_requests`]): a local client connects to the request
//!   socket and writes a [`LocalRequest`]; we open an [`OP_CONNECT`] stream on the peer link
//!   and answer with a [`Reply`]. A stream connection then *is* the data path (no extra socket,
//!   no extra copy); for dgram and seqpacket we pass the client one end of a fresh
//!   `SOCK_SEQPACKET` socketpair (SCM_RIGHTS), because a datagram socketpair cannot tell us
//!   when the client closes it.
//! - **Inbound** ([`Service::open_stream`] of [`UdsProxy`]): the peer asks us to connect to a
//!   path; [`UdsProxy::check`] — the one allowlist check of this bridge — decides, then we
//!   connect as this daemon and accept the stream.
//! - **Pumps**: one task per proxied connection moves bytes both ways (`tokio::join!` of the
//!   two directions, a cancellation token so an error in one ends the other). Reads land in
//!   a large `BytesMut` whose filled part is split off and sent as one frame (no copy, no
//!   per-message allocation); writes gather every queued chunk into one `writev`.
//!   Datagram/seqpacket messages travel as records (proto.rs).
//! - **Descriptors**: every read is a `recvmsg` so SCM_RIGHTS cannot be dropped silently.
//!   On a stream connection the descriptors are translated ([`super::fdpass`]) before their
//!   bytes are sent, and the down pump passes the local equivalents with the same bytes
//!   (`sendmsg` at the same stream offset); what cannot be translated, and any descriptor
//!   on a dgram/seqpacket connection, ends the connection with EOPNOTSUPP, logged
//!   (docs/udsproxyd.md §fd passing).
//!
//! Concurrency: the [`Registry`] of live connections is one mutex held for map inserts and
//! removes only; byte counters are atomics. Flow control is the link's per-stream credit.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::fdpass::{FdCtx, FdState, Inbox, LinkSource};
use super::proto::{
    decode_id, encode_id, take_record, Attach, ConnectRequest, LocalRequest, Reply, SockType,
    FLAG_FALLBACK, MAX_FDS, OP_ATTACH, OP_CONNECT, OP_PIPE, REQUEST_HEADER,
};
use crate::allowlist::{ListType, SharedAllowlist};
use crate::daemon::peer::PeerManager;
use crate::daemon::status::ConnectionStatus;
use crate::wire::{CallError, IncomingStream, RemoteError, Service, StreamReader, StreamWriter};

/// Read buffer per connection direction: large, so bulk transfers take few syscalls.
const BUF: usize = 256 * 1024;
/// Largest datagram/seqpacket message proxied; longer ones end the connection (EMSGSIZE).
const MAX_MSG: usize = 256 * 1024;
/// Chunks gathered into one `writev`.
const MAX_IOV: usize = 64;
/// Bytes gathered into one `writev` at most.
const MAX_GATHER: usize = 1024 * 1024;
/// A client must send its whole request within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The peer must answer a connect within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Inbound connects in progress at once (each holds a socket and a task).
const MAX_CONNECTING: usize = 1024;

/// Why the request socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UdsError {
    /// The socket's directory could not be created.
    #[error("cannot create {path}: {source} (check the permissions of its parent, or set [udsproxyd] request_socket)")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Something else already serves the path.
    #[error("{path} is in use by another running udsproxyd or engine: stop it, or set [udsproxyd] request_socket to another path")]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The path exists and is not a socket.
    #[error("{path} exists and is not a socket: remove it or set [udsproxyd] request_socket to another path")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// Binding failed.
    #[error("cannot bind the request socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Setting its permissions failed.
    #[error("cannot set the mode of {path}: {source}")]
    Chmod {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// Binds the request socket at `path` with permission bits `mode`. A stale socket left by a
/// crashed daemon is replaced; a live one is an error.
pub fn bind_request_socket(path: &Path, mode: u32) -> Result<UnixListener, UdsError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        use std::os::unix::fs::DirBuilderExt;
        // Explicit mode: the engine runs with umask 0.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|source| UdsError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(UdsError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(UdsError::InUse {
                path: path.to_path_buf(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| UdsError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        UdsError::Chmod {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(listener)
}

// ---------------------------------------------------------------------------------------
// Registry: live connections and counters.

/// Live proxied connections and the counters `dpuctl status` shows.
#[derive(Default)]
pub struct Registry {
    live: Mutex<HashMap<u64, Arc<Conn>>>,
    next: AtomicU64,
    total: AtomicU64,
    outbound: AtomicU64,
    inbound: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// fd passing: inboxes, pending pipe ends, counters.
    fd: Arc<FdState>,
}

struct Conn {
    id: u64,
    path: String,
    kind: SockType,
    direction: &'static str,
    started: Instant,
    /// Bytes read from the local socket (sent to the peer).
    from_local: AtomicU64,
    /// Bytes written to the local socket (received from the peer).
    to_local: AtomicU64,
}

/// Keeps a connection listed while it lives.
struct ConnGuard {
    registry: Arc<Registry>,
    conn: Arc<Conn>,
}

impl ConnGuard {
    fn read_local(&self, n: usize) {
        self.conn.from_local.fetch_add(n as u64, Ordering::Relaxed);
        self.registry
            .bytes_in
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    fn wrote_local(&self, n: usize) {
        self.conn.to_local.fetch_add(n as u64, Ordering::Relaxed);
        self.registry
            .bytes_out
            .fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.conn.id);
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        // Only single inserts and removes happen under it: a poisoned map is still whole.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(self: &Arc<Self>, path: &Path, kind: SockType, outbound: bool) -> ConnGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        let direction = if outbound {
            self.outbound.fetch_add(1, Ordering::Relaxed);
            "outbound"
        } else {
            self.inbound.fetch_add(1, Ordering::Relaxed);
            "inbound"
        };
        let conn = Arc::new(Conn {
            id,
            path: path.to_string_lossy().into_owned(),
            kind,
            direction,
            started: Instant::now(),
            from_local: AtomicU64::new(0),
            to_local: AtomicU64::new(0),
        });
        self.lock().insert(id, conn.clone());
        ConnGuard {
            registry: self.clone(),
            conn,
        }
    }

    /// The live connections, oldest first.
    pub fn connections(&self) -> Vec<ConnectionStatus> {
        let mut v: Vec<ConnectionStatus> = self
            .lock()
            .values()
            .map(|c| ConnectionStatus {
                id: c.id,
                path: c.path.clone(),
                kind: c.kind.as_str().to_string(),
                direction: c.direction.to_string(),
                bytes_in: c.from_local.load(Ordering::Relaxed),
                bytes_out: c.to_local.load(Ordering::Relaxed),
                age_secs: c.started.elapsed().as_secs(),
            })
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// `connections_total`, `connections_active`, `connections_refused`, ... for status.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut m = BTreeMap::from([
            ("connections_total".to_string(), get(&self.total)),
            ("connections_outbound".to_string(), get(&self.outbound)),
            ("connections_inbound".to_string(), get(&self.inbound)),
            ("connections_active".to_string(), self.lock().len() as u64),
            ("connections_refused".to_string(), get(&self.refused)),
            ("connections_failed".to_string(), get(&self.failed)),
            ("bytes_in".to_string(), get(&self.bytes_in)),
            ("bytes_out".to_string(), get(&self.bytes_out)),
        ]);
        m.extend(
            self.fd
                .counters()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v)),
        );
        m
    }
}

// ---------------------------------------------------------------------------------------
// The proxy.

/// One side's Unix-socket proxy: the inbound service on the peer link and the outbound
/// request socket server.
pub struct UdsProxy {
    allowlist: SharedAllowlist,
    registry: Arc<Registry>,
    /// Bounds inbound connects in progress (module docs).
    connecting: Arc<Semaphore>,
    /// The peer manager, known once [`UdsProxy::serve_requests`] runs: inbound connections
    /// use its link to forward descriptors (the service is not told the link).
    peer: Arc<OnceLock<PeerManager>>,
}

/// Why the far side refused `path`, and how to allow it there: the `qtcfg` command names the
/// normalised path, or, when that is not text (an allowlist file is UTF-8), the nearest
/// directory above it that is.
fn not_allowed_message(path: &Path) -> String {
    let Ok(normal) = crate::allowlist::normalize_path(path) else {
        return format!(
            "{} is not a valid absolute socket path for the udsconnect allowlist",
            path.display()
        );
    };
    let entry = normal
        .ancestors()
        .find_map(|p| p.to_str())
        .unwrap_or("/")
        .to_string();
    let hint = if normal.to_str().is_some() {
        format!("add it there with qtcfg -w udsconnect -x {entry}")
    } else {
        format!("its name is not UTF-8, so allow a directory above it there: qtcfg -w udsconnect -x {entry}")
    };
    format!(
        "{} is not on the udsconnect allowlist of the far side: {hint}",
        normal.display()
    )
}

impl UdsProxy {
    /// A proxy checking `allowlist` (its `udsconnect` list).
    pub fn new(allowlist: SharedAllowlist) -> Arc<UdsProxy> {
        Arc::new(UdsProxy {
            allowlist,
            registry: Arc::new(Registry::default()),
            connecting: Arc::new(Semaphore::new(MAX_CONNECTING)),
            peer: Arc::new(OnceLock::new()),
        })
    }

    /// Live connections and counters.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The one `udsconnect` check of this bridge: normalises `path` and returns it when the
    /// allowlist covers it.
    pub fn check(&self, path: &Path) -> Option<PathBuf> {
        let normal = crate::allowlist::normalize_path(path).ok()?;
        let list = self.allowlist.read().unwrap_or_else(|p| p.into_inner());
        list.allows(ListType::Udsconnect, &normal).then_some(normal)
    }

    /// Serves the request socket until `shutdown`: each client in its own task. Connections
    /// already proxied keep running until they end or the link drops.
    pub async fn serve_requests(
        self: Arc<Self>,
        listener: UnixListener,
        peer: PeerManager,
        shutdown: CancellationToken,
    ) {
        let _ = self.peer.set(peer.clone());
        loop {
            let sock = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = listener.accept() => match r {
                    Ok((sock, _)) => sock,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept on the request socket failed; retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let me = self.clone();
            let peer = peer.clone();
            tokio::spawn(async move { me.outbound(sock, peer).await });
        }
    }

    async fn outbound(self: Arc<Self>, mut sock: UnixStream, peer: PeerManager) {
        let who = sock
            .peer_cred()
            .map(|c| format!("pid {} uid {}", c.pid().unwrap_or(0), c.uid()))
            .unwrap_or_else(|_| "unknown client".into());
        let req = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut sock)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(client = %who, error = %e, "bad request on the request socket");
                let _ = send_reply(
                    &sock,
                    &Reply::Failed {
                        errno: libc::EINVAL,
                        message: e,
                    },
                    None,
                )
                .await;
                return;
            }
            Err(_) => {
                tracing::warn!(client = %who, "request socket client sent no request within 5 s");
                return;
            }
        };
        let path_text = req.path.display().to_string();
        if req.flags & FLAG_FALLBACK != 0 && self.check(&req.path).is_none() {
            let _ = send_reply(&sock, &Reply::NotRouted, None).await;
            return;
        }
        let refuse = |errno: i32, message: String| Reply::Failed { errno, message };
        let Some(link) = peer.link() else {
            self.registry.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client = %who, path = %path_text, "remote connect refused: the peer link is down");
            let reply = refuse(
                libc::ECONNREFUSED,
                "the udsproxyd peer is not connected".into(),
            );
            let _ = send_reply(&sock, &reply, None).await;
            return;
        };
        let open = ConnectRequest {
            kind: req.kind,
            path: req.path.clone(),
        };
        let opened =
            tokio::time::timeout(CONNECT_TIMEOUT, link.open_stream(OP_CONNECT, open.encode()))
                .await;
        let (token, r, w) = match opened {
            Ok(Ok((accepted, r, w))) => (decode_id(&accepted), r, w),
            Ok(Err(e)) => {
                let errno = match &e {
                    CallError::Remote(re) => re.errno,
                    CallError::Closed(_) => libc::ECONNREFUSED,
                    other => other.errno(),
                };
                self.registry.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(client = %who, path = %path_text, error = %e, "remote connect refused");
                let message = match e {
                    CallError::Remote(re) => re.message,
                    other => other.to_string(),
                };
                let _ = send_reply(&sock, &refuse(errno, message), None).await;
                return;
            }
            Err(_) => {
                self.registry.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(client = %who, path = %path_text, "remote connect timed out");
                let reply = refuse(
                    libc::ETIMEDOUT,
                    "the peer did not answer within 10 s".into(),
                );
                let _ = send_reply(&sock, &reply, None).await;
                return;
            }
        };
        // Registered before anything else: the peer may attach descriptors as soon as it
        // has accepted.
        let inbox = token.map(|t| self.registry.fd.register(false, t));
        let conn = self.registry.register(&req.path, req.kind, true);
        tracing::debug!(client = %who, path = %path_text, kind = req.kind.as_str(), id = conn.conn.id, "outbound connection");
        let result = if req.kind.is_packet() {
            let pair = nix::sys::socket::socketpair(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::SeqPacket,
                None,
                // Blocking: the client expects the blocking socket a connect gives; ours is
                // made non-blocking below (the two ends have separate file descriptions).
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            );
            let (ours, theirs) = match pair {
                Ok(p) => p,
                Err(e) => {
                    let _ = send_reply(&sock, &refuse(e as i32, format!("socketpair: {e}")), None)
                        .await;
                    return;
                }
            };
            if let Err(e) = send_reply(&sock, &Reply::Connected, Some(theirs.as_raw_fd())).await {
                tracing::debug!(error = %e, "client left before the reply");
                return;
            }
            drop(theirs);
            drop(sock);
            match set_nonblocking(&ours).and_then(|()| async_fd(ours)) {
                Ok(fd) => pump_packets(fd, SockType::Seqpacket, r, w, &conn).await,
                Err(e) => Err(RemoteError::from(e)),
            }
        } else {
            if let Err(e) = send_reply(&sock, &Reply::Connected, None).await {
                tracing::debug!(error = %e, "client left before the reply");
                return;
            }
            let fd = FdCtx {
                link: LinkSource::Fixed(link),
                token,
                accepted_here: false,
                state: self.registry.fd.clone(),
            };
            pump_stream(sock, r, w, &conn, fd, inbox.as_ref().map(|g| &*g.inbox)).await
        };
        self.ended(&conn, result);
    }

    fn ended(&self, conn: &ConnGuard, result: Result<(), RemoteError>) {
        let c = &conn.conn;
        match result {
            Ok(()) => tracing::debug!(id = c.id, path = %c.path, "connection closed"),
            Err(e) => {
                self.registry.failed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(id = c.id, path = %c.path, direction = c.direction, error = %e, "connection ended with an error");
            }
        }
    }

    async fn inbound(self: Arc<Self>, req: ConnectRequest, stream: IncomingStream) {
        let path_text = req.path.display().to_string();
        let Some(path) = self.check(&req.path) else {
            self.registry.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(path = %path_text, "peer's connect refused: not on the udsconnect allowlist");
            stream.refuse(RemoteError::new(
                libc::ECONNREFUSED,
                not_allowed_message(&req.path),
            ));
            return;
        };
        let Ok(_permit) = self.connecting.clone().acquire_owned().await else {
            return;
        };
        let local = match req.kind {
            SockType::Stream => UnixStream::connect(&path).await.map(Local::Stream),
            kind => connect_packet(kind, &path)
                .await
                .map(|fd| Local::Packet(fd, kind)),
        };
        drop(_permit);
        let local = match local {
            Ok(l) => l,
            Err(e) => {
                self.registry.failed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(path = %path_text, error = %e, "peer's connect failed here");
                let mut re = RemoteError::from(e);
                re.message = format!("connect to {path_text} on the far side: {}", re.message);
                stream.refuse(re);
                return;
            }
        };
        // The connection token names this connection in the peer's attach calls; random,
        // so a token of a connection from before a reconnect can never match a new one.
        let token = match local {
            Local::Stream(_) => getrandom::u64().ok(),
            Local::Packet(..) => None,
        };
        let inbox = token.map(|t| self.registry.fd.register(true, t));
        let (r, w) = stream.accept(token.map(encode_id).unwrap_or_default());
        let conn = self.registry.register(&path, req.kind, false);
        tracing::debug!(path = %path_text, kind = req.kind.as_str(), id = conn.conn.id, "inbound connection");
        let result = match local {
            Local::Stream(s) => {
                let fd = FdCtx {
                    link: LinkSource::Peer(self.peer.clone()),
                    token,
                    accepted_here: true,
                    state: self.registry.fd.clone(),
                };
                pump_stream(s, r, w, &conn, fd, inbox.as_ref().map(|g| &*g.inbox)).await
            }
            Local::Packet(fd, kind) => pump_packets(fd, kind, r, w, &conn).await,
        };
        self.ended(&conn, result);
    }
}

enum Local {
    Stream(UnixStream),
    Packet(AsyncFd<OwnedFd>, SockType),
}

impl Service for UdsProxy {
    fn call(&self, op: u16, payload: Bytes) -> BoxFuture<'static, Result<Bytes, RemoteError>> {
        let fd = self.registry.fd.clone();
        let allowlist = self.allowlist.clone();
        Box::pin(async move {
            if op != OP_ATTACH {
                return Err(RemoteError::new(
                    libc::ENOSYS,
                    format!("udsproxyd serves no call op {op}"),
                ));
            }
            let a = Attach::decode(&payload)
                .map_err(|e| RemoteError::new(libc::EINVAL, e.to_string()))?;
            // Reopening files is a few short syscalls; pipes only move a map entry.
            fd.attach(&allowlist, a).await?;
            Ok(Bytes::new())
        })
    }

    fn open_stream(&self, op: u16, payload: Bytes, stream: IncomingStream) {
        if op == OP_PIPE {
            self.registry.fd.accept_pipe(&payload, stream);
            return;
        }
        if op != OP_CONNECT {
            stream.refuse(RemoteError::new(
                libc::ENOSYS,
                format!("unknown stream op {op}"),
            ));
            return;
        }
        let req = match ConnectRequest::decode(&payload) {
            Ok(r) => r,
            Err(e) => {
                stream.refuse(RemoteError::new(libc::EINVAL, e.to_string()));
                return;
            }
        };
        let me = UdsProxy {
            allowlist: self.allowlist.clone(),
            registry: self.registry.clone(),
            connecting: self.connecting.clone(),
            peer: self.peer.clone(),
        };
        tokio::spawn(Arc::new(me).inbound(req, stream));
    }
}

async fn read_request(sock: &mut UnixStream) -> Result<LocalRequest, String> {
    let mut h = [0u8; REQUEST_HEADER];
    sock.read_exact(&mut h)
        .await
        .map_err(|e| format!("reading the request: {e}"))?;
    let (kind, flags, len) = LocalRequest::decode_header(&h).map_err(|e| e.to_string())?;
    let mut path = vec![0u8; len];
    sock.read_exact(&mut path)
        .await
        .map_err(|e| format!("reading the request path: {e}"))?;
    LocalRequest::from_parts(kind, flags, &path).map_err(|e| e.to_string())
}

/// Writes `reply`, with `fd` attached as SCM_RIGHTS when given.
async fn send_reply(sock: &UnixStream, reply: &Reply, fd: Option<RawFd>) -> io::Result<()> {
    let bytes = reply.encode();
    let mut sent = 0;
    while sent < bytes.len() {
        sock.writable().await?;
        let fds: Vec<RawFd> = if sent == 0 {
            fd.into_iter().collect()
        } else {
            Vec::new()
        };
        let r = sock.try_io(Interest::WRITABLE, || {
            let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
            let cmsgs: &[nix::sys::socket::ControlMessage] =
                if fds.is_empty() { &[] } else { &cmsg };
            nix::sys::socket::sendmsg::<()>(
                sock.as_raw_fd(),
                &[IoSlice::new(&bytes[sent..])],
                cmsgs,
                nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match r {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Connects a dgram (autobound, so the server can answer) or seqpacket socket to `path`.
async fn connect_packet(kind: SockType, path: &Path) -> io::Result<AsyncFd<OwnedFd>> {
    use nix::sys::socket::{self as s, SockFlag, UnixAddr};
    let ty = if kind == SockType::Dgram {
        s::SockType::Datagram
    } else {
        s::SockType::SeqPacket
    };
    let fd = s::socket(
        s::AddressFamily::Unix,
        ty,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    if kind == SockType::Dgram {
        s::bind(fd.as_raw_fd(), &UnixAddr::new_unnamed())?;
    }
    let addr = UnixAddr::new(path)?;
    // A full listen backlog answers EAGAIN on a non-blocking Unix connect: retry briefly.
    let mut tries = 0;
    loop {
        match s::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => break,
            Err(nix::errno::Errno::EAGAIN) if tries < 100 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    async_fd(fd)
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Registers a socket with the reactor.
pub(super) fn async_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is a valid open descriptor that stays open, and keeps returning the
    // same number, until the AsyncFd that now owns it drops it.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

// ---------------------------------------------------------------------------------------
// Pumps.

/// What one `recvmsg` got.
struct Received {
    n: usize,
    /// Descriptors that came with the bytes (now ours).
    fds: Vec<OwnedFd>,
    /// More descriptors came than fit (MSG_CTRUNC): the kernel closed the rest.
    ctrunc: bool,
    /// A message longer than the buffer (MSG_TRUNC).
    truncated: bool,
}

/// `recvmsg` into the spare capacity of `buf` (non-blocking), taking ownership of any
/// descriptors that came along.
fn recv_into(fd: RawFd, buf: &mut BytesMut) -> io::Result<Received> {
    let spare = buf.spare_capacity_mut();
    let mut iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: spare.len(),
    };
    // Room for MAX_FDS (32) descriptors; u64 for cmsghdr alignment.
    let mut control = [0u64; 4 + MAX_FDS / 2];
    // SAFETY: an all-zero msghdr is a valid "no name, no iov, no control" value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: iov points at `spare`, writable memory of iov_len bytes owned by `buf`;
    // msg_control at `control` of msg_controllen bytes; both outlive the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    let ctrunc = msg.msg_flags & libc::MSG_CTRUNC != 0;
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled, within
    // msg_controllen; each SCM_RIGHTS payload is an array of descriptors the kernel just
    // installed for us, which nothing else owns.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<libc::c_int>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        // SAFETY: the kernel wrote n bytes into the spare capacity.
        buf.set_len(buf.len() + n);
    }
    Ok(Received {
        n,
        fds,
        ctrunc,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
    })
}

fn fd_refused(kind: SockType) -> RemoteError {
    tracing::warn!(
        kind = kind.as_str(),
        "a file descriptor was passed (SCM_RIGHTS) over a proxied {} connection: descriptors cross machines only on stream connections, so the connection is ended",
        kind.as_str()
    );
    RemoteError::new(
        libc::EOPNOTSUPP,
        format!("a file descriptor was passed (SCM_RIGHTS) over a proxied {} connection; descriptors cross machines only on stream connections", kind.as_str()),
    )
}

/// The local end of a proxied stream connection, registered with the runtime for priority
/// (out-of-band) events as well as reads and writes, so a read can tell when it has emptied
/// the socket (see [`LocalStream::recv`]).
struct LocalStream(AsyncFd<OwnedFd>);

impl LocalStream {
    fn new(sock: UnixStream) -> io::Result<LocalStream> {
        let fd = OwnedFd::from(sock.into_std()?);
        // Out-of-band bytes stay in line, so they are carried like any other byte instead
        // of being dropped by our reads (the far side cannot mark them urgent again).
        nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::OobInline, &true)
            .map_err(io::Error::from)?;
        let interest = Interest::READABLE | Interest::WRITABLE | Interest::PRIORITY;
        // SAFETY: as in `async_fd`: the AsyncFd owns the descriptor from here on.
        Ok(LocalStream(unsafe {
            AsyncFd::register_with_interest(fd, interest)
        }?))
    }

    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Reads what is queued into the spare capacity of `buf`, waiting until something is.
    ///
    /// A read that returns less than it had room for, with no descriptors, has emptied the
    /// socket: the kernel reads a stream socket's queue until the buffer is full, the queue
    /// is empty or a message carrying descriptors has been taken. The readiness is then
    /// cleared at once, which saves the read that would only have found nothing (one system
    /// call per message, on the path of every proxied request). The exception is
    /// out-of-band data (`MSG_OOB`, read in line here): a read stops short at its mark
    /// with bytes behind it. The socket reports pending out-of-band data as a priority
    /// event, and once one has been seen (`oob_seen`) this connection clears readiness
    /// only when a read finds nothing. Bytes that arrive after the read raise a new event
    /// either way.
    async fn recv(&self, buf: &mut BytesMut, oob_seen: &mut bool) -> io::Result<Received> {
        loop {
            let mut guard = if *oob_seen {
                self.0.readable().await?
            } else {
                self.0
                    .ready(Interest::READABLE | Interest::PRIORITY)
                    .await?
            };
            if guard.ready().is_priority() {
                *oob_seen = true;
            }
            let room = buf.capacity() - buf.len();
            match recv_into(self.as_raw_fd(), buf) {
                Ok(rcv) => {
                    if !*oob_seen && rcv.n > 0 && rcv.n < room && rcv.fds.is_empty() && !rcv.ctrunc
                    {
                        guard.clear_ready_matching(tokio::io::Ready::READABLE);
                    }
                    return Ok(rcv);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    guard.clear_ready_matching(tokio::io::Ready::READABLE);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One `sendmsg` of `iov` if the socket may take it, else WouldBlock.
    fn try_write_vectored(&self, iov: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_io(Interest::WRITABLE, |fd| {
            nix::sys::socket::sendmsg::<()>(
                fd.as_raw_fd(),
                iov,
                &[],
                nix::sys::socket::MsgFlags::MSG_NOSIGNAL | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
                None,
            )
            .map_err(io::Error::from)
        })
    }
}

async fn pump_stream(
    sock: UnixStream,
    mut r: StreamReader,
    mut w: StreamWriter,
    conn: &ConnGuard,
    fd: FdCtx,
    inbox: Option<&Inbox>,
) -> Result<(), RemoteError> {
    let sock = match LocalStream::new(sock) {
        Ok(s) => s,
        Err(e) => {
            let e = RemoteError::from(e);
            w.reset(e.clone());
            return Err(e);
        }
    };
    let (up, down) = {
        let up = stream_up(&sock, &mut w, conn, &fd);
        let down = stream_down(&sock, &mut r, conn, inbox);
        join_both(up, down, false).await
    };
    finish(w, up, down)
}

async fn pump_packets(
    fd: AsyncFd<OwnedFd>,
    kind: SockType,
    mut r: StreamReader,
    mut w: StreamWriter,
    conn: &ConnGuard,
) -> Result<(), RemoteError> {
    let (up, down) = {
        let up = packet_up(&fd, kind, &mut w, conn);
        let down = packet_down(&fd, kind, &mut r, conn);
        // A datagram socket has no end of its own: the far side's fin ends it.
        join_both(up, down, kind == SockType::Dgram).await
    };
    finish(w, up, down)
}

/// Runs both directions until both have ended. An error in one ends the other at once (it
/// is dropped, and counts as a clean end), and so does a clean end of `down` when
/// `down_ends_both`. No cancellation token: polling one costs a lock, on every wake-up of
/// every proxied connection.
async fn join_both<U, D>(
    up: U,
    down: D,
    down_ends_both: bool,
) -> (Result<(), RemoteError>, Result<(), RemoteError>)
where
    U: std::future::Future<Output = Result<(), RemoteError>>,
    D: std::future::Future<Output = Result<(), RemoteError>>,
{
    use futures::future::{select, Either};
    match select(std::pin::pin!(up), std::pin::pin!(down)).await {
        Either::Left((up, _)) if up.is_err() => (up, Ok(())),
        Either::Left((up, down)) => (up, down.await),
        Either::Right((down, _)) if down.is_err() || down_ends_both => (Ok(()), down),
        Either::Right((down, up)) => (up.await, down),
    }
}

/// Resets the stream with the local error, if any; returns the first error.
fn finish(
    w: StreamWriter,
    up: Result<(), RemoteError>,
    down: Result<(), RemoteError>,
) -> Result<(), RemoteError> {
    match (up, down) {
        (Err(e), _) => {
            w.reset(e.clone());
            Err(e)
        }
        (Ok(()), Err(e)) => Err(e),
        // Dropping `w` resets the stream only if it never finished (cancelled).
        (Ok(()), Ok(())) => Ok(()),
    }
}

async fn stream_up(
    sock: &LocalStream,
    w: &mut StreamWriter,
    conn: &ConnGuard,
    fd: &FdCtx,
) -> Result<(), RemoteError> {
    let mut buf = BytesMut::with_capacity(BUF);
    // Bytes sent so far: the offset an attach names.
    let mut sent: u64 = 0;
    let mut oob_seen = false;
    loop {
        if buf.capacity() - buf.len() < BUF / 4 {
            // Reclaims the same allocation once the frames sent from it are written.
            buf.reserve(BUF);
        }
        match sock.recv(&mut buf, &mut oob_seen).await {
            Ok(rcv) if rcv.n == 0 && rcv.fds.is_empty() && !rcv.ctrunc => {
                w.finish().await?;
                return Ok(());
            }
            Ok(rcv) => {
                if !rcv.fds.is_empty() || rcv.ctrunc {
                    // The peer holds the equivalents before it sees the bytes (fdpass.rs).
                    fd.forward(sent, rcv.n, rcv.fds, rcv.ctrunc).await?;
                }
                conn.read_local(rcv.n);
                sent += rcv.n as u64;
                w.send(buf.split().freeze()).await?;
            }
            // Linux reports ECONNRESET once the queued bytes are read when the local side
            // closed with unread data (see stream_down): it is gone, and everything it wrote
            // was read, so the far side gets a clean end of file.
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {
                w.finish().await?;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// How delivering the far side's bytes to the local socket ended early.
enum DownError {
    /// The local side no longer reads (it closed, with or without unread data).
    LocalGone(io::Error),
    /// The stream or the link failed.
    Stream(RemoteError),
}

impl From<RemoteError> for DownError {
    fn from(e: RemoteError) -> DownError {
        DownError::Stream(e)
    }
}

/// A failed write to the local socket: the local side is gone, or something else went wrong.
fn local_write(e: io::Error) -> DownError {
    match e.raw_os_error() {
        Some(libc::EPIPE | libc::ECONNRESET) => DownError::LocalGone(e),
        _ => DownError::Stream(e.into()),
    }
}

async fn stream_down(
    sock: &LocalStream,
    r: &mut StreamReader,
    conn: &ConnGuard,
    inbox: Option<&Inbox>,
) -> Result<(), RemoteError> {
    match deliver_down(sock, r, conn, inbox).await {
        Ok(()) => Ok(()),
        Err(DownError::Stream(e)) => Err(e),
        Err(DownError::LocalGone(e)) => {
            // A server that answered and closed while the far side was still writing (a
            // client's last "bye"): what the far side still sends has nowhere to go, as a
            // socket whose peer shut down reading. Discard it until the far side finishes,
            // and do not fail the connection, so the other direction (the local side's last
            // bytes and its end of file) still reaches the far side whole.
            tracing::debug!(id = conn.conn.id, error = %e, "local side stopped reading; discarding the rest");
            while r.recv().await?.is_some() {}
            Ok(())
        }
    }
}

async fn deliver_down(
    sock: &LocalStream,
    r: &mut StreamReader,
    conn: &ConnGuard,
    inbox: Option<&Inbox>,
) -> Result<(), DownError> {
    let mut pending: VecDeque<Bytes> = VecDeque::with_capacity(MAX_IOV);
    // Bytes in `pending`, and bytes written to the socket so far (attach offsets count them).
    let mut queued: usize = 0;
    let mut delivered: u64 = 0;
    let mut fin = false;
    while !fin {
        match r.recv().await? {
            Some(b) => {
                queued += b.len();
                pending.push_back(b);
            }
            None => fin = true,
        }
        while !fin && pending.len() < MAX_IOV && queued < MAX_GATHER {
            match r.try_recv() {
                Some(Ok(Some(b))) => {
                    queued += b.len();
                    pending.push_back(b);
                }
                Some(Ok(None)) => fin = true,
                Some(Err(e)) => return Err(e.into()),
                None => break,
            }
        }
        loop {
            // Descriptors due within the queued bytes? (Their attach always arrives first.)
            let due = inbox
                .and_then(Inbox::front)
                .filter(|(off, _)| *off < delivered + queued as u64);
            let Some((off, len)) = due else {
                let n = queued;
                write_all_vectored(sock, &mut pending, conn)
                    .await
                    .map_err(local_write)?;
                delivered += n as u64;
                queued = 0;
                break;
            };
            if off < delivered {
                return Err(RemoteError::new(
                    libc::EPROTO,
                    "descriptors attached to bytes already delivered",
                )
                .into());
            }
            if off > delivered {
                let n = (off - delivered) as usize;
                let mut head = take_prefix(&mut pending, n);
                write_all_vectored(sock, &mut head, conn)
                    .await
                    .map_err(local_write)?;
                delivered += n as u64;
                queued -= n;
                continue;
            }
            if queued < len {
                // The rest of the carrying bytes is still on its way.
                break;
            }
            let head = take_prefix(&mut pending, len);
            let mut bytes = BytesMut::with_capacity(len);
            for b in &head {
                bytes.extend_from_slice(b);
            }
            let Some(d) = inbox.and_then(Inbox::pop) else {
                break;
            };
            send_with_fds(sock, bytes.freeze(), &d.fds, conn)
                .await
                .map_err(local_write)?;
            // Our copies close here; the local peer holds its own.
            drop(d);
            delivered += len as u64;
            queued -= len;
        }
    }
    if queued > 0 {
        return Err(RemoteError::new(
            libc::EPROTO,
            "the stream ended inside bytes that carry descriptors",
        )
        .into());
    }
    // The peer finished: pass the half-close on.
    let _ = nix::sys::socket::shutdown(sock.as_raw_fd(), nix::sys::socket::Shutdown::Write);
    Ok(())
}

/// Moves the first `n` bytes of `pending` (split at a chunk boundary if needed, no copy).
fn take_prefix(pending: &mut VecDeque<Bytes>, n: usize) -> VecDeque<Bytes> {
    let mut out = VecDeque::new();
    let mut left = n;
    while left > 0 {
        let Some(front) = pending.front_mut() else {
            break;
        };
        if front.len() <= left {
            left -= front.len();
            if let Some(b) = pending.pop_front() {
                out.push_back(b);
            }
        } else {
            out.push_back(front.split_to(left));
            left = 0;
        }
    }
    out
}

/// Writes `data` with `fds` attached (SCM_RIGHTS) to its first byte's `sendmsg`, the rest
/// (if the socket took only part) plainly.
async fn send_with_fds(
    sock: &LocalStream,
    data: Bytes,
    fds: &[OwnedFd],
    conn: &ConnGuard,
) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let sent = loop {
        let mut guard = sock.0.writable().await?;
        let r = guard.try_io(|fd| {
            nix::sys::socket::sendmsg::<()>(
                fd.as_raw_fd(),
                &[IoSlice::new(&data)],
                &[nix::sys::socket::ControlMessage::ScmRights(&raw)],
                nix::sys::socket::MsgFlags::MSG_NOSIGNAL | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
                None,
            )
            .map_err(io::Error::from)
        });
        match r {
            Ok(Ok(n)) => break n,
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    };
    conn.wrote_local(sent);
    if sent == data.len() {
        return Ok(());
    }
    let mut rest = VecDeque::from([data.slice(sent..)]);
    write_all_vectored(sock, &mut rest, conn).await
}

async fn write_all_vectored(
    sock: &LocalStream,
    pending: &mut VecDeque<Bytes>,
    conn: &ConnGuard,
) -> io::Result<()> {
    loop {
        // An empty chunk would make a zero-byte write look like no progress, forever.
        while pending.front().is_some_and(Bytes::is_empty) {
            pending.pop_front();
        }
        if pending.is_empty() {
            break;
        }
        let mut iov = [IoSlice::new(&[]); MAX_IOV];
        let k = pending.len().min(MAX_IOV);
        for (slot, b) in iov.iter_mut().zip(pending.iter()) {
            *slot = IoSlice::new(b);
        }
        let written = match sock.try_write_vectored(&iov[..k]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                sock.0.writable().await?.retain_ready();
                continue;
            }
            Err(e) => return Err(e),
        };
        conn.wrote_local(written);
        let mut left = written;
        while left > 0 {
            let Some(front) = pending.front_mut() else {
                break;
            };
            if front.len() <= left {
                left -= front.len();
                pending.pop_front();
            } else {
                front.advance(left);
                left = 0;
            }
        }
    }
    Ok(())
}

async fn packet_up(
    fd: &AsyncFd<OwnedFd>,
    kind: SockType,
    w: &mut StreamWriter,
    conn: &ConnGuard,
) -> Result<(), RemoteError> {
    let mut batch = BytesMut::with_capacity(BUF + MAX_MSG);
    let eof_on_empty = kind == SockType::Seqpacket;
    let flush_at = w.max_chunk();
    loop {
        let mut guard = fd.readable().await?;
        let mut eof = false;
        loop {
            if batch.capacity() - batch.len() < 4 + MAX_MSG {
                if !batch.is_empty() {
                    break;
                }
                batch.reserve(BUF + MAX_MSG);
            }
            let at = batch.len();
            batch.put_u32(0);
            match guard.try_io(|inner| recv_into(inner.as_raw_fd(), &mut batch)) {
                Ok(Ok(rcv)) => {
                    if !rcv.fds.is_empty() || rcv.ctrunc {
                        return Err(fd_refused(kind));
                    }
                    if rcv.truncated {
                        return Err(RemoteError::new(
                            libc::EMSGSIZE,
                            format!("a message longer than {MAX_MSG} bytes cannot be proxied"),
                        ));
                    }
                    if rcv.n == 0 && eof_on_empty {
                        batch.truncate(at);
                        eof = true;
                        break;
                    }
                    batch[at..at + 4].copy_from_slice(&(rcv.n as u32).to_be_bytes());
                    conn.read_local(rcv.n);
                    if batch.len() >= flush_at {
                        break;
                    }
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_would_block) => {
                    batch.truncate(at);
                    break;
                }
            }
        }
        if !batch.is_empty() {
            w.send(batch.split().freeze()).await?;
        }
        if eof {
            w.finish().await?;
            return Ok(());
        }
    }
}

async fn packet_down(
    fd: &AsyncFd<OwnedFd>,
    kind: SockType,
    r: &mut StreamReader,
    conn: &ConnGuard,
) -> Result<(), RemoteError> {
    let bad = |e: super::proto::ProtoError| RemoteError::new(libc::EPROTO, e.to_string());
    // Holds a record split across frames; empty otherwise (the common case copies nothing).
    let mut partial = BytesMut::new();
    while let Some(mut chunk) = r.recv().await? {
        if !partial.is_empty() {
            partial.extend_from_slice(&chunk);
            while let Some(msg) = take_record(&mut partial).map_err(bad)? {
                send_packet(fd, &msg, conn).await?;
            }
            continue;
        }
        loop {
            if chunk.len() < 4 {
                break;
            }
            let len = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) as usize;
            if len > super::proto::MAX_RECORD {
                return Err(bad(super::proto::ProtoError::RecordTooLarge(len)));
            }
            if chunk.len() < 4 + len {
                break;
            }
            let msg = chunk.slice(4..4 + len);
            chunk.advance(4 + len);
            send_packet(fd, &msg, conn).await?;
        }
        partial.extend_from_slice(&chunk);
    }
    if kind == SockType::Seqpacket {
        let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Write);
    }
    Ok(())
}

async fn send_packet(fd: &AsyncFd<OwnedFd>, msg: &[u8], conn: &ConnGuard) -> io::Result<()> {
    use nix::sys::socket::MsgFlags;
    let mut grown = false;
    loop {
        let mut guard = fd.writable().await?;
        match guard.try_io(|inner| {
            nix::sys::socket::send(
                inner.as_raw_fd(),
                msg,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            )
            .map_err(io::Error::from)
        }) {
            Ok(Ok(_)) => {
                conn.wrote_local(msg.len());
                return Ok(());
            }
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EMSGSIZE) && !grown => {
                // A Unix socket refuses a message larger than its send buffer (about
                // 208 KiB by default); the sender already had it sent, so make it fit.
                fit_send_buffer(fd.get_ref(), msg.len())?;
                grown = true;
            }
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

/// Grows `fd`'s send buffer so that one `len`-byte message fits: beyond
/// `net.core.wmem_max` when the daemon may (CAP_NET_ADMIN), else up to it.
fn fit_send_buffer(fd: &OwnedFd, len: usize) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    let want = len + 64 * 1024;
    setsockopt(fd, sockopt::SndBufForce, &want)
        .or_else(|_| setsockopt(fd, sockopt::SndBuf, &want))
        .map_err(io::Error::from)
}
