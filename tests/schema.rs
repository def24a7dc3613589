//! Schema changes made while the sidecars run (issue 13), on real `weft run` processes: a
//! rolling `ADD COLUMN` with writes in every region, SQLite's table-rebuild procedure, a
//! dropped column, and a PostgreSQL region that has a column its SQLite peer lacks. Each
//! ends with identical databases, no event waiting and nothing lost.
mod common;

use std::time::{Duration, Instant};

use common::sidecars::Sidecars;

/// Writes `n` fresh `shared` rows from `first` in region `i`, `extra` set when given.
async fn write_shared(s: &Sidecars, i: usize, first: i64, n: i64, extra: Option<&str>) {
    let app = &s.mesh.regions[i].app;
    for id in first..first + n {
        let v = format!("{}-{id}", s.mesh.regions[i].region);
        match extra {
            Some(extra) => {
                sqlx::query("INSERT OR REPLACE INTO shared (id, v, extra) VALUES (?, ?, ?)")
                    .bind(id)
                    .bind(&v)
                    .bind(format!("{extra}-{id}"))
                    .execute(app)
                    .await
                    .unwrap();
            }
            None => {
                sqlx::query("INSERT OR REPLACE INTO shared (id, v) VALUES (?, ?)")
                    .bind(id)
                    .bind(&v)
                    .execute(app)
                    .await
                    .unwrap();
            }
        }
    }
}

async fn exec(s: &Sidecars, i: usize, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&s.mesh.regions[i].app)
        .await
        .unwrap();
}

async fn count(s: &Sidecars, i: usize, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&s.mesh.regions[i].app)
        .await
        .unwrap()
}

/// Waits until every region has everything (frontiers), no event waits as a dead letter, and
/// the databases are identical; fails with the last difference.
async fn wait_identical(s: &Sidecars, within: Duration) {
    let started = Instant::now();
    loop {
        let caught_up = s.mesh.wait_converged(Duration::from_millis(500)).await;
        let mut waiting = 0;
        for i in 0..s.mesh.regions.len() {
            waiting += count(s, i, "SELECT count(*) FROM _weft_dead_letters").await;
        }
        if caught_up.is_ok() && waiting == 0 {
            return;
        }
        assert!(
            started.elapsed() < within,
            "regions did not converge within {within:?}: {caught_up:?}, {waiting} events waiting"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A column added region by region, with writes in every region throughout: the region that
/// has it sends it from its next drain (not only after a restart), regions without it keep
/// those events waiting, and apply them by themselves once they add it. Before, the values
/// never left the first region, not even after every region had the column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_add_column_with_writes_everywhere_ends_with_every_value_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let s = Sidecars::new(dir.path()).await;
    s.spawn_all().await;
    let mut items = 0;
    let mut round = async |s: &Sidecars, with_extra: [bool; 3], shared: i64| {
        for (i, extra) in with_extra.into_iter().enumerate() {
            s.write(i, items, 10, 5).await;
            items += 10;
            write_shared(s, i, shared + 100 * i as i64, 20, extra.then_some("x")).await;
        }
    };
    round(&s, [false; 3], 0).await;
    exec(&s, 0, "ALTER TABLE shared ADD COLUMN extra TEXT").await;
    round(&s, [true, false, false], 1000).await;
    exec(&s, 1, "ALTER TABLE shared ADD COLUMN extra TEXT").await;
    round(&s, [true, true, false], 2000).await;
    exec(&s, 2, "ALTER TABLE shared ADD COLUMN extra TEXT").await;
    round(&s, [true, true, true], 3000).await;
    wait_identical(&s, Duration::from_secs(60)).await;
    s.assert_exactly_once(items).await;
    // Every value written with the column reached every region.
    for i in 0..3 {
        let set = count(&s, i, "SELECT count(*) FROM shared WHERE extra IS NOT NULL").await;
        assert_eq!(set, 20 + 40 + 60, "region {i}");
    }
    s.terminate_all();
}

/// SQLite's documented table rebuild (create new, copy, drop, rename) drops the capture
/// triggers with the old table. The writes made before the sidecar looks again (here: all of
/// them, the sidecar paused meanwhile) used to be lost for good; the table is now captured
/// again whole, deletions included, and later writes are captured as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_table_rebuild_while_writing_loses_no_write() {
    let dir = tempfile::tempdir().unwrap();
    let s = Sidecars::new(dir.path()).await;
    s.spawn_all().await;
    write_shared(&s, 0, 0, 50, None).await;
    write_shared(&s, 1, 100, 20, None).await;
    wait_identical(&s, Duration::from_secs(30)).await;

    s.pause_idle(0).await;
    // Another region's update that east has not applied when it rebuilds: re-capturing the
    // rebuilt table must not make east's older version of the row win over it.
    exec(&s, 1, "UPDATE shared SET v = 'west wins' WHERE id = 5").await;
    exec(
        &s,
        0,
        "BEGIN;
         CREATE TABLE shared_new (id INTEGER PRIMARY KEY, v TEXT NOT NULL, extra TEXT);
         INSERT INTO shared_new (id, v) SELECT id, v FROM shared;
         DROP TABLE shared;
         ALTER TABLE shared_new RENAME TO shared;
         COMMIT;",
    )
    .await;
    // Writes while nothing captures: inserts, an update, deletions.
    write_shared(&s, 0, 200, 30, Some("rebuilt")).await;
    exec(&s, 0, "UPDATE shared SET v = 'changed after the rebuild' WHERE id = 1").await;
    exec(&s, 0, "DELETE FROM shared WHERE id IN (2, 3, 101)").await;
    // The other regions keep writing, and add the column too.
    write_shared(&s, 1, 300, 10, None).await;
    exec(&s, 1, "ALTER TABLE shared ADD COLUMN extra TEXT").await;
    exec(&s, 2, "ALTER TABLE shared ADD COLUMN extra TEXT").await;
    s.signal(0, "CONT");
    write_shared(&s, 0, 400, 10, Some("later")).await;
    write_shared(&s, 2, 500, 10, None).await;

    wait_identical(&s, Duration::from_secs(60)).await;
    for i in 0..3 {
        assert_eq!(
            count(&s, i, "SELECT count(*) FROM shared").await,
            50 + 20 + 30 + 10 + 10 + 10 - 3
        );
        assert_eq!(
            count(
                &s,
                i,
                "SELECT count(*) FROM shared WHERE v = 'changed after the rebuild'"
            )
            .await,
            1
        );
        assert_eq!(
            count(&s, i, "SELECT count(*) FROM shared WHERE extra IS NOT NULL").await,
            40
        );
        assert_eq!(
            count(&s, i, "SELECT count(*) FROM shared WHERE id = 5 AND v = 'west wins'").await,
            1,
            "region {i}: the update made before the rebuild, in flight to east, lost to the re-capture"
        );
    }
    let log = s.log(0);
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("rebuilt or recreated")),
        "east warns that it re-captured a rebuilt table:\n{log}"
    );
    s.terminate_all();
}

/// An ownership table recreated in one region without the rows another region owns (a
/// restore of that region's own rows): the missing rows are not this region's to delete, so
/// they are not sent as deletions (every peer refused those batches whole, and east's streams
/// stopped for good); the region says so, and replication goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ownership_table_recreated_without_other_regions_rows_does_not_wedge_the_streams() {
    let dir = tempfile::tempdir().unwrap();
    let s = Sidecars::new(dir.path()).await;
    s.spawn_all().await;
    let homes = s.mesh.regions.iter().map(|r| r.region.clone()).collect::<Vec<_>>();
    for (i, home) in homes.iter().enumerate().take(2) {
        for id in 0..5 {
            let sql = format!("INSERT INTO accounts VALUES ({}, '{home}', 10)", 10 * i + id);
            exec(&s, i, &sql).await;
        }
    }
    wait_identical(&s, Duration::from_secs(30)).await;
    let recreate = format!(
        "BEGIN;
         CREATE TABLE accounts_copy AS SELECT * FROM accounts WHERE home = '{}';
         DROP TABLE accounts;
         CREATE TABLE accounts (id INTEGER PRIMARY KEY, home TEXT NOT NULL, balance INTEGER NOT NULL);
         INSERT INTO accounts SELECT * FROM accounts_copy;
         DROP TABLE accounts_copy;
         COMMIT;",
        homes[0]
    );
    exec(&s, 0, &recreate).await;
    exec(&s, 0, "UPDATE accounts SET balance = 11 WHERE id = 1").await;
    s.write(0, 0, 20, 10).await;
    for i in 1..3 {
        s.wait_items(i, 20, "east's later writes reach the others").await;
        let west_rows = format!("SELECT count(*) FROM accounts WHERE home = '{}'", homes[1]);
        assert_eq!(count(&s, i, &west_rows).await, 5, "region {i} keeps west's accounts");
    }
    let east_update = "SELECT count(*) FROM accounts WHERE id = 1 AND balance = 11";
    for i in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(30);
        while count(&s, i, east_update).await != 1 {
            assert!(
                Instant::now() < deadline,
                "east's own account update reaches region {i}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let log = s.log(0);
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("owned by another region")),
        "east says it left other regions' missing rows alone:\n{log}"
    );
    assert!(
        !s.log(1).contains("not the owner"),
        "west refused none of east's batches"
    );
    s.terminate_all();
}

/// A column dropped in one region while the others still send it: that region leaves the
/// values out (it dropped them), keeps replicating both ways, and once every region dropped
/// it the databases are identical. Before, every drain and apply of that region failed on
/// the missing column until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_column_keeps_replication_going_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let s = Sidecars::new(dir.path()).await;
    for i in 0..3 {
        exec(&s, i, "ALTER TABLE shared ADD COLUMN extra TEXT").await;
    }
    s.spawn_all().await;
    for i in 0..3 {
        write_shared(&s, i, 100 * i as i64, 10, Some("before")).await;
    }
    wait_identical(&s, Duration::from_secs(30)).await;

    exec(&s, 0, "ALTER TABLE shared DROP COLUMN extra").await;
    for i in 0..3 {
        let extra = (i > 0).then_some("still-sent");
        write_shared(&s, i, 1000 + 100 * i as i64, 10, extra).await;
    }
    exec(&s, 1, "ALTER TABLE shared DROP COLUMN extra").await;
    exec(&s, 2, "ALTER TABLE shared DROP COLUMN extra").await;
    for i in 0..3 {
        write_shared(&s, i, 2000 + 100 * i as i64, 10, None).await;
    }
    wait_identical(&s, Duration::from_secs(60)).await;
    for i in 0..3 {
        assert_eq!(count(&s, i, "SELECT count(*) FROM shared").await, 90, "region {i}");
    }
    s.terminate_all();
}

/// A PostgreSQL region adds a column (with a default) while its SQLite peer has none: the
/// peer's events apply there without it (the row keeps its default), and the PostgreSQL
/// region's events naming it wait at the SQLite region until it adds the column too, then
/// apply by themselves. Writes go on in both regions throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_region_with_an_added_column_is_fed_by_a_sqlite_region_without_it() {
    use common::mixed::{Kind, Mesh};
    let mesh = Mesh::new(&[Kind::Sqlite, Kind::Postgres]).await;
    mesh.spawn_all().await;
    let mut items = 0;
    let shared = |first: i64, n: i64, extra: bool| {
        (first..first + n)
            .map(|id| match extra {
                true => format!("INSERT INTO shared (id, v, extra) VALUES ({id}, 'v{id}', 'e{id}') ON CONFLICT (id) DO UPDATE SET v = excluded.v, extra = excluded.extra;"),
                false => format!("INSERT INTO shared (id, v) VALUES ({id}, 'v{id}') ON CONFLICT (id) DO UPDATE SET v = excluded.v;"),
            })
            .collect::<String>()
    };
    for i in 0..2 {
        mesh.write_surely(i, items, 10).await;
        items += 10;
        mesh.exec(i, &shared(100 * i as i64, 10, false)).await.unwrap();
    }
    mesh.exec(1, "ALTER TABLE shared ADD COLUMN extra text DEFAULT 'unset'")
        .await
        .unwrap();
    for round in 0..3 {
        mesh.write_surely(0, items, 10).await;
        items += 10;
        mesh.exec(0, &shared(1000 + 10 * round, 10, false)).await.unwrap();
        mesh.write_surely(1, items, 10).await;
        items += 10;
        mesh.exec(1, &shared(2000 + 10 * round, 10, true)).await.unwrap();
    }
    // The SQLite region holds the PostgreSQL region's rows back until it has the column.
    let lite = match &mesh.regions[0].app {
        common::regions::App::Sqlite(pool) => pool.clone(),
        common::regions::App::Pg(_) => unreachable!("region 0 is SQLite"),
    };
    let waiting = async || -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM _weft_dead_letters")
            .fetch_one(&lite)
            .await
            .unwrap()
    };
    let started = Instant::now();
    while waiting().await < 30 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the events naming `extra` never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mesh.exec(0, "ALTER TABLE shared ADD COLUMN extra TEXT DEFAULT 'unset'")
        .await
        .unwrap();
    mesh.write_surely(0, items, 10).await;
    items += 10;
    let started = Instant::now();
    while waiting().await > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the waiting events never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mesh.wait_converged(Duration::from_secs(60)).await;
    mesh.assert_exactly_once(items).await;
    let set: i64 = sqlx::query_scalar("SELECT count(*) FROM shared WHERE extra LIKE 'e%'")
        .fetch_one(&lite)
        .await
        .unwrap();
    assert_eq!(set, 30, "every value written with the column reached the SQLite region");
    mesh.terminate_all();
}

/// A column dropped and another of the same type added in its place (one migration) is not
/// a rename: values peers still send for the dropped column are left out, never written into
/// the new one. A rename declared in the table's config (`renamed_from`) is applied as one.
#[tokio::test]
async fn a_drop_and_an_add_in_one_migration_is_no_rename_unless_declared() {
    use weft::config::TableConfig;
    let dir = tempfile::tempdir().unwrap();
    let schema = "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, legacy_note TEXT);";
    let mut declared = TableConfig::lww("t");
    declared.renamed_from = [("email".to_owned(), "legacy_note".to_owned())].into();
    let a = common::replica_with(dir.path(), "a", schema, &["t"]).await;
    let b = common::replica_with(dir.path(), "b", schema, &["t"]).await;
    let c = common::replica_configured(dir.path(), "c", schema, &[declared]).await;
    a.exec("INSERT INTO t VALUES (1, 'one', 'old note');").await;
    common::sync(&[&a, &b, &c]).await;
    let migration = "BEGIN; ALTER TABLE t DROP COLUMN legacy_note; ALTER TABLE t ADD COLUMN email TEXT; COMMIT;";
    a.exec(migration).await;
    c.exec(migration).await;
    a.exec("INSERT INTO t (id, v) VALUES (2, 'two');").await;
    c.exec("INSERT INTO t (id, v) VALUES (3, 'three');").await;
    common::sync(&[&a, &b, &c]).await;
    b.exec("UPDATE t SET legacy_note = 'n' WHERE id = 1;").await;
    common::sync(&[&a, &b, &c]).await;
    assert_eq!(
        a.rows("SELECT id, v, email FROM t ORDER BY id").await,
        ["1|one|NULL", "2|two|NULL", "3|three|NULL"]
    );
    assert_eq!(
        c.rows("SELECT email FROM t WHERE id = 1").await,
        ["n"],
        "a declared rename applies"
    );
    assert_eq!(a.count("SELECT count(*) FROM _weft_dead_letters").await, 0);
}
