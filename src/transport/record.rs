//! weft's Kafka record format: how a node's outgoing log is laid out in its topic.
//!
//! - **Topic**: one per node, `weft.<mesh>.<node>`, one partition, so the order of the
//!   node's log (its own events and those it relays) is total.
//! - **Record**: a run of consecutive events of one origin (a capture batch, or a chunk of a
//!   large one), at most about `max_bytes` of value. Key: the origin's node id. Headers:
//!   `weft-format` (`weft.v1.Batch`), `weft-origin`, `weft-seq` and `weft-end` (the first and
//!   last seq in the record, decimal), `weft-hlc` (the last event's HLC, decimal). Value: the
//!   protobuf `weft.v1.Batch` of `proto/weft/v1/weft.proto`, the message the gRPC binding
//!   sends. A consumer applies events of a capture batch together (`Event::batch_end` says
//!   where each batch ends), so it may have to read several records before it applies.
//! - **Gap record** (`gap`): stands for events `weft-seq..=weft-end` of `weft-origin` that
//!   the topic does not hold and never will (`weft-format` `weft.v1.Gap`; the value is JSON
//!   `{"origin", "from", "to", "reason"}`): the publisher's log no longer had them, or one was
//!   too large for a record. A receiver that lacks them re-seeds; one that has them goes on.
//!   Any capture batch of that origin still open before it is never completed.
//! - The changes topic (`[kafka] changes`, `changes_topic`) holds JSON documents instead:
//!   `kafka::envelope`.
//!
//! `read` checks a record against its headers, so a record written by something else, or
//! damaged, is refused with what is wrong instead of being applied.
use crate::event::{Event, NodeId};
use crate::wire::{self, proto};

/// The `weft-format` header of a record of events.
pub const FORMAT: &str = "weft.v1.Batch";

/// The `weft-format` header of a gap record.
pub const GAP_FORMAT: &str = "weft.v1.Gap";

/// The topic holding `node`'s outgoing log in `mesh`.
pub fn topic(mesh: &str, node: &str) -> String {
    format!("weft.{mesh}.{node}")
}

/// The topic holding `node`'s own changes as JSON documents (`[kafka] changes`).
pub fn changes_topic(mesh: &str, node: &str) -> String {
    format!("weft.{mesh}.{node}.changes")
}

/// The name under which a changes topic acknowledges the events it took, as a peer does,
/// so the log keeps what it lacks (no node id can hold a `~`).
pub const CHANGES_READER: &str = "~changes";

/// The name under which a node's own topic acknowledges the events it took, as a peer does:
/// the log keeps what the topic lacks, even when every peer has it another way.
pub const TOPIC_READER: &str = "~topic";

/// One Kafka record of a node's topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub value: Vec<u8>,
}

impl Record {
    /// About what the record weighs against a producer's `message.max.bytes` (librdkafka
    /// adds a few bytes of framing per header and per record; this overcounts them).
    pub fn wire_size(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len() + 10).sum();
        self.key.len() + self.value.len() + headers + 64
    }
}

/// What a record of a node's topic holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Contents {
    /// Consecutive events of one origin.
    Events(Vec<Event>),
    /// Events `from..=to` of `origin` are not in the topic (a gap record).
    Gap { origin: NodeId, from: u64, to: u64 },
}

/// Why a record cannot be read as weft events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("the record has no `{0}` header; it was not written by weft")]
    MissingHeader(&'static str),
    #[error("the record's `{header}` header is `{value}`, not {expected}")]
    BadHeader {
        header: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("the record's value is not a weft.v1.Batch: {0}")]
    Value(String),
    #[error("the record's events do not match its headers: {0}")]
    Mismatch(String),
}

/// The records holding `events` (consecutive events of one origin), each at most about
/// `max_bytes` of value; an event larger than that gets a record of its own.
pub fn encode(events: &[Event], max_bytes: usize) -> Vec<Record> {
    let mut records = Vec::new();
    let mut run: Vec<proto::Event> = Vec::new();
    let mut bytes = 0;
    let mut first = 0;
    for (i, event) in events.iter().enumerate() {
        let encoded = wire::event_to_proto(event);
        let size = prost::Message::encoded_len(&encoded) + 8;
        if !run.is_empty() && bytes + size > max_bytes {
            records.push(record(&events[first..i], std::mem::take(&mut run)));
            bytes = 0;
            first = i;
        }
        bytes += size;
        run.push(encoded);
    }
    if !run.is_empty() {
        records.push(record(&events[first..], run));
    }
    records
}

fn record(events: &[Event], encoded: Vec<proto::Event>) -> Record {
    let (head, last) = (&events[0], &events[events.len() - 1]);
    let header = |name: &str, value: String| (name.to_owned(), value.into_bytes());
    Record {
        key: head.origin.clone(),
        headers: vec![
            header("weft-format", FORMAT.to_owned()),
            header("weft-origin", head.origin.clone()),
            header("weft-seq", head.seq.to_string()),
            header("weft-end", last.seq.to_string()),
            header("weft-hlc", last.hlc.0.to_string()),
        ],
        value: prost::Message::encode_to_vec(&proto::Batch { events: encoded }),
    }
}

/// A gap record: events `from..=to` of `origin` are not in the topic, for `reason`.
pub fn gap(origin: &str, from: u64, to: u64, reason: &str) -> Record {
    let header = |name: &str, value: String| (name.to_owned(), value.into_bytes());
    let value = serde_json::json!({ "origin": origin, "from": from, "to": to, "reason": reason });
    Record {
        key: origin.to_owned(),
        headers: vec![
            header("weft-format", GAP_FORMAT.to_owned()),
            header("weft-origin", origin.to_owned()),
            header("weft-seq", from.to_string()),
            header("weft-end", to.to_string()),
        ],
        value: value.to_string().into_bytes(),
    }
}

/// What a record holds, checked against its headers: events (`decode`) or a gap, whose
/// `weft-seq..=weft-end` must be a range of seqs.
pub fn read(headers: &[(String, Vec<u8>)], value: &[u8]) -> Result<Contents, RecordError> {
    let fields = Headers(headers);
    if fields.text("weft-format")? != GAP_FORMAT {
        return decode(headers, value).map(Contents::Events);
    }
    let (origin, from, to) = (
        fields.text("weft-origin")?,
        fields.number("weft-seq")?,
        fields.number("weft-end")?,
    );
    if from == 0 || from > to {
        return Err(RecordError::Mismatch(format!("a gap from seq {from} to {to}")));
    }
    Ok(Contents::Gap {
        origin: origin.to_owned(),
        from,
        to,
    })
}

/// A record's headers, read as weft's.
struct Headers<'a>(&'a [(String, Vec<u8>)]);

impl Headers<'_> {
    fn text(&self, name: &'static str) -> Result<&str, RecordError> {
        let (_, bytes) = (self.0.iter())
            .find(|(n, _)| n == name)
            .ok_or(RecordError::MissingHeader(name))?;
        std::str::from_utf8(bytes).map_err(|_| RecordError::BadHeader {
            header: name,
            value: String::from_utf8_lossy(bytes).into_owned(),
            expected: "UTF-8 text",
        })
    }

    fn number(&self, name: &'static str) -> Result<u64, RecordError> {
        let value = self.text(name)?;
        value.parse().map_err(|_| RecordError::BadHeader {
            header: name,
            value: value.to_owned(),
            expected: "a decimal number",
        })
    }
}

/// The events of a record, checked against its headers: the format, one origin, and seqs
/// running without a gap from `weft-seq` to `weft-end`.
pub fn decode(headers: &[(String, Vec<u8>)], value: &[u8]) -> Result<Vec<Event>, RecordError> {
    let fields = Headers(headers);
    let text = |name: &'static str| fields.text(name);
    let number = |name: &'static str| fields.number(name);
    let format = text("weft-format")?;
    if format != FORMAT {
        return Err(RecordError::BadHeader {
            header: "weft-format",
            value: format.to_owned(),
            expected: FORMAT,
        });
    }
    let (origin, from, to) = (text("weft-origin")?, number("weft-seq")?, number("weft-end")?);
    let batch: proto::Batch = prost::Message::decode(value).map_err(|e| RecordError::Value(e.to_string()))?;
    let events = (batch.events.into_iter())
        .map(wire::event_from_proto)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| RecordError::Value(e.to_string()))?;
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    let expected: Vec<u64> = (from..=to).collect();
    if seqs != expected {
        return Err(RecordError::Mismatch(format!(
            "headers say seqs {from}..={to}, the value holds {}",
            describe(&seqs)
        )));
    }
    if let Some(other) = events.iter().find(|e| e.origin != origin) {
        return Err(RecordError::Mismatch(format!(
            "headers say origin {origin}, the value holds an event of {}",
            other.origin
        )));
    }
    Ok(events)
}

fn describe(seqs: &[u64]) -> String {
    match (seqs.first(), seqs.last()) {
        (Some(first), Some(last)) => format!("{} events, seqs {first}..{last}", seqs.len()),
        _ => "no events".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Hlc, Key, Op, Row, Value};

    fn event(seq: u64, text: &str) -> Event {
        Event {
            origin: "n1".into(),
            origin_region: "r1".into(),
            seq,
            batch_end: 6,
            hlc: Hlc(seq << 22),
            table: "t".into(),
            key: Key(vec![Value::Integer(seq as i64)]),
            op: Op::Upsert(Row(vec![
                ("id".into(), Value::Integer(seq as i64)),
                ("v".into(), Value::Text(text.into())),
            ])),
            version: [("n1".to_string(), seq)].into_iter().collect(),
            path: vec!["n1".into()],
            committed_at_micros: 1_700_000_000_123_456,
            crdt: Vec::new(),
            ownership: None,
        }
    }

    #[test]
    fn records_split_by_size_and_decode_to_the_same_events() {
        let events: Vec<Event> = (1..=6).map(|s| event(s, &"x".repeat(300))).collect();
        let records = encode(&events, 800);
        assert_eq!(records.len(), 3, "two events of about 350 bytes per record");
        let header = |r: &Record, n: &str| {
            let (_, v) = r.headers.iter().find(|(k, _)| k == n).unwrap();
            String::from_utf8(v.clone()).unwrap()
        };
        assert_eq!(
            (header(&records[1], "weft-seq"), header(&records[1], "weft-end")),
            ("3".into(), "4".into())
        );
        assert_eq!(records[0].key, "n1");
        let decoded: Vec<Event> = records
            .iter()
            .flat_map(|r| decode(&r.headers, &r.value).unwrap())
            .collect();
        let encoded = |e: &[Event]| e.iter().map(wire::encode_event).collect::<Vec<_>>();
        assert_eq!(encoded(&decoded), encoded(&events));
        let huge = encode(&[event(1, &"y".repeat(5_000))], 800);
        assert_eq!(huge.len(), 1, "an event above the size gets a record of its own");
    }

    #[test]
    fn a_record_that_disagrees_with_its_headers_is_refused_with_what_is_wrong() {
        let good = encode(&[event(1, "a"), event(2, "b")], 1 << 20).remove(0);
        let with = |name: &str, value: &str| {
            let mut headers = good.headers.clone();
            headers.iter_mut().find(|(k, _)| k == name).unwrap().1 = value.as_bytes().to_vec();
            decode(&headers, &good.value).unwrap_err().to_string()
        };
        assert!(with("weft-end", "3").contains("headers say seqs 1..=3, the value holds 2 events, seqs 1..2"));
        assert!(with("weft-origin", "n2").contains("headers say origin n2"));
        assert!(with("weft-format", "avro").contains("`avro`, not weft.v1.Batch"));
        assert!(with("weft-seq", "one").contains("not a decimal number"));
        let missing: Vec<_> = good
            .headers
            .iter()
            .filter(|(k, _)| k != "weft-origin")
            .cloned()
            .collect();
        assert_eq!(
            decode(&missing, &good.value),
            Err(RecordError::MissingHeader("weft-origin"))
        );
        assert!(matches!(decode(&good.headers, b"\xff\xff"), Err(RecordError::Value(_))));
    }

    #[test]
    fn a_gap_record_reads_back_as_the_range_it_stands_for() {
        let record = gap("n1", 4, 9, "trimmed before it was published");
        assert_eq!(
            read(&record.headers, &record.value),
            Ok(Contents::Gap {
                origin: "n1".into(),
                from: 4,
                to: 9
            })
        );
        let value: serde_json::Value = serde_json::from_slice(&record.value).unwrap();
        assert_eq!(value["reason"], "trimmed before it was published");
        let backwards = gap("n1", 9, 4, "");
        assert!(read(&backwards.headers, &backwards.value).is_err(), "not a range");
        assert!(decode(&record.headers, &record.value).is_err(), "no events in it");
        let events = encode(&[event(1, "a")], 1 << 20).remove(0);
        assert!(matches!(read(&events.headers, &events.value), Ok(Contents::Events(e)) if e.len() == 1));
    }
}
