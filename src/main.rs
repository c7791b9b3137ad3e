//! The `stvault` command: `serve` runs the vault, `keygen` makes a bearer
//! key for the policy, `audit verify` checks the audit chain, and
//! `master-key`, `rewrap`, `backup` and `restore` manage keys and data.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use stvault::commands::{
    self, BackupArgs, MigrateStorageArgs, RestoreArgs, RewrapArgs, StorageArgs,
};
use stvault::config::{Config, ServeArgs, Storage};

/// Exit code for invalid configuration (EX_CONFIG from sysexits.h).
const EXIT_CONFIG: u8 = 78;
/// Exit code for invalid command arguments (EX_USAGE from sysexits.h).
const EXIT_USAGE: u8 = 64;
/// Exit code of `audit verify` when the chain is broken (EX_DATAERR).
const EXIT_CHAIN_BROKEN: u8 = 65;

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
    /// Generate a bearer key and print it once, with its policy entry.
    Keygen(KeygenArgs),
    /// Inspect the audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Manage master keys.
    #[command(subcommand)]
    MasterKey(MasterKeyCommand),
    /// Re-wrap every data key under the newest master key, so older keys can
    /// be removed. With sled it runs while the server is stopped; with
    /// PostgreSQL, servers may keep serving. Safe to interrupt and run again.
    Rewrap(RewrapArgs),
    /// Copy the connections of a stopped sled data directory into an empty
    /// PostgreSQL database.
    MigrateStorage(MigrateStorageArgs),
    /// Write a backup file of a running server (or of a stopped data
    /// directory); secrets stay sealed under the master keys.
    Backup(BackupArgs),
    /// Create a data directory from a backup file.
    Restore(RestoreArgs),
}

#[derive(Subcommand)]
enum MasterKeyCommand {
    /// Print a new master key as a keyring line; append it to the key file
    /// to make it the key new data is wrapped under.
    Generate,
}

#[derive(Args)]
struct KeygenArgs {
    /// Caller name recorded in audit events and error messages.
    #[arg(long)]
    name: String,
    /// Role of the caller: link, admin or token. Repeat for several.
    #[arg(long = "role", required = true)]
    roles: Vec<String>,
    /// Tenants a token caller may get tokens for: comma-separated ids, or
    /// "*" for every tenant.
    #[arg(long)]
    tenants: Option<String>,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check that no audit event was edited or deleted: in a data directory
    /// (or a copy of it) with sled storage, or in the database with
    /// PostgreSQL. Servers may keep running meanwhile.
    Verify(VerifyArgs),
}

#[derive(Args)]
struct VerifyArgs {
    /// Data directory of the server, with sled storage.
    #[arg(long, env = "STVAULT_DATA_DIR")]
    data_dir: Option<PathBuf>,

    #[command(flatten)]
    storage: StorageArgs,
}

fn main() -> ExitCode {
    // stvault's files hold sealed secrets, keys or the audit trail, so every
    // file and directory it creates, sled's included, is private to its owner.
    // SAFETY: umask only sets this process's file mode mask.
    unsafe { libc::umask(0o077) };
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime =
        tokio::runtime::Runtime::new().expect("the tokio runtime starts on any supported OS");
    let result = match cli.command {
        Command::Serve(args) => return runtime.block_on(serve(*args)),
        Command::Keygen(args) => return keygen(args),
        Command::Audit(AuditCommand::Verify(args)) => return runtime.block_on(audit_verify(args)),
        Command::MasterKey(MasterKeyCommand::Generate) => {
            commands::keygen();
            Ok(())
        }
        Command::Rewrap(args) => runtime.block_on(commands::rewrap(args)),
        Command::MigrateStorage(args) => runtime.block_on(commands::migrate_storage(args)),
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

/// Prints a new bearer key and the policy entry holding its hash. The key
/// itself is stored nowhere.
fn keygen(args: KeygenArgs) -> ExitCode {
    let key = stvault::auth::identity::generate_key();
    let hash = hex::encode(stvault::auth::identity::key_hash(&key));
    let roles: Vec<String> = args.roles.iter().map(|r| format!("{r:?}")).collect();
    let mut entry = format!(
        "[[caller]]\nname = {:?}\nkey_sha256 = \"{hash}\"\nroles = [{}]\n",
        args.name,
        roles.join(", ")
    );
    match args.tenants.as_deref() {
        Some("*") => entry.push_str("tenants = \"*\"\n"),
        Some(list) => {
            let ids: Result<Vec<i64>, _> = list.split(',').map(|id| id.trim().parse()).collect();
            let Ok(ids) = ids else {
                eprintln!("stvault: --tenants: expected comma-separated tenant ids or \"*\"");
                return ExitCode::from(EXIT_USAGE);
            };
            let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
            entry.push_str(&format!("tenants = [{}]\n", ids.join(", ")));
        }
        None => {}
    }
    if let Err(error) = stvault::auth::policy::Policy::parse(&entry) {
        eprintln!("stvault: invalid caller: {error}");
        return ExitCode::from(EXIT_USAGE);
    }
    println!(
        "# Bearer key for {:?}, shown only this once. The caller sends it as the\n\
         # metadata \"authorization: Bearer <key>\".\n{}\n\n\
         # Add this entry to the policy file (STVAULT_POLICY_FILE), then send SIGHUP\n\
         # to stvault to load it.\n{entry}",
        args.name,
        key.expose()
    );
    ExitCode::SUCCESS
}

async fn audit_verify(args: VerifyArgs) -> ExitCode {
    use stvault::audit::VerifyError;
    let storage = match args.storage.storage() {
        Ok(storage) => storage,
        Err(message) => {
            eprintln!("stvault: {message}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let database_setting = match &storage {
        Storage::Postgres(settings) => Some(settings.setting()),
        Storage::Sled => None,
    };
    let verified = match (storage, args.data_dir) {
        (Storage::Postgres(settings), _) => stvault::audit::verify_database(&settings).await,
        (Storage::Sled, Some(dir)) => stvault::audit::verify_data_dir(&dir),
        (Storage::Sled, None) => {
            eprintln!(
                "stvault: pass the data directory of the server with --data-dir (or \
                 STVAULT_DATA_DIR), or --storage postgres for a trail in PostgreSQL"
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match verified {
        Ok(verified) => {
            println!(
                "audit chain intact: {} events, last hash {}",
                verified.events, verified.head_hash
            );
            if verified.incomplete_tail {
                println!(
                    "the trail ends in an incomplete event: a write in progress, or one \
                     interrupted by a crash, which the server drops when it starts"
                );
            }
            ExitCode::SUCCESS
        }
        Err(VerifyError::Broken(chain_break)) => {
            eprintln!("stvault: {chain_break}");
            ExitCode::from(EXIT_CHAIN_BROKEN)
        }
        Err(error) => {
            match database_setting {
                Some(setting) => eprintln!(
                    "stvault: {error} (the database named by {setting}; check that it is \
                     running and that the URL's host, port, user, password and database name \
                     are right)"
                ),
                None => eprintln!("stvault: {error}"),
            }
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
    let shutdown = shutdown_signal();
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
    let connections = match opened.vault.store().len().await {
        Ok(count) => count,
        Err(e) => {
            tracing::error!(error = %e, "cannot count the stored connections");
            return ExitCode::FAILURE;
        }
    };
    let audit_events = match opened.audit.len().await {
        Ok(count) => count,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the audit chain head");
            return ExitCode::FAILURE;
        }
    };
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
        storage = opened.vault.store().backend_name(),
        connections = connections,
        audit_events = audit_events,
        tls = match &opened.tls {
            None => "off",
            Some(tls) if tls.requires_client_certificates() => "mutual",
            Some(_) => "on",
        },
        policy = opened.auth.policy_path().map(|p| p.display().to_string()).unwrap_or_default(),
        "stvault listening"
    );
    tokio::spawn(stvault::auth::reload_on_sighup(
        opened.auth.clone(),
        stvault::on_policy_reload(&opened),
    ));
    match stvault::serve(opened, listener, shutdown).await {
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

/// Returns a future that completes on SIGTERM or SIGINT. The handlers are
/// installed before it returns, so a signal that arrives while the server
/// is still starting stops it gracefully once it serves, instead of
/// killing the process.
fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate =
        signal(SignalKind::terminate()).expect("installing a SIGTERM handler succeeds");
    let mut interrupt =
        signal(SignalKind::interrupt()).expect("installing a SIGINT handler succeeds");
    async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("shutdown requested; finishing in-flight requests");
    }
}
