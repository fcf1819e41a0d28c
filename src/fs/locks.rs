//! POSIX record locks of DPU processes, held on the HOST with their local semantics.
//!
//! The DPU kernel names an owner with every lock request: a process's file table for POSIX
//! locks (`fcntl F_SETLK`), an open file for OFD locks (`F_OFD_SETLK`). Locally, one owner's
//! locks on a file never conflict with each other, whichever descriptor took them; two owners'
//! locks conflict even when they share one open file (a parent and its forked child); and
//! for POSIX locks, a close of any of the owner's descriptors of the file releases them all.
//!
//! The engine gives each (owner, HOST file) pair a *holder*: an open file of its own, made by
//! re-opening the file the request came through (`/proc/self/fd/N`), on which it takes that
//! owner's locks as OFD locks. HOST processes and other owners then see them as the HOST
//! kernel's own locks, and conflicts follow ownership as locally. A holder goes away, closing
//! its open file and so releasing every lock on it at once, when its owner flushes the file
//! (a close of any of its descriptors; only POSIX owners do) or when the last handle it
//! locked through is released (an OFD owner's open file was closed).
//!
//! Holders open the file read-only when the requesting handle was read-only (a read-write
//! open of a file would stop the HOST from executing it, and would break other processes'
//! read leases), otherwise read-write. A read-only holder that then needs a write lock is
//! replaced by a read-write one, which takes over its (read) locks before the old one closes,
//! so the owner never lets go of a range in between.
//!
//! Concurrency: [`LockTable`] is plain data, kept behind the engine's table mutex; the
//! syscalls ([`open_holder`], [`held`]) run on its pool, outside any lock.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use super::sys;

/// A HOST file: (st_dev, st_ino).
pub type FileKey = (u64, u64);

/// One owner's locks on one file: see the module docs.
struct Holder {
    fd: Arc<OwnedFd>,
    /// O_RDONLY, O_WRONLY or O_RDWR.
    mode: i32,
    /// The DPU pid that last locked through it (what F_GETLK reports).
    pid: u32,
    /// The handles it took locks through.
    via: Vec<u64>,
}

/// Every holder of one client connection, by (owner, file).
#[derive(Default)]
pub struct LockTable {
    holders: HashMap<(u64, FileKey), Holder>,
}

/// Whether an open file of access `mode` can hold a lock of type `typ`.
fn mode_allows(mode: i32, typ: i32) -> bool {
    match typ {
        libc::F_RDLCK => mode != libc::O_WRONLY,
        libc::F_WRLCK => mode != libc::O_RDONLY,
        _ => true,
    }
}

impl LockTable {
    /// The holder `owner` has for `file`, when it can take a lock of type `typ`; notes the
    /// handle and pid of the request.
    pub fn usable(
        &mut self,
        owner: u64,
        file: FileKey,
        typ: i32,
        fh: u64,
        pid: u32,
    ) -> Option<Arc<OwnedFd>> {
        let h = self.holders.get_mut(&(owner, file))?;
        if !mode_allows(h.mode, typ) {
            return None;
        }
        h.pid = pid;
        if !h.via.contains(&fh) {
            h.via.push(fh);
        }
        Some(h.fd.clone())
    }

    /// The open file holding `owner`'s locks on `file`, if any.
    pub fn held_by(&self, owner: u64, file: FileKey) -> Option<Arc<OwnedFd>> {
        self.holders.get(&(owner, file)).map(|h| h.fd.clone())
    }

    /// The other owners' holders of `file`, with the pid each last locked from.
    pub fn others(&self, owner: u64, file: FileKey) -> Vec<(Arc<OwnedFd>, u32)> {
        self.holders
            .iter()
            .filter(|((o, f), _)| *o != owner && *f == file)
            .map(|(_, h)| (h.fd.clone(), h.pid))
            .collect()
    }

    /// Makes `fd` (opened with access `mode`) `owner`'s holder of `file`, locked through
    /// handle `fh` by `pid`; returns the holder it replaces, to be closed outside the lock.
    /// The handles the old one locked through stay noted.
    pub fn insert(
        &mut self,
        owner: u64,
        file: FileKey,
        fd: Arc<OwnedFd>,
        mode: i32,
        fh: u64,
        pid: u32,
    ) -> Option<Arc<OwnedFd>> {
        let mut via = vec![fh];
        let old = self.holders.remove(&(owner, file)).map(|old| {
            via.extend(old.via.into_iter().filter(|v| *v != fh));
            old.fd
        });
        self.holders
            .insert((owner, file), Holder { fd, mode, pid, via });
        old
    }

    /// `owner` closed a descriptor of `file`: its holder, whose closing releases its locks.
    pub fn flushed(&mut self, owner: u64, file: FileKey) -> Option<Arc<OwnedFd>> {
        self.holders.remove(&(owner, file)).map(|h| h.fd)
    }

    /// Handle `fh` was released: the holders that locked through it alone.
    pub fn released(&mut self, fh: u64) -> Vec<Arc<OwnedFd>> {
        let mut gone = Vec::new();
        self.holders.retain(|_, h| {
            h.via.retain(|v| *v != fh);
            if h.via.is_empty() {
                gone.push(h.fd.clone());
                false
            } else {
                true
            }
        });
        gone
    }

    /// Holders now open (for tests and status).
    pub fn len(&self) -> usize {
        self.holders.len()
    }

    /// True when no owner holds anything.
    pub fn is_empty(&self) -> bool {
        self.holders.is_empty()
    }
}

/// Opens a holder for the file `src` is open on, for a lock of type `typ`: read-write
/// when `src` can write or the lock needs it, else read-only (see the module docs); then
/// moves the locks of `old`, a read-only holder it replaces, onto it. Run as the engine:
/// the DPU kernel has checked the lock against the caller's own descriptor already.
/// Returns the new open file and its access mode.
pub fn open_holder(src: RawFd, typ: i32, old: Option<RawFd>) -> io::Result<(OwnedFd, i32)> {
    let path = sys::proc_fd_path(src);
    let src_mode = sys::access_mode(src)?;
    let flags = libc::O_NOCTTY | libc::O_NONBLOCK;
    let (fd, mode) = if src_mode != libc::O_RDONLY || typ == libc::F_WRLCK {
        match sys::openat(libc::AT_FDCWD, &path, libc::O_RDWR | flags, 0) {
            Ok(fd) => (fd, libc::O_RDWR),
            Err(_) if src_mode != libc::O_RDONLY => (
                sys::openat(libc::AT_FDCWD, &path, src_mode | flags, 0)?,
                src_mode,
            ),
            Err(e) => return Err(e),
        }
    } else {
        (
            sys::openat(libc::AT_FDCWD, &path, libc::O_RDONLY | flags, 0)?,
            libc::O_RDONLY,
        )
    };
    if let Some(old) = old {
        for mut fl in held(old)? {
            sys::ofd_lock(fd.as_raw_fd(), libc::F_OFD_SETLK, &mut fl)?;
        }
    }
    Ok((fd, mode))
}

/// A lock record of type `typ` on `len` bytes from `start` (0: to the end of the file).
fn range(typ: i32, start: i64, len: i64) -> libc::flock64 {
    libc::flock64 {
        l_type: typ as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: len,
        l_pid: 0,
    }
}

/// Releases every lock `holder` has, then closes it (when no request still uses it).
/// Unlocking first matters: a copy of the fd that a fork made would keep the open file,
/// and its locks, alive after the close.
pub fn let_go(holder: Arc<OwnedFd>) {
    let mut all = range(libc::F_UNLCK, 0, 0);
    if let Err(e) = sys::ofd_lock(holder.as_raw_fd(), libc::F_OFD_SETLK, &mut all) {
        tracing::warn!(error = %e, "qtfs: could not release a lock holder's locks; closing it");
    }
}

/// The OFD locks the open file `fd` holds (its `/proc/self/fdinfo` lines), as flock64s.
pub fn held(fd: RawFd) -> io::Result<Vec<libc::flock64>> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    Ok(parse_fdinfo_locks(&text))
}

/// Which of `others` (holders and their pids) holds the lock `found`, as F_OFD_GETLK
/// reported it: that owner's pid, or 0 when none does (a HOST process's lock).
pub fn holder_pid(others: &[(Arc<OwnedFd>, u32)], found: &libc::flock64) -> u32 {
    others
        .iter()
        .find(|(fd, _)| {
            held(fd.as_raw_fd()).is_ok_and(|locks| {
                locks.iter().any(|l| {
                    l.l_type == found.l_type && l.l_start == found.l_start && l.l_len == found.l_len
                })
            })
        })
        .map_or(0, |(_, pid)| *pid)
}

/// The OFD locks in the text of an fdinfo file: lines such as
/// `lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:1234 100 EOF` (first and last byte).
fn parse_fdinfo_locks(text: &str) -> Vec<libc::flock64> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.strip_prefix("lock:")?.split_whitespace().collect();
            // [id:, OFDLCK, ADVISORY, READ|WRITE, pid, dev:ino, start, end|EOF]
            if f.len() != 8 || f[1] != "OFDLCK" {
                return None;
            }
            let typ = match f[3] {
                "READ" => libc::F_RDLCK,
                "WRITE" => libc::F_WRLCK,
                _ => return None,
            };
            let start: i64 = f[6].parse().ok()?;
            let len = match f[7] {
                "EOF" => 0,
                end => end.parse::<i64>().ok()?.checked_sub(start)? + 1,
            };
            Some(range(typ, start, len))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn fd() -> Arc<OwnedFd> {
        Arc::new(OwnedFd::from(tempfile::tempfile().unwrap()))
    }

    #[test]
    fn fdinfo_lock_lines_become_ranges() {
        let text = "pos:\t0\nflags:\t02100002\nmnt_id:\t27\nino:\t5\n\
                    lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:5 5 14\n\
                    lock:\t2: OFDLCK ADVISORY  WRITE -1 fe:00:5 100 EOF\n\
                    lock:\t3: POSIX  ADVISORY  WRITE 77 fe:00:5 0 0\n\
                    lock:\tgarbage\n";
        let got: Vec<_> = parse_fdinfo_locks(text)
            .iter()
            .map(|l| (l.l_type as i32, l.l_start, l.l_len))
            .collect();
        assert_eq!(got, vec![(libc::F_RDLCK, 5, 10), (libc::F_WRLCK, 100, 0)]);
    }

    #[test]
    fn a_read_only_holder_hands_its_locks_to_a_read_write_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"0123456789").unwrap();
        let ro = std::fs::File::open(&p).unwrap();
        let (old, mode) = open_holder(ro.as_raw_fd(), libc::F_RDLCK, None).unwrap();
        assert_eq!(mode, libc::O_RDONLY);
        let mut fl = range(libc::F_RDLCK, 2, 3);
        sys::ofd_lock(old.as_raw_fd(), libc::F_OFD_SETLK, &mut fl).unwrap();
        let rw = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let (new, mode) =
            open_holder(rw.as_raw_fd(), libc::F_WRLCK, Some(old.as_raw_fd())).unwrap();
        assert_eq!(mode, libc::O_RDWR);
        drop(old);
        let got: Vec<_> = held(new.as_raw_fd())
            .unwrap()
            .iter()
            .map(|l| (l.l_type as i32, l.l_start, l.l_len))
            .collect();
        assert_eq!(got, vec![(libc::F_RDLCK, 2, 3)]);
    }

    #[test]
    fn holders_go_with_their_owners_flush_or_their_last_handle() {
        let mut t = LockTable::default();
        let file = (1, 2);
        assert!(t.insert(10, file, fd(), libc::O_RDWR, 100, 5).is_none());
        assert!(t.usable(10, file, libc::F_WRLCK, 101, 5).is_some());
        assert!(t.insert(11, file, fd(), libc::O_RDONLY, 100, 6).is_none());
        // A read-only holder cannot take a write lock: the caller replaces it.
        assert!(t.usable(11, file, libc::F_WRLCK, 100, 6).is_none());
        assert_eq!(t.others(10, file).len(), 1);
        assert_eq!(t.others(10, file)[0].1, 6);
        // Owner 10 locked through handles 100 and 101; releasing 100 leaves it.
        assert_eq!(t.released(100).len(), 1);
        assert_eq!(t.len(), 1);
        assert!(t.flushed(10, file).is_some());
        assert!(t.is_empty());
    }
}
