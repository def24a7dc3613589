//! `weft conflicts`: the review tool for `queue` tables, and the audit of every conflict.
//!
//! It works on the node's database directly (SQLite or PostgreSQL), so it serves a running
//! node and a stopped one alike. A resolution is an ordinary application write of the chosen
//! row (captured like any write, so its version covers every sibling and it replicates and
//! closes the entry everywhere), recorded with who decided what, and when, in the
//! resolutions table (`_weft_resolutions`, `weft.resolutions`).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde_json::json;
use sqlx::{AssertSqlSafe, PgPool, SqlitePool};

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

/// The node's database, whichever store it is.
enum Db {
    Sqlite(SqlitePool),
    Pg(PgPool),
}

async fn open(config: &Path) -> anyhow::Result<(NodeConfig, Db)> {
    let config = NodeConfig::load(config)?;
    let db = match &config.database {
        Database::Sqlite(path) => {
            if !path.exists() {
                bail!("{}: no database there; is this the node's config?", path.display());
            }
            Db::Sqlite(crate::store::sqlite::app_pool(path).await?)
        }
        Database::Postgres(url) => {
            let pool = crate::store::postgres::PgStore::app_pool(url).await?;
            let installed: bool = sqlx::query_scalar("SELECT to_regclass('weft.queue') IS NOT NULL")
                .fetch_one(&pool)
                .await
                .context("reading the node's PostgreSQL database (is it up, and is the URL in the config right?)")?;
            if !installed {
                bail!("this database has no weft schema yet; start the node's sidecar once (weft run) first");
            }
            Db::Pg(pool)
        }
    };
    Ok((config, db))
}

struct Open {
    id: i64,
    table: String,
    key: Vec<u8>,
    key_text: String,
    opened_at: i64,
}

impl Db {
    /// Open entries, oldest first (or just `id`).
    async fn open_entries(&self, id: Option<i64>) -> anyhow::Result<Vec<Open>> {
        let (sqlite, pg) = (
            "SELECT id, tbl, key, key_text, opened_at FROM _weft_queue WHERE closed_at IS NULL AND (? IS NULL OR id = ?) ORDER BY id",
            "SELECT id, tbl, key, key_text, opened_at FROM weft.queue WHERE closed_at IS NULL AND ($1::int8 IS NULL OR id = $1) ORDER BY id",
        );
        let rows: Vec<(i64, String, Vec<u8>, String, i64)> = match self {
            Db::Sqlite(pool) => sqlx::query_as(sqlite).bind(id).bind(id).fetch_all(pool).await?,
            Db::Pg(pool) => sqlx::query_as(pg).bind(id).fetch_all(pool).await?,
        };
        Ok(rows
            .into_iter()
            .map(|(id, table, key, key_text, opened_at)| Open {
                id,
                table,
                key,
                key_text,
                opened_at,
            })
            .collect())
    }

    async fn open_conflict(&self, id: i64) -> anyhow::Result<Open> {
        self.open_entries(Some(id))
            .await?
            .pop()
            .with_context(|| format!("no open conflict {id}; `weft conflicts list` shows the open ones"))
    }

    async fn siblings(&self, table: &str, key: &[u8]) -> anyhow::Result<Vec<Event>> {
        Ok(match self {
            Db::Sqlite(pool) => siblings(&mut *pool.acquire().await?, table, key).await?,
            Db::Pg(pool) => crate::store::postgres::rows::siblings(&mut *pool.acquire().await?, table, key).await?,
        })
    }

    /// The table's columns and primary-key columns.
    async fn columns(&self, table: &str) -> anyhow::Result<(Vec<String>, Vec<String>)> {
        Ok(match self {
            Db::Sqlite(pool) => {
                let info = schema::describe(&mut *pool.acquire().await?, table).await?;
                (info.columns, info.key)
            }
            Db::Pg(pool) => {
                let info = crate::store::postgres::schema::describe(&mut *pool.acquire().await?, table).await?;
                (info.columns, info.key)
            }
        })
    }

    /// (resolved by people, resolved automatically) as rows of JSON.
    async fn history(&self) -> anyhow::Result<(Vec<serde_json::Value>, Vec<serde_json::Value>)> {
        let (resolutions, conflicts) = match self {
            Db::Sqlite(_) => ("_weft_resolutions", "_weft_conflicts"),
            Db::Pg(_) => ("weft.resolutions", "weft.conflicts"),
        };
        let resolved_sql =
            format!("SELECT queue_id, tbl, key_text, decided_by, decision, at FROM {resolutions} ORDER BY id");
        let automatic_sql = format!("SELECT id, tbl, key, strategy, winner, loser, at FROM {conflicts} ORDER BY id");
        type Resolved = (i64, String, String, String, String, i64);
        type Automatic = (i64, String, String, String, String, String, i64);
        let (resolved, automatic): (Vec<Resolved>, Vec<Automatic>) = match self {
            Db::Sqlite(pool) => (
                sqlx::query_as(AssertSqlSafe(resolved_sql)).fetch_all(pool).await?,
                sqlx::query_as(AssertSqlSafe(automatic_sql)).fetch_all(pool).await?,
            ),
            Db::Pg(pool) => (
                sqlx::query_as(AssertSqlSafe(resolved_sql)).fetch_all(pool).await?,
                sqlx::query_as(AssertSqlSafe(automatic_sql)).fetch_all(pool).await?,
            ),
        };
        let parse = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap_or_default();
        Ok((
            resolved
                .into_iter()
                .map(|r| json!({"conflict": r.0, "table": r.1, "key": r.2, "decided_by": r.3, "decision": r.4, "at_micros": r.5}))
                .collect(),
            automatic
                .into_iter()
                .map(|r| json!({"id": r.0, "table": r.1, "key": r.2, "strategy": r.3, "winner": parse(&r.4), "loser": parse(&r.5), "at_micros": r.6}))
                .collect(),
        ))
    }
}

fn region_of(config: &NodeConfig, node: &str) -> String {
    config
        .topology
        .node(node)
        .map(|n| n.region.clone())
        .unwrap_or_else(|| node.to_owned())
}

fn age(since_micros: i64) -> String {
    let seconds = (crate::clock::now_micros() - since_micros).max(0) / 1_000_000;
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
    let (config, db) = open(config_path).await?;
    match command {
        Command::List { json } => {
            let mut out = Vec::new();
            for open in db.open_entries(None).await? {
                let set = db.siblings(&open.table, &open.key).await?;
                let mut regions: Vec<String> = set.iter().map(|s| region_of(&config, &s.origin)).collect();
                regions.sort();
                regions.dedup();
                out.push(json!({
                    "id": open.id, "table": open.table, "key": open.key_text,
                    "siblings": set.len(), "age": age(open.opened_at), "opened_at_micros": open.opened_at, "regions": regions,
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
                        .into_iter()
                        .flatten()
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
            let open = db.open_conflict(id).await?;
            let set = db.siblings(&open.table, &open.key).await?;
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
            let (columns, _) = db.columns(&open.table).await?;
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
            for column in &columns {
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
            let open = db.open_conflict(id).await?;
            let set = db.siblings(&open.table, &open.key).await?;
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
                    let (_, key) = db.columns(&open.table).await?;
                    for (i, k) in key.iter().enumerate() {
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
            match &db {
                Db::Sqlite(pool) => {
                    write_resolution(&mut *pool.acquire().await?, &open, any, &op, &by, &decision).await?
                }
                Db::Pg(pool) => write_resolution_pg(pool, &open, any, &op, &by, &decision).await?,
            }
            println!(
                "conflict {id} on {} {}: {decision}, by {by}. The write replicates and closes it in every region.",
                open.table, open.key_text
            );
        }
        Command::History { json } => {
            let (resolved, automatic) = db.history().await?;
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

/// The resolution on PostgreSQL: the chosen row written as an application write (captured by
/// the triggers), each value cast to its column's type, with its audit record, in one
/// transaction.
async fn write_resolution_pg(
    pool: &PgPool,
    open: &Open,
    any: &Event,
    op: &Op,
    by: &str,
    decision: &str,
) -> anyhow::Result<()> {
    use crate::store::postgres::schema::{describe, quote};
    use sqlx::Connection as _;
    let mut conn = pool.acquire().await?;
    let table = describe(&mut conn, &open.table).await?;
    let mut tx = conn.begin().await?;
    let key_values: Vec<&Value> = any.key.0.iter().collect();
    let key_texts = table
        .texts(&table.key, &key_values)
        .map_err(|e| anyhow::anyhow!("conflict {} key: {e}", open.id))?;
    match op {
        Op::Delete => {
            let sql = format!("DELETE FROM {} t WHERE {}", table.qualified(), table.key_predicate(1));
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for text in key_texts {
                q = q.bind(text);
            }
            q.execute(&mut *tx).await?;
        }
        Op::Upsert(row) => {
            let columns: Vec<String> = row.0.iter().map(|(c, _)| c.clone()).collect();
            let texts = table
                .texts(&columns, &row.0.iter().map(|(_, v)| v).collect::<Vec<_>>())
                .map_err(|e| anyhow::anyhow!("{e}; fix the row and resolve again"))?;
            let values = columns
                .iter()
                .enumerate()
                .map(|(i, c)| format!("${}::text::{}", i + 1, table.type_of(c).unwrap_or("text")))
                .collect::<Vec<_>>()
                .join(", ");
            let updates = columns
                .iter()
                .map(|c| format!("{0} = excluded.{0}", quote(c)))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "INSERT INTO {} ({}) VALUES ({values}) ON CONFLICT ({}) DO UPDATE SET {updates}",
                table.qualified(),
                columns.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", "),
                table.key.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ")
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for text in texts {
                q = q.bind(text);
            }
            q.execute(&mut *tx)
                .await
                .with_context(|| format!("writing the resolution of conflict {}", open.id))?;
        }
    }
    sqlx::query(
        "INSERT INTO weft.resolutions (queue_id, tbl, key_text, decided_by, decision, \"row\", at) \
         VALUES ($1, $2, $3, $4, $5, $6, weft.now_micros())",
    )
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
