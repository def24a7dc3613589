//! The Kafka binding: links on which a sender writes its outgoing log into its topic and the
//! receiver reads it from there, with the same outcome in the database as the gRPC binding.
//!
//! - [`publish`]: the sender's half. One topic per node (`record::topic`); an idempotent
//!   producer (`acks=all`, gapless) writes the log of every origin the node sends over
//!   Kafka, in order, with no hole that is not marked by a gap record ([`layout`]: what
//!   stands in for what the log no longer holds or what is too large). With `[kafka]
//!   changes`, a second one writes the node's own changes as JSON documents ([`envelope`])
//!   into `weft.<mesh>.<node>.changes`.
//! - [`consume`]: the receiver's half, one reader per upstream peer. It assigns partition 0
//!   and seeks to the position stored in its own database (no group membership, no
//!   rebalancing, `auto.offset.reset=error`), applies whole capture batches through the same
//!   admission checks as gRPC, and stores the next offset in the transaction of the applied
//!   rows (`Store::apply_from`), so it applies each event exactly once without Kafka
//!   transactions. A position outside the log (retention expired, topic recreated) and a gap
//!   take the re-seed path (`join`): never a silent jump.
//! - [`topic`]: weft's topics (one partition, created if missing) and how large a record in
//!   them may be: `[replication] max_message_mib`, as on gRPC, set on every client and
//!   checked (raised where allowed) on every topic weft writes.
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
pub mod envelope;
pub mod layout;
pub mod publish;
pub mod topic;

pub use publish::{PublishError, Publisher, kafka_headers, record_headers};
pub use topic::{Sizes, ensure_topic};

use rdkafka::ClientConfig;

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
    #[error(
        "{topic} holds no events {from}..={to} of {origin} (a gap record: its publisher no longer had them, or \
         one was too large for a record), and this node has {origin} only up to {have}"
    )]
    Hole {
        topic: String,
        origin: String,
        from: u64,
        to: u64,
        have: u64,
    },
    #[error(
        "{topic}: a capture batch of {origin} has stayed open for {secs} s with {behind} events of other origins \
         held behind it; its rest is not coming (its publisher stopped carrying {origin}, or lost it), so it is \
         taken as a gap (this node has {origin} up to {have})"
    )]
    OpenBatch {
        topic: String,
        origin: String,
        have: u64,
        behind: usize,
        secs: u64,
    },
    #[error("{0}")]
    Publish(#[from] PublishError),
    #[error("{}", record_limit(topic, *found, *needed, cause))]
    RecordLimit {
        topic: String,
        /// Its `max.message.bytes`, if the cluster said.
        found: Option<usize>,
        needed: usize,
        cause: String,
    },
}

/// What `LinkError::RecordLimit` says: what is wrong with the topic, and what to do.
fn record_limit(topic: &str, found: Option<usize>, needed: usize, cause: &str) -> String {
    let what = match found {
        Some(found) => format!("topic {topic} takes records of at most {found} bytes (its max.message.bytes)"),
        None => format!("the max.message.bytes of topic {topic} is unknown"),
    };
    format!(
        "{what}, and weft needs {needed} for [replication] max_message_mib: {cause}. Raise it (kafka-configs \
         --alter --entity-type topics --entity-name {topic} --add-config max.message.bytes={needed}), let weft's \
         principal describe and alter the topic's settings, or lower max_message_mib on every node"
    )
}

/// A client configuration for the cluster of `region`: its bootstrap servers from the
/// topology, the node's `[kafka]` settings (TLS, SASL), and the record sizes of
/// `max_message_mib` (`topic::Sizes`).
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
    sizes(config).apply(&mut client);
    Ok(client)
}

/// The record sizes of this node's `max_message_mib`.
pub fn sizes(config: &NodeConfig) -> Sizes {
    Sizes::of(config.replication.max_message_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_too_small_for_its_records_is_named_with_what_to_do() {
        let error = LinkError::RecordLimit {
            topic: "weft.m.a".into(),
            found: Some(1_048_588),
            needed: 67_239_936,
            cause: "raising it failed: Broker: Topic authorization failed".into(),
        };
        let said = error.to_string();
        for part in [
            "topic weft.m.a takes records of at most 1048588 bytes (its max.message.bytes)",
            "weft needs 67239936 for [replication] max_message_mib",
            "Topic authorization failed",
            "--entity-name weft.m.a --add-config max.message.bytes=67239936",
        ] {
            assert!(said.contains(part), "{said}");
        }
        let unknown = record_limit("weft.m.a", None, 67_239_936, "the cluster did not say");
        assert!(
            unknown
                .to_string()
                .starts_with("the max.message.bytes of topic weft.m.a is unknown")
        );
    }
}
