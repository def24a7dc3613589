//! `weft bench`: end-to-end throughput and capture-to-apply lag on loopback.
//!
//! N regions (all-to-all) each get an application writer inserting fresh rows, either paced at
//! `--rate` changes/s per region (the lag figure) or as fast as SQLite takes them (`--rate 0`,
//! the throughput figure). Applied throughput is counted from the first write until every
//! region has applied every other region's changes and the databases compare equal, so it
//! includes the catch-up tail: nothing is counted that did not land.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::{ReplicationConfig, TableConfig};
use crate::harness::loopback::LoopbackMesh;
use crate::telemetry::Metrics;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Regions in the mesh.
    #[arg(long, default_value_t = 3)]
    pub regions: usize,
    /// Changes per second written in each region; 0 writes as fast as possible.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Seconds of writing.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Rows per application transaction when `--rate 0`.
    #[arg(long, default_value_t = 200)]
    pub txn_rows: u64,
    /// All-to-all relaying around failed links (0 = off; default as in the node config).
    #[arg(long, default_value_t = ReplicationConfig::default().relay_after_ms)]
    pub relay_after_ms: u64,
    /// `sqlite`: N regions all-to-all. `postgres`: two PostgreSQL regions one way, against
    /// PostgreSQL's own logical replication on the same rows.
    #[arg(long, value_enum, default_value_t = StoreKind::Sqlite)]
    pub store: StoreKind,
    /// Folder for the databases (default: a fresh temporary folder).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    /// Instead: a region rebuilt empty joins by snapshot a region holding this many rows of
    /// about 300 bytes (rows/s of the snapshot, time to converge).
    #[arg(long, conflicts_with = "big_txn")]
    pub join_rows: Option<i64>,
    /// Instead: one application transaction of this many rows of about 300 bytes, replicated
    /// to two regions (time to converge, peak memory).
    #[arg(long)]
    pub big_txn: Option<i64>,
    /// After the run over mutual TLS, the same run again in plain text (`insecure = true`),
    /// and what TLS costs.
    #[arg(long)]
    pub compare_insecure: bool,
    /// The links: gRPC streams, Kafka topics (on an Apache Kafka broker the bench starts), or
    /// one run of each, side by side.
    #[arg(long, value_enum, default_value_t = TransportKind::Grpc)]
    pub transport: TransportKind,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    Grpc,
    Kafka,
    Both,
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS bench (id INTEGER PRIMARY KEY, origin TEXT NOT NULL, n INTEGER NOT NULL, payload TEXT NOT NULL);";

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(rows) = args.join_rows {
        return super::bench_lifecycle::join(rows, args.dir.as_deref()).await;
    }
    if let Some(rows) = args.big_txn {
        return super::bench_lifecycle::big_txn(rows, args.dir.as_deref()).await;
    }
    if args.store == StoreKind::Postgres {
        return super::bench_pg::run(args).await;
    }
    anyhow::ensure!((2..=9).contains(&args.regions), "--regions must be 2 to 9");
    let (dir, _temp) = super::work_dir(args.dir.as_deref())?;
    if args.transport != TransportKind::Grpc {
        return compare_transports(&args, &dir).await;
    }
    let tls = sqlite_run(&args, &dir.join("tls"), true, None).await?;
    if args.compare_insecure {
        let plain = sqlite_run(&args, &dir.join("insecure"), false, None).await?;
        println!(
            "\nTLS against insecure = true, same run: applied >= {:.0} vs {:.0} changes/s per region ({:+.1} %); \
             worst lag p99 {:.2} vs {:.2} ms",
            tls.0,
            plain.0,
            (tls.0 / plain.0 - 1.0) * 100.0,
            tls.1,
            plain.1
        );
    }
    Ok(())
}

/// `--transport kafka` or `both`: the run on Kafka links through a broker started here
/// (after the run on gRPC, for `both`), and the two side by side.
#[cfg(feature = "kafka")]
async fn compare_transports(args: &Args, dir: &std::path::Path) -> anyhow::Result<()> {
    let broker = super::kafka::Broker::start()?;
    let grpc = match args.transport {
        TransportKind::Both => Some(sqlite_run(args, &dir.join("grpc"), true, None).await?),
        _ => None,
    };
    let kafka = sqlite_run(args, &dir.join("kafka"), true, Some(&broker.bootstrap)).await?;
    if let Some(grpc) = grpc {
        println!(
            "
Kafka against gRPC, same run: applied >= {:.0} vs {:.0} changes/s per region; worst lag p50 {:.2} vs \
             {:.2} ms, p99 {:.2} vs {:.2} ms",
            kafka.0, grpc.0, kafka.2, grpc.2, kafka.1, grpc.1
        );
    }
    Ok(())
}

#[cfg(not(feature = "kafka"))]
async fn compare_transports(_: &Args, _: &std::path::Path) -> anyhow::Result<()> {
    anyhow::bail!("this weft was built without Kafka: build it with `--features kafka` for --transport kafka")
}

/// One run of the SQLite mesh over TLS or in plain text, on gRPC links or on Kafka links
/// through `kafka` (bootstrap servers): (least applied/s per region, worst lag p99 in ms,
/// worst lag p50 in ms).
async fn sqlite_run(
    args: &Args,
    dir: &std::path::Path,
    tls: bool,
    kafka: Option<&str>,
) -> anyhow::Result<(f64, f64, f64)> {
    let names: Vec<String> = (0..args.regions).map(|i| format!("region{i}")).collect();
    let names_ref: Vec<&str> = names.iter().map(String::as_str).collect();
    let tables = [TableConfig::lww("bench")];
    let mut topology = LoopbackMesh::all_to_all(&names_ref);
    if let Some(bootstrap) = kafka {
        topology.mesh = format!("bench-{}", rand::random::<u32>());
        topology.transport = crate::config::Transport::Kafka;
        topology.kafka = Some(crate::config::KafkaClusters {
            bootstrap: Some(bootstrap.to_owned()),
            ..Default::default()
        });
    }
    let mut mesh = LoopbackMesh::create_with(
        dir,
        &topology,
        SCHEMA,
        &tables,
        &ReplicationConfig {
            relay_after_ms: args.relay_after_ms,
            ..ReplicationConfig::default()
        },
        tls,
    )
    .await?;
    mesh.start_all().await?;
    let mode = if args.rate == 0 {
        format!("as fast as possible, {} rows per transaction", args.txn_rows)
    } else {
        format!("{} changes/s per region", args.rate)
    };
    let links = match kafka {
        Some(bootstrap) => format!("Kafka links (one Apache Kafka broker at {bootstrap})"),
        None => "gRPC links".to_owned(),
    };
    println!(
        "weft bench: {} regions, all-to-all, {links}, loopback, SQLite (synchronous=FULL), {}; {mode}; {} s",
        args.regions,
        if tls {
            "mutual TLS"
        } else {
            "plain text (insecure = true)"
        },
        args.duration
    );

    warm_up(&mesh).await?;
    let duration = Duration::from_secs(args.duration);
    let started = Instant::now();
    let (mut writers, written) = start_writers(&mesh, args);
    // Lag is measured in the steady state: forget the first second.
    tokio::time::sleep(Duration::from_secs(1).min(duration / 2)).await;
    for region in &mesh.regions {
        region.metrics.reset_lag();
    }
    while let Some(result) = writers.join_next().await {
        result??;
    }
    let writing = started.elapsed();
    mesh.wait_converged(Duration::from_secs(300)).await?;
    let total = started.elapsed();

    let figures = print_figures(&mesh, &written, writing, total);
    mesh.stop_all().await;
    Ok(figures)
}

/// One row from each region, replicated everywhere, before the clock starts: the links are
/// up (on Kafka: the topics made, the history confirmed), so the figures are steady state.
async fn warm_up(mesh: &LoopbackMesh) -> anyhow::Result<()> {
    for (i, region) in mesh.regions.iter().enumerate() {
        sqlx::query("INSERT INTO bench (id, origin, n, payload) VALUES (?, ?, 0, 'warm-up')")
            .bind(-(i as i64) - 1)
            .bind(&region.region)
            .execute(&region.app)
            .await?;
    }
    mesh.wait_converged(Duration::from_secs(120)).await?;
    Ok(())
}

/// One application writer per region, for the run's duration: rows written per region.
fn start_writers(mesh: &LoopbackMesh, args: &Args) -> (tokio::task::JoinSet<anyhow::Result<()>>, Vec<Arc<AtomicU64>>) {
    let duration = Duration::from_secs(args.duration);
    let written: Vec<Arc<AtomicU64>> = mesh.regions.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
    let mut writers = tokio::task::JoinSet::new();
    for (i, region) in mesh.regions.iter().enumerate() {
        let app = region.app.clone();
        let count = written[i].clone();
        let origin = region.region.clone();
        let (rows_per_txn, period) = if args.rate == 0 {
            (args.txn_rows.max(1), Duration::ZERO)
        } else {
            // 100 transactions a second, like a busy OLTP application.
            ((args.rate / 100).max(1), Duration::from_millis(10))
        };
        writers.spawn(async move {
            let mut next_id = (i as i64) << 40;
            let mut tick = (!period.is_zero()).then(|| tokio::time::interval(period));
            let end = Instant::now() + duration;
            while Instant::now() < end {
                if let Some(tick) = &mut tick {
                    tick.tick().await;
                }
                let mut tx = app.begin().await?;
                for _ in 0..rows_per_txn {
                    next_id += 1;
                    sqlx::query("INSERT INTO bench (id, origin, n, payload) VALUES (?, ?, ?, ?)")
                        .bind(next_id)
                        .bind(&origin)
                        .bind(next_id & 0xffff)
                        .bind("a typical row of payload text, about sixty bytes long......")
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                count.fetch_add(rows_per_txn, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    (writers, written)
}

/// Per region: rows written, the apply rate until converged, and lag; then the summary.
fn print_figures(
    mesh: &LoopbackMesh,
    written: &[Arc<AtomicU64>],
    writing: Duration,
    total: Duration,
) -> (f64, f64, f64) {
    println!("\nregion     written   write rate   applied   applied/s (until converged)   lag p50   lag p99   lag max");
    let mut applied_rates = Vec::new();
    let mut p99s = Vec::new();
    let mut p50s = Vec::new();
    for (region, count) in mesh.regions.iter().zip(written) {
        let w = count.load(Ordering::Relaxed);
        let applied = Metrics::get(&region.metrics.applied);
        let rate = applied as f64 / total.as_secs_f64();
        let lag = region.metrics.lag();
        applied_rates.push(rate);
        p99s.push(lag.p99_ms);
        p50s.push(lag.p50_ms);
        println!(
            "{:<9} {:>8} {:>10.0}/s {:>9} {:>18.0}/s {:>18.2}ms {:>7.2}ms {:>7.2}ms",
            region.region,
            w,
            w as f64 / writing.as_secs_f64(),
            applied,
            rate,
            lag.p50_ms,
            lag.p99_ms,
            lag.max_ms
        );
    }
    let min_rate = applied_rates.iter().copied().fold(f64::INFINITY, f64::min);
    let worst_p99 = p99s.iter().copied().fold(0.0, f64::max);
    let worst_p50 = p50s.iter().copied().fold(0.0, f64::max);
    println!(
        "\nsummary: applied >= {min_rate:.0} changes/s per region; worst lag p99 {worst_p99:.2} ms; converged {:.2} s after the last write",
        (total - writing).as_secs_f64()
    );
    (min_rate, worst_p99, worst_p50)
}
