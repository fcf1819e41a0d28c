//! udsproxyd's message formats (docs/udsproxyd.md §Protocol is the normative layout):
//!
//! - the **connect request** that opens a stream on the peer link ([`OP_CONNECT`]);
//! - the **local request** a client writes on the request socket and the **reply** it reads
//!   back (the LD_PRELOAD shim in `shim/` speaks the same bytes and keeps its own copy of
//!   these constants: a golden-bytes test here pins them);
//! - **records**: datagram and seqpacket messages travel in stream data as a u32 big-endian
//!   length followed by the message, so their boundaries survive the byte stream;
//! - **fd passing** (docs/udsproxyd.md §fd passing): the connection token in a connect
//!   stream's Accept, the [`OP_PIPE`] stream that carries a passed pipe, and the [`Attach`]
//!   call ([`OP_ATTACH`]) that hands descriptors to the receiver at a byte offset.
//!
//! Everything here is plain functions on byte slices; no I/O and no shared state.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Stream-open `op` on the peer link: connect to a Unix socket on the peer.
pub const OP_CONNECT: u16 = 1;

/// Stream-open `op` on the peer link: a passed pipe or FIFO, carried as a byte stream.
/// Open payload: one [`PipeDir`] byte; Accept payload: the pipe id (u64 big-endian).
pub const OP_PIPE: u16 = 2;
/// Call `op` on the peer link: attach descriptors to bytes of a proxied connection
/// ([`Attach`]). The answer is empty, or an Error whose errno ends the connection.
pub const OP_ATTACH: u16 = 1;
/// Most descriptors one message may carry (the kernel's SCM_MAX_FD is 253; ours is the
/// control buffer we read with).
pub const MAX_FDS: usize = 32;

/// Magic of a local request.
pub const REQUEST_MAGIC: &[u8; 4] = b"UDSP";
/// Magic of a reply.
pub const REPLY_MAGIC: &[u8; 4] = b"UDSR";
/// Version byte of the local request.
pub const REQUEST_VERSION: u8 = 1;
/// Fixed part of a local request: magic, version, type, flags, reserved, u16 path length.
pub const REQUEST_HEADER: usize = 10;
/// Fixed part of a reply: magic, status, reserved, u16 message length, i32 errno.
pub const REPLY_HEADER: usize = 12;
/// Request flag: the client tried the path locally first (the shim). Only paths on this
/// side's `udsconnect` allowlist are routed; others get [`Reply::NotRouted`].
pub const FLAG_FALLBACK: u8 = 1;
/// Longest socket path accepted (a `sun_path` holds 108 bytes; the rest is refused clearly).
pub const MAX_PATH: usize = 4095;
/// Largest datagram or seqpacket message carried (the kernel's own limit is lower).
pub const MAX_RECORD: usize = 1 << 20;

/// Reply status byte: connected.
const STATUS_OK: u8 = 0;
/// Reply status byte: failed with an errno.
const STATUS_ERROR: u8 = 1;
/// Reply status byte: not a remote path here; the caller keeps its own error.
const STATUS_NOT_ROUTED: u8 = 2;

/// The socket type a client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SockType {
    /// SOCK_STREAM.
    Stream,
    /// SOCK_DGRAM.
    Dgram,
    /// SOCK_SEQPACKET.
    Seqpacket,
}

impl SockType {
    /// The byte on the wire.
    pub fn to_u8(self) -> u8 {
        match self {
            SockType::Stream => 1,
            SockType::Dgram => 2,
            SockType::Seqpacket => 3,
        }
    }

    /// Parses the wire byte.
    pub fn from_u8(b: u8) -> Option<SockType> {
        match b {
            1 => Some(SockType::Stream),
            2 => Some(SockType::Dgram),
            3 => Some(SockType::Seqpacket),
            _ => None,
        }
    }

    /// `stream`, `dgram` or `seqpacket` (status and logs).
    pub fn as_str(self) -> &'static str {
        match self {
            SockType::Stream => "stream",
            SockType::Dgram => "dgram",
            SockType::Seqpacket => "seqpacket",
        }
    }

    /// True when messages keep their boundaries (travel as records).
    pub fn is_packet(self) -> bool {
        self != SockType::Stream
    }
}

impl std::str::FromStr for SockType {
    type Err = String;
    fn from_str(s: &str) -> Result<SockType, String> {
        match s {
            "stream" => Ok(SockType::Stream),
            "dgram" => Ok(SockType::Dgram),
            "seqpacket" => Ok(SockType::Seqpacket),
            _ => Err(format!(
                "unknown socket type {s:?}: use stream, dgram or seqpacket"
            )),
        }
    }
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// Fewer bytes than the fixed part.
    #[error("message of {0} bytes is too short")]
    Short(usize),
    /// Wrong magic: not a udsproxyd client.
    #[error("not a udsproxyd request (bad magic): is the client speaking to the right socket?")]
    BadMagic,
    /// A request version this daemon does not know.
    #[error("request version {0} is not supported (this udsproxyd speaks version 1): upgrade the client or the daemon")]
    BadVersion(u8),
    /// Unknown socket type byte.
    #[error("unknown socket type {0}: use stream (1), dgram (2) or seqpacket (3)")]
    BadType(u8),
    /// Empty, relative or over-long path.
    #[error("socket path must be absolute and at most {MAX_PATH} bytes (got {0} bytes)")]
    BadPath(usize),
    /// A record longer than [`MAX_RECORD`].
    #[error("message of {0} bytes exceeds the {MAX_RECORD}-byte limit")]
    RecordTooLarge(usize),
    /// An attach message that does not parse.
    #[error("malformed fd attach message: {0}")]
    BadAttach(&'static str),
}

/// Which way the bytes of a passed pipe flow, seen from the side that received the
/// descriptor from its local client (the opener of the [`OP_PIPE`] stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipeDir {
    /// The client passed a **read end**: the opener reads it and sends the bytes; the far
    /// receiver gets the read end of a new pipe the far daemon fills (byte 1).
    ToReceiver,
    /// The client passed a **write end**: the far receiver gets the write end of a new pipe,
    /// the far daemon sends what it reads from it, and the opener writes it here (byte 2).
    FromReceiver,
}

impl PipeDir {
    /// The open payload byte.
    pub fn to_u8(self) -> u8 {
        match self {
            PipeDir::ToReceiver => 1,
            PipeDir::FromReceiver => 2,
        }
    }

    /// Parses the open payload byte.
    pub fn from_u8(b: u8) -> Option<PipeDir> {
        match b {
            1 => Some(PipeDir::ToReceiver),
            2 => Some(PipeDir::FromReceiver),
            _ => None,
        }
    }
}

/// One descriptor of an [`Attach`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdSpec {
    /// A pipe already opened as an [`OP_PIPE`] stream; `id` is from its Accept.
    Pipe {
        /// The direction of the stream (says which end the receiver gets).
        dir: PipeDir,
        /// The pipe id the receiver chose.
        id: u64,
    },
    /// A regular file to reopen at the same path.
    File {
        /// `O_ACCMODE` bits plus `O_APPEND`, Linux values.
        flags: u32,
        /// The file offset (lseek SEEK_CUR) when it was passed.
        offset: u64,
        /// The absolute path (readlink of /proc/self/fd/N).
        path: PathBuf,
    },
}

/// Kind byte of an [`FdSpec::Pipe`] receiving a read end.
const FD_PIPE_READ: u8 = 1;
/// Kind byte of an [`FdSpec::Pipe`] receiving a write end.
const FD_PIPE_WRITE: u8 = 2;
/// Kind byte of an [`FdSpec::File`].
const FD_FILE: u8 = 3;
/// Fixed part of an [`Attach`].
const ATTACH_HEADER: usize = 24;

/// "Hand these descriptors to the local receiver together with the `len` stream bytes that
/// follow the first `offset` bytes of connection `token`" ([`OP_ATTACH`]). The sender waits
/// for the answer before it sends those bytes, so the receiver always knows of an attach
/// before its bytes arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach {
    /// True when the token was chosen by the sender of this call (it accepted the
    /// connection); false when chosen by the receiver (byte 1 / 0 on the wire).
    pub senders_token: bool,
    /// The connection token (from the connect stream's Accept payload).
    pub token: u64,
    /// Stream bytes of the sender's direction before the carrying bytes.
    pub offset: u64,
    /// Number of bytes the descriptors came with (at least 1).
    pub len: u32,
    /// The descriptors, in the order the client sent them (1..=[`MAX_FDS`]).
    pub fds: Vec<FdSpec>,
}

impl Attach {
    /// The call payload.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(ATTACH_HEADER + 64 * self.fds.len());
        b.put_u8(u8::from(self.senders_token));
        b.put_u8(self.fds.len() as u8);
        b.put_u16(0);
        b.put_u64(self.token);
        b.put_u64(self.offset);
        b.put_u32(self.len);
        for fd in &self.fds {
            match fd {
                FdSpec::Pipe { dir, id } => {
                    b.put_u8(match dir {
                        PipeDir::ToReceiver => FD_PIPE_READ,
                        PipeDir::FromReceiver => FD_PIPE_WRITE,
                    });
                    b.put_u64(*id);
                }
                FdSpec::File {
                    flags,
                    offset,
                    path,
                } => {
                    let p = path.as_os_str().as_bytes();
                    b.put_u8(FD_FILE);
                    b.put_u32(*flags);
                    b.put_u64(*offset);
                    b.put_u16(p.len() as u16);
                    b.put_slice(p);
                }
            }
        }
        b.freeze()
    }

    /// Parses and checks an attach payload.
    pub fn decode(mut b: &[u8]) -> Result<Attach, ProtoError> {
        if b.len() < ATTACH_HEADER {
            return Err(ProtoError::Short(b.len()));
        }
        let senders_token = match b.get_u8() {
            0 => false,
            1 => true,
            _ => return Err(ProtoError::BadAttach("token owner must be 0 or 1")),
        };
        let count = usize::from(b.get_u8());
        if count == 0 || count > MAX_FDS {
            return Err(ProtoError::BadAttach("descriptor count must be 1..=32"));
        }
        b.advance(2);
        let token = b.get_u64();
        let offset = b.get_u64();
        let len = b.get_u32();
        if len == 0 {
            return Err(ProtoError::BadAttach("descriptors need at least one byte"));
        }
        let mut fds = Vec::with_capacity(count);
        for _ in 0..count {
            if b.is_empty() {
                return Err(ProtoError::BadAttach("truncated descriptor"));
            }
            match b.get_u8() {
                k @ (FD_PIPE_READ | FD_PIPE_WRITE) => {
                    if b.len() < 8 {
                        return Err(ProtoError::BadAttach("truncated pipe"));
                    }
                    let dir = if k == FD_PIPE_READ {
                        PipeDir::ToReceiver
                    } else {
                        PipeDir::FromReceiver
                    };
                    fds.push(FdSpec::Pipe {
                        dir,
                        id: b.get_u64(),
                    });
                }
                FD_FILE => {
                    if b.len() < 14 {
                        return Err(ProtoError::BadAttach("truncated file"));
                    }
                    let flags = b.get_u32();
                    let offset = b.get_u64();
                    let n = usize::from(b.get_u16());
                    if b.len() < n {
                        return Err(ProtoError::BadAttach("truncated file path"));
                    }
                    let path = check_path(&b[..n])?;
                    b.advance(n);
                    fds.push(FdSpec::File {
                        flags,
                        offset,
                        path,
                    });
                }
                _ => return Err(ProtoError::BadAttach("unknown descriptor kind")),
            }
        }
        if !b.is_empty() {
            return Err(ProtoError::BadAttach("trailing bytes"));
        }
        Ok(Attach {
            senders_token,
            token,
            offset,
            len,
            fds,
        })
    }
}

/// A u64 answer payload (connection token, pipe id), big-endian.
pub fn encode_id(id: u64) -> Bytes {
    Bytes::copy_from_slice(&id.to_be_bytes())
}

/// Parses a u64 answer payload; `None` when it is not 8 bytes (an older peer's empty
/// Accept: it does not take part in fd passing).
pub fn decode_id(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

/// "Connect me to `path` with a socket of type `kind`", as sent on the peer link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The socket type.
    pub kind: SockType,
    /// The socket path on the peer.
    pub path: PathBuf,
}

impl ConnectRequest {
    /// Type byte, then the path bytes.
    pub fn encode(&self) -> Bytes {
        let p = self.path.as_os_str().as_bytes();
        let mut b = BytesMut::with_capacity(1 + p.len());
        b.put_u8(self.kind.to_u8());
        b.put_slice(p);
        b.freeze()
    }

    /// Parses and checks a connect request.
    pub fn decode(b: &[u8]) -> Result<ConnectRequest, ProtoError> {
        let (&kind, path) = b.split_first().ok_or(ProtoError::Short(0))?;
        let kind = SockType::from_u8(kind).ok_or(ProtoError::BadType(kind))?;
        Ok(ConnectRequest {
            kind,
            path: check_path(path)?,
        })
    }
}

fn check_path(p: &[u8]) -> Result<PathBuf, ProtoError> {
    if p.is_empty() || p.len() > MAX_PATH || p[0] != b'/' || p.contains(&0) {
        return Err(ProtoError::BadPath(p.len()));
    }
    Ok(PathBuf::from(OsStr::from_bytes(p)))
}

/// What a local client writes on the request socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalRequest {
    /// The socket type.
    pub kind: SockType,
    /// [`FLAG_FALLBACK`] or 0.
    pub flags: u8,
    /// The socket path on the peer.
    pub path: PathBuf,
}

impl LocalRequest {
    /// The request bytes.
    pub fn encode(&self) -> Vec<u8> {
        let p = self.path.as_os_str().as_bytes();
        let mut b = Vec::with_capacity(REQUEST_HEADER + p.len());
        b.extend_from_slice(REQUEST_MAGIC);
        b.push(REQUEST_VERSION);
        b.push(self.kind.to_u8());
        b.push(self.flags);
        b.push(0);
        b.extend_from_slice(&u16::try_from(p.len()).unwrap_or(u16::MAX).to_be_bytes());
        b.extend_from_slice(p);
        b
    }

    /// Parses the fixed part: returns the type, flags and the path length still to read.
    pub fn decode_header(h: &[u8; REQUEST_HEADER]) -> Result<(SockType, u8, usize), ProtoError> {
        if &h[0..4] != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic);
        }
        if h[4] != REQUEST_VERSION {
            return Err(ProtoError::BadVersion(h[4]));
        }
        let kind = SockType::from_u8(h[5]).ok_or(ProtoError::BadType(h[5]))?;
        let len = usize::from(u16::from_be_bytes([h[8], h[9]]));
        if len == 0 || len > MAX_PATH {
            return Err(ProtoError::BadPath(len));
        }
        Ok((kind, h[6], len))
    }

    /// Builds the request from its parsed header and path bytes.
    pub fn from_parts(kind: SockType, flags: u8, path: &[u8]) -> Result<LocalRequest, ProtoError> {
        Ok(LocalRequest {
            kind,
            flags,
            path: check_path(path)?,
        })
    }
}

/// udsproxyd's answer on the request socket. After `Connected` the connection is the data
/// path (stream), or carries one SCM_RIGHTS descriptor that is (dgram, seqpacket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Connected to the remote socket.
    Connected,
    /// Failed: errno (kept from the far side: ECONNREFUSED when its allowlist denies) and why.
    Failed {
        /// The errno the client should see.
        errno: i32,
        /// The reason, for logs and `dpuctl uds-connect`.
        message: String,
    },
    /// The path is not on this side's `udsconnect` allowlist (fallback requests only): the
    /// client keeps the error of its own local connect.
    NotRouted,
}

impl Reply {
    /// The reply bytes.
    pub fn encode(&self) -> Vec<u8> {
        let (status, errno, msg) = match self {
            Reply::Connected => (STATUS_OK, 0, ""),
            Reply::Failed { errno, message } => (STATUS_ERROR, *errno, message.as_str()),
            Reply::NotRouted => (STATUS_NOT_ROUTED, 0, ""),
        };
        let mut cut = msg.len().min(1024);
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut b = Vec::with_capacity(REPLY_HEADER + cut);
        b.extend_from_slice(REPLY_MAGIC);
        b.push(status);
        b.push(0);
        b.extend_from_slice(&(cut as u16).to_be_bytes());
        b.extend_from_slice(&errno.to_be_bytes());
        b.extend_from_slice(&msg.as_bytes()[..cut]);
        b
    }

    /// Parses the fixed part: the reply without its message, and the message length.
    pub fn decode_header(h: &[u8; REPLY_HEADER]) -> Result<(Reply, usize), ProtoError> {
        if &h[0..4] != REPLY_MAGIC {
            return Err(ProtoError::BadMagic);
        }
        let len = usize::from(u16::from_be_bytes([h[6], h[7]]));
        let errno = i32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        let r = match h[4] {
            STATUS_OK => Reply::Connected,
            STATUS_NOT_ROUTED => Reply::NotRouted,
            _ => Reply::Failed {
                errno: if errno > 0 { errno } else { libc::EIO },
                message: String::new(),
            },
        };
        Ok((r, len))
    }
}

/// Appends one record (length, then the message) to `dst`.
pub fn put_record(dst: &mut BytesMut, msg: &[u8]) {
    dst.reserve(4 + msg.len());
    dst.put_u32(msg.len() as u32);
    dst.put_slice(msg);
}

/// Takes the next whole record from the front of `src`; `Ok(None)` while it is incomplete.
pub fn take_record(src: &mut BytesMut) -> Result<Option<Bytes>, ProtoError> {
    if src.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
    if len > MAX_RECORD {
        return Err(ProtoError::RecordTooLarge(len));
    }
    if src.len() < 4 + len {
        return Ok(None);
    }
    src.advance(4);
    Ok(Some(src.split_to(len).freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_local_request_and_reply() {
        let r = LocalRequest {
            kind: SockType::Dgram,
            flags: FLAG_FALLBACK,
            path: "/run/a.sock".into(),
        };
        let b = r.encode();
        assert_eq!(&b[..], b"UDSP\x01\x02\x01\x00\x00\x0b/run/a.sock");
        let h: [u8; REQUEST_HEADER] = b[..REQUEST_HEADER].try_into().unwrap();
        let (kind, flags, len) = LocalRequest::decode_header(&h).unwrap();
        assert_eq!(
            LocalRequest::from_parts(kind, flags, &b[REQUEST_HEADER..REQUEST_HEADER + len])
                .unwrap(),
            r
        );

        let ok = Reply::Connected.encode();
        assert_eq!(&ok[..], b"UDSR\x00\x00\x00\x00\x00\x00\x00\x00");
        let no = Reply::Failed {
            errno: libc::ECONNREFUSED,
            message: "denied".into(),
        }
        .encode();
        assert_eq!(&no[..], b"UDSR\x01\x00\x00\x06\x00\x00\x00\x6fdenied");
        let h: [u8; REPLY_HEADER] = no[..REPLY_HEADER].try_into().unwrap();
        assert_eq!(
            Reply::decode_header(&h).unwrap(),
            (
                Reply::Failed {
                    errno: 111,
                    message: String::new()
                },
                6
            )
        );
        let nr = Reply::NotRouted.encode();
        let h: [u8; REPLY_HEADER] = nr[..].try_into().unwrap();
        assert_eq!(Reply::decode_header(&h).unwrap(), (Reply::NotRouted, 0));
    }

    #[test]
    fn bad_requests_are_refused() {
        let mut h = *b"UDSP\x01\x01\x00\x00\x00\x05";
        assert!(LocalRequest::decode_header(&h).is_ok());
        h[0] = b'X';
        assert_eq!(LocalRequest::decode_header(&h), Err(ProtoError::BadMagic));
        h[0] = b'U';
        h[4] = 9;
        assert_eq!(
            LocalRequest::decode_header(&h),
            Err(ProtoError::BadVersion(9))
        );
        h[4] = 1;
        h[5] = 7;
        assert_eq!(LocalRequest::decode_header(&h), Err(ProtoError::BadType(7)));
        h[5] = 1;
        h[8] = 0;
        h[9] = 0;
        assert_eq!(LocalRequest::decode_header(&h), Err(ProtoError::BadPath(0)));
        for bad in [&b"rel/path"[..], b"/a\0b", b""] {
            assert!(LocalRequest::from_parts(SockType::Stream, 0, bad).is_err());
        }
    }

    #[test]
    fn connect_request_round_trip() {
        let c = ConnectRequest {
            kind: SockType::Seqpacket,
            path: "/var/run/docker.sock".into(),
        };
        let b = c.encode();
        assert_eq!(&b[..], b"\x03/var/run/docker.sock");
        assert_eq!(ConnectRequest::decode(&b).unwrap(), c);
        assert_eq!(
            ConnectRequest::decode(b"\x09/x"),
            Err(ProtoError::BadType(9))
        );
        assert_eq!(ConnectRequest::decode(b""), Err(ProtoError::Short(0)));
    }

    #[test]
    fn golden_attach() {
        let a = Attach {
            senders_token: true,
            token: 0x0102_0304_0506_0708,
            offset: 5,
            len: 3,
            fds: vec![
                FdSpec::Pipe {
                    dir: PipeDir::FromReceiver,
                    id: 9,
                },
                FdSpec::File {
                    flags: (libc::O_WRONLY | libc::O_APPEND) as u32,
                    offset: 42,
                    path: "/tmp/f".into(),
                },
            ],
        };
        let b = a.encode();
        let want: &[u8] = b"\x01\x02\x00\x00\x01\x02\x03\x04\x05\x06\x07\x08\
            \x00\x00\x00\x00\x00\x00\x00\x05\x00\x00\x00\x03\
            \x02\x00\x00\x00\x00\x00\x00\x00\x09\
            \x03\x00\x00\x04\x01\x00\x00\x00\x00\x00\x00\x00\x2a\x00\x06/tmp/f";
        assert_eq!(&b[..], want);
        assert_eq!(Attach::decode(&b).unwrap(), a);
        // Every truncation is refused, never a panic.
        for n in 0..b.len() {
            assert!(Attach::decode(&b[..n]).is_err(), "prefix of {n} bytes");
        }
        let mut zero = b.to_vec();
        zero[1] = 0;
        assert!(Attach::decode(&zero).is_err());
        let mut rel = b.to_vec();
        let at = rel.len() - 6;
        rel[at] = b't';
        assert!(Attach::decode(&rel).is_err(), "relative path refused");
        assert_eq!(decode_id(&encode_id(7)), Some(7));
        assert_eq!(decode_id(b""), None);
        assert_eq!(PipeDir::from_u8(2), Some(PipeDir::FromReceiver));
        assert_eq!(PipeDir::from_u8(0), None);
    }

    #[test]
    fn records_keep_boundaries_across_chunks() {
        let mut wire = BytesMut::new();
        for m in [&b"one"[..], b"", b"three!"] {
            put_record(&mut wire, m);
        }
        assert_eq!(&wire[..7], b"\x00\x00\x00\x03one");
        // Feed it back one byte at a time.
        let mut acc = BytesMut::new();
        let mut got = Vec::new();
        for byte in wire.iter() {
            acc.put_u8(*byte);
            while let Some(m) = take_record(&mut acc).unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, vec![&b"one"[..], b"", b"three!"]);
        let mut huge = BytesMut::from(&(MAX_RECORD as u32 + 1).to_be_bytes()[..]);
        assert!(take_record(&mut huge).is_err());
    }
}
