//! The gRPC service: authenticates and authorizes each call, validates
//! requests, calls the vault, converts the results and appends one audit
//! event per call. Errors become statuses in `status`.

mod audit;
pub mod context;
mod convert;
pub mod status;
pub mod validate;
mod watch;

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use crate::audit::AuditLog;
use crate::auth::{Authenticator, Caller, Presented, Rpc};
use crate::pb;
use crate::pb::credential_vault_server::CredentialVault;
use crate::vault::{NewConnection, Rotation, SettingsUpdate, Vault};

use context::{CallInfo, Subject, record_connection, record_credential_version};
use status::to_status;

/// Time kept back from a caller's gRPC deadline to send UNAVAILABLE in.
const DEADLINE_MARGIN: Duration = Duration::from_millis(200);

#[derive(Clone)]
pub struct VaultService {
    vault: Arc<Vault>,
    auth: Arc<Authenticator>,
    audit: Arc<AuditLog>,
}

impl VaultService {
    pub fn new(vault: Arc<Vault>, auth: Arc<Authenticator>, audit: Arc<AuditLog>) -> Self {
        Self { vault, auth, audit }
    }

    /// Runs one RPC: authenticates and authorizes the caller, runs `handler`
    /// inside a span, appends the audit event and logs the outcome with the
    /// caller, ids (recorded by the handler once known), code and latency.
    ///
    /// The response is released only after its audit event is on disk,
    /// committed to PostgreSQL or, while PostgreSQL is unreachable, synced
    /// to the local spool. If the event cannot be written, the call fails
    /// with `UNAVAILABLE`. While appends keep failing, calls are rejected
    /// before they act.
    pub(crate) async fn observe<R, T, F, Fut>(
        &self,
        rpc: Rpc,
        request: Request<R>,
        handler: F,
    ) -> Result<Response<T>, Status>
    where
        R: context::Names,
        F: FnOnce(Caller, Request<R>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let call = CallInfo::new(rpc, &request);
        let defer_fields = defers_span_fields(rpc);
        let span = tracing::info_span!(
            "rpc",
            rpc.method = rpc.as_str(),
            request.id = call.request_id.as_str(),
            caller = tracing::field::Empty,
            connection.id = tracing::field::Empty,
            tenant.id = tracing::field::Empty,
            credential.version = tracing::field::Empty,
        );
        // A tenant the request names is already in the audit subject, so
        // `context::record_ids` does not record it again.
        if let (Some(tenant_id), false) = (call.named.tenant_id, defer_fields) {
            span.record("tenant.id", tenant_id);
        }
        let started = Instant::now();
        let authenticated = self.auth.authenticate(&Presented {
            metadata: request.metadata(),
            peer_certificates: request.peer_certs().as_deref().map(Vec::as_slice),
        });
        let subject = Arc::new(std::sync::Mutex::new(call.named.clone()));
        let (caller, method, mut result) = match authenticated {
            Err(rejected) => (None, rejected.method, Err(rejected.status)),
            Ok(caller) => {
                if !defer_fields {
                    span.record("caller", caller.identity.as_str());
                }
                let method = caller.method;
                let result = if !self.audit.is_writable().await {
                    Err(audit_unavailable())
                } else if let Err(denied) = caller.authorize(rpc) {
                    Err(denied)
                } else {
                    let run = handler(caller.clone(), request).instrument(span.clone());
                    context::with_subject(subject.clone(), !defer_fields, run).await
                };
                (Some(caller), method, result)
            }
        };

        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        let recorded: Subject = subject
            .lock()
            .expect("the subject lock is never poisoned")
            .clone();
        let event = call.event(caller.as_ref(), method, recorded, code);
        let appended = self.audit.append(event).await;
        // A call that fails, or whose audit event fails, writes a line at
        // `info`. A served call writes one only where `debug` is enabled.
        let writes_line = || {
            result.is_err()
                || appended.is_err()
                || span.in_scope(|| tracing::enabled!(tracing::Level::DEBUG))
        };
        if defer_fields && writes_line() {
            let recorded = subject.lock().expect("the subject lock is never poisoned");
            record_span_fields(&span, caller.as_ref(), &recorded);
        }
        if let Err(error) = appended {
            span.in_scope(|| {
                tracing::error!(%error, code = ?code, "cannot write the audit event; failing the call")
            });
            result = Err(audit_unavailable());
        } else {
            crate::metrics::record_audit_event();
        }

        let latency = started.elapsed();
        let latency_ms = latency.as_secs_f64() * 1000.0;
        let final_code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        crate::metrics::record_rpc(rpc.as_str(), final_code, latency);
        span.in_scope(|| match &result {
            // Services call GetAccessToken before each ServiceTitan request
            // and the audit trail records every call. At info, this line cost
            // a third of the warm throughput.
            Ok(_) if rpc == Rpc::GetAccessToken => {
                tracing::debug!(code = "OK", latency_ms, "rpc finished")
            }
            Ok(_) => tracing::info!(code = "OK", latency_ms, "rpc finished"),
            Err(status) => tracing::info!(
                code = ?status.code(),
                // Not `message`: log formats use that name for the line's
                // own text, so JSON output would carry the key twice.
                error = status.message(),
                latency_ms,
                "rpc finished"
            ),
        });
        let mut request_id = MetadataValue::try_from(call.request_id.as_str())
            .expect("request ids are printable ASCII");
        // Sent as never indexed: each id is new, so entering it in the
        // HTTP/2 header table would only push out the headers that do
        // repeat, on both ends of the connection.
        request_id.set_sensitive(true);
        match &mut result {
            Ok(response) => {
                response
                    .metadata_mut()
                    .insert(context::REQUEST_ID_HEADER, request_id);
            }
            Err(status) => {
                status
                    .metadata_mut()
                    .insert(context::REQUEST_ID_HEADER, request_id);
            }
        }
        result
    }
}

/// Returns whether the ids of a call go into its span only when it ends,
/// and only if a line is written then. The log formatter formats each
/// field into text as it is recorded, even if no line is ever written. A
/// profile put the six fields at about 2.8 µs of a warm GetAccessToken's
/// 25 µs (an estimate under `perf`), and a served token logs nothing below
/// `debug`. Lines logged during the call still carry its method and request
/// id, which its final line shares with the caller, connection and tenant.
fn defers_span_fields(rpc: Rpc) -> bool {
    rpc == Rpc::GetAccessToken
}

/// Records the caller and the ids a call recorded in its span.
fn record_span_fields(span: &tracing::Span, caller: Option<&Caller>, subject: &Subject) {
    if let Some(caller) = caller {
        span.record("caller", caller.identity.as_str());
    }
    if let Some(id) = &subject.connection_id {
        span.record("connection.id", id.as_str());
    }
    if let Some(tenant_id) = subject.tenant_id {
        span.record("tenant.id", tenant_id);
    }
    if let Some(version) = subject.credential_version {
        span.record("credential.version", version);
    }
}

fn audit_unavailable() -> Status {
    Status::unavailable(
        "the audit trail cannot be written, so the call was not completed; retry later",
    )
}

/// Reads the caller's gRPC deadline from the `grpc-timeout` header.
fn grpc_deadline<T>(request: &Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Stream of `WatchConnectionStatus`.
pub type StatusStream = Pin<
    Box<dyn futures::Stream<Item = Result<pb::ConnectionStatusEvent, Status>> + Send + 'static>,
>;

#[tonic::async_trait]
impl CredentialVault for VaultService {
    type WatchConnectionStatusStream = StatusStream;

    async fn register_connection(
        &self,
        request: Request<pb::RegisterConnectionRequest>,
    ) -> Result<Response<pb::Connection>, Status> {
        let this = self.clone();
        detached(async move {
            let vault = this.vault.clone();
            this.observe(
                Rpc::RegisterConnection,
                request,
                |caller, request| async move {
                    let request = request.into_inner();
                    let mut violations = validate::Violations::default();
                    let environment =
                        violations.check(validate::environment("environment", request.environment));
                    let tenant_id =
                        violations.check(validate::tenant_id("tenant_id", request.tenant_id));
                    let client_id =
                        violations.check(validate::credential("client_id", &request.client_id));
                    let client_secret =
                        violations.check(validate::secret("client_secret", request.client_secret));
                    let app_key = violations.check(validate::secret("app_key", request.app_key));
                    let display_name =
                        violations.check(validate::display_name(&request.display_name));
                    let labels = violations.check(validate::labels(request.labels));
                    let required_scope_groups = violations.check(validate::scope_groups(
                        "required_scope_groups",
                        request.required_scope_groups,
                    ));
                    violations.finish()?;
                    let checked = "finish returned Ok, so every field passed";
                    let new = NewConnection {
                        environment: environment.expect(checked),
                        tenant_id: tenant_id.expect(checked),
                        client_id: client_id.expect(checked),
                        client_secret: client_secret.expect(checked),
                        app_key: app_key.expect(checked),
                        display_name: display_name.expect(checked),
                        labels: labels.expect(checked),
                        enterprise_hub: request.enterprise_hub,
                        required_scope_groups: required_scope_groups.expect(checked),
                        skip_verification: request.skip_verification,
                    };
                    let (record, created) = vault
                        .register(new, &caller.identity)
                        .await
                        .map_err(to_status)?;
                    record_connection(&record);
                    record_credential_version(record.current().version);
                    if created {
                        tracing::info!(environment = %record.environment, "connection registered");
                    }
                    Ok(Response::new(convert::connection(&record)))
                },
            )
            .await
        })
        .await
    }

    async fn get_connection(
        &self,
        request: Request<pb::GetConnectionRequest>,
    ) -> Result<Response<pb::Connection>, Status> {
        self.observe(Rpc::GetConnection, request, |_, request| async move {
            let id = validate::connection_id("connection_id", &request.get_ref().connection_id)?;
            context::record_connection_id(&id);
            let record = self.vault.get(&id).await.map_err(to_status)?;
            record_connection(&record);
            Ok(Response::new(convert::connection(&record)))
        })
        .await
    }

    async fn list_connections(
        &self,
        request: Request<pb::ListConnectionsRequest>,
    ) -> Result<Response<pb::ListConnectionsResponse>, Status> {
        self.observe(Rpc::ListConnections, request, |_, request| async move {
            let request = request.into_inner();
            let page_size = validate::page_size(request.page_size)?;
            let filters = validate::ListFilters {
                environment: request.environment,
                tenant_id: request.tenant_id,
            };
            let after = validate::page_token(&request.page_token, filters)?;
            let environment = match request.environment {
                0 => None,
                value => Some(validate::environment("environment", value)?),
            };
            let tenant_id = match request.tenant_id {
                0 => None,
                value => Some(validate::tenant_id("tenant_id", value)?),
            };
            let (records, more) = self
                .vault
                .store()
                .list(after.as_deref(), page_size, |r| {
                    environment.is_none_or(|e| r.environment == e)
                        && tenant_id.is_none_or(|t| r.tenant_id == t)
                })
                .await
                .map_err(|e| to_status(e.into()))?;
            let next_page_token = match (more, records.last()) {
                (true, Some(last)) => validate::encode_page_token(&last.id, filters),
                _ => String::new(),
            };
            Ok(Response::new(pb::ListConnectionsResponse {
                connections: records.iter().map(convert::connection).collect(),
                next_page_token,
            }))
        })
        .await
    }

    async fn rotate_credentials(
        &self,
        request: Request<pb::RotateCredentialsRequest>,
    ) -> Result<Response<pb::Connection>, Status> {
        let this = self.clone();
        detached(async move {
            let vault = this.vault.clone();
            this.observe(
                Rpc::RotateCredentials,
                request,
                |caller, request| async move {
                    let request = request.into_inner();
                    let id = validate::connection_id("connection_id", &request.connection_id)?;
                    context::record_connection_id(&id);
                    let rotation = Rotation {
                        client_id: non_empty(request.client_id)
                            .map(|v| validate::credential("client_id", &v))
                            .transpose()?,
                        client_secret: non_empty(request.client_secret)
                            .map(|v| validate::secret("client_secret", v))
                            .transpose()?,
                        app_key: non_empty(request.app_key)
                            .map(|v| validate::secret("app_key", v))
                            .transpose()?,
                        skip_verification: request.skip_verification,
                    };
                    if rotation.client_id.is_none()
                        && rotation.client_secret.is_none()
                        && rotation.app_key.is_none()
                    {
                        return Err(validate::invalid(
                            "client_secret",
                            "set at least one of client_id, client_secret or app_key to rotate",
                        ));
                    }
                    let rotated = vault
                        .rotate(&id, rotation, &caller.identity)
                        .await
                        .map_err(to_status)?;
                    let record = rotated.record;
                    record_connection(&record);
                    record_credential_version(record.current().version);
                    if rotated.changed {
                        tracing::info!(
                            credential.version = record.current().version,
                            "credentials rotated"
                        );
                    } else {
                        tracing::info!(
                            credential.version = record.current().version,
                            "credentials unchanged: they equal the current version"
                        );
                    }
                    Ok(Response::new(convert::connection(&record)))
                },
            )
            .await
        })
        .await
    }

    async fn rollback_credentials(
        &self,
        request: Request<pb::RollbackCredentialsRequest>,
    ) -> Result<Response<pb::Connection>, Status> {
        let this = self.clone();
        detached(async move {
            let vault = this.vault.clone();
            this.observe(Rpc::RollbackCredentials, request, |_, request| async move {
                let id =
                    validate::connection_id("connection_id", &request.get_ref().connection_id)?;
                context::record_connection_id(&id);
                let record = vault.rollback(&id).await.map_err(to_status)?;
                record_connection(&record);
                record_credential_version(record.current().version);
                tracing::info!(
                    credential.version = record.current().version,
                    "credentials rolled back"
                );
                Ok(Response::new(convert::connection(&record)))
            })
            .await
        })
        .await
    }

    async fn verify_connection(
        &self,
        request: Request<pb::VerifyConnectionRequest>,
    ) -> Result<Response<pb::VerificationReport>, Status> {
        self.observe(Rpc::VerifyConnection, request, |_, request| async move {
            let id = validate::connection_id("connection_id", &request.get_ref().connection_id)?;
            context::record_connection_id(&id);
            if let Ok(record) = self.vault.get(&id).await {
                record_connection(&record);
            }
            // Callers that arrive meanwhile share this verification, so it
            // runs to the end even if this caller leaves.
            let vault = self.vault.clone();
            let verified_id = id.clone();
            let report =
                detached(async move { vault.verify(&verified_id).await.map_err(to_status) })
                    .await?;
            Ok(Response::new(convert::report(&id, &report)))
        })
        .await
    }

    async fn delete_connection(
        &self,
        request: Request<pb::DeleteConnectionRequest>,
    ) -> Result<Response<pb::DeleteConnectionResponse>, Status> {
        let this = self.clone();
        detached(async move {
            let vault = this.vault.clone();
            this.observe(Rpc::DeleteConnection, request, |_, request| async move {
                let id =
                    validate::connection_id("connection_id", &request.get_ref().connection_id)?;
                context::record_connection_id(&id);
                match vault.delete(&id).await.map_err(to_status)? {
                    Some(record) => {
                        record_connection(&record);
                        tracing::info!("connection deleted");
                    }
                    None => tracing::warn!("unreadable connection record deleted"),
                }
                Ok(Response::new(pb::DeleteConnectionResponse {}))
            })
            .await
        })
        .await
    }

    async fn get_access_token(
        &self,
        request: Request<pb::GetAccessTokenRequest>,
    ) -> Result<Response<pb::AccessToken>, Status> {
        let deadline = grpc_deadline(&request);
        self.observe(Rpc::GetAccessToken, request, |caller, request| async move {
            let request = request.into_inner();
            let min_valid_for = validate::min_valid_for(request.min_valid_for)?;
            let id = self.resolve_connection(&caller, &request).await?;

            // Wait no longer than the upstream timeout or the caller's own
            // deadline, so a hanging ServiceTitan yields UNAVAILABLE.
            let mut wait = self.vault.broker().client().request_timeout() + Duration::from_secs(1);
            if let Some(deadline) = deadline {
                // Respond a little before the deadline, so the caller reads
                // why instead of its own DEADLINE_EXCEEDED.
                let margin = DEADLINE_MARGIN.min(deadline / 5);
                wait = wait.min(deadline - margin);
            }
            let fetched = tokio::time::timeout(wait, self.vault.access_token(&id, min_valid_for));
            let issued = match fetched.await {
                Ok(Ok(issued)) => issued,
                Ok(Err(error)) => {
                    self.record_cached_ids(&id);
                    // No cooldown left means that it ended after the error
                    // was read, or that new credentials replaced the entry.
                    // Either way the next call requests a new token.
                    let cooldown = self
                        .vault
                        .broker()
                        .failure_cooldown_left(&id)
                        .unwrap_or_default();
                    return Err(status::access_token_status(error, cooldown));
                }
                // A token that has not expired is more use to the caller
                // than the error, as when ServiceTitan fails at once.
                Err(_) => match self.vault.unexpired_access_token(&id) {
                    Some(issued) => issued,
                    None => {
                        self.record_cached_ids(&id);
                        return Err(Status::unavailable(
                            "timed out waiting for ServiceTitan's token endpoint, which is \
                             still being asked; retry later",
                        ));
                    }
                },
            };
            let credentials = &issued.slot.credentials;
            context::record_ids(
                &credentials.connection_id,
                credentials.environment,
                credentials.tenant_id,
            );
            record_credential_version(credentials.version);
            let api_base_url = self
                .vault
                .broker()
                .client()
                .endpoints(credentials.environment)
                .api_url
                .as_str()
                .trim_end_matches('/')
                .to_owned();
            Ok(Response::new(pb::AccessToken {
                access_token: issued.token.access_token.expose().to_owned(),
                token_type: issued.token.token_type.clone(),
                expires_at: Some(issued.token.expires_at_wall.into()),
                app_key: credentials.app_key.expose().to_owned(),
                tenant_id: credentials.tenant_id,
                api_base_url,
                connection_id: credentials.connection_id.clone(),
                credential_version: credentials.version,
            }))
        })
        .await
    }
    async fn update_connection(
        &self,
        request: Request<pb::UpdateConnectionRequest>,
    ) -> Result<Response<pb::Connection>, Status> {
        let this = self.clone();
        detached(async move {
            let vault = this.vault.clone();
            this.observe(Rpc::UpdateConnection, request, |_, request| async move {
                let request = request.into_inner();
                let Some(connection) = request.connection else {
                    return Err(validate::invalid("connection", "is required"));
                };
                let id =
                    validate::connection_id("connection.connection_id", &connection.connection_id)?;
                context::record_connection_id(&id);
                let fields = validate::update_mask(request.update_mask)?;
                let named = |field: &str| fields.iter().any(|f| f == field);
                let update = SettingsUpdate {
                    display_name: named("display_name")
                        .then(|| validate::display_name(&connection.display_name))
                        .transpose()?,
                    labels: named("labels")
                        .then(|| validate::labels(connection.labels))
                        .transpose()?,
                    required_scope_groups: named("required_scope_groups")
                        .then(|| {
                            validate::scope_groups(
                                "required_scope_groups",
                                connection.required_scope_groups,
                            )
                        })
                        .transpose()?,
                    skip_verification: request.skip_verification,
                };
                let record = vault
                    .update_settings(&id, update)
                    .await
                    .map_err(to_status)?;
                record_connection(&record);
                tracing::info!(fields = %fields.join(","), "connection updated");
                Ok(Response::new(convert::connection(&record)))
            })
            .await
        })
        .await
    }

    async fn watch_connection_status(
        &self,
        request: Request<pb::WatchConnectionStatusRequest>,
    ) -> Result<Response<Self::WatchConnectionStatusStream>, Status> {
        self.observe(
            Rpc::WatchConnectionStatus,
            request,
            |caller, request| async move {
                let request = request.into_inner();
                let connection_id = match request.connection_id.as_str() {
                    "" => None,
                    value => Some(validate::connection_id("connection_id", value)?),
                };
                if let Some(id) = &connection_id {
                    context::record_connection_id(id);
                    let record = self.vault.get(id).await.map_err(to_status)?;
                    record_connection(&record);
                }
                let filter = watch::StatusFilter {
                    connection_id,
                    tenant_id: match request.tenant_id {
                        0 => None,
                        value => Some(validate::tenant_id("tenant_id", value)?),
                    },
                    environment: match request.environment {
                        0 => None,
                        value => Some(validate::environment("environment", value)?),
                    },
                };
                let (sender, receiver) = tokio::sync::mpsc::channel(watch::WATCH_BUFFER);
                let auth = self.auth.clone();
                let recheck: watch::Recheck =
                    Box::new(move || auth.recheck(&caller, Rpc::WatchConnectionStatus));
                watch::start(
                    &self.vault,
                    filter,
                    request.send_current_state,
                    sender,
                    recheck,
                )
                .await?;
                let stream: StatusStream =
                    Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver));
                Ok(Response::new(stream))
            },
        )
        .await
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        self.observe(Rpc::ListAuditEvents, request, |_, request| async move {
            audit::list_events(&self.audit, request.into_inner())
                .await
                .map(Response::new)
        })
        .await
    }
}

impl VaultService {
    /// Records the environment, tenant and credential version of a
    /// connection whose token call failed, for its audit event and log
    /// line. The broker's entry, installed before the token request, names
    /// them.
    fn record_cached_ids(&self, id: &str) {
        if let Ok(slot) = self.vault.cached_slot(id) {
            let credentials = &slot.credentials;
            context::record_ids(id, credentials.environment, credentials.tenant_id);
            record_credential_version(credentials.version);
        }
    }

    /// Finds the connection a token request names, by id or by environment
    /// and tenant, and checks that the caller may get tokens for its tenant.
    ///
    /// A caller limited to some tenants is checked before any lookup by
    /// tenant. It gets the same denial for a connection id that does not
    /// exist as for a connection of another tenant. So a denial does not
    /// reveal whether a tenant or connection exists.
    ///
    /// While the database is unreachable, both lookups use the connections
    /// whose credentials the broker keeps in memory, and a connection that
    /// is not cached fails with `UNAVAILABLE`.
    /// NOTE: during an outage, a caller limited to some tenants can tell a
    /// cached connection of another tenant (`PERMISSION_DENIED`) from an
    /// unknown or uncached id (`UNAVAILABLE`).
    async fn resolve_connection(
        &self,
        caller: &Caller,
        request: &pb::GetAccessTokenRequest,
    ) -> Result<String, Status> {
        let by_tenant = request.environment != 0 || request.tenant_id != 0;
        if !request.connection_id.is_empty() {
            let id = validate::connection_id("connection_id", &request.connection_id)?;
            if by_tenant {
                return Err(validate::invalid(
                    "connection_id",
                    "set either connection_id, or environment and tenant_id, not both",
                ));
            }
            context::record_connection_id(&id);
            if caller.has_all_tenants() {
                return Ok(id);
            }
            let denied = || caller.denied(Rpc::GetAccessToken, &format!(" for connection {id}"));
            if !self.vault.database_reachable() {
                let slot = self.vault.cached_slot(&id).map_err(to_status)?;
                let credentials = &slot.credentials;
                context::record_ids(&id, credentials.environment, credentials.tenant_id);
                return if caller.may_use_tenant(credentials.tenant_id) {
                    Ok(id)
                } else {
                    Err(denied())
                };
            }
            return match self.vault.store().get(&id).await {
                Ok(Some(record)) => {
                    record_connection(&record);
                    if caller.may_use_tenant(record.tenant_id) {
                        Ok(id)
                    } else {
                        Err(denied())
                    }
                }
                Ok(None) => Err(denied()),
                Err(error) => Err(to_status(error.into())),
            };
        }
        if !by_tenant {
            return Err(validate::invalid(
                "connection_id",
                "is required unless environment and tenant_id are set",
            ));
        }
        let environment = validate::environment("environment", request.environment)?;
        let tenant_id = validate::tenant_id("tenant_id", request.tenant_id)?;
        caller.authorize_tenant(Rpc::GetAccessToken, tenant_id)?;
        if !self.vault.database_reachable() {
            let slot = self
                .vault
                .cached_tenant_slot(environment, tenant_id)
                .map_err(to_status)?;
            let credentials = &slot.credentials;
            context::record_ids(&credentials.connection_id, environment, tenant_id);
            return Ok(credentials.connection_id.clone());
        }
        let record = self
            .vault
            .find(environment, tenant_id)
            .await
            .map_err(to_status)?;
        record_connection(&record);
        Ok(record.id)
    }
}

/// Runs a state-changing call in its own task, so a caller that gives up
/// cancels neither the change nor its audit event.
async fn detached<T: Send + 'static>(
    call: impl Future<Output = Result<T, Status>> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(call).await.unwrap_or_else(|error| {
        tracing::error!(%error, "call task failed");
        Err(Status::internal("the call failed; see the server log"))
    })
}

fn non_empty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

#[cfg(test)]
mod tests;
