//! Verification of the audit chain. Every event from 1 to the last must be
//! present, readable and numbered in order, and each must hold the hash of
//! the one before it. The head record must name an event of the trail and
//! match its hash.

use std::fmt;
use std::path::Path;

use super::file::{events_path, head_path, read_head, scan_lines};
use super::{AuditError, AuditEvent, GENESIS_HASH, hash_hex};

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

/// Failure to verify a data directory.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("no audit trail in {dir}; pass the STVAULT_DATA_DIR of the server")]
    Missing { dir: String },
    #[error("{0}")]
    Broken(ChainBreak),
    #[error("cannot read the audit trail: {0}")]
    Read(#[from] std::io::Error),
}

/// Verifies the audit chain of a data directory. The server may be running:
/// events it appends during the check are either read whole or reported as
/// an incomplete tail.
pub fn verify_data_dir(dir: &Path) -> Result<Verified, VerifyError> {
    let broken =
        |sequence: u64, reason: String| VerifyError::Broken(ChainBreak { sequence, reason });
    // Read before the events, so events appended meanwhile are past it.
    let head = read_head(&head_path(dir)).map_err(|e| match e {
        AuditError::Io(e) => VerifyError::Read(e),
        other => broken(0, other.to_string()),
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

    let mut last = 0;
    let mut previous_hash = GENESIS_HASH.to_owned();
    let mut head_matches = None;
    let mut first_break = None;
    let scanned = scan_lines(&file, 0, 1, |sequence, _, line| {
        let event: AuditEvent = match serde_json::from_slice(line) {
            Ok(event) => event,
            Err(e) => {
                first_break = Some(broken(sequence, format!("the event is not readable: {e}")));
                return Ok(false);
            }
        };
        if event.sequence != sequence {
            let reason = if event.sequence > sequence {
                format!(
                    "the event is missing (the next stored event is {})",
                    event.sequence
                )
            } else {
                format!("the event says it is number {}", event.sequence)
            };
            first_break = Some(broken(sequence, reason));
            return Ok(false);
        }
        if event.previous_hash != previous_hash {
            first_break = Some(if sequence == 1 {
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
            return Ok(false);
        }
        previous_hash = hash_hex(line);
        if head.as_ref().is_some_and(|h| h.sequence == sequence) {
            head_matches = Some(head.as_ref().is_some_and(|h| h.hash == previous_hash));
        }
        last = sequence;
        Ok(true)
    });
    let (_, incomplete_tail) = scanned.map_err(|e| match e {
        AuditError::Io(e) => VerifyError::Read(e),
        other => broken(last + 1, other.to_string()),
    })?;
    if let Some(chain_break) = first_break {
        return Err(chain_break);
    }

    match head {
        Some(head) if head.sequence > last => {
            return Err(broken(
                last + 1,
                format!(
                    "the event is missing (the chain head records {} events)",
                    head.sequence
                ),
            ));
        }
        Some(head) if head_matches == Some(false) => {
            return Err(broken(
                head.sequence,
                "its hash does not match the chain head; the event was edited or replaced".into(),
            ));
        }
        None if last > 0 => {
            return Err(broken(last, "the chain head record is missing".into()));
        }
        _ => {}
    }
    Ok(Verified {
        events: last,
        head_hash: previous_hash,
        incomplete_tail,
    })
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
