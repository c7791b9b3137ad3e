//! Store operations for key management and backups: master key check
//! values, point-in-time snapshots, and loading a snapshot into a new store.
//! Snapshots exist only for the sled backend; a PostgreSQL database is
//! backed up with PostgreSQL's own tools.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::sled_store::SledStore;
use super::{Backend, ConnectionRecord, Store, StoreError, decode, decode_record, encode};
use crate::crypto::Sealed;

/// Key prefix of the master key check values in sled's metadata tree.
const CHECK_VALUE_PREFIX: &str = "master_key_check/";

/// Error message of `snapshot` and `load_snapshot` on PostgreSQL.
pub const POSTGRES_SNAPSHOT_UNSUPPORTED: &str = "stvault backups and restores work on sled data \
     directories only; with STVAULT_STORAGE=postgres, back up the database with PostgreSQL's own \
     tools, such as pg_dump";

/// Everything needed to rebuild a data directory: connection records (their
/// secrets still sealed) and the master key check values. The tenant index
/// is rebuilt from the records.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub check_values: BTreeMap<String, Sealed>,
    pub connections: Vec<ConnectionRecord>,
}

impl Store {
    /// Returns the stored master key check values by key id.
    pub async fn check_values(&self) -> Result<Vec<(String, Sealed)>, StoreError> {
        match &self.backend {
            Backend::Sled(sled) => sled.check_values(),
            Backend::Postgres(postgres) => postgres.check_values().await,
        }
    }

    pub async fn put_check_value(&self, key_id: &str, sealed: &Sealed) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(sled) => sled.put_check_value(key_id, sealed).await,
            Backend::Postgres(postgres) => postgres.put_check_value(key_id, sealed).await,
        }
    }

    pub async fn remove_check_value(&self, key_id: &str) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(sled) => sled.remove_check_value(key_id).await,
            Backend::Postgres(postgres) => postgres.remove_check_value(key_id).await,
        }
    }

    /// Reads every record and check value while no write is in progress, so
    /// the snapshot is one point in time. Writes wait until it is read.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        match &self.backend {
            Backend::Sled(sled) => sled.snapshot().await,
            Backend::Postgres(_) => Err(StoreError::Unsupported(POSTGRES_SNAPSHOT_UNSUPPORTED)),
        }
    }

    /// Loads a snapshot into this store, which must be empty, and flushes.
    pub async fn load_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(sled) => sled.load_snapshot(snapshot).await,
            Backend::Postgres(_) => Err(StoreError::Unsupported(POSTGRES_SNAPSHOT_UNSUPPORTED)),
        }
    }
}

impl SledStore {
    fn check_values(&self) -> Result<Vec<(String, Sealed)>, StoreError> {
        let mut values = Vec::new();
        for entry in self.meta.scan_prefix(CHECK_VALUE_PREFIX) {
            let (name, value) = entry?;
            let name = String::from_utf8_lossy(&name).into_owned();
            let sealed: Sealed = decode(&name, &value)?;
            values.push((name[CHECK_VALUE_PREFIX.len()..].to_owned(), sealed));
        }
        Ok(values)
    }

    async fn put_check_value(&self, key_id: &str, sealed: &Sealed) -> Result<(), StoreError> {
        let _write = self.writes.lock().await;
        let name = format!("{CHECK_VALUE_PREFIX}{key_id}");
        self.meta.insert(name.as_bytes(), encode(sealed))?;
        self.db.flush_async().await?;
        Ok(())
    }

    async fn remove_check_value(&self, key_id: &str) -> Result<(), StoreError> {
        let _write = self.writes.lock().await;
        let name = format!("{CHECK_VALUE_PREFIX}{key_id}");
        self.meta.remove(name.as_bytes())?;
        self.db.flush_async().await?;
        Ok(())
    }

    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let _paused = self.writes.lock().await;
        let check_values = self.check_values()?.into_iter().collect();
        let mut connections = Vec::new();
        for entry in self.connections.iter() {
            let (key, value) = entry?;
            connections.push(decode_record(&key, &value)?);
        }
        Ok(Snapshot {
            check_values,
            connections,
        })
    }

    async fn load_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        if !self.connections.is_empty()
            || self.meta.scan_prefix(CHECK_VALUE_PREFIX).next().is_some()
        {
            return Err(StoreError::Corrupt {
                key: "snapshot".into(),
                reason: "a snapshot is loaded only into an empty store".into(),
            });
        }
        for (key_id, sealed) in &snapshot.check_values {
            let name = format!("{CHECK_VALUE_PREFIX}{key_id}");
            self.meta.insert(name.as_bytes(), encode(sealed))?;
        }
        // Flushes the check values too.
        self.insert_batch(&snapshot.connections).await
    }
}
