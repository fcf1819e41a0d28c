//! rexec: run a program on the other machine as if it ran here — argv, environment, working
//! directory, umask, rlimits, stdio (pipes or a pty), signals and exit status.
//!
//! - [`proto`]: the session messages carried in wire frames (one connection = one session).
//! - [`client`]: `rexec CMD [ARGS...]` and `rexec --kill SIGNAL LOCALPID`.
//! - [`server`]: `rexec_server`, a daemon that runs whitelisted programs for clients.
//! - [`whitelist`]: `/etc/rexec/whitelist` and program resolution — the one allow decision.
//! - [`pty`]: pseudo-terminals, window sizes, raw mode.
//!
//! Transports: the Unix socket `/var/run/rexec/rexec_uds.sock` (peers authenticated by
//! SO_PEERCRED; on a DPU that path is carried to the HOST by udsproxyd), or TCP/vsock given by
//! `CMD_NET_ADDR` (authenticated with the PSK handshake of [`crate::wire::handshake`]).
//!
//! Concurrency: see each module; the client runs on a current-thread runtime with one
//! thread reading stdin and one writing stdout/stderr, the server on the multi-thread runtime
//! with a few tasks per session.

pub mod client;
pub mod proto;
pub mod pty;
pub mod server;
pub mod whitelist;

use crate::wire::{Addr, AddrError};
use std::os::fd::{AsRawFd, BorrowedFd};

/// The buffer size stdio pipes are grown to: 256 KiB frames move in one read instead of four.
const PIPE_BUFFER: libc::c_int = 1 << 20;

/// Grows `fd`'s pipe buffer to [`PIPE_BUFFER`] if it is a pipe with a smaller one, so a
/// streaming producer runs ahead of its consumer instead of handing over 64 KiB at a time
/// (each hand-over is a wake-up of the other side). Best effort: not a pipe, or above
/// `/proc/sys/fs/pipe-max-size` for an unprivileged user, leaves it as it is.
pub(crate) fn grow_pipe(fd: BorrowedFd<'_>) {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl on a borrowed, open descriptor; F_GETPIPE_SZ/F_SETPIPE_SZ touch no memory.
    unsafe {
        let size = libc::fcntl(raw, libc::F_GETPIPE_SZ);
        if (0..PIPE_BUFFER).contains(&size) {
            libc::fcntl(raw, libc::F_SETPIPE_SZ, PIPE_BUFFER);
        }
    }
}

/// The rexec runtime directory (socket and `pids/`); `REXEC_RUN_DIR` overrides it.
pub const DEFAULT_REXEC_DIR: &str = "/var/run/rexec";
/// The Unix socket's file name in the rexec directory.
pub const SOCKET_NAME: &str = "rexec_uds.sock";
/// The pid map directory's name in the rexec directory: `pids/<local pid>` holds the remote pid.
pub const PIDS_DIR: &str = "pids";
/// The default TCP/vsock port (the original's).
pub const DEFAULT_PORT: u16 = 7777;

/// Parses a rexec address: `tcp://IP:PORT`, `vsock://CID:PORT`, `unix:///PATH` or `IP:PORT`;
/// a TCP or vsock address without a port gets [`DEFAULT_PORT`].
pub fn parse_addr(s: &str) -> Result<Addr, AddrError> {
    match s.parse::<Addr>() {
        Ok(a) => Ok(a),
        Err(first) => {
            let t = s.trim();
            let lower = t.to_ascii_lowercase();
            let hostpart = t.split_once("://").map_or(t, |(_, r)| r);
            let has_port = if hostpart.starts_with('[') {
                hostpart.contains("]:")
            } else {
                hostpart.contains(':')
            };
            if !has_port && !lower.starts_with("unix://") && !hostpart.is_empty() {
                format!("{t}:{DEFAULT_PORT}")
                    .parse::<Addr>()
                    .map_err(|_| first)
            } else {
                Err(first)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_get_the_default_port() {
        assert_eq!(
            parse_addr("tcp://127.0.0.1").unwrap(),
            Addr::Tcp("127.0.0.1:7777".into())
        );
        assert_eq!(
            parse_addr("tcp://127.0.0.1:9").unwrap(),
            Addr::Tcp("127.0.0.1:9".into())
        );
        assert_eq!(
            parse_addr("127.0.0.1:9").unwrap(),
            Addr::Tcp("127.0.0.1:9".into())
        );
        assert_eq!(
            parse_addr("vsock://2").unwrap(),
            Addr::Vsock { cid: 2, port: 7777 }
        );
        assert_eq!(
            parse_addr("vsock://3:1024").unwrap(),
            Addr::Vsock { cid: 3, port: 1024 }
        );
        assert!(parse_addr("ftp://x").is_err());
        assert!(parse_addr("").is_err());
        assert!(parse_addr("vsock://x").is_err());
    }

    #[test]
    fn pipes_grow_and_other_files_are_left_alone() {
        use std::os::fd::AsFd;
        let (r, w) = nix::unistd::pipe().unwrap();
        grow_pipe(w.as_fd());
        // SAFETY: F_GETPIPE_SZ on an open pipe.
        let size = unsafe { libc::fcntl(r.as_raw_fd(), libc::F_GETPIPE_SZ) };
        assert!(size >= PIPE_BUFFER, "pipe buffer is {size} bytes");
        let f = std::fs::File::open("/dev/null").unwrap();
        grow_pipe(f.as_fd()); // not a pipe: no effect, no error
    }
}
