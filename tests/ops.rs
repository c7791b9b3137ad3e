//! Operations tests against the real binary: master key rotation and
//! rewrap, backup and restore, shutdown, the data directory lock,
//! configuration errors, metrics, JSON logs, and a kill -9 crash loop.
//! Shutdown, metrics, logs and the crash loop run on sled and on
//! PostgreSQL. The others read sled's files, rely on the data directory
//! lock or fail before the storage opens. `tests/postgres.rs` covers
//! rewrap on PostgreSQL beside a serving replica.

mod support;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use stvault::pb;
use support::backend::Backend;
use support::fake_servicetitan::{FakeApp, FakeServiceTitan};
use support::server::{
    Server, keygen, run_expecting_exit, run_stvault, spawn_stvault, write_key_file,
};
use tonic::Code;

const APP_KEY: &str = "ak1.ops-app-key";

backend_tests!(
    shutdown_with_idle_grpcurl_finishes_within_grace,
    metrics_count_rpcs_cache_and_upstream,
    health_listener_serves_only_health,
    json_log_format_writes_one_object_per_line,
    crash_loop_keeps_acknowledged_writes,
);

fn client_id(tenant: i64) -> String {
    format!("cid.t{tenant}")
}

fn secret(tenant: i64, number: usize) -> String {
    format!("cs{number}.t{tenant}")
}

/// Adds one app per tenant, each accepting `secrets` client secrets
/// (`secret(tenant, 0)` and up).
fn add_apps(fake: &FakeServiceTitan, tenants: impl Iterator<Item = i64>, secrets: usize) {
    for tenant in tenants {
        let mut app = FakeApp::new(client_id(tenant), secret(tenant, 0), tenant, APP_KEY);
        app.client_secrets = (0..secrets).map(|n| secret(tenant, n)).collect();
        fake.add_app(app);
    }
}

fn register_request(tenant: i64, skip_verification: bool) -> pb::RegisterConnectionRequest {
    pb::RegisterConnectionRequest {
        environment: pb::Environment::Integration as i32,
        tenant_id: tenant,
        client_id: client_id(tenant),
        client_secret: secret(tenant, 0),
        app_key: APP_KEY.into(),
        display_name: format!("tenant {tenant}"),
        skip_verification,
        ..Default::default()
    }
}

fn token_request(id: &str) -> pb::GetAccessTokenRequest {
    pb::GetAccessTokenRequest {
        connection_id: id.into(),
        ..Default::default()
    }
}

/// Registers tenants without verification, 16 at a time, and returns
/// their connection ids in tenant order.
async fn register_many(server: &Server, tenants: impl Iterator<Item = i64>) -> Vec<String> {
    let client = server.client().await;
    let tenants: Vec<i64> = tenants.collect();
    let mut ids = Vec::new();
    for batch in tenants.chunks(16) {
        let calls = batch.iter().map(|&tenant| {
            let mut client = client.clone();
            async move {
                client
                    .register_connection(register_request(tenant, true))
                    .await
                    .expect("register")
                    .into_inner()
                    .connection_id
            }
        });
        ids.extend(futures::future::join_all(calls).await);
    }
    ids
}

/// Asserts that every connection serves a token, 16 calls at a time.
async fn assert_all_serve_tokens(server: &Server, ids: &[String]) {
    let client = server.client().await;
    for batch in ids.chunks(16) {
        let calls = batch.iter().map(|id| {
            let mut client = client.clone();
            async move {
                let result = client.get_access_token(token_request(id)).await;
                (id.clone(), result)
            }
        });
        for (id, result) in futures::future::join_all(calls).await {
            let token = result
                .unwrap_or_else(|status| panic!("no token for {id}: {status:?}"))
                .into_inner();
            assert_eq!(token.connection_id, id);
        }
    }
}

/// Returns every connection id, paging through ListConnections.
async fn list_ids(server: &Server) -> Vec<String> {
    let mut client = server.client().await;
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_connections(pb::ListConnectionsRequest {
                page_size: 500,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .expect("list connections")
            .into_inner();
        ids.extend(page.connections.into_iter().map(|c| c.connection_id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        page_token = page.next_page_token;
    }
}

fn key_id(key_line: &str) -> &str {
    key_line
        .split_whitespace()
        .next()
        .expect("key line has an id")
}

fn text(output: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Parses "rewrapped N connections under master key ID; M already used it".
fn rewrap_counts(stdout: &str) -> (usize, usize) {
    let line = stdout
        .lines()
        .find(|line| line.starts_with("rewrapped "))
        .unwrap_or_else(|| panic!("no summary in rewrap output: {stdout}"));
    let numbers: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|part| part.parse().ok())
        .collect();
    (numbers[0], *numbers.last().expect("two counts"))
}

#[tokio::test(flavor = "multi_thread")]
async fn rewrap_killed_halfway_then_old_key_removed() {
    const OLD_KEY_CONNECTIONS: i64 = 600;
    const NEW_KEY_CONNECTIONS: i64 = 5;
    let total = (OLD_KEY_CONNECTIONS + NEW_KEY_CONNECTIONS) as usize;
    let fake = FakeServiceTitan::start().await;
    add_apps(&fake, 1..=OLD_KEY_CONNECTIONS + NEW_KEY_CONNECTIONS, 1);
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("master.keys");
    let (old_key, new_key) = (keygen(), keygen());
    write_key_file(&key_file, &[&old_key]);
    let key_setting = key_file.display().to_string();
    let mut server =
        Server::start_with(&fake, &fake, &[("STVAULT_MASTER_KEY_FILE", &key_setting)]).await;
    let mut ids = register_many(&server, 1..=OLD_KEY_CONNECTIONS).await;
    assert!(server.terminate().success());

    // The new key goes last; new connections are wrapped under it.
    write_key_file(&key_file, &[&old_key, &new_key]);
    server.launch().await;
    ids.extend(
        register_many(
            &server,
            OLD_KEY_CONNECTIONS + 1..=OLD_KEY_CONNECTIONS + NEW_KEY_CONNECTIONS,
        )
        .await,
    );
    assert_all_serve_tokens(&server, &ids[ids.len() - 10..]).await;

    let refused = server.run(&["rewrap"]);
    let (_, stderr) = text(&refused);
    assert!(!refused.status.success(), "rewrap ran beside the server");
    assert!(
        stderr.contains(&format!("in use by process {}", server.pid())),
        "{stderr}"
    );
    assert!(server.terminate().success());

    // Removing the old key while connections still use it is refused.
    write_key_file(&key_file, &[&new_key]);
    let (code, output) = run_expecting_exit(&server.env);
    assert_ne!(code, 0, "started without the old key: {output}");
    let expected = format!(
        "{OLD_KEY_CONNECTIONS} connections use master key {}",
        key_id(&old_key)
    );
    assert!(output.contains(&expected), "{output}");
    write_key_file(&key_file, &[&old_key, &new_key]);

    // A run whose audit event cannot be written changes nothing: the
    // partial run below still finds every old-key connection.
    let trail = server.data_dir().join("audit.jsonl");
    let aside = server.data_dir().join("audit.jsonl.aside");
    std::fs::rename(&trail, &aside).unwrap();
    std::fs::create_dir(&trail).unwrap();
    let unaudited = server.run(&["rewrap"]);
    let (stdout, stderr) = text(&unaudited);
    assert!(!unaudited.status.success(), "{stdout}");
    assert!(stderr.contains("cannot open the audit trail"), "{stderr}");
    std::fs::remove_dir(&trail).unwrap();
    std::fs::rename(&aside, &trail).unwrap();

    // A partial run stops at its limit.
    let limited = server.run(&["rewrap", "--limit", "150"]);
    let (stdout, stderr) = text(&limited);
    assert!(limited.status.success(), "{stdout}{stderr}");
    assert_eq!(rewrap_counts(&stdout), (150, NEW_KEY_CONNECTIONS as usize));
    assert!(
        stdout.contains("450 connections still use older keys"),
        "{stdout}"
    );

    // kill -9 once the run reports progress.
    let log_path = server.dir.path().join("rewrap-killed.log");
    let mut child = spawn_stvault(&["rewrap"], &server.env, &log_path);
    let started = Instant::now();
    let mut killed_midway = false;
    loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("rewrap progress") {
            killed_midway = child.try_wait().unwrap().is_none();
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "rewrap hung: {log}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.kill();
    child.wait().unwrap();
    println!("rewrap killed before finishing: {killed_midway}");

    let rerun = server.run(&["rewrap"]);
    let (stdout, stderr) = text(&rerun);
    assert!(rerun.status.success(), "{stdout}{stderr}");
    let (rewrapped, already) = rewrap_counts(&stdout);
    assert_eq!(rewrapped + already, total, "{stdout}");
    assert!(already >= 150 + NEW_KEY_CONNECTIONS as usize, "{stdout}");
    if killed_midway {
        assert!(
            rewrapped < total - 155,
            "the killed run rewrapped nothing: {stdout}"
        );
    }
    assert!(
        stdout.contains(key_id(&old_key)),
        "old key not named as removable: {stdout}"
    );

    let again = server.run(&["rewrap"]);
    let (stdout, _) = text(&again);
    assert!(again.status.success());
    assert_eq!(rewrap_counts(&stdout), (0, total), "{stdout}");

    // The old key removed: every connection still serves tokens.
    write_key_file(&key_file, &[&new_key]);
    server.launch().await;
    assert!(
        server.logs().contains("master key retired"),
        "{}",
        server.logs()
    );
    assert_eq!(list_ids(&server).await.len(), total);
    assert_all_serve_tokens(&server, &ids).await;

    // Each run that got past the lock is in the audit trail, the killed one
    // too, since its event is written before anything changes.
    let runs = server.audit_events("stvault rewrap").await;
    assert_eq!(runs.len(), 4, "{runs:?}");
    for run in &runs {
        assert_eq!(run.auth_method, "local");
        assert!(run.caller.starts_with("uid:"), "{}", run.caller);
        assert_eq!(run.code, "OK");
    }
    // The README's listing, as printed there.
    let script =
        support::readme_block("rewrap-events").replace("127.0.0.1:50051", &server.addr.to_string());
    let output = Command::new("bash")
        .args(["-c", &format!("set -euo pipefail\n{script}")])
        .env("STVAULT_ADMIN_KEY", "unused-without-a-policy")
        .output()
        .expect("run bash");
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(stdout.lines().count(), 4, "{stdout}");
    assert!(
        stdout.lines().all(|line| line.contains("\tuid:")),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_during_writes_restores_into_fresh_directory() {
    const INITIAL: i64 = 100;
    const TENANTS: i64 = 400;
    let fake = FakeServiceTitan::start().await;
    add_apps(&fake, 1..=TENANTS, 1);
    let work = tempfile::tempdir().unwrap();
    let key_file = work.path().join("master.keys");
    write_key_file(&key_file, &[&keygen()]);
    let key_setting = key_file.display().to_string();
    let server =
        Server::start_with(&fake, &fake, &[("STVAULT_MASTER_KEY_FILE", &key_setting)]).await;
    let initial = register_many(&server, 1..=INITIAL).await;

    // A writer keeps registering while the backup runs.
    let acked: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(initial.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let mut client = server.client().await;
        let (acked, stop) = (acked.clone(), stop.clone());
        tokio::spawn(async move {
            for tenant in INITIAL + 1..=TENANTS {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let connection = client
                    .register_connection(register_request(tenant, true))
                    .await
                    .expect("register during backup")
                    .into_inner();
                acked.lock().unwrap().push(connection.connection_id);
            }
        })
    };
    let wait_for_acks = |count: usize| {
        let acked = acked.clone();
        async move {
            while acked.lock().unwrap().len() < count {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    wait_for_acks(initial.len() + 20).await;

    let backup_file = work.path().join("stvault.backup");
    let acked_before: Vec<String> = acked.lock().unwrap().clone();
    let args = [
        "backup".to_string(),
        "--server".into(),
        server.url(),
        "--out".into(),
        backup_file.display().to_string(),
    ];
    let env = server.env.clone();
    let backup = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_stvault(&args, &env)
    })
    .await
    .unwrap();
    let acked_after = acked.lock().unwrap().len();
    wait_for_acks(acked_after + 20).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let (stdout, stderr) = text(&backup);
    assert!(backup.status.success(), "backup failed: {stdout}{stderr}");
    assert!(stdout.contains("wrote "), "{stdout}");

    // Restore into a fresh directory and serve it with the same key.
    let restored_dir = work.path().join("restored");
    let restore = run_stvault(
        &[
            "restore",
            "--from",
            &backup_file.display().to_string(),
            "--data-dir",
            &restored_dir.display().to_string(),
        ],
        &server.env,
    );
    let (stdout, stderr) = text(&restore);
    assert!(restore.status.success(), "restore failed: {stdout}{stderr}");
    let mut env = server.env.clone();
    env.insert(
        "STVAULT_DATA_DIR".into(),
        restored_dir.display().to_string(),
    );
    let restored = Server::start_env(env).await;
    let restored_ids = list_ids(&restored).await;
    let restored_set: HashSet<&String> = restored_ids.iter().collect();
    assert!(
        stdout.contains(&format!("restored {} connections", restored_ids.len())),
        "{stdout}"
    );
    for id in &acked_before {
        assert!(
            restored_set.contains(id),
            "{id} acknowledged before the backup is missing"
        );
    }
    assert!(
        restored_ids.len() <= acked_after,
        "the backup holds writes from after it ended"
    );
    println!(
        "acknowledged before backup: {}, in backup: {}, after backup: {acked_after}",
        acked_before.len(),
        restored_ids.len()
    );
    assert_all_serve_tokens(&restored, &restored_ids).await;

    // Damaged files and a non-empty target are refused.
    let bytes = std::fs::read(&backup_file).unwrap();
    let restore_into = |file: &Path, dir: &Path| {
        run_stvault(
            &[
                "restore",
                "--from",
                &file.display().to_string(),
                "--data-dir",
                &dir.display().to_string(),
            ],
            &server.env,
        )
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("half", bytes[..bytes.len() / 2].to_vec(), "truncated"),
        ("tail", bytes[..bytes.len() - 10].to_vec(), "truncated"),
        (
            "flipped",
            {
                let mut flipped = bytes.clone();
                flipped[bytes.len() / 2] ^= 0x01;
                flipped
            },
            "checksum does not match",
        ),
    ];
    for (name, damaged, expected) in cases {
        let file = work.path().join(format!("{name}.backup"));
        std::fs::write(&file, damaged).unwrap();
        let dir = work.path().join(format!("restore-{name}"));
        let output = restore_into(&file, &dir);
        let (_, stderr) = text(&output);
        assert!(!output.status.success(), "{name} backup was restored");
        assert!(stderr.contains(expected), "{name}: {stderr}");
        assert!(!dir.join("db").exists(), "{name}: a database was created");
    }
    let output = restore_into(&backup_file, &restored_dir);
    assert!(!output.status.success());
    assert!(
        text(&output).1.contains("is not empty"),
        "{}",
        text(&output).1
    );

    let output = server.run(&[
        "backup",
        "--server",
        &server.url(),
        "--out",
        &backup_file.display().to_string(),
    ]);
    assert!(!output.status.success());
    assert!(
        text(&output).1.contains("already exists"),
        "{}",
        text(&output).1
    );
}

/// Counts established TCP connections whose local port is `port`, which for
/// a server port are its accepted client connections.
fn established_connections(port: u16) -> usize {
    let port_hex = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|table| table.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3 && fields[1].ends_with(&port_hex) && fields[3] == "01"
        })
        .count()
}

async fn shutdown_with_idle_grpcurl_finishes_within_grace(backend: Backend) {
    const GRACE: Duration = Duration::from_secs(2);
    let fake = FakeServiceTitan::start().await;
    add_apps(&fake, 1..=1, 1);
    let mut server =
        Server::start_on(backend, &fake, &fake, &[("STVAULT_SHUTDOWN_GRACE", "2s")]).await;
    let id = register_many(&server, 1..=1).await.remove(0);
    let port = server.addr.port();
    while established_connections(port) > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // grpcurl connects, resolves the method through reflection, then waits
    // for a request on stdin that never comes.
    let mut idle = Command::new("grpcurl")
        .args([
            "-plaintext",
            "-d",
            "@",
            &server.addr.to_string(),
            "stvault.v1.CredentialVault/GetConnection",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run grpcurl");
    let waited = Instant::now();
    while established_connections(port) == 0 {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "grpcurl never connected"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // An RPC in flight when the signal arrives: its token request takes 1 s.
    fake.set_token_delay(Duration::from_secs(1));
    let mut client = server.client().await;
    let in_flight = tokio::spawn(async move { client.get_access_token(token_request(&id)).await });
    while fake.token_requests() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let signalled = Instant::now();
    server.signal("TERM");
    let status = tokio::task::block_in_place(|| server.wait_exit(GRACE + Duration::from_secs(5)));
    let elapsed = signalled.elapsed();
    let _ = idle.kill();
    let _ = idle.wait();
    let status = status.expect("stvault still running after the grace period");
    println!("stopped {elapsed:?} after SIGTERM");
    assert!(status.success(), "exit status {status}\n{}", server.logs());
    assert!(
        elapsed < GRACE + Duration::from_millis(1500),
        "shutdown took {elapsed:?}"
    );
    let token = in_flight
        .await
        .unwrap()
        .expect("the in-flight RPC finished");
    assert_eq!(token.into_inner().credential_version, 1);
    assert!(
        server.logs().contains("database flushed"),
        "{}",
        server.logs()
    );

    // A restart right after the stop gets the directory lock.
    server.launch().await;
    let mut client = server.client().await;
    assert_eq!(list_ids(&server).await.len(), 1);
    client
        .get_connection(pb::GetConnectionRequest {
            connection_id: list_ids(&server).await.remove(0),
        })
        .await
        .expect("served after restart");
}

#[tokio::test(flavor = "multi_thread")]
async fn second_server_on_same_directory_is_refused() {
    let fake = FakeServiceTitan::start().await;
    let server = Server::start(&fake).await;
    let started = Instant::now();
    let (code, output) = run_expecting_exit(&server.env);
    assert_ne!(code, 0, "{output}");
    let expected = format!(
        "data directory {} is in use by process {}",
        server.data_dir().display(),
        server.pid()
    );
    assert!(output.contains(&expected), "{output}");
    assert!(!output.contains("panicked"), "{output}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The first server is unaffected.
    assert!(list_ids(&server).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn configuration_errors_reported_together() {
    let fake = FakeServiceTitan::start().await;
    let server = Server::start(&fake).await;
    let mut env = server.env.clone();
    env.insert(
        "STVAULT_DATA_DIR".into(),
        server.dir.path().join("unused").display().to_string(),
    );
    env.insert("STVAULT_SHUTDOWN_GRACE".into(), "forever".into());
    env.insert("STVAULT_METRICS_LISTEN".into(), "not-an-address".into());
    env.insert("STVAULT_UPSTREAM_TIMEOUT".into(), "0s".into());
    let (code, output) = run_expecting_exit(&env);
    assert_eq!(code, 78, "{output}");
    for setting in [
        "STVAULT_SHUTDOWN_GRACE",
        "STVAULT_METRICS_LISTEN",
        "STVAULT_UPSTREAM_TIMEOUT",
    ] {
        assert!(output.contains(setting), "{setting} not reported: {output}");
    }
    assert!(
        !server.dir.path().join("unused").exists(),
        "started despite errors"
    );

    env.insert("STVAULT_SHUTDOWN_GRACE".into(), "1s".into());
    env.insert("STVAULT_METRICS_LISTEN".into(), String::new());
    env.insert("STVAULT_UPSTREAM_TIMEOUT".into(), "3s".into());
    env.insert("STVAULT_METRICS_TENANT_LABELS".into(), "true".into());
    let (code, output) = run_expecting_exit(&env);
    assert_eq!(code, 78, "{output}");
    assert!(output.contains("STVAULT_METRICS_TENANT_LABELS"), "{output}");
}

async fn scrape(server: &Server) -> (String, String) {
    let response = reqwest::get(format!("http://{}/metrics", server.metrics_addr()))
        .await
        .expect("scrape metrics");
    assert!(response.status().is_success());
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    (content_type, response.text().await.unwrap())
}

async fn metrics_count_rpcs_cache_and_upstream(backend: Backend) {
    let fake = FakeServiceTitan::start().await;
    add_apps(&fake, 1..=2, 1);
    let server = Server::start_on(
        backend,
        &fake,
        &fake,
        &[
            ("STVAULT_METRICS_LISTEN", "127.0.0.1:0"),
            ("STVAULT_METRICS_TENANT_LABELS", "true"),
        ],
    )
    .await;
    let mut client = server.client().await;
    let verified = client
        .register_connection(register_request(1, false))
        .await
        .unwrap()
        .into_inner();
    client
        .register_connection(register_request(2, true))
        .await
        .unwrap();
    let first = client
        .get_access_token(token_request(&verified.connection_id))
        .await
        .unwrap()
        .into_inner();
    client
        .get_access_token(token_request(&verified.connection_id))
        .await
        .unwrap();
    let missing = client
        .get_connection(pb::GetConnectionRequest {
            connection_id: "0190d3f4-0000-7000-8000-000000000000".into(),
        })
        .await
        .expect_err("unknown connection");
    assert_eq!(missing.code(), Code::NotFound);

    let (content_type, body) = scrape(&server).await;
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    for expected in [
        r#"stvault_rpc_requests_total{method="GetAccessToken",code="Ok"} 2"#,
        r#"stvault_rpc_requests_total{method="RegisterConnection",code="Ok"} 2"#,
        r#"stvault_rpc_requests_total{method="GetConnection",code="NotFound"} 1"#,
        r#"stvault_rpc_duration_seconds_count{method="GetAccessToken"} 2"#,
        r#"stvault_token_cache_requests_total{result="hit"} 1"#,
        r#"stvault_token_cache_requests_total{result="miss"} 1"#,
        // The registration's verification and the first GetAccessToken.
        r#"stvault_upstream_token_requests_total{environment="integration",outcome="ok",tenant_id="1"} 2"#,
        r#"stvault_upstream_token_duration_seconds_count{environment="integration"} 2"#,
        r#"stvault_connections{environment="integration",state="healthy"} 1"#,
        r#"stvault_connections{environment="integration",state="unchecked"} 1"#,
        "stvault_audit_events_written_total 5",
        "# EOF",
    ] {
        assert!(body.contains(expected), "{expected} missing from:\n{body}");
    }
    for secret_value in [secret(1, 0).as_str(), APP_KEY, first.access_token.as_str()] {
        assert!(!body.contains(secret_value), "a secret is in the metrics");
    }
    assert!(
        !body.contains(&verified.connection_id),
        "a connection id is a label"
    );
}

async fn health_listener_serves_only_health(backend: Backend) {
    let fake = FakeServiceTitan::start().await;
    let mut server = Server::start_on(
        backend,
        &fake,
        &fake,
        &[("STVAULT_HEALTH_LISTEN", "127.0.0.1:0")],
    )
    .await;
    let url = format!("http://{}", server.health_addr());
    let channel = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .expect("connect to the health listener");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health check")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let mut vault = pb::credential_vault_client::CredentialVaultClient::connect(url)
        .await
        .unwrap();
    let refused = vault
        .list_connections(pb::ListConnectionsRequest::default())
        .await
        .expect_err("the health listener served the vault");
    assert_eq!(refused.code(), Code::Unimplemented);
    let status = server.terminate();
    assert!(status.success(), "{status:?}\n{}", server.logs());
}

async fn json_log_format_writes_one_object_per_line(backend: Backend) {
    let fake = FakeServiceTitan::start().await;
    add_apps(&fake, 1..=1, 1);
    let mut server =
        Server::start_on(backend, &fake, &fake, &[("STVAULT_LOG_FORMAT", "json")]).await;
    register_many(&server, 1..=1).await;
    assert!(server.terminate().success());
    let logs = server.logs();
    let mut messages = Vec::new();
    for line in logs.lines().filter(|line| !line.is_empty()) {
        let object: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(object["level"].is_string(), "{line}");
        assert!(object["timestamp"].is_string(), "{line}");
        messages.push(object["message"].as_str().unwrap_or_default().to_owned());
    }
    for expected in ["stvault listening", "rpc finished", "stvault stopped"] {
        assert!(
            messages.iter().any(|m| m == expected),
            "{expected} not logged: {logs}"
        );
    }
    assert!(!logs.contains(&secret(1, 0)), "a secret is in the logs");
}

/// Requests the crash loop sent for one tenant, and the responses it got.
#[derive(Default)]
struct TenantLedger {
    id: Option<String>,
    /// Acknowledged (credential version, client secret) pairs; a version
    /// seen after a restart is added too, since it is durable from then on.
    acked: Vec<(u32, String)>,
    /// Every client secret sent, acknowledged or not.
    attempted: HashSet<String>,
    next_secret: usize,
}

type Ledger = Arc<Mutex<HashMap<i64, TenantLedger>>>;

/// Registers (always with `secret(tenant, 0)`, so a retry is idempotent)
/// and rotates the worker's tenants until `stop` is set. Errors, such as the
/// server being killed, are not acknowledgements and are otherwise ignored.
async fn crash_loop_worker(
    url: String,
    tenants: Vec<i64>,
    ledger: Ledger,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let Ok(mut client) = pb::credential_vault_client::CredentialVaultClient::connect(url).await
    else {
        return;
    };
    while !stop.load(Ordering::Relaxed) {
        let tenant = tenants[rng.gen_range(0..tenants.len())];
        let skip_verification = rng.gen_bool(0.5);
        let id = ledger.lock().unwrap().entry(tenant).or_default().id.clone();
        let failed = match id {
            None => {
                ledger
                    .lock()
                    .unwrap()
                    .get_mut(&tenant)
                    .unwrap()
                    .attempted
                    .insert(secret(tenant, 0));
                match client
                    .register_connection(register_request(tenant, skip_verification))
                    .await
                {
                    Ok(response) => {
                        let connection = response.into_inner();
                        let mut ledger = ledger.lock().unwrap();
                        let entry = ledger.get_mut(&tenant).unwrap();
                        entry.id = Some(connection.connection_id);
                        entry
                            .acked
                            .push((connection.credential_version, secret(tenant, 0)));
                        false
                    }
                    Err(_) => true,
                }
            }
            Some(id) => {
                let new_secret = {
                    let mut ledger = ledger.lock().unwrap();
                    let entry = ledger.get_mut(&tenant).unwrap();
                    entry.next_secret += 1;
                    let new_secret = secret(tenant, entry.next_secret);
                    entry.attempted.insert(new_secret.clone());
                    new_secret
                };
                let request = pb::RotateCredentialsRequest {
                    connection_id: id,
                    client_secret: new_secret.clone(),
                    skip_verification,
                    ..Default::default()
                };
                match client.rotate_credentials(request).await {
                    Ok(response) => {
                        let version = response.into_inner().credential_version;
                        let mut ledger = ledger.lock().unwrap();
                        ledger
                            .get_mut(&tenant)
                            .unwrap()
                            .acked
                            .push((version, new_secret));
                        false
                    }
                    Err(_) => true,
                }
            }
        };
        if failed {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Checks every tenant after a restart. Acknowledged connections exist,
/// with exactly one current version and none pending. The current version
/// is at least the last acknowledged one and carries the secret sent for
/// it, and its credentials decrypt into a token request.
async fn check_crash_loop_state(
    backend: Backend,
    server: &Server,
    fake: &FakeServiceTitan,
    ledger: &Ledger,
) {
    let mut client = server.client().await;
    if let Some(database) = &server.database {
        // Shared tokens outlive a restart; without them, every token below
        // is requested with the credentials the server decrypts.
        database.execute("DELETE FROM stvault_tokens").await;
    }
    let mut tenants: Vec<i64> = ledger.lock().unwrap().keys().copied().collect();
    tenants.sort();
    for tenant in tenants {
        let listed = client
            .list_connections(pb::ListConnectionsRequest {
                environment: pb::Environment::Integration as i32,
                tenant_id: tenant,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .connections;
        let (known_id, last_acked, attempted) = {
            let ledger = ledger.lock().unwrap();
            let entry = &ledger[&tenant];
            let last = entry.acked.iter().max_by_key(|(v, _)| *v).cloned();
            (entry.id.clone(), last, entry.attempted.clone())
        };
        let Some(connection) = listed.into_iter().next() else {
            assert!(
                known_id.is_none(),
                "acknowledged connection of tenant {tenant} lost"
            );
            continue;
        };
        if let Some(id) = &known_id {
            assert_eq!(&connection.connection_id, id);
        }
        let states: Vec<i32> = connection.versions.iter().map(|v| v.state).collect();
        let count = |state: pb::credential_version::State| {
            states.iter().filter(|s| **s == state as i32).count()
        };
        assert_eq!(
            count(pb::credential_version::State::Current),
            1,
            "tenant {tenant}: {states:?}"
        );
        // Startup on PostgreSQL keeps a pending version younger than an
        // hour, since it may belong to a rotation that another server
        // sharing the database is still verifying.
        let max_pending = match backend {
            Backend::Sled => 0,
            Backend::Postgres => 1,
        };
        assert!(
            count(pb::credential_version::State::Pending) <= max_pending,
            "tenant {tenant}: {states:?}"
        );
        assert!(
            count(pb::credential_version::State::Previous) <= 1,
            "tenant {tenant}: {states:?}"
        );

        let token = client
            .get_access_token(token_request(&connection.connection_id))
            .await
            .unwrap_or_else(|status| panic!("tenant {tenant} does not decrypt: {status:?}"))
            .into_inner();
        assert_eq!(token.credential_version, connection.credential_version);
        let form = fake.last_token_form().expect("a token request was made");
        let sent_secret = form
            .iter()
            .find(|(name, _)| name == "client_secret")
            .map(|(_, value)| value.clone())
            .expect("token request has a client secret");
        assert!(
            sent_secret.ends_with(&format!(".t{tenant}")),
            "secret of another tenant"
        );
        assert!(
            attempted.contains(&sent_secret),
            "tenant {tenant}: a secret never sent"
        );
        if let Some((version, acked_secret)) = &last_acked {
            assert!(
                connection.credential_version >= *version,
                "tenant {tenant}: acknowledged version {version} lost, found {}",
                connection.credential_version
            );
            if connection.credential_version == *version {
                assert_eq!(&sent_secret, acked_secret, "tenant {tenant}");
            }
        }
        let mut ledger = ledger.lock().unwrap();
        let entry = ledger.get_mut(&tenant).unwrap();
        entry.id = Some(connection.connection_id.clone());
        entry
            .acked
            .push((connection.credential_version, sent_secret));
    }
}

async fn crash_loop_keeps_acknowledged_writes(backend: Backend) {
    const ROUNDS: usize = 6;
    const WORKERS: i64 = 4;
    const TENANTS_PER_WORKER: i64 = 3;
    const SECRETS: usize = 2000;
    let fake = FakeServiceTitan::start().await;
    add_apps(&fake, 1..=WORKERS * TENANTS_PER_WORKER, SECRETS);
    // Slow token requests keep rotations pending for a while, so kills land
    // in the middle of verification too.
    fake.set_token_delay(Duration::from_millis(20));
    let work = tempfile::tempdir().unwrap();
    let key_file = work.path().join("master.keys");
    write_key_file(&key_file, &[&keygen()]);
    let key_setting = key_file.display().to_string();
    let mut server = Server::start_on(
        backend,
        &fake,
        &fake,
        &[("STVAULT_MASTER_KEY_FILE", &key_setting)],
    )
    .await;

    let seed: u64 = rand::random();
    println!("crash loop seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let ledger: Ledger = Arc::default();
    let mut discarded_pending = 0;
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..WORKERS)
            .map(|worker| {
                let tenants = (0..TENANTS_PER_WORKER)
                    .map(|i| 1 + worker + i * WORKERS)
                    .collect();
                tokio::spawn(crash_loop_worker(
                    server.url(),
                    tenants,
                    ledger.clone(),
                    stop.clone(),
                    seed ^ (round as u64 * 31 + worker as u64),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1500))).await;
        server.kill9();
        stop.store(true, Ordering::Relaxed);
        for worker in workers {
            worker.await.unwrap();
        }
        server.launch().await;
        check_crash_loop_state(backend, &server, &fake, &ledger).await;
        discarded_pending = server
            .logs()
            .matches("discarded a pending credential version")
            .count();
    }
    let acknowledged: usize = ledger.lock().unwrap().values().map(|t| t.acked.len()).sum();
    println!(
        "{acknowledged} acknowledged or observed writes, {discarded_pending} pending versions discarded at restarts"
    );
    assert!(
        acknowledged > ROUNDS * 10,
        "the loop did little work: {acknowledged}"
    );
}
