//! SQLite capture and metadata IO: the outbox, row versions, the log, frontiers and the
//! node record, in set-based statements (many rows per statement, so the cost per event is a
//! few bound parameters instead of a round trip to the database thread).
//!
//! The drain runs inside `BEGIN IMMEDIATE`, so it sees only whole committed application
//! transactions and no writer can commit halfway through it. The outbox holds only keys; each
//! row's image is read, joined, in the same statement, and is the row as it is now. Every
//! multi-row `INSERT` here keeps the order of its input: SQLite processes it row by row, so a
//! later row for the same key overwrites an earlier one exactly as separate statements would.
use std::collections::HashMap;

use sqlx::{AssertSqlSafe, Row as _, SqliteConnection};

use super::schema::TableInfo;
use super::values::{bind, value_at};
use crate::event::{Key, Row, Value};
use crate::replicate::RowVersion;
use crate::store::StoreError;
use crate::store::backend::{Captured, Meta, Tables};
use crate::store::metadata::stored_version;
use crate::wire;

/// SQLite accepts up to 32766 parameters per statement; stay below it.
const MAX_PARAMS: usize = 32_000;

/// Which outbox rows a drain took: all up to `max_id`, `matched` of them of replicated tables.
pub(super) struct Taken {
    max_id: i64,
    matched: u64,
}

impl Taken {
    /// Only the rows up to `last_id`, `changes` of them of replicated tables.
    pub(super) fn through(&mut self, last_id: i64, changes: u64) {
        self.max_id = self.max_id.min(last_id);
        self.matched = changes;
    }
}

/// Runs `head (?, ?, ...), (?, ...) tail` over `rows` in as few statements as fit.
pub(super) async fn insert(
    conn: &mut SqliteConnection,
    head: &str,
    tail: &str,
    width: usize,
    rows: &[Vec<Value>],
) -> Result<(), sqlx::Error> {
    let per_statement = (MAX_PARAMS / width.max(1)).max(1);
    let tuple = format!("({})", vec!["?"; width].join(", "));
    for chunk in rows.chunks(per_statement) {
        let sql = format!("{head} {}{tail}", vec![tuple.as_str(); chunk.len()].join(", "));
        let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(chunk.len() == per_statement);
        for row in chunk {
            debug_assert_eq!(row.len(), width);
            for value in row {
                query = bind(query, value);
            }
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// The first `limit` committed outbox rows (those of replicated tables, each with its row's
/// current image), and what was taken; `None` if the outbox is empty.
pub(super) async fn take_outbox(
    conn: &mut SqliteConnection,
    tables: &Tables<TableInfo>,
    limit: i64,
) -> Result<Option<(Vec<Captured<TableInfo>>, Taken)>, StoreError> {
    let Some(max_id): Option<i64> =
        sqlx::query_scalar("SELECT max(id) FROM (SELECT id FROM _weft_outbox ORDER BY id LIMIT ?)")
            .bind(limit)
            .fetch_one(&mut *conn)
            .await?
    else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for table in tables.values() {
        let rows = sqlx::query(AssertSqlSafe(table.drain_sql.as_str()))
            .bind(max_id)
            .fetch_all(&mut *conn)
            .await?;
        let n = table.key.len();
        for row in &rows {
            let key = Key((0..n).map(|i| value_at(row, 2 + i)).collect::<Result<_, _>>()?);
            let present: bool = row.try_get(2 + n)?;
            let image = match present {
                true => Some(read_image(table, row, 3 + n)?),
                false => None,
            };
            out.push(Captured {
                table: table.clone(),
                id: row.try_get(0)?,
                committed_at: row.try_get(1)?,
                key,
                image,
            });
        }
    }
    let matched = out.len() as u64;
    Ok(Some((out, Taken { max_id, matched })))
}

/// A row's columns read from `row`, starting at column `first`.
pub(super) fn read_image(table: &TableInfo, row: &sqlx::sqlite::SqliteRow, first: usize) -> Result<Row, sqlx::Error> {
    let mut columns = Vec::with_capacity(table.columns.len());
    for (j, name) in table.columns.iter().enumerate() {
        columns.push((name.clone(), value_at(row, first + j)?));
    }
    Ok(Row(columns))
}

/// The stored versions of `keys` of one table; absent keys are missing from the map.
pub(super) async fn load_versions(
    conn: &mut SqliteConnection,
    table: &str,
    keys: &[Vec<u8>],
) -> Result<HashMap<Vec<u8>, RowVersion>, StoreError> {
    let mut out = HashMap::with_capacity(keys.len());
    for chunk in keys.chunks(MAX_PARAMS - 1) {
        let sql = format!(
            "SELECT key, version, hlc, origin, deleted, image_sum FROM _weft_rows WHERE tbl = ? AND key IN ({})",
            vec!["?"; chunk.len()].join(", ")
        );
        let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(false).bind(table);
        for key in chunk {
            query = query.bind(key.clone());
        }
        for row in query.fetch_all(&mut *conn).await? {
            let version: String = row.try_get(1)?;
            let deleted = row.try_get::<i64, _>(4)? != 0;
            let image = row.try_get(5)?;
            let stored = stored_version(table, &version, row.try_get(2)?, row.try_get(3)?, (deleted, image))?;
            out.insert(row.try_get::<Vec<u8>, _>(0)?, stored);
        }
    }
    Ok(out)
}

/// Writes what `meta` lists, then deletes the taken outbox rows.
pub(super) async fn write_meta(
    conn: &mut SqliteConnection,
    meta: Meta<'_>,
    taken: Option<Taken>,
) -> Result<(), StoreError> {
    let versions: Vec<Vec<Value>> = meta
        .versions
        .iter()
        .map(|(table, key, v)| {
            vec![
                Value::Text((*table).to_owned()),
                Value::Blob(key.to_vec()),
                Value::Text(v.version.to_json()),
                Value::Integer(v.hlc.0 as i64),
                Value::Text(v.origin.clone()),
                Value::Integer(i64::from(v.deleted)),
                v.image.filter(|_| !v.deleted).map_or(Value::Null, Value::Integer),
            ]
        })
        .collect();
    let head = "INSERT OR REPLACE INTO _weft_rows (tbl, key, version, hlc, origin, deleted, image_sum) VALUES";
    insert(conn, head, "", 7, &versions).await?;
    let log: Vec<Vec<Value>> = meta
        .log
        .iter()
        .map(|event| {
            vec![
                Value::Text(event.origin.clone()),
                Value::Integer(event.seq as i64),
                Value::Integer(event.batch_end as i64),
                Value::Integer(event.committed_at_micros),
                Value::Blob(wire::encode_event(event)),
            ]
        })
        .collect();
    let head = "INSERT INTO _weft_log (origin, seq, batch_end, committed_at, event) VALUES";
    insert(conn, head, "", 5, &log).await?;
    for (origin, seq, processed) in &meta.frontiers {
        sqlx::query(
            "INSERT INTO _weft_frontier (origin, seq, processed) VALUES (?, ?, ?) \
             ON CONFLICT (origin) DO UPDATE SET seq = excluded.seq, processed = excluded.processed",
        )
        .bind(origin)
        .bind(*seq as i64)
        .bind(*processed as i64)
        .execute(&mut *conn)
        .await?;
    }
    if let Some(last_seq) = meta.last_seq {
        set_node_value(conn, "last_seq", last_seq).await?;
    }
    set_node_value(conn, "hlc", meta.hlc).await?;
    if let Some(taken) = taken {
        delete_taken(conn, taken).await?;
    }
    Ok(())
}

async fn set_node_value(conn: &mut SqliteConnection, name: &str, value: u64) -> Result<(), StoreError> {
    sqlx::query("UPDATE _weft_node SET value = ? WHERE name = ?")
        .bind(value as i64)
        .bind(name)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn delete_taken(conn: &mut SqliteConnection, taken: Taken) -> Result<(), StoreError> {
    let removed = sqlx::query("DELETE FROM _weft_outbox WHERE id <= ?")
        .bind(taken.max_id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if removed > taken.matched {
        tracing::warn!(
            orphans = removed - taken.matched,
            "dropped outbox rows of tables no longer replicated"
        );
    }
    Ok(())
}
