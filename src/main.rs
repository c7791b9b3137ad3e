//! The `stvault` command: `serve` runs the vault; `keygen`, `rewrap`,
//! `backup` and `restore` manage its keys and data.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use stvault::commands::{self, BackupArgs, RestoreArgs, RewrapArgs};
use stvault::config::{Config, ServeArgs};

/// Exit code for invalid configuration (EX_CONFIG from sysexits.h).
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "stvault",
    version,
    about = "Credential vault and token broker for ServiceTitan integrations"
)]
struct Cli {
    /// Log line format on stderr: text for people, json (one object per
    /// line) for log shippers.
    #[arg(long, global = true, env = "STVAULT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server.
    Serve(Box<ServeArgs>),
    /// Print a new master key as a keyring line; append it to the key file
    /// to make it the key new data is wrapped under.
    Keygen,
    /// Re-wrap every data key under the newest master key, so older keys can
    /// be removed. Runs while the server is stopped; safe to interrupt and
    /// run again.
    Rewrap(RewrapArgs),
    /// Write a backup file of a running server (or of a stopped data
    /// directory); secrets stay sealed under the master keys.
    Backup(BackupArgs),
    /// Create a data directory from a backup file.
    Restore(RestoreArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime =
        tokio::runtime::Runtime::new().expect("the tokio runtime starts on any supported OS");
    let result = match cli.command {
        Command::Serve(args) => return runtime.block_on(serve(*args)),
        Command::Keygen => {
            commands::keygen();
            Ok(())
        }
        Command::Rewrap(args) => runtime.block_on(commands::rewrap(args)),
        Command::Backup(args) => runtime.block_on(commands::backup(args)),
        Command::Restore(args) => runtime.block_on(commands::restore(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("stvault: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    let config = match Config::from_args(args) {
        Ok(config) => config,
        Err(errors) => {
            for error in &errors {
                eprintln!("stvault: configuration error: {error}");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let opened = match stvault::open(&config).await {
        Ok(opened) => opened,
        Err(e) => {
            tracing::error!(error = %e, "startup failed");
            return ExitCode::FAILURE;
        }
    };
    let listener = match TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(listen = %config.listen, error = %e, "cannot bind the gRPC listener");
            return ExitCode::FAILURE;
        }
    };
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(
        production.token_url = %config.client.production.token_url,
        production.api_url = %config.client.production.api_url,
        integration.token_url = %config.client.integration.token_url,
        integration.api_url = %config.client.integration.api_url,
        "ServiceTitan endpoints"
    );
    tracing::info!(
        listen = %local,
        data_dir = %config.data_dir.display(),
        connections = opened.vault.store().len(),
        "stvault listening"
    );
    match stvault::serve(opened, listener, shutdown_signal()).await {
        Ok(()) => {
            tracing::info!("stvault stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate =
        signal(SignalKind::terminate()).expect("installing a SIGTERM handler succeeds");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
}
