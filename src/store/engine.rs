//! The strategy engine both stores share: deciding and writing a run of admitted remote
//! events, and settling a drained local write's strategy state (CRDT states, row owner,
//! resolution queue). Stores supply only row IO, through [`Rows`].
//!
//! Contract:
//! - Decisions are made in event order and see the versions left by earlier events of the
//!   run. Pending grouped writes are flushed before any local row or CRDT value is read or
//!   written, so grouping never changes a result.
//! - In [`Mode::Grouped`] a write the database refuses for its content stops the run with
//!   [`Stop::Refused`]: the caller rolls back and replays in [`Mode::EventByEvent`], where
//!   [`Rows::write`] leaves nothing of a refused write behind and the engine dead-letters
//!   exactly that event.
//! - CRDT columns merge whatever the row-level decision; the row shows the merged values.
//!   Ownership tables dead-letter writes the row's owner did not make. `queue` tables keep
//!   concurrent versions as siblings until a write covering them all closes the entry.
//!   Every conflict is logged, never silent.
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::config::{OwnerRule, Strategy};
use crate::crdt::{CrdtType, States};
use crate::event::Identity;
use crate::event::{Event, Key, Op, Row, Value};
use crate::replicate::{Decision, RowVersion, decide};
use crate::resolve::Winner;
use crate::resolve::ownership::{self, Owner};
use crate::store::{ApplyReport, StoreError};
use crate::version::Causality;

/// How a run's writes reach the database.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Mode {
    /// Consecutive writes grouped into multi-row statements; a refused group stops the run.
    Grouped,
    /// Each write on its own; a refused write dead-letters just that event.
    EventByEvent,
}

/// Why a run stopped early; the caller rolls the transaction back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    /// A grouped write was refused for its content: replay event by event.
    Refused,
    /// An application inserted a row this run was inserting: retry the run.
    Raced,
}

/// A step that may stop the run; the inner `Err(reason)` is a write refused for its content.
pub(crate) type Step = Result<Result<Result<(), String>, Stop>, StoreError>;

/// What the engine needs to know of a replicated table.
pub(crate) trait TableRules {
    fn name(&self) -> &str;
    fn columns(&self) -> &[String];
    fn key(&self) -> &[String];
    fn strategy(&self) -> Strategy;
    /// CRDT columns and their types (`crdt` tables only).
    fn crdt(&self) -> &BTreeMap<String, CrdtType>;
    fn owner_column(&self) -> Option<&String>;
    fn owner_rule(&self) -> Option<&OwnerRule>;
    fn is_owned(&self) -> bool {
        self.owner_column().is_some() || self.owner_rule().is_some()
    }
    /// Why the event does not fit this table (beyond the shared checks), if it does not.
    fn refuses(&self, _event: &Event) -> Option<String> {
        None
    }
}

/// What this node knows of one row's owner.
pub(crate) struct KnownOwner {
    pub owner: Owner,
    /// A transfer made here and not yet drained.
    pub moving_to: Option<String>,
}

/// Row IO of one store inside one open transaction.
pub(crate) trait Rows {
    type Table: TableRules;

    fn table(&self, name: &str) -> Option<Arc<Self::Table>>;
    /// Stored versions of `keys` of one table; absent keys are missing from the map.
    async fn versions(&mut self, table: &str, keys: &[Vec<u8>]) -> Result<HashMap<Vec<u8>, RowVersion>, StoreError>;
    /// Writes the event's row change as the applier (never captured). In `Mode::Grouped` it
    /// may be queued (and earlier queued writes flushed); in `Mode::EventByEvent` it is
    /// executed now, and a refusal leaves nothing of it behind.
    async fn write(&mut self, table: &Arc<Self::Table>, event: &Event, mode: Mode) -> Step;
    /// Executes queued writes.
    async fn flush(&mut self) -> Step;
    /// The row's current image (queued writes are flushed first by the engine).
    async fn read_row(&mut self, table: &Self::Table, key: &Key) -> Result<Option<Row>, StoreError>;
    async fn crdt_states(&mut self, table: &str, key: &[u8]) -> Result<States, StoreError>;
    async fn store_crdt_states(&mut self, table: &str, key: &[u8], states: &States) -> Result<(), StoreError>;
    /// Sets CRDT column values of an existing row, not captured. With `unless_changed_from`
    /// (a drain that does not hold the row), only if those columns still hold that image's
    /// values: a later application write is drained and normalized on its own.
    async fn write_crdt_values(
        &mut self,
        table: &Self::Table,
        key: &Key,
        values: &[(String, Value)],
        unless_changed_from: Option<&Row>,
    ) -> Result<(), StoreError>;
    async fn owner(&mut self, table: &Self::Table, key: &[u8]) -> Result<Option<KnownOwner>, StoreError>;
    /// Records a row's owner and clears any transfer in progress.
    async fn store_owner(
        &mut self,
        table: &Self::Table,
        key_bytes: &[u8],
        key: &Key,
        owner: &Owner,
    ) -> Result<(), StoreError>;
    /// The siblings of a `queue` row, oldest (hlc, origin) first.
    async fn siblings(&mut self, table: &str, key: &[u8]) -> Result<Vec<Event>, StoreError>;
    /// Replaces a row's siblings; two or more open its queue entry (if not open already).
    async fn replace_siblings(
        &mut self,
        table: &str,
        key: &[u8],
        key_text: &str,
        set: &[Event],
    ) -> Result<(), StoreError>;
    /// Drops a row's siblings and closes its open entry, if any, naming who closed it.
    async fn close_queue(&mut self, table: &str, key: &[u8], by: &str) -> Result<(), StoreError>;
    async fn log_conflict(
        &mut self,
        table: &Self::Table,
        event: &Event,
        local: &RowVersion,
        local_row: Option<&Row>,
        winner: Winner,
    ) -> Result<(), StoreError>;
    /// Records an event that cannot be applied, with the reason, and counts it.
    async fn dead_letter(&mut self, event: &Event, reason: &str, report: &mut ApplyReport) -> Result<(), StoreError>;
}

/// An event's CRDT states merged into the row's local states.
struct Merged {
    states: States,
    values: Vec<(String, Value)>,
    /// The event brought something the local states did not have.
    changed: bool,
}

/// Runs a flush-like step: `Ok(Err(stop))` ends the run, an inner refusal stops a grouped run.
macro_rules! step {
    ($step:expr) => {
        match $step {
            Ok(Ok(written)) => written,
            Ok(Err(stop)) => return Ok(Err(stop)),
            Err(error) => return Err(error),
        }
    };
}

/// Flushes queued writes; a refusal stops the run (only grouped runs queue writes).
macro_rules! flushed {
    ($rows:expr) => {
        if step!($rows.flush().await).is_err() {
            return Ok(Err(Stop::Refused));
        }
    };
}

/// Rows written by a run, with their new versions, in first-write order.
pub(crate) type Written = Vec<(String, Vec<u8>, RowVersion)>;

/// Decides and writes admitted events in order.
pub(crate) async fn apply_events<R: Rows>(
    rows: &mut R,
    events: &[&Event],
    report: &mut ApplyReport,
    mode: Mode,
) -> Result<Result<Written, Stop>, StoreError> {
    // Versions of every row the run touches, in one read per table.
    let mut keys: HashMap<&str, Vec<Vec<u8>>> = HashMap::new();
    for event in events {
        if rows.table(&event.table).is_some() {
            keys.entry(event.table.as_str()).or_default().push(event.key.to_bytes());
        }
    }
    let mut versions: HashMap<(String, Vec<u8>), RowVersion> = HashMap::new();
    for (table, keys) in keys {
        for (key, version) in rows.versions(table, &keys).await? {
            versions.insert((table.to_owned(), key), version);
        }
    }

    let mut changed: Vec<(String, Vec<u8>)> = Vec::new();
    for &event in events {
        let Some(table) = rows.table(&event.table) else {
            let reason = format!(
                "table `{}` is not replicated on this node; add it to the node config",
                event.table
            );
            rows.dead_letter(event, &reason, report).await?;
            continue;
        };
        let problem = table
            .refuses(event)
            .or_else(|| crate::store::admit::shape_problem(table.name(), table.columns(), table.key(), event));
        if let Some(reason) = problem {
            rows.dead_letter(event, &reason, report).await?;
            continue;
        }
        let id = (table.name().to_owned(), event.key.to_bytes());
        let local = versions.get(&id).cloned();
        let strategy = table.strategy();
        // CRDT columns merge whatever the row-level decision; their values follow.
        let merged = if table.crdt().is_empty() {
            None
        } else {
            let mut states = rows.crdt_states(table.name(), &id.1).await?;
            match crate::resolve::crdt::merge_remote(table.crdt(), &mut states, &event.crdt) {
                Ok(changed) => {
                    let values = crate::resolve::crdt::materialize_all(table.crdt(), &states)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    Some(Merged {
                        states,
                        values,
                        changed,
                    })
                }
                Err(error) => {
                    rows.dead_letter(event, &error.to_string(), report).await?;
                    continue;
                }
            }
        };
        let local_row_exists = local.as_ref().is_some_and(|l| !l.deleted);
        let mut decision = decide(strategy, local.as_ref(), event, None);
        let mut local_row = None;
        if matches!(decision, Decision::NeedsLocalContent | Decision::Conflict { .. }) {
            // The local row as earlier events of this run left it.
            flushed!(rows);
            local_row = rows.read_row(&table, &event.key).await?;
        }
        if decision == Decision::NeedsLocalContent {
            let content = local_row.clone().map(Op::Upsert).unwrap_or(Op::Delete).content_bytes();
            decision = decide(strategy, local.as_ref(), event, Some(&content));
        }
        let conflict = matches!(decision, Decision::Conflict { .. });
        let mut claimed = None;
        if table.is_owned() && decision != Decision::Stale {
            let known = rows.owner(&table, &id.1).await?.map(|k| k.owner);
            let rule = table.owner_rule().map(|r| (r, table.key()));
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
                    rows.dead_letter(event, &format!("ownership: {reason}"), report).await?;
                    continue;
                }
            }
        }
        let (next, winner) = match decision {
            Decision::Stale => {
                report.stale += 1;
                if let Some(merged) = merged.filter(|m| m.changed) {
                    if local_row_exists {
                        flushed!(rows);
                        rows.write_crdt_values(&table, &event.key, &merged.values, None).await?;
                    }
                    rows.store_crdt_states(table.name(), &id.1, &merged.states).await?;
                }
                continue;
            }
            Decision::NeedsLocalContent => unreachable!("content was supplied"),
            Decision::FastForward { next } => (next, Winner::Remote),
            Decision::Conflict { winner, next } => (next, winner),
        };
        if winner == Winner::Remote {
            let patched;
            let to_write = match (&merged, &event.op) {
                (Some(merged), Op::Upsert(row)) => {
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
            match step!(rows.write(&table, to_write, mode).await) {
                Ok(()) => report.applied += 1,
                Err(_) if mode == Mode::Grouped => return Ok(Err(Stop::Refused)),
                Err(reason) => {
                    rows.dead_letter(event, &reason, report).await?;
                    continue;
                }
            }
        }
        if let Some(merged) = merged {
            // A remote image already carries the merged values; a kept local row needs them.
            if winner == Winner::Local && merged.changed && local_row_exists {
                flushed!(rows);
                rows.write_crdt_values(&table, &event.key, &merged.values, None).await?;
            }
            if merged.changed {
                rows.store_crdt_states(table.name(), &id.1, &merged.states).await?;
            }
        }
        if let Some(owner) = claimed.filter(|_| winner == Winner::Remote) {
            rows.store_owner(&table, &id.1, &event.key, &owner).await?;
        }
        if strategy == Strategy::Queue {
            match (&local, conflict) {
                (Some(local), true) => {
                    let set = with_concurrent(rows, &*table, &id.1, local, local_row.as_ref(), event).await?;
                    rows.replace_siblings(table.name(), &id.1, &event.key.to_string(), &set)
                        .await?;
                }
                _ => rows.close_queue(table.name(), &id.1, &event.origin).await?,
            }
        }
        if let Some(local) = local.as_ref().filter(|_| conflict) {
            rows.log_conflict(&table, event, local, local_row.as_ref(), winner)
                .await?;
            report.conflicts += 1;
        }
        versions.insert(id.clone(), next);
        changed.push(id);
    }
    flushed!(rows);
    let mut seen = std::collections::HashSet::new();
    changed.retain(|id| seen.insert(id.clone()));
    Ok(Ok(changed
        .into_iter()
        .map(|id| {
            let version = versions[&id].clone();
            (id.0, id.1, version)
        })
        .collect()))
}

/// The sibling set of a `queue` row after a version concurrent with its current one(s)
/// arrives: the antichain of maximal versions, the same at every node whatever the arrival
/// order. A row with one version so far makes that version the first sibling.
async fn with_concurrent<R: Rows>(
    rows: &mut R,
    table: &R::Table,
    key: &[u8],
    local: &RowVersion,
    local_row: Option<&Row>,
    event: &Event,
) -> Result<Vec<Event>, StoreError> {
    let mut set = rows.siblings(table.name(), key).await?;
    if set.is_empty() {
        // Siblings are versions, not stream positions: seq 1 only keeps the encoding valid.
        set.push(Event {
            origin: local.origin.clone(),
            origin_region: String::new(),
            seq: 1,
            batch_end: 1,
            hlc: local.hlc,
            table: table.name().to_owned(),
            key: event.key.clone(),
            op: match local_row {
                Some(row) if !local.deleted => Op::Upsert(row.clone()),
                _ => Op::Delete,
            },
            version: local.version.clone(),
            path: Vec::new(),
            committed_at_micros: 0,
            crdt: Vec::new(),
            ownership: None,
        });
    }
    set.retain(|s| {
        !matches!(
            event.version.compare(&s.version),
            Causality::Dominates | Causality::Equal
        )
    });
    let mut newcomer = event.clone();
    newcomer.path.clear();
    set.push(newcomer);
    Ok(set)
}

/// Settles a drained local write's strategy state, in the drain's transaction: folds it into
/// the row's CRDT states (attached to the event; the image and, if it differs, the row get
/// the materialized values), records the owner it leaves the row with (attached as the
/// event's claim), and closes the row's queue entry (a local write has seen every sibling).
pub(crate) async fn settle_local<R: Rows>(
    rows: &mut R,
    identity: &Identity,
    table: &R::Table,
    key_bytes: &[u8],
    event: &mut Event,
    row_is_held: bool,
) -> Result<(), StoreError> {
    if !table.crdt().is_empty() {
        let mut states = rows.crdt_states(table.name(), key_bytes).await?;
        if let Op::Upsert(row) = &mut event.op {
            let image = row.clone();
            let (changed, ignored) =
                crate::resolve::crdt::fold_local(table.crdt(), &mut states, &identity.node, row, event.hlc)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            for error in ignored {
                tracing::warn!(table = %table.name(), key = %event.key, %error, "local write to a CRDT column ignored; the column keeps its replicated value");
            }
            let guard = (!row_is_held).then_some(&image);
            rows.write_crdt_values(table, &event.key, &changed, guard).await?;
        }
        rows.store_crdt_states(table.name(), key_bytes, &states).await?;
        event.crdt = states.into_iter().collect();
    }
    if table.is_owned() {
        let known = rows.owner(table, key_bytes).await?;
        let previous = known.as_ref().map(|k| k.owner.clone());
        // The trigger let this write through, so this region owns the row, or the write is a
        // transfer naming the new owner: the owner column after the write, or the
        // `moving_to` a rule table's transfer recorded.
        let written = match (table.owner_column(), &event.op) {
            (Some(column), Op::Upsert(row)) => Some(row.get(column).unwrap_or(&Value::Null)),
            _ => None,
        };
        let owner_now = ownership::owner_after_local_write(
            previous.as_ref(),
            known.as_ref().and_then(|k| k.moving_to.as_deref()),
            written,
            &identity.region,
        );
        let claim = ownership::local_write(previous.as_ref(), &owner_now);
        let owner = Owner {
            region: claim.owner.clone(),
            epoch: claim.epoch,
        };
        rows.store_owner(table, key_bytes, &event.key, &owner).await?;
        event.ownership = Some(claim);
    }
    if table.strategy() == Strategy::Queue {
        rows.close_queue(table.name(), key_bytes, &identity.node).await?;
    }
    Ok(())
}
