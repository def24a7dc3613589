//! What runs weft on one machine for a demonstration, a benchmark or a test, never in a
//! deployed sidecar: the loopback mesh, throw-away PostgreSQL clusters (installed from Debian
//! when missing), `weft demo` and `weft bench`, and canonical renderings of a region for
//! convergence checks. Behind the `harness` cargo feature (on by default, so `cargo run --
//! demo` works); a production build leaves it out with `--no-default-features`. This is the
//! one part of the library that reports errors with `anyhow`.
pub mod bench;
mod bench_lifecycle;
mod bench_pg;
pub mod cluster;
pub mod compare;
pub mod demo;
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
