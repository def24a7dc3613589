//! Transports: how events travel between peers. One transport-neutral session, bound to a
//! wire by each binding; gRPC (tonic) is the built-in binding.
//!
//! - [`session`]: the sender's sans-IO state machine (resume from the receiver's frontier,
//!   window, acks, relay requests, redial backoff), shared by every binding;
//! - [`handshake`]: Hello admission, a pure check every receiving binding runs first;
//! - [`history`]: the history gate, which holds capture until the peers have said how many
//!   of this node's events they have;
//! - [`grpc`]: the tonic binding (endpoint, streams, framing);
//! - [`kafka`]: the Kafka binding (feature `kafka`): a topic per node's outgoing log, read
//!   by each receiver from the position stored with its rows.
//!
//! What every binding shares lives here: the [`Context`] of handles it needs of its node, the
//! bookkeeping of when each peer was last heard (the input of relay repair), and the
//! [`PeerObserver`] through which the transport reports, so it never depends on how figures
//! are kept.

pub mod admission;
pub mod audit;
pub mod grpc;
pub mod handshake;
pub mod history;
pub mod join;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod limits;
pub mod record;
pub mod session;
pub mod tls;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::NodeConfig;
use crate::event::NodeId;
use crate::store::{ApplyReport, Store};
pub use session::BehindLog;
use session::{Connected, Effects};

/// What the transport reports about its peers. Calls come from hot paths (every batch and
/// ack), so implementations must be cheap and must not block.
pub trait PeerObserver: Send + Sync {
    /// A stream to `peer` is up; `own_sent` of this node's events are sent and acknowledged.
    fn peer_connected(&self, peer: &str, own_sent: u64);
    /// The stream to `peer` failed; it will be redialled.
    fn peer_lost(&self, peer: &str);
    /// This node's own events are sent to `peer` up to `own_seq`.
    fn sent(&self, peer: &str, own_seq: u64);
    /// `peer` has durably applied this node's own events up to `own_seq`.
    fn acked(&self, peer: &str, own_seq: u64);
    /// The origins now relayed to `peer` (routed origins aside).
    fn relaying(&self, peer: &str, origins: &[NodeId]);
    /// A received batch was applied; `now_micros` is the wall clock at commit, for lag.
    fn applied(&self, report: &ApplyReport, now_micros: i64);
    /// A peer was found behind this node's log (it needs a re-seed).
    fn behind_log(&self, _peer: &str) {}
    /// A peer's clock, read from its heartbeat: `ahead_ms` ahead of this node's (negative:
    /// behind; the network's delay included), and whether that was too far to adopt.
    fn clock_offset(&self, peer: &str, ahead_ms: i64, refused: bool);
    /// Rows of a snapshot this node installed while joining.
    fn joined_rows(&self, _rows: u64) {}
    /// A batch from a peer was refused (`handshake::Refusal`).
    fn refused(&self) {}
}

/// When each peer's inbound stream last delivered a frame: how relay repair tells a failed
/// direct link.
pub struct Heard {
    /// When this node came up (a peer never heard counts as heard then).
    started: Instant,
    last: Mutex<BTreeMap<NodeId, Instant>>,
}

impl Heard {
    pub fn new(started: Instant) -> Self {
        Self {
            started,
            last: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn mark(&self, peer: &str, now: Instant) {
        self.last.lock().expect("heard lock").insert(peer.to_owned(), now);
    }

    /// The origins `peer` should relay to this node now (see `topology::relay_requests`).
    pub fn relay_requests(&self, config: &NodeConfig, peer: &str, now: Instant) -> Vec<NodeId> {
        let Some(after) = config.replication.relay_after() else {
            return Vec::new();
        };
        let last = self.last.lock().expect("heard lock");
        let heard_ago = |node: &str| last.get(node).map(|&at| now.duration_since(at));
        let up_for = now.duration_since(self.started);
        crate::topology::relay_requests(&config.topology, &config.node, peer, heard_ago, up_for, after)
    }
}

/// What a sender or receiver needs of its node.
#[derive(Clone)]
pub struct Context {
    pub config: Arc<NodeConfig>,
    pub store: Arc<Store>,
    pub observer: Arc<dyn PeerObserver>,
    /// Bumped whenever this node's log grows.
    pub log_grew: watch::Sender<u64>,
    /// Latest acknowledged seq per (peer, origin), persisted by the node's upkeep task.
    pub acks: Arc<Mutex<BTreeMap<(NodeId, NodeId), u64>>>,
    pub heard: Arc<Heard>,
    pub shutdown: watch::Receiver<bool>,
    /// Set when the node must stop (a reason nothing but an operator can fix).
    pub fatal: watch::Sender<Option<String>>,
    /// The (peer, origin) pairs found behind this node's log, reported once each.
    pub behind: Arc<Mutex<std::collections::BTreeSet<(NodeId, NodeId)>>>,
    /// The peer this node is joining from by snapshot, while it does.
    pub joining: watch::Sender<Option<NodeId>>,
    /// Where a peer's word that this node must re-seed goes (`join::join_loop`).
    pub join_requests: tokio::sync::mpsc::Sender<join::JoinRequest>,
    /// Whether the peers have confirmed, since this node started, that its database did not
    /// go back in time (or it has no peer to ask). Until then nothing is drained: numbering
    /// changes after a restore would reuse seqs the peers have, which they would drop.
    pub verified: watch::Sender<bool>,
    /// Origins taken out of the topology whose events this node holds
    /// (`topology::removed_origins`), as of its start.
    pub removed: Arc<std::collections::BTreeSet<NodeId>>,
    /// What the peers said of this node's own events since it started (`history`).
    pub history: Arc<Mutex<history::Gate>>,
    /// The latest report of every node this node has heard of (`stability`).
    pub reports: Arc<Reports>,
    /// (peer, cause) of the batches refused so far, each logged once.
    pub refusals: Arc<Mutex<std::collections::BTreeSet<(NodeId, &'static str)>>>,
    /// The listener's connection and stream-open limits.
    pub gate: Arc<limits::Gate>,
    /// Peers being caught up on a large backlog of this node's events (`catching_up`).
    pub catch_ups: Arc<Mutex<BTreeMap<NodeId, CatchUp>>>,
}

/// A peer this node's own events are far ahead of: when it was last said, and how far.
#[derive(Debug, Clone, Copy)]
pub struct CatchUp {
    said_at: std::time::Instant,
    acked_then: u64,
}

/// How far behind (in this node's own events) a peer must be for its catch-up to be shown.
pub const CATCH_UP_SHOWN_FROM: u64 = 10_000;

/// The latest report of each node, as learned from acknowledgements and heartbeats (the
/// node's own, or passed on by peers): what it has applied per origin, its own origin at its
/// last seq, and when it made it. A newer report replaces an older one, so a node that went
/// back in time (a restore) is seen as it is now.
#[derive(Debug, Default)]
pub struct Reports(Mutex<BTreeMap<NodeId, (i64, crate::stability::Frontiers)>>);

impl Reports {
    pub fn offer(&self, node: &str, at_micros: i64, frontiers: crate::stability::Frontiers) {
        let mut book = self.0.lock().expect("report book lock");
        match book.get(node) {
            Some((at, _)) if *at >= at_micros => {}
            _ => {
                book.insert(node.to_owned(), (at_micros, frontiers));
            }
        }
    }

    /// Takes the reports `peer` passed on to `me`: its own, and those of the nodes the
    /// topology carries `me`'s events to through it (their acknowledgements come back that
    /// way). Any other report is ignored: tombstone GC then waits for the node's own word,
    /// which is the safe side; a peer could otherwise hasten purges by speaking for nodes
    /// it never hears from.
    pub fn learn(
        &self,
        topology: &crate::config::Topology,
        me: &str,
        peer: &str,
        reports: Vec<crate::wire::proto::NodeReport>,
    ) {
        for (node, at, frontiers) in crate::wire::reports_from_proto(reports) {
            let vouched = node == peer || crate::topology::carries(topology, me, peer, &node);
            if node != me && topology.node(&node).is_some() && vouched {
                self.offer(&node, at, frontiers);
            }
        }
    }

    /// How long ago `node`'s report was made, in µs (`None`: no report yet).
    pub fn age_micros(&self, node: &str, now_micros: i64) -> Option<i64> {
        let book = self.0.lock().expect("report book lock");
        book.get(node).map(|(at, _)| now_micros - at)
    }

    /// Every report known, with when it was made.
    pub fn all(&self) -> Vec<(NodeId, i64, crate::stability::Frontiers)> {
        let book = self.0.lock().expect("report book lock");
        book.iter().map(|(n, (at, f))| (n.clone(), *at, f.clone())).collect()
    }

    /// The latest report of each node.
    pub fn latest(&self) -> BTreeMap<NodeId, crate::stability::Frontiers> {
        let book = self.0.lock().expect("report book lock");
        book.iter().map(|(n, (_, f))| (n.clone(), f.clone())).collect()
    }
}

impl Context {
    /// Counts a refused batch, and logs its cause the first time from that peer.
    pub fn refused(&self, peer: &str, refusal: &handshake::Refusal) {
        self.observer.refused();
        let first = self
            .refusals
            .lock()
            .expect("refusal book lock")
            .insert((peer.to_owned(), refusal.cause()));
        if first {
            tracing::warn!(%peer, cause = refusal.cause(), %refusal, "refused a batch from the peer (logged once per cause)");
        }
    }

    /// What every binding does after a run from `peer` committed: figures, the log grown by
    /// the local changes drained first, and the clocks found too far ahead.
    pub fn applied(&self, peer: &str, report: &ApplyReport) {
        self.observer.applied(report, crate::clock::now_micros());
        if report.drained.events > 0 {
            self.log_grew.send_replace(report.drained.last_seq);
        }
        for skew in &report.skew {
            tracing::warn!(%peer, remote_hlc = %skew.remote, ahead_ms = skew.ahead_ms, "peer clock ahead of max_clock_skew; timestamp not adopted");
        }
    }

    /// Whether this node runs in plain text (`insecure = true`).
    pub fn insecure(&self) -> bool {
        self.config.security == crate::config::Security::Insecure
    }

    /// This node's report now, offered to its own book; with every report it knows, for an
    /// acknowledgement or heartbeat.
    pub async fn reports_now(&self) -> Vec<crate::wire::proto::NodeReport> {
        // Refreshed at most every half second: acks come per batch, and the horizon moves by
        // GC rounds of seconds, so a read of the frontiers per ack would be wasted I/O.
        let now = crate::clock::now_micros();
        let stale = self
            .reports
            .age_micros(&self.config.node, now)
            .is_none_or(|age| age > 500_000);
        // Every origin, not only those of the batch just applied: an origin left out would
        // read as nothing applied.
        if stale && let Ok(mut own) = self.store.frontiers().await {
            own.insert(self.config.node.clone(), self.store.last_seq().await);
            self.reports.offer(&self.config.node, now, own);
        }
        crate::wire::reports_to_proto(&self.reports.all())
    }

    /// Takes the reports `peer` passed on (`Reports::learn`).
    pub fn learn(&self, peer: &str, reports: Vec<crate::wire::proto::NodeReport>) {
        self.reports
            .learn(&self.config.topology, &self.config.node, peer, reports);
    }

    /// Does what a session's connection asks: the Welcome's frontiers are acknowledgements.
    pub fn connected(&self, peer: &str, connected: &Connected) {
        self.record_acks(peer, &connected.acknowledged);
        self.observer.peer_connected(peer, connected.own_sent);
        for origin in &connected.relays_ended {
            tracing::info!(%peer, %origin, "stopped relaying {origin}'s events to {peer}: the stream to it restarted, and relays start over (it asks again if it still needs them)");
        }
        if !connected.relays_ended.is_empty() {
            self.observer.relaying(peer, &[]);
        }
        tracing::info!(%peer, resume = ?connected.resume, "streaming to peer");
        // Wherever the peer's frontier of this node's events is learnt (the Welcome, an ack, a
        // heartbeat), the catch-up display follows it: a peer may be caught up by a relay.
        self.catching_up(
            peer,
            connected.acknowledged.get(&self.config.node).copied().unwrap_or(0),
        );
    }

    /// Does what a session's answer to a reply asks.
    pub fn follow(&self, peer: &str, effects: Effects) {
        if let Some(frontiers) = &effects.acknowledged {
            self.record_acks(peer, frontiers);
            if !*self.verified.borrow() {
                // A peer that was joining when it said Welcome has its word by now: the gate
                // need not wait for it to redial.
                let knows = frontiers.get(&self.config.node).copied().unwrap_or(0);
                self.history.lock().expect("history lock").heard(peer, knows);
            }
        }
        if let Some(own) = effects.own_acked {
            self.observer.acked(peer, own);
            self.catching_up(peer, own);
        } else if let Some(own) = effects.acknowledged.as_ref().and_then(|f| f.get(&self.config.node)) {
            self.catching_up(peer, *own);
        }
        if let Some(change) = effects.relay {
            for origin in &change.started {
                if self.config.topology.node(origin).is_none() {
                    tracing::info!(%peer, %origin, "passing {origin}'s last events on to {peer} where it lacks them: {origin} was taken out of the topology");
                } else {
                    tracing::warn!(%peer, %origin, "relaying {origin}'s events to {peer}: their direct link is down");
                }
            }
            for origin in &change.stopped {
                tracing::info!(%peer, %origin, "stopped relaying {origin}'s events to {peer}: their link is back");
            }
            self.observer.relaying(peer, &change.relaying);
        }
    }

    /// Shows a long catch-up of `peer` on this node's own events (it was down, or joined):
    /// every 5 s while it is `CATCH_UP_SHOWN_FROM` or more behind, how far and how fast, and
    /// once when it has caught up.
    pub fn catching_up(&self, peer: &str, acked: u64) {
        let last = *self.log_grew.borrow();
        let behind = last.saturating_sub(acked);
        let now = std::time::Instant::now();
        let mut catch_ups = self.catch_ups.lock().expect("catch-up lock");
        match catch_ups.get(peer).copied() {
            None if behind >= CATCH_UP_SHOWN_FROM => {
                tracing::info!(%peer, behind, "catching the peer up on this node's events");
                catch_ups.insert(
                    peer.to_owned(),
                    CatchUp {
                        said_at: now,
                        acked_then: acked,
                    },
                );
            }
            Some(_) if behind < CATCH_UP_SHOWN_FROM / 10 => {
                tracing::info!(%peer, behind, "the peer has caught up on this node's events");
                catch_ups.remove(peer);
            }
            Some(seen) if now.duration_since(seen.said_at) >= std::time::Duration::from_secs(5) => {
                let secs = now.duration_since(seen.said_at).as_secs_f64();
                let per_s = acked.saturating_sub(seen.acked_then) as f64 / secs;
                let eta_s = (per_s > 0.0).then(|| (behind as f64 / per_s).round());
                tracing::info!(%peer, behind, events_per_s = per_s.round(), eta_s, "catching the peer up on this node's events");
                catch_ups.insert(
                    peer.to_owned(),
                    CatchUp {
                        said_at: now,
                        acked_then: acked,
                    },
                );
            }
            _ => {}
        }
    }

    /// Reports a peer behind this node's log: once at ERROR with what to do, and in the
    /// database for `weft status`; the stream is redialled with backoff meanwhile.
    pub async fn behind_log(&self, behind: &BehindLog) {
        let first = self
            .behind
            .lock()
            .expect("behind-log lock")
            .insert((behind.peer.clone(), behind.origin.clone()));
        if !first {
            tracing::debug!(%behind, "peer still behind this node's log");
            return;
        }
        tracing::error!(peer = %behind.peer, origin = %behind.origin, "{behind}");
        self.observer.behind_log(&behind.peer);
        if let Err(error) = self
            .store
            .note_behind_log(&behind.peer, &behind.origin, Some(&behind.to_string()))
            .await
        {
            tracing::warn!(%error, "cannot record the peer behind the log for weft status");
        }
    }

    /// A peer says this node needs events its log no longer holds: ask for a join from it.
    /// The join loop takes one at a time, keeps those that come while a join runs, and drops
    /// those that no longer hold when their turn comes.
    pub fn request_join(&self, request: join::JoinRequest) {
        tracing::warn!(peer = %request.peer, origin = %request.origin, needs = request.needs, "{}", request.reason);
        if self.join_requests.try_send(request).is_err() {
            tracing::debug!("re-seed requests are already waiting");
        }
    }

    /// Records `peer`'s word on this node's history: it has this node's events up to
    /// `knows`. A new word showing the database went back is said at WARN (once per word).
    pub fn history_heard(&self, peer: &str, knows: u64, ours: u64) {
        let new = self.history.lock().expect("history lock").heard(peer, knows);
        if let Some(went_back) = handshake::WentBack::check(
            &self.config.node,
            peer,
            &[(self.config.node.clone(), knows)].into(),
            ours,
        ) && new
        {
            tracing::warn!(%peer, has = knows, ours, "{went_back}");
        }
    }

    /// Acts on what the history gate says now: confirms this node's history, asks for a
    /// re-seed from the peer that has most of its events, or says whom it waits for.
    pub async fn reconsider_history(&self) -> history::Verdict {
        let ours = self.store.last_seq().await;
        let verdict = self.history.lock().expect("history lock").verdict(ours, Instant::now());
        match &verdict {
            history::Verdict::Confirmed { unheard } => {
                if !unheard.is_empty() && !*self.verified.borrow() {
                    let wait = self.history.lock().expect("history lock").wait();
                    tracing::warn!(
                        unheard = %unheard.join(", "),
                        "confirming this database's history without the word of {} after waiting {wait:?} \
                         (history_wait_secs): if one of them has more of this node's events, those are numbered \
                         again here and lost there",
                        unheard.join(", ")
                    );
                }
                self.peer_confirmed();
            }
            history::Verdict::WentBack(went_back) => {
                if self.history.lock().expect("history lock").ask(went_back) {
                    self.request_join(join::JoinRequest::went_back(
                        &went_back.peer,
                        &self.config.node,
                        went_back,
                    ));
                }
            }
            history::Verdict::Waiting { unheard } => {
                if self.history.lock().expect("history lock").waiting_changed(unheard) {
                    tracing::info!(
                        "this node waits for {} to say how many of its events they have before it numbers any change \
                         (at most history_wait_secs from start, then those that answered decide)",
                        unheard.join(", ")
                    );
                }
            }
        }
        verdict
    }

    /// Whether this node publishes its log into a Kafka topic (a downstream peer on a Kafka
    /// link). Its topic may then hold more of its events than any gRPC peer has, so only
    /// the Kafka history check (`kafka::acks::confirm_history`, which reads the topic)
    /// confirms its history; a gRPC peer's word is not enough.
    pub fn publishes_on_kafka(&self) -> bool {
        let (topology, me) = (&self.config.topology, &self.config.node);
        (crate::topology::downstream(topology, me).iter())
            .any(|peer| topology.link_transport(me, &peer.id) == crate::config::Transport::Kafka)
    }

    /// The gRPC peers (`history`) confirmed this node's history: enough unless the node
    /// publishes on Kafka (`publishes_on_kafka`), where the Kafka check decides.
    pub fn peer_confirmed(&self) {
        if !self.publishes_on_kafka() {
            self.verify();
        }
    }

    /// This node's history is confirmed: capture may number changes.
    pub fn verify(&self) {
        self.verified.send_if_modified(|v| {
            let was = *v;
            *v = true;
            if !was {
                tracing::info!("the peers confirmed this database's history; capturing");
            }
            !was
        });
    }

    /// Clears what `behind_log` recorded for `peer` once it is served again.
    pub async fn caught_up(&self, peer: &str) {
        let cleared: Vec<NodeId> = {
            let mut behind = self.behind.lock().expect("behind-log lock");
            let origins: Vec<NodeId> = behind
                .iter()
                .filter(|(p, _)| p == peer)
                .map(|(_, o)| o.clone())
                .collect();
            behind.retain(|(p, _)| p != peer);
            origins
        };
        for origin in cleared {
            tracing::info!(%peer, %origin, "peer is served from this node's log again");
            let _ = self.store.note_behind_log(peer, &origin, None).await;
        }
    }

    /// Records a peer's frontiers: they are its acknowledgements, for every origin.
    pub fn record_acks(&self, peer: &str, frontiers: &BTreeMap<NodeId, u64>) {
        let mut acks = self.acks.lock().expect("ack book lock");
        for (origin, &seq) in frontiers {
            let entry = acks.entry((peer.to_owned(), origin.clone())).or_insert(0);
            *entry = (*entry).max(seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_speaks_only_for_itself_and_the_nodes_it_carries_our_events_to() {
        let topology = handshake::tests::topology();
        let report = |node: &str| (node.to_owned(), 7, [("n0".to_owned(), 99)].into_iter().collect());
        let reports = Reports::default();
        let all = [report("n0"), report("n1"), report("n2"), report("mallory")];
        reports.learn(&topology, "n0", "n1", crate::wire::reports_to_proto(&all));
        let known: Vec<NodeId> = reports.latest().into_keys().collect();
        assert_eq!(known, ["n1"], "all-to-all: n2 reports to n0 itself, n0 knows its own");
    }
}
