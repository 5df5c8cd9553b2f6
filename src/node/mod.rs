//! Nodes: the long-running processes (`ferry listener`, `ferry drainer`,
//! `ferry sync`), each wiring WALs, listeners, shippers, the drainer service
//! and appliers together, serving the admin API, and reporting
//! [`NodeStatus`].

pub mod status;

pub use status::{
    ControlError, DrainerSide, ListenerSide, NodeControl, NodeStatus, ShipSide, SnapshotLoad,
    SyncSelector,
};
