//! weft's metadata schema upgrades in place: a database made by weft before numbered
//! migrations (`tests/fixtures/schema-v0.*.sql`, the DDL of weft 3d8fa92, with state in it)
//! opens with this build, records the schema version, keeps its replication state, and
//! keeps replicating; opening it again runs nothing twice.
mod common;

use common::regions::{Region, lww, sync};
use weft::harness::cluster::{Cluster, Settings};
use weft::store::schema::SCHEMA_VERSION;

const ITEMS_SQLITE: &str = "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT);";
const ITEMS_PG: &str = "CREATE TABLE items (id bigint PRIMARY KEY, name text);";

/// The state an earlier weft left in `me`'s database: its own seq, and the frontier of the
/// peer (`a` at seq 3 has applied `b` up to 7; `b` at 7 has applied `a` up to 3).
fn state(prefix: &str, me: &str) -> String {
    let (seq, peer, frontier) = if me == "a" { (3, "b", 7) } else { (7, "a", 3) };
    format!(
        "INSERT INTO {prefix}node (name, value) VALUES ('node_id', '{me}'), ('last_seq', {seq}), ('hlc', 0);\n\
         INSERT INTO {prefix}frontier (origin, seq, processed) VALUES ('{peer}', {frontier}, {frontier});"
    )
}

#[tokio::test]
async fn a_sqlite_database_from_before_numbered_migrations_upgrades_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let v0 = include_str!("fixtures/schema-v0.sqlite.sql");
    let schema = format!("{ITEMS_SQLITE}\n{v0}\n{}", state("_weft_", "a"));
    let a = Region::sqlite(dir.path(), "a", &schema, &lww(&["items"])).await;
    let version = a
        .count("SELECT CAST(value AS INTEGER) FROM _weft_node WHERE name = 'schema_version'")
        .await;
    assert_eq!(version, i64::from(SCHEMA_VERSION));
    assert_eq!(a.store.frontiers().await.unwrap()["b"], 7, "the frontier survives");
    assert_eq!(a.store.last_seq().await, 3, "the sequence survives");
    a.exec("INSERT INTO items VALUES (1, 'one');").await;
    a.drain().await;
    assert_eq!(a.store.last_seq().await, 4, "numbering goes on after the upgrade");
    let digests = "SELECT count(*) FROM _weft_rows WHERE image_sum IS NOT NULL";
    assert_eq!(a.count(digests).await, 1, "the upgraded metadata records image digests");

    // b, upgraded from the same schema, receives a's write: the upgraded metadata works.
    let schema = format!("{ITEMS_SQLITE}\n{v0}\n{}", state("_weft_", "b"));
    let b = Region::sqlite(dir.path(), "b", &schema, &lww(&["items"])).await;
    sync(&[&a, &b]).await;
    assert_eq!(b.count("SELECT count(*) FROM items WHERE name = 'one'").await, 1);
    assert_eq!(b.count(digests).await, 1);

    // A row edited in place behind weft's back is flagged while its digest is known; a row
    // whose metadata has none (as one written before digests were kept) is not.
    let behind = "INSERT INTO _weft_applying (marker) VALUES (1); UPDATE items SET name = 'fixed' WHERE id = 1; \
                  DELETE FROM _weft_applying;";
    a.exec(behind).await;
    let edited = async |r: &Region| {
        let buckets = (0..weft::store::checksum::LEAVES).collect();
        let keys: Vec<Vec<u8>> = (r.store.audit_keys("items", &buckets, None).await.unwrap())
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let (rows, _) = r.store.audit_rows("items", &keys, None).await.unwrap();
        rows.iter()
            .map(|row| (row.edited, row.consistent()))
            .collect::<Vec<_>>()
    };
    assert_eq!(edited(&a).await, vec![(true, false)]);
    a.exec("UPDATE _weft_rows SET image_sum = NULL").await;
    assert_eq!(edited(&a).await, vec![(false, true)]);
}

#[tokio::test]
async fn owner_records_from_before_owner_rules_gain_their_key_columns() {
    let dir = tempfile::tempdir().unwrap();
    // The owners table as weft made it before owner rules: no key slots, no moving_to.
    let v0 = include_str!("fixtures/schema-v0.sqlite.sql").replace(
        "    k1, k2, k3, k4,\n    moving_to TEXT,\n    PRIMARY KEY (tbl, key)",
        "    PRIMARY KEY (tbl, key)",
    );
    assert!(!v0.contains("moving_to"), "the fixture lost its owner columns");
    let schema = format!("{ITEMS_SQLITE}\n{v0}\n{}", state("_weft_", "a"));
    let a = Region::sqlite(dir.path(), "a", &schema, &lww(&["items"])).await;
    let columns = a
        .count("SELECT count(*) FROM pragma_table_info('_weft_owners') WHERE name IN ('k1', 'k4', 'moving_to')")
        .await;
    assert_eq!(columns, 3);
    a.store.close().await;
    // Reopening finds the schema current and the state intact.
    let again = Region::sqlite(dir.path(), "a", "", &lww(&["items"])).await;
    assert_eq!(again.store.last_seq().await, 3);
}

#[tokio::test]
async fn a_postgres_database_from_before_numbered_migrations_upgrades_in_place() {
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let v0 = include_str!("fixtures/schema-v0.postgres.sql");
    let schema = format!("{ITEMS_PG}\n{v0}\n{}", state("weft.", "a"));
    let a = Region::pg(&cluster, "a", &schema, &lww(&["items"])).await;
    let version = a
        .count("SELECT value::bigint FROM weft.node WHERE name = 'schema_version'")
        .await;
    assert_eq!(version, i64::from(SCHEMA_VERSION));
    assert_eq!(a.store.frontiers().await.unwrap()["b"], 7, "the frontier survives");
    a.exec("INSERT INTO items VALUES (1, 'one');").await;
    a.drain().await;
    assert_eq!(a.store.last_seq().await, 4, "numbering goes on after the upgrade");
    let dir = tempfile::tempdir().unwrap();
    let sqlite_v0 = include_str!("fixtures/schema-v0.sqlite.sql");
    let schema = format!("{ITEMS_SQLITE}\n{sqlite_v0}\n{}", state("_weft_", "b"));
    let b = Region::sqlite(dir.path(), "b", &schema, &lww(&["items"])).await;
    sync(&[&a, &b]).await;
    assert_eq!(b.count("SELECT count(*) FROM items WHERE name = 'one'").await, 1);
}
