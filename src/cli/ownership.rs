//! `weft ownership transfer`: move rows of an ownership table to another region.
//!
//! Run it on the current owner's node, SQLite or PostgreSQL. With an owner column, the
//! transfer is an ordinary write of that column (allowed by the ownership trigger only inside
//! this command's transaction: the `_weft_transfer` marker, or `weft.transfer = 'on'`). With
//! an owner rule, it records the new owner as `moving_to` in the owners table (which the
//! triggers already obey) and queues the row for capture. Either way the drain numbers it as
//! the row's next epoch and it replicates like data. Afterwards the old owner's writes are
//! refused at its source, and anywhere else if they are sent at all.
use anyhow::{Context as _, bail};
use sqlx::{AssertSqlSafe, Connection as _, SqliteConnection};

use crate::config::{Database, NodeConfig, OwnerRule, Strategy, TableConfig};
use crate::event::{Key, Value};
use crate::resolve::ownership::{Owner, rule_owner};
use crate::store::engine::KnownOwner;
use crate::store::sqlite::owners;
use crate::store::sqlite::schema::{self, NOW_MICROS, TableInfo, quote};
use crate::store::sqlite::values::{bind, value_at};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Move rows to another region: one row (`--key`, repeatable, a JSON value or array of
    /// key values), or every row this region owns (`--all`).
    Transfer {
        #[arg(long)]
        table: String,
        #[arg(long = "key", required_unless_present = "all")]
        keys: Vec<String>,
        #[arg(long, conflicts_with = "keys")]
        all: bool,
        /// The region that owns the rows afterwards.
        #[arg(long)]
        to: String,
        #[arg(long)]
        by: Option<String>,
    },
}

fn key_values(text: &str, width: usize) -> anyhow::Result<Vec<Value>> {
    let json: serde_json::Value =
        serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_owned()));
    let items = match json {
        serde_json::Value::Array(items) => items,
        single => vec![single],
    };
    if items.len() != width {
        bail!(
            "key {text} has {} values; the table's primary key has {width} columns",
            items.len()
        );
    }
    items
        .iter()
        .map(|v| match v {
            serde_json::Value::Number(n) if n.is_i64() => Ok(Value::Integer(n.as_i64().expect("checked"))),
            serde_json::Value::Number(n) => Ok(Value::Real(n.as_f64().unwrap_or(0.0))),
            serde_json::Value::String(s) => Ok(Value::Text(s.clone())),
            other => bail!("{other} is not a key value"),
        })
        .collect()
}

pub async fn run(config_path: &std::path::Path, command: Command) -> anyhow::Result<()> {
    let config = NodeConfig::load(config_path)?;
    let Command::Transfer {
        table,
        keys,
        all,
        to,
        by,
    } = command;
    let Some(table_config) = config.tables.iter().find(|t| t.name == table) else {
        bail!("table `{table}` is not in {}", config_path.display());
    };
    if table_config.strategy != Strategy::Ownership {
        bail!("table `{table}` is not an ownership table (strategy = \"ownership\" with owner_column or owner_rule)");
    }
    if !config.topology.nodes.iter().any(|n| n.region == to) {
        bail!("`{to}` is not a region of this mesh");
    }
    let me = config.region().to_owned();
    if to == me {
        bail!("this node is in `{to}` already");
    }
    let by = by
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into());
    let rows = if all {
        format!("all rows of {me}")
    } else {
        keys.join(", ")
    };
    let moved = match &config.database {
        Database::Sqlite(path) => on_sqlite(path, table_config, &keys, all, (&me, &to), (&rows, &by)).await?,
        Database::Postgres(url) => on_postgres(url, table_config, &keys, all, (&me, &to), (&rows, &by)).await?,
    };
    println!(
        "moved {moved} {table} row(s) ({rows}) from {me} to {to}, by {by}; the transfer replicates like any write"
    );
    Ok(())
}

/// The transfer on a SQLite database, in one `BEGIN IMMEDIATE` transaction.
async fn on_sqlite(
    path: &std::path::Path,
    table_config: &TableConfig,
    keys: &[String],
    all: bool,
    (me, to): (&str, &str),
    (rows, by): (&str, &str),
) -> anyhow::Result<u64> {
    let table = &table_config.name;
    let pool = crate::store::sqlite::app_pool(path).await?;
    let mut conn = pool.acquire().await?;
    let info = schema::describe(&mut conn, table).await?;
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    sqlx::query("INSERT INTO _weft_transfer (marker) VALUES (1)")
        .execute(&mut *tx)
        .await?;
    let moved = match (&table_config.owner_column, &table_config.owner_rule) {
        (Some(column), _) => by_column(&mut tx, &info, column, keys, all, (me, to)).await?,
        (None, Some(rule)) => by_rule(&mut tx, &info, rule, keys, all, (me, to)).await?,
        (None, None) => bail!("table `{table}` has neither owner_column nor owner_rule"),
    };
    sqlx::query("DELETE FROM _weft_transfer").execute(&mut *tx).await?;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO _weft_transfers (tbl, rows, moved, from_region, to_region, decided_by, at) VALUES (?, ?, ?, ?, ?, ?, {NOW_MICROS})"
    )))
    .bind(table)
    .bind(rows)
    .bind(moved as i64)
    .bind(me)
    .bind(to)
    .bind(by)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(moved)
}

/// Moves rows by writing their owner column; the trigger allows it inside the transfer.
async fn by_column(
    tx: &mut SqliteConnection,
    info: &TableInfo,
    column: &str,
    keys: &[String],
    all: bool,
    (me, to): (&str, &str),
) -> anyhow::Result<u64> {
    let table = &info.name;
    let set = format!("UPDATE {} SET {} = ?", quote(table), quote(column));
    if all {
        return Ok(sqlx::query(AssertSqlSafe(format!("{set} WHERE {} = ?", quote(column))))
            .bind(to)
            .bind(me)
            .execute(&mut *tx)
            .await?
            .rows_affected());
    }
    let predicate = schema::key_predicate(&info.key);
    let mut moved = 0;
    for key in keys {
        let values = key_values(key, info.key.len())?;
        let mut query = sqlx::query(AssertSqlSafe(format!("{set} WHERE {predicate}"))).bind(to);
        for v in &values {
            query = bind(query, v);
        }
        let n = query
            .execute(&mut *tx)
            .await
            .with_context(|| format!("transferring {table} {key}"))?
            .rows_affected();
        if n == 0 {
            bail!("{table} has no row with key {key}");
        }
        moved += n;
    }
    Ok(moved)
}

/// Moves rows of a rule table: records `moving_to` (the triggers refuse this region's writes
/// from now on) and queues each row for capture, where it becomes the next epoch.
async fn by_rule(
    tx: &mut SqliteConnection,
    info: &TableInfo,
    rule: &OwnerRule,
    keys: &[String],
    all: bool,
    (me, to): (&str, &str),
) -> anyhow::Result<u64> {
    let table = &info.name;
    let key_list = info.key.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ");
    let select = format!("SELECT {key_list} FROM {}", quote(table));
    let rows = if all {
        sqlx::query(AssertSqlSafe(select)).fetch_all(&mut *tx).await?
    } else {
        let predicate = schema::key_predicate(&info.key);
        let mut rows = Vec::new();
        for key in keys {
            let values = key_values(key, info.key.len())?;
            let mut query = sqlx::query(AssertSqlSafe(format!("{select} WHERE {predicate}")));
            for v in &values {
                query = bind(query, v);
            }
            match query.fetch_optional(&mut *tx).await? {
                Some(row) => rows.push(row),
                None => bail!("{table} has no row with key {key}"),
            }
        }
        rows
    };
    let slots = (1..=info.key.len())
        .map(|i| format!("k{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let marks = vec!["?"; info.key.len()].join(", ");
    let queue = format!("INSERT INTO _weft_outbox (tbl, {slots}, at) VALUES (?, {marks}, {NOW_MICROS})");
    let mut moved = 0;
    for row in rows {
        let key = Key((0..info.key.len())
            .map(|i| value_at(&row, i))
            .collect::<Result<_, _>>()?);
        let key_bytes = key.to_bytes();
        let known = owners::load_known(tx, table, &key_bytes).await?;
        let Some(owner) = movable(table, (&info.key, &key), rule, known, me, all)? else {
            continue;
        };
        owners::store(tx, table, &key_bytes, &key, &owner, Some(to)).await?;
        let mut query = sqlx::query(AssertSqlSafe(queue.as_str())).bind(table);
        for v in &key.0 {
            query = bind(query, v);
        }
        query.execute(&mut *tx).await?;
        moved += 1;
    }
    Ok(moved)
}

/// The transfer on a PostgreSQL database, in one transaction with `weft.transfer = 'on'`.
async fn on_postgres(
    url: &str,
    table_config: &TableConfig,
    keys: &[String],
    all: bool,
    (me, to): (&str, &str),
    (rows, by): (&str, &str),
) -> anyhow::Result<u64> {
    use crate::store::postgres::rows::{load_owner, store_owner};
    use crate::store::postgres::schema::{describe, quote};
    let pool = crate::store::postgres::PgStore::app_pool(url).await?;
    let mut conn = pool
        .acquire()
        .await
        .context("connecting to the node's PostgreSQL database")?;
    let info = describe(&mut conn, &table_config.name).await?;
    let table = &info.name;
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT set_config('weft.transfer', 'on', true)")
        .execute(&mut *tx)
        .await?;
    let key_texts = |text: &str| -> anyhow::Result<Vec<Option<String>>> {
        let values = key_values(text, info.key.len())?;
        info.texts(&info.key, &values.iter().collect::<Vec<_>>())
            .map_err(|e| anyhow::anyhow!("key {text}: {e}"))
    };
    let mut moved = 0;
    match (&table_config.owner_column, &table_config.owner_rule) {
        (Some(column), _) => {
            let set = format!("UPDATE {} t SET {} = $1", info.qualified(), quote(column));
            if all {
                moved = sqlx::query(AssertSqlSafe(format!("{set} WHERE t.{} = $2", quote(column))))
                    .bind(to)
                    .bind(me)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            } else {
                for key in keys {
                    let mut query =
                        sqlx::query(AssertSqlSafe(format!("{set} WHERE {}", info.key_predicate(2)))).bind(to);
                    for text in key_texts(key)? {
                        query = query.bind(text);
                    }
                    let n = query
                        .execute(&mut *tx)
                        .await
                        .with_context(|| format!("transferring {table} {key}"))?
                        .rows_affected();
                    if n == 0 {
                        bail!("{table} has no row with key {key}");
                    }
                    moved += n;
                }
            }
        }
        (None, Some(rule)) => {
            let select = format!(
                "SELECT {} FROM {} t",
                info.key_index
                    .iter()
                    .map(|&i| info.kinds[i].select(&format!("t.{}", quote(&info.columns[i]))))
                    .collect::<Vec<_>>()
                    .join(", "),
                info.qualified()
            );
            let found = if all {
                sqlx::query(AssertSqlSafe(select)).fetch_all(&mut *tx).await?
            } else {
                let mut found = Vec::new();
                for key in keys {
                    let mut query = sqlx::query(AssertSqlSafe(format!("{select} WHERE {}", info.key_predicate(1))));
                    for text in key_texts(key)? {
                        query = query.bind(text);
                    }
                    match query.fetch_optional(&mut *tx).await? {
                        Some(row) => found.push(row),
                        None => bail!("{table} has no row with key {key}"),
                    }
                }
                found
            };
            let queue = format!(
                "INSERT INTO weft.outbox (tbl, deleted, image, at) SELECT $1, false, to_jsonb(t), weft.now_micros() \
                 FROM {} t WHERE {}",
                info.qualified(),
                info.key_predicate(2)
            );
            for row in found {
                let key = Key(info
                    .key_index
                    .iter()
                    .enumerate()
                    .map(|(n, &i)| info.kinds[i].read(&row, n))
                    .collect::<Result<_, _>>()?);
                let key_bytes = key.to_bytes();
                let known = load_owner(&mut tx, table, &key_bytes).await?;
                let Some(owner) = movable(table, (&info.key, &key), rule, known, me, all)? else {
                    continue;
                };
                store_owner(&mut tx, &info, &key_bytes, &key, &owner, Some(to)).await?;
                let mut query = sqlx::query(AssertSqlSafe(queue.as_str())).bind(table);
                for text in info
                    .texts(&info.key, &key.0.iter().collect::<Vec<_>>())
                    .map_err(anyhow::Error::msg)?
                {
                    query = query.bind(text);
                }
                query.execute(&mut *tx).await?;
                moved += 1;
            }
        }
        (None, None) => bail!("table `{table}` has neither owner_column nor owner_rule"),
    }
    sqlx::query(
        "INSERT INTO weft.transfers (tbl, \"rows\", moved, from_region, to_region, decided_by, at) \
         VALUES ($1, $2, $3, $4, $5, $6, weft.now_micros())",
    )
    .bind(table)
    .bind(rows)
    .bind(moved as i64)
    .bind(me)
    .bind(to)
    .bind(by)
    .execute(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(crate::store::postgres::schema::CHANNEL)
        .bind(table)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(moved)
}

/// The owner record of a row this region may move: `Ok(None)` to skip it under `--all`, or
/// why not (for a chosen key). `known`: the recorded owner and a transfer in progress.
fn movable(
    table: &str,
    (columns, key): (&[String], &Key),
    rule: &OwnerRule,
    known: Option<KnownOwner>,
    me: &str,
    all: bool,
) -> anyhow::Result<Option<Owner>> {
    if let Some(moving) = known.as_ref().and_then(|k| k.moving_to.as_ref()) {
        if all {
            return Ok(None);
        }
        bail!("{table} {key} is being transferred to {moving} already; wait for the sidecar to capture it");
    }
    let owner = match known {
        Some(known) => known.owner,
        None => Owner {
            region: rule_owner(rule, columns, key).unwrap_or_else(|| "no region".into()),
            epoch: 0,
        },
    };
    if owner.region != me {
        if all {
            return Ok(None);
        }
        bail!(
            "{table} {key} is owned by {}, not by {me}: run the transfer on a node of {}",
            owner.region,
            owner.region
        );
    }
    Ok(Some(owner))
}
