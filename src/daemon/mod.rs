//! Daemon lifecycle and the control plane shared by every daemon.
//!
//! - [`status`]: the status shape (fixed JSON contract).
//! - [`control`]: the JSON control socket: protocol, server, client, discovery.

pub mod control;
pub mod logring;
pub mod status;
