//! Staged rotation and rollback through the real binary: a rotation is
//! verified before it becomes current, a failed one changes nothing, and
//! `kill -9` at any step leaves exactly one readable current version, on
//! sled and on PostgreSQL.

mod support;

use std::time::{Duration, Instant};

use stvault::pb;
use stvault::pb::credential_version::State;
use support::backend::Backend;
use support::fake_servicetitan::{FakeApp, FakeServiceTitan};
use support::server::Server;
use tonic::Code;
use tonic_types::StatusExt;

const CLIENT_ID: &str = "cid.rotate";
const SECRET_1: &str = "cs1.rotate-first";
const SECRET_2: &str = "cs2.rotate-second";
const APP_KEY: &str = "ak1.rotate-key";
const TENANT: i64 = 4242;
const PAUSE_ENV: &str = "STVAULT_TEST_PAUSE_AT";

backend_tests!(
    verified_rotation_becomes_current,
    failed_rotation_keeps_current,
    rollback_restores_previous,
    kill_after_pending_keeps_old_version,
    kill_after_verify_keeps_old_version,
    kill_before_discard_keeps_old_version,
    kill_after_promote_keeps_new_version,
    kill_during_verification_keeps_old_version,
);

/// Starts a fake whose app accepts both secrets.
async fn two_secret_fake() -> FakeServiceTitan {
    let fake = FakeServiceTitan::start().await;
    let mut app = FakeApp::new(CLIENT_ID, SECRET_1, TENANT, APP_KEY);
    app.client_secrets.push(SECRET_2.into());
    fake.add_app(app);
    fake
}

async fn register(server: &Server) -> String {
    let mut client = server.client().await;
    client
        .register_connection(pb::RegisterConnectionRequest {
            environment: pb::Environment::Integration as i32,
            tenant_id: TENANT,
            client_id: CLIENT_ID.into(),
            client_secret: SECRET_1.into(),
            app_key: APP_KEY.into(),
            ..Default::default()
        })
        .await
        .expect("register")
        .into_inner()
        .connection_id
}

fn rotate_request(id: &str, secret: &str) -> pb::RotateCredentialsRequest {
    pb::RotateCredentialsRequest {
        connection_id: id.into(),
        client_secret: secret.into(),
        ..Default::default()
    }
}

async fn get(server: &Server, id: &str) -> pb::Connection {
    let mut client = server.client().await;
    client
        .get_connection(pb::GetConnectionRequest {
            connection_id: id.into(),
        })
        .await
        .expect("get connection")
        .into_inner()
}

/// Returns the (version, state) pairs of a connection, newest first.
fn states(connection: &pb::Connection) -> Vec<(u32, State)> {
    connection
        .versions
        .iter()
        .map(|v| (v.version, State::try_from(v.state).expect("known state")))
        .collect()
}

/// Requests a fresh token and asserts it was minted from `version` with
/// `secret`.
async fn assert_token_from(
    server: &Server,
    fake: &FakeServiceTitan,
    id: &str,
    version: u32,
    secret: &str,
) -> String {
    let mut client = server.client().await;
    let token = client
        .get_access_token(pb::GetAccessTokenRequest {
            connection_id: id.into(),
            ..Default::default()
        })
        .await
        .expect("token")
        .into_inner();
    assert_eq!(token.credential_version, version);
    let form = fake.last_token_form().expect("a token request was made");
    assert!(
        form.contains(&("client_secret".into(), secret.into())),
        "the last token request did not use the secret of version {version}"
    );
    token.access_token
}

/// Waits until the server logs that it stopped at the test hook.
async fn wait_for_pause(server: &Server, point: &str) {
    let started = Instant::now();
    while !server.logs().contains("paused at test hook point") {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "stvault never reached {point}; log:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn verified_rotation_becomes_current(backend: Backend) {
    let fake = two_secret_fake().await;
    let server = Server::start_on(backend, &fake, &fake, &[]).await;
    let id = register(&server).await;
    let before = assert_token_from(&server, &fake, &id, 1, SECRET_1).await;

    let mut client = server.client().await;
    let rotated = client
        .rotate_credentials(rotate_request(&id, SECRET_2))
        .await
        .expect("rotate")
        .into_inner();
    assert_eq!(rotated.credential_version, 2);
    assert_eq!(
        states(&rotated),
        vec![(2, State::Current), (1, State::Previous)]
    );
    for version in &rotated.versions {
        assert_eq!(version.client_id, CLIENT_ID);
        assert_eq!(version.created_by, "anonymous");
        assert!(version.created_at.is_some());
        assert_eq!(version.app_key_hint, "-key");
    }
    let shown = format!("{rotated:?}");
    assert!(!shown.contains(SECRET_1));
    assert!(!shown.contains(SECRET_2));
    assert!(!shown.contains(APP_KEY));

    let after = assert_token_from(&server, &fake, &id, 2, SECRET_2).await;
    assert_ne!(
        before, after,
        "the token of version 1 is no longer handed out"
    );

    // The same rotation again, as a retry would send it, changes nothing
    // and is logged as such.
    let retried = client
        .rotate_credentials(rotate_request(&id, SECRET_2))
        .await
        .expect("retried rotation")
        .into_inner();
    assert_eq!(retried.credential_version, 2);
    let logs = server.logs();
    assert_eq!(logs.matches("credentials rotated").count(), 1, "{logs}");
    assert!(
        logs.contains("credentials unchanged: they equal the current version"),
        "{logs}"
    );
}

async fn failed_rotation_keeps_current(backend: Backend) {
    let fake = two_secret_fake().await;
    let server = Server::start_on(backend, &fake, &fake, &[]).await;
    let id = register(&server).await;
    let cached = assert_token_from(&server, &fake, &id, 1, SECRET_1).await;

    let mut client = server.client().await;
    let error = client
        .rotate_credentials(rotate_request(&id, "cs2.never-generated"))
        .await
        .expect_err("the new secret is rejected");
    assert_eq!(error.code(), Code::FailedPrecondition);
    let details = error.get_error_details();
    let info = details.error_info().expect("ErrorInfo");
    assert_eq!(
        info.metadata.get("check").map(String::as_str),
        Some("token")
    );
    assert!(
        error.message().contains("Client Secret"),
        "{}",
        error.message()
    );

    let connection = get(&server, &id).await;
    assert_eq!(connection.credential_version, 1);
    assert_eq!(states(&connection), vec![(1, State::Current)]);

    // The cached token of the current version is still served.
    let token = client
        .get_access_token(pb::GetAccessTokenRequest {
            connection_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("token after a failed rotation")
        .into_inner();
    assert_eq!(token.access_token, cached);
    assert_eq!(token.credential_version, 1);

    // The next rotation reuses the discarded number.
    let rotated = client
        .rotate_credentials(rotate_request(&id, SECRET_2))
        .await
        .expect("rotate")
        .into_inner();
    assert_eq!(rotated.credential_version, 2);
}

async fn rollback_restores_previous(backend: Backend) {
    let fake = two_secret_fake().await;
    let server = Server::start_on(backend, &fake, &fake, &[]).await;
    let id = register(&server).await;
    let mut client = server.client().await;

    let error = client
        .rollback_credentials(pb::RollbackCredentialsRequest {
            connection_id: id.clone(),
        })
        .await
        .expect_err("nothing to roll back to");
    assert_eq!(error.code(), Code::FailedPrecondition);

    client
        .rotate_credentials(rotate_request(&id, SECRET_2))
        .await
        .expect("rotate");
    let rotated_token = assert_token_from(&server, &fake, &id, 2, SECRET_2).await;

    let rolled_back = client
        .rollback_credentials(pb::RollbackCredentialsRequest {
            connection_id: id.clone(),
        })
        .await
        .expect("rollback")
        .into_inner();
    assert_eq!(rolled_back.credential_version, 1);
    assert_eq!(
        states(&rolled_back),
        vec![(2, State::Previous), (1, State::Current)]
    );
    let token = assert_token_from(&server, &fake, &id, 1, SECRET_1).await;
    assert_ne!(token, rotated_token, "no token of version 2 after rollback");

    // A second rollback undoes the first.
    let again = client
        .rollback_credentials(pb::RollbackCredentialsRequest {
            connection_id: id.clone(),
        })
        .await
        .expect("rollback again")
        .into_inner();
    assert_eq!(again.credential_version, 2);
    assert_token_from(&server, &fake, &id, 2, SECRET_2).await;
}

/// Kills stvault while a rotation is stopped at `point`, restarts it and
/// checks that version `expected` is the one current, readable version.
async fn kill_rotation_at(backend: Backend, point: &str, new_secret: &str, expected: u32) {
    let fake = two_secret_fake().await;
    let mut server = Server::start_on(backend, &fake, &fake, &[(PAUSE_ENV, point)]).await;
    let id = register(&server).await;

    let mut client = server.client().await;
    let rotation = tokio::spawn({
        let id = id.clone();
        let secret = new_secret.to_owned();
        async move {
            client
                .rotate_credentials(rotate_request(&id, &secret))
                .await
        }
    });
    wait_for_pause(&server, point).await;

    // While the rotation is stopped, tokens come from the stored current
    // version, which is already the outcome the restart must keep.
    let secret = if expected == 1 { SECRET_1 } else { new_secret };
    assert_token_from(&server, &fake, &id, expected, secret).await;

    server.kill9();
    let _ = rotation.await;
    server.env.remove(PAUSE_ENV);
    server.launch().await;

    let connection = get(&server, &id).await;
    let current: Vec<u32> = states(&connection)
        .into_iter()
        .filter(|(_, state)| *state == State::Current)
        .map(|(version, _)| version)
        .collect();
    assert_eq!(current, vec![expected], "after kill -9 at {point}");
    assert_eq!(connection.credential_version, expected);
    assert_token_from(&server, &fake, &id, expected, secret).await;
    assert_pending_cleared(backend, &server, &connection, point).await;
}

/// Checks that no pending version of `connection`, as read after a restart
/// that followed a kill at `point`, is left in the way. Sled discards
/// pending versions at startup. On PostgreSQL, startup keeps one younger
/// than an hour, since it may belong to a rotation that another server
/// sharing the database is still verifying, so the next rotation must
/// replace it.
async fn assert_pending_cleared(
    backend: Backend,
    server: &Server,
    connection: &pb::Connection,
    point: &str,
) {
    let pending = states(connection)
        .iter()
        .any(|(_, state)| *state == State::Pending);
    if backend == Backend::Sled || !pending {
        assert!(
            !pending,
            "a pending version survived the restart after {point}"
        );
        return;
    }
    let current = connection.credential_version;
    let mut client = server.client().await;
    let rotated = client
        .rotate_credentials(rotate_request(&connection.connection_id, SECRET_2))
        .await
        .expect("rotate over the pending version")
        .into_inner();
    assert_eq!(
        states(&rotated),
        vec![
            (rotated.credential_version, State::Current),
            (current, State::Previous)
        ],
        "the rotation after the restart left the pending version of {point}"
    );
}

async fn kill_after_pending_keeps_old_version(backend: Backend) {
    kill_rotation_at(backend, "rotate:after_pending", SECRET_2, 1).await;
}

async fn kill_after_verify_keeps_old_version(backend: Backend) {
    kill_rotation_at(backend, "rotate:after_verify", SECRET_2, 1).await;
}

async fn kill_before_discard_keeps_old_version(backend: Backend) {
    kill_rotation_at(backend, "rotate:before_discard", "cs2.never-generated", 1).await;
}

async fn kill_after_promote_keeps_new_version(backend: Backend) {
    kill_rotation_at(backend, "rotate:after_promote", SECRET_2, 2).await;
}

async fn kill_during_verification_keeps_old_version(backend: Backend) {
    let fake = two_secret_fake().await;
    let mut server = Server::start_on(backend, &fake, &fake, &[]).await;
    let id = register(&server).await;
    let requests_before = fake.token_requests();
    fake.set_token_delay(Duration::from_secs(30));

    let mut client = server.client().await;
    let rotation = tokio::spawn({
        let id = id.clone();
        async move {
            client
                .rotate_credentials(rotate_request(&id, SECRET_2))
                .await
        }
    });
    let started = Instant::now();
    while fake.token_requests() == requests_before {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no verification started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pending = get(&server, &id).await;
    assert_eq!(
        states(&pending),
        vec![(2, State::Pending), (1, State::Current)],
        "the pending version is stored before ServiceTitan is asked"
    );

    server.kill9();
    let _ = rotation.await;
    fake.set_token_delay(Duration::ZERO);
    server.launch().await;

    let connection = get(&server, &id).await;
    if backend == Backend::Sled {
        assert!(
            server
                .logs()
                .contains("discarded a pending credential version left by an interrupted rotation"),
            "{}",
            server.logs()
        );
        assert_eq!(states(&connection), vec![(1, State::Current)]);
    }
    assert_eq!(connection.credential_version, 1);
    assert_token_from(&server, &fake, &id, 1, SECRET_1).await;
    assert_pending_cleared(backend, &server, &connection, "verification").await;
}
