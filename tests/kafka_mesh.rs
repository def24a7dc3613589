//! Real `weft run` processes whose links are Kafka topics on a real Apache Kafka broker
//! (KRaft, started by the harness for this test binary): the process suites of gRPC
//! (convergence under concurrent writes, kill -9 mid-apply, relaying rings and stars) and
//! the broker's own faults. Exactly-once is checked with the application's audit rows
//! (`common/sidecars.rs`). Each test has its own mesh name, so its own topics.
mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::scenarios;
use common::sidecars::Sidecars;
use weft::config::{KafkaClusters, LinkSpec, ReplicationConfig, Shape, Topology, Transport};
use weft::harness::kafka::Broker;
use weft::harness::loopback::LoopbackMesh;

fn broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(|| Broker::start().expect("an Apache Kafka broker (see the error for what to install)"))
}

/// Tests that stop the broker hold this exclusively; the others share it.
static FAULTS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Three regions in `shape`, every link on Kafka unless `links` says otherwise.
fn kafka_mesh(mesh: &str, shape: Shape, links: Vec<LinkSpec>) -> Topology {
    let mut topology = LoopbackMesh::all_to_all(&["east", "west", "south"]);
    topology.mesh = mesh.to_owned();
    topology.shape = shape;
    if shape == Shape::Star {
        topology.hub = Some("east-1".into());
    }
    topology.transport = Transport::Kafka;
    topology.links = links;
    topology.kafka = Some(KafkaClusters {
        bootstrap: Some(broker().bootstrap.clone()),
        ..Default::default()
    });
    topology
}

async fn sidecars(dir: &std::path::Path, topology: Topology) -> Sidecars {
    Sidecars::with(dir, topology, ReplicationConfig::default()).await
}

/// The events did cross the broker: each of `reads` (region, peer node) has a stored
/// position in the peer's topic past its first record.
async fn assert_read_over_kafka(sidecars: &Sidecars, mesh: &str, reads: &[(usize, &str)]) {
    for &(i, peer) in reads {
        let region = &sidecars.mesh.regions[i];
        let topic = format!("weft.{mesh}.{peer}");
        let next: Option<i64> = sqlx::query_scalar("SELECT next FROM _weft_positions WHERE source = ?")
            .bind(&topic)
            .fetch_optional(&region.app)
            .await
            .unwrap();
        assert!(next.unwrap_or(0) > 0, "{} read nothing of {topic}", region.region);
    }
}

/// Every read of an all-to-all mesh of three.
const ALL_READS: [(usize, &str); 6] = [
    (0, "west-1"),
    (0, "south-1"),
    (1, "east-1"),
    (1, "south-1"),
    (2, "east-1"),
    (2, "west-1"),
];

/// Every region writes concurrently; then each node's state is checked in every region.
async fn write_everywhere(sidecars: &Sidecars, from: i64, count: i64) {
    tokio::join!(
        sidecars.write(0, from, count, 7),
        sidecars.write(1, from, count, 1),
        sidecars.write(2, from, count, 50)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sidecars_converge_over_kafka_exactly_once() {
    let _shared = FAULTS.read().await;
    let dir = tempfile::tempdir().unwrap();
    let sidecars = sidecars(dir.path(), kafka_mesh("converge", Shape::AllToAll, Vec::new())).await;
    let ports = common::http::enable_http(&sidecars);
    sidecars.spawn_all().await;
    write_everywhere(&sidecars, 0, 600).await;
    sidecars.update_shared(0, 1, "east").await;
    sidecars.update_shared(1, 1, "west").await;
    sidecars.assert_exactly_once(1800).await;
    assert_read_over_kafka(&sidecars, "converge", &ALL_READS).await;
    // `weft status` shows the Kafka peers' acknowledgements (receipts are read every
    // second) and the stored positions.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
            .args(["status", "--json", "--config"])
            .arg(&sidecars.mesh.regions[0].config_file)
            .output()
            .unwrap();
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let peers = status["peers"].as_array().unwrap();
        let last = &status["last_seq"];
        if peers.iter().all(|p| p["origin"] == "east-1" && &p["acked"] == last) {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the Kafka peers never acknowledged all of east's events: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // `/metrics` on Kafka links: lag per origin and the peers' backlog from their receipts;
    // no stream state (a Kafka link has no stream to be down).
    let scrape = common::http::get(dir.path(), ports[0], "east-1", "/metrics", Some(common::http::TOKEN)).await;
    assert_eq!(scrape.0, 200, "{}", scrape.1);
    let lag = common::http::value(&scrape.1, "weft_replication_lag_seconds_count", &["origin=\"west-1\""]);
    assert!(lag.is_some_and(|n| n >= 600.0), "{}", scrape.1);
    let backlog = ["peer=\"west-1\"", "origin=\"east-1\""];
    assert_eq!(
        common::http::value(&scrape.1, "weft_peer_backlog_events", &backlog),
        Some(0.0)
    );
    assert!(!scrape.1.contains("weft_peer_connected{"), "{}", scrape.1);
    let positions = status["positions"].as_array().unwrap();
    for source in [
        "weft.converge.west-1",
        "weft.converge.south-1",
        "published:weft.converge.east-1:east-1",
    ] {
        let found = positions.iter().find(|p| p[0] == source);
        assert!(
            found.is_some_and(|p| p[1].as_i64() > Some(0)),
            "{source} in {positions:?}"
        );
    }
    sidecars.terminate_all();
}

/// Every strategy on Kafka links gives the outcome it gives on gRPC (the scenarios are
/// shared with `processes.rs`): a CRDT counter, an ownership transfer under load, a queued
/// row resolved once for all regions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crdt_counter_decremented_in_two_regions_over_kafka_adds_up() {
    let _shared = FAULTS.read().await;
    let dir = tempfile::tempdir().unwrap();
    let sidecars = sidecars(dir.path(), kafka_mesh("crdt", Shape::AllToAll, Vec::new())).await;
    sidecars.spawn_all().await;
    scenarios::counter_decremented_from_two_regions(&sidecars).await;
    assert_read_over_kafka(&sidecars, "crdt", &[(0, "west-1"), (1, "east-1"), (2, "east-1")]).await;
    sidecars.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ownership_transfer_under_load_over_kafka_loses_no_write() {
    let _shared = FAULTS.read().await;
    let dir = tempfile::tempdir().unwrap();
    let sidecars = sidecars(dir.path(), kafka_mesh("ownership", Shape::AllToAll, Vec::new())).await;
    sidecars.spawn_all().await;
    scenarios::ownership_transfer_under_load(&sidecars).await;
    // South writes nothing here: only east's and west's topics hold records.
    let reads = [(0, "west-1"), (1, "east-1"), (2, "east-1"), (2, "west-1")];
    assert_read_over_kafka(&sidecars, "ownership", &reads).await;
    sidecars.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_failover_over_kafka_fences_the_writes_the_lost_region_did_not_replicate() {
    let _shared = FAULTS.read().await;
    let dir = tempfile::tempdir().unwrap();
    let sidecars = sidecars(dir.path(), kafka_mesh("failover", Shape::AllToAll, Vec::new())).await;
    sidecars.spawn_all().await;
    scenarios::forced_failover_fences_the_lost_regions_writes(&sidecars).await;
    sidecars.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_row_edited_in_three_regions_over_kafka_is_resolved_once_for_all() {
    let _shared = FAULTS.read().await;
    let dir = tempfile::tempdir().unwrap();
    let sidecars = sidecars(dir.path(), kafka_mesh("queue", Shape::AllToAll, Vec::new())).await;
    sidecars.spawn_all().await;
    scenarios::queued_row_edited_everywhere_resolved_once(&sidecars).await;
    assert_read_over_kafka(&sidecars, "queue", &ALL_READS).await;
    sidecars.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_killed_right_after_an_apply_commit_applies_nothing_twice() {
    let _shared = FAULTS.read().await;
    let dir = tempfile::tempdir().unwrap();
    let sidecars = sidecars(dir.path(), kafka_mesh("apply-crash", Shape::AllToAll, Vec::new())).await;
    scenarios::receiver_killed_after_an_apply_commit(&sidecars).await;
    sidecars.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_kill_9_of_sidecars_on_kafka_loses_and_doubles_nothing() {
    let _shared = FAULTS.read().await;
    let dir = tempfile::tempdir().unwrap();
    let sidecars = sidecars(dir.path(), kafka_mesh("kill9", Shape::AllToAll, Vec::new())).await;
    sidecars.spawn_all().await;
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut written = 0;
    for round in 0..4u64 {
        let victim = ((seed >> (round * 2)) % 3) as usize;
        let kill_after = Duration::from_millis(50 + (seed >> (round * 3)) % 200);
        let ((), ()) = tokio::join!(
            write_everywhere(&sidecars, written, 150),
            tokio::time::sleep(kill_after)
        );
        sidecars.kill9(victim);
        written += 150;
        sidecars.spawn(victim, None).await;
    }
    sidecars.assert_exactly_once(written * 3).await;
    sidecars.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_and_a_star_relay_through_their_topics() {
    let _shared = FAULTS.read().await;
    for (mesh, shape) in [("ring", Shape::Ring), ("star", Shape::Star)] {
        let dir = tempfile::tempdir().unwrap();
        let sidecars = sidecars(dir.path(), kafka_mesh(mesh, shape, Vec::new())).await;
        sidecars.spawn_all().await;
        write_everywhere(&sidecars, 0, 300).await;
        sidecars.assert_exactly_once(900).await;
        // Ring: each node reads its predecessor's topic; star: the hub reads every spoke's,
        // the spokes read the hub's, which relays each spoke to the other.
        let reads: &[(usize, &str)] = match shape {
            Shape::Ring => &[(0, "south-1"), (1, "east-1"), (2, "west-1")],
            _ => &[(0, "west-1"), (0, "south-1"), (1, "east-1"), (2, "east-1")],
        };
        assert_read_over_kafka(&sidecars, mesh, reads).await;
        sidecars.terminate_all();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_mixing_grpc_and_kafka_links_converges() {
    let _shared = FAULTS.read().await;
    let dir = tempfile::tempdir().unwrap();
    let mut topology = kafka_mesh("mixed", Shape::AllToAll, Vec::new());
    topology.transport = Transport::Grpc;
    topology.links = vec![
        LinkSpec {
            between: ["east-1".into(), "west-1".into()],
            transport: Transport::Kafka,
        },
        LinkSpec {
            between: ["south-1".into(), "west-1".into()],
            transport: Transport::Kafka,
        },
    ];
    let sidecars = sidecars(dir.path(), topology).await;
    sidecars.spawn_all().await;
    write_everywhere(&sidecars, 0, 400).await;
    sidecars.assert_exactly_once(1200).await;
    assert_read_over_kafka(
        &sidecars,
        "mixed",
        &[(0, "west-1"), (1, "east-1"), (1, "south-1"), (2, "west-1")],
    )
    .await;
    for (i, peer) in [(0, "south-1"), (2, "east-1")] {
        let topic = format!("weft.mixed.{peer}");
        let read: Option<i64> = sqlx::query_scalar("SELECT next FROM _weft_positions WHERE source = ?")
            .bind(&topic)
            .fetch_optional(&sidecars.mesh.regions[i].app)
            .await
            .unwrap();
        assert_eq!(read, None, "east and south are linked by gRPC");
    }
    sidecars.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_stopped_and_restarted_mid_stream_loses_and_doubles_nothing() {
    let _alone = FAULTS.write().await;
    let broker = broker();
    let dir = tempfile::tempdir().unwrap();
    let sidecars = sidecars(dir.path(), kafka_mesh("broker-faults", Shape::AllToAll, Vec::new())).await;
    sidecars.spawn_all().await;
    let mut written = 0;
    for graceful in [true, false] {
        let ((), ()) = tokio::join!(write_everywhere(&sidecars, written, 200), async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            broker.stop(graceful);
        });
        written += 200;
        // The applications keep writing while the broker is down.
        write_everywhere(&sidecars, written, 100).await;
        written += 100;
        broker.restart().unwrap();
    }
    sidecars.assert_exactly_once(written * 3).await;
    sidecars.terminate_all();
}

/// Deletes every record of `topic` so far, as retention does to old segments.
async fn expire_records(topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker().bootstrap)
        .create()
        .unwrap();
    let mut offsets = rdkafka::TopicPartitionList::new();
    offsets.add_partition_offset(topic, 0, rdkafka::Offset::End).unwrap();
    let deleted = admin.delete_records(&offsets, &AdminOptions::new()).await.unwrap();
    for element in deleted.elements() {
        element.error().unwrap();
    }
}

/// A region down while retention deleted records of a peer's topic it had not read: it is
/// not moved past them (`auto.offset.reset` is an error); it says why, re-seeds from the
/// peer by snapshot, reads the topic again, and ends with every row exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_whose_unread_records_expired_reseeds_and_loses_nothing() {
    let _shared = FAULTS.read().await;
    let dir = tempfile::tempdir().unwrap();
    let sidecars = sidecars(dir.path(), kafka_mesh("retention", Shape::AllToAll, Vec::new())).await;
    sidecars.spawn_all().await;
    sidecars.write(0, 0, 10, 5).await;
    sidecars.assert_exactly_once(10).await;
    sidecars.stop(1).await;
    sidecars.write(0, 10, 30, 5).await;
    // South has read them all; then they expire before west is back.
    sidecars.wait_items(2, 40, "south never read east's topic").await;
    expire_records("weft.retention.east-1").await;
    sidecars.spawn(1, None).await;
    sidecars.assert_exactly_once(40).await;
    let said = sidecars.log(1);
    assert!(
        said.contains("is outside the topic"),
        "west never said why it re-seeds:\n{said}"
    );
    assert!(said.contains("joined the mesh"), "west never re-seeded:\n{said}");
    sidecars.terminate_all();
}

/// A region restored from an older copy on a Kafka mesh: its peers' receipts and its own
/// topic hold more of its events than its database. It captures nothing until it has
/// re-seeded from a peer that read them all, numbers new changes after them, and every write
/// (those before the backup, those after it that only the peers had, those made on the
/// restored database) ends in every region exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_restored_from_an_older_copy_on_kafka_loses_no_new_write() {
    let _shared = FAULTS.read().await;
    let dir = tempfile::tempdir().unwrap();
    let mut sidecars = sidecars(dir.path(), kafka_mesh("restore", Shape::AllToAll, Vec::new())).await;
    sidecars.spawn_all().await;
    sidecars.write(0, 0, 10, 5).await;
    sidecars.assert_exactly_once(10).await;
    let backup = dir.path().join("east-backup.db");
    sidecars.back_up(0, &backup).await;
    sidecars.write(0, 10, 10, 5).await;
    sidecars.assert_exactly_once(20).await;
    sidecars.stop(0).await;
    sidecars.restore(0, &backup).await;
    sidecars.write(0, 20, 5, 5).await;
    sidecars.spawn(0, None).await;
    sidecars.assert_exactly_once(25).await;
    let said = sidecars.log(0);
    assert!(
        said.contains("went back in time"),
        "east never found it went back:\n{said}"
    );
    sidecars.write(0, 25, 5, 5).await;
    sidecars.write(1, 0, 5, 5).await;
    sidecars.assert_exactly_once(35).await;
    sidecars.terminate_all();
}

/// Reads `topic` from its beginning until `count` records came (or 30 s passed).
fn read_topic(topic: &str, count: usize) -> Vec<rdkafka::message::OwnedMessage> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker().bootstrap)
        .set("group.id", "a-consumer-that-does-not-speak-weft")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = rdkafka::TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, rdkafka::Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut read = Vec::new();
    while read.len() < count && std::time::Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            read.push(message.unwrap().detach());
        }
    }
    read
}

/// `[kafka] changes` on a mesh whose links are gRPC: each node also publishes its own
/// changes, one JSON document per change in Debezium's shape, into its changes topic, where
/// a plain Kafka consumer reads them in commit order, once each, and only its own; the
/// changes topic acknowledges what it took, as a peer does, so the log keeps what it lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_publishes_its_own_changes_as_json_documents_for_plain_consumers() {
    use rdkafka::Message as _;
    let _shared = FAULTS.read().await;
    let dir = tempfile::tempdir().unwrap();
    let mut topology = kafka_mesh("changes", Shape::AllToAll, Vec::new());
    topology.transport = Transport::Grpc;
    topology.kafka.as_mut().unwrap().changes = true;
    let sidecars = sidecars(dir.path(), topology).await;
    sidecars.spawn_all().await;
    sidecars.write(0, 0, 50, 5).await;
    sidecars.write(1, 0, 20, 5).await;
    sidecars.update_shared(0, 1, "east").await;
    // Captured before it goes (a row written and deleted between two captures is no change).
    sidecars.assert_exactly_once(70).await;
    sqlx::query("DELETE FROM shared WHERE id = 1")
        .execute(&sidecars.mesh.regions[0].app)
        .await
        .unwrap();
    sidecars.assert_exactly_once(70).await;

    let read = read_topic("weft.changes.east-1.changes", 52);
    let documents: Vec<serde_json::Value> = (read.iter())
        .map(|m| serde_json::from_slice(m.payload().unwrap()).unwrap())
        .collect();
    assert_eq!(documents.len(), 52, "50 inserts, an upsert and a delete: {documents:?}");
    let seqs: Vec<u64> = documents.iter().map(|d| d["source"]["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "in commit order, once each: {seqs:?}"
    );
    for (i, document) in documents[..50].iter().enumerate() {
        assert_eq!(
            (document["op"].as_str(), document["source"]["table"].as_str()),
            (Some("u"), Some("items"))
        );
        assert_eq!(document["after"]["v"], i as i64, "{document}");
        assert_eq!(document["source"]["node"], "east-1", "only east's own changes");
    }
    assert_eq!(documents[50]["after"]["v"], "east");
    assert_eq!(
        (documents[51]["op"].as_str(), documents[51]["source"]["key"][0].as_i64()),
        (Some("d"), Some(1))
    );
    let key = read[51].key().unwrap();
    assert_eq!(key, br#"{"key":[1],"table":"shared"}"#);
    let west = read_topic("weft.changes.west-1.changes", 20);
    assert_eq!(west.len(), 20);
    for m in &west {
        let document: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        assert_eq!(document["source"]["node"], "west-1");
    }

    let east = &sidecars.mesh.regions[0].app;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let acked: Option<i64> = sqlx::query_scalar("SELECT seq FROM _weft_acks WHERE peer = '~changes'")
            .fetch_optional(east)
            .await
            .unwrap();
        if acked == Some(seqs[51] as i64) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the changes topic never acknowledged: {acked:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sidecars.terminate_all();
}

/// The broker down while a node publishing its changes goes on writing over gRPC links: its
/// peers acknowledge every event, but the log keeps them all until the changes topic has
/// them; once the broker is back, the topic gets every change, in order, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_keeps_what_the_changes_topic_has_not_taken() {
    use rdkafka::Message as _;
    let _alone = FAULTS.write().await;
    let dir = tempfile::tempdir().unwrap();
    let mut topology = kafka_mesh("changes-outage", Shape::AllToAll, Vec::new());
    topology.transport = Transport::Grpc;
    topology.kafka.as_mut().unwrap().changes = true;
    let sidecars = sidecars(dir.path(), topology).await;
    sidecars.spawn_all().await;
    sidecars.write(0, 0, 10, 5).await;
    sidecars.assert_exactly_once(10).await;
    assert_eq!(read_topic("weft.changes-outage.east-1.changes", 10).len(), 10);
    broker().stop(false);
    sidecars.write(0, 10, 30, 5).await;
    sidecars.assert_exactly_once(40).await;
    let east = &sidecars.mesh.regions[0].app;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let acked: Vec<i64> = sqlx::query_scalar("SELECT seq FROM _weft_acks WHERE peer IN ('west-1', 'south-1')")
            .fetch_all(east)
            .await
            .unwrap();
        if acked == [40, 40] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the peers never acknowledged: {acked:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A few upkeep rounds: the peers' acknowledgements alone would trim the log.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM _weft_log WHERE seq > 10")
        .fetch_one(east)
        .await
        .unwrap();
    assert_eq!(kept, 30, "the log keeps what the changes topic lacks");
    broker().restart().unwrap();
    let read = read_topic("weft.changes-outage.east-1.changes", 40);
    let seqs: Vec<u64> = (read.iter())
        .map(|m| {
            serde_json::from_slice::<serde_json::Value>(m.payload().unwrap()).unwrap()["source"]["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, (1..=40).collect::<Vec<u64>>());
    sidecars.terminate_all();
}

/// A mixed mesh: east sends to west over Kafka and to south over gRPC. East is restored from
/// an older copy while south, down meanwhile, has no more of east's events than that copy;
/// only west and east's topic hold the rest. South's confirmation alone must not let east
/// number new changes (they would reuse seqs the topic has, and west would drop them as
/// duplicates): east's history is checked against its topic too, and every write ends in
/// every region exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_region_on_a_mixed_mesh_checks_its_topic_before_numbering() {
    let _shared = FAULTS.read().await;
    let dir = tempfile::tempdir().unwrap();
    let mut topology = kafka_mesh("mixed-restore", Shape::AllToAll, Vec::new());
    topology.transport = Transport::Grpc;
    topology.links = vec![LinkSpec {
        between: ["east-1".into(), "west-1".into()],
        transport: Transport::Kafka,
    }];
    let mut sidecars = sidecars(dir.path(), topology).await;
    sidecars.spawn_all().await;
    sidecars.write(0, 0, 10, 5).await;
    sidecars.assert_exactly_once(10).await;
    let backup = dir.path().join("east-backup.db");
    sidecars.back_up(0, &backup).await;
    for i in [2, 0] {
        if i == 0 {
            // Only west (over Kafka) gets these while south is down.
            sidecars.write(0, 10, 10, 5).await;
            sidecars.wait_items(1, 20, "west never read east's topic").await;
        }
        sidecars.stop(i).await;
    }
    sidecars.restore(0, &backup).await;
    sidecars.write(0, 20, 5, 5).await;
    sidecars.spawn(2, None).await;
    sidecars.spawn(0, None).await;
    sidecars.assert_exactly_once(25).await;
    sidecars.write(0, 25, 5, 5).await;
    sidecars.write(2, 0, 5, 5).await;
    sidecars.assert_exactly_once(35).await;
    sidecars.terminate_all();
}

/// Two regions, east and west, linked over Kafka.
fn kafka_pair(mesh: &str) -> Topology {
    let mut topology = LoopbackMesh::all_to_all(&["east", "west"]);
    topology.mesh = mesh.to_owned();
    topology.transport = Transport::Kafka;
    topology.kafka = Some(KafkaClusters {
        bootstrap: Some(broker().bootstrap.clone()),
        ..Default::default()
    });
    topology
}

/// Waits until `query` (one integer) reads `want` in region `i` (60 s at most); the panic
/// says what did not happen and what the publishing region (0) logged about Kafka.
async fn wait_value(sidecars: &Sidecars, i: usize, query: &'static str, want: i64, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let have: Option<i64> = sqlx::query_scalar(query)
            .fetch_optional(&sidecars.mesh.regions[i].app)
            .await
            .unwrap();
        if have == Some(want) {
            return;
        }
        if std::time::Instant::now() > deadline {
            let said: Vec<String> = (sidecars.log(0).lines())
                .filter(|l| l.contains("Kafka") || l.contains("topic"))
                .map(str::to_owned)
                .collect();
            panic!(
                "{what}: {query} reads {have:?}, not {want}; east logged:\n{}",
                said.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A row of 1.5 MB, over librdkafka's and the broker's default record limit (about 1 MB),
/// crosses a Kafka link, and so does the small row written after it: the producer and the
/// topic take one record as large as `max_message_mib` (64 MiB here) allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_over_a_megabyte_crosses_a_kafka_link_and_the_rows_after_it_follow() {
    let _shared = FAULTS.read().await;
    let dir = tempfile::tempdir().unwrap();
    let sidecars = sidecars(dir.path(), kafka_pair("large-row")).await;
    sidecars.spawn_all().await;
    sqlx::query("INSERT INTO shared (id, v) VALUES (1, randomblob(1500000))")
        .execute(&sidecars.mesh.regions[0].app)
        .await
        .unwrap();
    sidecars.write(0, 0, 1, 1).await;
    let large = "SELECT length(v) FROM shared WHERE id = 1";
    wait_value(&sidecars, 1, large, 1_500_000, "the 1.5 MB row never reached west").await;
    wait_value(
        &sidecars,
        1,
        "SELECT count(*) FROM items",
        1,
        "the row after it never reached west",
    )
    .await;
    sidecars.assert_exactly_once(1).await;
    sidecars.terminate_all();
}

/// The documents of a changes topic, read from its beginning (`count` of them, or what came
/// in 30 s), with their `weft-format` header.
fn changes_documents(topic: &str, count: usize) -> Vec<(String, serde_json::Value)> {
    use rdkafka::Message as _;
    use rdkafka::message::Headers as _;
    (read_topic(topic, count).iter())
        .map(|m| {
            let format = (m.headers().unwrap().iter())
                .find(|h| h.key == "weft-format")
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            (format, serde_json::from_slice(m.payload().unwrap()).unwrap())
        })
        .collect()
}

/// With `[kafka] changes`, a change whose JSON document is larger than the largest record
/// (a 700 KB blob is 1.4 MB of hex, and `max_message_mib = 1` here) is replaced in the
/// changes topic by a `too_large` marker naming it, said at ERROR, and the changes after it
/// follow. The link carries the row itself (its protobuf record is within the limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_too_large_for_the_changes_topic_is_marked_and_the_changes_after_it_follow() {
    let _shared = FAULTS.read().await;
    let dir = tempfile::tempdir().unwrap();
    let mut topology = kafka_pair("large-change");
    topology.kafka.as_mut().unwrap().changes = true;
    let replication = ReplicationConfig {
        max_message_mib: 1,
        ..ReplicationConfig::default()
    };
    let sidecars = Sidecars::with(dir.path(), topology, replication).await;
    sidecars.spawn_all().await;
    sqlx::query("INSERT INTO shared (id, v) VALUES (1, randomblob(700000))")
        .execute(&sidecars.mesh.regions[0].app)
        .await
        .unwrap();
    sidecars.write(0, 0, 1, 1).await;
    sidecars.assert_exactly_once(1).await;
    let documents = changes_documents("weft.large-change.east-1.changes", 2);
    assert_eq!(documents.len(), 2, "a marker and the next change: {documents:?}");
    let (format, marker) = &documents[0];
    assert_eq!(format, "weft.v1.Marker+json", "{marker}");
    assert_eq!(marker["marker"], "too_large");
    assert_eq!(
        (marker["source"]["seq"].as_u64(), marker["source"]["table"].as_str()),
        (Some(1), Some("shared"))
    );
    assert_eq!(marker["source"]["key"][0], 1);
    assert!(marker["bytes"].as_u64() > marker["limit"].as_u64(), "{marker}");
    let (format, next) = &documents[1];
    assert_eq!(format, "weft.v1.Envelope+json");
    assert_eq!(
        (next["source"]["seq"].as_u64(), next["after"]["v"].as_i64()),
        (Some(2), Some(0))
    );
    let said = sidecars.log(0);
    assert!(
        said.lines().any(|l| l.contains("ERROR") && l.contains("too large")),
        "east never said at ERROR that the change was too large:\n{said}"
    );
    sidecars.terminate_all();
}
/// Retention never trims what a topic has not taken. `log_retain_mib = 1`; the broker is down
/// while east writes 20,000 rows (several MiB of log). East says at ERROR that its log is past
/// its limit and why, and keeps the events; once the broker is back its changes topic holds
/// every change, `source.seq` running without a jump, and west reads the link topic without
/// having to re-seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_what_the_topics_have_not_taken() {
    let _alone = FAULTS.write().await;
    let dir = tempfile::tempdir().unwrap();
    let mut topology = kafka_pair("retain-unpublished");
    topology.kafka.as_mut().unwrap().changes = true;
    let replication = ReplicationConfig {
        log_retain_mib: 1,
        ..ReplicationConfig::default()
    };
    let sidecars = Sidecars::with(dir.path(), topology, replication).await;
    sidecars.spawn_all().await;
    sidecars.write(0, 0, 10, 5).await;
    sidecars.wait_items(1, 10, "west never read east's topic").await;
    broker().stop(false);
    sidecars.write(0, 10, 20_000, 500).await;
    // Retention runs every 10 s: wait until it has met the log past its limit.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !(sidecars.log(0).contains("dropped log events") || sidecars.log(0).contains("past its retention limit")) {
        assert!(
            std::time::Instant::now() < deadline,
            "east's retention never met its log past 1 MiB:\n{}",
            sidecars.log(0)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    broker().restart().unwrap();
    let documents = changes_documents("weft.retain-unpublished.east-1.changes", 20_010);
    let seqs: Vec<u64> = (documents.iter())
        .map(|(_, d)| d["source"]["seq"].as_u64().unwrap())
        .collect();
    if let Some(jump) = seqs.windows(2).find(|w| w[1] != w[0] + 1) {
        panic!(
            "source.seq jumps from {} to {} in the changes topic ({} documents)",
            jump[0],
            jump[1],
            seqs.len()
        );
    }
    assert_eq!(seqs, (1..=20_010).collect::<Vec<u64>>());
    assert!(documents.iter().all(|(format, _)| format == "weft.v1.Envelope+json"));
    sidecars.assert_exactly_once(20_010).await;
    // (What the topics had taken before the broker went may go: they hold it.)
    let said = sidecars.log(0);
    assert!(
        said.lines()
            .any(|l| l.contains("ERROR") && l.contains("past its retention limit")),
        "east never said at ERROR why its log outgrew its limit:\n{said}"
    );
    assert!(!sidecars.log(1).contains("joined the mesh"), "west had to re-seed");
    sidecars.terminate_all();
}

/// A capture batch whose rest never comes into a topic (its publisher stopped relaying that
/// origin, or its log lost the rest) must not hold back the records behind it. West reads
/// south's events from the hub's topic; a record holding only the head of one of south's
/// batches, which west already applied, is put into that topic (as a relay leaves one when it
/// fails mid-batch and never publishes the rest). The hub's own rows written after it still
/// reach west.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_rest_never_comes_does_not_hold_back_the_records_behind_it() {
    use rdkafka::Message as _;
    use weft::transport::record;
    let _shared = FAULTS.read().await;
    let dir = tempfile::tempdir().unwrap();
    let sidecars = sidecars(dir.path(), kafka_mesh("open-batch", Shape::Star, Vec::new())).await;
    sidecars.spawn_all().await;
    sidecars.write(2, 0, 10, 5).await;
    sidecars.assert_exactly_once(10).await;
    let hub = "weft.open-batch.east-1";
    let relayed = read_topic(hub, 1);
    let events = (relayed.iter())
        .filter(|m| m.key() == Some(&b"south-1"[..]))
        .map(|m| {
            let headers = weft::transport::kafka::record_headers(m.headers().map(|h| h.as_borrowed()));
            record::decode(&headers, m.payload().unwrap()).unwrap()
        })
        .find(|events| events.len() > 1)
        .expect("the hub relays a batch of south's");
    let head = record::encode(&events[..1], 1 << 20).remove(0);
    assert!(
        events[0].batch_end > events[0].seq,
        "the head of a batch, not all of it"
    );
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker().bootstrap)
        .create()
        .unwrap();
    let sent = rdkafka::producer::FutureRecord::to(hub)
        .key(&head.key)
        .payload(&head.value)
        .headers(weft::transport::kafka::kafka_headers(&head));
    producer
        .send(sent, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    sidecars.write(0, 0, 5, 5).await;
    sidecars
        .wait_items(1, 15, "west never applied the hub's rows written after the open batch")
        .await;
    sidecars.assert_exactly_once(15).await;
    sidecars.terminate_all();
}
