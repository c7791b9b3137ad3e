//! Verification of the audit chain, in a trail file or in the database.
//! Every event from 1 to the last must be present, readable and numbered in
//! order, and each must hold the hash of the one before it. The head record
//! must name an event of the trail and match its hash.

use std::fmt;
use std::path::Path;

use super::file::{events_path, head_path, read_head, scan_lines};
use super::{AuditError, AuditEvent, GENESIS_HASH, Head, hash_hex};

/// An intact chain.
#[derive(Debug)]
pub struct Verified {
    pub events: u64,
    /// Hash of the last event, or the genesis hash for an empty trail.
    pub head_hash: String,
    /// Whether the file ends in an incomplete event: a write in progress,
    /// or one a crash interrupted, which the server drops when it starts.
    pub incomplete_tail: bool,
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

/// Failure to verify a trail.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("no audit trail in {dir}; pass the STVAULT_DATA_DIR of the server")]
    Missing { dir: String },
    /// The database has no audit tables: no server of this version has
    /// started on it yet.
    #[error(
        "no audit trail in the database {database}; start stvault serve on it once to create it"
    )]
    MissingTables { database: String },
    #[error("{0}")]
    Broken(ChainBreak),
    #[error("cannot read the audit trail: {0}")]
    Read(#[from] std::io::Error),
    /// The database could not be reached or rejected a query. The message
    /// names the database, never its password.
    #[error("cannot read the audit trail: {0}")]
    Database(String),
}

impl From<ChainBreak> for VerifyError {
    fn from(chain_break: ChainBreak) -> Self {
        VerifyError::Broken(chain_break)
    }
}

/// Checks a chain one event at a time, oldest first, and then its head.
pub(super) struct ChainCheck {
    /// The head as recorded, read before the events.
    head: Option<Head>,
    /// Sequence of the last event checked; 0 before the first.
    last: u64,
    /// Hash of the last event checked, or the genesis hash.
    previous_hash: String,
    /// Whether the event the head names matches its hash, once checked.
    head_matches: Option<bool>,
}

impl ChainCheck {
    pub fn new(head: Option<Head>) -> Self {
        Self {
            head,
            last: 0,
            previous_hash: GENESIS_HASH.to_owned(),
            head_matches: None,
        }
    }

    /// Returns the sequence of the last event that passed.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Checks the stored bytes of the next event, number `last() + 1`, and
    /// returns their hash.
    pub fn next(&mut self, bytes: &[u8]) -> Result<String, ChainBreak> {
        let sequence = self.last + 1;
        let event: AuditEvent = serde_json::from_slice(bytes)
            .map_err(|e| broken(sequence, format!("the event is not readable: {e}")))?;
        if event.sequence != sequence {
            let reason = if event.sequence > sequence {
                format!(
                    "the event is missing (the next stored event is {})",
                    event.sequence
                )
            } else {
                format!("the event says it is number {}", event.sequence)
            };
            return Err(broken(sequence, reason));
        }
        if event.previous_hash != self.previous_hash {
            return Err(if sequence == 1 {
                broken(1, "the first event does not start the chain".into())
            } else {
                broken(
                    sequence - 1,
                    format!(
                        "its hash does not match the previous_hash stored in event \
                         {sequence}; one of the two was edited or replaced"
                    ),
                )
            });
        }
        self.previous_hash = hash_hex(bytes);
        if let Some(head) = &self.head {
            if head.sequence == sequence {
                self.head_matches = Some(head.hash == self.previous_hash);
            }
        }
        self.last = sequence;
        Ok(self.previous_hash.clone())
    }

    /// Checks the recorded head against the events checked.
    pub fn finish(self, incomplete_tail: bool) -> Result<Verified, ChainBreak> {
        let last = self.last;
        match self.head {
            Some(head) if head.sequence > last => {
                return Err(broken(
                    last + 1,
                    format!(
                        "the event is missing (the chain head records {} events)",
                        head.sequence
                    ),
                ));
            }
            Some(head) if self.head_matches == Some(false) => {
                return Err(broken(
                    head.sequence,
                    "its hash does not match the chain head; the event was edited or replaced"
                        .into(),
                ));
            }
            None if last > 0 => {
                return Err(broken(last, "the chain head record is missing".into()));
            }
            _ => {}
        }
        Ok(Verified {
            events: last,
            head_hash: self.previous_hash,
            incomplete_tail,
        })
    }
}

pub(super) fn broken(sequence: u64, reason: String) -> ChainBreak {
    ChainBreak { sequence, reason }
}

/// Verifies the audit chain of a data directory. The server may be running:
/// events it appends during the check are either read whole or reported as
/// an incomplete tail.
pub fn verify_data_dir(dir: &Path) -> Result<Verified, VerifyError> {
    // Read before the events, so events appended meanwhile are past it.
    let head = read_head(&head_path(dir)).map_err(|e| match e {
        AuditError::Io(e) => VerifyError::Read(e),
        other => broken(0, other.to_string()).into(),
    })?;
    let file = match std::fs::File::open(events_path(dir)) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(VerifyError::Missing {
                dir: dir.display().to_string(),
            });
        }
        Err(e) => return Err(VerifyError::Read(e)),
    };

    let mut check = ChainCheck::new(head);
    let mut first_break = None;
    let scanned = scan_lines(&file, 0, 1, |_, _, line| match check.next(line) {
        Ok(_) => Ok(true),
        Err(chain_break) => {
            first_break = Some(chain_break);
            Ok(false)
        }
    });
    let (_, incomplete_tail) = scanned.map_err(|e| match e {
        AuditError::Io(e) => VerifyError::Read(e),
        other => broken(check.last() + 1, other.to_string()).into(),
    })?;
    if let Some(chain_break) = first_break {
        return Err(chain_break.into());
    }
    Ok(check.finish(incomplete_tail)?)
}

#[cfg(test)]
mod tests {
    use super::super::{AuditLog, EVENTS_FILE, EventDraft, SyncPolicy};
    use super::*;

    async fn trail(events: u64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), SyncPolicy::Always).unwrap();
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
        dir
    }

    fn break_of(dir: &Path) -> ChainBreak {
        match verify_data_dir(dir) {
            Err(VerifyError::Broken(chain_break)) => chain_break,
            other => panic!("expected a chain break, got {other:?}"),
        }
    }

    /// Rewrites the event lines of the trail in `dir`.
    fn rewrite(dir: &Path, change: impl FnOnce(&mut Vec<String>)) {
        let path = dir.join(EVENTS_FILE);
        let mut lines: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        change(&mut lines);
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(path, text).unwrap();
    }

    fn edit(dir: &Path, sequence: u64, edit: impl FnOnce(&mut AuditEvent)) {
        rewrite(dir, |lines| {
            let line = &mut lines[sequence as usize - 1];
            let mut event: AuditEvent = serde_json::from_str(line).unwrap();
            edit(&mut event);
            *line = serde_json::to_string(&event).unwrap();
        });
    }

    #[tokio::test]
    async fn empty_trail_verifies() {
        let dir = trail(0).await;
        let verified = verify_data_dir(dir.path()).unwrap();
        assert_eq!(verified.events, 0);
        assert_eq!(verified.head_hash, GENESIS_HASH);
    }

    #[tokio::test]
    async fn edited_event_breaks_at_it() {
        let dir = trail(5).await;
        edit(dir.path(), 3, |e| e.caller = "someone-else".into());
        assert_eq!(break_of(dir.path()).sequence, 3);
    }

    #[tokio::test]
    async fn edited_last_event_breaks_at_it() {
        let dir = trail(5).await;
        edit(dir.path(), 5, |e| e.code = "PERMISSION_DENIED".into());
        assert_eq!(break_of(dir.path()).sequence, 5);
    }

    #[tokio::test]
    async fn deleted_event_breaks_at_it() {
        let dir = trail(5).await;
        rewrite(dir.path(), |lines| {
            lines.remove(1);
        });
        let chain_break = break_of(dir.path());
        assert_eq!(chain_break.sequence, 2);
        assert!(chain_break.reason.contains("missing"), "{chain_break}");
    }

    #[tokio::test]
    async fn deleted_tail_breaks_at_it() {
        let dir = trail(5).await;
        rewrite(dir.path(), |lines| lines.truncate(3));
        assert_eq!(break_of(dir.path()).sequence, 4);
    }

    #[tokio::test]
    async fn unreadable_event_breaks_at_it() {
        let dir = trail(3).await;
        rewrite(dir.path(), |lines| lines[1] = "not json".into());
        let chain_break = break_of(dir.path());
        assert_eq!(chain_break.sequence, 2);
        assert!(chain_break.reason.contains("not readable"));
    }

    #[tokio::test]
    async fn incomplete_tail_is_reported_not_broken() {
        let dir = trail(2).await;
        let path = dir.path().join(EVENTS_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"{\"sequence\":3");
        std::fs::write(&path, bytes).unwrap();
        let verified = verify_data_dir(dir.path()).unwrap();
        assert_eq!(verified.events, 2);
        assert!(verified.incomplete_tail);
    }

    #[test]
    fn missing_trail_names_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let error = verify_data_dir(dir.path()).unwrap_err();
        assert!(error.to_string().contains("STVAULT_DATA_DIR"), "{error}");
    }
}
