//! Row owners of ownership tables (`_weft_owners`): what this node knows of each row's owner
//! region and transfer epoch.
use sqlx::{Row as _, SqliteConnection};

use crate::resolve::ownership::Owner;
use crate::store::StoreError;

pub(super) async fn load(conn: &mut SqliteConnection, table: &str, key: &[u8]) -> Result<Option<Owner>, StoreError> {
    let row = sqlx::query("SELECT owner, epoch FROM _weft_owners WHERE tbl = ? AND key = ?")
        .bind(table)
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(match row {
        Some(row) => Some(Owner {
            region: row.try_get(0)?,
            epoch: row.try_get::<i64, _>(1)? as u64,
        }),
        None => None,
    })
}

pub(super) async fn store(
    conn: &mut SqliteConnection,
    table: &str,
    key: &[u8],
    owner: &Owner,
) -> Result<(), StoreError> {
    sqlx::query("INSERT OR REPLACE INTO _weft_owners (tbl, key, owner, epoch) VALUES (?, ?, ?, ?)")
        .bind(table)
        .bind(key)
        .bind(&owner.region)
        .bind(owner.epoch as i64)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
