//! Admission of a run of remote events against the per-origin frontiers, before any row is
//! touched: loops, duplicates, gaps and incomplete capture batches. Pure: no IO, no clock.
use std::collections::{BTreeMap, HashSet};

use crate::event::Event;
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
        match report.committed_by.last_mut() {
            Some((origin, n)) if *origin == event.origin => *n += 1,
            _ => report.committed_by.push((event.origin.clone(), 1)),
        }
        admitted.push(event);
    }
    admitted
}
