//! The strategy engine both stores share: deciding and writing a run of admitted remote
//! events, and settling a drained local write's strategy state (CRDT states, row owner,
//! resolution queue). Stores supply only row IO, through [`Txn`].
//!
//! Contract:
//! - Decisions are made in event order and see the versions left by earlier events of the
//!   run. Pending grouped writes are flushed before any local row or CRDT value is read or
//!   written, so grouping never changes a result.
//! - In [`Mode::Grouped`] a write the database refuses for its content stops the run with
//!   [`Stop::Refused`]: the caller rolls back and replays in [`Mode::EventByEvent`], where
//!   [`Txn::write`] leaves nothing of a refused write behind. There a refused write is set
//!   aside and retried after the rest of the run (constraints then see the order they
//!   accept), a cycle of unique values is written as one group, and only what is still
//!   refused is dead-lettered (see [`apply_in_passes`]). A write refused because another
//!   row holds one of its UNIQUE values is ordered against that row's write as under `lww`,
//!   alike in every region; the loser leaves the table and waits as a `unique` dead letter
//!   (see [`collide`]).
//! - CRDT columns merge whatever the row-level decision; the row shows the merged values.
//!   Ownership tables dead-letter writes the row's owner did not make. `queue` tables keep
//!   concurrent versions as siblings until a write covering them all closes the entry.
//!   Every conflict is logged, never silent.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::config::{OwnerRule, Strategy};
use crate::crdt::{CrdtType, States};
use crate::event::{Event, Identity, Op, Row, Value};
use crate::replicate::{Decision, RowVersion, decide};
use crate::resolve::Winner;
use crate::resolve::ownership::{self, Owner};
use crate::store::backend::{Cause, Group, Txn};
use crate::store::{ApplyReport, StoreError, audit};
use crate::version::Causality;

/// How a run's writes reach the database.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// Consecutive writes grouped into multi-row statements; a refused group stops the run.
    Grouped,
    /// Each write on its own; a refused write dead-letters just that event.
    EventByEvent,
}

/// Why a run stopped early; the caller rolls the transaction back.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    /// A grouped write was refused for its content: replay event by event.
    Refused,
    /// An application inserted a row this run was inserting: retry the run.
    Raced,
}

/// What became of a write (or of a flush of queued writes).
#[derive(Debug, PartialEq, Eq)]
pub enum Written {
    Done,
    /// The database refused it for its content, saying why.
    Refused(String),
}

/// Why a run ended before its last event: a stop the caller retries, or a store error.
#[derive(Debug)]
pub enum Halt {
    Stop(Stop),
    Store(StoreError),
}

impl From<StoreError> for Halt {
    fn from(error: StoreError) -> Self {
        Halt::Store(error)
    }
}

impl From<sqlx::Error> for Halt {
    fn from(error: sqlx::Error) -> Self {
        Halt::Store(error.into())
    }
}

/// A write step of a run.
pub type Step = Result<Written, Halt>;

/// What the engine needs to know of a replicated table.
pub trait TableRules {
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
    /// What an operator should know about this table (logged at start).
    fn advisories(&self) -> Vec<String> {
        Vec::new()
    }
    /// What events naming columns this table lacks do.
    fn unknown_columns(&self) -> crate::config::UnknownColumns;
    /// The table's dropped and renamed columns (`store::evolve`).
    fn history(&self) -> &crate::store::evolve::TableHistory;
    fn set_history(&mut self, history: crate::store::evolve::TableHistory);
    /// The replicated columns with their declared types, in table order.
    fn typed_columns(&self) -> Vec<(String, String)>;
    /// The database's identity of each of `typed_columns` (PostgreSQL's `attnum`), or none.
    fn column_ids(&self) -> Vec<i64>;
    /// Renames the table's config declares: new name to old name.
    fn renamed_from(&self) -> &BTreeMap<String, String>;
}

/// What this node knows of one row's owner.
pub struct KnownOwner {
    pub owner: Owner,
    /// A transfer made here and not yet drained.
    pub moving_to: Option<String>,
}

/// An event's CRDT states merged into the row's local states.
struct Merged {
    states: States,
    values: Vec<(String, Value)>,
    /// The event brought something the local states did not have.
    changed: bool,
}

/// A row: (table, canonical key bytes).
type RowId = (String, Vec<u8>);

/// A row a run wrote, with its new version.
pub struct RowWritten {
    pub table: String,
    pub key: Vec<u8>,
    pub version: RowVersion,
}

/// Flushes queued writes; a refusal stops the run (only grouped runs queue writes).
async fn flushed<R: Txn>(rows: &mut R) -> Result<(), Halt> {
    match rows.flush().await? {
        Written::Done => Ok(()),
        Written::Refused(_) => Err(Halt::Stop(Stop::Refused)),
    }
}

/// Decides and writes admitted events in order; returns the rows written, in first-write
/// order, with their new versions.
pub async fn apply_events<R: Txn>(
    rows: &mut R,
    events: &[&Event],
    report: &mut ApplyReport,
    mode: Mode,
) -> Result<Vec<RowWritten>, Halt> {
    let mut run = Run {
        versions: run_versions(rows, events).await?,
        changed: Vec::new(),
    };
    match mode {
        Mode::Grouped => {
            for &event in events {
                match apply_one(rows, event, &run.versions, report, mode).await? {
                    Outcome::Refused(_) => return Err(Halt::Stop(Stop::Refused)),
                    outcome => run.record(outcome),
                }
            }
        }
        Mode::EventByEvent => apply_in_passes(rows, events, &mut run, report).await?,
    }
    flushed(rows).await?;
    let Run { versions, mut changed } = run;
    let mut seen = HashSet::new();
    changed.retain(|id| seen.insert(id.clone()));
    Ok(changed
        .into_iter()
        .map(|id| {
            let version = versions[&id].clone();
            RowWritten {
                table: id.0,
                key: id.1,
                version,
            }
        })
        .collect())
}

/// Versions of every row the run touches, in one read per table.
async fn run_versions<R: Txn>(rows: &mut R, events: &[&Event]) -> Result<HashMap<RowId, RowVersion>, StoreError> {
    let mut keys: HashMap<&str, Vec<Vec<u8>>> = HashMap::new();
    for event in events {
        if rows.table(&event.table).is_some() {
            keys.entry(event.table.as_str()).or_default().push(event.key.to_bytes());
        }
    }
    let mut versions = HashMap::new();
    for (table, keys) in keys {
        for (key, version) in rows.versions(table, &keys).await? {
            versions.insert((table.to_owned(), key), version);
        }
    }
    Ok(versions)
}

/// The digest row metadata records of the row `op` leaves in `table` (`RowVersion::image`):
/// only when its image is the whole row as the table holds it, every column of the table
/// and no CRDT column (whose stored values are merged); `None` (unknown) otherwise, and for
/// a delete.
pub fn image_digest<T: TableRules + ?Sized>(table: &T, key: &[u8], op: &Op) -> Option<i64> {
    let Op::Upsert(row) = op else { return None };
    let columns = table.columns();
    let whole = row.0.len() == columns.len() && columns.iter().all(|c| row.0.iter().any(|(name, _)| name == c));
    (whole && table.crdt().is_empty()).then(|| crate::store::checksum::recorded_image(key, row))
}

/// The local table an event is for, or `None` once it is dead-lettered for not fitting.
async fn fitting_table<R: Txn>(
    rows: &mut R,
    event: &Event,
    report: &mut ApplyReport,
) -> Result<Option<Arc<R::Table>>, StoreError> {
    let Some(table) = rows.table(&event.table) else {
        let reason = format!(
            "table `{}` is not replicated on this node; add it to the node config",
            event.table
        );
        audit::dead_letter(rows, event, &reason, Cause::NotReplicated, report).await?;
        return Ok(None);
    };
    let problem = table
        .refuses(event)
        .or_else(|| shape_problem(table.name(), table.columns(), table.key(), event));
    if let Some(reason) = problem {
        audit::dead_letter(rows, event, &reason, Cause::Shape, report).await?;
        return Ok(None);
    }
    Ok(Some(table))
}

/// Why an event does not fit a local table with these columns and key, if it does not.
pub fn shape_problem(table: &str, columns: &[String], key: &[String], event: &Event) -> Option<String> {
    if event.key.0.len() != key.len() {
        return Some(format!(
            "key has {} values but table `{table}` has {} key columns",
            event.key.0.len(),
            key.len()
        ));
    }
    if let Op::Upsert(row) = &event.op {
        for (column, _) in &row.0 {
            if !columns.contains(column) {
                return Some(format!(
                    "column `{column}` does not exist in table `{table}` on this node: the event waits, and applies \
                     by itself once the column is added here (or set unknown_columns = \"drop\" for the table to \
                     apply such events without it)"
                ));
            }
        }
        for (i, key_column) in key.iter().enumerate() {
            if row.get(key_column) != Some(&event.key.0[i]) {
                return Some(format!("row image disagrees with the key on column `{key_column}`"));
            }
        }
    }
    None
}

/// The event's CRDT states merged into the row's: `Ok(None)` for a table without CRDT
/// columns, `Err(reason)` if they cannot merge (the event is dead-lettered).
async fn merge_crdt<R: Txn>(
    rows: &mut R,
    table: &R::Table,
    key: &[u8],
    event: &Event,
) -> Result<Result<Option<Merged>, String>, StoreError> {
    if table.crdt().is_empty() {
        return Ok(Ok(None));
    }
    let mut states = rows.crdt_states(table.name(), key).await?;
    let changed = match crate::resolve::crdt::merge_remote(table.crdt(), &mut states, &event.crdt) {
        Ok(changed) => changed,
        Err(error) => return Ok(Err(error.to_string())),
    };
    let values = crate::resolve::crdt::materialize_all(table.crdt(), &states)?;
    Ok(Ok(Some(Merged {
        states,
        values,
        changed,
    })))
}

/// The decision for an event, reading the local row (as earlier events of this run left it)
/// when the decision needs it or a conflict will log it.
async fn decide_event<R: Txn>(
    rows: &mut R,
    table: &R::Table,
    local: Option<&RowVersion>,
    event: &Event,
) -> Result<(Decision, Option<Row>), Halt> {
    let strategy = table.strategy();
    let mut decision = decide(strategy, local, event, None);
    let mut local_row = None;
    if matches!(decision, Decision::NeedsLocalContent | Decision::Conflict { .. }) {
        flushed(rows).await?;
        local_row = rows.read_row(table, &event.key).await?;
    }
    if decision == Decision::NeedsLocalContent {
        let content = local_row.clone().map(Op::Upsert).unwrap_or(Op::Delete).content_bytes();
        decision = decide(strategy, local, event, Some(&content));
    }
    Ok((decision, local_row))
}

/// What the event means for an ownership table's row (`ownership::judge_remote`), or why
/// the event is refused; nothing for another table's, or for a stale event.
async fn judge_owner<R: Txn>(
    rows: &mut R,
    table: &R::Table,
    key: &[u8],
    event: &Event,
    decision: &Decision,
) -> Result<Result<ownership::Verdict, String>, StoreError> {
    if !table.is_owned() || *decision == Decision::Stale {
        return Ok(Ok(ownership::Verdict::default()));
    }
    let conflict = matches!(decision, Decision::Conflict { .. });
    let known = rows.owner(table, key).await?.map(|k| k.owner);
    let rule = table.owner_rule().map(|r| (r, table.key()));
    Ok(ownership::judge_remote(
        rule,
        &event.key,
        known,
        &event.origin_region,
        event.ownership.as_ref(),
        conflict,
    )
    .map_err(|reason| format!("ownership: {reason}")))
}

/// The rows' versions as a run leaves them, and the rows it changed, in order.
#[derive(Clone)]
struct Run {
    versions: HashMap<RowId, RowVersion>,
    changed: Vec<RowId>,
}

impl Run {
    fn record(&mut self, outcome: Outcome) {
        if let Outcome::Changed(id, next) = outcome {
            self.versions.insert(id.clone(), next);
            self.changed.push(id);
        }
    }
}

/// What became of one event.
enum Outcome {
    /// The row changed; its new version.
    Changed(RowId, RowVersion),
    /// Nothing to write (stale), or dead-lettered already for its content.
    Settled,
    /// The database refused the row write, saying why; nothing of the event was written.
    Refused(String),
}

/// Event by event, in passes: a write the database refuses is set aside (with every later
/// event of its row, to keep the row's order) and retried after the rest of the run, as
/// long as a pass gets anything in. That applies a source transaction's changes in an order
/// its constraints accept whatever order coalescing gave them (a child before its parent,
/// a parent's row moved to a new key). When a pass gets nothing in, the set-aside writes
/// may be a cycle of unique values (two rows swapping an email): [`swap_as_one`] tries them
/// as one group. What is still refused is dead-lettered, in event order.
async fn apply_in_passes<R: Txn>(
    rows: &mut R,
    events: &[&Event],
    run: &mut Run,
    report: &mut ApplyReport,
) -> Result<(), Halt> {
    let mut pending: Vec<&Event> = events.to_vec();
    loop {
        let mut refused: Vec<&Event> = Vec::new();
        let mut blocked: HashSet<RowId> = HashSet::new();
        for &event in &pending {
            let id: RowId = (event.table.clone(), event.key.to_bytes());
            if blocked.contains(&id) {
                refused.push(event);
                continue;
            }
            match apply_one(rows, event, &run.versions, report, Mode::EventByEvent).await? {
                Outcome::Refused(_) => {
                    blocked.insert(id);
                    refused.push(event);
                }
                outcome => run.record(outcome),
            }
        }
        if refused.is_empty() {
            return Ok(());
        }
        if refused.len() == pending.len() {
            if !swap_as_one(rows, &refused, run, report).await? {
                for &event in &refused {
                    match apply_one(rows, event, &run.versions, report, Mode::EventByEvent).await? {
                        Outcome::Refused(reason) => collide(rows, event, &reason, run, report).await?,
                        outcome => run.record(outcome),
                    }
                }
            }
            return Ok(());
        }
        pending = refused;
    }
}

/// A write still refused after every pass: where another row holds one of its UNIQUE values,
/// the two rows' writes are ordered as under `lww` (the greater (hlc, origin) wins), which
/// every region does alike whichever of the two it met first. The loser leaves the table,
/// here as everywhere (its own region included), and becomes a `unique` dead letter named
/// by its write's (origin, seq), so every region lists it alike with its data; it is retried
/// and applies once the value is free. Any other refusal is dead-lettered as `refused`.
async fn collide<R: Txn>(
    rows: &mut R,
    event: &Event,
    reason: &str,
    run: &mut Run,
    report: &mut ApplyReport,
) -> Result<(), Halt> {
    let refused = async |rows: &mut R, report: &mut ApplyReport| {
        audit::dead_letter(rows, event, reason, Cause::Refused, report).await
    };
    let (Op::Upsert(row), Some(table)) = (&event.op, rows.table(&event.table)) else {
        return Ok(refused(rows, report).await?);
    };
    let Some(held) = rows.unique_holder(&table, &event.key, row).await? else {
        return Ok(refused(rows, report).await?);
    };
    let holder = crate::store::checksum::key_of(table.key(), &held);
    let id: RowId = (event.table.clone(), holder.to_bytes());
    let version = match run.versions.get(&id) {
        Some(version) => Some(version.clone()),
        None => rows
            .versions(&event.table, std::slice::from_ref(&id.1))
            .await?
            .remove(&id.1),
    };
    // A row weft never recorded (written behind its back) has no place in the order.
    let Some(version) = version.filter(|v| !v.deleted) else {
        return Ok(refused(rows, report).await?);
    };
    let holder_event = {
        let seq = version.version.get(&version.origin).max(1);
        Event {
            seq,
            batch_end: seq,
            key: holder.clone(),
            ..version_event(&version, Some(&held), event)
        }
    };
    let incoming_wins = (event.hlc, &event.origin) > (version.hlc, &version.origin);
    let (winner, loser) = match incoming_wins {
        true => (event, &holder_event),
        false => (&holder_event, event),
    };
    let why = format!(
        "lost a UNIQUE value of `{}` to key {} (written by {} at {}), the later of the two writes: \
         every region keeps that row and lists this letter; it applies by itself once the value is \
         free, or write the row anew with another value and discard it",
        event.table, winner.key, winner.origin, winner.hlc
    );
    if !incoming_wins {
        tracing::warn!(table = %event.table, key = %event.key, winner = %holder, "a row lost a unique value to a row this region holds");
        return Ok(audit::dead_letter(rows, event, &why, Cause::Unique, report).await?);
    }
    let remove = Event {
        op: Op::Delete,
        ..holder_event.clone()
    };
    if rows.write(&table, &remove, Mode::EventByEvent).await? != Written::Done {
        return Ok(refused(rows, report).await?);
    }
    // No tombstone is kept: the letter must apply here as anywhere once the value is free.
    rows.mark_deleted(&event.table, &id.1).await?;
    rows.purge_tombstone(&event.table, &id.1).await?;
    run.versions.remove(&id);
    tracing::warn!(table = %event.table, key = %holder, winner = %event.key, "a row this region held lost a unique value to a later row: it leaves the table and waits as a dead letter");
    audit::dead_letter(rows, loser, &why, Cause::Unique, report).await?;
    match apply_one(rows, event, &run.versions, report, Mode::EventByEvent).await? {
        Outcome::Refused(reason) => audit::dead_letter(rows, event, &reason, Cause::Refused, report).await?,
        outcome => run.record(outcome),
    }
    Ok(())
}

/// Writes refused upserts that may form a cycle of unique values as one group: deletes
/// their rows, then writes each. Only where the applier's writes skip foreign keys (a
/// delete would cascade otherwise), and only for upserts that fast-forward rows of tables
/// without a queue (no local content is read for them). The group is undone whole if any
/// write of it is still refused; returns whether it was kept.
async fn swap_as_one<R: Txn>(
    rows: &mut R,
    refused: &[&Event],
    run: &mut Run,
    report: &mut ApplyReport,
) -> Result<bool, Halt> {
    let mut tables = Vec::with_capacity(refused.len());
    for &event in refused {
        let Some(table) = rows.table(&event.table) else {
            return Ok(false);
        };
        let local = run.versions.get(&(event.table.clone(), event.key.to_bytes()));
        let fast_forward = matches!(
            decide(table.strategy(), local, event, None),
            Decision::FastForward { .. }
        );
        if !fast_forward || !matches!(event.op, Op::Upsert(_)) || table.strategy() == Strategy::Queue {
            return Ok(false);
        }
        tables.push((table, local.is_some_and(|l| !l.deleted)));
    }
    if refused.len() < 2 || !rows.foreign_keys_unchecked().await? {
        return Ok(false);
    }
    rows.group(Group::Begin).await?;
    let (saved_run, saved_report) = (run.clone(), report.clone());
    for (&event, (table, exists)) in refused.iter().zip(&tables) {
        let delete = Event {
            op: Op::Delete,
            ..event.clone()
        };
        if *exists && rows.write(table, &delete, Mode::EventByEvent).await? != Written::Done {
            rows.group(Group::Undo).await?;
            return Ok(false);
        }
    }
    for &event in refused {
        match apply_one(rows, event, &run.versions, report, Mode::EventByEvent).await? {
            Outcome::Refused(_) => {
                rows.group(Group::Undo).await?;
                (*run, *report) = (saved_run, saved_report);
                return Ok(false);
            }
            outcome => run.record(outcome),
        }
    }
    rows.group(Group::Keep).await?;
    tracing::debug!(events = refused.len(), "applied writes refused one by one as a group");
    Ok(true)
}

/// Decides and writes one admitted event (see [`Outcome`]).
async fn apply_one<R: Txn>(
    rows: &mut R,
    event: &Event,
    versions: &HashMap<RowId, RowVersion>,
    report: &mut ApplyReport,
    mode: Mode,
) -> Result<Outcome, Halt> {
    if let Op::Undecodable { reason, .. } = &event.op {
        let reason = format!("cannot decode the event: {reason}; upgrade this node, then retry the dead letter");
        return dead_lettered(rows, event, &reason, Cause::Undecodable, report).await;
    }
    let Some(table) = fitting_table(rows, event, report).await? else {
        return Ok(Outcome::Settled);
    };
    let id: RowId = (table.name().to_owned(), event.key.to_bytes());
    let local = versions.get(&id).cloned();
    let merged = match merge_crdt(rows, &table, &id.1, event).await? {
        Ok(merged) => merged,
        Err(reason) => return dead_lettered(rows, event, &reason, Cause::Crdt, report).await,
    };
    let local_row_exists = local.as_ref().is_some_and(|l| !l.deleted);
    let (decision, local_row) = decide_event(rows, &table, local.as_ref(), event).await?;
    let conflict = matches!(decision, Decision::Conflict { .. });
    let (claimed, by_epoch, fenced) = match judge_owner(rows, &table, &id.1, event, &decision).await? {
        Ok(verdict) => (verdict.owner, verdict.by_epoch, verdict.fenced),
        Err(reason) => return dead_lettered(rows, event, &reason, Cause::Ownership, report).await,
    };
    // A kept local row keeps its digest (`next` is the local version's); a written one gets
    // the digest of what was written, below.
    let (mut next, winner) = match decision {
        Decision::Stale => {
            report.stale += 1;
            if let Some(merged) = merged.filter(|m| m.changed) {
                settle_merged(rows, &table, event, &id.1, &merged, local_row_exists).await?;
            }
            return Ok(Outcome::Settled);
        }
        Decision::NeedsLocalContent => unreachable!("content was supplied"),
        Decision::FastForward { next } => (next, Winner::Remote),
        Decision::Conflict { winner, next } => match (by_epoch, local.as_ref()) {
            // An ownership claim of a higher epoch wins over LWW.
            (Some(by_epoch), Some(local)) if by_epoch != winner => {
                let won = match by_epoch {
                    Winner::Remote => RowVersion::of_event(event),
                    Winner::Local => local.clone(),
                };
                let next = RowVersion {
                    version: next.version,
                    ..won
                };
                (next, by_epoch)
            }
            _ => (next, winner),
        },
    };
    if winner == Winner::Remote {
        match write_remote(rows, &table, event, merged.as_ref(), mode).await? {
            Written::Done => report.applied += 1,
            Written::Refused(reason) => return Ok(Outcome::Refused(reason)),
        }
        // The image written is the (fitted) event's: its digest, if it is the whole row.
        next.image = image_digest(&*table, &id.1, &event.op);
    }
    if let Some(merged) = merged.filter(|m| m.changed) {
        // A remote image already carries the merged values; a kept local row needs them.
        let kept_row = winner == Winner::Local && local_row_exists;
        settle_merged(rows, &table, event, &id.1, &merged, kept_row).await?;
    }
    if let Some(owner) = claimed.filter(|_| winner == Winner::Remote) {
        rows.store_owner(&table, &event.key, &owner, None).await?;
    }
    if table.strategy() == Strategy::Queue {
        settle_queue(
            rows,
            &table,
            &id.1,
            local.as_ref().filter(|_| conflict),
            local_row.as_ref(),
            event,
        )
        .await?;
    }
    if let Some(local) = local.as_ref().filter(|_| conflict) {
        let lost = fenced.filter(|f| f.loser != winner);
        record_conflict(rows, &*table, event, (local, local_row.as_ref()), winner, lost, report).await?;
    }
    Ok(Outcome::Changed(id, next))
}

/// Logs a conflict `winner` decided; a loser `fenced` by a forced failover is also listed as
/// a fenced dead letter: what the failover discarded, not only a lost conflict.
async fn record_conflict<R: Txn>(
    rows: &mut R,
    table: &R::Table,
    event: &Event,
    (local, local_row): (&RowVersion, Option<&Row>),
    winner: Winner,
    fenced: Option<ownership::Fenced>,
    report: &mut ApplyReport,
) -> Result<(), StoreError> {
    audit::log_conflict(rows, table, event, local, local_row, winner).await?;
    report.conflicts += 1;
    if let Some(fenced) = fenced {
        let lost = match fenced.loser {
            Winner::Remote => event.clone(),
            // The write this node holds, by its identity: its origin's entry in the row's
            // vector is that write's seq (a node sets its entry to its event's seq), so
            // every region lists the letter alike, whichever side of it it was on.
            Winner::Local => {
                let seq = local.version.get(&local.origin).max(1);
                Event {
                    seq,
                    batch_end: seq,
                    ..version_event(local, local_row, event)
                }
            }
        };
        audit::dead_letter(rows, &lost, &fenced.reason, Cause::Fenced, report).await?;
    }
    Ok(())
}

async fn dead_lettered<R: Txn>(
    rows: &mut R,
    event: &Event,
    reason: &str,
    cause: Cause,
    report: &mut ApplyReport,
) -> Result<Outcome, Halt> {
    audit::dead_letter(rows, event, reason, cause, report).await?;
    Ok(Outcome::Settled)
}

/// Writes the remote event's row, with the merged CRDT values in place of its own.
async fn write_remote<R: Txn>(
    rows: &mut R,
    table: &Arc<R::Table>,
    event: &Event,
    merged: Option<&Merged>,
    mode: Mode,
) -> Step {
    let (Some(merged), Op::Upsert(row)) = (merged, &event.op) else {
        return rows.write(table, event, mode).await;
    };
    let mut row = row.clone();
    for (column, value) in &merged.values {
        match row.0.iter_mut().find(|(c, _)| c == column) {
            Some(slot) => slot.1 = value.clone(),
            None => row.0.push((column.clone(), value.clone())),
        }
    }
    let patched = Event {
        op: Op::Upsert(row),
        ..event.clone()
    };
    rows.write(table, &patched, mode).await
}

/// Stores merged CRDT states, and writes their values into the row if it is kept.
async fn settle_merged<R: Txn>(
    rows: &mut R,
    table: &R::Table,
    event: &Event,
    key: &[u8],
    merged: &Merged,
    write_values: bool,
) -> Result<(), Halt> {
    if write_values {
        flushed(rows).await?;
        rows.write_crdt_values(table, &event.key, &merged.values, None).await?;
    }
    rows.store_crdt_states(table.name(), key, &merged.states).await?;
    Ok(())
}

/// A `queue` row after an event: a conflict (`concurrent_with` the local version) adds a
/// sibling; anything else covers every sibling and closes the row's entry.
async fn settle_queue<R: Txn>(
    rows: &mut R,
    table: &R::Table,
    key: &[u8],
    concurrent_with: Option<&RowVersion>,
    local_row: Option<&Row>,
    event: &Event,
) -> Result<(), StoreError> {
    match concurrent_with {
        Some(local) => {
            let set = with_concurrent(rows, table, key, local, local_row, event).await?;
            rows.replace_siblings(table.name(), key, &event.key.to_string(), &set)
                .await
        }
        None => rows.close_queue(table.name(), key, &event.origin).await,
    }
}

/// The sibling set of a `queue` row after a version concurrent with its current one(s)
/// arrives: the antichain of maximal versions, the same at every node whatever the arrival
/// order. A row with one version so far makes that version the first sibling.
async fn with_concurrent<R: Txn>(
    rows: &mut R,
    table: &R::Table,
    key: &[u8],
    local: &RowVersion,
    local_row: Option<&Row>,
    event: &Event,
) -> Result<Vec<Event>, StoreError> {
    let mut set = rows.siblings(table.name(), key).await?;
    if set.is_empty() {
        set.push(version_event(local, local_row, event));
    }
    // Siblings are keyed by (origin, HLC). No honest origin stamps two versions of a row
    // alike (each write is stamped after its previous one, and dominates it), so such a
    // pair comes from a forged or broken peer: the later in the origin's order takes the
    // earlier one's place, the same at every node, instead of failing the apply for good.
    set.retain(|s| {
        let covered = matches!(
            event.version.compare(&s.version),
            Causality::Dominates | Causality::Equal
        );
        !covered && (s.origin != event.origin || s.hlc != event.hlc)
    });
    set.push(as_sibling(event));
    Ok(set)
}

/// The local version of `event`'s row as an event: what it is (origin, HLC, row, version).
/// It is a version, not a stream position: seq 1 only keeps the encoding valid.
fn version_event(local: &RowVersion, local_row: Option<&Row>, event: &Event) -> Event {
    Event {
        origin: local.origin.clone(),
        origin_region: String::new(),
        seq: 1,
        batch_end: 1,
        hlc: local.hlc,
        table: event.table.clone(),
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
    }
}

/// A version as the sibling set keeps it: what it is (origin, HLC, row, version), not where
/// it came from or by which path, so every node stores the same sibling the same way.
fn as_sibling(event: &Event) -> Event {
    Event {
        origin_region: String::new(),
        seq: 1,
        batch_end: 1,
        path: Vec::new(),
        committed_at_micros: 0,
        ..event.clone()
    }
}

/// Settles a drained local write's strategy state, in the drain's transaction: folds it into
/// the row's CRDT states (attached to the event; the image and, if it differs, the row get
/// the materialized values), records the owner it leaves the row with (attached as the
/// event's claim), and closes the row's queue entry (a local write has seen every sibling).
/// `row_is_held`: the drain holds the row (`Txn::DRAIN_HOLDS_ROWS`); `was_deleted`: the row
/// was a tombstone before this change; `actor`: this node's name in CRDT states (its id, or
/// after its database went back in time, a new name, so that its new increments add to the
/// ones the restore lost instead of merging with them).
pub(crate) async fn settle_local<R: Txn>(
    rows: &mut R,
    identity: &Identity,
    table: &R::Table,
    key_bytes: &[u8],
    event: &mut Event,
    (row_is_held, was_deleted): (bool, bool),
    actor: &str,
) -> Result<(), StoreError> {
    if !table.crdt().is_empty() {
        let mut states = rows.crdt_states(table.name(), key_bytes).await?;
        if let Op::Upsert(row) = &mut event.op {
            let image = row.clone();
            let (changed, ignored) =
                crate::resolve::crdt::fold_local(table.crdt(), &mut states, actor, row, event.hlc)?;
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
        // A deleted row inserted anew here is first this region's (the trigger let the insert
        // through as such): moved on before the drain (reinserted, then transferred, in one
        // piece), its claim is the transfer from this region, not a write by a non-owner.
        let reclaimed = known
            .as_ref()
            .filter(|k| was_deleted && k.owner.region != identity.region && owner_now != identity.region)
            .map(|k| Owner {
                region: identity.region.clone(),
                epoch: k.owner.epoch + 1,
            });
        // A transfer recorded here for a row another region owns is a forced failover: only
        // `weft ownership failover` records one (a planned transfer moves this region's rows).
        let forced = reclaimed.is_none()
            && known
                .as_ref()
                .is_some_and(|k| k.moving_to.is_some() && k.owner.region != identity.region);
        let claim = ownership::local_write(reclaimed.as_ref().or(previous.as_ref()), &owner_now, forced);
        let owner = Owner {
            region: claim.owner.clone(),
            epoch: claim.epoch,
        };
        rows.store_owner(table, &event.key, &owner, None).await?;
        event.ownership = Some(claim);
    }
    if table.strategy() == Strategy::Queue {
        rows.close_queue(table.name(), key_bytes, &identity.node).await?;
    }
    Ok(())
}
