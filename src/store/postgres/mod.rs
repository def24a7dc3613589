//! The PostgreSQL store: a region's sidecar beside a PostgreSQL database.
//!
//! Same guarantees as the SQLite store (see `store`): capture by triggers into `weft.outbox`
//! in the application's transaction, one transaction per drain and per applied run, the
//! frontier committed with the data. PostgreSQL-specific parts:
//! - One writer connection does every drain and apply, with `synchronous_commit = on` (an
//!   acknowledged event is on disk). It holds a session advisory lock, so only one sidecar
//!   serves a database; a second one is refused with `StoreError::Busy`.
//! - A lost connection (database restart, network) is dropped and redialled on the next
//!   call; the transaction it was in rolled back, and callers retry, so nothing is lost.
//! - Capture is woken by `NOTIFY weft_capture` (`wait_for_change`), with polling as the
//!   fallback when notifications are lost (they are, across a reconnect).
//! - Apply locks the rows a run touches (`FOR UPDATE`) before it drains local changes: a
//!   change committed before the lock is drained first, and none can commit after it.
//! - Decisions and strategies come from `store::engine`; `rows` is this store's row IO.
mod apply;
mod capture;
pub(crate) mod rows;
pub mod schema;
pub mod values;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Connection as _, PgConnection, Row as _};
use tokio::sync::Mutex;

use crate::clock::Clock;
use crate::event::Identity;
use crate::event::{Hlc, NodeId};
use crate::store::{LogEntry, PeerStatus, Status, StoreError};
pub use schema::PgTable;

/// Session settings for every weft connection: canonical text output for values.
const SESSION: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'iso_8601'; \
                       SET extra_float_digits = 3; SET bytea_output = 'hex'";

/// How long a starting sidecar waits for another session's sidecar lock.
const LOCK_WAIT: Duration = Duration::from_secs(10);

pub struct PgStore {
    identity: Identity,
    options: PgConnectOptions,
    writer: Mutex<Writer>,
    readers: PgPool,
    listener: Mutex<Option<PgListener>>,
    wakeups: AtomicI64,
    tables: HashMap<String, Arc<PgTable>>,
    clock: Arc<Clock>,
    relayed: BTreeSet<NodeId>,
}

/// The writer connection (dialled on demand) and the counters only it changes.
struct Writer {
    conn: Option<PgConnection>,
    last_seq: u64,
}

fn options(url: &str) -> Result<PgConnectOptions, StoreError> {
    Ok(PgConnectOptions::from_str(url)?.application_name("weft"))
}

/// Connects the writer: session settings, durable commits, the sidecar lock.
async fn connect_writer(options: &PgConnectOptions) -> Result<PgConnection, StoreError> {
    let mut conn = PgConnection::connect_with(options).await?;
    sqlx::raw_sql(SESSION).execute(&mut conn).await?;
    // Durable commits whatever the server's default; and an application transaction that
    // holds a row for long makes a run fail (and retry) instead of hanging the sidecar.
    // Generic plans skip planning on every drain and apply; the writer's statements join
    // `unnest` arrays to primary keys, which plans as index nested loops at any array size
    // (checked with EXPLAIN against a million-row weft.rows).
    sqlx::raw_sql("SET synchronous_commit = on; SET lock_timeout = '10s'; SET plan_cache_mode = force_generic_plan")
        .execute(&mut conn)
        .await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext('weft.sidecar'))")
        .fetch_one(&mut conn)
        .await?;
    if !locked {
        let holder: Option<String> = sqlx::query_scalar(
            "SELECT a.application_name || ' (pid ' || a.pid || ', from ' || coalesce(a.client_addr::text, 'a local socket') || ')' \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.objid = hashtext('weft.sidecar')::oid AND l.granted LIMIT 1",
        )
        .fetch_optional(&mut conn)
        .await
        .ok()
        .flatten();
        return Err(StoreError::Busy(format!(
            "another weft sidecar already serves this database ({}); run one sidecar per database, or stop the other first",
            holder.unwrap_or_else(|| "its session holds the weft.sidecar advisory lock".into())
        )));
    }
    Ok(conn)
}

async fn node_value(conn: &mut PgConnection, name: &str) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar("SELECT value FROM weft.node WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?)
}

/// This node's last own seq as the database records it.
pub(crate) async fn last_seq(conn: &mut PgConnection) -> Result<u64, StoreError> {
    number(node_value(conn, "last_seq").await?, "last_seq")
}

fn number(value: Option<String>, name: &str) -> Result<u64, StoreError> {
    value
        .unwrap_or_else(|| "0".into())
        .parse()
        .map_err(|_| StoreError::Corrupt(format!("weft.node {name} is not a number")))
}

impl PgStore {
    /// Connects, takes the sidecar lock, installs weft's schema and triggers, and restores
    /// this node's sequence and clock.
    pub async fn open(
        url: &str,
        identity: Identity,
        tables: &[crate::config::TableConfig],
        max_clock_skew: Duration,
    ) -> Result<Self, StoreError> {
        let options = options(url)?;
        // The session of a sidecar that just died can outlive it briefly (until the server
        // notices the closed socket): wait a little for its lock before giving up.
        let started = std::time::Instant::now();
        let mut conn = loop {
            match connect_writer(&options).await {
                Err(StoreError::Busy(message)) if started.elapsed() < LOCK_WAIT => {
                    if started.elapsed() < Duration::from_millis(300) {
                        tracing::warn!("{message}; waiting up to {LOCK_WAIT:?} in case it is a session that is ending");
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                other => break other?,
            }
        };
        let mut tx = conn.begin().await?;
        let infos = schema::install(&mut tx, tables, &identity.region).await?;
        match node_value(&mut tx, "node_id").await? {
            Some(found) if found != identity.node => {
                return Err(StoreError::WrongNode {
                    found,
                    expected: identity.node,
                });
            }
            Some(_) => {}
            None => {
                sqlx::query(
                    "INSERT INTO weft.node (name, value) VALUES ('node_id', $1), ('last_seq', '0'), ('hlc', '0')",
                )
                .bind(&identity.node)
                .execute(&mut *tx)
                .await?;
            }
        }
        let last_seq = last_seq(&mut tx).await?;
        let hlc = number(node_value(&mut tx, "hlc").await?, "hlc")?;
        tx.commit().await?;
        let mut listener = PgListener::connect_with(&Self::pool(&options, 1).await?).await?;
        listener.listen(schema::CHANNEL).await?;
        Ok(Self {
            clock: Arc::new(Clock::restore(max_clock_skew, Hlc(hlc))),
            identity,
            writer: Mutex::new(Writer {
                conn: Some(conn),
                last_seq,
            }),
            readers: Self::pool(&options, 4).await?,
            listener: Mutex::new(Some(listener)),
            wakeups: AtomicI64::new(0),
            options,
            tables: infos.into_iter().map(|t| (t.name.clone(), Arc::new(t))).collect(),
            relayed: BTreeSet::new(),
        })
    }

    async fn pool(options: &PgConnectOptions, size: u32) -> Result<PgPool, StoreError> {
        Ok(PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::raw_sql(SESSION).execute(conn).await?;
                    Ok(())
                })
            })
            .connect_lazy_with(options.clone()))
    }

    /// A pool for tools working on the database beside the sidecar (`weft conflicts`,
    /// `weft ownership`), with weft's canonical session settings.
    pub async fn app_pool(url: &str) -> Result<PgPool, StoreError> {
        Self::pool(&options(url)?, 2).await
    }

    /// Reads the state of a database served by a running sidecar (for `weft status`),
    /// without its lock and without installing anything.
    pub async fn inspect(url: &str, identity: Identity) -> Result<Self, StoreError> {
        let options = options(url)?;
        Ok(Self {
            clock: Arc::new(Clock::restore(Duration::from_secs(1), Hlc(0))),
            identity,
            writer: Mutex::new(Writer {
                conn: None,
                last_seq: 0,
            }),
            readers: Self::pool(&options, 1).await?,
            listener: Mutex::new(None),
            wakeups: AtomicI64::new(0),
            options,
            tables: HashMap::new(),
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

    /// Counts wake-ups: a change means "drain now".
    pub fn data_version(&self) -> i64 {
        self.wakeups.load(Ordering::Relaxed)
    }

    /// Waits for a capture notification, or at most `fallback` (notifications are lost
    /// while the listener reconnects; polling catches what they miss).
    pub async fn wait_for_change(&self, fallback: Duration) {
        let mut guard = self.listener.lock().await;
        if let Some(listener) = guard.as_mut() {
            match tokio::time::timeout(fallback, listener.recv()).await {
                Ok(Ok(_)) => while listener.next_buffered().is_some() {},
                Ok(Err(error)) => {
                    tracing::warn!(%error, "capture notifications unavailable; polling until the database is back");
                    tokio::time::sleep(fallback).await;
                }
                Err(_) => {}
            }
        } else {
            tokio::time::sleep(fallback).await;
        }
        self.wakeups.fetch_add(1, Ordering::Relaxed);
    }

    pub async fn last_seq(&self) -> u64 {
        self.writer.lock().await.last_seq
    }

    /// Applied frontier per origin.
    pub async fn frontiers(&self) -> Result<BTreeMap<NodeId, u64>, StoreError> {
        let rows = sqlx::query("SELECT origin, seq FROM weft.frontier")
            .fetch_all(&self.readers)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)? as u64)))
            .collect()
    }

    /// Log entries of `origin` after `after`, about `max` of them, always ending on a
    /// capture-batch boundary.
    pub async fn read_log(&self, origin: &str, after: u64, max: usize) -> Result<Vec<LogEntry>, StoreError> {
        // Log entries are immutable, and entries past `after` cannot be trimmed (they are not
        // acknowledged yet), so no read transaction is needed.
        crate::store::read_whole_batches(after, max, async |cursor, limit| {
            let rows = sqlx::query(
                "SELECT seq, batch_end, event FROM weft.log WHERE origin = $1 AND seq > $2 ORDER BY seq LIMIT $3",
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
    pub async fn record_acks_and_collect(
        &self,
        acks: &[(NodeId, NodeId, u64)],
        needs: &BTreeMap<NodeId, Vec<NodeId>>,
    ) -> Result<u64, StoreError> {
        let mut tx = self.readers.begin().await?;
        for (peer, origin, seq) in acks {
            sqlx::query(
                "INSERT INTO weft.acks (peer, origin, seq) VALUES ($1, $2, $3) \
                 ON CONFLICT (peer, origin) DO UPDATE SET seq = greatest(weft.acks.seq, excluded.seq)",
            )
            .bind(peer)
            .bind(origin)
            .bind(*seq as i64)
            .execute(&mut *tx)
            .await?;
        }
        let mut removed = 0;
        for (origin, peers) in needs {
            let floor: Option<i64> = sqlx::query_scalar(
                "SELECT min(coalesce(a.seq, 0)) FROM unnest($2::text[]) p(peer) \
                 LEFT JOIN weft.acks a ON a.peer = p.peer AND a.origin = $1",
            )
            .bind(origin)
            .bind(peers)
            .fetch_one(&mut *tx)
            .await?;
            if let Some(floor) = floor.filter(|f| *f > 0) {
                removed += sqlx::query("DELETE FROM weft.log WHERE origin = $1 AND seq <= $2")
                    .bind(origin)
                    .bind(floor)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
        }
        tx.commit().await?;
        Ok(removed)
    }

    /// Replication state for `weft status`.
    pub async fn status(&self, peers: &[(NodeId, Vec<NodeId>)]) -> Result<Status, StoreError> {
        let mut tx = self.readers.begin().await?;
        sqlx::raw_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let count = |sql: &'static str| sqlx::query_scalar::<_, i64>(sql);
        let mut status = Status {
            node: self.identity.node.clone(),
            last_seq: last_seq(&mut tx).await?,
            outbox_pending: count("SELECT count(*) FROM weft.outbox").fetch_one(&mut *tx).await? as u64,
            log_events: count("SELECT count(*) FROM weft.log").fetch_one(&mut *tx).await? as u64,
            dead_letters: count("SELECT count(*) FROM weft.dead_letters")
                .fetch_one(&mut *tx)
                .await? as u64,
            conflicts: count("SELECT count(*) FROM weft.conflicts").fetch_one(&mut *tx).await? as u64,
            ..Status::default()
        };
        for row in sqlx::query("SELECT origin, seq, processed FROM weft.frontier ORDER BY origin")
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
                    sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM weft.acks WHERE peer = $1 AND origin = $2")
                        .bind(peer)
                        .bind(origin)
                        .fetch_one(&mut *tx)
                        .await?;
                let row =
                    sqlx::query("SELECT count(*), min(committed_at) FROM weft.log WHERE origin = $1 AND seq > $2")
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

    /// Closes every connection, releasing the sidecar lock.
    pub async fn close(self) {
        self.readers.close().await;
        if let Some(conn) = self.writer.into_inner().conn {
            let _ = conn.close().await;
        }
    }

    /// Runs `f` on the writer connection, dialling it first if needed. Any error drops the
    /// connection (its transaction rolled back); the next call redials.
    async fn with_writer<T>(
        &self,
        f: impl AsyncFnOnce(&Self, &mut PgConnection, &mut u64) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut guard = self.writer.lock().await;
        let writer = &mut *guard;
        if writer.conn.is_none() {
            tracing::info!("connecting to PostgreSQL");
            let mut conn = connect_writer(&self.options).await?;
            // The last transaction may have committed even though its reply was lost: the
            // database, not memory, says which seq comes next.
            writer.last_seq = last_seq(&mut conn).await?;
            writer.conn = Some(conn);
        }
        let conn = writer.conn.as_mut().expect("connected above");
        let result = f(self, conn, &mut writer.last_seq).await;
        if let Err(error) = &result {
            tracing::warn!(%error, "PostgreSQL call failed; the connection will be redialled");
            if let Some(conn) = writer.conn.take() {
                let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
            }
        }
        result
    }
}
