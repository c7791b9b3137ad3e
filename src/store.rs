//! Connection records in sled: one tree of records keyed by connection id,
//! one index from (environment, tenant) to connection id, and a metadata tree.
//!
//! Every write that changes more than one key runs in a sled transaction, and
//! every public write method flushes to disk before it returns, so a write
//! acknowledged to a caller survives `kill -9`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::crypto::Sealed;
use crate::health::Health;
use crate::model::Environment;

/// Subdirectory of the data directory with the sled database.
pub const DB_DIR_NAME: &str = "db";
const CONNECTIONS_TREE: &str = "connections";
const TENANT_INDEX_TREE: &str = "tenant_index";
const META_TREE: &str = "meta";
const CHECK_VALUE_PREFIX: &str = "master_key_check/";

mod maintenance;
pub use maintenance::Snapshot;

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

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    connections: sled::Tree,
    tenant_index: sled::Tree,
    meta: sled::Tree,
    /// Held by every write from its first change through its flush. sled
    /// 0.34 deadlocks when a transaction waits for its exclusive lock while
    /// several `flush_async` calls hold and wait for the shared one, which
    /// concurrent RegisterConnection calls reached within seconds.
    writes: Arc<tokio::sync::Mutex<()>>,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        // Every write flushes before it returns, so sled's background
        // flusher would add nothing but another party to the deadlock that
        // `writes` prevents.
        let db = sled::Config::new()
            .path(dir.join(DB_DIR_NAME))
            .flush_every_ms(None)
            .open()?;
        Ok(Self {
            connections: db.open_tree(CONNECTIONS_TREE)?,
            tenant_index: db.open_tree(TENANT_INDEX_TREE)?,
            meta: db.open_tree(META_TREE)?,
            db,
            writes: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    pub fn len(&self) -> usize {
        self.connections.len()
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }

    pub fn get(&self, id: &str) -> Result<Option<ConnectionRecord>, StoreError> {
        Ok(self.get_with_bytes(id)?.map(|(_, record)| record))
    }

    /// Returns a record with the exact bytes it was read from, for a later
    /// `replace`.
    pub fn get_with_bytes(
        &self,
        id: &str,
    ) -> Result<Option<(sled::IVec, ConnectionRecord)>, StoreError> {
        match self.connections.get(id.as_bytes())? {
            Some(bytes) => {
                let record = decode_record(id.as_bytes(), &bytes)?;
                Ok(Some((bytes, record)))
            }
            None => Ok(None),
        }
    }

    pub fn find_by_tenant(
        &self,
        environment: Environment,
        tenant_id: i64,
    ) -> Result<Option<ConnectionRecord>, StoreError> {
        let Some(id) = self.tenant_index.get(tenant_key(environment, tenant_id))? else {
            return Ok(None);
        };
        let id = String::from_utf8_lossy(&id).into_owned();
        let Some(record) = self.get(&id)? else {
            return Err(StoreError::Corrupt {
                key: id,
                reason: format!(
                    "the index entry of {environment} tenant {tenant_id} names a missing record"
                ),
            });
        };
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
        let _write = self.writes.lock().await;
        self.insert_unflushed(record)?;
        self.sync().await?;
        Ok(())
    }

    fn insert_unflushed(&self, record: &ConnectionRecord) -> Result<(), StoreError> {
        let index_key = tenant_key(record.environment, record.tenant_id);
        let bytes = encode(record);
        let result = (&self.connections, &self.tenant_index).transaction(|(connections, index)| {
            if let Some(existing) = index.get(&index_key)? {
                return Err(ConflictableTransactionError::Abort(
                    String::from_utf8_lossy(&existing).into_owned(),
                ));
            }
            connections.insert(record.id.as_bytes(), bytes.as_slice())?;
            index.insert(index_key.as_slice(), record.id.as_bytes())?;
            Ok(())
        });
        match result {
            Ok(()) => {}
            Err(TransactionError::Abort(existing_id)) => {
                return Err(StoreError::TenantTaken {
                    environment: record.environment,
                    tenant_id: record.tenant_id,
                    existing_id,
                });
            }
            Err(TransactionError::Storage(e)) => return Err(e.into()),
        }
        Ok(())
    }

    /// Inserts many new connections, each like `insert`, with one flush at
    /// the end instead of one per record. For bulk imports and benchmarks:
    /// nothing is durable until this returns, and a failure leaves the
    /// records before it inserted.
    pub async fn insert_batch(&self, records: &[ConnectionRecord]) -> Result<(), StoreError> {
        let _write = self.writes.lock().await;
        for record in records {
            self.insert_unflushed(record)?;
        }
        self.sync().await?;
        Ok(())
    }

    /// Replaces a record if its stored bytes are still `previous_bytes`,
    /// as returned by `get_with_bytes`, so two writers cannot silently
    /// overwrite each other.
    pub async fn replace(
        &self,
        previous_bytes: &sled::IVec,
        next: &ConnectionRecord,
    ) -> Result<(), StoreError> {
        let _write = self.writes.lock().await;
        let swapped = self.connections.compare_and_swap(
            next.id.as_bytes(),
            Some(previous_bytes),
            Some(encode(next)),
        )?;
        if swapped.is_err() {
            return Err(StoreError::Conflict(next.id.clone()));
        }
        self.sync().await?;
        Ok(())
    }

    /// Deletes a connection and the index entries that point at it,
    /// atomically. An unreadable record is deleted too, so an operator can
    /// remove it; its record is then returned as `None`.
    pub async fn delete(&self, id: &str) -> Result<Option<ConnectionRecord>, StoreError> {
        // Index entries are found by value, so a record whose own tenant
        // fields are unreadable or edited still loses exactly its entries.
        let _write = self.writes.lock().await;
        let mut index_keys = Vec::new();
        for entry in self.tenant_index.iter() {
            let (key, value) = entry?;
            if value.as_ref() == id.as_bytes() {
                index_keys.push(key);
            }
        }
        let result = (&self.connections, &self.tenant_index).transaction(|(connections, index)| {
            let Some(bytes) = connections.remove(id.as_bytes())? else {
                return Err(ConflictableTransactionError::Abort(()));
            };
            for key in &index_keys {
                if index
                    .get(key)?
                    .is_some_and(|value| value.as_ref() == id.as_bytes())
                {
                    index.remove(key)?;
                }
            }
            Ok(decode_record(id.as_bytes(), &bytes).ok())
        });
        let record = match result {
            Ok(record) => record,
            Err(TransactionError::Abort(())) => return Err(StoreError::NotFound(id.to_owned())),
            Err(TransactionError::Storage(e)) => return Err(e.into()),
        };
        self.sync().await?;
        Ok(record)
    }

    /// Returns up to `limit` records with ids after `after`, in id order,
    /// that pass `filter`, and whether more may follow.
    pub fn list(
        &self,
        after: Option<&str>,
        limit: usize,
        filter: impl Fn(&ConnectionRecord) -> bool,
    ) -> Result<(Vec<ConnectionRecord>, bool), StoreError> {
        let range = match after {
            Some(after) => {
                let mut start = after.as_bytes().to_vec();
                start.push(0);
                self.connections.range(start..)
            }
            None => self.connections.iter(),
        };
        let mut page = Vec::new();
        for entry in range {
            let (key, value) = entry?;
            let record = match decode_record(&key, &value) {
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
        Ok((page, false))
    }

    /// Iterates over every record in id order.
    pub fn iter(&self) -> impl Iterator<Item = Result<ConnectionRecord, StoreError>> + '_ {
        self.connections.iter().map(|entry| {
            let (key, value) = entry?;
            decode_record(&key, &value)
        })
    }

    /// The database, for other trees that must live in the same directory,
    /// such as the audit trail.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    pub async fn flush(&self) -> Result<(), StoreError> {
        let _write = self.writes.lock().await;
        self.sync().await?;
        Ok(())
    }

    /// Flushes every write to disk. sled 0.34's `flush_async` futures can
    /// stay pending forever when several are polled at once, so the blocking
    /// `flush` runs on the blocking thread pool instead.
    async fn sync(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| {
                StoreError::Sled(sled::Error::ReportableBug(format!(
                    "flush task failed: {e}"
                )))
            })??;
        Ok(())
    }
}

fn tenant_key(environment: Environment, tenant_id: i64) -> Vec<u8> {
    format!("{}/{tenant_id}", environment.as_str()).into_bytes()
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
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
