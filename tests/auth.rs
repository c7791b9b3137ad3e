//! Caller identity and authorization against the real binary: TLS and
//! mutual TLS with certificates made here, bearer keys, the role policy,
//! tenant limits, SIGHUP reload and the startup rules. Every test that
//! starts a server runs on sled and on PostgreSQL.

mod support;

use std::collections::HashMap;
use std::path::Path;

use stvault::pb;
use support::backend::Backend;
use support::callers::{Key, write_policy};
use support::certs::Pki;
use support::fake_servicetitan::{FakeApp, FakeServiceTitan};
use support::server::{Server, grpcurl, grpcurl_error, json, run_command, run_expecting_exit};
use tonic::{Code, Request};

const CLIENT_ID: &str = "cid.auth";
const SECRET_1: &str = "cs1.auth-secret-one";
const SECRET_2: &str = "cs2.auth-secret-two";
const APP_KEY: &str = "ak1.auth-app-key";
const TENANT_A: i64 = 8450;
const TENANT_B: i64 = 9001;

const ADMIN_URI: &str = "spiffe://stvault.test/admin";
const BILLING_URI: &str = "spiffe://stvault.test/billing";

backend_tests!(
    mtls_identity_from_certificate,
    mtls_rejects_bad_client_certificates,
    tls_with_bearer_key,
    every_role_against_every_rpc,
    token_caller_limited_to_its_tenants,
    missing_or_unknown_credentials_unauthenticated,
    sighup_reload_denies_removed_caller,
    open_watch_ends_when_its_caller_is_removed,
    open_mode_warns_at_startup,
    keygen_output_works_as_policy,
);

/// Starts a fake ServiceTitan with an app for tenants A and B.
async fn fake() -> FakeServiceTitan {
    let fake = FakeServiceTitan::start().await;
    for (tenant, client_id) in [(TENANT_A, CLIENT_ID), (TENANT_B, "cid.auth-b")] {
        let mut app = FakeApp::new(client_id, SECRET_1, tenant, APP_KEY);
        app.client_secrets.push(SECRET_2.into());
        fake.add_app(app);
    }
    fake
}

fn register_request(tenant_id: i64, client_id: &str) -> pb::RegisterConnectionRequest {
    pb::RegisterConnectionRequest {
        environment: pb::Environment::Integration as i32,
        tenant_id,
        client_id: client_id.into(),
        client_secret: SECRET_1.into(),
        app_key: APP_KEY.into(),
        display_name: format!("tenant {tenant_id}"),
        ..Default::default()
    }
}

fn by_tenant(tenant_id: i64) -> pb::GetAccessTokenRequest {
    pb::GetAccessTokenRequest {
        environment: pb::Environment::Integration as i32,
        tenant_id,
        ..Default::default()
    }
}

fn by_connection(id: &str) -> pb::GetAccessTokenRequest {
    pb::GetAccessTokenRequest {
        connection_id: id.into(),
        ..Default::default()
    }
}

/// Starts stvault with mutual TLS: server certificate, client CA and a
/// policy naming the admin and billing certificates.
async fn start_mtls(backend: Backend, fake: &FakeServiceTitan, pki: &Pki, dir: &Path) -> Server {
    let server_files = pki.server();
    let policy = write_policy(
        dir,
        &format!(
            "[[caller]]\ncertificate = \"{ADMIN_URI}\"\nroles = [\"admin\"]\n\n\
             [[caller]]\ncertificate = \"{BILLING_URI}\"\nroles = [\"token\"]\ntenants = [{TENANT_A}]\n"
        ),
    );
    Server::start_on(
        backend,
        fake,
        fake,
        &[
            ("STVAULT_TLS_CERT", server_files.cert.to_str().unwrap()),
            ("STVAULT_TLS_KEY", server_files.key.to_str().unwrap()),
            ("STVAULT_CLIENT_CA", pki.ca_path.to_str().unwrap()),
            ("STVAULT_POLICY_FILE", policy.to_str().unwrap()),
        ],
    )
    .await
}

async fn mtls_identity_from_certificate(backend: Backend) {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "good");
    let server = start_mtls(backend, &fake, &pki, dir.path()).await;
    assert!(server.logs().contains("tls=\"mutual\"") || server.logs().contains("tls=mutual"));
    let admin = pki.client("admin", ADMIN_URI);
    let billing = pki.client("billing", BILLING_URI);

    // grpcurl with -cacert, -cert and -key: reflection and an admin call.
    let output = server.grpcurl_tls(&pki.ca_path, Some(&admin), &[], &["list"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("stvault.v1.CredentialVault"));
    let listed = json(&server.grpcurl_tls(
        &pki.ca_path,
        Some(&admin),
        &["-d", "{}"],
        &["stvault.v1.CredentialVault/ListConnections"],
    ));
    assert!(listed.is_object(), "{listed}");

    // The admin certificate cannot mint tokens; the billing one cannot list.
    let output = server.grpcurl_tls(
        &pki.ca_path,
        Some(&admin),
        &[
            "-d",
            &format!(r#"{{"environment":"ENVIRONMENT_INTEGRATION","tenant_id":{TENANT_A}}}"#),
        ],
        &["stvault.v1.CredentialVault/GetAccessToken"],
    );
    let error = grpcurl_error(&output, "PermissionDenied");
    assert!(error.contains(ADMIN_URI), "{error}");
    assert!(error.contains("GetAccessToken"), "{error}");

    let mut client = server
        .tls_client(&pki.ca_path, Some(&billing))
        .await
        .unwrap();
    let denied = client
        .list_connections(pb::ListConnectionsRequest::default())
        .await
        .expect_err("billing may not list");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(
        denied.message().contains(BILLING_URI),
        "{}",
        denied.message()
    );

    // A certificate from the CA whose identity the policy does not name.
    let stranger = pki.client("stranger", "spiffe://stvault.test/stranger");
    let mut client = server
        .tls_client(&pki.ca_path, Some(&stranger))
        .await
        .unwrap();
    let denied = client
        .list_connections(pb::ListConnectionsRequest::default())
        .await
        .expect_err("unlisted identity");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(
        denied.message().contains("stranger"),
        "{}",
        denied.message()
    );
}

/// Asserts that a client presenting `client` over mutual TLS cannot call.
async fn assert_rejected(
    server: &Server,
    ca: &Path,
    client: Option<&support::certs::CertFiles>,
    case: &str,
) {
    match server.tls_client(ca, client).await {
        Err(_) => {}
        Ok(mut connected) => {
            let error = connected
                .list_connections(pb::ListConnectionsRequest::default())
                .await
                .expect_err(case);
            assert!(
                matches!(
                    error.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled
                ),
                "{case}: {error:?}"
            );
        }
    }
}

async fn mtls_rejects_bad_client_certificates(backend: Backend) {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "good");
    let server = start_mtls(backend, &fake, &pki, dir.path()).await;
    let other_ca = Pki::new(dir.path(), "unknown");
    let foreign = other_ca.client("admin", ADMIN_URI);
    let expired = pki.expired_client("expired", ADMIN_URI);

    assert_rejected(&server, &pki.ca_path, None, "no client certificate").await;
    assert_rejected(&server, &pki.ca_path, Some(&foreign), "unknown CA").await;
    assert_rejected(&server, &pki.ca_path, Some(&expired), "expired").await;

    for (case, files) in [
        ("no client certificate", None),
        ("unknown CA", Some(&foreign)),
        ("expired", Some(&expired)),
    ] {
        // The server drops the handshake, so grpcurl fails to dial.
        let output = server.grpcurl_tls(&pki.ca_path, files, &["-connect-timeout", "3"], &["list"]);
        assert!(!output.status.success(), "grpcurl with {case} succeeded");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("Failed to dial"), "{case}: {stderr}");
    }

    // A client that does not trust the server's CA refuses the server.
    let output = server.grpcurl_tls(
        &other_ca.ca_path,
        Some(&pki.client("admin", ADMIN_URI)),
        &["-connect-timeout", "3"],
        &["list"],
    );
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("certificate"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Plaintext against the TLS port fails.
    let output = grpcurl(&[
        "-plaintext",
        "-connect-timeout",
        "3",
        &server.addr.to_string(),
        "list",
    ]);
    assert!(!output.status.success());

    // The valid certificate still works after the rejections.
    let mut client = server
        .tls_client(&pki.ca_path, Some(&pki.client("admin", ADMIN_URI)))
        .await
        .unwrap();
    client
        .list_connections(pb::ListConnectionsRequest::default())
        .await
        .expect("admin lists over mutual TLS");
}

async fn tls_with_bearer_key(backend: Backend) {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "good");
    let server_files = pki.server();
    let ops = Key::new("ops");
    let policy = write_policy(dir.path(), &ops.entry(r#"["admin"]"#, None));
    let server = Server::start_on(
        backend,
        &fake,
        &fake,
        &[
            ("STVAULT_TLS_CERT", server_files.cert.to_str().unwrap()),
            ("STVAULT_TLS_KEY", server_files.key.to_str().unwrap()),
            ("STVAULT_POLICY_FILE", policy.to_str().unwrap()),
        ],
    )
    .await;

    // grpcurl needs only -cacert and the key header.
    let listed = json(&server.grpcurl_tls(
        &pki.ca_path,
        None,
        &["-H", &ops.header(), "-d", "{}"],
        &["stvault.v1.CredentialVault/ListConnections"],
    ));
    assert!(listed.is_object(), "{listed}");
    let output = server.grpcurl_tls(
        &pki.ca_path,
        None,
        &["-d", "{}"],
        &["stvault.v1.CredentialVault/ListConnections"],
    );
    grpcurl_error(&output, "Unauthenticated");

    let mut client = server.tls_client(&pki.ca_path, None).await.unwrap();
    client
        .list_connections(ops.request(pb::ListConnectionsRequest::default()))
        .await
        .expect("bearer key over TLS");
}

/// Returns whether any of `roles` allows `rpc`, as the policy defines them.
fn allowed(roles: &[&str], rpc: &str) -> bool {
    roles.iter().any(|role| match *role {
        "link" => matches!(
            rpc,
            "RegisterConnection" | "GetConnection" | "VerifyConnection"
        ),
        "admin" => matches!(
            rpc,
            "GetConnection"
                | "ListConnections"
                | "RotateCredentials"
                | "RollbackCredentials"
                | "VerifyConnection"
                | "DeleteConnection"
                | "UpdateConnection"
                | "WatchConnectionStatus"
                | "ListAuditEvents"
        ),
        "token" => rpc == "GetAccessToken",
        _ => false,
    })
}

/// Calls `rpc` as `key` with a valid request and returns the status code.
async fn call(
    client: &mut pb::credential_vault_client::CredentialVaultClient<tonic::transport::Channel>,
    key: &Key,
    rpc: &str,
    connection_id: &str,
) -> tonic::Status {
    let id = connection_id.to_owned();
    let missing = uuid::Uuid::new_v4().to_string();
    let result = match rpc {
        "RegisterConnection" => client
            .register_connection(key.request(register_request(TENANT_A, CLIENT_ID)))
            .await
            .map(|_| ()),
        "GetConnection" => client
            .get_connection(key.request(pb::GetConnectionRequest { connection_id: id }))
            .await
            .map(|_| ()),
        "ListConnections" => client
            .list_connections(key.request(pb::ListConnectionsRequest::default()))
            .await
            .map(|_| ()),
        "RotateCredentials" => client
            .rotate_credentials(key.request(pb::RotateCredentialsRequest {
                connection_id: id,
                client_secret: SECRET_2.into(),
                ..Default::default()
            }))
            .await
            .map(|_| ()),
        "RollbackCredentials" => client
            .rollback_credentials(key.request(pb::RollbackCredentialsRequest { connection_id: id }))
            .await
            .map(|_| ()),
        "VerifyConnection" => client
            .verify_connection(key.request(pb::VerifyConnectionRequest { connection_id: id }))
            .await
            .map(|_| ()),
        // A connection that does not exist, so the table keeps its connection.
        "DeleteConnection" => client
            .delete_connection(key.request(pb::DeleteConnectionRequest {
                connection_id: missing,
            }))
            .await
            .map(|_| ()),
        "GetAccessToken" => client
            .get_access_token(key.request(by_tenant(TENANT_A)))
            .await
            .map(|_| ()),
        "UpdateConnection" => client
            .update_connection(key.request(pb::UpdateConnectionRequest {
                connection: Some(pb::Connection {
                    connection_id: id,
                    display_name: format!("renamed by {}", key.name),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["display_name".into()],
                }),
                ..Default::default()
            }))
            .await
            .map(|_| ()),
        // The stream is dropped once the call is accepted.
        "WatchConnectionStatus" => client
            .watch_connection_status(key.request(pb::WatchConnectionStatusRequest {
                connection_id: id,
                ..Default::default()
            }))
            .await
            .map(|_| ()),
        "ListAuditEvents" => client
            .list_audit_events(key.request(pb::ListAuditEventsRequest::default()))
            .await
            .map(|_| ()),
        other => panic!("no call for {other}"),
    };
    match result {
        Ok(()) => tonic::Status::ok(""),
        Err(status) => status,
    }
}

const RPCS: [&str; 11] = [
    "RegisterConnection",
    "GetConnection",
    "ListConnections",
    "RotateCredentials",
    "RollbackCredentials",
    "VerifyConnection",
    "DeleteConnection",
    "GetAccessToken",
    "UpdateConnection",
    "WatchConnectionStatus",
    "ListAuditEvents",
];

async fn every_role_against_every_rpc(backend: Backend) {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let callers: Vec<(Key, &[&str])> = vec![
        (Key::new("linker"), &["link"]),
        (Key::new("operator"), &["admin"]),
        (Key::new("biller"), &["token"]),
        (Key::new("operator-biller"), &["admin", "token"]),
        (Key::new("everything"), &["link", "admin", "token"]),
    ];
    let mut policy = String::new();
    for (key, roles) in &callers {
        let roles_toml = format!(
            "[{}]",
            roles
                .iter()
                .map(|r| format!("\"{r}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let tenants = roles.contains(&"token").then_some("[8450]");
        policy.push_str(&key.entry(&roles_toml, tenants));
    }
    let policy = write_policy(dir.path(), &policy);
    let server = Server::start_on(
        backend,
        &fake,
        &fake,
        &[("STVAULT_POLICY_FILE", policy.to_str().unwrap())],
    )
    .await;
    let mut client = server.client().await;
    let connection_id = client
        .register_connection(callers[0].0.request(register_request(TENANT_A, CLIENT_ID)))
        .await
        .expect("link registers")
        .into_inner()
        .connection_id;

    for (key, roles) in &callers {
        for rpc in RPCS {
            let status = call(&mut client, key, rpc, &connection_id).await;
            if allowed(roles, rpc) {
                assert!(
                    !matches!(
                        status.code(),
                        Code::PermissionDenied | Code::Unauthenticated
                    ),
                    "{} ({roles:?}) denied {rpc}: {status:?}",
                    key.name
                );
                let expected = match rpc {
                    "DeleteConnection" => Code::NotFound,
                    _ => Code::Ok,
                };
                if rpc != "RollbackCredentials" {
                    assert_eq!(status.code(), expected, "{} {rpc}: {status:?}", key.name);
                }
            } else {
                assert_eq!(
                    status.code(),
                    Code::PermissionDenied,
                    "{} ({roles:?}) allowed {rpc}: {status:?}",
                    key.name
                );
                assert_eq!(
                    status.message(),
                    format!("caller \"{}\" is not allowed to call {rpc}", key.name)
                );
            }
        }
    }

    // The registration recorded the caller's identity in the version.
    let connection = client
        .get_connection(callers[1].0.request(pb::GetConnectionRequest {
            connection_id: connection_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    let first = connection
        .versions
        .iter()
        .find(|v| v.version == 1)
        .expect("version 1");
    assert_eq!(first.created_by, "linker");
    let latest = connection
        .versions
        .iter()
        .max_by_key(|v| v.version)
        .unwrap();
    assert!(
        ["operator", "operator-biller", "everything"].contains(&latest.created_by.as_str()),
        "{}",
        latest.created_by
    );
}

async fn token_caller_limited_to_its_tenants(backend: Backend) {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let linker = Key::new("linker");
    let biller = Key::new("biller");
    let policy = write_policy(
        dir.path(),
        &format!(
            "{}{}",
            linker.entry(r#"["link"]"#, None),
            biller.entry(r#"["token"]"#, Some(&format!("[{TENANT_A}]")))
        ),
    );
    let server = Server::start_on(
        backend,
        &fake,
        &fake,
        &[("STVAULT_POLICY_FILE", policy.to_str().unwrap())],
    )
    .await;
    let mut client = server.client().await;
    let id_a = client
        .register_connection(linker.request(register_request(TENANT_A, CLIENT_ID)))
        .await
        .unwrap()
        .into_inner()
        .connection_id;
    let id_b = client
        .register_connection(linker.request(register_request(TENANT_B, "cid.auth-b")))
        .await
        .unwrap()
        .into_inner()
        .connection_id;

    let token = client
        .get_access_token(biller.request(by_tenant(TENANT_A)))
        .await
        .expect("own tenant by tenant")
        .into_inner();
    assert_eq!(token.tenant_id, TENANT_A);
    client
        .get_access_token(biller.request(by_connection(&id_a)))
        .await
        .expect("own tenant by connection id");
    let upstream_before = fake.token_requests();

    // Another tenant: registered or not, the same denial.
    let registered = client
        .get_access_token(biller.request(by_tenant(TENANT_B)))
        .await
        .expect_err("tenant B");
    let unregistered = client
        .get_access_token(biller.request(by_tenant(777)))
        .await
        .expect_err("tenant 777");
    assert_eq!(registered.code(), Code::PermissionDenied);
    assert_eq!(unregistered.code(), Code::PermissionDenied);
    assert_eq!(
        registered.message(),
        format!("caller \"biller\" is not allowed to call GetAccessToken for tenant {TENANT_B}")
    );
    assert_eq!(
        unregistered.message(),
        registered.message().replace(&TENANT_B.to_string(), "777")
    );

    // Another tenant's connection id, and an id that does not exist.
    let missing = uuid::Uuid::new_v4().to_string();
    let other = client
        .get_access_token(biller.request(by_connection(&id_b)))
        .await
        .expect_err("connection of tenant B");
    let absent = client
        .get_access_token(biller.request(by_connection(&missing)))
        .await
        .expect_err("connection that does not exist");
    assert_eq!(other.code(), Code::PermissionDenied);
    assert_eq!(absent.code(), Code::PermissionDenied);
    assert_eq!(
        other.message(),
        format!("caller \"biller\" is not allowed to call GetAccessToken for connection {id_b}")
    );
    assert_eq!(absent.message(), other.message().replace(&id_b, &missing));
    // The id is random hex and may contain the tenant's digits by chance.
    assert!(
        !other
            .message()
            .replace(&id_b, "")
            .contains(&TENANT_B.to_string())
    );
    assert_eq!(
        fake.token_requests(),
        upstream_before,
        "a denied call reached ServiceTitan"
    );
}

async fn missing_or_unknown_credentials_unauthenticated(backend: Backend) {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let ops = Key::new("ops");
    let policy = write_policy(dir.path(), &ops.entry(r#"["admin"]"#, None));
    let server = Server::start_on(
        backend,
        &fake,
        &fake,
        &[("STVAULT_POLICY_FILE", policy.to_str().unwrap())],
    )
    .await;
    let mut client = server.client().await;

    let none = client
        .list_connections(pb::ListConnectionsRequest::default())
        .await
        .expect_err("no credentials");
    assert_eq!(none.code(), Code::Unauthenticated);
    let stranger = Key::new("stranger");
    let unknown = client
        .list_connections(stranger.request(pb::ListConnectionsRequest::default()))
        .await
        .expect_err("unknown key");
    assert_eq!(unknown.code(), Code::Unauthenticated);
    assert!(!unknown.message().contains(&stranger.key));
    let mut malformed = Request::new(pb::ListConnectionsRequest::default());
    malformed
        .metadata_mut()
        .insert("authorization", "Basic b3BzOnNlY3JldA==".parse().unwrap());
    let malformed = client
        .list_connections(malformed)
        .await
        .expect_err("not a bearer key");
    assert_eq!(malformed.code(), Code::Unauthenticated);
    assert!(
        !server.logs().contains(&stranger.key),
        "a key reached the log"
    );

    // Health and reflection need no credentials.
    let health = json(&grpcurl(&[
        "-plaintext",
        &server.addr.to_string(),
        "grpc.health.v1.Health/Check",
    ]));
    assert_eq!(health["status"], "SERVING");
    let output = grpcurl(&["-plaintext", &server.addr.to_string(), "list"]);
    assert!(output.status.success());

    // grpcurl with the key header.
    let output = grpcurl(&[
        "-plaintext",
        "-H",
        &ops.header(),
        "-d",
        "{}",
        &server.addr.to_string(),
        "stvault.v1.CredentialVault/ListConnections",
    ]);
    assert!(json(&output).is_object());
}

async fn sighup_reload_denies_removed_caller(backend: Backend) {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let ops = Key::new("ops");
    let auditor = Key::new("auditor");
    let policy = write_policy(
        dir.path(),
        &format!(
            "{}{}",
            ops.entry(r#"["admin"]"#, None),
            auditor.entry(r#"["admin"]"#, None)
        ),
    );
    let server = Server::start_on(
        backend,
        &fake,
        &fake,
        &[("STVAULT_POLICY_FILE", policy.to_str().unwrap())],
    )
    .await;
    let mut client = server.client().await;
    for key in [&ops, &auditor] {
        client
            .list_connections(key.request(pb::ListConnectionsRequest::default()))
            .await
            .expect("listed caller");
    }

    // Remove the auditor; the same connection carries on for ops.
    write_policy(dir.path(), &ops.entry(r#"["admin"]"#, None));
    let line = server.reload_policy().await;
    assert!(line.contains("policy reloaded"), "{line}");
    let removed = client
        .list_connections(auditor.request(pb::ListConnectionsRequest::default()))
        .await
        .expect_err("removed caller");
    assert_eq!(removed.code(), Code::Unauthenticated);
    client
        .list_connections(ops.request(pb::ListConnectionsRequest::default()))
        .await
        .expect("remaining caller on the same connection");

    // Demote ops to token: now a known caller with the wrong role.
    write_policy(dir.path(), &ops.entry(r#"["token"]"#, Some("\"*\"")));
    assert!(server.reload_policy().await.contains("policy reloaded"));
    let demoted = client
        .list_connections(ops.request(pb::ListConnectionsRequest::default()))
        .await
        .expect_err("demoted caller");
    assert_eq!(demoted.code(), Code::PermissionDenied);

    // An invalid policy keeps the previous one and logs why.
    write_policy(
        dir.path(),
        &format!(
            "[[caller]]\nname = \"ops\"\nkey_sha256 = \"{}\"\nroles = [\"root\"]\n",
            ops.hash()
        ),
    );
    let line = server.reload_policy().await;
    assert!(line.contains("policy reload failed"), "{line}");
    assert!(line.contains("caller entry 1 (ops)"), "{line}");
    assert!(line.contains("unknown role"), "{line}");
    let still = client
        .list_connections(ops.request(pb::ListConnectionsRequest::default()))
        .await
        .expect_err("the token-only policy is still in force");
    assert_eq!(still.code(), Code::PermissionDenied);
    let token = client
        .get_access_token(ops.request(by_tenant(TENANT_A)))
        .await
        .expect_err("no connection registered");
    assert_eq!(token.code(), Code::NotFound, "{token:?}");
}

async fn open_watch_ends_when_its_caller_is_removed(backend: Backend) {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let ops = Key::new("ops");
    let auditor = Key::new("auditor");
    let both = format!(
        "{}{}",
        ops.entry(r#"["admin"]"#, None),
        auditor.entry(r#"["admin"]"#, None)
    );
    let policy = write_policy(dir.path(), &both);
    let server = Server::start_on(
        backend,
        &fake,
        &fake,
        &[("STVAULT_POLICY_FILE", policy.to_str().unwrap())],
    )
    .await;
    let mut client = server.client().await;
    let mut streams = Vec::new();
    for key in [&ops, &auditor] {
        let stream = client
            .watch_connection_status(key.request(pb::WatchConnectionStatusRequest::default()))
            .await
            .expect("watch opens")
            .into_inner();
        streams.push(stream);
    }
    let mut auditor_stream = streams.pop().unwrap();
    let mut ops_stream = streams.pop().unwrap();

    write_policy(dir.path(), &ops.entry(r#"["admin"]"#, None));
    assert!(server.reload_policy().await.contains("policy reloaded"));
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), auditor_stream.message())
        .await
        .expect("the removed caller's watch ends within the recheck interval")
        .expect_err("it ends with the policy's denial");
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");

    // The remaining caller's watch stays open.
    let still_open =
        tokio::time::timeout(std::time::Duration::from_secs(2), ops_stream.message()).await;
    assert!(
        still_open.is_err(),
        "the remaining watch must not end: {still_open:?}"
    );

    // Demoted to token: its watch ends with PERMISSION_DENIED.
    write_policy(dir.path(), &ops.entry(r#"["token"]"#, Some("\"*\"")));
    assert!(server.reload_policy().await.contains("policy reloaded"));
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), ops_stream.message())
        .await
        .expect("the demoted caller's watch ends")
        .expect_err("it ends with the policy's denial");
    assert_eq!(ended.code(), Code::PermissionDenied, "{ended:?}");
}

fn base_env(fake: &FakeServiceTitan, dir: &Path) -> HashMap<String, String> {
    let mut env = HashMap::new();
    env.insert(
        "STVAULT_DATA_DIR".into(),
        dir.join("data").display().to_string(),
    );
    env.insert("STVAULT_PRODUCTION_TOKEN_URL".into(), fake.token_url());
    env.insert("STVAULT_PRODUCTION_API_URL".into(), fake.api_url());
    env.insert("STVAULT_INTEGRATION_TOKEN_URL".into(), fake.token_url());
    env.insert("STVAULT_INTEGRATION_API_URL".into(), fake.api_url());
    env
}

#[tokio::test(flavor = "multi_thread")]
async fn startup_rejects_unsafe_or_invalid_settings() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "good");
    let server_files = pki.server();
    let ops = Key::new("ops");
    let policy = write_policy(dir.path(), &ops.entry(r#"["admin"]"#, None));

    // A network listener without TLS and a policy; nothing is bound.
    for extra in [
        vec![],
        vec![("STVAULT_POLICY_FILE", policy.clone())],
        vec![
            ("STVAULT_TLS_CERT", server_files.cert.clone()),
            ("STVAULT_TLS_KEY", server_files.key.clone()),
        ],
    ] {
        let mut env = base_env(&fake, dir.path());
        env.insert("STVAULT_LISTEN".into(), "0.0.0.0:0".into());
        for (key, value) in &extra {
            env.insert((*key).into(), value.display().to_string());
        }
        let (code, output) = run_expecting_exit(&env);
        assert_eq!(code, 78, "{output}");
        assert!(output.contains("is not a loopback address"), "{output}");
        assert!(output.contains("STVAULT_POLICY_FILE"), "{output}");
    }

    // An invalid policy names the entry.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!(
            "{}[[caller]]\nname = \"twin\"\nkey_sha256 = \"{}\"\nroles = [\"link\"]\n",
            ops.entry(r#"["admin"]"#, None),
            ops.hash()
        ),
    )
    .unwrap();
    let mut env = base_env(&fake, dir.path());
    env.insert("STVAULT_LISTEN".into(), "127.0.0.1:0".into());
    env.insert("STVAULT_POLICY_FILE".into(), bad.display().to_string());
    let (code, output) = run_expecting_exit(&env);
    assert_eq!(code, 78, "{output}");
    assert!(
        output.contains("caller entry 2 (twin): duplicate key_sha256"),
        "{output}"
    );

    // TLS settings that do not fit together.
    let mut env = base_env(&fake, dir.path());
    env.insert("STVAULT_LISTEN".into(), "127.0.0.1:0".into());
    env.insert(
        "STVAULT_TLS_CERT".into(),
        server_files.cert.display().to_string(),
    );
    let (code, output) = run_expecting_exit(&env);
    assert_eq!(code, 78, "{output}");
    assert!(output.contains("must be set together"), "{output}");

    let mut env = base_env(&fake, dir.path());
    env.insert("STVAULT_LISTEN".into(), "127.0.0.1:0".into());
    env.insert("STVAULT_TLS_CERT".into(), policy.display().to_string());
    env.insert(
        "STVAULT_TLS_KEY".into(),
        server_files.key.display().to_string(),
    );
    let (code, output) = run_expecting_exit(&env);
    assert_eq!(code, 78, "{output}");
    assert!(output.contains("STVAULT_TLS_CERT"), "{output}");
}

async fn open_mode_warns_at_startup(backend: Backend) {
    let fake = fake().await;
    let server = Server::start_on(backend, &fake, &fake, &[]).await;
    assert!(
        server
            .logs()
            .contains("no policy file (STVAULT_POLICY_FILE) is set"),
        "{}",
        server.logs()
    );
}

async fn keygen_output_works_as_policy(backend: Backend) {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let (code, output) = run_command(
        &[
            "keygen",
            "--name",
            "billing-sync",
            "--role",
            "token",
            "--tenants",
            "8450, 9001",
        ],
        &HashMap::new(),
    );
    assert_eq!(code, 0, "{output}");
    let key = output
        .lines()
        .find(|line| line.starts_with("stvk_"))
        .expect("the key line")
        .to_owned();
    let entry = &output[output.find("[[caller]]").expect("the policy entry")..];
    assert!(entry.contains("tenants = [8450, 9001]"), "{entry}");
    assert!(!entry.contains(&key), "the entry holds only the hash");
    let policy = write_policy(dir.path(), entry);
    let server = Server::start_on(
        backend,
        &fake,
        &fake,
        &[("STVAULT_POLICY_FILE", policy.to_str().unwrap())],
    )
    .await;
    let mut request = Request::new(by_tenant(TENANT_A));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let error = server
        .client()
        .await
        .get_access_token(request)
        .await
        .expect_err("no connection registered");
    assert_eq!(error.code(), Code::NotFound, "{error:?}");

    let (code, output) = run_command(
        &["keygen", "--name", "x", "--role", "root"],
        &HashMap::new(),
    );
    assert_eq!(code, 64, "{output}");
    assert!(output.contains("unknown role"), "{output}");
}
