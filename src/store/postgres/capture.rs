//! PostgreSQL capture and metadata IO: the outbox, row versions, the log, frontiers and the
//! node record.
//!
//! A drain first lists the outbox ids visible now, in one statement: that snapshot holds
//! whole committed transactions only, never part of one. A transaction that took an earlier
//! id but commits later (the classic outbox gap) is simply not in this list; its rows stay
//! in the outbox and the next drain takes them, because drained rows are deleted rather than
//! passed by a cursor. Every outbox row carries the row's image from its own transaction, so
//! reading the images later in the drain sees exactly those versions. Everything a drain or
//! an applied run records besides the rows goes out in one statement (`write_meta`).
use std::collections::HashMap;

use sqlx::{AssertSqlSafe, PgConnection, Row as _};

use super::schema::PgTable;
use crate::event::{Key, Row};
use crate::replicate::RowVersion;
use crate::store::StoreError;
use crate::store::backend::{Captured, Meta, Tables};
use crate::store::metadata::stored_version;
use crate::wire;

/// Which outbox rows a drain took: their ids.
#[derive(Default)]
pub(super) struct Taken(Vec<i64>);

impl Taken {
    /// Only the rows up to `last_id` (every id listed is of a committed row).
    pub(super) fn through(&mut self, last_id: i64, _changes: u64) {
        self.0.retain(|id| *id <= last_id);
    }
}

/// The first `limit` outbox rows visible now (of replicated tables, with their images), and
/// the ids taken; `None` if the outbox is empty.
pub(super) async fn take_outbox(
    conn: &mut PgConnection,
    tables: &Tables<PgTable>,
    limit: i64,
) -> Result<Option<(Vec<Captured<PgTable>>, Taken)>, StoreError> {
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM weft.outbox ORDER BY id LIMIT $1")
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
    if ids.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::new();
    for table in tables.values() {
        // An image captured before a column was added lacks it: the event leaves it out, so
        // receivers keep their own value (the column's default) instead of getting NULL.
        let sql = format!(
            "SELECT o.id, o.at, o.deleted, \
             CASE WHEN o.image ?& $3 THEN NULL ELSE ARRAY(SELECT jsonb_object_keys(o.image)) END, {} \
             FROM unnest($2::int8[]) AS s(id) \
             JOIN weft.outbox o ON o.id = s.id \
             CROSS JOIN LATERAL jsonb_populate_record(NULL::{}, o.image) r \
             WHERE o.tbl = $1 ORDER BY o.id",
            table.select_list("r"),
            table.qualified()
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(&table.name)
            .bind(&ids)
            .bind(&table.columns)
            .fetch_all(&mut *conn)
            .await?;
        for row in &rows {
            let deleted: bool = row.try_get(2)?;
            let present: Option<Vec<String>> = row.try_get(3)?;
            let mut image = read_image(table, row, 4)?;
            let key = Key(table.key_index.iter().map(|&i| image.0[i].1.clone()).collect());
            if let Some(present) = present {
                image.0.retain(|(c, _)| present.contains(c) || table.key.contains(c));
            }
            out.push(Captured {
                table: table.clone(),
                id: row.try_get(0)?,
                committed_at: row.try_get(1)?,
                key,
                image: (!deleted).then_some(image),
            });
        }
    }
    if out.len() < ids.len() {
        tracing::warn!(
            orphans = ids.len() - out.len(),
            "dropping outbox rows of tables no longer replicated"
        );
    }
    Ok(Some((out, Taken(ids))))
}

/// The stored versions of `keys` of one table; absent keys are missing from the map.
pub(super) async fn load_versions(
    conn: &mut PgConnection,
    table: &str,
    keys: &[Vec<u8>],
) -> Result<HashMap<Vec<u8>, RowVersion>, StoreError> {
    let rows = sqlx::query(
        "SELECT r.key, r.version, r.hlc, r.origin, r.deleted, r.image_sum FROM unnest($2::bytea[]) AS k(key) \
         JOIN weft.rows r ON r.tbl = $1 AND r.key = k.key",
    )
    .bind(table)
    .bind(keys)
    .fetch_all(&mut *conn)
    .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for row in rows {
        let version: String = row.try_get(1)?;
        let flags = (row.try_get(4)?, row.try_get(5)?);
        let stored = stored_version(table, &version, row.try_get(2)?, row.try_get(3)?, flags)?;
        out.insert(row.try_get::<Vec<u8>, _>(0)?, stored);
    }
    Ok(out)
}

/// Writes what `meta` lists, deleting the outbox rows `drained`, in one statement
/// (data-modifying CTEs), so a transaction costs few round trips.
pub(super) async fn write_meta(
    conn: &mut PgConnection,
    meta: Meta<'_>,
    taken: Option<Taken>,
) -> Result<(), StoreError> {
    let drained = taken.unwrap_or_default().0;
    let mut last: HashMap<(&str, &[u8]), usize> = HashMap::new();
    for (i, (table, key, _)) in meta.versions.iter().enumerate() {
        last.insert((*table, *key), i);
    }
    let mut order: Vec<usize> = last.into_values().collect();
    order.sort_unstable();
    let v = |i: &usize| &meta.versions[*i];
    // Joins, not `= ANY`, for the outbox: a backlog of many ids must stay linear.
    sqlx::query(
        "WITH v AS (INSERT INTO weft.rows (tbl, key, version, hlc, origin, deleted, image_sum) \
              SELECT * FROM unnest($1::text[], $2::bytea[], $3::text[], $4::int8[], $5::text[], $6::bool[], \
              $18::int8[]) \
              ON CONFLICT (tbl, key) DO UPDATE SET version = excluded.version, hlc = excluded.hlc, \
              origin = excluded.origin, deleted = excluded.deleted, image_sum = excluded.image_sum), \
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
    .bind(&drained)
    .bind((meta.hlc as i64).to_string())
    .bind(meta.last_seq.map(|s| s.to_string()))
    .bind(
        order
            .iter()
            .map(|i| v(i).2.image.filter(|_| !v(i).2.deleted))
            .collect::<Vec<_>>(),
    )
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
