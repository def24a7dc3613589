//! Set-based statements: many rows per statement, so the cost per event is a few bound
//! parameters instead of a round trip to the database thread.
//!
//! Every function here keeps the order of its input: multi-row `INSERT`s are processed by
//! SQLite row by row, so a later row for the same key overwrites an earlier one exactly as
//! separate statements would.
use std::collections::HashMap;

use sqlx::{AssertSqlSafe, Row as _, SqliteConnection};

use super::values::bind;
use crate::event::{Hlc, Value};
use crate::replicate::RowVersion;
use crate::store::StoreError;
use crate::version::VersionVector;

/// Appends log entries: (origin, seq, batch_end, committed_at, event).
pub(super) const LOG_INSERT: &str = "INSERT INTO _weft_log (origin, seq, batch_end, committed_at, event) VALUES";

/// SQLite accepts up to 32766 parameters per statement; stay below it.
const MAX_PARAMS: usize = 32_000;

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

/// The stored versions of `keys` of one table; absent keys are missing from the map.
pub(super) async fn load_versions(
    conn: &mut SqliteConnection,
    table: &str,
    keys: &[Vec<u8>],
) -> Result<HashMap<Vec<u8>, RowVersion>, StoreError> {
    let mut out = HashMap::with_capacity(keys.len());
    for chunk in keys.chunks(MAX_PARAMS - 1) {
        let sql = format!(
            "SELECT key, version, hlc, origin, deleted FROM _weft_rows WHERE tbl = ? AND key IN ({})",
            vec!["?"; chunk.len()].join(", ")
        );
        let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(false).bind(table);
        for key in chunk {
            query = query.bind(key.clone());
        }
        for row in query.fetch_all(&mut *conn).await? {
            let version: String = row.try_get(1)?;
            out.insert(
                row.try_get::<Vec<u8>, _>(0)?,
                RowVersion {
                    version: VersionVector::from_json(&version)
                        .map_err(|e| StoreError::Corrupt(format!("version of a {table} row: {e}")))?,
                    hlc: Hlc(row.try_get::<i64, _>(2)? as u64),
                    origin: row.try_get(3)?,
                    deleted: row.try_get::<i64, _>(4)? != 0,
                },
            );
        }
    }
    Ok(out)
}

/// Stores row versions (replacing what was there).
pub(super) async fn store_versions(
    conn: &mut SqliteConnection,
    versions: &[(&str, &[u8], &RowVersion)],
) -> Result<(), StoreError> {
    let rows: Vec<Vec<Value>> = versions
        .iter()
        .map(|(table, key, v)| {
            vec![
                Value::Text((*table).to_owned()),
                Value::Blob(key.to_vec()),
                Value::Text(v.version.to_json()),
                Value::Integer(v.hlc.0 as i64),
                Value::Text(v.origin.clone()),
                Value::Integer(i64::from(v.deleted)),
            ]
        })
        .collect();
    insert(
        conn,
        "INSERT OR REPLACE INTO _weft_rows (tbl, key, version, hlc, origin, deleted) VALUES",
        "",
        6,
        &rows,
    )
    .await?;
    Ok(())
}
