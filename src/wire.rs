//! The wire format: generated protobuf types (package `weft.v1`) and the one place they are
//! converted to and from domain types.
//!
//! Decoding validates, event by event: an event that cannot be placed in its origin's
//! stream (no origin, seq or batch end) is a `WireError`; one that can be placed but whose
//! content cannot be read (a value kind, op or CRDT state this build does not know) becomes
//! an `Op::Undecodable` event, never guessed at, so it is dead-lettered alone. Unknown fields
//! are ignored by prost, which is what lets newer peers add fields.
use std::collections::BTreeMap;

use crate::event::{Event, Hlc, Key, NodeId, Op, Row, Value};
use crate::version::VersionVector;

#[allow(clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("weft.v1");
}

pub const PROTOCOL: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("event {origin}/{seq}: {what}")]
    Malformed {
        origin: String,
        seq: u64,
        what: &'static str,
    },
    #[error("cannot decode event: {0}")]
    Decode(#[from] prost::DecodeError),
}

fn value_to_proto(value: &Value) -> proto::Value {
    use proto::value::Kind;
    let kind = match value {
        Value::Null => Kind::Null(true),
        Value::Integer(i) => Kind::Integer(*i),
        Value::Real(f) => Kind::Real(*f),
        Value::Text(s) => Kind::Text(s.clone()),
        Value::Blob(b) => Kind::Blob(b.clone()),
    };
    proto::Value { kind: Some(kind) }
}

fn value_from_proto(value: proto::Value) -> Option<Value> {
    use proto::value::Kind;
    Some(match value.kind? {
        Kind::Null(_) => Value::Null,
        Kind::Integer(i) => Value::Integer(i),
        Kind::Real(f) => Value::Real(f),
        Kind::Text(s) => Value::Text(s),
        Kind::Blob(b) => Value::Blob(b),
    })
}

pub fn event_to_proto(event: &Event) -> proto::Event {
    let op = match &event.op {
        Op::Upsert(row) => proto::event::Op::Upsert(proto::Upsert {
            columns: row
                .0
                .iter()
                .map(|(name, value)| proto::Column {
                    name: name.clone(),
                    value: Some(value_to_proto(value)),
                })
                .collect(),
        }),
        Op::Delete => proto::event::Op::Delete(proto::Delete {}),
        Op::Undecodable { raw, .. } => {
            // Passed on as received (what prost could read of it), with this hop's path.
            let mut received: proto::Event = prost::Message::decode(raw.as_slice()).unwrap_or_default();
            received.path = event.path.clone();
            return received;
        }
    };
    proto::Event {
        origin_node: event.origin.clone(),
        origin_region: event.origin_region.clone(),
        seq: event.seq,
        batch_end: event.batch_end,
        hlc: event.hlc.0,
        table: event.table.clone(),
        key: event.key.0.iter().map(value_to_proto).collect(),
        op: Some(op),
        version: event
            .version
            .iter()
            .map(|(node, counter)| proto::VersionEntry {
                node: node.to_owned(),
                counter,
            })
            .collect(),
        path: event.path.clone(),
        committed_at_micros: event.committed_at_micros,
        crdt: event
            .crdt
            .iter()
            .map(|(column, state)| proto::CrdtState {
                column: column.clone(),
                state: state.to_json(),
            })
            .collect(),
        ownership: event.ownership.as_ref().map(|o| proto::Ownership {
            owner: o.owner.clone(),
            epoch: o.epoch,
            transfer: o.transfer,
        }),
    }
}

/// Converts a received event. An event without origin, seq or a batch end at or after its
/// seq cannot be placed in its origin's stream: that is an error (the sender is broken or
/// hostile, and the whole frame is refused). An event that can be placed but whose content
/// cannot be read becomes an [`Op::Undecodable`] event, so one poison event is
/// dead-lettered where it stands and the rest of the stream flows.
pub fn event_from_proto(event: proto::Event) -> Result<Event, WireError> {
    if event.origin_node.is_empty() || event.seq == 0 || event.batch_end < event.seq {
        return Err(WireError::Malformed {
            origin: event.origin_node.clone(),
            seq: event.seq,
            what: "missing origin, seq or batch end",
        });
    }
    let key = event
        .key
        .iter()
        .cloned()
        .map(value_from_proto)
        .collect::<Option<Vec<_>>>();
    let content = match key {
        Some(key) => content_from_proto(&event).map(|(op, crdt)| (Key(key), op, crdt)),
        None => Err("a key value of a kind this build does not know"),
    };
    let (key, op, crdt) = match content {
        Ok(content) => content,
        Err(reason) => {
            let raw = prost::Message::encode_to_vec(&event);
            let op = Op::Undecodable {
                reason: reason.to_owned(),
                raw,
            };
            (Key(Vec::new()), op, Vec::new())
        }
    };
    let ownership = event.ownership.as_ref().map(|o| crate::event::Ownership {
        owner: o.owner.clone(),
        epoch: o.epoch,
        transfer: o.transfer,
    });
    Ok(Event {
        ownership,
        crdt,
        version: event
            .version
            .into_iter()
            .map(|entry| (entry.node, entry.counter))
            .collect::<VersionVector>(),
        origin: event.origin_node,
        origin_region: event.origin_region,
        seq: event.seq,
        batch_end: event.batch_end,
        hlc: Hlc(event.hlc),
        table: event.table,
        key,
        op,
        path: event.path,
        committed_at_micros: event.committed_at_micros,
    })
}

type Content = (Op, Vec<(String, crate::crdt::ColumnState)>);

/// The op and CRDT states of a received event, or what of them cannot be read.
fn content_from_proto(event: &proto::Event) -> Result<Content, &'static str> {
    let op = match event.op.clone() {
        Some(proto::event::Op::Upsert(upsert)) => {
            let mut columns = Vec::with_capacity(upsert.columns.len());
            for column in upsert.columns {
                let value = column
                    .value
                    .and_then(value_from_proto)
                    .ok_or("a column value of a kind this build does not know")?;
                columns.push((column.name, value));
            }
            Op::Upsert(Row(columns))
        }
        Some(proto::event::Op::Delete(_)) => Op::Delete,
        None => return Err("an op this build does not know (neither upsert nor delete)"),
    };
    let crdt = event
        .crdt
        .iter()
        .map(|c| {
            crate::crdt::ColumnState::from_json(&c.column, &c.state)
                .map(|state| (c.column.clone(), state))
                .map_err(|_| "a CRDT state that does not parse (a CRDT type this build does not know?)")
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((op, crdt))
}

pub fn encode_event(event: &Event) -> Vec<u8> {
    prost::Message::encode_to_vec(&event_to_proto(event))
}

pub fn decode_event(bytes: &[u8]) -> Result<Event, WireError> {
    let event: proto::Event = prost::Message::decode(bytes)?;
    event_from_proto(event)
}

/// A version vector (or purge floor) as the wire carries it.
pub fn vector_to_proto(vector: &VersionVector) -> Vec<proto::VersionEntry> {
    vector
        .iter()
        .map(|(node, counter)| proto::VersionEntry {
            node: node.to_owned(),
            counter,
        })
        .collect()
}

pub fn vector_from_proto(entries: &[proto::VersionEntry]) -> VersionVector {
    let mut vector = VersionVector::new();
    for entry in entries {
        vector.set(&entry.node, entry.counter);
    }
    vector
}

fn columns_to_proto(row: &Row) -> Vec<proto::Column> {
    row.0
        .iter()
        .map(|(name, value)| proto::Column {
            name: name.clone(),
            value: Some(value_to_proto(value)),
        })
        .collect()
}

/// A row as `weft audit` compares it.
pub fn audit_row_to_proto(row: &crate::store::checksum::AuditRow) -> proto::AuditRow {
    let version = row.version.as_ref();
    proto::AuditRow {
        key: row.key.clone(),
        known: version.is_some(),
        version: version.map_or_else(Vec::new, |v| vector_to_proto(&v.version)),
        hlc: version.map_or(0, |v| v.hlc.0),
        origin: version.map(|v| v.origin.clone()).unwrap_or_default(),
        deleted: version.is_some_and(|v| v.deleted),
        present: row.image.is_some(),
        image: row.image.as_ref().map(columns_to_proto).unwrap_or_default(),
        waiting: row.waiting,
        edited: row.edited,
    }
}

/// A received audit row, or what is wrong with it (a value kind this build does not know).
pub fn audit_row_from_proto(row: proto::AuditRow) -> Result<crate::store::checksum::AuditRow, String> {
    let version = row.known.then(|| crate::replicate::RowVersion {
        version: vector_from_proto(&row.version),
        hlc: Hlc(row.hlc),
        origin: row.origin.clone(),
        deleted: row.deleted,
        // The digest stays with the node: it sends whether its row still matches (`edited`).
        image: None,
    });
    let image = match row.present {
        false => None,
        true => Some(Row(row
            .image
            .into_iter()
            .map(|c| {
                let value = c.value.and_then(value_from_proto);
                value.map(|v| (c.name.clone(), v)).ok_or(format!(
                    "column {} has a value of a kind this build does not know",
                    c.name
                ))
            })
            .collect::<Result<_, _>>()?)),
    };
    Ok(crate::store::checksum::AuditRow {
        key: row.key,
        version,
        image,
        waiting: row.waiting,
        edited: row.edited,
    })
}

/// Node reports (`stability`) as acknowledgements carry them.
pub fn reports_to_proto(reports: &[(NodeId, i64, BTreeMap<NodeId, u64>)]) -> Vec<proto::NodeReport> {
    reports
        .iter()
        .map(|(node, at, frontiers)| proto::NodeReport {
            node: node.clone(),
            frontiers: frontiers_to_proto(frontiers),
            at_micros: *at,
        })
        .collect()
}

pub fn reports_from_proto(reports: Vec<proto::NodeReport>) -> Vec<(NodeId, i64, BTreeMap<NodeId, u64>)> {
    reports
        .into_iter()
        .map(|r| (r.node, r.at_micros, frontiers_from_proto(r.frontiers)))
        .collect()
}

/// A frontier map as sent in Welcome, Ack and Heartbeat.
pub fn frontiers_to_proto(frontiers: &BTreeMap<NodeId, u64>) -> Vec<proto::Frontier> {
    frontiers
        .iter()
        .map(|(origin, &seq)| proto::Frontier {
            origin: origin.clone(),
            seq,
        })
        .collect()
}

/// A received frontier map; should an origin repeat, its last entry counts.
pub fn frontiers_from_proto(frontiers: Vec<proto::Frontier>) -> BTreeMap<NodeId, u64> {
    frontiers.into_iter().map(|f| (f.origin, f.seq)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_through_bytes() {
        let event = Event {
            origin: "a".into(),
            origin_region: "ra".into(),
            seq: 7,
            batch_end: 9,
            hlc: Hlc(123_456),
            table: "t".into(),
            key: Key(vec![Value::Integer(-5), Value::Text("k".into())]),
            op: Op::Upsert(Row(vec![
                ("n".into(), Value::Null),
                ("f".into(), Value::Real(-0.0)),
                ("b".into(), Value::Blob(vec![0, 255])),
            ])),
            version: [("a".to_string(), 3), ("b".to_string(), 1)].into_iter().collect(),
            path: vec!["a".into()],
            committed_at_micros: 42,
            crdt: vec![],
            ownership: None,
        };
        assert_eq!(decode_event(&encode_event(&event)).unwrap(), event);
    }

    fn delete_of_key_1() -> Event {
        Event {
            origin: "a".into(),
            origin_region: "r".into(),
            seq: 1,
            batch_end: 1,
            hlc: Hlc(1),
            table: "t".into(),
            key: Key(vec![Value::Integer(1)]),
            op: Op::Delete,
            version: Default::default(),
            path: vec!["a".into()],
            committed_at_micros: 0,
            crdt: vec![],
            ownership: None,
        }
    }

    #[test]
    fn an_event_without_op_is_undecodable_and_relays_as_received() {
        let mut p = event_to_proto(&delete_of_key_1());
        p.op = None;
        let mut event = event_from_proto(p.clone()).unwrap();
        let Op::Undecodable { reason, .. } = &event.op else {
            panic!("{event:?}")
        };
        assert!(reason.contains("op this build does not know"), "{reason}");
        assert_eq!((event.origin.as_str(), event.seq, event.table.as_str()), ("a", 1, "t"));
        event.path.push("b".into());
        let relayed = event_to_proto(&event);
        assert_eq!(relayed.path, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(relayed.key, p.key, "passed on as received");
    }

    #[test]
    fn refuses_an_event_that_cannot_be_placed_in_its_stream() {
        let mut p = event_to_proto(&delete_of_key_1());
        p.batch_end = 0;
        let err = event_from_proto(p).unwrap_err().to_string();
        assert_eq!(err, "event a/1: missing origin, seq or batch end");
    }
}
