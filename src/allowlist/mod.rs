//! Default-deny path allowlists: the model, the `/etc/qtfs/whitelist` parser and writer,
//! path validation and matching, and the `qtcfg` front end.
//!
//! Concurrency: an [`Allowlist`] is a plain value; daemons share one behind
//! [`SharedAllowlist`] (a read-mostly lock) so a live change applies to the next request.

pub mod qtcfg;
mod types;

pub use types::{ListType, UnknownListType};

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The longest path accepted (bytes), as the kernel's PATH_MAX: 4096 including the NUL.
pub const PATH_MAX: usize = 4096;

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

/// Errors from parsing, validating, editing, loading or saving allowlists.
#[derive(Debug, thiserror::Error)]
pub enum AllowlistError {
    #[error("todo")]
    Todo,
}

/// All allowlists of one daemon, one ordered list of normalised absolute paths per type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {}

impl Allowlist {
    /// Parses whitelist text (both entry styles). `origin` names the file in errors.
    pub fn parse(_text: &str, _origin: &str) -> Result<Allowlist, AllowlistError> {
        todo!()
    }
    /// Loads a whitelist file; a missing file is an empty (deny-all) allowlist.
    pub fn load(_path: &Path) -> Result<Allowlist, AllowlistError> {
        todo!()
    }
    /// Renders whitelist text in the given style; parse(render(x)) == x.
    pub fn render(&self, _style: EntryStyle) -> String {
        todo!()
    }
    /// Writes the file atomically (temp file in the same directory + rename), keeping the
    /// existing file's mode (0600 for a new file).
    pub fn save_atomic(&self, _path: &Path, _style: EntryStyle) -> Result<(), AllowlistError> {
        todo!()
    }
    /// Entries of one type, in index order.
    pub fn entries(&self, _t: ListType) -> &[PathBuf] {
        todo!()
    }
    /// Adds a validated, normalised path; returns its index. Adding an existing path is
    /// not an error and returns the existing index.
    pub fn add(&mut self, _t: ListType, _path: &str) -> Result<usize, AllowlistError> {
        todo!()
    }
    /// Removes the entry at `index`; returns the removed path.
    pub fn remove(&mut self, _t: ListType, _index: usize) -> Result<PathBuf, AllowlistError> {
        todo!()
    }
    /// True when `path` (absolute) is an entry of type `t` or lies below one, by whole path
    /// components after normalisation. Default deny: false for an empty list or a bad path.
    pub fn allows(&self, _t: ListType, _path: &Path) -> bool {
        todo!()
    }
}

/// Validates and lexically normalises an absolute path (`//`, `.`, `..` folded; `..` never
/// climbs above `/`). Rejects empty, relative, NUL-containing and >= PATH_MAX paths.
pub fn normalize(_path: &str) -> Result<PathBuf, AllowlistError> {
    todo!()
}
