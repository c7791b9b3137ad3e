//! The master keyring: every master key a data directory may be wrapped
//! with, newest last. New data keys are wrapped under the newest key; any key
//! still configured unwraps the records that name it.
//!
//! Key text format (a key file, `STVAULT_MASTER_KEY` or the generated
//! `master.key`): one key per line, oldest first. A line is the base64 of a
//! 32-byte key, optionally preceded by its id and a space
//! (`mk-0123456789ab BASE64`). Blank lines and lines starting with `#` are
//! ignored. A single base64 line is a one-key ring.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use futures::StreamExt;

use crate::config::{self, MasterKeySource};
use crate::crypto::{DataKey, IntegrityError, MasterKey};
use crate::secret::SecretString;
use crate::store::{ConnectionRecord, Store, StoreError};

/// Connection ids printed in a startup error before the rest are counted.
const MAX_LISTED_CONNECTIONS: usize = 20;

/// Master keys in configuration order; never empty.
pub struct Keyring {
    keys: Vec<MasterKey>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.ids()).finish()
    }
}

impl From<MasterKey> for Keyring {
    fn from(key: MasterKey) -> Self {
        Self { keys: vec![key] }
    }
}

/// Failure to unwrap a record's data key.
#[derive(Debug, thiserror::Error)]
pub enum UnwrapError {
    #[error("master key {0} is not configured")]
    UnknownKey(String),
    #[error(transparent)]
    Integrity(#[from] IntegrityError),
}

impl Keyring {
    /// Parses key text in the format described in the module documentation.
    /// Errors name the line, never its content.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys: Vec<MasterKey> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let number = index + 1;
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (label, encoded) = match fields.as_slice() {
                [encoded] => (None, *encoded),
                [label, encoded] => (Some(*label), *encoded),
                _ => {
                    return Err(format!(
                        "line {number}: expected a base64 key, optionally preceded by its id and a space"
                    ));
                }
            };
            let key = MasterKey::from_base64(encoded).map_err(|e| format!("line {number}: {e}"))?;
            if let Some(label) = label {
                if label != key.id() {
                    return Err(format!(
                        "line {number}: the id {label} does not match the key, whose id is {}",
                        key.id()
                    ));
                }
            }
            if keys.iter().any(|k| k.id() == key.id()) {
                return Err(format!(
                    "line {number}: master key {} is listed twice",
                    key.id()
                ));
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return Err("no master key found; expected one base64 key per line".into());
        }
        Ok(Self { keys })
    }

    /// Returns the key new data keys are wrapped under: the last one listed.
    pub fn newest(&self) -> &MasterKey {
        self.keys.last().expect("a keyring is never empty")
    }

    pub fn get(&self, id: &str) -> Option<&MasterKey> {
        self.keys.iter().find(|k| k.id() == id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.id())
    }

    pub fn keys(&self) -> &[MasterKey] {
        &self.keys
    }

    /// Unwraps a record's data key with the master key the record names.
    pub fn unwrap_data_key(&self, record: &ConnectionRecord) -> Result<DataKey, UnwrapError> {
        let key = self
            .get(&record.master_key_id)
            .ok_or_else(|| UnwrapError::UnknownKey(record.master_key_id.clone()))?;
        Ok(key.unwrap(&record.id, &record.wrapped_data_key)?)
    }
}

/// Returns one line of key text for `key`, as `stvault keygen` prints it.
pub fn key_line(key: &MasterKey, text: &SecretString) -> SecretString {
    SecretString::new(format!("{} {}", key.id(), text.expose()))
}

// === Loading ===

/// Loads the keyring from its configured source, generating a one-key file
/// in the data directory when no key is configured and none exists there.
pub fn load(source: &MasterKeySource) -> Result<Keyring, String> {
    match source {
        MasterKeySource::Environment(text) => {
            Keyring::parse(text.expose()).map_err(|e| format!("{}: {e}", config::ENV_MASTER_KEY))
        }
        MasterKeySource::File(path) => read_key_file(path),
        MasterKeySource::DataDir(path) if path.exists() => {
            tracing::warn!(
                path = %path.display(),
                "using the master key stored in the data directory; in production, keep it elsewhere \
                 and set STVAULT_MASTER_KEY_FILE"
            );
            read_key_file(path)
        }
        MasterKeySource::DataDir(path) => generate_key_file(path).map(Keyring::from),
    }
}

/// Checks that the master key set by `STVAULT_MASTER_KEY` or
/// `STVAULT_MASTER_KEY_FILE` loads, so a bad one is reported with the
/// other settings. A key kept in the data directory is read when it opens.
pub fn check_configured(source: &MasterKeySource) -> Result<(), String> {
    match source {
        MasterKeySource::DataDir(_) => Ok(()),
        configured => load(configured).map(drop),
    }
}

fn read_key_file(path: &Path) -> Result<Keyring, String> {
    config::check_key_file_mode(path)?;
    let text = SecretString::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read master key file {}: {e}", path.display()))?,
    );
    Keyring::parse(text.expose()).map_err(|e| format!("master key file {}: {e}", path.display()))
}

fn generate_key_file(path: &Path) -> Result<MasterKey, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let (key, text) = MasterKey::generate();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create master key file {}: {e}", path.display()))?;
    file.write_all(text.expose().as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write master key file {}: {e}", path.display()))?;
    tracing::warn!(
        path = %path.display(),
        key.id = key.id(),
        "generated a new master key inside the data directory; in production, keep the key elsewhere \
         (STVAULT_MASTER_KEY_FILE) and back it up separately from the data"
    );
    Ok(key)
}

// === Startup check ===

/// Findings and changes of the startup check.
#[derive(Debug, Default)]
pub struct KeyringCheck {
    /// Connections per configured master key id.
    pub connections_by_key: BTreeMap<String, usize>,
    /// Keys no longer configured and no longer used, whose check values
    /// were removed.
    pub retired_key_ids: Vec<String>,
    /// Connections whose record is unreadable or whose data key fails
    /// authentication under the key it names. They stay stored, and using
    /// them fails with an integrity error.
    pub undecryptable: Vec<String>,
}

impl KeyringCheck {
    /// Describes `undecryptable` for a startup warning, listing at most
    /// `MAX_LISTED_CONNECTIONS` ids.
    pub fn describe_undecryptable(&self) -> String {
        list_ids(self.undecryptable.iter().map(String::as_str))
    }
}

/// Checks the keyring against a data directory before serving:
///
/// - every configured key with a stored check value must open it, and when
///   the directory has check values at least one configured key must match,
///   so a wrong key file is rejected even for a directory without records;
/// - every connection must name a configured key, and the error counts the
///   connections per missing key, so removing a key still in use is
///   rejected;
/// - connections that are unreadable or whose data key fails authentication
///   are returned in `undecryptable`, for the caller to report;
/// - configured keys get a check value, and check values of keys that are
///   neither configured nor used are removed.
pub async fn check(store: &Store, keyring: &Keyring) -> Result<KeyringCheck, String> {
    let read_error = |e: StoreError| format!("cannot read the data directory: {e}");
    let stored = store.check_values().await.map_err(read_error)?;

    let mut any_matches = false;
    for (id, sealed) in &stored {
        if let Some(key) = keyring.get(id) {
            if !key.open_check_value(sealed) {
                return Err(format!(
                    "master key {id} does not open its check value in this data directory; \
                     the directory was altered or copied from elsewhere"
                ));
            }
            any_matches = true;
        }
    }
    if !stored.is_empty() && !any_matches {
        let stored_ids: Vec<&str> = stored.iter().map(|(id, _)| id.as_str()).collect();
        let configured: Vec<&str> = keyring.ids().collect();
        let subject = match configured.as_slice() {
            [one] => format!("the configured master key ({one}) is not the key"),
            many => format!(
                "none of the configured master keys ({}) is a key",
                many.join(", ")
            ),
        };
        return Err(format!(
            "{subject} this data directory was written with ({}); configure the original key",
            stored_ids.join(", ")
        ));
    }

    let mut report = KeyringCheck::default();
    let mut missing: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut records = std::pin::pin!(store.records());
    while let Some(record) = records.next().await {
        let record = match record {
            Ok(record) => record,
            Err(StoreError::Corrupt { key, .. }) => {
                report.undecryptable.push(key);
                continue;
            }
            Err(e) => return Err(read_error(e)),
        };
        match keyring.unwrap_data_key(&record) {
            Ok(_) => {
                *report
                    .connections_by_key
                    .entry(record.master_key_id)
                    .or_default() += 1
            }
            Err(UnwrapError::UnknownKey(key_id)) => {
                missing.entry(key_id).or_default().push(record.id)
            }
            Err(UnwrapError::Integrity(_)) => report.undecryptable.push(record.id),
        }
    }
    if !missing.is_empty() {
        return Err(describe_missing_keys(&missing));
    }

    for key in keyring.keys() {
        if !stored.iter().any(|(id, _)| id == key.id()) {
            store
                .put_check_value(key.id(), &key.seal_check_value())
                .await
                .map_err(|e| {
                    format!(
                        "cannot record the check value of master key {}: {e}",
                        key.id()
                    )
                })?;
        }
    }
    for (id, _) in &stored {
        if keyring.get(id).is_none() {
            store
                .remove_check_value(id)
                .await
                .map_err(|e| format!("cannot remove the check value of master key {id}: {e}"))?;
            report.retired_key_ids.push(id.clone());
        }
    }
    Ok(report)
}

fn describe_missing_keys(missing: &BTreeMap<String, Vec<String>>) -> String {
    let parts: Vec<String> = missing
        .iter()
        .map(|(key_id, ids)| {
            format!(
                "{} connections use master key {key_id}, which is not configured",
                ids.len()
            )
        })
        .collect();
    format!(
        "{}; put the key back in the keyring, and run `stvault rewrap` before removing it; \
         connections that need it: {}",
        parts.join("; "),
        list_ids(missing.values().flatten().map(String::as_str))
    )
}

/// Joins connection ids, at most `MAX_LISTED_CONNECTIONS` of them, then
/// counts the rest.
fn list_ids<'a>(ids: impl Iterator<Item = &'a str>) -> String {
    let ids: Vec<&str> = ids.collect();
    let listed = ids[..ids.len().min(MAX_LISTED_CONNECTIONS)].join(", ");
    match ids.len().saturating_sub(MAX_LISTED_CONNECTIONS) {
        0 => listed,
        more => format!("{listed} and {more} more"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(key: &MasterKey, text: &SecretString) -> String {
        key_line(key, text).expose().to_owned()
    }

    #[test]
    fn single_base64_line_is_one_key_ring() {
        let (key, text) = MasterKey::generate();
        let ring = Keyring::parse(&format!("{}\n", text.expose())).unwrap();
        assert_eq!(ring.ids().collect::<Vec<_>>(), vec![key.id()]);
        assert_eq!(ring.newest().id(), key.id());
    }

    #[test]
    fn newest_is_last_line() {
        let (old, old_text) = MasterKey::generate();
        let (new, new_text) = MasterKey::generate();
        let text = format!(
            "# retired next quarter\n{}\n\n{}\n",
            line(&old, &old_text),
            new_text.expose()
        );
        let ring = Keyring::parse(&text).unwrap();
        assert_eq!(ring.ids().collect::<Vec<_>>(), vec![old.id(), new.id()]);
        assert_eq!(ring.newest().id(), new.id());
        assert!(ring.get(old.id()).is_some());
    }

    #[test]
    fn wrong_id_label_is_rejected() {
        let (_, text) = MasterKey::generate();
        let error = Keyring::parse(&format!("mk-000000000000 {}", text.expose())).unwrap_err();
        assert!(error.starts_with("line 1:"), "{error}");
        assert!(error.contains("does not match"), "{error}");
        assert!(!error.contains(text.expose()), "error echoes the key");
    }

    #[test]
    fn duplicate_and_malformed_lines_are_rejected() {
        let (_, text) = MasterKey::generate();
        let twice = format!("{0}\n{0}\n", text.expose());
        assert!(Keyring::parse(&twice).unwrap_err().contains("listed twice"));
        assert!(Keyring::parse("a b c").unwrap_err().starts_with("line 1:"));
        assert!(
            Keyring::parse("# only a comment\n")
                .unwrap_err()
                .contains("no master key")
        );
        let error = Keyring::parse("\nAAAA\n").unwrap_err();
        assert!(error.starts_with("line 2:"), "{error}");
    }

    #[test]
    fn debug_lists_ids_only() {
        let (key, text) = MasterKey::generate();
        let ring = Keyring::from(key);
        let debug = format!("{ring:?}");
        assert!(debug.contains("mk-"), "{debug}");
        assert!(!debug.contains(text.expose()));
    }
}
