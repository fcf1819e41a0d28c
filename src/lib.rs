//! dpuctl: run a machine's management plane (dockerd, containerd, kubelet, libvirtd) on a DPU
//! or second machine while the workloads it manages stay on the HOST.
//!
//! Components:
//! - [`wire`]: transports (TCP, vsock, Unix), framing, the authenticated handshake and the
//!   multiplexed [`wire::Link`] every bridge runs over.
//! - [`allowlist`]: the default-deny path allowlists (`/etc/qtfs/whitelist`) and `qtcfg`.
//! - [`daemon`]: daemon lifecycle (lock, signals, sd_notify), the JSON control socket, the log
//!   ring, `dpuctl status` / `dpuctl logs`, and the `engine` and peer-link logic.
//! - [`fs`]: qtfs, the shared filesystem: protocol, engine-side executor, FUSE client, mount helper.
//! - [`uds`]: `udsproxyd`, the cross-host Unix socket proxy.
//! - [`exec`]: `rexec` and `rexec_server`, remote execution with stdio, signals and exit status.
//! - [`tui`]: `dpuctl tui`, the live dashboard over the control sockets.
//! - [`demo`]: `dpuctl demo`, a HOST+DPU pair on one machine with live traffic and the dashboard.
//! - [`config`]: the configuration file `/etc/dpuctl/config.toml`.
//! - [`cli`]: argv\[0\] / subcommand dispatch and the small tools (`install`, `keygen`, `config check`).

pub mod allowlist;
pub mod cli;
pub mod completions;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod exec;
pub mod fs;
pub mod man;
pub mod tui;
pub mod uds;
pub mod wire;
