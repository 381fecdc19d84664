//! Brume: share a folder directly between people's machines, with no company server
//! in the middle. `brume mount ~/Brume` mounts a FUSE filesystem in which
//! `<owner>/<group>/` is content that `<owner>` shares one-way with the members of
//! that group.
//!
//! # Layout
//!
//! - [`cli`]: the command line (`brume mount`, `status`, `server`, `token`, `demo`).
//! - [`config`]: `brume.conf`, default paths.
//! - [`demo`]: `brume demo`, a server, two users and two mounts on one machine.
//! - [`ids`]: newtypes for names, inode numbers, log positions, versions, hashes.
//! - [`catalog`]: the SQLite catalog: namespace, versions, change log, block index.
//! - [`blocks`]: per-block BLAKE3 hashing, off the FUSE hot path.
//! - [`fs`]: the FUSE adapter: inodes, handles, the backing store, passthrough.
//! - [`status`]: what `brume status` reports.
//! - [`sync`]: group synchronization between owners and members (wire format so far).
//! - [`signal`]: the signaling server and its client.
//! - [`peer`]: the authenticated WebRTC link to each peer that carries all file data.

#![warn(missing_docs, unreachable_pub)]

pub mod blocks;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod demo;
pub mod fs;
pub mod ids;
pub mod peer;
pub mod signal;
pub mod status;
pub mod sync;
