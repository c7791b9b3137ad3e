//! End-to-end tests: the real `stvault` binary on an ephemeral loopback
//! port, a fake ServiceTitan on loopback, driven by grpcurl and the
//! generated client. Each test runs on sled and on PostgreSQL.

mod support;

use std::process::Command;
use std::time::Duration;

use stvault::pb;
use support::backend::Backend;
use support::fake_servicetitan::{FakeApp, FakeServiceTitan};
use support::server::{Server, grpcurl, grpcurl_error};
use tonic::Code;

const DEMO_CLIENT_ID: &str = "cid.demo1";
const DEMO_SECRET_1: &str = "cs1.demo-secret-one";
const DEMO_SECRET_2: &str = "cs2.demo-secret-two";
const DEMO_APP_KEY: &str = "ak1.demo-app-key";
const DEMO_TENANT: i64 = 8450;

backend_tests!(
    reflection_lists_services,
    readme_quickstart_runs_as_printed,
    register_is_idempotent_and_tenant_unique,
    rejected_credentials_are_not_stored,
    restart_after_kill9_keeps_acknowledged_writes,
    cold_cache_makes_one_upstream_request,
    secret_form_encoding_is_byte_exact,
    rotation_drops_cached_token,
);

/// Starts a fake ServiceTitan holding the quickstart's demo connection.
async fn demo_fake() -> FakeServiceTitan {
    let fake = FakeServiceTitan::start().await;
    let mut app = FakeApp::new(DEMO_CLIENT_ID, DEMO_SECRET_1, DEMO_TENANT, DEMO_APP_KEY);
    app.client_secrets.push(DEMO_SECRET_2.into());
    fake.add_app(app);
    fake
}

fn register_request(
    tenant_id: i64,
    client_id: &str,
    secret: &str,
) -> pb::RegisterConnectionRequest {
    pb::RegisterConnectionRequest {
        environment: pb::Environment::Integration as i32,
        tenant_id,
        client_id: client_id.into(),
        client_secret: secret.into(),
        app_key: DEMO_APP_KEY.into(),
        display_name: format!("tenant {tenant_id}"),
        ..Default::default()
    }
}

fn token_request(id: &str) -> pb::GetAccessTokenRequest {
    pb::GetAccessTokenRequest {
        connection_id: id.into(),
        ..Default::default()
    }
}

async fn reflection_lists_services(backend: Backend) {
    let fake = demo_fake().await;
    let server = Server::start_on(backend, &fake, &fake, &[]).await;
    let output = grpcurl(&["-plaintext", &server.addr.to_string(), "list"]);
    let services = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(
        services.contains("stvault.v1.CredentialVault"),
        "{services}"
    );
    assert!(services.contains("grpc.health.v1.Health"), "{services}");
    let output = grpcurl(&[
        "-plaintext",
        &server.addr.to_string(),
        "describe",
        "stvault.v1.CredentialVault",
    ]);
    let description = String::from_utf8_lossy(&output.stdout);
    for rpc in [
        "RegisterConnection",
        "GetConnection",
        "ListConnections",
        "RotateCredentials",
        "VerifyConnection",
        "DeleteConnection",
        "GetAccessToken",
        "RollbackCredentials",
        "UpdateConnection",
        "WatchConnectionStatus",
    ] {
        assert!(
            description.contains(rpc),
            "{rpc} missing from {description}"
        );
    }
}

async fn readme_quickstart_runs_as_printed(backend: Backend) {
    let fake = demo_fake().await;
    let server = Server::start_on(backend, &fake, &fake, &[]).await;
    let script =
        support::readme_block("quickstart").replace("127.0.0.1:50051", &server.addr.to_string());
    let output = Command::new("bash")
        .args(["-c", &format!("set -euo pipefail\n{script}")])
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "quickstart failed:\n{stdout}\n{stderr}"
    );

    for expected in [
        "stvault.v1.CredentialVault",
        "\"appKeyHint\": \"-key\"",
        "\"accessToken\": \"",
        "\"appKey\": \"ak1.demo-app-key\"",
        "\"credentialVersion\": 2",
        "\"ok\": true",
        "\"outcome\": \"OUTCOME_PASSED\"",
        "STATE_PREVIOUS",
        "\"displayName\": \"Demo Plumbing HQ\"",
        "HEALTH_STATE_HEALTHY",
        "\"status\": \"SERVING\"",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected} missing from:\n{stdout}"
        );
    }
    assert!(
        !stdout.contains(DEMO_SECRET_1),
        "client secret in a response"
    );
    assert!(
        !stdout.contains(DEMO_SECRET_2),
        "client secret in a response"
    );

    // Deleted at the end of the quickstart.
    let output = server.grpcurl(
        "GetAccessToken",
        r#"{"environment":"ENVIRONMENT_INTEGRATION","tenant_id":8450}"#,
    );
    grpcurl_error(&output, "NotFound");
}

async fn register_is_idempotent_and_tenant_unique(backend: Backend) {
    let fake = demo_fake().await;
    let server = Server::start_on(backend, &fake, &fake, &[]).await;
    let mut client = server.client().await;

    let first = client
        .register_connection(register_request(DEMO_TENANT, DEMO_CLIENT_ID, DEMO_SECRET_1))
        .await
        .expect("register")
        .into_inner();
    let again = client
        .register_connection(register_request(DEMO_TENANT, DEMO_CLIENT_ID, DEMO_SECRET_1))
        .await
        .expect("register the same credentials again")
        .into_inner();
    assert_eq!(first.connection_id, again.connection_id);
    assert_eq!(again.credential_version, 1);

    let conflict = client
        .register_connection(register_request(DEMO_TENANT, DEMO_CLIENT_ID, DEMO_SECRET_2))
        .await
        .expect_err("other credentials for a registered tenant");
    assert_eq!(conflict.code(), Code::AlreadyExists);
    assert!(
        conflict.message().contains("RotateCredentials"),
        "{}",
        conflict.message()
    );
    assert!(conflict.message().contains(&first.connection_id));
    assert!(!conflict.message().contains(DEMO_SECRET_2));
}

async fn rejected_credentials_are_not_stored(backend: Backend) {
    let fake = demo_fake().await;
    let server = Server::start_on(backend, &fake, &fake, &[]).await;
    let mut client = server.client().await;

    let error = client
        .register_connection(register_request(DEMO_TENANT, DEMO_CLIENT_ID, "cs1.wrong"))
        .await
        .expect_err("wrong secret");
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert!(
        error.message().contains("invalid_client"),
        "{}",
        error.message()
    );
    assert!(
        error.message().contains("Client Secret"),
        "{}",
        error.message()
    );

    let listed = client
        .list_connections(pb::ListConnectionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.connections.is_empty());
}

async fn restart_after_kill9_keeps_acknowledged_writes(backend: Backend) {
    let fake = demo_fake().await;
    for tenant in 1..=5 {
        fake.add_app(FakeApp::new(
            format!("cid.t{tenant}"),
            "cs1.secret",
            tenant,
            DEMO_APP_KEY,
        ));
    }
    let mut server = Server::start_on(backend, &fake, &fake, &[]).await;
    let mut ids = Vec::new();
    {
        let mut client = server.client().await;
        for tenant in 1..=5 {
            let connection = client
                .register_connection(register_request(
                    tenant,
                    &format!("cid.t{tenant}"),
                    "cs1.secret",
                ))
                .await
                .expect("register")
                .into_inner();
            ids.push(connection.connection_id);
        }
    }
    // SIGKILL right after the last acknowledged registration.
    server.restart_after_kill9().await;
    let mut client = server.client().await;
    for id in &ids {
        let connection = client
            .get_connection(pb::GetConnectionRequest {
                connection_id: id.clone(),
            })
            .await
            .expect("connection survives kill -9")
            .into_inner();
        assert_eq!(connection.credential_version, 1);
        client
            .get_access_token(token_request(id))
            .await
            .expect("credentials decrypt after restart");
    }

    // SIGKILL right after an acknowledged rotation.
    let mut app = FakeApp::new("cid.t1", "cs1.secret", 1, DEMO_APP_KEY);
    app.client_secrets.push("cs2.rotated".into());
    fake.add_app(app);
    let rotated = client
        .rotate_credentials(pb::RotateCredentialsRequest {
            connection_id: ids[0].clone(),
            client_secret: "cs2.rotated".into(),
            ..Default::default()
        })
        .await
        .expect("rotate")
        .into_inner();
    assert_eq!(rotated.credential_version, 2);
    drop(client);
    server.restart_after_kill9().await;

    let mut client = server.client().await;
    let connection = client
        .get_connection(pb::GetConnectionRequest {
            connection_id: ids[0].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(connection.credential_version, 2);
    fake.update_app("cid.t1", |app| {
        app.client_secrets = vec!["cs2.rotated".into()]
    });
    let token = client
        .get_access_token(token_request(&ids[0]))
        .await
        .expect("token")
        .into_inner();
    assert_eq!(token.credential_version, 2);
    let form = fake.last_token_form().expect("a token request was made");
    assert!(form.contains(&("client_secret".into(), "cs2.rotated".into())));
}

async fn cold_cache_makes_one_upstream_request(backend: Backend) {
    let fake = demo_fake().await;
    fake.set_token_delay(Duration::from_millis(300));
    let server = Server::start_on(backend, &fake, &fake, &[]).await;
    let client = server.client().await;
    let id = client
        .clone()
        .register_connection(pb::RegisterConnectionRequest {
            skip_verification: true,
            ..register_request(DEMO_TENANT, DEMO_CLIENT_ID, DEMO_SECRET_1)
        })
        .await
        .unwrap()
        .into_inner()
        .connection_id;
    assert_eq!(fake.token_requests(), 0);

    let calls = (0..200).map(|_| {
        let mut client = client.clone();
        let id = id.clone();
        tokio::spawn(async move { client.get_access_token(token_request(&id)).await })
    });
    let results = futures::future::join_all(calls).await;
    let mut tokens = std::collections::HashSet::new();
    for result in results {
        let token = result.unwrap().expect("token").into_inner();
        tokens.insert(token.access_token);
    }
    assert_eq!(fake.token_requests(), 1);
    assert_eq!(tokens.len(), 1, "every caller gets the same token");
}

async fn secret_form_encoding_is_byte_exact(backend: Backend) {
    let secret = "a+b/c=d&e%2F:é";
    let fake = FakeServiceTitan::start().await;
    fake.add_app(FakeApp::new("cid.enc", secret, 77, DEMO_APP_KEY));
    let server = Server::start_on(backend, &fake, &fake, &[]).await;
    let mut client = server.client().await;
    client
        .register_connection(register_request(77, "cid.enc", secret))
        .await
        .expect("a secret with form metacharacters is accepted");
    let form = fake.last_token_form().expect("token request made");
    assert!(
        form.contains(&("client_secret".into(), secret.into())),
        "{form:?}"
    );
    assert!(form.contains(&("grant_type".into(), "client_credentials".into())));
}

async fn rotation_drops_cached_token(backend: Backend) {
    let fake = demo_fake().await;
    let server = Server::start_on(backend, &fake, &fake, &[]).await;
    let mut client = server.client().await;
    let id = client
        .register_connection(register_request(DEMO_TENANT, DEMO_CLIENT_ID, DEMO_SECRET_1))
        .await
        .unwrap()
        .into_inner()
        .connection_id;
    let before = client
        .get_access_token(token_request(&id))
        .await
        .unwrap()
        .into_inner();
    let cached = client
        .get_access_token(token_request(&id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.access_token, cached.access_token);

    client
        .rotate_credentials(pb::RotateCredentialsRequest {
            connection_id: id.clone(),
            client_secret: DEMO_SECRET_2.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let after = client
        .get_access_token(token_request(&id))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(before.access_token, after.access_token);
    assert_eq!(after.credential_version, 2);

    client
        .delete_connection(pb::DeleteConnectionRequest {
            connection_id: id.clone(),
        })
        .await
        .unwrap();
    let gone = client
        .get_access_token(token_request(&id))
        .await
        .expect_err("deleted");
    assert_eq!(gone.code(), Code::NotFound);
}
