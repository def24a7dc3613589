//! The SQLite dialect: the embedded default.
//!
//! The application and the sidecar share one database file in WAL mode. SQLite has a single
//! writer, so every weft write goes through the one writer connection, in short
//! `BEGIN IMMEDIATE` transactions, with a busy timeout: the application is never locked out
//! for longer than one batch, and weft waits (never fails) while the application writes.
//! Acknowledgements go through the writer too. Commits use `synchronous = FULL`: an
//! acknowledged event survives power loss. Reads (log, frontiers, status) use a small
//! read-only pool; `PRAGMA data_version` on a connection of its own says when another
//! connection committed.
mod admin;
mod apply;
mod capture;
mod metadata;
pub mod schema;
mod strategy;
mod txn;
pub mod values;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{
    Sqlite as SqliteDb, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection as _, Row as _, SqliteConnection};
use tokio::sync::Mutex;

use crate::config::TableConfig;
use crate::event::{Identity, NodeId};
use crate::store::backend::{Ack, Backend, Counts, FrontierStatus, NodeRecord, Tables};
use crate::store::replica::Replica;
use crate::store::{LogEntry, PeerStatus, StoreError};
pub use schema::TableInfo;

/// A SQLite region's store.
pub type SqliteStore = Replica<Sqlite>;

/// The SQLite dialect's connections besides the writer.
pub struct Sqlite {
    path: std::path::PathBuf,
    readers: SqlitePool,
    /// Asks `PRAGMA data_version`, which changes only for commits of other connections.
    poller: Mutex<Option<SqliteConnection>>,
    /// The sidecar's lock on `<database>-weft.lock`, held while the store lives: one sidecar
    /// per database file (two would number their events from the same counter).
    _sidecar: Option<std::fs::File>,
}

/// Takes the sidecar lock of the database at `path` (see `Sqlite::_sidecar`), writing this
/// process's id into the lock file for the next one's error message.
fn sidecar_lock(path: &Path) -> Result<std::fs::File, StoreError> {
    use std::io::{Read as _, Seek as _, Write as _};
    let lock_path = std::path::PathBuf::from(format!("{}-weft.lock", path.display()));
    let io = |e: std::io::Error| {
        StoreError::Refused(format!(
            "cannot take the sidecar lock {}: {e}; the sidecar needs to write beside the database",
            lock_path.display()
        ))
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(StoreError::SidecarLocked {
                holder: format!("{}, {}", holder.trim(), lock_path.display()),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    write!(file, "pid {}", std::process::id()).map_err(io)?;
    Ok(file)
}

/// The oldest SQLite an application may open a weft database with: every trigger, index and
/// table weft writes parses and runs there (`tests/old_sqlite.rs` runs them in 3.34.1).
pub const OLDEST_APPLICATION_SQLITE: u32 = 3_034_000;

/// `3034001` as `3.34.1`.
fn version_text(number: u32) -> String {
    format!("{}.{}.{}", number / 1_000_000, number / 1_000 % 1_000, number % 1_000)
}

/// Refuses a database whose header says a SQLite older than [`OLDEST_APPLICATION_SQLITE`]
/// wrote it last: that is the application's library (weft has not written it yet, or the
/// application wrote after it), and it could not read the schema weft is about to write,
/// so starting would lock the application out of its own database.
fn check_last_writer(path: &Path) -> Result<(), StoreError> {
    use std::io::Read as _;
    let mut header = [0u8; 100];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut header));
    // A new or empty file has no writer yet; one that is not SQLite fails later, saying so.
    if read.is_err() || !header.starts_with(b"SQLite format 3\0") {
        return Ok(());
    }
    let writer = u32::from_be_bytes([header[96], header[97], header[98], header[99]]);
    if writer == 0 || writer >= OLDEST_APPLICATION_SQLITE {
        return Ok(());
    }
    Err(StoreError::Refused(format!(
        "{}: this database was last written by SQLite {}, and the capture triggers weft installs need SQLite {} or newer \
         in every program that opens the database (older ones could no longer read its schema); upgrade the \
         application's SQLite library (Debian 11, Ubuntu 22.04 and later ship a newer one), then start weft again; \
         nothing was written",
        path.display(),
        version_text(writer),
        version_text(OLDEST_APPLICATION_SQLITE).trim_end_matches(".0"),
    )))
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

async fn node_value(conn: &mut SqliteConnection, name: &str) -> Result<Option<sqlx::sqlite::SqliteRow>, StoreError> {
    Ok(sqlx::query("SELECT value FROM _weft_node WHERE name = ?")
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?)
}

async fn node_number(conn: &mut SqliteConnection, name: &str) -> Result<u64, StoreError> {
    Ok(match node_value(conn, name).await? {
        Some(row) => row.try_get::<i64, _>(0)? as u64,
        None => 0,
    })
}

async fn count(conn: &mut SqliteConnection, sql: &'static str) -> Result<u64, StoreError> {
    Ok(sqlx::query_scalar::<_, i64>(sql).fetch_one(&mut *conn).await? as u64)
}

impl Replica<Sqlite> {
    /// Opens (creating if needed) the database, installs weft's schema and triggers, and
    /// restores this node's sequence and clock.
    pub async fn open(
        path: &Path,
        identity: Identity,
        tables: &[TableConfig],
        max_clock_skew: Duration,
    ) -> Result<Self, StoreError> {
        check_last_writer(path)?;
        let backend = Sqlite {
            _sidecar: Some(sidecar_lock(path)?),
            ..Sqlite::lazy(path)
        };
        Replica::open_with(backend, identity, tables, max_clock_skew).await
    }
}

impl Replica<Sqlite> {
    /// Reads the state of a database a sidecar serves (for `weft status`), beside it: without
    /// its lock, installing nothing.
    pub async fn inspect(path: &Path, identity: Identity) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::NotInstalled(format!(
                "{}: no database there; is this the node's config?",
                path.display()
            )));
        }
        let backend = Sqlite::lazy(path);
        let installed: i64 = sqlx::query_scalar("SELECT count(*) FROM sqlite_master WHERE name = '_weft_node'")
            .fetch_one(&backend.readers)
            .await?;
        if installed == 0 {
            return Err(StoreError::NotInstalled(format!(
                "{}: weft is not installed in this database yet; start the node's sidecar (weft run) once",
                path.display()
            )));
        }
        Ok(Replica::reading(backend, identity))
    }
}

impl Sqlite {
    /// Read-only connections open lazily: the writer creates the file and the schema first.
    fn lazy(path: &Path) -> Self {
        Sqlite {
            path: path.to_owned(),
            readers: SqlitePoolOptions::new()
                .max_connections(4)
                .connect_lazy_with(options(path).read_only(true)),
            poller: Mutex::new(None),
            _sidecar: None,
        }
    }
}

impl Backend for Sqlite {
    type Db = SqliteDb;
    type Table = TableInfo;
    type Txn<'t> = txn::SqliteTxn<'t>;

    const NAME: &'static str = "SQLite";
    const DRAIN_REPLY_LOST: &'static str = "sqlite-drain-reply-lost";
    const BEGIN: &'static str = "BEGIN IMMEDIATE";

    fn txn<'t>(&'t self, tables: &'t Tables<TableInfo>, conn: &'t mut SqliteConnection) -> txn::SqliteTxn<'t> {
        txn::SqliteTxn::new(tables, conn)
    }

    async fn connect_writer(&self) -> Result<SqliteConnection, StoreError> {
        Ok(SqliteConnection::connect_with(&options(&self.path)).await?)
    }

    async fn install(
        conn: &mut SqliteConnection,
        tables: &[TableConfig],
        region: &str,
    ) -> Result<Vec<TableInfo>, StoreError> {
        schema::install(conn, tables, region).await
    }

    async fn node_record(conn: &mut SqliteConnection) -> Result<Option<NodeRecord>, StoreError> {
        let Some(node) = node_value(conn, "node_id").await? else {
            return Ok(None);
        };
        Ok(Some(NodeRecord {
            node_id: node.try_get(0)?,
            last_seq: node_number(conn, "last_seq").await?,
            hlc: node_number(conn, "hlc").await?,
        }))
    }

    async fn create_node(conn: &mut SqliteConnection, node_id: &str) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO _weft_node (name, value) VALUES ('node_id', ?), ('last_seq', 0), ('hlc', 0)")
            .bind(node_id)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    async fn schema_stamp(conn: &mut SqliteConnection, _tables: &[TableConfig]) -> Result<String, StoreError> {
        // Bumped by every schema change of the database, committed by any connection.
        let version: i64 = sqlx::query_scalar("PRAGMA schema_version")
            .fetch_one(&mut *conn)
            .await?;
        Ok(version.to_string())
    }

    async fn may_have_changes(conn: &mut SqliteConnection) -> Result<bool, StoreError> {
        // Checked before `BEGIN IMMEDIATE`, so an idle drain never takes the write lock.
        Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM _weft_outbox)")
            .fetch_one(&mut *conn)
            .await?)
    }

    async fn data_version(&self) -> Result<i64, StoreError> {
        let mut poller = self.poller.lock().await;
        if poller.is_none() {
            *poller = Some(SqliteConnection::connect_with(&options(&self.path).read_only(true)).await?);
        }
        let conn = poller.as_mut().expect("connected above");
        let version: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe("PRAGMA data_version"))
            .fetch_one(&mut *conn)
            .await?;
        Ok(version)
    }

    async fn wait_for_change(&self, poll: Duration) {
        tokio::time::sleep(poll).await;
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

    async fn ack_connection(&self) -> Result<Option<sqlx::pool::PoolConnection<SqliteDb>>, StoreError> {
        Ok(None)
    }

    async fn record_acks(conn: &mut SqliteConnection, acks: &[Ack]) -> Result<(), StoreError> {
        for ack in acks {
            sqlx::query(
                "INSERT INTO _weft_acks (peer, origin, seq) VALUES (?, ?, ?) \
                 ON CONFLICT (peer, origin) DO UPDATE SET seq = max(seq, excluded.seq)",
            )
            .bind(&ack.peer)
            .bind(&ack.origin)
            .bind(ack.seq as i64)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    async fn ack_floor(conn: &mut SqliteConnection, origin: &str, peers: &[NodeId]) -> Result<u64, StoreError> {
        let mut floor = u64::MAX;
        for peer in peers {
            let acked: Option<i64> = sqlx::query_scalar("SELECT seq FROM _weft_acks WHERE peer = ? AND origin = ?")
                .bind(peer)
                .bind(origin)
                .fetch_optional(&mut *conn)
                .await?;
            floor = floor.min(acked.unwrap_or(0) as u64);
        }
        Ok(if floor == u64::MAX { 0 } else { floor })
    }

    async fn trim_log(conn: &mut SqliteConnection, origin: &str, through: u64) -> Result<u64, StoreError> {
        metadata::trim_log(conn, origin, through).await
    }

    async fn retention_cutoffs(
        conn: &mut SqliteConnection,
        max_bytes: i64,
        before_micros: i64,
        kept: &std::collections::BTreeSet<String>,
    ) -> Result<BTreeMap<String, u64>, StoreError> {
        metadata::retention_cutoffs(conn, max_bytes, before_micros, kept).await
    }

    async fn begin_read(&self) -> Result<sqlx::Transaction<'static, SqliteDb>, StoreError> {
        Ok(self.readers.begin().await?)
    }

    async fn counts(conn: &mut SqliteConnection) -> Result<Counts, StoreError> {
        Ok(Counts {
            last_seq: Self::node_record(conn).await?.map_or(0, |r| r.last_seq),
            outbox_pending: count(conn, "SELECT count(*) FROM _weft_outbox").await?,
            log_events: count(conn, "SELECT count(*) FROM _weft_log").await?,
            dead_letters: count(conn, "SELECT count(*) FROM _weft_dead_letters").await?,
            conflicts: count(conn, "SELECT count(*) FROM _weft_conflicts").await?,
        })
    }

    async fn frontier_status(conn: &mut SqliteConnection) -> Result<Vec<FrontierStatus>, StoreError> {
        metadata::frontier_status(conn).await
    }

    async fn note_behind_log(
        conn: &mut SqliteConnection,
        peer: &str,
        origin: &str,
        note: Option<&str>,
    ) -> Result<(), StoreError> {
        metadata::note_behind_log(conn, peer, origin, note).await
    }

    async fn backlog(conn: &mut SqliteConnection, peer: &str, origin: &str) -> Result<PeerStatus, StoreError> {
        metadata::backlog(conn, peer, origin).await
    }

    async fn breakdown(conn: &mut SqliteConnection) -> Result<crate::store::Breakdown, StoreError> {
        metadata::breakdown(conn).await
    }

    async fn close(self) {
        self.readers.close().await;
        if let Some(poller) = self.poller.into_inner() {
            let _ = poller.close().await;
        }
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
