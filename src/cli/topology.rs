//! `weft topology check|show FILE`: validate a topology file and prove its routes before
//! deploy (and, `--against OLD`, say what changing a running mesh to it does), or draw it.
use std::path::Path;

use anyhow::bail;

use crate::config::{Shape, Topology};
use crate::topology::{downstream, prove};

pub fn load(path: &Path) -> anyhow::Result<Topology> {
    Ok(Topology::load(path)?)
}

fn describe(t: &Topology) -> String {
    match t.shape {
        Shape::AllToAll => "all-to-all".into(),
        Shape::Ring if t.bidirectional => "ring, both directions".into(),
        Shape::Ring => "ring, one direction".into(),
        Shape::Star => format!("star around {}", t.hub.as_deref().unwrap_or("?")),
    }
}

/// Validates, walks every route, prints routes and hop counts; errors on any defect. With
/// `against`, first says what moving a running mesh from that file to this one does.
pub fn check(path: &Path, against: Option<&Path>) -> anyhow::Result<()> {
    let t = load(path)?;
    if let Some(old_path) = against {
        let old = load(old_path)?;
        let changes = crate::topology::changes(&old, &t);
        println!("{} → {}:", old_path.display(), path.display());
        if changes.is_empty() {
            println!("  no change");
        }
        for change in &changes {
            println!("  {change}");
        }
        if changes.iter().any(|c| c.contains("refused")) {
            bail!("{}: a change above cannot be made to a running mesh", path.display());
        }
        println!(
            "apply it: put the new file on every node, then send each sidecar SIGHUP (or restart it); start new nodes' sidecars after that\n"
        );
    }
    let routes = match prove(&t) {
        Ok(routes) => routes,
        Err(problems) => bail!("{}: routing is broken:\n  {}", path.display(), problems.join("\n  ")),
    };
    println!(
        "{}: mesh `{}`, {}, {} nodes",
        path.display(),
        t.mesh,
        describe(&t),
        t.nodes.len()
    );
    println!("\nroutes (origin → receiver: path):");
    for ((origin, receiver), route) in &routes {
        println!(
            "  {origin} → {receiver}: {} ({} hop{})",
            route.path.join(" → "),
            route.hops(),
            if route.hops() == 1 { "" } else { "s" }
        );
    }
    let width = t.nodes.iter().map(|n| n.id.len()).max().unwrap_or(4).max(6);
    println!("\nhops (row: origin, column: receiver):");
    print!("  {:width$}", "");
    for n in &t.nodes {
        print!(" {:>width$}", n.id);
    }
    println!();
    for origin in &t.nodes {
        print!("  {:width$}", origin.id);
        for receiver in &t.nodes {
            let cell = routes
                .get(&(origin.id.clone(), receiver.id.clone()))
                .map(|r| r.hops().to_string())
                .unwrap_or_else(|| "-".into());
            print!(" {cell:>width$}");
        }
        println!();
    }
    let (pair, worst) = routes
        .iter()
        .max_by_key(|(_, r)| r.hops())
        .map(|(p, r)| (p.clone(), r.hops()))
        .unwrap_or_default();
    println!(
        "\nworst case: {worst} hop{} ({} → {})",
        if worst == 1 { "" } else { "s" },
        pair.0,
        pair.1
    );
    println!("OK: every node receives every other node's events exactly once, and no event loops.");
    Ok(())
}

/// Draws the graph: who streams to whom.
pub fn show(path: &Path) -> anyhow::Result<()> {
    let t = load(path)?;
    println!("mesh `{}`: {}, {} nodes\n", t.mesh, describe(&t), t.nodes.len());
    let label = |id: &str| {
        let n = t.node(id).expect("validated");
        format!("{} ({}, {})", n.id, n.region, n.address)
    };
    match t.shape {
        Shape::Ring => {
            let order: Vec<String> = match &t.order {
                Some(o) => o.clone(),
                None => t.nodes.iter().map(|n| n.id.clone()).collect(),
            };
            let (down, back) = if t.bidirectional {
                ("▲▼", "◀─▶")
            } else {
                ("▼", "──▶")
            };
            for (i, id) in order.iter().enumerate() {
                println!("  {}", label(id));
                if i + 1 < order.len() {
                    println!("    {down}");
                }
            }
            println!("    └{back} back to {}", order[0]);
        }
        Shape::Star => {
            let hub = t.hub.as_deref().expect("validated");
            println!("{}", label(hub));
            let spokes: Vec<&str> = t.nodes.iter().map(|n| n.id.as_str()).filter(|id| *id != hub).collect();
            for (i, spoke) in spokes.iter().enumerate() {
                let branch = if i + 1 == spokes.len() { "└" } else { "├" };
                println!("  {branch}──◀─▶ {}", label(spoke));
            }
        }
        Shape::AllToAll => {
            for n in &t.nodes {
                let peers: Vec<&str> = downstream(&t, &n.id).iter().map(|p| p.id.as_str()).collect();
                println!("{}\n  ──▶ {}", label(&n.id), peers.join(", "));
            }
        }
    }
    Ok(())
}
