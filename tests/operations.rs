//! The operations endpoints of real `weft run` processes (`[http]`): `/metrics` scraped over
//! HTTPS (the node's certificate, the mesh CA) during a workload and while a region is dead,
//! `/healthz`, `/readyz`, and the bearer token `/metrics` wants.
mod common;

use std::time::{Duration, Instant};

use common::http::{TOKEN, enable_http, get, value};
use common::sidecars::Sidecars;

/// Polls `probe` until it holds, or fails saying `what` with the last answer.
async fn until<F: AsyncFn() -> (bool, String)>(what: &str, within: Duration, probe: F) {
    let started = Instant::now();
    loop {
        let (done, said) = probe().await;
        if done {
            return;
        }
        assert!(started.elapsed() < within, "{what}; last answer:\n{said}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_probes_of_running_sidecars_follow_a_workload_and_a_dead_region() {
    let dir = tempfile::tempdir().unwrap();
    let sidecars = Sidecars::new(dir.path()).await;
    let ports = enable_http(&sidecars);
    let d = dir.path();
    let nodes = ["east-1", "west-1", "south-1"];
    let metrics = async |i: usize| get(d, ports[i], nodes[i], "/metrics", Some(TOKEN)).await.1;

    // Alone, east is alive but not ready: no peer has confirmed its database's history.
    sidecars.spawn(0, None).await;
    until("east never answered /healthz", Duration::from_secs(10), async || {
        let (status, body) = get(d, ports[0], nodes[0], "/healthz", None).await;
        (status == 200, body)
    })
    .await;
    let (status, body) = get(d, ports[0], nodes[0], "/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no peer has confirmed"), "{body}");
    let (status, body) = get(d, ports[0], nodes[0], "/metrics", None).await;
    assert_eq!(status, 401, "no token: {body}");
    assert!(body.contains("Authorization: Bearer"), "{body}");
    assert_eq!(get(d, ports[0], nodes[0], "/metrics", Some("wrong")).await.0, 401);

    sidecars.spawn(1, None).await;
    sidecars.spawn(2, None).await;
    for i in 0..3 {
        until("a region never became ready", Duration::from_secs(30), async || {
            let (status, body) = get(d, ports[i], nodes[i], "/readyz", None).await;
            (status == 200, body)
        })
        .await;
    }

    // A workload: what west applies from east shows in its counters and lag histogram.
    tokio::join!(sidecars.write(0, 0, 300, 10), sidecars.write(1, 0, 100, 10));
    sidecars.assert_exactly_once(400).await;
    let west = metrics(1).await;
    for name in [
        "weft_build_info",
        "weft_events_captured_total",
        "weft_events_dropped_duplicate_total",
        "weft_events_dropped_looped_total",
        "weft_history_confirmed",
        "weft_peer_connected",
        "weft_peer_backlog_events",
        "weft_peer_rpo_exposure_seconds",
        "weft_peer_clock_ahead_seconds",
        "weft_queue_open_conflicts",
        "weft_queue_open_siblings",
        "weft_log_events",
    ] {
        assert!(west.contains(&format!("\n{name}")), "{name} missing:\n{west}");
    }
    let own = ["node=\"west-1\"", "region=\"west\""];
    assert!(
        value(&west, "weft_events_applied_total", &own).unwrap() >= 300.0,
        "{west}"
    );
    assert_eq!(value(&west, "weft_events_captured_total", &own), Some(100.0), "{west}");
    assert_eq!(value(&west, "weft_history_confirmed", &own), Some(1.0));
    let lag_count = |text: &str| value(text, "weft_replication_lag_seconds_count", &["origin=\"east-1\""]);
    assert!(lag_count(&west).unwrap() >= 300.0, "{west}");
    assert!(west.contains("weft_replication_lag_seconds_bucket{"), "{west}");

    // South dies; east goes on writing, and south's application writes a row east also
    // writes (a conflict once south is back).
    sidecars.kill9(2);
    sidecars.update_shared(2, 7, "south").await;
    sidecars.write(0, 300, 100, 10).await;
    sidecars.update_shared(0, 7, "east").await;
    let to_south = ["peer=\"south-1\"", "origin=\"east-1\""];
    until(
        "east never showed south's backlog",
        Duration::from_secs(20),
        async || {
            let text = metrics(0).await;
            let backlog = value(&text, "weft_peer_backlog_events", &to_south).unwrap_or(0.0);
            let exposure = value(&text, "weft_peer_rpo_exposure_seconds", &to_south).unwrap_or(0.0);
            let connected = value(&text, "weft_peer_connected", &["peer=\"south-1\""]);
            (backlog >= 101.0 && exposure > 0.0 && connected == Some(0.0), text)
        },
    )
    .await;
    // The survivors stay ready: traffic must be able to go there now.
    let (status, body) = get(d, ports[0], nodes[0], "/readyz", None).await;
    assert_eq!(status, 200, "{body}");

    sidecars.spawn(2, None).await;
    sidecars.assert_exactly_once(500).await;
    until(
        "east's backlog to south never drained",
        Duration::from_secs(20),
        async || {
            let text = metrics(0).await;
            let backlog = value(&text, "weft_peer_backlog_events", &to_south);
            (backlog == Some(0.0), text)
        },
    )
    .await;
    let mut conflicts = 0.0;
    let mut scrapes = String::new();
    for i in 0..3 {
        let text = metrics(i).await;
        scrapes += &text;
        conflicts += value(&text, "weft_conflicts_total", &["table=\"shared\""]).unwrap_or(0.0);
        assert!(value(&text, "weft_peer_reconnects_total", &[]).is_some(), "{text}");
    }
    assert!(
        conflicts >= 1.0,
        "the concurrent writes of row 7 are counted as conflicts"
    );
    readme_deployment_files_name_served_metrics(&scrapes);
    sidecars.terminate_all();
}

/// The README's *Deployment files* (alert rules, dashboard) name only metrics a sidecar
/// serves (`scrapes`: every region's, after a workload with a conflict), and the dashboard is
/// valid JSON.
fn readme_deployment_files_name_served_metrics(scrapes: &str) {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("### Deployment files")
        .expect("the README has a Deployment files section");
    let section = &readme[start..];
    let section = &section[..section[4..].find("\n### ").map_or(section.len(), |end| end + 4)];
    let dashboard = section
        .split("```json\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next());
    let dashboard: serde_json::Value = serde_json::from_str(dashboard.expect("a JSON dashboard")).unwrap();
    assert!(dashboard["panels"].as_array().is_some_and(|p| !p.is_empty()));
    let mut named = std::collections::BTreeSet::new();
    for (at, _) in section.match_indices("weft_") {
        let name: String = (section[at..].chars())
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        named.insert(name);
    }
    assert!(named.len() >= 8, "{named:?}");
    for name in named {
        assert!(
            scrapes.contains(&format!("\n{name}{{")),
            "the README's deployment files name {name}, which no sidecar serves"
        );
    }
}

/// Long operations show progress: a region back after a large backlog is caught up with
/// lines saying how far it is behind and how fast it goes, then that it has caught up; an
/// audit says each table it is done with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_catch_up_and_an_audit_show_their_progress() {
    let dir = tempfile::tempdir().unwrap();
    let sidecars = Sidecars::new(dir.path()).await;
    sidecars.spawn_all().await;
    sidecars.stop(2).await;
    sidecars.write(0, 0, 60_000, 1_000).await;
    sidecars.spawn(2, None).await;
    sidecars.assert_exactly_once(60_000).await;
    let east_log = || sidecars.log(0);
    until(
        "east never said south has caught up",
        Duration::from_secs(20),
        async || {
            let log = east_log();
            (log.contains("the peer has caught up") && log.contains("south-1"), log)
        },
    )
    .await;
    let log = east_log();
    let catching: Vec<&str> = log.lines().filter(|l| l.contains("catching the peer up")).collect();
    assert!(
        catching
            .iter()
            .any(|l| l.contains("peer=south-1") && l.contains("behind=")),
        "{log}"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["audit", "--config"])
        .arg(&sidecars.mesh.regions[0].config_file)
        .output()
        .unwrap();
    let said = common::sidecars::plain(&String::from_utf8_lossy(&out.stderr));
    let tables = sidecars.mesh.tables.len();
    for i in 1..=tables {
        assert!(said.contains(&format!("done=\"{i}/{tables}\"")), "{said}");
    }
    assert!(said.contains("audited a table"), "{said}");
    sidecars.terminate_all();
}
