//! `weft bench --store postgres`: weft against PostgreSQL's own logical replication, side by
//! side, on the same rows.
//!
//! Two throw-away clusters on loopback, both durable (fsync on, synchronous_commit on; weft
//! commits each applied run durably before acknowledging it, and a native subscription
//! re-requests from its slot whatever it had not flushed, so neither loses an acknowledged
//! row). Writes go one way, from a database on the first cluster to one on the second. The
//! weft phase runs two in-process sidecars over gRPC; the native phase a publication and a
//! subscription. Both phases get the same application workload, and both are measured the
//! same way from the target table: each row's `written_at` (set by the source) and
//! `applied_at` (a default on the target, set when the row lands). Throughput is rows over
//! the time from the first write to the last landing; lag is `applied_at - written_at`,
//! after the first second.
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::config::{NodeConfig, ReplicationConfig, TableConfig};
use crate::harness::cluster::{Cluster, Settings};
use crate::harness::loopback::LoopbackMesh;
use crate::node::Node;

const SOURCE: &str = "CREATE TABLE bench (id bigint PRIMARY KEY, origin text NOT NULL, n bigint NOT NULL, \
                      payload text NOT NULL, written_at timestamptz NOT NULL DEFAULT clock_timestamp())";
const TARGET: &str = "CREATE TABLE bench (id bigint PRIMARY KEY, origin text NOT NULL, n bigint NOT NULL, \
                      payload text NOT NULL, written_at timestamptz NOT NULL, \
                      applied_at timestamptz NOT NULL DEFAULT clock_timestamp())";

struct Figures {
    rows: i64,
    write_rate: f64,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

async fn pool(url: &str) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new().max_connections(4).connect(url).await?)
}

/// The application: `rate` rows/s in transactions of `rate / 100` rows, or (rate 0) as fast
/// as one connection commits transactions of `txn_rows` rows, for `duration`.
async fn write(app: &PgPool, rate: u64, txn_rows: u64, duration: Duration) -> anyhow::Result<(i64, Duration)> {
    let (rows, period) = if rate == 0 {
        (txn_rows.max(1) as i64, Duration::ZERO)
    } else {
        (((rate / 100).max(1)) as i64, Duration::from_millis(10))
    };
    let mut tick = (!period.is_zero()).then(|| tokio::time::interval(period));
    let started = Instant::now();
    let mut next = 0i64;
    while started.elapsed() < duration {
        if let Some(tick) = &mut tick {
            tick.tick().await;
        }
        sqlx::query(
            "INSERT INTO bench (id, origin, n, payload) \
             SELECT i, 'east', i & 65535, 'a typical row of payload text, about sixty bytes long......' \
             FROM generate_series($1::int8, $2::int8) i",
        )
        .bind(next + 1)
        .bind(next + rows)
        .execute(app)
        .await?;
        next += rows;
    }
    Ok((next, started.elapsed()))
}

/// Waits until `rows` rows have landed in the target, then measures them.
async fn measure(target: &PgPool, rows: i64, writing: Duration) -> anyhow::Result<Figures> {
    let started = Instant::now();
    loop {
        let landed: i64 = sqlx::query_scalar("SELECT count(*) FROM bench")
            .fetch_one(target)
            .await?;
        if landed >= rows {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "only {landed} of {rows} rows landed in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (span, p50, p99, max): (f64, f64, f64, f64) = sqlx::query_as(
        "WITH b AS (SELECT written_at, applied_at, \
                    extract(epoch FROM applied_at - written_at)::float8 * 1000 AS lag FROM bench), \
              steady AS (SELECT lag FROM b WHERE written_at > (SELECT min(written_at) FROM b) + interval '1 second') \
         SELECT extract(epoch FROM (SELECT max(applied_at) - min(written_at) FROM b))::float8, \
                coalesce((SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY lag) FROM steady), 0), \
                coalesce((SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY lag) FROM steady), 0), \
                coalesce((SELECT max(lag) FROM steady), 0)",
    )
    .fetch_one(target)
    .await?;
    Ok(Figures {
        rows,
        write_rate: rows as f64 / writing.as_secs_f64(),
        rate: rows as f64 / span.max(1e-9),
        p50_ms: p50,
        p99_ms: p99,
        max_ms: max,
    })
}

async fn weft_phase(
    dir: &std::path::Path,
    source: &Cluster,
    target: &Cluster,
    args: &super::bench::Args,
) -> anyhow::Result<Figures> {
    let east = source.create_database("weft_east").await?;
    let west = target.create_database("weft_west").await?;
    let (east_app, west_app) = (pool(&east).await?, pool(&west).await?);
    sqlx::raw_sql(SOURCE).execute(&east_app).await?;
    sqlx::raw_sql(TARGET).execute(&west_app).await?;
    let topology_file = dir.join("topology.toml");
    let mut topology = LoopbackMesh::all_to_all(&["east", "west"]);
    for (node, port) in topology.nodes.iter_mut().zip(crate::harness::loopback::free_ports(2)?) {
        node.address = format!("127.0.0.1:{port}");
    }
    std::fs::write(&topology_file, toml::to_string(&topology)?)?;
    #[derive(serde::Serialize)]
    struct Tables<'a> {
        tables: &'a [TableConfig],
    }
    let tables = toml::to_string(&Tables {
        tables: &[TableConfig::lww("bench")],
    })?;
    let replication = toml::to_string(&ReplicationConfig::default())?;
    super::loopback::mint_certs(dir, &topology)?;
    let mut nodes = Vec::new();
    for (node, url) in [("east-1", &east), ("west-1", &west)] {
        let file = dir.join(format!("{node}.toml"));
        std::fs::write(
            &file,
            format!(
                "version = 1\nnode = \"{node}\"\ntopology = \"topology.toml\"\ndatabase = \"{url}\"\n\n{tables}\n[replication]\n{replication}{}",
                super::loopback::tls_section(node, true)
            ),
        )?;
        nodes.push(Node::start(NodeConfig::load(&file)?).await?);
    }
    let (rows, writing) = write(&east_app, args.rate, args.txn_rows, Duration::from_secs(args.duration)).await?;
    let figures = measure(&west_app, rows, writing).await;
    for node in nodes {
        node.stop().await;
    }
    figures
}

async fn native_phase(source: &Cluster, target: &Cluster, args: &super::bench::Args) -> anyhow::Result<Figures> {
    let src = source.create_database("native_src").await?;
    let dst = target.create_database("native_dst").await?;
    let (src_app, dst_app) = (pool(&src).await?, pool(&dst).await?);
    sqlx::raw_sql(SOURCE).execute(&src_app).await?;
    sqlx::raw_sql("CREATE PUBLICATION bench_pub FOR TABLE bench")
        .execute(&src_app)
        .await?;
    sqlx::raw_sql(TARGET).execute(&dst_app).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE SUBSCRIPTION bench_sub CONNECTION 'host=127.0.0.1 port={} user=postgres dbname=native_src' PUBLICATION bench_pub",
        source.port
    )))
    .execute(&dst_app)
    .await
    .context("creating the native subscription")?;
    // Wait for the (empty) initial copy to finish, so the stream is live.
    let started = Instant::now();
    loop {
        let ready: bool = sqlx::query_scalar("SELECT bool_and(srsubstate = 'r') FROM pg_subscription_rel")
            .fetch_one(&dst_app)
            .await?;
        if ready {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the subscription never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (rows, writing) = write(&src_app, args.rate, args.txn_rows, Duration::from_secs(args.duration)).await?;
    let figures = measure(&dst_app, rows, writing).await;
    sqlx::raw_sql("DROP SUBSCRIPTION bench_sub").execute(&dst_app).await?;
    figures
}

pub async fn run(args: super::bench::Args) -> anyhow::Result<()> {
    let (dir, _temp) = super::work_dir(args.dir.as_deref())?;
    std::fs::create_dir_all(&dir)?;
    let durable = Settings {
        durable: true,
        logical: true,
    };
    let source = Cluster::start(durable.clone())?;
    let target = Cluster::start(durable)?;
    let mode = if args.rate == 0 {
        format!("as fast as possible, {} rows per transaction", args.txn_rows)
    } else {
        format!("{} rows/s", args.rate)
    };
    println!(
        "weft bench --store postgres: two PostgreSQL clusters on loopback (fsync on, synchronous_commit on), \
         one way, {mode}, {} s per system",
        args.duration
    );
    let weft = weft_phase(&dir, &source, &target, &args).await?;
    let native = native_phase(&source, &target, &args).await?;
    println!("\nsystem                    rows    written/s   landed/s (end to end)   lag p50   lag p99   lag max");
    for (name, f) in [("weft", &weft), ("native logical repl.", &native)] {
        println!(
            "{name:<21} {:>8} {:>11.0} {:>22.0} {:>8.2}ms {:>7.2}ms {:>7.2}ms",
            f.rows, f.write_rate, f.rate, f.p50_ms, f.p99_ms, f.max_ms
        );
    }
    println!(
        "\nratio weft / native: throughput {:.2}x, lag p99 {:.2}x (goal: throughput >= 2x; p99 lag <= 1x at 1k rows/s)",
        weft.rate / native.rate.max(1e-9),
        weft.p99_ms / native.p99_ms.max(1e-9)
    );
    Ok(())
}
