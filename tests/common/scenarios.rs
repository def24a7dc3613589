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
    east_accounts(sidecars, 20).await;
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

    edit_contract_everywhere_at_once(sidecars).await;

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

/// `weft <command> --config <config> <args>`, which must succeed; its standard output.
fn weft_cli(command: &str, config: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .args([command, "--config", config.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "weft {command} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Forced failover: east dies with four writes to its accounts not replicated; west takes
/// every east account over with `weft ownership failover`, and writes two of them. When east
/// comes back, its four writes are refused everywhere, listed as fenced dead letters in every
/// region (the exact RPO), never merged; every region converges on west's rows, and east's
/// application can no longer write them.
pub async fn forced_failover_fences_the_lost_regions_writes(sidecars: &Sidecars) {
    let regions = &sidecars.mesh.regions;
    let (east, west) = (&regions[0], &regions[1]);
    east_accounts(sidecars, 10).await;
    sidecars.mesh.wait_converged(Duration::from_secs(30)).await.unwrap();

    // East dies; its application commits four more writes that nobody else sees.
    sidecars.kill9(0);
    for id in 0..4i64 {
        sqlx::query("UPDATE accounts SET balance = 7 WHERE id = ?")
            .bind(id)
            .execute(&east.app)
            .await
            .unwrap();
    }

    // West cannot write east's rows, then takes them over.
    let refused = sqlx::query("UPDATE accounts SET balance = 1 WHERE id = 0")
        .execute(&west.app)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("owned by east"), "{refused}");
    let said = weft_cli(
        "ownership",
        &west.config_file,
        &["failover", "--from", "east", "--to", "west", "--by", "drill"],
    );
    assert!(said.contains("fenced 10 row(s) of east over to west"), "{said}");
    for id in 0..2i64 {
        sqlx::query("UPDATE accounts SET balance = ? WHERE id = ?")
            .bind(100 + id)
            .bind(id)
            .execute(&west.app)
            .await
            .unwrap();
    }
    let south = &regions[2];
    let started = std::time::Instant::now();
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM accounts WHERE home = 'west'")
        .fetch_one(&south.app)
        .await
        .unwrap()
        < 10
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the failover never reached south"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // East comes back.
    sidecars.spawn(0, None).await;
    sidecars.mesh.wait_converged(Duration::from_secs(60)).await.unwrap();
    let mut a_letter = 0;
    let mut identities: Vec<Vec<(String, String, i64)>> = Vec::new();
    for region in regions {
        let rows: Vec<(i64, String, i64)> = sqlx::query_as("SELECT id, home, balance FROM accounts ORDER BY id")
            .fetch_all(&region.app)
            .await
            .unwrap();
        let expected: Vec<(i64, String, i64)> = (0..10)
            .map(|id| (id, "west".to_owned(), if id < 2 { 100 + id } else { 0 }))
            .collect();
        assert_eq!(
            rows, expected,
            "{}: west's rows, none of east's fenced writes",
            region.region
        );
        let listed = weft_cli(
            "dead-letters",
            &region.config_file,
            &["list", "--cause", "fenced", "--json"],
        );
        let letters: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
        let mut keys: Vec<String> = letters.iter().map(|l| l["key"].as_str().unwrap().to_owned()).collect();
        keys.sort();
        assert_eq!(
            keys,
            ["[0]", "[1]", "[2]", "[3]"],
            "{}: the fenced writes: {listed}",
            region.region
        );
        a_letter = letters[0]["id"].as_i64().unwrap();
        // Listed alike: the same writes, by their identity (origin, seq), in every region.
        let mut identity: Vec<(String, String, i64)> = letters
            .iter()
            .map(|l| {
                let origin = l["origin"].as_str().unwrap().to_owned();
                (
                    l["key"].as_str().unwrap().to_owned(),
                    origin,
                    l["seq"].as_i64().unwrap(),
                )
            })
            .collect();
        identity.sort();
        identities.push(identity);
        for letter in &letters {
            assert!(letter["origin"].as_str().unwrap().starts_with("east"), "{letter}");
            assert!(
                letter["reason"].as_str().unwrap().contains("forced failover"),
                "{letter}"
            );
            assert_eq!(letter["event"]["op"]["balance"], 7, "{letter}");
        }
        let other: i64 = sqlx::query_scalar("SELECT count(*) FROM _weft_dead_letters WHERE cause <> 'fenced'")
            .fetch_one(&region.app)
            .await
            .unwrap();
        assert_eq!(other, 0, "{}", region.region);
    }
    for (region, identity) in regions.iter().zip(&identities) {
        assert_eq!(
            identity, &identities[0],
            "{} lists the fenced writes as {}",
            region.region, regions[0].region
        );
    }
    // A fenced letter is not retried: it would lose again.
    let retry = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .args([
            "dead-letters",
            "--config",
            regions[2].config_file.to_str().unwrap(),
            "retry",
        ])
        .arg(a_letter.to_string())
        .output()
        .unwrap();
    assert!(!retry.status.success());
    assert!(String::from_utf8_lossy(&retry.stderr).contains("forced ownership failover"));
    let refused = sqlx::query("UPDATE accounts SET balance = 9 WHERE id = 5")
        .execute(&east.app)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("owned by west"), "{refused}");
}

/// Every region edits contract 1 with its sidecar down, so the three edits are truly
/// concurrent; returns once every region has the conflict open with the three versions.
/// (Killed, not paused: a paused sidecar may hold SQLite's write lock.)
pub async fn edit_contract_everywhere_at_once(sidecars: &Sidecars) {
    let regions = &sidecars.mesh.regions;
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
}

/// Accounts 0 to `n - 1`, east's, with a zero balance, written in east.
async fn east_accounts(sidecars: &Sidecars, n: i64) {
    for id in 0..n {
        sqlx::query("INSERT INTO accounts (id, home, balance) VALUES (?, 'east', 0)")
            .bind(id)
            .execute(&sidecars.mesh.regions[0].app)
            .await
            .unwrap();
    }
}
