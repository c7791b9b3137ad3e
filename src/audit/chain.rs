//! Verification of the audit chain. Every event from 1 to the head must be
//! present, readable and numbered in order. The next event, or the head
//! record for the last one, must contain the hash of its stored bytes.

use std::fmt;
use std::path::Path;

use super::{
    AuditEvent, EVENTS_TREE, GENESIS_HASH, HEAD_KEY, HEAD_TREE, Head, hash_hex, sequence_of,
};

/// An intact chain.
#[derive(Debug)]
pub struct Verified {
    pub events: u64,
    /// Hash of the last event, or the genesis hash for an empty trail.
    pub head_hash: String,
}

/// The first place where the chain does not hold.
#[derive(Debug, PartialEq, Eq)]
pub struct ChainBreak {
    /// Sequence number of the first event that is missing, unreadable or
    /// altered.
    pub sequence: u64,
    pub reason: String,
}

impl fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "audit chain broken at event {}: {}",
            self.sequence, self.reason
        )
    }
}

/// Failure to verify a data directory.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot open the database in {dir}: {reason}")]
    Open { dir: String, reason: String },
    #[error("{0}")]
    Broken(ChainBreak),
    #[error("cannot read the audit trail: {0}")]
    Read(#[from] sled::Error),
}

/// Opens the database of a data directory and verifies its audit chain.
/// The server must not be running on the directory, since sled locks it.
pub fn verify_data_dir(dir: &Path) -> Result<Verified, VerifyError> {
    let db_path = dir.join("db");
    if !db_path.is_dir() {
        return Err(VerifyError::Open {
            dir: dir.display().to_string(),
            reason: "no database found; pass the STVAULT_DATA_DIR of the server".into(),
        });
    }
    let db = sled::Config::new()
        .path(&db_path)
        .open()
        .map_err(|e| VerifyError::Open {
            dir: dir.display().to_string(),
            reason: format!("{e}; stop the server or verify a copy of the directory"),
        })?;
    verify_db(&db)
}

/// Verifies the audit chain stored in `db`.
pub fn verify_db(db: &sled::Db) -> Result<Verified, VerifyError> {
    let events = db.open_tree(EVENTS_TREE)?;
    let head_tree = db.open_tree(HEAD_TREE)?;
    let broken =
        |sequence: u64, reason: String| VerifyError::Broken(ChainBreak { sequence, reason });

    let mut expected_sequence = 1;
    // Stored bytes of the previous event, whose hash the next event holds.
    let mut previous: Option<(u64, String)> = None;
    for entry in events.iter() {
        let (key, value) = entry?;
        let sequence = sequence_of(&key);
        if key.len() != 8 || sequence < expected_sequence {
            return Err(broken(
                expected_sequence,
                "an event is stored under an invalid key".into(),
            ));
        }
        if sequence > expected_sequence {
            return Err(broken(
                expected_sequence,
                format!("the event is missing (the next stored event is {sequence})"),
            ));
        }
        let event: AuditEvent = serde_json::from_slice(&value)
            .map_err(|e| broken(sequence, format!("the event is not readable: {e}")))?;
        if event.sequence != sequence {
            return Err(broken(
                sequence,
                format!("the event says it is number {}", event.sequence),
            ));
        }
        match &previous {
            None if event.previous_hash != GENESIS_HASH => {
                return Err(broken(
                    sequence,
                    "the first event does not start the chain".into(),
                ));
            }
            Some((previous_sequence, previous_hash)) if &event.previous_hash != previous_hash => {
                return Err(broken(
                    *previous_sequence,
                    format!(
                        "its hash does not match the previous_hash stored in event {sequence}; \
                         one of the two was edited or replaced"
                    ),
                ));
            }
            _ => {}
        }
        previous = Some((sequence, hash_hex(&value)));
        expected_sequence = sequence + 1;
    }

    let last = expected_sequence - 1;
    let head_hash = previous.map_or_else(|| GENESIS_HASH.to_owned(), |(_, hash)| hash);
    match head_tree.get(HEAD_KEY)? {
        Some(bytes) => {
            let head: Head = serde_json::from_slice(&bytes)
                .map_err(|e| broken(last + 1, format!("the chain head is not readable: {e}")))?;
            if head.sequence > last {
                return Err(broken(
                    last + 1,
                    format!(
                        "the event is missing (the chain head records {} events)",
                        head.sequence
                    ),
                ));
            }
            if head.sequence < last {
                return Err(broken(
                    head.sequence + 1,
                    "the event is not recorded in the chain head".into(),
                ));
            }
            if head.hash != head_hash {
                return Err(broken(
                    last,
                    "its hash does not match the chain head; the event was edited or replaced"
                        .into(),
                ));
            }
        }
        None if last > 0 => {
            return Err(broken(last, "the chain head record is missing".into()));
        }
        None => {}
    }
    Ok(Verified {
        events: last,
        head_hash,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{AuditLog, EventDraft};
    use super::*;

    async fn trail(events: u64) -> (tempfile::TempDir, sled::Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let log = AuditLog::open(&db).unwrap();
        for i in 0..events {
            log.append(EventDraft {
                caller: format!("caller-{i}"),
                rpc: "GetConnection".into(),
                code: "OK".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        (dir, db)
    }

    fn break_of(db: &sled::Db) -> ChainBreak {
        match verify_db(db) {
            Err(VerifyError::Broken(chain_break)) => chain_break,
            other => panic!("expected a chain break, got {other:?}"),
        }
    }

    fn edit(db: &sled::Db, sequence: u64, edit: impl FnOnce(&mut AuditEvent)) {
        let events = db.open_tree(EVENTS_TREE).unwrap();
        let key = sequence.to_be_bytes();
        let mut event: AuditEvent =
            serde_json::from_slice(&events.get(key).unwrap().unwrap()).unwrap();
        edit(&mut event);
        events
            .insert(key, serde_json::to_vec(&event).unwrap())
            .unwrap();
    }

    #[tokio::test]
    async fn empty_trail_verifies() {
        let (_dir, db) = trail(0).await;
        let verified = verify_db(&db).unwrap();
        assert_eq!(verified.events, 0);
        assert_eq!(verified.head_hash, GENESIS_HASH);
    }

    #[tokio::test]
    async fn edited_event_breaks_at_it() {
        let (_dir, db) = trail(5).await;
        edit(&db, 3, |e| e.caller = "someone-else".into());
        assert_eq!(break_of(&db).sequence, 3);
    }

    #[tokio::test]
    async fn edited_last_event_breaks_at_it() {
        let (_dir, db) = trail(5).await;
        edit(&db, 5, |e| e.code = "PERMISSION_DENIED".into());
        assert_eq!(break_of(&db).sequence, 5);
    }

    #[tokio::test]
    async fn deleted_event_breaks_at_it() {
        let (_dir, db) = trail(5).await;
        db.open_tree(EVENTS_TREE)
            .unwrap()
            .remove(2u64.to_be_bytes())
            .unwrap();
        let chain_break = break_of(&db);
        assert_eq!(chain_break.sequence, 2);
        assert!(chain_break.reason.contains("missing"), "{chain_break}");
    }

    #[tokio::test]
    async fn deleted_tail_breaks_at_it() {
        let (_dir, db) = trail(5).await;
        let events = db.open_tree(EVENTS_TREE).unwrap();
        events.remove(5u64.to_be_bytes()).unwrap();
        events.remove(4u64.to_be_bytes()).unwrap();
        assert_eq!(break_of(&db).sequence, 4);
    }

    #[tokio::test]
    async fn unreadable_event_breaks_at_it() {
        let (_dir, db) = trail(3).await;
        db.open_tree(EVENTS_TREE)
            .unwrap()
            .insert(2u64.to_be_bytes(), b"not json".as_slice())
            .unwrap();
        let chain_break = break_of(&db);
        assert_eq!(chain_break.sequence, 2);
        assert!(chain_break.reason.contains("not readable"));
    }
}
