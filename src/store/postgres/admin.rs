//! The admin API's SQL on PostgreSQL (`store::admin`): queue entries, application writes
//! (each value cast to its column's type), resolution and transfer records, and the
//! `weft.transfer = 'on'` setting that lets the ownership trigger accept an owner change.
use sqlx::{AssertSqlSafe, Connection as _, PgConnection};

use super::metadata;
use super::schema::{self, CHANNEL, PgTable, quote};
use super::strategy::key_texts;
use super::txn::PgTxn;
use super::{Postgres, SESSION, options, pool};
use crate::config::TableConfig;
use crate::event::{Key, Op};
use crate::store::StoreError;
use crate::store::admin::{AdminBackend, AdminTxn, TransferRecord};

impl Postgres {
    /// The dialect for the admin tools: no listener, no sidecar lock.
    pub(crate) fn for_tools(url: &str) -> Result<Self, StoreError> {
        let options = options(url)?;
        Ok(Postgres {
            readers: pool(&options, 1),
            listener: tokio::sync::Mutex::new(None),
            wakeups: std::sync::atomic::AtomicI64::new(0),
            options,
        })
    }
}

impl AdminBackend for Postgres {
    async fn connect_app(&self) -> Result<PgConnection, StoreError> {
        let mut conn = PgConnection::connect_with(&self.options).await.map_err(|e| {
            StoreError::NotInstalled(format!(
                "cannot reach the node's PostgreSQL database ({e}); is it up, and is the URL in the config right?"
            ))
        })?;
        // Canonical text for values, as the sidecar and the ownership triggers use.
        sqlx::raw_sql(SESSION).execute(&mut conn).await?;
        Ok(conn)
    }

    async fn describe(conn: &mut PgConnection, config: &TableConfig) -> Result<PgTable, StoreError> {
        let mut table = schema::describe(conn, &config.name).await?;
        table.configure(config)?;
        Ok(table)
    }
}

impl AdminTxn for PgTxn<'_> {
    async fn installed(&mut self) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar("SELECT to_regclass('weft.queue') IS NOT NULL")
            .fetch_one(&mut *self.conn)
            .await?)
    }

    crate::store::admin::forward_admin_io!();

    async fn write_as_application(&mut self, table: &PgTable, key: &Key, op: &Op) -> Result<u64, StoreError> {
        let (sql, texts) = match op {
            Op::Undecodable { .. } => {
                return Err(StoreError::Refused("an undecodable event cannot be written".into()));
            }
            Op::Delete => (
                format!("DELETE FROM {} t WHERE {}", table.qualified(), table.key_predicate(1)),
                key_texts(table, key)?,
            ),
            Op::Upsert(row) => {
                let columns: Vec<String> = row.0.iter().map(|(c, _)| c.clone()).collect();
                let texts = table
                    .texts(&columns, &row.0.iter().map(|(_, v)| v).collect::<Vec<_>>())
                    .map_err(|e| StoreError::Refused(format!("{e}; fix the row and resolve again")))?;
                let values = columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("${}::text::{}", i + 1, table.type_of(c).unwrap_or("text")))
                    .collect::<Vec<_>>()
                    .join(", ");
                let list = |names: &[String]| names.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
                let updates = columns
                    .iter()
                    .map(|c| format!("{0} = excluded.{0}", quote(c)))
                    .collect::<Vec<_>>()
                    .join(", ");
                let sql = format!(
                    "INSERT INTO {} ({}) VALUES ({values}) ON CONFLICT ({}) DO UPDATE SET {updates}",
                    table.qualified(),
                    list(&columns),
                    list(&table.key)
                );
                (sql, texts)
            }
        };
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for text in texts {
            query = query.bind(text);
        }
        Ok(query.execute(&mut *self.conn).await?.rows_affected())
    }

    async fn queue_deleted(&mut self, table: &PgTable, key: &Key) -> Result<(), StoreError> {
        // The outbox row carries the image the drain reads the key from: the key alone.
        let pairs = table
            .key
            .iter()
            .enumerate()
            .map(|(i, k)| {
                format!(
                    "{}, ${}::text::{}",
                    schema::literal(k),
                    i + 2,
                    table.type_of(k).unwrap_or("text")
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "INSERT INTO weft.outbox (tbl, deleted, image, at) \
             VALUES ($1, true, jsonb_build_object({pairs}), weft.now_micros())"
        );
        let mut query = sqlx::query(AssertSqlSafe(sql)).bind(table.name.clone());
        for text in key_texts(table, key)? {
            query = query.bind(text);
        }
        query.execute(&mut *self.conn).await?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(&table.name)
            .execute(&mut *self.conn)
            .await?;
        Ok(())
    }

    async fn begin_transfer(&mut self, forced: bool) -> Result<(), StoreError> {
        sqlx::query("SELECT set_config('weft.transfer', $1, true)")
            .bind(if forced { "forced" } else { "on" })
            .execute(&mut *self.conn)
            .await?;
        Ok(())
    }

    async fn move_owner_column(
        &mut self,
        table: &PgTable,
        column: &str,
        key: Option<&Key>,
        from: &str,
        to: &str,
    ) -> Result<u64, StoreError> {
        let set = format!("UPDATE {} t SET {} = $1", table.qualified(), quote(column));
        let query = match key {
            None => sqlx::query(AssertSqlSafe(format!("{set} WHERE t.{} = $2", quote(column))))
                .bind(to.to_owned())
                .bind(from.to_owned()),
            Some(key) => {
                let mut query =
                    sqlx::query(AssertSqlSafe(format!("{set} WHERE {}", table.key_predicate(2)))).bind(to.to_owned());
                for text in key_texts(table, key)? {
                    query = query.bind(text);
                }
                query
            }
        };
        Ok(query.execute(&mut *self.conn).await?.rows_affected())
    }

    async fn row_keys(&mut self, table: &PgTable, key: Option<&Key>) -> Result<Vec<Key>, StoreError> {
        let list = table
            .key_index
            .iter()
            .map(|&i| table.kinds[i].select(&format!("t.{}", quote(&table.columns[i]))))
            .collect::<Vec<_>>()
            .join(", ");
        let select = format!("SELECT {list} FROM {} t", table.qualified());
        let rows = match key {
            None => sqlx::query(AssertSqlSafe(select)).fetch_all(&mut *self.conn).await?,
            Some(key) => {
                let mut query = sqlx::query(AssertSqlSafe(format!("{select} WHERE {}", table.key_predicate(1))));
                for text in key_texts(table, key)? {
                    query = query.bind(text);
                }
                query.fetch_all(&mut *self.conn).await?
            }
        };
        rows.iter()
            .map(|row| {
                let values = table
                    .key_index
                    .iter()
                    .enumerate()
                    .map(|(n, &i)| table.kinds[i].read(row, n));
                Ok(Key(values.collect::<Result<_, _>>()?))
            })
            .collect()
    }

    async fn queue_capture(&mut self, table: &PgTable, key: &Key) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO weft.outbox (tbl, deleted, image, at) SELECT $1, false, to_jsonb(t), weft.now_micros() \
             FROM {} t WHERE {}",
            table.qualified(),
            table.key_predicate(2)
        );
        let mut query = sqlx::query(AssertSqlSafe(sql)).bind(table.name.clone());
        for text in key_texts(table, key)? {
            query = query.bind(text);
        }
        query.execute(&mut *self.conn).await?;
        Ok(())
    }

    async fn end_transfer(&mut self, record: &TransferRecord<'_>) -> Result<(), StoreError> {
        metadata::insert_transfer(self.conn, record).await?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(record.table)
            .execute(&mut *self.conn)
            .await?;
        Ok(())
    }
}
