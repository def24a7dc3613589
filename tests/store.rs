//! The SQLite store against real database files: capture, apply, exactly-once, conflicts,
//! dead letters, and the errors a user sees.
mod common;

use common::{Replica, replica, replica_with};
use weft::event::{Op, Value};

#[tokio::test]
async fn captures_insert_update_delete_with_exact_types() {
    let dir = tempfile::tempdir().unwrap();
    let a = replica(dir.path(), "a").await;
    a.exec("INSERT INTO items VALUES (1, 'one', 10, 1.5, x'00ff'); INSERT INTO items VALUES (2, NULL, -3, 0.0, NULL);")
        .await;
    assert_eq!(a.drain().await, 2);
    a.exec("UPDATE items SET qty = 11 WHERE id = 1; DELETE FROM items WHERE id = 2;")
        .await;
    assert_eq!(a.drain().await, 2);
    let events = a.events(0).await;
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert_eq!(events.iter().map(|e| e.batch_end).collect::<Vec<_>>(), vec![2, 2, 4, 4]);
    let Op::Upsert(row) = &events[0].op else {
        panic!("expected an upsert")
    };
    assert_eq!(row.get("name"), Some(&Value::Text("one".into())));
    assert_eq!(row.get("price"), Some(&Value::Real(1.5)));
    assert_eq!(row.get("data"), Some(&Value::Blob(vec![0, 255])));
    let Op::Upsert(row) = &events[1].op else {
        panic!("expected an upsert")
    };
    assert_eq!(row.get("name"), Some(&Value::Null));
    assert_eq!(row.get("price"), Some(&Value::Real(0.0)));
    assert_eq!(
        events[2].version.get("a"),
        events[2].seq,
        "this node's entry is the seq of its last write"
    );
    assert!(
        events[2].version.get("a") > events[0].version.get("a"),
        "second write to row 1"
    );
    assert!(events[3].op.is_delete());
    assert!(
        events
            .iter()
            .all(|e| e.origin == "a" && e.path == vec!["a".to_string()])
    );
    assert!(events.windows(2).all(|w| w[0].hlc < w[1].hlc), "HLC increases");
    assert_eq!(a.count("SELECT count(*) FROM _weft_outbox").await, 0);
}

#[tokio::test]
async fn coalesces_changes_to_one_row_and_skips_rows_nobody_saw() {
    let dir = tempfile::tempdir().unwrap();
    let a = replica(dir.path(), "a").await;
    a.exec("INSERT INTO items (id, qty) VALUES (1, 1); UPDATE items SET qty = 2 WHERE id = 1; UPDATE items SET qty = 3 WHERE id = 1;").await;
    a.exec("INSERT INTO items (id, qty) VALUES (2, 1); DELETE FROM items WHERE id = 2;")
        .await;
    assert_eq!(a.drain().await, 1);
    let Op::Upsert(row) = &a.events(0).await[0].op else {
        panic!()
    };
    assert_eq!(row.get("qty"), Some(&Value::Integer(3)));
}

#[tokio::test]
async fn a_primary_key_change_moves_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (replica(dir.path(), "a").await, replica(dir.path(), "b").await);
    a.exec("INSERT INTO pairs VALUES ('x', 1, 'v');").await;
    a.drain().await;
    b.pull(&a).await;
    a.exec("UPDATE pairs SET b = 2 WHERE a = 'x';").await;
    assert_eq!(a.drain().await, 2);
    b.pull(&a).await;
    assert_eq!(b.rows("SELECT a, b, v FROM pairs").await, vec!["x|2|v"]);
}

#[tokio::test]
async fn install_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let a = replica(dir.path(), "a").await;
    let triggers = "SELECT count(*) FROM sqlite_master WHERE type = 'trigger'";
    assert_eq!(a.count(triggers).await, 6);
    a.store.close().await;
    let a = replica(dir.path(), "a").await;
    a.store.close().await;
    // One sidecar at a time holds the file (see `a_second_sidecar_on_one_sqlite_file_is_refused`).
    let a = replica(dir.path(), "a").await;
    assert_eq!(a.count(triggers).await, 6);
    a.exec("INSERT INTO items (id) VALUES (1);").await;
    assert_eq!(
        a.count("SELECT count(*) FROM _weft_outbox").await,
        1,
        "one trigger per event, not two"
    );
}

#[tokio::test]
async fn refuses_a_table_without_primary_key_and_a_missing_table() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("x.db");
    let app = weft::harness::app_pool(&db).await.unwrap();
    sqlx::raw_sql("CREATE TABLE loose (a TEXT, b TEXT);")
        .execute(&app)
        .await
        .unwrap();
    let identity = weft::event::Identity {
        node: "x".into(),
        region: "r".into(),
    };
    let open = |tables: Vec<&str>| {
        let tables: Vec<weft::config::TableConfig> = tables.into_iter().map(weft::config::TableConfig::lww).collect();
        let identity = identity.clone();
        let db = db.clone();
        async move {
            weft::store::sqlite::SqliteStore::open(&db, identity, &tables, std::time::Duration::from_secs(1)).await
        }
    };
    let err = open(vec!["loose"]).await.err().unwrap().to_string();
    assert!(err.contains("table `loose`: has no primary key"), "{err}");
    let err = open(vec!["ghost"]).await.err().unwrap().to_string();
    assert!(err.contains("table `ghost`: does not exist"), "{err}");
}

#[tokio::test]
async fn a_null_primary_key_is_refused_in_the_applications_transaction() {
    let dir = tempfile::tempdir().unwrap();
    // SQLite lets a non-integer primary key be NULL unless declared NOT NULL.
    let a = replica_with(
        dir.path(),
        "a",
        "CREATE TABLE loose_key (k TEXT PRIMARY KEY, v TEXT);",
        &["loose_key"],
    )
    .await;
    let err = sqlx::query("INSERT INTO loose_key (k, v) VALUES (NULL, 'v')")
        .execute(&a.app)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("loose_key.k is NULL; weft replicates rows by primary key"),
        "{err}"
    );
    assert_eq!(a.count("SELECT count(*) FROM loose_key").await, 0);
}

#[tokio::test]
async fn a_database_of_another_node_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = replica(dir.path(), "a").await;
    a.store.close().await;
    let identity = weft::event::Identity {
        node: "b".into(),
        region: "r".into(),
    };
    let err = weft::store::sqlite::SqliteStore::open(
        &dir.path().join("a.db"),
        identity,
        &[weft::config::TableConfig::lww("items")],
        std::time::Duration::from_secs(1),
    )
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("belongs to node `a`"), "{err}");
}

#[tokio::test]
async fn applied_writes_are_not_captured_again() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (replica(dir.path(), "a").await, replica(dir.path(), "b").await);
    a.exec("INSERT INTO items (id, name) VALUES (1, 'x'), (2, 'y');").await;
    a.drain().await;
    let report = b.pull(&a).await;
    assert_eq!(report.applied, 2);
    assert_eq!(b.count("SELECT count(*) FROM _weft_outbox").await, 0);
    assert_eq!(b.drain().await, 0);
    assert_eq!(b.count("SELECT count(*) FROM _weft_log").await, 0);
    assert_eq!(
        b.rows("SELECT id, name FROM items ORDER BY id").await,
        vec!["1|x", "2|y"]
    );
}

#[tokio::test]
async fn duplicates_are_dropped_and_gaps_never_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (replica(dir.path(), "a").await, replica(dir.path(), "b").await);
    for i in 1..=3 {
        a.exec(&format!("INSERT INTO items (id, qty) VALUES ({i}, {i});")).await;
        a.drain().await;
    }
    let events = a.events(0).await;
    let report = b.store.apply(vec![events[0].clone()]).await.unwrap();
    assert_eq!((report.applied, report.frontiers["a"]), (1, 1));

    // A gap: seq 3 while the frontier is 1. Nothing of it is applied.
    let report = b.store.apply(vec![events[2].clone()]).await.unwrap();
    assert_eq!(report.gap, Some(("a".into(), 1, 3)));
    assert_eq!(report.applied, 0);
    assert_eq!(b.count("SELECT count(*) FROM items").await, 1);

    // A resend from the frontier with a duplicate in front.
    let report = b.store.apply(events.clone()).await.unwrap();
    assert_eq!((report.duplicates, report.applied, report.gap.clone()), (1, 2, None));
    let report = b.store.apply(events).await.unwrap();
    assert_eq!((report.duplicates, report.applied), (3, 0));
    assert_eq!(
        b.count("SELECT processed FROM _weft_frontier WHERE origin = 'a'").await,
        3
    );
}

#[tokio::test]
async fn a_run_that_ends_inside_a_capture_batch_is_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (replica(dir.path(), "a").await, replica(dir.path(), "b").await);
    a.exec("BEGIN; INSERT INTO items (id) VALUES (1); INSERT INTO items (id) VALUES (2); COMMIT;")
        .await;
    a.drain().await;
    let events = a.events(0).await;
    let report = b.store.apply(vec![events[0].clone()]).await.unwrap();
    assert!(report.gap.is_some(), "half a source transaction must not apply");
    assert_eq!(b.count("SELECT count(*) FROM items").await, 0);
    let report = b.store.apply(events).await.unwrap();
    assert_eq!(report.applied, 2);
}

#[tokio::test]
async fn an_undrained_local_change_is_never_overwritten_silently() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (replica(dir.path(), "a").await, replica(dir.path(), "b").await);
    a.exec("INSERT INTO items (id, name) VALUES (1, 'from a');").await;
    a.drain().await;
    // b writes the same row, and its change still sits in b's outbox when a's arrives.
    b.exec("INSERT INTO items (id, name) VALUES (1, 'from b');").await;
    let report = b.pull(&a).await;
    assert_eq!(report.drained.events, 1, "the local change is drained first");
    assert_eq!(report.conflicts, 1, "the race is a conflict, not an overwrite");
    assert_eq!(b.count("SELECT count(*) FROM _weft_conflicts").await, 1);
    // b's write is later (greater HLC), so it wins at b, and at a once it arrives.
    a.pull(&b).await;
    assert_eq!(a.rows("SELECT name FROM items").await, vec!["from b"]);
    assert_eq!(b.rows("SELECT name FROM items").await, vec!["from b"]);
    assert_eq!(a.snapshot().await, b.snapshot().await);
}

async fn converge(replicas: &[&Replica]) {
    common::sync(replicas).await;
    let first = replicas[0].snapshot().await;
    for r in &replicas[1..] {
        assert_eq!(
            r.snapshot().await,
            first,
            "{} differs from {}",
            r.node,
            replicas[0].node
        );
    }
}

#[tokio::test]
async fn lww_update_against_a_concurrent_delete() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (replica(dir.path(), "a").await, replica(dir.path(), "b").await);
    a.exec("INSERT INTO items (id, name) VALUES (1, 'v1');").await;
    converge(&[&a, &b]).await;
    // Concurrent: a deletes, then b updates (later HLC): the update wins everywhere.
    a.exec("DELETE FROM items WHERE id = 1;").await;
    a.drain().await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    b.exec("UPDATE items SET name = 'v2' WHERE id = 1;").await;
    b.drain().await;
    converge(&[&a, &b]).await;
    assert_eq!(a.rows("SELECT name FROM items").await, vec!["v2"]);

    // Concurrent again, the delete is later: the row is gone everywhere, as a tombstone.
    // (Later by the clock: commit times are stamped to the millisecond, and at a tie the
    // greater node id, b, would win.)
    b.exec("UPDATE items SET name = 'v3' WHERE id = 1;").await;
    b.drain().await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    a.exec("DELETE FROM items WHERE id = 1;").await;
    a.drain().await;
    converge(&[&a, &b]).await;
    assert_eq!(b.count("SELECT count(*) FROM items").await, 0);
    assert_eq!(b.count("SELECT deleted FROM _weft_rows WHERE tbl = 'items'").await, 1);

    // Delete then re-insert descends from the tombstone: it applies everywhere.
    b.exec("INSERT INTO items (id, name) VALUES (1, 'reborn');").await;
    converge(&[&a, &b]).await;
    assert_eq!(a.rows("SELECT name FROM items").await, vec!["reborn"]);
}

#[tokio::test]
async fn dead_letters_keep_the_reason_and_do_not_block_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let a = replica_with(
        dir.path(),
        "a",
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT); CREATE TABLE other (id INTEGER PRIMARY KEY);
         CREATE TABLE wide (id INTEGER PRIMARY KEY, x TEXT, extra TEXT);",
        &["items", "other", "wide"],
    )
    .await;
    let b = replica_with(
        dir.path(),
        "b",
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT UNIQUE); CREATE TABLE wide (id INTEGER PRIMARY KEY, x TEXT);",
        &["items", "wide"],
    )
    .await;
    b.exec("INSERT INTO items (id, name) VALUES (100, 'taken');").await;
    b.drain().await;
    a.exec(
        "BEGIN;
         INSERT INTO items (id, name) VALUES (1, 'fine');
         INSERT INTO other (id) VALUES (1);
         INSERT INTO wide (id, x, extra) VALUES (2, 'x', 'no such column at b');
         INSERT INTO items (id, name) VALUES (3, 'taken');
         INSERT INTO items (id, name) VALUES (4, 'also fine');
         COMMIT;",
    )
    .await;
    a.drain().await;
    let report = b.pull(&a).await;
    // Row 3 is the later write of the value 'taken': it wins, and b's row 100 waits as a
    // `unique` letter (tests/unique.rs).
    assert_eq!((report.applied, report.dead_lettered), (3, 3));
    assert_eq!(report.frontiers["a"], 5, "the frontier passes dead letters");
    assert_eq!(b.rows("SELECT id FROM items ORDER BY id").await, vec!["1", "3", "4"]);
    let reasons = b
        .rows("SELECT tbl, reason FROM _weft_dead_letters ORDER BY origin, seq")
        .await;
    assert!(
        reasons[0].starts_with("other|table `other` is not replicated on this node"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("column `extra` does not exist in table `wide`"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].contains("lost a UNIQUE value of `items` to key [3]"),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn the_clock_and_sequence_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let a = replica(dir.path(), "a").await;
    a.exec("INSERT INTO items (id) VALUES (1);").await;
    a.drain().await;
    let before = a.events(0).await[0].hlc;
    a.store.close().await;
    let a = replica(dir.path(), "a").await;
    a.exec("INSERT INTO items (id) VALUES (2);").await;
    a.drain().await;
    let events = a.events(0).await;
    assert_eq!(events[1].seq, 2);
    assert!(events[1].hlc > before);
}

#[tokio::test]
async fn one_run_with_many_writes_to_the_same_row_applies_them_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (replica(dir.path(), "a").await, replica(dir.path(), "b").await);
    for sql in [
        "INSERT INTO items (id, name) VALUES (1, 'v1'), (2, 'other');",
        "UPDATE items SET name = 'v2' WHERE id = 1;",
        "DELETE FROM items WHERE id = 1;",
        "INSERT INTO items (id, name) VALUES (1, 'v3');",
        "DELETE FROM items WHERE id = 2;",
    ] {
        a.exec(sql).await;
        a.drain().await;
    }
    // All five capture batches arrive in one run and go through the grouped writes.
    let report = b.pull(&a).await;
    assert_eq!((report.applied, report.frontiers["a"]), (6, 6));
    assert_eq!(b.rows("SELECT id, name FROM items").await, vec!["1|v3"]);
    assert_eq!(a.snapshot().await, b.snapshot().await);
}

#[tokio::test]
async fn a_relaying_node_keeps_events_unchanged_but_for_its_place_in_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let a = replica(dir.path(), "a").await;
    let b = replica(dir.path(), "b").await;
    let b = Replica {
        store: b.store.relaying(["a".to_string()].into_iter().collect()),
        ..b
    };
    let c = replica(dir.path(), "c").await;
    a.exec("INSERT INTO items (id, name) VALUES (1, 'x'); INSERT INTO items (id, name) VALUES (2, 'y');")
        .await;
    a.drain().await;
    let sent = a.events(0).await;
    b.pull(&a).await;
    let relayed: Vec<weft::event::Event> = b
        .store
        .read_log("a", 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| weft::wire::decode_event(&e.bytes).unwrap())
        .collect();
    assert_eq!(relayed.len(), 2);
    for (original, relayed) in sent.iter().zip(&relayed) {
        assert_eq!(relayed.path, vec!["a".to_string(), "b".to_string()]);
        let mut unchanged = relayed.clone();
        unchanged.path.pop();
        assert_eq!(
            &unchanged, original,
            "origin, seq, batch, HLC and version travel unchanged"
        );
    }
    // c applies the relayed copies; b itself would drop them as looped.
    assert_eq!(c.store.apply(relayed.clone()).await.unwrap().applied, 2);
    assert_eq!(b.store.apply(relayed).await.unwrap().looped, 2);
    assert_eq!(a.snapshot().await, c.snapshot().await);
}
