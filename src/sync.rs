//! Group synchronization: owners push their groups' changes to members, members
//! apply them, fetch blocks, and keep their own edits as conflict copies.
//!
//! [`proto`] is the wire format both sides speak over the peer link; [`engine`]
//! runs both sides in a client; [`outbox`] queues what an owner sends, per member.

pub mod engine;
pub mod network;
pub mod outbox;
pub mod proto;
