//! SQLite's row IO for the shared strategy engine (`store::engine`): writes grouped into
//! multi-row statements (or executed one by one), row reads, CRDT states, owners, siblings,
//! the conflict log and dead letters, all inside the caller's write transaction.
//!
//! A statement SQLite refuses is rolled back whole by SQLite itself, so an event-by-event
//! write that is refused leaves nothing behind.
use std::collections::HashMap;
use std::sync::Arc;

use sqlx::SqliteConnection;

use super::SqliteStore;
use super::apply::rejects_event;
use super::bulk;
use super::capture::read_row;
use super::crdt;
use super::owners;
use super::queue;
use super::schema::{TableInfo, quote};
use crate::config::{OwnerRule, Strategy};
use crate::crdt::{CrdtType, States};
use crate::event::{Event, Key, Op, Row, Value};
use crate::replicate::RowVersion;
use crate::resolve::Winner;
use crate::resolve::ownership::Owner;
use crate::store::engine::{KnownOwner, Mode, Rows, Step, TableRules};
use crate::store::{ApplyReport, StoreError};

impl TableRules for TableInfo {
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
    fn crdt(&self) -> &std::collections::BTreeMap<String, CrdtType> {
        &self.crdt
    }
    fn owner_column(&self) -> Option<&String> {
        self.owner_column.as_ref()
    }
    fn owner_rule(&self) -> Option<&OwnerRule> {
        self.owner_rule.as_ref()
    }
    fn refuses(&self, event: &Event) -> Option<String> {
        if let Op::Upsert(row) = &event.op
            && let Some((column, _)) = row.0.iter().find(|(_, v)| matches!(v, Value::Real(f) if f.is_nan()))
        {
            return Some(format!(
                "column `{column}` holds NaN, which SQLite cannot store (it would read back as NULL)"
            ));
        }
        None
    }
}

/// What a group of consecutive writes does; a new shape starts a new group.
#[derive(PartialEq)]
enum Shape {
    Upsert { table: String, columns: Vec<String> },
    Delete { table: String },
}

/// Writes waiting to be executed, all of one shape.
#[derive(Default)]
struct Pending {
    shape: Option<(Shape, Arc<TableInfo>)>,
    rows: Vec<Vec<Value>>,
}

/// The engine's view of a SQLite write transaction.
pub(super) struct SqliteRows<'a> {
    pub store: &'a SqliteStore,
    pub tx: &'a mut SqliteConnection,
    pending: Pending,
}

impl<'a> SqliteRows<'a> {
    pub fn new(store: &'a SqliteStore, tx: &'a mut SqliteConnection) -> Self {
        Self {
            store,
            tx,
            pending: Pending::default(),
        }
    }

    /// Queues the event's write, flushing first if the shape changes.
    async fn push(&mut self, table: &Arc<TableInfo>, event: &Event) -> Step {
        let (shape, values) = match &event.op {
            Op::Upsert(row) => (
                Shape::Upsert {
                    table: table.name.clone(),
                    columns: row.0.iter().map(|(c, _)| c.clone()).collect(),
                },
                row.0.iter().map(|(_, v)| v.clone()).collect(),
            ),
            Op::Delete => (
                Shape::Delete {
                    table: table.name.clone(),
                },
                event.key.0.clone(),
            ),
        };
        if self
            .pending
            .shape
            .as_ref()
            .is_some_and(|(current, _)| *current != shape)
        {
            match self.flush().await? {
                Ok(Ok(())) => {}
                other => return Ok(other),
            }
        }
        if self.pending.shape.is_none() {
            self.pending.shape = Some((shape, table.clone()));
        }
        self.pending.rows.push(values);
        Ok(Ok(Ok(())))
    }
}

impl Rows for SqliteRows<'_> {
    type Table = TableInfo;

    fn table(&self, name: &str) -> Option<Arc<TableInfo>> {
        self.store.tables.get(name).cloned()
    }

    async fn versions(&mut self, table: &str, keys: &[Vec<u8>]) -> Result<HashMap<Vec<u8>, RowVersion>, StoreError> {
        bulk::load_versions(self.tx, table, keys).await
    }

    async fn write(&mut self, table: &Arc<TableInfo>, event: &Event, mode: Mode) -> Step {
        match self.push(table, event).await? {
            Ok(Ok(())) if mode == Mode::EventByEvent => self.flush().await,
            other => Ok(other),
        }
    }

    async fn flush(&mut self) -> Step {
        let Some((shape, table)) = self.pending.shape.take() else {
            return Ok(Ok(Ok(())));
        };
        let rows = std::mem::take(&mut self.pending.rows);
        let keys = table.key.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ");
        let result = match &shape {
            Shape::Upsert { columns, .. } => {
                let updates: Vec<String> = columns
                    .iter()
                    .filter(|c| !table.key.contains(c))
                    .map(|c| format!("{0} = excluded.{0}", quote(c)))
                    .collect();
                let on_conflict = if updates.is_empty() {
                    " ON CONFLICT DO NOTHING".to_owned()
                } else {
                    format!(" ON CONFLICT ({keys}) DO UPDATE SET {}", updates.join(", "))
                };
                let names = columns.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
                let head = format!("INSERT INTO {} ({names}) VALUES", quote(&table.name));
                bulk::insert(self.tx, &head, &on_conflict, columns.len(), &rows).await
            }
            Shape::Delete { .. } => {
                let head = format!("DELETE FROM {} WHERE ({keys}) IN (VALUES", quote(&table.name));
                bulk::insert(self.tx, &head, ")", table.key.len(), &rows).await
            }
        };
        match result {
            Ok(()) => Ok(Ok(Ok(()))),
            Err(error) => match rejects_event(&error) {
                Some(reason) => Ok(Ok(Err(reason))),
                None => Err(error.into()),
            },
        }
    }

    async fn read_row(&mut self, table: &TableInfo, key: &Key) -> Result<Option<Row>, StoreError> {
        read_row(self.tx, table, key).await
    }

    async fn crdt_states(&mut self, table: &str, key: &[u8]) -> Result<States, StoreError> {
        crdt::load(self.tx, table, key).await
    }

    async fn store_crdt_states(&mut self, table: &str, key: &[u8], states: &States) -> Result<(), StoreError> {
        crdt::store(self.tx, table, key, states).await
    }

    async fn write_crdt_values(
        &mut self,
        table: &TableInfo,
        key: &Key,
        values: &[(String, Value)],
        _unless_changed_from: Option<&Row>,
    ) -> Result<(), StoreError> {
        // A SQLite drain holds the database's write lock: the row is as it was imaged.
        crdt::write_values(self.tx, table, key, values).await
    }

    async fn owner(&mut self, table: &TableInfo, key: &[u8]) -> Result<Option<KnownOwner>, StoreError> {
        owners::load_known(self.tx, &table.name, key).await
    }

    async fn store_owner(
        &mut self,
        table: &TableInfo,
        key_bytes: &[u8],
        key: &Key,
        owner: &Owner,
    ) -> Result<(), StoreError> {
        owners::store(self.tx, &table.name, key_bytes, key, owner, None).await
    }

    async fn siblings(&mut self, table: &str, key: &[u8]) -> Result<Vec<Event>, StoreError> {
        queue::siblings(self.tx, table, key).await
    }

    async fn replace_siblings(
        &mut self,
        table: &str,
        key: &[u8],
        key_text: &str,
        set: &[Event],
    ) -> Result<(), StoreError> {
        queue::replace(self.tx, table, key, key_text, set).await
    }

    async fn close_queue(&mut self, table: &str, key: &[u8], by: &str) -> Result<(), StoreError> {
        queue::close(self.tx, table, key, by).await
    }

    async fn log_conflict(
        &mut self,
        table: &TableInfo,
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
