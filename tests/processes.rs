//! Real sidecar processes on loopback: three `weft run` processes, an application writing
//! straight into each SQLite file from this process, and crashes (abort at a crash point, or
//! SIGKILL from outside) in the middle of the stream. See `common/sidecars.rs` for how
//! exactly-once is checked.
mod common;

use std::time::Duration;

use common::scenarios;
use common::sidecars::Sidecars;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sidecar_processes_converge() {
    let dir = tempfile::tempdir().unwrap();
    let sidecars = Sidecars::new(dir.path()).await;
    sidecars.spawn_all().await;
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
    sidecars.spawn(0, Some("after-drain:3")).await;
    sidecars.spawn(1, None).await;
    sidecars.spawn(2, None).await;
    let before = sidecars.write_until_crash(0, 0).await;
    // The application keeps writing while its sidecar is down.
    sidecars.write(0, before, 200, 10).await;
    sidecars.write(1, 0, 200, 10).await;
    sidecars.spawn(0, None).await;
    sidecars.assert_exactly_once(before + 400).await;
    sidecars.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_apply_and_ack_applies_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let sidecars = Sidecars::new(dir.path()).await;
    scenarios::receiver_killed_after_an_apply_commit(&sidecars).await;
    sidecars.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_kill_9_under_load_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sidecars = Sidecars::new(dir.path()).await;
    sidecars.spawn_all().await;
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
        sidecars.spawn(victim, None).await;
    }
    sidecars.assert_exactly_once(written.iter().sum()).await;
    sidecars.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regions_decrement_one_counter_a_thousand_times_each() {
    let dir = tempfile::tempdir().unwrap();
    let sidecars = Sidecars::new(dir.path()).await;
    sidecars.spawn_all().await;
    scenarios::counter_decremented_from_two_regions(&sidecars).await;
    sidecars.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ownership_transfer_under_load_loses_no_write() {
    let dir = tempfile::tempdir().unwrap();
    let sidecars = Sidecars::new(dir.path()).await;
    sidecars.spawn_all().await;
    scenarios::ownership_transfer_under_load(&sidecars).await;
    sidecars.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_failover_fences_the_writes_the_lost_region_did_not_replicate() {
    let dir = tempfile::tempdir().unwrap();
    let sidecars = Sidecars::new(dir.path()).await;
    sidecars.spawn_all().await;
    scenarios::forced_failover_fences_the_lost_regions_writes(&sidecars).await;
    sidecars.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_regions_edit_one_queued_row_and_one_resolution_reaches_all() {
    let dir = tempfile::tempdir().unwrap();
    let sidecars = Sidecars::new(dir.path()).await;
    sidecars.spawn_all().await;
    scenarios::queued_row_edited_everywhere_resolved_once(&sidecars).await;
    sidecars.terminate_all();
}

/// `weft dead-letters` against running sidecars: a write the receiving database refuses (an
/// application trigger there) is listed with its reason; once the cause is gone (the trigger
/// dropped) the sidecar retries it by itself and it applies; `discard` gives one up; ids that
/// are not dead letters are refused with what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_retried_by_the_sidecar_once_their_cause_is_gone_and_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let sidecars = Sidecars::new(dir.path()).await;
    sidecars.spawn_all().await;
    let west = &sidecars.mesh.regions[1];
    let refuse = "CREATE TRIGGER refuse BEFORE INSERT ON shared WHEN NEW.v LIKE 'poison%' \
                  BEGIN SELECT RAISE(ABORT, 'poison refused here'); END;";
    sqlx::raw_sql(refuse).execute(&west.app).await.unwrap();
    let config = west.config_file.to_str().unwrap().to_owned();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
            .args(["dead-letters", "--config", &config])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let letters = || {
        let (ok, text) = cli(&["list", "--json"]);
        assert!(ok, "{text}");
        serde_json::from_str::<Vec<serde_json::Value>>(&text).unwrap()
    };
    let wait_for = |want: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let now = letters();
            if now.len() == want {
                return now;
            }
            assert!(std::time::Instant::now() < deadline, "{now:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    sidecars.update_shared(0, 7, "poison 1").await;
    let listed = wait_for(1);
    assert!(
        listed[0]["reason"].as_str().unwrap().contains("poison refused here"),
        "{listed:?}"
    );
    let id = listed[0]["id"].as_i64().unwrap().to_string();
    let (ok, text) = cli(&["show", &id]);
    assert!(
        ok && text.contains("poison refused here") && text.contains("poison 1"),
        "{text}"
    );

    // The cause goes: the sidecar's own retries apply it.
    sqlx::raw_sql("DROP TRIGGER refuse").execute(&west.app).await.unwrap();
    wait_for(0);
    let v: String = sqlx::query_scalar("SELECT v FROM shared WHERE id = 7")
        .fetch_one(&west.app)
        .await
        .unwrap();
    assert_eq!(v, "poison 1");

    sqlx::raw_sql(refuse).execute(&west.app).await.unwrap();
    sidecars.update_shared(0, 8, "poison 2").await;
    wait_for(1);
    let (ok, text) = cli(&["retry", "999999"]);
    assert!(!ok && text.contains("not dead letters of this node"), "{text}");
    let (ok, text) = cli(&["discard", "--all"]);
    assert!(ok && text.contains("1 dead letter(s) discarded"), "{text}");
    assert!(letters().is_empty());
    sidecars.terminate_all();
}

/// Issue 12, rows that exist before install: three `weft run` processes started on
/// databases that already hold rows (written before any weft trigger existed) adopt them,
/// and every region ends with every row exactly once; rows two regions both held for one
/// key resolve as a logged conflict, the same everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_started_on_populated_databases_adopt_their_rows() {
    let dir = tempfile::tempdir().unwrap();
    let sidecars = Sidecars::new(dir.path()).await;
    let (east, west) = (&sidecars.mesh.regions[0], &sidecars.mesh.regions[1]);
    let items = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300) \
                 INSERT INTO items SELECT i, 'east', i FROM n; \
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20) \
                 INSERT INTO shared SELECT i, 'east' FROM n;";
    sqlx::raw_sql(items).execute(&east.app).await.unwrap();
    sqlx::raw_sql("WITH RECURSIVE n(i) AS (SELECT 11 UNION ALL SELECT i + 1 FROM n WHERE i < 30) INSERT INTO shared SELECT i, 'west' FROM n;")
        .execute(&west.app)
        .await
        .unwrap();
    sidecars.spawn_all().await;
    sidecars.assert_exactly_once(300).await;
    let mut conflicts = 0;
    for region in &sidecars.mesh.regions {
        let shared: i64 = sqlx::query_scalar("SELECT count(*) FROM shared")
            .fetch_one(&region.app)
            .await
            .unwrap();
        assert_eq!(shared, 30, "{}", region.region);
        conflicts += sqlx::query_scalar::<_, i64>("SELECT count(*) FROM _weft_conflicts WHERE tbl = 'shared'")
            .fetch_one(&region.app)
            .await
            .unwrap();
    }
    assert!(
        conflicts >= 10,
        "keys 11..=20 were held by two regions: {conflicts} logged conflicts"
    );
    sidecars.terminate_all();
}
