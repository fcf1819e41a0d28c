//! Thin, checked wrappers over the Linux syscalls the engine-side executor needs that std
//! does not offer (openat2, renameat2, per-thread credentials, getdents64, OFD locks, ...).
//! All of this module's `unsafe` lives here, each block with its SAFETY argument; every
//! wrapper returns `io::Result` so the HOST's errno travels back unchanged.
//!
//! Concurrency: stateless; the credential functions act on the calling thread only.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_l(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A C string from bytes that the caller already checked contain no NUL.
pub fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Resolution flags used for every client-supplied name: stay beneath the directory fd,
/// follow no symlink at all (the DPU kernel resolves symlinks itself, on its side) and no
/// /proc magic link. With O_PATH|O_NOFOLLOW a trailing symlink yields an fd for the link.
pub const RESOLVE_STRICT: u64 =
    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;

/// openat2(2) relative to `dir`.
pub fn openat2(
    dir: RawFd,
    name: &CStr,
    flags: i32,
    mode: u32,
    resolve: u64,
) -> io::Result<OwnedFd> {
    // SAFETY: open_how is a plain C struct; zeroed is a valid value for it.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 {
        mode as u64
    } else {
        0
    };
    how.resolve = resolve;
    // SAFETY: `name` is a valid NUL-terminated string and `how` a valid open_how of the size
    // passed; the kernel only reads them.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            name.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    let fd = cvt_l(fd)? as RawFd;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Plain openat(2) (used for `/proc/self/fd/N` re-opens, which need magic-link traversal).
pub fn openat(dir: RawFd, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: valid C string; the mode argument is read only with O_CREAT.
    let fd = cvt(unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: fresh fd from the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `/proc/self/fd/N`: reaches exactly the inode the fd refers to, never a path lookup.
pub fn proc_fd_path(fd: RawFd) -> CString {
    // Digits only: cannot contain NUL.
    CString::new(format!("/proc/self/fd/{fd}")).unwrap_or_default()
}

/// The HOST path an fd refers to right now (for allowlist checks and logs).
pub fn fd_path(fd: RawFd) -> io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
}

/// fstatat(fd, "", AT_EMPTY_PATH): works on O_PATH fds, never follows.
pub fn fstat(fd: RawFd) -> io::Result<libc::stat64> {
    // SAFETY: stat64 is plain data; zeroed is valid and the kernel fills it.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: empty C string literal, valid out pointer.
    cvt(unsafe {
        libc::fstatat64(
            fd,
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

/// stat of the entry `name` in `dir` itself (a symlink is not followed). `name` is one
/// component, as getdents returns it.
pub fn stat_entry(dir: RawFd, name: &CStr) -> io::Result<libc::stat64> {
    // SAFETY: stat64 is plain data; zeroed is valid and the kernel fills it.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    cvt(unsafe { libc::fstatat64(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

pub fn fstatfs(fd: RawFd) -> io::Result<libc::statfs64> {
    // SAFETY: plain data out-parameter.
    let mut st: libc::statfs64 = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd number (or EBADF) and out pointer.
    cvt(unsafe { libc::fstatfs64(fd, &mut st) })?;
    Ok(st)
}

pub fn mkdirat(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::mkdirat(dir, name.as_ptr(), mode) }).map(drop)
}

pub fn mknodat(dir: RawFd, name: &CStr, mode: u32, rdev: u64) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::mknodat(dir, name.as_ptr(), mode, rdev) }).map(drop)
}

pub fn symlinkat(target: &CStr, dir: RawFd, name: &CStr) -> io::Result<()> {
    // SAFETY: valid C strings.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) }).map(drop)
}

pub fn unlinkat(dir: RawFd, name: &CStr, flags: i32) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }).map(drop)
}

pub fn renameat2(
    old_dir: RawFd,
    old: &CStr,
    new_dir: RawFd,
    new: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: valid C strings; raw syscall because older glibc lacks the wrapper.
    cvt_l(unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            old_dir,
            old.as_ptr(),
            new_dir,
            new.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

/// link(2) of the inode behind `fd` (via its /proc magic link, which needs no
/// CAP_DAC_READ_SEARCH, unlike AT_EMPTY_PATH).
pub fn link_fd(fd: RawFd, new_dir: RawFd, new: &CStr) -> io::Result<()> {
    let p = proc_fd_path(fd);
    // SAFETY: valid C strings.
    cvt(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            p.as_ptr(),
            new_dir,
            new.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
    .map(drop)
}

pub fn readlink_fd(fd: RawFd) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: buffer valid for buf.len() bytes.
    let n = unsafe { libc::readlinkat(fd, c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let n = cvt_l(n as libc::c_long)? as usize;
    buf.truncate(n);
    Ok(buf)
}

pub fn chmod_fd(fd: RawFd, mode: u32) -> io::Result<()> {
    let p = proc_fd_path(fd);
    // SAFETY: valid C string.
    cvt(unsafe { libc::fchmodat(libc::AT_FDCWD, p.as_ptr(), mode, 0) }).map(drop)
}

/// Clears what a write by a process without CAP_FSETID clears on a regular file: the
/// set-user-ID bit, and the set-group-ID bit when group execute is set (without it the bit
/// marks mandatory locking and stays). One fstat when there is nothing to clear; true when
/// bits were cleared.
pub fn kill_suid_sgid(fd: RawFd) -> io::Result<bool> {
    let mode = fstat(fd)?.st_mode;
    if mode & libc::S_IFMT != libc::S_IFREG {
        return Ok(false);
    }
    let mut kill = mode & libc::S_ISUID;
    if mode & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP {
        kill |= libc::S_ISGID;
    }
    if kill == 0 {
        return Ok(false);
    }
    // SAFETY: plain syscall on a descriptor number.
    cvt(unsafe { libc::fchmod(fd, mode & 0o7777 & !kill) }).map(|_| true)
}

pub fn chown_fd(fd: RawFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: empty C string with AT_EMPTY_PATH acts on the fd itself (O_PATH fds allowed).
    cvt(unsafe {
        libc::fchownat(
            fd,
            c"".as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn truncate_fd(fd: RawFd, size: u64) -> io::Result<()> {
    let p = proc_fd_path(fd);
    // SAFETY: valid C string.
    cvt(unsafe { libc::truncate64(p.as_ptr(), size as i64) }).map(drop)
}

pub fn ftruncate(fd: RawFd, size: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an fd number.
    cvt(unsafe { libc::ftruncate64(fd, size as i64) }).map(drop)
}

/// utimensat on the inode behind `fd`; `times` may hold UTIME_NOW / UTIME_OMIT.
pub fn utimens_fd(fd: RawFd, times: &[libc::timespec; 2]) -> io::Result<()> {
    let p = proc_fd_path(fd);
    // SAFETY: valid C string and a two-element timespec array.
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) }).map(drop)
}

pub fn futimens(fd: RawFd, times: &[libc::timespec; 2]) -> io::Result<()> {
    // SAFETY: two-element timespec array.
    cvt(unsafe { libc::futimens(fd, times.as_ptr()) }).map(drop)
}

pub fn pread(fd: RawFd, buf: &mut [u8], off: u64) -> io::Result<usize> {
    // SAFETY: buffer valid for its length.
    let n = unsafe { libc::pread64(fd, buf.as_mut_ptr().cast(), buf.len(), off as i64) };
    Ok(cvt_l(n as libc::c_long)? as usize)
}

/// [`pread`] that never waits (`RWF_NOWAIT`): `None` when the data is not all in the page
/// cache or the file cannot promise not to block (pipes, proc/sys files, filesystems
/// without the flag); the caller then reads on a thread that may block.
pub fn pread_nowait(fd: RawFd, buf: &mut [u8], off: u64) -> io::Result<Option<usize>> {
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: one iovec over a buffer valid for its length.
    let n = unsafe { libc::preadv2(fd, &iov, 1, off as i64, libc::RWF_NOWAIT) };
    nowait_result(n)
}

/// [`pwrite`] that never waits (`RWF_NOWAIT`), as [`pread_nowait`].
pub fn pwrite_nowait(fd: RawFd, buf: &[u8], off: u64) -> io::Result<Option<usize>> {
    let iov = libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: one iovec over a buffer valid for its length; the kernel only reads it.
    let n = unsafe { libc::pwritev2(fd, &iov, 1, off as i64, libc::RWF_NOWAIT) };
    nowait_result(n)
}

fn nowait_result(n: libc::ssize_t) -> io::Result<Option<usize>> {
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // Would block, or this file (or kernel) cannot say: the blocking path decides.
        Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS | libc::ESPIPE) => {
            Ok(None)
        }
        _ => Err(e),
    }
}

pub fn pwrite(fd: RawFd, buf: &[u8], off: u64) -> io::Result<usize> {
    // SAFETY: buffer valid for its length.
    let n = unsafe { libc::pwrite64(fd, buf.as_ptr().cast(), buf.len(), off as i64) };
    Ok(cvt_l(n as libc::c_long)? as usize)
}

pub fn fsync(fd: RawFd, datasync: bool) -> io::Result<()> {
    // SAFETY: plain syscalls on an fd number.
    cvt(unsafe {
        if datasync {
            libc::fdatasync(fd)
        } else {
            libc::fsync(fd)
        }
    })
    .map(drop)
}

pub fn fallocate(fd: RawFd, mode: i32, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall.
    cvt(unsafe { libc::fallocate64(fd, mode, off as i64, len as i64) }).map(drop)
}

pub fn lseek(fd: RawFd, off: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: plain syscall.
    let r = unsafe { libc::lseek64(fd, off, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn copy_file_range(
    fd_in: RawFd,
    off_in: u64,
    fd_out: RawFd,
    off_out: u64,
    len: u64,
    flags: u32,
) -> io::Result<u64> {
    let mut oi = off_in as i64;
    let mut oo = off_out as i64;
    // SAFETY: offsets are valid in/out pointers to local variables.
    let n = unsafe { libc::copy_file_range(fd_in, &mut oi, fd_out, &mut oo, len as usize, flags) };
    Ok(cvt_l(n as libc::c_long)? as u64)
}

/// The access mode `fd` was opened with: O_RDONLY, O_WRONLY or O_RDWR.
pub fn access_mode(fd: RawFd) -> io::Result<i32> {
    // SAFETY: F_GETFL takes no argument.
    Ok(cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })? & libc::O_ACCMODE)
}

/// An OFD (open-file-description) lock operation: locks belong to the engine's open file
/// they are taken on (one per DPU lock owner and file: see `locks`).
pub fn ofd_lock(fd: RawFd, cmd: i32, fl: &mut libc::flock64) -> io::Result<()> {
    // SAFETY: valid flock pointer for the duration of the call.
    cvt(unsafe { libc::fcntl(fd, cmd, fl as *mut libc::flock64) }).map(drop)
}

/// faccessat2 with AT_EACCESS, so the check uses the thread's fsuid/fsgid (plain access(2)
/// would use the real uid, i.e. the engine's root).
pub fn access_fd(fd: RawFd, mask: i32) -> io::Result<()> {
    let p = proc_fd_path(fd);
    // SAFETY: valid C string.
    cvt_l(unsafe {
        libc::syscall(
            libc::SYS_faccessat2,
            libc::AT_FDCWD,
            p.as_ptr(),
            mask,
            libc::AT_EACCESS,
        )
    })
    .map(drop)
}

fn xattr_result(n: libc::ssize_t) -> io::Result<usize> {
    Ok(cvt_l(n as libc::c_long)? as usize)
}

pub fn getxattr(fd: RawFd, name: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    let p = proc_fd_path(fd);
    // SAFETY: valid C strings; buffer valid for its length (null with length 0 asks the size).
    xattr_result(unsafe {
        libc::getxattr(
            p.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })
}

/// Whether the directory behind `dir` has a default POSIX ACL, which (as on a local file
/// system) replaces the creator's umask for what is made in it.
pub fn has_default_acl(dir: RawFd) -> bool {
    getxattr(dir, c"system.posix_acl_default", &mut []).is_ok_and(|n| n > 0)
}

/// The creator's `umask` as the HOST applies it to a new entry of `mode` in `dir`: not at
/// all under a default ACL (the mount asks the kernel to leave masking to us, as it cannot
/// know about the HOST's ACLs).
pub fn creation_umask(dir: RawFd, mode: u32, umask: u32) -> u32 {
    if mode & umask & 0o777 != 0 && has_default_acl(dir) {
        0
    } else {
        umask
    }
}

pub fn listxattr(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    let p = proc_fd_path(fd);
    // SAFETY: as getxattr.
    xattr_result(unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
}

pub fn setxattr(fd: RawFd, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    let p = proc_fd_path(fd);
    // SAFETY: valid C strings; value valid for its length.
    cvt(unsafe {
        libc::setxattr(
            p.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

pub fn removexattr(fd: RawFd, name: &CStr) -> io::Result<()> {
    let p = proc_fd_path(fd);
    // SAFETY: valid C strings.
    cvt(unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) }).map(drop)
}

/// getdents64 into `buf`; returns the bytes filled (0 at end of directory).
pub fn getdents64(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buffer valid for its length; the kernel writes at most that many bytes.
    let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
    Ok(cvt_l(n)? as usize)
}

/// One parsed `linux_dirent64` record.
pub struct RawDirent<'a> {
    pub ino: u64,
    pub off: u64,
    pub kind: u8,
    pub name: &'a [u8],
}

/// Parses the records getdents64 wrote; stops at the first malformed record.
pub fn parse_dirents(buf: &[u8]) -> Vec<RawDirent<'_>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    // Layout: d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name NUL-terminated.
    while pos + 19 <= buf.len() {
        let rec = &buf[pos..];
        let ino = u64::from_ne_bytes(rec[0..8].try_into().unwrap_or_default());
        let off = u64::from_ne_bytes(rec[8..16].try_into().unwrap_or_default());
        let reclen = u16::from_ne_bytes(rec[16..18].try_into().unwrap_or_default()) as usize;
        if reclen < 19 || reclen > rec.len() {
            break;
        }
        let kind = rec[18];
        let name_area = &rec[19..reclen];
        let end = name_area
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(name_area.len());
        out.push(RawDirent {
            ino,
            off,
            kind,
            name: &name_area[..end],
        });
        pos += reclen;
    }
    out
}

/// Switches this thread's filesystem identity (fsuid, fsgid, supplementary groups).
/// Uses the raw setgroups syscall: glibc's setgroups() broadcasts the change to every
/// thread of the process, which would let one request's groups leak into another's.
pub fn set_thread_creds(uid: u32, gid: u32, groups: &[u32]) -> io::Result<()> {
    // SAFETY: pointer valid for `groups.len()` gid_t values.
    cvt_l(unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) })?;
    // setfsuid/setfsgid return the previous value and cannot report errors directly;
    // calling them again with -1 (an invalid id) returns the current value to verify.
    // SAFETY: plain syscalls on the calling thread's credentials.
    unsafe {
        libc::setfsgid(gid);
        libc::setfsuid(uid);
        let now_gid = libc::setfsgid(u32::MAX);
        let now_uid = libc::setfsuid(u32::MAX);
        if now_uid as u32 != uid || now_gid as u32 != gid {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
    }
    Ok(())
}

/// The process umask, from /proc/self/status (reading it with umask(2) would change it for
/// a moment under every other thread).
pub fn process_umask() -> Option<u32> {
    umask_in("/proc/self/status")
}

/// The calling thread's umask (threads that unshared CLONE_FS have their own), which is what
/// a child spawned from this thread inherits.
pub fn thread_umask() -> Option<u32> {
    umask_in("/proc/thread-self/status")
}

fn umask_in(status_file: &str) -> Option<u32> {
    let status = std::fs::read_to_string(status_file).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
    u32::from_str_radix(line.trim(), 8).ok()
}

/// fcntl(F_SETFL): replaces the file status flags (O_APPEND, O_NONBLOCK, ...).
pub fn set_fl(fd: RawFd, flags: i32) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; F_SETFL ignores access-mode and creation bits.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) })?;
    Ok(())
}

/// Gives this thread its own umask and cwd (CLONE_FS) and sets the umask to 0, so the mode
/// bits the engine computed (see [`creation_umask`]) apply unchanged on the HOST.
pub fn private_fs_umask_zero() -> io::Result<()> {
    // SAFETY: unshare(CLONE_FS) affects only the calling thread's fs_struct.
    cvt(unsafe { libc::unshare(libc::CLONE_FS) })?;
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0) };
    Ok(())
}

/// Most descriptors the engine asks for (virtiofsd's default too).
const NOFILE_WANTED: u64 = 1_000_000;

/// Raises RLIMIT_NOFILE: the engine keeps one O_PATH fd per node the DPU kernel has cached
/// (like virtiofsd), so a DPU walking a large tree needs as many. Asks for
/// min(1,000,000, fs.nr_open), raising the hard limit too where allowed (CAP_SYS_RESOURCE),
/// else the soft limit up to the hard one. Returns the limit in force.
pub fn raise_nofile() -> u64 {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(NOFILE_WANTED);
    let wanted = NOFILE_WANTED.min(nr_open);
    // SAFETY: plain data in/out parameters.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 0;
        }
        if rl.rlim_cur >= wanted {
            return rl.rlim_cur;
        }
        let both = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: wanted.max(rl.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &both) == 0 {
            return wanted;
        }
        rl.rlim_cur = rl.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) == 0 {
            return rl.rlim_cur;
        }
        let _ = libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
        rl.rlim_cur
    }
}

pub fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn parse_dirents_reads_real_getdents_output() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a_file"), b"x").unwrap();
        let d = std::fs::File::open(dir.path()).unwrap();
        let mut buf = vec![0u8; 4096];
        let n = getdents64(d.as_raw_fd(), &mut buf).unwrap();
        let mut names: Vec<_> = parse_dirents(&buf[..n])
            .iter()
            .map(|e| e.name.to_vec())
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![b".".to_vec(), b"..".to_vec(), b"a_file".to_vec()]
        );
        // Truncated input never panics.
        for cut in 0..n {
            let _ = parse_dirents(&buf[..cut]);
        }
    }

    #[test]
    fn openat2_refuses_symlinks_and_dotdot() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("l")).unwrap();
        let d = std::fs::File::open(dir.path()).unwrap();
        let e = openat2(d.as_raw_fd(), c"l", libc::O_RDONLY, 0, RESOLVE_STRICT).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        let e = openat2(d.as_raw_fd(), c"..", libc::O_PATH, 0, RESOLVE_STRICT).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EXDEV));
        // O_PATH|O_NOFOLLOW yields the link itself.
        let fd = openat2(
            d.as_raw_fd(),
            c"l",
            libc::O_PATH | libc::O_NOFOLLOW,
            0,
            RESOLVE_STRICT,
        )
        .unwrap();
        assert_eq!(readlink_fd(fd.as_raw_fd()).unwrap(), b"/etc/passwd");
    }
}
