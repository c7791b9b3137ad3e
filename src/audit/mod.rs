//! The audit trail: one event per RPC, allowed or denied, appended to a file
//! in the data directory and hash-chained, so an edited or deleted event is
//! detectable by `stvault audit verify`.
//!
//! Events hold identities, ids and outcomes, never a secret, token, app key
//! or a hash of one.

mod chain;
mod file;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::Environment;
use file::TrailFile;

pub use chain::{ChainBreak, Verified, VerifyError, verify_data_dir};
pub use file::{EVENTS_FILE, HEAD_FILE, SyncPolicy};

/// Trees of the sled database that held the trail in earlier versions.
const LEGACY_EVENTS_TREE: &str = "audit_events";
const LEGACY_HEAD_TREE: &str = "audit_head";
/// `previous_hash` of the first event.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audited RPC, as stored. Field order is part of the stored bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Position in the chain, starting at 1 with no gaps.
    pub sequence: u64,
    pub time: SystemTime,
    pub request_id: String,
    /// Caller identity; empty when the request was not authenticated.
    pub caller: String,
    /// "certificate", "bearer_key" or "none".
    pub auth_method: String,
    /// Remote address of the connection, when known.
    pub peer: Option<String>,
    pub rpc: String,
    pub connection_id: Option<String>,
    pub environment: Option<Environment>,
    pub tenant_id: Option<i64>,
    /// Credential version a token was minted from, or that a registration,
    /// rotation or rollback made current.
    pub credential_version: Option<u32>,
    /// gRPC status code name, such as "OK" or "PERMISSION_DENIED".
    pub code: String,
    /// Hex SHA-256 of the stored bytes of the previous event.
    pub previous_hash: String,
}

/// The fields of an event that the RPC layer fills in.
#[derive(Clone, Debug, Default)]
pub struct EventDraft {
    pub request_id: String,
    pub caller: String,
    pub auth_method: String,
    pub peer: Option<String>,
    pub rpc: String,
    pub connection_id: Option<String>,
    pub environment: Option<Environment>,
    pub tenant_id: Option<i64>,
    pub credential_version: Option<u32>,
    pub code: String,
}

/// An event with the hash of its stored bytes.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    pub event: AuditEvent,
    pub hash: String,
}

/// Event filter of `AuditLog::list`. An unset field matches every event.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub connection_id: Option<String>,
    pub environment: Option<Environment>,
    pub tenant_id: Option<i64>,
    pub caller: Option<String>,
    pub rpc: Option<String>,
    pub credential_version: Option<u32>,
    /// Inclusive lower bound of the event time.
    pub start_time: Option<SystemTime>,
    /// Exclusive upper bound of the event time.
    pub end_time: Option<SystemTime>,
}

impl Filter {
    fn matches(&self, event: &AuditEvent) -> bool {
        self.connection_id
            .as_ref()
            .is_none_or(|id| event.connection_id.as_ref() == Some(id))
            && self
                .environment
                .is_none_or(|e| event.environment == Some(e))
            && self.tenant_id.is_none_or(|t| event.tenant_id == Some(t))
            && self.caller.as_ref().is_none_or(|c| &event.caller == c)
            && self.rpc.as_ref().is_none_or(|r| &event.rpc == r)
            && self
                .credential_version
                .is_none_or(|v| event.credential_version == Some(v))
            && self.start_time.is_none_or(|start| event.time >= start)
            && self.end_time.is_none_or(|end| event.time < end)
    }
}

/// One page of `AuditLog::list`.
pub struct Page {
    pub events: Vec<StoredEvent>,
    /// Sequence to continue after, when more events may follow.
    pub next_after: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit trail I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("audit event {sequence} is not readable: {reason}")]
    Corrupt { sequence: u64, reason: String },
    #[error("{0}")]
    Unavailable(String),
    #[error("cannot read the audit events of the database: {0}")]
    Legacy(#[from] sled::Error),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub sequence: u64,
    pub hash: String,
}

/// The append-only, hash-chained audit trail of a data directory.
pub struct AuditLog {
    trail: TrailFile,
    /// False after a failed append, until an append succeeds again.
    healthy: AtomicBool,
    #[cfg(test)]
    fail_appends: AtomicBool,
}

impl AuditLog {
    /// Opens the trail in `dir`, continuing the chain after its last event.
    pub fn open(dir: &Path, sync: SyncPolicy) -> Result<Self, AuditError> {
        Ok(Self {
            trail: TrailFile::open(dir, sync)?,
            healthy: AtomicBool::new(true),
            #[cfg(test)]
            fail_appends: AtomicBool::new(false),
        })
    }

    /// Number of events appended.
    pub fn len(&self) -> u64 {
        self.trail.lock().head.sequence
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns whether the last append succeeded.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// Appends an event and returns once it is on disk.
    pub async fn append(&self, draft: EventDraft) -> Result<StoredEvent, AuditError> {
        let result = self.append_inner(draft).await;
        self.healthy.store(result.is_ok(), Ordering::SeqCst);
        result
    }

    async fn append_inner(&self, draft: EventDraft) -> Result<StoredEvent, AuditError> {
        #[cfg(test)]
        if self.fail_appends.load(Ordering::SeqCst) {
            return Err(AuditError::Unavailable(
                "injected audit write failure".into(),
            ));
        }
        let (stored, queued) = {
            let mut state = self.trail.lock();
            let event = AuditEvent {
                sequence: state.head.sequence + 1,
                time: SystemTime::now(),
                request_id: draft.request_id,
                caller: draft.caller,
                auth_method: draft.auth_method,
                peer: draft.peer,
                rpc: draft.rpc,
                connection_id: draft.connection_id,
                environment: draft.environment,
                tenant_id: draft.tenant_id,
                credential_version: draft.credential_version,
                code: draft.code,
                previous_hash: state.head.hash.clone(),
            };
            let bytes = serde_json::to_vec(&event).expect("audit events are JSON-representable");
            let head = Head {
                sequence: event.sequence,
                hash: hash_hex(&bytes),
            };
            let hash = head.hash.clone();
            let queued = self.trail.queue(&mut state, &bytes, head)?;
            (StoredEvent { event, hash }, queued)
        };
        self.trail.wait(queued).await?;
        Ok(stored)
    }

    /// Returns up to `limit` events after sequence `after` that match
    /// `filter`, oldest first, reading at most `scan_limit` events. Only
    /// events on disk are read.
    pub fn list(
        &self,
        after: u64,
        limit: usize,
        scan_limit: usize,
        filter: &Filter,
    ) -> Result<Page, AuditError> {
        let (durable, start) = {
            let state = self.trail.lock();
            let slot = (after / file::INDEX_STRIDE) as usize;
            match state.index.get(slot) {
                Some(&offset) if after < state.durable.sequence => (
                    state.durable.sequence,
                    (slot as u64 * file::INDEX_STRIDE + 1, offset),
                ),
                _ => {
                    return Ok(Page {
                        events: Vec::new(),
                        next_after: None,
                    });
                }
            }
        };
        let reader = std::fs::File::open(&self.trail.path)?;
        let mut events = Vec::new();
        let mut last_seen = after;
        let mut scanned = 0;
        let mut next_after = None;
        file::scan_lines(&reader, start.1, start.0, |sequence, _, line| {
            if sequence <= after {
                return Ok(true);
            }
            if sequence > durable {
                return Ok(false);
            }
            if scanned == scan_limit {
                next_after = Some(last_seen);
                return Ok(false);
            }
            scanned += 1;
            let event: AuditEvent =
                serde_json::from_slice(line).map_err(|e| AuditError::Corrupt {
                    sequence,
                    reason: e.to_string(),
                })?;
            if !filter.matches(&event) {
                last_seen = sequence;
                return Ok(true);
            }
            if events.len() == limit {
                next_after = Some(last_seen);
                return Ok(false);
            }
            last_seen = sequence;
            events.push(StoredEvent {
                event,
                hash: hash_hex(line),
            });
            Ok(true)
        })?;
        Ok(Page { events, next_after })
    }

    /// Makes every later append fail, to test how RPCs react.
    #[cfg(test)]
    pub fn fail_appends(&self, fail: bool) {
        self.fail_appends.store(fail, Ordering::SeqCst);
    }
}

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

fn hash_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(caller: &str, tenant_id: i64) -> EventDraft {
        EventDraft {
            request_id: "req".into(),
            caller: caller.into(),
            auth_method: "bearer_key".into(),
            rpc: "GetAccessToken".into(),
            tenant_id: Some(tenant_id),
            code: "OK".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn appends_chain_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), SyncPolicy::Always).unwrap();
        let first = log.append(draft("a", 1)).await.unwrap();
        let second = log.append(draft("b", 2)).await.unwrap();
        assert_eq!(first.event.sequence, 1);
        assert_eq!(first.event.previous_hash, GENESIS_HASH);
        assert_eq!(second.event.previous_hash, first.hash);
        drop(log);

        let log = AuditLog::open(dir.path(), SyncPolicy::Always).unwrap();
        let third = log.append(draft("c", 3)).await.unwrap();
        assert_eq!(third.event.sequence, 3);
        assert_eq!(third.event.previous_hash, second.hash);
        drop(log);
        let verified = verify_data_dir(dir.path()).unwrap();
        assert_eq!(verified.events, 3);
        assert_eq!(verified.head_hash, third.hash);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_form_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let log = std::sync::Arc::new(AuditLog::open(dir.path(), SyncPolicy::Always).unwrap());
        let tasks: Vec<_> = (0..32)
            .map(|task| {
                let log = log.clone();
                tokio::spawn(async move {
                    for i in 0..50 {
                        log.append(draft(&format!("caller-{task}"), i))
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(log.len(), 1600);
        let all = log.list(0, 2000, usize::MAX, &Filter::default()).unwrap();
        assert_eq!(all.events.len(), 1600);
        // Paging from past an index entry starts at the right event.
        let page = log.list(1030, 5, usize::MAX, &Filter::default()).unwrap();
        let sequences: Vec<u64> = page.events.iter().map(|e| e.event.sequence).collect();
        assert_eq!(sequences, [1031, 1032, 1033, 1034, 1035]);
        drop(all);
        let log = std::sync::Arc::into_inner(log).unwrap();
        drop(log);
        assert_eq!(verify_data_dir(dir.path()).unwrap().events, 1600);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn interval_sync_writes_before_returning() {
        let dir = tempfile::tempdir().unwrap();
        let policy = SyncPolicy::Within(std::time::Duration::from_millis(5));
        let log = AuditLog::open(dir.path(), policy).unwrap();
        for i in 0..20 {
            let stored = log.append(draft("a", i)).await.unwrap();
            // On disk (in the page cache) as soon as the append returns.
            let text = std::fs::read_to_string(dir.path().join(EVENTS_FILE)).unwrap();
            assert_eq!(text.lines().count() as u64, stored.event.sequence);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let page = log.list(0, 100, usize::MAX, &Filter::default()).unwrap();
        assert_eq!(page.events.len(), 20);
        drop(log);
        let verified = verify_data_dir(dir.path()).unwrap();
        assert_eq!(verified.events, 20);
        let log = AuditLog::open(dir.path(), policy).unwrap();
        assert_eq!(log.append(draft("b", 1)).await.unwrap().event.sequence, 21);
    }

    #[tokio::test]
    async fn incomplete_last_line_is_dropped_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), SyncPolicy::Always).unwrap();
        let first = log.append(draft("a", 1)).await.unwrap();
        drop(log);
        let path = dir.path().join(EVENTS_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"{\"sequence\":2,\"ti");
        std::fs::write(&path, bytes).unwrap();

        let log = AuditLog::open(dir.path(), SyncPolicy::Always).unwrap();
        let second = log.append(draft("b", 2)).await.unwrap();
        assert_eq!(second.event.sequence, 2);
        assert_eq!(second.event.previous_hash, first.hash);
        drop(log);
        assert_eq!(verify_data_dir(dir.path()).unwrap().events, 2);
    }

    #[tokio::test]
    async fn deleted_tail_refuses_open() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), SyncPolicy::Always).unwrap();
        log.append(draft("a", 1)).await.unwrap();
        log.append(draft("b", 2)).await.unwrap();
        drop(log);

        let path = dir.path().join(EVENTS_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        let first_line = text.lines().next().unwrap();
        std::fs::write(&path, format!("{first_line}\n")).unwrap();
        let error = AuditLog::open(dir.path(), SyncPolicy::Always)
            .err()
            .expect("open must fail");
        assert!(error.to_string().contains("events were deleted"), "{error}");

        std::fs::remove_file(dir.path().join(HEAD_FILE)).unwrap();
        let error = AuditLog::open(dir.path(), SyncPolicy::Always)
            .err()
            .expect("open must fail");
        assert!(error.to_string().contains("head record"), "{error}");
    }

    #[tokio::test]
    async fn list_filters_and_pages() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), SyncPolicy::Always).unwrap();
        for i in 0..10 {
            log.append(draft(if i % 2 == 0 { "even" } else { "odd" }, i))
                .await
                .unwrap();
        }
        let filter = Filter {
            caller: Some("even".into()),
            ..Default::default()
        };
        let page = log.list(0, 3, usize::MAX, &filter).unwrap();
        let sequences: Vec<u64> = page.events.iter().map(|e| e.event.sequence).collect();
        assert_eq!(sequences, [1, 3, 5]);
        // Event 6 was read and skipped before the page filled up.
        assert_eq!(page.next_after, Some(6));
        let page = log.list(6, 3, usize::MAX, &filter).unwrap();
        let sequences: Vec<u64> = page.events.iter().map(|e| e.event.sequence).collect();
        assert_eq!(sequences, [7, 9]);
        assert_eq!(page.next_after, None);

        // A scan limit ends the page early with a token to continue.
        let page = log.list(0, 100, 4, &filter).unwrap();
        assert_eq!(page.events.len(), 2);
        assert_eq!(page.next_after, Some(4));
        // Nothing after the last event.
        assert!(
            log.list(10, 3, usize::MAX, &filter)
                .unwrap()
                .events
                .is_empty()
        );
    }

    #[tokio::test]
    async fn failed_append_marks_unhealthy() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), SyncPolicy::Always).unwrap();
        log.fail_appends(true);
        assert!(log.append(draft("a", 1)).await.is_err());
        assert!(!log.is_healthy());
        log.fail_appends(false);
        let event = log.append(draft("a", 1)).await.unwrap();
        assert_eq!(event.event.sequence, 1);
        assert!(log.is_healthy());
    }

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
        let next = log.append(draft("a", 1)).await.unwrap();
        assert_eq!(next.event.previous_hash, previous);
    }
}
