//! Ring, star and all-to-all meshes of real `weft run` processes: every region's writes reach
//! every region exactly once (checked through the application's audit triggers, see
//! `common/sidecars.rs`), relaying nodes can be killed and restarted, and in all-to-all a cut
//! link is bridged by a relay until it is back.
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::sidecars::Sidecars;
use weft::config::{ReplicationConfig, Topology};

fn topology(shape: &str, n: usize) -> Topology {
    let mut text = format!("version = 1\nmesh = \"test\"\n{shape}\n");
    for i in 0..n {
        text += &format!(
            "[[nodes]]\nid = \"r{i}-1\"\nregion = \"r{i}\"\naddress = \"127.0.0.1:{}\"\n",
            1 + i
        );
    }
    Topology::parse(&text, Path::new("test.toml")).unwrap()
}

/// Every region writes `rows` fresh rows, all at once.
async fn write_everywhere(sidecars: &Sidecars, from: i64, rows: i64) {
    let writes = (0..sidecars.mesh.regions.len()).map(|i| sidecars.write(i, from, rows, 5));
    futures_util::future::join_all(writes).await;
}

/// Writes in every region, SIGKILLs `victim` (a relaying node) mid-stream while the writes
/// go on, restarts it, and checks every row arrived everywhere exactly once.
async fn converges_through_a_relay_restart(shape: &str, nodes: usize, victim: usize) {
    let dir = tempfile::tempdir().unwrap();
    let sidecars = Sidecars::with(dir.path(), topology(shape, nodes), ReplicationConfig::default()).await;
    sidecars.spawn_all().await;
    write_everywhere(&sidecars, 0, 150).await;
    sidecars.kill9(victim);
    write_everywhere(&sidecars, 150, 100).await;
    sidecars.spawn(victim, None).await;
    write_everywhere(&sidecars, 250, 50).await;
    sidecars.assert_exactly_once(nodes as i64 * 300).await;
    sidecars.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_of_four_converges_and_survives_a_relay_restart() {
    // r1 relays r0's events to r2 and r3.
    converges_through_a_relay_restart("shape = \"ring\"", 4, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bidirectional_ring_of_five_converges() {
    let dir = tempfile::tempdir().unwrap();
    let shape = "shape = \"ring\"\nbidirectional = true";
    let sidecars = Sidecars::with(dir.path(), topology(shape, 5), ReplicationConfig::default()).await;
    sidecars.spawn_all().await;
    write_everywhere(&sidecars, 0, 120).await;
    sidecars.assert_exactly_once(5 * 120).await;
    sidecars.terminate_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_star_of_four_converges_and_survives_a_hub_restart() {
    converges_through_a_relay_restart("shape = \"star\"\nhub = \"r0-1\"", 4, 0).await;
}

async fn rows_from(sidecars: &Sidecars, at: usize, origin: usize) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM items WHERE origin = ?")
        .bind(&sidecars.mesh.regions[origin].region)
        .fetch_one(&sidecars.mesh.regions[at].app)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_to_all_relays_around_a_cut_link_until_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let replication = ReplicationConfig {
        relay_after_ms: 800,
        ..Default::default()
    };
    let sidecars = Sidecars::with(dir.path(), topology("shape = \"all-to-all\"", 3), replication).await;
    // r0 reaches r2 only through a proxy this test controls; every other link is direct.
    let r2 = sidecars.mesh.topology.node("r2-1").unwrap().address.clone();
    let mut proxy = Proxy::start(&r2).await;
    let config = &sidecars.mesh.regions[0].config_file;
    let mut text = std::fs::read_to_string(config).unwrap();
    text += &format!("\n[dial]\n\"r2-1\" = \"{}\"\n", proxy.listen);
    std::fs::write(config, text).unwrap();
    sidecars.spawn_all().await;
    write_everywhere(&sidecars, 0, 50).await;
    sidecars.mesh.wait_converged(Duration::from_secs(30)).await.unwrap();

    proxy.cut().await;
    write_everywhere(&sidecars, 50, 100).await;
    // r0's writes still reach r2: only r1 can have brought them.
    let started = Instant::now();
    while rows_from(&sidecars, 2, 0).await < 150 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "r0's events never reached r2 around the cut link"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    proxy.restore().await;
    write_everywhere(&sidecars, 150, 50).await;
    sidecars.assert_exactly_once(3 * 200).await;
    let log = || std::fs::read_to_string(dir.path().join("r1.log")).unwrap();
    assert!(
        log().contains("relaying r0-1's events to r2-1"),
        "r1 should have relayed: {}",
        log()
    );
    // Once r0 has redialled r2 directly (its backoff is at most 2 s), r2 withdraws the request.
    // The relay may also end with r1's stream to r2 (relays start over on a reconnect): what
    // counts is that the last word on it is a stop.
    let stopped_last = || {
        let log = log();
        let stop = log.rfind("stopped relaying r0-1's events to r2-1");
        let start = log.rfind("relaying r0-1's events to r2-1: their direct link is down");
        stop.is_some_and(|stop| start.is_none_or(|start| stop > start))
    };
    let started = Instant::now();
    while !stopped_last() {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "r1 never stopped relaying: {}\n=== r2\n{}",
            log(),
            std::fs::read_to_string(dir.path().join("r2.log")).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sidecars.terminate_all();
}

/// The events of `origin` still in region `at`'s log.
async fn logged_of(sidecars: &Sidecars, at: usize, origin: usize) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM _weft_log WHERE origin = ?")
        .bind(&sidecars.mesh.regions[origin].node_id)
        .fetch_one(&sidecars.mesh.regions[at].app)
        .await
        .unwrap()
}

/// A hub that only relays (its own application idle) keeps a stopped spoke's share of another
/// spoke's events until its retention drops them. That spoke used to come back to an empty
/// read of the relayed origin: nothing sent, nothing said, and the rows missing for good once
/// their origin was gone. The hub now remembers how far its log of each origin went, so an
/// empty read below that finds the spoke behind, and it re-seeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_origin_trimmed_to_nothing_is_reported_behind() {
    let dir = tempfile::tempdir().unwrap();
    let replication = ReplicationConfig {
        log_retain_secs: 1,
        ..Default::default()
    };
    let sidecars = Sidecars::with(dir.path(), topology("shape = \"star\"\nhub = \"r1-1\"", 3), replication).await;
    sidecars.spawn_all().await;
    sidecars.write(0, 0, 5, 5).await;
    sidecars.wait_items(2, 5, "r2 never got r0's first rows").await;
    sidecars.stop(2).await;
    sidecars.write(0, 5, 10, 5).await;
    sidecars.wait_items(1, 15, "the hub never got r0's rows").await;
    sidecars.kill9(0);
    // The hub's retention drops r0's events (older than a second) at its next pass.
    let started = Instant::now();
    while logged_of(&sidecars, 1, 0).await > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "the hub never trimmed r0's events"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sidecars.spawn(2, None).await;
    sidecars
        .wait_items(
            2,
            15,
            "r2 never got r0's last rows, which only the hub's trimmed log had",
        )
        .await;
    // The rows are in before the join's last page, which logs the line.
    let started = Instant::now();
    loop {
        let log = std::fs::read_to_string(dir.path().join("r2.log")).unwrap();
        if log.contains("joined the mesh") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "r2 never re-seeded:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sidecars.terminate_all();
}
