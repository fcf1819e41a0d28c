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
//!   **Bypass**: when both queues are empty and the writer is idle (its lock is free), a
//!   sender appends its frame to the buffer itself and tries one non-blocking flush, saving
//!   the hand-off to the writer task; what the socket does not take stays buffered and the
//!   writer is woken to finish it. The bypass never awaits (a cancelled caller cannot leave
//!   half a frame) and takes only frames that fit in the buffer; a count of queued frames,
//!   uncounted by the writer under the same lock, keeps every sender's frames in order.
//!   With `coalesce_writes` (udsproxyd's links), a frame appended less than `BUSY_GAP` after
//!   the previous one, or behind frames still waiting, is not flushed by its sender: the
//!   writer flushes once the other runnable tasks have appended theirs, so many proxied
//!   connections share one system call and one TCP segment.
//! - **keepalive**: a Ping every `keepalive`, which also measures the round-trip time.
//!
//! Shared state lives in `Inner` behind an `Arc`: the pending-call table and close reason
//! under one mutex (so a call can never register after the close drained the table), the
//! table of running handlers under another, counters as atomics. Those locks are never held
//! across an `.await`; the write half's async lock is, by the writer task only. Closing is idempotent: the first reason wins, pending calls fail at once with
//! [`CallError::Closed`], handlers are aborted, and the tasks stop.
//!
//! A link lives until [`Link::close`], the peer leaving, or a protocol error; dropping every
//! handle does not close it (a server usually keeps none and just serves).
//!
//! **Streams** (docs/protocol.md §5.1): either side opens a byte stream with
//! [`Link::open_stream`]; the peer's [`Service::open_stream`] accepts or refuses it. Each
//! direction of a stream has credit-based flow control: a sender may have at most
//! `stream_window` bytes unacknowledged, and the receiver grants credit back only as its
//! consumer takes the bytes ([`StreamReader::recv`]). So the reader task never waits for a
//! stream (a stalled consumer cannot stall the other streams) and a link buffers at most
//! `stream_window` bytes per stream. Control frames (accept, refuse, credit, reset) travel on
//! an unbounded priority queue that the writer drains before every data frame: their number
//! is bounded by the streams and the data received, and credit must never wait behind the
//! data it unblocks. Data and fin share the bounded queue, which keeps them in order.

use std::any::Any;
use std::collections::HashMap;
use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
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
    decode_credit, decode_error, encode_credit, encode_error, Frame, FrameDecoder, Kind,
    DEFAULT_MAX_FRAME, HEADER_LEN, MAX_FRAME_HARD, MIN_FRAME, STREAM_ACCEPT, STREAM_CREDIT,
    STREAM_DATA, STREAM_FIN, STREAM_FROM_ACCEPTOR, STREAM_OPEN, STREAM_REFUSE, STREAM_RESET,
};
use super::handshake::{self, Auth, HandshakeError, Hello, PeerInfo};

/// Frames waiting for the writer. Bounded so producers wait instead of growing memory when
/// the peer reads slowly; large enough that a burst of small replies still batches.
const OUT_QUEUE: usize = 1024;
/// Frames written per flush at most: bounds latency for the first frame of a long burst.
const MAX_BATCH: usize = 256;
/// Socket read granularity: large, so a bulk stream needs few reads.
const READ_BUF: usize = 256 * 1024;
/// Largest data frame a stream writer sends: keeps one stream's burst from delaying the
/// other streams' frames for long.
const STREAM_CHUNK: usize = 256 * 1024;
/// Smallest accepted `stream_window`.
const MIN_STREAM_WINDOW: usize = 16 * 1024;
/// BufWriter capacity: payloads at least this large bypass the buffer (no copy).
const WRITE_BUF: usize = 64 * 1024;
/// Frames a link's bypass appends closer together than this are coalesced into one write
/// when the link asks for it (LinkOptions::coalesce_writes).
const BUSY_GAP: Duration = Duration::from_micros(50);
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

    /// The peer opens a stream. Called on the link's reader task, so it must not block:
    /// spawn a task that ends in [`IncomingStream::accept`] or [`IncomingStream::refuse`].
    /// Dropping `stream` unanswered refuses it. The default refuses every stream.
    fn open_stream(&self, op: u16, payload: Bytes, stream: IncomingStream) {
        let _ = payload;
        stream.refuse(RemoteError::new(
            libc::ENOSYS,
            format!("streams (op {op}) are not served on this link"),
        ));
    }
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
    /// Bytes a stream sender may have unacknowledged per direction (default 512 KiB): the
    /// most a link buffers for one stream whose consumer stalls.
    pub stream_window: usize,
    /// Streams open at once per link (default 16384); the peer's opens beyond it are refused
    /// with EAGAIN.
    pub max_streams: usize,
    /// Frames that tasks on the link's runtime write through the bypass are flushed by the
    /// writer once the other runnable tasks have appended theirs, so frames of many busy
    /// streams share one system call and one TCP segment (default off). Worth it for many
    /// concurrent streams (udsproxyd); it costs a task hand-off per message, which a link
    /// of one request at a time (a qtfs mount's metadata calls) feels.
    pub coalesce_writes: bool,
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
            stream_window: 512 * 1024,
            max_streams: 16384,
            coalesce_writes: false,
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
            stream_window: self
                .stream_window
                .clamp(MIN_STREAM_WINDOW, u32::MAX as usize),
            max_streams: self.max_streams.max(1),
            coalesce_writes: self.coalesce_writes,
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

/// What runs a call's answer: a waiting [`Link::call`], or [`Link::call_then`]'s callback.
enum Reply {
    Wait(oneshot::Sender<Result<Bytes, CallError>>),
    Then(Done),
}

/// [`Link::call_then`]'s callback.
type Done = Box<dyn FnOnce(Result<Bytes, CallError>) + Send>;

impl Reply {
    /// Delivers the answer. Never called with a state lock held: a callback may do anything
    /// quick, including another call on this link.
    fn deliver(self, result: Result<Bytes, CallError>) {
        match self {
            Reply::Wait(tx) => {
                let _ = tx.send(result);
            }
            // A panicking callback costs its own call, not the reader that runs it.
            Reply::Then(done) => {
                if std::panic::catch_unwind(AssertUnwindSafe(|| done(result))).is_err() {
                    tracing::error!("a call's answer callback panicked");
                }
            }
        }
    }
}

struct Inner {
    peer: PeerInfo,
    opts: LinkOptions,
    /// Frames for the writer task.
    out: mpsc::Sender<Frame>,
    /// Control frames for the writer task, sent before any queued data (module docs).
    ctrl: mpsc::UnboundedSender<Frame>,
    /// Open streams; closed together with `state` by `close`.
    streams: Mutex<Streams>,
    next_stream: AtomicU64,
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
    /// The transport's write half, shared by the writer task and the bypass (module docs).
    /// `None` until the tasks start.
    wr: tokio::sync::Mutex<Option<BufWriter<BoxedWrite>>>,
    /// Frames in the two queues: counted before a frame is queued, uncounted by the writer
    /// under `wr` once the frame is in the buffer. The bypass writes only when it is 0.
    queued: AtomicUsize,
    /// Wakes the writer to finish a flush the bypass could not complete.
    flush_needed: tokio::sync::Notify,
    /// When the bypass last appended a frame, in nanoseconds since `born`: frames closer
    /// together than [`BUSY_GAP`] are coalesced (LinkOptions::coalesce_writes).
    last_bypass: AtomicU64,
    born: Instant,
    /// The runtime the link's tasks run on, for work started from other threads
    /// ([`Link::call_then`]).
    rt: tokio::runtime::Handle,
}

type BoxedWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Uncounts a frame in [`Inner::queued`] unless it reached a queue.
struct QueuedGuard<'a>(&'a AtomicUsize, bool);

impl Drop for QueuedGuard<'_> {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
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
    /// Frames written by the bypass and by the writer task (tests check both paths run).
    frames_bypassed: AtomicU64,
    frames_queued: AtomicU64,
    /// Bypassed frames left in the buffer for the writer's shared flush.
    frames_coalesced: AtomicU64,
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
        for (_, reply) in pending {
            reply.deliver(Err(CallError::Closed(reason.clone())));
        }
        let (opening, slots) = {
            let mut guard = lock(&self.streams);
            let st = &mut *guard;
            st.closed = Some(reason.clone());
            let slots: Vec<StreamSlot> = st
                .local
                .drain()
                .chain(st.remote.drain())
                .map(|(_, s)| s)
                .collect();
            (std::mem::take(&mut st.opening), slots)
        };
        for (_, tx) in opening {
            let _ = tx.send(Err(CallError::Closed(reason.clone())));
        }
        let lost = RemoteError::new(libc::ECONNRESET, format!("link closed: {reason}"));
        for slot in slots {
            slot.abort(&lost);
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
        st.pending.insert(id, Reply::Wait(tx));
        Ok((id, rx))
    }

    /// [`Inner::register`] for a callback; on a closed link the callback comes back with the
    /// error.
    fn register_then(&self, done: Done) -> Result<u64, (Done, CallError)> {
        let mut st = lock(&self.state);
        if let Some(c) = &st.close {
            return Err((done, CallError::Closed(c.reason.clone())));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        st.pending.insert(id, Reply::Then(done));
        Ok(id)
    }

    /// A request payload must fit in one frame.
    fn check_size(&self, payload: &Bytes) -> Result<(), CallError> {
        let max = self.opts.max_payload();
        if payload.len() > max {
            return Err(CallError::TooLarge {
                len: payload.len(),
                max,
            });
        }
        Ok(())
    }

    /// Fails a pending call that could not be sent (unless the close already failed it).
    fn fail_unsent(&self, id: u64, e: CallError) {
        let slot = lock(&self.state).pending.remove(&id);
        if let Some(reply) = slot {
            reply.deliver(Err(e));
        }
    }

    fn complete(&self, id: u64, result: Result<Bytes, CallError>) {
        let slot = lock(&self.state).pending.remove(&id);
        match slot {
            Some(reply) => reply.deliver(result),
            // The caller gave up (timeout or dropped future): the late answer is discarded.
            None => {
                tracing::debug!(peer = %self.peer.address, id, "answer for no pending call discarded")
            }
        }
    }

    async fn send(&self, frame: Frame) -> Result<(), CallError> {
        if self.bypass(&frame) {
            return Ok(());
        }
        self.queued.fetch_add(1, Ordering::SeqCst);
        let mut counted = QueuedGuard(&self.queued, false);
        tokio::select! {
            r = self.out.send(frame) => {
                counted.1 = r.is_ok();
                r.map_err(|_| CallError::Closed(self.close_reason()))
            }
            _ = self.closed.cancelled() => Err(CallError::Closed(self.close_reason())),
        }
    }

    /// Queues a control frame (credit, accept, refuse, reset), ahead of queued data.
    fn send_ctrl(&self, frame: Frame) {
        self.queued.fetch_add(1, Ordering::SeqCst);
        if self.ctrl.send(frame).is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Writes `frame` from the calling task when nothing is queued, the writer is idle and the
    /// frame fits in the write buffer: one task hand-off less per message. Appending to the
    /// buffer never waits, and the flush is tried once; what the socket does not take stays
    /// in the buffer for the writer task. Nothing here awaits, so cancelling the caller can
    /// never leave half a frame. Returns false when the frame must be queued instead.
    fn bypass(&self, frame: &Frame) -> bool {
        if self.queued.load(Ordering::SeqCst) != 0 || self.closed.is_cancelled() {
            return false;
        }
        let Ok(mut guard) = self.wr.try_lock() else {
            return false;
        };
        // Checked again under the lock: the writer uncounts frames only while holding it.
        if self.queued.load(Ordering::SeqCst) != 0 {
            return false;
        }
        let Some(w) = guard.as_mut() else {
            return false;
        };
        let len = HEADER_LEN + frame.payload.len();
        if w.buffer().len() + len > WRITE_BUF {
            return false;
        }
        let header = frame.header().encode();
        // Both fit in the buffer, so BufWriter copies them without touching the socket.
        let appended = w
            .write_all(&header)
            .now_or_never()
            .is_some_and(|r| r.is_ok())
            && w.write_all(&frame.payload)
                .now_or_never()
                .is_some_and(|r| r.is_ok());
        if !appended {
            drop(guard);
            self.close(
                CloseKind::Fault,
                "internal error: a bypass write did not fit".into(),
            );
            return true;
        }
        self.stats
            .bytes_out
            .fetch_add(len as u64, Ordering::Relaxed);
        self.stats.frames_bypassed.fetch_add(1, Ordering::Relaxed);
        if self.coalesce(w.buffer().len() > len) {
            self.stats.frames_coalesced.fetch_add(1, Ordering::Relaxed);
            self.flush_needed.notify_one();
            return true;
        }
        match w.flush().now_or_never() {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                drop(guard);
                self.close(CloseKind::Fault, format!("write failed: {e}"));
            }
            None => self.flush_needed.notify_one(),
        }
        true
    }

    /// Whether the bypass should leave its frame in the buffer for the writer to flush once
    /// the other runnable tasks have appended theirs (LinkOptions::coalesce_writes): when
    /// frames are already waiting there, or the previous frame was appended less than
    /// [`BUSY_GAP`] ago. A lone message on a quiet link is flushed at once, as it costs a
    /// task hand-off to wait and there is nothing to share the system call with.
    fn coalesce(&self, others_waiting: bool) -> bool {
        if !self.opts.coalesce_writes {
            return false;
        }
        let now = u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let last = self.last_bypass.swap(now, Ordering::Relaxed);
        let busy = others_waiting || now.saturating_sub(last) < BUSY_GAP.as_nanos() as u64;
        busy && tokio::runtime::Handle::try_current().is_ok()
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
        let (ctrl_tx, ctrl_rx) = mpsc::unbounded_channel();
        let rx = Outgoing {
            data: rx,
            ctrl: ctrl_rx,
        };
        let inner = Arc::new(Inner {
            peer,
            opts,
            out: tx,
            ctrl: ctrl_tx,
            streams: Mutex::new(Streams::default()),
            next_stream: AtomicU64::new(1),
            state: Mutex::new(State::default()),
            serving: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: CancellationToken::new(),
            stats: Counters::default(),
            wr: tokio::sync::Mutex::new(None),
            queued: AtomicUsize::new(0),
            flush_needed: tokio::sync::Notify::new(),
            last_bypass: AtomicU64::new(0),
            born: Instant::now(),
            rt: tokio::runtime::Handle::current(),
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
        self.inner.check_size(&payload)?;
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

    /// Calls `op` like [`Link::call`], but hands the answer to `done` instead of waiting for
    /// it, so the caller needs no task: the request is written from the calling thread when
    /// the writer is idle (the bypass) and `done` runs on the link's reader as the answer
    /// arrives. Any thread may call this, inside the runtime or not; that is what saves a
    /// thread hand-off each way for callers that live outside it (the FUSE session threads).
    /// `done` must be quick and must not block; it runs exactly once, with the answer or the
    /// error (at once, on this thread, when the call fails before it is sent). With a
    /// `call_timeout` the call runs as a task of its own, as [`Link::call`] does.
    pub fn call_then<F>(&self, op: u16, payload: Bytes, done: F)
    where
        F: FnOnce(Result<Bytes, CallError>) + Send + 'static,
    {
        if let Err(e) = self.inner.check_size(&payload) {
            return done(Err(e));
        }
        if self.inner.opts.call_timeout.is_some() {
            let link = self.clone();
            self.inner
                .rt
                .spawn(async move { done(link.call(op, payload).await) });
            return;
        }
        let id = match self.inner.register_then(Box::new(done)) {
            Ok(id) => id,
            Err((done, e)) => return done(Err(e)),
        };
        self.inner
            .stats
            .requests_out
            .fetch_add(1, Ordering::Relaxed);
        let frame = Frame::new(Kind::Request, op, id, payload);
        if self.inner.bypass(&frame) {
            return;
        }
        self.inner.queued.fetch_add(1, Ordering::SeqCst);
        match self.inner.out.try_send(frame) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(frame)) => {
                // A full queue: a task waits for room, as `call` would have.
                self.inner.queued.fetch_sub(1, Ordering::SeqCst);
                let inner = self.inner.clone();
                self.inner.rt.spawn(async move {
                    if let Err(e) = inner.send(frame).await {
                        inner.fail_unsent(id, e);
                    }
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.inner.queued.fetch_sub(1, Ordering::SeqCst);
                self.inner
                    .fail_unsent(id, CallError::Closed(self.inner.close_reason()));
            }
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

fn start<R, W>(inner: &Arc<Inner>, r: R, w: W, rx: Outgoing, service: Arc<dyn Service>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    if let Ok(mut slot) = inner.wr.try_lock() {
        *slot = Some(BufWriter::with_capacity(
            WRITE_BUF,
            Box::new(w) as BoxedWrite,
        ));
    }
    tokio::spawn(reader(inner.clone(), r, service));
    tokio::spawn(writer(inner.clone(), rx));
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
        Kind::Stream(k) => handle_stream_frame(inner, k, frame, service),
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

/// The writer's two queues.
struct Outgoing {
    data: mpsc::Receiver<Frame>,
    ctrl: mpsc::UnboundedReceiver<Frame>,
}

impl Outgoing {
    /// The next frame, control frames first; `None` when both queues are closed.
    async fn recv(&mut self) -> Option<Frame> {
        tokio::select! {
            biased;
            Some(f) = self.ctrl.recv() => Some(f),
            Some(f) = self.data.recv() => Some(f),
            else => None,
        }
    }

    fn try_recv(&mut self) -> Option<Frame> {
        self.ctrl
            .try_recv()
            .ok()
            .or_else(|| self.data.try_recv().ok())
    }
}

async fn writer(inner: Arc<Inner>, mut rx: Outgoing) {
    // False while a frame is partly written: then no Goaway may follow it.
    let mut clean = true;
    let result = tokio::select! {
        _ = inner.closed.cancelled() => Ok(()),
        r = write_loop(&inner, &mut rx, &mut clean) => r,
    };
    if let Err(reason) = result {
        inner.close(CloseKind::Fault, reason);
    }
    let _ = tokio::time::timeout(GOAWAY_TIMEOUT, async {
        let mut guard = inner.wr.lock().await;
        let Some(w) = guard.as_mut() else {
            return;
        };
        if let (Some(reason), true) = (inner.local_close_reason(), clean) {
            let goaway = Frame::new(Kind::Goaway, 0, 0, Bytes::from(reason.into_bytes()));
            let _ = w.write_all(&goaway.header().encode()).await;
            let _ = w.write_all(&goaway.payload).await;
        }
        let _ = w.flush().await;
        let _ = w.shutdown().await;
        // The transport closes here; a late bypass finds no writer and queues (and fails).
        *guard = None;
    })
    .await;
}

async fn write_loop(inner: &Inner, rx: &mut Outgoing, clean: &mut bool) -> Result<(), String> {
    let stall = inner.opts.dead_after;
    let stalled = || {
        format!(
            "the peer stopped reading: a write made no progress for {} (dead_after)",
            humantime::format_duration(stall)
        )
    };
    loop {
        // A queued frame, or a flush the bypass left unfinished.
        let mut next = tokio::select! {
            f = rx.recv() => match f {
                // Inner owns a Sender, so the queue never reports closed while we run.
                None => return Ok(()),
                f => f,
            },
            _ = inner.flush_needed.notified() => {
                // Let the tasks already runnable append their frames first.
                tokio::task::yield_now().await;
                None
            }
        };
        let mut guard = inner.wr.lock().await;
        let Some(w) = guard.as_mut() else {
            return Ok(());
        };
        let mut batch = 0;
        while let Some(frame) = next.take() {
            *clean = false;
            let header = frame.header().encode();
            // One gathered write of header and payload: a frame larger than the buffer
            // goes to the socket in one system call instead of two or three.
            let mut out = Buf::chain(&header[..], frame.payload.clone());
            let write = w.write_all_buf(&mut out);
            match tokio::time::timeout(stall, write).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("write failed: {e}")),
                Err(_) => return Err(stalled()),
            }
            *clean = true;
            inner.queued.fetch_sub(1, Ordering::SeqCst);
            inner.stats.frames_queued.fetch_add(1, Ordering::Relaxed);
            inner
                .stats
                .bytes_out
                .fetch_add((HEADER_LEN + frame.payload.len()) as u64, Ordering::Relaxed);
            batch += 1;
            if batch < MAX_BATCH {
                next = rx.try_recv();
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

// ---------------------------------------------------------------------------------------
// Streams (docs/protocol.md §5.1).

/// Which side opened a stream. Each side numbers the streams it opens, so the pair
/// (origin, id) names a stream; frames carry the origin in `op` (see [`STREAM_FROM_ACCEPTOR`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// This side opened it.
    Local,
    /// The peer opened it.
    Remote,
}

impl Origin {
    /// The `op` of a frame this side sends on a stream of this origin.
    fn op(self) -> u16 {
        match self {
            Origin::Local => 0,
            Origin::Remote => STREAM_FROM_ACCEPTOR,
        }
    }

    /// The origin, from this side's view, of a stream named by a received frame's `op`.
    fn of_received(op: u16) -> Origin {
        if op == STREAM_FROM_ACCEPTOR {
            Origin::Local
        } else {
            Origin::Remote
        }
    }
}

#[derive(Default)]
struct Streams {
    /// Streams this side opened.
    local: HashMap<u64, StreamSlot>,
    /// Streams the peer opened.
    remote: HashMap<u64, StreamSlot>,
    /// Our opens waiting for Accept or Refuse.
    opening: HashMap<u64, oneshot::Sender<Result<Bytes, CallError>>>,
    /// Set by `Inner::close`: no stream may be added after it.
    closed: Option<String>,
}

impl Streams {
    fn map(&mut self, origin: Origin) -> &mut HashMap<u64, StreamSlot> {
        match origin {
            Origin::Local => &mut self.local,
            Origin::Remote => &mut self.remote,
        }
    }
}

/// The link's side of one stream.
struct StreamSlot {
    /// To the local [`StreamReader`]; unbounded because the peer's credit bounds it.
    events: mpsc::UnboundedSender<StreamEvent>,
    /// What the local [`StreamWriter`] may still send.
    credit: Arc<Credit>,
    /// Bytes the peer may still send before it needs more credit from us.
    recv_allowed: u64,
    /// Fin or Reset received.
    remote_done: bool,
    /// Fin or Reset sent.
    local_done: bool,
}

impl StreamSlot {
    fn new(window: u64) -> (StreamSlot, mpsc::UnboundedReceiver<StreamEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            StreamSlot {
                events: tx,
                credit: Arc::new(Credit::new(window)),
                recv_allowed: window,
                remote_done: false,
                local_done: false,
            },
            rx,
        )
    }

    /// Ends both local halves with `e`.
    fn abort(&self, e: &RemoteError) {
        let _ = self.events.send(StreamEvent::Reset(e.clone()));
        self.credit.close(e.clone());
    }
}

enum StreamEvent {
    Data(Bytes),
    Fin,
    Reset(RemoteError),
}

/// Send credit of one stream direction.
struct Credit {
    state: Mutex<(u64, Option<RemoteError>)>,
    /// One writer waits at a time; `notify_one` keeps a wake-up for it if it is not waiting yet.
    notify: tokio::sync::Notify,
}

impl Credit {
    fn new(window: u64) -> Credit {
        Credit {
            state: Mutex::new((window, None)),
            notify: tokio::sync::Notify::new(),
        }
    }

    fn add(&self, n: u64) {
        lock(&self.state).0 += n;
        self.notify.notify_one();
    }

    fn close(&self, e: RemoteError) {
        let mut st = lock(&self.state);
        if st.1.is_none() {
            st.1 = Some(e);
        }
        drop(st);
        self.notify.notify_one();
    }

    /// Takes between 1 and `max` bytes of credit, waiting while there is none.
    async fn take(&self, max: usize) -> Result<usize, RemoteError> {
        loop {
            let notified = self.notify.notified();
            {
                let mut st = lock(&self.state);
                if let Some(e) = &st.1 {
                    return Err(e.clone());
                }
                if st.0 > 0 {
                    let n = st.0.min(max as u64);
                    st.0 -= n;
                    // n <= max, a usize.
                    return Ok(n as usize);
                }
            }
            notified.await;
        }
    }
}

fn closed_error(inner: &Inner) -> RemoteError {
    RemoteError::new(
        libc::ECONNRESET,
        format!("link closed: {}", inner.close_reason()),
    )
}

/// Marks our side of a stream done (Fin or Reset sent) and forgets it once both are.
fn local_done(inner: &Inner, origin: Origin, id: u64) {
    let mut st = lock(&inner.streams);
    let map = st.map(origin);
    if let Some(slot) = map.get_mut(&id) {
        slot.local_done = true;
        if slot.remote_done {
            map.remove(&id);
        }
    }
}

/// Aborts a stream from this side: tells the peer (unless we already finished our part
/// with a Reset), ends both local halves and forgets it.
fn reset_stream(inner: &Inner, origin: Origin, id: u64, e: &RemoteError) {
    let slot = lock(&inner.streams).map(origin).remove(&id);
    if let Some(slot) = slot {
        if !(slot.local_done && slot.remote_done) {
            inner.send_ctrl(Frame::new(
                Kind::Stream(STREAM_RESET),
                origin.op(),
                id,
                encode_error(e.errno, &e.message),
            ));
        }
        slot.abort(e);
    }
}

fn handle_stream_frame(
    inner: &Arc<Inner>,
    kind: u8,
    frame: Frame,
    service: &Arc<dyn Service>,
) -> Result<(), (CloseKind, String)> {
    let fault = |what: String| (CloseKind::Fault, format!("protocol error: {what}"));
    let id = frame.id;
    match kind {
        STREAM_OPEN => {
            let window = inner.opts.stream_window as u64;
            let (slot, rx) = StreamSlot::new(window);
            let credit = slot.credit.clone();
            {
                let mut st = lock(&inner.streams);
                if st.closed.is_some() {
                    return Ok(());
                }
                if st.remote.contains_key(&id) {
                    return Err(fault(format!("stream id {id} reopened while still open")));
                }
                if st.local.len() + st.remote.len() >= inner.opts.max_streams {
                    drop(st);
                    inner.send_ctrl(Frame::new(
                        Kind::Stream(STREAM_REFUSE),
                        STREAM_FROM_ACCEPTOR,
                        id,
                        encode_error(
                            libc::EAGAIN,
                            &format!(
                                "the peer has {} streams open (max_streams): try again later",
                                inner.opts.max_streams
                            ),
                        ),
                    ));
                    return Ok(());
                }
                st.remote.insert(id, slot);
            }
            let incoming = IncomingStream {
                inner: inner.clone(),
                id,
                parts: Some((rx, credit)),
            };
            let op = frame.op;
            if std::panic::catch_unwind(AssertUnwindSafe(|| {
                service.open_stream(op, frame.payload, incoming)
            }))
            .is_err()
            {
                tracing::error!(op, "stream open handler panicked");
            }
            Ok(())
        }
        STREAM_ACCEPT | STREAM_REFUSE => {
            let result = if kind == STREAM_ACCEPT {
                Ok(frame.payload)
            } else {
                let (errno, message) =
                    decode_error(&frame.payload).map_err(|e| fault(e.to_string()))?;
                Err(CallError::Remote(RemoteError { errno, message }))
            };
            let refused = result.is_err();
            let waiter = {
                let mut st = lock(&inner.streams);
                let w = st.opening.remove(&id);
                if refused {
                    st.local.remove(&id);
                }
                w
            };
            match waiter {
                Some(tx) => {
                    // The opener may have given up between our check and now.
                    let gone = tx.send(result).is_err();
                    if gone && !refused {
                        reset_stream(
                            inner,
                            Origin::Local,
                            id,
                            &RemoteError::new(libc::ECANCELED, "opener gave up"),
                        );
                    }
                }
                None if !refused => {
                    // The opener gave up before the answer came: tell the acceptor.
                    inner.send_ctrl(Frame::new(
                        Kind::Stream(STREAM_RESET),
                        Origin::Local.op(),
                        id,
                        encode_error(libc::ECANCELED, "the opener gave up"),
                    ));
                }
                None => {}
            }
            Ok(())
        }
        STREAM_DATA => {
            let origin = Origin::of_received(frame.op);
            let mut st = lock(&inner.streams);
            // Unknown: a stream we reset while its data was in flight. Ignored.
            if let Some(slot) = st.map(origin).get_mut(&id) {
                let len = frame.payload.len() as u64;
                if slot.remote_done {
                    return Err(fault(format!("data on stream {id} after its fin")));
                }
                if len > slot.recv_allowed {
                    return Err(fault(format!(
                        "the peer sent {len} bytes on stream {id} with only {} bytes of credit",
                        slot.recv_allowed
                    )));
                }
                slot.recv_allowed -= len;
                let _ = slot.events.send(StreamEvent::Data(frame.payload));
            }
            Ok(())
        }
        STREAM_CREDIT => {
            let n = decode_credit(&frame.payload).map_err(|e| fault(e.to_string()))?;
            let origin = Origin::of_received(frame.op);
            if let Some(slot) = lock(&inner.streams).map(origin).get(&id) {
                slot.credit.add(u64::from(n));
            }
            Ok(())
        }
        STREAM_FIN => {
            let origin = Origin::of_received(frame.op);
            let mut st = lock(&inner.streams);
            let map = st.map(origin);
            if let Some(slot) = map.get_mut(&id) {
                slot.remote_done = true;
                let _ = slot.events.send(StreamEvent::Fin);
                if slot.local_done {
                    map.remove(&id);
                }
            }
            Ok(())
        }
        STREAM_RESET => {
            let (errno, message) =
                decode_error(&frame.payload).map_err(|e| fault(e.to_string()))?;
            let origin = Origin::of_received(frame.op);
            let slot = {
                let mut st = lock(&inner.streams);
                if origin == Origin::Local {
                    st.opening.remove(&id);
                }
                st.map(origin).remove(&id)
            };
            if let Some(slot) = slot {
                slot.abort(&RemoteError { errno, message });
            }
            Ok(())
        }
        k => Err(fault(format!(
            "stream frame kind 0x{k:02x} is not assigned in this version"
        ))),
    }
}

/// A stream the peer opened, waiting for this side's answer. Dropping it refuses the stream.
pub struct IncomingStream {
    inner: Arc<Inner>,
    id: u64,
    parts: Option<(mpsc::UnboundedReceiver<StreamEvent>, Arc<Credit>)>,
}

impl std::fmt::Debug for IncomingStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingStream")
            .field("id", &self.id)
            .finish()
    }
}

impl IncomingStream {
    /// Accepts the stream, sending `payload` as the answer, and returns its two halves.
    pub fn accept(mut self, payload: Bytes) -> (StreamReader, StreamWriter) {
        self.inner.send_ctrl(Frame::new(
            Kind::Stream(STREAM_ACCEPT),
            STREAM_FROM_ACCEPTOR,
            self.id,
            payload,
        ));
        let (rx, credit) = match self.parts.take() {
            Some(p) => p,
            // Not reachable: `parts` is only taken here and in Drop.
            None => {
                let (slot, rx) = StreamSlot::new(0);
                slot.abort(&closed_error(&self.inner));
                (rx, slot.credit)
            }
        };
        halves(&self.inner, Origin::Remote, self.id, rx, credit)
    }

    /// Refuses the stream; the opener gets `e` (errno kept).
    pub fn refuse(mut self, e: RemoteError) {
        self.parts = None;
        self.refuse_with(&e);
    }

    fn refuse_with(&self, e: &RemoteError) {
        lock(&self.inner.streams).remote.remove(&self.id);
        self.inner.send_ctrl(Frame::new(
            Kind::Stream(STREAM_REFUSE),
            STREAM_FROM_ACCEPTOR,
            self.id,
            encode_error(e.errno, &e.message),
        ));
    }
}

impl Drop for IncomingStream {
    fn drop(&mut self) {
        if self.parts.take().is_some() {
            self.refuse_with(&RemoteError::new(
                libc::ECONNREFUSED,
                "the stream was not accepted",
            ));
        }
    }
}

fn halves(
    inner: &Arc<Inner>,
    origin: Origin,
    id: u64,
    rx: mpsc::UnboundedReceiver<StreamEvent>,
    credit: Arc<Credit>,
) -> (StreamReader, StreamWriter) {
    let chunk = STREAM_CHUNK.min(inner.opts.max_payload());
    (
        StreamReader {
            inner: inner.clone(),
            origin,
            id,
            rx,
            unacked: 0,
            done: false,
        },
        StreamWriter {
            inner: inner.clone(),
            origin,
            id,
            credit,
            chunk,
            done: false,
        },
    )
}

/// The receiving half of a stream. Dropping it before the peer's fin resets the stream.
pub struct StreamReader {
    inner: Arc<Inner>,
    origin: Origin,
    id: u64,
    rx: mpsc::UnboundedReceiver<StreamEvent>,
    /// Bytes handed out but not yet credited back to the peer.
    unacked: u64,
    /// Fin or reset seen.
    done: bool,
}

impl std::fmt::Debug for StreamReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReader")
            .field("id", &self.id)
            .finish()
    }
}

impl StreamReader {
    /// The next bytes; `Ok(None)` once the peer finished its side (fin), `Err` when the stream
    /// was reset or the link closed. Taking bytes grants the peer credit for them, so call
    /// this only when ready to pass them on.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, RemoteError> {
        self.grant(false);
        let ev = self.rx.recv().await;
        self.event(ev)
    }

    /// Like [`StreamReader::recv`], without waiting: `None` when nothing is queued.
    pub fn try_recv(&mut self) -> Option<Result<Option<Bytes>, RemoteError>> {
        self.grant(false);
        match self.rx.try_recv() {
            Ok(ev) => Some(self.event(Some(ev))),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => Some(self.event(None)),
        }
    }

    fn event(&mut self, ev: Option<StreamEvent>) -> Result<Option<Bytes>, RemoteError> {
        match ev {
            Some(StreamEvent::Data(b)) => {
                self.unacked += b.len() as u64;
                Ok(Some(b))
            }
            Some(StreamEvent::Fin) => {
                self.done = true;
                Ok(None)
            }
            Some(StreamEvent::Reset(e)) => {
                self.done = true;
                Err(e)
            }
            None if self.done => Ok(None),
            None => {
                self.done = true;
                Err(closed_error(&self.inner))
            }
        }
    }

    /// Sends the credit handed out so far once it is worth a frame (a quarter window), or
    /// always with `force`.
    fn grant(&mut self, force: bool) {
        let window = self.inner.opts.stream_window as u64;
        if self.done || self.unacked == 0 || (!force && self.unacked < window / 4) {
            return;
        }
        let n = self.unacked;
        self.unacked = 0;
        {
            let mut st = lock(&self.inner.streams);
            match st.map(self.origin).get_mut(&self.id) {
                Some(slot) if !slot.remote_done => slot.recv_allowed += n,
                _ => return,
            }
        }
        self.inner.send_ctrl(Frame::new(
            Kind::Stream(STREAM_CREDIT),
            self.origin.op(),
            self.id,
            // n <= stream_window <= u32::MAX (normalized).
            encode_credit(u32::try_from(n).unwrap_or(u32::MAX)),
        ));
    }
}

impl Drop for StreamReader {
    fn drop(&mut self) {
        if !self.done {
            reset_stream(
                &self.inner,
                self.origin,
                self.id,
                &RemoteError::new(libc::ECONNRESET, "the receiving side closed the connection"),
            );
        }
    }
}

/// The sending half of a stream. Dropping it without [`StreamWriter::finish`] resets the
/// stream.
pub struct StreamWriter {
    inner: Arc<Inner>,
    origin: Origin,
    id: u64,
    credit: Arc<Credit>,
    chunk: usize,
    /// Fin or reset sent.
    done: bool,
}

impl std::fmt::Debug for StreamWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamWriter")
            .field("id", &self.id)
            .finish()
    }
}

impl StreamWriter {
    /// Sends `data`, waiting for credit as needed; large buffers leave as several frames.
    /// Fails when the stream was reset or the link closed.
    pub async fn send(&mut self, mut data: Bytes) -> Result<(), RemoteError> {
        if self.inner.closed.is_cancelled() {
            return Err(closed_error(&self.inner));
        }
        while !data.is_empty() {
            let n = self.credit.take(data.len().min(self.chunk)).await?;
            let part = data.split_to(n);
            let frame = Frame::new(Kind::Stream(STREAM_DATA), self.origin.op(), self.id, part);
            if self.inner.send(frame).await.is_err() {
                return Err(closed_error(&self.inner));
            }
        }
        Ok(())
    }

    /// Largest payload one frame of this stream carries (callers batching records use it).
    pub fn max_chunk(&self) -> usize {
        self.chunk
    }

    /// Ends this direction (half-close): the peer's reader sees `Ok(None)` after the data.
    pub async fn finish(&mut self) -> Result<(), RemoteError> {
        if self.done {
            return Ok(());
        }
        // A closing link must not look like a clean end of stream to the peer: a fin that
        // raced with the close (queued after it) would turn a broken connection into EOF.
        if self.inner.closed.is_cancelled() {
            return Err(closed_error(&self.inner));
        }
        let frame = Frame::new(
            Kind::Stream(STREAM_FIN),
            self.origin.op(),
            self.id,
            Bytes::new(),
        );
        if self.inner.send(frame).await.is_err() {
            return Err(closed_error(&self.inner));
        }
        self.done = true;
        local_done(&self.inner, self.origin, self.id);
        Ok(())
    }

    /// Aborts the stream in both directions; the peer sees `e` (errno kept).
    pub fn reset(mut self, e: RemoteError) {
        self.done = true;
        reset_stream(&self.inner, self.origin, self.id, &e);
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        if !self.done {
            reset_stream(
                &self.inner,
                self.origin,
                self.id,
                &RemoteError::new(libc::ECONNRESET, "the sending side closed the connection"),
            );
        }
    }
}

/// Removes an open's bookkeeping if its future ends before the answer, and resets the
/// stream if the peer accepts it later.
struct OpenGuard<'a> {
    inner: &'a Inner,
    id: u64,
    armed: bool,
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let had = {
                let mut st = lock(&self.inner.streams);
                st.opening.remove(&self.id);
                st.local.remove(&self.id).is_some()
            };
            if had && !self.inner.closed.is_cancelled() {
                self.inner.send_ctrl(Frame::new(
                    Kind::Stream(STREAM_RESET),
                    Origin::Local.op(),
                    self.id,
                    encode_error(libc::ECANCELED, "the opener gave up"),
                ));
            }
        }
    }
}

impl Link {
    /// Opens a stream served by the peer's [`Service::open_stream`] for `op`; `payload` is the
    /// open request. Returns the peer's answer and the stream's halves, or the peer's refusal
    /// (errno kept). Waits at most `call_timeout` when one is set.
    pub async fn open_stream(
        &self,
        op: u16,
        payload: Bytes,
    ) -> Result<(Bytes, StreamReader, StreamWriter), CallError> {
        let inner = &self.inner;
        let max = inner.opts.max_payload();
        if payload.len() > max {
            return Err(CallError::TooLarge {
                len: payload.len(),
                max,
            });
        }
        let id = inner.next_stream.fetch_add(1, Ordering::Relaxed);
        let (slot, rx) = StreamSlot::new(inner.opts.stream_window as u64);
        let credit = slot.credit.clone();
        let (tx, answer) = oneshot::channel();
        {
            let mut st = lock(&inner.streams);
            if let Some(reason) = &st.closed {
                return Err(CallError::Closed(reason.clone()));
            }
            st.local.insert(id, slot);
            st.opening.insert(id, tx);
        }
        let mut guard = OpenGuard {
            inner,
            id,
            armed: true,
        };
        inner
            .send(Frame::new(Kind::Stream(STREAM_OPEN), op, id, payload))
            .await?;
        let answer = match inner.opts.call_timeout {
            Some(t) => match tokio::time::timeout(t, answer).await {
                Ok(a) => a,
                Err(_) => return Err(CallError::Timeout),
            },
            None => answer.await,
        };
        let accepted = match answer {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                guard.armed = false;
                return Err(e);
            }
            Err(_) => return Err(CallError::Closed(inner.close_reason())),
        };
        guard.armed = false;
        let (r, w) = halves(inner, Origin::Local, id, rx, credit);
        Ok((accepted, r, w))
    }

    /// Streams currently open on this link (both directions), for leak checks and status.
    pub fn open_streams(&self) -> usize {
        let st = lock(&self.inner.streams);
        st.local.len() + st.remote.len()
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

        fn open_stream(&self, op: u16, _payload: Bytes, stream: IncomingStream) {
            Svc::stream(op, stream)
        }
    }

    /// Streams: op 1 echoes (fin after the opener's fin), op 2 is refused with EACCES, op 3 is
    /// accepted and never read (a stalled consumer), kept in `STALLED` until the test ends.
    impl Svc {
        fn stream(op: u16, stream: IncomingStream) {
            match op {
                1 => {
                    tokio::spawn(async move {
                        let (mut r, mut w) = stream.accept(Bytes::from_static(b"ok"));
                        while let Ok(Some(b)) = r.recv().await {
                            if w.send(b).await.is_err() {
                                return;
                            }
                        }
                        let _ = w.finish().await;
                    });
                }
                2 => stream.refuse(RemoteError::new(libc::EACCES, "not on the allowlist")),
                _ => {
                    let halves = stream.accept(Bytes::new());
                    STALLED.lock().unwrap().push(halves);
                }
            }
        }
    }

    static STALLED: Mutex<Vec<(StreamReader, StreamWriter)>> = Mutex::new(Vec::new());

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

    /// `call_then` from plain threads outside the runtime (as the FUSE session threads call
    /// it): every answer reaches its own callback exactly once, errnos survive, a panicking
    /// callback costs nothing else, and calls pending at a close (or made after it) fail
    /// with `Closed` instead of never answering.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn call_then_from_plain_threads_answers_every_call_once() {
        type Answer = (String, Result<Bytes, CallError>);
        let (a, _b, _) = pair(LinkOptions::default());
        let (tx, mut rx) = mpsc::unbounded_channel::<Answer>();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (a, tx) = (a.clone(), tx.clone());
                std::thread::spawn(move || {
                    for i in 0..500 {
                        let msg = format!("{t}-{i}");
                        let tx = tx.clone();
                        let sent = msg.clone();
                        a.call_then(1, Bytes::from(msg), move |r| {
                            let _ = tx.send((sent, r));
                        });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2000 {
            let (sent, r) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("an answer is missing")
                .unwrap();
            assert_eq!(r.unwrap(), sent.as_bytes());
            assert!(seen.insert(sent), "an answer came twice");
        }

        let answer = |op: u16| {
            let (tx, rx) = oneshot::channel();
            a.call_then(op, Bytes::new(), move |r| {
                let _ = tx.send(r);
            });
            rx
        };
        assert_eq!(answer(3).await.unwrap().unwrap_err().errno(), libc::EACCES);
        a.call_then(1, Bytes::new(), |_| {
            panic!("a callback panics (expected in this test)")
        });
        assert_eq!(a.call(1, Bytes::from_static(b"up")).await.unwrap(), "up");
        let pending = answer(2);
        tokio::time::sleep(Duration::from_millis(50)).await;
        a.close();
        assert!(matches!(pending.await.unwrap(), Err(CallError::Closed(_))));
        assert!(matches!(
            answer(1).await.unwrap(),
            Err(CallError::Closed(_))
        ));
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

    async fn read_all(r: &mut StreamReader) -> Result<Vec<u8>, RemoteError> {
        let mut v = Vec::new();
        while let Some(b) = r.recv().await? {
            v.extend_from_slice(&b);
        }
        Ok(v)
    }

    #[tokio::test]
    async fn stream_echo_with_half_close_both_ways() {
        let opts = LinkOptions {
            stream_window: 64 * 1024,
            ..LinkOptions::default()
        };
        let (a, b, _) = pair(opts);
        for link in [&a, &b] {
            let (answer, mut r, mut w) = link
                .open_stream(1, Bytes::from_static(b"hi"))
                .await
                .unwrap();
            assert_eq!(&answer[..], b"ok");
            // Much more than the window: flow control must keep it moving, bytes in order.
            let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
            let sent = data.clone();
            let writer = tokio::spawn(async move {
                for c in sent.chunks(100_000) {
                    w.send(Bytes::copy_from_slice(c)).await.unwrap();
                }
                w.finish().await.unwrap();
            });
            let got = read_all(&mut r).await.unwrap();
            writer.await.unwrap();
            assert_eq!(got.len(), data.len());
            assert!(got == data, "bytes lost or reordered");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(a.open_streams(), 0, "finished streams are forgotten");
        assert_eq!(b.open_streams(), 0);
    }

    /// Small frames go out from the calling task (the bypass) while large ones queue, over a
    /// transport so small that flushes often stay pending: from many tasks on several
    /// threads, every stream keeps its bytes in order and every call gets its own answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 3)]
    async fn bypassed_and_queued_frames_keep_order_under_pressure() {
        let a = order_under_pressure(LinkOptions::default()).await;
        assert_eq!(a.inner.stats.frames_coalesced.load(Ordering::Relaxed), 0);
    }

    /// The same with coalesced writes (udsproxyd's links): bypassed frames wait in the buffer
    /// for the writer's shared flush, and none is lost, reordered or left unflushed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 3)]
    async fn coalesced_frames_keep_order_under_pressure() {
        let opts = LinkOptions {
            coalesce_writes: true,
            ..LinkOptions::default()
        };
        let a = order_under_pressure(opts).await;
        let coalesced = a.inner.stats.frames_coalesced.load(Ordering::Relaxed);
        assert!(coalesced > 0, "no frame was coalesced");
    }

    /// A lone call on a quiet coalescing link is flushed at once: its answer arrives although
    /// nothing else is ever written (a frame left for a flush that never comes would hang).
    #[tokio::test]
    async fn a_lone_call_on_a_coalescing_link_is_not_held_back() {
        let opts = LinkOptions {
            coalesce_writes: true,
            ..LinkOptions::default()
        };
        let (x, y) = tokio::io::duplex(1 << 16);
        let svc = Arc::new(Svc {
            dropped: Arc::new(AtomicBool::new(false)),
        });
        let a = Link::spawn(x, peer("b"), svc.clone(), opts.clone());
        let _b = Link::spawn(y, peer("a"), svc, opts);
        for i in 0..20u32 {
            let body = Bytes::from(format!("ping {i}"));
            let answer = tokio::time::timeout(Duration::from_secs(5), a.call(1, body.clone()))
                .await
                .expect("the answer came")
                .unwrap();
            assert_eq!(answer, body);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Runs the pressure workload over one link with `opts`; returns the sending side.
    async fn order_under_pressure(opts: LinkOptions) -> Link {
        let (x, y) = tokio::io::duplex(4096);
        let svc = |_| {
            Arc::new(Svc {
                dropped: Arc::new(AtomicBool::new(false)),
            })
        };
        let a = Link::spawn(x, peer("b"), svc(()), opts.clone());
        let _b = Link::spawn(y, peer("a"), svc(()), opts);
        let mut tasks = Vec::new();
        for s in 0..4u32 {
            let a = a.clone();
            tasks.push(tokio::spawn(async move {
                let (_, mut r, mut w) = a.open_stream(1, Bytes::new()).await.unwrap();
                // Sizes from 1 byte (bypass) to ~95 KB (beyond the write buffer: queued).
                let data: Vec<u8> = (0..400_000u32).map(|i| (i * (s + 3) % 251) as u8).collect();
                let sent = data.clone();
                let writer = tokio::spawn(async move {
                    let mut off = 0;
                    for n in pressure_sizes(sent.len()) {
                        w.send(Bytes::copy_from_slice(&sent[off..off + n]))
                            .await
                            .unwrap();
                        off += n;
                    }
                    w.finish().await.unwrap();
                });
                let got = read_all(&mut r).await.unwrap();
                writer.await.unwrap();
                assert!(got == data, "stream {s}: bytes lost or reordered");
            }));
        }
        for c in 0..8u32 {
            let a = a.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..200u32 {
                    let body = format!("call {c}/{i}").repeat((i % 7 + 1) as usize);
                    let answer = a.call(1, Bytes::from(body.clone())).await.unwrap();
                    assert_eq!(&answer[..], body.as_bytes());
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(!a.is_closed());
        let bypassed = a.inner.stats.frames_bypassed.load(Ordering::Relaxed);
        let queued = a.inner.stats.frames_queued.load(Ordering::Relaxed);
        // Frames that cannot fit the write buffer never take the bypass: a floor that does
        // not depend on scheduling (the rest of the split does, and varies under load).
        let must_queue = 4 * pressure_sizes(400_000)
            .iter()
            .filter(|&&n| HEADER_LEN + n > WRITE_BUF)
            .count() as u64;
        assert!(
            must_queue >= 8,
            "the test must send frames beyond the buffer"
        );
        assert!(
            bypassed > 100 && queued >= must_queue,
            "bypassed {bypassed}, queued {queued}, must_queue {must_queue}"
        );
        a
    }

    /// Frame sizes summing to `total`: mostly small (bypass candidates), every fourth larger
    /// than the write buffer (always queued). One stream's total stays below the default
    /// stream window, so no frame is split by waiting for credit.
    fn pressure_sizes(total: usize) -> Vec<usize> {
        let mut sizes = Vec::new();
        let (mut off, mut k) = (0, 1usize);
        while off < total {
            let n = if k % 4 == 0 {
                WRITE_BUF + k * 997 % 30_000
            } else {
                (k * k * 37 % 8_000).max(1)
            };
            let n = n.min(total - off);
            sizes.push(n);
            off += n;
            k += 1;
        }
        sizes
    }

    #[tokio::test]
    async fn refused_stream_keeps_errno() {
        let (a, _b, _) = pair(LinkOptions::default());
        match a.open_stream(2, Bytes::new()).await {
            Err(CallError::Remote(e)) => assert_eq!(e.errno, libc::EACCES),
            other => panic!("expected EACCES, got {:?}", other.map(|x| x.0)),
        }
        let (a2, _b2) = {
            let (x, y) = tokio::io::duplex(1 << 16);
            (
                Link::spawn(x, peer("b"), Arc::new(NoService), LinkOptions::default()),
                Link::spawn(y, peer("a"), Arc::new(NoService), LinkOptions::default()),
            )
        };
        let e = a2.open_stream(9, Bytes::new()).await.unwrap_err();
        assert_eq!(e.errno(), libc::ENOSYS, "{e}");
        assert_eq!(a.open_streams(), 0);
    }

    #[tokio::test]
    async fn stalled_stream_does_not_stall_others_and_stays_bounded() {
        let window = 32 * 1024;
        let opts = LinkOptions {
            stream_window: window,
            ..LinkOptions::default()
        };
        let (a, _b, _) = pair(opts);
        let (_, _stalled_r, mut stalled_w) = a.open_stream(3, Bytes::new()).await.unwrap();
        // The stalled stream takes exactly one window, then its writer waits for credit.
        let blocked = tokio::time::timeout(
            Duration::from_millis(300),
            stalled_w.send(Bytes::from(vec![7u8; 4 * window])),
        )
        .await;
        assert!(
            blocked.is_err(),
            "a writer must wait when the peer grants no credit"
        );
        // Other streams still flow.
        let (_, mut r, mut w) = a.open_stream(1, Bytes::new()).await.unwrap();
        let writer = tokio::spawn(async move {
            w.send(Bytes::from(vec![1u8; 10 * window])).await.unwrap();
            w.finish().await.unwrap();
        });
        let got = tokio::time::timeout(Duration::from_secs(10), read_all(&mut r)).await;
        assert_eq!(got.expect("other streams flow").unwrap().len(), 10 * window);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn reset_and_link_close_end_streams_with_errors() {
        let (a, b, _) = pair(LinkOptions::default());
        // Dropping a writer without finish resets: the echo side's reader sees an error, so
        // its writer is dropped too and our reader sees the reset.
        let (_, mut r, w) = a.open_stream(1, Bytes::new()).await.unwrap();
        w.reset(RemoteError::new(libc::EPIPE, "gone"));
        assert!(r.recv().await.is_err());
        // A link close ends every stream's halves with ECONNRESET.
        let (_, mut r, mut w) = a.open_stream(1, Bytes::new()).await.unwrap();
        b.close();
        let e = r.recv().await.unwrap_err();
        assert_eq!(e.errno, libc::ECONNRESET, "{e}");
        assert!(w.send(Bytes::from_static(b"x")).await.is_err());
        assert!(a.open_stream(1, Bytes::new()).await.is_err());
        assert_eq!(a.open_streams(), 0);
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
