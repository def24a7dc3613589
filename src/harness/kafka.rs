//! Throw-away Apache Kafka brokers (4.x, KRaft mode), for the tests and `--transport kafka`
//! runs of the demo and the benchmark.
//!
//! `Broker::start` finds the broker's jars in a cache folder (`target/kafka/<version>/libs`,
//! or `WEFT_KAFKA_LIBS`), fetching them from Maven Central with `mvn
//! dependency:copy-dependencies` the first time (installing Java and Maven from Debian when
//! they are missing and we are root). It then formats a fresh data directory for a single
//! combined broker and controller on two free loopback ports, starts `kafka.Kafka` and waits
//! until the broker answers on its port. Dropping the broker stops it (SIGTERM, then SIGKILL)
//! and removes the directory. `kill` and `restart` are the faults the Kafka suites inject.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::{check, free_port};

/// The Apache Kafka release the harness runs.
pub const KAFKA_VERSION: &str = "4.1.1";
/// The cluster id every harness broker is formatted with (any base64 UUID will do).
const CLUSTER_ID: &str = "d2VmdC10ZXN0LWJyb2tlcg";

/// One running broker and its data directory.
pub struct Broker {
    dir: tempfile::TempDir,
    libs: PathBuf,
    /// `host:port` of the broker listener, for `bootstrap.servers`.
    pub bootstrap: String,
    child: Mutex<Option<Child>>,
}

static FETCH: Mutex<()> = Mutex::new(());

/// The folder holding the broker's jars, fetched on first use.
pub fn broker_libs() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("WEFT_KAFKA_LIBS") {
        return Ok(PathBuf::from(dir));
    }
    let _fetching = FETCH.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let cache = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/kafka")
        .join(KAFKA_VERSION);
    let libs = cache.join("libs");
    if libs.join(format!("kafka_2.13-{KAFKA_VERSION}.jar")).exists() {
        return Ok(libs);
    }
    require(&["java", "mvn"], &["openjdk-17-jre-headless", "maven"])?;
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    std::fs::write(cache.join("pom.xml"), pom()).context("writing the broker's pom.xml")?;
    // Into a fresh folder, renamed when complete: another test binary may fetch at once.
    let partial = tempfile::tempdir_in(&cache)?;
    tracing::info!(
        version = KAFKA_VERSION,
        "fetching Apache Kafka's jars from Maven Central (once)"
    );
    let output = Command::new("mvn")
        .args(["-q", "-B", "dependency:copy-dependencies", "-DincludeScope=runtime"])
        .arg(format!("-DoutputDirectory={}", partial.path().display()))
        .current_dir(&cache)
        .output()
        .context("running mvn")?;
    check(&format!("mvn fetching Apache Kafka {KAFKA_VERSION}"), output)?;
    let fetched = partial.keep();
    if std::fs::rename(&fetched, &libs).is_err() {
        // Another process got there first; its copy is as good.
        let _ = std::fs::remove_dir_all(&fetched);
    }
    Ok(libs)
}

fn pom() -> String {
    format!(
        "<project xmlns=\"http://maven.apache.org/POM/4.0.0\">\n  <modelVersion>4.0.0</modelVersion>\n  \
         <groupId>weft.harness</groupId>\n  <artifactId>kafka-broker</artifactId>\n  <version>1</version>\n  \
         <dependencies>\n    <dependency>\n      <groupId>org.apache.kafka</groupId>\n      \
         <artifactId>kafka_2.13</artifactId>\n      <version>{KAFKA_VERSION}</version>\n    </dependency>\n  \
         </dependencies>\n</project>\n"
    )
}

/// Installs the Debian `packages` when one of the `programs` is missing.
fn require(programs: &[&str], packages: &[&str]) -> anyhow::Result<()> {
    let found = |p: &&str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {p}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if programs.iter().all(found) {
        return Ok(());
    }
    tracing::info!(?packages, "installing what the Kafka broker needs with apt-get");
    super::apt_install(packages, &format!("{} (for the Kafka broker)", programs.join(" and ")))
}

impl Broker {
    /// Starts a fresh broker on free loopback ports.
    pub fn start() -> anyhow::Result<Self> {
        let libs = broker_libs()?;
        let dir = tempfile::tempdir()?;
        let (port, controller) = (free_port()?, free_port()?);
        let data = dir.path().join("data");
        let properties = format!(
            "process.roles=broker,controller\nnode.id=1\n\
             controller.quorum.bootstrap.servers=127.0.0.1:{controller}\n\
             listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
             controller.listener.names=CONTROLLER\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             inter.broker.listener.name=PLAINTEXT\n\
             log.dirs={}\n\
             num.partitions=1\nauto.create.topics.enable=false\n\
             offsets.topic.replication.factor=1\ntransaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\ngroup.initial.rebalance.delay.ms=0\n\
             log.retention.check.interval.ms=1000\n",
            data.display()
        );
        std::fs::write(dir.path().join("server.properties"), properties)?;
        let output = Command::new("java")
            .arg("-cp")
            .arg(libs.join("*"))
            .args([
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                "-t",
                CLUSTER_ID,
                "-c",
            ])
            .arg(dir.path().join("server.properties"))
            .output()
            .context("running Kafka's StorageTool (is Java installed?)")?;
        check("formatting the broker's storage", output)?;
        let broker = Broker {
            dir,
            libs,
            bootstrap: format!("127.0.0.1:{port}"),
            child: Mutex::new(None),
        };
        broker.launch()?;
        Ok(broker)
    }

    /// Starts the broker process on the existing data directory and waits until it listens.
    ///
    /// The broker runs under a small shell supervisor that stops it when this process is
    /// gone, so a broker shared through a static (one per test binary, never dropped) does
    /// not outlive its tests; it also removes the data directory then.
    fn launch(&self) -> anyhow::Result<()> {
        let dir = self.dir.path();
        let java = format!(
            "java -Xms256m -Xmx768m -XX:+UseSerialGC -cp '{}/*' kafka.Kafka '{}/server.properties'",
            self.libs.display(),
            dir.display()
        );
        let script = format!(
            "{java} >> '{dir}/broker.log' 2>&1 &\n\
             child=$!\necho $child > '{dir}/broker.pid'\n\
             trap 'kill -TERM $child; wait $child; exit 0' TERM\n\
             while kill -0 {parent} 2>/dev/null && kill -0 $child 2>/dev/null; do sleep 1; done\n\
             if ! kill -0 {parent} 2>/dev/null; then kill -KILL $child 2>/dev/null; wait $child; rm -rf '{dir}'; fi\n",
            dir = dir.display(),
            parent = std::process::id(),
        );
        let _ = std::fs::remove_file(dir.join("broker.pid"));
        let child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the Kafka broker (sh, java)")?;
        *self.child.lock().expect("broker lock") = Some(child);
        let started = Instant::now();
        while std::net::TcpStream::connect(&self.bootstrap).is_err() {
            if let Some(status) = self
                .child
                .lock()
                .expect("broker lock")
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("the Kafka broker exited at start ({status}):\n{}", self.log());
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!(
                    "the Kafka broker did not listen on {} within 60 s:\n{}",
                    self.bootstrap,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// The broker's own output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    /// Stops the broker: SIGTERM and a clean shutdown (`graceful`), or SIGKILL.
    pub fn stop(&self, graceful: bool) {
        let Some(mut supervisor) = self.child.lock().expect("broker lock").take() else {
            return;
        };
        let java = std::fs::read_to_string(self.dir.path().join("broker.pid")).unwrap_or_default();
        let (signal, target) = match graceful {
            true => ("-TERM", supervisor.id().to_string()),
            false => ("-KILL", java.trim().to_owned()),
        };
        if !target.is_empty() {
            let _ = Command::new("kill").args([signal, &target]).status();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if supervisor.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !java.trim().is_empty() {
            let _ = Command::new("kill").args(["-KILL", java.trim()]).status();
        }
        let _ = supervisor.kill();
        let _ = supervisor.wait();
    }

    /// Starts the broker again on its data, on the same ports.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.stop(true);
        self.launch()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop(false);
    }
}
