//! gRPC transport: one long-lived bidirectional stream from each sender to each peer.
//!
//! Sender side (`feed_peer`): dial, send Hello, read the receiver's frontiers from Welcome,
//! and stream log events after them in batches that never split a capture batch, with at most
//! `window` batches unacknowledged (back-pressure); heartbeats keep an idle stream alive and
//! detect a dead one. Any failure drops the stream and redials with backoff; the receiver's
//! frontiers make the resend exact.
//!
//! Receiver side (`Service`): admit the Hello (`handshake::check_hello`), answer Welcome, then
//! apply each batch durably and only then acknowledge it with the new frontiers. A gap or a
//! failed apply ends the stream, so the sender resends from the frontier.
use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::clock::now_micros;
use crate::config::{NodeConfig, NodeSpec};
use crate::event::NodeId;
use crate::store::Store;
use crate::telemetry::Metrics;
use crate::topology;
use crate::transport::handshake::{self, Hello, Refusal};
use crate::wire::{self, PROTOCOL, proto};

use proto::receive_frame::Body as Reply;
pub use proto::replication_server::ReplicationServer;
use proto::send_frame::Body as Outgoing;

/// Largest message either side accepts: a capture batch is never split, so one big
/// application transaction makes one big message.
pub const MAX_MESSAGE_BYTES: usize = 512 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot reach {peer}: {source}")]
    Connect {
        peer: NodeId,
        source: tonic::transport::Error,
    },
    #[error("{peer} refused the stream: {status}")]
    Refused { peer: NodeId, status: Status },
    #[error("{peer}: {message}")]
    Protocol { peer: NodeId, message: String },
    #[error("{peer} was silent for {0:?}", timeout)]
    Silent { peer: NodeId, timeout: Duration },
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// What a sender or receiver needs of its node.
#[derive(Clone)]
pub struct Context {
    pub config: Arc<NodeConfig>,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    /// Bumped whenever this node's log grows.
    pub log_grew: watch::Sender<u64>,
    /// Latest acknowledged seq per (peer, origin), persisted by the node's upkeep task.
    pub acks: Arc<std::sync::Mutex<BTreeMap<(NodeId, NodeId), u64>>>,
    /// When each peer's inbound stream last delivered a frame.
    pub heard: Arc<std::sync::Mutex<BTreeMap<NodeId, Instant>>>,
    /// When this node started (a peer never heard counts as heard then).
    pub started: Instant,
    pub shutdown: watch::Receiver<bool>,
}

impl Context {
    /// The origins `peer` should relay to this node: in all-to-all, those whose direct link
    /// has been silent longer than `relay_after`, each asked of exactly one peer (the
    /// lowest-id peer still heard from) so that only one relay runs per origin.
    fn relay_wanted_from(&self, peer: &str) -> Vec<String> {
        let config = &self.config;
        let Some(after) = config.replication.relay_after() else {
            return Vec::new();
        };
        if config.topology.shape != crate::config::Shape::AllToAll {
            return Vec::new();
        }
        let heard = self.heard.lock().expect("heard lock");
        let alive = |node: &str| heard.get(node).copied().unwrap_or(self.started).elapsed() <= after;
        config
            .topology
            .nodes
            .iter()
            .map(|n| n.id.as_str())
            .filter(|&origin| origin != config.node && origin != peer && !alive(origin))
            .filter(|&origin| {
                let relay = config
                    .topology
                    .nodes
                    .iter()
                    .map(|n| n.id.as_str())
                    .find(|&p| p != config.node && p != origin && heard.contains_key(p) && alive(p));
                relay == Some(peer)
            })
            .map(str::to_owned)
            .collect()
    }

    fn mark_heard(&self, peer: &str) {
        self.heard
            .lock()
            .expect("heard lock")
            .insert(peer.to_owned(), Instant::now());
    }
}

fn frontiers_to_proto(frontiers: &BTreeMap<NodeId, u64>) -> Vec<proto::Frontier> {
    frontiers
        .iter()
        .map(|(origin, &seq)| proto::Frontier {
            origin: origin.clone(),
            seq,
        })
        .collect()
}

fn refusal_status(refusal: Refusal) -> Status {
    let message = refusal.to_string();
    match refusal {
        Refusal::Protocol { .. } => Status::failed_precondition(message),
        Refusal::OtherMesh { .. } | Refusal::NotAPeer { .. } => Status::permission_denied(message),
    }
}

/// The receiving half, served by the node's gRPC server.
pub struct Service {
    ctx: Context,
}

impl Service {
    pub fn new(ctx: Context) -> Self {
        Self { ctx }
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<proto::ReceiveFrame, Status>> + Send>>;

fn reply(body: Reply) -> proto::ReceiveFrame {
    proto::ReceiveFrame { body: Some(body) }
}

/// One receiving stream's state, driven frame by frame as the response is polled.
struct Inbound {
    ctx: Context,
    peer: NodeId,
    frames: Streaming<proto::SendFrame>,
    shutdown: watch::Receiver<bool>,
    done: bool,
}

impl Inbound {
    async fn next_reply(&mut self) -> Option<Result<proto::ReceiveFrame, Status>> {
        if self.done {
            return None;
        }
        let silence = self.ctx.config.replication.peer_timeout();
        let frame = tokio::select! {
            _ = crate::shutdown::stopped(&mut self.shutdown) => return None,
            frame = timeout(silence, self.frames.message()) => frame,
        };
        if matches!(frame, Ok(Ok(Some(_)))) {
            self.ctx.mark_heard(&self.peer);
        }
        let result = match frame {
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no frame from {} for {silence:?}",
                self.peer
            ))),
            Ok(Err(status)) => Err(status),
            Ok(Ok(None)) => return None,
            Ok(Ok(Some(proto::SendFrame {
                body: Some(Outgoing::Heartbeat(_)),
            }))) => match self.ctx.store.frontiers().await {
                Ok(frontiers) => Ok(reply(Reply::Heartbeat(proto::Heartbeat {
                    sent_at_micros: now_micros(),
                    hlc: self.ctx.store.clock().last().0,
                    frontiers: frontiers_to_proto(&frontiers),
                    relay_wanted: self.ctx.relay_wanted_from(&self.peer),
                }))),
                Err(e) => Err(Status::unavailable(e.to_string())),
            },
            Ok(Ok(Some(proto::SendFrame {
                body: Some(Outgoing::Batch(batch)),
            }))) => self.apply(batch).await,
            Ok(Ok(Some(_))) => Err(Status::invalid_argument("expected a batch or a heartbeat")),
        };
        if result.is_err() {
            self.done = true;
        }
        Some(result)
    }

    async fn apply(&mut self, batch: proto::Batch) -> Result<proto::ReceiveFrame, Status> {
        let events = batch
            .events
            .into_iter()
            .map(wire::event_from_proto)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let report = self.ctx.store.apply(events).await.map_err(|e| {
            tracing::error!(peer = %self.peer, error = %e, "apply failed; the peer will resend");
            Status::unavailable(format!("apply failed: {e}"))
        })?;
        crate::crashpoint::hit("after-apply");
        self.ctx.metrics.record_apply(&report, now_micros());
        if report.drained.events > 0 {
            self.ctx.log_grew.send_replace(report.drained.last_seq);
        }
        for skew in &report.skew {
            tracing::warn!(peer = %self.peer, remote_hlc = %skew.remote, ahead_ms = skew.ahead_ms, "peer clock ahead of max_clock_skew; timestamp not adopted");
        }
        if let Some((origin, frontier, got)) = &report.gap {
            return Err(Status::failed_precondition(format!(
                "gap from {origin}: have {frontier}, got {got}; resend from {}",
                frontier + 1
            )));
        }
        Ok(reply(Reply::Ack(proto::Ack {
            frontiers: frontiers_to_proto(&report.frontiers),
            relay_wanted: self.ctx.relay_wanted_from(&self.peer),
        })))
    }
}

#[tonic::async_trait]
impl proto::replication_server::Replication for Service {
    type ReplicateStream = ReplyStream;

    async fn replicate(
        &self,
        request: Request<Streaming<proto::SendFrame>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        let mut frames = request.into_inner();
        let config = &self.ctx.config;
        let first = timeout(config.replication.peer_timeout(), frames.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello"))??;
        let Some(proto::SendFrame {
            body: Some(Outgoing::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument("the first frame must be Hello"));
        };
        let claim = Hello {
            protocol: hello.protocol,
            node: &hello.node_id,
            mesh: &hello.mesh,
        };
        handshake::check_hello(claim, &config.topology, &config.node).map_err(refusal_status)?;
        let frontiers = self
            .ctx
            .store
            .frontiers()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        tracing::info!(peer = %hello.node_id, "peer stream opened");
        let welcome = reply(Reply::Welcome(proto::Welcome {
            node_id: config.node.clone(),
            frontiers: frontiers_to_proto(&frontiers),
        }));
        let inbound = Inbound {
            shutdown: self.ctx.shutdown.clone(),
            ctx: self.ctx.clone(),
            peer: hello.node_id,
            frames,
            done: false,
        };
        let rest = futures_util::stream::unfold(inbound, |mut inbound| async move {
            let item = inbound.next_reply().await?;
            Some((item, inbound))
        });
        let stream = futures_util::StreamExt::chain(futures_util::stream::iter([Ok(welcome)]), rest);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Feeds one peer until shutdown, redialling with backoff after any failure.
pub async fn feed_peer(ctx: Context, peer: NodeSpec) {
    let mut shutdown = ctx.shutdown.clone();
    let mut backoff = Duration::from_millis(50);
    let mut failures = 0u32;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let started = Instant::now();
        match session(&ctx, &peer).await {
            Ok(()) => return,
            Err(error) => {
                ctx.metrics.update_peer(&peer.id, |p| {
                    p.connected = false;
                    p.reconnects += 1;
                });
                if started.elapsed() > Duration::from_secs(10) {
                    backoff = Duration::from_millis(50);
                    failures = 0;
                }
                failures += 1;
                // Say it once, then every 20th retry: a peer that is down is not news each time.
                if failures == 1 || failures.is_multiple_of(20) {
                    tracing::warn!(peer = %peer.id, %error, failures, "peer stream down; redialling");
                }
            }
        }
        tokio::select! {
            _ = crate::shutdown::stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One connection's life. `Ok` only on shutdown.
async fn session(ctx: &Context, peer: &NodeSpec) -> Result<(), TransportError> {
    let config = &ctx.config;
    let tuning = &config.replication;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", config.address_of(peer)))
        .map_err(|source| TransportError::Connect {
            peer: peer.id.clone(),
            source,
        })?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        // Liveness of the connection itself, even while a long apply holds back our acks.
        .http2_keep_alive_interval(tuning.heartbeat())
        .keep_alive_timeout(tuning.peer_timeout())
        .keep_alive_while_idle(true);
    let channel = endpoint.connect().await.map_err(|source| TransportError::Connect {
        peer: peer.id.clone(),
        source,
    })?;
    let mut client = proto::replication_client::ReplicationClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (out, out_rx) = mpsc::channel::<proto::SendFrame>(tuning.window + 2);
    let hello = proto::SendFrame {
        body: Some(Outgoing::Hello(proto::Hello {
            protocol: PROTOCOL,
            node_id: config.node.clone(),
            region: config.region().to_owned(),
            mesh: config.topology.mesh.clone(),
        })),
    };
    out.send(hello).await.expect("receiver is alive");
    let refused = |status| TransportError::Refused {
        peer: peer.id.clone(),
        status,
    };
    let protocol = |message: &str| TransportError::Protocol {
        peer: peer.id.clone(),
        message: message.to_owned(),
    };
    let mut inbound = client
        .replicate(ReceiverStream::new(out_rx))
        .await
        .map_err(refused)?
        .into_inner();
    let welcome = timeout(tuning.peer_timeout(), inbound.message())
        .await
        .map_err(|_| TransportError::Silent {
            peer: peer.id.clone(),
            timeout: tuning.peer_timeout(),
        })?
        .map_err(refused)?;
    let Some(proto::ReceiveFrame {
        body: Some(Reply::Welcome(welcome)),
    }) = welcome
    else {
        return Err(protocol("expected Welcome"));
    };
    let routed: Vec<NodeId> = topology::origins_for(&config.topology, &config.node, &peer.id)
        .into_iter()
        .map(str::to_owned)
        .collect();
    let kept = topology::kept_origins(&config.topology, &config.node, config.relay_repair());
    let mut theirs: BTreeMap<NodeId, u64> = welcome.frontiers.into_iter().map(|f| (f.origin, f.seq)).collect();
    let mut origins = routed.clone();
    let mut sent: BTreeMap<NodeId, u64> = origins
        .iter()
        .map(|o| (o.clone(), theirs.get(o).copied().unwrap_or(0)))
        .collect();
    record_acks(ctx, &peer.id, &theirs);
    ctx.metrics.update_peer(&peer.id, |p| {
        p.connected = true;
        p.sent = sent.get(&config.node).copied().unwrap_or(0);
        p.acked = p.sent;
    });
    tracing::info!(peer = %peer.id, resume = ?sent, "streaming to peer");

    let mut log_grew = ctx.log_grew.subscribe();
    let mut shutdown = ctx.shutdown.clone();
    let mut heartbeat = tokio::time::interval(tuning.heartbeat());
    let mut last_heard = Instant::now();
    let mut in_flight: VecDeque<()> = VecDeque::new();
    let mut stopping: Option<Instant> = None;
    loop {
        // Fill the window.
        log_grew.borrow_and_update();
        while in_flight.len() < tuning.window && !origins.is_empty() {
            let mut events = Vec::new();
            for origin in &origins {
                let after = sent[origin];
                let entries = ctx.store.read_log(origin, after, tuning.batch_max_events).await?;
                if let Some(last) = entries.last() {
                    sent.insert(origin.clone(), last.seq);
                }
                for entry in entries {
                    let event: proto::Event = prost::Message::decode(entry.bytes.as_slice())
                        .map_err(|e| protocol(&format!("corrupt log entry: {e}")))?;
                    events.push(event);
                }
            }
            if events.is_empty() {
                break;
            }
            let frame = proto::SendFrame {
                body: Some(Outgoing::Batch(proto::Batch { events })),
            };
            if out.send(frame).await.is_err() {
                return Err(protocol("stream closed"));
            }
            in_flight.push_back(());
            let own = sent.get(&config.node).copied().unwrap_or(0);
            ctx.metrics.update_peer(&peer.id, |p| p.sent = own);
        }
        if let Some(since) = stopping {
            // Graceful stop: leave once everything sent is acknowledged, or after a grace period.
            if in_flight.is_empty() || since.elapsed() > Duration::from_secs(3) {
                return Ok(());
            }
        }
        tokio::select! {
            changed = log_grew.changed(), if stopping.is_none() => {
                if changed.is_err() { stopping = Some(Instant::now()); }
            }
            _ = crate::shutdown::stopped(&mut shutdown), if stopping.is_none() => {
                stopping = Some(Instant::now());
            }
            message = inbound.message() => {
                last_heard = Instant::now();
                match message.map_err(refused)? {
                    Some(proto::ReceiveFrame { body: Some(Reply::Ack(ack)) }) => {
                        in_flight.pop_front();
                        theirs = ack.frontiers.into_iter().map(|f| (f.origin, f.seq)).collect();
                        record_acks(ctx, &peer.id, &theirs);
                        if let Some(&own) = theirs.get(&config.node) {
                            ctx.metrics.update_peer(&peer.id, |p| p.acked = p.acked.max(own));
                        }
                        relay_on_request(ctx, peer, &routed, &kept, &ack.relay_wanted, &theirs, &mut origins, &mut sent);
                    }
                    Some(proto::ReceiveFrame { body: Some(Reply::Heartbeat(beat)) }) => {
                        if !beat.frontiers.is_empty() {
                            theirs = beat.frontiers.iter().map(|f| (f.origin.clone(), f.seq)).collect();
                            record_acks(ctx, &peer.id, &theirs);
                        }
                        relay_on_request(ctx, peer, &routed, &kept, &beat.relay_wanted, &theirs, &mut origins, &mut sent);
                        if let Err(skew) = ctx.store.clock().observe_now(crate::event::Hlc(beat.hlc)) {
                            tracing::warn!(peer = %peer.id, ahead_ms = skew.ahead_ms, "peer clock ahead of max_clock_skew");
                            ctx.metrics.skew_reports.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    Some(_) => return Err(protocol("unexpected frame")),
                    None => return Err(protocol("peer closed the stream")),
                }
            }
            _ = heartbeat.tick() => {
                // A receiver busy applying a large batch answers late; only an idle stream
                // that stays silent is dead (HTTP/2 keepalive covers the busy case).
                if in_flight.is_empty() && last_heard.elapsed() > tuning.peer_timeout() {
                    return Err(TransportError::Silent { peer: peer.id.clone(), timeout: tuning.peer_timeout() });
                }
                if stopping.is_some_and(|since| since.elapsed() > Duration::from_secs(3)) {
                    return Ok(());
                }
                let beat = proto::SendFrame { body: Some(Outgoing::Heartbeat(proto::Heartbeat {
                    sent_at_micros: now_micros(),
                    hlc: ctx.store.clock().last().0,
                    ..Default::default()
                })) };
                if out.send(beat).await.is_err() {
                    return Err(protocol("stream closed"));
                }
            }
        }
    }
}

/// Records a peer's frontiers: they are its acknowledgements, for every origin.
fn record_acks(ctx: &Context, peer: &str, frontiers: &BTreeMap<NodeId, u64>) {
    let mut acks = ctx.acks.lock().expect("ack book lock");
    for (origin, &seq) in frontiers {
        let entry = acks.entry((peer.to_owned(), origin.clone())).or_insert(0);
        *entry = (*entry).max(seq);
    }
}

/// Adjusts the origins streamed to `peer` to its relay requests: routed origins always, plus
/// requested ones this node keeps in its log; a new origin starts at the peer's frontier.
#[allow(clippy::too_many_arguments)]
fn relay_on_request(
    ctx: &Context,
    peer: &NodeSpec,
    routed: &[NodeId],
    kept: &std::collections::BTreeSet<NodeId>,
    wanted: &[String],
    theirs: &BTreeMap<NodeId, u64>,
    origins: &mut Vec<NodeId>,
    sent: &mut BTreeMap<NodeId, u64>,
) {
    let mut next: Vec<NodeId> = routed.to_vec();
    next.extend(
        wanted
            .iter()
            .filter(|o| kept.contains(*o) && !routed.contains(o))
            .cloned(),
    );
    if next == *origins {
        return;
    }
    for origin in next.iter().filter(|o| !origins.contains(o)) {
        tracing::warn!(peer = %peer.id, %origin, "relaying {origin}'s events to {}: their direct link is down", peer.id);
        sent.insert(origin.clone(), theirs.get(origin).copied().unwrap_or(0));
    }
    for origin in origins.iter().filter(|o| !next.contains(o)) {
        tracing::info!(peer = %peer.id, %origin, "stopped relaying {origin}'s events to {}: their link is back", peer.id);
    }
    let relayed: Vec<NodeId> = next.iter().filter(|o| !routed.contains(o)).cloned().collect();
    ctx.metrics.update_peer(&peer.id, |p| p.relaying = relayed);
    *origins = next;
}
