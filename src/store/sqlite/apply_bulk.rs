//! The set-based apply path: one bulk read of row versions, decisions in memory in event
//! order, consecutive writes of the same shape grouped into multi-row statements, one bulk
//! write of the new versions.
//!
//! It gives the same result as applying event by event: decisions see the versions left by
//! earlier events of the run (the in-memory map), pending writes are flushed before any local
//! row is read, and a write the database refuses makes the caller roll back and replay event
//! by event (this path never dead-letters a refused write itself).
use std::collections::HashMap;
use std::sync::Arc;

use sqlx::SqliteConnection;

use super::SqliteStore;
use super::apply::{rejects_event, shape_problem};
use super::bulk;
use super::capture::read_row;
use super::schema::{TableInfo, quote};
use crate::config::Strategy;
use crate::event::{Event, Op, Value};
use crate::replicate::{Decision, RowVersion, decide};
use crate::resolve::Winner;
use crate::store::{ApplyReport, StoreError};

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

impl Pending {
    /// Queues the event's write. `Ok(false)`: a flush was refused for content.
    async fn push(
        &mut self,
        tx: &mut SqliteConnection,
        table: &Arc<TableInfo>,
        event: &Event,
    ) -> Result<bool, StoreError> {
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
        if self.shape.as_ref().is_some_and(|(current, _)| *current != shape) && !self.flush(tx).await? {
            return Ok(false);
        }
        if self.shape.is_none() {
            self.shape = Some((shape, table.clone()));
        }
        self.rows.push(values);
        Ok(true)
    }

    /// Executes what is queued. `Ok(false)`: the database refused it for content.
    async fn flush(&mut self, tx: &mut SqliteConnection) -> Result<bool, StoreError> {
        let Some((shape, table)) = self.shape.take() else {
            return Ok(true);
        };
        let rows = std::mem::take(&mut self.rows);
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
                bulk::insert(tx, &head, &on_conflict, columns.len(), &rows).await
            }
            Shape::Delete { .. } => {
                let head = format!("DELETE FROM {} WHERE ({keys}) IN (VALUES", quote(&table.name));
                bulk::insert(tx, &head, ")", table.key.len(), &rows).await
            }
        };
        match result {
            Ok(()) => Ok(true),
            Err(error) if rejects_event(&error).is_some() => Ok(false),
            Err(error) => Err(error.into()),
        }
    }
}

impl SqliteStore {
    /// Applies admitted events. `Ok(false)`: a write was refused; the caller must roll back.
    pub(super) async fn apply_bulk(
        &self,
        tx: &mut SqliteConnection,
        events: &[&Event],
        report: &mut ApplyReport,
    ) -> Result<bool, StoreError> {
        // Versions of every row the run touches, in one read per table.
        let mut keys: HashMap<&str, Vec<Vec<u8>>> = HashMap::new();
        for event in events {
            if self.tables.contains_key(&event.table) {
                keys.entry(event.table.as_str()).or_default().push(event.key.to_bytes());
            }
        }
        let mut versions: HashMap<(String, Vec<u8>), RowVersion> = HashMap::new();
        for (table, keys) in keys {
            for (key, version) in bulk::load_versions(tx, table, &keys).await? {
                versions.insert((table.to_owned(), key), version);
            }
        }

        let mut pending = Pending::default();
        let mut changed: Vec<(String, Vec<u8>)> = Vec::new();
        for &event in events {
            let Some(table) = self.tables.get(&event.table).cloned() else {
                let reason = format!(
                    "table `{}` is not replicated on this node; add it to the node config",
                    event.table
                );
                self.dead_letter(tx, event, &reason, report).await?;
                continue;
            };
            if let Some(reason) = shape_problem(&table, event) {
                self.dead_letter(tx, event, &reason, report).await?;
                continue;
            }
            let id = (table.name.clone(), event.key.to_bytes());
            let local = versions.get(&id).cloned();
            let strategy = Strategy::Lww;
            let mut decision = decide(strategy, local.as_ref(), event, None);
            let needs_row = matches!(decision, Decision::NeedsLocalContent | Decision::Conflict { .. });
            let mut local_row = None;
            if needs_row {
                if !pending.flush(tx).await? {
                    return Ok(false);
                }
                local_row = read_row(tx, &table, &event.key).await?;
            }
            if decision == Decision::NeedsLocalContent {
                let content = local_row.clone().map(Op::Upsert).unwrap_or(Op::Delete).content_bytes();
                decision = decide(strategy, local.as_ref(), event, Some(&content));
            }
            match decision {
                Decision::Stale => report.stale += 1,
                Decision::NeedsLocalContent => unreachable!("content was supplied"),
                Decision::FastForward { next } => {
                    if !pending.push(tx, &table, event).await? {
                        return Ok(false);
                    }
                    versions.insert(id.clone(), next);
                    changed.push(id);
                    report.applied += 1;
                }
                Decision::Conflict { winner, next } => {
                    if winner == Winner::Remote {
                        if !pending.push(tx, &table, event).await? {
                            return Ok(false);
                        }
                        report.applied += 1;
                    }
                    let local = local.expect("a conflict needs a local version");
                    self.log_conflict(tx, &table, event, &local, local_row.as_ref(), winner)
                        .await?;
                    report.conflicts += 1;
                    versions.insert(id.clone(), next);
                    changed.push(id);
                }
            }
        }
        if !pending.flush(tx).await? {
            return Ok(false);
        }
        changed.sort();
        changed.dedup();
        let stored: Vec<(&str, &[u8], &RowVersion)> = changed
            .iter()
            .map(|id| (id.0.as_str(), id.1.as_slice(), &versions[id]))
            .collect();
        bulk::store_versions(tx, &stored).await?;
        Ok(true)
    }
}
