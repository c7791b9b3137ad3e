//! Exclusive use of a data directory. sled allows one process per database,
//! so `serve`, `rewrap` and `restore` take an advisory lock on
//! `stvault.lock` in the directory and write their pid into it, which lets a
//! second process name the one that holds the directory.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fs2::FileExt;

pub const LOCK_FILE_NAME: &str = "stvault.lock";
/// How long to retry a held lock: a process that was just stopped may still
/// be releasing it.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(2);
const RETRY_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock; `pid` is the one it recorded.
    #[error("data directory {} is in use by process {}", dir.display(), pid.map_or_else(|| "unknown".to_string(), |p| p.to_string()))]
    InUse { dir: PathBuf, pid: Option<u32> },
    #[error("cannot lock data directory {}: {source}", dir.display())]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// The held lock; released when dropped or when the process exits, even on
/// `kill -9`.
pub struct DataDirLock {
    _file: File,
}

/// Creates `dir` (mode 0700) if it is missing.
pub fn create(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create data directory {}: {e}", dir.display()))
}

/// Locks `dir`, retrying for up to `wait` while another process holds it.
pub fn lock(dir: &Path, wait: Duration) -> Result<DataDirLock, LockError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| LockError::Io {
        dir: dir.to_owned(),
        source,
    };
    // Not truncated on open: the holder's pid must stay readable.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(LOCK_FILE_NAME))
        .map_err(io)?;
    let started = Instant::now();
    loop {
        match file.try_lock_exclusive() {
            Ok(()) => break,
            Err(e) if e.raw_os_error() == fs2::lock_contended_error().raw_os_error() => {
                if started.elapsed() >= wait {
                    return Err(LockError::InUse {
                        dir: dir.to_owned(),
                        pid: read_pid(&mut file),
                    });
                }
                std::thread::sleep(RETRY_INTERVAL);
            }
            Err(e) => return Err(io(e)),
        }
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(DataDirLock { _file: file })
}

/// Reads the holder's pid; it may be missing for a moment after the holder
/// locked the file and before it wrote the pid.
fn read_pid(file: &mut File) -> Option<u32> {
    for _ in 0..10 {
        let mut text = String::new();
        if file.rewind().is_ok() && file.read_to_string(&mut text).is_ok() {
            if let Ok(pid) = text.trim().parse() {
                return Some(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_names_holder_pid() {
        let dir = tempfile::tempdir().unwrap();
        let _first_lock = lock(dir.path(), Duration::ZERO).unwrap();
        let error = lock(dir.path(), Duration::from_millis(150))
            .err()
            .expect("lock is held");
        assert!(
            matches!(error, LockError::InUse { pid: Some(pid), .. } if pid == std::process::id()),
            "{error}"
        );
        assert!(
            error
                .to_string()
                .contains(&format!("in use by process {}", std::process::id())),
            "{error}"
        );
    }

    #[test]
    fn lock_is_free_after_drop() {
        let dir = tempfile::tempdir().unwrap();
        drop(lock(dir.path(), Duration::ZERO).unwrap());
        assert!(lock(dir.path(), Duration::ZERO).is_ok());
    }
}
