//! `weft audit`: compares every replicated table between all the nodes of a mesh over the
//! transport, without copying the tables, and finds the rows that differ for good.
//!
//! Serving ([`answer`]): a node answers three questions about one table (`store::checksum`):
//! the digests of some nodes of its checksum tree (built once per audit and table, from one
//! consistent view, and kept a few minutes), the keys of some buckets with their digests,
//! and some rows in full with a watermark (its frontiers after reading them).
//!
//! Auditing ([`Audit::run`]), per table: compare the roots; where they differ, descend level
//! by level into the children that differ (a Merkle descent), down to the buckets; list the
//! keys of the differing buckets; those whose digests differ are candidates. Writes go on
//! meanwhile, so a candidate is only reported once it is confirmed: read the candidates on
//! every node, wait until every node has applied everything every other had at that read
//! (the watermarks), read them again. A row equal everywhere the second time was in flight;
//! a row unchanged on every node between the two reads, yet different, differs for good; a
//! row that changed is read again in the next round (at most [`Options::rounds`]), and
//! reported as unsettled if it never stops changing. Nothing a region does while the audit
//! runs can make it report a difference that replication is still carrying.
//!
//! Before the descent the auditor asks every node for the table's columns and compares only
//! those every node has (the others are named in the table's note): a column one region added
//! (or dropped) ahead of the others during a rolling migration is no difference.
//!
//! A node that holds a dead letter of a key (an event of the row it has not applied: it waits
//! for a column, a parent row, a fix) does not know the row; it takes no part in deciding it.
//! Where the other nodes agree, the row is reported as waiting, never as a difference, and
//! `--repair` leaves it alone: the letter applies once its cause is fixed.
//!
//! The winner of a differing row ([`decide`]): the rows that agree with their own metadata
//! first (a row changed behind weft's back disagrees: it was edited in place, so it no
//! longer matches the digest its metadata recorded of the image weft last wrote, or it
//! vanished while its metadata says live, or appeared without metadata); among them the
//! newest version; where versions are concurrent, the greatest (hlc, origin) as under `lww`;
//! where one version holds different images, the image most nodes hold, or `--prefer`'s. `--repair` writes the
//! winner on the auditing node as a change whose version covers every node's, which then
//! replicates as any newer write does (`store::admin::Repair`).
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::{Request, Status};

use super::Context;
use crate::config::NodeConfig;
use crate::event::{Key, NodeId, Op};
use crate::store::StoreError;
use crate::store::checksum::{AuditRow, FANOUT, LEVELS, Sum, Tree};
use crate::version::VersionVector;
use crate::wire::{self, PROTOCOL, proto};
use proto::audit_request::Ask;
use proto::replication_client::ReplicationClient;
pub use winner::decide;

mod winner;

/// How long a node keeps a tree it built for an audit.
const KEEP_TREE: Duration = Duration::from_secs(600);
/// Trees a node keeps at most (the oldest goes first).
const MAX_TREES: usize = 32;
/// Buckets and rows asked for per request.
const BUCKETS_PER_ASK: usize = 4_096;
const ROWS_PER_ASK: usize = 1_000;

/// A tree as a node keeps it: when it was built, and the tree.
type Kept = (Instant, std::sync::Arc<Tree>);

/// Trees built for audits in progress, by (audit, table).
#[derive(Default)]
pub struct Trees(std::sync::Mutex<BTreeMap<(String, String), Kept>>);

impl Trees {
    fn get(&self, audit: &str, table: &str) -> Option<std::sync::Arc<Tree>> {
        let mut trees = self.0.lock().expect("tree cache lock");
        trees.retain(|_, (built, _)| built.elapsed() < KEEP_TREE);
        trees
            .get(&(audit.to_owned(), table.to_owned()))
            .map(|(_, tree)| tree.clone())
    }

    fn put(&self, audit: &str, table: &str, tree: std::sync::Arc<Tree>) {
        let mut trees = self.0.lock().expect("tree cache lock");
        while trees.len() >= MAX_TREES {
            let oldest = trees
                .iter()
                .min_by_key(|(_, (built, _))| *built)
                .map(|(k, _)| k.clone());
            trees.remove(&oldest.expect("not empty"));
        }
        trees.insert((audit.to_owned(), table.to_owned()), (Instant::now(), tree));
    }
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Refused(message) => Status::failed_precondition(message),
        other => Status::unavailable(other.to_string()),
    }
}

/// Answers one audit request (see the module doc).
pub async fn answer(
    ctx: &Context,
    trees: &Trees,
    extensions: &tonic::Extensions,
    request: proto::AuditRequest,
) -> Result<proto::AuditReply, Status> {
    let hello = request.hello.unwrap_or_default();
    super::tls::check_peer(extensions, &hello.node_id, ctx.insecure())?;
    let topology = &ctx.config.topology;
    if hello.protocol != PROTOCOL || hello.mesh != topology.mesh || topology.node(&hello.node_id).is_none() {
        return Err(Status::permission_denied(format!(
            "an audit request from `{}` of mesh `{}` (protocol {}): only nodes of mesh `{}` (protocol {PROTOCOL}) may audit",
            hello.node_id, hello.mesh, hello.protocol, topology.mesh
        )));
    }
    let store = &ctx.store;
    let table = request.table;
    let compared = (!request.columns.is_empty()).then_some(request.columns.as_slice());
    let mut reply = proto::AuditReply::default();
    match request.ask {
        Some(Ask::Shape(_)) => reply.columns = store.audit_shape(&table).map_err(store_status)?,
        Some(Ask::Tree(ask)) => {
            let tree = match trees.get(&request.audit, &table) {
                Some(tree) => tree,
                None => {
                    let tree = store.audit_tree(&table, compared).await.map_err(store_status)?;
                    let tree = std::sync::Arc::new(tree);
                    trees.put(&request.audit, &table, tree.clone());
                    tree
                }
            };
            reply.rows_read = tree.rows;
            for index in ask.nodes {
                let sum = tree
                    .node(ask.level, index)
                    .ok_or_else(|| Status::invalid_argument(format!("no tree node {index} at level {}", ask.level)))?;
                reply.digests.push(sum.to_be_bytes().to_vec());
            }
        }
        Some(Ask::Buckets(ask)) => {
            let buckets: BTreeSet<u32> = ask.buckets.into_iter().collect();
            for (key, sum) in store
                .audit_keys(&table, &buckets, compared)
                .await
                .map_err(store_status)?
            {
                reply.keys.push(proto::AuditKey {
                    key,
                    digest: sum.to_be_bytes().to_vec(),
                });
            }
        }
        Some(Ask::Rows(ask)) => {
            let (rows, watermark) = store
                .audit_rows(&table, &ask.keys, compared)
                .await
                .map_err(store_status)?;
            reply.rows = rows.iter().map(wire::audit_row_to_proto).collect();
            reply.watermark = wire::frontiers_to_proto(&watermark);
            let floor = store.purge_floor().await.map_err(store_status)?;
            reply.purge_floor = wire::vector_to_proto(&floor);
        }
        None => return Err(Status::invalid_argument("an audit request must ask something")),
    }
    Ok(reply)
}

/// How an audit runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The node whose row wins where nothing else decides.
    pub prefer: Option<NodeId>,
    /// Confirmation rounds for rows that keep changing.
    pub rounds: usize,
    /// How long to wait for the nodes to catch up with each other's watermarks.
    pub settle: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            prefer: None,
            rounds: 5,
            settle: Duration::from_secs(60),
        }
    }
}

/// The winning version of a differing row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Winner {
    pub node: NodeId,
    #[serde(skip)]
    pub op: Op,
    #[serde(skip)]
    pub floor: VersionVector,
    pub why: String,
}

/// One node's row as the audit saw it, for printing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Seen {
    pub node: NodeId,
    /// The version vector as JSON, or none.
    pub version: Option<String>,
    pub deleted: bool,
    /// The row as JSON, or none.
    pub row: Option<serde_json::Value>,
    /// Whether the row agrees with its metadata.
    pub consistent: bool,
    /// The node holds a dead letter of the key: it does not know the row.
    pub waiting: bool,
}

/// A row some nodes lack only because they hold a dead letter of it; the others agree.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Waiting {
    pub key: String,
    /// The nodes holding the letters (`weft dead-letters list` there says why).
    pub nodes: Vec<NodeId>,
}

/// A row that differs for good.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    pub table: String,
    pub key: String,
    #[serde(skip)]
    pub key_bytes: Vec<u8>,
    pub seen: Vec<Seen>,
    /// The winner, or why none could be chosen.
    pub winner: Result<Winner, String>,
    /// After `--repair`: whether the winner was written, or why not.
    pub repaired: Option<Result<(), String>>,
}

/// One table's audit.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TableReport {
    pub table: String,
    /// Rows each node read for its tree (metadata entries plus table rows).
    pub rows_read: BTreeMap<NodeId, u64>,
    /// Keys whose digests differed at the first look.
    pub candidates: usize,
    pub differing: Vec<Finding>,
    /// Keys that kept changing through every round, or whose nodes did not catch up.
    pub unsettled: Vec<String>,
    /// Rows that wait on dead letters (see the module doc).
    pub waiting: Vec<Waiting>,
    /// Columns some nodes' tables have and others lack: left out of the comparison.
    pub not_compared: Vec<String>,
    pub note: Option<String>,
}

/// What an audit found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub audit: String,
    pub nodes: Vec<NodeId>,
    pub tables: Vec<TableReport>,
    /// Requests made and reply bytes received, over all nodes.
    pub requests: u64,
    pub reply_bytes: u64,
    pub elapsed_ms: u64,
}

impl Report {
    pub fn differing(&self) -> usize {
        self.tables.iter().map(|t| t.differing.len()).sum()
    }

    pub fn unsettled(&self) -> usize {
        self.tables.iter().map(|t| t.unsettled.len()).sum()
    }

    pub fn waiting(&self) -> usize {
        self.tables.iter().map(|t| t.waiting.len()).sum()
    }
}

/// What a background audit found, as `weft status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub audit: String,
    pub at_micros: i64,
    pub nodes: Vec<NodeId>,
    pub rows_read: u64,
    pub differing: usize,
    pub unsettled: usize,
    pub waiting: usize,
    /// The first differing rows, as `table key`.
    pub keys: Vec<String>,
    pub elapsed_ms: u64,
}

impl Report {
    pub fn summary(&self) -> Summary {
        Summary {
            audit: self.audit.clone(),
            at_micros: crate::clock::now_micros(),
            nodes: self.nodes.clone(),
            rows_read: self.tables.iter().flat_map(|t| t.rows_read.values()).sum(),
            differing: self.differing(),
            unsettled: self.unsettled(),
            waiting: self.waiting(),
            keys: self
                .tables
                .iter()
                .flat_map(|t| t.differing.iter())
                .take(20)
                .map(|f| format!("{} {}", f.table, f.key))
                .collect(),
            elapsed_ms: self.elapsed_ms,
        }
    }
}

/// Why an audit could not run.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot reach {node} at {address} for the audit: {reason}; every node's sidecar must be running")]
    Connect {
        node: NodeId,
        address: String,
        reason: String,
    },
    #[error("{node} refused an audit request about {table}: {status}")]
    Refused {
        node: NodeId,
        table: String,
        status: Status,
    },
    #[error("{node} sent an audit reply that does not decode: {what}")]
    Garbled { node: NodeId, what: String },
}

struct Peer {
    id: NodeId,
    client: ReplicationClient<Channel>,
}

/// One audit of a mesh, run from one node's configuration.
pub struct Audit {
    config: NodeConfig,
    options: Options,
    peers: Vec<Peer>,
    report: Report,
    /// The columns compared in the table being audited (empty: all).
    compared: Vec<String>,
}

/// Per node: the rows read, its watermark and its purge floor.
type Rows = Vec<(BTreeMap<Vec<u8>, AuditRow>, BTreeMap<NodeId, u64>, VersionVector)>;

impl Audit {
    /// Connects to every node of the mesh, this one included.
    pub async fn connect(config: NodeConfig, options: Options) -> Result<Self, AuditError> {
        let mut peers = Vec::new();
        for spec in &config.topology.nodes {
            let address = config.address_of(spec).to_owned();
            let connect = |reason: String| AuditError::Connect {
                node: spec.id.clone(),
                address: address.clone(),
                reason,
            };
            let channel = super::tls::endpoint(&config.security, &spec.id, &address)
                .map_err(connect)?
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .map_err(|e| connect(super::tls::chain(&e)))?;
            let limit = config.replication.max_message_bytes();
            let client = ReplicationClient::new(channel)
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit);
            peers.push(Peer {
                id: spec.id.clone(),
                client,
            });
        }
        let audit = format!("{}-{:x}", config.node, crate::clock::now_micros());
        let report = Report {
            audit,
            nodes: peers.iter().map(|p| p.id.clone()).collect(),
            ..Report::default()
        };
        Ok(Self {
            config,
            options,
            peers,
            report,
            compared: Vec::new(),
        })
    }

    /// Audits every replicated table.
    pub async fn run(mut self) -> Result<Report, AuditError> {
        let started = Instant::now();
        let tables: Vec<String> = self.config.tables.iter().map(|t| t.name.clone()).collect();
        let count = tables.len();
        for (i, table) in tables.into_iter().enumerate() {
            let at = Instant::now();
            let report = self.table(&table).await?;
            // A long audit shows how far it is.
            let rows: u64 = report.rows_read.values().sum();
            tracing::info!(
                audit = %self.report.audit,
                %table,
                done = format!("{}/{count}", i + 1),
                rows,
                differing = report.differing.len(),
                ms = at.elapsed().as_millis() as u64,
                "audited a table"
            );
            self.report.tables.push(report);
        }
        self.report.elapsed_ms = started.elapsed().as_millis() as u64;
        Ok(self.report)
    }

    async fn ask(&mut self, i: usize, table: &str, ask: Ask) -> Result<proto::AuditReply, AuditError> {
        let request = proto::AuditRequest {
            hello: Some(proto::Hello {
                protocol: PROTOCOL,
                node_id: self.config.node.clone(),
                region: self.config.region().to_owned(),
                mesh: self.config.topology.mesh.clone(),
                knows_of_you: 0,
            }),
            audit: self.report.audit.clone(),
            table: table.to_owned(),
            ask: Some(ask),
            columns: self.compared.clone(),
        };
        let peer = &mut self.peers[i];
        let reply = peer
            .client
            .audit(Request::new(request))
            .await
            .map_err(|status| AuditError::Refused {
                node: peer.id.clone(),
                table: table.to_owned(),
                status,
            })?
            .into_inner();
        self.report.requests += 1;
        self.report.reply_bytes += prost::Message::encoded_len(&reply) as u64;
        Ok(reply)
    }

    fn garbled(&self, i: usize, what: impl Into<String>) -> AuditError {
        AuditError::Garbled {
            node: self.peers[i].id.clone(),
            what: what.into(),
        }
    }

    fn sum(&self, i: usize, bytes: &[u8]) -> Result<Sum, AuditError> {
        let bytes: [u8; 16] = bytes
            .try_into()
            .map_err(|_| self.garbled(i, "a digest is not 16 bytes"))?;
        Ok(Sum::from_be_bytes(bytes))
    }

    async fn table(&mut self, table: &str) -> Result<TableReport, AuditError> {
        let mut report = TableReport {
            table: table.to_owned(),
            ..TableReport::default()
        };
        self.shape(table, &mut report).await?;
        let candidates = self.candidates(table, &mut report).await?;
        report.candidates = candidates.len();
        if !candidates.is_empty() {
            self.confirm(table, candidates, &mut report).await?;
        }
        Ok(report)
    }

    /// Asks every node for the table's columns; compares those all of them have.
    async fn shape(&mut self, table: &str, report: &mut TableReport) -> Result<(), AuditError> {
        self.compared.clear();
        let mut shapes = Vec::new();
        for i in 0..self.peers.len() {
            shapes.push(self.ask(i, table, Ask::Shape(proto::AuditShapeAsk {})).await?.columns);
        }
        let Some(first) = shapes.first() else { return Ok(()) };
        let common: Vec<String> = first
            .iter()
            .filter(|c| shapes.iter().all(|s| s.contains(c)))
            .cloned()
            .collect();
        let mut others: BTreeSet<String> = shapes.iter().flatten().cloned().collect();
        others.retain(|c| !common.contains(c));
        if !others.is_empty() {
            let at = |column: &String| {
                self.peers
                    .iter()
                    .zip(&shapes)
                    .filter(|(_, s)| s.contains(column))
                    .map(|(p, _)| p.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let named: Vec<String> = others.iter().map(|c| format!("{c} (only at {})", at(c))).collect();
            tracing::info!(%table, columns = %named.join("; "), "compared without the columns not every node has");
            report.not_compared = others.into_iter().collect();
            self.compared = common;
        }
        Ok(())
    }

    /// The Merkle descent: the keys whose digests differ between nodes.
    async fn candidates(&mut self, table: &str, report: &mut TableReport) -> Result<Vec<Vec<u8>>, AuditError> {
        let mut nodes = vec![0u32];
        for level in 0..=LEVELS {
            let mut sums = Vec::new();
            for i in 0..self.peers.len() {
                let ask = Ask::Tree(proto::AuditTreeAsk {
                    level,
                    nodes: nodes.clone(),
                });
                let reply = self.ask(i, table, ask).await?;
                if reply.digests.len() != nodes.len() {
                    return Err(self.garbled(i, "a tree reply with the wrong number of digests"));
                }
                if level == 0 {
                    report.rows_read.insert(self.peers[i].id.clone(), reply.rows_read);
                }
                let digests = reply
                    .digests
                    .iter()
                    .map(|d| self.sum(i, d))
                    .collect::<Result<Vec<_>, _>>()?;
                sums.push(digests);
            }
            let differ: Vec<u32> = (0..nodes.len())
                .filter(|&n| sums.iter().any(|s| s[n] != sums[0][n]))
                .map(|n| nodes[n])
                .collect();
            if differ.is_empty() {
                return Ok(Vec::new());
            }
            nodes = match level == LEVELS {
                true => differ,
                false => differ.iter().flat_map(|n| n * FANOUT..(n + 1) * FANOUT).collect(),
            };
        }
        let mut keys: BTreeMap<Vec<u8>, Vec<Option<Sum>>> = BTreeMap::new();
        let count = self.peers.len();
        for chunk in nodes.chunks(BUCKETS_PER_ASK) {
            for i in 0..count {
                let ask = Ask::Buckets(proto::AuditBucketsAsk {
                    buckets: chunk.to_vec(),
                });
                for entry in self.ask(i, table, ask).await?.keys {
                    let sum = self.sum(i, &entry.digest)?;
                    keys.entry(entry.key).or_insert_with(|| vec![None; count])[i] = Some(sum);
                }
            }
        }
        Ok(keys
            .into_iter()
            .filter(|(_, sums)| sums.iter().any(|s| *s != sums[0]))
            .map(|(key, _)| key)
            .collect())
    }

    /// Every node's rows `keys`, with its watermark.
    async fn rows(&mut self, table: &str, keys: &[Vec<u8>]) -> Result<Rows, AuditError> {
        let mut out = Vec::new();
        for i in 0..self.peers.len() {
            let mut rows = BTreeMap::new();
            let mut watermark = BTreeMap::new();
            let mut floor = VersionVector::new();
            for chunk in keys.chunks(ROWS_PER_ASK) {
                let ask = Ask::Rows(proto::AuditRowsAsk { keys: chunk.to_vec() });
                let reply = self.ask(i, table, ask).await?;
                for row in reply.rows {
                    let row = wire::audit_row_from_proto(row).map_err(|what| self.garbled(i, what))?;
                    rows.insert(row.key.clone(), row);
                }
                watermark = wire::frontiers_from_proto(reply.watermark);
                floor = wire::vector_from_proto(&reply.purge_floor);
            }
            out.push((rows, watermark, floor));
        }
        Ok(out)
    }

    /// Waits until every node has applied what every other had at `watermarks`; `Err`
    /// names a node that did not within the settle time.
    async fn settle(
        &mut self,
        table: &str,
        watermarks: &[BTreeMap<NodeId, u64>],
    ) -> Result<Result<(), String>, AuditError> {
        let deadline = Instant::now() + self.options.settle;
        let known: BTreeSet<NodeId> = self.config.topology.nodes.iter().map(|n| n.id.clone()).collect();
        loop {
            let mut behind = None;
            for j in 0..self.peers.len() {
                let now = self.ask(j, table, Ask::Rows(proto::AuditRowsAsk::default())).await?;
                let has = wire::frontiers_from_proto(now.watermark);
                let me = self.peers[j].id.clone();
                let lag = watermarks.iter().flat_map(|w| w.iter()).find(|(origin, seq)| {
                    **origin != me && known.contains(*origin) && has.get(*origin).copied().unwrap_or(0) < **seq
                });
                if let Some((origin, seq)) = lag {
                    behind = Some(format!("{me} has not applied {origin}'s events up to {seq}"));
                    break;
                }
            }
            let Some(why) = behind else { return Ok(Ok(())) };
            if Instant::now() > deadline {
                return Ok(Err(format!(
                    "{why} after {:?}: rows in flight cannot be told from differences",
                    self.options.settle
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The confirmation rounds (see the module doc).
    async fn confirm(
        &mut self,
        table: &str,
        candidates: Vec<Vec<u8>>,
        report: &mut TableReport,
    ) -> Result<(), AuditError> {
        let mut pending = candidates;
        for _ in 0..self.options.rounds {
            if pending.is_empty() {
                break;
            }
            let first = self.rows(table, &pending).await?;
            let watermarks: Vec<_> = first.iter().map(|(_, w, _)| w.clone()).collect();
            if let Err(why) = self.settle(table, &watermarks).await? {
                report.note = Some(why);
                break;
            }
            let second = self.rows(table, &pending).await?;
            let mut next = Vec::new();
            for key in pending {
                let now: Vec<AuditRow> = second.iter().map(|(rows, _, _)| row_of(rows, &key)).collect();
                if now.iter().all(|r| r.digest() == now[0].digest()) {
                    continue;
                }
                let unchanged = first
                    .iter()
                    .zip(&now)
                    .all(|((rows, _, _), row)| row_of(rows, &key).digest() == row.digest());
                if !unchanged {
                    next.push(key);
                    continue;
                }
                let rows: Vec<(NodeId, AuditRow)> = self.peers.iter().map(|p| p.id.clone()).zip(now).collect();
                let knowing: Vec<&AuditRow> = rows.iter().filter(|(_, r)| !r.waiting).map(|(_, r)| r).collect();
                if knowing.iter().all(|r| r.digest() == knowing[0].digest()) {
                    report.waiting.push(Waiting {
                        key: key_text(&key),
                        nodes: rows.iter().filter(|(_, r)| r.waiting).map(|(n, _)| n.clone()).collect(),
                    });
                    continue;
                }
                let floors: Vec<VersionVector> = second.iter().map(|(_, _, f)| f.clone()).collect();
                report
                    .differing
                    .push(finding(table, &key, rows, &floors, self.options.prefer.as_deref()));
            }
            pending = next;
        }
        report.unsettled = pending.iter().map(|k| key_text(k)).collect();
        Ok(())
    }
}

/// Writes the winner of every finding of `report` on this node (`config`'s database),
/// logging each row it changes; a row that cannot be repaired says why in its finding.
pub async fn repair(config: &NodeConfig, report: &mut Report) -> Result<(), StoreError> {
    let admin = crate::store::admin::Admin::open(config.clone()).await?;
    for finding in report.tables.iter_mut().flat_map(|t| t.differing.iter_mut()) {
        let winner = match &finding.winner {
            Ok(winner) => winner,
            Err(why) => {
                finding.repaired = Some(Err(format!("no winner: {why}")));
                continue;
            }
        };
        let key = Key::from_bytes(&finding.key_bytes).map_err(StoreError::Corrupt)?;
        let repair = crate::store::admin::Repair {
            table: finding.table.clone(),
            key,
            op: winner.op.clone(),
            floor: winner.floor.clone(),
        };
        let result = admin.repair(&repair).await;
        match &result {
            Ok(()) => tracing::info!(
                table = %finding.table, key = %finding.key, from = %winner.node, why = %winner.why,
                "audit repair: re-emitted the winning version"
            ),
            Err(error) => tracing::warn!(table = %finding.table, key = %finding.key, %error, "audit repair failed"),
        }
        finding.repaired = Some(result.map_err(|e| e.to_string()));
    }
    Ok(())
}

fn row_of(rows: &BTreeMap<Vec<u8>, AuditRow>, key: &[u8]) -> AuditRow {
    rows.get(key).cloned().unwrap_or(AuditRow {
        key: key.to_vec(),
        version: None,
        image: None,
        waiting: false,
        edited: false,
    })
}

fn key_text(key: &[u8]) -> String {
    Key::from_bytes(key).map_or_else(|_| format!("{key:02x?}"), |k| k.to_string())
}

fn finding(
    table: &str,
    key: &[u8],
    rows: Vec<(NodeId, AuditRow)>,
    floors: &[VersionVector],
    prefer: Option<&str>,
) -> Finding {
    let seen = rows
        .iter()
        .map(|(node, row)| Seen {
            node: node.clone(),
            version: row.version.as_ref().map(|v| v.version.to_json()),
            deleted: row.version.as_ref().is_some_and(|v| v.deleted),
            row: row.image.as_ref().map(|r| r.to_json()),
            consistent: row.consistent(),
            waiting: row.waiting,
        })
        .collect();
    // A node waiting on a dead letter of the row does not know it: the others decide.
    let (rows, floors): (Vec<_>, Vec<_>) = rows
        .into_iter()
        .zip(floors.iter().cloned())
        .filter(|((_, row), _)| !row.waiting)
        .unzip();
    Finding {
        table: table.to_owned(),
        key: key_text(key),
        key_bytes: key.to_vec(),
        seen,
        winner: decide(&rows, &floors, prefer),
        repaired: None,
    }
}
