//! `weft ownership transfer`: move rows of an ownership table to another region, on the
//! current owner's node. `weft ownership failover`: when an owner region is lost, move its
//! rows from a surviving node, fenced by epoch (see `resolve::ownership`). Both parse and
//! print; `store::admin` does the work (see its contract), SQLite or PostgreSQL. Afterwards
//! the old owner's writes are refused at its source once it knows, and anywhere else if they
//! are sent at all; after a failover, the writes it made without knowing are fenced dead
//! letters in every region (`weft dead-letters list --cause fenced`).
use super::input::parse_key;
use crate::config::NodeConfig;
use crate::store::admin::{Admin, Failover, Transfer};

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
    /// Move every row a lost region owns (or one table's) to another region, from a node of
    /// a surviving region. The rows' claims jump to the next term: whatever the lost region
    /// wrote and had not replicated is refused when it returns, listed as fenced dead letters.
    Failover {
        /// The lost region.
        #[arg(long)]
        from: String,
        /// The region that owns the rows afterwards.
        #[arg(long)]
        to: String,
        #[arg(long)]
        table: Option<String>,
        #[arg(long)]
        by: Option<String>,
    },
}

pub async fn run(config_path: &std::path::Path, command: Command) -> anyhow::Result<()> {
    let config = NodeConfig::load(config_path)?;
    let (table, keys, all, to, by) = match command {
        Command::Transfer {
            table,
            keys,
            all,
            to,
            by,
        } => (table, keys, all, to, by),
        Command::Failover { from, to, table, by } => {
            let failover = Failover {
                from,
                to,
                table,
                by: super::decided_by(by),
            };
            return fail_over(config, &failover).await;
        }
    };
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

async fn fail_over(config: NodeConfig, failover: &Failover) -> anyhow::Result<()> {
    let me = config.region().to_owned();
    let admin = Admin::open(config).await?;
    let moved = admin.failover(failover).await?;
    let total: u64 = moved.iter().map(|(_, n)| n).sum();
    let tables = moved
        .iter()
        .map(|(t, n)| format!("{t}: {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "fenced {total} row(s) of {} over to {} from {me} ({tables}), by {}; the rows accept writes in {} once this replicates there, and what {} wrote without knowing is refused when it returns (`weft dead-letters list --cause fenced`)",
        failover.from, failover.to, failover.by, failover.to, failover.from
    );
    Ok(())
}
