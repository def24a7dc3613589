//! Jepsen-style faults on a mixed mesh (one SQLite region, two PostgreSQL regions on a
//! throw-away cluster): a seeded nemesis pauses and kills sidecars, cuts weft's database
//! connections (`pg_terminate_backend`), and restarts the PostgreSQL server (clean and
//! crash-like) while every region writes. The checker then demands identical rows and
//! metadata everywhere, no committed insert missing and none applied twice. The seed is
//! printed; `WEFT_NEMESIS_SEED=N` replays a run's schedule.
#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::mixed::{Kind, Mesh};
use rand::Rng;

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGSTOP for this long, then SIGCONT.
    Pause(usize, Duration),
    /// SIGKILL, then a restart after this long.
    Kill(usize, Duration),
    /// Terminate weft's sessions on this region's database.
    DropConnections(usize),
    /// Stop the server (`fast` or `immediate`) for this long, then start it again.
    RestartServer(&'static str, Duration),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_and_database_faults_under_load_lose_and_double_nothing() {
    let (_seed, mut rng) = common::nemesis_rng();
    let mesh = Mesh::new(&[Kind::Sqlite, Kind::Postgres, Kind::Postgres]).await;
    mesh.spawn_all().await;
    let cluster = mesh.cluster.as_ref().unwrap();

    let mut written = [0i64; 3];
    let started = Instant::now();
    let mut history = Vec::new();
    while started.elapsed() < Duration::from_secs(15) {
        let victim = rng.random_range(0..3);
        let fault = match rng.random_range(0..4) {
            // Sometimes longer than the 2 s peer timeout: peers must redial, not hang.
            0 => Fault::Pause(victim, Duration::from_millis(rng.random_range(200..3_000))),
            1 => Fault::Kill(victim, Duration::from_millis(rng.random_range(0..1_000))),
            2 => Fault::DropConnections(rng.random_range(1..3)),
            _ => Fault::RestartServer(
                if rng.random_bool(0.5) { "fast" } else { "immediate" },
                Duration::from_millis(rng.random_range(100..1_500)),
            ),
        };
        history.push((started.elapsed().as_millis(), fault));
        match fault {
            Fault::Pause(i, _) => mesh.signal(i, "STOP"),
            Fault::Kill(i, _) => mesh.kill9(i),
            Fault::DropConnections(i) => {
                let _ = mesh.drop_connections(i).await;
            }
            Fault::RestartServer(mode, _) => cluster.stop(mode).unwrap(),
        }
        // Every region's application writes while the fault lasts (PostgreSQL ones retry
        // while their server is down).
        let load = async {
            for _ in 0..3 {
                let writers = (0..3).map(|i| {
                    let first = written[i];
                    let mesh = &mesh;
                    async move { mesh.write_surely(i, first, 10).await }
                });
                futures_util::future::join_all(writers).await;
                for w in written.iter_mut() {
                    *w += 10;
                }
            }
        };
        let recover = async {
            match fault {
                Fault::Pause(i, pause) => {
                    tokio::time::sleep(pause).await;
                    mesh.signal(i, "CONT");
                }
                Fault::Kill(i, down) => {
                    tokio::time::sleep(down).await;
                    mesh.spawn(i, None).await;
                }
                Fault::DropConnections(_) => {}
                Fault::RestartServer(_, down) => {
                    tokio::time::sleep(down).await;
                    cluster.restart().unwrap();
                }
            }
        };
        tokio::join!(load, recover);
    }
    println!("faults (ms since start, fault): {history:?}");
    mesh.wait_converged(Duration::from_secs(120)).await;
    mesh.assert_exactly_once(written.iter().sum()).await;
    mesh.terminate_all();
}
