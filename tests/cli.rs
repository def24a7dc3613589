//! The `weft` binary as a user runs it: the demo, the drill, the benchmark, status, and the errors a
//! bad config produces.
use std::process::Command;

fn weft(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(args)
        .output()
        .expect("running weft");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn demo_converges_after_a_region_restart() {
    let (ok, stdout, stderr) = weft(&["demo", "--duration", "8", "--rate", "100"]);
    assert!(ok, "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("stopping the ap-south sidecar"), "{stdout}");
    assert!(stdout.contains("restarting the ap-south sidecar"), "{stdout}");
    assert!(stdout.contains("CONVERGED"), "{stdout}");
    assert!(stdout.contains("lag p99"), "{stdout}");
}

/// The drill kills a region under load, fails its accounts over, and checks (else it exits
/// non-zero) that every region converges and lists the same fenced writes.
#[test]
fn drill_measures_rpo_and_rto_and_converges() {
    let (ok, stdout, stderr) = weft(&["drill", "--load", "3", "--outage", "3", "--rate", "100"]);
    assert!(ok, "drill failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("killed the us-east sidecar (SIGKILL)"), "{stdout}");
    assert!(stdout.contains("RPO, measured: "), "{stdout}");
    assert!(
        stdout.contains("RTO, ownership: us-east's accounts accepted writes in eu-west"),
        "{stdout}"
    );
    assert!(stdout.contains("writes never stopped; 0 failed"), "{stdout}");
    assert!(stdout.contains("CONVERGED"), "{stdout}");
}

#[test]
fn bench_prints_throughput_and_lag() {
    let (ok, stdout, stderr) = weft(&["bench", "--duration", "2", "--rate", "200"]);
    assert!(ok, "bench failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("summary: applied >="), "{stdout}");
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const TOPOLOGY: &str = "version = 1\nmesh = \"t\"\nshape = \"all-to-all\"\n[[nodes]]\nid = \"a\"\nregion = \"ra\"\naddress = \"127.0.0.1:1\"\n[[nodes]]\nid = \"b\"\nregion = \"rb\"\naddress = \"127.0.0.1:2\"\n";

#[test]
fn bad_configs_are_refused_with_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "t.toml", TOPOLOGY);
    let cases = [
        (
            "version = 1\nnode = \"a\"\ntopology = \"t.toml\"\ndatabase = \"a.db\"\ntabels = []\n",
            "unknown field `tabels`",
        ),
        (
            "version = 1\nnode = \"z\"\ntopology = \"t.toml\"\ndatabase = \"a.db\"\n[[tables]]\nname = \"x\"\nstrategy = \"lww\"\n",
            "node: `z` is not in the topology (nodes: a, b)",
        ),
        (
            "version = 1\nnode = \"a\"\ntopology = \"missing.toml\"\ndatabase = \"a.db\"\n[[tables]]\nname = \"x\"\nstrategy = \"lww\"\n",
            "missing.toml: cannot read",
        ),
        (
            "version = 1\nnode = \"a\"\ntopology = \"t.toml\"\ndatabase = \"a.db\"\n[[tables]]\nname = \"x\"\nstrategy = \"newest\"\n",
            "unknown variant `newest`",
        ),
        (
            "version = 1\nnode = \"a\"\ntopology = \"t.toml\"\ndatabase = \"a.db\"\n[[tables]]\nname = \"nope\"\nstrategy = \"lww\"\n[tls]\ninsecure = true\n",
            "table `nope`: does not exist in the database",
        ),
    ];
    for (text, want) in cases {
        let config = write(dir.path(), "a.toml", text);
        let (ok, _, stderr) = weft(&["run", "--config", config.to_str().unwrap()]);
        assert!(!ok, "{text} should be refused");
        assert!(stderr.contains(want), "for {text:?} expected {want:?} in:\n{stderr}");
        assert!(
            stderr.contains("a.toml") || stderr.contains("missing.toml") || want.starts_with("table"),
            "{stderr}"
        );
    }
}

#[test]
fn status_reads_a_nodes_database() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "t.toml", TOPOLOGY);
    let config = write(
        dir.path(),
        "a.toml",
        "version = 1\nnode = \"a\"\ntopology = \"t.toml\"\ndatabase = \"sqlite://a.db\"\n[[tables]]\nname = \"items\"\nstrategy = \"lww\"\n",
    );
    let db = dir.path().join("a.db");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let app = weft::harness::app_pool(&db).await.unwrap();
        sqlx::raw_sql("CREATE TABLE items (id INTEGER PRIMARY KEY, v TEXT)")
            .execute(&app)
            .await
            .unwrap();
    });
    let (ok, _, stderr) = weft(&["status", "--config", config.to_str().unwrap()]);
    assert!(
        !ok && stderr.contains("start the node's sidecar (weft run) once"),
        "{stderr}"
    );
    // Installed as `weft run` does at start; `weft status` installs nothing itself.
    rt.block_on(async {
        let identity = weft::event::Identity {
            node: "a".into(),
            region: "ra".into(),
        };
        let tables = [weft::config::TableConfig::lww("items")];
        let store = weft::store::sqlite::SqliteStore::open(&db, identity, &tables, std::time::Duration::from_secs(1))
            .await
            .unwrap();
        store.close().await;
    });
    let (ok, stdout, stderr) = weft(&["status", "--config", config.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("node a: last seq 0, outbox pending 0"), "{stdout}");
    rt.block_on(async {
        let app = weft::harness::app_pool(&db).await.unwrap();
        sqlx::raw_sql("INSERT INTO items VALUES (1, 'x'), (2, 'y')")
            .execute(&app)
            .await
            .unwrap();
    });
    let (ok, stdout, _) = weft(&["status", "--config", config.to_str().unwrap(), "--json"]);
    assert!(ok);
    let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(status["outbox_pending"], 2);
    assert_eq!(status["peers"][0]["peer"], "b");
}

#[test]
fn topology_check_proves_every_shipped_file() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("topology");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let (ok, stdout, stderr) = weft(&["topology", "check", path.to_str().unwrap()]);
        assert!(ok, "{}: {stderr}", path.display());
        assert!(
            stdout.contains("OK: every node receives every other node's events exactly once"),
            "{stdout}"
        );
        assert!(stdout.contains("worst case:"), "{stdout}");
        let (ok, stdout, _) = weft(&["topology", "show", path.to_str().unwrap()]);
        assert!(ok && stdout.contains("mesh `"), "{stdout}");
        checked += 1;
    }
    assert!(checked >= 3);
    let (_, stdout, _) = weft(&["topology", "check", dir.join("ring.toml").to_str().unwrap()]);
    assert!(stdout.contains("worst case: 3 hops"), "{stdout}");
    assert!(
        stdout.contains("us-east-1 → sa-east-1: us-east-1 → eu-west-1 → ap-south-1 → sa-east-1 (3 hops)"),
        "{stdout}"
    );
    let (_, stdout, _) = weft(&["topology", "check", dir.join("star.toml").to_str().unwrap()]);
    assert!(stdout.contains("worst case: 2 hops"), "{stdout}");
}

#[test]
fn topology_check_refuses_broken_files_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let node = |id: &str, port: u16| {
        format!("[[nodes]]\nid = \"{id}\"\nregion = \"r-{id}\"\naddress = \"127.0.0.1:{port}\"\n")
    };
    let three = format!("{}{}{}", node("a", 1), node("b", 2), node("c", 3));
    let cases = [
        (
            format!("version = 1\nmesh = \"m\"\nshape = \"star\"\n{three}"),
            "hub: a star needs a hub",
        ),
        (
            format!("version = 1\nmesh = \"m\"\nshape = \"star\"\nhub = \"z\"\n{three}"),
            "hub: unknown node `z`",
        ),
        (
            format!(
                "version = 1\nmesh = \"m\"\nshape = \"ring\"\n{}{}",
                node("a", 1),
                node("b", 2)
            ),
            "a ring needs at least 3 nodes",
        ),
        (
            format!("version = 1\nmesh = \"m\"\nshape = \"ring\"\norder = [\"a\", \"b\", \"x\"]\n{three}"),
            "order[2]: unknown node `x`",
        ),
        (
            format!("version = 1\nmesh = \"m\"\nshape = \"ring\"\norder = [\"a\", \"b\"]\n{three}"),
            "order: unreachable nodes: c",
        ),
        (
            format!(
                "version = 1\nmesh = \"m\"\nshape = \"all-to-all\"\n{}{}",
                node("a", 1),
                node("a", 2)
            ),
            "duplicate node id `a`",
        ),
        (
            format!(
                "version = 1\nmesh = \"m\"\nshape = \"all-to-all\"\n{}{}",
                node("a", 1),
                node("b", 1)
            ),
            "duplicate address `127.0.0.1:1`",
        ),
        (
            format!("version = 1\nmesh = \"m\"\nshape = \"all-to-all\"\nhub = \"a\"\n{three}"),
            "hub: only applies to shape = \"star\"",
        ),
        (
            format!("version = 1\nmesh = \"m\"\nshape = \"circle\"\n{three}"),
            "unknown variant `circle`",
        ),
    ];
    for (text, want) in cases {
        let path = dir.path().join("broken.toml");
        std::fs::write(&path, &text).unwrap();
        let (ok, _, stderr) = weft(&["topology", "check", path.to_str().unwrap()]);
        assert!(!ok, "should refuse:\n{text}");
        assert!(
            stderr.contains("broken.toml") && stderr.contains(want),
            "expected {want:?} in {stderr}"
        );
    }
}

#[test]
fn demo_runs_on_a_ring() {
    let ring = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("topology/ring.toml");
    let (ok, stdout, stderr) = weft(&[
        "demo",
        "--topology",
        ring.to_str().unwrap(),
        "--duration",
        "6",
        "--rate",
        "50",
    ]);
    assert!(ok, "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("4 regions on loopback, \"ring\""), "{stdout}");
    assert!(stdout.contains("CONVERGED: all 4 regions"), "{stdout}");
}

/// `--log-format json`: every line `weft run` logs is one JSON object (for log shippers),
/// with its level, target, message and fields.
#[test]
fn run_logs_one_json_object_per_line_with_log_format_json() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // b never runs: a starts, waits for a peer, and logs meanwhile.
    let topology = format!(
        "version = 1\nmesh = \"t\"\nshape = \"all-to-all\"\n[[nodes]]\nid = \"a\"\nregion = \"ra\"\naddress = \"127.0.0.1:{port}\"\n\
         [[nodes]]\nid = \"b\"\nregion = \"rb\"\naddress = \"127.0.0.1:9\"\n"
    );
    write(dir.path(), "t.toml", &topology);
    let config = write(
        dir.path(),
        "a.toml",
        "version = 1\nnode = \"a\"\ntopology = \"t.toml\"\ndatabase = \"a.db\"\n[[tables]]\nname = \"x\"\nstrategy = \"lww\"\n[tls]\ninsecure = true\n",
    );
    make_database(&dir.path().join("a.db"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["--log-format", "json", "run", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if child.try_wait().unwrap().is_some() {
            panic!("weft run exited: {:?}", child.wait_with_output().unwrap());
        }
        assert!(std::time::Instant::now() < deadline, "weft run never listened");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 2, "{stderr}");
    for line in &lines {
        let object: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            object["level"].is_string() && object["fields"]["message"].is_string(),
            "{line}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("weft node started") && l.contains("\"node\":\"a\"")),
        "{stderr}"
    );
    // A command that fails says why in JSON too.
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["--log-format", "json", "run", "--config", "missing.toml"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    let object: serde_json::Value = serde_json::from_str(said.trim()).unwrap_or_else(|e| panic!("{e}: {said}"));
    assert_eq!(object["level"], "ERROR", "{said}");
    assert!(
        object["fields"]["error"].as_str().unwrap().contains("missing.toml"),
        "{said}"
    );
}

/// A SQLite file holding the replicated table `x`.
fn make_database(path: &std::path::Path) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let app = weft::harness::app_pool(path).await.unwrap();
        sqlx::raw_sql("CREATE TABLE x (id INTEGER PRIMARY KEY, v TEXT)")
            .execute(&app)
            .await
            .unwrap();
        app.close().await;
    });
}
