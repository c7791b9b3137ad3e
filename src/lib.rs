//! stvault: a gRPC credential vault and token broker for ServiceTitan
//! integrations. `open` opens the data directory, checks the master key and
//! loads the policy; `serve` runs the gRPC server until shutdown.

pub mod admin;
pub mod api;
pub mod audit;
pub mod auth;
pub mod backup;
pub mod broker;
pub mod commands;
pub mod config;
pub mod crypto;
pub mod datadir;
pub mod health;
pub mod keyring;
pub mod metrics;
pub mod model;
pub mod readiness;
pub mod rewrap;
pub mod secret;
pub mod servicetitan;
pub mod store;
pub mod testhook;
pub mod vault;
pub mod verify;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;

use crate::config::{Config, Storage};
use crate::store::Store;

/// Minimum age of a pending credential version that startup discards when
/// the store is shared. Younger ones may belong to a rotation that another
/// server is still verifying. A stale pending version does no harm until
/// then: the next rotation replaces it.
const SHARED_STALE_PENDING_AGE: Duration = Duration::from_secs(60 * 60);

/// Generated protobuf and gRPC code for `stvault.v1`.
pub mod pb {
    tonic::include_proto!("stvault.v1");

    /// Encoded descriptors of the stvault protos, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/stvault_descriptor.bin"));
}

/// A startup failure, reported to the operator before exiting.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartupError(pub String);

/// Opened state of a data directory, ready to serve.
pub struct Opened {
    pub vault: Arc<vault::Vault>,
    pub auth: Arc<auth::Authenticator>,
    pub audit: Arc<audit::AuditLog>,
    pub tls: Option<auth::tls::TlsFiles>,
    pub health: health::HealthSettings,
    /// Held until the process exits, so no other stvault opens the directory.
    pub lock: datadir::DataDirLock,
    /// Time allowed for in-flight RPCs after a shutdown request.
    pub shutdown_grace: Duration,
    /// The bound metrics listener, when metrics are enabled.
    pub metrics_listener: Option<TcpListener>,
    /// The bound health-only listener, when enabled.
    pub health_listener: Option<TcpListener>,
    /// With PostgreSQL and a policy file: keeps the policy in step with
    /// the other replicas.
    pub policy_sync: Option<Arc<auth::shared::PolicySync>>,
}

/// Locks the data directory, loads the master keyring, and checks that every
/// connection's data key unwraps with it.
pub async fn open(config: &Config) -> Result<Opened, StartupError> {
    testhook::init_from_env();
    datadir::create(&config.data_dir).map_err(StartupError)?;
    let lock = datadir::lock(&config.data_dir, datadir::DEFAULT_LOCK_WAIT)
        .map_err(|e| StartupError(e.to_string()))?;
    let keyring = keyring::load(&config.master_key).map_err(StartupError)?;
    let store = open_store(config).await?;
    let checked = keyring::check(&store, &keyring)
        .await
        .map_err(StartupError)?;
    if !checked.undecryptable.is_empty() {
        tracing::warn!(
            count = checked.undecryptable.len(),
            connections = %checked.describe_undecryptable(),
            "connections failed integrity checks and cannot be used; restore them from a backup or delete them"
        );
    }
    for key_id in &checked.retired_key_ids {
        tracing::info!(key.id = %key_id, "master key retired: it is no longer configured and no connection uses it");
    }
    tracing::info!(
        keys = ?keyring,
        newest = keyring.newest().id(),
        connections_by_key = ?checked.connections_by_key,
        "master keyring checked"
    );

    let metrics_listener = match &config.metrics {
        Some(settings) => {
            metrics::set_tenant_labels(settings.tenant_labels);
            let listener = TcpListener::bind(settings.listen).await.map_err(|e| {
                StartupError(format!(
                    "cannot bind the metrics listener {}: {e}",
                    settings.listen
                ))
            })?;
            let local = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            tracing::info!(listen = %local, "metrics listening");
            Some(listener)
        }
        None => None,
    };
    let health_listener = match config.health_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await.map_err(|e| {
                StartupError(format!("cannot bind the health listener {addr}: {e}"))
            })?;
            let local = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            tracing::info!(listen = %local, "health listening");
            Some(listener)
        }
        None => None,
    };

    let audit = open_audit(config, &store)?;
    let auth = authenticator(config);

    let client =
        servicetitan::ServiceTitanClient::new(config.client.clone()).map_err(StartupError)?;
    let broker = match store.postgres() {
        Some(postgres) => {
            let shared = broker::SharedTokens::new(
                postgres.clone(),
                Arc::new(client.clone()),
                config.client.request_timeout,
            );
            tracing::info!(
                lease.owner = shared.owner(),
                "sharing tokens with other replicas"
            );
            broker::Broker::with_token_source(client, Arc::new(shared), config.broker.clone())
        }
        None => broker::Broker::new(client, config.broker.clone()),
    };
    let broker = Arc::new(broker);
    let vault = Arc::new(vault::Vault::new(store, broker, keyring));
    let stale_age = if vault.store().is_shared() {
        SHARED_STALE_PENDING_AGE
    } else {
        Duration::ZERO
    };
    let cleaned = vault
        .discard_stale_pending(stale_age)
        .await
        .map_err(|e| StartupError(format!("cannot clean up interrupted rotations: {e}")))?;
    for id in cleaned {
        tracing::warn!(connection.id = %id, "discarded a pending credential version left by an interrupted rotation");
    }
    let auth = Arc::new(auth);
    let policy_sync = match vault.store().postgres() {
        Some(postgres) => {
            auth::shared::PolicySync::new(postgres.clone(), auth.clone(), vault.shared_keyring())
        }
        None => None,
    };
    if let (Some(sync), Some(path)) = (&policy_sync, auth.policy_path()) {
        // The file was read moments ago; an error now is as fatal as then.
        let document = std::fs::read_to_string(path).map_err(|e| {
            StartupError(format!("cannot read policy file {}: {e}", path.display()))
        })?;
        auth.install(&document)
            .map_err(|e| StartupError(format!("policy file {}: {e}", path.display())))?;
        sync.publish(document).await;
    }
    Ok(Opened {
        vault,
        health: config.health.clone(),
        auth,
        audit: Arc::new(audit),
        tls: config.tls.clone(),
        lock,
        shutdown_grace: config.shutdown_grace,
        metrics_listener,
        health_listener,
        policy_sync,
    })
}

/// How long serving waits for the first LISTEN on a shared database.
const FIRST_LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Puts the shared policy in force, in a task of its own, since it reads
/// the database.
fn apply_shared_policy(sync: &Option<Arc<auth::shared::PolicySync>>) {
    if let Some(sync) = sync.clone() {
        tokio::spawn(async move { sync.apply().await });
    }
}

/// Returns what to do with a policy this server reloads on SIGHUP: with
/// PostgreSQL, share it with the other replicas.
pub fn on_policy_reload(opened: &Opened) -> impl Fn(String) + Send + 'static {
    let sync = opened.policy_sync.clone();
    move |document| {
        if let Some(sync) = sync.clone() {
            tokio::spawn(async move { sync.publish(document).await });
        }
    }
}

/// Health service name that reports SERVING from startup until shutdown,
/// whatever the database's state, for liveness probes: restarting a server
/// because its database is down would not bring the database back.
pub const LIVENESS_SERVICE: &str = "stvault.liveness";

/// Opens the configured store: sled in the data directory, or PostgreSQL.
async fn open_store(config: &Config) -> Result<Store, StartupError> {
    match &config.storage {
        Storage::Sled => Store::open(&config.data_dir).map_err(|e| {
            StartupError(format!(
                "cannot open the database in {}: {e}",
                config.data_dir.display()
            ))
        }),
        Storage::Postgres(settings) => {
            let store = Store::connect_postgres(settings).await.map_err(|e| {
                StartupError(format!(
                    "cannot open the PostgreSQL database named by {}: {e}; check that the \
                     database is running and that the URL's host, port, user, password and \
                     database name are right",
                    settings.setting()
                ))
            })?;
            tracing::info!(
                database = settings.target(),
                tls = settings.uses_tls(),
                "connected to PostgreSQL"
            );
            Ok(store)
        }
    }
}

/// Opens the audit trail: the trail file of the data directory with sled,
/// or the database's trail with PostgreSQL.
fn open_audit(config: &Config, store: &Store) -> Result<audit::AuditLog, StartupError> {
    let Some(postgres) = store.postgres() else {
        let db = store
            .db()
            .expect("a store without PostgreSQL is a sled store");
        move_legacy_trail(db, &config.data_dir)?;
        return audit::AuditLog::open(&config.data_dir, config.audit_sync)
            .map_err(|e| StartupError(format!("cannot open the audit trail: {e}")));
    };
    // Earlier versions kept a trail per server in the data directory, first
    // in its sled database. Move one still there into the trail file, so
    // `stvault audit verify --data-dir` can check it; new events go to the
    // database.
    let dir = &config.data_dir;
    if dir.join(store::DB_DIR_NAME).is_dir() {
        let local = Store::open(dir).map_err(|e| {
            StartupError(format!(
                "cannot open the database in {} to move its audit trail: {e}",
                dir.display()
            ))
        })?;
        let db = local.db().expect("Store::open opens a sled store");
        move_legacy_trail(db, dir)?;
    }
    if dir.join(audit::EVENTS_FILE).is_file() {
        tracing::info!(
            file = %dir.join(audit::EVENTS_FILE).display(),
            "the data directory keeps the audit trail of an earlier version; new events go to \
             the database, and `stvault audit verify --storage sled --data-dir` checks the old \
             trail"
        );
    }
    // The spool is kept in the data directory, because its lock reserves it
    // for this server and it outlives a restart.
    audit::AuditLog::open_postgres(postgres, dir)
        .map_err(|e| StartupError(format!("cannot open the audit spool: {e}")))
}

/// Moves an audit trail kept in the sled database `db` by earlier versions
/// into the trail file of `dir`.
fn move_legacy_trail(db: &sled::Db, dir: &std::path::Path) -> Result<(), StartupError> {
    let moved = audit::import_legacy(db, dir).map_err(|e| {
        StartupError(format!(
            "cannot move the audit trail out of the database: {e}"
        ))
    })?;
    if moved > 0 {
        tracing::info!(
            events = moved,
            "moved the audit trail from the database to its own file"
        );
    }
    Ok(())
}

/// Builds the authenticator for the configured policy, warning about
/// setups where some callers cannot get in.
fn authenticator(config: &Config) -> auth::Authenticator {
    let requires_certificates = config
        .tls
        .as_ref()
        .is_some_and(auth::tls::TlsFiles::requires_client_certificates);
    match &config.policy {
        None => {
            tracing::warn!(
                listen = %config.listen,
                "no policy file (STVAULT_POLICY_FILE) is set: every caller that reaches the \
                 loopback listener may call every RPC and get tokens for every tenant"
            );
            auth::Authenticator::open()
        }
        Some((path, policy)) => {
            if policy.has_certificate_callers() && !requires_certificates {
                tracing::warn!(
                    policy = %path.display(),
                    "the policy names certificate callers but STVAULT_CLIENT_CA is not set, so \
                     they cannot present certificates"
                );
            }
            tracing::info!(
                policy = %path.display(),
                callers = policy.callers().len(),
                "policy loaded"
            );
            auth::Authenticator::enforcing(path.clone(), policy.clone())
        }
    }
}

/// Serves the gRPC API on `listener` until `shutdown` completes, then waits
/// up to the grace period for open connections to finish their RPCs, closes
/// whatever is still open, and flushes the database.
pub async fn serve(
    opened: Opened,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartupError> {
    let api = Arc::new(api::VaultService::new(
        opened.vault.clone(),
        opened.auth.clone(),
        opened.audit.clone(),
    ));
    let service = pb::credential_vault_server::CredentialVaultServer::from_arc(api.clone());

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::credential_vault_server::CredentialVaultServer<api::VaultService>>()
        .await;
    health_reporter
        .set_service_status(LIVENESS_SERVICE, tonic_health::ServingStatus::Serving)
        .await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| StartupError(format!("cannot build the reflection service: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| StartupError(format!("cannot build the reflection service: {e}")))?;

    let admin =
        pb::admin_server::AdminServer::new(admin::AdminService::new(opened.vault.clone(), api));
    let store = opened.vault.store().clone();
    let (stopping, stop_requested) = tokio::sync::watch::channel(false);
    let metrics_task = opened.metrics_listener.map(|listener| {
        let mut stop = stop_requested.clone();
        let shutdown = async move {
            let _ = stop.wait_for(|stopping| *stopping).await;
        };
        tokio::spawn(metrics::serve(listener, store.clone(), shutdown))
    });

    let health_task = opened.health_listener.map(|listener| {
        let mut stop = stop_requested.clone();
        let health_only = tonic::transport::Server::builder()
            .add_service(health_service.clone())
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                let _ = stop.wait_for(|stopping| *stopping).await;
            });
        tokio::spawn(health_only)
    });

    // Health and reflection need no credentials: health reports only
    // whether the server is up, for probes, and reflection returns the
    // public schema that grpcurl needs before it can call anything.
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &opened.tls {
        builder = builder
            .tls_config(tls.server_config())
            .map_err(|e| StartupError(format!("invalid TLS configuration: {e}")))?;
    }
    let readiness = store.is_shared().then(|| {
        tokio::spawn(readiness::watch_database(
            opened.vault.clone(),
            health_reporter.clone(),
            stop_requested.clone(),
        ))
    });
    // Events spooled while the database was unreachable, in this run or an
    // earlier one, go to the shared chain once it responds.
    let forwarder = store.is_shared().then(|| {
        let audit = opened.audit.clone();
        let stopping = stop_requested.clone();
        tokio::spawn(async move { audit.forward_spool(stopping).await })
    });
    // Rotations and deletions made through any server drop what this one
    // cached of the connection; other writes to it keep the cache. A
    // policy stored by another server is put in force here.
    let listening = Arc::new(tokio::sync::Notify::new());
    let changes = store.is_shared().then(|| {
        let vault = opened.vault.clone();
        let policy_sync = opened.policy_sync.clone();
        let store = store.clone();
        let stopping = stop_requested.clone();
        let listening = listening.clone();
        tokio::spawn(async move {
            let on_change = |change: store::Change<'_>| match change {
                store::Change::Connection(id) => {
                    let vault = vault.clone();
                    let id = id.to_owned();
                    tokio::spawn(async move { vault.forget_if_changed(&id).await });
                }
                store::Change::Policy => apply_shared_policy(&policy_sync),
                store::Change::Unknown => {
                    vault.broker().invalidate_all();
                    apply_shared_policy(&policy_sync);
                    listening.notify_one();
                }
            };
            store.watch_changes(on_change, stopping).await;
        })
    });
    if changes.is_some() {
        // Calls wait until this server hears of other servers' changes, so
        // none caches credentials that a change it missed made stale.
        let heard = tokio::time::timeout(FIRST_LISTEN_TIMEOUT, listening.notified()).await;
        if heard.is_err() {
            tracing::warn!(
                wait_ms = FIRST_LISTEN_TIMEOUT.as_millis() as u64,
                "not yet listening for changes from other servers; serving anyway"
            );
        }
    }
    let checker = tokio::spawn(health::run(
        opened.vault.clone(),
        opened.health.clone(),
        opened.vault.broker().take_rejections(),
    ));
    let vault = opened.vault.clone();
    let signal = async move {
        shutdown.await;
        // Status watches never end on their own, so end them for the
        // graceful shutdown to finish.
        vault.stop_watchers();
        health_reporter
            .set_not_serving::<pb::credential_vault_server::CredentialVaultServer<api::VaultService>>()
            .await;
        health_reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        health_reporter
            .set_service_status(LIVENESS_SERVICE, tonic_health::ServingStatus::NotServing)
            .await;
        let _ = stopping.send(true);
    };

    // Nagle's algorithm would hold back the second write of a response (a
    // token is larger than a health check) until the client's delayed ACK,
    // adding about 40 ms to each call.
    let incoming = TcpListenerStream::new(listener).map(|accepted| {
        if let Ok(stream) = &accepted {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::warn!(%error, "cannot disable Nagle's algorithm on a connection");
            }
        }
        accepted
    });
    let server = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, signal);
    let mut stop = stop_requested.clone();
    let grace_elapsed = async move {
        let _ = stop.wait_for(|stopping| *stopping).await;
        tokio::time::sleep(opened.shutdown_grace).await;
    };
    // Tonic's graceful shutdown waits for every connection to close, and an
    // idle client may keep one open indefinitely, so the wait is bounded.
    tokio::select! {
        result = server => result.map_err(|e| StartupError(format!("gRPC server failed: {e}")))?,
        () = grace_elapsed => tracing::warn!(
            grace_ms = opened.shutdown_grace.as_millis() as u64,
            "shutdown grace period elapsed; closing the connections still open"
        ),
    }
    checker.abort();
    if let Some(task) = readiness {
        task.abort();
    }
    if let Some(task) = changes {
        task.abort();
    }
    if let Some(task) = forwarder {
        task.abort();
    }
    if let Some(task) = metrics_task {
        task.abort();
    }
    if let Some(task) = health_task {
        task.abort();
    }
    store
        .flush()
        .await
        .map_err(|e| StartupError(format!("cannot flush the database: {e}")))?;
    tracing::info!("database flushed");
    Ok(())
}
