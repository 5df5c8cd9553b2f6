//! Nodes: the long-running processes (`ferry listener`, `ferry drainer`,
//! `ferry sync`), each wiring WALs, listeners, shippers, the drainer service
//! and appliers together, serving the admin API, and reporting
//! [`NodeStatus`].
//!
//! - [`config`]: the TOML files in `conf/` and `ferry sync`'s flags.
//! - [`run`]: starting, supervising and stopping the stages.
//! - [`status`]: the rows of `ferry status` and the control trait.

pub mod config;
pub mod run;
pub mod status;

pub use config::{
    DrainerNodeConfig, ListenerNodeConfig, NodeConfigError, SyncConfig, SyncOverrides,
};
pub use run::{run_drainer, run_listener, run_sync, Node, NodeError};
pub use status::{
    ControlError, DrainerSide, ListenerSide, NodeControl, NodeStatus, ShipSide, SnapshotLoad,
    SyncSelector,
};
