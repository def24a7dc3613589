//! Real sidecar processes on loopback: three `weft run` processes, an application writing
//! straight into each SQLite file from this process, and crashes (abort at a crash point, or
//! SIGKILL from outside) in the middle of the stream.
//!
//! Exactly-once is checked through the application's own triggers: every replica keeps an
//! `audit` table (not replicated) that gets a row per insert and per update of `items`. The
//! workload only inserts fresh rows, so a lost event shows as a missing row and an event
//! applied twice shows as an `update` audit row.
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weft::config::{ReplicationConfig, Strategy, TableConfig};
use weft::loopback::LoopbackMesh;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, origin TEXT NOT NULL, v INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS audit (id INTEGER NOT NULL, op TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS items_audit_insert AFTER INSERT ON items BEGIN INSERT INTO audit VALUES (NEW.id, 'insert'); END;
CREATE TRIGGER IF NOT EXISTS items_audit_update AFTER UPDATE ON items BEGIN INSERT INTO audit VALUES (NEW.id, 'update'); END;
";

struct Sidecars {
    mesh: LoopbackMesh,
    children: Vec<Option<Child>>,
}

impl Sidecars {
    async fn new(dir: &Path) -> Self {
        let tables = [TableConfig {
            name: "items".into(),
            strategy: Strategy::Lww,
        }];
        let replication = ReplicationConfig {
            heartbeat_ms: 200,
            peer_timeout_ms: 2_000,
            ..Default::default()
        };
        let mesh = LoopbackMesh::create(dir, &["east", "west", "south"], SCHEMA, &tables, &replication)
            .await
            .unwrap();
        let children = (0..mesh.regions.len()).map(|_| None).collect();
        Self { mesh, children }
    }

    fn spawn(&mut self, i: usize, crashpoint: Option<&str>) {
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
        self.children[i] = Some(command.spawn().expect("spawning weft run"));
        self.wait_listening(i);
    }

    /// A sidecar listens only after installing its triggers: from then on, writes are captured.
    fn wait_listening(&mut self, i: usize) {
        let topology = std::fs::read_to_string(&self.mesh.topology_file).unwrap();
        let topology = weft::config::Topology::parse(&topology, &self.mesh.topology_file).unwrap();
        let address = topology.node(&self.mesh.regions[i].node_id).unwrap().address.clone();
        let started = Instant::now();
        while std::net::TcpStream::connect(&address).is_err() {
            if let Some(status) = self.children[i].as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "weft run for region {i} exited early with {status}; see its log in {}",
                    self.mesh.dir.display()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "region {i} never started listening"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn spawn_all(&mut self) {
        for i in 0..self.children.len() {
            self.spawn(i, None);
        }
    }

    fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
        }
    }

    /// Region `writer`'s application writes small transactions (ids from 0) until region
    /// `victim`'s sidecar dies at its crash point; returns how many rows were written.
    async fn write_until_crash(&mut self, victim: usize, writer: usize) -> i64 {
        let started = Instant::now();
        let mut written = 0;
        loop {
            if let Some(status) = self.children[victim].as_mut().expect("running").try_wait().unwrap() {
                assert!(
                    !status.success(),
                    "the sidecar should have crashed, it exited with {status}"
                );
                self.children[victim] = None;
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

    fn terminate_all(&mut self) {
        for child in self.children.iter_mut().filter_map(Option::take) {
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
    async fn write(&self, i: usize, from: i64, count: i64, per_txn: i64) {
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

    async fn assert_exactly_once(&self, expected_rows: i64) {
        self.mesh.wait_converged(Duration::from_secs(90)).await.unwrap();
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
        for child in self.children.iter_mut().filter_map(Option::take) {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sidecar_processes_converge() {
    let dir = tempfile::tempdir().unwrap();
    let mut sidecars = Sidecars::new(dir.path()).await;
    sidecars.spawn_all();
    let (a, b, c) = tokio::join!(
        sidecars.write(0, 0, 600, 7),
        sidecars.write(1, 0, 600, 1),
        sidecars.write(2, 0, 600, 50)
    );
    let _ = (a, b, c);
    sidecars.assert_exactly_once(1800).await;
    sidecars.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_drain_and_send_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut sidecars = Sidecars::new(dir.path()).await;
    sidecars.spawn(0, Some("after-drain:3"));
    sidecars.spawn(1, None);
    sidecars.spawn(2, None);
    let before = sidecars.write_until_crash(0, 0).await;
    // The application keeps writing while its sidecar is down.
    sidecars.write(0, before, 200, 10).await;
    sidecars.write(1, 0, 200, 10).await;
    sidecars.spawn(0, None);
    sidecars.assert_exactly_once(before + 400).await;
    sidecars.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_apply_and_ack_applies_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut sidecars = Sidecars::new(dir.path()).await;
    sidecars.spawn(0, None);
    sidecars.spawn(1, Some("after-apply:4"));
    sidecars.spawn(2, None);
    // Region 0 writes until the receiver in region 1 dies right after an apply commit.
    let written = sidecars.write_until_crash(1, 0).await;
    sidecars.spawn(1, None);
    sidecars.write(1, 0, 100, 5).await;
    sidecars.write(2, 0, 100, 5).await;
    sidecars.assert_exactly_once(written + 200).await;
    sidecars.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_kill_9_under_load_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut sidecars = Sidecars::new(dir.path()).await;
    sidecars.spawn_all();
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut written = [0i64; 3];
    for round in 0..6u64 {
        let victim = ((seed >> (round * 2)) % 3) as usize;
        let writes = async {
            tokio::join!(
                sidecars.write(0, written[0], 150, 3),
                sidecars.write(1, written[1], 150, 3),
                sidecars.write(2, written[2], 150, 3)
            )
        };
        let kill_after = Duration::from_millis(50 + (seed >> (round * 3)) % 200);
        let (_, ()) = tokio::join!(writes, tokio::time::sleep(kill_after));
        sidecars.kill9(victim);
        for w in &mut written {
            *w += 150;
        }
        sidecars.spawn(victim, None);
    }
    sidecars.assert_exactly_once(written.iter().sum()).await;
    sidecars.terminate_all();
}
