//! The signaling server (`brume server`) and its client: accounts, tokens, presence
//! and relay of connection-setup messages. It never sees file data.
//!
//! - [`protocol`]: the wire messages, error codes and close reasons.
//! - [`token`]: access tokens (JWT) and the clock they are checked against.
//! - [`accounts`]: the server's SQLite account store.
//! - [`server`]: the server: HTTP token endpoint, WebSocket sessions, relay, presence.
//! - [`client`]: the client the daemon uses: reconnects, refreshes, relays, presence.
//! - [`identity`]: the client's ed25519 identity key file.
//! - [`ice`]: STUN/TURN servers the server hands out, with TURN REST credentials.
//! - [`tls`]: TLS for `wss://`: what the client trusts, the server's certificate.
//! - [`cli`]: `brume server …` and `brume token`.

pub mod accounts;
pub mod cli;
pub mod client;
pub mod ice;
pub mod identity;
pub mod protocol;
pub mod server;
pub mod tls;
pub mod token;

pub use protocol::ErrorCode;
