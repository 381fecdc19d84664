//! The FUSE filesystem: `brume mount DIR`. The adapter in [`adapter`] answers the
//! kernel; [`tree`] holds the namespace; [`store`] holds file bytes; the catalog
//! persists both behind them.

mod adapter;
pub mod error;
mod mount;
pub mod store;
pub mod tree;
mod workers;

pub use mount::{MountOptions, MountState, Mounted, mount, mount_state, mount_with_link};
