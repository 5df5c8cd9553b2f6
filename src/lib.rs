//! ferry: a durable cross-cluster replication relay.
//!
//! The data path, stage by stage (see `docs/ARCHITECTURE.md`):
//! source Redis → [`redis::psync`] (replica-side replication client, streaming
//! [`redis::rdb`] parse) → listener WAL → gRPC → drainer WAL → applier → target Redis.
//!
//! This crate is a library with one thin binary (`src/main.rs`); every stage
//! lives in its own module and can be used on its own by recovery tooling and
//! benchmarks.

pub mod admin;
pub mod apply;
pub mod backoff;
pub mod cli;
pub mod config_units;
pub mod errors;
pub mod listener;
pub mod metrics;
pub mod node;
pub mod position;
pub mod precheck;
pub mod record;
pub mod redis;
pub mod secret;
pub mod serve;
pub mod ship;
pub mod status;
pub mod table;
pub mod tls;
pub mod verify;
pub mod wal;
