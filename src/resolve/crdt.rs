//! CRDT columns: per-column state that merges commutatively, associatively and idempotently,
//! built on the `crdts` crate.
//!
//! The application keeps writing plain values (`qty = qty - 1`, a JSON array of tags, a
//! status); `observe_local` turns the difference between the written value and the state's
//! current value into this node's CRDT operation, and `materialize` turns a merged state back
//! into the column value. Events carry whole states, so duplicates, reordering and missed
//! intermediate events all merge to the same result.
//! - `counter`: a PN-counter; two regions each running `qty = qty - 1` end at -2 together.
//! - `set`: an observed-remove set, stored in the column as a JSON array (sorted).
//! - `register`: a last-writer-wins register per column, ordered by (HLC, node, content).
use std::collections::{BTreeMap, BTreeSet};

use crdts::{CmRDT, CvRDT, LWWReg, Orswot, PNCounter};
use num_bigint::BigInt;
use serde::{Deserialize, Serialize};

use crate::event::{Hlc, Row, Value};

/// The CRDT type of one column, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CrdtType {
    Counter,
    Set,
    Register,
}

/// (HLC, node, canonical content): a total order of register writes.
pub type Marker = (u64, String, Vec<u8>);

/// The replicated state of one CRDT column of one row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ColumnState {
    Counter(PNCounter<String>),
    Set(Orswot<String, String>),
    Register(LWWReg<Value, Marker>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrdtError {
    #[error("column `{column}` is a {kind:?} column, but holds {value}; {hint}")]
    BadValue {
        column: String,
        kind: CrdtType,
        value: String,
        hint: &'static str,
    },
    #[error("column `{0}`: states of different CRDT types cannot merge (was the column's type changed?)")]
    TypeMismatch(String),
    #[error("column `{0}`: counter out of the 64-bit range")]
    Overflow(String),
    #[error("column `{0}`: corrupt state: {1}")]
    Corrupt(String, String),
}

/// The states of one row's CRDT columns, by column.
pub type States = BTreeMap<String, ColumnState>;

/// The materialized values of the configured `columns` that have a state.
pub fn materialize_all(
    columns: &BTreeMap<String, CrdtType>,
    states: &States,
) -> Result<Vec<(String, Value)>, CrdtError> {
    columns
        .keys()
        .filter_map(|column| states.get(column).map(|state| (column, state)))
        .map(|(column, state)| Ok((column.clone(), state.materialize(column)?)))
        .collect()
}

/// What `fold_local` did: columns to write back, and writes it ignored.
pub type Folded = (Vec<(String, Value)>, Vec<CrdtError>);

/// Folds a local write (the captured row image) into the row's states, as node `me` at
/// `hlc`. The image then carries the materialized values; the returned columns are those
/// whose written value differed (to be written back to the row). A value a column cannot
/// hold is ignored, with its error in the second list: the column keeps its state's value.
pub fn fold_local(
    columns: &BTreeMap<String, CrdtType>,
    states: &mut States,
    me: &str,
    row: &mut Row,
    hlc: Hlc,
) -> Result<Folded, CrdtError> {
    let mut ignored = Vec::new();
    for (column, kind) in columns {
        let state = states.entry(column.clone()).or_insert_with(|| ColumnState::new(*kind));
        let written = row.get(column).cloned().unwrap_or(Value::Null);
        if let Err(error) = state.observe_local(column, me, &written, hlc) {
            ignored.push(error);
        }
    }
    let values = materialize_all(columns, states)?;
    let changed: Vec<(String, Value)> = values.iter().filter(|(c, v)| row.get(c) != Some(v)).cloned().collect();
    for (column, value) in values {
        if let Some(slot) = row.0.iter_mut().find(|(c, _)| *c == column) {
            slot.1 = value;
        }
    }
    Ok((changed, ignored))
}

/// Merges a remote event's states (of configured `columns` only) into the row's; returns
/// whether they brought anything new.
pub fn merge_remote(
    columns: &BTreeMap<String, CrdtType>,
    states: &mut States,
    remote: &[(String, ColumnState)],
) -> Result<bool, CrdtError> {
    let before = states.clone();
    for (column, state) in remote.iter().filter(|(c, _)| columns.contains_key(c)) {
        match states.get_mut(column) {
            Some(local) => local.merge(column, state)?,
            None => {
                states.insert(column.clone(), state.clone());
            }
        }
    }
    Ok(*states != before)
}

impl ColumnState {
    pub fn new(kind: CrdtType) -> Self {
        match kind {
            CrdtType::Counter => ColumnState::Counter(PNCounter::new()),
            CrdtType::Set => ColumnState::Set(Orswot::new()),
            CrdtType::Register => ColumnState::Register(LWWReg {
                val: Value::Null,
                marker: (0, String::new(), Vec::new()),
            }),
        }
    }

    pub fn kind(&self) -> CrdtType {
        match self {
            ColumnState::Counter(_) => CrdtType::Counter,
            ColumnState::Set(_) => CrdtType::Set,
            ColumnState::Register(_) => CrdtType::Register,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("CRDT states always serialize")
    }

    pub fn from_json(column: &str, text: &str) -> Result<Self, CrdtError> {
        serde_json::from_str(text).map_err(|e| CrdtError::Corrupt(column.to_owned(), e.to_string()))
    }

    /// Folds a value the local application wrote into this node's part of the state.
    pub fn observe_local(&mut self, column: &str, me: &str, written: &Value, hlc: Hlc) -> Result<(), CrdtError> {
        let bad = |kind, hint| CrdtError::BadValue {
            column: column.to_owned(),
            kind,
            value: written.to_string(),
            hint,
        };
        match self {
            ColumnState::Counter(counter) => {
                let target = match written {
                    Value::Integer(i) => BigInt::from(*i),
                    Value::Null => BigInt::from(0),
                    _ => return Err(bad(CrdtType::Counter, "write integers to counter columns")),
                };
                let delta = target - counter.read();
                let steps = u64::try_from(delta.magnitude()).map_err(|_| CrdtError::Overflow(column.to_owned()))?;
                if steps > 0 {
                    let op = if delta.sign() == num_bigint::Sign::Minus {
                        counter.dec_many(me.to_owned(), steps)
                    } else {
                        counter.inc_many(me.to_owned(), steps)
                    };
                    counter.apply(op);
                }
            }
            ColumnState::Set(set) => {
                let wanted = set_members(written).ok_or_else(|| {
                    bad(
                        CrdtType::Set,
                        "write a JSON array (for example [\"a\",\"b\"]) to set columns",
                    )
                })?;
                let present: BTreeSet<String> = set.read().val.into_iter().collect();
                for member in wanted.difference(&present) {
                    let ctx = set.read_ctx().derive_add_ctx(me.to_owned());
                    let op = set.add(member.clone(), ctx);
                    set.apply(op);
                }
                for member in present.difference(&wanted) {
                    let ctx = set.contains(member).derive_rm_ctx();
                    let op = set.rm(member.clone(), ctx);
                    set.apply(op);
                }
            }
            ColumnState::Register(register) => {
                if register.val != *written {
                    let mut content = Vec::new();
                    written.encode(&mut content);
                    register.update(written.clone(), (hlc.0, me.to_owned(), content));
                }
            }
        }
        Ok(())
    }

    /// Merges another replica's state of the same column.
    pub fn merge(&mut self, column: &str, other: &ColumnState) -> Result<(), CrdtError> {
        match (self, other) {
            (ColumnState::Counter(a), ColumnState::Counter(b)) => a.merge(b.clone()),
            (ColumnState::Set(a), ColumnState::Set(b)) => a.merge(b.clone()),
            (ColumnState::Register(a), ColumnState::Register(b)) => a.merge(b.clone()),
            _ => return Err(CrdtError::TypeMismatch(column.to_owned())),
        }
        Ok(())
    }

    /// The column value this state stands for.
    pub fn materialize(&self, column: &str) -> Result<Value, CrdtError> {
        Ok(match self {
            ColumnState::Counter(counter) => {
                Value::Integer(i64::try_from(counter.read()).map_err(|_| CrdtError::Overflow(column.to_owned()))?)
            }
            ColumnState::Set(set) => {
                let members: BTreeSet<String> = set.read().val.into_iter().collect();
                let items: Vec<serde_json::Value> = members
                    .iter()
                    .map(|m| serde_json::from_str(m).unwrap_or_else(|_| m.clone().into()))
                    .collect();
                Value::Text(serde_json::Value::Array(items).to_string())
            }
            ColumnState::Register(register) => register.val.clone(),
        })
    }
}

/// A set column's members, each as its canonical JSON text; NULL is the empty set.
fn set_members(value: &Value) -> Option<BTreeSet<String>> {
    match value {
        Value::Null => Some(BTreeSet::new()),
        Value::Text(text) => match serde_json::from_str::<serde_json::Value>(text).ok()? {
            serde_json::Value::Array(items) => Some(items.iter().map(|i| i.to_string()).collect()),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_row_folds_its_local_write_and_merges_remote_states() {
        let columns: BTreeMap<String, CrdtType> = [
            ("qty".to_string(), CrdtType::Counter),
            ("tags".to_string(), CrdtType::Set),
        ]
        .into();
        let row = |qty: Value, tags: &str| {
            Row(vec![
                ("id".into(), Value::Integer(1)),
                ("qty".into(), qty),
                ("tags".into(), Value::Text(tags.into())),
            ])
        };
        // a writes qty 5 and an unsorted set: the image is normalized, the set written back.
        let mut a = States::new();
        let mut image = row(Value::Integer(5), "[\"y\",\"x\"]");
        let (changed, ignored) = fold_local(&columns, &mut a, "a", &mut image, Hlc(1)).unwrap();
        assert!(ignored.is_empty());
        assert_eq!(changed, vec![("tags".to_string(), Value::Text("[\"x\",\"y\"]".into()))]);
        // b decrements concurrently from its copy of a's state; text in a counter is ignored.
        let mut b = a.clone();
        let (_, ignored) = fold_local(&columns, &mut b, "b", &mut row(Value::Integer(4), "[]"), Hlc(2)).unwrap();
        assert!(ignored.is_empty());
        let mut bad = row(Value::Text("many".into()), "[]");
        let (_, ignored) = fold_local(&columns, &mut b.clone(), "b", &mut bad, Hlc(3)).unwrap();
        assert_eq!(ignored.len(), 1);
        let (_, _) = fold_local(
            &columns,
            &mut a,
            "a",
            &mut row(Value::Integer(4), "[\"x\",\"y\"]"),
            Hlc(2),
        )
        .unwrap();
        // Merging is idempotent, ignores unconfigured columns, and both decrements count.
        let remote: Vec<(String, ColumnState)> = b
            .clone()
            .into_iter()
            .chain([("other".to_string(), ColumnState::new(CrdtType::Counter))])
            .collect();
        assert!(merge_remote(&columns, &mut a, &remote).unwrap());
        assert!(!merge_remote(&columns, &mut a, &remote).unwrap());
        assert!(!a.contains_key("other"));
        let values = materialize_all(&columns, &a).unwrap();
        assert_eq!(values[0], ("qty".to_string(), Value::Integer(3)));
        assert_eq!(values[1], ("tags".to_string(), Value::Text("[]".into())));
    }

    fn counter_after(writes: &[(&str, i64)]) -> ColumnState {
        let mut state = ColumnState::new(CrdtType::Counter);
        for (node, value) in writes {
            state
                .observe_local("qty", node, &Value::Integer(*value), Hlc(1))
                .unwrap();
        }
        state
    }

    #[test]
    fn concurrent_decrements_both_count() {
        // Both regions start from 10 and each runs qty = qty - 1.
        let base = counter_after(&[("a", 10)]);
        let mut a = base.clone();
        a.observe_local("qty", "a", &Value::Integer(9), Hlc(2)).unwrap();
        let mut b = base.clone();
        b.observe_local("qty", "b", &Value::Integer(9), Hlc(2)).unwrap();
        a.merge("qty", &b).unwrap();
        b.merge("qty", &a).unwrap();
        assert_eq!(a.materialize("qty").unwrap(), Value::Integer(8));
        assert_eq!(b.materialize("qty").unwrap(), Value::Integer(8));
    }

    #[test]
    fn set_adds_and_removes_are_observed() {
        let mut a = ColumnState::new(CrdtType::Set);
        a.observe_local("tags", "a", &Value::Text(r#"["x","y"]"#.into()), Hlc(1))
            .unwrap();
        let mut b = a.clone();
        // a removes y while b concurrently adds z: both effects survive.
        a.observe_local("tags", "a", &Value::Text(r#"["x"]"#.into()), Hlc(2))
            .unwrap();
        b.observe_local("tags", "b", &Value::Text(r#"["x","y","z"]"#.into()), Hlc(2))
            .unwrap();
        a.merge("tags", &b).unwrap();
        assert_eq!(a.materialize("tags").unwrap(), Value::Text(r#"["x","z"]"#.into()));
    }

    #[test]
    fn register_keeps_the_latest_write() {
        let mut a = ColumnState::new(CrdtType::Register);
        a.observe_local("s", "a", &Value::Text("old".into()), Hlc(5)).unwrap();
        let mut b = ColumnState::new(CrdtType::Register);
        b.observe_local("s", "b", &Value::Text("new".into()), Hlc(6)).unwrap();
        let mut ab = a.clone();
        ab.merge("s", &b).unwrap();
        b.merge("s", &a).unwrap();
        assert_eq!(ab, b);
        assert_eq!(ab.materialize("s").unwrap(), Value::Text("new".into()));
    }

    #[test]
    fn bad_values_are_refused_with_a_hint() {
        let mut c = ColumnState::new(CrdtType::Counter);
        let err = c
            .observe_local("qty", "a", &Value::Text("many".into()), Hlc(1))
            .unwrap_err();
        assert!(err.to_string().contains("write integers to counter columns"), "{err}");
        let mut s = ColumnState::new(CrdtType::Set);
        assert!(s.observe_local("tags", "a", &Value::Text("x".into()), Hlc(1)).is_err());
        assert!(c.merge("qty", &s).is_err());
    }

    proptest! {
        /// Any arrival order of the same states, with duplicates, merges to the same state.
        #[test]
        fn merges_commute_and_ignore_duplicates(
            writes in proptest::collection::vec((0..3usize, -5i64..5), 1..12),
            order in proptest::collection::vec(0..12usize, 1..30),
        ) {
            let nodes = ["a", "b", "c"];
            let mut replicas: Vec<ColumnState> = (0..3).map(|_| ColumnState::new(CrdtType::Counter)).collect();
            let mut history = Vec::new();
            for (i, (node, delta)) in writes.iter().enumerate() {
                let state = &mut replicas[*node];
                let now = match state.materialize("c").unwrap() { Value::Integer(v) => v, _ => 0 };
                state.observe_local("c", nodes[*node], &Value::Integer(now + delta), Hlc(i as u64)).unwrap();
                history.push(state.clone());
            }
            let mut forward = ColumnState::new(CrdtType::Counter);
            for s in &history { forward.merge("c", s).unwrap(); }
            let mut shuffled = ColumnState::new(CrdtType::Counter);
            for &i in &order { shuffled.merge("c", &history[i % history.len()]).unwrap(); }
            for s in history.iter().rev() { shuffled.merge("c", s).unwrap(); }
            prop_assert_eq!(forward.materialize("c").unwrap(), shuffled.materialize("c").unwrap());
            let total: i64 = writes.iter().map(|(_, d)| d).sum();
            prop_assert_eq!(forward.materialize("c").unwrap(), Value::Integer(total));
        }
    }
}
