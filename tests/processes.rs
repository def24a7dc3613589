//! Real sidecar processes on loopback: three `weft run` processes, an application writing
//! straight into each SQLite file from this process, and crashes (abort at a crash point, or
//! SIGKILL from outside) in the middle of the stream. See `common/sidecars.rs` for how
//! exactly-once is checked.
mod common;

use std::time::Duration;

use common::sidecars::Sidecars;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sidecar_processes_converge() {
    let dir = tempfile::tempdir().unwrap();
    let sidecars = Sidecars::new(dir.path()).await;
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
    let sidecars = Sidecars::new(dir.path()).await;
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
    let sidecars = Sidecars::new(dir.path()).await;
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
    let sidecars = Sidecars::new(dir.path()).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regions_decrement_one_counter_a_thousand_times_each() {
    let dir = tempfile::tempdir().unwrap();
    let sidecars = Sidecars::new(dir.path()).await;
    sidecars.spawn_all();
    sqlx::query("INSERT INTO stock (id, qty) VALUES (1, 5000)")
        .execute(&sidecars.mesh.regions[0].app)
        .await
        .unwrap();
    sidecars.mesh.wait_converged(Duration::from_secs(30)).await.unwrap();
    let decrement = |i: usize| {
        let app = sidecars.mesh.regions[i].app.clone();
        async move {
            for _ in 0..1000 {
                sqlx::query("UPDATE stock SET qty = qty - 1 WHERE id = 1")
                    .execute(&app)
                    .await
                    .unwrap();
            }
        }
    };
    tokio::join!(decrement(0), decrement(1));
    sidecars.mesh.wait_converged(Duration::from_secs(60)).await.unwrap();
    for region in &sidecars.mesh.regions {
        let qty: i64 = sqlx::query_scalar("SELECT qty FROM stock WHERE id = 1")
            .fetch_one(&region.app)
            .await
            .unwrap();
        assert_eq!(qty, 3000, "{}: 5000 - 1000 - 1000", region.region);
    }
    sidecars.terminate_all();
}
