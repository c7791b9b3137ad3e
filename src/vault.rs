//! The vault's operations, independent of gRPC: register, rotate, roll back,
//! verify, delete and hand out tokens, over the store and the broker.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::broker::{Broker, CachedToken, Credentials, Slot};
use crate::crypto::DataKey;
use crate::keyring::Keyring;
use crate::model::Environment;
use crate::secret::SecretString;
use crate::servicetitan::TokenError;
use crate::store::{ConnectionRecord, CredentialVersion, Store, StoreError, VersionState};
use crate::verify::{self, Report};

const CLIENT_SECRET_FIELD: &str = "client_secret";
const APP_KEY_FIELD: &str = "app_key";
/// Times an operation re-reads a record after a concurrent change.
const MAX_CONFLICT_RETRIES: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("connection {0} not found")]
    NotFound(String),
    #[error("no connection for {environment} tenant {tenant_id}")]
    TenantNotFound {
        environment: Environment,
        tenant_id: i64,
    },
    /// Different credentials for a tenant that already has a connection.
    #[error(
        "a connection for {environment} tenant {tenant_id} already exists ({connection_id}) with other credentials; use RotateCredentials to change them"
    )]
    TenantTaken {
        environment: Environment,
        tenant_id: i64,
        connection_id: String,
    },
    /// Verification failed; the report says which check and why.
    #[error("verification failed")]
    VerificationFailed(Box<Report>),
    #[error("connection {0} has no previous credential version to roll back to")]
    NoPreviousVersion(String),
    #[error("token request failed: {0}")]
    Token(TokenError),
    /// A sealed field failed to decrypt: the record was altered, or a blob
    /// was copied from another record.
    #[error("stored credentials of connection {0} failed integrity checks")]
    Integrity(String),
    #[error("connection {0} is being changed by another request; retry")]
    Busy(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Credentials of a new connection, already validated.
pub struct NewConnection {
    pub environment: Environment,
    pub tenant_id: i64,
    pub client_id: String,
    pub client_secret: SecretString,
    pub app_key: SecretString,
    pub display_name: String,
    pub labels: BTreeMap<String, String>,
    pub enterprise_hub: bool,
    pub required_scope_groups: Vec<String>,
    pub skip_verification: bool,
}

/// Replacement credentials; `None` keeps the stored value.
pub struct Rotation {
    pub client_id: Option<String>,
    pub client_secret: Option<SecretString>,
    pub app_key: Option<SecretString>,
    pub skip_verification: bool,
}

/// A token handed to a caller, with what it needs to call the API.
pub struct IssuedAccess {
    pub token: Arc<CachedToken>,
    pub slot: Arc<Slot>,
}

pub struct Vault {
    store: Store,
    broker: Arc<Broker>,
    /// Master keys: new data keys are wrapped under the newest, and each
    /// record is unwrapped with the key it names.
    keyring: Keyring,
    /// Serializes credential changes per connection, so a rotation's
    /// verification runs without a concurrent rotation racing it.
    change_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Vault {
    pub fn new(store: Store, broker: Arc<Broker>, keyring: impl Into<Keyring>) -> Self {
        Self {
            store,
            broker,
            keyring: keyring.into(),
            change_locks: Mutex::new(HashMap::new()),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    pub fn get(&self, id: &str) -> Result<ConnectionRecord, VaultError> {
        self.store
            .get(id)?
            .ok_or_else(|| VaultError::NotFound(id.to_owned()))
    }

    pub fn find(
        &self,
        environment: Environment,
        tenant_id: i64,
    ) -> Result<ConnectionRecord, VaultError> {
        self.store
            .find_by_tenant(environment, tenant_id)?
            .ok_or(VaultError::TenantNotFound {
                environment,
                tenant_id,
            })
    }

    /// Registers a connection, or returns the existing one when the same
    /// credentials are registered again.
    pub async fn register(
        &self,
        new: NewConnection,
        caller: &str,
    ) -> Result<(ConnectionRecord, bool), VaultError> {
        if let Some(existing) = self.store.find_by_tenant(new.environment, new.tenant_id)? {
            return self.same_or_taken(existing, &new).map(|r| (r, false));
        }

        let id = uuid::Uuid::now_v7().to_string();
        let mut last_verified_at = None;
        if !new.skip_verification {
            let credentials = Credentials {
                connection_id: id.clone(),
                version: 1,
                environment: new.environment,
                tenant_id: new.tenant_id,
                client_id: new.client_id.clone(),
                client_secret: new.client_secret.clone(),
                app_key: new.app_key.clone(),
                enterprise_hub: new.enterprise_hub,
            };
            let report = verify::verify(
                self.broker.client(),
                &credentials,
                &new.required_scope_groups,
            )
            .await;
            if !report.ok() {
                return Err(VaultError::VerificationFailed(Box::new(report)));
            }
            last_verified_at = Some(report.checked_at);
        }

        let now = SystemTime::now();
        let data_key = DataKey::generate();
        let record = ConnectionRecord {
            id: id.clone(),
            environment: new.environment,
            tenant_id: new.tenant_id,
            display_name: new.display_name.clone(),
            labels: new.labels.clone(),
            enterprise_hub: new.enterprise_hub,
            required_scope_groups: new.required_scope_groups.clone(),
            created_at: now,
            updated_at: now,
            last_verified_at,
            master_key_id: self.keyring.newest().id().to_owned(),
            wrapped_data_key: self.keyring.newest().wrap(&id, &data_key),
            versions: vec![seal_version(
                &data_key,
                &id,
                1,
                VersionState::Current,
                &new.client_id,
                &new.client_secret,
                &new.app_key,
                caller,
            )],
        };
        match self.store.insert(&record).await {
            Ok(()) => Ok((record, true)),
            Err(StoreError::TenantTaken { existing_id, .. }) => {
                // A concurrent registration of the same tenant won the race.
                let existing = self.get(&existing_id)?;
                self.same_or_taken(existing, &new).map(|r| (r, false))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn same_or_taken(
        &self,
        existing: ConnectionRecord,
        new: &NewConnection,
    ) -> Result<ConnectionRecord, VaultError> {
        let current = self.open_current(&existing)?;
        let same = current.client_id == new.client_id
            && current.client_secret.ct_eq(&new.client_secret)
            && current.app_key.ct_eq(&new.app_key);
        if same {
            Ok(existing)
        } else {
            Err(VaultError::TenantTaken {
                environment: existing.environment,
                tenant_id: existing.tenant_id,
                connection_id: existing.id,
            })
        }
    }

    /// Decrypts the current credential version of a record.
    pub fn open_current(&self, record: &ConnectionRecord) -> Result<Credentials, VaultError> {
        self.open_version(record, record.current())
    }

    fn open_version(
        &self,
        record: &ConnectionRecord,
        version: &CredentialVersion,
    ) -> Result<Credentials, VaultError> {
        let integrity = || VaultError::Integrity(record.id.clone());
        let data_key = self.data_key(record)?;
        let client_secret = data_key
            .open(
                &record.id,
                CLIENT_SECRET_FIELD,
                version.version,
                &version.client_secret,
            )
            .map_err(|_| integrity())?;
        let app_key = data_key
            .open(&record.id, APP_KEY_FIELD, version.version, &version.app_key)
            .map_err(|_| integrity())?;
        Ok(Credentials {
            connection_id: record.id.clone(),
            version: version.version,
            environment: record.environment,
            tenant_id: record.tenant_id,
            client_id: version.client_id.clone(),
            client_secret,
            app_key,
            enterprise_hub: record.enterprise_hub,
        })
    }

    /// Unwraps a record's data key with the master key the record names.
    fn data_key(&self, record: &ConnectionRecord) -> Result<DataKey, VaultError> {
        self.keyring
            .unwrap_data_key(record)
            .map_err(|_| VaultError::Integrity(record.id.clone()))
    }

    fn change_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .change_locks
            .lock()
            .expect("lock map is never poisoned");
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(id.to_owned()).or_default().clone()
    }

    /// Rotates credentials: stores them as a pending version, verifies them,
    /// then makes them current and the former current version previous. A
    /// failed verification discards the pending version and leaves the
    /// current one in use.
    pub async fn rotate(
        &self,
        id: &str,
        rotation: Rotation,
        caller: &str,
    ) -> Result<ConnectionRecord, VaultError> {
        let lock = self.change_lock(id);
        let _guard = lock.lock().await;

        let record = self.get(id)?;
        let current = self.open_current(&record)?;
        let client_id = rotation
            .client_id
            .unwrap_or_else(|| current.client_id.clone());
        let client_secret = rotation
            .client_secret
            .unwrap_or_else(|| current.client_secret.clone());
        let app_key = rotation.app_key.unwrap_or_else(|| current.app_key.clone());
        let unchanged = client_id == current.client_id
            && client_secret.ct_eq(&current.client_secret)
            && app_key.ct_eq(&current.app_key);
        if unchanged {
            // A retried rotation whose first attempt succeeded.
            return Ok(record);
        }

        let data_key = self.data_key(&record)?;
        let number = record.next_version_number();
        let mut staged = record.clone();
        staged.versions.retain(|v| v.state != VersionState::Pending);
        staged.versions.push(seal_version(
            &data_key,
            id,
            number,
            VersionState::Pending,
            &client_id,
            &client_secret,
            &app_key,
            caller,
        ));

        // `base` is the record as stored right before the promotion.
        let mut next = staged.clone();
        let base = if rotation.skip_verification {
            record
        } else {
            // The pending version is on disk before ServiceTitan is asked, so
            // a crash during verification leaves it to be discarded at startup.
            self.store.replace(&record, &staged).await?;
            let credentials = Credentials {
                connection_id: id.to_owned(),
                version: number,
                environment: record.environment,
                tenant_id: record.tenant_id,
                client_id: client_id.clone(),
                client_secret: client_secret.clone(),
                app_key: app_key.clone(),
                enterprise_hub: record.enterprise_hub,
            };
            let report = verify::verify(
                self.broker.client(),
                &credentials,
                &record.required_scope_groups,
            )
            .await;
            if !report.ok() {
                let mut discarded = staged.clone();
                discarded.versions.retain(|v| v.version != number);
                self.store.replace(&staged, &discarded).await?;
                return Err(VaultError::VerificationFailed(Box::new(report)));
            }
            next.last_verified_at = Some(report.checked_at);
            staged
        };
        promote(&mut next, number);
        next.updated_at = SystemTime::now();
        self.store.replace(&base, &next).await?;
        self.broker.invalidate(id);
        Ok(next)
    }

    /// Makes the previous credential version current again.
    pub async fn rollback(&self, id: &str) -> Result<ConnectionRecord, VaultError> {
        let lock = self.change_lock(id);
        let _guard = lock.lock().await;

        let record = self.get(id)?;
        let Some(previous) = record
            .versions
            .iter()
            .find(|v| v.state == VersionState::Previous)
        else {
            return Err(VaultError::NoPreviousVersion(id.to_owned()));
        };
        let number = previous.version;
        let mut next = record.clone();
        promote(&mut next, number);
        next.updated_at = SystemTime::now();
        self.store.replace(&record, &next).await?;
        self.broker.invalidate(id);
        Ok(next)
    }

    /// Verifies the stored credentials and records the time of a success.
    pub async fn verify(&self, id: &str) -> Result<Report, VaultError> {
        let record = self.get(id)?;
        let credentials = self.open_current(&record)?;
        let report = verify::verify(
            self.broker.client(),
            &credentials,
            &record.required_scope_groups,
        )
        .await;
        if report.ok() {
            self.update(id, |r| {
                if r.current().version == credentials.version {
                    r.last_verified_at = Some(report.checked_at);
                }
            })
            .await?;
        }
        Ok(report)
    }

    /// Applies `change` to the stored record, re-reading on a concurrent write.
    pub async fn update(
        &self,
        id: &str,
        change: impl Fn(&mut ConnectionRecord),
    ) -> Result<ConnectionRecord, VaultError> {
        for _ in 0..MAX_CONFLICT_RETRIES {
            let record = self.get(id)?;
            let mut next = record.clone();
            change(&mut next);
            match self.store.replace(&record, &next).await {
                Ok(()) => return Ok(next),
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(VaultError::Busy(id.to_owned()))
    }

    pub async fn delete(&self, id: &str) -> Result<ConnectionRecord, VaultError> {
        let lock = self.change_lock(id);
        let _guard = lock.lock().await;
        let record = match self.store.delete(id).await {
            Ok(record) => record,
            Err(StoreError::NotFound(_)) => return Err(VaultError::NotFound(id.to_owned())),
            Err(e) => return Err(e.into()),
        };
        self.broker.invalidate(id);
        Ok(record)
    }

    /// Returns a token for the connection with at least `min_valid_for`
    /// left, from the cache when possible.
    pub async fn access_token(
        &self,
        id: &str,
        min_valid_for: Duration,
    ) -> Result<IssuedAccess, VaultError> {
        let slot = self.slot(id)?;
        let token = self
            .broker
            .token(&slot, min_valid_for)
            .await
            .map_err(VaultError::Token)?;
        Ok(IssuedAccess { token, slot })
    }

    /// Returns the broker's cache entry of a connection, loading and
    /// decrypting its current credentials on a miss.
    fn slot(&self, id: &str) -> Result<Arc<Slot>, VaultError> {
        for _ in 0..MAX_CONFLICT_RETRIES {
            let epoch = match self.broker.slot(id) {
                Ok(slot) => return Ok(slot),
                Err(epoch) => epoch,
            };
            let record = self.get(id)?;
            let credentials = self.open_current(&record)?;
            if let Some(slot) = self.broker.install(epoch, credentials) {
                return Ok(slot);
            }
        }
        Err(VaultError::Busy(id.to_owned()))
    }

    /// Discards pending versions left by a rotation that crashed before it
    /// finished. Returns the ids of the connections cleaned up.
    pub async fn discard_stale_pending(&self) -> Result<Vec<String>, VaultError> {
        let mut cleaned = Vec::new();
        let stale: Vec<String> = self
            .store
            .iter()
            .filter_map(|r| r.ok())
            .filter(|r| r.versions.iter().any(|v| v.state == VersionState::Pending))
            .map(|r| r.id)
            .collect();
        for id in stale {
            self.update(&id, |r| {
                r.versions.retain(|v| v.state != VersionState::Pending)
            })
            .await?;
            cleaned.push(id);
        }
        Ok(cleaned)
    }
}

/// Makes version `number` current and the former current one previous.
/// Every other version is dropped, so at most two are kept.
fn promote(record: &mut ConnectionRecord, number: u32) {
    let former = record.current().version;
    record
        .versions
        .retain(|v| v.version == number || v.version == former);
    for version in &mut record.versions {
        version.state = if version.version == number {
            VersionState::Current
        } else {
            VersionState::Previous
        };
    }
}

#[allow(clippy::too_many_arguments)]
fn seal_version(
    data_key: &DataKey,
    id: &str,
    number: u32,
    state: VersionState,
    client_id: &str,
    client_secret: &SecretString,
    app_key: &SecretString,
    caller: &str,
) -> CredentialVersion {
    CredentialVersion {
        version: number,
        state,
        client_id: client_id.to_owned(),
        client_secret: data_key.seal(id, CLIENT_SECRET_FIELD, number, client_secret),
        app_key: data_key.seal(id, APP_KEY_FIELD, number, app_key),
        app_key_hint: app_key.hint(),
        created_at: SystemTime::now(),
        created_by: caller.to_owned(),
    }
}
