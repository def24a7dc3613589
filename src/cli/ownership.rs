//! `weft ownership transfer`: move rows of an ownership table to another region. It parses
//! and prints; `store::admin` does the transfer (see its contract), on the current owner's
//! node, SQLite or PostgreSQL. Afterwards the old owner's writes are refused at its source,
//! and anywhere else if they are sent at all.
use super::input::parse_key;
use crate::config::NodeConfig;
use crate::store::admin::{Admin, Transfer};

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

pub async fn run(config_path: &std::path::Path, command: Command) -> anyhow::Result<()> {
    let config = NodeConfig::load(config_path)?;
    let Command::Transfer {
        table,
        keys,
        all,
        to,
        by,
    } = command;
    if !config.tables.iter().any(|t| t.name == table) {
        anyhow::bail!("table `{table}` is not in {}", config_path.display());
    }
    let me = config.region().to_owned();
    let admin = Admin::open(config).await?;
    let rows = match all {
        true => format!("all rows of {me}"),
        false => keys.join(", "),
    };
    let keys = match all {
        true => None,
        false => {
            let width = admin.key_width(&table).await?;
            let parsed = keys.iter().map(|k| parse_key(k, width));
            Some(parsed.collect::<Result<Vec<_>, _>>()?)
        }
    };
    let transfer = Transfer {
        table: table.clone(),
        keys,
        to: to.clone(),
        by: super::decided_by(by),
        asked: rows.clone(),
    };
    let moved = admin.transfer(&transfer).await?;
    println!(
        "moved {moved} {table} row(s) ({rows}) from {me} to {to}, by {}; the transfer replicates like any write",
        transfer.by
    );
    Ok(())
}
