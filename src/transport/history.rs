//! The history gate: whether this node's database may number changes yet. A database that
//! went back in time (a restore from a backup, a VM snapshot, a failover to a lagging
//! replica) would reuse seqs its peers already hold, and they would drop the new events as
//! duplicates; so nothing is numbered until the peers have said how many of this node's own
//! events they have, and this node numbers after the most any of them has.
//!
//! A pure record of the peers' words, decided against this node's last seq and the time
//! since it started (`Gate::verdict`); the binding feeds it the `knows_of_you` of each Hello
//! and the frontier of this node in each Welcome, acknowledgement and heartbeat reply (so a
//! peer that was joining when it connected is heard once it has joined), and
//! `Context::reconsider_history` acts on the verdict.
//!
//! The rule, bounded and logged:
//! - the gate waits for the word of every peer this node exchanges with over gRPC (peers
//!   differ by the events that were in flight when the region was lost, so the first answer
//!   is not enough), at most `history_wait_secs` from start;
//! - a peer that says it has none of this node's events, while this database holds some, has
//!   not answered yet (it is itself joining, or was rebuilt empty): its word counts only once
//!   the wait is over;
//! - once every peer answered, or the wait is over and at least one did, the peer that has
//!   most of this node's events decides: more than this database holds means it went back,
//!   and the node re-seeds from that peer, numbering after what it has; otherwise the
//!   history is confirmed. A peer that did not answer in time and holds more is found
//!   behind when it comes back, and the events numbered again are lost there (the RPO of
//!   the restore, which the log states at WARN, naming the peers it did not hear).
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use super::handshake::WentBack;
use crate::event::NodeId;

/// What the peers said of this node's own events, since it started.
#[derive(Debug)]
pub struct Gate {
    peers: BTreeSet<NodeId>,
    /// The latest word of each peer: how many of this node's events it has.
    words: BTreeMap<NodeId, u64>,
    started: Instant,
    wait: Duration,
    /// The last re-seed asked for (peer, its word, this node's seq then): asked once.
    asked: Option<(NodeId, u64, u64)>,
    /// The peers last said to be waited for (logged when it changes).
    said: Option<Vec<NodeId>>,
}

/// What the gate says now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No peer that answered has more of this node's events than its database; `unheard`
    /// are the peers that had not answered when the wait ran out.
    Confirmed { unheard: Vec<NodeId> },
    /// The best-informed peer has more than this database: re-seed from it.
    WentBack(WentBack),
    /// Still waiting for the word of these peers.
    Waiting { unheard: Vec<NodeId> },
}

impl Gate {
    pub fn new(peers: impl IntoIterator<Item = NodeId>, started: Instant, wait: Duration) -> Self {
        Self {
            peers: peers.into_iter().collect(),
            words: BTreeMap::new(),
            started,
            wait,
            asked: None,
            said: None,
        }
    }

    /// Records `peer`'s word: it has this node's events up to `knows`. Returns whether the
    /// word is new.
    pub fn heard(&mut self, peer: &str, knows: u64) -> bool {
        self.words.insert(peer.to_owned(), knows) != Some(knows)
    }

    /// The most any peer said it has of this node's events.
    pub fn most_known(&self) -> u64 {
        self.words.values().copied().max().unwrap_or(0)
    }

    /// How long the gate waits for every peer's word.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// The verdict for a database whose last seq is `ours`, at `now`.
    pub fn verdict(&self, ours: u64, now: Instant) -> Verdict {
        let answered = |peer: &NodeId| self.words.get(peer).is_some_and(|&knows| knows > 0 || ours == 0);
        let unheard: Vec<NodeId> = self.peers.iter().filter(|p| !answered(p)).cloned().collect();
        let over = now.duration_since(self.started) >= self.wait;
        let decided = unheard.is_empty() || (over && !self.words.is_empty());
        if !decided {
            return Verdict::Waiting { unheard };
        }
        let best = self
            .words
            .iter()
            .max_by_key(|(peer, knows)| (**knows, std::cmp::Reverse(*peer)));
        match best {
            Some((peer, &knows)) if knows > ours => Verdict::WentBack(WentBack {
                peer: peer.clone(),
                peer_has: knows,
                ours,
            }),
            _ => Verdict::Confirmed { unheard },
        }
    }

    /// Whether a re-seed for `went_back` should be asked now (not asked already).
    pub fn ask(&mut self, went_back: &WentBack) -> bool {
        let key = (went_back.peer.clone(), went_back.peer_has, went_back.ours);
        if self.asked.as_ref() == Some(&key) {
            return false;
        }
        self.asked = Some(key);
        true
    }

    /// Whether the peers waited for changed since last said (then say it).
    pub fn waiting_changed(&mut self, unheard: &[NodeId]) -> bool {
        if self.said.as_deref() == Some(unheard) {
            return false;
        }
        self.said = Some(unheard.to_vec());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> (Gate, Instant) {
        let t = Instant::now();
        (
            Gate::new(["b".to_owned(), "c".to_owned()], t, Duration::from_secs(30)),
            t,
        )
    }

    #[test]
    fn the_first_answer_does_not_decide_while_another_peer_is_unheard() {
        let (mut gate, t) = gate();
        gate.heard("b", 998);
        assert_eq!(
            gate.verdict(800, t),
            Verdict::Waiting {
                unheard: vec!["c".into()]
            }
        );
        gate.heard("c", 1_000);
        let Verdict::WentBack(back) = gate.verdict(800, t) else {
            panic!()
        };
        assert_eq!(
            (back.peer.as_str(), back.peer_has),
            ("c", 1_000),
            "the best-informed peer decides"
        );
        assert_eq!(gate.verdict(1_000, t), Verdict::Confirmed { unheard: vec![] });
    }

    #[test]
    fn a_peer_that_knows_nothing_of_us_is_not_an_answer_until_the_wait_is_over() {
        let (mut gate, t) = gate();
        gate.heard("b", 0);
        gate.heard("c", 0);
        assert!(matches!(gate.verdict(800, t), Verdict::Waiting { .. }));
        assert_eq!(
            gate.verdict(0, t),
            Verdict::Confirmed { unheard: vec![] },
            "a fresh mesh"
        );
        let later = t + Duration::from_secs(30);
        assert_eq!(
            gate.verdict(800, later),
            Verdict::Confirmed {
                unheard: vec!["b".into(), "c".into()]
            }
        );
    }

    #[test]
    fn past_the_wait_the_peers_that_answered_decide_and_with_none_it_waits_on() {
        let (mut gate, t) = gate();
        let later = t + Duration::from_secs(31);
        assert_eq!(
            gate.verdict(5, later),
            Verdict::Waiting {
                unheard: vec!["b".into(), "c".into()]
            }
        );
        gate.heard("b", 7);
        assert!(matches!(
            gate.verdict(5, later),
            Verdict::WentBack(WentBack { peer_has: 7, .. })
        ));
        assert_eq!(
            gate.verdict(7, later),
            Verdict::Confirmed {
                unheard: vec!["c".into()]
            }
        );
    }

    #[test]
    fn a_reseed_is_asked_once_per_word() {
        let (mut gate, t) = gate();
        gate.heard("b", 9);
        gate.heard("c", 9);
        let Verdict::WentBack(back) = gate.verdict(3, t) else {
            panic!()
        };
        assert!(gate.ask(&back));
        assert!(!gate.ask(&back));
    }
}
