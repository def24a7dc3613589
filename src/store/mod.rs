//! Stores: capture, apply and replication metadata inside the region's own database.
//!
//! One algorithm over two dialects. The replication algorithm (`replica`, `capture`,
//! `apply`), the strategy engine (`engine`), admission (`admit`) and the audit trail
//! (`audit`) are written once, over the two ports of `backend`; `sqlite` and `postgres`
//! supply only SQL text, type mapping, locking and error classification (statements alike
//! but for table names are written once, in `metadata`). `schema` describes weft's tables
//! once, with numbered migrations. [`Store`] is the one interface the node and the transport
//! use; [`admin::Admin`] is the operator's (`weft conflicts`, `weft ownership`).
//!
//! A store guarantees, for its database:
//! - `drain` turns committed outbox rows into events in one transaction (seq, HLC, version
//!   vector, log append, outbox delete), at most `capture::DRAIN_PIECE` rows at a time: a
//!   larger source transaction becomes several capture batches, in order;
//! - `apply` applies a run of remote events in one transaction together with the per-origin
//!   frontier, after first draining local changes, so a crash never loses or doubles an event
//!   and a remote event never overwrites an undrained local change;
//! - the log keeps every event some peer still needs until `record_acks_and_collect` is told
//!   all peers that need it have acknowledged it.
pub mod admin;
pub mod admit;
mod apply;
pub mod audit;
pub mod backend;
mod capture;
pub mod checksum;
pub mod engine;
pub mod evolve;
pub mod gc;
mod metadata;
pub mod postgres;
pub mod replica;
pub mod schema;
pub mod snapshot;
pub mod sql;
pub mod sqlite;
pub mod table;

use std::collections::BTreeMap;

use crate::clock::SkewReport;
use crate::event::NodeId;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A statement failed; the drain or apply is retried after a redial.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A replicated table does not fit weft (missing, no primary key, a bad setting).
    #[error("table `{table}`: {message}")]
    Table { table: String, message: String },
    /// The database was claimed by another node id.
    #[error(
        "this database belongs to node `{found}`, but the config says `{expected}`; \
         give each node its own database"
    )]
    WrongNode { found: String, expected: String },
    /// Another sidecar serves this database (fatal: the operator must act).
    #[error(
        "another weft sidecar already serves this database ({holder}); run one sidecar per database, or stop the other first"
    )]
    SidecarLocked { holder: String },
    /// The application kept winning races with the applier; retried later.
    #[error("{0}")]
    Contended(String),
    /// A test failpoint fired (`crate::crashpoint`).
    #[error("failpoint: {0}")]
    Failpoint(&'static str),
    /// CRDT state that cannot be read or merged.
    #[error("CRDT state: {0}")]
    Crdt(#[from] crate::crdt::CrdtError),
    /// The database has no weft schema (yet), or is not there.
    #[error("{0}")]
    NotInstalled(String),
    /// An admin request that cannot be carried out, saying why.
    #[error("{0}")]
    Refused(String),
    /// Dead-letter storage for one cause is full: the apply is refused whole, so the sender
    /// keeps the events and resends them; nothing is lost.
    #[error(
        "{stored} dead letters of cause `{cause}` are stored, the most max_dead_letters_per_cause allows: \
         nothing more is applied from this stream until some are retried, discarded (weft dead-letters) \
         or the limit is raised; the sender keeps the events"
    )]
    DeadLettersFull { cause: &'static str, stored: u64 },
    /// weft's own metadata holds something weft never writes.
    #[error("corrupt metadata: {0}")]
    Corrupt(String),
}

/// Where reading a stream source resumes: for a Kafka topic, the offset of the next record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub source: String,
    pub next: i64,
}

/// The result of one drain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Events appended to the log.
    pub events: u64,
    /// This node's last seq after the drain.
    pub last_seq: u64,
    /// The outbox may hold more: the drain stopped at its bound (`capture::DRAIN_PIECE`).
    pub more: bool,
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
    /// Events that cannot be applied, stored with the reason (they still pass the frontier).
    pub dead_lettered: u64,
    /// Values of columns the local table lacks, left out (`unknown_columns = "drop"`).
    pub columns_dropped: u64,
    /// Events at or below the frontier.
    pub duplicates: u64,
    /// Events whose origin is this node or whose path contains it.
    pub looped: u64,
    /// Remote timestamps refused for clock skew.
    pub skew: Vec<SkewReport>,
    /// `committed_at_micros` of every event processed past the frontier (lag figures).
    pub committed_at: Vec<i64>,
    /// The origins of `committed_at`, run-length encoded: (origin, how many in a row).
    pub committed_by: Vec<(NodeId, usize)>,
    /// Frontiers of the origins in the run, after commit.
    pub frontiers: BTreeMap<NodeId, u64>,
    /// The run skipped ahead of a frontier: (origin, frontier, seq received). Nothing from
    /// that origin past the frontier was applied; the sender must resend from the frontier.
    pub gap: Option<(NodeId, u64, u64)>,
    /// While a dead letter is retried: its id and attempts so far. A refusal then updates
    /// that letter instead of making a new one.
    pub retrying: Option<(i64, u32)>,
    /// Input: the dead letters of one cause the store keeps at most.
    pub dead_letter_limit: u64,
}

/// What a round of log retention did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RetentionReport {
    /// Log entries dropped.
    pub trimmed: u64,
    /// Per origin, the entries past the limits that stay because a reader that must never
    /// miss one (a Kafka topic) lacks them: (first kept, last that would have gone).
    pub kept_back: BTreeMap<NodeId, (u64, u64)>,
}

/// What a round of dead-letter retries did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RetryReport {
    /// Letters whose event now applied (or was already superseded): removed.
    pub applied: u64,
    /// Letters refused again: kept with the new reason, tried again later.
    pub refused: u64,
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
    pub frontiers: Vec<backend::FrontierStatus>,
    pub peers: Vec<PeerStatus>,
    pub dead_letters: u64,
    pub conflicts: u64,
    /// Set while this node joins the mesh by snapshot: its tables are not yet current.
    pub joining: Option<snapshot::JoinState>,
    /// What the last background audit found (`transport::audit::Summary`), if one ran.
    pub last_audit: Option<serde_json::Value>,
    /// Stored positions of Kafka links: where reading each peer's topic resumes (the
    /// topic's name, next offset), and how far this node's log is published
    /// (`published:<topic>:<origin>`, last seq).
    pub positions: Vec<(String, i64)>,
    /// What the history gate waits for while capture waits on it (`transport::history`).
    pub history: Option<String>,
    /// What the database counts by table, strategy and cause.
    pub breakdown: Breakdown,
}

/// Counts of a status snapshot by kind, for the operations endpoints (`http`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Breakdown {
    /// The conflict log's entries by (table, strategy): every concurrent write resolved.
    pub conflicts: Vec<(String, String, u64)>,
    /// Dead letters held, by cause.
    pub dead_letters: Vec<(String, u64)>,
    /// Conflicts waiting in the resolution queue, and the versions side by side in them.
    pub queue_open: u64,
    pub queue_siblings: u64,
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
    /// Set while the peer needs events of this origin that the log no longer holds: why,
    /// and what to do.
    pub needs_reseed: Option<String>,
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
    ) -> Result<Self, StoreError> {
        Ok(match database {
            crate::config::Database::Sqlite(path) => Store::Sqlite(sqlite::SqliteStore::inspect(path, identity).await?),
            crate::config::Database::Postgres(url) => Store::Postgres(postgres::PgStore::inspect(url, identity).await?),
        })
    }

    /// The status of the node `config` describes, read from its database as `weft status`
    /// reads it (a sidecar may be serving it).
    pub async fn status_of(config: &crate::config::NodeConfig) -> Result<Status, StoreError> {
        let peers = crate::topology::routed_origins(&config.topology, &config.node);
        Store::status_for(config, &peers).await
    }

    /// `status_of`, with what each of `peers` has acknowledged of the origins named with it.
    pub async fn status_for(
        config: &crate::config::NodeConfig,
        peers: &[(NodeId, Vec<NodeId>)],
    ) -> Result<Status, StoreError> {
        let identity = crate::event::Identity {
            node: config.node.clone(),
            region: config.region().to_owned(),
        };
        let store = Store::inspect(&config.database, identity).await?;
        let status = store.status(peers).await;
        store.close().await;
        status
    }

    /// Keeps the events of these remote origins in the log once applied, to relay them.
    pub fn relaying(self, origins: std::collections::BTreeSet<NodeId>) -> Self {
        match self {
            Store::Sqlite(s) => Store::Sqlite(s.relaying(origins)),
            Store::Postgres(s) => Store::Postgres(s.relaying(origins)),
        }
    }

    /// Keeps at most `limit` dead letters per cause; past it an apply that would add one is
    /// refused whole (`StoreError::DeadLettersFull`) and the sender resends later.
    pub fn bounding_dead_letters(self, limit: u64) -> Self {
        match self {
            Store::Sqlite(s) => Store::Sqlite(s.bounding_dead_letters(limit)),
            Store::Postgres(s) => Store::Postgres(s.bounding_dead_letters(limit)),
        }
    }

    /// Sizes capture batches for messages of at most `payload` bytes of events, and refuses
    /// a row change larger than that at its source (`replica::MessageBounds`).
    pub fn bounding_messages(self, payload: usize) -> Self {
        match self {
            Store::Sqlite(s) => Store::Sqlite(s.bounding_messages(payload)),
            Store::Postgres(s) => Store::Postgres(s.bounding_messages(payload)),
        }
    }

    pub fn identity(&self) -> &crate::event::Identity {
        both!(self, s => s.identity())
    }

    /// What the operator should know about the replicated tables (the node logs it at start).
    pub fn advisories(&self) -> Vec<String> {
        both!(self, s => s.advisories())
    }

    /// This node's clock, persisted with every drain and apply.
    pub fn clock(&self) -> &std::sync::Arc<crate::clock::Clock> {
        both!(self, s => s.clock())
    }

    /// Changes when there may be something new to drain.
    pub async fn data_version(&self) -> Result<i64, StoreError> {
        both!(self, s => backend::Backend::data_version(&s.backend).await)
    }

    /// Waits until capture should look again: `poll` on SQLite; a notification (or, as a
    /// fallback, a second) on PostgreSQL.
    pub async fn wait_for_change(&self, poll: std::time::Duration) {
        both!(self, s => backend::Backend::wait_for_change(&s.backend, poll).await)
    }

    /// Records (or clears) for `weft status` what the history gate waits for.
    pub async fn note_history(&self, note: Option<&str>) -> Result<(), StoreError> {
        both!(self, s => s.note_history(note).await)
    }

    /// Records (or clears) for `weft status` that `peer` is behind this node's log of `origin`.
    pub async fn note_behind_log(&self, peer: &str, origin: &str, note: Option<&str>) -> Result<(), StoreError> {
        both!(self, s => s.note_behind_log(peer, origin, note).await)
    }

    /// The last own seq committed (as of the last drain or apply).
    pub async fn last_seq(&self) -> u64 {
        both!(self, s => s.last_seq().await)
    }

    /// Applied frontier per origin: what this node has of each origin's events.
    pub async fn frontiers(&self) -> Result<BTreeMap<NodeId, u64>, StoreError> {
        both!(self, s => s.frontiers().await)
    }

    /// How far this node's log of `origin` went before retention or acknowledgements
    /// trimmed it (0 if nothing was trimmed): a peer behind that is behind the log, even
    /// when nothing of `origin` is left in it.
    pub async fn log_high(&self, origin: &str) -> Result<u64, StoreError> {
        both!(self, s => s.log_high(origin).await)
    }

    /// Purges the tombstones below the causal stability `horizon` (`gc`).
    pub async fn purge_tombstones(&self, horizon: &crate::version::VersionVector) -> Result<gc::Purged, StoreError> {
        both!(self, s => s.purge_tombstones(horizon).await)
    }

    /// Records what the last background audit found, for `weft status`.
    pub async fn record_audit(&self, summary: &str) -> Result<(), StoreError> {
        both!(self, s => s.record_audit(summary).await)
    }

    /// The source's dead letters for a joiner after id `after` (`snapshot`).
    pub async fn snapshot_letters(
        &self,
        after: i64,
        max_bytes: usize,
    ) -> Result<(Vec<backend::CopiedLetter>, bool), StoreError> {
        both!(self, s => s.snapshot_letters(after, max_bytes).await)
    }

    /// Keeps a snapshot source's dead letters as this node's (`snapshot`).
    pub async fn copy_letters(&self, letters: &[backend::CopiedLetter]) -> Result<u64, StoreError> {
        both!(self, s => s.copy_letters(letters).await)
    }

    /// The columns of `table` here (`checksum`).
    pub fn audit_shape(&self, table: &str) -> Result<Vec<String>, StoreError> {
        both!(self, s => s.audit_shape(table))
    }

    /// Every bucket of `table`'s audit tree, from one consistent view (`checksum`).
    pub async fn audit_tree(
        &self,
        table: &str,
        compared: checksum::Compared<'_>,
    ) -> Result<checksum::Tree, StoreError> {
        both!(self, s => s.audit_tree(table, compared).await)
    }

    /// The keys of `table` in `buckets`, with their digests (`checksum`).
    pub async fn audit_keys(
        &self,
        table: &str,
        buckets: &std::collections::BTreeSet<u32>,
        compared: checksum::Compared<'_>,
    ) -> Result<Vec<(Vec<u8>, checksum::Sum)>, StoreError> {
        both!(self, s => s.audit_keys(table, buckets, compared).await)
    }

    /// The rows `keys` of `table` in full, with the frontiers they are at most as new as.
    pub async fn audit_rows(
        &self,
        table: &str,
        keys: &[Vec<u8>],
        compared: checksum::Compared<'_>,
    ) -> Result<(Vec<checksum::AuditRow>, BTreeMap<NodeId, u64>), StoreError> {
        both!(self, s => s.audit_rows(table, keys, compared).await)
    }

    /// About `max` log entries of `origin` after `after`, ending on a capture-batch boundary.
    pub async fn read_log(&self, origin: &str, after: u64, max: usize) -> Result<Vec<LogEntry>, StoreError> {
        both!(self, s => s.read_log(origin, after, max).await)
    }

    /// `read_log`, ending at the first capture-batch boundary past `bytes.0` and leaving
    /// out a batch that would take it past `bytes.1` (`Replica::read_log_within`).
    pub async fn read_log_within(
        &self,
        origin: &str,
        after: u64,
        max: usize,
        bytes: (usize, usize),
    ) -> Result<Vec<LogEntry>, StoreError> {
        both!(self, s => s.read_log_within(origin, after, max, bytes).await)
    }

    /// Records acknowledgements, then trims log entries every peer that needs them has
    /// (`needs`: per origin, those peers). Returns how many entries went.
    pub async fn record_acks_and_collect(
        &self,
        acks: &[backend::Ack],
        needs: &BTreeMap<NodeId, Vec<NodeId>>,
    ) -> Result<u64, StoreError> {
        both!(self, s => s.record_acks_and_collect(acks, needs).await)
    }

    /// Drops log entries past the retention limits, needed by a peer or not, but never past
    /// `held` (see `Replica`).
    pub async fn enforce_retention(
        &self,
        max_bytes: u64,
        max_age: std::time::Duration,
        kept: &std::collections::BTreeSet<NodeId>,
        held: &BTreeMap<NodeId, u64>,
    ) -> Result<RetentionReport, StoreError> {
        both!(self, s => s.enforce_retention(max_bytes, max_age, kept, held).await)
    }

    /// Replication state for `weft status`, read in one snapshot; `peers` lists each peer
    /// with the origins sent to it.
    pub async fn status(&self, peers: &[(NodeId, Vec<NodeId>)]) -> Result<Status, StoreError> {
        both!(self, s => s.status(peers).await)
    }

    /// Drains committed local changes into the log, in one transaction.
    pub async fn drain(&self) -> Result<DrainReport, StoreError> {
        both!(self, s => s.drain().await)
    }

    /// Applies a run of remote events exactly once, in one transaction with the frontiers.
    pub async fn apply(&self, events: Vec<crate::event::Event>) -> Result<ApplyReport, StoreError> {
        both!(self, s => s.apply(events).await)
    }

    /// Applies events read from a stream source and records where reading resumes, in one
    /// transaction (see `Replica::apply_from`).
    pub async fn apply_from(
        &self,
        events: Vec<crate::event::Event>,
        position: &Position,
    ) -> Result<ApplyReport, StoreError> {
        both!(self, s => s.apply_from(events, position).await)
    }

    /// Records a position outside an apply (see `Replica::record_position`).
    pub async fn record_position(&self, position: &Position) -> Result<(), StoreError> {
        both!(self, s => s.record_position(position).await)
    }

    /// Where reading a stream source resumes (`None`: never read).
    pub async fn position(&self, source: &str) -> Result<Option<i64>, StoreError> {
        both!(self, s => s.position(source).await)
    }

    /// Retries the dead letters whose retry is due (see `Replica::retry_dead_letters`).
    pub async fn retry_dead_letters(&self, applied_since: bool) -> Result<RetryReport, StoreError> {
        both!(self, s => s.retry_dead_letters(applied_since).await)
    }

    /// What a snapshot served now is consistent with (see `store::snapshot`).
    pub async fn snapshot_start(&self) -> Result<snapshot::SnapshotStart, StoreError> {
        both!(self, s => s.snapshot_start().await)
    }

    /// Up to `limit` rows of `table` after the key bytes `after`, ending early once they
    /// hold `max_bytes` on the wire; and whether rows of the table may follow.
    pub async fn snapshot_page(
        &self,
        table: &str,
        after: &[u8],
        limit: usize,
        max_bytes: usize,
    ) -> Result<(Vec<snapshot::SnapshotRow>, bool), StoreError> {
        both!(self, s => s.snapshot_page(table, after, limit, max_bytes).await)
    }

    /// The purge floor (`gc`): above every tombstone this node purged.
    pub async fn purge_floor(&self) -> Result<crate::version::VersionVector, StoreError> {
        both!(self, s => s.purge_floor().await)
    }

    /// Raises this node's last own seq to `seq` (never lowers it).
    pub async fn raise_own_seq(&self, seq: u64) -> Result<(), StoreError> {
        both!(self, s => s.raise_own_seq(seq).await)
    }

    /// The join in progress, if any.
    pub async fn join_state(&self) -> Result<Option<snapshot::JoinState>, StoreError> {
        both!(self, s => s.join_state().await)
    }

    /// Installs a snapshot page with the join's state after it; `None` ends the join.
    pub async fn install_page(
        &self,
        rows: Vec<snapshot::SnapshotRow>,
        state: Option<snapshot::JoinState>,
        frontiers: &BTreeMap<NodeId, u64>,
    ) -> Result<ApplyReport, StoreError> {
        both!(self, s => s.install_page(rows, state, frontiers).await)
    }

    /// `install_page`, removing in the same transaction the rows `sweep` finds deleted and
    /// purged at the source (see `snapshot::Sweep`).
    pub async fn install_page_swept(
        &self,
        rows: Vec<snapshot::SnapshotRow>,
        state: Option<snapshot::JoinState>,
        frontiers: &BTreeMap<NodeId, u64>,
        sweep: snapshot::Sweep,
    ) -> Result<ApplyReport, StoreError> {
        both!(self, s => s.install_page_swept(rows, state, frontiers, Some(sweep)).await)
    }

    /// Closes every connection.
    pub async fn close(self) {
        both!(self, s => s.close().await)
    }
}
/// Compile-time check: every future the node spawns is `Send` (generic async code can lose
/// that silently, and then only a far-away `tokio::spawn` fails to build).
#[cfg(test)]
#[allow(dead_code)]
fn futures_are_send(s: &'static Store) {
    fn send<T: Send>(_: T) {}
    send(s.data_version());
    send(s.wait_for_change(std::time::Duration::ZERO));
    send(s.frontiers());
    send(s.drain());
    send(s.apply(Vec::new()));
    send(s.read_log("a", 0, 1));
    send(s.status(&[]));
    send(s.snapshot_page("t", &[], 1, 1));
    send(s.install_page(Vec::new(), None, &BTreeMap::new()));
    send(s.record_acks_and_collect(&[], &BTreeMap::new()));
}
