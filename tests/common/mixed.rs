//! A mesh of real `weft run` processes whose regions sit on SQLite files or on databases of a
//! throw-away PostgreSQL cluster, with an application writing into each region and the
//! exactly-once check (the application's own audit triggers: a row per insert and per update
//! of `items`, which only ever gets fresh inserts, so a lost event is a missing row and an
//! event applied twice is an `update` audit row). Each transaction also takes its item count
//! from the CRDT counter `stock` 1, which must end at minus the items everywhere.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::{PgPool, SqlitePool};
use weft::harness::cluster::{Cluster, Settings};

use super::regions::App;

const SQLITE_SCHEMA: &str = "
CREATE TABLE items (id INTEGER PRIMARY KEY, origin TEXT NOT NULL, v INTEGER NOT NULL);
CREATE TABLE shared (id INTEGER PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE stock (id INTEGER PRIMARY KEY, qty INTEGER NOT NULL);
CREATE TABLE audit (id INTEGER NOT NULL, op TEXT NOT NULL);
CREATE TRIGGER items_audit_insert AFTER INSERT ON items BEGIN INSERT INTO audit VALUES (NEW.id, 'insert'); END;
CREATE TRIGGER items_audit_update AFTER UPDATE ON items BEGIN INSERT INTO audit VALUES (NEW.id, 'update'); END;
";

const PG_SCHEMA: &str = "
CREATE TABLE items (id bigint PRIMARY KEY, origin text NOT NULL, v bigint NOT NULL);
CREATE TABLE shared (id bigint PRIMARY KEY, v text NOT NULL);
CREATE TABLE stock (id bigint PRIMARY KEY, qty bigint NOT NULL);
CREATE TABLE audit (id bigint NOT NULL, op text NOT NULL);
CREATE FUNCTION audit_items() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO audit VALUES (NEW.id, lower(TG_OP)); RETURN NULL; END $$;
CREATE TRIGGER items_audit AFTER INSERT OR UPDATE ON items FOR EACH ROW EXECUTE FUNCTION audit_items();
-- weft applies as a replica, where ordinary triggers do not fire; this check must see applied writes too.
ALTER TABLE items ENABLE ALWAYS TRIGGER items_audit;
";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Sqlite,
    Postgres,
}

pub struct Region {
    pub node: String,
    pub address: String,
    pub config: PathBuf,
    pub app: App,
}

pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub cluster: Option<Cluster>,
    pub regions: Vec<Region>,
    children: Mutex<Vec<Option<Child>>>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Mesh {
    /// An all-to-all mesh with one region per entry of `kinds` (nodes r0, r1, ...).
    pub async fn new(kinds: &[Kind]) -> Mesh {
        Self::shaped(kinds, "shape = \"all-to-all\"").await
    }

    /// A mesh of the given shape (`shape = "ring"`, ...), nodes in order r0, r1, ...
    pub async fn shaped(kinds: &[Kind], shape: &str) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let cluster = kinds
            .contains(&Kind::Postgres)
            .then(|| Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster"));
        let mut topology = format!("version = 1\nmesh = \"mixed\"\n{shape}\n");
        let mut regions = Vec::new();
        for (i, kind) in kinds.iter().enumerate() {
            let node = format!("r{i}");
            let address = format!("127.0.0.1:{}", free_port());
            topology += &format!("[[nodes]]\nid = \"{node}\"\nregion = \"region-{i}\"\naddress = \"{address}\"\n");
            let (database, app) = match kind {
                Kind::Sqlite => {
                    let path = dir.path().join(format!("{node}.db"));
                    let app = weft::harness::app_pool(&path).await.unwrap();
                    sqlx::raw_sql(SQLITE_SCHEMA).execute(&app).await.unwrap();
                    (format!("sqlite://{}", path.display()), App::Sqlite(app))
                }
                Kind::Postgres => {
                    let url = cluster.as_ref().unwrap().create_database(&node).await.unwrap();
                    let app = sqlx::postgres::PgPoolOptions::new()
                        .max_connections(2)
                        .connect(&url)
                        .await
                        .unwrap();
                    sqlx::raw_sql(PG_SCHEMA).execute(&app).await.unwrap();
                    (url, App::Pg(app))
                }
            };
            let config = dir.path().join(format!("{node}.toml"));
            std::fs::write(
                &config,
                format!(
                    "version = 1\nnode = \"{node}\"\ntopology = \"topology.toml\"\ndatabase = \"{database}\"\n\
                     [replication]\nheartbeat_ms = 200\npeer_timeout_ms = 2000\n\
                     [[tables]]\nname = \"items\"\nstrategy = \"lww\"\n[[tables]]\nname = \"shared\"\nstrategy = \"lww\"\n\
                     [[tables]]\nname = \"stock\"\nstrategy = \"crdt\"\ncolumns = {{ qty = \"counter\" }}\n{}",
                    weft::harness::loopback::tls_section(&node, true)
                ),
            )
            .unwrap();
            regions.push(Region {
                node,
                address,
                config,
                app,
            });
        }
        std::fs::write(dir.path().join("topology.toml"), &topology).unwrap();
        let parsed = weft::config::Topology::parse(&topology, std::path::Path::new("topology.toml")).unwrap();
        weft::harness::loopback::mint_certs(dir.path(), &parsed).unwrap();
        let children = Mutex::new(regions.iter().map(|_| None).collect());
        Mesh {
            dir,
            cluster,
            regions,
            children,
        }
    }

    pub fn log(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("r{i}.log"))
    }

    pub async fn spawn(&self, i: usize, crashpoint: Option<&str>) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(i))
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_weft"));
        command
            .args(["run", "--config"])
            .arg(&self.regions[i].config)
            .env("RUST_LOG", "weft=info")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(point) = crashpoint {
            command.env("WEFT_CRASHPOINT", point);
        }
        self.children.lock().unwrap()[i] = Some(command.spawn().expect("spawning weft run"));
        let started = Instant::now();
        while tokio::net::TcpStream::connect(&self.regions[i].address).await.is_err() {
            if let Some(status) = self.children.lock().unwrap()[i].as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "weft run r{i} exited early with {status}: {}",
                    std::fs::read_to_string(self.log(i)).unwrap_or_default()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "r{i} never started listening"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn spawn_all(&self) {
        for i in 0..self.regions.len() {
            self.spawn(i, None).await;
        }
    }

    pub fn kill9(&self, i: usize) {
        if let Some(mut child) = self.children.lock().unwrap()[i].take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to region `i`'s sidecar.
    pub fn signal(&self, i: usize, signal: &str) {
        if let Some(child) = &self.children.lock().unwrap()[i] {
            Command::new("kill")
                .args([&format!("-{signal}"), &child.id().to_string()])
                .status()
                .unwrap();
        }
    }

    /// Cuts every connection weft has to region `i`'s PostgreSQL database, as a network
    /// failure or an administrator would. `Err` if the server is down.
    pub async fn drop_connections(&self, i: usize) -> Result<u64, sqlx::Error> {
        let App::Pg(pool) = &self.regions[i].app else {
            return Ok(0);
        };
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'weft' AND datname = current_database()",
        )
        .fetch_all(pool)
        .await?;
        Ok(killed.len() as u64)
    }

    /// Like `write`, but retries until the transaction is known to have committed: after
    /// an error (the server may be restarting) the rows are looked for, since a commit can
    /// succeed even when its reply is lost.
    pub async fn write_surely(&self, i: usize, first: i64, n: i64) {
        let started = Instant::now();
        loop {
            if self.write(i, first, n).await.is_ok() {
                return;
            }
            let id = (i as i64) * 1_000_000 + first;
            let found = match &self.regions[i].app {
                App::Sqlite(pool) => sqlx::query_scalar::<_, i64>("SELECT count(*) FROM items WHERE id = ?")
                    .bind(id)
                    .fetch_one(pool)
                    .await
                    .ok(),
                App::Pg(pool) => sqlx::query_scalar::<_, i64>("SELECT count(*) FROM items WHERE id = $1")
                    .bind(id)
                    .fetch_one(pool)
                    .await
                    .ok(),
            };
            if found == Some(1) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "r{i} could not write for a minute"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `Some(status)` once region `i`'s sidecar has exited (and forgets it).
    pub fn exited(&self, i: usize) -> Option<std::process::ExitStatus> {
        let mut children = self.children.lock().unwrap();
        let status = children[i].as_mut()?.try_wait().unwrap();
        if status.is_some() {
            children[i] = None;
        }
        status
    }

    /// The application in region `i` runs `sql`.
    pub async fn exec(&self, i: usize, sql: &str) -> Result<(), sqlx::Error> {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match &self.regions[i].app {
            App::Sqlite(pool) => sqlx::raw_sql(sql).execute(pool).await.map(|_| ()),
            App::Pg(pool) => sqlx::raw_sql(sql).execute(pool).await.map(|_| ()),
        }
    }

    /// One application transaction in region `i`: `n` fresh items from `first`, an update
    /// of a hot row every region writes, and `n` taken from the CRDT counter `stock` 1
    /// (created at 0 by whichever region needs it first). `Err` if the database refused (it
    /// may be restarting); nothing of the transaction is then committed.
    pub async fn write(&self, i: usize, first: i64, n: i64) -> Result<(), sqlx::Error> {
        let origin = format!("r{i}");
        let hot = first % 5;
        let value = format!("r{i}-{first}");
        match &self.regions[i].app {
            App::Sqlite(pool) => {
                let mut tx = pool.begin().await?;
                for id in first..first + n {
                    sqlx::query("INSERT INTO items (id, origin, v) VALUES (?, ?, ?)")
                        .bind((i as i64) * 1_000_000 + id)
                        .bind(&origin)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query("INSERT INTO shared (id, v) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET v = excluded.v")
                    .bind(hot)
                    .bind(&value)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("INSERT INTO stock (id, qty) VALUES (1, 0) ON CONFLICT (id) DO NOTHING")
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE stock SET qty = qty - ? WHERE id = 1")
                    .bind(n)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await
            }
            App::Pg(pool) => {
                let mut tx = pool.begin().await?;
                let ids: Vec<i64> = (first..first + n).map(|id| (i as i64) * 1_000_000 + id).collect();
                let vs: Vec<i64> = (first..first + n).collect();
                sqlx::query("INSERT INTO items (id, origin, v) SELECT u.id, $3, u.v FROM unnest($1::int8[], $2::int8[]) u(id, v)")
                    .bind(ids)
                    .bind(vs)
                    .bind(&origin)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("INSERT INTO shared (id, v) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET v = excluded.v")
                    .bind(hot)
                    .bind(&value)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("INSERT INTO stock (id, qty) VALUES (1, 0) ON CONFLICT (id) DO NOTHING")
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE stock SET qty = qty - $1 WHERE id = 1")
                    .bind(n)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await
            }
        }
    }

    async fn progress(&self, i: usize) -> anyhow::Result<(u64, u64, BTreeMap<String, u64>)> {
        Ok(match &self.regions[i].app {
            App::Sqlite(pool) => weft::harness::compare::sqlite_progress(pool).await?,
            App::Pg(pool) => weft::harness::compare::postgres_progress(pool).await?,
        })
    }

    pub async fn snapshot(&self, i: usize) -> BTreeMap<String, Vec<String>> {
        let tables = ["items".to_string(), "shared".to_string(), "stock".to_string()];
        let mut out = match &self.regions[i].app {
            App::Sqlite(pool) => weft::harness::compare::sqlite_rendering(pool, &tables).await.unwrap(),
            App::Pg(pool) => weft::harness::compare::postgres_rendering(pool, &tables).await.unwrap(),
        };
        for rows in out.values_mut() {
            rows.sort();
        }
        out
    }

    /// Waits until every region has captured everything and applied everyone else's
    /// events, then requires identical rows and metadata everywhere.
    pub async fn wait_converged(&self, deadline: Duration) {
        let started = Instant::now();
        loop {
            let mut states = Vec::new();
            for i in 0..self.regions.len() {
                states.push(self.progress(i).await);
            }
            let caught_up = states.iter().all(|s| s.is_ok()) && {
                let states: Vec<_> = states.iter().map(|s| s.as_ref().unwrap()).collect();
                states.iter().enumerate().all(|(i, (last, pending, _))| {
                    *pending == 0
                        && states.iter().enumerate().all(|(j, (_, _, frontiers))| {
                            i == j || frontiers.get(&format!("r{i}")).copied().unwrap_or(0) == *last
                        })
                })
            };
            if caught_up {
                break;
            }
            if started.elapsed() > deadline {
                let logs: Vec<String> = (0..self.regions.len())
                    .map(|i| {
                        let log = std::fs::read_to_string(self.log(i)).unwrap_or_default();
                        let tail: Vec<&str> = log.lines().rev().take(15).collect();
                        format!(
                            "--- r{i} log tail:\n{}",
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        )
                    })
                    .collect();
                panic!(
                    "regions did not converge within {deadline:?}: {states:?}\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let first = self.snapshot(0).await;
        for i in 1..self.regions.len() {
            let other = self.snapshot(i).await;
            for (table, rows) in &first {
                assert_eq!(rows.len(), other[table].len(), "r0 and r{i} differ in {table}");
                assert_eq!(rows, &other[table], "r0 and r{i} differ in {table}");
            }
        }
    }

    /// Every region holds `expected` items, each inserted exactly once, and the counter
    /// `stock` 1 at minus `expected`.
    pub async fn assert_exactly_once(&self, expected: i64) {
        for (i, region) in self.regions.iter().enumerate() {
            let (rows, inserts, updates): (i64, i64, i64) = match &region.app {
                App::Sqlite(pool) => count3(pool).await,
                App::Pg(pool) => count3_pg(pool).await,
            };
            assert_eq!(rows, expected, "r{i} lost rows");
            assert_eq!(inserts, expected, "r{i}: inserts");
            assert_eq!(updates, 0, "r{i} applied an event twice");
            let stock = self.snapshot(i).await["stock"]
                .iter()
                .find(|row| row.starts_with("1 |"))
                .cloned();
            assert_eq!(
                stock,
                Some(format!("1 | {}", -expected)),
                "r{i}: the counter counts every committed transaction's take exactly once"
            );
        }
    }

    pub fn terminate_all(&self) {
        for (i, child) in self.children.lock().unwrap().iter_mut().enumerate() {
            if let Some(child) = child.take() {
                let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
                let _ = wait_with_timeout(child, Duration::from_secs(10))
                    .unwrap_or_else(|| panic!("r{i} did not stop on SIGTERM"));
            }
        }
    }
}

fn wait_with_timeout(mut child: Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    None
}

async fn count3(pool: &SqlitePool) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM items), (SELECT count(*) FROM audit WHERE op = 'insert'), \
         (SELECT count(*) FROM audit WHERE op = 'update')",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn count3_pg(pool: &PgPool) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM items), (SELECT count(*) FROM audit WHERE op = 'insert'), \
         (SELECT count(*) FROM audit WHERE op = 'update')",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for child in self.children.lock().unwrap().iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
