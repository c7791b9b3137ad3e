//! Readiness reported by the gRPC health service. With a shared PostgreSQL
//! database the server is ready only while queries to the database succeed.
//! Health reports NOT_SERVING when a check query fails, and SERVING again
//! once one succeeds. The vault follows the same checks to serve only
//! cached tokens meanwhile.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::api::VaultService;
use crate::pb::credential_vault_server::CredentialVaultServer;
use crate::vault::Vault;

/// Time between two checks of the database.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long one check may take before the database counts as unreachable.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Checks the vault's store every `CHECK_INTERVAL` and sets the overall
/// health, the CredentialVault service's health and the vault's view of
/// the database to match, until `stopping` turns true.
pub async fn watch_database(
    vault: Arc<Vault>,
    reporter: HealthReporter,
    mut stopping: watch::Receiver<bool>,
) {
    let mut serving = true;
    loop {
        tokio::select! {
            _ = stopping.wait_for(|stopping| *stopping) => return,
            () = tokio::time::sleep(CHECK_INTERVAL) => {}
        }
        let error = match tokio::time::timeout(CHECK_TIMEOUT, vault.store().ping()).await {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.to_string()),
            Err(_) => Some(format!(
                "the database did not answer within {} ms",
                CHECK_TIMEOUT.as_millis()
            )),
        };
        let reachable = error.is_none();
        // Shutdown sets NOT_SERVING itself, which must not be undone here.
        if reachable == serving || *stopping.borrow() {
            continue;
        }
        match error {
            None => tracing::info!("database reachable again; health reports SERVING"),
            Some(error) => {
                tracing::warn!(%error, "database unreachable; health reports NOT_SERVING")
            }
        }
        let status = if reachable {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        vault.set_database_reachable(reachable);
        reporter.set_service_status("", status).await;
        if reachable {
            reporter
                .set_serving::<CredentialVaultServer<VaultService>>()
                .await;
        } else {
            reporter
                .set_not_serving::<CredentialVaultServer<VaultService>>()
                .await;
        }
        serving = reachable;
    }
}
