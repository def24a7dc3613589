//! Tombstone GC on real `weft run` processes (issue 13): a tombstone is purged only below the
//! causal stability horizon, so a write concurrent with the delete that is still on its way
//! holds it back and then resolves the same in every region; a row re-inserted after its
//! tombstone was purged replaces it in a region that still keeps it; and under insert/delete
//! churn the row metadata stays proportional to the live rows.
mod common;

use std::time::{Duration, Instant};

use common::sidecars::Sidecars;
use weft::config::ReplicationConfig;
use weft::harness::loopback::LoopbackMesh;

async fn gc_mesh(dir: &std::path::Path) -> Sidecars {
    let replication = ReplicationConfig {
        tombstone_gc_secs: 1,
        ..Default::default()
    };
    Sidecars::with(dir, LoopbackMesh::all_to_all(&["east", "west", "south"]), replication).await
}

async fn scalar(s: &Sidecars, i: usize, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&s.mesh.regions[i].app)
        .await
        .unwrap()
}

async fn exec(s: &Sidecars, i: usize, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&s.mesh.regions[i].app)
        .await
        .unwrap();
}

/// Tombstones of `shared` in region `i`.
async fn tombstones(s: &Sidecars, i: usize) -> i64 {
    scalar(s, i, "SELECT count(*) FROM _weft_rows WHERE tbl = 'shared' AND deleted").await
}

async fn wait_for(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_write_in_flight_holds_the_purge_back_and_resolves_the_same_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let s = gc_mesh(dir.path()).await;
    s.spawn_all().await;
    for id in 1..=3 {
        s.update_shared(0, id, "first").await;
    }
    s.mesh.wait_converged(Duration::from_secs(30)).await.unwrap();

    // South writes rows 1 and 2 while its sidecar is frozen: the writes are committed but
    // nobody has them. East deletes all three rows meanwhile, concurrently.
    s.pause_idle(2).await;
    s.update_shared(2, 1, "south, before the delete").await;
    s.update_shared(2, 2, "south, before the delete").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    exec(&s, 0, "DELETE FROM shared").await;
    wait_for("west has the tombstones", Duration::from_secs(10), async || {
        tombstones(&s, 1).await == 3
    })
    .await;
    // Several GC rounds: nothing is purged while south's writes are on their way.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!((tombstones(&s, 0).await, tombstones(&s, 1).await), (3, 3));

    s.signal(2, "CONT");
    s.mesh.wait_converged(Duration::from_secs(30)).await.unwrap();
    // The delete came later (its HLC is above the writes'): deleted everywhere.
    for i in 0..3 {
        assert_eq!(scalar(&s, i, "SELECT count(*) FROM shared").await, 0, "region {i}");
    }
    wait_for("every tombstone purged", Duration::from_secs(30), async || {
        let mut left = 0;
        for i in 0..3 {
            left += tombstones(&s, i).await;
        }
        left == 0
    })
    .await;
    s.mesh.wait_converged(Duration::from_secs(30)).await.unwrap();
    s.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_reinserted_after_the_purge_replaces_the_tombstone_a_region_still_keeps() {
    let dir = tempfile::tempdir().unwrap();
    let s = gc_mesh(dir.path()).await;
    // West keeps its tombstones.
    let west = &s.mesh.regions[1].config_file;
    let text = std::fs::read_to_string(west).unwrap();
    std::fs::write(west, text.replace("tombstone_gc_secs = 1", "tombstone_gc_secs = 0")).unwrap();
    s.spawn_all().await;
    s.update_shared(0, 7, "first").await;
    s.mesh.wait_converged(Duration::from_secs(30)).await.unwrap();
    exec(&s, 2, "DELETE FROM shared WHERE id = 7").await;
    wait_for("east purged the tombstone", Duration::from_secs(30), async || {
        tombstones(&s, 1).await == 1 && tombstones(&s, 0).await == 0
    })
    .await;

    s.update_shared(0, 7, "again").await;
    s.mesh.wait_converged(Duration::from_secs(30)).await.unwrap();
    for i in 0..3 {
        let v: Option<String> = sqlx::query_scalar("SELECT v FROM shared WHERE id = 7")
            .fetch_optional(&s.mesh.regions[i].app)
            .await
            .unwrap();
        assert_eq!(v.as_deref(), Some("again"), "region {i}");
    }
    s.terminate_all();
}

/// Inserts and deletes rows in every region for `WEFT_SOAK_SECS` (default 60) seconds and
/// samples the row metadata: it stays near the live rows, tombstones included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_delete_churn_the_row_metadata_stays_proportional_to_the_live_rows() {
    let secs: u64 = std::env::var("WEFT_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let dir = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(gc_mesh(dir.path()).await);
    s.spawn_all().await;
    const BATCH: i64 = 50;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for i in 0..3usize {
        let (s, stop) = (s.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut round = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let base = (i as i64) * 1_000_000_000 + round * BATCH;
                let mut tx = s.mesh.regions[i].app.begin().await.unwrap();
                for id in base..base + BATCH {
                    sqlx::query("INSERT INTO shared (id, v) VALUES (?, 'churn')")
                        .bind(id)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                }
                // Keep two batches live: delete the one before the last.
                sqlx::query("DELETE FROM shared WHERE id >= ? AND id < ?")
                    .bind(base - 2 * BATCH)
                    .bind(base - BATCH)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                round += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            round
        }));
    }
    let started = Instant::now();
    let mut peak = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak = peak.max(scalar(&s, 0, "SELECT count(*) FROM _weft_rows WHERE tbl = 'shared'").await);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut rounds = 0;
    for writer in writers {
        rounds += writer.await.unwrap();
    }
    s.mesh.wait_converged(Duration::from_secs(60)).await.unwrap();
    let live = scalar(&s, 0, "SELECT count(*) FROM shared").await;
    let deleted = rounds * BATCH - live;
    let mut settled = 0;
    wait_for(
        "the tombstones purged after the churn",
        Duration::from_secs(30),
        async || {
            settled = scalar(&s, 0, "SELECT count(*) FROM _weft_rows WHERE tbl = 'shared'").await;
            settled == live
        },
    )
    .await;
    println!(
        "delete churn for {secs} s: {} rows inserted, {deleted} deleted, {live} live; row metadata peaked at \
         {peak} entries, {settled} after the churn",
        rounds * BATCH
    );
    assert!(
        deleted > 10 * live,
        "the churn deleted too little to show anything: {deleted}"
    );
    // Tombstones live a few GC rounds: far below what was deleted.
    assert!(
        peak < live + deleted / 5,
        "metadata peaked at {peak} with {live} live rows, {deleted} deleted"
    );
    s.terminate_all();
}

/// East is restored from a backup taken before rows were deleted whose tombstones every
/// region has since purged. Its re-seed snapshot cannot carry tombstones that no longer
/// exist; the source's purge floor shows those rows were deleted, so the joiner deletes them
/// too instead of keeping them (and the audit, which counts a missing row under a purge floor
/// as deleted, finds nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_restored_from_before_purged_deletes_does_not_bring_the_rows_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = gc_mesh(dir.path()).await;
    s.spawn_all().await;
    for id in 1..=5 {
        s.update_shared(0, id, "doomed").await;
    }
    s.update_shared(1, 100, "kept").await;
    s.mesh.wait_converged(Duration::from_secs(30)).await.unwrap();
    let backup = dir.path().join("east-backup.db");
    s.back_up(0, &backup).await;
    // After the backup: east writes (so its restored database is behind its peers), west
    // deletes the rows, and every region purges their tombstones.
    s.write(0, 0, 5, 5).await;
    exec(&s, 1, "DELETE FROM shared WHERE id <= 5").await;
    wait_for("every tombstone purged", Duration::from_secs(30), async || {
        let mut left = 0;
        for i in 0..3 {
            left += tombstones(&s, i).await + scalar(&s, i, "SELECT count(*) FROM shared WHERE id <= 5").await;
        }
        left == 0
    })
    .await;
    s.stop(0).await;
    s.restore(0, &backup).await;
    assert_eq!(
        scalar(&s, 0, "SELECT count(*) FROM shared WHERE id <= 5").await,
        5,
        "the backup has them"
    );
    s.spawn(0, None).await;
    s.assert_exactly_once(5).await;
    for i in 0..3 {
        assert_eq!(
            scalar(&s, i, "SELECT count(*) FROM shared WHERE id <= 5").await,
            0,
            "region {i} brought purged rows back"
        );
        assert_eq!(
            scalar(&s, i, "SELECT count(*) FROM shared WHERE id = 100").await,
            1,
            "region {i}"
        );
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["audit", "--json", "--config"])
        .arg(&s.mesh.regions[1].config_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    s.terminate_all();
}
