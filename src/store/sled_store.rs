//! Connection records in sled: one tree of records keyed by connection id,
//! one index from (environment, tenant) to connection id, and a metadata tree.
//!
//! Every write that changes more than one key runs in a sled transaction, and
//! every public write method flushes to disk before it returns, so a write
//! acknowledged to a caller survives `kill -9`.

use std::path::Path;
use std::sync::Arc;

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::{ConnectionRecord, StoreError, encode};
use crate::model::Environment;

/// Subdirectory of the data directory with the sled database.
pub const DB_DIR_NAME: &str = "db";
const CONNECTIONS_TREE: &str = "connections";
const TENANT_INDEX_TREE: &str = "tenant_index";
const META_TREE: &str = "meta";

/// The sled backend of `Store`.
#[derive(Clone)]
pub struct SledStore {
    pub(super) db: sled::Db,
    pub(super) connections: sled::Tree,
    tenant_index: sled::Tree,
    pub(super) meta: sled::Tree,
    /// Held by every write from its first change through its flush. sled
    /// 0.34 deadlocks when a transaction waits for its exclusive lock while
    /// several `flush_async` calls hold and wait for the shared one, which
    /// concurrent RegisterConnection calls reached within seconds.
    pub(super) writes: Arc<tokio::sync::Mutex<()>>,
}

impl SledStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = open_db(dir)?;
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

    pub fn get_bytes(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.connections.get(id.as_bytes())?.map(|b| b.to_vec()))
    }

    /// Returns the id and stored bytes of the record that the tenant index
    /// names for (environment, tenant).
    pub fn find_by_tenant(
        &self,
        environment: Environment,
        tenant_id: i64,
    ) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        let Some(id) = self.tenant_index.get(tenant_key(environment, tenant_id))? else {
            return Ok(None);
        };
        let id = String::from_utf8_lossy(&id).into_owned();
        let Some(bytes) = self.get_bytes(&id)? else {
            return Err(StoreError::Corrupt {
                key: id,
                reason: format!(
                    "the index entry of {environment} tenant {tenant_id} names a missing record"
                ),
            });
        };
        Ok(Some((id, bytes)))
    }

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

    pub async fn insert_batch(&self, records: &[ConnectionRecord]) -> Result<(), StoreError> {
        let _write = self.writes.lock().await;
        for record in records {
            self.insert_unflushed(record)?;
        }
        self.sync().await?;
        Ok(())
    }

    pub async fn replace(
        &self,
        previous_bytes: &[u8],
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
    /// atomically, and returns its stored bytes.
    pub async fn delete(&self, id: &str) -> Result<Vec<u8>, StoreError> {
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
            Ok(bytes.to_vec())
        });
        let bytes = match result {
            Ok(bytes) => bytes,
            Err(TransactionError::Abort(())) => return Err(StoreError::NotFound(id.to_owned())),
            Err(TransactionError::Storage(e)) => return Err(e.into()),
        };
        self.sync().await?;
        Ok(bytes)
    }

    /// Returns up to `limit` (id, bytes) pairs with ids after `after`, in id
    /// order. A key that is not UTF-8 is no connection id: it is logged and
    /// skipped, since no later page could start right after it.
    pub fn page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
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
            if page.len() == limit {
                break;
            }
            let (key, value) = entry?;
            match String::from_utf8(key.to_vec()) {
                Ok(id) => page.push((id, value.to_vec())),
                Err(_) => tracing::error!(
                    key = %String::from_utf8_lossy(&key),
                    "skipping a connection record stored under a key that is not UTF-8"
                ),
            }
        }
        Ok(page)
    }

    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    pub async fn flush(&self) -> Result<(), StoreError> {
        let _write = self.writes.lock().await;
        self.sync().await?;
        Ok(())
    }

    pub(super) async fn sync(&self) -> Result<(), StoreError> {
        flush_db(&self.db).await
    }
}

/// Opens the sled database in the data directory `dir`.
pub fn open_db(dir: &Path) -> Result<sled::Db, StoreError> {
    // Every write flushes before it returns, so sled's background flusher
    // would add nothing but another party to the deadlock that
    // `SledStore::writes` prevents.
    Ok(sled::Config::new()
        .path(dir.join(DB_DIR_NAME))
        .flush_every_ms(None)
        .open()?)
}

/// Flushes every write to disk. sled 0.34's `flush_async` futures can stay
/// pending forever when several are polled at once, so the blocking `flush`
/// runs on the blocking thread pool instead.
pub async fn flush_db(db: &sled::Db) -> Result<(), StoreError> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || db.flush())
        .await
        .map_err(|e| {
            StoreError::Sled(sled::Error::ReportableBug(format!(
                "flush task failed: {e}"
            )))
        })??;
    Ok(())
}

fn tenant_key(environment: Environment, tenant_id: i64) -> Vec<u8> {
    format!("{}/{tenant_id}", environment.as_str()).into_bytes()
}
