//! The control socket: newline-delimited JSON over a Unix socket (mode 0600) under
//! `/var/run/qtfs/`. One request object per line; one response object per line, except
//! `logs` with `follow`, which streams one event object per line until the client goes away.

use serde::{Deserialize, Serialize};

use super::status::DaemonStatus;
use crate::allowlist::ListType;

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// -> `{"ok":true,"status":DaemonStatus}`
    Status,
    /// -> `{"ok":true,"allowlists":{"udsconnect":["/a", ...], ...}}`; all types when `list_type` is absent.
    AllowlistList {
        #[serde(default)]
        list_type: Option<ListType>,
    },
    /// -> `{"ok":true,"index":N}`
    AllowlistAdd {
        list_type: ListType,
        path: String,
        /// Also write the daemon's whitelist file atomically.
        #[serde(default)]
        persist: bool,
    },
    /// -> `{"ok":true,"removed":"/path"}`
    AllowlistDelete {
        list_type: ListType,
        index: usize,
        #[serde(default)]
        persist: bool,
    },
    /// Get (no `level`) or set the log level (an EnvFilter directive such as `debug`).
    /// -> `{"ok":true,"level":"debug"}`
    LogLevel {
        #[serde(default)]
        level: Option<String>,
    },
    /// Recent events from the ring (`backlog` at most), then, with `follow`, live events.
    /// Each event is one line: a [`super::logring::LogEvent`] object.
    Logs {
        #[serde(default = "default_backlog")]
        backlog: usize,
        #[serde(default)]
        follow: bool,
    },
    /// Re-read config and allowlists, as SIGHUP does. -> `{"ok":true}`
    Reload,
}

fn default_backlog() -> usize {
    200
}

/// Error answer: `{"ok":false,"error":"what went wrong and what to do"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub ok: bool,
    pub error: String,
}

/// What a daemon implements so the control server can answer for it. Status, log level and
/// log streaming are answered by the server itself from [`super::logring`].
pub trait ControlHandler: Send + Sync + 'static {
    /// A fresh snapshot of this daemon's status.
    fn status(&self) -> DaemonStatus;
    /// Allowlist requests and `reload`: returns the fields to merge into `{"ok":true, ...}`,
    /// or an error message that tells the operator what to do.
    fn handle(
        &self,
        req: Request,
    ) -> futures::future::BoxFuture<
        'static,
        Result<serde_json::Map<String, serde_json::Value>, String>,
    >;
}

/// Default directory of control sockets and lock files.
pub const DEFAULT_RUN_DIR: &str = "/var/run/qtfs";

/// Errors of a control-socket client.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("todo")]
    Todo,
}

/// A client of one daemon's control socket.
pub struct Client {}

impl Client {
    /// Connects to the control socket at `path`.
    pub async fn connect(_path: &std::path::Path) -> Result<Client, ControlError> {
        todo!()
    }
    /// Sends one request and reads its answer; `{"ok":false}` becomes an error carrying the
    /// daemon's message. On success returns the answer's fields without `ok`.
    pub async fn request(
        &mut self,
        _req: &Request,
    ) -> Result<serde_json::Map<String, serde_json::Value>, ControlError> {
        todo!()
    }
    /// After a `logs` request: the next streamed event, `None` when the daemon closed.
    pub async fn next_event(&mut self) -> Result<Option<super::logring::LogEvent>, ControlError> {
        todo!()
    }
}

/// The control sockets found in `run_dir`: `(daemon name, socket path)`, sorted by name.
/// Sockets are named `<name>.ctl` (`engine.ctl`, `udsproxyd.ctl`, `mount-<pid>.ctl`).
pub fn discover(_run_dir: &std::path::Path) -> Vec<(String, std::path::PathBuf)> {
    todo!()
}

/// The control socket path of daemon `name` in `run_dir`.
pub fn socket_path(run_dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    run_dir.join(format!("{name}.ctl"))
}
