//! The transaction port (`store::backend::Txn`) on SQLite: one `BEGIN IMMEDIATE`
//! transaction of the writer connection, holding the database's write lock until commit.
use std::sync::Arc;

use sqlx::SqliteConnection;

use super::apply::{self, Batch};
use super::capture::{self, Taken};
use super::schema::TableInfo;
use super::{metadata, strategy};
use crate::event::Event;
use crate::store::StoreError;
use crate::store::backend::{Tables, Txn};
use crate::store::engine::{Mode, Step, Written};

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

    crate::store::backend::forward_txn_io!();

    async fn lock_rows(&mut self, _events: &[&Event], _nowait: bool) -> Result<bool, StoreError> {
        // `BEGIN IMMEDIATE` holds the write lock of the whole database already.
        Ok(true)
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

    async fn foreign_keys_unchecked(&mut self) -> Result<bool, StoreError> {
        let on: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(&mut *self.conn)
            .await?;
        Ok(on == 0)
    }
}
