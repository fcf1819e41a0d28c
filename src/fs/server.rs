//! The engine-side qtfs executor: decodes fs requests, checks them against the allowlists in
//! one gate (`FsServer::gate`), and performs them on the HOST with the caller's credentials.
//!
//! Handles: a node table (node id -> O_PATH fd) and a file-handle table (fh -> open fd), both
//! per `FsServer`, i.e. per client connection, so everything a client held is closed when its
//! link goes away. Nodes are created only by resolving one client-supplied name component at
//! a time with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS) beneath
//! an already-resolved directory fd: no `..`, no `/`, no symlink is ever followed on the HOST
//! (the DPU kernel reads links and resolves them itself), and because operations address
//! inodes by fd, renaming a directory during resolution cannot move a request outside the
//! exported root.
//!
//! Allowlist semantics follow the original qtfs server (`in_white_list`): `[Mount]` is always
//! required (default deny); every other type restricts only when its list has entries — an
//! empty `[Open]` means "no restriction beyond `[Mount]`". Matching uses the HOST path the fd
//! refers to at that moment (`/proc/self/fd`), by whole components.
//!
//! Concurrency: syscalls run on an [`FsPool`] of dedicated threads (the engine's `<threads>`),
//! shared by every connection; each thread switches its own fsuid/fsgid/groups per request,
//! so a slow read occupies one thread while stats proceed on the others. Table mutexes are
//! held only for map operations, never across a syscall or an await.

use super::locks::{self, FileKey, LockTable};
use super::proto::{
    self, mount_flags, set, write_flags, Attr, Creds, DirEntry, Entry, Lock, Request, Response,
    SetTime, Time,
};
use super::sys;
use super::Errno;
use crate::allowlist::{ListType, SharedAllowlist};
use crate::daemon::logging::Throttle;
use bytes::Bytes;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Largest read the engine serves in one request (the client asks for at most max_read).
const MAX_READ: u32 = 16 << 20;
/// XATTR_SIZE_MAX from linux/limits.h.
const XATTR_MAX: usize = 65536;
/// NAME_MAX from linux/limits.h.
const NAME_MAX: usize = 255;
/// uid/gid "nobody" used by root squashing.
const NOBODY: u32 = 65534;

// ---------------------------------------------------------------- policy

/// What the gate asks of the allowlists. Implemented for the daemon's [`SharedAllowlist`];
/// [`StaticPolicy`] serves embedders and tests.
pub trait FsPolicy: Send + Sync + 'static {
    /// True when the list of type `t` has entries (and therefore restricts).
    fn restricted(&self, t: ListType) -> bool;
    /// True when `host_path` is an entry of type `t` or lies below one (whole components).
    fn allows(&self, t: ListType, host_path: &Path) -> bool;
}

impl FsPolicy for SharedAllowlist {
    fn restricted(&self, t: ListType) -> bool {
        // A poisoned lock still holds a consistent list (writers replace it whole).
        let a = self.read().unwrap_or_else(|e| e.into_inner());
        !a.entries(t).is_empty()
    }
    fn allows(&self, t: ListType, host_path: &Path) -> bool {
        let a = self.read().unwrap_or_else(|e| e.into_inner());
        a.allows(t, host_path)
    }
}

/// A fixed set of lists (component-wise prefix match on absolute paths).
#[derive(Debug, Clone, Default)]
pub struct StaticPolicy {
    lists: HashMap<ListType, Vec<PathBuf>>,
}

impl StaticPolicy {
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds `path` to the list of type `t`.
    pub fn with(mut self, t: ListType, path: impl Into<PathBuf>) -> Self {
        self.lists.entry(t).or_default().push(path.into());
        self
    }
}

impl FsPolicy for StaticPolicy {
    fn restricted(&self, t: ListType) -> bool {
        self.lists.get(&t).is_some_and(|l| !l.is_empty())
    }
    fn allows(&self, t: ListType, host_path: &Path) -> bool {
        // Path::starts_with compares whole components: /a/b covers /a/b/c, not /a/bc.
        self.lists
            .get(&t)
            .is_some_and(|l| l.iter().any(|p| host_path.starts_with(p)))
    }
}

// ---------------------------------------------------------------- pool

type Job = Box<dyn FnOnce() + Send>;

/// A bounded pool of dedicated threads for fs syscalls (the engine's `<threads>`).
/// Dedicated, not tokio's blocking pool, because each thread changes its own fsuid/fsgid,
/// groups and umask, which must never leak into unrelated blocking work.
pub struct FsPool {
    /// Job queue. Dropping the pool closes it and the workers exit after finishing what
    /// they hold.
    queue: Arc<JobQueue>,
    threads: usize,
    /// The engine's own identity, restored after a [`FsPool::quick`] call.
    own: Creds,
    /// The process umask was 0 when the pool started (the engine sets it so), so creating
    /// syscalls may run on runtime threads too: pool threads get umask 0 by unsharing their
    /// fs_struct, runtime threads share the process's.
    umask_zero: bool,
}

/// The pool's job queue: one lock and one condition variable, so a job wakes exactly one idle
/// worker (a shared `mpsc::Receiver` behind a mutex woke two: the receiver, then the next
/// thread waiting for the mutex).
#[derive(Default)]
struct JobQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
    /// Workers running a job now.
    busy: AtomicUsize,
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    closed: bool,
}

impl JobQueue {
    fn push(&self, job: Job) {
        self.lock().jobs.push_back(job);
        self.ready.notify_one();
    }

    /// The next job; `None` once the queue is closed and empty.
    fn take(&self) -> Option<Job> {
        let mut st = self.lock();
        loop {
            if let Some(job) = st.jobs.pop_front() {
                return Some(job);
            }
            if st.closed {
                return None;
            }
            st = self.ready.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// A worker's life: runs jobs, counted in `busy`, until the queue is closed and empty.
    fn serve(&self) {
        while let Some(job) = self.take() {
            self.busy.fetch_add(1, Ordering::Relaxed);
            job();
            self.busy.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FsPool {
    fn drop(&mut self) {
        self.queue.close();
    }
}

thread_local! {
    /// The credentials this pool thread currently has (None: the engine's own).
    static CURRENT: RefCell<Option<Creds>> = const { RefCell::new(None) };
}

impl FsPool {
    /// Starts `threads` worker threads (at least 1).
    pub fn new(threads: usize) -> io::Result<Arc<FsPool>> {
        let nofile = sys::raise_nofile();
        if nofile < 65536 {
            tracing::warn!(limit = nofile, "the engine may hold only {nofile} files and nodes for its mounts (RLIMIT_NOFILE, which it could not raise): a DPU walking a larger tree gets EMFILE; raise LimitNOFILE (the unit file sets 1048576) or ulimit -Hn");
        }
        let threads = threads.max(1);
        let queue = Arc::new(JobQueue::default());
        for i in 0..threads {
            let queue = queue.clone();
            std::thread::Builder::new().name(format!("qtfs-io-{i}")).spawn(move || {
                if let Err(e) = sys::private_fs_umask_zero() {
                    tracing::warn!(error = %e, "qtfs worker could not get a private umask; created files follow the engine's umask");
                }
                queue.serve();
            })?;
        }
        let own = Creds {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            groups: nix::unistd::getgroups()
                .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
                .unwrap_or_default(),
        };
        Ok(Arc::new(FsPool {
            queue,
            threads,
            own,
            umask_zero: sys::process_umask() == Some(0),
        }))
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Workers running a syscall now, and jobs waiting for one: when `queued` stays above
    /// zero the pool is the bottleneck (raise `<threads>`).
    pub fn load(&self) -> (usize, usize) {
        (
            self.queue.busy.load(Ordering::Relaxed),
            self.queue.lock().jobs.len(),
        )
    }

    /// Runs `f` on a worker, as `creds` when given (otherwise with whatever identity the
    /// thread has: used for fd-based ops, whose permission was checked at open).
    async fn run<T, F>(&self, creds: Option<Creds>, f: F) -> Result<T, Errno>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let r = match creds {
                Some(c) => assume(&c).and_then(|()| f()),
                None => f(),
            };
            let _ = tx.send(r);
        });
        self.queue.push(job);
        match rx.await {
            Ok(r) => r.map_err(Errno::from),
            Err(_) => Err(Errno(libc::EIO)),
        }
    }
}

impl FsPool {
    /// Runs `f` right here, on the calling runtime thread, as `creds` when given, then
    /// switches the thread back to the engine's own identity. For short metadata syscalls
    /// that create nothing (lookup, stat, access, readlink, xattr reads, unlink, rename): two
    /// thread hand-offs to and from the pool cost more than the syscall itself. Nothing else
    /// runs on this thread meanwhile (no await inside), so no other task sees the identity.
    async fn quick<T, F>(&self, creds: Option<Creds>, f: F) -> Result<T, Errno>
    where
        F: FnOnce() -> io::Result<T>,
    {
        let Some(c) = creds else {
            return f().map_err(Errno::from);
        };
        let r = sys::set_thread_creds(c.uid, c.gid, &c.groups).and_then(|()| f());
        if let Err(e) = sys::set_thread_creds(self.own.uid, self.own.gid, &self.own.groups) {
            // Not a privilege gain (the thread keeps a caller's, lesser, identity), but the
            // next quick call switches again anyway; say it loudly.
            tracing::error!(error = %e, "qtfs: could not restore the engine's identity on a runtime thread");
        }
        r.map_err(Errno::from)
    }
}

impl FsPool {
    /// [`FsPool::quick`] for syscalls that create (their mode must not be masked again),
    /// when the process umask is 0; otherwise [`FsPool::run`] on a pool thread.
    async fn creating<T, F>(&self, creds: Option<Creds>, f: F) -> Result<T, Errno>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        if self.umask_zero {
            self.quick(creds, f).await
        } else {
            self.run(creds, f).await
        }
    }
}

/// Reads what the page cache holds of `buf.len()` bytes at `offset`, without blocking:
/// (bytes read, end of file reached).
fn read_cached(fd: RawFd, buf: &mut [u8], offset: u64) -> Result<(usize, bool), Errno> {
    let mut got = 0;
    while got < buf.len() {
        match sys::pread_nowait(fd, &mut buf[got..], offset + got as u64)? {
            Some(0) => return Ok((got, true)),
            Some(n) => got += n,
            None => break,
        }
    }
    Ok((got, false))
}

/// Writes `data` at `offset` with as many pwrites as it takes. An error after some progress
/// (a disk that fills up) gives the count so far, which the writer sees as a short write and
/// meets the error on its next one; but the kernel's write-back of cached pages (`whole`)
/// ignores the count, so the rest would be lost without a word: that gets the error.
fn write_at(fd: RawFd, data: &[u8], offset: u64, whole: bool) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        match sys::pwrite(fd, &data[done..], offset + done as u64) {
            Ok(0) => return Err(io::Error::from_raw_os_error(libc::EIO)),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if done > 0 && !whole => {
                tracing::debug!(error = %e, done, "short write");
                return Ok(done);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The flags of a DPU open as the HOST file is opened with. O_DIRECT stays on the DPU (its
/// kernel then bypasses its own page cache for the file): the engine's buffers arrive from
/// the network at no particular alignment, so a HOST O_DIRECT file would refuse every
/// write with EINVAL (virtiofsd drops it the same way).
fn host_open_flags(flags: i32) -> i32 {
    flags & !libc::O_DIRECT
}

/// Switches the current pool thread to `c` unless it already has it.
fn assume(c: &Creds) -> io::Result<()> {
    CURRENT.with(|cur| {
        let mut cur = cur.borrow_mut();
        if cur.as_ref() == Some(c) {
            return Ok(());
        }
        *cur = None;
        sys::set_thread_creds(c.uid, c.gid, &c.groups)?;
        *cur = Some(c.clone());
        Ok(())
    })
}

// ---------------------------------------------------------------- tables

/// The open a reconnecting client's Reopen repeats: checked and run as that request.
fn reopened_as(node: u64, flags: i32, dir: bool) -> Request {
    if dir {
        Request::Opendir { node }
    } else {
        Request::Open { node, flags }
    }
}

/// The directories a request changes: the parent, and a rename's or link's new parent
/// when it is another directory.
fn changed_dirs(req: &Request) -> [Option<u64>; proto::MAX_CHANGED_DIRS] {
    use Request::*;
    match req {
        Create { parent, .. }
        | Mknod { parent, .. }
        | Mkdir { parent, .. }
        | Symlink { parent, .. }
        | Unlink { parent, .. }
        | Rmdir { parent, .. } => [Some(*parent), None],
        Link { newparent, .. } => [Some(*newparent), None],
        Rename {
            parent, newparent, ..
        } => [Some(*parent), (newparent != parent).then_some(*newparent)],
        _ => [None, None],
    }
}

/// Largest node or handle id a reconnecting client may ask for: far above what a connection
/// allocates, far below where the id counter would wrap (or the client's synthetic inodes).
const MAX_CLIENT_ID: u64 = 1 << 48;

/// Engine-side options of one connection's executor.
#[derive(Clone)]
pub struct FsServerOptions {
    /// The shared syscall pool.
    pub pool: Arc<FsPool>,
}

struct MountRec {
    flags: u32,
    /// The canonical HOST path of the export root.
    root: PathBuf,
}

struct Node {
    fd: Arc<OwnedFd>,
    mount: usize,
    key: (usize, u64, u64),
    nlookup: u64,
}

struct Handle {
    fd: OwnedFd,
    mount: usize,
    /// Serialises lseek+getdents on directory handles (the fd offset is shared).
    dir: Mutex<()>,
}

#[derive(Default)]
struct Tables {
    mounts: Vec<MountRec>,
    nodes: HashMap<u64, Node>,
    by_key: HashMap<(usize, u64, u64), u64>,
    files: HashMap<u64, Arc<Handle>>,
    /// Node ids of mount roots (their `..` is themselves).
    roots: std::collections::HashSet<u64>,
    /// The DPU lock owners' holders of HOST files.
    locks: LockTable,
}

impl Tables {
    /// One more lookup on the node of the inode `st` describes, if this mount has one.
    fn look_up_known(&mut self, mount: usize, st: &libc::stat64) -> Option<Entry> {
        let id = *self.by_key.get(&(mount, st.st_dev, st.st_ino))?;
        self.nodes.get_mut(&id)?.nlookup += 1;
        Some(Entry {
            node: id,
            attr: attr_of(st),
        })
    }

    /// Adds node `id` for the inode `key`.
    fn insert_node(
        &mut self,
        id: u64,
        fd: OwnedFd,
        mount: usize,
        key: (usize, u64, u64),
        nlookup: u64,
    ) {
        self.by_key.insert(key, id);
        let fd = Arc::new(fd);
        self.nodes.insert(
            id,
            Node {
                fd,
                mount,
                key,
                nlookup,
            },
        );
    }
}

/// One connection's fs executor. Cheap to create per accepted link.
pub struct FsServer {
    policy: Arc<dyn FsPolicy>,
    pool: Arc<FsPool>,
    /// Node and handle tables; locked only for map operations.
    tables: Mutex<Tables>,
    next_id: AtomicU64,
    /// Held while a lock holder is opened, so two threads of one owner never open two.
    holder_opening: tokio::sync::Mutex<()>,
}

/// What the gate resolved for dispatch.
struct Grant {
    creds: Creds,
    /// For Mount: the canonical HOST path that was checked.
    mount_path: Option<PathBuf>,
}

fn name_of(b: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(b))
}

/// A single path component from the client: non-empty, no '/', no NUL, not '.' or '..',
/// at most NAME_MAX bytes.
fn check_name(b: &[u8]) -> Result<(), Errno> {
    if b.len() > NAME_MAX {
        return Err(Errno(libc::ENAMETOOLONG));
    }
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(Errno(libc::EINVAL));
    }
    Ok(())
}

fn to_time(sec: i64, nsec: i64) -> Time {
    Time {
        sec,
        nsec: nsec.clamp(0, 999_999_999) as u32,
    }
}

fn attr_of(st: &libc::stat64) -> Attr {
    Attr {
        ino: st.st_ino,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: to_time(st.st_atime, st.st_atime_nsec),
        mtime: to_time(st.st_mtime, st.st_mtime_nsec),
        ctime: to_time(st.st_ctime, st.st_ctime_nsec),
        mode: st.st_mode,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev,
        blksize: st.st_blksize as u32,
    }
}

/// Filesystems whose file sizes do not describe their content (the client reads them
/// with direct I/O): proc, sysfs, cgroup v1/v2, debugfs, tracefs, securityfs, configfs,
/// bpf, pstore, efivarfs (magic numbers from linux/magic.h).
fn is_pseudo_fs(magic: i64) -> bool {
    matches!(
        magic,
        0x9fa0
            | 0x6265_6572
            | 0x0027_e0eb
            | 0x6367_7270
            | 0x6462_6720
            | 0x7472_6163
            | 0x7363_6673
            | 0x6265_6570
            | 0xcafe_4a11
            | 0x6165_676c
            | 0xde5e_81e4
    )
}

fn timespec(t: SetTime) -> libc::timespec {
    match t {
        SetTime::Omit => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        SetTime::Now => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        SetTime::At(t) => libc::timespec {
            tv_sec: t.sec,
            tv_nsec: t.nsec as i64,
        },
    }
}

/// Warnings a reconnecting client or a busy mount would otherwise repeat many times a
/// second: each path once a minute, engine-wide.
static PATH_WARNINGS: Throttle<PathBuf> = Throttle::new(std::time::Duration::from_secs(60));

/// POSIX lock range from FUSE (`end` inclusive, OFFSET_MAX = to EOF) to a flock64.
fn flock_of(l: &Lock) -> libc::flock64 {
    // SAFETY-free: flock64 is plain data, built field by field.
    let len = if l.end >= i64::MAX as u64 {
        0
    } else {
        (l.end - l.start.min(l.end)) as i64 + 1
    };
    libc::flock64 {
        l_type: l.typ as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: l.start as i64,
        l_len: len,
        l_pid: 0,
    }
}

impl FsServer {
    /// An executor checking requests against the daemon's allowlists.
    pub fn new(allowlist: SharedAllowlist, opts: FsServerOptions) -> FsServer {
        Self::with_policy(Arc::new(allowlist), opts)
    }

    /// An executor with any [`FsPolicy`].
    pub fn with_policy(policy: Arc<dyn FsPolicy>, opts: FsServerOptions) -> FsServer {
        FsServer {
            policy,
            pool: opts.pool,
            tables: Mutex::new(Tables::default()),
            // Node and handle ids share one counter; 1 is never used (FUSE's root ino).
            next_id: AtomicU64::new(2),
            holder_opening: tokio::sync::Mutex::new(()),
        }
    }

    /// Number of live nodes (for status and leak tests).
    pub fn node_count(&self) -> usize {
        self.lock().nodes.len()
    }

    /// Number of open file handles.
    pub fn handle_count(&self) -> usize {
        self.lock().files.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decodes, gates and executes one request; the error is the HOST's errno.
    pub async fn handle(&self, op: u16, payload: Bytes) -> Result<Bytes, Errno> {
        let (creds, req) = Request::decode(op, &payload).map_err(|e| {
            tracing::warn!(op, error = %e, "malformed qtfs request");
            Errno(libc::EINVAL)
        })?;
        let grant = self.gate(creds, &req)?;
        let dirs = changed_dirs(&req);
        let r = self.dispatch(grant, req).await;
        if let Err(Errno(libc::EMFILE | libc::ENFILE)) = r {
            self.out_of_fds();
        }
        r.map(|r| self.with_dir_attrs(r, dirs).encode())
    }

    /// `resp` followed by the attributes of the directories a change touched, for a mount
    /// that asked ([`mount_flags::DIR_ATTRS`]): its kernel needs them (the mode, for its own
    /// permission checks) before the next operation in the same directory, and would
    /// otherwise ask with a GETATTR round trip each time.
    fn with_dir_attrs(
        &self,
        resp: Response,
        dirs: [Option<u64>; proto::MAX_CHANGED_DIRS],
    ) -> Response {
        let Some(first) = dirs[0] else {
            return resp;
        };
        let fds: Vec<(u64, Arc<OwnedFd>)> = {
            let t = self.lock();
            let wanted = t.nodes.get(&first).is_some_and(|n| {
                t.mounts
                    .get(n.mount)
                    .is_some_and(|m| m.flags & mount_flags::DIR_ATTRS != 0)
            });
            if !wanted {
                return resp;
            }
            dirs.iter()
                .flatten()
                .filter_map(|d| t.nodes.get(d).map(|n| (*d, n.fd.clone())))
                .collect()
        };
        // fstat of an O_PATH fd: no permission involved, and nothing that waits on a disk
        // (the change just brought the inode into memory).
        let dirs = fds
            .into_iter()
            .filter_map(|(d, fd)| sys::fstat(fd.as_raw_fd()).ok().map(|st| (d, attr_of(&st))))
            .collect();
        Response::InDirs {
            inner: Box::new(resp),
            dirs,
        }
    }

    /// Says loudly (at most every 10 s) that a request failed for lack of
    /// file descriptors: each node the DPU kernel caches holds one here.
    fn out_of_fds(&self) {
        static LAST: AtomicU64 = AtomicU64::new(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = LAST.load(Ordering::Relaxed);
        if now >= last + 10
            && LAST
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let (nodes, files) = {
                let t = self.lock();
                (t.nodes.len(), t.files.len())
            };
            tracing::warn!(nodes, files, "qtfs: the engine ran out of file descriptors (it holds one per node a DPU has cached and per open file); raise LimitNOFILE / ulimit -n");
        }
    }

    fn node(&self, id: u64) -> Result<(Arc<OwnedFd>, usize), Errno> {
        let t = self.lock();
        t.nodes
            .get(&id)
            .map(|n| (n.fd.clone(), n.mount))
            .ok_or(Errno(libc::ESTALE))
    }

    fn handle_of(&self, fh: u64) -> Result<Arc<Handle>, Errno> {
        self.lock()
            .files
            .get(&fh)
            .cloned()
            .ok_or(Errno(libc::EBADF))
    }

    fn mount_flags(&self, mount: usize) -> u32 {
        self.lock().mounts.get(mount).map_or(0, |m| m.flags)
    }

    fn mount_root(&self, mount: usize) -> Option<PathBuf> {
        self.lock().mounts.get(mount).map(|m| m.root.clone())
    }

    /// EACCES once the export `mount` is no longer covered by a `[Mount]` entry (an operator
    /// removed it with qtcfg): the allowlist governs existing mounts too, from their next
    /// request on.
    fn still_exported(&self, mount: usize) -> Result<(), Errno> {
        let Some(root) = self.mount_root(mount) else {
            return Err(Errno(libc::ESTALE));
        };
        if self.policy.allows(ListType::Mount, &root) {
            return Ok(());
        }
        if PATH_WARNINGS.due(root.clone()) {
            tracing::warn!(list = %ListType::Mount, path = %root.display(), "qtfs request on a mount whose [Mount] entry was removed: denied");
        }
        Err(Errno(libc::EACCES))
    }

    /// The single policy gate, run before dispatch: name validation, read-only mounts,
    /// root squashing, and the per-type allowlists. Denials return EACCES and log the
    /// type and HOST path.
    fn gate(&self, creds: Creds, req: &Request) -> Result<Grant, Errno> {
        use ListType as T;
        use Request::*;
        // Which node (or parent) decides the mount, and which (type, target) checks apply.
        enum Target<'a> {
            Node(u64),
            Child(u64, &'a [u8]),
        }
        let writes = |flags: i32| {
            let acc = flags & libc::O_ACCMODE;
            acc == libc::O_WRONLY || acc == libc::O_RDWR || flags & libc::O_TRUNC != 0
        };
        let mut checks: Vec<(ListType, Target)> = Vec::new();
        let mut modifies = false;
        let anchor: Option<u64> = match req {
            Mount { path, .. } => {
                let lexical = PathBuf::from(OsStr::from_bytes(path));
                if !lexical.is_absolute() || path.contains(&0) {
                    return Err(Errno(libc::EINVAL));
                }
                // Check the real path: a symlink inside an allowed tree must not export
                // whatever it points to.
                let real = std::fs::canonicalize(&lexical).map_err(Errno::from)?;
                if !self.policy.allows(T::Mount, &real) {
                    // A mount that keeps reconnecting asks every few seconds: say it once a minute.
                    if PATH_WARNINGS.due(real.clone()) {
                        tracing::warn!(list = %T::Mount, path = %real.display(), "qtfs mount denied by allowlist: add it with `qtcfg -w mount -x <path>`");
                    }
                    return Err(Errno(libc::EACCES));
                }
                return Ok(Grant {
                    creds,
                    mount_path: Some(real),
                });
            }
            Lookup { parent, name } => {
                if name != b"." && name != b".." {
                    check_name(name)?;
                }
                Some(*parent)
            }
            // A reconnecting client's lookups and opens are checked as the originals were.
            Relookup { parent, name, .. } => {
                check_name(name)?;
                let like = Lookup {
                    parent: *parent,
                    name: name.clone(),
                };
                return self.gate(creds, &like);
            }
            Reopen {
                node, flags, dir, ..
            } => return self.gate(creds, &reopened_as(*node, *flags, *dir)),
            Getattr { node, .. }
            | Readlink { node }
            | Statfs { node }
            | Getxattr { node, .. }
            | Listxattr { node, .. }
            | Access { node, .. } => Some(*node),
            Setattr { node, .. } => {
                modifies = true;
                checks.push((T::Setattr, Target::Node(*node)));
                Some(*node)
            }
            Setxattr { node, name, .. } | Removexattr { node, name } => {
                if name.is_empty() || name.contains(&0) {
                    return Err(Errno(libc::EINVAL));
                }
                modifies = true;
                checks.push((T::Setxattr, Target::Node(*node)));
                Some(*node)
            }
            Mknod { parent, name, .. } | Symlink { parent, name, .. } => {
                check_name(name)?;
                modifies = true;
                checks.push((T::Create, Target::Child(*parent, name)));
                Some(*parent)
            }
            Link {
                node,
                newparent,
                newname,
            } => {
                check_name(newname)?;
                modifies = true;
                checks.push((T::Create, Target::Child(*newparent, newname)));
                // A new name must not give the inode what its current name does not allow
                // (a link from a read-only area into a writable one would make the file
                // writable), so the source must pass every list a file is used under.
                for t in [T::Open, T::Read, T::Write, T::Setattr, T::Setxattr] {
                    checks.push((t, Target::Node(*node)));
                }
                Some(*newparent)
            }
            Mkdir { parent, name, .. } => {
                check_name(name)?;
                modifies = true;
                checks.push((T::Mkdir, Target::Child(*parent, name)));
                Some(*parent)
            }
            Rmdir { parent, name } => {
                check_name(name)?;
                modifies = true;
                checks.push((T::Rmdir, Target::Child(*parent, name)));
                Some(*parent)
            }
            Unlink { parent, name } => {
                check_name(name)?;
                modifies = true;
                checks.push((T::Unlink, Target::Child(*parent, name)));
                Some(*parent)
            }
            Rename {
                parent,
                name,
                newparent,
                newname,
                ..
            } => {
                check_name(name)?;
                check_name(newname)?;
                modifies = true;
                checks.push((T::Rename, Target::Child(*parent, name)));
                checks.push((T::Rename, Target::Child(*newparent, newname)));
                Some(*parent)
            }
            Open { node, flags } => {
                checks.push((T::Open, Target::Node(*node)));
                let acc = flags & libc::O_ACCMODE;
                if acc == libc::O_RDONLY || acc == libc::O_RDWR {
                    checks.push((T::Read, Target::Node(*node)));
                }
                if writes(*flags) {
                    modifies = true;
                    checks.push((T::Write, Target::Node(*node)));
                }
                Some(*node)
            }
            Create {
                parent,
                name,
                flags,
                ..
            } => {
                check_name(name)?;
                modifies = true;
                checks.push((T::Create, Target::Child(*parent, name)));
                checks.push((T::Open, Target::Child(*parent, name)));
                if writes(*flags) {
                    checks.push((T::Write, Target::Child(*parent, name)));
                }
                Some(*parent)
            }
            Opendir { node } => {
                checks.push((T::Readdir, Target::Node(*node)));
                Some(*node)
            }
            Readdir { node, .. } => Some(*node),
            // fh-based ops were authorised when the handle was opened; forget touches
            // nothing on the HOST.
            Forget { .. }
            | Read { .. }
            | Write { .. }
            | Flush { .. }
            | Release { .. }
            | Fsync { .. }
            | Getlk { .. }
            | Setlk { .. }
            | Lseek { .. }
            | Reserve { .. } => None,
            Fallocate { fh, .. } | CopyFileRange { fh_out: fh, .. } => {
                let h = self.handle_of(*fh)?;
                if self.mount_flags(h.mount) & mount_flags::READ_ONLY != 0 {
                    return Err(Errno(libc::EROFS));
                }
                None
            }
        };
        // An export whose [Mount] entry was removed is closed to every request but clean-up.
        let mount_of_handle = match req {
            Read { fh, .. }
            | Write { fh, .. }
            | Fsync { fh, .. }
            | Getlk { fh, .. }
            | Setlk { fh, .. }
            | Lseek { fh, .. }
            | Fallocate { fh, .. }
            | CopyFileRange { fh_out: fh, .. } => Some(self.handle_of(*fh)?.mount),
            _ => None,
        };
        if let Some(mount) = mount_of_handle {
            self.still_exported(mount)?;
        }
        let mut creds = creds;
        let mut root = None;
        if let Some(id) = anchor {
            let (_, mount) = self.node(id)?;
            self.still_exported(mount)?;
            root = self.mount_root(mount);
            let flags = self.mount_flags(mount);
            if modifies && flags & mount_flags::READ_ONLY != 0 {
                return Err(Errno(libc::EROFS));
            }
            if flags & mount_flags::ROOT_SQUASH != 0 {
                if creds.uid == 0 {
                    creds.uid = NOBODY;
                }
                if creds.gid == 0 {
                    creds.gid = NOBODY;
                }
                creds.groups.retain(|g| *g != 0);
            }
        }
        // Every op that resolves a name, opens, or modifies first verifies that the nodes
        // it starts from are still beneath the export root: a directory moved out of the
        // tree on the HOST keeps its node fd, and must not become a way outside.
        let resolves = !matches!(
            req,
            Getattr { .. }
                | Readlink { .. }
                | Statfs { .. }
                | Getxattr { .. }
                | Listxattr { .. }
                | Access { .. }
                | Readdir { .. }
        );
        if let (Some(root), true) = (&root, resolves) {
            let mut ids: Vec<u64> = anchor.into_iter().collect();
            for (_, target) in &checks {
                let id = match target {
                    Target::Node(id) | Target::Child(id, _) => *id,
                };
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            if let Link { node, .. } = req {
                ids.push(*node);
            }
            for id in ids {
                let path = sys::fd_path(self.node(id)?.0.as_raw_fd()).map_err(Errno::from)?;
                if !path.starts_with(root) {
                    tracing::warn!(path = %path.display(), root = %root.display(), "qtfs request on a node that left the export root");
                    return Err(Errno(libc::ENOENT));
                }
            }
        }
        for (t, target) in checks {
            if !self.policy.restricted(t) {
                continue;
            }
            let path = match target {
                Target::Node(id) => sys::fd_path(self.node(id)?.0.as_raw_fd()),
                Target::Child(id, name) => {
                    sys::fd_path(self.node(id)?.0.as_raw_fd()).map(|p| p.join(name_of(name)))
                }
            }
            .map_err(Errno::from)?;
            if !self.policy.allows(t, &path) {
                tracing::warn!(list = %t, path = %path.display(), uid = creds.uid, "qtfs operation denied by allowlist");
                return Err(Errno(libc::EACCES));
            }
        }
        Ok(Grant {
            creds,
            mount_path: None,
        })
    }

    fn alloc_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a freshly resolved O_PATH fd as a node (or bumps the lookup count of the
    /// node already holding that inode) and returns the entry for the client.
    fn register(&self, fd: OwnedFd, st: &libc::stat64, mount: usize) -> Entry {
        let key = (mount, st.st_dev, st.st_ino);
        let mut t = self.lock();
        if let Some(entry) = t.look_up_known(mount, st) {
            return entry;
        }
        let id = self.alloc_id();
        t.insert_node(id, fd, mount, key, 1);
        Entry {
            node: id,
            attr: attr_of(st),
        }
    }

    /// Registers a node resolved for a reconnecting client under the id the client
    /// already uses, with the lookups the client's kernel holds.
    fn adopt(
        &self,
        fd: OwnedFd,
        st: &libc::stat64,
        mount: usize,
        id: u64,
        nlookup: u64,
    ) -> Result<Entry, Errno> {
        if !(2..=MAX_CLIENT_ID).contains(&id) || nlookup == 0 {
            return Err(Errno(libc::EINVAL));
        }
        let key = (mount, st.st_dev, st.st_ino);
        let mut t = self.lock();
        if t.nodes.contains_key(&id) || t.by_key.contains_key(&key) {
            return Err(Errno(libc::EEXIST));
        }
        self.next_id.fetch_max(id + 1, Ordering::Relaxed);
        t.insert_node(id, fd, mount, key, nlookup);
        Ok(Entry {
            node: id,
            attr: attr_of(st),
        })
    }

    fn forget(&self, id: u64, n: u64) {
        let mut t = self.lock();
        let gone = match t.nodes.get_mut(&id) {
            Some(node) => {
                node.nlookup = node.nlookup.saturating_sub(n);
                node.nlookup == 0
            }
            None => false,
        };
        if gone {
            if let Some(node) = t.nodes.remove(&id) {
                t.by_key.remove(&node.key);
            }
        }
    }

    fn add_handle(&self, fd: OwnedFd, mount: usize) -> u64 {
        let id = self.alloc_id();
        let h = Handle {
            fd,
            mount,
            dir: Mutex::new(()),
        };
        self.lock().files.insert(id, Arc::new(h));
        id
    }

    /// The HOST file handle `h` is open on, when DPU processes can lock it through qtfs:
    /// regular files only. Re-opening anything else has side effects (a FIFO held open for
    /// writing never shows its readers EOF; a device may act on open).
    fn lockable(h: &Handle) -> Result<Option<FileKey>, Errno> {
        let st = sys::fstat(h.fd.as_raw_fd())?;
        let regular = st.st_mode & libc::S_IFMT == libc::S_IFREG;
        Ok(regular.then_some((st.st_dev, st.st_ino)))
    }

    /// The open file that holds `owner`'s locks on `file` and can take `lock`, opened
    /// (from handle `h`) when there is none yet or the one there is read-only.
    async fn holder(
        &self,
        h: &Arc<Handle>,
        fh: u64,
        owner: u64,
        file: FileKey,
        lock: &Lock,
    ) -> Result<Arc<OwnedFd>, Errno> {
        let usable = |me: &Self| me.lock().locks.usable(owner, file, lock.typ, fh, lock.pid);
        if let Some(fd) = usable(self) {
            return Ok(fd);
        }
        let _opening = self.holder_opening.lock().await;
        if let Some(fd) = usable(self) {
            return Ok(fd);
        }
        let old = self.lock().locks.held_by(owner, file);
        let (src, typ) = (h.clone(), lock.typ);
        let (fd, mode) = self
            .pool
            .run(Some(self.pool.own.clone()), move || {
                locks::open_holder(src.fd.as_raw_fd(), typ, old.as_ref().map(|o| o.as_raw_fd()))
            })
            .await?;
        let fd = Arc::new(fd);
        let replaced = self
            .lock()
            .locks
            .insert(owner, file, fd.clone(), mode, fh, lock.pid);
        if let Some(old) = replaced {
            // Its locks moved to the new holder; closing it must not wait on a runtime thread.
            self.pool
                .run(None, move || {
                    locks::let_go(old);
                    Ok(())
                })
                .await?;
        }
        Ok(fd)
    }

    /// Resolves `name` beneath `dir` as an O_PATH node fd and stats it.
    fn lookup_at(dir: RawFd, name: &[u8]) -> io::Result<(OwnedFd, libc::stat64)> {
        let c = sys::cstr(name)?;
        let fd = sys::openat2(
            dir,
            &c,
            libc::O_PATH | libc::O_NOFOLLOW,
            0,
            sys::RESOLVE_STRICT,
        )?;
        let st = sys::fstat(fd.as_raw_fd())?;
        Ok((fd, st))
    }

    async fn entry_after<F>(
        &self,
        creds: Creds,
        parent: u64,
        name: Vec<u8>,
        make: F,
    ) -> Result<Response, Errno>
    where
        F: FnOnce(RawFd, &std::ffi::CStr) -> io::Result<()> + Send + 'static,
    {
        let (pfd, mount) = self.node(parent)?;
        let (fd, st) = self
            .pool
            .creating(Some(creds), move || {
                let c = sys::cstr(&name)?;
                make(pfd.as_raw_fd(), &c)?;
                Self::lookup_at(pfd.as_raw_fd(), &name)
            })
            .await?;
        Ok(Response::Entry(self.register(fd, &st, mount)))
    }

    /// A write to a set-user-ID or set-group-ID file by a process without CAP_FSETID. It runs
    /// as the writer, so the HOST kernel clears exactly what a local write there clears
    /// (set-group-ID without group execute stays for a member of the file's group, for one),
    /// although the writer may not chmod the file. A writer with uid 0 keeps the engine's
    /// capabilities, so for it the bits are cleared here, by the classic rule. The answer
    /// says whether the mode changed.
    async fn write_dropping_privileges(
        &self,
        creds: Creds,
        h: Arc<Handle>,
        offset: u64,
        flags: u32,
        data: Bytes,
        before: u32,
    ) -> Result<Response, Errno> {
        let as_root = creds.uid == 0;
        let whole = flags & write_flags::CACHED != 0;
        let (n, after) = self
            .pool
            .run(Some(creds), move || {
                let fd = h.fd.as_raw_fd();
                if as_root {
                    sys::kill_suid_sgid(fd)?;
                }
                let n = write_at(fd, &data, offset, whole)?;
                Ok((n, sys::fstat(fd)?.st_mode))
            })
            .await?;
        Ok(Response::Written {
            count: n as u64,
            killed: after != before,
        })
    }

    async fn dispatch(&self, grant: Grant, req: Request) -> Result<Response, Errno> {
        use Request::*;
        let creds = grant.creds;
        let pool = &self.pool;
        match req {
            Mount { flags, .. } => {
                let path = grant.mount_path.ok_or(Errno(libc::EINVAL))?;
                let root = path.clone();
                let (fd, st) = pool
                    .run(None, move || {
                        let c = sys::cstr(sys::path_bytes(&path))?;
                        // The path was canonicalised and checked; refuse it if a symlink
                        // was swapped in since.
                        let fd = sys::openat2(
                            libc::AT_FDCWD,
                            &c,
                            libc::O_PATH | libc::O_DIRECTORY,
                            0,
                            libc::RESOLVE_NO_SYMLINKS,
                        )?;
                        let st = sys::fstat(fd.as_raw_fd())?;
                        Ok((fd, st))
                    })
                    .await?;
                let mount = {
                    let mut t = self.lock();
                    t.mounts.push(MountRec { flags, root });
                    t.mounts.len() - 1
                };
                tracing::info!(mount, "qtfs mount attached");
                let e = self.register(fd, &st, mount);
                self.lock().roots.insert(e.node);
                Ok(Response::Entry(e))
            }
            Lookup { parent, name } => {
                let (pfd, mount) = self.node(parent)?;
                if name == b"." {
                    let st = pool
                        .quick(None, move || sys::fstat(pfd.as_raw_fd()))
                        .await?;
                    let mut t = self.lock();
                    if let Some(n) = t.nodes.get_mut(&parent) {
                        n.nlookup += 1;
                    }
                    return Ok(Response::Entry(Entry {
                        node: parent,
                        attr: attr_of(&st),
                    }));
                }
                if name == b".." {
                    // The root's parent is the root itself: never step above the export.
                    let is_root = self.lock().roots.contains(&parent);
                    if is_root {
                        return Box::pin(self.dispatch(
                            Grant {
                                creds,
                                mount_path: None,
                            },
                            Lookup {
                                parent,
                                name: b".".to_vec(),
                            },
                        ))
                        .await;
                    }
                    let (fd, st) = pool
                        .quick(Some(creds), move || {
                            let fd = sys::openat2(
                                pfd.as_raw_fd(),
                                c"..",
                                libc::O_PATH,
                                0,
                                libc::RESOLVE_NO_MAGICLINKS,
                            )?;
                            let st = sys::fstat(fd.as_raw_fd())?;
                            Ok((fd, st))
                        })
                        .await?;
                    return Ok(Response::Entry(self.register(fd, &st, mount)));
                }
                let (fd, st) = pool
                    .quick(Some(creds), move || Self::lookup_at(pfd.as_raw_fd(), &name))
                    .await?;
                Ok(Response::Entry(self.register(fd, &st, mount)))
            }
            Forget { items } => {
                for (id, n) in items {
                    self.forget(id, n);
                }
                Ok(Response::Empty)
            }
            Reserve { floor } => {
                if floor > MAX_CLIENT_ID {
                    return Err(Errno(libc::EINVAL));
                }
                self.next_id.fetch_max(floor, Ordering::Relaxed);
                Ok(Response::Empty)
            }
            Relookup {
                parent,
                name,
                node,
                ino,
                nlookup,
            } => {
                // As the engine, like the mount itself: the client's kernel already holds
                // this node, and RESOLVE_BENEATH keeps the lookup inside the export.
                let (pfd, mount) = self.node(parent)?;
                let (fd, st) = pool
                    .quick(None, move || Self::lookup_at(pfd.as_raw_fd(), &name))
                    .await?;
                if st.st_ino != ino {
                    // Another file took the name while the client was away.
                    return Err(Errno(libc::ESTALE));
                }
                Ok(Response::Entry(self.adopt(fd, &st, mount, node, nlookup)?))
            }
            Reopen {
                node,
                fh,
                flags,
                dir,
            } => {
                if !(2..=MAX_CLIENT_ID).contains(&fh) {
                    return Err(Errno(libc::EINVAL));
                }
                let like = reopened_as(node, flags, dir);
                let grant = Grant {
                    creds,
                    mount_path: None,
                };
                let Response::Opened { fh: got, flags } =
                    Box::pin(self.dispatch(grant, like)).await?
                else {
                    return Err(Errno(libc::EIO));
                };
                let mut t = self.lock();
                if t.files.contains_key(&fh) {
                    t.files.remove(&got);
                    return Err(Errno(libc::EEXIST));
                }
                if let Some(h) = t.files.remove(&got) {
                    t.files.insert(fh, h);
                }
                self.next_id.fetch_max(fh + 1, Ordering::Relaxed);
                Ok(Response::Opened { fh, flags })
            }
            Getattr { node, fh } => {
                let fd = match fh.map(|f| self.handle_of(f)) {
                    Some(Ok(h)) => FdRef::Handle(h),
                    _ => FdRef::Node(self.node(node)?.0),
                };
                let st = pool.quick(None, move || sys::fstat(fd.raw())).await?;
                Ok(Response::Attr(attr_of(&st)))
            }
            Setattr { node, fh, set: s } => {
                let (nfd, _) = self.node(node)?;
                let hfd = fh.and_then(|f| self.handle_of(f).ok());
                let times = (s.valid & (set::ATIME | set::MTIME) != 0).then(|| {
                    let pick = |bit, t| if s.valid & bit != 0 { t } else { SetTime::Omit };
                    [
                        timespec(pick(set::ATIME, s.atime)),
                        timespec(pick(set::MTIME, s.mtime)),
                    ]
                });
                // Times that come with a handle (the kernel writing back the times of a file
                // open for writing, with `writeback`) or with a truncation are the kernel's
                // own clock, not a user's utimensat (which brings neither).
                let kernel_times = hfd.is_some() || s.valid & set::SIZE != 0;
                let (n, h) = (nfd.clone(), hfd.clone());
                let (st, refused) = pool
                    .run(Some(creds), move || {
                        let n = n.as_raw_fd();
                        let h = h.as_ref().map(|h| h.fd.as_raw_fd());
                        if s.valid & set::MODE != 0 {
                            sys::chmod_fd(n, s.mode & 0o7777)?;
                        }
                        if s.valid & (set::UID | set::GID) != 0 {
                            let uid = if s.valid & set::UID != 0 {
                                s.uid
                            } else {
                                u32::MAX
                            };
                            let gid = if s.valid & set::GID != 0 {
                                s.gid
                            } else {
                                u32::MAX
                            };
                            sys::chown_fd(n, uid, gid)?;
                        }
                        if s.valid & set::SIZE != 0 {
                            match h {
                                Some(h) => sys::ftruncate(h, s.size)?,
                                None => sys::truncate_fd(n, s.size)?,
                            }
                        }
                        if let Some(times) = times {
                            let r = match h {
                                Some(h) => sys::futimens(h, &times),
                                None => sys::utimens_fd(n, &times),
                            };
                            match r {
                                Err(e) if kernel_times && e.raw_os_error() == Some(libc::EPERM) => {
                                    return Ok((sys::fstat(n)?, true))
                                }
                                r => r?,
                            }
                        }
                        Ok((sys::fstat(n)?, false))
                    })
                    .await?;
                if !refused {
                    return Ok(Response::Attr(attr_of(&st)));
                }
                // A writer who is not the file's owner may not set explicit times, but a
                // local write or truncation moves them to now all the same: set the
                // kernel's "now" as the engine.
                // Only a time update can be refused: `times` is there.
                let Some(times) = times else {
                    return Ok(Response::Attr(attr_of(&st)));
                };
                let st = pool
                    .quick(None, move || {
                        match &hfd {
                            Some(h) => sys::futimens(h.fd.as_raw_fd(), &times)?,
                            None => sys::utimens_fd(nfd.as_raw_fd(), &times)?,
                        }
                        sys::fstat(nfd.as_raw_fd())
                    })
                    .await?;
                Ok(Response::Attr(attr_of(&st)))
            }
            Readlink { node } => {
                let (fd, _) = self.node(node)?;
                let target = pool
                    .quick(Some(creds), move || sys::readlink_fd(fd.as_raw_fd()))
                    .await?;
                Ok(Response::Data(Bytes::from(target)))
            }
            Mknod {
                parent,
                name,
                mode,
                umask,
                rdev,
            } => {
                self.entry_after(creds, parent, name, move |d, c| {
                    sys::mknodat(d, c, mode & !sys::creation_umask(d, mode, umask), rdev)
                })
                .await
            }
            Mkdir {
                parent,
                name,
                mode,
                umask,
            } => {
                self.entry_after(creds, parent, name, move |d, c| {
                    sys::mkdirat(d, c, mode & !sys::creation_umask(d, mode, umask) & 0o7777)
                })
                .await
            }
            Symlink {
                parent,
                name,
                target,
            } => {
                let t = sys::cstr(&target).map_err(Errno::from)?;
                self.entry_after(creds, parent, name, move |d, c| sys::symlinkat(&t, d, c))
                    .await
            }
            Link {
                node,
                newparent,
                newname,
            } => {
                let (fd, _) = self.node(node)?;
                self.entry_after(creds, newparent, newname, move |d, c| {
                    sys::link_fd(fd.as_raw_fd(), d, c)
                })
                .await
            }
            Unlink { parent, name } => self.remove(creds, parent, name, 0).await,
            Rmdir { parent, name } => self.remove(creds, parent, name, libc::AT_REMOVEDIR).await,
            Rename {
                parent,
                name,
                newparent,
                newname,
                flags,
            } => {
                let (a, _) = self.node(parent)?;
                let (b, _) = self.node(newparent)?;
                pool.quick(Some(creds), move || {
                    let (n1, n2) = (sys::cstr(&name)?, sys::cstr(&newname)?);
                    sys::renameat2(a.as_raw_fd(), &n1, b.as_raw_fd(), &n2, flags)
                })
                .await?;
                Ok(Response::Empty)
            }
            Open { node, flags } => {
                let (fd, mount) = self.node(node)?;
                let (file, pseudo) = pool
                    .run(Some(creds), move || {
                        // Re-open the very inode behind the O_PATH fd (no path lookup).
                        let p = sys::proc_fd_path(fd.as_raw_fd());
                        let f = sys::openat(
                            libc::AT_FDCWD,
                            &p,
                            host_open_flags(flags)
                                & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW),
                            0,
                        )?;
                        // A file deleted on the HOST while the DPU kernel still had its
                        // name: ESTALE makes the kernel look the path up again (and find it
                        // gone), where an open would succeed on the deleted file.
                        let st = sys::fstat(f.as_raw_fd())?;
                        if st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_nlink == 0 {
                            return Err(io::Error::from_raw_os_error(libc::ESTALE));
                        }
                        // f_type is signed in glibc and unsigned in musl.
                        #[allow(clippy::useless_conversion)]
                        let pseudo = sys::fstatfs(f.as_raw_fd())
                            .map(|s| i64::try_from(s.f_type).is_ok_and(is_pseudo_fs))
                            .unwrap_or(false);
                        Ok((f, pseudo))
                    })
                    .await?;
                let fh = self.add_handle(file, mount);
                Ok(Response::Opened {
                    fh,
                    flags: if pseudo {
                        proto::open_flags::PSEUDO_FS
                    } else {
                        0
                    },
                })
            }
            Create {
                parent,
                name,
                mode,
                umask,
                flags,
            } => {
                let (pfd, mount) = self.node(parent)?;
                let create = move |nonblock: bool| {
                    let pfd = pfd.clone();
                    let name = name.clone();
                    move || {
                        let c = sys::cstr(&name)?;
                        let extra = if nonblock { libc::O_NONBLOCK } else { 0 };
                        let umask = sys::creation_umask(pfd.as_raw_fd(), mode, umask);
                        let f = sys::openat2(
                            pfd.as_raw_fd(),
                            &c,
                            host_open_flags(flags) | extra | libc::O_CREAT | libc::O_NOFOLLOW,
                            mode & !umask & 0o7777,
                            sys::RESOLVE_STRICT,
                        )?;
                        if nonblock && flags & libc::O_NONBLOCK == 0 {
                            sys::set_fl(f.as_raw_fd(), host_open_flags(flags) & !libc::O_CREAT)?;
                        }
                        let (node_fd, st) = Self::lookup_at(pfd.as_raw_fd(), &name)?;
                        Ok((f, node_fd, st))
                    }
                };
                // On the runtime thread, an open must not block: O_NONBLOCK (dropped again
                // once open) keeps a FIFO that appeared since the kernel's lookup from
                // blocking; such a FIFO (ENXIO: no reader yet) is opened on the pool instead.
                let quick = if pool.umask_zero {
                    match pool.quick(Some(creds.clone()), create(true)).await {
                        Err(Errno(libc::ENXIO)) => None,
                        r => Some(r),
                    }
                } else {
                    None
                };
                let (file, pfd2, st) = match quick {
                    Some(r) => r?,
                    None => pool.run(Some(creds), create(false)).await?,
                };
                let entry = self.register(pfd2, &st, mount);
                let fh = self.add_handle(file, mount);
                Ok(Response::Created {
                    entry,
                    fh,
                    flags: 0,
                })
            }
            Opendir { node } => {
                let (fd, mount) = self.node(node)?;
                let dir = pool
                    .run(Some(creds), move || {
                        // The very inode behind the O_PATH fd, as for files: listing needs
                        // read permission on the directory, not search (a lookup of "."
                        // would need both).
                        sys::openat(
                            libc::AT_FDCWD,
                            &sys::proc_fd_path(fd.as_raw_fd()),
                            libc::O_RDONLY | libc::O_DIRECTORY,
                            0,
                        )
                    })
                    .await?;
                Ok(Response::Opened {
                    fh: self.add_handle(dir, mount),
                    flags: 0,
                })
            }
            Readdir {
                fh,
                offset,
                size,
                plus,
                ..
            } => self.readdir(fh, offset, size, plus).await,
            Statfs { node } => {
                let (fd, _) = self.node(node)?;
                let s = pool
                    .quick(None, move || sys::fstatfs(fd.as_raw_fd()))
                    .await?;
                Ok(Response::Statfs(proto::Statfs {
                    blocks: s.f_blocks,
                    bfree: s.f_bfree,
                    bavail: s.f_bavail,
                    files: s.f_files,
                    ffree: s.f_ffree,
                    bsize: s.f_bsize as u32,
                    namelen: s.f_namelen as u32,
                    frsize: s.f_frsize as u32,
                }))
            }
            Setxattr {
                node,
                name,
                flags,
                value,
            } => {
                let (fd, _) = self.node(node)?;
                pool.run(Some(creds), move || {
                    sys::setxattr(fd.as_raw_fd(), &sys::cstr(&name)?, &value, flags)
                })
                .await?;
                Ok(Response::Empty)
            }
            Removexattr { node, name } => {
                let (fd, _) = self.node(node)?;
                pool.run(Some(creds), move || {
                    sys::removexattr(fd.as_raw_fd(), &sys::cstr(&name)?)
                })
                .await?;
                Ok(Response::Empty)
            }
            Getxattr { node, name, size } => {
                let (fd, _) = self.node(node)?;
                let v = pool
                    .quick(Some(creds), move || {
                        let c = sys::cstr(&name)?;
                        // size 0 asks for the length: fetch the whole value and let the
                        // client report its size.
                        let cap = if size == 0 {
                            XATTR_MAX
                        } else {
                            (size as usize).min(XATTR_MAX)
                        };
                        let mut buf = vec![0u8; cap];
                        let n = sys::getxattr(fd.as_raw_fd(), &c, &mut buf)?;
                        buf.truncate(n);
                        Ok(buf)
                    })
                    .await?;
                Ok(Response::Data(Bytes::from(v)))
            }
            Listxattr { node, size } => {
                let (fd, _) = self.node(node)?;
                let v = pool
                    .quick(Some(creds), move || {
                        let cap = if size == 0 {
                            XATTR_MAX
                        } else {
                            (size as usize).min(XATTR_MAX)
                        };
                        let mut buf = vec![0u8; cap];
                        let n = sys::listxattr(fd.as_raw_fd(), &mut buf)?;
                        buf.truncate(n);
                        Ok(buf)
                    })
                    .await?;
                Ok(Response::Data(Bytes::from(v)))
            }
            Access { node, mask } => {
                let (fd, _) = self.node(node)?;
                pool.quick(Some(creds), move || sys::access_fd(fd.as_raw_fd(), mask))
                    .await?;
                Ok(Response::Empty)
            }
            Read { fh, offset, size } => {
                let h = self.handle_of(fh)?;
                let mut buf = vec![0u8; size.min(MAX_READ) as usize];
                // Page-cache hits are read right here: cheaper than the two thread hand-offs
                // to a pool thread and back. The rest (and anything that might block) is
                // read on the pool.
                let (got, eof) = read_cached(h.fd.as_raw_fd(), &mut buf, offset)?;
                if eof || got == buf.len() {
                    buf.truncate(got);
                    return Ok(Response::Data(Bytes::from(buf)));
                }
                let data = pool
                    .run(None, move || {
                        let mut got = got;
                        // Short reads from pipes/pseudo files end the loop; regular files
                        // are filled so the kernel does not mistake a short read for EOF.
                        while got < buf.len() {
                            let n =
                                sys::pread(h.fd.as_raw_fd(), &mut buf[got..], offset + got as u64)?;
                            if n == 0 {
                                break;
                            }
                            got += n;
                        }
                        buf.truncate(got);
                        Ok(buf)
                    })
                    .await?;
                Ok(Response::Data(Bytes::from(data)))
            }
            Write {
                fh,
                offset,
                flags,
                data,
            } => {
                let h = self.handle_of(fh)?;
                if flags & write_flags::KILL_SUIDGID != 0 {
                    let before = sys::fstat(h.fd.as_raw_fd())?.st_mode;
                    if before & (libc::S_ISUID | libc::S_ISGID) != 0 {
                        return self
                            .write_dropping_privileges(creds, h, offset, flags, data, before)
                            .await;
                    }
                }
                // As for reads: a write the kernel can take without waiting (no dirty-page
                // throttling, no block allocation that needs I/O) happens here.
                // The pool writes what it did not take (after it: O_APPEND appends).
                let done = sys::pwrite_nowait(h.fd.as_raw_fd(), &data, offset)?.unwrap_or(0);
                if done == data.len() {
                    return Ok(Response::Written {
                        count: done as u64,
                        killed: false,
                    });
                }
                let whole = flags & write_flags::CACHED != 0;
                let n = pool
                    .run(None, move || {
                        write_at(h.fd.as_raw_fd(), &data[done..], offset + done as u64, whole)
                    })
                    .await?;
                Ok(Response::Written {
                    count: (done + n) as u64,
                    killed: false,
                })
            }
            Flush { fh, owner } => {
                let h = self.handle_of(fh)?;
                let holder = match Self::lockable(&h)? {
                    Some(file) => self.lock().locks.flushed(owner, file),
                    None => None,
                };
                if let Some(holder) = holder {
                    // A close of any of a process's descriptors of the file releases its
                    // POSIX locks: closing the holder does, before close(2) returns there.
                    pool.run(None, move || {
                        locks::let_go(holder);
                        Ok(())
                    })
                    .await?;
                }
                Ok(Response::Empty)
            }
            Release { fh } => {
                let (handle, holders) = {
                    let mut t = self.lock();
                    (t.files.remove(&fh), t.locks.released(fh))
                };
                // The last Arc closes the fd (after any in-flight op on it); holders of OFD
                // locks go with the open file they were taken through.
                drop(handle);
                if !holders.is_empty() {
                    pool.run(None, move || {
                        holders.into_iter().for_each(locks::let_go);
                        Ok(())
                    })
                    .await?;
                }
                Ok(Response::Empty)
            }
            Fsync { fh, datasync } => {
                let h = self.handle_of(fh)?;
                pool.run(None, move || sys::fsync(h.fd.as_raw_fd(), datasync))
                    .await?;
                Ok(Response::Empty)
            }
            Getlk { fh, owner, lock } => {
                let h = self.handle_of(fh)?;
                let file = Self::lockable(&h)?.ok_or(Errno(libc::ENOLCK))?;
                // Asked on the owner's own holder, its own locks conflict with nothing.
                let (own, others) = {
                    let t = self.lock();
                    (t.locks.held_by(owner, file), t.locks.others(owner, file))
                };
                let (fl, pid) = pool
                    .run(None, move || {
                        let fd = own.as_ref().map_or(h.fd.as_raw_fd(), |o| o.as_raw_fd());
                        let mut fl = flock_of(&lock);
                        sys::ofd_lock(fd, libc::F_OFD_GETLK, &mut fl)?;
                        let pid = if i32::from(fl.l_type) == libc::F_UNLCK {
                            0
                        } else {
                            locks::holder_pid(&others, &fl)
                        };
                        Ok((fl, pid))
                    })
                    .await?;
                let end = if fl.l_len == 0 {
                    i64::MAX as u64
                } else {
                    (fl.l_start + fl.l_len - 1) as u64
                };
                // A HOST process's lock has no DPU pid: FUSE takes 0 for "unknown".
                Ok(Response::Lock(Lock {
                    start: fl.l_start as u64,
                    end,
                    typ: fl.l_type.into(),
                    pid,
                }))
            }
            Setlk { fh, owner, lock } => {
                let h = self.handle_of(fh)?;
                let file = Self::lockable(&h)?.ok_or(Errno(libc::ENOLCK))?;
                let holder = if lock.typ == libc::F_UNLCK {
                    match self.lock().locks.held_by(owner, file) {
                        Some(holder) => holder,
                        None => return Ok(Response::Empty),
                    }
                } else {
                    self.holder(&h, fh, owner, file, &lock).await?
                };
                // F_OFD_SETLK never waits (F_SETLKW is a retry loop on the client).
                pool.quick(None, move || {
                    let mut fl = flock_of(&lock);
                    sys::ofd_lock(holder.as_raw_fd(), libc::F_OFD_SETLK, &mut fl)
                })
                .await?;
                Ok(Response::Empty)
            }
            Fallocate {
                fh,
                offset,
                length,
                mode,
            } => {
                let h = self.handle_of(fh)?;
                pool.run(None, move || {
                    sys::fallocate(h.fd.as_raw_fd(), mode, offset, length)
                })
                .await?;
                Ok(Response::Empty)
            }
            Lseek { fh, offset, whence } => {
                let h = self.handle_of(fh)?;
                let o = pool
                    .run(None, move || sys::lseek(h.fd.as_raw_fd(), offset, whence))
                    .await?;
                Ok(Response::Offset(o))
            }
            CopyFileRange {
                fh_in,
                off_in,
                fh_out,
                off_out,
                len,
                flags,
            } => {
                let a = self.handle_of(fh_in)?;
                let b = self.handle_of(fh_out)?;
                let n = pool
                    .run(None, move || {
                        sys::copy_file_range(
                            a.fd.as_raw_fd(),
                            off_in,
                            b.fd.as_raw_fd(),
                            off_out,
                            len,
                            flags,
                        )
                    })
                    .await?;
                Ok(Response::Count(n))
            }
        }
    }

    async fn remove(
        &self,
        creds: Creds,
        parent: u64,
        name: Vec<u8>,
        flags: i32,
    ) -> Result<Response, Errno> {
        let (pfd, _) = self.node(parent)?;
        self.pool
            .quick(Some(creds), move || {
                sys::unlinkat(pfd.as_raw_fd(), &sys::cstr(&name)?, flags)
            })
            .await?;
        Ok(Response::Empty)
    }

    /// Reads directory entries from `offset` (a getdents cookie; 0 = start) until the
    /// client's buffer `size` would overflow, counted as the kernel counts it. For
    /// readdirplus every entry but `.`/`..` is looked up (and counted as a lookup).
    async fn readdir(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        plus: bool,
    ) -> Result<Response, Errno> {
        let h = self.handle_of(fh)?;
        let dir = h.clone();
        let mount = h.mount;
        // The client chooses the batch; cap it so one request cannot make a huge answer.
        let size = size.min(proto::MAX_READDIR_BATCH);
        // The caller's read permission was checked when the handle was opened. The entries'
        // attributes are looked up as the engine: a caller may list a directory it may not
        // search (mode r--), where a stat as the caller would fail the whole listing. The
        // DPU kernel gets no more than the names from them (its own permission checks,
        // default_permissions, refuse a path through such a directory).
        let own = self.pool.own.clone();
        let raw = self
            .pool
            .run(Some(own.clone()), move || {
                let _g = h.dir.lock().unwrap_or_else(|e| e.into_inner());
                let fd = h.fd.as_raw_fd();
                sys::lseek(fd, offset as i64, libc::SEEK_SET)?;
                let mut out = Vec::new();
                let mut used = 0usize;
                let mut buf = vec![0u8; 32 * 1024];
                'fill: loop {
                    let n = sys::getdents64(fd, &mut buf)?;
                    if n == 0 {
                        break;
                    }
                    for d in sys::parse_dirents(&buf[..n]) {
                        let cost = proto::dirent_cost(d.name.len(), plus);
                        if used + cost > size as usize {
                            break 'fill;
                        }
                        let dot = d.name == b"." || d.name == b"..";
                        // A stat, not an open: most entries of a listing are inodes the
                        // client already has (it made them, or listed them before).
                        let st = if plus && !dot {
                            match sys::stat_entry(fd, &sys::cstr(d.name)?) {
                                Ok(st) => Some(st),
                                // Removed since getdents: skip it, as a later readdir would.
                                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                                Err(e) => return Err(e),
                            }
                        } else {
                            None
                        };
                        used += cost;
                        out.push((d.ino, d.off, d.kind, d.name.to_vec(), st));
                    }
                }
                Ok(out)
            })
            .await?;
        if !plus {
            let entries = raw
                .into_iter()
                .map(|(ino, offset, kind, name, _)| DirEntry {
                    ino,
                    offset,
                    kind,
                    name,
                    entry: None,
                })
                .collect();
            return Ok(Response::Dir(entries));
        }
        // Known inodes take a lookup on their node; the others are opened (O_PATH) in one
        // more pool job, and an entry gone by then is left out.
        let mut entries: Vec<DirEntry> = Vec::with_capacity(raw.len());
        let mut unknown: Vec<(usize, Vec<u8>)> = Vec::new();
        {
            let mut t = self.lock();
            for (ino, offset, kind, name, st) in raw {
                let entry = st.and_then(|st| t.look_up_known(mount, &st));
                let dot = name == b"." || name == b"..";
                if entry.is_none() && !dot {
                    unknown.push((entries.len(), name.clone()));
                }
                entries.push(DirEntry {
                    ino,
                    offset,
                    kind,
                    name,
                    entry,
                });
            }
        }
        if unknown.is_empty() {
            return Ok(Response::Dir(entries));
        }
        let opened = self
            .pool
            .run(Some(own), move || {
                let fd = dir.fd.as_raw_fd();
                let mut out = Vec::with_capacity(unknown.len());
                for (i, name) in unknown {
                    match Self::lookup_at(fd, &name) {
                        Ok(x) => out.push((i, Some(x))),
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => out.push((i, None)),
                        Err(e) => return Err(e),
                    }
                }
                Ok(out)
            })
            .await?;
        let mut gone = Vec::new();
        for (i, looked) in opened {
            match looked {
                Some((fd, st)) => entries[i].entry = Some(self.register(fd, &st, mount)),
                None => gone.push(i),
            }
        }
        for i in gone.into_iter().rev() {
            entries.remove(i);
        }
        Ok(Response::Dir(entries))
    }
}

/// An fd kept alive for the duration of a pool job.
enum FdRef {
    Node(Arc<OwnedFd>),
    Handle(Arc<Handle>),
}

impl FdRef {
    fn raw(&self) -> RawFd {
        match self {
            FdRef::Node(f) => f.as_raw_fd(),
            FdRef::Handle(h) => h.fd.as_raw_fd(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every job runs exactly once across the workers, and closing lets them finish what is
    /// queued and exit.
    #[test]
    fn job_queue_runs_each_job_once_and_drains_on_close() {
        let queue = Arc::new(JobQueue::default());
        let ran = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let queue = queue.clone();
                std::thread::spawn(move || {
                    let mut n = 0;
                    while let Some(job) = queue.take() {
                        job();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        for _ in 0..10_000 {
            let ran = ran.clone();
            queue.push(Box::new(move || {
                ran.fetch_add(1, Ordering::Relaxed);
            }));
        }
        queue.close();
        let taken: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
        assert_eq!(taken, 10_000);
        assert_eq!(ran.load(Ordering::Relaxed), 10_000);
        assert!(
            queue.take().is_none(),
            "a closed, empty queue hands out nothing"
        );
    }

    #[tokio::test]
    async fn quick_runs_as_the_caller_and_gives_the_identity_back() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED quick identity test: needs root to switch fsuid");
            return;
        }
        let pool = FsPool::new(1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("private");
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(
            &private,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let nobody = Creds {
            uid: 65534,
            gid: 65534,
            groups: vec![],
        };
        let target = private.clone();
        let r = pool
            .quick(Some(nobody), move || std::fs::read_dir(&target).map(|_| ()))
            .await;
        assert_eq!(r, Err(Errno(libc::EACCES)), "the syscall ran as nobody");
        // SAFETY: setfsuid(-1) only reads the calling thread's fsuid.
        let fsuid = unsafe { libc::setfsuid(u32::MAX) };
        assert_eq!(fsuid as u32, 0, "the runtime thread is root again");
        let target = private.clone();
        let r = pool
            .quick(None, move || std::fs::read_dir(&target).map(|_| ()))
            .await;
        assert_eq!(r, Ok(()), "and can read what root can");
    }

    #[tokio::test]
    async fn a_blocked_pool_thread_does_not_block_the_others() {
        let pool = FsPool::new(2).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let p2 = pool.clone();
        let slow = tokio::spawn(async move {
            p2.run(None, move || {
                rx.recv().map_err(|_| io::Error::other("sender gone"))?;
                Ok(1)
            })
            .await
        });
        for _ in 0..100 {
            assert_eq!(pool.run(None, || Ok(2)).await, Ok(2));
        }
        assert!(!slow.is_finished());
        tx.send(()).unwrap();
        assert_eq!(slow.await.unwrap(), Ok(1));
    }

    #[tokio::test]
    async fn pool_threads_take_the_callers_identity() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root to switch fsuid");
            return;
        }
        let pool = FsPool::new(1).unwrap();
        let c = Creds {
            uid: 1234,
            gid: 4321,
            groups: vec![7, 8],
        };
        let (uid, gid, groups) = pool
            .run(Some(c), || {
                // SAFETY: -1 is invalid, so these only report the current fs ids.
                let (u, g) = unsafe { (libc::setfsuid(u32::MAX), libc::setfsgid(u32::MAX)) };
                Ok((
                    u as u32,
                    g as u32,
                    nix::unistd::getgroups().map_err(io::Error::from)?,
                ))
            })
            .await
            .unwrap();
        assert_eq!((uid, gid), (1234, 4321));
        assert_eq!(
            groups.iter().map(|g| g.as_raw()).collect::<Vec<_>>(),
            vec![7, 8]
        );
        // Other threads of the process are untouched (glibc's setgroups would change them).
        assert_eq!(
            nix::unistd::getgroups()
                .unwrap()
                .iter()
                .map(|g| g.as_raw())
                .collect::<Vec<_>>(),
            {
                let s = std::fs::read_to_string("/proc/thread-self/status").unwrap();
                s.lines()
                    .find_map(|l| l.strip_prefix("Groups:"))
                    .unwrap()
                    .split_whitespace()
                    .map(|x| x.parse::<u32>().unwrap())
                    .collect::<Vec<_>>()
            }
        );
        assert!(!nix::unistd::getgroups()
            .unwrap()
            .iter()
            .any(|g| g.as_raw() == 7));
    }

    #[test]
    fn names_must_be_single_components() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"/", b"a\0b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_name(&[b'x'; 256]), Err(Errno(libc::ENAMETOOLONG)));
        assert!(check_name(b"...").is_ok());
        assert!(check_name(&[b'x'; 255]).is_ok());
    }

    #[test]
    fn static_policy_matches_whole_components() {
        let p = StaticPolicy::new().with(ListType::Write, "/var/lib/docker");
        assert!(p.restricted(ListType::Write));
        assert!(!p.restricted(ListType::Read));
        assert!(p.allows(ListType::Write, Path::new("/var/lib/docker")));
        assert!(p.allows(ListType::Write, Path::new("/var/lib/docker/x")));
        assert!(!p.allows(ListType::Write, Path::new("/var/lib/dockerx")));
        assert!(!p.allows(ListType::Mount, Path::new("/var/lib/docker")));
    }
}
