//! Nodes: the long-running processes (`ferry listener`, `ferry drainer`,
//! `ferry sync`), each wiring WALs, listeners, shippers, the drainer service
//! and appliers together, serving the admin API, and reporting
//! [`NodeStatus`].
//!
//! - [`config`]: the TOML files in `conf/` and `ferry sync`'s flags.
//! - [`run`]: starting, supervising and stopping the stages.
//! - [`two_way`], [`conflicts`]: `ferry sync --two-way`; [`site`]: two-way
//!   in a listener/drainer deployment (`ferry site`); [`switchover`].
//!
//! The rows of `ferry status` and the control trait live in [`crate::status`],
//! below both this module and [`crate::admin`], which serves them.

pub mod config;
pub mod conflicts;
pub mod run;
pub mod site;
pub mod switchover;
pub mod two_way;

pub use config::{
    DrainerNodeConfig, ListenerNodeConfig, NodeConfigError, SiteNodeConfig, SyncConfig,
    SyncOverrides,
};
pub use run::{
    run_drainer, run_listener, run_sync, run_sync_hosted, sync_precheck, ControlSlot, Node,
    NodeError,
};
pub use site::run_site;
