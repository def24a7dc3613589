//! The Kafka binding's publishing half: a node's outgoing log, written into its topic
//! (`record::topic`) by an idempotent producer with `acks=all`.
//!
//! For each origin the node publishes (its own, and the ones it relays), the publisher
//! reads the log past the seq it last published, writes those events as records (whole
//! capture batches, split into records of at most `max_record_bytes`; `layout`), waits until
//! the broker has acknowledged every record, and only then records the new published seq in
//! the node's database (`Store::record_position`, source `published:<topic>:<origin>`). A crash
//! between the broker's acknowledgement and that write publishes the same events again after
//! the restart; receivers drop them as duplicates by their frontiers, so the topic may hold
//! an event twice but no receiver applies it twice.
//!
//! Nothing is skipped without a word, and nothing stops the topic: where the log jumps, or an
//! event is too large for a record (or does not decode), a gap record (a marker on a changes
//! topic) stands in its place and the publisher says so at ERROR; the events after it follow.
//!
//! `publish_loop` runs a publisher in a node: a round whenever the log grows (and every
//! second), backing off while the cluster is unreachable; the log keeps what is not
//! published, so an outage of the cluster only delays. `changes_loop` runs a second one when
//! the topology asks for `[kafka] changes`: the node's own events as JSON documents
//! (`envelope`) into `weft.<mesh>.<node>.changes`. Each acknowledges what it published as a
//! reader of the log ([`TOPIC_READER`], [`CHANGES_READER`]; `published_topics` lists them),
//! so the log keeps what a topic lacks, and retention leaves it too (`node`).
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedHeaders, Header, Headers as _, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use crate::config::{NodeConfig, Transport};
use crate::event::{Event, NodeId};
use crate::shutdown::stopped;
use crate::store::{LogEntry, Position, Store, StoreError};

use super::layout::{self, Format, Limits, Notice};
use super::{LinkError, Sizes};
use crate::transport::Context;
use crate::transport::record::{self, CHANGES_READER, TOPIC_READER};
use crate::transport::session::Backoff;

/// Why publishing stopped; the caller retries after a pause.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Publishes one node's log into its topic.
pub struct Publisher {
    store: Arc<Store>,
    producer: FutureProducer,
    topic: String,
    origins: Vec<NodeId>,
    /// Log events read at once per origin.
    pub read_max: usize,
    /// The value a record of several events stays under (a record of one event may be
    /// larger, up to the largest record of `sizes`).
    pub max_record_bytes: usize,
    pub format: Format,
    /// The largest record sent (`Sizes::record`); a larger one is stood in for.
    record_limit: usize,
}

impl Publisher {
    /// A publisher of `origins` from `store`'s log into `topic`, through the brokers of
    /// `client` (`bootstrap.servers` and any TLS or SASL settings), writing records of at
    /// most `sizes` (the topic must take them: `ensure_topic`); idempotence and `acks=all`
    /// are set here.
    pub fn new(
        store: Arc<Store>,
        mut client: ClientConfig,
        topic: String,
        origins: Vec<NodeId>,
        sizes: Sizes,
    ) -> Result<Self, PublishError> {
        sizes.apply(&mut client);
        let producer = client
            .set("enable.idempotence", "true")
            .set("enable.gapless.guarantee", "true")
            .set("message.timeout.ms", "0")
            .set("acks", "all")
            .set("linger.ms", "2")
            .create()?;
        Ok(Self {
            store,
            producer,
            topic,
            origins,
            read_max: 2_000,
            max_record_bytes: 900 * 1024,
            format: Format::Batches,
            record_limit: sizes.record(),
        })
    }

    fn source(&self, origin: &str) -> String {
        published_source(&self.topic, origin)
    }

    /// The last seq of `origin` published and acknowledged by the broker.
    pub async fn published(&self, origin: &str) -> Result<u64, StoreError> {
        Ok(self.store.position(&self.source(origin)).await?.unwrap_or(0) as u64)
    }

    /// Publishes everything the log holds past what was published; returns how many log
    /// events it took (a stand-in counts for the events it stands for).
    pub async fn publish_pending(&self) -> Result<u64, PublishError> {
        let mut written = 0;
        for origin in &self.origins {
            loop {
                let after = self.published(origin).await?;
                let entries = self.store.read_log(origin, after, self.read_max).await?;
                let Some(last) = entries.last().map(|e| e.seq) else {
                    break;
                };
                let limits = Limits {
                    max_record_bytes: self.max_record_bytes,
                    record: self.record_limit,
                };
                let pieces = layout::lay_out(after, &self.readable(&entries), &self.format, limits);
                self.send(pieces.iter().map(|p| &p.record)).await?;
                let position = Position {
                    source: self.source(origin),
                    next: last as i64,
                };
                self.store.record_position(&position).await?;
                for notice in pieces.iter().filter_map(|p| p.notice.as_ref()) {
                    self.say(notice);
                }
                written += entries.len() as u64;
            }
        }
        Ok(written)
    }

    /// The events of `entries`; one that does not decode is said at ERROR and left out (a
    /// gap record stands for it).
    fn readable(&self, entries: &[LogEntry]) -> Vec<Event> {
        (entries.iter())
            .filter_map(|entry| match crate::wire::decode_event(&entry.bytes) {
                Ok(event) => Some(event),
                Err(error) => {
                    tracing::error!(topic = %self.topic, seq = entry.seq, %error, "a log event does not decode; a gap record stands for it in the topic");
                    None
                }
            })
            .collect()
    }

    /// Says at ERROR what a stand-in record the broker now holds stands for.
    fn say(&self, notice: &Notice) {
        let topic = &self.topic;
        let instead = match (&self.format, notice) {
            (Format::Batches, _) => "a gap record stands for it: a receiver that lacks it re-seeds by snapshot",
            (Format::Envelopes { .. }, Notice::Gap { .. }) => "a gap marker stands for it in the changes topic",
            (Format::Envelopes { .. }, Notice::TooLarge { .. }) => {
                "a too_large marker naming the change stands for it in the changes topic"
            }
        };
        tracing::error!(%topic, "{notice}; {instead}");
    }

    /// Sends `records` and waits until the broker has acknowledged them all. They are in
    /// flight together: the idempotent producer keeps their order in the partition, and with
    /// `enable.gapless.guarantee` (and no local timeout) a failure that could leave a hole
    /// behind a record stops the producer instead (it is made again for the next round), so
    /// the topic never holds a later event without the earlier ones.
    async fn send<'r>(&self, records: impl ExactSizeIterator<Item = &'r record::Record>) -> Result<(), PublishError> {
        let mut deliveries = Vec::with_capacity(records.len());
        for r in records {
            let mut message = FutureRecord::to(&self.topic)
                .key(&r.key)
                .payload(&r.value)
                .headers(kafka_headers(r));
            loop {
                match self.producer.send_result(message) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    // The producer's queue is full (large events): let what is in flight land.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                        if !deliveries.is_empty() =>
                    {
                        settle(&mut deliveries).await?;
                        message = back;
                    }
                    Err((error, _)) => return Err(error.into()),
                }
            }
        }
        settle(&mut deliveries).await
    }
}

/// Waits for every delivery, in order; the first failure is the answer.
async fn settle(deliveries: &mut Vec<DeliveryFuture>) -> Result<(), PublishError> {
    for delivery in deliveries.drain(..) {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((error, _))) => return Err(error.into()),
            Err(_) => return Err(KafkaError::Canceled.into()),
        }
    }
    Ok(())
}

/// A record's headers as rdkafka sends them.
pub fn kafka_headers(record: &record::Record) -> OwnedHeaders {
    (record.headers.iter()).fold(OwnedHeaders::new(), |h, (key, value)| {
        h.insert(Header {
            key,
            value: Some(value),
        })
    })
}

/// The headers of a consumed message, as `record::decode` takes them.
pub fn record_headers(headers: Option<&BorrowedHeaders>) -> Vec<(String, Vec<u8>)> {
    let Some(headers) = headers else { return Vec::new() };
    (headers.iter())
        .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
        .collect()
}

/// Where a topic's publisher records the last seq of `origin` it published.
pub fn published_source(topic: &str, origin: &str) -> String {
    format!("published:{topic}:{origin}")
}

/// A topic this node publishes into, as its log sees it: a reader of `origins`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedTopic {
    /// The name it acknowledges under (`TOPIC_READER`, `CHANGES_READER`).
    pub reader: &'static str,
    pub topic: String,
    pub origins: Vec<NodeId>,
}

/// The topics this node publishes into: its own topic, if a downstream peer is on a Kafka
/// link (the origins any such peer is sent, `topology::forwards`), and its changes topic
/// with `[kafka] changes` (its own events).
pub fn published_topics(config: &NodeConfig) -> Vec<PublishedTopic> {
    let (topology, me) = (&config.topology, &config.node);
    let peers: Vec<&NodeId> = (crate::topology::downstream(topology, me).into_iter())
        .filter(|peer| topology.link_transport(me, &peer.id) == Transport::Kafka)
        .map(|peer| &peer.id)
        .collect();
    let mut topics = Vec::new();
    if !peers.is_empty() {
        let origins = (topology.nodes.iter())
            .map(|n| n.id.clone())
            .filter(|o| (peers.iter()).any(|p| crate::topology::forwards(topology, me, p, o)))
            .collect();
        topics.push(PublishedTopic {
            reader: TOPIC_READER,
            topic: record::topic(&topology.mesh, me),
            origins,
        });
    }
    if topology.kafka_changes() {
        topics.push(PublishedTopic {
            reader: CHANGES_READER,
            topic: record::changes_topic(&topology.mesh, me),
            origins: vec![me.clone()],
        });
    }
    topics
}

/// Publishes this node's log into its topic until shutdown, for `peers`, the downstream
/// peers on Kafka links.
pub async fn publish_loop(ctx: Context, peers: Vec<NodeId>) {
    let Some(published) = published_topics(&ctx.config)
        .into_iter()
        .find(|t| t.reader == TOPIC_READER)
    else {
        return;
    };
    let job = Job {
        published,
        format: Format::Batches,
        readers: Readers::Peers(peers),
    };
    run(ctx, job).await;
}

/// Publishes this node's own changes as JSON documents into its changes topic until
/// shutdown (`[kafka] changes`).
pub async fn changes_loop(ctx: Context) {
    let Some(published) = published_topics(&ctx.config)
        .into_iter()
        .find(|t| t.reader == CHANGES_READER)
    else {
        return;
    };
    let job = Job {
        published,
        format: Format::Envelopes {
            mesh: ctx.config.topology.mesh.clone(),
        },
        readers: Readers::ChangesTopic,
    };
    run(ctx, job).await;
}

/// What one publishing loop writes, and for whom.
struct Job {
    published: PublishedTopic,
    format: Format,
    readers: Readers,
}

/// Who reads what a publishing loop writes, and so who hears of a round.
enum Readers {
    /// Downstream peers on Kafka links: told what was sent; they acknowledge themselves.
    Peers(Vec<NodeId>),
    /// Consumers weft does not know.
    ChangesTopic,
}

async fn run(ctx: Context, job: Job) {
    let topic = &job.published.topic;
    let mut shutdown = ctx.shutdown.clone();
    let mut log_grew = ctx.log_grew.subscribe();
    let mut backoff = Backoff::default();
    let mut publisher = None;
    loop {
        let stopping = *shutdown.borrow();
        let started = tokio::time::Instant::now();
        let round = round(&ctx, &mut publisher, &job);
        // A round waits while the cluster is away; a stop interrupts it for a last round,
        // bounded: what it leaves is published after the restart.
        let outcome = if stopping {
            match tokio::time::timeout(Duration::from_secs(5), round).await {
                Ok(outcome) => outcome,
                Err(_) => return,
            }
        } else {
            tokio::select! {
                outcome = round => outcome,
                _ = stopped(&mut shutdown) => continue,
            }
        };
        let wait = match outcome {
            Ok(published) => {
                if let Readers::Peers(peers) = &job.readers {
                    let own = published.get(&ctx.config.node).copied().unwrap_or(0);
                    peers.iter().for_each(|peer| ctx.observer.sent(peer, own));
                }
                // The topic is a reader of the log: it keeps what the topic lacks.
                ctx.record_acks(job.published.reader, &published);
                backoff = Backoff::default();
                Duration::from_secs(1)
            }
            Err(error) => {
                // A producer stopped by the gapless guarantee cannot go on: a new one starts
                // from the published seq.
                publisher = None;
                let redial = backoff.on_failure(started.elapsed());
                if redial.worth_reporting() {
                    tracing::warn!(%topic, %error, failures = redial.failures, "cannot publish to Kafka; retrying (the log keeps what is not published)");
                }
                redial.wait
            }
        };
        if stopping {
            return;
        }
        tokio::select! {
            _ = stopped(&mut shutdown) => {}
            _ = log_grew.changed() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One publishing round (making the topic and the producer the first time); returns the
/// seq published of each origin.
async fn round(
    ctx: &Context,
    publisher: &mut Option<Publisher>,
    job: &Job,
) -> Result<std::collections::BTreeMap<NodeId, u64>, LinkError> {
    let PublishedTopic { topic, origins, .. } = &job.published;
    let publisher = match publisher {
        Some(publisher) => publisher,
        None => {
            let client = super::client(&ctx.config, ctx.config.region())?;
            let sizes = super::sizes(&ctx.config);
            super::ensure_topic(&client, topic, sizes).await?;
            let mut made = Publisher::new(ctx.store.clone(), client, topic.clone(), origins.clone(), sizes)?;
            made.format = job.format.clone();
            publisher.insert(made)
        }
    };
    publisher.publish_pending().await?;
    let mut published = std::collections::BTreeMap::new();
    for origin in origins {
        published.insert(origin.clone(), publisher.published(origin).await?);
    }
    Ok(published)
}
