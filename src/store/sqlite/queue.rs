//! The resolution queue: concurrent versions of a `queue` table's row kept as siblings.
//!
//! The sibling set is the antichain of maximal versions seen for the row, so it is the same
//! at every node whatever the arrival order: a concurrent version joins it and removes the
//! siblings it descends from. The row shows the LWW winner among the siblings (the normal
//! LWW decision already picks it). A write whose vector covers every sibling, local or
//! remote (a resolution from `weft conflicts resolve` is such a write), closes the entry.
use sqlx::{AssertSqlSafe, Row as _, SqliteConnection};

use super::schema::{NOW_MICROS, TableInfo};
use crate::event::{Event, Op, Row};
use crate::replicate::RowVersion;
use crate::store::StoreError;
use crate::version::Causality;
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

/// Adds a version concurrent with the row's current one(s), opening a queue entry.
pub(super) async fn add_concurrent(
    tx: &mut SqliteConnection,
    table: &TableInfo,
    key: &[u8],
    local: &RowVersion,
    local_row: Option<&Row>,
    event: &Event,
) -> Result<(), StoreError> {
    let mut set = siblings(tx, &table.name, key).await?;
    if set.is_empty() {
        // The row had one version so far: it becomes the first sibling. Siblings are
        // versions, not stream positions: seq 1 only keeps the event encoding valid.
        set.push(Event {
            origin: local.origin.clone(),
            origin_region: String::new(),
            seq: 1,
            batch_end: 1,
            hlc: local.hlc,
            table: table.name.clone(),
            key: event.key.clone(),
            op: match local_row {
                Some(row) if !local.deleted => Op::Upsert(row.clone()),
                _ => Op::Delete,
            },
            version: local.version.clone(),
            path: Vec::new(),
            committed_at_micros: 0,
            crdt: Vec::new(),
            ownership: None,
        });
    }
    set.retain(|s| {
        !matches!(
            event.version.compare(&s.version),
            Causality::Dominates | Causality::Equal
        )
    });
    let mut newcomer = event.clone();
    newcomer.path.clear();
    set.push(newcomer);
    sqlx::query("DELETE FROM _weft_siblings WHERE tbl = ? AND key = ?")
        .bind(&table.name)
        .bind(key)
        .execute(&mut *tx)
        .await?;
    for sibling in &set {
        sqlx::query("INSERT INTO _weft_siblings (tbl, key, origin, hlc, event) VALUES (?, ?, ?, ?, ?)")
            .bind(&table.name)
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
        .bind(&table.name)
        .bind(key)
        .bind(event.key.to_string())
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
