//! The SQLite store: the embedded default.
//!
//! The application and the sidecar share one database file in WAL mode. SQLite has a single
//! writer, so every weft write goes through one connection behind a mutex, in short
//! `BEGIN IMMEDIATE` transactions, with a busy timeout: the application is never locked out
//! for longer than one batch, and weft waits (never fails) while the application writes.
//! Commits use `synchronous = FULL`: an acknowledged event survives power loss.
mod apply;
mod bulk;
mod capture;
mod crdt;
pub(crate) mod owners;
pub mod queue;
mod run;
pub mod schema;
pub mod values;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection as _, Row as _, SqliteConnection};
use tokio::sync::Mutex;

use crate::clock::Clock;
use crate::event::{Hlc, Identity, NodeId};
use crate::store::{LogEntry, PeerStatus, Status, StoreError};
pub use schema::TableInfo;

pub struct SqliteStore {
    identity: Identity,
    writer: Mutex<Writer>,
    readers: SqlitePool,
    poller: Mutex<SqliteConnection>,
    tables: HashMap<String, Arc<TableInfo>>,
    clock: Arc<Clock>,
    /// Remote origins whose applied events are appended to the log, to be passed on.
    relayed: BTreeSet<NodeId>,
}

/// The single write connection and the counters only it changes.
struct Writer {
    conn: SqliteConnection,
    last_seq: u64,
}

fn options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(30))
        // Like a plain SQLite connection: the application decides whether it uses FKs.
        .foreign_keys(false)
}

async fn node_value(conn: &mut SqliteConnection, name: &str) -> Result<Option<i64>, StoreError> {
    Ok(sqlx::query_scalar("SELECT value FROM _weft_node WHERE name = ?")
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?)
}

impl SqliteStore {
    /// Opens (creating if needed) the database, installs weft's schema and triggers, and
    /// restores this node's sequence and clock.
    pub async fn open(
        path: &Path,
        identity: Identity,
        tables: &[crate::config::TableConfig],
        max_clock_skew: Duration,
    ) -> Result<Self, StoreError> {
        let mut conn = SqliteConnection::connect_with(&options(path)).await?;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        let infos = schema::install(&mut tx, tables, &identity.region).await?;
        let found: Option<String> = sqlx::query_scalar("SELECT value FROM _weft_node WHERE name = 'node_id'")
            .fetch_optional(&mut *tx)
            .await?;
        match found {
            Some(found) if found != identity.node => {
                return Err(StoreError::WrongNode {
                    found,
                    expected: identity.node,
                });
            }
            Some(_) => {}
            None => {
                sqlx::query("INSERT INTO _weft_node (name, value) VALUES ('node_id', ?), ('last_seq', 0), ('hlc', 0)")
                    .bind(&identity.node)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let last_seq = node_value(&mut tx, "last_seq").await?.unwrap_or(0) as u64;
        let hlc = node_value(&mut tx, "hlc").await?.unwrap_or(0) as u64;
        tx.commit().await?;

        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options(path).read_only(true))
            .await?;
        let poller = SqliteConnection::connect_with(&options(path).read_only(true)).await?;
        Ok(Self {
            clock: Arc::new(Clock::restore(max_clock_skew, Hlc(hlc))),
            identity,
            writer: Mutex::new(Writer { conn, last_seq }),
            readers,
            poller: Mutex::new(poller),
            tables: infos.into_iter().map(|i| (i.name.clone(), Arc::new(i))).collect(),
            relayed: BTreeSet::new(),
        })
    }

    /// Keeps the events of these remote origins in the log once applied (with this node
    /// appended to their path), so they can be relayed.
    pub fn relaying(mut self, origins: BTreeSet<NodeId>) -> Self {
        self.relayed = origins;
        self
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn clock(&self) -> &Arc<Clock> {
        &self.clock
    }

    /// Changes whenever another connection commits: a cheap "is there anything new" probe.
    pub async fn data_version(&self) -> Result<i64, StoreError> {
        let mut poller = self.poller.lock().await;
        Ok(sqlx::query_scalar("PRAGMA data_version")
            .fetch_one(&mut *poller)
            .await?)
    }

    pub async fn last_seq(&self) -> u64 {
        self.writer.lock().await.last_seq
    }

    /// Applied frontier per origin.
    pub async fn frontiers(&self) -> Result<BTreeMap<NodeId, u64>, StoreError> {
        let rows = sqlx::query("SELECT origin, seq FROM _weft_frontier")
            .fetch_all(&self.readers)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)? as u64)))
            .collect()
    }

    /// Log entries of `origin` after `after`, about `max` of them, but always ending on a
    /// capture-batch boundary so a source transaction is never split on the wire.
    pub async fn read_log(&self, origin: &str, after: u64, max: usize) -> Result<Vec<LogEntry>, StoreError> {
        // Log entries are immutable, and entries past `after` cannot be trimmed (they are not
        // acknowledged yet), so no read transaction is needed.
        crate::store::read_whole_batches(after, max, async |cursor, limit| {
            let rows = sqlx::query(
                "SELECT seq, batch_end, event FROM _weft_log WHERE origin = ? AND seq > ? ORDER BY seq LIMIT ?",
            )
            .bind(origin)
            .bind(cursor as i64)
            .bind(limit)
            .fetch_all(&self.readers)
            .await?;
            rows.iter()
                .map(|row| {
                    Ok(LogEntry {
                        seq: row.try_get::<i64, _>(0)? as u64,
                        batch_end: row.try_get::<i64, _>(1)? as u64,
                        bytes: row.try_get(2)?,
                    })
                })
                .collect()
        })
        .await
    }

    /// Records acknowledgements and drops log entries every peer that needs them has.
    /// `needs` lists, per origin kept in the log, the peers that must acknowledge it.
    pub async fn record_acks_and_collect(
        &self,
        acks: &[(NodeId, NodeId, u64)],
        needs: &BTreeMap<NodeId, Vec<NodeId>>,
    ) -> Result<u64, StoreError> {
        let mut writer = self.writer.lock().await;
        let mut tx = writer.conn.begin_with("BEGIN IMMEDIATE").await?;
        for (peer, origin, seq) in acks {
            sqlx::query(
                "INSERT INTO _weft_acks (peer, origin, seq) VALUES (?, ?, ?) \
                 ON CONFLICT (peer, origin) DO UPDATE SET seq = max(seq, excluded.seq)",
            )
            .bind(peer)
            .bind(origin)
            .bind(*seq as i64)
            .execute(&mut *tx)
            .await?;
        }
        let mut removed = 0;
        for (origin, peers) in needs {
            let mut floor = u64::MAX;
            for peer in peers {
                let acked: Option<i64> = sqlx::query_scalar("SELECT seq FROM _weft_acks WHERE peer = ? AND origin = ?")
                    .bind(peer)
                    .bind(origin)
                    .fetch_optional(&mut *tx)
                    .await?;
                floor = floor.min(acked.unwrap_or(0) as u64);
            }
            if floor != u64::MAX && floor > 0 {
                removed += sqlx::query("DELETE FROM _weft_log WHERE origin = ? AND seq <= ?")
                    .bind(origin)
                    .bind(floor as i64)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
        }
        tx.commit().await?;
        Ok(removed)
    }

    /// Replication state for `weft status`: frontiers, backlog and RPO exposure per peer.
    pub async fn status(&self, peers: &[(NodeId, Vec<NodeId>)]) -> Result<Status, StoreError> {
        let mut conn = self.readers.acquire().await?;
        let mut tx = conn.begin().await?;
        let scalar = |sql: &'static str| sqlx::query_scalar::<_, i64>(sql);
        let mut status = Status {
            node: self.identity.node.clone(),
            last_seq: node_value(&mut tx, "last_seq").await?.unwrap_or(0) as u64,
            outbox_pending: scalar("SELECT count(*) FROM _weft_outbox").fetch_one(&mut *tx).await? as u64,
            log_events: scalar("SELECT count(*) FROM _weft_log").fetch_one(&mut *tx).await? as u64,
            dead_letters: scalar("SELECT count(*) FROM _weft_dead_letters")
                .fetch_one(&mut *tx)
                .await? as u64,
            conflicts: scalar("SELECT count(*) FROM _weft_conflicts")
                .fetch_one(&mut *tx)
                .await? as u64,
            ..Status::default()
        };
        for row in sqlx::query("SELECT origin, seq, processed FROM _weft_frontier ORDER BY origin")
            .fetch_all(&mut *tx)
            .await?
        {
            status.frontiers.push((
                row.try_get(0)?,
                row.try_get::<i64, _>(1)? as u64,
                row.try_get::<i64, _>(2)? as u64,
            ));
        }
        for (peer, origins) in peers {
            for origin in origins {
                let acked: i64 =
                    sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM _weft_acks WHERE peer = ? AND origin = ?")
                        .bind(peer)
                        .bind(origin)
                        .fetch_one(&mut *tx)
                        .await?;
                let row = sqlx::query("SELECT count(*), min(committed_at) FROM _weft_log WHERE origin = ? AND seq > ?")
                    .bind(origin)
                    .bind(acked)
                    .fetch_one(&mut *tx)
                    .await?;
                status.peers.push(PeerStatus {
                    peer: peer.clone(),
                    origin: origin.clone(),
                    acked: acked as u64,
                    unacked: row.try_get::<i64, _>(0)? as u64,
                    oldest_unacked_micros: row.try_get(1)?,
                });
            }
        }
        tx.commit().await?;
        Ok(status)
    }

    /// Closes every connection (checkpointing the WAL).
    pub async fn close(self) {
        self.readers.close().await;
        let _ = self.poller.into_inner().close().await;
        let _ = self.writer.into_inner().conn.close().await;
    }
}

/// An application's connection pool: WAL, and a busy timeout so it waits for the sidecar.
pub async fn app_pool(db: &Path) -> Result<SqlitePool, sqlx::Error> {
    let options = SqliteConnectOptions::new()
        .filename(db)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(30));
    SqlitePoolOptions::new().max_connections(4).connect_with(options).await
}
