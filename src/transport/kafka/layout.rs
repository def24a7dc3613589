//! What a publisher writes for a stretch of its log: the records, in order, a topic gets for
//! the events read after the seq last published. Pure: the publisher sends what [`lay_out`]
//! returns and logs its notices.
//!
//! - The events go as records (`record::encode`, split at `max_record_bytes`), or on a
//!   changes topic as one document each (`envelope::envelopes`).
//! - Wherever the log jumps (its first event is not the one after the seq last published, or
//!   seqs skip within what was read), a gap record (a `gap` marker on a changes topic) stands
//!   for what is missing: the log no longer holds it (trimmed before it was published; a
//!   relayed origin this node re-seeded past). A reader never takes the next event for the
//!   one after the last.
//! - A record larger than the largest a record may be (`Sizes::record`) is never sent (the
//!   producer would refuse it, and every later round with it): on a link topic a gap record
//!   stands in its place (a receiver that lacks the event re-seeds), on a changes topic a
//!   `too_large` marker naming the change.
//!
//! Every stand-in comes with a [`Notice`], for the publisher to log at ERROR once the broker
//! has it: nothing is left out silently.
use crate::event::{Event, NodeId};
use crate::transport::record::{self, Record};

use super::envelope;

/// What a publisher writes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Format {
    /// `weft.v1.Batch` records, the Kafka links' (`record::encode`).
    #[default]
    Batches,
    /// One JSON document per event, for consumers that do not speak weft
    /// (`envelope::envelopes`); the mesh's name goes in each document.
    Envelopes { mesh: String },
}

/// The sizes a layout keeps to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The value a record of several events stays under (and under half of `record`).
    pub max_record_bytes: usize,
    /// The largest record that may be sent at all (`Sizes::record`).
    pub record: usize,
}

/// Something a layout could not write as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Events `from..=to` of `origin` were not in the log.
    Gap { origin: NodeId, from: u64, to: u64 },
    /// The record of event `seq` of `origin` (on `table`) would be `bytes` long, over `limit`.
    TooLarge {
        origin: NodeId,
        seq: u64,
        table: String,
        bytes: usize,
        limit: usize,
    },
}

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Notice::Gap { origin, from, to } => write!(
                f,
                "the log no longer holds events {from}..={to} of {origin} (trimmed before this topic took them, \
                 or never here: a re-seed or a restore)"
            ),
            Notice::TooLarge {
                origin,
                seq,
                table,
                bytes,
                limit,
            } => write!(
                f,
                "event {seq} of {origin} (table {table}) is too large for this topic: its record would be {bytes} \
                 bytes, over {limit} ([replication] max_message_mib)"
            ),
        }
    }
}

/// One record to send, and what it stands for if it is not the events themselves.
#[derive(Debug, Clone)]
pub struct Piece {
    pub record: Record,
    pub notice: Option<Notice>,
}

impl Piece {
    fn plain(record: Record) -> Self {
        Self { record, notice: None }
    }
}

/// The records for `events` of one origin, read after seq `after` (see the module docs).
pub fn lay_out(after: u64, events: &[Event], format: &Format, limits: Limits) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut expected = after + 1;
    for run in runs(events) {
        let (origin, first) = (&run[0].origin, run[0].seq);
        if first > expected {
            let notice = Notice::Gap {
                origin: origin.clone(),
                from: expected,
                to: first - 1,
            };
            let reason = notice.to_string();
            let record = match format {
                Format::Batches => record::gap(origin, expected, first - 1, &reason),
                Format::Envelopes { mesh } => envelope::gap(origin, expected, first - 1, mesh, &reason),
            };
            pieces.push(Piece {
                record,
                notice: Some(notice),
            });
        }
        match format {
            Format::Batches => pieces.extend(batches(run, limits)),
            Format::Envelopes { mesh } => pieces.extend(documents(run, mesh, limits)),
        }
        expected = run[run.len() - 1].seq + 1;
    }
    pieces
}

/// `events` cut where seqs skip.
fn runs(events: &[Event]) -> impl Iterator<Item = &[Event]> {
    events.chunk_by(|a, b| b.seq == a.seq + 1)
}

/// A run's `weft.v1.Batch` records; a gap record for any too large to send.
fn batches(run: &[Event], limits: Limits) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut at = 0;
    // Records of several events stay well under the limit, so only a record of one event
    // can pass it.
    let target = limits.max_record_bytes.min(limits.record / 2);
    for record in record::encode(run, target) {
        let held = record_len(&record);
        let events = &run[at..at + held];
        at += held;
        let bytes = record.wire_size();
        if bytes <= limits.record {
            pieces.push(Piece::plain(record));
            continue;
        }
        let (first, last) = (&events[0], &events[held - 1]);
        let notice = Notice::TooLarge {
            origin: first.origin.clone(),
            seq: first.seq,
            table: first.table.clone(),
            bytes,
            limit: limits.record,
        };
        pieces.push(Piece {
            record: record::gap(&first.origin, first.seq, last.seq, &notice.to_string()),
            notice: Some(notice),
        });
    }
    pieces
}

/// How many events a record of `record::encode` holds (its `weft-seq..=weft-end`).
fn record_len(record: &Record) -> usize {
    let number = |name: &str| {
        (record.headers.iter())
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
            .expect("encode writes both seq headers")
    };
    (number("weft-end") - number("weft-seq") + 1) as usize
}

/// A run's documents; a `too_large` marker for any too large to send.
fn documents(run: &[Event], mesh: &str, limits: Limits) -> Vec<Piece> {
    (run.iter().zip(envelope::envelopes(run, mesh)))
        .map(|(event, record)| {
            let bytes = record.wire_size();
            if bytes <= limits.record {
                return Piece::plain(record);
            }
            Piece {
                record: envelope::too_large(event, mesh, bytes, limits.record),
                notice: Some(Notice::TooLarge {
                    origin: event.origin.clone(),
                    seq: event.seq,
                    table: event.table.clone(),
                    bytes,
                    limit: limits.record,
                }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Hlc, Key, Op, Row, Value};
    use crate::transport::record::Contents;

    fn event(seq: u64, size: usize) -> Event {
        Event {
            origin: "n1".into(),
            origin_region: "r1".into(),
            seq,
            batch_end: seq,
            hlc: Hlc(seq << 22),
            table: "t".into(),
            key: Key(vec![Value::Integer(seq as i64)]),
            op: Op::Upsert(Row(vec![("v".into(), Value::Blob(vec![7; size]))])),
            version: [("n1".to_string(), seq)].into_iter().collect(),
            path: vec!["n1".into()],
            committed_at_micros: 1_700_000_000_000_000,
            crdt: Vec::new(),
            ownership: None,
        }
    }

    const LIMITS: Limits = Limits {
        max_record_bytes: 2_000,
        record: 10_000,
    };

    /// Each piece as (`weft-format`, first seq, last seq).
    fn shape(pieces: &[Piece]) -> Vec<(String, u64, u64)> {
        (pieces.iter())
            .map(|p| {
                let r = &p.record;
                let text = |n: &str| {
                    let (_, v) = r.headers.iter().find(|(k, _)| k == n).expect(n);
                    String::from_utf8(v.clone()).unwrap()
                };
                let end = r.headers.iter().any(|(k, _)| k == "weft-end");
                let last = if end { text("weft-end") } else { text("weft-seq") };
                (
                    text("weft-format"),
                    text("weft-seq").parse().unwrap(),
                    last.parse().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn events_after_the_last_published_go_as_records_without_a_stand_in() {
        let events: Vec<Event> = (4..=9).map(|s| event(s, 500)).collect();
        let pieces = lay_out(3, &events, &Format::Batches, LIMITS);
        assert!(pieces.iter().all(|p| p.notice.is_none()));
        let decoded: Vec<u64> = (pieces.iter())
            .flat_map(|p| match record::read(&p.record.headers, &p.record.value).unwrap() {
                Contents::Events(events) => events.into_iter().map(|e| e.seq).collect::<Vec<u64>>(),
                Contents::Gap { .. } => panic!("a gap"),
            })
            .collect();
        assert_eq!(decoded, (4..=9).collect::<Vec<_>>());
    }

    #[test]
    fn a_jump_in_the_log_is_published_as_a_gap_before_what_follows_it() {
        // Published up to 3; the log holds 6..=7 and 10 (4, 5, 8 and 9 were trimmed).
        let events = [event(6, 10), event(7, 10), event(10, 10)];
        let pieces = lay_out(3, &events, &Format::Batches, LIMITS);
        let gap = "weft.v1.Gap".to_owned();
        let batch = "weft.v1.Batch".to_owned();
        assert_eq!(
            shape(&pieces),
            [(gap.clone(), 4, 5), (batch.clone(), 6, 7), (gap, 8, 9), (batch, 10, 10)]
        );
        assert_eq!(
            pieces[2].notice,
            Some(Notice::Gap {
                origin: "n1".into(),
                from: 8,
                to: 9
            })
        );
        let mesh = Format::Envelopes { mesh: "m".into() };
        let documents = lay_out(3, &events, &mesh, LIMITS);
        let marker = "weft.v1.Marker+json".to_owned();
        let envelope = "weft.v1.Envelope+json".to_owned();
        assert_eq!(
            shape(&documents),
            [
                (marker.clone(), 4, 5),
                (envelope.clone(), 6, 6),
                (envelope.clone(), 7, 7),
                (marker, 8, 9),
                (envelope, 10, 10)
            ]
        );
    }

    #[test]
    fn an_event_too_large_for_a_record_is_stood_in_for_and_the_rest_go() {
        let events = [event(1, 100), event(2, 20_000), event(3, 100)];
        let pieces = lay_out(0, &events, &Format::Batches, LIMITS);
        assert_eq!(shape(&pieces)[1], ("weft.v1.Gap".to_owned(), 2, 2));
        assert!(pieces.iter().all(|p| p.record.wire_size() <= LIMITS.record));
        assert!(matches!(&pieces[1].notice, Some(Notice::TooLarge { seq: 2, bytes, .. }) if *bytes > 20_000));
        assert_eq!(shape(&pieces)[2].1, 3, "the event after it follows");
        // A document is about twice its blob (hex): 4,000 bytes of blob is too large there.
        let documents = [event(1, 100), event(2, 6_000), event(3, 100)];
        let pieces = lay_out(0, &documents, &Format::Envelopes { mesh: "m".into() }, LIMITS);
        assert_eq!(shape(&pieces).iter().map(|s| s.1).collect::<Vec<_>>(), [1, 2, 3]);
        let marker: serde_json::Value = serde_json::from_slice(&pieces[1].record.value).unwrap();
        assert_eq!(
            (marker["marker"].as_str(), marker["source"]["seq"].as_u64()),
            (Some("too_large"), Some(2))
        );
        assert!(pieces[1].notice.as_ref().unwrap().to_string().contains("too large"));
    }
}
