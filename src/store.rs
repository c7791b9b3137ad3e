//! Connection records and where they are kept: in sled, an embedded database
//! in the data directory (the default), or in PostgreSQL, which several
//! replicas can share.
//!
//! Both backends give the same guarantees. Every write is durable before it
//! returns, a write that changes several keys is atomic, `replace` is a
//! compare-and-swap on the exact stored bytes, and each (environment,
//! tenant) has at most one connection. Both store the same bytes: the
//! record's JSON, whose secrets are sealed before they reach the store.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::time::SystemTime;

use futures::Stream;
use serde::{Deserialize, Serialize};

use crate::crypto::Sealed;
use crate::health::Health;
use crate::model::Environment;

mod maintenance;
pub mod postgres;
mod sled_store;

pub use maintenance::Snapshot;
pub use postgres::{Change, DatabaseSettings};
pub use sled_store::DB_DIR_NAME;

pub use postgres::PostgresStore;
use sled_store::SledStore;

/// Records read per query when scanning every record.
const SCAN_PAGE_SIZE: usize = 500;

/// A stored connection. Secret fields are sealed under the connection's data
/// key, which is itself wrapped under a master key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConnectionRecord {
    pub id: String,
    pub environment: Environment,
    pub tenant_id: i64,
    pub display_name: String,
    pub labels: BTreeMap<String, String>,
    /// Enterprise Hub credentials, shared by several tenants: token requests
    /// name the tenant.
    #[serde(default)]
    pub enterprise_hub: bool,
    /// Scope group keys whose failure fails verification.
    #[serde(default)]
    pub required_scope_groups: Vec<String>,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    pub last_verified_at: Option<SystemTime>,
    /// Id of the master key that wrapped `wrapped_data_key`.
    pub master_key_id: String,
    pub wrapped_data_key: Sealed,
    /// Credential versions, oldest first. Exactly one is current.
    pub versions: Vec<CredentialVersion>,
    /// Result of the last verification; `None` until the first one.
    #[serde(default)]
    pub health: Option<Health>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CredentialVersion {
    pub version: u32,
    pub state: VersionState,
    pub client_id: String,
    pub client_secret: Sealed,
    pub app_key: Sealed,
    pub app_key_hint: String,
    pub created_at: SystemTime,
    /// Caller identity that stored this version.
    pub created_by: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionState {
    Current,
    /// The version that was current before the last rotation; rollback
    /// makes it current again.
    Previous,
    /// Stored by a rotation while it is being verified. A pending version
    /// left by a crash is discarded at startup.
    Pending,
}

impl ConnectionRecord {
    /// Returns the current credential version.
    pub fn current(&self) -> &CredentialVersion {
        self.versions
            .iter()
            .find(|v| v.state == VersionState::Current)
            .expect("a stored record always has one current version")
    }

    pub fn next_version_number(&self) -> u32 {
        self.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    /// The PostgreSQL database could not be reached, or dropped the
    /// connection. The message names the database, never its password.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// PostgreSQL rejected a statement.
    #[error("database error: {0}")]
    Database(String),
    /// The operation exists only for the sled backend.
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("stored record {key} is not readable: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("a connection for {environment} tenant {tenant_id} already exists: {existing_id}")]
    TenantTaken {
        environment: Environment,
        tenant_id: i64,
        existing_id: String,
    },
    #[error("connection {0} was changed concurrently")]
    Conflict(String),
    #[error("connection {0} not found")]
    NotFound(String),
}

/// The connection store, over one of the two backends.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Sled(SledStore),
    Postgres(PostgresStore),
}

impl Store {
    /// Opens the sled store in the data directory `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            backend: Backend::Sled(SledStore::open(dir)?),
        })
    }

    /// Connects to PostgreSQL and brings its schema up to date.
    pub async fn connect_postgres(settings: &DatabaseSettings) -> Result<Self, StoreError> {
        Ok(Self {
            backend: Backend::Postgres(PostgresStore::connect(settings).await?),
        })
    }

    /// Returns the backend's name, for logs: `sled` or `postgres`.
    pub fn backend_name(&self) -> &'static str {
        match &self.backend {
            Backend::Sled(_) => "sled",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// With PostgreSQL, calls `on_change` for each connection that any
    /// server updates or deletes, until `stopping` turns true. With sled,
    /// which has one writer, returns at once.
    pub async fn watch_changes(
        &self,
        on_change: impl Fn(Change<'_>),
        stopping: tokio::sync::watch::Receiver<bool>,
    ) {
        if let Backend::Postgres(postgres) = &self.backend {
            postgres.watch_changes(on_change, stopping).await;
        }
    }

    /// Returns whether other servers may write to this store at the same
    /// time, as they may with PostgreSQL.
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    pub async fn len(&self) -> Result<usize, StoreError> {
        match &self.backend {
            Backend::Sled(sled) => Ok(sled.len()),
            Backend::Postgres(postgres) => postgres.count().await,
        }
    }

    pub async fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len().await? == 0)
    }

    /// Checks that the backend can run a trivial query, for readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(_) => Ok(()),
            Backend::Postgres(postgres) => postgres.ping().await,
        }
    }

    pub async fn get(&self, id: &str) -> Result<Option<ConnectionRecord>, StoreError> {
        Ok(self.get_with_bytes(id).await?.map(|(_, record)| record))
    }

    /// Returns a record with the exact bytes it was read from, for a later
    /// `replace`.
    pub async fn get_with_bytes(
        &self,
        id: &str,
    ) -> Result<Option<(Vec<u8>, ConnectionRecord)>, StoreError> {
        let bytes = match &self.backend {
            Backend::Sled(sled) => sled.get_bytes(id)?,
            Backend::Postgres(postgres) => postgres.get_bytes(id).await?,
        };
        match bytes {
            Some(bytes) => {
                let record = decode_record(id.as_bytes(), &bytes)?;
                Ok(Some((bytes, record)))
            }
            None => Ok(None),
        }
    }

    pub async fn find_by_tenant(
        &self,
        environment: Environment,
        tenant_id: i64,
    ) -> Result<Option<ConnectionRecord>, StoreError> {
        let found = match &self.backend {
            Backend::Sled(sled) => sled.find_by_tenant(environment, tenant_id)?,
            Backend::Postgres(postgres) => postgres.find_by_tenant(environment, tenant_id).await?,
        };
        let Some((id, bytes)) = found else {
            return Ok(None);
        };
        let record = decode_record(id.as_bytes(), &bytes)?;
        // An index entry edited to point at another tenant's record must not
        // hand out that tenant's credentials.
        if record.environment != environment || record.tenant_id != tenant_id {
            return Err(StoreError::Corrupt {
                key: id,
                reason: format!(
                    "the index entry of {environment} tenant {tenant_id} names another tenant's record"
                ),
            });
        }
        Ok(Some(record))
    }

    /// Inserts a new connection and its tenant index entry atomically.
    pub async fn insert(&self, record: &ConnectionRecord) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(sled) => sled.insert(record).await,
            Backend::Postgres(postgres) => postgres.insert(record).await,
        }
    }

    /// Inserts many new connections, each like `insert`, for bulk imports
    /// and benchmarks. With sled there is one flush at the end instead of
    /// one per record: nothing is durable until this returns, and a failure
    /// leaves the records before it inserted. With PostgreSQL the batch is
    /// one transaction, so a failure inserts none.
    pub async fn insert_batch(&self, records: &[ConnectionRecord]) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(sled) => sled.insert_batch(records).await,
            Backend::Postgres(postgres) => postgres.insert_batch(records).await,
        }
    }

    /// Replaces a record if its stored bytes are still `previous_bytes`,
    /// as returned by `get_with_bytes`, so two writers cannot silently
    /// overwrite each other.
    pub async fn replace(
        &self,
        previous_bytes: &[u8],
        next: &ConnectionRecord,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(sled) => sled.replace(previous_bytes, next).await,
            Backend::Postgres(postgres) => postgres.replace(previous_bytes, next).await,
        }
    }

    /// Deletes a connection and its tenant index entry, atomically. An
    /// unreadable record is deleted too, so an operator can remove it; its
    /// record is then returned as `None`.
    pub async fn delete(&self, id: &str) -> Result<Option<ConnectionRecord>, StoreError> {
        let bytes = match &self.backend {
            Backend::Sled(sled) => sled.delete(id).await?,
            Backend::Postgres(postgres) => postgres.delete(id).await?,
        };
        Ok(decode_record(id.as_bytes(), &bytes).ok())
    }

    /// Returns up to `limit` records with ids after `after`, in id order,
    /// that pass `filter`, and whether more may follow.
    pub async fn list(
        &self,
        after: Option<&str>,
        limit: usize,
        filter: impl Fn(&ConnectionRecord) -> bool,
    ) -> Result<(Vec<ConnectionRecord>, bool), StoreError> {
        let mut page = Vec::new();
        let mut after = after.map(str::to_owned);
        loop {
            let entries = self.page(after.as_deref(), SCAN_PAGE_SIZE).await?;
            let last_page = entries.len() < SCAN_PAGE_SIZE;
            after = entries.last().map(|(id, _)| id.clone());
            for (id, bytes) in entries {
                let record = match decode_record(id.as_bytes(), &bytes) {
                    Ok(record) => record,
                    Err(error) => {
                        // One damaged record must not hide every other one.
                        tracing::error!(%error, "skipping an unreadable connection record");
                        continue;
                    }
                };
                if !filter(&record) {
                    continue;
                }
                if page.len() == limit {
                    return Ok((page, true));
                }
                page.push(record);
            }
            if last_page {
                return Ok((page, false));
            }
        }
    }

    /// Streams every record in id order, reading a page at a time. An
    /// unreadable record is an `Err(Corrupt)` item and the stream goes on,
    /// but any other error ends it.
    pub fn records(&self) -> impl Stream<Item = Result<ConnectionRecord, StoreError>> + '_ {
        struct Scan {
            buffered: VecDeque<(String, Vec<u8>)>,
            after: Option<String>,
            finished: bool,
        }
        let start = Scan {
            buffered: VecDeque::new(),
            after: None,
            finished: false,
        };
        futures::stream::unfold(start, move |mut scan| async move {
            if scan.buffered.is_empty() && !scan.finished {
                match self.page(scan.after.as_deref(), SCAN_PAGE_SIZE).await {
                    Ok(entries) => {
                        scan.finished = entries.len() < SCAN_PAGE_SIZE;
                        scan.after = entries.last().map(|(id, _)| id.clone());
                        scan.buffered = entries.into();
                    }
                    Err(error) => {
                        scan.finished = true;
                        return Some((Err(error), scan));
                    }
                }
            }
            let (id, bytes) = scan.buffered.pop_front()?;
            Some((decode_record(id.as_bytes(), &bytes), scan))
        })
    }

    /// Returns up to `limit` stored (id, bytes) pairs with ids after
    /// `after`, in id order.
    async fn page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        match &self.backend {
            Backend::Sled(sled) => {
                // A page of sled reads can block for a while, so it runs on
                // the blocking thread pool rather than a runtime worker.
                let sled = sled.clone();
                let after = after.map(str::to_owned);
                tokio::task::spawn_blocking(move || sled.page(after.as_deref(), limit))
                    .await
                    .map_err(|e| {
                        StoreError::Sled(sled::Error::ReportableBug(format!(
                            "read task failed: {e}"
                        )))
                    })?
            }
            Backend::Postgres(postgres) => postgres.page(after, limit).await,
        }
    }

    /// Returns the sled database of the sled backend.
    pub fn db(&self) -> Option<&sled::Db> {
        match &self.backend {
            Backend::Sled(sled) => Some(sled.db()),
            Backend::Postgres(_) => None,
        }
    }

    /// Returns the PostgreSQL backend, which the audit trail shares.
    pub fn postgres(&self) -> Option<&PostgresStore> {
        match &self.backend {
            Backend::Sled(_) => None,
            Backend::Postgres(postgres) => Some(postgres),
        }
    }

    /// Flushes the sled database to disk. PostgreSQL writes are durable
    /// when they return, so there is nothing more to flush.
    pub async fn flush(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(sled) => sled.flush().await,
            Backend::Postgres(_) => Ok(()),
        }
    }
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records contain only JSON-representable fields")
}

/// Decodes a connection record and checks the invariants every reader
/// relies on: it is stored under its own id and has exactly one current
/// version.
fn decode_record(key: &[u8], bytes: &[u8]) -> Result<ConnectionRecord, StoreError> {
    let key = String::from_utf8_lossy(key);
    let record: ConnectionRecord = decode(&key, bytes)?;
    let corrupt = |reason: &str| StoreError::Corrupt {
        key: key.clone().into_owned(),
        reason: reason.to_owned(),
    };
    if record.id != key {
        return Err(corrupt(
            "the record is stored under another connection's id",
        ));
    }
    let current = record
        .versions
        .iter()
        .filter(|v| v.state == VersionState::Current)
        .count();
    if current != 1 {
        return Err(corrupt(
            "the record does not have exactly one current credential version",
        ));
    }
    Ok(record)
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}
