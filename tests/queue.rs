//! The resolution queue and `weft conflicts`, on real SQLite files: concurrent versions kept
//! as the same sibling set at every node whatever the arrival order, the review tool (human
//! and JSON), and a resolution that replicates and closes the conflict everywhere.
mod common;

use std::path::Path;
use std::process::Command;

use common::{Replica, replica_configured, sync};
use weft::config::{Strategy, TableConfig};

const SCHEMA: &str = "CREATE TABLE contracts (id INTEGER PRIMARY KEY, client TEXT, amount INTEGER, terms TEXT);";

async fn node(dir: &Path, name: &str) -> Replica {
    let table = TableConfig {
        name: "contracts".into(),
        strategy: Strategy::Queue,
        columns: Default::default(),
        owner_column: None,
        owner_rule: None,
        unknown_columns: Default::default(),
        renamed_from: Default::default(),
        mesh_regions: Vec::new(),
    };
    replica_configured(dir, name, SCHEMA, &[table]).await
}

async fn open_siblings(r: &Replica) -> Vec<(i64, String)> {
    r.rows("SELECT q.id, (SELECT group_concat(origin || '@' || hlc, ' ') FROM (SELECT origin, hlc FROM _weft_siblings s WHERE s.tbl = q.tbl AND s.key = q.key ORDER BY hlc, origin)) FROM _weft_queue q WHERE closed_at IS NULL")
        .await
        .into_iter()
        .map(|line| {
            let (id, set) = line.split_once('|').unwrap();
            (id.parse().unwrap(), set.to_owned())
        })
        .collect()
}

fn weft(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weft")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_concurrent_edits_queue_once_and_one_resolution_closes_them_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        node(dir.path(), "a").await,
        node(dir.path(), "b").await,
        node(dir.path(), "c").await,
    );
    a.exec(
        "INSERT INTO contracts VALUES (7, 'acme', 100, 'net 30'); INSERT INTO contracts VALUES (8, 'other', 1, 'x');",
    )
    .await;
    sync(&[&a, &b, &c]).await;

    a.exec("UPDATE contracts SET amount = 150 WHERE id = 7;").await;
    b.exec("UPDATE contracts SET terms = 'net 60' WHERE id = 7;").await;
    c.exec("UPDATE contracts SET amount = 90, terms = 'prepaid' WHERE id = 7;")
        .await;
    // Only row 7 waits: row 8 keeps flowing.
    c.exec("UPDATE contracts SET amount = 2 WHERE id = 8;").await;
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

    let sets = [
        open_siblings(&a).await,
        open_siblings(&b).await,
        open_siblings(&c).await,
    ];
    assert_eq!(sets[0].len(), 1, "one queue entry: {sets:?}");
    assert_eq!(sets[0][0].1.split(' ').count(), 3, "three siblings: {sets:?}");
    assert!(
        sets.iter().all(|s| s[0].1 == sets[0][0].1),
        "the same siblings everywhere: {sets:?}"
    );
    let visible = a.rows("SELECT * FROM contracts ORDER BY id").await;
    assert_eq!(b.rows("SELECT * FROM contracts ORDER BY id").await, visible);
    assert_eq!(c.rows("SELECT * FROM contracts ORDER BY id").await, visible);
    assert_eq!(visible[1], "8|other|2|x", "the rest of the stream flowed");

    // The review tool, on a's database.
    std::fs::write(
        dir.path().join("t.toml"),
        "version = 1\nmesh = \"q\"\nshape = \"all-to-all\"\n[[nodes]]\nid = \"a\"\nregion = \"ra\"\naddress = \"127.0.0.1:1\"\n[[nodes]]\nid = \"b\"\nregion = \"rb\"\naddress = \"127.0.0.1:2\"\n[[nodes]]\nid = \"c\"\nregion = \"rc\"\naddress = \"127.0.0.1:3\"\n",
    )
    .unwrap();
    let config = dir.path().join("a.toml");
    std::fs::write(&config, "version = 1\nnode = \"a\"\ntopology = \"t.toml\"\ndatabase = \"sqlite://a.db\"\n[[tables]]\nname = \"contracts\"\nstrategy = \"queue\"\n").unwrap();
    let config = config.to_str().unwrap();
    let id = sets[0][0].0.to_string();

    let (ok, out, err) = weft(&["conflicts", "--config", config, "list"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("contracts") && out.contains("[7]") && out.contains("ra, rb, rc"),
        "{out}"
    );
    let (ok, out, _) = weft(&["conflicts", "--config", config, "list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok && list[0]["siblings"] == 3, "{out}");

    let (ok, out, err) = weft(&["conflicts", "--config", config, "show", &id]);
    assert!(ok, "{err}");
    if std::env::var("SHOW").is_ok() {
        println!("{out}");
        println!("{}", weft(&["conflicts", "--config", config, "list"]).1);
    }
    assert!(
        out.contains("* amount") && out.contains("* terms") && out.contains("  client"),
        "differing columns marked:\n{out}"
    );
    let (_, out, _) = weft(&["conflicts", "--config", config, "show", &id, "--json"]);
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    let take = shown["siblings"]
        .as_array()
        .unwrap()
        .iter()
        .position(|s| s["origin"] == "b")
        .unwrap()
        + 1;

    let (ok, out, err) = weft(&[
        "conflicts",
        "--config",
        config,
        "resolve",
        &id,
        "--take",
        &take.to_string(),
        "--by",
        "alice",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("by alice"), "{out}");
    let (ok, _, err) = weft(&["conflicts", "--config", config, "resolve", "999", "--take", "1"]);
    assert!(!ok && err.contains("no open conflict 999"), "{err}");

    // The resolution is an ordinary write: it replicates and closes the entry everywhere.
    sync(&[&a, &b, &c]).await;
    for r in [&a, &b, &c] {
        assert!(
            open_siblings(r).await.is_empty(),
            "{} still has the conflict open",
            r.node
        );
        assert_eq!(
            r.rows("SELECT * FROM contracts WHERE id = 7").await,
            vec!["7|acme|100|net 60"]
        );
    }
    assert_eq!(b.rows("SELECT closed_by FROM _weft_queue").await, vec!["a"]);
    let (ok, out, _) = weft(&["conflicts", "--config", config, "history", "--json"]);
    let history: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok && history["resolved"][0]["decided_by"] == "alice", "{out}");
    assert!(
        history["resolved"][0]["decision"]
            .as_str()
            .unwrap()
            .contains("took sibling"),
        "{out}"
    );
}

mod property {
    use super::{Replica, node, open_siblings, sync};
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Step {
        Write {
            node: usize,
            id: i64,
            amount: i64,
            drain: bool,
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
            2 => (0..3usize, 0..2i64, 0..50i64, proptest::bool::weighted(0.7))
                .prop_map(|(node, id, amount, drain)| Step::Write { node, id, amount, drain }),
            3 => (0..4usize, 0..3usize, 0..3u64, 1..5usize).prop_map(|(to, from, back, len)| Step::Deliver { to, from, back, len }),
        ]
    }

    async fn state(r: &Replica) -> (Vec<String>, Vec<String>) {
        let rows = r.rows("SELECT * FROM contracts ORDER BY id").await;
        let siblings = open_siblings(r).await.into_iter().map(|(_, set)| set).collect();
        (rows, siblings)
    }

    async fn run(steps: Vec<Step>) -> Result<(), TestCaseError> {
        let dir = tempfile::tempdir().unwrap();
        let mut replicas = Vec::new();
        for name in ["a", "b", "c", "observer"] {
            replicas.push(node(dir.path(), name).await);
        }
        replicas[0]
            .exec("INSERT INTO contracts VALUES (0, 'x', 0, 't'), (1, 'y', 0, 't');")
            .await;
        let all: Vec<&Replica> = replicas.iter().collect();
        sync(&all).await;
        for step in steps {
            match step {
                Step::Write {
                    node,
                    id,
                    amount,
                    drain,
                } => {
                    replicas[node]
                        .exec(&format!("UPDATE contracts SET amount = {amount} WHERE id = {id};"))
                        .await;
                    if drain {
                        replicas[node].drain().await;
                    }
                }
                Step::Deliver { to, from, back, len } => {
                    replicas[to].deliver(&replicas[from], back, 0, len).await;
                }
            }
        }
        sync(&all).await;
        let first = state(&replicas[0]).await;
        for r in &replicas[1..] {
            prop_assert_eq!(&state(r).await, &first, "{} differs from a", r.node);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
        #[test]
        fn queue_tables_hold_the_same_siblings_whatever_the_order(steps in proptest::collection::vec(step(), 5..40)) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(run(steps))?;
        }
    }
}

/// Finding 21 (sibling encodings): every node stores the same sibling the same way. The
/// first sibling used to be synthesized with seq 1 and no region, the arriving one kept its
/// seq, region and commit time, so the stored bytes differed between nodes.
#[tokio::test]
async fn every_node_stores_the_same_siblings_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        node(dir.path(), "a").await,
        node(dir.path(), "b").await,
        node(dir.path(), "c").await,
    );
    a.exec("INSERT INTO contracts VALUES (7, 'acme', 100, 'net 30');").await;
    sync(&[&a, &b, &c]).await;
    a.exec("UPDATE contracts SET amount = 150 WHERE id = 7;").await;
    b.exec("UPDATE contracts SET terms = 'net 60' WHERE id = 7;").await;
    sync(&[&a, &b, &c]).await;
    let stored = "SELECT origin, hlc, hex(event) FROM _weft_siblings ORDER BY origin, hlc";
    let want = a.rows(stored).await;
    assert_eq!(want.len(), 2);
    assert_eq!(b.rows(stored).await, want);
    assert_eq!(c.rows(stored).await, want);
}

/// Found by the `admission` fuzz target: two versions of one row from one origin with the
/// same HLC, concurrent with each other and with the local version (no honest origin makes
/// them: each of its writes is stamped after the previous one, and dominates it). The sibling
/// set keys versions by (origin, HLC), so the second used to break its unique key, failing
/// the apply; the peer would have resent the batch forever. The later in the origin's order
/// now takes the earlier one's place, the same at every node, and the stream flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_versions_claiming_one_origin_and_clock_do_not_wedge_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (node(dir.path(), "a").await, node(dir.path(), "b").await);
    a.exec("INSERT INTO contracts VALUES (7, 'acme', 100, 'net 30');").await;
    a.drain().await;
    b.exec("INSERT INTO contracts VALUES (7, 'acme', 200, 'net 60');").await;
    b.drain().await;
    let first = b.events(0).await.remove(0);
    let mut second = first.clone();
    second.seq = 2;
    second.batch_end = 2;
    second.version = [("mallory".to_owned(), 1)].into_iter().collect();
    if let weft::event::Op::Upsert(row) = &mut second.op {
        row.0[2].1 = weft::event::Value::Integer(300);
    }
    a.store.apply(vec![first]).await.unwrap();
    let report = a.store.apply(vec![second]).await.expect("the second version applies");
    assert_eq!(report.frontiers["b"], 2);
    let siblings = open_siblings(&a).await;
    assert_eq!(siblings.len(), 1, "{siblings:?}");
    assert_eq!(
        siblings[0].1.split(' ').count(),
        2,
        "a's version and b's latest: {siblings:?}"
    );
}
