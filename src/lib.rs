//! weft: an active-active multi-region replication mesh.
//!
//! One `weft` sidecar runs beside each region's database. Applications write their local
//! database as usual; triggers capture every committed change into an outbox in the same
//! transaction; the sidecar drains the outbox, stamps each change with its origin, a per-origin
//! sequence number, a hybrid logical clock and the row's version vector, and streams it to the
//! other regions over gRPC, where it is applied exactly once and concurrent writes are
//! resolved by the table's strategy.
//!
//! Layers import downward only:
//! - data (no IO): [`event`], [`version`], [`clock`];
//! - policy (pure): [`config`], [`topology`], [`resolve`], [`replicate`];
//! - ports: [`store`] (capture, apply and metadata in the database), [`transport`] (a
//!   sans-IO session per peer, bound to gRPC);
//!   [`wire`] is the only place protobuf types meet domain types;
//! - shell: [`node`] (wiring; the only module that spawns tasks), [`telemetry`], and the
//!   `weft` binary's commands in [`cli`].
// A panic in a sidecar stops replication: shipped code says why it cannot fail (`expect`).
// (Tests unwrap freely; a failed unwrap is a failed test with its location.)
#![warn(clippy::unwrap_used)]

pub mod cli;
pub mod clock;
pub mod config;
pub mod crashpoint;
pub mod crdt;
pub mod event;
#[cfg(feature = "harness")]
pub mod harness;
pub mod node;
pub mod replicate;
pub mod resolve;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod topology;
pub mod transport;
pub mod version;
pub mod wire;
