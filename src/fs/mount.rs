//! `mount.qtfs` and `dpuctl mount`: mounts one HOST directory through the engine, one
//! process per mount (like sshfs).
//!
//! Calling convention (mount(8) helper): `mount.qtfs REMOTE LOCAL [-o opts] [-s] [-f] [-n] [-v]`,
//! so `mount -t qtfs /var/lib/docker /mnt` and an `/etc/fstab` line both work. The process
//! daemonises only after the FUSE mount is live; until then the parent waits on a pipe and
//! exits non-zero with the child's one-line error, leaving nothing mounted. `umount LOCAL`
//! ends the session and the process exits 0. SIGTERM/SIGINT unmount (lazily) and exit.
//!
//! Exit codes: 0 mounted (or unmounted cleanly with `-f`), 1 mount failed, 2 usage error,
//! 32 remount refused (mount(8) runs this helper as `mount.fuse.qtfs` for
//! `mount -o remount DIR`; a mount's options are its process's, which no later helper
//! can change). `-v` prints one line of what was mounted; debug logs are `RUST_LOG=debug`.
//!
//! Concurrency: one tokio runtime per process drives the transport and the FUSE replies;
//! fuser runs its own session threads.

use super::client::{ClientOptions, QtfsClient};
use super::link::LinkTransport;
use super::stats::MountStats;
use super::FsTransport;
use crate::daemon::control::{self, ControlHandler, Request};
use crate::daemon::logging::{self, LogHandle, LogTarget};
use crate::daemon::status::{DaemonStatus, MountStatus, PeerState, PeerStatus};
use crate::wire::Link;
use futures::future::BoxFuture;
use serde_json::{Map, Value};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The engine's default file-service address (DESIGN.md §4: qtfs port 12345).
pub const DEFAULT_SERVER: &str = "127.0.0.1:12345";
/// The default pre-shared key file.
pub const DEFAULT_KEY: &str = "/etc/dpuctl/psk";

/// Errors of the mount helper; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("usage: mount.qtfs REMOTE_PATH LOCAL_DIR [-o server=ADDR,key=FILE,ro,proc,...] [-f] [-s] [-n] [-v] ({0})")]
    Usage(String),
    /// An option mount.qtfs knows, with a value it cannot take: `why` says what is
    /// accepted.
    #[error("bad mount option '{option}': {why}")]
    BadOption { option: String, why: String },
    #[error("unknown mount option '{0}': mount.qtfs --help lists the supported options")]
    UnknownOption(String),
    #[error("options writeback and direct_io exclude each other: direct_io bypasses the page cache that writeback keeps, and file times would go stale; choose one")]
    WritebackWithDirectIo,
    /// `mount -o remount,...`: a mount's options are its process's command line.
    #[error("qtfs cannot change the options of a mounted file system: umount {0}, then mount it again with the new options")]
    Remount(PathBuf),
    #[error("mount point {path} does not exist: create the directory first")]
    LocalDirMissing { path: PathBuf },
    #[error("mount point {path} is not a directory")]
    LocalNotDir { path: PathBuf },
    #[error("mount point {path}: {source}{hint}")]
    LocalDir {
        path: PathBuf,
        source: std::io::Error,
        hint: &'static str,
    },
    /// Proc mode links `self` and local PIDs into `local_proc`, which must be a procfs.
    #[error("proc mode needs the DPU's own procfs at {path}, but {problem}: mount it there (mkdir -p {path} && mount -t proc proc {path}), or use -o local_proc=/proc")]
    LocalProc { path: PathBuf, problem: String },
    #[error("remote path '{0}' must be absolute")]
    RemotePath(PathBuf),
    #[error("cannot reach the engine: {0}")]
    Connect(#[from] super::link::ConnectError),
    #[error("engine refused to mount {remote}: {source}{hint}")]
    Attach {
        remote: PathBuf,
        source: super::FsCallError,
        hint: &'static str,
    },
    #[error("FUSE mount on {path} failed: {source} (is /dev/fuse present and are you root?)")]
    Fuse {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("could not daemonise: {0}")]
    Daemon(String),
    /// `--help` was asked for: not an error, `main` prints [`HELP`] and exits 0.
    #[error("help requested")]
    Help,
}

impl MountError {
    /// The exit status: 2 for a command line mount.qtfs cannot use, 32 (mount(8)'s "mount
    /// failure") for a remount it refuses, 1 for every other failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            MountError::Usage(_)
            | MountError::BadOption { .. }
            | MountError::UnknownOption(_)
            | MountError::WritebackWithDirectIo
            | MountError::RemotePath(_) => 2,
            MountError::Remount(_) => 32,
            _ => 1,
        }
    }

    fn bad(option: &str, why: impl Into<String>) -> Self {
        MountError::BadOption {
            option: option.to_string(),
            why: why.into(),
        }
    }
}

/// `mount.qtfs --help`.
pub const HELP: &str = "\
mount.qtfs - mount a HOST directory served by a dpuctl engine (the qtfs helper of mount(8))

Usage:
  mount -t qtfs [-o OPTIONS] REMOTE_PATH LOCAL_DIR
  mount.qtfs REMOTE_PATH LOCAL_DIR [-o OPTIONS] [-f] [-s] [-n] [-v]
  dpuctl mount REMOTE_PATH LOCAL_DIR [-o OPTIONS] [-f]
  umount LOCAL_DIR

REMOTE_PATH is a directory on the HOST that the engine's [Mount] allowlist covers; LOCAL_DIR is
an existing directory here. One process serves each mount; it goes to the background once the
mount is ready (a failure prints one line and exits 1, leaving nothing mounted).

Options (-o, comma-separated):
  server=ADDR          engine address: tcp://HOST:PORT, vsock://CID:PORT, HOST:PORT [127.0.0.1:12345]
  key=FILE             pre-shared key file [/etc/dpuctl/psk]
  insecure             no authentication (test setups; the engine must also be insecure)
  ro | rw              read-only or read-write [rw]
  proc                 proc mode: self, thread-self and local PIDs resolve to local_proc
  local_proc=PATH      where the DPU's own procfs is mounted [/local_proc]
  attr_timeout=SECS    attribute cache time [1]
  entry_timeout=SECS   name lookup cache time [1]
  negative_timeout=SECS  how long a name is remembered as absent [0: ask every time]
  fresh_dirs=SECS      for SECS after this mount creates a directory, take it to change only
                       through this mount: lookups of names not made here are answered
                       \"absent\" without asking the engine, so unpacking a tree costs one round
                       trip per entry instead of two [0: off]; names the HOST adds meanwhile
                       stay hidden until then
  read_ahead=KIB       kernel readahead window for sequential reads [1024]; 0 keeps the
                       kernel's FUSE default (128)
  writeback            kernel writeback cache (faster large writes)
  direct_io            no page cache (always on for proc, sysfs and cgroup files)
  allow_other          let every user use the mount [on]; noallow_other turns it off
  root_squash          act as nobody on the HOST for root here; no_root_squash [off]
  reconnect            when the engine goes away, dial it again (backoff up to 2 s) and give
                       it back every inode and open file [on]; noreconnect: fail until remounted
  reconnect_wait=SECS  how long operations wait for the engine to come back before failing
                       with ENOTCONN [10; 0: fail at once]
  run_dir=DIR          where the control socket mount-<pid>.ctl goes [$DPUCTL_RUN_DIR or /var/run/qtfs]
  defaults, noauto, _netdev, nofail, x-* and other generic options are accepted and ignored.

Flags:
  -f   stay in the foreground     -v   say what was mounted, in one line
  -s   sloppy (accepted)           -n   no mtab (accepted)
  -h, --help   this text

Examples:
  mount -t qtfs -o server=192.168.10.10:12345 /var/lib/docker /another_rootfs/var/lib/docker
  mount -t qtfs -o proc,server=192.168.10.10:12345 /proc /another_rootfs/proc
  /etc/fstab:  /var/lib/docker  /another_rootfs/var/lib/docker  qtfs  server=192.168.10.10:12345,_netdev  0 0

mount -o remount is refused (exit 32): umount, then mount again with the new options.
Debug logs: RUST_LOG=debug.

Exit status: 0 mounted, 1 mount failed, 2 usage error, 32 remount refused.
";

/// Parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountArgs {
    pub remote: PathBuf,
    pub local: PathBuf,
    pub server: String,
    pub key: PathBuf,
    pub insecure: bool,
    pub foreground: bool,
    pub verbose: bool,
    pub client: ClientOptions,
    /// Where the mount's control socket `mount-<pid>.ctl` goes.
    pub run_dir: PathBuf,
    /// The `-o` lists as given, for status.
    pub options: String,
    /// Dial the engine again after the link is lost (`noreconnect` turns it off).
    pub reconnect: bool,
    /// How long operations wait for a reconnect before failing (`reconnect_wait`).
    pub reconnect_wait: Duration,
}

/// How a duration option is written; the same in every message about one.
const DURATION_FORMS: &str = "use seconds like 1 or 0.5, or 1s/500ms";

/// A duration option's value: seconds (fractions allowed), or a number with `s` or `ms`.
fn secs(v: &str, opt: &str) -> Result<Duration, MountError> {
    let (num, unit) = match v.strip_suffix("ms") {
        Some(n) => (n, 1e-3),
        None => (v.strip_suffix('s').unwrap_or(v), 1.0),
    };
    let n = num
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite())
        .ok_or_else(|| MountError::bad(opt, format!("not a duration; {DURATION_FORMS}")))?;
    if n < 0.0 {
        return Err(MountError::bad(
            opt,
            format!("a duration cannot be negative; {DURATION_FORMS}"),
        ));
    }
    Duration::try_from_secs_f64(n * unit)
        .map_err(|_| MountError::bad(opt, format!("too long; {DURATION_FORMS}")))
}

/// The largest `read_ahead` (KiB): 1 GiB.
const READ_AHEAD_MAX_KIB: u32 = 1 << 20;

fn read_ahead(v: &str, opt: &str) -> Result<u32, MountError> {
    let accepted = format!(
        "use a number of KiB from 0 (the kernel's default) to {READ_AHEAD_MAX_KIB}, like read_ahead=1024"
    );
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(MountError::bad(opt, format!("not a number; {accepted}")));
    }
    v.parse::<u32>()
        .ok()
        .filter(|k| *k <= READ_AHEAD_MAX_KIB)
        .ok_or_else(|| MountError::bad(opt, format!("too large; {accepted}")))
}

/// What an option that takes a value looks like, for "needs a value".
fn value_form(key: &str) -> &'static str {
    match key {
        "server" => "server=ADDR (HOST:PORT, tcp://HOST:PORT or vsock://CID:PORT)",
        "key" => "key=FILE",
        "run_dir" => "run_dir=DIR",
        "local_proc" => "local_proc=PATH (an absolute path, like /local_proc)",
        "read_ahead" => "read_ahead=KIB, like read_ahead=1024",
        _ => "NAME=SECS, like 1, 0.5, 1s or 500ms",
    }
}

/// Applies one `-o` list. Generic options mount(8) passes are accepted and ignored.
pub fn apply_options(list: &str, m: &mut MountArgs) -> Result<(), MountError> {
    if !list.is_empty() {
        if !m.options.is_empty() {
            m.options.push(',');
        }
        m.options.push_str(list);
    }
    for opt in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let (k, v) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        let need = || {
            v.filter(|v| !v.is_empty())
                .ok_or_else(|| MountError::bad(opt, format!("needs a value: {}", value_form(k))))
        };
        match k {
            "server" => m.server = need()?.to_string(),
            "run_dir" => m.run_dir = PathBuf::from(need()?),
            "key" => m.key = PathBuf::from(need()?),
            "insecure" => m.insecure = true,
            "ro" => m.client.read_only = true,
            "rw" => m.client.read_only = false,
            "proc" => m.client.proc_mode = true,
            "local_proc" => m.client.local_proc = PathBuf::from(need()?),
            "attr_timeout" => m.client.attr_ttl = secs(need()?, opt)?,
            "entry_timeout" => m.client.entry_ttl = secs(need()?, opt)?,
            "negative_timeout" => m.client.negative_ttl = secs(need()?, opt)?,
            "fresh_dirs" => m.client.fresh_dirs = secs(need()?, opt)?,
            "read_ahead" => m.client.read_ahead_kib = read_ahead(need()?, opt)?,
            "writeback" | "writeback_cache" => m.client.writeback = true,
            "direct_io" => m.client.direct_io = true,
            "allow_other" => m.client.allow_other = true,
            "noallow_other" => m.client.allow_other = false,
            "root_squash" => m.client.root_squash = true,
            "no_root_squash" => m.client.root_squash = false,
            "reconnect" => m.reconnect = true,
            "reconnect_wait" => m.reconnect_wait = secs(need()?, opt)?,
            "noreconnect" => m.reconnect = false,
            // Generic options from mount(8)/fstab that mean nothing to a FUSE client.
            "defaults" | "auto" | "noauto" | "user" | "nouser" | "users" | "_netdev" | "nofail"
            | "exec" | "noexec" | "suid" | "nosuid" | "dev" | "nodev" | "atime" | "noatime"
            | "relatime" | "norelatime" | "strictatime" | "diratime" | "nodiratime" | "sync"
            | "async" | "owner" | "group" | "comment" | "loop" => {}
            _ if k.starts_with("x-") || k.starts_with("comment=") => {}
            _ => return Err(MountError::UnknownOption(opt.to_string())),
        }
    }
    Ok(())
}

/// Parses `REMOTE LOCAL [-o opts] [-s] [-f] [-n] [-v]` (`args[0]` is the program name).
pub fn parse_args(args: &[OsString]) -> Result<MountArgs, MountError> {
    let mut pos: Vec<PathBuf> = Vec::new();
    let mut m = MountArgs {
        remote: PathBuf::new(),
        local: PathBuf::new(),
        server: DEFAULT_SERVER.to_string(),
        key: PathBuf::from(DEFAULT_KEY),
        insecure: false,
        foreground: false,
        verbose: false,
        client: ClientOptions::default(),
        run_dir: std::env::var_os("DPUCTL_RUN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(crate::daemon::control::DEFAULT_RUN_DIR)),
        options: String::new(),
        reconnect: true,
        reconnect_wait: DEFAULT_RECONNECT_WAIT,
    };
    // The -o lists are applied once every argument is seen, so that a remount is refused
    // as such whatever options come with it.
    let mut lists: Vec<&str> = Vec::new();
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("-o") => {
                let v = it
                    .next()
                    .ok_or_else(|| MountError::Usage("-o needs a value".into()))?;
                lists.push(v.to_str().ok_or_else(|| {
                    MountError::bad(&v.to_string_lossy(), "options must be valid UTF-8")
                })?);
            }
            Some(o) if o.starts_with("-o") && o.len() > 2 => lists.push(&o[2..]),
            Some("-f") => m.foreground = true,
            Some("-v") => m.verbose = true,
            // -s (sloppy: tolerate unknown options is handled by ignoring generic ones) and
            // -n (do not write /etc/mtab: there is none to write) need nothing.
            Some("-s") | Some("-n") => {}
            Some("-h") | Some("--help") => return Err(MountError::Help),
            Some(o) if o.starts_with('-') && o.len() > 1 => {
                return Err(MountError::Usage(format!("unknown flag {o}")))
            }
            _ => pos.push(PathBuf::from(a)),
        }
    }
    if lists
        .iter()
        .flat_map(|l| l.split(','))
        .any(|o| o.trim() == "remount")
    {
        // mount(8) runs the helper for `mount -o remount,...` of a fuse.qtfs mount (as
        // mount.fuse.qtfs), with the options of the mount table (user_id=0,...) added. The
        // mount's settings live in its serving process, which this one cannot reach, and a
        // superblock flag flipped under it would disagree with what the engine enforces
        // and what status reports.
        let dir = pos.last().cloned().unwrap_or_default();
        return Err(MountError::Remount(dir));
    }
    for list in lists {
        apply_options(list, &mut m)?;
    }
    let [remote, local]: [PathBuf; 2] = pos.try_into().map_err(|p: Vec<PathBuf>| {
        MountError::Usage(format!("expected 2 paths, got {}", p.len()))
    })?;
    if !remote.is_absolute() {
        return Err(MountError::RemotePath(remote));
    }
    if m.client.writeback && m.client.direct_io {
        // The DPU kernel would keep file times for writeback but never advance them for
        // direct writes, and write those stale times back to the HOST.
        return Err(MountError::WritebackWithDirectIo);
    }
    if !m.client.local_proc.is_absolute() {
        // Proc mode points symlinks at it: a relative target would resolve against
        // wherever the link sits inside the mount.
        return Err(MountError::bad(
            &format!("local_proc={}", m.client.local_proc.display()),
            "must be an absolute path, like /local_proc",
        ));
    }
    m.remote = remote;
    // The mount process leaves its working directory for `/` once it runs in the
    // background (so it never keeps a file system busy), and status shows these paths:
    // relative ones are taken against the directory the mount was started from.
    // The mount point is resolved as mount(8) resolves it (`..`, symlinks), when it can be.
    m.local = std::fs::canonicalize(&local).or_else(|_| absolute(local))?;
    m.key = absolute(std::mem::take(&mut m.key))?;
    m.run_dir = absolute(std::mem::take(&mut m.run_dir))?;
    Ok(m)
}

fn absolute(p: PathBuf) -> Result<PathBuf, MountError> {
    if p.is_absolute() {
        return Ok(p);
    }
    std::path::absolute(&p).map_err(|e| {
        MountError::Usage(format!(
            "cannot make {} absolute (the current directory: {e})",
            p.display()
        ))
    })
}

/// Dials the engine and authenticates; see [`super::link::connect`].
pub async fn connect(
    server: &str,
    key: &Path,
    insecure: bool,
) -> Result<Arc<dyn FsTransport>, MountError> {
    super::link::connect(server, key, insecure)
        .await
        .map_err(MountError::Connect)
}

/// A live mount; unmounts (and joins the session) when dropped.
pub struct MountHandle {
    session: Option<fuser::BackgroundSession>,
    client: QtfsClient,
    /// Mounted by [`mount_fuse_qtfs`], so unmounting is ours (fuser only joins).
    own_mount: bool,
    local: PathBuf,
    stats: Arc<MountStats>,
}

impl MountHandle {
    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.local
    }

    /// The mount's per-operation statistics.
    pub fn stats(&self) -> Arc<MountStats> {
        self.stats.clone()
    }

    /// The file system being served (to reattach it after a reconnect).
    pub fn client(&self) -> QtfsClient {
        self.client.clone()
    }

    /// Unmounts and waits for the session to end.
    pub fn unmount(mut self) -> std::io::Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> std::io::Result<()> {
        use nix::mount::{umount2, MntFlags};
        let Some(s) = self.session.take() else {
            return Ok(());
        };
        let r = if self.own_mount {
            // Unmounting ends the kernel connection, and with it the session.
            umount2(&self.local, MntFlags::empty())
                .map_err(std::io::Error::from)
                .and_then(|()| s.join())
        } else {
            s.umount_and_join()
        };
        if r.is_err() {
            // Busy (a test still holds a file): detach so nothing stays mounted; the session
            // ends with the last open file, so it is not waited for.
            let _ = umount2(&self.local, MntFlags::MNT_DETACH);
        }
        r
    }

    /// Blocks until the file system is unmounted from outside (`umount LOCAL`).
    pub fn wait(mut self) -> std::io::Result<()> {
        match self.session.take() {
            Some(s) => s.join(),
            None => Ok(()),
        }
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::warn!(path = %self.local.display(), error = %e, "qtfs unmount failed; detached instead");
        }
    }
}

/// Checks what the mount needs on this side: `local` is a directory and, in proc mode,
/// `local_proc` is a mounted procfs (else `self` and local PIDs would be dangling links).
pub fn check_local(local: &Path, opts: &ClientOptions) -> Result<(), MountError> {
    let path = local.to_path_buf();
    match std::fs::metadata(local) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(MountError::LocalNotDir { path }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(MountError::LocalDirMissing { path })
        }
        Err(source) => {
            let hint = match source.raw_os_error() {
                Some(libc::ENOTCONN) => {
                    " (a mount whose process has ended is there: umount -l it first)"
                }
                _ => "",
            };
            return Err(MountError::LocalDir { path, source, hint });
        }
    }
    if opts.proc_mode {
        let path = opts.local_proc.clone();
        let problem = match nix::sys::statfs::statfs(&path) {
            Ok(st) if st.filesystem_type() == nix::sys::statfs::PROC_SUPER_MAGIC => None,
            Ok(_) => Some("it is not a procfs".to_string()),
            Err(nix::errno::Errno::ENOENT) => Some("it does not exist".to_string()),
            Err(e) => Some(format!("it cannot be checked ({e})")),
        };
        if let Some(problem) = problem {
            return Err(MountError::LocalProc { path, problem });
        }
    }
    Ok(())
}

/// Attaches `remote` over `transport` and mounts it on `local` (must exist). Must be called
/// from within a tokio runtime context (`rt.enter()` or inside `block_on`'s caller thread).
pub async fn mount_with_transport(
    transport: Arc<dyn FsTransport>,
    remote: &Path,
    local: &Path,
    opts: ClientOptions,
) -> Result<MountHandle, MountError> {
    check_local(local, &opts)?;
    let read_ahead = opts.read_ahead_kib;
    let client = QtfsClient::attach(transport, remote, opts)
        .await
        .map_err(|e| MountError::Attach {
            remote: remote.into(),
            hint: match e.errno {
                libc::EACCES => {
                    " (add it to the engine's [Mount] allowlist: qtcfg -w mount -x PATH)"
                }
                libc::ENOENT => " (the path does not exist on the HOST)",
                _ => "",
            },
            source: e,
        })?;
    // The mount source is the remote path exactly as given, as with the kernel qtfs: it is
    // what mount(8) compares an fstab line's source with, so `mount -a` skips a qtfs line
    // that is already mounted (a `qtfs:` prefix made it mount again on every run).
    let fsname = remote.display().to_string();
    let config = client.fuse_config(&fsname);
    let stats = client.stats();
    let served = client.clone();
    let local_owned = local.to_path_buf();
    let (session, own_mount) = tokio::task::spawn_blocking(move || {
        match mount_fuse_qtfs(&fsname, &local_owned, &config) {
            Ok(fd) => fuser::Session::from_fd(client, fd, config.acl, config.clone())
                .and_then(fuser::Session::spawn)
                .map(|s| (s, true))
                .inspect_err(|_| {
                    // The handshake failed: nothing may stay mounted.
                    let _ = nix::mount::umount2(&local_owned, nix::mount::MntFlags::MNT_DETACH);
                }),
            // Not allowed to mount(2) (not root): fuser's fusermount3 path, type `fuse`.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                fuser::spawn_mount(client, &local_owned, &config).map(|s| (s, false))
            }
            Err(e) => Err(e),
        }
    })
    .await
    .map_err(|e| MountError::Runtime(std::io::Error::other(e)))?
    .map_err(|e| MountError::Fuse {
        path: local.into(),
        source: e,
    })?;
    served.set_notifier(session.notifier());
    if read_ahead > 0 {
        // stat(2) of the new mount is answered through this runtime: off its threads.
        let local = local.to_path_buf();
        let _ = tokio::task::spawn_blocking(move || set_read_ahead(&local, read_ahead)).await;
    }
    Ok(MountHandle {
        session: Some(session),
        client: served,
        own_mount,
        local: local.to_path_buf(),
        stats,
    })
}

/// Sets the readahead window of the mount at `local` (its backing device's
/// `/sys/class/bdi/MAJOR:MINOR/read_ahead_kb`). With the FUSE default of 128 KiB, sequential
/// reads of data the HOST has cached ran at about 1,150 MiB/s here, with 1 MiB at 1,610.
/// Needs root; without it the default stays, and the log says so.
fn set_read_ahead(local: &Path, kib: u32) {
    use std::os::unix::fs::MetadataExt;
    let dev = match std::fs::metadata(local) {
        Ok(m) => m.dev(),
        Err(e) => {
            tracing::debug!(path = %local.display(), error = %e, "cannot stat the new mount to set its readahead");
            return;
        }
    };
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    if let Err(e) = std::fs::write(&path, format!("{kib}\n")) {
        tracing::info!(path, error = %e, "readahead stays at the kernel's default (set read_ahead=0 to skip this)");
    }
}

/// Mounts a FUSE file system of type `fuse.qtfs` (so /proc/mounts, `findmnt -t fuse.qtfs` and
/// `umount -t fuse.qtfs` know it, where fuser's own mount says plain `fuse`) on `local` and
/// returns the /dev/fuse descriptor for the session. The options are the ones fuser would
/// pass: nosuid and nodev, ro when asked, allow_other when the session admits everyone.
fn mount_fuse_qtfs(fsname: &str, local: &Path, config: &fuser::Config) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{open, OFlag};
    use nix::mount::MsFlags;
    let fd = open(
        "/dev/fuse",
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let rootmode = std::fs::metadata(local).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.mode() & libc::S_IFMT
    })?;
    let mut data = format!(
        "fd={},rootmode={rootmode:o},user_id={},group_id={}",
        fd.as_raw_fd(),
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    if config.acl == fuser::SessionACL::All {
        data.push_str(",allow_other");
    }
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if config.mount_options.contains(&fuser::MountOption::RO) {
        flags |= MsFlags::MS_RDONLY;
    }
    nix::mount::mount(
        Some(fsname),
        local,
        Some("fuse.qtfs"),
        flags,
        Some(data.as_str()),
    )?;
    Ok(fd)
}

/// Entry point for `mount.qtfs ...` and `dpuctl mount ...` (`args[0]` is the program name).
pub fn main(args: Vec<OsString>) -> ExitCode {
    let m = match parse_args(&args) {
        Ok(m) => m,
        Err(MountError::Help) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("mount.qtfs: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    // `-v` (mount -v, mount -av) asks for what was mounted, not for debug logs: those
    // are RUST_LOG=debug.
    let level = std::env::var("RUST_LOG")
        .ok()
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "info,fuser=warn".to_string());
    // The ring behind `dpuctl logs` keeps every event at `level`; stderr (the terminal
    // until the mount is ready, /dev/null after) gets the same lines.
    let log = match logging::init("mount", &level, LogTarget::Stderr) {
        Ok(log) => log,
        Err(e) => {
            eprintln!("mount.qtfs: {e}");
            LogHandle::detached("mount")
        }
    };
    if m.foreground {
        let verbose = m.verbose;
        return match serve(&m, &log, |summary| {
            if verbose {
                println!("{summary}");
            }
        }) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mount.qtfs: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match daemonise(&m, &log) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mount.qtfs: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Forks before any thread exists; the child mounts and reports "OK" or its error line
/// through a pipe; the parent exits with the outcome.
fn daemonise(m: &MountArgs, log: &LogHandle) -> Result<ExitCode, MountError> {
    let (rd, wr) = nix::unistd::pipe().map_err(|e| MountError::Daemon(e.to_string()))?;
    // SAFETY: no other thread exists yet in this process (no runtime has been built), so
    // the child may run arbitrary code after fork.
    match unsafe { nix::unistd::fork() }.map_err(|e| MountError::Daemon(e.to_string()))? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(wr);
            let mut msg = String::new();
            let _ = std::fs::File::from(rd).read_to_string(&mut msg);
            if let Some(summary) = msg.strip_prefix("OK\n") {
                if m.verbose {
                    println!("{summary}");
                }
                Ok(ExitCode::SUCCESS)
            } else {
                let msg = if msg.is_empty() {
                    "mount process died before the mount was ready".into()
                } else {
                    msg
                };
                eprintln!("mount.qtfs: {msg}");
                Ok(ExitCode::FAILURE)
            }
        }
        nix::unistd::ForkResult::Child => {
            drop(rd);
            let _ = nix::unistd::setsid();
            // A daemon must not pin the file system it was started from (`umount` of it
            // would say "target is busy"); every path was made absolute when parsed.
            let _ = nix::unistd::chdir("/");
            let wr_cell = std::cell::RefCell::new(Some(wr));
            let r = serve(m, log, |summary| {
                if let Some(w) = wr_cell.borrow_mut().take() {
                    let _ = std::fs::File::from(w).write_all(format!("OK\n{summary}").as_bytes());
                    detach_stdio();
                }
            });
            if let (Err(e), Some(w)) = (&r, wr_cell.borrow_mut().take()) {
                let _ = std::fs::File::from(w).write_all(e.to_string().as_bytes());
            }
            std::process::exit(if r.is_ok() { 0 } else { 1 });
        }
    }
}

fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        let fd: OwnedFd = null.into();
        for target in 0..=2 {
            // SAFETY: replaces fds 0-2 (which this process owns and keeps open as std's
            // stdio) with /dev/null; no Rust object owns them as OwnedFd.
            unsafe { libc::dup2(fd.as_raw_fd(), target) };
        }
    }
}

/// Connects, mounts, signals readiness with the one-line summary ([`summary`]), serves the
/// control socket, then waits for `umount` or SIGTERM/SIGINT.
fn serve(m: &MountArgs, log: &LogHandle, ready: impl FnOnce(&str)) -> Result<(), MountError> {
    // Before the engine is dialled: a local mistake is reported as such.
    check_local(&m.local, &m.client)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(MountError::Runtime)?;
    let link = rt.block_on(super::link::dial(&m.server, &m.key, m.insecure))?;
    let transport: Arc<dyn FsTransport> = Arc::new(LinkTransport(link.clone()));
    let handle = rt.block_on(mount_with_transport(
        transport,
        &m.remote,
        &m.local,
        m.client.clone(),
    ))?;
    // The kernel's INIT is answered before the first request (this stat) is.
    let _ = std::fs::symlink_metadata(&m.local);
    ready(&summary(m, handle.client().negotiated()));
    tracing::info!(remote = %m.remote.display(), local = %m.local.display(), server = %m.server, "qtfs mounted");
    // Which mount is ours: on a signal, the path is unmounted only while ours is on top.
    let ours = top_mount_dev(&m.local);
    let local = m.local.clone();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let control_path = control::socket_path(&m.run_dir, &format!("mount-{}", std::process::id()));
    let state = Arc::new(MountControl {
        started: Instant::now(),
        control: control_path.display().to_string(),
        server: m.server.clone(),
        remote: m.remote.display().to_string(),
        local: m.local.display().to_string(),
        options: m.options.clone(),
        link: Mutex::new(link),
        stats: handle.stats(),
        lost: Mutex::new(None),
        since: Mutex::new(Instant::now()),
        reconnects: AtomicU64::new(0),
        reconnect: m.reconnect,
    });
    let client = handle.client();
    let abandon = rt.block_on(async {
        match control::bind(&control_path) {
            Ok(listener) => {
                tokio::spawn(control::serve(
                    listener,
                    state.clone(),
                    log.clone(),
                    shutdown.clone(),
                ));
            }
            // The mount works without it; only status and the TUI miss it.
            Err(e) => tracing::warn!(error = %e, "no control socket for this mount"),
        }
        tokio::spawn(keep_linked(state.clone(), client, m.clone()));
        let waiter = tokio::task::spawn_blocking(move || handle.wait());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let signalled = tokio::select! {
            r = waiter => { let _ = r; false }
            _ = tokio::signal::ctrl_c() => true,
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => true,
        };
        let abandon = signalled && !detach_if_ours(&local, ours);
        tracing::info!(local = %m.local.display(), "qtfs unmounted");
        shutdown.cancel();
        // Let the control server remove its socket.
        tokio::time::sleep(Duration::from_millis(50)).await;
        abandon
    });
    let _ = std::fs::remove_file(&control_path);
    if abandon {
        // Our mount is out of reach (under another one, or in another namespace only): the
        // session would wait for it forever. Exiting closes /dev/fuse, which ends the
        // connection: what is left of the mount answers ENOTCONN until it is unmounted.
        std::process::exit(0);
    }
    Ok(())
}

/// What `-v` prints once the mount is live: what is mounted where, the options in effect
/// and what the kernel agreed to, in one line.
fn summary(m: &MountArgs, negotiated: Option<&str>) -> String {
    let c = &m.client;
    let mut o: Vec<String> = vec![if c.read_only { "ro" } else { "rw" }.into()];
    if c.proc_mode {
        o.push(format!("proc (local_proc={})", c.local_proc.display()));
    }
    o.push(format!("attr_timeout={}s", c.attr_ttl.as_secs_f64()));
    o.push(format!("entry_timeout={}s", c.entry_ttl.as_secs_f64()));
    o.push(format!(
        "negative_timeout={}s",
        c.negative_ttl.as_secs_f64()
    ));
    if !c.fresh_dirs.is_zero() {
        o.push(format!("fresh_dirs={}s", c.fresh_dirs.as_secs_f64()));
    }
    o.push(format!("read_ahead={}", c.read_ahead_kib));
    for (on, name) in [
        (c.writeback, "writeback"),
        (c.direct_io, "direct_io"),
        (c.root_squash, "root_squash"),
        (m.insecure, "insecure"),
    ] {
        if on {
            o.push(name.into());
        }
    }
    o.push(
        if c.allow_other {
            "allow_other"
        } else {
            "noallow_other"
        }
        .into(),
    );
    o.push(if m.reconnect {
        format!("reconnect_wait={}s", m.reconnect_wait.as_secs_f64())
    } else {
        "noreconnect".into()
    });
    format!(
        "mount.qtfs: {} mounted on {} from {}: {}; {}",
        m.remote.display(),
        m.local.display(),
        m.server,
        o.join(","),
        negotiated.unwrap_or("kernel FUSE settings unknown")
    )
}

/// On SIGTERM/SIGINT: detaches the mount on `local` if it is ours (the device `ours` was
/// on top there when we mounted). Another mount on the same directory since (a new mount
/// of the same export after ours was unmounted here but kept alive by another namespace,
/// or one stacked over ours) is left alone: false.
fn detach_if_ours(local: &Path, ours: Option<(u32, u32)>) -> bool {
    let top = top_mount_dev(local);
    if ours.is_some() && top != ours {
        tracing::warn!(
            local = %local.display(),
            "the mount on this directory is not this process's (another was mounted over it, or it was unmounted here): leaving it alone and ending this mount's connection"
        );
        return false;
    }
    let _ = nix::mount::umount2(local, nix::mount::MntFlags::MNT_DETACH);
    true
}

/// The device (major, minor) of the topmost mount on `path` in this mount namespace, from
/// /proc/self/mountinfo (no call into the mount itself, which may be ours and busy).
fn top_mount_dev(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::ffi::OsStrExt;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    top_mount_dev_in(&info, path.as_os_str().as_bytes())
}

fn top_mount_dev_in(mountinfo: &str, path: &[u8]) -> Option<(u32, u32)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // id, parent id, major:minor, root, mount point, ...
            let mut f = line.split(' ');
            let dev = f.nth(2)?;
            let point = f.nth(1)?;
            if unescape_mountinfo(point) != path {
                return None;
            }
            let (major, minor) = dev.split_once(':')?;
            Some((major.parse().ok()?, minor.parse().ok()?))
        })
        // The last line for a directory is the mount on top.
        .next_back()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).and_then(|d| {
            d.iter()
                .all(|c| (b'0'..=b'7').contains(c))
                .then(|| d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0')))
        });
        match (b[i], octal) {
            (b'\\', Some(v)) if v <= 0xff => {
                out.push(v as u8);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// What the mount's control socket reports (`dpuctl status`, the TUI).
struct MountControl {
    started: Instant,
    control: String,
    server: String,
    remote: String,
    local: String,
    options: String,
    /// The link to the engine; replaced after a reconnect.
    link: Mutex<Link>,
    stats: Arc<MountStats>,
    /// Why the link to the engine ended, until it is back.
    lost: Mutex<Option<String>>,
    /// When the link last came up or went down (the peer's `since_secs`).
    since: Mutex<Instant>,
    reconnects: AtomicU64,
    reconnect: bool,
}

impl MountControl {
    fn link(&self) -> Link {
        self.link.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_link(&self, link: Link) {
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = link;
        *self.since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_lost(&self, why: Option<String>) {
        let mut lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        if lost.is_none() && why.is_some() {
            *self.since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
        *lost = why;
    }
}

/// How long operations wait for a lost engine by default: an engine restart or upgrade
/// takes well under this, so the DPU's programs see it only as a pause.
pub const DEFAULT_RECONNECT_WAIT: Duration = Duration::from_secs(10);

/// First and longest wait between two attempts to reach a lost engine.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// Watches the link to the engine. When it ends: with `reconnect`, dials the engine again
/// with backoff until it answers and takes the mount back ([`QtfsClient::reattach`]);
/// meanwhile operations fail with ENOTCONN. Without, the mount stays failed.
async fn keep_linked(state: Arc<MountControl>, client: QtfsClient, m: MountArgs) {
    if m.reconnect {
        client.retry_when_link_lost(m.reconnect_wait);
    }
    loop {
        let why = state.link().closed().await;
        state.set_lost(Some(why.clone()));
        if !m.reconnect {
            tracing::error!(reason = %why, "link to the engine lost: this mount answers ENOTCONN until it is unmounted and mounted again (noreconnect)");
            return;
        }
        if m.reconnect_wait.is_zero() {
            tracing::error!(reason = %why, "link to the engine lost: reconnecting; until then operations fail with ENOTCONN");
        } else {
            client.hold_calls(m.reconnect_wait);
            tracing::error!(reason = %why, wait = ?m.reconnect_wait, "link to the engine lost: reconnecting; operations wait for it, then fail with ENOTCONN");
        }
        let mut delay = RECONNECT_FIRST;
        let (mut attempts, mut refusals) = (0u64, 0u64);
        loop {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RECONNECT_MAX);
            attempts += 1;
            let link = match super::link::dial(&m.server, &m.key, m.insecure).await {
                Ok(l) => l,
                Err(e) => {
                    // Loud once, then quiet while the engine is down.
                    if attempts == 1 {
                        tracing::warn!(error = %e, "engine not reachable yet; retrying every {}s at most", RECONNECT_MAX.as_secs());
                    } else {
                        tracing::debug!(error = %e, attempts, "engine not reachable yet");
                    }
                    continue;
                }
            };
            let started = Instant::now();
            match client.reattach(Arc::new(LinkTransport(link.clone()))).await {
                Ok(r) => {
                    state.set_link(link);
                    state.set_lost(None);
                    state.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        nodes = r.nodes,
                        nodes_lost = r.nodes_lost,
                        files = r.files,
                        files_lost = r.files_lost,
                        attempts,
                        took_ms = started.elapsed().as_millis() as u64,
                        "reconnected to the engine: the mount works again"
                    );
                    break;
                }
                Err(e) if e.errno == libc::ENOTCONN => {
                    link.close();
                    tracing::debug!(error = %e, "the new link was lost while handing the mount back; retrying");
                }
                Err(e) => {
                    link.close();
                    refusals += 1;
                    if refusals == 1 {
                        tracing::warn!(error = %e, "the engine is back but did not take the mount (is the path still in its [Mount] allowlist?); retrying");
                    } else {
                        tracing::debug!(error = %e, refusals, "the engine still does not take the mount");
                    }
                }
            }
        }
    }
}

impl ControlHandler for MountControl {
    fn status(&self) -> DaemonStatus {
        let lost = self.lost();
        let link = self.link();
        let s = link.stats();
        let peer = PeerStatus {
            address: self.server.clone(),
            state: if lost.is_some() || link.is_closed() {
                PeerState::Disconnected
            } else {
                PeerState::Connected
            },
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
            role: Some("engine".into()),
            rtt_us: s
                .rtt
                .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            since_secs: self
                .since
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed()
                .as_secs(),
            last_error: lost.clone(),
        };
        let ops = self.stats.snapshot();
        // Since the mount started, across reconnects (the link's own figures restart).
        let counters = [
            ("requests".to_string(), ops.values().map(|o| o.count).sum()),
            ("errors".to_string(), ops.values().map(|o| o.errors).sum()),
            (
                "reconnects".to_string(),
                self.reconnects.load(Ordering::Relaxed),
            ),
        ]
        .into_iter()
        .collect();
        DaemonStatus {
            name: "mount".into(),
            pid: std::process::id(),
            control: self.control.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_secs: self.started.elapsed().as_secs(),
            listen: Vec::new(),
            peers: vec![peer],
            allowlists: Default::default(),
            log_level: String::new(),
            counters,
            mount: Some(Box::new(MountStatus {
                remote: self.remote.clone(),
                local: self.local.clone(),
                options: self.options.clone(),
                state: match (&lost, self.reconnect) {
                    (None, _) => "mounted",
                    (Some(_), true) => "reconnecting",
                    (Some(_), false) => "failed",
                }
                .into(),
                ops,
            })),
            connections: Vec::new(),
            sessions: Vec::new(),
        }
    }

    fn handle(&self, req: Request) -> BoxFuture<'static, Result<Map<String, Value>, String>> {
        Box::pin(async move {
            match req {
                // Nothing to re-read: a mount's settings are its command line.
                Request::Reload => Ok(Map::new()),
                Request::AllowlistList { .. } => Ok(Map::from_iter([(
                    "allowlists".to_string(),
                    Value::Object(Map::new()),
                )])),
                _ => Err(
                    "a mount has no allowlists or sessions: send this to the engine \
                          (qtcfg --target engine)"
                        .into(),
                ),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<OsString> {
        std::iter::once("mount.qtfs")
            .chain(s.iter().copied())
            .map(OsString::from)
            .collect()
    }

    #[test]
    fn mount8_calling_convention_parses() {
        let m = parse_args(&args(&[
            "/var/lib/docker",
            "/mnt",
            "-o",
            "rw,server=10.0.0.2:12345,proc,local_proc=/lp,attr_timeout=2.5,entry_timeout=0,negative_timeout=0.5,fresh_dirs=30,writeback,noallow_other,_netdev,x-systemd.automount,defaults",
            "-s",
            "-n",
        ]))
        .unwrap();
        assert_eq!(m.remote, PathBuf::from("/var/lib/docker"));
        assert_eq!(m.local, PathBuf::from("/mnt"));
        assert_eq!(m.server, "10.0.0.2:12345");
        assert!(
            m.client.proc_mode
                && m.client.writeback
                && !m.client.allow_other
                && !m.client.read_only
        );
        assert_eq!(m.client.local_proc, PathBuf::from("/lp"));
        assert!(m.reconnect, "reconnect is on by default");
        assert_eq!(m.reconnect_wait, DEFAULT_RECONNECT_WAIT);
        let off = parse_args(&args(&["/a", "/b", "-o", "noreconnect,reconnect_wait=0.5"])).unwrap();
        assert!(!off.reconnect);
        assert_eq!(off.reconnect_wait, Duration::from_millis(500));
        assert_eq!(m.client.attr_ttl, Duration::from_millis(2500));
        assert_eq!(m.client.entry_ttl, Duration::ZERO);
        assert_eq!(m.client.negative_ttl, Duration::from_millis(500));
        assert_eq!(m.client.fresh_dirs, Duration::from_secs(30));
        assert!(!m.foreground);
        assert_eq!(
            m.client.read_ahead_kib, 1024,
            "one full read request by default"
        );
        let ra =
            |o: &str| parse_args(&args(&["/a", "/b", "-o", o])).map(|m| m.client.read_ahead_kib);
        assert_eq!(ra("read_ahead=4096").unwrap(), 4096);
        assert_eq!(ra("read_ahead=0").unwrap(), 0);
        for bad in [
            "read_ahead=",
            "read_ahead=1M",
            "read_ahead=-1",
            "read_ahead=2000000",
        ] {
            assert!(
                matches!(ra(bad), Err(MountError::BadOption { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn defaults_and_errors() {
        let m = parse_args(&args(&[
            "/proc",
            "/mnt/p",
            "-f",
            "-oro,direct_io,root_squash",
        ]))
        .unwrap();
        assert_eq!(m.server, DEFAULT_SERVER);
        assert!(
            m.foreground
                && m.client.read_only
                && m.client.direct_io
                && m.client.root_squash
                && m.client.allow_other
        );
        assert!(matches!(
            parse_args(&args(&["/a"])),
            Err(MountError::Usage(_))
        ));
        assert!(matches!(
            parse_args(&args(&["rel", "/mnt"])),
            Err(MountError::RemotePath(_))
        ));
        assert!(
            matches!(parse_args(&args(&["/a", "/b", "-o", "bogus"])), Err(MountError::UnknownOption(o)) if o == "bogus")
        );
        assert!(matches!(
            parse_args(&args(&["/a", "/b", "-o", "attr_timeout=-1"])),
            Err(MountError::BadOption { .. })
        ));
        assert!(matches!(
            parse_args(&args(&["/a", "/b", "-o", "server="])),
            Err(MountError::BadOption { .. })
        ));
        assert!(matches!(
            parse_args(&args(&["/a", "/b", "-x"])),
            Err(MountError::Usage(_))
        ));
        assert!(
            matches!(parse_args(&args(&["/proc", "/b", "-o", "proc,local_proc=lp"])), Err(MountError::BadOption { why, .. }) if why.contains("absolute")),
            "proc mode's symlinks need an absolute target"
        );
        assert!(
            matches!(
                parse_args(&args(&["/a", "/b", "-o", "writeback", "-o", "direct_io"])),
                Err(MountError::WritebackWithDirectIo)
            ),
            "writeback and direct_io exclude each other"
        );
    }

    /// The one line each refused command line prints: what is wrong and what is accepted.
    #[test]
    fn option_errors_say_what_is_wrong_and_what_is_accepted() {
        let msg = |a: &[&str]| {
            let e = parse_args(&args(a)).expect_err("refused");
            (e.to_string(), e.exit_code())
        };
        let opt = |o: &str| msg(&["/a", "/b", "-o", o]);
        for (o, want) in [
            (
                "attr_timeout=abc",
                "bad mount option 'attr_timeout=abc': not a duration; use seconds like 1 or 0.5, or 1s/500ms",
            ),
            (
                "attr_timeout=-1",
                "bad mount option 'attr_timeout=-1': a duration cannot be negative; use seconds like 1 or 0.5, or 1s/500ms",
            ),
            (
                "entry_timeout=1e300",
                "bad mount option 'entry_timeout=1e300': too long; use seconds like 1 or 0.5, or 1s/500ms",
            ),
            (
                "attr_timeout=",
                "bad mount option 'attr_timeout=': needs a value: NAME=SECS, like 1, 0.5, 1s or 500ms",
            ),
            (
                "read_ahead=99999999999",
                "bad mount option 'read_ahead=99999999999': too large; use a number of KiB from 0 (the kernel's default) to 1048576, like read_ahead=1024",
            ),
            (
                "read_ahead=1M",
                "bad mount option 'read_ahead=1M': not a number; use a number of KiB from 0 (the kernel's default) to 1048576, like read_ahead=1024",
            ),
            (
                "server=",
                "bad mount option 'server=': needs a value: server=ADDR (HOST:PORT, tcp://HOST:PORT or vsock://CID:PORT)",
            ),
            (
                "local_proc=lp",
                "bad mount option 'local_proc=lp': must be an absolute path, like /local_proc",
            ),
            (
                "bogus",
                "unknown mount option 'bogus': mount.qtfs --help lists the supported options",
            ),
            (
                "writeback,direct_io",
                "options writeback and direct_io exclude each other: direct_io bypasses the page cache that writeback keeps, and file times would go stale; choose one",
            ),
        ] {
            assert_eq!(opt(o), (want.to_string(), 2), "-o {o}");
        }
        // mount(8)'s `mount -o remount,ro DIR` runs the helper as mount.fuse.qtfs.
        assert_eq!(
            msg(&[
                "/srv/x",
                "/mnt/x",
                "-o",
                "rw,remount,ro,user_id=0,group_id=0,default_permissions,allow_other"
            ]),
            (
                "qtfs cannot change the options of a mounted file system: umount /mnt/x, then mount it again with the new options".to_string(),
                32
            )
        );
    }

    #[test]
    fn durations_take_seconds_or_units() {
        let d = |v: &str| secs(v, "attr_timeout").unwrap();
        assert_eq!(d("1"), Duration::from_secs(1));
        assert_eq!(d("0.5"), Duration::from_millis(500));
        assert_eq!(d("2s"), Duration::from_secs(2));
        assert_eq!(d("250ms"), Duration::from_millis(250));
        assert_eq!(d("0"), Duration::ZERO);
        for bad in ["", "s", "ms", "1m", "inf", "NaN", "1 s"] {
            assert!(secs(bad, "x").is_err(), "{bad}");
        }
    }

    /// The mount point and proc mode's local procfs are checked before the engine is dialled.
    #[test]
    fn local_mistakes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let e = check_local(&file, &ClientOptions::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("mount point {} is not a directory", file.display())
        );
        let none = dir.path().join("none");
        let e = check_local(&none, &ClientOptions::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "mount point {} does not exist: create the directory first",
                none.display()
            )
        );
        let proc_at = |lp: &Path| ClientOptions {
            proc_mode: true,
            local_proc: lp.to_path_buf(),
            ..ClientOptions::default()
        };
        assert!(check_local(dir.path(), &proc_at(Path::new("/proc"))).is_ok());
        for (lp, problem) in [
            (&none, "it does not exist"),
            (&dir.path().to_path_buf(), "it is not a procfs"),
        ] {
            let e = check_local(dir.path(), &proc_at(lp)).unwrap_err();
            let lp = lp.display();
            assert_eq!(
                e.to_string(),
                format!("proc mode needs the DPU's own procfs at {lp}, but {problem}: mount it there (mkdir -p {lp} && mount -t proc proc {lp}), or use -o local_proc=/proc")
            );
            assert_eq!(e.exit_code(), 1);
        }
        // Without proc mode, local_proc is not looked at.
        assert!(check_local(
            dir.path(),
            &ClientOptions {
                local_proc: none,
                ..ClientOptions::default()
            }
        )
        .is_ok());
    }

    #[test]
    fn verbose_prints_one_line_of_what_was_mounted() {
        let m = parse_args(&args(&[
            "/srv/x",
            "/mnt/x",
            "-o",
            "server=10.0.0.1:12345,ro,attr_timeout=0.5,noreconnect",
        ]))
        .unwrap();
        let line = summary(&m, Some("kernel FUSE 7.40 with readdirplus posix_acl"));
        assert_eq!(
            line,
            "mount.qtfs: /srv/x mounted on /mnt/x from 10.0.0.1:12345: ro,attr_timeout=0.5s,entry_timeout=1s,negative_timeout=0s,read_ahead=1024,allow_other,noreconnect; kernel FUSE 7.40 with readdirplus posix_acl"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn the_topmost_mount_on_a_path_is_found_with_escapes() {
        let info = "\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:51 / /run/my\\040mnt rw,nosuid shared:9 - fuse.qtfs /a rw
31 30 0:52 / /run/my\\040mnt rw,nosuid shared:10 - fuse.qtfs /b rw
32 22 0:53 / /run/other rw - tmpfs tmpfs rw
";
        assert_eq!(top_mount_dev_in(info, b"/run/my mnt"), Some((0, 52)));
        assert_eq!(top_mount_dev_in(info, b"/run/other"), Some((0, 53)));
        assert_eq!(top_mount_dev_in(info, b"/run/my\\040mnt"), None);
        assert_eq!(top_mount_dev_in(info, b"/nowhere"), None);
        assert_eq!(unescape_mountinfo(r"a\011b\134c\0"), b"a\tb\\c\\0");
    }

    #[test]
    fn relative_paths_are_taken_against_the_starting_directory() {
        let cwd = std::env::current_dir().unwrap();
        let m = parse_args(&args(&["/a", "mnt/x", "-o", "key=k/psk,run_dir=run"])).unwrap();
        assert_eq!(m.local, cwd.join("mnt/x"));
        assert_eq!(m.key, cwd.join("k/psk"));
        assert_eq!(m.run_dir, cwd.join("run"));
        let m = parse_args(&args(&["/a", "/b"])).unwrap();
        assert_eq!(
            m.key,
            PathBuf::from(DEFAULT_KEY),
            "absolute paths stay as given"
        );
    }

    #[test]
    fn connect_to_nothing_fails_with_the_address() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("psk");
        crate::wire::Psk::write_new(&key, false).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = format!("127.0.0.1:{port}");
        let e = rt.block_on(connect(&server, &key, false)).err().unwrap();
        assert!(e.to_string().contains(&server), "{e}");
        let e = rt
            .block_on(connect(&server, &dir.path().join("none"), false))
            .err()
            .unwrap();
        assert!(e.to_string().contains("dpuctl keygen"), "{e}");
    }
}
