//! `weft conflicts`: the review tool for `queue` tables, and the audit of every conflict.
//! It parses and prints; `store::admin` does the work, on the node's database directly, so
//! it serves a running node and a stopped one alike.
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::age;
use super::input::parse_row;
use crate::config::NodeConfig;
use crate::event::{Event, Op, Value};
use crate::store::admin::{Admin, Choice, History, OpenConflict};

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

/// An open conflict as `list` shows it.
#[derive(serde::Serialize)]
struct Listed {
    id: i64,
    table: String,
    key: String,
    siblings: usize,
    age: String,
    opened_at_micros: i64,
    regions: Vec<String>,
}

pub async fn run(config_path: &Path, command: Command) -> anyhow::Result<()> {
    let config = NodeConfig::load(config_path)?;
    let admin = Admin::open(config.clone()).await?;
    match command {
        Command::List { json } => list(&config, &admin, json).await,
        Command::Show { id, json } => show(&config, &admin, id, json, config_path).await,
        Command::Resolve { id, take, edit, by } => {
            let choice = match (take, edit) {
                (Some(n), _) => Choice::Take(n),
                (None, Some(file)) => {
                    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
                    let source = file.display().to_string();
                    Choice::Edit {
                        row: parse_row(&text, &source)?,
                        source,
                    }
                }
                (None, None) => anyhow::bail!("say --take N or --edit FILE"),
            };
            let by = super::decided_by(by);
            let resolved = admin.resolve(id, choice, &by).await?;
            println!(
                "conflict {id} on {} {}: {}, by {by}. The write replicates and closes it in every region.",
                resolved.table, resolved.key, resolved.decision
            );
            Ok(())
        }
        Command::History { json } => history(&admin.history(None).await?, json),
    }
}

async fn list(config: &NodeConfig, admin: &Admin, json: bool) -> anyhow::Result<()> {
    let listed: Vec<Listed> = admin
        .open_conflicts()
        .await?
        .into_iter()
        .map(|c| {
            let mut regions: Vec<String> = c.siblings.iter().map(|s| region_of(config, &s.origin)).collect();
            regions.sort();
            regions.dedup();
            Listed {
                id: c.id,
                siblings: c.siblings.len(),
                age: age(c.opened_at_micros),
                opened_at_micros: c.opened_at_micros,
                table: c.table,
                key: c.key_text,
                regions,
            }
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&listed)?);
    } else if listed.is_empty() {
        println!("no open conflicts");
    } else {
        println!(
            "{:>4}  {:<16} {:<20} {:>8}  {:>6}  regions",
            "id", "table", "key", "siblings", "age"
        );
        for c in &listed {
            println!(
                "{:>4}  {:<16} {:<20} {:>8}  {:>6}  {}",
                c.id,
                c.table,
                c.key,
                c.siblings,
                c.age,
                c.regions.join(", ")
            );
        }
    }
    Ok(())
}

async fn show(config: &NodeConfig, admin: &Admin, id: i64, json: bool, config_path: &Path) -> anyhow::Result<()> {
    let open = admin.conflict(id).await?;
    if json {
        let siblings: Vec<_> = open
            .siblings
            .iter()
            .enumerate()
            .map(|(i, s)| sibling_json(config, i + 1, s))
            .collect();
        let shown = serde_json::json!({
            "id": open.id, "table": open.table, "key": open.key_text, "age": age(open.opened_at_micros), "siblings": siblings,
        });
        println!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(());
    }
    println!(
        "conflict {} on {} {} (open for {})\n",
        open.id,
        open.table,
        open.key_text,
        age(open.opened_at_micros)
    );
    side_by_side(config, &open);
    println!(
        "\n* differs. Resolve with: weft conflicts --config {} resolve {} --take N",
        config_path.display(),
        open.id
    );
    Ok(())
}

/// The siblings in columns, one line per table column; differing columns marked `*`.
fn side_by_side(config: &NodeConfig, open: &OpenConflict) {
    let cell = |s: &Event, column: &str| match &s.op {
        Op::Delete => "(deleted)".to_owned(),
        Op::Undecodable { .. } => "(undecodable)".to_owned(),
        Op::Upsert(row) => row.get(column).map(Value::to_string).unwrap_or_default(),
    };
    let width = 24;
    print!("  {:<16}", "");
    for (i, s) in open.siblings.iter().enumerate() {
        let title = format!("{}: {} ({})", i + 1, s.origin, region_of(config, &s.origin));
        print!(" | {title:<width$}");
    }
    println!();
    print!("  {:<16}", "hlc");
    for s in &open.siblings {
        print!(" | {:<width$}", s.hlc.to_string());
    }
    println!();
    for column in &open.columns {
        let values: Vec<String> = open.siblings.iter().map(|s| cell(s, column)).collect();
        let differs = values.windows(2).any(|w| w[0] != w[1]);
        print!("{} {:<16}", if differs { "*" } else { " " }, column);
        for v in &values {
            let v: String = v.chars().take(width).collect();
            print!(" | {v:<width$}");
        }
        println!();
    }
}

fn history(history: &History, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(history)?);
        return Ok(());
    }
    println!("resolved by people: {}", history.resolved.len());
    for r in &history.resolved {
        println!(
            "  conflict {} {} {}: {}, by {}",
            r.queue_id, r.table, r.key, r.decision, r.decided_by
        );
    }
    println!("resolved automatically: {}", history.automatic.len());
    for c in history.automatic.iter().rev().take(20) {
        println!(
            "  {} {} {} ({}): kept {} over {}",
            age(c.at_micros),
            c.table,
            c.key,
            c.strategy,
            c.winner["origin"].as_str().unwrap_or("?"),
            c.loser["origin"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

fn region_of(config: &NodeConfig, node: &str) -> String {
    config
        .topology
        .node(node)
        .map(|n| n.region.clone())
        .unwrap_or_else(|| node.to_owned())
}

fn sibling_json(config: &NodeConfig, n: usize, s: &Event) -> serde_json::Value {
    serde_json::json!({
        "sibling": n,
        "origin": s.origin,
        "region": region_of(config, &s.origin),
        "hlc": s.hlc.to_string(),
        "version": serde_json::from_str::<serde_json::Value>(&s.version.to_json()).unwrap_or_default(),
        "deleted": s.op.is_delete(),
        "row": s.op.to_json(),
    })
}
