//! The multiplexed link: many requests in flight on one authenticated connection, each with
//! an id and answered out of order, in both directions, plus keepalive and byte counters.
//! docs/protocol.md §5 specifies the frame exchange.
//!
//! Tasks per link (all spawned by [`Link::spawn`], all ending when the link closes):
//! - **reader**: decodes frames; completes pending calls; starts one task per incoming
//!   request, bounded by a semaphore of `max_in_flight` (when full the reader waits, which
//!   back-pressures the peer through the transport instead of queueing unboundedly);
//!   enforces `dead_after` (no byte for that long while idle) and `frame_timeout` (a started
//!   frame must complete: slow-loris defence).
//! - **writer**: drains a bounded queue into a `BufWriter`, writing every frame that is
//!   already queued and flushing once the queue is empty, so bursts of small frames leave in
//!   one write. A write that makes no progress for `dead_after` closes the link.
//! - **keepalive**: a Ping every `keepalive`, which also measures the round-trip time.
//!
//! Shared state lives in `Inner` behind an `Arc`: the pending-call table and close reason
//! under one mutex (so a call can never register after the close drained the table), the
//! table of running handlers under another, counters as atomics. Locks are never held across
//! an `.await`. Closing is idempotent: the first reason wins, pending calls fail at once with
//! [`CallError::Closed`], handlers are aborted, and the tasks stop.
//!
//! A link lives until [`Link::close`], the peer leaving, or a protocol error; dropping every
//! handle does not close it (a server usually keeps none and just serves).

use std::any::Any;
use std::collections::HashMap;
use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::addr::{Addr, Listener, Stream};
use super::frame::{
    decode_error, encode_error, Frame, FrameDecoder, Kind, DEFAULT_MAX_FRAME, HEADER_LEN,
    MAX_FRAME_HARD, MIN_FRAME,
};
use super::handshake::{self, Auth, HandshakeError, Hello, PeerInfo};

/// Frames waiting for the writer. Bounded so producers wait instead of growing memory when
/// the peer reads slowly; large enough that a burst of small replies still batches.
const OUT_QUEUE: usize = 1024;
/// Frames written per flush at most: bounds latency for the first frame of a long burst.
const MAX_BATCH: usize = 256;
/// Socket read granularity.
const READ_BUF: usize = 64 * 1024;
/// BufWriter capacity: payloads at least this large bypass the buffer (no copy).
const WRITE_BUF: usize = 64 * 1024;
/// How long a closing side tries to deliver its Goaway.
const GOAWAY_TIMEOUT: Duration = Duration::from_secs(1);
/// Concurrent handshakes per listener: a connection flood can hold at most this many
/// half-open handshakes (each a socket and ~1 KiB); further connections wait in the backlog.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 256;
/// Pause after a failed accept (EMFILE, ENOBUFS) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Smallest accepted duration for any link timer (guards against a zero in a config).
const MIN_TIMER: Duration = Duration::from_millis(10);

/// The service a side offers on a link: one entry point, dispatching on `op`.
pub trait Service: Send + Sync + 'static {
    /// Handles one request. The returned future runs in its own task; dropping it (the
    /// caller cancelled, or the link closed) must be harmless.
    fn call(&self, op: u16, payload: Bytes) -> BoxFuture<'static, Result<Bytes, RemoteError>>;
}

/// A service that serves nothing: every op fails with `ENOSYS`.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoService;

impl Service for NoService {
    fn call(&self, op: u16, _payload: Bytes) -> BoxFuture<'static, Result<Bytes, RemoteError>> {
        Box::pin(async move {
            Err(RemoteError::new(
                libc::ENOSYS,
                format!("op {op} is not served on this link"),
            ))
        })
    }
}

/// An error returned by the remote service: an errno (kept end to end) and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({})", errno_name(*.errno))]
pub struct RemoteError {
    /// `errno` value (Linux numbering), e.g. `libc::EACCES`.
    pub errno: i32,
    /// Human-readable detail.
    pub message: String,
}

impl RemoteError {
    /// A remote error with this errno and message.
    pub fn new(errno: i32, message: impl Into<String>) -> RemoteError {
        RemoteError {
            errno,
            message: message.into(),
        }
    }
}

fn errno_name(errno: i32) -> String {
    let e = nix::errno::Errno::from_raw(errno);
    if e == nix::errno::Errno::UnknownErrno {
        format!("errno {errno}")
    } else {
        format!("{e:?}")
    }
}

impl From<io::Error> for RemoteError {
    fn from(e: io::Error) -> RemoteError {
        let errno = e.raw_os_error().unwrap_or_else(|| kind_errno(e.kind()));
        RemoteError {
            errno,
            message: e.to_string(),
        }
    }
}

/// The errno for an `io::Error` that carries none (built from a kind and a message).
fn kind_errno(kind: io::ErrorKind) -> i32 {
    use io::ErrorKind as K;
    match kind {
        K::NotFound => libc::ENOENT,
        K::PermissionDenied => libc::EACCES,
        K::ConnectionRefused => libc::ECONNREFUSED,
        K::ConnectionReset => libc::ECONNRESET,
        K::ConnectionAborted => libc::ECONNABORTED,
        K::NotConnected => libc::ENOTCONN,
        K::AddrInUse => libc::EADDRINUSE,
        K::AddrNotAvailable => libc::EADDRNOTAVAIL,
        K::BrokenPipe => libc::EPIPE,
        K::AlreadyExists => libc::EEXIST,
        K::WouldBlock => libc::EAGAIN,
        K::InvalidInput => libc::EINVAL,
        K::TimedOut => libc::ETIMEDOUT,
        K::Interrupted => libc::EINTR,
        K::Unsupported => libc::ENOSYS,
        K::OutOfMemory => libc::ENOMEM,
        _ => libc::EIO,
    }
}

impl From<RemoteError> for io::Error {
    /// Keeps the errno (a remote EACCES is a local EACCES); the message is dropped, as an
    /// OS error carries none.
    fn from(e: RemoteError) -> io::Error {
        io::Error::from_raw_os_error(e.errno)
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The remote service answered with an error.
    #[error("remote error: {0}")]
    Remote(RemoteError),
    /// The link closed before the answer arrived (the reason says why).
    #[error("link closed: {0}")]
    Closed(String),
    /// No answer within `call_timeout` (a Cancel was sent to the peer).
    #[error("the peer did not answer within call_timeout")]
    Timeout,
    /// The request payload exceeds the frame limit; nothing was sent.
    #[error(
        "request payload of {len} bytes exceeds the limit of {max} bytes (max_frame): split it"
    )]
    TooLarge {
        /// Payload length.
        len: usize,
        /// Largest payload allowed.
        max: usize,
    },
}

impl CallError {
    /// The errno this failure maps to: the remote one, else EIO / ETIMEDOUT / E2BIG.
    pub fn errno(&self) -> i32 {
        match self {
            CallError::Remote(e) => e.errno,
            CallError::Closed(_) => libc::EIO,
            CallError::Timeout => libc::ETIMEDOUT,
            CallError::TooLarge { .. } => libc::E2BIG,
        }
    }
}

impl From<CallError> for io::Error {
    fn from(e: CallError) -> io::Error {
        io::Error::from_raw_os_error(e.errno())
    }
}

/// Link tunables. Out-of-range values are clamped by [`LinkOptions::normalized`].
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// Largest frame accepted and sent, header included (default 16 MiB + 16; clamped to
    /// [`MIN_FRAME`]..=[`MAX_FRAME_HARD`]).
    pub max_frame: usize,
    /// Incoming requests served concurrently per link (default 256).
    pub max_in_flight: usize,
    /// Ping interval (default 5 s).
    pub keepalive: Duration,
    /// No byte at all from the peer for this long closes the link (default 20 s). Must
    /// exceed the peer's keepalive.
    pub dead_after: Duration,
    /// A started frame must complete within this (default 10 s): slow-loris defence.
    pub frame_timeout: Duration,
    /// Connect + handshake deadline (default 5 s).
    pub handshake_timeout: Duration,
    /// Per-call deadline (default none: FUSE and exec calls may legitimately block long).
    pub call_timeout: Option<Duration>,
}

impl Default for LinkOptions {
    fn default() -> LinkOptions {
        LinkOptions {
            max_frame: DEFAULT_MAX_FRAME,
            max_in_flight: 256,
            keepalive: Duration::from_secs(5),
            dead_after: Duration::from_secs(20),
            frame_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            call_timeout: None,
        }
    }
}

impl LinkOptions {
    /// A copy with every value in range: `max_frame` clamped to
    /// [`MIN_FRAME`]..=[`MAX_FRAME_HARD`], `max_in_flight` at least 1, timers at least 10 ms.
    pub fn normalized(&self) -> LinkOptions {
        LinkOptions {
            max_frame: self.max_frame.clamp(MIN_FRAME, MAX_FRAME_HARD),
            max_in_flight: self.max_in_flight.max(1),
            keepalive: self.keepalive.max(MIN_TIMER),
            dead_after: self.dead_after.max(MIN_TIMER),
            frame_timeout: self.frame_timeout.max(MIN_TIMER),
            handshake_timeout: self.handshake_timeout.max(MIN_TIMER),
            call_timeout: self.call_timeout.map(|t| t.max(MIN_TIMER)),
        }
    }

    /// Checks combinations a config file could get wrong; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_frame > MAX_FRAME_HARD || self.max_frame < MIN_FRAME {
            return Err(format!(
                "max_frame {} is outside {MIN_FRAME}..={MAX_FRAME_HARD}",
                self.max_frame
            ));
        }
        if self.dead_after <= self.keepalive {
            return Err(format!(
                "dead_after ({}) must be longer than keepalive ({}), or idle links are closed: use at least 3x keepalive",
                humantime::format_duration(self.dead_after),
                humantime::format_duration(self.keepalive)
            ));
        }
        if self.max_in_flight == 0 {
            return Err("max_in_flight must be at least 1".into());
        }
        Ok(())
    }

    fn max_payload(&self) -> usize {
        self.max_frame - HEADER_LEN
    }
}

/// Link counters (a snapshot).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Bytes received on the link (frames, after the handshake).
    pub bytes_in: u64,
    /// Bytes sent on the link.
    pub bytes_out: u64,
    /// Requests received from the peer.
    pub requests_in: u64,
    /// Requests sent to the peer.
    pub requests_out: u64,
    /// Round-trip time of the last answered ping.
    pub rtt: Option<Duration>,
}

/// A multiplexed authenticated connection. Cheap to clone; both sides may call.
#[derive(Clone)]
pub struct Link {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.inner.peer.address)
            .field("closed", &self.is_closed())
            .finish()
    }
}

type Reply = oneshot::Sender<Result<Bytes, CallError>>;

struct Inner {
    peer: PeerInfo,
    opts: LinkOptions,
    /// Frames for the writer task.
    out: mpsc::Sender<Frame>,
    /// Pending outgoing calls and pings, and the close reason: one lock so registering a
    /// call and closing the link are ordered (no call can hang after the close).
    state: Mutex<State>,
    /// Running handlers of incoming requests, by the peer's request id, so a Cancel or the
    /// close can abort them.
    serving: Mutex<HashMap<u64, AbortHandle>>,
    next_id: AtomicU64,
    /// Cancelled when the link closes; every task selects on it.
    closed: CancellationToken,
    stats: Counters,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Reply>,
    close: Option<Closed>,
}

struct Closed {
    reason: String,
    /// Closed by this side (`close()`): the writer sends a Goaway.
    local: bool,
}

#[derive(Default)]
struct Counters {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    requests_in: AtomicU64,
    requests_out: AtomicU64,
    /// Last RTT in nanoseconds; 0 = never measured.
    rtt_nanos: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CloseKind {
    /// `close()` on this side.
    Local,
    /// The peer went away or said goodbye: normal.
    Peer,
    /// Protocol violation, timeout or I/O error: the connection is dropped and warned about.
    Fault,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the maps inconsistent (single inserts
    // and removes), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    fn close(&self, kind: CloseKind, reason: String) {
        let pending = {
            let mut st = lock(&self.state);
            if st.close.is_some() {
                return;
            }
            st.close = Some(Closed {
                reason: reason.clone(),
                local: kind == CloseKind::Local,
            });
            std::mem::take(&mut st.pending)
        };
        for (_, tx) in pending {
            let _ = tx.send(Err(CallError::Closed(reason.clone())));
        }
        let handlers: Vec<AbortHandle> = lock(&self.serving).drain().map(|(_, h)| h).collect();
        for h in handlers {
            h.abort();
        }
        self.closed.cancel();
        let peer = &self.peer.address;
        let role = self.peer.role.as_str();
        match kind {
            CloseKind::Fault => {
                tracing::warn!(peer = %peer, peer_role = role, reason = %reason, "link dropped")
            }
            CloseKind::Peer => {
                tracing::info!(peer = %peer, peer_role = role, reason = %reason, "link closed by peer")
            }
            CloseKind::Local => {
                tracing::info!(peer = %peer, peer_role = role, reason = %reason, "link closed")
            }
        }
    }

    fn close_reason(&self) -> String {
        lock(&self.state)
            .close
            .as_ref()
            .map(|c| c.reason.clone())
            .unwrap_or_default()
    }

    fn local_close_reason(&self) -> Option<String> {
        lock(&self.state)
            .close
            .as_ref()
            .filter(|c| c.local)
            .map(|c| c.reason.clone())
    }

    /// Allocates an id and registers its reply slot, unless the link is closed.
    fn register(&self) -> Result<(u64, oneshot::Receiver<Result<Bytes, CallError>>), CallError> {
        let (tx, rx) = oneshot::channel();
        let mut st = lock(&self.state);
        if let Some(c) = &st.close {
            return Err(CallError::Closed(c.reason.clone()));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        st.pending.insert(id, tx);
        Ok((id, rx))
    }

    fn complete(&self, id: u64, result: Result<Bytes, CallError>) {
        let slot = lock(&self.state).pending.remove(&id);
        match slot {
            Some(tx) => {
                let _ = tx.send(result);
            }
            // The caller gave up (timeout or dropped future): the late answer is discarded.
            None => {
                tracing::debug!(peer = %self.peer.address, id, "answer for no pending call discarded")
            }
        }
    }

    async fn send(&self, frame: Frame) -> Result<(), CallError> {
        tokio::select! {
            r = self.out.send(frame) => r.map_err(|_| CallError::Closed(self.close_reason())),
            _ = self.closed.cancelled() => Err(CallError::Closed(self.close_reason())),
        }
    }

    async fn ping(&self, wait: Duration) -> Result<Duration, CallError> {
        let (id, rx) = self.register()?;
        let _guard = PendingGuard {
            inner: self,
            id,
            cancel: false,
        };
        let start = Instant::now();
        self.send(Frame::new(Kind::Ping, 0, id, Bytes::new()))
            .await?;
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(Ok(_))) => {
                let rtt = start.elapsed();
                let nanos = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX).max(1);
                self.stats.rtt_nanos.store(nanos, Ordering::Relaxed);
                Ok(rtt)
            }
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(CallError::Closed(self.close_reason())),
            Err(_) => Err(CallError::Timeout),
        }
    }
}

/// Removes a call's pending entry when its future ends without an answer (timeout, or the
/// caller dropped it) and tells the peer with a Cancel so it can stop the work.
struct PendingGuard<'a> {
    inner: &'a Inner,
    id: u64,
    cancel: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let was_pending = lock(&self.inner.state).pending.remove(&self.id).is_some();
        if was_pending && self.cancel && !self.inner.closed.is_cancelled() {
            // Best effort: with a full queue the Cancel is skipped and the late answer is
            // simply discarded on arrival.
            let _ = self
                .inner
                .out
                .try_send(Frame::new(Kind::Cancel, 0, self.id, Bytes::new()));
        }
    }
}

impl Link {
    /// Starts the link's reader, writer and keepalive tasks on `io` (must be called inside a
    /// tokio runtime). A [`Stream`] is split into owned halves; other types go through
    /// `tokio::io::split`.
    pub fn spawn<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
        io: S,
        peer: PeerInfo,
        service: Arc<dyn Service>,
        opts: LinkOptions,
    ) -> Link {
        let opts = opts.normalized();
        let (tx, rx) = mpsc::channel(OUT_QUEUE);
        let inner = Arc::new(Inner {
            peer,
            opts,
            out: tx,
            state: Mutex::new(State::default()),
            serving: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: CancellationToken::new(),
            stats: Counters::default(),
        });
        // Use the lock-free owned split when the transport is our Stream.
        let mut slot = Some(io);
        let stream = (&mut slot as &mut dyn Any)
            .downcast_mut::<Option<Stream>>()
            .and_then(Option::take);
        match (stream, slot) {
            (Some(stream), _) => {
                let (r, w) = stream.into_split();
                start(&inner, r, w, rx, service);
            }
            (None, Some(io)) => {
                let (r, w) = tokio::io::split(io);
                start(&inner, r, w, rx, service);
            }
            // Not reachable: `slot` is only emptied when it held a Stream.
            (None, None) => inner.close(CloseKind::Fault, "no transport".into()),
        }
        Link { inner }
    }

    /// Calls `op` on the peer's service and waits for its answer.
    pub async fn call(&self, op: u16, payload: Bytes) -> Result<Bytes, CallError> {
        let max = self.inner.opts.max_payload();
        if payload.len() > max {
            return Err(CallError::TooLarge {
                len: payload.len(),
                max,
            });
        }
        let (id, rx) = self.inner.register()?;
        let _guard = PendingGuard {
            inner: &self.inner,
            id,
            cancel: true,
        };
        self.inner
            .send(Frame::new(Kind::Request, op, id, payload))
            .await?;
        self.inner
            .stats
            .requests_out
            .fetch_add(1, Ordering::Relaxed);
        let answer = match self.inner.opts.call_timeout {
            Some(t) => match tokio::time::timeout(t, rx).await {
                Ok(a) => a,
                Err(_) => return Err(CallError::Timeout),
            },
            None => rx.await,
        };
        match answer {
            Ok(result) => result,
            Err(_) => Err(CallError::Closed(self.inner.close_reason())),
        }
    }

    /// Sends a ping and returns the round-trip time (also recorded in [`Link::stats`]).
    /// Waits at most `call_timeout`, or `dead_after` when there is none.
    pub async fn ping(&self) -> Result<Duration, CallError> {
        let wait = self
            .inner
            .opts
            .call_timeout
            .unwrap_or(self.inner.opts.dead_after);
        self.inner.ping(wait).await
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> LinkStats {
        let s = &self.inner.stats;
        let rtt = s.rtt_nanos.load(Ordering::Relaxed);
        LinkStats {
            bytes_in: s.bytes_in.load(Ordering::Relaxed),
            bytes_out: s.bytes_out.load(Ordering::Relaxed),
            requests_in: s.requests_in.load(Ordering::Relaxed),
            requests_out: s.requests_out.load(Ordering::Relaxed),
            rtt: (rtt != 0).then(|| Duration::from_nanos(rtt)),
        }
    }

    /// What the handshake learned about the peer.
    pub fn peer(&self) -> &PeerInfo {
        &self.inner.peer
    }

    /// Closes the link: pending calls fail with [`CallError::Closed`], running handlers are
    /// aborted, and the peer receives a Goaway.
    pub fn close(&self) {
        self.inner
            .close(CloseKind::Local, "closed by this side".into());
    }

    /// True once the link has closed, for whatever reason.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.is_cancelled()
    }

    /// Resolves with the close reason when the link ends.
    pub async fn closed(&self) -> String {
        self.inner.closed.cancelled().await;
        self.inner.close_reason()
    }
}

fn start<R, W>(inner: &Arc<Inner>, r: R, w: W, rx: mpsc::Receiver<Frame>, service: Arc<dyn Service>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(reader(inner.clone(), r, service));
    tokio::spawn(writer(inner.clone(), w, rx));
    tokio::spawn(keepalive(inner.clone()));
}

async fn reader<R: AsyncRead + Unpin>(inner: Arc<Inner>, mut r: R, service: Arc<dyn Service>) {
    let ending = tokio::select! {
        _ = inner.closed.cancelled() => return,
        e = read_loop(&inner, &mut r, &service) => e,
    };
    inner.close(ending.0, ending.1);
}

/// Runs until the link must close; returns why.
async fn read_loop<R: AsyncRead + Unpin>(
    inner: &Arc<Inner>,
    r: &mut R,
    service: &Arc<dyn Service>,
) -> (CloseKind, String) {
    let opts = &inner.opts;
    let mut decoder = FrameDecoder::new(opts.max_frame);
    let mut buf = BytesMut::with_capacity(READ_BUF);
    let permits = Arc::new(Semaphore::new(opts.max_in_flight));
    // When the frame at the front of `buf` started arriving (None while idle).
    let mut partial_since: Option<Instant> = None;
    loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    partial_since = None;
                    if let Err(end) = handle_frame(inner, frame, &permits, service).await {
                        return end;
                    }
                }
                Ok(None) => break,
                Err(e) => return (CloseKind::Fault, format!("protocol error: {e}")),
            }
        }
        if buf.is_empty() {
            partial_since = None;
        } else if partial_since.is_none() {
            partial_since = Some(Instant::now());
        }
        let deadline = match partial_since {
            None => Instant::now() + opts.dead_after,
            Some(t) => t + opts.frame_timeout,
        };
        if buf.capacity() - buf.len() < READ_BUF / 4 {
            buf.reserve(READ_BUF);
        }
        match tokio::time::timeout_at(deadline, r.read_buf(&mut buf)).await {
            Ok(Ok(0)) if buf.is_empty() => {
                return (CloseKind::Peer, "the peer closed the connection".into())
            }
            Ok(Ok(0)) => {
                return (
                    CloseKind::Fault,
                    format!(
                        "the connection ended inside a frame ({} bytes of it received)",
                        buf.len()
                    ),
                )
            }
            Ok(Ok(n)) => {
                inner.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
            }
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                ) =>
            {
                // Usually a peer exiting with unread data in its socket: a departure, not
                // an attack.
                return (
                    CloseKind::Peer,
                    format!("the peer closed the connection abruptly ({e})"),
                );
            }
            Ok(Err(e)) => return (CloseKind::Fault, format!("read failed: {e}")),
            Err(_) if partial_since.is_some() => {
                return (
                    CloseKind::Fault,
                    format!(
                        "a frame was not completed within {} (slow or stalled peer; frame_timeout)",
                        humantime::format_duration(opts.frame_timeout)
                    ),
                )
            }
            Err(_) => {
                return (
                    CloseKind::Fault,
                    format!(
                    "nothing received from the peer for {} (dead_after): peer hung or network down",
                    humantime::format_duration(opts.dead_after)
                ),
                )
            }
        }
    }
}

async fn handle_frame(
    inner: &Arc<Inner>,
    frame: Frame,
    permits: &Arc<Semaphore>,
    service: &Arc<dyn Service>,
) -> Result<(), (CloseKind, String)> {
    match frame.kind {
        Kind::Request => {
            inner.stats.requests_in.fetch_add(1, Ordering::Relaxed);
            // Waiting here back-pressures the peer once max_in_flight handlers run.
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| (CloseKind::Fault, "request semaphore closed".to_string()))?;
            start_handler(inner, frame, permit, service)
        }
        Kind::Response | Kind::Pong => {
            inner.complete(frame.id, Ok(frame.payload));
            Ok(())
        }
        Kind::Error => {
            let (errno, message) = decode_error(&frame.payload)
                .map_err(|e| (CloseKind::Fault, format!("protocol error: {e}")))?;
            inner.complete(
                frame.id,
                Err(CallError::Remote(RemoteError { errno, message })),
            );
            Ok(())
        }
        Kind::Ping => {
            // A closed queue means the link is closing; the select in `reader` ends us.
            let _ = inner
                .send(Frame::new(Kind::Pong, 0, frame.id, Bytes::new()))
                .await;
            Ok(())
        }
        Kind::Cancel => {
            if let Some(h) = lock(&inner.serving).remove(&frame.id) {
                h.abort();
            }
            Ok(())
        }
        Kind::Goaway => {
            let reason: String = String::from_utf8_lossy(&frame.payload)
                .chars()
                .take(200)
                .map(|c| if c.is_control() { '?' } else { c })
                .collect();
            Err((
                CloseKind::Peer,
                format!("the peer closed the link: {reason}"),
            ))
        }
        Kind::Stream(k) => Err((
            CloseKind::Fault,
            format!("protocol error: stream frame kind 0x{k:02x} is not supported by this version"),
        )),
    }
}

fn start_handler(
    inner: &Arc<Inner>,
    frame: Frame,
    permit: OwnedSemaphorePermit,
    service: &Arc<dyn Service>,
) -> Result<(), (CloseKind, String)> {
    let (id, op) = (frame.id, frame.op);
    if lock(&inner.serving).contains_key(&id) {
        return Err((
            CloseKind::Fault,
            format!("protocol error: request id {id} reused while still in flight"),
        ));
    }
    // A panicking service must cost one request an EIO, not the link its reader.
    let fut = match std::panic::catch_unwind(AssertUnwindSafe(|| service.call(op, frame.payload))) {
        Ok(f) => f,
        Err(_) => Box::pin(async move { Err(panic_error(op)) }),
    };
    let task_inner = inner.clone();
    let max_payload = inner.opts.max_payload();
    // Hold the lock across spawn + insert so the task cannot deregister before it is
    // registered (it takes this lock to remove itself).
    let mut serving = lock(&inner.serving);
    let handle = tokio::spawn(async move {
        let _permit = permit;
        let result = AssertUnwindSafe(fut)
            .catch_unwind()
            .await
            .unwrap_or_else(|_| Err(panic_error(op)));
        let reply = match result {
            Ok(payload) if payload.len() <= max_payload => {
                Frame::new(Kind::Response, op, id, payload)
            }
            Ok(payload) => Frame::new(
                Kind::Error,
                op,
                id,
                encode_error(
                    libc::E2BIG,
                    &format!(
                        "response of {} bytes exceeds the frame limit of {max_payload} bytes",
                        payload.len()
                    ),
                ),
            ),
            Err(e) => Frame::new(Kind::Error, op, id, encode_error(e.errno, &e.message)),
        };
        lock(&task_inner.serving).remove(&id);
        let _ = task_inner.send(reply).await;
    });
    serving.insert(id, handle.abort_handle());
    Ok(())
}

fn panic_error(op: u16) -> RemoteError {
    tracing::error!(op, "service handler panicked");
    RemoteError::new(
        libc::EIO,
        format!("the remote handler for op {op} panicked"),
    )
}

async fn writer<W: AsyncWrite + Unpin>(inner: Arc<Inner>, w: W, mut rx: mpsc::Receiver<Frame>) {
    let mut w = BufWriter::with_capacity(WRITE_BUF, w);
    // False while a frame is partly written: then no Goaway may follow it.
    let mut clean = true;
    let result = tokio::select! {
        _ = inner.closed.cancelled() => Ok(()),
        r = write_loop(&inner, &mut w, &mut rx, &mut clean) => r,
    };
    if let Err(reason) = result {
        inner.close(CloseKind::Fault, reason);
    }
    let _ = tokio::time::timeout(GOAWAY_TIMEOUT, async {
        if let (Some(reason), true) = (inner.local_close_reason(), clean) {
            let goaway = Frame::new(Kind::Goaway, 0, 0, Bytes::from(reason.into_bytes()));
            let _ = w.write_all(&goaway.header().encode()).await;
            let _ = w.write_all(&goaway.payload).await;
        }
        let _ = w.flush().await;
        let _ = w.shutdown().await;
    })
    .await;
}

async fn write_loop<W: AsyncWrite + Unpin>(
    inner: &Inner,
    w: &mut BufWriter<W>,
    rx: &mut mpsc::Receiver<Frame>,
    clean: &mut bool,
) -> Result<(), String> {
    let stall = inner.opts.dead_after;
    let stalled = || {
        format!(
            "the peer stopped reading: a write made no progress for {} (dead_after)",
            humantime::format_duration(stall)
        )
    };
    loop {
        // Inner owns a Sender, so the queue never reports closed while we run.
        let Some(mut frame) = rx.recv().await else {
            return Ok(());
        };
        let mut batch = 0;
        loop {
            *clean = false;
            let header = frame.header().encode();
            let write = async {
                w.write_all(&header).await?;
                w.write_all(&frame.payload).await
            };
            match tokio::time::timeout(stall, write).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("write failed: {e}")),
                Err(_) => return Err(stalled()),
            }
            *clean = true;
            inner
                .stats
                .bytes_out
                .fetch_add((HEADER_LEN + frame.payload.len()) as u64, Ordering::Relaxed);
            batch += 1;
            if batch >= MAX_BATCH {
                break;
            }
            match rx.try_recv() {
                Ok(f) => frame = f,
                Err(_) => break,
            }
        }
        match tokio::time::timeout(stall, w.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("write failed: {e}")),
            Err(_) => return Err(stalled()),
        }
    }
}

async fn keepalive(inner: Arc<Inner>) {
    loop {
        tokio::select! {
            _ = inner.closed.cancelled() => return,
            _ = tokio::time::sleep(inner.opts.keepalive) => {}
        }
        // A late pong is not fatal here: liveness is judged by the reader's dead_after.
        let _ = inner.ping(inner.opts.dead_after).await;
    }
}

/// Why [`dial`] failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The transport connection failed.
    #[error("cannot connect to {addr}: {source} (is the peer running and listening there?)")]
    Connect {
        /// The address dialled.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// Connected, but the handshake failed.
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        /// The address dialled.
        addr: String,
        /// What failed.
        source: HandshakeError,
    },
}

impl DialError {
    /// True when the handshake failed on authentication (see
    /// [`HandshakeError::is_auth_failure`]); retrying will not help until the keys match.
    pub fn is_auth_failure(&self) -> bool {
        matches!(self, DialError::Handshake { source, .. } if source.is_auth_failure())
    }
}

/// Connects to `addr`, runs the client handshake and starts a link serving `service`.
/// Connect and handshake each get `opts.handshake_timeout`.
pub async fn dial(
    addr: &Addr,
    auth: &Auth,
    hello: &Hello,
    service: Arc<dyn Service>,
    opts: LinkOptions,
) -> Result<Link, DialError> {
    let opts = opts.normalized();
    let name = addr.to_string();
    let mut stream = addr
        .connect(opts.handshake_timeout)
        .await
        .map_err(|source| DialError::Connect {
            addr: name.clone(),
            source,
        })?;
    let peer = handshake::client(&mut stream, &name, auth, hello, opts.handshake_timeout)
        .await
        .map_err(|source| DialError::Handshake { addr: name, source })?;
    Ok(Link::spawn(stream, peer, service, opts))
}

/// Callback receiving each established link from [`serve`].
pub type OnLink = Arc<dyn Fn(Link) + Send + Sync>;
/// Callback receiving the peer address and error of each failed handshake in [`serve`].
pub type OnReject = Arc<dyn Fn(String, &HandshakeError) + Send + Sync>;

/// Accept loop: each accepted connection is handshaken in its own task (at most
/// [`MAX_CONCURRENT_HANDSHAKES`] at once, so a flood cannot exhaust memory); failures are
/// logged with the peer address and passed to `on_reject` (which counts them); successful
/// links are passed to `on_link`. Returns when `shutdown` is cancelled: it stops accepting,
/// abandons handshakes in progress and waits for their tasks, so `on_link` is never called
/// after it returns. Established links are the caller's.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: Listener,
    auth: Auth,
    hello: Hello,
    service: Arc<dyn Service>,
    opts: LinkOptions,
    on_link: OnLink,
    on_reject: OnReject,
    shutdown: CancellationToken,
) {
    let make_service: MakeService = Arc::new(move |_| service.clone());
    serve_per_link(
        listener,
        auth,
        hello,
        make_service,
        opts,
        on_link,
        on_reject,
        shutdown,
    )
    .await
}

/// Builds the service of one accepted link from the authenticated peer, so per-client
/// state (open files, handles) lives exactly as long as the link.
pub type MakeService = Arc<dyn Fn(&PeerInfo) -> Arc<dyn Service> + Send + Sync>;

/// [`serve`] with a service built for each link by `make_service`.
#[allow(clippy::too_many_arguments)]
pub async fn serve_per_link(
    listener: Listener,
    auth: Auth,
    hello: Hello,
    make_service: MakeService,
    opts: LinkOptions,
    on_link: OnLink,
    on_reject: OnReject,
    shutdown: CancellationToken,
) {
    let opts = opts.normalized();
    let local = listener.local_addr();
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    let tasks = TaskTracker::new();
    if auth.is_insecure() {
        tracing::warn!(listen = %local, "serving WITHOUT authentication (insecure = true): any process that can reach this address is trusted");
    }
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (mut stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(listen = %local, error = %e, "accept failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
                }
            },
        };
        let (auth, hello, make_service, opts) = (
            auth.clone(),
            hello.clone(),
            make_service.clone(),
            opts.clone(),
        );
        let (on_link, on_reject, shutdown) = (on_link.clone(), on_reject.clone(), shutdown.clone());
        tasks.spawn(async move {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = handshake::server(&mut stream, &peer, &auth, &hello, opts.handshake_timeout) => r,
            };
            drop(permit);
            match result {
                Ok(info) => {
                    tracing::info!(
                        peer = %peer,
                        peer_role = info.role.as_str(),
                        peer_name = %info.name,
                        version = info.version,
                        "peer connected"
                    );
                    let service = make_service(&info);
                    on_link(Link::spawn(stream, info, service, opts));
                }
                Err(e) => {
                    tracing::warn!(peer = %peer, reason = %e, "handshake failed; connection dropped");
                    on_reject(peer, &e);
                }
            }
        });
    }
    tasks.close();
    tasks.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::handshake::Role;
    use std::sync::atomic::AtomicBool;

    fn peer(name: &str) -> PeerInfo {
        PeerInfo {
            address: name.into(),
            version: 1,
            role: Role::Client,
            instance: 1,
            name: name.into(),
            insecure: true,
        }
    }

    /// op 1 echo, op 2 sleep 30 s (records being dropped), op 3 EACCES, op 4 panic,
    /// op 5 huge answer.
    struct Svc {
        dropped: Arc<AtomicBool>,
    }

    struct SetOnDrop(Arc<AtomicBool>);
    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    impl Service for Svc {
        fn call(&self, op: u16, payload: Bytes) -> BoxFuture<'static, Result<Bytes, RemoteError>> {
            let dropped = self.dropped.clone();
            Box::pin(async move {
                match op {
                    1 => Ok(payload),
                    2 => {
                        let _g = SetOnDrop(dropped);
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        Ok(Bytes::new())
                    }
                    3 => Err(RemoteError::new(libc::EACCES, "denied by allowlist")),
                    4 => panic!("boom"),
                    5 => Ok(Bytes::from(vec![0u8; 4096])),
                    _ => Err(RemoteError::new(libc::ENOSYS, "no such op")),
                }
            })
        }
    }

    fn pair(opts: LinkOptions) -> (Link, Link, Arc<AtomicBool>) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let dropped = Arc::new(AtomicBool::new(false));
        let svc = Arc::new(Svc {
            dropped: dropped.clone(),
        });
        let la = Link::spawn(a, peer("b"), svc.clone(), opts.clone());
        let lb = Link::spawn(b, peer("a"), svc, opts);
        (la, lb, dropped)
    }

    #[tokio::test]
    async fn calls_both_ways_and_errno_survives() {
        let (a, b, _) = pair(LinkOptions::default());
        assert_eq!(a.call(1, Bytes::from_static(b"x")).await.unwrap(), "x");
        assert_eq!(b.call(1, Bytes::from_static(b"y")).await.unwrap(), "y");
        let e = a.call(3, Bytes::new()).await.unwrap_err();
        assert!(
            matches!(&e, CallError::Remote(r) if r.errno == libc::EACCES && r.message == "denied by allowlist")
        );
        assert!(e.to_string().contains("EACCES"), "{e}");
        assert_eq!(io::Error::from(e).raw_os_error(), Some(libc::EACCES));
        let e = b.call(99, Bytes::new()).await.unwrap_err();
        assert_eq!(e.errno(), libc::ENOSYS);
    }

    #[tokio::test]
    async fn panicking_handler_costs_one_call_an_eio() {
        let (a, _b, _) = pair(LinkOptions::default());
        let e = a.call(4, Bytes::new()).await.unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        assert_eq!(
            a.call(1, Bytes::from_static(b"still up")).await.unwrap(),
            "still up"
        );
    }

    #[tokio::test]
    async fn timeout_sends_cancel_and_the_handler_is_aborted() {
        let opts = LinkOptions {
            call_timeout: Some(Duration::from_millis(100)),
            ..LinkOptions::default()
        };
        let (a, _b, dropped) = pair(opts);
        let e = a.call(2, Bytes::new()).await.unwrap_err();
        assert!(matches!(e, CallError::Timeout));
        assert_eq!(io::Error::from(e).raw_os_error(), Some(libc::ETIMEDOUT));
        for _ in 0..100 {
            if dropped.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            dropped.load(Ordering::SeqCst),
            "remote handler was not aborted"
        );
        assert!(!a.is_closed());
    }

    #[tokio::test]
    async fn too_large_request_is_refused_locally_and_large_answer_becomes_e2big() {
        let opts = LinkOptions {
            max_frame: MIN_FRAME,
            ..LinkOptions::default()
        };
        let (a, _b, _) = pair(opts);
        let e = a
            .call(1, Bytes::from(vec![0u8; MIN_FRAME]))
            .await
            .unwrap_err();
        assert!(
            matches!(e, CallError::TooLarge { len, max } if len == MIN_FRAME && max == MIN_FRAME - HEADER_LEN)
        );
        assert_eq!(io::Error::from(e).raw_os_error(), Some(libc::E2BIG));
        let e = a.call(5, Bytes::new()).await.unwrap_err();
        assert_eq!(e.errno(), libc::E2BIG);
        assert!(!a.is_closed());
    }

    #[tokio::test]
    async fn close_fails_pending_calls_and_tells_the_peer() {
        let (a, b, _) = pair(LinkOptions::default());
        let pending = tokio::spawn({
            let a = a.clone();
            async move { a.call(2, Bytes::new()).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        a.close();
        let r = tokio::time::timeout(Duration::from_secs(1), pending)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(r, Err(CallError::Closed(ref why)) if why.contains("closed by this side")),
            "{r:?}"
        );
        let why = tokio::time::timeout(Duration::from_secs(2), b.closed())
            .await
            .unwrap();
        assert!(
            why.contains("the peer closed the link: closed by this side"),
            "{why}"
        );
        assert!(matches!(
            a.call(1, Bytes::new()).await,
            Err(CallError::Closed(_))
        ));
        assert!(matches!(
            b.call(1, Bytes::new()).await,
            Err(CallError::Closed(_))
        ));
    }

    #[tokio::test]
    async fn ping_measures_rtt() {
        let (a, _b, _) = pair(LinkOptions::default());
        assert!(a.stats().rtt.is_none());
        let rtt = a.ping().await.unwrap();
        assert_eq!(a.stats().rtt.map(|_| ()), Some(()));
        assert!(rtt < Duration::from_secs(1));
    }

    #[test]
    fn options_validate_and_normalize() {
        assert!(LinkOptions::default().validate().is_ok());
        let bad = LinkOptions {
            dead_after: Duration::from_secs(1),
            ..LinkOptions::default()
        };
        assert!(bad.validate().unwrap_err().contains("dead_after"));
        let huge = LinkOptions {
            max_frame: usize::MAX,
            max_in_flight: 0,
            ..LinkOptions::default()
        };
        assert!(huge.validate().is_err());
        let n = huge.normalized();
        assert_eq!(n.max_frame, MAX_FRAME_HARD);
        assert_eq!(n.max_in_flight, 1);
    }

    #[test]
    fn remote_error_conversions_keep_errno() {
        let r = RemoteError::from(io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(r.errno, libc::ENOENT);
        let r = RemoteError::from(io::Error::new(io::ErrorKind::PermissionDenied, "nope"));
        assert_eq!(r.errno, libc::EACCES);
        assert_eq!(r.message, "nope");
        let r = RemoteError::from(io::Error::other("weird"));
        assert_eq!(r.errno, libc::EIO);
        let e: io::Error = RemoteError::new(libc::EROFS, "ro").into();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        assert_eq!(
            RemoteError::new(libc::EACCES, "x").to_string(),
            "x (EACCES)"
        );
        assert_eq!(
            RemoteError::new(100_000, "x").to_string(),
            "x (errno 100000)"
        );
    }
}
