//! Envelope encryption: master keys wrap one data key per connection, and
//! data keys seal the secret fields with AES-256-GCM.
//!
//! Every ciphertext is bound by associated data to the record and field it
//! belongs to, so a blob copied elsewhere fails to open instead of being used.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::secret::{SecretBytes, SecretString};

pub const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;
/// First byte of every sealed blob; a new format gets a new value.
const FORMAT_V1: u8 = 1;

/// A failed decryption: wrong key, or a ciphertext that was altered or moved.
#[derive(Debug, thiserror::Error)]
#[error("ciphertext failed authentication")]
pub struct IntegrityError;

/// A 256-bit master key with its id. The id is derived from the key, so the
/// same key always has the same id and records can name the key that
/// wrapped them.
pub struct MasterKey {
    id: String,
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl MasterKey {
    pub fn from_bytes(bytes: &SecretBytes) -> Result<Self, String> {
        let raw = bytes.expose();
        if raw.len() != KEY_LEN {
            return Err(format!(
                "a master key must be {KEY_LEN} bytes, encoded as base64; this one decodes to {} bytes",
                raw.len()
            ));
        }
        let digest = Sha256::new()
            .chain_update(b"stvault master key id\0")
            .chain_update(raw)
            .finalize();
        Ok(Self {
            id: format!("mk-{}", hex::encode(&digest[..6])),
            cipher: Aes256Gcm::new_from_slice(raw).expect("length checked above"),
        })
    }

    /// Parses the base64 text of a key file or environment variable.
    pub fn from_base64(text: &str) -> Result<Self, String> {
        let decoded = BASE64
            .decode(text.trim())
            .map_err(|_| "a master key must be 32 bytes encoded as base64".to_string())?;
        Self::from_bytes(&SecretBytes::new(decoded))
    }

    /// Generates a random key and returns it with its base64 text.
    pub fn generate() -> (Self, SecretString) {
        let mut raw = vec![0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let raw = SecretBytes::new(raw);
        let text = SecretString::new(BASE64.encode(raw.expose()));
        (
            Self::from_bytes(&raw).expect("generated key has the right length"),
            text,
        )
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Wraps a connection's data key under this master key.
    pub fn wrap(&self, connection_id: &str, data_key: &DataKey) -> Sealed {
        let aad = wrap_aad(connection_id, &self.id);
        seal_with(&self.cipher, data_key.0.expose(), &aad)
    }

    pub fn unwrap(&self, connection_id: &str, wrapped: &Sealed) -> Result<DataKey, IntegrityError> {
        let aad = wrap_aad(connection_id, &self.id);
        let raw = open_with(&self.cipher, wrapped, &aad)?;
        if raw.expose().len() != KEY_LEN {
            return Err(IntegrityError);
        }
        Ok(DataKey(raw))
    }

    /// Seals a fixed value that proves at startup that this key is the one
    /// the data directory was written with.
    pub fn seal_check_value(&self) -> Sealed {
        seal_with(&self.cipher, CHECK_VALUE, &check_aad(&self.id))
    }

    pub fn open_check_value(&self, sealed: &Sealed) -> bool {
        matches!(open_with(&self.cipher, sealed, &check_aad(&self.id)), Ok(v) if v.expose() == CHECK_VALUE)
    }

    /// Seals the SHA-256 of a caller policy that replicas share through the
    /// database, so that only a holder of this key can change what they
    /// enforce.
    pub fn seal_policy(&self, document: &str) -> Sealed {
        let digest = Sha256::digest(document.as_bytes());
        seal_with(&self.cipher, &digest, &policy_aad(&self.id))
    }

    /// Checks that `sealed` is this key's seal of `document`.
    pub fn verify_policy(&self, document: &str, sealed: &Sealed) -> Result<(), IntegrityError> {
        let sealed_digest = open_with(&self.cipher, sealed, &policy_aad(&self.id))?;
        let digest = Sha256::digest(document.as_bytes());
        if sealed_digest.expose() != digest.as_slice() {
            return Err(IntegrityError);
        }
        Ok(())
    }
}

const CHECK_VALUE: &[u8] = b"stvault master key check";

fn check_aad(key_id: &str) -> Vec<u8> {
    format!("stvault.v1\0check\0{key_id}").into_bytes()
}

fn policy_aad(key_id: &str) -> Vec<u8> {
    format!("stvault.v1\0policy\0{key_id}").into_bytes()
}

fn wrap_aad(connection_id: &str, key_id: &str) -> Vec<u8> {
    format!("stvault.v1\0data-key\0{connection_id}\0{key_id}").into_bytes()
}

fn token_aad(connection_id: &str, version: u32, bound: &str) -> Vec<u8> {
    format!("stvault.v1\0token\0{connection_id}\0{version}\0{bound}").into_bytes()
}

fn field_aad(connection_id: &str, field: &str, version: u32) -> Vec<u8> {
    format!("stvault.v1\0field\0{connection_id}\0{field}\0{version}").into_bytes()
}

/// The per-connection key that seals its secret fields.
pub struct DataKey(SecretBytes);

impl DataKey {
    pub fn generate() -> Self {
        let mut raw = vec![0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        Self(SecretBytes::new(raw))
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new_from_slice(self.0.expose()).expect("data keys are 32 bytes")
    }

    /// Seals one secret field of one credential version of a connection.
    pub fn seal(
        &self,
        connection_id: &str,
        field: &str,
        version: u32,
        plain: &SecretString,
    ) -> Sealed {
        let aad = field_aad(connection_id, field, version);
        seal_with(&self.cipher(), plain.expose().as_bytes(), &aad)
    }

    pub fn open(
        &self,
        connection_id: &str,
        field: &str,
        version: u32,
        sealed: &Sealed,
    ) -> Result<SecretString, IntegrityError> {
        let aad = field_aad(connection_id, field, version);
        let raw = open_with(&self.cipher(), sealed, &aad)?;
        let text = std::str::from_utf8(raw.expose()).map_err(|_| IntegrityError)?;
        Ok(SecretString::new(text.to_owned()))
    }

    /// Seals an access token issued for one credential version of a
    /// connection, for replicas that share tokens through the database.
    /// `bound` is stored beside it in plaintext (its type and expiry) and
    /// must be given again to open it.
    pub fn seal_token(
        &self,
        connection_id: &str,
        version: u32,
        bound: &str,
        token: &SecretString,
    ) -> Sealed {
        let aad = token_aad(connection_id, version, bound);
        seal_with(&self.cipher(), token.expose().as_bytes(), &aad)
    }

    pub fn open_token(
        &self,
        connection_id: &str,
        version: u32,
        bound: &str,
        sealed: &Sealed,
    ) -> Result<SecretString, IntegrityError> {
        let aad = token_aad(connection_id, version, bound);
        let raw = open_with(&self.cipher(), sealed, &aad)?;
        let text = std::str::from_utf8(raw.expose()).map_err(|_| IntegrityError)?;
        Ok(SecretString::new(text.to_owned()))
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// A sealed blob: format byte, 96-bit random nonce, then ciphertext and tag.
/// Serialized as base64.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sealed(#[serde(with = "base64_bytes")] Vec<u8>);

impl Sealed {
    /// Wraps bytes read back from storage; `open` checks them.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealed({} bytes)", self.0.len())
    }
}

fn seal_with(cipher: &Aes256Gcm, plain: &[u8], aad: &[u8]) -> Sealed {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let ciphertext = cipher
        .encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad })
        .expect("AES-GCM encryption fails only for inputs over 64 GiB");
    let mut out = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
    out.push(FORMAT_V1);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ciphertext);
    Sealed(out)
}

fn open_with(
    cipher: &Aes256Gcm,
    sealed: &Sealed,
    aad: &[u8],
) -> Result<SecretBytes, IntegrityError> {
    let bytes = &sealed.0;
    if bytes.len() < 1 + NONCE_LEN + 16 || bytes[0] != FORMAT_V1 {
        return Err(IntegrityError);
    }
    let (nonce, ciphertext) = bytes[1..].split_at(NONCE_LEN);
    cipher
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map(SecretBytes::new)
        .map_err(|_| IntegrityError)
}

mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&BASE64.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        BASE64.decode(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(text: &str) -> SecretString {
        SecretString::new(text.to_owned())
    }

    #[test]
    fn field_round_trips() {
        let key = DataKey::generate();
        let sealed = key.seal("c1", "client_secret", 1, &secret("cs1.value"));
        let opened = key.open("c1", "client_secret", 1, &sealed).unwrap();
        assert_eq!(opened.expose(), "cs1.value");
    }

    #[test]
    fn field_bound_to_connection_field_and_version() {
        let key = DataKey::generate();
        let sealed = key.seal("c1", "client_secret", 1, &secret("cs1.value"));
        assert!(key.open("c2", "client_secret", 1, &sealed).is_err());
        assert!(key.open("c1", "app_key", 1, &sealed).is_err());
        assert!(key.open("c1", "client_secret", 2, &sealed).is_err());
    }

    #[test]
    fn token_seal_binds_connection_and_version() {
        let key = DataKey::generate();
        let sealed = key.seal_token("c1", 3, "Bearer\09000", &secret("eyJ.token"));
        let open = |id, version, bound, sealed| key.open_token(id, version, bound, sealed);
        assert_eq!(
            open("c1", 3, "Bearer\09000", &sealed).unwrap().expose(),
            "eyJ.token"
        );
        assert!(open("c2", 3, "Bearer\09000", &sealed).is_err());
        assert!(open("c1", 4, "Bearer\09000", &sealed).is_err());
        assert!(open("c1", 3, "Bearer\09999", &sealed).is_err());
        let garbage = Sealed::from_bytes(vec![1; 40]);
        assert!(open("c1", 3, "Bearer\09000", &garbage).is_err());
        let field = key.seal("c1", "client_secret", 3, &secret("cs1.value"));
        assert!(open("c1", 3, "Bearer\09000", &field).is_err());
    }

    #[test]
    fn nonce_differs_per_seal() {
        let key = DataKey::generate();
        let a = key.seal("c1", "f", 1, &secret("same"));
        let b = key.seal("c1", "f", 1, &secret("same"));
        assert_ne!(a, b);
    }

    #[test]
    fn tampered_blob_fails() {
        let key = DataKey::generate();
        let mut sealed = key.seal("c1", "f", 1, &secret("value"));
        let last = sealed.0.len() - 1;
        sealed.0[last] ^= 1;
        assert!(key.open("c1", "f", 1, &sealed).is_err());
    }

    #[test]
    fn data_key_wrap_bound_to_connection_and_master_key() {
        let (master, _) = MasterKey::generate();
        let (other, _) = MasterKey::generate();
        let data_key = DataKey::generate();
        let wrapped = master.wrap("c1", &data_key);
        assert!(master.unwrap("c1", &wrapped).is_ok());
        assert!(master.unwrap("c2", &wrapped).is_err());
        assert!(other.unwrap("c1", &wrapped).is_err());
    }

    #[test]
    fn check_value_detects_wrong_key() {
        let (master, text) = MasterKey::generate();
        let (other, _) = MasterKey::generate();
        let check = master.seal_check_value();
        assert!(master.open_check_value(&check));
        assert!(!other.open_check_value(&check));
        assert_eq!(
            MasterKey::from_base64(text.expose()).unwrap().id(),
            master.id()
        );
    }

    #[test]
    fn policy_seal_bound_to_document_and_master_key() {
        let (master, _) = MasterKey::generate();
        let (other, _) = MasterKey::generate();
        let document = "[[caller]]\nname = \"ops\"\n";
        let sealed = master.seal_policy(document);
        assert!(master.verify_policy(document, &sealed).is_ok());
        assert!(master.verify_policy("", &sealed).is_err());
        assert!(other.verify_policy(document, &sealed).is_err());
        let check = master.seal_check_value();
        assert!(master.verify_policy(document, &check).is_err());
    }

    #[test]
    fn master_key_length_is_checked() {
        assert!(MasterKey::from_base64("AAAA").is_err());
        assert!(MasterKey::from_base64("not base64!").is_err());
    }
}
