//! weft's topics on a cluster, and how large a record in them may be.
//!
//! One rule holds on every link: `[replication] max_message_mib` bounds one message; on
//! Kafka, one record. [`Sizes`] turns it into the limits librdkafka and the broker enforce:
//! - a publisher writes records of at most [`Sizes::record`] bytes (key, value and headers),
//!   room for one event of `max_message_mib` and its framing; its producer's
//!   `message.max.bytes` is that, so librdkafka takes every such record;
//! - a topic must take a record batch holding one such record: `max.message.bytes` of at
//!   least [`Sizes::topic`]. [`ensure_topic`] creates weft's topics so, and raises an
//!   existing topic that is below it (keeping its other settings), or, where the cluster
//!   refuses, stops with the topic, the setting, the value found and the value needed;
//! - every client takes responses that large (`receive.message.max.bytes`).
//!
//! What `max_message_mib` cannot change is the broker's `socket.request.max.bytes` (100 MiB by
//! default), which bounds a produce request: past about 99 MiB it must be raised on the
//! brokers too (README, *Kafka links*).
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, ConfigSource, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use super::LinkError;

/// Room in a record for its key, headers and the protobuf framing around one event.
const RECORD_FRAMING: usize = 64 * 1024;
/// Room in a record batch for its header and the record's own framing.
const BATCH_FRAMING: usize = 64 * 1024;
/// librdkafka's default `receive.message.max.bytes`, never lowered here.
const DEFAULT_RECEIVE: usize = 100_000_000;

/// The byte limits of weft's records, from `max_message_mib`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    message: usize,
}

impl Sizes {
    /// The limits for messages of at most `max_message_bytes`
    /// (`ReplicationConfig::max_message_bytes`).
    pub fn of(max_message_bytes: usize) -> Self {
        Self {
            message: max_message_bytes,
        }
    }

    /// The largest record a publisher writes, key and headers included: the producer's
    /// `message.max.bytes`.
    pub fn record(&self) -> usize {
        self.message + RECORD_FRAMING
    }

    /// The `max.message.bytes` a topic needs: a batch of one largest record.
    pub fn topic(&self) -> usize {
        self.record() + BATCH_FRAMING
    }

    /// A client's `receive.message.max.bytes`: a fetch response holding such a batch.
    pub fn receive(&self) -> usize {
        DEFAULT_RECEIVE.max(self.topic() + (1 << 20))
    }

    /// Sets the size settings on a client.
    pub fn apply(&self, client: &mut ClientConfig) {
        client
            .set("message.max.bytes", self.record().to_string())
            .set("receive.message.max.bytes", self.receive().to_string());
    }
}

/// Creates `topic` with one partition (the cluster's default replication) and room for
/// records of `sizes` if it does not exist; refuses a topic of more partitions, whose order
/// would not be total, and raises (or refuses) one whose records may not be that large.
pub async fn ensure_topic(client: &ClientConfig, topic: &str, sizes: Sizes) -> Result<(), LinkError> {
    let admin: Arc<AdminClient<DefaultClientContext>> = Arc::new(client.create()?);
    let limit = sizes.topic().to_string();
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(-1))
        .set("cleanup.policy", "delete")
        .set("max.message.bytes", &limit);
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let mut existed = false;
    for result in admin.create_topics([&new], &options).await? {
        match result {
            Ok(_) => tracing::info!(%topic, "created the topic of this node's outgoing log"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => existed = true,
            Err((_, code)) => return Err(rdkafka::error::KafkaError::AdminOp(code).into()),
        }
    }
    check_partitions(&admin, topic).await?;
    if existed {
        check_record_limit(&admin, topic, sizes).await?;
    }
    Ok(())
}

async fn check_partitions(admin: &Arc<AdminClient<DefaultClientContext>>, topic: &str) -> Result<(), LinkError> {
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

/// Reads an existing topic's `max.message.bytes`; raises it to `sizes.topic()` if it is
/// below, keeping the topic's other settings (the admin API replaces them all at once).
async fn check_record_limit(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    sizes: Sizes,
) -> Result<(), LinkError> {
    let needed = sizes.topic();
    let refused = |found: Option<usize>, cause: String| LinkError::RecordLimit {
        topic: topic.to_owned(),
        found,
        needed,
        cause,
    };
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &options)
        .await?
        .pop()
        .ok_or_else(|| refused(None, "the cluster described no such topic".into()))?
        .map_err(|code| refused(None, format!("reading its settings failed: {code}")))?;
    let found = (described.get("max.message.bytes")).and_then(|entry| entry.value.as_deref()?.parse::<usize>().ok());
    let Some(found) = found else {
        return Err(refused(None, "the cluster did not say".into()));
    };
    if found >= needed {
        return Ok(());
    }
    // The settings set on the topic itself, kept: anything left out reverts to the default.
    let own: Vec<(&str, Option<&str>)> = (described.entries.iter())
        .filter(|e| e.source == ConfigSource::DynamicTopic && e.name != "max.message.bytes")
        .map(|e| (e.name.as_str(), e.value.as_deref()))
        .collect();
    if let Some((name, _)) = own.iter().find(|(_, value)| value.is_none()) {
        return Err(refused(
            Some(found),
            format!("weft cannot raise it without losing the topic's setting {name}, whose value the cluster hides"),
        ));
    }
    let needed_text = needed.to_string();
    let alter = (own.iter()).fold(
        AlterConfig::new(ResourceSpecifier::Topic(topic)),
        |alter, (name, value)| alter.set(name, value.unwrap_or_default()),
    );
    let alter = alter.set("max.message.bytes", &needed_text);
    let result = admin.alter_configs([&alter], &options).await?.pop();
    match result {
        Some(Ok(_)) => {
            tracing::warn!(%topic, found, needed, "raised the topic's max.message.bytes to take records of [replication] max_message_mib");
            Ok(())
        }
        Some(Err((_, code))) => Err(refused(Some(found), format!("raising it failed: {code}"))),
        None => Err(refused(Some(found), "raising it got no answer".into())),
    }
}
