//! Configuration files: the mesh topology (`topology/*.toml`) and one node's config.
//!
//! Both are TOML with a `version` field; unknown keys are refused. Parsing and `validate` do
//! no IO (the one IO step, reading the files, is `NodeConfig::load`), and every error names
//! the file and the key so a bad deploy is caught before anything starts.
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::event::NodeId;

pub const CONFIG_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read { file: PathBuf, source: std::io::Error },
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}: {key}: {message}")]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
}

fn invalid(file: &Path, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        file: file.to_owned(),
        key: key.into(),
        message: message.into(),
    }
}

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

fn validate_name(name: &str) -> Result<(), String> {
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

/// How concurrent writes to a table are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Greatest (hlc, origin node) wins; exact ties by row content.
    Lww,
    /// Listed columns are CRDTs (`columns`), merged; the other columns follow LWW.
    Crdt,
    /// Concurrent versions are kept as siblings for a person to resolve (`weft conflicts`);
    /// the row shows the LWW winner meanwhile.
    Queue,
    /// Each row belongs to one region, named by `owner_column` or computed by `owner_rule`
    /// from the key; only that region writes it, and ownership moves by
    /// `weft ownership transfer`.
    Ownership,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    pub name: String,
    pub strategy: Strategy,
    /// `crdt` tables: the CRDT type of each CRDT column (`qty = "counter"`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub columns: std::collections::BTreeMap<String, crate::resolve::crdt::CrdtType>,
    /// `ownership` tables: the column holding each row's owner region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_column: Option<String>,
    /// `ownership` tables: the rule that finds a row's owner region from its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_rule: Option<OwnerRule>,
}

/// Finds a row's owner region from one primary-key column. Exactly one of `prefix` and
/// `ranges` is given. A key the rule maps to no region is writable nowhere. Transfers
/// (`weft ownership transfer`) override the rule for the rows they move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnerRule {
    /// The primary-key column the rule reads; default: the first key column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// Text keys: the text before the first `prefix` names the owner (`"eu-1042"` with
    /// `prefix = "-"` belongs to region `eu`), through `regions` when that is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// With `prefix`: key prefix → region (`{ e = "eu-west" }`). Prefixes not listed map to
    /// no region.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub regions: std::collections::BTreeMap<String, String>,
    /// Integer keys: inclusive ranges, each owned by a region.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<OwnerRange>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnerRange {
    pub from: i64,
    pub to: i64,
    pub region: String,
}

impl OwnerRule {
    /// The regions this rule can name.
    pub fn named_regions(&self) -> Vec<&str> {
        if !self.ranges.is_empty() {
            self.ranges.iter().map(|r| r.region.as_str()).collect()
        } else {
            self.regions.values().map(String::as_str).collect()
        }
    }

    /// What is wrong with the rule, if anything (the regions are checked by the caller).
    pub fn problem(&self) -> Option<String> {
        match (&self.prefix, self.ranges.is_empty()) {
            (Some(_), false) | (None, true) => {
                return Some("give exactly one of prefix = \"-\" or ranges = [{ from, to, region }]".into());
            }
            (Some(p), true) if p.is_empty() => return Some("prefix must not be empty".into()),
            (None, false) if !self.regions.is_empty() => {
                return Some("regions applies to prefix rules; ranges name their region".into());
            }
            _ => {}
        }
        let mut ranges: Vec<&OwnerRange> = self.ranges.iter().collect();
        ranges.sort_by_key(|r| r.from);
        for r in &ranges {
            if r.from > r.to {
                return Some(format!("range {}..={} is empty; from must be <= to", r.from, r.to));
            }
        }
        for pair in ranges.windows(2) {
            if pair[1].from <= pair[0].to {
                return Some(format!(
                    "ranges {}..={} and {}..={} overlap; every key has one owner",
                    pair[0].from, pair[0].to, pair[1].from, pair[1].to
                ));
            }
        }
        None
    }
}

impl TableConfig {
    pub fn lww(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            strategy: Strategy::Lww,
            columns: Default::default(),
            owner_column: None,
            owner_rule: None,
        }
    }
}

/// Tuning knobs; every one has a default that suits a LAN-to-WAN mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// Most events in one batch on the wire (a capture batch is never split).
    pub batch_max_events: usize,
    /// Batches a sender may have unacknowledged per peer (back-pressure).
    pub window: usize,
    pub heartbeat_ms: u64,
    /// A peer silent this long is disconnected and redialled.
    pub peer_timeout_ms: u64,
    /// How often the outbox is checked for new commits.
    pub poll_ms: u64,
    /// A remote HLC further ahead of our wall clock than this is refused and reported.
    pub max_clock_skew_ms: u64,
    /// All-to-all: when nothing has arrived directly from a node for this long, ask the other
    /// peers to relay its events (they keep every event until all nodes have it). 0 = never.
    pub relay_after_ms: u64,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            batch_max_events: 2_000,
            window: 8,
            heartbeat_ms: 1_000,
            peer_timeout_ms: 5_000,
            poll_ms: 1,
            max_clock_skew_ms: 500,
            relay_after_ms: 5_000,
        }
    }
}

impl ReplicationConfig {
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
    pub fn peer_timeout(&self) -> Duration {
        Duration::from_millis(self.peer_timeout_ms)
    }
    pub fn poll(&self) -> Duration {
        Duration::from_millis(self.poll_ms)
    }
    pub fn max_clock_skew(&self) -> Duration {
        Duration::from_millis(self.max_clock_skew_ms)
    }
    pub fn relay_after(&self) -> Option<Duration> {
        (self.relay_after_ms > 0).then(|| Duration::from_millis(self.relay_after_ms))
    }
}

/// A node config file as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfigFile {
    pub version: u32,
    /// This node's id in the topology.
    pub node: NodeId,
    /// Path of the topology file, relative to this file's folder.
    pub topology: PathBuf,
    /// `sqlite://PATH` (or a plain path).
    pub database: String,
    /// Address to listen on; defaults to this node's address in the topology.
    #[serde(default)]
    pub listen: Option<String>,
    /// Per-peer address to dial instead of the topology's (a proxy, a NAT address).
    #[serde(default)]
    pub dial: std::collections::BTreeMap<NodeId, String>,
    #[serde(default)]
    pub replication: ReplicationConfig,
    pub tables: Vec<TableConfig>,
}

/// Where a node's database lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL (`postgres://user@host:port/db`).
    Postgres(String),
}

impl Database {
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(rest) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) {
            if rest.is_empty() {
                return Err("`sqlite://` needs a file path".into());
            }
            return Ok(Database::Sqlite(PathBuf::from(rest)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Database::Postgres(url.to_owned()));
        }
        if url.contains("://") {
            return Err(format!(
                "`{url}`: unsupported database; use sqlite://PATH or postgres://USER@HOST:PORT/DB"
            ));
        }
        Ok(Database::Sqlite(PathBuf::from(url)))
    }
}

/// A node's resolved configuration: what `node::run` needs, built from files or in code.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node: NodeId,
    pub topology: Topology,
    pub database: Database,
    pub listen: String,
    pub dial: std::collections::BTreeMap<NodeId, String>,
    pub replication: ReplicationConfig,
    pub tables: Vec<TableConfig>,
}

impl NodeConfig {
    /// Reads and validates a node config file and the topology file it names.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        let file: NodeConfigFile = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            file: path.to_owned(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let topology_path = base.join(&file.topology);
        let topology_text = std::fs::read_to_string(&topology_path).map_err(|source| ConfigError::Read {
            file: topology_path.clone(),
            source,
        })?;
        let topology = Topology::parse(&topology_text, &topology_path)?;
        let mut database = file.database.clone();
        if let Ok(Database::Sqlite(p)) = Database::parse(&file.database)
            && p.is_relative()
        {
            database = format!("sqlite://{}", base.join(p).display());
        }
        Self::resolve(NodeConfigFile { database, ..file }, topology, path)
    }

    /// Validates a parsed file against its topology.
    pub fn resolve(file: NodeConfigFile, topology: Topology, path: &Path) -> Result<Self, ConfigError> {
        if file.version != CONFIG_VERSION {
            return Err(invalid(
                path,
                "version",
                format!("is {}, this weft reads version {CONFIG_VERSION}", file.version),
            ));
        }
        let Some(spec) = topology.node(&file.node) else {
            let known: Vec<&str> = topology.nodes.iter().map(|n| n.id.as_str()).collect();
            return Err(invalid(
                path,
                "node",
                format!("`{}` is not in the topology (nodes: {})", file.node, known.join(", ")),
            ));
        };
        let database = Database::parse(&file.database).map_err(|m| invalid(path, "database", m))?;
        if file.tables.is_empty() {
            return Err(invalid(path, "tables", "list at least one table to replicate"));
        }
        let mut names = HashSet::new();
        for (i, table) in file.tables.iter().enumerate() {
            let ok = !table.name.is_empty()
                && !table.name.starts_with("_weft")
                && !table.name.starts_with("sqlite_")
                && table.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(invalid(
                    path,
                    format!("tables[{i}].name"),
                    format!(
                        "`{}` must be a plain table name (letters, digits, '_'; not _weft*/sqlite_*)",
                        table.name
                    ),
                ));
            }
            match (table.strategy, table.columns.is_empty()) {
                (Strategy::Crdt, true) => {
                    return Err(invalid(
                        path,
                        format!("tables[{i}].columns"),
                        "a crdt table lists its CRDT columns, for example columns = { qty = \"counter\" }",
                    ));
                }
                (Strategy::Lww | Strategy::Queue | Strategy::Ownership, false) => {
                    return Err(invalid(
                        path,
                        format!("tables[{i}].columns"),
                        "only applies to strategy = \"crdt\"",
                    ));
                }
                _ => {}
            }
            match (table.strategy, &table.owner_column, &table.owner_rule) {
                (Strategy::Ownership, None, None) => {
                    return Err(invalid(
                        path,
                        format!("tables[{i}].owner_column"),
                        "an ownership table finds each row's owner region: name the column holding it (owner_column = \"home\") or give a rule on the key (owner_rule = { prefix = \"-\" })",
                    ));
                }
                (Strategy::Ownership, Some(_), Some(_)) => {
                    return Err(invalid(
                        path,
                        format!("tables[{i}].owner_rule"),
                        "give owner_column or owner_rule, not both",
                    ));
                }
                (Strategy::Ownership, _, _) | (_, None, None) => {}
                (_, column, _) => {
                    let field = if column.is_some() { "owner_column" } else { "owner_rule" };
                    return Err(invalid(
                        path,
                        format!("tables[{i}].{field}"),
                        "only applies to strategy = \"ownership\"",
                    ));
                }
            }
            if let Some(rule) = &table.owner_rule {
                if let Some(problem) = rule.problem() {
                    return Err(invalid(path, format!("tables[{i}].owner_rule"), problem));
                }
                for region in rule.named_regions() {
                    if !topology.nodes.iter().any(|n| n.region == region) {
                        return Err(invalid(
                            path,
                            format!("tables[{i}].owner_rule"),
                            format!("`{region}` is not a region of the topology"),
                        ));
                    }
                }
            }
            if !names.insert(table.name.as_str()) {
                return Err(invalid(
                    path,
                    format!("tables[{i}].name"),
                    format!("`{}` listed twice", table.name),
                ));
            }
        }
        let r = &file.replication;
        if r.batch_max_events == 0 || r.window == 0 || r.poll_ms == 0 || r.heartbeat_ms == 0 {
            return Err(invalid(
                path,
                "replication",
                "batch_max_events, window, poll_ms and heartbeat_ms must be > 0",
            ));
        }
        if r.peer_timeout_ms <= r.heartbeat_ms {
            return Err(invalid(
                path,
                "replication.peer_timeout_ms",
                "must be greater than heartbeat_ms",
            ));
        }
        for peer in file.dial.keys() {
            if topology.node(peer).is_none() || *peer == file.node {
                return Err(invalid(path, format!("dial.{peer}"), "is not a peer in the topology"));
            }
        }
        Ok(Self {
            dial: file.dial.clone(),
            listen: file.listen.clone().unwrap_or_else(|| spec.address.clone()),
            node: file.node,
            topology,
            database,
            replication: file.replication,
            tables: file.tables,
        })
    }

    /// The address to dial for a peer.
    pub fn address_of<'a>(&'a self, peer: &'a NodeSpec) -> &'a str {
        self.dial.get(&peer.id).map(String::as_str).unwrap_or(&peer.address)
    }

    /// Remote origins whose events this node keeps in its log to pass on: along the static
    /// routes, and in all-to-all every other node's when relaying around failed links is on.
    pub fn kept_origins(&self) -> std::collections::BTreeSet<NodeId> {
        let repair = self.topology.shape == Shape::AllToAll && self.replication.relay_after().is_some();
        self.topology
            .nodes
            .iter()
            .map(|n| n.id.clone())
            .filter(|o| *o != self.node && (repair || crate::topology::relays(&self.topology, &self.node, o)))
            .collect()
    }

    /// Each downstream peer with the origins routed to it (what `weft status` reports on).
    pub fn routed_origins(&self) -> Vec<(NodeId, Vec<NodeId>)> {
        crate::topology::downstream(&self.topology, &self.node)
            .into_iter()
            .map(|peer| {
                let origins = crate::topology::origins_for(&self.topology, &self.node, &peer.id);
                (peer.id.clone(), origins.into_iter().map(str::to_owned).collect())
            })
            .collect()
    }

    /// Per origin kept in the log, the peers that must have it before it may be dropped.
    pub fn log_needs(&self) -> std::collections::BTreeMap<NodeId, Vec<NodeId>> {
        let repair = self.topology.shape == Shape::AllToAll && self.replication.relay_after().is_some();
        let mut needs = std::collections::BTreeMap::new();
        for origin in &self.topology.nodes {
            let peers: Vec<NodeId> = self
                .topology
                .nodes
                .iter()
                .filter(|p| p.id != self.node && p.id != origin.id)
                .filter(|p| {
                    crate::topology::forwards(&self.topology, &self.node, &p.id, &origin.id)
                        || (repair && origin.id != self.node)
                })
                .map(|p| p.id.clone())
                .collect();
            if !peers.is_empty() {
                needs.insert(origin.id.clone(), peers);
            }
        }
        needs
    }

    pub fn region(&self) -> &str {
        &self.topology.node(&self.node).expect("validated").region
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPOLOGY: &str = r#"
version = 1
mesh = "test"
shape = "all-to-all"
[[nodes]]
id = "a"
region = "ra"
address = "127.0.0.1:1"
[[nodes]]
id = "b"
region = "rb"
address = "127.0.0.1:2"
"#;

    #[test]
    fn parses_a_good_topology() {
        let t = Topology::parse(TOPOLOGY, Path::new("t.toml")).unwrap();
        assert_eq!(t.nodes.len(), 2);
        assert_eq!(t.shape, Shape::AllToAll);
    }

    #[test]
    fn refuses_bad_topologies_with_file_and_key() {
        let cases = [
            (TOPOLOGY.replace("mesh =", "mesh_name ="), "unknown field `mesh_name`"),
            (TOPOLOGY.replace("version = 1", "version = 2"), "version: is 2"),
            (TOPOLOGY.replace("\"b\"", "\"a\""), "duplicate node id `a`"),
            (TOPOLOGY.replace(":2\"", ":1\""), "duplicate address"),
            (TOPOLOGY.replace("127.0.0.1:2", "nowhere"), "is not host:port"),
            (
                TOPOLOGY.replace("all-to-all", "mesh-of-doom"),
                "unknown variant `mesh-of-doom`",
            ),
        ];
        for (text, want) in cases {
            let err = Topology::parse(&text, Path::new("bad.toml")).unwrap_err().to_string();
            assert!(err.starts_with("bad.toml"), "{err}");
            assert!(err.contains(want), "{err} should contain {want}");
        }
    }

    #[test]
    fn every_shipped_topology_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("topology");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                Topology::parse(&text, &path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen > 0, "no topology files found in {}", dir.display());
    }

    fn node_file(extra: &str) -> NodeConfigFile {
        toml::from_str(&format!(
            "version = 1\nnode = \"a\"\ntopology = \"t.toml\"\ndatabase = \"sqlite://a.db\"\n{extra}\n[[tables]]\nname = \"items\"\nstrategy = \"lww\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn resolves_a_node_config() {
        let t = Topology::parse(TOPOLOGY, Path::new("t.toml")).unwrap();
        let c = NodeConfig::resolve(node_file(""), t, Path::new("a.toml")).unwrap();
        assert_eq!(c.listen, "127.0.0.1:1");
        assert_eq!(c.database, Database::Sqlite("a.db".into()));
        assert_eq!(c.region(), "ra");
    }

    #[test]
    fn refuses_bad_node_configs() {
        let t = Topology::parse(TOPOLOGY, Path::new("t.toml")).unwrap();
        let mut f = node_file("");
        f.node = "z".into();
        let err = NodeConfig::resolve(f, t.clone(), Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a.toml: node: `z` is not in the topology (nodes: a, b)"),
            "{err}"
        );

        let mut f = node_file("");
        f.tables[0].name = "_weft_log".into();
        let err = NodeConfig::resolve(f, t.clone(), Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("tables[0].name"), "{err}");

        let err = toml::from_str::<NodeConfigFile>("version = 1\nnodes = 3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `nodes`"), "{err}");

        let f = node_file("[replication]\nheartbeat_ms = 5000\npeer_timeout_ms = 100");
        let err = NodeConfig::resolve(f, t, Path::new("a.toml")).unwrap_err().to_string();
        assert!(err.contains("peer_timeout_ms"), "{err}");
    }

    #[test]
    fn checks_owner_rules() {
        let t = Topology::parse(TOPOLOGY, Path::new("t.toml")).unwrap();
        let owned = |extra: &str| {
            let f: NodeConfigFile = toml::from_str(&format!(
                "version = 1\nnode = \"a\"\ntopology = \"t.toml\"\ndatabase = \"sqlite://a.db\"\n[[tables]]\nname = \"w\"\nstrategy = \"ownership\"\n{extra}\n"
            ))
            .map_err(|e| e.to_string())?;
            NodeConfig::resolve(f, t.clone(), Path::new("a.toml"))
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert_eq!(owned("owner_rule = { prefix = \"-\" }"), Ok(()));
        assert_eq!(
            owned("owner_rule = { column = \"id\", prefix = \":\", regions = { e = \"ra\" } }"),
            Ok(())
        );
        assert_eq!(
            owned(
                "owner_rule = { ranges = [{ from = 0, to = 9, region = \"ra\" }, { from = 10, to = 19, region = \"rb\" }] }"
            ),
            Ok(())
        );
        let cases = [
            ("", "name the column holding it (owner_column"),
            ("owner_column = \"h\"\nowner_rule = { prefix = \"-\" }", "not both"),
            ("owner_rule = { }", "exactly one of prefix"),
            (
                "owner_rule = { prefix = \"-\", ranges = [{ from = 0, to = 1, region = \"ra\" }] }",
                "exactly one of prefix",
            ),
            ("owner_rule = { prefix = \"\" }", "prefix must not be empty"),
            (
                "owner_rule = { prefix = \"-\", regions = { e = \"mars\" } }",
                "`mars` is not a region",
            ),
            (
                "owner_rule = { ranges = [{ from = 0, to = 10, region = \"ra\" }, { from = 10, to = 19, region = \"rb\" }] }",
                "overlap",
            ),
            (
                "owner_rule = { ranges = [{ from = 5, to = 1, region = \"ra\" }] }",
                "from must be <= to",
            ),
            (
                "owner_rule = { ranges = [{ from = 0, to = 1, region = \"ra\" }], regions = { e = \"ra\" } }",
                "regions applies to prefix",
            ),
            ("owner_rule = { prefix = \"-\", colour = 1 }", "unknown field `colour`"),
        ];
        for (extra, expected) in cases {
            let err = owned(extra).unwrap_err();
            assert!(err.contains(expected), "{extra}: {err}");
        }
    }
}
