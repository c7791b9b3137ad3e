//! Re-wrapping data keys under the newest master key, so that older keys can
//! be removed from the keyring.
//!
//! Each record is rewritten on its own with a compare-and-swap and flushed
//! before the next. A run killed at any point therefore leaves every record
//! wrapped under either its old key or the newest one, and running again
//! finishes the rest. Records already under the newest key are skipped.
//!
//! With PostgreSQL, servers sharing the database may keep serving
//! meanwhile. A record that one of them changes between the read and the
//! rewrite is read again.

use futures::StreamExt;

use crate::keyring::{self, Keyring};
use crate::store::{Store, StoreError};

/// Records rewrapped between progress lines.
const PROGRESS_EVERY: usize = 100;
/// Times a record is read again after a server sharing the database
/// changed it between the read and the rewrite.
const MAX_CONFLICT_RETRIES: usize = 5;

/// Outcome of one run.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RewrapReport {
    pub rewrapped: usize,
    /// Records that were already under the newest key.
    pub already_current: usize,
    /// Records still under an older key because `limit` was reached.
    pub remaining: usize,
    /// Records left as they are because they are unreadable or their data
    /// key fails authentication.
    pub skipped: Vec<String>,
}

/// Rewraps the data key of every record not under the newest master key,
/// at most `limit` of them when set. The keyring is checked against the
/// directory first, as at server startup.
pub async fn rewrap(
    store: &Store,
    keyring: &Keyring,
    limit: Option<usize>,
) -> Result<RewrapReport, String> {
    let checked = keyring::check(store, keyring).await?;
    let newest = keyring.newest();
    let mut report = RewrapReport {
        skipped: checked.undecryptable.clone(),
        ..RewrapReport::default()
    };
    let mut pending = Vec::new();
    let mut records = std::pin::pin!(store.records());
    while let Some(record) = records.next().await {
        let record = match record {
            Ok(record) => record,
            Err(StoreError::Corrupt { .. }) => continue,
            Err(e) => return Err(format!("cannot read the data directory: {e}")),
        };
        if report.skipped.contains(&record.id) {
            continue;
        }
        if record.master_key_id == newest.id() {
            report.already_current += 1;
        } else {
            pending.push(record.id);
        }
    }
    let total = pending.len();
    tracing::info!(
        to_rewrap = total,
        already_current = report.already_current,
        key.id = newest.id(),
        "rewrap started"
    );

    for id in pending {
        if limit.is_some_and(|limit| report.rewrapped >= limit) {
            report.remaining += 1;
            continue;
        }
        if !rewrap_one(store, keyring, &id).await? {
            continue;
        }
        report.rewrapped += 1;
        if report.rewrapped % PROGRESS_EVERY == 0 {
            tracing::info!(rewrapped = report.rewrapped, of = total, "rewrap progress");
        }
    }
    Ok(report)
}

/// Rewraps one record's data key under the newest master key. Returns
/// whether it was rewritten: a record deleted meanwhile is not.
async fn rewrap_one(store: &Store, keyring: &Keyring, id: &str) -> Result<bool, String> {
    let newest = keyring.newest();
    for _ in 0..MAX_CONFLICT_RETRIES {
        let read_error = |e| format!("cannot read connection {id}: {e}");
        let Some((stored_bytes, record)) = store.get_with_bytes(id).await.map_err(read_error)?
        else {
            return Ok(false);
        };
        let data_key = keyring
            .unwrap_data_key(&record)
            .map_err(|e| format!("cannot unwrap the data key of connection {id}: {e}"))?;
        let mut next = record.clone();
        next.master_key_id = newest.id().to_owned();
        next.wrapped_data_key = newest.wrap(id, &data_key);
        match store.replace(&stored_bytes, &next).await {
            Ok(()) => return Ok(true),
            Err(StoreError::Conflict(_)) => continue,
            Err(e) => return Err(format!("cannot rewrite connection {id}: {e}")),
        }
    }
    Err(format!(
        "cannot rewrite connection {id}: it changed {MAX_CONFLICT_RETRIES} times while being \
         rewrapped; run stvault rewrap again"
    ))
}
