//! Secrets stay secret: a sentinel client secret and app key never reach
//! the logs, status messages, other responses, the data directory or, on
//! PostgreSQL, the database dump. Sealed fields are bound to their record,
//! which the sled tests check by editing sled's files.

mod support;

use std::path::Path;

use stvault::pb;
use support::backend::Backend;
use support::fake_servicetitan::{FakeApp, FakeServiceTitan};
use support::server::Server;
use tonic::Code;

const SENTINEL_SECRET: &str = "cs1.SENTINEL-SECRET-4d9e1b";
const SENTINEL_SECRET_2: &str = "cs2.SENTINEL-SECRET-77aa03";
const SENTINEL_WRONG: &str = "cs1.SENTINEL-WRONG-0c55f2";
const SENTINEL_APP_KEY: &str = "ak1.SENTINEL-APPKEY-a81f";
const CLIENT_ID: &str = "cid.sentinel";
const TENANT: i64 = 5150;

backend_tests!(sentinel_secrets_never_leak);

fn register(secret: &str) -> pb::RegisterConnectionRequest {
    pb::RegisterConnectionRequest {
        environment: pb::Environment::Production as i32,
        tenant_id: TENANT,
        client_id: CLIENT_ID.into(),
        client_secret: secret.into(),
        app_key: SENTINEL_APP_KEY.into(),
        display_name: "sentinel".into(),
        ..Default::default()
    }
}

async fn sentinel_secrets_never_leak(backend: Backend) {
    let fake = FakeServiceTitan::start().await;
    let mut app = FakeApp::new(CLIENT_ID, SENTINEL_SECRET, TENANT, SENTINEL_APP_KEY);
    app.client_secrets.push(SENTINEL_SECRET_2.into());
    fake.add_app(app);
    let mut server = Server::start_on(backend, &fake, &fake, &[("RUST_LOG", "trace")]).await;
    let mut client = server.client().await;
    let mut responses = Vec::new();
    let mut statuses = Vec::new();

    // Rejected and invalid secrets must not be echoed either.
    statuses.push(
        client
            .register_connection(register(SENTINEL_WRONG))
            .await
            .unwrap_err(),
    );
    statuses.push(
        client
            .register_connection(register(&format!(" {SENTINEL_WRONG}")))
            .await
            .unwrap_err(),
    );

    let connection = client
        .register_connection(register(SENTINEL_SECRET))
        .await
        .unwrap()
        .into_inner();
    let id = connection.connection_id.clone();
    responses.push(format!("{connection:?}"));
    statuses.push(
        client
            .register_connection(register(SENTINEL_SECRET_2))
            .await
            .unwrap_err(),
    );

    let token = client
        .get_access_token(pb::GetAccessTokenRequest {
            connection_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        token.app_key, SENTINEL_APP_KEY,
        "GetAccessToken carries the app key"
    );

    let rotated = client
        .rotate_credentials(pb::RotateCredentialsRequest {
            connection_id: id.clone(),
            client_secret: SENTINEL_SECRET_2.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    responses.push(format!("{rotated:?}"));
    statuses.push(
        client
            .rotate_credentials(pb::RotateCredentialsRequest {
                connection_id: id.clone(),
                client_secret: SENTINEL_WRONG.into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    let report = client
        .verify_connection(pb::VerifyConnectionRequest {
            connection_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    responses.push(format!("{report:?}"));
    let fetched = client
        .get_connection(pb::GetConnectionRequest {
            connection_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    responses.push(format!("{fetched:?}"));
    let listed = client
        .list_connections(pb::ListConnectionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    responses.push(format!("{listed:?}"));
    let second_token = client
        .get_access_token(pb::GetAccessTokenRequest {
            connection_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    drop(client);
    server.kill9();

    let sentinels = [
        SENTINEL_SECRET,
        SENTINEL_SECRET_2,
        SENTINEL_WRONG,
        SENTINEL_APP_KEY,
    ];
    let logs = server.logs();
    assert!(
        logs.contains("TRACE"),
        "the log was not written at trace level"
    );
    for sentinel in sentinels {
        assert!(!logs.contains(sentinel), "{sentinel} found in the log");
        for response in &responses {
            assert!(
                !response.contains(sentinel),
                "{sentinel} found in a response: {response}"
            );
        }
        for status in &statuses {
            assert!(
                !format!("{status:?}").contains(sentinel),
                "{sentinel} found in {status:?}"
            );
        }
        let stored = server.stored_copies_of(sentinel);
        assert!(stored.is_empty(), "{sentinel} found in {stored:?}");
    }
    for access_token in [&token.access_token, &second_token.access_token] {
        assert!(
            !logs.contains(access_token.as_str()),
            "an access token is in the log"
        );
        let stored = server.stored_copies_of(access_token);
        assert!(stored.is_empty(), "an access token is in {stored:?}");
    }
    assert!(!logs.contains("-key\""), "app key hint logged as a field");
}

/// Rewrites one stored record with `edit`, on a stopped server's data
/// directory.
fn edit_record(data_dir: &Path, id: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let db = open_stopped_db(data_dir);
    let tree = db.open_tree("connections").unwrap();
    let mut record: serde_json::Value =
        serde_json::from_slice(&tree.get(id).unwrap().unwrap()).unwrap();
    edit(&mut record);
    tree.insert(id, serde_json::to_vec(&record).unwrap())
        .unwrap();
    db.flush().unwrap();
}

/// Opens a stopped server's database. A `sled::Db` dropped just before by
/// this process can hold the file lock a moment longer, while sled's own
/// threads finish, so a held lock is retried for up to two seconds.
fn open_stopped_db(data_dir: &Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match sled::open(data_dir.join("db")) {
            Ok(db) => return db,
            Err(error) if std::time::Instant::now() < deadline => {
                eprintln!("retrying the database lock: {error}");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(error) => panic!("open the stopped server's database: {error}"),
        }
    }
}

fn read_record(data_dir: &Path, id: &str) -> serde_json::Value {
    let db = open_stopped_db(data_dir);
    let tree = db.open_tree("connections").unwrap();
    serde_json::from_slice(&tree.get(id).unwrap().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn ciphertext_copied_between_records_is_rejected() {
    let fake = FakeServiceTitan::start().await;
    fake.add_app(FakeApp::new("cid.a", "cs1.a", 1, "ak1.a"));
    fake.add_app(FakeApp::new("cid.b", "cs1.b", 2, "ak1.b"));
    let mut server = Server::start(&fake).await;
    let mut client = server.client().await;
    let mut ids = Vec::new();
    for (tenant, name) in [(1, "a"), (2, "b")] {
        let connection = client
            .register_connection(pb::RegisterConnectionRequest {
                environment: pb::Environment::Production as i32,
                tenant_id: tenant,
                client_id: format!("cid.{name}"),
                client_secret: format!("cs1.{name}"),
                app_key: format!("ak1.{name}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.push(connection.connection_id);
    }
    drop(client);
    server.kill9();

    let data_dir = server.data_dir();
    let source = read_record(&data_dir, &ids[0]);
    let original_b = read_record(&data_dir, &ids[1]);
    let secret_a = source["versions"][0]["client_secret"].clone();
    edit_record(&data_dir, &ids[1], |record| {
        record["versions"][0]["client_secret"] = secret_a;
    });
    server.launch().await;
    let mut client = server.client().await;
    let status = client
        .get_access_token(pb::GetAccessTokenRequest {
            connection_id: ids[1].clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(status.message().contains(&ids[1]), "{}", status.message());
    client
        .get_access_token(pb::GetAccessTokenRequest {
            connection_id: ids[0].clone(),
            ..Default::default()
        })
        .await
        .expect("the source record is untouched");

    // A wrapped data key copied from another record fails the same way.
    drop(client);
    server.kill9();
    let wrapped_a = source["wrapped_data_key"].clone();
    edit_record(&data_dir, &ids[1], |record| {
        *record = original_b;
        record["wrapped_data_key"] = wrapped_a;
    });
    server.launch().await;
    let mut client = server.client().await;
    let status = client
        .get_access_token(pb::GetAccessTokenRequest {
            connection_id: ids[1].clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(status.message().contains(&ids[1]));
}

/// Registers connections for tenants 1 and 2 and stops the server, returning
/// it with their ids.
async fn two_connections_stopped() -> (FakeServiceTitan, Server, Vec<String>) {
    let fake = FakeServiceTitan::start().await;
    fake.add_app(FakeApp::new("cid.a", "cs1.a", 1, "ak1.a"));
    fake.add_app(FakeApp::new("cid.b", "cs1.b", 2, "ak1.b"));
    let mut server = Server::start(&fake).await;
    let mut client = server.client().await;
    let mut ids = Vec::new();
    for (tenant, name) in [(1, "a"), (2, "b")] {
        let connection = client
            .register_connection(pb::RegisterConnectionRequest {
                environment: pb::Environment::Production as i32,
                tenant_id: tenant,
                client_id: format!("cid.{name}"),
                client_secret: format!("cs1.{name}"),
                app_key: format!("ak1.{name}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.push(connection.connection_id);
    }
    drop(client);
    server.kill9();
    (fake, server, ids)
}

fn token_for_tenant(tenant_id: i64) -> pb::GetAccessTokenRequest {
    pb::GetAccessTokenRequest {
        environment: pb::Environment::Production as i32,
        tenant_id,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn edited_routing_fields_are_rejected() {
    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit); 4] = [
        ("tenant_id", |r| r["tenant_id"] = 2.into()),
        ("environment", |r| r["environment"] = "integration".into()),
        ("client_id", |r| {
            r["versions"][0]["client_id"] = "cid.b".into()
        }),
        ("enterprise_hub", |r| r["enterprise_hub"] = true.into()),
    ];
    for (field, edit) in edits {
        let (fake, mut server, ids) = two_connections_stopped().await;
        edit_record(&server.data_dir(), &ids[0], edit);
        server.launch().await;
        let mut client = server.client().await;
        let requests = fake.token_requests();
        let status = client
            .get_access_token(pb::GetAccessTokenRequest {
                connection_id: ids[0].clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::DataLoss, "edited {field}: {status:?}");
        assert_eq!(
            fake.token_requests(),
            requests,
            "edited {field}: credentials were sent"
        );
        let token = client
            .get_access_token(token_for_tenant(2))
            .await
            .expect("tenant 2 unaffected");
        assert_eq!(token.into_inner().connection_id, ids[1]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn record_under_another_id_is_rejected() {
    let (_fake, mut server, ids) = two_connections_stopped().await;
    let copy_of_b = read_record(&server.data_dir(), &ids[1]);
    edit_record(&server.data_dir(), &ids[0], |record| *record = copy_of_b);
    server.launch().await;
    let mut client = server.client().await;

    let status = client
        .get_access_token(token_for_tenant(1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    let status = client
        .get_connection(pb::GetConnectionRequest {
            connection_id: ids[0].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");

    // Deleting the damaged record removes only its own index entry.
    client
        .delete_connection(pb::DeleteConnectionRequest {
            connection_id: ids[0].clone(),
        })
        .await
        .expect("an unreadable record can be deleted");
    let token = client
        .get_access_token(token_for_tenant(2))
        .await
        .expect("tenant 2 unaffected");
    assert_eq!(token.into_inner().connection_id, ids[1]);
    let status = client
        .get_access_token(token_for_tenant(1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn record_without_current_version_is_data_loss() {
    let (_fake, mut server, ids) = two_connections_stopped().await;
    edit_record(&server.data_dir(), &ids[0], |record| {
        record["versions"][0]["state"] = "previous".into();
    });
    server.launch().await;
    let mut client = server.client().await;

    let status = client
        .get_connection(pb::GetConnectionRequest {
            connection_id: ids[0].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    let listed = client
        .list_connections(pb::ListConnectionsRequest::default())
        .await
        .expect("one damaged record does not break listing")
        .into_inner();
    let listed_ids: Vec<_> = listed
        .connections
        .iter()
        .map(|c| c.connection_id.clone())
        .collect();
    assert_eq!(listed_ids, vec![ids[1].clone()]);
    assert!(!server.logs().contains("panicked"), "the server panicked");
}

#[tokio::test(flavor = "multi_thread")]
async fn record_in_older_encoding_can_be_updated() {
    let (fake, mut server, ids) = two_connections_stopped().await;
    // Fields with serde defaults may be absent from records written by an
    // older version; updates compare stored bytes, not a re-encoding.
    edit_record(&server.data_dir(), &ids[0], |record| {
        let object = record.as_object_mut().unwrap();
        object.remove("required_scope_groups");
        object.remove("health");
    });
    fake.update_app("cid.a", |app| app.client_secrets.push("cs2.a".into()));
    server.launch().await;
    let mut client = server.client().await;
    let rotated = client
        .rotate_credentials(pb::RotateCredentialsRequest {
            connection_id: ids[0].clone(),
            client_secret: "cs2.a".into(),
            ..Default::default()
        })
        .await
        .expect("rotate a record in the older encoding")
        .into_inner();
    assert_eq!(rotated.credential_version, 2);
}
