//! Entity ownership on real SQLite files: writes refused at the source in the application's
//! own transaction, foreign or unclaimed writes dead-lettered at receivers, and an
//! epoch-numbered transfer (with the CLI) that replicates like data, even when a region gets
//! the new owner's writes before the transfer itself.
mod common;

use std::path::Path;
use std::process::Command;

use common::{Replica, replica_configured, replica_with, sync};
use weft::config::{Strategy, TableConfig};

const SCHEMA: &str = "CREATE TABLE accounts (id INTEGER PRIMARY KEY, home TEXT NOT NULL, balance INTEGER NOT NULL);";

fn table() -> TableConfig {
    TableConfig {
        name: "accounts".into(),
        strategy: Strategy::Ownership,
        columns: Default::default(),
        owner_column: Some("home".into()),
        owner_rule: None,
        unknown_columns: Default::default(),
        renamed_from: Default::default(),
        mesh_regions: Vec::new(),
    }
}

async fn node(dir: &Path, name: &str) -> Replica {
    replica_configured(dir, name, SCHEMA, &[table()]).await
}

/// Writes the topology of nodes a, b, c and node `n`'s config (for the CLI) into `dir`.
fn cli_config(dir: &Path, n: &str, tables: &str) -> String {
    let mut topology = "version = 1\nmesh = \"o\"\nshape = \"all-to-all\"\n".to_owned();
    for (i, node) in ["a", "b", "c"].iter().enumerate() {
        topology += &format!(
            "[[nodes]]\nid = \"{node}\"\nregion = \"region-of-{node}\"\naddress = \"127.0.0.1:{}\"\n",
            i + 1
        );
    }
    std::fs::write(dir.join("t.toml"), topology).unwrap();
    let path = dir.join(format!("{n}.toml"));
    std::fs::write(
        &path,
        format!("version = 1\nnode = \"{n}\"\ntopology = \"t.toml\"\ndatabase = \"sqlite://{n}.db\"\n{tables}"),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

async fn try_exec(r: &Replica, sql: &str) -> Result<(), String> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&r.app)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_non_owner_write_is_refused_at_the_source_and_never_appears() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (node(dir.path(), "a").await, node(dir.path(), "b").await);
    a.exec("INSERT INTO accounts VALUES (1, 'region-of-a', 100);").await;
    sync(&[&a, &b]).await;
    let err = try_exec(&b, "UPDATE accounts SET balance = 0 WHERE id = 1;")
        .await
        .unwrap_err();
    assert!(err.contains("owned by region-of-a, not by region-of-b"), "{err}");
    let err = try_exec(&b, "INSERT INTO accounts VALUES (2, 'region-of-a', 5);")
        .await
        .unwrap_err();
    assert!(err.contains("owned by region-of-a"), "{err}");
    let err = try_exec(&a, "UPDATE accounts SET home = 'region-of-b' WHERE id = 1;")
        .await
        .unwrap_err();
    assert!(err.contains("changes only by weft ownership transfer"), "{err}");
    assert_eq!(b.count("SELECT count(*) FROM _weft_outbox").await, 0);
    // b may create rows it owns.
    b.exec("INSERT INTO accounts VALUES (3, 'region-of-b', 7);").await;
    sync(&[&a, &b]).await;
    assert_eq!(
        a.rows("SELECT * FROM accounts ORDER BY id").await,
        vec!["1|region-of-a|100", "3|region-of-b|7"]
    );
    assert_eq!(a.snapshot_of(&["accounts"]).await, b.snapshot_of(&["accounts"]).await);
}

#[tokio::test]
async fn writes_from_a_node_without_ownership_are_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let a = node(dir.path(), "a").await;
    // A misconfigured region: the same table, but plain LWW there.
    let rogue = replica_with(dir.path(), "rogue", SCHEMA, &["accounts"]).await;
    rogue.exec("INSERT INTO accounts VALUES (9, 'region-of-a', 1);").await;
    rogue.drain().await;
    let report = a.pull(&rogue).await;
    assert_eq!((report.applied, report.dead_lettered), (0, 1));
    let reason = a.rows("SELECT reason FROM _weft_dead_letters").await;
    assert!(
        reason[0].contains("ownership: rogue's region sent no ownership") || reason[0].contains("sent no ownership"),
        "{reason:?}"
    );
    assert_eq!(a.count("SELECT count(*) FROM accounts").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_replicates_and_the_old_owner_can_no_longer_write() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        node(dir.path(), "a").await,
        node(dir.path(), "b").await,
        node(dir.path(), "c").await,
    );
    a.exec("INSERT INTO accounts VALUES (1, 'region-of-a', 100), (2, 'region-of-a', 200);")
        .await;
    sync(&[&a, &b, &c]).await;

    let config = |n: &str| {
        cli_config(
            dir.path(),
            n,
            "[[tables]]\nname = \"accounts\"\nstrategy = \"ownership\"\nowner_column = \"home\"\n",
        )
    };
    let transfer = |config: &str, key: &str, to: &str| {
        Command::new(env!("CARGO_BIN_EXE_weft"))
            .args([
                "ownership",
                "--config",
                config,
                "transfer",
                "--table",
                "accounts",
                "--key",
                key,
                "--to",
                to,
                "--by",
                "ops",
            ])
            .output()
            .unwrap()
    };
    let out = transfer(&config("b"), "1", "region-of-c");
    assert!(!out.status.success(), "only the owner can transfer");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("owned by region-of-a"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A region no node serves (a typo) would leave the row writable nowhere.
    let out = transfer(&config("a"), "1", "region-of-bb");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a region outside the topology is refused");
    assert!(
        stderr.contains("`region-of-bb` is not a region of mesh") && stderr.contains("region-of-b, region-of-c"),
        "{stderr}"
    );
    let out = transfer(&config("a"), "1", "region-of-b");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("moved 1 accounts row(s)"));

    a.drain().await;
    let events = a.events(0).await;
    let moved = events.last().unwrap().ownership.clone().unwrap();
    assert_eq!(
        (moved.owner.as_str(), moved.epoch, moved.transfer),
        ("region-of-b", 1, true)
    );

    // b learns of the transfer and writes; c gets b's write before a's transfer.
    b.pull(&a).await;
    b.exec("UPDATE accounts SET balance = 150 WHERE id = 1;").await;
    b.drain().await;
    let report = c.pull(&b).await;
    assert_eq!(
        (report.applied, report.dead_lettered),
        (1, 0),
        "b's write descends from the transfer"
    );
    c.pull(&a).await;

    // The old owner is refused at the source.
    let err = try_exec(&a, "UPDATE accounts SET balance = 0 WHERE id = 1;")
        .await
        .unwrap_err();
    assert!(err.contains("owned by region-of-b"), "{err}");
    a.exec("UPDATE accounts SET balance = 250 WHERE id = 2;").await;
    sync(&[&a, &b, &c]).await;
    for r in [&a, &b, &c] {
        assert_eq!(
            r.rows("SELECT * FROM accounts ORDER BY id").await,
            vec!["1|region-of-b|150", "2|region-of-a|250"],
            "{}",
            r.node
        );
        assert_eq!(r.count("SELECT count(*) FROM _weft_dead_letters").await, 0);
    }
    assert_eq!(
        a.rows("SELECT rows, from_region, to_region, decided_by FROM _weft_transfers")
            .await,
        vec!["1|region-of-a|region-of-b|ops"]
    );
}

mod property {
    use super::{Replica, node, sync, try_exec};
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Step {
        Write {
            node: usize,
            id: i64,
            balance: i64,
            drain: bool,
        },
        Transfer {
            node: usize,
            id: i64,
            to: usize,
        },
        /// A delete, or an insert claiming the row for the node's own region (refused at
        /// the source where the row exists): deleted keys taken anew, and first claims.
        Delete {
            node: usize,
            id: i64,
        },
        Insert {
            node: usize,
            id: i64,
        },
        Deliver {
            to: usize,
            from: usize,
            back: u64,
            len: usize,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0..3usize, 0..3i64, 0..1000i64, proptest::bool::weighted(0.7))
                .prop_map(|(node, id, balance, drain)| Step::Write { node, id, balance, drain }),
            1 => (0..3usize, 0..3i64, 0..3usize).prop_map(|(node, id, to)| Step::Transfer { node, id, to }),
            1 => (0..3usize, 0..4i64).prop_map(|(node, id)| Step::Delete { node, id }),
            1 => (0..3usize, 0..4i64).prop_map(|(node, id)| Step::Insert { node, id }),
            4 => (0..4usize, 0..3usize, 0..3u64, 1..5usize).prop_map(|(to, from, back, len)| Step::Deliver { to, from, back, len }),
        ]
    }

    const NODES: [&str; 3] = ["a", "b", "c"];

    async fn state(r: &Replica) -> (Vec<String>, Vec<String>) {
        (
            r.rows("SELECT * FROM accounts ORDER BY id").await,
            r.rows("SELECT owner, epoch FROM _weft_owners ORDER BY key").await,
        )
    }

    async fn run(steps: Vec<Step>) -> Result<(), TestCaseError> {
        let dir = tempfile::tempdir().unwrap();
        let mut replicas = Vec::new();
        for name in ["a", "b", "c", "observer"] {
            replicas.push(node(dir.path(), name).await);
        }
        for (i, name) in NODES.iter().enumerate() {
            replicas[i]
                .exec(&format!("INSERT INTO accounts VALUES ({i}, 'region-of-{name}', 0);"))
                .await;
        }
        let all: Vec<&Replica> = replicas.iter().collect();
        sync(&all).await;
        for step in steps {
            match step {
                // Non-owners are refused at the source: that is fine, it never leaves.
                Step::Write {
                    node,
                    id,
                    balance,
                    drain,
                } => {
                    let _ = try_exec(
                        &replicas[node],
                        &format!("UPDATE accounts SET balance = {balance} WHERE id = {id};"),
                    )
                    .await;
                    if drain {
                        replicas[node].drain().await;
                    }
                }
                // As `weft ownership transfer` does it; a non-owner's attempt rolls back whole.
                Step::Transfer { node, id, to } => {
                    let mut tx = replicas[node].app.begin().await.unwrap();
                    sqlx::query("INSERT INTO _weft_transfer VALUES (1)")
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    let moved = sqlx::query("UPDATE accounts SET home = ? WHERE id = ?")
                        .bind(format!("region-of-{}", NODES[to]))
                        .bind(id)
                        .execute(&mut *tx)
                        .await;
                    if moved.is_ok() {
                        sqlx::query("DELETE FROM _weft_transfer")
                            .execute(&mut *tx)
                            .await
                            .unwrap();
                        tx.commit().await.unwrap();
                    }
                }
                Step::Delete { node, id } => {
                    let _ = try_exec(&replicas[node], &format!("DELETE FROM accounts WHERE id = {id};")).await;
                }
                Step::Insert { node, id } => {
                    let sql = format!("INSERT INTO accounts VALUES ({id}, 'region-of-{}', 1);", NODES[node]);
                    let _ = try_exec(&replicas[node], &sql).await;
                }
                Step::Deliver { to, from, back, len } => {
                    replicas[to].deliver(&replicas[from], back, 0, len).await;
                }
            }
        }
        sync(&all).await;
        let first = state(&replicas[0]).await;
        for r in &replicas {
            prop_assert_eq!(&state(r).await, &first, "{} differs from a", r.node);
            prop_assert_eq!(
                r.count("SELECT count(*) FROM _weft_dead_letters").await,
                0,
                "a legitimate write was refused at {}",
                r.node
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
        #[test]
        fn ownership_tables_converge_whatever_the_delivery_order(steps in proptest::collection::vec(step(), 5..50)) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(run(steps))?;
        }
    }
}

/// Ownership by a rule on the key: no owner column; transfers override the rule per row.
mod rule {
    use super::{Command, Replica, Strategy, TableConfig, cli_config, replica_configured, sync, try_exec};
    use std::path::Path;
    use weft::config::{OwnerRange, OwnerRule};

    const SCHEMA: &str = "CREATE TABLE wallets (id TEXT PRIMARY KEY, balance INTEGER NOT NULL);
        CREATE TABLE ledger (shard INTEGER, seq INTEGER, amount INTEGER, PRIMARY KEY (shard, seq));";

    fn tables(regions: &[(&str, &str)]) -> Vec<TableConfig> {
        let wallets = OwnerRule {
            column: None,
            prefix: Some("-".into()),
            regions: regions.iter().map(|(p, r)| (p.to_string(), r.to_string())).collect(),
            ranges: vec![],
        };
        let ledger = OwnerRule {
            column: Some("shard".into()),
            prefix: None,
            regions: Default::default(),
            ranges: vec![
                OwnerRange {
                    from: 0,
                    to: 9,
                    region: "region-of-a".into(),
                },
                OwnerRange {
                    from: 10,
                    to: 19,
                    region: "region-of-b".into(),
                },
            ],
        };
        [("wallets", wallets), ("ledger", ledger)]
            .into_iter()
            .map(|(name, rule)| TableConfig {
                name: name.into(),
                strategy: Strategy::Ownership,
                columns: Default::default(),
                owner_column: None,
                owner_rule: Some(rule),
                unknown_columns: Default::default(),
                renamed_from: Default::default(),
                mesh_regions: Vec::new(),
            })
            .collect()
    }

    const REGIONS: [(&str, &str); 3] = [("a", "region-of-a"), ("b", "region-of-b"), ("c", "region-of-c")];

    async fn node(dir: &Path, name: &str) -> Replica {
        replica_configured(dir, name, SCHEMA, &tables(&REGIONS)).await
    }

    async fn refused(r: &Replica, sql: &str, expected: &str) {
        let err = try_exec(r, sql).await.expect_err(sql);
        assert!(err.contains(expected), "{sql}: {err}");
    }

    #[tokio::test]
    async fn the_rule_decides_who_writes_and_refusals_happen_at_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            node(dir.path(), "a").await,
            node(dir.path(), "b").await,
            node(dir.path(), "c").await,
        );
        a.exec("INSERT INTO wallets VALUES ('a-1', 10), ('a-2', 20); INSERT INTO ledger VALUES (3, 1, 5);")
            .await;
        b.exec("INSERT INTO wallets VALUES ('b-1', 30); INSERT INTO ledger VALUES (12, 1, 7);")
            .await;
        refused(
            &a,
            "INSERT INTO wallets VALUES ('b-7', 1);",
            "owned by region-of-b, not by region-of-a",
        )
        .await;
        refused(&a, "INSERT INTO wallets VALUES ('x-7', 1);", "owned by no region").await;
        refused(&a, "INSERT INTO wallets VALUES ('a7', 1);", "owned by no region").await;
        refused(&a, "INSERT INTO wallets VALUES ('-7', 1);", "owned by no region").await;
        refused(&a, "INSERT INTO ledger VALUES (10, 1, 1);", "owned by region-of-b").await;
        refused(&a, "INSERT INTO ledger VALUES (20, 1, 1);", "owned by no region").await;
        refused(&a, "INSERT INTO ledger VALUES (3.5, 1, 1);", "owned by no region").await;
        // Moving a row to a key another region owns is a write in that region.
        refused(
            &a,
            "UPDATE wallets SET id = 'b-2' WHERE id = 'a-2';",
            "owned by region-of-b",
        )
        .await;
        a.exec("UPDATE wallets SET id = 'a-3' WHERE id = 'a-2';").await;
        sync(&[&a, &b, &c]).await;
        refused(
            &b,
            "UPDATE wallets SET balance = 0 WHERE id = 'a-1';",
            "owned by region-of-a, not by region-of-b",
        )
        .await;
        refused(
            &c,
            "DELETE FROM wallets WHERE id = 'b-1';",
            "owned by region-of-b, not by region-of-c",
        )
        .await;
        refused(
            &c,
            "UPDATE ledger SET amount = 0;",
            "owned by region-of-a, not by region-of-c",
        )
        .await;
        for r in [&b, &c] {
            assert_eq!(r.count("SELECT count(*) FROM _weft_outbox").await, 0, "{}", r.node);
        }
        b.exec("UPDATE wallets SET balance = 31 WHERE id = 'b-1'; DELETE FROM ledger WHERE shard = 12;")
            .await;
        sync(&[&a, &b, &c]).await;
        for r in [&a, &b, &c] {
            assert_eq!(
                r.rows("SELECT * FROM wallets ORDER BY id").await,
                vec!["a-1|10", "a-3|20", "b-1|31"],
                "{}",
                r.node
            );
            assert_eq!(r.rows("SELECT * FROM ledger").await, vec!["3|1|5"], "{}", r.node);
            assert_eq!(r.count("SELECT count(*) FROM _weft_dead_letters").await, 0);
        }
        assert_eq!(
            a.snapshot_of(&["wallets", "ledger"]).await,
            c.snapshot_of(&["wallets", "ledger"]).await
        );
    }

    #[tokio::test]
    async fn a_write_the_receivers_rule_does_not_give_its_origin_is_dead_lettered() {
        let dir = tempfile::tempdir().unwrap();
        let a = node(dir.path(), "a").await;
        // A misconfigured region whose rule says prefix `a` is its own.
        let rogue = replica_configured(dir.path(), "rogue", SCHEMA, &tables(&[("a", "region-of-rogue")])).await;
        rogue.exec("INSERT INTO wallets VALUES ('a-9', 1);").await;
        rogue.drain().await;
        let report = a.pull(&rogue).await;
        assert_eq!((report.applied, report.dead_lettered), (0, 1));
        let reason = a.rows("SELECT reason FROM _weft_dead_letters").await;
        assert!(reason[0].contains("the owner rule gives region-of-a"), "{reason:?}");
        assert_eq!(a.count("SELECT count(*) FROM wallets").await, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transfer_overrides_the_rule_and_replicates() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            node(dir.path(), "a").await,
            node(dir.path(), "b").await,
            node(dir.path(), "c").await,
        );
        a.exec("INSERT INTO wallets VALUES ('a-1', 10), ('a-2', 20), ('a-3', 30); INSERT INTO ledger VALUES (1, 1, 1), (2, 1, 2);")
            .await;
        sync(&[&a, &b, &c]).await;
        let config = |n: &str| {
            cli_config(
                dir.path(),
                n,
                "[[tables]]\nname = \"wallets\"\nstrategy = \"ownership\"\n\
                 owner_rule = { prefix = \"-\", regions = { a = \"region-of-a\", b = \"region-of-b\", c = \"region-of-c\" } }\n\
                 [[tables]]\nname = \"ledger\"\nstrategy = \"ownership\"\n\
                 owner_rule = { column = \"shard\", ranges = [{ from = 0, to = 9, region = \"region-of-a\" }, { from = 10, to = 19, region = \"region-of-b\" }] }\n",
            )
        };
        let transfer = |config: &str, table: &str, rows: &[&str], to: &str| {
            let mut args = vec![
                "ownership",
                "--config",
                config,
                "transfer",
                "--table",
                table,
                "--to",
                to,
            ];
            args.extend_from_slice(rows);
            Command::new(env!("CARGO_BIN_EXE_weft")).args(&args).output().unwrap()
        };
        let out = transfer(&config("b"), "wallets", &["--key", "a-1"], "region-of-c");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("owned by region-of-a, not by region-of-b"),
            "{stderr}"
        );
        let out = transfer(
            &config("a"),
            "wallets",
            &["--key", "a-1", "--key", "a-2"],
            "region-of-b",
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("moved 2 wallets row(s)"));
        let out = transfer(&config("a"), "ledger", &["--all"], "region-of-c");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("moved 2 ledger row(s)"));
        // From the transfer's commit on, a's triggers refuse, before anything is drained.
        refused(
            &a,
            "UPDATE wallets SET balance = 0 WHERE id = 'a-1';",
            "owned by region-of-b, not by region-of-a",
        )
        .await;
        refused(&a, "DELETE FROM ledger;", "owned by region-of-c").await;
        a.exec("UPDATE wallets SET balance = 33 WHERE id = 'a-3';").await;
        a.drain().await;
        let claims: Vec<_> = a
            .events(0)
            .await
            .into_iter()
            .filter(|e| e.ownership.as_ref().is_some_and(|o| o.transfer))
            .map(|e| (e.table, e.key.to_string(), e.ownership.unwrap().owner))
            .collect();
        assert_eq!(claims.len(), 4, "{claims:?}");

        // b learns of the transfer and writes; c gets b's write before a's transfer.
        b.pull(&a).await;
        b.exec("UPDATE wallets SET balance = 11 WHERE id = 'a-1';").await;
        b.drain().await;
        let report = c.pull(&b).await;
        assert_eq!(
            (report.applied, report.dead_lettered),
            (1, 0),
            "b's write descends from the transfer"
        );
        c.pull(&a).await;
        c.exec("UPDATE ledger SET amount = amount + 100;").await;
        sync(&[&a, &b, &c]).await;
        for r in [&a, &b, &c] {
            assert_eq!(
                r.rows("SELECT * FROM wallets ORDER BY id").await,
                vec!["a-1|11", "a-2|20", "a-3|33"],
                "{}",
                r.node
            );
            assert_eq!(
                r.rows("SELECT * FROM ledger ORDER BY shard").await,
                vec!["1|1|101", "2|1|102"]
            );
            assert_eq!(
                r.count("SELECT count(*) FROM _weft_dead_letters").await,
                0,
                "{}",
                r.node
            );
            assert_eq!(
                r.rows("SELECT owner, epoch, moving_to IS NULL FROM _weft_owners WHERE tbl = 'wallets' ORDER BY key")
                    .await,
                vec!["region-of-b|1|1", "region-of-b|1|1", "region-of-a|0|1"],
                "{}",
                r.node
            );
        }
        // A row the rule gives a, but that has moved, stays refused at a.
        refused(
            &a,
            "UPDATE wallets SET balance = 0 WHERE id = 'a-2';",
            "owned by region-of-b",
        )
        .await;
    }
}

/// Every replica's rows and row metadata of `accounts`, and its owner records.
async fn state(r: &Replica) -> (std::collections::BTreeMap<String, Vec<String>>, Vec<String>) {
    let owners = r
        .rows("SELECT owner, epoch FROM _weft_owners WHERE tbl = 'accounts' ORDER BY key")
        .await;
    (r.snapshot_of(&["accounts"]).await, owners)
}

/// Moves row `id` to `to` as `weft ownership transfer` does (inside the transfer mark).
async fn transfer(r: &Replica, id: i64, to: &str) {
    r.exec(&format!(
        "BEGIN; INSERT INTO _weft_transfer (marker) VALUES (1); UPDATE accounts SET home = '{to}' WHERE id = {id}; \
         DELETE FROM _weft_transfer; COMMIT;"
    ))
    .await;
}

/// Finding 6a: a key deleted by its owner region and inserted anew by another region (which
/// claims it for itself) used to be refused, for good, by every region that had the old
/// owner recorded ("tried to transfer a row owned by ..."): only the inserting region had
/// the row. Here the third region even hears the new insert before the delete it follows.
#[tokio::test]
async fn a_deleted_key_inserted_anew_by_another_region_is_that_regions_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        node(dir.path(), "a").await,
        node(dir.path(), "b").await,
        node(dir.path(), "c").await,
    );
    a.exec("INSERT INTO accounts VALUES (7, 'region-of-a', 1);").await;
    sync(&[&a, &b, &c]).await;
    a.exec("DELETE FROM accounts WHERE id = 7;").await;
    a.drain().await;
    b.pull(&a).await;
    b.exec("INSERT INTO accounts VALUES (7, 'region-of-b', 2);").await;
    b.drain().await;
    let report = c.pull(&b).await;
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    sync(&[&a, &b, &c]).await;
    let want = state(&b).await;
    assert_eq!(want.1, vec!["region-of-b|1"]);
    assert_eq!(state(&a).await, want);
    assert_eq!(state(&c).await, want);
    for r in [&a, &b, &c] {
        assert_eq!(r.count("SELECT count(*) FROM _weft_dead_letters").await, 0);
    }
}

/// Finding 6b: two regions insert the same new key at once (LWW: b's is later), and a,
/// before hearing of b's, moves the row to c. Regions that heard b's insert first used to
/// refuse the transfer, the others b's insert: two owners for good. The higher epoch wins
/// everywhere now, whatever the arrival order.
#[tokio::test]
async fn concurrent_first_claims_and_a_transfer_end_with_one_owner_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let [a, b, c, d] = [
        node(dir.path(), "a").await,
        node(dir.path(), "b").await,
        node(dir.path(), "c").await,
        node(dir.path(), "d").await,
    ];
    a.exec("INSERT INTO accounts VALUES (1, 'region-of-a', 10);").await;
    a.drain().await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    b.exec("INSERT INTO accounts VALUES (1, 'region-of-b', 20);").await;
    b.drain().await;
    transfer(&a, 1, "region-of-c").await;
    a.drain().await;
    // b and d hear b's claim first; a and c hear a's insert and transfer first.
    d.pull(&b).await;
    for (to, from) in [(&d, &a), (&b, &a), (&c, &a), (&c, &b), (&a, &b)] {
        let report = to.pull(from).await;
        assert_eq!(report.dead_lettered, 0, "{} from {}: {report:?}", to.node, from.node);
    }
    sync(&[&a, &b, &c, &d]).await;
    let want = state(&a).await;
    assert_eq!(want.1, vec!["region-of-c|1"], "the transfer's epoch wins");
    for r in [&b, &c, &d] {
        assert_eq!(state(r).await, want, "{}", r.node);
    }
}

/// Finding 6c: two nodes of one region both own its rows. One moves a row to region b while
/// the other, not having seen that, updates it (later, by the clock). The nodes used to end
/// with different owners and rows; the transfer's higher epoch wins everywhere now.
#[tokio::test]
async fn two_nodes_of_one_region_racing_a_transfer_and_a_write_end_alike() {
    let dir = tempfile::tempdir().unwrap();
    let in_a = |n| common::replica_in(dir.path(), n, "region-of-a", SCHEMA, std::slice::from_ref(&TABLE));
    static TABLE: std::sync::LazyLock<TableConfig> = std::sync::LazyLock::new(table);
    let (a1, a2, b) = (in_a("a1").await, in_a("a2").await, node(dir.path(), "b").await);
    a1.exec("INSERT INTO accounts VALUES (1, 'region-of-a', 10);").await;
    sync(&[&a1, &a2, &b]).await;
    transfer(&a1, 1, "region-of-b").await;
    a1.drain().await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    a2.exec("UPDATE accounts SET balance = 11 WHERE id = 1;").await;
    a2.drain().await;
    b.pull(&a2).await;
    b.pull(&a1).await;
    a1.pull(&a2).await;
    a2.pull(&a1).await;
    sync(&[&a1, &a2, &b]).await;
    let want = state(&b).await;
    assert_eq!(want.1, vec!["region-of-b|1"]);
    assert_eq!(state(&a1).await, want);
    assert_eq!(state(&a2).await, want);
}
