//! The wire layer: every byte dpuctl sends between machines goes through here.
//!
//! - [`addr`]: `tcp://host:port`, `vsock://cid:port`, `unix:///path`; bind and connect.
//! - [`frame`]: the length-prefixed frame with a fixed 16-byte header and a hard maximum size.
//! - [`key`]: the pre-shared key file (`dpuctl keygen`).
//! - [`handshake`]: version negotiation and mutual HMAC-SHA256 challenge/response.
//! - [`link`]: a multiplexed, authenticated connection: many requests in flight, each with an
//!   id, answered out of order; flow-controlled byte streams; keepalive pings; byte counters;
//!   [`dial`] and [`serve`].
//!
//! docs/protocol.md specifies the bytes. No other module reads or writes protocol bytes.
//!
//! Concurrency: a [`Link`] runs its own reader, writer and keepalive tasks; handles are cheap
//! clones usable from any task. [`serve`] handshakes each connection in its own task.

pub mod addr;
pub mod frame;
pub mod handshake;
pub mod key;
pub mod link;

pub use addr::{spare_loopback_port, Addr, AddrError, Listener, Stream};
pub use handshake::{Auth, HandshakeError, Hello, PeerInfo, Role, PROTOCOL_VERSION};
pub use key::{KeyError, Psk, DEFAULT_KEY_PATH};
pub use link::{
    dial, serve, serve_per_link, CallError, DialError, IncomingStream, Link, LinkOptions,
    LinkStats, MakeService, NoService, OnLink, OnReject, RemoteError, Service, StreamReader,
    StreamWriter,
};
