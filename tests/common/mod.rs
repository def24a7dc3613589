//! Shared set-up for the integration tests: real SQLite files in a temporary folder.
#![allow(dead_code)]
pub mod http;
pub mod mixed;
pub mod proxy;
pub mod regions;
pub mod scenarios;
pub mod sidecars;

use std::path::Path;
use std::time::Duration;

use sqlx::SqlitePool;
use weft::event::Event;
use weft::event::Identity;
use weft::store::sqlite::SqliteStore;
use weft::store::{ApplyReport, Store};

pub struct Replica {
    pub node: String,
    pub store: Store,
    pub app: SqlitePool,
}

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, price REAL, data BLOB);
CREATE TABLE IF NOT EXISTS pairs (a TEXT NOT NULL, b INTEGER NOT NULL, v TEXT, PRIMARY KEY (a, b));
";

pub async fn replica(dir: &Path, node: &str) -> Replica {
    replica_with(dir, node, SCHEMA, &["items", "pairs"]).await
}

pub async fn replica_with(dir: &Path, node: &str, schema: &str, tables: &[&str]) -> Replica {
    let tables: Vec<weft::config::TableConfig> = tables.iter().map(|t| weft::config::TableConfig::lww(t)).collect();
    replica_configured(dir, node, schema, &tables).await
}

/// A replica whose tables are configured in full (strategies, CRDT columns).
pub async fn replica_configured(dir: &Path, node: &str, schema: &str, tables: &[weft::config::TableConfig]) -> Replica {
    replica_in(dir, node, &format!("region-of-{node}"), schema, tables).await
}

/// A replica like `replica_configured`, of node `node` in region `region`.
pub async fn replica_in(
    dir: &Path,
    node: &str,
    region: &str,
    schema: &str,
    tables: &[weft::config::TableConfig],
) -> Replica {
    let tables = &in_test_mesh(tables);
    let db = dir.join(format!("{node}.db"));
    let app = weft::harness::app_pool(&db).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(schema.to_owned()))
        .execute(&app)
        .await
        .unwrap();
    let identity = Identity {
        node: node.into(),
        region: region.into(),
    };
    let store = Store::Sqlite(
        SqliteStore::open(&db, identity, tables, Duration::from_millis(500))
            .await
            .unwrap(),
    );
    Replica {
        node: node.into(),
        store,
        app,
    }
}

impl Replica {
    pub async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&self.app)
            .await
            .unwrap();
    }

    pub async fn drain(&self) -> u64 {
        self.store.drain().await.unwrap().events
    }

    /// This replica's own events after `after`, decoded from its log.
    pub async fn events(&self, after: u64) -> Vec<Event> {
        own_events(&self.store, &self.node, after).await
    }

    /// Ships every event of `from` that this replica has not applied yet.
    pub async fn pull(&self, from: &Replica) -> ApplyReport {
        self.deliver(from, 0, 0, usize::MAX).await
    }

    pub async fn rows(&self, sql: &str) -> Vec<String> {
        use sqlx::Row;
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_all(&self.app)
            .await
            .unwrap();
        rows.iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| {
                        let raw = r.try_get_raw(i).unwrap();
                        use sqlx::ValueRef;
                        if raw.is_null() {
                            "NULL".to_string()
                        } else if let Ok(v) = r.try_get::<i64, _>(i) {
                            v.to_string()
                        } else if let Ok(v) = r.try_get::<f64, _>(i) {
                            v.to_string()
                        } else if let Ok(v) = r.try_get::<String, _>(i) {
                            v
                        } else {
                            format!("{:?}", r.try_get::<Vec<u8>, _>(i).unwrap())
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect()
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&self.app)
            .await
            .unwrap()
    }

    pub async fn snapshot_of(&self, tables: &[&str]) -> std::collections::BTreeMap<String, Vec<String>> {
        let tables: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
        weft::harness::compare::sqlite_rendering(&self.app, &tables)
            .await
            .unwrap()
    }

    pub async fn snapshot(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        weft::harness::compare::sqlite_rendering(&self.app, &["items".to_string(), "pairs".to_string()])
            .await
            .unwrap()
    }

    /// Hands this replica `len` events of `from`, starting `back` before its frontier for
    /// `from` (duplicates) or `ahead` past it (a gap); the store must sort it out.
    pub async fn deliver(&self, from: &Replica, back: u64, ahead: u64, len: usize) -> ApplyReport {
        deliver((&self.node, &self.store), (&from.node, &from.store), back, ahead, len).await
    }
}

/// The test mesh's regions, as a node's config gives them to its ownership tables: the
/// capture triggers name an owner only among them (`TableConfig::mesh_regions`).
pub fn in_test_mesh(tables: &[weft::config::TableConfig]) -> Vec<weft::config::TableConfig> {
    let mut tables = tables.to_vec();
    let owned = |t: &weft::config::TableConfig| t.strategy == weft::config::Strategy::Ownership;
    for table in tables.iter_mut().filter(|t| owned(t) && t.mesh_regions.is_empty()) {
        table.mesh_regions = ["a", "b", "c", "d"].iter().map(|n| format!("region-of-{n}")).collect();
    }
    tables
}

/// Node `node`'s own events after `after`, decoded from `store`'s log.
pub async fn own_events(store: &Store, node: &str, after: u64) -> Vec<Event> {
    store
        .read_log(node, after, usize::MAX >> 1)
        .await
        .unwrap()
        .into_iter()
        .map(|e| weft::wire::decode_event(&e.bytes).unwrap())
        .collect()
}

/// Hands store `to` up to `len` events of node `from`, starting `back` before its frontier
/// for `from` (duplicates) or `ahead` past it (a gap); the store must sort it out.
pub async fn deliver(
    (to_node, to): (&str, &Store),
    (from_node, from): (&str, &Store),
    back: u64,
    ahead: u64,
    len: usize,
) -> ApplyReport {
    if to_node == from_node {
        return ApplyReport::default();
    }
    let frontier = to.frontiers().await.unwrap().get(from_node).copied().unwrap_or(0);
    let start = (frontier + 1 + ahead).saturating_sub(back).max(1);
    let events: Vec<_> = own_events(from, from_node, start - 1)
        .await
        .into_iter()
        .take(len)
        .collect();
    if events.is_empty() {
        return ApplyReport::default();
    }
    to.apply(events).await.unwrap()
}

/// Drains every replica, then ships everything to everyone.
pub async fn sync(replicas: &[&Replica]) {
    for r in replicas {
        r.drain().await;
    }
    for to in replicas {
        for from in replicas {
            if to.node != from.node {
                to.pull(from).await;
            }
        }
    }
}

/// The nemesis schedule's random source: seeded from `WEFT_NEMESIS_SEED` when set (to replay
/// a run), else at random; the seed is printed either way.
pub fn nemesis_rng() -> (u64, rand::rngs::StdRng) {
    use rand::SeedableRng;
    let seed: u64 = std::env::var("WEFT_NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("nemesis seed {seed} (replay with WEFT_NEMESIS_SEED={seed})");
    (seed, rand::rngs::StdRng::seed_from_u64(seed))
}
