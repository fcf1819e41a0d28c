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
    /// A `mount` daemon's mount (absent for other daemons).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<Box<MountStatus>>,
    /// Live proxied Unix-socket connections (udsproxyd, engine).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connections: Vec<ConnectionStatus>,
    /// Running rexec sessions (rexec_server).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sessions: Vec<SessionStatus>,
}

impl DaemonStatus {
    /// One line saying what the daemon is doing now, for systemd's `STATUS=` (shown by
    /// `systemctl status`): its mount, how many of its peers are connected, its proxied
    /// connections or rexec sessions.
    pub fn summary(&self) -> String {
        fn count(n: usize, what: &str) -> String {
            format!("{n} {what}{}", if n == 1 { "" } else { "s" })
        }
        let mut parts = Vec::new();
        if let Some(m) = &self.mount {
            parts.push(format!("{} {} on {}", m.state, m.remote, m.local));
        } else if !self.listen.is_empty() {
            parts.push(format!("listening on {}", self.listen.join(", ")));
        }
        if !self.peers.is_empty() && self.mount.is_none() {
            let up = self
                .peers
                .iter()
                .filter(|p| p.state == PeerState::Connected)
                .count();
            parts.push(if up == self.peers.len() {
                format!("{} connected", count(up, "peer"))
            } else {
                format!("{up} of {} connected", count(self.peers.len(), "peer"))
            });
        }
        if !self.connections.is_empty() {
            parts.push(count(self.connections.len(), "proxied connection"));
        }
        if self.name == "rexec_server" {
            parts.push(count(self.sessions.len(), "session"));
        }
        if parts.is_empty() {
            parts.push("serving".into());
        }
        parts.join("; ")
    }
}

/// One qtfs mount, reported by its `mount.qtfs` process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MountStatus {
    /// The HOST path being mounted.
    pub remote: String,
    /// The local mount point.
    pub local: String,
    /// The mount options as given (`server=...,writeback,...`).
    pub options: String,
    /// `mounted`, `reconnecting` or `failed`.
    pub state: String,
    /// Per-operation figures by operation name (`lookup`, `read`, ...).
    #[serde(default)]
    pub ops: BTreeMap<String, OpStats>,
}

/// Counters and latency of one kind of operation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OpStats {
    pub count: u64,
    /// Operations answered with an error.
    pub errors: u64,
    /// Latency percentiles over a recent window, microseconds.
    pub p50_us: u64,
    pub p99_us: u64,
}

/// One proxied Unix-socket connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionStatus {
    /// Connection id, unique within the daemon.
    pub id: u64,
    /// The socket path on the side that owns the server.
    pub path: String,
    /// `stream`, `dgram` or `seqpacket`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `outbound` (a local client reaching the peer) or `inbound` (the peer reaching a local server).
    pub direction: String,
    /// Bytes received from the local socket and from the peer.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub age_secs: u64,
}

/// One running rexec session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionStatus {
    /// Session id, unique within the daemon; `session_kill` takes it.
    pub id: u64,
    pub argv: Vec<String>,
    /// The client's pid on its own machine, when it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_pid: Option<u32>,
    /// The pid of the process this daemon started.
    pub remote_pid: u32,
    /// Start time, seconds since the Unix epoch.
    pub started_unix: u64,
    /// Bytes of stdin received and of stdout+stderr sent.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Where the client connected from.
    #[serde(default)]
    pub peer: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn daemon(name: &str) -> DaemonStatus {
        DaemonStatus {
            name: name.into(),
            pid: 1,
            control: String::new(),
            version: String::new(),
            uptime_secs: 0,
            listen: vec!["tcp://0.0.0.0:12345".into()],
            peers: Vec::new(),
            allowlists: BTreeMap::new(),
            log_level: String::new(),
            counters: BTreeMap::new(),
            mount: None,
            connections: Vec::new(),
            sessions: Vec::new(),
        }
    }

    fn peer(state: PeerState) -> PeerStatus {
        PeerStatus {
            address: "tcp://127.0.0.1:1".into(),
            state,
            bytes_in: 0,
            bytes_out: 0,
            role: None,
            rtt_us: None,
            since_secs: 0,
            last_error: None,
        }
    }

    #[test]
    fn summaries_say_what_each_daemon_does() {
        let mut engine = daemon("engine");
        assert_eq!(engine.summary(), "listening on tcp://0.0.0.0:12345");
        engine.peers = vec![peer(PeerState::Connected), peer(PeerState::Connecting)];
        assert_eq!(
            engine.summary(),
            "listening on tcp://0.0.0.0:12345; 1 of 2 peers connected"
        );
        let mut rexec = daemon("rexec_server");
        rexec.listen.clear();
        assert_eq!(rexec.summary(), "0 sessions");
        let mut mount = daemon("mount");
        mount.peers = vec![peer(PeerState::Connected)];
        mount.mount = Some(Box::new(MountStatus {
            remote: "/var/lib/docker".into(),
            local: "/another_rootfs/var/lib/docker".into(),
            options: String::new(),
            state: "mounted".into(),
            ops: BTreeMap::new(),
        }));
        assert_eq!(
            mount.summary(),
            "mounted /var/lib/docker on /another_rootfs/var/lib/docker"
        );
    }
}
