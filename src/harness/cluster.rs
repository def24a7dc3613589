//! Throw-away PostgreSQL clusters, for the tests and `weft bench --store postgres`.
//!
//! `Cluster::start` finds the server binaries (installing them from Debian when they are
//! missing and we are root), runs `initdb` into a fresh temporary directory, and starts the
//! server on a free loopback port with its socket in that directory. The server refuses to
//! run as root, so as root every server command runs as the `postgres` user. Dropping the
//! cluster stops the server (immediate mode) and removes the directory.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context as _;

use super::{check, free_port, is_root};

/// Server settings for a test or benchmark cluster; `durable` keeps fsync on.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub durable: bool,
    /// `wal_level = logical`, for native logical replication.
    pub logical: bool,
}

pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    settings: Settings,
}

static INSTALL: Mutex<()> = Mutex::new(());

fn find_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
        .collect();
    found.sort();
    found.pop().or_else(|| {
        let out = Command::new("pg_config").arg("--bindir").output().ok()?;
        let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        bin.join("initdb").exists().then_some(bin)
    })
}

/// The server's binary directory, installing PostgreSQL from Debian if it is missing.
pub fn server_binaries() -> anyhow::Result<PathBuf> {
    let _once = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(bin) = find_bin() {
        return Ok(bin);
    }
    tracing::info!("PostgreSQL server binaries not found; installing them with apt-get");
    super::apt_install(&["postgresql"], "PostgreSQL server binaries")?;
    find_bin().context("apt-get installed postgresql, but no initdb was found under /usr/lib/postgresql")
}

impl Cluster {
    pub fn start(settings: Settings) -> anyhow::Result<Self> {
        let bin = server_binaries()?;
        let dir = tempfile::Builder::new().prefix("weft-pg-").tempdir()?;
        if is_root() {
            check(
                "chown",
                Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(dir.path())
                    .output()?,
            )?;
        }
        let mut cluster = Self {
            dir,
            bin,
            port: 0,
            settings,
        };
        let data = cluster.data();
        check(
            "initdb",
            cluster
                .command("initdb")
                .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "-D"])
                .arg(&data)
                .output()?,
        )?;
        // A port can be taken between choosing and binding it: try a few.
        let mut last = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            match cluster.pg_ctl_start() {
                Ok(()) => return Ok(cluster),
                Err(error) => last = Some(error),
            }
        }
        Err(last.expect("tried at least once"))
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    fn pg_ctl_start(&self) -> anyhow::Result<()> {
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=100 -c shared_buffers=128MB",
            self.port,
            self.dir.path().display()
        );
        if !self.settings.durable {
            // Fast, yet a server crash (not an OS crash) loses no committed transaction.
            options += " -c fsync=off -c full_page_writes=off";
        }
        if self.settings.logical {
            options += " -c wal_level=logical -c max_wal_senders=10 -c max_replication_slots=10";
        }
        let log = self.dir.path().join("server.log");
        check(
            "pg_ctl start",
            self.command("pg_ctl")
                .args(["-w", "-t", "60", "-D"])
                .arg(self.data())
                .arg("-l")
                .arg(&log)
                .args(["-o", &options, "start"])
                .output()?,
        )
        .with_context(|| format!("server log: {}", std::fs::read_to_string(&log).unwrap_or_default()))
    }

    /// A connection URL for database `db` (`postgres` always exists).
    /// Turns on TLS with a server certificate for 127.0.0.1 from a fresh CA (`weft certs`'
    /// minting), restarts the server, and returns the CA's file, for `sslrootcert`.
    pub fn enable_tls(&self) -> anyhow::Result<PathBuf> {
        let certs = self.dir.path().join("certs");
        let options = crate::transport::tls::MintOptions {
            nodes: vec!["127.0.0.1".into()],
            not_before: None,
            days: 30,
            mesh: "postgres".into(),
        };
        crate::transport::tls::mint(&certs, &options)?;
        if is_root() {
            check(
                "chown",
                Command::new("chown")
                    .arg("-R")
                    .arg("postgres:postgres")
                    .arg(&certs)
                    .output()?,
            )?;
        }
        let conf = format!(
            "\nssl = on\nssl_cert_file = '{0}/127.0.0.1.pem'\nssl_key_file = '{0}/127.0.0.1.key'\n",
            certs.display()
        );
        let path = self.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path)?;
        text += &conf;
        std::fs::write(&path, text)?;
        self.stop("fast")?;
        self.restart()?;
        Ok(certs.join("ca.pem"))
    }

    /// `url`, requiring TLS with the server's certificate checked against `ca` and its name.
    pub fn url_verify_full(&self, db: &str, ca: &Path) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?sslmode=verify-full&sslrootcert={}",
            self.port,
            ca.display()
        )
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a database and returns its URL.
    pub async fn create_database(&self, db: &str) -> anyhow::Result<String> {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(&self.url("postgres")).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{db}\"")))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        Ok(self.url(db))
    }

    /// Stops the server: `fast` (clients disconnected, clean shutdown) or `immediate` (like a
    /// crash: recovery runs at the next start).
    pub fn stop(&self, mode: &str) -> anyhow::Result<()> {
        check(
            "pg_ctl stop",
            self.command("pg_ctl")
                .args(["-w", "-t", "60", "-m", mode, "-D"])
                .arg(self.data())
                .arg("stop")
                .output()?,
        )
    }

    /// Starts the server again on the same port.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.pg_ctl_start()
    }

    /// Takes a base backup of the running server (`pg_basebackup`, its WAL streamed along),
    /// as an operator's nightly backup does; returns where it is.
    pub fn base_backup(&self, name: &str) -> anyhow::Result<PathBuf> {
        let to = self.dir.path().join(name);
        check(
            "pg_basebackup",
            self.command("pg_basebackup")
                .arg("-h")
                .arg(self.dir.path())
                .args([
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                    "-D",
                ])
                .arg(&to)
                .output()?,
        )?;
        Ok(to)
    }

    /// Stops the server, replaces its data directory with a copy of `backup` (made by
    /// `base_backup`), and starts it again: the whole cluster goes back to that backup.
    pub fn restore(&self, backup: &Path) -> anyhow::Result<()> {
        self.stop("fast")?;
        std::fs::remove_dir_all(self.data())?;
        let copy = if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--", "cp", "-a"]);
            command
        } else {
            let mut command = Command::new("cp");
            command.arg("-a");
            command
        };
        let mut copy = copy;
        check("cp", copy.arg(backup).arg(self.data()).output()?)?;
        self.pg_ctl_start()
    }

    /// Waits until the server accepts connections.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        use sqlx::Connection as _;
        let started = std::time::Instant::now();
        loop {
            match sqlx::PgConnection::connect(&self.url("postgres")).await {
                Ok(conn) => {
                    let _ = conn.close().await;
                    return Ok(());
                }
                Err(error) if started.elapsed() > timeout => return Err(error.into()),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop("immediate");
    }
}
