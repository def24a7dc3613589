//! `weft demo`: three regions on loopback, all writing at once, one restarted mid-run.
//!
//! The workload hits a small set of shared rows from every region (concurrent updates and
//! deletes: LWW conflicts) and writes region-local rows (plain replication). The third region's
//! sidecar stops a third of the way in and restarts later while its application keeps writing,
//! so it must catch up both ways. The demo ends by comparing all databases row by row and
//! metadata entry by metadata entry, and fails if they differ.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::{Rng, SeedableRng};
use sqlx::SqlitePool;

use crate::config::{ReplicationConfig, TableConfig};
use crate::crdt::CrdtType;
use crate::harness::loopback::LoopbackMesh;
use crate::telemetry::Metrics;

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS profiles (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT,
    score REAL,
    avatar BLOB,
    updated_in TEXT
);
CREATE TABLE IF NOT EXISTS orders (
    region TEXT NOT NULL,
    id INTEGER NOT NULL,
    item TEXT NOT NULL,
    qty INTEGER NOT NULL,
    PRIMARY KEY (region, id)
);
CREATE TABLE IF NOT EXISTS inventory (sku TEXT PRIMARY KEY, qty INTEGER NOT NULL, tags TEXT);
CREATE TABLE IF NOT EXISTS contracts (id INTEGER PRIMARY KEY, client TEXT NOT NULL, amount INTEGER NOT NULL, terms TEXT);
CREATE TABLE IF NOT EXISTS accounts (id INTEGER PRIMARY KEY, home_region TEXT NOT NULL, balance INTEGER NOT NULL);
";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds of workload.
    #[arg(long, default_value_t = 30)]
    pub duration: u64,
    /// Application transactions per second in each region.
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
    /// Folder for the databases and config files (default: a fresh temporary folder).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    /// Workload seed (printed, so a run can be replayed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Run on the shape and nodes of this topology file (on loopback ports); default: three
    /// regions, all-to-all.
    #[arg(long)]
    pub topology: Option<std::path::PathBuf>,
    /// The links: gRPC streams, or Kafka topics on an Apache Kafka broker the demo starts.
    #[arg(long, value_enum, default_value_t = Links::Grpc)]
    pub transport: Links,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Links {
    Grpc,
    Kafka,
}

/// With `--transport kafka`, a broker for the demo, and the topology's links on it.
#[cfg(feature = "kafka")]
fn kafka_links(links: Links, topology: &mut crate::config::Topology) -> anyhow::Result<Option<super::kafka::Broker>> {
    if links == Links::Grpc {
        return Ok(None);
    }
    println!("starting an Apache Kafka broker (KRaft) for the Kafka links...");
    let broker = super::kafka::Broker::start()?;
    topology.transport = crate::config::Transport::Kafka;
    topology.links.clear();
    topology.kafka = Some(crate::config::KafkaClusters {
        bootstrap: Some(broker.bootstrap.clone()),
        regions: Default::default(),
        // The demo also shows what consumers that do not speak weft read.
        changes: true,
    });
    topology.mesh = format!("demo-{}", rand::random::<u32>());
    Ok(Some(broker))
}

#[cfg(not(feature = "kafka"))]
fn kafka_links(links: Links, _: &mut crate::config::Topology) -> anyhow::Result<Option<()>> {
    anyhow::ensure!(
        links == Links::Grpc,
        "this weft was built without Kafka: build it with `--features kafka` for --transport kafka"
    );
    Ok(None)
}

/// One region's application in the demo workload.
struct App {
    app: SqlitePool,
    region: String,
    rng: rand::rngs::StdRng,
    next_order: i64,
    sold: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    regions: Vec<String>,
}

type Tx<'a> = sqlx::Transaction<'a, sqlx::Sqlite>;

impl App {
    /// One application transaction: usually one change, sometimes three.
    async fn write_once(&mut self) -> sqlx::Result<()> {
        let mut tx = self.app.begin().await?;
        let ops = if self.rng.random_ratio(1, 10) { 3 } else { 1 };
        for _ in 0..ops {
            let roll = self.rng.random_range(0..100);
            let profile = format!("p{:02}", self.rng.random_range(0..40));
            match roll {
                0..8 => self.sell(&mut tx).await?,
                8..12 => self.pay_into_an_account(&mut tx).await?,
                12 => self.edit_a_contract(&mut tx).await?,
                13..45 => self.upsert_profile(&mut tx, &profile).await?,
                45..55 => {
                    sqlx::query("DELETE FROM profiles WHERE id = ?")
                        .bind(&profile)
                        .execute(&mut *tx)
                        .await?;
                }
                _ => self.order(&mut tx, roll).await?,
            }
        }
        tx.commit().await
    }

    /// Everyone sells from the same stock: a CRDT counter, so no sale is lost.
    async fn sell(&mut self, tx: &mut Tx<'_>) -> sqlx::Result<()> {
        sqlx::query("UPDATE inventory SET qty = qty - 1 WHERE sku = ?")
            .bind(format!("sku-{}", self.rng.random_range(0..STOCK_ITEMS)))
            .execute(&mut **tx)
            .await?;
        self.sold.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Accounts belong to one region. Writing another region's account is refused right
    /// here, in the application's transaction; only that statement is undone.
    async fn pay_into_an_account(&mut self, tx: &mut Tx<'_>) -> sqlx::Result<()> {
        let home = self.rng.random_range(0..self.regions.len());
        let id = home as i64 * 1000 + self.rng.random_range(0..ACCOUNTS_EACH);
        let result = sqlx::query("UPDATE accounts SET balance = balance + 1 WHERE id = ?")
            .bind(id)
            .execute(&mut **tx)
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("is owned by") => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// A contract edit: concurrent edits wait in the resolution queue.
    async fn edit_a_contract(&mut self, tx: &mut Tx<'_>) -> sqlx::Result<()> {
        sqlx::query("UPDATE contracts SET amount = ?, terms = ? WHERE id = ?")
            .bind(self.rng.random_range(100..1000i64))
            .bind(format!("terms from {}", self.region))
            .bind(self.rng.random_range(0..3i64))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn upsert_profile(&mut self, tx: &mut Tx<'_>, profile: &str) -> sqlx::Result<()> {
        let region = &self.region;
        let avatar: Vec<u8> = (0..8).map(|_| self.rng.random()).collect();
        sqlx::query(
            "INSERT INTO profiles (id, name, email, score, avatar, updated_in) VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, email = excluded.email,
             score = excluded.score, avatar = excluded.avatar, updated_in = excluded.updated_in",
        )
        .bind(profile)
        .bind(format!("{profile} as seen in {region}"))
        .bind(
            self.rng
                .random_ratio(1, 4)
                .then(|| format!("{profile}@{region}.example")),
        )
        .bind(self.rng.random_range(0.0..100.0f64))
        .bind(avatar)
        .bind(region)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// A new order of this region (most rolls), or one more of an earlier one.
    async fn order(&mut self, tx: &mut Tx<'_>, roll: u32) -> sqlx::Result<()> {
        if roll < 90 || self.next_order == 1 {
            sqlx::query("INSERT INTO orders (region, id, item, qty) VALUES (?, ?, ?, ?)")
                .bind(&self.region)
                .bind(self.next_order)
                .bind(format!("item-{}", self.rng.random_range(0..1000)))
                .bind(self.rng.random_range(1..10i64))
                .execute(&mut **tx)
                .await?;
            self.next_order += 1;
        } else {
            sqlx::query("UPDATE orders SET qty = qty + 1 WHERE region = ? AND id = ?")
                .bind(&self.region)
                .bind(self.rng.random_range(1..self.next_order))
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }
}

/// The demo's tables: one of each strategy.
fn tables() -> [TableConfig; 5] {
    [
        TableConfig::lww("profiles"),
        TableConfig::lww("orders"),
        TableConfig::crdt("inventory", &[("qty", CrdtType::Counter), ("tags", CrdtType::Set)]),
        TableConfig::owned_by_column("accounts", "home_region"),
        TableConfig::queue("contracts"),
    ]
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let seed = args.seed.unwrap_or_else(rand::random);
    let (dir, _temp) = super::work_dir(args.dir.as_deref())?;
    let mut topology = match &args.topology {
        Some(file) => crate::config::Topology::load(file)?,
        None => LoopbackMesh::all_to_all(&["us-east", "eu-west", "ap-south"]),
    };
    let _broker = kafka_links(args.transport, &mut topology)?;
    let regions: Vec<String> = topology.nodes.iter().map(|n| n.region.clone()).collect();
    println!(
        "weft demo: {} regions on loopback, {}, {} links, LWW; seed {seed}; files in {}",
        regions.len(),
        toml::Value::try_from(topology.shape)
            .map(|v| v.to_string())
            .unwrap_or_default(),
        if args.transport == Links::Kafka {
            "Kafka"
        } else {
            "gRPC"
        },
        dir.display()
    );
    let mut mesh = LoopbackMesh::create(&dir, &topology, SCHEMA, &tables(), &ReplicationConfig::default()).await?;
    mesh.start_all().await?;
    seed_rows(&mesh).await?;
    mesh.wait_converged(Duration::from_secs(30)).await?;
    let mut workload = Workload::start(&mesh, &regions, seed, &args);
    restart_one_region(
        &mut mesh,
        &regions,
        &workload.written,
        Duration::from_secs(args.duration),
    )
    .await?;
    workload.finish().await?;
    println!("workload done; waiting for every region to apply everything...");
    let converge = mesh.wait_converged(Duration::from_secs(60)).await;
    print_summary(&mesh, &workload.written).await?;
    println!(
        "\naccounts (ownership): {} writes to another region's account refused at the source",
        workload.refused.load(Ordering::Relaxed)
    );
    let strategies = print_strategies(&mesh, workload.sold.load(Ordering::Relaxed), &dir).await;
    let audit = audit(&mesh).await;
    mesh.stop_all().await;
    let took = converge.context("the regions did NOT converge")?;
    strategies?;
    audit?;
    println!(
        "\nCONVERGED: all {} regions hold identical rows and row metadata ({} ms after the last write).",
        regions.len(),
        took.as_millis()
    );
    Ok(())
}

/// Runs `weft audit` over the mesh as region 0 would, and prints what it cost.
async fn audit(mesh: &LoopbackMesh) -> anyhow::Result<()> {
    use crate::transport::audit::{Audit, Options};
    let config = crate::config::NodeConfig::load(&mesh.regions[0].config_file)?;
    let report = Audit::connect(config, Options::default()).await?.run().await?;
    let rows: u64 = report.tables.iter().flat_map(|t| t.rows_read.values()).sum();
    println!(
        "\naudit (weft audit): {} rows differ between regions; {rows} rows checksummed on {} nodes with \
         {} requests and {} KiB of replies in {} ms",
        report.differing(),
        report.nodes.len(),
        report.requests,
        report.reply_bytes.div_ceil(1024),
        report.elapsed_ms
    );
    anyhow::ensure!(
        report.differing() == 0,
        "the audit found rows that differ: {:?}",
        report.summary().keys
    );
    Ok(())
}

/// Stock and contracts exist everywhere before the regions start competing for them, and
/// each region has accounts of its own.
async fn seed_rows(mesh: &LoopbackMesh) -> anyhow::Result<()> {
    let seed_app = &mesh.regions[0].app;
    for i in 0..STOCK_ITEMS {
        sqlx::query("INSERT INTO inventory (sku, qty, tags) VALUES (?, ?, '[]')")
            .bind(format!("sku-{i}"))
            .bind(STOCK_EACH)
            .execute(seed_app)
            .await?;
    }
    for i in 0..3i64 {
        sqlx::query("INSERT INTO contracts (id, client, amount, terms) VALUES (?, ?, 500, 'net 30')")
            .bind(i)
            .bind(format!("client-{i}"))
            .execute(seed_app)
            .await?;
    }
    mesh.seed_accounts(ACCOUNTS_EACH).await?;
    Ok(())
}

/// The applications' writers, one per region, at the demo's rate, for its duration.
struct Workload {
    writers: tokio::task::JoinSet<anyhow::Result<()>>,
    /// Writes made per region.
    written: Vec<Arc<AtomicU64>>,
    sold: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
}

impl Workload {
    fn start(mesh: &LoopbackMesh, regions: &[String], seed: u64, args: &Args) -> Self {
        let sold = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let duration = Duration::from_secs(args.duration);
        let written: Vec<Arc<AtomicU64>> = regions.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
        let mut writers = tokio::task::JoinSet::new();
        for (i, region) in mesh.regions.iter().enumerate() {
            let count = written[i].clone();
            let mut app = App {
                app: region.app.clone(),
                region: region.region.clone(),
                rng: rand::rngs::StdRng::seed_from_u64(seed ^ (i as u64 + 1)),
                next_order: 1,
                sold: sold.clone(),
                refused: refused.clone(),
                regions: regions.to_vec(),
            };
            let period = Duration::from_micros(1_000_000 / args.rate.max(1));
            writers.spawn(async move {
                let mut tick = tokio::time::interval(period);
                let end = Instant::now() + duration;
                while Instant::now() < end {
                    tick.tick().await;
                    app.write_once().await?;
                    count.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            });
        }
        Self {
            writers,
            written,
            sold,
            refused,
        }
    }

    async fn finish(&mut self) -> anyhow::Result<()> {
        while let Some(result) = self.writers.join_next().await {
            result?.context("the demo workload failed")?;
        }
        Ok(())
    }
}

/// While the workload runs: the last region's sidecar stops a third of the way through and
/// restarts later (its application keeps writing), with progress every second.
async fn restart_one_region(
    mesh: &mut LoopbackMesh,
    regions: &[String],
    written: &[Arc<AtomicU64>],
    duration: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let stop_at = duration.mul_f64(0.35);
    let restart_at = duration.mul_f64(0.6);
    let victim = regions.len() - 1;
    let mut second = tokio::time::interval(Duration::from_secs(1));
    second.tick().await;
    while started.elapsed() < duration {
        second.tick().await;
        let t = started.elapsed();
        if t >= stop_at && t < restart_at && mesh.regions[victim].node.is_some() {
            println!(
                "--- stopping the {} sidecar (its application keeps writing) ---",
                regions[victim]
            );
            mesh.stop(victim).await;
        }
        if t >= restart_at && mesh.regions[victim].node.is_none() {
            println!(
                "--- restarting the {} sidecar: it must catch up both ways ---",
                regions[victim]
            );
            mesh.start(victim).await?;
        }
        print_progress(mesh, written, t);
    }
    Ok(())
}

const STOCK_ITEMS: i64 = 5;
const ACCOUNTS_EACH: i64 = 10;
const STOCK_EACH: i64 = 100_000;

/// What each strategy did, and the exactness check of the CRDT counters.
async fn print_strategies(mesh: &LoopbackMesh, sold: u64, dir: &std::path::Path) -> anyhow::Result<()> {
    println!("\nconflicts resolved, by strategy (as logged in each region's _weft_conflicts):");
    for region in &mesh.regions {
        let counts: Vec<(String, i64)> =
            sqlx::query_as("SELECT strategy, count(*) FROM _weft_conflicts GROUP BY strategy ORDER BY strategy")
                .fetch_all(&region.app)
                .await?;
        let open: i64 = sqlx::query_scalar("SELECT count(*) FROM _weft_queue WHERE closed_at IS NULL")
            .fetch_one(&region.app)
            .await?;
        let counts: Vec<String> = counts.iter().map(|(s, n)| format!("{s} {n}")).collect();
        println!(
            "  {:<10} {}; waiting for review: {open}",
            region.region,
            counts.join(", ")
        );
    }
    let expected = STOCK_ITEMS * STOCK_EACH - sold as i64;
    for region in &mesh.regions {
        let total: i64 = sqlx::query_scalar("SELECT sum(qty) FROM inventory")
            .fetch_one(&region.app)
            .await?;
        if total != expected {
            anyhow::bail!(
                "{}: inventory holds {total}, expected {expected}: a sale was lost",
                region.region
            );
        }
    }
    println!(
        "inventory (CRDT counter): {} - {sold} sales = {expected} in every region; no sale lost",
        STOCK_ITEMS * STOCK_EACH
    );
    println!(
        "contracts waiting for a person: weft conflicts --config {} list (run the demo with --dir to keep the files)",
        dir.join(format!("{}.toml", mesh.regions[0].node_id)).display()
    );
    Ok(())
}

fn print_progress(mesh: &LoopbackMesh, written: &[Arc<AtomicU64>], t: Duration) {
    let mut line = format!("[{:>3}s]", t.as_secs());
    for (region, count) in mesh.regions.iter().zip(written) {
        let m = &region.metrics;
        let state = if region.node.is_some() { "" } else { " (sidecar down)" };
        line += &format!(
            "  {}: wrote {} captured {} applied {} conflicts {}{state} |",
            region.region,
            count.load(Ordering::Relaxed),
            Metrics::get(&m.captured),
            Metrics::get(&m.applied),
            Metrics::get(&m.conflicts),
        );
    }
    println!("{}", line.trim_end_matches(" |"));
}

async fn print_summary(mesh: &LoopbackMesh, written: &[Arc<AtomicU64>]) -> anyhow::Result<()> {
    println!(
        "\nregion      app txns   events   applied   stale   conflicts   dead   looped    dups   lag p50   lag p99   lag max"
    );
    for (region, count) in mesh.regions.iter().zip(written) {
        let m = &region.metrics;
        let (last_seq, _, _) = super::compare::sqlite_progress(&region.app).await?;
        let lag = m.lag();
        println!(
            "{:<10} {:>9} {:>8} {:>9} {:>7} {:>11} {:>6} {:>8} {:>7} {:>7.1}ms {:>7.1}ms {:>7.1}ms",
            region.region,
            count.load(Ordering::Relaxed),
            last_seq,
            Metrics::get(&m.applied),
            Metrics::get(&m.stale),
            Metrics::get(&m.conflicts),
            Metrics::get(&m.dead_lettered),
            Metrics::get(&m.looped),
            Metrics::get(&m.duplicates),
            lag.p50_ms,
            lag.p99_ms,
            lag.max_ms,
        );
    }
    Ok(())
}
