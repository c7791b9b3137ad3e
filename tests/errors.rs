//! Every error status the API promises, each from a real request against
//! the real binary and a fake ServiceTitan, on sled and on PostgreSQL.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use stvault::pb;
use stvault::pb::credential_vault_client::CredentialVaultClient as VaultClient;
use support::backend::Backend;
use support::fake_servicetitan::{FakeApp, FakeServiceTitan, Fault};
use support::server::Server;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

const CLIENT_ID: &str = "cid.errors";
const SECRET: &str = "cs1.errors-secret";
const APP_KEY: &str = "ak1.errors-key";
const TENANT: i64 = 4100;

backend_tests!(
    invalid_arguments_name_the_field,
    unknown_connections_are_not_found,
    rejected_credentials_fail_precondition,
    rate_limiting_is_resource_exhausted,
    upstream_failures_are_unavailable_and_not_cached,
    hanging_upstream_is_bounded,
    failed_token_call_logging,
    retry_delay_counts_down,
    span_filter_logs_served_token,
);

async fn fake_with_app() -> FakeServiceTitan {
    let fake = FakeServiceTitan::start().await;
    fake.add_app(FakeApp::new(CLIENT_ID, SECRET, TENANT, APP_KEY));
    fake
}

/// Starts stvault with a short failure cooldown and upstream timeout, so
/// failure paths are quick to exercise.
async fn server(backend: Backend, fake: &FakeServiceTitan) -> Server {
    Server::start_on(
        backend,
        fake,
        fake,
        &[
            ("STVAULT_TOKEN_FAILURE_COOLDOWN", "100ms"),
            ("STVAULT_UPSTREAM_TIMEOUT", "1s"),
        ],
    )
    .await
}

/// Starts a fake with the app and a server, and registers the app without
/// verification.
async fn registered_unverified(
    backend: Backend,
) -> (FakeServiceTitan, Server, VaultClient<Channel>, String) {
    let fake = fake_with_app().await;
    let server = server(backend, &fake).await;
    let mut client = server.client().await;
    let id = register_unverified(&mut client).await;
    (fake, server, client, id)
}

/// Registers the fake's app without verification and returns the id.
async fn register_unverified(client: &mut VaultClient<Channel>) -> String {
    client
        .register_connection(pb::RegisterConnectionRequest {
            skip_verification: true,
            ..register()
        })
        .await
        .unwrap()
        .into_inner()
        .connection_id
}

fn register() -> pb::RegisterConnectionRequest {
    pb::RegisterConnectionRequest {
        environment: pb::Environment::Production as i32,
        tenant_id: TENANT,
        client_id: CLIENT_ID.into(),
        client_secret: SECRET.into(),
        app_key: APP_KEY.into(),
        ..Default::default()
    }
}

fn by_id(id: &str) -> pb::GetAccessTokenRequest {
    pb::GetAccessTokenRequest {
        connection_id: id.into(),
        ..Default::default()
    }
}

/// Asserts the status code and that the message mentions `needle`.
fn assert_status(status: &tonic::Status, code: Code, needle: &str) {
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    assert!(
        status.message().contains(needle),
        "message {:?} does not mention {needle:?}",
        status.message()
    );
}

async fn invalid_arguments_name_the_field(backend: Backend) {
    let fake = fake_with_app().await;
    let server = server(backend, &fake).await;
    let mut client = server.client().await;
    let long = "x".repeat(4097);

    let cases: Vec<(&str, pb::RegisterConnectionRequest)> = vec![
        (
            "tenant_id",
            pb::RegisterConnectionRequest {
                tenant_id: 0,
                ..register()
            },
        ),
        (
            "tenant_id",
            pb::RegisterConnectionRequest {
                tenant_id: -5,
                ..register()
            },
        ),
        (
            "environment",
            pb::RegisterConnectionRequest {
                environment: 0,
                ..register()
            },
        ),
        (
            "environment",
            pb::RegisterConnectionRequest {
                environment: 9,
                ..register()
            },
        ),
        (
            "client_id",
            pb::RegisterConnectionRequest {
                client_id: String::new(),
                ..register()
            },
        ),
        (
            "client_id",
            pb::RegisterConnectionRequest {
                client_id: long.clone(),
                ..register()
            },
        ),
        (
            "client_secret",
            pb::RegisterConnectionRequest {
                client_secret: String::new(),
                ..register()
            },
        ),
        (
            "client_secret",
            pb::RegisterConnectionRequest {
                client_secret: format!("{SECRET} "),
                ..register()
            },
        ),
        (
            "client_secret",
            pb::RegisterConnectionRequest {
                client_secret: format!("\t{SECRET}"),
                ..register()
            },
        ),
        (
            "client_secret",
            pb::RegisterConnectionRequest {
                client_secret: long.clone(),
                ..register()
            },
        ),
        (
            "app_key",
            pb::RegisterConnectionRequest {
                app_key: String::new(),
                ..register()
            },
        ),
        (
            "app_key",
            pb::RegisterConnectionRequest {
                app_key: long.clone(),
                ..register()
            },
        ),
        (
            "display_name",
            pb::RegisterConnectionRequest {
                display_name: long.clone(),
                ..register()
            },
        ),
        (
            "required_scope_groups",
            pb::RegisterConnectionRequest {
                required_scope_groups: vec!["billing".into()],
                ..register()
            },
        ),
    ];
    for (field, request) in cases {
        let status = client.register_connection(request).await.expect_err(field);
        assert_status(&status, Code::InvalidArgument, field);
        assert!(
            !status.message().contains(SECRET),
            "secret echoed for {field}"
        );
        let details = status.get_error_details();
        let bad_request = details.bad_request().expect("BadRequest detail");
        assert_eq!(bad_request.field_violations[0].field, field);
    }

    // Every field to fix is named at once, each with a violation.
    let status = client
        .register_connection(pb::RegisterConnectionRequest {
            environment: pb::Environment::Integration as i32,
            tenant_id: TENANT,
            ..Default::default()
        })
        .await
        .expect_err("three fields are missing");
    assert_eq!(
        status.message(),
        "client_id: is required; client_secret: is required; app_key: is required"
    );
    let details = status.get_error_details();
    let fields: Vec<&str> = details
        .bad_request()
        .expect("BadRequest detail")
        .field_violations
        .iter()
        .map(|violation| violation.field.as_str())
        .collect();
    assert_eq!(fields, ["client_id", "client_secret", "app_key"]);

    assert_eq!(
        fake.token_requests(),
        0,
        "invalid requests reach ServiceTitan"
    );

    let status = client
        .get_connection(pb::GetConnectionRequest {
            connection_id: "not-a-uuid".into(),
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, "connection_id");
    let status = client
        .get_connection(pb::GetConnectionRequest::default())
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, "connection_id");

    let id = client
        .register_connection(register())
        .await
        .unwrap()
        .into_inner()
        .connection_id;
    let status = client
        .rotate_credentials(pb::RotateCredentialsRequest {
            connection_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::InvalidArgument,
        "at least one of client_id, client_secret or app_key",
    );
    let status = client
        .rotate_credentials(pb::RotateCredentialsRequest {
            connection_id: id.clone(),
            client_secret: " padded".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, "client_secret");

    let status = client
        .get_access_token(pb::GetAccessTokenRequest {
            connection_id: id.clone(),
            min_valid_for: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, "min_valid_for");
    let status = client
        .get_access_token(pb::GetAccessTokenRequest::default())
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, "connection_id");
    let status = client
        .get_access_token(pb::GetAccessTokenRequest {
            tenant_id: TENANT,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, "environment");

    let status = client
        .list_connections(pb::ListConnectionsRequest {
            page_size: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, "page_size");
    let status = client
        .list_connections(pb::ListConnectionsRequest {
            page_token: "garbage!".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, "page_token");
}

async fn unknown_connections_are_not_found(backend: Backend) {
    let fake = fake_with_app().await;
    let server = server(backend, &fake).await;
    let mut client = server.client().await;
    let missing = "0190a5e4-0000-7000-8000-000000000000".to_string();

    let status = client
        .get_connection(pb::GetConnectionRequest {
            connection_id: missing.clone(),
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, &missing);
    let status = client
        .rotate_credentials(pb::RotateCredentialsRequest {
            connection_id: missing.clone(),
            client_secret: "cs2.new".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, &missing);
    let status = client
        .verify_connection(pb::VerifyConnectionRequest {
            connection_id: missing.clone(),
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, &missing);
    let status = client
        .delete_connection(pb::DeleteConnectionRequest {
            connection_id: missing.clone(),
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, &missing);
    let status = client.get_access_token(by_id(&missing)).await.unwrap_err();
    assert_status(&status, Code::NotFound, &missing);
    let status = client
        .get_access_token(pb::GetAccessTokenRequest {
            environment: pb::Environment::Integration as i32,
            tenant_id: 999,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, "tenant 999");
}

async fn rejected_credentials_fail_precondition(backend: Backend) {
    let fake = fake_with_app().await;
    let server = server(backend, &fake).await;
    let mut client = server.client().await;

    let status = client
        .register_connection(pb::RegisterConnectionRequest {
            client_secret: "cs1.wrong".into(),
            ..register()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "invalid_client");
    let details = status.get_error_details();
    assert_eq!(
        details.error_info().expect("ErrorInfo").reason,
        "VERIFICATION_FAILED"
    );
    assert_eq!(
        details
            .precondition_failure()
            .expect("PreconditionFailure")
            .violations[0]
            .r#type,
        "token"
    );

    let id = client
        .register_connection(register())
        .await
        .unwrap()
        .into_inner()
        .connection_id;
    let status = client
        .rollback_credentials(pb::RollbackCredentialsRequest {
            connection_id: id.clone(),
        })
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::FailedPrecondition,
        "no previous credential version",
    );

    // The secret is deactivated behind the vault's back.
    fake.update_app(CLIENT_ID, |app| {
        app.client_secrets = vec!["cs2.other".into()]
    });
    let status = client.get_access_token(by_id(&id)).await.unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "invalid_client");
    assert!(status.message().contains("RotateCredentials"));
}

async fn rate_limiting_is_resource_exhausted(backend: Backend) {
    let (fake, _server, mut client, id) = registered_unverified(backend).await;

    fake.set_token_fault(Fault::RateLimited {
        retry_after_secs: 30,
    });
    let status = client.get_access_token(by_id(&id)).await.unwrap_err();
    assert_status(&status, Code::ResourceExhausted, "retry after 30 s");
    let retry = status
        .get_error_details()
        .retry_info()
        .expect("RetryInfo")
        .retry_delay;
    assert_eq!(retry, Some(Duration::from_secs(30)));

    // Within the 30 s, callers get the stored error without a new request.
    let requests = fake.token_requests();
    let started = Instant::now();
    let status = client.get_access_token(by_id(&id)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(fake.token_requests(), requests);

    let status = client
        .register_connection(pb::RegisterConnectionRequest {
            tenant_id: TENANT + 1,
            ..register()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}

async fn upstream_failures_are_unavailable_and_not_cached(backend: Backend) {
    let (fake, server, mut client, id) = registered_unverified(backend).await;

    let faults = [
        (Fault::Status(500), "HTTP 500"),
        (Fault::Status(503), "HTTP 503"),
        (Fault::Garbage, "not a JSON object"),
        (Fault::MissingAccessToken, "access_token is missing"),
        (Fault::Status(302), "unexpected HTTP 302"),
    ];
    for (fault, needle) in faults {
        fake.set_token_fault(fault.clone());
        tokio::time::sleep(Duration::from_millis(150)).await;
        let status = client.get_access_token(by_id(&id)).await.unwrap_err();
        assert_status(&status, Code::Unavailable, needle);
        assert!(
            !status.message().contains("<html"),
            "upstream body echoed: {}",
            status.message()
        );
    }

    fake.set_token_fault(Fault::None);
    let overrides = [
        (json!(null), "expires_in is missing"),
        (json!(0), "expires_in is not positive"),
        (json!(-60), "expires_in is not positive"),
        (json!("soon"), "not a whole number"),
        (json!(1e12), "not a whole number"),
        (json!(10_000_000), "exceeds"),
    ];
    for (value, needle) in overrides {
        fake.set_expires_in_override(Some(value.clone()));
        tokio::time::sleep(Duration::from_millis(150)).await;
        let status = client.get_access_token(by_id(&id)).await.unwrap_err();
        assert_status(&status, Code::Unavailable, needle);
    }

    // Nothing failed was cached: once ServiceTitan recovers, the next call
    // after the cooldown gets a token.
    fake.set_expires_in_override(None);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let token = client
        .get_access_token(by_id(&id))
        .await
        .expect("recovered")
        .into_inner();
    assert!(!token.access_token.is_empty());
    let logs = server.logs();
    assert!(!logs.contains("<html"), "an upstream body reached the log");
}

/// Checks the log lines and audit event of token calls. At the default
/// level, a served token writes no line. A failed call writes one line with
/// every field of the call, each once, and its audit event names the tenant.
async fn failed_token_call_logging(backend: Backend) {
    let (fake, server, mut client, id) = registered_unverified(backend).await;
    fake.set_token_fault(Fault::Status(503));
    let failed = client.get_access_token(by_id(&id)).await;
    let failed_id = support::server::request_id(&failed);
    assert_eq!(failed.unwrap_err().code(), Code::Unavailable);
    fake.set_token_fault(Fault::None);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let served = client.get_access_token(by_id(&id)).await;
    let served_id = support::server::request_id(&served);
    served.expect("a token after the cooldown");

    let logs = server.logs();
    assert!(
        !logs.contains(&served_id),
        "a served token was logged: {logs}"
    );
    let lines: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains(&failed_id) && line.contains("rpc finished"))
        .collect();
    assert_eq!(lines.len(), 1, "{logs}");
    let line = lines[0];
    for field in [
        "rpc.method=\"GetAccessToken\"".to_owned(),
        format!("request.id=\"{failed_id}\""),
        "caller=\"anonymous\"".to_owned(),
        format!("connection.id=\"{id}\""),
        format!("tenant.id={TENANT}"),
        "code=Unavailable".to_owned(),
    ] {
        assert_eq!(line.matches(&field).count(), 1, "{field} in {line}");
    }

    // Its audit event names the environment and tenant too, although the
    // call never got a token.
    let events = client
        .list_audit_events(pb::ListAuditEventsRequest {
            environment: pb::Environment::Production as i32,
            tenant_id: TENANT,
            rpc: "GetAccessToken".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let failed = events
        .iter()
        .find(|event| event.request_id == failed_id)
        .expect("the failed call is found by its tenant");
    assert_eq!(failed.connection_id, id);
    assert_eq!(failed.code, "UNAVAILABLE");
}

/// Checks that a repeated call within the failure cooldown gets the stored
/// error, with the remaining cooldown as its retry delay.
async fn retry_delay_counts_down(backend: Backend) {
    let fake = fake_with_app().await;
    let server = Server::start_on(
        backend,
        &fake,
        &fake,
        &[("STVAULT_TOKEN_FAILURE_COOLDOWN", "10s")],
    )
    .await;
    let mut client = server.client().await;
    let id = register_unverified(&mut client).await;
    fake.set_token_fault(Fault::Status(503));
    let delay = |status: &tonic::Status| {
        status
            .get_error_details()
            .retry_info()
            .and_then(|info| info.retry_delay)
            .expect("RetryInfo with a delay")
    };
    let first = client.get_access_token(by_id(&id)).await.unwrap_err();
    assert_status(&first, Code::Unavailable, "HTTP 503");
    assert!(delay(&first) > Duration::from_secs(9), "{first:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let repeated = client.get_access_token(by_id(&id)).await.unwrap_err();
    assert_status(&repeated, Code::Unavailable, "HTTP 503");
    assert!(delay(&repeated) < Duration::from_secs(9), "{repeated:?}");
    assert!(delay(&repeated) > Duration::from_secs(7), "{repeated:?}");
    assert_eq!(fake.token_requests(), 1);
}

/// Checks that a filter on the call's span enables the debug line of a
/// served token, with every field of the call.
async fn span_filter_logs_served_token(backend: Backend) {
    let fake = fake_with_app().await;
    let server = Server::start_on(backend, &fake, &fake, &[("RUST_LOG", "info,[rpc]=debug")]).await;
    let mut client = server.client().await;
    let id = register_unverified(&mut client).await;
    let served = client.get_access_token(by_id(&id)).await;
    let served_id = support::server::request_id(&served);
    served.expect("a token");
    let logs = server.logs();
    let line = logs
        .lines()
        .find(|line| line.contains(&served_id) && line.contains("rpc finished"))
        .unwrap_or_else(|| panic!("no line for the served token: {logs}"));
    for field in [
        format!("connection.id=\"{id}\""),
        format!("tenant.id={TENANT}"),
        "credential.version=1".to_owned(),
        "caller=\"anonymous\"".to_owned(),
    ] {
        assert_eq!(line.matches(&field).count(), 1, "{field} in {line}");
    }
}

async fn hanging_upstream_is_bounded(backend: Backend) {
    let fake = fake_with_app().await;
    let other = FakeServiceTitan::start().await;
    other.add_app(FakeApp::new("cid.other", "cs1.other", 77, APP_KEY));
    // Production hangs; integration is healthy.
    let server = Server::start_on(
        backend,
        &fake,
        &other,
        &[
            ("STVAULT_UPSTREAM_TIMEOUT", "1s"),
            ("STVAULT_TOKEN_FAILURE_COOLDOWN", "100ms"),
        ],
    )
    .await;
    let mut client = server.client().await;
    let id = register_unverified(&mut client).await;
    let other_id = client
        .register_connection(pb::RegisterConnectionRequest {
            environment: pb::Environment::Integration as i32,
            tenant_id: 77,
            client_id: "cid.other".into(),
            client_secret: "cs1.other".into(),
            ..register()
        })
        .await
        .unwrap()
        .into_inner()
        .connection_id;

    fake.set_token_fault(Fault::Hang);
    let hanging = {
        let mut client = client.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = client.get_access_token(by_id(&id)).await;
            (result, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    client
        .get_access_token(by_id(&other_id))
        .await
        .expect("other tenant unaffected");
    // Shorter than the 1 s upstream timeout the hanging tenant waits for.
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );

    let (result, elapsed) = hanging.await.unwrap();
    assert_eq!(result.unwrap_err().code(), Code::Unavailable);
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");

    // A caller deadline shorter than the upstream timeout is honoured by the
    // server. The header is set by hand so that the client does not enforce
    // the deadline itself.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut request = tonic::Request::new(by_id(&id));
    request
        .metadata_mut()
        .insert("grpc-timeout", "1000m".parse().unwrap());
    let started = Instant::now();
    let status = client.get_access_token(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "took {:?}",
        started.elapsed()
    );
}
