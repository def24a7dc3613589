//! weft's Kafka record format: how a node's outgoing log is laid out in its topic, and the
//! optional JSON envelope standard consumers can read without weft.
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
//! - **Envelope** (`envelope`): one JSON document per event in the shape Debezium
//!   consumers know (`before`, `after`, `source`, `op`, `ts_ms`). weft captures the row
//!   after each write, not before it, so `before` is always null and an insert and an update
//!   are both `"u"`; a delete is `"d"` with the key in `source.key`. With `[kafka] changes`
//!   in the topology, each node publishes its own events so into `weft.<mesh>.<node>.changes`
//!   (`changes_topic`, `envelopes`): one record per event, keyed by table and primary key
//!   (JSON `{"table": .., "key": [..]}`), headers `weft-format` (`weft.v1.Envelope+json`),
//!   `weft-origin` and `weft-seq`. A change may appear twice there after a crash of the
//!   publisher (never out of order, never with a hole before it); a consumer that must count
//!   each once drops a document whose `source.seq` is not past the last it read, unless its
//!   `source.hlc` is new: a region restored from an older copy numbers new changes after what
//!   its peers have, which may reuse seqs its changes topic already holds.
//!
//! `decode` checks a record against its headers, so a record written by something else, or
//! damaged, is refused with what is wrong instead of being applied.
use crate::event::{Event, Op};
use crate::wire::{self, proto};

/// The `weft-format` header of a record this build writes.
pub const FORMAT: &str = "weft.v1.Batch";

/// The topic holding `node`'s outgoing log in `mesh`.
pub fn topic(mesh: &str, node: &str) -> String {
    format!("weft.{mesh}.{node}")
}

/// The `weft-format` header of a record of a changes topic.
pub const ENVELOPE_FORMAT: &str = "weft.v1.Envelope+json";

/// The topic holding `node`'s own changes as JSON documents (`[kafka] changes`).
pub fn changes_topic(mesh: &str, node: &str) -> String {
    format!("weft.{mesh}.{node}.changes")
}

/// The name under which a changes topic acknowledges the events it took, as a peer does,
/// so the log keeps what it lacks (no node id can hold a `~`).
pub const CHANGES_READER: &str = "~changes";

/// One Kafka record of a node's topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub value: Vec<u8>,
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

/// The events of a record, checked against its headers: the format, one origin, and seqs
/// running without a gap from `weft-seq` to `weft-end`.
pub fn decode(headers: &[(String, Vec<u8>)], value: &[u8]) -> Result<Vec<Event>, RecordError> {
    let text = |name: &'static str| -> Result<&str, RecordError> {
        let (_, bytes) = headers
            .iter()
            .find(|(n, _)| n == name)
            .ok_or(RecordError::MissingHeader(name))?;
        std::str::from_utf8(bytes).map_err(|_| RecordError::BadHeader {
            header: name,
            value: String::from_utf8_lossy(bytes).into_owned(),
            expected: "UTF-8 text",
        })
    };
    let number = |name: &'static str| -> Result<u64, RecordError> {
        let value = text(name)?;
        value.parse().map_err(|_| RecordError::BadHeader {
            header: name,
            value: value.to_owned(),
            expected: "a decimal number",
        })
    };
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

/// The records of a changes topic holding `events`, one per event (see the module docs).
pub fn envelopes(events: &[Event], mesh: &str) -> Vec<Record> {
    let header = |name: &str, value: String| (name.to_owned(), value.into_bytes());
    (events.iter())
        .map(|event| {
            let key: Vec<serde_json::Value> = event.key.0.iter().map(crate::event::Value::to_json).collect();
            Record {
                key: serde_json::json!({ "table": event.table, "key": key }).to_string(),
                headers: vec![
                    header("weft-format", ENVELOPE_FORMAT.to_owned()),
                    header("weft-origin", event.origin.clone()),
                    header("weft-seq", event.seq.to_string()),
                ],
                value: envelope(event, mesh).to_string().into_bytes(),
            }
        })
        .collect()
}

/// One event as a Debezium-shaped JSON document (see the module docs).
pub fn envelope(event: &Event, mesh: &str) -> serde_json::Value {
    let (after, op) = match &event.op {
        Op::Upsert(row) => (row.to_json(), "u"),
        Op::Delete => (serde_json::Value::Null, "d"),
        Op::Undecodable { .. } => (event.op.to_json(), "u"),
    };
    let key: Vec<serde_json::Value> = event.key.0.iter().map(crate::event::Value::to_json).collect();
    serde_json::json!({
        "before": null,
        "after": after,
        "source": {
            "connector": "weft",
            "version": env!("CARGO_PKG_VERSION"),
            "name": mesh,
            "node": event.origin,
            "region": event.origin_region,
            "table": event.table,
            "key": key,
            "seq": event.seq,
            "hlc": event.hlc.to_string(),
            "version_vector": serde_json::from_str::<serde_json::Value>(&event.version.to_json()).unwrap_or_default(),
        },
        "op": op,
        "ts_ms": event.committed_at_micros.div_euclid(1000),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Hlc, Key, Row, Value};

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
    fn the_envelope_has_the_shape_debezium_consumers_read() {
        let json = envelope(&event(4, "four"), "prod");
        assert_eq!(json["op"], "u");
        assert_eq!(json["before"], serde_json::Value::Null);
        assert_eq!(json["after"]["v"], "four");
        assert_eq!(json["source"]["table"], "t");
        assert_eq!(json["source"]["seq"], 4);
        assert_eq!(json["ts_ms"], 1_700_000_000_123i64);
        let mut deleted = event(5, "");
        deleted.op = Op::Delete;
        let json = envelope(&deleted, "prod");
        assert_eq!(
            (json["op"].as_str(), json["source"]["key"][0].as_i64()),
            (Some("d"), Some(5))
        );
    }

    #[test]
    fn a_changes_record_is_one_event_keyed_by_table_and_key() {
        let records = envelopes(&[event(4, "four"), event(5, "five")], "prod");
        assert_eq!(records.len(), 2);
        assert_eq!(records[1].key, r#"{"key":[5],"table":"t"}"#);
        let value: serde_json::Value = serde_json::from_slice(&records[1].value).unwrap();
        assert_eq!(value, envelope(&event(5, "five"), "prod"));
        let seq = records[1].headers.iter().find(|(k, _)| k == "weft-seq");
        assert_eq!(seq.map(|(_, v)| v.as_slice()), Some(&b"5"[..]));
        assert!(
            decode(&records[1].headers, &records[1].value).is_err(),
            "not a weft.v1.Batch"
        );
    }
}
