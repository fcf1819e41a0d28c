//! Version negotiation and mutual authentication, run once on every new connection before
//! any link frame is read (docs/protocol.md §4 is the normative description).
//!
//! ```text
//! client                                   server
//!   HELLO  {versions, auth mode, Nc}  ->
//!                                      <-  HELLO {versions, auth mode, Ns}
//!   PROOF  {identity, MAC_c}          ->       (server verifies MAC_c, else FAIL)
//!                                      <-  PROOF {identity, MAC_s}
//!   OK (or FAIL if MAC_s is wrong)    ->
//! ```
//! Both nonces are fresh random 32-byte values, and each MAC covers the whole transcript so
//! far under a direction-specific label, so a proof can neither be replayed on another
//! connection nor reflected back. MACs are compared in constant time (`subtle`). The side
//! whose proof is rejected is told so by an explicit FAIL message, so both sides log an
//! authentication failure instead of one of them seeing a bare disconnect.
//!
//! Messages have their own small header with a magic, so a non-dpuctl peer (an HTTP client,
//! a port scanner) is recognised at the first read, and their bodies are capped at
//! [`MAX_BODY`] bytes so an unauthenticated peer cannot make us allocate more.
//! The whole exchange runs under one deadline (slow-loris peers are cut off).
//!
//! Concurrency: each call borrows its stream exclusively; no shared state besides the
//! per-process instance id.

use std::io;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::key::{random_bytes, Psk};

/// The link protocol version this build speaks (highest).
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest link protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// First four bytes of every handshake message: "DPUW".
pub const MAGIC: [u8; 4] = *b"DPUW";
/// Handshake message header: magic (4), type (1), reserved (1), body length (2).
pub const MSG_HEADER_LEN: usize = 8;
/// Largest handshake message body accepted.
pub const MAX_BODY: usize = 512;
/// Longest peer name (bytes of UTF-8).
pub const MAX_NAME_LEN: usize = 64;

const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;
const HELLO_BODY_LEN: usize = 8 + NONCE_LEN;
const PROOF_FIXED_LEN: usize = 10;

const MSG_HELLO: u8 = 1;
const MSG_PROOF: u8 = 2;
const MSG_OK: u8 = 3;
const MSG_FAIL: u8 = 4;

const AUTH_INSECURE: u8 = 0;
const AUTH_PSK: u8 = 1;

/// FAIL codes (docs/protocol.md §4.6).
const FAIL_VERSION: u8 = 1;
const FAIL_AUTH_MODE: u8 = 2;
const FAIL_AUTH: u8 = 3;
const FAIL_MALFORMED: u8 = 4;

/// MAC labels: distinct per direction so a proof cannot be reflected to its sender.
const CLIENT_LABEL: &[u8] = b"dpuctl wire v1 client proof\0";
const SERVER_LABEL: &[u8] = b"dpuctl wire v1 server proof\0";

type HmacSha256 = Hmac<Sha256>;

/// How a link authenticates.
#[derive(Clone)]
pub enum Auth {
    /// Mutual HMAC-SHA256 challenge/response with the shared key.
    Psk(Arc<Psk>),
    /// No authentication. Only for test setups; announced in the handshake (a keyed peer
    /// refuses it) and warned about on every connection.
    Insecure,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Psk(_) => f.write_str("Auth::Psk(..)"),
            Auth::Insecure => f.write_str("Auth::Insecure"),
        }
    }
}

impl Auth {
    /// True for [`Auth::Insecure`].
    pub fn is_insecure(&self) -> bool {
        matches!(self, Auth::Insecure)
    }

    fn mode(&self) -> u8 {
        match self {
            Auth::Psk(_) => AUTH_PSK,
            Auth::Insecure => AUTH_INSECURE,
        }
    }
}

/// Which dpuctl component is speaking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The HOST-side engine.
    Engine,
    /// The udsproxyd peer.
    Udsproxyd,
    /// A `mount.qtfs` process.
    Mount,
    /// The `rexec` client.
    Rexec,
    /// `rexec_server`.
    RexecServer,
    /// Any other short-lived client (`dpuctl status`, tests).
    Client,
}

impl Role {
    /// The snake_case name (as in JSON and logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Engine => "engine",
            Role::Udsproxyd => "udsproxyd",
            Role::Mount => "mount",
            Role::Rexec => "rexec",
            Role::RexecServer => "rexec_server",
            Role::Client => "client",
        }
    }

    /// The byte on the wire.
    pub fn code(self) -> u8 {
        match self {
            Role::Engine => 1,
            Role::Udsproxyd => 2,
            Role::Mount => 3,
            Role::Rexec => 4,
            Role::RexecServer => 5,
            Role::Client => 6,
        }
    }

    /// Parses the wire byte.
    pub fn from_code(c: u8) -> Option<Role> {
        Some(match c {
            1 => Role::Engine,
            2 => Role::Udsproxyd,
            3 => Role::Mount,
            4 => Role::Rexec,
            5 => Role::RexecServer,
            6 => Role::Client,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What each side says about itself.
#[derive(Debug, Clone)]
pub struct Hello {
    /// Our component.
    pub role: Role,
    /// Random per process: lets the peer tell a restart from a reconnect.
    pub instance: u64,
    /// Human-readable name, e.g. the hostname; cut to [`MAX_NAME_LEN`] bytes on the wire.
    pub name: String,
}

impl Hello {
    /// A hello for this process: the process-wide random instance id and the hostname.
    pub fn new(role: Role) -> Hello {
        Hello {
            role,
            instance: process_instance(),
            name: hostname(),
        }
    }
}

/// The kernel's UTS hostname (`uname`: one system call, where reading
/// `/proc/sys/kernel/hostname` takes five; every connection says it).
fn hostname() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.nodename().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The random instance id of this process (stable for its lifetime).
pub fn process_instance() -> u64 {
    static INSTANCE: OnceLock<u64> = OnceLock::new();
    *INSTANCE.get_or_init(|| {
        let mut b = [0u8; 8];
        // Falls back to pid ^ time if the RNG fails: the id only disambiguates restarts.
        if random_bytes(&mut b).is_err() {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            return t ^ u64::from(std::process::id());
        }
        u64::from_be_bytes(b)
    })
}

/// What we learned about the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Peer address for logs (`tcp://1.2.3.4:5`).
    pub address: String,
    /// Negotiated protocol version.
    pub version: u16,
    /// Peer component.
    pub role: Role,
    /// Peer's per-process instance id.
    pub instance: u64,
    /// Peer's name (validated UTF-8 without control characters, at most 64 bytes).
    pub name: String,
    /// The link is unauthenticated (both sides chose insecure mode).
    pub insecure: bool,
}

/// Why a handshake failed; one variant per failing step.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Reading or writing failed.
    #[error("handshake I/O error while {step}: {source}")]
    Io {
        /// What we were doing.
        step: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The peer closed the connection mid-handshake.
    #[error("the peer closed the connection while {step} (is it a dpuctl peer with a compatible configuration? its log says why)")]
    Closed {
        /// What we were doing.
        step: &'static str,
    },
    /// The handshake did not finish in time.
    #[error("handshake timed out after {} while {step}: the peer is not a responsive dpuctl peer (wrong port, or hung)", humantime::format_duration(*.after))]
    Timeout {
        /// What we were doing.
        step: &'static str,
        /// The handshake timeout.
        after: Duration,
    },
    /// The first bytes are not a dpuctl handshake.
    #[error("not a dpuctl peer: first bytes were {} where \"DPUW\" was expected (is something else listening on this port?)", show_bytes(.got))]
    BadMagic {
        /// The four bytes received.
        got: [u8; 4],
    },
    /// A handshake message is malformed.
    #[error("malformed handshake message while {step}: {detail}")]
    Malformed {
        /// What we were doing.
        step: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// No common protocol version.
    #[error("protocol version mismatch: this side speaks version {ours}, the peer speaks {theirs}: run the same dpuctl release on both sides")]
    VersionMismatch {
        /// Our highest version.
        ours: u16,
        /// The peer's highest version.
        theirs: u16,
    },
    /// One side has a key, the other runs in insecure mode.
    #[error("{}", if *.we_insecure {
        "this side runs in insecure mode (no key) but the peer requires a pre-shared key: configure the same key file on both sides (or insecure = true on both, for a test setup only)"
    } else {
        "the peer runs in insecure mode (no key) but this side requires a pre-shared key: configure the same key file on both sides (or insecure = true on both, for a test setup only)"
    })]
    InsecureMismatch {
        /// True when this side is the insecure one.
        we_insecure: bool,
    },
    /// A key proof did not verify (this side rejected the peer's, or the peer rejected ours).
    #[error("authentication failed: {detail}: both sides must use the same key file: copy the key file (made by `dpuctl keygen`) from one side to the other")]
    AuthFailed {
        /// Which proof failed.
        detail: String,
    },
    /// The peer refused the handshake for another reason.
    #[error("the peer refused the handshake (code {code}): {message}")]
    Rejected {
        /// FAIL code.
        code: u8,
        /// The peer's message (sanitised).
        message: String,
    },
    /// The OS random generator failed.
    #[error("cannot get random bytes for the handshake nonce: {0}")]
    Random(String),
}

impl HandshakeError {
    /// True when the failure is about authentication: a wrong key on either side, or a
    /// keyed side meeting an insecure one. Status shows these as `auth_failed`.
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self,
            HandshakeError::AuthFailed { .. } | HandshakeError::InsecureMismatch { .. }
        )
    }

    fn fail_code(&self) -> Option<u8> {
        match self {
            HandshakeError::VersionMismatch { .. } => Some(FAIL_VERSION),
            HandshakeError::InsecureMismatch { .. } => Some(FAIL_AUTH_MODE),
            HandshakeError::AuthFailed { .. } => Some(FAIL_AUTH),
            HandshakeError::Malformed { .. } | HandshakeError::BadMagic { .. } => {
                Some(FAIL_MALFORMED)
            }
            _ => None,
        }
    }
}

fn show_bytes(b: &[u8]) -> String {
    let printable = b.iter().all(|c| c.is_ascii_graphic() || *c == b' ');
    if printable {
        format!("{:?}", String::from_utf8_lossy(b))
    } else {
        b.iter()
            .map(|c| format!("{c:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Peer-supplied text for logs: no control characters, bounded length.
fn sanitize(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Versions a side speaks (tests pretend to be other releases).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Versions {
    pub(crate) min: u16,
    pub(crate) max: u16,
}

const OURS: Versions = Versions {
    min: MIN_PROTOCOL_VERSION,
    max: PROTOCOL_VERSION,
};

mod step {
    pub const SEND_HELLO: &str = "sending our hello";
    pub const READ_HELLO: &str = "reading the peer's hello";
    pub const SEND_PROOF: &str = "sending our key proof";
    pub const READ_PROOF: &str = "reading the peer's key proof";
    pub const SEND_VERDICT: &str = "sending our verdict";
    pub const READ_VERDICT: &str = "reading the peer's verdict";
}

/// Runs the client side of the handshake on `io`.
pub async fn client<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    peer_address: &str,
    auth: &Auth,
    hello: &Hello,
    timeout: Duration,
) -> Result<PeerInfo, HandshakeError> {
    client_with(io, peer_address, auth, hello, timeout, OURS).await
}

/// Runs the server side of the handshake on `io`.
pub async fn server<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    peer_address: &str,
    auth: &Auth,
    hello: &Hello,
    timeout: Duration,
) -> Result<PeerInfo, HandshakeError> {
    server_with(io, peer_address, auth, hello, timeout, OURS).await
}

pub(crate) async fn client_with<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    peer_address: &str,
    auth: &Auth,
    hello: &Hello,
    timeout: Duration,
    versions: Versions,
) -> Result<PeerInfo, HandshakeError> {
    let mut hs = Exchange {
        io,
        auth,
        versions,
        transcript: Vec::with_capacity(256),
        step: step::SEND_HELLO,
    };
    let r = tokio::time::timeout(timeout, hs.run_client(hello)).await;
    finish(r, hs.step, timeout, peer_address, auth)
}

pub(crate) async fn server_with<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    peer_address: &str,
    auth: &Auth,
    hello: &Hello,
    timeout: Duration,
    versions: Versions,
) -> Result<PeerInfo, HandshakeError> {
    let mut hs = Exchange {
        io,
        auth,
        versions,
        transcript: Vec::with_capacity(256),
        step: step::READ_HELLO,
    };
    let r = tokio::time::timeout(timeout, hs.run_server(hello)).await;
    finish(r, hs.step, timeout, peer_address, auth)
}

struct Negotiated {
    version: u16,
    peer: Identity,
}

fn finish(
    r: Result<Result<Negotiated, HandshakeError>, tokio::time::error::Elapsed>,
    step: &'static str,
    timeout: Duration,
    peer_address: &str,
    auth: &Auth,
) -> Result<PeerInfo, HandshakeError> {
    let n = match r {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(HandshakeError::Timeout {
                step,
                after: timeout,
            })
        }
    };
    let insecure = auth.is_insecure();
    if insecure {
        tracing::warn!(
            peer = %peer_address,
            peer_role = %n.peer.role,
            "insecure link: the peer is NOT authenticated (insecure = true); use only for test setups"
        );
    }
    Ok(PeerInfo {
        address: peer_address.to_string(),
        version: n.version,
        role: n.peer.role,
        instance: n.peer.instance,
        name: n.peer.name,
        insecure,
    })
}

struct Identity {
    role: Role,
    instance: u64,
    name: String,
}

struct PeerHello {
    min: u16,
    max: u16,
    auth_mode: u8,
}

/// One handshake in progress: the stream, the transcript both MACs cover, and the current
/// step (read after a timeout to say where the peer stalled).
struct Exchange<'a, S> {
    io: &'a mut S,
    auth: &'a Auth,
    versions: Versions,
    transcript: Vec<u8>,
    step: &'static str,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Exchange<'_, S> {
    async fn run_client(&mut self, hello: &Hello) -> Result<Negotiated, HandshakeError> {
        self.step = step::SEND_HELLO;
        let our_hello = self.hello_msg()?;
        self.send(&our_hello).await?;

        self.step = step::READ_HELLO;
        let their_hello = self.read(MSG_HELLO).await?;
        let version = self.check_hello(&their_hello).await?;

        self.step = step::SEND_PROOF;
        let proof = self.proof_msg(hello, CLIENT_LABEL)?;
        self.send(&proof).await?;

        self.step = step::READ_PROOF;
        let their_proof = self.read(MSG_PROOF).await?;
        let peer = self.check_proof(&their_proof, SERVER_LABEL).await?;

        self.step = step::SEND_VERDICT;
        self.send(&encode_msg(MSG_OK, &[])).await?;
        Ok(Negotiated { version, peer })
    }

    async fn run_server(&mut self, hello: &Hello) -> Result<Negotiated, HandshakeError> {
        self.step = step::READ_HELLO;
        let their_hello = self.read(MSG_HELLO).await?;

        // Answer with our hello even when incompatible: the peer then reports the exact
        // mismatch (our versions / auth mode) itself.
        self.step = step::SEND_HELLO;
        let our_hello = self.hello_msg()?;
        self.send(&our_hello).await?;
        let version = self.check_hello(&their_hello).await?;

        self.step = step::READ_PROOF;
        let their_proof = self.read(MSG_PROOF).await?;
        let peer = self.check_proof(&their_proof, CLIENT_LABEL).await?;

        self.step = step::SEND_PROOF;
        let proof = self.proof_msg(hello, SERVER_LABEL)?;
        self.send(&proof).await?;

        self.step = step::READ_VERDICT;
        self.read(MSG_OK).await?;
        Ok(Negotiated { version, peer })
    }

    fn hello_msg(&self) -> Result<Vec<u8>, HandshakeError> {
        let mut nonce = [0u8; NONCE_LEN];
        random_bytes(&mut nonce).map_err(HandshakeError::Random)?;
        let mut body = Vec::with_capacity(HELLO_BODY_LEN);
        body.extend_from_slice(&self.versions.min.to_be_bytes());
        body.extend_from_slice(&self.versions.max.to_be_bytes());
        body.push(self.auth.mode());
        body.extend_from_slice(&[0, 0, 0]);
        body.extend_from_slice(&nonce);
        Ok(encode_msg(MSG_HELLO, &body))
    }

    /// Builds PROOF: identity, then the MAC over label || transcript || this message so far.
    fn proof_msg(&self, hello: &Hello, label: &[u8]) -> Result<Vec<u8>, HandshakeError> {
        let name = truncate_utf8(&hello.name, MAX_NAME_LEN);
        let mac_len = if self.auth.is_insecure() { 0 } else { MAC_LEN };
        let mut body = Vec::with_capacity(PROOF_FIXED_LEN + name.len() + mac_len);
        body.push(hello.role.code());
        // Cannot truncate: `name` is at most MAX_NAME_LEN (64) bytes.
        body.push(name.len() as u8);
        body.extend_from_slice(&hello.instance.to_be_bytes());
        body.extend_from_slice(name.as_bytes());
        body.resize(body.len() + mac_len, 0);
        let mut msg = encode_msg(MSG_PROOF, &body);
        if let Auth::Psk(key) = self.auth {
            let prefix_end = msg.len() - MAC_LEN;
            let tag = compute_mac(key, label, &self.transcript, &msg[..prefix_end])?;
            msg[prefix_end..].copy_from_slice(&tag);
        }
        Ok(msg)
    }

    /// Validates the peer's HELLO; returns the negotiated version.
    async fn check_hello(&mut self, msg: &[u8]) -> Result<u16, HandshakeError> {
        let h = match parse_hello(&msg[MSG_HEADER_LEN..], self.step) {
            Ok(h) => h,
            Err(e) => return Err(self.refuse(e).await),
        };
        let version = self.versions.max.min(h.max);
        if version < self.versions.min.max(h.min) {
            let e = HandshakeError::VersionMismatch {
                ours: self.versions.max,
                theirs: h.max,
            };
            return Err(self.refuse(e).await);
        }
        if h.auth_mode != self.auth.mode() {
            let e = HandshakeError::InsecureMismatch {
                we_insecure: self.auth.is_insecure(),
            };
            return Err(self.refuse(e).await);
        }
        Ok(version)
    }

    /// Validates the peer's PROOF (identity and, with a key, the MAC) and adds it to the
    /// transcript.
    async fn check_proof(&mut self, msg: &[u8], label: &[u8]) -> Result<Identity, HandshakeError> {
        let mac_len = if self.auth.is_insecure() { 0 } else { MAC_LEN };
        let id = match parse_proof(&msg[MSG_HEADER_LEN..], mac_len, self.step) {
            Ok(id) => id,
            Err(e) => return Err(self.refuse(e).await),
        };
        if let Auth::Psk(key) = self.auth {
            let prefix_end = msg.len() - MAC_LEN;
            let expected = compute_mac(key, label, &self.transcript, &msg[..prefix_end])?;
            let ok: bool = expected.ct_eq(&msg[prefix_end..]).into();
            if !ok {
                let e = HandshakeError::AuthFailed {
                    detail:
                        "the peer's key proof did not verify (the two sides hold different keys)"
                            .into(),
                };
                return Err(self.refuse(e).await);
            }
        }
        self.transcript.extend_from_slice(msg);
        Ok(id)
    }

    /// Tells the peer why we refuse (best effort: it may already be gone) and returns `e`.
    async fn refuse(&mut self, e: HandshakeError) -> HandshakeError {
        if let Some(code) = e.fail_code() {
            let text = match code {
                FAIL_AUTH => {
                    "your key proof did not verify: the two sides hold different keys".to_string()
                }
                _ => e.to_string(),
            };
            let mut body = vec![code];
            body.extend_from_slice(truncate_utf8(&text, MAX_BODY - 1).as_bytes());
            let msg = encode_msg(MSG_FAIL, &body);
            let _ = self.io.write_all(&msg).await;
            let _ = self.io.flush().await;
        }
        e
    }

    async fn send(&mut self, msg: &[u8]) -> Result<(), HandshakeError> {
        let step = self.step;
        let io_err = |source: io::Error| {
            if matches!(
                source.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) {
                HandshakeError::Closed { step }
            } else {
                HandshakeError::Io { step, source }
            }
        };
        self.io.write_all(msg).await.map_err(io_err)?;
        self.io.flush().await.map_err(io_err)?;
        if msg.get(4) != Some(&MSG_OK) {
            self.transcript.extend_from_slice(msg);
        }
        Ok(())
    }

    /// Reads one message of type `expect` (header included in the result). A FAIL from the
    /// peer becomes the matching error. HELLO is added to the transcript here; PROOF only
    /// after its MAC has been checked against the transcript before it.
    async fn read(&mut self, expect: u8) -> Result<Vec<u8>, HandshakeError> {
        let step = self.step;
        let io_err = |source: io::Error| match source.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
                HandshakeError::Closed { step }
            }
            _ => HandshakeError::Io { step, source },
        };
        let mut head = [0u8; MSG_HEADER_LEN];
        self.io.read_exact(&mut head[..4]).await.map_err(io_err)?;
        if head[..4] != MAGIC {
            let e = HandshakeError::BadMagic {
                got: [head[0], head[1], head[2], head[3]],
            };
            return Err(self.refuse(e).await);
        }
        self.io.read_exact(&mut head[4..]).await.map_err(io_err)?;
        let ty = head[4];
        let len = usize::from(u16::from_be_bytes([head[6], head[7]]));
        if len > MAX_BODY {
            let e = HandshakeError::Malformed {
                step,
                detail: format!("message body of {len} bytes exceeds the limit of {MAX_BODY}"),
            };
            return Err(self.refuse(e).await);
        }
        let mut msg = vec![0u8; MSG_HEADER_LEN + len];
        msg[..MSG_HEADER_LEN].copy_from_slice(&head);
        self.io
            .read_exact(&mut msg[MSG_HEADER_LEN..])
            .await
            .map_err(io_err)?;
        if ty == MSG_FAIL {
            return Err(peer_failure(&msg[MSG_HEADER_LEN..], self.auth));
        }
        if ty != expect || head[5] != 0 {
            let e = HandshakeError::Malformed {
                step,
                detail: format!(
                    "expected message type {expect}, got type {ty} (reserved byte {})",
                    head[5]
                ),
            };
            return Err(self.refuse(e).await);
        }
        if ty == MSG_HELLO {
            self.transcript.extend_from_slice(&msg);
        }
        Ok(msg)
    }
}

fn encode_msg(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(MSG_HEADER_LEN + body.len());
    m.extend_from_slice(&MAGIC);
    m.push(ty);
    m.push(0);
    // Bodies we build are at most MAX_BODY (512) bytes.
    m.extend_from_slice(&(body.len() as u16).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn parse_hello(body: &[u8], step: &'static str) -> Result<PeerHello, HandshakeError> {
    let malformed = |detail: String| HandshakeError::Malformed { step, detail };
    if body.len() != HELLO_BODY_LEN {
        return Err(malformed(format!(
            "HELLO body is {} bytes, expected {HELLO_BODY_LEN}",
            body.len()
        )));
    }
    let min = u16::from_be_bytes([body[0], body[1]]);
    let max = u16::from_be_bytes([body[2], body[3]]);
    if min > max || min == 0 {
        return Err(malformed(format!("bad version range {min}..={max}")));
    }
    let auth_mode = body[4];
    if auth_mode != AUTH_PSK && auth_mode != AUTH_INSECURE {
        return Err(malformed(format!("unknown auth mode {auth_mode}")));
    }
    Ok(PeerHello {
        min,
        max,
        auth_mode,
    })
}

fn parse_proof(
    body: &[u8],
    mac_len: usize,
    step: &'static str,
) -> Result<Identity, HandshakeError> {
    let malformed = |detail: String| HandshakeError::Malformed { step, detail };
    if body.len() < PROOF_FIXED_LEN {
        return Err(malformed(format!(
            "PROOF body of {} bytes is too short",
            body.len()
        )));
    }
    let role = Role::from_code(body[0])
        .ok_or_else(|| malformed(format!("unknown role code {}", body[0])))?;
    let name_len = usize::from(body[1]);
    if name_len > MAX_NAME_LEN {
        return Err(malformed(format!(
            "name of {name_len} bytes exceeds {MAX_NAME_LEN}"
        )));
    }
    if body.len() != PROOF_FIXED_LEN + name_len + mac_len {
        return Err(malformed(format!(
            "PROOF body is {} bytes, expected {} for a {name_len}-byte name and a {mac_len}-byte MAC",
            body.len(),
            PROOF_FIXED_LEN + name_len + mac_len
        )));
    }
    let mut inst = [0u8; 8];
    inst.copy_from_slice(&body[2..10]);
    let name = std::str::from_utf8(&body[PROOF_FIXED_LEN..PROOF_FIXED_LEN + name_len])
        .map_err(|_| malformed("peer name is not UTF-8".into()))?;
    if name.chars().any(char::is_control) {
        return Err(malformed("peer name contains control characters".into()));
    }
    Ok(Identity {
        role,
        instance: u64::from_be_bytes(inst),
        name: name.to_string(),
    })
}

fn peer_failure(body: &[u8], auth: &Auth) -> HandshakeError {
    let code = body.first().copied().unwrap_or(0);
    let message = sanitize(&String::from_utf8_lossy(body.get(1..).unwrap_or(&[])), 300);
    match code {
        FAIL_AUTH => HandshakeError::AuthFailed {
            detail: format!("the peer rejected our key proof ({message})"),
        },
        FAIL_AUTH_MODE => HandshakeError::InsecureMismatch {
            we_insecure: auth.is_insecure(),
        },
        _ => HandshakeError::Rejected { code, message },
    }
}

fn compute_mac(
    key: &Psk,
    label: &[u8],
    transcript: &[u8],
    msg_prefix: &[u8],
) -> Result<[u8; MAC_LEN], HandshakeError> {
    // HMAC accepts keys of any length, so this cannot fail for a 32-byte key; an error is
    // still reported rather than unwrapped (a zero MAC would be a silent auth bypass).
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key.as_bytes()).map_err(|e| {
        HandshakeError::AuthFailed {
            detail: format!("HMAC initialisation failed: {e}"),
        }
    })?;
    mac.update(label);
    mac.update(transcript);
    mac.update(msg_prefix);
    Ok(mac.finalize().into_bytes().into())
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut cut = s.len().min(max);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::io::duplex;

    fn key(b: u8) -> Auth {
        Auth::Psk(Arc::new(Psk::from_bytes([b; 32])))
    }

    fn hello(role: Role, name: &str, instance: u64) -> Hello {
        Hello {
            role,
            instance,
            name: name.into(),
        }
    }

    const T: Duration = Duration::from_secs(2);

    async fn pair(
        ca: Auth,
        sa: Auth,
        cv: Versions,
        sv: Versions,
    ) -> (
        Result<PeerInfo, HandshakeError>,
        Result<PeerInfo, HandshakeError>,
    ) {
        let (mut c, mut s) = duplex(4096);
        let ch = hello(Role::Mount, "dpu-1", 11);
        let sh = hello(Role::Engine, "host-1", 22);
        tokio::join!(
            async {
                let r = client_with(&mut c, "srv", &ca, &ch, T, cv).await;
                drop(c);
                r
            },
            async {
                let r = server_with(&mut s, "cli", &sa, &sh, T, sv).await;
                drop(s);
                r
            }
        )
    }

    #[tokio::test]
    async fn right_key_succeeds_both_ways() {
        let (c, s) = pair(key(1), key(1), OURS, OURS).await;
        let c = c.unwrap();
        let s = s.unwrap();
        assert_eq!(
            c,
            PeerInfo {
                address: "srv".into(),
                version: PROTOCOL_VERSION,
                role: Role::Engine,
                instance: 22,
                name: "host-1".into(),
                insecure: false,
            }
        );
        assert_eq!(s.role, Role::Mount);
        assert_eq!(s.instance, 11);
        assert_eq!(s.name, "dpu-1");
        assert_eq!(s.address, "cli");
        assert!(!s.insecure);
    }

    #[tokio::test]
    async fn wrong_key_is_an_auth_failure_on_both_sides() {
        let (c, s) = pair(key(1), key(2), OURS, OURS).await;
        let c = c.unwrap_err();
        let s = s.unwrap_err();
        assert!(c.is_auth_failure(), "client: {c}");
        assert!(s.is_auth_failure(), "server: {s}");
        assert!(c.to_string().contains("rejected our key proof"), "{c}");
        assert!(s.to_string().contains("did not verify"), "{s}");
    }

    #[tokio::test]
    async fn insecure_and_keyed_sides_refuse_each_other() {
        for (ca, sa) in [(Auth::Insecure, key(1)), (key(1), Auth::Insecure)] {
            let c_insecure = ca.is_insecure();
            let (c, s) = pair(ca, sa, OURS, OURS).await;
            let c = c.unwrap_err();
            let s = s.unwrap_err();
            assert!(
                matches!(c, HandshakeError::InsecureMismatch { we_insecure } if we_insecure == c_insecure),
                "{c:?}"
            );
            assert!(
                matches!(s, HandshakeError::InsecureMismatch { we_insecure } if we_insecure != c_insecure),
                "{s:?}"
            );
            assert!(c.to_string().contains("insecure mode"));
        }
        let (c, s) = pair(Auth::Insecure, Auth::Insecure, OURS, OURS).await;
        assert!(c.unwrap().insecure);
        assert!(s.unwrap().insecure);
    }

    #[tokio::test]
    async fn version_negotiation() {
        let newer = Versions { min: 2, max: 3 };
        let (c, s) = pair(key(1), key(1), newer, OURS).await;
        assert!(
            matches!(
                c,
                Err(HandshakeError::VersionMismatch { ours: 3, theirs: 1 })
            ),
            "{c:?}"
        );
        assert!(
            matches!(
                s,
                Err(HandshakeError::VersionMismatch { ours: 1, theirs: 3 })
            ),
            "{s:?}"
        );
        // Overlapping ranges pick the highest common version.
        let wide = Versions { min: 1, max: 5 };
        let (c, s) = pair(key(1), key(1), wide, OURS).await;
        assert_eq!(c.unwrap().version, 1);
        assert_eq!(s.unwrap().version, 1);
    }

    #[tokio::test]
    async fn silent_peer_times_out_within_the_deadline() {
        let (mut c, _s) = duplex(4096);
        let t0 = tokio::time::Instant::now();
        let e = client(
            &mut c,
            "p",
            &key(1),
            &hello(Role::Client, "", 1),
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(e, HandshakeError::Timeout { step, .. } if step == step::READ_HELLO),
            "{e:?}"
        );
        assert!(t0.elapsed() < Duration::from_secs(1));

        let (_c, mut s) = duplex(4096);
        let e = server(
            &mut s,
            "p",
            &key(1),
            &hello(Role::Engine, "", 1),
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, HandshakeError::Timeout { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn half_a_hello_then_stall_times_out() {
        let (mut c, mut s) = duplex(4096);
        c.write_all(&MAGIC).await.unwrap();
        c.write_all(&[MSG_HELLO, 0, 0, HELLO_BODY_LEN as u8, 0, 1])
            .await
            .unwrap();
        let t0 = tokio::time::Instant::now();
        let e = server(
            &mut s,
            "p",
            &key(1),
            &hello(Role::Engine, "", 1),
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(e, HandshakeError::Timeout { step, .. } if step == step::READ_HELLO),
            "{e:?}"
        );
        assert!(t0.elapsed() < Duration::from_secs(1));
        drop(c);
    }

    #[tokio::test]
    async fn garbage_is_bad_magic_and_the_peer_is_told() {
        let (mut c, mut s) = duplex(4096);
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let e = server(&mut s, "p", &key(1), &hello(Role::Engine, "", 1), T)
            .await
            .unwrap_err();
        assert!(
            matches!(e, HandshakeError::BadMagic { got } if &got == b"GET "),
            "{e:?}"
        );
        assert!(e.to_string().contains("\"GET \""), "{e}");
        let mut reply = [0u8; MSG_HEADER_LEN];
        c.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply[..4], &MAGIC);
        assert_eq!(reply[4], MSG_FAIL);
    }

    #[tokio::test]
    async fn oversized_body_and_long_names() {
        let (mut c, mut s) = duplex(4096);
        c.write_all(&MAGIC).await.unwrap();
        c.write_all(&[MSG_HELLO, 0, 0xff, 0xff]).await.unwrap();
        let e = server(&mut s, "p", &key(1), &hello(Role::Engine, "", 1), T)
            .await
            .unwrap_err();
        assert!(matches!(e, HandshakeError::Malformed { .. }), "{e:?}");

        // A name longer than 64 bytes is cut on a char boundary, not refused.
        let (mut c, mut s) = duplex(4096);
        let long = "é".repeat(40);
        let (k, ch, sh) = (
            key(3),
            hello(Role::Rexec, &long, 5),
            hello(Role::RexecServer, "x", 6),
        );
        let (cr, sr) = tokio::join!(
            client(&mut c, "s", &k, &ch, T),
            server(&mut s, "c", &k, &sh, T)
        );
        assert_eq!(cr.unwrap().role, Role::RexecServer);
        let name = sr.unwrap().name;
        assert_eq!(name, "é".repeat(32));
    }

    #[test]
    fn role_codes_and_names_round_trip() {
        for r in [
            Role::Engine,
            Role::Udsproxyd,
            Role::Mount,
            Role::Rexec,
            Role::RexecServer,
            Role::Client,
        ] {
            assert_eq!(Role::from_code(r.code()), Some(r));
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
        }
        assert_eq!(Role::from_code(0), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        /// Whatever a stranger sends first, the server refuses it without panicking and
        /// reads no more than one capped message.
        #[test]
        fn server_refuses_arbitrary_first_bytes(data in proptest::collection::vec(any::<u8>(), 0..1200), with_magic in any::<bool>()) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let r = rt.block_on(async {
                let (mut c, mut s) = duplex(8192);
                if with_magic {
                    c.write_all(&MAGIC).await.unwrap();
                }
                c.write_all(&data).await.unwrap();
                c.shutdown().await.unwrap();
                let r = server(&mut s, "fuzz", &key(9), &hello(Role::Engine, "h", 1), Duration::from_millis(500)).await;
                drop(c);
                r
            });
            prop_assert!(r.is_err());
            prop_assert!(!matches!(r, Err(HandshakeError::Timeout { .. })), "EOF must end it, not the timer: {:?}", r);
        }
    }
}
