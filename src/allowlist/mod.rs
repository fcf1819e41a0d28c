//! Default-deny path allowlists: the model, the `/etc/qtfs/whitelist` parser and writer,
//! path validation and matching, and the `qtcfg` front end.
//!
//! The file format (see `docs/allowlists.md`) is INI-like: one section per [`ListType`]
//! (`[Open]` ... `[Udsconnect]`, names case-insensitive) holding entries either as
//! `Path=/a;/b` lines (the original's style) or as one absolute path per line.
//!
//! Every entry is stored lexically normalised, so matching is a byte comparison plus a
//! component-boundary check: [`Allowlist::allows`] runs on every bridged file operation and
//! must stay cheap and allocation-free for already-normal paths.
//!
//! Concurrency: an [`Allowlist`] is a plain value; daemons share one behind
//! [`SharedAllowlist`] (a read-mostly lock) so a live change applies to the next request.
//! [`Allowlist::save_atomic`] replaces the file with a rename, so a concurrent reader of the
//! file sees either the old or the new content, never a torn one.

pub mod qtcfg;
mod types;

pub use types::{ListType, UnknownListType};

use std::borrow::Cow;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The longest path accepted (bytes), as the kernel's PATH_MAX: 4096 including the NUL.
pub const PATH_MAX: usize = 4096;

/// Mode of a whitelist file created from scratch: it says what the peer may touch, so only
/// root reads or writes it.
const NEW_FILE_MODE: u32 = 0o600;

/// An allowlist shared by a daemon's request handlers and its control socket.
pub type SharedAllowlist = Arc<RwLock<Allowlist>>;

/// Entry style used when writing a whitelist file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EntryStyle {
    /// `Path=/a;/b` under each section (the original's style).
    #[default]
    PathList,
    /// One path per line under each section.
    Lines,
}

/// The section names, for error messages.
const VALID_SECTIONS: &str = "[Open], [Write], [Read], [Readdir], [Mkdir], [Rmdir], [Create], \
     [Unlink], [Rename], [Setattr], [Setxattr], [Mount], [Kill], [Udsconnect]";

/// Errors from parsing, validating, editing, loading or saving allowlists.
#[derive(Debug, thiserror::Error)]
pub enum AllowlistError {
    /// An empty path.
    #[error("empty path: give an absolute path such as /var/lib/docker")]
    EmptyPath,
    /// A path not starting with `/`.
    #[error("{path:?} is a relative path: allowlist paths must be absolute (start with /)")]
    RelativePath { path: String },
    /// A path with a NUL byte, which no kernel path can contain.
    #[error("path contains a NUL byte: remove it")]
    NulInPath,
    /// A path of PATH_MAX bytes or more.
    #[error("path is {len} bytes long: paths must be shorter than {PATH_MAX} bytes (PATH_MAX)")]
    PathTooLong { len: usize },
    /// An entry with a control character (newline, tab, ...), which the whitelist file
    /// cannot hold without changing its meaning.
    #[error("{path:?} contains a control character: allowlist entries cannot hold newlines, tabs or other control characters")]
    ControlCharacter { path: String },
    /// An entry ending in whitespace, which the whitelist file trims away.
    #[error("{path:?} ends with whitespace, which the whitelist file cannot keep: remove it")]
    TrailingWhitespace { path: String },
    /// A whitelist file someone other than root (or the daemon's user) could change.
    #[error("refusing the whitelist: {why}")]
    Untrusted { why: String },
    /// A `[Section]` that is not one of the fourteen types.
    #[error("{origin}:{line}: unknown section [{name}]: valid sections are {VALID_SECTIONS} (case-insensitive)")]
    UnknownSection {
        origin: String,
        line: usize,
        name: String,
    },
    /// A line starting with `[` but not of the form `[Name]`.
    #[error(
        "{origin}:{line}: malformed section header {text:?}: write it as [Name], e.g. [Udsconnect]"
    )]
    BadSectionHeader {
        origin: String,
        line: usize,
        text: String,
    },
    /// An entry before the first section header.
    #[error("{origin}:{line}: entry before any section: put a section header such as [Open] or [Udsconnect] above it")]
    EntryBeforeSection { origin: String, line: usize },
    /// A `key=value` line whose key is not `Path`.
    #[error("{origin}:{line}: unknown key {key:?}: only Path=/a;/b lines or one absolute path per line are allowed")]
    UnknownKey {
        origin: String,
        line: usize,
        key: String,
    },
    /// An entry whose path is invalid; `source` says why.
    #[error("{origin}:{line}: bad path: {source}")]
    BadPath {
        origin: String,
        line: usize,
        #[source]
        source: Box<AllowlistError>,
    },
    /// `remove` with an index past the end of the list.
    #[error("{}", index_message(*list_type, *index, *len))]
    IndexOutOfRange {
        list_type: ListType,
        index: usize,
        len: usize,
    },
    /// Reading the whitelist file failed (other than it not existing).
    #[error("cannot read allowlist file {}: {source}: check that it is a readable file", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The whitelist file is not UTF-8 text.
    #[error("allowlist file {} is not UTF-8 text: fix or recreate it", path.display())]
    NotUtf8 { path: PathBuf },
    /// Resolving a symlinked whitelist file to its target failed.
    #[error("cannot resolve symlink {}: {source}: fix the link or replace it by a file", path.display())]
    ResolveLink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Creating the temporary file next to the whitelist file failed.
    #[error("cannot create a temporary file in {} to save {}: {source}: check that the directory exists and is writable", dir.display(), path.display())]
    CreateTemp {
        dir: PathBuf,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Writing, chmod-ing or syncing the temporary file failed (e.g. the disk is full).
    #[error("cannot write the new content of {}: {source}: {} is unchanged; free space or fix the file system and retry", path.display(), path.display())]
    WriteTemp {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Renaming the temporary file over the whitelist file failed.
    #[error("cannot replace {}: {source}: it is unchanged; check the directory's permissions", path.display())]
    Rename {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The rename happened but syncing the directory failed: the change may not survive a
    /// power loss.
    #[error("saved {} but could not sync its directory: {source}: the change may be lost on power failure; run `sync`", path.display())]
    SyncDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn index_message(t: ListType, index: usize, len: usize) -> String {
    let range = match len {
        0 => String::from("no valid index"),
        n => format!("0..{}", n - 1),
    };
    format!(
        "index {index} out of range: [{}] has {len} entries ({range}); list them with `qtcfg -z {}`",
        t.section(),
        t.name()
    )
}

/// All allowlists of one daemon, one ordered list of normalised absolute paths per type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    /// Indexed by `ListType as usize` (the order of [`ListType::ALL`]); each list is in index
    /// order, without duplicates, every entry normalised and valid per [`normalize_entry`].
    lists: [Vec<PathBuf>; ListType::ALL.len()],
}

impl Allowlist {
    /// Parses whitelist text (both entry styles). `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Allowlist, AllowlistError> {
        let mut list = Allowlist::default();
        let mut section: Option<ListType> = None;
        // Editors on some systems save a UTF-8 byte order mark; it is not part of line 1.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (i, raw) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if line.starts_with('[') {
                let name = line
                    .strip_prefix('[')
                    .and_then(|l| l.strip_suffix(']'))
                    .map(str::trim)
                    .ok_or_else(|| AllowlistError::BadSectionHeader {
                        origin: origin.to_string(),
                        line: line_no,
                        text: line.to_string(),
                    })?;
                let t = name
                    .parse::<ListType>()
                    .map_err(|_| AllowlistError::UnknownSection {
                        origin: origin.to_string(),
                        line: line_no,
                        name: name.to_string(),
                    })?;
                // A repeated section continues the earlier one (merge).
                section = Some(t);
                continue;
            }
            let Some(t) = section else {
                return Err(AllowlistError::EntryBeforeSection {
                    origin: origin.to_string(),
                    line: line_no,
                });
            };
            let bad_path = |source: AllowlistError| AllowlistError::BadPath {
                origin: origin.to_string(),
                line: line_no,
                source: Box::new(source),
            };
            if line.starts_with('/') {
                // One path per line: `;` and `=` are part of the path here.
                list.add(t, line).map_err(bad_path)?;
            } else if let Some((key, value)) = line.split_once('=') {
                let key = key.trim();
                if !key.eq_ignore_ascii_case("Path") {
                    return Err(AllowlistError::UnknownKey {
                        origin: origin.to_string(),
                        line: line_no,
                        key: key.to_string(),
                    });
                }
                for item in value.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                    list.add(t, item).map_err(bad_path)?;
                }
            } else {
                // Neither a path nor Path=: report why the text is not a path.
                let why =
                    normalize_entry(line)
                        .err()
                        .unwrap_or_else(|| AllowlistError::RelativePath {
                            path: line.to_string(),
                        });
                return Err(bad_path(why));
            }
        }
        Ok(list)
    }

    /// Loads a whitelist file; a missing file is an empty (deny-all) allowlist.
    pub fn load(path: &Path) -> Result<Allowlist, AllowlistError> {
        let read_err = |source| AllowlistError::Read {
            path: path.to_path_buf(),
            source,
        };
        let real = match fs::canonicalize(path) {
            Ok(real) => real,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Allowlist::default()),
            Err(e) => return Err(read_err(e)),
        };
        // The file says what the peer may touch here: refuse one that someone else could
        // rewrite (the file, or a directory above it, not root's or ours, or writable by
        // group or others).
        let owners = crate::daemon::trust::trusted_owners();
        let mut file = fs::File::open(&real).map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        let why = match crate::daemon::trust::check_file(&meta, &owners) {
            Some(why) => Some(why),
            None => crate::daemon::trust::check_dirs(&real, &owners).map_err(read_err)?,
        };
        if let Some(why) = why {
            return Err(AllowlistError::Untrusted {
                why: why.explain(path),
            });
        }
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut file, &mut bytes).map_err(read_err)?;
        let text = String::from_utf8(bytes).map_err(|_| AllowlistError::NotUtf8 {
            path: path.to_path_buf(),
        })?;
        Allowlist::parse(&text, &path.display().to_string())
    }

    /// Renders whitelist text in the given style; parse(render(x)) == x.
    ///
    /// Types without entries are omitted. In [`EntryStyle::PathList`] an entry containing
    /// `;` (the list separator) is written on a line of its own, which keeps its index.
    pub fn render(&self, style: EntryStyle) -> String {
        let mut out = String::from(
            "# dpuctl allowlists (qtfs whitelist format), written by dpuctl.\n\
             # Default deny: each [Type] lists the absolute paths (and everything below them)\n\
             # that operation may touch. Edit with `qtcfg`; comments here are not kept.\n",
        );
        for t in ListType::ALL {
            let entries = self.entries(t);
            if entries.is_empty() {
                continue;
            }
            let _ = write!(out, "\n[{}]\n", t.section());
            match style {
                EntryStyle::Lines => {
                    for e in entries {
                        out.push_str(&e.to_string_lossy());
                        out.push('\n');
                    }
                }
                EntryStyle::PathList => {
                    let mut group: Vec<Cow<'_, str>> = Vec::new();
                    for e in entries {
                        let s = e.to_string_lossy();
                        if s.contains(';') {
                            flush_path_group(&mut out, &mut group);
                            out.push_str(&s);
                            out.push('\n');
                        } else {
                            group.push(s);
                        }
                    }
                    flush_path_group(&mut out, &mut group);
                }
            }
        }
        out
    }

    /// Writes the file atomically (temp file in the same directory + rename), keeping the
    /// existing file's mode (0600 for a new file).
    ///
    /// A symlink at `path` is followed so the link's target is replaced, not the link. On
    /// any failure before the rename, the old file is untouched and the temp file removed.
    pub fn save_atomic(&self, path: &Path, style: EntryStyle) -> Result<(), AllowlistError> {
        let target = match fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                fs::canonicalize(path).map_err(|source| AllowlistError::ResolveLink {
                    path: path.to_path_buf(),
                    source,
                })?
            }
            _ => path.to_path_buf(),
        };
        write_atomic(&target, self.render(style).as_bytes())
    }

    /// Entries of one type, in index order.
    pub fn entries(&self, t: ListType) -> &[PathBuf] {
        &self.lists[t as usize]
    }

    /// Adds a validated, normalised path; returns its index. Adding an existing path is
    /// not an error and returns the existing index.
    pub fn add(&mut self, t: ListType, path: &str) -> Result<usize, AllowlistError> {
        let p = normalize_entry(path)?;
        let list = &mut self.lists[t as usize];
        if let Some(i) = list.iter().position(|e| *e == p) {
            return Ok(i);
        }
        list.push(p);
        Ok(list.len() - 1)
    }

    /// Removes the entry at `index`; returns the removed path.
    pub fn remove(&mut self, t: ListType, index: usize) -> Result<PathBuf, AllowlistError> {
        let list = &mut self.lists[t as usize];
        if index >= list.len() {
            return Err(AllowlistError::IndexOutOfRange {
                list_type: t,
                index,
                len: list.len(),
            });
        }
        Ok(list.remove(index))
    }

    /// True when `path` (absolute) is an entry of type `t` or lies below one, by whole path
    /// components after normalisation. Default deny: false for an empty list or a bad path.
    pub fn allows(&self, t: ListType, path: &Path) -> bool {
        let list = &self.lists[t as usize];
        if list.is_empty() {
            return false;
        }
        let Ok(p) = normalize_bytes(path.as_os_str().as_bytes()) else {
            return false;
        };
        list.iter()
            .any(|e| covers(e.as_os_str().as_bytes(), p.as_ref()))
    }

    /// The lists as the control socket answers them: `{"udsconnect": ["/a", ...], ...}`,
    /// every type (also empty ones) when `only` is `None`, else just that type.
    pub fn to_json(&self, only: Option<ListType>) -> serde_json::Map<String, serde_json::Value> {
        ListType::ALL
            .into_iter()
            .filter(|t| only.is_none() || only == Some(*t))
            .map(|t| {
                let paths = self
                    .entries(t)
                    .iter()
                    .map(|p| serde_json::Value::String(p.to_string_lossy().into_owned()))
                    .collect();
                (t.name().to_string(), serde_json::Value::Array(paths))
            })
            .collect()
    }
}

/// Writes the pending `;`-free entries as one `Path=` line.
fn flush_path_group(out: &mut String, group: &mut Vec<Cow<'_, str>>) {
    if group.is_empty() {
        return;
    }
    out.push_str("Path=");
    out.push_str(&group.join(";"));
    out.push('\n');
    group.clear();
}

/// True when normalised `entry` equals normalised `path` or is a whole-component prefix of it.
fn covers(entry: &[u8], path: &[u8]) -> bool {
    if entry == b"/" {
        return true;
    }
    match path.strip_prefix(entry) {
        Some(rest) => rest.is_empty() || rest[0] == b'/',
        None => false,
    }
}

/// Validates and lexically normalises an absolute path (`//`, `.`, `..` folded; `..` never
/// climbs above `/`). Rejects empty, relative, NUL-containing and >= PATH_MAX paths.
pub fn normalize(path: &str) -> Result<PathBuf, AllowlistError> {
    let p = normalize_bytes(path.as_bytes())?;
    Ok(PathBuf::from(std::ffi::OsString::from_vec(p.into_owned())))
}

/// [`normalize`] for any path, also one that is not valid UTF-8 (a socket or file name on the
/// machine being checked can be any bytes; entries under which it lies are text).
pub fn normalize_path(path: &Path) -> Result<PathBuf, AllowlistError> {
    let p = normalize_bytes(path.as_os_str().as_bytes())?;
    Ok(PathBuf::from(std::ffi::OsString::from_vec(p.into_owned())))
}

/// [`normalize`] plus what an allowlist entry must also satisfy to survive a round trip
/// through the whitelist file: no control characters and no trailing whitespace.
/// [`Allowlist::add`] and `qtcfg` validate with this.
pub fn normalize_entry(path: &str) -> Result<PathBuf, AllowlistError> {
    let p = normalize(path)?;
    if path.chars().any(char::is_control) {
        return Err(AllowlistError::ControlCharacter {
            path: path.to_string(),
        });
    }
    // Checked on the normalised form: `/a /` becomes `/a `.
    let text = p.to_string_lossy();
    if text.trim_end() != text {
        return Err(AllowlistError::TrailingWhitespace {
            path: path.to_string(),
        });
    }
    Ok(p)
}

/// The byte-level core of [`normalize`]; borrows when the input is already normal, which is
/// the common case on the per-operation [`Allowlist::allows`] path.
fn normalize_bytes(p: &[u8]) -> Result<Cow<'_, [u8]>, AllowlistError> {
    if p.is_empty() {
        return Err(AllowlistError::EmptyPath);
    }
    if p.contains(&0) {
        return Err(AllowlistError::NulInPath);
    }
    if p.len() >= PATH_MAX {
        return Err(AllowlistError::PathTooLong { len: p.len() });
    }
    if p[0] != b'/' {
        return Err(AllowlistError::RelativePath {
            path: String::from_utf8_lossy(p).into_owned(),
        });
    }
    if is_normal(p) {
        return Ok(Cow::Borrowed(p));
    }
    let mut out: Vec<u8> = Vec::with_capacity(p.len());
    for comp in p.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                // Pop the last component; at the root `..` stays at the root.
                let cut = out.iter().rposition(|b| *b == b'/').unwrap_or(0);
                out.truncate(cut);
            }
            c => {
                out.push(b'/');
                out.extend_from_slice(c);
            }
        }
    }
    if out.is_empty() {
        out.push(b'/');
    }
    Ok(Cow::Owned(out))
}

/// An absolute path with no empty, `.` or `..` component and no trailing `/` (or just `/`).
fn is_normal(p: &[u8]) -> bool {
    if p == b"/" {
        return true;
    }
    p.len() > 1
        && p[1..]
            .split(|b| *b == b'/')
            .all(|c| !matches!(c, b"" | b"." | b".."))
}

/// Replaces `path` with `contents` via a same-directory temp file and a rename.
fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), AllowlistError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let old = fs::metadata(path).ok();
    let mode = old
        .as_ref()
        .map_or(NEW_FILE_MODE, |m| m.permissions().mode() & 0o7777);
    let file_name = path.file_name().unwrap_or(OsStr::new("whitelist"));

    let (tmp_path, mut file) =
        create_temp(&dir, file_name).map_err(|source| AllowlistError::CreateTemp {
            dir: dir.clone(),
            path: path.to_path_buf(),
            source,
        })?;
    let written = (|| -> io::Result<()> {
        file.write_all(contents)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        // Keep the owner when root rewrites a file another account owns (root can always
        // chown; anyone else keeps their own files, so there is nothing to restore).
        if let Some(m) = &old {
            if nix::unistd::geteuid().is_root() && (m.uid() != 0 || m.gid() != 0) {
                std::os::unix::fs::fchown(&file, Some(m.uid()), Some(m.gid()))?;
            }
        }
        file.sync_all()
    })();
    drop(file);
    if let Err(source) = written {
        let _ = fs::remove_file(&tmp_path);
        return Err(AllowlistError::WriteTemp {
            path: path.to_path_buf(),
            source,
        });
    }
    if let Err(source) = fs::rename(&tmp_path, path) {
        let _ = fs::remove_file(&tmp_path);
        return Err(AllowlistError::Rename {
            path: path.to_path_buf(),
            source,
        });
    }
    // The rename is durable only once the directory entry is on disk.
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| AllowlistError::SyncDir {
            path: path.to_path_buf(),
            source,
        })
}

/// Creates `.<name>.<random>.tmp` in `dir` with O_EXCL so an attacker's pre-placed file or
/// symlink is never written through.
fn create_temp(dir: &Path, name: &OsStr) -> io::Result<(PathBuf, File)> {
    let mut last = io::Error::from(io::ErrorKind::AlreadyExists);
    for _ in 0..8 {
        let mut rnd = [0u8; 8];
        getrandom::fill(&mut rnd).map_err(|e| io::Error::other(e.to_string()))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{:016x}.tmp", u64::from_ne_bytes(rnd)));
        let tmp = dir.join(tmp_name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(NEW_FILE_MODE)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests;
