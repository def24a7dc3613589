//! What a peer may send: the checks every binding runs on a decoded batch before anything
//! of it reaches the store. A pure function of the events, the topology and two figures of
//! this node (its clock and its last seq), so a forged or misrouted batch costs no
//! transaction, and the fuzz target of `tests/fuzz` can drive it without a network.
//!
//! A batch is refused whole, with the first [`Refusal`] met, and nothing of it is applied;
//! the binding counts it and logs it once per cause (`Context::refused`). The checks, per
//! event:
//! - **Origin and region**: the origin is a node of the topology and the event claims that
//!   node's region; or it is a node taken out of the topology whose last events this node
//!   asked the peer for (it is among `relay_wanted`), whose region and ownership claims can
//!   no longer be checked.
//! - **Route**: the origin is the peer itself, one the topology routes through the peer to
//!   this node, or one this node asked the peer to relay; the path runs from the origin to
//!   the peer.
//! - **Ownership claim**: the owner it names is a region of the topology, and a write that
//!   is not a transfer claims its row for the writer's own region (the capture triggers let
//!   only a row's owner write it).
//! - **Version vector**: it gives the origin no more than the event's seq (a node's entry
//!   is the seq of its last write to the row), gives this node no more than its own last
//!   seq, and names at most [`MAX_STRANGERS`] nodes outside the topology (nodes that left
//!   the mesh stay in old rows' vectors), with ids of at most [`MAX_ID_BYTES`] bytes. Other
//!   members' entries cannot be judged here: a member may have seen a write this node has
//!   not yet received.
//! - **Clock**: the HLC is at most `max_ahead_ms` ahead of this node's clock (it would win
//!   every last-writer-wins comparison for good).
use crate::config::Topology;
use crate::event::{Event, NodeId};

use super::handshake::Refusal;

/// Entries for nodes outside the topology a version vector may carry.
pub const MAX_STRANGERS: usize = 16;
/// The longest node id a version vector entry may name.
pub const MAX_ID_BYTES: usize = 128;

/// What a receiver accepts from one peer.
pub struct Admission<'a> {
    pub topology: &'a Topology,
    pub me: &'a str,
    pub peer: &'a str,
    /// Origins this node currently asks `peer` to relay (all-to-all relay repair).
    pub relay_wanted: &'a [NodeId],
    /// How far ahead of this node's clock an event's HLC may be.
    pub max_ahead_ms: i64,
    pub now_ms: i64,
    /// This node's last seq: no honest vector gives it more.
    pub my_last_seq: u64,
}

impl Admission<'_> {
    /// Checks every event of a batch; the first refusal refuses it all.
    pub fn check(&self, events: &[Event]) -> Result<(), Refusal> {
        events.iter().try_for_each(|event| {
            let member = self.origin(event)?;
            self.route(event)?;
            if member {
                self.ownership(event)?;
            }
            self.version(event)?;
            self.clock(event)
        })
    }

    /// Checks the origin; `false` for a removed origin this node asked for.
    fn origin(&self, event: &Event) -> Result<bool, Refusal> {
        let Some(node) = self.topology.node(&event.origin) else {
            if self.relay_wanted.contains(&event.origin) {
                return Ok(false);
            }
            return Err(Refusal::UnknownOrigin {
                origin: event.origin.clone(),
            });
        };
        if node.region != event.origin_region {
            return Err(Refusal::WrongRegion {
                origin: event.origin.clone(),
                claimed: event.origin_region.clone(),
                region: node.region.clone(),
            });
        }
        Ok(true)
    }

    fn route(&self, event: &Event) -> Result<(), Refusal> {
        let origin = event.origin.as_str();
        let routed = origin == self.peer
            || crate::topology::forwards(self.topology, self.peer, self.me, origin)
            || self.relay_wanted.iter().any(|o| o == origin);
        if !routed {
            return Err(Refusal::NotRouted {
                peer: self.peer.to_owned(),
                origin: origin.to_owned(),
            });
        }
        if event.path.first().map(String::as_str) != Some(origin)
            || event.path.last().map(String::as_str) != Some(self.peer)
        {
            return Err(Refusal::ForgedPath {
                peer: self.peer.to_owned(),
                origin: origin.to_owned(),
                path: event.path.clone(),
            });
        }
        Ok(())
    }

    fn ownership(&self, event: &Event) -> Result<(), Refusal> {
        let Some(claim) = &event.ownership else {
            return Ok(());
        };
        if !self.topology.nodes.iter().any(|n| n.region == claim.owner) {
            return Err(Refusal::UnknownOwner {
                peer: self.peer.to_owned(),
                origin: event.origin.clone(),
                seq: event.seq,
                owner: claim.owner.clone(),
            });
        }
        if !claim.transfer && claim.owner != event.origin_region {
            return Err(Refusal::NotTheOwner {
                peer: self.peer.to_owned(),
                origin: event.origin.clone(),
                seq: event.seq,
                region: event.origin_region.clone(),
                owner: claim.owner.clone(),
            });
        }
        Ok(())
    }

    fn version(&self, event: &Event) -> Result<(), Refusal> {
        let origin = event.origin.as_str();
        let counter = event.version.get(origin);
        if counter > event.seq {
            return Err(Refusal::CounterLeap {
                peer: self.peer.to_owned(),
                origin: origin.to_owned(),
                seq: event.seq,
                counter,
            });
        }
        let mine = event.version.get(self.me);
        if mine > self.my_last_seq {
            return Err(Refusal::AheadOfUs {
                peer: self.peer.to_owned(),
                origin: origin.to_owned(),
                seq: event.seq,
                counter: mine,
                last: self.my_last_seq,
            });
        }
        let strangers: Vec<&str> = (event.version.iter())
            .map(|(node, _)| node)
            .filter(|node| self.topology.node(node).is_none())
            .collect();
        let count = strangers.len();
        if count > MAX_STRANGERS || strangers.iter().any(|node| node.len() > MAX_ID_BYTES) {
            return Err(Refusal::Strangers {
                peer: self.peer.to_owned(),
                origin: origin.to_owned(),
                seq: event.seq,
                strangers: count,
                limit: MAX_STRANGERS,
                id_bytes: MAX_ID_BYTES,
            });
        }
        Ok(())
    }

    fn clock(&self, event: &Event) -> Result<(), Refusal> {
        let ahead_ms = event.hlc.physical_ms().saturating_sub(self.now_ms);
        if ahead_ms > self.max_ahead_ms {
            return Err(Refusal::FutureHlc {
                peer: self.peer.to_owned(),
                origin: event.origin.clone(),
                seq: event.seq,
                ahead_ms,
                limit_ms: self.max_ahead_ms,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Hlc, Key, Op, Ownership};
    use crate::transport::handshake::tests::topology;

    /// Event 3 of n1, straight from n1, owned by r1, with an honest vector.
    fn event() -> Event {
        Event {
            origin: "n1".into(),
            origin_region: "r1".into(),
            seq: 3,
            batch_end: 3,
            hlc: Hlc(1 << 22),
            table: "t".into(),
            key: Key(Vec::new()),
            op: Op::Delete,
            version: [("n1".to_string(), 3), ("n0".to_string(), 5), ("n2".to_string(), 9)]
                .into_iter()
                .collect(),
            path: vec!["n1".into()],
            committed_at_micros: 0,
            crdt: Vec::new(),
            ownership: Some(Ownership {
                owner: "r1".into(),
                epoch: 0,
                transfer: false,
            }),
        }
    }

    fn check(event: Event) -> Result<(), Refusal> {
        let topology = topology();
        let admission = Admission {
            topology: &topology,
            me: "n0",
            peer: "n1",
            relay_wanted: &[],
            max_ahead_ms: 1000,
            now_ms: Hlc(1 << 22).physical_ms(),
            my_last_seq: 5,
        };
        admission.check(&[event])
    }

    #[test]
    fn an_honest_event_passes_and_members_entries_are_not_judged() {
        assert_eq!(check(event()), Ok(()), "n2 at 9 may be ahead of what n0 has of n2");
        let mut left = event();
        for i in 0..MAX_STRANGERS {
            left.version.set(&format!("gone-{i}"), 4);
        }
        assert_eq!(check(left), Ok(()), "nodes that left stay in old vectors");
        let mut transfer = event();
        transfer.ownership = Some(Ownership {
            owner: "r2".into(),
            epoch: 1,
            transfer: true,
        });
        assert_eq!(check(transfer), Ok(()), "the owner moves its row to r2");
    }

    #[test]
    fn ownership_claims_must_name_a_region_and_the_writer_must_own_the_row() {
        let mut foreign = event();
        foreign.ownership.as_mut().unwrap().owner = "atlantis".into();
        foreign.ownership.as_mut().unwrap().transfer = true;
        let refused = check(foreign).unwrap_err();
        assert_eq!(refused.cause(), "unknown owner");
        assert!(
            refused.to_string().contains("`atlantis`, which is not a region"),
            "{refused}"
        );
        let mut taken = event();
        taken.ownership.as_mut().unwrap().owner = "r0".into();
        let refused = check(taken).unwrap_err();
        assert_eq!(refused.cause(), "not the owner");
        assert!(
            refused.to_string().contains("a write by r1 to a row it says r0 owns"),
            "{refused}"
        );
    }

    #[test]
    fn a_removed_origin_is_taken_only_when_asked_for() {
        let topology = topology();
        let mut gone = event();
        gone.origin = "n9".into();
        gone.origin_region = "r9".into();
        gone.path = vec!["n9".into(), "n1".into()];
        gone.version = [("n9".to_string(), 3)].into_iter().collect();
        gone.ownership.as_mut().unwrap().owner = "r9".into();
        let admission = |wanted: &[NodeId]| {
            Admission {
                topology: &topology,
                me: "n0",
                peer: "n1",
                relay_wanted: wanted,
                max_ahead_ms: 1000,
                now_ms: Hlc(1 << 22).physical_ms(),
                my_last_seq: 5,
            }
            .check(std::slice::from_ref(&gone))
        };
        assert_eq!(admission(&[]).unwrap_err().cause(), "unknown origin");
        assert_eq!(
            admission(&["n9".to_owned()]),
            Ok(()),
            "its region and owner left with it"
        );
    }

    #[test]
    fn vectors_may_not_run_ahead_of_this_node_or_fill_with_strangers() {
        let mut ahead = event();
        ahead.version.set("n0", 6);
        let refused = check(ahead).unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("gives this node 6, but this node's last write is 5"),
            "{refused}"
        );
        let mut crowded = event();
        for i in 0..=MAX_STRANGERS {
            crowded.version.set(&format!("x{i}"), 1);
        }
        assert_eq!(check(crowded).unwrap_err().cause(), "strangers");
        let mut long = event();
        long.version.set(&"x".repeat(MAX_ID_BYTES + 1), 1);
        assert_eq!(check(long).unwrap_err().cause(), "strangers");
        let mut far = event();
        far.hlc = Hlc(u64::MAX);
        assert_eq!(check(far).unwrap_err().cause(), "future hlc");
    }
}
