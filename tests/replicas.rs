//! Replicas sharing one PostgreSQL database. Token work: a cold burst over
//! two replicas costs ServiceTitan one token request. A replica killed
//! while it has a connection's lease is taken over once the lease lapses.
//! A rate-limit pause reaches every replica, and the shared token is stored
//! sealed. Policy: a policy reloaded on one replica is in force on the
//! other within a second, a policy row forged in the database is not
//! enforced, and a reload during a database outage is shared once the
//! database returns. Each test starts its own PostgreSQL cluster and real
//! stvault processes against a fake ServiceTitan on loopback.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use stvault::pb;
use stvault::pb::credential_vault_client::CredentialVaultClient;
use support::callers::Key;
use support::fake_servicetitan::{FakeApp, FakeServiceTitan, Fault};
use support::postgres::Postgres;
use support::server::Server;
use tonic::Code;
use tonic::transport::Channel;

const TENANT: i64 = 7700;
const CLIENT_ID: &str = "cid.shared.7700";
const SECRET: &str = "cs1.SENTINEL-SHARED-SECRET-51d3";
const SECRET_2: &str = "cs2.SENTINEL-SHARED-SECRET-8b6f";
const APP_KEY: &str = "ak1.SENTINEL-SHARED-APPKEY-0e7a";

async fn fake() -> FakeServiceTitan {
    let fake = FakeServiceTitan::start().await;
    fake.add_app(FakeApp::new(CLIENT_ID, SECRET, TENANT, APP_KEY));
    fake
}

/// Starts two replicas on a fresh database with `extra` settings and
/// registers the tenant through the first. Returns the connection id.
async fn replicas(
    cluster: &Postgres,
    fake: &FakeServiceTitan,
    extra: &[(&str, &str)],
) -> (Server, Server, String) {
    let url = cluster.create_database("vault").await;
    let first = Server::start_postgres(fake, &url, extra).await;
    let second = first.start_replica().await;
    let id = first
        .client()
        .await
        .register_connection(pb::RegisterConnectionRequest {
            environment: pb::Environment::Integration as i32,
            tenant_id: TENANT,
            client_id: CLIENT_ID.into(),
            client_secret: SECRET.into(),
            app_key: APP_KEY.into(),
            display_name: "shared tokens".into(),
            ..Default::default()
        })
        .await
        .expect("register")
        .into_inner()
        .connection_id;
    (first, second, id)
}

/// Asserts that no replica fell back to requesting tokens on its own.
fn assert_shared(servers: &[&Server]) {
    for server in servers {
        let logs = server.logs();
        assert!(
            !logs.contains("without sharing"),
            "a replica did not share its token request:\n{logs}"
        );
    }
}

async fn token(
    client: &mut CredentialVaultClient<Channel>,
    id: &str,
) -> Result<pb::AccessToken, tonic::Status> {
    client
        .get_access_token(pb::GetAccessTokenRequest {
            connection_id: id.into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Sends `count` concurrent token calls to `server` over four HTTP/2
/// connections, so no one connection's stream limit queues them.
async fn burst(
    server: &Server,
    id: &str,
    count: usize,
) -> Vec<tokio::task::JoinHandle<Result<pb::AccessToken, tonic::Status>>> {
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(server.client().await);
    }
    (0..count)
        .map(|n| {
            let mut client = clients[n % clients.len()].clone();
            let id = id.to_owned();
            tokio::spawn(async move { token(&mut client, &id).await })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn cold_burst_over_two_replicas_costs_one_request() {
    let cluster = Postgres::start();
    let fake = fake().await;
    // Successful token hand-outs are logged at debug.
    let settings = [("RUST_LOG", "info,stvault=debug")];
    let (first, second, id) = replicas(&cluster, &fake, &settings).await;
    // Registration's check requested tokens of its own; count from here.
    let before = fake.token_requests();
    fake.set_token_delay(Duration::from_millis(300));

    let mut calls = burst(&first, &id, 250).await;
    calls.extend(burst(&second, &id, 250).await);
    let mut tokens = HashSet::new();
    for call in calls {
        let issued = call.await.unwrap().expect("token");
        assert_eq!(issued.app_key, APP_KEY);
        tokens.insert(issued.access_token);
    }
    assert_eq!(tokens.len(), 1, "every caller gets the same token");
    assert_shared(&[&first, &second]);
    // Each RPC's log line names its connection and tenant once, whether
    // the request names the connection or the tenant.
    first
        .client()
        .await
        .get_access_token(pb::GetAccessTokenRequest {
            environment: pb::Environment::Integration as i32,
            tenant_id: TENANT,
            ..Default::default()
        })
        .await
        .expect("a token by tenant");
    let logs = first.logs();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("GetAccessToken") && line.contains("rpc finished"))
        .collect();
    assert!(lines.len() > 1, "{logs}");
    for line in [lines[0], lines[lines.len() - 1]] {
        assert_eq!(line.matches("connection.id=").count(), 1, "{line}");
        assert_eq!(line.matches("tenant.id=").count(), 1, "{line}");
    }
    assert_eq!(fake.token_requests() - before, 1);

    // The stored token is sealed: neither its text nor any secret is in
    // the database.
    let token = tokens.into_iter().next().unwrap();
    let dump = cluster.dump("vault");
    for needle in [token.as_str(), SECRET, APP_KEY] {
        assert!(
            !dump.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle:.12}… is in the database dump"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_lease_holder_is_taken_over() {
    let cluster = Postgres::start();
    let fake = fake().await;
    // A lease lasts the upstream timeout plus 2 s: 4 s here.
    let settings = [("STVAULT_UPSTREAM_TIMEOUT", "2s")];
    let (mut first, second, id) = replicas(&cluster, &fake, &settings).await;
    let before = fake.token_requests();

    // The first replica takes the lease and its request hangs.
    fake.set_token_delay(Duration::from_secs(30));
    let mut client = first.client().await;
    let hung_id = id.clone();
    let hung = tokio::spawn(async move { token(&mut client, &hung_id).await });
    let started = Instant::now();
    while fake.token_requests() == before {
        assert!(started.elapsed() < Duration::from_secs(5), "no request");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill9();
    let killed = Instant::now();
    fake.set_token_delay(Duration::ZERO);
    assert!(hung.await.unwrap().is_err());

    // Every caller of the second replica retries until it has a token.
    // Until the lease lapses they may get UNAVAILABLE; after it, the
    // second replica makes the one request for all of them.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(second.client().await);
    }
    let calls: Vec<_> = (0..100)
        .map(|n| {
            let mut client = clients[n % clients.len()].clone();
            let id = id.clone();
            tokio::spawn(async move {
                loop {
                    match token(&mut client, &id).await {
                        Ok(issued) => return issued.access_token,
                        Err(status) => {
                            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                            assert!(killed.elapsed() < Duration::from_secs(15), "{status:?}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            })
        })
        .collect();
    let mut tokens = HashSet::new();
    for call in calls {
        tokens.insert(call.await.unwrap());
    }
    let took = killed.elapsed();
    eprintln!("taken over {took:?} after the lease holder died");
    assert_eq!(tokens.len(), 1);
    assert_eq!(
        fake.token_requests() - before,
        2,
        "the dead replica's request and one from the replica that took over"
    );
    assert!(took < Duration::from_secs(8), "{took:?}");
    assert_shared(&[&second]);
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limit_pause_reaches_every_replica() {
    let cluster = Postgres::start();
    let fake = fake().await;
    let (first, second, id) = replicas(&cluster, &fake, &[]).await;
    let before = fake.token_requests();
    fake.set_token_fault(Fault::RateLimited {
        retry_after_secs: 30,
    });

    let status = token(&mut first.client().await, &id)
        .await
        .expect_err("rate limited");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(fake.token_requests() - before, 1);

    // The other replica honours the same pause without asking.
    let status = token(&mut second.client().await, &id)
        .await
        .expect_err("paused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("retry"), "{status:?}");
    assert_eq!(fake.token_requests() - before, 1);
    assert_shared(&[&first, &second]);
}

/// Checks that an error logged during a token call carries the call's
/// request id, although its other fields are recorded only at the end.
#[tokio::test(flavor = "multi_thread")]
async fn token_call_error_has_request_id() {
    let cluster = Postgres::start();
    let fake = fake().await;
    let (first, _second, id) = replicas(&cluster, &fake, &[]).await;
    let database = connect(&first.env["STVAULT_DATABASE_URL"]).await;
    database
        .execute(
            "UPDATE stvault_connections SET record = '\\x00'::bytea WHERE id = $1",
            &[&id],
        )
        .await
        .expect("damage the stored record");
    let failed = first
        .client()
        .await
        .get_access_token(pb::GetAccessTokenRequest {
            connection_id: id.clone(),
            ..Default::default()
        })
        .await;
    let request_id = support::server::request_id(&failed);
    assert!(failed.is_err(), "a damaged record served a token");
    let logs = first.logs();
    let line = logs
        .lines()
        .find(|line| line.contains("ERROR") && line.contains("not readable"))
        .unwrap_or_else(|| panic!("no error line: {logs}"));
    assert!(
        line.contains(&format!("request.id=\"{request_id}\"")),
        "{line}"
    );
}

/// Rotates the connection to `SECRET_2` through `server`.
async fn rotate_to_second_secret(server: &Server, id: &str) {
    server
        .client()
        .await
        .rotate_credentials(pb::RotateCredentialsRequest {
            connection_id: id.into(),
            client_secret: SECRET_2.into(),
            ..Default::default()
        })
        .await
        .expect("rotate");
}

/// Returns the message of a report's token check.
fn token_check(report: &pb::VerificationReport) -> String {
    report
        .checks
        .iter()
        .find(|check| check.name == "token")
        .map(|check| check.message.clone())
        .unwrap_or_else(|| panic!("no token check: {report:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn verification_rate_limit_reaches_every_replica() {
    let cluster = Postgres::start();
    let fake = fake().await;
    fake.update_app(CLIENT_ID, |app| app.client_secrets.push(SECRET_2.into()));
    let (first, second, id) = replicas(&cluster, &fake, &[]).await;
    // The shared row contains version 1's token when version 2 gets the 429.
    token(&mut second.client().await, &id)
        .await
        .expect("a version 1 token");
    rotate_to_second_secret(&first, &id).await;
    fake.set_token_fault(Fault::RateLimited {
        retry_after_secs: 30,
    });
    let verify = pb::VerifyConnectionRequest {
        connection_id: id.clone(),
    };
    let limited = first
        .client()
        .await
        .verify_connection(verify.clone())
        .await
        .expect("a report")
        .into_inner();
    assert!(token_check(&limited).contains("429"), "{limited:?}");
    let before = fake.token_requests();

    // The other replica neither verifies nor requests a token until the
    // pause ends.
    let paused = second
        .client()
        .await
        .verify_connection(verify)
        .await
        .expect("a report")
        .into_inner();
    assert!(token_check(&paused).contains("paused"), "{paused:?}");
    // The second replica serves its cached version 1 token until the
    // rotation's notification reaches it, within a second.
    let started = Instant::now();
    let status = loop {
        match token(&mut second.client().await, &id).await {
            Ok(issued) if issued.credential_version == 1 => {
                assert!(
                    started.elapsed() < Duration::from_secs(1),
                    "still version 1"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(issued) => panic!(
                "a token while paused: version {}",
                issued.credential_version
            ),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(fake.token_requests(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_replaces_the_shared_token() {
    let cluster = Postgres::start();
    let fake = fake().await;
    fake.update_app(CLIENT_ID, |app| app.client_secrets.push(SECRET_2.into()));
    let (first, second, id) = replicas(&cluster, &fake, &[]).await;
    let old = token(&mut second.client().await, &id).await.expect("token");
    assert_eq!(old.credential_version, 1);

    rotate_to_second_secret(&first, &id).await;
    // The rotation's check requested tokens of its own; count from here.
    let before = fake.token_requests();
    let mut tokens = HashSet::new();
    let started = Instant::now();
    for server in [&first, &second, &first, &second] {
        // The second replica drops its cached version 1 when the change
        // notification arrives, within a second.
        let issued = loop {
            let issued = token(&mut server.client().await, &id).await.expect("token");
            if issued.credential_version == 2 {
                break issued;
            }
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "still version 1"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        tokens.insert(issued.access_token);
    }
    assert_eq!(tokens.len(), 1);
    assert!(!tokens.contains(&old.access_token));
    assert_eq!(fake.token_requests() - before, 1);
    assert_shared(&[&first, &second]);
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_reload_reaches_other_replica() {
    let cluster = Postgres::start();
    let url = cluster.create_database("vault").await;
    let fake = fake().await;
    let ops = Key::new("ops");
    let auditor = Key::new("auditor");
    let both = format!(
        "{}{}",
        ops.entry(r#"["admin"]"#, None),
        auditor.entry(r#"["admin"]"#, None)
    );
    // Each replica reads a file of its own, so only the shared policy can
    // carry the first one's change to the second.
    let (first, second, _dir, first_file) = policy_replicas(&fake, &url, &both).await;
    let mut client = second.client().await;
    client
        .list_connections(auditor.request(pb::ListConnectionsRequest::default()))
        .await
        .expect("the auditor is in both files");

    std::fs::write(&first_file, ops.entry(r#"["admin"]"#, None)).unwrap();
    assert!(first.reload_policy().await.contains("policy reloaded"));
    let started = Instant::now();
    loop {
        let call = client
            .list_connections(auditor.request(pb::ListConnectionsRequest::default()))
            .await;
        match call {
            Err(status) if status.code() == Code::Unauthenticated => break,
            _ => {
                assert!(
                    started.elapsed() < Duration::from_secs(1),
                    "the removed caller still works on the other replica:\n{}",
                    second.logs()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    eprintln!(
        "policy change seen by the other replica after {:?}",
        started.elapsed()
    );
    client
        .list_connections(ops.request(pb::ListConnectionsRequest::default()))
        .await
        .expect("the remaining caller");
    assert!(
        second
            .logs()
            .contains("policy changed by another replica is now in force"),
        "{}",
        second.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shared_token_short_of_min_valid_for() {
    let cluster = Postgres::start();
    let fake = fake().await;
    let (first, second, id) = replicas(&cluster, &fake, &[]).await;
    // 8 s tokens: one is shared while more than 2.8 s (35%) is left, but a
    // caller asking for 4 s (half the lifetime at most) needs a new one.
    fake.set_token_lifetime(8);
    let request = |seconds| pb::GetAccessTokenRequest {
        connection_id: id.clone(),
        min_valid_for: Some(prost_types::Duration { seconds, nanos: 0 }),
        ..Default::default()
    };
    let issued = first
        .client()
        .await
        .get_access_token(request(1))
        .await
        .expect("token")
        .into_inner();
    let before = fake.token_requests();
    tokio::time::sleep(Duration::from_millis(4600)).await;

    let fresh = second
        .client()
        .await
        .get_access_token(request(4))
        .await
        .expect("token")
        .into_inner();
    assert_ne!(fresh.access_token, issued.access_token);
    assert_eq!(fake.token_requests() - before, 1);
    assert_shared(&[&first, &second]);
}

#[tokio::test(flavor = "multi_thread")]
async fn edited_token_rows_are_not_trusted() {
    let cluster = Postgres::start();
    let fake = fake().await;
    let (first, mut second, id) = replicas(&cluster, &fake, &[]).await;
    let issued = token(&mut first.client().await, &id).await.expect("token");
    let url = cluster.url("vault");
    let (database, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);

    // An edited type or expiry no longer matches the token's seal, so the
    // other replica requests a new token instead of passing them on.
    database
        .batch_execute(
            "UPDATE stvault_tokens SET token_type = 'Basic', expires_at_ms = expires_at_ms + 1",
        )
        .await
        .unwrap();
    let before = fake.token_requests();
    let other = token(&mut second.client().await, &id).await.expect("token");
    assert_eq!(other.token_type, "Bearer");
    assert_ne!(other.access_token, issued.access_token);
    assert_eq!(fake.token_requests() - before, 1);
    assert!(second.logs().contains("the stored token does not open"));

    // A lease no replica would grant is taken over at once.
    second.kill9();
    second.launch().await;
    database
        .batch_execute(
            "UPDATE stvault_tokens SET token = NULL, lease_owner = 'elsewhere', \
             lease_until = now() + interval '1 day'",
        )
        .await
        .unwrap();
    let started = Instant::now();
    token(&mut second.client().await, &id).await.expect("token");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(second.logs().contains("taking over a token lease"));
}

/// Two replicas on `url`, each reading a policy file of its own that
/// starts as `text`. Returns them with the directory holding the files and
/// the first replica's file.
async fn policy_replicas(
    fake: &FakeServiceTitan,
    url: &str,
    text: &str,
) -> (Server, Server, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let first_file = dir.path().join("first.toml");
    let second_file = dir.path().join("second.toml");
    std::fs::write(&first_file, text).unwrap();
    std::fs::write(&second_file, text).unwrap();
    let first = Server::start_postgres(
        fake,
        url,
        &[("STVAULT_POLICY_FILE", first_file.to_str().unwrap())],
    )
    .await;
    let second = first
        .start_replica_with(&[("STVAULT_POLICY_FILE", second_file.to_str().unwrap())])
        .await;
    (first, second, dir, first_file)
}

async fn list_as(server: &Server, key: &Key) -> Result<(), tonic::Status> {
    server
        .client()
        .await
        .list_connections(key.request(pb::ListConnectionsRequest::default()))
        .await
        .map(|_| ())
}

/// Waits up to `timeout` for `server` to reject `key` as UNAUTHENTICATED.
async fn wait_until_rejected(server: &Server, key: &Key, timeout: Duration) {
    let started = Instant::now();
    loop {
        match list_as(server, key).await {
            Err(status) if status.code() == Code::Unauthenticated => return,
            result => assert!(
                started.elapsed() < timeout,
                "{} still gets {result:?} after {timeout:?}:\n{}",
                key.name,
                server.logs()
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits up to `timeout` for `server` to log `needle` `count` times.
async fn wait_for_log(server: &Server, needle: &str, count: usize, timeout: Duration) {
    let started = Instant::now();
    while server.logs().matches(needle).count() < count {
        assert!(
            started.elapsed() < timeout,
            "{needle:?} not logged {count} times within {timeout:?}:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test cluster");
    tokio::spawn(connection);
    client
}

/// Replaces the shared policy the way someone with write access to the
/// database but without the master key could: a new document with its
/// correct SHA-256, announced like a replica announces one.
async fn forge_policy(url: &str, document: &str) {
    use sha2::Digest;
    let sha256 = hex::encode(sha2::Sha256::digest(document.as_bytes()));
    let client = connect(url).await;
    let updated = client
        .execute(
            "UPDATE stvault_policy SET document = $1, sha256 = $2",
            &[&document, &sha256],
        )
        .await
        .expect("update the shared policy");
    assert_eq!(updated, 1, "no shared policy row to forge");
    client
        .execute("SELECT pg_notify('stvault_policy', $1)", &[&sha256])
        .await
        .expect("notify the replicas");
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_shared_policy_is_rejected() {
    let cluster = Postgres::start();
    let url = cluster.create_database("vault").await;
    let fake = fake().await;
    let ops = Key::new("ops");
    let intruder = Key::new("intruder");
    let (first, second, _dir, _) =
        policy_replicas(&fake, &url, &ops.entry(r#"["admin"]"#, None)).await;

    let granting = format!(
        "{}{}",
        ops.entry(r#"["admin"]"#, None),
        intruder.entry(r#"["token", "admin"]"#, Some(r#""*""#))
    );
    forge_policy(&url, &granting).await;
    for server in [&first, &second] {
        wait_for_log(server, "shared policy rejected", 1, Duration::from_secs(5)).await;
        let logs = server.logs();
        assert!(
            logs.contains("does not verify under master key"),
            "the rejection does not name the bad seal:\n{logs}"
        );
        let status = list_as(server, &intruder).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        list_as(server, &ops).await.expect("ops is still in force");
    }

    // An empty policy would reject every caller; forged, it changes nothing.
    forge_policy(&url, "").await;
    for server in [&first, &second] {
        wait_for_log(server, "shared policy rejected", 2, Duration::from_secs(5)).await;
        list_as(server, &ops).await.expect("ops is still in force");
        let logs = server.logs();
        assert!(
            !logs.contains("policy changed by another replica is now in force"),
            "a forged policy was enforced:\n{logs}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_reloaded_during_outage_is_shared_later() {
    let cluster = Postgres::start();
    let url = cluster.create_database("vault").await;
    let fake = fake().await;
    let ops = Key::new("ops");
    let auditor = Key::new("auditor");
    let both = format!(
        "{}{}",
        ops.entry(r#"["admin"]"#, None),
        auditor.entry(r#"["admin"]"#, None)
    );
    let (first, second, _dir, first_file) = policy_replicas(&fake, &url, &both).await;
    list_as(&second, &auditor)
        .await
        .expect("the auditor is in both files");

    cluster.stop();
    std::fs::write(&first_file, ops.entry(r#"["admin"]"#, None)).unwrap();
    assert!(first.reload_policy().await.contains("policy reloaded"));
    wait_for_log(
        &first,
        "cannot share the policy",
        1,
        Duration::from_secs(30),
    )
    .await;
    cluster.restart();

    let started = Instant::now();
    for server in [&first, &second] {
        wait_until_rejected(server, &auditor, Duration::from_secs(10)).await;
    }
    eprintln!(
        "reload shared after the database returned, within {:?}",
        started.elapsed()
    );
    wait_for_log(
        &first,
        "now shared with the other replicas",
        1,
        Duration::from_secs(5),
    )
    .await;

    // Later notifications must not bring the old shared policy back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for server in [&first, &second] {
        let status = list_as(server, &auditor).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        list_as(server, &ops).await.expect("ops is still in force");
    }
    let logs = first.logs();
    assert!(
        !logs.contains("policy changed by another replica is now in force"),
        "the replica that reloaded applied the old shared policy:\n{logs}"
    );
}
