//! stvault: a gRPC credential vault and token broker for ServiceTitan
//! integrations. `open` opens the data directory, checks the master key and
//! loads the policy; `serve` runs the gRPC server until shutdown.

pub mod api;
pub mod audit;
pub mod auth;
pub mod broker;
pub mod config;
pub mod crypto;
pub mod health;
pub mod model;
pub mod secret;
pub mod servicetitan;
pub mod store;
pub mod testhook;
pub mod vault;
pub mod verify;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;

use crate::config::{Config, MasterKeySource};
use crate::crypto::MasterKey;
use crate::store::{KeyCheck, Store};

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
}

/// Loads the master key, opens the data directory and checks that the key
/// is the one the directory was written with.
pub async fn open(config: &Config) -> Result<Opened, StartupError> {
    testhook::init_from_env();
    create_data_dir(&config.data_dir)?;
    let master_key = load_master_key(&config.master_key)?;
    let store = Store::open(&config.data_dir).map_err(|e| {
        StartupError(format!(
            "cannot open the database in {}: {e}",
            config.data_dir.display()
        ))
    })?;
    match store
        .check_master_key(&master_key)
        .await
        .map_err(|e| StartupError(format!("cannot read the data directory: {e}")))?
    {
        KeyCheck::Matches => {}
        KeyCheck::Mismatch { stored_key_ids } => {
            return Err(StartupError(format!(
                "the configured master key ({}) is not the key this data directory was written with ({}); \
                 configure the original key",
                master_key.id(),
                stored_key_ids.join(", ")
            )));
        }
    }

    let audit = audit::AuditLog::open(store.db())
        .map_err(|e| StartupError(format!("cannot open the audit trail: {e}")))?;
    let auth = authenticator(config);

    let client =
        servicetitan::ServiceTitanClient::new(config.client.clone()).map_err(StartupError)?;
    let broker = Arc::new(broker::Broker::new(client, config.broker.clone()));
    let vault = Arc::new(vault::Vault::new(store, broker, master_key));
    let cleaned = vault
        .discard_stale_pending()
        .await
        .map_err(|e| StartupError(format!("cannot clean up interrupted rotations: {e}")))?;
    for id in cleaned {
        tracing::warn!(connection.id = %id, "discarded a pending credential version left by an interrupted rotation");
    }
    Ok(Opened {
        vault,
        health: config.health.clone(),
        auth: Arc::new(auth),
        audit: Arc::new(audit),
        tls: config.tls.clone(),
    })
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

/// Serves the gRPC API on `listener` until `shutdown` completes.
pub async fn serve(
    opened: Opened,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartupError> {
    let service = pb::credential_vault_server::CredentialVaultServer::new(api::VaultService::new(
        opened.vault.clone(),
        opened.auth.clone(),
        opened.audit.clone(),
    ));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::credential_vault_server::CredentialVaultServer<api::VaultService>>()
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

    // Health and reflection need no credentials: health reports only
    // whether the server is up, for probes, and reflection returns the
    // public schema that grpcurl needs before it can call anything.
    let store = opened.vault.store().clone();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &opened.tls {
        builder = builder
            .tls_config(tls.server_config())
            .map_err(|e| StartupError(format!("invalid TLS configuration: {e}")))?;
    }
    let checker = tokio::spawn(health::run(
        opened.vault.clone(),
        opened.health.clone(),
        opened.vault.broker().take_rejections(),
    ));
    let vault = opened.vault.clone();
    let shutdown = async move {
        shutdown.await;
        // Status watches never end on their own, so end them for the
        // graceful shutdown to finish.
        vault.stop_watchers();
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
    let served = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    checker.abort();
    served.map_err(|e| StartupError(format!("gRPC server failed: {e}")))?;
    store
        .flush()
        .await
        .map_err(|e| StartupError(format!("cannot flush the database: {e}")))?;
    Ok(())
}

fn create_data_dir(dir: &Path) -> Result<(), StartupError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| {
            StartupError(format!(
                "cannot create data directory {}: {e}",
                dir.display()
            ))
        })
}

fn load_master_key(source: &MasterKeySource) -> Result<MasterKey, StartupError> {
    match source {
        MasterKeySource::Environment(text) => MasterKey::from_base64(text.expose())
            .map_err(|e| StartupError(format!("{}: {e}", config::ENV_MASTER_KEY))),
        MasterKeySource::File(path) => read_key_file(path),
        MasterKeySource::DataDir(path) if path.exists() => {
            tracing::warn!(
                path = %path.display(),
                "using the master key stored in the data directory; in production, keep it elsewhere \
                 and set STVAULT_MASTER_KEY_FILE"
            );
            read_key_file(path)
        }
        MasterKeySource::DataDir(path) => generate_key_file(path),
    }
}

fn read_key_file(path: &Path) -> Result<MasterKey, StartupError> {
    config::check_key_file_mode(path).map_err(StartupError)?;
    let text = crate::secret::SecretString::new(std::fs::read_to_string(path).map_err(|e| {
        StartupError(format!(
            "cannot read master key file {}: {e}",
            path.display()
        ))
    })?);
    MasterKey::from_base64(text.expose())
        .map_err(|e| StartupError(format!("master key file {}: {e}", path.display())))
}

fn generate_key_file(path: &Path) -> Result<MasterKey, StartupError> {
    use std::os::unix::fs::OpenOptionsExt;
    let (key, text) = MasterKey::generate();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            StartupError(format!(
                "cannot create master key file {}: {e}",
                path.display()
            ))
        })?;
    file.write_all(text.expose().as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .map_err(|e| {
            StartupError(format!(
                "cannot write master key file {}: {e}",
                path.display()
            ))
        })?;
    tracing::warn!(
        path = %path.display(),
        key.id = key.id(),
        "generated a new master key inside the data directory; in production, keep the key elsewhere \
         (STVAULT_MASTER_KEY_FILE) and back it up separately from the data"
    );
    Ok(key)
}
