//! SQLite IO for strategy state and the audit trail: CRDT column states (`_weft_crdt`), row
//! owners (`_weft_owners`), queue siblings and entries (`_weft_siblings`, `_weft_queue`), the
//! conflict log and dead letters.
//!
//! The CRDT state is the truth and the column holds its materialized value: writes of
//! normalized values are the applier's (marker 2 in `_weft_applying` when a drain makes them
//! outside an apply), so capture skips them. Owner rows carry their key in typed slots
//! (`k1..k4`) as well as canonical bytes, so the capture triggers of rule tables can find a
//! row's recorded owner in SQL.
use std::collections::BTreeMap;

use sqlx::{AssertSqlSafe, SqliteConnection};

use super::schema::{NOW_MICROS, TableInfo, key_predicate, quote};
use super::values::bind;
use crate::crdt::{ColumnState, States};
use crate::event::{Event, Key, Value};
use crate::resolve::ownership::Owner;
use crate::store::StoreError;
use crate::store::backend::{ConflictRecord, DeadLetter};
use crate::store::engine::KnownOwner;
use crate::wire;

pub(super) async fn crdt_states(conn: &mut SqliteConnection, table: &str, key: &[u8]) -> Result<States, StoreError> {
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT col, state FROM _weft_crdt WHERE tbl = ? AND key = ?")
        .bind(table)
        .bind(key)
        .fetch_all(&mut *conn)
        .await?;
    let mut out = BTreeMap::new();
    for (column, state) in rows {
        let state = ColumnState::from_json(&column, &state)?;
        out.insert(column, state);
    }
    Ok(out)
}

pub(super) async fn store_crdt_states(
    conn: &mut SqliteConnection,
    table: &str,
    key: &[u8],
    states: &States,
) -> Result<(), StoreError> {
    for (column, state) in states {
        sqlx::query("INSERT OR REPLACE INTO _weft_crdt (tbl, key, col, state) VALUES (?, ?, ?, ?)")
            .bind(table)
            .bind(key)
            .bind(column)
            .bind(state.to_json())
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Sets CRDT column values of an existing row, as the applier (not captured again).
pub(super) async fn write_crdt_values(
    conn: &mut SqliteConnection,
    table: &TableInfo,
    key: &Key,
    values: &[(String, Value)],
) -> Result<(), StoreError> {
    if values.is_empty() {
        return Ok(());
    }
    let sets = values
        .iter()
        .map(|(c, _)| format!("{} = ?", quote(c)))
        .collect::<Vec<_>>()
        .join(", ");
    // Marker 2: a drain outside an apply marks its own write; inside an apply the apply's
    // marker row is there already and stays.
    sqlx::query("INSERT INTO _weft_applying (marker) VALUES (2)")
        .execute(&mut *conn)
        .await?;
    let sql = format!(
        "UPDATE {} SET {sets} WHERE {}",
        quote(&table.name),
        key_predicate(&table.key)
    );
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for (_, value) in values {
        query = bind(query, value);
    }
    for value in &key.0 {
        query = bind(query, value);
    }
    query.execute(&mut *conn).await?;
    sqlx::query("DELETE FROM _weft_applying WHERE marker = 2")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub(super) async fn owner(
    conn: &mut SqliteConnection,
    table: &str,
    key: &[u8],
) -> Result<Option<KnownOwner>, StoreError> {
    let row: Option<(String, i64, Option<String>)> =
        sqlx::query_as("SELECT owner, epoch, moving_to FROM _weft_owners WHERE tbl = ? AND key = ?")
            .bind(table)
            .bind(key)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(row.map(|(region, epoch, moving_to)| KnownOwner {
        owner: Owner {
            region,
            epoch: epoch as u64,
        },
        moving_to,
    }))
}

/// Records `owner` for a row, clearing any transfer in progress, or (with `moving_to`)
/// records a transfer made here, still at the current owner and epoch until it is drained.
pub(super) async fn store_owner(
    conn: &mut SqliteConnection,
    table: &str,
    key: &Key,
    owner: &Owner,
    moving_to: Option<&str>,
) -> Result<(), StoreError> {
    let slots = (1..=key.0.len()).map(|i| format!(", k{i}")).collect::<String>();
    let marks = ", ?".repeat(key.0.len());
    let sql = format!(
        "INSERT OR REPLACE INTO _weft_owners (tbl, key, owner, epoch, moving_to{slots}) VALUES (?, ?, ?, ?, ?{marks})"
    );
    let mut query = sqlx::query(AssertSqlSafe(sql))
        .bind(table)
        .bind(key.to_bytes())
        .bind(&owner.region)
        .bind(owner.epoch as i64)
        .bind(moving_to);
    for value in &key.0 {
        query = bind(query, value);
    }
    query.execute(&mut *conn).await?;
    Ok(())
}

/// The siblings of a row, oldest (hlc, origin) first.
pub(super) async fn siblings(conn: &mut SqliteConnection, table: &str, key: &[u8]) -> Result<Vec<Event>, StoreError> {
    let rows: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT event FROM _weft_siblings WHERE tbl = ? AND key = ? ORDER BY hlc, origin")
            .bind(table)
            .bind(key)
            .fetch_all(&mut *conn)
            .await?;
    rows.iter()
        .map(|bytes| {
            wire::decode_event(bytes).map_err(|e| StoreError::Corrupt(format!("sibling of a {table} row: {e}")))
        })
        .collect()
}

/// Replaces a row's siblings; two or more open its queue entry (if not open already).
pub(super) async fn replace_siblings(
    conn: &mut SqliteConnection,
    table: &str,
    key: &[u8],
    key_text: &str,
    set: &[Event],
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM _weft_siblings WHERE tbl = ? AND key = ?")
        .bind(table)
        .bind(key)
        .execute(&mut *conn)
        .await?;
    for sibling in set {
        sqlx::query("INSERT INTO _weft_siblings (tbl, key, origin, hlc, event) VALUES (?, ?, ?, ?, ?)")
            .bind(table)
            .bind(key)
            .bind(&sibling.origin)
            .bind(sibling.hlc.0 as i64)
            .bind(wire::encode_event(sibling))
            .execute(&mut *conn)
            .await?;
    }
    if set.len() >= 2 {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT OR IGNORE INTO _weft_queue (tbl, key, key_text, opened_at) VALUES (?, ?, ?, {NOW_MICROS})"
        )))
        .bind(table)
        .bind(key)
        .bind(key_text)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// A write that covers every sibling: drop them and close the row's entry.
pub(super) async fn close_queue(
    conn: &mut SqliteConnection,
    table: &str,
    key: &[u8],
    by: &str,
) -> Result<(), StoreError> {
    let removed = sqlx::query("DELETE FROM _weft_siblings WHERE tbl = ? AND key = ?")
        .bind(table)
        .bind(key)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if removed > 0 {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE _weft_queue SET closed_at = {NOW_MICROS}, closed_by = ? WHERE tbl = ? AND key = ? AND closed_at IS NULL"
        )))
        .bind(by)
        .bind(table)
        .bind(key)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

pub(super) async fn insert_conflict(
    conn: &mut SqliteConnection,
    record: &ConflictRecord<'_>,
) -> Result<(), StoreError> {
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO _weft_conflicts (tbl, key, strategy, winner, loser, at) VALUES (?, ?, ?, ?, ?, {NOW_MICROS})"
    )))
    .bind(record.table)
    .bind(&record.key)
    .bind(record.strategy)
    .bind(&record.winner)
    .bind(&record.loser)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub(super) async fn insert_dead_letter(conn: &mut SqliteConnection, letter: &DeadLetter<'_>) -> Result<(), StoreError> {
    let event = letter.event;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO _weft_dead_letters (origin, seq, tbl, key, reason, event, at) VALUES (?, ?, ?, ?, ?, ?, {NOW_MICROS})"
    )))
    .bind(&event.origin)
    .bind(event.seq as i64)
    .bind(&event.table)
    .bind(event.key.to_string())
    .bind(letter.reason)
    .bind(wire::encode_event(event))
    .execute(&mut *conn)
    .await?;
    Ok(())
}
