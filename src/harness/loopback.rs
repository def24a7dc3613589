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

use super::compare;
use crate::config::{NodeConfig, NodeSpec, ReplicationConfig, Shape, TableConfig, Topology};
use crate::node::Node;
use crate::store::sqlite::app_pool;
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
    /// The topology as written, with its loopback addresses.
    pub topology: Topology,
}

/// Ports the OS says are free right now.
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    listeners.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

impl LoopbackMesh {
    /// An all-to-all topology of one node per region (`{region}-1`), for `create`.
    pub fn all_to_all(regions: &[&str]) -> Topology {
        Topology {
            version: crate::config::CONFIG_VERSION,
            mesh: "loopback".into(),
            shape: Shape::AllToAll,
            bidirectional: false,
            order: None,
            hub: None,
            transport: Default::default(),
            links: Vec::new(),
            kafka: None,
            nodes: regions
                .iter()
                .map(|r| NodeSpec {
                    id: format!("{r}-1"),
                    region: r.to_string(),
                    address: String::new(),
                })
                .collect(),
        }
    }

    /// Creates the files of a mesh in `dir`: the topology (its shape and nodes, on fresh
    /// loopback ports), one config and one database per node (with `schema` applied by the
    /// application). No node is started yet.
    pub async fn create(
        dir: &Path,
        topology: &Topology,
        schema: &str,
        tables: &[TableConfig],
        replication: &ReplicationConfig,
    ) -> anyhow::Result<Self> {
        Self::create_with(dir, topology, schema, tables, replication, true).await
    }

    /// `create`, over mutual TLS with certificates minted into `dir/certs` (`tls`), or in
    /// plain text (`insecure = true`).
    pub async fn create_with(
        dir: &Path,
        topology: &Topology,
        schema: &str,
        tables: &[TableConfig],
        replication: &ReplicationConfig,
        tls: bool,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut topology = topology.clone();
        let ports = free_ports(topology.nodes.len())?;
        for (node, port) in topology.nodes.iter_mut().zip(ports) {
            node.address = format!("127.0.0.1:{port}");
        }
        topology.validate(Path::new("loopback topology"))?;
        let topology_file = dir.join("topology.toml");
        std::fs::write(&topology_file, toml::to_string(&topology)?)?;
        let replication_toml = toml::to_string(replication)?;
        if tls {
            mint_certs(dir, &topology)?;
        }
        let mut out = Vec::new();
        for node in &topology.nodes {
            let db = dir.join(format!("{}.db", node.id));
            let mut config = format!(
                "version = 1\nnode = \"{}\"\ntopology = \"topology.toml\"\ndatabase = {}\n",
                node.id,
                toml_string(&format!("sqlite://{}.db", node.id))
            );
            #[derive(serde::Serialize)]
            struct Tables<'a> {
                tables: &'a [TableConfig],
            }
            config += &format!("\n{}", toml::to_string(&Tables { tables })?);
            config += &format!("\n[replication]\n{replication_toml}");
            config += &tls_section(&node.id, tls);
            let config_file = dir.join(format!("{}.toml", node.id));
            std::fs::write(&config_file, config)?;
            let app = app_pool(&db).await?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(schema.to_owned()))
                .execute(&app)
                .await?;
            out.push(Region {
                region: node.region.clone(),
                node_id: node.id.clone(),
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
            topology,
        })
    }

    /// Each region's application creates its accounts: ids `region index * 1000 + 0..each`,
    /// `home_region` its own, balance 0 (the demo's and the drill's `ownership` table).
    pub async fn seed_accounts(&self, each: i64) -> anyhow::Result<()> {
        for (i, region) in self.regions.iter().enumerate() {
            for n in 0..each {
                sqlx::query("INSERT INTO accounts (id, home_region, balance) VALUES (?, ?, 0)")
                    .bind(i as i64 * 1000 + n)
                    .bind(&region.region)
                    .execute(&region.app)
                    .await?;
            }
        }
        Ok(())
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
                states.push((region.node_id.clone(), compare::sqlite_progress(&region.app).await?));
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
            out.push(compare::sqlite_rendering(&region.app, &self.tables).await?);
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

/// Mints a CA and a certificate per node of `topology` into `dir/certs`.
pub fn mint_certs(dir: &Path, topology: &Topology) -> anyhow::Result<()> {
    let options = crate::transport::tls::MintOptions {
        nodes: topology.nodes.iter().map(|n| n.id.clone()).collect(),
        not_before: None,
        days: 30,
        mesh: topology.mesh.clone(),
    };
    crate::transport::tls::mint(&dir.join("certs"), &options)?;
    Ok(())
}

/// The `[tls]` section of node `id`'s config in a folder made by `mint_certs`, or
/// `insecure = true`.
pub fn tls_section(id: &str, tls: bool) -> String {
    match tls {
        true => format!("\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/{id}.pem\"\nkey = \"certs/{id}.key\"\n"),
        false => "\n[tls]\ninsecure = true\n".to_owned(),
    }
}
