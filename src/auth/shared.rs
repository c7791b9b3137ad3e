//! The caller policy shared between replicas on PostgreSQL. A replica with
//! a policy file stores the file's text when it starts and each time it
//! reloads the file, sealed under the newest master key. Every replica with
//! a policy file then enforces the text stored last, within a second of the
//! change, announced by a notification, once its seal verifies. A replica
//! without a policy file stays open and ignores the shared policy: its
//! listener is loopback-only.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::Authenticator;
use crate::keyring::Keyring;
use crate::store::PostgresStore;
use crate::store::postgres::SharedPolicy;

/// Reason a replica does not enforce the policy stored in the database.
#[derive(Debug, thiserror::Error)]
pub enum PolicyRejected {
    /// The row carries no seal, because a replica of an older version or a
    /// direct write to the database stored it.
    #[error("the shared policy is not sealed")]
    Unsealed,
    /// The seal names a master key missing from this replica's keyring.
    #[error("the shared policy is sealed with master key {0}, which is not configured")]
    UnknownKey(String),
    /// The `sha256` column is not the SHA-256 of the document.
    #[error("the shared policy's sha256 does not match its document")]
    DigestMismatch,
    /// The seal does not open under the key it names, or seals another
    /// document: the row was changed without the master key.
    #[error("the shared policy's seal does not verify under master key {0}")]
    BadSeal(String),
}

/// Keeps one replica's policy in step with the shared one.
pub struct PolicySync {
    store: PostgresStore,
    auth: Arc<Authenticator>,
    keyring: Arc<Keyring>,
    /// Held across each publish and apply, so that a policy waiting to be
    /// shared is stored before any shared policy is read.
    state: tokio::sync::Mutex<SyncState>,
}

#[derive(Default)]
struct SyncState {
    /// SHA-256 of the text in force, so a notification of the policy this
    /// replica stored itself changes nothing.
    in_force: Option<String>,
    /// A policy this replica loaded from its file but could not store, to
    /// be stored when the database is reachable again.
    /// NOTE: it replaces whatever is shared by then, including a policy
    /// that a replica which could still reach the database stored later.
    pending: Option<String>,
    /// SHA-256 of the stored policy rejected last, so that repeated
    /// notifications of one bad row log one error.
    rejected: Option<String>,
}

impl PolicySync {
    /// Returns `None` when `auth` is open, since an open replica takes no
    /// part.
    pub fn new(
        store: PostgresStore,
        auth: Arc<Authenticator>,
        keyring: Arc<Keyring>,
    ) -> Option<Arc<Self>> {
        (!auth.is_open()).then(|| {
            Arc::new(Self {
                store,
                auth,
                keyring,
                state: tokio::sync::Mutex::new(SyncState::default()),
            })
        })
    }

    /// Stores `document`, a policy this replica loaded from its file, for
    /// every replica. If that fails, the others keep the policy they have,
    /// and this replica stores `document` on the next `apply`, before it
    /// reads anything.
    pub async fn publish(&self, document: String) {
        let mut state = self.state.lock().await;
        state.in_force = Some(sha256_hex(&document));
        match self.store_policy(&document).await {
            Ok(sha256) => {
                state.pending = None;
                tracing::info!(policy.sha256 = %sha256, "policy shared with the other replicas");
            }
            Err(error) => {
                state.pending = Some(document);
                tracing::error!(
                    %error,
                    "cannot share the policy with the other replicas; they keep the one they \
                     have, and this replica shares its policy when the database responds again"
                );
            }
        }
    }

    /// Shares the policy that `publish` could not store, if any. Otherwise
    /// reads the shared policy and enforces it, unless it is already in
    /// force. A row whose seal does not verify or whose text is invalid
    /// leaves the current policy in force.
    pub async fn apply(&self) {
        let mut state = self.state.lock().await;
        if let Some(document) = state.pending.clone() {
            match self.store_policy(&document).await {
                Ok(sha256) => {
                    state.pending = None;
                    tracing::info!(
                        policy.sha256 = %sha256,
                        "policy loaded while the database was unreachable is now shared with the \
                         other replicas"
                    );
                }
                Err(error) => tracing::warn!(
                    %error,
                    "the policy loaded while the database was unreachable is still not shared; \
                     it stays in force here"
                ),
            }
            return;
        }
        let shared = match self.store.read_policy().await {
            Ok(Some(shared)) => shared,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%error, "cannot read the shared policy; the current one stays in force");
                return;
            }
        };
        if state.in_force.as_deref() == Some(&shared.sha256) {
            return;
        }
        if let Err(error) = verify(&self.keyring, &shared) {
            if state.rejected.as_deref() == Some(&shared.sha256) {
                tracing::debug!(policy.sha256 = %shared.sha256, %error, "shared policy rejected again");
            } else {
                tracing::error!(
                    policy.sha256 = %shared.sha256,
                    %error,
                    "shared policy rejected; the current one stays in force. Reload the policy \
                     file on a replica (SIGHUP) to store a sealed policy again"
                );
                state.rejected = Some(shared.sha256);
            }
            return;
        }
        match self.auth.install(&shared.document) {
            Ok(callers) => {
                state.in_force = Some(shared.sha256.clone());
                state.rejected = None;
                if callers == 0 {
                    tracing::warn!(
                        policy.sha256 = %shared.sha256,
                        "the shared policy names no callers, so every call is rejected"
                    );
                }
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

    /// Seals `document` under the newest master key and stores it.
    /// Returns its SHA-256.
    async fn store_policy(&self, document: &str) -> Result<String, crate::store::StoreError> {
        let key = self.keyring.newest();
        let policy = SharedPolicy {
            document: document.to_owned(),
            sha256: sha256_hex(document),
            master_key_id: Some(key.id().to_owned()),
            seal: Some(key.seal_policy(document)),
        };
        self.store.publish_policy(&policy, &loaded_by()).await?;
        Ok(policy.sha256)
    }
}

/// Checks that a stored policy was sealed by a replica holding a configured
/// master key.
///
/// NOTE: the seal does not say when the policy was stored, so a sealed row
/// copied back from earlier, such as from a backup, still verifies.
fn verify(keyring: &Keyring, shared: &SharedPolicy) -> Result<(), PolicyRejected> {
    let (Some(key_id), Some(seal)) = (&shared.master_key_id, &shared.seal) else {
        return Err(PolicyRejected::Unsealed);
    };
    let key = keyring
        .get(key_id)
        .ok_or_else(|| PolicyRejected::UnknownKey(key_id.clone()))?;
    if sha256_hex(&shared.document) != shared.sha256 {
        return Err(PolicyRejected::DigestMismatch);
    }
    key.verify_policy(&shared.document, seal)
        .map_err(|_| PolicyRejected::BadSeal(key_id.clone()))
}

fn sha256_hex(document: &str) -> String {
    hex::encode(Sha256::digest(document.as_bytes()))
}

/// Names this process in `stvault_policy.loaded_by`.
fn loaded_by() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "stvault".to_owned());
    format!("{host}/{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;

    const DOCUMENT: &str = "[[caller]]\nname = \"ops\"\n";

    fn sealed(key: &MasterKey, document: &str) -> SharedPolicy {
        SharedPolicy {
            document: document.to_owned(),
            sha256: sha256_hex(document),
            master_key_id: Some(key.id().to_owned()),
            seal: Some(key.seal_policy(document)),
        }
    }

    #[test]
    fn sealed_policy_verifies_under_any_configured_key() {
        let (old, old_text) = MasterKey::generate();
        let (_, new_text) = MasterKey::generate();
        let old_policy = sealed(&old, DOCUMENT);
        let keyring =
            Keyring::parse(&format!("{}\n{}\n", old_text.expose(), new_text.expose())).unwrap();
        assert!(verify(&keyring, &old_policy).is_ok());
        assert!(verify(&keyring, &sealed(keyring.newest(), DOCUMENT)).is_ok());
    }

    #[test]
    fn forged_policy_is_rejected() {
        let (key, _) = MasterKey::generate();
        let mut policy = sealed(&key, DOCUMENT);
        let forged = "[[caller]]\nname = \"intruder\"\n";
        policy.document = forged.to_owned();
        policy.sha256 = sha256_hex(forged);
        let keyring = Keyring::from(key);
        assert!(matches!(
            verify(&keyring, &policy),
            Err(PolicyRejected::BadSeal(_))
        ));
    }

    #[test]
    fn digest_mismatch_is_rejected() {
        let (key, _) = MasterKey::generate();
        let mut policy = sealed(&key, DOCUMENT);
        policy.sha256 = sha256_hex("");
        let keyring = Keyring::from(key);
        assert!(matches!(
            verify(&keyring, &policy),
            Err(PolicyRejected::DigestMismatch)
        ));
    }

    #[test]
    fn unsealed_policy_is_rejected() {
        let (key, _) = MasterKey::generate();
        let mut policy = sealed(&key, "");
        policy.seal = None;
        let keyring = Keyring::from(key);
        assert!(matches!(
            verify(&keyring, &policy),
            Err(PolicyRejected::Unsealed)
        ));
    }

    #[test]
    fn unknown_key_is_rejected() {
        let (key, _) = MasterKey::generate();
        let (other, _) = MasterKey::generate();
        let policy = sealed(&other, DOCUMENT);
        let keyring = Keyring::from(key);
        assert!(matches!(
            verify(&keyring, &policy),
            Err(PolicyRejected::UnknownKey(id)) if id == other.id()
        ));
    }
}
