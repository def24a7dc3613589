//! The mesh topology file (`topology/*.toml`): nodes, regions, addresses and the shape.
use std::collections::HashSet;
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
    pub nodes: Vec<NodeSpec>,
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
        self.validate_shape(file, &ids)
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
