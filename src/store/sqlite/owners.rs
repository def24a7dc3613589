//! Row owners of ownership tables (`_weft_owners`): what this node knows of each row's owner
//! region and transfer epoch, and a transfer started here but not yet drained (`moving_to`).
//!
//! Rows carry their key in typed slots (`k1..k4`) as well as canonical bytes, so the capture
//! triggers of rule tables can find a row's recorded owner in SQL.
use sqlx::{AssertSqlSafe, Row as _, SqliteConnection};

use crate::event::Key;
use crate::resolve::ownership::Owner;
use crate::store::StoreError;
use crate::store::engine::KnownOwner;

use super::values::bind;

pub(crate) async fn load_known(
    conn: &mut SqliteConnection,
    table: &str,
    key: &[u8],
) -> Result<Option<KnownOwner>, StoreError> {
    let row = sqlx::query("SELECT owner, epoch, moving_to FROM _weft_owners WHERE tbl = ? AND key = ?")
        .bind(table)
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(match row {
        Some(row) => Some(KnownOwner {
            owner: Owner {
                region: row.try_get(0)?,
                epoch: row.try_get::<i64, _>(1)? as u64,
            },
            moving_to: row.try_get(2)?,
        }),
        None => None,
    })
}

/// Records `owner` for a row, clearing any transfer in progress, or (with `moving_to`)
/// records a transfer made here, still at the current owner and epoch until it is drained.
pub(crate) async fn store(
    conn: &mut SqliteConnection,
    table: &str,
    key_bytes: &[u8],
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
        .bind(key_bytes)
        .bind(&owner.region)
        .bind(owner.epoch as i64)
        .bind(moving_to);
    for value in &key.0 {
        query = bind(query, value);
    }
    query.execute(&mut *conn).await?;
    Ok(())
}
