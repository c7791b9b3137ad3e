//! Moving events through the local spool: appending batches to it while
//! the database is unreachable, and forwarding them to the chain when it
//! responds again.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{OwnedMutexGuard, watch};

use super::{LOCK_HEAD, MAX_BATCH, PostgresTrail, Shared, WRITE_TIMEOUT, sequence_of, to_column};
use crate::audit::spool::{Spool, SpoolBatch};
use crate::audit::{Appended, AuditError, EventDraft};
use crate::store::StoreError;

/// Time between two attempts to forward the spool while it contains
/// events, and between two checks for a spool that is empty.
const FORWARD_INTERVAL: Duration = Duration::from_secs(1);
/// How long the database may take to respond to the check that precedes
/// each forwarding attempt.
const FORWARD_PING_TIMEOUT: Duration = Duration::from_secs(3);

const SPOOL_PROGRESS: &str =
    "SELECT forwarded_position FROM stvault_audit_spools WHERE spool_id = $1";
const RECORD_SPOOL_PROGRESS: &str = "INSERT INTO stvault_audit_spools \
     (spool_id, forwarded_position) VALUES ($1, $2) \
     ON CONFLICT (spool_id) DO UPDATE \
     SET forwarded_position = EXCLUDED.forwarded_position, forwarded_at = now()";

impl PostgresTrail {
    /// Forwards spooled events to the chain, one batch per transaction,
    /// until `stopping` turns true. Errors are logged and retried every
    /// `FORWARD_INTERVAL`.
    pub async fn forward_spool(&self, mut stopping: watch::Receiver<bool>) {
        let Some(spool) = &self.shared.spool else {
            return;
        };
        // The last error logged, so an outage logs once, not every second.
        let mut last_error = None;
        loop {
            let forwarded = self.shared.forward_batch(spool).await;
            if forwarded.is_ok() {
                last_error = None;
            }
            let pause = match forwarded {
                Ok(Forwarded::More) => Duration::ZERO,
                Ok(Forwarded::Idle) => FORWARD_INTERVAL,
                Err(error) => {
                    let message = error.to_string();
                    if last_error.as_ref() != Some(&message) {
                        tracing::warn!(%error, "cannot forward the audit spool yet; retrying");
                        last_error = Some(message);
                    }
                    FORWARD_INTERVAL
                }
            };
            tokio::select! {
                _ = stopping.wait_for(|stopping| *stopping) => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// Outcome of one forwarding attempt.
enum Forwarded {
    /// A batch was forwarded and more events may follow.
    More,
    /// The spool contains nothing to forward.
    Idle,
}

impl Shared {
    /// Appends the events of `batch` that the database does not record as
    /// forwarded, in one transaction that also records the batch's last
    /// position. Returns how many events it appended.
    async fn forward(&self, batch: &SpoolBatch) -> Result<usize, AuditError> {
        let store = &self.store;
        let error = |e| store.error(e);
        let mut client = store.client().await?;
        let transaction = client.transaction().await.map_err(error)?;

        // Taken first, as every append does, so forwarders of one spool
        // cannot interleave either.
        let lock_head = transaction.prepare_cached(LOCK_HEAD).await.map_err(error)?;
        transaction
            .query_one(&lock_head, &[])
            .await
            .map_err(error)?;
        let recorded = transaction
            .query_opt(SPOOL_PROGRESS, &[&batch.spool_id])
            .await
            .map_err(error)?;
        let forwarded = match recorded {
            Some(row) => sequence_of(store, row.get(0))?,
            None => 0,
        };

        let fresh: Vec<_> = batch
            .events
            .iter()
            .filter(|event| event.position > forwarded)
            .collect();
        let Some(first) = fresh.first() else {
            return Ok(0);
        };
        if first.position != forwarded + 1 {
            return Err(StoreError::Corrupt {
                key: format!("{}: audit spool {}", store.target(), batch.spool_id),
                reason: format!(
                    "the database records the spool as forwarded up to position {forwarded}, \
                     but the next spooled event is at position {}",
                    first.position
                ),
            }
            .into());
        }

        let last = to_column(fresh.last().expect("fresh is not empty").position);
        let entries: Vec<_> = fresh
            .iter()
            .map(|event| (event.time, event.draft.clone()))
            .collect();
        let appended = self.insert_after_head(&transaction, &entries).await?.len();

        transaction
            .execute(RECORD_SPOOL_PROGRESS, &[&batch.spool_id, &last])
            .await
            .map_err(error)?;
        transaction.commit().await.map_err(error)?;
        Ok(appended)
    }

    /// Forwards one batch of the spool, if it contains events and the
    /// database responds.
    async fn forward_batch(
        &self,
        spool: &Arc<tokio::sync::Mutex<Spool>>,
    ) -> Result<Forwarded, AuditError> {
        if !spool.lock().await.is_active() {
            return Ok(Forwarded::Idle);
        }
        // A transaction that waits for an unreachable database would hold
        // the spool, and every call behind it, for up to WRITE_TIMEOUT.
        tokio::time::timeout(FORWARD_PING_TIMEOUT, self.store.ping())
            .await
            .map_err(|_| {
                AuditError::Unavailable(format!(
                    "{}: the database did not respond within {} s",
                    self.store.target(),
                    FORWARD_PING_TIMEOUT.as_secs()
                ))
            })??;

        let guard = spool.clone().lock_owned().await;
        let (guard, batch) = run_blocking(move || {
            let batch = guard.read_batch(MAX_BATCH);
            (guard, batch)
        })
        .await?;
        let Some(batch) = batch? else {
            return remove_forwarded(guard).await;
        };
        // Calls keep spooling while a batch from the middle of the spool is
        // forwarded. The last batch is forwarded with the spool held, so no
        // event can arrive between it and the removal of the file.
        let kept_guard = if batch.reaches_end {
            Some(guard)
        } else {
            drop(guard);
            None
        };
        let appended = tokio::time::timeout(WRITE_TIMEOUT, self.forward(&batch))
            .await
            .map_err(|_| {
                AuditError::Unavailable(format!(
                    "{}: forwarding the audit spool did not commit within {} s",
                    self.store.target(),
                    WRITE_TIMEOUT.as_secs()
                ))
            })??;
        let skipped = batch.events.len() - appended;
        tracing::info!(
            spool.id = %batch.spool_id,
            events = appended,
            already_forwarded = skipped,
            "forwarded spooled audit events to the database"
        );
        let mut guard = match kept_guard {
            Some(guard) => guard,
            None => spool.clone().lock_owned().await,
        };
        guard.mark_forwarded(&batch);
        crate::metrics::set_audit_spooled(guard.unforwarded());
        if batch.reaches_end {
            remove_forwarded(guard).await?;
        }
        Ok(Forwarded::More)
    }

    /// Appends `entries` to the spool and syncs it.
    pub(super) async fn spool(
        &self,
        spool: &Arc<tokio::sync::Mutex<Spool>>,
        entries: Vec<(SystemTime, EventDraft)>,
    ) -> Result<Vec<Appended>, AuditError> {
        let count = entries.len();
        let mut guard = spool.clone().lock_owned().await;
        let written = run_blocking(move || {
            let written = guard.append(&entries);
            crate::metrics::set_audit_spooled(guard.unforwarded());
            written
        })
        .await?;
        written?;
        Ok(vec![Appended::Spooled; count])
    }
}

/// Removes the spool's file once every event in it is forwarded.
async fn remove_forwarded(mut guard: OwnedMutexGuard<Spool>) -> Result<Forwarded, AuditError> {
    let removed = run_blocking(move || guard.remove_if_forwarded()).await??;
    if removed {
        tracing::info!("the audit spool is forwarded and removed; events go to the database again");
    }
    Ok(Forwarded::Idle)
}

/// Runs file I/O on the blocking pool.
async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AuditError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| AuditError::Unavailable(format!("the audit spool task failed: {e}")))
}
