//! Daemon lifecycle and the control plane shared by every daemon.
//!
//! - [`status`]: the status shape (fixed JSON contract).
//! - [`control`]: the JSON control socket: protocol, server, client, discovery.
//! - [`runner`]: what every daemon does the same way (lock, control socket, signals, reload).
//! - [`peer`]: the symmetric, self-healing link between udsproxyd peers.
//! - [`engine`]: the HOST-side server.
//! - [`logging`], [`logring`]: tracing setup and the ring of recent structured events.
//! - [`lock`], [`notify`], [`signals`]: one instance per run dir, systemd readiness, SIGTERM/SIGHUP.
//! - [`tools`]: `dpuctl status` and `dpuctl logs`.

pub mod control;
pub mod engine;
pub mod lock;
pub mod logging;
pub mod logring;
pub mod notify;
pub mod peer;
pub mod runner;
pub mod signals;
pub mod status;
pub mod tools;
pub mod trust;

pub use control::{
    discover, socket_path, Client, ControlError, ControlHandler, Request, DEFAULT_RUN_DIR,
};
pub use lock::Lock;
pub use logging::{LogHandle, LogTarget};
