//! The peer link's wire format: every data-channel message is one frame, a one-byte
//! tag and a four-byte big-endian body length followed by the body. Frames are checked
//! ([`check`]) before they are parsed ([`parse`]); the size limits are enforced on the
//! header, before anything is allocated. Application messages larger than one frame
//! are split into a first frame that announces the total length and continuation
//! frames; the receiver's [`Assembler`] checks the announced total against
//! [`MAX_MESSAGE`] before it reserves memory. There is no in-band end marker anywhere.

use bytes::{BufMut, Bytes, BytesMut};

use crate::ids::GroupName;

/// Version of the peer protocol (and of the sync messages it carries), sent in
/// the handshake; a peer speaking another version is refused. Version 2: typed
/// refusals (`EBUSY` among them).
pub const PROTOCOL_VERSION: u16 = 2;

/// Bytes of the frame header: tag (1) and body length (4).
pub const HEADER: usize = 5;

/// Largest frame, header included: the SCTP message size every WebRTC stack accepts.
pub const MAX_FRAME: usize = 64 * 1024;

/// Largest application message (payload of one `send`, request or response).
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// Frame tags. Explicit and never reused: a retired tag stays reserved.
pub mod tag {
    /// Handshake: version, user, identity key, nonce. Sent by both sides.
    pub const HELLO: u8 = 0x01;
    /// Handshake: the signature over the transcript. Sent by both sides.
    pub const AUTH: u8 = 0x02;
    /// Handshake: the sender refuses the link, with a reason.
    pub const REFUSE: u8 = 0x03;
    /// First (or only) frame of an opaque application message.
    pub const MESSAGE: u8 = 0x10;
    /// Continuation of the message, request or response under way on this channel.
    pub const CONTINUE: u8 = 0x11;
    /// Requester to owner: first frame of a request about one of the owner's groups.
    pub const REQUEST: u8 = 0x20;
    /// Owner to requester: first frame of the answer to a request.
    pub const RESPONSE: u8 = 0x21;
}

/// Errors of the frame codec. Each one ends the link: a peer that sends a malformed
/// frame is not followed any further.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer bytes than a header, or a body shorter than its fields.
    #[error("truncated frame: {len} bytes where at least {need} are needed")]
    Truncated {
        /// Bytes available.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The header's length does not match the data-channel message's length.
    #[error("frame says {declared} body bytes but carries {actual}")]
    LengthMismatch {
        /// Length in the header.
        declared: usize,
        /// Bytes after the header.
        actual: usize,
    },
    /// A frame or a message above the limits.
    #[error("{what} of {len} bytes exceeds the limit of {limit} bytes")]
    TooBig {
        /// Frame or message.
        what: &'static str,
        /// Its size.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A tag this version does not know.
    #[error("unknown frame tag {tag:#04x}")]
    UnknownTag {
        /// The tag.
        tag: u8,
    },
    /// A field is not valid (bad UTF-8, bad name, trailing bytes, …).
    #[error("malformed {frame} frame: {reason}")]
    Malformed {
        /// Which frame.
        frame: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// Frames arrived in an order the protocol does not allow.
    #[error("unexpected {frame} frame: {reason}")]
    Unexpected {
        /// Which frame.
        frame: &'static str,
        /// Why it is not allowed here.
        reason: &'static str,
    },
}

/// Status of a [`PeerResponse`]. Explicit, never-reused numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseStatus {
    /// The owner served the request; the payload is its answer.
    Ok,
    /// `ENOTMEMBER (409)`: the requester is not a member of the group.
    NotMember,
    /// The owner had no handler for the request or it failed; the payload is a
    /// UTF-8 reason.
    Failed,
}

impl ResponseStatus {
    fn to_wire(self) -> u16 {
        match self {
            ResponseStatus::Ok => 200,
            ResponseStatus::NotMember => 409,
            ResponseStatus::Failed => 500,
        }
    }

    fn from_wire(v: u16) -> Result<Self, WireError> {
        match v {
            200 => Ok(ResponseStatus::Ok),
            409 => Ok(ResponseStatus::NotMember),
            500 => Ok(ResponseStatus::Failed),
            _ => Err(WireError::Malformed {
                frame: "response",
                reason: "unknown status",
            }),
        }
    }
}

/// One checked and parsed frame, borrowing from the received bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Handshake, both directions: who the sender says it is and its fresh nonce.
    Hello {
        /// The sender's protocol version.
        version: u16,
        /// The sender's user name.
        user: &'a str,
        /// The sender's ed25519 identity key.
        key: [u8; 32],
        /// 32 fresh random bytes.
        nonce: [u8; 32],
    },
    /// Handshake, both directions: the signature over the transcript.
    Auth {
        /// ed25519 signature.
        signature: [u8; 64],
    },
    /// Handshake, both directions: the sender refuses the link.
    Refuse {
        /// Why, in words.
        reason: &'a str,
    },
    /// First frame of an opaque message.
    Message {
        /// Length of the whole message.
        total: u32,
        /// Its first bytes.
        chunk: &'a [u8],
    },
    /// More bytes of the message under way.
    Continue {
        /// The bytes.
        chunk: &'a [u8],
    },
    /// Requester to owner: first frame of a request.
    Request {
        /// Request id, unique per link and requester.
        id: u64,
        /// The owner's group it concerns.
        group: &'a str,
        /// Length of the whole request payload.
        total: u32,
        /// Its first bytes.
        chunk: &'a [u8],
    },
    /// Owner to requester: first frame of a response.
    Response {
        /// The request's id.
        id: u64,
        /// Outcome.
        status: ResponseStatus,
        /// Length of the whole response payload.
        total: u32,
        /// Its first bytes.
        chunk: &'a [u8],
    },
}

/// Checks a frame's header against the message it arrived in: known tag, length
/// within [`MAX_FRAME`] and equal to the bytes present. Returns the tag and the body.
pub fn check(buf: &[u8]) -> Result<(u8, &[u8]), WireError> {
    if buf.len() < HEADER {
        return Err(WireError::Truncated {
            len: buf.len(),
            need: HEADER,
        });
    }
    if buf.len() > MAX_FRAME {
        return Err(WireError::TooBig {
            what: "frame",
            len: buf.len(),
            limit: MAX_FRAME,
        });
    }
    let tag = buf[0];
    let declared = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    let body = &buf[HEADER..];
    if declared != body.len() {
        return Err(WireError::LengthMismatch {
            declared,
            actual: body.len(),
        });
    }
    match tag {
        tag::HELLO
        | tag::AUTH
        | tag::REFUSE
        | tag::MESSAGE
        | tag::CONTINUE
        | tag::REQUEST
        | tag::RESPONSE => Ok((tag, body)),
        tag => Err(WireError::UnknownTag { tag }),
    }
}

/// A cursor over a frame body that never reads past its end.
struct Reader<'a> {
    buf: &'a [u8],
    frame: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated {
                len: self.buf.len(),
                need: n,
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A string prefixed by its one-byte length.
    fn short_str(&mut self) -> Result<&'a str, WireError> {
        let len = self.take(1)?[0] as usize;
        std::str::from_utf8(self.take(len)?).map_err(|_| WireError::Malformed {
            frame: self.frame,
            reason: "name is not UTF-8",
        })
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn end(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed {
                frame: self.frame,
                reason: "trailing bytes",
            })
        }
    }
}

/// Parses a frame that [`check`] accepted.
pub fn parse(tag: u8, body: &[u8]) -> Result<Frame<'_>, WireError> {
    let frame_name = match tag {
        tag::HELLO => "hello",
        tag::AUTH => "auth",
        tag::REFUSE => "refuse",
        tag::MESSAGE => "message",
        tag::CONTINUE => "continue",
        tag::REQUEST => "request",
        tag::RESPONSE => "response",
        tag => return Err(WireError::UnknownTag { tag }),
    };
    let mut r = Reader {
        buf: body,
        frame: frame_name,
    };
    let frame = match tag {
        tag::HELLO => {
            let version = r.u16()?;
            let user = r.short_str()?;
            let key = r.array()?;
            let nonce = r.array()?;
            Frame::Hello {
                version,
                user,
                key,
                nonce,
            }
        }
        tag::AUTH => Frame::Auth {
            signature: r.array()?,
        },
        tag::REFUSE => {
            let reason = std::str::from_utf8(r.rest()).map_err(|_| WireError::Malformed {
                frame: "refuse",
                reason: "reason is not UTF-8",
            })?;
            Frame::Refuse { reason }
        }
        tag::MESSAGE => {
            let total = r.u32()?;
            Frame::Message {
                total,
                chunk: r.rest(),
            }
        }
        tag::CONTINUE => Frame::Continue { chunk: r.rest() },
        tag::REQUEST => {
            let id = r.u64()?;
            let group = r.short_str()?;
            let total = r.u32()?;
            Frame::Request {
                id,
                group,
                total,
                chunk: r.rest(),
            }
        }
        _ => {
            let id = r.u64()?;
            let status = ResponseStatus::from_wire(r.u16()?)?;
            let total = r.u32()?;
            Frame::Response {
                id,
                status,
                total,
                chunk: r.rest(),
            }
        }
    };
    r.end()?;
    Ok(frame)
}

/// Checks and parses one data-channel message.
pub fn decode(buf: &[u8]) -> Result<Frame<'_>, WireError> {
    let (tag, body) = check(buf)?;
    parse(tag, body)
}

fn frame(tag: u8, body_len: usize) -> BytesMut {
    let mut out = BytesMut::with_capacity(HEADER + body_len);
    out.put_u8(tag);
    // Callers keep bodies below MAX_FRAME, far below u32::MAX.
    out.put_u32(body_len as u32);
    out
}

/// Encodes a handshake `Hello`.
pub fn hello(user: &str, key: [u8; 32], nonce: [u8; 32]) -> BytesMut {
    // User names are at most 64 bytes (ids::check_name), so one length byte holds them.
    let user = &user.as_bytes()[..user.len().min(255)];
    let mut out = frame(tag::HELLO, 2 + 1 + user.len() + 64);
    out.put_u16(PROTOCOL_VERSION);
    out.put_u8(user.len() as u8);
    out.put_slice(user);
    out.put_slice(&key);
    out.put_slice(&nonce);
    out
}

/// Encodes a handshake `Auth`.
pub fn auth(signature: [u8; 64]) -> BytesMut {
    let mut out = frame(tag::AUTH, 64);
    out.put_slice(&signature);
    out
}

/// Encodes a handshake `Refuse`.
pub fn refuse(reason: &str) -> BytesMut {
    let reason = truncate_utf8(reason, 1024);
    let mut out = frame(tag::REFUSE, reason.len());
    out.put_slice(reason.as_bytes());
    out
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The kind of application message to split into frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound<'a> {
    /// An opaque message.
    Message,
    /// Requester to owner: a request about `group`.
    Request {
        /// Request id.
        id: u64,
        /// The owner's group.
        group: &'a GroupName,
    },
    /// Owner to requester: the answer to request `id`.
    Response {
        /// Request id.
        id: u64,
        /// Outcome.
        status: ResponseStatus,
    },
}

/// Splits an application message into frames of at most [`MAX_FRAME`] bytes.
pub fn encode(kind: &Outbound<'_>, payload: &[u8]) -> Result<Vec<BytesMut>, WireError> {
    if payload.len() > MAX_MESSAGE {
        return Err(WireError::TooBig {
            what: "message",
            len: payload.len(),
            limit: MAX_MESSAGE,
        });
    }
    let total = payload.len() as u32;
    let fields = match kind {
        Outbound::Message => 4,
        Outbound::Request { group, .. } => 8 + 1 + group.as_str().len() + 4,
        Outbound::Response { .. } => 8 + 2 + 4,
    };
    let first_len = payload.len().min(MAX_FRAME - HEADER - fields);
    let (first_chunk, mut rest) = payload.split_at(first_len);
    let mut frames = Vec::with_capacity(1 + rest.len().div_ceil(MAX_FRAME - HEADER));
    let mut first = match kind {
        Outbound::Message => {
            let mut f = frame(tag::MESSAGE, fields + first_len);
            f.put_u32(total);
            f
        }
        Outbound::Request { id, group } => {
            let mut f = frame(tag::REQUEST, fields + first_len);
            f.put_u64(*id);
            // Group names are at most 64 bytes.
            f.put_u8(group.as_str().len() as u8);
            f.put_slice(group.as_str().as_bytes());
            f.put_u32(total);
            f
        }
        Outbound::Response { id, status } => {
            let mut f = frame(tag::RESPONSE, fields + first_len);
            f.put_u64(*id);
            f.put_u16(status.to_wire());
            f.put_u32(total);
            f
        }
    };
    first.put_slice(first_chunk);
    frames.push(first);
    while !rest.is_empty() {
        let n = rest.len().min(MAX_FRAME - HEADER);
        let (chunk, tail) = rest.split_at(n);
        let mut f = frame(tag::CONTINUE, n);
        f.put_slice(chunk);
        frames.push(f);
        rest = tail;
    }
    Ok(frames)
}

/// A complete application message received on one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// An opaque message.
    Message(Bytes),
    /// Requester to owner (we are the owner).
    Request {
        /// Request id.
        id: u64,
        /// Our group it concerns.
        group: GroupName,
        /// Its payload.
        payload: Bytes,
    },
    /// Owner to requester (we asked).
    Response {
        /// Request id.
        id: u64,
        /// Outcome.
        status: ResponseStatus,
        /// Its payload.
        payload: Bytes,
    },
}

/// What is being reassembled on one channel.
#[derive(Debug)]
enum Head {
    Message,
    Request { id: u64, group: GroupName },
    Response { id: u64, status: ResponseStatus },
}

/// Reassembles the application messages of one ordered channel from its frames.
#[derive(Debug, Default)]
pub struct Assembler {
    pending: Option<(Head, usize, BytesMut)>,
}

impl Assembler {
    /// Feeds one frame; returns a message once its last byte has arrived. Handshake
    /// frames are not application frames and are refused here.
    pub fn push(&mut self, frame: Frame<'_>) -> Result<Option<Inbound>, WireError> {
        let (head, total, chunk) = match frame {
            Frame::Continue { chunk } => {
                let Some((_, total, buf)) = self.pending.as_mut() else {
                    return Err(WireError::Unexpected {
                        frame: "continue",
                        reason: "no message under way",
                    });
                };
                if buf.len() + chunk.len() > *total {
                    return Err(WireError::Malformed {
                        frame: "continue",
                        reason: "more bytes than the message announced",
                    });
                }
                buf.put_slice(chunk);
                return Ok(self.finish_if_complete());
            }
            Frame::Message { total, chunk } => (Head::Message, total, chunk),
            Frame::Request {
                id,
                group,
                total,
                chunk,
            } => {
                let group = GroupName::new(group).map_err(|_| WireError::Malformed {
                    frame: "request",
                    reason: "invalid group name",
                })?;
                (Head::Request { id, group }, total, chunk)
            }
            Frame::Response {
                id,
                status,
                total,
                chunk,
            } => (Head::Response { id, status }, total, chunk),
            Frame::Hello { .. } | Frame::Auth { .. } | Frame::Refuse { .. } => {
                return Err(WireError::Unexpected {
                    frame: "handshake",
                    reason: "the handshake is over",
                });
            }
        };
        if self.pending.is_some() {
            return Err(WireError::Unexpected {
                frame: "message",
                reason: "the previous message is not complete",
            });
        }
        let total = total as usize;
        if total > MAX_MESSAGE {
            return Err(WireError::TooBig {
                what: "message",
                len: total,
                limit: MAX_MESSAGE,
            });
        }
        if chunk.len() > total {
            return Err(WireError::Malformed {
                frame: "message",
                reason: "more bytes than the message announced",
            });
        }
        // `total` was checked against MAX_MESSAGE above, before this allocation.
        let mut buf = BytesMut::with_capacity(total);
        buf.put_slice(chunk);
        self.pending = Some((head, total, buf));
        Ok(self.finish_if_complete())
    }

    fn finish_if_complete(&mut self) -> Option<Inbound> {
        match &self.pending {
            Some((_, total, buf)) if buf.len() == *total => {}
            _ => return None,
        }
        let (head, _, buf) = self.pending.take()?;
        let payload = buf.freeze();
        Some(match head {
            Head::Message => Inbound::Message(payload),
            Head::Request { id, group } => Inbound::Request { id, group, payload },
            Head::Response { id, status } => Inbound::Response {
                id,
                status,
                payload,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn assemble(frames: &[BytesMut]) -> Result<Vec<Inbound>, WireError> {
        let mut a = Assembler::default();
        let mut out = Vec::new();
        for f in frames {
            if let Some(m) = a.push(decode(f)?)? {
                out.push(m);
            }
        }
        Ok(out)
    }

    #[test]
    fn handshake_frames_round_trip() {
        let f = hello("alice", [7; 32], [9; 32]);
        assert_eq!(
            decode(&f).unwrap(),
            Frame::Hello {
                version: PROTOCOL_VERSION,
                user: "alice",
                key: [7; 32],
                nonce: [9; 32]
            }
        );
        assert_eq!(
            decode(&auth([3; 64])).unwrap(),
            Frame::Auth { signature: [3; 64] }
        );
        assert_eq!(
            decode(&refuse("no")).unwrap(),
            Frame::Refuse { reason: "no" }
        );
    }

    #[test]
    fn a_chunk_equal_to_an_old_end_marker_does_not_end_the_message() {
        // The original client ended a file at a chunk equal to the byte 0x05.
        let payload = Bytes::from_static(&[0x05]);
        let frames = encode(&Outbound::Message, &payload).unwrap();
        assert_eq!(
            assemble(&frames).unwrap(),
            vec![Inbound::Message(payload.clone())]
        );
        let big: Vec<u8> = (0..200_000u32).map(|_| 0x05).collect();
        let frames = encode(&Outbound::Message, &big).unwrap();
        assert!(frames.len() > 3);
        assert_eq!(
            assemble(&frames).unwrap(),
            vec![Inbound::Message(Bytes::from(big))]
        );
    }

    #[test]
    fn limits_are_checked_on_the_header_before_allocation() {
        // A first frame announcing 4 GiB is refused without reserving it.
        let mut f = frame(tag::MESSAGE, 4);
        f.put_u32(u32::MAX);
        assert!(matches!(
            assemble(&[f]),
            Err(WireError::TooBig {
                what: "message",
                ..
            })
        ));
        let too_big = vec![0u8; MAX_FRAME + 1];
        assert!(matches!(check(&too_big), Err(WireError::TooBig { .. })));
        assert!(encode(&Outbound::Message, &vec![0; MAX_MESSAGE + 1]).is_err());
        let mut lying = frame(tag::MESSAGE, 100);
        lying.put_u32(0);
        assert!(matches!(
            check(&lying),
            Err(WireError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn a_continuation_without_a_message_is_refused() {
        let f = frame(tag::CONTINUE, 0);
        assert!(assemble(&[f]).is_err());
    }

    fn outbound() -> impl Strategy<Value = (u8, u64, String, u8)> {
        (0u8..3, any::<u64>(), "[a-z][a-z0-9_-]{0,20}", 0u8..3)
    }

    proptest! {
        #[test]
        fn messages_round_trip(
            (kind, id, group, status) in outbound(),
            len in prop_oneof![0usize..300, 65_000usize..140_000],
            seed in any::<u8>(),
        ) {
            let payload: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
            let group = GroupName::new(&group).unwrap();
            let status = [ResponseStatus::Ok, ResponseStatus::NotMember, ResponseStatus::Failed][status as usize];
            let out = match kind {
                0 => Outbound::Message,
                1 => Outbound::Request { id, group: &group },
                _ => Outbound::Response { id, status },
            };
            let frames = encode(&out, &payload).unwrap();
            for f in &frames {
                prop_assert!(f.len() <= MAX_FRAME);
            }
            let got = assemble(&frames).unwrap();
            let payload = Bytes::from(payload);
            let want = match kind {
                0 => Inbound::Message(payload),
                1 => Inbound::Request { id, group: group.clone(), payload },
                _ => Inbound::Response { id, status, payload },
            };
            prop_assert_eq!(got, vec![want]);
        }

        #[test]
        fn corrupted_or_truncated_frames_never_panic(
            len in 0usize..100_000,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            cut in any::<usize>(),
            raw in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let payload = vec![0xabu8; len];
            let group = GroupName::new("g").unwrap();
            let mut frames: Vec<Vec<u8>> = encode(&Outbound::Request { id: 1, group: &group }, &payload)
                .unwrap()
                .into_iter()
                .map(|b| b.to_vec())
                .collect();
            frames.push(hello("bob", [1; 32], [2; 32]).to_vec());
            frames.push(raw);
            for (at, x) in flips {
                let i = at % frames.len();
                let f = &mut frames[i];
                if !f.is_empty() {
                    let j = at % f.len();
                    f[j] ^= x;
                }
            }
            let i = cut % frames.len();
            let keep = cut % (frames[i].len() + 1);
            frames[i].truncate(keep);
            let mut a = Assembler::default();
            for f in &frames {
                if let Ok(frame) = decode(f) {
                    let _ = a.push(frame);
                }
            }
        }
    }
}
