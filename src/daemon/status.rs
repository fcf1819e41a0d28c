//! The status shape every daemon reports on its control socket and `dpuctl status --json`
//! prints. The field names of [`DaemonStatus`] and [`PeerStatus`] named in DESIGN.md §4 are a
//! fixed contract: add fields freely, never rename these.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The state of one peer link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    Connected,
    Connecting,
    Disconnected,
    AuthFailed,
}

/// One peer of a daemon: the udsproxyd peer, or a client connected to the engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// `tcp://host:port`, `vsock://cid:port` or `unix:///path`.
    pub address: String,
    pub state: PeerState,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// What the peer is (`udsproxyd`, `engine`, `mount`, ...), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Last measured round-trip time of a keepalive ping, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_us: Option<u64>,
    /// Seconds in the current state.
    #[serde(default)]
    pub since_secs: u64,
    /// Why the link is not connected, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// One daemon's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// `engine`, `udsproxyd`, `mount` or `rexec_server`.
    pub name: String,
    pub pid: u32,
    /// Path of the control socket this status came from.
    pub control: String,
    pub version: String,
    pub uptime_secs: u64,
    /// Addresses this daemon listens on.
    #[serde(default)]
    pub listen: Vec<String>,
    pub peers: Vec<PeerStatus>,
    /// Allowlist entries by type name (`udsconnect` -> paths), index order.
    #[serde(default)]
    pub allowlists: BTreeMap<String, Vec<String>>,
    /// Current log level (`info`, `debug`, ...).
    #[serde(default)]
    pub log_level: String,
    /// Daemon-specific counters (requests served, handshakes refused, ...).
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
}
