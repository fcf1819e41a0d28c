//! The qtfs request/response messages and their compact binary encoding.
//!
//! Every request payload starts with the caller's credentials, then op-specific fields in a
//! fixed little-endian layout; byte strings are `u32` length + bytes; bulk data (write
//! payloads, read replies, readlink targets, xattr values) travels raw at the end so it is
//! never copied through a generic serializer. The op number (0x0100..0x01FF) travels in the
//! wire layer's frame header, not here, and it decides the shape of the response.
//!
//! Decoders never panic and never allocate more than the payload they were given: every
//! length is checked against the bytes that remain before anything is sliced or reserved.
//!
//! Concurrency: plain values, no shared state.

use bytes::{BufMut, Bytes, BytesMut};

/// Op numbers, in the fs range 0x0100..=0x01FF of the link.
pub mod op {
    pub const MOUNT: u16 = 0x0100;
    pub const LOOKUP: u16 = 0x0101;
    pub const FORGET: u16 = 0x0102;
    pub const GETATTR: u16 = 0x0103;
    pub const SETATTR: u16 = 0x0104;
    pub const READLINK: u16 = 0x0105;
    pub const MKNOD: u16 = 0x0106;
    pub const MKDIR: u16 = 0x0107;
    pub const UNLINK: u16 = 0x0108;
    pub const RMDIR: u16 = 0x0109;
    pub const SYMLINK: u16 = 0x010A;
    pub const RENAME: u16 = 0x010B;
    pub const LINK: u16 = 0x010C;
    pub const OPEN: u16 = 0x010D;
    pub const READ: u16 = 0x010E;
    pub const WRITE: u16 = 0x010F;
    pub const FLUSH: u16 = 0x0110;
    pub const RELEASE: u16 = 0x0111;
    pub const FSYNC: u16 = 0x0112;
    pub const OPENDIR: u16 = 0x0113;
    pub const READDIR: u16 = 0x0114;
    pub const STATFS: u16 = 0x0116;
    pub const SETXATTR: u16 = 0x0117;
    pub const GETXATTR: u16 = 0x0118;
    pub const LISTXATTR: u16 = 0x0119;
    pub const REMOVEXATTR: u16 = 0x011A;
    pub const ACCESS: u16 = 0x011B;
    pub const CREATE: u16 = 0x011C;
    pub const GETLK: u16 = 0x011D;
    pub const SETLK: u16 = 0x011E;
    pub const FALLOCATE: u16 = 0x011F;
    pub const LSEEK: u16 = 0x0120;
    pub const COPY_FILE_RANGE: u16 = 0x0121;
    /// Reconnect: ids below `floor` are the client's; new ones start above.
    pub const RESERVE: u16 = 0x0122;
    /// Reconnect: look a name up again under the node id the client already uses.
    pub const RELOOKUP: u16 = 0x0123;
    /// Reconnect: open a node again under the handle id the client already uses.
    pub const REOPEN: u16 = 0x0124;

    /// True for op numbers this module owns (the integrator routes these to the fs server).
    pub fn is_fs(op: u16) -> bool {
        (0x0100..=0x01FF).contains(&op)
    }
}

/// Mount flags carried by [`Request::Mount`].
pub mod mount_flags {
    /// Refuse every modifying operation with EROFS on the engine as well as on the client.
    pub const READ_ONLY: u32 = 1;
    /// Map caller uid 0 to nobody (65534) and gid 0 to nogroup (65534).
    pub const ROOT_SQUASH: u32 = 2;
    /// Answer a change inside directories (create, mknod, mkdir, symlink, link, unlink,
    /// rmdir, rename) with the directories' attributes after it ([`super::Response::InDirs`]). An
    /// engine that does not know the flag ignores it and answers as before.
    pub const DIR_ATTRS: u32 = 4;
}

/// Open-reply flags from the engine.
pub mod open_flags {
    /// The file lives on a pseudo filesystem (proc, sysfs, cgroup, ...) whose sizes lie:
    /// the client must use direct I/O so reads return the full content.
    pub const PSEUDO_FS: u32 = 1;
}

/// Flags of a [`Request::Write`].
pub mod write_flags {
    /// The writer lacks CAP_FSETID (FUSE_WRITE_KILL_SUIDGID): the file loses what a local
    /// write by it would clear, set-user-ID and set-group-ID by the HOST kernel's rules. The
    /// request then carries the writer's credentials.
    pub const KILL_SUIDGID: u32 = 1;
    /// The kernel writing back cached pages (FUSE_WRITE_CACHE): it ignores the count of a
    /// short write, so anything but all of it must be an error.
    pub const CACHED: u32 = 2;
}

/// `setattr` field selectors ([`SetAttr::valid`]).
pub mod set {
    pub const MODE: u32 = 1;
    pub const UID: u32 = 2;
    pub const GID: u32 = 4;
    pub const SIZE: u32 = 8;
    pub const ATIME: u32 = 16;
    pub const MTIME: u32 = 32;
}

/// Most supplementary groups a request may carry (Linux NGROUPS_MAX is 65536; the
/// management plane never needs more than a few dozen, and this bounds a request).
pub const MAX_GROUPS: usize = 1024;

/// The caller's identity, taken from the FUSE request on the client.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// A timestamp: seconds and nanoseconds since the epoch (seconds may be negative).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

/// A `setattr` time: leave it, set it to the engine's clock, or set it to a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    Omit,
    Now,
    At(Time),
}

/// File attributes as the HOST reports them (`ino` is the HOST's st_ino).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub blksize: u32,
}

/// A looked-up node: the engine's node id plus its attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry {
    pub node: u64,
    pub attr: Attr,
}

/// `setattr` arguments; fields not selected by `valid` are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetAttr {
    pub valid: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: SetTime,
    pub mtime: SetTime,
}

/// One directory entry. `entry` is present for readdirplus, except for `.` and `..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub offset: u64,
    /// File type as in `st_mode >> 12` (DT_* values).
    pub kind: u8,
    pub name: Vec<u8>,
    pub entry: Option<Entry>,
}

/// `statfs` result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// A POSIX lock range (`end` inclusive, as FUSE passes it; u64::MAX = to end of file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lock {
    pub start: u64,
    pub end: u64,
    pub typ: i32,
    pub pid: u32,
}

/// One fs request. Names are single path components (the engine rejects anything else).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Mount {
        path: Vec<u8>,
        flags: u32,
    },
    Lookup {
        parent: u64,
        name: Vec<u8>,
    },
    Forget {
        items: Vec<(u64, u64)>,
    },
    Getattr {
        node: u64,
        fh: Option<u64>,
    },
    Setattr {
        node: u64,
        fh: Option<u64>,
        set: SetAttr,
    },
    Readlink {
        node: u64,
    },
    Mknod {
        parent: u64,
        name: Vec<u8>,
        mode: u32,
        umask: u32,
        rdev: u64,
    },
    Mkdir {
        parent: u64,
        name: Vec<u8>,
        mode: u32,
        umask: u32,
    },
    Unlink {
        parent: u64,
        name: Vec<u8>,
    },
    Rmdir {
        parent: u64,
        name: Vec<u8>,
    },
    Symlink {
        parent: u64,
        name: Vec<u8>,
        target: Vec<u8>,
    },
    Rename {
        parent: u64,
        name: Vec<u8>,
        newparent: u64,
        newname: Vec<u8>,
        flags: u32,
    },
    Link {
        node: u64,
        newparent: u64,
        newname: Vec<u8>,
    },
    Open {
        node: u64,
        flags: i32,
    },
    Read {
        fh: u64,
        offset: u64,
        size: u32,
    },
    Write {
        fh: u64,
        offset: u64,
        /// [`write_flags`].
        flags: u32,
        data: Bytes,
    },
    Flush {
        fh: u64,
        owner: u64,
    },
    Release {
        fh: u64,
    },
    Fsync {
        fh: u64,
        datasync: bool,
    },
    Opendir {
        node: u64,
    },
    Readdir {
        node: u64,
        fh: u64,
        offset: u64,
        size: u32,
        plus: bool,
    },
    Statfs {
        node: u64,
    },
    Setxattr {
        node: u64,
        name: Vec<u8>,
        flags: i32,
        value: Bytes,
    },
    Getxattr {
        node: u64,
        name: Vec<u8>,
        size: u32,
    },
    Listxattr {
        node: u64,
        size: u32,
    },
    Removexattr {
        node: u64,
        name: Vec<u8>,
    },
    Access {
        node: u64,
        mask: i32,
    },
    Create {
        parent: u64,
        name: Vec<u8>,
        mode: u32,
        umask: u32,
        flags: i32,
    },
    Getlk {
        fh: u64,
        owner: u64,
        lock: Lock,
    },
    Setlk {
        fh: u64,
        owner: u64,
        lock: Lock,
    },
    Fallocate {
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    },
    Lseek {
        fh: u64,
        offset: i64,
        whence: i32,
    },
    CopyFileRange {
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
        flags: u32,
    },
    /// After a reconnect, before the mount: the engine hands out node and handle ids from
    /// `floor` up, so the ids the client still holds stay free for [`Request::Relookup`]
    /// and [`Request::Reopen`].
    Reserve {
        floor: u64,
    },
    /// After a reconnect: looks `name` up in `parent` and registers the result as `node`
    /// with `nlookup` lookups, if it is still the HOST file `ino` (else ESTALE).
    Relookup {
        parent: u64,
        name: Vec<u8>,
        node: u64,
        ino: u64,
        nlookup: u64,
    },
    /// After a reconnect: opens `node` again (a directory when `dir`) as handle `fh`.
    Reopen {
        node: u64,
        fh: u64,
        flags: i32,
        dir: bool,
    },
}

/// One fs response; its shape is decided by the request's op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Empty,
    Entry(Entry),
    Attr(Attr),
    Opened {
        fh: u64,
        flags: u32,
    },
    Created {
        entry: Entry,
        fh: u64,
        flags: u32,
    },
    /// Raw bytes: read data, readlink target, xattr value or name list.
    Data(Bytes),
    /// A byte count: bytes copied.
    Count(u64),
    /// Bytes written, and whether the engine cleared set-user-ID or set-group-ID bits first
    /// ([`write_flags::KILL_SUIDGID`]): the client then drops the kernel's cached mode.
    Written {
        count: u64,
        killed: bool,
    },
    Statfs(Statfs),
    Lock(Lock),
    Offset(i64),
    Dir(Vec<DirEntry>),
    /// The answer to a change inside directories, followed by those directories' attributes
    /// right after it (node, attributes): at most [`MAX_CHANGED_DIRS`]. Only for a mount that
    /// asked ([`mount_flags::DIR_ATTRS`]).
    InDirs {
        inner: Box<Response>,
        dirs: Vec<(u64, Attr)>,
    },
}

/// Directories one change touches: a rename's two parents.
pub const MAX_CHANGED_DIRS: usize = 2;

/// A payload that does not decode. The engine answers EINVAL (EPROTO on the client side).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("fs message truncated while reading {0}: the peer runs an incompatible dpuctl version; upgrade both sides")]
    Truncated(&'static str),
    #[error("fs message field {what} is too long ({len} > {max})")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error(
        "unknown fs op {0:#06x}: the peer runs an incompatible dpuctl version; upgrade both sides"
    )]
    UnknownOp(u16),
    #[error("bad value {value} for {what} in fs message")]
    BadValue { what: &'static str, value: u64 },
    #[error("{0} trailing bytes after fs message")]
    Trailing(usize),
}

// ---------------------------------------------------------------- low-level reader/writer

/// Bounds-checked cursor over a payload.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a Bytes) -> Self {
        Reader { buf, pos: 0 }
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated(what));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.arr::<1>(what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.arr(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.arr(what)?))
    }
    fn bool(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::BadValue {
                what,
                value: v.into(),
            }),
        }
    }
    /// A `u32`-length-prefixed byte string; the length is checked against what remains
    /// before anything is allocated.
    fn bytes(&mut self, what: &'static str) -> Result<Vec<u8>, DecodeError> {
        let len = self.u32(what)? as usize;
        Ok(self.take(len, what)?.to_vec())
    }
    fn opt_u64(&mut self, what: &'static str) -> Result<Option<u64>, DecodeError> {
        if self.bool(what)? {
            Ok(Some(self.u64(what)?))
        } else {
            self.u64(what)?;
            Ok(None)
        }
    }
    /// Everything that remains, without copying.
    fn rest(&mut self) -> Bytes {
        let b = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        b
    }
    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
    fn time(&mut self) -> Result<Time, DecodeError> {
        Ok(Time {
            sec: self.i64("time")?,
            nsec: self.u32("time")?,
        })
    }
    fn set_time(&mut self) -> Result<SetTime, DecodeError> {
        let tag = self.u8("settime")?;
        let t = self.time()?;
        match tag {
            0 => Ok(SetTime::Omit),
            1 => Ok(SetTime::Now),
            2 => Ok(SetTime::At(t)),
            v => Err(DecodeError::BadValue {
                what: "settime",
                value: v.into(),
            }),
        }
    }
    fn attr(&mut self) -> Result<Attr, DecodeError> {
        Ok(Attr {
            ino: self.u64("attr")?,
            size: self.u64("attr")?,
            blocks: self.u64("attr")?,
            atime: self.time()?,
            mtime: self.time()?,
            ctime: self.time()?,
            mode: self.u32("attr")?,
            nlink: self.u32("attr")?,
            uid: self.u32("attr")?,
            gid: self.u32("attr")?,
            rdev: self.u64("attr")?,
            blksize: self.u32("attr")?,
        })
    }
    fn entry(&mut self) -> Result<Entry, DecodeError> {
        Ok(Entry {
            node: self.u64("entry")?,
            attr: self.attr()?,
        })
    }
    fn lock(&mut self) -> Result<Lock, DecodeError> {
        Ok(Lock {
            start: self.u64("lock")?,
            end: self.u64("lock")?,
            typ: self.i32("lock")?,
            pid: self.u32("lock")?,
        })
    }
}

/// A request buffer with the credentials written, and room for `extra` raw bytes after the
/// request's own fields.
fn with_creds(creds: &Creds, extra: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(64 + 4 * creds.groups.len() + extra);
    b.put_u32_le(creds.uid);
    b.put_u32_le(creds.gid);
    let n = creds.groups.len().min(MAX_GROUPS);
    b.put_u16_le(n as u16);
    for g in &creds.groups[..n] {
        b.put_u32_le(*g);
    }
    b
}

fn put_bytes(b: &mut BytesMut, s: &[u8]) {
    // Names and paths are < PATH_MAX and values < 64 KiB; u32 is ample.
    b.put_u32_le(s.len() as u32);
    b.put_slice(s);
}
fn put_opt(b: &mut BytesMut, v: Option<u64>) {
    b.put_u8(v.is_some().into());
    b.put_u64_le(v.unwrap_or(0));
}
fn put_time(b: &mut BytesMut, t: Time) {
    b.put_i64_le(t.sec);
    b.put_u32_le(t.nsec);
}
fn put_set_time(b: &mut BytesMut, t: SetTime) {
    match t {
        SetTime::Omit => {
            b.put_u8(0);
            put_time(b, Time::default());
        }
        SetTime::Now => {
            b.put_u8(1);
            put_time(b, Time::default());
        }
        SetTime::At(t) => {
            b.put_u8(2);
            put_time(b, t);
        }
    }
}
fn put_attr(b: &mut BytesMut, a: &Attr) {
    b.put_u64_le(a.ino);
    b.put_u64_le(a.size);
    b.put_u64_le(a.blocks);
    put_time(b, a.atime);
    put_time(b, a.mtime);
    put_time(b, a.ctime);
    b.put_u32_le(a.mode);
    b.put_u32_le(a.nlink);
    b.put_u32_le(a.uid);
    b.put_u32_le(a.gid);
    b.put_u64_le(a.rdev);
    b.put_u32_le(a.blksize);
}
fn put_entry(b: &mut BytesMut, e: &Entry) {
    b.put_u64_le(e.node);
    put_attr(b, &e.attr);
}
fn put_lock(b: &mut BytesMut, l: &Lock) {
    b.put_u64_le(l.start);
    b.put_u64_le(l.end);
    b.put_i32_le(l.typ);
    b.put_u32_le(l.pid);
}

/// Encoded size of an [`Attr`] (for capacity hints and the readdir size budget).
pub const ATTR_LEN: usize = 3 * 8 + 3 * 12 + 4 * 4 + 8 + 4;

// ---------------------------------------------------------------- requests

impl Request {
    /// The op number this request travels under.
    pub fn op(&self) -> u16 {
        use Request::*;
        match self {
            Mount { .. } => op::MOUNT,
            Lookup { .. } => op::LOOKUP,
            Forget { .. } => op::FORGET,
            Getattr { .. } => op::GETATTR,
            Setattr { .. } => op::SETATTR,
            Readlink { .. } => op::READLINK,
            Mknod { .. } => op::MKNOD,
            Mkdir { .. } => op::MKDIR,
            Unlink { .. } => op::UNLINK,
            Rmdir { .. } => op::RMDIR,
            Symlink { .. } => op::SYMLINK,
            Rename { .. } => op::RENAME,
            Link { .. } => op::LINK,
            Open { .. } => op::OPEN,
            Read { .. } => op::READ,
            Write { .. } => op::WRITE,
            Flush { .. } => op::FLUSH,
            Release { .. } => op::RELEASE,
            Fsync { .. } => op::FSYNC,
            Opendir { .. } => op::OPENDIR,
            Readdir { .. } => op::READDIR,
            Statfs { .. } => op::STATFS,
            Setxattr { .. } => op::SETXATTR,
            Getxattr { .. } => op::GETXATTR,
            Listxattr { .. } => op::LISTXATTR,
            Removexattr { .. } => op::REMOVEXATTR,
            Access { .. } => op::ACCESS,
            Create { .. } => op::CREATE,
            Getlk { .. } => op::GETLK,
            Setlk { .. } => op::SETLK,
            Fallocate { .. } => op::FALLOCATE,
            Lseek { .. } => op::LSEEK,
            CopyFileRange { .. } => op::COPY_FILE_RANGE,
            Reserve { .. } => op::RESERVE,
            Relookup { .. } => op::RELOOKUP,
            Reopen { .. } => op::REOPEN,
        }
    }

    /// Encodes a `Write` straight from the caller's data: the same bytes as
    /// `Request::Write { .. }.encode(creds)`, with one copy of the data instead of two.
    pub fn encode_write(creds: &Creds, fh: u64, offset: u64, flags: u32, data: &[u8]) -> Bytes {
        let mut b = with_creds(creds, data.len());
        b.put_u64_le(fh);
        b.put_u64_le(offset);
        b.put_u32_le(flags);
        b.put_slice(data);
        b.freeze()
    }

    /// Encodes credentials + this request. Write data and xattr values go last, raw.
    pub fn encode(&self, creds: &Creds) -> Bytes {
        use Request::*;
        let extra = match self {
            Write { data, .. } => data.len(),
            Setxattr { value, .. } => value.len(),
            _ => 0,
        };
        let mut b = with_creds(creds, extra);
        match self {
            Mount { path, flags } => {
                put_bytes(&mut b, path);
                b.put_u32_le(*flags);
            }
            Lookup { parent, name } | Unlink { parent, name } | Rmdir { parent, name } => {
                b.put_u64_le(*parent);
                put_bytes(&mut b, name);
            }
            Forget { items } => {
                b.put_u32_le(items.len() as u32);
                for (n, c) in items {
                    b.put_u64_le(*n);
                    b.put_u64_le(*c);
                }
            }
            Getattr { node, fh } => {
                b.put_u64_le(*node);
                put_opt(&mut b, *fh);
            }
            Setattr { node, fh, set } => {
                b.put_u64_le(*node);
                put_opt(&mut b, *fh);
                b.put_u32_le(set.valid);
                b.put_u32_le(set.mode);
                b.put_u32_le(set.uid);
                b.put_u32_le(set.gid);
                b.put_u64_le(set.size);
                put_set_time(&mut b, set.atime);
                put_set_time(&mut b, set.mtime);
            }
            Readlink { node } | Opendir { node } | Statfs { node } => b.put_u64_le(*node),
            Mknod {
                parent,
                name,
                mode,
                umask,
                rdev,
            } => {
                b.put_u64_le(*parent);
                put_bytes(&mut b, name);
                b.put_u32_le(*mode);
                b.put_u32_le(*umask);
                b.put_u64_le(*rdev);
            }
            Mkdir {
                parent,
                name,
                mode,
                umask,
            } => {
                b.put_u64_le(*parent);
                put_bytes(&mut b, name);
                b.put_u32_le(*mode);
                b.put_u32_le(*umask);
            }
            Symlink {
                parent,
                name,
                target,
            } => {
                b.put_u64_le(*parent);
                put_bytes(&mut b, name);
                put_bytes(&mut b, target);
            }
            Rename {
                parent,
                name,
                newparent,
                newname,
                flags,
            } => {
                b.put_u64_le(*parent);
                put_bytes(&mut b, name);
                b.put_u64_le(*newparent);
                put_bytes(&mut b, newname);
                b.put_u32_le(*flags);
            }
            Link {
                node,
                newparent,
                newname,
            } => {
                b.put_u64_le(*node);
                b.put_u64_le(*newparent);
                put_bytes(&mut b, newname);
            }
            Open { node, flags } => {
                b.put_u64_le(*node);
                b.put_i32_le(*flags);
            }
            Read { fh, offset, size } => {
                b.put_u64_le(*fh);
                b.put_u64_le(*offset);
                b.put_u32_le(*size);
            }
            Write {
                fh,
                offset,
                flags,
                data,
            } => {
                b.put_u64_le(*fh);
                b.put_u64_le(*offset);
                b.put_u32_le(*flags);
                b.put_slice(data);
            }
            Flush { fh, owner } => {
                b.put_u64_le(*fh);
                b.put_u64_le(*owner);
            }
            Release { fh } => b.put_u64_le(*fh),
            Fsync { fh, datasync } => {
                b.put_u64_le(*fh);
                b.put_u8((*datasync).into());
            }
            Readdir {
                node,
                fh,
                offset,
                size,
                plus,
            } => {
                b.put_u64_le(*node);
                b.put_u64_le(*fh);
                b.put_u64_le(*offset);
                b.put_u32_le(*size);
                b.put_u8((*plus).into());
            }
            Setxattr {
                node,
                name,
                flags,
                value,
            } => {
                b.put_u64_le(*node);
                put_bytes(&mut b, name);
                b.put_i32_le(*flags);
                b.put_slice(value);
            }
            Getxattr { node, name, size } => {
                b.put_u64_le(*node);
                put_bytes(&mut b, name);
                b.put_u32_le(*size);
            }
            Listxattr { node, size } => {
                b.put_u64_le(*node);
                b.put_u32_le(*size);
            }
            Removexattr { node, name } => {
                b.put_u64_le(*node);
                put_bytes(&mut b, name);
            }
            Access { node, mask } => {
                b.put_u64_le(*node);
                b.put_i32_le(*mask);
            }
            Create {
                parent,
                name,
                mode,
                umask,
                flags,
            } => {
                b.put_u64_le(*parent);
                put_bytes(&mut b, name);
                b.put_u32_le(*mode);
                b.put_u32_le(*umask);
                b.put_i32_le(*flags);
            }
            Getlk { fh, owner, lock } | Setlk { fh, owner, lock } => {
                b.put_u64_le(*fh);
                b.put_u64_le(*owner);
                put_lock(&mut b, lock);
            }
            Fallocate {
                fh,
                offset,
                length,
                mode,
            } => {
                b.put_u64_le(*fh);
                b.put_u64_le(*offset);
                b.put_u64_le(*length);
                b.put_i32_le(*mode);
            }
            Lseek { fh, offset, whence } => {
                b.put_u64_le(*fh);
                b.put_i64_le(*offset);
                b.put_i32_le(*whence);
            }
            CopyFileRange {
                fh_in,
                off_in,
                fh_out,
                off_out,
                len,
                flags,
            } => {
                b.put_u64_le(*fh_in);
                b.put_u64_le(*off_in);
                b.put_u64_le(*fh_out);
                b.put_u64_le(*off_out);
                b.put_u64_le(*len);
                b.put_u32_le(*flags);
            }
            Reserve { floor } => b.put_u64_le(*floor),
            Relookup {
                parent,
                name,
                node,
                ino,
                nlookup,
            } => {
                b.put_u64_le(*parent);
                put_bytes(&mut b, name);
                b.put_u64_le(*node);
                b.put_u64_le(*ino);
                b.put_u64_le(*nlookup);
            }
            Reopen {
                node,
                fh,
                flags,
                dir,
            } => {
                b.put_u64_le(*node);
                b.put_u64_le(*fh);
                b.put_i32_le(*flags);
                b.put_u8(u8::from(*dir));
            }
        }
        b.freeze()
    }

    /// Decodes a request payload received under `op`.
    pub fn decode(op: u16, payload: &Bytes) -> Result<(Creds, Request), DecodeError> {
        let mut r = Reader::new(payload);
        let uid = r.u32("creds")?;
        let gid = r.u32("creds")?;
        let n = r.u16("creds")? as usize;
        if n > MAX_GROUPS {
            return Err(DecodeError::TooLong {
                what: "groups",
                len: n,
                max: MAX_GROUPS,
            });
        }
        if r.remaining() < n * 4 {
            return Err(DecodeError::Truncated("groups"));
        }
        let mut groups = Vec::with_capacity(n);
        for _ in 0..n {
            groups.push(r.u32("groups")?);
        }
        let creds = Creds { uid, gid, groups };
        let req = match op {
            op::MOUNT => Request::Mount {
                path: r.bytes("path")?,
                flags: r.u32("flags")?,
            },
            op::LOOKUP => Request::Lookup {
                parent: r.u64("parent")?,
                name: r.bytes("name")?,
            },
            op::UNLINK => Request::Unlink {
                parent: r.u64("parent")?,
                name: r.bytes("name")?,
            },
            op::RMDIR => Request::Rmdir {
                parent: r.u64("parent")?,
                name: r.bytes("name")?,
            },
            op::FORGET => {
                let n = r.u32("forget")? as usize;
                if r.remaining() < n.saturating_mul(16) {
                    return Err(DecodeError::Truncated("forget"));
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push((r.u64("forget")?, r.u64("forget")?));
                }
                Request::Forget { items }
            }
            op::GETATTR => Request::Getattr {
                node: r.u64("node")?,
                fh: r.opt_u64("fh")?,
            },
            op::SETATTR => Request::Setattr {
                node: r.u64("node")?,
                fh: r.opt_u64("fh")?,
                set: SetAttr {
                    valid: r.u32("valid")?,
                    mode: r.u32("mode")?,
                    uid: r.u32("uid")?,
                    gid: r.u32("gid")?,
                    size: r.u64("size")?,
                    atime: r.set_time()?,
                    mtime: r.set_time()?,
                },
            },
            op::READLINK => Request::Readlink {
                node: r.u64("node")?,
            },
            op::OPENDIR => Request::Opendir {
                node: r.u64("node")?,
            },
            op::STATFS => Request::Statfs {
                node: r.u64("node")?,
            },
            op::MKNOD => Request::Mknod {
                parent: r.u64("parent")?,
                name: r.bytes("name")?,
                mode: r.u32("mode")?,
                umask: r.u32("umask")?,
                rdev: r.u64("rdev")?,
            },
            op::MKDIR => Request::Mkdir {
                parent: r.u64("parent")?,
                name: r.bytes("name")?,
                mode: r.u32("mode")?,
                umask: r.u32("umask")?,
            },
            op::SYMLINK => Request::Symlink {
                parent: r.u64("parent")?,
                name: r.bytes("name")?,
                target: r.bytes("target")?,
            },
            op::RENAME => Request::Rename {
                parent: r.u64("parent")?,
                name: r.bytes("name")?,
                newparent: r.u64("newparent")?,
                newname: r.bytes("newname")?,
                flags: r.u32("flags")?,
            },
            op::LINK => Request::Link {
                node: r.u64("node")?,
                newparent: r.u64("newparent")?,
                newname: r.bytes("newname")?,
            },
            op::OPEN => Request::Open {
                node: r.u64("node")?,
                flags: r.i32("flags")?,
            },
            op::READ => Request::Read {
                fh: r.u64("fh")?,
                offset: r.u64("offset")?,
                size: r.u32("size")?,
            },
            op::WRITE => Request::Write {
                fh: r.u64("fh")?,
                offset: r.u64("offset")?,
                flags: r.u32("flags")?,
                data: r.rest(),
            },
            op::FLUSH => Request::Flush {
                fh: r.u64("fh")?,
                owner: r.u64("owner")?,
            },
            op::RELEASE => Request::Release { fh: r.u64("fh")? },
            op::FSYNC => Request::Fsync {
                fh: r.u64("fh")?,
                datasync: r.bool("datasync")?,
            },
            op::READDIR => Request::Readdir {
                node: r.u64("node")?,
                fh: r.u64("fh")?,
                offset: r.u64("offset")?,
                size: r.u32("size")?,
                plus: r.bool("plus")?,
            },
            op::SETXATTR => Request::Setxattr {
                node: r.u64("node")?,
                name: r.bytes("name")?,
                flags: r.i32("flags")?,
                value: r.rest(),
            },
            op::GETXATTR => Request::Getxattr {
                node: r.u64("node")?,
                name: r.bytes("name")?,
                size: r.u32("size")?,
            },
            op::LISTXATTR => Request::Listxattr {
                node: r.u64("node")?,
                size: r.u32("size")?,
            },
            op::REMOVEXATTR => Request::Removexattr {
                node: r.u64("node")?,
                name: r.bytes("name")?,
            },
            op::ACCESS => Request::Access {
                node: r.u64("node")?,
                mask: r.i32("mask")?,
            },
            op::CREATE => Request::Create {
                parent: r.u64("parent")?,
                name: r.bytes("name")?,
                mode: r.u32("mode")?,
                umask: r.u32("umask")?,
                flags: r.i32("flags")?,
            },
            op::GETLK => Request::Getlk {
                fh: r.u64("fh")?,
                owner: r.u64("owner")?,
                lock: r.lock()?,
            },
            op::SETLK => Request::Setlk {
                fh: r.u64("fh")?,
                owner: r.u64("owner")?,
                lock: r.lock()?,
            },
            op::FALLOCATE => Request::Fallocate {
                fh: r.u64("fh")?,
                offset: r.u64("offset")?,
                length: r.u64("length")?,
                mode: r.i32("mode")?,
            },
            op::LSEEK => Request::Lseek {
                fh: r.u64("fh")?,
                offset: r.i64("offset")?,
                whence: r.i32("whence")?,
            },
            op::COPY_FILE_RANGE => Request::CopyFileRange {
                fh_in: r.u64("fh_in")?,
                off_in: r.u64("off_in")?,
                fh_out: r.u64("fh_out")?,
                off_out: r.u64("off_out")?,
                len: r.u64("len")?,
                flags: r.u32("flags")?,
            },
            op::RESERVE => Request::Reserve {
                floor: r.u64("floor")?,
            },
            op::RELOOKUP => Request::Relookup {
                parent: r.u64("parent")?,
                name: r.bytes("name")?,
                node: r.u64("node")?,
                ino: r.u64("ino")?,
                nlookup: r.u64("nlookup")?,
            },
            op::REOPEN => Request::Reopen {
                node: r.u64("node")?,
                fh: r.u64("fh")?,
                flags: r.i32("flags")?,
                dir: r.bool("dir")?,
            },
            other => return Err(DecodeError::UnknownOp(other)),
        };
        r.finish()?;
        Ok((creds, req))
    }
}

// ---------------------------------------------------------------- responses

/// Size the kernel's readdir buffer spends on one entry: `fuse_dirent` (24 bytes) + name,
/// padded to 8; readdirplus adds `fuse_entry_out` (128 bytes). The engine stops filling a
/// reply at the client's buffer size with this, so every entry it looked up is delivered.
/// Largest readdir batch (in [`dirent_cost`] units) the engine answers at once; a bigger
/// `size` is treated as this. Well below the link's frame limit.
pub const MAX_READDIR_BATCH: u32 = 256 * 1024;

pub fn dirent_cost(name_len: usize, plus: bool) -> usize {
    let base = if plus { 24 + 128 } else { 24 };
    (base + name_len).div_ceil(8) * 8
}

impl Response {
    pub fn encode(&self) -> Bytes {
        // Raw data needs no copy: it is the whole payload.
        if let Response::Data(d) = self {
            return d.clone();
        }
        let mut b = BytesMut::new();
        self.put(&mut b);
        b.freeze()
    }

    fn put(&self, b: &mut BytesMut) {
        match self {
            Response::Empty => {}
            Response::Entry(e) => put_entry(b, e),
            Response::Attr(a) => put_attr(b, a),
            Response::Opened { fh, flags } => {
                b.put_u64_le(*fh);
                b.put_u32_le(*flags);
            }
            Response::Created { entry, fh, flags } => {
                put_entry(b, entry);
                b.put_u64_le(*fh);
                b.put_u32_le(*flags);
            }
            Response::Data(d) => b.extend_from_slice(d),
            Response::Count(n) => b.put_u64_le(*n),
            Response::Written { count, killed } => {
                b.put_u64_le(*count);
                b.put_u8(u8::from(*killed));
            }
            Response::Statfs(s) => {
                b.put_u64_le(s.blocks);
                b.put_u64_le(s.bfree);
                b.put_u64_le(s.bavail);
                b.put_u64_le(s.files);
                b.put_u64_le(s.ffree);
                b.put_u32_le(s.bsize);
                b.put_u32_le(s.namelen);
                b.put_u32_le(s.frsize);
            }
            Response::Lock(l) => put_lock(b, l),
            Response::Offset(o) => b.put_i64_le(*o),
            Response::Dir(entries) => {
                b.put_u32_le(entries.len() as u32);
                for e in entries {
                    b.put_u64_le(e.ino);
                    b.put_u64_le(e.offset);
                    b.put_u8(e.kind);
                    put_bytes(b, &e.name);
                    match &e.entry {
                        Some(en) => {
                            b.put_u8(1);
                            put_entry(b, en);
                        }
                        None => b.put_u8(0),
                    }
                }
            }
            Response::InDirs { inner, dirs } => {
                inner.put(b);
                b.put_u8(dirs.len() as u8);
                for (node, a) in dirs {
                    b.put_u64_le(*node);
                    put_attr(b, a);
                }
            }
        }
    }

    /// Decodes the response to a request sent under `op`.
    pub fn decode(op: u16, payload: &Bytes) -> Result<Response, DecodeError> {
        let mut r = Reader::new(payload);
        let resp = match op {
            op::MOUNT
            | op::LOOKUP
            | op::MKNOD
            | op::MKDIR
            | op::SYMLINK
            | op::LINK
            | op::RELOOKUP => Response::Entry(r.entry()?),
            op::GETATTR | op::SETATTR => Response::Attr(r.attr()?),
            op::OPEN | op::OPENDIR | op::REOPEN => Response::Opened {
                fh: r.u64("fh")?,
                flags: r.u32("flags")?,
            },
            op::CREATE => Response::Created {
                entry: r.entry()?,
                fh: r.u64("fh")?,
                flags: r.u32("flags")?,
            },
            op::READ | op::READLINK | op::GETXATTR | op::LISTXATTR => Response::Data(r.rest()),
            op::WRITE => Response::Written {
                count: r.u64("count")?,
                killed: r.bool("killed")?,
            },
            op::COPY_FILE_RANGE => Response::Count(r.u64("count")?),
            op::STATFS => Response::Statfs(Statfs {
                blocks: r.u64("statfs")?,
                bfree: r.u64("statfs")?,
                bavail: r.u64("statfs")?,
                files: r.u64("statfs")?,
                ffree: r.u64("statfs")?,
                bsize: r.u32("statfs")?,
                namelen: r.u32("statfs")?,
                frsize: r.u32("statfs")?,
            }),
            op::GETLK => Response::Lock(r.lock()?),
            op::LSEEK => Response::Offset(r.i64("offset")?),
            op::READDIR => {
                let n = r.u32("dir")? as usize;
                // Each entry takes at least 22 bytes; cap the reservation by what remains.
                let mut v = Vec::with_capacity(n.min(r.remaining() / 22));
                for _ in 0..n {
                    let ino = r.u64("dirent")?;
                    let offset = r.u64("dirent")?;
                    let kind = r.u8("dirent")?;
                    let name = r.bytes("dirent name")?;
                    let entry = if r.bool("dirent plus")? {
                        Some(r.entry()?)
                    } else {
                        None
                    };
                    v.push(DirEntry {
                        ino,
                        offset,
                        kind,
                        name,
                        entry,
                    });
                }
                Response::Dir(v)
            }
            op::FORGET
            | op::UNLINK
            | op::RMDIR
            | op::RENAME
            | op::FLUSH
            | op::RELEASE
            | op::FSYNC
            | op::SETXATTR
            | op::REMOVEXATTR
            | op::ACCESS
            | op::SETLK
            | op::FALLOCATE
            | op::RESERVE => Response::Empty,
            other => return Err(DecodeError::UnknownOp(other)),
        };
        let changes_dirs = matches!(
            op,
            op::CREATE
                | op::MKNOD
                | op::MKDIR
                | op::SYMLINK
                | op::LINK
                | op::UNLINK
                | op::RMDIR
                | op::RENAME
        );
        let resp = if changes_dirs && r.remaining() > 0 {
            let n = r.u8("changed dirs")? as usize;
            if n > MAX_CHANGED_DIRS {
                return Err(DecodeError::BadValue {
                    what: "changed dirs",
                    value: n as u64,
                });
            }
            let mut dirs = Vec::with_capacity(n);
            for _ in 0..n {
                dirs.push((r.u64("changed dir")?, r.attr()?));
            }
            Response::InDirs {
                inner: Box::new(resp),
                dirs,
            }
        } else {
            resp
        };
        r.finish()?;
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn creds() -> Creds {
        Creds {
            uid: 1000,
            gid: 100,
            groups: vec![10, 20],
        }
    }

    fn attr() -> Attr {
        Attr {
            ino: 7,
            size: 4096,
            blocks: 8,
            atime: Time { sec: 1, nsec: 2 },
            mtime: Time { sec: -3, nsec: 4 },
            ctime: Time {
                sec: 5,
                nsec: 999_999_999,
            },
            mode: 0o100644,
            nlink: 1,
            uid: 1000,
            gid: 100,
            rdev: 0,
            blksize: 4096,
        }
    }

    fn all_requests() -> Vec<Request> {
        use Request::*;
        let n = || b"name".to_vec();
        let lock = Lock {
            start: 0,
            end: u64::MAX,
            typ: libc::F_WRLCK,
            pid: 42,
        };
        vec![
            Mount {
                path: b"/var/lib/docker".to_vec(),
                flags: 3,
            },
            Lookup {
                parent: 2,
                name: n(),
            },
            Forget {
                items: vec![(2, 1), (3, 9)],
            },
            Getattr { node: 2, fh: None },
            Getattr {
                node: 2,
                fh: Some(9),
            },
            Setattr {
                node: 2,
                fh: Some(1),
                set: SetAttr {
                    valid: set::MODE | set::ATIME | set::MTIME,
                    mode: 0o600,
                    uid: 0,
                    gid: 0,
                    size: 0,
                    atime: SetTime::Now,
                    mtime: SetTime::At(Time { sec: 100, nsec: 5 }),
                },
            },
            Readlink { node: 4 },
            Mknod {
                parent: 2,
                name: n(),
                mode: 0o10644,
                umask: 0o22,
                rdev: 0x0801,
            },
            Mkdir {
                parent: 2,
                name: n(),
                mode: 0o755,
                umask: 0o22,
            },
            Unlink {
                parent: 2,
                name: n(),
            },
            Rmdir {
                parent: 2,
                name: n(),
            },
            Symlink {
                parent: 2,
                name: n(),
                target: b"../x".to_vec(),
            },
            Rename {
                parent: 2,
                name: n(),
                newparent: 3,
                newname: b"b".to_vec(),
                flags: 1,
            },
            Link {
                node: 5,
                newparent: 2,
                newname: n(),
            },
            Open {
                node: 5,
                flags: libc::O_RDWR | libc::O_APPEND,
            },
            Read {
                fh: 1,
                offset: 1 << 40,
                size: 1 << 20,
            },
            Write {
                fh: 1,
                offset: 3,
                flags: 0,
                data: Bytes::from_static(b"hello"),
            },
            Write {
                fh: 1,
                offset: 3,
                flags: write_flags::KILL_SUIDGID,
                data: Bytes::new(),
            },
            Flush { fh: 1, owner: 77 },
            Release { fh: 1 },
            Fsync {
                fh: 1,
                datasync: true,
            },
            Opendir { node: 2 },
            Readdir {
                node: 2,
                fh: 1,
                offset: 9,
                size: 4096,
                plus: true,
            },
            Statfs { node: 1 },
            Setxattr {
                node: 2,
                name: b"user.a".to_vec(),
                flags: 1,
                value: Bytes::from_static(b"v\0"),
            },
            Getxattr {
                node: 2,
                name: b"user.a".to_vec(),
                size: 0,
            },
            Listxattr { node: 2, size: 100 },
            Removexattr {
                node: 2,
                name: b"user.a".to_vec(),
            },
            Access {
                node: 2,
                mask: libc::W_OK,
            },
            Create {
                parent: 2,
                name: n(),
                mode: 0o644,
                umask: 0o22,
                flags: libc::O_EXCL,
            },
            Getlk {
                fh: 1,
                owner: 5,
                lock,
            },
            Setlk {
                fh: 1,
                owner: 5,
                lock,
            },
            Fallocate {
                fh: 1,
                offset: 0,
                length: 1 << 20,
                mode: 0,
            },
            Lseek {
                fh: 1,
                offset: -1,
                whence: libc::SEEK_HOLE,
            },
            CopyFileRange {
                fh_in: 1,
                off_in: 0,
                fh_out: 2,
                off_out: 10,
                len: 100,
                flags: 0,
            },
            Reserve { floor: 1 << 20 },
            Relookup {
                parent: 2,
                name: n(),
                node: 77,
                ino: 123_456,
                nlookup: 3,
            },
            Reopen {
                node: 77,
                fh: 78,
                flags: libc::O_RDWR,
                dir: false,
            },
        ]
    }

    #[test]
    fn every_request_round_trips() {
        for req in all_requests() {
            let bytes = req.encode(&creds());
            let (c, back) = Request::decode(req.op(), &bytes).unwrap();
            assert_eq!(c, creds());
            assert_eq!(back, req);
            assert!(op::is_fs(req.op()));
            // Every strict prefix is rejected without panicking (except raw-tail requests,
            // where a shorter tail is itself valid).
            if !matches!(req, Request::Write { .. } | Request::Setxattr { .. }) {
                for cut in 0..bytes.len() {
                    assert!(
                        Request::decode(req.op(), &bytes.slice(..cut)).is_err(),
                        "{req:?} cut {cut}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_response_round_trips() {
        let e = Entry {
            node: 9,
            attr: attr(),
        };
        let cases = vec![
            (op::UNLINK, Response::Empty),
            (op::LOOKUP, Response::Entry(e)),
            (op::GETATTR, Response::Attr(attr())),
            (
                op::OPEN,
                Response::Opened {
                    fh: 3,
                    flags: open_flags::PSEUDO_FS,
                },
            ),
            (
                op::CREATE,
                Response::Created {
                    entry: e,
                    fh: 4,
                    flags: 0,
                },
            ),
            (op::READ, Response::Data(Bytes::from_static(b"data"))),
            (
                op::WRITE,
                Response::Written {
                    count: 5,
                    killed: true,
                },
            ),
            (op::COPY_FILE_RANGE, Response::Count(6)),
            (
                op::STATFS,
                Response::Statfs(Statfs {
                    blocks: 1,
                    bfree: 2,
                    bavail: 3,
                    files: 4,
                    ffree: 5,
                    bsize: 6,
                    namelen: 7,
                    frsize: 8,
                }),
            ),
            (
                op::GETLK,
                Response::Lock(Lock {
                    start: 1,
                    end: 2,
                    typ: libc::F_UNLCK,
                    pid: 0,
                }),
            ),
            (op::LSEEK, Response::Offset(-1)),
            (
                op::READDIR,
                Response::Dir(vec![
                    DirEntry {
                        ino: 1,
                        offset: 1,
                        kind: 4,
                        name: b".".to_vec(),
                        entry: None,
                    },
                    DirEntry {
                        ino: 7,
                        offset: 2,
                        kind: 8,
                        name: b"f".to_vec(),
                        entry: Some(e),
                    },
                ]),
            ),
            (
                op::CREATE,
                Response::InDirs {
                    inner: Box::new(Response::Created {
                        entry: e,
                        fh: 4,
                        flags: 0,
                    }),
                    dirs: vec![(2, attr())],
                },
            ),
            (
                op::RENAME,
                Response::InDirs {
                    inner: Box::new(Response::Empty),
                    dirs: vec![(2, attr()), (3, attr())],
                },
            ),
            (
                op::MKDIR,
                Response::InDirs {
                    inner: Box::new(Response::Entry(e)),
                    dirs: vec![],
                },
            ),
        ];
        for (o, resp) in cases {
            let bytes = resp.encode();
            assert_eq!(Response::decode(o, &bytes).unwrap(), resp, "op {o:#x}");
        }
        // Directory attributes follow only changes, and at most two of them.
        let dirs = |n: usize| Response::InDirs {
            inner: Box::new(Response::Empty),
            dirs: vec![(2, attr()); n],
        };
        assert!(Response::decode(op::SETXATTR, &dirs(1).encode()).is_err());
        assert!(Response::decode(op::UNLINK, &dirs(3).encode()).is_err());
        let cut = dirs(1).encode();
        assert!(Response::decode(op::UNLINK, &cut.slice(..cut.len() - 1)).is_err());
    }

    #[test]
    fn golden_lookup_request() {
        let req = Request::Lookup {
            parent: 2,
            name: b"ab".to_vec(),
        };
        let bytes = req.encode(&Creds {
            uid: 1,
            gid: 2,
            groups: vec![3],
        });
        assert_eq!(
            &bytes[..],
            &[
                1, 0, 0, 0, // uid
                2, 0, 0, 0, // gid
                1, 0, // ngroups
                3, 0, 0, 0, // group
                2, 0, 0, 0, 0, 0, 0, 0, // parent
                2, 0, 0, 0, b'a', b'b', // name
            ][..]
        );
    }

    #[test]
    fn encode_write_matches_the_write_request() {
        let creds = Creds {
            uid: 7,
            gid: 8,
            groups: vec![9, 10],
        };
        let data = vec![0xabu8; 100_000];
        let req = Request::Write {
            fh: 3,
            offset: 1 << 40,
            flags: write_flags::KILL_SUIDGID,
            data: Bytes::from(data.clone()),
        };
        assert_eq!(
            Request::encode_write(&creds, 3, 1 << 40, write_flags::KILL_SUIDGID, &data),
            req.encode(&creds)
        );
    }

    #[test]
    fn golden_write_request_keeps_data_raw() {
        let req = Request::Write {
            fh: 1,
            offset: 0x0102,
            flags: write_flags::KILL_SUIDGID,
            data: Bytes::from_static(b"xyz"),
        };
        let bytes = req.encode(&Creds::default());
        assert_eq!(
            &bytes[..],
            &[
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0, 1, 0,
                0, 0, b'x', b'y', b'z'
            ][..]
        );
    }

    #[test]
    fn golden_opened_response() {
        let bytes = Response::Opened { fh: 5, flags: 1 }.encode();
        assert_eq!(&bytes[..], &[5, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0][..]);
        assert_eq!(
            Response::Count(2).encode().as_ref(),
            &[2, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn hostile_lengths_are_rejected_without_allocation() {
        // ngroups says 1024 but nothing follows.
        let b = Bytes::from_static(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 4]);
        assert_eq!(
            Request::decode(op::LOOKUP, &b),
            Err(DecodeError::Truncated("groups"))
        );
        // name length 0xFFFFFFFF.
        let b = Bytes::from_static(&[
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff,
        ]);
        assert_eq!(
            Request::decode(op::LOOKUP, &b),
            Err(DecodeError::Truncated("name"))
        );
        // A readdir reply claiming 4 billion entries.
        let b = Bytes::from_static(&[0xff, 0xff, 0xff, 0xff]);
        assert!(Response::decode(op::READDIR, &b).is_err());
        assert_eq!(
            Request::decode(0x01ff, &Creds::default_bytes()),
            Err(DecodeError::UnknownOp(0x01ff))
        );
    }

    impl Creds {
        fn default_bytes() -> Bytes {
            Bytes::from_static(&[0; 10])
        }
    }

    #[test]
    fn dirent_cost_matches_fuse_layout() {
        assert_eq!(dirent_cost(1, false), 32);
        assert_eq!(dirent_cost(8, false), 32);
        assert_eq!(dirent_cost(9, false), 40);
        assert_eq!(dirent_cost(1, true), 160);
    }

    proptest! {
        #[test]
        fn request_decoder_never_panics(op in 0x0100u16..0x0125, data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Request::decode(op, &Bytes::from(data));
        }

        #[test]
        fn response_decoder_never_panics(op in 0x0100u16..0x0125, data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Response::decode(op, &Bytes::from(data));
        }
    }
}
