//! Verification against the fake ServiceTitan: one case per setup mistake
//! and per kind of upstream trouble, each asserting the failing check and
//! the setup step its remediation points to, on sled and on PostgreSQL.

mod support;

use std::time::Duration;

use stvault::pb;
use stvault::pb::credential_vault_client::CredentialVaultClient;
use stvault::pb::verification_check::Status as CheckStatus;
use stvault::pb::verification_report::Outcome;
use support::backend::Backend;
use support::fake_servicetitan::{ALL_PROBE_SCOPES, FakeApp, FakeServiceTitan, Fault};
use support::server::Server;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

const CLIENT_ID: &str = "cid.verify";
const SECRET: &str = "cs1.verify-secret";
const APP_KEY: &str = "ak1.verify-key";
const TENANT: i64 = 8450;

backend_tests!(
    correct_setup_passes_every_check,
    wrong_secret_fails_token_check,
    wrong_client_id_fails_token_check,
    other_environment_credentials_are_named,
    wrong_app_key_fails_app_key_check,
    disabled_app_fails_app_key_check,
    unconnected_app_fails_tenant_access,
    tenant_mismatch_fails_tenant_check,
    several_tenant_claim_named,
    each_missing_scope_group_warns,
    missing_required_group_fails,
    token_timeout_is_upstream_trouble,
    api_timeout_is_upstream_trouble,
    api_url_path_is_kept,
    server_errors_are_upstream_trouble,
    rate_limits_are_reported_with_delay,
    token_pause_shared_with_verification,
    concurrent_verifications_share_one,
    short_token_lifetime_logged,
    enterprise_hub_names_tenant,
);

/// The ten scope groups: check-name suffix, portal title, probe scope.
const GROUPS: [(&str, &str, &str); 10] = [
    ("accounting", "Accounting", "tn.acc.paymenttypes:r"),
    ("crm", "CRM", "tn.crm.customers:r"),
    ("dispatch", "Dispatch", "tn.dis.zones:r"),
    ("forms", "Forms", "tn.frm.forms:r"),
    ("job_booking", "Job Booking", "tn.jbce.callreasons:r"),
    (
        "job_planning",
        "Job Planning and Management",
        "tn.jpm.jobtypes:r",
    ),
    ("marketing", "Marketing", "tn.mrk.categories:r"),
    ("pricebook", "Pricebook", "tn.pb.categories:r"),
    ("settings", "Settings", "tn.stt.businessunits:r"),
    ("timesheets", "Timesheets", "tn.tms.activitytypes:r"),
];

fn app() -> FakeApp {
    FakeApp::new(CLIENT_ID, SECRET, TENANT, APP_KEY)
}

fn register_request() -> pb::RegisterConnectionRequest {
    pb::RegisterConnectionRequest {
        environment: pb::Environment::Integration as i32,
        tenant_id: TENANT,
        client_id: CLIENT_ID.into(),
        client_secret: SECRET.into(),
        app_key: APP_KEY.into(),
        display_name: "verification test".into(),
        ..Default::default()
    }
}

/// Starts a fake holding `app` and a vault pointed at it.
async fn start(
    backend: Backend,
    app: FakeApp,
    extra_env: &[(&str, &str)],
) -> (FakeServiceTitan, Server) {
    let fake = FakeServiceTitan::start().await;
    fake.add_app(app);
    let server = Server::start_on(backend, &fake, &fake, extra_env).await;
    (fake, server)
}

/// Registers `request` without verification.
async fn register_unverified(
    client: &mut CredentialVaultClient<Channel>,
    request: pb::RegisterConnectionRequest,
) -> pb::Connection {
    client
        .register_connection(pb::RegisterConnectionRequest {
            skip_verification: true,
            ..request
        })
        .await
        .expect("register without verification")
        .into_inner()
}

/// Registers without verification, then returns VerifyConnection's report.
async fn verify_unverified(
    server: &Server,
    request: pb::RegisterConnectionRequest,
) -> pb::VerificationReport {
    let mut client = server.client().await;
    let connection = register_unverified(&mut client, request).await;
    client
        .verify_connection(pb::VerifyConnectionRequest {
            connection_id: connection.connection_id,
        })
        .await
        .expect("VerifyConnection returns a report even when checks fail")
        .into_inner()
}

/// Asks for a token for the test's tenant by environment and tenant id.
async fn token_of_tenant(server: &Server) -> Result<pb::AccessToken, tonic::Status> {
    server
        .client()
        .await
        .get_access_token(pb::GetAccessTokenRequest {
            environment: pb::Environment::Integration as i32,
            tenant_id: TENANT,
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

fn check<'a>(report: &'a pb::VerificationReport, name: &str) -> &'a pb::VerificationCheck {
    report
        .checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check {name:?} in {report:#?}"))
}

fn status_of(report: &pb::VerificationReport, name: &str) -> CheckStatus {
    CheckStatus::try_from(check(report, name).status).expect("known check status")
}

/// Asserts that `name` is the only failed check, that the report has
/// `outcome`, and that the remediation contains each of `steps`.
fn assert_fails_at(report: &pb::VerificationReport, name: &str, outcome: Outcome, steps: &[&str]) {
    let failed: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| c.status == CheckStatus::Failed as i32)
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(failed, vec![name], "failed checks of {report:#?}");
    assert!(!report.ok);
    assert_eq!(report.outcome, outcome as i32, "outcome of {report:#?}");
    let remediation = &check(report, name).remediation;
    for step in steps {
        assert!(
            remediation.contains(step),
            "remediation of {name} lacks {step:?}: {remediation}"
        );
    }
}

/// Asserts that every check after `name` in the fixed order was skipped.
fn assert_rest_skipped(report: &pb::VerificationReport, after: &str) {
    let position = report
        .checks
        .iter()
        .position(|c| c.name == after)
        .expect("check present");
    for later in &report.checks[position + 1..] {
        assert_eq!(
            later.status,
            CheckStatus::Skipped as i32,
            "{} ran after {after} failed",
            later.name
        );
    }
    assert_eq!(
        report.checks.len(),
        4 + GROUPS.len(),
        "every check reported"
    );
}

/// Returns the `check` value of the status's ErrorInfo.
fn error_info_check(status: &tonic::Status) -> String {
    let details = status.get_error_details();
    let info = details.error_info().expect("status carries ErrorInfo");
    assert_eq!(info.domain, "stvault");
    info.metadata.get("check").cloned().unwrap_or_default()
}

async fn correct_setup_passes_every_check(backend: Backend) {
    let (_fake, server) = start(backend, app(), &[]).await;
    let report = verify_unverified(&server, register_request()).await;
    assert!(report.ok, "{report:#?}");
    assert_eq!(report.outcome, Outcome::Passed as i32);
    for check in &report.checks {
        assert_eq!(check.status, CheckStatus::Passed as i32, "{check:?}");
    }
    assert_eq!(report.checks.len(), 14);
    let mut granted = report.granted_scopes.clone();
    granted.sort();
    let mut expected: Vec<String> = ALL_PROBE_SCOPES.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(granted, expected);
}

async fn wrong_secret_fails_token_check(backend: Backend) {
    let (_fake, server) = start(backend, app(), &[]).await;
    let request = pb::RegisterConnectionRequest {
        client_secret: "cs1.not-the-secret".into(),
        ..register_request()
    };
    let report = verify_unverified(&server, request.clone()).await;
    assert_fails_at(
        &report,
        "token",
        Outcome::SetupProblem,
        &["App Connections", "Client Secret"],
    );
    assert!(check(&report, "token").message.contains("invalid_client"));
    assert_rest_skipped(&report, "token");

    let mut client = server.client().await;
    let error = client
        .register_connection(pb::RegisterConnectionRequest {
            tenant_id: TENANT + 1,
            ..request
        })
        .await
        .expect_err("registration verifies first");
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert_eq!(error_info_check(&error), "token");
    assert!(
        error.message().contains("Client Secret"),
        "{}",
        error.message()
    );
    assert!(!error.message().contains("cs1.not-the-secret"));
}

async fn wrong_client_id_fails_token_check(backend: Backend) {
    let (_fake, server) = start(backend, app(), &[]).await;
    let request = pb::RegisterConnectionRequest {
        client_id: "cid.someone-else".into(),
        ..register_request()
    };
    let report = verify_unverified(&server, request).await;
    assert_fails_at(
        &report,
        "token",
        Outcome::SetupProblem,
        &["App Connections", "Client ID"],
    );
    assert_rest_skipped(&report, "token");
}

async fn other_environment_credentials_are_named(backend: Backend) {
    let production = FakeServiceTitan::start().await;
    production.add_app(app());
    let integration = FakeServiceTitan::start().await;
    let server = Server::start_on(backend, &production, &integration, &[]).await;

    let report = verify_unverified(&server, register_request()).await;
    assert_fails_at(
        &report,
        "token",
        Outcome::SetupProblem,
        &["production environment"],
    );
    let message = &check(&report, "token").message;
    assert!(
        message.contains("the production environment accepts them"),
        "{message}"
    );
    assert_eq!(integration.token_requests(), 1);
    assert_eq!(production.token_requests(), 1);
}

async fn wrong_app_key_fails_app_key_check(backend: Backend) {
    let (_fake, server) = start(backend, app(), &[]).await;
    let request = pb::RegisterConnectionRequest {
        app_key: "ak1.not-the-key".into(),
        ..register_request()
    };
    let report = verify_unverified(&server, request).await;
    assert_eq!(status_of(&report, "token"), CheckStatus::Passed);
    assert_eq!(status_of(&report, "tenant"), CheckStatus::Passed);
    assert_fails_at(
        &report,
        "app_key",
        Outcome::SetupProblem,
        &["Application Key", "Developer Portal"],
    );
    assert!(check(&report, "app_key").message.contains("401"));
    assert_rest_skipped(&report, "app_key");
}

async fn disabled_app_fails_app_key_check(backend: Backend) {
    let mut disabled = app();
    disabled.app_enabled = false;
    let (_fake, server) = start(backend, disabled, &[]).await;
    let report = verify_unverified(&server, register_request()).await;
    assert_eq!(status_of(&report, "token"), CheckStatus::Passed);
    assert_fails_at(&report, "app_key", Outcome::SetupProblem, &["not disabled"]);
    assert_rest_skipped(&report, "app_key");
}

async fn unconnected_app_fails_tenant_access(backend: Backend) {
    let mut unconnected = app();
    unconnected.tenant_connected = false;
    let (_fake, server) = start(backend, unconnected, &[]).await;
    let report = verify_unverified(&server, register_request()).await;
    assert_eq!(status_of(&report, "app_key"), CheckStatus::Passed);
    assert_fails_at(
        &report,
        "tenant_access",
        Outcome::SetupProblem,
        &["Settings > Integrations > API Application Access"],
    );
    assert_rest_skipped(&report, "tenant_access");
}

async fn tenant_mismatch_fails_tenant_check(backend: Backend) {
    let (_fake, server) = start(backend, app(), &[]).await;
    let request = pb::RegisterConnectionRequest {
        tenant_id: 9999,
        ..register_request()
    };
    let report = verify_unverified(&server, request).await;
    assert_eq!(status_of(&report, "token"), CheckStatus::Passed);
    assert_fails_at(
        &report,
        "tenant",
        Outcome::SetupProblem,
        &["Tenant ID", "App Connections"],
    );
    let message = &check(&report, "tenant").message;
    assert!(
        message.contains("8450") && message.contains("9999"),
        "{message}"
    );
    assert_rest_skipped(&report, "tenant");
}

/// Checks that a tenant claim listing several tenants, the connection's
/// among them, is reported as naming no single tenant by verification and
/// by token calls.
async fn several_tenant_claim_named(backend: Backend) {
    let (fake, server) = start(backend, app(), &[]).await;
    fake.set_tenant_claim(Some(serde_json::json!(["8450", "1001"])));
    let report = verify_unverified(&server, register_request()).await;
    assert_fails_at(
        &report,
        "tenant",
        Outcome::SetupProblem,
        &["Tenant ID", "App Connections"],
    );
    let message = &check(&report, "tenant").message;
    assert!(message.contains("does not name one tenant"), "{message}");
    assert!(!message.contains("issued for tenant"), "{message}");

    let status = token_of_tenant(&server).await.expect_err("refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("does not name one tenant"),
        "{status:?}"
    );
}

async fn each_missing_scope_group_warns(backend: Backend) {
    let fake = FakeServiceTitan::start().await;
    for (index, (_, _, scope)) in GROUPS.iter().enumerate() {
        let tenant = 100 + index as i64;
        let mut app = FakeApp::new(format!("cid.scope{index}"), SECRET, tenant, APP_KEY);
        app.scopes.retain(|s| s != scope);
        fake.add_app(app);
    }
    let server = Server::start_on(backend, &fake, &fake, &[]).await;

    for (index, (key, title, scope)) in GROUPS.iter().enumerate() {
        let request = pb::RegisterConnectionRequest {
            tenant_id: 100 + index as i64,
            client_id: format!("cid.scope{index}"),
            ..register_request()
        };
        let report = verify_unverified(&server, request).await;
        let name = format!("scope:{key}");
        assert!(
            report.ok,
            "a group that is not required only warns: {report:#?}"
        );
        assert_eq!(report.outcome, Outcome::Passed as i32);
        assert_eq!(status_of(&report, &name), CheckStatus::Warning);
        let warned: Vec<&str> = report
            .checks
            .iter()
            .filter(|c| c.status != CheckStatus::Passed as i32)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(warned, vec![name.as_str()]);
        let remediation = &check(&report, &name).remediation;
        assert!(remediation.contains(title), "{remediation}");
        assert!(remediation.contains(scope), "{remediation}");
        assert!(remediation.contains("Developer Portal"), "{remediation}");
        let message = &check(&report, &name).message;
        assert!(message.contains("does not list it"), "{message}");
        assert!(!report.granted_scopes.iter().any(|s| s == scope));
    }
}

async fn missing_required_group_fails(backend: Backend) {
    let mut partial = app();
    partial
        .scopes
        .retain(|s| s != "tn.pb.categories:r" && s != "tn.mrk.categories:r");
    let (_fake, server) = start(backend, partial, &[]).await;
    let request = pb::RegisterConnectionRequest {
        required_scope_groups: vec!["accounting".into(), "pricebook".into()],
        ..register_request()
    };

    let mut client = server.client().await;
    let error = client
        .register_connection(request.clone())
        .await
        .expect_err("a required group is missing");
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert_eq!(error_info_check(&error), "scope:pricebook");
    let details = error.get_error_details();
    let violations = &details
        .precondition_failure()
        .expect("PreconditionFailure detail")
        .violations;
    let types: Vec<&str> = violations.iter().map(|v| v.r#type.as_str()).collect();
    assert_eq!(types, vec!["scope:pricebook"]);

    let report = verify_unverified(&server, request).await;
    assert_fails_at(
        &report,
        "scope:pricebook",
        Outcome::SetupProblem,
        &[
            "Pricebook",
            "Developer Portal",
            "accept the new app version",
        ],
    );
    assert_eq!(status_of(&report, "scope:accounting"), CheckStatus::Passed);
    assert_eq!(status_of(&report, "scope:marketing"), CheckStatus::Warning);
}

async fn token_timeout_is_upstream_trouble(backend: Backend) {
    let (fake, server) = start(backend, app(), &[("STVAULT_UPSTREAM_TIMEOUT", "1s")]).await;
    fake.set_token_fault(Fault::Hang);
    let report = verify_unverified(&server, register_request()).await;
    assert_fails_at(
        &report,
        "token",
        Outcome::UpstreamUnavailable,
        &["retry the verification later"],
    );
    assert!(check(&report, "token").message.contains("timed out"));

    let mut client = server.client().await;
    let error = client
        .register_connection(pb::RegisterConnectionRequest {
            tenant_id: TENANT + 1,
            ..register_request()
        })
        .await
        .expect_err("ServiceTitan does not answer");
    assert_eq!(error.code(), Code::Unavailable);
    assert_eq!(error_info_check(&error), "token");
}

async fn api_timeout_is_upstream_trouble(backend: Backend) {
    let (fake, server) = start(backend, app(), &[("STVAULT_UPSTREAM_TIMEOUT", "1s")]).await;
    fake.set_api_fault(Fault::Hang);
    let report = verify_unverified(&server, register_request()).await;
    assert_eq!(status_of(&report, "token"), CheckStatus::Passed);
    assert_fails_at(
        &report,
        "app_key",
        Outcome::UpstreamUnavailable,
        &["retry the verification later"],
    );
}

/// Checks that verification calls go under a path in the API URL, as
/// behind a proxy, and that callers get the same URL. Without the path,
/// every call gets 404 and the report names the setting.
async fn api_url_path_is_kept(backend: Backend) {
    let fake = FakeServiceTitan::start().await;
    fake.add_app(app());
    fake.set_api_prefix("/gateway");
    let behind_proxy = format!("{}/gateway", fake.api_url());
    let server = Server::start_on(
        backend,
        &fake,
        &fake,
        &[("STVAULT_INTEGRATION_API_URL", &behind_proxy)],
    )
    .await;
    let report = verify_unverified(&server, register_request()).await;
    assert!(report.ok, "{report:#?}");
    let token = token_of_tenant(&server).await.expect("a token");
    assert_eq!(token.api_base_url, behind_proxy);

    let direct = Server::start_on(backend, &fake, &fake, &[]).await;
    let report = verify_unverified(&direct, register_request()).await;
    assert_eq!(status_of(&report, "token"), CheckStatus::Passed);
    assert_fails_at(
        &report,
        "app_key",
        Outcome::UpstreamUnavailable,
        &["check the API URL setting"],
    );
    let message = &check(&report, "app_key").message;
    assert!(
        message.contains("HTTP 404") && message.contains("STVAULT_INTEGRATION_API_URL"),
        "{message}"
    );
}

async fn server_errors_are_upstream_trouble(backend: Backend) {
    let (fake, server) = start(backend, app(), &[]).await;
    fake.set_token_fault(Fault::Status(503));
    let report = verify_unverified(&server, register_request()).await;
    assert_fails_at(
        &report,
        "token",
        Outcome::UpstreamUnavailable,
        &["retry the verification later"],
    );
    assert!(check(&report, "token").message.contains("HTTP 503"));

    fake.set_token_fault(Fault::None);
    fake.set_api_fault(Fault::Status(500));
    let request = pb::RegisterConnectionRequest {
        tenant_id: TENANT,
        ..register_request()
    };
    let mut client = server.client().await;
    let listed = client
        .list_connections(pb::ListConnectionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let report = client
        .verify_connection(pb::VerifyConnectionRequest {
            connection_id: listed.connections[0].connection_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status_of(&report, "token"), CheckStatus::Passed);
    assert_fails_at(
        &report,
        "app_key",
        Outcome::UpstreamUnavailable,
        &["retry the verification later"],
    );
    let message = &check(&report, "app_key").message;
    assert!(message.ends_with("calls: HTTP 500"), "{message}");
    client
        .delete_connection(pb::DeleteConnectionRequest {
            connection_id: listed.connections[0].connection_id.clone(),
        })
        .await
        .unwrap();
    let error = client
        .register_connection(request)
        .await
        .expect_err("the API answers 500");
    assert_eq!(error.code(), Code::Unavailable);
}

async fn short_token_lifetime_logged(backend: Backend) {
    let (fake, server) = start(backend, app(), &[]).await;
    fake.set_token_lifetime(30);
    let mut client = server.client().await;
    let connection = register_unverified(&mut client, register_request()).await;
    let request = pb::GetAccessTokenRequest {
        connection_id: connection.connection_id.clone(),
        ..Default::default()
    };

    client
        .get_access_token(request.clone())
        .await
        .expect("a token");
    client.get_access_token(request).await.expect("a token");

    let logs = server.logs();
    let warnings = logs
        .lines()
        .filter(|line| line.contains("token valid for less than a minute"))
        .collect::<Vec<_>>();
    assert_eq!(warnings.len(), 1, "{logs}");
    assert!(warnings[0].contains(&connection.connection_id), "{logs}");
    assert!(warnings[0].contains("lifetime_s=30"), "{logs}");
}

async fn concurrent_verifications_share_one(backend: Backend) {
    let (fake, server) = start(backend, app(), &[]).await;
    let mut client = server.client().await;
    let connection = register_unverified(&mut client, register_request()).await;
    fake.set_token_delay(Duration::from_millis(300));

    let calls = (0..20).map(|_| {
        let mut client = client.clone();
        let request = pb::VerifyConnectionRequest {
            connection_id: connection.connection_id.clone(),
        };
        async move { client.verify_connection(request).await }
    });
    let reports = futures::future::join_all(calls).await;
    let api_requests = fake.api_requests();
    let later = client
        .verify_connection(pb::VerifyConnectionRequest {
            connection_id: connection.connection_id.clone(),
        })
        .await;

    for report in reports {
        assert!(report.expect("a report").into_inner().ok);
    }
    assert!(later.expect("a report").into_inner().ok);
    assert_eq!(
        fake.token_requests(),
        2,
        "one for the 20 calls, one for the later call"
    );
    assert_eq!(fake.api_requests(), 2 * api_requests);
}

async fn token_pause_shared_with_verification(backend: Backend) {
    let (fake, server) = start(backend, app(), &[]).await;
    let mut client = server.client().await;
    let connection = register_unverified(&mut client, register_request()).await;
    let verify = pb::VerifyConnectionRequest {
        connection_id: connection.connection_id.clone(),
    };
    let get_token = pb::GetAccessTokenRequest {
        connection_id: connection.connection_id.clone(),
        ..Default::default()
    };

    // A 429 met by VerifyConnection pauses the token requests of both paths.
    client
        .get_access_token(get_token.clone())
        .await
        .expect("a token");
    fake.set_token_fault(Fault::RateLimited {
        retry_after_secs: 30,
    });
    let limited = client.verify_connection(verify.clone()).await.unwrap();
    fake.set_token_fault(Fault::None);
    let paused = client.verify_connection(verify.clone()).await.unwrap();
    let requests = fake.token_requests();

    assert_fails_at(
        &limited.into_inner(),
        "token",
        Outcome::RateLimited,
        &["retry the verification later"],
    );
    let paused = paused.into_inner();
    assert_fails_at(
        &paused,
        "token",
        Outcome::RateLimited,
        &["retry the verification later"],
    );
    let message = &check(&paused, "token").message;
    assert!(message.contains("paused"), "{message}");
    assert_eq!(requests, 2, "the paused verification reached ServiceTitan");

    // Reporting the pause does not extend it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = client.verify_connection(verify.clone()).await.unwrap();
    let wait = |report: &pb::VerificationReport| -> u64 {
        let message = &check(report, "token").message;
        let seconds = message.rsplit("retry after ").next().unwrap();
        seconds.trim_end_matches(" s").parse().unwrap()
    };
    assert!(wait(&again.into_inner()) < wait(&paused), "{paused:#?}");

    // A pause that GetAccessToken met holds for VerifyConnection too.
    fake.set_token_fault(Fault::RateLimited {
        retry_after_secs: 30,
    });
    let second = register_unverified(
        &mut client,
        pb::RegisterConnectionRequest {
            tenant_id: TENANT + 1,
            ..register_request()
        },
    )
    .await;
    let status = client
        .get_access_token(pb::GetAccessTokenRequest {
            connection_id: second.connection_id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("rate limited");
    fake.set_token_fault(Fault::None);
    let report = client
        .verify_connection(pb::VerifyConnectionRequest {
            connection_id: second.connection_id,
        })
        .await
        .unwrap()
        .into_inner();

    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(report.outcome, Outcome::RateLimited as i32, "{report:#?}");
    assert_eq!(fake.token_requests(), 3);

    // A 429 met by the first VerifyConnection of a connection no caller has
    // used yet pauses its token requests as well.
    let third = register_unverified(
        &mut client,
        pb::RegisterConnectionRequest {
            tenant_id: TENANT + 2,
            ..register_request()
        },
    )
    .await;
    fake.set_token_fault(Fault::RateLimited {
        retry_after_secs: 30,
    });
    let report = client
        .verify_connection(pb::VerifyConnectionRequest {
            connection_id: third.connection_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    fake.set_token_fault(Fault::None);
    let status = client
        .get_access_token(pb::GetAccessTokenRequest {
            connection_id: third.connection_id,
            ..Default::default()
        })
        .await
        .expect_err("paused");

    assert_eq!(report.outcome, Outcome::RateLimited as i32, "{report:#?}");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(fake.token_requests(), 4);
}

async fn rate_limits_are_reported_with_delay(backend: Backend) {
    let (fake, server) = start(backend, app(), &[]).await;
    fake.set_token_fault(Fault::RateLimited {
        retry_after_secs: 30,
    });
    let report = verify_unverified(&server, register_request()).await;
    assert_fails_at(
        &report,
        "token",
        Outcome::RateLimited,
        &["retry the verification later"],
    );
    assert!(check(&report, "token").message.contains("30 s"));

    let mut client = server.client().await;
    let error = client
        .register_connection(pb::RegisterConnectionRequest {
            tenant_id: TENANT + 1,
            ..register_request()
        })
        .await
        .expect_err("rate limited");
    assert_eq!(error.code(), Code::ResourceExhausted);
    assert_eq!(error_info_check(&error), "token");
    let details = error.get_error_details();
    let retry = details.retry_info().expect("RetryInfo detail");
    assert_eq!(retry.retry_delay, Some(Duration::from_secs(30)));

    // The connection's token requests are paused for 30 s now, so a new
    // connection in its place meets the API's limit.
    let listed = client
        .list_connections(pb::ListConnectionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    client
        .delete_connection(pb::DeleteConnectionRequest {
            connection_id: listed.connections[0].connection_id.clone(),
        })
        .await
        .unwrap();
    fake.set_token_fault(Fault::None);
    fake.set_api_fault(Fault::RateLimited {
        retry_after_secs: 7,
    });
    let report = verify_unverified(&server, register_request()).await;
    assert_fails_at(
        &report,
        "app_key",
        Outcome::RateLimited,
        &["retry the verification later"],
    );
    let message = &check(&report, "app_key").message;
    assert!(message.contains("(HTTP 429); retry after 7 s"), "{message}");
}

async fn enterprise_hub_names_tenant(backend: Backend) {
    let fake = FakeServiceTitan::start().await;
    let mut hub = FakeApp::new("cid.hub", SECRET, 0, APP_KEY);
    hub.enterprise_hub_tenants = vec![501, 502];
    fake.add_app(hub);
    fake.add_app(app());
    let server = Server::start_on(backend, &fake, &fake, &[]).await;
    let mut client = server.client().await;

    let hub_request = |tenant_id: i64| pb::RegisterConnectionRequest {
        tenant_id,
        client_id: "cid.hub".into(),
        enterprise_hub: true,
        ..register_request()
    };
    let first = client
        .register_connection(hub_request(501))
        .await
        .expect("hub tenant 501")
        .into_inner();
    assert!(first.enterprise_hub);
    let form = fake.last_token_form().expect("token requested");
    assert!(form.contains(&("tenant".into(), "501".into())), "{form:?}");

    let second = client
        .register_connection(hub_request(502))
        .await
        .expect("the same credentials for hub tenant 502")
        .into_inner();
    assert_ne!(first.connection_id, second.connection_id);
    let token = client
        .get_access_token(pb::GetAccessTokenRequest {
            connection_id: second.connection_id.clone(),
            ..Default::default()
        })
        .await
        .expect("token for tenant 502")
        .into_inner();
    assert_eq!(token.tenant_id, 502);
    let form = fake.last_token_form().expect("token requested");
    assert!(form.contains(&("tenant".into(), "502".into())), "{form:?}");

    // A tenant outside the hub.
    let report = verify_unverified(&server, hub_request(503)).await;
    assert_fails_at(&report, "token", Outcome::SetupProblem, &["Enterprise Hub"]);

    // Hub credentials registered without the flag.
    let report = verify_unverified(
        &server,
        pb::RegisterConnectionRequest {
            enterprise_hub: false,
            ..hub_request(504)
        },
    )
    .await;
    assert_fails_at(&report, "token", Outcome::SetupProblem, &["enterprise_hub"]);
    let form = fake.last_token_form().expect("token requested");
    assert!(!form.iter().any(|(name, _)| name == "tenant"), "{form:?}");

    // Ordinary credentials never send the field.
    client
        .register_connection(register_request())
        .await
        .expect("ordinary connection");
    let form = fake.last_token_form().expect("token requested");
    assert!(!form.iter().any(|(name, _)| name == "tenant"), "{form:?}");
}
