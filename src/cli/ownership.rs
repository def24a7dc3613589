//! `weft ownership transfer`: move rows of an ownership table to another region.
//!
//! Run it on the current owner's node. The transfer is an ordinary write of the owner column
//! (allowed by the capture trigger only inside this command's transaction), so it replicates
//! like data; the drain numbers it as the row's next epoch. Afterwards the old owner's writes
//! are refused at its source, and anywhere else if they are sent at all.
use anyhow::{Context as _, bail};
use sqlx::{AssertSqlSafe, Connection as _};

use crate::config::{Database, NodeConfig, Strategy};
use crate::event::Value;
use crate::store::sqlite::schema::{self, NOW_MICROS, quote};
use crate::store::sqlite::values::bind;

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
    let (Strategy::Ownership, Some(column)) = (table_config.strategy, &table_config.owner_column) else {
        bail!("table `{table}` is not an ownership table (strategy = \"ownership\", owner_column = ...)");
    };
    if !config.topology.nodes.iter().any(|n| n.region == to) {
        bail!("`{to}` is not a region of this mesh");
    }
    let me = config.region().to_owned();
    if to == me {
        bail!("this node is in `{to}` already");
    }
    let Database::Sqlite(path) = &config.database;
    let pool = crate::loopback::app_pool(path).await?;
    let mut conn = pool.acquire().await?;
    let info = schema::describe(&mut conn, &table).await?;
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    sqlx::query("INSERT INTO _weft_transfer (marker) VALUES (1)")
        .execute(&mut *tx)
        .await?;
    let set = format!("UPDATE {} SET {} = ?", quote(&table), quote(column));
    let mut moved = 0;
    if all {
        moved = sqlx::query(AssertSqlSafe(format!("{set} WHERE {} = ?", quote(column))))
            .bind(&to)
            .bind(&me)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    } else {
        let predicate = schema::key_predicate(&info.key);
        for key in &keys {
            let values = key_values(key, info.key.len())?;
            let mut query = sqlx::query(AssertSqlSafe(format!("{set} WHERE {predicate}"))).bind(&to);
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
    }
    sqlx::query("DELETE FROM _weft_transfer").execute(&mut *tx).await?;
    let by = by
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into());
    let rows = if all {
        format!("all rows of {me}")
    } else {
        keys.join(", ")
    };
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO _weft_transfers (tbl, rows, moved, from_region, to_region, decided_by, at) VALUES (?, ?, ?, ?, ?, ?, {NOW_MICROS})"
    )))
    .bind(&table)
    .bind(&rows)
    .bind(moved as i64)
    .bind(&me)
    .bind(&to)
    .bind(&by)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    println!(
        "moved {moved} {table} row(s) ({rows}) from {me} to {to}, by {by}; the transfer replicates like any write"
    );
    Ok(())
}
