//! Brume's integration tests: one test binary, one module per area. Every test that
//! mounts a filesystem or starts a server goes through `harness`, which tears it
//! all down again even when the test panics.

mod harness;

mod converge;
mod crash;
mod fs;
mod fuzz;
mod hostile;
mod nat;
mod netfault;
mod ops;
mod peer;
mod posix;
mod signal;
mod sync;
