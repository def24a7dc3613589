//! PostgreSQL's row IO for the shared strategy engine (`store::engine`), inside the writer's
//! open transaction: grouped `unnest` writes (event by event under savepoints, so a refused
//! write leaves nothing behind), row reads, and the strategy tables `weft.crdt`,
//! `weft.owners`, `weft.siblings` and `weft.queue`.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use sqlx::{AssertSqlSafe, PgConnection, Row as _};

use super::PgStore;
use super::apply::{Pending, Shape, read_row};
use super::capture::load_versions;
use super::schema::{PgTable, quote};
use crate::config::{OwnerRule, Strategy};
use crate::crdt::{ColumnState, CrdtType, States};
use crate::event::{Event, Key, Op, Row, Value};
use crate::replicate::RowVersion;
use crate::resolve::Winner;
use crate::resolve::ownership::Owner;
use crate::store::engine::{KnownOwner, Mode, Rows, Step, TableRules};
use crate::store::{ApplyReport, StoreError};
use crate::wire;

impl TableRules for PgTable {
    fn name(&self) -> &str {
        &self.name
    }
    fn columns(&self) -> &[String] {
        &self.columns
    }
    fn key(&self) -> &[String] {
        &self.key
    }
    fn strategy(&self) -> Strategy {
        self.strategy
    }
    fn crdt(&self) -> &BTreeMap<String, CrdtType> {
        &self.crdt
    }
    fn owner_column(&self) -> Option<&String> {
        self.owner_column.as_ref()
    }
    fn owner_rule(&self) -> Option<&OwnerRule> {
        self.owner_rule.as_ref()
    }
}

/// The engine's view of the writer's transaction.
pub(super) struct PgRows<'a> {
    store: &'a PgStore,
    tx: &'a mut PgConnection,
    pending: Pending,
    /// Rows that exist (locked at the start of an apply, or written by it since).
    exists: &'a mut HashSet<(String, Vec<u8>)>,
}

impl<'a> PgRows<'a> {
    pub fn new(store: &'a PgStore, tx: &'a mut PgConnection, exists: &'a mut HashSet<(String, Vec<u8>)>) -> Self {
        Self {
            store,
            tx,
            pending: Pending::default(),
            exists,
        }
    }
}

/// The key's values as text for binding; a key that does not fit is corrupt metadata.
fn key_texts(table: &PgTable, key: &Key) -> Result<Vec<Option<String>>, StoreError> {
    table
        .texts(&table.key, &key.0.iter().collect::<Vec<_>>())
        .map_err(|e| StoreError::Corrupt(format!("key {key} of table {}: {e}", table.name)))
}

/// Records a row's owner, with a transfer made here (`moving_to`) or clearing one.
pub(crate) async fn store_owner(
    conn: &mut PgConnection,
    table: &PgTable,
    key_bytes: &[u8],
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
        .bind(key_bytes)
        .bind(&owner.region)
        .bind(owner.epoch as i64)
        .bind(moving_to);
    for text in key_texts(table, key)? {
        query = query.bind(text);
    }
    query.execute(&mut *conn).await?;
    Ok(())
}

/// What is recorded of a row's owner.
pub(crate) async fn load_owner(
    conn: &mut PgConnection,
    table: &str,
    key: &[u8],
) -> Result<Option<KnownOwner>, StoreError> {
    let row = sqlx::query("SELECT owner, epoch, moving_to FROM weft.owners WHERE tbl = $1 AND key = $2")
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

/// The siblings of a `queue` row, oldest (hlc, origin) first.
pub(crate) async fn siblings(conn: &mut PgConnection, table: &str, key: &[u8]) -> Result<Vec<Event>, StoreError> {
    let rows: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT event FROM weft.siblings WHERE tbl = $1 AND key = $2 ORDER BY hlc, origin")
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

impl Rows for PgRows<'_> {
    type Table = PgTable;

    fn table(&self, name: &str) -> Option<Arc<PgTable>> {
        self.store.tables.get(name).cloned()
    }

    async fn versions(&mut self, table: &str, keys: &[Vec<u8>]) -> Result<HashMap<Vec<u8>, RowVersion>, StoreError> {
        load_versions(self.tx, table, keys).await
    }

    async fn write(&mut self, table: &Arc<PgTable>, event: &Event, mode: Mode) -> Step {
        let id = (table.name.clone(), event.key.to_bytes());
        let (shape, values) = match &event.op {
            Op::Upsert(row) => {
                let columns: Vec<String> = row.0.iter().map(|(c, _)| c.clone()).collect();
                let values: Vec<&Value> = row.0.iter().map(|(_, v)| v).collect();
                let values = table.texts(&columns, &values);
                let shape = if self.exists.contains(&id) {
                    Shape::Upsert {
                        table: table.name.clone(),
                        columns,
                    }
                } else {
                    Shape::Insert {
                        table: table.name.clone(),
                        columns,
                    }
                };
                (shape, values)
            }
            Op::Delete => (
                Shape::Delete {
                    table: table.name.clone(),
                },
                table.texts(&table.key, &event.key.0.iter().collect::<Vec<_>>()),
            ),
        };
        let values = match values {
            Ok(values) => values,
            Err(reason) => return Ok(Ok(Err(reason))),
        };
        let is_delete = matches!(shape, Shape::Delete { .. });
        let one_by_one = mode == Mode::EventByEvent;
        if one_by_one {
            sqlx::raw_sql("SAVEPOINT weft_event").execute(&mut *self.tx).await?;
        }
        let mut written = match self.pending.push(self.tx, shape, table, id.1.clone(), values).await? {
            Ok(written) => written,
            Err(stop) => return Ok(Err(stop)),
        };
        if one_by_one && written.is_ok() {
            written = match self.pending.flush(self.tx).await? {
                Ok(written) => written,
                Err(stop) => return Ok(Err(stop)),
            };
        }
        match &written {
            Ok(()) => {
                if one_by_one {
                    sqlx::raw_sql("RELEASE SAVEPOINT weft_event")
                        .execute(&mut *self.tx)
                        .await?;
                }
                if is_delete {
                    self.exists.remove(&id);
                } else {
                    self.exists.insert(id);
                }
            }
            Err(_) if one_by_one => {
                sqlx::raw_sql("ROLLBACK TO SAVEPOINT weft_event")
                    .execute(&mut *self.tx)
                    .await?;
            }
            Err(_) => {}
        }
        Ok(Ok(written))
    }

    async fn flush(&mut self) -> Step {
        self.pending.flush(self.tx).await
    }

    async fn read_row(&mut self, table: &PgTable, key: &Key) -> Result<Option<Row>, StoreError> {
        read_row(self.tx, table, key).await
    }

    async fn crdt_states(&mut self, table: &str, key: &[u8]) -> Result<States, StoreError> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT col, state FROM weft.crdt WHERE tbl = $1 AND key = $2")
                .bind(table)
                .bind(key)
                .fetch_all(&mut *self.tx)
                .await?;
        rows.into_iter()
            .map(|(column, state)| {
                let state = ColumnState::from_json(&column, &state).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok((column, state))
            })
            .collect()
    }

    async fn store_crdt_states(&mut self, table: &str, key: &[u8], states: &States) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO weft.crdt (tbl, key, col, state) SELECT $1, $2, c, s FROM unnest($3::text[], $4::text[]) AS u(c, s) \
             ON CONFLICT (tbl, key, col) DO UPDATE SET state = excluded.state",
        )
        .bind(table)
        .bind(key)
        .bind(states.keys().collect::<Vec<_>>())
        .bind(states.values().map(ColumnState::to_json).collect::<Vec<_>>())
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn write_crdt_values(
        &mut self,
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
            .execute(&mut *self.tx)
            .await?;
        let sql = format!("UPDATE {} t SET {sets} WHERE {predicate}", table.qualified());
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for text in new.into_iter().chain(key_texts(table, key)?).chain(old) {
            query = query.bind(text);
        }
        query.execute(&mut *self.tx).await?;
        Ok(())
    }

    async fn owner(&mut self, table: &PgTable, key: &[u8]) -> Result<Option<KnownOwner>, StoreError> {
        load_owner(self.tx, &table.name, key).await
    }

    async fn store_owner(
        &mut self,
        table: &PgTable,
        key_bytes: &[u8],
        key: &Key,
        owner: &Owner,
    ) -> Result<(), StoreError> {
        store_owner(self.tx, table, key_bytes, key, owner, None).await
    }

    async fn siblings(&mut self, table: &str, key: &[u8]) -> Result<Vec<Event>, StoreError> {
        siblings(self.tx, table, key).await
    }

    async fn replace_siblings(
        &mut self,
        table: &str,
        key: &[u8],
        key_text: &str,
        set: &[Event],
    ) -> Result<(), StoreError> {
        // Two statements: a CTE's delete is not visible to its sibling insert.
        sqlx::query("DELETE FROM weft.siblings WHERE tbl = $1 AND key = $2")
            .bind(table)
            .bind(key)
            .execute(&mut *self.tx)
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
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn close_queue(&mut self, table: &str, key: &[u8], by: &str) -> Result<(), StoreError> {
        sqlx::query(
            "WITH gone AS (DELETE FROM weft.siblings WHERE tbl = $1 AND key = $2 RETURNING 1) \
             UPDATE weft.queue SET closed_at = weft.now_micros(), closed_by = $3 \
             WHERE tbl = $1 AND key = $2 AND closed_at IS NULL AND EXISTS (SELECT 1 FROM gone)",
        )
        .bind(table)
        .bind(key)
        .bind(by)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn log_conflict(
        &mut self,
        table: &PgTable,
        event: &Event,
        local: &RowVersion,
        local_row: Option<&Row>,
        winner: Winner,
    ) -> Result<(), StoreError> {
        self.store
            .log_conflict(self.tx, table, event, local, local_row, winner)
            .await
    }

    async fn dead_letter(&mut self, event: &Event, reason: &str, report: &mut ApplyReport) -> Result<(), StoreError> {
        self.store.dead_letter(self.tx, event, reason, report).await
    }
}
