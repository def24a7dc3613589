//! The web console end to end, in a real browser: three `weft run` processes with the console
//! on, a conflict of a `queue` table open in every region and two dead letters in one; headless
//! Chromium (Debian's, driven by `playwright-core` from `tests/console/drive.cjs`) signs in,
//! looks at every page, keeps version 2 of the conflict, retries one letter and discards the
//! other. The conflict must then close in every region with version 2's row, the discarded
//! letter's change stay unapplied there, and the retried one apply once its cause is gone.
//! Screenshots of every page are written to `target/console-screenshots/` (paths printed).
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::http::{CONSOLE_TOKEN, TOKEN};
use common::sidecars::Sidecars;

/// Debian's Chromium (installed with apt when missing, as root) and `playwright-core` in
/// `target/browser` (installed from npm once, then reused): the folder holding its
/// `node_modules`.
fn browser() -> PathBuf {
    if !Path::new("/usr/bin/chromium").exists() {
        let installed = Command::new("sh")
            .args([
                "-c",
                "apt-get install -y chromium || (apt-get update && apt-get install -y chromium)",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
        assert!(
            installed.is_ok_and(|s| s.success()),
            "the console test needs Debian's chromium: run `apt-get install chromium` as root"
        );
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser");
    if !dir.join("node_modules/playwright-core/package.json").exists() {
        std::fs::create_dir_all(&dir).unwrap();
        let installed = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .arg("playwright-core@1.65.2")
            .status();
        assert!(
            installed.is_ok_and(|s| s.success()),
            "the console test needs Node.js with npm, to install playwright-core into target/browser"
        );
    }
    dir.join("node_modules")
}

async fn count(sidecars: &Sidecars, i: usize, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&sidecars.mesh.regions[i].app)
        .await
        .unwrap()
}

async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_resolved_by_clicking_in_the_console_closes_in_every_region() {
    let node_modules = browser();
    let dir = tempfile::tempdir().unwrap();
    let sidecars = Sidecars::new(dir.path()).await;
    let ports = common::http::enable_http_with(&sidecars, "console = true\nconsole_token_file = \"console.token\"\n");
    let regions = &sidecars.mesh.regions;
    let refuse = "CREATE TRIGGER refuse BEFORE INSERT ON shared WHEN NEW.v LIKE 'poison%' \
                  BEGIN SELECT RAISE(ABORT, 'poison refused here'); END;";
    sqlx::raw_sql(refuse).execute(&regions[1].app).await.unwrap();
    sidecars.spawn_all().await;
    sqlx::query("INSERT INTO contracts VALUES (1, 100, 'net 30')")
        .execute(&regions[0].app)
        .await
        .unwrap();
    sidecars.update_shared(0, 7, "poison 1").await;
    sidecars.update_shared(0, 8, "poison 2").await;
    for i in 0..3 {
        wait_until("the contract reaches every region", async || {
            count(&sidecars, i, "SELECT count(*) FROM contracts").await == 1
        })
        .await;
    }
    wait_until("west dead-letters both poisoned rows", async || {
        count(&sidecars, 1, "SELECT count(*) FROM _weft_dead_letters").await == 2
    })
    .await;

    common::scenarios::edit_contract_everywhere_at_once(&sidecars).await;
    let shown = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args([
            "conflicts",
            "--config",
            regions[1].config_file.to_str().unwrap(),
            "list",
            "--json",
        ])
        .output()
        .unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    let id = listed[0]["id"].as_i64().unwrap();
    let shown = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args([
            "conflicts",
            "--config",
            regions[1].config_file.to_str().unwrap(),
            "show",
            &id.to_string(),
            "--json",
        ])
        .output()
        .unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    let kept = shown["siblings"][1]["row"]["amount"].as_i64().unwrap();

    // The scrape token reads /metrics and nothing of the console.
    let dir = &sidecars.mesh.dir;
    let (status, _) = common::http::get(dir, ports[1], "west-1", "/metrics", Some(TOKEN)).await;
    assert_eq!(status, 200);
    let (status, _) = common::http::get(dir, ports[1], "west-1", "/console/dead-letters", Some(TOKEN)).await;
    assert_ne!(status, 200, "the scrape token opened the console");
    let (status, _) = common::http::get(dir, ports[1], "west-1", "/console/dead-letters", Some(CONSOLE_TOKEN)).await;
    assert_eq!(status, 200, "the console token opens it");

    // A person in the browser, on west's console.
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
    let out = Command::new("node")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console/drive.cjs"))
        .arg(format!("https://127.0.0.1:{}", ports[1]))
        .arg(CONSOLE_TOKEN)
        .arg(&shots)
        .env("NODE_PATH", &node_modules)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{said}");
    assert!(
        out.status.success() && said.contains("OK"),
        "the browser session failed:\n{said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The click closed the conflict in every region, with version 2's row.
    for i in 0..3 {
        wait_until("the conflict closes in every region", async || {
            count(&sidecars, i, "SELECT count(*) FROM _weft_queue WHERE closed_at IS NULL").await == 0
        })
        .await;
    }
    for i in 0..3 {
        wait_until("version 2's row in every region", async || {
            count(&sidecars, i, "SELECT amount FROM contracts WHERE id = 1").await == kept
        })
        .await;
    }
    let by: String = sqlx::query_scalar("SELECT decided_by FROM _weft_resolutions")
        .fetch_one(&regions[1].app)
        .await
        .unwrap();
    assert_eq!(by, "ana");
    // The discarded letter is gone; the retried one applies once its cause is.
    assert_eq!(count(&sidecars, 1, "SELECT count(*) FROM _weft_dead_letters").await, 1);
    sqlx::raw_sql("DROP TRIGGER refuse")
        .execute(&regions[1].app)
        .await
        .unwrap();
    wait_until("the retried letter applies once its cause is gone", async || {
        count(&sidecars, 1, "SELECT count(*) FROM _weft_dead_letters").await == 0
    })
    .await;
    assert_eq!(
        count(&sidecars, 1, "SELECT count(*) FROM shared WHERE id IN (7, 8)").await,
        1
    );
    for shot in std::fs::read_dir(&shots).unwrap() {
        println!("console screenshot: {}", shot.unwrap().path().display());
    }
    sidecars.terminate_all();
}
