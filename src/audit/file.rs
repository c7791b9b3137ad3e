//! The on-disk form of the audit trail and how appends reach it.
//!
//! Events are JSON lines in `audit.jsonl`, oldest first; line N contains event
//! N. Appending is a group commit run by the callers themselves. The first
//! caller to find no write in progress becomes the leader: it writes every
//! event queued so far in one `write`, syncs it (`fdatasync`) and wakes the
//! callers whose events it covered. The others wait. While callers arrive
//! together, the leader first yields once, so those already runnable join
//! its batch. Doing the I/O in a
//! caller's task, not in a writer thread, matters on a busy machine: a
//! thread that sleeps between batches waits for the scheduler each time it
//! wakes, and every caller waits with it.
//!
//! After each batch the leader also overwrites `audit.head`, a fixed-size
//! record of the last event's sequence and hash, without a sync of its own;
//! it is synced when the log closes. The head makes deleting whole events at
//! the end of the trail detectable.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{AuditError, GENESIS_HASH, Head, hash_hex};

pub const EVENTS_FILE: &str = "audit.jsonl";
pub const HEAD_FILE: &str = "audit.head";
/// One index entry per this many events: the file offset of event
/// `k * INDEX_STRIDE + 1`, so a page read seeks close to where it starts.
pub const INDEX_STRIDE: u64 = 1024;
/// Single-event batches in a row after which a leader stops yielding to
/// gather other callers' events: a caller alone would only pay for the
/// yield, while under load a run of this many is rare.
const SOLO_BATCHES: u32 = 8;
/// `{sequence:020} {hash}\n`
const HEAD_RECORD_LEN: usize = 20 + 1 + 64 + 1;

pub fn events_path(dir: &Path) -> PathBuf {
    dir.join(EVENTS_FILE)
}

pub fn head_path(dir: &Path) -> PathBuf {
    dir.join(HEAD_FILE)
}

pub fn encode_head(head: &Head) -> Vec<u8> {
    format!("{:020} {}\n", head.sequence, head.hash).into_bytes()
}

/// Parses a head record; `None` when it is not one.
pub fn decode_head(bytes: &[u8]) -> Option<Head> {
    if bytes.len() != HEAD_RECORD_LEN {
        return None;
    }
    let text = std::str::from_utf8(bytes).ok()?;
    let (sequence, hash) = text.strip_suffix('\n')?.split_once(' ')?;
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(Head {
        sequence: sequence.parse().ok()?,
        hash: hash.to_owned(),
    })
}

/// Reads the head record; `Ok(None)` when the file does not exist.
pub fn read_head(path: &Path) -> Result<Option<Head>, AuditError> {
    match std::fs::read(path) {
        Ok(bytes) => decode_head(&bytes)
            .map(Some)
            .ok_or_else(|| AuditError::Corrupt {
                sequence: 0,
                reason: format!("{} is not a chain head record", path.display()),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AuditError::Io(e)),
    }
}

/// Calls `line(sequence, bytes)` for every complete line of the events file
/// from `offset` on, numbering from `first_sequence`, until it returns
/// false. Returns the offset after the last complete line and whether an
/// incomplete line (an interrupted write) follows it.
pub fn scan_lines(
    file: &File,
    offset: u64,
    first_sequence: u64,
    mut line: impl FnMut(u64, u64, &[u8]) -> Result<bool, AuditError>,
) -> Result<(u64, bool), AuditError> {
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    reader.seek(SeekFrom::Start(offset))?;
    let mut buffer = Vec::with_capacity(1024);
    let mut position = offset;
    let mut sequence = first_sequence;
    loop {
        buffer.clear();
        let read = reader.read_until(b'\n', &mut buffer)?;
        if read == 0 {
            return Ok((position, false));
        }
        if buffer.last() != Some(&b'\n') {
            return Ok((position, true));
        }
        if !line(sequence, position, &buffer[..buffer.len() - 1])? {
            return Ok((position, false));
        }
        position += read as u64;
        sequence += 1;
    }
}

/// Cuts the incomplete line after offset `end` off a file of JSON lines.
/// Only a write interrupted by a crash leaves a line without its newline,
/// and no call whose event it contains returned success.
pub fn drop_incomplete_line(file: &File, path: &Path, end: u64) -> Result<(), AuditError> {
    tracing::warn!(
        file = %path.display(),
        offset = end,
        "dropping an incomplete audit event left by an interrupted write"
    );
    file.set_len(end)?;
    file.sync_data()?;
    Ok(())
}

/// When appended events reach the disk, relative to the call's reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Each event is synced (`fdatasync`) before its call returns; calls in
    /// flight together share one sync.
    #[default]
    Always,
    /// Each event is written to the file before its call returns, so it
    /// survives the process being killed. A background thread syncs the file
    /// every interval, so a power loss or kernel crash can lose that much of
    /// the trail.
    Within(Duration),
}

/// Appends waiting for a leader, and what is on disk.
pub struct State {
    /// Last event appended, written or not.
    pub head: Head,
    /// Offset after the last event appended.
    pub end: u64,
    /// Last event written (under `SyncPolicy::Always`, also synced), and the
    /// file length after it.
    pub durable: Head,
    pub durable_end: u64,
    /// See `INDEX_STRIDE`; covers appended events, written or not.
    pub index: Vec<u64>,
    /// Encoded events waiting for a leader, each ending in a newline.
    pending: Vec<u8>,
    /// Ticket of the last event queued, and of the last written. Tickets
    /// number appends and, unlike sequences, are never reused after a
    /// failed write.
    last_ticket: u64,
    written_ticket: u64,
    /// Ticket ranges (inclusive) that a failed write discarded, with the
    /// reason.
    failed: Vec<(u64, u64, String)>,
    /// Whether a leader is writing.
    writing: bool,
    /// Batches in a row that covered a single event. Below
    /// `SOLO_BATCHES`, callers are arriving together and a leader gathers
    /// them before it writes.
    solo_batches: u32,
    /// Set when a failed write or sync could not be undone: the file no
    /// longer matches the chain, so no further event may be appended.
    broken: Option<String>,
}

/// An event queued by `TrailFile::queue`.
pub struct Queued {
    ticket: u64,
    /// Whether its caller must lead the next batch.
    lead: bool,
    /// Whether the leader should first let other callers queue events.
    gather: bool,
    /// Whether the event is already written, so `wait` has nothing to do.
    written: bool,
}

/// Outcome of a queued event, as its caller reads it from the state.
enum Outcome {
    Written,
    Failed(String),
    Waiting,
}

impl State {
    fn outcome(&self, ticket: u64) -> Outcome {
        if let Some((_, _, reason)) = self
            .failed
            .iter()
            .find(|(first, last, _)| (*first..=*last).contains(&ticket))
        {
            Outcome::Failed(reason.clone())
        } else if ticket <= self.written_ticket {
            Outcome::Written
        } else {
            Outcome::Waiting
        }
    }
}

/// Gives up the leader's role if its call is dropped while it yields, as
/// when the client goes away: a waiter then leads instead, where it would
/// otherwise wait for a batch that no one writes.
struct Handover<'a>(&'a TrailFile);

impl Drop for Handover<'_> {
    fn drop(&mut self) {
        self.0.lock().writing = false;
        self.0.batch_done.notify_waiters();
    }
}

/// The file and the head record, used by one leader at a time.
struct Writer {
    file: File,
    head_file: File,
}

/// The open trail.
pub struct TrailFile {
    state: Mutex<State>,
    writer: Mutex<Writer>,
    /// Wakes callers after each batch, written or failed.
    batch_done: tokio::sync::Notify,
    sync: SyncPolicy,
    /// Under `SyncPolicy::Within`: whether events were written since the
    /// last sync, and the thread that syncs them.
    unsynced: Arc<AtomicBool>,
    /// Set by the sync thread when a sync fails.
    sync_failure: Arc<OnceLock<String>>,
    /// Under `SyncPolicy::Within`: the newest head not yet in the head
    /// record, which the sync thread writes before each sync.
    latest_head: Arc<Mutex<Option<Head>>>,
    syncer: Option<(Arc<SyncerControl>, JoinHandle<()>)>,
    pub path: PathBuf,
}

/// Files that the sync thread writes and syncs.
struct SyncedFiles {
    trail: File,
    head: File,
    latest_head: Arc<Mutex<Option<Head>>>,
}

struct SyncerControl {
    stop: Mutex<bool>,
    stopped: Condvar,
}

impl TrailFile {
    /// Opens `dir`'s trail, dropping an incomplete last line.
    pub fn open(dir: &Path, sync: SyncPolicy) -> Result<Self, AuditError> {
        let path = events_path(dir);
        let head_path = head_path(dir);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)?;
        let recorded = read_head(&head_path)?;

        let mut index = Vec::new();
        let mut last: Option<(u64, Vec<u8>)> = None;
        let mut recorded_hash_seen = None;
        let (end, incomplete) = scan_lines(&file, 0, 1, |sequence, offset, line| {
            if (sequence - 1) % INDEX_STRIDE == 0 {
                index.push(offset);
            }
            if let Some(head) = &recorded {
                if head.sequence == sequence {
                    recorded_hash_seen = Some(hash_hex(line) == head.hash);
                }
            }
            last = Some((sequence, line.to_vec()));
            Ok(true)
        })?;
        if incomplete {
            drop_incomplete_line(&file, &path, end)?;
        }
        file.seek(SeekFrom::Start(end))?;

        let head = match &last {
            None => Head {
                sequence: 0,
                hash: GENESIS_HASH.to_owned(),
            },
            Some((sequence, line)) => {
                let event: super::AuditEvent =
                    serde_json::from_slice(line).map_err(|e| AuditError::Corrupt {
                        sequence: *sequence,
                        reason: format!("the last event is not readable: {e}"),
                    })?;
                if event.sequence != *sequence {
                    return Err(AuditError::Corrupt {
                        sequence: *sequence,
                        reason: format!(
                            "line {sequence} holds event {}; events were added or removed",
                            event.sequence
                        ),
                    });
                }
                Head {
                    sequence: *sequence,
                    hash: hash_hex(line),
                }
            }
        };
        let advice = "run `stvault audit verify` on a copy of the data directory";
        match recorded {
            None if head.sequence > 0 => {
                return Err(AuditError::Corrupt {
                    sequence: head.sequence,
                    reason: format!(
                        "the chain head record {} is missing, so newer events may have been \
                         deleted; {advice}",
                        head_path.display()
                    ),
                });
            }
            Some(recorded) if recorded.sequence > head.sequence => {
                return Err(AuditError::Corrupt {
                    sequence: head.sequence + 1,
                    reason: format!(
                        "the chain head records {} events but the trail holds {}, so events \
                         were deleted; {advice}",
                        recorded.sequence, head.sequence
                    ),
                });
            }
            Some(recorded) if recorded_hash_seen == Some(false) => {
                return Err(AuditError::Corrupt {
                    sequence: recorded.sequence,
                    reason: format!("the event does not match the chain head's hash; {advice}"),
                });
            }
            _ => {}
        }

        let head_file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&head_path)?;
        head_file.write_all_at(&encode_head(&head), 0)?;
        head_file.set_len(HEAD_RECORD_LEN as u64)?;
        head_file.sync_data()?;

        let unsynced = Arc::new(AtomicBool::new(false));
        let sync_failure = Arc::new(OnceLock::new());
        let latest_head = Arc::new(Mutex::new(None));
        let syncer = match sync {
            SyncPolicy::Always => None,
            SyncPolicy::Within(interval) => {
                let control = Arc::new(SyncerControl {
                    stop: Mutex::new(false),
                    stopped: Condvar::new(),
                });
                let thread = {
                    let control = control.clone();
                    let unsynced = unsynced.clone();
                    let failure = sync_failure.clone();
                    // Its own descriptors: syncing them syncs the file's
                    // data without waiting for a caller's write.
                    let files = SyncedFiles {
                        trail: file.try_clone()?,
                        head: head_file.try_clone()?,
                        latest_head: latest_head.clone(),
                    };
                    std::thread::Builder::new()
                        .name("stvault-audit-sync".into())
                        .spawn(move || {
                            sync_periodically(&control, &files, &unsynced, &failure, interval)
                        })?
                };
                Some((control, thread))
            }
        };

        Ok(Self {
            state: Mutex::new(State {
                head: head.clone(),
                end,
                durable: head,
                durable_end: end,
                index,
                pending: Vec::new(),
                last_ticket: 0,
                written_ticket: 0,
                failed: Vec::new(),
                writing: false,
                solo_batches: 0,
                broken: None,
            }),
            writer: Mutex::new(Writer { file, head_file }),
            batch_done: tokio::sync::Notify::new(),
            sync,
            unsynced,
            sync_failure,
            latest_head,
            syncer,
            path,
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("the audit state lock is never poisoned")
    }

    /// Queues one encoded event as the new head. Pass the result to
    /// `wait` once `state` is unlocked.
    pub fn queue(&self, state: &mut State, bytes: &[u8], head: Head) -> Result<Queued, AuditError> {
        if let Some(reason) = &state.broken {
            return Err(AuditError::Unavailable(reason.clone()));
        }
        if let Some(reason) = self.sync_failure.get() {
            return Err(AuditError::Unavailable(reason.clone()));
        }
        if (head.sequence - 1) % INDEX_STRIDE == 0 {
            state.index.push(state.end);
        }
        if let SyncPolicy::Within(_) = self.sync {
            return self.write_now(state, bytes, head);
        }
        state.pending.extend_from_slice(bytes);
        state.pending.push(b'\n');
        state.end += bytes.len() as u64 + 1;
        state.head = head;
        state.last_ticket += 1;
        Ok(Queued {
            ticket: state.last_ticket,
            lead: !std::mem::replace(&mut state.writing, true),
            gather: state.solo_batches < SOLO_BATCHES,
            written: false,
        })
    }

    /// Writes one event at once under `SyncPolicy::Within`: a write to the
    /// page cache takes microseconds, less than waking a leader would.
    fn write_now(&self, state: &mut State, bytes: &[u8], head: Head) -> Result<Queued, AuditError> {
        let mut line = Vec::with_capacity(bytes.len() + 1);
        line.extend_from_slice(bytes);
        line.push(b'\n');
        let mut writer = self
            .writer
            .lock()
            .expect("the audit writer lock is never poisoned");
        if let Err(error) = writer.file.write_all(&line) {
            let reason = format!("cannot write the audit trail: {error}");
            tracing::error!(%error, "an audit event was not written; its call fails");
            roll_back(state, &mut writer.file, &reason);
            return Err(AuditError::Unavailable(reason));
        }
        self.unsynced.store(true, Ordering::SeqCst);
        // The head record may lag the trail (see `open`). The sync thread
        // brings it up to date with each sync, so it costs one write per
        // interval instead of one per event.
        *self
            .latest_head
            .lock()
            .expect("the head lock is never poisoned") = Some(head.clone());
        state.end += line.len() as u64;
        state.durable_end = state.end;
        state.durable = head.clone();
        state.head = head;
        state.last_ticket += 1;
        state.written_ticket = state.last_ticket;
        Ok(Queued {
            ticket: state.last_ticket,
            lead: false,
            gather: false,
            written: true,
        })
    }

    /// Returns once a queued event is written (and, under
    /// `SyncPolicy::Always`, synced), leading batches when no one else is.
    pub async fn wait(&self, queued: Queued) -> Result<(), AuditError> {
        let Queued {
            ticket,
            mut lead,
            mut gather,
            written,
        } = queued;
        // Under `SyncPolicy::Within` the event was written as it was
        // queued. Registering with `batch_done` would only contend with
        // every other caller for the notifier's lock.
        if written {
            return Ok(());
        }
        loop {
            if lead && gather {
                // Lets the callers already runnable queue their events first,
                // so one sync covers them: at concurrency 64 a batch grew
                // from about 8 events to 32. A caller alone does not yield,
                // since the yield costs it a pass through the I/O driver.
                let handover = Handover(self);
                tokio::task::yield_now().await;
                std::mem::forget(handover);
            }
            if lead {
                self.lead();
            }
            // Registered before the state is read, so a batch finishing in
            // between still wakes this caller.
            let done = self.batch_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            {
                let mut state = self.lock();
                match state.outcome(ticket) {
                    Outcome::Written => return Ok(()),
                    Outcome::Failed(reason) => return Err(AuditError::Unavailable(reason)),
                    Outcome::Waiting if !state.writing => {
                        // The last leader left events queued: lead the next
                        // batch.
                        state.writing = true;
                        lead = true;
                        gather = true;
                        continue;
                    }
                    Outcome::Waiting => lead = false,
                }
            }
            done.await;
        }
    }

    /// Writes the queued events as one batch, then wakes every caller.
    fn lead(&self) {
        let mut writer = self
            .writer
            .lock()
            .expect("the audit writer lock is never poisoned");
        let (batch, head, end, ticket) = {
            let mut state = self.lock();
            (
                std::mem::take(&mut state.pending),
                state.head.clone(),
                state.end,
                state.last_ticket,
            )
        };
        if batch.is_empty() {
            self.lock().writing = false;
            self.batch_done.notify_waiters();
            return;
        }
        // Only the leader blocks its worker, one batch at a time, so the
        // other workers keep serving. `block_in_place` here cost a thread
        // hand-off per batch: 35 µs of server CPU per call instead of 30.
        let written = writer
            .file
            .write_all(&batch)
            .and_then(|()| writer.file.sync_data());

        let mut state = self.lock();
        match written {
            Ok(()) => {
                state.solo_batches = if ticket - state.written_ticket > 1 {
                    0
                } else {
                    state.solo_batches.saturating_add(1)
                };
                state.durable = head.clone();
                state.durable_end = end;
                state.written_ticket = ticket;
                // Not synced here: a head that lags after a crash still
                // covers every event before it.
                if let Err(error) = writer.head_file.write_all_at(&encode_head(&head), 0) {
                    tracing::warn!(%error, "cannot update the audit chain head record");
                }
            }
            Err(error) => {
                let reason = format!("cannot write the audit trail: {error}");
                tracing::error!(%error, "an audit batch was not written; its calls fail");
                // Events queued meanwhile chain onto the lost ones, so they
                // fail too, and the trail returns to its last written event.
                let first = state.written_ticket + 1;
                let last = state.last_ticket;
                state.failed.push((first, last, reason.clone()));
                state.written_ticket = last;
                state.pending.clear();
                roll_back(&mut state, &mut writer.file, &reason);
            }
        }
        state.writing = false;
        drop(state);
        self.batch_done.notify_waiters();
    }
}

impl Drop for TrailFile {
    /// Syncs the trail and the head, and stops the sync thread.
    fn drop(&mut self) {
        if let Some((control, thread)) = self.syncer.take() {
            *control
                .stop
                .lock()
                .expect("the stop lock is never poisoned") = true;
            control.stopped.notify_one();
            let _ = thread.join();
        }
        let state = self
            .state
            .get_mut()
            .expect("the audit state lock is never poisoned");
        let writer = self
            .writer
            .get_mut()
            .expect("the audit writer lock is never poisoned");
        // A leader dropped while it yielded leaves its batch queued, and no
        // later call may come to write it.
        if !state.pending.is_empty() && state.broken.is_none() {
            match writer.file.write_all(&state.pending) {
                Ok(()) => state.durable = state.head.clone(),
                Err(error) => tracing::warn!(%error, "cannot write the last audit events on close"),
            }
        }
        let head = encode_head(&state.durable);
        if let Err(error) = writer
            .file
            .sync_all()
            .and_then(|()| writer.head_file.write_all_at(&head, 0))
            .and_then(|()| writer.head_file.sync_all())
        {
            tracing::warn!(%error, "cannot sync the audit trail on close");
        }
    }
}

/// Returns the trail to its last written event after a failed write: the
/// head, the index and the file's length. If the file cannot be cut back,
/// the trail takes no further events.
fn roll_back(state: &mut State, file: &mut File, reason: &str) {
    state.head = state.durable.clone();
    state.end = state.durable_end;
    let kept = state.durable.sequence.div_ceil(INDEX_STRIDE) as usize;
    state.index.truncate(kept);
    let end = state.durable_end;
    if let Err(undo) = file
        .set_len(end)
        .and_then(|()| file.seek(SeekFrom::Start(end)))
    {
        state.broken = Some(format!(
            "{reason}; undoing the partial write also failed ({undo}); restart the server"
        ));
    }
}

/// Syncs written events every `interval` under `SyncPolicy::Within`. After a
/// failed sync the kernel may have dropped those writes, so the trail takes
/// no further events: a restart rereads the file and continues from what is
/// really on disk.
fn sync_periodically(
    control: &SyncerControl,
    files: &SyncedFiles,
    unsynced: &AtomicBool,
    failure: &OnceLock<String>,
    interval: Duration,
) {
    let mut stop = control
        .stop
        .lock()
        .expect("the stop lock is never poisoned");
    while !*stop {
        stop = control
            .stopped
            .wait_timeout(stop, interval)
            .expect("the stop lock is never poisoned")
            .0;
        let head = files
            .latest_head
            .lock()
            .expect("the head lock is never poisoned")
            .take();
        if let Some(head) = head {
            if let Err(error) = files.head.write_all_at(&encode_head(&head), 0) {
                tracing::warn!(%error, "cannot update the audit chain head record");
            }
        }
        if unsynced.swap(false, Ordering::SeqCst) {
            if let Err(error) = files.trail.sync_data() {
                tracing::error!(%error, "cannot sync the audit trail; refusing further events");
                let _ = failure.set(format!(
                    "cannot sync the audit trail ({error}); restart the server"
                ));
                return;
            }
        }
    }
}
