//! Routing rules: which events a node sends to which peer, which it keeps to relay, and which
//! it drops on arrival; plus `simulate`, which walks the rules to prove delivery.
//!
//! Pure functions over a validated `Topology`. Static routing depends only on (shape, this
//! node, peer, origin), never on timing, so every node agrees on every route. The one timed
//! rule, `relay_requests` (repairing a failed all-to-all link), is handed how long ago each
//! node was heard rather than reading a clock, so it is as testable as the rest. The loop rule
//! holds in every shape: a node drops an event whose origin is itself or whose path already
//! contains it; duplicates are dropped later, by the per-origin frontier.
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::config::{NodeSpec, Shape, Topology};
use crate::event::{Event, NodeId};

/// Node ids in ring order.
fn ring(topology: &Topology) -> Vec<&str> {
    match &topology.order {
        Some(order) => order.iter().map(String::as_str).collect(),
        None => topology.nodes.iter().map(|n| n.id.as_str()).collect(),
    }
}

/// Clockwise distance from `from` to `to` in the ring.
fn clockwise(ring: &[&str], from: &str, to: &str) -> usize {
    let n = ring.len();
    let a = ring.iter().position(|&id| id == from).expect("validated ring member");
    let b = ring.iter().position(|&id| id == to).expect("validated ring member");
    (b + n - a) % n
}

/// How many hops an event travels clockwise; the rest of the ring is reached the other way.
fn clockwise_span(topology: &Topology, ring: &[&str]) -> usize {
    let others = ring.len() - 1;
    if topology.bidirectional {
        others.div_ceil(2)
    } else {
        others
    }
}

/// The peers `me` opens a sending stream to.
pub fn downstream<'t>(topology: &'t Topology, me: &str) -> Vec<&'t NodeSpec> {
    topology
        .nodes
        .iter()
        .filter(|peer| peer.id != me && topology.nodes.iter().any(|o| forwards(topology, me, &peer.id, &o.id)))
        .collect()
}

/// The peers that open a sending stream to `me` (or write a topic `me` reads).
pub fn upstream<'t>(topology: &'t Topology, me: &str) -> Vec<&'t NodeSpec> {
    (topology.nodes.iter())
        .filter(|peer| peer.id != me && downstream(topology, &peer.id).iter().any(|d| d.id == me))
        .collect()
}

/// Whether `me`, holding an event of `origin`, sends it to `peer`.
pub fn forwards(topology: &Topology, me: &str, peer: &str, origin: &str) -> bool {
    if peer == me || peer == origin {
        return false;
    }
    match topology.shape {
        Shape::AllToAll => origin == me,
        Shape::Ring => {
            let ring = ring(topology);
            let n = ring.len();
            let span = clockwise_span(topology, &ring);
            let at = clockwise(&ring, origin, me);
            if clockwise(&ring, me, peer) == 1 {
                // Successor: continue clockwise while within the clockwise span.
                at < span
            } else if topology.bidirectional && clockwise(&ring, peer, me) == 1 {
                // Predecessor: carry the event counter-clockwise over the nodes the clockwise
                // span leaves out; `n - at` is how far counter-clockwise we already are.
                let counter_span = n - 1 - span;
                if at == 0 {
                    counter_span > 0
                } else {
                    at > span && n - at < counter_span
                }
            } else {
                false
            }
        }
        Shape::Star => {
            let hub = topology.hub.as_deref().expect("validated star");
            if me == hub { true } else { peer == hub && origin == me }
        }
    }
}

/// The origins whose events `me` sends to `peer`.
pub fn origins_for<'t>(topology: &'t Topology, me: &str, peer: &str) -> Vec<&'t str> {
    topology
        .nodes
        .iter()
        .map(|n| n.id.as_str())
        .filter(|origin| forwards(topology, me, peer, origin))
        .collect()
}

/// Whether `origin`'s events, sent to `via`, reach `to` along static routes (`via` itself
/// counts as reached): then `to`'s acknowledgements, and the node reports they carry,
/// travel back to `origin` through `via`.
pub fn carries(topology: &Topology, origin: &str, via: &str, to: &str) -> bool {
    let mut reached = vec![via];
    let mut next = 0;
    while let Some(&at) = reached.get(next) {
        if at == to {
            return true;
        }
        for peer in topology.nodes.iter().map(|n| n.id.as_str()) {
            if !reached.contains(&peer) && forwards(topology, at, peer, origin) {
                reached.push(peer);
            }
        }
        next += 1;
    }
    false
}

/// Whether `me` relays events of `origin` (another node) along static routes, and so must
/// keep them in its log until the peers it feeds have acknowledged them.
pub fn relays(topology: &Topology, me: &str, origin: &str) -> bool {
    origin != me
        && topology
            .nodes
            .iter()
            .any(|peer| forwards(topology, me, &peer.id, origin))
}

/// Why an arriving event is dropped before it reaches the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// It came back to its origin, or passed through us already.
    Looped,
}

/// Remote origins whose events `me` keeps in its log to pass on: along the static routes,
/// and with `relay_repair` (all-to-all relaying around failed links) every other node's.
pub fn kept_origins(topology: &Topology, me: &str, relay_repair: bool) -> BTreeSet<NodeId> {
    topology
        .nodes
        .iter()
        .map(|n| n.id.clone())
        .filter(|o| o != me && (relay_repair || relays(topology, me, o)))
        .collect()
}

/// Origins taken out of the topology whose events `me` has applied (it holds a frontier of
/// them, `known`): their last events may still be missing at another remaining node, so `me`
/// keeps them in its log until every remaining node has them, asks its peers to pass them on,
/// and admits them from its peers (`transport::admission`).
pub fn removed_origins<'k>(
    topology: &Topology,
    me: &str,
    known: impl IntoIterator<Item = &'k NodeId>,
) -> BTreeSet<NodeId> {
    known
        .into_iter()
        .filter(|origin| *origin != me && topology.node(origin).is_none())
        .cloned()
        .collect()
}

/// The remaining nodes that must have a removed origin's events before `me` drops them.
pub fn removed_needs(topology: &Topology, me: &str, removed: &BTreeSet<NodeId>) -> BTreeMap<NodeId, Vec<NodeId>> {
    let survivors: Vec<NodeId> = (topology.nodes.iter())
        .map(|n| n.id.clone())
        .filter(|id| id != me)
        .collect();
    removed
        .iter()
        .map(|origin| (origin.clone(), survivors.clone()))
        .collect()
}

/// Each downstream peer of `me` with the origins routed to it (what `weft status` reports on).
pub fn routed_origins(topology: &Topology, me: &str) -> Vec<(NodeId, Vec<NodeId>)> {
    downstream(topology, me)
        .into_iter()
        .map(|peer| {
            let origins = origins_for(topology, me, &peer.id);
            (peer.id.clone(), origins.into_iter().map(str::to_owned).collect())
        })
        .collect()
}

/// Per origin kept in `me`'s log, the peers that must have it before it may be dropped.
pub fn log_needs(topology: &Topology, me: &str, relay_repair: bool) -> BTreeMap<NodeId, Vec<NodeId>> {
    let mut needs = BTreeMap::new();
    for origin in &topology.nodes {
        let peers: Vec<NodeId> = topology
            .nodes
            .iter()
            .filter(|p| p.id != me && p.id != origin.id)
            .filter(|p| forwards(topology, me, &p.id, &origin.id) || (relay_repair && origin.id != me))
            .map(|p| p.id.clone())
            .collect();
        if !peers.is_empty() {
            needs.insert(origin.id.clone(), peers);
        }
    }
    needs
}

/// The origins `me` asks `peer` to relay to it: in all-to-all, every other origin whose direct
/// link has been silent longer than `relay_after`, each asked of exactly one peer (the first
/// in topology order that is still heard from) so that only one relay runs per origin.
///
/// `heard_ago(node)` is how long ago `node` last delivered a frame, `None` if never; a node
/// never heard counts as heard when this node came up, `up_for` ago, so a fresh node waits
/// `relay_after` before asking, but it never picks a relay it has not heard at all.
pub fn relay_requests(
    topology: &Topology,
    me: &str,
    peer: &str,
    heard_ago: impl Fn(&str) -> Option<Duration>,
    up_for: Duration,
    relay_after: Duration,
) -> Vec<NodeId> {
    if topology.shape != Shape::AllToAll {
        return Vec::new();
    }
    let alive = |node: &str| heard_ago(node).unwrap_or(up_for) <= relay_after;
    let relay_for = |origin: &str| {
        topology
            .nodes
            .iter()
            .map(|n| n.id.as_str())
            .find(|&p| p != me && p != origin && heard_ago(p).is_some() && alive(p))
    };
    topology
        .nodes
        .iter()
        .map(|n| n.id.as_str())
        .filter(|&origin| origin != me && origin != peer && !alive(origin))
        .filter(|&origin| relay_for(origin) == Some(peer))
        .map(str::to_owned)
        .collect()
}

/// What changing a running mesh from `old` to `new` does, one line per consequence, for
/// `weft topology check --against` and the log of a reload.
pub fn changes(old: &Topology, new: &Topology) -> Vec<String> {
    let mut out = Vec::new();
    if old.mesh != new.mesh {
        out.push(format!(
            "the mesh is renamed from `{}` to `{}`: nodes on the old file refuse those on the new one until every node has reloaded",
            old.mesh, new.mesh
        ));
    }
    if old.shape != new.shape || old.bidirectional != new.bidirectional || old.order != new.order || old.hub != new.hub
    {
        out.push("the shape changes: every node streams to its new downstream peers from their frontiers, so nothing is lost or sent twice".into());
    }
    for node in &new.nodes {
        match old.node(&node.id) {
            None => out.push(format!(
                "{} ({}) joins: it catches up from the others' logs, or, where they were trimmed, re-seeds by snapshot from the first peer that finds it behind",
                node.id, node.region
            )),
            Some(before) if before.address != node.address => {
                out.push(format!("{} moves from {} to {}: its peers dial the new address", node.id, before.address, node.address));
            }
            Some(before) if before.region != node.region => out.push(format!(
                "{} changes region from {} to {}: refused, a node's region is stamped on its events; give it a new node id",
                node.id, before.region, node.region
            )),
            Some(_) => {}
        }
    }
    for node in &old.nodes {
        if new.node(&node.id).is_none() {
            out.push(format!(
                "{} leaves: the others stop streaming to it, pass its last events on to those of them that lack them, and keep them in their logs until every remaining node has them; stop its sidecar first",
                node.id
            ));
        }
    }
    for node in new.nodes.iter().filter(|n| old.node(&n.id).is_some()) {
        let ids = |t: &Topology| -> Vec<String> { downstream(t, &node.id).iter().map(|p| p.id.clone()).collect() };
        let (before, after) = (ids(old), ids(new));
        if before != after {
            out.push(format!(
                "{} streams to {} (was {})",
                node.id,
                list(&after),
                list(&before)
            ));
        }
    }
    out
}

fn list(ids: &[String]) -> String {
    if ids.is_empty() {
        "nobody".into()
    } else {
        ids.join(", ")
    }
}

pub fn admit(me: &str, event: &Event) -> Result<(), Drop> {
    admit_path(me, &event.origin, &event.path)
}

fn admit_path(me: &str, origin: &str, path: &[NodeId]) -> Result<(), Drop> {
    if origin == me || path.iter().any(|hop| hop == me) {
        return Err(Drop::Looped);
    }
    Ok(())
}

/// The route one origin's event takes to one receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Nodes the event passes through, origin first, receiver last.
    pub path: Vec<NodeId>,
}

impl Route {
    pub fn hops(&self) -> usize {
        self.path.len() - 1
    }
}

/// What walking the rules found for one origin.
#[derive(Debug, Clone, Default)]
pub struct Delivery {
    /// Every arrival that passed the loop rule, per receiver.
    pub arrivals: BTreeMap<NodeId, Vec<Route>>,
    /// Sends the loop rule dropped (wasted, though harmless).
    pub looped: Vec<Route>,
}

/// A routing rule: (topology, holder, peer, origin) -> send?
pub type Rule = fn(&Topology, &str, &str, &str) -> bool;

/// Walks a routing rule for an event of every origin, as the nodes would forward it.
pub fn simulate(topology: &Topology, rule: Rule) -> BTreeMap<NodeId, Delivery> {
    let mut out = BTreeMap::new();
    for origin in &topology.nodes {
        let mut delivery = Delivery::default();
        let mut holders = vec![vec![origin.id.clone()]];
        // Every arrival adds a hop; a sound topology ends within n hops, a broken one is cut.
        for _ in 0..=topology.nodes.len() {
            let mut next = Vec::new();
            for path in holders {
                let at = path.last().expect("non-empty path");
                for peer in &topology.nodes {
                    if !rule(topology, at, &peer.id, &origin.id) {
                        continue;
                    }
                    let mut route = path.clone();
                    route.push(peer.id.clone());
                    if admit_path(&peer.id, &origin.id, &path).is_err() {
                        delivery.looped.push(Route { path: route });
                        continue;
                    }
                    delivery
                        .arrivals
                        .entry(peer.id.clone())
                        .or_default()
                        .push(Route { path: route.clone() });
                    next.push(route);
                }
            }
            holders = next;
        }
        out.insert(origin.id.clone(), delivery);
    }
    out
}

/// Checks that every node receives every other node's events exactly once under weft's
/// rules; returns the route of every (origin, receiver) pair, or what is wrong.
pub fn prove(topology: &Topology) -> Result<BTreeMap<(NodeId, NodeId), Route>, Vec<String>> {
    prove_rule(topology, forwards)
}

fn prove_rule(topology: &Topology, rule: Rule) -> Result<BTreeMap<(NodeId, NodeId), Route>, Vec<String>> {
    let mut routes = BTreeMap::new();
    let mut problems = Vec::new();
    for (origin, delivery) in simulate(topology, rule) {
        for node in &topology.nodes {
            if node.id == origin {
                continue;
            }
            match delivery.arrivals.get(&node.id).map(Vec::as_slice) {
                None | Some([]) => problems.push(format!("{} never receives the events of {origin}", node.id)),
                Some([route]) => {
                    routes.insert((origin.clone(), node.id.clone()), route.clone());
                }
                Some(many) => problems.push(format!(
                    "{} receives each event of {origin} {} times (via {})",
                    node.id,
                    many.len(),
                    many.iter().map(|r| r.path.join(" → ")).collect::<Vec<_>>().join("; ")
                )),
            }
        }
        for route in &delivery.looped {
            problems.push(format!(
                "an event of {origin} is sent back along its own path: {}",
                route.path.join(" → ")
            ));
        }
    }
    if problems.is_empty() { Ok(routes) } else { Err(problems) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn mesh(shape: &str, n: usize) -> Topology {
        let mut text = format!("version = 1\nmesh = \"m\"\n{shape}\n");
        for i in 0..n {
            text += &format!(
                "[[nodes]]\nid = \"n{i}\"\nregion = \"r{i}\"\naddress = \"127.0.0.1:{}\"\n",
                7000 + i
            );
        }
        Topology::parse(&text, Path::new("m.toml")).unwrap()
    }

    /// The links a topology file may name (`Topology::linked`, judged without the routes)
    /// are exactly the pairs the routes have exchange events.
    #[test]
    fn the_links_a_file_may_name_are_the_pairs_the_routes_use() {
        let shapes = [
            "shape = \"all-to-all\"",
            "shape = \"ring\"",
            "shape = \"ring\"\nbidirectional = true",
            "shape = \"star\"\nhub = \"n1\"",
        ];
        for shape in shapes {
            for n in 3..=7 {
                let t = mesh(shape, n);
                for a in &t.nodes {
                    for b in &t.nodes {
                        let routed = (t.nodes.iter())
                            .any(|o| forwards(&t, &a.id, &b.id, &o.id) || forwards(&t, &b.id, &a.id, &o.id));
                        assert_eq!(
                            t.linked(&a.id, &b.id),
                            routed,
                            "{shape}, {n} nodes, {} and {}",
                            a.id,
                            b.id
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_topology_change_says_who_joins_leaves_moves_and_streams_where() {
        let three = mesh("shape = \"all-to-all\"", 3);
        assert!(changes(&three, &three).is_empty());
        let four = mesh("shape = \"all-to-all\"", 4);
        let grown = changes(&three, &four);
        assert!(
            grown
                .iter()
                .any(|c| c.starts_with("n3 (r3) joins") && c.contains("snapshot")),
            "{grown:?}"
        );
        assert!(
            grown.iter().any(|c| c == "n0 streams to n1, n2, n3 (was n1, n2)"),
            "{grown:?}"
        );
        let shrunk = changes(&four, &three);
        assert!(
            shrunk.iter().any(|c| c.starts_with("n3 leaves") && c.contains("logs")),
            "{shrunk:?}"
        );
        // What n0 applied of n3 stays with it until n1 and n2 have it all.
        let known = ["n0".to_owned(), "n1".to_owned(), "n3".to_owned()];
        let removed = removed_origins(&three, "n0", &known);
        assert_eq!(removed.iter().collect::<Vec<_>>(), ["n3"]);
        let needs = removed_needs(&three, "n0", &removed);
        assert_eq!(needs["n3"], ["n1", "n2"]);
        let ring = mesh("shape = \"ring\"", 3);
        let reshaped = changes(&three, &ring);
        assert!(
            reshaped.iter().any(|c| c.starts_with("the shape changes")),
            "{reshaped:?}"
        );
        let mut moved = three.clone();
        moved.nodes[1].address = "10.0.0.9:7001".into();
        moved.nodes[2].region = "elsewhere".into();
        let said = changes(&three, &moved);
        assert!(
            said.iter()
                .any(|c| c.contains("n1 moves from 127.0.0.1:7001 to 10.0.0.9:7001")),
            "{said:?}"
        );
        assert!(
            said.iter()
                .any(|c| c.contains("n2 changes region") && c.contains("refused")),
            "{said:?}"
        );
    }

    #[test]
    fn reports_travel_back_along_the_routes_of_events() {
        let ring = mesh("shape = \"ring\"", 4);
        assert!(carries(&ring, "n0", "n1", "n1"));
        assert!(
            carries(&ring, "n0", "n1", "n3"),
            "n1 passes n0's events on to n2 and n3"
        );
        assert!(!carries(&ring, "n0", "n3", "n2"), "n3 passes n0's events to nobody");
        let all = mesh("shape = \"all-to-all\"", 3);
        assert!(carries(&all, "n0", "n1", "n1"));
        assert!(!carries(&all, "n0", "n1", "n2"), "no relaying: n2 reports to n0 itself");
        let star = mesh("shape = \"star\"\nhub = \"n0\"", 3);
        assert!(
            carries(&star, "n1", "n0", "n2"),
            "the hub passes a leaf's events to the others"
        );
        assert!(!carries(&star, "n0", "n1", "n2"), "a leaf relays nothing");
    }

    fn worst(routes: &BTreeMap<(NodeId, NodeId), Route>) -> usize {
        routes.values().map(Route::hops).max().unwrap()
    }

    /// Table: shape, sizes, and the worst-case hop count each must prove.
    #[test]
    fn every_shape_delivers_every_event_to_every_node_exactly_once() {
        let cases: &[(&str, usize, usize)] = &[
            ("shape = \"all-to-all\"", 2, 1),
            ("shape = \"all-to-all\"", 5, 1),
            ("shape = \"ring\"", 3, 2),
            ("shape = \"ring\"", 4, 3),
            ("shape = \"ring\"", 7, 6),
            ("shape = \"ring\"\nbidirectional = true", 3, 1),
            ("shape = \"ring\"\nbidirectional = true", 4, 2),
            ("shape = \"ring\"\nbidirectional = true", 5, 2),
            ("shape = \"ring\"\nbidirectional = true", 8, 4),
            ("shape = \"star\"\nhub = \"n0\"", 2, 1),
            ("shape = \"star\"\nhub = \"n0\"", 5, 2),
            ("shape = \"star\"\nhub = \"n2\"", 4, 2),
        ];
        for &(shape, n, hops) in cases {
            let t = mesh(shape, n);
            let routes = prove(&t).unwrap_or_else(|p| panic!("{shape} with {n}: {p:?}"));
            assert_eq!(routes.len(), n * (n - 1), "{shape} with {n}");
            assert_eq!(worst(&routes), hops, "{shape} with {n}");
        }
    }

    #[test]
    fn ring_routes_follow_the_order_and_stop_before_the_origin() {
        let t = mesh("shape = \"ring\"\norder = [\"n0\", \"n2\", \"n1\", \"n3\"]", 4);
        let routes = prove(&t).unwrap();
        let path = &routes[&("n0".to_string(), "n3".to_string())].path;
        assert_eq!(path, &["n0", "n2", "n1", "n3"]);
        assert!(!forwards(&t, "n3", "n0", "n0"), "never back to the origin");
        assert!(forwards(&t, "n3", "n0", "n1"));
        assert_eq!(
            downstream(&t, "n0").iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
            vec!["n2"]
        );
        assert!(relays(&t, "n2", "n0") && !relays(&t, "n3", "n0"));
    }

    #[test]
    fn star_spokes_talk_only_to_the_hub() {
        let t = mesh("shape = \"star\"\nhub = \"n0\"", 4);
        assert_eq!(
            downstream(&t, "n1").iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
            vec!["n0"]
        );
        assert_eq!(downstream(&t, "n0").len(), 3);
        assert!(relays(&t, "n0", "n1") && !relays(&t, "n1", "n2"));
        assert_eq!(origins_for(&t, "n0", "n1"), vec!["n0", "n2", "n3"]);
    }

    #[test]
    fn the_walk_catches_broken_rules() {
        let t = mesh("shape = \"all-to-all\"", 3);
        let flood: Rule = |_, me, peer, _| me != peer;
        let problems = prove_rule(&t, flood).unwrap_err();
        assert!(
            problems.iter().any(|p| p.contains("receives each event of n0 2 times")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("sent back along its own path")),
            "{problems:?}"
        );
        let silent: Rule = |_, _, _, _| false;
        let problems = prove_rule(&t, silent).unwrap_err();
        assert!(
            problems.contains(&"n1 never receives the events of n0".to_string()),
            "{problems:?}"
        );
    }

    /// Table: who was heard when, and what `n0` asks of each peer (relay after 5 s).
    #[test]
    fn relay_requests_ask_one_heard_peer_per_silent_origin() {
        let t = mesh("shape = \"all-to-all\"", 4);
        let after = Duration::from_secs(5);
        let s = Duration::from_secs;
        // (heard ago per n1, n2, n3; up for; expected requests to n1, n2, n3)
        type Case<'a> = ([Option<u64>; 3], u64, [&'a [&'a str]; 3]);
        let cases: &[Case] = &[
            // Everyone fresh: nothing to repair.
            ([Some(1), Some(1), Some(1)], 60, [&[], &[], &[]]),
            // n1 silent: asked of n2, the first peer still heard, and of nobody else.
            ([Some(9), Some(1), Some(1)], 60, [&[], &["n1"], &[]]),
            // Exactly `relay_after` is not yet silent.
            ([Some(5), Some(1), Some(1)], 60, [&[], &[], &[]]),
            // n1 and n2 silent: n3 relays both.
            ([Some(9), Some(9), Some(1)], 60, [&[], &[], &["n1", "n2"]]),
            // n1 never heard, node just up: give it time.
            ([None, Some(1), Some(1)], 2, [&[], &[], &[]]),
            // n1 never heard for longer than relay_after: silent.
            ([None, Some(1), Some(1)], 60, [&[], &["n1"], &[]]),
            // n2 never heard is no relay, even fresh: n3 is asked.
            ([Some(9), None, Some(1)], 2, [&[], &[], &["n1"]]),
            // Nobody left to ask.
            ([Some(9), Some(9), Some(9)], 60, [&[], &[], &[]]),
        ];
        for (i, &(heard, up_for, expected)) in cases.iter().enumerate() {
            let heard_ago = |node: &str| match node {
                "n1" => heard[0].map(s),
                "n2" => heard[1].map(s),
                "n3" => heard[2].map(s),
                other => panic!("asked about {other}"),
            };
            for (peer, want) in ["n1", "n2", "n3"].into_iter().zip(expected) {
                let got = relay_requests(&t, "n0", peer, heard_ago, s(up_for), after);
                assert_eq!(got, want.to_vec(), "case {i}, peer {peer}");
            }
        }
        let ring = mesh("shape = \"ring\"", 4);
        assert!(relay_requests(&ring, "n0", "n2", |_| Some(s(60)), s(60), after).is_empty());
    }

    #[test]
    fn admit_drops_loops() {
        assert_eq!(admit_path("a", "a", &["a".into()]), Err(Drop::Looped));
        assert_eq!(admit_path("b", "a", &["a".into(), "b".into()]), Err(Drop::Looped));
        assert_eq!(admit_path("c", "a", &["a".into(), "b".into()]), Ok(()));
    }
}
