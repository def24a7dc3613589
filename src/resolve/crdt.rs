//! CRDT columns as policy: which columns of a row are CRDTs, folding a local write into
//! their states, and merging a remote event's states (the state types are in `crate::crdt`).
//!
//! The application keeps writing plain values (`qty = qty - 1`, a JSON array of tags, a
//! status); `fold_local` turns the difference between the written value and the state's
//! current value into this node's CRDT operation, and `materialize_all` turns merged states
//! back into column values. Events carry whole states, so duplicates, reordering and missed
//! intermediate events all merge to the same result.
use std::collections::BTreeMap;

use crate::crdt::{ColumnState, CrdtError, CrdtType, States};
use crate::event::{Hlc, Row, Value};

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
