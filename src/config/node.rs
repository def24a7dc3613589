//! One node's config file: its id, topology, database, replication settings and tables,
//! resolved against the topology and checked as a whole by `NodeConfig::load`.
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::event::NodeId;

use super::{CONFIG_VERSION, ConfigError, NodeSpec, Shape, Strategy, TableConfig, Topology, invalid};

/// Tuning knobs; every one has a default that suits a LAN-to-WAN mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// About this many events in one batch on the wire (whole capture batches, each at most
    /// `capture::DRAIN_PIECE` rows).
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
    /// Rows per chunk of a snapshot a joining node copies (one chunk is one transaction).
    pub snapshot_page_rows: usize,
    /// The log keeps at most this many MiB of events, and none older than `log_retain_secs`,
    /// even if a peer still needs them: that peer re-seeds by snapshot. 0 = no limit.
    pub log_retain_mib: u64,
    pub log_retain_secs: u64,
    /// Largest message a link carries, in MiB (a gRPC frame, a snapshot chunk, a Kafka
    /// record), on both sides: set it alike on every node. Frames and chunks are cut by
    /// bytes to stay within it, capture batches (pieces of a source transaction) hold at
    /// most a quarter of it, and one row change too large for any message is refused at its
    /// source (a `too large` dead letter there). Raise it only for rows that large.
    pub max_message_mib: usize,
    /// Every this many seconds, audit the whole mesh (`weft audit`, without repair) and
    /// report through the log, `weft status` and the metrics. 0 = never (the default).
    pub audit_every_secs: u64,
    /// Every this many seconds, purge the tombstones every node has seen along with every
    /// write concurrent with them (the causal stability horizon). 0 = keep them forever.
    pub tombstone_gc_secs: u64,
    /// Connections the listener holds at once past their TLS handshake, in all and per
    /// remote address (an IPv6 /64 counts as one address); more are dropped once their
    /// handshake is done (`transport::limits`).
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    /// TLS handshakes in progress at once, in all and per remote address. An address over
    /// its share is closed at accept; when every place is taken, a newcomer takes the place
    /// of the oldest handshake of the address holding the most, if it holds more than the
    /// newcomer's.
    pub max_handshakes: usize,
    pub max_handshakes_per_address: usize,
    /// Concurrent HTTP/2 streams on one connection.
    pub max_streams_per_connection: u32,
    /// Connections, and apart from them streams (replication Hellos, snapshots, audit
    /// requests), one address may open per second, in bursts of up to four times as many.
    pub opens_per_address_per_sec: u32,
    /// Dead letters kept per cause (table not replicated, shape, undecodable, CRDT,
    /// ownership, refused by the database). Past it, a batch that would add one is refused
    /// and resent later: the link from that peer waits, nothing is lost.
    pub max_dead_letters_per_cause: u64,
    /// At start, how long this node waits for every gRPC peer to say how many of its own
    /// events it has before it numbers changes (`transport::history`); past it, the peers
    /// that answered decide. 0 = decide on the first answer.
    pub history_wait_secs: u64,
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
            snapshot_page_rows: 1_000,
            log_retain_mib: 2_048,
            log_retain_secs: 3 * 24 * 3600,
            max_message_mib: 64,
            audit_every_secs: 0,
            tombstone_gc_secs: 10,
            max_connections: 512,
            max_connections_per_address: 64,
            max_handshakes: 128,
            max_handshakes_per_address: 16,
            max_streams_per_connection: 32,
            opens_per_address_per_sec: 50,
            max_dead_letters_per_cause: 100_000,
            history_wait_secs: 30,
        }
    }
}

/// Room kept in a message for everything but its events or rows (headers, frontiers).
pub const MESSAGE_OVERHEAD: usize = 64 << 10;

impl ReplicationConfig {
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
    pub fn peer_timeout(&self) -> Duration {
        Duration::from_millis(self.peer_timeout_ms)
    }
    /// The period of the background audit, if on.
    pub fn audit_every(&self) -> Option<Duration> {
        (self.audit_every_secs > 0).then(|| Duration::from_secs(self.audit_every_secs))
    }

    pub fn max_message_bytes(&self) -> usize {
        self.max_message_mib.saturating_mul(1 << 20)
    }
    /// The most a frame's events (or a chunk's rows) may hold, leaving room for the
    /// message's own fields.
    pub fn max_payload_bytes(&self) -> usize {
        self.max_message_bytes().saturating_sub(MESSAGE_OVERHEAD)
    }
    /// What a frame or a snapshot chunk gathers up to before it goes (it then ends at the
    /// next capture batch boundary, still within `max_payload_bytes`).
    pub fn frame_budget(&self) -> usize {
        self.max_payload_bytes() / 2
    }
    /// The log's retention limits (bytes, age); `u64::MAX` and `Duration::MAX` when off.
    pub fn log_retention(&self) -> (u64, Duration) {
        let bytes = match self.log_retain_mib {
            0 => u64::MAX,
            mib => mib.saturating_mul(1 << 20),
        };
        let age = match self.log_retain_secs {
            0 => Duration::MAX,
            secs => Duration::from_secs(secs),
        };
        (bytes, age)
    }
    pub fn poll(&self) -> Duration {
        Duration::from_millis(self.poll_ms)
    }
    pub fn max_clock_skew(&self) -> Duration {
        Duration::from_millis(self.max_clock_skew_ms)
    }
    pub fn history_wait(&self) -> Duration {
        Duration::from_secs(self.history_wait_secs)
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
    /// Mutual TLS on every link and listener (`weft certs` makes the files).
    #[serde(default)]
    pub tls: Option<TlsFile>,
    /// Client settings for the Kafka links (`security.protocol`, `sasl.*`, `ssl.*`, ...).
    #[serde(default)]
    pub kafka: KafkaFile,
    /// The operations endpoints (`/metrics`, `/healthz`, `/readyz`); off without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpFile>,
    pub tables: Vec<TableConfig>,
}

/// The `[http]` section as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpFile {
    /// `host:port` to serve on (HTTPS with the node's certificate under mutual TLS).
    pub listen: String,
    /// `/readyz` fails while events applied within the last this-many seconds were older
    /// than that when they landed (the node is catching up).
    #[serde(default = "default_ready_max_lag_secs")]
    pub ready_max_lag_secs: u64,
    /// A file holding the token `/metrics` wants as `Authorization: Bearer <token>`
    /// (relative to the config file's folder); without it `/metrics` is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Serve the web console under `/console` (needs `console_token_file`: it resolves
    /// conflicts and acts on dead letters).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub console: bool,
    /// A file holding the token the console wants (signing in, or as a bearer token),
    /// another than `token_file`'s: a scrape credential lives in many configs, and must not
    /// act on the database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_token_file: Option<PathBuf>,
}

fn default_ready_max_lag_secs() -> u64 {
    30
}

/// The operations endpoints, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    pub listen: std::net::SocketAddr,
    pub ready_max_lag: Duration,
    pub token_file: Option<PathBuf>,
    pub console: bool,
    pub console_token_file: Option<PathBuf>,
}

/// The `[kafka]` section: librdkafka settings passed through to every Kafka client of the
/// node (TLS and SASL to the brokers). The brokers' addresses come from the topology.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaFile {
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub settings: std::collections::BTreeMap<String, String>,
}

/// Settings weft itself sets on its Kafka clients: a file may not change them, because the
/// guarantees rest on them.
pub const KAFKA_RESERVED: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.idempotence",
    "enable.gapless.guarantee",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "acks",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "isolation.level",
    "message.max.bytes",
    "receive.message.max.bytes",
];

/// The largest `max_message_mib` a mesh with Kafka takes: librdkafka sends no record over
/// 1,000,000,000 bytes, and a record needs room for its framing besides the message.
pub const KAFKA_MAX_MESSAGE_MIB: usize = 900;

/// The `[tls]` section as written: the mesh CA bundle, this node's certificate and key
/// (PEM, relative to the config file's folder), or `insecure = true` for plain text.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
}

/// How a node's links are secured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Security {
    /// No `[tls]` section: fine for the admin commands, refused by `weft run`.
    Unset,
    /// `insecure = true`: plain text, warned about at every start.
    Insecure,
    /// Mutual TLS: the CA bundle that signs every node, and this node's certificate and key.
    Tls { ca: PathBuf, cert: PathBuf, key: PathBuf },
}

impl Security {
    fn resolve(tls: Option<&TlsFile>, base: &Path, topology: &Topology, path: &Path) -> Result<Self, ConfigError> {
        let Some(tls) = tls else { return Ok(Security::Unset) };
        match (tls.insecure, &tls.ca, &tls.cert, &tls.key) {
            (true, None, None, None) => Ok(Security::Insecure),
            (true, ..) => Err(invalid(
                path,
                "tls",
                "sets insecure = true and certificate files: choose one (remove insecure for TLS)",
            )),
            (false, Some(ca), Some(cert), Some(key)) => {
                for node in &topology.nodes {
                    if rustls::pki_types::DnsName::try_from(node.id.as_str()).is_err() {
                        return Err(invalid(
                            path,
                            "tls",
                            format!(
                                "node id `{}` cannot be a certificate name: with TLS, node ids are DNS names \
                                 (letters, digits, hyphens, dots)",
                                node.id
                            ),
                        ));
                    }
                }
                Ok(Security::Tls {
                    ca: base.join(ca),
                    cert: base.join(cert),
                    key: base.join(key),
                })
            }
            (false, ..) => Err(invalid(
                path,
                "tls",
                "needs ca, cert and key (make them with `weft certs --topology FILE --out DIR`), \
                 or insecure = true for plain text on a network you trust",
            )),
        }
    }
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
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    pub node: NodeId,
    pub topology: Topology,
    pub database: Database,
    pub listen: String,
    pub dial: std::collections::BTreeMap<NodeId, String>,
    pub replication: ReplicationConfig,
    pub tables: Vec<TableConfig>,
    pub security: Security,
    /// librdkafka settings of the `[kafka]` section.
    pub kafka: std::collections::BTreeMap<String, String>,
    /// The operations endpoints, if configured.
    pub http: Option<HttpConfig>,
}

impl ReplicationConfig {
    /// Checks the tuning values, without IO.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let r = self;
        if r.batch_max_events == 0
            || r.window == 0
            || r.poll_ms == 0
            || r.heartbeat_ms == 0
            || r.snapshot_page_rows == 0
            || r.max_message_mib == 0
            || r.max_connections == 0
            || r.max_connections_per_address == 0
            || r.max_handshakes == 0
            || r.max_handshakes_per_address == 0
            || r.max_streams_per_connection == 0
            || r.opens_per_address_per_sec == 0
            || r.max_dead_letters_per_cause == 0
        {
            return Err(invalid(
                path,
                "replication",
                "batch_max_events, window, poll_ms, heartbeat_ms, snapshot_page_rows, max_message_mib, max_connections, \
                 max_connections_per_address, max_handshakes, max_handshakes_per_address, max_streams_per_connection, opens_per_address_per_sec and max_dead_letters_per_cause must be > 0",
            ));
        }
        if r.peer_timeout_ms <= r.heartbeat_ms {
            return Err(invalid(
                path,
                "replication.peer_timeout_ms",
                "must be greater than heartbeat_ms",
            ));
        }
        Ok(())
    }
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
        let mut config = Self::resolve(
            NodeConfigFile {
                database,
                ..file.clone()
            },
            topology,
            path,
        )?;
        config.security = Security::resolve(file.tls.as_ref(), base, &config.topology, path)?;
        if let Some(http) = &mut config.http {
            http.token_file = http.token_file.as_ref().map(|f| base.join(f));
            http.console_token_file = http.console_token_file.as_ref().map(|f| base.join(f));
        }
        Ok(config)
    }

    /// Validates a parsed file against its topology.
    pub fn resolve(mut file: NodeConfigFile, topology: Topology, path: &Path) -> Result<Self, ConfigError> {
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
            table.validate(i, &topology, path)?;
            if !names.insert(table.name.as_str()) {
                return Err(invalid(
                    path,
                    format!("tables[{i}].name"),
                    format!("`{}` listed twice", table.name),
                ));
            }
        }
        file.replication.validate(path)?;
        for peer in file.dial.keys() {
            if topology.node(peer).is_none() || *peer == file.node {
                return Err(invalid(path, format!("dial.{peer}"), "is not a peer in the topology"));
            }
        }
        if let Some(key) = file
            .kafka
            .settings
            .keys()
            .find(|k| KAFKA_RESERVED.contains(&k.as_str()))
        {
            return Err(invalid(
                path,
                format!("kafka.settings.{key}"),
                "is set by weft (the brokers come from the topology's [kafka], the record sizes from [replication] \
                 max_message_mib; the rest carries its guarantees); remove it",
            ));
        }
        if topology.uses_kafka() && file.replication.max_message_mib > KAFKA_MAX_MESSAGE_MIB {
            return Err(invalid(
                path,
                "replication.max_message_mib",
                format!(
                    "is {}, more than a Kafka record can hold (librdkafka stops at 1,000,000,000 bytes): at most \
                     {KAFKA_MAX_MESSAGE_MIB} on a mesh with Kafka links or [kafka] changes",
                    file.replication.max_message_mib
                ),
            ));
        }
        let http = resolve_http(file.http.as_ref(), path)?;
        let mut regions: Vec<String> = topology.nodes.iter().map(|n| n.region.clone()).collect();
        regions.sort();
        regions.dedup();
        for table in file.tables.iter_mut().filter(|t| t.strategy == Strategy::Ownership) {
            table.mesh_regions = regions.clone();
        }
        Ok(Self {
            http,
            kafka: file.kafka.settings.clone(),
            dial: file.dial.clone(),
            listen: file.listen.clone().unwrap_or_else(|| spec.address.clone()),
            node: file.node,
            database,
            replication: file.replication,
            security: Security::resolve(file.tls.as_ref(), Path::new("."), &topology, path)?,
            topology,
            tables: file.tables,
        })
    }

    /// The address to dial for a peer.
    pub fn address_of<'a>(&'a self, peer: &'a NodeSpec) -> &'a str {
        self.dial.get(&peer.id).map(String::as_str).unwrap_or(&peer.address)
    }

    /// Whether this node relays around failed links: all-to-all with `relay_after_ms` on.
    pub fn relay_repair(&self) -> bool {
        self.topology.shape == Shape::AllToAll && self.replication.relay_after().is_some()
    }

    pub fn region(&self) -> &str {
        &self.topology.node(&self.node).expect("validated").region
    }
}

/// The `[http]` section, checked.
fn resolve_http(file: Option<&HttpFile>, path: &Path) -> Result<Option<HttpConfig>, ConfigError> {
    let http = match file {
        None => None,
        Some(h) => Some(HttpConfig {
            listen: h.listen.parse().map_err(|e| {
                invalid(
                    path,
                    "http.listen",
                    format!(
                        "`{}` is not a host:port address ({e}); write for example \"0.0.0.0:9464\"",
                        h.listen
                    ),
                )
            })?,
            ready_max_lag: Duration::from_secs(h.ready_max_lag_secs),
            token_file: h.token_file.clone(),
            console: h.console,
            console_token_file: h.console_token_file.clone(),
        }),
    };
    if let Some(h) = file.filter(|h| h.console && h.console_token_file.is_none()) {
        return Err(invalid(
            path,
            "http.console",
            format!(
                "the console on {} resolves conflicts and acts on dead letters, so it needs a token of its own: set http.console_token_file to a file holding one (not the scrape token)",
                h.listen
            ),
        ));
    }
    if let Some(h) = file.filter(|h| h.console_token_file.is_some() && h.console_token_file == h.token_file) {
        return Err(invalid(
            path,
            "http.console_token_file",
            format!(
                "is the scrape token's file ({}): whoever can scrape /metrics could then resolve conflicts and act on dead letters; give the console a token of its own",
                h.token_file
                    .as_ref()
                    .map(|f| f.display().to_string())
                    .unwrap_or_default()
            ),
        ));
    }
    Ok(http)
}
