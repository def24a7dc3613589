//! What runs weft on one machine for a demonstration, a benchmark or a test, never in a
//! deployed sidecar: the loopback mesh, throw-away PostgreSQL clusters (installed from Debian
//! when missing), `weft demo`, `weft drill` and `weft bench`, and canonical renderings of a region for
//! convergence checks. Behind the `harness` cargo feature (on by default, so `cargo run --
//! demo` works); a production build leaves it out with `--no-default-features`. This is the
//! one part of the library that reports errors with `anyhow`.
pub mod bench;
mod bench_lifecycle;
mod bench_pg;
pub mod cluster;
pub mod compare;
pub mod demo;
pub mod drill;
pub mod kafka;
pub mod loopback;

use std::path::{Path, PathBuf};

pub use crate::store::sqlite::app_pool;

/// The folder for a loopback mesh: the one given, or a temporary one removed when the
/// returned guard drops.
fn work_dir(dir: Option<&Path>) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    match dir {
        Some(dir) => Ok((dir.to_owned(), None)),
        None => {
            let temp = tempfile::tempdir()?;
            Ok((temp.path().to_owned(), Some(temp)))
        }
    }
}

/// Whether this process runs as root (it may then install what a throw-away server needs).
pub(crate) fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A loopback port nobody listens on right now.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `output` of a command the harness ran, or an error with `what` and everything it printed.
pub(crate) fn check(what: &str, output: std::process::Output) -> anyhow::Result<()> {
    if !output.status.success() {
        anyhow::bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Installs Debian `packages` (providing `what`) with apt-get, as root, without questions;
/// an error says what to install by hand.
pub(crate) fn apt_install(packages: &[&str], what: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    if !is_root() || !Path::new("/usr/bin/apt-get").exists() {
        anyhow::bail!(
            "{what} not found; install them (Debian: apt-get install {})",
            packages.join(" ")
        );
    }
    let install = [&["install", "-y", "--no-install-recommends"][..], packages].concat();
    for args in [&["update"][..], &install[..]] {
        let status = std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !status.success() {
            anyhow::bail!("apt-get {} failed; install {what} by hand", args.join(" "));
        }
    }
    Ok(())
}
