//! Frames: a fixed 16-byte big-endian header followed by raw payload bytes
//! (docs/protocol.md §3 is the normative layout).
//!
//! The decoder is the only code that interprets untrusted link bytes. It validates the
//! header (length against the configured maximum, kind, flags) *before* reserving any
//! memory for the payload, so a hostile length can never make it allocate more than
//! `max_frame`. It keeps no state between calls besides the caller's buffer, so it is
//! trivially restartable; one decoder belongs to one reader task.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::Decoder;

/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 16;
/// Default largest frame (header included): 16 MiB of payload — a FUSE `max_write` of
/// 1 MiB and a large readdir fit many times over, while one peer cannot pin more than this
/// per partially received frame.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024 + HEADER_LEN;
/// Hard cap on any configured `max_frame` (64 MiB payload + header).
pub const MAX_FRAME_HARD: usize = 64 * 1024 * 1024 + HEADER_LEN;
/// Smallest accepted `max_frame`: room for an error payload with a useful message.
pub const MIN_FRAME: usize = 1024;

/// Longest message carried in an `Error` payload; longer messages are cut at a char boundary.
pub const MAX_ERROR_MESSAGE: usize = 4096;

/// Frame kinds (header byte 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A call: `op` selects the operation, `id` is chosen by the caller.
    Request,
    /// Successful answer to the request with the same `id`.
    Response,
    /// Failed answer: payload is i32 errno (big-endian) + UTF-8 message.
    Error,
    /// Keepalive probe; the peer answers `Pong` with the same `id`.
    Ping,
    /// Answer to `Ping`.
    Pong,
    /// The sender no longer wants the answer to its request `id`.
    Cancel,
    /// The sender is closing the link; payload is a UTF-8 reason.
    Goaway,
    /// The range 0x10..=0x1f belongs to multiplexed byte streams (docs/protocol.md §5.1):
    /// 0x10 open, 0x11 accept, 0x12 refuse, 0x13 data, 0x14 credit, 0x15 fin, 0x16 reset
    /// (see the `STREAM_*` constants); 0x17..=0x1f stay reserved and a link refuses them.
    Stream(u8),
}

/// Stream frame: open a stream (`id` chosen by the opener, `op` selects the service,
/// payload is the service's open request).
pub const STREAM_OPEN: u8 = 0x10;
/// Stream frame: the acceptor took the stream; payload is the service's answer.
pub const STREAM_ACCEPT: u8 = 0x11;
/// Stream frame: the acceptor refused the stream; payload as an `Error` payload.
pub const STREAM_REFUSE: u8 = 0x12;
/// Stream frame: bytes, counted against the receiver's credit.
pub const STREAM_DATA: u8 = 0x13;
/// Stream frame: the receiver consumed bytes; payload is a u32 of new credit.
pub const STREAM_CREDIT: u8 = 0x14;
/// Stream frame: the sender will send no more data (half-close).
pub const STREAM_FIN: u8 = 0x15;
/// Stream frame: abort both directions; payload as an `Error` payload.
pub const STREAM_RESET: u8 = 0x16;
/// `op` of stream frames other than open: 0 when the sender opened the stream, this when the
/// sender is the side that accepted it (each side numbers the streams it opens itself).
pub const STREAM_FROM_ACCEPTOR: u16 = 1;

impl Kind {
    /// The byte on the wire.
    pub fn to_u8(self) -> u8 {
        match self {
            Kind::Request => 0x01,
            Kind::Response => 0x02,
            Kind::Error => 0x03,
            Kind::Ping => 0x04,
            Kind::Pong => 0x05,
            Kind::Cancel => 0x06,
            Kind::Goaway => 0x07,
            Kind::Stream(b) => b,
        }
    }

    /// Parses the wire byte; `None` for unassigned values.
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            0x01 => Kind::Request,
            0x02 => Kind::Response,
            0x03 => Kind::Error,
            0x04 => Kind::Ping,
            0x05 => Kind::Pong,
            0x06 => Kind::Cancel,
            0x07 => Kind::Goaway,
            0x10..=0x1f => Kind::Stream(b),
            _ => return None,
        })
    }
}

/// The fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Payload length in bytes (header excluded).
    pub len: u32,
    /// Frame kind.
    pub kind: Kind,
    /// Reserved, must be 0 in protocol version 1.
    pub flags: u8,
    /// Operation (Request); echoed in Response/Error; 0 otherwise.
    pub op: u16,
    /// Request id (Request/Response/Error/Cancel), ping id (Ping/Pong), 0 for Goaway.
    pub id: u64,
}

impl Header {
    /// The 16 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.len.to_be_bytes());
        b[4] = self.kind.to_u8();
        b[5] = self.flags;
        b[6..8].copy_from_slice(&self.op.to_be_bytes());
        b[8..16].copy_from_slice(&self.id.to_be_bytes());
        b
    }

    /// Parses and validates a header against `max_frame` (header included).
    pub fn decode(b: &[u8; HEADER_LEN], max_frame: usize) -> Result<Header, FrameError> {
        let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let max_payload = max_frame.saturating_sub(HEADER_LEN);
        if len as usize > max_payload {
            return Err(FrameError::TooLarge {
                len: len as usize,
                max: max_payload,
            });
        }
        let kind = Kind::from_u8(b[4]).ok_or(FrameError::UnknownKind(b[4]))?;
        if b[5] != 0 {
            return Err(FrameError::BadFlags(b[5]));
        }
        Ok(Header {
            len,
            kind,
            flags: 0,
            op: u16::from_be_bytes([b[6], b[7]]),
            id: u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Frame kind.
    pub kind: Kind,
    /// Operation.
    pub op: u16,
    /// Request or ping id.
    pub id: u64,
    /// Raw payload bytes (a zero-copy slice of the read buffer).
    pub payload: Bytes,
}

impl Frame {
    /// Builds a frame.
    pub fn new(kind: Kind, op: u16, id: u64, payload: Bytes) -> Frame {
        Frame {
            kind,
            op,
            id,
            payload,
        }
    }

    /// The header for this frame. Callers check the payload against `max_frame` first; a
    /// payload over 4 GiB cannot be represented and is refused by `Link::call` long before.
    pub fn header(&self) -> Header {
        Header {
            len: u32::try_from(self.payload.len()).unwrap_or(u32::MAX),
            kind: self.kind,
            flags: 0,
            op: self.op,
            id: self.id,
        }
    }

    /// Appends header and payload to `dst` (tests and small frames; the link writer writes
    /// header and payload separately to avoid copying large payloads).
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.reserve(HEADER_LEN + self.payload.len());
        dst.put_slice(&self.header().encode());
        dst.put_slice(&self.payload);
    }
}

/// Encodes a stream credit payload (u32 big-endian).
pub fn encode_credit(bytes: u32) -> Bytes {
    Bytes::copy_from_slice(&bytes.to_be_bytes())
}

/// Decodes a stream credit payload.
pub fn decode_credit(payload: &[u8]) -> Result<u32, FrameError> {
    let b: [u8; 4] = payload
        .try_into()
        .map_err(|_| FrameError::BadCreditPayload(payload.len()))?;
    Ok(u32::from_be_bytes(b))
}

/// Encodes an `Error` payload: i32 errno big-endian, then the UTF-8 message (cut to
/// [`MAX_ERROR_MESSAGE`] bytes at a char boundary).
pub fn encode_error(errno: i32, message: &str) -> Bytes {
    let mut cut = message.len().min(MAX_ERROR_MESSAGE);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut b = BytesMut::with_capacity(4 + cut);
    b.put_i32(errno);
    b.put_slice(&message.as_bytes()[..cut]);
    b.freeze()
}

/// Decodes an `Error` payload. Invalid UTF-8 is replaced rather than refused: the errno is
/// what matters and a peer's odd message should not cost the caller its error.
pub fn decode_error(payload: &[u8]) -> Result<(i32, String), FrameError> {
    if payload.len() < 4 {
        return Err(FrameError::BadErrorPayload(payload.len()));
    }
    let mut p = payload;
    let errno = p.get_i32();
    Ok((errno, String::from_utf8_lossy(p).into_owned()))
}

/// Why bytes could not be decoded as a frame. Every variant is fatal for the link.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The header announces a payload larger than this side accepts.
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes (max_frame): the peer is misbehaving or configured with a larger max_frame")]
    TooLarge {
        /// Announced payload length.
        len: usize,
        /// Largest payload accepted.
        max: usize,
    },
    /// Kind byte not assigned in this protocol version.
    #[error("unknown frame kind 0x{0:02x}: the peer speaks a different protocol or sent garbage")]
    UnknownKind(u8),
    /// Reserved flags set.
    #[error("reserved frame flags 0x{0:02x} set: the peer speaks a different protocol version or sent garbage")]
    BadFlags(u8),
    /// An `Error` payload shorter than its errno.
    #[error("error frame payload of {0} bytes is shorter than its 4-byte errno")]
    BadErrorPayload(usize),
    /// A stream credit payload that is not exactly 4 bytes.
    #[error("stream credit payload of {0} bytes is not the 4-byte count it must be")]
    BadCreditPayload(usize),
    /// The stream ended inside a frame.
    #[error("connection ended inside a frame ({have} of {need} bytes received)")]
    Truncated {
        /// Bytes of the frame received.
        have: usize,
        /// Bytes the frame needed (header, or header + payload once known).
        need: usize,
    },
    /// Reading failed.
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Length-prefixed frame decoder (`tokio_util::codec::Decoder`).
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_frame: usize,
}

impl FrameDecoder {
    /// A decoder accepting frames up to `max_frame` bytes (header included), clamped to
    /// [`MIN_FRAME`]..=[`MAX_FRAME_HARD`].
    pub fn new(max_frame: usize) -> FrameDecoder {
        FrameDecoder {
            max_frame: max_frame.clamp(MIN_FRAME, MAX_FRAME_HARD),
        }
    }

    /// The effective limit (header included).
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Bytes needed to finish the frame that starts at the front of `src` (for truncation
    /// reports): the header length until the header is complete, then header + payload.
    fn needed(&self, src: &[u8]) -> usize {
        if src.len() < HEADER_LEN {
            return HEADER_LEN;
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        HEADER_LEN + len
    }
}

impl Decoder for FrameDecoder {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(head) = src.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let mut raw = [0u8; HEADER_LEN];
        raw.copy_from_slice(head);
        // Validate before reserving: the length is untrusted until checked against max_frame.
        let header = Header::decode(&raw, self.max_frame)?;
        let total = HEADER_LEN + header.len as usize;
        if src.len() < total {
            // Bounded by max_frame thanks to the check above.
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let payload = src.split_to(header.len as usize).freeze();
        Ok(Some(Frame {
            kind: header.kind,
            op: header.op,
            id: header.id,
            payload,
        }))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated {
                have: src.len(),
                need: self.needed(src),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn golden_bytes() {
        let f = Frame::new(
            Kind::Request,
            0x0102,
            0x0a0b_0c0d_0e0f_1011,
            Bytes::from_static(b"hi"),
        );
        let mut b = BytesMut::new();
        f.encode(&mut b);
        assert_eq!(
            &b[..],
            &[
                0x00, 0x00, 0x00, 0x02, // payload length
                0x01, // kind Request
                0x00, // flags
                0x01, 0x02, // op
                0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x10, 0x11, // id
                b'h', b'i',
            ]
        );
        let e = encode_error(13, "denied");
        assert_eq!(&e[..], b"\x00\x00\x00\x0ddenied");
        assert_eq!(decode_error(&e).unwrap(), (13, "denied".to_string()));
        assert_eq!(&encode_error(-1, "")[..], &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(&encode_credit(0x0102_0304)[..], &[1, 2, 3, 4]);
        assert_eq!(decode_credit(&[0, 8, 0, 0]).unwrap(), 512 * 1024);
        assert!(matches!(
            decode_credit(&[1, 2, 3]),
            Err(FrameError::BadCreditPayload(3))
        ));
        let mut b = BytesMut::new();
        Frame::new(
            Kind::Stream(STREAM_DATA),
            STREAM_FROM_ACCEPTOR,
            7,
            Bytes::from_static(b"x"),
        )
        .encode(&mut b);
        assert_eq!(
            &b[..],
            &[0, 0, 0, 1, 0x13, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7, b'x']
        );
    }

    #[test]
    fn round_trip_every_kind() {
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let mut buf = BytesMut::new();
        let kinds = [
            Kind::Request,
            Kind::Response,
            Kind::Error,
            Kind::Ping,
            Kind::Pong,
            Kind::Cancel,
            Kind::Goaway,
            Kind::Stream(0x10),
            Kind::Stream(0x1f),
        ];
        let frames: Vec<Frame> = kinds
            .iter()
            .enumerate()
            .map(|(i, k)| {
                Frame::new(
                    *k,
                    i as u16,
                    u64::MAX - i as u64,
                    vec![i as u8; i * 100].into(),
                )
            })
            .collect();
        for f in &frames {
            f.encode(&mut buf);
        }
        for f in &frames {
            assert_eq!(dec.decode(&mut buf).unwrap().as_ref(), Some(f));
        }
        assert!(buf.is_empty());
        assert!(dec.decode_eof(&mut buf).unwrap().is_none());
    }

    #[test]
    fn truncated_header_and_payload() {
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let mut whole = BytesMut::new();
        Frame::new(Kind::Response, 0, 7, Bytes::from_static(b"payload")).encode(&mut whole);

        let mut b = BytesMut::from(&whole[..5]);
        assert!(dec.decode(&mut b).unwrap().is_none());
        assert!(matches!(
            dec.decode_eof(&mut b),
            Err(FrameError::Truncated { have: 5, need: 16 })
        ));

        let mut b = BytesMut::from(&whole[..HEADER_LEN + 3]);
        assert!(dec.decode(&mut b).unwrap().is_none());
        assert!(matches!(
            dec.decode_eof(&mut b),
            Err(FrameError::Truncated { have: 19, need: 23 })
        ));

        // Feeding the rest byte by byte completes it.
        let mut b = BytesMut::new();
        let mut got = None;
        for byte in whole.iter() {
            b.put_u8(*byte);
            if let Some(f) = dec.decode(&mut b).unwrap() {
                got = Some(f);
            }
        }
        assert_eq!(got.unwrap().payload, Bytes::from_static(b"payload"));
    }

    #[test]
    fn oversized_length_is_refused_without_allocating() {
        let mut dec = FrameDecoder::new(MIN_FRAME);
        let mut b = BytesMut::new();
        b.put_u32(u32::MAX);
        b.put_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let cap_before = b.capacity();
        match dec.decode(&mut b) {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(len, u32::MAX as usize);
                assert_eq!(max, MIN_FRAME - HEADER_LEN);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(b.capacity(), cap_before);
        // Exactly at the limit is fine.
        let mut b = BytesMut::new();
        Frame::new(
            Kind::Request,
            1,
            1,
            vec![0u8; MIN_FRAME - HEADER_LEN].into(),
        )
        .encode(&mut b);
        assert!(dec.decode(&mut b).unwrap().is_some());
    }

    #[test]
    fn unknown_kind_and_flags_are_refused() {
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let mut h = Frame::new(Kind::Ping, 0, 0, Bytes::new()).header().encode();
        h[4] = 0x08;
        assert!(matches!(
            dec.decode(&mut BytesMut::from(&h[..])),
            Err(FrameError::UnknownKind(0x08))
        ));
        h[4] = 0x00;
        assert!(matches!(
            dec.decode(&mut BytesMut::from(&h[..])),
            Err(FrameError::UnknownKind(0x00))
        ));
        h[4] = 0x04;
        h[5] = 0x80;
        assert!(matches!(
            dec.decode(&mut BytesMut::from(&h[..])),
            Err(FrameError::BadFlags(0x80))
        ));
    }

    #[test]
    fn error_payload_edge_cases() {
        assert!(matches!(
            decode_error(b"\x00\x00\x01"),
            Err(FrameError::BadErrorPayload(3))
        ));
        let long = "é".repeat(MAX_ERROR_MESSAGE);
        let p = encode_error(5, &long);
        let (errno, msg) = decode_error(&p).unwrap();
        assert_eq!(errno, 5);
        assert!(msg.len() <= MAX_ERROR_MESSAGE);
        assert!(msg.chars().all(|c| c == 'é'));
    }

    proptest! {
        /// Arbitrary bytes, fed in arbitrary chunks: the decoder never panics, either yields
        /// frames whose payloads fit the limit or fails, and the buffer never grows beyond
        /// what the input plus one maximal frame needs.
        #[test]
        fn decoder_survives_arbitrary_bytes(
            data in proptest::collection::vec(any::<u8>(), 0..4096),
            chunk in 1usize..512,
            max_frame in MIN_FRAME..4 * MIN_FRAME,
        ) {
            let mut dec = FrameDecoder::new(max_frame);
            let mut buf = BytesMut::new();
            'feed: for piece in data.chunks(chunk) {
                buf.extend_from_slice(piece);
                loop {
                    match dec.decode(&mut buf) {
                        Ok(Some(f)) => prop_assert!(f.payload.len() <= max_frame - HEADER_LEN),
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
                prop_assert!(buf.capacity() <= 2 * (max_frame + data.len()) + 64,
                    "capacity {} for max_frame {} and {} input bytes", buf.capacity(), max_frame, data.len());
            }
            let _ = dec.decode_eof(&mut buf);
        }

        /// A 4 GiB length is refused before any reservation, whatever follows.
        #[test]
        fn huge_lengths_never_reserve(len in (DEFAULT_MAX_FRAME as u32)..=u32::MAX, rest in any::<[u8; 12]>()) {
            let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
            let mut b = BytesMut::with_capacity(HEADER_LEN);
            b.put_u32(len);
            b.put_slice(&rest);
            let r = dec.decode(&mut b);
            prop_assert!(r.is_err());
            prop_assert!(b.capacity() <= 64);
        }
    }
}
