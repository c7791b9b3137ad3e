//! Startup checks: the master key, its file, and settings that must be
//! refused before the server accepts a request. The wrong master key is
//! checked on sled and on PostgreSQL. The other checks look at files in
//! the data directory or fail before the storage opens.

mod support;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;

use base64::Engine;
use stvault::pb;
use support::backend::Backend;
use support::fake_servicetitan::{FakeApp, FakeServiceTitan};
use support::server::{Server, run_expecting_exit};

const KEY_A: [u8; 32] = [7; 32];
const KEY_B: [u8; 32] = [9; 32];

backend_tests!(wrong_master_key_fails_at_startup);

fn base64_key(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

fn loopback_env(dir: &std::path::Path) -> HashMap<String, String> {
    let mut env = HashMap::new();
    env.insert("STVAULT_LISTEN".into(), "127.0.0.1:0".into());
    env.insert(
        "STVAULT_DATA_DIR".into(),
        dir.join("data").display().to_string(),
    );
    for (name, value) in [
        (
            "STVAULT_PRODUCTION_TOKEN_URL",
            "http://127.0.0.1:9/connect/token",
        ),
        ("STVAULT_PRODUCTION_API_URL", "http://127.0.0.1:9"),
        (
            "STVAULT_INTEGRATION_TOKEN_URL",
            "http://127.0.0.1:9/connect/token",
        ),
        ("STVAULT_INTEGRATION_API_URL", "http://127.0.0.1:9"),
    ] {
        env.insert(name.into(), value.into());
    }
    env
}

async fn wrong_master_key_fails_at_startup(backend: Backend) {
    let fake = FakeServiceTitan::start().await;
    fake.add_app(FakeApp::new("cid.k", "cs1.k", 3, "ak1.k"));
    let key_a = base64_key(&KEY_A);
    let mut server =
        Server::start_on(backend, &fake, &fake, &[("STVAULT_MASTER_KEY", &key_a)]).await;
    server
        .client()
        .await
        .register_connection(pb::RegisterConnectionRequest {
            environment: pb::Environment::Production as i32,
            tenant_id: 3,
            client_id: "cid.k".into(),
            client_secret: "cs1.k".into(),
            app_key: "ak1.k".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    server.kill9();

    let mut env = server.env.clone();
    env.insert("STVAULT_MASTER_KEY".into(), base64_key(&KEY_B));
    let (code, output) = run_expecting_exit(&env);
    assert_ne!(code, 0);
    assert!(
        output.contains("not the key this data directory was written with"),
        "{output}"
    );
    assert!(!output.contains(&key_a), "a key was printed");
    assert!(!output.contains(&base64_key(&KEY_B)), "a key was printed");

    // With no key configured, a key is generated in the data directory,
    // found not to match, and removed again.
    let mut env = server.env.clone();
    env.remove("STVAULT_MASTER_KEY");
    let (code, output) = run_expecting_exit(&env);
    assert_ne!(code, 0);
    assert!(
        output.contains("not the key this data directory was written with"),
        "{output}"
    );
    assert!(
        !server.data_dir().join("master.key").exists(),
        "the generated key was left behind"
    );

    // The right key still opens it.
    server.launch().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn generated_key_file_is_private() {
    let fake = FakeServiceTitan::start().await;
    let server = Server::start(&fake).await;
    let key_file = server.data_dir().join("master.key");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(server.logs().contains("generated a new master key"));
    let data_mode = std::fs::metadata(server.data_dir())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(data_mode, 0o700);

    // Everything inside, sled's files included, is the owner's alone.
    let mut directories = vec![server.data_dir()];
    let mut checked = 0;
    while let Some(directory) = directories.pop() {
        for entry in std::fs::read_dir(&directory).unwrap() {
            let entry = entry.unwrap();
            let metadata = entry.metadata().unwrap();
            let mode = metadata.permissions().mode() & 0o777;
            assert_eq!(
                mode & 0o077,
                0,
                "{} has mode {mode:o}",
                entry.path().display()
            );
            checked += 1;
            if metadata.is_dir() {
                directories.push(entry.path());
            }
        }
    }
    assert!(checked > 3, "only {checked} files in the data directory");
}

#[test]
fn readable_key_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, base64_key(&KEY_A)).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut env = loopback_env(dir.path());
    env.insert(
        "STVAULT_MASTER_KEY_FILE".into(),
        key_file.display().to_string(),
    );
    let (code, output) = run_expecting_exit(&env);
    assert_eq!(code, 78, "{output}");
    assert!(output.contains("chmod 600"), "{output}");
}

#[test]
fn malformed_master_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = loopback_env(dir.path());
    env.insert("STVAULT_MASTER_KEY".into(), "c2hvcnQ=".into());
    env.insert("STVAULT_UPSTREAM_TIMEOUT".into(), "forever".into());
    let (code, output) = run_expecting_exit(&env);
    assert_eq!(code, 78, "{output}");
    assert!(output.contains("32 bytes"), "{output}");
    assert!(output.contains("STVAULT_UPSTREAM_TIMEOUT"), "{output}");
    assert!(
        !output.contains("c2hvcnQ="),
        "the key was printed: {output}"
    );
}

#[test]
fn configuration_errors_are_reported_together() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, base64_key(&KEY_A)).unwrap();
    let mut env = loopback_env(dir.path());
    env.insert(
        "STVAULT_MASTER_KEY_FILE".into(),
        key_file.display().to_string(),
    );
    env.insert("STVAULT_MASTER_KEY".into(), base64_key(&KEY_A));
    env.insert(
        "STVAULT_PRODUCTION_TOKEN_URL".into(),
        "http://auth.example.com/connect/token".into(),
    );
    env.insert("STVAULT_UPSTREAM_TIMEOUT".into(), "forever".into());
    env.insert(
        "STVAULT_INTEGRATION_API_URL".into(),
        "http://user:pa55word@127.0.0.1:9".into(),
    );
    let (code, output) = run_expecting_exit(&env);
    assert_eq!(code, 78, "{output}");
    assert!(output.contains("set only one"), "{output}");
    assert!(
        output.contains("STVAULT_INTEGRATION_API_URL must not contain a user name or password"),
        "{output}"
    );
    assert!(!output.contains("pa55word"), "{output}");
    assert!(
        output.contains("STVAULT_PRODUCTION_TOKEN_URL must use https"),
        "{output}"
    );
    assert!(output.contains("STVAULT_UPSTREAM_TIMEOUT"), "{output}");
}

#[test]
fn plaintext_non_loopback_listener_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = loopback_env(dir.path());
    env.insert("STVAULT_LISTEN".into(), "0.0.0.0:0".into());
    let (code, output) = run_expecting_exit(&env);
    assert_eq!(code, 78, "{output}");
    assert!(output.contains("not a loopback address"), "{output}");
}
