//! PostgreSQL storage through the real binary: every connection RPC, a
//! restart, two replicas sharing one database and one audit chain, TLS, a
//! dump free of secrets, and readiness while the database is down. While it
//! is down, cached tokens are still served, their audit events wait in each
//! replica's local spool, and they join the shared chain, once each, when
//! the database is back. The `Store` contract is also checked directly, on
//! sled and on PostgreSQL. Each test starts its own PostgreSQL cluster (see
//! `support::postgres`).

mod support;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use stvault::crypto::MasterKey;
use stvault::model::Environment;
use stvault::pb;
use stvault::pb::credential_version::State;
use stvault::secret::SecretString;
use stvault::store::postgres::{Claim, ClaimRequest, DatabaseUrl};
use stvault::store::{ConnectionRecord, DatabaseSettings, Store, StoreError};
use stvault::vault::{NewConnection, new_record};
use support::callers::{Key, write_policy};
use support::certs::Pki;
use support::fake_servicetitan::{FakeApp, FakeServiceTitan};
use support::postgres::{self, Postgres};
use support::server::{self, Server, json, request_id};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const SECRET_1: &str = "cs1.SENTINEL-PG-SECRET-one-7c2e";
const SECRET_2: &str = "cs2.SENTINEL-PG-SECRET-two-9d41";
const APP_KEY: &str = "ak1.SENTINEL-PG-APPKEY-3b80";
const TENANT: i64 = 7300;
/// How long readiness may take to follow the database.
const READINESS_TIMEOUT: Duration = Duration::from_secs(20);

/// Returns the client id of the fake's app for `tenant_id`.
fn client_id(tenant_id: i64) -> String {
    format!("cid.postgres.{tenant_id}")
}

/// Starts a fake with an app for `TENANT` and each of the next nine
/// tenants, each accepting both secrets.
async fn fake() -> FakeServiceTitan {
    let fake = FakeServiceTitan::start().await;
    for tenant_id in TENANT..TENANT + 10 {
        let mut app = FakeApp::new(client_id(tenant_id), SECRET_1, tenant_id, APP_KEY);
        app.client_secrets.push(SECRET_2.into());
        fake.add_app(app);
    }
    fake
}

fn register_request(tenant_id: i64, secret: &str) -> pb::RegisterConnectionRequest {
    pb::RegisterConnectionRequest {
        environment: pb::Environment::Integration as i32,
        tenant_id,
        client_id: client_id(tenant_id),
        client_secret: secret.into(),
        app_key: APP_KEY.into(),
        display_name: format!("tenant {tenant_id}"),
        ..Default::default()
    }
}

async fn register(server: &Server, tenant_id: i64) -> String {
    server
        .client()
        .await
        .register_connection(register_request(tenant_id, SECRET_1))
        .await
        .expect("register")
        .into_inner()
        .connection_id
}

async fn get(server: &Server, id: &str) -> Result<pb::Connection, tonic::Status> {
    server
        .client()
        .await
        .get_connection(pb::GetConnectionRequest {
            connection_id: id.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Returns the (version, state) pairs of a connection.
fn states(connection: &pb::Connection) -> Vec<(u32, State)> {
    let mut states: Vec<(u32, State)> = connection
        .versions
        .iter()
        .map(|v| (v.version, State::try_from(v.state).expect("known state")))
        .collect();
    states.sort_by_key(|(version, _)| *version);
    states
}

async fn token_by_tenant(server: &Server, tenant_id: i64) -> pb::AccessToken {
    server
        .client()
        .await
        .get_access_token(pb::GetAccessTokenRequest {
            environment: pb::Environment::Integration as i32,
            tenant_id,
            min_valid_for: Some(prost_types::Duration {
                seconds: 300,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("token")
        .into_inner()
}

async fn token_by_id(server: &Server, id: &str) -> Result<pb::AccessToken, tonic::Status> {
    server
        .client()
        .await
        .get_access_token(pb::GetAccessTokenRequest {
            connection_id: id.into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn health(server: &Server) -> Option<i32> {
    service_health(server, "stvault.v1.CredentialVault").await
}

async fn service_health(server: &Server, service: &str) -> Option<i32> {
    let channel = tonic::transport::Channel::from_shared(server.url())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .ok()?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    };
    let response = client.check(request).await.ok()?;
    Some(response.into_inner().status)
}

/// Polls the health service until it reports `expected`.
async fn wait_for_health(server: &Server, expected: ServingStatus) {
    let started = Instant::now();
    loop {
        if health(server).await == Some(expected as i32) {
            return;
        }
        assert!(
            started.elapsed() < READINESS_TIMEOUT,
            "health did not become {expected:?} within {READINESS_TIMEOUT:?}; log:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_rpcs_work_on_postgres() {
    let cluster = Postgres::start();
    let url = cluster.create_database("vault").await;
    let fake = fake().await;
    let server = Server::start_postgres(&fake, &url, &[]).await;
    let mut client = server.client().await;

    let id = register(&server, TENANT).await;
    let again = client
        .register_connection(register_request(TENANT, SECRET_1))
        .await
        .expect("registering the same credentials again succeeds")
        .into_inner();
    assert_eq!(again.connection_id, id);
    let other = client
        .register_connection(register_request(TENANT, SECRET_2))
        .await
        .expect_err("other credentials for a registered tenant");
    assert_eq!(other.code(), Code::AlreadyExists);

    let connection = get(&server, &id).await.expect("get");
    assert_eq!(connection.tenant_id, TENANT);
    assert_eq!(states(&connection), vec![(1, State::Current)]);

    // ListConnections through grpcurl, as an admin would call it.
    let listed = json(&server.grpcurl(
        "ListConnections",
        &format!(r#"{{"environment": "ENVIRONMENT_INTEGRATION", "tenant_id": {TENANT}}}"#),
    ));
    assert_eq!(listed["connections"][0]["connectionId"], id.as_str());
    assert_eq!(listed["connections"].as_array().map(Vec::len), Some(1));

    let token = token_by_tenant(&server, TENANT).await;
    assert_eq!(token.credential_version, 1);
    assert_eq!(token.app_key, APP_KEY);

    let rotated = client
        .rotate_credentials(pb::RotateCredentialsRequest {
            connection_id: id.clone(),
            client_secret: SECRET_2.into(),
            ..Default::default()
        })
        .await
        .expect("rotate")
        .into_inner();
    assert_eq!(
        states(&rotated),
        vec![(1, State::Previous), (2, State::Current)]
    );
    assert_eq!(token_by_tenant(&server, TENANT).await.credential_version, 2);
    let form = fake.last_token_form().expect("a token request was made");
    assert!(
        form.contains(&("client_secret".into(), SECRET_2.into())),
        "the token after the rotation was not requested with the new secret"
    );

    let rolled_back = client
        .rollback_credentials(pb::RollbackCredentialsRequest {
            connection_id: id.clone(),
        })
        .await
        .expect("rollback")
        .into_inner();
    assert_eq!(
        states(&rolled_back),
        vec![(1, State::Current), (2, State::Previous)]
    );
    assert_eq!(token_by_tenant(&server, TENANT).await.credential_version, 1);

    client
        .delete_connection(pb::DeleteConnectionRequest {
            connection_id: id.clone(),
        })
        .await
        .expect("delete");
    let deleted = get(&server, &id).await.expect_err("deleted connection");
    assert_eq!(deleted.code(), Code::NotFound);
    let again = register(&server, TENANT).await;
    assert_ne!(again, id, "the tenant can be registered again after delete");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_survive_restart() {
    let cluster = Postgres::start();
    let url = cluster.create_database("vault").await;
    let fake = fake().await;
    let mut server = Server::start_postgres(&fake, &url, &[]).await;
    let id = register(&server, TENANT).await;

    // The second start reads the URL from a file instead.
    server.kill9();
    let url_file = server.dir.path().join("database-url");
    std::fs::write(&url_file, format!("{url}\n")).unwrap();
    std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    server.env.remove("STVAULT_DATABASE_URL");
    server.env.insert(
        "STVAULT_DATABASE_URL_FILE".into(),
        url_file.display().to_string(),
    );
    server.launch().await;
    let connection = get(&server, &id).await.expect("get after restart");
    assert_eq!(connection.tenant_id, TENANT);
    let token = token_by_tenant(&server, TENANT).await;
    assert_eq!(token.app_key, APP_KEY);

    assert!(
        server.logs().contains("connected to PostgreSQL"),
        "{}",
        server.logs()
    );
    assert!(
        !server.logs().contains(postgres::PASSWORD),
        "the database password reached the log"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_share_one_database() {
    let cluster = Postgres::start();
    let url = cluster.create_database("vault").await;
    let fake = fake().await;
    let first = Server::start_postgres(&fake, &url, &[]).await;
    let second = first.start_replica().await;
    assert_ne!(first.data_dir(), second.data_dir());

    // A registration through one replica is visible through the other.
    let id = register(&first, TENANT).await;
    let seen = get(&second, &id).await.expect("the other replica sees it");
    assert_eq!(seen.tenant_id, TENANT);
    let token = token_by_tenant(&second, TENANT).await;
    assert_eq!(token.app_key, APP_KEY);
    let listed = second
        .client()
        .await
        .list_connections(pb::ListConnectionsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.connections.len(), 1);

    // The same tenant registered through both at once, with different
    // credentials: the database keeps one, and the other call fails.
    for tenant_id in TENANT + 1..TENANT + 6 {
        let mut through_first = first.client().await;
        let mut through_second = second.client().await;
        let (a, b) = tokio::join!(
            through_first.register_connection(register_request(tenant_id, SECRET_1)),
            through_second.register_connection(register_request(tenant_id, SECRET_2)),
        );
        let codes = [
            a.as_ref().map_or_else(|s| s.code(), |_| Code::Ok),
            b.as_ref().map_or_else(|s| s.code(), |_| Code::Ok),
        ];
        let mut sorted = codes;
        sorted.sort_by_key(|code| *code as i32);
        assert_eq!(
            sorted,
            [Code::Ok, Code::AlreadyExists],
            "tenant {tenant_id}: expected one success and one ALREADY_EXISTS, got {codes:?}"
        );
    }
    let listed = first
        .client()
        .await
        .list_connections(pb::ListConnectionsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.connections.len(), 6);

    // A rotation through one replica is what the other reads next.
    second
        .client()
        .await
        .rotate_credentials(pb::RotateCredentialsRequest {
            connection_id: id.clone(),
            client_secret: SECRET_2.into(),
            ..Default::default()
        })
        .await
        .expect("rotate through the second replica");
    let connection = get(&first, &id).await.expect("get");
    assert_eq!(
        states(&connection),
        vec![(1, State::Previous), (2, State::Current)]
    );
}

/// Polls `check` every 50 ms until it returns true, for at most `limit`,
/// and returns how long that took.
async fn within<F, Fut>(limit: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "not seen within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_reach_the_other_replica_within_a_second() {
    let cluster = Postgres::start();
    let url = cluster.create_database("vault").await;
    let fake = fake().await;
    let first = Server::start_postgres(&fake, &url, &[]).await;
    let second = first.start_replica().await;
    let id = register(&first, TENANT).await;

    // The second replica caches credentials and a token of version 1.
    let token = token_by_tenant(&second, TENANT).await;
    assert_eq!(token.credential_version, 1);
    let requests = fake.token_requests();
    assert_eq!(
        token_by_tenant(&second, TENANT).await.access_token,
        token.access_token
    );
    assert_eq!(fake.token_requests(), requests, "served from its cache");

    first
        .client()
        .await
        .rotate_credentials(pb::RotateCredentialsRequest {
            connection_id: id.clone(),
            client_secret: SECRET_2.into(),
            ..Default::default()
        })
        .await
        .expect("rotate through the first replica");
    let took = within(Duration::from_secs(1), || async {
        token_by_tenant(&second, TENANT).await.credential_version == 2
    })
    .await;
    eprintln!("rotation seen by the other replica after {took:?}");

    first
        .client()
        .await
        .delete_connection(pb::DeleteConnectionRequest {
            connection_id: id.clone(),
        })
        .await
        .expect("delete through the first replica");
    let took = within(Duration::from_secs(1), || async {
        let call = second
            .client()
            .await
            .get_access_token(pb::GetAccessTokenRequest {
                connection_id: id.clone(),
                ..Default::default()
            })
            .await;
        matches!(call, Err(status) if status.code() == Code::NotFound)
    })
    .await;
    eprintln!("deletion seen by the other replica after {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_storage_copies_sled_into_postgres() {
    let cluster = Postgres::start();
    let url = cluster.create_database("vault").await;
    let fake = fake().await;

    // A sled server with three connections, one of them rotated.
    let work = tempfile::tempdir().unwrap();
    let key_file = work.path().join("master.keys");
    server::write_key_file(&key_file, &[&server::keygen()]);
    let key_file = key_file.display().to_string();
    let mut sled_server =
        Server::start_with(&fake, &fake, &[("STVAULT_MASTER_KEY_FILE", &key_file)]).await;
    let mut ids = Vec::new();
    for tenant_id in TENANT..TENANT + 3 {
        ids.push(register(&sled_server, tenant_id).await);
    }
    sled_server
        .client()
        .await
        .rotate_credentials(pb::RotateCredentialsRequest {
            connection_id: ids[0].clone(),
            client_secret: SECRET_2.into(),
            ..Default::default()
        })
        .await
        .expect("rotate");
    let data_dir = sled_server.data_dir();
    let from = format!("sled:{}", data_dir.display());

    let mut env = HashMap::new();
    env.insert("STVAULT_DATABASE_URL".to_owned(), url.clone());
    // The source server still has its directory locked.
    let (code, output) = server::run_command(
        &["migrate-storage", "--from", &from, "--to", "postgres"],
        &env,
    );
    assert_ne!(code, 0, "{output}");
    assert!(output.contains("stop that server first"), "{output}");
    assert_eq!(sled_server.terminate().code(), Some(0));

    // A URL with a password on the command line is refused.
    let (code, output) = server::run_command(
        &[
            "migrate-storage",
            "--from",
            &from,
            "--to",
            &format!("postgres:{url}"),
        ],
        &env,
    );
    assert_ne!(code, 0, "{output}");
    assert!(output.contains("STVAULT_DATABASE_URL_FILE"), "{output}");

    // The sled trail: 3 registrations and a rotation.
    let data_dir_text = data_dir.display().to_string();
    let (code, sled_trail) = server::run_command(
        &["audit", "verify", "--data-dir", &data_dir_text],
        &HashMap::new(),
    );
    assert_eq!(code, 0, "{sled_trail}");
    assert!(
        sled_trail.contains("audit chain intact: 4 events"),
        "{sled_trail}"
    );

    let (code, output) = server::run_command(
        &["migrate-storage", "--from", &from, "--to", "postgres"],
        &env,
    );
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains("copied 3 connections, 1 master key check values and 4 audit events"),
        "{output}"
    );
    // The same chain, event for event, now in the database.
    let (code, copied_trail) = verify_audit(&url);
    assert_eq!(code, 0, "{copied_trail}");
    assert_eq!(copied_trail.trim(), sled_trail.trim());
    assert!(
        !output.contains(SECRET_1) && !output.contains(SECRET_2),
        "{output}"
    );

    // Again into the now full database: refused, nothing changed.
    let (code, output) = server::run_command(
        &["migrate-storage", "--from", &from, "--to", "postgres"],
        &env,
    );
    assert_ne!(code, 0, "{output}");
    assert!(
        output.contains("already contains 3 connections"),
        "{output}"
    );

    // A server on PostgreSQL with the same master keys serves them all.
    let pg_server =
        Server::start_postgres(&fake, &url, &[("STVAULT_MASTER_KEY_FILE", &key_file)]).await;
    let rotated = get(&pg_server, &ids[0]).await.expect("get");
    assert_eq!(
        states(&rotated),
        vec![(1, State::Previous), (2, State::Current)]
    );
    for (tenant_id, id) in (TENANT..).zip(&ids) {
        let token = token_by_tenant(&pg_server, tenant_id).await;
        assert_eq!(&token.connection_id, id);
        assert_eq!(token.app_key, APP_KEY);
    }
    // Its calls continue the copied chain: 1 get and 3 token calls.
    let (code, output) = verify_audit(&url);
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("audit chain intact: 8 events"), "{output}");
}

#[tokio::test(flavor = "multi_thread")]
async fn database_dump_holds_no_secrets() {
    let cluster = Postgres::start();
    let url = cluster.create_database("vault").await;
    let fake = fake().await;
    let server = Server::start_postgres(&fake, &url, &[]).await;
    let id = register(&server, TENANT).await;
    server
        .client()
        .await
        .rotate_credentials(pb::RotateCredentialsRequest {
            connection_id: id.clone(),
            client_secret: SECRET_2.into(),
            ..Default::default()
        })
        .await
        .expect("rotate");
    token_by_tenant(&server, TENANT).await;

    let dump = cluster.dump("vault");
    let contains = |needle: &str| dump.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(contains(&id), "the dump lacks the connection record");
    for sentinel in [SECRET_1, SECRET_2, APP_KEY] {
        assert!(!contains(sentinel), "the dump contains {sentinel}");
    }
    for sentinel in [SECRET_1, SECRET_2, APP_KEY, postgres::PASSWORD] {
        assert!(
            !server.logs().contains(sentinel),
            "the log contains {sentinel}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_follows_database() {
    let cluster = Postgres::start();
    let url = cluster.create_database("vault").await;
    let fake = fake().await;
    let server = Server::start_postgres(&fake, &url, &[]).await;
    let id = register(&server, TENANT).await;
    wait_for_health(&server, ServingStatus::Serving).await;

    // Cached from here on, so the token call below needs the database only
    // for its audit event, which goes to the spool instead.
    let cached = token_by_id(&server, &id).await.expect("token");

    cluster.stop();
    wait_for_health(&server, ServingStatus::NotServing).await;
    let unavailable = get(&server, &id).await.expect_err("database is down");
    assert_eq!(unavailable.code(), Code::Unavailable, "{unavailable:?}");
    // Alive, so a liveness probe does not restart it.
    assert_eq!(
        service_health(&server, stvault::LIVENESS_SERVICE).await,
        Some(ServingStatus::Serving as i32)
    );
    let served = token_by_id(&server, &id)
        .await
        .expect("the cached token while the database is down");
    assert_eq!(served.access_token, cached.access_token);

    cluster.restart();
    wait_for_health(&server, ServingStatus::Serving).await;
    let connection = get(&server, &id).await.expect("get after recovery");
    assert_eq!(connection.tenant_id, TENANT);
    token_by_id(&server, &id)
        .await
        .expect("token after recovery");
    register(&server, TENANT + 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_connection_verifies_server() {
    let work = tempfile::tempdir().unwrap();
    let pki = Pki::new(work.path(), "postgres");
    let cluster = Postgres::start_with_tls(&pki.server());
    let plain_url = cluster.create_database("vault").await;
    let url = format!("{plain_url}?sslmode=verify-full");
    let fake = fake().await;
    let ca = pki.ca_path.display().to_string();
    let server = Server::start_postgres(&fake, &url, &[("STVAULT_DATABASE_CA", &ca)]).await;
    let id = register(&server, TENANT).await;
    assert!(get(&server, &id).await.is_ok());

    // The server's sessions use TLS.
    let (client, connection) = tokio_postgres::connect(&plain_url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test cluster");
    tokio::spawn(connection);
    let rows = client
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'stvault'",
            &[],
        )
        .await
        .expect("read pg_stat_ssl");
    assert!(!rows.is_empty(), "stvault holds no database session");
    assert!(
        rows.iter().all(|row| row.get::<_, bool>(0)),
        "a stvault session is not encrypted"
    );

    // A CA that did not sign the server's certificate is rejected.
    let other = Pki::new(work.path(), "other");
    let mut env = server.env.clone();
    env.insert(
        "STVAULT_DATABASE_CA".into(),
        other.ca_path.display().to_string(),
    );
    env.insert(
        "STVAULT_DATA_DIR".into(),
        work.path().join("other-data").display().to_string(),
    );
    let (code, output) = server::run_expecting_exit(&env);
    assert_ne!(code, 0, "{output}");
    assert!(output.contains("STVAULT_DATABASE_URL"), "{output}");
    assert!(!output.contains(postgres::PASSWORD), "{output}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_database_fails_startup_clearly() {
    let cluster = Postgres::start();
    cluster.create_database("vault").await;
    let fake = fake().await;
    let data = tempfile::tempdir().unwrap();
    let base_env = |url: String| {
        HashMap::from([
            ("STVAULT_STORAGE".to_string(), "postgres".to_string()),
            ("STVAULT_DATABASE_URL".to_string(), url),
            ("STVAULT_LISTEN".to_string(), "127.0.0.1:0".to_string()),
            (
                "STVAULT_DATA_DIR".to_string(),
                data.path().display().to_string(),
            ),
            ("STVAULT_PRODUCTION_TOKEN_URL".to_string(), fake.token_url()),
            ("STVAULT_PRODUCTION_API_URL".to_string(), fake.api_url()),
            (
                "STVAULT_INTEGRATION_TOKEN_URL".to_string(),
                fake.token_url(),
            ),
            ("STVAULT_INTEGRATION_API_URL".to_string(), fake.api_url()),
        ])
    };

    let wrong_password = "SENTINEL-wrong-db-password-0a9c";
    let url = format!(
        "postgres://{}:{wrong_password}@127.0.0.1:{}/vault",
        postgres::USER,
        cluster.port
    );
    let (code, output) = server::run_expecting_exit(&base_env(url));
    assert_ne!(code, 0, "{output}");
    assert!(output.contains("STVAULT_DATABASE_URL"), "{output}");
    assert!(
        output.contains(&format!("127.0.0.1:{}/vault", cluster.port)),
        "{output}"
    );
    assert!(
        output.contains("password authentication failed"),
        "{output}"
    );
    assert!(!output.contains(wrong_password), "{output}");

    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!(
        "postgres://{}:{}@127.0.0.1:{closed}/vault",
        postgres::USER,
        postgres::PASSWORD
    );
    let (code, output) = server::run_expecting_exit(&base_env(url));
    assert_ne!(code, 0, "{output}");
    assert!(output.contains("STVAULT_DATABASE_URL"), "{output}");
    assert!(output.contains(&format!("127.0.0.1:{closed}")), "{output}");
    assert!(!output.contains(postgres::PASSWORD), "{output}");

    let mut env = base_env("mysql://root@127.0.0.1/vault".into());
    let (code, output) = server::run_expecting_exit(&env);
    assert_eq!(code, 78, "{output}");
    assert!(output.contains("STVAULT_DATABASE_URL"), "{output}");
    env.remove("STVAULT_DATABASE_URL");
    let (code, output) = server::run_expecting_exit(&env);
    assert_eq!(code, 78, "{output}");
    assert!(output.contains("STVAULT_DATABASE_URL_FILE"), "{output}");
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_refuses_postgres() {
    let cluster = Postgres::start();
    let url = cluster.create_database("vault").await;
    let fake = fake().await;
    let server = Server::start_postgres(&fake, &url, &[]).await;
    register(&server, TENANT).await;

    let out = server.dir.path().join("stvault.backup");
    let output = server.run(&[
        "backup",
        "--server",
        &server.url(),
        "--out",
        &out.display().to_string(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "backup succeeded");
    assert!(stderr.contains("pg_dump"), "{stderr}");
    assert!(!out.exists(), "a backup file was written");

    // The same call straight to the server, as a client of the Admin API.
    let mut admin = stvault::pb::admin_client::AdminClient::connect(server.url())
        .await
        .unwrap();
    let refused = admin
        .create_backup(pb::CreateBackupRequest::default())
        .await
        .expect_err("backup of a PostgreSQL store");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("pg_dump"), "{refused:?}");

    let listed = server.grpcurl("ListConnections", "{}");
    assert_eq!(
        json(&listed)["connections"].as_array().map(Vec::len),
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rewrap_runs_beside_serving_replica() {
    let cluster = Postgres::start();
    let url = cluster.create_database("vault").await;
    let fake = fake().await;
    let mut server = Server::start_postgres(&fake, &url, &[]).await;
    let first = register(&server, TENANT).await;
    let second = register(&server, TENANT + 1).await;
    let old_key = std::fs::read_to_string(&server.env["STVAULT_MASTER_KEY_FILE"]).unwrap();
    let old_key = old_key.trim().to_owned();
    let new_key = server::keygen();
    let new_key_id = new_key.split_whitespace().next().unwrap().to_owned();

    // The new key goes last in the keyring, and the server restarts with it.
    let key_file = PathBuf::from(&server.env["STVAULT_MASTER_KEY_FILE"]);
    server::write_key_file(&key_file, &[&old_key, &new_key]);
    server.restart_after_kill9().await;

    // Rewrap with a data directory of its own while the server keeps
    // serving from the same database.
    let rewrap_dir = tempfile::tempdir().unwrap();
    let mut env = server.env.clone();
    env.insert(
        "STVAULT_DATA_DIR".into(),
        rewrap_dir.path().display().to_string(),
    );
    let (code, output) = server::run_command(&["rewrap"], &env);
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains(&format!(
            "rewrapped 2 connections under master key {new_key_id}"
        )),
        "{output}"
    );
    // The run's event is in the database's chain, beside the server's.
    let runs = server.audit_events("stvault rewrap").await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].auth_method, "local");

    // With only the new key left, the server starts and opens both.
    server::write_key_file(&key_file, &[&new_key]);
    server.restart_after_kill9().await;
    for id in [&first, &second] {
        let connection = get(&server, id).await.expect("get");
        assert_eq!(connection.versions.len(), 1);
    }
    let token = token_by_tenant(&server, TENANT + 1).await;
    assert_eq!(token.app_key, APP_KEY);
}

/// Returns a sealed record for `tenant_id` with a connection id that sorts
/// by `index`.
fn record(master_key: &MasterKey, index: usize, tenant_id: i64) -> ConnectionRecord {
    let new = NewConnection {
        environment: Environment::Integration,
        tenant_id,
        client_id: client_id(tenant_id),
        client_secret: SecretString::new(SECRET_1.into()),
        app_key: SecretString::new(APP_KEY.into()),
        display_name: format!("tenant {tenant_id}"),
        labels: Default::default(),
        enterprise_hub: false,
        required_scope_groups: Vec::new(),
        skip_verification: true,
    };
    new_record(master_key, format!("conn-{index:05}"), &new, "test")
}

/// Runs the same checks of the `Store` contract on one backend: paging
/// across several scan pages, one connection per tenant, compare-and-swap
/// on the stored bytes, and delete.
async fn check_store_contract(store: &Store) {
    const COUNT: usize = 1200;
    let (master_key, _) = MasterKey::generate();
    let records: Vec<ConnectionRecord> = (0..COUNT)
        .map(|i| record(&master_key, i, 100_000 + i as i64))
        .collect();
    store.insert_batch(&records).await.expect("insert a batch");
    assert_eq!(store.len().await.unwrap(), COUNT);

    let (first, more) = store.list(None, 1000, |_| true).await.unwrap();
    assert_eq!(first.len(), 1000);
    assert!(more, "a full page says more may follow");
    let last = first.last().map(|r| r.id.clone());
    let (rest, more) = store.list(last.as_deref(), 1000, |_| true).await.unwrap();
    assert_eq!(rest.len(), COUNT - 1000);
    assert!(!more, "the last page says nothing follows");
    let listed: Vec<String> = first.iter().chain(&rest).map(|r| r.id.clone()).collect();
    let expected: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
    assert_eq!(listed, expected, "pages list every id once, in order");

    let (one, _) = store
        .list(None, 10, |r| r.tenant_id == 100_777)
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].id, "conn-00777");

    let streamed: Vec<String> = store
        .records()
        .map(|r| r.expect("readable record").id)
        .collect()
        .await;
    assert_eq!(
        streamed, expected,
        "the stream yields every id once, in order"
    );

    let taken = store
        .insert(&record(&master_key, COUNT, 100_005))
        .await
        .expect_err("a second connection for a tenant");
    match taken {
        StoreError::TenantTaken { existing_id, .. } => assert_eq!(existing_id, "conn-00005"),
        other => panic!("expected TenantTaken, got {other}"),
    }

    let (bytes, stored) = store
        .get_with_bytes("conn-00001")
        .await
        .unwrap()
        .expect("stored");
    let mut renamed = stored.clone();
    renamed.display_name = "renamed".into();
    store.replace(&bytes, &renamed).await.expect("replace");
    let mut again = stored.clone();
    again.display_name = "lost update".into();
    let conflict = store
        .replace(&bytes, &again)
        .await
        .expect_err("replace with stale bytes");
    assert!(matches!(conflict, StoreError::Conflict(_)), "{conflict}");
    let current = store.get("conn-00001").await.unwrap().expect("stored");
    assert_eq!(current.display_name, "renamed");

    let deleted = store.delete("conn-00002").await.expect("delete");
    assert_eq!(deleted.map(|r| r.tenant_id), Some(100_002));
    let missing = store.delete("conn-00002").await.expect_err("delete twice");
    assert!(matches!(missing, StoreError::NotFound(_)), "{missing}");
    let found = store
        .find_by_tenant(Environment::Integration, 100_002)
        .await
        .unwrap();
    assert!(found.is_none(), "the tenant index entry is gone");
    store
        .insert(&record(&master_key, COUNT + 1, 100_002))
        .await
        .expect("the tenant is free again");
    let found = store
        .find_by_tenant(Environment::Integration, 100_002)
        .await
        .unwrap()
        .expect("found by tenant");
    assert_eq!(found.id, format!("conn-{:05}", COUNT + 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn store_contract_holds_on_both_backends() {
    let sled_dir = tempfile::tempdir().unwrap();
    let sled = Store::open(sled_dir.path()).expect("open sled");
    check_store_contract(&sled).await;

    let cluster = Postgres::start();
    let url = cluster.create_database("vault").await;
    let settings = settings_for(url);
    // Two servers starting together both migrate the empty database.
    let (first, second) = tokio::join!(
        Store::connect_postgres(&settings),
        Store::connect_postgres(&settings),
    );
    let postgres = first.expect("connect and migrate");
    second.expect("connect while another server migrates");
    check_store_contract(&postgres).await;

    // A batch is one transaction: a taken tenant inserts none of it.
    let (master_key, _) = MasterKey::generate();
    let batch = [
        record(&master_key, 90_000, 190_000),
        record(&master_key, 90_001, 100_010),
    ];
    let failed = postgres
        .insert_batch(&batch)
        .await
        .expect_err("taken tenant");
    assert!(matches!(failed, StoreError::TenantTaken { .. }), "{failed}");
    assert!(
        postgres.get("conn-90000").await.unwrap().is_none(),
        "part of a failed batch was stored"
    );
}

/// Returns the database settings of `url`, as `STVAULT_DATABASE_URL`.
fn settings_for(url: String) -> DatabaseSettings {
    let url = DatabaseUrl {
        text: SecretString::new(url),
        setting: "STVAULT_DATABASE_URL",
    };
    DatabaseSettings::parse(&url, None).unwrap()
}

/// A pause after a `429` is only ever lengthened: a lease released after a
/// short `Retry-After` keeps the longer pause a verification stored.
#[tokio::test(flavor = "multi_thread")]
async fn shared_pause_is_only_lengthened() {
    let cluster = Postgres::start();
    let url = cluster.create_database("vault").await;
    let settings = settings_for(url.clone());
    let store = Store::connect_postgres(&settings).await.expect("connect");
    let (master_key, _) = MasterKey::generate();
    let connections = [
        record(&master_key, 1, TENANT),
        record(&master_key, 2, TENANT + 1),
    ];
    store.insert_batch(&connections).await.expect("insert");
    let postgres = store.postgres().expect("a PostgreSQL store");
    let request = ClaimRequest {
        connection_id: "conn-00001",
        version: 1,
        owner: "replica-a",
        lease_for: Duration::from_secs(10),
        min_share_left: 0.5,
        min_left: Duration::ZERO,
    };
    let Claim::Leased(lease) = postgres.claim_token(&request).await.expect("claim") else {
        panic!("an empty row is leased");
    };
    postgres
        .pause_token_requests("conn-00001", 1, Duration::from_secs(300))
        .await
        .expect("store a pause");
    postgres
        .release_token_lease(&lease, Some(Duration::from_secs(2)))
        .await
        .expect("release");
    let left = postgres
        .token_pause_left("conn-00001", 1)
        .await
        .expect("read the pause")
        .expect("paused");
    assert!(left > Duration::from_secs(290), "{left:?}");

    // A shorter pause stored later does not shorten it either.
    postgres
        .pause_token_requests("conn-00001", 1, Duration::from_secs(5))
        .await
        .expect("store a pause");
    let left = postgres.token_pause_left("conn-00001", 1).await.unwrap();
    assert!(left > Some(Duration::from_secs(290)), "{left:?}");
    // Another version has no pause.
    assert_eq!(
        postgres.token_pause_left("conn-00001", 2).await.unwrap(),
        None
    );

    // A row that a first claim inserts while the pause is stored, in a
    // transaction not yet committed, takes the pause too.
    let mut other = connect(&url).await;
    let claiming = other.transaction().await.unwrap();
    claiming
        .execute(
            "INSERT INTO stvault_tokens (connection_id, version) VALUES ('conn-00002', 1)",
            &[],
        )
        .await
        .unwrap();
    let pausing = tokio::spawn({
        let postgres = postgres.clone();
        async move {
            postgres
                .pause_token_requests("conn-00002", 1, Duration::from_secs(60))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    claiming.commit().await.unwrap();
    pausing.await.unwrap().expect("store a pause");
    let left = postgres.token_pause_left("conn-00002", 1).await.unwrap();
    assert!(left > Some(Duration::from_secs(50)), "{left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_rotations_keep_one_current_version() {
    const SECRET_3: &str = "cs3.SENTINEL-PG-SECRET-three-51d0";
    let cluster = Postgres::start();
    let url = cluster.create_database("vault").await;
    let fake = fake().await;
    fake.update_app(&client_id(TENANT), |app| {
        app.client_secrets.push(SECRET_3.into())
    });
    // A long upstream timeout, so the slow token request below succeeds.
    let first = Server::start_postgres(&fake, &url, &[("STVAULT_UPSTREAM_TIMEOUT", "30s")]).await;
    let second = first.start_replica().await;
    let id = register(&first, TENANT).await;

    // The first replica stages version 2 and waits on a slow token request
    // while the second replica rotates the same connection.
    fake.set_token_delay(Duration::from_secs(5));
    let mut through_first = first.client().await;
    let slow_id = id.clone();
    let slow = tokio::spawn(async move {
        through_first
            .rotate_credentials(pb::RotateCredentialsRequest {
                connection_id: slow_id,
                client_secret: SECRET_2.into(),
                ..Default::default()
            })
            .await
    });
    let started = Instant::now();
    loop {
        let connection = get(&second, &id).await.expect("get");
        if states(&connection).contains(&(2, State::Pending)) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the first rotation never stored its pending version"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fake.set_token_delay(Duration::ZERO);
    let rotated = second
        .client()
        .await
        .rotate_credentials(pb::RotateCredentialsRequest {
            connection_id: id.clone(),
            client_secret: SECRET_3.into(),
            ..Default::default()
        })
        .await
        .expect("rotation through the second replica")
        .into_inner();
    // Its stage replaced the pending version 2 with its own version 3.
    assert_eq!(
        states(&rotated),
        vec![(1, State::Previous), (3, State::Current)]
    );

    let outcome = slow.await.unwrap();
    let status = outcome.expect_err("the first rotation lost its pending version");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    let connection = get(&first, &id).await.expect("get");
    assert_eq!(
        states(&connection),
        vec![(1, State::Previous), (3, State::Current)]
    );
    token_by_tenant(&second, TENANT).await;
    let form = fake.last_token_form().expect("a token request was made");
    assert!(
        form.contains(&("client_secret".into(), SECRET_3.into())),
        "the current version does not hold the second replica's secret"
    );
}

/// Runs `stvault audit verify --storage postgres` on the database at `url`
/// and returns its exit code and output.
fn verify_audit(url: &str) -> (i32, String) {
    let env = HashMap::from([("STVAULT_DATABASE_URL".to_string(), url.to_string())]);
    server::run_command(&["audit", "verify", "--storage", "postgres"], &env)
}

/// Runs `stvault audit verify` on the database at `url`, asserts that it
/// reports the chain broken at event `sequence`, and returns its output.
fn assert_chain_breaks_at(url: &str, sequence: u64) -> String {
    let (code, output) = verify_audit(url);
    assert_eq!(code, 65, "{output}");
    assert!(
        output.contains(&format!("audit chain broken at event {sequence}:")),
        "{output}"
    );
    output
}

/// Lists every audit event through `server`, oldest first, in pages of
/// `page_size`. Each listing call appends its own event after it returns,
/// so later pages include the events of earlier ones.
async fn list_audit(server: &Server, page_size: i32) -> Vec<pb::AuditEvent> {
    let mut client = server.client().await;
    let mut events = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_audit_events(pb::ListAuditEventsRequest {
                page_size,
                page_token,
                ..Default::default()
            })
            .await
            .expect("list audit events")
            .into_inner();
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            return events;
        }
        page_token = page.next_page_token;
    }
}

/// Connects to the database at `url` as the test's own client.
async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test cluster");
    tokio::spawn(connection);
    client
}

/// Checks that `events` are numbered 1 to N without gaps and that each
/// contains the hash of the one before it.
fn assert_one_chain(events: &[pb::AuditEvent]) {
    for (index, event) in events.iter().enumerate() {
        assert_eq!(event.sequence, index as u64 + 1, "events out of order");
        if index > 0 {
            assert_eq!(
                event.previous_hash,
                events[index - 1].hash,
                "event {} does not chain onto the one before it",
                event.sequence
            );
        }
    }
}

/// Makes `calls` calls, alternating between the two replicas and between
/// GetAccessToken and GetConnection, and returns their request ids.
async fn call_replicas(
    replicas: &[Server; 2],
    id: &str,
    first: usize,
    calls: usize,
) -> Vec<String> {
    let mut clients = [replicas[0].client().await, replicas[1].client().await];
    let mut request_ids = Vec::new();
    for call in first..first + calls {
        let client = &mut clients[call % 2];
        let (returned_id, failure) = if call % 4 < 2 {
            let request = pb::GetAccessTokenRequest {
                connection_id: id.into(),
                ..Default::default()
            };
            let result = client.get_access_token(request).await;
            (request_id(&result), result.err())
        } else {
            let request = pb::GetConnectionRequest {
                connection_id: id.into(),
            };
            let result = client.get_connection(request).await;
            (request_id(&result), result.err())
        };
        assert!(
            failure.is_none(),
            "call {call} ({returned_id}) failed: {failure:?}"
        );
        request_ids.push(returned_id);
    }
    request_ids
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_append_to_one_audit_chain() {
    const TASKS: usize = 20;
    const CALLS_PER_TASK: usize = 10;
    let cluster = Postgres::start();
    let url = cluster.create_database("vault").await;
    let fake = fake().await;
    let first = Server::start_postgres(&fake, &url, &[]).await;
    let second = first.start_replica().await;
    for server in [&first, &second] {
        let dir = server.data_dir();
        assert!(
            !dir.join(stvault::store::DB_DIR_NAME).exists(),
            "a sled database was created"
        );
        assert!(
            !dir.join(stvault::audit::EVENTS_FILE).exists(),
            "a trail file was created"
        );
    }
    let id = register(&first, TENANT).await;
    second
        .client()
        .await
        .rotate_credentials(pb::RotateCredentialsRequest {
            connection_id: id.clone(),
            client_secret: SECRET_2.into(),
            ..Default::default()
        })
        .await
        .expect("rotate");

    // Many tasks call both replicas at once.
    let replicas = std::sync::Arc::new([first, second]);
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let replicas = replicas.clone();
            let id = id.clone();
            tokio::spawn(async move { call_replicas(&replicas, &id, task, CALLS_PER_TASK).await })
        })
        .collect();
    let mut request_ids = Vec::new();
    for task in tasks {
        request_ids.extend(task.await.expect("call task"));
    }
    eprintln!(
        "{} calls over two replicas took {:?}",
        TASKS * CALLS_PER_TASK,
        started.elapsed()
    );
    let [first, second] = &*replicas;

    // The registration, the rotation and one event per call, in one chain.
    let expected = 2 + TASKS * CALLS_PER_TASK;
    let (code, output) = verify_audit(&url);
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains(&format!("audit chain intact: {expected} events")),
        "{output}"
    );

    let through_first = list_audit(first, 1000).await;
    assert_eq!(through_first.len(), expected);
    assert_one_chain(&through_first);
    for request_id in &request_ids {
        let matching = through_first
            .iter()
            .filter(|event| &event.request_id == request_id)
            .count();
        assert_eq!(matching, 1, "request {request_id} has {matching} events");
    }

    // The other replica, in small pages, returns the same events, then
    // the listing events of both.
    let through_second = list_audit(second, 100).await;
    assert_one_chain(&through_second);
    assert!(through_second.len() > expected, "{}", through_second.len());
    assert_eq!(through_second[..expected], through_first[..]);
    assert!(
        through_second[expected..]
            .iter()
            .all(|event| event.rpc == "ListAuditEvents"),
        "{:?}",
        &through_second[expected..]
    );

    // No secret, token or database password reached the audit table. The
    // token is the cached one that the calls above received.
    let token = token_by_id(first, &id).await.expect("token");
    let client = connect(&url).await;
    let rows = client
        .query("SELECT event FROM stvault_audit_events", &[])
        .await
        .expect("read the audit table");
    assert!(rows.len() > expected, "{}", rows.len());
    for row in &rows {
        let event = String::from_utf8(row.get(0)).expect("events are UTF-8 JSON");
        for sentinel in [
            SECRET_1,
            SECRET_2,
            APP_KEY,
            postgres::PASSWORD,
            &token.access_token,
        ] {
            assert!(
                !event.contains(sentinel),
                "an audit event contains {sentinel}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_finds_edited_audit_rows() {
    let cluster = Postgres::start();
    let url = cluster.create_database("vault").await;
    let fake = fake().await;
    let server = Server::start_postgres(&fake, &url, &[]).await;
    let id = register(&server, TENANT).await;
    for _ in 0..9 {
        token_by_id(&server, &id).await.expect("token");
    }
    let (code, output) = verify_audit(&url);
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("audit chain intact: 10 events"), "{output}");

    let client = connect(&url).await;
    let original = client
        .query_one(
            "SELECT event, hash FROM stvault_audit_events WHERE sequence = 4",
            &[],
        )
        .await
        .expect("read event 4");
    let (event, hash): (Vec<u8>, String) = (original.get(0), original.get(1));

    // An edited event, first with its stored hash left as it was, then
    // updated to match.
    client
        .execute(
            "UPDATE stvault_audit_events SET event = convert_to(replace(\
             convert_from(event, 'UTF8'), '\"code\":\"OK\"', '\"code\":\"PERMISSION_DENIED\"'), \
             'UTF8') WHERE sequence = 4",
            &[],
        )
        .await
        .expect("edit event 4");
    let output = assert_chain_breaks_at(&url, 4);
    assert!(output.contains("hash stored beside it"), "{output}");
    client
        .execute(
            "UPDATE stvault_audit_events SET hash = encode(sha256(event), 'hex') \
             WHERE sequence = 4",
            &[],
        )
        .await
        .expect("rehash event 4");
    let output = assert_chain_breaks_at(&url, 4);
    assert!(
        output.contains("previous_hash stored in event 5"),
        "{output}"
    );
    client
        .execute(
            "UPDATE stvault_audit_events SET event = $1, hash = $2 WHERE sequence = 4",
            &[&event, &hash],
        )
        .await
        .expect("restore event 4");
    let (code, output) = verify_audit(&url);
    assert_eq!(code, 0, "{output}");

    // A deleted event in the middle, and at the end.
    client
        .execute("DELETE FROM stvault_audit_events WHERE sequence = 6", &[])
        .await
        .expect("delete event 6");
    let output = assert_chain_breaks_at(&url, 6);
    assert!(output.contains("missing"), "{output}");
    client
        .execute("DELETE FROM stvault_audit_events WHERE sequence >= 6", &[])
        .await
        .expect("delete the tail");
    let output = assert_chain_breaks_at(&url, 6);
    assert!(!output.contains(postgres::PASSWORD), "{output}");
}

/// Returns the path of `server`'s audit spool.
fn spool_path(server: &Server) -> PathBuf {
    server.data_dir().join(stvault::audit::SPOOL_FILE)
}

/// Returns the events in `server`'s audit spool, oldest first; none when
/// the spool file does not exist.
fn spooled_events(server: &Server) -> Vec<stvault::audit::SpooledEvent> {
    let Ok(text) = std::fs::read_to_string(spool_path(server)) else {
        return Vec::new();
    };
    text.lines()
        .map(|line| serde_json::from_str(line).expect("a spool line is one JSON event"))
        .collect()
}

/// Waits until `server` has forwarded its spool and removed the file.
async fn wait_for_empty_spool(server: &Server) {
    let waited = within(READINESS_TIMEOUT, || async { !spool_path(server).exists() }).await;
    assert!(
        !spool_path(server).exists(),
        "the spool was not forwarded within {waited:?}; log:\n{}",
        server.logs()
    );
}

/// Returns the value of the spooled-events gauge that `server` reports.
async fn spooled_gauge(server: &Server) -> i64 {
    let text = reqwest::get(format!("http://{}/metrics", server.metrics_addr()))
        .await
        .expect("scrape metrics")
        .text()
        .await
        .expect("read metrics");
    let line = text
        .lines()
        .find(|line| line.starts_with("stvault_audit_spooled_events "))
        .unwrap_or_else(|| panic!("no spooled-events gauge in:\n{text}"));
    line.rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .expect("a gauge value")
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_serve_cached_tokens_during_outage() {
    const TOKEN_CALLS: usize = 3;
    const SHORT_TOKEN_LIFETIME: Duration = Duration::from_secs(4);
    // Each replica's events during the outage: the token calls, one
    // GetConnection and one call for an expired token.
    const OUTAGE_EVENTS: usize = TOKEN_CALLS + 2;
    let cluster = Postgres::start();
    let url = cluster.create_database("vault").await;
    let fake = fake().await;
    let first =
        Server::start_postgres(&fake, &url, &[("STVAULT_METRICS_LISTEN", "127.0.0.1:0")]).await;
    let second = first.start_replica().await;
    let replicas = [&first, &second];
    let id = register(&first, TENANT).await;
    // Each replica caches a token of its own.
    let mut cached = Vec::new();
    for replica in replicas {
        cached.push(token_by_id(replica, &id).await.expect("token"));
    }
    // And a short-lived token of another connection, which expires during
    // the outage.
    let short_lived = register(&first, TENANT + 1).await;
    fake.set_token_lifetime(SHORT_TOKEN_LIFETIME.as_secs() as i64);
    let short_lived_fetched = Instant::now();
    for replica in replicas {
        token_by_id(replica, &short_lived).await.expect("token");
    }
    fake.set_token_lifetime(3600);
    let before_outage = 6;
    let token_requests = fake.token_requests();

    let stopped_at = std::time::SystemTime::now();
    cluster.stop();
    // Verification cannot read the chain now, and names the setting it used.
    let (code, output) = verify_audit(&url);
    assert_ne!(code, 0, "{output}");
    assert!(output.contains("STVAULT_DATABASE_URL"), "{output}");
    assert!(!output.contains(postgres::PASSWORD), "{output}");
    for replica in replicas {
        wait_for_health(replica, ServingStatus::NotServing).await;
        assert_eq!(
            service_health(replica, "").await,
            Some(ServingStatus::NotServing as i32),
            "overall health while the database is down"
        );
        assert_eq!(
            service_health(replica, stvault::LIVENESS_SERVICE).await,
            Some(ServingStatus::Serving as i32),
            "liveness while the database is down"
        );
    }

    // Cached tokens are served, and calls that need the database fail.
    let mut served = Vec::new();
    let mut refused = Vec::new();
    for (replica, cached) in replicas.iter().zip(&cached) {
        let mut client = replica.client().await;
        for _ in 0..TOKEN_CALLS {
            let request = pb::GetAccessTokenRequest {
                connection_id: id.clone(),
                ..Default::default()
            };
            let result = client.get_access_token(request).await;
            served.push(request_id(&result));
            let token = result.expect("a cached token while the database is down");
            assert_eq!(token.into_inner().access_token, cached.access_token);
        }
        let request = pb::GetConnectionRequest {
            connection_id: id.clone(),
        };
        let result = client.get_connection(request).await;
        refused.push(request_id(&result));
        let status = result.expect_err("GetConnection needs the database");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("database"), "{status:?}");
    }

    // An expired token is not replaced while the database is down, since
    // the connection may have been rotated or deleted meanwhile.
    let expired_at = short_lived_fetched + SHORT_TOKEN_LIFETIME;
    tokio::time::sleep_until((expired_at + Duration::from_millis(500)).into()).await;
    for replica in replicas {
        let mut client = replica.client().await;
        let request = pb::GetAccessTokenRequest {
            connection_id: short_lived.clone(),
            ..Default::default()
        };
        let result = client.get_access_token(request).await;
        refused.push(request_id(&result));
        let status = result.expect_err("no new token while the database is down");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("database"), "{status:?}");
    }
    assert_eq!(
        fake.token_requests(),
        token_requests,
        "a token was requested from ServiceTitan during the outage"
    );

    // Every call's event is in the spool of the replica that served it,
    // with no secret or token.
    for (replica, cached) in replicas.iter().zip(&cached) {
        let spooled = spooled_events(replica);
        assert_eq!(spooled.len(), OUTAGE_EVENTS, "{spooled:?}");
        let positions: Vec<u64> = spooled.iter().map(|event| event.position).collect();
        assert_eq!(positions, (1..=OUTAGE_EVENTS as u64).collect::<Vec<_>>());
        assert_eq!(spooled_gauge(replica).await, OUTAGE_EVENTS as i64);
        let text = std::fs::read_to_string(spool_path(replica)).unwrap();
        for sentinel in [SECRET_1, APP_KEY, postgres::PASSWORD, &cached.access_token] {
            assert!(!text.contains(sentinel), "the spool contains {sentinel}");
        }
        let mode = std::fs::metadata(spool_path(replica))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the spool is readable by others: {mode:o}");
    }
    let (code, output) = verify_audit(&url);
    assert_ne!(code, 0, "{output}");

    let restarted_at = std::time::SystemTime::now();
    cluster.restart();
    for replica in replicas {
        wait_for_health(replica, ServingStatus::Serving).await;
        wait_for_empty_spool(replica).await;
        assert_eq!(spooled_gauge(replica).await, 0);
    }

    // The spooled events are in the shared chain, once each, with the time
    // and outcome of their calls.
    let expected = before_outage + 2 * OUTAGE_EVENTS;
    let (code, output) = verify_audit(&url);
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains(&format!("audit chain intact: {expected} events")),
        "{output}"
    );
    let events = list_audit(&first, 1000).await;
    assert_one_chain(&events);
    assert_eq!(events.len(), expected);
    for (request_ids, code) in [(&served, "OK"), (&refused, "UNAVAILABLE")] {
        for request_id in request_ids {
            let matching: Vec<_> = events
                .iter()
                .filter(|event| &event.request_id == request_id)
                .collect();
            assert_eq!(matching.len(), 1, "request {request_id}: {matching:?}");
            let event = matching[0];
            assert_eq!(event.code, code, "{event:?}");
            let time = std::time::SystemTime::try_from(event.time.unwrap()).unwrap();
            assert!(
                stopped_at <= time && time <= restarted_at,
                "event {} has the time it was forwarded, not the time of its call",
                event.sequence
            );
        }
    }
    let client = connect(&url).await;
    let spools = client
        .query("SELECT forwarded_position FROM stvault_audit_spools", &[])
        .await
        .expect("read the spool progress");
    let positions: Vec<i64> = spools.iter().map(|row| row.get(0)).collect();
    assert_eq!(positions, [OUTAGE_EVENTS as i64; 2]);

    // Calls that need the database work again, and their events go
    // straight to the chain.
    get(&second, &id).await.expect("get after recovery");
    assert!(!spool_path(&second).exists());
    assert!(
        !first.logs().contains(postgres::PASSWORD),
        "the database password reached the log"
    );
}

/// Builds a token request for `tenant_id` in the integration environment.
fn tenant_request(tenant_id: i64) -> pb::GetAccessTokenRequest {
    pb::GetAccessTokenRequest {
        environment: pb::Environment::Integration as i32,
        tenant_id,
        ..Default::default()
    }
}

fn id_request(id: &str) -> pb::GetAccessTokenRequest {
    pb::GetAccessTokenRequest {
        connection_id: id.into(),
        ..Default::default()
    }
}

/// Asserts that an outage call failed with `UNAVAILABLE` and names the cause.
fn assert_no_cached_token<T: std::fmt::Debug>(result: &Result<T, tonic::Status>, case: &str) {
    let status = result.as_ref().expect_err(case);
    assert_eq!(status.code(), Code::Unavailable, "{case}: {status:?}");
    assert!(
        status.message().contains("database is unavailable"),
        "{case}: {status:?}"
    );
    assert!(
        status.message().contains("no cached token"),
        "{case}: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn outage_serves_cached_tokens_by_tenant() {
    const SHORT_TOKEN_LIFETIME: Duration = Duration::from_secs(4);
    let (cached, short_lived, uncached) = (TENANT, TENANT + 1, TENANT + 2);
    let ops = Key::new("ops");
    let scoped = Key::new("billing");
    let policy_dir = tempfile::tempdir().expect("create temporary directory");
    let policy = write_policy(
        policy_dir.path(),
        &format!(
            "{}\n{}",
            ops.entry(r#"["link", "admin", "token"]"#, Some(r#""*""#)),
            scoped.entry(r#"["token"]"#, Some(&format!("[{cached}]")))
        ),
    );
    let cluster = Postgres::start();
    let url = cluster.create_database("vault").await;
    let fake = fake().await;
    let server = Server::start_postgres(
        &fake,
        &url,
        &[("STVAULT_POLICY_FILE", policy.to_str().unwrap())],
    )
    .await;
    let mut client = server.client().await;
    let mut ids = HashMap::new();
    for tenant_id in [cached, short_lived, uncached] {
        let request = ops.request(register_request(tenant_id, SECRET_1));
        let connection = client.register_connection(request).await.expect("register");
        ids.insert(tenant_id, connection.into_inner().connection_id);
    }

    // Warm the cache by tenant for one connection, and by id with a
    // short-lived token for another. The third connection has no token.
    let token = client
        .get_access_token(ops.request(tenant_request(cached)))
        .await
        .expect("token by tenant")
        .into_inner();
    fake.set_token_lifetime(SHORT_TOKEN_LIFETIME.as_secs() as i64);
    let short_lived_fetched = Instant::now();
    client
        .get_access_token(ops.request(id_request(&ids[&short_lived])))
        .await
        .expect("short-lived token by id");
    fake.set_token_lifetime(3600);
    let token_requests = fake.token_requests();

    cluster.stop();
    wait_for_health(&server, ServingStatus::NotServing).await;

    // Cached tokens are served by tenant and, to a caller limited to that
    // tenant, by id. Each served call's audit event names the connection.
    let served_cases = [
        (
            "by tenant, tenant-scoped caller",
            &scoped,
            tenant_request(cached),
        ),
        (
            "by tenant, caller of every tenant",
            &ops,
            tenant_request(cached),
        ),
        (
            "by id, tenant-scoped caller",
            &scoped,
            id_request(&ids[&cached]),
        ),
    ];
    let mut served = Vec::new();
    for (case, key, request) in served_cases {
        let result = client.get_access_token(key.request(request)).await;
        served.push(request_id(&result));
        let served_token = result.expect(case).into_inner();
        assert_eq!(served_token.access_token, token.access_token, "{case}");
        assert_eq!(served_token.connection_id, ids[&cached], "{case}");
        assert_eq!(served_token.tenant_id, cached, "{case}");
    }

    // A tenant-scoped caller gets no token of another tenant, whichever
    // form names it, although this server has it cached.
    let denied_cases = [
        ("other tenant by tenant", tenant_request(short_lived)),
        ("other tenant by id", id_request(&ids[&short_lived])),
    ];
    let mut denied = Vec::new();
    for (case, request) in denied_cases {
        let result = client.get_access_token(scoped.request(request)).await;
        denied.push(request_id(&result));
        let status = result.expect_err(case);
        assert_eq!(status.code(), Code::PermissionDenied, "{case}: {status:?}");
    }

    // A connection with nothing cached, or with an expired token, has no
    // token to serve.
    // Each failed call is listed with the connection and tenant that its
    // audit event names.
    let mut unavailable = Vec::new();
    let result = client
        .get_access_token(ops.request(tenant_request(uncached)))
        .await;
    unavailable.push((request_id(&result), None, Some(uncached)));
    assert_no_cached_token(&result, "uncached tenant by tenant");
    let result = client
        .get_access_token(ops.request(id_request(&ids[&uncached])))
        .await;
    unavailable.push((request_id(&result), Some(ids[&uncached].clone()), None));
    assert_no_cached_token(&result, "uncached tenant by id");
    let expired_at = short_lived_fetched + SHORT_TOKEN_LIFETIME;
    tokio::time::sleep_until((expired_at + Duration::from_millis(500)).into()).await;
    let result = client
        .get_access_token(ops.request(tenant_request(short_lived)))
        .await;
    unavailable.push((
        request_id(&result),
        Some(ids[&short_lived].clone()),
        Some(short_lived),
    ));
    assert_no_cached_token(&result, "expired token by tenant");
    assert_eq!(
        fake.token_requests(),
        token_requests,
        "a token was requested from ServiceTitan during the outage"
    );

    // The spooled events carry the connection, environment and tenant.
    let spooled = spooled_events(&server);
    let event = |request_id: &str| {
        let matching: Vec<_> = spooled
            .iter()
            .filter(|event| event.draft.request_id == request_id)
            .collect();
        assert_eq!(matching.len(), 1, "request {request_id}: {spooled:?}");
        matching[0].draft.clone()
    };
    for request_id in &served {
        let event = event(request_id);
        assert_eq!(event.code, "OK", "{event:?}");
        assert_eq!(
            event.connection_id.as_ref(),
            Some(&ids[&cached]),
            "{event:?}"
        );
        assert_eq!(
            event.environment,
            Some(Environment::Integration),
            "{event:?}"
        );
        assert_eq!(event.tenant_id, Some(cached), "{event:?}");
    }
    for request_id in &denied {
        let event = event(request_id);
        assert_eq!(event.code, "PERMISSION_DENIED", "{event:?}");
        assert_eq!(
            event.environment,
            Some(Environment::Integration),
            "{event:?}"
        );
        assert_eq!(event.tenant_id, Some(short_lived), "{event:?}");
    }
    for (request_id, connection_id, tenant_id) in &unavailable {
        let event = event(request_id);
        assert_eq!(event.code, "UNAVAILABLE", "{event:?}");
        assert_eq!(&event.connection_id, connection_id, "{event:?}");
        assert_eq!(&event.tenant_id, tenant_id, "{event:?}");
    }
    assert_eq!(
        spooled.len(),
        served.len() + denied.len() + unavailable.len(),
        "{spooled:?}"
    );

    cluster.restart();
    wait_for_health(&server, ServingStatus::Serving).await;
    wait_for_empty_spool(&server).await;

    // With the database back, every form works again and the limits hold.
    for (case, key, request) in [
        ("uncached tenant by tenant", &ops, tenant_request(uncached)),
        ("expired token by tenant", &ops, tenant_request(short_lived)),
        (
            "by id, tenant-scoped caller",
            &scoped,
            id_request(&ids[&cached]),
        ),
        (
            "by tenant, tenant-scoped caller",
            &scoped,
            tenant_request(cached),
        ),
    ] {
        let result = client.get_access_token(key.request(request)).await;
        let served_token = result.expect(case).into_inner();
        assert!(!served_token.access_token.is_empty(), "{case}");
    }
    let status = client
        .get_access_token(scoped.request(id_request(&ids[&short_lived])))
        .await
        .expect_err("another tenant by id after the outage");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let (code, output) = verify_audit(&url);
    assert_eq!(code, 0, "{output}");
}

#[tokio::test(flavor = "multi_thread")]
async fn spool_forwarded_twice_enters_chain_once() {
    let cluster = Postgres::start();
    let url = cluster.create_database("vault").await;
    let fake = fake().await;
    let mut server = Server::start_postgres(&fake, &url, &[]).await;
    let id = register(&server, TENANT).await;
    token_by_id(&server, &id).await.expect("token");

    cluster.stop();
    wait_for_health(&server, ServingStatus::NotServing).await;
    for _ in 0..3 {
        token_by_id(&server, &id)
            .await
            .expect("a cached token while the database is down");
    }
    let spool = std::fs::read(spool_path(&server)).expect("read the spool");
    cluster.restart();
    wait_for_empty_spool(&server).await;
    let (code, output) = verify_audit(&url);
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("audit chain intact: 5 events"), "{output}");

    // A crash after the forwarding transaction committed, but before the
    // spool file was removed, leaves the file behind: a restart finds it
    // and forwards it again.
    server.terminate();
    std::fs::write(spool_path(&server), &spool).expect("put the spool back");
    server.launch().await;
    wait_for_empty_spool(&server).await;
    let (code, output) = verify_audit(&url);
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("audit chain intact: 5 events"), "{output}");
    assert!(
        server.logs().contains("already_forwarded=3"),
        "{}",
        server.logs()
    );

    // A spool forwarded only in part: its first three events are in the
    // chain, and a fourth, added here, is not. Only the fourth is added.
    server.terminate();
    let mut longer = spool.clone();
    let last_line = String::from_utf8(spool.clone())
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .replace("\"position\":3", "\"position\":4");
    longer.extend_from_slice(last_line.as_bytes());
    longer.push(b'\n');
    std::fs::write(spool_path(&server), &longer).expect("write a longer spool");
    server.launch().await;
    wait_for_empty_spool(&server).await;
    let (code, output) = verify_audit(&url);
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("audit chain intact: 6 events"), "{output}");
}

/// Writes `count` chained events into the sled database of `data_dir`,
/// where earlier versions kept the audit trail, and returns the last hash.
fn write_legacy_trail(data_dir: &std::path::Path, count: u64) -> String {
    use sha2::{Digest, Sha256};
    let db = sled::open(data_dir.join(stvault::store::DB_DIR_NAME)).expect("open sled");
    let tree = db.open_tree("audit_events").expect("open the events tree");
    let mut previous = stvault::audit::GENESIS_HASH.to_owned();
    for sequence in 1..=count {
        let event = stvault::audit::AuditEvent {
            sequence,
            time: std::time::SystemTime::now(),
            request_id: format!("earlier-{sequence}"),
            caller: "admin".into(),
            auth_method: "bearer_key".into(),
            peer: None,
            rpc: "ListConnections".into(),
            connection_id: None,
            environment: None,
            tenant_id: None,
            credential_version: None,
            code: "OK".into(),
            previous_hash: previous.clone(),
        };
        let bytes = serde_json::to_vec(&event).unwrap();
        previous = hex::encode(Sha256::digest(&bytes));
        tree.insert(sequence.to_be_bytes(), bytes).unwrap();
    }
    db.flush().expect("flush sled");
    previous
}

#[tokio::test(flavor = "multi_thread")]
async fn earlier_local_trail_stays_verifiable() {
    let cluster = Postgres::start();
    let url = cluster.create_database("vault").await;
    let fake = fake().await;
    let first = Server::start_postgres(&fake, &url, &[]).await;

    // A replica whose data directory still has an earlier version's trail
    // in its sled database.
    let earlier = tempfile::tempdir().unwrap();
    let data_dir = earlier.path().join("data");
    let last_hash = write_legacy_trail(&data_dir, 3);
    let mut env = first.env.clone();
    env.insert("STVAULT_DATA_DIR".into(), data_dir.display().to_string());
    let replica = Server::start_env(env).await;
    assert!(
        replica.logs().contains("moved the audit trail"),
        "{}",
        replica.logs()
    );
    register(&replica, TENANT).await;

    // The earlier events are in the trail file, the new one in the database.
    let env = HashMap::from([(
        "STVAULT_DATA_DIR".to_string(),
        data_dir.display().to_string(),
    )]);
    let (code, output) = server::run_command(&["audit", "verify"], &env);
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains(&format!(
            "audit chain intact: 3 events, last hash {last_hash}"
        )),
        "{output}"
    );
    let (code, output) = verify_audit(&url);
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("audit chain intact: 1 events"), "{output}");
}

#[test]
fn audit_verify_names_missing_settings() {
    let env = HashMap::new();
    let (code, output) = server::run_command(&["audit", "verify", "--storage", "postgres"], &env);
    assert_eq!(code, 78, "{output}");
    assert!(output.contains("STVAULT_DATABASE_URL"), "{output}");

    let (code, output) = server::run_command(&["audit", "verify"], &env);
    assert_eq!(code, 64, "{output}");
    assert!(output.contains("--data-dir"), "{output}");
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_audit_insert_stops_changes_before_they_act() {
    let cluster = Postgres::start();
    let url = cluster.create_database("vault").await;
    let fake = fake().await;
    let server = Server::start_postgres(&fake, &url, &[]).await;
    let id = register(&server, TENANT).await;
    token_by_id(&server, &id).await.expect("token");

    // The database still serves reads but rejects every new event, as it
    // would with a revoked privilege or a full disk.
    let database = connect(&url).await;
    database
        .batch_execute(
            "ALTER TABLE stvault_audit_events ADD CONSTRAINT refuse CHECK (false) NOT VALID",
        )
        .await
        .unwrap();
    let status = token_by_id(&server, &id).await.expect_err("no event");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let mut client = server.client().await;
    let status = client
        .update_connection(pb::UpdateConnectionRequest {
            connection: Some(pb::Connection {
                connection_id: id.clone(),
                display_name: "renamed while unaudited".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into()],
            }),
            ..Default::default()
        })
        .await
        .expect_err("an update whose event cannot be written");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    database
        .batch_execute("ALTER TABLE stvault_audit_events DROP CONSTRAINT refuse")
        .await
        .unwrap();
    let connection = get(&server, &id).await.expect("get");
    assert_eq!(connection.display_name, format!("tenant {TENANT}"));
    let (code, output) = verify_audit(&url);
    assert_eq!(code, 0, "{output}");
}
