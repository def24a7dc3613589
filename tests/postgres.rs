//! The PostgreSQL store against real, throw-away PostgreSQL clusters (started by the tests
//! as the `postgres` user): capture, typed values across stores, applier writes not
//! recaptured, late-committing transactions, row locks against undrained local changes,
//! dead letters, and one sidecar per database.
mod common;

use common::regions::{Region, lww, sync};
use sqlx::Connection as _;
use weft::event::{Op, Value};
use weft::harness::cluster::{Cluster, Settings};

const PG_SCHEMA: &str = "CREATE TABLE t (
    id bigint PRIMARY KEY, n integer, f double precision, s text, b bytea, ok boolean,
    amount numeric(12, 2), at timestamptz, doc jsonb, missing text, small real,
    twice bigint GENERATED ALWAYS AS (n * 2) STORED);
    CREATE TABLE pairs (a text, b integer, v text, PRIMARY KEY (a, b));";

const SQLITE_SCHEMA: &str = "CREATE TABLE t (
    id INTEGER PRIMARY KEY, n INTEGER, f REAL, s TEXT, b BLOB, ok BOOLEAN,
    amount TEXT, at TEXT, doc TEXT, missing TEXT, small REAL);
    CREATE TABLE pairs (a TEXT, b INTEGER, v TEXT, PRIMARY KEY (a, b));";

fn cluster() -> Cluster {
    Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster")
}

#[tokio::test]
async fn captures_typed_rows_and_round_trips_them_through_sqlite_exactly() {
    let pg = cluster();
    let dir = tempfile::tempdir().unwrap();
    let a = Region::pg(&pg, "a", PG_SCHEMA, &lww(&["t", "pairs"])).await;
    let b = Region::sqlite(dir.path(), "b", SQLITE_SCHEMA, &lww(&["t", "pairs"])).await;
    a.exec(
        "INSERT INTO t (id, n, f, s, b, ok, amount, at, doc, missing, small) VALUES
         (1, 7, 0.1, 'é ''quoted''', '\\x00ff10', true, 12.50, '2026-11-22 18:00:00.123456+02', '{\"k\": [1, 2.5, null]}', NULL, 0.1),
         (2, -1, 'Infinity', '', '\\x', false, -0.01, '1970-01-01 00:00:00+00', '[]', 'x', '-Infinity'),
         (3, 0, 1e300, 's', NULL, NULL, NULL, NULL, NULL, NULL, NULL);
         INSERT INTO pairs VALUES ('k', 1, 'v');
         UPDATE t SET n = 8 WHERE id = 1;
         DELETE FROM t WHERE id = 3;",
    )
    .await;
    assert_eq!(a.drain().await, 3, "id 3 was inserted and deleted before any drain");
    let events = a.events(0).await;
    let Op::Upsert(row) = &events.iter().find(|e| e.key.0 == [Value::Integer(1)]).unwrap().op else {
        panic!("row 1 is an upsert")
    };
    let get = |c: &str| row.get(c).cloned().unwrap();
    assert_eq!(get("n"), Value::Integer(8));
    assert_eq!(get("f"), Value::Real(0.1));
    assert_eq!(get("s"), Value::Text("é 'quoted'".into()));
    assert_eq!(get("b"), Value::Blob(vec![0, 255, 16]));
    assert_eq!(get("ok"), Value::Integer(1));
    assert_eq!(get("amount"), Value::Text("12.50".into()));
    assert_eq!(get("at"), Value::Text("2026-11-22 16:00:00.123456+00".into()));
    assert_eq!(get("doc"), Value::Text("{\"k\": [1, 2.5, null]}".into()));
    assert_eq!(get("missing"), Value::Null);
    assert_eq!(get("small"), Value::Real(0.1f32 as f64));
    assert!(
        row.get("twice").is_none(),
        "generated columns are computed in each region"
    );

    let before = a.snapshot(&["t", "pairs"]).await;
    b.pull(&a).await;
    assert_eq!(b.count("SELECT count(*) FROM _weft_dead_letters").await, 0);
    assert_eq!(b.snapshot(&["pairs"]).await["pairs"], before["pairs"]);
    // SQLite changes one column; everything else must come back to PostgreSQL unchanged.
    b.exec("UPDATE t SET s = 'from sqlite' WHERE id = 1; UPDATE t SET s = 'two' WHERE id = 2;")
        .await;
    b.drain().await;
    a.pull(&b).await;
    assert_eq!(a.count("SELECT count(*) FROM weft.dead_letters").await, 0);
    let after = a.snapshot(&["t", "pairs"]).await;
    let expected: Vec<String> = before["t"]
        .iter()
        .map(|r| {
            r.replace("\"é 'quoted'\"", "\"from sqlite\"")
                .replacen(" | \"\" | ", " | \"two\" | ", 1)
        })
        .collect();
    assert_eq!(after["t"], expected);
    assert_eq!(
        a.count("SELECT count(*) FROM t WHERE twice = n * 2 AND amount = 12.50 AND at = '2026-11-22 16:00:00.123456+00' AND b = '\\x00ff10'")
            .await,
        1
    );
    assert_eq!(after["_weft_rows"], b.snapshot(&["t"]).await["_weft_rows"]);
}

#[tokio::test]
async fn a_key_change_deletes_the_old_key_everywhere() {
    let pg = cluster();
    let dir = tempfile::tempdir().unwrap();
    let a = Region::pg(&pg, "a", PG_SCHEMA, &lww(&["t", "pairs"])).await;
    let b = Region::sqlite(dir.path(), "b", SQLITE_SCHEMA, &lww(&["t", "pairs"])).await;
    a.exec("INSERT INTO t (id, s) VALUES (1, 'one'), (2, 'two'), (3, 'three'); INSERT INTO pairs VALUES ('k', 1, 'v')")
        .await;
    sync(&[&a, &b]).await;
    // A move to a fresh key, two moves in one statement, and a composite key change.
    a.exec(
        "UPDATE t SET id = 10 WHERE id = 1; UPDATE t SET id = id + 100 WHERE id IN (2, 3); \
         UPDATE pairs SET b = 2 WHERE a = 'k'",
    )
    .await;
    sync(&[&a, &b]).await;
    let ids: Vec<(i64, String)> = match &b.app {
        common::regions::App::Sqlite(pool) => sqlx::query_as("SELECT id, s FROM t ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap(),
        _ => unreachable!(),
    };
    assert_eq!(
        ids,
        [
            (10, "one".to_string()),
            (102, "two".to_string()),
            (103, "three".to_string())
        ]
    );
    assert_eq!(b.count("SELECT count(*) FROM pairs WHERE a = 'k' AND b = 2").await, 1);
    assert_eq!(b.count("SELECT count(*) FROM pairs").await, 1);
    assert_eq!(a.snapshot(&["t", "pairs"]).await, b.snapshot(&["t", "pairs"]).await);
}

#[tokio::test]
async fn applier_writes_are_not_captured_again() {
    let pg = cluster();
    let dir = tempfile::tempdir().unwrap();
    let a = Region::sqlite(dir.path(), "a", SQLITE_SCHEMA, &lww(&["t", "pairs"])).await;
    let b = Region::pg(&pg, "b", PG_SCHEMA, &lww(&["t", "pairs"])).await;
    a.exec("INSERT INTO t (id, n) VALUES (1, 1), (2, 2); INSERT INTO pairs VALUES ('x', 1, 'y');")
        .await;
    a.drain().await;
    let report = b.pull(&a).await;
    assert_eq!(report.applied, 3);
    assert_eq!(b.count("SELECT count(*) FROM weft.outbox").await, 0);
    assert_eq!(b.drain().await, 0);
    assert_eq!(b.count("SELECT count(*) FROM t").await, 2);
    // The application's own writes still are.
    b.exec("UPDATE t SET n = 3 WHERE id = 1").await;
    assert_eq!(b.drain().await, 1);
}

#[tokio::test]
async fn a_transaction_that_commits_late_with_an_earlier_id_is_not_missed() {
    let pg = cluster();
    let a = Region::pg(&pg, "a", PG_SCHEMA, &lww(&["t", "pairs"])).await;
    let url = pg.url("a");
    let mut early = sqlx::PgConnection::connect(&url).await.unwrap();
    let mut late = sqlx::PgConnection::connect(&url).await.unwrap();
    let mut t1 = early.begin().await.unwrap();
    sqlx::raw_sql("INSERT INTO t (id, n) VALUES (1, 1); INSERT INTO pairs VALUES ('one', 1, 'first')")
        .execute(&mut *t1)
        .await
        .unwrap();
    let mut t2 = late.begin().await.unwrap();
    sqlx::raw_sql("INSERT INTO t (id, n) VALUES (2, 2)")
        .execute(&mut *t2)
        .await
        .unwrap();
    t2.commit().await.unwrap();
    assert_eq!(a.drain().await, 1, "only the committed transaction");
    t1.commit().await.unwrap();
    assert_eq!(a.drain().await, 2, "the late commit, whole");
    let events = a.events(0).await;
    let keys: Vec<String> = events.iter().map(|e| format!("{} {}", e.table, e.key)).collect();
    assert_eq!(keys, ["t [2]", "t [1]", "pairs [\"one\", 1]"]);
    assert_eq!(
        (events[1].batch_end, events[2].batch_end),
        (3, 3),
        "one batch: never split"
    );
    let dir = tempfile::tempdir().unwrap();
    let b = Region::sqlite(dir.path(), "b", SQLITE_SCHEMA, &lww(&["t", "pairs"])).await;
    b.pull(&a).await;
    assert_eq!(b.count("SELECT count(*) FROM t").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_write_never_overwrites_an_undrained_local_change() {
    let pg = cluster();
    let dir = tempfile::tempdir().unwrap();
    let a = Region::sqlite(dir.path(), "a", SQLITE_SCHEMA, &lww(&["t", "pairs"])).await;
    let b = Region::pg(&pg, "b", PG_SCHEMA, &lww(&["t", "pairs"])).await;
    a.exec("INSERT INTO t (id, s) VALUES (1, 'a0'), (2, 'a0')").await;
    sync(&[&a, &b]).await;

    // Row 1: b's change is committed but not drained when a's concurrent one arrives.
    b.exec("UPDATE t SET s = 'b1' WHERE id = 1").await;
    // Row 2: b's change is still in an open transaction, holding the row, when apply starts.
    let mut app = sqlx::PgConnection::connect(&pg.url("b")).await.unwrap();
    let mut open = app.begin().await.unwrap();
    sqlx::query("UPDATE t SET s = 'b2' WHERE id = 2")
        .execute(&mut *open)
        .await
        .unwrap();
    a.exec("UPDATE t SET s = 'a1' WHERE id = 1; UPDATE t SET s = 'a2' WHERE id = 2;")
        .await;
    a.drain().await;
    let events = a.events(0).await;
    let apply = async { b.store.apply(events).await.unwrap() };
    let commit_later = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        open.commit().await.unwrap();
    };
    let (report, ()) = tokio::join!(apply, commit_later);
    assert_eq!(
        report.drained.events, 2,
        "both local changes were drained inside the apply"
    );
    assert_eq!(report.conflicts, 2, "{report:?}");
    assert_eq!(b.count("SELECT count(*) FROM weft.conflicts").await, 2);
    sync(&[&a, &b]).await;
    assert_eq!(a.snapshot(&["t"]).await, b.snapshot(&["t"]).await);
}

#[tokio::test]
async fn a_value_postgres_cannot_hold_is_dead_lettered_and_the_rest_applies() {
    let pg = cluster();
    let dir = tempfile::tempdir().unwrap();
    let a = Region::sqlite(dir.path(), "a", SQLITE_SCHEMA, &lww(&["t", "pairs"])).await;
    let b = Region::pg(&pg, "b", PG_SCHEMA, &lww(&["t", "pairs"])).await;
    a.exec(
        "INSERT INTO t (id, n) VALUES (1, 1), (2, 'not a number'), (3, 3);
         INSERT INTO t (id, b) VALUES (4, 'text, not bytes');
         INSERT INTO t (id, amount) VALUES (5, '1e400');
         INSERT INTO pairs VALUES ('ok', 1, 'v');",
    )
    .await;
    a.drain().await;
    let report = b.pull(&a).await;
    assert_eq!((report.applied, report.dead_lettered), (3, 3), "{report:?}");
    let reasons: Vec<String> = sqlx::query_scalar("SELECT key || ': ' || reason FROM weft.dead_letters ORDER BY key")
        .fetch_all(b.pg_pool())
        .await
        .unwrap();
    assert!(
        reasons[0].starts_with("[2]: invalid input syntax for type integer"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].starts_with("[4]: column `b`: a bytea column cannot hold text"),
        "{reasons:?}"
    );
    assert!(reasons[2].starts_with("[5]: "), "{reasons:?}");
    assert_eq!(b.count("SELECT count(*) FROM t").await, 2);
    assert_eq!(b.count("SELECT count(*) FROM pairs").await, 1);
    // Nothing blocks: later events flow.
    a.exec("UPDATE t SET n = 10 WHERE id = 1").await;
    a.drain().await;
    assert_eq!(b.pull(&a).await.applied, 1);
}

#[tokio::test]
async fn a_nan_sqlite_cannot_store_is_dead_lettered_there() {
    let pg = cluster();
    let dir = tempfile::tempdir().unwrap();
    let a = Region::pg(&pg, "a", PG_SCHEMA, &lww(&["t"])).await;
    let b = Region::sqlite(dir.path(), "b", SQLITE_SCHEMA, &lww(&["t"])).await;
    a.exec("INSERT INTO t (id, f) VALUES (1, 'NaN'), (2, 1.5)").await;
    a.drain().await;
    let report = b.pull(&a).await;
    assert_eq!((report.applied, report.dead_lettered), (1, 1), "{report:?}");
    let reasons = b
        .count("SELECT count(*) FROM _weft_dead_letters WHERE reason LIKE '%NaN, which SQLite cannot store%'")
        .await;
    assert_eq!(reasons, 1);
}

#[tokio::test]
async fn only_one_sidecar_serves_a_database() {
    let pg = cluster();
    let a = Region::pg(&pg, "a", PG_SCHEMA, &lww(&["t"])).await;
    let second = weft::store::Store::open(
        &a.database,
        weft::event::Identity {
            node: "a".into(),
            region: "region-of-a".into(),
        },
        &lww(&["t"]),
        std::time::Duration::from_secs(1),
    )
    .await;
    let error = second.err().expect("a second sidecar must be refused").to_string();
    assert!(
        error.contains("another weft sidecar already serves this database"),
        "{error}"
    );
    // Once the first one is gone, a new one may start.
    a.store.close().await;
    let third = weft::store::Store::open(
        &a.database,
        weft::event::Identity {
            node: "a".into(),
            region: "region-of-a".into(),
        },
        &lww(&["t"]),
        std::time::Duration::from_secs(1),
    )
    .await;
    assert!(third.is_ok(), "{:?}", third.err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_never_deadlocks_with_an_application_locking_rows_in_another_order() {
    let pg = cluster();
    let dir = tempfile::tempdir().unwrap();
    let schema_pg =
        "CREATE TABLE a_first (id bigint PRIMARY KEY, v text); CREATE TABLE b_second (id bigint PRIMARY KEY, v text);
                     INSERT INTO a_first VALUES (1, 'x'); INSERT INTO b_second VALUES (1, 'x');";
    let schema_sqlite = "CREATE TABLE a_first (id INTEGER PRIMARY KEY, v TEXT); CREATE TABLE b_second (id INTEGER PRIMARY KEY, v TEXT);";
    let a = Region::pg(&pg, "a", schema_pg, &lww(&["a_first", "b_second"])).await;
    let b = Region::sqlite(dir.path(), "b", schema_sqlite, &lww(&["a_first", "b_second"])).await;
    b.exec("INSERT INTO a_first VALUES (2, 'remote'); INSERT INTO b_second VALUES (2, 'remote'); UPDATE a_first SET v = 'r' WHERE id = 2;")
        .await;
    b.drain().await;
    // The application holds b_second's row 1 and, a little later, takes a_first's row 1;
    // the apply locks a_first (row 1 is not in its run, row 2 is) and b_second alike.
    b.exec("INSERT INTO a_first VALUES (1, 'from b') ON CONFLICT (id) DO UPDATE SET v = excluded.v; INSERT INTO b_second VALUES (1, 'from b') ON CONFLICT (id) DO UPDATE SET v = excluded.v;")
        .await;
    b.drain().await;
    let mut app = a.pg_pool().begin().await.unwrap();
    sqlx::query("UPDATE b_second SET v = 'app' WHERE id = 1")
        .execute(&mut *app)
        .await
        .unwrap();
    let (report, committed) = tokio::join!(a.store.apply(b.events(0).await), async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        sqlx::query("UPDATE a_first SET v = 'app' WHERE id = 1")
            .execute(&mut *app)
            .await?;
        app.commit().await
    });
    committed.expect("the application's transaction commits");
    let report = report.expect("the apply commits, after the application");
    assert_eq!(
        report.conflicts, 2,
        "the application's writes were drained and compared first"
    );
    sync(&[&a, &b]).await;
    assert_eq!(
        a.snapshot(&["a_first", "b_second"]).await,
        b.snapshot(&["a_first", "b_second"]).await
    );
}

/// Issue 14: a PostgreSQL region reached with `sslmode=verify-full` (sqlx over rustls, the
/// server's certificate checked against the CA given in `sslrootcert` and its name): weft
/// opens it, captures and every connection is encrypted; the same URL with another CA is
/// refused with the reason.
#[tokio::test]
async fn a_postgresql_url_with_sslmode_verify_full_works_over_rustls() {
    use weft::config::Database;
    use weft::event::Identity;
    use weft::store::Store;
    let pg = cluster();
    let ca = pg.enable_tls().unwrap();
    pg.wait_ready(std::time::Duration::from_secs(30)).await.unwrap();
    pg.create_database("secure").await.unwrap();
    let url = pg.url_verify_full("secure", &ca);
    let app = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::raw_sql("CREATE TABLE pairs (a text, b integer, v text, PRIMARY KEY (a, b))")
        .execute(&app)
        .await
        .unwrap();
    let identity = Identity {
        node: "a".into(),
        region: "ra".into(),
    };
    let tables = [weft::config::TableConfig::lww("pairs")];
    let store = Store::open(
        &Database::Postgres(url.clone()),
        identity.clone(),
        &tables,
        std::time::Duration::from_millis(500),
    )
    .await
    .unwrap();
    sqlx::query("INSERT INTO pairs VALUES ('x', 1, 'secret')")
        .execute(&app)
        .await
        .unwrap();
    let drained = store.drain().await.unwrap();
    assert_eq!(drained.events, 1);
    let plain: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.datname = 'secure' AND NOT s.ssl")
        .fetch_one(&app)
        .await
        .unwrap();
    assert_eq!(plain, 0, "every connection to the region is encrypted");
    store.close().await;

    let other = tempfile::tempdir().unwrap();
    let options = weft::transport::tls::MintOptions {
        nodes: vec![],
        not_before: None,
        days: 1,
        mesh: "other".into(),
    };
    weft::transport::tls::mint(other.path(), &options).unwrap();
    let wrong = pg.url_verify_full("secure", &other.path().join("ca.pem"));
    let refused = Store::open(
        &Database::Postgres(wrong),
        identity,
        &tables,
        std::time::Duration::from_millis(500),
    )
    .await;
    let message = match refused {
        Ok(_) => panic!("a server certificate from another CA was trusted"),
        Err(error) => weft::transport::tls::chain(&error),
    };
    assert!(message.to_lowercase().contains("certificate"), "{message}");
}
