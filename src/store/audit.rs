//! The audit trail of a run: every resolved conflict with both versions (the conflict log),
//! and every event that cannot be applied with the reason (dead letters). Both are written
//! in the run's own transaction, so an audit record exists if and only if the run committed.
use crate::config::Strategy;
use crate::event::{Event, Op, Row};
use crate::replicate::RowVersion;
use crate::resolve::Winner;
use crate::store::backend::{Cause, ConflictRecord, DeadLetter, Txn};
use crate::store::engine::TableRules;
use crate::store::{ApplyReport, StoreError};

/// Records a resolved conflict with both versions.
pub async fn log_conflict<R: Txn>(
    rows: &mut R,
    table: &R::Table,
    event: &Event,
    local: &RowVersion,
    local_row: Option<&Row>,
    winner: Winner,
) -> Result<(), StoreError> {
    let (winner, loser) = conflict_record(event, local, local_row, winner);
    let record = ConflictRecord {
        table: table.name(),
        key: event.key.to_string(),
        strategy: strategy_name(table.strategy()),
        winner,
        loser,
    };
    rows.insert_conflict(&record).await
}

/// Records an event that cannot be applied, with the reason, and counts it. The event still
/// advances its origin's frontier: it never blocks the stream and is never silently lost.
pub async fn dead_letter<R: Txn>(
    rows: &mut R,
    event: &Event,
    reason: &str,
    cause: Cause,
    report: &mut ApplyReport,
) -> Result<(), StoreError> {
    tracing::warn!(origin = %event.origin, seq = event.seq, table = %event.table, key = %event.key, reason, "dead-lettered event");
    let letter = DeadLetter {
        event,
        reason,
        cause,
        limit: report.dead_letter_limit,
        retry: report.retrying,
    };
    rows.insert_dead_letter(&letter).await?;
    report.dead_lettered += 1;
    Ok(())
}

fn version_json(version: &RowVersion, row: Option<&Row>) -> serde_json::Value {
    serde_json::json!({
        "origin": version.origin,
        "hlc": version.hlc.to_string(),
        "version": serde_json::from_str::<serde_json::Value>(&version.version.to_json()).unwrap_or_default(),
        "deleted": version.deleted,
        "row": row.map(Row::to_json),
    })
}

/// The (winner, loser) JSON records of a resolved conflict.
pub fn conflict_record(event: &Event, local: &RowVersion, local_row: Option<&Row>, winner: Winner) -> (String, String) {
    let remote_row = match &event.op {
        Op::Upsert(row) => Some(row),
        Op::Delete | Op::Undecodable { .. } => None,
    };
    let local_json = version_json(local, local_row);
    let remote_json = version_json(&RowVersion::of_event(event), remote_row);
    match winner {
        Winner::Local => (local_json.to_string(), remote_json.to_string()),
        Winner::Remote => (remote_json.to_string(), local_json.to_string()),
    }
}

pub fn strategy_name(strategy: Strategy) -> &'static str {
    match strategy {
        Strategy::Lww => "lww",
        Strategy::Crdt => "crdt",
        Strategy::Queue => "queue",
        Strategy::Ownership => "ownership",
    }
}
