//! Daemon lifecycle and the control plane shared by every daemon.
//!
//! - [`status`]: the status shape (fixed JSON contract).
//! - [`control`]: the JSON control socket: protocol, server, client, discovery.
//! - [`runner`]: what every daemon does the same way (lock, control socket, signals, reload).
//! - [`peer`]: the symmetric, self-healing link between udsproxyd peers.
//! - [`engine`]: the HOST-side server.

pub mod control;
pub mod engine;
pub mod logring;
pub mod peer;
pub mod runner;
pub mod status;
