//! The schema weft writes into an application's SQLite database (capture triggers, indexes,
//! metadata tables) opens and runs in an older SQLite than weft's own: 3.34.1, what Debian 11
//! ships, through a small program built against that version (`tests/sqlite-compat`), as an
//! application linking its system library would. Every strategy's tables are written through
//! it and weft captures the writes; a database last written by a SQLite older than weft
//! supports is refused at start, naming the minimum.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use weft::config::{OwnerRange, OwnerRule, TableConfig};
use weft::crdt::CrdtType;
use weft::event::Identity;
use weft::store::Store;
use weft::store::sqlite::SqliteStore;

const SCHEMA: &str = "
CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER);
CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT UNIQUE, name TEXT);
CREATE TABLE accounts (id INTEGER PRIMARY KEY, home TEXT NOT NULL, balance INTEGER NOT NULL);
CREATE TABLE wallets (id TEXT PRIMARY KEY, balance INTEGER NOT NULL);
CREATE TABLE ledger (id INTEGER PRIMARY KEY, amount INTEGER NOT NULL);
CREATE TABLE stock (id TEXT PRIMARY KEY, qty INTEGER NOT NULL DEFAULT 0, tags TEXT);
CREATE TABLE docs (id INTEGER PRIMARY KEY, body TEXT);
";

/// One table of every strategy, and of every kind of ownership.
fn tables() -> Vec<TableConfig> {
    let mut accounts = TableConfig::owned_by_column("accounts", "home");
    accounts.mesh_regions = vec!["eu-west".into(), "us-east".into()];
    let wallets = TableConfig::owned_by_rule(
        "wallets",
        OwnerRule {
            column: None,
            prefix: Some("-".into()),
            regions: [
                ("e".to_owned(), "us-east".to_owned()),
                ("w".to_owned(), "eu-west".to_owned()),
            ]
            .into(),
            ranges: Vec::new(),
        },
    );
    let range = |from, to, region: &str| OwnerRange {
        from,
        to,
        region: region.into(),
    };
    let ledger = TableConfig::owned_by_rule(
        "ledger",
        OwnerRule {
            column: None,
            prefix: None,
            regions: Default::default(),
            ranges: vec![range(1, 9, "us-east"), range(10, 19, "eu-west")],
        },
    );
    vec![
        TableConfig::lww("items"),
        TableConfig::lww("users"),
        accounts,
        wallets,
        ledger,
        TableConfig::crdt("stock", &[("qty", CrdtType::Counter), ("tags", CrdtType::Set)]),
        TableConfig::queue("docs"),
    ]
}

/// The program that links SQLite 3.34.1, built once into `target/sqlite-compat`.
fn old_sqlite() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target = root.join("target/sqlite-compat");
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "--quiet", "--manifest-path"])
            .arg(root.join("tests/sqlite-compat/Cargo.toml"))
            .arg("--target-dir")
            .arg(&target)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building tests/sqlite-compat failed");
        target.join("release/weft-sqlite-compat")
    })
}

/// Runs `statements` on `db` with SQLite 3.34.1: stdout on success, stderr on failure.
fn with_old_sqlite(db: &Path, statements: &[&str]) -> Result<String, String> {
    let out = Command::new(old_sqlite()).arg(db).args(statements).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        stdout.starts_with("sqlite 3.34.1"),
        "the helper links SQLite 3.34.1: {stdout}"
    );
    match out.status.success() {
        true => Ok(stdout),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

async fn open(db: &Path) -> Result<Store, weft::store::StoreError> {
    let identity = Identity {
        node: "east-1".into(),
        region: "us-east".into(),
    };
    Ok(Store::Sqlite(
        SqliteStore::open(db, identity, &tables(), Duration::from_millis(500)).await?,
    ))
}

/// Creates the application's tables with SQLite 3.34.1, as an application would.
fn create_app_database(db: &Path) {
    with_old_sqlite(db, &[SCHEMA]).unwrap();
}

#[tokio::test]
async fn every_strategy_s_capture_schema_opens_and_runs_in_sqlite_3_34() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    create_app_database(&db);
    let store = open(&db).await.unwrap();
    // Inserts, drained; then updates, deletes, key moves and a REPLACE through a unique
    // index, drained: every change reaches weft's log.
    let inserts = [
        "INSERT INTO items VALUES (1, 'a', 1), (2, 'b', 2)",
        "INSERT INTO users VALUES (1, 'x@y', 'ann')",
        "INSERT INTO accounts VALUES (1, 'us-east', 10)",
        "INSERT INTO wallets VALUES ('e-1', 5)",
        "INSERT INTO ledger VALUES (3, 7)",
        "INSERT INTO stock VALUES ('apple', 3, '[\"red\"]')",
        "INSERT INTO docs VALUES (1, 'draft')",
    ];
    let changes = [
        "UPDATE items SET qty = 5 WHERE id = 1; DELETE FROM items WHERE id = 2; UPDATE items SET id = 3 WHERE id = 1",
        "INSERT OR REPLACE INTO users VALUES (2, 'x@y', 'bob')",
        "UPDATE accounts SET balance = 11 WHERE id = 1",
        "UPDATE wallets SET id = 'e-2' WHERE id = 'e-1'",
        "DELETE FROM ledger WHERE id = 3",
        "UPDATE stock SET qty = qty - 1 WHERE id = 'apple'",
        "UPDATE docs SET body = 'final' WHERE id = 1",
    ];
    for phase in [&inserts, &changes] {
        for sql in phase {
            with_old_sqlite(&db, &[sql]).unwrap_or_else(|e| panic!("SQLite 3.34.1 refused `{sql}`: {e}"));
        }
        store.drain().await.unwrap();
    }
    // The refusals of ownership tables work there too, and say why.
    for (sql, says) in [
        (
            "INSERT INTO accounts VALUES (2, 'eu-west', 1)",
            "owned by eu-west, not by us-east",
        ),
        (
            "INSERT INTO accounts VALUES (2, 'mars', 1)",
            "owned by the region in its `home` column, not by us-east",
        ),
        (
            "INSERT INTO wallets VALUES ('w-1', 1)",
            "owned by eu-west, not by us-east",
        ),
        ("INSERT INTO wallets VALUES ('x-1', 1)", "owned by no region"),
        ("INSERT INTO ledger VALUES (12, 1)", "owned by eu-west, not by us-east"),
        (
            "UPDATE accounts SET home = 'eu-west' WHERE id = 1",
            "changes only by weft ownership transfer",
        ),
    ] {
        let refused = with_old_sqlite(&db, &[sql]).expect_err(sql);
        assert!(refused.contains(says), "`{sql}` was refused with: {refused}");
    }
    assert_eq!(
        store.drain().await.unwrap().events,
        0,
        "the refused writes left nothing"
    );
    let events: Vec<String> = common::own_events(&store, "east-1", 0)
        .await
        .iter()
        .map(|e| {
            format!(
                "{} {} {}",
                e.table,
                e.key,
                if e.op.is_delete() { "delete" } else { "upsert" }
            )
        })
        .collect();
    let mut expected = vec![
        "items [1] upsert",
        "items [2] upsert",
        "users [1] upsert",
        "accounts [1] upsert",
        "wallets [\"e-1\"] upsert",
        "ledger [3] upsert",
        "stock [\"apple\"] upsert",
        "docs [1] upsert",
        "items [1] delete",
        "items [2] delete",
        "items [3] upsert",
        "users [1] delete",
        "users [2] upsert",
        "accounts [1] upsert",
        "wallets [\"e-1\"] delete",
        "wallets [\"e-2\"] upsert",
        "ledger [3] delete",
        "stock [\"apple\"] upsert",
        "docs [1] upsert",
    ];
    let mut events = events;
    events.sort();
    expected.sort();
    assert_eq!(events, expected);
    store.close().await;
    // And the database still opens there once weft has run: nothing weft wrote locks it out.
    let schema = with_old_sqlite(
        &db,
        &["SELECT count(*) FROM sqlite_master WHERE name LIKE '_weft_capture_%'"],
    )
    .unwrap();
    assert!(schema.lines().any(|l| l.trim() == "25"), "{schema}");
}

/// The header field at offset 96 of a SQLite file: the version number of the library that
/// last wrote it.
fn set_last_writer(db: &Path, version: u32) {
    let mut bytes = std::fs::read(db).unwrap();
    bytes[96..100].copy_from_slice(&version.to_be_bytes());
    std::fs::write(db, bytes).unwrap();
}

#[tokio::test]
async fn a_database_last_written_by_a_sqlite_older_than_3_34_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    create_app_database(&db);
    set_last_writer(&db, 3_031_001);
    let error = open(&db).await.err().expect("the start is refused").to_string();
    assert!(
        error.contains("3.31.1") && error.contains("3.34"),
        "the refusal names the writer's version and the minimum: {error}"
    );
    // Nothing was written: the application's SQLite still opens the file, and weft has no
    // trigger there.
    let schema = with_old_sqlite(&db, &["SELECT count(*) FROM sqlite_master WHERE name LIKE '_weft%'"]).unwrap();
    assert!(schema.lines().any(|l| l.trim() == "0"), "{schema}");
    // Written by 3.34.1 (as the helper leaves it), it starts.
    set_last_writer(&db, 3_034_001);
    open(&db).await.unwrap().close().await;
}
