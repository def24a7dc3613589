//! Canonical renderings of what a region holds, for convergence checks across regions of
//! either store: every replicated table's rows in key order plus weft's row metadata, and the
//! capture/apply progress (last own seq, outbox pending, frontiers) read in one snapshot.
//! Two regions have converged when their renderings are equal. Tombstones are left out of
//! the metadata: regions purge them each on its own time (`store::gc`), and a deleted row is
//! absent from the table either way.
use std::collections::BTreeMap;

use sqlx::{Connection as _, PgPool, Row as _, SqlitePool};

use crate::event::NodeId;
use crate::store::backend::Backend;
use crate::store::{StoreError, postgres, sqlite};

/// Everything replicated in a database, rendered canonically: per table its rows in key
/// order, and weft's per-row metadata. Two regions have converged when their snapshots are
/// equal.
pub async fn sqlite_rendering(
    pool: &SqlitePool,
    tables: &[String],
) -> Result<BTreeMap<String, Vec<String>>, StoreError> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    let mut out = BTreeMap::new();
    for table in tables {
        let info = sqlite::schema::describe(&mut tx, table).await?;
        let order = info
            .key
            .iter()
            .map(|k| sqlite::schema::quote(k))
            .collect::<Vec<_>>()
            .join(", ");
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT * FROM {} ORDER BY {order}",
            sqlite::schema::quote(table)
        )))
        // Not cached: a cached `SELECT *` keeps the column count it was prepared with, and
        // after a column is dropped sqlx would read past the row's values.
        .persistent(false)
        .fetch_all(&mut *tx)
        .await?;
        let mut rendered = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut values = Vec::with_capacity(row.len());
            for i in 0..row.len() {
                values.push(sqlite::values::value_at(row, i)?.to_string());
            }
            rendered.push(values.join(" | "));
        }
        out.insert(table.clone(), rendered);
    }
    let meta = sqlx::query_as(
        "SELECT tbl, hex(key), version, hlc, origin, deleted FROM _weft_rows WHERE NOT deleted ORDER BY tbl, key",
    )
    .fetch_all(&mut *tx)
    .await?;
    out.insert("_weft_rows".into(), render_row_metadata(meta));
    tx.commit().await?;
    Ok(out)
}

/// What a region has captured and applied, read from its database: (last own seq,
/// outbox rows pending, plus one while it joins by snapshot, frontier per origin).
pub async fn sqlite_progress(pool: &SqlitePool) -> Result<(u64, u64, BTreeMap<NodeId, u64>), StoreError> {
    // One read transaction: a drain committing between two of these reads would otherwise
    // show an old last seq next to an empty outbox, and look caught up.
    let mut conn = pool.begin().await?;
    let last: Option<i64> = sqlx::query_scalar("SELECT value FROM _weft_node WHERE name = 'last_seq'")
        .fetch_optional(&mut *conn)
        .await?;
    // A region joining by snapshot has rows still to come: it counts as one pending change.
    let pending: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM _weft_outbox) + (SELECT count(*) FROM _weft_node WHERE name = 'join')",
    )
    .fetch_one(&mut *conn)
    .await?;
    let rows = sqlx::query("SELECT origin, seq FROM _weft_frontier")
        .fetch_all(&mut *conn)
        .await?;
    let mut frontiers = BTreeMap::new();
    for row in rows {
        frontiers.insert(row.try_get(0)?, row.try_get::<i64, _>(1)? as u64);
    }
    conn.commit().await?;
    Ok((last.unwrap_or(0) as u64, pending as u64, frontiers))
}

/// What a region has captured and applied, read in one snapshot: (last own seq, outbox
/// rows pending, plus one while it joins by snapshot, frontier per origin).
pub async fn postgres_progress(pool: &PgPool) -> Result<(u64, u64, BTreeMap<NodeId, u64>), StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::raw_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let last = <postgres::Postgres as Backend>::node_record(&mut tx)
        .await?
        .map_or(0, |r| r.last_seq);
    let pending: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM weft.outbox) + (SELECT count(*) FROM weft.node WHERE name = 'join')",
    )
    .fetch_one(&mut *tx)
    .await?;
    let mut frontiers = BTreeMap::new();
    for row in sqlx::query("SELECT origin, seq FROM weft.frontier")
        .fetch_all(&mut *tx)
        .await?
    {
        frontiers.insert(row.try_get(0)?, row.try_get::<i64, _>(1)? as u64);
    }
    tx.commit().await?;
    Ok((last, pending as u64, frontiers))
}

/// Rows of `tables` and weft's row metadata, rendered for comparison across regions of
/// either store (see `sqlite_rendering`).
pub async fn postgres_rendering(pool: &PgPool, tables: &[String]) -> Result<BTreeMap<String, Vec<String>>, StoreError> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    sqlx::raw_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await?;
    let mut out = BTreeMap::new();
    for table in tables {
        let info = postgres::schema::describe(&mut tx, table).await?;
        let key_order = info
            .key
            .iter()
            .map(|k| postgres::schema::quote(k))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT {} FROM {} t ORDER BY {key_order}",
            info.select_list("t"),
            info.qualified()
        );
        let mut rendered = Vec::new();
        for row in sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&mut *tx).await? {
            let mut values = Vec::new();
            for (i, kind) in info.kinds.iter().enumerate() {
                values.push(kind.read(&row, i)?.to_string());
            }
            rendered.push(values.join(" | "));
        }
        out.insert(table.clone(), rendered);
    }
    let meta = sqlx::query_as(
        "SELECT tbl, upper(encode(key, 'hex')), version, hlc, origin, deleted::int::int8 FROM weft.rows WHERE NOT deleted ORDER BY tbl, key",
    )
    .fetch_all(&mut *tx)
    .await?;
    out.insert("_weft_rows".into(), render_row_metadata(meta));
    tx.commit().await?;
    Ok(out)
}

/// weft's row metadata as both stores render it: (table, key in hex, version, hlc, origin,
/// deleted 0/1), one line per row, in (table, key) order.
fn render_row_metadata(rows: Vec<(String, String, String, i64, String, i64)>) -> Vec<String> {
    rows.into_iter()
        .map(|(table, key, version, hlc, origin, deleted)| format!("{table} {key} {version} {hlc} {origin} {deleted}"))
        .collect()
}
