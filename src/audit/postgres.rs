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

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use deadpool_postgres::GenericClient;
use tokio::sync::oneshot;
use tokio_postgres::IsolationLevel;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::chain::{ChainCheck, Verified, VerifyError, broken};
use super::{AuditError, AuditEvent, EventDraft, Head, Page, PageBuilder, StoredEvent, hash_hex};
use crate::store::{DatabaseSettings, PostgresStore, StoreError};

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
}

/// Appends waiting for the writer task.
#[derive(Default)]
struct Queue {
    waiting: Vec<Waiting>,
    /// Whether a writer task runs. It empties the queue before it ends.
    writing: bool,
}

struct Waiting {
    draft: EventDraft,
    reply: oneshot::Sender<Result<StoredEvent, AuditError>>,
}

/// One row of `stvault_audit_events`.
struct EventRow {
    sequence: u64,
    event: Vec<u8>,
    hash: String,
}

impl PostgresTrail {
    pub fn new(store: PostgresStore) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                queue: Mutex::new(Queue::default()),
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

    /// Appends an event and returns once its transaction has committed.
    pub async fn append(&self, draft: EventDraft) -> Result<StoredEvent, AuditError> {
        let (reply, outcome) = oneshot::channel();
        let start_writer = {
            let mut queue = self.shared.lock();
            queue.waiting.push(Waiting { draft, reply });
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

    /// Numbers `drafts` after the head, inserts them and moves the head, in
    /// one transaction.
    async fn write(&self, drafts: Vec<EventDraft>) -> Result<Vec<StoredEvent>, StoreError> {
        let store = &self.store;
        let error = |e| store.error(e);
        let mut client = store.client().await?;
        let transaction = client.transaction().await.map_err(error)?;
        let lock_head = transaction.prepare_cached(LOCK_HEAD).await.map_err(error)?;
        let row = transaction
            .query_one(&lock_head, &[])
            .await
            .map_err(error)?;
        let mut head = head_of(store, &row)?;

        let mut stored = Vec::with_capacity(drafts.len());
        let mut sequences = Vec::with_capacity(drafts.len());
        let mut events = Vec::with_capacity(drafts.len());
        let mut hashes = Vec::with_capacity(drafts.len());
        for draft in drafts {
            let event = AuditEvent::after(&head, draft);
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
        transaction.commit().await.map_err(error)?;
        Ok(stored)
    }
}

/// Writes queued events in batches until none are left.
///
/// NOTE: when the connection drops or the batch times out while its commit
/// is in flight, the batch may have committed although its calls fail. The
/// chain stays whole either way, since the head moves in the same
/// transaction.
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
        let (drafts, replies): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .map(|waiting| (waiting.draft, waiting.reply))
            .unzip();
        let count = drafts.len();
        let written = tokio::time::timeout(WRITE_TIMEOUT, shared.write(drafts))
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(format!(
                    "{}: the audit transaction did not commit within {} s",
                    shared.store.target(),
                    WRITE_TIMEOUT.as_secs()
                )))
            });
        match written {
            Ok(events) => {
                for (reply, event) in replies.into_iter().zip(events) {
                    let _ = reply.send(Ok(event));
                }
            }
            Err(error) => {
                tracing::error!(%error, events = count, "an audit batch was not written; its calls fail");
                let reason = format!("cannot write the audit trail: {error}");
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
