//! weft: an active-active multi-region replication mesh.
//!
//! One `weft` sidecar runs beside each region's database. Applications write their local
//! database as usual; triggers capture every committed change into an outbox in the same
//! transaction; the sidecar drains the outbox, stamps each change with its origin, a per-origin
//! sequence number, a hybrid logical clock and the row's version vector, and sends it to the
//! other regions over gRPC streams or Kafka topics, where it is applied exactly once and
//! concurrent writes are resolved by the table's strategy.
//!
//! Layers import downward only (`tests/layers.rs` checks every `crate::` path against this):
//! - data (no IO): [`event`] (events, keys, values, node identity), [`version`] (version
//!   vectors), [`clock`] (the HLC), [`crdt`] (CRDT column states); and two supports with no
//!   domain in them: [`crashpoint`] (crash tests), [`shutdown`] (the one stop signal);
//! - policy (pure): [`config`] (files, validated without IO), [`topology`] (routes, relays,
//!   the loop rule), [`resolve`] (the strategies), [`replicate`] (the apply decision),
//!   [`stability`] (the horizon below which tombstones may go);
//! - ports: [`wire`] (the only place protobuf meets domain types), [`store`] (one replication
//!   algorithm over the SQLite and PostgreSQL dialects, and the admin API), [`transport`] (a
//!   sans-IO session per peer, bound to gRPC);
//! - shell: [`node`] (wiring; the only module that spawns tasks), [`telemetry`] (figures),
//!   [`http`] (the operations endpoints: Prometheus metrics, health probes), [`console`]
//!   (the web console on those endpoints),
//!   [`cli`] (parses and prints), [`harness`] (demo, benchmark and test fixtures; feature
//!   `harness`).
// A panic in a sidecar stops replication: shipped code says why it cannot fail (`expect`).
// (Tests unwrap freely; a failed unwrap is a failed test with its location.)
#![warn(clippy::unwrap_used)]
// A function fits one screen (80 lines, clippy.toml): a longer one is a state machine or a
// plan waiting for names.
#![warn(clippy::too_many_lines)]

pub mod cli;
pub mod clock;
pub mod config;
pub mod console;
pub mod crashpoint;
pub mod crdt;
pub mod event;
#[cfg(feature = "harness")]
pub mod harness;
pub mod http;
pub mod node;
pub mod replicate;
pub mod resolve;
pub mod shutdown;
pub mod stability;
pub mod store;
pub mod telemetry;
pub mod topology;
pub mod transport;
pub mod version;
pub mod wire;
