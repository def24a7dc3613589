//! The documents of a changes topic (`[kafka] changes`): each change of the node's own as a
//! JSON document consumers that do not speak weft can read, and a marker wherever a change
//! cannot be one.
//!
//! - **Envelope** (`envelope`): one document per change, in the shape Debezium consumers
//!   know (`before`, `after`, `source`, `op`, `ts_ms`). weft captures the row after each
//!   write, not before it, so `before` is always null and an insert and an update are both
//!   `"u"`; a delete is `"d"` with the key in `source.key`. Record: keyed by table and primary
//!   key (JSON `{"table": .., "key": [..]}`), headers `weft-format`
//!   (`weft.v1.Envelope+json`), `weft-origin` and `weft-seq`.
//! - **Marker** (`weft-format` `weft.v1.Marker+json`, headers `weft-origin`, `weft-seq` and
//!   `weft-end`): a document with a `marker` field and no `op`, so a consumer that acts on
//!   `op` never takes it for a change. `source.seq` is the last seq it stands for, so seqs run
//!   on without a jump across it.
//!   - `too_large` (`too_large`): the change's document (`bytes`) is larger than the largest
//!     record (`limit`, from `max_message_mib`). `source` is the envelope's (table, key, seq,
//!     HLC, version vector); keyed as the change. The row itself is in every region's
//!     database; only its image is missing here.
//!   - `gap` (`gap`): changes `missing.from..=missing.to` of `source.node` will not follow:
//!     the log no longer held them when the publisher came to them (`reason`).
//!
//! Documents come in commit order. One may appear twice after a crash of the publisher
//! (never out of order); a consumer that must count each once drops a document whose
//! `source.seq` is not past the last it read, unless its `source.hlc` is new: a region
//! restored from an older copy numbers new changes after what its peers have, which may
//! reuse seqs its changes topic already holds.
use crate::event::{Event, Op};
use crate::transport::record::Record;

/// The `weft-format` header of a change's document.
pub const ENVELOPE_FORMAT: &str = "weft.v1.Envelope+json";

/// The `weft-format` header of a marker.
pub const MARKER_FORMAT: &str = "weft.v1.Marker+json";

fn header(name: &str, value: String) -> (String, Vec<u8>) {
    (name.to_owned(), value.into_bytes())
}

fn key_json(event: &Event) -> serde_json::Value {
    let key: Vec<serde_json::Value> = event.key.0.iter().map(crate::event::Value::to_json).collect();
    serde_json::json!({ "table": event.table, "key": key })
}

/// The records of `events`, one document each (see the module docs).
pub fn envelopes(events: &[Event], mesh: &str) -> Vec<Record> {
    (events.iter())
        .map(|event| Record {
            key: key_json(event).to_string(),
            headers: vec![
                header("weft-format", ENVELOPE_FORMAT.to_owned()),
                header("weft-origin", event.origin.clone()),
                header("weft-seq", event.seq.to_string()),
            ],
            value: envelope(event, mesh).to_string().into_bytes(),
        })
        .collect()
}

/// The `source` block of an event's document.
fn source(event: &Event, mesh: &str) -> serde_json::Value {
    let key: Vec<serde_json::Value> = event.key.0.iter().map(crate::event::Value::to_json).collect();
    serde_json::json!({
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
    })
}

/// One event as a Debezium-shaped JSON document (see the module docs).
pub fn envelope(event: &Event, mesh: &str) -> serde_json::Value {
    let (after, op) = match &event.op {
        Op::Upsert(row) => (row.to_json(), "u"),
        Op::Delete => (serde_json::Value::Null, "d"),
        Op::Undecodable { .. } => (event.op.to_json(), "u"),
    };
    serde_json::json!({
        "before": null,
        "after": after,
        "source": source(event, mesh),
        "op": op,
        "ts_ms": event.committed_at_micros.div_euclid(1000),
    })
}

fn marker(origin: &str, from: u64, to: u64, key: String, document: serde_json::Value) -> Record {
    Record {
        key,
        headers: vec![
            header("weft-format", MARKER_FORMAT.to_owned()),
            header("weft-origin", origin.to_owned()),
            header("weft-seq", from.to_string()),
            header("weft-end", to.to_string()),
        ],
        value: document.to_string().into_bytes(),
    }
}

/// The `too_large` marker of `event`, whose document is `bytes` long, over `limit`.
pub fn too_large(event: &Event, mesh: &str, bytes: usize, limit: usize) -> Record {
    let document = serde_json::json!({
        "marker": "too_large",
        "source": source(event, mesh),
        "bytes": bytes,
        "limit": limit,
        "ts_ms": event.committed_at_micros.div_euclid(1000),
    });
    let marked = marker(
        &event.origin,
        event.seq,
        event.seq,
        key_json(event).to_string(),
        document,
    );
    if marked.wire_size() <= limit {
        return marked;
    }
    // A key too large for a record of its own (absurd, but it must not stop the topic):
    // the marker goes without it.
    let mut source = source(event, mesh);
    source["key"] = serde_json::Value::Null;
    let document = serde_json::json!({ "marker": "too_large", "source": source, "bytes": bytes, "limit": limit });
    let key = serde_json::json!({ "table": event.table, "key": null }).to_string();
    marker(&event.origin, event.seq, event.seq, key, document)
}

/// The `gap` marker: changes `from..=to` of `origin` will not follow, for `reason`.
pub fn gap(origin: &str, from: u64, to: u64, mesh: &str, reason: &str) -> Record {
    let document = serde_json::json!({
        "marker": "gap",
        "source": {
            "connector": "weft",
            "version": env!("CARGO_PKG_VERSION"),
            "name": mesh,
            "node": origin,
            "seq": to,
        },
        "missing": { "from": from, "to": to },
        "reason": reason,
    });
    let key = serde_json::json!({ "marker": "gap", "node": origin }).to_string();
    marker(origin, from, to, key, document)
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

    fn header_of(record: &Record, name: &str) -> String {
        let (_, v) = record.headers.iter().find(|(k, _)| k == name).unwrap();
        String::from_utf8(v.clone()).unwrap()
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
            crate::transport::record::decode(&records[1].headers, &records[1].value).is_err(),
            "not a weft.v1.Batch"
        );
    }

    #[test]
    fn a_marker_names_what_it_stands_for_and_is_no_change() {
        let large = too_large(&event(7, "big"), "prod", 2_000_000, 1_114_112);
        assert_eq!(header_of(&large, "weft-format"), MARKER_FORMAT);
        assert_eq!(
            (header_of(&large, "weft-seq"), header_of(&large, "weft-end")),
            ("7".into(), "7".into())
        );
        assert_eq!(large.key, r#"{"key":[7],"table":"t"}"#, "keyed as the change");
        let json: serde_json::Value = serde_json::from_slice(&large.value).unwrap();
        assert_eq!((json["marker"].as_str(), json.get("op")), (Some("too_large"), None));
        assert_eq!(
            (json["source"]["seq"].as_u64(), json["source"]["table"].as_str()),
            (Some(7), Some("t"))
        );
        assert_eq!(
            (json["bytes"].as_u64(), json["limit"].as_u64()),
            (Some(2_000_000), Some(1_114_112))
        );
        let mut huge_key = event(8, "");
        huge_key.key = Key(vec![Value::Text("k".repeat(5_000))]);
        let keyless = too_large(&huge_key, "prod", 9_000, 1_000);
        assert!(keyless.value.len() < 1_000 && keyless.key.len() < 100, "{keyless:?}");

        let hole = gap("n1", 11, 40, "prod", "trimmed");
        assert_eq!(
            (header_of(&hole, "weft-seq"), header_of(&hole, "weft-end")),
            ("11".into(), "40".into())
        );
        let json: serde_json::Value = serde_json::from_slice(&hole.value).unwrap();
        assert_eq!((json["marker"].as_str(), json.get("op")), (Some("gap"), None));
        assert_eq!(
            (
                json["missing"]["from"].as_u64(),
                json["missing"]["to"].as_u64(),
                json["source"]["seq"].as_u64()
            ),
            (Some(11), Some(40), Some(40))
        );
        assert_eq!(json["reason"], "trimmed");
    }
}
