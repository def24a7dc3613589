//! Deciding and writing a run of admitted events: one bulk read of row versions, decisions
//! in memory in event order, writes grouped into multi-row statements (or one by one), one
//! bulk write of the new versions.
//!
//! Decisions see the versions left by earlier events of the run (the in-memory map), and
//! pending writes are flushed before any local row is read, so grouping never changes a
//! result. In `Mode::Grouped` a refused write aborts the run (the caller rolls back and
//! replays in `Mode::EventByEvent`, which dead-letters exactly the refused events).
use std::collections::HashMap;
use std::sync::Arc;

use sqlx::SqliteConnection;

use super::SqliteStore;
use super::apply::{rejects_event, shape_problem};
use super::bulk;
use super::capture::read_row;
use super::crdt;
use super::owners;
use super::queue;
use super::schema::{TableInfo, quote};
use crate::event::{Event, Op, Value};
use crate::replicate::{Decision, RowVersion, decide};
use crate::resolve::Winner;
use crate::resolve::ownership;
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
    /// Queues the event's write; `Err(reason)` if flushing earlier writes was refused.
    async fn push(
        &mut self,
        tx: &mut SqliteConnection,
        table: &Arc<TableInfo>,
        event: &Event,
    ) -> Result<Result<(), String>, StoreError> {
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
        if self.shape.as_ref().is_some_and(|(current, _)| *current != shape)
            && let Err(reason) = self.flush(tx).await?
        {
            return Ok(Err(reason));
        }
        if self.shape.is_none() {
            self.shape = Some((shape, table.clone()));
        }
        self.rows.push(values);
        Ok(Ok(()))
    }

    /// Executes what is queued; `Err(reason)`: the database refused it for its content.
    async fn flush(&mut self, tx: &mut SqliteConnection) -> Result<Result<(), String>, StoreError> {
        let Some((shape, table)) = self.shape.take() else {
            return Ok(Ok(()));
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
            Ok(()) => Ok(Ok(())),
            Err(error) => match rejects_event(&error) {
                Some(reason) => Ok(Err(reason)),
                None => Err(error.into()),
            },
        }
    }
}

/// How a run's writes reach the database.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Consecutive writes grouped into multi-row statements; a refused group aborts the run.
    Grouped,
    /// Each write on its own; a refused write dead-letters just that event.
    EventByEvent,
}

/// An event's CRDT states merged into the row's local states.
struct Merged {
    states: crdt::States,
    values: Vec<(String, Value)>,
    /// The event brought something the local states did not have.
    changed: bool,
}

impl SqliteStore {
    /// Merges the event's CRDT states into the row's (crdt tables only). `Ok(Err(reason))`:
    /// the states cannot merge (a column's type differs between nodes).
    async fn merge_crdt(
        &self,
        tx: &mut SqliteConnection,
        table: &TableInfo,
        key: &[u8],
        event: &Event,
    ) -> Result<Result<Option<Merged>, String>, StoreError> {
        if table.crdt.is_empty() {
            return Ok(Ok(None));
        }
        let mut states = crdt::load(tx, &table.name, key).await?;
        let changed = match crate::resolve::crdt::merge_remote(&table.crdt, &mut states, &event.crdt) {
            Ok(changed) => changed,
            Err(error) => return Ok(Err(error.to_string())),
        };
        let values = crdt::materialize(table, &states)?;
        Ok(Ok(Some(Merged {
            changed,
            states,
            values,
        })))
    }

    /// Stores merged states and, if asked, writes their values into the existing row.
    async fn settle_crdt(
        &self,
        tx: &mut SqliteConnection,
        table: &TableInfo,
        key: &[u8],
        event: &Event,
        merged: Merged,
        update_row: bool,
    ) -> Result<(), StoreError> {
        if update_row {
            crdt::write_values(tx, table, &event.key, &merged.values).await?;
        }
        if merged.changed {
            crdt::store(tx, &table.name, key, &merged.states).await?;
        }
        Ok(())
    }

    /// Applies admitted events in order. `Ok(false)`: in `Mode::Grouped` a write was refused
    /// and the caller must roll back and replay in `Mode::EventByEvent`.
    pub(super) async fn apply_events(
        &self,
        tx: &mut SqliteConnection,
        events: &[&Event],
        report: &mut ApplyReport,
        mode: Mode,
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
            let strategy = table.strategy;
            // CRDT columns merge whatever the row-level decision; their values follow.
            let merged = match self.merge_crdt(tx, &table, &id.1, event).await? {
                Ok(merged) => merged,
                Err(reason) => {
                    self.dead_letter(tx, event, &reason, report).await?;
                    continue;
                }
            };
            let local_row_exists = local.as_ref().is_some_and(|l| !l.deleted);
            let mut decision = decide(strategy, local.as_ref(), event, None);
            let mut local_row = None;
            if matches!(decision, Decision::NeedsLocalContent | Decision::Conflict { .. }) {
                // The local row as earlier events of this run left it.
                if pending.flush(tx).await?.is_err() {
                    return Ok(false);
                }
                local_row = read_row(tx, &table, &event.key).await?;
            }
            if decision == Decision::NeedsLocalContent {
                let content = local_row.clone().map(Op::Upsert).unwrap_or(Op::Delete).content_bytes();
                decision = decide(strategy, local.as_ref(), event, Some(&content));
            }
            let conflict = matches!(decision, Decision::Conflict { .. });
            let mut claimed = None;
            if table.is_owned() && decision != Decision::Stale {
                let known = owners::load(tx, &table.name, &id.1).await?;
                let rule = table.owner_rule.as_ref().map(|r| (r, table.key.as_slice()));
                match ownership::judge_remote(
                    rule,
                    &event.key,
                    known,
                    &event.origin_region,
                    event.ownership.as_ref(),
                    conflict,
                ) {
                    Ok(owner) => claimed = owner,
                    Err(reason) => {
                        self.dead_letter(tx, event, &format!("ownership: {reason}"), report)
                            .await?;
                        continue;
                    }
                }
            }
            let (next, winner) = match decision {
                Decision::Stale => {
                    report.stale += 1;
                    if let Some(merged) = merged.filter(|m| m.changed) {
                        if local_row_exists && pending.flush(tx).await?.is_err() {
                            return Ok(false);
                        }
                        self.settle_crdt(tx, &table, &id.1, event, merged, local_row_exists)
                            .await?;
                    }
                    continue;
                }
                Decision::NeedsLocalContent => unreachable!("content was supplied"),
                Decision::FastForward { next } => (next, Winner::Remote),
                Decision::Conflict { winner, next } => (next, winner),
            };
            let patched;
            let to_write = match (&merged, &event.op) {
                (Some(merged), Op::Upsert(row)) if winner == Winner::Remote => {
                    let mut row = row.clone();
                    for (column, value) in &merged.values {
                        match row.0.iter_mut().find(|(c, _)| c == column) {
                            Some(slot) => slot.1 = value.clone(),
                            None => row.0.push((column.clone(), value.clone())),
                        }
                    }
                    patched = Event {
                        op: Op::Upsert(row),
                        ..event.clone()
                    };
                    &patched
                }
                _ => event,
            };
            if winner == Winner::Remote {
                let mut written = pending.push(tx, &table, to_write).await?;
                if mode == Mode::EventByEvent && written.is_ok() {
                    written = pending.flush(tx).await?;
                }
                match written {
                    Ok(()) => report.applied += 1,
                    Err(_) if mode == Mode::Grouped => return Ok(false),
                    Err(reason) => {
                        self.dead_letter(tx, event, &reason, report).await?;
                        continue;
                    }
                }
            }
            if let Some(merged) = merged {
                // A remote image already carries the merged values; a kept local row needs them.
                let update_row = winner == Winner::Local && merged.changed && local_row_exists;
                if update_row && pending.flush(tx).await?.is_err() {
                    return Ok(false);
                }
                self.settle_crdt(tx, &table, &id.1, event, merged, update_row).await?;
            }
            if let Some(owner) = claimed.filter(|_| winner == Winner::Remote) {
                owners::store(tx, &table.name, &id.1, &event.key, &owner, None).await?;
            }
            if table.strategy == crate::config::Strategy::Queue {
                match (&local, conflict) {
                    (Some(local), true) => {
                        queue::add_concurrent(tx, &table, &id.1, local, local_row.as_ref(), event).await?;
                    }
                    _ => queue::close(tx, &table.name, &id.1, &event.origin).await?,
                }
            }
            if let Some(local) = local.as_ref().filter(|_| conflict) {
                self.log_conflict(tx, &table, event, local, local_row.as_ref(), winner)
                    .await?;
                report.conflicts += 1;
            }
            versions.insert(id.clone(), next);
            changed.push(id);
        }
        if pending.flush(tx).await?.is_err() {
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
