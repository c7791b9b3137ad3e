//! Backup files and restore.
//!
//! A backup file is three parts, each ending in a newline:
//!
//! ```text
//! stvault-backup 1
//! {"created_at":…,"connection_count":…,"snapshot":{…}}
//! sha256 <64 hex digits of SHA-256 over the two lines above>
//! ```
//!
//! The snapshot contains connection records exactly as stored, so secrets
//! stay sealed under the master keys. The keys themselves are not in the
//! file and must be backed up separately. A file whose checksum line is missing or
//! does not match is rejected whole.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::datadir;
use crate::store::{Snapshot, Store};

const MAGIC_LINE: &str = "stvault-backup 1";
const CHECKSUM_PREFIX: &str = "sha256 ";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("not a stvault backup file (its first line is not \"{MAGIC_LINE}\")")]
    NotABackup,
    #[error("the backup file is truncated: its checksum line is missing")]
    Truncated,
    #[error("the backup file is corrupted: its SHA-256 checksum does not match its content")]
    ChecksumMismatch,
    #[error("the backup file is corrupted: {0}")]
    Malformed(String),
}

/// The body of a backup file.
#[derive(Debug, Serialize, Deserialize)]
pub struct Backup {
    pub created_at: SystemTime,
    /// Number of records in `snapshot`, checked on decode.
    pub connection_count: usize,
    pub snapshot: Snapshot,
}

impl Backup {
    pub fn new(snapshot: Snapshot) -> Self {
        Self {
            created_at: SystemTime::now(),
            connection_count: snapshot.connections.len(),
            snapshot,
        }
    }

    /// Ids of the master keys the backed-up records need.
    pub fn master_key_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .snapshot
            .connections
            .iter()
            .map(|r| r.master_key_id.clone())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Encodes the backup in the file format described in the module
    /// documentation.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC_LINE.as_bytes());
        out.push(b'\n');
        serde_json::to_writer(&mut out, self)
            .expect("backups contain only JSON-representable fields");
        out.push(b'\n');
        let digest = hex::encode(Sha256::digest(&out));
        out.extend_from_slice(format!("{CHECKSUM_PREFIX}{digest}\n").as_bytes());
        out
    }

    /// Decodes and checks a backup file.
    pub fn decode(bytes: &[u8]) -> Result<Self, BackupError> {
        let magic = format!("{MAGIC_LINE}\n");
        if !bytes.starts_with(magic.as_bytes()) {
            return Err(BackupError::NotABackup);
        }

        let content = bytes.strip_suffix(b"\n").ok_or(BackupError::Truncated)?;
        let split = content
            .iter()
            .rposition(|&b| b == b'\n')
            .ok_or(BackupError::Truncated)?;
        let (covered, checksum_line) = content.split_at(split + 1);
        let Some(hex_digest) = checksum_line.strip_prefix(CHECKSUM_PREFIX.as_bytes()) else {
            return Err(BackupError::Truncated);
        };
        let expected = hex::decode(hex_digest).map_err(|_| BackupError::Truncated)?;
        let actual = Sha256::digest(covered);
        if expected.len() != actual.len()
            || !bool::from(subtle::ConstantTimeEq::ct_eq(&actual[..], &expected[..]))
        {
            return Err(BackupError::ChecksumMismatch);
        }

        let body = &covered[magic.len()..];
        let backup: Backup = serde_json::from_slice(body)
            .map_err(|e| BackupError::Malformed(format!("its content is not readable: {e}")))?;
        if backup.connection_count != backup.snapshot.connections.len() {
            return Err(BackupError::Malformed(format!(
                "it declares {} connections but holds {}",
                backup.connection_count,
                backup.snapshot.connections.len()
            )));
        }
        Ok(backup)
    }
}

/// Writes a backup file atomically: to `PATH.partial` first, synced, then
/// renamed. An existing `path` is not overwritten.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        return Err(format!(
            "{} already exists; choose another file name",
            path.display()
        ));
    }
    let partial = partial_path(path);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&partial, path)?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::File::open(parent)?.sync_all()?;
        }
        Ok::<(), std::io::Error>(())
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&partial);
        format!("cannot write backup file {}: {e}", path.display())
    })
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// Summary of a finished restore.
pub struct Restored {
    pub connections: usize,
    pub master_key_ids: Vec<String>,
}

/// Restores a backup file into `dir`, which must be missing or empty. The
/// file is checked whole before anything is written; if loading fails
/// partway, what was written is removed again.
pub async fn restore(from: &Path, dir: &Path) -> Result<Restored, String> {
    let bytes = std::fs::read(from)
        .map_err(|e| format!("cannot read backup file {}: {e}", from.display()))?;
    let backup = Backup::decode(&bytes).map_err(|e| format!("{}: {e}", from.display()))?;

    if let Ok(mut entries) = std::fs::read_dir(dir) {
        if entries.next().is_some() {
            return Err(format!(
                "data directory {} is not empty; restore into a new or empty directory",
                dir.display()
            ));
        }
    }
    datadir::create(dir)?;
    let lock = datadir::lock(dir, datadir::DEFAULT_LOCK_WAIT).map_err(|e| e.to_string())?;
    let loaded = load(dir, &backup).await;
    if loaded.is_err() {
        let _ = std::fs::remove_dir_all(dir.join(crate::store::DB_DIR_NAME));
    }
    drop(lock);
    loaded?;
    Ok(Restored {
        connections: backup.snapshot.connections.len(),
        master_key_ids: backup.master_key_ids(),
    })
}

async fn load(dir: &Path, backup: &Backup) -> Result<(), String> {
    let store = Store::open(dir)
        .map_err(|e| format!("cannot open the database in {}: {e}", dir.display()))?;
    store
        .load_snapshot(&backup.snapshot)
        .await
        .map_err(|e| format!("cannot load the backup into {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn empty_backup() -> Backup {
        Backup::new(Snapshot {
            check_values: BTreeMap::new(),
            connections: Vec::new(),
        })
    }

    #[test]
    fn encoded_backup_decodes() {
        let bytes = empty_backup().encode();
        let decoded = Backup::decode(&bytes).unwrap();
        assert_eq!(decoded.connection_count, 0);
    }

    #[test]
    fn every_truncation_is_rejected() {
        let bytes = empty_backup().encode();
        for len in 0..bytes.len() {
            assert!(
                Backup::decode(&bytes[..len]).is_err(),
                "a backup cut to {len} of {} bytes was accepted",
                bytes.len()
            );
        }
    }

    #[test]
    fn flipped_byte_fails_checksum() {
        let mut bytes = empty_backup().encode();
        let index = MAGIC_LINE.len() + 3;
        bytes[index] ^= 0x20;
        assert!(matches!(
            Backup::decode(&bytes),
            Err(BackupError::ChecksumMismatch)
        ));
    }

    #[test]
    fn other_file_is_not_a_backup() {
        assert!(matches!(
            Backup::decode(b"hello\n"),
            Err(BackupError::NotABackup)
        ));
    }
}
