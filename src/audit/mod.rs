//! The audit trail: one event per RPC, allowed or denied, appended to the
//! `audit_events` sled tree of the vault's database and hash-chained, so an
//! edited or deleted event is detectable by `stvault audit verify`.
//!
//! Events hold identities, ids and outcomes, never a secret, token, app key
//! or a hash of one.

mod chain;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sled::Transactional;

use crate::model::Environment;

pub use chain::{ChainBreak, Verified, VerifyError, verify_data_dir, verify_db};

const EVENTS_TREE: &str = "audit_events";
/// Tree holding one key, `HEAD_KEY`: the sequence and hash of the last
/// event, so deleting events at the end of the chain is detectable too.
const HEAD_TREE: &str = "audit_head";
const HEAD_KEY: &[u8] = b"head";
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
    #[error("audit storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("audit event {sequence} is not readable: {reason}")]
    Corrupt { sequence: u64, reason: String },
}

#[derive(Clone, Serialize, Deserialize)]
struct Head {
    sequence: u64,
    hash: String,
}

/// The append-only, hash-chained audit trail.
pub struct AuditLog {
    db: sled::Db,
    events: sled::Tree,
    head_tree: sled::Tree,
    /// Last appended event. Holding this lock while choosing the sequence
    /// and inserting keeps the chain in order.
    head: Mutex<Head>,
    /// Highest sequence known to be on disk.
    flushed: AtomicU64,
    /// Held while flushing, so one fsync covers every event appended
    /// before it started and waiting appends need not flush again.
    flush_lock: tokio::sync::Mutex<()>,
    /// False after a failed append, until an append succeeds again.
    healthy: AtomicBool,
    #[cfg(test)]
    fail_appends: AtomicBool,
}

impl AuditLog {
    /// Opens the audit trees of `db`, continuing the chain after its head.
    pub fn open(db: &sled::Db) -> Result<Self, AuditError> {
        let events = db.open_tree(EVENTS_TREE)?;
        let head_tree = db.open_tree(HEAD_TREE)?;
        let head = match head_tree.get(HEAD_KEY)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| AuditError::Corrupt {
                sequence: 0,
                reason: format!("the chain head is not readable: {e}"),
            })?,
            // Every append writes the head with its event, so events without
            // a head mean the newest events and the head were removed.
            // Continuing would write a new head over the gap and hide it.
            None => match events.last()? {
                Some((key, _)) => {
                    return Err(AuditError::Corrupt {
                        sequence: sequence_of(&key),
                        reason: "the chain head record is missing, so newer events may have                                  been deleted; run `stvault audit verify` on a copy of the data                                  directory"
                            .to_owned(),
                    });
                }
                None => Head {
                    sequence: 0,
                    hash: GENESIS_HASH.to_owned(),
                },
            },
        };
        Ok(Self {
            db: db.clone(),
            events,
            head_tree,
            flushed: AtomicU64::new(head.sequence),
            head: Mutex::new(head),
            flush_lock: tokio::sync::Mutex::new(()),
            healthy: AtomicBool::new(true),
            #[cfg(test)]
            fail_appends: AtomicBool::new(false),
        })
    }

    /// Number of events stored.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Returns whether the last append succeeded.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// Appends an event and flushes it to disk before returning.
    pub async fn append(&self, draft: EventDraft) -> Result<StoredEvent, AuditError> {
        let result = self.append_inner(draft).await;
        self.healthy.store(result.is_ok(), Ordering::SeqCst);
        result
    }

    async fn append_inner(&self, draft: EventDraft) -> Result<StoredEvent, AuditError> {
        #[cfg(test)]
        if self.fail_appends.load(Ordering::SeqCst) {
            return Err(AuditError::Sled(sled::Error::Io(std::io::Error::other(
                "injected audit write failure",
            ))));
        }
        let stored = {
            let mut head = self
                .head
                .lock()
                .expect("the audit head lock is never poisoned");
            let event = AuditEvent {
                sequence: head.sequence + 1,
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
                previous_hash: head.hash.clone(),
            };
            let bytes = serde_json::to_vec(&event).expect("audit events are JSON-representable");
            let next = Head {
                sequence: event.sequence,
                hash: hash_hex(&bytes),
            };
            let head_bytes = serde_json::to_vec(&next).expect("the head is JSON-representable");
            (&self.events, &self.head_tree)
                .transaction(|(events, head_tree)| {
                    events.insert(&event.sequence.to_be_bytes(), bytes.as_slice())?;
                    head_tree.insert(HEAD_KEY, head_bytes.as_slice())?;
                    Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
                })
                .map_err(|e| match e {
                    sled::transaction::TransactionError::Storage(e) => AuditError::Sled(e),
                    sled::transaction::TransactionError::Abort(()) => {
                        unreachable!("the append transaction never aborts")
                    }
                })?;
            let hash = next.hash.clone();
            *head = next;
            StoredEvent { event, hash }
        };
        self.flush_through(stored.event.sequence).await?;
        Ok(stored)
    }

    /// Waits until every event up to `sequence` is on disk. Concurrent
    /// callers share one flush (group commit).
    async fn flush_through(&self, sequence: u64) -> Result<(), AuditError> {
        if self.flushed.load(Ordering::SeqCst) >= sequence {
            return Ok(());
        }
        let _flushing = self.flush_lock.lock().await;
        if self.flushed.load(Ordering::SeqCst) >= sequence {
            return Ok(());
        }
        let target = self
            .head
            .lock()
            .expect("the audit head lock is never poisoned")
            .sequence;
        // In sled 0.34, `flush_async` futures polled concurrently can stay
        // pending forever, so the blocking flush runs on the blocking pool.
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| AuditError::Sled(sled::Error::Io(std::io::Error::other(e))))??;
        self.flushed.fetch_max(target, Ordering::SeqCst);
        Ok(())
    }

    /// Returns up to `limit` events after sequence `after` that match
    /// `filter`, oldest first, scanning at most `scan_limit` events.
    pub fn list(
        &self,
        after: u64,
        limit: usize,
        scan_limit: usize,
        filter: &Filter,
    ) -> Result<Page, AuditError> {
        let start = after.saturating_add(1).to_be_bytes();
        let mut events = Vec::new();
        let mut last_seen = after;
        for (scanned, entry) in self.events.range(start..).enumerate() {
            let (key, value) = entry?;
            let sequence = sequence_of(&key);
            if scanned == scan_limit {
                return Ok(Page {
                    events,
                    next_after: Some(last_seen),
                });
            }
            let event: AuditEvent =
                serde_json::from_slice(&value).map_err(|e| AuditError::Corrupt {
                    sequence,
                    reason: e.to_string(),
                })?;
            if !filter.matches(&event) {
                last_seen = sequence;
                continue;
            }
            if events.len() == limit {
                return Ok(Page {
                    events,
                    next_after: Some(last_seen),
                });
            }
            last_seen = sequence;
            events.push(StoredEvent {
                event,
                hash: hash_hex(&value),
            });
        }
        Ok(Page {
            events,
            next_after: None,
        })
    }

    /// Makes every later append fail, to test how RPCs react.
    #[cfg(test)]
    pub fn fail_appends(&self, fail: bool) {
        self.fail_appends.store(fail, Ordering::SeqCst);
    }
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
        let db = sled::open(dir.path().join("db")).unwrap();
        let log = AuditLog::open(&db).unwrap();
        let first = log.append(draft("a", 1)).await.unwrap();
        let second = log.append(draft("b", 2)).await.unwrap();
        assert_eq!(first.event.sequence, 1);
        assert_eq!(first.event.previous_hash, GENESIS_HASH);
        assert_eq!(second.event.previous_hash, first.hash);
        drop(log);

        let log = AuditLog::open(&db).unwrap();
        let third = log.append(draft("c", 3)).await.unwrap();
        assert_eq!(third.event.sequence, 3);
        assert_eq!(third.event.previous_hash, second.hash);
        let verified = verify_db(&db).unwrap();
        assert_eq!(verified.events, 3);
        assert_eq!(verified.head_hash, third.hash);
    }

    #[tokio::test]
    async fn missing_head_with_events_refuses_open() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let log = AuditLog::open(&db).unwrap();
        log.append(draft("a", 1)).await.unwrap();
        log.append(draft("b", 2)).await.unwrap();
        drop(log);

        // The newest event and the head removed together.
        db.open_tree(EVENTS_TREE).unwrap().pop_max().unwrap();
        db.open_tree(HEAD_TREE).unwrap().remove(HEAD_KEY).unwrap();
        let error = AuditLog::open(&db).err().expect("open must fail");
        assert!(
            error.to_string().contains("head record is missing"),
            "{error}"
        );
        assert!(verify_db(&db).is_err());
    }

    #[tokio::test]
    async fn list_filters_and_pages() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let log = AuditLog::open(&db).unwrap();
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
    }

    #[tokio::test]
    async fn failed_append_marks_unhealthy() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let log = AuditLog::open(&db).unwrap();
        log.fail_appends(true);
        assert!(log.append(draft("a", 1)).await.is_err());
        assert!(!log.is_healthy());
        log.fail_appends(false);
        let event = log.append(draft("a", 1)).await.unwrap();
        assert_eq!(event.event.sequence, 1);
        assert!(log.is_healthy());
    }
}
