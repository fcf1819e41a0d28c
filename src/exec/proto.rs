//! The rexec session protocol: the messages a `rexec` client and `rexec_server` exchange on
//! one connection, carried in the wire layer's frames ([`crate::wire::frame`]).
//!
//! One connection is one session. After the transport is authenticated (SO_PEERCRED on the
//! Unix socket, the PSK handshake on TCP/vsock) the client sends exactly one [`Msg::Start`]
//! (or [`Msg::Kill`]); the server answers [`Msg::Started`] or [`Msg::Error`], then both sides
//! stream. Every message is a `Request` frame whose `op` names the message (id 0), except
//! [`Msg::Error`], which is an `Error` frame (errno + text, so a remote ENOENT stays ENOENT).
//! Stdio data travels as raw payload bytes after the 16-byte header; the hot paths build
//! that header with [`data_header`] in front of their own reusable buffers, so no data byte
//! is copied or serialised.
//!
//! Flow control: output is paced by the socket (a reader that stops reading stops the
//! writer). Stdin is paced by a window: the client keeps at most [`STDIN_WINDOW`] bytes
//! unacknowledged and the server acknowledges ([`Msg::StdinAck`]) what it wrote to the
//! program. That keeps the server's socket reader free to act on `Signal` frames while a
//! program is not reading its stdin — `yes | rexec sleep 100` still answers Ctrl-C.
//!
//! Concurrency: pure encoding and decoding; no state.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::wire::frame::{self, Frame, Header, Kind, HEADER_LEN};

/// Version of this message set, sent first in `Start` and `Kill`.
pub const REXEC_PROTO_VERSION: u16 = 1;
/// Largest stdio payload one data frame carries: big enough that a 1 GiB stream is a few
/// thousand frames, small enough that a buffer per stream stays cheap.
pub const CHUNK: usize = 256 * 1024;
/// Size an output buffer starts at: a short-lived program's output fits, and the buffer
/// grows to [`CHUNK`] on the first read that fills it. Zeroed at full size, the two output
/// buffers cost every session half a megabyte of page faults that a `rexec true` never used.
pub const FIRST_CHUNK: usize = 16 * 1024;
/// Unacknowledged stdin bytes a client may have in flight (4 chunks keep the pipe busy).
pub const STDIN_WINDOW: u64 = 4 * CHUNK as u64;
/// Largest frame either side accepts: a `Start` with a big environment (Linux ARG_MAX is
/// 2 MiB for argv + env together) fits, and a data frame is far below it.
pub const MAX_FRAME: usize = 4 * 1024 * 1024 + HEADER_LEN;

/// Operation codes (header `op`).
pub mod op {
    /// Client → server: run a program.
    pub const START: u16 = 1;
    /// Client → server: signal a process another session started (`rexec --kill`).
    pub const KILL: u16 = 2;
    /// Client → server: stdin bytes.
    pub const STDIN: u16 = 3;
    /// Client → server: stdin reached end of file.
    pub const STDIN_EOF: u16 = 4;
    /// Client → server: deliver a signal to the program.
    pub const SIGNAL: u16 = 5;
    /// Client → server: the terminal size changed.
    pub const WINSIZE: u16 = 6;
    /// Client → server: writing the client's stdout failed (EPIPE, ENOSPC, ...); close the
    /// program's stdout, or hang up its terminal.
    pub const CLOSE_STDOUT: u16 = 7;
    /// Client → server: writing the client's stderr failed; close the program's stderr.
    pub const CLOSE_STDERR: u16 = 8;
    /// Server → client: the program runs with this pid.
    pub const STARTED: u16 = 16;
    /// Server → client: stdout bytes.
    pub const STDOUT: u16 = 17;
    /// Server → client: stderr bytes.
    pub const STDERR: u16 = 18;
    /// Server → client: stdout reached end of file.
    pub const STDOUT_EOF: u16 = 19;
    /// Server → client: stderr reached end of file.
    pub const STDERR_EOF: u16 = 20;
    /// Server → client: the program ended.
    pub const EXIT: u16 = 21;
    /// Server → client: stdin bytes written to the program (frees window).
    pub const STDIN_ACK: u16 = 22;
    /// Either way, in an `Error` frame: the session failed.
    pub const ERROR: u16 = 23;
}

/// Terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Winsize {
    pub rows: u16,
    pub cols: u16,
}

/// A resource limit the client wants the program to have (`RLIMIT_*` number, soft, hard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// What to run and how. Strings are raw bytes: Unix argv and environment need not be UTF-8.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Start {
    pub argv: Vec<Vec<u8>>,
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    pub cwd: Vec<u8>,
    pub umask: u32,
    pub rlimits: Vec<Rlimit>,
    /// Allocate a pseudo-terminal for the program's stdio.
    pub tty: bool,
    /// The client's stdout is closed: the program's stdout is a pipe nobody reads, so its
    /// first write fails (EPIPE/SIGPIPE) instead of succeeding into a void. Pipes only.
    pub stdout_closed: bool,
    /// The same for stderr.
    pub stderr_closed: bool,
    pub winsize: Winsize,
    /// The client's own pid, for the session list and logs.
    pub local_pid: u32,
}

/// How the program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// exit(code).
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// The shell convention: the code, or 128 + the signal number.
    pub fn shell_code(self) -> u8 {
        match self {
            ExitStatus::Code(c) => (c & 0xff) as u8,
            ExitStatus::Signal(s) => (128 + (s & 0x7f)) as u8,
        }
    }
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Start(Box<Start>),
    Kill { pid: u32, signal: i32 },
    Stdin(Bytes),
    StdinEof,
    Signal(i32),
    Winsize(Winsize),
    CloseStdout,
    CloseStderr,
    Started { pid: u32 },
    Stdout(Bytes),
    Stderr(Bytes),
    StdoutEof,
    StderrEof,
    Exit(ExitStatus),
    StdinAck(u64),
    Error { errno: i32, message: String },
}

/// Why a frame is not a valid rexec message. Each is fatal for the session.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("unexpected frame kind {0:?}: the peer is not a rexec peer")]
    Kind(Kind),
    #[error("unknown rexec operation {0}: the peer runs a newer or different rexec protocol")]
    Op(u16),
    #[error("rexec protocol version {0} is not supported (this build speaks {REXEC_PROTO_VERSION}): upgrade the older side")]
    Version(u16),
    #[error("truncated {what} message: the peer sent garbage")]
    Truncated { what: &'static str },
    #[error("{0}")]
    Frame(#[from] frame::FrameError),
}

/// The 16-byte header of a data frame (`Stdin`, `Stdout`, `Stderr`) of `len` payload bytes.
/// `len` is at most [`CHUNK`], far below the frame limit.
pub fn data_header(op: u16, len: usize) -> [u8; HEADER_LEN] {
    Header {
        len: u32::try_from(len).unwrap_or(u32::MAX),
        kind: Kind::Request,
        flags: 0,
        op,
        id: 0,
    }
    .encode()
}

impl Msg {
    /// The frame carrying this message.
    pub fn to_frame(&self) -> Frame {
        let req = |op: u16, payload: Bytes| Frame::new(Kind::Request, op, 0, payload);
        match self {
            Msg::Start(s) => req(op::START, encode_start(s)),
            Msg::Kill { pid, signal } => {
                let mut b = BytesMut::with_capacity(10);
                b.put_u16(REXEC_PROTO_VERSION);
                b.put_u32(*pid);
                b.put_i32(*signal);
                req(op::KILL, b.freeze())
            }
            Msg::Stdin(d) => req(op::STDIN, d.clone()),
            Msg::StdinEof => req(op::STDIN_EOF, Bytes::new()),
            Msg::Signal(s) => req(op::SIGNAL, Bytes::copy_from_slice(&s.to_be_bytes())),
            Msg::Winsize(w) => {
                let mut b = BytesMut::with_capacity(4);
                b.put_u16(w.rows);
                b.put_u16(w.cols);
                req(op::WINSIZE, b.freeze())
            }
            Msg::CloseStdout => req(op::CLOSE_STDOUT, Bytes::new()),
            Msg::CloseStderr => req(op::CLOSE_STDERR, Bytes::new()),
            Msg::Started { pid } => req(op::STARTED, Bytes::copy_from_slice(&pid.to_be_bytes())),
            Msg::Stdout(d) => req(op::STDOUT, d.clone()),
            Msg::Stderr(d) => req(op::STDERR, d.clone()),
            Msg::StdoutEof => req(op::STDOUT_EOF, Bytes::new()),
            Msg::StderrEof => req(op::STDERR_EOF, Bytes::new()),
            Msg::Exit(st) => {
                let mut b = BytesMut::with_capacity(5);
                match st {
                    ExitStatus::Code(c) => {
                        b.put_u8(0);
                        b.put_i32(*c);
                    }
                    ExitStatus::Signal(s) => {
                        b.put_u8(1);
                        b.put_i32(*s);
                    }
                }
                req(op::EXIT, b.freeze())
            }
            Msg::StdinAck(n) => req(op::STDIN_ACK, Bytes::copy_from_slice(&n.to_be_bytes())),
            Msg::Error { errno, message } => Frame::new(
                Kind::Error,
                op::ERROR,
                0,
                frame::encode_error(*errno, message),
            ),
        }
    }

    /// Parses a frame.
    pub fn from_frame(f: Frame) -> Result<Msg, ProtoError> {
        let mut p = f.payload;
        match f.kind {
            Kind::Error => {
                let (errno, message) = frame::decode_error(&p)?;
                return Ok(Msg::Error { errno, message });
            }
            Kind::Request => {}
            other => return Err(ProtoError::Kind(other)),
        }
        let need = |p: &Bytes, n: usize, what: &'static str| {
            if p.remaining() < n {
                Err(ProtoError::Truncated { what })
            } else {
                Ok(())
            }
        };
        Ok(match f.op {
            op::START => Msg::Start(Box::new(decode_start(&mut p)?)),
            op::KILL => {
                need(&p, 10, "kill")?;
                check_version(p.get_u16())?;
                Msg::Kill {
                    pid: p.get_u32(),
                    signal: p.get_i32(),
                }
            }
            op::STDIN => Msg::Stdin(p),
            op::STDIN_EOF => Msg::StdinEof,
            op::SIGNAL => {
                need(&p, 4, "signal")?;
                Msg::Signal(p.get_i32())
            }
            op::WINSIZE => {
                need(&p, 4, "winsize")?;
                Msg::Winsize(Winsize {
                    rows: p.get_u16(),
                    cols: p.get_u16(),
                })
            }
            op::CLOSE_STDOUT => Msg::CloseStdout,
            op::CLOSE_STDERR => Msg::CloseStderr,
            op::STARTED => {
                need(&p, 4, "started")?;
                Msg::Started { pid: p.get_u32() }
            }
            op::STDOUT => Msg::Stdout(p),
            op::STDERR => Msg::Stderr(p),
            op::STDOUT_EOF => Msg::StdoutEof,
            op::STDERR_EOF => Msg::StderrEof,
            op::EXIT => {
                need(&p, 5, "exit")?;
                let how = p.get_u8();
                let v = p.get_i32();
                Msg::Exit(if how == 0 {
                    ExitStatus::Code(v)
                } else {
                    ExitStatus::Signal(v)
                })
            }
            op::STDIN_ACK => {
                need(&p, 8, "stdin ack")?;
                Msg::StdinAck(p.get_u64())
            }
            other => return Err(ProtoError::Op(other)),
        })
    }

    /// Writes the message (header and payload) to `w`.
    pub async fn write_to<W: AsyncWrite + Unpin>(&self, w: &mut W) -> std::io::Result<()> {
        let mut b = BytesMut::new();
        self.to_frame().encode(&mut b);
        w.write_all(&b).await
    }
}

fn check_version(v: u16) -> Result<(), ProtoError> {
    if v == REXEC_PROTO_VERSION {
        Ok(())
    } else {
        Err(ProtoError::Version(v))
    }
}

fn put_bytes(b: &mut BytesMut, s: &[u8]) {
    b.put_u32(u32::try_from(s.len()).unwrap_or(u32::MAX));
    b.put_slice(s);
}

fn get_bytes(p: &mut Bytes, what: &'static str) -> Result<Vec<u8>, ProtoError> {
    if p.remaining() < 4 {
        return Err(ProtoError::Truncated { what });
    }
    let n = p.get_u32() as usize;
    if p.remaining() < n {
        return Err(ProtoError::Truncated { what });
    }
    Ok(p.split_to(n).to_vec())
}

/// Reads a count and checks that at least `min_each` bytes per element remain, so a hostile
/// count cannot make us reserve more than the frame holds.
fn get_count(p: &mut Bytes, min_each: usize, what: &'static str) -> Result<usize, ProtoError> {
    if p.remaining() < 4 {
        return Err(ProtoError::Truncated { what });
    }
    let n = p.get_u32() as usize;
    if n.saturating_mul(min_each) > p.remaining() {
        return Err(ProtoError::Truncated { what });
    }
    Ok(n)
}

/// `Start`'s flags byte: bit 0 is `tty` (the byte was a bool before the other bits were
/// added, so a client that sets none of them encodes as it always did).
const START_STDOUT_CLOSED: u8 = 1;
/// Bit of `Start`'s flags byte for `stderr_closed`.
const START_STDERR_CLOSED: u8 = 2;

fn encode_start(s: &Start) -> Bytes {
    let size = 32
        + s.argv.iter().map(|a| a.len() + 4).sum::<usize>()
        + s.env
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum::<usize>()
        + s.cwd.len()
        + s.rlimits.len() * 20;
    let mut b = BytesMut::with_capacity(size);
    b.put_u16(REXEC_PROTO_VERSION);
    b.put_u8(
        u8::from(s.tty)
            | u8::from(s.stdout_closed) << START_STDOUT_CLOSED
            | u8::from(s.stderr_closed) << START_STDERR_CLOSED,
    );
    b.put_u16(s.winsize.rows);
    b.put_u16(s.winsize.cols);
    b.put_u32(s.umask);
    b.put_u32(s.local_pid);
    b.put_u32(s.argv.len() as u32);
    for a in &s.argv {
        put_bytes(&mut b, a);
    }
    b.put_u32(s.env.len() as u32);
    for (k, v) in &s.env {
        put_bytes(&mut b, k);
        put_bytes(&mut b, v);
    }
    put_bytes(&mut b, &s.cwd);
    b.put_u32(s.rlimits.len() as u32);
    for r in &s.rlimits {
        b.put_u32(r.resource);
        b.put_u64(r.soft);
        b.put_u64(r.hard);
    }
    b.freeze()
}

fn decode_start(p: &mut Bytes) -> Result<Start, ProtoError> {
    const W: &str = "start";
    if p.remaining() < 15 {
        return Err(ProtoError::Truncated { what: W });
    }
    check_version(p.get_u16())?;
    let flags = p.get_u8();
    let tty = flags & 1 != 0;
    let stdout_closed = flags & (1 << START_STDOUT_CLOSED) != 0;
    let stderr_closed = flags & (1 << START_STDERR_CLOSED) != 0;
    let winsize = Winsize {
        rows: p.get_u16(),
        cols: p.get_u16(),
    };
    let umask = p.get_u32();
    let local_pid = p.get_u32();
    let n = get_count(p, 4, W)?;
    let mut argv = Vec::with_capacity(n);
    for _ in 0..n {
        argv.push(get_bytes(p, W)?);
    }
    let n = get_count(p, 8, W)?;
    let mut env = Vec::with_capacity(n);
    for _ in 0..n {
        let k = get_bytes(p, W)?;
        let v = get_bytes(p, W)?;
        env.push((k, v));
    }
    let cwd = get_bytes(p, W)?;
    let n = get_count(p, 20, W)?;
    let mut rlimits = Vec::with_capacity(n);
    for _ in 0..n {
        rlimits.push(Rlimit {
            resource: p.get_u32(),
            soft: p.get_u64(),
            hard: p.get_u64(),
        });
    }
    Ok(Start {
        argv,
        env,
        cwd,
        umask,
        rlimits,
        tty,
        stdout_closed,
        stderr_closed,
        winsize,
        local_pid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::{FrameDecoder, DEFAULT_MAX_FRAME};
    use proptest::prelude::*;
    use tokio_util::codec::Decoder;

    fn round_trip(m: Msg) {
        let mut buf = BytesMut::new();
        m.to_frame().encode(&mut buf);
        let f = FrameDecoder::new(DEFAULT_MAX_FRAME)
            .decode(&mut buf)
            .unwrap()
            .unwrap();
        assert_eq!(Msg::from_frame(f).unwrap(), m);
    }

    #[test]
    fn every_message_round_trips() {
        let start = Start {
            argv: vec![b"/bin/sh".to_vec(), b"-c".to_vec(), vec![0xff, 0x00, b'x']],
            env: vec![
                (b"PATH".to_vec(), b"/bin".to_vec()),
                (b"E".to_vec(), vec![]),
            ],
            cwd: b"/tmp".to_vec(),
            umask: 0o022,
            rlimits: vec![Rlimit {
                resource: 4,
                soft: u64::MAX,
                hard: 7,
            }],
            tty: true,
            stdout_closed: false,
            stderr_closed: true,
            winsize: Winsize { rows: 24, cols: 80 },
            local_pid: 4242,
        };
        let closed = Start {
            stdout_closed: true,
            ..Start::default()
        };
        for m in [
            Msg::Start(Box::new(start)),
            Msg::Start(Box::default()),
            Msg::Start(Box::new(closed)),
            Msg::Kill { pid: 9, signal: 15 },
            Msg::Stdin(Bytes::from_static(b"data")),
            Msg::StdinEof,
            Msg::Signal(2),
            Msg::Winsize(Winsize { rows: 1, cols: 2 }),
            Msg::CloseStdout,
            Msg::CloseStderr,
            Msg::Started { pid: 77 },
            Msg::Stdout(Bytes::from_static(b"out")),
            Msg::Stderr(Bytes::new()),
            Msg::StdoutEof,
            Msg::StderrEof,
            Msg::Exit(ExitStatus::Code(7)),
            Msg::Exit(ExitStatus::Signal(9)),
            Msg::StdinAck(1 << 40),
            Msg::Error {
                errno: 2,
                message: "not found".into(),
            },
        ] {
            round_trip(m);
        }
    }

    #[test]
    fn golden_data_header_and_exit() {
        assert_eq!(
            data_header(op::STDOUT, 3),
            [0, 0, 0, 3, 0x01, 0, 0, 17, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let mut b = BytesMut::new();
        Msg::Exit(ExitStatus::Signal(15)).to_frame().encode(&mut b);
        assert_eq!(&b[16..], &[1, 0, 0, 0, 15]);
        assert_eq!(ExitStatus::Signal(15).shell_code(), 143);
        assert_eq!(ExitStatus::Code(7).shell_code(), 7);
        assert_eq!(ExitStatus::Code(256).shell_code(), 0);
    }

    #[test]
    fn bad_messages_are_refused() {
        let f = |op: u16, p: &'static [u8]| Frame::new(Kind::Request, op, 0, Bytes::from_static(p));
        assert!(matches!(
            Msg::from_frame(f(99, b"")),
            Err(ProtoError::Op(99))
        ));
        assert!(matches!(
            Msg::from_frame(f(op::EXIT, b"\x00")),
            Err(ProtoError::Truncated { .. })
        ));
        assert!(matches!(
            Msg::from_frame(f(op::KILL, b"\x00\x09\x00\x00\x00\x01\x00\x00\x00\x0f")),
            Err(ProtoError::Version(9))
        ));
        assert!(matches!(
            Msg::from_frame(Frame::new(Kind::Ping, 0, 0, Bytes::new())),
            Err(ProtoError::Kind(Kind::Ping))
        ));
        // A count claiming four billion argv entries in a tiny payload.
        let mut b = BytesMut::new();
        b.put_u16(REXEC_PROTO_VERSION);
        b.put_slice(&[0; 13]);
        b.put_u32(u32::MAX);
        assert!(matches!(
            Msg::from_frame(Frame::new(Kind::Request, op::START, 0, b.freeze())),
            Err(ProtoError::Truncated { .. })
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_payloads_never_panic(op in 0u16..32, data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Msg::from_frame(Frame::new(Kind::Request, op, 0, data.into()));
        }
    }
}
