//! The admin API's SQL on SQLite (`store::admin`): queue entries, application writes,
//! resolution and transfer records, and the `_weft_transfer` mark that lets the ownership
//! triggers accept an owner change.
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AssertSqlSafe, Connection as _, SqliteConnection};

use super::Sqlite;
use super::metadata;
use super::schema::{self, NOW_MICROS, TableInfo, key_predicate, quote};
use super::txn::SqliteTxn;
use super::values::{bind, value_at};
use crate::config::TableConfig;
use crate::event::{Key, Op};
use crate::store::StoreError;
use crate::store::admin::{AdminBackend, AdminTxn, TransferRecord};

impl Sqlite {
    /// The dialect for the admin tools: no sidecar connections are opened.
    pub(crate) fn for_tools(path: &std::path::Path) -> Self {
        Self::lazy(path)
    }
}

impl AdminBackend for Sqlite {
    async fn connect_app(&self) -> Result<SqliteConnection, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(&self.path)
            .busy_timeout(std::time::Duration::from_secs(30));
        Ok(SqliteConnection::connect_with(&options).await?)
    }

    async fn describe(conn: &mut SqliteConnection, config: &TableConfig) -> Result<TableInfo, StoreError> {
        let mut table = schema::describe(conn, &config.name).await?;
        table.configure(config)?;
        Ok(table)
    }
}

impl AdminTxn for SqliteTxn<'_> {
    async fn installed(&mut self) -> Result<bool, StoreError> {
        let found: i64 = sqlx::query_scalar("SELECT count(*) FROM sqlite_master WHERE name = '_weft_queue'")
            .fetch_one(&mut *self.conn)
            .await?;
        Ok(found > 0)
    }

    crate::store::admin::forward_admin_io!();

    async fn write_as_application(&mut self, table: &TableInfo, key: &Key, op: &Op) -> Result<u64, StoreError> {
        let name = quote(&table.name);
        let undecodable = || StoreError::Refused("an undecodable event cannot be written".into());
        let mut query = match op {
            Op::Undecodable { .. } => return Err(undecodable()),
            Op::Delete => sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM {name} WHERE {}",
                key_predicate(&table.key)
            ))),
            Op::Upsert(row) => {
                let names = row.0.iter().map(|(c, _)| quote(c)).collect::<Vec<_>>().join(", ");
                let updates = row
                    .0
                    .iter()
                    .map(|(c, _)| format!("{0} = excluded.{0}", quote(c)))
                    .collect::<Vec<_>>()
                    .join(", ");
                let keys = table.key.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ");
                let marks = vec!["?"; row.0.len()].join(", ");
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO {name} ({names}) VALUES ({marks}) ON CONFLICT ({keys}) DO UPDATE SET {updates}"
                )))
            }
        };
        let values = match op {
            Op::Undecodable { .. } => return Err(undecodable()),
            Op::Delete => key.0.iter().collect::<Vec<_>>(),
            Op::Upsert(row) => row.0.iter().map(|(_, v)| v).collect(),
        };
        for value in values {
            query = bind(query, value);
        }
        Ok(query.execute(&mut *self.conn).await?.rows_affected())
    }

    async fn queue_deleted(&mut self, table: &TableInfo, key: &Key) -> Result<(), StoreError> {
        // The outbox holds keys only; the drain finds the row absent and makes it a delete.
        self.queue_capture(table, key).await
    }

    async fn begin_transfer(&mut self, forced: bool) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO _weft_transfer (marker) VALUES (?)")
            .bind(if forced { 2 } else { 1 })
            .execute(&mut *self.conn)
            .await?;
        Ok(())
    }

    async fn move_owner_column(
        &mut self,
        table: &TableInfo,
        column: &str,
        key: Option<&Key>,
        from: &str,
        to: &str,
    ) -> Result<u64, StoreError> {
        let set = format!("UPDATE {} SET {} = ?", quote(&table.name), quote(column));
        let mut query = match key {
            None => sqlx::query(AssertSqlSafe(format!("{set} WHERE {} = ?", quote(column))))
                .bind(to.to_owned())
                .bind(from.to_owned()),
            Some(_) => {
                sqlx::query(AssertSqlSafe(format!("{set} WHERE {}", key_predicate(&table.key)))).bind(to.to_owned())
            }
        };
        for value in key.iter().flat_map(|k| &k.0) {
            query = bind(query, value);
        }
        Ok(query.execute(&mut *self.conn).await?.rows_affected())
    }

    async fn row_keys(&mut self, table: &TableInfo, key: Option<&Key>) -> Result<Vec<Key>, StoreError> {
        let list = table.key.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ");
        let select = format!("SELECT {list} FROM {}", quote(&table.name));
        let mut query = match key {
            None => sqlx::query(AssertSqlSafe(select)),
            Some(_) => sqlx::query(AssertSqlSafe(format!("{select} WHERE {}", key_predicate(&table.key)))),
        };
        for value in key.iter().flat_map(|k| &k.0) {
            query = bind(query, value);
        }
        let rows = query.fetch_all(&mut *self.conn).await?;
        rows.iter()
            .map(|row| {
                Ok(Key((0..table.key.len())
                    .map(|i| value_at(row, i))
                    .collect::<Result<_, _>>()?))
            })
            .collect()
    }

    async fn queue_capture(&mut self, table: &TableInfo, key: &Key) -> Result<(), StoreError> {
        let slots = (1..=key.0.len())
            .map(|i| format!("k{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let marks = vec!["?"; key.0.len()].join(", ");
        let sql = format!("INSERT INTO _weft_outbox (tbl, {slots}, at) VALUES (?, {marks}, {NOW_MICROS})");
        let mut query = sqlx::query(AssertSqlSafe(sql)).bind(table.name.clone());
        for value in &key.0 {
            query = bind(query, value);
        }
        query.execute(&mut *self.conn).await?;
        Ok(())
    }

    async fn end_transfer(&mut self, record: &TransferRecord<'_>) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM _weft_transfer")
            .execute(&mut *self.conn)
            .await?;
        metadata::insert_transfer(self.conn, record).await
    }
}
