//! Every strategy on PostgreSQL regions, in meshes with a SQLite region, against a real
//! throw-away cluster: CRDT columns, the resolution queue with `weft conflicts`, and entity
//! ownership (owner column and owner rule) with its triggers and `weft ownership transfer`.
mod common;

use std::path::Path;
use std::process::Command;

use common::regions::{Region, sync};
use weft::config::{OwnerRule, Strategy, TableConfig};
use weft::crdt::CrdtType;
use weft::harness::cluster::{Cluster, Settings};

fn cluster() -> Cluster {
    Cluster::start(Settings::default()).expect("a throw-away PostgreSQL cluster")
}

fn table(name: &str, strategy: Strategy) -> TableConfig {
    TableConfig {
        name: name.into(),
        strategy,
        columns: Default::default(),
        owner_column: None,
        owner_rule: None,
        unknown_columns: Default::default(),
        renamed_from: Default::default(),
        mesh_regions: Vec::new(),
    }
}

/// Keys `a-..`, `b-..` and `c-..` belong to the regions of nodes a, b and c.
fn prefix_rule() -> OwnerRule {
    OwnerRule {
        column: None,
        prefix: Some("-".into()),
        regions: [("a", "region-of-a"), ("b", "region-of-b"), ("c", "region-of-c")]
            .into_iter()
            .map(|(p, r)| (p.to_string(), r.to_string()))
            .collect(),
        ranges: Vec::new(),
    }
}

fn weft(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weft")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes the topology of nodes a, b, c (regions `region-of-X`) and `region`'s node config
/// with its database and `tables` (TOML) into `dir`; returns the config's path.
fn cli_config(dir: &Path, region: &Region, tables: &str) -> String {
    let mut topology = "version = 1\nmesh = \"s\"\nshape = \"all-to-all\"\n".to_owned();
    for (i, node) in ["a", "b", "c"].iter().enumerate() {
        topology += &format!(
            "[[nodes]]\nid = \"{node}\"\nregion = \"region-of-{node}\"\naddress = \"127.0.0.1:{}\"\n",
            i + 1
        );
    }
    std::fs::write(dir.join("t.toml"), topology).unwrap();
    let database = match &region.database {
        weft::config::Database::Postgres(url) => url.clone(),
        weft::config::Database::Sqlite(path) => format!("sqlite://{}", path.display()),
    };
    let path = dir.join(format!("{}.toml", region.node));
    std::fs::write(
        &path,
        format!(
            "version = 1\nnode = \"{}\"\ntopology = \"t.toml\"\ndatabase = \"{database}\"\n{tables}",
            region.node
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

async fn stock(pg: &Cluster, dir: &Path, node: &str) -> Region {
    let mut config = table("stock", Strategy::Crdt);
    config.columns = [
        ("qty", CrdtType::Counter),
        ("tags", CrdtType::Set),
        ("label", CrdtType::Register),
    ]
    .into_iter()
    .map(|(c, t)| (c.to_string(), t))
    .collect();
    let sqlite = "CREATE TABLE stock (id INTEGER PRIMARY KEY, qty INTEGER NOT NULL DEFAULT 0, tags TEXT, label TEXT, price INTEGER);";
    let postgres = "CREATE TABLE stock (id bigint PRIMARY KEY, qty integer NOT NULL DEFAULT 0, tags text, label text, price bigint);";
    region(pg, dir, node, (sqlite, postgres), config).await
}

/// Region `node` with one table: node c on SQLite, the others on PostgreSQL.
async fn region(pg: &Cluster, dir: &Path, node: &str, (sqlite, postgres): (&str, &str), config: TableConfig) -> Region {
    if node == "c" {
        Region::sqlite(dir, node, sqlite, &[config]).await
    } else {
        Region::pg(pg, node, postgres, &[config]).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crdt_columns_merge_across_postgres_and_sqlite_regions() {
    let pg = cluster();
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        stock(&pg, dir.path(), "a").await,
        stock(&pg, dir.path(), "b").await,
        stock(&pg, dir.path(), "c").await,
    );
    a.exec("INSERT INTO stock (id, qty, tags, label, price) VALUES (1, 10, '[\"red\"]', 'new', 5);")
        .await;
    sync(&[&a, &b, &c]).await;
    for _ in 0..3 {
        a.exec("UPDATE stock SET qty = qty - 1 WHERE id = 1;").await;
        a.drain().await;
        b.exec("UPDATE stock SET qty = qty - 2 WHERE id = 1;").await;
        // b's last change stays undrained: the apply must fold it in before merging.
    }
    a.exec("UPDATE stock SET tags = '[\"red\",\"green\"]' WHERE id = 1;")
        .await;
    b.exec("UPDATE stock SET tags = '[]', label = 'b-label' WHERE id = 1;")
        .await;
    c.exec("UPDATE stock SET qty = qty - 3, price = 7 WHERE id = 1;").await;
    sync(&[&a, &b, &c]).await;
    // Duplicates and another round change nothing.
    sync(&[&a, &b, &c]).await;

    let expected = "10 - 3 - 6 - 3 = -2; green added by a survives b's removal of red";
    assert_eq!(
        a.count("SELECT qty::int8 FROM stock WHERE id = 1").await,
        -2,
        "{expected}"
    );
    let tags: String = sqlx::query_scalar("SELECT tags FROM stock WHERE id = 1")
        .fetch_one(a.pg_pool())
        .await
        .unwrap();
    assert_eq!(tags, "[\"green\"]", "{expected}");
    let snapshot = a.snapshot(&["stock"]).await;
    assert_eq!(b.snapshot(&["stock"]).await, snapshot);
    assert_eq!(c.snapshot(&["stock"]).await, snapshot);
    assert!(snapshot["stock"][0].contains("b-label"), "{snapshot:?}");
    assert!(
        a.count("SELECT count(*) FROM weft.conflicts WHERE strategy = 'crdt'")
            .await
            > 0,
        "concurrent writes are logged"
    );
    // A counter write that is not an integer is replaced by the state's value, not replicated.
    assert!(
        a.try_exec("UPDATE stock SET qty = 'x' WHERE id = 1").await.is_err(),
        "PostgreSQL's own type check"
    );
    c.exec("UPDATE stock SET qty = 'lots' WHERE id = 1;").await;
    sync(&[&a, &b, &c]).await;
    assert_eq!(a.count("SELECT qty::int8 FROM stock WHERE id = 1").await, -2);
    assert_eq!(c.snapshot(&["stock"]).await, a.snapshot(&["stock"]).await);
    assert_eq!(a.count("SELECT count(*) FROM weft.dead_letters").await, 0);
}

async fn contracts(pg: &Cluster, dir: &Path, node: &str) -> Region {
    let sqlite = "CREATE TABLE contracts (id INTEGER PRIMARY KEY, client TEXT, amount INTEGER, terms TEXT);";
    let postgres = "CREATE TABLE contracts (id bigint PRIMARY KEY, client text, amount bigint, terms text);";
    region(pg, dir, node, (sqlite, postgres), table("contracts", Strategy::Queue)).await
}

/// (open entries, siblings of the open entry as origin@hlc) of a region.
async fn queue_state(r: &Region) -> (i64, String) {
    let (queue, siblings) = match r.app {
        common::regions::App::Pg(_) => ("weft.queue", "weft.siblings"),
        common::regions::App::Sqlite(_) => ("_weft_queue", "_weft_siblings"),
    };
    let open = r
        .count(&format!("SELECT count(*) FROM {queue} WHERE closed_at IS NULL"))
        .await;
    let origins = r
        .count(&format!(
            "SELECT count(*) FROM {siblings} s JOIN {queue} q ON q.tbl = s.tbl AND q.key = s.key WHERE q.closed_at IS NULL"
        ))
        .await;
    (open, format!("{origins} siblings"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resolution_queue_and_the_review_tool_work_on_postgres() {
    let pg = cluster();
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        contracts(&pg, dir.path(), "a").await,
        contracts(&pg, dir.path(), "b").await,
        contracts(&pg, dir.path(), "c").await,
    );
    a.exec("INSERT INTO contracts VALUES (7, 'acme', 100, 'net 30'), (8, 'other', 1, 'x');")
        .await;
    sync(&[&a, &b, &c]).await;
    a.exec("UPDATE contracts SET amount = 150 WHERE id = 7;").await;
    b.exec("UPDATE contracts SET terms = 'net 60' WHERE id = 7;").await;
    c.exec("UPDATE contracts SET amount = 90, terms = 'prepaid' WHERE id = 7;")
        .await;
    for r in [&a, &b, &c] {
        r.drain().await;
    }
    // Different arrival orders at each node.
    b.pull(&c).await;
    b.pull(&a).await;
    c.pull(&a).await;
    c.pull(&b).await;
    a.pull(&b).await;
    a.pull(&c).await;
    for r in [&a, &b, &c] {
        assert_eq!(queue_state(r).await, (1, "3 siblings".into()), "at {}", r.node);
    }
    let visible = a.snapshot(&["contracts"]).await;
    assert_eq!(b.snapshot(&["contracts"]).await, visible);
    assert_eq!(c.snapshot(&["contracts"]).await["contracts"], visible["contracts"]);

    // The review tool on a's PostgreSQL database.
    let config = cli_config(
        dir.path(),
        &a,
        "[[tables]]\nname = \"contracts\"\nstrategy = \"queue\"\n",
    );
    let (ok, out, err) = weft(&["conflicts", "--config", &config, "list", "--json"]);
    assert!(ok, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{out}");
    assert_eq!(list[0]["siblings"], 3, "{out}");
    assert_eq!(
        list[0]["regions"],
        serde_json::json!(["region-of-a", "region-of-b", "region-of-c"]),
        "{out}"
    );
    let id = list[0]["id"].to_string();
    let (ok, out, err) = weft(&["conflicts", "--config", &config, "show", &id]);
    assert!(ok, "{err}");
    assert!(
        out.contains("* amount") && out.contains("* terms") && out.contains("  client"),
        "differing columns marked:\n{out}"
    );
    let (_, out, _) = weft(&["conflicts", "--config", &config, "show", &id, "--json"]);
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    let take = shown["siblings"]
        .as_array()
        .unwrap()
        .iter()
        .position(|s| s["origin"] == "c")
        .unwrap()
        + 1;
    let (ok, out, err) = weft(&[
        "conflicts",
        "--config",
        &config,
        "resolve",
        &id,
        "--take",
        &take.to_string(),
        "--by",
        "ops",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("by ops"), "{out}");
    sync(&[&a, &b, &c]).await;
    sync(&[&a, &b, &c]).await;
    for r in [&a, &b, &c] {
        assert_eq!(queue_state(r).await, (0, "0 siblings".into()), "closed at {}", r.node);
    }
    let resolved = a.snapshot(&["contracts"]).await;
    assert!(
        resolved["contracts"][0].starts_with("7 | \"acme\" | 90 |")
            && resolved["contracts"][0].ends_with("\"prepaid\""),
        "{resolved:?}"
    );
    assert_eq!(b.snapshot(&["contracts"]).await, resolved);
    assert_eq!(c.snapshot(&["contracts"]).await["contracts"], resolved["contracts"]);
    let (ok, out, err) = weft(&["conflicts", "--config", &config, "history", "--json"]);
    assert!(ok, "{err}");
    let history: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(history["resolved"][0]["decided_by"], "ops", "{out}");
    assert!(!history["automatic"].as_array().unwrap().is_empty(), "{out}");

    // Bad input says what is wrong.
    let (ok, _, err) = weft(&["conflicts", "--config", &config, "show", "999"]);
    assert!(!ok && err.contains("no open conflict 999"), "{err}");
}

const ACCOUNTS_PG: &str = "CREATE TABLE accounts (id bigint PRIMARY KEY, owner text NOT NULL, balance bigint);";
const ACCOUNTS_SQLITE: &str = "CREATE TABLE accounts (id INTEGER PRIMARY KEY, owner TEXT NOT NULL, balance INTEGER);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_column_table_refuses_non_owners_and_transfers_on_postgres() {
    let pg = cluster();
    let dir = tempfile::tempdir().unwrap();
    let mut config = table("accounts", Strategy::Ownership);
    config.owner_column = Some("owner".into());
    let configs = [config];
    let a = Region::pg(&pg, "a", ACCOUNTS_PG, &configs).await;
    let b = Region::pg(&pg, "b", ACCOUNTS_PG, &configs).await;
    let c = Region::sqlite(dir.path(), "c", ACCOUNTS_SQLITE, &configs).await;

    a.exec("INSERT INTO accounts VALUES (1, 'region-of-a', 100);").await;
    let refused = b
        .try_exec("INSERT INTO accounts VALUES (2, 'region-of-a', 5)")
        .await
        .unwrap_err();
    assert!(
        refused.contains("owned by region-of-a, not by region-of-b"),
        "{refused}"
    );
    sync(&[&a, &b, &c]).await;
    let refused = b
        .try_exec("UPDATE accounts SET balance = 0 WHERE id = 1")
        .await
        .unwrap_err();
    assert!(refused.contains("owned by region-of-a"), "{refused}");
    assert!(b.try_exec("DELETE FROM accounts WHERE id = 1").await.is_err());
    let refused = a
        .try_exec("UPDATE accounts SET owner = 'region-of-b' WHERE id = 1")
        .await
        .unwrap_err();
    assert!(refused.contains("changes only by weft ownership transfer"), "{refused}");
    a.exec("UPDATE accounts SET balance = 90 WHERE id = 1;").await;

    let config = cli_config(
        dir.path(),
        &a,
        "[[tables]]\nname = \"accounts\"\nstrategy = \"ownership\"\nowner_column = \"owner\"\n",
    );
    let (ok, out, err) = weft(&[
        "ownership",
        "--config",
        &config,
        "transfer",
        "--table",
        "accounts",
        "--key",
        "1",
        "--to",
        "region-of-b",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("moved 1 accounts row(s)"), "{out}");
    let refused = a
        .try_exec("UPDATE accounts SET balance = 1 WHERE id = 1")
        .await
        .unwrap_err();
    assert!(
        refused.contains("owned by region-of-b"),
        "the old owner is refused from the transfer's commit on: {refused}"
    );
    sync(&[&a, &b, &c]).await;
    b.exec("UPDATE accounts SET balance = 80 WHERE id = 1;").await;
    sync(&[&a, &b, &c]).await;
    let snapshot = a.snapshot(&["accounts"]).await;
    assert_eq!(snapshot["accounts"], vec!["1 | \"region-of-b\" | 80"]);
    assert_eq!(b.snapshot(&["accounts"]).await, snapshot);
    assert_eq!(c.snapshot(&["accounts"]).await, snapshot);
    for r in [&a, &b] {
        assert_eq!(
            r.count("SELECT epoch FROM weft.owners WHERE tbl = 'accounts'").await,
            1,
            "epoch 1 at {}",
            r.node
        );
        assert_eq!(r.count("SELECT count(*) FROM weft.dead_letters").await, 0);
    }
    assert_eq!(c.count("SELECT epoch FROM _weft_owners").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_from_a_node_without_ownership_are_dead_lettered_on_postgres() {
    let pg = cluster();
    let dir = tempfile::tempdir().unwrap();
    let mut config = table("accounts", Strategy::Ownership);
    config.owner_column = Some("owner".into());
    let a = Region::pg(&pg, "a", ACCOUNTS_PG, std::slice::from_ref(&config)).await;
    // A misconfigured node that treats the table as LWW: its writes are not owner writes.
    let rogue = Region::sqlite(dir.path(), "c", ACCOUNTS_SQLITE, &[table("accounts", Strategy::Lww)]).await;
    a.exec("INSERT INTO accounts VALUES (1, 'region-of-a', 100);").await;
    sync(&[&a, &rogue]).await;
    rogue.exec("UPDATE accounts SET balance = 0 WHERE id = 1;").await;
    sync(&[&a, &rogue]).await;
    assert_eq!(a.count("SELECT balance FROM accounts WHERE id = 1").await, 100);
    let reason: String = sqlx::query_scalar("SELECT reason FROM weft.dead_letters")
        .fetch_one(a.pg_pool())
        .await
        .unwrap();
    assert!(reason.starts_with("ownership:"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_rule_decides_who_writes_and_transfers_move_rows_on_postgres() {
    let pg = cluster();
    let dir = tempfile::tempdir().unwrap();
    let mut config = table("orders", Strategy::Ownership);
    config.owner_rule = Some(prefix_rule());
    let configs = [config];
    let schema_pg = "CREATE TABLE orders (id text PRIMARY KEY, item text);";
    let a = Region::pg(&pg, "a", schema_pg, &configs).await;
    let b = Region::pg(&pg, "b", schema_pg, &configs).await;
    let c = Region::sqlite(
        dir.path(),
        "c",
        "CREATE TABLE orders (id TEXT PRIMARY KEY, item TEXT);",
        &configs,
    )
    .await;

    a.exec("INSERT INTO orders VALUES ('a-1', 'pen'), ('a-2', 'ink');")
        .await;
    for (region, sql, owner) in [
        (&a, "INSERT INTO orders VALUES ('b-1', 'x')", "region-of-b"),
        (&a, "INSERT INTO orders VALUES ('z-1', 'x')", "no region"),
        (&a, "UPDATE orders SET id = 'b-9' WHERE id = 'a-2'", "region-of-b"),
    ] {
        let refused = region.try_exec(sql).await.unwrap_err();
        assert!(refused.contains(&format!("owned by {owner}")), "{sql}: {refused}");
    }
    b.exec("INSERT INTO orders VALUES ('b-1', 'cup');").await;
    c.exec("INSERT INTO orders VALUES ('c-1', 'mug');").await;
    sync(&[&a, &b, &c]).await;
    assert!(
        b.try_exec("UPDATE orders SET item = 'x' WHERE id = 'a-1'")
            .await
            .is_err()
    );

    let config = cli_config(
        dir.path(),
        &a,
        "[[tables]]\nname = \"orders\"\nstrategy = \"ownership\"\nowner_rule = { prefix = \"-\", regions = { a = \"region-of-a\", b = \"region-of-b\", c = \"region-of-c\" } }\n",
    );
    let (ok, out, err) = weft(&[
        "ownership",
        "--config",
        &config,
        "transfer",
        "--table",
        "orders",
        "--key",
        "a-1",
        "--to",
        "region-of-b",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("moved 1"), "{out}");
    let (ok, _, err) = weft(&[
        "ownership",
        "--config",
        &config,
        "transfer",
        "--table",
        "orders",
        "--key",
        "b-1",
        "--to",
        "region-of-c",
    ]);
    assert!(!ok && err.contains("owned by region-of-b"), "{err}");
    let refused = a
        .try_exec("UPDATE orders SET item = 'old owner' WHERE id = 'a-1'")
        .await
        .unwrap_err();
    assert!(
        refused.contains("owned by region-of-b"),
        "refused before any drain: {refused}"
    );
    a.exec("UPDATE orders SET item = 'still mine' WHERE id = 'a-2';").await;
    sync(&[&a, &b, &c]).await;
    b.exec("UPDATE orders SET item = 'moved' WHERE id = 'a-1';").await;
    sync(&[&a, &b, &c]).await;

    let snapshot = a.snapshot(&["orders"]).await;
    assert_eq!(
        snapshot["orders"],
        vec![
            "\"a-1\" | \"moved\"",
            "\"a-2\" | \"still mine\"",
            "\"b-1\" | \"cup\"",
            "\"c-1\" | \"mug\""
        ]
    );
    assert_eq!(b.snapshot(&["orders"]).await, snapshot);
    assert_eq!(c.snapshot(&["orders"]).await, snapshot);
    for r in [&a, &b] {
        assert_eq!(
            r.count("SELECT count(*) FROM weft.dead_letters").await,
            0,
            "at {}",
            r.node
        );
        assert_eq!(
            r.count("SELECT epoch FROM weft.owners WHERE ktext = ARRAY['a-1']")
                .await,
            1,
            "at {}",
            r.node
        );
    }
    assert_eq!(c.count("SELECT count(*) FROM _weft_dead_letters").await, 0);
}

#[tokio::test]
async fn strategy_settings_that_do_not_fit_a_postgres_table_are_refused_at_start() {
    let pg = cluster();
    let url = pg.create_database("bad").await.unwrap();
    let app = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::raw_sql("CREATE TABLE t (id bigint PRIMARY KEY, n text, owner integer, code text);")
        .execute(&app)
        .await
        .unwrap();
    let database = weft::config::Database::Postgres(url);
    let identity = weft::event::Identity {
        node: "x".into(),
        region: "r".into(),
    };
    let mut counter = table("t", Strategy::Crdt);
    counter.columns = [("n".to_string(), CrdtType::Counter)].into_iter().collect();
    let mut owner = table("t", Strategy::Ownership);
    owner.owner_column = Some("owner".into());
    let mut ranges = table("t", Strategy::Ownership);
    ranges.owner_rule = Some(OwnerRule {
        column: None,
        prefix: Some("-".into()),
        regions: Default::default(),
        ranges: Vec::new(),
    });
    for (config, message) in [
        (counter, "a Counter column needs an integer type"),
        (owner, "must be an existing non-key text column"),
        (ranges, "a prefix rule needs a text key column"),
    ] {
        let opened = weft::store::Store::open(
            &database,
            identity.clone(),
            &[config],
            std::time::Duration::from_secs(1),
        )
        .await;
        let error = opened.err().expect("refused").to_string();
        assert!(error.contains(message), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_never_overwrites_a_crdt_column_the_application_changed_meanwhile() {
    let pg = cluster();
    let dir = tempfile::tempdir().unwrap();
    let a = stock(&pg, dir.path(), "a").await;
    a.exec("INSERT INTO stock (id, tags) VALUES (1, '[\"x\"]');").await;
    a.drain().await;
    // Captured out of order: the drain will write the set back sorted.
    a.exec("UPDATE stock SET tags = '[\"b\",\"a\"]' WHERE id = 1;").await;
    // Meanwhile the application changes the row again and holds it until the drain waits.
    let mut app = a.pg_pool().begin().await.unwrap();
    sqlx::query("UPDATE stock SET tags = '[\"z\"]' WHERE id = 1")
        .execute(&mut *app)
        .await
        .unwrap();
    let (drained, ()) = tokio::join!(a.drain(), async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        app.commit().await.unwrap();
    });
    assert_eq!(drained, 1);
    assert_eq!(
        a.drain().await,
        1,
        "the application's later write is drained on its own"
    );
    let tags: String = sqlx::query_scalar("SELECT tags FROM stock WHERE id = 1")
        .fetch_one(a.pg_pool())
        .await
        .unwrap();
    assert_eq!(
        tags, "[\"z\"]",
        "the later write stands; the row and its CRDT state agree"
    );
    let last = a.events(0).await.pop().unwrap();
    let weft::event::Op::Upsert(row) = &last.op else {
        panic!("an upsert")
    };
    assert_eq!(row.get("tags"), Some(&weft::event::Value::Text("[\"z\"]".into())));
}

/// A forced failover on PostgreSQL regions (and a SQLite one), for an owner-column table and
/// an owner-rule table: b takes over lost a's rows; a's unreplicated writes, when it returns,
/// are fenced dead letters in every region, and every region ends with b's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_failover_fences_the_lost_regions_writes_on_postgres() {
    let pg = cluster();
    let dir = tempfile::tempdir().unwrap();
    let mut accounts = table("accounts", Strategy::Ownership);
    accounts.owner_column = Some("owner".into());
    let mut orders = table("orders", Strategy::Ownership);
    orders.owner_rule = Some(prefix_rule());
    let configs = [accounts, orders];
    let pg_schema = format!("{ACCOUNTS_PG} CREATE TABLE orders (id text PRIMARY KEY, item text);");
    let sqlite_schema = format!("{ACCOUNTS_SQLITE} CREATE TABLE orders (id TEXT PRIMARY KEY, item TEXT);");
    let a = Region::pg(&pg, "a", &pg_schema, &configs).await;
    let b = Region::pg(&pg, "b", &pg_schema, &configs).await;
    let c = Region::sqlite(dir.path(), "c", &sqlite_schema, &configs).await;
    a.exec(
        "INSERT INTO accounts VALUES (1, 'region-of-a', 100), (2, 'region-of-a', 200); \
         INSERT INTO orders VALUES ('a-1', 'tea'), ('a-2', 'milk');",
    )
    .await;
    sync(&[&a, &b, &c]).await;

    // a is cut off: what it writes now reaches nobody.
    a.exec("UPDATE accounts SET balance = 7 WHERE id = 1; UPDATE orders SET item = 'lost' WHERE id = 'a-1';")
        .await;
    let tables = "[[tables]]\nname = \"accounts\"\nstrategy = \"ownership\"\nowner_column = \"owner\"\n\
                  [[tables]]\nname = \"orders\"\nstrategy = \"ownership\"\n\
                  owner_rule = { prefix = \"-\", regions = { a = \"region-of-a\", b = \"region-of-b\", c = \"region-of-c\" } }\n";
    let (ok, _, err) = weft(&[
        "ownership",
        "--config",
        &cli_config(dir.path(), &a, tables),
        "failover",
        "--from",
        "region-of-a",
        "--to",
        "region-of-b",
    ]);
    assert!(
        !ok && err.contains("run the failover on a node of a surviving region"),
        "{err}"
    );
    let (ok, out, err) = weft(&[
        "ownership",
        "--config",
        &cli_config(dir.path(), &b, tables),
        "failover",
        "--from",
        "region-of-a",
        "--to",
        "region-of-b",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("fenced 4 row(s) of region-of-a over to region-of-b"),
        "{out}"
    );
    // b's application writes them from the failover's commit on.
    b.exec("UPDATE accounts SET balance = 50 WHERE id = 2; UPDATE orders SET item = 'coffee' WHERE id = 'a-2';")
        .await;
    sync(&[&b, &c]).await;
    sync(&[&a, &b, &c]).await;
    sync(&[&a, &b, &c]).await;

    let snapshot = b.snapshot(&["accounts", "orders"]).await;
    assert_eq!(
        snapshot["accounts"],
        vec!["1 | \"region-of-b\" | 100", "2 | \"region-of-b\" | 50"]
    );
    assert_eq!(snapshot["orders"], vec!["\"a-1\" | \"tea\"", "\"a-2\" | \"coffee\""]);
    assert_eq!(a.snapshot(&["accounts", "orders"]).await, snapshot);
    assert_eq!(c.snapshot(&["accounts", "orders"]).await, snapshot);
    for (r, letters) in [
        (&a, "weft.dead_letters"),
        (&b, "weft.dead_letters"),
        (&c, "_weft_dead_letters"),
    ] {
        let fenced = format!("SELECT count(*) FROM {letters} WHERE cause = 'fenced' AND origin = 'a'");
        assert_eq!(r.count(&fenced).await, 2, "{}: a's two lost writes", r.node);
        let other = format!("SELECT count(*) FROM {letters} WHERE cause <> 'fenced'");
        assert_eq!(r.count(&other).await, 0, "{}", r.node);
    }
    let refused = a
        .try_exec("UPDATE accounts SET balance = 1 WHERE id = 1")
        .await
        .unwrap_err();
    assert!(refused.contains("owned by region-of-b"), "{refused}");
    let refused = a
        .try_exec("UPDATE orders SET item = 'x' WHERE id = 'a-2'")
        .await
        .unwrap_err();
    assert!(refused.contains("owned by region-of-b"), "{refused}");
}
