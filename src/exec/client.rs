//! `rexec CMD [ARGS...]`: runs CMD on the other machine through `rexec_server` and behaves
//! like the local program — stdio, exit status (128+N for a signal), forwarded signals.
//!
//! Exit status: the program's, or 128+N when it died of signal N; 127 command not found;
//! 126 not executable or not allowed by the whitelist; 255 connection, authentication or
//! protocol problems; 1 when `--kill` finds no such session or the server refuses it; 2 usage
//! errors (options, a bad signal name, a bad server address).
//!
//! Concurrency: a current-thread tokio runtime (starting is most of the cost of a short
//! command) runs the socket and signals. Two plain threads do the blocking stdio: one reads
//! stdin into recycled buffers (a bounded channel paces it), one writes stdout/stderr (a
//! bounded channel paces the socket reader, which is the output back-pressure). The main
//! loop only writes to the socket, so forwarded signals are never stuck behind a slow
//! stdout; stdin is sent within the server's window ([`proto::STDIN_WINDOW`]).

use std::ffi::OsString;
use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio_util::codec::FramedRead;

use super::proto::{self, data_header, op, ExitStatus, Msg, Rlimit, Start, Winsize, CHUNK};
use super::pty::{self, RawMode};
use crate::wire::frame::{FrameDecoder, HEADER_LEN};
use crate::wire::{handshake, Addr, Auth, Hello, Psk, Role, Stream};

#[derive(Debug, Parser)]
#[command(
    name = "rexec",
    version,
    about = "Run a program on the other machine (HOST or DPU) as if it ran here",
    long_about = "Runs CMD with ARGS through rexec_server on the other machine: stdin, stdout and \
stderr stream both ways, the environment, working directory, umask and resource limits go along, \
SIGINT/SIGTERM/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2/SIGWINCH are forwarded, and rexec exits with the \
program's status (128+N if it died of signal N). If rexec dies, the remote program is killed.\n\n\
Without CMD_NET_ADDR it connects to the Unix socket /var/run/rexec/rexec_uds.sock (on a DPU, \
udsproxyd carries it to the HOST); with CMD_NET_ADDR=tcp://IP:PORT or vsock://CID:PORT it connects \
directly, authenticated with the pre-shared key.",
    after_help = "Exit status: the program's; 128+N killed by signal N; 127 command not found; 126 not \
executable or not allowed by the server's whitelist; 255 cannot connect, authentication failed, \
connection lost; 1 --kill found no such session; 2 usage error.\n\nEnvironment:\n  CMD_NET_ADDR    tcp://IP:PORT or vsock://CID:PORT (default port 7777)\n  \
REXEC_LOG_FILE  `std` logs to stderr, a path appends to that file\n  REXEC_RUN_DIR   socket and pids/ directory [default: /var/run/rexec]\n\n\
Examples:\n  rexec /bin/sh -c 'exit 7'; echo $?       # 7\n  echo hi | rexec cat\n  CMD_NET_ADDR=tcp://192.168.10.10:7777 rexec -t bash\n  \
rexec --env-only PATH,LANG env\n  rexec --kill TERM 12345                  # signal the remote process of local rexec 12345\n\n\
Wrapper script (e.g. /usr/bin/qemu-kvm on the DPU):\n  #!/bin/bash\n  exec /usr/bin/rexec /usr/bin/qemu-kvm \"$@\"\n\nSee docs/rexec.md."
)]
struct ClientArgs {
    /// Allocate a pseudo-terminal on the server (default: when stdin and stdout are terminals)
    #[arg(short = 't', long = "tty", conflicts_with = "no_tty")]
    tty: bool,
    /// Never allocate a pseudo-terminal
    #[arg(short = 'T', long = "no-tty")]
    no_tty: bool,
    /// Pass only these environment variables (comma-separated; repeatable)
    #[arg(long, value_name = "NAME,...", value_delimiter = ',')]
    env_only: Vec<String>,
    /// Signal the remote process of the local rexec LOCALPID (pid map in /var/run/rexec/pids)
    #[arg(long, num_args = 2, value_names = ["SIGNAL", "LOCALPID"], conflicts_with = "command")]
    kill: Vec<String>,
    /// Server address (tcp://IP:PORT, vsock://CID:PORT, unix:///PATH, IP:PORT) [default: $CMD_NET_ADDR, else the Unix socket]
    #[arg(long, value_name = "ADDR")]
    server: Option<String>,
    /// Pre-shared key file for TCP/vsock [default: common.key_file of the config, /etc/dpuctl/psk]
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Do not authenticate (the server must be insecure too; closed test networks only)
    #[arg(long)]
    insecure: bool,
    /// Config file [default: $DPUCTL_CONFIG, else /etc/dpuctl/config.toml]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Give up connecting after this long
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// The program and its arguments
    #[arg(
        value_name = "CMD",
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required_unless_present = "kill"
    )]
    command: Vec<OsString>,
}

/// The command line, for the manual page (`dpuctl man`).
pub(crate) fn command() -> clap::Command {
    <ClientArgs as clap::CommandFactory>::command()
}

/// Why rexec failed; [`ClientError::exit_code`] maps each to the documented exit status.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad server address {addr:?}: {source}")]
    Address {
        addr: String,
        source: crate::wire::AddrError,
    },
    #[error("cannot connect to rexec_server at {addr}: {source} ({hint})")]
    Connect {
        addr: String,
        hint: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Key(#[from] crate::wire::KeyError),
    #[error("authentication with rexec_server at {addr} failed: {source}")]
    Auth {
        addr: String,
        source: crate::wire::HandshakeError,
    },
    #[error("{message}")]
    Remote { errno: i32, message: String },
    #[error("connection to rexec_server lost: {0}")]
    Lost(String),
    #[error("protocol error: {0}")]
    Proto(#[from] proto::ProtoError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    NoSession(String),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

impl ClientError {
    /// The exit status for this error (shell conventions).
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Remote { errno, .. } => match *errno {
                libc::ENOENT => 127,
                libc::EACCES | libc::EPERM | libc::ENOEXEC | libc::EISDIR | libc::ETXTBSY => 126,
                _ => 255,
            },
            ClientError::Usage(_) | ClientError::Address { .. } => 2,
            ClientError::NoSession(_) => 1,
            _ => 255,
        }
    }
}

/// Entry point for `rexec` and `dpuctl rexec`.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let a = match ClientArgs::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => return crate::cli::clap_exit(e),
    };
    init_logging();
    let closed = closed_at_start();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rexec: cannot start the runtime: {e}");
            return ExitCode::from(255);
        }
    };
    let kill_mode = !a.kill.is_empty();
    let r = rt.block_on(async {
        if kill_mode {
            kill_main(&a).await
        } else {
            run(&a, closed).await
        }
    });
    let code = match r {
        Ok(code) => code,
        Err(e) => {
            tracing::debug!(error = ?e, "rexec failed");
            eprintln!("rexec: {e}");
            if kill_mode && matches!(e, ClientError::Remote { .. }) {
                1
            } else {
                e.exit_code()
            }
        }
    };
    // Everything is done: the output is written, the terminal restored, the pid file gone.
    // Exiting here skips tearing the runtime down, which would only touch code and data
    // that nothing needs any more.
    std::process::exit(code.into())
}

/// Which of stdin, stdout and stderr were closed when rexec started.
#[derive(Debug, Clone, Copy, Default)]
struct Closed {
    stdout: bool,
    stderr: bool,
}

/// Bit `fd` is set when descriptor `fd` (0, 1 or 2) was closed when the process started.
/// Recorded by [`record_closed_std_fds`] before Rust's runtime starts: the runtime then opens
/// `/dev/null` on every closed one (so no socket lands there), which hides a closed stdout
/// from anything that looks later — writes to it would succeed into nothing.
static CLOSED_AT_START: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Runs from `.init_array`, before `main` and the runtime: only fcntl and an atomic store.
extern "C" fn record_closed_std_fds() {
    let mut closed = 0u8;
    for fd in 0..3 {
        // SAFETY: F_GETFD reads a descriptor's flags; it touches no memory.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            closed |= 1 << fd;
        }
    }
    CLOSED_AT_START.store(closed, std::sync::atomic::Ordering::Relaxed);
}

#[used]
#[link_section = ".init_array"]
static RECORD_CLOSED_STD_FDS: extern "C" fn() = record_closed_std_fds;

/// Which of stdout and stderr were closed when rexec started.
fn closed_at_start() -> Closed {
    // Naming the constructor keeps it linked into every binary that can run rexec.
    std::hint::black_box(&RECORD_CLOSED_STD_FDS);
    let bits = CLOSED_AT_START.load(std::sync::atomic::Ordering::Relaxed);
    Closed {
        stdout: bits & 2 != 0,
        stderr: bits & 4 != 0,
    }
}

/// `REXEC_LOG_FILE=std` logs to stderr, any other value appends to that file; unset: silent.
fn init_logging() {
    let Some(target) = std::env::var_os("REXEC_LOG_FILE").filter(|v| !v.is_empty()) else {
        return;
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_target(false);
    if target == "std" {
        let _ = builder.with_writer(std::io::stderr).try_init();
    } else {
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&target)
        {
            Ok(f) => {
                let _ = builder
                    .with_ansi(false)
                    .with_writer(std::sync::Mutex::new(f))
                    .try_init();
            }
            Err(e) => eprintln!(
                "rexec: cannot open REXEC_LOG_FILE {}: {e}",
                PathBuf::from(target).display()
            ),
        }
    }
}

/// The server address: `--server`, else `CMD_NET_ADDR`, else the Unix socket.
fn target(a: &ClientArgs) -> Result<Addr, ClientError> {
    let given = a.server.clone().or_else(|| {
        std::env::var("CMD_NET_ADDR")
            .ok()
            .filter(|s| !s.trim().is_empty())
    });
    match given {
        Some(s) => super::parse_addr(&s).map_err(|source| ClientError::Address { addr: s, source }),
        None => Ok(Addr::Unix(
            super::server::rexec_dir().join(super::SOCKET_NAME),
        )),
    }
}

/// Connects and authenticates.
async fn connect(a: &ClientArgs) -> Result<Stream, ClientError> {
    let addr = target(a)?;
    let connected = addr.connect(a.connect_timeout).await;
    if let Addr::Unix(path) = &addr {
        return match connected {
            Ok(stream) => Ok(stream),
            Err(local) => match local.raw_os_error() {
                Some(libc::ENOENT | libc::ECONNREFUSED) => via_udsproxyd(a, path, local),
                _ => Err(ClientError::Connect {
                    addr: addr.to_string(),
                    hint: "is rexec_server running there?".into(),
                    source: local,
                }),
            },
        };
    }
    let mut stream = connected.map_err(|source| ClientError::Connect {
        addr: addr.to_string(),
        hint: "is rexec_server running there and reachable?".into(),
        source,
    })?;
    let (config, _) = crate::config::Config::load(a.config.as_deref())?;
    let auth = if a.insecure || config.common.insecure {
        tracing::warn!("insecure mode: this rexec connection is NOT authenticated");
        Auth::Insecure
    } else {
        let key = a.key.clone().unwrap_or(config.common.key_file);
        Auth::Psk(std::sync::Arc::new(Psk::load(&key)?))
    };
    let address = addr.to_string();
    handshake::client(
        &mut stream,
        &address,
        &auth,
        &Hello::new(Role::Rexec),
        a.connect_timeout,
    )
    .await
    .map_err(|source| ClientError::Auth {
        addr: address,
        source,
    })?;
    Ok(stream)
}

/// The local Unix socket is missing or refuses: as the LD_PRELOAD shim would, ask the local
/// udsproxyd to connect to the same path on the other machine. It routes the request only when
/// the path is on this machine's udsconnect allowlist (`qtcfg -w udsconnect -x /var/run/rexec`,
/// as the deployment guides say), so a missing local server stays a local error otherwise.
/// The exchange with udsproxyd is a short blocking one, done before anything else runs.
fn via_udsproxyd(
    a: &ClientArgs,
    path: &std::path::Path,
    local: std::io::Error,
) -> Result<Stream, ClientError> {
    use crate::uds::connect::{connect_remote, ConnectError};
    let request_socket = std::env::var_os("UDSPROXY_REQUEST_SOCKET")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| match crate::config::Config::load(a.config.as_deref()) {
            Ok((c, _)) => c.udsproxyd.request_socket_path(&c.common.run_dir),
            Err(_) => crate::uds::connect::default_request_socket(),
        });
    let addr = format!("unix://{}", path.display());
    let local_error = |hint: String| ClientError::Connect {
        addr: addr.clone(),
        hint,
        source: std::io::Error::from_raw_os_error(local.raw_os_error().unwrap_or(libc::ENOENT)),
    };
    let kind = crate::uds::proto::SockType::Stream;
    match connect_remote(
        &request_socket,
        kind,
        path,
        crate::uds::proto::FLAG_FALLBACK,
    ) {
        Ok(fd) => {
            tracing::debug!(path = %path.display(), "connected through udsproxyd");
            let std = std::os::unix::net::UnixStream::from(fd);
            std.set_nonblocking(true)
                .and_then(|()| tokio::net::UnixStream::from_std(std))
                .map(Stream::Unix)
                .map_err(|source| ClientError::Io {
                    what: "using the socket from udsproxyd",
                    source,
                })
        }
        Err(ConnectError::RequestSocket { .. }) => Err(local_error(format!(
            "is rexec_server running there, or udsproxyd (request socket {}) on a DPU?",
            request_socket.display()
        ))),
        Err(ConnectError::NotRouted) => Err(local_error(format!(
            "no rexec_server here, and udsproxyd does not route this path to the other \
             machine; to route it: qtcfg -w udsconnect -x {}",
            path.parent().unwrap_or(path).display()
        ))),
        Err(ConnectError::Refused { errno, message }) => Err(ClientError::Connect {
            addr: format!("{addr} on the other machine (through udsproxyd)"),
            hint: format!("{message}; is rexec_server running there?"),
            source: std::io::Error::from_raw_os_error(errno),
        }),
        Err(e) => Err(ClientError::Connect {
            addr: format!("{addr} through udsproxyd"),
            hint: "is udsproxyd healthy? see dpuctl status".into(),
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

/// The Start message for this process.
fn start_message(a: &ClientArgs, tty: bool, closed: Closed) -> Start {
    let env: Vec<(Vec<u8>, Vec<u8>)> = std::env::vars_os()
        .filter(|(k, _)| a.env_only.is_empty() || a.env_only.iter().any(|n| k == n.as_str()))
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
    let cwd = std::env::current_dir()
        .map(|p| p.as_os_str().as_bytes().to_vec())
        .unwrap_or_else(|_| b"/".to_vec());
    // umask can only be read by setting it; set it straight back.
    let mask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    nix::sys::stat::umask(mask);
    let rlimits = [libc::RLIMIT_CORE, libc::RLIMIT_NOFILE, libc::RLIMIT_STACK]
        .into_iter()
        .filter_map(|r| {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // The resource's C type is unsigned in glibc and signed in musl.
            #[allow(clippy::useless_conversion)]
            let resource = u32::try_from(r).ok()?;
            // SAFETY: getrlimit writes one rlimit to the valid, exclusive pointer.
            (unsafe { libc::getrlimit(r, &mut lim) } == 0).then_some(Rlimit {
                resource,
                soft: lim.rlim_cur,
                hard: lim.rlim_max,
            })
        })
        .collect();
    let winsize = if tty {
        pty::get_winsize(std::io::stdin().as_fd())
            .or_else(|| pty::get_winsize(std::io::stdout().as_fd()))
            .unwrap_or(Winsize { rows: 24, cols: 80 })
    } else {
        Winsize::default()
    };
    Start {
        argv: a.command.iter().map(|s| s.as_bytes().to_vec()).collect(),
        env,
        cwd,
        umask: mask.bits(),
        rlimits,
        tty,
        stdout_closed: closed.stdout,
        stderr_closed: closed.stderr,
        winsize,
        local_pid: std::process::id(),
    }
}

/// `/var/run/rexec/pids/<local pid>` holding the remote pid while the program runs.
struct PidFile(Option<PathBuf>);

impl PidFile {
    fn create(remote_pid: u32) -> PidFile {
        let dir = super::server::rexec_dir().join(super::PIDS_DIR);
        let path = dir.join(std::process::id().to_string());
        let write = || -> std::io::Result<()> {
            if !dir.is_dir() {
                std::fs::create_dir_all(&dir)?;
            }
            // Written beside and renamed into place, so a reader never sees an empty entry.
            let tmp = dir.join(format!(".{}.tmp", std::process::id()));
            std::fs::write(&tmp, format!("{remote_pid}\n"))
                .and_then(|()| std::fs::rename(&tmp, &path))
                .inspect_err(|_| {
                    // A full disk leaves no half-written entry behind either.
                    let _ = std::fs::remove_file(&tmp);
                })
        };
        match write() {
            Ok(()) => PidFile(Some(path)),
            Err(e) => {
                // The pid map is a convenience for `rexec --kill`; running must not depend on it.
                tracing::debug!(path = %path.display(), error = %e, "cannot write the pid map entry");
                PidFile(None)
            }
        }
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Events for the main loop.
enum Ctrl {
    Ack(u64),
    Exit(ExitStatus),
    Error { errno: i32, message: String },
    Lost(String),
    StdoutClosed,
    StderrClosed,
}

/// Output for the writer thread.
enum Out {
    Stdout(OutBuf),
    Stderr(OutBuf),
}

/// Output bytes `buf[..len]`, in a buffer the output thread hands back after writing it.
struct OutBuf {
    buf: Vec<u8>,
    len: usize,
}

/// One frame from the server: program output read into a pooled buffer, or any other message.
enum Incoming {
    Output(Out),
    Msg(Msg),
}

/// Reads the server's frames. Output payloads are read straight into buffers the output
/// thread returns once it has written them, so a long stream reuses a handful of buffers.
/// A codec that splits frames off a shared read buffer needs a fresh buffer per frame while
/// earlier ones are still being written out, and musl's allocator answers each of those
/// 256 KiB allocations with mmap, page faults and munmap.
struct FrameReader<R> {
    rd: tokio::io::BufReader<R>,
    pool: std::sync::mpsc::Receiver<Vec<u8>>,
}

impl<R: tokio::io::AsyncRead + Unpin> FrameReader<R> {
    fn new(rd: R, pool: std::sync::mpsc::Receiver<Vec<u8>>) -> Self {
        FrameReader {
            rd: tokio::io::BufReader::with_capacity(64 * 1024, rd),
            pool,
        }
    }

    /// The next frame; `Ok(None)` when the server closed the connection between frames.
    async fn next(&mut self) -> Result<Option<Incoming>, String> {
        use tokio::io::AsyncReadExt;
        let mut head = [0u8; HEADER_LEN];
        // A clean close leaves nothing unread; a close inside a header is a truncated frame.
        let n = self.rd.read(&mut head).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(None);
        }
        self.rd
            .read_exact(&mut head[n..])
            .await
            .map_err(|e| format!("reading a frame header: {e}"))?;
        let h = crate::wire::frame::Header::decode(&head, proto::MAX_FRAME)
            .map_err(|e| e.to_string())?;
        let len = h.len as usize;
        let output = h.kind == crate::wire::frame::Kind::Request
            && (h.op == op::STDOUT || h.op == op::STDERR);
        let mut buf = if output {
            self.pool.try_recv().unwrap_or_default()
        } else {
            Vec::new()
        };
        if buf.len() < len {
            buf.resize(len, 0);
        }
        self.rd
            .read_exact(&mut buf[..len])
            .await
            .map_err(|e| format!("reading a frame of {len} bytes: {e}"))?;
        if output {
            let out = OutBuf { buf, len };
            return Ok(Some(Incoming::Output(if h.op == op::STDOUT {
                Out::Stdout(out)
            } else {
                Out::Stderr(out)
            })));
        }
        buf.truncate(len);
        let frame = crate::wire::frame::Frame::new(h.kind, h.op, h.id, Bytes::from(buf));
        Msg::from_frame(frame)
            .map(|m| Some(Incoming::Msg(m)))
            .map_err(|e| e.to_string())
    }
}

/// One stdin read: a buffer with `HEADER_LEN` bytes of room in front, and its fill.
struct Chunk {
    buf: Vec<u8>,
    len: usize,
}

async fn run(a: &ClientArgs, closed: Closed) -> Result<u8, ClientError> {
    let stdin_tty = std::io::stdin().is_terminal();
    let tty = !a.no_tty && (a.tty || (stdin_tty && std::io::stdout().is_terminal()));
    let start = start_message(a, tty, closed);
    if closed.stdout && !tty {
        // The program's stdout will be closed too and it cannot say why: say it here, as
        // for any other failure to write our stdout.
        eprintln!(
            "rexec: standard output is closed; so is the program's (its writes fail with EPIPE)"
        );
    }
    // The output thread starts while we connect: it has no side effects until data arrives.
    let (ctrl_tx, mut ctrl_rx) = tokio::sync::mpsc::unbounded_channel::<Ctrl>();
    let (out_tx, out_rx) = tokio::sync::mpsc::channel::<Out>(4);
    let (pool_tx, pool_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let output_done = spawn_output_thread(out_rx, pool_tx, ctrl_tx.clone(), closed);
    let stream = connect(a).await?;
    let (rd, mut wr) = stream.into_split();
    Msg::Start(Box::new(start))
        .write_to(&mut wr)
        .await
        .map_err(|e| ClientError::Lost(e.to_string()))?;
    let mut frames = FrameReader::new(rd, pool_rx);
    let remote_pid = match frames.next().await {
        Ok(None) => {
            return Err(ClientError::Lost(
                "closed before the program started".into(),
            ))
        }
        Err(e) => return Err(ClientError::Lost(e)),
        Ok(Some(Incoming::Msg(Msg::Started { pid }))) => pid,
        Ok(Some(Incoming::Msg(Msg::Error { errno, message }))) => {
            return Err(ClientError::Remote { errno, message })
        }
        Ok(Some(Incoming::Msg(other))) => {
            return Err(ClientError::Lost(format!(
                "unexpected first answer {other:?}"
            )))
        }
        Ok(Some(Incoming::Output(_))) => {
            return Err(ClientError::Lost(
                "output before the program started".into(),
            ))
        }
    };
    tracing::debug!(remote_pid, tty, "remote program started");
    let pidfile = PidFile::create(remote_pid);
    let mut raw = if tty && stdin_tty {
        RawMode::enable().ok()
    } else {
        None
    };

    if tty && closed.stdout {
        // Nothing can show the terminal's output: hang it up at once, as the first failed
        // write would.
        eprintln!("rexec: standard output is closed; hanging up the program's terminal");
        let _ = Msg::CloseStdout.write_to(&mut wr).await;
    }
    let (mut stdin_rx, recycle) = if stdin_is_empty() {
        // /dev/null or closed: end of file at once, without a reader thread. A failed
        // write is not an error yet: the program may have finished already, and its Exit
        // (or the reason the server went away) is on its way to the reader.
        let _ = Msg::StdinEof.write_to(&mut wr).await;
        (None, None)
    } else {
        let (rx, recycle) = spawn_stdin_thread();
        (Some(rx), Some(recycle))
    };
    let reader_ctrl = ctrl_tx.clone();
    tokio::spawn(async move {
        let ctrl = reader_ctrl;
        loop {
            let msg = match frames.next().await {
                Ok(None) => {
                    let _ = ctrl.send(Ctrl::Lost("the server closed the connection".into()));
                    return;
                }
                Err(e) => {
                    let _ = ctrl.send(Ctrl::Lost(e));
                    return;
                }
                Ok(Some(Incoming::Output(out))) => {
                    let _ = out_tx.send(out).await;
                    continue;
                }
                Ok(Some(Incoming::Msg(m))) => m,
            };
            match msg {
                Msg::StdinAck(n) => {
                    let _ = ctrl.send(Ctrl::Ack(n));
                }
                Msg::Exit(st) => {
                    let _ = ctrl.send(Ctrl::Exit(st));
                    return; // drops out_tx: the output thread finishes
                }
                Msg::Error { errno, message } => {
                    let _ = ctrl.send(Ctrl::Error { errno, message });
                    return;
                }
                Msg::StdoutEof | Msg::StderrEof => {}
                other => {
                    let _ = ctrl.send(Ctrl::Lost(format!("unexpected message {other:?}")));
                    return;
                }
            }
        }
    });
    drop(ctrl_tx);
    let mut signals = forward_signals();

    let mut inflight: u64 = 0;
    let result = loop {
        tokio::select! {
            ev = ctrl_rx.recv() => match ev {
                Some(Ctrl::Ack(n)) => inflight = inflight.saturating_sub(n),
                Some(Ctrl::Exit(st)) => break Ok(st),
                Some(Ctrl::Error { errno, message }) => break Err(ClientError::Remote { errno, message }),
                Some(Ctrl::Lost(why)) => break Err(ClientError::Lost(why)),
                Some(c @ (Ctrl::StdoutClosed | Ctrl::StderrClosed)) => {
                    let msg = if matches!(c, Ctrl::StdoutClosed) { Msg::CloseStdout } else { Msg::CloseStderr };
                    if msg.write_to(&mut wr).await.is_err() {
                        break Err(ClientError::Lost("writing to the server failed".into()));
                    }
                }
                None => break Err(ClientError::Lost("the connection ended".into())),
            },
            Some(sig) = signals.recv() => {
                let msg = if sig == libc::SIGWINCH {
                    match pty::get_winsize(std::io::stdin().as_fd()) {
                        Some(ws) if tty => Msg::Winsize(ws),
                        _ => continue,
                    }
                } else {
                    Msg::Signal(sig)
                };
                tracing::debug!(sig, "forwarding");
                if msg.write_to(&mut wr).await.is_err() {
                    break Err(ClientError::Lost("writing to the server failed".into()));
                }
            }
            chunk = async { stdin_rx.as_mut()?.recv().await }, if stdin_rx.is_some() && inflight < proto::STDIN_WINDOW => {
                let r = match chunk {
                    Some(Chunk { mut buf, len }) => {
                        buf[..HEADER_LEN].copy_from_slice(&data_header(op::STDIN, len));
                        let r = wr.write_all(&buf[..HEADER_LEN + len]).await;
                        inflight += len as u64;
                        if let Some(recycle) = &recycle {
                            let _ = recycle.send(buf);
                        }
                        r
                    }
                    None => {
                        stdin_rx = None;
                        Msg::StdinEof.write_to(&mut wr).await
                    }
                };
                if r.is_err() {
                    // The server went away; its reason (Exit or close) arrives on ctrl.
                    stdin_rx = None;
                }
            }
        }
    };
    // Output first: everything the program wrote reaches our stdout before we exit.
    let _ = output_done.await;
    if let Some(r) = raw.as_mut() {
        r.restore();
    }
    drop(pidfile);
    let _ = wr.shutdown().await;
    result.map(|st| {
        tracing::debug!(status = ?st, "remote program ended");
        st.shell_code()
    })
}

/// Registers the forwarded signals; each arrival is sent as its number.
fn forward_signals() -> tokio::sync::mpsc::UnboundedReceiver<i32> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for signo in [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGWINCH,
    ] {
        match signal(SignalKind::from_raw(signo)) {
            Ok(mut s) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while s.recv().await.is_some() {
                        if tx.send(signo).is_err() {
                            return;
                        }
                    }
                });
            }
            Err(e) => tracing::debug!(signo, error = %e, "cannot forward signal"),
        }
    }
    rx
}

/// Reads stdin in a thread (never set O_NONBLOCK on a descriptor we share with our parent).
fn spawn_stdin_thread() -> (
    tokio::sync::mpsc::Receiver<Chunk>,
    std::sync::mpsc::Sender<Vec<u8>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(2);
    let (recycle_tx, recycle_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let spawned = std::thread::Builder::new()
        .name("rexec-stdin".into())
        .spawn(move || {
            let stdin = std::io::stdin();
            super::grow_pipe(stdin.as_fd());
            loop {
                let mut buf = recycle_rx
                    .try_recv()
                    .unwrap_or_else(|_| vec![0u8; HEADER_LEN + CHUNK]);
                let n = loop {
                    match nix::unistd::read(stdin.as_fd(), &mut buf[HEADER_LEN..]) {
                        Err(nix::errno::Errno::EINTR) => continue,
                        Err(e) => {
                            tracing::debug!(error = %e, "stdin read failed; sending end of file");
                            break 0;
                        }
                        Ok(n) => break n,
                    }
                };
                if n == 0 || tx.blocking_send(Chunk { buf, len: n }).is_err() {
                    return; // dropping tx is end of file
                }
            }
        });
    if let Err(e) = spawned {
        tracing::debug!(error = %e, "cannot start the stdin thread; stdin is empty");
    }
    (rx, recycle_tx)
}

/// True when stdin is /dev/null or not open: reading it could only give end of file.
fn stdin_is_empty() -> bool {
    match nix::sys::stat::fstat(std::io::stdin().as_fd()) {
        Err(_) => true,
        Ok(st) => (st.st_mode & libc::S_IFMT) == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 3),
    }
}

/// Writes stdout/stderr in a thread; the returned receiver completes when everything was
/// written. A stream that cannot be written is reported once to the main loop (the server
/// then closes the program's stream, so it sees EPIPE/SIGPIPE as it would locally, or hangs
/// up its terminal); a stdout failure other than a closed reader is also printed, since the
/// program cannot see it. Streams closed from the start were handled by the server already.
fn spawn_output_thread(
    mut rx: tokio::sync::mpsc::Receiver<Out>,
    pool: std::sync::mpsc::Sender<Vec<u8>>,
    ctrl: tokio::sync::mpsc::UnboundedSender<Ctrl>,
    closed: Closed,
) -> tokio::sync::oneshot::Receiver<()> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let body = move || {
        let (stdout, stderr) = (std::io::stdout(), std::io::stderr());
        if !closed.stdout {
            super::grow_pipe(stdout.as_fd());
        }
        // A stream closed from the start is `/dev/null` now (see [`CLOSED_AT_START`]): its
        // output is not written, and the server closed the program's end already.
        let (mut out_ok, mut err_ok) = (!closed.stdout, !closed.stderr);
        while let Some(o) = rx.blocking_recv() {
            let is_stdout = matches!(o, Out::Stdout(_));
            let (fd, data, ok) = match o {
                Out::Stdout(b) => (stdout.as_fd(), b, &mut out_ok),
                Out::Stderr(b) => (stderr.as_fd(), b, &mut err_ok),
            };
            if *ok {
                if let Err(e) = write_all_fd(fd, &data.buf[..data.len]) {
                    *ok = false;
                    if is_stdout {
                        tracing::debug!(error = %e, "stdout closed");
                        // A closed reader is the program's business (EPIPE or SIGPIPE, as
                        // locally). Anything else, a full disk say, the program only sees as
                        // a broken pipe: say what it was.
                        if e != nix::errno::Errno::EPIPE && !closed.stdout {
                            eprintln!("rexec: writing standard output: {}", e.desc());
                        }
                        let _ = ctrl.send(Ctrl::StdoutClosed);
                    } else {
                        // Nowhere to say it: stderr is what failed.
                        tracing::debug!(error = %e, "stderr closed");
                        let _ = ctrl.send(Ctrl::StderrClosed);
                    }
                }
            }
            // Back to the reader for the next frame; after the reader has gone it is dropped.
            let _ = pool.send(data.buf);
        }
        let _ = done_tx.send(());
    };
    match std::thread::Builder::new()
        .name("rexec-output".into())
        .spawn(body)
    {
        Ok(_) => done_rx,
        // Without a thread there is no way to write output.
        Err(e) => {
            eprintln!("rexec: cannot start the output thread: {e}");
            std::process::exit(255);
        }
    }
}

fn write_all_fd(fd: std::os::fd::BorrowedFd<'_>, mut data: &[u8]) -> nix::Result<()> {
    while !data.is_empty() {
        match nix::unistd::write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `rexec --kill SIGNAL LOCALPID`.
async fn kill_main(a: &ClientArgs) -> Result<u8, ClientError> {
    let (sig, local) = match a.kill.as_slice() {
        [s, p] => (s, p),
        _ => return Err(ClientError::Usage("--kill takes SIGNAL LOCALPID".into())),
    };
    let signal = parse_signal(sig)?;
    let local: u32 = local
        .parse()
        .map_err(|_| ClientError::Usage(format!("LOCALPID must be a number, not {local:?}")))?;
    let path = super::server::rexec_dir()
        .join(super::PIDS_DIR)
        .join(local.to_string());
    let pid = pid_map_entry(local, &path)?;
    let stream = connect(a).await?;
    let (rd, mut wr) = stream.into_split();
    Msg::Kill { pid, signal }
        .write_to(&mut wr)
        .await
        .map_err(|e| ClientError::Lost(e.to_string()))?;
    let mut frames = FramedRead::new(rd, FrameDecoder::new(proto::MAX_FRAME));
    match frames.next().await {
        Some(Ok(f)) => match Msg::from_frame(f)? {
            Msg::Exit(_) => Ok(0),
            Msg::Error { errno, message } => Err(ClientError::Remote { errno, message }),
            other => Err(ClientError::Lost(format!("unexpected answer {other:?}"))),
        },
        Some(Err(e)) => Err(ClientError::Lost(e.to_string())),
        None => Err(ClientError::Lost("closed without an answer".into())),
    }
}

/// The remote pid in the pid map entry `path` of local rexec `local`. No entry, or an entry
/// whose rexec is gone (killed before it could remove it), is no session: a stale entry is
/// removed on the way, so it cannot name a remote pid that has been reused since.
fn pid_map_entry(local: u32, path: &std::path::Path) -> Result<u32, ClientError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ClientError::NoSession(format!(
                "no rexec session with local pid {local} (no {})",
                path.display()
            )))
        }
        Err(source) => {
            return Err(ClientError::Io {
                what: "cannot read the pid map entry",
                source,
            })
        }
    };
    let gone = i32::try_from(local).map_or(true, |p| {
        p <= 0
            || nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None)
                == Err(nix::errno::Errno::ESRCH)
    });
    if gone {
        let removed = match std::fs::remove_file(path) {
            Ok(()) => "removed its stale entry".to_string(),
            Err(e) => format!("cannot remove its stale entry: {e}"),
        };
        return Err(ClientError::NoSession(format!(
            "no rexec session with local pid {local}: that process is gone ({removed} {})",
            path.display()
        )));
    }
    text.trim().parse().map_err(|_| {
        ClientError::NoSession(format!(
            "no rexec session with local pid {local}: {} does not hold a pid",
            path.display()
        ))
    })
}

/// `TERM`, `SIGTERM`, `term` or `15`.
pub fn parse_signal(s: &str) -> Result<i32, ClientError> {
    let t = s.trim().trim_start_matches('-');
    if let Ok(n) = t.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n)
            .map(|s| s as i32)
            .map_err(|_| ClientError::Usage(format!("{n} is not a signal number")));
    }
    let up = t.to_ascii_uppercase();
    let name = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|s| s as i32)
        .map_err(|_| ClientError::Usage(format!("{s:?} is not a signal name (try TERM, KILL, 9)")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(msgs: &[Msg]) -> Vec<u8> {
        let mut b = bytes::BytesMut::new();
        for m in msgs {
            m.to_frame().encode(&mut b);
        }
        b.to_vec()
    }

    fn output(i: Option<Incoming>) -> (bool, Vec<u8>, usize) {
        match i {
            Some(Incoming::Output(Out::Stdout(o))) => (true, o.buf[..o.len].to_vec(), o.buf.len()),
            Some(Incoming::Output(Out::Stderr(o))) => (false, o.buf[..o.len].to_vec(), o.buf.len()),
            _ => panic!("expected output"),
        }
    }

    #[tokio::test]
    async fn frame_reader_reuses_returned_buffers_and_reads_every_message() {
        let big = vec![7u8; 300 * 1024];
        let bytes = wire(&[
            Msg::Started { pid: 42 },
            Msg::Stdout(Bytes::from(big.clone())),
            Msg::Stderr(Bytes::from_static(b"oops")),
            Msg::StdoutEof,
            Msg::Exit(ExitStatus::Code(3)),
        ]);
        let (pool_tx, pool_rx) = std::sync::mpsc::channel();
        let mut r = FrameReader::new(&bytes[..], pool_rx);
        assert!(matches!(
            r.next().await.unwrap(),
            Some(Incoming::Msg(Msg::Started { pid: 42 }))
        ));
        let (is_out, data, _) = output(r.next().await.unwrap());
        assert!(is_out);
        assert_eq!(data, big);
        // A returned buffer is used again, keeping its size; only `len` bytes are output.
        pool_tx.send(vec![1u8; 512 * 1024]).unwrap();
        let (is_out, data, cap) = output(r.next().await.unwrap());
        assert!(!is_out);
        assert_eq!(data, b"oops");
        assert_eq!(cap, 512 * 1024);
        assert!(matches!(
            r.next().await.unwrap(),
            Some(Incoming::Msg(Msg::StdoutEof))
        ));
        assert!(matches!(
            r.next().await.unwrap(),
            Some(Incoming::Msg(Msg::Exit(ExitStatus::Code(3))))
        ));
        assert!(
            r.next().await.unwrap().is_none(),
            "a clean close is the end"
        );
    }

    #[tokio::test]
    async fn frame_reader_reports_truncated_and_malformed_frames() {
        let (_tx, rx) = std::sync::mpsc::channel();
        let bytes = wire(&[Msg::Stdout(Bytes::from_static(b"hello world"))]);
        // Cut inside the header and inside the payload: errors, not a clean end.
        for cut in [5, HEADER_LEN + 3] {
            let (_tx, rx) = std::sync::mpsc::channel();
            let mut r = FrameReader::new(&bytes[..cut], rx);
            assert!(r.next().await.is_err(), "cut at {cut}");
        }
        // A length beyond the frame limit is refused before anything is allocated.
        let mut huge = data_header(op::STDOUT, 0);
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut r = FrameReader::new(&huge[..], rx);
        assert!(r.next().await.is_err());
    }

    #[test]
    fn signal_names() {
        assert_eq!(parse_signal("TERM").unwrap(), libc::SIGTERM);
        assert_eq!(parse_signal("sigkill").unwrap(), libc::SIGKILL);
        assert_eq!(parse_signal("-9").unwrap(), 9);
        assert_eq!(parse_signal("usr1").unwrap(), libc::SIGUSR1);
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("999").is_err());
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        let remote = |errno| ClientError::Remote {
            errno,
            message: String::new(),
        };
        assert_eq!(remote(libc::ENOENT).exit_code(), 127);
        assert_eq!(remote(libc::EACCES).exit_code(), 126);
        assert_eq!(remote(libc::EPERM).exit_code(), 126);
        assert_eq!(ClientError::Lost(String::new()).exit_code(), 255);
    }

    #[test]
    fn command_args_are_not_rexec_options() {
        let a = ClientArgs::try_parse_from(["rexec", "-t", "ls", "-l", "--kill", "x"]).unwrap();
        assert!(a.tty);
        assert_eq!(a.command, vec!["ls", "-l", "--kill", "x"]);
        let a = ClientArgs::try_parse_from(["rexec", "--env-only", "A,B", "--", "env"]).unwrap();
        assert_eq!(a.env_only, vec!["A", "B"]);
        let start = start_message(&a, false, Closed::default());
        assert!(start.env.iter().all(|(k, _)| k == b"A" || k == b"B"));
        assert_eq!(start.argv, vec![b"env".to_vec()]);
        let a = ClientArgs::try_parse_from(["rexec", "--kill", "TERM", "12"]).unwrap();
        assert_eq!(a.kill, vec!["TERM", "12"]);
        assert!(ClientArgs::try_parse_from(["rexec"]).is_err());
    }
}
