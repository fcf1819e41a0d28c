//! `rexec_server`: accepts rexec sessions and runs the requested programs locally.
//!
//! One connection is one session ([`super::proto`]). A session is authenticated first
//! (SO_PEERCRED on the Unix socket: root or the server's own uid; the PSK handshake on
//! TCP/vsock), then its `Start` goes through [`whitelist::check`] — the one allow decision —
//! and the program is spawned without a shell, in its own process group (its own session
//! with a pty). If the client goes away before the program ends, the whole group gets
//! SIGTERM and, after the grace period, SIGKILL: nothing is left running.
//!
//! Admission has two stages. A new connection is *pending* until it has authenticated and
//! sent its first message, within 10 s (`START_TIMEOUT`); at most 64 (`MAX_PENDING`) are pending,
//! and one more evicts the oldest (`Pending`), so connections that never speak cannot shut
//! clients out. Only then does a `Start` take one of `--max-sessions` slots, waiting for one
//! while the server is full: the limit counts authenticated, running sessions only.
//!
//! Concurrency: [`run`] accepts on every listener and spawns one task per connection, tracked
//! by a `TaskTracker` so shutdown waits for them; a semaphore caps running sessions. In a
//! session, the frame loop (socket reader) owns the child; one task pumps each output stream
//! and one writes stdin, so the frame loop is never blocked and always sees `Signal`. All
//! writers share the socket's write half through an async mutex (each frame is written
//! whole under the lock). The [`Registry`] (session list for the control socket) is a
//! `std::sync::Mutex` held only to copy or insert entries.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use clap::Parser;
use futures::StreamExt;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::proto::{self, data_header, op, ExitStatus, Msg, Rlimit, Start, CHUNK, STDIN_WINDOW};
use super::pty::{self, PtyMaster};
use super::whitelist::{self, Policy, Whitelist};
use crate::daemon::logging::Throttle;
use crate::daemon::runner::{self, CommonArgs, Daemon, StartError, StatusSource};
use crate::daemon::status::{PeerStatus, SessionStatus};
use crate::wire::frame::FrameDecoder;
use crate::wire::{handshake, Addr, Auth, Hello, Listener, Role, Stream};

/// How long a new connection may take to authenticate and send its `Start`.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections at most between accept and their first message. A client needs one round
/// trip or two for that, so 64 leave room for a burst of clients; a 65th connection evicts
/// the oldest pending one, which to be a client would have had to finish long ago.
const MAX_PENDING: usize = 64;

/// What the server needs to serve sessions.
#[derive(Debug)]
pub struct ServerConfig {
    /// The rexec whitelist; `None` (`--no-whitelist`): every command may run.
    pub whitelist: Option<Policy>,
    /// Between SIGTERM and SIGKILL when a session's client goes away.
    pub kill_grace: Duration,
    /// Sessions running at once; more wait for a slot (connections still authenticating do
    /// not count: see the module documentation).
    pub max_sessions: usize,
    /// Authentication on TCP/vsock listeners (Unix listeners use SO_PEERCRED).
    pub auth: Option<Auth>,
}

/// One running session, as listed on the control socket.
struct Entry {
    argv: Vec<String>,
    local_pid: Option<u32>,
    remote_pid: u32,
    started_unix: u64,
    peer: String,
    bytes_in: Arc<AtomicU64>,
    bytes_out: Arc<AtomicU64>,
}

/// Running sessions and counters; the server's [`StatusSource`].
#[derive(Default)]
pub struct Registry {
    sessions: Mutex<HashMap<u64, Entry>>,
    next_id: AtomicU64,
    listen: Mutex<Vec<String>>,
    started: AtomicU64,
    refused: AtomicU64,
    auth_failures: AtomicU64,
    failed: AtomicU64,
    /// Authenticated `Start`s waiting for a session slot (a gauge).
    waiting: AtomicU64,
    /// Pending connections evicted by newer ones.
    evicted: AtomicU64,
    /// When "session limit reached" was last logged.
    limit_logged: Throttle<()>,
    /// When "too many pending connections" was last logged.
    pending_logged: Throttle<()>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    /// Records the addresses the server listens on (for status).
    pub fn set_listen(&self, addrs: Vec<String>) {
        *self.listen.lock().unwrap_or_else(|p| p.into_inner()) = addrs;
    }

    fn insert(&self, e: Entry) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, e);
        id
    }

    fn remove(&self, id: u64) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    fn pid_of(&self, id: u64) -> Option<u32> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .map(|e| e.remote_pid)
    }

    /// True when `pid` is the program of one of our running sessions.
    fn runs_pid(&self, pid: u32) -> bool {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|e| e.remote_pid == pid)
    }

    /// Number of running sessions.
    pub fn len(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// True when no session runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl StatusSource for Registry {
    fn listen(&self) -> Vec<String> {
        self.listen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    fn peers(&self) -> Vec<PeerStatus> {
        Vec::new()
    }
    fn counters(&self) -> BTreeMap<String, u64> {
        let mut c = BTreeMap::new();
        c.insert(
            "sessions_started".into(),
            self.started.load(Ordering::Relaxed),
        );
        c.insert(
            "sessions_refused".into(),
            self.refused.load(Ordering::Relaxed),
        );
        c.insert(
            "sessions_failed".into(),
            self.failed.load(Ordering::Relaxed),
        );
        c.insert(
            "auth_failures".into(),
            self.auth_failures.load(Ordering::Relaxed),
        );
        c.insert("sessions_running".into(), self.len() as u64);
        c.insert(
            "sessions_waiting".into(),
            self.waiting.load(Ordering::Relaxed),
        );
        c.insert(
            "pending_evicted".into(),
            self.evicted.load(Ordering::Relaxed),
        );
        c
    }
    fn sessions(&self) -> Vec<SessionStatus> {
        let map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<SessionStatus> = map
            .iter()
            .map(|(id, e)| SessionStatus {
                id: *id,
                argv: e.argv.clone(),
                local_pid: e.local_pid,
                remote_pid: e.remote_pid,
                started_unix: e.started_unix,
                bytes_in: e.bytes_in.load(Ordering::Relaxed),
                bytes_out: e.bytes_out.load(Ordering::Relaxed),
                peer: e.peer.clone(),
            })
            .collect();
        v.sort_by_key(|s| s.id);
        v
    }
    fn kill_session(&self, id: u64, signal: i32) -> Result<(), String> {
        let pid = self
            .pid_of(id)
            .ok_or_else(|| format!("no running session {id}: list them with `dpuctl status`"))?;
        let sig = Signal::try_from(signal).map_err(|_| format!("{signal} is not a signal"))?;
        tracing::info!(session = id, pid, signal = %sig, "session killed from the control socket");
        kill(Pid::from_raw(pid as i32), sig).map_err(|e| format!("kill {pid}: {e}"))
    }
}

/// Serves sessions on `listeners` until `shutdown`; then ends every session (killing its
/// process group) and returns once all session tasks are done.
pub async fn run(
    listeners: Vec<Listener>,
    config: Arc<ServerConfig>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let admission = Arc::new(Admission {
        slots: Arc::new(Semaphore::new(config.max_sessions.max(1))),
        pending: Pending::default(),
    });
    for listener in listeners {
        let unix = matches!(listener.local_addr(), Addr::Unix(_));
        let (config, registry, shutdown, admission, t) = (
            config.clone(),
            registry.clone(),
            shutdown.clone(),
            admission.clone(),
            tracker.clone(),
        );
        tracker.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    a = listener.accept() => a,
                };
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Never wait here: the accept loop must keep taking connections so a full
                // server still authenticates clients (they then wait for a slot) and a flood
                // of silent connections evicts its own oldest rather than blocking anyone.
                let ticket = Admission::admit(&admission, &registry);
                let (config, registry, shutdown, admission) = (
                    config.clone(),
                    registry.clone(),
                    shutdown.clone(),
                    admission.clone(),
                );
                t.spawn(session(
                    stream, peer, unix, ticket, admission, config, registry, shutdown,
                ));
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// The two admission stages shared by every listener.
struct Admission {
    /// One permit per running session (`--max-sessions`); taken after authentication.
    slots: Arc<Semaphore>,
    /// Connections not yet authenticated or without their first message.
    pending: Pending,
}

/// Pending connections, oldest first, each with the token that evicts it.
#[derive(Default)]
struct Pending {
    /// Held only to push, pop or remove one entry.
    queue: Mutex<std::collections::VecDeque<(u64, CancellationToken)>>,
    next: AtomicU64,
}

impl Admission {
    /// Registers a new connection as pending, evicting the oldest pending one when
    /// [`MAX_PENDING`] are.
    fn admit(this: &Arc<Admission>, registry: &Registry) -> Ticket {
        let pending = &this.pending;
        let id = pending.next.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        let mut q = pending.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= MAX_PENDING {
            if let Some((_, oldest)) = q.pop_front() {
                oldest.cancel();
                registry.evicted.fetch_add(1, Ordering::Relaxed);
                if registry.pending_logged.due(()) {
                    tracing::warn!(
                        max = MAX_PENDING,
                        evicted = registry.evicted.load(Ordering::Relaxed),
                        "too many connections without a first message: evicting the oldest (a flood of idle connections?)"
                    );
                }
            }
        }
        q.push_back((id, token.clone()));
        Ticket {
            admission: this.clone(),
            id,
            token,
        }
    }
}

/// A connection's place among the pending ones; dropping it leaves the queue.
struct Ticket {
    admission: Arc<Admission>,
    id: u64,
    /// Cancelled when a newer connection evicts this one.
    token: CancellationToken,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let pending = &self.admission.pending;
        let mut q = pending.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = q.iter().position(|(id, _)| *id == self.id) {
            q.remove(i);
        }
    }
}

type Writer = Arc<tokio::sync::Mutex<crate::wire::addr::WriteHalf>>;
type Frames = FramedRead<crate::wire::addr::ReadHalf, FrameDecoder>;

/// Why a session ended abnormally (logged; the client has been told when it could be).
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("the client did not authenticate and send its first message within {START_TIMEOUT:?}")]
    Timeout,
    #[error(
        "evicted while pending: {MAX_PENDING} newer connections arrived before its first message"
    )]
    Evicted,
    #[error("the client closed the connection before starting a program")]
    NoStart,
    #[error("the client went away while waiting for a session slot")]
    GaveUp,
    #[error("rexec_server is shutting down")]
    Shutdown,
    #[error("protocol error: {0}")]
    Proto(#[from] proto::ProtoError),
    #[error("stdin window exceeded ({0} bytes unacknowledged): the client ignores flow control")]
    Window(u64),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[allow(clippy::too_many_arguments)]
async fn session(
    stream: Stream,
    peer: String,
    unix: bool,
    ticket: Ticket,
    admission: Arc<Admission>,
    config: Arc<ServerConfig>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) {
    let r = async {
        let opened = tokio::select! {
            r = tokio::time::timeout(START_TIMEOUT, open(stream, &peer, unix, &config)) => {
                r.map_err(|_| SessionError::Timeout).and_then(|r| r)
            }
            _ = ticket.token.cancelled() => Err(SessionError::Evicted),
            _ = shutdown.cancelled() => Err(SessionError::Shutdown),
        };
        drop(ticket);
        let (first, mut frames, writer) = opened?;
        match first {
            Msg::Start(start) => {
                let slot =
                    session_slot(&admission.slots, &mut frames, &config, &registry, &shutdown)
                        .await?;
                let r =
                    run_program(*start, frames, writer, &peer, &config, &registry, &shutdown).await;
                drop(slot);
                r
            }
            Msg::Kill { pid, signal } => {
                let reply = kill_request(&registry, pid, signal, &peer);
                reply.write_to(&mut *writer.lock().await).await?;
                Ok(())
            }
            other => {
                let msg = Msg::Error {
                    errno: libc::EPROTO,
                    message: "the first message must be Start or Kill".into(),
                };
                msg.write_to(&mut *writer.lock().await).await?;
                Err(SessionError::Io(std::io::Error::other(format!(
                    "unexpected first message {other:?}"
                ))))
            }
        }
    }
    .await;
    match r {
        Ok(()) | Err(SessionError::Shutdown) => {}
        Err(e @ SessionError::Auth(_)) => {
            registry.auth_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %peer, error = %e, "rexec connection refused");
        }
        // Counted and logged (rate-limited) where the eviction happened.
        Err(e @ SessionError::Evicted) => {
            tracing::debug!(peer = %peer, error = %e, "rexec connection dropped")
        }
        Err(e) => {
            registry.failed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(peer = %peer, error = %e, "rexec session ended abnormally");
        }
    }
}

/// Authenticates a new connection and reads its first message.
async fn open(
    mut stream: Stream,
    peer: &str,
    unix: bool,
    config: &ServerConfig,
) -> Result<(Msg, Frames, Writer), SessionError> {
    authenticate(&mut stream, peer, unix, config).await?;
    let (rd, wr) = stream.into_split();
    let writer: Writer = Arc::new(tokio::sync::Mutex::new(wr));
    // Room for a whole stdin frame from the start: a codec whose buffer begins small
    // reallocates to the exact size of each frame, and bulk stdin then moves about 15%
    // slower (measured). Untouched capacity costs no page faults.
    let mut frames = FramedRead::with_capacity(
        rd,
        FrameDecoder::new(proto::MAX_FRAME),
        CHUNK + 2 * crate::wire::frame::HEADER_LEN,
    );
    let first = match frames.next().await {
        None => return Err(SessionError::NoStart),
        Some(f) => Msg::from_frame(f.map_err(proto::ProtoError::from)?)?,
    };
    Ok((first, frames, writer))
}

/// A session slot for an authenticated `Start`, waiting for one while `--max-sessions`
/// sessions run. The client sends nothing until it hears `Started`, so anything arriving
/// meanwhile means it went away (or broke the protocol): then no program is started.
async fn session_slot(
    slots: &Arc<Semaphore>,
    frames: &mut Frames,
    config: &ServerConfig,
    registry: &Registry,
    shutdown: &CancellationToken,
) -> Result<tokio::sync::OwnedSemaphorePermit, SessionError> {
    if let Ok(p) = slots.clone().try_acquire_owned() {
        return Ok(p);
    }
    let waiting = registry.waiting.fetch_add(1, Ordering::Relaxed) + 1;
    if registry.limit_logged.due(()) {
        tracing::warn!(
            max_sessions = config.max_sessions,
            waiting,
            "session limit reached: new sessions wait for a running one to end"
        );
    }
    let r = tokio::select! {
        p = slots.clone().acquire_owned() => p.map_err(|_| SessionError::Shutdown),
        _ = shutdown.cancelled() => Err(SessionError::Shutdown),
        f = frames.next() => Err(match f {
            None | Some(Err(_)) => SessionError::GaveUp,
            Some(Ok(f)) => SessionError::Io(std::io::Error::other(format!(
                "message op {} before the program started", f.op
            ))),
        }),
    };
    registry.waiting.fetch_sub(1, Ordering::Relaxed);
    r
}

async fn authenticate(
    stream: &mut Stream,
    peer: &str,
    unix: bool,
    config: &ServerConfig,
) -> Result<(), SessionError> {
    if unix {
        let Stream::Unix(s) = &*stream else {
            return Err(SessionError::Auth("not a Unix socket".into()));
        };
        let cred = s
            .peer_cred()
            .map_err(|e| SessionError::Auth(format!("SO_PEERCRED: {e}")))?;
        let me = nix::unistd::geteuid().as_raw();
        if cred.uid() != 0 && cred.uid() != me {
            let msg = Msg::Error {
                errno: libc::EACCES,
                message: format!(
                    "uid {} may not use rexec_server (only root or uid {me})",
                    cred.uid()
                ),
            };
            let _ = msg.write_to(stream).await;
            return Err(SessionError::Auth(format!("uid {} refused", cred.uid())));
        }
        return Ok(());
    }
    let auth = config.auth.clone().unwrap_or(Auth::Insecure);
    if auth.is_insecure() {
        tracing::warn!(
            peer,
            "insecure mode: this rexec connection is NOT authenticated"
        );
    }
    let hello = Hello::new(Role::RexecServer);
    handshake::server(stream, peer, &auth, &hello, START_TIMEOUT)
        .await
        .map(drop)
        .map_err(|e| SessionError::Auth(e.to_string()))
}

/// `rexec --kill`: only processes this server started may be signalled.
fn kill_request(registry: &Registry, pid: u32, signal: i32, peer: &str) -> Msg {
    let err = |errno, message: String| Msg::Error { errno, message };
    let Ok(sig) = Signal::try_from(signal) else {
        return err(libc::EINVAL, format!("{signal} is not a signal number"));
    };
    if !registry.runs_pid(pid) {
        return err(
            libc::ESRCH,
            format!("no rexec session runs pid {pid} on the server"),
        );
    }
    tracing::info!(pid, signal = %sig, peer, "rexec --kill");
    match kill(Pid::from_raw(pid as i32), sig) {
        Ok(()) => Msg::Exit(ExitStatus::Code(0)),
        Err(e) => err(e as i32, format!("kill {pid}: {e}")),
    }
}

/// The child's stdio, by mode.
enum Stdio {
    Pipes {
        stdin: Option<tokio::process::ChildStdin>,
        stdout: Option<tokio::process::ChildStdout>,
        stderr: Option<tokio::process::ChildStderr>,
    },
    Pty(Arc<PtyMaster>),
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[allow(clippy::too_many_arguments)]
async fn run_program(
    start: Start,
    mut frames: Frames,
    writer: Writer,
    peer: &str,
    config: &ServerConfig,
    registry: &Arc<Registry>,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let argv_text: Vec<String> = start.argv.iter().map(|a| lossy(a)).collect();
    let mut cwd = PathBuf::from(OsStr::from_bytes(&start.cwd));
    if !cwd.is_absolute() || !cwd.is_dir() {
        // The client's directory often does not exist on this machine (a DPU path on the
        // HOST); run from / rather than fail, as a login shell would start in a fallback.
        tracing::debug!(cwd = %cwd.display(), "client cwd missing here; using /");
        cwd = PathBuf::from("/");
    }
    let client_path = start
        .env
        .iter()
        .find(|(k, _)| k == b"PATH")
        .map(|(_, v)| OsStr::from_bytes(v));
    let argv0 = start.argv.first().map(Vec::as_slice).unwrap_or_default();
    let prog = match whitelist::check(config.whitelist.as_ref(), argv0, client_path, &cwd) {
        Ok(p) => p,
        Err(refusal) => {
            registry.refused.fetch_add(1, Ordering::Relaxed);
            if let whitelist::Refusal::Whitelist(why) = &refusal {
                // Not one client's mistake: the server refuses everything until it is fixed.
                let file = config
                    .whitelist
                    .as_ref()
                    .map(|p| p.path().display().to_string());
                tracing::error!(whitelist = ?file, error = %why, peer, argv = ?argv_text,
                    "rexec whitelist unusable: refusing every command");
            }
            tracing::warn!(peer, argv = ?argv_text, reason = %refusal, "rexec command refused");
            let msg = Msg::Error {
                errno: refusal.errno(),
                message: refusal.to_string(),
            };
            msg.write_to(&mut *writer.lock().await).await?;
            return Ok(());
        }
    };

    let mut cmd = tokio::process::Command::new(&prog);
    cmd.arg0(OsStr::from_bytes(argv0))
        .args(start.argv.iter().skip(1).map(|a| OsStr::from_bytes(a)))
        .env_clear()
        .envs(
            start
                .env
                .iter()
                .map(|(k, v)| (OsStr::from_bytes(k), OsStr::from_bytes(v))),
        )
        .current_dir(&cwd);
    let umask = start.umask & 0o777;
    let rlimits = start.rlimits.clone();
    let tty = start.tty;
    let mut pty_master = None;
    if tty {
        let (master, slave) = pty::open(start.winsize)?;
        let out = slave.try_clone()?;
        let err = slave.try_clone()?;
        cmd.stdin(slave).stdout(out).stderr(err);
        pty_master = Some(master);
    } else {
        // An output the client has closed is a pipe without a reader from the start, so the
        // program's first write fails as it would locally, not only once a write of the
        // client's failed (by then the program has seen a few writes succeed).
        let output = |closed: bool| -> std::io::Result<std::process::Stdio> {
            if !closed {
                return Ok(std::process::Stdio::piped());
            }
            let (reader, writer) = nix::unistd::pipe().map_err(std::io::Error::from)?;
            drop(reader);
            Ok(writer.into())
        };
        cmd.stdin(std::process::Stdio::piped())
            .stdout(output(start.stdout_closed)?)
            .stderr(output(start.stderr_closed)?)
            .process_group(0);
    }
    // Without a pre-exec hook std spawns with posix_spawn (vfork semantics), much cheaper
    // than fork from this multi-threaded server; the hook is added only when the client's
    // umask or limits differ from what the child would inherit anyway.
    if tty || !inherits(umask, &rlimits) {
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (umask, setrlimit, setsid, ioctl); it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                libc::umask(umask as libc::mode_t);
                for r in &rlimits {
                    let lim = libc::rlimit {
                        rlim_cur: r.soft as libc::rlim_t,
                        rlim_max: r.hard as libc::rlim_t,
                    };
                    // Best effort: raising above this server's hard limit fails; the program
                    // then runs with the server's limit, as the client could not have had more.
                    libc::setrlimit(r.resource as _, &lim);
                }
                if tty {
                    // A new session whose controlling terminal is the pty on stdin.
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            registry.refused.fetch_add(1, Ordering::Relaxed);
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            let message = match errno {
                libc::ENOENT => format!("{}: command not found", argv_text[0]),
                libc::EACCES | libc::ENOEXEC => {
                    format!("{}: cannot execute: {e}", argv_text[0])
                }
                _ => format!("{}: cannot start: {e}", argv_text[0]),
            };
            tracing::warn!(peer, argv = ?argv_text, error = %e, "rexec spawn failed");
            Msg::Error { errno, message }
                .write_to(&mut *writer.lock().await)
                .await?;
            return Ok(());
        }
    };
    let Some(pid) = child.id() else {
        return Err(SessionError::Io(std::io::Error::other(
            "the program exited before its pid was known",
        )));
    };
    drop(cmd); // closes our copies of the pty slave
    let stdio = match pty_master {
        Some(m) => Stdio::Pty(Arc::new(PtyMaster::new(m)?)),
        None => {
            use std::os::fd::AsFd;
            for fd in [
                child.stdin.as_ref().map(|p| p.as_fd()),
                child.stdout.as_ref().map(|p| p.as_fd()),
                child.stderr.as_ref().map(|p| p.as_fd()),
            ]
            .into_iter()
            .flatten()
            {
                super::grow_pipe(fd);
            }
            Stdio::Pipes {
                stdin: child.stdin.take(),
                stdout: child.stdout.take(),
                stderr: child.stderr.take(),
            }
        }
    };
    let bytes_in = Arc::new(AtomicU64::new(0));
    let bytes_out = Arc::new(AtomicU64::new(0));
    let started_unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let id = registry.insert(Entry {
        argv: argv_text.clone(),
        local_pid: (start.local_pid != 0).then_some(start.local_pid),
        remote_pid: pid,
        started_unix,
        peer: peer.to_string(),
        bytes_in: bytes_in.clone(),
        bytes_out: bytes_out.clone(),
    });
    registry.started.fetch_add(1, Ordering::Relaxed);
    tracing::info!(session = id, pid, peer, argv = ?argv_text, tty, "rexec session started");
    let guard = SessionGuard {
        registry: registry.clone(),
        id,
    };

    let result = drive(
        &mut child,
        pid,
        stdio,
        &mut frames,
        writer,
        bytes_in.clone(),
        bytes_out.clone(),
        config.kill_grace,
        shutdown,
    )
    .await;
    let outcome = match result {
        Ok(status) => {
            tracing::info!(session = id, pid, status = ?status,
                bytes_in = bytes_in.load(Ordering::Relaxed),
                bytes_out = bytes_out.load(Ordering::Relaxed), "rexec session ended");
            Ok(())
        }
        Err(e) => {
            tracing::info!(session = id, pid, reason = %e, "rexec client gone; killing the process group");
            kill_group(&mut child, pid, config.kill_grace).await;
            Err(e)
        }
    };
    drop(guard);
    outcome
}

/// Removes the session from the registry however the session task ends.
struct SessionGuard {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.registry.remove(self.id);
    }
}

/// Runs the session's streams until the program has exited and its output is drained
/// (returns its status, already sent to the client), or the client is gone (error).
#[allow(clippy::too_many_arguments)]
async fn drive(
    child: &mut tokio::process::Child,
    pid: u32,
    stdio: Stdio,
    frames: &mut FramedRead<crate::wire::addr::ReadHalf, FrameDecoder>,
    writer: Writer,
    bytes_in: Arc<AtomicU64>,
    bytes_out: Arc<AtomicU64>,
    kill_grace: Duration,
    shutdown: &CancellationToken,
) -> Result<ExitStatus, SessionError> {
    Msg::Started { pid }
        .write_to(&mut *writer.lock().await)
        .await?;
    let stop_stdout = CancellationToken::new();
    let stop_stderr = CancellationToken::new();
    let mut pumps = tokio::task::JoinSet::new();
    let (stdin_tx, stdin_rx) = tokio::sync::mpsc::unbounded_channel::<bytes::Bytes>();
    let queued = Arc::new(AtomicU64::new(0));
    let pty_master = match stdio {
        Stdio::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            if let Some(out) = stdout {
                pumps.spawn(pump(
                    out,
                    op::STDOUT,
                    writer.clone(),
                    bytes_out.clone(),
                    stop_stdout.clone(),
                ));
            }
            if let Some(err) = stderr {
                pumps.spawn(pump(
                    err,
                    op::STDERR,
                    writer.clone(),
                    bytes_out.clone(),
                    stop_stderr.clone(),
                ));
            }
            tokio::spawn(stdin_writer(
                StdinSink::Pipe(stdin),
                stdin_rx,
                writer.clone(),
                queued.clone(),
            ));
            None
        }
        Stdio::Pty(master) => {
            pumps.spawn(pump_pty(
                master.clone(),
                writer.clone(),
                bytes_out.clone(),
                stop_stdout.clone(),
            ));
            tokio::spawn(stdin_writer(
                StdinSink::Pty(master.clone()),
                stdin_rx,
                writer.clone(),
                queued.clone(),
            ));
            Some(master)
        }
    };
    let mut pty_master = pty_master;
    let mut stdin_tx = Some(stdin_tx);
    let mut status: Option<ExitStatus> = None;
    // After a hang-up, when a program that ignored SIGHUP gets SIGKILL.
    let mut hangup_kill: Option<tokio::time::Instant> = None;
    let mut outputs_done = pumps.is_empty();
    // End-of-file and Exit frames that became due together go out in one write: a short
    // program's stdout, stderr and exit usually end at the same moment, and one wake-up of
    // the client is cheaper than three.
    let mut due = bytes::BytesMut::new();
    loop {
        if let (Some(st), true) = (status, outputs_done) {
            Msg::Exit(st).to_frame().encode(&mut due);
            let mut w = writer.lock().await;
            w.write_all(&due).await?;
            // Let the client read the Exit before we close.
            let _ = w.flush().await;
            return Ok(st);
        }
        if !due.is_empty() {
            let chunk = due.split();
            writer.lock().await.write_all(&chunk).await?;
        }
        tokio::select! {
            w = child.wait(), if status.is_none() => {
                status = Some(exit_status(w?));
                if pty_master.is_some() {
                    // A pty's output ends when its last holder exits; a background child of
                    // the program could hold it forever, and the terminal session is over.
                    stop_stdout.cancel();
                }
            }
            r = pumps.join_next(), if !outputs_done => {
                // Collect every pump that has finished by now, not just the first.
                let mut ended = r.into_iter().collect::<Vec<_>>();
                while let Some(r) = pumps.try_join_next() {
                    ended.push(r);
                }
                for r in ended {
                    match r {
                        Ok(Ok(data_op)) => eof_for(data_op).to_frame().encode(&mut due),
                        Ok(Err(e)) => tracing::debug!(error = %e, "output stream ended with an error"),
                        Err(e) => tracing::warn!(error = %e, "output pump failed"),
                    }
                }
                outputs_done = pumps.is_empty();
                if outputs_done && status.is_none() {
                    // The output usually ends because the program exited: take its status
                    // now if it is there, so the Exit joins the end-of-file frames.
                    if let Ok(Some(w)) = child.try_wait() {
                        status = Some(exit_status(w));
                    }
                }
            }
            _ = shutdown.cancelled() => {
                return Err(SessionError::Io(std::io::Error::other("rexec_server is shutting down")));
            }
            _ = tokio::time::sleep_until(hangup_kill.unwrap_or_else(tokio::time::Instant::now)), if hangup_kill.is_some() && status.is_none() => {
                hangup_kill = None;
                tracing::info!(pid, "the program outlived its terminal's hang-up by the grace period: SIGKILL");
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            f = frames.next() => {
                let Some(f) = f else {
                    return Err(SessionError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the client closed the connection",
                    )));
                };
                match Msg::from_frame(f.map_err(proto::ProtoError::from)?)? {
                    Msg::Stdin(data) => {
                        let n = data.len() as u64;
                        bytes_in.fetch_add(n, Ordering::Relaxed);
                        let q = queued.fetch_add(n, Ordering::Relaxed) + n;
                        if q > STDIN_WINDOW + CHUNK as u64 {
                            return Err(SessionError::Window(q));
                        }
                        if let Some(tx) = &stdin_tx {
                            // The writer task lives as long as the sender; if it ended (the
                            // program closed stdin) the data is dropped, as a pipe would.
                            let _ = tx.send(data);
                        }
                    }
                    Msg::StdinEof => stdin_tx = None,
                    Msg::Signal(s) => deliver_signal(pid, s, pty_master.as_deref()),
                    Msg::Winsize(ws) => {
                        if let Some(m) = &pty_master {
                            let _ = pty::set_winsize(m.as_fd(), ws);
                        }
                    }
                    Msg::CloseStdout => {
                        stop_stdout.cancel();
                        if let Some(master) = pty_master.take() {
                            // The terminal's output has nowhere to go: hang it up, as a dropped
                            // line (or ssh -t) does, and end the session rather than read
                            // and discard output forever.
                            hang_up(pid, &master);
                            stdin_tx = None;
                            hangup_kill = Some(tokio::time::Instant::now() + kill_grace);
                        }
                    }
                    Msg::CloseStderr => stop_stderr.cancel(),
                    other => {
                        return Err(SessionError::Io(std::io::Error::other(format!(
                            "unexpected message from the client: {other:?}"
                        ))))
                    }
                }
            }
        }
    }
}

/// Hangs up the program's terminal: SIGHUP and SIGCONT to the session leader's group and the
/// foreground group, as the kernel sends them when a terminal's line drops. Our reference to
/// the master is dropped by the caller, so the terminal closes once the pumps let go of it.
fn hang_up(pid: u32, master: &PtyMaster) {
    let leader = Pid::from_raw(pid as i32);
    let foreground = master.foreground_group().unwrap_or(leader);
    tracing::info!(
        pid,
        "the client's terminal output failed: hanging up the program's terminal"
    );
    for group in [leader, foreground] {
        let _ = killpg(group, Signal::SIGHUP);
        let _ = killpg(group, Signal::SIGCONT);
        if foreground == leader {
            break;
        }
    }
}

/// The wire form of a wait status.
fn exit_status(w: std::process::ExitStatus) -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    match (w.code(), w.signal()) {
        (Some(c), _) => ExitStatus::Code(c),
        (None, Some(s)) => ExitStatus::Signal(s),
        (None, None) => ExitStatus::Code(255),
    }
}

/// The end-of-file message for an output stream's data op.
fn eof_for(data_op: u16) -> Msg {
    if data_op == op::STDOUT {
        Msg::StdoutEof
    } else {
        Msg::StderrEof
    }
}

/// Terminal-style signals (INT, QUIT, TSTP) go to the foreground group, as a terminal
/// would send them; the rest to the program itself, as `kill PID` would.
fn deliver_signal(pid: u32, signo: i32, pty: Option<&PtyMaster>) {
    let Ok(sig) = Signal::try_from(signo) else {
        tracing::debug!(signo, "ignoring an unknown signal number from the client");
        return;
    };
    let group = matches!(sig, Signal::SIGINT | Signal::SIGQUIT | Signal::SIGTSTP);
    let r = if group {
        let pg = pty
            .and_then(PtyMaster::foreground_group)
            .unwrap_or(Pid::from_raw(pid as i32));
        killpg(pg, sig)
    } else {
        kill(Pid::from_raw(pid as i32), sig)
    };
    if let Err(e) = r {
        tracing::debug!(pid, signal = %sig, error = %e, "forwarding a signal failed");
    }
}

/// This thread's umask, read from procfs once per thread: nothing in rexec_server changes
/// a umask (the client's is set in the child), and reading `/proc/thread-self/status` for
/// every session cost more than the rest of the spawn's preparation.
fn cached_thread_umask() -> Option<u32> {
    thread_local! {
        static UMASK: std::cell::OnceCell<Option<u32>> = const { std::cell::OnceCell::new() };
    }
    UMASK.with(|u| *u.get_or_init(crate::fs::thread_umask))
}

/// True when a child spawned from this thread would already have `umask` and `rlimits`.
fn inherits(umask: u32, rlimits: &[Rlimit]) -> bool {
    cached_thread_umask() == Some(umask)
        && rlimits.iter().all(|r| {
            let mut now = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes one rlimit to the valid, exclusive pointer.
            (unsafe { libc::getrlimit(r.resource as _, &mut now) } == 0)
                && now.rlim_cur == r.soft
                && now.rlim_max == r.hard
        })
}

/// SIGTERM to the program's process group, then SIGKILL after `grace` if anything remains.
async fn kill_group(child: &mut tokio::process::Child, pid: u32, grace: Duration) {
    let pg = Pid::from_raw(pid as i32);
    let _ = killpg(pg, Signal::SIGTERM);
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        // Reap the leader so its zombie does not keep the group "alive".
        let _ = child.try_wait();
        if killpg(pg, None) == Err(nix::errno::Errno::ESRCH) {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = killpg(pg, Signal::SIGKILL);
    let _ = child.wait().await;
}

/// Copies one output stream to the client in data frames until end of file or `stop`, and
/// returns `data_op`: the session then sends the stream's end of file, together with
/// whatever else ended at the same moment.
async fn pump<R: AsyncRead + Unpin>(
    mut src: R,
    data_op: u16,
    writer: Writer,
    counter: Arc<AtomicU64>,
    stop: CancellationToken,
) -> std::io::Result<u16> {
    const H: usize = crate::wire::frame::HEADER_LEN;
    let mut buf = vec![0u8; H + proto::FIRST_CHUNK];
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => break,
            n = src.read(&mut buf[H..]) => n?,
        };
        if n == 0 {
            break;
        }
        send_output(&writer, &mut buf, data_op, n, &counter).await?;
        grow_if_filled(&mut buf, n);
    }
    Ok(data_op)
}

async fn pump_pty(
    master: Arc<PtyMaster>,
    writer: Writer,
    counter: Arc<AtomicU64>,
    stop: CancellationToken,
) -> std::io::Result<u16> {
    const H: usize = crate::wire::frame::HEADER_LEN;
    let mut buf = vec![0u8; H + proto::FIRST_CHUNK];
    // Once stopped (the program exited, or the terminal was hung up), what is already
    // buffered is drained until the terminal is quiet for 20 ms, and for PTY_DRAIN at most:
    // a program still writing (a background child, or one ignoring SIGHUP) cannot keep the
    // pump, and so the session, going.
    const PTY_DRAIN: Duration = Duration::from_millis(250);
    let mut drain_until: Option<tokio::time::Instant> = None;
    loop {
        let n = match drain_until {
            Some(end) => {
                let quiet = Duration::from_millis(20)
                    .min(end.saturating_duration_since(tokio::time::Instant::now()));
                match tokio::time::timeout(quiet, master.read(&mut buf[H..])).await {
                    Ok(Ok(n)) if n > 0 => n,
                    _ => break,
                }
            }
            None => tokio::select! {
                _ = stop.cancelled() => {
                    drain_until = Some(tokio::time::Instant::now() + PTY_DRAIN);
                    continue;
                }
                n = master.read(&mut buf[H..]) => n?,
            },
        };
        if n == 0 {
            break;
        }
        send_output(&writer, &mut buf, op::STDOUT, n, &counter).await?;
        grow_if_filled(&mut buf, n);
    }
    Ok(op::STDOUT)
}

/// Grows an output buffer (header room in front) to a full [`CHUNK`] once a read of `n`
/// bytes filled it: the program writes in bulk, so fewer, larger frames pay off.
fn grow_if_filled(buf: &mut Vec<u8>, n: usize) {
    const H: usize = crate::wire::frame::HEADER_LEN;
    if n == buf.len() - H && buf.len() < H + CHUNK {
        buf.resize(H + CHUNK, 0);
    }
}

/// Sends `buf[HEADER_LEN..HEADER_LEN + n]` as one data frame of `data_op`, writing its header
/// into the room left in front, and counts the bytes.
async fn send_output(
    writer: &Writer,
    buf: &mut [u8],
    data_op: u16,
    n: usize,
    counter: &AtomicU64,
) -> std::io::Result<()> {
    const H: usize = crate::wire::frame::HEADER_LEN;
    buf[..H].copy_from_slice(&data_header(data_op, n));
    writer.lock().await.write_all(&buf[..H + n]).await?;
    counter.fetch_add(n as u64, Ordering::Relaxed);
    Ok(())
}

enum StdinSink {
    Pipe(Option<tokio::process::ChildStdin>),
    Pty(Arc<PtyMaster>),
}

/// Writes stdin data to the program and acknowledges it to the client (window credit).
/// Data arriving after the program closed its stdin is discarded but still acknowledged,
/// so the client never stalls.
async fn stdin_writer(
    mut sink: StdinSink,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<bytes::Bytes>,
    writer: Writer,
    queued: Arc<AtomicU64>,
) {
    let mut last = None;
    while let Some(data) = rx.recv().await {
        last = data.last().copied().or(last);
        let r = match &mut sink {
            StdinSink::Pipe(Some(p)) => p.write_all(&data).await,
            StdinSink::Pipe(None) => Ok(()),
            StdinSink::Pty(m) => m.write_all(&data).await,
        };
        if r.is_err() {
            if let StdinSink::Pipe(p) = &mut sink {
                *p = None;
            }
        }
        let n = data.len() as u64;
        queued.fetch_sub(n, Ordering::Relaxed);
        if Msg::StdinAck(n)
            .write_to(&mut *writer.lock().await)
            .await
            .is_err()
        {
            return;
        }
    }
    // Sender dropped: StdinEof (or the session ended). Dropping the sink closes the pipe; a
    // terminal has no end of file to close, so the line discipline gets its EOF character, as
    // if typed: once at the start of a line, twice after a partial line (the first one only
    // hands the partial line to the reader).
    if let StdinSink::Pty(m) = &sink {
        let eof = pty::eof_char(m.as_fd());
        let at_line_start = matches!(last, None | Some(b'\n' | b'\r'));
        let keys: &[u8] = if at_line_start { &[eof] } else { &[eof, eof] };
        if let Err(e) = m.write_all(keys).await {
            tracing::debug!(error = %e, "sending end of file to the terminal failed");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// rexec_server main

/// The default Unix socket directory (`/var/run/rexec`); `REXEC_RUN_DIR` overrides it.
pub fn rexec_dir() -> PathBuf {
    std::env::var_os("REXEC_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(super::DEFAULT_REXEC_DIR))
}

#[derive(Debug, Parser)]
#[command(
    name = "rexec_server",
    version,
    about = "Run programs for rexec clients (remote execution server)",
    long_about = "Accepts rexec sessions and runs the requested programs on this machine with the \
client's argv, environment, working directory, umask and stdio; forwards signals; reports the exit \
status. Without CMD_NET_ADDR or --listen it listens on the Unix socket /var/run/rexec/rexec_uds.sock \
(mode 0600; udsproxyd carries it to the other machine). With /etc/rexec/whitelist present only the \
commands listed there run, and once it is in force a missing file refuses every command. Runs in the foreground (systemd Type=notify); SIGTERM stops it, ending \
every session's processes.",
    after_help = "Environment:\n  CMD_NET_ADDR    tcp://IP:PORT or vsock://CID:PORT to listen on (default port 7777)\n  REXEC_RUN_DIR   directory of the Unix socket and pids/ [default: /var/run/rexec]\n\nExamples:\n  rexec_server\n  CMD_NET_ADDR=tcp://0.0.0.0:7777 rexec_server\n  rexec_server --listen vsock://4294967295:7777 --kill-grace 5s\n\nFiles: /etc/rexec/whitelist, /etc/dpuctl/psk, /var/run/rexec/rexec_uds.sock, /var/run/qtfs/rexec_server.ctl\nSee docs/rexec.md."
)]
struct ServerArgs {
    /// Listen address (tcp://, vsock://, unix://); repeatable [default: $CMD_NET_ADDR, else the Unix socket]
    #[arg(long, value_name = "ADDR")]
    listen: Vec<String>,
    /// Also listen on the default Unix socket when --listen/CMD_NET_ADDR is given
    #[arg(long)]
    uds: bool,
    /// The rexec command whitelist; named here, it must exist [default: /etc/rexec/whitelist, if it exists]
    #[arg(long, value_name = "FILE")]
    whitelist: Option<PathBuf>,
    /// Run every command, even if /etc/rexec/whitelist exists (closed test setups only)
    #[arg(long, conflicts_with = "whitelist")]
    no_whitelist: bool,
    /// Grace period between SIGTERM and SIGKILL when a client goes away
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    kill_grace: Duration,
    /// Sessions running at once; more clients wait for one to end
    #[arg(long, value_name = "N", default_value_t = 1024)]
    max_sessions: usize,
    /// Config file [default: $DPUCTL_CONFIG, else /etc/dpuctl/config.toml]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Pre-shared key file for TCP/vsock [default: /etc/dpuctl/psk]
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Do not authenticate TCP/vsock connections (closed test networks only)
    #[arg(long)]
    insecure: bool,
    /// Directory of the control socket and lock [default: /var/run/qtfs]
    #[arg(long, value_name = "DIR", env = "DPUCTL_RUN_DIR")]
    run_dir: Option<PathBuf>,
    /// Log level or tracing directive [default: info]
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
}

/// The command line, for the manual page (`dpuctl man`).
pub(crate) fn command() -> clap::Command {
    <ServerArgs as clap::CommandFactory>::command()
}

/// Entry point for `rexec_server` and `dpuctl rexec_server`.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let a = match ServerArgs::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => return crate::cli::clap_exit(e),
    };
    crate::cli::run_daemon("rexec_server", None, run_main(a))
}

/// The addresses to listen on: flags, else `CMD_NET_ADDR`, else the Unix socket.
fn listen_addrs(a: &ServerArgs) -> Result<Vec<Addr>, StartError> {
    let mut v: Vec<String> = a.listen.clone();
    if v.is_empty() {
        if let Some(env) = std::env::var_os("CMD_NET_ADDR").filter(|s| !s.is_empty()) {
            v.push(env.to_string_lossy().into_owned());
        }
    }
    let mut addrs = v
        .iter()
        .map(|s| super::parse_addr(s).map_err(|e| StartError::Usage(format!("{s}: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() || a.uds {
        addrs.push(Addr::Unix(rexec_dir().join(super::SOCKET_NAME)));
    }
    Ok(addrs)
}

async fn run_main(a: ServerArgs) -> Result<(), StartError> {
    let addrs = listen_addrs(&a)?;
    let networked = addrs.iter().any(|a| !matches!(a, Addr::Unix(_)));
    let common = CommonArgs {
        config: a.config.clone(),
        key_file: a.key.clone(),
        insecure: a.insecure,
        run_dir: a.run_dir.clone(),
        log_level: a.log_level.clone(),
        whitelist: None,
    };
    let (mut config, source) = runner::resolve(&common)?;
    if !networked {
        // Unix-socket-only: peers are authenticated by SO_PEERCRED and no key is used, so
        // a missing key file must not stop the server (validation checks it otherwise).
        config.common.insecure = true;
    }
    let policy = whitelist_policy(&a)?;
    let (daemon, reloads) = Daemon::start("rexec_server", &config, source, common).await?;
    match &policy {
        None => tracing::warn!("--no-whitelist: every command may run"),
        Some(p) if !p.is_required() => {
            tracing::warn!(whitelist = %p.path().display(), "no rexec whitelist: every command may run; create it (mode 0400, owned by root) to restrict")
        }
        Some(_) => {}
    }
    let whitelist_shown = policy
        .as_ref()
        .map_or_else(|| "none".to_string(), |p| p.path().display().to_string());
    let auth = if networked {
        Some(runner::auth(&config)?)
    } else {
        None
    };
    let mut listeners = Vec::new();
    for addr in &addrs {
        if let Addr::Unix(path) = addr {
            prepare_rexec_dir(path)?;
        }
        let l = addr.bind().await.map_err(|source| StartError::Bind {
            addr: addr.to_string(),
            source,
        })?;
        if let Addr::Unix(path) = addr {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
                |source| StartError::Bind {
                    addr: addr.to_string(),
                    source,
                },
            )?;
        }
        listeners.push(l);
    }
    let registry = Registry::new();
    registry.set_listen(
        listeners
            .iter()
            .map(|l| l.local_addr().to_string())
            .collect(),
    );
    daemon.set_status_source(registry.clone());
    let server_config = Arc::new(ServerConfig {
        whitelist: policy,
        kill_grace: a.kill_grace,
        max_sessions: a.max_sessions,
        auth,
    });
    tracing::info!(listen = ?registry.listen(), whitelist = %whitelist_shown, "rexec_server starting");
    daemon.ready();
    let task = tokio::spawn(run(
        listeners,
        server_config,
        registry,
        daemon.shutdown.clone(),
    ));
    daemon.serve_until_shutdown(reloads).await;
    let _ = task.await;
    Ok(())
}

/// The whitelist policy, checked before anything is bound: a bad file refuses to start, and
/// so does a file named with `--whitelist` that does not exist (the operator asked for a
/// restriction). The default file, when present, is required from then on; when absent,
/// every command may run until it appears.
fn whitelist_policy(a: &ServerArgs) -> Result<Option<Policy>, StartError> {
    if a.no_whitelist {
        return Ok(None);
    }
    let path = a
        .whitelist
        .clone()
        .unwrap_or_else(|| PathBuf::from(whitelist::DEFAULT_WHITELIST));
    match Whitelist::load(&path) {
        Ok(Some(w)) => {
            eprintln!(
                "rexec_server: whitelist {}: {} entries",
                path.display(),
                w.paths.len() + w.names.len()
            );
            Ok(Some(Policy::new(path, true)))
        }
        Ok(None) if a.whitelist.is_some() => Err(StartError::Usage(format!(
            "the rexec whitelist {} does not exist: create it (mode 0400, owned by root), or \
             use --no-whitelist to let every command run",
            path.display()
        ))),
        Ok(None) => Ok(Some(Policy::new(path, false))),
        Err(e) => Err(StartError::Usage(e.to_string())),
    }
}

/// Creates the socket's directory and `pids/` beside it (mode 0755).
fn prepare_rexec_dir(socket: &Path) -> Result<(), StartError> {
    use std::os::unix::fs::DirBuilderExt;
    let Some(dir) = socket.parent() else {
        return Ok(());
    };
    for d in [dir.to_path_buf(), dir.join(super::PIDS_DIR)] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&d)
            .map_err(|e| StartError::Usage(format!("cannot create {}: {e}", d.display())))?;
    }
    Ok(())
}
