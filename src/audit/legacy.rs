//! Moving an audit trail out of the sled database, where earlier versions
//! kept it, into the trail file.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::{AuditError, GENESIS_HASH, Head, file, hash_hex};

/// Trees of the sled database that held the trail in earlier versions.
const LEGACY_EVENTS_TREE: &str = "audit_events";
const LEGACY_HEAD_TREE: &str = "audit_head";

/// Moves an audit trail kept in the `audit_events` tree of `db`, where
/// earlier versions stored it, into the trail file of `dir`, byte for byte
/// so every hash still holds, then drops the old trees. Returns the number
/// of events moved.
pub fn import_legacy(db: &sled::Db, dir: &Path) -> Result<u64, AuditError> {
    let has_tree = |name: &str| {
        db.tree_names()
            .iter()
            .any(|n| n.as_ref() == name.as_bytes())
    };
    if !has_tree(LEGACY_EVENTS_TREE) {
        return Ok(0);
    }
    let drop_legacy = || -> Result<(), AuditError> {
        db.drop_tree(LEGACY_EVENTS_TREE)?;
        db.drop_tree(LEGACY_HEAD_TREE)?;
        db.flush()?;
        Ok(())
    };
    let target = file::events_path(dir);
    let events = db.open_tree(LEGACY_EVENTS_TREE)?;
    if events.is_empty() || std::fs::metadata(&target).is_ok_and(|m| m.len() > 0) {
        // Empty, or moved already by a run that stopped before dropping it.
        drop_legacy()?;
        return Ok(0);
    }
    let partial = dir.join(format!("{}.import", file::EVENTS_FILE));
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)?;
    let mut head = Head {
        sequence: 0,
        hash: GENESIS_HASH.to_owned(),
    };
    let mut buffered = std::io::BufWriter::new(&mut out);
    for entry in events.iter() {
        let (key, value) = entry?;
        let sequence = sequence_of(&key);
        if sequence != head.sequence + 1 {
            return Err(AuditError::Corrupt {
                sequence: head.sequence + 1,
                reason: "the event is missing from the database's audit trail; run the \
                         previous version's `stvault audit verify`"
                    .into(),
            });
        }
        buffered.write_all(&value)?;
        buffered.write_all(b"\n")?;
        head = Head {
            sequence,
            hash: hash_hex(&value),
        };
    }
    buffered.flush()?;
    drop(buffered);
    out.sync_all()?;
    std::fs::write(file::head_path(dir), file::encode_head(&head))?;
    std::fs::rename(&partial, &target)?;
    std::fs::File::open(dir)?.sync_all()?;
    drop_legacy()?;
    Ok(head.sequence)
}

fn sequence_of(key: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let len = key.len().min(8);
    bytes[8 - len..].copy_from_slice(&key[..len]);
    u64::from_be_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::super::tests::draft;
    use super::super::{AuditEvent, AuditLog, SyncPolicy, verify_data_dir};
    use super::*;

    #[tokio::test]
    async fn legacy_trail_moves_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let tree = db.open_tree(LEGACY_EVENTS_TREE).unwrap();
        let mut previous = GENESIS_HASH.to_owned();
        for sequence in 1..=3u64 {
            let event = AuditEvent {
                sequence,
                time: SystemTime::UNIX_EPOCH,
                request_id: format!("req-{sequence}"),
                caller: "admin".into(),
                auth_method: "bearer_key".into(),
                peer: None,
                rpc: "ListConnections".into(),
                connection_id: None,
                environment: None,
                tenant_id: None,
                credential_version: None,
                code: "OK".into(),
                previous_hash: previous.clone(),
            };
            let bytes = serde_json::to_vec(&event).unwrap();
            previous = hash_hex(&bytes);
            tree.insert(sequence.to_be_bytes(), bytes).unwrap();
        }
        db.open_tree(LEGACY_HEAD_TREE).unwrap();

        assert_eq!(import_legacy(&db, dir.path()).unwrap(), 3);
        assert!(
            !db.tree_names()
                .iter()
                .any(|n| n.as_ref() == b"audit_events")
        );
        assert_eq!(import_legacy(&db, dir.path()).unwrap(), 0);
        let verified = verify_data_dir(dir.path()).unwrap();
        assert_eq!((verified.events, verified.head_hash), (3, previous.clone()));
        let log = AuditLog::open(dir.path(), SyncPolicy::Always).unwrap();
        let next = crate::audit::tests::append(&log, draft("a", 1)).await;
        assert_eq!(next.event.previous_hash, previous);
    }
}
