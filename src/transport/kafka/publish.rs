//! The Kafka binding's publishing half: a node's outgoing log, written into its topic
//! (`record::topic`) by an idempotent producer with `acks=all`.
//!
//! For each origin the node publishes (its own, and the ones it relays), the publisher
//! reads the log past the seq it last published, writes those events as records (whole
//! capture batches, split into records of at most `max_record_bytes`), waits until the
//! broker has acknowledged every record, and only then records the new published seq in the
//! node's database (`Store::record_position`, source `published:<topic>:<origin>`). A crash
//! between the broker's acknowledgement and that write publishes the same events again after
//! the restart; receivers drop them as duplicates by their frontiers, so the topic may hold
//! an event twice but no receiver applies it twice, and no event is ever skipped.
//!
//! `publish_loop` runs a publisher in a node: a round whenever the log grows (and every
//! second), backing off while the cluster is unreachable; the log keeps what is not
//! published, so an outage of the cluster only delays. `changes_loop` runs a second one when
//! the topology asks for `[kafka] changes`: the node's own events as JSON documents
//! (`record::envelopes`) into `weft.<mesh>.<node>.changes`. It acknowledges what it
//! published as the reader [`CHANGES_READER`], so the log keeps what that topic lacks.
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedHeaders, Header, Headers as _, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use crate::event::NodeId;
use crate::shutdown::stopped;
use crate::store::{Position, Store, StoreError};

use super::LinkError;
use crate::transport::Context;
use crate::transport::record::{self, CHANGES_READER};
use crate::transport::session::Backoff;

/// Why publishing stopped; the caller retries after a pause.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the log holds an event that does not decode: {0}")]
    Log(#[from] crate::wire::WireError),
}

/// What a publisher writes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Format {
    /// `weft.v1.Batch` records, the Kafka links' (`record::encode`).
    #[default]
    Batches,
    /// One JSON document per event, for consumers that do not speak weft
    /// (`record::envelopes`); the mesh's name goes in each document.
    Envelopes { mesh: String },
}

/// Publishes one node's log into its topic.
pub struct Publisher {
    store: Arc<Store>,
    producer: FutureProducer,
    topic: String,
    origins: Vec<NodeId>,
    /// Log events read at once per origin.
    pub read_max: usize,
    /// The largest record value written (the broker's `message.max.bytes` is 1 MiB by
    /// default).
    pub max_record_bytes: usize,
    pub format: Format,
}

impl Publisher {
    /// A publisher of `origins` from `store`'s log into `topic`, through the brokers of
    /// `client` (`bootstrap.servers` and any TLS or SASL settings); idempotence and
    /// `acks=all` are set here.
    pub fn new(
        store: Arc<Store>,
        mut client: ClientConfig,
        topic: String,
        origins: Vec<NodeId>,
    ) -> Result<Self, PublishError> {
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
        })
    }

    fn source(&self, origin: &str) -> String {
        format!("published:{}:{origin}", self.topic)
    }

    /// The last seq of `origin` published and acknowledged by the broker.
    pub async fn published(&self, origin: &str) -> Result<u64, StoreError> {
        Ok(self.store.position(&self.source(origin)).await?.unwrap_or(0) as u64)
    }

    /// Publishes everything the log holds past what was published; returns how many
    /// events it wrote.
    pub async fn publish_pending(&self) -> Result<u64, PublishError> {
        let mut written = 0;
        for origin in &self.origins {
            loop {
                let after = self.published(origin).await?;
                let entries = self.store.read_log(origin, after, self.read_max).await?;
                let Some(last) = entries.last().map(|e| e.seq) else {
                    break;
                };
                let events = (entries.iter())
                    .map(|e| crate::wire::decode_event(&e.bytes))
                    .collect::<Result<Vec<_>, _>>()?;
                let records = match &self.format {
                    Format::Batches => record::encode(&events, self.max_record_bytes),
                    Format::Envelopes { mesh } => record::envelopes(&events, mesh),
                };
                self.send(&records).await?;
                let position = Position {
                    source: self.source(origin),
                    next: last as i64,
                };
                self.store.record_position(&position).await?;
                written += events.len() as u64;
            }
        }
        Ok(written)
    }

    /// Sends `records` and waits until the broker has acknowledged them all. They are in
    /// flight together: the idempotent producer keeps their order in the partition, and with
    /// `enable.gapless.guarantee` (and no local timeout) a failure that could leave a hole
    /// behind a record stops the producer instead (it is made again for the next round), so
    /// the topic never holds a later event without the earlier ones.
    async fn send(&self, records: &[record::Record]) -> Result<(), PublishError> {
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

/// Publishes this node's log into its topic until shutdown, for `peers`, the downstream
/// peers on Kafka links: the origins any of them is sent (`topology::forwards`).
pub async fn publish_loop(ctx: Context, peers: Vec<NodeId>) {
    let config = ctx.config.clone();
    let me = config.node.clone();
    let origins: Vec<NodeId> = (config.topology.nodes.iter())
        .map(|n| n.id.clone())
        .filter(|o| (peers.iter()).any(|p| crate::topology::forwards(&config.topology, &me, p, o)))
        .collect();
    let job = Job {
        topic: record::topic(&config.topology.mesh, &me),
        origins,
        format: Format::Batches,
        readers: Readers::Peers(peers),
    };
    run(ctx, job).await;
}

/// Publishes this node's own changes as JSON documents into its changes topic until
/// shutdown (`[kafka] changes`).
pub async fn changes_loop(ctx: Context) {
    let config = ctx.config.clone();
    let job = Job {
        topic: record::changes_topic(&config.topology.mesh, &config.node),
        origins: vec![config.node.clone()],
        format: Format::Envelopes {
            mesh: config.topology.mesh.clone(),
        },
        readers: Readers::ChangesTopic,
    };
    run(ctx, job).await;
}

/// What one publishing loop writes, and for whom.
struct Job {
    topic: String,
    origins: Vec<NodeId>,
    format: Format,
    readers: Readers,
}

/// Who reads what a publishing loop writes, and so who hears of a round.
enum Readers {
    /// Downstream peers on Kafka links: told what was sent; they acknowledge themselves.
    Peers(Vec<NodeId>),
    /// Consumers weft does not know: the loop acknowledges for them, as `CHANGES_READER`,
    /// so the log keeps what the topic lacks.
    ChangesTopic,
}

async fn run(ctx: Context, job: Job) {
    let topic = &job.topic;
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
            Ok(own) => {
                match &job.readers {
                    Readers::Peers(peers) => peers.iter().for_each(|peer| ctx.observer.sent(peer, own)),
                    Readers::ChangesTopic => {
                        let published = [(ctx.config.node.clone(), own)].into_iter().collect();
                        ctx.record_acks(CHANGES_READER, &published);
                    }
                }
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

/// One publishing round (making the topic and the producer the first time); returns this
/// node's own seq published.
async fn round(ctx: &Context, publisher: &mut Option<Publisher>, job: &Job) -> Result<u64, LinkError> {
    let publisher = match publisher {
        Some(publisher) => publisher,
        None => {
            let client = super::client(&ctx.config, ctx.config.region())?;
            super::ensure_topic(&client, &job.topic).await?;
            let mut made = Publisher::new(ctx.store.clone(), client, job.topic.clone(), job.origins.clone())?;
            made.format = job.format.clone();
            publisher.insert(made)
        }
    };
    publisher.publish_pending().await?;
    Ok(publisher.published(&ctx.config.node).await?)
}
