//! The `weft` binary as a user runs it: the demo, the benchmark, status, and the errors a
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
            "version = 1\nnode = \"a\"\ntopology = \"t.toml\"\ndatabase = \"a.db\"\n[[tables]]\nname = \"nope\"\nstrategy = \"lww\"\n",
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
        let app = weft::loopback::app_pool(&db).await.unwrap();
        sqlx::raw_sql("CREATE TABLE items (id INTEGER PRIMARY KEY, v TEXT)")
            .execute(&app)
            .await
            .unwrap();
    });
    let (ok, stdout, stderr) = weft(&["status", "--config", config.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("node a: last seq 0, outbox pending 0"), "{stdout}");
    rt.block_on(async {
        let app = weft::loopback::app_pool(&db).await.unwrap();
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
