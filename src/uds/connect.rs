//! `dpuctl uds-connect`: bridges stdin/stdout to a Unix socket on the peer machine through
//! the local udsproxyd (like `socat - UNIX-CONNECT:PATH`, across machines), and
//! [`connect_remote`], the client side of the request socket for Rust callers.
//!
//! Concurrency: plain blocking I/O; the bridge runs stdin→socket on a second thread and
//! socket→stdout on the main one, and exits when the remote side closes.

use std::ffi::OsString;
use std::io::{self, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

use super::proto::{LocalRequest, Reply, SockType, REPLY_HEADER};
use crate::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "uds-connect",
    version,
    about = "Connect stdin/stdout to a Unix socket on the peer machine through udsproxyd",
    long_about = "Asks the local udsproxyd (or the engine's built-in peer) to connect to \
REMOTE_PATH on the other machine, then copies stdin to the socket and the socket to stdout \
until the remote side closes. End of stdin half-closes the connection (the server sees EOF). \
The far side's udsconnect allowlist must allow REMOTE_PATH.\n\n\
With --type dgram or seqpacket each read of stdin is sent as one message and each message \
received is written to stdout as it is. A message socket has no half-close, so after the end \
of stdin uds-connect waits --timeout for answers before it closes (as socat -t does).",
    after_help = "Examples:\n  printf 'PING\\r\\n' | dpuctl uds-connect /run/redis/redis.sock\n  dpuctl uds-connect --type dgram /run/systemd/notify\n\nExit status: 0 when the remote side closed normally, 1 when the connection was refused or failed, 2 on usage errors."
)]
struct Args {
    /// The local udsproxyd's request socket [default: [udsproxyd] request_socket of the
    /// config file, else /var/run/qtfs/remote_uds.sock]
    #[arg(long, value_name = "PATH")]
    request_socket: Option<PathBuf>,
    /// Socket type: stream, dgram or seqpacket
    #[arg(long = "type", value_name = "TYPE", default_value = "stream")]
    kind: SockType,
    /// With dgram or seqpacket: how long to wait for answers after the end of stdin
    #[arg(long, short = 't', value_name = "DURATION", default_value = "500ms", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// The socket path on the other machine
    #[arg(value_name = "REMOTE_PATH")]
    remote_path: PathBuf,
}

/// The command line, for the manual page (`dpuctl man`).
pub(crate) fn command() -> clap::Command {
    <Args as clap::CommandFactory>::command()
}

/// Why a remote connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The request socket cannot be reached.
    #[error("cannot reach udsproxyd at {path}: {source} (is udsproxyd, or the engine with its built-in peer, running? see --request-socket)")]
    RequestSocket {
        /// The request socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Talking to udsproxyd failed midway.
    #[error("udsproxyd at {path} dropped the request: {source}")]
    Exchange {
        /// The request socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The answer was not a udsproxyd reply.
    #[error("udsproxyd sent an invalid reply: {0}")]
    BadReply(String),
    /// The connection was refused or failed; the errno is the one a local connect would give.
    #[error("{}", with_errno(message, *errno))]
    Refused {
        /// The errno (ECONNREFUSED when an allowlist denies).
        errno: i32,
        /// Why, from whichever side refused.
        message: String,
    },
    /// A fallback request for a path that is not on this side's udsconnect allowlist.
    #[error(
        "the path is not on this machine's udsconnect allowlist, so udsproxyd does not route it"
    )]
    NotRouted,
}

/// `message`, followed by the errno's text unless it already says it (a far side's own
/// connect error reads "No such file or directory (os error 2)" already).
fn with_errno(message: &str, errno: i32) -> String {
    let e = io::Error::from_raw_os_error(errno).to_string();
    if message.contains(&e) {
        message.to_owned()
    } else {
        format!("{message} ({e})")
    }
}

impl ConnectError {
    /// The errno a caller of `connect(2)` should see.
    pub fn errno(&self) -> i32 {
        match self {
            ConnectError::Refused { errno, .. } => *errno,
            ConnectError::NotRouted => libc::ENOENT,
            ConnectError::RequestSocket { .. } | ConnectError::Exchange { .. } => {
                libc::ECONNREFUSED
            }
            ConnectError::BadReply(_) => libc::EPROTO,
        }
    }
}

/// The request socket the config names, or the default.
pub fn default_request_socket() -> PathBuf {
    match Config::load(None) {
        Ok((c, _)) => c.udsproxyd.request_socket_path(&c.common.run_dir),
        Err(_) => PathBuf::from(crate::daemon::control::DEFAULT_RUN_DIR).join("remote_uds.sock"),
    }
}

/// Connects to `remote` on the peer machine through the udsproxyd serving `request_socket`.
/// Returns the connected socket: a `SOCK_STREAM` socket for `Stream`, a `SOCK_SEQPACKET`
/// one (message boundaries kept) for `Dgram` and `Seqpacket`. `flags` is 0, or
/// [`super::proto::FLAG_FALLBACK`] to route only allowlisted paths (as the shim does).
pub fn connect_remote(
    request_socket: &Path,
    kind: SockType,
    remote: &Path,
    flags: u8,
) -> Result<OwnedFd, ConnectError> {
    let exchange = |source| ConnectError::Exchange {
        path: request_socket.to_path_buf(),
        source,
    };
    let mut sock =
        UnixStream::connect(request_socket).map_err(|source| ConnectError::RequestSocket {
            path: request_socket.to_path_buf(),
            source,
        })?;
    let req = LocalRequest {
        kind,
        flags,
        path: remote.to_path_buf(),
    };
    sock.write_all(&req.encode()).map_err(exchange)?;
    let (header, fd) = recv_header(&sock).map_err(exchange)?;
    let (reply, msg_len) =
        Reply::decode_header(&header).map_err(|e| ConnectError::BadReply(e.to_string()))?;
    let mut msg = vec![0u8; msg_len];
    sock.read_exact(&mut msg).map_err(exchange)?;
    match reply {
        Reply::Connected if kind.is_packet() => {
            fd.ok_or_else(|| ConnectError::BadReply("no socket passed with the reply".into()))
        }
        Reply::Connected => Ok(OwnedFd::from(sock)),
        Reply::NotRouted => Err(ConnectError::NotRouted),
        Reply::Failed { errno, .. } => Err(ConnectError::Refused {
            errno,
            message: String::from_utf8_lossy(&msg).into_owned(),
        }),
    }
}

/// Reads the fixed reply header, and the descriptor passed with it if any.
fn recv_header(sock: &UnixStream) -> io::Result<([u8; REPLY_HEADER], Option<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut header = [0u8; REPLY_HEADER];
    let mut got = 0;
    let mut fd = None;
    while got < REPLY_HEADER {
        let mut space = nix::cmsg_space!([RawFd; 2]);
        let mut iov = [IoSliceMut::new(&mut header[got..])];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let n = msg.bytes;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for raw in fds {
                    // SAFETY: the kernel just installed `raw` in our table for us; we own it.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the reply",
            ));
        }
        got += n;
    }
    Ok((header, fd))
}

/// Entry point for `dpuctl uds-connect`.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let a = match Args::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => return crate::cli::clap_exit(e),
    };
    let request = a.request_socket.unwrap_or_else(default_request_socket);
    let fd = match connect_remote(&request, a.kind, &a.remote_path, 0) {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("uds-connect: {}: {e}", a.remote_path.display());
            return ExitCode::from(1);
        }
    };
    match bridge(fd, a.kind, a.timeout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uds-connect: {}: {e}", a.remote_path.display());
            ExitCode::from(1)
        }
    }
}

/// Copies stdin to `fd` on a thread and `fd` to stdout here, until `fd` reports the end.
/// After the end of stdin a message socket stays open `linger` for answers (closing it is
/// its only end-of-data signal).
fn bridge(fd: OwnedFd, kind: SockType, linger: std::time::Duration) -> io::Result<()> {
    let sock = UnixStream::from(fd);
    let up = sock.try_clone()?;
    let packets = kind.is_packet();
    std::thread::spawn(move || {
        let mut up = up;
        let mut stdin = io::stdin().lock();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                // One read, one message for packet sockets (write on a seqpacket is one send).
                Ok(n) => {
                    let sent = if packets {
                        up.write(&buf[..n]).map(|_| ())
                    } else {
                        up.write_all(&buf[..n])
                    };
                    if sent.is_err() {
                        break;
                    }
                }
            }
        }
        if packets {
            std::thread::sleep(linger);
        }
        let _ = up.shutdown(std::net::Shutdown::Write);
    });
    let mut down = sock;
    let mut stdout = io::stdout().lock();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match down.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        stdout.write_all(&buf[..n])?;
        stdout.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_parse_the_demo_command_line() {
        let a = Args::try_parse_from([
            "dpuctl uds-connect",
            "--request-socket",
            "/run/x.sock",
            "--type",
            "dgram",
            "/var/run/docker.sock",
        ])
        .unwrap();
        assert_eq!(a.kind, SockType::Dgram);
        assert_eq!(a.request_socket.as_deref(), Some(Path::new("/run/x.sock")));
        assert_eq!(a.remote_path, Path::new("/var/run/docker.sock"));
        assert!(Args::try_parse_from(["x", "--type", "raw", "/a"]).is_err());
    }

    #[test]
    fn a_refusal_names_its_errno_once() {
        let far = ConnectError::Refused {
            errno: libc::ENOENT,
            message: format!(
                "connect to /run/x.sock on the far side: {}",
                io::Error::from_raw_os_error(libc::ENOENT)
            ),
        };
        assert_eq!(
            far.to_string(),
            "connect to /run/x.sock on the far side: No such file or directory (os error 2)"
        );
        let denied = ConnectError::Refused {
            errno: libc::ECONNREFUSED,
            message: "/run/x.sock is not on the udsconnect allowlist".into(),
        };
        assert_eq!(
            denied.to_string(),
            "/run/x.sock is not on the udsconnect allowlist (Connection refused (os error 111))"
        );
    }

    #[test]
    fn unreachable_request_socket_says_what_to_check() {
        let dir = tempfile::tempdir().unwrap();
        let e = connect_remote(
            &dir.path().join("none.sock"),
            SockType::Stream,
            Path::new("/a"),
            0,
        )
        .unwrap_err();
        assert_eq!(e.errno(), libc::ECONNREFUSED);
        assert!(e.to_string().contains("is udsproxyd"), "{e}");
    }
}
