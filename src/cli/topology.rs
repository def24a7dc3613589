//! `weft topology check|show FILE`: validate a topology file and prove its routes before
//! deploy (and, `--against OLD`, say what changing a running mesh to it does, and with a
//! remaining node's `--config` which remaining nodes lack the last events of those leaving),
//! or draw it.
use std::path::Path;

use anyhow::bail;

use crate::config::{Shape, Topology};
use crate::event::NodeId;
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
/// `against`, first says what moving a running mesh from that file to this one does, and,
/// with the `node` config of a remaining node, which remaining nodes lack the last events of
/// the nodes that leave.
pub async fn check(path: &Path, against: Option<&Path>, node: Option<&Path>) -> anyhow::Result<()> {
    let t = load(path)?;
    if let Some(old_path) = against {
        say_changes(&t, path, old_path, node).await?;
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

/// Says what moving a running mesh from the topology at `old_path` to `t` (at `path`) does;
/// errors if a running mesh cannot take it.
async fn say_changes(t: &Topology, path: &Path, old_path: &Path, node: Option<&Path>) -> anyhow::Result<()> {
    let old = load(old_path)?;
    let changes = crate::topology::changes(&old, t);
    println!("{} → {}:", old_path.display(), path.display());
    if changes.is_empty() {
        println!("  no change");
    }
    for change in &changes {
        println!("  {change}");
    }
    let leavers: Vec<NodeId> = (old.nodes.iter())
        .filter(|n| t.node(&n.id).is_none())
        .map(|n| n.id.clone())
        .collect();
    match node {
        Some(node) if !leavers.is_empty() => leavers_held(t, &leavers, node).await?,
        None if !leavers.is_empty() => println!(
            "  (add --config with the config of a remaining node to see whether every remaining node has the last events of {})",
            leavers.join(", ")
        ),
        _ => {}
    }
    if changes.iter().any(|c| c.contains("refused")) {
        bail!("{}: a change above cannot be made to a running mesh", path.display());
    }
    println!(
        "apply it: put the new file on every node, then send each sidecar SIGHUP (or restart it); start new nodes' sidecars after that\n"
    );
    Ok(())
}

/// Says, as the database of the node `node_config` describes knows it, how far each remaining
/// node of `new` has the events of each node that leaves, and who lacks what. What it knows
/// of the others is their last acknowledgement to it: they may have more by now, never less.
async fn leavers_held(new: &Topology, leavers: &[NodeId], node_config: &Path) -> anyhow::Result<()> {
    let config = crate::config::NodeConfig::load(node_config)?;
    let me = config.node.clone();
    if new.node(&me).is_none() {
        bail!(
            "{}: {me} leaves too; give the config of a node that remains",
            node_config.display()
        );
    }
    let others: Vec<NodeId> = (new.nodes.iter().map(|n| n.id.clone()))
        .filter(|id| *id != me)
        .collect();
    let peers: Vec<(NodeId, Vec<NodeId>)> = others.iter().map(|p| (p.clone(), leavers.to_vec())).collect();
    let status = crate::store::Store::status_for(&config, &peers).await?;
    for leaver in leavers {
        let own = (status.frontiers.iter().find(|f| f.origin == *leaver)).map_or(0, |f| f.seq);
        let mut has = vec![(me.clone(), own)];
        for peer in &others {
            let acked = (status.peers.iter())
                .find(|p| p.peer == *peer && p.origin == *leaver)
                .map_or(0, |p| p.acked);
            has.push((peer.clone(), acked));
        }
        let top = has.iter().map(|(_, seq)| *seq).max().unwrap_or(0);
        let list: Vec<String> = has.iter().map(|(node, seq)| format!("{node} {seq}")).collect();
        println!(
            "  {leaver}'s events each remaining node has, as {me}'s database knows it (at least): {}",
            list.join(", ")
        );
        let lacking: Vec<&(NodeId, u64)> = has.iter().filter(|(_, seq)| *seq < top).collect();
        if lacking.is_empty() {
            println!("  every remaining node has {leaver}'s events up to {top}");
            continue;
        }
        for (node, seq) in lacking {
            println!("  {node} lacks {leaver}'s events {}..={top}", seq + 1);
        }
        println!(
            "  after the reload the remaining nodes keep {leaver}'s events in their logs until every one of them has \
             them, and pass them on; a node that stays away past log_retain_secs re-seeds by snapshot instead"
        );
    }
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
