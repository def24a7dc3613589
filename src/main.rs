//! The `weft` binary: logging set-up, then the command line in `weft::cli`.
use clap::Parser;

// Replication moves many small rows through short-lived buffers; mimalloc handles that
// allocation pattern markedly faster than the system allocator under threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = weft::cli::Cli::parse();
    let default_filter = cli.command.default_log_filter();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("starting the tokio runtime");
    match runtime.block_on(weft::cli::main(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("weft: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
