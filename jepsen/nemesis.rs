//! Jepsen-style fault injection: three real sidecars under a mixed workload while a seeded
//! nemesis pauses (SIGSTOP past the peer timeout, then SIGCONT) and kills (SIGKILL, then a
//! restart) them at random. The checker then demands what users are promised: every region
//! holds identical rows and metadata, no acknowledged insert is missing, and none was
//! applied twice. The seed is printed; `WEFT_NEMESIS_SEED=N` replays a run's schedule.
#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::sidecars::Sidecars;
use rand::Rng;

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGSTOP for this long, then SIGCONT.
    Pause(Duration),
    /// SIGKILL, then a restart after this long.
    Kill(Duration),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pauses_and_kills_under_load_lose_and_double_nothing() {
    let (seed, mut rng) = common::nemesis_rng();
    let dir = tempfile::tempdir().unwrap();
    let sidecars = Sidecars::new(dir.path()).await;
    sidecars.spawn_all().await;

    let mut written = [0i64; 3];
    let started = Instant::now();
    let mut history = Vec::new();
    while started.elapsed() < Duration::from_secs(15) {
        let victim = rng.random_range(0..3);
        let fault = if rng.random_bool(0.5) {
            // Sometimes longer than the 2 s peer timeout: peers must redial, not hang.
            Fault::Pause(Duration::from_millis(rng.random_range(200..3_000)))
        } else {
            Fault::Kill(Duration::from_millis(rng.random_range(0..1_000)))
        };
        history.push((started.elapsed().as_millis(), victim, fault));
        match fault {
            Fault::Pause(_) => sidecars.signal(victim, "STOP"),
            Fault::Kill(_) => sidecars.kill9(victim),
        }
        // Load in every region while the fault lasts (a killed region's application keeps
        // writing into its database).
        let hot: Vec<i64> = (0..3).map(|_| rng.random_range(0..5)).collect();
        let load = async {
            for round in 0..5 {
                for (i, id) in hot.iter().enumerate() {
                    sidecars
                        .update_shared(i, *id, &format!("region {i} round {round} seed {seed}"))
                        .await;
                }
                tokio::join!(
                    sidecars.write(0, written[0] + round * 20, 20, 4),
                    sidecars.write(1, written[1] + round * 20, 20, 4),
                    sidecars.write(2, written[2] + round * 20, 20, 4)
                );
            }
        };
        // The fault ends on its own schedule, whatever the load is doing: a paused sidecar
        // may hold SQLite's write lock, and the application waits for it like for any writer.
        let end_fault = async {
            match fault {
                Fault::Pause(duration) => {
                    tokio::time::sleep(duration).await;
                    sidecars.signal(victim, "CONT");
                }
                Fault::Kill(down) => {
                    tokio::time::sleep(down).await;
                    sidecars.spawn(victim, None).await;
                }
            }
        };
        tokio::join!(load, end_fault);
        for w in &mut written {
            *w += 100;
        }
    }
    println!("faults: {history:?}");
    sidecars.assert_exactly_once(written.iter().sum()).await;
    sidecars.terminate_all();
}
