//! The handshake's checks, both ways: whether a node that opens a stream to us may feed us
//! at all (Hello), and whether the node that answered our dial is the one we dialled
//! (Welcome). What a batch may contain is `admission`'s; both refuse with a [`Refusal`].
//!
//! A pure function of what the caller claims and our topology, checked before anything is read
//! from the store, so a stray or misconfigured node is refused before it costs a transaction.
//! Admitted means: it speaks our protocol version, belongs to our mesh, and is a node of our
//! topology other than ourselves (a node dialling itself would apply its own events as remote
//! ones). Every binding calls it on the first frame of a stream and refuses the stream with
//! the `Refusal`, whose message tells the operator which setting disagrees.
//!
//! A sender takes the Welcome's frontiers as the peer's acknowledgements, which let it trim
//! its log; so it first checks that the answer names the node it dialled and its mesh. A
//! wrong address (a `[dial]` entry pointing at another node) would otherwise trim events the
//! real peer never got.
use std::collections::BTreeMap;

use crate::config::Topology;
use crate::event::NodeId;
use crate::wire::PROTOCOL;

/// What a dialling node says about itself, whatever the binding's framing.
#[derive(Debug, Clone, Copy)]
pub struct Hello<'a> {
    pub protocol: u32,
    pub node: &'a str,
    pub mesh: &'a str,
}

/// Why a Hello was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("protocol {offered} not supported; this node speaks {PROTOCOL}")]
    Protocol { offered: u32 },
    #[error("node {node} is in mesh `{theirs}`, this node is in `{ours}`")]
    OtherMesh { node: String, theirs: String, ours: String },
    #[error("`{node}` is not a peer in this topology")]
    NotAPeer { node: String },
    #[error("an event's origin `{origin}` is not a node of this topology; it was not applied")]
    UnknownOrigin { origin: String },
    #[error(
        "an event of {origin} claims region `{claimed}`, but the topology puts {origin} in `{region}`; it was not applied"
    )]
    WrongRegion {
        origin: String,
        claimed: String,
        region: String,
    },
    #[error(
        "dialled {dialled}, but {answered} answered; the address of {dialled} (its [dial] entry or the topology) points at another node"
    )]
    WrongPeer { dialled: String, answered: String },
    #[error(
        "{peer} sent an event of {origin}, which the topology does not route through {peer} to this node; it was not applied"
    )]
    NotRouted { peer: String, origin: String },
    #[error(
        "{peer} sent an event of {origin} whose path {path:?} does not run from {origin} to {peer}; it was not applied"
    )]
    ForgedPath {
        peer: String,
        origin: String,
        path: Vec<String>,
    },
    #[error(
        "{peer} sent event {origin}/{seq} whose version gives {origin} {counter}, past the event's own seq; it was not applied"
    )]
    CounterLeap {
        peer: String,
        origin: String,
        seq: u64,
        counter: u64,
    },
    #[error(
        "{peer} sent event {origin}/{seq} stamped {ahead_ms} ms ahead of this node's clock (more than {limit_ms} ms); \
         it was not applied: check the clocks (NTP)"
    )]
    FutureHlc {
        peer: String,
        origin: String,
        seq: u64,
        ahead_ms: i64,
        limit_ms: i64,
    },
    #[error(
        "{peer} sent event {origin}/{seq} claiming its row for `{owner}`, which is not a region of this topology; it was not applied"
    )]
    UnknownOwner {
        peer: String,
        origin: String,
        seq: u64,
        owner: String,
    },
    #[error(
        "{peer} sent event {origin}/{seq}, a write by {region} to a row it says {owner} owns (not a transfer); \
         only a row's owner writes it, so it was not applied"
    )]
    NotTheOwner {
        peer: String,
        origin: String,
        seq: u64,
        region: String,
        owner: String,
    },
    #[error(
        "{peer} sent event {origin}/{seq} whose version gives this node {counter}, but this node's last write is {last}: \
         forged, or this database went back in time (a restore); it was not applied"
    )]
    AheadOfUs {
        peer: String,
        origin: String,
        seq: u64,
        counter: u64,
        last: u64,
    },
    #[error(
        "{peer} sent event {origin}/{seq} whose version names {strangers} nodes outside this topology (at most {limit}, \
         with ids of at most {id_bytes} bytes); it was not applied"
    )]
    Strangers {
        peer: String,
        origin: String,
        seq: u64,
        strangers: usize,
        limit: usize,
        id_bytes: usize,
    },
}

impl Refusal {
    /// The kind of refusal, for logging each cause once per peer.
    pub fn cause(&self) -> &'static str {
        match self {
            Refusal::Protocol { .. } => "protocol",
            Refusal::OtherMesh { .. } => "other mesh",
            Refusal::NotAPeer { .. } => "not a peer",
            Refusal::UnknownOrigin { .. } => "unknown origin",
            Refusal::WrongRegion { .. } => "wrong region",
            Refusal::WrongPeer { .. } => "wrong peer",
            Refusal::NotRouted { .. } => "not routed",
            Refusal::ForgedPath { .. } => "forged path",
            Refusal::CounterLeap { .. } => "counter leap",
            Refusal::FutureHlc { .. } => "future hlc",
            Refusal::UnknownOwner { .. } => "unknown owner",
            Refusal::NotTheOwner { .. } => "not the owner",
            Refusal::AheadOfUs { .. } => "ahead of us",
            Refusal::Strangers { .. } => "strangers",
        }
    }
}

/// Checks that the Welcome from the node dialled as `dialled` names it and our mesh; a
/// Welcome without a mesh (from a weft that predates the field) is checked by node only.
pub fn check_welcome(dialled: &str, answered: &str, mesh: &str, topology: &Topology) -> Result<(), Refusal> {
    if answered != dialled {
        return Err(Refusal::WrongPeer {
            dialled: dialled.to_owned(),
            answered: answered.to_owned(),
        });
    }
    if !mesh.is_empty() && mesh != topology.mesh {
        return Err(Refusal::OtherMesh {
            node: answered.to_owned(),
            theirs: mesh.to_owned(),
            ours: topology.mesh.clone(),
        });
    }
    Ok(())
}

/// Admits `hello` to node `me` of `topology`, or says why not.
pub fn check_hello(hello: Hello<'_>, topology: &Topology, me: &str) -> Result<(), Refusal> {
    if hello.protocol != PROTOCOL {
        return Err(Refusal::Protocol {
            offered: hello.protocol,
        });
    }
    if hello.mesh != topology.mesh {
        return Err(Refusal::OtherMesh {
            node: hello.node.to_owned(),
            theirs: hello.mesh.to_owned(),
            ours: topology.mesh.clone(),
        });
    }
    if topology.node(hello.node).is_none() || hello.node == me {
        return Err(Refusal::NotAPeer {
            node: hello.node.to_owned(),
        });
    }
    Ok(())
}

/// A peer has applied more of this node's own events than this node's database holds: the
/// database went back in time (restored from a backup or a VM snapshot, a failover to an
/// asynchronous replica). Events numbered from here would reuse seqs the peer has applied,
/// and it would drop them as duplicates: new writes would be lost without a word. The node
/// re-seeds from the peer instead (`transport::join`), numbering after what the peer has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WentBack {
    pub peer: NodeId,
    /// What the peer has applied of this node's events.
    pub peer_has: u64,
    /// What this node's database holds as its last seq.
    pub ours: u64,
}

impl WentBack {
    /// Whether `peer`'s Welcome `frontiers` show this node (`me`, at `ours`) went back.
    pub fn check(me: &str, peer: &str, frontiers: &BTreeMap<NodeId, u64>, ours: u64) -> Option<Self> {
        let peer_has = frontiers.get(me).copied().unwrap_or(0);
        (peer_has > ours).then(|| WentBack {
            peer: peer.to_owned(),
            peer_has,
            ours,
        })
    }
}

impl std::fmt::Display for WentBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{peer} has applied this node's events up to seq {has}, but this database holds only up to seq {ours}: \
             it went back in time (restored from a backup or a snapshot, or failed over to a replica that lags). \
             Events {from}..={has} ({n} of them) were this node's and are not in this database; {peer} and the \
             regions it reached have them. Re-seeding from {peer} by snapshot: this node numbers its changes after \
             seq {has} and gets those events back as rows; changes made here since the restore wait in the outbox \
             and follow",
            peer = self.peer,
            has = self.peer_has,
            ours = self.ours,
            from = self.ours + 1,
            n = self.peer_has - self.ours
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #[test]
    fn a_peer_that_has_more_of_our_events_than_we_do_shows_we_went_back() {
        let frontiers: BTreeMap<NodeId, u64> = [("a".to_string(), 20), ("b".to_string(), 7)].into_iter().collect();
        assert_eq!(WentBack::check("a", "b", &frontiers, 20), None);
        assert_eq!(
            WentBack::check("a", "b", &frontiers, 25),
            None,
            "it may not have everything yet"
        );
        assert_eq!(WentBack::check("c", "b", &frontiers, 0), None, "it has nothing of ours");
        let back = WentBack::check("a", "b", &frontiers, 12).unwrap();
        assert!(back.to_string().contains("Events 13..=20 (8 of them)"), "{back}");
    }

    use super::*;
    use std::path::Path;

    /// Nodes n0, n1, n2 in regions r0, r1, r2, all-to-all, in mesh `m`.
    pub(crate) fn topology() -> Topology {
        let mut text = "version = 1\nmesh = \"m\"\nshape = \"all-to-all\"\n".to_string();
        for i in 0..3 {
            text += &format!(
                "[[nodes]]\nid = \"n{i}\"\nregion = \"r{i}\"\naddress = \"127.0.0.1:{}\"\n",
                7000 + i
            );
        }
        Topology::parse(&text, Path::new("m.toml")).unwrap()
    }

    fn hello<'a>(protocol: u32, node: &'a str, mesh: &'a str) -> Hello<'a> {
        Hello { protocol, node, mesh }
    }

    #[test]
    fn admits_a_known_peer_of_the_same_mesh_and_protocol() {
        assert_eq!(check_hello(hello(PROTOCOL, "n1", "m"), &topology(), "n0"), Ok(()));
    }

    #[test]
    fn a_welcome_must_come_from_the_node_dialled_in_our_mesh() {
        let t = topology();
        assert_eq!(check_welcome("n1", "n1", "m", &t), Ok(()));
        assert_eq!(check_welcome("n1", "n1", "", &t), Ok(()), "an older weft sends no mesh");
        assert!(matches!(
            check_welcome("n1", "n2", "m", &t),
            Err(Refusal::WrongPeer { .. })
        ));
        assert!(matches!(
            check_welcome("n1", "n1", "other", &t),
            Err(Refusal::OtherMesh { .. })
        ));
    }

    #[test]
    fn refuses_each_disagreement_with_the_operators_message() {
        let t = topology();
        let refused = |h| check_hello(h, &t, "n0").unwrap_err();
        assert_eq!(
            refused(hello(PROTOCOL + 1, "n1", "m")).to_string(),
            format!("protocol {} not supported; this node speaks {PROTOCOL}", PROTOCOL + 1)
        );
        assert_eq!(
            refused(hello(PROTOCOL, "n1", "other")).to_string(),
            "node n1 is in mesh `other`, this node is in `m`"
        );
        assert_eq!(
            refused(hello(PROTOCOL, "n9", "m")),
            Refusal::NotAPeer { node: "n9".into() }
        );
        assert_eq!(
            refused(hello(PROTOCOL, "n0", "m")).to_string(),
            "`n0` is not a peer in this topology"
        );
    }
}
