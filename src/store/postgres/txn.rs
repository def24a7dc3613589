//! The transaction port (`store::backend::Txn`) on PostgreSQL: one transaction of the writer
//! connection. It remembers which rows exist (locked at the start of an apply, or written by
//! it since), so a write to a row that did not exist is an insert that must not find one.
use std::collections::HashSet;
use std::sync::Arc;

use sqlx::PgConnection;

use super::apply::{self, Batch, Shape};
use super::capture;
use super::schema::PgTable;
use super::{metadata, strategy};
use crate::event::{Event, Op, Value};
use crate::store::StoreError;
use crate::store::backend::{Tables, Txn};
use crate::store::engine::{Mode, Step, Written};

pub struct PgTxn<'t> {
    tables: &'t Tables<PgTable>,
    pub(super) conn: &'t mut PgConnection,
    batch: Batch,
    /// Rows that exist: locked at the start of an apply, or written by it since.
    exists: HashSet<(String, Vec<u8>)>,
    /// Outbox ids the drain took.
    taken: Option<capture::Taken>,
}

impl<'t> PgTxn<'t> {
    pub(super) fn new(tables: &'t Tables<PgTable>, conn: &'t mut PgConnection) -> Self {
        Self {
            tables,
            conn,
            batch: Batch::default(),
            exists: HashSet::new(),
            taken: None,
        }
    }

    /// The write's shape and its values as text, or why the table cannot hold them.
    fn shaped(
        &self,
        table: &PgTable,
        event: &Event,
        id: &(String, Vec<u8>),
    ) -> Result<(Shape, Vec<Option<String>>), String> {
        Ok(match &event.op {
            Op::Upsert(row) => {
                let columns: Vec<String> = row.0.iter().map(|(c, _)| c.clone()).collect();
                let values: Vec<&Value> = row.0.iter().map(|(_, v)| v).collect();
                let values = table.texts(&columns, &values)?;
                let table = table.name.clone();
                let shape = match self.exists.contains(id) {
                    true => Shape::Upsert { table, columns },
                    false => Shape::Insert { table, columns },
                };
                (shape, values)
            }
            Op::Undecodable { reason, .. } => return Err(reason.clone()),
            Op::Delete => (
                Shape::Delete {
                    table: table.name.clone(),
                },
                table.texts(&table.key, &event.key.0.iter().collect::<Vec<_>>())?,
            ),
        })
    }

    /// Queues (and event by event, executes under a savepoint) one write.
    async fn queue_write(
        &mut self,
        shape: Shape,
        table: &Arc<PgTable>,
        key: Vec<u8>,
        values: Vec<Option<String>>,
        one_by_one: bool,
    ) -> Step {
        if one_by_one {
            sqlx::raw_sql("SAVEPOINT weft_event").execute(&mut *self.conn).await?;
        }
        let mut written = self.batch.push(self.conn, shape, table, key, values).await?;
        if one_by_one && written == Written::Done {
            written = self.batch.flush(self.conn).await?;
        }
        if one_by_one {
            let end = match written {
                Written::Done => "RELEASE SAVEPOINT weft_event",
                Written::Refused(_) => "ROLLBACK TO SAVEPOINT weft_event",
            };
            sqlx::raw_sql(end).execute(&mut *self.conn).await?;
        }
        Ok(written)
    }
}

impl Txn for PgTxn<'_> {
    type Table = PgTable;
    // A drain does not lock the rows it images: an application may change them meanwhile.
    const DRAIN_HOLDS_ROWS: bool = false;

    fn table(&self, name: &str) -> Option<Arc<PgTable>> {
        self.tables.get(name).cloned()
    }

    crate::store::backend::forward_txn_io!();

    async fn lock_rows(&mut self, events: &[&Event], nowait: bool) -> Result<bool, StoreError> {
        match apply::lock_rows(self.conn, self.tables, events, nowait).await? {
            Some(exists) => {
                self.exists = exists;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn write(&mut self, table: &Arc<PgTable>, event: &Event, mode: Mode) -> Step {
        let id = (table.name.clone(), event.key.to_bytes());
        let (shape, values) = match self.shaped(table, event, &id) {
            Ok(shaped) => shaped,
            Err(reason) => return Ok(Written::Refused(reason)),
        };
        let is_delete = matches!(shape, Shape::Delete { .. });
        let written = self
            .queue_write(shape, table, id.1.clone(), values, mode == Mode::EventByEvent)
            .await?;
        if written == Written::Done {
            if is_delete {
                self.exists.remove(&id);
            } else {
                self.exists.insert(id);
            }
        }
        Ok(written)
    }

    async fn flush(&mut self) -> Step {
        self.batch.flush(self.conn).await
    }

    async fn foreign_keys_unchecked(&mut self) -> Result<bool, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT current_setting('session_replication_role') = 'replica'")
                .fetch_one(&mut *self.conn)
                .await?,
        )
    }
}
