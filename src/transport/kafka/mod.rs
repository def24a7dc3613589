//! The Kafka binding: links on which a sender writes its outgoing log into its topic and the
//! receiver reads it from there, with the same outcome in the database as the gRPC binding.
//!
//! - [`publish`]: the sender's half. One topic per node (`record::topic`), one partition,
//!   created here if missing; an idempotent producer (`acks=all`, gapless) writes the log of
//!   every origin the node sends over Kafka, in order, with no hole. With `[kafka] changes`,
//!   a second one writes the node's own changes as JSON documents into
//!   `weft.<mesh>.<node>.changes`.
//! - [`consume`]: the receiver's half, one reader per upstream peer. It assigns partition 0
//!   and seeks to the position stored in its own database (no group membership, no
//!   rebalancing, `auto.offset.reset=error`), applies whole capture batches through the same
//!   admission checks as gRPC, and stores the next offset in the transaction of the applied
//!   rows (`Store::apply_from`), so it applies each event exactly once without Kafka
//!   transactions. A position outside the log (retention expired, topic recreated) and a gap
//!   take the re-seed path (`join`): never a silent jump.
//! - [`acks`]: what a receiver says back. It commits its position to the group
//!   `weft.<receiver>` (so Kafka's own tools show its lag) with a [`acks::Receipt`] as the
//!   offset's metadata: its frontiers and the node reports it knows. The sender reads those
//!   receipts as acknowledgements (log trimming, `weft status`, tombstone GC) and, at start,
//!   as the evidence that its database did not go back in time.
//!
//! What Kafka does not carry: relay repair (there is no way back on a topic to ask for a
//! relay), snapshots and audits (those stay on the gRPC listener, over mutual TLS). Who may
//! write a topic is the cluster's ACLs' business: only node X's principal should write
//! `weft.<mesh>.X`; every record still passes admission as on gRPC.
pub mod acks;
pub mod consume;
pub mod publish;

pub use publish::{PublishError, Publisher, kafka_headers, record_headers};

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use crate::config::NodeConfig;

/// Why a Kafka link stopped; it is retried after a pause unless it says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("region `{0}` has no Kafka cluster in the topology's [kafka] section")]
    NoCluster(String),
    #[error(
        "topic {topic} has {partitions} partitions; weft's order is per topic, so it needs exactly one: \
         delete it (or rename the mesh) and let weft create it"
    )]
    Partitions { topic: String, partitions: usize },
    #[error("{topic} offset {offset} is not a weft record: {error}; nothing past it is applied until it is removed")]
    Record {
        topic: String,
        offset: i64,
        error: super::record::RecordError,
    },
    #[error("{topic} offset {offset}: {refusal}")]
    Refused {
        topic: String,
        offset: i64,
        refusal: Box<super::handshake::Refusal>,
    },
    #[error(
        "position {position} of {topic} is outside the topic (retention deleted what this node had not read, \
         or the topic was recreated)"
    )]
    Expired { topic: String, position: String },
    #[error("{topic} skips events of {origin}: this node has {have}, the next record holds {got}")]
    Gap {
        topic: String,
        origin: String,
        have: u64,
        got: u64,
    },
    #[error("{0}")]
    Publish(#[from] PublishError),
}

/// A client configuration for the cluster of `region`: its bootstrap servers from the
/// topology, and the node's `[kafka]` settings (TLS, SASL).
pub fn client(config: &NodeConfig, region: &str) -> Result<ClientConfig, LinkError> {
    let bootstrap = (config.topology)
        .kafka_bootstrap(region)
        .ok_or_else(|| LinkError::NoCluster(region.to_owned()))?;
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", bootstrap)
        .set("client.id", format!("weft-{}", config.node));
    for (key, value) in &config.kafka {
        client.set(key, value);
    }
    Ok(client)
}

/// Creates `topic` with one partition (and the cluster's default replication) if it does
/// not exist; refuses a topic of more partitions, whose order would not be total.
pub async fn ensure_topic(client: &ClientConfig, topic: &str) -> Result<(), LinkError> {
    let admin: std::sync::Arc<AdminClient<DefaultClientContext>> = std::sync::Arc::new(client.create()?);
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(-1)).set("cleanup.policy", "delete");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics([&new], &options).await? {
        match result {
            Ok(_) => tracing::info!(%topic, "created the topic of this node's outgoing log"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(rdkafka::error::KafkaError::AdminOp(code).into()),
        }
    }
    // A topic just created may show no partitions until its metadata has spread.
    let mut partitions = 0;
    for _ in 0..50 {
        let (admin, topic_name) = (admin.clone(), topic.to_owned());
        partitions = tokio::task::spawn_blocking(move || {
            let metadata = admin
                .inner()
                .fetch_metadata(Some(&topic_name), Duration::from_secs(30))?;
            Ok::<_, rdkafka::error::KafkaError>(metadata.topics().first().map_or(0, |t| t.partitions().len()))
        })
        .await
        .expect("the metadata task does not panic")?;
        if partitions > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if partitions != 1 {
        return Err(LinkError::Partitions {
            topic: topic.to_owned(),
            partitions,
        });
    }
    Ok(())
}
