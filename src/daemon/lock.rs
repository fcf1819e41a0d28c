//! The per-daemon instance lock: `<run_dir>/<name>.lock`, held with a non-blocking exclusive
//! `flock(2)` for the daemon's lifetime, with the holder's pid written inside for the error
//! message of the next one.
//!
//! Concurrency: `flock` locks belong to the open file description, so a second
//! [`Lock::acquire`] conflicts even from the same process, and the kernel releases the lock
//! when the process dies, however it dies — no stale-lock cleanup is ever needed. The lock
//! file itself is left in place on release: unlinking it would let a third process lock a
//! fresh inode while a second one still waits on the old one.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Errors of [`Lock::acquire`].
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "cannot create the run directory {path}: {source}; run as root or pick another --run-dir"
    )]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the lock file {path}: {source}; run as root or pick another --run-dir")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another {name} is already running ({}, lock {}): stop it first, or start this one \
         with another --run-dir",
        pid_text(*.pid),
        .path.display()
    )]
    Held {
        name: String,
        /// The holder's pid as it wrote it; `None` if it had not written it yet.
        pid: Option<u32>,
        path: PathBuf,
    },
    #[error(
        "cannot lock {path}: {source}; is the run directory on a filesystem without flock support?"
    )]
    Flock {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot write our pid into the lock file {path}: {source}; is the filesystem full?")]
    WritePid {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn pid_text(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!("pid {pid}"),
        None => "pid unknown".into(),
    }
}

/// A held instance lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct Lock {
    /// Dropping the `Flock` unlocks; closing the file would too.
    _file: Flock<File>,
    path: PathBuf,
}

impl Lock {
    /// Takes `<run_dir>/<name>.lock`, creating `run_dir` (mode 0755) if missing, and writes
    /// our pid into it. Fails at once with [`LockError::Held`] if another instance holds it.
    pub fn acquire(run_dir: &Path, name: &str) -> Result<Lock, LockError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(run_dir)
            .map_err(|source| LockError::CreateDir {
                path: run_dir.to_owned(),
                source,
            })?;
        let path = run_dir.join(format!("{name}.lock"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            // A symlink planted in the run directory must not make us truncate its target.
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|source| LockError::Open {
                path: path.clone(),
                source,
            })?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let pid = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse().ok());
                return Err(LockError::Held {
                    name: name.to_owned(),
                    pid,
                    path,
                });
            }
            Err((_, source)) => return Err(LockError::Flock { path, source }),
        };
        let write_pid = |file: &mut File| -> std::io::Result<()> {
            file.set_len(0)?;
            file.write_all(format!("{}\n", std::process::id()).as_bytes())
        };
        write_pid(&mut file).map_err(|source| LockError::WritePid {
            path: path.clone(),
            source,
        })?;
        Ok(Lock { _file: file, path })
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn second_acquire_fails_with_the_holders_pid_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let run_dir = dir.path().join("run/qtfs");
        let first = Lock::acquire(&run_dir, "engine").expect("first lock");
        assert_eq!(first.path(), run_dir.join("engine.lock"));
        let mode = std::fs::metadata(&run_dir)
            .expect("run dir")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o077 & !0o055,
            0,
            "run dir not writable by group/others: {mode:o}"
        );
        let content = std::fs::read_to_string(first.path()).expect("lock file");
        assert_eq!(content, format!("{}\n", std::process::id()));

        let err = Lock::acquire(&run_dir, "engine").expect_err("second lock must fail");
        match &err {
            LockError::Held { name, pid, path } => {
                assert_eq!(name, "engine");
                assert_eq!(*pid, Some(std::process::id()));
                assert_eq!(path, first.path());
            }
            other => panic!("expected Held, got {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            format!(
                "another engine is already running (pid {}, lock {}): stop it first, or start \
                 this one with another --run-dir",
                std::process::id(),
                run_dir.join("engine.lock").display()
            )
        );
        // Another name is another lock.
        let _other = Lock::acquire(&run_dir, "udsproxyd").expect("independent lock");

        drop(first);
        let again = Lock::acquire(&run_dir, "engine").expect("released on drop");
        drop(again);
    }

    #[test]
    fn held_without_pid_says_unknown() {
        let err = LockError::Held {
            name: "udsproxyd".into(),
            pid: None,
            path: "/var/run/qtfs/udsproxyd.lock".into(),
        };
        assert_eq!(
            err.to_string(),
            "another udsproxyd is already running (pid unknown, lock /var/run/qtfs/udsproxyd.lock): \
             stop it first, or start this one with another --run-dir"
        );
    }

    #[test]
    fn a_symlinked_lock_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("precious");
        std::fs::write(&target, "keep me").expect("write");
        std::os::unix::fs::symlink(&target, dir.path().join("engine.lock")).expect("symlink");
        let err = Lock::acquire(dir.path(), "engine").expect_err("symlink refused");
        assert!(matches!(err, LockError::Open { .. }), "{err:?}");
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "keep me");
    }
}
