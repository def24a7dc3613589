//! `weft conflicts`: the review tool for `queue` tables, and the audit of every conflict.
//!
//! It works on the node's database directly, so it serves a running node and a stopped one
//! alike. A resolution is an ordinary application write of the chosen row (captured like any
//! write, so its version covers every sibling and it replicates and closes the entry
//! everywhere), recorded with who decided what, and when, in `_weft_resolutions`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde_json::json;
use sqlx::{AssertSqlSafe, Row as _, SqlitePool};

use crate::config::{Database, NodeConfig};
use crate::event::{Event, Op, Value};
use crate::store::sqlite::queue::siblings;
use crate::store::sqlite::schema::{self, quote};
use crate::store::sqlite::values::bind;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Open conflicts: table, key, siblings, age, regions involved.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One conflict's siblings side by side; differing columns are marked.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Resolve a conflict with one sibling (`--take N`, as numbered by `show`) or with a row
    /// of your own (`--edit FILE`, a JSON object of column values).
    Resolve {
        id: i64,
        #[arg(long, conflicts_with = "edit", required_unless_present = "edit")]
        take: Option<usize>,
        #[arg(long)]
        edit: Option<PathBuf>,
        /// Who decides (default: $USER).
        #[arg(long)]
        by: Option<String>,
    },
    /// Resolved conflicts and every conflict resolved automatically (LWW, CRDT).
    History {
        #[arg(long)]
        json: bool,
    },
}

async fn open(config: &Path) -> anyhow::Result<(NodeConfig, SqlitePool)> {
    let config = NodeConfig::load(config)?;
    let Database::Sqlite(path) = &config.database else {
        anyhow::bail!("this command works on SQLite regions so far; on PostgreSQL only LWW tables replicate yet");
    };
    if !path.exists() {
        bail!("{}: no database there; is this the node's config?", path.display());
    }
    let pool = crate::loopback::app_pool(path).await?;
    Ok((config, pool))
}

struct Open {
    id: i64,
    table: String,
    key: Vec<u8>,
    key_text: String,
    opened_at: i64,
}

async fn open_conflict(pool: &SqlitePool, id: i64) -> anyhow::Result<Open> {
    let row =
        sqlx::query("SELECT id, tbl, key, key_text, opened_at FROM _weft_queue WHERE id = ? AND closed_at IS NULL")
            .bind(id)
            .fetch_optional(pool)
            .await?
            .with_context(|| format!("no open conflict {id}; `weft conflicts list` shows the open ones"))?;
    Ok(Open {
        id: row.try_get(0)?,
        table: row.try_get(1)?,
        key: row.try_get(2)?,
        key_text: row.try_get(3)?,
        opened_at: row.try_get(4)?,
    })
}

fn region_of(config: &NodeConfig, node: &str) -> String {
    config
        .topology
        .node(node)
        .map(|n| n.region.clone())
        .unwrap_or_else(|| node.to_owned())
}

fn age(since_micros: i64) -> String {
    let seconds = (crate::telemetry::now_micros() - since_micros).max(0) / 1_000_000;
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

fn sibling_json(config: &NodeConfig, n: usize, s: &Event) -> serde_json::Value {
    json!({
        "sibling": n,
        "origin": s.origin,
        "region": region_of(config, &s.origin),
        "hlc": s.hlc.to_string(),
        "version": serde_json::from_str::<serde_json::Value>(&s.version.to_json()).unwrap_or_default(),
        "deleted": s.op.is_delete(),
        "row": s.op.to_json(),
    })
}

pub async fn run(config_path: &Path, command: Command) -> anyhow::Result<()> {
    let (config, pool) = open(config_path).await?;
    let mut conn = pool.acquire().await?;
    match command {
        Command::List { json } => {
            let rows = sqlx::query(
                "SELECT id, tbl, key, key_text, opened_at FROM _weft_queue WHERE closed_at IS NULL ORDER BY id",
            )
            .fetch_all(&mut *conn)
            .await?;
            let mut out = Vec::new();
            for row in rows {
                let (table, key): (String, Vec<u8>) = (row.try_get(1)?, row.try_get(2)?);
                let set = siblings(&mut conn, &table, &key).await?;
                let mut regions: Vec<String> = set.iter().map(|s| region_of(&config, &s.origin)).collect();
                regions.sort();
                regions.dedup();
                let opened: i64 = row.try_get(4)?;
                out.push(json!({
                    "id": row.try_get::<i64, _>(0)?, "table": table, "key": row.try_get::<String, _>(3)?,
                    "siblings": set.len(), "age": age(opened), "opened_at_micros": opened, "regions": regions,
                }));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else if out.is_empty() {
                println!("no open conflicts");
            } else {
                println!(
                    "{:>4}  {:<16} {:<20} {:>8}  {:>6}  regions",
                    "id", "table", "key", "siblings", "age"
                );
                for c in &out {
                    let regions: Vec<&str> = c["regions"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter_map(|r| r.as_str())
                        .collect();
                    println!(
                        "{:>4}  {:<16} {:<20} {:>8}  {:>6}  {}",
                        c["id"].as_i64().unwrap_or(0),
                        c["table"].as_str().unwrap_or(""),
                        c["key"].as_str().unwrap_or(""),
                        c["siblings"].as_u64().unwrap_or(0),
                        c["age"].as_str().unwrap_or(""),
                        regions.join(", ")
                    );
                }
            }
        }
        Command::Show { id, json } => {
            let open = open_conflict(&pool, id).await?;
            let set = siblings(&mut conn, &open.table, &open.key).await?;
            if json {
                let siblings: Vec<_> = set
                    .iter()
                    .enumerate()
                    .map(|(i, s)| sibling_json(&config, i + 1, s))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "id": open.id, "table": open.table, "key": open.key_text, "age": age(open.opened_at), "siblings": siblings,
                    }))?
                );
                return Ok(());
            }
            println!(
                "conflict {} on {} {} (open for {})\n",
                open.id,
                open.table,
                open.key_text,
                age(open.opened_at)
            );
            let info = schema::describe(&mut conn, &open.table).await?;
            let cell = |s: &Event, column: &str| match &s.op {
                Op::Delete => "(deleted)".to_owned(),
                Op::Upsert(row) => row.get(column).map(Value::to_string).unwrap_or_default(),
            };
            let width = 24;
            print!("  {:<16}", "");
            for (i, s) in set.iter().enumerate() {
                print!(
                    " | {:<width$}",
                    format!("{}: {} ({})", i + 1, s.origin, region_of(&config, &s.origin))
                );
            }
            println!();
            print!("  {:<16}", "hlc");
            for s in &set {
                print!(" | {:<width$}", s.hlc.to_string());
            }
            println!();
            for column in &info.columns {
                let values: Vec<String> = set.iter().map(|s| cell(s, column)).collect();
                let differs = values.windows(2).any(|w| w[0] != w[1]);
                print!("{} {:<16}", if differs { "*" } else { " " }, column);
                for v in &values {
                    let v: String = v.chars().take(width).collect();
                    print!(" | {v:<width$}");
                }
                println!();
            }
            println!(
                "\n* differs. Resolve with: weft conflicts --config {} resolve {} --take N",
                config_path.display(),
                open.id
            );
        }
        Command::Resolve { id, take, edit, by } => {
            let open = open_conflict(&pool, id).await?;
            let set = siblings(&mut conn, &open.table, &open.key).await?;
            let Some(any) = set.first() else {
                bail!("conflict {id} has no siblings left")
            };
            let (op, decision) = match (take, &edit) {
                (Some(n), _) => {
                    let s = set
                        .get(n.wrapping_sub(1))
                        .with_context(|| format!("conflict {id} has siblings 1 to {}", set.len()))?;
                    (
                        s.op.clone(),
                        format!("took sibling {n} (origin {}, hlc {})", s.origin, s.hlc),
                    )
                }
                (None, Some(file)) => {
                    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
                    let object: BTreeMap<String, serde_json::Value> = serde_json::from_str(&text)
                        .with_context(|| format!("{}: expected a JSON object of column values", file.display()))?;
                    let mut row: Vec<(String, Value)> = object
                        .into_iter()
                        .map(|(c, v)| Ok((c, json_value(&v)?)))
                        .collect::<anyhow::Result<_>>()?;
                    let info = schema::describe(&mut conn, &open.table).await?;
                    for (i, k) in info.key.iter().enumerate() {
                        row.retain(|(c, _)| c != k);
                        row.push((k.clone(), any.key.0[i].clone()));
                    }
                    (
                        Op::Upsert(crate::event::Row(row)),
                        format!("edited from {}", file.display()),
                    )
                }
                (None, None) => bail!("say --take N or --edit FILE"),
            };
            let by = by
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "unknown".into());
            write_resolution(&mut conn, &open, any, &op, &by, &decision).await?;
            println!(
                "conflict {id} on {} {}: {decision}, by {by}. The write replicates and closes it in every region.",
                open.table, open.key_text
            );
        }
        Command::History { json } => {
            let resolved = sqlx::query(
                "SELECT queue_id, tbl, key_text, decided_by, decision, at FROM _weft_resolutions ORDER BY id",
            )
            .fetch_all(&mut *conn)
            .await?;
            let automatic =
                sqlx::query("SELECT id, tbl, key, strategy, winner, loser, at FROM _weft_conflicts ORDER BY id")
                    .fetch_all(&mut *conn)
                    .await?;
            let resolved: Vec<_> = resolved.iter().map(|r| json!({
                "conflict": r.get::<i64, _>(0), "table": r.get::<String, _>(1), "key": r.get::<String, _>(2),
                "decided_by": r.get::<String, _>(3), "decision": r.get::<String, _>(4), "at_micros": r.get::<i64, _>(5),
            })).collect();
            let automatic: Vec<_> = automatic.iter().map(|r| json!({
                "id": r.get::<i64, _>(0), "table": r.get::<String, _>(1), "key": r.get::<String, _>(2), "strategy": r.get::<String, _>(3),
                "winner": serde_json::from_str::<serde_json::Value>(&r.get::<String, _>(4)).unwrap_or_default(),
                "loser": serde_json::from_str::<serde_json::Value>(&r.get::<String, _>(5)).unwrap_or_default(),
                "at_micros": r.get::<i64, _>(6),
            })).collect();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({ "resolved": resolved, "automatic": automatic }))?
                );
            } else {
                println!("resolved by people: {}", resolved.len());
                for r in &resolved {
                    println!(
                        "  conflict {} {} {}: {}, by {}",
                        r["conflict"],
                        r["table"].as_str().unwrap_or(""),
                        r["key"].as_str().unwrap_or(""),
                        r["decision"].as_str().unwrap_or(""),
                        r["decided_by"].as_str().unwrap_or("")
                    );
                }
                println!("resolved automatically: {}", automatic.len());
                for c in automatic.iter().rev().take(20) {
                    println!(
                        "  {} {} {} ({}): kept {} over {}",
                        age(c["at_micros"].as_i64().unwrap_or(0)),
                        c["table"].as_str().unwrap_or(""),
                        c["key"].as_str().unwrap_or(""),
                        c["strategy"].as_str().unwrap_or(""),
                        c["winner"]["origin"].as_str().unwrap_or("?"),
                        c["loser"]["origin"].as_str().unwrap_or("?")
                    );
                }
            }
        }
    }
    Ok(())
}

/// A JSON value from `--edit`, as a typed column value (`{"blob": "hex"}` for bytes).
fn json_value(value: &serde_json::Value) -> anyhow::Result<Value> {
    Ok(match value {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Integer(i64::from(*b)),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Real(n.as_f64().context("number out of range")?),
        },
        serde_json::Value::String(s) => Value::Text(s.clone()),
        serde_json::Value::Object(o) if o.len() == 1 && o.contains_key("blob") => {
            let hex = o["blob"].as_str().context("blob must be a hex string")?;
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
                .collect::<Result<Vec<u8>, _>>()
                .context("blob must be a hex string")?;
            Value::Blob(bytes)
        }
        other => bail!("{other} is not a column value; use a number, a string, null or {{\"blob\": \"hex\"}}"),
    })
}

/// The resolution: the chosen row written like any application write, with its audit record.
async fn write_resolution(
    conn: &mut sqlx::SqliteConnection,
    open: &Open,
    any: &Event,
    op: &Op,
    by: &str,
    decision: &str,
) -> anyhow::Result<()> {
    use sqlx::Connection as _;
    let info = schema::describe(conn, &open.table).await?;
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let table = quote(&open.table);
    let keys = schema::key_predicate(&info.key);
    match op {
        Op::Delete => {
            let mut q = sqlx::query(AssertSqlSafe(format!("DELETE FROM {table} WHERE {keys}")));
            for v in &any.key.0 {
                q = bind(q, v);
            }
            q.execute(&mut *tx).await?;
        }
        Op::Upsert(row) => {
            let names = row.0.iter().map(|(c, _)| quote(c)).collect::<Vec<_>>().join(", ");
            let updates = row
                .0
                .iter()
                .map(|(c, _)| format!("{0} = excluded.{0}", quote(c)))
                .collect::<Vec<_>>()
                .join(", ");
            let conflict_keys = info.key.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ");
            let sql = format!(
                "INSERT INTO {table} ({names}) VALUES ({}) ON CONFLICT ({conflict_keys}) DO UPDATE SET {updates}",
                vec!["?"; row.0.len()].join(", ")
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for (_, v) in &row.0 {
                q = bind(q, v);
            }
            q.execute(&mut *tx).await?;
        }
    }
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO _weft_resolutions (queue_id, tbl, key_text, decided_by, decision, row, at) VALUES (?, ?, ?, ?, ?, ?, {})",
        schema::NOW_MICROS
    )))
    .bind(open.id)
    .bind(&open.table)
    .bind(&open.key_text)
    .bind(by)
    .bind(decision)
    .bind(op.to_json().to_string())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}
