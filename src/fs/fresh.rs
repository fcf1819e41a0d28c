//! Directories this mount created itself, whose names it knows completely for a while
//! (`-o fresh_dirs=SECS`, off by default).
//!
//! Creating a file, directory or link costs the kernel a LOOKUP of the new name first (to
//! learn it is absent), then the CREATE, MKDIR or SYMLINK: two round trips to the engine. In a
//! directory this mount created, every name was made through it, so for `SECS` after the
//! directory's creation the mount answers such a lookup itself, and unpacking a tree (an image
//! layer, a tarball) costs one round trip per entry instead of two. The price: a name the HOST
//! adds to such a directory during that time stays hidden from the DPU until it expires.
//! Anything that shows the knowledge is stale (EEXIST for a name believed absent, ENOENT for
//! one believed present) drops the directory at once, as does the kernel forgetting it and a
//! reconnect.
//!
//! Ids are the client's inode numbers. Bounded: at most [`MAX_DIRS`] directories and
//! [`MAX_NAMES`] names in all; beyond that, directories are not taken on (lookups then go to
//! the engine as usual).
//!
//! Concurrency: plain data; the client keeps it behind one `Mutex`, touched only when the
//! option is on.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// Directories known at once, at most.
pub const MAX_DIRS: usize = 65_536;
/// Names known in all those directories, at most (about 100 bytes each).
pub const MAX_NAMES: usize = 1_000_000;

struct Dir {
    until: Instant,
    names: HashSet<Vec<u8>>,
}

/// See the module docs.
pub struct FreshDirs {
    ttl: Duration,
    dirs: HashMap<u64, Dir>,
    names: usize,
}

impl FreshDirs {
    /// `ttl` zero: off.
    pub fn new(ttl: Duration) -> FreshDirs {
        FreshDirs {
            ttl,
            dirs: HashMap::new(),
            names: 0,
        }
    }

    /// Whether the option is on.
    pub fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }

    /// This mount just created the (empty) directory `dir`.
    pub fn created(&mut self, dir: u64, now: Instant) {
        if !self.enabled() {
            return;
        }
        if self.dirs.len() >= MAX_DIRS {
            self.sweep(now);
            if self.dirs.len() >= MAX_DIRS {
                return;
            }
        }
        let old = self.dirs.insert(
            dir,
            Dir {
                until: now + self.ttl,
                names: HashSet::new(),
            },
        );
        if let Some(old) = old {
            self.names -= old.names.len();
        }
    }

    /// True when `name` is certainly absent from `dir`: a lookup may be answered ENOENT here.
    pub fn absent(&mut self, dir: u64, name: &[u8], now: Instant) -> bool {
        match self.dirs.get(&dir) {
            Some(d) if d.until > now => !d.names.contains(name),
            Some(_) => {
                self.drop_dir(dir);
                false
            }
            None => false,
        }
    }

    /// `name` now exists in `dir` (made, linked or renamed there, or found by a lookup).
    pub fn added(&mut self, dir: u64, name: &[u8]) {
        if self.names >= MAX_NAMES && self.dirs.contains_key(&dir) {
            // Over the bound: stop trusting this directory rather than grow.
            self.drop_dir(dir);
            return;
        }
        if let Some(d) = self.dirs.get_mut(&dir) {
            if d.names.insert(name.to_vec()) {
                self.names += 1;
            }
        }
    }

    /// `name` no longer exists in `dir`.
    pub fn removed(&mut self, dir: u64, name: &[u8]) {
        if let Some(d) = self.dirs.get_mut(&dir) {
            if d.names.remove(name) {
                self.names -= 1;
            }
        }
    }

    /// A rename through this mount succeeded.
    pub fn renamed(&mut self, from: u64, name: &[u8], to: u64, newname: &[u8], exchange: bool) {
        if exchange {
            // Both names exist before and after.
            return;
        }
        self.removed(from, name);
        self.added(to, newname);
    }

    /// Stop trusting `dir`: stale knowledge, or the kernel forgot it.
    pub fn drop_dir(&mut self, dir: u64) {
        if let Some(d) = self.dirs.remove(&dir) {
            self.names -= d.names.len();
        }
    }

    /// Forget everything (a reconnect: the HOST may have changed meanwhile).
    pub fn clear(&mut self) {
        self.dirs.clear();
        self.names = 0;
    }

    fn sweep(&mut self, now: Instant) {
        let names = &mut self.names;
        self.dirs.retain(|_, d| {
            let keep = d.until > now;
            if !keep {
                *names -= d.names.len();
            }
            keep
        });
    }

    /// (directories, names) held, for tests and status.
    pub fn len(&self) -> (usize, usize) {
        (self.dirs.len(), self.names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_made_here_exist_in_a_fresh_directory_until_it_expires() {
        let t0 = Instant::now();
        let mut f = FreshDirs::new(Duration::from_secs(10));
        assert!(
            !f.absent(7, b"a", t0),
            "unknown directories are never fresh"
        );
        f.created(7, t0);
        assert!(f.absent(7, b"a", t0));
        f.added(7, b"a");
        assert!(!f.absent(7, b"a", t0));
        f.renamed(7, b"a", 7, b"b", false);
        assert!(f.absent(7, b"a", t0) && !f.absent(7, b"b", t0));
        f.removed(7, b"b");
        assert!(f.absent(7, b"b", t0));
        assert!(!f.absent(7, b"x", t0 + Duration::from_secs(11)), "expired");
        assert_eq!(f.len(), (0, 0));
    }

    #[test]
    fn renames_across_directories_and_exchanges_keep_the_sets_right() {
        let t0 = Instant::now();
        let mut f = FreshDirs::new(Duration::from_secs(10));
        f.created(1, t0);
        f.created(2, t0);
        f.added(1, b"a");
        f.added(2, b"b");
        f.renamed(1, b"a", 2, b"c", false);
        assert!(f.absent(1, b"a", t0) && !f.absent(2, b"c", t0));
        f.renamed(2, b"b", 2, b"c", true);
        assert!(!f.absent(2, b"b", t0) && !f.absent(2, b"c", t0));
        // A rename into a directory that is not fresh just leaves the source.
        f.renamed(2, b"c", 99, b"z", false);
        assert!(f.absent(2, b"c", t0));
        assert_eq!(f.len(), (2, 1));
        f.drop_dir(2);
        assert_eq!(f.len(), (1, 0));
        assert!(!f.absent(2, b"anything", t0));
    }

    #[test]
    fn off_takes_nothing_on_and_bounds_hold() {
        let t0 = Instant::now();
        let mut off = FreshDirs::new(Duration::ZERO);
        off.created(1, t0);
        assert!(!off.absent(1, b"a", t0));
        let mut f = FreshDirs::new(Duration::from_millis(1));
        for d in 0..MAX_DIRS as u64 {
            f.created(d, t0);
        }
        assert_eq!(f.len().0, MAX_DIRS);
        // Full: a new one is taken on only once expired ones are swept.
        f.created(u64::MAX, t0);
        assert!(!f.absent(u64::MAX, b"a", t0));
        f.created(u64::MAX, t0 + Duration::from_secs(1));
        assert_eq!(f.len().0, 1);
        f.clear();
        assert_eq!(f.len(), (0, 0));
    }
}
