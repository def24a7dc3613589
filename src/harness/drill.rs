//! `weft drill`: a disaster-recovery drill on loopback. Three regions, each a real `weft run`
//! process beside its SQLite database, write under load; one region is killed (SIGKILL), its
//! application goes on committing for a moment with the links cut, then the region goes dark.
//! The drill then measures what a real loss costs:
//! - RPO: the changes committed in the lost region that no other region had (counted by
//!   table, listed), next to what `weft status` showed there just before;
//! - RTO for ownership tables: from the kill until a surviving region's application writes
//!   a lost region's row, through `weft ownership failover` (run at once: the drill's
//!   detection time is zero, a deployment adds its own); for LWW and CRDT tables writes
//!   never stop, which the drill checks (no refusal, the longest gap between commits);
//! - recovery: the lost region comes back, every region converges (rows and row metadata),
//!   and its unreplicated writes to failed-over rows are exactly the fenced dead letters.
//!
//! It fails (non-zero exit) if the regions do not converge, a sale is lost, or the fenced
//! letters are not the lost writes.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::{Rng, SeedableRng};
use sqlx::SqlitePool;

use crate::config::{NodeConfig, ReplicationConfig, TableConfig};
use crate::crdt::CrdtType;
use crate::event::{Key, Value};
use crate::harness::loopback::LoopbackMesh;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accounts (id INTEGER PRIMARY KEY, home_region TEXT NOT NULL, balance INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS profiles (id TEXT PRIMARY KEY, name TEXT NOT NULL, updated_in TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS inventory (sku TEXT PRIMARY KEY, qty INTEGER NOT NULL);
";
const ACCOUNTS_EACH: i64 = 20;
const STOCK_ITEMS: i64 = 5;
const STOCK_EACH: i64 = 1_000_000;
/// The region killed, and the survivor that takes its rows over.
const VICTIM: usize = 0;
const HEIR: usize = 1;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds of load before the kill.
    #[arg(long, default_value_t = 8)]
    pub load: u64,
    /// Seconds the survivors go on alone before the lost region comes back.
    #[arg(long, default_value_t = 5)]
    pub outage: u64,
    /// Milliseconds the killed region's application keeps committing with its links cut,
    /// before the region goes dark.
    #[arg(long, default_value_t = 1000)]
    pub cut_ms: u64,
    /// Application transactions per second in each region.
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
    /// Folder for the databases, config files and sidecar logs (default: a temporary one).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[arg(long)]
    pub seed: Option<u64>,
}

fn tables() -> [TableConfig; 3] {
    [
        TableConfig::owned_by_column("accounts", "home_region"),
        TableConfig::lww("profiles"),
        TableConfig::crdt("inventory", &[("qty", CrdtType::Counter)]),
    ]
}

/// One region's `weft run` process, its log in the drill's folder.
struct Sidecar {
    config: PathBuf,
    address: String,
    log: PathBuf,
    child: Option<tokio::process::Child>,
}

impl Sidecar {
    /// Starts the process and waits until it listens (its triggers are installed by then).
    async fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "weft=info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting weft run")?;
        self.child = Some(child);
        let started = Instant::now();
        while tokio::net::TcpStream::connect(&self.address).await.is_err() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                anyhow::bail!("weft run exited with {status}; see {}", self.log.display());
            }
            anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "weft run never listened");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// SIGKILL: no final drain, no goodbye, as a crash or a power loss.
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// SIGTERM, and the wait for a clean exit.
    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
            if tokio::time::timeout(Duration::from_secs(20), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

/// What the applications saw, shared by the writers.
#[derive(Default)]
struct Seen {
    /// The victim's application stops: its region is dark.
    dark: AtomicBool,
    stop: AtomicBool,
    /// Microseconds from the drill's start: the kill, and the first write a survivor's
    /// application made to a lost region's account (0: not yet).
    killed_at: AtomicU64,
    failed_over_at: AtomicU64,
    took_over_at: AtomicU64,
    sold: AtomicU64,
    refused: AtomicU64,
    /// LWW and CRDT writes that failed in a surviving region during the outage.
    survivor_errors: AtomicU64,
    /// The longest time, in microseconds, between two commits of one surviving region
    /// while the lost region was down.
    longest_gap: AtomicU64,
    written: [AtomicU64; 3],
}

struct Writer {
    i: usize,
    app: SqlitePool,
    region: String,
    rng: rand::rngs::StdRng,
    seen: Arc<Seen>,
    start: Instant,
}

impl Writer {
    fn micros(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    async fn run(mut self, period: Duration) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(period);
        let mut last_commit = self.micros();
        while !self.seen.stop.load(Ordering::Relaxed) {
            tick.tick().await;
            if self.i == VICTIM && self.seen.dark.load(Ordering::Relaxed) {
                return Ok(());
            }
            let outage = self.seen.killed_at.load(Ordering::Relaxed) > 0 && self.i != VICTIM;
            match self.write_once().await {
                Ok(()) => {
                    let now = self.micros();
                    if outage {
                        self.seen.longest_gap.fetch_max(now - last_commit, Ordering::Relaxed);
                    }
                    last_commit = now;
                    self.seen.written[self.i].fetch_add(1, Ordering::Relaxed);
                }
                Err(error) if outage => {
                    tracing::warn!(%error, region = %self.region, "a write failed during the outage");
                    self.seen.survivor_errors.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => return Err(error).context(format!("{}'s application", self.region)),
            }
        }
        Ok(())
    }

    /// One transaction: a payment into any region's account (refused unless this region
    /// owns it), a profile upsert (LWW) or a sale (CRDT counter).
    async fn write_once(&mut self) -> anyhow::Result<()> {
        match self.rng.random_range(0..10) {
            0..4 => self.pay().await,
            4..7 => {
                let id = format!("p{:02}", self.rng.random_range(0..50));
                sqlx::query(
                    "INSERT INTO profiles (id, name, updated_in) VALUES (?, ?, ?) \
                     ON CONFLICT (id) DO UPDATE SET name = excluded.name, updated_in = excluded.updated_in",
                )
                .bind(&id)
                .bind(format!("{id} at {} µs", self.micros()))
                .bind(&self.region)
                .execute(&self.app)
                .await?;
                Ok(())
            }
            _ => {
                sqlx::query("UPDATE inventory SET qty = qty - 1 WHERE sku = ?")
                    .bind(format!("sku-{}", self.rng.random_range(0..STOCK_ITEMS)))
                    .execute(&self.app)
                    .await?;
                self.seen.sold.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    async fn pay(&mut self) -> anyhow::Result<()> {
        let home = self.rng.random_range(0..3i64);
        let id = home * 1000 + self.rng.random_range(0..ACCOUNTS_EACH);
        let result = sqlx::query("UPDATE accounts SET balance = balance + 1 WHERE id = ?")
            .bind(id)
            .execute(&self.app)
            .await;
        match result {
            Ok(_) => {
                let killed = self.seen.killed_at.load(Ordering::Relaxed) > 0;
                if killed && self.i != VICTIM && home == VICTIM as i64 {
                    let now = self.micros();
                    let _ = self
                        .seen
                        .took_over_at
                        .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
                }
                Ok(())
            }
            Err(e) if e.to_string().contains("is owned by") => {
                self.seen.refused.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let seed = args.seed.unwrap_or_else(rand::random);
    let (dir, _temp) = super::work_dir(args.dir.as_deref())?;
    let topology = LoopbackMesh::all_to_all(&["us-east", "eu-west", "ap-south"]);
    let mesh = LoopbackMesh::create(&dir, &topology, SCHEMA, &tables(), &ReplicationConfig::default()).await?;
    let names: Vec<String> = mesh.regions.iter().map(|r| r.region.clone()).collect();
    println!(
        "weft drill: {} regions on loopback, each a `weft run` process; {} txn/s per region; seed {seed}; files in {}",
        names.len(),
        args.rate,
        dir.display()
    );
    let mut sidecars: Vec<Sidecar> = mesh
        .regions
        .iter()
        .zip(&mesh.topology.nodes)
        .map(|(r, n)| Sidecar {
            config: r.config_file.clone(),
            address: n.address.clone(),
            log: dir.join(format!("{}.log", r.region)),
            child: None,
        })
        .collect();
    for sidecar in &mut sidecars {
        sidecar.start().await?;
    }
    seed_rows(&mesh).await?;
    mesh.wait_converged(Duration::from_secs(30)).await?;
    let outcome = drill(&mesh, &mut sidecars, &args, seed).await;
    for sidecar in &mut sidecars {
        sidecar.stop().await;
    }
    outcome
}

async fn seed_rows(mesh: &LoopbackMesh) -> anyhow::Result<()> {
    for i in 0..STOCK_ITEMS {
        sqlx::query("INSERT INTO inventory (sku, qty) VALUES (?, ?)")
            .bind(format!("sku-{i}"))
            .bind(STOCK_EACH)
            .execute(&mesh.regions[0].app)
            .await?;
    }
    mesh.seed_accounts(ACCOUNTS_EACH).await?;
    Ok(())
}

/// The load, the kill, the failover, the outage, the return: see the module's contract.
async fn drill(mesh: &LoopbackMesh, sidecars: &mut [Sidecar], args: &Args, seed: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    let seen = Arc::new(Seen::default());
    let mut writers = tokio::task::JoinSet::new();
    for (i, region) in mesh.regions.iter().enumerate() {
        let writer = Writer {
            i,
            app: region.app.clone(),
            region: region.region.clone(),
            rng: rand::rngs::StdRng::seed_from_u64(seed ^ (i as u64 + 1)),
            seen: seen.clone(),
            start,
        };
        writers.spawn(writer.run(Duration::from_micros(1_000_000 / args.rate.max(1))));
    }
    progress(mesh, &seen, Duration::from_secs(args.load), start).await;
    let victim = &mesh.regions[VICTIM];
    let before = status_of(&victim.config_file).await?;
    sidecars[VICTIM].kill().await;
    let killed = start.elapsed();
    seen.killed_at.store(killed.as_micros() as u64, Ordering::Relaxed);
    println!(
        "--- [{:>5.2}s] killed the {} sidecar (SIGKILL); its application keeps committing for {} ms with the links cut ---",
        killed.as_secs_f64(),
        victim.region,
        args.cut_ms
    );
    println!(
        "    weft status in {} just before: {} change(s) not yet acknowledged by every peer, the oldest {:.0} ms old (RPO exposure); outbox {}",
        victim.region, before.unacked, before.oldest_ms, before.outbox
    );
    let failover = fail_over(mesh).await?;
    seen.failed_over_at
        .store(start.elapsed().as_micros() as u64, Ordering::Relaxed);
    println!(
        "--- [{:>5.2}s] {}: weft ownership failover --from {} --to {} fenced {} row(s) in {} ms ---",
        (start.elapsed()).as_secs_f64(),
        mesh.regions[HEIR].region,
        victim.region,
        mesh.regions[HEIR].region,
        failover.0,
        failover.1.as_millis()
    );
    tokio::time::sleep(Duration::from_millis(args.cut_ms)).await;
    seen.dark.store(true, Ordering::Relaxed);
    println!(
        "--- [{:>5.2}s] {} is dark ---",
        start.elapsed().as_secs_f64(),
        victim.region
    );
    progress(mesh, &seen, Duration::from_secs(args.outage), start).await;
    let lost = lost_changes(mesh).await?;
    sidecars[VICTIM].start().await?;
    println!(
        "--- [{:>5.2}s] {} is back: its sidecar restarts on the same database ---",
        start.elapsed().as_secs_f64(),
        victim.region
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    seen.stop.store(true, Ordering::Relaxed);
    while let Some(result) = writers.join_next().await {
        result??;
    }
    let converged = mesh.wait_converged(Duration::from_secs(90)).await;
    report(mesh, &seen, &before, &lost, converged).await
}

/// Progress once a second for `length`.
async fn progress(mesh: &LoopbackMesh, seen: &Seen, length: Duration, start: Instant) {
    let end = Instant::now() + length;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(1).min(end - Instant::now())).await;
        let mut line = format!("[{:>5.2}s]", start.elapsed().as_secs_f64());
        for (i, region) in mesh.regions.iter().enumerate() {
            let applied = super::compare::sqlite_progress(&region.app)
                .await
                .map(|(_, _, f)| f.values().sum::<u64>())
                .unwrap_or_default();
            line += &format!(
                "  {}: committed {} applied {} |",
                region.region,
                seen.written[i].load(Ordering::Relaxed),
                applied
            );
        }
        println!("{}", line.trim_end_matches(" |"));
    }
}

/// What `weft status` shows of a node's sending side.
struct Before {
    unacked: u64,
    oldest_ms: f64,
    outbox: u64,
}

async fn status_of(config: &Path) -> anyhow::Result<Before> {
    let status = crate::store::Store::status_of(&NodeConfig::load(config)?).await?;
    let now = crate::clock::now_micros();
    let own = status.peers.iter().filter(|p| p.origin == status.node);
    Ok(Before {
        unacked: own.clone().map(|p| p.unacked).max().unwrap_or(0),
        oldest_ms: own
            .filter_map(|p| p.oldest_unacked_micros)
            .map(|at| (now - at) as f64 / 1000.0)
            .fold(0.0, f64::max),
        outbox: status.outbox_pending,
    })
}

/// The failover, run on the heir's node as `weft ownership failover` runs it: rows moved,
/// and how long it took.
async fn fail_over(mesh: &LoopbackMesh) -> anyhow::Result<(u64, Duration)> {
    use crate::store::admin::{Admin, Failover};
    let began = Instant::now();
    let config = NodeConfig::load(&mesh.regions[HEIR].config_file)?;
    let admin = Admin::open(config).await?;
    let moved = admin
        .failover(&Failover {
            from: mesh.regions[VICTIM].region.clone(),
            to: mesh.regions[HEIR].region.clone(),
            table: None,
            by: "weft drill".into(),
        })
        .await?;
    Ok((moved.iter().map(|(_, n)| n).sum(), began.elapsed()))
}

/// The changes committed in the dark region that no other region had: its captured events
/// past every survivor's frontier, and what its outbox held uncaptured, as (table, key).
struct Lost {
    captured: Vec<(String, String)>,
    uncaptured: Vec<(String, String)>,
}

async fn lost_changes(mesh: &LoopbackMesh) -> anyhow::Result<Lost> {
    let victim = &mesh.regions[VICTIM];
    let mut had = 0;
    for region in mesh.regions.iter().filter(|r| r.node_id != victim.node_id) {
        let (_, _, frontiers) = super::compare::sqlite_progress(&region.app).await?;
        had = had.max(frontiers.get(&victim.node_id).copied().unwrap_or(0));
    }
    let events: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT event FROM _weft_log WHERE origin = ? AND seq > ? ORDER BY seq")
            .bind(&victim.node_id)
            .bind(had as i64)
            .fetch_all(&victim.app)
            .await?;
    let mut captured = Vec::new();
    for bytes in events {
        let event = crate::wire::decode_event(&bytes).context("a logged event does not decode")?;
        captured.push((event.table, event.key.to_string()));
    }
    let pending: Vec<(String, String, String)> =
        sqlx::query_as("SELECT tbl, typeof(k1), CAST(k1 AS TEXT) FROM _weft_outbox ORDER BY id")
            .fetch_all(&victim.app)
            .await?;
    let uncaptured = pending
        .into_iter()
        .map(|(table, kind, text)| {
            let value = match (kind.as_str(), text.parse()) {
                ("integer", Ok(i)) => Value::Integer(i),
                _ => Value::Text(text),
            };
            (table, Key(vec![value]).to_string())
        })
        .collect();
    Ok(Lost { captured, uncaptured })
}

fn by_table(changes: &[(String, String)]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (table, _) in changes {
        *counts.entry(table).or_default() += 1;
    }
    let parts: Vec<String> = counts.iter().map(|(t, n)| format!("{t} {n}")).collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

async fn report(
    mesh: &LoopbackMesh,
    seen: &Seen,
    before: &Before,
    lost: &Lost,
    converged: anyhow::Result<Duration>,
) -> anyhow::Result<()> {
    let victim = &mesh.regions[VICTIM];
    let all: Vec<(String, String)> = lost.captured.iter().chain(&lost.uncaptured).cloned().collect();
    println!(
        "\nRPO, measured: {} change(s) committed in {} that no other region had ({}): {} captured but not \
         received by any peer (status showed {} unacknowledged just before the kill), {} committed after it",
        all.len(),
        victim.region,
        by_table(&all),
        lost.captured.len(),
        before.unacked,
        lost.uncaptured.len()
    );
    for (table, key) in all.iter().take(12) {
        println!("    {table} {key}");
    }
    if all.len() > 12 {
        println!("    ... and {} more", all.len() - 12);
    }
    let killed = seen.killed_at.load(Ordering::Relaxed);
    let ms = |at: &AtomicU64| (at.load(Ordering::Relaxed).saturating_sub(killed)) as f64 / 1000.0;
    let heir = &mesh.regions[HEIR].region;
    println!(
        "RTO, ownership: {}'s accounts accepted writes in {heir} {:.0} ms after the kill (the failover's commit; \
         goal 5 s; the drill detects the loss at once, a deployment adds its detection time)",
        victim.region,
        ms(&seen.failed_over_at)
    );
    match seen.took_over_at.load(Ordering::Relaxed) {
        0 => println!("    no surviving application wrote one of them during the outage"),
        _ => println!(
            "    {heir}'s application wrote the first of them {:.0} ms after the kill",
            ms(&seen.took_over_at)
        ),
    }
    println!(
        "RTO, LWW and CRDT: writes never stopped; {} failed in the surviving regions, the longest gap between two commits of one was {:.0} ms",
        seen.survivor_errors.load(Ordering::Relaxed),
        seen.longest_gap.load(Ordering::Relaxed) as f64 / 1000.0
    );
    let took = converged.context("the regions did NOT converge after the lost region came back")?;
    let lost_accounts: BTreeSet<String> = all
        .iter()
        .filter(|(t, _)| t == "accounts")
        .map(|(_, k)| k.clone())
        .collect();
    let fenced = check_fenced(mesh, &lost_accounts).await?;
    check_stock(mesh, seen.sold.load(Ordering::Relaxed)).await?;
    println!(
        "{} writes to another region's account were refused at their source",
        seen.refused.load(Ordering::Relaxed)
    );
    println!(
        "\nCONVERGED: all {} regions hold identical rows and row metadata {} ms after the last write; {}'s lost \
         profile and inventory changes were delivered on its return; the {} account row(s) it wrote unseen are among \
         the {} fenced dead letters every region lists alike (weft dead-letters list --cause fenced)",
        mesh.regions.len(),
        took.as_millis(),
        victim.region,
        lost_accounts.len(),
        fenced.len()
    );
    Ok(())
}

/// Every region lists the same fenced rows (whatever order things arrived in), and they
/// include every account row the dark region wrote and nobody had. They may include more:
/// a write the heir had not received when it failed over, though a third region had.
async fn check_fenced(mesh: &LoopbackMesh, lost: &BTreeSet<String>) -> anyhow::Result<BTreeSet<String>> {
    let mut listed: Option<BTreeSet<String>> = None;
    for region in &mesh.regions {
        let keys: Vec<String> = sqlx::query_scalar("SELECT key FROM _weft_dead_letters WHERE cause = 'fenced'")
            .fetch_all(&region.app)
            .await?;
        let keys: BTreeSet<String> = keys.into_iter().collect();
        let other: i64 = sqlx::query_scalar("SELECT count(*) FROM _weft_dead_letters WHERE cause <> 'fenced'")
            .fetch_one(&region.app)
            .await?;
        anyhow::ensure!(
            other == 0,
            "{}: {other} dead letter(s) besides the fenced ones",
            region.region
        );
        anyhow::ensure!(
            keys.is_superset(lost),
            "{}: fenced letters for {keys:?}, but the lost account writes were to {lost:?}",
            region.region
        );
        if let Some(first) = &listed {
            anyhow::ensure!(
                *first == keys,
                "{} lists other fenced rows ({keys:?}) than {} ({first:?})",
                region.region,
                mesh.regions[0].region
            );
        }
        listed = Some(keys);
    }
    Ok(listed.unwrap_or_default())
}

/// CRDT: every sale made anywhere, the lost region's included, is in every region's stock.
async fn check_stock(mesh: &LoopbackMesh, sold: u64) -> anyhow::Result<()> {
    let expected = STOCK_ITEMS * STOCK_EACH - sold as i64;
    for region in &mesh.regions {
        let total: i64 = sqlx::query_scalar("SELECT sum(qty) FROM inventory")
            .fetch_one(&region.app)
            .await?;
        anyhow::ensure!(
            total == expected,
            "{}: stock {total}, expected {expected}: a sale was lost",
            region.region
        );
    }
    println!("inventory (CRDT counter): {sold} sales, every one in every region's stock");
    Ok(())
}
