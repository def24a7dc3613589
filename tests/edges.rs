//! Edges where weft used to lose acknowledged writes (`../shared/review-edges.md`), each
//! reproduced through the real store on real SQLite files.
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

/// Finding 13 on a PostgreSQL region: the same resolution, captured from `weft.outbox` with
/// the key alone as its image, closes the entry in the PostgreSQL and the SQLite region.
#[tokio::test]
async fn on_postgres_resolving_with_a_delete_of_an_absent_row_closes_the_conflict_everywhere() {
    use common::regions::{Region, sync as sync_regions};
    use weft::config::{Database, NodeConfig, TableConfig};
    use weft::harness::cluster::{Cluster, Settings};
    use weft::store::admin::{Admin, Choice};
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let tables = [TableConfig::queue("contracts")];
    let pg = "CREATE TABLE contracts (id bigint PRIMARY KEY, client text, amount bigint);";
    let lite = "CREATE TABLE contracts (id INTEGER PRIMARY KEY, client TEXT, amount INTEGER);";
    let a = Region::pg(&cluster, "a", pg, &tables).await;
    let b = Region::sqlite(dir.path(), "b", lite, &tables).await;
    a.exec("INSERT INTO contracts VALUES (7, 'acme', 100);").await;
    sync_regions(&[&a, &b]).await;
    b.exec("UPDATE contracts SET amount = 150 WHERE id = 7;").await;
    b.drain().await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    a.exec("DELETE FROM contracts WHERE id = 7;").await;
    sync_regions(&[&a, &b]).await;
    let open = "SELECT count(*) FROM weft.queue WHERE closed_at IS NULL";
    assert_eq!(a.count(open).await, 1, "one open conflict");
    assert_eq!(
        a.count("SELECT count(*) FROM contracts").await,
        0,
        "the delete is visible"
    );
    let Database::Postgres(url) = &a.database else {
        unreachable!()
    };
    let topology = "version = 1\nmesh = \"q\"\nshape = \"all-to-all\"\n[[nodes]]\nid = \"a\"\nregion = \"region-of-a\"\naddress = \"127.0.0.1:1\"\n[[nodes]]\nid = \"b\"\nregion = \"region-of-b\"\naddress = \"127.0.0.1:2\"\n";
    std::fs::write(dir.path().join("t.toml"), topology).unwrap();
    let config = dir.path().join("a.toml");
    let text = format!(
        "version = 1\nnode = \"a\"\ntopology = \"t.toml\"\ndatabase = \"{url}\"\n[[tables]]\nname = \"contracts\"\nstrategy = \"queue\"\n"
    );
    std::fs::write(&config, text).unwrap();
    let admin = Admin::open(NodeConfig::load(&config).unwrap()).await.unwrap();
    let conflict = admin.open_conflicts().await.unwrap().pop().unwrap();
    let delete = conflict.siblings.iter().position(|s| s.op.is_delete()).unwrap() + 1;
    admin.resolve(conflict.id, Choice::Take(delete), "ops").await.unwrap();
    sync_regions(&[&a, &b]).await;
    sync_regions(&[&a, &b]).await;
    assert_eq!(a.count(open).await, 0, "closed on PostgreSQL");
    assert_eq!(
        b.count("SELECT count(*) FROM _weft_queue WHERE closed_at IS NULL")
            .await,
        0,
        "closed on SQLite"
    );
}

/// Finding 9: a panic in one task (the capture loop, here) must not leave a half-alive
/// sidecar that answers peers but captures nothing: the process stops, saying why, with a
/// status a supervisor restarts on; after the restart everything is captured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_task_stops_the_sidecar_with_a_clear_error_and_a_restart_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let sidecars = common::sidecars::Sidecars::new(dir.path()).await;
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

/// Finding 14: PostgreSQL's TRUNCATE fires no row or transition-table trigger, so it emptied
/// one region's table and no other. It is refused on replicated tables, saying what to do;
/// the rows stay, and a DELETE of all rows replicates as usual.
#[tokio::test]
async fn truncate_of_a_replicated_postgres_table_is_refused_and_loses_nothing() {
    use common::regions::{Region, lww, sync as sync_regions};
    use weft::harness::cluster::{Cluster, Settings};
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let a = Region::pg(
        &cluster,
        "a",
        "CREATE TABLE t (id bigint PRIMARY KEY, v text);",
        &lww(&["t"]),
    )
    .await;
    let b = Region::sqlite(
        dir.path(),
        "b",
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);",
        &lww(&["t"]),
    )
    .await;
    a.exec("INSERT INTO t VALUES (1, 'one'), (2, 'two');").await;
    sync_regions(&[&a, &b]).await;
    let refused = a.try_exec("TRUNCATE t;").await.unwrap_err();
    assert!(
        refused.contains("TRUNCATE of t is not replicated") && refused.contains("DELETE FROM t"),
        "{refused}"
    );
    assert_eq!(a.count("SELECT count(*) FROM t").await, 2, "nothing was truncated");
    a.exec("DELETE FROM t;").await;
    sync_regions(&[&a, &b]).await;
    assert_eq!(
        b.count("SELECT count(*) FROM t").await,
        0,
        "a DELETE of every row replicates"
    );
}

/// Finding 8 (c): a write the receiving database refuses for a reason retrying cannot fix
/// (an application trigger enabled ALWAYS raising, an index row too large for PostgreSQL's B-tree) is
/// dead-lettered with the reason and SQLSTATE; the events around it apply and later writes
/// of the same origin keep flowing. These errors used to fail the whole run, forever.
#[tokio::test]
async fn a_postgres_receiver_dead_letters_what_it_refuses_for_good_and_the_stream_flows() {
    use common::regions::{Region, lww};
    use rand::distr::{Alphanumeric, SampleString};
    use weft::harness::cluster::{Cluster, Settings};
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let a = Region::sqlite(
        dir.path(),
        "a",
        "CREATE TABLE t (id INTEGER PRIMARY KEY, qty INTEGER); CREATE TABLE k (id TEXT PRIMARY KEY, v TEXT);",
        &lww(&["t", "k"]),
    )
    .await;
    let b = Region::pg(
        &cluster,
        "b",
        "CREATE TABLE t (id bigint PRIMARY KEY, qty bigint);
         CREATE FUNCTION no_negative() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.qty < 0 THEN RAISE EXCEPTION 'qty may not go below zero'; END IF; RETURN NEW; END $$;
         CREATE TRIGGER no_negative BEFORE INSERT OR UPDATE ON t FOR EACH ROW EXECUTE FUNCTION no_negative();
         -- A validation trigger meant to hold for replicated writes too fires even as a replica.
         ALTER TABLE t ENABLE ALWAYS TRIGGER no_negative;
         CREATE TABLE k (id text PRIMARY KEY, v text);",
        &lww(&["t", "k"]),
    )
    .await;
    // Random text does not compress: far over the 2704 bytes a B-tree entry may hold.
    let long_key = Alphanumeric.sample_string(&mut rand::rng(), 8000);
    a.exec(&format!(
        "INSERT INTO t VALUES (1, -1); INSERT INTO k VALUES ('{long_key}', 'long'); INSERT INTO t VALUES (2, 5);"
    ))
    .await;
    a.drain().await;
    let report = b.pull(&a).await;
    assert_eq!((report.applied, report.dead_lettered), (1, 2), "{report:?}");
    let reasons: Vec<String> = sqlx::query_scalar("SELECT reason FROM weft.dead_letters ORDER BY seq")
        .fetch_all(b.pg_pool())
        .await
        .unwrap();
    assert!(
        reasons[0].contains("below zero") && reasons[0].contains("P0001"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("54000"), "{reasons:?}");
    a.exec("UPDATE t SET qty = 3 WHERE id = 1;").await;
    a.drain().await;
    let report = b.pull(&a).await;
    assert_eq!(report.applied, 1, "later writes of the origin keep flowing: {report:?}");
    assert_eq!(b.count("SELECT sum(qty)::int8 FROM t").await, 8);
}

/// Finding 8 (b): a register holding an infinite or NaN float used to be stored as JSON
/// `null`, which does not read back: the origin's next drain of that row failed for good,
/// and so did every receiver's batch. They now round-trip, SQLite to PostgreSQL and back.
#[tokio::test]
async fn non_finite_floats_in_a_crdt_register_replicate_and_wedge_nothing() {
    use common::regions::{Region, sync as sync_regions};
    use weft::config::TableConfig;
    use weft::crdt::CrdtType;
    use weft::harness::cluster::{Cluster, Settings};
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let tables = [TableConfig::crdt("p", &[("price", CrdtType::Register)])];
    let a = Region::sqlite(
        dir.path(),
        "a",
        "CREATE TABLE p (id INTEGER PRIMARY KEY, price REAL, note TEXT);",
        &tables,
    )
    .await;
    let b = Region::pg(
        &cluster,
        "b",
        "CREATE TABLE p (id bigint PRIMARY KEY, price float8, note text);",
        &tables,
    )
    .await;
    a.exec("INSERT INTO p VALUES (1, 9e999, 'x'), (2, -9e999, 'x');").await;
    sync_regions(&[&a, &b]).await;
    a.exec("UPDATE p SET note = 'y';").await;
    a.drain().await;
    b.pull(&a).await;
    assert_eq!(
        b.count("SELECT count(*) FROM p WHERE price = 'Infinity' AND note = 'y'")
            .await,
        1
    );
    assert_eq!(
        b.count("SELECT count(*) FROM p WHERE price = '-Infinity' AND note = 'y'")
            .await,
        1
    );
    b.exec("UPDATE p SET price = 'Infinity' WHERE id = 2; UPDATE p SET note = 'z' WHERE id = 1;")
        .await;
    sync_regions(&[&a, &b]).await;
    assert_eq!(
        a.count("SELECT count(*) FROM p WHERE price = 9e999 AND note = 'z'")
            .await,
        1
    );
    assert_eq!(a.count("SELECT count(*) FROM p WHERE price = 9e999").await, 2);
    // SQLite cannot store a NaN (it reads back as NULL): refused, visibly, not wedged.
    b.exec("UPDATE p SET price = 'NaN' WHERE id = 1; UPDATE p SET note = 'after' WHERE id = 2;")
        .await;
    sync_regions(&[&a, &b]).await;
    assert_eq!(
        a.count("SELECT count(*) FROM _weft_dead_letters WHERE reason LIKE '%NaN%'")
            .await,
        1
    );
    assert_eq!(a.count("SELECT count(*) FROM p WHERE note = 'after'").await, 1);
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
    let address = &mesh.topology.nodes[0].address;
    let mut client = proto::replication_client::ReplicationClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let hello = proto::SendFrame {
        body: Some(proto::send_frame::Body::Hello(proto::Hello {
            protocol: weft::wire::PROTOCOL,
            node_id: "rb-1".into(),
            region: "rb".into(),
            mesh: mesh.topology.mesh.clone(),
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

/// Finding 19: on PostgreSQL the applier runs as a replica (`session_replication_role`), so
/// an application trigger fires where the application wrote, not again where weft applies
/// the write. Here an audit trigger used to add a second audit row in the receiving region
/// (its own, on top of the replicated one).
#[tokio::test]
async fn application_triggers_fire_where_the_application_wrote_not_where_weft_applies() {
    use common::regions::{Region, lww, sync as sync_regions};
    use weft::harness::cluster::{Cluster, Settings};
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let schema = "CREATE TABLE items (id bigint PRIMARY KEY, v text);
         CREATE TABLE audit (id text PRIMARY KEY DEFAULT gen_random_uuid()::text, item bigint, v text);
         CREATE FUNCTION audit_item() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO audit (item, v) VALUES (NEW.id, NEW.v); RETURN NEW; END $$;
         CREATE TRIGGER audit_item AFTER INSERT OR UPDATE ON items FOR EACH ROW EXECUTE FUNCTION audit_item();";
    let a = Region::pg(&cluster, "a", schema, &lww(&["items", "audit"])).await;
    let b = Region::pg(&cluster, "b", schema, &lww(&["items", "audit"])).await;
    a.exec("INSERT INTO items VALUES (1, 'one');").await;
    a.exec("UPDATE items SET v = 'uno' WHERE id = 1;").await;
    sync_regions(&[&a, &b]).await;
    assert_eq!(a.count("SELECT count(*) FROM audit").await, 2);
    assert_eq!(
        b.count("SELECT count(*) FROM audit").await,
        2,
        "the origin's audit rows, no more"
    );
    assert_eq!(
        a.snapshot(&["items", "audit"]).await,
        b.snapshot(&["items", "audit"]).await
    );
}

const ORDERS_LITE: &str = "CREATE TABLE orders (id INTEGER PRIMARY KEY, total INTEGER);
     CREATE TABLE lines (id INTEGER PRIMARY KEY, order_id INTEGER REFERENCES orders(id));";
const ORDERS_PG: &str = "CREATE TABLE orders (id bigint PRIMARY KEY, total bigint);
     CREATE TABLE lines (id bigint PRIMARY KEY, order_id bigint NOT NULL REFERENCES orders(id));";

/// `a` writes order 1 and its line 10 in one transaction (coalesced: the line first); `c`
/// applies it.
async fn parent_and_child_in_one_transaction(
    a: &common::regions::Region,
    c: &common::regions::Region,
) -> weft::store::ApplyReport {
    a.exec(
        "BEGIN; INSERT INTO orders VALUES (1, 0); INSERT INTO lines VALUES (10, 1); \
         UPDATE orders SET total = 5 WHERE id = 1; COMMIT;",
    )
    .await;
    a.drain().await;
    c.pull(a).await
}

/// `a` writes order 2, `b` (having it) writes its line 20, and `c` hears `b` first.
async fn child_before_parent(
    a: &common::regions::Region,
    b: &common::regions::Region,
    c: &common::regions::Region,
) -> weft::store::ApplyReport {
    a.exec("INSERT INTO orders VALUES (2, 7);").await;
    a.drain().await;
    b.pull(a).await;
    b.exec("INSERT INTO lines VALUES (20, 2);").await;
    b.drain().await;
    c.pull(b).await
}

/// Finding 4 (a) and (b): a PostgreSQL receiver with a foreign key takes a child written in
/// the same transaction as its parent (coalescing puts the child first), and a child from
/// one region that arrives before its parent from another. Both used to be dead-lettered for
/// good (SQLSTATE 23503), leaving the child missing in that region only.
#[tokio::test]
async fn children_reach_a_postgres_receiver_with_a_foreign_key_whatever_the_arrival_order() {
    use common::regions::{Region, lww};
    use weft::harness::cluster::{Cluster, Settings};
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let tables = lww(&["orders", "lines"]);
    let a = Region::sqlite(dir.path(), "a", ORDERS_LITE, &tables).await;
    let b = Region::sqlite(dir.path(), "b", ORDERS_LITE, &tables).await;
    let c = Region::pg(&cluster, "c", ORDERS_PG, &tables).await;
    let report = parent_and_child_in_one_transaction(&a, &c).await;
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    // A parent from a, its child from b; c hears b first.
    let report = child_before_parent(&a, &b, &c).await;
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    c.pull(&a).await;
    assert_eq!(c.count("SELECT count(*) FROM lines").await, 2);
    assert_eq!(
        c.count("SELECT count(*) FROM lines JOIN orders ON orders.id = order_id")
            .await,
        2
    );
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

/// Finding 16: a sidecar cut off from its PostgreSQL database in the middle of an apply (a
/// partition: nothing arrives either way, nothing is closed) used to leave its transaction,
/// and the row locks it held, in place until TCP gave up, for hours behind a proxy. The
/// writer's session now ends a transaction left idle for 30 s, so the application's update
/// of a row the lost apply held goes through, and the sidecar recovers once the link heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_cut_off_from_postgres_mid_apply_holds_row_locks_only_briefly() {
    use common::proxy::Proxy;
    use common::regions::{Region, lww};
    use std::time::Instant;
    use weft::harness::cluster::{Cluster, Settings};
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let tables = lww(&["t"]);
    let a = Region::sqlite(
        dir.path(),
        "a",
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);",
        &tables,
    )
    .await;
    let url = cluster.create_database("b").await.unwrap();
    let app = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::raw_sql("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        .execute(&app)
        .await
        .unwrap();
    let server = url.split('@').nth(1).unwrap().split('/').next().unwrap().to_owned();
    let proxy = Proxy::start(&server).await;
    let proxied = url.replace(&server, &proxy.listen.to_string());
    let identity = weft::event::Identity {
        node: "b".into(),
        region: "region-of-b".into(),
    };
    let b = std::sync::Arc::new(
        weft::store::Store::open(
            &weft::config::Database::Postgres(proxied),
            identity,
            &tables,
            Duration::from_millis(500),
        )
        .await
        .unwrap(),
    );
    a.exec("INSERT INTO t VALUES (1, 'one'), (2, 'two');").await;
    a.drain().await;
    b.apply(a.events(0).await).await.unwrap();
    a.exec("UPDATE t SET v = v || '!';").await;
    a.drain().await;
    let events = a.events(2).await;

    // The application holds row 2: the apply locks row 1, then waits for row 2.
    let mut holder = app.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM t WHERE id = 2 FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let applying = tokio::spawn({
        let (b, events) = (b.clone(), events.clone());
        async move { b.apply(events).await }
    });
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'weft' AND wait_event_type = 'Lock'";
    let deadline = Instant::now() + Duration::from_secs(20);
    while sqlx::query_scalar::<_, i64>(waiting).fetch_one(&app).await.unwrap() == 0 {
        assert!(Instant::now() < deadline, "the apply never waited for row 2");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.stall();
    holder.commit().await.unwrap();

    // The apply's backend now has both rows and waits, idle in its transaction, for a client
    // that cannot answer. The application's update of row 1 waits for it only briefly.
    let started = Instant::now();
    let mut conn = app.acquire().await.unwrap();
    sqlx::raw_sql("SET statement_timeout = '90s'")
        .execute(&mut *conn)
        .await
        .unwrap();
    let updated = sqlx::query("UPDATE t SET v = 'app' WHERE id = 1")
        .execute(&mut *conn)
        .await;
    let waited = started.elapsed();
    assert!(updated.is_ok(), "{updated:?} after {waited:?}");
    assert!(waited < Duration::from_secs(50), "the row stayed locked for {waited:?}");
    drop(conn);

    proxy.resume();
    let first = applying.await.unwrap();
    assert!(first.is_err(), "the cut-off apply's transaction was ended: {first:?}");
    let report = b.apply(events).await.expect("the sidecar redials and applies");
    assert_eq!(report.frontiers.get("a"), Some(&4));
}

/// Finding 4 (c): a source transaction that swaps two rows' unique values coalesces into two
/// writes that each collide with the other row's old value. Each used to be dead-lettered,
/// so receivers kept the old values for good; they now apply as one group, on SQLite and on
/// PostgreSQL (as a replica, where no delete can cascade).
#[tokio::test]
async fn a_swap_of_unique_values_in_one_transaction_replicates() {
    use common::regions::{Region, lww, sync as sync_regions};
    use weft::harness::cluster::{Cluster, Settings};
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let tables = lww(&["users"]);
    let lite = "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE);";
    let a = Region::sqlite(dir.path(), "a", lite, &tables).await;
    let b = Region::sqlite(dir.path(), "b", lite, &tables).await;
    let c = Region::pg(
        &cluster,
        "c",
        "CREATE TABLE users (id bigint PRIMARY KEY, email text NOT NULL UNIQUE);",
        &tables,
    )
    .await;
    a.exec("INSERT INTO users VALUES (1, 'a@x'), (2, 'b@x');").await;
    sync_regions(&[&a, &b, &c]).await;
    a.exec(
        "BEGIN; UPDATE users SET email = 'tmp' WHERE id = 1; UPDATE users SET email = 'a@x' WHERE id = 2; \
         UPDATE users SET email = 'b@x' WHERE id = 1; COMMIT;",
    )
    .await;
    sync_regions(&[&a, &b, &c]).await;
    let want = a.snapshot(&["users"]).await;
    assert_eq!(b.snapshot(&["users"]).await, want);
    assert_eq!(c.snapshot(&["users"]).await, want);
    assert_eq!(b.count("SELECT count(*) FROM _weft_dead_letters").await, 0);
    assert_eq!(c.count("SELECT count(*) FROM weft.dead_letters").await, 0);
}

/// Finding 4 where weft cannot apply as a replica (a database role that is no superuser):
/// foreign keys are checked on applied writes. A child written in the same transaction as
/// its parent applies (the child, set aside, goes in after the parent); a child that arrives
/// from one region before its parent from another is dead-lettered, retried with backoff,
/// and applied once the parent is there, instead of missing in that region for good.
#[tokio::test]
async fn without_a_replica_role_a_child_that_came_before_its_parent_is_retried_and_applied() {
    use common::regions::{Region, lww};
    use weft::harness::cluster::{Cluster, Settings};
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let tables = lww(&["orders", "lines"]);
    let a = Region::sqlite(dir.path(), "a", ORDERS_LITE, &tables).await;
    let b = Region::sqlite(dir.path(), "b", ORDERS_LITE, &tables).await;
    let c = Region::pg_unprivileged(&cluster, "c", ORDERS_PG, &tables).await;
    let report = parent_and_child_in_one_transaction(&a, &c).await;
    assert_eq!((report.applied, report.dead_lettered), (2, 0), "{report:?}");

    let report = child_before_parent(&a, &b, &c).await;
    assert_eq!(report.dead_lettered, 1, "the parent is not there yet: {report:?}");
    let reason: String = sqlx::query_scalar("SELECT reason FROM weft.dead_letters")
        .fetch_one(c.pg_pool())
        .await
        .unwrap();
    assert!(reason.contains("23503"), "{reason}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let retried = c.store.retry_dead_letters(false).await.unwrap();
    assert_eq!((retried.applied, retried.refused), (0, 1), "still no parent");
    let attempts = c.count("SELECT attempts FROM weft.dead_letters").await;
    assert_eq!(attempts, 1);
    c.pull(&a).await;
    assert_eq!(
        c.store.retry_dead_letters(false).await.unwrap().applied,
        0,
        "not due yet: it backs off"
    );
    // Rows were applied since: a letter refused for a missing parent is due at once.
    assert_eq!(c.store.retry_dead_letters(true).await.unwrap().applied, 1);
    assert_eq!(c.count("SELECT count(*) FROM weft.dead_letters").await, 0);
    assert_eq!(c.count("SELECT count(*) FROM lines").await, 2);
    a.pull(&b).await;
    assert_eq!(
        c.snapshot(&["orders", "lines"]).await,
        a.snapshot(&["orders", "lines"]).await
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

/// Finding 21 (PostgreSQL capture text): a row image is rendered by the application's
/// session, so an old driver's `extra_float_digits`, `IntervalStyle = sql_standard` or a
/// local time zone used to change the replicated value: a rounded double, an interval of
/// another sign. The capture functions now render canonical text whatever the session says.
#[tokio::test]
async fn postgres_capture_renders_values_exactly_whatever_the_application_session_says() {
    use common::regions::{Region, lww};
    use weft::harness::cluster::{Cluster, Settings};
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let tables = lww(&["v"]);
    let schema = "CREATE TABLE v (id bigint PRIMARY KEY, f float8, i interval, t timestamptz);";
    let a = Region::pg(&cluster, "a", schema, &tables).await;
    let c = Region::pg(&cluster, "c", schema, &tables).await;
    let b = Region::sqlite(
        dir.path(),
        "b",
        "CREATE TABLE v (id INTEGER PRIMARY KEY, f REAL, i TEXT, t TEXT);",
        &tables,
    )
    .await;
    let mut app = a.pg_pool().acquire().await.unwrap();
    sqlx::raw_sql(
        "SET extra_float_digits = -3; SET IntervalStyle = 'sql_standard'; SET TimeZone = 'Asia/Kolkata';
         INSERT INTO v VALUES (1, 0.1::float8 + 0.2::float8, interval '-1 day -2 hours', '2026-01-01 00:00:00+00');",
    )
    .execute(&mut *app)
    .await
    .unwrap();
    drop(app);
    a.drain().await;
    c.pull(&a).await;
    b.pull(&a).await;
    let exact = "SELECT count(*) FROM v WHERE f = 0.1::float8 + 0.2::float8 AND i = interval '-1 day -2 hours' \
                 AND t = '2026-01-01 00:00:00+00'";
    assert_eq!(c.count(exact).await, 1, "{:?}", c.snapshot(&["v"]).await);
    assert_eq!(
        b.count("SELECT count(*) FROM v WHERE f = 0.1 + 0.2 AND i = 'P-1DT-2H' AND t = '2026-01-01 00:00:00+00'")
            .await,
        1,
        "{:?}",
        b.snapshot(&["v"]).await
    );
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
