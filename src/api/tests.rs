//! Direct calls to the service: a call whose audit event cannot be written
//! fails with `UNAVAILABLE`, and later calls are refused before they act.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Code, Request};

use super::VaultService;
use crate::audit::AuditLog;
use crate::auth::Authenticator;
use crate::broker::{Broker, BrokerSettings};
use crate::crypto::MasterKey;
use crate::pb;
use crate::pb::credential_vault_server::CredentialVault;
use crate::servicetitan::{ClientConfig, Endpoints, ServiceTitanClient};
use crate::store::Store;
use crate::vault::Vault;

/// Builds a service on a fresh data directory. Its ServiceTitan endpoints
/// are a closed loopback port, so use it only for calls that stay local.
fn service(dir: &std::path::Path) -> (VaultService, Arc<AuditLog>) {
    let store = Store::open(dir).unwrap();
    let unreachable = Endpoints {
        token_url: "http://127.0.0.1:9/token".parse().unwrap(),
        api_url: "http://127.0.0.1:9/api".parse().unwrap(),
    };
    let client = ServiceTitanClient::new(ClientConfig {
        production: unreachable.clone(),
        integration: unreachable,
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(1),
    })
    .unwrap();
    let broker = Arc::new(Broker::new(
        client,
        BrokerSettings {
            failure_cooldown: Duration::from_secs(1),
        },
    ));
    let audit = Arc::new(AuditLog::open(dir, Default::default()).unwrap());
    let (master_key, _) = MasterKey::generate();
    let vault = Arc::new(Vault::new(store, broker, master_key));
    let service = VaultService::new(vault, Arc::new(Authenticator::open()), audit.clone());
    (service, audit)
}

fn register_request() -> pb::RegisterConnectionRequest {
    pb::RegisterConnectionRequest {
        environment: pb::Environment::Integration as i32,
        tenant_id: 8450,
        client_id: "cid.unit".into(),
        client_secret: "cs1.unit".into(),
        app_key: "ak1.unit".into(),
        skip_verification: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn failed_audit_write_fails_call() {
    let dir = tempfile::tempdir().unwrap();
    let (service, audit) = service(dir.path());

    audit.fail_appends(true);
    let error = service
        .list_connections(Request::new(pb::ListConnectionsRequest::default()))
        .await
        .expect_err("unaudited call");
    assert_eq!(error.code(), Code::Unavailable);
    assert!(error.message().contains("audit"), "{}", error.message());
    assert!(error.metadata().get("x-request-id").is_some());

    // While appends fail, a call is refused before it acts.
    let error = service
        .register_connection(Request::new(register_request()))
        .await
        .expect_err("refused while the trail is failing");
    assert_eq!(error.code(), Code::Unavailable);
    assert!(
        service.vault.store().is_empty().await.unwrap(),
        "the refused call acted"
    );
    assert!(audit.is_empty().await.unwrap());

    // Once writes work again, the first call is refused but audited, and
    // the next one runs.
    audit.fail_appends(false);
    let error = service
        .register_connection(Request::new(register_request()))
        .await
        .expect_err("still refused");
    assert_eq!(error.code(), Code::Unavailable);
    assert_eq!(audit.len().await.unwrap(), 1);
    let connection = service
        .register_connection(Request::new(register_request()))
        .await
        .expect("registers once the trail is healthy")
        .into_inner();
    assert_eq!(connection.versions[0].created_by, "anonymous");
    assert_eq!(audit.len().await.unwrap(), 2);
}
