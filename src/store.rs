//! Connection records in sled: one tree of records keyed by connection id,
//! one index from (environment, tenant) to connection id, and a metadata tree.
//!
//! Every write that changes more than one key runs in a sled transaction, and
//! every public write method flushes to disk before it returns, so a write
//! acknowledged to a caller survives `kill -9`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::crypto::Sealed;
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
    /// Lock held exclusively by transactions and `snapshot`, and shared by
    /// single-key writes and flushes. A transaction waiting for sled's
    /// commit lock blocks flushes that need its read lock, which hung the
    /// server under concurrent registrations, so transactions never overlap
    /// a flush. A snapshot therefore reads no write half done.
    write_gate: std::sync::Arc<tokio::sync::RwLock<()>>,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        // Every write flushes explicitly, so sled's own periodic flush, which
        // would run outside `write_gate`, is turned off.
        let db = sled::Config::new()
            .path(dir.join(DB_DIR_NAME))
            .flush_every_ms(None)
            .open()?;
        Ok(Self {
            connections: db.open_tree(CONNECTIONS_TREE)?,
            tenant_index: db.open_tree(TENANT_INDEX_TREE)?,
            meta: db.open_tree(META_TREE)?,
            write_gate: Default::default(),
            db,
        })
    }

    pub fn len(&self) -> usize {
        self.connections.len()
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }

    pub fn get(&self, id: &str) -> Result<Option<ConnectionRecord>, StoreError> {
        match self.connections.get(id.as_bytes())? {
            Some(bytes) => Ok(Some(decode(id, &bytes)?)),
            None => Ok(None),
        }
    }

    pub fn find_by_tenant(
        &self,
        environment: Environment,
        tenant_id: i64,
    ) -> Result<Option<ConnectionRecord>, StoreError> {
        match self.tenant_index.get(tenant_key(environment, tenant_id))? {
            Some(id) => self.get(&String::from_utf8_lossy(&id)),
            None => Ok(None),
        }
    }

    /// Inserts a new connection and its tenant index entry atomically.
    pub async fn insert(&self, record: &ConnectionRecord) -> Result<(), StoreError> {
        let index_key = tenant_key(record.environment, record.tenant_id);
        let bytes = encode(record);
        let exclusive = self.write_gate.write().await;
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
        drop(exclusive);
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
        self.flush().await
    }

    /// Replaces a record if it is still exactly `previous`, so two writers
    /// cannot silently overwrite each other.
    pub async fn replace(
        &self,
        previous: &ConnectionRecord,
        next: &ConnectionRecord,
    ) -> Result<(), StoreError> {
        let writing = self.write_gate.read().await;
        let swapped = self.connections.compare_and_swap(
            next.id.as_bytes(),
            Some(encode(previous)),
            Some(encode(next)),
        )?;
        drop(writing);
        if swapped.is_err() {
            return Err(StoreError::Conflict(next.id.clone()));
        }
        self.flush().await
    }

    /// Deletes a connection and its index entry atomically.
    pub async fn delete(&self, id: &str) -> Result<ConnectionRecord, StoreError> {
        let exclusive = self.write_gate.write().await;
        let result = (&self.connections, &self.tenant_index).transaction(|(connections, index)| {
            let Some(bytes) = connections.remove(id.as_bytes())? else {
                return Err(ConflictableTransactionError::Abort(None));
            };
            let record: ConnectionRecord = match decode(id, &bytes) {
                Ok(record) => record,
                Err(e) => return Err(ConflictableTransactionError::Abort(Some(e.to_string()))),
            };
            index.remove(tenant_key(record.environment, record.tenant_id))?;
            Ok(record)
        });
        drop(exclusive);
        let record = match result {
            Ok(record) => record,
            Err(TransactionError::Abort(None)) => return Err(StoreError::NotFound(id.to_owned())),
            Err(TransactionError::Abort(Some(reason))) => {
                return Err(StoreError::Corrupt {
                    key: id.to_owned(),
                    reason,
                });
            }
            Err(TransactionError::Storage(e)) => return Err(e.into()),
        };
        self.flush().await?;
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
            let record: ConnectionRecord = decode(&String::from_utf8_lossy(&key), &value)?;
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
            decode(&String::from_utf8_lossy(&key), &value)
        })
    }

    /// Flushes every write so far to disk.
    ///
    /// sled 0.34's `flush_async` runs the blocking flush on sled's own small
    /// IO thread pool. Enough concurrent flushes occupy every pool thread
    /// while they wait for a log write that needs a pool thread, so the
    /// process hangs. The flush runs on tokio's blocking pool instead.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let _flushing = self.write_gate.read().await;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .expect("a sled flush does not panic")?;
        Ok(())
    }
}

fn tenant_key(environment: Environment, tenant_id: i64) -> Vec<u8> {
    format!("{}/{tenant_id}", environment.as_str()).into_bytes()
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records contain only JSON-representable fields")
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}
