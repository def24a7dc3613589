//! Capture on PostgreSQL: turning committed outbox rows into events.
//!
//! The drain first lists the outbox ids visible now, in one statement: that snapshot holds
//! whole committed transactions only, never part of one. A transaction that took an earlier
//! id but commits later (the classic outbox gap) is simply not in this list; its rows stay
//! in the outbox and the next drain takes them, because drained rows are deleted rather than
//! passed by a cursor. Every outbox row carries the row's image from its own transaction, so
//! reading the images later in the drain sees exactly those versions. Several changes to one
//! row coalesce into the last one. Seq, HLC, version vector, row metadata, log append and
//! outbox delete commit together, as on SQLite.
use std::collections::HashMap;
use std::sync::Arc;

use sqlx::{AssertSqlSafe, PgConnection, Row as _};

use super::PgStore;
use super::rows::PgRows;
use super::schema::PgTable;
use crate::config::Strategy;
use crate::event::{Event, Hlc, Key, Row};
use crate::replicate::RowVersion;
use crate::store::{DrainReport, StoreError};
use crate::version::VersionVector;
use crate::wire;

struct Pending {
    table: Arc<PgTable>,
    key: Key,
    key_bytes: Vec<u8>,
    committed_at: i64,
    last_id: i64,
    /// The row's last image; `None` if its last change deleted it.
    image: Option<Row>,
}

/// The stored versions of `keys` of one table; absent keys are missing from the map.
pub(super) async fn load_versions(
    conn: &mut PgConnection,
    table: &str,
    keys: &[Vec<u8>],
) -> Result<HashMap<Vec<u8>, RowVersion>, StoreError> {
    let rows = sqlx::query(
        "SELECT r.key, r.version, r.hlc, r.origin, r.deleted FROM unnest($2::bytea[]) AS k(key) \
         JOIN weft.rows r ON r.tbl = $1 AND r.key = k.key",
    )
    .bind(table)
    .bind(keys)
    .fetch_all(&mut *conn)
    .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for row in rows {
        let version: String = row.try_get(1)?;
        out.insert(
            row.try_get::<Vec<u8>, _>(0)?,
            RowVersion {
                version: VersionVector::from_json(&version)
                    .map_err(|e| StoreError::Corrupt(format!("version of a {table} row: {e}")))?,
                hlc: Hlc(row.try_get::<i64, _>(2)? as u64),
                origin: row.try_get(3)?,
                deleted: row.try_get(4)?,
            },
        );
    }
    Ok(out)
}

/// Everything a drain or an applied run records besides the rows themselves, written in one
/// statement (data-modifying CTEs), so a transaction costs few round trips.
#[derive(Default)]
pub(super) struct Meta<'a> {
    /// Row versions; a key listed twice keeps its last version.
    pub versions: Vec<(&'a str, &'a [u8], &'a RowVersion)>,
    pub log: Vec<&'a Event>,
    /// (origin, seq, processed) of frontiers that moved.
    pub frontiers: Vec<(&'a str, u64, u64)>,
    /// Outbox rows drained.
    pub drained: &'a [i64],
    /// The new last own seq, if it moved.
    pub last_seq: Option<u64>,
    /// The clock's high-water mark, persisted with the events it stamped.
    pub hlc: u64,
}

pub(super) async fn write_meta(conn: &mut PgConnection, meta: Meta<'_>) -> Result<(), StoreError> {
    let mut last: HashMap<(&str, &[u8]), usize> = HashMap::new();
    for (i, (table, key, _)) in meta.versions.iter().enumerate() {
        last.insert((*table, *key), i);
    }
    let mut order: Vec<usize> = last.into_values().collect();
    order.sort_unstable();
    let v = |i: &usize| &meta.versions[*i];
    // Joins, not `= ANY`, for the outbox: a backlog of many ids must stay linear.
    sqlx::query(
        "WITH v AS (INSERT INTO weft.rows (tbl, key, version, hlc, origin, deleted) \
              SELECT * FROM unnest($1::text[], $2::bytea[], $3::text[], $4::int8[], $5::text[], $6::bool[]) \
              ON CONFLICT (tbl, key) DO UPDATE SET version = excluded.version, hlc = excluded.hlc, \
              origin = excluded.origin, deleted = excluded.deleted), \
         l AS (INSERT INTO weft.log (origin, seq, batch_end, committed_at, event) \
              SELECT * FROM unnest($7::text[], $8::int8[], $9::int8[], $10::int8[], $11::bytea[])), \
         f AS (INSERT INTO weft.frontier (origin, seq, processed) \
              SELECT * FROM unnest($12::text[], $13::int8[], $14::int8[]) \
              ON CONFLICT (origin) DO UPDATE SET seq = excluded.seq, processed = excluded.processed), \
         d AS (DELETE FROM weft.outbox o USING unnest($15::int8[]) AS s(id) WHERE o.id = s.id), \
         n AS (UPDATE weft.node SET value = CASE name WHEN 'hlc' THEN $16 ELSE coalesce($17, value) END \
              WHERE name IN ('hlc', 'last_seq')) \
         SELECT 1",
    )
    .bind(order.iter().map(|i| v(i).0).collect::<Vec<_>>())
    .bind(order.iter().map(|i| v(i).1).collect::<Vec<_>>())
    .bind(order.iter().map(|i| v(i).2.version.to_json()).collect::<Vec<_>>())
    .bind(order.iter().map(|i| v(i).2.hlc.0 as i64).collect::<Vec<_>>())
    .bind(order.iter().map(|i| v(i).2.origin.as_str()).collect::<Vec<_>>())
    .bind(order.iter().map(|i| v(i).2.deleted).collect::<Vec<_>>())
    .bind(meta.log.iter().map(|e| e.origin.as_str()).collect::<Vec<_>>())
    .bind(meta.log.iter().map(|e| e.seq as i64).collect::<Vec<_>>())
    .bind(meta.log.iter().map(|e| e.batch_end as i64).collect::<Vec<_>>())
    .bind(meta.log.iter().map(|e| e.committed_at_micros).collect::<Vec<_>>())
    .bind(meta.log.iter().map(|e| wire::encode_event(e)).collect::<Vec<_>>())
    .bind(meta.frontiers.iter().map(|f| f.0).collect::<Vec<_>>())
    .bind(meta.frontiers.iter().map(|f| f.1 as i64).collect::<Vec<_>>())
    .bind(meta.frontiers.iter().map(|f| f.2 as i64).collect::<Vec<_>>())
    .bind(meta.drained)
    .bind((meta.hlc as i64).to_string())
    .bind(meta.last_seq.map(|s| s.to_string()))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Reads a row's values (as selected by `PgTable::select_list`) starting at column `first`.
pub(super) fn read_image(table: &PgTable, row: &sqlx::postgres::PgRow, first: usize) -> Result<Row, sqlx::Error> {
    let mut columns = Vec::with_capacity(table.columns.len());
    for (j, (name, kind)) in table.columns.iter().zip(&table.kinds).enumerate() {
        columns.push((name.clone(), kind.read(row, first + j)?));
    }
    Ok(Row(columns))
}

impl PgStore {
    /// Drains the outbox into the log in its own transaction.
    pub async fn drain(&self) -> Result<DrainReport, StoreError> {
        self.with_writer(async |store: &Self, conn: &mut PgConnection, last_seq: &mut u64| {
            let started = std::time::Instant::now();
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            let report = store.drain_in(&mut tx, *last_seq).await?;
            tx.commit().await?;
            if report.events > 0 && crate::crashpoint::reply_lost("pg-drain-reply-lost") {
                return Err(StoreError::Busy("failpoint: the drain's commit reply was lost".into()));
            }
            tracing::debug!(
                events = report.events,
                ms = started.elapsed().as_secs_f64() * 1e3,
                "drained"
            );
            *last_seq = report.last_seq;
            Ok(report)
        })
        .await
    }

    /// The drain, inside the caller's transaction. The caller adopts `report.last_seq`
    /// only once that transaction commits.
    pub(super) async fn drain_in(&self, tx: &mut PgConnection, last_seq: u64) -> Result<DrainReport, StoreError> {
        let unchanged = DrainReport { events: 0, last_seq };
        let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM weft.outbox ORDER BY id")
            .fetch_all(&mut *tx)
            .await?;
        if ids.is_empty() {
            return Ok(unchanged);
        }
        let mut pending: Vec<Pending> = Vec::new();
        let mut index: HashMap<(&str, Vec<u8>), usize> = HashMap::new();
        let mut matched = 0usize;
        for table in self.tables.values() {
            let sql = format!(
                "SELECT o.id, o.at, o.deleted, {} FROM unnest($2::int8[]) AS s(id) \
                 JOIN weft.outbox o ON o.id = s.id \
                 CROSS JOIN LATERAL jsonb_populate_record(NULL::{}, o.image) r \
                 WHERE o.tbl = $1 ORDER BY o.id",
                table.select_list("r"),
                table.qualified()
            );
            let rows = sqlx::query(AssertSqlSafe(sql))
                .bind(&table.name)
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?;
            matched += rows.len();
            for row in &rows {
                let id: i64 = row.try_get(0)?;
                let committed_at: i64 = row.try_get(1)?;
                let deleted: bool = row.try_get(2)?;
                let image = read_image(table, row, 3)?;
                let key = Key(table.key_index.iter().map(|&i| image.0[i].1.clone()).collect());
                let key_bytes = key.to_bytes();
                let image = (!deleted).then_some(image);
                match index.get(&(table.name.as_str(), key_bytes.clone())) {
                    Some(&i) => {
                        let p = &mut pending[i];
                        p.committed_at = p.committed_at.max(committed_at);
                        p.last_id = id;
                        p.image = image;
                    }
                    None => {
                        index.insert((table.name.as_str(), key_bytes.clone()), pending.len());
                        pending.push(Pending {
                            table: table.clone(),
                            key,
                            key_bytes,
                            committed_at,
                            last_id: id,
                            image,
                        });
                    }
                }
            }
        }
        if matched < ids.len() {
            tracing::warn!(
                orphans = ids.len() - matched,
                "dropping outbox rows of tables no longer replicated"
            );
        }
        pending.sort_by_key(|p| p.last_id);

        let mut local: HashMap<&str, HashMap<Vec<u8>, RowVersion>> = HashMap::new();
        for table in self.tables.values() {
            let keys: Vec<Vec<u8>> = pending
                .iter()
                .filter(|p| p.table.name == table.name)
                .map(|p| p.key_bytes.clone())
                .collect();
            if !keys.is_empty() {
                local.insert(table.name.as_str(), load_versions(tx, &table.name, &keys).await?);
            }
        }
        let changes = pending.into_iter().map(|p| crate::store::admit::LocalChange {
            previous: local.get(p.table.name.as_str()).and_then(|m| m.get(&p.key_bytes)),
            table: p.table.name.clone(),
            key: p.key,
            key_bytes: p.key_bytes,
            image: p.image,
            committed_at: p.committed_at,
        });
        let mut events = crate::store::admit::local_events(&self.identity, &self.clock, last_seq, changes);
        // CRDT states, owners and queue entries of the tables that have them.
        let mut untouched = std::collections::HashSet::new();
        for (key_bytes, event) in events.iter_mut() {
            if let Some(table) = self.tables.get(&event.table).filter(|t| t.strategy != Strategy::Lww) {
                let mut rows = PgRows::new(self, tx, &mut untouched);
                crate::store::engine::settle_local(&mut rows, &self.identity, table, key_bytes, event, false).await?;
            }
        }
        let batch_end = last_seq + events.len() as u64;
        let versions: Vec<RowVersion> = events.iter().map(|(_, e)| RowVersion::of_event(e)).collect();
        write_meta(
            tx,
            Meta {
                versions: events
                    .iter()
                    .zip(&versions)
                    .map(|((key, event), version)| (event.table.as_str(), key.as_slice(), version))
                    .collect(),
                log: events.iter().map(|(_, e)| e).collect(),
                drained: &ids,
                last_seq: Some(batch_end),
                hlc: self.clock.last().0,
                ..Meta::default()
            },
        )
        .await?;
        Ok(DrainReport {
            events: events.len() as u64,
            last_seq: batch_end,
        })
    }
}
