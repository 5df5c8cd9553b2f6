//! Redis wire formats: everything ferry needs to speak to Redis as a replica
//! (source side) and as a client (target side).
//!
//! - [`resp`]: RESP2/RESP3 frames, incremental decoder, encoder, tokio codec.
//! - [`client`]: a small async client (AUTH, pipelined commands) over [`resp`].
//! - [`url`]: `redis://[user:pass@]host:port[/db]` target/source addresses.
//! - [`psync`]: replica-side replication client (handshake, PSYNC, RDB
//!   transfer, command stream with exact offsets).
//! - [`rdb_stream`]: parses an RDB on a blocking thread while it arrives.
//! - [`rdb`]: streaming RDB parser and its consumers (rebuild commands,
//!   RESTORE payloads, JSON dump).
//! - [`command`]: Redis 7 command table (arity, flags, key positions) and
//!   cluster hash slots.

pub mod client;
pub mod cluster;
pub mod command;
pub mod psync;
pub mod rdb;
pub mod rdb_stream;
pub mod resp;
pub mod tls;
pub mod url;
