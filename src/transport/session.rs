//! The sender's half of one peer link as a sans-IO state machine: which log events go to the
//! peer next, and what every reply from the peer means. It reads no clock, opens no socket and
//! touches no store; a binding (gRPC today, Kafka later) moves the bytes and feeds it events.
//!
//! A binding must:
//! - call `on_welcome` with the receiver's frontiers each time a connection is up, and
//!   `on_disconnect` each time one is lost, then redial after the wait `Backoff` gives;
//! - while `next_batch_bounds` names log reads, read them (the store ends every read on a
//!   capture-batch boundary), send all their events as one batch, and report the last seq read
//!   per origin with `record_sent`;
//! - report an acknowledgement (`on_ack`) only once the receiver has durably applied the batch
//!   and with the receiver's frontiers after that commit, and relay requests as they come;
//! - do what the returned `Connected` / `Effects` say (record the frontiers as the peer's
//!   acknowledgements, tell the observer, log relay changes: `Context::connected` and
//!   `Context::follow` do exactly that), and pass the time of each event.
//!
//! In return the feeder guarantees:
//! - exact resend: after every (re)connect each origin resumes right after the receiver's
//!   frontier, so a lost batch or a lost ack costs a resend, never a gap, and nothing the
//!   receiver already holds is sent again unless it was in flight;
//! - capture batches are never split: every read starts where the previous one ended;
//! - back-pressure: at most `window` batches are unacknowledged;
//! - relay repair: an origin the peer asks for (and this node keeps) is streamed from the
//!   peer's frontier for it, until the peer stops asking; since receivers ask exactly one peer
//!   per silent origin (`topology::relay_requests`), exactly one relay runs per origin;
//! - liveness and stop: an idle link silent past the peer timeout is dead, and a stopping
//!   feeder leaves once everything sent is acknowledged or `STOP_GRACE` has passed.
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::NodeConfig;
use crate::event::NodeId;
use crate::topology;

/// How long a stopping feeder waits for outstanding acks before it leaves anyway: a node that
/// stops should not lose its last batches' acks, nor hang on a peer that will never answer.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// What one feeder is for: the link `me` → `peer` and its limits.
#[derive(Debug, Clone)]
pub struct Settings {
    pub me: NodeId,
    pub peer: NodeId,
    /// Origins the topology routes to the peer through us: streamed on every connection.
    pub routed: Vec<NodeId>,
    /// Origins this node keeps in its log, and so can relay when the peer asks.
    pub kept: BTreeSet<NodeId>,
    /// Batches that may be unacknowledged at once.
    pub window: usize,
    /// About how many events one read of one origin's log returns.
    pub batch_max_events: usize,
    /// An idle peer silent this long is taken for dead.
    pub peer_timeout: Duration,
}

impl Settings {
    /// The settings of `config`'s node feeding `peer`.
    pub fn for_peer(config: &NodeConfig, peer: &str) -> Self {
        let me = &config.node;
        Self {
            me: me.clone(),
            peer: peer.to_owned(),
            routed: topology::origins_for(&config.topology, me, peer)
                .into_iter()
                .map(str::to_owned)
                .collect(),
            kept: topology::kept_origins(&config.topology, me, config.relay_repair()),
            window: config.replication.window,
            batch_max_events: config.replication.batch_max_events,
            peer_timeout: config.replication.peer_timeout(),
        }
    }

    /// Also relays, when the peer asks, the origins taken out of the topology this node
    /// still holds events of (`topology::removed_origins`).
    pub fn keeping(mut self, removed: &BTreeSet<NodeId>) -> Self {
        self.kept.extend(removed.iter().cloned());
        self
    }
}

/// One read of the log: up to about `max` events of `origin` with seq > `after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRead {
    pub origin: NodeId,
    pub after: u64,
    pub max: usize,
}

/// What a binding does when a connection comes up.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct Connected {
    /// The receiver's frontiers: its acknowledgement of every origin up to them.
    pub acknowledged: BTreeMap<NodeId, u64>,
    /// Where streaming resumes, per origin (for the log line).
    pub resume: BTreeMap<NodeId, u64>,
    /// This node's own events counted as sent and acknowledged on this connection.
    pub own_sent: u64,
    /// Origins relayed on the previous connection: relays start over, so they ended.
    pub relays_ended: Vec<NodeId>,
}

/// What a binding does after a reply from the peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct Effects {
    /// New frontiers of the peer, to record as its acknowledgements for every origin.
    pub acknowledged: Option<BTreeMap<NodeId, u64>>,
    /// How far the peer has acknowledged this node's own events.
    pub own_acked: Option<u64>,
    /// The relayed origins changed.
    pub relay: Option<RelayChange>,
}

/// A change in the origins relayed to the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayChange {
    /// Origins now relayed, because the peer's direct link to them is down.
    pub started: Vec<NodeId>,
    /// Origins no longer relayed, because the peer hears them directly again.
    pub stopped: Vec<NodeId>,
    /// Every origin relayed from now on (routed origins aside).
    pub relaying: Vec<NodeId>,
}

/// What to do at a heartbeat tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    /// Send a heartbeat: it carries our clock and asks for the receiver's frontiers.
    Beat,
    /// The link is dead: drop it and redial.
    Dead,
    /// Stopping, and the grace period is over: leave.
    Leave,
}

/// The state of the current connection; none while down.
#[derive(Debug, Clone)]
struct Link {
    in_flight: usize,
    last_heard: Instant,
    stopping_since: Option<Instant>,
}

/// One peer's sender: the origins streamed, how far each was sent, the peer's frontiers.
#[derive(Debug, Clone)]
pub struct Feeder {
    settings: Settings,
    origins: Vec<NodeId>,
    sent: BTreeMap<NodeId, u64>,
    theirs: BTreeMap<NodeId, u64>,
    link: Option<Link>,
    /// Batches sent: the next batch's reads start at origin `turn % origins`, so when a
    /// frame's byte budget runs out before its last read, every origin still gets its turn.
    turn: usize,
}

impl Feeder {
    pub fn new(settings: Settings) -> Self {
        Self {
            origins: settings.routed.clone(),
            settings,
            sent: BTreeMap::new(),
            theirs: BTreeMap::new(),
            link: None,
            turn: 0,
        }
    }

    /// A connection is up and the receiver holds `frontiers`. Relays start over: the peer asks
    /// again if it still needs them, and each resumes from its frontier then.
    pub fn on_welcome(&mut self, frontiers: BTreeMap<NodeId, u64>, now: Instant) -> Connected {
        self.theirs = frontiers;
        let routed = &self.settings.routed;
        let relays_ended = self.origins.iter().filter(|o| !routed.contains(o)).cloned().collect();
        self.origins = self.settings.routed.clone();
        self.sent = self
            .origins
            .iter()
            .map(|origin| (origin.clone(), self.frontier(origin)))
            .collect();
        self.link = Some(Link {
            in_flight: 0,
            last_heard: now,
            stopping_since: None,
        });
        Connected {
            acknowledged: self.theirs.clone(),
            resume: self.sent.clone(),
            own_sent: self.own_sent(),
            relays_ended,
        }
    }

    /// The connection is gone: whatever was in flight will be resent from the next Welcome's
    /// frontiers, which say what the receiver committed.
    pub fn on_disconnect(&mut self) {
        self.link = None;
    }

    /// The reads that make the next batch, or `None` while down, while the window is full, or
    /// when nothing is routed to the peer.
    pub fn next_batch_bounds(&self) -> Option<Vec<LogRead>> {
        let link = self.link.as_ref()?;
        if link.in_flight >= self.settings.window || self.origins.is_empty() {
            return None;
        }
        let first = self.turn % self.origins.len();
        let in_turn = self.origins[first..].iter().chain(&self.origins[..first]);
        let reads = in_turn.map(|origin| LogRead {
            origin: origin.clone(),
            after: self
                .sent
                .get(origin)
                .copied()
                .expect("every streamed origin has a sent mark"),
            max: self.settings.batch_max_events,
        });
        Some(reads.collect())
    }

    /// A batch went out holding, per origin, events up to `last` (origins whose read came back
    /// empty are left out). Returns how far this node's own events are now sent.
    pub fn record_sent(&mut self, last: impl IntoIterator<Item = (NodeId, u64)>) -> u64 {
        for (origin, seq) in last {
            self.sent.insert(origin, seq);
        }
        self.turn = self.turn.wrapping_add(1);
        if let Some(link) = &mut self.link {
            link.in_flight += 1;
        }
        self.own_sent()
    }

    /// The oldest batch in flight is durably applied; the receiver now holds `frontiers` and
    /// wants `relay_wanted` relayed.
    pub fn on_ack(&mut self, frontiers: BTreeMap<NodeId, u64>, relay_wanted: &[NodeId], now: Instant) -> Effects {
        if let Some(link) = &mut self.link {
            link.in_flight = link.in_flight.saturating_sub(1);
        }
        self.heard(now);
        self.theirs = frontiers;
        Effects {
            acknowledged: Some(self.theirs.clone()),
            own_acked: self.theirs.get(&self.settings.me).copied(),
            relay: self.on_relay_request(relay_wanted),
        }
    }

    /// The receiver answered a heartbeat; empty `frontiers` say nothing new about them.
    pub fn on_heartbeat(&mut self, frontiers: BTreeMap<NodeId, u64>, relay_wanted: &[NodeId], now: Instant) -> Effects {
        self.heard(now);
        let acknowledged = (!frontiers.is_empty()).then(|| {
            self.theirs = frontiers;
            self.theirs.clone()
        });
        Effects {
            acknowledged,
            own_acked: None,
            relay: self.on_relay_request(relay_wanted),
        }
    }

    /// Streams the routed origins plus those in `wanted` this node keeps; a newly relayed
    /// origin starts at the peer's frontier for it, so it neither skips nor repeats.
    pub fn on_relay_request(&mut self, wanted: &[NodeId]) -> Option<RelayChange> {
        let routed = &self.settings.routed;
        let mut next = routed.clone();
        for origin in wanted {
            if self.settings.kept.contains(origin) && !next.contains(origin) {
                next.push(origin.clone());
            }
        }
        if next == self.origins {
            return None;
        }
        let started: Vec<NodeId> = next.iter().filter(|o| !self.origins.contains(o)).cloned().collect();
        for origin in &started {
            self.sent.insert(origin.clone(), self.frontier(origin));
        }
        let change = RelayChange {
            started,
            stopped: self.origins.iter().filter(|o| !next.contains(o)).cloned().collect(),
            relaying: next.iter().filter(|o| !routed.contains(o)).cloned().collect(),
        };
        self.origins = next;
        Some(change)
    }

    /// What a heartbeat tick means now. A receiver busy applying a large batch answers late,
    /// so only an idle link that stays silent is dead (the binding's own keepalive covers the
    /// busy case).
    pub fn on_tick(&self, now: Instant) -> Tick {
        let Some(link) = &self.link else {
            return Tick::Dead;
        };
        if link.in_flight == 0 && now.duration_since(link.last_heard) > self.settings.peer_timeout {
            Tick::Dead
        } else if self.grace_over(now) {
            Tick::Leave
        } else {
            Tick::Beat
        }
    }

    /// The node is stopping: keep sending what the window allows, but leave soon.
    pub fn on_stop(&mut self, now: Instant) {
        if let Some(link) = &mut self.link {
            link.stopping_since.get_or_insert(now);
        }
    }

    pub fn stopping(&self) -> bool {
        self.link.as_ref().is_some_and(|link| link.stopping_since.is_some())
    }

    /// Whether a stopping feeder may leave: everything sent is acknowledged, or the grace
    /// period is over.
    pub fn may_leave(&self, now: Instant) -> bool {
        self.link
            .as_ref()
            .is_some_and(|link| link.stopping_since.is_some() && (link.in_flight == 0 || self.grace_over(now)))
    }

    /// The origins streamed now, routed ones first.
    pub fn origins(&self) -> &[NodeId] {
        &self.origins
    }

    /// The peer's frontiers as last reported.
    pub fn theirs(&self) -> &BTreeMap<NodeId, u64> {
        &self.theirs
    }

    pub fn in_flight(&self) -> usize {
        self.link.as_ref().map_or(0, |link| link.in_flight)
    }

    fn grace_over(&self, now: Instant) -> bool {
        self.link
            .as_ref()
            .and_then(|link| link.stopping_since)
            .is_some_and(|since| now.duration_since(since) > STOP_GRACE)
    }

    fn heard(&mut self, now: Instant) {
        if let Some(link) = &mut self.link {
            link.last_heard = now;
        }
    }

    fn frontier(&self, origin: &str) -> u64 {
        self.theirs.get(origin).copied().unwrap_or(0)
    }

    fn own_sent(&self) -> u64 {
        self.sent.get(&self.settings.me).copied().unwrap_or(0)
    }
}

/// Redial pacing: doubling from 50 ms to at most 2 s, back to the start after a connection
/// that held for a while, so a flapping peer is not hammered and a fresh failure is retried
/// fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
    failures: u32,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_secs(2);
    /// A connection that lasted longer than this was working: its failure starts a new series.
    const STEADY: Duration = Duration::from_secs(10);

    /// A connection failed after `lasted`: how long to wait before redialling.
    pub fn on_failure(&mut self, lasted: Duration) -> Redial {
        if lasted > Self::STEADY {
            *self = Self::default();
        }
        self.failures += 1;
        let wait = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        Redial {
            wait,
            failures: self.failures,
        }
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: Self::FIRST,
            failures: 0,
        }
    }
}

/// The wait before one redial, and how many failures in a row led to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redial {
    pub wait: Duration,
    pub failures: u32,
}

impl Redial {
    /// Say it once, then every 20th retry: a peer that is down is not news each time.
    pub fn worth_reporting(&self) -> bool {
        self.failures == 1 || self.failures.is_multiple_of(20)
    }
}

#[cfg(test)]
mod tests {
    use super::BehindLog;

    #[test]
    fn a_peer_is_behind_the_log_only_when_what_it_needs_is_gone() {
        // The log has what the peer needs, or there is nothing to send.
        assert_eq!(BehindLog::check("p", "o", 4, Some(5), Some(9)), None);
        assert_eq!(BehindLog::check("p", "o", 9, None, Some(9)), None);
        assert_eq!(BehindLog::check("p", "r", 4, None, None), None);
        // Trimmed past what it needs: from the log's first entry, or entirely.
        let behind = BehindLog::check("p", "o", 0, Some(41), Some(50)).unwrap();
        assert_eq!((behind.needs, behind.log_from), (1, Some(41)));
        assert!(behind.to_string().contains("log starts at seq 41"), "{behind}");
        let behind = BehindLog::check("p", "o", 3, None, Some(40)).unwrap();
        assert!(behind.to_string().contains("holds none of them"), "{behind}");
        // A relayed origin trimmed to nothing: its log went to 12, the peer has 3.
        assert!(BehindLog::check("p", "r", 3, None, Some(12)).is_some());
        assert_eq!(BehindLog::check("p", "r", 12, None, Some(12)), None);
    }

    use super::*;

    /// A log of capture batches per origin, by last seq: `[2, 5]` holds batches 1-2 and 3-5.
    struct Log(BTreeMap<&'static str, Vec<u64>>);

    impl Log {
        /// Reads as the store does: whole capture batches after `after`, at least one, until
        /// about `max` events are taken.
        fn read(&self, read: &LogRead) -> Vec<u64> {
            let mut seqs = Vec::new();
            for &end in self.0.get(read.origin.as_str()).into_iter().flatten() {
                if end > read.after && seqs.len() < read.max {
                    seqs.extend(seqs.last().map_or(read.after, |&s| s) + 1..=end);
                }
            }
            seqs
        }
    }

    /// One turn of a binding's fill loop: the next batch, sent, as (origin, seqs) pairs.
    fn send(feeder: &mut Feeder, log: &Log) -> Option<Vec<(NodeId, Vec<u64>)>> {
        let batch: Vec<(NodeId, Vec<u64>)> = feeder
            .next_batch_bounds()?
            .iter()
            .map(|read| (read.origin.clone(), log.read(read)))
            .filter(|(_, seqs)| !seqs.is_empty())
            .collect();
        if batch.is_empty() {
            return None;
        }
        let last = batch.iter().map(|(o, seqs)| (o.clone(), *seqs.last().unwrap()));
        feeder.record_sent(last.collect::<Vec<_>>());
        Some(batch)
    }

    fn sent(origin: &str, seqs: impl IntoIterator<Item = u64>) -> Option<Vec<(NodeId, Vec<u64>)>> {
        Some(vec![(origin.to_owned(), seqs.into_iter().collect())])
    }

    fn frontiers(pairs: &[(&str, u64)]) -> BTreeMap<NodeId, u64> {
        pairs.iter().map(|&(o, s)| (o.to_owned(), s)).collect()
    }

    fn ids(names: &[&str]) -> Vec<NodeId> {
        names.iter().map(|&n| n.to_owned()).collect()
    }

    /// `a` feeds `b` its own events and keeps `c`'s, which it relays when `b` asks.
    fn feeder() -> Feeder {
        Feeder::new(Settings {
            me: "a".into(),
            peer: "b".into(),
            routed: ids(&["a"]),
            kept: ["c".to_owned()].into(),
            window: 2,
            batch_max_events: 2,
            peer_timeout: Duration::from_secs(5),
        })
    }

    #[test]
    fn a_session_resumes_from_the_receivers_frontier_through_acks_loss_and_relays() {
        let log = Log([("a", vec![2, 5, 6, 8, 9]), ("c", vec![1, 3])].into());
        let mut feeder = feeder();
        let mut backoff = Backoff::default();
        let t = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(feeder.next_batch_bounds(), None, "nothing goes out before Welcome");

        // Connect: the receiver already holds a's 1-2.
        let connected = feeder.on_welcome(frontiers(&[("a", 2), ("c", 1)]), t);
        assert_eq!(connected.acknowledged, frontiers(&[("a", 2), ("c", 1)]));
        assert_eq!((connected.resume, connected.own_sent), (frontiers(&[("a", 2)]), 2));

        // Fill the window: two batches, each of whole capture batches, then back-pressure.
        assert_eq!(send(&mut feeder, &log), sent("a", 3..=5));
        assert_eq!(send(&mut feeder, &log), sent("a", 6..=8));
        assert_eq!((feeder.in_flight(), feeder.next_batch_bounds()), (2, None));

        // The first ack opens one slot.
        let effects = feeder.on_ack(frontiers(&[("a", 5), ("c", 1)]), &[], t + s(1));
        assert_eq!(effects.acknowledged, Some(frontiers(&[("a", 5), ("c", 1)])));
        assert_eq!((effects.own_acked, effects.relay), (Some(5), None));
        assert_eq!(feeder.in_flight(), 1);

        // The second ack is lost with the connection; the receiver had committed 6-8.
        feeder.on_disconnect();
        assert_eq!((feeder.in_flight(), feeder.next_batch_bounds()), (0, None));
        assert_eq!(backoff.on_failure(s(1)).wait, Duration::from_millis(50));
        let connected = feeder.on_welcome(frontiers(&[("a", 8), ("c", 1)]), t + s(2));
        assert_eq!(connected.resume, frontiers(&[("a", 8)]));
        assert_eq!(send(&mut feeder, &log), sent("a", [9]), "6-8 not sent twice");

        // This time the batch itself is lost: the receiver still says 8, so 9 goes again.
        feeder.on_disconnect();
        assert_eq!(backoff.on_failure(s(1)).wait, Duration::from_millis(100));
        let _ = feeder.on_welcome(frontiers(&[("a", 8), ("c", 1)]), t + s(3));
        assert_eq!(send(&mut feeder, &log), sent("a", [9]));
        assert_eq!(send(&mut feeder, &log), None, "nothing new to send");
        // A connection that held for a while starts the backoff over.
        feeder.on_disconnect();
        assert_eq!(backoff.on_failure(s(60)).wait, Duration::from_millis(50));
        let _ = feeder.on_welcome(frontiers(&[("a", 9), ("c", 1)]), t + s(63));

        // Heartbeats: an empty one says nothing; a full one carries frontiers but no own ack.
        assert_eq!(feeder.on_heartbeat(BTreeMap::new(), &[], t + s(64)), Effects::default());
        let effects = feeder.on_heartbeat(frontiers(&[("a", 9), ("c", 1)]), &[], t + s(65));
        assert_eq!(effects.acknowledged, Some(frontiers(&[("a", 9), ("c", 1)])));
        assert_eq!(effects.own_acked, None);

        // b asks for c (which we keep) and d (which we do not): c streams from b's frontier.
        let effects = feeder.on_ack(frontiers(&[("a", 9), ("c", 1)]), &ids(&["c", "d", "c"]), t + s(66));
        let started = RelayChange {
            started: ids(&["c"]),
            stopped: vec![],
            relaying: ids(&["c"]),
        };
        assert_eq!(effects.relay, Some(started));
        assert_eq!(feeder.origins(), ids(&["a", "c"]));
        assert_eq!(send(&mut feeder, &log), sent("c", 2..=3));
        let asked_again = feeder.on_ack(frontiers(&[("a", 9), ("c", 3)]), &ids(&["c"]), t + s(67));
        assert_eq!(asked_again.relay, None, "an unchanged request changes nothing");

        // b hears c again: the relay stops, and a's stream carries on where it was.
        let effects = feeder.on_ack(frontiers(&[("a", 9), ("c", 3)]), &[], t + s(68));
        let stopped = RelayChange {
            started: vec![],
            stopped: ids(&["c"]),
            relaying: vec![],
        };
        assert_eq!(effects.relay, Some(stopped));
        let a_only = LogRead {
            origin: "a".into(),
            after: 9,
            max: 2,
        };
        assert_eq!(feeder.next_batch_bounds(), Some(vec![a_only]));
    }

    #[test]
    fn a_relay_starts_at_the_peers_frontier_not_where_an_earlier_relay_stopped() {
        let log = Log([("c", vec![1, 3, 4])].into());
        let mut feeder = feeder();
        let t = Instant::now();
        let _ = feeder.on_welcome(frontiers(&[("c", 0)]), t);
        let _ = feeder.on_ack(frontiers(&[("c", 0)]), &ids(&["c"]), t);
        assert_eq!(send(&mut feeder, &log), sent("c", 1..=3));
        // The relay stops with 1-3 unapplied; when b asks again it holds only 1: 2-3 go again.
        let _ = feeder.on_ack(frontiers(&[("c", 0)]), &[], t);
        let _ = feeder.on_ack(frontiers(&[("c", 1)]), &ids(&["c"]), t);
        assert_eq!(send(&mut feeder, &log), sent("c", 2..=3));
    }

    /// A reconnect starts relays over: the ones running end, and say so (a peer that still
    /// needs one asks again, which starts it anew), instead of ending silently.
    #[test]
    fn a_reconnect_reports_the_relays_it_ended() {
        let mut feeder = feeder();
        let t = Instant::now();
        let _ = feeder.on_welcome(frontiers(&[("c", 0)]), t);
        let _ = feeder.on_ack(frontiers(&[("c", 0)]), &ids(&["c"]), t);
        feeder.on_disconnect();
        let connected = feeder.on_welcome(frontiers(&[("c", 0)]), t);
        assert_eq!(connected.relays_ended, ids(&["c"]));
        assert_eq!(feeder.origins(), ids(&["a"]));
        feeder.on_disconnect();
        assert_eq!(feeder.on_welcome(frontiers(&[]), t).relays_ended, Vec::<NodeId>::new());
    }

    #[test]
    fn backoff_doubles_to_two_seconds_and_reports_the_first_and_every_twentieth_failure() {
        let mut backoff = Backoff::default();
        let waits: Vec<u64> = (0..8)
            .map(|_| backoff.on_failure(Duration::ZERO).wait.as_millis() as u64)
            .collect();
        assert_eq!(waits, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
        let reported: Vec<u32> = (9..=41)
            .map(|_| backoff.on_failure(Duration::from_secs(10)))
            .filter(Redial::worth_reporting)
            .map(|r| r.failures)
            .collect();
        assert_eq!(reported, [20, 40], "10 s exactly is not yet a steady connection");
        let fresh = backoff.on_failure(Duration::from_millis(10_001));
        assert_eq!(
            (fresh.wait, fresh.failures, fresh.worth_reporting()),
            (Duration::from_millis(50), 1, true)
        );
    }

    #[test]
    fn only_an_idle_silent_link_is_dead_and_a_stop_waits_for_acks_within_the_grace() {
        let log = Log([("a", vec![1])].into());
        let mut feeder = feeder();
        let t = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(feeder.on_tick(t), Tick::Dead, "no link");
        let _ = feeder.on_welcome(BTreeMap::new(), t);
        assert_eq!(feeder.on_tick(t + s(5)), Tick::Beat);
        assert_eq!(feeder.on_tick(t + s(6)), Tick::Dead);
        // Busy applying: the peer is silent with a batch in flight, and that is not death.
        assert_eq!(send(&mut feeder, &log), sent("a", [1]));
        assert_eq!(feeder.on_tick(t + s(60)), Tick::Beat);

        assert!(!feeder.stopping() && !feeder.may_leave(t));
        feeder.on_stop(t + s(10));
        feeder.on_stop(t + s(11));
        assert!(feeder.stopping());
        assert!(!feeder.may_leave(t + s(13)), "waits for the ack");
        assert!(
            feeder.may_leave(t + s(13) + Duration::from_millis(1)),
            "grace counted from the first stop"
        );
        assert_eq!(feeder.on_tick(t + s(14)), Tick::Leave);
        let _ = feeder.on_ack(frontiers(&[("a", 1)]), &[], t + s(11));
        assert!(feeder.may_leave(t + s(11)), "everything acknowledged");
    }
}

/// A peer that needs events of `origin` from `needs` on that this node's log no longer
/// holds: they were trimmed once every node that needed them had acknowledged them, so the
/// peer went back (rebuilt empty, restored from a backup) or joined after the trim. It
/// cannot catch up from this log; sending would only make it refuse the gap, forever.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BehindLog {
    pub peer: NodeId,
    pub origin: NodeId,
    pub needs: u64,
    /// The first entry the log still has for `origin` past `needs`, if any.
    pub log_from: Option<u64>,
}

impl BehindLog {
    /// Whether a read of `origin`'s log after `after` shows `peer` behind it: `first` is the
    /// first entry found; `produced` how far the log of `origin` went (for this node's own
    /// origin its last seq read before the log, for another the highest seq its log dropped):
    /// everything past `after` up to it should be there.
    pub fn check(peer: &str, origin: &str, after: u64, first: Option<u64>, produced: Option<u64>) -> Option<Self> {
        let missing = match first {
            Some(seq) => seq > after + 1,
            None => produced.is_some_and(|last| last > after),
        };
        missing.then(|| BehindLog {
            peer: peer.to_owned(),
            origin: origin.to_owned(),
            needs: after + 1,
            log_from: first,
        })
    }
}

impl std::fmt::Display for BehindLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = match self.log_from {
            Some(seq) => format!("starts at seq {seq}"),
            None => "holds none of them".to_owned(),
        };
        write!(
            f,
            "{peer} needs {origin}'s events from seq {needs}, but this node's log {held}: they were trimmed after \
             every node that needed them had them. {peer} went back (rebuilt, restored from a backup) or joined \
             after the trim, and cannot catch up from this log: it has been told to re-seed by snapshot from this \
             node, and does so by itself (`weft status` there shows the join); if it stays behind, check its log",
            peer = self.peer,
            origin = self.origin,
            needs = self.needs
        )
    }
}
