//! The receiving half of a Kafka link: one reader per upstream peer, reading the peer's
//! topic from the position stored in this node's database.
//!
//! The reader assigns partition 0 of `weft.<mesh>.<peer>` at the stored position (the
//! beginning when there is none), takes each record's events or gap (`record::read`), keeps
//! the origins the peer sends this node (`topology::forwards`; a relay's topic also carries
//! what it sends its other peers), and holds records until every origin's capture batch in
//! them is complete. Then it checks the run as the gRPC binding does (`admission`), waits
//! for this node's history to be confirmed, and applies it with the offset after its last
//! record (`Store::apply_from`): rows, frontiers and position in one transaction. After the
//! commit it tells its sender through the group `weft.<me>` (`acks::Receipt`).
//!
//! Nothing is ever skipped: a refused run, a record that is not weft's, or a failed apply
//! stops the reader; it starts again from the stored position after a pause. A gap (the
//! topic lacks events this node needs: seqs that skip, or a gap record) or a position outside
//! the topic (retention deleted records it had not read) asks for a re-seed by snapshot from
//! the peer over gRPC; once the join is done, the reader starts over from the beginning of
//! the topic, whose events the snapshot's frontiers make duplicates up to where it needs them.
//!
//! Memory is bounded: a held batch whose rest never comes (its publisher stopped carrying its
//! origin, or lost the rest) cannot hold back the records behind it for good. The head of a
//! batch this node has already applied holds nothing; one it lacks is given up past
//! `MAX_HELD_BEHIND` events of other origins held behind it, or `MAX_BLOCKED`, and taken as a
//! gap (`LinkError::OpenBatch`: said, and re-seeded).
use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::FutureExt as _;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::time::Instant;

use super::LinkError;
use super::acks::Receipt;
use crate::clock::now_micros;
use crate::event::{Event, NodeId};
use crate::shutdown::stopped;
use crate::store::Position;
use crate::transport::Context;
use crate::transport::join::JoinRequest;
use crate::transport::record;
use crate::transport::session::Backoff;

/// Events applied at most in one transaction (more only to complete a capture batch).
pub const MAX_RUN_EVENTS: usize = 5_000;

/// Reads `peer`'s topic into this node until shutdown.
pub async fn consume_peer(ctx: Context, peer: NodeId) {
    let mut shutdown = ctx.shutdown.clone();
    let mut backoff = Backoff::default();
    let mut from_beginning = false;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let started = Instant::now();
        let outcome = match Reader::open(&ctx, &peer, from_beginning).await {
            Ok(mut reader) => reader.run().await,
            Err(error) => Err(error),
        };
        let error = match outcome {
            Ok(()) => return,
            Err(error) => error,
        };
        let reseeding = match &error {
            LinkError::Expired { .. } => Some((peer.clone(), frontier(&ctx, &peer).await + 1)),
            LinkError::Gap { origin, have, .. }
            | LinkError::Hole { origin, have, .. }
            | LinkError::OpenBatch { origin, have, .. } => Some((origin.clone(), have + 1)),
            _ => None,
        };
        if let Some((origin, needs)) = reseeding {
            reseed(&ctx, &peer, origin, needs, error.to_string()).await;
            from_beginning = true;
            continue;
        }
        let redial = backoff.on_failure(started.elapsed());
        if redial.worth_reporting() {
            tracing::warn!(%peer, %error, failures = redial.failures, "reading the peer's topic stopped; reading again from the stored position");
        }
        tokio::select! {
            _ = stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(redial.wait) => {}
        }
    }
}

async fn frontier(ctx: &Context, origin: &str) -> u64 {
    let frontiers = ctx.store.frontiers().await.unwrap_or_default();
    frontiers.get(origin).copied().unwrap_or(0)
}

/// Asks for a re-seed from `peer` and waits until a join has run (or a minute has passed:
/// the request may not hold any more, and reading again shows it).
async fn reseed(ctx: &Context, peer: &str, origin: NodeId, needs: u64, reason: String) {
    let mut joining = ctx.joining.subscribe();
    let was_joining = joining.borrow_and_update().is_some();
    ctx.request_join(JoinRequest {
        peer: peer.to_owned(),
        origin,
        needs,
        reason: format!("{reason}: re-seeding from {peer} by snapshot, then reading its topic from the beginning"),
    });
    let mut shutdown = ctx.shutdown.clone();
    let wait = async {
        let mut seen = was_joining;
        loop {
            if joining.changed().await.is_err() {
                return;
            }
            let now = joining.borrow_and_update().is_some();
            if seen && !now {
                return;
            }
            seen |= now;
        }
    };
    tokio::select! {
        _ = stopped(&mut shutdown) => {}
        _ = wait => {}
        _ = tokio::time::sleep(Duration::from_secs(60)) => {}
    }
}

/// A record's events kept for this node, with the offset it was read at; or a gap record
/// of an origin kept for this node.
struct Held {
    offset: i64,
    events: Vec<Event>,
    gap: Option<Gap>,
}

/// Events `from..=to` of `origin` are not in the topic (a gap record).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Gap {
    origin: NodeId,
    from: u64,
    to: u64,
}

struct Reader<'a> {
    ctx: &'a Context,
    peer: &'a str,
    topic: String,
    consumer: StreamConsumer,
    held: Vec<Held>,
    /// What the last apply left: the position and the frontiers.
    latest: Option<(i64, BTreeMap<NodeId, u64>)>,
    /// Whether `latest` is newer than the last commit to the group.
    dirty: bool,
    committed_at: Instant,
    /// What this node has applied of each origin, as of the last apply here (it may have more
    /// by another way): a held batch already applied is complete.
    frontiers: BTreeMap<NodeId, u64>,
    /// Since when a batch left open has held back records of other origins (`blocked`).
    blocked_since: Option<Instant>,
}

impl<'a> Reader<'a> {
    async fn open(ctx: &'a Context, peer: &'a str, from_beginning: bool) -> Result<Self, LinkError> {
        let region = &ctx
            .config
            .topology
            .node(peer)
            .expect("an upstream peer is in the topology")
            .region;
        let consumer: StreamConsumer = super::client(&ctx.config, region)?
            .set("group.id", format!("weft.{}", ctx.config.node))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "error")
            .set("isolation.level", "read_committed")
            .create()?;
        let topic = record::topic(&ctx.config.topology.mesh, peer);
        let stored = ctx.store.position(&topic).await?;
        let start = match stored {
            Some(next) if !from_beginning => Offset::Offset(next),
            _ => Offset::Beginning,
        };
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(&topic, 0, start)?;
        consumer.assign(&assignment)?;
        tracing::info!(%peer, %topic, position = ?start, "reading the peer's topic");
        let frontiers = ctx.store.frontiers().await?;
        Ok(Self {
            ctx,
            peer,
            topic,
            consumer,
            held: Vec::new(),
            latest: None,
            dirty: false,
            committed_at: Instant::now(),
            frontiers,
            blocked_since: None,
        })
    }

    /// Reads and applies until shutdown (`Ok`) or a failure.
    async fn run(&mut self) -> Result<(), LinkError> {
        let mut shutdown = self.ctx.shutdown.clone();
        loop {
            let wait = if self.batch_open() {
                Duration::from_millis(500)
            } else {
                Duration::from_secs(1)
            };
            let message = tokio::select! {
                _ = stopped(&mut shutdown) => {
                    self.commit(CommitMode::Sync).await;
                    return Ok(());
                }
                message = tokio::time::timeout(wait, self.consumer.recv()) => message,
            };
            match message {
                Ok(message) => {
                    let held = self.take(message)?;
                    self.held.push(held);
                    self.drain_ready()?;
                }
                Err(_) => {
                    // Idle: a good moment to tell the sender how far this node is.
                    self.commit(CommitMode::Async).await;
                    self.check_blocked()?;
                    continue;
                }
            }
            self.check_blocked()?;
            let cut = self.complete_prefix();
            if cut > 0 {
                let run: Vec<Held> = self.held.drain(..cut).collect();
                self.apply(run).await?;
            }
            if self.committed_at.elapsed() >= Duration::from_secs(1) {
                self.commit(CommitMode::Async).await;
            }
        }
    }

    /// Takes the messages already fetched, without waiting, up to a run's worth.
    fn drain_ready(&mut self) -> Result<(), LinkError> {
        let mut events: usize = self.held.iter().map(|h| h.events.len()).sum();
        loop {
            if events >= MAX_RUN_EVENTS && !self.batch_open() {
                return Ok(());
            }
            let Some(message) = self.consumer.recv().now_or_never() else {
                return Ok(());
            };
            let held = self.take(message)?;
            events += held.events.len();
            self.held.push(held);
        }
    }

    /// One consumed message as the events it holds for this node.
    fn take(&self, message: Result<BorrowedMessage<'_>, KafkaError>) -> Result<Held, LinkError> {
        let message = message.map_err(|error| self.consume_error(error))?;
        self.ctx.heard.mark(self.peer, Instant::now());
        let offset = message.offset();
        let headers = super::record_headers(message.headers());
        let contents =
            record::read(&headers, message.payload().unwrap_or_default()).map_err(|error| LinkError::Record {
                topic: self.topic.clone(),
                offset,
                error,
            })?;
        let config = &self.ctx.config;
        let kept = |origin: &str| {
            origin == self.peer || crate::topology::forwards(&config.topology, self.peer, &config.node, origin)
        };
        Ok(match contents {
            record::Contents::Events(events) => Held {
                offset,
                events: events.into_iter().filter(|e| kept(&e.origin)).collect(),
                gap: None,
            },
            record::Contents::Gap { origin, from, to } => Held {
                offset,
                events: Vec::new(),
                gap: kept(&origin).then_some(Gap { origin, from, to }),
            },
        })
    }

    fn consume_error(&self, error: KafkaError) -> LinkError {
        let outside = matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::OffsetOutOfRange | RDKafkaErrorCode::AutoOffsetReset)
        );
        if outside {
            let position = self.latest.as_ref().map_or("stored".to_owned(), |(p, _)| p.to_string());
            return LinkError::Expired {
                topic: self.topic.clone(),
                position,
            };
        }
        LinkError::Kafka(error)
    }

    /// Whether some origin's capture batch is not complete in the held records.
    fn batch_open(&self) -> bool {
        self.complete_prefix() < self.held.len()
    }

    /// How many held records form a run in which every capture batch is complete.
    fn complete_prefix(&self) -> usize {
        complete_prefix(&self.held, &self.frontiers)
    }

    /// Stops the reader for a re-seed when a batch left open has held back more than
    /// `MAX_HELD_BEHIND` events of other origins, or any for `MAX_BLOCKED` (see there).
    fn check_blocked(&mut self) -> Result<(), LinkError> {
        let Some(blocked) = blocked(&self.held, &self.frontiers) else {
            self.blocked_since = None;
            return Ok(());
        };
        let since = *self.blocked_since.get_or_insert_with(Instant::now);
        if !blocked.given_up(since.elapsed()) {
            return Ok(());
        }
        Err(LinkError::OpenBatch {
            topic: self.topic.clone(),
            have: self.frontiers.get(&blocked.origin).copied().unwrap_or(0),
            origin: blocked.origin,
            behind: blocked.behind,
            secs: since.elapsed().as_secs(),
        })
    }

    /// Checks and applies a run of records, moving the stored position past them. A gap
    /// record of events this node lacks ends the run: what is before it is applied, the
    /// position stays at it, and the reader stops for a re-seed (`LinkError::Hole`).
    async fn apply(&mut self, mut run: Vec<Held>) -> Result<(), LinkError> {
        let mut hole = None;
        if run.iter().any(|h| h.gap.is_some()) {
            let frontiers = self.ctx.store.frontiers().await?;
            let have = |gap: &Gap| frontiers.get(&gap.origin).copied().unwrap_or(0);
            let lacking = run.iter().position(|h| h.gap.as_ref().is_some_and(|g| have(g) < g.to));
            if let Some(at) = lacking {
                let gap = run[at].gap.clone().expect("the record found holds a gap");
                hole = Some((run[at].offset, have(&gap), gap));
                run.truncate(at + 1);
            }
        }
        let first = run[0].offset;
        let next = match &hole {
            Some((offset, ..)) => *offset,
            None => run.last().expect("a run holds a record").offset + 1,
        };
        let events = usable_events(run);
        if !events.is_empty() || hole.is_none() {
            self.apply_events(events, first, next).await?;
        }
        match hole {
            Some((_, have, Gap { origin, from, to })) => Err(LinkError::Hole {
                topic: self.topic.clone(),
                origin,
                from,
                to,
                have,
            }),
            None => Ok(()),
        }
    }

    /// Checks and applies `events`, read from offset `first` on, storing `next` as where
    /// reading resumes.
    async fn apply_events(&mut self, events: Vec<Event>, first: i64, next: i64) -> Result<(), LinkError> {
        let config = &self.ctx.config;
        let admission = crate::transport::admission::Admission {
            topology: &config.topology,
            me: &config.node,
            peer: self.peer,
            relay_wanted: &[],
            max_ahead_ms: crate::transport::grpc::max_ahead_ms(config.replication.max_clock_skew()),
            now_ms: now_micros() / 1000,
            my_last_seq: self.ctx.store.last_seq().await,
        };
        if let Err(refusal) = admission.check(&events) {
            self.ctx.refused(self.peer, &refusal);
            return Err(LinkError::Refused {
                topic: self.topic.clone(),
                offset: first,
                refusal: Box::new(refusal),
            });
        }
        // Applying drains local changes first, which numbers them: not before this node's
        // history is confirmed.
        let mut verified = self.ctx.verified.subscribe();
        let mut shutdown = self.ctx.shutdown.clone();
        tokio::select! {
            _ = stopped(&mut shutdown) => return Ok(()),
            result = verified.wait_for(|v| *v) => if result.is_err() { return Ok(()) },
        }
        let position = Position {
            source: self.topic.clone(),
            next,
        };
        let report = self.ctx.store.apply_from(events, &position).await?;
        crate::crashpoint::hit("after-apply");
        self.ctx.applied(self.peer, &report);
        if let Some((origin, have, got)) = report.gap {
            return Err(LinkError::Gap {
                topic: self.topic.clone(),
                origin,
                have,
                got,
            });
        }
        for (origin, &seq) in &report.frontiers {
            let known = self.frontiers.entry(origin.clone()).or_default();
            *known = (*known).max(seq);
        }
        self.latest = Some((next, report.frontiers));
        self.dirty = true;
        Ok(())
    }

    /// Commits the stored position with a receipt to the group `weft.<me>`, for the sender
    /// and for Kafka's tools: when it moved, and every few seconds anyway (an asynchronous
    /// commit that failed is repeated so). A lost commit costs nothing: the next says it.
    async fn commit(&mut self, mode: CommitMode) {
        let Some((next, frontiers)) = self.latest.clone() else {
            return;
        };
        if !self.dirty && self.committed_at.elapsed() < Duration::from_secs(5) {
            return;
        }
        self.committed_at = Instant::now();
        let reports = crate::wire::reports_from_proto(self.ctx.reports_now().await);
        let receipt = Receipt::new(frontiers, reports);
        let mut offsets = TopicPartitionList::new();
        let committed = offsets
            .add_partition_offset(&self.topic, 0, Offset::Offset(next))
            .map(|()| {
                if let Some(mut element) = offsets.find_partition(&self.topic, 0) {
                    element.set_metadata(receipt.encode());
                }
            })
            .and_then(|()| self.consumer.commit(&offsets, mode));
        match committed {
            Ok(()) => self.dirty = false,
            Err(error) => {
                tracing::debug!(peer = %self.peer, %error, "committing the position to Kafka failed; the next commit says it")
            }
        }
    }
}

/// How many of `held` records form a run in which every capture batch is complete. A gap
/// record of an origin completes its open batch: the rest of it is not in the topic. A record
/// whose batch this node has already applied (to `frontiers`) changes nothing: a replay
/// neither opens a batch (its rest may never come again) nor closes one.
fn complete_prefix(held: &[Held], frontiers: &BTreeMap<NodeId, u64>) -> usize {
    let mut open = std::collections::BTreeSet::new();
    let mut cut = 0;
    for (i, held) in held.iter().enumerate() {
        if let Some(gap) = &held.gap {
            open.remove(&gap.origin);
        }
        let unapplied = |last: &&Event| frontiers.get(&last.origin).is_none_or(|&f| last.batch_end > f);
        if let Some(last) = held.events.last().filter(unapplied) {
            if last.seq == last.batch_end {
                open.remove(&last.origin);
            } else {
                open.insert(last.origin.clone());
            }
        }
        if open.is_empty() {
            cut = i + 1;
        }
    }
    cut
}

/// Events of other origins held behind an open capture batch, past which the batch is taken
/// as never to be completed. A publisher sends a batch's records together, and writes one a
/// failed round left open again in its next round, seconds later (after the other origins'
/// backlogs at most): more than this held behind one means the rest is not coming (the
/// publisher stopped carrying its origin, or lost it).
pub const MAX_HELD_BEHIND: usize = 10 * MAX_RUN_EVENTS;

/// How long an open batch may hold back records of other origins.
pub const MAX_BLOCKED: Duration = Duration::from_secs(300);

/// A capture batch left open in the held records, with records of other origins behind it.
#[derive(Debug, PartialEq, Eq)]
struct Blocked {
    origin: NodeId,
    /// Events of other origins held behind it.
    behind: usize,
}

impl Blocked {
    /// Whether the batch is taken as never to be completed, having blocked for `so_long`.
    fn given_up(&self, so_long: Duration) -> bool {
        self.behind >= MAX_HELD_BEHIND || so_long >= MAX_BLOCKED
    }
}

/// The first open batch of `held` (see `complete_prefix`) that holds back events of other
/// origins, if any.
fn blocked(held: &[Held], frontiers: &BTreeMap<NodeId, u64>) -> Option<Blocked> {
    let cut = complete_prefix(held, frontiers);
    let opening = held.get(cut..)?.iter().find(|h| !h.events.is_empty())?;
    let origin = opening.events[0].origin.clone();
    let behind = (held[cut..].iter())
        .flat_map(|h| &h.events)
        .filter(|e| e.origin != origin)
        .count();
    (behind > 0).then_some(Blocked { origin, behind })
}

/// The events of `run`, without the part of any capture batch a gap record in it leaves
/// incomplete: half a transaction is never applied (a receiver that lacks the rest
/// re-seeds; one that has it has these too).
fn usable_events(run: Vec<Held>) -> Vec<Event> {
    let mut events: Vec<Event> = Vec::new();
    for held in run {
        if let Some(gap) = &held.gap {
            let complete = (events.iter())
                .rposition(|e| e.origin == gap.origin && e.seq == e.batch_end)
                .map_or(0, |i| i + 1);
            let mut index = 0;
            events.retain(|e| {
                index += 1;
                index <= complete || e.origin != gap.origin
            });
        }
        events.extend(held.events);
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Hlc, Key, Op, Row, Value};

    /// Event `seq` of `origin`, in a capture batch ending at `batch_end`.
    fn event(origin: &str, seq: u64, batch_end: u64) -> Event {
        Event {
            origin: origin.into(),
            origin_region: "r".into(),
            seq,
            batch_end,
            hlc: Hlc(seq << 22),
            table: "t".into(),
            key: Key(vec![Value::Integer(seq as i64)]),
            op: Op::Upsert(Row(vec![("id".into(), Value::Integer(seq as i64))])),
            version: [(origin.to_string(), seq)].into_iter().collect(),
            path: vec![origin.into()],
            committed_at_micros: 0,
            crdt: Vec::new(),
            ownership: None,
        }
    }

    fn record(offset: i64, events: Vec<Event>) -> Held {
        Held {
            offset,
            events,
            gap: None,
        }
    }

    fn gap(offset: i64, origin: &str, from: u64, to: u64) -> Held {
        Held {
            offset,
            events: Vec::new(),
            gap: Some(Gap {
                origin: origin.into(),
                from,
                to,
            }),
        }
    }

    #[test]
    fn a_gap_record_completes_the_batch_it_cuts_and_that_batch_is_never_applied() {
        // a's batch 3..=5 is cut after 4 (its publisher lost the rest); b's batch is whole.
        let held = vec![
            record(0, vec![event("a", 1, 2), event("a", 2, 2)]),
            record(1, vec![event("a", 3, 5), event("a", 4, 5)]),
            record(2, vec![event("b", 1, 1)]),
        ];
        let none = BTreeMap::new();
        assert_eq!(complete_prefix(&held, &none), 1, "a's second batch is open");
        let mut held = held;
        held.push(gap(3, "a", 5, 9));
        assert_eq!(complete_prefix(&held, &none), 4, "the gap record closes it");
        let seqs: Vec<(String, u64)> = (usable_events(held).into_iter()).map(|e| (e.origin, e.seq)).collect();
        assert_eq!(
            seqs,
            [("a".into(), 1), ("a".into(), 2), ("b".into(), 1)],
            "half a transaction is never applied"
        );
    }

    #[test]
    fn the_head_of_a_batch_already_applied_holds_nothing_back() {
        // The head of a's batch 3..=5, which this node applied, then b's records: a relay
        // that stopped carrying a never sends the rest, and need not.
        let held = vec![record(0, vec![event("a", 3, 5)]), record(1, vec![event("b", 1, 1)])];
        let applied: BTreeMap<NodeId, u64> = [("a".to_owned(), 5)].into();
        assert_eq!(complete_prefix(&held, &applied), 2);
        assert_eq!(blocked(&held, &applied), None);
        // Nor does a replay close a batch this node still needs.
        let held = vec![
            record(0, vec![event("a", 6, 8)]),
            record(1, vec![event("a", 1, 2), event("a", 2, 2)]),
        ];
        assert_eq!(complete_prefix(&held, &applied), 0);
    }

    #[test]
    fn a_batch_left_open_with_others_behind_it_is_given_up_past_its_bounds() {
        let none = BTreeMap::new();
        let mut held = vec![record(0, vec![event("a", 3, 5)]), record(1, vec![event("a", 4, 5)])];
        assert_eq!(blocked(&held, &none), None, "its own records are no one held back");
        held.extend((0..3).map(|i| record(2 + i, vec![event("b", i as u64 + 1, i as u64 + 1)])));
        let found = blocked(&held, &none).expect("b is held back");
        assert_eq!(
            found,
            Blocked {
                origin: "a".into(),
                behind: 3
            }
        );
        assert!(
            !found.given_up(Duration::from_secs(10)),
            "a failed round is written again soon"
        );
        assert!(found.given_up(MAX_BLOCKED));
        let many = Blocked {
            origin: "a".into(),
            behind: MAX_HELD_BEHIND,
        };
        assert!(many.given_up(Duration::ZERO), "memory is bounded too");
    }
}
