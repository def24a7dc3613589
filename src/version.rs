//! Version vectors: the only thing in weft that decides causality.
//!
//! A row's vector maps node id -> number of writes that node made to the row that this
//! replica has seen. Comparison is the usual partial order; `merge` is the pointwise max, so it
//! is commutative, associative and idempotent (the laws are property-tested below). HLC
//! timestamps never take part here: they only order writes this module calls concurrent.
use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How two versions of one row relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causality {
    /// Same history.
    Equal,
    /// `self` has seen everything `other` has, and more.
    Dominates,
    /// `other` has seen everything `self` has, and more.
    Dominated,
    /// Each has seen a write the other has not: a conflict.
    Concurrent,
}

/// A version vector. Absent entries count as zero, so `{a: 0}` never needs storing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VersionVector(BTreeMap<String, u64>);

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    /// The count for `node` (zero when absent).
    pub fn get(&self, node: &str) -> u64 {
        self.0.get(node).copied().unwrap_or(0)
    }

    /// Records one more write by `node`: the vector of a local write.
    pub fn increment(&mut self, node: &str) {
        *self.0.entry(node.to_owned()).or_insert(0) += 1;
    }

    /// Sets an entry; a zero removes it so equal histories have equal encodings.
    pub fn set(&mut self, node: &str, counter: u64) {
        if counter == 0 {
            self.0.remove(node);
        } else {
            self.0.insert(node.to_owned(), counter);
        }
    }

    /// Pointwise maximum: the history that includes both.
    pub fn merge(&mut self, other: &VersionVector) {
        for (node, &count) in &other.0 {
            let entry = self.0.entry(node.clone()).or_insert(0);
            *entry = (*entry).max(count);
        }
    }

    pub fn merged(&self, other: &VersionVector) -> VersionVector {
        let mut out = self.clone();
        out.merge(other);
        out
    }

    pub fn compare(&self, other: &VersionVector) -> Causality {
        let mut greater = false;
        let mut less = false;
        for node in self.0.keys().chain(other.0.keys()) {
            match self.get(node).cmp(&other.get(node)) {
                Ordering::Greater => greater = true,
                Ordering::Less => less = true,
                Ordering::Equal => {}
            }
            if greater && less {
                return Causality::Concurrent;
            }
        }
        match (greater, less) {
            (false, false) => Causality::Equal,
            (true, false) => Causality::Dominates,
            (false, true) => Causality::Dominated,
            (true, true) => Causality::Concurrent,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(n, &c)| (n.as_str(), c))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Compact JSON, the form stored in the metadata tables (readable with `sqlite3`).
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.0).expect("a map of strings to integers always serializes")
    }

    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        let map: BTreeMap<String, u64> = serde_json::from_str(text)?;
        Ok(Self(map.into_iter().filter(|&(_, c)| c > 0).collect()))
    }
}

impl FromIterator<(String, u64)> for VersionVector {
    fn from_iter<I: IntoIterator<Item = (String, u64)>>(iter: I) -> Self {
        let mut v = VersionVector::new();
        for (node, count) in iter {
            v.set(&node, count);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vv() -> impl Strategy<Value = VersionVector> {
        proptest::collection::btree_map("[abc]", 0u64..4, 0..3).prop_map(|m| m.into_iter().collect())
    }

    #[test]
    fn table_of_comparisons() {
        let v = |pairs: &[(&str, u64)]| -> VersionVector { pairs.iter().map(|&(n, c)| (n.to_owned(), c)).collect() };
        let cases = [
            (v(&[]), v(&[]), Causality::Equal),
            (v(&[("a", 1)]), v(&[]), Causality::Dominates),
            (v(&[]), v(&[("a", 1)]), Causality::Dominated),
            (v(&[("a", 1)]), v(&[("b", 1)]), Causality::Concurrent),
            (v(&[("a", 2), ("b", 1)]), v(&[("a", 1), ("b", 1)]), Causality::Dominates),
            (v(&[("a", 2), ("b", 0)]), v(&[("a", 2)]), Causality::Equal),
            (v(&[("a", 2)]), v(&[("a", 1), ("b", 1)]), Causality::Concurrent),
        ];
        for (left, right, want) in cases {
            assert_eq!(left.compare(&right), want, "{left:?} vs {right:?}");
        }
    }

    proptest! {
        #[test]
        fn compare_is_antisymmetric(a in vv(), b in vv()) {
            let flipped = match a.compare(&b) {
                Causality::Dominates => Causality::Dominated,
                Causality::Dominated => Causality::Dominates,
                other => other,
            };
            prop_assert_eq!(b.compare(&a), flipped);
        }

        #[test]
        fn merge_is_commutative_associative_idempotent(a in vv(), b in vv(), c in vv()) {
            prop_assert_eq!(a.merged(&b), b.merged(&a));
            prop_assert_eq!(a.merged(&b).merged(&c), a.merged(&b.merged(&c)));
            prop_assert_eq!(a.merged(&a), a.clone());
        }

        #[test]
        fn merge_dominates_or_equals_both(a in vv(), b in vv()) {
            let m = a.merged(&b);
            prop_assert!(matches!(m.compare(&a), Causality::Dominates | Causality::Equal));
            prop_assert!(matches!(m.compare(&b), Causality::Dominates | Causality::Equal));
        }

        #[test]
        fn increment_strictly_dominates(a in vv(), node in "[abc]") {
            let mut next = a.clone();
            next.increment(&node);
            prop_assert_eq!(next.compare(&a), Causality::Dominates);
        }

        #[test]
        fn json_round_trips(a in vv()) {
            prop_assert_eq!(VersionVector::from_json(&a.to_json()).unwrap(), a);
        }
    }
}
