//! `weft dead-letters`: the events a node could not apply, with why. It parses and prints;
//! `store::admin` does the work on the node's database. The sidecar retries every dead
//! letter by itself, with backoff; `retry` makes letters due now (a running sidecar takes
//! them within seconds), `discard` gives them up for good.
use std::path::Path;

use super::age;
use crate::config::NodeConfig;
use crate::store::admin::{Admin, DeadLetter, Letters};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Every dead letter: origin and seq, table and key, reason, retries so far.
    List {
        #[arg(long)]
        json: bool,
        /// Only letters of this cause: `fenced` lists what forced ownership failovers
        /// discarded; others are `ownership`, `refused`, `shape`, `crdt`, `undecodable`,
        /// `not replicated`.
        #[arg(long)]
        cause: Option<String>,
    },
    /// One dead letter in full, with its event decoded.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Retry now (the running sidecar takes them at its next round, within 5 s).
    Retry {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<i64>,
        #[arg(long)]
        all: bool,
    },
    /// Give up events for good: they stay unapplied in this region.
    Discard {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<i64>,
        #[arg(long)]
        all: bool,
    },
}

pub async fn run(config_path: &Path, command: Command) -> anyhow::Result<()> {
    let config = NodeConfig::load(config_path)?;
    let admin = Admin::open(config).await?;
    let which = |ids: Vec<i64>, all: bool| if all { Letters::All } else { Letters::Ids(ids) };
    match command {
        Command::List { json, cause } => {
            let mut letters = admin.dead_letters(None).await?;
            letters.retain(|l| cause.as_ref().is_none_or(|c| *c == l.cause));
            list(&letters, json)
        }
        Command::Show { id, json } => {
            for letter in admin.dead_letters(Some(id)).await? {
                show(&letter, json)?;
            }
            Ok(())
        }
        Command::Retry { ids, all } => {
            let asked = which(ids, all);
            let n = admin.act_on_letters(&asked, false).await?;
            println!(
                "{n} dead letter(s) due now; the running sidecar retries them within 5 s (`weft dead-letters list` shows what is left)"
            );
            missing(&asked, n)
        }
        Command::Discard { ids, all } => {
            let asked = which(ids, all);
            let n = admin.act_on_letters(&asked, true).await?;
            println!("{n} dead letter(s) discarded; their changes stay unapplied in this region");
            missing(&asked, n)
        }
    }
}

/// An error if some of the ids asked for were not there.
fn missing(asked: &Letters, found: u64) -> anyhow::Result<()> {
    match asked {
        Letters::Ids(ids) if (ids.len() as u64) > found => anyhow::bail!(
            "{} of the ids given are not dead letters of this node; `weft dead-letters list` shows them",
            ids.len() as u64 - found
        ),
        _ => Ok(()),
    }
}

fn show(letter: &DeadLetter, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(letter)?);
        return Ok(());
    }
    println!(
        "dead letter {}: {} seq {}, {} {}",
        letter.id, letter.origin, letter.seq, letter.table, letter.key
    );
    println!("  cause:   {}", letter.cause);
    println!("  reason:  {}", letter.reason);
    println!("  age:     {}, {} retries", age(letter.at_micros), letter.attempts);
    println!("  event:   {}", letter.event);
    Ok(())
}

fn list(letters: &[DeadLetter], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(letters)?);
        return Ok(());
    }
    if letters.is_empty() {
        println!("no dead letters");
        return Ok(());
    }
    println!(
        "{:>4}  {:<12} {:>8}  {:<16} {:<20} {:>6} {:>7}  reason",
        "id", "origin", "seq", "table", "key", "age", "retries"
    );
    for l in letters {
        println!(
            "{:>4}  {:<12} {:>8}  {:<16} {:<20} {:>6} {:>7}  {}",
            l.id,
            l.origin,
            l.seq,
            l.table,
            l.key,
            age(l.at_micros),
            l.attempts,
            l.reason
        );
    }
    Ok(())
}
