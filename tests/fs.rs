//! Filesystem integration tests.
