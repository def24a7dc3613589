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
pub mod admit;
pub(crate) mod engine;
pub mod postgres;
pub mod sql;
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
    #[error("{0}")]
    Busy(String),
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

/// Log entries after `after`, about `max` of them, but always ending on a capture-batch
/// boundary so a source transaction is never split on the wire. `fetch(cursor, limit)` reads
/// up to `limit` entries with seq > `cursor`, in seq order.
pub async fn read_whole_batches<F, Fut>(after: u64, max: usize, mut fetch: F) -> Result<Vec<LogEntry>, StoreError>
where
    F: FnMut(u64, i64) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<LogEntry>, StoreError>>,
{
    let mut out: Vec<LogEntry> = Vec::new();
    let mut cursor = after;
    let mut limit = max as i64;
    loop {
        let rows = fetch(cursor, limit).await?;
        let fetched = rows.len();
        out.extend(rows);
        let Some(last) = out.last() else { break };
        if last.seq >= last.batch_end || fetched == 0 {
            break;
        }
        // Finish the batch the limit cut into.
        cursor = last.seq;
        limit = (last.batch_end - last.seq) as i64;
    }
    Ok(out)
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

/// A region's store, SQLite or PostgreSQL: the one interface the node and the transport use.
/// There is one per node, behind an `Arc`, so the size difference does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Store {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

macro_rules! both {
    ($self:expr, $store:ident => $body:expr) => {
        match $self {
            Store::Sqlite($store) => $body,
            Store::Postgres($store) => $body,
        }
    };
}

impl Store {
    /// Opens the database of `config`, installing weft's schema and triggers.
    pub async fn open(
        database: &crate::config::Database,
        identity: crate::event::Identity,
        tables: &[crate::config::TableConfig],
        max_clock_skew: std::time::Duration,
    ) -> Result<Self, StoreError> {
        Ok(match database {
            crate::config::Database::Sqlite(path) => {
                Store::Sqlite(sqlite::SqliteStore::open(path, identity, tables, max_clock_skew).await?)
            }
            crate::config::Database::Postgres(url) => {
                Store::Postgres(postgres::PgStore::open(url, identity, tables, max_clock_skew).await?)
            }
        })
    }

    /// Opens a database for `weft status` while a sidecar may be serving it.
    pub async fn inspect(
        database: &crate::config::Database,
        identity: crate::event::Identity,
        tables: &[crate::config::TableConfig],
    ) -> Result<Self, StoreError> {
        Ok(match database {
            crate::config::Database::Sqlite(path) => Store::Sqlite(
                sqlite::SqliteStore::open(path, identity, tables, std::time::Duration::from_secs(1)).await?,
            ),
            crate::config::Database::Postgres(url) => Store::Postgres(postgres::PgStore::inspect(url, identity).await?),
        })
    }

    pub fn relaying(self, origins: std::collections::BTreeSet<NodeId>) -> Self {
        match self {
            Store::Sqlite(s) => Store::Sqlite(s.relaying(origins)),
            Store::Postgres(s) => Store::Postgres(s.relaying(origins)),
        }
    }

    pub fn identity(&self) -> &crate::event::Identity {
        both!(self, s => s.identity())
    }

    pub fn clock(&self) -> &std::sync::Arc<crate::clock::Clock> {
        both!(self, s => s.clock())
    }

    /// Changes when there may be something new to drain.
    pub async fn data_version(&self) -> Result<i64, StoreError> {
        match self {
            Store::Sqlite(s) => s.data_version().await,
            Store::Postgres(s) => Ok(s.data_version()),
        }
    }

    /// Waits until capture should look again: `poll` on SQLite; a notification (or, as a
    /// fallback, a second) on PostgreSQL.
    pub async fn wait_for_change(&self, poll: std::time::Duration) {
        match self {
            Store::Sqlite(_) => tokio::time::sleep(poll).await,
            Store::Postgres(s) => s.wait_for_change(poll.max(std::time::Duration::from_secs(1))).await,
        }
    }

    pub async fn last_seq(&self) -> u64 {
        both!(self, s => s.last_seq().await)
    }

    pub async fn frontiers(&self) -> Result<BTreeMap<NodeId, u64>, StoreError> {
        both!(self, s => s.frontiers().await)
    }

    pub async fn read_log(&self, origin: &str, after: u64, max: usize) -> Result<Vec<LogEntry>, StoreError> {
        both!(self, s => s.read_log(origin, after, max).await)
    }

    pub async fn record_acks_and_collect(
        &self,
        acks: &[(NodeId, NodeId, u64)],
        needs: &BTreeMap<NodeId, Vec<NodeId>>,
    ) -> Result<u64, StoreError> {
        both!(self, s => s.record_acks_and_collect(acks, needs).await)
    }

    pub async fn status(&self, peers: &[(NodeId, Vec<NodeId>)]) -> Result<Status, StoreError> {
        both!(self, s => s.status(peers).await)
    }

    pub async fn drain(&self) -> Result<DrainReport, StoreError> {
        both!(self, s => s.drain().await)
    }

    pub async fn apply(&self, events: Vec<crate::event::Event>) -> Result<ApplyReport, StoreError> {
        both!(self, s => s.apply(events).await)
    }

    pub async fn close(self) {
        both!(self, s => s.close().await)
    }
}
