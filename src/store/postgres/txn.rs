//! The transaction port (`store::backend::Txn`) on PostgreSQL: one transaction of the writer
//! connection. It remembers which rows exist (locked at the start of an apply, or written by
//! it since), so a write to a row that did not exist is an insert that must not find one.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use sqlx::PgConnection;

use super::apply::{self, Batch, Shape};
use super::capture;
use super::schema::PgTable;
use super::strategy;
use crate::crdt::States;
use crate::event::{Event, Key, Op, Row, Value};
use crate::replicate::RowVersion;
use crate::resolve::ownership::Owner;
use crate::store::StoreError;
use crate::store::admit::Frontier;
use crate::store::backend::{Captured, ConflictRecord, DeadLetter, Meta, Tables, Txn};
use crate::store::engine::{KnownOwner, Mode, Step, Written};

pub struct PgTxn<'t> {
    tables: &'t Tables<PgTable>,
    pub(super) conn: &'t mut PgConnection,
    batch: Batch,
    /// Rows that exist: locked at the start of an apply, or written by it since.
    exists: HashSet<(String, Vec<u8>)>,
    /// Outbox ids the drain took.
    taken: Vec<i64>,
}

impl<'t> PgTxn<'t> {
    pub(super) fn new(tables: &'t Tables<PgTable>, conn: &'t mut PgConnection) -> Self {
        Self {
            tables,
            conn,
            batch: Batch::default(),
            exists: HashSet::new(),
            taken: Vec::new(),
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

    async fn take_outbox(&mut self) -> Result<Option<Vec<Captured<PgTable>>>, StoreError> {
        let Some((captured, ids)) = capture::take_outbox(self.conn, self.tables).await? else {
            return Ok(None);
        };
        self.taken = ids;
        Ok(Some(captured))
    }

    async fn versions(&mut self, table: &str, keys: &[Vec<u8>]) -> Result<HashMap<Vec<u8>, RowVersion>, StoreError> {
        capture::load_versions(self.conn, table, keys).await
    }

    async fn write_meta(&mut self, meta: Meta<'_>) -> Result<(), StoreError> {
        let taken = if meta.outbox_taken {
            std::mem::take(&mut self.taken)
        } else {
            Vec::new()
        };
        capture::write_meta(self.conn, meta, &taken).await
    }

    async fn begin_apply(&mut self) -> Result<BTreeMap<String, Frontier>, StoreError> {
        apply::begin_apply(self.conn).await
    }

    async fn lock_rows(&mut self, events: &[&Event], nowait: bool) -> Result<bool, StoreError> {
        match apply::lock_rows(self.conn, self.tables, events, nowait).await? {
            Some(exists) => {
                self.exists = exists;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn end_apply(&mut self) -> Result<(), StoreError> {
        // `SET LOCAL` ends with the transaction.
        Ok(())
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

    async fn read_row(&mut self, table: &PgTable, key: &Key) -> Result<Option<Row>, StoreError> {
        apply::read_row(self.conn, table, key).await
    }

    async fn crdt_states(&mut self, table: &str, key: &[u8]) -> Result<States, StoreError> {
        strategy::crdt_states(self.conn, table, key).await
    }

    async fn store_crdt_states(&mut self, table: &str, key: &[u8], states: &States) -> Result<(), StoreError> {
        strategy::store_crdt_states(self.conn, table, key, states).await
    }

    async fn write_crdt_values(
        &mut self,
        table: &PgTable,
        key: &Key,
        values: &[(String, Value)],
        unless_changed_from: Option<&Row>,
    ) -> Result<(), StoreError> {
        strategy::write_crdt_values(self.conn, table, key, values, unless_changed_from).await
    }

    async fn owner(&mut self, table: &PgTable, key: &[u8]) -> Result<Option<KnownOwner>, StoreError> {
        strategy::load_owner(self.conn, &table.name, key).await
    }

    async fn store_owner(
        &mut self,
        table: &PgTable,
        key: &Key,
        owner: &Owner,
        moving_to: Option<&str>,
    ) -> Result<(), StoreError> {
        strategy::store_owner(self.conn, table, key, owner, moving_to).await
    }

    async fn siblings(&mut self, table: &str, key: &[u8]) -> Result<Vec<Event>, StoreError> {
        strategy::siblings(self.conn, table, key).await
    }

    async fn replace_siblings(
        &mut self,
        table: &str,
        key: &[u8],
        key_text: &str,
        set: &[Event],
    ) -> Result<(), StoreError> {
        strategy::replace_siblings(self.conn, table, key, key_text, set).await
    }

    async fn close_queue(&mut self, table: &str, key: &[u8], by: &str) -> Result<(), StoreError> {
        strategy::close_queue(self.conn, table, key, by).await
    }

    async fn insert_conflict(&mut self, record: &ConflictRecord<'_>) -> Result<(), StoreError> {
        strategy::insert_conflict(self.conn, record).await
    }

    async fn insert_dead_letter(&mut self, letter: &DeadLetter<'_>) -> Result<(), StoreError> {
        strategy::insert_dead_letter(self.conn, letter).await
    }
}
