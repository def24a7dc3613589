//! The causal stability horizon: the versions every node has seen, together with every
//! write concurrent with them. A tombstone at or below it can be purged (`store::gc`): no
//! event that could still change the row's outcome is in flight anywhere.
//!
//! Every node reports what it has applied of each origin, its own origin at its last seq
//! (gossiped with acknowledgements, `transport`). From the latest report of every node of
//! the topology, `G[o]` is the least any node has applied of origin `o`, and `L[n]` node
//! `n`'s own last seq in its report. A version `T <= G` has been applied by every node; a
//! write concurrent with it was made by some node `n` before `n` applied `T`, so before
//! `n`'s report, so its seq is at most `L[n]`. Once a later `G'` covers `L` (every node has
//! applied every node's writes up to its report), no such write is in flight: `G` is stable.
//! [`Horizon::advance`] keeps the pairs `(G, L)` it has seen, in order, and moves the stable
//! horizon to the newest `G` whose `L` the current `G'` covers. Versions carry seqs (a
//! node's entry in a row's vector is the seq of its last write to the row), so they compare
//! with these vectors directly.
use std::collections::{BTreeMap, VecDeque};

use crate::event::NodeId;
use crate::version::{Causality, VersionVector};

/// A node's report: what it has applied per origin, its own origin at its last seq.
pub type Frontiers = BTreeMap<NodeId, u64>;

/// Candidate horizons kept at most; the oldest goes first (purging only waits longer).
const MAX_CANDIDATES: usize = 256;

#[derive(Debug, Default)]
pub struct Horizon {
    candidates: VecDeque<(VersionVector, Frontiers)>,
    stable: VersionVector,
}

impl Horizon {
    /// Takes the latest report of every node; returns the stable horizon, or `None` while
    /// some node of `nodes` has not reported.
    pub fn advance(&mut self, nodes: &[NodeId], reports: &BTreeMap<NodeId, Frontiers>) -> Option<&VersionVector> {
        let all: Vec<&Frontiers> = nodes.iter().map(|n| reports.get(n)).collect::<Option<_>>()?;
        let mut applied = VersionVector::new();
        for origin in all.iter().flat_map(|r| r.keys()) {
            let least = all
                .iter()
                .map(|r| r.get(origin).copied().unwrap_or(0))
                .min()
                .unwrap_or(0);
            applied.set(origin, least);
        }
        let own: Frontiers = nodes
            .iter()
            .map(|n| (n.clone(), reports[n].get(n).copied().unwrap_or(0)))
            .collect();
        while let Some((g, l)) = self.candidates.front() {
            if !l.iter().all(|(n, seq)| applied.get(n) >= *seq) {
                break;
            }
            if self.stable.compare(g) != Causality::Dominates {
                self.stable.merge(g);
            }
            self.candidates.pop_front();
        }
        if self.candidates.back().is_none_or(|(g, _)| *g != applied) {
            if self.candidates.len() >= MAX_CANDIDATES {
                self.candidates.pop_front();
            }
            self.candidates.push_back((applied, own));
        }
        Some(&self.stable)
    }
}

/// Whether `version` is at or below `horizon`.
pub fn below(version: &VersionVector, horizon: &VersionVector) -> bool {
    matches!(version.compare(horizon), Causality::Dominated | Causality::Equal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(entries: &[(&str, u64)]) -> Frontiers {
        entries.iter().map(|(n, s)| ((*n).to_owned(), *s)).collect()
    }

    fn nodes() -> Vec<NodeId> {
        vec!["a".into(), "b".into()]
    }

    #[test]
    fn nothing_is_stable_until_every_node_reported() {
        let mut h = Horizon::default();
        let reports = [("a".to_string(), report(&[("a", 5)]))].into_iter().collect();
        assert!(h.advance(&nodes(), &reports).is_none());
    }

    #[test]
    fn a_version_every_node_applied_is_stable_once_the_writes_before_it_arrived() {
        let mut h = Horizon::default();
        // a wrote 5 events, b wrote 3; both applied everything the other had.
        let first: BTreeMap<_, _> = [
            ("a".to_string(), report(&[("a", 5), ("b", 3)])),
            ("b".to_string(), report(&[("a", 5), ("b", 3)])),
        ]
        .into_iter()
        .collect();
        let stable = h.advance(&nodes(), &first).unwrap().clone();
        assert_eq!(stable, VersionVector::new(), "the first look only proposes");
        // Nothing new was written: the proposal's writes (a up to 5, b up to 3) are everywhere.
        let stable = h.advance(&nodes(), &first).unwrap().clone();
        assert_eq!((stable.get("a"), stable.get("b")), (5, 3));
    }

    #[test]
    fn a_write_still_in_flight_holds_the_horizon_back() {
        let mut h = Horizon::default();
        // b has written up to 4, but a has only applied b up to 3.
        let reports: BTreeMap<_, _> = [
            ("a".to_string(), report(&[("a", 5), ("b", 3)])),
            ("b".to_string(), report(&[("a", 5), ("b", 4)])),
        ]
        .into_iter()
        .collect();
        h.advance(&nodes(), &reports);
        let stable = h.advance(&nodes(), &reports).unwrap().clone();
        assert_eq!(stable, VersionVector::new(), "b's fourth write may be concurrent");
        let caught_up: BTreeMap<_, _> = [
            ("a".to_string(), report(&[("a", 5), ("b", 4)])),
            ("b".to_string(), report(&[("a", 5), ("b", 4)])),
        ]
        .into_iter()
        .collect();
        let stable = h.advance(&nodes(), &caught_up).unwrap().clone();
        assert_eq!((stable.get("a"), stable.get("b")), (5, 3));
        assert!(below(&VersionVector::from_json(r#"{"a":5,"b":3}"#).unwrap(), &stable));
        assert!(!below(&VersionVector::from_json(r#"{"b":4}"#).unwrap(), &stable));
    }
}
