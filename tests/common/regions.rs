//! Regions on either store for the PostgreSQL tests: a SQLite file or a database on a
//! throw-away PostgreSQL cluster, each with the application's own connection pool.
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use sqlx::{PgPool, SqlitePool};
use weft::config::{Database, TableConfig};
use weft::event::Event;
use weft::event::Identity;
use weft::harness::cluster::Cluster;
use weft::store::{ApplyReport, Store};

pub enum App {
    Sqlite(SqlitePool),
    Pg(PgPool),
}

pub struct Region {
    pub node: String,
    pub store: Store,
    pub app: App,
    pub database: Database,
}

fn identity(node: &str) -> Identity {
    Identity {
        node: node.into(),
        region: format!("region-of-{node}"),
    }
}

/// A region's store on `database`, its ownership tables in the test mesh.
async fn open_store(database: &Database, node: &str, tables: &[TableConfig]) -> Store {
    let tables = super::in_test_mesh(tables);
    Store::open(database, identity(node), &tables, Duration::from_millis(500))
        .await
        .unwrap()
}

pub fn lww(tables: &[&str]) -> Vec<TableConfig> {
    tables.iter().map(|t| TableConfig::lww(t)).collect()
}

impl Region {
    pub async fn sqlite(dir: &Path, node: &str, schema: &str, tables: &[TableConfig]) -> Region {
        let path = dir.join(format!("{node}.db"));
        let app = weft::harness::app_pool(&path).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(schema.to_owned()))
            .execute(&app)
            .await
            .unwrap();
        let database = Database::Sqlite(path);
        let store = open_store(&database, node, tables).await;
        Region {
            node: node.into(),
            store,
            app: App::Sqlite(app),
            database,
        }
    }

    /// A new database `node` on `cluster`, with `schema` created in it.
    pub async fn pg(cluster: &Cluster, node: &str, schema: &str, tables: &[TableConfig]) -> Region {
        let url = cluster.create_database(node).await.unwrap();
        Self::pg_at(&url, node, schema, tables).await
    }

    /// A new database `node` on `cluster` owned by a role of that name that is no
    /// superuser (weft cannot apply as a replica there), with `schema` created in it.
    pub async fn pg_unprivileged(cluster: &Cluster, node: &str, schema: &str, tables: &[TableConfig]) -> Region {
        let admin = PgPool::connect(&cluster.url("postgres")).await.unwrap();
        for ddl in [
            format!("CREATE ROLE \"{node}\" LOGIN"),
            format!("CREATE DATABASE \"{node}\" OWNER \"{node}\""),
        ] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(ddl)).execute(&admin).await.unwrap();
        }
        let url = cluster.url(node).replace("postgres@", &format!("{node}@"));
        Self::pg_at(&url, node, schema, tables).await
    }

    /// Region `node` on the PostgreSQL database at `url`, with `schema` created in it.
    pub async fn pg_at(url: &str, node: &str, schema: &str, tables: &[TableConfig]) -> Region {
        let url = url.to_owned();
        let app = PgPool::connect(&url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(schema.to_owned()))
            .execute(&app)
            .await
            .unwrap();
        let database = Database::Postgres(url);
        let store = open_store(&database, node, tables).await;
        Region {
            node: node.into(),
            store,
            app: App::Pg(app),
            database,
        }
    }

    /// Stops this region's store and opens it again on the same database, as a restarted
    /// sidecar does.
    pub async fn reopen(self, tables: &[TableConfig]) -> Region {
        let Region {
            node,
            store,
            app,
            database,
        } = self;
        store.close().await;
        let store = open_store(&database, &node, tables).await;
        Region {
            node,
            store,
            app,
            database,
        }
    }

    pub async fn try_exec(&self, sql: &str) -> Result<(), String> {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match &self.app {
            App::Sqlite(pool) => sqlx::raw_sql(sql).execute(pool).await.map(|_| ()),
            App::Pg(pool) => sqlx::raw_sql(sql).execute(pool).await.map(|_| ()),
        }
        .map_err(|e| e.to_string())
    }

    pub async fn exec(&self, sql: &str) {
        self.try_exec(sql).await.unwrap();
    }

    pub async fn count(&self, sql: &str) -> i64 {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match &self.app {
            App::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
            App::Pg(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
        }
    }

    pub fn pg_pool(&self) -> &PgPool {
        match &self.app {
            App::Pg(pool) => pool,
            App::Sqlite(_) => panic!("{} is a SQLite region", self.node),
        }
    }

    pub async fn drain(&self) -> u64 {
        self.store.drain().await.unwrap().events
    }

    /// This region's own events after `after`, decoded from its log.
    pub async fn events(&self, after: u64) -> Vec<Event> {
        super::own_events(&self.store, &self.node, after).await
    }

    /// Ships every event of `from` that this region has not applied yet.
    pub async fn pull(&self, from: &Region) -> ApplyReport {
        super::deliver((&self.node, &self.store), (&from.node, &from.store), 0, 0, usize::MAX).await
    }

    /// Table rows (sorted, so text collations do not matter) and row metadata.
    pub async fn snapshot(&self, tables: &[&str]) -> BTreeMap<String, Vec<String>> {
        let tables: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
        let mut out = match &self.app {
            App::Sqlite(pool) => weft::harness::compare::sqlite_rendering(pool, &tables).await.unwrap(),
            App::Pg(pool) => weft::harness::compare::postgres_rendering(pool, &tables).await.unwrap(),
        };
        for rows in out.values_mut() {
            rows.sort();
        }
        out
    }
}

/// Drains every region, then ships everything to everyone.
pub async fn sync(regions: &[&Region]) {
    for r in regions {
        r.drain().await;
    }
    for to in regions {
        for from in regions {
            if to.node != from.node {
                to.pull(from).await;
            }
        }
    }
}
