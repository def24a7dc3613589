//! A region's life beyond the steady state (issue 12), on real databases: a mesh created
//! around databases that already hold rows.
mod common;

use common::regions::{Region, lww, sync};
use weft::config::TableConfig;
use weft::harness::cluster::{Cluster, Settings};

/// Rows that exist before weft captures a table are adopted at its first start: queued as
/// that region's writes, they get versions and reach every region, on SQLite and on
/// PostgreSQL, across the two. Two regions holding different rows for one key resolve them
/// like any concurrent writes (LWW, logged in the conflict log). An ownership table adopts
/// only the rows its region owns. A second start adopts nothing again.
#[tokio::test]
async fn rows_that_exist_before_install_are_adopted_and_replicate() {
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let mut tables = lww(&["items"]);
    tables.push(TableConfig::owned_by_column("accounts", "home"));
    let lite = "CREATE TABLE items (id INTEGER PRIMARY KEY, v TEXT);
         CREATE TABLE accounts (id INTEGER PRIMARY KEY, home TEXT NOT NULL, balance INTEGER);
         INSERT INTO items VALUES (1, 'a-one'), (2, 'a-two'), (3, 'a-three');
         INSERT INTO accounts VALUES (10, 'region-of-a', 1), (20, 'region-of-b', 2);";
    let pg = "CREATE TABLE items (id bigint PRIMARY KEY, v text);
         CREATE TABLE accounts (id bigint PRIMARY KEY, home text NOT NULL, balance bigint);
         INSERT INTO items VALUES (3, 'b-three'), (4, 'b-four');
         INSERT INTO accounts VALUES (10, 'region-of-a', 1), (20, 'region-of-b', 2);";
    let a = Region::sqlite(dir.path(), "a", lite, &tables).await;
    let b = Region::pg(&cluster, "b", pg, &tables).await;
    sync(&[&a, &b]).await;
    let want = a.snapshot(&["items", "accounts"]).await;
    assert_eq!(b.snapshot(&["items", "accounts"]).await, want);
    assert_eq!(a.count("SELECT count(*) FROM items").await, 4);
    let conflicts = a
        .count("SELECT count(*) FROM _weft_conflicts WHERE tbl = 'items'")
        .await
        + b.count("SELECT count(*) FROM weft.conflicts WHERE tbl = 'items'").await;
    assert!(conflicts >= 1, "the two rows for key 3 are a logged conflict");
    for (r, letters) in [(&a, "_weft_dead_letters"), (&b, "weft.dead_letters")] {
        let sql = format!("SELECT count(*) FROM {letters}");
        assert_eq!(r.count(&sql).await, 0, "each region adopted only its own accounts");
    }
    // Restarted, a region adopts nothing again.
    let before = a.store.last_seq().await;
    let a = Region::reopen(a, &tables).await;
    a.drain().await;
    assert_eq!(a.store.last_seq().await, before);
}
