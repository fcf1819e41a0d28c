//! Whether a file that decides what a peer may do on this machine (a whitelist) could be
//! changed by someone the daemon does not trust: the file itself, or any directory above it,
//! owned by another user, or writable by group or others (a directory with the sticky bit,
//! such as /tmp, is fine: others may add entries there but not rename or remove ours). The
//! same rules as sshd's StrictModes.
//!
//! Directories are checked on the symlink-free path (canonicalised by the caller), the file on
//! its opened descriptor's metadata, so a swap between the check and the read cannot slip
//! through.

use std::fs::Metadata;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What makes a file untrusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Untrusted {
    /// The file is owned by `uid`, neither root nor the daemon's user.
    Owner { uid: u32 },
    /// The file is writable by group or others.
    Mode { mode: u32 },
    /// Directory `dir` above the file is owned by `uid`.
    DirOwner { dir: PathBuf, uid: u32 },
    /// Directory `dir` above the file is writable by group or others, without the sticky bit.
    DirMode { dir: PathBuf, mode: u32 },
}

/// The owners a daemon trusts: root and the user it runs as.
pub fn trusted_owners() -> [u32; 2] {
    [0, nix::unistd::geteuid().as_raw()]
}

/// Checks every directory above `real` (a canonical path) against `owners`.
pub fn check_dirs(real: &Path, owners: &[u32]) -> io::Result<Option<Untrusted>> {
    for dir in real.ancestors().skip(1) {
        let meta = std::fs::metadata(dir)?;
        if !owners.contains(&meta.uid()) {
            return Ok(Some(Untrusted::DirOwner {
                dir: dir.to_path_buf(),
                uid: meta.uid(),
            }));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Ok(Some(Untrusted::DirMode {
                dir: dir.to_path_buf(),
                mode,
            }));
        }
    }
    Ok(None)
}

/// Checks the metadata of the opened file against `owners`.
pub fn check_file(meta: &Metadata, owners: &[u32]) -> Option<Untrusted> {
    if !owners.contains(&meta.uid()) {
        return Some(Untrusted::Owner { uid: meta.uid() });
    }
    let mode = meta.permissions().mode() & 0o7777;
    (mode & 0o022 != 0).then_some(Untrusted::Mode { mode })
}

impl Untrusted {
    /// Why, and the command that fixes it, for the file `path`.
    pub fn explain(&self, path: &Path) -> String {
        let p = path.display();
        match self {
            Untrusted::Owner { uid } => {
                format!("{p} is owned by uid {uid}, not root: `chown root:root {p}`")
            }
            Untrusted::Mode { mode } => format!(
                "{p} has mode {mode:04o} and is writable by group or others: `chmod go-w {p}`"
            ),
            Untrusted::DirOwner { dir, uid } => format!(
                "{p} lies in {}, which is owned by uid {uid}, not root: `chown root {}`",
                dir.display(),
                dir.display()
            ),
            Untrusted::DirMode { dir, mode } => format!(
                "{p} lies in {} (mode {mode:04o}), which group or others may write without the sticky bit: `chmod go-w {}`",
                dir.display(),
                dir.display()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writable_files_and_directories_are_untrusted_unless_sticky() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let file = sub.join("wl");
        std::fs::write(&file, "").unwrap();
        let me = trusted_owners();
        let real = std::fs::canonicalize(&file).unwrap();
        assert_eq!(check_dirs(&real, &me).unwrap(), None);
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(
            check_dirs(&real, &me).unwrap(),
            Some(Untrusted::DirMode {
                dir: std::fs::canonicalize(&sub).unwrap(),
                mode: 0o777
            })
        );
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert_eq!(check_dirs(&real, &me).unwrap(), None);
        let meta = |m: u32| {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(m)).unwrap();
            std::fs::metadata(&file).unwrap()
        };
        assert_eq!(check_file(&meta(0o644), &me), None);
        assert_eq!(
            check_file(&meta(0o666), &me),
            Some(Untrusted::Mode { mode: 0o666 })
        );
        assert!(matches!(
            check_file(&meta(0o600), &[12345]),
            Some(Untrusted::Owner { .. })
        ));
    }
}
