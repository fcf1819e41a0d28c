//! Transport addresses and the one stream type every transport yields.

use std::path::PathBuf;

/// Where to listen or connect.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Addr {
    /// `tcp://host:port` (host may be a name, IPv4 or `[IPv6]`).
    Tcp(String),
    /// `vsock://cid:port`.
    Vsock { cid: u32, port: u32 },
    /// `unix:///absolute/path`.
    Unix(PathBuf),
}

/// A bound listener on any transport.
pub struct Listener {}

/// A connected byte stream on any transport (implements AsyncRead + AsyncWrite + Unpin).
pub struct Stream {}
