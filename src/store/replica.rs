//! One region's store over a dialect: who the node is, its clock, its replicated tables, the
//! single writer connection, the log and its acknowledgements, and the status it reports.
//!
//! Guarantees, whatever the dialect:
//! - One writer connection does every drain and apply, one at a time. After any failed
//!   call it is dropped (its transaction rolled back) and the next call redials and rereads
//!   the last own seq from the database: a commit can succeed even when its reply is lost, so
//!   memory never decides which seq comes next.
//! - The database belongs to one node: opening it as another node fails with
//!   `StoreError::WrongNode`.
//! - The log keeps every event some peer still needs: an entry goes only once every peer
//!   that needs its origin has acknowledged it (`record_acks_and_collect`).
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::clock::Clock;
use crate::config::TableConfig;
use crate::event::{Hlc, Identity, NodeId};
use crate::store::backend::{Ack, Backend, Conn, Tables, Txn as _};
use crate::store::engine::TableRules as _;
use crate::store::{LogEntry, Status, StoreError};

pub struct Replica<B: Backend> {
    pub(crate) identity: Identity,
    pub(crate) clock: Arc<Clock>,
    /// Remote origins whose applied events are appended to the log, to be passed on.
    pub(crate) relayed: BTreeSet<NodeId>,
    /// The replicated tables as last described; replaced when the schema changes
    /// (`store::evolve`). Take a snapshot with `tables()`, or `current_tables` in a write
    /// transaction.
    tables: std::sync::RwLock<Arc<Tables<B::Table>>>,
    /// The tables as configured, for installing again after a schema change.
    configs: Vec<TableConfig>,
    /// The schema stamp the descriptions in `tables` were read at.
    schema_stamp: std::sync::Mutex<String>,
    writer: Mutex<Writer<B>>,
    pub(crate) backend: B,
    /// This node's name in CRDT states (see `settle_local`): its id until its database went
    /// back in time, then one new name per such restore (`CRDT_ACTOR` in the node table).
    actor: std::sync::RwLock<String>,
    /// Dead letters of one cause kept at most (`max_dead_letters_per_cause`).
    pub(crate) dead_letter_limit: u64,
    /// How large a message may be (`max_message_mib`): what bounds capture batches and the
    /// largest row change this node will send (`capture`).
    pub(crate) messages: MessageBounds,
}

/// What a link's message size means for capture: a capture batch (a piece of a source
/// transaction) holds at most `piece_bytes` of events unless it is one event; an event
/// larger than `event_bytes` fits no message and is refused at its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageBounds {
    pub piece_bytes: usize,
    pub event_bytes: usize,
}

impl MessageBounds {
    /// The bounds for messages of at most `payload` bytes of events (`max_payload_bytes`):
    /// a piece of a quarter, so a frame that gathers half a message and then completes one
    /// batch stays within it.
    pub fn of(payload: usize) -> Self {
        Self {
            piece_bytes: (payload / 4).max(1),
            event_bytes: payload,
        }
    }
}

/// Dead letters of one cause a store keeps unless told otherwise.
pub const DEFAULT_DEAD_LETTER_LIMIT: u64 = 100_000;

/// The node-table entry holding this node's CRDT actor name, once it differs from its id.
pub(crate) const CRDT_ACTOR: &str = "crdt_actor";
/// The node-table entry that says what the history gate waits for (`note_history`).
const HISTORY_NOTE: &str = "history_wait";

/// The writer connection (dialled on demand) and the last own seq it committed, kept for
/// reporting (`last_seq`); drains number from the database's value, read in their own
/// transaction.
struct Writer<B: Backend> {
    conn: Option<Conn<B>>,
    last_seq: u64,
}

impl<B: Backend> Replica<B> {
    /// Installs weft's schema and triggers through a fresh writer connection, claims the
    /// database for this node (or refuses one that belongs to another), and restores the
    /// node's sequence and clock.
    pub(crate) async fn open_with(
        backend: B,
        identity: Identity,
        tables: &[TableConfig],
        max_clock_skew: Duration,
    ) -> Result<Self, StoreError> {
        let mut conn = backend.connect_writer().await?;
        let mut tx = sqlx::Connection::begin_with(&mut conn, sqlx::AssertSqlSafe(B::BEGIN)).await?;
        let mut installed = B::install(&mut tx, tables, &identity.region).await?;
        let record = match B::node_record(&mut tx).await? {
            Some(record) if record.node_id != identity.node => {
                return Err(StoreError::WrongNode {
                    found: record.node_id,
                    expected: identity.node,
                });
            }
            Some(record) => record,
            None => {
                B::create_node(&mut tx, &identity.node).await?;
                B::node_record(&mut tx)
                    .await?
                    .ok_or_else(|| StoreError::Corrupt("the node record just written cannot be read back".into()))?
            }
        };
        let empty = Tables::new();
        let actor = {
            let mut txn = backend.txn(&empty, &mut tx);
            crate::store::evolve::record(&mut txn, &mut installed).await?;
            txn.node_text(CRDT_ACTOR).await?
        };
        let stamp = B::schema_stamp(&mut tx, tables).await?;
        tx.commit().await?;
        let mut replica = Self::assemble(backend, identity, installed, Some(conn), record, max_clock_skew);
        replica.configs = tables.to_vec();
        replica.schema_stamp = std::sync::Mutex::new(stamp);
        if let Some(actor) = actor {
            replica.set_crdt_actor(actor);
        }
        Ok(replica)
    }

    /// The replicated tables as last described (for reads beside the writer).
    pub(crate) fn tables(&self) -> Arc<Tables<B::Table>> {
        self.tables.read().expect("tables lock").clone()
    }

    /// The replicated tables as the database defines them now, checked in the caller's
    /// write transaction: if the schema stamp moved, the store installs again in that
    /// transaction (descriptions, capture triggers, re-capture of a table that lost them),
    /// records the column history and makes dead letters due, all before the caller reads
    /// the outbox or applies anything (`store::evolve`). A rollback of the transaction
    /// leaves the stamp moved again, so the next one repeats the work.
    pub(crate) async fn current_tables(&self, tx: &mut Conn<B>) -> Result<Arc<Tables<B::Table>>, StoreError> {
        let stamp = B::schema_stamp(tx, &self.configs).await?;
        if *self.schema_stamp.lock().expect("stamp lock") == stamp {
            return Ok(self.tables());
        }
        tracing::info!("the schema of the database changed; reading the replicated tables again");
        // Statements prepared before may name a table's row type that is gone (a table
        // dropped and recreated): PostgreSQL then refuses to run them ("function in FROM has
        // unsupported return type"), which stopped every drain of the region for good.
        sqlx::Connection::clear_cached_statements(&mut *tx).await?;
        let mut installed = B::install(tx, &self.configs, &self.identity.region).await?;
        let empty = Tables::new();
        let mut txn = self.backend.txn(&empty, tx);
        crate::store::evolve::record(&mut txn, &mut installed).await?;
        txn.dead_letters_due_now().await?;
        drop(txn);
        let stamp = B::schema_stamp(tx, &self.configs).await?;
        let tables: Arc<Tables<B::Table>> = Arc::new(
            installed
                .into_iter()
                .map(|t| (crate::store::engine::TableRules::name(&t).to_owned(), Arc::new(t)))
                .collect(),
        );
        *self.tables.write().expect("tables lock") = tables.clone();
        *self.schema_stamp.lock().expect("stamp lock") = stamp;
        Ok(tables)
    }

    /// Whether the schema may have changed since the tables were described (read beside any
    /// transaction: a hint for an idle drain, which would otherwise not look).
    pub(crate) async fn schema_moved(&self, conn: &mut Conn<B>) -> Result<bool, StoreError> {
        let stamp = B::schema_stamp(conn, &self.configs).await?;
        Ok(*self.schema_stamp.lock().expect("stamp lock") != stamp)
    }

    /// This node's name in CRDT states.
    pub(crate) fn crdt_actor(&self) -> String {
        self.actor.read().expect("actor lock").clone()
    }

    pub(crate) fn set_crdt_actor(&self, actor: String) {
        *self.actor.write().expect("actor lock") = actor;
    }

    /// A store that reads a database served by a running sidecar: no writer, no install.
    pub(crate) fn reading(backend: B, identity: Identity) -> Self {
        let record = crate::store::backend::NodeRecord {
            node_id: identity.node.clone(),
            last_seq: 0,
            hlc: 0,
        };
        Self::assemble(backend, identity, Vec::new(), None, record, Duration::from_secs(1))
    }

    fn assemble(
        backend: B,
        identity: Identity,
        tables: Vec<B::Table>,
        conn: Option<Conn<B>>,
        record: crate::store::backend::NodeRecord,
        max_clock_skew: Duration,
    ) -> Self {
        Self {
            clock: Arc::new(Clock::restore(max_clock_skew, Hlc(record.hlc))),
            actor: std::sync::RwLock::new(identity.node.clone()),
            identity,
            relayed: BTreeSet::new(),
            dead_letter_limit: DEFAULT_DEAD_LETTER_LIMIT,
            messages: MessageBounds::of(crate::config::ReplicationConfig::default().max_payload_bytes()),
            tables: std::sync::RwLock::new(Arc::new(
                tables
                    .into_iter()
                    .map(|t| (crate::store::engine::TableRules::name(&t).to_owned(), Arc::new(t)))
                    .collect(),
            )),
            configs: Vec::new(),
            schema_stamp: std::sync::Mutex::new(String::new()),
            writer: Mutex::new(Writer {
                conn,
                last_seq: record.last_seq,
            }),
            backend,
        }
    }

    /// Keeps the events of these remote origins in the log once applied (with this node
    /// appended to their path), so they can be relayed.
    pub fn relaying(mut self, origins: BTreeSet<NodeId>) -> Self {
        self.relayed = origins;
        self
    }

    /// Keeps at most `limit` dead letters per cause (`StoreError::DeadLettersFull`).
    pub fn bounding_dead_letters(mut self, limit: u64) -> Self {
        self.dead_letter_limit = limit;
        self
    }

    /// Sizes capture batches for messages of at most `payload` bytes of events, and refuses
    /// a row change larger than that at its source (`MessageBounds`).
    pub fn bounding_messages(mut self, payload: usize) -> Self {
        self.messages = MessageBounds::of(payload);
        self
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// What the operator should know about the replicated tables (logged at start).
    pub fn advisories(&self) -> Vec<String> {
        let mut out: Vec<String> = self.tables().values().flat_map(|t| t.advisories()).collect();
        out.sort();
        out
    }

    pub fn clock(&self) -> &Arc<Clock> {
        &self.clock
    }

    pub async fn last_seq(&self) -> u64 {
        self.writer.lock().await.last_seq
    }

    /// Records for `weft status` that `peer` needs events of `origin` the log no longer
    /// holds (`note` says why and what to do), or with `None` that it no longer does.
    pub async fn note_behind_log(&self, peer: &str, origin: &str, note: Option<&str>) -> Result<(), StoreError> {
        self.with_writer(async |_: &Self, conn: &mut Conn<B>, _: &mut u64| {
            let mut tx = sqlx::Connection::begin_with(conn, sqlx::AssertSqlSafe(B::BEGIN)).await?;
            B::note_behind_log(&mut tx, peer, origin, note).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Records for `weft status` what the history gate waits for (`None`: nothing).
    pub async fn note_history(&self, note: Option<&str>) -> Result<(), StoreError> {
        self.with_writer(async |this: &Self, conn: &mut Conn<B>, _: &mut u64| {
            let mut tx = sqlx::Connection::begin_with(conn, sqlx::AssertSqlSafe(B::BEGIN)).await?;
            this.backend
                .txn(&Tables::new(), &mut tx)
                .set_node_text(HISTORY_NOTE, note)
                .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Runs `f` on the writer connection, dialling it first if needed. Any error drops the
    /// connection (its transaction rolled back); the next call redials.
    pub(crate) async fn with_writer<T>(
        &self,
        f: impl AsyncFnOnce(&Self, &mut Conn<B>, &mut u64) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut guard = self.writer.lock().await;
        let writer = &mut *guard;
        let conn = match &mut writer.conn {
            Some(conn) => conn,
            slot @ None => {
                tracing::info!("connecting to {}", B::NAME);
                let mut conn = self.backend.connect_writer().await?;
                // The last transaction may have committed even though its reply was lost: the
                // database, not memory, says which seq comes next.
                let record = B::node_record(&mut conn).await?;
                writer.last_seq = record.map_or(0, |r| r.last_seq);
                slot.insert(conn)
            }
        };
        // `self` goes in as an argument, not a capture: a closure capturing `&self` makes the
        // future's `Send` bound higher-ranked, which rustc cannot prove today.
        let result = f(self, conn, &mut writer.last_seq).await;
        if let Err(error) = &result {
            tracing::warn!(%error, "{} call failed; the connection will be redialled", B::NAME);
            if let Some(conn) = writer.conn.take() {
                let _ = tokio::time::timeout(Duration::from_secs(1), sqlx::Connection::close(conn)).await;
            }
        }
        result
    }

    /// Applied frontier per origin.
    pub async fn frontiers(&self) -> Result<BTreeMap<NodeId, u64>, StoreError> {
        self.backend.frontiers().await
    }

    /// The highest seq of `origin` the log has held and dropped since (0 if none).
    pub async fn log_high(&self, origin: &str) -> Result<u64, StoreError> {
        self.backend.log_high(origin).await
    }

    /// Log entries of `origin` after `after`, about `max` of them, but always ending on a
    /// capture-batch boundary so a capture batch is never split on the wire.
    pub async fn read_log(&self, origin: &str, after: u64, max: usize) -> Result<Vec<LogEntry>, StoreError> {
        self.read_log_within(origin, after, max, (usize::MAX, usize::MAX)).await
    }

    /// `read_log` within byte bounds: it stops at the first capture-batch boundary past
    /// `bytes.0` of events, and leaves out a batch that would take it past `bytes.1` (but
    /// for the first, which it always holds whole). Reads in small statements, so a log of
    /// large rows is never held in memory beyond that.
    pub async fn read_log_within(
        &self,
        origin: &str,
        after: u64,
        max: usize,
        (soft, hard): (usize, usize),
    ) -> Result<Vec<LogEntry>, StoreError> {
        const STEP: i64 = 256;
        let mut out: Vec<LogEntry> = Vec::new();
        let mut batch: Vec<LogEntry> = Vec::new();
        let (mut bytes, mut batch_bytes) = (0usize, 0usize);
        let mut cursor = after;
        loop {
            let rows = self.backend.read_log(origin, cursor, STEP).await?;
            let fetched = rows.len() as i64;
            for entry in rows {
                cursor = entry.seq;
                let closes = entry.seq >= entry.batch_end;
                batch_bytes += entry.bytes.len();
                batch.push(entry);
                if !closes {
                    continue;
                }
                if !out.is_empty() && bytes + batch_bytes > hard {
                    return Ok(out);
                }
                bytes += std::mem::take(&mut batch_bytes);
                out.append(&mut batch);
                if out.len() >= max || bytes >= soft {
                    return Ok(out);
                }
            }
            if fetched < STEP {
                // The log ends inside a batch only if it was trimmed mid-batch: what is there.
                out.append(&mut batch);
                return Ok(out);
            }
        }
    }

    /// Records acknowledgements and drops log entries every peer that needs them has.
    /// `needs` lists, per origin kept in the log, the peers that must acknowledge it.
    pub async fn record_acks_and_collect(
        &self,
        acks: &[Ack],
        needs: &BTreeMap<NodeId, Vec<NodeId>>,
    ) -> Result<u64, StoreError> {
        match self.backend.ack_connection().await? {
            Some(mut conn) => {
                let mut tx = sqlx::Connection::begin_with(&mut *conn, sqlx::AssertSqlSafe(B::BEGIN)).await?;
                let removed = record_and_trim::<B>(&mut tx, acks, needs).await?;
                tx.commit().await?;
                Ok(removed)
            }
            None => {
                self.with_writer(async |_: &Self, conn: &mut Conn<B>, _: &mut u64| {
                    let mut tx = sqlx::Connection::begin_with(conn, sqlx::AssertSqlSafe(B::BEGIN)).await?;
                    let removed = record_and_trim::<B>(&mut tx, acks, needs).await?;
                    tx.commit().await?;
                    Ok(removed)
                })
                .await
            }
        }
    }

    /// Drops the oldest log entries past the retention limits (`max_bytes` of events, none
    /// older than `max_age`), whether or not every peer has them: a peer that needed them is
    /// found behind the log when it connects, and re-seeds. Entries of origins not in `kept`
    /// (nodes taken out of the topology) go too. Never an entry past `held` of its origin:
    /// the last seq a reader that cannot re-seed (a Kafka topic) has taken; what stays so is
    /// reported (`RetentionReport::kept_back`).
    pub async fn enforce_retention(
        &self,
        max_bytes: u64,
        max_age: Duration,
        kept: &BTreeSet<NodeId>,
        held: &BTreeMap<NodeId, u64>,
    ) -> Result<crate::store::RetentionReport, StoreError> {
        let before = crate::clock::now_micros() - max_age.as_micros().min(i64::MAX as u128) as i64;
        let max_bytes = max_bytes.min(i64::MAX as u64) as i64;
        self.with_writer(async |_: &Self, conn: &mut Conn<B>, _: &mut u64| {
            let mut tx = sqlx::Connection::begin_with(conn, sqlx::AssertSqlSafe(B::BEGIN)).await?;
            let mut report = crate::store::RetentionReport::default();
            for (origin, wanted) in B::retention_cutoffs(&mut tx, max_bytes, before, kept).await? {
                let through = match held.get(&origin) {
                    Some(&taken) if taken < wanted => {
                        report.kept_back.insert(origin.clone(), (taken + 1, wanted));
                        taken
                    }
                    _ => wanted,
                };
                report.trimmed += B::trim_log(&mut tx, &origin, through).await?;
            }
            tx.commit().await?;
            Ok(report)
        })
        .await
    }

    /// Replication state for `weft status`: frontiers, backlog and RPO exposure per peer,
    /// read in one snapshot.
    pub async fn status(&self, peers: &[(NodeId, Vec<NodeId>)]) -> Result<Status, StoreError> {
        let mut tx = self.backend.begin_read().await?;
        let counts = B::counts(&mut tx).await?;
        let mut status = Status {
            node: self.identity.node.clone(),
            last_seq: counts.last_seq,
            outbox_pending: counts.outbox_pending,
            log_events: counts.log_events,
            dead_letters: counts.dead_letters,
            conflicts: counts.conflicts,
            frontiers: B::frontier_status(&mut tx).await?,
            peers: Vec::new(),
            joining: None,
            last_audit: None,
            positions: Vec::new(),
            history: None,
            breakdown: B::breakdown(&mut tx).await?,
        };
        for (peer, origins) in peers {
            for origin in origins {
                status.peers.push(B::backlog(&mut tx, peer, origin).await?);
            }
        }
        let join = self.backend.txn(&Tables::new(), &mut tx).node_text("join").await?;
        status.joining = join.and_then(|json| serde_json::from_str(&json).ok());
        let audit = self
            .backend
            .txn(&Tables::new(), &mut tx)
            .node_text(crate::store::checksum::LAST_AUDIT)
            .await?;
        status.last_audit = audit.and_then(|json| serde_json::from_str(&json).ok());
        status.positions = self.backend.txn(&Tables::new(), &mut tx).positions().await?;
        status.history = self
            .backend
            .txn(&Tables::new(), &mut tx)
            .node_text(HISTORY_NOTE)
            .await?;
        tx.commit().await?;
        Ok(status)
    }

    /// Closes every connection, the writer last (on SQLite, the last to close checkpoints
    /// the WAL).
    pub async fn close(self) {
        let writer = self.writer.into_inner();
        self.backend.close().await;
        if let Some(conn) = writer.conn {
            let _ = sqlx::Connection::close(conn).await;
        }
    }
}

async fn record_and_trim<B: Backend>(
    conn: &mut Conn<B>,
    acks: &[Ack],
    needs: &BTreeMap<NodeId, Vec<NodeId>>,
) -> Result<u64, StoreError> {
    B::record_acks(conn, acks).await?;
    let mut removed = 0;
    for (origin, peers) in needs {
        let floor = B::ack_floor(conn, origin, peers).await?;
        if floor > 0 {
            removed += B::trim_log(conn, origin, floor).await?;
        }
    }
    Ok(removed)
}
