//! Structured log events: a bounded ring of recent events plus live subscribers.

use serde::{Deserialize, Serialize};

/// One structured log event as streamed on the control socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEvent {
    /// Milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub level: String,
    /// The daemon that logged it (`engine`, `udsproxyd`, ...).
    pub daemon: String,
    /// The tracing target (module path).
    pub target: String,
    pub message: String,
    /// Structured fields other than the message (`peer`, `path`, `type`, ...).
    #[serde(default)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}
