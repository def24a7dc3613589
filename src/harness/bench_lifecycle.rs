//! `weft bench --join-rows N` and `weft bench --big-txn N`: the figures of a region's life
//! beyond the steady state, on loopback SQLite.
//!
//! - Join: region0 holds N rows of about 300 bytes, drained and acknowledged by region1, and
//!   its log trimmed, before region1 comes up empty (rebuilt): region1 learns it is behind the
//!   log, re-seeds by snapshot and catches up. The figure is rows per second of the snapshot,
//!   and the time until both regions compare equal.
//! - Big transaction: three regions run; region0's application commits one transaction of N
//!   such rows while it keeps committing small ones. The figures are the time until every
//!   region has every row and the process's peak resident memory (all three sidecars and
//!   the writer share it, so each sidecar's is below that).
use std::time::{Duration, Instant};

use crate::config::{ReplicationConfig, TableConfig};
use crate::harness::loopback::LoopbackMesh;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS bench (id INTEGER PRIMARY KEY, origin TEXT NOT NULL, n INTEGER NOT NULL, payload TEXT NOT NULL);";

/// One statement inserting `rows` rows of about 300 bytes with ids from `first`.
fn rows_sql(first: i64, rows: i64) -> String {
    format!(
        "WITH RECURSIVE s(i) AS (SELECT {first} UNION ALL SELECT i + 1 FROM s WHERE i < {last}) \
         INSERT INTO bench (id, origin, n, payload) SELECT i, 'region0', i & 65535, printf('%0270d', i) FROM s",
        last = first + rows - 1
    )
}

/// Starts this process's peak resident memory afresh (Linux; nothing elsewhere): the
/// figures count what happens from here, not the harness's own comparisons before.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// This process's peak resident memory so far, in MiB (Linux `VmHWM`; 0 elsewhere).
fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

/// An all-to-all loopback mesh of `regions` with the bench table, not started.
async fn mesh(dir: &std::path::Path, regions: &[&str]) -> anyhow::Result<LoopbackMesh> {
    let tables = [TableConfig::lww("bench")];
    LoopbackMesh::create(
        dir,
        &LoopbackMesh::all_to_all(regions),
        SCHEMA,
        &tables,
        &ReplicationConfig::default(),
    )
    .await
}

/// Waits until every region holds `rows` rows.
async fn wait_rows(mesh: &LoopbackMesh, rows: i64) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let mut done = true;
        for region in &mesh.regions {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM bench")
                .fetch_one(&region.app)
                .await?;
            done &= n == rows;
        }
        if done {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(3600),
            "the regions never got every row"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn join(rows: i64, dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    let (dir, _temp) = super::work_dir(dir)?;
    let mut mesh = mesh(&dir, &["region0", "region1"]).await?;
    println!("weft bench: snapshot join of {rows} rows of ~300 bytes, SQLite to SQLite on loopback");
    mesh.start_all().await?;
    let filled = Instant::now();
    for first in (0..rows).step_by(100_000) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(rows_sql(first, 100_000.min(rows - first))))
            .execute(&mesh.regions[0].app)
            .await?;
    }
    // Counted, not compared: the harness's full comparison would swamp the memory figure.
    wait_rows(&mesh, rows).await?;
    let bytes: i64 = sqlx::query_scalar("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()")
        .fetch_one(&mesh.regions[0].app)
        .await?;
    println!(
        "filled and replicated in {:.1} s; region0's database is {:.0} MiB",
        filled.elapsed().as_secs_f64(),
        bytes as f64 / (1 << 20) as f64
    );
    // region0 trims its log once region1 has acknowledged everything; then region1 is lost.
    let trimmed = Instant::now();
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM _weft_log")
        .fetch_one(&mesh.regions[0].app)
        .await?
        > 0
    {
        anyhow::ensure!(
            trimmed.elapsed() < Duration::from_secs(120),
            "region0 never trimmed its log"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    mesh.stop(1).await;
    let lost = mesh.regions[1].db.clone();
    mesh.regions[1].app.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", lost.display()));
    }
    mesh.regions[1].app = super::app_pool(&lost).await?;
    sqlx::raw_sql(SCHEMA).execute(&mesh.regions[1].app).await?;

    reset_peak_rss();
    let mut peak = 0;
    let started = Instant::now();
    mesh.start(1).await?;
    let joined = loop {
        peak = peak.max(peak_rss_mib());
        let store = &mesh.regions[1].node.as_ref().expect("started").store;
        let frontier = store.frontiers().await?.get("region0-1").copied().unwrap_or(0);
        if frontier > 0 && store.join_state().await?.is_none() {
            break started.elapsed();
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(3600), "region1 never joined");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    mesh.wait_converged(Duration::from_secs(3600)).await?;
    let converged = started.elapsed();
    println!(
        "\nsnapshot join: {rows} rows in {:.1} s = {:.0} rows/s ({:.1} MiB/s of database); converged {:.1} s after the start; process peak RSS during the join {peak} MiB (both sidecars)",
        joined.as_secs_f64(),
        rows as f64 / joined.as_secs_f64(),
        bytes as f64 / (1 << 20) as f64 / joined.as_secs_f64(),
        converged.as_secs_f64(),
    );
    mesh.stop_all().await;
    Ok(())
}

pub async fn big_txn(rows: i64, dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    let (dir, _temp) = super::work_dir(dir)?;
    let mut mesh = mesh(&dir, &["region0", "region1", "region2"]).await?;
    println!(
        "weft bench: one application transaction of {rows} rows of ~300 bytes in region0, three regions on loopback"
    );
    mesh.start_all().await?;
    reset_peak_rss();
    let started = Instant::now();
    let app = mesh.regions[0].app.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let small = tokio::spawn(async move {
        // The application keeps committing small transactions while the big one replicates.
        let (mut committed, mut slowest) = (0u64, Duration::ZERO);
        let mut id = 1i64 << 40;
        while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
            id += 1;
            let began = Instant::now();
            let insert = sqlx::query("INSERT INTO bench (id, origin, n, payload) VALUES (?, 'small', 0, 'x')")
                .bind(id)
                .execute(&app)
                .await;
            if insert.is_ok() {
                committed += 1;
                slowest = slowest.max(began.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (committed, slowest)
    });
    sqlx::raw_sql(sqlx::AssertSqlSafe(rows_sql(0, rows)))
        .execute(&mesh.regions[0].app)
        .await?;
    let committed = started.elapsed();
    let big_arrived = Instant::now();
    loop {
        let mut done = true;
        for region in &mesh.regions {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM bench WHERE origin = 'region0'")
                .fetch_one(&region.app)
                .await?;
            done &= n == rows;
        }
        if done {
            break;
        }
        anyhow::ensure!(
            big_arrived.elapsed() < Duration::from_secs(3600),
            "the regions never got every row"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (small, slowest) = small.await?;
    wait_rows(&mesh, rows + i64::try_from(small)?).await?;
    let arrived = started.elapsed();
    let peak = peak_rss_mib();
    mesh.wait_converged(Duration::from_secs(3600)).await?;
    println!(
        "\nbig transaction: committed in {:.1} s; every region had every row {:.1} s after the start; \
         {small} small transactions committed meanwhile (slowest {:.0} ms, the big commit's own lock included); \
         process peak RSS {peak} MiB for the three sidecars and the writer together",
        committed.as_secs_f64(),
        arrived.as_secs_f64(),
        slowest.as_secs_f64() * 1e3,
    );
    mesh.stop_all().await;
    Ok(())
}
