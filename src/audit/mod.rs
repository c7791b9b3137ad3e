//! The audit trail: one event per RPC, allowed or denied, appended and
//! hash-chained, so an edited or deleted event is detectable by `stvault
//! audit verify`. With sled storage the trail is a file in the data
//! directory. With PostgreSQL it is a table in the database, where every
//! replica appends to the same chain, and a local spool in the data
//! directory keeps events while the database is unreachable.
//!
//! Events hold identities, ids and outcomes, never a secret, token, app key
//! or a hash of one.

mod chain;
mod file;
mod legacy;
mod postgres;
mod spool;

use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::Environment;
use crate::store::{PostgresStore, StoreError};
use file::TrailFile;
use postgres::PostgresTrail;

pub use chain::{ChainBreak, Verified, VerifyError, verify_data_dir};
pub use file::{EVENTS_FILE, HEAD_FILE, SyncPolicy};
pub use legacy::import_legacy;
pub use postgres::verify_database;
pub use spool::{SPOOL_FILE, SpooledEvent};

/// Reads the events of the trail file in `dir` as stored, oldest first,
/// after checking its chain, and returns them with the verified chain.
pub fn read_verified_lines(dir: &Path) -> Result<(Verified, Vec<Vec<u8>>), VerifyError> {
    let verified = verify_data_dir(dir)?;
    let file = std::fs::File::open(file::events_path(dir))?;
    let mut lines = Vec::new();
    file::scan_lines(&file, 0, 1, |sequence, _, line| {
        lines.push(line.to_vec());
        Ok(sequence < verified.events)
    })
    .map_err(|e| match e {
        AuditError::Io(e) => VerifyError::Read(e),
        other => VerifyError::Read(std::io::Error::other(other.to_string())),
    })?;
    Ok((verified, lines))
}

/// Copies `lines` (from `read_verified_lines`) into the empty audit trail
/// of a PostgreSQL store and returns its new head.
pub async fn import_into_postgres(
    store: &PostgresStore,
    lines: &[Vec<u8>],
) -> Result<Head, crate::store::StoreError> {
    PostgresTrail::new(store.clone()).import(lines).await
}

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

impl AuditEvent {
    /// Builds the event that follows `head` in the chain, timed now.
    fn after(head: &Head, draft: EventDraft) -> Self {
        Self::at(head, SystemTime::now(), draft)
    }

    /// Builds the event that follows `head` in the chain for a call made
    /// at `time`.
    fn at(head: &Head, time: SystemTime, draft: EventDraft) -> Self {
        Self {
            sequence: head.sequence + 1,
            time,
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
        }
    }

    /// Returns the stored bytes, which the chain hashes.
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("audit events are JSON-representable")
    }
}

/// The fields of an event that the RPC layer fills in. Serialized only
/// into the spool, with the same field names as `AuditEvent`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
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

/// The place where an appended event was made durable.
#[derive(Clone, Debug)]
pub enum Appended {
    /// In the chain, at its place.
    Chained(Box<StoredEvent>),
    /// In the local spool of a server on PostgreSQL, synced, until the
    /// forwarder gives it a place in the chain.
    Spooled,
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
    /// The PostgreSQL trail could not be read or written.
    #[error("audit trail: {0}")]
    Database(#[from] StoreError),
    /// A line of the local audit spool cannot be read, so its events
    /// cannot be forwarded.
    #[error(
        "line {line} of the audit spool {} is not readable: {reason}; move the file aside \
         to start, and keep it to inspect its events",
        path.display()
    )]
    SpoolCorrupt {
        path: PathBuf,
        line: u64,
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub sequence: u64,
    pub hash: String,
}

/// The append-only, hash-chained audit trail.
pub struct AuditLog {
    backend: Backend,
    /// False after a failed append, until an append succeeds again.
    healthy: AtomicBool,
    #[cfg(test)]
    fail_appends: AtomicBool,
}

enum Backend {
    /// The trail file of a data directory.
    File(Box<TrailFile>),
    /// The audit tables of a PostgreSQL database.
    Postgres(PostgresTrail),
}

impl AuditLog {
    /// Opens the trail in `dir`, continuing the chain after its last event.
    pub fn open(dir: &Path, sync: SyncPolicy) -> Result<Self, AuditError> {
        let trail = TrailFile::open(dir, sync)?;
        Ok(Self::with_backend(Backend::File(Box::new(trail))))
    }

    /// Opens the trail in the database of `store`, whose schema is up to
    /// date, with its spool in `spool_dir`. Appends continue the chain
    /// after the database's last event, whichever server appended it.
    /// Events left in the spool wait for `forward_spool`.
    pub fn open_postgres(store: &PostgresStore, spool_dir: &Path) -> Result<Self, AuditError> {
        let trail = PostgresTrail::with_spool(store.clone(), spool_dir)?;
        Ok(Self::with_backend(Backend::Postgres(trail)))
    }

    /// Opens the trail in the database of `store` without a spool, so an
    /// append fails while the database is unreachable.
    pub fn open_postgres_unspooled(store: &PostgresStore) -> Self {
        Self::with_backend(Backend::Postgres(PostgresTrail::new(store.clone())))
    }

    /// Forwards spooled events to the chain in the database until
    /// `stopping` turns true. Returns at once for a trail without a spool.
    pub async fn forward_spool(&self, stopping: tokio::sync::watch::Receiver<bool>) {
        if let Backend::Postgres(trail) = &self.backend {
            trail.forward_spool(stopping).await;
        }
    }

    fn with_backend(backend: Backend) -> Self {
        Self {
            backend,
            healthy: AtomicBool::new(true),
            #[cfg(test)]
            fail_appends: AtomicBool::new(false),
        }
    }

    /// Returns the number of events appended, by every server that shares
    /// the trail.
    pub async fn len(&self) -> Result<u64, AuditError> {
        match &self.backend {
            Backend::File(trail) => Ok(trail.lock().head.sequence),
            Backend::Postgres(trail) => Ok(trail.head().await?.sequence),
        }
    }

    pub async fn is_empty(&self) -> Result<bool, AuditError> {
        Ok(self.len().await? == 0)
    }

    /// Returns whether the last append succeeded.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// Returns whether an append may succeed: the last one did, or, with
    /// PostgreSQL, an insert into the trail succeeds again (and is rolled
    /// back) after a failed one.
    pub async fn is_writable(&self) -> bool {
        if self.is_healthy() {
            return true;
        }
        match &self.backend {
            Backend::File(_) => false,
            Backend::Postgres(trail) => trail.probe_insert().await.is_ok(),
        }
    }

    /// Appends an event and returns once it is on disk, committed to the
    /// database, or, while the database is unreachable, synced to the
    /// spool.
    pub async fn append(&self, draft: EventDraft) -> Result<Appended, AuditError> {
        let result = self.append_inner(draft).await;
        self.healthy.store(result.is_ok(), Ordering::SeqCst);
        result
    }

    async fn append_inner(&self, draft: EventDraft) -> Result<Appended, AuditError> {
        #[cfg(test)]
        if self.fail_appends.load(Ordering::SeqCst) {
            return Err(AuditError::Unavailable(
                "injected audit write failure".into(),
            ));
        }
        match &self.backend {
            Backend::File(trail) => append_to_file(trail, draft)
                .await
                .map(|stored| Appended::Chained(Box::new(stored))),
            Backend::Postgres(trail) => trail.append(draft).await,
        }
    }

    /// Returns up to `limit` events after sequence `after` that match
    /// `filter`, oldest first, reading at most `scan_limit` events. Only
    /// events on disk, or committed, are read: spooled events appear once
    /// they are forwarded.
    pub async fn list(
        &self,
        after: u64,
        limit: usize,
        scan_limit: usize,
        filter: &Filter,
    ) -> Result<Page, AuditError> {
        let page = PageBuilder {
            after,
            limit,
            scan_limit,
            filter,
            events: Vec::new(),
            last_seen: after,
            scanned: 0,
            next_after: None,
        };
        match &self.backend {
            Backend::File(trail) => list_file(trail, page),
            Backend::Postgres(trail) => trail.list(page).await,
        }
    }

    /// Makes every later append fail, to test how RPCs react.
    #[cfg(test)]
    pub fn fail_appends(&self, fail: bool) {
        self.fail_appends.store(fail, Ordering::SeqCst);
    }
}

async fn append_to_file(trail: &TrailFile, draft: EventDraft) -> Result<StoredEvent, AuditError> {
    let (stored, queued) = {
        let mut state = trail.lock();
        let event = AuditEvent::after(&state.head, draft);
        let bytes = event.encode();
        let head = Head {
            sequence: event.sequence,
            hash: hash_hex(&bytes),
        };
        let hash = head.hash.clone();
        let queued = trail.queue(&mut state, &bytes, head)?;
        (StoredEvent { event, hash }, queued)
    };
    trail.wait(queued).await?;
    Ok(stored)
}

fn list_file(trail: &TrailFile, mut page: PageBuilder<'_>) -> Result<Page, AuditError> {
    let after = page.after;
    let (durable, start) = {
        let state = trail.lock();
        let slot = (after / file::INDEX_STRIDE) as usize;
        match state.index.get(slot) {
            Some(&offset) if after < state.durable.sequence => (
                state.durable.sequence,
                (slot as u64 * file::INDEX_STRIDE + 1, offset),
            ),
            _ => return Ok(page.finish()),
        }
    };
    let reader = std::fs::File::open(&trail.path)?;
    file::scan_lines(&reader, start.1, start.0, |sequence, _, line| {
        if sequence > durable {
            return Ok(false);
        }
        page.offer(sequence, line)
    })?;
    Ok(page.finish())
}

/// One page of `AuditLog::list` as it is read, event by event, oldest
/// first.
struct PageBuilder<'a> {
    after: u64,
    limit: usize,
    scan_limit: usize,
    filter: &'a Filter,
    events: Vec<StoredEvent>,
    /// Sequence of the last event read and either kept or filtered out.
    last_seen: u64,
    scanned: usize,
    next_after: Option<u64>,
}

impl PageBuilder<'_> {
    /// Reads the stored bytes of the event numbered `sequence`. Returns
    /// false once the page is complete.
    fn offer(&mut self, sequence: u64, bytes: &[u8]) -> Result<bool, AuditError> {
        if sequence <= self.after {
            return Ok(true);
        }
        if self.scanned == self.scan_limit {
            self.next_after = Some(self.last_seen);
            return Ok(false);
        }
        self.scanned += 1;
        let event: AuditEvent = serde_json::from_slice(bytes).map_err(|e| AuditError::Corrupt {
            sequence,
            reason: e.to_string(),
        })?;
        if !self.filter.matches(&event) {
            self.last_seen = sequence;
            return Ok(true);
        }
        if self.events.len() == self.limit {
            self.next_after = Some(self.last_seen);
            return Ok(false);
        }
        self.last_seen = sequence;
        self.events.push(StoredEvent {
            event,
            hash: hash_hex(bytes),
        });
        Ok(true)
    }

    fn finish(self) -> Page {
        Page {
            events: self.events,
            next_after: self.next_after,
        }
    }
}

fn hash_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    pub(super) fn draft(caller: &str, tenant_id: i64) -> EventDraft {
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

    /// Appends `draft` to a file trail and returns the stored event.
    pub(super) async fn append(log: &AuditLog, draft: EventDraft) -> StoredEvent {
        match log.append(draft).await.unwrap() {
            Appended::Chained(stored) => *stored,
            Appended::Spooled => panic!("a trail file never spools"),
        }
    }

    /// Queues an event as the batch leader and drops its call after the
    /// leader's first poll, before it writes the batch, as when the client
    /// goes away.
    async fn cancel_leader(log: &AuditLog) {
        let Backend::File(trail) = &log.backend else {
            unreachable!("AuditLog::open opens a trail file")
        };
        let queued = {
            let mut state = trail.lock();
            let event = AuditEvent::after(&state.head, draft("cancelled", 1));
            let bytes = event.encode();
            let head = Head {
                sequence: event.sequence,
                hash: hash_hex(&bytes),
            };
            trail.queue(&mut state, &bytes, head).unwrap()
        };
        let mut wait = Box::pin(trail.wait(queued));
        assert!(
            futures::poll!(wait.as_mut()).is_pending(),
            "the leader yields before it writes"
        );
    }

    #[tokio::test]
    async fn cancelled_leader_does_not_stall_appends() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), SyncPolicy::Always).unwrap();
        cancel_leader(&log).await;

        let next = tokio::time::timeout(Duration::from_secs(5), append(&log, draft("next", 2)))
            .await
            .expect("the next append completes");
        assert_eq!(next.event.sequence, 2);
        drop(log);
        let (verified, _) = read_verified_lines(dir.path()).unwrap();
        assert_eq!(verified.events, 2);
    }

    #[tokio::test]
    async fn cancelled_leader_event_written_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), SyncPolicy::Always).unwrap();
        cancel_leader(&log).await;
        drop(log);

        let (verified, _) = read_verified_lines(dir.path()).unwrap();
        assert_eq!(verified.events, 1);
        let log = AuditLog::open(dir.path(), SyncPolicy::Always).unwrap();
        assert_eq!(append(&log, draft("next", 2)).await.event.sequence, 2);
    }

    #[tokio::test]
    async fn appends_chain_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), SyncPolicy::Always).unwrap();
        let first = append(&log, draft("a", 1)).await;
        let second = append(&log, draft("b", 2)).await;
        assert_eq!(first.event.sequence, 1);
        assert_eq!(first.event.previous_hash, GENESIS_HASH);
        assert_eq!(second.event.previous_hash, first.hash);
        drop(log);

        let log = AuditLog::open(dir.path(), SyncPolicy::Always).unwrap();
        let third = append(&log, draft("c", 3)).await;
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
                        append(&log, draft(&format!("caller-{task}"), i)).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(log.len().await.unwrap(), 1600);
        let all = log
            .list(0, 2000, usize::MAX, &Filter::default())
            .await
            .unwrap();
        assert_eq!(all.events.len(), 1600);
        // Paging from past an index entry starts at the right event.
        let page = log
            .list(1030, 5, usize::MAX, &Filter::default())
            .await
            .unwrap();
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
            let stored = append(&log, draft("a", i)).await;
            // On disk (in the page cache) as soon as the append returns.
            let text = std::fs::read_to_string(dir.path().join(EVENTS_FILE)).unwrap();
            assert_eq!(text.lines().count() as u64, stored.event.sequence);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        // The sync thread brings the head record up to date with its sync.
        let head = file::read_head(&file::head_path(dir.path())).unwrap();
        assert_eq!(head.map(|head| head.sequence), Some(20));
        let page = log
            .list(0, 100, usize::MAX, &Filter::default())
            .await
            .unwrap();
        assert_eq!(page.events.len(), 20);
        drop(log);
        let verified = verify_data_dir(dir.path()).unwrap();
        assert_eq!(verified.events, 20);
        let log = AuditLog::open(dir.path(), policy).unwrap();
        assert_eq!(append(&log, draft("b", 1)).await.event.sequence, 21);
    }

    #[tokio::test]
    async fn incomplete_last_line_is_dropped_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), SyncPolicy::Always).unwrap();
        let first = append(&log, draft("a", 1)).await;
        drop(log);
        let path = dir.path().join(EVENTS_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"{\"sequence\":2,\"ti");
        std::fs::write(&path, bytes).unwrap();

        let log = AuditLog::open(dir.path(), SyncPolicy::Always).unwrap();
        let second = append(&log, draft("b", 2)).await;
        assert_eq!(second.event.sequence, 2);
        assert_eq!(second.event.previous_hash, first.hash);
        drop(log);
        assert_eq!(verify_data_dir(dir.path()).unwrap().events, 2);
    }

    #[tokio::test]
    async fn deleted_tail_refuses_open() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), SyncPolicy::Always).unwrap();
        append(&log, draft("a", 1)).await;
        append(&log, draft("b", 2)).await;
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
            append(&log, draft(if i % 2 == 0 { "even" } else { "odd" }, i)).await;
        }
        let filter = Filter {
            caller: Some("even".into()),
            ..Default::default()
        };
        let page = log.list(0, 3, usize::MAX, &filter).await.unwrap();
        let sequences: Vec<u64> = page.events.iter().map(|e| e.event.sequence).collect();
        assert_eq!(sequences, [1, 3, 5]);
        // Event 6 was read and skipped before the page filled up.
        assert_eq!(page.next_after, Some(6));
        let page = log.list(6, 3, usize::MAX, &filter).await.unwrap();
        let sequences: Vec<u64> = page.events.iter().map(|e| e.event.sequence).collect();
        assert_eq!(sequences, [7, 9]);
        assert_eq!(page.next_after, None);

        // A scan limit ends the page early with a token to continue.
        let page = log.list(0, 100, 4, &filter).await.unwrap();
        assert_eq!(page.events.len(), 2);
        assert_eq!(page.next_after, Some(4));
        // Nothing after the last event.
        assert!(
            log.list(10, 3, usize::MAX, &filter)
                .await
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
        let event = append(&log, draft("a", 1)).await;
        assert_eq!(event.event.sequence, 1);
        assert!(log.is_healthy());
    }
}
