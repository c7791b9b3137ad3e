//! Types for values that must never reach a log, an error message or a
//! `Debug` dump: client secrets, app keys, access tokens and keys.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// A secret string, zeroized on drop, printed by `Debug` as a redaction.
///
/// It has no `Display`, `Serialize` or `PartialEq`, so a secret cannot be
/// formatted, serialized or compared in variable time by accident.
#[derive(Clone, Default, Zeroize, ZeroizeOnDrop)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// Returns the secret itself, for the few places that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Compares two secrets in time independent of where they differ.
    pub fn ct_eq(&self, other: &SecretString) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }

    /// Returns the last four characters, or nothing for a value shorter
    /// than 12, of which four would be too large a part.
    pub fn hint(&self) -> String {
        let chars: Vec<char> = self.0.chars().collect();
        if chars.len() < 12 {
            return String::new();
        }
        chars[chars.len() - 4..].iter().collect()
    }
}

impl From<String> for SecretString {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(<redacted>)")
    }
}

/// Secret bytes such as a key, zeroized on drop and redacted in `Debug`.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    pub fn new(value: Vec<u8>) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let secret = SecretString::new("cs1.sentinel".into());
        assert!(!format!("{secret:?}").contains("sentinel"));
        let bytes = SecretBytes::new(b"sentinel".to_vec());
        assert!(!format!("{bytes:?}").contains("sentinel"));
    }

    #[test]
    fn hint_takes_last_four_characters() {
        assert_eq!(SecretString::new("ak1.abcdefgh".into()).hint(), "efgh");
        assert_eq!(SecretString::new("ak1.abcdefg".into()).hint(), "");
        assert_eq!(SecretString::new("xy".into()).hint(), "");
        assert_eq!(SecretString::new("ak1.abcd€déf".into()).hint(), "€déf");
    }

    #[test]
    fn ct_eq_compares_whole_value() {
        let a = SecretString::new("same".into());
        assert!(a.ct_eq(&SecretString::new("same".into())));
        assert!(!a.ct_eq(&SecretString::new("sam".into())));
        assert!(!a.ct_eq(&SecretString::new("samE".into())));
    }
}
