//! Routing rules: which events a node sends to which peer, and which it drops on arrival.
//!
//! Pure functions over a validated `Topology`. The loop rule holds in every shape: a node
//! drops an event whose origin is itself or whose path already contains it; duplicates are
//! dropped later, by the per-origin frontier.
use crate::config::{NodeSpec, Shape, Topology};
use crate::event::Event;

/// The peers `me` opens a sending stream to.
pub fn downstream<'t>(topology: &'t Topology, me: &str) -> Vec<&'t NodeSpec> {
    match topology.shape {
        Shape::AllToAll => topology.nodes.iter().filter(|n| n.id != me).collect(),
    }
}

/// Whether `me` forwards events of `origin` to `peer`.
pub fn forwards(topology: &Topology, me: &str, peer: &str, origin: &str) -> bool {
    match topology.shape {
        Shape::AllToAll => origin == me && peer != me,
    }
}

/// The origins whose events `me` sends to `peer`, given the mesh's node ids.
pub fn origins_for<'t>(topology: &'t Topology, me: &str, peer: &str) -> Vec<&'t str> {
    topology
        .nodes
        .iter()
        .map(|n| n.id.as_str())
        .filter(|origin| forwards(topology, me, peer, origin))
        .collect()
}

/// Whether `me` keeps events received from other origins in its log to pass them on.
pub fn relays(topology: &Topology, _me: &str) -> bool {
    match topology.shape {
        Shape::AllToAll => false,
    }
}

/// Why an arriving event is dropped before it reaches the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// It came back to its origin, or passed through us already.
    Looped,
}

pub fn admit(me: &str, event: &Event) -> Result<(), Drop> {
    if event.origin == me || event.path.iter().any(|hop| hop == me) {
        return Err(Drop::Looped);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn mesh(n: usize) -> Topology {
        let mut text = String::from("version = 1\nmesh = \"m\"\nshape = \"all-to-all\"\n");
        for i in 0..n {
            text += &format!(
                "[[nodes]]\nid = \"n{i}\"\nregion = \"r{i}\"\naddress = \"127.0.0.1:{}\"\n",
                7000 + i
            );
        }
        Topology::parse(&text, Path::new("m.toml")).unwrap()
    }

    /// Walks the rules: every origin's event must reach every other node exactly once.
    #[test]
    fn all_to_all_delivers_every_event_to_every_node_once_in_one_hop() {
        for n in 2..=6 {
            let t = mesh(n);
            for origin in &t.nodes {
                let mut received = std::collections::HashMap::<&str, usize>::new();
                for peer in downstream(&t, &origin.id) {
                    if forwards(&t, &origin.id, &peer.id, &origin.id) {
                        *received.entry(peer.id.as_str()).or_default() += 1;
                        // Nobody relays in all-to-all.
                        for next in downstream(&t, &peer.id) {
                            assert!(!forwards(&t, &peer.id, &next.id, &origin.id));
                        }
                    }
                }
                for node in &t.nodes {
                    let want = usize::from(node.id != origin.id);
                    assert_eq!(received.get(node.id.as_str()).copied().unwrap_or(0), want);
                }
            }
        }
    }

    #[test]
    fn admit_drops_loops() {
        let event = crate::event::Event {
            origin: "a".into(),
            origin_region: "r".into(),
            seq: 1,
            batch_end: 1,
            hlc: Default::default(),
            table: "t".into(),
            key: crate::event::Key(vec![]),
            op: crate::event::Op::Delete,
            version: Default::default(),
            path: vec!["a".into(), "b".into()],
            committed_at_micros: 0,
        };
        assert_eq!(admit("a", &event), Err(Drop::Looped));
        assert_eq!(admit("b", &event), Err(Drop::Looped));
        assert_eq!(admit("c", &event), Ok(()));
    }
}
