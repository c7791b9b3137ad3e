//! Connection health through the real binary: the background checker, the
//! broker's report of rejected credentials, WatchConnectionStatus and
//! UpdateConnection, on sled and on PostgreSQL. The check of how the
//! checker spreads its work over the interval runs on sled only, since its
//! timing does not depend on the storage backend.

mod support;

use std::time::{Duration, Instant};

use stvault::pb;
use stvault::pb::HealthState;
use support::backend::Backend;
use support::fake_servicetitan::{FakeApp, FakeServiceTitan};
use support::server::{Server, grpcurl_error};
use tonic::{Code, Streaming};

const CLIENT_ID: &str = "cid.health";
const SECRET: &str = "cs1.health-secret";
const NEW_SECRET: &str = "cs2.health-secret";
const APP_KEY: &str = "ak1.health-key";
const TENANT: i64 = 6100;
const INTERVAL: Duration = Duration::from_millis(500);

backend_tests!(
    broken_credential_detected_and_recovered,
    rejected_token_request_needs_attention_at_once,
    watch_filters_by_tenant,
    watch_rejects_bad_filters,
    shutdown_ends_open_watches,
    update_changes_settings,
    update_verifies_added_groups,
    update_rejects_bad_requests,
);

fn register_request(tenant_id: i64, client_id: &str) -> pb::RegisterConnectionRequest {
    pb::RegisterConnectionRequest {
        environment: pb::Environment::Integration as i32,
        tenant_id,
        client_id: client_id.into(),
        client_secret: SECRET.into(),
        app_key: APP_KEY.into(),
        ..Default::default()
    }
}

async fn start(backend: Backend, interval: &str) -> (FakeServiceTitan, Server) {
    let fake = FakeServiceTitan::start().await;
    fake.add_app(FakeApp::new(CLIENT_ID, SECRET, TENANT, APP_KEY));
    let server = Server::start_on(
        backend,
        &fake,
        &fake,
        &[("STVAULT_HEALTH_CHECK_INTERVAL", interval)],
    )
    .await;
    (fake, server)
}

async fn register(server: &Server, tenant_id: i64, client_id: &str) -> pb::Connection {
    let mut client = server.client().await;
    client
        .register_connection(register_request(tenant_id, client_id))
        .await
        .expect("register")
        .into_inner()
}

async fn watch(
    server: &Server,
    request: pb::WatchConnectionStatusRequest,
) -> Streaming<pb::ConnectionStatusEvent> {
    let mut client = server.client().await;
    client
        .watch_connection_status(request)
        .await
        .expect("watch")
        .into_inner()
}

fn watch_connection(id: &str) -> pb::WatchConnectionStatusRequest {
    pb::WatchConnectionStatusRequest {
        connection_id: id.into(),
        ..Default::default()
    }
}

/// Returns the next event, or `None` if none arrives within `wait`.
async fn next_event(
    stream: &mut Streaming<pb::ConnectionStatusEvent>,
    wait: Duration,
) -> Option<pb::ConnectionStatusEvent> {
    match tokio::time::timeout(wait, stream.message()).await {
        Ok(message) => Some(
            message
                .expect("stream stays healthy")
                .expect("stream stays open"),
        ),
        Err(_) => None,
    }
}

fn failed_check(event: &pb::ConnectionStatusEvent) -> String {
    let report = event.report.as_ref().expect("event carries its report");
    report
        .checks
        .iter()
        .find(|c| c.status == pb::verification_check::Status::Failed as i32)
        .map(|c| c.name.clone())
        .unwrap_or_default()
}

async fn health_of(server: &Server, id: &str) -> pb::ConnectionHealth {
    let mut client = server.client().await;
    client
        .get_connection(pb::GetConnectionRequest {
            connection_id: id.into(),
        })
        .await
        .expect("get")
        .into_inner()
        .health
        .expect("connection has been verified")
}

async fn broken_credential_detected_and_recovered(backend: Backend) {
    let (fake, server) = start(backend, "500ms").await;
    let connection = register(&server, TENANT, CLIENT_ID).await;
    let id = connection.connection_id;
    let registered = connection.health.expect("registration verified");
    assert_eq!(registered.state, HealthState::Healthy as i32);
    let mut events = watch(&server, watch_connection(&id)).await;

    // Several healthy checks in a row send nothing.
    assert!(next_event(&mut events, INTERVAL * 3).await.is_none());

    fake.update_app(CLIENT_ID, |app| {
        app.client_secrets = vec!["cs1.replaced-in-portal".into()]
    });
    let broken_at = Instant::now();
    let event = next_event(&mut events, INTERVAL * 4)
        .await
        .expect("a transition to NEEDS_ATTENTION");
    let detected_after = broken_at.elapsed();
    println!("detected a broken credential after {detected_after:?}");
    assert!(
        detected_after < INTERVAL + Duration::from_millis(400),
        "detected after {detected_after:?}, more than one interval"
    );
    assert_eq!(event.connection_id, id);
    assert_eq!(event.tenant_id, TENANT);
    assert_eq!(event.previous_state, HealthState::Healthy as i32);
    assert_eq!(event.state, HealthState::NeedsAttention as i32);
    assert!(!event.current_state);
    assert_eq!(failed_check(&event), "token");

    // The state is unchanged for several checks: no repeated events.
    assert!(next_event(&mut events, INTERVAL * 3).await.is_none());
    let stored = health_of(&server, &id).await;
    assert_eq!(stored.state, HealthState::NeedsAttention as i32);
    let seconds = |t: Option<prost_types::Timestamp>| {
        let t = t.expect("timestamp set");
        t.seconds as f64 + f64::from(t.nanos) / 1e9
    };
    assert!(seconds(stored.last_checked_at) > seconds(stored.state_since));

    fake.update_app(CLIENT_ID, |app| app.client_secrets = vec![SECRET.into()]);
    let recovered = next_event(&mut events, INTERVAL * 4)
        .await
        .expect("a transition back to HEALTHY");
    assert_eq!(recovered.previous_state, HealthState::NeedsAttention as i32);
    assert_eq!(recovered.state, HealthState::Healthy as i32);
    assert!(recovered.report.expect("report").ok);
    assert!(next_event(&mut events, INTERVAL * 3).await.is_none());
}

async fn rejected_token_request_needs_attention_at_once(backend: Backend) {
    let (fake, server) = start(backend, "off").await;
    let id = register(&server, TENANT, CLIENT_ID).await.connection_id;
    let mut events = watch(&server, watch_connection(&id)).await;

    fake.update_app(CLIENT_ID, |app| {
        app.client_secrets = vec![NEW_SECRET.into()]
    });
    let mut client = server.client().await;
    let error = client
        .get_access_token(pb::GetAccessTokenRequest {
            connection_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("the stored secret was deactivated");
    assert_eq!(error.code(), Code::FailedPrecondition);
    let event = next_event(&mut events, Duration::from_secs(2))
        .await
        .expect("the rejection is reported without waiting for a check");
    assert_eq!(event.state, HealthState::NeedsAttention as i32);
    assert_eq!(failed_check(&event), "token");
    let report = event.report.expect("report");
    assert!(
        report.checks[0]
            .message
            .contains("when the vault requested a token"),
        "{}",
        report.checks[0].message
    );
    assert!(report.checks[0].remediation.contains("Client Secret"));

    // Later rejections of the same credentials send nothing more.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let _ = client
        .get_access_token(pb::GetAccessTokenRequest {
            connection_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("still rejected");
    assert!(
        next_event(&mut events, Duration::from_secs(1))
            .await
            .is_none()
    );

    // Rotating in the working secret is the recovery.
    client
        .rotate_credentials(pb::RotateCredentialsRequest {
            connection_id: id.clone(),
            client_secret: NEW_SECRET.into(),
            ..Default::default()
        })
        .await
        .expect("rotate");
    let recovered = next_event(&mut events, Duration::from_secs(2))
        .await
        .expect("recovery after rotation");
    assert_eq!(recovered.previous_state, HealthState::NeedsAttention as i32);
    assert_eq!(recovered.state, HealthState::Healthy as i32);
}

async fn watch_filters_by_tenant(backend: Backend) {
    let (fake, server) = start(backend, "off").await;
    fake.add_app(FakeApp::new("cid.other", SECRET, TENANT + 1, APP_KEY));
    let watched = register(&server, TENANT, CLIENT_ID).await.connection_id;
    let other = register(&server, TENANT + 1, "cid.other")
        .await
        .connection_id;

    let mut by_tenant = watch(
        &server,
        pb::WatchConnectionStatusRequest {
            tenant_id: TENANT,
            ..Default::default()
        },
    )
    .await;
    let mut snapshot = watch(
        &server,
        pb::WatchConnectionStatusRequest {
            send_current_state: true,
            ..Default::default()
        },
    )
    .await;
    let mut current = Vec::new();
    for _ in 0..2 {
        let event = next_event(&mut snapshot, Duration::from_secs(2))
            .await
            .expect("current state of each connection");
        assert!(event.current_state);
        assert_eq!(event.state, HealthState::Healthy as i32);
        assert_eq!(event.previous_state, HealthState::Unspecified as i32);
        current.push(event.connection_id);
    }
    current.sort();
    let mut expected = vec![watched.clone(), other.clone()];
    expected.sort();
    assert_eq!(current, expected);

    let mut client = server.client().await;
    fake.update_app("cid.other", |app| app.client_secrets.clear());
    let _ = client
        .get_access_token(pb::GetAccessTokenRequest {
            connection_id: other.clone(),
            ..Default::default()
        })
        .await;
    let unfiltered = next_event(&mut snapshot, Duration::from_secs(2))
        .await
        .expect("the unfiltered watch sees the other tenant");
    assert_eq!(unfiltered.connection_id, other);
    assert!(!unfiltered.current_state);
    assert!(
        next_event(&mut by_tenant, Duration::from_millis(500))
            .await
            .is_none(),
        "the tenant watch ignores other tenants"
    );

    fake.update_app(CLIENT_ID, |app| app.client_secrets.clear());
    let _ = client
        .get_access_token(pb::GetAccessTokenRequest {
            connection_id: watched.clone(),
            ..Default::default()
        })
        .await;
    let event = next_event(&mut by_tenant, Duration::from_secs(2))
        .await
        .expect("the tenant's own change");
    assert_eq!(event.connection_id, watched);
    assert_eq!(event.tenant_id, TENANT);
}

async fn watch_rejects_bad_filters(backend: Backend) {
    let (_fake, server) = start(backend, "off").await;
    let mut client = server.client().await;
    let unknown = client
        .watch_connection_status(watch_connection("01a241cd-df50-705a-a6af-67a64764fe40"))
        .await
        .expect_err("unknown connection");
    assert_eq!(unknown.code(), Code::NotFound);
    let malformed = client
        .watch_connection_status(watch_connection("not-a-uuid"))
        .await
        .expect_err("malformed id");
    assert_eq!(malformed.code(), Code::InvalidArgument);
    assert!(malformed.message().starts_with("connection_id:"));
    let tenant = client
        .watch_connection_status(pb::WatchConnectionStatusRequest {
            tenant_id: -4,
            ..Default::default()
        })
        .await
        .expect_err("negative tenant");
    assert_eq!(tenant.code(), Code::InvalidArgument);
}

async fn shutdown_ends_open_watches(backend: Backend) {
    let (_fake, mut server) = start(backend, "off").await;
    let id = register(&server, TENANT, CLIENT_ID).await.connection_id;
    let mut events = watch(&server, watch_connection(&id)).await;
    let started = Instant::now();
    let status = server.terminate();
    assert!(status.success(), "stvault exited with {status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown waited {:?} for the watch",
        started.elapsed()
    );
    let ended = tokio::time::timeout(Duration::from_secs(2), events.message())
        .await
        .expect("the stream ends");
    match ended {
        Err(status) => assert_eq!(status.code(), Code::Unavailable),
        Ok(None) => {}
        Ok(Some(event)) => panic!("unexpected event {event:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn checker_spreads_checks_over_interval() {
    let fake = FakeServiceTitan::start().await;
    let count = 5;
    for index in 0..count {
        let client_id = format!("cid.spread{index}");
        fake.add_app(FakeApp::new(&client_id, SECRET, 7000 + index, APP_KEY));
    }
    let server = Server::start_with(
        &fake,
        &fake,
        &[
            ("STVAULT_HEALTH_CHECK_INTERVAL", "1s"),
            ("STVAULT_HEALTH_CHECK_CONCURRENCY", "1"),
        ],
    )
    .await;
    for index in 0..count {
        register(&server, 7000 + index, &format!("cid.spread{index}")).await;
    }

    // Record when each background token request arrives.
    let mut seen = fake.token_requests();
    let mut arrivals = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let now = fake.token_requests();
        for _ in seen..now {
            arrivals.push(started.elapsed());
        }
        seen = now;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("token requests at {arrivals:?}");
    // Five connections a second, for three seconds.
    assert!(
        (12..=18).contains(&arrivals.len()),
        "{} checks in 3 s",
        arrivals.len()
    );
    // Starts are spread about 200 ms apart (at least 180 ms with jitter);
    // allow for the 5 ms polling and scheduling on a busy machine.
    let closest = arrivals
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .min()
        .expect("several checks");
    assert!(
        closest >= Duration::from_millis(100),
        "two checks started {closest:?} apart"
    );
}

async fn update_changes_settings(backend: Backend) {
    let (_fake, server) = start(backend, "off").await;
    let id = register(&server, TENANT, CLIENT_ID).await.connection_id;
    let mut client = server.client().await;

    let updated = client
        .update_connection(pb::UpdateConnectionRequest {
            connection: Some(pb::Connection {
                connection_id: id.clone(),
                display_name: "Renamed".into(),
                labels: [("team".to_string(), "billing".to_string())].into(),
                client_id: "ignored: not in the mask".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into(), "labels".into()],
            }),
            skip_verification: false,
        })
        .await
        .expect("update")
        .into_inner();
    assert_eq!(updated.display_name, "Renamed");
    assert_eq!(
        updated.labels.get("team").map(String::as_str),
        Some("billing")
    );
    assert_eq!(updated.client_id, CLIENT_ID);
    assert_eq!(updated.credential_version, 1);

    let groups = client
        .update_connection(pb::UpdateConnectionRequest {
            connection: Some(pb::Connection {
                connection_id: id.clone(),
                required_scope_groups: vec!["accounting".into(), "pricebook".into()],
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["required_scope_groups".into()],
            }),
            skip_verification: false,
        })
        .await
        .expect("groups the app has")
        .into_inner();
    assert_eq!(
        groups.required_scope_groups,
        vec!["accounting", "pricebook"]
    );
    assert_eq!(
        groups.display_name, "Renamed",
        "fields outside the mask stay"
    );
}

async fn update_verifies_added_groups(backend: Backend) {
    let fake = FakeServiceTitan::start().await;
    let mut app = FakeApp::new(CLIENT_ID, SECRET, TENANT, APP_KEY);
    app.scopes.retain(|s| s != "tn.tms.activitytypes:r");
    fake.add_app(app);
    let server = Server::start_on(
        backend,
        &fake,
        &fake,
        &[("STVAULT_HEALTH_CHECK_INTERVAL", "off")],
    )
    .await;
    let id = register(&server, TENANT, CLIENT_ID).await.connection_id;
    let mut client = server.client().await;
    let request = |skip_verification| pb::UpdateConnectionRequest {
        connection: Some(pb::Connection {
            connection_id: id.clone(),
            required_scope_groups: vec!["timesheets".into()],
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["required_scope_groups".into()],
        }),
        skip_verification,
    };

    let error = client
        .update_connection(request(false))
        .await
        .expect_err("the app lacks the Timesheets scope group");
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert!(
        error.message().contains("scope:timesheets"),
        "{}",
        error.message()
    );
    let unchanged = client
        .get_connection(pb::GetConnectionRequest {
            connection_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(unchanged.required_scope_groups.is_empty());

    let forced = client
        .update_connection(request(true))
        .await
        .expect("stored without verification")
        .into_inner();
    assert_eq!(forced.required_scope_groups, vec!["timesheets"]);
    let report = client
        .verify_connection(pb::VerifyConnectionRequest {
            connection_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!report.ok, "the requirement now fails verification");
}

async fn update_rejects_bad_requests(backend: Backend) {
    let (_fake, server) = start(backend, "off").await;
    let id = register(&server, TENANT, CLIENT_ID).await.connection_id;
    let body = |mask: &str, groups: &str| {
        format!(
            r#"{{"connection": {{"connection_id": "{id}", "required_scope_groups": [{groups}]}}, "update_mask": {{"paths": ["{mask}"]}}}}"#
        )
    };
    let no_mask = server.grpcurl(
        "UpdateConnection",
        &format!(r#"{{"connection": {{"connection_id": "{id}"}}}}"#),
    );
    let message = grpcurl_error(&no_mask, "InvalidArgument");
    assert!(message.contains("update_mask: is required"), "{message}");

    let credentials = server.grpcurl("UpdateConnection", &body("client_id", ""));
    let message = grpcurl_error(&credentials, "InvalidArgument");
    assert!(message.contains("RotateCredentials"), "{message}");

    let unknown_group = server.grpcurl(
        "UpdateConnection",
        &body("required_scope_groups", r#""payroll""#),
    );
    let message = grpcurl_error(&unknown_group, "InvalidArgument");
    assert!(message.contains("required_scope_groups"), "{message}");
    assert!(message.contains("known groups"), "{message}");

    let missing = server.grpcurl(
        "UpdateConnection",
        r#"{"update_mask": {"paths": ["display_name"]}}"#,
    );
    grpcurl_error(&missing, "InvalidArgument");
}
