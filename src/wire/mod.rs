//! The wire layer: every byte dpuctl sends between machines goes through here.
//!
//! - [`addr`]: `tcp://host:port`, `vsock://cid:port`, `unix:///path`; bind and connect.
//! - [`frame`]: the length-prefixed frame with a fixed header and a hard maximum size.
//! - [`key`]: the pre-shared key file (`dpuctl keygen`).
//! - [`handshake`]: version negotiation and mutual HMAC challenge/response.
//! - [`link`]: a multiplexed, authenticated connection: many requests in flight, each with an
//!   id, answered out of order; keepalive pings; byte counters.
//!
//! docs/protocol.md specifies the bytes.

pub mod addr;
pub mod frame;
pub mod handshake;
pub mod key;
pub mod link;

pub use addr::{Addr, Listener, Stream};
pub use handshake::{Auth, Hello, PeerInfo, Role};
pub use key::Psk;
pub use link::{CallError, Link, LinkOptions, LinkStats, RemoteError, Service};
