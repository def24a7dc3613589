//! The `weft` binary: logging set-up, then the command line in `weft::cli`.
use clap::Parser;

// Replication moves many small rows through short-lived buffers; mimalloc handles that
// allocation pattern markedly faster than the system allocator under threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = weft::cli::Cli::parse();
    let default_filter = cli.command.default_log_filter();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        weft::cli::LogFormat::Text => logs.init(),
        weft::cli::LogFormat::Json => logs.json().init(),
    }
    // A panic in one task would leave a half-alive sidecar (that task gone, the others still
    // answering). Stop the whole process instead, saying why, so a supervisor (systemd,
    // Kubernetes) restarts it; everything resumes from the database, nothing is lost.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!("weft: internal error ({info}); stopping so that a supervisor restarts the sidecar");
        std::process::exit(70);
    }));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("starting the tokio runtime");
    let format = cli.log_format;
    match runtime.block_on(weft::cli::main(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            match format {
                weft::cli::LogFormat::Text => eprintln!("weft: {error:#}"),
                weft::cli::LogFormat::Json => tracing::error!(error = format!("{error:#}"), "weft stopped"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}
