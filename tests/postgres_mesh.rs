//! Mixed meshes of real `weft run` processes: a SQLite region and two PostgreSQL regions
//! (on a throw-away cluster the test starts) converge under concurrent writes (a CRDT
//! counter decremented in every region among them), and nothing
//! is lost or applied twice when a PostgreSQL sidecar is killed mid-apply or when the
//! database server restarts mid-stream; a ring relays through PostgreSQL regions.
mod common;

use std::time::{Duration, Instant};

use common::mixed::{Kind, Mesh};

const KINDS: [Kind; 3] = [Kind::Sqlite, Kind::Postgres, Kind::Postgres];

/// Every region writes `rounds` transactions of 10 items from `first`, all at once.
async fn write_everywhere(mesh: &Mesh, first: i64, rounds: i64) {
    let writers = (0..mesh.regions.len()).map(|i| async move {
        for round in 0..rounds {
            mesh.write(i, first + round * 10, 10).await.unwrap();
        }
    });
    futures_util::future::join_all(writers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_region_and_two_postgres_regions_converge() {
    let mesh = Mesh::new(&KINDS).await;
    mesh.spawn_all().await;
    mesh.exec(1, "INSERT INTO stock VALUES (2, 1000)").await.unwrap();
    mesh.wait_converged(Duration::from_secs(30)).await;
    // Items everywhere, and every region takes stock from the same CRDT counter meanwhile.
    let take_stock = (0..mesh.regions.len()).map(|i| {
        let mesh = &mesh;
        async move {
            for _ in 0..20 {
                mesh.exec(i, "UPDATE stock SET qty = qty - 1 WHERE id = 2")
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    tokio::join!(
        write_everywhere(&mesh, 0, 30),
        futures_util::future::join_all(take_stock)
    );
    mesh.wait_converged(Duration::from_secs(60)).await;
    mesh.assert_exactly_once(3 * 300).await;
    for i in 0..mesh.regions.len() {
        assert_eq!(
            mesh.snapshot(i).await["stock"],
            vec!["1 | -900".to_string(), "2 | 940".to_string()],
            "r{i}: 1000 - 3 x 20, every decrement counted once"
        );
    }
    // `weft status` reads a PostgreSQL region while its sidecar serves it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["status", "--json", "--config"])
        .arg(&mesh.regions[1].config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["node"], "r1");
    assert_eq!(status["outbox_pending"], 0);
    let frontiers = status["frontiers"].as_array().unwrap();
    assert_eq!(frontiers.len(), 2, "{status}");
    mesh.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_sidecar_killed_mid_apply_loses_nothing() {
    let mesh = Mesh::new(&KINDS).await;
    mesh.spawn(0, None).await;
    mesh.spawn(1, Some("after-apply:3")).await;
    mesh.spawn(2, None).await;
    // r0 writes until r1 dies right after an apply commit, before acknowledging it.
    let started = Instant::now();
    let mut written = 0;
    while mesh.exited(1).is_none() {
        assert!(started.elapsed() < Duration::from_secs(60), "crash point never reached");
        mesh.write(0, written, 10).await.unwrap();
        written += 10;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Meanwhile the other PostgreSQL region keeps writing too.
    mesh.write(2, 0, 10).await.unwrap();
    mesh.spawn(1, None).await;
    // And a few more external kill -9s under load.
    for round in 0..3 {
        mesh.write(0, written, 10).await.unwrap();
        mesh.write(1, round * 10, 10).await.unwrap();
        written += 10;
        tokio::time::sleep(Duration::from_millis(100 + 70 * round as u64)).await;
        mesh.kill9(2);
        mesh.write(0, written, 10).await.unwrap();
        written += 10;
        mesh.spawn(2, None).await;
    }
    mesh.wait_converged(Duration::from_secs(60)).await;
    mesh.assert_exactly_once(written + 30 + 10).await;
    mesh.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_mid_stream_loses_nothing() {
    let mesh = Mesh::new(&KINDS).await;
    mesh.spawn_all().await;
    write_everywhere(&mesh, 0, 10).await;
    let cluster = mesh.cluster.as_ref().unwrap();
    // The server goes down while the SQLite region keeps writing; PostgreSQL applications
    // retry their transactions until it is back.
    cluster.stop("fast").unwrap();
    let mut written = 100;
    for _ in 0..10 {
        mesh.write(0, written, 10).await.unwrap();
        written += 10;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.restart().unwrap();
    for i in 1..3 {
        let mut first = 100;
        while first < written {
            match mesh.write(i, first, 10).await {
                Ok(()) => first += 10,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    // A crash-like stop too: recovery runs at the next start.
    cluster.stop("immediate").unwrap();
    cluster.restart().unwrap();
    write_everywhere(&mesh, written, 5).await;
    written += 50;
    mesh.wait_converged(Duration::from_secs(90)).await;
    mesh.assert_exactly_once(3 * written).await;
    let log = std::fs::read_to_string(mesh.log(1)).unwrap();
    assert!(
        log.contains("connecting to PostgreSQL"),
        "the sidecar should log its reconnect: {log}"
    );
    mesh.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_relayed_by_postgres_regions_converges() {
    // r0 -> r1 -> r2 -> r3 -> r0: every PostgreSQL region relays the others' events.
    let kinds = [Kind::Sqlite, Kind::Postgres, Kind::Postgres, Kind::Sqlite];
    let mesh = Mesh::shaped(&kinds, "shape = \"ring\"").await;
    mesh.spawn_all().await;
    write_everywhere(&mesh, 0, 10).await;
    // A relaying PostgreSQL sidecar dies mid-stream and comes back.
    mesh.kill9(1);
    write_everywhere(&mesh, 100, 5).await;
    mesh.spawn(1, None).await;
    mesh.wait_converged(Duration::from_secs(60)).await;
    mesh.assert_exactly_once(4 * 150).await;
    mesh.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_whose_commit_reply_is_lost_loses_nothing() {
    // r1's second drain commits, but the sidecar is told it failed. Its events must still
    // be sent, and the next drain must not reuse their seqs (once peers have acknowledged
    // and the log was trimmed, a reused seq would be skipped as a duplicate everywhere).
    let mesh = Mesh::new(&KINDS).await;
    mesh.spawn(0, None).await;
    mesh.spawn(1, Some("pg-drain-reply-lost:2")).await;
    mesh.spawn(2, None).await;
    for round in 0..6 {
        mesh.write(1, round * 10, 10).await.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    mesh.wait_converged(Duration::from_secs(60)).await;
    mesh.assert_exactly_once(60).await;
    let log = std::fs::read_to_string(mesh.log(1)).unwrap();
    assert!(log.contains("failpoint pg-drain-reply-lost reached"), "{log}");
    mesh.terminate_all();
}

/// A PostgreSQL region whose cluster is restored from last night's base backup
/// (`pg_basebackup`) went back in time under its sidecar. It learns it from its peer before
/// capturing anything, numbers past what the peer has, and re-seeds from it: the writes it
/// lost come back, and those its application made on the restored database reach everyone,
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_region_restored_from_a_base_backup_recovers_and_loses_no_new_write() {
    let mesh = Mesh::new(&[Kind::Sqlite, Kind::Postgres]).await;
    mesh.spawn_all().await;
    mesh.write(1, 0, 10).await.unwrap();
    mesh.wait_converged(Duration::from_secs(30)).await;
    let cluster = mesh.cluster.as_ref().unwrap();
    let backup = cluster.base_backup("nightly").unwrap();
    mesh.write(1, 10, 10).await.unwrap();
    mesh.write(0, 100, 10).await.unwrap();
    mesh.wait_converged(Duration::from_secs(30)).await;

    mesh.signal(1, "TERM");
    let started = Instant::now();
    while mesh.exited(1).is_none() {
        assert!(started.elapsed() < Duration::from_secs(20), "r1 did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.restore(&backup).unwrap();
    cluster.wait_ready(Duration::from_secs(30)).await.unwrap();
    mesh.write_surely(1, 20, 10).await;
    mesh.spawn(1, None).await;
    mesh.wait_converged(Duration::from_secs(60)).await;
    mesh.assert_exactly_once(40).await;
    let started = Instant::now();
    let log = loop {
        let log = std::fs::read_to_string(mesh.log(1)).unwrap();
        if log.contains("joined the mesh") || started.elapsed() > Duration::from_secs(20) {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(log.contains("went back in time"), "{log}");
    assert!(log.contains("joined the mesh"), "{log}");
    mesh.terminate_all();
}
