//! What a receiver on a Kafka link says back to its sender, and what the sender makes of
//! it.
//!
//! A receiver commits the position it stored to the group `weft.<receiver>` on the topic's
//! cluster, with a [`Receipt`] as the offset's metadata: its frontiers (what it has applied
//! of every origin) and the node reports it knows. The commit is a copy for others to read:
//! the receiver's own position lives in its database. The sender reads the receipts of each
//! of its Kafka peers (`watch_acks`) as the gRPC binding reads acknowledgements: they let its
//! log be trimmed, feed `weft status` and tombstone GC, and at start (`confirm_history`) they
//! are the evidence that this node's database did not go back in time.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use super::LinkError;
use crate::event::NodeId;
use crate::shutdown::stopped;
use crate::transport::Context;
use crate::transport::record;

/// The longest receipt committed with its reports: brokers refuse offset metadata past
/// `offset.metadata.max.bytes` (4096 by default). A longer one goes without its reports
/// (tombstone GC then waits for them to come another way).
pub const MAX_RECEIPT_BYTES: usize = 3_500;

/// A receiver's word to its sender, committed as offset metadata (JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The receipt format, 1.
    pub v: u32,
    /// What the receiver has applied of each origin.
    pub frontiers: BTreeMap<NodeId, u64>,
    /// Node reports: (node, made at µs, what it has applied per origin).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reports: Vec<(NodeId, i64, BTreeMap<NodeId, u64>)>,
}

impl Receipt {
    pub fn new(frontiers: BTreeMap<NodeId, u64>, reports: Vec<(NodeId, i64, BTreeMap<NodeId, u64>)>) -> Self {
        Self {
            v: 1,
            frontiers,
            reports,
        }
    }

    /// The metadata text, at most `MAX_RECEIPT_BYTES` unless the frontiers alone are longer.
    pub fn encode(&self) -> String {
        let text = serde_json::to_string(self).expect("a receipt serializes");
        if text.len() <= MAX_RECEIPT_BYTES {
            return text;
        }
        let bare = Self {
            reports: Vec::new(),
            ..self.clone()
        };
        serde_json::to_string(&bare).expect("a receipt serializes")
    }

    /// A receipt of this format, or `None` (metadata committed by something else).
    pub fn decode(text: &str) -> Option<Self> {
        serde_json::from_str::<Self>(text).ok().filter(|r| r.v == 1)
    }
}

/// Reads the receipts one receiver committed for this node's topic.
pub struct Receipts {
    consumer: Arc<BaseConsumer>,
    topic: String,
}

impl Receipts {
    /// The receipts of `peer` for this node's topic, on this node's region's cluster.
    pub fn new(ctx: &Context, peer: &str) -> Result<Self, LinkError> {
        let consumer: BaseConsumer = super::client(&ctx.config, ctx.config.region())?
            .set("group.id", format!("weft.{peer}"))
            .set("enable.auto.commit", "false")
            .create()?;
        Ok(Self {
            consumer: Arc::new(consumer),
            topic: record::topic(&ctx.config.topology.mesh, &ctx.config.node),
        })
    }

    /// The latest receipt, with the offset committed with it; `None` before the first.
    pub async fn read(&self) -> Result<Option<(i64, Receipt)>, LinkError> {
        let consumer = self.consumer.clone();
        let mut wanted = TopicPartitionList::new();
        wanted.add_partition(&self.topic, 0);
        let committed =
            tokio::task::spawn_blocking(move || consumer.committed_offsets(wanted, Duration::from_secs(10)))
                .await
                .expect("the committed-offsets task does not panic")?;
        let Some(element) = committed.find_partition(&self.topic, 0) else {
            return Ok(None);
        };
        let Offset::Offset(offset) = element.offset() else {
            return Ok(None);
        };
        Ok(Receipt::decode(element.metadata()).map(|receipt| (offset, receipt)))
    }
}

/// Reads `peer`'s receipts every second until shutdown, as its acknowledgements.
pub async fn watch_acks(ctx: Context, peer: NodeId) {
    let mut shutdown = ctx.shutdown.clone();
    let mut receipts = None;
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let read = match &receipts {
            Some(receipts) => Receipts::read(receipts).await,
            None => Receipts::new(&ctx, &peer).map(|r| {
                receipts = Some(r);
                None
            }),
        };
        match read {
            Ok(Some((_, receipt))) => {
                failures = 0;
                acknowledge(&ctx, &peer, receipt);
            }
            Ok(None) => failures = 0,
            Err(error) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(60) {
                    tracing::warn!(%peer, %error, failures, "cannot read the peer's Kafka receipts; retrying");
                }
            }
        }
    }
}

/// Takes a receipt as `peer`'s acknowledgement and reports.
fn acknowledge(ctx: &Context, peer: &str, receipt: Receipt) {
    ctx.record_acks(peer, &receipt.frontiers);
    if let Some(&own) = receipt.frontiers.get(&ctx.config.node) {
        ctx.observer.acked(peer, own);
        ctx.catching_up(peer, own);
    }
    ctx.learn(peer, crate::wire::reports_to_proto(&receipt.reports));
}

/// Until this node's history is confirmed: compares its last seq with what its Kafka peers
/// have applied of its events and with what its own topic holds of them. Either being
/// ahead means the database went back in time (a restore): the node then waits until a peer
/// has applied everything the topic holds of it, and re-seeds from that peer, so that it
/// numbers new changes after every seq the topic has (a reused seq would be dropped as a
/// duplicate by every receiver: a silent loss).
pub async fn confirm_history(ctx: Context, peers: Vec<NodeId>) {
    let mut shutdown = ctx.shutdown.clone();
    let mut failures = 0u32;
    let mut asked = false;
    let mut check = HistoryCheck::default();
    loop {
        if *ctx.verified.borrow() {
            return;
        }
        match check.run(&ctx, &peers).await {
            // Not while a re-seed runs (asked by this check or by a gRPC peer that has more
            // of this node's events): the check runs again after it.
            Ok(History::Confirmed) if ctx.joining.borrow().is_none() => {
                ctx.verify();
                return;
            }
            Ok(History::Confirmed) => {}
            Ok(History::WentBack {
                from: Some(went_back), ..
            }) => {
                if !asked || ctx.joining.borrow().is_none() {
                    ctx.request_join(super::super::join::JoinRequest::went_back(
                        &went_back.peer,
                        &ctx.config.node,
                        &went_back,
                    ));
                    asked = true;
                }
            }
            Ok(History::WentBack { from: None, topic_has }) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(300) {
                    let ours = ctx.store.last_seq().await;
                    tracing::warn!(
                        topic_has,
                        ours,
                        "this node's topic holds more of its own events than its database: it went back in time; \
                         waiting until a peer has read them all, then re-seeding from it"
                    );
                }
            }
            Err(error) => {
                failures += 1;
                if failures == 5 || failures.is_multiple_of(300) {
                    tracing::warn!(%error, "cannot check this node's history on Kafka yet; local changes wait in the outbox");
                }
            }
        }
        // Quickly at first (a fresh cluster is still making its offsets topic), then calmly.
        let pause = if failures < 20 {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            _ = stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

enum History {
    Confirmed,
    /// The topic or a peer has more of this node's events than its database; `from` is a
    /// peer that has all the topic holds, once there is one.
    WentBack {
        topic_has: u64,
        from: Option<crate::transport::handshake::WentBack>,
    },
}

/// What the history check reads once and keeps between attempts: the last own seq in this
/// node's topic (nothing is published of the node's own events past its database until the
/// check passes, so it cannot grow meanwhile), and a receipt reader per peer.
#[derive(Default)]
struct HistoryCheck {
    topic_has: Option<u64>,
    receipts: Vec<(NodeId, Receipts)>,
}

impl HistoryCheck {
    async fn run(&mut self, ctx: &Context, peers: &[NodeId]) -> Result<History, LinkError> {
        let me = &ctx.config.node;
        let topic_has = match self.topic_has {
            Some(seq) => seq,
            None => {
                let client = super::client(&ctx.config, ctx.config.region())?;
                let topic = record::topic(&ctx.config.topology.mesh, me);
                super::ensure_topic(&client, &topic, super::sizes(&ctx.config)).await?;
                let me = me.clone();
                let scan = tokio::task::spawn_blocking(move || last_own_seq(&client, &topic, &me));
                *self
                    .topic_has
                    .insert(scan.await.expect("the topic scan does not panic")?.unwrap_or(0))
            }
        };
        if self.receipts.is_empty() {
            for peer in peers {
                self.receipts.push((peer.clone(), Receipts::new(ctx, peer)?));
            }
        }
        let mut best: Option<(NodeId, u64)> = None;
        for (peer, receipts) in &self.receipts {
            if let Some((_, receipt)) = receipts.read().await? {
                let has = receipt.frontiers.get(me).copied().unwrap_or(0);
                if best.as_ref().is_none_or(|(_, b)| has > *b) {
                    best = Some((peer.clone(), has));
                }
            }
        }
        let ours = ctx.store.last_seq().await;
        let peer_has = best.as_ref().map_or(0, |(_, has)| *has);
        if topic_has.max(peer_has) <= ours {
            return Ok(History::Confirmed);
        }
        let from = best
            .filter(|(_, has)| *has >= topic_has)
            .map(|(peer, peer_has)| crate::transport::handshake::WentBack { peer, peer_has, ours });
        Ok(History::WentBack { topic_has, from })
    }
}

/// Records read back from the end of a topic at a time, looking for this node's own.
const SCAN_CHUNK: i64 = 1_000;

/// The last seq of `me`'s own events in `topic` (records keyed by their origin), read
/// backwards from the end in chunks; `None` if the topic holds none.
fn last_own_seq(client: &ClientConfig, topic: &str, me: &str) -> Result<Option<u64>, LinkError> {
    let consumer: BaseConsumer = client
        .clone()
        .set("group.id", format!("weft.{me}.history"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "error")
        .create()?;
    let (low, high) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(10))?;
    let mut end = high;
    while end > low {
        let start = (end - SCAN_CHUNK).max(low);
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, 0, Offset::Offset(start))?;
        consumer.assign(&assignment)?;
        let mut best = None;
        let mut next = start;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while next < end {
            if std::time::Instant::now() > deadline {
                return Err(rdkafka::error::KafkaError::MessageConsumption(
                    rdkafka::error::RDKafkaErrorCode::RequestTimedOut,
                )
                .into());
            }
            let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let message = message?;
            next = message.offset() + 1;
            if message.key() == Some(me.as_bytes()) {
                let headers = super::record_headers(rdkafka::message::Message::headers(&message));
                let end_seq = (headers.iter())
                    .find(|(k, _)| k == "weft-end")
                    .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<u64>().ok());
                best = best.max(end_seq);
            }
        }
        if best.is_some() {
            return Ok(best);
        }
        end = start;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receipt_reads_back_and_sheds_its_reports_before_the_broker_limit() {
        let frontiers: BTreeMap<NodeId, u64> = [("a".to_owned(), 7), ("b".to_owned(), 9)].into_iter().collect();
        let small = Receipt::new(frontiers.clone(), vec![("b".to_owned(), 5, frontiers.clone())]);
        assert_eq!(Receipt::decode(&small.encode()), Some(small.clone()));
        let many = (0..200).map(|i| (format!("node-{i}"), i, frontiers.clone())).collect();
        let big = Receipt::new(frontiers.clone(), many);
        let text = big.encode();
        assert!(text.len() <= MAX_RECEIPT_BYTES, "{}", text.len());
        assert_eq!(Receipt::decode(&text), Some(Receipt::new(frontiers, Vec::new())));
        assert_eq!(Receipt::decode("committed by kafka-consumer-groups"), None);
        assert_eq!(Receipt::decode(r#"{"v":2,"frontiers":{}}"#), None);
    }
}
