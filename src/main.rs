//! The `stvault` command: `serve` runs the vault.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server.
    Serve(ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime =
        tokio::runtime::Runtime::new().expect("the tokio runtime starts on any supported OS");
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
    }
}

fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
