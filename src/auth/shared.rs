//! The caller policy shared between replicas on PostgreSQL. A replica with
//! a policy file stores the file's text when it starts and each time it
//! reloads the file. Every replica with a policy file then enforces the
//! text stored last, within a second of the change, announced by a
//! notification. A replica without a policy file stays open and ignores the
//! shared policy: its listener is loopback-only.

use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::Authenticator;
use crate::store::PostgresStore;
use crate::store::postgres::SharedPolicy;

/// Keeps one replica's policy in step with the shared one.
pub struct PolicySync {
    store: PostgresStore,
    auth: Arc<Authenticator>,
    /// SHA-256 of the text in force, so a notification of the policy this
    /// replica stored itself changes nothing.
    in_force: Mutex<Option<String>>,
}

impl PolicySync {
    /// Returns `None` when `auth` is open, since an open replica takes no
    /// part.
    pub fn new(store: PostgresStore, auth: Arc<Authenticator>) -> Option<Arc<Self>> {
        (!auth.is_open()).then(|| {
            Arc::new(Self {
                store,
                auth,
                in_force: Mutex::new(None),
            })
        })
    }

    /// Stores `document`, a policy this replica loaded from its file, for
    /// every replica. If that fails, the others keep the policy they have.
    pub async fn publish(&self, document: String) {
        let policy = SharedPolicy {
            sha256: hex::encode(Sha256::digest(document.as_bytes())),
            document,
        };
        *self.in_force.lock().expect("never poisoned") = Some(policy.sha256.clone());
        match self.store.publish_policy(&policy, &loaded_by()).await {
            Ok(()) => tracing::info!(
                policy.sha256 = %policy.sha256,
                "policy shared with the other replicas"
            ),
            Err(error) => tracing::error!(
                %error,
                "cannot share the policy with the other replicas; they keep the one they have"
            ),
        }
    }

    /// Reads the shared policy and enforces it, unless it is already in
    /// force. Invalid text, which a replica of another version might
    /// store, leaves the current policy in force.
    pub async fn apply(&self) {
        let shared = match self.store.read_policy().await {
            Ok(Some(shared)) => shared,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%error, "cannot read the shared policy; the current one stays in force");
                return;
            }
        };
        if self.in_force.lock().expect("never poisoned").as_deref() == Some(&shared.sha256) {
            return;
        }
        match self.auth.install(&shared.document) {
            Ok(callers) => {
                *self.in_force.lock().expect("never poisoned") = Some(shared.sha256.clone());
                tracing::info!(
                    policy.sha256 = %shared.sha256,
                    callers,
                    "policy changed by another replica is now in force"
                );
            }
            Err(error) => tracing::error!(
                policy.sha256 = %shared.sha256,
                %error,
                "the policy another replica stored is invalid; the current one stays in force"
            ),
        }
    }
}

/// Names this process in `stvault_policy.loaded_by`.
fn loaded_by() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "stvault".to_owned());
    format!("{host}/{}", std::process::id())
}
