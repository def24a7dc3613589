//! Scenarios run against real `weft run` processes (each strategy, crashes), on whatever
//! binding the mesh of the given `Sidecars` uses (gRPC in `processes.rs`, Kafka in
//! `kafka_mesh.rs`): the database outcome must be the same on both.
use std::time::Duration;

use super::sidecars::Sidecars;

/// The receiver in region 1 dies right after an apply commit, before it says so; restarted,
/// it applies nothing twice and loses nothing. Starts the sidecars itself.
pub async fn receiver_killed_after_an_apply_commit(sidecars: &Sidecars) {
    sidecars.spawn(0, None).await;
    sidecars.spawn(1, Some("after-apply:4")).await;
    sidecars.spawn(2, None).await;
    // Region 0 writes until the receiver in region 1 dies right after an apply commit.
    let written = sidecars.write_until_crash(1, 0).await;
    sidecars.spawn(1, None).await;
    sidecars.write(1, 0, 100, 5).await;
    sidecars.write(2, 0, 100, 5).await;
    sidecars.assert_exactly_once(written + 200).await;
}

/// CRDT: two regions decrement one counter a thousand times each, concurrently; every region
/// ends at 5000 - 2000.
pub async fn counter_decremented_from_two_regions(sidecars: &Sidecars) {
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
}

/// Ownership: east writes its accounts and, halfway, hands them all to west; every write after
/// the transfer is refused at the source, west writes on top once the transfer reached it,
/// and every committed write survives everywhere, with no dead letter.
pub async fn ownership_transfer_under_load(sidecars: &Sidecars) {
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
}

/// Queue: three truly concurrent edits of one row (every sidecar down while they are made)
/// open one entry with three siblings in every region; one resolution by `weft conflicts`
/// closes it everywhere.
pub async fn queued_row_edited_everywhere_resolved_once(sidecars: &Sidecars) {
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
}
