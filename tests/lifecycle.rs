//! A region's life beyond the steady state (issue 12), on real databases: a mesh created
//! around databases that already hold rows.
mod common;

use common::regions::{Region, lww, sync};
use weft::config::TableConfig;
use weft::harness::cluster::{Cluster, Settings};

/// Rows that exist before weft captures a table are adopted at its first start: queued as
/// that region's writes, they get versions and reach every region, on SQLite and on
/// PostgreSQL, across the two. Two regions holding different rows for one key resolve them
/// like any concurrent writes (LWW, logged in the conflict log). An ownership table adopts
/// only the rows its region owns. A second start adopts nothing again.
#[tokio::test]
async fn rows_that_exist_before_install_are_adopted_and_replicate() {
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let mut tables = lww(&["items"]);
    tables.push(TableConfig::owned_by_column("accounts", "home"));
    let lite = "CREATE TABLE items (id INTEGER PRIMARY KEY, v TEXT);
         CREATE TABLE accounts (id INTEGER PRIMARY KEY, home TEXT NOT NULL, balance INTEGER);
         INSERT INTO items VALUES (1, 'a-one'), (2, 'a-two'), (3, 'a-three');
         INSERT INTO accounts VALUES (10, 'region-of-a', 1), (20, 'region-of-b', 2);";
    let pg = "CREATE TABLE items (id bigint PRIMARY KEY, v text);
         CREATE TABLE accounts (id bigint PRIMARY KEY, home text NOT NULL, balance bigint);
         INSERT INTO items VALUES (3, 'b-three'), (4, 'b-four');
         INSERT INTO accounts VALUES (10, 'region-of-a', 1), (20, 'region-of-b', 2);";
    let a = Region::sqlite(dir.path(), "a", lite, &tables).await;
    let b = Region::pg(&cluster, "b", pg, &tables).await;
    sync(&[&a, &b]).await;
    let want = a.snapshot(&["items", "accounts"]).await;
    assert_eq!(b.snapshot(&["items", "accounts"]).await, want);
    assert_eq!(a.count("SELECT count(*) FROM items").await, 4);
    let conflicts = a
        .count("SELECT count(*) FROM _weft_conflicts WHERE tbl = 'items'")
        .await
        + b.count("SELECT count(*) FROM weft.conflicts WHERE tbl = 'items'").await;
    assert!(conflicts >= 1, "the two rows for key 3 are a logged conflict");
    for (r, letters) in [(&a, "_weft_dead_letters"), (&b, "weft.dead_letters")] {
        let sql = format!("SELECT count(*) FROM {letters}");
        assert_eq!(r.count(&sql).await, 0, "each region adopted only its own accounts");
    }
    // Restarted, a region adopts nothing again.
    let before = a.store.last_seq().await;
    let a = Region::reopen(a, &tables).await;
    a.drain().await;
    assert_eq!(a.store.last_seq().await, before);
}

/// A region rebuilt on an empty database under the same node id, after its peers trimmed
/// their logs, used to get nothing, ever: the stream reopened every two seconds and nothing
/// said why. The peer now says it at ERROR and in `weft status`, tells the region, and the
/// region re-seeds itself by snapshot from that peer, then catches up from the logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_rebuilt_empty_after_the_logs_were_trimmed_reseeds_itself_by_snapshot() {
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let sidecars = common::sidecars::Sidecars::new(dir.path()).await;
    sidecars.spawn_all().await;
    sidecars.write(0, 0, 40, 10).await;
    sidecars.assert_exactly_once(40).await;
    wait_trimmed(&sidecars.mesh.regions[0]).await;
    rebuild_empty(&sidecars, 1).await;
    sidecars.spawn(1, None).await;

    let east = &sidecars.mesh.regions[0];
    let log = sidecars.mesh.dir.join(format!("{}.log", east.region));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        let reported = said
            .lines()
            .filter(|l| l.contains("ERROR") && l.contains("needs east-1's events from seq 1"))
            .count();
        if reported > 0 {
            assert_eq!(reported, 1, "reported once, not at every redial");
            assert!(said.contains("re-seed by snapshot"), "{said}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "east never said west needs a re-seed:\n{said}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // west re-seeds from east by itself, then both write on: everything, exactly once.
    sidecars.assert_exactly_once(40).await;
    sidecars.write(0, 40, 20, 5).await;
    sidecars.write(1, 0, 10, 5).await;
    sidecars.assert_exactly_once(70).await;
    wait_log(&sidecars, 1, "joined the mesh").await;
    let west_log = sidecars.log(1);
    assert!(west_log.contains("joining the mesh by snapshot"), "{west_log}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = status_json(&east.config_file);
        let peers = status["peers"].as_array().unwrap();
        if peers.iter().all(|p| p["needs_reseed"].is_null()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "east still says a peer needs a re-seed: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sidecars.terminate_all();
}

/// A joining sidecar killed -9 in the middle of its snapshot resumes after the last chunk it
/// installed, not from the start, and still ends with every row exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_killed_in_the_middle_of_its_snapshot_resumes_where_it_stopped() {
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let replication = weft::config::ReplicationConfig {
        snapshot_page_rows: 100,
        ..Default::default()
    };
    let topology = weft::harness::loopback::LoopbackMesh::all_to_all(&["east", "west", "south"]);
    let sidecars = common::sidecars::Sidecars::with(dir.path(), topology, replication).await;
    sidecars.spawn_all().await;
    sidecars.write(0, 0, 3_000, 500).await;
    sidecars.assert_exactly_once(3_000).await;
    wait_trimmed(&sidecars.mesh.regions[0]).await;
    rebuild_empty(&sidecars, 1).await;
    sidecars.spawn(1, Some("after-snapshot-page:5")).await;
    let exited = sidecars.exit_status(1, Duration::from_secs(60)).await;
    assert!(
        exited.is_some_and(|s| !s.success()),
        "west never crashed in its snapshot"
    );

    // Between the two runs, the database says how far the join got.
    let west = &sidecars.mesh.regions[1];
    let status = status_json(&west.config_file);
    assert_eq!(status["joining"]["source"], "east-1", "{status}");
    // Five chunks installed: the empty tables before `items` send one each, then pages of it.
    let done = status["joining"]["rows_done"].as_u64().unwrap();
    assert!(done > 0 && done < 3_000 && done.is_multiple_of(100), "{status}");
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["status", "--config"])
        .arg(&west.config_file)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains(&format!("JOINING from east-1 by snapshot: {done}/3000 rows")),
        "{listed}"
    );

    sidecars.spawn(1, None).await;
    sidecars.assert_exactly_once(3_000).await;
    let started = Instant::now();
    let west_log = loop {
        let log = sidecars.log(1);
        if log.contains("joined the mesh") || started.elapsed() > Duration::from_secs(30) {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(west_log.matches("snapshot begins").count(), 1, "{west_log}");
    let joined = west_log.lines().find(|l| l.contains("joined the mesh")).unwrap();
    assert!(
        joined.contains(&format!("resumed_at={done}")) && joined.contains("rows=3000"),
        "{joined}"
    );
    assert!(status_json(&west.config_file)["joining"].is_null());
    sidecars.write(1, 0, 10, 5).await;
    sidecars.assert_exactly_once(3_010).await;
    sidecars.terminate_all();
}

/// Waits until `region` has drained every change and trimmed its whole log (every peer
/// acknowledged everything).
async fn wait_trimmed(region: &weft::harness::loopback::Region) {
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let kept: i64 =
            sqlx::query_scalar("SELECT (SELECT count(*) FROM _weft_log) + (SELECT count(*) FROM _weft_outbox)")
                .fetch_one(&region.app)
                .await
                .unwrap();
        if kept == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{} never trimmed its log", region.region);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Kills region `i`'s sidecar and rebuilds its database empty: the application's schema, no
/// rows, no weft metadata, the same node id in the config.
async fn rebuild_empty(sidecars: &common::sidecars::Sidecars, i: usize) {
    sidecars.kill9(i);
    let region = &sidecars.mesh.regions[i];
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
            .fetch_all(&region.app)
            .await
            .unwrap();
    for name in tables {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS \"{name}\"")))
            .execute(&region.app)
            .await
            .unwrap();
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(common::sidecars::SCHEMA.to_owned()))
        .execute(&region.app)
        .await
        .unwrap();
}

/// Waits until region `i`'s sidecar has logged `needle` (a line written just after the state
/// a test waits for may not be on disk yet).
async fn wait_log(sidecars: &common::sidecars::Sidecars, i: usize, needle: &str) {
    let started = std::time::Instant::now();
    while !sidecars.log(i).contains(needle) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "region {i} never logged `{needle}`:\n{}",
            sidecars.log(i)
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn status_json(config: &std::path::Path) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["status", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
}

/// A region whose database is restored from a copy taken earlier used to keep running, and
/// every peer dropped its new writes as duplicates (their seqs went back in time). Now it
/// captures nothing until a peer has confirmed its history; the first peer's Welcome shows it
/// went back, by how many of its own events; it numbers past them and re-seeds from that
/// peer, which brings those events back as rows. The writes made on the restored database
/// before its sidecar came back reach everyone, exactly once, as do later ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_restored_from_an_older_copy_recovers_its_events_and_loses_no_new_write() {
    use common::sidecars::Sidecars;
    let dir = tempfile::tempdir().unwrap();
    let mut sidecars = Sidecars::new(dir.path()).await;
    sidecars.spawn_all().await;
    sidecars.write(0, 0, 10, 5).await;
    sidecars.update_shared(0, 1, "before the backup").await;
    sidecars.assert_exactly_once(10).await;
    let backup = dir.path().join("east-backup.db");
    // Last night's backup, taken the way SQLite recommends while the database is in use.
    sidecars.back_up(0, &backup).await;
    sidecars.stop(0).await;
    sidecars.spawn(0, None).await;
    sidecars.write(0, 10, 10, 5).await;
    sidecars.update_shared(0, 1, "after the backup").await;
    sidecars.assert_exactly_once(20).await;
    sidecars.stop(0).await;
    sidecars.restore(0, &backup).await;
    // The application is back before its sidecar, and writes: new rows, and a row it had
    // changed after the backup, changed again (its second change since the backup: the same
    // count of changes as the one the others have, from an older state).
    sidecars.write(0, 20, 5, 5).await;
    sidecars.update_shared(0, 1, "after the restore").await;

    sidecars.spawn(0, None).await;
    sidecars.assert_exactly_once(25).await;
    wait_log(&sidecars, 0, "joined the mesh").await;
    let log = sidecars.log(0);
    assert!(
        log.contains("went back in time") && log.contains("Events 12..=22 (11 of them)"),
        "{log}"
    );
    assert!(log.contains("own events 12..=22 are in"), "{log}");
    assert!(sidecars.is_running(0));
    for region in &sidecars.mesh.regions {
        let v: String = sqlx::query_scalar("SELECT v FROM shared WHERE id = 1")
            .fetch_one(&region.app)
            .await
            .unwrap();
        assert_eq!(
            v, "after the restore",
            "{}: the latest write wins everywhere",
            region.region
        );
    }
    sidecars.write(0, 25, 5, 5).await;
    sidecars.write(1, 0, 5, 5).await;
    sidecars.assert_exactly_once(35).await;
    sidecars.terminate_all();
}

/// A snapshot carries a region's tables with everything that makes them a replica: row
/// versions and tombstones, CRDT state, owners, a queue row's siblings, and the frontiers it
/// is consistent with. Copied page by page (through the wire encoding) from SQLite into an
/// empty PostgreSQL region, and from that one into an empty SQLite region, each copy equals
/// its source, and catches up from the logs from the snapshot's frontiers with nothing
/// applied twice.
#[tokio::test]
async fn a_snapshot_copies_every_strategys_state_from_sqlite_to_postgresql_and_back() {
    use weft::crdt::CrdtType;
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let tables = vec![
        TableConfig::lww("items"),
        TableConfig::crdt("stock", &[("qty", CrdtType::Counter)]),
        TableConfig::owned_by_column("accounts", "home"),
        TableConfig::queue("contracts"),
    ];
    let names = ["items", "stock", "accounts", "contracts"];
    let lite = "CREATE TABLE items (id INTEGER PRIMARY KEY, v TEXT);
        CREATE TABLE stock (id INTEGER PRIMARY KEY, qty INTEGER NOT NULL);
        CREATE TABLE accounts (id INTEGER PRIMARY KEY, home TEXT NOT NULL, balance INTEGER);
        CREATE TABLE contracts (id INTEGER PRIMARY KEY, terms TEXT);";
    let pg = "CREATE TABLE items (id bigint PRIMARY KEY, v text);
        CREATE TABLE stock (id bigint PRIMARY KEY, qty bigint NOT NULL);
        CREATE TABLE accounts (id bigint PRIMARY KEY, home text NOT NULL, balance bigint);
        CREATE TABLE contracts (id bigint PRIMARY KEY, terms text);";
    let a = Region::sqlite(dir.path(), "a", lite, &tables).await;
    let c = Region::sqlite(dir.path(), "c", lite, &tables).await;
    a.exec(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 40)
         INSERT INTO items SELECT i, 'v' || i FROM n;
         INSERT INTO stock VALUES (1, 10);
         INSERT INTO accounts VALUES (1, 'region-of-a', 100), (2, 'region-of-a', 200);",
    )
    .await;
    sync(&[&a, &c]).await;
    a.exec("DELETE FROM items WHERE id <= 5; UPDATE stock SET qty = qty + 3 WHERE id = 1; INSERT INTO contracts VALUES (1, 'a terms');").await;
    c.exec("UPDATE stock SET qty = qty - 4 WHERE id = 1; INSERT INTO contracts VALUES (1, 'c terms');")
        .await;
    sync(&[&a, &c]).await;
    assert_eq!(
        a.count("SELECT count(*) FROM _weft_queue WHERE closed_at IS NULL")
            .await,
        1
    );

    let d = Region::pg(&cluster, "d", pg, &tables).await;
    let frontiers = copy_snapshot(&a.store, &d.store, 7).await;
    assert_eq!(
        frontiers,
        a.store
            .frontiers()
            .await
            .unwrap()
            .into_iter()
            .chain([("a".to_string(), a.store.last_seq().await)])
            .collect()
    );
    assert_eq!(d.snapshot(&names).await, a.snapshot(&names).await);
    assert_eq!(
        d.count("SELECT count(*) FROM weft.queue WHERE closed_at IS NULL").await,
        1,
        "the siblings came along"
    );
    assert_eq!(d.count("SELECT qty FROM stock WHERE id = 1").await, 9);
    assert_eq!(d.store.frontiers().await.unwrap().get("c"), frontiers.get("c"));
    assert!(
        d.store.join_state().await.unwrap().is_none(),
        "the last page ended the join"
    );

    // Catching up from the logs: what the snapshot holds is not applied again.
    let replay = d.pull(&a).await;
    assert_eq!((replay.applied, replay.duplicates), (0, 0), "{replay:?}");
    c.exec("UPDATE stock SET qty = qty + 1 WHERE id = 1; INSERT INTO items VALUES (100, 'after');")
        .await;
    a.exec("UPDATE accounts SET balance = 150 WHERE id = 1;").await;
    sync(&[&a, &c, &d]).await;
    assert_eq!(d.snapshot(&names).await, a.snapshot(&names).await);
    assert_eq!(
        d.count("SELECT qty FROM stock WHERE id = 1").await,
        10,
        "the counter merged, not overwritten"
    );

    // And back: an empty SQLite region seeded from the PostgreSQL one.
    let e = Region::sqlite(dir.path(), "e", lite, &tables).await;
    copy_snapshot(&d.store, &e.store, 1000).await;
    assert_eq!(e.snapshot(&names).await, d.snapshot(&names).await);
    assert_eq!(
        e.count("SELECT count(*) FROM _weft_queue WHERE closed_at IS NULL")
            .await,
        1
    );
    // Its own new writes descend from the copied versions: they replace, not conflict.
    e.exec("UPDATE items SET v = 'from e' WHERE id = 6;").await;
    sync(&[&a, &c, &d, &e]).await;
    assert_eq!(a.snapshot(&names).await, e.snapshot(&names).await);
    assert_eq!(
        a.count("SELECT count(*) FROM _weft_conflicts WHERE tbl = 'items'")
            .await,
        0
    );
}

/// Copies `from`'s snapshot into `to` as a join does, page by page through the wire
/// encoding; returns the snapshot's frontiers.
async fn copy_snapshot(
    from: &weft::store::Store,
    to: &weft::store::Store,
    page: usize,
) -> std::collections::BTreeMap<String, u64> {
    use weft::store::snapshot::{JoinState, SnapshotRow};
    let start = from.snapshot_start().await.unwrap();
    let mut state = JoinState {
        source: from.identity().node.clone(),
        frontiers: start.frontiers.clone(),
        rows_total: start.table_rows.values().sum(),
        ..JoinState::default()
    };
    for table in start.table_rows.keys() {
        let mut after = Vec::new();
        loop {
            let (rows, _) = from.snapshot_page(table, &after, page, usize::MAX).await.unwrap();
            let Some(last) = rows.last() else { break };
            after = last.row.key.to_bytes();
            let rows: Vec<SnapshotRow> = rows
                .into_iter()
                .map(|r| SnapshotRow {
                    row: weft::wire::event_from_proto(weft::wire::event_to_proto(&r.row)).unwrap(),
                    siblings: r
                        .siblings
                        .iter()
                        .map(|s| weft::wire::event_from_proto(weft::wire::event_to_proto(s)).unwrap())
                        .collect(),
                })
                .collect();
            state.table = table.clone();
            state.set_after_key(&after);
            state.rows_done += rows.len() as u64;
            let report = to
                .install_page(rows, Some(state.clone()), &state.frontiers)
                .await
                .unwrap();
            assert_eq!(report.dead_lettered, 0, "{report:?}");
            assert_eq!(to.join_state().await.unwrap().as_ref(), Some(&state));
        }
    }
    assert_eq!(state.rows_done, state.rows_total);
    to.install_page(Vec::new(), None, &state.frontiers).await.unwrap();
    start.frontiers
}

/// A sidecar that was down while its application committed one very large transaction (and
/// went on committing small ones) used to drain it as one batch: the whole transaction in
/// memory several times over, in one message, past the transport's limit from a few hundred
/// thousand rows. It now drains and ships it in bounded pieces: every row reaches every
/// region exactly once and no sidecar's memory grows with the transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_down_during_a_huge_transaction_catches_up_in_bounded_pieces() {
    const ROWS: i64 = 200_000;
    let dir = tempfile::tempdir().unwrap();
    let sidecars = common::sidecars::Sidecars::new(dir.path()).await;
    sidecars.spawn_all().await;
    sidecars.stop(0).await;
    // One transaction of ROWS rows of about 300 bytes, then small ones.
    let huge = format!(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {})
         INSERT INTO items (id, origin, v) SELECT i, printf('east-%0290d', i), i FROM n",
        ROWS - 1
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(huge))
        .execute(&sidecars.mesh.regions[0].app)
        .await
        .unwrap();
    sidecars.spawn(0, None).await;
    sidecars.write(0, ROWS, 100, 10).await;
    // Not a speed test (the benchmarks measure throughput): on two shared cores, with the
    // other tests of this file running beside it, shipping 200,000 rows twice takes minutes.
    sidecars
        .assert_exactly_once_within(ROWS + 100, std::time::Duration::from_secs(300))
        .await;
    for i in 0..3 {
        let peak = sidecars.peak_rss_mib(i);
        println!("{}: peak RSS {peak} MiB", sidecars.mesh.regions[i].region);
        assert!(peak < 256, "{}: peak RSS {peak} MiB", sidecars.mesh.regions[i].region);
    }
    sidecars.terminate_all();
}

/// A fourth node added to a running three-node mesh after their logs were trimmed: the new
/// topology file is checked against the old one (`weft topology check --against` says the
/// node joins), the running sidecars reload it on SIGHUP, and the new node, started empty,
/// joins by snapshot and gets everything, exactly once, then writes like the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_node_added_after_the_logs_were_trimmed_joins_by_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let topology = weft::harness::loopback::LoopbackMesh::all_to_all(&["east", "west", "south", "north"]);
    let sidecars = common::sidecars::Sidecars::with(dir.path(), topology, Default::default()).await;
    let four = sidecars.mesh.topology.clone();
    let mut three = four.clone();
    three.nodes.pop();
    let old_file = dir.path().join("three.toml");
    std::fs::write(&old_file, toml::to_string(&three).unwrap()).unwrap();
    std::fs::copy(&old_file, &sidecars.mesh.topology_file).unwrap();
    for i in 0..3 {
        sidecars.spawn(i, None).await;
    }
    sidecars.write(0, 0, 30, 10).await;
    sidecars.write(1, 0, 30, 10).await;
    // Every log trimmed: no node can relay the old events to the newcomer either.
    for region in &sidecars.mesh.regions[..3] {
        wait_trimmed(region).await;
    }

    std::fs::write(&sidecars.mesh.topology_file, toml::to_string(&four).unwrap()).unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["topology", "check"])
        .arg(&sidecars.mesh.topology_file)
        .arg("--against")
        .arg(&old_file)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        said.contains("north-1 (north) joins") && said.contains("east-1 streams to west-1, south-1, north-1"),
        "{said}"
    );
    for i in 0..3 {
        sidecars.signal(i, "HUP");
    }
    sidecars.spawn(3, None).await;
    sidecars.assert_exactly_once(60).await;
    wait_log(&sidecars, 3, "joined the mesh").await;
    let east = sidecars.log(0);
    assert!(east.contains("topology change: north-1 (north) joins"), "{east}");
    sidecars.write(3, 0, 10, 5).await;
    sidecars.write(2, 0, 10, 5).await;
    sidecars.assert_exactly_once(80).await;

    // And out again: once the others reload without north, they stop keeping logs for it.
    sidecars.kill9(3);
    std::fs::copy(&old_file, &sidecars.mesh.topology_file).unwrap();
    for i in 0..3 {
        sidecars.signal(i, "HUP");
    }
    sidecars.write(0, 30, 10, 5).await;
    wait_trimmed(&sidecars.mesh.regions[0]).await;
    sidecars.terminate_all();
}

/// A region down longer than its peers keep their logs (here one second) is not left to
/// redial forever: the log keeps to its limit with a WARN, and the region, when back, is
/// found behind it, told, and re-seeds by snapshot by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_down_longer_than_the_logs_are_kept_reseeds_when_it_returns() {
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let replication = weft::config::ReplicationConfig {
        log_retain_secs: 1,
        ..Default::default()
    };
    let topology = weft::harness::loopback::LoopbackMesh::all_to_all(&["east", "west", "south"]);
    let sidecars = common::sidecars::Sidecars::with(dir.path(), topology, replication).await;
    sidecars.spawn_all().await;
    sidecars.write(0, 0, 10, 5).await;
    sidecars.assert_exactly_once(10).await;
    sidecars.stop(1).await;
    sidecars.write(0, 10, 30, 5).await;
    let deadline = Instant::now() + Duration::from_secs(40);
    while !sidecars.log(0).contains("went past its retention limit") {
        assert!(Instant::now() < deadline, "east never held its log to the limit");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_trimmed(&sidecars.mesh.regions[0]).await;
    sidecars.spawn(1, None).await;
    sidecars.assert_exactly_once(40).await;
    wait_log(&sidecars, 1, "joined the mesh").await;
    sidecars.terminate_all();
}

/// Sends region `from`'s dials of region `to` through a proxy the test holds (a `[dial]`
/// entry in `from`'s config); returns the proxy.
async fn proxied(sidecars: &common::sidecars::Sidecars, from: usize, to: usize) -> common::proxy::Proxy {
    let node = &sidecars.mesh.regions[to].node_id;
    let address = sidecars.mesh.topology.node(node).unwrap().address.clone();
    let proxy = common::proxy::Proxy::start(&address).await;
    let config = &sidecars.mesh.regions[from].config_file;
    let mut text = std::fs::read_to_string(config).unwrap();
    text += &format!("\n[dial]\n\"{node}\" = \"{}\"\n", proxy.listen);
    std::fs::write(config, text).unwrap();
    proxy
}

/// Peers differ by the tail that was in flight when a region was lost. A region restored from
/// a backup used to trust the first peer that answered: west, which lacks east's last events,
/// answered first (the link to south held up here), east numbered its new writes after what
/// west had, and south, which had east's events under those numbers, dropped the new writes
/// as duplicates. East now waits for every peer's word (up to `history_wait_secs`) and numbers
/// after the most any of them has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_region_confirms_its_history_with_the_best_informed_peer() {
    use common::sidecars::Sidecars;
    let dir = tempfile::tempdir().unwrap();
    // No relay: west must not get east's last events from south while east is away.
    let replication = weft::config::ReplicationConfig {
        relay_after_ms: 0,
        ..Default::default()
    };
    let topology = weft::harness::loopback::LoopbackMesh::all_to_all(&["east", "west", "south"]);
    let mut sidecars = Sidecars::with(dir.path(), topology, replication).await;
    let east_to_south = proxied(&sidecars, 0, 2).await;
    let south_to_east = proxied(&sidecars, 2, 0).await;
    sidecars.spawn_all().await;
    sidecars.write(0, 0, 10, 5).await;
    sidecars.assert_exactly_once(10).await;
    let backup = dir.path().join("east-backup.db");
    sidecars.back_up(0, &backup).await;
    sidecars.write(0, 10, 10, 5).await;
    sidecars.wait_items(1, 20, "west never got east's rows").await;
    // West is away while east writes its last rows: only south has them.
    sidecars.stop(1).await;
    sidecars.write(0, 20, 10, 5).await;
    sidecars.wait_items(2, 30, "south never got east's last rows").await;
    sidecars.stop(0).await;
    sidecars.restore(0, &backup).await;

    // South is slow to answer; west is back at once.
    east_to_south.stall();
    south_to_east.stall();
    sidecars.spawn(1, None).await;
    sidecars.write(0, 30, 5, 5).await;
    // East's log runs on from its first life: only what it says from here on counts.
    let before = sidecars.log(0).len();
    sidecars.spawn(0, None).await;
    wait_log(&sidecars, 0, "went back in time").await;
    let started = std::time::Instant::now();
    loop {
        let log = sidecars.log(0)[before..].to_owned();
        if log.contains("history; capturing") {
            // It trusted west alone: its new writes are numbered and reach west.
            sidecars.wait_items(1, 25, "west never got east's new rows").await;
            break;
        }
        if log.contains("waits for south-1") {
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(20), "{log}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    east_to_south.resume();
    south_to_east.resume();
    sidecars
        .wait_items(2, 35, "south lacks east's writes made after the restore")
        .await;
    sidecars.assert_exactly_once(35).await;
    let log = sidecars.log(0);
    assert!(log.contains("own events 11..=30 are in south-1's copy"), "{log}");
    sidecars.terminate_all();
}

/// The events of `origin` still in region `at`'s log.
async fn logged_of(sidecars: &common::sidecars::Sidecars, at: usize, origin: usize) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM _weft_log WHERE origin = ?")
        .bind(&sidecars.mesh.regions[origin].node_id)
        .fetch_one(&sidecars.mesh.regions[at].app)
        .await
        .unwrap()
}

/// Waits until region `at`'s database records that region `peer` has region `origin`'s
/// events up to `seq`.
async fn wait_acked(sidecars: &common::sidecars::Sidecars, at: usize, peer: usize, origin: usize, seq: i64) {
    let regions = &sidecars.mesh.regions;
    let started = std::time::Instant::now();
    loop {
        let acked: Option<i64> = sqlx::query_scalar("SELECT seq FROM _weft_acks WHERE peer = ? AND origin = ?")
            .bind(&regions[peer].node_id)
            .bind(&regions[origin].node_id)
            .fetch_optional(&regions[at].app)
            .await
            .unwrap();
        if acked >= Some(seq) {
            return;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{} never heard that {} has {}'s events up to {seq}: {acked:?}",
            regions[at].region,
            regions[peer].region,
            regions[origin].region
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A region lost for good is taken out of the topology while another survivor is down. The
/// survivors used to drop the leaver's events from their logs at the reload and refuse them
/// from each other, so the one that was down never got the leaver's last writes. They now
/// keep them until every remaining node has them, pass them on when asked, and `weft topology
/// check --against` says who lacks what before the reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_region_s_last_events_reach_a_survivor_that_was_down() {
    let dir = tempfile::tempdir().unwrap();
    let topology = weft::harness::loopback::LoopbackMesh::all_to_all(&["east", "west", "south", "north"]);
    let sidecars = common::sidecars::Sidecars::with(dir.path(), topology, Default::default()).await;
    let four_file = dir.path().join("four.toml");
    std::fs::copy(&sidecars.mesh.topology_file, &four_file).unwrap();
    let mut three = sidecars.mesh.topology.clone();
    three.nodes.pop();
    let three_file = dir.path().join("three.toml");
    std::fs::write(&three_file, toml::to_string(&three).unwrap()).unwrap();
    sidecars.spawn_all().await;
    sidecars.write(3, 0, 10, 5).await;
    sidecars.assert_exactly_once(10).await;
    // East knows what the others have from their acknowledgements and heartbeats.
    wait_acked(&sidecars, 0, 2, 3, 10).await;
    sidecars.stop(2).await;
    sidecars.write(3, 10, 100, 20).await;
    sidecars.wait_items(0, 110, "east never got north's rows").await;
    wait_acked(&sidecars, 0, 1, 3, 110).await;
    sidecars.kill9(3);

    let check = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["topology", "check"])
        .arg(&three_file)
        .arg("--against")
        .arg(&four_file)
        .arg("--config")
        .arg(&sidecars.mesh.regions[0].config_file)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    std::fs::copy(&three_file, &sidecars.mesh.topology_file).unwrap();
    for i in 0..2 {
        sidecars.signal(i, "HUP");
    }
    // Past a retention pass of the reloaded survivors (every 10 s).
    tokio::time::sleep(std::time::Duration::from_secs(11)).await;
    sidecars.spawn(2, None).await;
    sidecars
        .wait_items(
            2,
            110,
            "south never got the last events of north, which left while it was down",
        )
        .await;
    assert!(said.contains("south-1 lacks north-1's events 11..=110"), "{said}");
    let started = std::time::Instant::now();
    while logged_of(&sidecars, 0, 3).await > 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "east kept north's events after every remaining node had them"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    sidecars.terminate_all();
}

async fn count_in(sidecars: &common::sidecars::Sidecars, i: usize, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&sidecars.mesh.regions[i].app)
        .await
        .unwrap()
}

async fn exec_in(sidecars: &common::sidecars::Sidecars, i: usize, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&sidecars.mesh.regions[i].app)
        .await
        .unwrap();
}

/// A snapshot join hands over the source's dead letters. A star with hub west: east adds a
/// column and writes a row naming it, which waits at west as a dead letter; south (migrated
/// already) is down longer than the logs are kept and re-seeds from west. Once west adds the
/// column too, the row is in every region, south included. Before, south's frontier of east
/// was raised past the row's event while west's copy lacked the row: south never got it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_join_carries_the_source_s_dead_letters() {
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let replication = weft::config::ReplicationConfig {
        log_retain_secs: 1,
        ..Default::default()
    };
    let mut topology = weft::harness::loopback::LoopbackMesh::all_to_all(&["east", "west", "south"]);
    topology.shape = weft::config::Shape::Star;
    topology.hub = Some("west-1".into());
    let sidecars = common::sidecars::Sidecars::with(dir.path(), topology, replication).await;
    sidecars.spawn_all().await;
    sidecars.write(0, 0, 10, 5).await;
    sidecars.assert_exactly_once(10).await;
    exec_in(&sidecars, 2, "ALTER TABLE shared ADD COLUMN extra TEXT").await;
    sidecars.stop(2).await;

    exec_in(&sidecars, 0, "ALTER TABLE shared ADD COLUMN extra TEXT").await;
    exec_in(&sidecars, 0, "INSERT INTO shared (id, v, extra) VALUES (900, 'k', 'e')").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while count_in(
        &sidecars,
        1,
        "SELECT count(*) FROM _weft_dead_letters WHERE key = '[900]'",
    )
    .await
        == 0
    {
        assert!(Instant::now() < deadline, "west never dead-lettered the row");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sidecars.write(0, 10, 30, 5).await;
    sidecars.write(1, 0, 10, 5).await;
    let deadline = Instant::now() + Duration::from_secs(40);
    while !sidecars.log(1).contains("went past its retention limit") {
        assert!(Instant::now() < deadline, "west never held its log to the limit");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_trimmed(&sidecars.mesh.regions[1]).await;
    sidecars.spawn(2, None).await;
    wait_log(&sidecars, 2, "joined the mesh").await;

    exec_in(&sidecars, 1, "ALTER TABLE shared ADD COLUMN extra TEXT").await;
    for i in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(60);
        while count_in(
            &sidecars,
            i,
            "SELECT count(*) FROM shared WHERE id = 900 AND extra = 'e'",
        )
        .await
            != 1
        {
            assert!(
                Instant::now() < deadline,
                "region {i} never got the row:\n{}",
                sidecars.log(i)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    sidecars.assert_exactly_once(50).await;
    sidecars.terminate_all();
}

/// A join's sweep deletes a row the joiner holds and the source lacks with a version below
/// the source's purge floor: the source deleted it and purged the tombstone. A row the source
/// lacks because it holds the row's event as a dead letter (handed over before any row) is no
/// such delete, and stays. Before, it was deleted like a purged one.
#[tokio::test]
async fn a_join_never_sweeps_a_row_its_source_holds_as_a_dead_letter() {
    use weft::store::snapshot::{JoinState, Sweep};
    let dir = tempfile::tempdir().unwrap();
    let tables = lww(&["items"]);
    let schema = "CREATE TABLE items (id INTEGER PRIMARY KEY, v TEXT);";
    let joiner = Region::sqlite(dir.path(), "j", schema, &tables).await;
    joiner
        .exec("INSERT INTO items VALUES (1, 'waits at the source'), (2, 'purged at the source')")
        .await;
    joiner.drain().await;
    let events = joiner.events(0).await;
    let letter = weft::store::backend::CopiedLetter {
        id: 0,
        origin: "j".into(),
        seq: events[0].seq,
        table: "items".into(),
        key: "[1]".into(),
        reason: "column `extra` does not exist".into(),
        cause: "shape".into(),
        event: weft::wire::encode_event(&events[0]),
    };
    assert_eq!(
        joiner.store.copy_letters(std::slice::from_ref(&letter)).await.unwrap(),
        1
    );
    assert_eq!(joiner.store.copy_letters(&[letter]).await.unwrap(), 0, "kept once");
    let floor = weft::version::VersionVector::from_json(r#"{"j":100}"#).unwrap();
    let state = JoinState {
        source: "s".into(),
        table: "items".into(),
        ..JoinState::default()
    };
    let sweep = Sweep {
        table: "items".into(),
        after: Vec::new(),
        upto: None,
        keys: Default::default(),
        floor,
    };
    joiner
        .store
        .install_page_swept(Vec::new(), Some(state.clone()), &state.frontiers, sweep)
        .await
        .unwrap();
    assert_eq!(joiner.count("SELECT count(*) FROM items WHERE id = 1").await, 1, "kept");
    assert_eq!(
        joiner.count("SELECT count(*) FROM items WHERE id = 2").await,
        0,
        "swept"
    );
}
