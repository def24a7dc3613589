//! The resolution queue on SQLite: concurrent versions of a `queue` table's row kept as
//! siblings in `_weft_siblings`, and the row's entry in `_weft_queue`.
//!
//! Which versions are siblings is decided by `store::engine` (the antichain of maximal
//! versions, the same at every node whatever the arrival order). The row shows the LWW
//! winner among them. A write whose vector covers every sibling, local or remote (a
//! resolution from `weft conflicts resolve` is such a write), closes the entry.
use sqlx::{AssertSqlSafe, Row as _, SqliteConnection};

use super::schema::NOW_MICROS;
use crate::event::Event;
use crate::store::StoreError;
use crate::wire;

/// The siblings of a row, oldest (hlc, origin) first.
pub async fn siblings(conn: &mut SqliteConnection, table: &str, key: &[u8]) -> Result<Vec<Event>, StoreError> {
    let rows = sqlx::query("SELECT event FROM _weft_siblings WHERE tbl = ? AND key = ? ORDER BY hlc, origin")
        .bind(table)
        .bind(key)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|row| {
            let bytes: Vec<u8> = row.try_get(0)?;
            wire::decode_event(&bytes).map_err(|e| StoreError::Corrupt(format!("sibling of a {table} row: {e}")))
        })
        .collect()
}

/// Replaces a row's siblings; two or more open its queue entry (if not open already).
pub(super) async fn replace(
    tx: &mut SqliteConnection,
    table: &str,
    key: &[u8],
    key_text: &str,
    set: &[Event],
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM _weft_siblings WHERE tbl = ? AND key = ?")
        .bind(table)
        .bind(key)
        .execute(&mut *tx)
        .await?;
    for sibling in set {
        sqlx::query("INSERT INTO _weft_siblings (tbl, key, origin, hlc, event) VALUES (?, ?, ?, ?, ?)")
            .bind(table)
            .bind(key)
            .bind(&sibling.origin)
            .bind(sibling.hlc.0 as i64)
            .bind(wire::encode_event(sibling))
            .execute(&mut *tx)
            .await?;
    }
    if set.len() >= 2 {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT OR IGNORE INTO _weft_queue (tbl, key, key_text, opened_at) VALUES (?, ?, ?, {NOW_MICROS})"
        )))
        .bind(table)
        .bind(key)
        .bind(key_text)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// A write that covers every sibling: drop them and close the row's entry.
pub(super) async fn close(tx: &mut SqliteConnection, table: &str, key: &[u8], by: &str) -> Result<(), StoreError> {
    let removed = sqlx::query("DELETE FROM _weft_siblings WHERE tbl = ? AND key = ?")
        .bind(table)
        .bind(key)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if removed > 0 {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE _weft_queue SET closed_at = {NOW_MICROS}, closed_by = ? WHERE tbl = ? AND key = ? AND closed_at IS NULL"
        )))
        .bind(by)
        .bind(table)
        .bind(key)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}
