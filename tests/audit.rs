//! The audit trail against the real binary: one event per RPC, allowed or
//! denied, no secrets in events, chain verification of edited and deleted
//! events, and the token-holder query with grpcurl. All but the chain
//! verification, which edits the sled trail file, run on sled and on
//! PostgreSQL.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};
use stvault::pb;
use support::backend::Backend;
use support::callers::{Key, write_policy};
use support::fake_servicetitan::{FakeApp, FakeServiceTitan, Fault};
use support::server::{Server, grpcurl, json, request_id, run_command};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

type Client = pb::credential_vault_client::CredentialVaultClient<Channel>;

const CLIENT_ID: &str = "cid.audit";
const SECRET_1: &str = "cs1.SENTINEL-secret-4b1d";
const SECRET_2: &str = "cs2.SENTINEL-secret-93ce";
const APP_KEY: &str = "ak1.SENTINEL-appkey-77aa";
const TENANT_A: i64 = 8450;
const TENANT_B: i64 = 9001;

backend_tests!(
    every_rpc_appends_one_event,
    events_hold_no_secrets,
    token_holders_of_a_credential_version,
    cancelled_rotation_is_still_audited,
);

async fn fake() -> FakeServiceTitan {
    let fake = FakeServiceTitan::start().await;
    let mut app = FakeApp::new(CLIENT_ID, SECRET_1, TENANT_A, APP_KEY);
    app.client_secrets.push(SECRET_2.into());
    fake.add_app(app);
    fake
}

/// The callers of these tests: a linker, an operator (admin) and a biller
/// limited to tenant A.
struct Callers {
    linker: Key,
    operator: Key,
    biller: Key,
}

async fn start(backend: Backend, fake: &FakeServiceTitan, dir: &Path) -> (Server, Callers) {
    let callers = Callers {
        linker: Key::new("linker"),
        operator: Key::new("operator"),
        biller: Key::new("biller"),
    };
    let policy = write_policy(
        dir,
        &format!(
            "{}{}{}",
            callers.linker.entry(r#"["link"]"#, None),
            callers.operator.entry(r#"["admin"]"#, None),
            callers
                .biller
                .entry(r#"["token"]"#, Some(&format!("[{TENANT_A}]")))
        ),
    );
    let server = Server::start_on(
        backend,
        fake,
        fake,
        &[("STVAULT_POLICY_FILE", policy.to_str().unwrap())],
    )
    .await;
    (server, callers)
}

fn register_request() -> pb::RegisterConnectionRequest {
    pb::RegisterConnectionRequest {
        environment: pb::Environment::Integration as i32,
        tenant_id: TENANT_A,
        client_id: CLIENT_ID.into(),
        client_secret: SECRET_1.into(),
        app_key: APP_KEY.into(),
        display_name: "audited".into(),
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

fn code<T>(result: &Result<Response<T>, Status>) -> Code {
    result.as_ref().map_or_else(Status::code, |_| Code::Ok)
}

/// One expected event: RPC, caller, code, and the request id returned.
struct Expected {
    rpc: &'static str,
    caller: &'static str,
    code: &'static str,
    request_id: String,
    credential_version: u32,
}

/// Lists every event in one page; the listing appends its own event
/// after it returns.
async fn list_all(client: &mut Client, operator: &Key) -> Vec<pb::AuditEvent> {
    let page = client
        .list_audit_events(operator.request(pb::ListAuditEventsRequest {
            page_size: 1000,
            ..Default::default()
        }))
        .await
        .expect("list audit events")
        .into_inner();
    assert!(page.next_page_token.is_empty());
    page.events
}

async fn every_rpc_appends_one_event(backend: Backend) {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let (server, callers) = start(backend, &fake, dir.path()).await;
    let mut client = server.client().await;
    let mut expected = Vec::new();
    let mut expect = |rpc, caller, code, request_id, credential_version| {
        expected.push(Expected {
            rpc,
            caller,
            code,
            request_id,
            credential_version,
        })
    };

    let result = client
        .register_connection(callers.linker.request(register_request()))
        .await;
    expect("RegisterConnection", "linker", "OK", request_id(&result), 1);
    let id = result.unwrap().into_inner().connection_id;

    let result = client
        .register_connection(callers.biller.request(register_request()))
        .await;
    assert_eq!(code(&result), Code::PermissionDenied);
    expect(
        "RegisterConnection",
        "biller",
        "PERMISSION_DENIED",
        request_id(&result),
        0,
    );

    let result = client
        .list_connections(Request::new(pb::ListConnectionsRequest::default()))
        .await;
    assert_eq!(code(&result), Code::Unauthenticated);
    expect(
        "ListConnections",
        "",
        "UNAUTHENTICATED",
        request_id(&result),
        0,
    );

    // A client-chosen request id is kept.
    let mut request = callers.operator.request(pb::GetConnectionRequest {
        connection_id: id.clone(),
    });
    request
        .metadata_mut()
        .insert("x-request-id", "trace-42".parse().unwrap());
    let result = client.get_connection(request).await;
    assert_eq!(request_id(&result), "trace-42");
    expect("GetConnection", "operator", "OK", request_id(&result), 0);

    let result = client
        .list_connections(
            callers
                .operator
                .request(pb::ListConnectionsRequest::default()),
        )
        .await;
    expect("ListConnections", "operator", "OK", request_id(&result), 0);

    let result = client
        .rotate_credentials(callers.operator.request(pb::RotateCredentialsRequest {
            connection_id: id.clone(),
            client_secret: SECRET_2.into(),
            ..Default::default()
        }))
        .await;
    assert_eq!(code(&result), Code::Ok, "{result:?}");
    expect(
        "RotateCredentials",
        "operator",
        "OK",
        request_id(&result),
        2,
    );

    let result = client
        .get_access_token(callers.biller.request(by_tenant(TENANT_A)))
        .await;
    assert_eq!(code(&result), Code::Ok, "{result:?}");
    expect("GetAccessToken", "biller", "OK", request_id(&result), 2);

    let result = client
        .rollback_credentials(callers.operator.request(pb::RollbackCredentialsRequest {
            connection_id: id.clone(),
        }))
        .await;
    assert_eq!(code(&result), Code::Ok, "{result:?}");
    expect(
        "RollbackCredentials",
        "operator",
        "OK",
        request_id(&result),
        1,
    );

    let result = client
        .get_access_token(callers.biller.request(pb::GetAccessTokenRequest {
            connection_id: id.clone(),
            ..Default::default()
        }))
        .await;
    assert_eq!(code(&result), Code::Ok, "{result:?}");
    expect("GetAccessToken", "biller", "OK", request_id(&result), 1);

    let result = client
        .get_access_token(callers.biller.request(by_tenant(TENANT_B)))
        .await;
    assert_eq!(code(&result), Code::PermissionDenied);
    expect(
        "GetAccessToken",
        "biller",
        "PERMISSION_DENIED",
        request_id(&result),
        0,
    );

    let result = client
        .verify_connection(callers.operator.request(pb::VerifyConnectionRequest {
            connection_id: id.clone(),
        }))
        .await;
    expect("VerifyConnection", "operator", "OK", request_id(&result), 0);

    let result = client
        .get_connection(callers.operator.request(pb::GetConnectionRequest {
            connection_id: "not-an-id".into(),
        }))
        .await;
    assert_eq!(code(&result), Code::InvalidArgument);
    expect(
        "GetConnection",
        "operator",
        "INVALID_ARGUMENT",
        request_id(&result),
        0,
    );

    let result = client
        .delete_connection(callers.operator.request(pb::DeleteConnectionRequest {
            connection_id: id.clone(),
        }))
        .await;
    expect("DeleteConnection", "operator", "OK", request_id(&result), 0);

    // Health checks and reflection are not audited.
    let health = json(&grpcurl(&[
        "-plaintext",
        &server.addr.to_string(),
        "grpc.health.v1.Health/Check",
    ]));
    assert_eq!(health["status"], "SERVING");
    assert!(
        grpcurl(&["-plaintext", &server.addr.to_string(), "list"])
            .status
            .success()
    );

    // The listing is itself audited, after the calls above.
    let events = list_all(&mut client, &callers.operator).await;
    let calls = expected.len();
    assert_eq!(events.len(), calls, "one event per call before the listing");
    for (index, (event, want)) in events.iter().zip(&expected).enumerate() {
        let context = format!("event {}: {event:?}", index + 1);
        assert_eq!(event.sequence, index as u64 + 1, "{context}");
        assert_eq!(event.rpc, want.rpc, "{context}");
        assert_eq!(event.caller, want.caller, "{context}");
        assert_eq!(event.code, want.code, "{context}");
        assert_eq!(event.request_id, want.request_id, "{context}");
        assert_eq!(
            event.credential_version, want.credential_version,
            "{context}"
        );
        assert!(event.peer.starts_with("127.0.0.1:"), "{context}");
        assert!(event.time.is_some(), "{context}");
        if index > 0 {
            assert_eq!(event.previous_hash, events[index - 1].hash, "{context}");
        }
    }
    // Ids recorded for the calls that named or resolved them.
    let token = &events[6];
    assert_eq!(token.connection_id, id);
    assert_eq!(token.tenant_id, TENANT_A);
    assert_eq!(token.environment, pb::Environment::Integration as i32);
    assert_eq!(
        events[9].tenant_id, TENANT_B,
        "the denied tenant is recorded"
    );
    assert_eq!(events[9].connection_id, "", "no lookup for a denied tenant");
    assert_eq!(
        events[11].connection_id, "",
        "an invalid id is not recorded"
    );
    assert_eq!(events[12].connection_id, id);
    assert_eq!(events[0].auth_method, "bearer_key");
    assert_eq!(events[2].auth_method, "none");

    let again = list_all(&mut client, &callers.operator).await;
    assert_eq!(again.len(), calls + 1);
    let listing = &again[calls];
    assert_eq!(listing.rpc, "ListAuditEvents");
    assert_eq!(listing.caller, "operator");
    assert_eq!(listing.code, "OK");

    // Paging through the token events, two at a time.
    let mut paged = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_audit_events(callers.operator.request(pb::ListAuditEventsRequest {
                rpc: "GetAccessToken".into(),
                page_size: 2,
                page_token: page_token.clone(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(page.events.len() <= 2);
        paged.extend(page.events.into_iter().map(|e| e.sequence));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(paged, [7, 9, 10]);

    // Filters: by caller, by RPC and by time.
    let biller_events = client
        .list_audit_events(callers.operator.request(pb::ListAuditEventsRequest {
            caller: "biller".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(biller_events.len(), 4);
    let future = client
        .list_audit_events(callers.operator.request(pb::ListAuditEventsRequest {
            start_time: Some(prost_types::Timestamp {
                seconds: 4_000_000_000,
                nanos: 0,
            }),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(future.events.is_empty());
    assert!(future.next_page_token.is_empty());
    let before_first = client
        .list_audit_events(callers.operator.request(pb::ListAuditEventsRequest {
            end_time: events[0].time,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(before_first.events.is_empty(), "end_time is exclusive");
    let bad = client
        .list_audit_events(callers.operator.request(pb::ListAuditEventsRequest {
            rpc: "Steal".into(),
            ..Default::default()
        }))
        .await
        .expect_err("unknown rpc filter");
    assert_eq!(bad.code(), Code::InvalidArgument);
    let denied = client
        .list_audit_events(
            callers
                .biller
                .request(pb::ListAuditEventsRequest::default()),
        )
        .await
        .expect_err("only admins read the trail");
    assert_eq!(denied.code(), Code::PermissionDenied);
}

async fn events_hold_no_secrets(backend: Backend) {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut server, callers) = start(backend, &fake, dir.path()).await;
    let mut client = server.client().await;
    let id = client
        .register_connection(callers.linker.request(register_request()))
        .await
        .unwrap()
        .into_inner()
        .connection_id;
    let token = client
        .get_access_token(callers.biller.request(by_tenant(TENANT_A)))
        .await
        .unwrap()
        .into_inner();
    client
        .rotate_credentials(callers.operator.request(pb::RotateCredentialsRequest {
            connection_id: id.clone(),
            client_secret: SECRET_2.into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let listed = json(&grpcurl(&[
        "-plaintext",
        "-H",
        &callers.operator.header(),
        "-d",
        "{}",
        &server.addr.to_string(),
        "stvault.v1.CredentialVault/ListAuditEvents",
    ]))
    .to_string();
    assert_eq!(server.terminate().code(), Some(0));

    let stored = stored_trail(&server);
    assert!(stored.contains("GetAccessToken"), "{stored}");

    let sentinels = [
        SECRET_1.to_owned(),
        SECRET_2.to_owned(),
        APP_KEY.to_owned(),
        token.access_token.clone(),
        callers.biller.key.clone(),
        callers.operator.key.clone(),
        callers.linker.key.clone(),
    ];
    for sentinel in &sentinels {
        let hash = hex::encode(Sha256::digest(sentinel.as_bytes()));
        for (place, text) in [
            ("stored events", &stored),
            ("ListAuditEvents", &listed),
            ("server log", &server.logs()),
        ] {
            assert!(!text.contains(sentinel.as_str()), "a secret in the {place}");
            assert!(!text.contains(&hash), "a secret's hash in the {place}");
        }
    }
    assert!(!stored.contains("SENTINEL"));
}

/// Returns the stored audit trail as text: the trail file on sled, or on
/// PostgreSQL the dump of the audit tables. The rest of the database contains
/// the shared policy, whose bearer key hashes are there by design.
fn stored_trail(server: &Server) -> String {
    match &server.database {
        None => std::fs::read_to_string(server.data_dir().join("audit.jsonl")).unwrap(),
        Some(database) => String::from_utf8_lossy(
            &database.dump_tables(&["stvault_audit_events", "stvault_audit_head"]),
        )
        .into_owned(),
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn verify(data_dir: &Path) -> (i32, String) {
    run_command(
        &["audit", "verify", "--data-dir", data_dir.to_str().unwrap()],
        &HashMap::new(),
    )
}

/// Copies the data directory and applies `tamper` to the lines of the
/// copy's audit trail, one event per line.
fn tampered_copy(data_dir: &Path, to: &Path, tamper: impl FnOnce(&mut Vec<String>)) {
    copy_dir(data_dir, to);
    let path = to.join("audit.jsonl");
    let mut lines: Vec<String> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    tamper(&mut lines);
    let text: String = lines.iter().map(|line| format!("{line}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn edit_caller(events: &mut [String], sequence: usize, caller: &str) {
    let line = &mut events[sequence - 1];
    let mut event: serde_json::Value = serde_json::from_str(line).unwrap();
    event["caller"] = caller.into();
    *line = serde_json::to_string(&event).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_without_key_names_the_variable() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let (server, callers) = start(Backend::Sled, &fake, dir.path()).await;
    // The policy admits only callers with a key, so a backup without one
    // is refused with the name of the variable that carries it.
    let backup = |key: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_stvault"));
        command
            .arg("backup")
            .arg("--server")
            .arg(format!("http://{}", server.addr))
            .arg("--out")
            .arg(dir.path().join(format!("backup-{}", key.is_some())))
            .env_remove("STVAULT_ADMIN_KEY");
        if let Some(key) = key {
            command.env("STVAULT_ADMIN_KEY", key);
        }
        command.output().expect("run stvault backup")
    };
    let without_key = backup(None);
    assert!(!without_key.status.success());
    let stderr = String::from_utf8_lossy(&without_key.stderr);
    assert!(stderr.contains("set STVAULT_ADMIN_KEY"), "{stderr}");
    let with_key = backup(Some(&callers.operator.key));
    assert!(
        with_key.status.success(),
        "{}",
        String::from_utf8_lossy(&with_key.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_detects_edited_and_deleted_events() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut server, callers) = start(Backend::Sled, &fake, dir.path()).await;
    let mut client = server.client().await;
    client
        .register_connection(callers.linker.request(register_request()))
        .await
        .unwrap();
    for _ in 0..3 {
        client
            .get_access_token(callers.biller.request(by_tenant(TENANT_A)))
            .await
            .unwrap();
        client
            .get_access_token(callers.biller.request(by_tenant(TENANT_B)))
            .await
            .unwrap_err();
    }
    // 7 events, checked while the server runs and again after it stops.
    let (code, output) = verify(&server.data_dir());
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("audit chain intact: 7 events"), "{output}");
    assert_eq!(server.terminate().code(), Some(0));

    let (code, output) = verify(&server.data_dir());
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("audit chain intact: 7 events"), "{output}");

    let copies = tempfile::tempdir().unwrap();
    let edited = copies.path().join("edited");
    tampered_copy(&server.data_dir(), &edited, |events| {
        edit_caller(events, 3, "someone-else")
    });
    let (code, output) = verify(&edited);
    assert_eq!(code, 65, "{output}");
    assert!(
        output.contains("audit chain broken at event 3:"),
        "{output}"
    );

    let edited_last = copies.path().join("edited-last");
    tampered_copy(&server.data_dir(), &edited_last, |events| {
        edit_caller(events, 7, "someone-else")
    });
    let (code, output) = verify(&edited_last);
    assert_eq!(code, 65, "{output}");
    assert!(
        output.contains("audit chain broken at event 7:"),
        "{output}"
    );

    let deleted = copies.path().join("deleted");
    tampered_copy(&server.data_dir(), &deleted, |events| {
        events.remove(3);
    });
    let (code, output) = verify(&deleted);
    assert_eq!(code, 65, "{output}");
    assert!(
        output.contains("audit chain broken at event 4:"),
        "{output}"
    );
    assert!(output.contains("missing"), "{output}");

    let deleted_last = copies.path().join("deleted-last");
    tampered_copy(&server.data_dir(), &deleted_last, |events| {
        events.truncate(6);
    });
    let (code, output) = verify(&deleted_last);
    assert_eq!(code, 65, "{output}");
    assert!(
        output.contains("audit chain broken at event 7:"),
        "{output}"
    );

    // The original is untouched and the server continues its chain.
    server.launch().await;
    let mut client = server.client().await;
    let events = list_all(&mut client, &callers.operator).await;
    assert_eq!(events.len(), 7);
    assert_eq!(events[6].previous_hash, events[5].hash);
    assert_eq!(server.terminate().code(), Some(0));
    let (code, output) = verify(&server.data_dir());
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("audit chain intact: 8 events"), "{output}");
}

async fn token_holders_of_a_credential_version(backend: Backend) {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let linker = Key::new("linker");
    let operator = Key::new("operator");
    let billing = Key::new("billing-sync");
    let reports = Key::new("reports");
    let policy = write_policy(
        dir.path(),
        &[
            linker.entry(r#"["link"]"#, None),
            operator.entry(r#"["admin"]"#, None),
            billing.entry(r#"["token"]"#, Some(&format!("[{TENANT_A}]"))),
            reports.entry(r#"["token"]"#, Some("\"*\"")),
        ]
        .concat(),
    );
    let server = Server::start_on(
        backend,
        &fake,
        &fake,
        &[
            ("STVAULT_POLICY_FILE", policy.to_str().unwrap()),
            ("STVAULT_TOKEN_FAILURE_COOLDOWN", "100ms"),
        ],
    )
    .await;
    let mut client = server.client().await;
    let id = client
        .register_connection(linker.request(register_request()))
        .await
        .unwrap()
        .into_inner()
        .connection_id;
    for caller in [&billing, &reports] {
        let token = client
            .get_access_token(caller.request(by_tenant(TENANT_A)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(token.credential_version, 1);
    }
    client
        .rotate_credentials(operator.request(pb::RotateCredentialsRequest {
            connection_id: id,
            client_secret: SECRET_2.into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    // A call that got no token from version 2 is recorded with it, but
    // held nothing.
    fake.set_token_fault(Fault::Status(503));
    let failed = client
        .get_access_token(reports.request(by_tenant(TENANT_A)))
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
    fake.set_token_fault(Fault::None);
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let token = client
        .get_access_token(billing.request(by_tenant(TENANT_A)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(token.credential_version, 2);
    let events = client
        .list_audit_events(operator.request(pb::ListAuditEventsRequest {
            rpc: "GetAccessToken".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .events;
    let failed_event = events
        .iter()
        .find(|event| event.code == "UNAVAILABLE")
        .expect("the failed call's event");
    assert_eq!(failed_event.credential_version, 2);
    assert_eq!(failed_event.caller, "reports");

    // The README query, as printed there.
    let script =
        support::readme_block("audit-query").replace("127.0.0.1:50051", &server.addr.to_string());
    let run = |script: &str| {
        let output = Command::new("bash")
            .args(["-c", &format!("set -euo pipefail\n{script}")])
            .env("STVAULT_ADMIN_KEY", &operator.key)
            .output()
            .expect("run bash");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    assert_eq!(run(&script), "billing-sync\nreports\n");
    assert_eq!(
        run(&script.replace("\"credential_version\": 1", "\"credential_version\": 2")),
        "billing-sync\n"
    );
}

async fn cancelled_rotation_is_still_audited(backend: Backend) {
    let fake = fake().await;
    let server = Server::start_on(backend, &fake, &fake, &[]).await;
    let mut client = server.client().await;
    let id = client
        .register_connection(register_request())
        .await
        .unwrap()
        .into_inner()
        .connection_id;

    // The caller gives up while the new secret is being verified.
    fake.set_token_delay(std::time::Duration::from_millis(1500));
    let mut request = Request::new(pb::RotateCredentialsRequest {
        connection_id: id.clone(),
        client_secret: SECRET_2.into(),
        ..Default::default()
    });
    request.set_timeout(std::time::Duration::from_millis(300));
    let status = client.rotate_credentials(request).await.unwrap_err();
    assert_ne!(status.code(), Code::Ok);
    tokio::time::sleep(std::time::Duration::from_millis(4000)).await;

    let connection = client
        .get_connection(pb::GetConnectionRequest {
            connection_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(connection.credential_version, 2, "the rotation finished");
    let events = client
        .list_audit_events(pb::ListAuditEventsRequest {
            connection_id: id,
            rpc: "RotateCredentials".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].credential_version, 2);
    assert_eq!(events[0].code, "OK");
}
