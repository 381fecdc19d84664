//! Short-lived access tokens: HS256 JWTs signed with the server's secret, minted by
//! `POST /token` in exchange for an account's long-lived credential, and checked at
//! the WebSocket upgrade and on every refresh.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::protocol::ErrorCode;
use crate::ids::UserName;

/// Clock skew tolerated when checking a token's expiry and issue time, in seconds.
pub const TOKEN_LEEWAY_SECS: u64 = 30;
/// Lifetime of a token when the client does not ask for one, in seconds.
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 15 * 60;
/// Longest lifetime a client may ask for, in seconds.
pub const MAX_TOKEN_TTL_SECS: u64 = 24 * 60 * 60;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No token was presented.
    #[error("400: missing token")]
    Missing,
    /// The token was valid but has expired.
    #[error("401: token expired at {exp} (now {now})")]
    Expired {
        /// The token's expiry, in Unix seconds.
        exp: u64,
        /// The server's time, in Unix seconds.
        now: u64,
    },
    /// The account's tokens were revoked after this one was minted.
    #[error("401: token revoked; fetch a new one")]
    Revoked,
    /// The token is malformed, tampered with, or uses another algorithm.
    #[error("406: invalid token: {reason}")]
    Invalid {
        /// What is wrong with it.
        reason: String,
    },
}

impl TokenError {
    /// The protocol error code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            TokenError::Missing => ErrorCode::MissingToken,
            TokenError::Expired { .. } | TokenError::Revoked => ErrorCode::TokenExpired,
            TokenError::Invalid { .. } => ErrorCode::InvalidToken,
        }
    }
}

/// The claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The account.
    pub sub: UserName,
    /// Issue time, Unix seconds.
    pub iat: u64,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// The account's token generation when it was minted: tokens of an older
    /// generation than the account's are refused (revoked).
    #[serde(default)]
    pub generation: u64,
}

/// The source of "now" for token checks.
///
/// Production uses the system clock. Tests use a clock that follows tokio's, so that
/// `tokio::time::pause` and `advance` move token expiry along with every timer.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The system's wall clock.
    System,
    /// Unix time `unix_at_anchor` at tokio instant `anchor`, advancing with tokio's clock.
    Tokio {
        /// Unix time at the anchor.
        unix_at_anchor: Duration,
        /// The tokio instant the anchor was taken.
        anchor: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that follows tokio's (pausable) clock from now on.
    pub fn tokio() -> Self {
        Clock::Tokio {
            unix_at_anchor: system_unix(),
            anchor: tokio::time::Instant::now(),
        }
    }

    /// Seconds since the Unix epoch.
    pub fn now_unix(&self) -> u64 {
        match self {
            Clock::System => system_unix().as_secs(),
            Clock::Tokio {
                unix_at_anchor,
                anchor,
            } => (*unix_at_anchor + anchor.elapsed()).as_secs(),
        }
    }
}

fn system_unix() -> Duration {
    // A clock before 1970 is a broken machine; treat it as the epoch.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// The server's signing key; mints and verifies tokens.
#[derive(Clone)]
pub struct TokenKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// A key from the server's secret (32 random bytes kept in the account database).
    pub fn from_secret(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is checked by `verify` against the server's `Clock`, not by the library
        // against the system clock, so tests can move time.
        validation.validate_exp = false;
        validation.set_required_spec_claims(&["exp", "sub", "iat"]);
        validation.leeway = 0;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// Mints a token for `user` issued at `iat`, expiring at `exp` (Unix seconds), of
    /// the first generation.
    pub fn mint(&self, user: &UserName, iat: u64, exp: u64) -> Result<String, TokenError> {
        self.mint_generation(user, iat, exp, 0)
    }

    /// Mints a token of `generation` (see [`Claims::generation`]).
    pub fn mint_generation(
        &self,
        user: &UserName,
        iat: u64,
        exp: u64,
        generation: u64,
    ) -> Result<String, TokenError> {
        let claims = Claims {
            sub: user.clone(),
            iat,
            exp,
            generation,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding).map_err(|e| {
            TokenError::Invalid {
                reason: format!("cannot sign: {e}"),
            }
        })
    }

    /// Checks a token's signature, algorithm and times against `now` (Unix seconds),
    /// with [`TOKEN_LEEWAY_SECS`] of tolerance.
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| {
                // Fixed phrases: the library's own text can quote the token (its header's
                // `alg`, say), which is the sender's to choose.
                let reason = match e.kind() {
                    ErrorKind::InvalidAlgorithm
                    | ErrorKind::InvalidAlgorithmName
                    | ErrorKind::MissingAlgorithm => "wrong algorithm",
                    ErrorKind::InvalidSignature => "bad signature",
                    ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
                    _ => "malformed token",
                };
                TokenError::Invalid {
                    reason: reason.to_owned(),
                }
            })?;
        let claims = data.claims;
        if claims.iat > now.saturating_add(TOKEN_LEEWAY_SECS) {
            return Err(TokenError::Invalid {
                reason: "issued in the future".to_owned(),
            });
        }
        if claims.exp.saturating_add(TOKEN_LEEWAY_SECS) <= now {
            return Err(TokenError::Expired {
                exp: claims.exp,
                now,
            });
        }
        Ok(claims)
    }
}

/// Body of `POST /token`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRequest {
    /// The account.
    pub username: UserName,
    /// Its long-lived credential, from `brume.conf`.
    pub credential: String,
    /// Requested lifetime in seconds; capped at [`MAX_TOKEN_TTL_SECS`].
    #[serde(default)]
    pub ttl: Option<u64>,
}

/// Answer of `POST /token`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenResponse {
    /// The access token, for `Authorization: Bearer`.
    pub token: String,
    /// Seconds until it expires.
    pub expires_in: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> UserName {
        UserName::new("alice").unwrap()
    }

    #[test]
    fn verifies_its_own_tokens_within_the_leeway() {
        let key = TokenKey::from_secret(&[1; 32]);
        let token = key.mint(&alice(), 1000, 1100).unwrap();
        assert_eq!(key.verify(&token, 1050).unwrap().sub, alice());
        assert!(key.verify(&token, 1100 + TOKEN_LEEWAY_SECS - 1).is_ok());
        assert_eq!(
            key.verify(&token, 1100 + TOKEN_LEEWAY_SECS)
                .unwrap_err()
                .code(),
            ErrorCode::TokenExpired
        );
        assert_eq!(
            key.verify(&token, 1000 - TOKEN_LEEWAY_SECS - 1)
                .unwrap_err()
                .code(),
            ErrorCode::InvalidToken
        );
    }

    #[test]
    fn refuses_other_keys_tampering_and_algorithms() {
        let key = TokenKey::from_secret(&[1; 32]);
        let other = TokenKey::from_secret(&[2; 32]);
        let token = other.mint(&alice(), 1000, 1100).unwrap();
        assert_eq!(
            key.verify(&token, 1050).unwrap_err().code(),
            ErrorCode::InvalidToken
        );
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &Claims {
                sub: alice(),
                iat: 1000,
                exp: 1100,
                generation: 0,
            },
            &EncodingKey::from_secret(&[1; 32]),
        )
        .unwrap();
        assert_eq!(
            key.verify(&hs512, 1050).unwrap_err(),
            TokenError::Invalid {
                reason: "wrong algorithm".into()
            }
        );
        assert_eq!(key.verify("", 0).unwrap_err(), TokenError::Missing);
        assert_eq!(
            key.verify("a.b.c", 0).unwrap_err().code(),
            ErrorCode::InvalidToken
        );
    }
}
