//! Edges where weft used to lose acknowledged writes (`../shared/review-edges.md`), each
//! reproduced through the real store, on real SQLite files and `weft run` processes. Those
//! that need PostgreSQL's own behaviour are in `tests/edges_postgres.rs`.
mod common;

use std::time::Duration;

use common::{own_events, replica, sync};

/// Finding 1: an apply whose commit landed but whose future was dropped (the sending peer
/// disconnected mid-commit) must not leave the next drain numbering from a stale counter:
/// that reuses seqs, wedges capture on the log's key, and once those entries are trimmed
/// loses every local write as a "duplicate". Sweeps the cancellation point across the apply
/// until it has landed inside commits, and checks every drain numbers after what the
/// database holds.
#[tokio::test]
async fn a_cancelled_apply_whose_commit_landed_never_makes_seqs_go_back() {
    let dir = tempfile::tempdir().unwrap();
    let a = replica(dir.path(), "a").await;
    let b = replica(dir.path(), "b").await;
    let mut landed_after_cancel = 0;
    for step in 0..1000u64 {
        // A local write waits in a's outbox: the apply drains it first, in its transaction.
        a.exec(&format!(
            "INSERT INTO items (id, name) VALUES ({}, 'local')",
            10_000 + step
        ))
        .await;
        b.exec(&format!("INSERT INTO items (id, name) VALUES ({step}, 'remote')"))
            .await;
        b.drain().await;
        let frontier = a.store.frontiers().await.unwrap().get("b").copied().unwrap_or(0);
        let events = own_events(&b.store, "b", frontier).await;
        // Each sweep of 200 steps spans twice the time of the one before: on a loaded
        // machine a commit takes longer to come round. The future is polled by hand and
        // dropped after exactly that long (tokio's timers tick in milliseconds, far coarser
        // than a commit on a quiet machine).
        let cancel_after = Duration::from_micros((20 + (step % 200) * 15) << (step / 200));
        let cancelled = run_for(cancel_after, a.store.apply(events)).await.is_none();
        let now = a.store.frontiers().await.unwrap().get("b").copied().unwrap_or(0);
        if cancelled && now > frontier {
            landed_after_cancel += 1;
        }
        if now == frontier {
            // Cancelled before its commit: nothing landed. Apply it in full, so every step
            // sweeps a run of the same size.
            a.store.apply(own_events(&b.store, "b", frontier).await).await.unwrap();
        }
        // Whatever happened, the next drain numbers right after the database's last seq.
        let stored = a.count("SELECT value FROM _weft_node WHERE name = 'last_seq'").await as u64;
        a.exec(&format!("UPDATE items SET name = 'again' WHERE id = {}", 10_000 + step))
            .await;
        let report = a.store.drain().await.expect("a drain after a cancelled apply");
        let first = own_events(&a.store, "a", stored).await;
        assert!(
            report.events > 0 && first.first().map(|e| e.seq) == Some(stored + 1),
            "step {step}: the drain after a cancelled apply numbered from a stale counter \
             (database last seq {stored}, drained {report:?})"
        );
        if landed_after_cancel >= 3 {
            break;
        }
    }
    assert!(
        landed_after_cancel > 0,
        "no cancellation landed after a commit: the sweep did not reach the window it tests"
    );
}

/// Polls `future` until it completes or `limit` has passed, then drops it (cancelling it):
/// microsecond precision, where a tokio timer would round up to its millisecond tick.
async fn run_for<F: std::future::Future>(limit: Duration, future: F) -> Option<F::Output> {
    let started = std::time::Instant::now();
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| match future.as_mut().poll(cx) {
        std::task::Poll::Ready(out) => std::task::Poll::Ready(Some(out)),
        std::task::Poll::Pending if started.elapsed() >= limit => std::task::Poll::Ready(None),
        std::task::Poll::Pending => {
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}

/// Finding 10: last-writer-wins orders writes by when the application committed them. A
/// write made while its region's sidecar was down must lose to a later write elsewhere, not
/// win because it was drained last.
#[tokio::test]
async fn a_write_made_while_its_sidecar_was_down_loses_to_a_later_write_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let a = replica(dir.path(), "a").await;
    let b = replica(dir.path(), "b").await;
    a.exec("INSERT INTO items (id, name) VALUES (1, 'first')").await;
    sync(&[&a, &b]).await;
    // a's sidecar is down: its application's write waits in the outbox.
    a.exec("UPDATE items SET name = 'old' WHERE id = 1").await;
    // Commit times are what is compared: these pauses are the wall-clock gaps of the story.
    tokio::time::sleep(Duration::from_millis(20)).await;
    b.exec("UPDATE items SET name = 'new' WHERE id = 1").await;
    b.drain().await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    // a's sidecar is back and drains the older write after the newer one.
    sync(&[&a, &b]).await;
    for r in [&a, &b] {
        assert_eq!(
            r.rows("SELECT name FROM items WHERE id = 1").await,
            vec!["new"],
            "the later write wins at {}",
            r.node
        );
    }
    assert_eq!(a.snapshot().await, b.snapshot().await);
}

/// Finding 11: a sender takes the Welcome's frontiers as the peer's acknowledgements (they let
/// it trim its log), so it must check who answered. With a `[dial]` entry that points ra-1's
/// stream for rb-1 at rc-1, rc-1's frontiers must never be recorded as rb-1's acks.
#[tokio::test]
async fn a_misdialled_peer_is_refused_and_its_frontiers_never_count_as_acks() {
    use weft::config::{ReplicationConfig, TableConfig};
    use weft::harness::loopback::LoopbackMesh;
    let dir = tempfile::tempdir().unwrap();
    let topology = LoopbackMesh::all_to_all(&["ra", "rb", "rc"]);
    let schema = "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);";
    let tables = [TableConfig::lww("t")];
    let mut mesh = LoopbackMesh::create(dir.path(), &topology, schema, &tables, &ReplicationConfig::default())
        .await
        .unwrap();
    let c_address = mesh.topology.nodes[2].address.clone();
    let config = &mesh.regions[0].config_file;
    let text = std::fs::read_to_string(config).unwrap();
    std::fs::write(config, format!("{text}\n[dial]\n\"rb-1\" = \"{c_address}\"\n")).unwrap();
    mesh.start_all().await.unwrap();
    sqlx::query("INSERT INTO t (id, v) VALUES (1, 'from a')")
        .execute(&mesh.regions[0].app)
        .await
        .unwrap();
    // rc-1 gets ra-1's change on its own link; ra-1 keeps trying rb-1's (misdialled) one.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let arrived: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
            .fetch_one(&mesh.regions[2].app)
            .await
            .unwrap();
        if arrived == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "rc-1 never got ra-1's change");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let upkeep persist whatever acknowledgements ra-1 holds (it does every 200 ms).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let acks_as_b: i64 = sqlx::query_scalar("SELECT count(*) FROM _weft_acks WHERE peer = 'rb-1'")
        .fetch_one(&mesh.regions[0].app)
        .await
        .unwrap();
    mesh.stop_all().await;
    assert_eq!(
        acks_as_b, 0,
        "rc-1's frontiers were recorded as rb-1's acknowledgements"
    );
}

/// Finding 13: resolving a conflict with a delete sibling while the visible row is already a
/// tombstone deletes nothing, so no trigger fired and the entry stayed open everywhere. The
/// resolution must be captured like any write and close the entry in every region.
#[tokio::test]
async fn resolving_with_a_delete_of_an_absent_row_closes_the_conflict_everywhere() {
    use weft::config::{NodeConfig, TableConfig};
    use weft::store::admin::{Admin, Choice};
    let dir = tempfile::tempdir().unwrap();
    let schema = "CREATE TABLE contracts (id INTEGER PRIMARY KEY, client TEXT, amount INTEGER);";
    let tables = [TableConfig::queue("contracts")];
    let a = common::replica_configured(dir.path(), "a", schema, &tables).await;
    let b = common::replica_configured(dir.path(), "b", schema, &tables).await;
    a.exec("INSERT INTO contracts VALUES (7, 'acme', 100);").await;
    sync(&[&a, &b]).await;
    b.exec("UPDATE contracts SET amount = 150 WHERE id = 7;").await;
    b.drain().await;
    // The delete commits later, so it is the visible winner: the row is gone everywhere.
    tokio::time::sleep(Duration::from_millis(20)).await;
    a.exec("DELETE FROM contracts WHERE id = 7;").await;
    sync(&[&a, &b]).await;
    let open = "SELECT count(*) FROM _weft_queue WHERE closed_at IS NULL";
    for r in [&a, &b] {
        assert_eq!(
            r.count("SELECT count(*) FROM contracts").await,
            0,
            "the delete is visible"
        );
        assert_eq!(r.count(open).await, 1, "one open conflict at {}", r.node);
    }
    let topology = "version = 1\nmesh = \"q\"\nshape = \"all-to-all\"\n[[nodes]]\nid = \"a\"\nregion = \"ra\"\naddress = \"127.0.0.1:1\"\n[[nodes]]\nid = \"b\"\nregion = \"rb\"\naddress = \"127.0.0.1:2\"\n";
    std::fs::write(dir.path().join("t.toml"), topology).unwrap();
    let config = dir.path().join("a.toml");
    let text = "version = 1\nnode = \"a\"\ntopology = \"t.toml\"\ndatabase = \"sqlite://a.db\"\n[[tables]]\nname = \"contracts\"\nstrategy = \"queue\"\n";
    std::fs::write(&config, text).unwrap();
    let admin = Admin::open(NodeConfig::load(&config).unwrap()).await.unwrap();
    let conflict = admin.open_conflicts().await.unwrap().pop().unwrap();
    let delete = conflict.siblings.iter().position(|s| s.op.is_delete()).unwrap() + 1;
    admin.resolve(conflict.id, Choice::Take(delete), "ops").await.unwrap();
    sync(&[&a, &b]).await;
    sync(&[&a, &b]).await;
    for r in [&a, &b] {
        assert_eq!(
            r.count(open).await,
            0,
            "the resolution closed the conflict at {}",
            r.node
        );
        assert_eq!(r.count("SELECT count(*) FROM contracts").await, 0);
    }
}

/// Finding 9: a panic in one task (the capture loop, here) must not leave a half-alive
/// sidecar that answers peers but captures nothing: the process stops, saying why, with a
/// status a supervisor restarts on; after the restart everything is captured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_task_stops_the_sidecar_with_a_clear_error_and_a_restart_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let sidecars = common::sidecars::Sidecars::new(dir.path()).await;
    // Its peers run: a sidecar captures once one has confirmed its database's history.
    sidecars.spawn(1, None).await;
    sidecars.spawn(2, None).await;
    sidecars.spawn(0, Some("capture-panics:1")).await;
    sidecars.write(0, 1, 5, 1).await;
    let status = sidecars.exit_status(0, Duration::from_secs(20)).await;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(70),
        "the sidecar stops when a task panics"
    );
    let log = std::fs::read_to_string(dir.path().join("east.log")).unwrap();
    assert!(
        log.contains("internal error") && log.contains("capture-panics"),
        "{log}"
    );
    sidecars.spawn(0, None).await;
    let pending = "SELECT count(*) FROM _weft_outbox";
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left: i64 = sqlx::query_scalar(pending)
            .fetch_one(&sidecars.mesh.regions[0].app)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted sidecar never drained"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sidecars.terminate_all();
}

/// Finding 12: a key the database assigns (SQLite's `INTEGER PRIMARY KEY`, PostgreSQL's
/// `bigserial` or identity) gives two regions the same id at once, and LWW then makes two
/// inserts one row. The store says so at start, naming the table and what to do instead;
/// a key the application chooses draws no warning. So does a PostgreSQL key of a type that
/// travels as text (finding 18).
#[tokio::test]
async fn tables_keyed_by_an_auto_assigned_integer_are_named_at_start() {
    use common::regions::{Region, lww};
    use weft::harness::cluster::{Cluster, Settings};
    let dir = tempfile::tempdir().unwrap();
    let lite = "CREATE TABLE orders (id INTEGER PRIMARY KEY AUTOINCREMENT, item TEXT); \
                CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT); \
                CREATE TABLE tags (name TEXT PRIMARY KEY);";
    let a = Region::sqlite(dir.path(), "a", lite, &lww(&["orders", "notes", "tags"])).await;
    let advice = a.store.advisories();
    assert!(advice.iter().any(|w| w.contains("`orders`")), "{advice:?}");
    assert!(advice.iter().any(|w| w.contains("`notes`")), "{advice:?}");
    assert!(!advice.iter().any(|w| w.contains("`tags`")), "{advice:?}");
    assert!(advice.iter().all(|w| w.contains("UUID")), "{advice:?}");
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let pg = "CREATE TABLE orders (id bigserial PRIMARY KEY, item text); \
              CREATE TABLE notes (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, body text); \
              CREATE TABLE tags (id bigint PRIMARY KEY, name text); \
              CREATE TABLE prices (sku numeric PRIMARY KEY, price numeric);";
    let b = Region::pg(&cluster, "b", pg, &lww(&["orders", "notes", "tags", "prices"])).await;
    let advice = b.store.advisories();
    assert!(advice.iter().any(|w| w.contains("`orders`")), "{advice:?}");
    assert!(advice.iter().any(|w| w.contains("`notes`")), "{advice:?}");
    assert!(!advice.iter().any(|w| w.contains("`tags`")), "{advice:?}");
    // Finding 18: a key that travels as text can get two identities beside SQLite regions.
    assert!(
        advice
            .iter()
            .any(|w| w.contains("`prices` is keyed by `sku` (numeric)")),
        "{advice:?}"
    );
}

/// A two-region loopback mesh (`t (id, v)`, LWW) with ra's node started.
async fn ra_started(dir: &std::path::Path) -> weft::harness::loopback::LoopbackMesh {
    use weft::config::{ReplicationConfig, TableConfig};
    use weft::harness::loopback::LoopbackMesh;
    let topology = LoopbackMesh::all_to_all(&["ra", "rb"]);
    let schema = "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);";
    let mut mesh = LoopbackMesh::create(
        dir,
        &topology,
        schema,
        &[TableConfig::lww("t")],
        &ReplicationConfig::default(),
    )
    .await
    .unwrap();
    mesh.start(0).await.unwrap();
    mesh
}

/// Event `seq` of `origin` (claiming `region`): an upsert of row `seq` of `t`.
fn upsert_of(origin: &str, region: &str, seq: u64, v: &str) -> weft::event::Event {
    use weft::event::{Event, Hlc, Key, Op, Row, Value};
    Event {
        origin: origin.into(),
        origin_region: region.into(),
        seq,
        batch_end: seq,
        hlc: Hlc(seq << 22),
        table: "t".into(),
        key: Key(vec![Value::Integer(seq as i64)]),
        op: Op::Upsert(Row(vec![
            ("id".into(), Value::Integer(seq as i64)),
            ("v".into(), Value::Text(v.into())),
        ])),
        version: [(origin.to_string(), seq)].into_iter().collect(),
        path: vec![origin.into()],
        committed_at_micros: 0,
        crdt: Vec::new(),
        ownership: None,
    }
}

/// Opens a raw replication stream to ra as node rb-1, sends one batch of `events` and
/// returns the replies after the Welcome.
async fn send_as_rb(
    mesh: &weft::harness::loopback::LoopbackMesh,
    events: Vec<weft::wire::proto::Event>,
) -> tonic::Streaming<weft::wire::proto::ReceiveFrame> {
    use tokio_stream::StreamExt as _;
    use weft::wire::proto;
    let target = &mesh.topology.nodes[0];
    // Over the mesh's TLS, with rb-1's own certificate: what rb-1 is allowed to send.
    let certs = mesh.dir.join("certs");
    let security = weft::config::Security::Tls {
        ca: certs.join("ca.pem"),
        cert: certs.join("rb-1.pem"),
        key: certs.join("rb-1.key"),
    };
    let channel = weft::transport::tls::endpoint(&security, &target.id, &target.address)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = proto::replication_client::ReplicationClient::new(channel);
    let hello = proto::SendFrame {
        body: Some(proto::send_frame::Body::Hello(proto::Hello {
            protocol: weft::wire::PROTOCOL,
            node_id: "rb-1".into(),
            region: "rb".into(),
            mesh: mesh.topology.mesh.clone(),
            knows_of_you: 0,
        })),
    };
    let batch = proto::SendFrame {
        body: Some(proto::send_frame::Body::Batch(proto::Batch { events })),
    };
    let frames = tokio_stream::iter(vec![hello, batch]).chain(tokio_stream::pending());
    let mut replies = client.replicate(frames).await.unwrap().into_inner();
    let welcome = replies.message().await.unwrap();
    assert!(welcome.is_some(), "rb-1 is a known peer: welcomed");
    replies
}

/// Finding 11, the receiving side: a peer may send only events whose origin is a node of the
/// topology, claiming that node's region. A batch naming another origin, or a known node in
/// the wrong region, is refused before anything is applied.
#[tokio::test]
async fn a_receiver_refuses_events_of_origins_or_regions_the_topology_does_not_have() {
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = ra_started(dir.path()).await;
    for (origin, region, why) in [("mallory", "rb", "mallory"), ("rb-1", "ra", "region")] {
        let forged = weft::wire::event_to_proto(&upsert_of(origin, region, 1, "forged"));
        let mut replies = send_as_rb(&mesh, vec![forged]).await;
        let refused = replies.message().await.expect_err("the forged batch is refused");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains(why), "{refused:?}");
    }
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
        .fetch_one(&mesh.regions[0].app)
        .await
        .unwrap();
    mesh.stop_all().await;
    assert_eq!(applied, 0, "nothing of a refused batch is applied");
}

/// Finding 8 (a): an event that can be placed in its origin's stream but whose content this
/// build cannot read (here a column value of a kind it does not know, as a newer peer might
/// send) is dead-lettered alone; the event after it applies and the batch is acknowledged.
/// The whole batch used to be refused, and resent, forever.
#[tokio::test]
async fn an_event_this_build_cannot_decode_is_dead_lettered_and_the_stream_flows() {
    use weft::wire::proto;
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = ra_started(dir.path()).await;
    let mut poison = weft::wire::event_to_proto(&upsert_of("rb-1", "rb", 1, "fine"));
    if let Some(proto::event::Op::Upsert(upsert)) = &mut poison.op {
        upsert.columns[1].value = Some(proto::Value { kind: None });
    }
    let good = weft::wire::event_to_proto(&upsert_of("rb-1", "rb", 2, "fine"));
    let mut replies = send_as_rb(&mesh, vec![poison, good]).await;
    let ack = replies.message().await.expect("the batch is acknowledged, not refused");
    let Some(proto::ReceiveFrame {
        body: Some(proto::receive_frame::Body::Ack(ack)),
    }) = ack
    else {
        panic!("expected an ack, got {ack:?}");
    };
    assert_eq!(weft::wire::frontiers_from_proto(ack.frontiers).get("rb-1"), Some(&2));
    let app = &mesh.regions[0].app;
    let applied: Vec<i64> = sqlx::query_scalar("SELECT id FROM t").fetch_all(app).await.unwrap();
    let reasons: Vec<(i64, String)> = sqlx::query_as("SELECT seq, reason FROM _weft_dead_letters")
        .fetch_all(app)
        .await
        .unwrap();
    mesh.stop_all().await;
    assert_eq!(applied, vec![2]);
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert_eq!(reasons[0].0, 1);
    assert!(reasons[0].1.contains("cannot decode"), "{reasons:?}");
}

/// Finding 19 on SQLite, which has no replica role: an application trigger guarded as the
/// README says (`WHEN NOT EXISTS (SELECT 1 FROM _weft_applying)`) fires only where the
/// application wrote.
#[tokio::test]
async fn a_sqlite_trigger_guarded_as_the_readme_says_fires_only_where_the_application_wrote() {
    use common::regions::{Region, lww, sync as sync_regions};
    let dir = tempfile::tempdir().unwrap();
    let schema = "CREATE TABLE items (id INTEGER PRIMARY KEY, v TEXT);
         CREATE TABLE audit (id TEXT PRIMARY KEY DEFAULT (lower(hex(randomblob(16)))), item INTEGER, v TEXT);
         CREATE TRIGGER audit_item AFTER UPDATE ON items WHEN NOT EXISTS (SELECT 1 FROM _weft_applying)
         BEGIN INSERT INTO audit (item, v) VALUES (NEW.id, NEW.v); END;";
    let a = Region::sqlite(dir.path(), "a", schema, &lww(&["items", "audit"])).await;
    let b = Region::sqlite(dir.path(), "b", schema, &lww(&["items", "audit"])).await;
    a.exec("INSERT INTO items VALUES (1, 'one');").await;
    sync_regions(&[&a, &b]).await;
    a.exec("UPDATE items SET v = 'uno' WHERE id = 1;").await;
    sync_regions(&[&a, &b]).await;
    assert_eq!(b.count("SELECT count(*) FROM audit").await, 1);
    assert_eq!(
        a.snapshot(&["items", "audit"]).await,
        b.snapshot(&["items", "audit"]).await
    );
}

/// Finding 5: SQLite's `INSERT OR REPLACE` deletes the rows it conflicts with through a
/// UNIQUE column without firing delete triggers. The delete went uncaptured, so a receiver
/// kept the old row and dead-lettered the new one: the regions differed for good. And in an
/// ownership table it replaced rows another region owns. Now the deletes are captured, and
/// replacing a row another region owns is refused, in the application's statement.
#[tokio::test]
async fn insert_or_replace_through_a_unique_column_replicates_its_deletes_and_respects_owners() {
    use common::regions::{Region, lww, sync as sync_regions};
    use weft::config::TableConfig;
    let dir = tempfile::tempdir().unwrap();
    let schema = "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE, name TEXT);
         CREATE TABLE accounts (id INTEGER PRIMARY KEY, home TEXT NOT NULL, email TEXT UNIQUE, balance INTEGER);";
    let mut tables = lww(&["users"]);
    tables.push(TableConfig::owned_by_column("accounts", "home"));
    let a = Region::sqlite(dir.path(), "a", schema, &tables).await;
    let b = Region::sqlite(dir.path(), "b", schema, &tables).await;
    a.exec("INSERT INTO users VALUES (1, 'a@x', 'one'); INSERT INTO accounts VALUES (42, 'region-of-a', 'm@x', 10);")
        .await;
    sync_regions(&[&a, &b]).await;

    a.exec("INSERT OR REPLACE INTO users VALUES (2, 'a@x', 'two');").await;
    // A plain insert that the UNIQUE column refuses, and an ignored one, change nothing.
    assert!(
        a.try_exec("INSERT INTO users VALUES (3, 'a@x', 'three');")
            .await
            .is_err()
    );
    a.exec("INSERT OR IGNORE INTO users VALUES (4, 'a@x', 'four');").await;
    sync_regions(&[&a, &b]).await;
    assert_eq!(b.snapshot(&["users"]).await, a.snapshot(&["users"]).await);
    assert_eq!(b.count("SELECT count(*) FROM users WHERE id = 2").await, 1);
    assert_eq!(b.count("SELECT count(*) FROM _weft_dead_letters").await, 0);

    // b may not replace a's account, by its key or through its unique email.
    for sql in [
        "INSERT OR REPLACE INTO accounts VALUES (42, 'region-of-b', 'm@x', 0);",
        "INSERT OR REPLACE INTO accounts VALUES (43, 'region-of-b', 'm@x', 0);",
    ] {
        let refused = b.try_exec(sql).await.unwrap_err();
        assert!(refused.contains("owned by region-of-a"), "{refused}");
    }
    b.exec("INSERT INTO accounts VALUES (44, 'region-of-b', 'n@x', 5);")
        .await;
    sync_regions(&[&a, &b]).await;
    assert_eq!(b.snapshot(&["accounts"]).await, a.snapshot(&["accounts"]).await);
    assert_eq!(a.count("SELECT count(*) FROM accounts").await, 2);
}

/// Finding 21 (one sidecar per SQLite file): a second sidecar on the same database (another
/// config with another listen port, say) used to start and number events from the same
/// counter as the first. It is refused, naming the holder; once the first is gone it opens.
#[tokio::test]
async fn a_second_sidecar_on_one_sqlite_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = replica(dir.path(), "a").await;
    let identity = weft::event::Identity {
        node: "a".into(),
        region: "region-of-a".into(),
    };
    let path = dir.path().join("a.db");
    let open = || weft::store::sqlite::SqliteStore::open(&path, identity.clone(), &[], Duration::from_millis(500));
    let refused = open().await.err().expect("a second sidecar is refused").to_string();
    assert!(
        refused.contains("another weft sidecar already serves this database")
            && refused.contains(&format!("pid {}", std::process::id())),
        "{refused}"
    );
    drop(first);
    open().await.expect("the lock goes with the sidecar");
}

/// A SIGTERM that arrives while a sidecar is still starting (here: waiting for the
/// application's write lock to install its schema), as a supervisor stopping a pod that has
/// just started would send, is a graceful stop: exit 0. It used to kill the process outright
/// (the stop handler was only installed after the start), which `.ci/run` once hit in
/// `a_panicking_task_stops_the_sidecar_with_a_clear_error_and_a_restart_recovers`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_during_start_is_a_graceful_stop() {
    let dir = tempfile::tempdir().unwrap();
    let sidecars = common::sidecars::Sidecars::new(dir.path()).await;
    let mut lock = sidecars.mesh.regions[0].app.acquire().await.unwrap();
    sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut *lock).await.unwrap();
    sidecars.start(0, None);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    sidecars.signal(0, "TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    sqlx::raw_sql("ROLLBACK").execute(&mut *lock).await.unwrap();
    drop(lock);
    let status = sidecars.exit_status(0, Duration::from_secs(30)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

/// Issue 14: an authenticated peer may send only what the topology routes through it. In a
/// three-node all-to-all mesh without relaying, rb-1 may send rb-1's events to ra-1, not
/// rc-1's; the path must run from the origin to rb-1; its version may give rb-1 no more
/// than the event's seq; its HLC may not be an hour ahead. Each batch is refused before
/// anything is applied, and counted.
#[tokio::test]
async fn a_peer_may_send_only_what_the_topology_routes_through_it() {
    use weft::config::{ReplicationConfig, TableConfig};
    use weft::harness::loopback::LoopbackMesh;
    let dir = tempfile::tempdir().unwrap();
    let replication = ReplicationConfig {
        relay_after_ms: 0,
        ..ReplicationConfig::default()
    };
    let schema = "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);";
    let topology = LoopbackMesh::all_to_all(&["ra", "rb", "rc"]);
    let mut mesh = LoopbackMesh::create(dir.path(), &topology, schema, &[TableConfig::lww("t")], &replication)
        .await
        .unwrap();
    mesh.start(0).await.unwrap();
    let not_routed = upsert_of("rc-1", "rc", 1, "forged");
    let mut forged_path = upsert_of("rb-1", "rb", 1, "forged");
    forged_path.path = vec!["rb-1".into(), "rc-1".into()];
    let mut leap = upsert_of("rb-1", "rb", 1, "forged");
    leap.version.set("rb-1", 1_000_000);
    let mut future = upsert_of("rb-1", "rb", 1, "forged");
    future.hlc = weft::event::Hlc(((weft::clock::now_micros() / 1000 + 3_600_000) as u64) << 22);
    let cases = [
        (not_routed, "does not route"),
        (forged_path, "path"),
        (leap, "past the event's own seq"),
        (future, "ahead of this node's clock"),
    ];
    assert_each_refused(mesh, cases).await;
}

/// Issue 14, claims: rb-1 may not move a row to a region the topology lacks, may not write a
/// row it says ra owns without a transfer, may not send a version that has seen more of
/// ra-1's writes than ra-1 made, and may not fill versions with nodes outside the topology.
/// Each batch is refused before anything is applied, and counted.
#[tokio::test]
async fn a_peer_may_not_claim_owners_or_versions_the_topology_cannot_have() {
    use weft::event::Ownership;
    let dir = tempfile::tempdir().unwrap();
    let mesh = ra_started(dir.path()).await;
    let owned = |owner: &str, transfer: bool| {
        let mut event = upsert_of("rb-1", "rb", 1, "forged");
        event.ownership = Some(Ownership {
            owner: owner.into(),
            epoch: 1,
            transfer,
        });
        event
    };
    let mut ahead = upsert_of("rb-1", "rb", 1, "forged");
    ahead.version.set("ra-1", 99);
    let mut crowded = upsert_of("rb-1", "rb", 1, "forged");
    for i in 0..=weft::transport::admission::MAX_STRANGERS {
        crowded.version.set(&format!("ghost-{i}"), u64::MAX);
    }
    let cases = [
        (owned("atlantis", true), "`atlantis`, which is not a region"),
        (owned("ra", false), "a write by rb to a row it says ra owns"),
        (ahead, "gives this node 99, but this node's last write is 0"),
        (crowded, "names 17 nodes outside this topology"),
    ];
    assert_each_refused(mesh, cases).await;
}

/// Issue 14, bounded dead letters: past `max_dead_letters_per_cause` letters of one cause
/// (here events of a table ra does not replicate), a batch that would add one is refused
/// whole and resent later, so nothing is lost and the disk does not fill; events of other
/// causes, and of healthy tables, still apply.
#[tokio::test]
async fn dead_letters_are_bounded_per_cause_and_a_full_cause_loses_nothing() {
    use weft::config::{ReplicationConfig, TableConfig};
    use weft::harness::loopback::LoopbackMesh;
    let dir = tempfile::tempdir().unwrap();
    let replication = ReplicationConfig {
        max_dead_letters_per_cause: 3,
        ..ReplicationConfig::default()
    };
    let schema = "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);";
    let topology = LoopbackMesh::all_to_all(&["ra", "rb"]);
    let mut mesh = LoopbackMesh::create(dir.path(), &topology, schema, &[TableConfig::lww("t")], &replication)
        .await
        .unwrap();
    mesh.start(0).await.unwrap();
    let stray = |seq: u64| {
        let mut event = upsert_of("rb-1", "rb", seq, "stray");
        event.table = "nowhere".into();
        weft::wire::event_to_proto(&event)
    };
    let count = async |sql: &str| -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&mesh.regions[0].app)
            .await
            .unwrap()
    };
    let mut replies = send_as_rb(&mesh, (1..=4).map(stray).collect()).await;
    let refused = replies
        .message()
        .await
        .expect_err("a fourth letter of one cause is refused");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("3 dead letters of cause `not replicated` are stored"),
        "{refused:?}"
    );
    assert_eq!(
        count("SELECT count(*) FROM _weft_dead_letters").await,
        0,
        "the whole batch was refused"
    );

    let mut replies = send_as_rb(&mesh, (1..=3).map(stray).collect()).await;
    assert!(
        replies.message().await.unwrap().is_some(),
        "three letters fit: acknowledged"
    );
    drop(replies);
    // A value of a kind this build does not know: dead-lettered as undecodable.
    let mut undecodable = weft::wire::event_to_proto(&upsert_of("rb-1", "rb", 4, "x"));
    if let Some(weft::wire::proto::event::Op::Upsert(upsert)) = &mut undecodable.op {
        upsert.columns[1].value = Some(weft::wire::proto::Value { kind: None });
    }
    let mut replies = send_as_rb(&mesh, vec![undecodable.clone(), stray(5)]).await;
    assert!(replies.message().await.is_err(), "the stray letter still does not fit");
    let healthy = vec![
        undecodable,
        weft::wire::event_to_proto(&upsert_of("rb-1", "rb", 5, "fine")),
    ];
    let mut replies = send_as_rb(&mesh, healthy).await;
    assert!(
        replies.message().await.unwrap().is_some(),
        "another cause and a healthy row apply"
    );
    let letters = count("SELECT count(*) FROM _weft_dead_letters").await;
    let rows = count("SELECT count(*) FROM t").await;
    mesh.stop_all().await;
    assert_eq!((letters, rows), (4, 1));
}

/// Sends each event as rb-1 in a batch of its own: each batch is refused with its reason,
/// counted, and nothing of it applied. Stops the mesh.
async fn assert_each_refused<const N: usize>(
    mut mesh: weft::harness::loopback::LoopbackMesh,
    cases: [(weft::event::Event, &str); N],
) {
    for (event, why) in cases {
        let mut replies = send_as_rb(&mesh, vec![weft::wire::event_to_proto(&event)]).await;
        let refused = replies.message().await.expect_err("the batch is refused");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains(why), "{why}: {refused:?}");
    }
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
        .fetch_one(&mesh.regions[0].app)
        .await
        .unwrap();
    let refused = mesh.regions[0]
        .metrics
        .refused_batches
        .load(std::sync::atomic::Ordering::Relaxed);
    mesh.stop_all().await;
    assert_eq!(
        (applied, refused),
        (0, N as u64),
        "nothing of a refused batch is applied; each is counted"
    );
}
