//! The gRPC service: validates requests, calls the vault and converts the
//! results. Errors become statuses in `status`.

mod convert;
pub mod status;
pub mod validate;
mod watch;

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::pb;
use crate::pb::credential_vault_server::CredentialVault;
use crate::vault::{NewConnection, Rotation, SettingsUpdate, Vault};

use status::to_status;

/// Caller identity recorded in credential versions until callers are
/// authenticated.
const ANONYMOUS_CALLER: &str = "anonymous";
/// Time kept back from a caller's gRPC deadline to send UNAVAILABLE in.
const DEADLINE_MARGIN: Duration = Duration::from_millis(200);

pub struct VaultService {
    vault: Arc<Vault>,
}

impl VaultService {
    pub fn new(vault: Arc<Vault>) -> Self {
        Self { vault }
    }
}

/// Runs one RPC inside a span and logs its outcome: method, connection and
/// tenant ids (recorded by the handler once known), gRPC code and latency.
async fn observe<T>(
    method: &'static str,
    handler: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let span = tracing::info_span!(
        "rpc",
        rpc.method = method,
        connection.id = tracing::field::Empty,
        tenant.id = tracing::field::Empty,
    );
    let started = Instant::now();
    let result = handler.instrument(span.clone()).await;
    let latency = started.elapsed();
    let latency_ms = latency.as_secs_f64() * 1000.0;
    let code = result
        .as_ref()
        .map_or_else(Status::code, |_| tonic::Code::Ok);
    crate::metrics::record_rpc(method, code, latency);
    span.in_scope(|| match &result {
        Ok(_) => tracing::info!(code = "OK", latency_ms, "rpc finished"),
        Err(status) => tracing::info!(
            code = ?status.code(),
            message = status.message(),
            latency_ms,
            "rpc finished"
        ),
    });
    result
}

fn record_ids(connection_id: &str, tenant_id: i64) {
    let span = tracing::Span::current();
    span.record("connection.id", connection_id);
    span.record("tenant.id", tenant_id);
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
        observe("RegisterConnection", async {
            let request = request.into_inner();
            let new = NewConnection {
                environment: validate::environment("environment", request.environment)?,
                tenant_id: validate::tenant_id("tenant_id", request.tenant_id)?,
                client_id: validate::credential("client_id", &request.client_id)?,
                client_secret: validate::secret("client_secret", request.client_secret)?,
                app_key: validate::secret("app_key", request.app_key)?,
                display_name: validate::display_name(&request.display_name)?,
                labels: validate::labels(request.labels)?,
                enterprise_hub: request.enterprise_hub,
                required_scope_groups: validate::scope_groups(
                    "required_scope_groups",
                    request.required_scope_groups,
                )?,
                skip_verification: request.skip_verification,
            };
            tracing::Span::current().record("tenant.id", new.tenant_id);
            let (record, created) = self
                .vault
                .register(new, ANONYMOUS_CALLER)
                .await
                .map_err(to_status)?;
            record_ids(&record.id, record.tenant_id);
            if created {
                tracing::info!(environment = %record.environment, "connection registered");
            }
            Ok(Response::new(convert::connection(&record)))
        })
        .await
    }

    async fn get_connection(
        &self,
        request: Request<pb::GetConnectionRequest>,
    ) -> Result<Response<pb::Connection>, Status> {
        observe("GetConnection", async {
            let id = validate::connection_id("connection_id", &request.get_ref().connection_id)?;
            let record = self.vault.get(&id).map_err(to_status)?;
            record_ids(&record.id, record.tenant_id);
            Ok(Response::new(convert::connection(&record)))
        })
        .await
    }

    async fn list_connections(
        &self,
        request: Request<pb::ListConnectionsRequest>,
    ) -> Result<Response<pb::ListConnectionsResponse>, Status> {
        observe("ListConnections", async {
            let request = request.into_inner();
            let page_size = validate::page_size(request.page_size)?;
            let after = validate::page_token(&request.page_token)?;
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
                .map_err(|e| to_status(e.into()))?;
            let next_page_token = match (more, records.last()) {
                (true, Some(last)) => validate::encode_page_token(&last.id),
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
        observe("RotateCredentials", async {
            let request = request.into_inner();
            let id = validate::connection_id("connection_id", &request.connection_id)?;
            tracing::Span::current().record("connection.id", id.as_str());
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
            // The rotation runs in its own task, so a caller that gives up
            // mid-verification does not leave its pending version behind.
            let vault = self.vault.clone();
            let rotate_id = id.clone();
            let record =
                tokio::spawn(
                    async move { vault.rotate(&rotate_id, rotation, ANONYMOUS_CALLER).await },
                )
                .await
                .map_err(|e| {
                    tracing::error!(error = %e, "rotation task failed");
                    Status::internal("rotation failed; see the server log")
                })?
                .map_err(to_status)?;
            record_ids(&record.id, record.tenant_id);
            tracing::info!(
                credential.version = record.current().version,
                "credentials rotated"
            );
            Ok(Response::new(convert::connection(&record)))
        })
        .await
    }

    async fn rollback_credentials(
        &self,
        request: Request<pb::RollbackCredentialsRequest>,
    ) -> Result<Response<pb::Connection>, Status> {
        observe("RollbackCredentials", async {
            let id = validate::connection_id("connection_id", &request.get_ref().connection_id)?;
            tracing::Span::current().record("connection.id", id.as_str());
            let record = self.vault.rollback(&id).await.map_err(to_status)?;
            record_ids(&record.id, record.tenant_id);
            tracing::info!(
                credential.version = record.current().version,
                "credentials rolled back"
            );
            Ok(Response::new(convert::connection(&record)))
        })
        .await
    }

    async fn verify_connection(
        &self,
        request: Request<pb::VerifyConnectionRequest>,
    ) -> Result<Response<pb::VerificationReport>, Status> {
        observe("VerifyConnection", async {
            let id = validate::connection_id("connection_id", &request.get_ref().connection_id)?;
            tracing::Span::current().record("connection.id", id.as_str());
            let report = self.vault.verify(&id).await.map_err(to_status)?;
            Ok(Response::new(convert::report(&id, &report)))
        })
        .await
    }

    async fn delete_connection(
        &self,
        request: Request<pb::DeleteConnectionRequest>,
    ) -> Result<Response<pb::DeleteConnectionResponse>, Status> {
        observe("DeleteConnection", async {
            let id = validate::connection_id("connection_id", &request.get_ref().connection_id)?;
            tracing::Span::current().record("connection.id", id.as_str());
            match self.vault.delete(&id).await.map_err(to_status)? {
                Some(record) => {
                    record_ids(&record.id, record.tenant_id);
                    tracing::info!("connection deleted");
                }
                None => tracing::warn!("unreadable connection record deleted"),
            }
            Ok(Response::new(pb::DeleteConnectionResponse {}))
        })
        .await
    }

    async fn get_access_token(
        &self,
        request: Request<pb::GetAccessTokenRequest>,
    ) -> Result<Response<pb::AccessToken>, Status> {
        let deadline = grpc_deadline(&request);
        observe("GetAccessToken", async {
            let request = request.into_inner();
            let min_valid_for = validate::min_valid_for(request.min_valid_for)?;
            let id = self.resolve_connection(&request)?;
            tracing::Span::current().record("connection.id", id.as_str());

            // Wait no longer than the upstream timeout or the caller's own
            // deadline, so a hanging ServiceTitan yields UNAVAILABLE.
            let mut wait = self.vault.broker().client().request_timeout() + Duration::from_secs(1);
            if let Some(deadline) = deadline {
                // Respond a little before the deadline, so the caller reads
                // why instead of its own DEADLINE_EXCEEDED.
                let margin = DEADLINE_MARGIN.min(deadline / 5);
                wait = wait.min(deadline - margin);
            }
            let issued = tokio::time::timeout(wait, self.vault.access_token(&id, min_valid_for))
                .await
                .map_err(|_| {
                    Status::unavailable(
                        "timed out waiting for ServiceTitan's token endpoint; retry later",
                    )
                })?
                .map_err(to_status)?;
            let credentials = &issued.slot.credentials;
            record_ids(&credentials.connection_id, credentials.tenant_id);
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
        observe("UpdateConnection", async {
            let request = request.into_inner();
            let Some(connection) = request.connection else {
                return Err(validate::invalid("connection", "is required"));
            };
            let id =
                validate::connection_id("connection.connection_id", &connection.connection_id)?;
            tracing::Span::current().record("connection.id", id.as_str());
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
            let record = self
                .vault
                .update_settings(&id, update)
                .await
                .map_err(to_status)?;
            record_ids(&record.id, record.tenant_id);
            tracing::info!(fields = %fields.join(","), "connection updated");
            Ok(Response::new(convert::connection(&record)))
        })
        .await
    }

    async fn watch_connection_status(
        &self,
        request: Request<pb::WatchConnectionStatusRequest>,
    ) -> Result<Response<Self::WatchConnectionStatusStream>, Status> {
        observe("WatchConnectionStatus", async {
            let request = request.into_inner();
            let connection_id = match request.connection_id.as_str() {
                "" => None,
                value => Some(validate::connection_id("connection_id", value)?),
            };
            if let Some(id) = &connection_id {
                let record = self.vault.get(id).map_err(to_status)?;
                record_ids(&record.id, record.tenant_id);
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
            watch::start(&self.vault, filter, request.send_current_state, sender)?;
            let stream: StatusStream =
                Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver));
            Ok(Response::new(stream))
        })
        .await
    }
}

impl VaultService {
    /// Finds the connection a token request names, by id or by environment
    /// and tenant.
    fn resolve_connection(&self, request: &pb::GetAccessTokenRequest) -> Result<String, Status> {
        let by_tenant = request.environment != 0 || request.tenant_id != 0;
        if !request.connection_id.is_empty() {
            let id = validate::connection_id("connection_id", &request.connection_id)?;
            if by_tenant {
                return Err(validate::invalid(
                    "connection_id",
                    "set either connection_id, or environment and tenant_id, not both",
                ));
            }
            return Ok(id);
        }
        if !by_tenant {
            return Err(validate::invalid(
                "connection_id",
                "is required unless environment and tenant_id are set",
            ));
        }
        let environment = validate::environment("environment", request.environment)?;
        let tenant_id = validate::tenant_id("tenant_id", request.tenant_id)?;
        let record = self.vault.find(environment, tenant_id).map_err(to_status)?;
        Ok(record.id)
    }
}

fn non_empty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}
