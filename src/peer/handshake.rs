//! The peer link's authentication: over the freshly opened control channel each side
//! sends `Hello` (version, user, identity key, fresh nonce), then `Auth`, an ed25519
//! signature over a transcript that binds both users, both identity keys, both nonces
//! and *both* DTLS certificate fingerprints as this side saw them in the SDP.
//!
//! A man in the middle terminates DTLS twice, so the two sides see different
//! fingerprint pairs and neither accepts the other's signature; a recorded `Auth`
//! does not verify against the fresh nonces of a new session. The signaling server is
//! never trusted: the keys are checked against the pins in the catalog.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

/// Which side of the WebRTC offer/answer a party is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Created the offer.
    Offerer,
    /// Answered it.
    Answerer,
}

impl Role {
    fn byte(self) -> u8 {
        match self {
            Role::Offerer => b'O',
            Role::Answerer => b'A',
        }
    }
}

/// What one party contributes to the transcript.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    /// Its user name.
    pub user: String,
    /// Its identity key.
    pub key: [u8; 32],
    /// Its fresh nonce for this session.
    pub nonce: [u8; 32],
    /// Its DTLS certificate fingerprint(s), normalised by [`sdp_fingerprints`].
    pub fingerprint: String,
}

/// Errors of the handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The key in `Hello` is not an ed25519 key.
    #[error("{user} presented an invalid identity key")]
    BadKey {
        /// Who.
        user: String,
    },
    /// The signature does not verify over this session's transcript.
    #[error(
        "{user}'s handshake signature does not match this session (forged, replayed or relayed by a man in the middle)"
    )]
    BadSignature {
        /// Who.
        user: String,
    },
    /// An SDP carried no usable fingerprint.
    #[error("the {side} session description has no DTLS fingerprint")]
    NoFingerprint {
        /// Local or remote.
        side: &'static str,
    },
}

const DOMAIN: &[u8] = b"brume peer link auth v1\0";

/// The transcript both sides sign: the domain, then the offerer's and the answerer's
/// contributions, each field length-prefixed so no two transcripts collide.
pub fn transcript(offerer: &Party, answerer: &Party) -> Vec<u8> {
    let mut t = Vec::with_capacity(512);
    t.extend_from_slice(DOMAIN);
    t.extend_from_slice(&super::wire::PROTOCOL_VERSION.to_be_bytes());
    for p in [offerer, answerer] {
        for field in [
            p.user.as_bytes(),
            &p.key[..],
            &p.nonce[..],
            p.fingerprint.as_bytes(),
        ] {
            t.extend_from_slice(&(field.len() as u32).to_be_bytes());
            t.extend_from_slice(field);
        }
    }
    t
}

fn signed_message(signer: Role, transcript: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(transcript.len() + 1);
    m.push(signer.byte());
    m.extend_from_slice(transcript);
    m
}

/// Signs the transcript as `role`.
pub fn sign(key: &SigningKey, role: Role, transcript: &[u8]) -> [u8; 64] {
    key.sign(&signed_message(role, transcript)).to_bytes()
}

/// Verifies the other side's signature over the transcript.
pub fn verify(
    user: &str,
    key: &[u8; 32],
    role: Role,
    transcript: &[u8],
    signature: &[u8; 64],
) -> Result<(), HandshakeError> {
    let key = VerifyingKey::from_bytes(key).map_err(|_| HandshakeError::BadKey {
        user: user.to_owned(),
    })?;
    key.verify(
        &signed_message(role, transcript),
        &Signature::from_bytes(signature),
    )
    .map_err(|_| HandshakeError::BadSignature {
        user: user.to_owned(),
    })
}

/// The DTLS fingerprints of an SDP, normalised: every `a=fingerprint` line, algorithm
/// and lower-case hex, sorted and joined, so both sides compute the same text.
pub fn sdp_fingerprints(sdp: &str, side: &'static str) -> Result<String, HandshakeError> {
    let mut prints: Vec<String> = sdp
        .lines()
        .filter_map(|l| l.trim().strip_prefix("a=fingerprint:"))
        .map(|v| v.trim().to_ascii_lowercase())
        .collect();
    if prints.is_empty() {
        return Err(HandshakeError::NoFingerprint { side });
    }
    prints.sort();
    prints.dedup();
    Ok(prints.join(";"))
}

/// A fresh random nonce.
pub fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    // Without the OS's randomness, nothing about this process is safe; there is no
    // weaker fallback worth having.
    if getrandom::fill(&mut n).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        n = *blake3::hash(&t.to_le_bytes()).as_bytes();
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn party(user: &str, seed: u8, fp: &str) -> (SigningKey, Party) {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let party = Party {
            user: user.into(),
            key: key.verifying_key().to_bytes(),
            nonce: nonce(),
            fingerprint: fp.into(),
        };
        (key, party)
    }

    #[test]
    fn both_sides_accept_a_genuine_handshake() {
        let (ka, a) = party("alice", 1, "sha-256 aa");
        let (kb, b) = party("bob", 2, "sha-256 bb");
        let t = transcript(&a, &b);
        let sa = sign(&ka, Role::Offerer, &t);
        let sb = sign(&kb, Role::Answerer, &t);
        verify("alice", &a.key, Role::Offerer, &t, &sa).unwrap();
        verify("bob", &b.key, Role::Answerer, &t, &sb).unwrap();
        // A signature made as the other role does not pass (no reflection).
        assert!(verify("bob", &b.key, Role::Offerer, &t, &sb).is_err());
    }

    #[test]
    fn a_relayed_signature_fails_when_the_fingerprints_differ() {
        // Mallory terminates DTLS on both sides: alice sees (fa, fm1), bob (fm2, fb).
        let (ka, a) = party("alice", 1, "sha-256 fa");
        let (_, b) = party("bob", 2, "sha-256 fb");
        let seen_by_alice = transcript(
            &a,
            &Party {
                fingerprint: "sha-256 fm1".into(),
                ..b.clone()
            },
        );
        let seen_by_bob = transcript(
            &Party {
                fingerprint: "sha-256 fm2".into(),
                ..a.clone()
            },
            &b,
        );
        let sa = sign(&ka, Role::Offerer, &seen_by_alice);
        assert_eq!(
            verify("alice", &a.key, Role::Offerer, &seen_by_bob, &sa),
            Err(HandshakeError::BadSignature {
                user: "alice".into()
            })
        );
    }

    #[test]
    fn a_replayed_signature_fails_with_fresh_nonces() {
        let (ka, a) = party("alice", 1, "sha-256 fa");
        let (_, b) = party("bob", 2, "sha-256 fb");
        let old = sign(&ka, Role::Offerer, &transcript(&a, &b));
        // Same certificates even, but bob's nonce is fresh.
        let b2 = Party {
            nonce: nonce(),
            ..b
        };
        assert!(verify("alice", &a.key, Role::Offerer, &transcript(&a, &b2), &old).is_err());
    }

    #[test]
    fn fingerprints_are_normalised() {
        let sdp = "v=0\r\na=fingerprint:SHA-256 AB:CD\r\nm=application\r\na=fingerprint:sha-256 ab:cd\r\n";
        assert_eq!(sdp_fingerprints(sdp, "local").unwrap(), "sha-256 ab:cd");
        assert!(sdp_fingerprints("v=0\r\n", "remote").is_err());
    }
}
