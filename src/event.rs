//! The event: one captured row change, as every layer of weft sees it.
//!
//! Values keep their type exactly (SQLite storage classes). `Key` and `Row` have one
//! canonical byte encoding each, used to store keys in metadata tables and to break exact
//! LWW ties by content; the encoding is stable across versions and platforms, and two values
//! encode equal if and only if they are equal (floats compare by bit pattern).
use std::cmp::Ordering;
use std::fmt;

use crate::version::VersionVector;

/// A node id, unique in the mesh (`us-east-1`).
pub type NodeId = String;

/// Who a node is, as stamped on its events.
#[derive(Debug, Clone)]
pub struct Identity {
    pub node: NodeId,
    pub region: String,
}

/// One typed column value.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Value {
    Null,
    Integer(i64),
    Real(#[serde(with = "lossless_f64")] f64),
    Text(String),
    Blob(Vec<u8>),
}

/// Serde for a float that keeps NaN and the infinities (JSON has no numbers for them, and
/// serde_json would write `null`, which does not read back): finite values are numbers,
/// the others the strings `"NaN"`, `"inf"` and `"-inf"`. A `null` left by an older build
/// reads as NaN.
mod lossless_f64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
        match *value {
            v if v.is_finite() => serializer.serialize_f64(v),
            v if v.is_nan() => serializer.serialize_str("NaN"),
            v if v > 0.0 => serializer.serialize_str("inf"),
            _ => serializer.serialize_str("-inf"),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Number(f64),
        Text(String),
        Null(()),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
        match Repr::deserialize(deserializer)? {
            Repr::Number(v) => Ok(v),
            Repr::Null(()) => Ok(f64::NAN),
            Repr::Text(text) => match text.as_str() {
                "NaN" => Ok(f64::NAN),
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                other => Err(serde::de::Error::custom(format!("`{other}` is not a float"))),
            },
        }
    }
}

impl Value {
    fn rank(&self) -> u8 {
        match self {
            Value::Null => 0,
            Value::Integer(_) => 1,
            Value::Real(_) => 2,
            Value::Text(_) => 3,
            Value::Blob(_) => 4,
        }
    }

    /// Appends the canonical encoding: a type tag, then a self-delimiting body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.rank());
        match self {
            Value::Null => {}
            Value::Integer(i) => out.extend_from_slice(&i.to_be_bytes()),
            Value::Real(f) => out.extend_from_slice(&f.to_bits().to_be_bytes()),
            Value::Text(s) => {
                out.extend_from_slice(&(s.len() as u64).to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Value::Blob(b) => {
                out.extend_from_slice(&(b.len() as u64).to_be_bytes());
                out.extend_from_slice(b);
            }
        }
    }

    /// A JSON rendering for people (conflict log, dead letters, CLI): blobs as hex.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Integer(i) => (*i).into(),
            Value::Real(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or_else(|| f.to_string().into()),
            Value::Text(s) => s.clone().into(),
            Value::Blob(b) => {
                let hex: String = b.iter().map(|byte| format!("{byte:02x}")).collect();
                serde_json::json!({ "blob": hex })
            }
        }
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Value {}

impl PartialOrd for Value {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A total order (type first, floats by `total_cmp`) so content tie-breaks are deterministic.
impl Ord for Value {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Value::Integer(a), Value::Integer(b)) => a.cmp(b),
            (Value::Real(a), Value::Real(b)) => a.total_cmp(b),
            (Value::Text(a), Value::Text(b)) => a.cmp(b),
            (Value::Blob(a), Value::Blob(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_json())
    }
}

/// Primary-key values in the table's primary-key column order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key(pub Vec<Value>);

impl Key {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        for value in &self.0 {
            value.encode(&mut out);
        }
        out
    }

    /// The key whose canonical encoding `bytes` is (what metadata tables store), or what is
    /// wrong with them.
    pub fn from_bytes(mut bytes: &[u8]) -> Result<Self, String> {
        fn take<'b>(bytes: &mut &'b [u8], n: usize) -> Result<&'b [u8], String> {
            if bytes.len() < n {
                return Err(format!("key encoding ends {} bytes early", n - bytes.len()));
            }
            let (head, rest) = bytes.split_at(n);
            *bytes = rest;
            Ok(head)
        }
        fn word(bytes: &mut &[u8]) -> Result<[u8; 8], String> {
            Ok(take(bytes, 8)?.try_into().expect("eight bytes"))
        }
        let mut values = Vec::new();
        while let Some((&tag, rest)) = bytes.split_first() {
            bytes = rest;
            let value = match tag {
                0 => Value::Null,
                1 => Value::Integer(i64::from_be_bytes(word(&mut bytes)?)),
                2 => Value::Real(f64::from_bits(u64::from_be_bytes(word(&mut bytes)?))),
                3 | 4 => {
                    let len = usize::try_from(u64::from_be_bytes(word(&mut bytes)?))
                        .map_err(|_| "key value length does not fit in memory".to_owned())?;
                    let body = take(&mut bytes, len)?.to_vec();
                    if tag == 3 {
                        Value::Text(String::from_utf8(body).map_err(|e| format!("key text is not UTF-8: {e}"))?)
                    } else {
                        Value::Blob(body)
                    }
                }
                other => return Err(format!("unknown key value tag {other}")),
            };
            values.push(value);
        }
        Ok(Key(values))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|v| v.to_string()).collect();
        write!(f, "[{}]", parts.join(", "))
    }
}

/// A whole row image: (column, value) pairs in the table's column order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Row(pub Vec<(String, Value)>);

impl Row {
    /// Canonical encoding, independent of column order.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut columns: Vec<&(String, Value)> = self.0.iter().collect();
        columns.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = Vec::new();
        for (name, value) in columns {
            out.extend_from_slice(&(name.len() as u64).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
            value.encode(&mut out);
        }
        out
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.0
                .iter()
                .map(|(name, value)| (name.clone(), value.to_json()))
                .collect(),
        )
    }

    pub fn get(&self, column: &str) -> Option<&Value> {
        self.0.iter().find(|(name, _)| name == column).map(|(_, v)| v)
    }
}

/// What the write did to the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Insert or update: the new row image.
    Upsert(Row),
    /// Delete: the row becomes a tombstone that keeps its version.
    Delete,
    /// An event whose origin, seq and batch were readable but whose content was not (a value
    /// kind or CRDT state this build does not know, say from a newer peer). It advances its
    /// origin's frontier like any event, is dead-lettered with `reason` and never written;
    /// `raw` is the event as received, kept so a later build can retry it and relays pass
    /// it on unchanged.
    Undecodable { reason: String, raw: Vec<u8> },
}

impl Op {
    pub fn is_delete(&self) -> bool {
        matches!(self, Op::Delete)
    }

    /// Canonical content for exact LWW ties; a tombstone sorts below every row image.
    pub fn content_bytes(&self) -> Vec<u8> {
        match self {
            Op::Delete => Vec::new(),
            Op::Undecodable { raw, .. } => raw.clone(),
            Op::Upsert(row) => {
                let mut out = vec![1];
                out.extend(row.to_bytes());
                out
            }
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Op::Delete => serde_json::Value::Null,
            Op::Upsert(row) => row.to_json(),
            Op::Undecodable { reason, .. } => serde_json::json!({ "undecodable": reason }),
        }
    }
}

/// A hybrid logical timestamp in hlc-gen's 64-bit encoding: ordered like the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hlc(pub u64);

impl Hlc {
    /// Physical part, milliseconds since the Unix epoch. A stamp hlc-gen cannot read (from
    /// the wire) counts as infinitely far ahead: every check of a clock refuses it, where a
    /// zero would pass it as old while it still wins every comparison of stamps.
    pub fn physical_ms(self) -> i64 {
        hlc_gen::HlcTimestamp::try_from(self.0)
            .map(|ts| ts.timestamp())
            .unwrap_or(i64::MAX)
    }

    pub fn logical(self) -> u64 {
        hlc_gen::HlcTimestamp::try_from(self.0)
            .map(|ts| ts.count())
            .unwrap_or(0)
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.physical_ms(), self.logical())
    }
}

/// One captured row change.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub origin: NodeId,
    pub origin_region: String,
    /// Per origin, gapless from 1.
    pub seq: u64,
    /// The last seq of the capture batch this event belongs to.
    pub batch_end: u64,
    pub hlc: Hlc,
    pub table: String,
    pub key: Key,
    pub op: Op,
    /// The row's version vector after this write.
    pub version: VersionVector,
    /// Nodes the event passed through, origin first.
    pub path: Vec<NodeId>,
    /// Application commit time, µs since the Unix epoch: for lag figures only.
    pub committed_at_micros: i64,
    /// CRDT tables: the whole state of each CRDT column after this write.
    pub crdt: Vec<(String, crate::crdt::ColumnState)>,
    /// Ownership tables: the row's owner after this write.
    pub ownership: Option<Ownership>,
}

/// Who owns a row of an ownership table, and since which transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    /// The owning region.
    pub owner: String,
    /// Transfers the row has seen; 0 for its first owner.
    pub epoch: u64,
    /// This write is the transfer itself, made by the previous owner.
    pub transfer: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_key_encoding_separates_types_and_lengths() {
        let keys = [
            Key(vec![Value::Integer(1)]),
            Key(vec![Value::Real(1.0)]),
            Key(vec![Value::Text("1".into())]),
            Key(vec![Value::Blob(b"1".to_vec())]),
            Key(vec![Value::Text("ab".into()), Value::Text("c".into())]),
            Key(vec![Value::Text("a".into()), Value::Text("bc".into())]),
            Key(vec![Value::Null]),
        ];
        for (i, a) in keys.iter().enumerate() {
            for (j, b) in keys.iter().enumerate() {
                assert_eq!(a.to_bytes() == b.to_bytes(), i == j, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn key_bytes_decode_back_to_the_key_and_damage_is_an_error() {
        let key = Key(vec![
            Value::Null,
            Value::Integer(-7),
            Value::Real(2.5),
            Value::Text("é".into()),
            Value::Blob(vec![0, 255]),
        ]);
        assert_eq!(Key::from_bytes(&key.to_bytes()), Ok(key.clone()));
        let bytes = key.to_bytes();
        assert!(
            Key::from_bytes(&bytes[..bytes.len() - 1])
                .unwrap_err()
                .contains("early")
        );
        assert!(Key::from_bytes(&[9]).unwrap_err().contains("tag 9"));
    }

    #[test]
    fn row_encoding_ignores_column_order() {
        let a = Row(vec![("x".into(), Value::Integer(1)), ("y".into(), Value::Null)]);
        let b = Row(vec![("y".into(), Value::Null), ("x".into(), Value::Integer(1))]);
        assert_eq!(a.to_bytes(), b.to_bytes());
    }

    #[test]
    fn tombstone_content_sorts_below_rows() {
        let row = Op::Upsert(Row::default());
        assert!(Op::Delete.content_bytes() < row.content_bytes());
    }
}
