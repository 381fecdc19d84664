//! ICE servers (STUN and TURN) the signaling server hands to its clients, with
//! short-lived TURN credentials in the TURN REST scheme that coturn checks with
//! `use-auth-secret`: the username is `EXPIRY:USER` (Unix seconds), the password
//! base64(HMAC-SHA1(shared secret, username)).

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::ids::UserName;

/// How long handed-out TURN credentials last. Clients get fresh ones with every
/// token refresh, well before these expire.
pub const TURN_CREDENTIAL_TTL_SECS: u64 = 3600;

/// One STUN or TURN server, as a client uses it for its peer links.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    /// Its URLs: `stun:HOST:PORT`, `turn:HOST:PORT`, `turn:HOST:PORT?transport=tcp`,
    /// `turns:HOST:PORT`.
    pub urls: Vec<String>,
    /// TURN username.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// TURN password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// Errors in an ICE server URL given to `brume server --ice`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("ICE server {url:?}: {reason}")]
pub struct IceUrlError {
    /// The URL.
    pub url: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Checks an ICE server URL: `stun:`, `turn:` or `turns:`, then `HOST:PORT`,
/// optionally `?transport=udp|tcp`.
pub fn check_url(url: &str) -> Result<(), IceUrlError> {
    let bad = |reason| IceUrlError {
        url: url.to_owned(),
        reason,
    };
    let (scheme, rest) = url.split_once(':').ok_or(bad("no scheme"))?;
    if !matches!(scheme, "stun" | "turn" | "turns") {
        return Err(bad("the scheme must be stun, turn or turns"));
    }
    let (host_port, query) = match rest.split_once('?') {
        Some((hp, q)) => (hp, Some(q)),
        None => (rest, None),
    };
    if let Some(q) = query
        && !matches!(q, "transport=udp" | "transport=tcp")
    {
        return Err(bad("the only option is ?transport=udp or ?transport=tcp"));
    }
    let (host, port) = host_port.rsplit_once(':').ok_or(bad("no port"))?;
    if host.is_empty() || host.contains('@') || host.contains('/') {
        return Err(bad(
            "no host (credentials are made by the server, not written in the URL)",
        ));
    }
    port.parse::<u16>().map_err(|_| bad("bad port"))?;
    Ok(())
}

/// The TURN REST credentials of `user` valid until `expiry` (Unix seconds).
pub fn turn_credentials(secret: &[u8], user: &UserName, expiry: u64) -> (String, String) {
    let username = format!("{expiry}:{user}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let tag = ring::hmac::sign(&key, username.as_bytes());
    let password = base64::engine::general_purpose::STANDARD.encode(tag.as_ref());
    (username, password)
}

/// The servers to hand `user` at `now`: every URL, with credentials for TURN
/// ones when there is a shared secret.
pub fn servers_for(
    urls: &[String],
    secret: Option<&[u8]>,
    user: &UserName,
    now: u64,
) -> Vec<IceServer> {
    let credentials =
        secret.map(|secret| turn_credentials(secret, user, now + TURN_CREDENTIAL_TTL_SECS));
    urls.iter()
        .map(|url| {
            let turn = url.starts_with("turn:") || url.starts_with("turns:");
            let (username, credential) = match (&credentials, turn) {
                (Some((u, p)), true) => (Some(u.clone()), Some(p.clone())),
                _ => (None, None),
            };
            IceServer {
                urls: vec![url.clone()],
                username,
                credential,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_rest_credentials_are_the_hmac_coturn_checks() {
        let user = UserName::new("alice").unwrap();
        let (username, password) = turn_credentials(b"s3cret", &user, 1_800_000_000);
        assert_eq!(username, "1800000000:alice");
        // python3 -c 'import hmac,hashlib,base64;print(base64.b64encode(hmac.new(b"s3cret",
        //   b"1800000000:alice",hashlib.sha1).digest()).decode())'
        assert_eq!(password, "3i66Yob+5ER4xVxIRXhvnAp6moo=");
    }

    #[test]
    fn urls_are_checked_and_only_turn_gets_credentials() {
        for good in [
            "stun:127.0.0.1:3478",
            "turn:turn.example.org:3478",
            "turn:10.0.0.1:3478?transport=tcp",
            "turns:turn.example.org:5349",
            "turn:[::1]:3478",
        ] {
            assert_eq!(check_url(good), Ok(()), "{good}");
        }
        for bad in [
            "http://x:1",
            "turn:host",
            "turn:u:p@host:3478",
            "stun:host:99999",
            "turn:host:3478?x=y",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
        let user = UserName::new("bob").unwrap();
        let urls = vec!["stun:s:3478".to_owned(), "turn:t:3478".to_owned()];
        let servers = servers_for(&urls, Some(b"k"), &user, 100);
        assert_eq!(servers[0].username, None);
        assert_eq!(servers[1].username.as_deref(), Some("3700:bob"));
        assert!(servers[1].credential.is_some());
        assert!(servers_for(&urls, None, &user, 100)[1].username.is_none());
    }
}
