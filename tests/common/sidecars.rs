#![allow(dead_code)]
//! Real `weft run` processes on loopback for the process and nemesis suites: spawning,
//! killing, pausing, an application writing straight into each SQLite file, and the
//! exactly-once check.
//!
//! Exactly-once is checked through the application's own triggers: every replica keeps an
//! `audit` table (not replicated) that gets a row per insert and per update of `items`. Writes
//! to `items` only insert fresh rows, so a lost event shows as a missing row and an event
//! applied twice shows as an `update` audit row. `shared` is a small set of hot rows every
//! region updates (LWW conflicts); it is checked for convergence only.
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weft::config::{ReplicationConfig, TableConfig};
use weft::harness::loopback::LoopbackMesh;

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, origin TEXT NOT NULL, v INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS shared (id INTEGER PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS stock (id INTEGER PRIMARY KEY, qty INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (id INTEGER PRIMARY KEY, home TEXT NOT NULL, balance INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS contracts (id INTEGER PRIMARY KEY, amount INTEGER NOT NULL, terms TEXT);
CREATE TABLE IF NOT EXISTS audit (id INTEGER NOT NULL, op TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS items_audit_insert AFTER INSERT ON items BEGIN INSERT INTO audit VALUES (NEW.id, 'insert'); END;
CREATE TRIGGER IF NOT EXISTS items_audit_update AFTER UPDATE ON items BEGIN INSERT INTO audit VALUES (NEW.id, 'update'); END;
";

pub struct Sidecars {
    pub mesh: LoopbackMesh,
    children: std::sync::Mutex<Vec<Option<Child>>>,
}

impl Sidecars {
    pub async fn new(dir: &Path) -> Self {
        Self::with(
            dir,
            LoopbackMesh::all_to_all(&["east", "west", "south"]),
            ReplicationConfig::default(),
        )
        .await
    }

    /// Sidecars on `topology`'s shape and nodes (on loopback ports); `replication` tunes them
    /// (the heartbeat and peer timeout are shortened for tests).
    pub async fn with(dir: &Path, topology: weft::config::Topology, replication: ReplicationConfig) -> Self {
        let tables = [
            TableConfig::lww("items"),
            TableConfig::lww("shared"),
            TableConfig {
                name: "stock".into(),
                strategy: weft::config::Strategy::Crdt,
                columns: [("qty".to_string(), weft::crdt::CrdtType::Counter)]
                    .into_iter()
                    .collect(),
                owner_column: None,
                owner_rule: None,
                unknown_columns: Default::default(),
                renamed_from: Default::default(),
                mesh_regions: Vec::new(),
            },
            TableConfig {
                name: "accounts".into(),
                strategy: weft::config::Strategy::Ownership,
                columns: Default::default(),
                owner_column: Some("home".into()),
                owner_rule: None,
                unknown_columns: Default::default(),
                renamed_from: Default::default(),
                mesh_regions: Vec::new(),
            },
            TableConfig {
                name: "contracts".into(),
                strategy: weft::config::Strategy::Queue,
                columns: Default::default(),
                owner_column: None,
                owner_rule: None,
                unknown_columns: Default::default(),
                renamed_from: Default::default(),
                mesh_regions: Vec::new(),
            },
        ];
        let replication = ReplicationConfig {
            heartbeat_ms: 200,
            peer_timeout_ms: 2_000,
            ..replication
        };
        let mesh = LoopbackMesh::create(dir, &topology, SCHEMA, &tables, &replication)
            .await
            .unwrap();
        let children = std::sync::Mutex::new((0..mesh.regions.len()).map(|_| None).collect());
        Self { mesh, children }
    }

    pub async fn spawn(&self, i: usize, crashpoint: Option<&str>) {
        self.start(i, crashpoint);
        self.wait_listening(i).await;
    }

    /// Starts region `i`'s sidecar without waiting for it to listen.
    pub fn start(&self, i: usize, crashpoint: Option<&str>) {
        let region = &self.mesh.regions[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.mesh.dir.join(format!("{}.log", region.region)))
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_weft"));
        command
            .args(["run", "--config"])
            .arg(&region.config_file)
            .env("RUST_LOG", "weft=info")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(point) = crashpoint {
            command.env("WEFT_CRASHPOINT", point);
        }
        self.children.lock().unwrap()[i] = Some(command.spawn().expect("spawning weft run"));
    }

    /// A sidecar listens only after installing its triggers: from then on, writes are captured.
    /// Yields while it waits: the application's load may run in the same task and hold
    /// SQLite's write lock, which the starting sidecar needs to install its schema.
    async fn wait_listening(&self, i: usize) {
        let topology = std::fs::read_to_string(&self.mesh.topology_file).unwrap();
        let topology = weft::config::Topology::parse(&topology, &self.mesh.topology_file).unwrap();
        let address = topology.node(&self.mesh.regions[i].node_id).unwrap().address.clone();
        let started = Instant::now();
        while tokio::net::TcpStream::connect(&address).await.is_err() {
            let exited = self.children.lock().unwrap()[i].as_mut().unwrap().try_wait().unwrap();
            if let Some(status) = exited {
                let log = self.mesh.dir.join(format!("{}.log", self.mesh.regions[i].region));
                panic!(
                    "weft run for region {i} exited early with {status}; its log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "region {i} never started listening"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn spawn_all(&self) {
        for i in 0..self.mesh.regions.len() {
            self.spawn(i, None).await;
        }
    }

    /// Region `i`'s sidecar's exit status, if it exits within `within`.
    pub async fn exit_status(&self, i: usize, within: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < within {
            let exited = self.children.lock().unwrap()[i].as_mut().unwrap().try_wait().unwrap();
            if exited.is_some() {
                return exited;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.children.lock().unwrap()[i].is_some()
    }

    /// Region `i`'s sidecar's peak resident memory so far, in MiB (Linux `VmHWM`).
    pub fn peak_rss_mib(&self, i: usize) -> u64 {
        let pid = self.children.lock().unwrap()[i].as_ref().expect("running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .expect("VmHWM in /proc status");
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib / 1024
    }

    /// Pauses region `i`'s sidecar (SIGSTOP) at a moment it holds no SQLite write lock, so the
    /// application can write while nothing captures.
    pub async fn pause_idle(&self, i: usize) {
        use sqlx::ConnectOptions as _;
        let path = self.mesh.regions[i].db.clone();
        let started = Instant::now();
        loop {
            self.signal(i, "STOP");
            let mut probe = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&path)
                .busy_timeout(Duration::from_millis(200))
                .connect()
                .await
                .unwrap();
            if sqlx::raw_sql("BEGIN IMMEDIATE; ROLLBACK")
                .execute(&mut probe)
                .await
                .is_ok()
            {
                return;
            }
            self.signal(i, "CONT");
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "region {i}'s sidecar never let go of the write lock"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
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

    /// One application transaction updating a hot row every region writes.
    pub async fn update_shared(&self, i: usize, id: i64, value: &str) {
        sqlx::query("INSERT INTO shared (id, v) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET v = excluded.v")
            .bind(id)
            .bind(value)
            .execute(&self.mesh.regions[i].app)
            .await
            .unwrap();
    }

    /// Stops region `i`'s sidecar with SIGTERM; it must exit cleanly within 20 s.
    pub async fn stop(&self, i: usize) {
        self.signal(i, "TERM");
        let stopped = self.exit_status(i, Duration::from_secs(20)).await;
        assert!(stopped.is_some_and(|s| s.success()), "region {i}: {stopped:?}");
    }

    /// Region `i`'s sidecar log so far, without terminal colours.
    pub fn log(&self, i: usize) -> String {
        let region = &self.mesh.regions[i].region;
        let log = std::fs::read_to_string(self.mesh.dir.join(format!("{region}.log"))).unwrap_or_default();
        plain(&log)
    }

    /// Waits until region `i` holds `rows` rows of `items` (30 s at most; `what` says what
    /// did not happen).
    pub async fn wait_items(&self, i: usize, rows: i64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let have: i64 = sqlx::query_scalar("SELECT count(*) FROM items")
                .fetch_one(&self.mesh.regions[i].app)
                .await
                .unwrap();
            if have == rows {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {have} rows of {rows}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A copy of region `i`'s database as it is now (`VACUUM INTO`), at `to`.
    pub async fn back_up(&self, i: usize, to: &Path) {
        let take = format!("VACUUM INTO '{}'", to.display());
        sqlx::raw_sql(sqlx::AssertSqlSafe(take))
            .execute(&self.mesh.regions[i].app)
            .await
            .unwrap();
    }

    /// Puts `backup` in place of region `i`'s database (its sidecar stopped), and reopens the
    /// application's pool on it.
    pub async fn restore(&mut self, i: usize, backup: &Path) {
        let db = self.mesh.regions[i].db.clone();
        self.mesh.regions[i].app.close().await;
        std::fs::copy(backup, &db).unwrap();
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
        }
        self.mesh.regions[i].app = weft::harness::app_pool(&db).await.unwrap();
    }

    pub fn kill9(&self, i: usize) {
        let child = self.children.lock().unwrap()[i].take();
        if let Some(mut child) = child {
            let _ = child.kill(); // SIGKILL (an exited child has nothing to kill)
            child.wait().unwrap();
        }
    }

    /// Region `writer`'s application writes small transactions (ids from 0) until region
    /// `victim`'s sidecar dies at its crash point; returns how many rows were written.
    pub async fn write_until_crash(&self, victim: usize, writer: usize) -> i64 {
        let started = Instant::now();
        let mut written = 0;
        loop {
            let exited = self.children.lock().unwrap()[victim]
                .as_mut()
                .expect("running")
                .try_wait()
                .unwrap();
            if let Some(status) = exited {
                assert!(
                    !status.success(),
                    "the sidecar should have crashed, it exited with {status}"
                );
                self.children.lock().unwrap()[victim] = None;
                return written;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "crash point of region {victim} never reached"
            );
            self.write(writer, written, 10, 10).await;
            written += 10;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn terminate_all(&self) {
        let children: Vec<Child> = self
            .children
            .lock()
            .unwrap()
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for child in children {
            let mut child = child;
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
            let started = Instant::now();
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    assert!(status.success(), "graceful stop should exit 0, got {status}");
                    break;
                }
                if started.elapsed() > Duration::from_secs(20) {
                    child.kill().unwrap();
                    panic!("weft run did not stop within 20 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// `count` fresh rows written by region `i`'s application, `per_txn` per transaction.
    pub async fn write(&self, i: usize, from: i64, count: i64, per_txn: i64) {
        let region = &self.mesh.regions[i];
        let mut id = from;
        while id < from + count {
            let mut tx = region.app.begin().await.unwrap();
            for _ in 0..per_txn.min(from + count - id) {
                sqlx::query("INSERT INTO items (id, origin, v) VALUES (?, ?, ?)")
                    .bind((i as i64) * 1_000_000 + id)
                    .bind(&region.region)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                id += 1;
            }
            tx.commit().await.unwrap();
        }
    }

    pub async fn assert_exactly_once(&self, expected_rows: i64) {
        self.assert_exactly_once_within(expected_rows, Duration::from_secs(90))
            .await;
    }

    /// `assert_exactly_once`, waiting up to `within` for the regions to converge (a test that
    /// ships hundreds of thousands of rows on a shared machine needs longer).
    pub async fn assert_exactly_once_within(&self, expected_rows: i64, within: Duration) {
        self.mesh.wait_converged(within).await.unwrap();
        for region in &self.mesh.regions {
            let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM items")
                .fetch_one(&region.app)
                .await
                .unwrap();
            assert_eq!(rows, expected_rows, "{} lost rows", region.region);
            let audit: Vec<(String, i64)> = sqlx::query_as("SELECT op, count(*) FROM audit GROUP BY op ORDER BY op")
                .fetch_all(&region.app)
                .await
                .unwrap();
            assert_eq!(
                audit,
                vec![("insert".to_string(), expected_rows)],
                "{}: every row written exactly once",
                region.region
            );
        }
    }
}

impl Drop for Sidecars {
    fn drop(&mut self) {
        for child in self.children.lock().unwrap().iter_mut().filter_map(Option::take) {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `text` without its terminal colours.
pub fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().take_while(|c| *c != 'm').for_each(drop);
        } else {
            out.push(c);
        }
    }
    out
}
