//! The PostgreSQL dialect: a region's sidecar beside a PostgreSQL database.
//!
//! Same guarantees as every store (see `store`): capture by triggers into `weft.outbox` in
//! the application's transaction, one transaction per drain and per applied run, the
//! frontier committed with the data. PostgreSQL-specific parts:
//! - The writer connection commits with `synchronous_commit = on` (an acknowledged event is
//!   on disk) and holds a session advisory lock, so only one sidecar serves a database; a
//!   second one waits briefly (the session of a sidecar that just died can outlive it) and
//!   is then refused with `StoreError::SidecarLocked`.
//! - Capture is woken by `NOTIFY weft_capture` (`wait_for_change`), with polling as the
//!   fallback when notifications are lost (they are, across a reconnect).
//! - Apply locks the rows a run touches (`FOR UPDATE`) before it drains local changes: a
//!   change committed before the lock is drained first, and none can commit after it.
//! - Acknowledgements are recorded on a pooled connection, beside the writer.
//! - The writer's session ends a transaction its client left idle, finds a dead client by TCP
//!   keepalives and bounds statements (`WRITER_TIMEOUTS`), so a sidecar cut off from its
//!   database cannot hold row locks or the sidecar lock for long.
//! - Applies run as a replica (`session_replication_role`) where the role may: application
//!   triggers and foreign-key checks fire where the application wrote, not again here.
mod admin;
mod apply;
mod capture;
mod metadata;
pub mod schema;
mod strategy;
mod txn;
pub mod values;

use std::collections::BTreeMap;
use std::str::FromStr as _;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, Postgres as PgDb};
use sqlx::{AssertSqlSafe, Connection as _, PgConnection};
use tokio::sync::Mutex;

use crate::config::TableConfig;
use crate::event::{Identity, NodeId};
use crate::store::backend::{Ack, Backend, Counts, FrontierStatus, NodeRecord, Tables};
use crate::store::replica::Replica;
use crate::store::{LogEntry, PeerStatus, StoreError};
pub use schema::PgTable;

/// A PostgreSQL region's store.
pub type PgStore = Replica<Postgres>;

/// Session settings for every weft connection: canonical text output for values.
const SESSION: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'iso_8601'; \
                       SET extra_float_digits = 3; SET bytea_output = 'hex'";

/// The writer's defaults for the settings that bound how long a lost sidecar can hold row
/// locks and the sidecar lock (its transaction is cut, its session closed by the server):
/// a transaction left idle by a client that went away (a partition, a frozen process) is
/// ended after 30 s; a peer that stops answering is found by TCP keepalives within about
/// 30 s and a send that is never acknowledged fails after 30 s; no statement runs for more
/// than 5 minutes. A setting given in the connection URL (`options=-c name=value`) wins.
const WRITER_TIMEOUTS: [(&str, &str); 6] = [
    ("idle_in_transaction_session_timeout", "30s"),
    ("statement_timeout", "5min"),
    ("tcp_keepalives_idle", "15"),
    ("tcp_keepalives_interval", "5"),
    ("tcp_keepalives_count", "3"),
    ("tcp_user_timeout", "30000"),
];

/// `SET` statements for the [`WRITER_TIMEOUTS`] the URL's `options` do not set.
fn writer_timeouts(url_options: Option<&str>) -> String {
    WRITER_TIMEOUTS
        .iter()
        .filter(|(name, _)| !url_options.is_some_and(|o| o.contains(name)))
        .map(|(name, value)| format!("SET {name} = '{value}'; "))
        .collect()
}

/// How long a connecting writer waits for another session's sidecar lock.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// The PostgreSQL dialect's connections besides the writer.
pub struct Postgres {
    options: PgConnectOptions,
    readers: PgPool,
    /// Capture notifications; `None` for a store that only reads (`weft status`).
    listener: Mutex<Option<PgListener>>,
    /// Counts wake-ups: a change means "drain now".
    wakeups: AtomicI64,
}

fn options(url: &str) -> Result<PgConnectOptions, StoreError> {
    Ok(PgConnectOptions::from_str(url)?.application_name("weft"))
}

/// A lazily connected pool whose connections use weft's canonical session settings.
fn pool(options: &PgConnectOptions, size: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(10))
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::raw_sql(SESSION).execute(conn).await?;
                Ok(())
            })
        })
        .connect_lazy_with(options.clone())
}

impl Replica<Postgres> {
    /// Connects, takes the sidecar lock, installs weft's schema and triggers, and restores
    /// this node's sequence and clock.
    pub async fn open(
        url: &str,
        identity: Identity,
        tables: &[TableConfig],
        max_clock_skew: Duration,
    ) -> Result<Self, StoreError> {
        let options = options(url)?;
        let mut listener = PgListener::connect_with(&pool(&options, 1)).await?;
        listener.listen(schema::CHANNEL).await?;
        let backend = Postgres {
            readers: pool(&options, 4),
            listener: Mutex::new(Some(listener)),
            wakeups: AtomicI64::new(0),
            options,
        };
        Replica::open_with(backend, identity, tables, max_clock_skew).await
    }

    /// Reads the state of a database served by a running sidecar (for `weft status`),
    /// without its lock and without installing anything.
    pub async fn inspect(url: &str, identity: Identity) -> Result<Self, StoreError> {
        let options = options(url)?;
        let backend = Postgres {
            readers: pool(&options, 1),
            listener: Mutex::new(None),
            wakeups: AtomicI64::new(0),
            options,
        };
        Ok(Replica::reading(backend, identity))
    }
}

/// Connects the writer: session settings, durable commits, the sidecar lock.
async fn connect_once(options: &PgConnectOptions) -> Result<PgConnection, StoreError> {
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
    sqlx::raw_sql(AssertSqlSafe(writer_timeouts(options.get_options())))
        .execute(&mut conn)
        .await?;
    replica_role(&mut conn).await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext('weft.sidecar'))")
        .fetch_one(&mut conn)
        .await?;
    if locked {
        return Ok(conn);
    }
    let holder: Option<String> = sqlx::query_scalar(
        "SELECT a.application_name || ' (pid ' || a.pid || ', from ' || coalesce(a.client_addr::text, 'a local socket') || ')' \
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.objid = hashtext('weft.sidecar')::oid AND l.granted LIMIT 1",
    )
    .fetch_optional(&mut conn)
    .await
    .ok()
    .flatten();
    Err(StoreError::SidecarLocked {
        holder: holder.unwrap_or_else(|| "its session holds the weft.sidecar advisory lock".into()),
    })
}

/// Whether this session may run applies as a replica (`session_replication_role`), which
/// PostgreSQL's own logical replication does: the application's triggers, and the
/// foreign-key checks (which are triggers too), do not fire on applied writes. Replicated
/// rows were checked where they were written; checking them again here turns arrival
/// order into refusals (a child from one region before its parent from another) and lets
/// audit or `updated_at` triggers add and change rows that are then replicated twice. The
/// answer is kept in the session (`weft.replica_role`) for `apply::begin_apply`.
///
/// Setting it takes a superuser, or from PostgreSQL 15 `GRANT SET ON PARAMETER
/// session_replication_role TO <role>`; without it, weft says so and applies as an ordinary
/// session.
async fn replica_role(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::raw_sql("BEGIN").execute(&mut *conn).await?;
    let allowed = sqlx::raw_sql("SET LOCAL session_replication_role = replica")
        .execute(&mut *conn)
        .await;
    sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await?;
    match allowed {
        Ok(_) => {
            sqlx::raw_sql("SET weft.replica_role = 'on'")
                .execute(&mut *conn)
                .await?;
        }
        Err(error) => tracing::warn!(
            %error,
            "this database role may not set session_replication_role: application triggers and foreign-key \
             checks fire on applied writes (a child that arrives before its parent is dead-lettered and retried); \
             run `GRANT SET ON PARAMETER session_replication_role TO <weft's role>` (PostgreSQL 15+) or connect as \
             a superuser"
        ),
    }
    Ok(())
}

async fn node_value(conn: &mut PgConnection, name: &str) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar("SELECT value FROM weft.node WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?)
}

fn number(value: Option<String>, name: &str) -> Result<u64, StoreError> {
    value
        .unwrap_or_else(|| "0".into())
        .parse()
        .map_err(|_| StoreError::Corrupt(format!("weft.node {name} is not a number")))
}

impl Backend for Postgres {
    type Db = PgDb;
    type Table = PgTable;
    type Txn<'t> = txn::PgTxn<'t>;

    const NAME: &'static str = "PostgreSQL";
    const DRAIN_REPLY_LOST: &'static str = "pg-drain-reply-lost";
    const BEGIN: &'static str = "BEGIN";

    fn txn<'t>(&'t self, tables: &'t Tables<PgTable>, conn: &'t mut PgConnection) -> txn::PgTxn<'t> {
        txn::PgTxn::new(tables, conn)
    }

    async fn connect_writer(&self) -> Result<PgConnection, StoreError> {
        // The session of a sidecar that just died can outlive it briefly (until the server
        // notices the closed socket): wait a little for its lock before giving up.
        let started = std::time::Instant::now();
        loop {
            match connect_once(&self.options).await {
                Err(error @ StoreError::SidecarLocked { .. }) if started.elapsed() < LOCK_WAIT => {
                    if started.elapsed() < Duration::from_millis(300) {
                        tracing::warn!("{error}; waiting up to {LOCK_WAIT:?} in case it is a session that is ending");
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                other => return other,
            }
        }
    }

    async fn install(
        conn: &mut PgConnection,
        tables: &[TableConfig],
        region: &str,
    ) -> Result<Vec<PgTable>, StoreError> {
        schema::install(conn, tables, region).await
    }

    async fn node_record(conn: &mut PgConnection) -> Result<Option<NodeRecord>, StoreError> {
        let Some(node_id) = node_value(conn, "node_id").await? else {
            return Ok(None);
        };
        Ok(Some(NodeRecord {
            node_id,
            last_seq: number(node_value(conn, "last_seq").await?, "last_seq")?,
            hlc: number(node_value(conn, "hlc").await?, "hlc")?,
        }))
    }

    async fn create_node(conn: &mut PgConnection, node_id: &str) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO weft.node (name, value) VALUES ('node_id', $1), ('last_seq', '0'), ('hlc', '0')")
            .bind(node_id)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    async fn schema_stamp(conn: &mut PgConnection, tables: &[TableConfig]) -> Result<String, StoreError> {
        // A digest of the catalogue rows the descriptions and the capture depend on: each
        // table's identity, its live columns and types, and weft's triggers on it.
        let names: Vec<String> = tables
            .iter()
            .map(|t| format!("public.{}", schema::quote(&t.name)))
            .collect();
        let stamp: Option<String> = sqlx::query_scalar(
            "WITH t AS (SELECT to_regclass(n) AS oid, n FROM unnest($1::text[]) AS n) \
             SELECT md5(string_agg(x, ',' ORDER BY x)) FROM ( \
               SELECT t.n || '=' || coalesce(t.oid::oid::text, 'missing') AS x FROM t \
               UNION ALL \
               SELECT a.attrelid::text || ':' || a.attnum || ':' || a.attname || ':' || a.atttypid || ':' || a.atttypmod \
               FROM pg_attribute a JOIN t ON a.attrelid = t.oid WHERE a.attnum > 0 AND NOT a.attisdropped \
               UNION ALL \
               SELECT g.tgrelid::text || ':' || g.tgname || ':' || g.tgenabled::text \
               FROM pg_trigger g JOIN t ON g.tgrelid = t.oid WHERE g.tgname LIKE 'weft%' \
             ) s",
        )
        .bind(names)
        .fetch_one(&mut *conn)
        .await?;
        Ok(stamp.unwrap_or_default())
    }

    async fn may_have_changes(_conn: &mut PgConnection) -> Result<bool, StoreError> {
        // The drain's first statement lists the outbox, and a PostgreSQL transaction locks
        // nothing until it writes: a separate check would only cost a round trip.
        Ok(true)
    }

    async fn data_version(&self) -> Result<i64, StoreError> {
        Ok(self.wakeups.load(Ordering::Relaxed))
    }

    async fn wait_for_change(&self, poll: Duration) {
        // Notifications are lost while the listener reconnects; polling catches what they miss.
        let fallback = poll.max(Duration::from_secs(1));
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

    async fn read_log(&self, origin: &str, after: u64, limit: i64) -> Result<Vec<LogEntry>, StoreError> {
        metadata::read_log(&self.readers, origin, after, limit).await
    }

    async fn frontiers(&self) -> Result<BTreeMap<NodeId, u64>, StoreError> {
        metadata::frontiers(&self.readers).await
    }

    async fn log_high(&self, origin: &str) -> Result<u64, StoreError> {
        metadata::log_high(&self.readers, origin).await
    }

    async fn ack_connection(&self) -> Result<Option<sqlx::pool::PoolConnection<PgDb>>, StoreError> {
        Ok(Some(self.readers.acquire().await?))
    }

    async fn record_acks(conn: &mut PgConnection, acks: &[Ack]) -> Result<(), StoreError> {
        for ack in acks {
            sqlx::query(
                "INSERT INTO weft.acks (peer, origin, seq) VALUES ($1, $2, $3) \
                 ON CONFLICT (peer, origin) DO UPDATE SET seq = greatest(weft.acks.seq, excluded.seq)",
            )
            .bind(&ack.peer)
            .bind(&ack.origin)
            .bind(ack.seq as i64)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    async fn ack_floor(conn: &mut PgConnection, origin: &str, peers: &[NodeId]) -> Result<u64, StoreError> {
        let floor: Option<i64> = sqlx::query_scalar(
            "SELECT min(coalesce(a.seq, 0)) FROM unnest($2::text[]) p(peer) \
             LEFT JOIN weft.acks a ON a.peer = p.peer AND a.origin = $1",
        )
        .bind(origin)
        .bind(peers)
        .fetch_one(&mut *conn)
        .await?;
        Ok(floor.unwrap_or(0).max(0) as u64)
    }

    async fn trim_log(conn: &mut PgConnection, origin: &str, through: u64) -> Result<u64, StoreError> {
        metadata::trim_log(conn, origin, through).await
    }

    async fn retention_cutoffs(
        conn: &mut PgConnection,
        max_bytes: i64,
        before_micros: i64,
        kept: &std::collections::BTreeSet<String>,
    ) -> Result<BTreeMap<String, u64>, StoreError> {
        metadata::retention_cutoffs(conn, max_bytes, before_micros, kept).await
    }

    async fn begin_read(&self) -> Result<sqlx::Transaction<'static, PgDb>, StoreError> {
        let mut tx = self.readers.begin().await?;
        sqlx::raw_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    async fn counts(conn: &mut PgConnection) -> Result<Counts, StoreError> {
        let (outbox, log, dead, conflicts): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM weft.outbox), (SELECT count(*) FROM weft.log), \
             (SELECT count(*) FROM weft.dead_letters), (SELECT count(*) FROM weft.conflicts)",
        )
        .fetch_one(&mut *conn)
        .await?;
        Ok(Counts {
            last_seq: number(node_value(conn, "last_seq").await?, "last_seq")?,
            outbox_pending: outbox as u64,
            log_events: log as u64,
            dead_letters: dead as u64,
            conflicts: conflicts as u64,
        })
    }

    async fn frontier_status(conn: &mut PgConnection) -> Result<Vec<FrontierStatus>, StoreError> {
        metadata::frontier_status(conn).await
    }

    async fn note_behind_log(
        conn: &mut PgConnection,
        peer: &str,
        origin: &str,
        note: Option<&str>,
    ) -> Result<(), StoreError> {
        metadata::note_behind_log(conn, peer, origin, note).await
    }

    async fn backlog(conn: &mut PgConnection, peer: &str, origin: &str) -> Result<PeerStatus, StoreError> {
        metadata::backlog(conn, peer, origin).await
    }

    async fn breakdown(conn: &mut PgConnection) -> Result<crate::store::Breakdown, StoreError> {
        metadata::breakdown(conn).await
    }

    async fn close(self) {
        self.readers.close().await;
    }
}

/// A pool for tools working on the database beside the sidecar (`weft conflicts`,
/// `weft ownership`), with weft's canonical session settings.
pub fn app_pool(url: &str) -> Result<PgPool, StoreError> {
    Ok(pool(&options(url)?, 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_timeouts_leave_what_the_url_sets_to_the_url() {
        let all = writer_timeouts(None);
        assert!(
            all.contains("SET idle_in_transaction_session_timeout = '30s';"),
            "{all}"
        );
        assert!(all.contains("SET tcp_user_timeout = '30000';"), "{all}");
        let some = writer_timeouts(Some("-c statement_timeout=1h"));
        assert!(!some.contains("statement_timeout = "), "{some}");
        assert!(some.contains("idle_in_transaction_session_timeout"), "{some}");
    }
}
