//! A running sidecar: the only module that spawns tasks.
//!
//! `Node::start` opens the store (installing schema and triggers), binds the listener and
//! spawns: the gRPC server (receiving; and snapshots and audits for every link), one feeder
//! per downstream peer on a gRPC link (sending), the Kafka tasks of its Kafka links
//! (`transport::kafka`: publisher, receipt readers, history check, a reader per upstream
//! peer), the capture
//! loop (drains the outbox whenever another connection commits, once a peer's Welcome has
//! confirmed that this database did not go back in time), upkeep (persists
//! acknowledgements, trims the log (never what a Kafka topic of the node lacks), retries due
//! dead letters every 5 s, logs a status line),
//! and the join loop (re-seeds by snapshot when a peer says this node cannot catch up). `Node::stop` is graceful: one shutdown
//! signal, a final drain, feeders wait briefly for outstanding acks, then the store closes.
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::NodeConfig;
use crate::config::Security;
use crate::config::Transport;
use crate::event::Identity;
use crate::event::NodeId;
use crate::shutdown::stopped;
use crate::store::Store;
use crate::store::StoreError;
use crate::store::backend::Ack;
use crate::telemetry::Metrics;
use crate::topology;
use crate::transport::grpc::{self, ReplicationServer, Service};
use crate::transport::tls::{Paths, ServerTls};
use crate::transport::{Context, Heard};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {address}: {source}; is another weft running there?")]
    Listen { address: String, source: std::io::Error },
    #[error("{0}")]
    Tls(#[from] crate::transport::tls::TlsError),
    #[error(
        "{0} has no [tls] section: add one with ca, cert and key (`weft certs --topology FILE --out DIR` \
         makes them), or `insecure = true` under [tls] to run in plain text on a network you trust"
    )]
    NoSecurity(String),
    #[error(
        "the topology asks for Kafka ({0}), but this weft was built without Kafka: build it with \
         `--features kafka` (on by default), or make the link grpc"
    )]
    NoKafka(String),
    #[error("[http] token file {path}: {source}; write the token into it, or remove the setting")]
    Token {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("[http] {0}")]
    SameToken(String),
}

/// A token file's content, without surrounding whitespace.
fn read_token(path: &std::path::Path) -> Result<Arc<str>, NodeError> {
    let text = std::fs::read_to_string(path).map_err(|source| NodeError::Token {
        path: path.to_owned(),
        source,
    })?;
    Ok(Arc::from(text.trim()))
}

pub struct Node {
    pub config: Arc<NodeConfig>,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub listen: SocketAddr,
    /// Where the operations endpoints listen (`[http]`), if they are on.
    pub http: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    fatal: watch::Sender<Option<String>>,
    tls: Option<Arc<ServerTls>>,
}

impl Node {
    pub async fn start(config: NodeConfig) -> Result<Self, NodeError> {
        Self::start_with_metrics(config, Arc::new(Metrics::default())).await
    }

    /// Like `start`, adding to existing figures (a restarted region keeps its history).
    pub async fn start_with_metrics(config: NodeConfig, metrics: Arc<Metrics>) -> Result<Self, NodeError> {
        let config = Arc::new(config);
        let tls = server_tls(&config)?;
        let (store, removed) = open_store(&config).await?;
        let removed = Arc::new(removed);
        // The probes' port first: once the replication port accepts, so does it (a
        // supervisor or a test that waits for the one may ask the other at once).
        let http_listener = match &config.http {
            Some(http) => Some(bind(&http.listen.to_string()).await?),
            None => None,
        };
        let (listener, listen) = bind(&config.listen).await?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (log_grew, _) = watch::channel(store.last_seq().await);
        let (fatal, _) = watch::channel(None);
        let (join_requests, join_requests_rx) = tokio::sync::mpsc::channel(16);
        let alone = topology::downstream(&config.topology, &config.node).is_empty();
        let ctx = Context {
            verified: watch::channel(alone).0,
            removed,
            history: Arc::new(std::sync::Mutex::new(crate::transport::history::Gate::new(
                grpc_peers(&config),
                tokio::time::Instant::now(),
                config.replication.history_wait(),
            ))),
            joining: watch::channel(None).0,
            join_requests,
            config: config.clone(),
            store: store.clone(),
            observer: metrics.clone(),
            log_grew,
            acks: Default::default(),
            heard: Arc::new(Heard::new(tokio::time::Instant::now())),
            behind: Arc::default(),
            fatal: fatal.clone(),
            shutdown: shutdown_rx.clone(),
            reports: Arc::default(),
            refusals: Arc::default(),
            gate: crate::transport::limits::Gate::new(crate::transport::limits::Limits::of(&config.replication)),
            catch_ups: Arc::default(),
        };
        let mut tasks = JoinSet::new();
        let http = start_http(&mut tasks, &ctx, &metrics, http_listener).await?;
        tasks.spawn(serve(ctx.clone(), listener, tls.clone()));
        if let Some(tls) = tls.clone() {
            tasks.spawn(watch_certificates(tls, shutdown_rx.clone()));
        }
        let me = &config.node;
        let on = |peer: &&crate::config::NodeSpec, transport| config.topology.link_transport(me, &peer.id) == transport;
        let downstream = topology::downstream(&config.topology, me);
        for peer in downstream.iter().filter(|p| on(p, Transport::Grpc)) {
            tasks.spawn(grpc::feed_peer(ctx.clone(), (*peer).clone()));
        }
        let kafka_out: Vec<NodeId> = (downstream.iter().filter(|p| on(p, Transport::Kafka)))
            .map(|p| p.id.clone())
            .collect();
        let kafka_in: Vec<NodeId> = (topology::upstream(&config.topology, me).iter())
            .filter(|p| on(p, Transport::Kafka))
            .map(|p| p.id.clone())
            .collect();
        start_kafka(&mut tasks, &ctx, kafka_out, kafka_in)?;
        tasks.spawn(capture_loop(ctx.clone(), metrics.clone()));
        tasks.spawn(upkeep_loop(ctx.clone(), metrics.clone()));
        if let Some(every) = config.replication.audit_every() {
            tasks.spawn(audit_loop(ctx.clone(), metrics.clone(), every));
        }
        tasks.spawn(crate::transport::join::join_loop(ctx.clone(), join_requests_rx));
        tracing::info!(node = %config.node, %listen, peers = topology::downstream(&config.topology, &config.node).len(), "weft node started");
        Ok(Self {
            config,
            store,
            metrics,
            listen,
            http,
            shutdown,
            tasks,
            fatal,
            tls,
        })
    }

    /// Reads the TLS files again (SIGHUP); a set that does not load leaves the running one.
    pub fn reload_tls(&self) {
        let Some(tls) = &self.tls else { return };
        match tls.reload(true) {
            Ok(_) => tracing::info!("TLS certificate files reloaded; new connections use them"),
            Err(error) => {
                tracing::error!(%error, "the TLS certificate files do not load; still using the previous ones")
            }
        }
    }

    /// Resolves with the reason once the node must stop for something only an operator can
    /// fix (its database went back in time).
    pub async fn fatal(&self) -> String {
        let mut fatal = self.fatal.subscribe();
        loop {
            if let Some(reason) = fatal.borrow_and_update().clone() {
                return reason;
            }
            if fatal.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Graceful stop: final drain, outstanding acks awaited briefly, store closed.
    pub async fn stop(mut self) {
        self.shutdown.send_replace(true);
        let deadline = tokio::time::sleep(Duration::from_secs(10));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = self.tasks.join_next() => if next.is_none() { break },
                _ = &mut deadline => {
                    tracing::warn!("tasks did not stop in time; aborting them");
                    self.tasks.abort_all();
                    while self.tasks.join_next().await.is_some() {}
                    break;
                }
            }
        }
        if let Ok(store) = Arc::try_unwrap(self.store) {
            store.close().await;
        }
    }
}

/// The tasks of this node's Kafka links: publishing its log and reading the receipts of
/// the peers it sends to (`kafka_out`), and a reader per peer it receives from (`kafka_in`).
#[cfg(feature = "kafka")]
fn start_kafka(
    tasks: &mut JoinSet<()>,
    ctx: &crate::transport::Context,
    kafka_out: Vec<NodeId>,
    kafka_in: Vec<NodeId>,
) -> Result<(), NodeError> {
    use crate::transport::kafka;
    if !kafka_out.is_empty() {
        tasks.spawn(kafka::publish::publish_loop(ctx.clone(), kafka_out.clone()));
        tasks.spawn(kafka::acks::confirm_history(ctx.clone(), kafka_out.clone()));
        for peer in kafka_out {
            tasks.spawn(kafka::acks::watch_acks(ctx.clone(), peer));
        }
    }
    for peer in kafka_in {
        tasks.spawn(kafka::consume::consume_peer(ctx.clone(), peer));
    }
    if ctx.config.topology.kafka_changes() {
        tasks.spawn(kafka::publish::changes_loop(ctx.clone()));
    }
    Ok(())
}

#[cfg(not(feature = "kafka"))]
fn start_kafka(
    _: &mut JoinSet<()>,
    ctx: &crate::transport::Context,
    kafka_out: Vec<NodeId>,
    kafka_in: Vec<NodeId>,
) -> Result<(), NodeError> {
    match kafka_out.first().or(kafka_in.first()) {
        Some(peer) => Err(NodeError::NoKafka(format!(
            "the link between {} and {peer}",
            ctx.config.node
        ))),
        None if ctx.config.topology.kafka_changes() => Err(NodeError::NoKafka("[kafka] changes".into())),
        None => Ok(()),
    }
}

/// The peers this node exchanges with over gRPC, either way: those whose word the history
/// gate waits for.
fn grpc_peers(config: &NodeConfig) -> Vec<NodeId> {
    let (topology, me) = (&config.topology, &config.node);
    (topology::downstream(topology, me).into_iter())
        .chain(topology::upstream(topology, me))
        .filter(|peer| topology.link_transport(me, &peer.id) == Transport::Grpc)
        .map(|peer| peer.id.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Opens (installing if needed) the node's store, keeping the origins it relays, and logs
/// what the operator should know about its tables. Returns it with the origins taken out of
/// the topology that it holds events of (`topology::removed_origins`), which it keeps too.
async fn open_store(config: &NodeConfig) -> Result<(Arc<Store>, BTreeSet<NodeId>), NodeError> {
    let identity = Identity {
        node: config.node.clone(),
        region: config.region().to_owned(),
    };
    let store = Store::open(
        &config.database,
        identity,
        &config.tables,
        config.replication.max_clock_skew(),
    )
    .await?;
    let known = store.frontiers().await?;
    let removed = topology::removed_origins(&config.topology, &config.node, known.keys());
    for origin in &removed {
        tracing::info!(%origin, "{origin} is not in the topology any more: this node keeps its last events until every remaining node has them, and passes them on to those that lack them");
    }
    let mut kept = topology::kept_origins(&config.topology, &config.node, config.relay_repair());
    kept.extend(removed.iter().cloned());
    let store = store
        .relaying(kept)
        .bounding_dead_letters(config.replication.max_dead_letters_per_cause)
        .bounding_messages(config.replication.max_payload_bytes());
    for advice in store.advisories() {
        tracing::warn!("{advice}");
    }
    Ok((Arc::new(store), removed))
}

/// What `weft status` shows of the history gate while capture waits on it (kept in the
/// database, written when it changes and cleared once the history is confirmed).
struct HistoryNote(Option<String>);

impl HistoryNote {
    fn text(verdict: &crate::transport::history::Verdict) -> String {
        use crate::transport::history::Verdict;
        match verdict {
            Verdict::Waiting { unheard } => format!(
                "waiting for {} to say how many of this node's events they have (at most history_wait_secs from start)",
                unheard.join(", ")
            ),
            Verdict::WentBack(went_back) => format!(
                "the database went back in time: {} has this node's events up to {}, it holds up to {}; re-seeding",
                went_back.peer, went_back.peer_has, went_back.ours
            ),
            Verdict::Confirmed { .. } => "confirmed".to_owned(),
        }
    }

    async fn say(&mut self, ctx: &Context, verdict: &crate::transport::history::Verdict) {
        let text = match verdict {
            crate::transport::history::Verdict::Confirmed { .. } => None,
            _ => Some(Self::text(verdict)),
        };
        if self.0 != text {
            if let Err(error) = ctx.store.note_history(text.as_deref()).await {
                tracing::debug!(%error, "cannot record the history gate for weft status");
            }
            self.0 = text;
        }
    }
}

/// Drains the outbox whenever another connection has committed; once more at shutdown.
async fn capture_loop(ctx: Context, metrics: Arc<Metrics>) {
    let mut shutdown = ctx.shutdown.clone();
    let mut seen = None;
    let mut failures = 0u32;
    let mut verified = ctx.verified.subscribe();
    let mut waiting_since = tokio::time::Instant::now();
    // Something to clear: a note left by a run that stopped while it waited.
    let mut history_note = HistoryNote(Some(String::new()));
    loop {
        let mut again = false;
        let stopping = *shutdown.borrow();
        if !*verified.borrow_and_update() {
            // Changes wait in the outbox until the peers confirm this database's history.
            if stopping {
                return;
            }
            let verdict = ctx.reconsider_history().await;
            history_note.say(&ctx, &verdict).await;
            if waiting_since.elapsed() >= Duration::from_secs(30) {
                waiting_since = tokio::time::Instant::now();
                tracing::warn!(
                    "this database's history is not confirmed yet ({}); local changes wait in the outbox",
                    HistoryNote::text(&verdict)
                );
            }
            tokio::select! {
                _ = stopped(&mut shutdown) => {}
                _ = verified.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        if history_note.0.is_some() {
            let confirmed = crate::transport::history::Verdict::Confirmed { unheard: Vec::new() };
            history_note.say(&ctx, &confirmed).await;
        }
        match ctx.store.data_version().await {
            Ok(version) if Some(version) == seen && !stopping => {}
            Ok(version) => match ctx.store.drain().await {
                Ok(report) => {
                    // A drain stopped at its bound comes back at once for the rest.
                    seen = (!report.more).then_some(version);
                    again = report.more;
                    failures = 0;
                    if report.events > 0 {
                        crate::crashpoint::hit("after-drain");
                        crate::crashpoint::panic_point("capture-panics");
                        metrics
                            .captured
                            .fetch_add(report.events, std::sync::atomic::Ordering::Relaxed);
                    }
                    // Also when nothing was drained now: a drain whose commit reply was lost
                    // may have grown the log (the store rereads its last seq after an error).
                    ctx.log_grew.send_if_modified(|last| {
                        let grew = report.last_seq > *last;
                        *last = (*last).max(report.last_seq);
                        grew
                    });
                }
                Err(error) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(100) {
                        tracing::error!(%error, failures, "capture failed; retrying");
                    }
                }
            },
            Err(error) => tracing::error!(%error, "cannot poll the database"),
        }
        if stopping {
            return;
        }
        if again {
            continue;
        }
        tokio::select! {
            _ = stopped(&mut shutdown) => {}
            _ = ctx.store.wait_for_change(ctx.config.replication.poll()) => {}
        }
    }
}

/// The server side's TLS, or `None` in plain text (warned about); refuses a config that
/// says neither.
fn server_tls(config: &NodeConfig) -> Result<Option<Arc<ServerTls>>, NodeError> {
    match &config.security {
        Security::Unset => Err(NodeError::NoSecurity(format!("node {}", config.node))),
        Security::Insecure => {
            tracing::warn!(
                listen = %config.listen,
                "insecure = true: the replication links are neither encrypted nor authenticated; \
                 anyone who reaches this port can read and write every replicated row"
            );
            Ok(None)
        }
        Security::Tls { .. } => Ok(tls_paths(config).map(ServerTls::load).transpose()?.map(Arc::new)),
    }
}

/// The node's certificate files, under mutual TLS.
fn tls_paths(config: &NodeConfig) -> Option<Paths> {
    match &config.security {
        Security::Tls { ca, cert, key } => Some(Paths {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => None,
    }
}

/// A listener on `address`, and the address it got (a port 0 becomes a real one).
async fn bind(address: &str) -> Result<(TcpListener, SocketAddr), NodeError> {
    let listen_error = |source| NodeError::Listen {
        address: address.to_owned(),
        source,
    };
    let listener = TcpListener::bind(address).await.map_err(listen_error)?;
    let at = listener.local_addr().map_err(listen_error)?;
    Ok((listener, at))
}

/// Starts the operations endpoints of `[http]` on `listener`, bound for them; returns where
/// they listen.
async fn start_http(
    tasks: &mut JoinSet<()>,
    ctx: &Context,
    metrics: &Arc<Metrics>,
    listener: Option<(TcpListener, SocketAddr)>,
) -> Result<Option<SocketAddr>, NodeError> {
    let (Some(http), Some((listener, at))) = (&ctx.config.http, listener) else {
        return Ok(None);
    };
    let token = match &http.token_file {
        Some(path) => Some(read_token(path)?),
        None => None,
    };
    let console_token = match (&http.console_token_file, http.console) {
        (Some(path), true) => Some(read_token(path)?),
        _ => None,
    };
    if let (Some(scrape), Some(console)) = (&token, &console_token)
        && scrape == console
    {
        return Err(NodeError::SameToken(format!(
            "console_token_file holds the same token as http.token_file: whoever can scrape /metrics could then act in the console; give the console a token of its own ({})",
            http.console_token_file
                .as_ref()
                .map(|f| f.display().to_string())
                .unwrap_or_default()
        )));
    }
    let tls = match tls_paths(&ctx.config) {
        Some(paths) => Some(crate::transport::tls::http_server_config(&paths)?),
        None => None,
    };
    let endpoints = crate::http::Endpoints {
        ctx: ctx.clone(),
        metrics: metrics.clone(),
        token,
        ready_max_lag: http.ready_max_lag,
    };
    let console = match console_token {
        Some(token) => Some(crate::console::Console {
            ctx: ctx.clone(),
            metrics: metrics.clone(),
            admin: Arc::new(crate::store::admin::Admin::open((*ctx.config).clone()).await?),
            token,
            https: tls.is_some(),
        }),
        _ => None,
    };
    let what = if console.is_some() {
        "/metrics, /healthz, /readyz and the console at /console"
    } else {
        "/metrics, /healthz and /readyz"
    };
    tasks.spawn(crate::http::serve(endpoints, console, listener, tls));
    tracing::info!(%at, https = ctx.config.security != Security::Insecure, "serving {what}");
    Ok(Some(at))
}

/// Serves the replication service on `listener` until shutdown, over TLS or plain text.
async fn serve(ctx: Context, listener: TcpListener, tls: Option<Arc<ServerTls>>) {
    let config = &ctx.config;
    let service = ReplicationServer::new(Service::new(ctx.clone()))
        .max_decoding_message_size(config.replication.max_message_bytes())
        .max_encoding_message_size(config.replication.max_message_bytes());
    let mut server_stop = ctx.shutdown.clone();
    let gate = ctx.gate.clone();
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(Some(config.replication.max_streams_per_connection))
        .http2_keepalive_interval(Some(config.replication.heartbeat()))
        .http2_keepalive_timeout(Some(config.replication.peer_timeout()))
        .add_service(service);
    let stop = async move { stopped(&mut server_stop).await };
    let result = match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(crate::transport::tls::incoming(listener, tls, gate), stop)
                .await
        }
        None => {
            router
                .serve_with_incoming_shutdown(crate::transport::tls::incoming_plain(listener, gate), stop)
                .await
        }
    };
    if let Err(error) = result {
        tracing::error!(%error, "replication server stopped");
    }
}

/// Reloads the TLS files when they change (a rotation), every few seconds.
async fn watch_certificates(tls: Arc<ServerTls>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        match tls.reload(false) {
            Ok(true) => tracing::info!("TLS certificate files changed: reloaded; new connections use them"),
            Ok(false) => {}
            Err(error) => {
                tracing::error!(%error, "TLS certificate files changed but do not load; still using the previous ones")
            }
        }
    }
}

/// The periodic status line.
fn log_status(metrics: &Metrics) {
    let m = metrics;
    let lag = m.lag();
    tracing::info!(
        captured = Metrics::get(&m.captured),
        applied = Metrics::get(&m.applied),
        conflicts = Metrics::get(&m.conflicts),
        dead_lettered = Metrics::get(&m.dead_lettered),
        dropped_looped = Metrics::get(&m.looped),
        dropped_duplicate = Metrics::get(&m.duplicates),
        lag_p50_ms = lag.p50_ms,
        lag_p99_ms = lag.p99_ms,
        audits = Metrics::get(&m.audits),
        audit_differing = Metrics::get(&m.audit_differing),
        tombstones_purged = Metrics::get(&m.tombstones_purged),
        refused_batches = Metrics::get(&m.refused_batches),
        "status"
    );
}

/// Offers this node's report, moves the causal stability horizon with every node's latest
/// report, and purges the tombstones below it (`store::gc`). Not while joining.
async fn collect_tombstones(ctx: &Context, horizon: &mut crate::stability::Horizon, metrics: &Metrics) {
    if ctx.joining.borrow().is_some() {
        return;
    }
    let mut own = match ctx.store.frontiers().await {
        Ok(frontiers) => frontiers,
        Err(error) => return tracing::warn!(%error, "tombstone GC: cannot read the frontiers; next round"),
    };
    own.insert(ctx.config.node.clone(), ctx.store.last_seq().await);
    ctx.reports.offer(&ctx.config.node, crate::clock::now_micros(), own);
    let nodes: Vec<NodeId> = ctx.config.topology.nodes.iter().map(|n| n.id.clone()).collect();
    let Some(stable) = horizon.advance(&nodes, &ctx.reports.latest()).cloned() else {
        return;
    };
    match ctx.store.purge_tombstones(&stable).await {
        Ok(done) if done.purged > 0 => {
            metrics
                .tombstones_purged
                .fetch_add(done.purged, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(purged = done.purged, kept = done.kept, horizon = %stable.to_json(), "tombstones purged");
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "tombstone GC failed; next round"),
    }
}

/// Audits the whole mesh every `every` (no repair) and reports what it found.
async fn audit_loop(ctx: Context, metrics: Arc<Metrics>, every: Duration) {
    use crate::transport::audit::{Audit, Options};
    let mut shutdown = ctx.shutdown.clone();
    loop {
        tokio::select! {
            _ = stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(every) => {}
        }
        let run = async {
            let audit = Audit::connect((*ctx.config).clone(), Options::default()).await?;
            audit.run().await
        };
        let report = tokio::select! {
            _ = stopped(&mut shutdown) => return,
            report = run => report,
        };
        let report = match report {
            Ok(report) => report,
            Err(error) => {
                tracing::warn!(%error, "background audit could not run; next in {every:?}");
                continue;
            }
        };
        let summary = report.summary();
        metrics.audits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics
            .audit_differing
            .store(summary.differing as u64, std::sync::atomic::Ordering::Relaxed);
        metrics
            .audit_unsettled
            .store(summary.unsettled as u64, std::sync::atomic::Ordering::Relaxed);
        match summary.differing {
            0 => {
                tracing::info!(audit = %summary.audit, rows = summary.rows_read, unsettled = summary.unsettled, waiting_on_dead_letters = summary.waiting, "background audit: every node holds the same rows")
            }
            n => tracing::warn!(
                audit = %summary.audit, differing = n, keys = ?summary.keys,
                "background audit: rows differ between nodes; `weft audit --repair` shows and repairs them"
            ),
        }
        let json = serde_json::to_string(&summary).expect("a summary serializes");
        if let Err(error) = ctx.store.record_audit(&json).await {
            tracing::warn!(%error, "cannot record the background audit's result");
        }
    }
}

/// Persists acknowledgements, trims the log, and logs a status line now and then.
async fn upkeep_loop(ctx: Context, metrics: Arc<Metrics>) {
    let mut shutdown = ctx.shutdown.clone();
    let mut needs_by_origin = topology::log_needs(&ctx.config.topology, &ctx.config.node, ctx.config.relay_repair());
    needs_by_origin.extend(topology::removed_needs(
        &ctx.config.topology,
        &ctx.config.node,
        &ctx.removed,
    ));
    // Each Kafka topic this node publishes is a reader of the origins it carries, like a
    // peer: the log keeps what the topic lacks even when every peer has it.
    for (reader, origins) in topic_readers(&ctx.config) {
        for origin in origins {
            needs_by_origin.entry(origin).or_default().push(reader.into());
        }
    }
    let mut kept_back_said: Option<tokio::time::Instant> = None;
    let mut persisted: BTreeMap<(NodeId, NodeId), u64> = BTreeMap::new();
    let mut ticks = 0u64;
    let mut applied_at_last_retry = 0;
    let mut horizon = crate::stability::Horizon::default();
    let gc_every = ctx.config.replication.tombstone_gc_secs * 5;
    loop {
        let stopping = tokio::select! {
            _ = stopped(&mut shutdown) => true,
            _ = tokio::time::sleep(Duration::from_millis(200)) => false,
        };
        let fresh: Vec<Ack> = ctx
            .acks
            .lock()
            .expect("ack book lock")
            .iter()
            .filter(|(k, v)| persisted.get(*k) != Some(*v))
            .map(|((peer, origin), &seq)| Ack {
                peer: peer.clone(),
                origin: origin.clone(),
                seq,
            })
            .collect();
        if !fresh.is_empty() {
            match ctx.store.record_acks_and_collect(&fresh, &needs_by_origin).await {
                Ok(_) => {
                    for ack in fresh {
                        persisted.insert((ack.peer, ack.origin), ack.seq);
                    }
                }
                Err(error) => tracing::warn!(%error, "cannot persist acknowledgements; will retry"),
            }
        }
        ticks += 1;
        if ticks.is_multiple_of(25) && !stopping && *ctx.verified.borrow() {
            let applied = Metrics::get(&metrics.applied);
            let applied_since = applied != applied_at_last_retry;
            applied_at_last_retry = applied;
            match ctx.store.retry_dead_letters(applied_since).await {
                Ok(report) if report.applied > 0 => {
                    tracing::info!(
                        applied = report.applied,
                        refused = report.refused,
                        "dead letters retried"
                    );
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "cannot retry dead letters; will try again"),
            }
        }
        if ticks.is_multiple_of(50) && !stopping {
            retain(&ctx, &metrics, &mut kept_back_said).await;
        }
        if gc_every > 0 && ticks.is_multiple_of(gc_every) && !stopping && *ctx.verified.borrow() {
            collect_tombstones(&ctx, &mut horizon, &metrics).await;
        }
        if ticks.is_multiple_of(50) {
            log_status(&metrics);
        }
        if stopping {
            return;
        }
    }
}

/// Holds the log to its retention limits. What goes was still needed by some peer (the
/// acknowledged part is trimmed as soon as it is), which re-seeds when it next connects.
/// Never what a Kafka topic of this node has not taken (`topic_floors`): its readers could
/// not get it back. The log then grows past its limits, said at ERROR once a minute
/// (`kept_back_said`: when it was last said).
async fn retain(ctx: &Context, metrics: &Metrics, kept_back_said: &mut Option<tokio::time::Instant>) {
    let (bytes, age) = ctx.config.replication.log_retention();
    let config = &ctx.config;
    let mut kept = topology::kept_origins(&config.topology, &config.node, config.relay_repair());
    kept.insert(config.node.clone());
    kept.extend(ctx.removed.iter().cloned());
    let floors = match topic_floors(ctx).await {
        Ok(floors) => floors,
        Err(error) => return tracing::warn!(%error, "cannot read what the Kafka topics have taken; retention waits"),
    };
    let held = floors.iter().map(|(origin, (seq, _))| (origin.clone(), *seq)).collect();
    let report = match ctx.store.enforce_retention(bytes, age, &kept, &held).await {
        Ok(report) => report,
        Err(error) => return tracing::warn!(%error, "cannot hold the log to its retention limit; will try again"),
    };
    if report.trimmed > 0 {
        metrics
            .log_trimmed_unacked
            .fetch_add(report.trimmed, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            trimmed = report.trimmed,
            max_mib = ctx.config.replication.log_retain_mib,
            max_secs = ctx.config.replication.log_retain_secs,
            "dropped log events before every peer had them: the log went past its retention limit (or they \
             are of nodes taken out of the topology); a peer that still needed them will re-seed by snapshot \
             when it connects (`weft status` shows it)"
        );
    }
    let quiet = kept_back_said.is_some_and(|at| at.elapsed() < Duration::from_secs(60));
    if report.kept_back.is_empty() || quiet {
        return;
    }
    *kept_back_said = Some(tokio::time::Instant::now());
    let kept_back: Vec<String> = (report.kept_back.iter())
        .map(|(origin, (from, to))| {
            let topic = floors.get(origin).map_or("", |(_, topic)| topic.as_str());
            format!("{origin} {from}..={to} (not yet in {topic})")
        })
        .collect();
    tracing::error!(
        kept = %kept_back.join(", "),
        max_mib = ctx.config.replication.log_retain_mib,
        max_secs = ctx.config.replication.log_retain_secs,
        "the log is past its retention limit but keeps the events a Kafka topic of this node has not taken \
         (its cluster is unreachable, or refuses them: see the publishing warnings), so that the topic gets no \
         hole; they go once published. Bring the cluster back, or give the database room meanwhile"
    );
}

/// The Kafka topics this node publishes into, as readers of its log: the name each
/// acknowledges under, and the origins it carries.
#[cfg(feature = "kafka")]
fn topic_readers(config: &NodeConfig) -> Vec<(&'static str, Vec<NodeId>)> {
    (crate::transport::kafka::publish::published_topics(config).into_iter())
        .map(|topic| (topic.reader, topic.origins))
        .collect()
}

/// Without the Kafka binding there are no topics (a topology that asks for one is refused).
#[cfg(not(feature = "kafka"))]
fn topic_readers(_: &NodeConfig) -> Vec<(&'static str, Vec<NodeId>)> {
    Vec::new()
}

/// Per origin, the last seq every Kafka topic carrying it has taken (its publisher's
/// recorded position), and the topic that has taken least.
#[cfg(feature = "kafka")]
async fn topic_floors(ctx: &Context) -> Result<BTreeMap<NodeId, (u64, String)>, StoreError> {
    use crate::transport::kafka::publish::published_source;
    let mut floors: BTreeMap<NodeId, (u64, String)> = BTreeMap::new();
    for published in crate::transport::kafka::publish::published_topics(&ctx.config) {
        for origin in &published.origins {
            let source = published_source(&published.topic, origin);
            let taken = ctx.store.position(&source).await?.unwrap_or(0) as u64;
            let floor = floors.entry(origin.clone()).or_insert((taken, published.topic.clone()));
            if taken < floor.0 {
                *floor = (taken, published.topic.clone());
            }
        }
    }
    Ok(floors)
}

#[cfg(not(feature = "kafka"))]
async fn topic_floors(_: &Context) -> Result<BTreeMap<NodeId, (u64, String)>, StoreError> {
    Ok(BTreeMap::new())
}
