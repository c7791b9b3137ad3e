//! Caller identity and authorization: who is calling (client certificate or
//! bearer key), and whether the policy lets that caller use an RPC or get
//! tokens for a tenant. The policy reloads on SIGHUP.

pub mod identity;
pub mod policy;
pub mod shared;
pub mod tls;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tonic::Status;
use tonic::metadata::MetadataMap;

use policy::{CallerEntry, Policy, Role};

/// Identity recorded for callers when no policy is configured.
pub const ANONYMOUS: &str = "anonymous";

/// The RPCs of `stvault.v1.CredentialVault`, with the roles that allow each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rpc {
    RegisterConnection,
    GetConnection,
    ListConnections,
    RotateCredentials,
    RollbackCredentials,
    VerifyConnection,
    DeleteConnection,
    GetAccessToken,
    UpdateConnection,
    WatchConnectionStatus,
    ListAuditEvents,
    CreateBackup,
}

impl Rpc {
    pub const ALL: [Rpc; 12] = [
        Rpc::RegisterConnection,
        Rpc::GetConnection,
        Rpc::ListConnections,
        Rpc::RotateCredentials,
        Rpc::RollbackCredentials,
        Rpc::VerifyConnection,
        Rpc::DeleteConnection,
        Rpc::GetAccessToken,
        Rpc::UpdateConnection,
        Rpc::WatchConnectionStatus,
        Rpc::ListAuditEvents,
        Rpc::CreateBackup,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rpc::RegisterConnection => "RegisterConnection",
            Rpc::GetConnection => "GetConnection",
            Rpc::ListConnections => "ListConnections",
            Rpc::RotateCredentials => "RotateCredentials",
            Rpc::RollbackCredentials => "RollbackCredentials",
            Rpc::VerifyConnection => "VerifyConnection",
            Rpc::DeleteConnection => "DeleteConnection",
            Rpc::GetAccessToken => "GetAccessToken",
            Rpc::UpdateConnection => "UpdateConnection",
            Rpc::WatchConnectionStatus => "WatchConnectionStatus",
            Rpc::ListAuditEvents => "ListAuditEvents",
            Rpc::CreateBackup => "CreateBackup",
        }
    }

    /// Roles that allow this RPC. Registration belongs to `link` alone, and
    /// tokens to `token` alone, so an admin cannot mint tokens.
    pub fn roles(self) -> &'static [Role] {
        match self {
            Rpc::RegisterConnection => &[Role::Link],
            Rpc::GetConnection | Rpc::VerifyConnection => &[Role::Link, Role::Admin],
            Rpc::ListConnections
            | Rpc::RotateCredentials
            | Rpc::RollbackCredentials
            | Rpc::DeleteConnection
            | Rpc::UpdateConnection
            | Rpc::WatchConnectionStatus
            | Rpc::ListAuditEvents
            | Rpc::CreateBackup => &[Role::Admin],
            Rpc::GetAccessToken => &[Role::Token],
        }
    }
}

impl fmt::Display for Rpc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Authentication method of a request's caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    Certificate,
    BearerKey,
    /// No credentials were presented or needed.
    None,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Certificate => "certificate",
            AuthMethod::BearerKey => "bearer_key",
            AuthMethod::None => "none",
        }
    }
}

/// Permissions the policy grants a caller.
#[derive(Clone, Debug)]
enum Grant {
    /// No policy is configured: every RPC and tenant is allowed.
    Everything,
    /// A caller of the policy.
    Entry(CallerEntry),
    /// A valid client certificate whose identity the policy does not name.
    Nothing,
}

/// The authenticated caller of one request.
#[derive(Clone)]
pub struct Caller {
    /// Certificate identity, policy name of a key caller, or `anonymous`.
    pub identity: String,
    pub method: AuthMethod,
    grant: Grant,
    /// The SHA-256 of the bearer key presented, to find the caller again in
    /// a reloaded policy.
    key_hash: Option<[u8; 32]>,
}

impl std::fmt::Debug for Caller {
    // Leaves out the key hash.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("identity", &self.identity)
            .field("method", &self.method)
            .field("grant", &self.grant)
            .finish_non_exhaustive()
    }
}

impl Caller {
    /// Checks that the caller may call `rpc` at all.
    pub fn authorize(&self, rpc: Rpc) -> Result<(), Status> {
        let allowed = match &self.grant {
            Grant::Everything => true,
            Grant::Entry(entry) => rpc.roles().iter().any(|&role| entry.has_role(role)),
            Grant::Nothing => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(self.denied(rpc, ""))
        }
    }

    /// Checks that the caller may get tokens for `tenant_id`.
    pub fn authorize_tenant(&self, rpc: Rpc, tenant_id: i64) -> Result<(), Status> {
        if self.may_use_tenant(tenant_id) {
            Ok(())
        } else {
            Err(self.denied(rpc, &format!(" for tenant {tenant_id}")))
        }
    }

    /// Returns whether the caller may get tokens for every tenant, in which
    /// case resolving a connection id needs no tenant check.
    pub fn has_all_tenants(&self) -> bool {
        match &self.grant {
            Grant::Everything => true,
            Grant::Entry(entry) => entry.tenants == policy::Tenants::All,
            Grant::Nothing => false,
        }
    }

    pub fn may_use_tenant(&self, tenant_id: i64) -> bool {
        match &self.grant {
            Grant::Everything => true,
            Grant::Entry(entry) => entry.tenants.contains(tenant_id),
            Grant::Nothing => false,
        }
    }

    /// Builds a `PERMISSION_DENIED` naming the caller and the RPC, with
    /// `target` (such as " for tenant 8450") appended.
    pub fn denied(&self, rpc: Rpc, target: &str) -> Status {
        Status::permission_denied(format!(
            "caller {:?} is not allowed to call {rpc}{target}",
            self.identity
        ))
    }
}

/// Credentials taken from a request before it is authenticated.
pub struct Presented<'a> {
    pub metadata: &'a MetadataMap,
    /// DER certificates of the TLS peer, end entity first.
    pub peer_certificates: Option<&'a [tonic::transport::CertificateDer<'static>]>,
}

/// Rejection of a request that could not be authenticated.
pub struct Unauthenticated {
    pub method: AuthMethod,
    pub status: Status,
}

/// Authenticates callers against the current policy.
pub struct Authenticator {
    mode: Mode,
}

enum Mode {
    Open,
    Enforced {
        path: PathBuf,
        policy: RwLock<Arc<Policy>>,
    },
}

impl Authenticator {
    /// Creates an authenticator that lets every caller do everything.
    pub fn open() -> Self {
        Self { mode: Mode::Open }
    }

    /// Creates an authenticator enforcing `policy`, read again from `path`
    /// on reload.
    pub fn enforcing(path: PathBuf, policy: Policy) -> Self {
        Self {
            mode: Mode::Enforced {
                path,
                policy: RwLock::new(Arc::new(policy)),
            },
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self.mode, Mode::Open)
    }

    pub fn policy_path(&self) -> Option<&Path> {
        match &self.mode {
            Mode::Open => None,
            Mode::Enforced { path, .. } => Some(path),
        }
    }

    fn policy(&self) -> Option<Arc<Policy>> {
        match &self.mode {
            Mode::Open => None,
            Mode::Enforced { policy, .. } => Some(
                policy
                    .read()
                    .expect("the policy lock is never held across a panic")
                    .clone(),
            ),
        }
    }

    /// Re-reads the policy file. An invalid file leaves the current policy
    /// in force and returns why. Returns the text now in force.
    pub fn reload(&self) -> Result<Reloaded, String> {
        let Mode::Enforced { path, .. } = &self.mode else {
            return Err("no policy file is configured".into());
        };
        let document = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read policy file {}: {e}", path.display()))?;
        let callers = self
            .install(&document)
            .map_err(|e| format!("policy file {}: {e}", path.display()))?;
        Ok(Reloaded { callers, document })
    }

    /// Enforces the policy `document`, such as one another replica loaded.
    /// Invalid text leaves the current policy in force and returns why;
    /// an open authenticator stays open. Returns the number of callers.
    pub fn install(&self, document: &str) -> Result<usize, String> {
        let Mode::Enforced { policy, .. } = &self.mode else {
            return Err("no policy file is configured".into());
        };
        let next = Policy::parse(document)?;
        let callers = next.callers().len();
        *policy
            .write()
            .expect("the policy lock is never held across a panic") = Arc::new(next);
        Ok(callers)
    }

    /// Checks a caller authenticated earlier against the policy in force
    /// now, for requests that outlive a policy reload, such as status
    /// watches. A caller the policy no longer names is UNAUTHENTICATED; one
    /// that lost the role for `rpc` is PERMISSION_DENIED.
    pub fn recheck(&self, caller: &Caller, rpc: Rpc) -> Result<(), Status> {
        let Some(policy) = self.policy() else {
            return caller.authorize(rpc);
        };
        let entry = match (caller.method, &caller.key_hash) {
            (AuthMethod::BearerKey, Some(hash)) => policy.by_key_hash(hash),
            (AuthMethod::Certificate, _) => policy.by_certificate(&caller.identity),
            _ => None,
        };
        let Some(entry) = entry else {
            return Err(Status::unauthenticated(
                "the caller was removed from the policy; this stream has ended",
            ));
        };
        let current = Caller {
            grant: Grant::Entry(entry.clone()),
            ..caller.clone()
        };
        current.authorize(rpc)
    }

    /// Identifies the caller of a request. A bearer key, when present,
    /// takes precedence over a client certificate.
    pub fn authenticate(&self, presented: &Presented<'_>) -> Result<Caller, Unauthenticated> {
        let certificate = match presented.peer_certificates.and_then(|c| c.first()) {
            Some(der) => match identity::certificate_identity(der) {
                Ok(identity) => Some(identity),
                Err(reason) => {
                    return Err(Unauthenticated {
                        method: AuthMethod::Certificate,
                        status: Status::unauthenticated(reason),
                    });
                }
            },
            None => None,
        };
        let Some(policy) = self.policy() else {
            return Ok(Caller {
                identity: certificate.unwrap_or_else(|| ANONYMOUS.to_owned()),
                method: AuthMethod::None,
                grant: Grant::Everything,
                key_hash: None,
            });
        };

        if let Some(value) = presented.metadata.get("authorization") {
            let rejected = |message: &str| Unauthenticated {
                method: AuthMethod::BearerKey,
                status: Status::unauthenticated(message),
            };
            // Proxies and servers disagree on which of several copies
            // counts, so none does.
            if presented.metadata.get_all("authorization").iter().count() > 1 {
                return Err(rejected(
                    "send one authorization metadata entry; this request carried several",
                ));
            }
            let Some(key) = identity::bearer_key(value.as_bytes()) else {
                return Err(rejected(
                    "authorization metadata must have the form \"Bearer <key>\"",
                ));
            };
            let hash = identity::key_hash(&key);
            return match policy.by_key_hash(&hash) {
                Some(entry) => Ok(Caller {
                    identity: entry.identity.clone(),
                    method: AuthMethod::BearerKey,
                    grant: Grant::Entry(entry.clone()),
                    key_hash: Some(hash),
                }),
                None => Err(rejected("the bearer key is not recognised")),
            };
        }

        if let Some(identity) = certificate {
            let grant = match policy.by_certificate(&identity) {
                Some(entry) => Grant::Entry(entry.clone()),
                None => Grant::Nothing,
            };
            return Ok(Caller {
                identity,
                method: AuthMethod::Certificate,
                grant,
                key_hash: None,
            });
        }
        Err(Unauthenticated {
            method: AuthMethod::None,
            status: Status::unauthenticated(
                "no credentials: present a client certificate or authorization: Bearer <key> metadata",
            ),
        })
    }
}

/// A policy file read again and now in force.
pub struct Reloaded {
    pub callers: usize,
    /// The file's text, for replicas that share it.
    pub document: String,
}

/// Reloads the policy on every SIGHUP until the process exits, and passes
/// each policy put in force to `on_reload`. A reload that fails keeps the
/// previous policy and logs why; open connections stay up either way, and
/// their next calls use the new policy.
pub async fn reload_on_sighup(auth: Arc<Authenticator>, on_reload: impl Fn(String)) {
    use tokio::signal::unix::{SignalKind, signal};
    let Some(path) = auth.policy_path().map(Path::to_path_buf) else {
        return;
    };
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => hangup,
        Err(error) => {
            tracing::error!(%error, "cannot install a SIGHUP handler; the policy will not reload");
            return;
        }
    };
    while hangup.recv().await.is_some() {
        match auth.reload() {
            Ok(reloaded) => {
                tracing::info!(
                    policy = %path.display(),
                    callers = reloaded.callers,
                    "policy reloaded"
                );
                on_reload(reloaded.document);
            }
            Err(error) => tracing::error!(
                policy = %path.display(),
                %error,
                "policy reload failed; the previous policy stays in force"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy_with_key(key: &crate::secret::SecretString) -> Policy {
        Policy::parse(&format!(
            r#"
            [[caller]]
            name = "ops"
            key_sha256 = "{}"
            roles = ["admin"]

            [[caller]]
            certificate = "spiffe://acme/billing"
            roles = ["token"]
            tenants = [8450]
            "#,
            hex::encode(identity::key_hash(key))
        ))
        .unwrap()
    }

    fn authenticate(
        auth: &Authenticator,
        header: Option<&str>,
        certificate: Option<&rcgen::Certificate>,
    ) -> Result<Caller, Unauthenticated> {
        let mut metadata = MetadataMap::new();
        if let Some(header) = header {
            metadata.insert("authorization", header.parse().unwrap());
        }
        let certificates: Option<Vec<tonic::transport::CertificateDer<'static>>> =
            certificate.map(|c| vec![c.der().clone()]);
        auth.authenticate(&Presented {
            metadata: &metadata,
            peer_certificates: certificates.as_deref(),
        })
    }

    fn certificate(uri: &str) -> rcgen::Certificate {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(uri).unwrap(),
        ));
        params.self_signed(&key).unwrap()
    }

    #[test]
    fn roles_map_to_rpcs() {
        let key = identity::generate_key();
        let auth = Authenticator::enforcing("unused".into(), policy_with_key(&key));
        let ops = authenticate(&auth, Some(&format!("Bearer {}", key.expose())), None)
            .ok()
            .unwrap();
        assert_eq!(ops.identity, "ops");
        assert_eq!(ops.method, AuthMethod::BearerKey);
        for rpc in Rpc::ALL {
            let expected = !matches!(rpc, Rpc::RegisterConnection | Rpc::GetAccessToken);
            assert_eq!(ops.authorize(rpc).is_ok(), expected, "{rpc}");
        }
        let denied = ops.authorize(Rpc::GetAccessToken).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            denied.message(),
            "caller \"ops\" is not allowed to call GetAccessToken"
        );
    }

    #[test]
    fn certificate_caller_limited_to_tenants() {
        let auth =
            Authenticator::enforcing("unused".into(), policy_with_key(&identity::generate_key()));
        let billing = authenticate(&auth, None, Some(&certificate("spiffe://acme/billing")))
            .ok()
            .unwrap();
        assert_eq!(billing.method, AuthMethod::Certificate);
        assert!(billing.authorize(Rpc::GetAccessToken).is_ok());
        assert!(billing.authorize(Rpc::GetConnection).is_err());
        assert!(billing.authorize_tenant(Rpc::GetAccessToken, 8450).is_ok());
        let denied = billing
            .authorize_tenant(Rpc::GetAccessToken, 9001)
            .unwrap_err();
        assert_eq!(
            denied.message(),
            "caller \"spiffe://acme/billing\" is not allowed to call GetAccessToken for tenant 9001"
        );
        assert!(!billing.has_all_tenants());
    }

    #[test]
    fn unlisted_certificate_is_denied_everything() {
        let auth =
            Authenticator::enforcing("unused".into(), policy_with_key(&identity::generate_key()));
        let stranger = authenticate(&auth, None, Some(&certificate("spiffe://acme/other")))
            .ok()
            .unwrap();
        for rpc in Rpc::ALL {
            assert_eq!(
                stranger.authorize(rpc).unwrap_err().code(),
                tonic::Code::PermissionDenied
            );
        }
    }

    #[test]
    fn missing_or_wrong_credentials_unauthenticated() {
        let auth =
            Authenticator::enforcing("unused".into(), policy_with_key(&identity::generate_key()));
        for header in [None, Some("Bearer stvk_wrong"), Some("Basic abc")] {
            let Err(rejected) = authenticate(&auth, header, None) else {
                panic!("{header:?} authenticated");
            };
            assert_eq!(rejected.status.code(), tonic::Code::Unauthenticated);
            assert!(!rejected.status.message().contains("stvk_wrong"));
        }
    }

    #[test]
    fn repeated_authorization_unauthenticated() {
        let key = identity::generate_key();
        let auth = Authenticator::enforcing("unused".into(), policy_with_key(&key));
        let mut metadata = MetadataMap::new();
        let valid = format!("Bearer {}", key.expose());
        metadata.append("authorization", valid.parse().unwrap());
        metadata.append("authorization", "Bearer stvk_other".parse().unwrap());

        let result = auth.authenticate(&Presented {
            metadata: &metadata,
            peer_certificates: None,
        });

        let Err(rejected) = result else {
            panic!("two authorization entries authenticated");
        };
        assert_eq!(rejected.status.code(), tonic::Code::Unauthenticated);
        assert!(rejected.status.message().contains("several"));
    }

    #[test]
    fn open_mode_allows_everything() {
        let auth = Authenticator::open();
        let caller = authenticate(&auth, None, None).ok().unwrap();
        assert_eq!(caller.identity, ANONYMOUS);
        for rpc in Rpc::ALL {
            assert!(caller.authorize(rpc).is_ok());
        }
        assert!(caller.has_all_tenants());
    }
}
