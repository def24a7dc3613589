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
    }
}

async fn node(dir: &Path, name: &str) -> Replica {
    replica_configured(dir, name, SCHEMA, &[table()]).await
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

    std::fs::write(
        dir.path().join("t.toml"),
        "version = 1\nmesh = \"o\"\nshape = \"all-to-all\"\n[[nodes]]\nid = \"a\"\nregion = \"region-of-a\"\naddress = \"127.0.0.1:1\"\n[[nodes]]\nid = \"b\"\nregion = \"region-of-b\"\naddress = \"127.0.0.1:2\"\n[[nodes]]\nid = \"c\"\nregion = \"region-of-c\"\naddress = \"127.0.0.1:3\"\n",
    )
    .unwrap();
    let config = |n: &str| {
        let path = dir.path().join(format!("{n}.toml"));
        std::fs::write(&path, format!("version = 1\nnode = \"{n}\"\ntopology = \"t.toml\"\ndatabase = \"sqlite://{n}.db\"\n[[tables]]\nname = \"accounts\"\nstrategy = \"ownership\"\nowner_column = \"home\"\n")).unwrap();
        path.to_str().unwrap().to_owned()
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
