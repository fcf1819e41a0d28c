//! The pre-shared key file (`dpuctl keygen`, `/etc/dpuctl/psk`).
//!
//! Format (docs/protocol.md §6): exactly 64 hexadecimal characters (the 32 key bytes,
//! either case) optionally followed by a single `\n`. Nothing else — no comments, no
//! whitespace — so a truncated or edited copy is detected instead of silently yielding a
//! different key. The file must not be accessible by group or others (mode 0600 or 0400).
//!
//! Writing is atomic: the key goes to an `O_EXCL` temporary file in the same directory with
//! mode 0600, is fsynced, then linked (no overwrite) or renamed (overwrite) into place, so a
//! crash never leaves a half-written key and two concurrent `keygen` runs cannot both win.
//!
//! Concurrency: pure functions over the filesystem; a [`Psk`] is immutable and shared via `Arc`.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Where `dpuctl keygen` writes and daemons read the key by default.
pub const DEFAULT_KEY_PATH: &str = "/etc/dpuctl/psk";

/// Key length in bytes.
pub const KEY_LEN: usize = 32;

/// A pre-shared key (32 random bytes). `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Psk([u8; KEY_LEN]);

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Psk(..)")
    }
}

/// Why a key could not be loaded, generated or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No file at the path.
    #[error("no key at {}: create one with `dpuctl keygen {}` and copy the same file to the other side, or set `insecure = true` for a test setup", .path.display(), .path.display())]
    Missing {
        /// The key path.
        path: PathBuf,
    },
    /// The file exists but could not be opened or read.
    #[error("cannot read key file {}: {source} (run as root, or as the user owning the key)", .path.display())]
    Read {
        /// The key path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Group or others may read or write the key.
    #[error("key file {} has mode {mode:04o}, which lets group or others access it: run `chmod 600 {}`", .path.display(), .path.display())]
    TooOpen {
        /// The key path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Not 64 hex characters plus an optional newline.
    #[error("key file {} is malformed ({detail}): it must hold exactly 64 hex characters; delete it, run `dpuctl keygen {}` and copy the new file to the other side", .path.display(), .path.display())]
    Malformed {
        /// The key path.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// `write_new` without overwrite and a key already exists.
    #[error("a key already exists at {}: keep it, or replace it with `dpuctl keygen --force {path}` (then copy the new file to the other side)", .path.display())]
    Exists {
        /// The key path.
        path: PathBuf,
    },
    /// The parent directory could not be created.
    #[error("cannot create directory {}: {source}", .dir.display())]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Writing the new key failed.
    #[error("cannot write key file {}: {source}", .path.display())]
    Write {
        /// The key path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The OS random number generator failed.
    #[error("cannot get random bytes from the operating system: {0}")]
    Random(String),
}

/// Fills `buf` from the OS CSPRNG.
pub(crate) fn random_bytes(buf: &mut [u8]) -> Result<(), String> {
    getrandom::fill(buf).map_err(|e| e.to_string())
}

impl Psk {
    /// A new random key.
    ///
    /// # Panics
    /// If the operating system's random generator fails (getrandom(2) does not fail on a
    /// running Linux system); use [`Psk::try_generate`] to handle that as an error.
    pub fn generate() -> Psk {
        match Psk::try_generate() {
            Ok(k) => k,
            Err(e) => panic!("{e}"),
        }
    }

    /// A new random key, reporting a failing random generator as an error.
    pub fn try_generate() -> Result<Psk, KeyError> {
        let mut b = [0u8; KEY_LEN];
        random_bytes(&mut b).map_err(KeyError::Random)?;
        Ok(Psk(b))
    }

    /// A key from raw bytes (tests, or keys provisioned by other tooling).
    pub fn from_bytes(b: [u8; KEY_LEN]) -> Psk {
        Psk(b)
    }

    /// The raw key bytes (for the HMAC; never log them).
    pub(crate) fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The file contents for this key: 64 lowercase hex characters and a newline.
    pub fn to_file_contents(&self) -> String {
        let mut s = String::with_capacity(2 * KEY_LEN + 1);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        s.push('\n');
        s
    }

    /// Parses file contents (see the module doc for the format).
    pub fn parse(contents: &[u8], path: &Path) -> Result<Psk, KeyError> {
        let malformed = |detail: String| KeyError::Malformed {
            path: path.to_path_buf(),
            detail,
        };
        let hex = contents.strip_suffix(b"\n").unwrap_or(contents);
        if hex.len() != 2 * KEY_LEN {
            return Err(malformed(format!(
                "{} bytes where 64 hex characters (and an optional newline) were expected",
                contents.len()
            )));
        }
        let mut key = [0u8; KEY_LEN];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            let (Some(hi), Some(lo)) = (hex_val(pair[0]), hex_val(pair[1])) else {
                return Err(malformed(format!(
                    "non-hex character at offset {}",
                    if hex_val(pair[0]).is_none() {
                        2 * i
                    } else {
                        2 * i + 1
                    }
                )));
            };
            key[i] = (hi << 4) | lo;
        }
        Ok(Psk(key))
    }

    /// Loads the key file, refusing one that group or others can access.
    pub fn load(path: &Path) -> Result<Psk, KeyError> {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(KeyError::Missing {
                    path: path.to_path_buf(),
                })
            }
            Err(source) => {
                return Err(KeyError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        // fstat the opened file, not the path: no window for a swap between check and read.
        let meta = file.metadata().map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::TooOpen {
                path: path.to_path_buf(),
                mode,
            });
        }
        if !meta.is_file() {
            return Err(KeyError::Malformed {
                path: path.to_path_buf(),
                detail: "not a regular file".into(),
            });
        }
        // Read one byte more than a valid file can hold, so an oversized file is reported
        // without reading all of it.
        let mut buf = Vec::with_capacity(2 * KEY_LEN + 2);
        file.take(2 * KEY_LEN as u64 + 2)
            .read_to_end(&mut buf)
            .map_err(|source| KeyError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        Psk::parse(&buf, path)
    }

    /// Generates a key and writes it to `path` with mode 0600, creating missing parent
    /// directories with mode 0700. Refuses to replace an existing key unless `overwrite`.
    pub fn write_new(path: &Path, overwrite: bool) -> Result<Psk, KeyError> {
        let write_err = |source: io::Error| KeyError::Write {
            path: path.to_path_buf(),
            source,
        };
        if !overwrite && std::fs::symlink_metadata(path).is_ok() {
            return Err(KeyError::Exists {
                path: path.to_path_buf(),
            });
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| KeyError::CreateDir {
                dir: dir.clone(),
                source,
            })?;
        let key = Psk::try_generate()?;

        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "psk".into());
        let mut suffix = [0u8; 8];
        random_bytes(&mut suffix).map_err(KeyError::Random)?;
        let tmp = dir.join(format!(
            ".{file_name}.tmp.{}.{:016x}",
            std::process::id(),
            u64::from_ne_bytes(suffix)
        ));
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            // The umask may have removed bits from 0600 (e.g. 0277 -> 0400, unreadable to the
            // owner's tools expecting 0600); set it exactly.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(key.to_file_contents().as_bytes())?;
            f.sync_all()?;
            if overwrite {
                std::fs::rename(&tmp, path)?;
            } else {
                // link(2) fails with EEXIST instead of replacing: atomic no-clobber.
                std::fs::hard_link(&tmp, path)?;
                std::fs::remove_file(&tmp)?;
            }
            // Persist the directory entry too.
            std::fs::File::open(&dir)?.sync_all()
        })();
        match result {
            Ok(()) => Ok(key),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                if e.kind() == io::ErrorKind::AlreadyExists {
                    Err(KeyError::Exists {
                        path: path.to_path_buf(),
                    })
                } else {
                    Err(write_err(e))
                }
            }
        }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_bytes() {
        let k = Psk::from_bytes([0xab; 32]);
        assert_eq!(format!("{k:?}"), "Psk(..)");
        assert_ne!(Psk::generate(), Psk::generate());
    }

    #[test]
    fn write_then_load_round_trips_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new/sub/psk");
        let k = Psk::write_new(&path, false).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let parent = std::fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!(parent.permissions().mode() & 0o777, 0o700);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 65);
        assert!(text.ends_with('\n'));
        assert_eq!(Psk::load(&path).unwrap(), k);
        // No temp files left behind.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );

        let err = Psk::write_new(&path, false).unwrap_err();
        assert!(matches!(err, KeyError::Exists { .. }), "{err}");
        assert_eq!(
            Psk::load(&path).unwrap(),
            k,
            "refused write left the key intact"
        );
        let k2 = Psk::write_new(&path, true).unwrap();
        assert_ne!(k2, k);
        assert_eq!(Psk::load(&path).unwrap(), k2);
    }

    #[test]
    fn load_refuses_open_modes_and_says_chmod() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("psk");
        Psk::write_new(&path, false).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = Psk::load(&path).unwrap_err();
            assert!(matches!(err, KeyError::TooOpen { .. }), "{mode:o}: {err}");
            assert!(
                err.to_string()
                    .contains(&format!("chmod 600 {}", path.display())),
                "{err}"
            );
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(Psk::load(&path).is_ok());
    }

    #[test]
    fn missing_key_message_tells_how_to_create_one() {
        let err = Psk::load(Path::new("/nonexistent/dpuctl/psk")).unwrap_err();
        assert!(matches!(err, KeyError::Missing { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("dpuctl keygen /nonexistent/dpuctl/psk"),
            "{msg}"
        );
        assert!(msg.contains("insecure = true"), "{msg}");
    }

    #[test]
    fn parse_accepts_exactly_the_documented_format() {
        let p = Path::new("k");
        let hex = "00112233445566778899aabbccddeeffFFEEDDCCBBAA99887766554433221100";
        let k = Psk::parse(hex.as_bytes(), p).unwrap();
        assert_eq!(k.as_bytes()[1], 0x11);
        assert_eq!(k.as_bytes()[16], 0xff);
        assert_eq!(Psk::parse(format!("{hex}\n").as_bytes(), p).unwrap(), k);
        for bad in [
            format!("{hex}\n\n"),
            format!("{hex} "),
            format!(" {hex}"),
            hex[..63].to_string(),
            format!("{}g", &hex[..63]),
            String::new(),
        ] {
            let err = Psk::parse(bad.as_bytes(), p).unwrap_err();
            assert!(matches!(err, KeyError::Malformed { .. }), "{bad:?}");
        }
        assert_eq!(Psk::parse(k.to_file_contents().as_bytes(), p).unwrap(), k);
    }
}
