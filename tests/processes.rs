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
    sidecars.spawn(0, None).await;
    sidecars.spawn(1, Some("after-apply:4")).await;
    sidecars.spawn(2, None).await;
    // Region 0 writes until the receiver in region 1 dies right after an apply commit.
    let written = sidecars.write_until_crash(1, 0).await;
    sidecars.spawn(1, None).await;
    sidecars.write(1, 0, 100, 5).await;
    sidecars.write(2, 0, 100, 5).await;
    sidecars.assert_exactly_once(written + 200).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ownership_transfer_under_load_loses_no_write() {
    let dir = tempfile::tempdir().unwrap();
    let sidecars = Sidecars::new(dir.path()).await;
    sidecars.spawn_all().await;
    let east = &sidecars.mesh.regions[0];
    for id in 0..20 {
        sqlx::query("INSERT INTO accounts (id, home, balance) VALUES (?, 'east', 0)")
            .bind(id)
            .execute(&east.app)
            .await
            .unwrap();
    }
    sidecars.mesh.wait_converged(Duration::from_secs(30)).await.unwrap();

    // East keeps writing; halfway through, it hands every account to west.
    let config = east.config_file.clone();
    let mut committed = [0i64; 20];
    let mut refused = 0;
    for round in 1..=60i64 {
        if round == 30 {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
                .args([
                    "ownership",
                    "--config",
                    config.to_str().unwrap(),
                    "transfer",
                    "--table",
                    "accounts",
                    "--all",
                    "--to",
                    "west",
                ])
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        for (id, last) in committed.iter_mut().enumerate() {
            let result = sqlx::query("UPDATE accounts SET balance = ? WHERE id = ?")
                .bind(round)
                .bind(id as i64)
                .execute(&east.app)
                .await;
            match result {
                Ok(_) => *last = round,
                Err(e) => {
                    assert!(e.to_string().contains("owned by west"), "{e}");
                    refused += 1;
                }
            }
        }
    }
    assert_eq!(
        refused,
        31 * 20,
        "every write after the transfer is refused at the source"
    );

    // West takes over once the transfer has reached it, and writes on top.
    let west = &sidecars.mesh.regions[1];
    let started = std::time::Instant::now();
    loop {
        let owned: i64 = sqlx::query_scalar("SELECT count(*) FROM accounts WHERE home = 'west'")
            .fetch_one(&west.app)
            .await
            .unwrap();
        if owned == 20 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the transfer never reached west"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in 0..10i64 {
        sqlx::query("UPDATE accounts SET balance = balance + 1000 WHERE id = ?")
            .bind(id)
            .execute(&west.app)
            .await
            .unwrap();
    }
    sidecars.mesh.wait_converged(Duration::from_secs(60)).await.unwrap();
    for region in &sidecars.mesh.regions {
        let balances: Vec<i64> = sqlx::query_scalar("SELECT balance FROM accounts ORDER BY id")
            .fetch_all(&region.app)
            .await
            .unwrap();
        let expected: Vec<i64> = (0..20)
            .map(|id| committed[id] + if id < 10 { 1000 } else { 0 })
            .collect();
        assert_eq!(
            balances, expected,
            "{}: every committed write survives the transfer",
            region.region
        );
        let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM _weft_dead_letters")
            .fetch_one(&region.app)
            .await
            .unwrap();
        assert_eq!(dead, 0);
    }
    sidecars.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_regions_edit_one_queued_row_and_one_resolution_reaches_all() {
    let dir = tempfile::tempdir().unwrap();
    let sidecars = Sidecars::new(dir.path()).await;
    sidecars.spawn_all().await;
    let regions = &sidecars.mesh.regions;
    sqlx::query("INSERT INTO contracts VALUES (1, 100, 'net 30')")
        .execute(&regions[0].app)
        .await
        .unwrap();
    sidecars.mesh.wait_converged(Duration::from_secs(30)).await.unwrap();

    // With every sidecar down, no region sees another's edit: the three are truly
    // concurrent. (Killed, not paused: a paused sidecar may hold SQLite's write lock.)
    for i in 0..3 {
        sidecars.kill9(i);
    }
    for (i, region) in regions.iter().enumerate() {
        sqlx::query("UPDATE contracts SET amount = ?, terms = ? WHERE id = 1")
            .bind(200 + i as i64)
            .bind(format!("terms of {}", region.region))
            .execute(&region.app)
            .await
            .unwrap();
    }
    sidecars.spawn_all().await;
    let siblings = "SELECT count(*) FROM _weft_siblings s JOIN _weft_queue q ON q.tbl = s.tbl AND q.key = s.key WHERE q.closed_at IS NULL";
    let started = std::time::Instant::now();
    for region in regions {
        loop {
            let n: i64 = sqlx::query_scalar(siblings).fetch_one(&region.app).await.unwrap();
            let open: i64 = sqlx::query_scalar("SELECT count(*) FROM _weft_queue WHERE closed_at IS NULL")
                .fetch_one(&region.app)
                .await
                .unwrap();
            if n == 3 && open == 1 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{}: {open} open entries, {n} siblings",
                region.region
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let config = regions[1].config_file.to_str().unwrap().to_owned();
    let weft = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
            .args(args)
            .output()
            .unwrap()
    };
    let list = weft(&["conflicts", "--config", &config, "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let id = list[0]["id"].to_string();
    let out = weft(&[
        "conflicts",
        "--config",
        &config,
        "resolve",
        &id,
        "--take",
        "1",
        "--by",
        "carol",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    sidecars.mesh.wait_converged(Duration::from_secs(30)).await.unwrap();
    let started = std::time::Instant::now();
    for region in regions {
        loop {
            let open: i64 = sqlx::query_scalar("SELECT count(*) FROM _weft_queue WHERE closed_at IS NULL")
                .fetch_one(&region.app)
                .await
                .unwrap();
            if open == 0 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{} never closed the conflict",
                region.region
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
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
