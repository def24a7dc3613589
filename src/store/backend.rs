//! The two ports a store dialect implements, so that the replication algorithm
//! (`store::{replica, capture, apply}`) and the strategy engine (`store::engine`) exist once.
//!
//! - [`Backend`]: one region's database at the connection level: the writer connection,
//!   schema install, the node's own record, wake-ups, log reads, acknowledgements and status.
//! - [`Txn`]: one open write transaction: the outbox, row versions and metadata, the applier's
//!   mark and row locks, the row writes and strategy state of the engine, and the audit tables.
//!
//! Contract for every method: it does one piece of database IO and nothing else (no retries,
//! no logging of its own errors, no decisions). An `Err` from a [`Txn`] method means the
//! transaction is unusable: the caller rolls it back and returns the error, and the node
//! retries the whole drain or apply later, so nothing is half-applied. `StoreError::Database`
//! is the only error a dialect returns for a failed statement; a write the database refuses
//! for its content is not an error but a [`Written::Refused`] value. Keys are passed both as
//! typed [`Key`]s and as their canonical bytes (`Key::to_bytes`), which is what every
//! metadata table stores.
// The traits are implemented only inside weft and used on concrete types (through
// `store::Store`), so the futures' `Send` bounds are checked where they are spawned.
#![allow(async_fn_in_trait)]
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::config::TableConfig;
use crate::crdt::States;
use crate::event::{Event, Key, NodeId, Row, Value};
use crate::replicate::RowVersion;
use crate::store::admit::Frontier;
use crate::store::engine::{KnownOwner, Mode, Step, TableRules};
use crate::store::{LogEntry, PeerStatus, StoreError};

/// The writer's connection type of a backend.
pub type Conn<B> = <<B as Backend>::Db as sqlx::Database>::Connection;

/// A node's replicated tables by name.
pub type Tables<T> = HashMap<String, Arc<T>>;

/// This node's own record in its database.
#[derive(Debug, Clone)]
pub struct NodeRecord {
    pub node_id: String,
    pub last_seq: u64,
    pub hlc: u64,
}

/// An acknowledgement: `peer` has durably applied `origin`'s events up to `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub peer: NodeId,
    pub origin: NodeId,
    pub seq: u64,
}

/// How much the node holds, counted in one snapshot (`weft status`).
#[derive(Debug, Clone, Default)]
pub struct Counts {
    pub last_seq: u64,
    pub outbox_pending: u64,
    pub log_events: u64,
    pub dead_letters: u64,
    pub conflicts: u64,
}

/// One origin's applied frontier, with the count of its events processed. In JSON it stays
/// the `[origin, seq, processed]` triple `weft status --json` has always printed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(into = "(NodeId, u64, u64)")]
pub struct FrontierStatus {
    pub origin: NodeId,
    pub seq: u64,
    pub processed: u64,
}

impl From<FrontierStatus> for (NodeId, u64, u64) {
    fn from(f: FrontierStatus) -> Self {
        (f.origin, f.seq, f.processed)
    }
}

/// A database connection of the backend: the writer's, or a pooled one.
pub trait Backend: Send + Sync + Sized + 'static {
    type Db: sqlx::Database + sqlx::database::HasStatementCache;
    /// What this dialect knows of a replicated table.
    type Table: TableRules + Send + Sync + 'static;
    /// The write transaction port over the writer connection.
    type Txn<'t>: Txn<Table = Self::Table>
    where
        Self: 't;

    /// The database kind, for log lines.
    const NAME: &'static str;
    /// The statement that opens a write transaction.
    const BEGIN: &'static str;
    /// The failpoint (`crate::crashpoint`) that loses a drain's commit reply.
    const DRAIN_REPLY_LOST: &'static str;

    /// The transaction port over `conn`, on which a write transaction is open.
    fn txn<'t>(&'t self, tables: &'t Tables<Self::Table>, conn: &'t mut Conn<Self>) -> Self::Txn<'t>;

    /// Dials the writer connection, with the session settings weft's statements rely on.
    /// Fails with `StoreError::SidecarLocked` if another sidecar serves the database.
    async fn connect_writer(&self) -> Result<Conn<Self>, StoreError>;
    /// Creates or updates weft's metadata schema (migrations included) and the capture
    /// triggers of `tables`, inside the open transaction; checks each table against its
    /// config. Idempotent.
    async fn install(
        conn: &mut Conn<Self>,
        tables: &[TableConfig],
        region: &str,
    ) -> Result<Vec<Self::Table>, StoreError>;
    /// This node's record, if the database has one yet.
    async fn node_record(conn: &mut Conn<Self>) -> Result<Option<NodeRecord>, StoreError>;
    /// Creates the node's record: `node_id`, last seq 0, clock 0.
    async fn create_node(conn: &mut Conn<Self>, node_id: &str) -> Result<(), StoreError>;

    /// Before a drain takes the write lock: whether the outbox may hold anything (true when
    /// the dialect cannot tell cheaply).
    async fn may_have_changes(conn: &mut Conn<Self>) -> Result<bool, StoreError>;
    /// A value that changes whenever the definition of a replicated table (`tables`) may
    /// have changed: its columns, its capture triggers, the table itself. Cheap enough to
    /// read at the start of every drain and apply (`store::evolve`).
    async fn schema_stamp(conn: &mut Conn<Self>, tables: &[TableConfig]) -> Result<String, StoreError>;
    /// A value that changes when there may be something new to drain.
    async fn data_version(&self) -> Result<i64, StoreError>;
    /// Waits until capture should look again (at most about `poll`).
    async fn wait_for_change(&self, poll: Duration);

    /// Up to `limit` log entries of `origin` with seq > `after`, in seq order, read without
    /// the writer (entries past an unacknowledged seq are never trimmed).
    async fn read_log(&self, origin: &str, after: u64, limit: i64) -> Result<Vec<LogEntry>, StoreError>;
    /// Applied frontier per origin, read without the writer.
    async fn frontiers(&self) -> Result<BTreeMap<NodeId, u64>, StoreError>;
    /// The highest seq of `origin` the log has dropped (0 if none), read without the writer.
    async fn log_high(&self, origin: &str) -> Result<u64, StoreError>;

    /// A connection on which acknowledgements are recorded beside the writer, or `None` to
    /// use the writer (SQLite has a single writer).
    async fn ack_connection(&self) -> Result<Option<sqlx::pool::PoolConnection<Self::Db>>, StoreError>;
    /// Records acknowledgements, keeping the highest seq per (peer, origin).
    async fn record_acks(conn: &mut Conn<Self>, acks: &[Ack]) -> Result<(), StoreError>;
    /// The lowest seq of `origin` every one of `peers` has acknowledged (0 if one has none).
    async fn ack_floor(conn: &mut Conn<Self>, origin: &str, peers: &[NodeId]) -> Result<u64, StoreError>;
    /// Drops log entries of `origin` up to `through`; returns how many went.
    async fn trim_log(conn: &mut Conn<Self>, origin: &str, through: u64) -> Result<u64, StoreError>;
    /// Per origin, the last seq to drop so the log keeps nothing committed before
    /// `before_micros` and at most `max_bytes` of events, oldest first (a round at a time),
    /// and nothing of origins not `kept`.
    async fn retention_cutoffs(
        conn: &mut Conn<Self>,
        max_bytes: i64,
        before_micros: i64,
        kept: &std::collections::BTreeSet<NodeId>,
    ) -> Result<BTreeMap<String, u64>, StoreError>;

    /// A consistent read-only snapshot of the database, for status.
    async fn begin_read(&self) -> Result<sqlx::Transaction<'static, Self::Db>, StoreError>;
    async fn counts(conn: &mut Conn<Self>) -> Result<Counts, StoreError>;
    /// Frontiers in origin order.
    async fn frontier_status(conn: &mut Conn<Self>) -> Result<Vec<FrontierStatus>, StoreError>;
    /// Records (or clears) that `peer` is behind the log of `origin`.
    async fn note_behind_log(
        conn: &mut Conn<Self>,
        peer: &str,
        origin: &str,
        note: Option<&str>,
    ) -> Result<(), StoreError>;
    /// What `peer` has acknowledged of `origin`, and the log backlog past it.
    async fn backlog(conn: &mut Conn<Self>, peer: &str, origin: &str) -> Result<PeerStatus, StoreError>;
    /// The conflict log by table and strategy, dead letters by cause, the open queue.
    async fn breakdown(conn: &mut Conn<Self>) -> Result<crate::store::Breakdown, StoreError>;

    /// Closes the backend's own connections (the writer is closed by its owner).
    async fn close(self);
}

/// One committed outbox change, as the dialect reads it.
pub struct Captured<T> {
    pub table: Arc<T>,
    pub id: i64,
    pub committed_at: i64,
    pub key: Key,
    /// The row's image (`None`: deleted).
    pub image: Option<Row>,
}

/// Everything a drain or an applied run records besides the rows themselves.
#[derive(Default)]
pub struct Meta<'a> {
    /// Row versions, (table, key bytes, version); a key listed twice keeps its last version.
    pub versions: Vec<(&'a str, &'a [u8], &'a RowVersion)>,
    /// Log entries to append (own events, or relayed ones with this node on their path).
    pub log: Vec<&'a Event>,
    /// Frontiers that moved: (origin, seq, processed).
    pub frontiers: Vec<(&'a str, u64, u64)>,
    /// Delete the outbox rows `Txn::take_outbox` returned.
    pub outbox_taken: bool,
    /// The new last own seq, if it moved.
    pub last_seq: Option<u64>,
    /// The clock's high-water mark, persisted with the events it stamped.
    pub hlc: u64,
}

/// A resolved conflict, for the conflict log.
pub struct ConflictRecord<'a> {
    pub table: &'a str,
    pub key: String,
    pub strategy: &'static str,
    /// JSON of the winning and the losing version.
    pub winner: String,
    pub loser: String,
}

/// A dead letter's stored fields: as a snapshot hands it to a joiner (`transport::join`),
/// and as `insert_dead_letter` stores a new one.
#[derive(Debug, Clone)]
pub struct CopiedLetter {
    /// Its id at the source (to page on); not kept by the joiner.
    pub id: i64,
    pub origin: NodeId,
    pub seq: u64,
    pub table: String,
    pub key: String,
    pub reason: String,
    pub cause: String,
    /// The event, encoded.
    pub event: Vec<u8>,
}

/// An event that cannot be applied, with why.
pub struct DeadLetter<'a> {
    pub event: &'a Event,
    pub reason: &'a str,
    pub cause: Cause,
    /// Letters of one cause the store keeps at most (`max_dead_letters_per_cause`).
    pub limit: u64,
    /// The letter this is a failed retry of, and how many tries it had: that letter is
    /// updated (reason, one more attempt, the next try later) instead of a new one made.
    pub retry: Option<(i64, u32)>,
}

/// The kind of reason an event was dead-lettered for: storage is bounded per cause, so a
/// flood of one kind (a peer sending a table nobody configured) cannot fill the disk or
/// crowd out the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The event's table is not replicated here.
    NotReplicated,
    /// The event does not fit the local table (columns, key, strategy).
    Shape,
    /// This build cannot read the event's content.
    Undecodable,
    /// Its CRDT state cannot be merged.
    Crdt,
    /// The ownership rules refuse it.
    Ownership,
    /// The database refused the write (a constraint, a trigger, a value).
    Refused,
    /// A write that lost to a forced ownership failover it did not know of: kept as a record
    /// of what the failover discarded, never retried (it would lose again).
    Fenced,
    /// A change of this region's too large for any message (`max_message_mib`), kept at its
    /// source: never retried (it would not fit again); the row must be written anew.
    TooLarge,
    /// A row that lost one of its UNIQUE values to another region's row (`store::engine`):
    /// every region keeps the same winner and holds this letter; retried, it applies once the
    /// value is free.
    Unique,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::NotReplicated => "not replicated",
            Cause::Shape => "shape",
            Cause::Undecodable => "undecodable",
            Cause::Crdt => "crdt",
            Cause::Ownership => "ownership",
            Cause::Refused => "refused",
            Cause::Fenced => "fenced",
            Cause::TooLarge => "too large",
            Cause::Unique => "unique",
        }
    }

    /// Whether letters of the cause named `name` (as stored) are ever retried.
    pub fn retried_by_name(name: &str) -> bool {
        ![Cause::Fenced, Cause::TooLarge].iter().any(|c| c.as_str() == name)
    }

    /// Whether a retry could ever apply such a letter: not a fenced one (it would lose
    /// again) nor a change too large to send (it would not fit again).
    pub fn retried(self) -> bool {
        !matches!(self, Cause::Fenced | Cause::TooLarge)
    }
}

/// A step of a group of writes (a savepoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Begin,
    Keep,
    Undo,
}

/// A dead letter due for a retry: its id, the event as stored, and its attempts so far.
pub type DueLetter = (i64, Vec<u8>, u32);

/// A retry delay that never comes (a fenced letter's): far beyond any clock, without overflow.
pub const NEVER_MICROS: i64 = i64::MAX / 2;

/// How long after its `attempts`-th failed retry a dead letter is tried again: doubling from
/// a second, at most an hour.
pub fn retry_backoff_micros(attempts: u32) -> i64 {
    1_000_000i64.saturating_mul(1 << attempts.min(12)).min(3_600_000_000)
}

/// Row and metadata IO inside one open write transaction.
pub trait Txn {
    type Table: TableRules;
    /// Whether a drain holds every row it reads until commit (SQLite's database lock): then a
    /// normalized CRDT value may be written back unconditionally.
    const DRAIN_HOLDS_ROWS: bool;

    fn table(&self, name: &str) -> Option<Arc<Self::Table>>;

    // Capture.
    /// This node's last own seq as the database holds it, read in this transaction: never a
    /// counter in memory, which a commit that landed after its caller gave up leaves stale.
    async fn last_seq(&mut self) -> Result<u64, StoreError>;
    /// The first `limit` committed outbox changes (those of replicated tables), in outbox
    /// order per table: committed transactions only, the last one possibly cut at the limit.
    /// Remembers which outbox rows it took, for `write_meta`. `None` if the outbox is empty.
    async fn take_outbox(&mut self, limit: i64) -> Result<Option<Vec<Captured<Self::Table>>>, StoreError>;
    /// Of what `take_outbox` took, keeps only the outbox rows up to id `last_id` (`changes`
    /// of them of replicated tables) for `write_meta` to delete; the later ones stay for the
    /// next drain.
    fn take_only_through(&mut self, last_id: i64, changes: u64);
    /// Stored versions of `keys` of one table; absent keys are missing from the map.
    async fn versions(&mut self, table: &str, keys: &[Vec<u8>]) -> Result<HashMap<Vec<u8>, RowVersion>, StoreError>;
    /// Writes row versions, log entries, frontiers, the node's last seq and clock, and deletes
    /// the outbox rows taken, as `meta` says.
    async fn write_meta(&mut self, meta: Meta<'_>) -> Result<(), StoreError>;

    // Apply.
    /// Marks the transaction as the applier's (capture triggers skip its writes) and reads
    /// the frontiers.
    async fn begin_apply(&mut self) -> Result<BTreeMap<String, Frontier>, StoreError>;
    /// Locks the existing rows `events` touch, so no application write to them commits before
    /// this transaction; `false` if `nowait` and another transaction holds one.
    async fn lock_rows(&mut self, events: &[&Event], nowait: bool) -> Result<bool, StoreError>;
    /// Clears the applier's mark before commit, where the dialect needs it.
    async fn end_apply(&mut self) -> Result<(), StoreError>;

    // The strategy engine's row IO.
    /// Writes the event's row change as the applier (never captured). In `Mode::Grouped` it
    /// may be queued (and earlier queued writes flushed); in `Mode::EventByEvent` it is
    /// executed now, and a refusal leaves nothing of it behind.
    async fn write(&mut self, table: &Arc<Self::Table>, event: &Event, mode: Mode) -> Step;
    /// Executes queued writes.
    async fn flush(&mut self) -> Step;
    /// The row's current image (queued writes are flushed first by the engine).
    async fn read_row(&mut self, table: &Self::Table, key: &Key) -> Result<Option<Row>, StoreError>;
    /// Another row than `key` holding `row`'s values in every column of one of the table's
    /// UNIQUE constraints (none NULL): the row a write of `row` collides with.
    async fn unique_holder(&mut self, table: &Self::Table, key: &Key, row: &Row) -> Result<Option<Row>, StoreError>;
    /// Up to `limit` tombstones: (table, key bytes, version).
    async fn tombstones(&mut self, limit: i64) -> Result<Vec<(String, Vec<u8>, RowVersion)>, StoreError>;
    /// (table, key text) of every dead letter.
    async fn dead_letter_keys(&mut self) -> Result<std::collections::HashSet<(String, String)>, StoreError>;
    /// Up to `limit` letters after id `after` that a snapshot hands a joiner.
    async fn letters_to_copy(&mut self, after: i64, limit: i64) -> Result<Vec<CopiedLetter>, StoreError>;
    /// Stores another node's letter as this node's, once; whether it was new.
    async fn copy_letter(&mut self, letter: &CopiedLetter) -> Result<bool, StoreError>;
    /// Makes the recorded version of `key` a tombstone.
    async fn mark_deleted(&mut self, table: &str, key: &[u8]) -> Result<(), StoreError>;
    /// Removes the tombstone of `key` with what it kept (CRDT states, siblings).
    async fn purge_tombstone(&mut self, table: &str, key: &[u8]) -> Result<(), StoreError>;
    /// Calls `visit` with every row of `table`, in no particular order; returns how many.
    async fn scan_rows(&mut self, table: &Self::Table, visit: &mut (dyn FnMut(Row) + Send)) -> Result<u64, StoreError>;
    /// Raises the recorded version of the row `key` to cover `floor` (recording one, as a
    /// tombstone if `absent`, when there is none), so the row's next change covers it.
    async fn raise_row_version(
        &mut self,
        table: &str,
        key: &[u8],
        floor: &crate::version::VersionVector,
        absent: bool,
    ) -> Result<(), StoreError>;
    async fn crdt_states(&mut self, table: &str, key: &[u8]) -> Result<States, StoreError>;
    async fn store_crdt_states(&mut self, table: &str, key: &[u8], states: &States) -> Result<(), StoreError>;
    /// Sets CRDT column values of an existing row, not captured. With `unless_changed_from`
    /// (a drain that does not hold the row), only if those columns still hold that image's
    /// values: a later application write is drained and normalized on its own.
    async fn write_crdt_values(
        &mut self,
        table: &Self::Table,
        key: &Key,
        values: &[(String, Value)],
        unless_changed_from: Option<&Row>,
    ) -> Result<(), StoreError>;
    async fn owner(&mut self, table: &Self::Table, key: &[u8]) -> Result<Option<KnownOwner>, StoreError>;
    /// Records a row's owner; with `moving_to`, a transfer made here that is not drained
    /// yet, else clearing any transfer in progress.
    async fn store_owner(
        &mut self,
        table: &Self::Table,
        key: &Key,
        owner: &crate::resolve::ownership::Owner,
        moving_to: Option<&str>,
    ) -> Result<(), StoreError>;
    /// The siblings of a `queue` row, oldest (hlc, origin) first.
    async fn siblings(&mut self, table: &str, key: &[u8]) -> Result<Vec<Event>, StoreError>;
    /// Replaces a row's siblings; two or more open its queue entry (if not open already).
    async fn replace_siblings(
        &mut self,
        table: &str,
        key: &[u8],
        key_text: &str,
        set: &[Event],
    ) -> Result<(), StoreError>;
    /// Drops a row's siblings and closes its open entry, if any, naming who closed it.
    async fn close_queue(&mut self, table: &str, key: &[u8], by: &str) -> Result<(), StoreError>;

    // Audit.
    async fn insert_conflict(&mut self, record: &ConflictRecord<'_>) -> Result<(), StoreError>;
    async fn insert_dead_letter(&mut self, letter: &DeadLetter<'_>) -> Result<(), StoreError>;
    /// Where reading a stream source resumes (`Store::apply_from`).
    async fn position(&mut self, source: &str) -> Result<Option<i64>, StoreError>;
    /// Every stored position: (source, next), by source.
    async fn positions(&mut self) -> Result<Vec<(String, i64)>, StoreError>;
    async fn set_position(&mut self, position: &crate::store::Position) -> Result<(), StoreError>;
    /// Whether this transaction's writes skip foreign-key checks and actions (SQLite's
    /// applier, PostgreSQL's as a replica): only then may the engine delete and rewrite rows
    /// to get past a cycle of unique values (it would cascade otherwise).
    async fn foreign_keys_unchecked(&mut self) -> Result<bool, StoreError>;
    /// Opens, keeps or undoes a group of writes the engine may take back as one.
    async fn group(&mut self, step: Group) -> Result<(), StoreError>;
    /// Dead letters whose retry is due, oldest first, at most `limit`; with
    /// `parents_may_have_arrived`, also those a missing parent row refused, backoff or not.
    async fn due_dead_letters(
        &mut self,
        limit: i64,
        parents_may_have_arrived: bool,
    ) -> Result<Vec<DueLetter>, StoreError>;
    async fn delete_dead_letter(&mut self, id: i64) -> Result<(), StoreError>;
    /// Makes every dead letter due now (a schema change may have removed its cause).
    async fn dead_letters_due_now(&mut self) -> Result<(), StoreError>;

    // Snapshots and the node table.
    /// Up to `limit` row versions of `table` after the key bytes `after`, in key byte order.
    async fn row_page(
        &mut self,
        table: &str,
        after: &[u8],
        limit: i64,
    ) -> Result<Vec<(Vec<u8>, RowVersion)>, StoreError>;
    /// Rows (tombstones included) per replicated table.
    async fn row_counts(&mut self) -> Result<BTreeMap<String, u64>, StoreError>;
    async fn node_text(&mut self, name: &str) -> Result<Option<String>, StoreError>;
    /// Sets, or with `None` removes, a text value of the node table.
    async fn set_node_text(&mut self, name: &str, value: Option<&str>) -> Result<(), StoreError>;
}

/// The `Txn` methods every dialect forwards, unchanged, to functions of the same name and
/// arguments in its own modules (`capture`, `apply`, `strategy`, `metadata`). Invoked inside
/// each dialect's `impl Txn`, whose struct has the connection in `self.conn`, the tables in
/// `self.tables` and the outbox rows a drain took in `self.taken`.
macro_rules! forward_txn_io {
    () => {
        async fn take_outbox(
            &mut self,
            limit: i64,
        ) -> Result<Option<Vec<$crate::store::backend::Captured<Self::Table>>>, $crate::store::StoreError> {
            let Some((captured, taken)) = capture::take_outbox(self.conn, self.tables, limit).await? else {
                return Ok(None);
            };
            self.taken = Some(taken);
            Ok(Some(captured))
        }

        fn take_only_through(&mut self, last_id: i64, changes: u64) {
            if let Some(taken) = &mut self.taken {
                taken.through(last_id, changes);
            }
        }

        async fn write_meta(
            &mut self,
            meta: $crate::store::backend::Meta<'_>,
        ) -> Result<(), $crate::store::StoreError> {
            let taken = if meta.outbox_taken {
                self.taken.take()
            } else {
                None
            };
            capture::write_meta(self.conn, meta, taken).await
        }

        async fn end_apply(&mut self) -> Result<(), $crate::store::StoreError> {
            apply::end_apply(self.conn).await
        }

        async fn write_crdt_values(
            &mut self,
            table: &Self::Table,
            key: &$crate::event::Key,
            values: &[(String, $crate::event::Value)],
            unless_changed_from: Option<&$crate::event::Row>,
        ) -> Result<(), $crate::store::StoreError> {
            strategy::write_crdt_values(self.conn, table, key, values, unless_changed_from).await
        }

        async fn store_owner(
            &mut self,
            table: &Self::Table,
            key: &$crate::event::Key,
            owner: &$crate::resolve::ownership::Owner,
            moving_to: Option<&str>,
        ) -> Result<(), $crate::store::StoreError> {
            strategy::store_owner(self.conn, table, key, owner, moving_to).await
        }

        async fn last_seq(&mut self) -> Result<u64, $crate::store::StoreError> {
            metadata::last_seq(self.conn).await
        }

        async fn versions(
            &mut self,
            table: &str,
            keys: &[Vec<u8>],
        ) -> Result<std::collections::HashMap<Vec<u8>, $crate::replicate::RowVersion>, $crate::store::StoreError> {
            capture::load_versions(self.conn, table, keys).await
        }

        async fn begin_apply(
            &mut self,
        ) -> Result<std::collections::BTreeMap<String, $crate::store::admit::Frontier>, $crate::store::StoreError> {
            apply::begin_apply(self.conn).await
        }

        async fn read_row(
            &mut self,
            table: &Self::Table,
            key: &$crate::event::Key,
        ) -> Result<Option<$crate::event::Row>, $crate::store::StoreError> {
            apply::read_row(self.conn, table, key).await
        }

        async fn unique_holder(
            &mut self,
            table: &Self::Table,
            key: &$crate::event::Key,
            row: &$crate::event::Row,
        ) -> Result<Option<$crate::event::Row>, $crate::store::StoreError> {
            apply::unique_holder(self.conn, table, key, row).await
        }

        async fn tombstones(
            &mut self,
            limit: i64,
        ) -> Result<Vec<(String, Vec<u8>, $crate::replicate::RowVersion)>, $crate::store::StoreError> {
            metadata::tombstones(self.conn, limit).await
        }

        async fn dead_letter_keys(
            &mut self,
        ) -> Result<std::collections::HashSet<(String, String)>, $crate::store::StoreError> {
            metadata::dead_letter_keys(self.conn).await
        }

        async fn letters_to_copy(
            &mut self,
            after: i64,
            limit: i64,
        ) -> Result<Vec<$crate::store::backend::CopiedLetter>, $crate::store::StoreError> {
            metadata::letters_to_copy(self.conn, after, limit).await
        }

        async fn copy_letter(
            &mut self,
            letter: &$crate::store::backend::CopiedLetter,
        ) -> Result<bool, $crate::store::StoreError> {
            metadata::copy_letter(self.conn, letter).await
        }

        async fn mark_deleted(&mut self, table: &str, key: &[u8]) -> Result<(), $crate::store::StoreError> {
            metadata::mark_deleted(self.conn, table, key).await
        }

        async fn purge_tombstone(&mut self, table: &str, key: &[u8]) -> Result<(), $crate::store::StoreError> {
            metadata::purge_tombstone(self.conn, table, key).await
        }

        async fn scan_rows(
            &mut self,
            table: &Self::Table,
            visit: &mut (dyn FnMut($crate::event::Row) + Send),
        ) -> Result<u64, $crate::store::StoreError> {
            apply::scan_rows(self.conn, table, visit).await
        }

        async fn raise_row_version(
            &mut self,
            table: &str,
            key: &[u8],
            floor: &$crate::version::VersionVector,
            absent: bool,
        ) -> Result<(), $crate::store::StoreError> {
            let mut version = capture::load_versions(self.conn, table, &[key.to_vec()])
                .await?
                .remove(key)
                .map_or_else($crate::version::VersionVector::new, |v| v.version);
            version.merge(floor);
            metadata::raise_row_version(self.conn, table, key, &version.to_json(), absent).await
        }

        async fn crdt_states(
            &mut self,
            table: &str,
            key: &[u8],
        ) -> Result<$crate::crdt::States, $crate::store::StoreError> {
            metadata::crdt_states(self.conn, table, key).await
        }

        async fn store_crdt_states(
            &mut self,
            table: &str,
            key: &[u8],
            states: &$crate::crdt::States,
        ) -> Result<(), $crate::store::StoreError> {
            strategy::store_crdt_states(self.conn, table, key, states).await
        }

        async fn owner(
            &mut self,
            table: &Self::Table,
            key: &[u8],
        ) -> Result<Option<$crate::store::engine::KnownOwner>, $crate::store::StoreError> {
            metadata::load_owner(self.conn, &table.name, key).await
        }

        async fn siblings(
            &mut self,
            table: &str,
            key: &[u8],
        ) -> Result<Vec<$crate::event::Event>, $crate::store::StoreError> {
            metadata::siblings(self.conn, table, key).await
        }

        async fn replace_siblings(
            &mut self,
            table: &str,
            key: &[u8],
            key_text: &str,
            set: &[$crate::event::Event],
        ) -> Result<(), $crate::store::StoreError> {
            strategy::replace_siblings(self.conn, table, key, key_text, set).await
        }

        async fn close_queue(&mut self, table: &str, key: &[u8], by: &str) -> Result<(), $crate::store::StoreError> {
            metadata::close_queue(self.conn, table, key, by).await
        }

        async fn insert_conflict(
            &mut self,
            record: &$crate::store::backend::ConflictRecord<'_>,
        ) -> Result<(), $crate::store::StoreError> {
            metadata::insert_conflict(self.conn, record).await
        }

        async fn position(&mut self, source: &str) -> Result<Option<i64>, $crate::store::StoreError> {
            metadata::position(self.conn, source).await
        }

        async fn positions(&mut self) -> Result<Vec<(String, i64)>, $crate::store::StoreError> {
            metadata::positions(self.conn).await
        }

        async fn set_position(&mut self, position: &$crate::store::Position) -> Result<(), $crate::store::StoreError> {
            metadata::set_position(self.conn, position).await
        }

        async fn insert_dead_letter(
            &mut self,
            letter: &$crate::store::backend::DeadLetter<'_>,
        ) -> Result<(), $crate::store::StoreError> {
            metadata::insert_dead_letter(self.conn, letter).await
        }

        async fn due_dead_letters(
            &mut self,
            limit: i64,
            parents_may_have_arrived: bool,
        ) -> Result<Vec<$crate::store::backend::DueLetter>, $crate::store::StoreError> {
            metadata::due_dead_letters(self.conn, limit, parents_may_have_arrived).await
        }

        async fn delete_dead_letter(&mut self, id: i64) -> Result<(), $crate::store::StoreError> {
            metadata::delete_dead_letter(self.conn, id).await
        }

        async fn dead_letters_due_now(&mut self) -> Result<(), $crate::store::StoreError> {
            metadata::dead_letters_due_now(self.conn).await
        }

        async fn group(&mut self, step: $crate::store::backend::Group) -> Result<(), $crate::store::StoreError> {
            metadata::group(self.conn, step).await
        }

        async fn row_page(
            &mut self,
            table: &str,
            after: &[u8],
            limit: i64,
        ) -> Result<Vec<(Vec<u8>, $crate::replicate::RowVersion)>, $crate::store::StoreError> {
            metadata::row_page(self.conn, table, after, limit).await
        }

        async fn row_counts(&mut self) -> Result<std::collections::BTreeMap<String, u64>, $crate::store::StoreError> {
            metadata::row_counts(self.conn).await
        }

        async fn node_text(&mut self, name: &str) -> Result<Option<String>, $crate::store::StoreError> {
            metadata::node_text(self.conn, name).await
        }

        async fn set_node_text(&mut self, name: &str, value: Option<&str>) -> Result<(), $crate::store::StoreError> {
            metadata::set_node_text(self.conn, name, value).await
        }
    };
}

pub(crate) use forward_txn_io;
