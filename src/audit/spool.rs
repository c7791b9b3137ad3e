//! The local audit spool of a server on PostgreSQL. When an append fails
//! because the database is unreachable, the events go to `audit-spool.jsonl`
//! in the data directory, synced before their calls return, until the
//! forwarder appends them to the shared chain.
//!
//! The spool is a plain JSON-lines file, not a second trail file
//! (`file.rs`). Its events have no place in a chain yet, so a head record
//! and hashes would protect nothing. Group commit comes for free, because
//! the single writer task of the PostgreSQL trail already groups events
//! into one write and one sync. The data directory is the place because
//! its lock gives each server a directory of its own and it outlives a
//! restart.
//!
//! Each spool has a random id, and each line its position in the spool,
//! counted from 1. The database stores, per spool id, the last position
//! forwarded, in the transaction that appends the events, so a spool read
//! again after a crash between that commit and the file's removal is not
//! forwarded twice. The id of a removed spool is never used again.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::file::{drop_incomplete_line, scan_lines};
use super::{AuditError, EventDraft};

pub const SPOOL_FILE: &str = "audit-spool.jsonl";

/// One line of the spool: the event of one RPC, with the time of the call,
/// before it has a place in the chain.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SpooledEvent {
    pub spool_id: String,
    /// Position in the spool, from 1 without gaps.
    pub position: u64,
    pub time: SystemTime,
    #[serde(flatten)]
    pub draft: EventDraft,
}

/// Events read from the spool for one forwarding transaction.
pub struct SpoolBatch {
    pub spool_id: String,
    pub events: Vec<SpooledEvent>,
    /// File offset after the last event read.
    end: u64,
    /// Whether the batch reaches the last event written.
    pub reaches_end: bool,
}

/// The open spool. One writer (the PostgreSQL trail's writer task) and one
/// forwarder use it, in turn, under an async mutex.
pub struct Spool {
    path: PathBuf,
    dir: PathBuf,
    /// Open for appending while the spool contains events.
    file: Option<File>,
    spool_id: String,
    /// Position of the last event written.
    last_position: u64,
    /// File length after the last event written and synced.
    end: u64,
    /// Offset and position of the first event this process has not
    /// forwarded yet.
    forward_offset: u64,
    forwarded_position: u64,
    /// Set when a failed write could not be undone, so the file no longer
    /// ends after its last event.
    broken: Option<String>,
}

impl Spool {
    /// Opens the spool in `dir`, dropping an incomplete last line. A spool
    /// whose events are all forwarded may be found again after a crash, and
    /// the forwarder then skips what the database records as forwarded.
    pub fn open(dir: &Path) -> Result<Self, AuditError> {
        let path = dir.join(SPOOL_FILE);
        let mut spool = Spool {
            path: path.clone(),
            dir: dir.to_owned(),
            file: None,
            spool_id: String::new(),
            last_position: 0,
            end: 0,
            forward_offset: 0,
            forwarded_position: 0,
            broken: None,
        };
        let file = match OpenOptions::new().read(true).append(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(spool),
            Err(e) => return Err(e.into()),
        };
        let mut spool_id = None;
        let (end, incomplete) = scan_lines(&file, 0, 1, |line_number, _, line| {
            let event = parse_line(&path, line_number, line)?;
            let id = spool_id.get_or_insert_with(|| event.spool_id.clone());
            if event.spool_id != *id || event.position != line_number {
                return Err(corrupt(
                    &path,
                    line_number,
                    format!(
                        "expected position {line_number} of spool {id}, found position {} of \
                         spool {}",
                        event.position, event.spool_id
                    ),
                ));
            }
            spool.last_position = line_number;
            Ok(true)
        })?;
        if incomplete {
            drop_incomplete_line(&file, &path, end)?;
        }
        match spool_id {
            Some(id) => {
                spool.spool_id = id;
                spool.end = end;
                spool.file = Some(file);
            }
            None => {
                drop(file);
                spool.remove_file()?;
            }
        }
        Ok(spool)
    }

    /// Returns whether the spool contains events, forwarded or not. While it
    /// does, new events go to the spool too, so they reach the chain in
    /// the order of their calls.
    pub fn is_active(&self) -> bool {
        self.file.is_some()
    }

    /// Returns the number of events that this process has not seen
    /// forwarded.
    pub fn unforwarded(&self) -> u64 {
        self.last_position - self.forwarded_position
    }

    /// Appends `events`, each with the time of its call, in one write and
    /// syncs them. Starts a new spool, with a new id, when none is active.
    pub fn append(&mut self, events: &[(SystemTime, EventDraft)]) -> Result<(), AuditError> {
        if let Some(reason) = &self.broken {
            return Err(AuditError::Unavailable(format!(
                "the audit spool {} cannot be written: {reason}",
                self.path.display()
            )));
        }
        if self.file.is_none() {
            self.create()?;
        }
        let mut lines = Vec::with_capacity(events.len() * 512);
        let mut position = self.last_position;
        for (time, draft) in events {
            position += 1;
            let event = SpooledEvent {
                spool_id: self.spool_id.clone(),
                position,
                time: *time,
                draft: draft.clone(),
            };
            serde_json::to_writer(&mut lines, &event).expect("spooled events are JSON");
            lines.push(b'\n');
        }
        let file = self.file.as_mut().expect("created above when missing");
        let written = file.write_all(&lines).and_then(|()| file.sync_data());
        if let Err(error) = written {
            // Cut the file back to its last complete event, so later events
            // follow it.
            if let Err(undo) = file.set_len(self.end).and_then(|()| file.sync_data()) {
                self.broken = Some(format!(
                    "a failed write ({error}) could not be undone: {undo}"
                ));
            }
            return Err(error.into());
        }
        self.end += lines.len() as u64;
        self.last_position = position;
        Ok(())
    }

    /// Reads up to `max` events that this process has not forwarded, oldest
    /// first. Returns `None` when there are none.
    pub fn read_batch(&self, max: usize) -> Result<Option<SpoolBatch>, AuditError> {
        if self.forward_offset >= self.end {
            return Ok(None);
        }
        let file = File::open(&self.path)?;
        let mut events = Vec::new();
        let mut end = self.forward_offset;
        let first_line = self.forwarded_position + 1;
        scan_lines(
            &file,
            self.forward_offset,
            first_line,
            |line_number, offset, line| {
                if offset >= self.end || events.len() == max {
                    return Ok(false);
                }
                events.push(parse_line(&self.path, line_number, line)?);
                end = offset + line.len() as u64 + 1;
                Ok(true)
            },
        )?;
        Ok(Some(SpoolBatch {
            spool_id: self.spool_id.clone(),
            events,
            end,
            reaches_end: end == self.end,
        }))
    }

    /// Records that `batch` is in the chain.
    pub fn mark_forwarded(&mut self, batch: &SpoolBatch) {
        if let Some(last) = batch.events.last() {
            self.forward_offset = batch.end;
            self.forwarded_position = last.position;
        }
    }

    /// Removes the spool once every event in it is forwarded. The next
    /// append starts a spool with a new id.
    pub fn remove_if_forwarded(&mut self) -> Result<bool, AuditError> {
        if self.file.is_none() || self.forwarded_position < self.last_position {
            return Ok(false);
        }
        self.file = None;
        self.remove_file()?;
        self.spool_id.clear();
        self.last_position = 0;
        self.end = 0;
        self.forward_offset = 0;
        self.forwarded_position = 0;
        Ok(true)
    }

    /// Creates the file of a new spool and syncs its directory entry.
    fn create(&mut self) -> Result<(), AuditError> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.path)?;
        File::open(&self.dir)?.sync_all()?;
        self.file = Some(file);
        self.spool_id = uuid::Uuid::now_v7().to_string();
        Ok(())
    }

    /// Deletes the file, if any, and syncs the directory, so a crash after
    /// this does not bring the events back.
    fn remove_file(&self) -> Result<(), AuditError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }
}

fn parse_line(path: &Path, line_number: u64, line: &[u8]) -> Result<SpooledEvent, AuditError> {
    serde_json::from_slice(line).map_err(|e| corrupt(path, line_number, e.to_string()))
}

fn corrupt(path: &Path, line_number: u64, reason: String) -> AuditError {
    AuditError::SpoolCorrupt {
        path: path.to_owned(),
        line: line_number,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::tests::draft;

    fn events(count: i64) -> Vec<(SystemTime, EventDraft)> {
        (0..count)
            .map(|i| (SystemTime::now(), draft("spooled", i)))
            .collect()
    }

    #[test]
    fn appended_events_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path()).unwrap();
        assert!(!spool.is_active());
        spool.append(&events(2)).unwrap();
        spool.append(&events(1)).unwrap();
        assert!(spool.is_active());
        assert_eq!(spool.unforwarded(), 3);
        let id = spool.spool_id.clone();
        drop(spool);

        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.unforwarded(), 3);
        let batch = spool.read_batch(10).unwrap().expect("events to forward");
        assert_eq!(batch.spool_id, id);
        let positions: Vec<u64> = batch.events.iter().map(|e| e.position).collect();
        assert_eq!(positions, [1, 2, 3]);
        assert_eq!(batch.events[2].draft.tenant_id, Some(0));
        assert!(batch.reaches_end);
    }

    #[test]
    fn batches_advance_and_removal_starts_new_spool() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path()).unwrap();
        spool.append(&events(5)).unwrap();
        let first_id = spool.spool_id.clone();

        let batch = spool.read_batch(3).unwrap().unwrap();
        assert_eq!(batch.events.len(), 3);
        assert!(!batch.reaches_end);
        spool.mark_forwarded(&batch);
        assert!(!spool.remove_if_forwarded().unwrap());
        assert_eq!(spool.unforwarded(), 2);

        let batch = spool.read_batch(3).unwrap().unwrap();
        let positions: Vec<u64> = batch.events.iter().map(|e| e.position).collect();
        assert_eq!(positions, [4, 5]);
        assert!(batch.reaches_end);
        spool.mark_forwarded(&batch);
        assert!(spool.read_batch(3).unwrap().is_none());
        assert!(spool.remove_if_forwarded().unwrap());
        assert!(!dir.path().join(SPOOL_FILE).exists());

        spool.append(&events(1)).unwrap();
        let batch = spool.read_batch(3).unwrap().unwrap();
        assert_ne!(batch.spool_id, first_id);
        assert_eq!(batch.events[0].position, 1);
    }

    #[test]
    fn incomplete_last_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path()).unwrap();
        spool.append(&events(2)).unwrap();
        drop(spool);
        let path = dir.path().join(SPOOL_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let complete = bytes.len();
        bytes.extend_from_slice(b"{\"spool_id\":\"");
        std::fs::write(&path, bytes).unwrap();

        let mut spool = Spool::open(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), complete as u64);
        spool.append(&events(1)).unwrap();
        let batch = spool.read_batch(10).unwrap().unwrap();
        let positions: Vec<u64> = batch.events.iter().map(|e| e.position).collect();
        assert_eq!(positions, [1, 2, 3]);
    }

    #[test]
    fn corrupt_line_rejects_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path()).unwrap();
        spool.append(&events(2)).unwrap();
        drop(spool);
        let path = dir.path().join(SPOOL_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        let second = text.lines().nth(1).unwrap();
        std::fs::write(&path, format!("not json\n{second}\n")).unwrap();
        let error = Spool::open(dir.path()).err().expect("open must fail");
        assert!(error.to_string().contains("line 1"), "{error}");

        // A line from another spool, or out of place, is rejected too.
        std::fs::write(&path, format!("{second}\n")).unwrap();
        let error = Spool::open(dir.path()).err().expect("open must fail");
        assert!(error.to_string().contains("expected position 1"), "{error}");
    }

    #[test]
    fn empty_file_is_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SPOOL_FILE), b"").unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        assert!(!spool.is_active());
        assert!(!dir.path().join(SPOOL_FILE).exists());
    }
}
