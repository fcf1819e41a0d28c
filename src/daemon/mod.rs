//! Daemon lifecycle and the control plane shared by every daemon.
//!
//! - [`status`]: the status shape (fixed JSON contract).
//! - [`control`]: the JSON control socket: protocol, server, client, discovery.

pub mod control;
pub mod lock;
pub mod logging;
pub mod logring;
pub mod notify;
pub mod signals;
pub mod status;
pub mod tools;

pub use control::{
    discover, socket_path, Client, ControlError, ControlHandler, Request, DEFAULT_RUN_DIR,
};
pub use lock::Lock;
pub use logging::{LogHandle, LogTarget};
