//! SQLite IO for strategy state and the audit trail: CRDT column states (`_weft_crdt`), row
//! owners (`_weft_owners`), queue siblings and entries (`_weft_siblings`, `_weft_queue`), the
//! conflict log and dead letters.
//!
//! The CRDT state is the truth and the column holds its materialized value: writes of
//! normalized values are the applier's (marker 2 in `_weft_applying` when a drain makes them
//! outside an apply), so capture skips them. Owner rows carry their key in typed slots
//! (`k1..k4`) as well as canonical bytes, so the capture triggers of rule tables can find a
//! row's recorded owner in SQL.

use sqlx::{AssertSqlSafe, SqliteConnection};

use super::schema::{NOW_MICROS, TableInfo, key_predicate, quote};
use super::values::bind;
use crate::crdt::States;
use crate::event::{Event, Key, Value};
use crate::resolve::ownership::Owner;
use crate::store::StoreError;
use crate::wire;

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

/// Sets CRDT column values of an existing row, as the applier (not captured again). Always:
/// a SQLite drain holds the database's write lock, so the row is as it was imaged.
pub(super) async fn write_crdt_values(
    conn: &mut SqliteConnection,
    table: &TableInfo,
    key: &Key,
    values: &[(String, Value)],
    _unless_changed_from: Option<&crate::event::Row>,
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

/// Records `owner` for a row, clearing any transfer in progress, or (with `moving_to`)
/// records a transfer made here, still at the current owner and epoch until it is drained.
pub(super) async fn store_owner(
    conn: &mut SqliteConnection,
    table: &TableInfo,
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
        .bind(&table.name)
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
