//! The authorization policy: a TOML file naming each caller, by certificate
//! identity or by the SHA-256 hash of its bearer key, with its roles and,
//! for token callers, the tenants it may get tokens for.
//!
//! ```toml
//! [[caller]]
//! certificate = "spiffe://acme.example/billing-sync"
//! roles = ["token"]
//! tenants = [8450, 9001]
//!
//! [[caller]]
//! name = "ops-cli"
//! key_sha256 = "<64 hex digits printed by `stvault keygen`>"
//! roles = ["admin"]
//! ```

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::Deserialize;

/// Longest accepted caller name or certificate identity, in bytes.
const MAX_IDENTITY_BYTES: usize = 256;

/// A set of RPCs a caller may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Registers connections and reads or verifies them.
    Link,
    /// Every management RPC; no tokens.
    Admin,
    /// Access tokens for the caller's tenants.
    Token,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Link => "link",
            Role::Admin => "admin",
            Role::Token => "token",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "link" => Ok(Role::Link),
            "admin" => Ok(Role::Admin),
            "token" => Ok(Role::Token),
            other => Err(format!(
                "unknown role {other:?}; expected link, admin or token"
            )),
        }
    }
}

/// The tenants a token caller may get tokens for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tenants {
    All,
    Only(BTreeSet<i64>),
}

impl Tenants {
    pub fn contains(&self, tenant_id: i64) -> bool {
        match self {
            Tenants::All => true,
            Tenants::Only(ids) => ids.contains(&tenant_id),
        }
    }
}

/// Credential by which a caller proves its identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// A client certificate whose identity (URI SAN, DNS SAN or subject CN)
    /// equals this string.
    Certificate(String),
    /// A bearer key whose SHA-256 hash is this.
    KeyHash([u8; 32]),
}

/// One caller of the policy.
#[derive(Clone, Debug)]
pub struct CallerEntry {
    /// The name recorded in audit events and error messages: the
    /// certificate identity, or the `name` of a key caller.
    pub identity: String,
    pub credential: Credential,
    pub roles: BTreeSet<Role>,
    /// Empty unless the caller has the token role.
    pub tenants: Tenants,
}

impl CallerEntry {
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

/// A validated policy.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    callers: Vec<CallerEntry>,
    by_certificate: HashMap<String, usize>,
}

impl Policy {
    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Policy, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read policy file {}: {e}", path.display()))?;
        Policy::parse(&text).map_err(|e| format!("policy file {}: {e}", path.display()))
    }

    /// Parses and validates policy text, naming the entry at fault.
    pub fn parse(text: &str) -> Result<Policy, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut policy = Policy::default();
        let mut identities: HashMap<String, usize> = HashMap::new();
        let mut key_hashes: HashMap<[u8; 32], usize> = HashMap::new();
        for (index, raw) in file.caller.into_iter().enumerate() {
            let number = index + 1;
            let entry = raw.validate().map_err(|e| match e.identity {
                Some(identity) => format!("caller entry {number} ({identity}): {}", e.message),
                None => format!("caller entry {number}: {}", e.message),
            })?;
            if let Some(first) = identities.insert(entry.identity.clone(), number) {
                return Err(format!(
                    "caller entry {number}: duplicate caller {:?}, already named by entry {first}",
                    entry.identity
                ));
            }
            if let Credential::KeyHash(hash) = &entry.credential {
                if let Some(first) = key_hashes.insert(*hash, number) {
                    return Err(format!(
                        "caller entry {number} ({}): duplicate key_sha256, already used by entry {first}",
                        entry.identity
                    ));
                }
            }
            if let Credential::Certificate(identity) = &entry.credential {
                policy.by_certificate.insert(identity.clone(), index);
            }
            policy.callers.push(entry);
        }
        Ok(policy)
    }

    pub fn callers(&self) -> &[CallerEntry] {
        &self.callers
    }

    /// Finds the caller a certificate identity names.
    pub fn by_certificate(&self, identity: &str) -> Option<&CallerEntry> {
        self.by_certificate
            .get(identity)
            .map(|&index| &self.callers[index])
    }

    /// Finds the caller whose key hashes to `hash`. Every entry is compared
    /// in constant time, so the time taken does not depend on which entry
    /// matched.
    pub fn by_key_hash(&self, hash: &[u8; 32]) -> Option<&CallerEntry> {
        use subtle::ConstantTimeEq;
        let mut found = None;
        for entry in &self.callers {
            if let Credential::KeyHash(expected) = &entry.credential {
                if bool::from(expected.ct_eq(hash)) {
                    found = Some(entry);
                }
            }
        }
        found
    }

    /// Returns whether any caller authenticates with a client certificate.
    pub fn has_certificate_callers(&self) -> bool {
        !self.by_certificate.is_empty()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    caller: Vec<RawCaller>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCaller {
    name: Option<String>,
    certificate: Option<String>,
    key_sha256: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    tenants: Option<RawTenants>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawTenants {
    List(Vec<i64>),
    Wildcard(String),
}

/// A problem with one caller entry, and the caller's name once known.
struct EntryError {
    identity: Option<String>,
    message: String,
}

impl From<String> for EntryError {
    fn from(message: String) -> Self {
        Self {
            identity: None,
            message,
        }
    }
}

impl From<&str> for EntryError {
    fn from(message: &str) -> Self {
        message.to_owned().into()
    }
}

impl RawCaller {
    fn validate(self) -> Result<CallerEntry, EntryError> {
        let (identity, credential) = match (self.certificate, self.key_sha256, self.name) {
            (Some(certificate), None, None) => {
                check_identity("certificate", &certificate)?;
                (certificate.clone(), Credential::Certificate(certificate))
            }
            (Some(_), None, Some(_)) => {
                return Err(
                    "name is only for key_sha256 callers; a certificate caller is named by its \
                     certificate identity"
                        .into(),
                );
            }
            (None, Some(hash), Some(name)) => {
                check_identity("name", &name)?;
                let hash = parse_key_hash(&hash).map_err(|message| EntryError {
                    identity: Some(name.clone()),
                    message,
                })?;
                (name, Credential::KeyHash(hash))
            }
            (None, Some(_), None) => {
                return Err("a key_sha256 caller needs a name for audit events and errors".into());
            }
            (Some(_), Some(_), _) => {
                return Err("set either certificate or key_sha256, not both".into());
            }
            (None, None, _) => return Err("set certificate or key_sha256".into()),
        };
        let context = |message: String| EntryError {
            identity: Some(identity.clone()),
            message,
        };

        if self.roles.is_empty() {
            return Err(context(
                "roles is empty; list one or more of link, admin, token".into(),
            ));
        }
        let mut roles = BTreeSet::new();
        for role in &self.roles {
            roles.insert(role.parse::<Role>().map_err(context)?);
        }

        let tenants = match (roles.contains(&Role::Token), self.tenants) {
            (true, Some(RawTenants::Wildcard(text))) if text == "*" => Tenants::All,
            (true, Some(RawTenants::Wildcard(text))) => {
                return Err(context(format!(
                    "tenants must be a list of tenant ids or \"*\", not {text:?}"
                )));
            }
            (true, Some(RawTenants::List(ids))) => {
                if ids.is_empty() {
                    return Err(context(
                        "tenants is empty; list tenant ids or \"*\" for every tenant".into(),
                    ));
                }
                if let Some(bad) = ids.iter().find(|&&id| id <= 0) {
                    return Err(context(format!(
                        "tenant id {bad} is not a positive ServiceTitan tenant id"
                    )));
                }
                Tenants::Only(ids.into_iter().collect())
            }
            (true, None) => {
                return Err(context(
                    "a token caller needs tenants: a list of tenant ids or \"*\"".into(),
                ));
            }
            (false, Some(_)) => {
                return Err(context(
                    "tenants applies only to the token role; add \"token\" to roles or remove tenants"
                        .into(),
                ));
            }
            (false, None) => Tenants::Only(BTreeSet::new()),
        };
        Ok(CallerEntry {
            identity,
            credential,
            roles,
            tenants,
        })
    }
}

fn check_identity(field: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{field} is empty"));
    }
    if value.len() > MAX_IDENTITY_BYTES {
        return Err(format!("{field} is longer than {MAX_IDENTITY_BYTES} bytes"));
    }
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "{field} {value:?} contains whitespace or control characters"
        ));
    }
    Ok(())
}

/// Parses a hex SHA-256 hash as printed by `stvault keygen`.
fn parse_key_hash(text: &str) -> Result<[u8; 32], String> {
    let malformed = || {
        "key_sha256 is malformed: expected 64 hex digits, the SHA-256 hash printed by \
         `stvault keygen`"
            .to_owned()
    };
    if text.len() != 64 {
        return Err(malformed());
    }
    let bytes = hex::decode(text).map_err(|_| malformed())?;
    bytes.try_into().map_err(|_| malformed())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH_A: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const HASH_B: &str = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";

    #[test]
    fn parses_certificate_and_key_callers() {
        let policy = Policy::parse(&format!(
            r#"
            [[caller]]
            certificate = "spiffe://acme/billing"
            roles = ["token"]
            tenants = [8450, 9001]

            [[caller]]
            name = "ops"
            key_sha256 = "{HASH_A}"
            roles = ["admin", "token"]
            tenants = "*"
            "#
        ))
        .expect("valid policy");
        let billing = policy.by_certificate("spiffe://acme/billing").unwrap();
        assert!(billing.has_role(Role::Token));
        assert!(billing.tenants.contains(8450));
        assert!(!billing.tenants.contains(1));
        let hash: [u8; 32] = hex::decode(HASH_A).unwrap().try_into().unwrap();
        let ops = policy.by_key_hash(&hash).unwrap();
        assert_eq!(ops.identity, "ops");
        assert!(ops.tenants.contains(123));
        assert!(policy.has_certificate_callers());
    }

    #[test]
    fn empty_policy_denies_everyone() {
        let policy = Policy::parse("").unwrap();
        assert!(policy.callers().is_empty());
        assert!(policy.by_certificate("anyone").is_none());
    }

    fn error_of(text: &str) -> String {
        Policy::parse(text).expect_err("invalid policy")
    }

    #[test]
    fn unknown_role_names_entry() {
        let error = error_of(&format!(
            "[[caller]]\nname = \"a\"\nkey_sha256 = \"{HASH_A}\"\nroles = [\"link\"]\n\
             [[caller]]\nname = \"b\"\nkey_sha256 = \"{HASH_B}\"\nroles = [\"root\"]\n"
        ));
        assert!(error.contains("caller entry 2 (b)"), "{error}");
        assert!(error.contains("unknown role \"root\""), "{error}");
    }

    #[test]
    fn duplicate_caller_names_both_entries() {
        let error = error_of(
            "[[caller]]\ncertificate = \"svc\"\nroles = [\"link\"]\n\
             [[caller]]\ncertificate = \"svc\"\nroles = [\"admin\"]\n",
        );
        assert!(error.contains("caller entry 2"), "{error}");
        assert!(error.contains("duplicate caller \"svc\""), "{error}");
        assert!(error.contains("entry 1"), "{error}");
    }

    #[test]
    fn duplicate_key_hash_rejected() {
        let error = error_of(&format!(
            "[[caller]]\nname = \"a\"\nkey_sha256 = \"{HASH_A}\"\nroles = [\"link\"]\n\
             [[caller]]\nname = \"b\"\nkey_sha256 = \"{HASH_A}\"\nroles = [\"admin\"]\n"
        ));
        assert!(error.contains("caller entry 2 (b)"), "{error}");
        assert!(error.contains("duplicate key_sha256"), "{error}");
    }

    #[test]
    fn malformed_hash_names_entry() {
        for hash in ["abc", &HASH_A.replace('9', "z"), &format!("{HASH_A}00")] {
            let error = error_of(&format!(
                "[[caller]]\nname = \"ops\"\nkey_sha256 = \"{hash}\"\nroles = [\"admin\"]\n"
            ));
            assert!(error.contains("caller entry 1 (ops)"), "{error}");
            assert!(error.contains("key_sha256 is malformed"), "{error}");
        }
    }

    #[test]
    fn token_role_requires_tenants() {
        let error = error_of("[[caller]]\ncertificate = \"svc\"\nroles = [\"token\"]\n");
        assert!(error.contains("needs tenants"), "{error}");
        let error =
            error_of("[[caller]]\ncertificate = \"svc\"\nroles = [\"token\"]\ntenants = []\n");
        assert!(error.contains("tenants is empty"), "{error}");
        let error =
            error_of("[[caller]]\ncertificate = \"svc\"\nroles = [\"token\"]\ntenants = \"all\"\n");
        assert!(error.contains("\"*\""), "{error}");
        let error =
            error_of("[[caller]]\ncertificate = \"svc\"\nroles = [\"token\"]\ntenants = [0]\n");
        assert!(error.contains("tenant id 0"), "{error}");
    }

    #[test]
    fn tenants_without_token_role_rejected() {
        let error =
            error_of("[[caller]]\ncertificate = \"svc\"\nroles = [\"admin\"]\ntenants = \"*\"\n");
        assert!(error.contains("only to the token role"), "{error}");
    }

    #[test]
    fn entry_shape_rules() {
        assert!(error_of("[[caller]]\nroles = [\"admin\"]\n").contains("set certificate"));
        assert!(
            error_of(&format!(
                "[[caller]]\nkey_sha256 = \"{HASH_A}\"\nroles = [\"admin\"]\n"
            ))
            .contains("needs a name")
        );
        assert!(
            error_of("[[caller]]\ncertificate = \"svc\"\nroles = []\n").contains("roles is empty")
        );
        assert!(
            error_of("[[caller]]\ncertificate = \"svc\"\nrole = [\"admin\"]\n")
                .contains("unknown field")
        );
        assert!(
            error_of("[[caller]]\ncertificate = \"a b\"\nroles = [\"admin\"]\n")
                .contains("whitespace")
        );
    }
}
