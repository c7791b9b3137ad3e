//! The vault's operations, independent of gRPC: register, rotate, roll back,
//! verify, delete and hand out tokens, over the store and the broker.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use tokio::sync::{broadcast, watch};

use crate::broker::{Broker, CachedToken, Credentials, Slot};
use crate::crypto::{DataKey, MasterKey};
use crate::health::{Health, HealthState, StatusEvent};
use crate::keyring::Keyring;
use crate::model::Environment;
use crate::secret::SecretString;
use crate::servicetitan::TokenError;
use crate::store::{ConnectionRecord, CredentialVersion, Store, StoreError, VersionState};
use crate::verify::{self, Report};

/// How long a verification waits for the database to read or store a
/// pause after a `429` shared with other replicas.
const SHARED_PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
const CLIENT_SECRET_FIELD: &str = "client_secret";
const APP_KEY_FIELD: &str = "app_key";
/// Times an operation re-reads a record after a concurrent change.
const MAX_CONFLICT_RETRIES: usize = 5;
/// Status events buffered for slow watchers. A watcher further behind gets
/// ABORTED and must watch again.
const STATUS_EVENT_BUFFER: usize = 1024;

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
    /// Verification failed. The report names the failing check and its reason.
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
    /// The database is unreachable and this server caches no token that
    /// satisfies the request. The value names the connection or tenant.
    #[error(
        "the database is unavailable, and this server has no cached token of {0} that is valid for long enough; retry when the database is reachable"
    )]
    NoCachedToken(String),
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

/// The outcome of `Vault::rotate`.
pub struct Rotated {
    pub record: ConnectionRecord,
    /// False when the credentials given equal the current ones, as when a
    /// rotation that succeeded is retried.
    pub changed: bool,
}

/// New connection settings; `None` keeps the stored value.
pub struct SettingsUpdate {
    pub display_name: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub required_scope_groups: Option<Vec<String>>,
    pub skip_verification: bool,
}

/// A token handed to a caller, with what it needs to call the API.
pub struct IssuedAccess {
    pub token: Arc<CachedToken>,
    pub slot: Arc<Slot>,
}

/// Returns the lock of `id` in `locks`, first dropping the locks no caller
/// holds, so the map stays as small as the work in progress.
fn lock_for<T: Default>(
    locks: &Mutex<HashMap<String, Arc<tokio::sync::Mutex<T>>>>,
    id: &str,
) -> Arc<tokio::sync::Mutex<T>> {
    let mut locks = locks.lock().expect("lock map is never poisoned");
    locks.retain(|_, lock| Arc::strong_count(lock) > 1);
    locks.entry(id.to_owned()).or_default().clone()
}

/// The last verification of a connection, shared by the calls that waited
/// for it.
type VerifyLock = Arc<tokio::sync::Mutex<Option<LastVerification>>>;

struct LastVerification {
    finished: std::time::Instant,
    version: u32,
    required_scope_groups: Vec<String>,
    report: Report,
}

pub struct Vault {
    store: Store,
    broker: Arc<Broker>,
    /// Master keys: new data keys are wrapped under the newest, and each
    /// record is unwrapped with the key it names.
    keyring: Arc<Keyring>,
    /// Serializes credential changes per connection, so a rotation's
    /// verification runs without a concurrent rotation racing it.
    change_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// One lock per connection whose credentials are being loaded into the
    /// broker, so a cold burst of callers reads and decrypts the record
    /// once rather than once per caller.
    load_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// One lock per connection being verified, holding the last report, so
    /// concurrent verifications of a connection cost ServiceTitan one.
    verify_locks: Mutex<HashMap<String, VerifyLock>>,
    /// Health state changes, sent once each by the write that made them.
    status_events: broadcast::Sender<StatusEvent>,
    /// Set to true when the server shuts down, to end status watches.
    stopping: watch::Sender<bool>,
    /// False while readiness checks cannot reach a shared database.
    database_reachable: AtomicBool,
}

impl Vault {
    pub fn new(store: Store, broker: Arc<Broker>, keyring: impl Into<Keyring>) -> Self {
        Self {
            store,
            broker,
            keyring: Arc::new(keyring.into()),
            change_locks: Mutex::new(HashMap::new()),
            load_locks: Mutex::new(HashMap::new()),
            verify_locks: Mutex::new(HashMap::new()),
            status_events: broadcast::channel(STATUS_EVENT_BUFFER).0,
            stopping: watch::channel(false).0,
            database_reachable: AtomicBool::new(true),
        }
    }

    /// Records whether the shared database is reachable. While it is not,
    /// `access_token` returns only tokens already cached.
    pub fn set_database_reachable(&self, reachable: bool) {
        self.database_reachable.store(reachable, Ordering::SeqCst);
    }

    /// Returns false while readiness checks cannot reach a shared database.
    pub fn database_reachable(&self) -> bool {
        self.database_reachable.load(Ordering::SeqCst)
    }

    /// Returns a receiver of every later health state change.
    pub fn subscribe_status(&self) -> broadcast::Receiver<StatusEvent> {
        self.status_events.subscribe()
    }

    /// Returns a receiver that turns true when the server shuts down.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    /// Ends every status watch, so a graceful shutdown does not wait on them.
    pub fn stop_watchers(&self) {
        self.stopping.send_replace(true);
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Returns the keyring for a task that outlives this borrow.
    pub fn shared_keyring(&self) -> Arc<Keyring> {
        self.keyring.clone()
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    pub async fn get(&self, id: &str) -> Result<ConnectionRecord, VaultError> {
        self.store
            .get(id)
            .await?
            .ok_or_else(|| VaultError::NotFound(id.to_owned()))
    }

    pub async fn find(
        &self,
        environment: Environment,
        tenant_id: i64,
    ) -> Result<ConnectionRecord, VaultError> {
        self.store
            .find_by_tenant(environment, tenant_id)
            .await?
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
        if let Some(existing) = self
            .store
            .find_by_tenant(new.environment, new.tenant_id)
            .await?
        {
            return self.same_or_taken(existing, &new).map(|r| (r, false));
        }

        let id = uuid::Uuid::now_v7().to_string();
        let mut last_verified_at = None;
        let mut health = None;
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
                token_key: None,
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
            health = Some(Health::after(None, 1, &report));
        }

        let mut record = new_record(self.keyring.newest(), id, &new, caller);
        record.last_verified_at = last_verified_at;
        record.health = health;
        match self.store.insert(&record).await {
            Ok(()) => Ok((record, true)),
            Err(StoreError::TenantTaken { existing_id, .. }) => {
                // A concurrent registration of the same tenant won the race.
                let existing = self.get(&existing_id).await?;
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
        let binding = Binding::of_record(record);
        let client_secret = data_key
            .open(
                &record.id,
                &binding.field(CLIENT_SECRET_FIELD, &version.client_id),
                version.version,
                &version.client_secret,
            )
            .map_err(|_| integrity())?;
        let app_key = data_key
            .open(
                &record.id,
                &binding.field(APP_KEY_FIELD, &version.client_id),
                version.version,
                &version.app_key,
            )
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
            token_key: Some(data_key),
        })
    }

    /// Unwraps a record's data key with the master key the record names.
    fn data_key(&self, record: &ConnectionRecord) -> Result<DataKey, VaultError> {
        self.keyring
            .unwrap_data_key(record)
            .map_err(|_| VaultError::Integrity(record.id.clone()))
    }

    fn change_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock_for(&self.change_locks, id)
    }

    /// Rotates credentials: stores them as a pending version, verifies them,
    /// then makes them current and the former current version previous. A
    /// failed verification discards the pending version and leaves the
    /// current one in use. Credentials equal to the current ones change
    /// nothing, which `Rotated::changed` reports.
    pub async fn rotate(
        &self,
        id: &str,
        rotation: Rotation,
        caller: &str,
    ) -> Result<Rotated, VaultError> {
        let lock = self.change_lock(id);
        let _guard = lock.lock().await;

        let record = self.get(id).await?;
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
            return Ok(Rotated {
                record,
                changed: false,
            });
        }

        let data_key = self.data_key(&record)?;
        let number = record.next_version_number();
        let pending = seal_version(
            &data_key,
            id,
            Binding::of_record(&record),
            number,
            VersionState::Pending,
            &client_id,
            &client_secret,
            &app_key,
            caller,
        );
        let stage = |r: &mut ConnectionRecord| {
            r.versions.retain(|v| v.state != VersionState::Pending);
            r.versions.push(pending.clone());
        };

        if rotation.skip_verification {
            let (_, next) = self
                .update_pair(id, |r| {
                    stage(r);
                    promote(r, number);
                    r.updated_at = SystemTime::now();
                })
                .await?;
            self.broker.invalidate(id);
            return Ok(Rotated {
                record: next,
                changed: true,
            });
        }

        // The pending version is on disk before ServiceTitan is asked, so a
        // crash during verification leaves it to be discarded at startup.
        // Each step below is one flushed write of the whole record, so the
        // record always has exactly one current version.
        self.update(id, stage).await?;
        crate::testhook::point("rotate:after_pending").await;
        let credentials = Credentials {
            connection_id: id.to_owned(),
            version: number,
            environment: record.environment,
            tenant_id: record.tenant_id,
            client_id,
            client_secret,
            app_key,
            enterprise_hub: record.enterprise_hub,
            token_key: None,
        };
        let report = verify::verify(
            self.broker.client(),
            &credentials,
            &record.required_scope_groups,
        )
        .await;
        // Another replica sharing the database may have replaced this
        // pending version with its own while this one was verified, so the
        // steps below act only on the exact version staged above.
        let is_staged =
            |v: &CredentialVersion| v.version == number && v.client_secret == pending.client_secret;
        if !report.ok() {
            crate::testhook::point("rotate:before_discard").await;
            self.update(id, |r| {
                r.versions
                    .retain(|v| !(v.state == VersionState::Pending && is_staged(v)))
            })
            .await?;
            return Err(VaultError::VerificationFailed(Box::new(report)));
        }
        crate::testhook::point("rotate:after_verify").await;

        let (before, next) = self
            .update_pair(id, |r| {
                if !r.versions.iter().any(is_staged) {
                    return;
                }
                promote(r, number);
                r.updated_at = SystemTime::now();
                r.last_verified_at = Some(report.checked_at);
                r.health = Some(Health::after(r.health.as_ref(), number, &report));
            })
            .await?;
        if !is_staged(next.current()) {
            return Err(VaultError::Busy(id.to_owned()));
        }
        crate::testhook::point("rotate:after_promote").await;
        self.broker.invalidate(id);
        self.announce(&before, &next);
        Ok(Rotated {
            record: next,
            changed: true,
        })
    }

    /// Makes the previous credential version current again.
    pub async fn rollback(&self, id: &str) -> Result<ConnectionRecord, VaultError> {
        let lock = self.change_lock(id);
        let _guard = lock.lock().await;

        let record = self.get(id).await?;
        let Some(previous) = record
            .versions
            .iter()
            .find(|v| v.state == VersionState::Previous)
        else {
            return Err(VaultError::NoPreviousVersion(id.to_owned()));
        };
        let number = previous.version;
        let (_, next) = self
            .update_pair(id, |r| {
                promote(r, number);
                r.updated_at = SystemTime::now();
            })
            .await?;
        self.broker.invalidate(id);
        Ok(next)
    }

    /// Verifies the stored credentials and records the time of a success.
    /// Calls that arrive while a verification of the same credentials runs
    /// get its report.
    pub async fn verify(&self, id: &str) -> Result<Report, VaultError> {
        let arrived = std::time::Instant::now();
        let lock = lock_for(&self.verify_locks, id);
        let mut last = lock.lock().await;
        // Taken before the read, as `Broker::install` requires.
        let epoch = self.broker.slot(id).err();
        let record = self.get(id).await?;
        let credentials = self.open_current(&record)?;
        if let Some(shared) = &*last {
            if shared.finished >= arrived
                && shared.version == credentials.version
                && shared.required_scope_groups == record.required_scope_groups
            {
                return Ok(shared.report.clone());
            }
        }
        // Token requests of these credentials share one pause after a 429,
        // whichever path met it.
        let version = credentials.version;
        let paused = match self.broker.rate_limit_left(id, version) {
            Some(left) => Some(left),
            None => self.shared_pause_left(id, version).await,
        };
        let report = match paused {
            Some(left) => verify::paused_token_report(left),
            None => {
                let report = verify::verify(
                    self.broker.client(),
                    &credentials,
                    &record.required_scope_groups,
                )
                .await;
                if let Some(wait) = report.token_rate_limit() {
                    // A server that has served no token for the connection
                    // keeps the pause too.
                    if let Some(epoch) = epoch {
                        self.broker.install(epoch, credentials);
                    }
                    self.broker.pause_after_rate_limit(id, version, wait);
                    self.share_pause(id, version, wait).await;
                }
                report
            }
        };
        *last = Some(LastVerification {
            finished: std::time::Instant::now(),
            version,
            required_scope_groups: record.required_scope_groups.clone(),
            report: report.clone(),
        });
        self.record_report(id, version, &report).await?;
        Ok(report)
    }

    /// Returns the pause after a `429` that another replica sharing the
    /// database met for these credentials. A database error counts as no
    /// pause: the verification then requests a token itself.
    async fn shared_pause_left(&self, id: &str, version: u32) -> Option<Duration> {
        let postgres = self.store.postgres()?;
        let read = postgres.token_pause_left(id, version);
        match tokio::time::timeout(SHARED_PAUSE_TIMEOUT, read).await {
            Ok(Ok(left)) => left,
            Ok(Err(error)) => {
                tracing::warn!(connection.id = %id, %error, "failed to read the shared rate limit pause");
                None
            }
            Err(_) => {
                tracing::warn!(
                    connection.id = %id,
                    "timed out reading the shared rate limit pause"
                );
                None
            }
        }
    }

    /// Shares a pause after a `429` with the replicas sharing the database.
    async fn share_pause(&self, id: &str, version: u32, wait: Duration) {
        let Some(postgres) = self.store.postgres() else {
            return;
        };
        let stored = postgres.pause_token_requests(id, version, wait);
        let error = match tokio::time::timeout(SHARED_PAUSE_TIMEOUT, stored).await {
            Ok(Ok(())) => return,
            Ok(Err(error)) => error.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        tracing::warn!(
            connection.id = %id,
            %error,
            "failed to share a rate limit pause with other replicas"
        );
    }

    /// Stores `report` as the connection's health, and the time of a
    /// success, unless the credentials changed since `version` was verified.
    async fn record_report(
        &self,
        id: &str,
        version: u32,
        report: &Report,
    ) -> Result<(), VaultError> {
        let (before, after) = self
            .update_pair(id, |r| {
                if r.current().version != version {
                    return;
                }
                if report.ok() {
                    r.last_verified_at = Some(report.checked_at);
                }
                r.health = Some(Health::after(r.health.as_ref(), version, report));
            })
            .await?;
        self.announce(&before, &after);
        Ok(())
    }

    /// Marks the connection `NeedsAttention` after ServiceTitan rejected
    /// credential `version` with `invalid_client` on a token request.
    pub async fn record_token_rejection(&self, id: &str, version: u32) -> Result<(), VaultError> {
        let record = self.get(id).await?;
        let already = record
            .health
            .as_ref()
            .is_some_and(|h| h.state == HealthState::NeedsAttention && h.version == version);
        if already || record.current().version != version {
            return Ok(());
        }
        self.record_report(id, version, &verify::rejected_token_report())
            .await
    }

    /// Changes a connection's settings. A change of the required scope
    /// groups is verified first unless `skip_verification` is set.
    pub async fn update_settings(
        &self,
        id: &str,
        update: SettingsUpdate,
    ) -> Result<ConnectionRecord, VaultError> {
        let lock = self.change_lock(id);
        let _guard = lock.lock().await;

        let record = self.get(id).await?;
        let mut verified = None;
        if let Some(groups) = &update.required_scope_groups {
            let added = groups
                .iter()
                .any(|g| !record.required_scope_groups.contains(g));
            if added && !update.skip_verification {
                let credentials = self.open_current(&record)?;
                let report = verify::verify(self.broker.client(), &credentials, groups).await;
                if !report.ok() {
                    return Err(VaultError::VerificationFailed(Box::new(report)));
                }
                verified = Some((credentials.version, report));
            }
        }
        let (before, next) = self
            .update_pair(id, |r| {
                if let Some(name) = &update.display_name {
                    r.display_name = name.clone();
                }
                if let Some(labels) = &update.labels {
                    r.labels = labels.clone();
                }
                if let Some(groups) = &update.required_scope_groups {
                    r.required_scope_groups = groups.clone();
                }
                if let Some((version, report)) = &verified {
                    if r.current().version == *version {
                        r.last_verified_at = Some(report.checked_at);
                        r.health = Some(Health::after(r.health.as_ref(), *version, report));
                    }
                }
                r.updated_at = SystemTime::now();
            })
            .await?;
        self.announce(&before, &next);
        Ok(next)
    }

    /// Sends a status event if the health state differs between `before`
    /// and `after`, two consecutive stored versions of one record.
    fn announce(&self, before: &ConnectionRecord, after: &ConnectionRecord) {
        let Some(health) = &after.health else {
            return;
        };
        let previous = before.health.as_ref().map(|h| h.state);
        if previous == Some(health.state) {
            return;
        }
        tracing::info!(
            connection.id = %after.id,
            tenant.id = after.tenant_id,
            health.previous = previous.map_or("unknown", HealthState::as_str),
            health.state = health.state.as_str(),
            "connection health changed"
        );
        // An error means that no watcher is subscribed.
        let _ = self.status_events.send(StatusEvent {
            connection_id: after.id.clone(),
            environment: after.environment,
            tenant_id: after.tenant_id,
            previous,
            health: health.clone(),
        });
    }

    /// Applies `change` to the stored record, re-reading on a concurrent write.
    pub async fn update(
        &self,
        id: &str,
        change: impl Fn(&mut ConnectionRecord),
    ) -> Result<ConnectionRecord, VaultError> {
        self.update_pair(id, change).await.map(|(_, next)| next)
    }

    /// Like `update`, and also returns the record as stored right before.
    async fn update_pair(
        &self,
        id: &str,
        change: impl Fn(&mut ConnectionRecord),
    ) -> Result<(ConnectionRecord, ConnectionRecord), VaultError> {
        for _ in 0..MAX_CONFLICT_RETRIES {
            let Some((bytes, record)) = self.store.get_with_bytes(id).await? else {
                return Err(VaultError::NotFound(id.to_owned()));
            };
            let mut next = record.clone();
            change(&mut next);
            match self.store.replace(&bytes, &next).await {
                Ok(()) => return Ok((record, next)),
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(VaultError::Busy(id.to_owned()))
    }

    /// Deletes a connection and drops its cached token. Returns the deleted
    /// record, or `None` when it was unreadable.
    pub async fn delete(&self, id: &str) -> Result<Option<ConnectionRecord>, VaultError> {
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

    /// Drops the cached token and credentials of connection `id` after a
    /// committed write to it, unless the cached credentials are still the
    /// stored current ones. A write that leaves them alone, such as a
    /// staged or discarded rotation, a health check or a settings change,
    /// thus keeps the cached token, as the sled store does. A failed read
    /// drops the cache.
    pub async fn forget_if_changed(&self, id: &str) {
        let Ok(slot) = self.broker.slot(id) else {
            // Nothing is cached, but a call may be about to cache
            // credentials it read before the write. Invalidating makes
            // `Broker::install` reject them.
            self.broker.invalidate(id);
            return;
        };
        let unchanged = match self.get(id).await {
            Ok(record) => self
                .open_current(&record)
                .is_ok_and(|current| same_credentials(&current, &slot.credentials)),
            Err(VaultError::NotFound(_)) => false,
            Err(error) => {
                tracing::warn!(
                    connection.id = %id,
                    %error,
                    "cannot read a connection changed in the database; dropping its cached token"
                );
                false
            }
        };
        if !unchanged {
            self.broker.invalidate(id);
        }
    }

    /// Returns a token for the connection with at least `min_valid_for`
    /// left, from the cache when possible.
    pub async fn access_token(
        &self,
        id: &str,
        min_valid_for: Duration,
    ) -> Result<IssuedAccess, VaultError> {
        if !self.database_reachable() {
            return self.cached_access_token(id, min_valid_for);
        }
        for _ in 0..MAX_CONFLICT_RETRIES {
            let slot = self.slot(id).await?;
            let token = self
                .broker
                .token(&slot, min_valid_for)
                .await
                .map_err(VaultError::Token)?;
            // A rotation, rollback or delete while the token was fetched
            // replaced the slot: its token belongs to other credentials.
            let still_current = self
                .broker
                .slot(id)
                .is_ok_and(|installed| Arc::ptr_eq(&installed, &slot));
            if still_current {
                return Ok(IssuedAccess { token, slot });
            }
        }
        Err(VaultError::Busy(id.to_owned()))
    }

    /// Returns the connection's cached token, or `VaultError::NoCachedToken`
    /// when none satisfies `min_valid_for`. While the database is
    /// unreachable, a rotation or deletion through another server goes
    /// unnoticed, so no new token is requested with the cached credentials.
    /// Only tokens issued before the outage can be served stale.
    fn cached_access_token(
        &self,
        id: &str,
        min_valid_for: Duration,
    ) -> Result<IssuedAccess, VaultError> {
        let slot = self.cached_slot(id)?;
        let token = self
            .broker
            .cached_token(&slot, min_valid_for)
            .ok_or_else(|| VaultError::NoCachedToken(format!("connection {id}")))?;
        Ok(IssuedAccess { token, slot })
    }

    /// Returns the connection's cached token while it has not expired,
    /// whatever its time left: for a caller whose wait for a new one ran out.
    pub fn unexpired_access_token(&self, id: &str) -> Option<IssuedAccess> {
        let slot = self.broker.slot(id).ok()?;
        let token = slot.unexpired_token(tokio::time::Instant::now())?;
        Some(IssuedAccess { token, slot })
    }

    /// Returns the broker's cache entry of a connection without reading the
    /// database, or `VaultError::NoCachedToken` when there is none.
    pub fn cached_slot(&self, id: &str) -> Result<Arc<Slot>, VaultError> {
        self.broker
            .slot(id)
            .map_err(|_| VaultError::NoCachedToken(format!("connection {id}")))
    }

    /// Returns the broker's cache entry of the connection of `tenant_id` in
    /// `environment` without reading the database, or
    /// `VaultError::NoCachedToken` when there is none.
    pub fn cached_tenant_slot(
        &self,
        environment: Environment,
        tenant_id: i64,
    ) -> Result<Arc<Slot>, VaultError> {
        self.broker
            .tenant_slot(environment, tenant_id)
            .ok_or_else(|| VaultError::NoCachedToken(format!("{environment} tenant {tenant_id}")))
    }

    /// Returns the broker's cache entry of a connection, loading and
    /// decrypting its current credentials on a miss.
    async fn slot(&self, id: &str) -> Result<Arc<Slot>, VaultError> {
        if let Ok(slot) = self.broker.slot(id) {
            return Ok(slot);
        }
        let lock = LoadLock::new(self, id);
        let _loading = lock.lock.lock().await;
        for _ in 0..MAX_CONFLICT_RETRIES {
            // A caller that held the lock before may have installed it.
            let epoch = match self.broker.slot(id) {
                Ok(slot) => return Ok(slot),
                Err(epoch) => epoch,
            };
            let record = self.get(id).await?;
            let credentials = self.open_current(&record)?;
            if let Some(slot) = self.broker.install(epoch, credentials) {
                return Ok(slot);
            }
        }
        Err(VaultError::Busy(id.to_owned()))
    }

    /// Discards pending versions left by a rotation that crashed before it
    /// finished, if they are at least `min_age` old. Returns the ids of the
    /// connections cleaned up. With a shared database, `min_age` keeps a
    /// starting replica from discarding another replica's rotation that is
    /// still being verified.
    pub async fn discard_stale_pending(
        &self,
        min_age: Duration,
    ) -> Result<Vec<String>, VaultError> {
        let is_stale = |version: &CredentialVersion| {
            version.state == VersionState::Pending
                && version
                    .created_at
                    .elapsed()
                    .map_or(min_age.is_zero(), |age| age >= min_age)
        };
        let mut stale = Vec::new();
        let mut records = std::pin::pin!(self.store.records());
        while let Some(record) = records.next().await {
            let record = match record {
                Ok(record) => record,
                Err(StoreError::Corrupt { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            if record.versions.iter().any(is_stale) {
                stale.push(record.id);
            }
        }
        let mut cleaned = Vec::new();
        for id in stale {
            self.update(&id, |r| r.versions.retain(|v| !is_stale(v)))
                .await?;
            cleaned.push(id);
        }
        Ok(cleaned)
    }
}

/// Returns whether `a` and `b` are the same credential version holding the
/// same client id, client secret and app key.
fn same_credentials(a: &Credentials, b: &Credentials) -> bool {
    a.version == b.version
        && a.client_id == b.client_id
        && a.client_secret.ct_eq(&b.client_secret)
        && a.app_key.ct_eq(&b.app_key)
}

/// Makes version `number` current and the former current one previous.
/// Every other version is dropped, so at most two are kept.
/// A connection's entry in `Vault::load_locks`, removed from the map when
/// the last caller holding or waiting for it is done, cancelled or not.
struct LoadLock<'a> {
    vault: &'a Vault,
    id: &'a str,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl<'a> LoadLock<'a> {
    fn new(vault: &'a Vault, id: &'a str) -> Self {
        let mut locks = vault.load_locks.lock().expect("lock map is never poisoned");
        let lock = locks.entry(id.to_owned()).or_default().clone();
        Self { vault, id, lock }
    }
}

impl Drop for LoadLock<'_> {
    fn drop(&mut self) {
        // Clones are taken only under the map's lock, so the count cannot
        // grow while it is checked: two means the map's and this one.
        let mut locks = self
            .vault
            .load_locks
            .lock()
            .expect("lock map is never poisoned");
        if Arc::strong_count(&self.lock) == 2 {
            locks.remove(self.id);
        }
    }
}

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

/// Builds the sealed record of a new connection, with a fresh data key
/// wrapped under `master_key` and one current credential version.
pub fn new_record(
    master_key: &MasterKey,
    id: String,
    new: &NewConnection,
    caller: &str,
) -> ConnectionRecord {
    let now = SystemTime::now();
    let data_key = DataKey::generate();
    let version = seal_version(
        &data_key,
        &id,
        Binding::of_new(new),
        1,
        VersionState::Current,
        &new.client_id,
        &new.client_secret,
        &new.app_key,
        caller,
    );
    ConnectionRecord {
        environment: new.environment,
        tenant_id: new.tenant_id,
        display_name: new.display_name.clone(),
        labels: new.labels.clone(),
        enterprise_hub: new.enterprise_hub,
        required_scope_groups: new.required_scope_groups.clone(),
        created_at: now,
        updated_at: now,
        last_verified_at: None,
        master_key_id: master_key.id().to_owned(),
        wrapped_data_key: master_key.wrap(&id, &data_key),
        versions: vec![version],
        health: None,
        id,
    }
}

/// The stored fields that decide where a credential is sent and for which
/// tenant. They are bound into each sealed field's associated data, so an
/// edited environment, tenant, client id or Enterprise Hub flag makes the
/// secrets fail to open instead of being sent to the wrong place.
#[derive(Clone, Copy)]
struct Binding {
    environment: Environment,
    tenant_id: i64,
    enterprise_hub: bool,
}

impl Binding {
    fn of_record(record: &ConnectionRecord) -> Self {
        Self {
            environment: record.environment,
            tenant_id: record.tenant_id,
            enterprise_hub: record.enterprise_hub,
        }
    }

    fn of_new(new: &NewConnection) -> Self {
        Self {
            environment: new.environment,
            tenant_id: new.tenant_id,
            enterprise_hub: new.enterprise_hub,
        }
    }

    /// Returns the associated-data name of `field` for a version with
    /// `client_id`. Client ids contain no control characters, so the NUL
    /// separators keep the parts apart.
    fn field(&self, field: &str, client_id: &str) -> String {
        format!(
            "{field}\0{}\0{}\0{}\0{client_id}",
            self.environment.as_str(),
            self.tenant_id,
            self.enterprise_hub
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn seal_version(
    data_key: &DataKey,
    id: &str,
    binding: Binding,
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
        client_secret: data_key.seal(
            id,
            &binding.field(CLIENT_SECRET_FIELD, client_id),
            number,
            client_secret,
        ),
        app_key: data_key.seal(
            id,
            &binding.field(APP_KEY_FIELD, client_id),
            number,
            app_key,
        ),
        app_key_hint: app_key.hint(),
        created_at: SystemTime::now(),
        created_by: caller.to_owned(),
    }
}
