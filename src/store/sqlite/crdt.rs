//! CRDT column states of rows in `_weft_crdt`, and the writes that keep the table's column
//! values equal to the materialized states.
//!
//! The state is the truth; the column holds its materialized value. Local writes are folded
//! into the state at capture (and the column normalized: a set's JSON sorted, an invalid value
//! replaced by the state's value, with a warning); remote states are merged at apply.
use std::collections::BTreeMap;

use sqlx::{AssertSqlSafe, Row as _, SqliteConnection};

use super::schema::{TableInfo, quote};
use super::values::bind;
use crate::crdt::ColumnState;
use crate::event::{Key, Value};
use crate::store::StoreError;

pub(super) use crate::crdt::States;

pub(super) async fn load(conn: &mut SqliteConnection, table: &str, key: &[u8]) -> Result<States, StoreError> {
    let rows = sqlx::query("SELECT col, state FROM _weft_crdt WHERE tbl = ? AND key = ?")
        .bind(table)
        .bind(key)
        .fetch_all(&mut *conn)
        .await?;
    let mut out = BTreeMap::new();
    for row in rows {
        let column: String = row.try_get(0)?;
        let state: String = row.try_get(1)?;
        let state = ColumnState::from_json(&column, &state).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        out.insert(column, state);
    }
    Ok(out)
}

pub(super) async fn store(
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
pub(super) async fn write_values(
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
    let keys = super::schema::key_predicate(&table.key);
    // Marker 2: a drain outside an apply marks its own write; inside an apply the apply's
    // marker row is there already and stays.
    sqlx::query("INSERT INTO _weft_applying (marker) VALUES (2)")
        .execute(&mut *conn)
        .await?;
    let mut query = sqlx::query(AssertSqlSafe(format!(
        "UPDATE {} SET {sets} WHERE {keys}",
        quote(&table.name)
    )));
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
