//! Edges where weft used to lose acknowledged writes (`../shared/review-edges.md`) that need
//! a real PostgreSQL server: its error classes, constraints, triggers, session settings and
//! network timeouts, alone and beside SQLite regions. The rest are in `tests/edges.rs`.
mod common;

use std::time::Duration;

/// Finding 13 on a PostgreSQL region: the same resolution, captured from `weft.outbox` with
/// the key alone as its image, closes the entry in the PostgreSQL and the SQLite region.
#[tokio::test]
async fn on_postgres_resolving_with_a_delete_of_an_absent_row_closes_the_conflict_everywhere() {
    use common::regions::{Region, sync as sync_regions};
    use weft::config::{Database, NodeConfig, TableConfig};
    use weft::harness::cluster::{Cluster, Settings};
    use weft::store::admin::{Admin, Choice};
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let tables = [TableConfig::queue("contracts")];
    let pg = "CREATE TABLE contracts (id bigint PRIMARY KEY, client text, amount bigint);";
    let lite = "CREATE TABLE contracts (id INTEGER PRIMARY KEY, client TEXT, amount INTEGER);";
    let a = Region::pg(&cluster, "a", pg, &tables).await;
    let b = Region::sqlite(dir.path(), "b", lite, &tables).await;
    a.exec("INSERT INTO contracts VALUES (7, 'acme', 100);").await;
    sync_regions(&[&a, &b]).await;
    b.exec("UPDATE contracts SET amount = 150 WHERE id = 7;").await;
    b.drain().await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    a.exec("DELETE FROM contracts WHERE id = 7;").await;
    sync_regions(&[&a, &b]).await;
    let open = "SELECT count(*) FROM weft.queue WHERE closed_at IS NULL";
    assert_eq!(a.count(open).await, 1, "one open conflict");
    assert_eq!(
        a.count("SELECT count(*) FROM contracts").await,
        0,
        "the delete is visible"
    );
    let Database::Postgres(url) = &a.database else {
        unreachable!()
    };
    let topology = "version = 1\nmesh = \"q\"\nshape = \"all-to-all\"\n[[nodes]]\nid = \"a\"\nregion = \"region-of-a\"\naddress = \"127.0.0.1:1\"\n[[nodes]]\nid = \"b\"\nregion = \"region-of-b\"\naddress = \"127.0.0.1:2\"\n";
    std::fs::write(dir.path().join("t.toml"), topology).unwrap();
    let config = dir.path().join("a.toml");
    let text = format!(
        "version = 1\nnode = \"a\"\ntopology = \"t.toml\"\ndatabase = \"{url}\"\n[[tables]]\nname = \"contracts\"\nstrategy = \"queue\"\n"
    );
    std::fs::write(&config, text).unwrap();
    let admin = Admin::open(NodeConfig::load(&config).unwrap()).await.unwrap();
    let conflict = admin.open_conflicts().await.unwrap().pop().unwrap();
    let delete = conflict.siblings.iter().position(|s| s.op.is_delete()).unwrap() + 1;
    admin.resolve(conflict.id, Choice::Take(delete), "ops").await.unwrap();
    sync_regions(&[&a, &b]).await;
    sync_regions(&[&a, &b]).await;
    assert_eq!(a.count(open).await, 0, "closed on PostgreSQL");
    assert_eq!(
        b.count("SELECT count(*) FROM _weft_queue WHERE closed_at IS NULL")
            .await,
        0,
        "closed on SQLite"
    );
}

/// Finding 14: PostgreSQL's TRUNCATE fires no row or transition-table trigger, so it emptied
/// one region's table and no other. It is refused on replicated tables, saying what to do;
/// the rows stay, and a DELETE of all rows replicates as usual.
#[tokio::test]
async fn truncate_of_a_replicated_postgres_table_is_refused_and_loses_nothing() {
    use common::regions::{Region, lww, sync as sync_regions};
    use weft::harness::cluster::{Cluster, Settings};
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let a = Region::pg(
        &cluster,
        "a",
        "CREATE TABLE t (id bigint PRIMARY KEY, v text);",
        &lww(&["t"]),
    )
    .await;
    let b = Region::sqlite(
        dir.path(),
        "b",
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);",
        &lww(&["t"]),
    )
    .await;
    a.exec("INSERT INTO t VALUES (1, 'one'), (2, 'two');").await;
    sync_regions(&[&a, &b]).await;
    let refused = a.try_exec("TRUNCATE t;").await.unwrap_err();
    assert!(
        refused.contains("TRUNCATE of t is not replicated") && refused.contains("DELETE FROM t"),
        "{refused}"
    );
    assert_eq!(a.count("SELECT count(*) FROM t").await, 2, "nothing was truncated");
    a.exec("DELETE FROM t;").await;
    sync_regions(&[&a, &b]).await;
    assert_eq!(
        b.count("SELECT count(*) FROM t").await,
        0,
        "a DELETE of every row replicates"
    );
}

/// Finding 8 (c): a write the receiving database refuses for a reason retrying cannot fix
/// (an application trigger enabled ALWAYS raising, an index row too large for PostgreSQL's B-tree) is
/// dead-lettered with the reason and SQLSTATE; the events around it apply and later writes
/// of the same origin keep flowing. These errors used to fail the whole run, forever.
#[tokio::test]
async fn a_postgres_receiver_dead_letters_what_it_refuses_for_good_and_the_stream_flows() {
    use common::regions::{Region, lww};
    use rand::distr::{Alphanumeric, SampleString};
    use weft::harness::cluster::{Cluster, Settings};
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let a = Region::sqlite(
        dir.path(),
        "a",
        "CREATE TABLE t (id INTEGER PRIMARY KEY, qty INTEGER); CREATE TABLE k (id TEXT PRIMARY KEY, v TEXT);",
        &lww(&["t", "k"]),
    )
    .await;
    let b = Region::pg(
        &cluster,
        "b",
        "CREATE TABLE t (id bigint PRIMARY KEY, qty bigint);
         CREATE FUNCTION no_negative() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.qty < 0 THEN RAISE EXCEPTION 'qty may not go below zero'; END IF; RETURN NEW; END $$;
         CREATE TRIGGER no_negative BEFORE INSERT OR UPDATE ON t FOR EACH ROW EXECUTE FUNCTION no_negative();
         -- A validation trigger meant to hold for replicated writes too fires even as a replica.
         ALTER TABLE t ENABLE ALWAYS TRIGGER no_negative;
         CREATE TABLE k (id text PRIMARY KEY, v text);",
        &lww(&["t", "k"]),
    )
    .await;
    // Random text does not compress: far over the 2704 bytes a B-tree entry may hold.
    let long_key = Alphanumeric.sample_string(&mut rand::rng(), 8000);
    a.exec(&format!(
        "INSERT INTO t VALUES (1, -1); INSERT INTO k VALUES ('{long_key}', 'long'); INSERT INTO t VALUES (2, 5);"
    ))
    .await;
    a.drain().await;
    let report = b.pull(&a).await;
    assert_eq!((report.applied, report.dead_lettered), (1, 2), "{report:?}");
    let reasons: Vec<String> = sqlx::query_scalar("SELECT reason FROM weft.dead_letters ORDER BY seq")
        .fetch_all(b.pg_pool())
        .await
        .unwrap();
    assert!(
        reasons[0].contains("below zero") && reasons[0].contains("P0001"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("54000"), "{reasons:?}");
    a.exec("UPDATE t SET qty = 3 WHERE id = 1;").await;
    a.drain().await;
    let report = b.pull(&a).await;
    assert_eq!(report.applied, 1, "later writes of the origin keep flowing: {report:?}");
    assert_eq!(b.count("SELECT sum(qty)::int8 FROM t").await, 8);
}

/// Finding 8 (b): a register holding an infinite or NaN float used to be stored as JSON
/// `null`, which does not read back: the origin's next drain of that row failed for good,
/// and so did every receiver's batch. They now round-trip, SQLite to PostgreSQL and back.
#[tokio::test]
async fn non_finite_floats_in_a_crdt_register_replicate_and_wedge_nothing() {
    use common::regions::{Region, sync as sync_regions};
    use weft::config::TableConfig;
    use weft::crdt::CrdtType;
    use weft::harness::cluster::{Cluster, Settings};
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let tables = [TableConfig::crdt("p", &[("price", CrdtType::Register)])];
    let a = Region::sqlite(
        dir.path(),
        "a",
        "CREATE TABLE p (id INTEGER PRIMARY KEY, price REAL, note TEXT);",
        &tables,
    )
    .await;
    let b = Region::pg(
        &cluster,
        "b",
        "CREATE TABLE p (id bigint PRIMARY KEY, price float8, note text);",
        &tables,
    )
    .await;
    a.exec("INSERT INTO p VALUES (1, 9e999, 'x'), (2, -9e999, 'x');").await;
    sync_regions(&[&a, &b]).await;
    a.exec("UPDATE p SET note = 'y';").await;
    a.drain().await;
    b.pull(&a).await;
    assert_eq!(
        b.count("SELECT count(*) FROM p WHERE price = 'Infinity' AND note = 'y'")
            .await,
        1
    );
    assert_eq!(
        b.count("SELECT count(*) FROM p WHERE price = '-Infinity' AND note = 'y'")
            .await,
        1
    );
    b.exec("UPDATE p SET price = 'Infinity' WHERE id = 2; UPDATE p SET note = 'z' WHERE id = 1;")
        .await;
    sync_regions(&[&a, &b]).await;
    assert_eq!(
        a.count("SELECT count(*) FROM p WHERE price = 9e999 AND note = 'z'")
            .await,
        1
    );
    assert_eq!(a.count("SELECT count(*) FROM p WHERE price = 9e999").await, 2);
    // SQLite cannot store a NaN (it reads back as NULL): refused, visibly, not wedged.
    b.exec("UPDATE p SET price = 'NaN' WHERE id = 1; UPDATE p SET note = 'after' WHERE id = 2;")
        .await;
    sync_regions(&[&a, &b]).await;
    assert_eq!(
        a.count("SELECT count(*) FROM _weft_dead_letters WHERE reason LIKE '%NaN%'")
            .await,
        1
    );
    assert_eq!(a.count("SELECT count(*) FROM p WHERE note = 'after'").await, 1);
}

/// Finding 19: on PostgreSQL the applier runs as a replica (`session_replication_role`), so
/// an application trigger fires where the application wrote, not again where weft applies
/// the write. Here an audit trigger used to add a second audit row in the receiving region
/// (its own, on top of the replicated one).
#[tokio::test]
async fn application_triggers_fire_where_the_application_wrote_not_where_weft_applies() {
    use common::regions::{Region, lww, sync as sync_regions};
    use weft::harness::cluster::{Cluster, Settings};
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let schema = "CREATE TABLE items (id bigint PRIMARY KEY, v text);
         CREATE TABLE audit (id text PRIMARY KEY DEFAULT gen_random_uuid()::text, item bigint, v text);
         CREATE FUNCTION audit_item() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO audit (item, v) VALUES (NEW.id, NEW.v); RETURN NEW; END $$;
         CREATE TRIGGER audit_item AFTER INSERT OR UPDATE ON items FOR EACH ROW EXECUTE FUNCTION audit_item();";
    let a = Region::pg(&cluster, "a", schema, &lww(&["items", "audit"])).await;
    let b = Region::pg(&cluster, "b", schema, &lww(&["items", "audit"])).await;
    a.exec("INSERT INTO items VALUES (1, 'one');").await;
    a.exec("UPDATE items SET v = 'uno' WHERE id = 1;").await;
    sync_regions(&[&a, &b]).await;
    assert_eq!(a.count("SELECT count(*) FROM audit").await, 2);
    assert_eq!(
        b.count("SELECT count(*) FROM audit").await,
        2,
        "the origin's audit rows, no more"
    );
    assert_eq!(
        a.snapshot(&["items", "audit"]).await,
        b.snapshot(&["items", "audit"]).await
    );
}

const ORDERS_LITE: &str = "CREATE TABLE orders (id INTEGER PRIMARY KEY, total INTEGER);
     CREATE TABLE lines (id INTEGER PRIMARY KEY, order_id INTEGER REFERENCES orders(id));";
const ORDERS_PG: &str = "CREATE TABLE orders (id bigint PRIMARY KEY, total bigint);
     CREATE TABLE lines (id bigint PRIMARY KEY, order_id bigint NOT NULL REFERENCES orders(id));";

/// `a` writes order 1 and its line 10 in one transaction (coalesced: the line first); `c`
/// applies it.
async fn parent_and_child_in_one_transaction(
    a: &common::regions::Region,
    c: &common::regions::Region,
) -> weft::store::ApplyReport {
    a.exec(
        "BEGIN; INSERT INTO orders VALUES (1, 0); INSERT INTO lines VALUES (10, 1); \
         UPDATE orders SET total = 5 WHERE id = 1; COMMIT;",
    )
    .await;
    a.drain().await;
    c.pull(a).await
}

/// `a` writes order 2, `b` (having it) writes its line 20, and `c` hears `b` first.
async fn child_before_parent(
    a: &common::regions::Region,
    b: &common::regions::Region,
    c: &common::regions::Region,
) -> weft::store::ApplyReport {
    a.exec("INSERT INTO orders VALUES (2, 7);").await;
    a.drain().await;
    b.pull(a).await;
    b.exec("INSERT INTO lines VALUES (20, 2);").await;
    b.drain().await;
    c.pull(b).await
}

/// Finding 4 (a) and (b): a PostgreSQL receiver with a foreign key takes a child written in
/// the same transaction as its parent (coalescing puts the child first), and a child from
/// one region that arrives before its parent from another. Both used to be dead-lettered for
/// good (SQLSTATE 23503), leaving the child missing in that region only.
#[tokio::test]
async fn children_reach_a_postgres_receiver_with_a_foreign_key_whatever_the_arrival_order() {
    use common::regions::{Region, lww};
    use weft::harness::cluster::{Cluster, Settings};
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let tables = lww(&["orders", "lines"]);
    let a = Region::sqlite(dir.path(), "a", ORDERS_LITE, &tables).await;
    let b = Region::sqlite(dir.path(), "b", ORDERS_LITE, &tables).await;
    let c = Region::pg(&cluster, "c", ORDERS_PG, &tables).await;
    let report = parent_and_child_in_one_transaction(&a, &c).await;
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    // A parent from a, its child from b; c hears b first.
    let report = child_before_parent(&a, &b, &c).await;
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    c.pull(&a).await;
    assert_eq!(c.count("SELECT count(*) FROM lines").await, 2);
    assert_eq!(
        c.count("SELECT count(*) FROM lines JOIN orders ON orders.id = order_id")
            .await,
        2
    );
}

/// Finding 16: a sidecar cut off from its PostgreSQL database in the middle of an apply (a
/// partition: nothing arrives either way, nothing is closed) used to leave its transaction,
/// and the row locks it held, in place until TCP gave up, for hours behind a proxy. The
/// writer's session now ends a transaction left idle for 30 s, so the application's update
/// of a row the lost apply held goes through, and the sidecar recovers once the link heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_cut_off_from_postgres_mid_apply_holds_row_locks_only_briefly() {
    use common::proxy::Proxy;
    use common::regions::{Region, lww};
    use std::time::Instant;
    use weft::harness::cluster::{Cluster, Settings};
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let tables = lww(&["t"]);
    let a = Region::sqlite(
        dir.path(),
        "a",
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);",
        &tables,
    )
    .await;
    let url = cluster.create_database("b").await.unwrap();
    let app = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::raw_sql("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        .execute(&app)
        .await
        .unwrap();
    let server = url.split('@').nth(1).unwrap().split('/').next().unwrap().to_owned();
    let proxy = Proxy::start(&server).await;
    let proxied = url.replace(&server, &proxy.listen.to_string());
    let identity = weft::event::Identity {
        node: "b".into(),
        region: "region-of-b".into(),
    };
    let b = std::sync::Arc::new(
        weft::store::Store::open(
            &weft::config::Database::Postgres(proxied),
            identity,
            &tables,
            Duration::from_millis(500),
        )
        .await
        .unwrap(),
    );
    a.exec("INSERT INTO t VALUES (1, 'one'), (2, 'two');").await;
    a.drain().await;
    b.apply(a.events(0).await).await.unwrap();
    a.exec("UPDATE t SET v = v || '!';").await;
    a.drain().await;
    let events = a.events(2).await;

    // The application holds row 2: the apply locks row 1, then waits for row 2.
    let mut holder = app.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM t WHERE id = 2 FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let applying = tokio::spawn({
        let (b, events) = (b.clone(), events.clone());
        async move { b.apply(events).await }
    });
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'weft' AND wait_event_type = 'Lock'";
    let deadline = Instant::now() + Duration::from_secs(20);
    while sqlx::query_scalar::<_, i64>(waiting).fetch_one(&app).await.unwrap() == 0 {
        assert!(Instant::now() < deadline, "the apply never waited for row 2");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.stall();
    holder.commit().await.unwrap();

    // The apply's backend now has both rows and waits, idle in its transaction, for a client
    // that cannot answer. The application's update of row 1 waits for it only briefly.
    let started = Instant::now();
    let mut conn = app.acquire().await.unwrap();
    sqlx::raw_sql("SET statement_timeout = '90s'")
        .execute(&mut *conn)
        .await
        .unwrap();
    let updated = sqlx::query("UPDATE t SET v = 'app' WHERE id = 1")
        .execute(&mut *conn)
        .await;
    let waited = started.elapsed();
    assert!(updated.is_ok(), "{updated:?} after {waited:?}");
    assert!(waited < Duration::from_secs(50), "the row stayed locked for {waited:?}");
    drop(conn);

    proxy.resume();
    let first = applying.await.unwrap();
    assert!(first.is_err(), "the cut-off apply's transaction was ended: {first:?}");
    let report = b.apply(events).await.expect("the sidecar redials and applies");
    assert_eq!(report.frontiers.get("a"), Some(&4));
}

/// Finding 4 (c): a source transaction that swaps two rows' unique values coalesces into two
/// writes that each collide with the other row's old value. Each used to be dead-lettered,
/// so receivers kept the old values for good; they now apply as one group, on SQLite and on
/// PostgreSQL (as a replica, where no delete can cascade).
#[tokio::test]
async fn a_swap_of_unique_values_in_one_transaction_replicates() {
    use common::regions::{Region, lww, sync as sync_regions};
    use weft::harness::cluster::{Cluster, Settings};
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let tables = lww(&["users"]);
    let lite = "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE);";
    let a = Region::sqlite(dir.path(), "a", lite, &tables).await;
    let b = Region::sqlite(dir.path(), "b", lite, &tables).await;
    let c = Region::pg(
        &cluster,
        "c",
        "CREATE TABLE users (id bigint PRIMARY KEY, email text NOT NULL UNIQUE);",
        &tables,
    )
    .await;
    a.exec("INSERT INTO users VALUES (1, 'a@x'), (2, 'b@x');").await;
    sync_regions(&[&a, &b, &c]).await;
    a.exec(
        "BEGIN; UPDATE users SET email = 'tmp' WHERE id = 1; UPDATE users SET email = 'a@x' WHERE id = 2; \
         UPDATE users SET email = 'b@x' WHERE id = 1; COMMIT;",
    )
    .await;
    sync_regions(&[&a, &b, &c]).await;
    let want = a.snapshot(&["users"]).await;
    assert_eq!(b.snapshot(&["users"]).await, want);
    assert_eq!(c.snapshot(&["users"]).await, want);
    assert_eq!(b.count("SELECT count(*) FROM _weft_dead_letters").await, 0);
    assert_eq!(c.count("SELECT count(*) FROM weft.dead_letters").await, 0);
}

/// Finding 4 where weft cannot apply as a replica (a database role that is no superuser):
/// foreign keys are checked on applied writes. A child written in the same transaction as
/// its parent applies (the child, set aside, goes in after the parent); a child that arrives
/// from one region before its parent from another is dead-lettered, retried with backoff,
/// and applied once the parent is there, instead of missing in that region for good.
#[tokio::test]
async fn without_a_replica_role_a_child_that_came_before_its_parent_is_retried_and_applied() {
    use common::regions::{Region, lww};
    use weft::harness::cluster::{Cluster, Settings};
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let tables = lww(&["orders", "lines"]);
    let a = Region::sqlite(dir.path(), "a", ORDERS_LITE, &tables).await;
    let b = Region::sqlite(dir.path(), "b", ORDERS_LITE, &tables).await;
    let c = Region::pg_unprivileged(&cluster, "c", ORDERS_PG, &tables).await;
    let report = parent_and_child_in_one_transaction(&a, &c).await;
    assert_eq!((report.applied, report.dead_lettered), (2, 0), "{report:?}");

    let report = child_before_parent(&a, &b, &c).await;
    assert_eq!(report.dead_lettered, 1, "the parent is not there yet: {report:?}");
    let reason: String = sqlx::query_scalar("SELECT reason FROM weft.dead_letters")
        .fetch_one(c.pg_pool())
        .await
        .unwrap();
    assert!(reason.contains("23503"), "{reason}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let retried = c.store.retry_dead_letters(false).await.unwrap();
    assert_eq!((retried.applied, retried.refused), (0, 1), "still no parent");
    let attempts = c.count("SELECT attempts FROM weft.dead_letters").await;
    assert_eq!(attempts, 1);
    c.pull(&a).await;
    assert_eq!(
        c.store.retry_dead_letters(false).await.unwrap().applied,
        0,
        "not due yet: it backs off"
    );
    // Rows were applied since: a letter refused for a missing parent is due at once.
    assert_eq!(c.store.retry_dead_letters(true).await.unwrap().applied, 1);
    assert_eq!(c.count("SELECT count(*) FROM weft.dead_letters").await, 0);
    assert_eq!(c.count("SELECT count(*) FROM lines").await, 2);
    a.pull(&b).await;
    assert_eq!(
        c.snapshot(&["orders", "lines"]).await,
        a.snapshot(&["orders", "lines"]).await
    );
}

/// Finding 21 (PostgreSQL capture text): a row image is rendered by the application's
/// session, so an old driver's `extra_float_digits`, `IntervalStyle = sql_standard` or a
/// local time zone used to change the replicated value: a rounded double, an interval of
/// another sign. The capture functions now render canonical text whatever the session says.
#[tokio::test]
async fn postgres_capture_renders_values_exactly_whatever_the_application_session_says() {
    use common::regions::{Region, lww};
    use weft::harness::cluster::{Cluster, Settings};
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let tables = lww(&["v"]);
    let schema = "CREATE TABLE v (id bigint PRIMARY KEY, f float8, i interval, t timestamptz);";
    let a = Region::pg(&cluster, "a", schema, &tables).await;
    let c = Region::pg(&cluster, "c", schema, &tables).await;
    let b = Region::sqlite(
        dir.path(),
        "b",
        "CREATE TABLE v (id INTEGER PRIMARY KEY, f REAL, i TEXT, t TEXT);",
        &tables,
    )
    .await;
    let mut app = a.pg_pool().acquire().await.unwrap();
    sqlx::raw_sql(
        "SET extra_float_digits = -3; SET IntervalStyle = 'sql_standard'; SET TimeZone = 'Asia/Kolkata';
         INSERT INTO v VALUES (1, 0.1::float8 + 0.2::float8, interval '-1 day -2 hours', '2026-01-01 00:00:00+00');",
    )
    .execute(&mut *app)
    .await
    .unwrap();
    drop(app);
    a.drain().await;
    c.pull(&a).await;
    b.pull(&a).await;
    let exact = "SELECT count(*) FROM v WHERE f = 0.1::float8 + 0.2::float8 AND i = interval '-1 day -2 hours' \
                 AND t = '2026-01-01 00:00:00+00'";
    assert_eq!(c.count(exact).await, 1, "{:?}", c.snapshot(&["v"]).await);
    assert_eq!(
        b.count("SELECT count(*) FROM v WHERE f = 0.1 + 0.2 AND i = 'P-1DT-2H' AND t = '2026-01-01 00:00:00+00'")
            .await,
        1,
        "{:?}",
        b.snapshot(&["v"]).await
    );
}

/// PostgreSQL proves a rename: `RENAME COLUMN` keeps the column's `attnum`, so peers' values
/// under the old name apply under the new one; a column dropped and another of the same type
/// added in its place has a new `attnum`, and peers' values for the dropped one are left out.
#[tokio::test]
async fn on_postgres_a_renamed_column_is_proven_by_its_attnum_and_a_drop_and_add_is_not_one() {
    use common::regions::{Region, lww, sync as sync_regions};
    use weft::harness::cluster::{Cluster, Settings};
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let tables = lww(&["t"]);
    let pg = "CREATE TABLE t (id bigint PRIMARY KEY, note text, legacy text);";
    let lite = "CREATE TABLE t (id INTEGER PRIMARY KEY, note TEXT, legacy TEXT);";
    let a = Region::pg(&cluster, "a", pg, &tables).await;
    let b = Region::sqlite(dir.path(), "b", lite, &tables).await;
    b.exec("INSERT INTO t VALUES (1, 'n0', 'l0');").await;
    sync_regions(&[&a, &b]).await;
    a.exec("ALTER TABLE t RENAME COLUMN note TO memo;").await;
    a.exec("BEGIN; ALTER TABLE t DROP COLUMN legacy; ALTER TABLE t ADD COLUMN email text; COMMIT;")
        .await;
    a.exec("INSERT INTO t (id) VALUES (2);").await;
    sync_regions(&[&a, &b]).await;
    b.exec("UPDATE t SET note = 'n1', legacy = 'l1' WHERE id = 1;").await;
    sync_regions(&[&a, &b]).await;
    let renamed = "SELECT count(*) FROM t WHERE id = 1 AND memo = 'n1'";
    assert_eq!(a.count(renamed).await, 1, "the renamed column took the peer's value");
    let misplaced = "SELECT count(*) FROM t WHERE email IS NOT NULL";
    assert_eq!(
        a.count(misplaced).await,
        0,
        "the dropped column's values stay out of the new one"
    );
}

/// A PostgreSQL table dropped and recreated from a copy loses weft's triggers; it is captured
/// again whole, each row stamped just after the version the region had: another region's
/// update the region had not applied yet still wins everywhere, and rows missing from the
/// copy go out as deletions.
#[tokio::test]
async fn on_postgres_a_recreated_table_is_recaptured_without_beating_writes_in_flight() {
    use common::regions::{Region, lww, sync as sync_regions};
    use weft::harness::cluster::{Cluster, Settings};
    let cluster = Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let tables = lww(&["t"]);
    let pg = "CREATE TABLE t (id bigint PRIMARY KEY, v text);";
    let lite = "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);";
    let a = Region::pg(&cluster, "a", pg, &tables).await;
    let b = Region::sqlite(dir.path(), "b", lite, &tables).await;
    a.exec("INSERT INTO t SELECT g, 'a' FROM generate_series(1, 10) g;")
        .await;
    sync_regions(&[&a, &b]).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    b.exec("UPDATE t SET v = 'b wins' WHERE id = 5;").await;
    b.drain().await;
    a.exec(
        "BEGIN; CREATE TABLE t_copy AS SELECT * FROM t WHERE id <> 9; DROP TABLE t; \
         CREATE TABLE t (id bigint PRIMARY KEY, v text); INSERT INTO t SELECT * FROM t_copy; DROP TABLE t_copy; COMMIT;",
    )
    .await;
    sync_regions(&[&a, &b]).await;
    sync_regions(&[&a, &b]).await;
    for region in [&a, &b] {
        assert_eq!(
            region
                .count("SELECT count(*) FROM t WHERE id = 5 AND v = 'b wins'")
                .await,
            1
        );
        assert_eq!(
            region.count("SELECT count(*) FROM t").await,
            9,
            "row 9 deleted everywhere"
        );
    }
}
