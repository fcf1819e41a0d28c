//! fd passing (SCM_RIGHTS) over proxied stream connections (docs/udsproxyd.md §fd passing).
//!
//! A descriptor cannot cross a machine, so the side that receives one from its local client
//! (the **sender**) translates it, and the other side (the **receiver**) makes a local
//! equivalent and passes that to its local peer with the same bytes:
//! - a **pipe or FIFO** becomes an [`OP_PIPE`] link stream: the sender reopens its end
//!   (`/proc/self/fd/N`, a new open file description, so making it non-blocking does not
//!   change the client's copy) and pumps it; the receiver creates a pipe, keeps one end for
//!   its pump and passes the other;
//! - a **regular file on a path** is reopened by the receiver at the same path, access mode
//!   (`O_ACCMODE` and `O_APPEND`) and offset, if its `open` allowlist covers the path;
//! - anything else (socket, device, directory, eventfd/epoll/other anonymous inodes, memfd,
//!   deleted or unnamed files, pipes opened read-write) is refused: the connection ends with
//!   EOPNOTSUPP and a log line naming the descriptor.
//!
//! The descriptors are announced with an [`Attach`] call naming the connection (its token,
//! chosen by the acceptor and returned in the connect stream's Accept) and the byte offset;
//! the sender waits for the answer before it sends the carrying bytes, so the receiver's
//! pump always knows of an attach before those bytes arrive, and a refusal (allowlist,
//! missing file) reaches the sender before any of them was sent.
//!
//! Concurrency: [`FdState`] holds two maps (open connections' inboxes, pipe ends waiting for
//! their attach) behind mutexes held for single inserts/removes only. Each pipe is one task
//! per side, running until the pipe's data direction ended on both sides or the link closed;
//! its ends are closed when the task ends, so nothing outlives the pump.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytes::{Buf, Bytes, BytesMut};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::stat::{fstat, Mode, SFlag};
use tokio::io::unix::AsyncFd;

use super::proto::{decode_id, encode_id, Attach, FdSpec, PipeDir, OP_ATTACH, OP_PIPE};
use super::proxy::async_fd;
use crate::allowlist::{ListType, SharedAllowlist};
use crate::daemon::peer::PeerManager;
use crate::wire::{CallError, IncomingStream, Link, RemoteError, StreamReader, StreamWriter};

/// How long an attach waits for its connection to be registered (the opening side learns
/// the token from the Accept, and the peer may attach right after sending it); an attach
/// for a connection that has ended fails after this.
const REGISTER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// Read size of a pipe pump (a default pipe holds 64 KiB).
const PIPE_CHUNK: usize = 64 * 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Only single inserts and removes happen under these locks: a poisoned map is whole.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Descriptors waiting to be passed to the local peer of one connection, in stream order.
#[derive(Default)]
pub struct Inbox {
    queue: Mutex<VecDeque<Delivery>>,
    /// Length of `queue`, so the pump's fast path checks it without the lock.
    len: AtomicUsize,
}

/// Descriptors to pass with `len` bytes starting at stream offset `offset`.
pub struct Delivery {
    /// Stream bytes (towards the local peer) before the carrying bytes.
    pub offset: u64,
    /// Number of carrying bytes.
    pub len: usize,
    /// The local equivalents, closed once passed.
    pub fds: Vec<OwnedFd>,
}

impl Inbox {
    /// Offset and length of the next delivery, if any.
    pub fn front(&self) -> Option<(u64, usize)> {
        if self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        lock(&self.queue).front().map(|d| (d.offset, d.len))
    }

    /// Takes the next delivery.
    pub fn pop(&self) -> Option<Delivery> {
        let mut q = lock(&self.queue);
        let d = q.pop_front();
        self.len.store(q.len(), Ordering::Release);
        d
    }

    fn push(&self, d: Delivery) -> Result<(), RemoteError> {
        let mut q = lock(&self.queue);
        if let Some(last) = q.back() {
            if d.offset < last.offset + last.len as u64 {
                return Err(RemoteError::new(
                    libc::EPROTO,
                    "descriptors attached out of stream order",
                ));
            }
        }
        q.push_back(d);
        self.len.store(q.len(), Ordering::Release);
        Ok(())
    }
}

/// fd-passing state of one proxy: inboxes of open connections, pipe ends waiting for their
/// attach, counters.
#[derive(Default)]
pub struct FdState {
    /// Keyed by (this side accepted the connection, token).
    inboxes: Mutex<HashMap<(bool, u64), Arc<Inbox>>>,
    /// Receiver-side pipe ends created for an [`OP_PIPE`] stream, until an attach takes them.
    pending: Mutex<HashMap<u64, OwnedFd>>,
    /// Signalled on every inbox registration (an attach may race its connection's
    /// registration on the opening side: the opener learns the token from the Accept, and
    /// the peer may attach as soon as it has sent that Accept).
    registered: tokio::sync::Notify,
    passed: AtomicU64,
    received: AtomicU64,
    refused: AtomicU64,
    pipes: AtomicU64,
}

/// Keeps a connection's inbox registered while the connection lives.
pub struct InboxGuard {
    state: Arc<FdState>,
    key: (bool, u64),
    /// The inbox the down pump reads.
    pub inbox: Arc<Inbox>,
}

impl Drop for InboxGuard {
    fn drop(&mut self) {
        lock(&self.state.inboxes).remove(&self.key);
    }
}

/// Removes a pipe's unclaimed pending end when its pump ends.
struct PendingGuard {
    state: Arc<FdState>,
    id: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        lock(&self.state.pending).remove(&self.id);
        self.state.pipes.fetch_sub(1, Ordering::Relaxed);
    }
}

impl FdState {
    /// Registers the inbox of a connection this side accepted (`accepted_here`) or opened.
    pub fn register(self: &Arc<Self>, accepted_here: bool, token: u64) -> InboxGuard {
        let inbox = Arc::new(Inbox::default());
        let key = (accepted_here, token);
        lock(&self.inboxes).insert(key, inbox.clone());
        self.registered.notify_waiters();
        InboxGuard {
            state: self.clone(),
            key,
            inbox,
        }
    }

    /// `fds_passed`, `fds_received`, `fds_refused`, `pipes_active` for status.
    pub fn counters(&self) -> [(&'static str, u64); 4] {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("fds_passed", get(&self.passed)),
            ("fds_received", get(&self.received)),
            ("fds_refused", get(&self.refused)),
            ("pipes_active", get(&self.pipes)),
        ]
    }

    /// The peer's [`OP_ATTACH`] call: turns each described descriptor into a local one and
    /// queues them on the connection's inbox. Any failure refuses the whole attach (the
    /// sender ends the connection with this errno).
    pub async fn attach(&self, allowlist: &SharedAllowlist, a: Attach) -> Result<(), RemoteError> {
        let key = (!a.senders_token, a.token);
        let deadline = tokio::time::Instant::now() + REGISTER_WAIT;
        let inbox = loop {
            let registered = self.registered.notified();
            if let Some(i) = lock(&self.inboxes).get(&key).cloned() {
                break i;
            }
            if tokio::time::timeout_at(deadline, registered).await.is_err() {
                return Err(RemoteError::new(
                    libc::ENOTCONN,
                    "descriptors attached to a connection that has ended",
                ));
            }
        };
        let mut fds = Vec::with_capacity(a.fds.len());
        for spec in a.fds {
            let fd = match spec {
                FdSpec::Pipe { id, .. } => lock(&self.pending).remove(&id).ok_or_else(|| {
                    RemoteError::new(libc::EBADF, format!("no pipe stream with id {id}"))
                }),
                FdSpec::File {
                    flags,
                    offset,
                    path,
                } => reopen_file(allowlist, &path, flags, offset),
            };
            match fd {
                Ok(fd) => fds.push(fd),
                Err(e) => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "passed descriptor refused on this side");
                    return Err(e);
                }
            }
        }
        self.received.fetch_add(fds.len() as u64, Ordering::Relaxed);
        inbox.push(Delivery {
            offset: a.offset,
            len: a.len as usize,
            fds,
        })
    }

    /// The peer opens an [`OP_PIPE`] stream: make a pipe, keep our end pumping, hold the
    /// other end until the attach takes it. Called on the link's reader task: spawns.
    pub fn accept_pipe(self: &Arc<Self>, payload: &[u8], stream: IncomingStream) {
        let Some(dir) = payload.first().copied().and_then(PipeDir::from_u8) else {
            stream.refuse(RemoteError::new(libc::EINVAL, "bad pipe direction"));
            return;
        };
        let state = self.clone();
        tokio::spawn(async move {
            let made = nix::unistd::pipe2(OFlag::O_CLOEXEC)
                .map_err(io::Error::from)
                .and_then(|(r, w)| {
                    // ToReceiver: we write what arrives, the receiver gets the read end.
                    let (ours, theirs) = match dir {
                        PipeDir::ToReceiver => (w, r),
                        PipeDir::FromReceiver => (r, w),
                    };
                    Ok((nonblocking_async(ours)?, theirs))
                });
            let (ours, theirs) = match made {
                Ok(p) => p,
                Err(e) => {
                    stream.refuse(RemoteError::from(e));
                    return;
                }
            };
            let id = match getrandom::u64() {
                Ok(id) => id,
                Err(e) => {
                    stream.refuse(RemoteError::new(libc::EIO, format!("getrandom: {e}")));
                    return;
                }
            };
            lock(&state.pending).insert(id, theirs);
            state.pipes.fetch_add(1, Ordering::Relaxed);
            let _cleanup = PendingGuard {
                state: state.clone(),
                id,
            };
            let (r, w) = stream.accept(encode_id(id));
            let result = match dir {
                PipeDir::ToReceiver => pipe_in(ours, r, w).await,
                PipeDir::FromReceiver => pipe_out(ours, r, w).await,
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "passed pipe ended with an error");
            }
        });
    }
}

/// Where a connection's pump finds the link to send attaches and open pipe streams on.
#[derive(Clone)]
pub enum LinkSource {
    /// The link the connection was opened on (outbound).
    Fixed(Link),
    /// The current link of the proxy's peer manager (inbound: the service is not told which
    /// link a stream came on; there is only one peer).
    Peer(Arc<OnceLock<PeerManager>>),
}

impl LinkSource {
    fn get(&self) -> Option<Link> {
        match self {
            LinkSource::Fixed(l) => Some(l.clone()),
            LinkSource::Peer(p) => p.get().and_then(PeerManager::link),
        }
    }
}

/// What a connection's up pump needs to forward descriptors.
pub struct FdCtx {
    /// The link.
    pub link: LinkSource,
    /// The connection token; `None` when the peer predates fd passing.
    pub token: Option<u64>,
    /// True when this side accepted the connection (the token is ours).
    pub accepted_here: bool,
    /// Counters and maps.
    pub state: Arc<FdState>,
}

/// A descriptor received from the local client, classified.
enum Passed {
    /// A pipe end, reopened non-blocking; `dir` says which way its bytes go.
    Pipe { fd: AsyncFd<OwnedFd>, dir: PipeDir },
    /// A regular file to reopen on the far side.
    File {
        flags: u32,
        offset: u64,
        path: PathBuf,
    },
}

impl FdCtx {
    /// Forwards `fds`, which came with the `len` bytes after the first `offset` bytes this
    /// side sent on the connection. Returns once the peer holds local equivalents (the
    /// caller then sends the bytes), or the error that must end the connection.
    pub async fn forward(
        &self,
        offset: u64,
        len: usize,
        fds: Vec<OwnedFd>,
        truncated: bool,
    ) -> Result<(), RemoteError> {
        let count = fds.len() as u64;
        let r = self.forward_inner(offset, len, fds, truncated).await;
        match &r {
            Ok(()) => {
                self.state.passed.fetch_add(count, Ordering::Relaxed);
            }
            Err(e) => {
                self.state
                    .refused
                    .fetch_add(count.max(1), Ordering::Relaxed);
                tracing::warn!(error = %e, "descriptor passing refused: the connection is ended");
            }
        }
        r
    }

    async fn forward_inner(
        &self,
        offset: u64,
        len: usize,
        fds: Vec<OwnedFd>,
        truncated: bool,
    ) -> Result<(), RemoteError> {
        if truncated {
            return Err(RemoteError::new(
                libc::EOPNOTSUPP,
                format!(
                    "more than {} descriptors were passed in one message (SCM_RIGHTS)",
                    super::proto::MAX_FDS
                ),
            ));
        }
        let (Some(link), Some(token)) = (self.link.get(), self.token) else {
            return Err(RemoteError::new(
                libc::EOPNOTSUPP,
                "a descriptor was passed (SCM_RIGHTS) but the peer does not take part in fd passing (an older dpuctl, or the link is down)",
            ));
        };
        if len == 0 || len > u32::MAX as usize {
            return Err(RemoteError::new(
                libc::EOPNOTSUPP,
                "descriptors came without bytes",
            ));
        }
        // Classify everything first: one refused descriptor refuses the message before any
        // stream is opened.
        let passed = fds
            .into_iter()
            .map(classify)
            .collect::<Result<Vec<_>, _>>()?;
        let mut specs = Vec::with_capacity(passed.len());
        let mut pumps = Vec::new();
        for p in passed {
            match p {
                Passed::Pipe { fd, dir } => {
                    let (answer, r, w) = link
                        .open_stream(OP_PIPE, Bytes::copy_from_slice(&[dir.to_u8()]))
                        .await
                        .map_err(remote)?;
                    let id = decode_id(&answer).ok_or_else(|| {
                        RemoteError::new(libc::EPROTO, "the peer's pipe answer has no id")
                    })?;
                    specs.push(FdSpec::Pipe { dir, id });
                    pumps.push((fd, dir, r, w));
                }
                Passed::File {
                    flags,
                    offset,
                    path,
                } => specs.push(FdSpec::File {
                    flags,
                    offset,
                    path,
                }),
            }
        }
        let attach = Attach {
            senders_token: self.accepted_here,
            token,
            offset,
            len: len as u32,
            fds: specs,
        };
        // On error the pipe streams' halves drop here: the peer resets and frees its ends.
        link.call(OP_ATTACH, attach.encode())
            .await
            .map_err(remote)?;
        for (fd, dir, r, w) in pumps {
            let state = self.state.clone();
            state.pipes.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let result = match dir {
                    PipeDir::ToReceiver => pipe_out(fd, r, w).await,
                    PipeDir::FromReceiver => pipe_in(fd, r, w).await,
                };
                state.pipes.fetch_sub(1, Ordering::Relaxed);
                if let Err(e) = result {
                    tracing::debug!(error = %e, "passed pipe ended with an error");
                }
            });
        }
        Ok(())
    }
}

fn remote(e: CallError) -> RemoteError {
    match e {
        CallError::Remote(re) => re,
        other => RemoteError::new(other.errno(), other.to_string()),
    }
}

fn proc_fd(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// What `fd` is, for refusals and logs: a kind and the kernel's name for it
/// (`socket:[1234]`, `anon_inode:[eventfd]`, a path).
fn describe(fd: &OwnedFd, mode: u32) -> String {
    let kind = match SFlag::from_bits_truncate(mode) & SFlag::S_IFMT {
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFLNK => "a symbolic link",
        SFlag::S_IFIFO => "a pipe",
        SFlag::S_IFREG => "a regular file",
        _ => "an anonymous inode",
    };
    let name = nix::fcntl::readlink(proc_fd(fd).as_str())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "?".into());
    format!("{kind} ({name})")
}

fn unsupported(what: &str, why: &str) -> RemoteError {
    RemoteError::new(
        libc::EOPNOTSUPP,
        format!("{what} was passed (SCM_RIGHTS) over a proxied connection: {why}; only pipes, FIFOs and regular files on shared paths can cross machines"),
    )
}

/// Classifies a descriptor the local client passed.
fn classify(fd: OwnedFd) -> Result<Passed, RemoteError> {
    let st = fstat(&fd).map_err(io::Error::from)?;
    let mode = st.st_mode;
    let fmt = SFlag::from_bits_truncate(mode) & SFlag::S_IFMT;
    let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL).map_err(io::Error::from)?);
    let acc = flags & OFlag::O_ACCMODE;
    if fmt == SFlag::S_IFIFO {
        let dir = if acc == OFlag::O_RDONLY {
            PipeDir::ToReceiver
        } else if acc == OFlag::O_WRONLY {
            PipeDir::FromReceiver
        } else {
            return Err(unsupported(
                &describe(&fd, mode),
                "it is open for reading and writing, so it has no direction",
            ));
        };
        // A new open file description of the same pipe: O_NONBLOCK on it does not reach
        // the client's copy. A write end with no reader left fails with ENXIO here.
        let reopened = nix::fcntl::open(
            proc_fd(&fd).as_str(),
            acc | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            RemoteError::new(
                e as i32,
                format!("cannot reopen the passed {}: {e}", describe(&fd, mode)),
            )
        })?;
        return Ok(Passed::Pipe {
            fd: async_fd(reopened)?,
            dir,
        });
    }
    if fmt != SFlag::S_IFREG {
        return Err(unsupported(
            &describe(&fd, mode),
            "it has no meaning on the other machine",
        ));
    }
    let path = nix::fcntl::readlink(proc_fd(&fd).as_str()).map_err(io::Error::from)?;
    let bytes = path.as_bytes();
    if st.st_nlink == 0 || !bytes.starts_with(b"/") || bytes.ends_with(b" (deleted)") {
        return Err(unsupported(
            &describe(&fd, mode),
            "it has no path (deleted, memfd or O_TMPFILE) to reopen it at",
        ));
    }
    let offset =
        nix::unistd::lseek(&fd, 0, nix::unistd::Whence::SeekCur).map_err(io::Error::from)?;
    Ok(Passed::File {
        flags: (flags & (OFlag::O_ACCMODE | OFlag::O_APPEND)).bits() as u32,
        offset: offset as u64,
        path: PathBuf::from(path),
    })
}

/// Reopens a passed regular file on this side: the one `open` allowlist check of fd passing,
/// then the path resolved without following any symlink (the sender's path is already
/// resolved), a regular-file check on an O_PATH handle, and the reopen of that very inode.
fn reopen_file(
    allowlist: &SharedAllowlist,
    path: &Path,
    flags: u32,
    offset: u64,
) -> Result<OwnedFd, RemoteError> {
    let shown = path.display();
    let normal = path
        .to_str()
        .and_then(|t| crate::allowlist::normalize(t).ok())
        .filter(|n| n == path)
        .ok_or_else(|| {
            RemoteError::new(
                libc::EINVAL,
                format!("passed file {shown}: not a normalised absolute path"),
            )
        })?;
    let allowed = {
        let list = allowlist.read().unwrap_or_else(|p| p.into_inner());
        list.allows(ListType::Open, &normal)
    };
    if !allowed {
        return Err(RemoteError::new(
            libc::EACCES,
            format!("passed file {shown} is not on the open allowlist of the receiving side: add it there with qtcfg -w open -x {shown}"),
        ));
    }
    let flags = OFlag::from_bits_truncate(flags as i32);
    let acc = flags & OFlag::O_ACCMODE;
    if acc != OFlag::O_RDONLY && acc != OFlag::O_WRONLY && acc != OFlag::O_RDWR {
        return Err(RemoteError::new(
            libc::EINVAL,
            format!("passed file {shown}: bad access mode"),
        ));
    }
    let failed = |step: &str, e: nix::errno::Errno| {
        RemoteError::new(
            e as i32,
            format!("cannot reopen passed file {shown} on the receiving side ({step}): {e}"),
        )
    };
    let how = nix::fcntl::OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(
            nix::fcntl::ResolveFlag::RESOLVE_NO_SYMLINKS
                | nix::fcntl::ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
    let handle =
        nix::fcntl::openat2(nix::fcntl::AT_FDCWD, path, how).map_err(|e| failed("open", e))?;
    let st = fstat(&handle).map_err(|e| failed("stat", e))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(RemoteError::new(
            libc::EOPNOTSUPP,
            format!("passed file {shown} is not a regular file on the receiving side"),
        ));
    }
    let fd = nix::fcntl::open(
        proc_fd(&handle).as_str(),
        acc | (flags & OFlag::O_APPEND) | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
        Mode::empty(),
    )
    .map_err(|e| failed("open", e))?;
    let offset = i64::try_from(offset).map_err(|_| failed("seek", nix::errno::Errno::EINVAL))?;
    nix::unistd::lseek(&fd, offset, nix::unistd::Whence::SeekSet).map_err(|e| failed("seek", e))?;
    Ok(fd)
}

fn nonblocking_async(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL)?);
    fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    async_fd(fd)
}

/// Pipe → stream: reads the pipe end until EOF (every writer closed), then finishes the
/// stream and waits for the peer's fin. The peer finishing or resetting early means its
/// reader went away: the pipe end is closed, so local writers get EPIPE.
async fn pipe_out(
    fd: AsyncFd<OwnedFd>,
    mut r: StreamReader,
    mut w: StreamWriter,
) -> Result<(), RemoteError> {
    let mut buf = BytesMut::with_capacity(PIPE_CHUNK);
    loop {
        tokio::select! {
            ready = fd.readable() => {
                let mut guard = ready?;
                let at = buf.len();
                buf.resize(at + PIPE_CHUNK, 0);
                let got = guard.try_io(|inner| {
                    nix::unistd::read(inner.get_ref(), &mut buf[at..]).map_err(io::Error::from)
                });
                match got {
                    Ok(Ok(0)) => break,
                    Ok(Ok(n)) => {
                        buf.truncate(at + n);
                        w.send(buf.split().freeze()).await?;
                    }
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_would_block) => buf.truncate(at),
                }
            }
            got = r.recv() => return unused_direction(got),
        }
    }
    drop(fd);
    w.finish().await?;
    // Dropping `r` before the peer's fin would reset the stream and cut our data short.
    unused_direction(r.recv().await)
}

/// The direction of a pipe stream that carries no data ended (`Ok`), or carried data (a
/// protocol error).
fn unused_direction(got: Result<Option<Bytes>, RemoteError>) -> Result<(), RemoteError> {
    match got? {
        None => Ok(()),
        Some(_) => Err(RemoteError::new(
            libc::EPROTO,
            "data on the unused direction of a pipe stream",
        )),
    }
}

/// Stream → pipe: writes what arrives into the pipe end; the peer's fin closes it (local
/// readers see EOF). A reader that closed its end (EPIPE) resets the stream with EPIPE.
async fn pipe_in(
    fd: AsyncFd<OwnedFd>,
    mut r: StreamReader,
    mut w: StreamWriter,
) -> Result<(), RemoteError> {
    while let Some(mut data) = r.recv().await? {
        while !data.is_empty() {
            let mut guard = fd.writable().await?;
            let wrote = guard.try_io(|inner| {
                nix::unistd::write(inner.get_ref(), &data).map_err(io::Error::from)
            });
            match wrote {
                Ok(Ok(n)) => data.advance(n),
                Ok(Err(e)) => {
                    let e = RemoteError::from(e);
                    w.reset(e.clone());
                    return Err(e);
                }
                Err(_would_block) => {}
            }
        }
    }
    drop(fd);
    w.finish().await
}
