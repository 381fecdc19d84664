//! The signaling wire protocol: JSON messages in WebSocket text frames, one enum per
//! direction, the error codes both sides share, and the reasons a connection is closed.
//!
//! # Tags
//!
//! Every message is a JSON object whose `type` field is its tag. Tags are never reused:
//! a message that changes incompatibly gets a new tag, and the old one is listed as
//! retired below so nobody takes it again.
//!
//! | direction | tag | since version |
//! |---|---|---|
//! | client → server | `hello`, `relay`, `watch`, `unwatch`, `get_key`, `refresh` | 1 |
//! | server → client | `welcome`, `relay`, `presence`, `key`, `error`, `refreshed` | 1 |
//!
//! Retired tags: none yet.
//!
//! Version 2 added `hello`'s `proof`: the signature, with the identity key `hello`
//! presents, of the challenge the server sent in the upgrade's [`CHALLENGE_HEADER`]
//! ([`hello_proof`]). A version 1 client is closed with "unsupported protocol version".
//!
//! # Frames
//!
//! A frame is checked before it is parsed ([`check`]): at most [`MAX_MESSAGE_BYTES`]
//! bytes of text. The WebSocket layer enforces the same limit on the frame header,
//! before it allocates the payload.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ids::UserName;

/// Version of this protocol, sent in [`ClientToServer::Hello`] and
/// [`ServerToClient::Welcome`].
pub const PROTOCOL_VERSION: u32 = 2;

/// Response header of the WebSocket upgrade carrying the server's challenge: 32 random
/// bytes, base64url, that the client signs in its `hello` with the identity key it
/// presents, proving it holds that key.
pub const CHALLENGE_HEADER: &str = "brume-challenge";

/// What a client signs in `hello`: a fixed context, the challenge, the user and the key.
fn hello_signed_bytes(challenge: &str, user: &UserName, key: &IdentityKey) -> Vec<u8> {
    let mut bytes = b"brume hello v2\n".to_vec();
    for part in [
        challenge.as_bytes(),
        b"\n",
        user.as_str().as_bytes(),
        b"\n",
        &key.0,
    ] {
        bytes.extend_from_slice(part);
    }
    bytes
}

/// The `proof` of a `hello` from `user` answering `challenge` with `identity`.
pub fn hello_proof(
    identity: &ed25519_dalek::SigningKey,
    challenge: &str,
    user: &UserName,
) -> String {
    use ed25519_dalek::Signer as _;
    let key = IdentityKey::from(identity.verifying_key());
    let signature = identity.sign(&hello_signed_bytes(challenge, user, &key));
    URL_SAFE_NO_PAD.encode(signature.to_bytes())
}

/// Whether `proof` is `key`'s signature of `challenge` for `user`.
pub fn hello_proof_holds(key: &IdentityKey, challenge: &str, user: &UserName, proof: &str) -> bool {
    let Ok(verifying) = key.verifying_key() else {
        return false;
    };
    let Some(signature) = URL_SAFE_NO_PAD
        .decode(proof.as_bytes())
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
    else {
        return false;
    };
    verifying
        .verify_strict(
            &hello_signed_bytes(challenge, user, key),
            &ed25519_dalek::Signature::from_bytes(&signature),
        )
        .is_ok()
}

/// Largest message, in bytes of JSON text, either side may send.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;

/// Most users one connection may watch at once.
pub const MAX_WATCHED: usize = 1024;

/// Errors decoding or encoding a message.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The frame is larger than [`MAX_MESSAGE_BYTES`].
    #[error("message of {len} bytes exceeds the limit of {limit} bytes")]
    TooBig {
        /// Size of the frame.
        len: usize,
        /// The limit it exceeds.
        limit: usize,
    },
    /// The frame is not a valid message.
    #[error("malformed message: {reason}")]
    Malformed {
        /// What the JSON parser said.
        reason: String,
    },
}

/// The error codes of the original Brume service, with the HTTP status each stands for.
/// They reach the user verbatim (logs and `brume status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// `400`: the WebSocket upgrade carried no token.
    #[serde(rename = "400")]
    MissingToken,
    /// `401`: the token has expired.
    #[serde(rename = "401")]
    TokenExpired,
    /// `406`: the token is malformed, tampered with or signed with another algorithm.
    #[serde(rename = "406")]
    InvalidToken,
    /// `ENODEST (410)`: the requested user exists but is not connected.
    #[serde(rename = "ENODEST")]
    NoDest,
    /// `EBADDEST (404)`: the requested user is unknown.
    #[serde(rename = "EBADDEST")]
    BadDest,
    /// `ENOTMEMBER (409)`: the requester is not a member of the group.
    #[serde(rename = "ENOTMEMBER")]
    NotMember,
    /// `ECONNREFUSED (503)`: the signaling server could not be reached.
    #[serde(rename = "ECONNREFUSED")]
    ConnRefused,
}

impl ErrorCode {
    /// Every code, for tables and tests.
    pub const ALL: [ErrorCode; 7] = [
        ErrorCode::MissingToken,
        ErrorCode::TokenExpired,
        ErrorCode::InvalidToken,
        ErrorCode::NoDest,
        ErrorCode::BadDest,
        ErrorCode::NotMember,
        ErrorCode::ConnRefused,
    ];

    /// The code's name as users see it: `400`, `ENODEST`, …
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::MissingToken => "400",
            ErrorCode::TokenExpired => "401",
            ErrorCode::InvalidToken => "406",
            ErrorCode::NoDest => "ENODEST",
            ErrorCode::BadDest => "EBADDEST",
            ErrorCode::NotMember => "ENOTMEMBER",
            ErrorCode::ConnRefused => "ECONNREFUSED",
        }
    }

    /// The HTTP status the code stands for.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::MissingToken => 400,
            ErrorCode::TokenExpired => 401,
            ErrorCode::InvalidToken => 406,
            ErrorCode::NoDest => 410,
            ErrorCode::BadDest => 404,
            ErrorCode::NotMember => 409,
            ErrorCode::ConnRefused => 503,
        }
    }

    /// The code for an HTTP status, if it is one of ours.
    pub fn from_status(status: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.status() == status)
    }

    /// What the code means, in words.
    pub fn meaning(self) -> &'static str {
        match self {
            ErrorCode::MissingToken => "missing token",
            ErrorCode::TokenExpired => "token expired",
            ErrorCode::InvalidToken => "invalid token",
            ErrorCode::NoDest => "the requested user is not connected",
            ErrorCode::BadDest => "the requested user is unknown",
            ErrorCode::NotMember => "the requester is not a member of the group",
            ErrorCode::ConnRefused => "could not connect to the signaling server",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name().parse::<u16>() {
            Ok(_) => write!(f, "{}: {}", self.name(), self.meaning()),
            Err(_) => write!(f, "{} ({}): {}", self.name(), self.status(), self.meaning()),
        }
    }
}

/// The JSON body of every HTTP error answer (token endpoint and refused upgrades).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpError {
    /// The error's name: an [`ErrorCode`] name such as `406`, or another short word.
    pub error: String,
    /// What went wrong, in words.
    pub message: String,
}

/// A user's ed25519 identity public key; base64url (no padding) in JSON.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdentityKey(pub [u8; 32]);

impl IdentityKey {
    /// The key as an ed25519 verifying key.
    pub fn verifying_key(&self) -> Result<ed25519_dalek::VerifyingKey, ProtocolError> {
        ed25519_dalek::VerifyingKey::from_bytes(&self.0).map_err(|e| ProtocolError::Malformed {
            reason: format!("invalid identity key: {e}"),
        })
    }
}

impl From<ed25519_dalek::VerifyingKey> for IdentityKey {
    fn from(key: ed25519_dalek::VerifyingKey) -> Self {
        Self(key.to_bytes())
    }
}

impl fmt::Display for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentityKey({self})")
    }
}

impl TryFrom<String> for IdentityKey {
    type Error = ProtocolError;
    fn try_from(text: String) -> Result<Self, ProtocolError> {
        let malformed = |reason: String| ProtocolError::Malformed { reason };
        let bytes = URL_SAFE_NO_PAD
            .decode(text.as_bytes())
            .map_err(|e| malformed(format!("identity key is not base64url: {e}")))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| malformed("identity key is not 32 bytes".to_owned()))?;
        let key = Self(bytes);
        key.verifying_key()?;
        Ok(key)
    }
}

impl From<IdentityKey> for String {
    fn from(key: IdentityKey) -> String {
        key.to_string()
    }
}

impl Serialize for IdentityKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for IdentityKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::try_from(text).map_err(serde::de::Error::custom)
    }
}

/// Messages a client sends to the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ClientToServer {
    /// The first message of every connection: the protocol version the client speaks
    /// and its identity key, registered on first connect and checked afterwards.
    #[serde(rename = "hello")]
    Hello {
        /// [`PROTOCOL_VERSION`] of the client.
        version: u32,
        /// The client's ed25519 public key.
        identity_key: IdentityKey,
        /// Signature with that key of the upgrade's challenge ([`hello_proof`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        proof: Option<String>,
    },
    /// Pass `payload` to user `to`. The server never looks inside the payload.
    #[serde(rename = "relay")]
    Relay {
        /// The recipient.
        to: UserName,
        /// Opaque connection-setup data (offer, answer, ICE candidate, …).
        payload: serde_json::Value,
    },
    /// Tell me when these users come online or go away; answered at once with their
    /// current state.
    #[serde(rename = "watch")]
    Watch {
        /// Users to watch.
        users: Vec<UserName>,
    },
    /// Stop watching these users.
    #[serde(rename = "unwatch")]
    Unwatch {
        /// Users to stop watching.
        users: Vec<UserName>,
    },
    /// Ask for a user's registered identity key; answered by [`ServerToClient::Key`].
    #[serde(rename = "get_key")]
    GetKey {
        /// Chosen by the client, echoed in the answer.
        id: u64,
        /// Whose key.
        user: UserName,
    },
    /// A fresh access token that extends this session beyond the first token's expiry.
    #[serde(rename = "refresh")]
    Refresh {
        /// The new token.
        token: String,
    },
}

/// Messages the server sends to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ServerToClient {
    /// Answer to `hello`: the session is open.
    #[serde(rename = "welcome")]
    Welcome {
        /// [`PROTOCOL_VERSION`] of the server.
        version: u32,
        /// The account this session acts as, from the token.
        user: UserName,
        /// Seconds until the session's token expires, unless refreshed.
        expires_in: u64,
        /// The STUN/TURN servers to use for peer links (fresh ones follow every
        /// `refreshed`, in `ice_servers`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ice_servers: Vec<super::ice::IceServer>,
    },
    /// A payload from another user. `from` is set by the server from the sender's
    /// token, never taken from the sender.
    #[serde(rename = "relay")]
    Relay {
        /// The sender.
        from: UserName,
        /// The payload as the sender gave it.
        payload: serde_json::Value,
    },
    /// A watched user came online or went away.
    #[serde(rename = "presence")]
    Presence {
        /// The watched user.
        user: UserName,
        /// Whether it is connected now.
        online: bool,
    },
    /// Answer to `get_key`.
    #[serde(rename = "key")]
    Key {
        /// The request's id.
        id: u64,
        /// Whose key.
        user: UserName,
        /// The registered key; `None` if the user never connected.
        identity_key: Option<IdentityKey>,
    },
    /// A request failed.
    #[serde(rename = "error")]
    Error {
        /// Which error.
        code: ErrorCode,
        /// What went wrong, in words.
        message: String,
        /// The user the failed request named (relay recipient, watched user, …).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<UserName>,
        /// The id of the failed `get_key` request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    /// Answer to `refresh`: the session now lasts until the new token expires.
    #[serde(rename = "refreshed")]
    Refreshed {
        /// Seconds until the new token expires.
        expires_in: u64,
    },
    /// The STUN/TURN servers to use for peer links, with fresh TURN
    /// credentials; sent after every `refreshed`, if the server has any.
    #[serde(rename = "ice_servers")]
    IceServers {
        /// The servers.
        servers: Vec<super::ice::IceServer>,
        /// Seconds until their credentials expire.
        expires_in: u64,
    },
}

/// Checks a frame's size before anything parses it.
pub fn check(frame: &str) -> Result<(), ProtocolError> {
    if frame.len() > MAX_MESSAGE_BYTES {
        return Err(ProtocolError::TooBig {
            len: frame.len(),
            limit: MAX_MESSAGE_BYTES,
        });
    }
    Ok(())
}

fn decode<T: DeserializeOwned>(frame: &str) -> Result<T, ProtocolError> {
    check(frame)?;
    // The parser quotes what it could not read (an unknown `type`, say): text from
    // the sender, made printable before it reaches a log or a close frame.
    serde_json::from_str(frame).map_err(|e| ProtocolError::Malformed {
        reason: escaped(&e.to_string()),
    })
}

/// Longest piece of untrusted text [`escaped`] keeps, in characters.
const MAX_ESCAPED_CHARS: usize = 160;

/// `text`, which came from outside (a peer, a client, a token), as one printable line
/// fit for a log: control characters (newlines, escape sequences) are written as Rust
/// escapes and anything beyond [`MAX_ESCAPED_CHARS`] is cut, so that nobody can forge
/// or flood log lines through an error message.
pub fn escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_ESCAPED_CHARS * 2));
    for (i, c) in text.chars().enumerate() {
        if i == MAX_ESCAPED_CHARS {
            out.push('…');
            break;
        }
        if c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn encode<T: Serialize>(msg: &T) -> Result<String, ProtocolError> {
    let text = serde_json::to_string(msg).map_err(|e| ProtocolError::Malformed {
        reason: e.to_string(),
    })?;
    check(&text)?;
    Ok(text)
}

impl ClientToServer {
    /// Checks and parses one frame.
    pub fn decode(frame: &str) -> Result<Self, ProtocolError> {
        decode(frame)
    }

    /// The frame for this message; fails if it would exceed [`MAX_MESSAGE_BYTES`].
    pub fn encode(&self) -> Result<String, ProtocolError> {
        encode(self)
    }
}

impl ServerToClient {
    /// Checks and parses one frame.
    pub fn decode(frame: &str) -> Result<Self, ProtocolError> {
        decode(frame)
    }

    /// The frame for this message; fails if it would exceed [`MAX_MESSAGE_BYTES`].
    pub fn encode(&self) -> Result<String, ProtocolError> {
        encode(self)
    }
}

/// Why the server closed a connection. Sent as the WebSocket close frame's code and
/// reason, so a client (or a person with a WebSocket tool) can read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The server is shutting down.
    Shutdown,
    /// The same user connected again; the newer connection wins.
    Replaced,
    /// The session's token expired and no fresh one arrived in time.
    TokenExpired,
    /// The identity key differs from the one registered for this user.
    KeyRefused,
    /// The client speaks a protocol version this server does not.
    UnsupportedVersion {
        /// The client's version.
        version: u32,
    },
    /// A frame was not a valid message, or came out of order.
    Malformed {
        /// What was wrong with it.
        detail: String,
    },
    /// A frame exceeded [`MAX_MESSAGE_BYTES`].
    TooBig,
    /// A per-connection limit other than size was exceeded.
    Limit {
        /// Which one.
        detail: String,
    },
    /// The client does not read its messages fast enough.
    Lagging,
    /// Nothing was received for too long (no answer to keepalive pings).
    Idle,
    /// The server failed (its account database, most likely); try again later.
    ServerError,
    /// The account's tokens were revoked (`brume server revoke-tokens` or `reset-key`):
    /// connect again with a fresh token.
    Revoked,
}

/// Close codes of [`CloseReason`]; 4000-4999 are for applications (RFC 6455 §7.4.2).
mod close_code {
    pub(super) const GOING_AWAY: u16 = 1001;
    pub(super) const SERVER_ERROR: u16 = 1011;
    pub(super) const TOO_BIG: u16 = 1009;
    pub(super) const REPLACED: u16 = 4000;
    pub(super) const TOKEN_EXPIRED: u16 = 4001;
    pub(super) const KEY_REFUSED: u16 = 4002;
    pub(super) const VERSION: u16 = 4003;
    pub(super) const MALFORMED: u16 = 4004;
    pub(super) const LIMIT: u16 = 4005;
    pub(super) const LAGGING: u16 = 4006;
    pub(super) const IDLE: u16 = 4007;
    pub(super) const REVOKED: u16 = 4008;
}

/// A WebSocket close reason holds at most 123 bytes.
const MAX_CLOSE_REASON: usize = 123;

impl CloseReason {
    /// The WebSocket close code.
    pub fn code(&self) -> u16 {
        use close_code::*;
        match self {
            CloseReason::Shutdown => GOING_AWAY,
            CloseReason::Replaced => REPLACED,
            CloseReason::TokenExpired => TOKEN_EXPIRED,
            CloseReason::KeyRefused => KEY_REFUSED,
            CloseReason::UnsupportedVersion { .. } => VERSION,
            CloseReason::Malformed { .. } => MALFORMED,
            CloseReason::TooBig => TOO_BIG,
            CloseReason::Limit { .. } => LIMIT,
            CloseReason::Lagging => LAGGING,
            CloseReason::Idle => IDLE,
            CloseReason::ServerError => SERVER_ERROR,
            CloseReason::Revoked => REVOKED,
        }
    }

    /// The close frame's reason text, cut to what a close frame can hold.
    pub fn text(&self) -> String {
        let mut text = self.to_string();
        if text.len() > MAX_CLOSE_REASON {
            let mut end = MAX_CLOSE_REASON;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        text
    }

    /// The reason for a close frame received with `code` and `text`.
    pub fn from_close(code: u16, text: &str) -> Self {
        use close_code::*;
        match code {
            REPLACED => CloseReason::Replaced,
            TOKEN_EXPIRED => CloseReason::TokenExpired,
            KEY_REFUSED => CloseReason::KeyRefused,
            VERSION => CloseReason::UnsupportedVersion { version: 0 },
            TOO_BIG => CloseReason::TooBig,
            LIMIT => CloseReason::Limit {
                detail: text.to_owned(),
            },
            LAGGING => CloseReason::Lagging,
            IDLE => CloseReason::Idle,
            GOING_AWAY => CloseReason::Shutdown,
            SERVER_ERROR => CloseReason::ServerError,
            REVOKED => CloseReason::Revoked,
            _ => CloseReason::Malformed {
                detail: text.to_owned(),
            },
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Shutdown => f.write_str("server shutting down"),
            CloseReason::Replaced => f.write_str("replaced by a newer connection of the same user"),
            CloseReason::TokenExpired => f.write_str("401: token expired"),
            CloseReason::KeyRefused => {
                f.write_str("identity key differs from the registered one (brume server reset-key)")
            }
            CloseReason::UnsupportedVersion { version } => {
                write!(f, "unsupported protocol version {version}")
            }
            CloseReason::Malformed { detail } => write!(f, "malformed message: {detail}"),
            CloseReason::TooBig => write!(f, "message exceeds {MAX_MESSAGE_BYTES} bytes"),
            CloseReason::Limit { detail } => write!(f, "limit exceeded: {detail}"),
            CloseReason::Lagging => f.write_str("not reading messages fast enough"),
            CloseReason::Idle => f.write_str("idle: no answer to keepalive"),
            CloseReason::ServerError => f.write_str("internal server error"),
            CloseReason::Revoked => f.write_str("401: token revoked; connect with a fresh token"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_have_the_original_names_and_numbers() {
        let table: Vec<(&str, u16)> = ErrorCode::ALL
            .iter()
            .map(|c| (c.name(), c.status()))
            .collect();
        assert_eq!(
            table,
            [
                ("400", 400),
                ("401", 401),
                ("406", 406),
                ("ENODEST", 410),
                ("EBADDEST", 404),
                ("ENOTMEMBER", 409),
                ("ECONNREFUSED", 503)
            ]
        );
        assert_eq!(
            ErrorCode::NoDest.to_string(),
            "ENODEST (410): the requested user is not connected"
        );
        assert_eq!(ErrorCode::TokenExpired.to_string(), "401: token expired");
        assert_eq!(
            serde_json::to_string(&ErrorCode::BadDest).unwrap(),
            "\"EBADDEST\""
        );
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_status(code.status()), Some(code));
        }
    }

    #[test]
    fn a_hello_proof_holds_only_for_its_key_challenge_and_user() {
        let identity = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let key = IdentityKey::from(identity.verifying_key());
        let other =
            IdentityKey::from(ed25519_dalek::SigningKey::from_bytes(&[8; 32]).verifying_key());
        let alice = UserName::new("alice").unwrap();
        let bob = UserName::new("bob").unwrap();
        let proof = hello_proof(&identity, "c1", &alice);
        assert!(hello_proof_holds(&key, "c1", &alice, &proof));
        assert!(!hello_proof_holds(&key, "c2", &alice, &proof));
        assert!(!hello_proof_holds(&key, "c1", &bob, &proof));
        assert!(!hello_proof_holds(&other, "c1", &alice, &proof));
        assert!(!hello_proof_holds(&key, "c1", &alice, "not base64!"));
        assert!(!hello_proof_holds(&key, "c1", &alice, ""));
    }

    #[test]
    fn tags_are_the_documented_ones() {
        let hello = ClientToServer::Hello {
            version: 1,
            identity_key: IdentityKey::from(
                ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key(),
            ),
            proof: None,
        };
        let text = hello.encode().unwrap();
        assert!(text.starts_with("{\"type\":\"hello\""), "{text}");
        let relay = ServerToClient::Relay {
            from: UserName::new("alice").unwrap(),
            payload: serde_json::json!({"sdp": "x"}),
        };
        assert_eq!(
            relay.encode().unwrap(),
            r#"{"type":"relay","from":"alice","payload":{"sdp":"x"}}"#
        );
    }

    #[test]
    fn oversized_frames_are_refused_before_parsing() {
        let big = format!(
            "{{\"type\":\"relay\",\"to\":\"bob\",\"payload\":\"{}\"}}",
            "x".repeat(MAX_MESSAGE_BYTES)
        );
        assert!(matches!(
            ClientToServer::decode(&big),
            Err(ProtocolError::TooBig { .. })
        ));
        let relay = ClientToServer::Relay {
            to: UserName::new("bob").unwrap(),
            payload: serde_json::Value::String("x".repeat(MAX_MESSAGE_BYTES)),
        };
        assert!(matches!(relay.encode(), Err(ProtocolError::TooBig { .. })));
    }

    #[test]
    fn bad_identity_keys_and_names_are_malformed() {
        for frame in [
            r#"{"type":"hello","version":1,"identity_key":"AAAA"}"#,
            r#"{"type":"relay","to":"../etc","payload":1}"#,
            r#"{"type":"nope"}"#,
            r#"[1,2]"#,
        ] {
            assert!(
                matches!(
                    ClientToServer::decode(frame),
                    Err(ProtocolError::Malformed { .. })
                ),
                "{frame}"
            );
        }
    }

    #[test]
    fn close_reasons_fit_a_close_frame_and_read_back() {
        let long = CloseReason::Malformed {
            detail: "é".repeat(200),
        };
        assert!(long.text().len() <= MAX_CLOSE_REASON);
        for reason in [
            CloseReason::Replaced,
            CloseReason::TokenExpired,
            CloseReason::KeyRefused,
            CloseReason::TooBig,
            CloseReason::Lagging,
            CloseReason::Idle,
            CloseReason::Shutdown,
            CloseReason::ServerError,
            CloseReason::Revoked,
        ] {
            assert_eq!(
                CloseReason::from_close(reason.code(), &reason.text()),
                reason
            );
        }
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    fn user() -> impl Strategy<Value = UserName> {
        "[a-z][a-z0-9_.-]{0,20}".prop_map(|s| UserName::new(&s).expect("pattern gives valid names"))
    }

    fn key() -> impl Strategy<Value = IdentityKey> {
        any::<[u8; 32]>().prop_map(|seed| {
            IdentityKey::from(ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key())
        })
    }

    /// JSON values without floats (whose text form need not round-trip exactly).
    fn payload() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| Value::Number(n.into())),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn code() -> impl Strategy<Value = ErrorCode> {
        prop::sample::select(ErrorCode::ALL.to_vec())
    }

    fn client_msg() -> impl Strategy<Value = ClientToServer> {
        prop_oneof![
            (any::<u32>(), key(), prop::option::of("[A-Za-z0-9_-]{0,90}")).prop_map(
                |(version, identity_key, proof)| ClientToServer::Hello {
                    version,
                    identity_key,
                    proof
                }
            ),
            (user(), payload()).prop_map(|(to, payload)| ClientToServer::Relay { to, payload }),
            prop::collection::vec(user(), 0..8).prop_map(|users| ClientToServer::Watch { users }),
            prop::collection::vec(user(), 0..8).prop_map(|users| ClientToServer::Unwatch { users }),
            (any::<u64>(), user()).prop_map(|(id, user)| ClientToServer::GetKey { id, user }),
            any::<String>().prop_map(|token| ClientToServer::Refresh { token }),
        ]
    }

    fn server_msg() -> impl Strategy<Value = ServerToClient> {
        prop_oneof![
            (any::<u32>(), user(), any::<u64>()).prop_map(|(version, user, expires_in)| {
                ServerToClient::Welcome {
                    version,
                    user,
                    expires_in,
                    ice_servers: Vec::new(),
                }
            }),
            (user(), payload()).prop_map(|(from, payload)| ServerToClient::Relay { from, payload }),
            (user(), any::<bool>())
                .prop_map(|(user, online)| ServerToClient::Presence { user, online }),
            (any::<u64>(), user(), prop::option::of(key())).prop_map(|(id, user, identity_key)| {
                ServerToClient::Key {
                    id,
                    user,
                    identity_key,
                }
            }),
            (
                code(),
                any::<String>(),
                prop::option::of(user()),
                prop::option::of(any::<u64>())
            )
                .prop_map(|(code, message, user, id)| ServerToClient::Error {
                    code,
                    message,
                    user,
                    id
                }),
            any::<u64>().prop_map(|expires_in| ServerToClient::Refreshed { expires_in }),
            (
                prop::collection::vec("[a-z:0-9.]{1,30}", 0..4),
                any::<u64>()
            )
                .prop_map(|(urls, expires_in)| ServerToClient::IceServers {
                    servers: urls
                        .into_iter()
                        .map(|url| super::super::ice::IceServer {
                            urls: vec![url],
                            username: Some("1:u".into()),
                            credential: None,
                        })
                        .collect(),
                    expires_in,
                }),
        ]
    }

    proptest! {
        #[test]
        fn client_messages_round_trip(msg in client_msg()) {
            let text = msg.encode().unwrap();
            prop_assert_eq!(ClientToServer::decode(&text).unwrap(), msg);
        }

        #[test]
        fn server_messages_round_trip(msg in server_msg()) {
            let text = msg.encode().unwrap();
            prop_assert_eq!(ServerToClient::decode(&text).unwrap(), msg);
        }

        #[test]
        fn truncated_frames_never_panic(msg in client_msg(), cut in any::<prop::sample::Index>()) {
            let text = msg.encode().unwrap();
            let mut end = cut.index(text.len() + 1);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let truncated = &text[..end];
            let result = ClientToServer::decode(truncated);
            if end < text.len() {
                // A JSON object cut short is never complete.
                prop_assert!(result.is_err());
            }
        }

        #[test]
        fn corrupted_frames_never_panic(
            msg in server_msg(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut bytes = msg.encode().unwrap().into_bytes();
            for (at, byte) in flips {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            let text = String::from_utf8_lossy(&bytes);
            let _ = ServerToClient::decode(&text);
            let _ = ClientToServer::decode(&text);
        }

        #[test]
        fn arbitrary_text_never_panics(text in any::<String>()) {
            let _ = ServerToClient::decode(&text);
            let _ = ClientToServer::decode(&text);
        }
    }
}
