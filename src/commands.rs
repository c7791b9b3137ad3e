//! Operator subcommands besides `serve`: `keygen`, `rewrap`, `backup` and
//! `restore`. Each prints its result on stdout and returns an error message
//! for the caller to print.

use std::path::{Path, PathBuf};

use clap::Args;
use futures::StreamExt;

use crate::audit;
use crate::backup::{self, Backup};
use crate::config::{self, MasterKeySource, Storage};
use crate::crypto::MasterKey;
use crate::datadir;
use crate::keyring::{self, Keyring};
use crate::rewrap;
use crate::store::{ConnectionRecord, DatabaseSettings, Store, StoreError};

pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

#[derive(Args, Debug)]
pub struct RewrapArgs {
    /// Data directory to rewrap. The server must be stopped: rewrap takes
    /// the directory's lock. With PostgreSQL storage the records are in the
    /// database, and the directory only has to be one that no running
    /// server holds.
    #[arg(long, env = "STVAULT_DATA_DIR", default_value = "./stvault-data")]
    pub data_dir: PathBuf,

    /// Master keyring file; the last key is the one data keys are rewrapped
    /// under. STVAULT_MASTER_KEY may hold the same text instead.
    #[arg(long, env = "STVAULT_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,

    /// Rewrap at most this many connections, then stop; run again to go on.
    #[arg(long)]
    pub limit: Option<usize>,

    #[command(flatten)]
    pub storage: StorageArgs,
}

/// The storage settings of an offline command, as `stvault serve` takes
/// them.
#[derive(Args, Debug)]
pub struct StorageArgs {
    /// Storage to work on: "sled" or "postgres", as for `stvault serve`.
    #[arg(long, env = "STVAULT_STORAGE", default_value = config::DEFAULT_STORAGE)]
    pub storage: String,

    /// File containing the PostgreSQL URL, as for `stvault serve`.
    /// STVAULT_DATABASE_URL may contain the URL instead.
    #[arg(long, env = "STVAULT_DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,

    /// PEM CA certificates for the PostgreSQL server, as for `stvault serve`.
    #[arg(long, env = "STVAULT_DATABASE_CA")]
    pub database_ca: Option<PathBuf>,
}

impl StorageArgs {
    /// Validates the settings, reading the database URL for PostgreSQL.
    pub fn storage(&self) -> Result<Storage, String> {
        config::storage(
            &self.storage,
            self.database_url_file.as_ref(),
            self.database_ca.as_deref(),
        )
    }
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// File to write; it must not exist yet.
    #[arg(long)]
    pub out: PathBuf,

    /// Address of the running server to back up, such as
    /// http://127.0.0.1:50051. With a policy file, the call needs an admin
    /// caller's bearer key in STVAULT_ADMIN_KEY.
    #[arg(long, env = "STVAULT_BACKUP_SERVER", default_value = DEFAULT_SERVER, conflicts_with = "data_dir")]
    pub server: String,

    /// Back up a data directory directly instead, while no server runs on it.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,

    /// Storage of the server; backups work only on sled data directories.
    #[arg(long, env = "STVAULT_STORAGE", default_value = config::DEFAULT_STORAGE)]
    pub storage: String,
}

#[derive(Args, Debug)]
pub struct MigrateStorageArgs {
    /// Source: sled:DIR, the data directory of a stopped server.
    #[arg(long)]
    pub from: String,

    /// Target: postgres, an empty database named by
    /// STVAULT_DATABASE_URL or STVAULT_DATABASE_URL_FILE as for `stvault
    /// serve`. The URL is never taken from the command line, where other
    /// users could read its password.
    #[arg(long)]
    pub to: String,

    /// File containing the PostgreSQL URL, as for `stvault serve`.
    #[arg(long, env = "STVAULT_DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,

    /// PEM CA certificates for the PostgreSQL server, as for `stvault serve`.
    #[arg(long, env = "STVAULT_DATABASE_CA")]
    pub database_ca: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Backup file written by `stvault backup`.
    #[arg(long)]
    pub from: PathBuf,

    /// Data directory to create; it must be missing or empty.
    #[arg(long)]
    pub data_dir: PathBuf,
}

/// Prints a new master key as a keyring line (`ID BASE64`).
pub fn keygen() {
    let (key, text) = MasterKey::generate();
    println!("{}", keyring::key_line(&key, &text).expose());
}

pub async fn rewrap(args: RewrapArgs) -> Result<(), String> {
    let storage = args.storage.storage()?;
    let source = config::master_key_source(args.master_key_file, &args.data_dir)?;
    let (_lock, store) = match storage {
        Storage::Sled => open_existing(&args.data_dir)?,
        Storage::Postgres(settings) => open_postgres(&args.data_dir, &settings).await?,
    };
    let keyring = load_existing_keyring(&source)?;
    record_command(&args.data_dir, &store, REWRAP_EVENT).await?;
    let report = rewrap::rewrap(&store, &keyring, args.limit).await?;
    store
        .flush()
        .await
        .map_err(|e| format!("cannot flush the database: {e}"))?;
    let newest = keyring.newest().id();
    println!(
        "rewrapped {} connections under master key {newest}; {} already used it",
        report.rewrapped, report.already_current
    );
    if !report.skipped.is_empty() {
        println!(
            "{} connections fail integrity checks and were left as they are: {}",
            report.skipped.len(),
            report.skipped.join(", ")
        );
    }
    if report.remaining > 0 {
        println!(
            "{} connections still use older keys; run stvault rewrap again",
            report.remaining
        );
    } else if report.skipped.is_empty() {
        let older: Vec<&str> = keyring.ids().filter(|id| *id != newest).collect();
        if !older.is_empty() {
            println!(
                "every connection uses {newest}; older keys can now be removed from the keyring: {}",
                older.join(", ")
            );
        }
    }
    Ok(())
}

/// Name in the audit trail of a `stvault rewrap` run, in the place of an
/// RPC name.
pub const REWRAP_EVENT: &str = "stvault rewrap";

/// Appends the audit event of an operator command before it changes
/// anything, so that a run killed halfway is on record too. A command whose
/// event cannot be written must not run. The caller is the local user id,
/// as the operating system reports it.
async fn record_command(dir: &Path, store: &Store, command: &str) -> Result<(), String> {
    // On PostgreSQL the event goes straight to the database's chain: a
    // spool in the directory would only be forwarded by a server started
    // on it, perhaps never.
    let trail = match store.postgres() {
        Some(postgres) => audit::AuditLog::open_postgres_unspooled(postgres),
        None => crate::open_audit_trail(dir, audit::SyncPolicy::Always, store)
            .map_err(|e| e.to_string())?,
    };
    // SAFETY: getuid takes no arguments, and POSIX specifies that it
    // always succeeds.
    let uid = unsafe { libc::getuid() };
    let event = audit::EventDraft {
        request_id: uuid::Uuid::now_v7().to_string(),
        caller: format!("uid:{uid}"),
        auth_method: "local".into(),
        peer: None,
        rpc: command.into(),
        connection_id: None,
        environment: None,
        tenant_id: None,
        credential_version: None,
        code: "OK".into(),
    };
    match trail.append(event).await {
        Ok(audit::Appended::Chained(_)) => Ok(()),
        // A trail opened without a spool does not spool; should it, the
        // event would not be in the chain yet, so the run stops.
        Ok(audit::Appended::Spooled) => Err(
            "the audit event of this run was spooled instead of written to the database, so \
             nothing was changed; run again"
                .into(),
        ),
        Err(e) => Err(format!(
            "cannot write the audit event of this run, so nothing was changed: {e}"
        )),
    }
}

pub async fn backup(args: BackupArgs) -> Result<(), String> {
    sled_only(
        "backup",
        &args.storage,
        "back up the database with PostgreSQL's own tools, such as pg_dump",
    )?;
    let (backup, bytes) = match &args.data_dir {
        Some(dir) => {
            let (_lock, store) = open_existing(dir)?;
            let snapshot = store
                .snapshot()
                .await
                .map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
            let backup = Backup::new(snapshot);
            let bytes = backup.encode();
            (backup, bytes)
        }
        None => crate::admin::fetch_backup(&server_url(&args.server)).await?,
    };
    backup::write_file(&args.out, &bytes)?;
    println!(
        "wrote {} connections ({} bytes) to {}; restoring it needs master keys: {}",
        backup.connection_count,
        bytes.len(),
        args.out.display(),
        list_or_none(&backup.master_key_ids())
    );
    Ok(())
}

pub async fn restore(args: RestoreArgs) -> Result<(), String> {
    let restored = backup::restore(&args.from, &args.data_dir).await?;
    println!(
        "restored {} connections into {}; serve it with master keys: {}",
        restored.connections,
        args.data_dir.display(),
        list_or_none(&restored.master_key_ids)
    );
    Ok(())
}

/// Copies every connection, master key check value and audit event of a
/// stopped sled data directory into an empty PostgreSQL database, then reads
/// each connection back and verifies the copied audit chain. Records stay sealed: the database gets
/// the same ciphertext, so the same master keys open it.
pub async fn migrate_storage(args: MigrateStorageArgs) -> Result<(), String> {
    let Some(dir) = args.from.strip_prefix("sled:").filter(|d| !d.is_empty()) else {
        return Err("--from: expected sled:DIR, the data directory of a stopped server".into());
    };
    let dir = PathBuf::from(dir);
    match args.to.as_str() {
        "postgres" => {}
        to if to.starts_with("postgres:") => {
            return Err(
                "--to: pass --to postgres and put the URL in STVAULT_DATABASE_URL or \
                 STVAULT_DATABASE_URL_FILE; a URL on the command line, password included, is \
                 visible to other users of the machine"
                    .into(),
            );
        }
        _ => return Err("--to: expected postgres".into()),
    }
    let Storage::Postgres(settings) = config::storage(
        "postgres",
        args.database_url_file.as_ref(),
        args.database_ca.as_deref(),
    )?
    else {
        unreachable!("postgres storage was asked for");
    };

    let (_lock, source) = open_existing(&dir)?;
    let read_error = |e: StoreError| format!("cannot read {}: {e}", dir.display());
    let check_values = source.check_values().await.map_err(read_error)?;
    let records: Vec<ConnectionRecord> = source
        .records()
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(read_error)?;
    // The audit trail is copied only if its chain holds, and then byte for
    // byte, so every event keeps its hash.
    let (trail, events) = match audit::read_verified_lines(&dir) {
        Ok(read) => read,
        Err(audit::VerifyError::Missing { .. }) => (
            audit::Verified {
                events: 0,
                head_hash: audit::GENESIS_HASH.to_owned(),
                incomplete_tail: false,
            },
            Vec::new(),
        ),
        Err(e) => return Err(format!("the audit trail of {}: {e}", dir.display())),
    };

    let target = Store::connect_postgres(&settings)
        .await
        .map_err(|e| format!("cannot open the PostgreSQL database: {e}"))?;
    let write_error = |e: StoreError| format!("cannot write {}: {e}", settings.target());
    let existing = target.len().await.map_err(write_error)?;
    if existing > 0 {
        return Err(format!(
            "{} already contains {existing} connections; migrate into an empty database",
            settings.target()
        ));
    }
    let postgres = target
        .postgres()
        .expect("a store opened with connect_postgres is on PostgreSQL");
    // First, so that a database whose trail is not empty is refused before
    // anything is written.
    let head = audit::import_into_postgres(postgres, &events)
        .await
        .map_err(write_error)?;
    for (key_id, sealed) in &check_values {
        target
            .put_check_value(key_id, sealed)
            .await
            .map_err(write_error)?;
    }
    target.insert_batch(&records).await.map_err(write_error)?;

    let copied_trail = audit::verify_database(&settings)
        .await
        .map_err(|e| format!("the copied audit trail: {e}"))?;
    if (copied_trail.events, &copied_trail.head_hash) != (trail.events, &trail.head_hash)
        || head.hash != trail.head_hash
    {
        return Err(format!(
            "the copied audit trail holds {} events ending in {}, not {} ending in {}",
            copied_trail.events, copied_trail.head_hash, trail.events, trail.head_hash
        ));
    }

    let copied = target.len().await.map_err(write_error)?;
    if copied != records.len() {
        return Err(format!(
            "{} holds {copied} connections after the copy, not {}",
            settings.target(),
            records.len()
        ));
    }
    for record in &records {
        let stored = target.get(&record.id).await.map_err(write_error)?;
        if stored.as_ref().map(crate::store::encode) != Some(crate::store::encode(record)) {
            return Err(format!(
                "connection {} reads back different from {}",
                record.id,
                dir.display()
            ));
        }
    }
    println!(
        "copied {} connections, {} master key check values and {} audit events from {} to {}, \
         read each connection back and verified the audit chain; serve it with \
         STVAULT_STORAGE=postgres and the same master keys",
        records.len(),
        check_values.len(),
        trail.events,
        dir.display(),
        settings.target()
    );
    Ok(())
}

/// Rejects `command` unless the storage is sled. With PostgreSQL the data
/// directory contains no connections, so the command would find none.
fn sled_only(command: &str, storage: &str, advice: &str) -> Result<(), String> {
    if storage == "sled" {
        return Ok(());
    }
    Err(format!(
        "stvault {command} works on sled data directories only, and STVAULT_STORAGE is \
         {storage:?}; with PostgreSQL, {advice}"
    ))
}

/// Locks and opens an existing data directory for an offline command.
fn open_existing(dir: &Path) -> Result<(datadir::DataDirLock, Store), String> {
    if !dir.join(crate::store::DB_DIR_NAME).is_dir() {
        return Err(format!(
            "{} is not a stvault data directory (it has no database)",
            dir.display()
        ));
    }
    let lock = datadir::lock(dir, datadir::DEFAULT_LOCK_WAIT).map_err(|e| match e {
        datadir::LockError::InUse { .. } => format!("{e}; stop that server first"),
        other => other.to_string(),
    })?;
    let store = Store::open(dir)
        .map_err(|e| format!("cannot open the database in {}: {e}", dir.display()))?;
    Ok((lock, store))
}

/// Locks a data directory and connects to the PostgreSQL database for an
/// offline command. The command keeps nothing in the directory, so it may
/// be new, but as with sled it must be one that no running server holds.
async fn open_postgres(
    dir: &Path,
    settings: &DatabaseSettings,
) -> Result<(datadir::DataDirLock, Store), String> {
    datadir::create(dir)?;
    let lock = datadir::lock(dir, datadir::DEFAULT_LOCK_WAIT).map_err(|e| match e {
        datadir::LockError::InUse { .. } => {
            format!("{e}; name the data directory of no running server with --data-dir")
        }
        other => other.to_string(),
    })?;
    let store = Store::connect_postgres(settings)
        .await
        .map_err(|e| format!("cannot open the PostgreSQL database: {e}"))?;
    Ok((lock, store))
}

/// Loads the keyring, never generating a key as `serve` does on first start.
fn load_existing_keyring(source: &MasterKeySource) -> Result<Keyring, String> {
    if let MasterKeySource::DataDir(path) = source {
        if !path.exists() {
            return Err(format!(
                "no master key configured: set STVAULT_MASTER_KEY_FILE (or STVAULT_MASTER_KEY), \
                 or keep the key in {}",
                path.display()
            ));
        }
    }
    keyring::load(source)
}

fn server_url(server: &str) -> String {
    if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    }
}

fn list_or_none(ids: &[String]) -> String {
    if ids.is_empty() {
        "none (no connections)".into()
    } else {
        ids.join(", ")
    }
}
