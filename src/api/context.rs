//! Per-request context: the request id, the peer, the ids an RPC names or
//! resolves, and the audit event built from them when the RPC finishes.

use std::sync::{Arc, Mutex};

use tonic::metadata::MetadataMap;
use tonic::{Code, Request};

use crate::audit::EventDraft;
use crate::auth::{AuthMethod, Caller, Rpc};
use crate::model::Environment;
use crate::pb;
use crate::store::ConnectionRecord;

/// Metadata key of the request id, read from the request when a client
/// sets a usable one and sent back on every response.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
const MAX_REQUEST_ID_BYTES: usize = 128;

/// Ids an RPC concerns, for its audit event.
#[derive(Clone, Debug, Default)]
pub struct Subject {
    pub connection_id: Option<String>,
    pub environment: Option<Environment>,
    pub tenant_id: Option<i64>,
    pub credential_version: Option<u32>,
}

/// The store of what the `record_*` functions learn during one call.
struct Recording {
    subject: Arc<Mutex<Subject>>,
    /// Whether ids are also recorded in the call's span as they become
    /// known, or only once the call ends (see `VaultService::observe`).
    in_span: bool,
}

tokio::task_local! {
    static RECORDING: Recording;
}

/// Runs `future` with `subject` as the place where `record_*` store ids,
/// and with them the current span when `in_span` is set.
pub async fn with_subject<F: Future>(
    subject: Arc<Mutex<Subject>>,
    in_span: bool,
    future: F,
) -> F::Output {
    RECORDING
        .scope(Recording { subject, in_span }, future)
        .await
}

/// Applies `change` to the call's subject, and returns whether ids go to
/// the span as well. Outside an RPC (as in direct calls from tests) there
/// is nothing to update.
fn update(change: impl FnOnce(&mut Subject)) -> bool {
    RECORDING
        .try_with(|recording| {
            change(
                &mut recording
                    .subject
                    .lock()
                    .expect("the subject lock is never poisoned"),
            );
            recording.in_span
        })
        .unwrap_or(true)
}

/// Records the connection an RPC acted on, in its span and audit event.
pub fn record_connection(record: &ConnectionRecord) {
    record_ids(&record.id, record.environment, record.tenant_id);
}

/// Records a connection's ids in the RPC's span and audit event.
pub fn record_ids(connection_id: &str, environment: Environment, tenant_id: i64) {
    // The log formatter appends every value recorded, so a field already
    // recorded with the same value is left alone.
    let (mut known_id, mut known_tenant) = (None, None);
    let in_span = update(|subject| {
        known_id = subject.connection_id.replace(connection_id.to_owned());
        known_tenant = subject.tenant_id.replace(tenant_id);
        subject.environment = Some(environment);
    });
    if !in_span {
        return;
    }
    let span = tracing::Span::current();
    if known_id.as_deref() != Some(connection_id) {
        span.record("connection.id", connection_id);
    }
    if known_tenant != Some(tenant_id) {
        span.record("tenant.id", tenant_id);
    }
}

/// Records the connection id an RPC names, before it is looked up.
pub fn record_connection_id(connection_id: &str) {
    if update(|subject| subject.connection_id = Some(connection_id.to_owned())) {
        tracing::Span::current().record("connection.id", connection_id);
    }
}

/// Records the environment and tenant an RPC names, before any lookup.
pub fn record_tenant(environment: Environment, tenant_id: i64) {
    let in_span = update(|subject| {
        subject.environment = Some(environment);
        subject.tenant_id = Some(tenant_id);
    });
    if in_span {
        tracing::Span::current().record("tenant.id", tenant_id);
    }
}

/// Records the credential version a token was minted from, or that an RPC
/// made current.
pub fn record_credential_version(version: u32) {
    if update(|subject| subject.credential_version = Some(version)) {
        tracing::Span::current().record("credential.version", version);
    }
}

/// Request details known before the handler runs.
pub struct CallInfo {
    pub rpc: Rpc,
    pub request_id: String,
    pub peer: Option<String>,
    /// Ids the request names, as far as they are valid.
    pub named: Subject,
}

impl CallInfo {
    pub fn new<T: Names>(rpc: Rpc, request: &Request<T>) -> Self {
        Self {
            rpc,
            request_id: request_id(request.metadata()),
            peer: request.remote_addr().map(|addr| addr.to_string()),
            named: request.get_ref().names(),
        }
    }

    /// Builds the audit event of the finished call.
    pub fn event(
        &self,
        caller: Option<&Caller>,
        method: AuthMethod,
        subject: Subject,
        code: Code,
    ) -> EventDraft {
        EventDraft {
            request_id: self.request_id.clone(),
            caller: caller.map(|c| c.identity.clone()).unwrap_or_default(),
            auth_method: method.as_str().to_owned(),
            peer: self.peer.clone(),
            rpc: self.rpc.as_str().to_owned(),
            connection_id: subject.connection_id,
            environment: subject.environment,
            tenant_id: subject.tenant_id,
            credential_version: subject.credential_version,
            code: code_name(code).to_owned(),
        }
    }
}

/// Returns the client's request id when it is short and printable, else a
/// new UUIDv7.
fn request_id(metadata: &MetadataMap) -> String {
    let supplied = metadata
        .get(REQUEST_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|id| {
            !id.is_empty()
                && id.len() <= MAX_REQUEST_ID_BYTES
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        });
    match supplied {
        Some(id) => id.to_owned(),
        None => uuid::Uuid::now_v7().to_string(),
    }
}

/// Returns the canonical gRPC name of a status code.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Ids a request names, recorded even when the call is denied before its
/// handler runs. Invalid values are left out.
pub trait Names {
    fn names(&self) -> Subject {
        Subject::default()
    }
}

fn connection_id(value: &str) -> Option<String> {
    uuid::Uuid::try_parse(value)
        .ok()
        .map(|id| id.hyphenated().to_string())
}

fn environment(value: i32) -> Option<Environment> {
    match pb::Environment::try_from(value) {
        Ok(pb::Environment::Production) => Some(Environment::Production),
        Ok(pb::Environment::Integration) => Some(Environment::Integration),
        _ => None,
    }
}

fn tenant_id(value: i64) -> Option<i64> {
    (value > 0).then_some(value)
}

fn by_connection(id: &str) -> Subject {
    Subject {
        connection_id: connection_id(id),
        ..Default::default()
    }
}

fn by_tenant(environment_value: i32, tenant_value: i64) -> Subject {
    Subject {
        environment: environment(environment_value),
        tenant_id: tenant_id(tenant_value),
        ..Default::default()
    }
}

impl Names for pb::RegisterConnectionRequest {
    fn names(&self) -> Subject {
        by_tenant(self.environment, self.tenant_id)
    }
}

impl Names for pb::ListConnectionsRequest {
    fn names(&self) -> Subject {
        by_tenant(self.environment, self.tenant_id)
    }
}

impl Names for pb::UpdateConnectionRequest {
    fn names(&self) -> Subject {
        self.connection
            .as_ref()
            .map(|connection| by_connection(&connection.connection_id))
            .unwrap_or_default()
    }
}

impl Names for pb::WatchConnectionStatusRequest {
    fn names(&self) -> Subject {
        Subject {
            connection_id: connection_id(&self.connection_id),
            ..by_tenant(self.environment, self.tenant_id)
        }
    }
}

impl Names for pb::GetAccessTokenRequest {
    fn names(&self) -> Subject {
        Subject {
            connection_id: connection_id(&self.connection_id),
            ..by_tenant(self.environment, self.tenant_id)
        }
    }
}

/// Audit queries record no ids, so filtering events by a tenant does not
/// return the queries about it.
impl Names for pb::ListAuditEventsRequest {}
impl Names for pb::CreateBackupRequest {}

macro_rules! names_connection {
    ($($request:ty),*) => {
        $(impl Names for $request {
            fn names(&self) -> Subject {
                by_connection(&self.connection_id)
            }
        })*
    };
}

names_connection!(
    pb::GetConnectionRequest,
    pb::RotateCredentialsRequest,
    pb::RollbackCredentialsRequest,
    pb::VerifyConnectionRequest,
    pb::DeleteConnectionRequest
);
