//! SQLite apply IO: the applier's mark, grouped row writes and row reads.
//!
//! The applier marks its transaction with a row in `_weft_applying`; the capture triggers
//! skip writes while it is there. SQLite holds the whole database's write lock for the
//! transaction, so no row needs locking. Consecutive writes of one shape (upserts of the same
//! columns, or deletes) of one table go out as one multi-row statement. A statement SQLite
//! refuses is rolled back whole by SQLite itself, so an event-by-event write that is refused
//! leaves nothing behind.
use std::collections::BTreeMap;
use std::sync::Arc;

use sqlx::{AssertSqlSafe, SqliteConnection};

use super::capture::{insert, read_image};
use super::schema::{TableInfo, quote};
use super::values::bind;
use crate::event::{Event, Key, Op, Row, Value};
use crate::store::StoreError;
use crate::store::admit::{Frontier, frontiers_from};
use crate::store::engine::Written;

/// Whether a database error is about this event's content (dead-letter it) rather than about
/// the database itself (fail the run, retry later).
fn rejects_event(error: &sqlx::Error) -> Option<String> {
    let sqlx::Error::Database(db) = error else { return None };
    let code: i32 = db.code()?.parse().ok()?;
    // SQLITE_ERROR (e.g. no such column), TOOBIG, CONSTRAINT, MISMATCH, RANGE.
    matches!(code & 0xff, 1 | 18 | 19 | 20 | 25).then(|| db.message().to_owned())
}

pub(super) async fn begin_apply(conn: &mut SqliteConnection) -> Result<BTreeMap<String, Frontier>, StoreError> {
    sqlx::query("INSERT INTO _weft_applying (marker) VALUES (1)")
        .execute(&mut *conn)
        .await?;
    let known: Vec<(String, i64, i64)> = sqlx::query_as("SELECT origin, seq, processed FROM _weft_frontier")
        .fetch_all(&mut *conn)
        .await?;
    Ok(frontiers_from(known))
}

pub(super) async fn end_apply(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM _weft_applying").execute(&mut *conn).await?;
    Ok(())
}

/// What a group of consecutive writes does; a new shape starts a new group.
#[derive(PartialEq)]
enum Shape {
    Upsert { table: String, columns: Vec<String> },
    Delete { table: String },
}

/// Writes waiting to be executed, all of one shape.
#[derive(Default)]
pub(super) struct Batch {
    shape: Option<(Shape, Arc<TableInfo>)>,
    rows: Vec<Vec<Value>>,
}

impl Batch {
    /// Queues the event's write, flushing first if the shape changes.
    pub(super) async fn push(
        &mut self,
        conn: &mut SqliteConnection,
        table: &Arc<TableInfo>,
        event: &Event,
    ) -> Result<Written, StoreError> {
        let (shape, values) = match &event.op {
            Op::Upsert(row) => (
                Shape::Upsert {
                    table: table.name.clone(),
                    columns: row.0.iter().map(|(c, _)| c.clone()).collect(),
                },
                row.0.iter().map(|(_, v)| v.clone()).collect(),
            ),
            Op::Undecodable { reason, .. } => return Ok(Written::Refused(reason.clone())),
            Op::Delete => (
                Shape::Delete {
                    table: table.name.clone(),
                },
                event.key.0.clone(),
            ),
        };
        if self.shape.as_ref().is_some_and(|(current, _)| *current != shape) {
            let written = self.flush(conn).await?;
            if written != Written::Done {
                return Ok(written);
            }
        }
        if self.shape.is_none() {
            self.shape = Some((shape, table.clone()));
        }
        self.rows.push(values);
        Ok(Written::Done)
    }

    /// Executes the queued writes.
    pub(super) async fn flush(&mut self, conn: &mut SqliteConnection) -> Result<Written, StoreError> {
        let Some((shape, table)) = self.shape.take() else {
            return Ok(Written::Done);
        };
        let rows = std::mem::take(&mut self.rows);
        let keys = table.key.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ");
        let result = match &shape {
            Shape::Upsert { columns, .. } => {
                let updates: Vec<String> = columns
                    .iter()
                    .filter(|c| !table.key.contains(c))
                    .map(|c| format!("{0} = excluded.{0}", quote(c)))
                    .collect();
                let on_conflict = if updates.is_empty() {
                    format!(" ON CONFLICT ({keys}) DO NOTHING")
                } else {
                    format!(" ON CONFLICT ({keys}) DO UPDATE SET {}", updates.join(", "))
                };
                let names = columns.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
                let head = format!("INSERT INTO {} ({names}) VALUES", quote(&table.name));
                insert(conn, &head, &on_conflict, columns.len(), &rows).await
            }
            Shape::Delete { .. } => {
                let head = format!("DELETE FROM {} WHERE ({keys}) IN (VALUES", quote(&table.name));
                insert(conn, &head, ")", table.key.len(), &rows).await
            }
        };
        match result {
            Ok(()) => Ok(Written::Done),
            Err(error) => match rejects_event(&error) {
                Some(reason) => Ok(Written::Refused(reason)),
                None => Err(error.into()),
            },
        }
    }
}

/// The row's current image, or `None` if it does not exist.
pub(super) async fn read_row(
    conn: &mut SqliteConnection,
    table: &TableInfo,
    key: &Key,
) -> Result<Option<Row>, StoreError> {
    let mut query = sqlx::query(AssertSqlSafe(table.select_sql.as_str()));
    for value in &key.0 {
        query = bind(query, value);
    }
    match query.fetch_optional(&mut *conn).await? {
        Some(row) => Ok(Some(read_image(table, &row, 0)?)),
        None => Ok(None),
    }
}

/// Another row of `table` than `key` holding `row`'s values (none NULL) in every column of
/// one of the table's UNIQUE constraints: the row a write of `row` collides with.
pub(super) async fn unique_holder(
    conn: &mut SqliteConnection,
    table: &TableInfo,
    key: &Key,
    row: &Row,
) -> Result<Option<Row>, StoreError> {
    let columns = table.columns.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
    let other_key = table
        .key
        .iter()
        .map(|k| format!("{} IS ?", quote(k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    for set in &table.unique {
        let values: Option<Vec<&Value>> = set
            .iter()
            .map(|c| row.get(c).filter(|v| !matches!(v, Value::Null)))
            .collect();
        let Some(values) = values else { continue };
        let predicate = set
            .iter()
            .map(|c| format!("{} = ?", quote(c)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let sql = format!(
            "SELECT {columns} FROM {} WHERE {predicate} AND NOT ({other_key}) LIMIT 1",
            quote(&table.name)
        );
        let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(false);
        for value in values.into_iter().chain(&key.0) {
            query = bind(query, value);
        }
        if let Some(found) = query.fetch_optional(&mut *conn).await? {
            return Ok(Some(read_image(table, &found, 0)?));
        }
    }
    Ok(None)
}

/// Every row of `table`, streamed to `visit`; returns how many.
pub(super) async fn scan_rows(
    conn: &mut SqliteConnection,
    table: &TableInfo,
    visit: &mut (dyn FnMut(Row) + Send),
) -> Result<u64, StoreError> {
    use futures_util::TryStreamExt as _;
    let columns = table.columns.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
    let sql = format!("SELECT {columns} FROM {}", quote(&table.name));
    let mut rows = sqlx::query(AssertSqlSafe(sql)).persistent(false).fetch(&mut *conn);
    let mut n = 0;
    while let Some(row) = rows.try_next().await? {
        visit(read_image(table, &row, 0)?);
        n += 1;
    }
    Ok(n)
}
