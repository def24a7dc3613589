//! `weft audit`: compares every replicated table between the nodes of the mesh and prints
//! the rows that differ for good, with every node's version; `--repair` re-emits each
//! winner from this node. `transport::audit` does the work; this file parses and prints.
//!
//! Exit status: 0 when every node holds the same rows, 1 when some differ (also after a
//! repair: run it again once the repairs replicated), 3 when nothing differs for sure but
//! some rows never stopped changing, the nodes did not catch up with each other, or some
//! rows wait on dead letters (they apply once the letters' cause is fixed).
use std::path::Path;

use crate::config::NodeConfig;
use crate::transport::audit::{Audit, Options, Report};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    config: std::path::PathBuf,
    /// Write each differing row's winner from this node, so every region converges on it.
    #[arg(long)]
    repair: bool,
    /// The node whose row wins where the same version holds different rows and no row has
    /// a majority.
    #[arg(long, value_name = "NODE")]
    prefer: Option<String>,
    /// Confirmation rounds for rows that keep changing during the audit.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let config = NodeConfig::load(&args.config)?;
    if let Some(prefer) = &args.prefer
        && config.topology.node(prefer).is_none()
    {
        anyhow::bail!("--prefer {prefer}: no such node in the topology");
    }
    let options = Options {
        prefer: args.prefer.clone(),
        rounds: args.rounds.max(1),
        ..Options::default()
    };
    let mut report = Audit::connect(config.clone(), options).await?.run().await?;
    if args.repair {
        crate::transport::audit::repair(&config, &mut report).await?;
    }
    match args.json {
        true => println!("{}", serde_json::to_string_pretty(&report)?),
        false => print(&report, &args.config),
    }
    let code = match (report.differing(), report.unsettled() + report.waiting()) {
        (0, 0) => return Ok(()),
        (0, _) => 3,
        _ => 1,
    };
    std::process::exit(code);
}

fn print(report: &Report, config: &Path) {
    let rows: u64 = report.tables.iter().flat_map(|t| t.rows_read.values()).sum();
    println!(
        "audit {} of {} nodes ({}): {} tables, {rows} rows read, {} requests, {} KiB of replies, {} ms",
        report.audit,
        report.nodes.len(),
        report.nodes.join(", "),
        report.tables.len(),
        report.requests,
        report.reply_bytes.div_ceil(1024),
        report.elapsed_ms
    );
    for table in &report.tables {
        println!(
            "\n{}: {} differing, {} unsettled, {} waiting on dead letters ({} candidates from the checksums)",
            table.table,
            table.differing.len(),
            table.unsettled.len(),
            table.waiting.len(),
            table.candidates
        );
        if !table.not_compared.is_empty() {
            println!(
                "  not compared: column(s) {} (not every node's table has them yet)",
                table.not_compared.join(", ")
            );
        }
        for finding in &table.differing {
            println!("  key {}", finding.key);
            for seen in &finding.seen {
                let row = match (&seen.row, seen.deleted) {
                    (Some(row), _) => row.to_string(),
                    (None, true) => "deleted".into(),
                    (None, false) => "no row".into(),
                };
                let version = seen.version.as_deref().unwrap_or("no metadata");
                let odd = match (seen.waiting, seen.consistent) {
                    (true, _) => "  (holds a dead letter of it: does not decide)",
                    (false, true) => "",
                    (false, false) => "  (disagrees with its metadata)",
                };
                println!("    {:<12} {version:<24} {row}{odd}", seen.node);
            }
            match &finding.winner {
                Ok(w) => println!("    winner: {} ({})", w.node, w.why),
                Err(why) => println!("    no winner: {why}"),
            }
            match &finding.repaired {
                Some(Ok(())) => println!("    repaired: re-emitted from this node"),
                Some(Err(why)) => println!("    not repaired: {why}"),
                None => {}
            }
        }
        for key in &table.unsettled {
            println!("  key {key}: kept changing; not compared");
        }
        for waiting in &table.waiting {
            println!(
                "  key {}: waits on dead letters at {} (`weft dead-letters list` there says why); not repaired",
                waiting.key,
                waiting.nodes.join(", ")
            );
        }
        if let Some(note) = &table.note {
            println!("  note: {note}");
        }
    }
    if report.differing() > 0
        && !report
            .tables
            .iter()
            .any(|t| t.differing.iter().any(|f| f.repaired.is_some()))
    {
        println!(
            "\nregions differ; `weft audit --config {} --repair` re-emits each winner",
            config.display()
        );
    }
}
