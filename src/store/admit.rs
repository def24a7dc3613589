//! What every store does the same way with a run of remote events before touching rows:
//! admission against the per-origin frontiers (loops, duplicates, gaps, incomplete capture
//! batches), the fit of an event to the local table, and the audit record of a conflict.
use std::collections::{BTreeMap, HashSet};

use crate::clock::Clock;
use crate::event::{Event, Key, Op, Row};
use crate::replicate::RowVersion;
use crate::store::ApplyReport;
use crate::topology;

/// The frontier of one origin while a run is applied.
#[derive(Debug, Clone, Default)]
pub struct Frontier {
    pub seq: u64,
    pub processed: u64,
    /// Advanced by this run (only those are written back).
    pub changed: bool,
}

/// Frontiers as read from a store's frontier table: (origin, seq, processed).
pub fn frontiers_from(rows: impl IntoIterator<Item = (String, i64, i64)>) -> BTreeMap<String, Frontier> {
    rows.into_iter()
        .map(|(origin, seq, processed)| {
            let frontier = Frontier {
                seq: seq as u64,
                processed: processed as u64,
                changed: false,
            };
            (origin, frontier)
        })
        .collect()
}

/// A drained local change: the row's key, its image after the drain (`None`: deleted), its
/// stored version before it, and its commit time.
pub struct LocalChange<'a> {
    pub table: String,
    pub key: Key,
    pub key_bytes: Vec<u8>,
    pub image: Option<Row>,
    pub previous: Option<&'a RowVersion>,
    pub committed_at: i64,
}

/// One drain's changes as one capture batch of events, in order, numbered after `last_seq`:
/// each gets the row's stored vector plus one for this node and a fresh HLC. A row inserted
/// and deleted between two drains, which nobody ever saw, gives no event.
pub fn local_events<'a>(
    identity: &crate::event::Identity,
    clock: &Clock,
    last_seq: u64,
    changes: impl IntoIterator<Item = LocalChange<'a>>,
) -> Vec<(Vec<u8>, Event)> {
    let me = &identity.node;
    let mut events: Vec<(Vec<u8>, Event)> = changes
        .into_iter()
        .filter(|c| c.image.is_some() || c.previous.is_some())
        .map(|c| {
            let mut version = c.previous.map(|l| l.version.clone()).unwrap_or_default();
            version.increment(me);
            let event = Event {
                origin: me.clone(),
                origin_region: identity.region.clone(),
                seq: 0,
                batch_end: 0,
                hlc: clock.now(),
                table: c.table,
                key: c.key,
                op: c.image.map(Op::Upsert).unwrap_or(Op::Delete),
                version,
                path: vec![me.clone()],
                committed_at_micros: c.committed_at,
                crdt: Vec::new(),
                ownership: None,
            };
            (c.key_bytes, event)
        })
        .collect();
    let batch_end = last_seq + events.len() as u64;
    for (i, (_, event)) in events.iter_mut().enumerate() {
        event.seq = last_seq + 1 + i as u64;
        event.batch_end = batch_end;
    }
    events
}

/// Per origin, the last seq of the run that closes a capture batch: events past it belong to
/// a batch the run does not hold completely and must not be applied yet.
fn complete_batches(events: &[Event]) -> BTreeMap<&str, u64> {
    let mut out = BTreeMap::new();
    for event in events {
        if event.seq == event.batch_end {
            out.insert(event.origin.as_str(), event.seq);
        }
    }
    out
}

/// Filters a run down to the events to apply now, in order, advancing `frontiers` and
/// counting loops, duplicates and the first gap in `report`. Every origin's events after a
/// gap or an incomplete batch are held back (the sender resends from the frontier).
pub fn admit<'e>(
    me: &str,
    clock: &Clock,
    events: &'e [Event],
    frontiers: &mut BTreeMap<String, Frontier>,
    report: &mut ApplyReport,
) -> Vec<&'e Event> {
    let complete = complete_batches(events);
    let mut stopped: HashSet<&str> = HashSet::new();
    let mut admitted = Vec::with_capacity(events.len());
    for event in events {
        if topology::admit(me, event).is_err() {
            report.looped += 1;
            continue;
        }
        if stopped.contains(event.origin.as_str()) {
            continue;
        }
        let frontier = frontiers.entry(event.origin.clone()).or_default();
        if event.seq <= frontier.seq {
            report.duplicates += 1;
            continue;
        }
        let batch_incomplete = complete.get(event.origin.as_str()).is_none_or(|&end| event.seq > end);
        if event.seq != frontier.seq + 1 || batch_incomplete {
            report
                .gap
                .get_or_insert((event.origin.clone(), frontier.seq, event.seq));
            stopped.insert(&event.origin);
            continue;
        }
        frontier.seq = event.seq;
        frontier.processed += 1;
        frontier.changed = true;
        report.committed_at.push(event.committed_at_micros);
        if let Err(skew) = clock.observe_now(event.hlc) {
            report.skew.push(skew);
        }
        admitted.push(event);
    }
    admitted
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
                    "column `{column}` does not exist in table `{table}` on this node; add it, then retry the dead letter"
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

fn version_json(version: &RowVersion, row: Option<&Row>) -> serde_json::Value {
    serde_json::json!({
        "origin": version.origin,
        "hlc": version.hlc.to_string(),
        "version": serde_json::from_str::<serde_json::Value>(&version.version.to_json()).unwrap_or_default(),
        "deleted": version.deleted,
        "row": row.map(Row::to_json),
    })
}

/// The (winner, loser) JSON records of a resolved conflict, for `_weft_conflicts`.
pub fn conflict_record(
    event: &Event,
    local: &RowVersion,
    local_row: Option<&Row>,
    winner: crate::resolve::Winner,
) -> (String, String) {
    let remote_row = match &event.op {
        Op::Upsert(row) => Some(row),
        Op::Delete => None,
    };
    let local_json = version_json(local, local_row);
    let remote_json = version_json(&RowVersion::of_event(event), remote_row);
    match winner {
        crate::resolve::Winner::Local => (local_json.to_string(), remote_json.to_string()),
        crate::resolve::Winner::Remote => (remote_json.to_string(), local_json.to_string()),
    }
}

pub fn strategy_name(strategy: crate::config::Strategy) -> &'static str {
    match strategy {
        crate::config::Strategy::Lww => "lww",
        crate::config::Strategy::Crdt => "crdt",
        crate::config::Strategy::Queue => "queue",
        crate::config::Strategy::Ownership => "ownership",
    }
}
