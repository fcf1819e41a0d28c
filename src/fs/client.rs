//! The qtfs FUSE client: a `fuser::Filesystem` that turns each kernel request into one fs
//! request over an [`FsTransport`] and answers from a tokio task, so many requests are in
//! flight per mount (a slow read never blocks a stat).
//!
//! Inode numbers are the engine's node ids, except that the mount's root node is FUSE ino 1.
//! Proc mode (`-o proc`): at the root, `self`, `thread-self` and the PIDs of processes in the
//! DPU's local procfs (`local_proc`, default `/local_proc`) are synthetic symlinks into the
//! local procfs; everything else is the HOST's.
//!
//! Concurrency: the fuser session threads only decode, encode and spawn; all waiting happens
//! in tasks on the given runtime. The client holds no per-request state of its own.

use super::fresh::FreshDirs;
use super::known::{Known, KnownFile};
use super::proto::{self, set, Attr, Creds, Entry, Lock, Request, Response, SetTime, Time};
use super::stats::{self, MountStats};
use super::{FsCallError, FsTransport};
use bytes::Bytes;
use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyIoctl, ReplyLock, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request as FuseRequest, TimeOrNow, WriteFlags,
};
use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Largest write the kernel sends in one request (and readahead window).
pub const MAX_WRITE: u32 = 1 << 20;
/// Synthetic proc-mode inodes live in the top half of the ino space (engine ids are small).
const PROC_BASE: u64 = 1 << 63;
const PROC_SELF: u64 = PROC_BASE | 1;
const PROC_THREAD_SELF: u64 = PROC_BASE | 2;
const PROC_PID: u64 = PROC_BASE | (1 << 32);

/// Readahead window set for every mount: one full read request (the kernel gives a FUSE
/// mount 128 KiB, so a sequential read waits for eight round trips per MiB).
pub const DEFAULT_READ_AHEAD_KIB: u32 = MAX_WRITE / 1024;

/// Client-side mount options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    pub attr_ttl: Duration,
    pub entry_ttl: Duration,
    /// How long the kernel may remember that a name does not exist (`negative_timeout`, as
    /// in libfuse); zero (the default) asks again every time.
    pub negative_ttl: Duration,
    /// Kernel writeback cache (FUSE_WRITEBACK_CACHE).
    pub writeback: bool,
    /// Direct I/O for every file (otherwise only for files on HOST pseudo filesystems).
    pub direct_io: bool,
    pub read_only: bool,
    pub root_squash: bool,
    /// Proc mode and the local procfs it links into.
    pub proc_mode: bool,
    pub local_proc: PathBuf,
    /// Let every user use the mount (allow_other), on by default.
    pub allow_other: bool,
    /// How long a directory this mount created is taken to change only through it
    /// (`fresh_dirs`, see `fresh.rs`); zero (the default) is off.
    pub fresh_dirs: Duration,
    /// The kernel's readahead window for this mount in KiB (`read_ahead`); 0 keeps the
    /// kernel's FUSE default of 128 KiB.
    pub read_ahead_kib: u32,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            attr_ttl: Duration::from_secs(1),
            entry_ttl: Duration::from_secs(1),
            negative_ttl: Duration::ZERO,
            writeback: false,
            direct_io: false,
            read_only: false,
            root_squash: false,
            proc_mode: false,
            local_proc: PathBuf::from("/local_proc"),
            allow_other: true,
            fresh_dirs: Duration::ZERO,
            read_ahead_kib: DEFAULT_READ_AHEAD_KIB,
        }
    }
}

struct Inner {
    /// Replaced by [`QtfsClient::reattach`] after a reconnect.
    transport: RwLock<Arc<dyn FsTransport>>,
    rt: tokio::runtime::Handle,
    opts: ClientOptions,
    /// The exported HOST path (mounted again after a reconnect).
    remote: PathBuf,
    /// The engine's node id of the export root (FUSE ino 1); new after a reconnect.
    root: AtomicU64,
    /// What a reconnect restores ([`Known`]).
    known: Mutex<Known>,
    /// Directories this mount created and knows every name of (`fresh_dirs`).
    fresh: Mutex<FreshDirs>,
    /// Calls held while the link is down ([`QtfsClient::hold_calls`]); `holding` is the fast
    /// check on every call.
    holding: AtomicBool,
    held: Mutex<Held>,
    /// How long calls wait for a lost engine, if the mount reconnects (else calls whose link
    /// is lost fail at once).
    /// In milliseconds; 0: the mount does not reconnect, or does not wait.
    reconnect_wait_ms: AtomicU64,
    /// Bumped by every reattach: a call that failed with an older link is sent again at once.
    generation: AtomicU64,
    /// This outage outlasted `reconnect_wait`: calls fail at once until the mount is back.
    waited_out: AtomicBool,
    /// Supplementary groups by caller pid, uid and gid, read from /proc at most once per
    /// [`GROUPS_TTL`]: reading /proc/<pid>/status costs more than a local stat. (The DPU
    /// kernel checks permissions with the caller's current groups first.)
    groups: Mutex<HashMap<(u32, u32, u32), CachedGroups>>,
    /// Files (inos) on which a lock was requested, with the handles it came through: only
    /// a flush of such a file needs the engine (a close of any of a process's descriptors
    /// of a file drops its POSIX locks there); other flushes are answered here, because
    /// writes are already on the HOST when they complete (writeback flushes pages first).
    locked: Mutex<HashMap<u64, Vec<u64>>>,
    /// Told when a lock may have been let go through this mount (an unlock, a flush or a
    /// release of a locked file): F_SETLKW waiters retry at once instead of at their next
    /// backoff step, so a lock passes between DPU processes as quickly as locally.
    unlocked: tokio::sync::Notify,
    /// Directory entries fetched ahead per directory handle (see [`DirBuf`]).
    dirs: Mutex<HashMap<u64, DirBuf>>,
    stats: Arc<MountStats>,
    /// Extended attributes the engine said do not exist (ENODATA), by node and name, with
    /// when: the kernel asks for `security.capability` before every write (to drop file
    /// capabilities), which would otherwise cost a round trip per write. Trusted for
    /// `attr_ttl`, like attributes; setxattr/removexattr through this mount forget the node's.
    xattr_absent: Mutex<HashMap<(u64, Vec<u8>), Instant>>,
    /// Forgets not yet sent ([`QtfsClient::forget_later`]).
    forgets: Mutex<Vec<(u64, u64)>>,
    /// What the DPU kernel agreed to at FUSE INIT, for `mount -v` ([`QtfsClient::negotiated`]).
    negotiated: OnceLock<String>,
    /// With `writeback` only: the attributes last given to the kernel per inode, and when
    /// ([`QtfsClient::unchanged_times`]).
    attrs: Mutex<HashMap<u64, (FileAttr, Instant)>>,
    /// Directories' attributes as the engine gave them right after a change made through
    /// this mount, by inode, and when: the kernel drops a directory's attributes after every
    /// change in it and asks for them before its next permission check there, which these
    /// answer without a round trip ([`QtfsClient::changed_dir_attr`]).
    dir_attrs: Mutex<HashMap<u64, (FileAttr, Instant)>>,
    /// Tells the kernel to drop what it cached, once the session runs
    /// ([`QtfsClient::set_notifier`]).
    notifier: OnceLock<fuser::Notifier>,
}

/// Above this many remembered absent xattrs the cache starts over.
const XATTR_ABSENT_MAX: usize = 65536;

/// When a pid's groups were read, and the groups.
type CachedGroups = (Instant, Arc<[u32]>);

/// How long a caller's supplementary groups are reused without re-reading /proc.
const GROUPS_TTL: Duration = Duration::from_secs(1);
/// Most inodes whose attributes a writeback mount remembers (then it starts afresh).
const ATTRS_CACHE_MAX: usize = 65536;
/// How late a forget may reach the engine, and how many are sent at once without waiting.
const FORGET_DELAY: Duration = Duration::from_millis(5);
const FORGET_BATCH: usize = 1024;
/// Above this many cached pids the groups cache starts over (a bound, not an LRU: pids of
/// short-lived processes come and go).
const GROUPS_CACHE_MAX: usize = 4096;
/// Readdir batch fetched from the engine at once ([`proto::dirent_cost`] units); the
/// kernel asks one page at a time, so this saves ~30 round trips per batch.
const DIR_BATCH: u32 = 128 * 1024;

/// Entries of one directory handle fetched from the engine but not yet given to the
/// kernel. The kernel reads a directory sequentially from the offset of the last entry it
/// got, so a request at `next` continues the buffer; any other offset (seekdir, rewind)
/// drops it and fetches afresh. In plus mode each buffered entry holds one engine lookup,
/// which is forgotten if the entry is dropped undelivered.
struct DirBuf {
    plus: bool,
    /// The offset the next kernel request must carry to continue this buffer.
    next: u64,
    entries: VecDeque<proto::DirEntry>,
    /// The engine returned an empty batch at `next`: the directory is exhausted.
    eof: bool,
}

/// One mounted qtfs filesystem (cheap to clone).
#[derive(Clone)]
pub struct QtfsClient {
    inner: Arc<Inner>,
}

fn system_time(t: Time) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs()) + Duration::from_nanos(t.nsec.into())
    }
}

fn to_proto_time(t: SystemTime) -> Time {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Time {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let mut sec = -(d.as_secs() as i64);
            let mut nsec = d.subsec_nanos();
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            Time { sec, nsec }
        }
    }
}

fn kind_of_mode(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn kind_of_dtype(t: u8) -> FileType {
    kind_of_mode(u32::from(t) << 12)
}

/// Supplementary groups of `pid` from /proc/<pid>/status (empty if it is gone).
fn groups_of(pid: u32) -> Vec<u32> {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    s.lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .take(proto::MAX_GROUPS)
                .collect()
        })
        .unwrap_or_default()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Inserts into one of the mount's caches, which start afresh once they hold `max` entries
/// (they only save round trips, so losing them costs nothing but time).
fn insert_bounded<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>, max: usize, k: K, v: V) {
    if map.len() >= max {
        map.clear();
    }
    map.insert(k, v);
}

/// Credentials for fd-based ops, which the engine does not check (the open did).
fn no_creds() -> Creds {
    Creds::default()
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

/// Mounts `remote` on the engine (the `[Mount]` check happens there) and returns the node id
/// of its root. The mount itself runs with the engine's identity: the allowlist decides.
async fn mount_root(
    transport: &dyn FsTransport,
    remote: &Path,
    opts: &ClientOptions,
) -> Result<u64, FsCallError> {
    let mut flags = proto::mount_flags::DIR_ATTRS;
    if opts.read_only {
        flags |= proto::mount_flags::READ_ONLY;
    }
    if opts.root_squash {
        flags |= proto::mount_flags::ROOT_SQUASH;
    }
    let req = Request::Mount {
        path: remote.as_os_str().as_bytes().to_vec(),
        flags,
    };
    match call(transport, &req, &Creds::default()).await? {
        Response::Entry(e) => Ok(e.node),
        _ => Err(FsCallError::new(
            libc::EPROTO,
            "malformed mount reply from the engine",
        )),
    }
}

/// One request over `transport`, awaited.
async fn call(
    transport: &dyn FsTransport,
    req: &Request,
    creds: &Creds,
) -> Result<Response, FsCallError> {
    let bytes = transport.call(req.op(), req.encode(creds)).await?;
    Response::decode(req.op(), &bytes).map_err(|e| {
        FsCallError::new(
            libc::EPROTO,
            format!("malformed reply from the engine: {e}"),
        )
    })
}

/// What [`QtfsClient::reattach`] gave back to a new engine, and what it could not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Restored {
    pub nodes: usize,
    pub nodes_lost: usize,
    pub files: usize,
    pub files_lost: usize,
}

/// Relookups and reopens in flight at once during a reattach.
const RESTORE_WINDOW: usize = 256;
/// Most calls held while the link is down; more fail at once. The kernel itself bounds them
/// (one per waiting thread, plus `max_background`), so this is a backstop.
const HELD_MAX: usize = 4096;

/// Calls waiting for the engine to come back.
#[derive(Default)]
struct Held {
    /// Which outage these belong to (a late timer of an earlier one must not end them).
    epoch: u64,
    calls: Vec<HeldCall>,
}

/// A call waiting for the engine: op, payload, answer, and whether it may be sent again if
/// the link is lost while it is out.
type HeldCall = (u16, Bytes, super::FsDone, Retry);

/// Whether a call may run twice ([`retryable`]).
#[derive(Clone, Copy)]
enum Retry {
    No,
    Yes,
    /// A write: yes, unless its handle appends (running it twice would append twice).
    UnlessAppending(u64),
}

/// Requests that do the same when the engine runs them twice (or once on an engine that
/// died and once on the next): reads, lookups, opens without creation, positional writes,
/// attribute sets, syncs and releases. A lost link does not fail these when the mount is
/// back within `reconnect_wait`: they go to the new engine. Creations, removals, renames,
/// links, xattr changes and locks are not repeated (a second run could see its own first).
fn retryable(req: &Request) -> Retry {
    use Request::*;
    if let Write { fh, .. } = req {
        return Retry::UnlessAppending(*fh);
    }
    let yes = matches!(
        req,
        Lookup { .. }
            | Getattr { .. }
            | Setattr { .. }
            | Readlink { .. }
            | Open { .. }
            | Read { .. }
            | Flush { .. }
            | Release { .. }
            | Fsync { .. }
            | Opendir { .. }
            | Readdir { .. }
            | Statfs { .. }
            | Getxattr { .. }
            | Listxattr { .. }
            | Access { .. }
            | Getlk { .. }
            | Lseek { .. }
    );
    if yes {
        Retry::Yes
    } else {
        Retry::No
    }
}

/// Sends the restoring requests `reqs` over `t`, [`RESTORE_WINDOW`] at a time: how many
/// succeeded and how many failed. A lost link ends it with ENOTCONN.
async fn restore_batch(
    t: &dyn FsTransport,
    reqs: impl Iterator<Item = (Request, Creds)>,
) -> Result<(usize, usize), FsCallError> {
    use futures::stream::{self, StreamExt};
    let results: Vec<_> = stream::iter(reqs)
        .map(|(req, creds)| async move { call(t, &req, &creds).await })
        .buffer_unordered(RESTORE_WINDOW)
        .collect()
        .await;
    let mut counts = (0, 0);
    for r in results {
        match r {
            Ok(_) => counts.0 += 1,
            Err(e) if e.errno == libc::ENOTCONN => return Err(e),
            Err(_) => counts.1 += 1,
        }
    }
    Ok(counts)
}

impl QtfsClient {
    /// Attaches to `remote_path` on the engine (the `[Mount]` check happens there) and
    /// returns a filesystem ready to be mounted.
    pub async fn attach(
        transport: Arc<dyn FsTransport>,
        remote_path: &Path,
        opts: ClientOptions,
    ) -> Result<QtfsClient, FsCallError> {
        let root = mount_root(transport.as_ref(), remote_path, &opts).await?;
        let fresh_ttl = opts.fresh_dirs;
        Ok(QtfsClient {
            inner: Arc::new(Inner {
                transport: RwLock::new(transport),
                rt: tokio::runtime::Handle::current(),
                opts,
                remote: remote_path.to_path_buf(),
                root: AtomicU64::new(root),
                known: Mutex::new(Known::default()),
                fresh: Mutex::new(FreshDirs::new(fresh_ttl)),
                holding: AtomicBool::new(false),
                held: Mutex::new(Held::default()),
                reconnect_wait_ms: AtomicU64::new(0),
                generation: AtomicU64::new(0),
                waited_out: AtomicBool::new(false),
                groups: Mutex::new(HashMap::new()),
                locked: Mutex::new(HashMap::new()),
                unlocked: tokio::sync::Notify::new(),
                dirs: Mutex::new(HashMap::new()),
                stats: Arc::new(MountStats::new()),
                xattr_absent: Mutex::new(HashMap::new()),
                notifier: OnceLock::new(),
                forgets: Mutex::new(Vec::new()),
                negotiated: OnceLock::new(),
                attrs: Mutex::new(HashMap::new()),
                dir_attrs: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Gives this mount to a new engine connection after the old one was lost: the engine
    /// reserves the ids in use, mounts the export again, and looks up every inode the
    /// kernel still holds and opens every open handle again under the same ids (names
    /// first, level by level, many at once). Calls go to `transport` from then on.
    ///
    /// Inodes whose name is gone, or now names another HOST file, are lost: requests on them
    /// get ESTALE (a path lookup finds the new file). Handles on them get EBADF. POSIX locks
    /// and flocks held through the old connection are gone (the old engine's files closed).
    pub async fn reattach(&self, transport: Arc<dyn FsTransport>) -> Result<Restored, FsCallError> {
        let t = transport.as_ref();
        let (plan, open) = {
            let known = lock(&self.inner.known);
            (known.plan(), known.len().1)
        };
        // The HOST may have changed anything while the engine was away.
        lock(&self.inner.fresh).clear();
        call(t, &Request::Reserve { floor: plan.floor }, &no_creds()).await?;
        let root = mount_root(t, &self.inner.remote, &self.inner.opts).await?;
        let on = |ino: u64| if ino == 1 { root } else { ino };
        let mut done = Restored {
            nodes_lost: plan.nameless,
            ..Restored::default()
        };
        for level in plan.levels {
            let reqs = level.into_iter().map(|r| {
                let req = Request::Relookup {
                    parent: on(r.parent),
                    name: r.name,
                    node: r.node,
                    ino: r.host_ino,
                    nlookup: r.nlookup,
                };
                (req, no_creds())
            });
            let (ok, failed) = restore_batch(t, reqs).await?;
            done.nodes += ok;
            done.nodes_lost += failed;
        }
        let reqs = plan.files.into_iter().map(|(fh, f)| {
            let req = Request::Reopen {
                node: on(f.node),
                fh,
                flags: f.flags,
                dir: f.dir,
            };
            (req, f.creds)
        });
        done.files = restore_batch(t, reqs).await?.0;
        // Handles on nodes that were lost were not even tried.
        done.files_lost = open.saturating_sub(done.files);
        // Buffered directory entries hold the old engine's lookups: drop them unforgotten.
        lock(&self.inner.dirs).clear();
        lock(&self.inner.forgets).clear();
        self.inner.root.store(root, Ordering::Relaxed);
        *self
            .inner
            .transport
            .write()
            .unwrap_or_else(|p| p.into_inner()) = transport.clone();
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        self.inner.waited_out.store(false, Ordering::Release);
        for call in self.release_held() {
            self.dispatch(call);
        }
        Ok(done)
    }

    /// The fuser configuration for this mount (`fsname` shows in /proc/mounts).
    pub fn fuse_config(&self, fsname: &str) -> fuser::Config {
        let mut c = fuser::Config::default();
        c.mount_options = vec![
            fuser::MountOption::FSName(fsname.to_string()),
            fuser::MountOption::Subtype("qtfs".into()),
            if self.inner.opts.read_only {
                fuser::MountOption::RO
            } else {
                fuser::MountOption::RW
            },
        ];
        if self.inner.opts.allow_other {
            c.acl = fuser::SessionACL::All;
        }
        // Session threads only decode and spawn; two keep one busy copying a 1 MiB write
        // from blocking the next request.
        c.n_threads = Some(2);
        c.clone_fd = true;
        c
    }

    /// The caller's credentials; groups come from the cache when fresh.
    fn creds_of(&self, req: &FuseRequest) -> Creds {
        let pid = req.pid();
        // A process that changes its uid or gid (setpriv, su, a daemon dropping privileges
        // before exec) usually changes its groups with them: read them again then.
        let key = (pid, req.uid(), req.gid());
        let now = Instant::now();
        let cached = lock(&self.inner.groups)
            .get(&key)
            .filter(|(at, _)| now.duration_since(*at) < GROUPS_TTL)
            .map(|(_, g)| g.clone());
        let groups = match cached {
            Some(g) => g,
            None => {
                let g: Arc<[u32]> = groups_of(pid).into();
                insert_bounded(
                    &mut lock(&self.inner.groups),
                    GROUPS_CACHE_MAX,
                    key,
                    (now, g.clone()),
                );
                g
            }
        };
        Creds {
            uid: req.uid(),
            gid: req.gid(),
            groups: groups.to_vec(),
        }
    }

    /// Continues the handle's buffered entries when the kernel asks at their offset, or
    /// fetches a batch from the engine; `serve` gets the buffer (on this thread or a task).
    fn dir_batch<F>(
        &self,
        req: &FuseRequest,
        ino: INodeNo,
        fh: u64,
        offset: u64,
        plus: bool,
        serve: F,
    ) where
        F: FnOnce(&QtfsClient, Result<DirBuf, i32>) + Send + 'static,
    {
        let buffered = lock(&self.inner.dirs).remove(&fh);
        match buffered {
            Some(buf) if buf.plus == plus && buf.next == offset => return serve(self, Ok(buf)),
            Some(stale) => self.dir_forget(stale),
            None => {}
        }
        let r = Request::Readdir {
            node: self.node(ino),
            fh,
            offset,
            size: DIR_BATCH,
            plus,
        };
        self.call(r, self.creds_of(req), move |me, r| match r {
            Ok(Response::Dir(entries)) => serve(
                me,
                Ok(DirBuf {
                    plus,
                    next: offset,
                    eof: entries.is_empty(),
                    entries: entries.into(),
                }),
            ),
            Ok(_) => serve(me, Err(libc::EIO)),
            Err(e) => serve(me, Err(e)),
        });
    }

    /// Gives entries to the kernel until `add` reports the reply full; keeps the rest (or
    /// the end-of-directory mark) for the next request on this handle.
    fn dir_serve(
        &self,
        fh: u64,
        mut buf: DirBuf,
        mut add: impl FnMut(&QtfsClient, &proto::DirEntry) -> bool,
    ) {
        while let Some(e) = buf.entries.front() {
            if add(self, e) {
                break;
            }
            buf.next = e.offset;
            buf.entries.pop_front();
        }
        if buf.entries.is_empty() && !buf.eof {
            return;
        }
        let replaced = lock(&self.inner.dirs).insert(fh, buf);
        if let Some(old) = replaced {
            self.dir_forget(old);
        }
    }

    /// Drops a buffer, returning the engine lookups its undelivered plus entries hold.
    fn dir_forget(&self, buf: DirBuf) {
        let items: Vec<(u64, u64)> = buf
            .entries
            .iter()
            .filter_map(|e| e.entry.as_ref().map(|en| (en.node, 1)))
            .collect();
        self.forget_later(&items);
    }

    /// Queues forgets for the engine. Nobody waits for them, so they go in batches: at most
    /// [`FORGET_DELAY`] late, or at once when [`FORGET_BATCH`] are queued (the kernel evicts
    /// inodes by the thousand after an `rm -rf`). A late forget only keeps an engine node
    /// alive a little longer: lookups and forgets are counts, so their order does not matter.
    fn forget_later(&self, items: &[(u64, u64)]) {
        if items.is_empty() {
            return;
        }
        if self.inner.opts.writeback {
            let mut cache = lock(&self.inner.attrs);
            for (node, _) in items {
                cache.remove(&self.ino(*node));
            }
        }
        let (first, full) = {
            let mut q = lock(&self.inner.forgets);
            let first = q.is_empty();
            q.extend_from_slice(items);
            let full = q.len() >= FORGET_BATCH;
            (first, full.then(|| std::mem::take(&mut *q)))
        };
        if let Some(items) = full {
            self.call(Request::Forget { items }, no_creds(), |_, _| {});
        } else if first {
            let me = self.clone();
            self.inner.rt.spawn(async move {
                tokio::time::sleep(FORGET_DELAY).await;
                let items = std::mem::take(&mut *lock(&me.inner.forgets));
                if !items.is_empty() {
                    me.call(Request::Forget { items }, no_creds(), |_, _| {});
                }
            });
        }
    }

    /// Drops what the xattr cache knows about `node` (its xattrs are changing).
    fn forget_absent_xattrs(&self, node: u64) {
        lock(&self.inner.xattr_absent).retain(|(n, _), _| *n != node);
    }

    /// Hands over the running session's notifier (once; later calls are ignored).
    pub fn set_notifier(&self, notifier: fuser::Notifier) {
        let _ = self.inner.notifier.set(notifier);
    }

    /// Makes the kernel ask for `ino`'s attributes again on the next stat. Without a
    /// notifier yet (the first moments of a mount) they expire after `attr_timeout`.
    fn invalidate_attrs(&self, ino: INodeNo) {
        if let Some(n) = self.inner.notifier.get() {
            // A negative offset drops the attributes and keeps the cached data.
            if let Err(e) = n.inval_inode(ino, -1, 0) {
                tracing::debug!(ino = ino.0, error = %e, "could not invalidate cached attributes");
            }
        }
    }

    /// What the kernel agreed to at FUSE INIT ("kernel FUSE 7.40 with readdirplus ..."),
    /// once the first request has been served.
    pub fn negotiated(&self) -> Option<&str> {
        self.inner.negotiated.get().map(String::as_str)
    }

    /// This mount's per-operation statistics.
    pub fn stats(&self) -> Arc<MountStats> {
        self.inner.stats.clone()
    }

    fn node(&self, ino: INodeNo) -> u64 {
        if ino.0 == 1 {
            self.inner.root.load(Ordering::Relaxed)
        } else {
            ino.0
        }
    }

    fn ino(&self, node: u64) -> u64 {
        if node == self.inner.root.load(Ordering::Relaxed) {
            1
        } else {
            node
        }
    }

    fn file_attr(&self, node: u64, a: &Attr) -> FileAttr {
        let attr = self.convert_attr(node, a);
        if self.inner.opts.writeback {
            insert_bounded(
                &mut lock(&self.inner.attrs),
                ATTRS_CACHE_MAX,
                attr.ino.0,
                (attr, Instant::now()),
            );
        }
        attr
    }

    /// Keeps the directory attributes that came with an answer (for the kernel's next
    /// GETATTR of each) and returns the answer itself. Of two answers about one directory,
    /// the later change (greater ctime) wins, whatever order they arrive in.
    fn take_dir_attrs(&self, resp: Response) -> Response {
        let Response::InDirs { inner, dirs } = resp else {
            return resp;
        };
        let now = Instant::now();
        let attrs: Vec<FileAttr> = dirs
            .iter()
            .map(|(node, a)| self.file_attr(*node, a))
            .collect();
        let mut cache = lock(&self.inner.dir_attrs);
        for attr in attrs {
            let newer = cache
                .get(&attr.ino.0)
                .map_or(true, |(old, _)| old.ctime <= attr.ctime);
            if newer {
                insert_bounded(&mut cache, ATTRS_CACHE_MAX, attr.ino.0, (attr, now));
            }
        }
        *inner
    }

    /// The attributes a change through this mount left directory `ino` with, if the
    /// engine gave them less than `attr_ttl` ago, and what is left of that TTL (so the
    /// kernel holds them no longer than `attr_ttl` after the engine read them). Each is used
    /// once: the kernel keeps it, and the next change brings new ones.
    fn changed_dir_attr(&self, ino: u64) -> Option<(FileAttr, Duration)> {
        let (attr, at) = lock(&self.inner.dir_attrs).remove(&ino)?;
        let left = self.inner.opts.attr_ttl.checked_sub(at.elapsed())?;
        (!left.is_zero()).then_some((attr, left))
    }

    /// A change of the directory's own attributes (mode, owner, ACL) through this mount
    /// makes what a change inside it left there out of date.
    fn forget_dir_attr(&self, ino: u64) {
        lock(&self.inner.dir_attrs).remove(&ino);
    }

    /// With `writeback` the kernel keeps a file's times itself and, after every rename or
    /// unlink (a ctime change), writes them back with a SETATTR of mtime and ctime, and waits
    /// for it. When that mtime is the one the engine last reported, within the attribute
    /// TTL, there is nothing to write (the HOST sets ctime itself): the last attributes are
    /// the answer, without a round trip.
    fn unchanged_times(&self, ino: u64, mtime: SystemTime) -> Option<FileAttr> {
        let cache = lock(&self.inner.attrs);
        let (attr, at) = cache.get(&ino)?;
        (at.elapsed() < self.inner.opts.attr_ttl && attr.mtime == mtime).then_some(*attr)
    }

    fn convert_attr(&self, node: u64, a: &Attr) -> FileAttr {
        FileAttr {
            ino: INodeNo(self.ino(node)),
            size: a.size,
            blocks: a.blocks,
            atime: system_time(a.atime),
            mtime: system_time(a.mtime),
            ctime: system_time(a.ctime),
            crtime: system_time(a.ctime),
            kind: kind_of_mode(a.mode),
            perm: (a.mode & 0o7777) as u16,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev as u32,
            blksize: if a.blksize == 0 { 4096 } else { a.blksize },
            flags: 0,
        }
    }

    /// Sends `req` and calls `done` with the decoded response (or the errno) where the answer
    /// arrives (the link's reader task): `done` must not block.
    fn call<F>(&self, req: Request, creds: Creds, done: F)
    where
        F: FnOnce(&QtfsClient, Result<Response, i32>) + Send + 'static,
    {
        self.call_encoded(req.op(), req.encode(&creds), retryable(&req), done);
    }

    /// [`QtfsClient::call`] for a request already encoded as `op` and `payload`.
    fn call_encoded<F>(&self, op: u16, payload: Bytes, retry: Retry, done: F)
    where
        F: FnOnce(&QtfsClient, Result<Response, i32>) + Send + 'static,
    {
        let me = self.clone();
        let started = Instant::now();
        let answer: super::FsDone = Box::new(move |r| {
            let r = match r {
                Ok(b) => Response::decode(op, &b).map_err(|e| {
                    tracing::warn!(op, error = %e, "malformed qtfs reply");
                    libc::EIO
                }),
                Err(e) => Err(e.errno),
            };
            let r = r.map(|resp| me.take_dir_attrs(resp));
            let failed = r.as_ref().err().is_some_and(|e| stats::is_failure(op, *e));
            me.inner.stats.record(op, started.elapsed(), failed);
            done(&me, r);
        });
        self.dispatch((op, payload, answer, retry));
    }

    /// Whether a call whose link was lost may be sent again (asked only then, so writes do
    /// not look up their handle on the way out).
    fn may_retry(&self, retry: Retry) -> bool {
        match retry {
            Retry::No => false,
            Retry::Yes => true,
            Retry::UnlessAppending(fh) => lock(&self.inner.known)
                .file(fh)
                .is_some_and(|f| f.flags & libc::O_APPEND == 0),
        }
    }

    /// Sends a call, or holds it while the engine is away. A retryable call that loses its
    /// link on the way is held again for the next engine (or sent at once, if the mount is
    /// already back on a newer link).
    fn dispatch(&self, call: HeldCall) {
        let (op, payload, answer, retry) = call;
        if self.inner.holding.load(Ordering::Acquire) {
            let mut held = lock(&self.inner.held);
            if self.inner.holding.load(Ordering::Relaxed) {
                // Forgets are not held: the inodes they drop are not handed back either.
                if op != proto::op::FORGET && held.calls.len() < HELD_MAX {
                    held.calls.push((op, payload, answer, retry));
                } else {
                    drop(held);
                    answer(Err(FsCallError::errno(libc::ENOTCONN)));
                }
                return;
            }
        }
        let wait_ms = self.inner.reconnect_wait_ms.load(Ordering::Relaxed);
        let answer: super::FsDone = match retry {
            Retry::Yes | Retry::UnlessAppending(_) if wait_ms > 0 => {
                let me = self.clone();
                let again = payload.clone();
                let sent_on = self.inner.generation.load(Ordering::Acquire);
                Box::new(move |r| match r {
                    Err(e) if e.link_lost && me.may_retry(retry) => {
                        let same_link = me.inner.generation.load(Ordering::Acquire) == sent_on;
                        if same_link && me.inner.waited_out.load(Ordering::Acquire) {
                            return answer(Err(e));
                        }
                        if same_link && !me.inner.holding.load(Ordering::Acquire) {
                            // Before the mount's own watcher noticed the loss.
                            me.hold_calls(Duration::from_millis(wait_ms));
                        }
                        me.dispatch((op, again, answer, retry));
                    }
                    r => answer(r),
                })
            }
            _ => answer,
        };
        self.transport()
            .call_then(&self.inner.rt, op, payload, answer);
    }

    /// Lets calls wait up to `wait` for a lost engine instead of failing (the mount
    /// reconnects): retryable calls that were out when the link was lost wait too.
    pub fn retry_when_link_lost(&self, wait: Duration) {
        let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        self.inner.reconnect_wait_ms.store(ms, Ordering::Relaxed);
    }

    /// The link to the engine is down: from now on calls wait, up to `wait`, for
    /// [`QtfsClient::reattach`] to send them to the new engine; after that they fail with
    /// ENOTCONN, and so do new calls at once until the mount is back. Calls that were
    /// already sent failed with the link (they may or may not have run on the HOST); held
    /// calls never left this process, so sending them later is safe.
    pub fn hold_calls(&self, wait: Duration) {
        let epoch = {
            let mut held = lock(&self.inner.held);
            held.epoch += 1;
            self.inner.waited_out.store(false, Ordering::Release);
            self.inner.holding.store(true, Ordering::Release);
            held.epoch
        };
        let me = self.clone();
        self.inner.rt.spawn(async move {
            tokio::time::sleep(wait).await;
            let calls = {
                let mut held = lock(&me.inner.held);
                if held.epoch != epoch || !me.inner.holding.load(Ordering::Relaxed) {
                    return;
                }
                me.inner.waited_out.store(true, Ordering::Release);
                me.inner.holding.store(false, Ordering::Release);
                std::mem::take(&mut held.calls)
            };
            if !calls.is_empty() {
                tracing::warn!(
                    calls = calls.len(),
                    "the engine is still away: held operations fail with ENOTCONN"
                );
            }
            for (_, _, answer, _) in calls {
                answer(Err(FsCallError::errno(libc::ENOTCONN)));
            }
        });
    }

    /// Ends holding: the held calls, for the transport now in place.
    fn release_held(&self) -> Vec<HeldCall> {
        let mut held = lock(&self.inner.held);
        self.inner.holding.store(false, Ordering::Release);
        std::mem::take(&mut held.calls)
    }

    /// The transport calls go through now.
    fn transport(&self) -> Arc<dyn FsTransport> {
        self.inner
            .transport
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Answers an entry request for `name` in `parent` (ino).
    fn reply_entry(&self, r: Result<Response, i32>, parent: u64, name: &[u8], reply: ReplyEntry) {
        match r {
            Ok(Response::Entry(e)) => {
                self.entry_made(parent, name, &e);
                self.send_entry(&e, reply)
            }
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => {
                self.fresh_contradicted(e, &[parent]);
                reply.error(errno(e))
            }
        }
    }

    /// A directory listing showed `name` in `dir`: if the fresh-directory table did not know
    /// it, something else changed the directory, so it is no longer trusted.
    fn fresh_listed(&self, dir: u64, name: &[u8]) {
        if name == b"." || name == b".." {
            return;
        }
        if let Some(mut f) = self.fresh() {
            if f.absent(dir, name, Instant::now()) {
                f.drop_dir(dir);
            }
        }
    }

    /// Bookkeeping for an entry the kernel gets for `name` in `parent` from a lookup or a
    /// creation: the name exists (both tables).
    fn entry_made(&self, parent: u64, name: &[u8], e: &Entry) {
        self.known(parent, name, e);
        if let Some(mut f) = self.fresh() {
            f.added(parent, name);
        }
    }

    /// Bookkeeping after a rename answered `r`.
    fn name_renamed(
        &self,
        r: &Result<Response, i32>,
        (parent, name): (u64, &[u8]),
        (newparent, newname): (u64, &[u8]),
        exchange: bool,
    ) {
        match r {
            Ok(_) => {
                lock(&self.inner.known).renamed(parent, name, newparent, newname, exchange);
                if let Some(mut f) = self.fresh() {
                    f.renamed(parent, name, newparent, newname, exchange);
                }
            }
            Err(e) => self.fresh_contradicted(*e, &[parent, newparent]),
        }
    }

    /// Bookkeeping after an unlink or rmdir of `name` in `parent` answered `r`.
    fn name_removed(&self, r: &Result<Response, i32>, parent: u64, name: &[u8]) {
        match r {
            Ok(_) => {
                lock(&self.inner.known).removed(parent, name);
                if let Some(mut f) = self.fresh() {
                    f.removed(parent, name);
                }
            }
            Err(e) => self.fresh_contradicted(*e, &[parent]),
        }
    }

    /// The fresh-directory table, when `fresh_dirs` is on.
    fn fresh(&self) -> Option<MutexGuard<'_, FreshDirs>> {
        if self.inner.opts.fresh_dirs.is_zero() {
            return None;
        }
        Some(lock(&self.inner.fresh))
    }

    /// An answer that contradicts what the fresh-directory table believes about a name in
    /// these directories (EEXIST for a name thought absent, ENOENT for one thought present):
    /// stop trusting them.
    fn fresh_contradicted(&self, err: i32, dirs: &[u64]) {
        if err != libc::EEXIST && err != libc::ENOENT {
            return;
        }
        if let Some(mut f) = self.fresh() {
            for d in dirs {
                f.drop_dir(*d);
            }
        }
    }

    /// Notes an entry given to the kernel (one more lookup of its node).
    fn known(&self, parent: u64, name: &[u8], e: &Entry) {
        lock(&self.inner.known).looked_up(parent, name, self.ino(e.node), e.attr.ino);
    }

    /// Notes a handle the kernel got.
    fn opened(&self, fh: u64, ino: INodeNo, flags: i32, dir: bool, creds: Creds) {
        let flags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC);
        let file = KnownFile {
            node: ino.0,
            flags,
            dir,
            creds,
        };
        lock(&self.inner.known).opened(fh, file);
    }

    fn send_entry(&self, e: &Entry, reply: ReplyEntry) {
        let o = &self.inner.opts;
        reply.entry_with_ttls(
            &o.attr_ttl,
            &o.entry_ttl,
            &self.file_attr(e.node, &e.attr),
            Generation(0),
        );
    }

    fn reply_empty(r: Result<Response, i32>, reply: ReplyEmpty) {
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open_flags(&self, server_flags: u32) -> FopenFlags {
        if self.inner.opts.direct_io || server_flags & proto::open_flags::PSEUDO_FS != 0 {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::empty()
        }
    }

    /// With the writeback cache the kernel reads pages of write-only files and handles
    /// O_APPEND itself, so the engine must open them read-write and without O_APPEND.
    fn adjust_open(&self, flags: i32) -> i32 {
        if !self.inner.opts.writeback {
            return flags;
        }
        let mut f = flags & !libc::O_APPEND;
        if f & libc::O_ACCMODE == libc::O_WRONLY {
            f = (f & !libc::O_ACCMODE) | libc::O_RDWR;
        }
        f
    }

    // ---- proc mode

    fn proc_lookup(&self, name: &OsStr) -> Option<(u64, PathBuf)> {
        let o = &self.inner.opts;
        let b = name.as_bytes();
        let (ino, tail) = match b {
            b"self" => (PROC_SELF, "self".to_string()),
            b"thread-self" => (PROC_THREAD_SELF, "thread-self".to_string()),
            _ if !b.is_empty() && b.len() <= 10 && b.iter().all(u8::is_ascii_digit) => {
                let pid: u32 = std::str::from_utf8(b).ok()?.parse().ok()?;
                if !o.local_proc.join(pid.to_string()).exists() {
                    return None;
                }
                (PROC_PID | u64::from(pid), pid.to_string())
            }
            _ => return None,
        };
        Some((ino, o.local_proc.join(tail)))
    }

    fn proc_target(&self, ino: u64) -> Option<PathBuf> {
        let lp = &self.inner.opts.local_proc;
        match ino {
            PROC_SELF => Some(lp.join("self")),
            PROC_THREAD_SELF => Some(lp.join("thread-self")),
            i if i & PROC_PID == PROC_PID => Some(lp.join((i & 0xffff_ffff).to_string())),
            _ => None,
        }
    }

    fn proc_attr(&self, ino: u64, target: &Path) -> FileAttr {
        let now = SystemTime::now();
        FileAttr {
            ino: INodeNo(ino),
            size: target.as_os_str().len() as u64,
            blocks: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind: FileType::Symlink,
            perm: 0o777,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl Filesystem for QtfsClient {
    fn init(&mut self, _req: &FuseRequest, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        if let Err(max) = config.set_max_readahead(MAX_WRITE) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        let mut wanted = vec![
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_POSIX_LOCKS,
        ];
        // Not FUSE_ATOMIC_O_TRUNC: with it the kernel sends O_TRUNC along with the open and
        // checks only afterwards whether the file may be cut, so open(O_TRUNC) of a program
        // that is running here fails with ETXTBSY after the engine has already emptied the
        // file (and the program then crashes on its next page fault). Without it the kernel
        // checks first and then sends the truncation as a setattr on the new handle.
        //
        // The engine clears set-user-ID and set-group-ID bits on write, truncate and chown
        // (HANDLE_KILLPRIV_V2). Without it the kernel asks for security.capability before
        // every write (a request per write(2)), and clears the bits with a chmod sent as the
        // writer, which the HOST refuses to anyone but the file's owner.
        wanted.push(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        // POSIX_ACL turns on the kernel's own permission checks (default_permissions) with
        // the HOST's ACLs, which it fetches as xattrs. They run on every path walk, also
        // through names the kernel has cached, so a directory's search permission counts as
        // it does locally: without them a cached path skips the lookup, and with it the only
        // check of the directories on the way (the engine reaches nodes by handle).
        // The engine still performs every operation as the caller, so the HOST's checks
        // apply as well.
        wanted.push(InitFlags::FUSE_POSIX_ACL);
        // The umask is applied by the engine, and not under a default ACL on the HOST (the
        // kernel would apply it always, narrowing the ACL's mask).
        wanted.push(InitFlags::FUSE_DONT_MASK);
        // Cached pages are dropped when a refresh of the attributes shows that the HOST
        // changed the file (its size or modification time), also for open files.
        wanted.push(InitFlags::FUSE_AUTO_INVAL_DATA);
        // Shared mappings of direct_io files (databases' shared-memory files, bbolt): the
        // kernel maps them through its page cache, as without direct_io.
        wanted.push(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        if self.inner.opts.writeback {
            wanted.push(InitFlags::FUSE_WRITEBACK_CACHE);
        }
        let mut granted = Vec::new();
        for f in wanted {
            // Kernels without a capability simply run without it.
            if config.add_capabilities(f).is_ok() {
                granted.push(capability_name(f));
            }
        }
        let _ = self.inner.negotiated.set(format!(
            "kernel FUSE {} with {}",
            config.kernel_abi(),
            granted.join(" ")
        ));
        Ok(())
    }

    fn lookup(&self, req: &FuseRequest, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if self.inner.opts.proc_mode && parent.0 == 1 {
            if let Some((ino, target)) = self.proc_lookup(name) {
                // Processes come and go: never cache these entries.
                reply.entry_with_ttls(
                    &Duration::ZERO,
                    &Duration::ZERO,
                    &self.proc_attr(ino, &target),
                    Generation(0),
                );
                return;
            }
        }
        if let Some(mut f) = self.fresh() {
            if f.absent(parent.0, name.as_bytes(), Instant::now()) {
                drop(f);
                reply.error(Errno::ENOENT);
                return;
            }
        }
        let name = name.as_bytes().to_vec();
        let r = Request::Lookup {
            parent: self.node(parent),
            name: name.clone(),
        };
        self.call(r, self.creds_of(req), move |me, r| match r {
            Err(libc::ENOENT) if !me.inner.opts.negative_ttl.is_zero() => {
                // Node id 0 with a timeout: the kernel caches the name as absent until
                // then (a create through this mount replaces it at once).
                let attr = FileAttr {
                    ino: INodeNo(0),
                    ..me.file_attr(0, &Attr::default())
                };
                reply.entry_with_ttls(
                    &Duration::ZERO,
                    &me.inner.opts.negative_ttl,
                    &attr,
                    Generation(0),
                );
            }
            r => me.reply_entry(r, parent.0, &name, reply),
        });
    }

    fn forget(&self, _req: &FuseRequest, ino: INodeNo, nlookup: u64) {
        if ino.0 & PROC_BASE != 0 || ino.0 == 1 {
            return;
        }
        lock(&self.inner.known).forgot(ino.0, nlookup);
        if let Some(mut f) = self.fresh() {
            f.drop_dir(ino.0);
        }
        self.forget_later(&[(ino.0, nlookup)]);
    }

    fn getattr(&self, _req: &FuseRequest, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        if let Some(t) = self.proc_target(ino.0) {
            reply.attr(&Duration::ZERO, &self.proc_attr(ino.0, &t));
            return;
        }
        if let Some((a, ttl)) = self.changed_dir_attr(ino.0) {
            reply.attr(&ttl, &a);
            return;
        }
        let node = self.node(ino);
        self.call(
            Request::Getattr {
                node,
                fh: fh.map(|f| f.0),
            },
            no_creds(),
            move |me, r| match r {
                Ok(Response::Attr(a)) => {
                    reply.attr(&me.inner.opts.attr_ttl, &me.file_attr(node, &a))
                }
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn setattr(
        &self,
        req: &FuseRequest,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.forget_dir_attr(ino.0);
        // With `writeback` the kernel sends UTIME_NOW (`touch`) as its own clock's time, which
        // only the owner may set, where "now" needs only write permission. That time is also
        // the ctime it sends, which an explicit time never is. Time write-backs bring a
        // handle and truncations a size: those keep the kernel's exact times.
        let mtime = match (mtime, ctime) {
            (Some(TimeOrNow::SpecificTime(m)), Some(c))
                if self.inner.opts.writeback && m == c && fh.is_none() && size.is_none() =>
            {
                Some(TimeOrNow::Now)
            }
            (m, _) => m,
        };
        let st = |t: Option<TimeOrNow>| match t {
            None => SetTime::Omit,
            Some(TimeOrNow::Now) => SetTime::Now,
            Some(TimeOrNow::SpecificTime(t)) => SetTime::At(to_proto_time(t)),
        };
        let mut valid = 0;
        for (cond, bit) in [
            (mode.is_some(), set::MODE),
            (uid.is_some(), set::UID),
            (gid.is_some(), set::GID),
            (size.is_some(), set::SIZE),
            (atime.is_some(), set::ATIME),
            (mtime.is_some(), set::MTIME),
        ] {
            if cond {
                valid |= bit;
            }
        }
        if let (set::MTIME, Some(TimeOrNow::SpecificTime(t))) = (valid, mtime) {
            if let Some(attr) = self.unchanged_times(ino.0, t) {
                reply.attr(&self.inner.opts.attr_ttl, &attr);
                return;
            }
        }
        let s = proto::SetAttr {
            valid,
            mode: mode.unwrap_or(0),
            uid: uid.unwrap_or(0),
            gid: gid.unwrap_or(0),
            size: size.unwrap_or(0),
            atime: st(atime),
            mtime: st(mtime),
        };
        let node = self.node(ino);
        self.call(
            Request::Setattr {
                node,
                fh: fh.map(|f| f.0),
                set: s,
            },
            self.creds_of(req),
            move |me, r| match r {
                Ok(Response::Attr(a)) => {
                    reply.attr(&me.inner.opts.attr_ttl, &me.file_attr(node, &a))
                }
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn readlink(&self, req: &FuseRequest, ino: INodeNo, reply: ReplyData) {
        if let Some(t) = self.proc_target(ino.0) {
            reply.data(t.as_os_str().as_bytes());
            return;
        }
        self.call(
            Request::Readlink {
                node: self.node(ino),
            },
            self.creds_of(req),
            |_, r| match r {
                Ok(Response::Data(d)) => reply.data(&d),
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn mknod(
        &self,
        req: &FuseRequest,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let name_b = name.as_bytes().to_vec();
        let r = Request::Mknod {
            parent: self.node(parent),
            name: name_b.clone(),
            mode,
            umask,
            rdev: rdev.into(),
        };
        self.call(r, self.creds_of(req), move |me, r| {
            me.reply_entry(r, parent.0, &name_b, reply)
        });
    }

    fn mkdir(
        &self,
        req: &FuseRequest,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let name_b = name.as_bytes().to_vec();
        let r = Request::Mkdir {
            parent: self.node(parent),
            name: name_b.clone(),
            mode,
            umask,
        };
        self.call(r, self.creds_of(req), move |me, r| {
            if let (Ok(Response::Entry(e)), Some(mut f)) = (&r, me.fresh()) {
                f.created(me.ino(e.node), Instant::now());
            }
            me.reply_entry(r, parent.0, &name_b, reply)
        });
    }

    /// No file here is a terminal, and the HOST's file ioctls are not forwarded: ENOTTY, a
    /// local file system's answer to an ioctl it does not know. (`isatty()`, which Python's
    /// `open` and many programs call on every file, asks with TCGETS; the default answer
    /// logged a warning each time.)
    fn ioctl(
        &self,
        _req: &FuseRequest,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn unlink(&self, req: &FuseRequest, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.as_bytes().to_vec();
        let r = Request::Unlink {
            parent: self.node(parent),
            name: name.clone(),
        };
        self.call(r, self.creds_of(req), move |me, r| {
            me.name_removed(&r, parent.0, &name);
            Self::reply_empty(r, reply)
        });
    }

    fn rmdir(&self, req: &FuseRequest, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.as_bytes().to_vec();
        let r = Request::Rmdir {
            parent: self.node(parent),
            name: name.clone(),
        };
        self.call(r, self.creds_of(req), move |me, r| {
            me.name_removed(&r, parent.0, &name);
            Self::reply_empty(r, reply)
        });
    }

    fn symlink(
        &self,
        req: &FuseRequest,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let name_b = link_name.as_bytes().to_vec();
        let r = Request::Symlink {
            parent: self.node(parent),
            name: name_b.clone(),
            target: target.as_os_str().as_bytes().to_vec(),
        };
        self.call(r, self.creds_of(req), move |me, r| {
            me.reply_entry(r, parent.0, &name_b, reply)
        });
    }

    fn rename(
        &self,
        req: &FuseRequest,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (name, newname) = (name.as_bytes().to_vec(), newname.as_bytes().to_vec());
        let r = Request::Rename {
            parent: self.node(parent),
            name: name.clone(),
            newparent: self.node(newparent),
            newname: newname.clone(),
            flags: flags.bits(),
        };
        let exchange = flags.bits() & libc::RENAME_EXCHANGE != 0;
        self.call(r, self.creds_of(req), move |me, r| {
            me.name_renamed(&r, (parent.0, &name), (newparent.0, &newname), exchange);
            Self::reply_empty(r, reply)
        });
    }

    fn link(
        &self,
        req: &FuseRequest,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let name_b = newname.as_bytes().to_vec();
        let r = Request::Link {
            node: self.node(ino),
            newparent: self.node(newparent),
            newname: name_b.clone(),
        };
        self.call(r, self.creds_of(req), move |me, r| {
            me.reply_entry(r, newparent.0, &name_b, reply)
        });
    }

    fn open(&self, req: &FuseRequest, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let sent = self.adjust_open(flags.0);
        let r = Request::Open {
            node: self.node(ino),
            flags: sent,
        };
        let creds = self.creds_of(req);
        self.call(r, creds.clone(), move |me, r| match r {
            Ok(Response::Opened { fh, flags }) => {
                me.opened(fh, ino, sent, false, creds);
                reply.opened(FileHandle(fh), me.open_flags(flags))
            }
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn read(
        &self,
        _req: &FuseRequest,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.call(
            Request::Read {
                fh: fh.0,
                offset,
                size,
            },
            no_creds(),
            |_, r| match r {
                Ok(Response::Data(d)) => reply.data(&d),
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn write(
        &self,
        req: &FuseRequest,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // The writer lacks CAP_FSETID: the engine may have to write as the writer (which
        // otherwise does not matter on an open file) to clear what a local write clears.
        let (mut flags, creds) = if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            (proto::write_flags::KILL_SUIDGID, self.creds_of(req))
        } else {
            (0, no_creds())
        };
        if write_flags.contains(WriteFlags::FUSE_WRITE_CACHE) {
            flags |= proto::write_flags::CACHED;
        }
        // Encoded straight from the kernel's buffer: one copy of up to 1 MiB, not two.
        let payload = Request::encode_write(&creds, fh.0, offset, flags, data);
        let retry = Retry::UnlessAppending(fh.0);
        self.call_encoded(proto::op::WRITE, payload, retry, move |me, r| match r {
            Ok(Response::Written { count, killed }) => {
                if killed {
                    // The kernel keeps the old mode until its attributes expire: a stat
                    // right after the write would still show the bits.
                    me.invalidate_attrs(ino);
                }
                reply.written(count as u32)
            }
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn flush(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        if !lock(&self.inner.locked).contains_key(&ino.0) {
            return reply.ok();
        }
        self.call(
            Request::Flush {
                fh: fh.0,
                owner: lock_owner.0,
            },
            no_creds(),
            |me, r| {
                me.inner.unlocked.notify_waiters();
                Self::reply_empty(r, reply)
            },
        );
    }

    fn release(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let was_locked = {
            let mut locked = lock(&self.inner.locked);
            let mut was = false;
            if let Some(handles) = locked.get_mut(&ino.0) {
                was = handles.contains(&fh.0);
                handles.retain(|h| *h != fh.0);
                if handles.is_empty() {
                    locked.remove(&ino.0);
                }
            }
            was
        };
        lock(&self.inner.known).released(fh.0);
        self.call(Request::Release { fh: fh.0 }, no_creds(), move |me, r| {
            if was_locked {
                me.inner.unlocked.notify_waiters();
            }
            Self::reply_empty(r, reply)
        });
    }

    fn fsync(
        &self,
        _req: &FuseRequest,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.call(Request::Fsync { fh: fh.0, datasync }, no_creds(), |_, r| {
            Self::reply_empty(r, reply)
        });
    }

    fn opendir(&self, req: &FuseRequest, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let creds = self.creds_of(req);
        self.call(
            Request::Opendir {
                node: self.node(ino),
            },
            creds.clone(),
            move |me, r| match r {
                Ok(Response::Opened { fh, .. }) => {
                    me.opened(fh, ino, libc::O_RDONLY, true, creds);
                    reply.opened(FileHandle(fh), FopenFlags::empty())
                }
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn readdir(
        &self,
        req: &FuseRequest,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.dir_batch(req, ino, fh.0, offset, false, move |me, r| match r {
            Ok(buf) => {
                me.dir_serve(fh.0, buf, |_, e| {
                    me.fresh_listed(ino.0, &e.name);
                    reply.add(
                        INodeNo(e.ino),
                        e.offset,
                        kind_of_dtype(e.kind),
                        OsStr::from_bytes(&e.name),
                    )
                });
                reply.ok();
            }
            Err(e) => reply.error(errno(e)),
        });
    }

    fn readdirplus(
        &self,
        req: &FuseRequest,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.dir_batch(req, ino, fh.0, offset, true, move |me, r| match r {
            Ok(buf) => {
                let ttl = me.inner.opts.entry_ttl;
                me.dir_serve(fh.0, buf, |me, e| {
                    // Proc mode: the names a lookup answers here (`self`, `thread-self`, this
                    // machine's own processes) must not be linked to the HOST's entries by a
                    // listing, or `self` would become the engine's process until it expired.
                    let local = (me.inner.opts.proc_mode && ino.0 == 1)
                        .then(|| me.proc_lookup(OsStr::from_bytes(&e.name)))
                        .flatten();
                    if let Some((pino, target)) = local {
                        let full = reply.add(
                            INodeNo(pino),
                            e.offset,
                            OsStr::from_bytes(&e.name),
                            &Duration::ZERO,
                            &me.proc_attr(pino, &target),
                            Generation(0),
                        );
                        if let (false, Some(en)) = (full, &e.entry) {
                            // The engine counted a lookup the kernel will never forget.
                            me.forget_later(&[(en.node, 1)]);
                        }
                        return full;
                    }
                    let attr = match &e.entry {
                        Some(en) => me.file_attr(en.node, &en.attr),
                        // `.` and `..`: the kernel does not link these, so no lookup is
                        // counted; describe them as directories of this inode.
                        None => {
                            let mut a = me.file_attr(
                                0,
                                &Attr {
                                    mode: libc::S_IFDIR | 0o755,
                                    ..Attr::default()
                                },
                            );
                            a.ino = ino;
                            a
                        }
                    };
                    let full = reply.add(
                        attr.ino,
                        e.offset,
                        OsStr::from_bytes(&e.name),
                        &ttl,
                        &attr,
                        Generation(0),
                    );
                    if let (false, Some(en)) = (full, &e.entry) {
                        me.known(ino.0, &e.name, en);
                        me.fresh_listed(ino.0, &e.name);
                    }
                    full
                });
                reply.ok();
            }
            Err(e) => reply.error(errno(e)),
        });
    }

    fn releasedir(
        &self,
        _req: &FuseRequest,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let buf = lock(&self.inner.dirs).remove(&fh.0);
        if let Some(buf) = buf {
            self.dir_forget(buf);
        }
        lock(&self.inner.known).released(fh.0);
        self.call(Request::Release { fh: fh.0 }, no_creds(), |_, r| {
            Self::reply_empty(r, reply)
        });
    }

    fn fsyncdir(
        &self,
        _req: &FuseRequest,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.call(Request::Fsync { fh: fh.0, datasync }, no_creds(), |_, r| {
            Self::reply_empty(r, reply)
        });
    }

    fn statfs(&self, _req: &FuseRequest, ino: INodeNo, reply: ReplyStatfs) {
        let node = if ino.0 & PROC_BASE != 0 {
            self.inner.root.load(Ordering::Relaxed)
        } else {
            self.node(ino)
        };
        self.call(Request::Statfs { node }, no_creds(), |_, r| match r {
            Ok(Response::Statfs(s)) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn setxattr(
        &self,
        req: &FuseRequest,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if ino.0 & PROC_BASE != 0 {
            // As the local procfs answers for its symlinks (the kernel refuses user.* on
            // symlinks itself).
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        }
        self.forget_dir_attr(ino.0);
        self.forget_absent_xattrs(self.node(ino));
        let r = Request::Setxattr {
            node: self.node(ino),
            name: name.as_bytes().to_vec(),
            flags,
            value: Bytes::copy_from_slice(value),
        };
        self.call(r, self.creds_of(req), |_, r| Self::reply_empty(r, reply));
    }

    fn getxattr(
        &self,
        req: &FuseRequest,
        ino: INodeNo,
        name: &OsStr,
        size: u32,
        reply: ReplyXattr,
    ) {
        if ino.0 & PROC_BASE != 0 {
            // Proc mode's links have no attributes, as the local procfs's symlinks.
            return reply.error(Errno::from_i32(libc::ENODATA));
        }
        let node = self.node(ino);
        let key = (node, name.as_bytes().to_vec());
        let ttl = self.inner.opts.attr_ttl;
        let known_absent = lock(&self.inner.xattr_absent)
            .get(&key)
            .is_some_and(|at| at.elapsed() < ttl);
        if known_absent {
            return reply.error(Errno::from_i32(libc::ENODATA));
        }
        let r = Request::Getxattr {
            node,
            name: key.1.clone(),
            size,
        };
        self.call(r, self.creds_of(req), move |me, r| {
            if r == Err(libc::ENODATA) && !ttl.is_zero() {
                insert_bounded(
                    &mut lock(&me.inner.xattr_absent),
                    XATTR_ABSENT_MAX,
                    key,
                    Instant::now(),
                );
            }
            reply_xattr(r, size, reply)
        });
    }

    fn listxattr(&self, req: &FuseRequest, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if ino.0 & PROC_BASE != 0 {
            return reply_xattr(Ok(Response::Data(Bytes::new())), size, reply);
        }
        self.call(
            Request::Listxattr {
                node: self.node(ino),
                size,
            },
            self.creds_of(req),
            move |_, r| reply_xattr(r, size, reply),
        );
    }

    fn removexattr(&self, req: &FuseRequest, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if ino.0 & PROC_BASE != 0 {
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        }
        self.forget_dir_attr(ino.0);
        self.forget_absent_xattrs(self.node(ino));
        let r = Request::Removexattr {
            node: self.node(ino),
            name: name.as_bytes().to_vec(),
        };
        self.call(r, self.creds_of(req), |_, r| Self::reply_empty(r, reply));
    }

    fn access(&self, req: &FuseRequest, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if ino.0 & PROC_BASE != 0 {
            reply.ok();
            return;
        }
        self.call(
            Request::Access {
                node: self.node(ino),
                mask: mask.bits(),
            },
            self.creds_of(req),
            |_, r| Self::reply_empty(r, reply),
        );
    }

    fn create(
        &self,
        req: &FuseRequest,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let name = name.as_bytes().to_vec();
        let sent = self.adjust_open(flags);
        let r = Request::Create {
            parent: self.node(parent),
            name: name.clone(),
            mode,
            umask,
            flags: sent,
        };
        let creds = self.creds_of(req);
        self.call(r, creds.clone(), move |me, r| match r {
            Ok(Response::Created { entry, fh, flags }) => {
                me.entry_made(parent.0, &name, &entry);
                me.opened(fh, INodeNo(me.ino(entry.node)), sent, false, creds);
                reply.created(
                    &me.inner.opts.entry_ttl,
                    &me.file_attr(entry.node, &entry.attr),
                    Generation(0),
                    FileHandle(fh),
                    me.open_flags(flags),
                )
            }
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => {
                me.fresh_contradicted(e, &[parent.0]);
                reply.error(errno(e))
            }
        });
    }

    fn getlk(
        &self,
        _req: &FuseRequest,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let r = Request::Getlk {
            fh: fh.0,
            owner: lock_owner.0,
            lock: Lock {
                start,
                end,
                typ,
                pid,
            },
        };
        self.call(r, no_creds(), |_, r| match r {
            Ok(Response::Lock(l)) => reply.locked(l.start, l.end, l.typ, l.pid),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn setlk(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        // Before the request: a flush racing with it must go to the engine.
        {
            let mut locked = lock(&self.inner.locked);
            let handles = locked.entry(ino.0).or_default();
            if !handles.contains(&fh.0) {
                handles.push(fh.0);
            }
        }
        let req = Request::Setlk {
            fh: fh.0,
            owner: lock_owner.0,
            lock: Lock {
                start,
                end,
                typ,
                pid,
            },
        };
        let me = self.clone();
        // F_SETLKW: the engine only takes locks without blocking (a blocked pool thread
        // would stall other requests), so waiting is a retry loop here, with backoff.
        self.inner.rt.spawn(async move {
            let op = req.op();
            let payload = req.encode(&no_creds());
            let mut delay = Duration::from_millis(5);
            loop {
                // Registered before the attempt, so an unlock while it is on its way counts.
                let unlocked = me.inner.unlocked.notified();
                tokio::pin!(unlocked);
                unlocked.as_mut().enable();
                let call = me.transport().call(op, payload.clone());
                match call.await {
                    Ok(_) => {
                        if typ == libc::F_UNLCK {
                            me.inner.unlocked.notify_waiters();
                        }
                        return reply.ok();
                    }
                    Err(e) if sleep && (e.errno == libc::EAGAIN || e.errno == libc::EACCES) => {
                        // A HOST process's unlock is not seen here: the backoff covers it.
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {}
                            () = &mut unlocked => {}
                        }
                        delay = (delay * 2).min(Duration::from_millis(200));
                    }
                    Err(e) => return reply.error(errno(e.errno)),
                }
            }
        });
    }

    fn fallocate(
        &self,
        _req: &FuseRequest,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.call(
            Request::Fallocate {
                fh: fh.0,
                offset,
                length,
                mode,
            },
            no_creds(),
            |_, r| Self::reply_empty(r, reply),
        );
    }

    fn lseek(
        &self,
        _req: &FuseRequest,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        if self.inner.opts.writeback {
            // The kernel does not write dirty pages back before asking, so the HOST would
            // report a hole (or ENXIO) where data was just written: a sparse-aware reader
            // (cp, tar, rsync) of a file still being written would skip it. ENOSYS makes the
            // kernel answer SEEK_DATA/SEEK_HOLE itself from then on: data up to its own file
            // size, the hole at the end.
            reply.error(Errno::ENOSYS);
            return;
        }
        self.call(
            Request::Lseek {
                fh: fh.0,
                offset,
                whence,
            },
            no_creds(),
            |_, r| match r {
                Ok(Response::Offset(o)) => reply.offset(o),
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn copy_file_range(
        &self,
        _req: &FuseRequest,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let r = Request::CopyFileRange {
            fh_in: fh_in.0,
            off_in: offset_in,
            fh_out: fh_out.0,
            off_out: offset_out,
            // FUSE replies carry a u32 count.
            len: len.min(u64::from(u32::MAX)),
            flags: flags.bits() as u32,
        };
        self.call(r, no_creds(), |_, r| match r {
            Ok(Response::Count(n)) => reply.written(n as u32),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(errno(e)),
        });
    }
}

/// The short name of a capability this client asks for (`mount -v`).
fn capability_name(f: InitFlags) -> &'static str {
    match f {
        InitFlags::FUSE_DO_READDIRPLUS => "readdirplus",
        InitFlags::FUSE_PARALLEL_DIROPS => "parallel_dirops",
        InitFlags::FUSE_ASYNC_DIO => "async_dio",
        InitFlags::FUSE_POSIX_LOCKS => "posix_locks",
        InitFlags::FUSE_HANDLE_KILLPRIV_V2 => "killpriv_v2",
        InitFlags::FUSE_POSIX_ACL => "posix_acl",
        InitFlags::FUSE_DONT_MASK => "dont_mask",
        InitFlags::FUSE_AUTO_INVAL_DATA => "auto_inval_data",
        InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP => "direct_io_allow_mmap",
        InitFlags::FUSE_WRITEBACK_CACHE => "writeback_cache",
        _ => "other",
    }
}

fn reply_xattr(r: Result<Response, i32>, size: u32, reply: ReplyXattr) {
    match r {
        Ok(Response::Data(d)) if size == 0 => reply.size(d.len() as u32),
        Ok(Response::Data(d)) if d.len() > size as usize => {
            reply.error(Errno::from_i32(libc::ERANGE))
        }
        Ok(Response::Data(d)) => reply.data(&d),
        Ok(_) => reply.error(Errno::EIO),
        Err(e) => reply.error(errno(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_convert_both_ways_including_before_epoch() {
        for t in [
            Time { sec: 0, nsec: 0 },
            Time {
                sec: 1_700_000_000,
                nsec: 5,
            },
            Time {
                sec: -2,
                nsec: 250_000_000,
            },
        ] {
            assert_eq!(to_proto_time(system_time(t)), t);
        }
    }

    #[test]
    fn kinds_follow_mode_bits() {
        assert_eq!(kind_of_mode(libc::S_IFDIR | 0o755), FileType::Directory);
        assert_eq!(kind_of_mode(libc::S_IFIFO), FileType::NamedPipe);
        assert_eq!(kind_of_dtype(libc::DT_LNK), FileType::Symlink);
        assert_eq!(kind_of_dtype(libc::DT_REG), FileType::RegularFile);
    }

    #[test]
    fn groups_of_reads_our_own_status() {
        let mine = groups_of(std::process::id());
        // SAFETY-free check against getgroups via nix.
        let expect: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        assert_eq!(mine, expect);
        assert!(groups_of(u32::MAX).is_empty());
    }
}
