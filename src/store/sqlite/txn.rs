//! The transaction port (`store::backend::Txn`) on SQLite: one `BEGIN IMMEDIATE`
//! transaction of the writer connection, holding the database's write lock until commit.
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use sqlx::SqliteConnection;

use super::apply::{self, Batch};
use super::capture::{self, Taken};
use super::schema::TableInfo;
use super::strategy;
use crate::crdt::States;
use crate::event::{Event, Key, Row, Value};
use crate::replicate::RowVersion;
use crate::resolve::ownership::Owner;
use crate::store::StoreError;
use crate::store::admit::Frontier;
use crate::store::backend::{Captured, ConflictRecord, DeadLetter, Meta, Tables, Txn};
use crate::store::engine::{KnownOwner, Mode, Step, Written};

pub struct SqliteTxn<'t> {
    tables: &'t Tables<TableInfo>,
    pub(super) conn: &'t mut SqliteConnection,
    batch: Batch,
    taken: Option<Taken>,
}

impl<'t> SqliteTxn<'t> {
    pub(super) fn new(tables: &'t Tables<TableInfo>, conn: &'t mut SqliteConnection) -> Self {
        Self {
            tables,
            conn,
            batch: Batch::default(),
            taken: None,
        }
    }
}

impl Txn for SqliteTxn<'_> {
    type Table = TableInfo;
    // A drain holds the database's write lock: the row is as it was imaged.
    const DRAIN_HOLDS_ROWS: bool = true;

    fn table(&self, name: &str) -> Option<Arc<TableInfo>> {
        self.tables.get(name).cloned()
    }

    async fn take_outbox(&mut self) -> Result<Option<Vec<Captured<TableInfo>>>, StoreError> {
        let Some((captured, taken)) = capture::take_outbox(self.conn, self.tables).await? else {
            return Ok(None);
        };
        self.taken = Some(taken);
        Ok(Some(captured))
    }

    async fn versions(&mut self, table: &str, keys: &[Vec<u8>]) -> Result<HashMap<Vec<u8>, RowVersion>, StoreError> {
        capture::load_versions(self.conn, table, keys).await
    }

    async fn write_meta(&mut self, meta: Meta<'_>) -> Result<(), StoreError> {
        let taken = if meta.outbox_taken { self.taken.take() } else { None };
        capture::write_meta(self.conn, meta, taken).await
    }

    async fn begin_apply(&mut self) -> Result<BTreeMap<String, Frontier>, StoreError> {
        apply::begin_apply(self.conn).await
    }

    async fn lock_rows(&mut self, _events: &[&Event], _nowait: bool) -> Result<bool, StoreError> {
        // `BEGIN IMMEDIATE` holds the write lock of the whole database already.
        Ok(true)
    }

    async fn end_apply(&mut self) -> Result<(), StoreError> {
        apply::end_apply(self.conn).await
    }

    async fn write(&mut self, table: &Arc<TableInfo>, event: &Event, mode: Mode) -> Step {
        match self.batch.push(self.conn, table, event).await? {
            Written::Done if mode == Mode::EventByEvent => self.flush().await,
            written => Ok(written),
        }
    }

    async fn flush(&mut self) -> Step {
        Ok(self.batch.flush(self.conn).await?)
    }

    async fn read_row(&mut self, table: &TableInfo, key: &Key) -> Result<Option<Row>, StoreError> {
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
        table: &TableInfo,
        key: &Key,
        values: &[(String, Value)],
        _unless_changed_from: Option<&Row>,
    ) -> Result<(), StoreError> {
        strategy::write_crdt_values(self.conn, table, key, values).await
    }

    async fn owner(&mut self, table: &TableInfo, key: &[u8]) -> Result<Option<KnownOwner>, StoreError> {
        strategy::owner(self.conn, &table.name, key).await
    }

    async fn store_owner(
        &mut self,
        table: &TableInfo,
        key: &Key,
        owner: &Owner,
        moving_to: Option<&str>,
    ) -> Result<(), StoreError> {
        strategy::store_owner(self.conn, &table.name, key, owner, moving_to).await
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
