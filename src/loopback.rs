//! A whole mesh on one machine: N regions on loopback, each with its own SQLite file, its
//! own config files and its own sidecar, plus an application connection per region.
//!
//! Used by `weft demo`, `weft bench` and the tests. It writes real topology and node config
//! files (and loads them back through `NodeConfig::load`), so what runs here is what a user
//! deploys. Convergence is checked by reading the databases, never by trusting the nodes.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

use crate::config::{NodeConfig, ReplicationConfig, TableConfig};
use crate::node::Node;
use crate::store::sqlite;
use crate::telemetry::Metrics;

pub struct Region {
    pub region: String,
    pub node_id: String,
    pub db: PathBuf,
    pub config_file: PathBuf,
    /// The application's own connection pool to the region's database.
    pub app: SqlitePool,
    pub node: Option<Node>,
    /// Figures kept across restarts of the node.
    pub metrics: Arc<Metrics>,
}

pub struct LoopbackMesh {
    pub dir: PathBuf,
    pub regions: Vec<Region>,
    pub tables: Vec<String>,
    pub topology_file: PathBuf,
}

/// Ports the OS says are free right now.
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    listeners.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// An application's connection pool: WAL, and a busy timeout so it waits for the sidecar.
pub async fn app_pool(db: &Path) -> Result<SqlitePool, sqlx::Error> {
    let options = SqliteConnectOptions::new()
        .filename(db)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(30));
    SqlitePoolOptions::new().max_connections(4).connect_with(options).await
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

impl LoopbackMesh {
    /// Creates the files of a mesh in `dir`: topology, one config and one database per region
    /// (with `schema` applied by the application). No node is started yet.
    pub async fn create(
        dir: &Path,
        regions: &[&str],
        schema: &str,
        tables: &[TableConfig],
        replication: &ReplicationConfig,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ports = free_ports(regions.len())?;
        let mut topology = String::from("version = 1\nmesh = \"loopback\"\nshape = \"all-to-all\"\n");
        for (region, port) in regions.iter().zip(&ports) {
            topology +=
                &format!("\n[[nodes]]\nid = \"{region}-1\"\nregion = \"{region}\"\naddress = \"127.0.0.1:{port}\"\n");
        }
        let topology_file = dir.join("topology.toml");
        std::fs::write(&topology_file, topology)?;
        let replication_toml = toml::to_string(replication)?;
        let mut out = Vec::new();
        for region in regions {
            let node_id = format!("{region}-1");
            let db = dir.join(format!("{region}.db"));
            let mut config = format!(
                "version = 1\nnode = \"{node_id}\"\ntopology = \"topology.toml\"\ndatabase = {}\n",
                toml_string(&format!("sqlite://{region}.db"))
            );
            for table in tables {
                config += &format!(
                    "\n[[tables]]\nname = \"{}\"\nstrategy = \"{}\"\n",
                    table.name,
                    serde_json::to_value(table.strategy)?.as_str().unwrap_or("lww")
                );
            }
            config += &format!("\n[replication]\n{replication_toml}");
            let config_file = dir.join(format!("{node_id}.toml"));
            std::fs::write(&config_file, config)?;
            let app = app_pool(&db).await?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(schema.to_owned()))
                .execute(&app)
                .await?;
            out.push(Region {
                region: region.to_string(),
                node_id,
                db,
                config_file,
                app,
                node: None,
                metrics: Arc::new(Metrics::default()),
            });
        }
        Ok(Self {
            dir: dir.to_owned(),
            regions: out,
            tables: tables.iter().map(|t| t.name.clone()).collect(),
            topology_file,
        })
    }

    pub async fn start(&mut self, i: usize) -> anyhow::Result<()> {
        let region = &mut self.regions[i];
        let config = NodeConfig::load(&region.config_file)?;
        region.node = Some(Node::start_with_metrics(config, region.metrics.clone()).await?);
        Ok(())
    }

    pub async fn start_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.regions.len() {
            self.start(i).await?;
        }
        Ok(())
    }

    pub async fn stop(&mut self, i: usize) {
        if let Some(node) = self.regions[i].node.take() {
            node.stop().await;
        }
    }

    pub async fn stop_all(&mut self) {
        for i in 0..self.regions.len() {
            self.stop(i).await;
        }
    }

    /// Waits until every region has captured all its application writes and applied every
    /// other region's events, then compares the databases. Errors if that does not happen
    /// by `deadline` or if the contents differ.
    pub async fn wait_converged(&self, deadline: Duration) -> anyhow::Result<Duration> {
        let started = std::time::Instant::now();
        loop {
            let mut caught_up = true;
            let mut states = Vec::new();
            for region in &self.regions {
                states.push((region.node_id.clone(), sqlite::progress(&region.app).await?));
            }
            for (node, (last, pending, _)) in &states {
                if *pending > 0 {
                    caught_up = false;
                }
                for (other, (_, _, frontiers)) in &states {
                    if other != node && frontiers.get(node).copied().unwrap_or(0) != *last {
                        caught_up = false;
                    }
                }
            }
            if caught_up {
                let elapsed = started.elapsed();
                self.assert_identical().await?;
                return Ok(elapsed);
            }
            if started.elapsed() > deadline {
                bail!("regions did not catch up within {deadline:?}: {states:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn snapshots(&self) -> anyhow::Result<Vec<BTreeMap<String, Vec<String>>>> {
        let mut out = Vec::new();
        for region in &self.regions {
            out.push(sqlite::snapshot(&region.app, &self.tables).await?);
        }
        Ok(out)
    }

    /// Compares every region's rows and row metadata with the first region's.
    pub async fn assert_identical(&self) -> anyhow::Result<()> {
        let snapshots = self.snapshots().await?;
        let first = &snapshots[0];
        for (region, snapshot) in self.regions.iter().zip(&snapshots).skip(1) {
            for (table, rows) in first {
                let theirs = &snapshot[table];
                if rows != theirs {
                    let differing = rows
                        .iter()
                        .zip(theirs)
                        .position(|(a, b)| a != b)
                        .unwrap_or(rows.len().min(theirs.len()));
                    bail!(
                        "{} and {} differ in {table}: {} vs {} rows; first difference at row {differing}: {:?} vs {:?}",
                        self.regions[0].region,
                        region.region,
                        rows.len(),
                        theirs.len(),
                        rows.get(differing),
                        theirs.get(differing)
                    );
                }
            }
        }
        Ok(())
    }
}
