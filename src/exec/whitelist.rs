//! `/etc/rexec/whitelist` and program resolution: the one place that decides whether
//! `rexec_server` may run a command ([`check`]).
//!
//! File format (as the original's): one command per line, either an absolute path
//! (`/usr/bin/qemu-kvm`) or a bare name (`kill`); `#` starts a comment line; blank lines are
//! ignored. With no file every command may run (the original's behaviour; the server warns at
//! start). With a file, a command runs only if
//! - an absolute entry names the resolved program (also compared after resolving symlinks), or
//! - a bare entry equals the program's file name *and* the program lies in one of the
//!   system directories of [`TRUSTED_PATH`] — so `kill` permits `/bin/kill`, never
//!   `/tmp/x/kill`.
//!
//! While a whitelist is in force, bare command names are looked up in [`TRUSTED_PATH`],
//! never in the client's `PATH`, so a client cannot steer name resolution.
//!
//! The file must be owned by root and not writable by group or others, and so must every
//! directory above it (a directory others may write is accepted only with the sticky bit, as
//! `/tmp`), checked on the path with symlinks resolved as sshd's StrictModes does: otherwise
//! anyone who can rename an entry on the way could swap the list. A bad file stops the server
//! at start, and a session arriving after the file went bad is refused.
//!
//! [`Policy`] fails closed: once the server has a whitelist (the file existed at start, was
//! named with `--whitelist`, or has been read since), a missing or unreadable file refuses
//! every command instead of meaning "no restriction".
//!
//! Concurrency: [`Policy`] holds one atomic flag; everything else is pure functions over the
//! filesystem. The server re-reads the file for every session so edits apply at once without
//! a reload.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::daemon::trust::{self, Untrusted};

/// The default whitelist file.
pub const DEFAULT_WHITELIST: &str = "/etc/rexec/whitelist";
/// System directories: where bare names are looked up when a whitelist is in force (and
/// when the client sent no `PATH`), and where a bare whitelist entry may match.
pub const TRUSTED_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Largest whitelist file read (a list of commands; anything bigger is a mistake).
const MAX_FILE: u64 = 1024 * 1024;

/// A loaded whitelist.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Whitelist {
    /// Absolute-path entries.
    pub paths: Vec<PathBuf>,
    /// Bare-name entries.
    pub names: Vec<String>,
}

/// Why the whitelist cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WhitelistError {
    #[error("cannot read the rexec whitelist {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the rexec whitelist {path} is owned by uid {uid}, not root: `chown root:root {path}`"
    )]
    Owner { path: PathBuf, uid: u32 },
    #[error("the rexec whitelist {path} has mode {mode:04o} and is writable by group or others: `chmod 0400 {path}`")]
    Mode { path: PathBuf, mode: u32 },
    #[error("the rexec whitelist {path} lies in {dir}, which is owned by uid {uid}, not root: `chown root {dir}`")]
    DirOwner {
        path: PathBuf,
        dir: PathBuf,
        uid: u32,
    },
    #[error("the rexec whitelist {path} lies in {dir} (mode {mode:04o}), which group or others may write without the sticky bit: `chmod go-w {dir}`")]
    DirMode {
        path: PathBuf,
        dir: PathBuf,
        mode: u32,
    },
    #[error("the rexec whitelist {path} is missing: every command is refused until it is restored (mode 0400, owned by root)")]
    Missing { path: PathBuf },
    #[error(
        "the rexec whitelist {path} is larger than 1 MiB: it should list commands, one per line"
    )]
    TooLarge { path: PathBuf },
    #[error("{path}:{line}: {entry:?} is neither an absolute path nor a bare command name")]
    Entry {
        path: PathBuf,
        line: usize,
        entry: String,
    },
}

/// Why a command cannot run. `errno` is what the client turns into an exit status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}: command not found")]
    NotFound(String),
    #[error("{0}: permission denied (not an executable file)")]
    NotExecutable(String),
    #[error("{0}: not allowed by the rexec whitelist on the server ({1})")]
    NotAllowed(String, String),
    #[error("no command given")]
    Empty,
    #[error("{0}")]
    Whitelist(String),
}

impl Refusal {
    /// The errno sent to the client.
    pub fn errno(&self) -> i32 {
        match self {
            Refusal::NotFound(_) => libc::ENOENT,
            Refusal::NotExecutable(_) => libc::EACCES,
            Refusal::NotAllowed(..) | Refusal::Whitelist(_) => libc::EPERM,
            Refusal::Empty => libc::EINVAL,
        }
    }
}

impl Whitelist {
    /// Loads `path`: `Ok(None)` when the file does not exist. The directories above the file
    /// are checked on its symlink-free path (`check_dirs`); ownership and mode of the file
    /// itself on the opened file (fstat), so a swap between check and read cannot slip through.
    pub fn load(path: &Path) -> Result<Option<Whitelist>, WhitelistError> {
        let read_err = |source| WhitelistError::Read {
            path: path.to_path_buf(),
            source,
        };
        let real = match std::fs::canonicalize(path) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read_err(e)),
        };
        check_dirs(path, &real)?;
        let file = match std::fs::File::open(&real) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read_err(e)),
        };
        let meta = file.metadata().map_err(read_err)?;
        if let Some(why) = trust::check_file(&meta, &[0]) {
            return Err(untrusted(path, why));
        }
        if meta.len() > MAX_FILE {
            return Err(WhitelistError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let mut text = String::new();
        file.take(MAX_FILE)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        Whitelist::parse(&text, path).map(Some)
    }

    /// Parses whitelist text; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Whitelist, WhitelistError> {
        let mut w = Whitelist::default();
        for (i, line) in text.lines().enumerate() {
            let entry = line.trim();
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            if entry.starts_with('/') {
                w.paths.push(PathBuf::from(entry));
            } else if !entry.contains('/') && !entry.contains(char::is_whitespace) {
                w.names.push(entry.to_string());
            } else {
                return Err(WhitelistError::Entry {
                    path: origin.to_path_buf(),
                    line: i + 1,
                    entry: entry.to_string(),
                });
            }
        }
        Ok(w)
    }

    /// True when the resolved absolute program `prog` may run.
    pub fn permits(&self, prog: &Path) -> bool {
        let canonical = std::fs::canonicalize(prog).ok();
        let same = |entry: &Path| {
            entry == prog
                || canonical
                    .as_deref()
                    .is_some_and(|c| std::fs::canonicalize(entry).is_ok_and(|e| e.as_path() == c))
        };
        if self.paths.iter().any(|p| same(p)) {
            return true;
        }
        let (Some(name), Some(dir)) = (prog.file_name(), prog.parent()) else {
            return false;
        };
        self.names.iter().any(|n| OsStr::new(n) == name)
            && std::env::split_paths(TRUSTED_PATH).any(|t| t == dir)
    }
}

/// Checks every directory above `real` (the whitelist `path` with symlinks resolved): each
/// must be owned by root and not writable by group or others unless it has the sticky bit
/// (where others may add entries but not rename or remove root's). The path is free of
/// symlinks and every directory on it is root's, so nobody else can redirect it afterwards.
fn check_dirs(path: &Path, real: &Path) -> Result<(), WhitelistError> {
    let found = trust::check_dirs(real, &[0]).map_err(|source| WhitelistError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    found.map_or(Ok(()), |why| Err(untrusted(path, why)))
}

/// The refusal of the whitelist `path` for `why`.
fn untrusted(path: &Path, why: Untrusted) -> WhitelistError {
    let path = path.to_path_buf();
    match why {
        Untrusted::Owner { uid } => WhitelistError::Owner { path, uid },
        Untrusted::Mode { mode } => WhitelistError::Mode { path, mode },
        Untrusted::DirOwner { dir, uid } => WhitelistError::DirOwner { path, dir, uid },
        Untrusted::DirMode { dir, mode } => WhitelistError::DirMode { path, dir, mode },
    }
}

/// The server's whitelist: its file and whether one is in force. A missing file means "no
/// restriction" only as long as the server has never had a whitelist; from the moment it has
/// (the file existed at start, was named explicitly, or appeared since), a missing file
/// refuses every command — deleting or renaming the file never opens the server up.
#[derive(Debug)]
pub struct Policy {
    path: PathBuf,
    /// Set once a whitelist is in force; never cleared while the server runs. Atomic because
    /// sessions load the policy concurrently; a session that races the first load at worst
    /// reads the file itself, which gives the same answer.
    required: AtomicBool,
}

impl Policy {
    /// The policy for `path`; `required` when the file must exist (named explicitly, or
    /// found at start).
    pub fn new(path: PathBuf, required: bool) -> Policy {
        Policy {
            path,
            required: AtomicBool::new(required),
        }
    }

    /// The whitelist file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when a missing file refuses every command.
    pub fn is_required(&self) -> bool {
        self.required.load(Ordering::Relaxed)
    }

    /// Reads the whitelist now: `Ok(None)` only while no whitelist has ever been in force.
    pub fn load(&self) -> Result<Option<Whitelist>, WhitelistError> {
        match Whitelist::load(&self.path)? {
            None if self.is_required() => Err(WhitelistError::Missing {
                path: self.path.clone(),
            }),
            None => Ok(None),
            Some(w) => {
                self.required.store(true, Ordering::Relaxed);
                Ok(Some(w))
            }
        }
    }
}

/// Resolves `argv0` like execvp: a name containing `/` is taken as is (relative to `cwd`),
/// otherwise it is looked up in `search_path`.
pub fn resolve(argv0: &[u8], search_path: &OsStr, cwd: &Path) -> Result<PathBuf, Refusal> {
    let shown = String::from_utf8_lossy(argv0).into_owned();
    if argv0.is_empty() {
        return Err(Refusal::Empty);
    }
    let name = Path::new(OsStr::from_bytes(argv0));
    if argv0.contains(&b'/') {
        let p = if name.is_absolute() {
            name.to_path_buf()
        } else {
            cwd.join(name)
        };
        return match executable(&p) {
            Some(true) => Ok(p),
            Some(false) => Err(Refusal::NotExecutable(shown)),
            None => Err(Refusal::NotFound(shown)),
        };
    }
    let mut found_non_exec = false;
    for dir in std::env::split_paths(search_path) {
        let dir = if dir.as_os_str().is_empty() {
            cwd.to_path_buf()
        } else if dir.is_relative() {
            cwd.join(dir)
        } else {
            dir
        };
        let p = dir.join(name);
        match executable(&p) {
            Some(true) => return Ok(p),
            Some(false) => found_non_exec = true,
            None => {}
        }
    }
    if found_non_exec {
        Err(Refusal::NotExecutable(shown))
    } else {
        Err(Refusal::NotFound(shown))
    }
}

/// `None`: does not exist; `Some(false)`: exists but is not an executable regular file.
fn executable(p: &Path) -> Option<bool> {
    let meta = std::fs::metadata(p).ok()?;
    Some(meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// The single allow decision for a session: resolves `argv[0]` and applies the whitelist of
/// `policy` (a whitelist that cannot be read refuses; `None`, `--no-whitelist`: none).
/// Returns the program to execute.
pub fn check(
    policy: Option<&Policy>,
    argv0: &[u8],
    client_path: Option<&OsStr>,
    cwd: &Path,
) -> Result<PathBuf, Refusal> {
    let Some(policy) = policy else {
        return resolve(argv0, client_path.unwrap_or(OsStr::new(TRUSTED_PATH)), cwd);
    };
    let whitelist = policy.path();
    let list = policy
        .load()
        .map_err(|e| Refusal::Whitelist(e.to_string()))?;
    let search = match (&list, client_path) {
        (None, Some(p)) => p,
        _ => OsStr::new(TRUSTED_PATH),
    };
    let prog = resolve(argv0, search, cwd)?;
    match list {
        Some(list) if !list.permits(&prog) => Err(Refusal::NotAllowed(
            prog.display().to_string(),
            whitelist.display().to_string(),
        )),
        _ => Ok(prog),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_entries_and_errors() {
        let w = Whitelist::parse(
            "# comment\n/usr/bin/qemu-kvm\n\n  kill  \nmodprobe\n",
            Path::new("w"),
        )
        .unwrap();
        assert_eq!(w.paths, vec![PathBuf::from("/usr/bin/qemu-kvm")]);
        assert_eq!(w.names, vec!["kill".to_string(), "modprobe".to_string()]);
        let e = Whitelist::parse("bin/ls\n", Path::new("w")).unwrap_err();
        assert!(e.to_string().contains("w:1"), "{e}");
    }

    #[test]
    fn names_match_only_in_system_dirs() {
        let w = Whitelist::parse("true\n/bin/echo\n", Path::new("w")).unwrap();
        assert!(w.permits(Path::new("/usr/bin/true")));
        assert!(!w.permits(Path::new("/tmp/evil/true")));
        assert!(w.permits(Path::new("/bin/echo")));
        assert!(!w.permits(Path::new("/usr/bin/cat")));
    }

    #[test]
    fn resolve_like_execvp() {
        let cwd = Path::new("/");
        let p = resolve(b"sh", OsStr::new(TRUSTED_PATH), cwd).unwrap();
        assert_eq!(p.file_name().unwrap(), "sh");
        assert_eq!(
            resolve(b"no-such-cmd-xyz", OsStr::new(TRUSTED_PATH), cwd),
            Err(Refusal::NotFound("no-such-cmd-xyz".into()))
        );
        assert_eq!(
            resolve(b"/etc/passwd", OsStr::new(TRUSTED_PATH), cwd),
            Err(Refusal::NotExecutable("/etc/passwd".into()))
        );
        assert_eq!(
            resolve(b"/etc", OsStr::new(""), cwd),
            Err(Refusal::NotExecutable("/etc".into()))
        );
        assert_eq!(resolve(b"", OsStr::new(""), cwd), Err(Refusal::Empty));
        assert_eq!(Refusal::NotFound(String::new()).errno(), libc::ENOENT);
    }

    #[test]
    fn file_checks_owner_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("whitelist");
        assert!(Whitelist::load(&p).unwrap().is_none());
        std::fs::write(&p, "true\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        let is_root = nix::unistd::geteuid().is_root();
        if is_root {
            assert_eq!(Whitelist::load(&p).unwrap().unwrap().names, vec!["true"]);
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o620)).unwrap();
            let e = Whitelist::load(&p).unwrap_err();
            assert!(matches!(e, WhitelistError::Mode { mode: 0o620, .. }), "{e}");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
            std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
        }
        let e = Whitelist::load(&p).unwrap_err();
        assert!(matches!(e, WhitelistError::Owner { .. }), "{e}");
        let r = check(Some(&Policy::new(p, false)), b"true", None, Path::new("/")).unwrap_err();
        assert_eq!(r.errno(), libc::EPERM);
    }

    #[test]
    fn a_whitelist_once_in_force_fails_closed_when_it_goes() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: the whitelist must be owned by root; run the tests as root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("whitelist");
        let cwd = Path::new("/");
        // No file at start and none named: no restriction, until a file appears.
        let open = Policy::new(p.clone(), false);
        assert!(check(Some(&open), b"cat", None, cwd).is_ok());
        std::fs::write(&p, "true\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(check(Some(&open), b"true", None, cwd).is_ok());
        assert!(matches!(
            check(Some(&open), b"cat", None, cwd),
            Err(Refusal::NotAllowed(..))
        ));
        // Renamed away: everything is refused, naming the file.
        std::fs::rename(&p, dir.path().join("whitelist.bak")).unwrap();
        for policy in [&open, &Policy::new(p.clone(), true)] {
            for argv0 in [&b"true"[..], b"cat", b"/bin/ls"] {
                let r = check(Some(policy), argv0, None, cwd).unwrap_err();
                assert!(
                    matches!(&r, Refusal::Whitelist(m) if m.contains("whitelist") && m.contains("missing")),
                    "{r}"
                );
                assert_eq!(r.errno(), libc::EPERM);
            }
        }
        // Unreadable (a directory in its place) refuses too.
        std::fs::create_dir(&p).unwrap();
        assert!(matches!(
            check(Some(&open), b"true", None, cwd),
            Err(Refusal::Whitelist(_))
        ));
    }

    #[test]
    fn every_directory_above_the_file_is_checked() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: the whitelist must be owned by root; run the tests as root");
            return;
        }
        let top = tempfile::tempdir().unwrap();
        let mid = top.path().join("a");
        let sub = mid.join("b");
        std::fs::create_dir_all(&sub).unwrap();
        let p = sub.join("whitelist");
        std::fs::write(&p, "true\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(Whitelist::load(&p).unwrap().is_some());
        let chmod =
            |d: &Path, m| std::fs::set_permissions(d, std::fs::Permissions::from_mode(m)).unwrap();
        // A grandparent others may write: refused, naming it.
        chmod(&mid, 0o777);
        let e = Whitelist::load(&p).unwrap_err();
        assert!(
            matches!(&e, WhitelistError::DirMode { dir, mode: 0o777, .. } if dir == &mid),
            "{e}"
        );
        // Through a symlink the real directories are checked.
        let link = top.path().join("link");
        std::os::unix::fs::symlink(&sub, &link).unwrap();
        assert!(matches!(
            Whitelist::load(&link.join("whitelist")),
            Err(WhitelistError::DirMode { .. })
        ));
        // With the sticky bit (as /tmp) it is fine.
        chmod(&mid, 0o1777);
        assert!(Whitelist::load(&p).unwrap().is_some());
        chmod(&mid, 0o755);
        // A parent owned by someone else: refused.
        std::os::unix::fs::chown(&sub, Some(65534), None).unwrap();
        let e = Whitelist::load(&p).unwrap_err();
        assert!(
            matches!(&e, WhitelistError::DirOwner { dir, uid: 65534, .. } if dir == &sub),
            "{e}"
        );
    }
}
