//! Regions that give different rows the same UNIQUE value at once converge: every region
//! keeps the same row (the later of the two writes, as under `lww`), and the other becomes a
//! `unique` dead letter in every region, its own included (its row leaves the table there),
//! listed alike, on SQLite and on PostgreSQL. Before, each region kept the row it had first
//! and dead-lettered the other: two regions kept different rows for good, and a third kept
//! whichever arrived first.
mod common;

use common::regions::{Region, lww, sync};

const USERS: &str = "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE, name TEXT);";

/// The rows of `users`, as `id|email|name`.
async fn users(r: &Region) -> Vec<String> {
    let rows = r.snapshot(&["users"]).await.remove("users").unwrap_or_default();
    rows.into_iter()
        .map(|row| row.replace(" | ", "|").replace('"', ""))
        .collect()
}

/// (origin, seq, key, cause) of every dead letter of `r`.
async fn letters(r: &Region, table: &str) -> Vec<(String, i64, String, String)> {
    let sql = format!("SELECT origin, seq, key, cause FROM {table} ORDER BY origin, seq, key");
    match &r.app {
        common::regions::App::Sqlite(pool) => sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await,
        common::regions::App::Pg(pool) => sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await,
    }
    .unwrap()
}

fn letter(origin: &str, seq: i64, key: &str) -> (String, i64, String, String) {
    (origin.into(), seq, key.into(), "unique".into())
}

/// Every region holds b's row 2 and lists a's row 1 as its one letter.
async fn assert_every_region_keeps_b_and_lists_a(regions: &[Region]) {
    for region in regions {
        assert_eq!(users(region).await, vec!["2|x@y|from b"], "{}", region.node);
        assert_eq!(
            letters(region, "_weft_dead_letters").await,
            vec![letter("a", 1, "[1]")],
            "{}",
            region.node
        );
    }
}

async fn sqlite_regions(dir: &std::path::Path, names: &[&str]) -> Vec<Region> {
    let mut out = Vec::new();
    for name in names {
        out.push(Region::sqlite(dir, name, USERS, &lww(&["users"])).await);
    }
    out
}

#[tokio::test]
async fn two_regions_giving_two_rows_one_unique_value_keep_the_same_row() {
    let dir = tempfile::tempdir().unwrap();
    let r = sqlite_regions(dir.path(), &["a", "b"]).await;
    r[0].exec("INSERT INTO users VALUES (1, 'x@y', 'from a')").await;
    r[0].drain().await;
    r[1].exec("INSERT INTO users VALUES (2, 'x@y', 'from b')").await;
    sync(&[&r[0], &r[1]]).await;
    assert_every_region_keeps_b_and_lists_a(&r).await;
    // The row that lost is kept with its data, for a person to re-enter.
    let event: Vec<u8> = sqlx::query_scalar("SELECT event FROM _weft_dead_letters")
        .fetch_one(match &r[0].app {
            common::regions::App::Sqlite(pool) => pool,
            _ => unreachable!(),
        })
        .await
        .unwrap();
    let event = weft::wire::decode_event(&event).unwrap();
    assert!(format!("{:?}", event.op).contains("from a"), "{event:?}");
}

#[tokio::test]
async fn three_regions_keep_the_same_row_whichever_they_met_first() {
    let dir = tempfile::tempdir().unwrap();
    let r = sqlite_regions(dir.path(), &["a", "b", "c"]).await;
    r[0].exec("INSERT INTO users VALUES (1, 'x@y', 'from a')").await;
    r[0].drain().await;
    r[1].exec("INSERT INTO users VALUES (2, 'x@y', 'from b')").await;
    r[1].drain().await;
    // c meets a's row first, then b's; a and b meet each other's.
    r[2].pull(&r[0]).await;
    assert_eq!(users(&r[2]).await, vec!["1|x@y|from a"]);
    r[2].pull(&r[1]).await;
    sync(&[&r[0], &r[1], &r[2]]).await;
    assert_every_region_keeps_b_and_lists_a(&r).await;
}

/// During a partition each side goes on writing: a's row gets a later update than b's
/// insert, so a's row is the later write and wins everywhere once the partition heals, and
/// b's row waits as a letter in both regions.
#[tokio::test]
async fn a_unique_collision_made_during_a_partition_converges_when_it_heals() {
    let dir = tempfile::tempdir().unwrap();
    let r = sqlite_regions(dir.path(), &["a", "b"]).await;
    r[0].exec("INSERT INTO users VALUES (1, 'x@y', 'from a')").await;
    r[0].drain().await;
    r[1].exec("INSERT INTO users VALUES (2, 'x@y', 'from b'), (3, 'z@y', 'other')")
        .await;
    r[1].drain().await;
    r[0].exec("UPDATE users SET name = 'from a, later' WHERE id = 1").await;
    sync(&[&r[0], &r[1]]).await;
    sync(&[&r[0], &r[1]]).await;
    for region in &r {
        assert_eq!(
            users(region).await,
            vec!["1|x@y|from a, later", "3|z@y|other"],
            "{}",
            region.node
        );
        let kept: Vec<_> = letters(region, "_weft_dead_letters")
            .await
            .into_iter()
            .filter(|l| l.0 == "b")
            .collect();
        assert_eq!(kept, vec![letter("b", 1, "[2]")], "{}", region.node);
    }
    // b's letter for a's superseded insert goes at its retry: the letters end alike.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    for region in &r {
        region.store.retry_dead_letters(false).await.unwrap();
        assert_eq!(
            letters(region, "_weft_dead_letters").await,
            vec![letter("b", 1, "[2]")],
            "{}",
            region.node
        );
        assert_eq!(users(region).await.len(), 2, "{}", region.node);
    }
}

/// The same between a SQLite and a PostgreSQL region.
#[tokio::test]
async fn a_unique_collision_between_sqlite_and_postgresql_keeps_the_same_row() {
    use weft::harness::cluster::{Cluster, Settings};
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let a = Region::sqlite(dir.path(), "a", USERS, &lww(&["users"])).await;
    let b = Region::pg(
        &cluster,
        "b",
        "CREATE TABLE users (id bigint PRIMARY KEY, email text NOT NULL UNIQUE, name text);",
        &lww(&["users"]),
    )
    .await;
    b.exec("INSERT INTO users VALUES (2, 'x@y', 'from b')").await;
    b.drain().await;
    a.exec("INSERT INTO users VALUES (1, 'x@y', 'from a')").await;
    sync(&[&a, &b]).await;
    assert_eq!(users(&a).await, vec!["1|x@y|from a"]);
    assert_eq!(users(&b).await, users(&a).await);
    assert_eq!(letters(&a, "_weft_dead_letters").await, vec![letter("b", 1, "[2]")]);
    assert_eq!(letters(&b, "weft.dead_letters").await, vec![letter("b", 1, "[2]")]);
}
