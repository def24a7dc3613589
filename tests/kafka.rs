//! The Kafka harness against a real Apache Kafka 4.x broker in KRaft mode, started by the
//! harness itself (fetched from Maven Central into `target/kafka` the first time): the
//! properties weft's Kafka transport is built on hold there. A single-partition topic keeps
//! total order; an idempotent producer with `acks=all` stores each record once with its key
//! and headers; a reader that assigns and seeks (no group) reads from any offset; a position
//! past the end or before the start is an error, never a silent jump; and records survive a
//! clean restart and a kill -9 of the broker once acknowledged.
//!
//! One broker per test binary: it takes seconds to start and about a gigabyte.
mod common;

use std::sync::OnceLock;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use weft::harness::kafka::Broker;

fn broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(|| Broker::start().expect("an Apache Kafka broker (see the error for what to install)"))
}

/// Tests that stop the broker hold this exclusively; the others share it.
static FAULTS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn config(broker: &Broker) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &broker.bootstrap);
    config
}

async fn create_topic(broker: &Broker, topic: &str, extra: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> = config(broker).create().unwrap();
    let mut new = NewTopic::new(topic, 1, TopicReplication::Fixed(1));
    for (k, v) in extra {
        new = new.set(k, v);
    }
    let results = admin.create_topics([&new], &AdminOptions::new()).await.unwrap();
    for result in results {
        result.unwrap();
    }
}

fn producer(broker: &Broker) -> FutureProducer {
    config(broker)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .unwrap()
}

async fn produce(producer: &FutureProducer, topic: &str, seqs: std::ops::RangeInclusive<u64>) {
    for seq in seqs {
        let value = format!("event {seq}");
        let seq_text = seq.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "weft-origin",
                value: Some("n1"),
            })
            .insert(Header {
                key: "weft-seq",
                value: Some(&seq_text),
            });
        let record = FutureRecord::to(topic).key("n1").payload(&value).headers(headers);
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

/// A reader that assigns partition 0 of `topic` at `offset` (no consumer group, no
/// rebalancing) and treats a position outside the log as an error.
fn reader(broker: &Broker, topic: &str, offset: i64) -> BaseConsumer {
    let consumer: BaseConsumer = config(broker)
        .set("group.id", "weft.test")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "error")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Offset(offset))
        .unwrap();
    consumer.assign(&assignment).unwrap();
    consumer
}

/// The seqs of the records read from `consumer` until `count` arrived.
fn read(consumer: &BaseConsumer, count: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seqs.len() < count {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {count} records read",
            seqs.len()
        );
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.unwrap();
        assert_eq!(message.key(), Some(&b"n1"[..]));
        let headers = message.headers().unwrap();
        let seq = headers
            .iter()
            .find(|h| h.key == "weft-seq")
            .and_then(|h| h.value)
            .unwrap();
        seqs.push(std::str::from_utf8(seq).unwrap().parse().unwrap());
    }
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_partition_topic_keeps_order_and_a_reader_seeks_anywhere() {
    let _shared = FAULTS.read().await;
    let broker = broker();
    create_topic(broker, "weft.test.order", &[]).await;
    let producer = producer(broker);
    produce(&producer, "weft.test.order", 1..=500).await;
    let from_start = tokio::task::block_in_place(|| read(&reader(broker, "weft.test.order", 0), 500));
    assert_eq!(
        from_start,
        (1..=500).collect::<Vec<_>>(),
        "total order, each record once"
    );
    let from_middle = tokio::task::block_in_place(|| read(&reader(broker, "weft.test.order", 300), 200));
    assert_eq!(from_middle, (301..=500).collect::<Vec<_>>(), "offset 300 holds seq 301");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_outside_the_log_is_an_error_not_a_jump() {
    let _shared = FAULTS.read().await;
    let broker = broker();
    create_topic(broker, "weft.test.outside", &[]).await;
    produce(&producer(broker), "weft.test.outside", 1..=10).await;
    let consumer = reader(broker, "weft.test.outside", 1_000);
    let error = tokio::task::block_in_place(|| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "no error for an offset past the end"
            );
            match consumer.poll(Duration::from_millis(200)) {
                Some(Err(error)) => break error,
                Some(Ok(message)) => panic!("read offset {} instead of an error", message.offset()),
                None => {}
            }
        }
    });
    assert!(
        error.to_string().contains("Offset") || error.to_string().contains("offset"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_survive_a_clean_restart_and_a_kill_of_the_broker() {
    let _alone = FAULTS.write().await;
    let broker = broker();
    create_topic(broker, "weft.test.durable", &[("flush.messages", "1")]).await;
    let producer = producer(broker);
    produce(&producer, "weft.test.durable", 1..=100).await;
    broker.restart().unwrap();
    produce(&producer, "weft.test.durable", 101..=200).await;
    broker.stop(false);
    broker.restart().unwrap();
    produce(&producer, "weft.test.durable", 201..=300).await;
    let seqs = tokio::task::block_in_place(|| read(&reader(broker, "weft.test.durable", 0), 300));
    assert_eq!(
        seqs,
        (1..=300).collect::<Vec<_>>(),
        "every acknowledged record once, in order"
    );
}

/// weft's record format through the real broker: node a's captured events (inserts,
/// updates, deletes, a blob, in several capture batches) are written to `weft.<mesh>.a` as
/// records of at most 4 KiB, read back from offset 0 by a seeking reader, decoded against
/// their headers and applied to node b, which ends identical to a; and the record's headers
/// are what other consumers (kcat, analytics) can filter on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_events_cross_the_broker_in_weft_records_and_apply_exactly() {
    use weft::transport::record;
    let _shared = FAULTS.read().await;
    let broker = broker();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        common::replica(dir.path(), "a").await,
        common::replica(dir.path(), "b").await,
    );
    for round in 0..5 {
        a.exec(&format!(
            "WITH RECURSIVE n(value) AS (SELECT 1 UNION ALL SELECT value + 1 FROM n WHERE value < 60) \
             INSERT INTO items SELECT value + {round} * 100, 'item ' || value, value, value * 1.5, x'00ff' FROM n; \
             UPDATE items SET qty = qty + 1 WHERE id % 7 = 0; \
             DELETE FROM items WHERE id % 11 = 0; INSERT INTO pairs VALUES ('p', {round}, 'pair');"
        ))
        .await;
        a.drain().await;
    }
    let events = a.events(0).await;
    let topic = record::topic("m", "a");
    create_topic(broker, &topic, &[]).await;
    let producer = producer(broker);
    let records = record::encode(&events, 4096);
    assert!(records.len() > 5, "the batches are split into records of 4 KiB");
    for r in &records {
        let headers = weft::transport::kafka::kafka_headers(r);
        let sent = FutureRecord::to(&topic).key(&r.key).payload(&r.value).headers(headers);
        producer
            .send(sent, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let consumer = reader(broker, &topic, 0);
    let read = tokio::task::block_in_place(|| {
        let mut read = Vec::new();
        while read.len() < records.len() {
            let Some(message) = consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            let message = message.unwrap();
            let headers = weft::transport::kafka::record_headers(message.headers());
            read.push(record::decode(&headers, message.payload().unwrap()).unwrap());
        }
        read
    });
    let received: Vec<weft::event::Event> = read.into_iter().flatten().collect();
    assert_eq!(received.len(), events.len());
    // Whole capture batches per apply, as a receiver does.
    let mut start = 0;
    while start < received.len() {
        let end = received[start].batch_end;
        let stop = received.iter().position(|e| e.seq == end).unwrap() + 1;
        b.store.apply(received[start..stop].to_vec()).await.unwrap();
        start = stop;
    }
    assert_eq!(b.snapshot().await, a.snapshot().await, "b holds exactly what a holds");
}

/// What a Kafka receiver stores with the rows it applies: the offset to resume its source
/// topic at, in the same transaction, on both stores. A run that commits moves the position
/// with its rows; a run refused whole (here: dead-letter storage of its cause is full) moves
/// neither; a replay from an older offset applies nothing twice and moves the position on;
/// a run with a gap leaves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_position_moves_exactly_with_the_applied_rows_on_both_stores() {
    use common::regions::{Region, lww};
    use weft::harness::cluster::{Cluster, Settings};
    let schema = |ty: &str| format!("CREATE TABLE items (id {ty} PRIMARY KEY, name TEXT);");
    let dir = tempfile::tempdir().unwrap();
    let source = Region::sqlite(dir.path(), "a", &schema("INTEGER"), &lww(&["items"])).await;
    source.exec("INSERT INTO items VALUES (1, 'one'), (2, 'two');").await;
    source.drain().await;
    source.exec("INSERT INTO items VALUES (3, 'three');").await;
    source.drain().await;
    let events = source.events(0).await;
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let receivers = [
        Region::sqlite(dir.path(), "b", &schema("INTEGER"), &lww(&["items"])).await,
        Region::pg(&cluster, "b", &schema("bigint"), &lww(&["items"])).await,
    ];
    for receiver in receivers {
        let store = receiver.store.bounding_dead_letters(1);
        let at = |next| weft::store::Position {
            source: "weft.m.a".into(),
            next,
        };
        assert_eq!(store.position("weft.m.a").await.unwrap(), None, "never read");
        store.apply_from(events[..2].to_vec(), &at(1)).await.unwrap();
        assert_eq!(store.position("weft.m.a").await.unwrap(), Some(1));
        let mut strays: Vec<_> = events[2..].to_vec();
        let mut second = strays[0].clone();
        strays[0].table = "nowhere".into();
        second.seq += 1;
        second.batch_end += 1;
        second.table = "nowhere".into();
        strays.push(second);
        let refused = store.apply_from(strays, &at(5)).await.unwrap_err();
        assert!(refused.to_string().contains("dead letters of cause"), "{refused}");
        assert_eq!(
            store.position("weft.m.a").await.unwrap(),
            Some(1),
            "refused whole: not moved"
        );
        let replay = store.apply_from(events.clone(), &at(2)).await.unwrap();
        assert_eq!((replay.duplicates, replay.applied), (2, 1), "nothing applied twice");
        assert_eq!(store.position("weft.m.a").await.unwrap(), Some(2));
        assert_eq!(store.frontiers().await.unwrap()["a"], 3);
        // A run that skips ahead of the frontier applies nothing of that origin past it: the
        // position must stay, or the skipped events would never be read again.
        let mut ahead = events[2].clone();
        (ahead.seq, ahead.batch_end) = (5, 5);
        let gap = store.apply_from(vec![ahead], &at(7)).await.unwrap();
        assert_eq!(gap.gap, Some(("a".to_owned(), 3, 5)));
        assert_eq!(store.position("weft.m.a").await.unwrap(), Some(2), "a gap: not moved");
    }
}

/// Reads every record of `topic` from `from` to the end, applying whole capture batches to
/// `store` with the position after each, as a Kafka receiver does; returns how many records.
async fn consume_into(broker: &Broker, topic: &str, from: i64, store: &weft::store::Store) -> usize {
    use weft::transport::record;
    let consumer = reader(broker, topic, from);
    let (_, high) =
        tokio::task::block_in_place(|| consumer.fetch_watermarks(topic, 0, Duration::from_secs(10))).unwrap();
    let mut pending: Vec<weft::event::Event> = Vec::new();
    let mut records = 0;
    while from + (records as i64) < high {
        let message = tokio::task::block_in_place(|| consumer.poll(Duration::from_millis(500)));
        let Some(message) = message else { continue };
        let message = message.unwrap();
        let headers = weft::transport::kafka::record_headers(message.headers());
        pending.extend(record::decode(&headers, message.payload().unwrap()).unwrap());
        records += 1;
        let whole = pending.last().is_some_and(|e| e.seq == e.batch_end);
        if whole {
            let position = weft::store::Position {
                source: topic.to_owned(),
                next: message.offset() + 1,
            };
            store.apply_from(std::mem::take(&mut pending), &position).await.unwrap();
        }
    }
    records
}

/// The publishing half: node a's log goes into its topic once, in order, each event once;
/// a publisher started again (a restart) writes only what is new; b, reading the topic from
/// the position it stored, ends identical to a.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_writes_the_log_into_the_topic_once_and_a_reader_resumes_where_it_stopped() {
    use std::sync::Arc;
    use weft::transport::{kafka::Publisher, record};
    let _shared = FAULTS.read().await;
    let broker = broker();
    let dir = tempfile::tempdir().unwrap();
    let a = common::replica(dir.path(), "a").await;
    let b = common::replica(dir.path(), "b").await;
    let topic = record::topic("pub", "a");
    create_topic(broker, &topic, &[]).await;
    let app = a.app.clone();
    let store = Arc::new(a.store);
    let write = async |from: i64| {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "WITH RECURSIVE n(v) AS (SELECT {from} UNION ALL SELECT v + 1 FROM n WHERE v < {from} + 299) \
             INSERT INTO items (id, name) SELECT v, 'item ' || v FROM n; DELETE FROM items WHERE id % 10 = 0;"
        )))
        .execute(&app)
        .await
        .unwrap();
        store.drain().await.unwrap();
    };
    write(1).await;
    write(301).await;
    let mut publisher =
        Publisher::new(store.clone(), config(broker), topic.clone(), vec!["a".into()], sizes()).unwrap();
    publisher.read_max = 250;
    publisher.max_record_bytes = 8 * 1024;
    let first = publisher.publish_pending().await.unwrap();
    assert_eq!(first, store.last_seq().await, "every event of the log, once");
    assert_eq!(
        publisher.publish_pending().await.unwrap(),
        0,
        "nothing new, nothing written"
    );
    let records = consume_into(broker, &topic, 0, &b.store).await;
    assert_eq!(b.snapshot().await, rendering(&a.app).await);

    write(601).await;
    let again = Publisher::new(store.clone(), config(broker), topic.clone(), vec!["a".into()], sizes()).unwrap();
    let second = again.publish_pending().await.unwrap();
    assert_eq!(
        first + second,
        store.last_seq().await,
        "after a restart, only what is new"
    );
    let resume = b.store.position(&topic).await.unwrap().unwrap();
    assert_eq!(
        resume, records as i64,
        "b resumes right after the last record it applied"
    );
    let more = consume_into(broker, &topic, resume, &b.store).await;
    assert!(more > 0);
    assert_eq!(
        b.snapshot().await,
        rendering(&a.app).await,
        "b holds exactly what a holds"
    );
}

/// The record sizes of weft's default `max_message_mib`.
fn sizes() -> weft::transport::kafka::Sizes {
    weft::transport::kafka::Sizes::of(weft::config::ReplicationConfig::default().max_message_bytes())
}

/// The rows of `items` and `pairs` in a database, as `Replica::snapshot` renders them.
async fn rendering(app: &sqlx::SqlitePool) -> std::collections::BTreeMap<String, Vec<String>> {
    weft::harness::compare::sqlite_rendering(app, &["items".to_string(), "pairs".to_string()])
        .await
        .unwrap()
}

/// Every record of `topic` from its beginning to its end, as (`weft-format`, `weft-seq`,
/// `weft-end`) headers.
fn record_headers_of(broker: &Broker, topic: &str) -> Vec<(String, u64, u64)> {
    let consumer = reader(broker, topic, 0);
    let (_, high) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(10)).unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while (out.len() as i64) < high {
        assert!(std::time::Instant::now() < deadline, "read {out:?} of {high} records");
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let headers = weft::transport::kafka::record_headers(message.unwrap().headers());
        let text = |name: &str| {
            let (_, v) = headers.iter().find(|(k, _)| k == name).unwrap();
            String::from_utf8(v.clone()).unwrap()
        };
        out.push((
            text("weft-format"),
            text("weft-seq").parse().unwrap(),
            text("weft-end").parse().unwrap(),
        ));
    }
    out
}

/// An event larger than the largest record the publisher may write (here about 160 KB, for
/// messages of 100 KB, and a 300 KB row) does not stop publishing: a gap record stands in its place, so receivers know
/// the topic lacks it, and the events after it are published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_too_large_for_a_record_is_published_as_a_gap_and_the_events_after_it_follow() {
    use std::sync::Arc;
    use weft::transport::{kafka::Publisher, record};
    let _shared = FAULTS.read().await;
    let broker = broker();
    let dir = tempfile::tempdir().unwrap();
    let a = common::replica(dir.path(), "a").await;
    a.exec("INSERT INTO items (id, name) VALUES (1, 'small')").await;
    a.drain().await;
    a.exec("INSERT INTO items (id, name, data) VALUES (2, 'large', randomblob(300000))")
        .await;
    a.drain().await;
    a.exec("INSERT INTO items (id, name) VALUES (3, 'small')").await;
    a.drain().await;
    let topic = record::topic("too-large", "a");
    create_topic(broker, &topic, &[]).await;
    let store = Arc::new(a.store);
    let small = weft::transport::kafka::Sizes::of(100_000);
    assert!(small.record() < 300_000, "the row is too large for a record");
    let publisher = Publisher::new(store.clone(), config(broker), topic.clone(), vec!["a".into()], small).unwrap();
    let published = publisher.publish_pending().await;
    assert_eq!(published.map_err(|e| e.to_string()).unwrap(), 3);
    let records = tokio::task::block_in_place(|| record_headers_of(broker, &topic));
    assert_eq!(
        records,
        [
            ("weft.v1.Batch".to_owned(), 1, 1),
            ("weft.v1.Gap".to_owned(), 2, 2),
            ("weft.v1.Batch".to_owned(), 3, 3)
        ]
    );
}

/// A topic's settings as the broker describes them.
async fn topic_settings(broker: &Broker, topic: &str) -> std::collections::BTreeMap<String, String> {
    use rdkafka::admin::ResourceSpecifier;
    let admin: AdminClient<DefaultClientContext> = config(broker).create().unwrap();
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &AdminOptions::new())
        .await
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    (described.entries.into_iter())
        .filter_map(|e| Some((e.name, e.value?)))
        .collect()
}

/// weft's topics take records of `max_message_mib`: a topic weft creates is made so, and an
/// existing one below it (a topic made by hand, or by an older weft) is raised, keeping the
/// settings it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_is_made_or_raised_to_take_records_of_max_message_mib() {
    use weft::transport::kafka::{Sizes, ensure_topic};
    let _shared = FAULTS.read().await;
    let broker = broker();
    let sizes = Sizes::of(64 << 20);
    ensure_topic(&config(broker), "weft.sizes.new", sizes).await.unwrap();
    let made = topic_settings(broker, "weft.sizes.new").await;
    assert_eq!(made["max.message.bytes"], sizes.topic().to_string());

    let topic = "weft.sizes.old";
    create_topic(
        broker,
        topic,
        &[("max.message.bytes", "1000000"), ("retention.ms", "123456789")],
    )
    .await;
    ensure_topic(&config(broker), topic, sizes).await.unwrap();
    let raised = topic_settings(broker, topic).await;
    assert_eq!(raised["max.message.bytes"], sizes.topic().to_string());
    assert_eq!(raised["retention.ms"], "123456789", "its own settings are kept");
    ensure_topic(&config(broker), topic, Sizes::of(1 << 20)).await.unwrap();
    assert_eq!(
        topic_settings(broker, topic).await["max.message.bytes"],
        sizes.topic().to_string(),
        "never lowered"
    );
}

/// Retention trims the log to its limits, but never past what a Kafka topic has taken (its
/// readers could not get the rest back): that part stays, and is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_never_trims_past_what_a_topic_has_taken() {
    let dir = tempfile::tempdir().unwrap();
    let a = common::replica(dir.path(), "a").await;
    for id in 1..=10 {
        a.exec(&format!("INSERT INTO items (id, name) VALUES ({id}, 'item')"))
            .await;
        a.drain().await;
    }
    let kept: std::collections::BTreeSet<String> = ["a".to_owned()].into();
    let held = [("a".to_owned(), 4)].into();
    let report = a.store.enforce_retention(0, Duration::MAX, &kept, &held).await.unwrap();
    assert_eq!(
        report.trimmed, 4,
        "a limit of 0 bytes drops all but what the topic lacks"
    );
    assert_eq!(report.kept_back, [("a".to_owned(), (5, 10))].into());
    let left: Vec<u64> = a
        .store
        .read_log("a", 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(left, (5..=10).collect::<Vec<u64>>());
    let all = a
        .store
        .enforce_retention(0, Duration::MAX, &kept, &[("a".to_owned(), 10)].into())
        .await;
    assert_eq!(all.unwrap().trimmed, 6, "once the topic has them, they go");
}
