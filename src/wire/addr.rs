//! Transport addresses (`tcp://host:port`, `vsock://cid:port`, `unix:///path`), binding,
//! connecting, and the one [`Stream`] type every transport yields.
//!
//! Everything above the socket (framing, handshake, link) is transport-agnostic: it sees a
//! [`Stream`] (or its owned halves) and never asks which transport it came from. That is how
//! vsock shares every line above the socket with TCP even though this repository's test
//! machines cannot carry vsock traffic end to end.
//!
//! Concurrency: [`Listener::accept`] takes `&self` and may be called from one task at a time
//! (the accept loop); [`Stream`] halves from [`Stream::into_split`] are independent and may be
//! moved to different tasks.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{tcp, unix, TcpListener, TcpSocket, TcpStream, UnixListener, UnixStream};

/// Longest Unix socket path the kernel accepts (`sizeof(sun_path) - 1` on Linux: 108 - NUL).
pub const UNIX_PATH_MAX: usize = 107;

/// Backlog for listening sockets: large enough that a burst of reconnecting peers (a whole
/// fleet after an engine restart) is not refused while the accept loop catches up.
const LISTEN_BACKLOG: u32 = 1024;

/// Where to listen or connect.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Addr {
    /// `tcp://host:port` (host may be a name, IPv4 or `[IPv6]`). Stored as `host:port`.
    Tcp(String),
    /// `vsock://cid:port`.
    Vsock {
        /// Context id of the VM or host (2 = host, 4294967295 = any when binding).
        cid: u32,
        /// vsock port.
        port: u32,
    },
    /// `unix:///absolute/path`.
    Unix(PathBuf),
}

/// Why an address string was refused. Every message shows the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// Empty string.
    #[error("empty address: use tcp://HOST:PORT, vsock://CID:PORT or unix:///PATH")]
    Empty,
    /// A `scheme://` we do not know.
    #[error("unknown address scheme `{scheme}` in `{input}`: use tcp://HOST:PORT, vsock://CID:PORT or unix:///PATH")]
    UnknownScheme {
        /// The scheme as written.
        scheme: String,
        /// The whole input.
        input: String,
    },
    /// `host` without `:port`.
    #[error("missing port in `{input}`: write it as HOST:PORT (for example 127.0.0.1:12345)")]
    MissingPort {
        /// The whole input.
        input: String,
    },
    /// The port is not a number in range.
    #[error("bad port `{port}` in `{input}`: expected a number 0-{max}")]
    BadPort {
        /// The whole input.
        input: String,
        /// The port text.
        port: String,
        /// Largest allowed port for this transport.
        max: u32,
    },
    /// The host part is empty or contains characters no host name has.
    #[error("bad host `{host}` in `{input}`: expected a host name, an IPv4 address or a bracketed IPv6 address like [::1]")]
    BadHost {
        /// The whole input.
        input: String,
        /// The host text.
        host: String,
    },
    /// The vsock context id is not a decimal u32.
    #[error("bad vsock CID `{cid}` in `{input}`: expected a decimal number (2 = host, 3+ = a guest or DPU)")]
    BadCid {
        /// The whole input.
        input: String,
        /// The CID text.
        cid: String,
    },
    /// `unix://` followed by something that is not an absolute path.
    #[error("unix socket path in `{input}` must be absolute: write unix:///absolute/path (three slashes)")]
    RelativeUnixPath {
        /// The whole input.
        input: String,
    },
    /// The Unix socket path does not fit in `sun_path`.
    #[error("unix socket path in `{input}` is {len} bytes; the kernel allows at most {max}: choose a shorter path")]
    UnixPathTooLong {
        /// The whole input.
        input: String,
        /// Its length in bytes.
        len: usize,
        /// [`UNIX_PATH_MAX`].
        max: usize,
    },
    /// Positional form: the address is neither an IP address nor a decimal CID.
    #[error("`{addr}` is neither an IP address (TCP) nor a decimal vsock CID")]
    NotIpOrCid {
        /// The address argument.
        addr: String,
    },
}

impl FromStr for Addr {
    type Err = AddrError;

    fn from_str(input: &str) -> Result<Addr, AddrError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(AddrError::Empty);
        }
        let Some((scheme, rest)) = s.split_once("://") else {
            // The original tools and most operators write a bare `host:port` for TCP.
            return parse_host_port(s, input).map(Addr::Tcp);
        };
        match scheme.to_ascii_lowercase().as_str() {
            "tcp" => parse_host_port(rest, input).map(Addr::Tcp),
            "vsock" => parse_vsock(rest, input),
            "unix" => parse_unix(rest, input),
            _ => Err(AddrError::UnknownScheme {
                scheme: scheme.to_string(),
                input: input.to_string(),
            }),
        }
    }
}

/// Validates `host:port` and returns it normalised (IPv6 kept in brackets).
fn parse_host_port(s: &str, input: &str) -> Result<String, AddrError> {
    let (host, port) = if let Some(after_bracket) = s.strip_prefix('[') {
        let Some((v6, tail)) = after_bracket.split_once(']') else {
            return Err(AddrError::BadHost {
                input: input.into(),
                host: s.into(),
            });
        };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(AddrError::BadHost {
                input: input.into(),
                host: format!("[{v6}]"),
            });
        }
        let Some(port) = tail.strip_prefix(':') else {
            return Err(AddrError::MissingPort {
                input: input.into(),
            });
        };
        (format!("[{v6}]"), port)
    } else {
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(AddrError::MissingPort {
                input: input.into(),
            });
        };
        if host.contains(':') {
            // An unbracketed IPv6 literal: ambiguous, refuse with the fix.
            return Err(AddrError::BadHost {
                input: input.into(),
                host: host.into(),
            });
        }
        let valid = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !valid {
            return Err(AddrError::BadHost {
                input: input.into(),
                host: host.into(),
            });
        }
        (host.to_string(), port)
    };
    // Port 0 is accepted: binding to port 0 picks a free port (tests, ephemeral listeners).
    let port_num: u16 = parse_decimal(port).ok_or_else(|| AddrError::BadPort {
        input: input.into(),
        port: port.into(),
        max: u32::from(u16::MAX),
    })?;
    Ok(format!("{host}:{port_num}"))
}

/// Strict decimal: digits only (no sign, no spaces), as `str::parse` alone would accept `+5`.
fn parse_decimal<T: FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_vsock(rest: &str, input: &str) -> Result<Addr, AddrError> {
    let Some((cid, port)) = rest.split_once(':') else {
        return Err(AddrError::MissingPort {
            input: input.into(),
        });
    };
    let cid_num: u32 = parse_decimal(cid).ok_or_else(|| AddrError::BadCid {
        input: input.into(),
        cid: cid.into(),
    })?;
    let port_num: u32 = parse_decimal(port).ok_or_else(|| AddrError::BadPort {
        input: input.into(),
        port: port.into(),
        max: u32::MAX,
    })?;
    Ok(Addr::Vsock {
        cid: cid_num,
        port: port_num,
    })
}

fn parse_unix(rest: &str, input: &str) -> Result<Addr, AddrError> {
    if !rest.starts_with('/') {
        return Err(AddrError::RelativeUnixPath {
            input: input.into(),
        });
    }
    if rest.len() > UNIX_PATH_MAX {
        return Err(AddrError::UnixPathTooLong {
            input: input.into(),
            len: rest.len(),
            max: UNIX_PATH_MAX,
        });
    }
    Ok(Addr::Unix(PathBuf::from(rest)))
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Tcp(hp) => write!(f, "tcp://{hp}"),
            Addr::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            Addr::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

/// A TCP port on 127.0.0.1 that is free now and lies outside the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), for a caller that must name a port before the daemon that
/// will listen on it starts: the demo and the tests.
///
/// Binding port 0 and releasing it is not enough there: the port it yields is an ephemeral one,
/// and the very next outgoing connection on the box (a peer dialling its partner) may take it
/// as its source port before the daemon binds it. Ports outside the ephemeral range are never
/// handed out that way. Calls in one process never repeat a port (they walk the window from a
/// starting point drawn once from the pid and the clock, so that concurrent processes rarely
/// meet); only when the range leaves no window of 1,000 ports does this fall back to port 0.
pub fn spare_loopback_port() -> io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static START: OnceLock<u32> = OnceLock::new();

    let Some((lo, hi)) = spare_port_window() else {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        return Ok(l.local_addr()?.port());
    };
    let span = hi - lo;
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        std::process::id().wrapping_mul(2_654_435_761) ^ nanos
    });
    for _ in 0..1_024 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let Ok(port) = u16::try_from(lo + start.wrapping_add(n) % span) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no free port on 127.0.0.1 between {lo} and {hi}"),
    ))
}

/// The ports [`spare_loopback_port`] picks from: 10000 up to the ephemeral range, or above it
/// when it starts too low; None when neither leaves 1,000 ports.
fn spare_port_window() -> Option<(u32, u32)> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let mut bounds = range
        .iter()
        .flat_map(|s| s.split_whitespace())
        .map(|w| w.parse::<u32>().ok());
    let low = bounds.next().flatten().unwrap_or(32_768);
    let high = bounds.next().flatten().unwrap_or(60_999);
    if low >= 11_000 {
        Some((10_000, low))
    } else if high <= 64_535 {
        Some((high + 1, 65_536))
    } else {
        None
    }
}

impl Addr {
    /// The original tools' positional form: `addr` is an IP address (TCP) or a decimal CID
    /// (vsock), `port` the port number.
    pub fn from_positional(addr: &str, port: &str) -> Result<Addr, AddrError> {
        let input = format!("{addr} {port}");
        if let Ok(ip) = addr.parse::<IpAddr>() {
            let host = match ip {
                IpAddr::V4(v4) => v4.to_string(),
                IpAddr::V6(v6) => format!("[{v6}]"),
            };
            let port_num: u16 = parse_decimal(port).ok_or_else(|| AddrError::BadPort {
                input: input.clone(),
                port: port.into(),
                max: u32::from(u16::MAX),
            })?;
            return Ok(Addr::Tcp(format!("{host}:{port_num}")));
        }
        if let Some(cid) = parse_decimal::<u32>(addr) {
            let port_num: u32 = parse_decimal(port).ok_or_else(|| AddrError::BadPort {
                input,
                port: port.into(),
                max: u32::MAX,
            })?;
            return Ok(Addr::Vsock {
                cid,
                port: port_num,
            });
        }
        Err(AddrError::NotIpOrCid { addr: addr.into() })
    }

    /// Binds a listener. TCP sets `SO_REUSEADDR` (a restarted daemon rebinds at once despite
    /// connections in TIME_WAIT). Unix refuses when a live listener already owns the path and
    /// removes a stale socket file left by a crashed process; it never removes a non-socket.
    pub async fn bind(&self) -> io::Result<Listener> {
        match self {
            Addr::Tcp(hp) => {
                let sa = resolve_first(hp).await?;
                let socket = if sa.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                socket.set_reuseaddr(true)?;
                socket
                    .bind(sa)
                    .map_err(|e| with_context(e, format!("cannot bind {self}")))?;
                Ok(Listener {
                    inner: ListenerInner::Tcp(socket.listen(LISTEN_BACKLOG)?),
                })
            }
            Addr::Vsock { cid, port } => {
                let l = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(*cid, *port))
                    .map_err(|e| vsock_context(e, self, "bind"))?;
                Ok(Listener {
                    inner: ListenerInner::Vsock(l),
                })
            }
            Addr::Unix(path) => bind_unix(path).await,
        }
    }

    /// Connects, giving up after `timeout` with [`io::ErrorKind::TimedOut`] and a message
    /// naming the address. TCP sets `TCP_NODELAY`: the link batches frames itself, and Nagle
    /// would add a delay to every small request.
    pub async fn connect(&self, timeout: Duration) -> io::Result<Stream> {
        let attempt = async {
            match self {
                Addr::Tcp(hp) => {
                    let mut last_err = None;
                    for sa in tokio::net::lookup_host(hp.as_str()).await? {
                        match TcpStream::connect(sa).await {
                            Ok(s) => {
                                s.set_nodelay(true)?;
                                return Ok(Stream::Tcp(s));
                            }
                            Err(e) => last_err = Some(e),
                        }
                    }
                    Err(last_err.unwrap_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("{hp} resolved to no address"),
                        )
                    }))
                }
                Addr::Vsock { cid, port } => {
                    tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port))
                        .await
                        .map(Stream::Vsock)
                        .map_err(|e| vsock_context(e, self, "connect"))
                }
                Addr::Unix(path) => UnixStream::connect(path).await.map(|s| {
                    big_unix_buffers(&s);
                    Stream::Unix(s)
                }),
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => {
                let hint = match self {
                    Addr::Vsock { .. } => {
                        " (a vsock connect that hangs usually means no transport reaches that \
                         CID: check the CID and that vhost_vsock / the virtio vsock driver is loaded)"
                    }
                    _ => "",
                };
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "connecting to {self} timed out after {}{hint}",
                        humantime::format_duration(timeout)
                    ),
                ))
            }
        }
    }
}

/// Keeps the error kind (callers match on it, e.g. `AddrInUse`) while naming the address.
fn with_context(e: io::Error, what: String) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// vsock errors are cryptic on hosts without a vsock transport; name the likely fix.
fn vsock_context(e: io::Error, addr: &Addr, what: &str) -> io::Error {
    let hint = match e.raw_os_error() {
        Some(libc::EAFNOSUPPORT) | Some(libc::ENODEV) => {
            " (no vsock transport on this machine: load vhost_vsock on the host or \
             vmw_vsock_virtio_transport in the guest/DPU)"
        }
        Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) => {
            " (is the CID right? `cat /sys/class/vsock/...` or the VM/DPU configuration shows it)"
        }
        _ => "",
    };
    io::Error::new(e.kind(), format!("vsock {what} {addr}: {e}{hint}"))
}

async fn resolve_first(hp: &str) -> io::Result<std::net::SocketAddr> {
    tokio::net::lookup_host(hp).await?.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{hp} resolved to no address"),
        )
    })
}

async fn bind_unix(path: &Path) -> io::Result<Listener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a socket: remove it or choose another path",
                        path.display()
                    ),
                ));
            }
            // A connect that succeeds means a live process owns it: never steal its path.
            match UnixStream::connect(path).await {
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!(
                            "another process is already listening on unix://{}: stop it first",
                            path.display()
                        ),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "removing stale socket file");
                    std::fs::remove_file(path)?;
                }
                Err(e) => return Err(with_context(e, format!("probing {}", path.display()))),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(with_context(e, format!("inspecting {}", path.display()))),
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| with_context(e, format!("cannot bind unix://{}", path.display())))?;
    // Owner only, whatever the umask (the engine runs with 0): the handshake authenticates,
    // but other local users have no business connecting at all.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| with_context(e, format!("chmod 0600 unix://{}", path.display())))?;
    let meta = std::fs::metadata(path)?;
    Ok(Listener {
        inner: ListenerInner::Unix {
            listener,
            path: path.to_path_buf(),
            ident: (meta.dev(), meta.ino()),
        },
    })
}

/// A bound listener on any transport.
pub struct Listener {
    inner: ListenerInner,
}

enum ListenerInner {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
        /// (dev, inode) of the socket file we created, so Drop removes only our own file and
        /// never a socket a newer process bound at the same path.
        ident: (u64, u64),
    },
    Vsock(tokio_vsock::VsockListener),
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Listener({})", self.local_addr())
    }
}

/// Socket buffer of link connections over Unix sockets. The default (~208 KiB) is smaller
/// than one large data frame, so bulk transfers would wake both sides several times per
/// frame; TCP autotunes its buffers and needs nothing.
const UNIX_BUFFER: usize = 4 << 20;

/// Best effort: the kernel caps the value at net.core.{w,r}mem_max, and a smaller buffer
/// only costs speed.
fn big_unix_buffers(s: &UnixStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(s, sockopt::SndBuf, &UNIX_BUFFER);
    let _ = setsockopt(s, sockopt::RcvBuf, &UNIX_BUFFER);
}

impl Listener {
    /// Accepts one connection; returns the stream and the peer's address for logs
    /// (`tcp://127.0.0.1:5555`, `vsock://3:1024`, `unix:///path[pid=1,uid=0]`).
    pub async fn accept(&self) -> io::Result<(Stream, String)> {
        match &self.inner {
            ListenerInner::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                let peer = match peer {
                    std::net::SocketAddr::V4(v4) => format!("tcp://{v4}"),
                    std::net::SocketAddr::V6(v6) => format!("tcp://[{}]:{}", v6.ip(), v6.port()),
                };
                Ok((Stream::Tcp(s), peer))
            }
            ListenerInner::Unix { listener, path, .. } => {
                let (s, _) = listener.accept().await?;
                // Unix peers are unnamed; the credentials are what identifies them in logs.
                let who = match s.peer_cred() {
                    Ok(c) => format!(
                        "[pid={},uid={}]",
                        c.pid().map_or_else(|| "?".to_string(), |p| p.to_string()),
                        c.uid()
                    ),
                    Err(_) => String::new(),
                };
                big_unix_buffers(&s);
                Ok((Stream::Unix(s), format!("unix://{}{who}", path.display())))
            }
            ListenerInner::Vsock(l) => {
                let (s, peer) = l.accept().await?;
                Ok((
                    Stream::Vsock(s),
                    format!("vsock://{}:{}", peer.cid(), peer.port()),
                ))
            }
        }
    }

    /// The bound address (the real port after binding port 0).
    pub fn local_addr(&self) -> Addr {
        match &self.inner {
            ListenerInner::Tcp(l) => match l.local_addr() {
                Ok(std::net::SocketAddr::V4(v4)) => Addr::Tcp(v4.to_string()),
                Ok(std::net::SocketAddr::V6(v6)) => {
                    Addr::Tcp(format!("[{}]:{}", v6.ip(), v6.port()))
                }
                // getsockname on a bound socket cannot fail short of fd corruption.
                Err(_) => Addr::Tcp("0.0.0.0:0".into()),
            },
            ListenerInner::Unix { path, .. } => Addr::Unix(path.clone()),
            ListenerInner::Vsock(l) => match l.local_addr() {
                Ok(a) => Addr::Vsock {
                    cid: a.cid(),
                    port: a.port(),
                },
                Err(_) => Addr::Vsock { cid: 0, port: 0 },
            },
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let ListenerInner::Unix { path, ident, .. } = &self.inner {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if (meta.dev(), meta.ino()) == *ident {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

/// A connected byte stream on any transport.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain socket.
    Unix(UnixStream),
    /// vsock.
    Vsock(tokio_vsock::VsockStream),
}

/// The read half of a [`Stream`], owned (no lock shared with the write half).
#[derive(Debug)]
pub enum ReadHalf {
    /// TCP.
    Tcp(tcp::OwnedReadHalf),
    /// Unix domain socket.
    Unix(unix::OwnedReadHalf),
    /// vsock.
    Vsock(tokio_vsock::OwnedReadHalf),
}

/// The write half of a [`Stream`], owned. Dropping it shuts down the write direction.
#[derive(Debug)]
pub enum WriteHalf {
    /// TCP.
    Tcp(tcp::OwnedWriteHalf),
    /// Unix domain socket.
    Unix(unix::OwnedWriteHalf),
    /// vsock.
    Vsock(tokio_vsock::OwnedWriteHalf),
}

impl Stream {
    /// Splits into owned halves that can live in different tasks without a shared lock
    /// (unlike `tokio::io::split`).
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
            }
            Stream::Unix(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Unix(r), WriteHalf::Unix(w))
            }
            Stream::Vsock(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Vsock(r), WriteHalf::Vsock(w))
            }
        }
    }
}

/// Forwards an AsyncRead/AsyncWrite method to whichever transport variant is inside.
macro_rules! delegate {
    ($self:ident, $enum:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            $enum::Tcp($s) => $e,
            $enum::Unix($s) => $e,
            $enum::Vsock($s) => $e,
        }
    };
}

/// `AsyncRead` for an enum of the three transports' read sides, by delegation.
macro_rules! async_read_for {
    ($enum:ident) => {
        impl AsyncRead for $enum {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                delegate!(self, $enum, s => Pin::new(s).poll_read(cx, buf))
            }
        }
    };
}

/// `AsyncWrite` for an enum of the three transports' write sides, by delegation (vectored
/// writes included: a frame's header and payload leave in one `writev`).
macro_rules! async_write_for {
    ($enum:ident) => {
        impl AsyncWrite for $enum {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                delegate!(self, $enum, s => Pin::new(s).poll_write(cx, buf))
            }
            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                delegate!(self, $enum, s => Pin::new(s).poll_write_vectored(cx, bufs))
            }
            fn is_write_vectored(&self) -> bool {
                match self {
                    $enum::Tcp(s) => s.is_write_vectored(),
                    $enum::Unix(s) => s.is_write_vectored(),
                    $enum::Vsock(s) => s.is_write_vectored(),
                }
            }
            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                delegate!(self, $enum, s => Pin::new(s).poll_flush(cx))
            }
            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                delegate!(self, $enum, s => Pin::new(s).poll_shutdown(cx))
            }
        }
    };
}

async_read_for!(Stream);
async_write_for!(Stream);
async_read_for!(ReadHalf);
async_write_for!(WriteHalf);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        for (input, want) in [
            ("tcp://127.0.0.1:12345", Addr::Tcp("127.0.0.1:12345".into())),
            ("127.0.0.1:12345", Addr::Tcp("127.0.0.1:12345".into())),
            ("tcp://[::1]:5", Addr::Tcp("[::1]:5".into())),
            ("[::1]:5", Addr::Tcp("[::1]:5".into())),
            (
                "tcp://dpu-01.example:7777",
                Addr::Tcp("dpu-01.example:7777".into()),
            ),
            ("tcp://127.0.0.1:0", Addr::Tcp("127.0.0.1:0".into())),
            ("TCP://localhost:1", Addr::Tcp("localhost:1".into())),
            (
                "vsock://3:12121",
                Addr::Vsock {
                    cid: 3,
                    port: 12121,
                },
            ),
            (
                "vsock://4294967295:1",
                Addr::Vsock {
                    cid: u32::MAX,
                    port: 1,
                },
            ),
            (
                "unix:///var/run/qtfs/engine.sock",
                Addr::Unix("/var/run/qtfs/engine.sock".into()),
            ),
        ] {
            let got: Addr = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(got, want, "{input}");
            let again: Addr = got.to_string().parse().expect("display output parses");
            assert_eq!(again, got, "round trip of {input}");
        }
        assert_eq!(
            Addr::Tcp("127.0.0.1:12345".into()).to_string(),
            "tcp://127.0.0.1:12345"
        );
        assert_eq!(Addr::Vsock { cid: 3, port: 9 }.to_string(), "vsock://3:9");
        assert_eq!(Addr::Unix("/a/b".into()).to_string(), "unix:///a/b");
    }

    #[test]
    fn parse_errors_say_what_is_wrong() {
        let err = |s: &str| s.parse::<Addr>().expect_err(s);
        assert!(matches!(err(""), AddrError::Empty));
        assert!(matches!(
            err("tcp://127.0.0.1"),
            AddrError::MissingPort { .. }
        ));
        assert!(matches!(err("127.0.0.1"), AddrError::MissingPort { .. }));
        assert!(matches!(err("tcp://[::1]"), AddrError::MissingPort { .. }));
        assert!(matches!(
            err("tcp://1.2.3.4:99999"),
            AddrError::BadPort { .. }
        ));
        assert!(matches!(err("tcp://1.2.3.4:+5"), AddrError::BadPort { .. }));
        assert!(matches!(err("tcp://:5"), AddrError::BadHost { .. }));
        assert!(matches!(err("tcp://::1:5"), AddrError::BadHost { .. }));
        assert!(matches!(err("tcp://[zz]:5"), AddrError::BadHost { .. }));
        assert!(matches!(err("tcp://a b:5"), AddrError::BadHost { .. }));
        assert!(matches!(err("vsock://x:5"), AddrError::BadCid { .. }));
        assert!(matches!(err("vsock://-1:5"), AddrError::BadCid { .. }));
        assert!(matches!(err("vsock://3"), AddrError::MissingPort { .. }));
        assert!(matches!(err("vsock://3:p"), AddrError::BadPort { .. }));
        assert!(matches!(
            err("unix://relative/path"),
            AddrError::RelativeUnixPath { .. }
        ));
        let long = format!("unix:///{}", "x".repeat(200));
        assert!(matches!(err(&long), AddrError::UnixPathTooLong { .. }));

        let unknown = err("http://example.com:80");
        assert!(matches!(unknown, AddrError::UnknownScheme { ref scheme, .. } if scheme == "http"));
        let msg = unknown.to_string();
        assert!(
            msg.contains("`http`") && msg.contains("tcp://HOST:PORT") && msg.contains("vsock://"),
            "{msg}"
        );
        assert!(err("unix://rel").to_string().contains("three slashes"));
    }

    #[test]
    fn positional_form_picks_transport() {
        assert_eq!(
            Addr::from_positional("127.0.0.1", "12121").unwrap(),
            Addr::Tcp("127.0.0.1:12121".into())
        );
        assert_eq!(
            Addr::from_positional("::1", "12121").unwrap(),
            Addr::Tcp("[::1]:12121".into())
        );
        assert_eq!(
            Addr::from_positional("3", "12121").unwrap(),
            Addr::Vsock {
                cid: 3,
                port: 12121
            }
        );
        assert!(matches!(
            Addr::from_positional("dpu.example", "1"),
            Err(AddrError::NotIpOrCid { .. })
        ));
        assert!(matches!(
            Addr::from_positional("127.0.0.1", "70000"),
            Err(AddrError::BadPort { .. })
        ));
        assert!(matches!(
            Addr::from_positional("3", "x"),
            Err(AddrError::BadPort { .. })
        ));
    }

    #[tokio::test]
    async fn tcp_bind_port_zero_reports_real_port_and_connects() {
        let l = Addr::Tcp("127.0.0.1:0".into()).bind().await.unwrap();
        let local = l.local_addr();
        let Addr::Tcp(hp) = &local else {
            panic!("not tcp: {local}")
        };
        assert!(!hp.ends_with(":0"), "{hp}");
        let (accepted, client) = tokio::join!(l.accept(), local.connect(Duration::from_secs(2)));
        let (_s, peer) = accepted.unwrap();
        assert!(peer.starts_with("tcp://127.0.0.1:"), "{peer}");
        assert!(matches!(client.unwrap(), Stream::Tcp(_)));
    }

    #[test]
    fn spare_ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let bounds: Vec<u32> = range
            .split_whitespace()
            .map(|w| w.parse().unwrap())
            .collect();
        let ephemeral = bounds[0]..=bounds[1];
        let window = spare_port_window();
        let ports: Vec<u16> = (0..200).map(|_| spare_loopback_port().unwrap()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "a port came twice: {ports:?}");
        for port in ports {
            let p = u32::from(port);
            if let Some((lo, hi)) = window {
                assert!((lo..hi).contains(&p), "{port} outside {lo}..{hi}");
                assert!(!ephemeral.contains(&p), "{port} is ephemeral ({range})");
            }
            std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }

    #[tokio::test]
    async fn unix_bind_refuses_live_listener_and_replaces_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let addr = Addr::Unix(path.clone());
        let l = addr.bind().await.unwrap();
        let err = addr.bind().await.expect_err("second bind must fail");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        // A stale socket file (no listener behind it) is replaced.
        drop(l);
        assert!(!path.exists(), "drop removes our own socket file");
        // std's listener leaves its file behind when dropped, like a crashed daemon.
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        let l2 = Addr::Unix(stale.clone()).bind().await.unwrap();
        drop(l2);
        assert!(!stale.exists());
        // A regular file is never removed.
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = Addr::Unix(file.clone()).bind().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(file.exists());
    }
}
