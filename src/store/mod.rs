//! Stores: capture, apply and replication metadata inside the region's own database.
//!
//! A store guarantees, for its database:
//! - `drain` turns committed outbox rows into events in one transaction (seq, HLC, version
//!   vector, log append, outbox delete), never splitting a source transaction;
//! - `apply` applies a run of remote events in one transaction together with the per-origin
//!   frontier, after first draining local changes, so a crash never loses or doubles an event
//!   and a remote event never overwrites an undrained local change;
//! - the log keeps every event some peer still needs until `collect_garbage` is told all
//!   peers that need it have acknowledged it.
pub mod sqlite;

use std::collections::BTreeMap;

use crate::clock::SkewReport;
use crate::event::NodeId;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("table `{table}`: {message}")]
    Table { table: String, message: String },
    #[error(
        "this database belongs to node `{found}`, but the config says `{expected}`; \
         give each node its own database"
    )]
    WrongNode { found: String, expected: String },
    #[error("corrupt metadata: {0}")]
    Corrupt(String),
}

/// The result of one drain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Events appended to the log.
    pub events: u64,
    /// This node's last seq after the drain.
    pub last_seq: u64,
}

/// What applying a run of remote events did.
#[derive(Debug, Clone, Default)]
pub struct ApplyReport {
    /// Local changes drained (first) in the same transaction.
    pub drained: DrainReport,
    /// Events whose content became visible (fast-forward, or won a conflict).
    pub applied: u64,
    /// Events already included in the local version.
    pub stale: u64,
    /// Concurrent writes resolved (each is also in the conflict log).
    pub conflicts: u64,
    pub dead_lettered: u64,
    /// Events at or below the frontier.
    pub duplicates: u64,
    /// Events whose origin is this node or whose path contains it.
    pub looped: u64,
    /// Remote timestamps refused for clock skew.
    pub skew: Vec<SkewReport>,
    /// `committed_at_micros` of every event processed past the frontier (lag figures).
    pub committed_at: Vec<i64>,
    /// Frontiers of the origins in the run, after commit.
    pub frontiers: BTreeMap<NodeId, u64>,
    /// The run skipped ahead of a frontier: (origin, frontier, seq received). Nothing from
    /// that origin past the frontier was applied; the sender must resend from the frontier.
    pub gap: Option<(NodeId, u64, u64)>,
}

/// One encoded event in the log.
#[derive(Debug, Clone)]
pub struct LogEntry {
    pub seq: u64,
    pub batch_end: u64,
    pub bytes: Vec<u8>,
}

/// Replication state read from the database, for `weft status` and the RPO figures.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    pub node: NodeId,
    pub last_seq: u64,
    pub outbox_pending: u64,
    pub log_events: u64,
    /// Applied frontier per origin, with the count of events processed from it.
    pub frontiers: Vec<(NodeId, u64, u64)>,
    pub peers: Vec<PeerStatus>,
    pub dead_letters: u64,
    pub conflicts: u64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PeerStatus {
    pub peer: NodeId,
    pub origin: NodeId,
    pub acked: u64,
    /// Events in the log the peer has not acknowledged.
    pub unacked: u64,
    /// Commit time of the oldest unacknowledged event (µs since epoch): the RPO exposure.
    pub oldest_unacked_micros: Option<i64>,
}
