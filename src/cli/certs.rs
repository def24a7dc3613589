//! `weft certs`: a mesh CA and one certificate per node of a topology, for development and
//! small deployments (`transport::tls::mint` makes them). The CA in the folder is reused
//! when there is one, so the command also adds a node or renews its certificate.
use std::path::PathBuf;

use anyhow::Context as _;

use crate::config::Topology;
use crate::transport::tls::{MintOptions, mint};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The topology whose nodes get certificates.
    #[arg(long)]
    topology: PathBuf,
    /// Folder for `ca.pem`, `ca.key` and `<node>.pem` / `<node>.key`.
    #[arg(long)]
    out: PathBuf,
    /// Only these nodes (repeatable; default: every node of the topology).
    #[arg(long = "node", value_name = "ID")]
    nodes: Vec<String>,
    /// Days the node certificates are valid.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// First day of validity, YYYY-MM-DD (default: now).
    #[arg(long, value_name = "DATE")]
    not_before: Option<String>,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let topology = Topology::load(&args.topology)?;
    for node in &args.nodes {
        anyhow::ensure!(
            topology.node(node).is_some(),
            "--node {node}: no such node in {}",
            args.topology.display()
        );
    }
    let nodes = match args.nodes.is_empty() {
        true => topology.nodes.iter().map(|n| n.id.clone()).collect(),
        false => args.nodes.clone(),
    };
    let not_before = match &args.not_before {
        None => None,
        Some(day) => {
            let format = time::macros::format_description!("[year]-[month]-[day]");
            let date =
                time::Date::parse(day, &format).with_context(|| format!("--not-before {day}: expected YYYY-MM-DD"))?;
            Some(date.midnight().assume_utc())
        }
    };
    let reused = args.out.join("ca.pem").exists() && args.out.join("ca.key").exists();
    let options = MintOptions {
        nodes: nodes.clone(),
        not_before,
        days: args.days,
        mesh: topology.mesh.clone(),
    };
    let written = mint(&args.out, &options)?;
    if reused {
        println!("reused the CA in {}", args.out.display());
    }
    for file in &written {
        println!("wrote {}", file.display());
    }
    println!("\nIn each node's config (paths relative to the config file):\n");
    println!("[tls]\nca = \"{}\"", args.out.join("ca.pem").display());
    println!("cert = \"{}\"", args.out.join(format!("{}.pem", nodes[0])).display());
    println!("key = \"{}\"", args.out.join(format!("{}.key", nodes[0])).display());
    println!("\n(with that node's own certificate and key; keep ca.key off the nodes)");
    Ok(())
}
