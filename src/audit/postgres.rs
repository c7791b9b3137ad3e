//! The audit trail in PostgreSQL, which every server sharing the database
//! appends to as one chain.
//!
//! An append takes the head row (`stvault_audit_head`) `FOR UPDATE`,
//! numbers its events after it, inserts them and moves the head, in one
//! transaction. Servers therefore append one transaction at a time, each
//! after the last committed event. Within a server, appends are grouped: a
//! writer task takes every event queued while the previous transaction ran
//! and commits them together, so throughput does not fall to one
//! transaction per call.
//!
//! When the database cannot be reached, the writer syncs the batch to the
//! local spool (`spool.rs`) instead, and later batches follow it there
//! until the spool is empty again. A forwarder task appends spooled events
//! to the chain in spool order. The transaction that appends them also
//! records the spool's id and last forwarded position in
//! `stvault_audit_spools`, so each spooled event enters the chain once,
//! even when the spool outlives a crash.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use deadpool_postgres::GenericClient;
use tokio::sync::oneshot;
use tokio_postgres::IsolationLevel;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::chain::{ChainCheck, Verified, VerifyError, broken};
use super::spool::Spool;
use super::{
    Appended, AuditError, AuditEvent, EventDraft, Head, Page, PageBuilder, StoredEvent, hash_hex,
};
use crate::store::{DatabaseSettings, PostgresStore, StoreError};

mod spooling;

/// Most events committed in one transaction.
const MAX_BATCH: usize = 1024;
/// Rows read per query when listing or verifying.
const READ_CHUNK: i64 = 1000;
/// How long one batch may take, from waiting for a connection to the
/// commit, before its calls fail. It covers a wait for another server's
/// batch to release the head row.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const SELECT_HEAD: &str = "SELECT sequence, hash FROM stvault_audit_head";
const LOCK_HEAD: &str = "SELECT sequence, hash FROM stvault_audit_head FOR UPDATE";
const UPDATE_HEAD: &str = "UPDATE stvault_audit_head SET sequence = $1, hash = $2";
const INSERT_EVENTS: &str = "INSERT INTO stvault_audit_events (sequence, event, hash) \
     SELECT * FROM unnest($1::bigint[], $2::bytea[], $3::text[])";
const EVENTS_AFTER: &str = "SELECT sequence, event, hash FROM stvault_audit_events \
     WHERE sequence > $1 ORDER BY sequence LIMIT $2";
/// The trail in the database of a `PostgresStore`, sharing its pool.
pub struct PostgresTrail {
    shared: Arc<Shared>,
}

struct Shared {
    store: PostgresStore,
    queue: Mutex<Queue>,
    /// The spool that takes batches while the database is unreachable. A
    /// trail opened only to import events has none.
    spool: Option<Arc<tokio::sync::Mutex<Spool>>>,
}

/// Appends waiting for the writer task.
#[derive(Default)]
struct Queue {
    waiting: Vec<Waiting>,
    /// Whether a writer task runs. It empties the queue before it ends.
    writing: bool,
}

struct Waiting {
    /// When the call appended its event, which becomes the event's time.
    time: SystemTime,
    draft: EventDraft,
    reply: oneshot::Sender<Result<Appended, AuditError>>,
}

/// One row of `stvault_audit_events`.
struct EventRow {
    sequence: u64,
    event: Vec<u8>,
    hash: String,
}

impl PostgresTrail {
    /// Opens the trail without a spool, so appends fail while the database
    /// is unreachable.
    pub fn new(store: PostgresStore) -> Self {
        Self::build(store, None)
    }

    /// Opens the trail with the spool in `spool_dir`, which may hold events
    /// left by an earlier run.
    pub fn with_spool(store: PostgresStore, spool_dir: &Path) -> Result<Self, AuditError> {
        let spool = Spool::open(spool_dir)?;
        let waiting = spool.unforwarded();
        if waiting > 0 {
            tracing::info!(
                events = waiting,
                "the audit spool holds events from an earlier run; forwarding them to the database"
            );
        }
        crate::metrics::set_audit_spooled(waiting);
        Ok(Self::build(
            store,
            Some(Arc::new(tokio::sync::Mutex::new(spool))),
        ))
    }

    fn build(store: PostgresStore, spool: Option<Arc<tokio::sync::Mutex<Spool>>>) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                queue: Mutex::new(Queue::default()),
                spool,
            }),
        }
    }

    /// Returns the committed head of the chain.
    pub async fn head(&self) -> Result<Head, StoreError> {
        let store = &self.shared.store;
        let client = store.client().await?;
        let row = client
            .query_one(SELECT_HEAD, &[])
            .await
            .map_err(|e| store.error(e))?;
        head_of(store, &row)
    }

    /// Checks that an event could be inserted now, with an insert that is
    /// rolled back. A database that serves reads may still reject writes
    /// (a revoked privilege, a full disk, a constraint), so a read proves
    /// too little before an RPC acts.
    pub async fn probe_insert(&self) -> Result<(), StoreError> {
        let store = &self.shared.store;
        let error = |e| store.error(e);
        let mut client = store.client().await?;
        let transaction = client.transaction().await.map_err(error)?;
        transaction
            .execute(
                "INSERT INTO stvault_audit_events (sequence, event, hash) VALUES ($1, $2, $3)",
                &[&i64::MAX, &b"{}".as_slice(), &"probe"],
            )
            .await
            .map_err(error)?;
        transaction.rollback().await.map_err(error)
    }

    /// Copies events of another trail, byte for byte and in order, into
    /// this one, which must be empty, in one transaction. Returns the new
    /// head. Each line must be one stored event, numbered from 1.
    pub async fn import(&self, lines: &[Vec<u8>]) -> Result<Head, StoreError> {
        let store = &self.shared.store;
        let error = |e| store.error(e);
        let mut client = store.client().await?;
        let transaction = client.transaction().await.map_err(error)?;
        let row = transaction.query_one(LOCK_HEAD, &[]).await.map_err(error)?;
        let head = head_of(store, &row)?;
        if head.sequence != 0 {
            return Err(StoreError::Database(format!(
                "{}: the audit trail already contains {} events; migrate into an empty database",
                store.target(),
                head.sequence
            )));
        }
        let mut head = head;
        let mut sequences = Vec::with_capacity(lines.len());
        let mut hashes = Vec::with_capacity(lines.len());
        for line in lines {
            head = Head {
                sequence: head.sequence + 1,
                hash: hash_hex(line),
            };
            sequences.push(to_column(head.sequence));
            hashes.push(head.hash.clone());
        }
        let insert_params: [&(dyn ToSql + Sync); 3] = [&sequences, &lines, &hashes];
        transaction
            .execute(INSERT_EVENTS, &insert_params)
            .await
            .map_err(error)?;
        let head_sequence = to_column(head.sequence);
        transaction
            .execute(UPDATE_HEAD, &[&head_sequence, &head.hash])
            .await
            .map_err(error)?;
        transaction.commit().await.map_err(error)?;
        Ok(head)
    }

    /// Appends an event and returns once its transaction has committed or,
    /// while the database is unreachable, once it is synced to the spool.
    pub async fn append(&self, draft: EventDraft) -> Result<Appended, AuditError> {
        let (reply, outcome) = oneshot::channel();
        let time = SystemTime::now();
        let start_writer = {
            let mut queue = self.shared.lock();
            queue.waiting.push(Waiting { time, draft, reply });
            !std::mem::replace(&mut queue.writing, true)
        };
        // The writer runs in a task of its own, so a caller that gives up
        // does not abandon a batch that contains other callers' events.
        if start_writer {
            tokio::spawn(write_queued(self.shared.clone()));
        }
        outcome.await.unwrap_or_else(|_| {
            Err(AuditError::Unavailable(
                "the audit writer stopped before it wrote the event".into(),
            ))
        })
    }

    /// Reads committed events in sequence order into `page`.
    pub async fn list(&self, mut page: PageBuilder<'_>) -> Result<Page, AuditError> {
        let store = &self.shared.store;
        let client = store.client().await?;
        let mut after = page.after;
        loop {
            let rows = events_after(store, &client, after).await?;
            for row in &rows {
                if !page.offer(row.sequence, &row.event)? {
                    return Ok(page.finish());
                }
                after = row.sequence;
            }
            if (rows.len() as i64) < READ_CHUNK {
                return Ok(page.finish());
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .expect("the audit queue lock is never poisoned")
    }

    /// Numbers `entries` after the head, inserts them and moves the head,
    /// in one transaction. When it fails, `commit_sent` records whether the
    /// commit had been sent, in which case the transaction may have
    /// committed.
    async fn write(
        &self,
        entries: &[(SystemTime, EventDraft)],
        commit_sent: &AtomicBool,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let store = &self.store;
        let error = |e| store.error(e);
        let mut client = store.client().await?;
        let transaction = client.transaction().await.map_err(error)?;
        let stored = self.insert_after_head(&transaction, entries).await?;
        commit_sent.store(true, Ordering::SeqCst);
        transaction.commit().await.map_err(error)?;
        Ok(stored)
    }

    /// Writes a batch to the chain or, while the database is unreachable
    /// or the spool contains events, to the spool.
    async fn write_or_spool(
        &self,
        entries: Vec<(SystemTime, EventDraft)>,
    ) -> Result<Vec<Appended>, AuditError> {
        if let Some(spool) = &self.spool {
            // Events follow those already spooled, so one server's events
            // reach the chain in the order of its calls.
            if spool.lock().await.is_active() {
                return self.spool(spool, entries).await;
            }
        }
        let commit_sent = AtomicBool::new(false);
        let count = entries.len();
        let written = tokio::time::timeout(WRITE_TIMEOUT, self.write(&entries, &commit_sent))
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(format!(
                    "{}: the audit transaction did not commit within {} s",
                    self.store.target(),
                    WRITE_TIMEOUT.as_secs()
                )))
            });
        let error = match written {
            Ok(events) => {
                let chained = events
                    .into_iter()
                    .map(|event| Appended::Chained(Box::new(event)));
                return Ok(chained.collect());
            }
            Err(error) => error,
        };
        // Spooling a batch whose commit may have succeeded could put its
        // events in the chain twice, so its calls fail instead.
        let in_doubt = commit_sent.load(Ordering::SeqCst);
        if let (StoreError::Unavailable(_), false, Some(spool)) = (&error, in_doubt, &self.spool) {
            tracing::warn!(
                %error,
                events = count,
                "the database is unreachable; audit events go to the local spool until it is back"
            );
            return self.spool(spool, entries).await;
        }
        Err(AuditError::Unavailable(format!(
            "cannot write the audit trail: {error}"
        )))
    }

    /// Numbers `entries` after the head, which it locks, inserts them and
    /// moves the head, within `transaction`.
    async fn insert_after_head(
        &self,
        transaction: &deadpool_postgres::Transaction<'_>,
        entries: &[(SystemTime, EventDraft)],
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let store = &self.store;
        let error = |e| store.error(e);
        let lock_head = transaction.prepare_cached(LOCK_HEAD).await.map_err(error)?;
        let row = transaction
            .query_one(&lock_head, &[])
            .await
            .map_err(error)?;
        let mut head = head_of(store, &row)?;

        let mut stored = Vec::with_capacity(entries.len());
        let mut sequences = Vec::with_capacity(entries.len());
        let mut events = Vec::with_capacity(entries.len());
        let mut hashes = Vec::with_capacity(entries.len());
        for (time, draft) in entries {
            let event = AuditEvent::at(&head, *time, draft.clone());
            let bytes = event.encode();
            head = Head {
                sequence: event.sequence,
                hash: hash_hex(&bytes),
            };
            sequences.push(to_column(head.sequence));
            events.push(bytes);
            hashes.push(head.hash.clone());
            stored.push(StoredEvent {
                event,
                hash: head.hash.clone(),
            });
        }

        let insert = transaction
            .prepare_cached(INSERT_EVENTS)
            .await
            .map_err(error)?;
        let update = transaction
            .prepare_cached(UPDATE_HEAD)
            .await
            .map_err(error)?;
        let head_sequence = to_column(head.sequence);
        let insert_params: [&(dyn ToSql + Sync); 3] = [&sequences, &events, &hashes];
        let update_params: [&(dyn ToSql + Sync); 2] = [&head_sequence, &head.hash];
        // Sent together: tokio-postgres pipelines the two statements.
        futures::try_join!(
            transaction.execute(&insert, &insert_params),
            transaction.execute(&update, &update_params),
        )
        .map_err(error)?;
        Ok(stored)
    }
}

/// Writes queued events in batches until none are left.
///
/// NOTE: when the connection drops or the batch times out while its commit
/// is in flight, the batch may have committed although its calls fail. The
/// chain stays whole either way, since the head moves in the same
/// transaction. Such a batch is not spooled.
async fn write_queued(shared: Arc<Shared>) {
    loop {
        let batch: Vec<Waiting> = {
            let mut queue = shared.lock();
            if queue.waiting.is_empty() {
                queue.writing = false;
                return;
            }
            let count = queue.waiting.len().min(MAX_BATCH);
            queue.waiting.drain(..count).collect()
        };
        let (entries, replies): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .map(|waiting| ((waiting.time, waiting.draft), waiting.reply))
            .unzip();
        let count = entries.len();
        match shared.write_or_spool(entries).await {
            Ok(appended) => {
                for (reply, event) in replies.into_iter().zip(appended) {
                    let _ = reply.send(Ok(event));
                }
            }
            Err(error) => {
                tracing::error!(%error, events = count, "an audit batch was not written; its calls fail");
                let reason = error.to_string();
                for reply in replies {
                    let _ = reply.send(Err(AuditError::Unavailable(reason.clone())));
                }
            }
        }
    }
}

/// Verifies the audit chain in the database as of the start of the check.
/// One read-only transaction reads the head and every event at one point in
/// time, while servers keep appending.
pub async fn verify_database(settings: &DatabaseSettings) -> Result<Verified, VerifyError> {
    let store = PostgresStore::connect_unmigrated(settings).map_err(read_error)?;
    let read = |e: tokio_postgres::Error| {
        if e.code() == Some(&SqlState::UNDEFINED_TABLE) {
            VerifyError::MissingTables {
                database: store.target().to_owned(),
            }
        } else {
            read_error(store.error(e))
        }
    };
    let mut client = store.client().await.map_err(read_error)?;
    let transaction = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(read)?;
    let head = match transaction
        .query_opt(SELECT_HEAD, &[])
        .await
        .map_err(read)?
    {
        Some(row) => Some(head_of(&store, &row).map_err(read_error)?),
        None => None,
    };

    let mut check = ChainCheck::new(head.clone());
    loop {
        let rows = events_after(&store, &transaction, check.last())
            .await
            .map_err(read_error)?;
        for row in &rows {
            let hash = check.next(&row.event)?;
            let sequence = check.last();
            if row.sequence != sequence {
                let reason = format!("the row's sequence column says {}", row.sequence);
                return Err(broken(sequence, reason).into());
            }
            if row.hash != hash {
                let reason = "the event does not match the hash stored beside it; it was edited";
                return Err(broken(sequence, reason.into()).into());
            }
        }
        if (rows.len() as i64) < READ_CHUNK {
            break;
        }
    }
    let verified = check.finish(false)?;
    // The head moves in the transaction that adds events, so a later event
    // was added some other way.
    if let Some(head) = head.filter(|head| verified.events > head.sequence) {
        let reason = "the event is newer than the chain head; it was added outside stvault";
        return Err(broken(head.sequence + 1, reason.into()).into());
    }
    Ok(verified)
}

/// Returns up to `READ_CHUNK` events after sequence `after`, in order.
async fn events_after(
    store: &PostgresStore,
    client: &impl GenericClient,
    after: u64,
) -> Result<Vec<EventRow>, StoreError> {
    let statement = client
        .prepare_cached(EVENTS_AFTER)
        .await
        .map_err(|e| store.error(e))?;
    let rows = client
        .query(&statement, &[&to_column(after), &READ_CHUNK])
        .await
        .map_err(|e| store.error(e))?;
    rows.iter()
        .map(|row| {
            Ok(EventRow {
                sequence: sequence_of(store, row.get(0))?,
                event: row.get(1),
                hash: row.get(2),
            })
        })
        .collect()
}

fn head_of(store: &PostgresStore, row: &tokio_postgres::Row) -> Result<Head, StoreError> {
    Ok(Head {
        sequence: sequence_of(store, row.get(0))?,
        hash: row.get(1),
    })
}

/// Converts a sequence column, which the schema keeps positive or zero.
fn sequence_of(store: &PostgresStore, value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt {
        key: format!("{}: audit sequence {value}", store.target()),
        reason: "a sequence number is negative".into(),
    })
}

fn to_column(sequence: u64) -> i64 {
    i64::try_from(sequence).expect("audit sequence numbers stay below 2^63")
}

fn read_error(error: StoreError) -> VerifyError {
    VerifyError::Database(error.to_string())
}
