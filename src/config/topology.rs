//! The mesh topology file (`topology/*.toml`): nodes, regions, addresses, the shape, and
//! which transport each link uses (gRPC by default; Kafka through the clusters of `[kafka]`).
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::event::NodeId;

use super::{CONFIG_VERSION, ConfigError, invalid};

/// The shape of the mesh: who sends which events to whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// Each node sends its own events to every other node; nobody relays (except around a
    /// failed link, see `ReplicationConfig::relay_after_ms`).
    AllToAll,
    /// Each node sends its own and relayed events to its successor (and, bidirectional, to its
    /// predecessor); an event stops before it would reach its origin again.
    Ring,
    /// Spokes send their own events to the hub; the hub sends its own events to every spoke
    /// and relays each spoke's events to the other spokes.
    Star,
}

/// How events travel on a link between two nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// A stream from the sender to the receiver's listener.
    #[default]
    Grpc,
    /// The sender's topic (`weft.<mesh>.<node>`) in its region's Kafka cluster, read by
    /// the receiver.
    Kafka,
}

impl Transport {
    fn is_grpc(&self) -> bool {
        *self == Transport::Grpc
    }
}

/// A link whose transport differs from the mesh's `transport`; both directions use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    pub between: [NodeId; 2],
    pub transport: Transport,
}

/// The Kafka clusters of the mesh: one shared (`bootstrap`), or one per region (`regions`,
/// which wins for the regions it names). A node produces into its own region's cluster;
/// its peers consume from there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaClusters {
    /// `bootstrap.servers` of the cluster every region uses unless `regions` names its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<String>,
    /// Region → `bootstrap.servers` of that region's cluster.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub regions: BTreeMap<String, String>,
    /// Every node also publishes its own changes, one JSON document per change in
    /// Debezium's shape, into `weft.<mesh>.<node>.changes` of its region's cluster: for
    /// consumers that do not speak weft (analytics, caches, search). Its log keeps what that
    /// topic has not taken yet, as for a peer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub changes: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub id: NodeId,
    pub region: String,
    /// `host:port` where this node's sidecar accepts replication streams.
    pub address: String,
}

/// A topology file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    pub version: u32,
    /// Name of the mesh; nodes of different meshes refuse to talk.
    pub mesh: String,
    pub shape: Shape,
    /// Ring only: send both ways, halving the worst-case hop count.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bidirectional: bool,
    /// Ring only: node ids in ring order (default: the order of `nodes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<Vec<NodeId>>,
    /// Star only: the hub's node id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<NodeId>,
    /// The transport of every link `links` does not name.
    #[serde(default, skip_serializing_if = "Transport::is_grpc")]
    pub transport: Transport,
    pub nodes: Vec<NodeSpec>,
    /// Links whose transport differs from `transport`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkSpec>,
    /// The Kafka clusters; required once a link uses Kafka.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaClusters>,
}

impl Topology {
    /// Reads and validates a topology file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let topology: Topology = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
        topology.validate(file)?;
        Ok(topology)
    }

    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        if self.version != CONFIG_VERSION {
            return Err(invalid(
                file,
                "version",
                format!("is {}, this weft reads version {CONFIG_VERSION}", self.version),
            ));
        }
        if self.mesh.trim().is_empty() {
            return Err(invalid(file, "mesh", "must name the mesh"));
        }
        if self.nodes.len() < 2 {
            return Err(invalid(file, "nodes", "a mesh needs at least two nodes"));
        }
        let mut ids = HashSet::new();
        let mut addresses = HashSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let key = format!("nodes[{i}]");
            validate_name(&node.id).map_err(|m| invalid(file, format!("{key}.id"), m))?;
            validate_name(&node.region).map_err(|m| invalid(file, format!("{key}.region"), m))?;
            if !ids.insert(node.id.as_str()) {
                return Err(invalid(
                    file,
                    format!("{key}.id"),
                    format!("duplicate node id `{}`", node.id),
                ));
            }
            if node
                .address
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return Err(invalid(
                    file,
                    format!("{key}.address"),
                    format!("`{}` is not host:port", node.address),
                ));
            }
            if !addresses.insert(node.address.as_str()) {
                return Err(invalid(
                    file,
                    format!("{key}.address"),
                    format!("duplicate address `{}`", node.address),
                ));
            }
        }
        self.validate_shape(file, &ids)?;
        self.validate_links(file)
    }

    /// Every link named is one the shape uses, named once; every region with a node on a
    /// Kafka link has a cluster.
    fn validate_links(&self, file: &Path) -> Result<(), ConfigError> {
        let mut seen = HashSet::new();
        for (i, link) in self.links.iter().enumerate() {
            let key = format!("links[{i}].between");
            let [a, b] = &link.between;
            for id in [a, b] {
                if self.node(id).is_none() {
                    return Err(invalid(file, &key, format!("unknown node `{id}`")));
                }
            }
            if a == b {
                return Err(invalid(
                    file,
                    &key,
                    format!("names `{a}` twice; a link joins two nodes"),
                ));
            }
            if !self.linked(a, b) {
                return Err(invalid(
                    file,
                    &key,
                    format!("`{a}` and `{b}` exchange no events in this shape, so their link carries nothing"),
                ));
            }
            if !seen.insert((a.min(b), a.max(b))) {
                return Err(invalid(
                    file,
                    &key,
                    format!("the link between `{a}` and `{b}` is named twice"),
                ));
            }
        }
        let clusters = self.kafka.clone().unwrap_or_default();
        for region in self.kafka_regions() {
            if clusters.bootstrap.is_none() && !clusters.regions.contains_key(&region) {
                return Err(invalid(
                    file,
                    "kafka",
                    format!(
                        "region `{region}` has a node on a Kafka link (or publishing [kafka] changes) but no cluster: add `bootstrap = \"host:port\"` \
                         under [kafka] (one cluster for the mesh), or `{region} = \"host:port\"` under [kafka.regions]"
                    ),
                ));
            }
        }
        if let Some(unknown) = clusters
            .regions
            .keys()
            .find(|r| !self.nodes.iter().any(|n| &n.region == *r))
        {
            return Err(invalid(
                file,
                "kafka.regions",
                format!("no node is in region `{unknown}`"),
            ));
        }
        Ok(())
    }

    /// Whether any node produces into or reads from Kafka (a Kafka link, or `[kafka]
    /// changes`).
    pub fn uses_kafka(&self) -> bool {
        !self.kafka_regions().is_empty()
    }

    /// The regions with a node on a Kafka link, or every region when the nodes publish
    /// their changes.
    fn kafka_regions(&self) -> std::collections::BTreeSet<String> {
        if self.kafka_changes() {
            return self.nodes.iter().map(|n| n.region.clone()).collect();
        }
        let mut regions = std::collections::BTreeSet::new();
        for a in &self.nodes {
            for b in &self.nodes {
                if self.linked(&a.id, &b.id) && self.link_transport(&a.id, &b.id) == Transport::Kafka {
                    regions.insert(a.region.clone());
                    regions.insert(b.region.clone());
                }
            }
        }
        regions
    }

    /// Whether the shape has `a` and `b` exchange events (either way): any two nodes of an
    /// all-to-all mesh, neighbours in a ring, the hub and a spoke in a star. The routes
    /// themselves are the `topology` module's; this is what a link in the file may name.
    pub fn linked(&self, a: &str, b: &str) -> bool {
        match self.shape {
            Shape::AllToAll => a != b,
            Shape::Star => {
                let hub = self.hub.as_deref().unwrap_or_default();
                a != b && (a == hub || b == hub)
            }
            Shape::Ring => {
                let ring: Vec<&str> = match &self.order {
                    Some(order) => order.iter().map(String::as_str).collect(),
                    None => self.nodes.iter().map(|n| n.id.as_str()).collect(),
                };
                let (Some(i), Some(j)) = (ring.iter().position(|n| *n == a), ring.iter().position(|n| *n == b)) else {
                    return false;
                };
                let n = ring.len();
                i != j && ((i + 1) % n == j || (j + 1) % n == i)
            }
        }
    }

    /// The transport of the link between `a` and `b`.
    pub fn link_transport(&self, a: &str, b: &str) -> Transport {
        self.links
            .iter()
            .find(|l| (l.between[0] == a && l.between[1] == b) || (l.between[0] == b && l.between[1] == a))
            .map_or(self.transport, |l| l.transport)
    }

    /// Whether every node publishes its own changes as JSON documents (`[kafka] changes`).
    pub fn kafka_changes(&self) -> bool {
        self.kafka.as_ref().is_some_and(|k| k.changes)
    }

    /// `bootstrap.servers` of the Kafka cluster `region`'s nodes produce into.
    pub fn kafka_bootstrap(&self, region: &str) -> Option<&str> {
        let clusters = self.kafka.as_ref()?;
        clusters
            .regions
            .get(region)
            .or(clusters.bootstrap.as_ref())
            .map(String::as_str)
    }

    fn validate_shape(&self, file: &Path, ids: &HashSet<&str>) -> Result<(), ConfigError> {
        if self.shape != Shape::Ring {
            if self.bidirectional {
                return Err(invalid(file, "bidirectional", "only applies to shape = \"ring\""));
            }
            if self.order.is_some() {
                return Err(invalid(file, "order", "only applies to shape = \"ring\""));
            }
        }
        if self.shape != Shape::Star && self.hub.is_some() {
            return Err(invalid(file, "hub", "only applies to shape = \"star\""));
        }
        match self.shape {
            Shape::AllToAll => Ok(()),
            Shape::Ring => {
                if self.nodes.len() < 3 {
                    return Err(invalid(
                        file,
                        "nodes",
                        format!(
                            "a ring needs at least 3 nodes, this one has {}; use all-to-all",
                            self.nodes.len()
                        ),
                    ));
                }
                let Some(order) = &self.order else { return Ok(()) };
                let mut seen = HashSet::new();
                for (i, id) in order.iter().enumerate() {
                    if !ids.contains(id.as_str()) {
                        return Err(invalid(file, format!("order[{i}]"), format!("unknown node `{id}`")));
                    }
                    if !seen.insert(id.as_str()) {
                        return Err(invalid(
                            file,
                            format!("order[{i}]"),
                            format!("`{id}` appears twice in the ring"),
                        ));
                    }
                }
                let missing: Vec<&str> = self
                    .nodes
                    .iter()
                    .map(|n| n.id.as_str())
                    .filter(|id| !seen.contains(id))
                    .collect();
                if !missing.is_empty() {
                    return Err(invalid(
                        file,
                        "order",
                        format!("unreachable nodes: {} (not in the ring order)", missing.join(", ")),
                    ));
                }
                Ok(())
            }
            Shape::Star => {
                let Some(hub) = &self.hub else {
                    return Err(invalid(file, "hub", "a star needs a hub: add hub = \"<node id>\""));
                };
                if !ids.contains(hub.as_str()) {
                    return Err(invalid(file, "hub", format!("unknown node `{hub}`")));
                }
                Ok(())
            }
        }
    }

    pub fn node(&self, id: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.id == id)
    }
}

pub(super) fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` must be 1 to 64 characters of a-z, A-Z, 0-9, '-', '_', '.'"
        ))
    }
}
