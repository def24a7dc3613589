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

/// A region rebuilt on an empty database (same node id) after the others trimmed their logs
/// cannot catch up from them. It used to be redialled every few seconds at INFO, with
/// nothing saying why; now the node that cannot serve it says so once, at ERROR, with what to
/// do, and `weft status` shows it, until the region is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_rebuilt_empty_after_the_logs_were_trimmed_is_reported_as_needing_a_reseed() {
    use std::time::{Duration, Instant};

    use common::sidecars::{SCHEMA, Sidecars};
    let dir = tempfile::tempdir().unwrap();
    let sidecars = Sidecars::new(dir.path()).await;
    sidecars.spawn_all().await;
    sidecars.write(0, 0, 40, 10).await;
    sidecars.assert_exactly_once(40).await;
    let east = &sidecars.mesh.regions[0];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM _weft_log")
            .fetch_one(&east.app)
            .await
            .unwrap();
        if kept == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "east never trimmed its log");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // west is lost and rebuilt on an empty database, under the same node id.
    sidecars.kill9(1);
    let west = &sidecars.mesh.regions[1];
    let objects: Vec<(String, String)> = sqlx::query_as(
        "SELECT type, name FROM sqlite_master WHERE type IN ('table', 'trigger') AND name NOT LIKE 'sqlite_%'",
    )
    .fetch_all(&west.app)
    .await
    .unwrap();
    for (kind, name) in objects.iter().filter(|(kind, _)| kind == "table") {
        let sql = format!("DROP {} IF EXISTS \"{name}\"", kind.to_uppercase());
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&west.app)
            .await
            .unwrap();
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(SCHEMA.to_owned()))
        .execute(&west.app)
        .await
        .unwrap();
    sidecars.spawn(1, None).await;

    let log = sidecars.mesh.dir.join(format!("{}.log", east.region));
    let status = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
            .args(["status", "--json", "--config"])
            .arg(&east.config_file)
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        let reported = said
            .lines()
            .filter(|l| l.contains("ERROR") && l.contains("needs east-1's events from seq 1"))
            .count();
        let shown = status()["peers"].as_array().unwrap().iter().any(|p| {
            p["peer"] == "west-1"
                && p["needs_reseed"]
                    .as_str()
                    .is_some_and(|n| n.contains("copy of a current region"))
        });
        if reported > 0 && shown {
            assert_eq!(reported, 1, "reported once, not at every redial");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "east never said west needs a re-seed:\n{said}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sidecars.terminate_all();
}

/// A region whose database is restored from a copy taken earlier used to keep running, and
/// every peer dropped its new writes as duplicates (their seqs went back in time). On its
/// first connection it now learns from a peer that its database went back, says by how many
/// of its own events, and stops, before any new write can be lost that way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_restored_from_an_older_copy_stops_before_losing_new_writes() {
    use std::time::Duration;

    use common::sidecars::Sidecars;
    let dir = tempfile::tempdir().unwrap();
    let sidecars = Sidecars::new(dir.path()).await;
    sidecars.spawn_all().await;
    sidecars.write(0, 0, 10, 5).await;
    sidecars.assert_exactly_once(10).await;
    let east = &sidecars.mesh.regions[0];
    let backup = dir.path().join("east-backup.db");
    let stop_east = || async {
        sidecars.signal(0, "TERM");
        let stopped = sidecars.exit_status(0, Duration::from_secs(20)).await;
        assert!(stopped.is_some_and(|s| s.success()), "{stopped:?}");
    };
    // Last night's backup, taken the way SQLite recommends while the database is in use.
    let take = format!("VACUUM INTO '{}'", backup.display());
    sqlx::raw_sql(sqlx::AssertSqlSafe(take))
        .execute(&east.app)
        .await
        .unwrap();
    stop_east().await;
    sidecars.spawn(0, None).await;
    sidecars.write(0, 10, 10, 5).await;
    sidecars.assert_exactly_once(20).await;
    stop_east().await;
    east.app.close().await;
    std::fs::copy(&backup, &east.db).unwrap();
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", east.db.display()));
    }

    sidecars.spawn(0, None).await;
    let exited = sidecars.exit_status(0, Duration::from_secs(30)).await;
    assert!(
        exited.is_some_and(|s| !s.success()),
        "the restored region kept running: {exited:?}"
    );
    sidecars.kill9(0);
    let log = std::fs::read_to_string(sidecars.mesh.dir.join(format!("{}.log", east.region))).unwrap();
    assert!(
        log.contains("went back in time") && log.contains("Events 11..=20 (10 of them)"),
        "{log}"
    );
    for region in &sidecars.mesh.regions[1..] {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM items")
            .fetch_one(&region.app)
            .await
            .unwrap();
        assert_eq!(rows, 20, "{}: nothing the others had is lost", region.region);
    }
    sidecars.terminate_all();
}
