//! Caller credentials carried by a request: the identity in a client
//! certificate, and bearer keys in `authorization` metadata.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;

use crate::secret::SecretString;

/// Prefix of generated bearer keys, so a leaked key is recognisable.
pub const KEY_PREFIX: &str = "stvk_";
/// Random bytes in a generated bearer key.
const KEY_BYTES: usize = 32;

/// Returns the identity of a DER certificate: its first URI SAN, else its
/// first DNS SAN, else its subject common name.
pub fn certificate_identity(der: &[u8]) -> Result<String, String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("client certificate is not parseable: {e}"))?;
    let names = certificate
        .subject_alternative_name()
        .map_err(|e| format!("client certificate has an invalid subjectAltName: {e}"))?
        .map(|extension| extension.value.general_names.clone())
        .unwrap_or_default();
    let uri = names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    let dns = names.iter().find_map(|name| match name {
        GeneralName::DNSName(dns) => Some(*dns),
        _ => None,
    });
    if let Some(identity) = uri.or(dns) {
        return Ok(identity.to_owned());
    }
    certificate
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| "client certificate has no URI SAN, DNS SAN or subject CN".to_owned())
}

/// Extracts the key of an `authorization: Bearer <key>` value.
pub fn bearer_key(value: &[u8]) -> Option<SecretString> {
    let text = std::str::from_utf8(value).ok()?;
    let (scheme, key) = text.split_once(' ')?;
    let key = key.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || key.is_empty() {
        return None;
    }
    Some(SecretString::new(key.to_owned()))
}

/// SHA-256 of a bearer key's text, the form the policy stores.
pub fn key_hash(key: &SecretString) -> [u8; 32] {
    Sha256::digest(key.expose().as_bytes()).into()
}

/// Generates a bearer key: the prefix and 32 random bytes in base64url.
pub fn generate_key() -> SecretString {
    use rand::RngCore;
    let mut bytes = [0u8; KEY_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let key = SecretString::new(format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)));
    zeroize::Zeroize::zeroize(&mut bytes);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let key = bearer_key(b"bearer stvk_abc").unwrap();
        assert_eq!(key.expose(), "stvk_abc");
        assert!(bearer_key(b"Bearer  stvk_abc").is_some());
        assert!(bearer_key(b"Basic dXNlcjpwYXNz").is_none());
        assert!(bearer_key(b"Bearer ").is_none());
        assert!(bearer_key(b"stvk_abc").is_none());
    }

    #[test]
    fn generated_keys_differ_and_hash() {
        let first = generate_key();
        let second = generate_key();
        assert!(first.expose().starts_with(KEY_PREFIX));
        assert_eq!(first.len(), KEY_PREFIX.len() + 43);
        assert!(!first.ct_eq(&second));
        assert_ne!(key_hash(&first), key_hash(&second));
    }

    #[test]
    fn identity_prefers_uri_then_dns_then_cn() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["svc.example".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "common-name");
        let dns_only = params.self_signed(&key).unwrap();
        assert_eq!(certificate_identity(dns_only.der()).unwrap(), "svc.example");

        params.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from("spiffe://acme/svc").unwrap(),
        ));
        let with_uri = params.self_signed(&key).unwrap();
        assert_eq!(
            certificate_identity(with_uri.der()).unwrap(),
            "spiffe://acme/svc"
        );

        params.subject_alt_names.clear();
        let cn_only = params.self_signed(&key).unwrap();
        assert_eq!(certificate_identity(cn_only.der()).unwrap(), "common-name");
    }
}
