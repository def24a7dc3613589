//! The `weft` command line: argument parsing and the commands' top level.
//!
//! Errors reach the user through `anyhow` here only; each says what failed and what to do.
mod audit;
mod certs;
mod conflicts;
mod dead_letters;
mod input;
mod ownership;
mod topology;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::config::NodeConfig;
use crate::node::Node;
use crate::store::Store;

#[derive(Parser, Debug)]
#[command(name = "weft", version, about = "Active-active multi-region replication mesh")]
pub struct Cli {
    /// How log lines are written to standard error: `text` for people, `json` (one object
    /// per line: timestamp, level, target, message and fields) for log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "WEFT_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run one sidecar until Ctrl-C or SIGTERM (then drain, wait for acks, exit).
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Three regions on loopback with a concurrent workload, a region restart, and a
    /// convergence check. Exits non-zero if the regions do not converge.
    #[cfg(feature = "harness")]
    Demo(crate::harness::demo::Args),
    /// A disaster-recovery drill on loopback: kill a region under load, fail its rows over,
    /// measure RPO and RTO, bring it back, check convergence. Exits non-zero on a failure.
    #[cfg(feature = "harness")]
    Drill(crate::harness::drill::Args),
    /// Measure end-to-end throughput and capture-to-apply lag on loopback.
    #[cfg(feature = "harness")]
    Bench(crate::harness::bench::Args),
    /// Review and resolve conflicts of `queue` tables; audit every resolved conflict.
    Conflicts {
        #[arg(long)]
        config: PathBuf,
        #[command(subcommand)]
        command: conflicts::Command,
    },
    /// Events this node could not apply: list, show, retry now, discard.
    DeadLetters {
        #[arg(long)]
        config: PathBuf,
        #[command(subcommand)]
        command: dead_letters::Command,
    },
    /// Move rows of an ownership table to another region.
    Ownership {
        #[arg(long)]
        config: PathBuf,
        #[command(subcommand)]
        command: ownership::Command,
    },
    /// Compare every replicated table between the nodes of the mesh by checksums; print the
    /// rows that differ, and with `--repair` re-emit each winner. Exit 1 if any differ.
    Audit(audit::Args),
    /// Make a mesh CA and a certificate per node of a topology, for mutual TLS.
    Certs(certs::Args),
    /// Validate a topology file and prove its routes, or draw it.
    Topology {
        #[command(subcommand)]
        command: TopologyCommand,
    },
    /// Replication state read from a node's database: frontiers, backlog, RPO exposure.
    Status {
        #[arg(long)]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum TopologyCommand {
    /// Parse and validate FILE, prove every node gets every other node's events exactly
    /// once, print routes and hop counts; exit non-zero on any defect. With `--against OLD`,
    /// also say what changing a running mesh from OLD to FILE does.
    Check {
        file: PathBuf,
        #[arg(long, value_name = "OLD")]
        against: Option<PathBuf>,
        /// With `--against`: the config of a node that remains, whose database says how far
        /// each remaining node has the events of the nodes that leave.
        #[arg(long, value_name = "NODE_CONFIG", requires = "against")]
        config: Option<PathBuf>,
    },
    /// Draw the graph of FILE in the terminal.
    Show { file: PathBuf },
}

impl Command {
    /// The log filter when `RUST_LOG` is unset: the loopback commands print their own
    /// progress, so their nodes only speak up on trouble.
    pub fn default_log_filter(&self) -> &'static str {
        match self {
            #[cfg(feature = "harness")]
            Command::Demo(_) | Command::Bench(_) | Command::Drill(_) => "weft=error",
            _ => "weft=info",
        }
    }
}

pub async fn main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => run(config).await,
        #[cfg(feature = "harness")]
        Command::Demo(args) => crate::harness::demo::run(args).await,
        #[cfg(feature = "harness")]
        Command::Drill(args) => crate::harness::drill::run(args).await,
        #[cfg(feature = "harness")]
        Command::Bench(args) => crate::harness::bench::run(args).await,
        Command::Status { config, json } => status(config, json).await,
        Command::Audit(args) => audit::run(args).await,
        Command::Certs(args) => certs::run(&args),
        Command::Conflicts { config, command } => conflicts::run(&config, command).await,
        Command::Ownership { config, command } => ownership::run(&config, command).await,
        Command::DeadLetters { config, command } => dead_letters::run(&config, command).await,
        Command::Topology {
            command: TopologyCommand::Check { file, against, config },
        } => topology::check(&file, against.as_deref(), config.as_deref()).await,
        Command::Topology {
            command: TopologyCommand::Show { file },
        } => topology::show(&file),
    }
}

/// How long ago `since_micros` was, for a person: `42s`, `17m`, `5h`.
fn age(since_micros: i64) -> String {
    let seconds = (crate::clock::now_micros() - since_micros).max(0) / 1_000_000;
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

/// Who decides, for the audit records: `--by`, else `$USER`.
fn decided_by(by: Option<String>) -> String {
    by.or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into())
}

async fn run(path: PathBuf) -> anyhow::Result<()> {
    // Before anything else: a stop asked for while the node starts is kept for after the
    // start, instead of killing the process (the default action of SIGTERM).
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut config = NodeConfig::load(&path)?;
    let metrics = std::sync::Arc::new(crate::telemetry::Metrics::default());
    let mut node = tokio::select! {
        node = Node::start_with_metrics(config.clone(), metrics.clone()) => {
            node.with_context(|| format!("starting the node of {}", path.display()))?
        }
        () = &mut shutdown => {
            // A half-started node is dropped: as safe as a crash, every open transaction
            // rolls back, and the next start resumes from the database.
            tracing::info!("stopped while starting");
            return Ok(());
        }
    };
    let mut hangup = reload_signal();
    let fatal = loop {
        tokio::select! {
            () = &mut shutdown => break None,
            reason = node.fatal() => break Some(reason),
            _ = hangup.recv() => {
                let Some(next) = reloaded(&path, &config) else {
                    node.reload_tls();
                    continue;
                };
                tracing::info!("restarting the node on the new config");
                node.stop().await;
                node = Node::start_with_metrics(next.clone(), metrics.clone())
                    .await
                    .with_context(|| format!("restarting the node of {}", path.display()))?;
                config = next;
            }
        }
    };
    tracing::info!("stopping: draining and waiting for acknowledgements");
    node.stop().await;
    tracing::info!("stopped");
    match fatal {
        Some(reason) => anyhow::bail!("{reason}"),
        None => Ok(()),
    }
}

/// SIGHUP, where there is one: reload the config.
fn reload_signal() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            let _ = tx.try_send(());
        }
    });
    #[cfg(not(unix))]
    drop(tx);
    rx
}

/// The config at `path` again, if it loads, changes something, and keeps what a running node
/// cannot change (its id, region and database); otherwise says why and keeps `current`.
fn reloaded(path: &std::path::Path, current: &NodeConfig) -> Option<NodeConfig> {
    let next = match NodeConfig::load(path) {
        Ok(next) => next,
        Err(error) => {
            tracing::error!(%error, "SIGHUP: the config does not load; still running on the previous one");
            return None;
        }
    };
    if next.node != current.node || next.database != current.database || next.region() != current.region() {
        tracing::error!(
            "SIGHUP: the new config changes this node's id, region or database, which a running node cannot change; \
             still running on the previous one (stop it and start it on the new config)"
        );
        return None;
    }
    if next == *current {
        tracing::info!("SIGHUP: the config is unchanged");
        return None;
    }
    for change in crate::topology::changes(&current.topology, &next.topology) {
        tracing::warn!("topology change: {change}");
    }
    Some(next)
}

/// Resolves at Ctrl-C or SIGTERM. The handlers are installed when this is called, not when
/// the future is first polled, so a signal that comes before is not lost. One listener for
/// the whole run: a SIGTERM during a reload is kept for after it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
        let mut interrupt = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
        async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = term.recv() => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn status(path: PathBuf, json: bool) -> anyhow::Result<()> {
    let config = NodeConfig::load(&path)?;
    let status = Store::status_of(&config).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let now = crate::clock::now_micros();
    println!(
        "node {}: last seq {}, outbox pending {}, log {} events",
        status.node, status.last_seq, status.outbox_pending, status.log_events
    );
    println!(
        "dead letters {}, conflicts logged {}",
        status.dead_letters, status.conflicts
    );
    if let Some(history) = &status.history {
        println!(
            "\nCAPTURE WAITS: the history of this database is not confirmed: {history}; local changes wait in the outbox"
        );
    }
    if let Some(join) = &status.joining {
        let percent = 100.0 * join.rows_done as f64 / join.rows_total.max(1) as f64;
        println!(
            "\nJOINING from {} by snapshot: {}/{} rows ({percent:.0}%), at table {}; this node's tables are not \
             current until the join ends ({})",
            join.source,
            join.rows_done,
            join.rows_total,
            if join.table.is_empty() { "-" } else { &join.table },
            join.reason
        );
    }
    println!("\napplied from            frontier   processed");
    for f in &status.frontiers {
        println!("  {:<20} {:>9} {:>11}", f.origin, f.seq, f.processed);
    }
    println!("\nsending to   origin          acked   unacked   oldest unacked (RPO exposure)");
    for p in &status.peers {
        let age = p
            .oldest_unacked_micros
            .map(|at| format!("{:.1} s", (now - at) as f64 / 1e6))
            .unwrap_or_else(|| "-".into());
        println!(
            "  {:<10} {:<12} {:>8} {:>9}   {age}",
            p.peer, p.origin, p.acked, p.unacked
        );
    }
    if !status.positions.is_empty() {
        println!("\nkafka                                  position");
        for (source, next) in &status.positions {
            match source.strip_prefix("published:") {
                Some(published) => println!("  published {published:<28} seq {next}"),
                None => println!("  reading   {source:<28} offset {next}"),
            }
        }
    }
    if let Some(audit) = &status.last_audit {
        let at = audit["at_micros"].as_i64().unwrap_or(now);
        println!(
            "\nlast background audit {} ago: {} rows differ, {} kept changing, {} wait on dead letters ({} rows read)",
            age(at),
            audit["differing"],
            audit["unsettled"],
            audit["waiting"].as_u64().unwrap_or(0),
            audit["rows_read"]
        );
        for key in audit["keys"].as_array().into_iter().flatten() {
            println!("  differs: {}", key.as_str().unwrap_or_default());
        }
    }
    for p in status.peers.iter().filter(|p| p.needs_reseed.is_some()) {
        println!("\nNEEDS RE-SEED: {}", p.needs_reseed.as_deref().unwrap_or_default());
    }
    Ok(())
}
