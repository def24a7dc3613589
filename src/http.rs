//! The operations endpoints of a sidecar over HTTP: `/metrics` (Prometheus), `/healthz`
//! (alive) and `/readyz` (ready for traffic), for Prometheus and Kubernetes probes, and with
//! `console = true` the web console under `/console` (see `console`).
//!
//! Off unless the node config has `[http] listen`. On a node with mutual TLS the endpoints
//! are HTTPS with the node's own certificate (a scraper trusts the mesh CA; no client
//! certificate is asked for); with `insecure = true` they are plain HTTP. `/metrics` wants
//! `Authorization: Bearer <token>` when `token_file` is set; the probes never do (a kubelet
//! has no token) and say only `ok` or why not.
//!
//! `/readyz` is the node's own state, not its peers': it answers 503 while no peer has
//! confirmed the database's history, while a join runs, and while it catches up (an event
//! applied within the last `ready_max_lag_secs` was older than that when it landed). A dead peer does not
//! make a surviving region unready (that is when traffic must go there).
//!
//! Every series carries the labels `node` and `region` of this sidecar (the receiver, for
//! lag). A scrape reads the live figures (`telemetry::Metrics`: counters since start, lag
//! histograms) and one status snapshot of the store (backlog and RPO exposure per peer, the
//! conflict log by table and strategy, dead letters by cause, the open queue, a join's
//! progress): figures a restart must not reset come from the database.
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};

use crate::clock::now_micros;
use crate::shutdown::stopped;
use crate::store::Status;
use crate::telemetry::Metrics;
use crate::transport::Context;

use crate::telemetry::Labels;

/// What the endpoints read.
#[derive(Clone)]
pub struct Endpoints {
    pub ctx: Context,
    pub metrics: Arc<Metrics>,
    /// The bearer token `/metrics` wants, if any.
    pub token: Option<Arc<str>>,
    pub ready_max_lag: Duration,
}

/// Serves the endpoints on `listener` until shutdown; over TLS when `tls` is given.
/// With `console`, the web console's pages too (`crate::console`).
pub async fn serve(
    endpoints: Endpoints,
    console: Option<crate::console::Console>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let mut shutdown = endpoints.ctx.shutdown.clone();
    let mut router = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/healthz", axum::routing::get(healthz))
        .route("/readyz", axum::routing::get(readyz))
        .with_state(endpoints);
    if let Some(console) = console {
        router = router.merge(crate::console::router(console));
    }
    let stop = async move { stopped(&mut shutdown).await };
    let result = match tls {
        Some(tls) => {
            let listener = TlsListener {
                listener,
                acceptor: tokio_rustls::TlsAcceptor::from(tls),
            };
            axum::serve(listener, router).with_graceful_shutdown(stop).await
        }
        None => axum::serve(listener, router).with_graceful_shutdown(stop).await,
    };
    if let Err(error) = result {
        tracing::error!(%error, "the operations endpoints stopped");
    }
}

/// HTTPS connections: each accepted TCP connection's handshake, within a few seconds.
struct TlsListener {
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let handshake = tokio::time::timeout(Duration::from_secs(5), self.acceptor.accept(tcp));
            match handshake.await {
                Ok(Ok(stream)) => return (stream, addr),
                Ok(Err(error)) => tracing::debug!(peer = %addr, %error, "refused an HTTPS connection"),
                Err(_) => tracing::debug!(peer = %addr, "no HTTPS handshake within 5 s"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(endpoints): State<Endpoints>) -> Response {
    // A probe comes every few seconds: it reads only the join, not the whole status.
    let reasons = match endpoints.ctx.store.join_state().await {
        Ok(joining) => endpoints.unready(joining.as_ref()),
        Err(error) => vec![format!("cannot read the database: {error}")],
    };
    if reasons.is_empty() {
        return (StatusCode::OK, "ok\n").into_response();
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not ready: {}\n", reasons.join("; ")),
    )
        .into_response()
}

async fn metrics(State(endpoints): State<Endpoints>, headers: HeaderMap) -> Response {
    if let Some(token) = &endpoints.token {
        let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        if given.and_then(|v| v.strip_prefix("Bearer ")) != Some(token) {
            return (
                StatusCode::UNAUTHORIZED,
                "send the token of [http] token_file as `Authorization: Bearer <token>`\n",
            )
                .into_response();
        }
    }
    let status = match endpoints.status().await {
        Ok(status) => status,
        Err(error) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read the database: {error}\n"),
            )
                .into_response();
        }
    };
    let registry = endpoints.registry(&status);
    let mut text = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the metrics: {error}\n"),
        )
            .into_response();
    }
    let kind = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, kind)], text).into_response()
}

impl Endpoints {
    async fn status(&self) -> Result<Status, crate::store::StoreError> {
        let config = &self.ctx.config;
        let routed = crate::topology::routed_origins(&config.topology, &config.node);
        self.ctx.store.status(&routed).await
    }

    /// Why this node is not ready; empty when it is.
    fn unready(&self, joining: Option<&crate::store::snapshot::JoinState>) -> Vec<String> {
        let mut reasons = Vec::new();
        if !*self.ctx.verified.borrow() {
            reasons.push("no peer has confirmed this database's history yet".to_owned());
        }
        if let Some(join) = joining {
            reasons.push(format!(
                "joining from {} by snapshot ({}/{} rows)",
                join.source, join.rows_done, join.rows_total
            ));
        }
        for (origin, lag) in self.metrics.applying_late(self.ready_max_lag, now_micros()) {
            reasons.push(format!(
                "catching up: an event of {origin} applied just now was {:.1} s old (ready_max_lag_secs is {})",
                lag.as_secs_f64(),
                self.ready_max_lag.as_secs()
            ));
        }
        reasons
    }

    /// The metrics of one scrape.
    fn registry(&self, status: &Status) -> Registry {
        // Every series names the node (the receiver, for lag) and its region.
        let config = &self.ctx.config;
        let own = [("node", config.node.clone()), ("region", config.region().to_owned())];
        let mut r = Registry::with_prefix_and_labels("weft", own.into_iter().map(|(k, v)| (k.into(), v.into())));
        let info = Family::<Labels, Gauge>::default();
        info.get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_owned())])
            .set(1);
        r.register("build_info", "weft's version in this sidecar", info);
        self.counters(&mut r);
        r.register_with_unit(
            "replication_lag",
            "From the application's commit in the origin region to the apply commit here, per origin",
            prometheus_client::registry::Unit::Seconds,
            self.metrics.lag_by_origin.clone(),
        );
        peers(&mut r, status, &self.metrics, config);
        self.state(&mut r, status);
        breakdown(&mut r, status);
        r
    }

    fn counters(&self, r: &mut Registry) {
        let m = &self.metrics;
        let counters: [(&str, &str, &std::sync::atomic::AtomicU64); 12] = [
            ("events_captured", "Local changes captured from the outbox", &m.captured),
            (
                "events_applied",
                "Remote events whose content became visible here",
                &m.applied,
            ),
            (
                "events_stale",
                "Remote events already included in the local version",
                &m.stale,
            ),
            (
                "events_dropped_duplicate",
                "Remote events at or below the frontier (sent again)",
                &m.duplicates,
            ),
            (
                "events_dropped_looped",
                "Remote events that came back to their origin or a node on their path",
                &m.looped,
            ),
            (
                "events_dead_lettered",
                "Remote events set aside as dead letters",
                &m.dead_lettered,
            ),
            (
                "batches_refused",
                "Batches refused from peers (forged origins, paths, versions, clocks)",
                &m.refused_batches,
            ),
            (
                "clock_skew_refusals",
                "Remote timestamps refused for clock skew",
                &m.skew_reports,
            ),
            (
                "snapshot_rows_installed",
                "Snapshot rows installed while joining",
                &m.joined_rows,
            ),
            (
                "log_trimmed_unacknowledged",
                "Log entries dropped by retention before every peer had them",
                &m.log_trimmed_unacked,
            ),
            (
                "peers_behind_log",
                "Times a peer was found needing events the log no longer holds",
                &m.behind_log,
            ),
            (
                "tombstones_purged",
                "Tombstones purged below the causal stability horizon",
                &m.tombstones_purged,
            ),
        ];
        for (name, help, value) in counters {
            r.register(name, help, ConstCounter::new(Metrics::get(value)));
        }
    }

    fn state(&self, r: &mut Registry, status: &Status) {
        let gauges: [(&str, &str, i64); 6] = [
            (
                "history_confirmed",
                "1 once a peer has confirmed this database's history (capture runs)",
                i64::from(*self.ctx.verified.borrow()),
            ),
            (
                "joining",
                "1 while this node joins by snapshot",
                i64::from(status.joining.is_some()),
            ),
            (
                "last_seq",
                "The last seq this node gave one of its own changes",
                status.last_seq as i64,
            ),
            (
                "outbox_pending",
                "Local changes waiting in the outbox",
                status.outbox_pending as i64,
            ),
            (
                "log_events",
                "Events held in the log for peers",
                status.log_events as i64,
            ),
            (
                "dead_letters",
                "Dead letters held, every cause",
                status.dead_letters as i64,
            ),
        ];
        for (name, help, value) in gauges {
            r.register(name, help, ConstGauge::new(value));
        }
        if let Some(join) = &status.joining {
            let progress = Family::<Labels, Gauge>::default();
            let labels = vec![("source", join.source.clone())];
            progress.get_or_create(&labels).set(join.rows_done as i64);
            r.register(
                "snapshot_rows_done",
                "Rows of the running join's snapshot installed so far",
                progress.clone(),
            );
            let total = Family::<Labels, Gauge>::default();
            total.get_or_create(&labels).set(join.rows_total as i64);
            r.register("snapshot_rows", "Rows of the running join's snapshot", total);
        }
    }
}

/// Per peer: the link, and what it has not acknowledged of each origin sent to it.
fn peers(r: &mut Registry, status: &Status, metrics: &Metrics, config: &crate::config::NodeConfig) {
    let backlog = Family::<Labels, Gauge>::default();
    let exposure = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let now = now_micros();
    for p in &status.peers {
        let labels = vec![("peer", p.peer.clone()), ("origin", p.origin.clone())];
        backlog.get_or_create(&labels).set(p.unacked as i64);
        let age = p.oldest_unacked_micros.map_or(0.0, |at| (now - at).max(0) as f64 / 1e6);
        exposure.get_or_create(&labels).set(age);
    }
    r.register(
        "peer_backlog_events",
        "Events of an origin in the log that a peer has not acknowledged",
        backlog,
    );
    r.register_with_unit(
        "peer_rpo_exposure",
        "Age of the oldest event of an origin a peer has not acknowledged (0: none): what this region would lose with it",
        prometheus_client::registry::Unit::Seconds,
        exposure,
    );
    let connected = Family::<Labels, Gauge>::default();
    let reconnects = Family::<Labels, prometheus_client::metrics::counter::Counter>::default();
    let skew = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    // The streams of gRPC links; a Kafka link has none (its health is its RPO exposure).
    let on_grpc = |peer: &str| config.topology.link_transport(&config.node, peer) == crate::config::Transport::Grpc;
    for (peer, state) in metrics.peers().into_iter().filter(|(peer, _)| on_grpc(peer)) {
        let labels = vec![("peer", peer.clone())];
        connected.get_or_create(&labels).set(i64::from(state.connected));
        reconnects.get_or_create(&labels).inc_by(state.reconnects);
        skew.get_or_create(&labels).set(state.clock_ahead_ms as f64 / 1000.0);
    }
    r.register("peer_connected", "1 while the stream to a peer is up", connected);
    r.register("peer_reconnects", "Streams to a peer lost since start", reconnects);
    r.register_with_unit(
        "peer_clock_ahead",
        "How far ahead of this node's clock a peer's was at its last heartbeat (negative: behind; the network's delay included)",
        prometheus_client::registry::Unit::Seconds,
        skew,
    );
}

/// What the database counts by table, strategy and cause.
fn breakdown(r: &mut Registry, status: &Status) {
    let conflicts = Family::<Labels, prometheus_client::metrics::counter::Counter>::default();
    for (table, strategy, n) in &status.breakdown.conflicts {
        let labels = vec![("table", table.clone()), ("strategy", strategy.clone())];
        conflicts.get_or_create(&labels).inc_by(*n);
    }
    r.register(
        "conflicts",
        "Concurrent writes resolved, by table and strategy (the conflict log)",
        conflicts,
    );
    let dead = Family::<Labels, Gauge>::default();
    for (cause, n) in &status.breakdown.dead_letters {
        dead.get_or_create(&vec![("cause", cause.clone())]).set(*n as i64);
    }
    r.register("dead_letters_by_cause", "Dead letters held, by cause", dead);
    r.register(
        "queue_open_conflicts",
        "Conflicts waiting in the resolution queue for a person",
        ConstGauge::new(status.breakdown.queue_open as i64),
    );
    r.register(
        "queue_open_siblings",
        "Versions side by side in the open queue conflicts",
        ConstGauge::new(status.breakdown.queue_siblings as i64),
    );
}
