//! The gRPC binding of the session: one long-lived bidirectional stream from each sender to
//! each peer. This file only moves frames; what to send and what a reply means is decided by
//! [`session::Feeder`], who may feed us by [`handshake::check_hello`].
//!
//! Sender side (`feed_peer`): dial, send Hello, hand the receiver's frontiers from Welcome to
//! the feeder, and send the batches it names; heartbeats keep an idle stream alive and detect
//! a dead one. Any failure drops the stream and redials after the feeder's backoff; the
//! receiver's frontiers make the resend exact.
//!
//! Receiver side (`Service`): admit the Hello, answer Welcome, then apply each batch durably
//! and only then acknowledge it with the new frontiers and this node's relay requests. A gap
//! or a failed apply ends the stream, so the sender resends from the frontier.
use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use super::BehindLog;
use super::Context;
use super::handshake::{self, Hello, Refusal};
use super::session::{Backoff, Feeder, Settings, Tick};
use crate::clock::now_micros;
use crate::config::NodeSpec;
use crate::event::NodeId;
use crate::shutdown::stopped;
use crate::wire::{self, PROTOCOL, frontiers_from_proto, frontiers_to_proto, proto};

use proto::receive_frame::Body as Reply;
use proto::replication_client::ReplicationClient;
pub use proto::replication_server::ReplicationServer;
use proto::send_frame::Body as Outgoing;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot reach {peer}: {}", super::tls::chain(source))]
    Connect {
        peer: NodeId,
        source: tonic::transport::Error,
    },
    #[error("cannot dial {peer}: {message}")]
    Dial { peer: NodeId, message: String },
    #[error("{peer} refused the stream: {status}")]
    Refused { peer: NodeId, status: Status },
    #[error("{peer}: {message}")]
    Protocol { peer: NodeId, message: String },
    #[error("{peer} was silent for {0:?}", timeout)]
    Silent { peer: NodeId, timeout: Duration },
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The peer needs events this node's log no longer holds (see `BehindLog`).
    #[error("{0}")]
    BehindLog(crate::transport::BehindLog),
}

/// How far ahead of this node's clock a received event's HLC may be: ten times the clock
/// skew tolerated, and at least a minute (a peer's clock a little off is reported, not
/// refused; one an hour ahead would pin rows under last-writer-wins).
pub fn max_ahead_ms(max_clock_skew: Duration) -> i64 {
    (max_clock_skew.as_millis() as i64 * 10).max(60_000)
}

/// Whether gRPC refused a message for its size (either end's limit), by what it said.
fn refused_for_size(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    ["message length too large", "message too large"]
        .iter()
        .any(|needle| lower.contains(needle))
}

/// Whether a status refuses the requester for who it is (its certificate, mesh, node or
/// protocol), rather than for what this node cannot do now.
fn refused_for_who(status: &Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::PermissionDenied | Code::Unauthenticated | Code::FailedPrecondition | Code::InvalidArgument
    )
}

fn refusal_status(refusal: Refusal) -> Status {
    let message = refusal.to_string();
    match refusal {
        Refusal::Protocol { .. } => Status::failed_precondition(message),
        Refusal::OtherMesh { .. }
        | Refusal::NotAPeer { .. }
        | Refusal::WrongPeer { .. }
        | Refusal::UnknownOrigin { .. }
        | Refusal::WrongRegion { .. }
        | Refusal::NotRouted { .. }
        | Refusal::ForgedPath { .. }
        | Refusal::CounterLeap { .. }
        | Refusal::FutureHlc { .. }
        | Refusal::UnknownOwner { .. }
        | Refusal::NotTheOwner { .. }
        | Refusal::AheadOfUs { .. }
        | Refusal::Strangers { .. } => Status::permission_denied(message),
    }
}

/// The receiving half, served by the node's gRPC server.
pub struct Service {
    ctx: Context,
    /// Checksum trees of the audits in progress (`audit`).
    trees: std::sync::Arc<super::audit::Trees>,
}

impl Service {
    /// Counts a stream opened on this connection against its address's rate.
    fn opened(&self, extensions: &tonic::Extensions) -> Result<(), Status> {
        let Some(info) = extensions.get::<super::tls::PeerInfo>() else {
            return Ok(());
        };
        (self.ctx.gate)
            .open(info.addr.ip(), std::time::Instant::now())
            .map_err(|busy| Status::resource_exhausted(busy.to_string()))
    }

    /// Logs a request this node refuses on the connection it came by: what it asked, the
    /// node it claimed to be, its address, and why (rate-limited per address and kind);
    /// returns the status for the peer.
    fn refuse(&self, rpc: &'static str, extensions: &tonic::Extensions, claimed: &str, status: Status) -> Status {
        let addr = extensions.get::<super::tls::PeerInfo>().map(|i| i.addr);
        let ip = addr.map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip());
        if self
            .ctx
            .gate
            .log_refusal(ip, &format!("{rpc} {claimed}"), std::time::Instant::now())
        {
            let from = addr.map_or_else(
                || "an address the listener did not record".to_owned(),
                |a| a.to_string(),
            );
            tracing::warn!(
                rpc,
                %from,
                claims = %claimed,
                code = ?status.code(),
                "refused a peer's {rpc} request from {from} claiming to be `{claimed}`: {} (logged once a minute per address and kind)",
                status.message()
            );
        }
        status
    }

    pub fn new(ctx: Context) -> Self {
        Self {
            ctx,
            trees: std::sync::Arc::default(),
        }
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
    shutdown: tokio::sync::watch::Receiver<bool>,
    done: bool,
}

impl Inbound {
    async fn next_reply(&mut self) -> Option<Result<proto::ReceiveFrame, Status>> {
        if self.done {
            return None;
        }
        let silence = self.ctx.config.replication.peer_timeout();
        let frame = tokio::select! {
            _ = stopped(&mut self.shutdown) => return None,
            frame = timeout(silence, self.frames.message()) => frame,
        };
        if matches!(frame, Ok(Ok(Some(_)))) {
            self.ctx.heard.mark(&self.peer, Instant::now());
        }
        let result = match frame {
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no frame from {} for {silence:?}",
                self.peer
            ))),
            Ok(Err(status)) => {
                if refused_for_size(status.message()) {
                    tracing::error!(
                        peer = %self.peer,
                        limit_mib = self.ctx.config.replication.max_message_mib,
                        "refused a frame from {} for its size ({}): it is larger than max_message_mib allows here; set max_message_mib alike on every node",
                        self.peer,
                        status.message()
                    );
                }
                Err(status)
            }
            Ok(Ok(None)) => return None,
            Ok(Ok(Some(proto::SendFrame {
                body: Some(Outgoing::Heartbeat(_)),
            }))) => self.heartbeat().await,
            Ok(Ok(Some(proto::SendFrame {
                body: Some(Outgoing::Batch(batch)),
            }))) => self.apply(batch).await,
            Ok(Ok(Some(proto::SendFrame {
                body: Some(Outgoing::Reseed(reseed)),
            }))) => {
                self.ctx.request_join(super::join::JoinRequest {
                    peer: self.peer.clone(),
                    origin: reseed.origin,
                    needs: reseed.needs,
                    reason: reseed.reason,
                });
                self.done = true;
                return None;
            }
            Ok(Ok(Some(_))) => Err(Status::invalid_argument("expected a batch or a heartbeat")),
        };
        if result.is_err() {
            self.done = true;
        }
        Some(result)
    }

    /// Answers a heartbeat with our clock, frontiers and relay requests.
    async fn heartbeat(&self) -> Result<proto::ReceiveFrame, Status> {
        let frontiers = self
            .ctx
            .store
            .frontiers()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(reply(Reply::Heartbeat(proto::Heartbeat {
            sent_at_micros: now_micros(),
            hlc: self.ctx.store.clock().last().0,
            frontiers: frontiers_to_proto(&frontiers),
            relay_wanted: self.relay_wanted(),
            reports: self.ctx.reports_now().await,
        })))
    }

    async fn apply(&mut self, batch: proto::Batch) -> Result<proto::ReceiveFrame, Status> {
        let events = batch
            .events
            .into_iter()
            .map(wire::event_from_proto)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let wanted = self.relay_wanted();
        let config = &self.ctx.config;
        let admission = super::admission::Admission {
            topology: &config.topology,
            me: &config.node,
            peer: &self.peer,
            relay_wanted: &wanted,
            max_ahead_ms: max_ahead_ms(config.replication.max_clock_skew()),
            now_ms: now_micros() / 1000,
            my_last_seq: self.ctx.store.last_seq().await,
        };
        admission.check(&events).map_err(|refusal| {
            self.ctx.refused(&self.peer, &refusal);
            refusal_status(refusal)
        })?;
        // Applying drains local changes first, which numbers them: not before this node's
        // history is confirmed by a peer (a re-seed may be under way).
        let mut verified = self.ctx.verified.subscribe();
        tokio::select! {
            _ = stopped(&mut self.shutdown) => return Err(Status::unavailable("stopping")),
            result = verified.wait_for(|v| *v) => if result.is_err() { return Err(Status::unavailable("stopping")) },
        }
        let report = self.ctx.store.apply(events).await.map_err(|e| {
            tracing::error!(peer = %self.peer, error = %e, "apply failed; the peer will resend");
            Status::unavailable(format!("apply failed: {e}"))
        })?;
        crate::crashpoint::hit("after-apply");
        self.ctx.applied(&self.peer, &report);
        if let Some((origin, frontier, got)) = &report.gap {
            return Err(Status::failed_precondition(format!(
                "gap from {origin}: have {frontier}, got {got}; resend from {}",
                frontier + 1
            )));
        }
        Ok(reply(Reply::Ack(proto::Ack {
            frontiers: frontiers_to_proto(&report.frontiers),
            relay_wanted: self.relay_wanted(),
            reports: self.ctx.reports_now().await,
        })))
    }

    /// The origins this node asks the peer to relay: those whose direct link is silent, and
    /// those taken out of the topology, whose last events any remaining peer may hold.
    fn relay_wanted(&self) -> Vec<NodeId> {
        let mut wanted = self
            .ctx
            .heard
            .relay_requests(&self.ctx.config, &self.peer, Instant::now());
        wanted.extend(self.ctx.removed.iter().cloned());
        wanted
    }
}

impl Service {
    /// What the peer has of this node's own events is its word to the history gate. More
    /// than this database holds shows it went back in time: the stream is refused until the
    /// node has re-seeded (from the peer that has most of its events, once the gate has
    /// heard the others).
    async fn check_history(&self, hello: &proto::Hello) -> Result<(), Status> {
        let me = &self.ctx.config.node;
        let ours = self.ctx.store.last_seq().await;
        self.ctx.history_heard(&hello.node_id, hello.knows_of_you, ours);
        self.ctx.reconsider_history().await;
        if hello.knows_of_you > ours {
            return Err(Status::unavailable(format!(
                "{me}'s database went back in time; it re-seeds from the peer that has most of its events"
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl proto::replication_server::Replication for Service {
    type ReplicateStream = ReplyStream;
    type SnapshotStream = ReceiverStream<Result<proto::SnapshotChunk, Status>>;

    async fn snapshot(
        &self,
        request: Request<proto::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let (_, extensions, request) = request.into_parts();
        self.opened(&extensions)?;
        let hello = request.hello.as_ref().map(|h| h.node_id.clone()).unwrap_or_default();
        let refuse = |status| self.refuse("snapshot", &extensions, &hello, status);
        super::tls::check_peer(&extensions, &hello, self.ctx.insecure()).map_err(refuse)?;
        let chunks =
            super::join::serve(self.ctx.clone(), request)
                .await
                .map_err(|status| match refused_for_who(&status) {
                    true => refuse(status),
                    false => status,
                })?;
        Ok(Response::new(chunks))
    }

    async fn audit(&self, request: Request<proto::AuditRequest>) -> Result<Response<proto::AuditReply>, Status> {
        let (_, extensions, request) = request.into_parts();
        self.opened(&extensions)?;
        let claimed = request.hello.as_ref().map(|h| h.node_id.clone()).unwrap_or_default();
        let reply = super::audit::answer(&self.ctx, &self.trees, &extensions, request)
            .await
            .map_err(|status| match refused_for_who(&status) {
                true => self.refuse("audit", &extensions, &claimed, status),
                false => status,
            })?;
        Ok(Response::new(reply))
    }

    async fn replicate(
        &self,
        request: Request<Streaming<proto::SendFrame>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        let extensions = request.extensions().clone();
        self.opened(&extensions)?;
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
        let refuse = |status| self.refuse("replicate", &extensions, &hello.node_id, status);
        handshake::check_hello(claim, &config.topology, &config.node).map_err(|r| refuse(refusal_status(r)))?;
        super::tls::check_peer(&extensions, &hello.node_id, self.ctx.insecure()).map_err(refuse)?;
        self.check_history(&hello).await?;
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
            mesh: config.topology.mesh.clone(),
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

/// Feeds one peer until shutdown, redialling with the feeder's backoff after any failure.
pub async fn feed_peer(ctx: Context, peer: NodeSpec) {
    let mut shutdown = ctx.shutdown.clone();
    let mut feeder = Feeder::new(Settings::for_peer(&ctx.config, &peer.id).keeping(&ctx.removed));
    let mut backoff = Backoff::default();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let started = Instant::now();
        let Err(error) = session(&ctx, &peer, &mut feeder).await else {
            return;
        };
        feeder.on_disconnect();
        ctx.observer.peer_lost(&peer.id);
        let redial = backoff.on_failure(started.elapsed());
        if let TransportError::BehindLog(behind) = &error {
            ctx.behind_log(behind).await;
        } else if refused_for_size(&error.to_string()) {
            tracing::error!(
                peer = %peer.id,
                %error,
                failures = redial.failures,
                "a frame to {} was refused for its size: the peer's max_message_mib is smaller than what this node sends; set max_message_mib alike on every node",
                peer.id
            );
        } else if redial.worth_reporting() {
            tracing::warn!(peer = %peer.id, %error, failures = redial.failures, "peer stream down; redialling");
        }
        tokio::select! {
            _ = stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(redial.wait) => {}
        }
    }
}

/// One connection's life. `Ok` only on shutdown.
async fn session(ctx: &Context, peer: &NodeSpec, feeder: &mut Feeder) -> Result<(), TransportError> {
    let client = dial(ctx, peer).await?;
    let (out, out_rx) = mpsc::channel::<proto::SendFrame>(ctx.config.replication.window + 2);
    let mut link = Outbound {
        ctx,
        peer: &peer.id,
        feeder,
        out,
    };
    let mut inbound = link.open(client, out_rx).await?;
    // A first window sent means the log serves this peer (again): once per connection.
    let result = match link.fill_window().await {
        Ok(()) => {
            ctx.caught_up(&peer.id).await;
            link.run(&mut inbound).await
        }
        Err(error) => Err(error),
    };
    if let Err(TransportError::BehindLog(_)) = &result {
        // Let the Reseed frame reach the peer: it ends the stream once it has read it.
        let _ = timeout(ctx.config.replication.peer_timeout(), inbound.message()).await;
    }
    result
}

pub(super) async fn dial(ctx: &Context, peer: &NodeSpec) -> Result<ReplicationClient<Channel>, TransportError> {
    let tuning = &ctx.config.replication;
    let unreachable = |source| TransportError::Connect {
        peer: peer.id.clone(),
        source,
    };
    let endpoint = super::tls::endpoint(&ctx.config.security, &peer.id, ctx.config.address_of(peer))
        .map_err(|message| TransportError::Dial {
            peer: peer.id.clone(),
            message,
        })?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        // Liveness of the connection itself, even while a long apply holds back our acks.
        .http2_keep_alive_interval(tuning.heartbeat())
        .keep_alive_timeout(tuning.peer_timeout())
        .keep_alive_while_idle(true);
    let channel = endpoint.connect().await.map_err(unreachable)?;
    Ok(ReplicationClient::new(channel)
        .max_decoding_message_size(tuning.max_message_bytes())
        .max_encoding_message_size(tuning.max_message_bytes()))
}

/// The sending end of one stream: frames out through `out`, decisions by `feeder`.
struct Outbound<'a> {
    ctx: &'a Context,
    peer: &'a NodeId,
    feeder: &'a mut Feeder,
    out: mpsc::Sender<proto::SendFrame>,
}

impl Outbound<'_> {
    /// Says Hello and hands the Welcome's frontiers to the feeder; returns the reply stream.
    async fn open(
        &mut self,
        mut client: ReplicationClient<Channel>,
        out_rx: mpsc::Receiver<proto::SendFrame>,
    ) -> Result<Streaming<proto::ReceiveFrame>, TransportError> {
        let config = &self.ctx.config;
        let knows_of_you = self.ctx.store.frontiers().await?.get(self.peer).copied().unwrap_or(0);
        let hello = Outgoing::Hello(proto::Hello {
            protocol: PROTOCOL,
            node_id: config.node.clone(),
            region: config.region().to_owned(),
            mesh: config.topology.mesh.clone(),
            knows_of_you,
        });
        self.out.send(frame(hello)).await.expect("receiver is alive");
        let mut inbound = client
            .replicate(ReceiverStream::new(out_rx))
            .await
            .map_err(|status| self.refused(status))?
            .into_inner();
        let welcome = timeout(config.replication.peer_timeout(), inbound.message())
            .await
            .map_err(|_| self.silent())?
            .map_err(|status| self.refused(status))?;
        let Some(proto::ReceiveFrame {
            body: Some(Reply::Welcome(welcome)),
        }) = welcome
        else {
            return Err(self.protocol("expected Welcome"));
        };
        // The Welcome's frontiers become acknowledgements (and let the log be trimmed): only
        // from the node we meant to reach.
        handshake::check_welcome(self.peer, &welcome.node_id, &welcome.mesh, &config.topology)
            .map_err(|refusal| self.protocol(&refusal.to_string()))?;
        let frontiers = frontiers_from_proto(welcome.frontiers);
        let ours = self.ctx.store.last_seq().await;
        let knows = frontiers.get(&config.node).copied().unwrap_or(0);
        self.ctx.history_heard(self.peer, knows, ours);
        self.ctx.reconsider_history().await;
        if knows > ours {
            // Nothing is numbered until this is settled (capture waits for `verified`): the
            // join raises this node's seq past what the best-informed peer has, then re-seeds.
            return Err(self.protocol("this node's database went back in time; it re-seeds before streaming"));
        }
        let connected = self.feeder.on_welcome(frontiers, Instant::now());
        self.ctx.connected(self.peer, &connected);
        Ok(inbound)
    }

    async fn run(&mut self, inbound: &mut Streaming<proto::ReceiveFrame>) -> Result<(), TransportError> {
        let mut log_grew = self.ctx.log_grew.subscribe();
        let mut shutdown = self.ctx.shutdown.clone();
        let mut heartbeat = tokio::time::interval(self.ctx.config.replication.heartbeat());
        loop {
            log_grew.borrow_and_update();
            self.fill_window().await?;
            if self.feeder.may_leave(Instant::now()) {
                return Ok(());
            }
            let stopping = self.feeder.stopping();
            tokio::select! {
                changed = log_grew.changed(), if !stopping => {
                    if changed.is_err() { self.feeder.on_stop(Instant::now()); }
                }
                _ = stopped(&mut shutdown), if !stopping => self.feeder.on_stop(Instant::now()),
                message = inbound.message() => {
                    let message = message.map_err(|status| self.refused(status))?;
                    self.on_reply(message)?;
                }
                _ = heartbeat.tick() => match self.feeder.on_tick(Instant::now()) {
                    Tick::Dead => return Err(self.silent()),
                    Tick::Leave => return Ok(()),
                    Tick::Beat => self.send(Outgoing::Heartbeat(proto::Heartbeat {
                        sent_at_micros: now_micros(),
                        hlc: self.ctx.store.clock().last().0,
                        ..Default::default()
                    })).await?,
                },
            }
        }
    }

    /// Sends the batches the feeder names until its window is full or the log is exhausted.
    /// A frame gathers the origins' reads until it holds `frame_budget` bytes of events (a
    /// read ends on a capture-batch boundary, so it may pass the budget by part of a batch,
    /// never `max_payload_bytes`: a batch that would take it past waits for the next frame).
    async fn fill_window(&mut self) -> Result<(), TransportError> {
        let tuning = &self.ctx.config.replication;
        let (budget, hard) = (tuning.frame_budget(), tuning.max_payload_bytes());
        while let Some(reads) = self.feeder.next_batch_bounds() {
            let mut events = Vec::new();
            let mut last = Vec::new();
            let mut bytes = 0usize;
            for read in reads {
                if bytes >= budget {
                    break;
                }
                // How far the log of this origin went: for this node's own, its last seq read
                // before the log (a drain between the two only adds).
                let own = (read.origin == self.ctx.config.node).then(|| *self.ctx.log_grew.borrow());
                let entries = self
                    .ctx
                    .store
                    .read_log_within(&read.origin, read.after, read.max, (budget - bytes, hard - bytes))
                    .await?;
                let first = entries.first().map(|e| e.seq);
                // A relayed origin trimmed to nothing: what the log dropped of it says how far
                // it went (the peer is behind if that is past its frontier).
                let produced = match (own, first) {
                    (Some(own), _) => Some(own),
                    (None, None) => Some(self.ctx.store.log_high(&read.origin).await?),
                    (None, Some(_)) => None,
                };
                if let Some(behind) = BehindLog::check(self.peer, &read.origin, read.after, first, produced) {
                    // Tell the peer, so it re-seeds by snapshot; the stream ends either way.
                    let _ = self
                        .send(Outgoing::Reseed(proto::Reseed {
                            origin: behind.origin.clone(),
                            needs: behind.needs,
                            reason: behind.to_string(),
                        }))
                        .await;
                    return Err(TransportError::BehindLog(behind));
                }
                let size: usize = entries.iter().map(|e| e.bytes.len()).sum();
                if events.is_empty() && size > hard {
                    return Err(self.too_large(&read.origin, &entries, size, hard));
                }
                if bytes + size > hard {
                    break;
                }
                bytes += size;
                if let Some(entry) = entries.last() {
                    last.push((read.origin, entry.seq));
                }
                for entry in entries {
                    let event: proto::Event = prost::Message::decode(entry.bytes.as_slice())
                        .map_err(|e| self.protocol(&format!("corrupt log entry: {e}")))?;
                    events.push(event);
                }
            }
            if events.is_empty() {
                break;
            }
            self.send(Outgoing::Batch(proto::Batch { events })).await?;
            let own = self.feeder.record_sent(last);
            self.ctx.observer.sent(self.peer, own);
        }
        Ok(())
    }

    /// A capture batch too large for any message (written before capture batches were
    /// bounded by bytes, or under a larger `max_message_mib` than this node's): it cannot be
    /// sent, and the peer cannot get past it. Said as an error, each time the stream fails.
    fn too_large(&self, origin: &str, entries: &[crate::store::LogEntry], size: usize, limit: usize) -> TransportError {
        let (first, last) = (entries[0].seq, entries[entries.len() - 1].seq);
        let mib = |bytes: usize| format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20));
        let message = format!(
            "{origin}'s capture batch {first}..={last} is {}, more than a message may carry ({} of events under \
             max_message_mib): it cannot be sent to {}; raise max_message_mib on this node and the peer",
            mib(size),
            mib(limit),
            self.peer
        );
        tracing::error!(peer = %self.peer, %origin, first, last, bytes = size, "{message}");
        self.protocol(&message)
    }

    fn on_reply(&mut self, message: Option<proto::ReceiveFrame>) -> Result<(), TransportError> {
        let now = Instant::now();
        match message {
            Some(proto::ReceiveFrame {
                body: Some(Reply::Ack(ack)),
            }) => {
                self.ctx.learn(self.peer, ack.reports);
                let effects = self
                    .feeder
                    .on_ack(frontiers_from_proto(ack.frontiers), &ack.relay_wanted, now);
                self.ctx.follow(self.peer, effects);
            }
            Some(proto::ReceiveFrame {
                body: Some(Reply::Heartbeat(beat)),
            }) => {
                self.ctx.learn(self.peer, beat.reports);
                let effects = self
                    .feeder
                    .on_heartbeat(frontiers_from_proto(beat.frontiers), &beat.relay_wanted, now);
                self.ctx.follow(self.peer, effects);
                let remote = crate::event::Hlc(beat.hlc);
                let ahead_ms = remote.physical_ms() - crate::clock::now_micros() / 1000;
                let refused = self.ctx.store.clock().observe_now(remote).is_err();
                if refused {
                    tracing::warn!(peer = %self.peer, ahead_ms, "peer clock ahead of max_clock_skew");
                }
                self.ctx.observer.clock_offset(self.peer, ahead_ms, refused);
            }
            Some(_) => return Err(self.protocol("unexpected frame")),
            None => return Err(self.protocol("peer closed the stream")),
        }
        Ok(())
    }

    async fn send(&self, body: Outgoing) -> Result<(), TransportError> {
        self.out
            .send(frame(body))
            .await
            .map_err(|_| self.protocol("stream closed"))
    }

    fn refused(&self, status: Status) -> TransportError {
        TransportError::Refused {
            peer: self.peer.clone(),
            status,
        }
    }

    fn protocol(&self, message: &str) -> TransportError {
        TransportError::Protocol {
            peer: self.peer.clone(),
            message: message.to_owned(),
        }
    }

    fn silent(&self) -> TransportError {
        TransportError::Silent {
            peer: self.peer.clone(),
            timeout: self.ctx.config.replication.peer_timeout(),
        }
    }
}

fn frame(body: Outgoing) -> proto::SendFrame {
    proto::SendFrame { body: Some(body) }
}
