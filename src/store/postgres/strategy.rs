//! PostgreSQL IO for strategy state and the audit trail: `weft.crdt`, `weft.owners` (with
//! `ktext`, the key as text, for the ownership triggers), `weft.siblings`, `weft.queue`, the
//! conflict log and dead letters. Values are bound as text and cast to the columns' types.
use sqlx::{AssertSqlSafe, PgConnection};

use super::schema::{PgTable, quote};
use crate::crdt::{ColumnState, States};
use crate::event::{Event, Key, Row, Value};
use crate::resolve::ownership::Owner;
use crate::store::StoreError;
use crate::wire;

/// The key's values as text for binding; a key that does not fit is corrupt metadata.
pub(super) fn key_texts(table: &PgTable, key: &Key) -> Result<Vec<Option<String>>, StoreError> {
    table
        .texts(&table.key, &key.0.iter().collect::<Vec<_>>())
        .map_err(|e| StoreError::Corrupt(format!("key {key} of table {}: {e}", table.name)))
}

/// Records a row's owner, with a transfer made here (`moving_to`) or clearing one.
pub(crate) async fn store_owner(
    conn: &mut PgConnection,
    table: &PgTable,
    key: &Key,
    owner: &Owner,
    moving_to: Option<&str>,
) -> Result<(), StoreError> {
    let sql = format!(
        "INSERT INTO weft.owners (tbl, key, owner, epoch, moving_to, ktext) VALUES ($1, $2, $3, $4, $5, {}) \
         ON CONFLICT (tbl, key) DO UPDATE SET owner = excluded.owner, epoch = excluded.epoch, \
         moving_to = excluded.moving_to, ktext = excluded.ktext",
        table.key_text_array(6)
    );
    let mut query = sqlx::query(AssertSqlSafe(sql))
        .bind(&table.name)
        .bind(key.to_bytes())
        .bind(&owner.region)
        .bind(owner.epoch as i64)
        .bind(moving_to);
    for text in key_texts(table, key)? {
        query = query.bind(text);
    }
    query.execute(&mut *conn).await?;
    Ok(())
}

pub(super) async fn store_crdt_states(
    conn: &mut PgConnection,
    table: &str,
    key: &[u8],
    states: &States,
) -> Result<(), StoreError> {
    sqlx::query(
            "INSERT INTO weft.crdt (tbl, key, col, state) SELECT $1, $2, c, s FROM unnest($3::text[], $4::text[]) AS u(c, s) \
             ON CONFLICT (tbl, key, col) DO UPDATE SET state = excluded.state",
        )
        .bind(table)
        .bind(key)
        .bind(states.keys().collect::<Vec<_>>())
        .bind(states.values().map(ColumnState::to_json).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub(super) async fn write_crdt_values(
    conn: &mut PgConnection,
    table: &PgTable,
    key: &Key,
    values: &[(String, Value)],
    unless_changed_from: Option<&Row>,
) -> Result<(), StoreError> {
    if values.is_empty() {
        return Ok(());
    }
    let columns: Vec<String> = values.iter().map(|(c, _)| c.clone()).collect();
    let new = table
        .texts(&columns, &values.iter().map(|(_, v)| v).collect::<Vec<_>>())
        .map_err(|e| StoreError::Corrupt(format!("merged CRDT value of table {}: {e}", table.name)))?;
    let cast = |column: &str, n: usize| format!("${n}::text::{}", table.type_of(column).unwrap_or("text"));
    let sets = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} = {}", quote(c), cast(c, i + 1)))
        .collect::<Vec<_>>()
        .join(", ");
    let mut predicate = table.key_predicate(columns.len() + 1);
    let mut old = Vec::new();
    if let Some(image) = unless_changed_from {
        let first = columns.len() + table.key.len() + 1;
        for (i, column) in columns.iter().enumerate() {
            predicate += &format!(
                " AND t.{} IS NOT DISTINCT FROM {}",
                quote(column),
                cast(column, first + i)
            );
        }
        let was: Vec<&Value> = columns.iter().map(|c| image.get(c).unwrap_or(&Value::Null)).collect();
        old = table
            .texts(&columns, &was)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    }
    // The applier's write: the capture and ownership triggers skip it.
    sqlx::query("SELECT set_config('weft.applying', 'on', true)")
        .execute(&mut *conn)
        .await?;
    let sql = format!("UPDATE {} t SET {sets} WHERE {predicate}", table.qualified());
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for text in new.into_iter().chain(key_texts(table, key)?).chain(old) {
        query = query.bind(text);
    }
    query.execute(&mut *conn).await?;
    Ok(())
}

pub(super) async fn replace_siblings(
    conn: &mut PgConnection,
    table: &str,
    key: &[u8],
    key_text: &str,
    set: &[Event],
) -> Result<(), StoreError> {
    // Two statements: a CTE's delete is not visible to its sibling insert.
    sqlx::query("DELETE FROM weft.siblings WHERE tbl = $1 AND key = $2")
        .bind(table)
        .bind(key)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "WITH opened AS (INSERT INTO weft.queue (tbl, key, key_text, opened_at) \
                 SELECT $1, $2, $3, weft.now_micros() WHERE cardinality($4::text[]) >= 2 \
                 ON CONFLICT (tbl, key) WHERE closed_at IS NULL DO NOTHING) \
             INSERT INTO weft.siblings (tbl, key, origin, hlc, event) \
             SELECT $1, $2, o, h, e FROM unnest($4::text[], $5::int8[], $6::bytea[]) AS u(o, h, e)",
    )
    .bind(table)
    .bind(key)
    .bind(key_text)
    .bind(set.iter().map(|s| s.origin.as_str()).collect::<Vec<_>>())
    .bind(set.iter().map(|s| s.hlc.0 as i64).collect::<Vec<_>>())
    .bind(set.iter().map(wire::encode_event).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    Ok(())
}
