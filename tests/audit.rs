//! `weft audit` on real `weft run` processes (issue 13): it finds exactly the rows changed
//! behind weft's back, repairs them so every region converges, and finds nothing the second
//! time; under continuous writes in every region it reports no difference that replication
//! is still carrying.
mod common;

use std::time::Duration;

use common::sidecars::Sidecars;

/// Runs `weft audit` with region `i`'s config; returns the exit code and the JSON report.
fn audit(s: &Sidecars, i: usize, extra: &[&str]) -> (i32, serde_json::Value) {
    audit_with(&s.mesh.regions[i].config_file, extra)
}

fn audit_with(config: &std::path::Path, extra: &[&str]) -> (i32, serde_json::Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .arg("audit")
        .arg("--config")
        .arg(config)
        .arg("--json")
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

/// (table, key) of every differing row of a report.
fn differing(report: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for table in report["tables"].as_array().unwrap() {
        for finding in table["differing"].as_array().unwrap() {
            out.push((
                finding["table"].as_str().unwrap().to_owned(),
                finding["key"].as_str().unwrap().to_owned(),
            ));
        }
    }
    out
}

/// Runs `sql` in region `i` inside the applier's mark, so the capture triggers skip it: a
/// change weft never sees, as a manual fix with the triggers off would be.
async fn behind_weft(s: &Sidecars, i: usize, sql: &str) {
    let mut tx = s.mesh.regions[i].app.begin().await.unwrap();
    sqlx::query("INSERT INTO _weft_applying (marker) VALUES (1)")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("DELETE FROM _weft_applying")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

async fn seed(s: &Sidecars) {
    for i in 0..3 {
        s.write(i, 0, 200, 20).await;
        for id in 0..20 {
            s.update_shared(i, 100 * i as i64 + id, &format!("v{i}-{id}")).await;
        }
    }
    s.mesh.wait_converged(Duration::from_secs(60)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_finds_exactly_the_rows_changed_behind_weft_and_repairs_them() {
    let dir = tempfile::tempdir().unwrap();
    let s = Sidecars::new(dir.path()).await;
    s.spawn_all().await;
    seed(&s).await;
    let (code, report) = audit(&s, 0, &[]);
    assert_eq!((code, differing(&report)), (0, vec![]), "a converged mesh: {report:#}");

    // A trigger-free update in west, a row deleted behind weft's back in south.
    behind_weft(&s, 1, "UPDATE shared SET v = 'tampered' WHERE id = 5").await;
    behind_weft(&s, 2, "DELETE FROM items WHERE id = 1000007").await;
    let (code, report) = audit(&s, 0, &[]);
    let mut found = differing(&report);
    found.sort();
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(
        found,
        vec![
            ("items".to_string(), "[1000007]".to_string()),
            ("shared".to_string(), "[5]".to_string())
        ],
        "{report:#}"
    );
    for finding in report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["differing"].as_array().unwrap())
    {
        let winner = finding["winner"]["Ok"]["node"]
            .as_str()
            .unwrap_or_else(|| panic!("{finding:#}"));
        let loser = match finding["table"].as_str().unwrap() {
            "shared" => &s.mesh.regions[1].node_id,
            _ => &s.mesh.regions[2].node_id,
        };
        assert_ne!(winner, loser.as_str(), "the changed row must lose: {finding:#}");
    }

    // The repair is run from south, which holds one of the damaged rows itself.
    let (code, report) = audit(&s, 2, &["--repair"]);
    assert_eq!(code, 1, "{report:#}");
    let repaired = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["differing"].as_array().unwrap())
        .filter(|f| f["repaired"].get("Ok").is_some())
        .count();
    assert_eq!(repaired, 2, "{report:#}");
    s.mesh.wait_converged(Duration::from_secs(60)).await.unwrap();
    let (code, report) = audit(&s, 1, &[]);
    assert_eq!((code, differing(&report)), (0, vec![]), "after the repair: {report:#}");
    for region in &s.mesh.regions {
        let v: String = sqlx::query_scalar("SELECT v FROM shared WHERE id = 5")
            .fetch_one(&region.app)
            .await
            .unwrap();
        assert_eq!(v, "v0-5", "{}", region.region);
        let items: i64 = sqlx::query_scalar("SELECT count(*) FROM items")
            .fetch_one(&region.app)
            .await
            .unwrap();
        assert_eq!(items, 600, "{}", region.region);
    }
    s.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_under_continuous_writes_reports_no_false_difference() {
    let dir = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(Sidecars::new(dir.path()).await);
    s.spawn_all().await;
    seed(&s).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for i in 0..3 {
        let (s, stop) = (s.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                s.write(i, 1_000 + n, 20, 20).await;
                s.update_shared(i, (n * 7 + i as i64) % 60, &format!("w{i}-{n}")).await;
                n += 20;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Audits until one of them met rows in flight (the first usually does), each of which
    // must report no difference.
    let mut candidates = 0;
    for run in 0..10 {
        let (code, report) = {
            let s = s.clone();
            tokio::task::spawn_blocking(move || audit(&s, run % 3, &[]))
                .await
                .unwrap()
        };
        let seen: u64 = report["tables"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["candidates"].as_u64().unwrap())
            .sum();
        eprintln!("audit under writes, run {run}: exit {code}, {seen} candidates");
        assert_eq!(differing(&report), vec![], "{report:#}");
        assert_ne!(code, 1, "{report:#}");
        candidates += seen;
        if candidates > 0 {
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut written = 600;
    for writer in writers {
        written += writer.await.unwrap();
    }
    assert!(
        candidates > 0,
        "the writes never put a row in flight: the test shows nothing"
    );
    s.assert_exactly_once(written).await;
    s.terminate_all();
}

/// A SQLite region and a PostgreSQL region: equal rows have equal digests across the two
/// stores, and a row changed behind weft's back in PostgreSQL (as a replica session, where
/// weft's triggers do not fire) and one deleted behind its back in SQLite are found and
/// repaired without `--prefer`: the changed row no longer matches the digest PostgreSQL's
/// row metadata recorded, so SQLite's row, which does, wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_compares_and_repairs_across_sqlite_and_postgresql() {
    use common::mixed::{Kind, Mesh};
    let m = Mesh::new(&[Kind::Sqlite, Kind::Postgres]).await;
    m.spawn_all().await;
    for round in 0..5 {
        m.write_surely(0, round * 10, 10).await;
        m.write_surely(1, round * 10, 10).await;
    }
    m.wait_converged(Duration::from_secs(60)).await;
    let (code, report) = audit_with(&m.regions[1].config, &[]);
    assert_eq!((code, differing(&report)), (0, vec![]), "{report:#}");

    m.exec(
        1,
        "BEGIN; SET LOCAL session_replication_role = replica; UPDATE items SET v = -1 WHERE id = 3; COMMIT",
    )
    .await
    .unwrap();
    m.exec(
        0,
        "BEGIN; INSERT INTO _weft_applying (marker) VALUES (1); DELETE FROM items WHERE id = 1000004; \
         DELETE FROM _weft_applying; COMMIT",
    )
    .await
    .unwrap();
    // Two regions, one version, two rows: the one that still matches its recorded digest wins.
    let (code, report) = audit_with(&m.regions[0].config, &[]);
    assert_eq!(code, 1, "{report:#}");
    let edited = report["tables"][0]["differing"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["key"] == "[3]")
        .unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(
        edited["winner"]["Ok"]["node"].as_str(),
        Some(m.regions[0].node.as_str()),
        "{edited:#}"
    );
    let (code, report) = audit_with(&m.regions[1].config, &["--repair"]);
    let mut found = differing(&report);
    found.sort();
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(
        found,
        vec![
            ("items".to_string(), "[1000004]".to_string()),
            ("items".to_string(), "[3]".to_string())
        ],
        "{report:#}"
    );
    m.wait_converged(Duration::from_secs(60)).await;
    let (code, report) = audit_with(&m.regions[1].config, &[]);
    assert_eq!((code, differing(&report)), (0, vec![]), "after the repair: {report:#}");
    let v: i64 = match &m.regions[1].app {
        common::regions::App::Pg(pool) => sqlx::query_scalar("SELECT v FROM items WHERE id = 3")
            .fetch_one(pool)
            .await
            .unwrap(),
        common::regions::App::Sqlite(_) => unreachable!("region 1 is PostgreSQL"),
    };
    assert_eq!(v, 3, "the recorded row won over the edited one");
    m.terminate_all();
}

/// The background audit (`audit_every_secs`) finds a row changed behind weft's back by
/// itself and says so in `weft status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_audit_reports_a_difference_in_status() {
    let dir = tempfile::tempdir().unwrap();
    let replication = weft::config::ReplicationConfig {
        audit_every_secs: 1,
        ..Default::default()
    };
    let s = Sidecars::with(
        dir.path(),
        weft::harness::loopback::LoopbackMesh::all_to_all(&["east", "west", "south"]),
        replication,
    )
    .await;
    s.spawn_all().await;
    seed(&s).await;
    behind_weft(&s, 1, "UPDATE shared SET v = 'tampered' WHERE id = 105").await;
    let started = std::time::Instant::now();
    loop {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
            .args(["status", "--json", "--config"])
            .arg(&s.mesh.regions[0].config_file)
            .output()
            .unwrap();
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let audit = &status["last_audit"];
        if audit["differing"] == 1 {
            assert_eq!(audit["keys"][0], "shared [105]", "{audit:#}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no background audit reported the row: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    s.terminate_all();
}

async fn scalar(s: &Sidecars, i: usize, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&s.mesh.regions[i].app)
        .await
        .unwrap()
}

async fn exec(s: &Sidecars, i: usize, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&s.mesh.regions[i].app)
        .await
        .unwrap();
}

async fn wait_for(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let started = std::time::Instant::now();
    while !check().await {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A row two regions hold only as a dead letter (it names a column they have not added yet)
/// is no purged delete, even once their purge floors passed its version: the audit lists it
/// as waiting, `--repair` leaves it alone, and once the column is added everywhere the row is
/// in every region. Before, the regions without the row won as "deleted at the purge floor"
/// and the repair deleted it everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_held_as_a_dead_letter_is_never_repaired_away() {
    let dir = tempfile::tempdir().unwrap();
    let replication = weft::config::ReplicationConfig {
        tombstone_gc_secs: 1,
        ..Default::default()
    };
    let topology = weft::harness::loopback::LoopbackMesh::all_to_all(&["east", "west", "south"]);
    let s = Sidecars::with(dir.path(), topology, replication).await;
    s.spawn_all().await;
    for id in 1..=3 {
        s.update_shared(0, id, "first").await;
    }
    s.mesh.wait_converged(Duration::from_secs(30)).await.unwrap();

    exec(&s, 0, "ALTER TABLE shared ADD COLUMN extra TEXT").await;
    exec(&s, 0, "INSERT INTO shared (id, v, extra) VALUES (900, 'k', 'e')").await;
    for i in 1..3 {
        wait_for("the row waits as a dead letter", Duration::from_secs(30), async || {
            scalar(&s, i, "SELECT count(*) FROM _weft_dead_letters WHERE key = '[900]'").await > 0
        })
        .await;
    }
    // A delete after it, purged everywhere: every purge floor passes the row's version.
    exec(&s, 0, "DELETE FROM shared WHERE id = 1").await;
    for i in 0..3 {
        wait_for("the tombstone is purged", Duration::from_secs(30), async || {
            scalar(&s, i, "SELECT count(*) FROM shared WHERE id = 1").await == 0
                && scalar(
                    &s,
                    i,
                    "SELECT count(*) FROM _weft_rows WHERE tbl = 'shared' AND deleted",
                )
                .await
                    == 0
        })
        .await;
    }

    let (code, report) = audit(&s, 1, &["--repair"]);
    assert_eq!(differing(&report), vec![], "{report:#}");
    let waiting: Vec<&str> = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["waiting"].as_array().unwrap())
        .map(|w| w["key"].as_str().unwrap())
        .collect();
    assert_eq!(waiting, vec!["[900]"], "{report:#}");
    assert_eq!(code, 3, "rows waiting on dead letters are not settled: {report:#}");

    for i in 1..3 {
        exec(&s, i, "ALTER TABLE shared ADD COLUMN extra TEXT").await;
    }
    for i in 0..3 {
        wait_for("the row is in every region", Duration::from_secs(60), async || {
            scalar(&s, i, "SELECT count(*) FROM shared WHERE id = 900 AND extra = 'e'").await == 1
        })
        .await;
    }
    let (code, report) = audit(&s, 2, &[]);
    assert_eq!(code, 0, "{report:#}");
    s.terminate_all();
}

/// A rolling `ADD COLUMN`: once one region added a column the others have not yet, the audit
/// compares the columns every region has, names the new one as not compared, and finds no
/// difference. Before, every existing row differed ("the same version holds different rows")
/// and `--repair` would have re-sent them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_one_region_added_first_is_no_difference() {
    let dir = tempfile::tempdir().unwrap();
    let s = Sidecars::new(dir.path()).await;
    s.spawn_all().await;
    seed(&s).await;
    exec(&s, 0, "ALTER TABLE shared ADD COLUMN extra TEXT").await;
    s.update_shared(1, 3, "after the migration").await;
    for i in 0..3 {
        wait_for("the update is everywhere", Duration::from_secs(30), async || {
            scalar(&s, i, "SELECT count(*) FROM shared WHERE v = 'after the migration'").await == 1
        })
        .await;
    }
    let (code, report) = audit(&s, 2, &[]);
    assert_eq!((code, differing(&report)), (0, vec![]), "{report:#}");
    let shared = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "shared")
        .unwrap();
    assert_eq!(shared["not_compared"], serde_json::json!(["extra"]), "{report:#}");

    // A real difference in a compared column is still found.
    behind_weft(&s, 2, "UPDATE shared SET v = 'tampered' WHERE id = 5").await;
    let (code, report) = audit(&s, 0, &[]);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(differing(&report), vec![("shared".to_string(), "[5]".to_string())]);
    s.terminate_all();
}

/// A row changed in place behind weft's back in two regions, each differently: one version,
/// three images, no majority. The row weft recorded (the one matching the digest in its row
/// metadata) wins over the edited ones, `--repair` writes it everywhere, and a second audit
/// finds nothing. Before, no row had a majority and the repair waited for `--prefer`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_in_place_behind_weft_loses_to_the_recorded_row_and_repair_converges() {
    let dir = tempfile::tempdir().unwrap();
    let s = Sidecars::new(dir.path()).await;
    s.spawn_all().await;
    seed(&s).await;
    behind_weft(&s, 1, "UPDATE shared SET v = 'fixed in west' WHERE id = 5").await;
    behind_weft(&s, 2, "UPDATE shared SET v = 'fixed in south' WHERE id = 5").await;

    let (code, report) = audit(&s, 1, &["--repair"]);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(
        differing(&report),
        vec![("shared".to_string(), "[5]".to_string())],
        "{report:#}"
    );
    let finding = &report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "shared")
        .unwrap()["differing"][0];
    let winner = &finding["winner"]["Ok"];
    assert_eq!(
        winner["node"].as_str(),
        Some(s.mesh.regions[0].node_id.as_str()),
        "the unedited row wins: {finding:#}"
    );
    assert!(
        winner["why"].as_str().unwrap().contains("behind weft's back"),
        "{finding:#}"
    );
    assert!(finding["repaired"].get("Ok").is_some(), "{finding:#}");

    s.mesh.wait_converged(Duration::from_secs(60)).await.unwrap();
    for region in &s.mesh.regions {
        let v: String = sqlx::query_scalar("SELECT v FROM shared WHERE id = 5")
            .fetch_one(&region.app)
            .await
            .unwrap();
        assert_eq!(v, "v0-5", "{}", region.region);
    }
    let (code, report) = audit(&s, 2, &[]);
    assert_eq!((code, differing(&report)), (0, vec![]), "after the repair: {report:#}");
    s.terminate_all();
}

/// Regions on PostgreSQL and SQLite, with a table of every strategy, after a mixed workload
/// (inserts of every value kind, conflicting updates, an update against a delete, queue
/// siblings, CRDT merges, owned rows) and convergence: every row the regions hold matches
/// the digest its metadata recorded, as the store reads the row back. A digest recorded
/// from an image the database holds differently would flag rows as edited behind weft's
/// back that were not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_converged_mixed_mesh_holds_no_row_flagged_as_edited() {
    use common::regions::{Region, sync};
    use weft::config::{Strategy, TableConfig};
    use weft::crdt::CrdtType;
    use weft::store::checksum::LEAVES;

    let pg = weft::harness::cluster::Cluster::start(weft::harness::cluster::Settings::default())
        .expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let table = |name: &str, strategy: Strategy| TableConfig {
        strategy,
        ..TableConfig::lww(name)
    };
    let mut stock = table("stock", Strategy::Crdt);
    stock.columns = [("qty", CrdtType::Counter), ("tags", CrdtType::Set)]
        .into_iter()
        .map(|(c, t)| (c.to_string(), t))
        .collect();
    let mut accounts = table("accounts", Strategy::Ownership);
    accounts.owner_column = Some("owner".into());
    let configs = [
        table("items", Strategy::Lww),
        table("contracts", Strategy::Queue),
        stock,
        accounts,
    ];
    let sqlite = "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, price REAL, data BLOB, \
                  flag INTEGER, note TEXT); \
                  CREATE TABLE contracts (id INTEGER PRIMARY KEY, client TEXT, amount INTEGER); \
                  CREATE TABLE stock (id INTEGER PRIMARY KEY, qty INTEGER NOT NULL DEFAULT 0, tags TEXT, price INTEGER); \
                  CREATE TABLE accounts (id INTEGER PRIMARY KEY, owner TEXT, balance INTEGER);";
    let postgres = "CREATE TABLE items (id bigint PRIMARY KEY, name text, qty bigint, price float8, data bytea, \
                    flag boolean, note text); \
                    CREATE TABLE contracts (id bigint PRIMARY KEY, client text, amount bigint); \
                    CREATE TABLE stock (id bigint PRIMARY KEY, qty integer NOT NULL DEFAULT 0, tags text, price bigint); \
                    CREATE TABLE accounts (id bigint PRIMARY KEY, owner text, balance bigint);";
    let a = Region::pg(&pg, "a", postgres, &configs).await;
    let b = Region::sqlite(dir.path(), "b", sqlite, &configs).await;
    let c = Region::pg(&pg, "c", postgres, &configs).await;
    let all = [&a, &b, &c];

    a.exec(
        "INSERT INTO items VALUES (1, 'one', 1, 0.1, '\\x00ff'::bytea, true, NULL), \
         (2, 'two', -2, 1e300, NULL, false, 'n'), (3, 'three', 3, -0.5, '\\x'::bytea, NULL, 'é'); \
         INSERT INTO contracts VALUES (1, 'acme', 10); \
         INSERT INTO stock VALUES (1, 5, '[\"red\"]', 7); \
         INSERT INTO accounts VALUES (1, 'region-of-a', 100);",
    )
    .await;
    b.exec(
        "INSERT INTO items VALUES (11, 'eleven', 11, 2.5, x'0102', 1, NULL), (12, NULL, NULL, NULL, NULL, NULL, NULL); \
         INSERT INTO accounts VALUES (2, 'region-of-b', 5);",
    )
    .await;
    sync(&all).await;
    // Concurrent: an update in a and in b of one row, an update against a delete, a queue
    // conflict, CRDT increments in two regions.
    a.exec(
        "UPDATE items SET name = 'one in a', price = 3.25 WHERE id = 1; UPDATE items SET qty = 20 WHERE id = 2; \
         UPDATE contracts SET amount = 11 WHERE id = 1; UPDATE stock SET qty = qty + 1 WHERE id = 1; \
         UPDATE accounts SET balance = 90 WHERE id = 1;",
    )
    .await;
    b.exec(
        "UPDATE items SET name = 'one in b', data = x'ff' WHERE id = 1; DELETE FROM items WHERE id = 2; \
         UPDATE contracts SET amount = 12 WHERE id = 1; UPDATE stock SET qty = qty + 2 WHERE id = 1; \
         UPDATE accounts SET balance = 6 WHERE id = 2;",
    )
    .await;
    c.exec("UPDATE items SET note = 'from c' WHERE id = 11; INSERT INTO items (id, name) VALUES (21, 'partial');")
        .await;
    sync(&all).await;
    sync(&all).await;

    let buckets: std::collections::BTreeSet<u32> = (0..LEAVES).collect();
    for region in all {
        for table in ["items", "contracts", "stock", "accounts"] {
            let keys: Vec<Vec<u8>> = region
                .store
                .audit_keys(table, &buckets, None)
                .await
                .unwrap()
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            assert!(!keys.is_empty(), "{} {table}", region.node);
            let (rows, _) = region.store.audit_rows(table, &keys, None).await.unwrap();
            for row in rows {
                assert!(row.consistent() && !row.edited, "{} {table}: {row:?}", region.node);
            }
        }
        let rows = match region.node.as_str() {
            "b" => "_weft_rows",
            _ => "weft.rows",
        };
        let unknown = region
            .count(&format!(
                "SELECT count(*) FROM {rows} WHERE tbl = 'items' AND NOT deleted AND image_sum IS NULL"
            ))
            .await;
        let live = region
            .count(&format!(
                "SELECT count(*) FROM {rows} WHERE tbl = 'items' AND NOT deleted"
            ))
            .await;
        assert_eq!(
            (unknown, live),
            (0, 5),
            "every live items row has its digest in {}",
            region.node
        );
    }
}
