//! Property: replicas that receive the same events in any order, with duplicates, resends
//! and gaps, end with identical rows and identical row metadata.
//!
//! Three writers make random concurrent writes to a small shared key space (some left in the
//! outbox so they race with arriving events); deliveries hand random slices of a writer's log
//! to any replica, starting before the frontier (duplicates), at it, or past it (gaps), and
//! sometimes ending inside a capture batch. Two observers only receive. Everything runs on
//! real SQLite files through the real store; proptest prints the failing case and its seed.
mod common;

use common::replica;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Step {
    Write {
        node: usize,
        statements: Vec<String>,
        drain: bool,
    },
    Deliver {
        to: usize,
        from: usize,
        back: u64,
        ahead: u64,
        len: usize,
    },
}

fn statement() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (0..4i64, 0..100i64, "[a-c]{1,3}").prop_map(|(id, qty, name)| format!(
            "INSERT INTO items (id, name, qty) VALUES ({id}, '{name}', {qty}) ON CONFLICT (id) DO UPDATE SET name = excluded.name, qty = excluded.qty;"
        )),
        1 => (0..4i64).prop_map(|id| format!("DELETE FROM items WHERE id = {id};")),
        1 => (0..2i64, 0..2i64, "[xyz]").prop_map(|(a, b, v)| format!(
            "INSERT OR REPLACE INTO pairs (a, b, v) VALUES ('k{a}', {b}, '{v}');"
        )),
        1 => (0..2i64).prop_map(|a| format!("DELETE FROM pairs WHERE a = 'k{a}';")),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => (0..3usize, proptest::collection::vec(statement(), 1..4), proptest::bool::weighted(0.7))
            .prop_map(|(node, statements, drain)| Step::Write { node, statements, drain }),
        3 => (0..5usize, 0..3usize, 0..3u64, prop_oneof![4 => Just(0u64), 1 => 1..3u64], 1..6usize)
            .prop_map(|(to, from, back, ahead, len)| Step::Deliver { to, from, back, ahead, len }),
    ]
}

async fn run(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut replicas = Vec::new();
    for name in ["a", "b", "c", "observer1", "observer2"] {
        replicas.push(replica(dir.path(), name).await);
    }
    for step in steps {
        match step {
            Step::Write {
                node,
                statements,
                drain,
            } => {
                replicas[node]
                    .exec(&format!("BEGIN; {} COMMIT;", statements.join(" ")))
                    .await;
                if drain {
                    replicas[node].drain().await;
                }
            }
            Step::Deliver {
                to,
                from,
                back,
                ahead,
                len,
            } => {
                replicas[to].deliver(&replicas[from], back, ahead, len).await;
            }
        }
    }
    // Heal: everything to everyone.
    for writer in &replicas[..3] {
        writer.drain().await;
    }
    for to in &replicas {
        for from in &replicas[..3] {
            if to.node != from.node {
                let report = to.pull(from).await;
                prop_assert!(report.gap.is_none());
            }
        }
    }
    let first = replicas[0].snapshot().await;
    for r in &replicas[1..] {
        prop_assert_eq!(&r.snapshot().await, &first, "{} differs from a", r.node);
    }
    for r in &replicas {
        for origin in &replicas[..3] {
            if r.node != origin.node {
                let processed = r
                    .count(&format!(
                        "SELECT coalesce(max(processed), 0) FROM _weft_frontier WHERE origin = '{}'",
                        origin.node
                    ))
                    .await;
                let last = origin
                    .count("SELECT value FROM _weft_node WHERE name = 'last_seq'")
                    .await;
                prop_assert_eq!(
                    processed,
                    last,
                    "{} processed {}'s events exactly once",
                    r.node,
                    origin.node
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]
    #[test]
    fn replicas_converge_whatever_the_delivery_order(steps in proptest::collection::vec(step(), 10..60)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(run(steps))?;
    }
}
