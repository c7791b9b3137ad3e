//! Benchmarks of the token broker and the store, run against the real server
//! on loopback and the fake ServiceTitan: `cargo bench --bench stvault-bench`.
//!
//! Every throughput figure is reported beside the server's own
//! `grpc.health.v1.Health/Check` throughput measured in the same run, since
//! client and server share the machine's cores. BENCHMARKS.md records the
//! method and the figures.

#[path = "../tests/support/fake_servicetitan.rs"]
mod fake_servicetitan;
// The PostgreSQL harness names its certificate helpers as `super::certs`.
#[path = "../tests/support/certs.rs"]
mod certs;
#[path = "../tests/support/postgres.rs"]
mod postgres;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_servicetitan::{FakeApp, FakeServiceTitan};
use stvault::audit::SyncPolicy;
use stvault::broker::BrokerSettings;
use stvault::config::{Config, MasterKeySource, Storage};
use stvault::crypto::MasterKey;
use stvault::health::HealthSettings;
use stvault::model::Environment;
use stvault::pb;
use stvault::pb::credential_vault_client::CredentialVaultClient;
use stvault::secret::SecretString;
use stvault::servicetitan::{ClientConfig, Endpoints};
use stvault::store::Store;
use stvault::vault::{NewConnection, new_record};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const CONCURRENCY_LEVELS: [usize; 3] = [1, 64, 256];
/// Length of each throughput measurement, after a warm-up of a tenth of it.
const MEASURE_FOR: Duration = Duration::from_secs(3);
/// HTTP/2 connections the load is spread over, so no single connection's
/// stream limit queues calls on the client.
const CHANNELS: usize = 4;
const STORM_CONNECTIONS: usize = 10_000;
/// The relaxed audit sync interval measured beside the default.
const RELAXED_SYNC: Duration = Duration::from_millis(10);
const SYNC_SAMPLES: usize = 1000;
const REGISTER_CONCURRENCY: usize = 64;
const STORED_CONNECTIONS: usize = 100_000;
const FIRST_TENANT: i64 = 1_000_000;

type VaultClient = CredentialVaultClient<Channel>;

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`. The argument `warm` stops after the
    // warm GetAccessToken figures; `postgres` runs only the comparison of
    // the two storage backends.
    if std::env::args().any(|arg| arg == "postgres") {
        compare_backends().await;
        return;
    }
    let fake = FakeServiceTitan::start().await;
    let work_dir = tempfile::tempdir().expect("a temporary directory can be created");
    let (_, key_text) = MasterKey::generate();
    let relaxed_sync = humantime::format_duration(RELAXED_SYNC).to_string();
    // The warm figures come from `stvault serve` processes, as deployed:
    // a server whose tasks share a runtime with the load generator would
    // stall the client whenever it blocks on the disk.
    let live = ServerProcess::start(
        &fake,
        &work_dir.path().join("live"),
        &key_text,
        &[("STVAULT_AUDIT_SYNC", "always")],
    )
    .await;
    let relaxed = ServerProcess::start(
        &fake,
        &work_dir.path().join("relaxed"),
        &key_text,
        &[("STVAULT_AUDIT_SYNC", &relaxed_sync)],
    )
    .await;
    let live_channels = connect_channels(live.addr).await;
    let relaxed_channels = connect_channels(relaxed.addr).await;

    println!("# stvault benchmarks\n");
    println!("machine: {}", machine_summary());
    println!("measurement: {} s per figure\n", MEASURE_FOR.as_secs());

    let warm_app = FakeApp::new("cid.warm", "cs1.warm", 42, "ak1.warm");
    fake.add_app(warm_app.clone());
    let warm_id = register(&client(&live_channels, 0), &warm_app).await;
    get_token(&client(&live_channels, 0), &warm_id)
        .await
        .expect("the warm connection gets a token");
    let relaxed_id = register(&client(&relaxed_channels, 0), &warm_app).await;
    get_token(&client(&relaxed_channels, 0), &relaxed_id)
        .await
        .expect("the warm connection gets a token");

    let sync = measure_sync(&work_dir.path().join("sync-probe"));
    println!("## Disk: append of 300 bytes and fdatasync, {SYNC_SAMPLES} times\n");
    println!(
        "p50 {}, p99 {}\n",
        millis(sync.percentile(0.50)),
        millis(sync.percentile(0.99))
    );

    println!("## Warm GetAccessToken against Health/Check\n");
    println!(
        "Audit sync `always` (the default) and `{}`, one server each.\n",
        humantime::format_duration(RELAXED_SYNC)
    );
    println!(
        "| concurrency | Health/Check calls/s | p50 | p99 \
         | always: calls/s | ratio | p50 | p99 \
         | {}: calls/s | ratio | p50 | p99 |",
        humantime::format_duration(RELAXED_SYNC)
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut cpu_rows = Vec::new();
    for concurrency in CONCURRENCY_LEVELS {
        let cpu_before = live.cpu_time();
        let health = measure(&live_channels, concurrency, |channel| async move {
            let mut health = HealthClient::new(channel);
            let request = HealthCheckRequest {
                service: String::new(),
            };
            health.check(request).await.is_ok()
        })
        .await;
        let health_cpu = cpu_per_call(live.cpu_time() - cpu_before, &health);
        let mut row = format!(
            "| {concurrency} | {:.0} | {} | {} |",
            health.rate(),
            millis(health.percentile(0.50)),
            millis(health.percentile(0.99)),
        );
        let mut cpu_row = format!("| {concurrency} | {:.1} µs |", micros(health_cpu));
        let mut failures = health.failures;
        for (server, channels, id) in [
            (&live, &live_channels, &warm_id),
            (&relaxed, &relaxed_channels, &relaxed_id),
        ] {
            let id = id.clone();
            let cpu_before = server.cpu_time();
            let token = measure(channels, concurrency, move |channel| {
                let id = id.clone();
                async move { get_token(&VaultClient::new(channel), &id).await.is_ok() }
            })
            .await;
            let token_cpu = cpu_per_call(server.cpu_time() - cpu_before, &token);
            row.push_str(&format!(
                " {:.0} | {:.2} | {} | {} |",
                token.rate(),
                token.rate() / health.rate(),
                millis(token.percentile(0.50)),
                millis(token.percentile(0.99)),
            ));
            cpu_row.push_str(&format!(
                " {:.1} µs | {:.2} |",
                micros(token_cpu),
                micros(token_cpu) / micros(health_cpu)
            ));
            failures += token.failures;
        }
        println!("{row}");
        cpu_rows.push(cpu_row);
        assert_eq!(failures, 0, "calls failed");
    }
    println!("\nServer CPU time (user and system) per call, warm-up included:\n");
    println!(
        "| concurrency | Health/Check | always | ratio | {}: | ratio |",
        humantime::format_duration(RELAXED_SYNC)
    );
    println!("|---|---|---|---|---|---|");
    for row in cpu_rows {
        println!("{row}");
    }
    drop((live_channels, relaxed_channels));
    drop((live, relaxed));
    if std::env::args().any(|arg| arg == "warm") {
        fake.shutdown();
        return;
    }

    let server = start_server(
        &fake,
        &work_dir.path().join("in-process"),
        &key_text,
        SyncPolicy::Always,
    )
    .await;
    let channels = connect_channels(server.addr).await;

    println!("\n## RegisterConnection with durable writes\n");
    let apps: Vec<FakeApp> = (0..STORM_CONNECTIONS)
        .map(|i| {
            let tenant = FIRST_TENANT + i as i64;
            FakeApp::new(
                format!("cid.storm.{i}"),
                format!("cs1.storm.{i}"),
                tenant,
                format!("ak1.storm.{i}"),
            )
        })
        .collect();
    for app in &apps {
        fake.add_app(app.clone());
    }
    let started = Instant::now();
    let ids = register_all(&channels, &apps).await;
    let elapsed = started.elapsed();
    println!(
        "{} registrations at concurrency {REGISTER_CONCURRENCY} in {:.2} s: {:.0} registrations/s",
        ids.len(),
        elapsed.as_secs_f64(),
        ids.len() as f64 / elapsed.as_secs_f64()
    );

    println!("\n## Cold storm\n");
    reset_peak_rss();
    let rss_before = rss_kib("VmRSS");
    let requests_before = fake.token_requests();
    let started = Instant::now();
    let calls: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let client = client(&channels, i);
            let id = id.clone();
            tokio::spawn(async move { get_token(&client, &id).await })
        })
        .collect();
    let mut failures = 0;
    for call in calls {
        if call.await.expect("the call task does not panic").is_err() {
            failures += 1;
        }
    }
    let elapsed = started.elapsed();
    let upstream = fake.token_requests() - requests_before;
    println!(
        "{} connections asked at once: {upstream} upstream token requests, {failures} failed calls, \
         all served in {:.2} s; RSS {} MiB before, peak {} MiB",
        ids.len(),
        elapsed.as_secs_f64(),
        rss_before / 1024,
        rss_kib("VmHWM") / 1024
    );
    assert_eq!(upstream, ids.len(), "one upstream request per connection");
    assert_eq!(failures, 0, "every caller gets a token");
    drop(channels);
    server.stop().await;

    println!("\n## Startup\n");
    let empty_dir = work_dir.path().join("empty");
    let stored_dir = work_dir.path().join("stored");
    let started = Instant::now();
    build_store(&stored_dir, &key_text, STORED_CONNECTIONS).await;
    println!(
        "built a store of {STORED_CONNECTIONS} connections through Store::insert_batch in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    println!("| connections stored | startup until Health/Check answers | RSS when serving |");
    println!("|---|---|---|");
    for (dir, count) in [(&empty_dir, 0), (&stored_dir, STORED_CONNECTIONS)] {
        let (startup, rss) = measure_startup(&fake, dir, &key_text).await;
        println!(
            "| {count} | {} ms | {} MiB |",
            startup.as_millis(),
            rss / 1024
        );
    }
    fake.shutdown();
    compare_backends().await;
}

/// Warm GetAccessToken and durable registrations on a server backed by a
/// throwaway PostgreSQL cluster on loopback, each as a ratio to a sled
/// server measured in the same run.
async fn compare_backends() {
    const REGISTRATIONS: usize = 2_000;
    println!("\n## PostgreSQL against sled\n");
    let fake = FakeServiceTitan::start().await;
    let work_dir = tempfile::tempdir().expect("a temporary directory can be created");
    let (_, key_text) = MasterKey::generate();
    let cluster = postgres::Postgres::start();
    let url = cluster.create_database("bench").await;
    let backends: [(&str, &[(&str, &str)]); 2] = [
        ("sled", &[]),
        (
            "postgres",
            &[
                ("STVAULT_STORAGE", "postgres"),
                ("STVAULT_DATABASE_URL", &url),
            ],
        ),
    ];
    let mut results = Vec::new();
    for (name, env) in backends {
        let server = ServerProcess::start(&fake, &work_dir.path().join(name), &key_text, env).await;
        let channels = connect_channels(server.addr).await;
        let app = FakeApp::new(
            format!("cid.backend.{name}"),
            "cs1.backend",
            7_000 + results.len() as i64,
            "ak1.backend",
        );
        fake.add_app(app.clone());
        let id = register(&client(&channels, 0), &app).await;
        get_token(&client(&channels, 0), &id)
            .await
            .expect("the warm connection gets a token");
        let token = measure(&channels, 64, move |channel| {
            let id = id.clone();
            async move { get_token(&VaultClient::new(channel), &id).await.is_ok() }
        })
        .await;
        assert_eq!(token.failures, 0, "calls failed");

        let apps: Vec<FakeApp> = (0..REGISTRATIONS)
            .map(|i| {
                FakeApp::new(
                    format!("cid.backend.{name}.{i}"),
                    format!("cs1.backend.{i}"),
                    FIRST_TENANT + i as i64,
                    format!("ak1.backend.{i}"),
                )
            })
            .collect();
        for app in &apps {
            fake.add_app(app.clone());
        }
        let started = Instant::now();
        let ids = register_all(&channels, &apps).await;
        let registrations = ids.len() as f64 / started.elapsed().as_secs_f64();
        results.push((name, token, registrations));
    }
    println!(
        "| backend | GetAccessToken calls/s (concurrency 64) | ratio to sled | p50 | p99 \
         | RegisterConnection/s | ratio to sled |"
    );
    println!("|---|---|---|---|---|---|---|");
    let (sled_rate, sled_registrations) = (results[0].1.rate(), results[0].2);
    for (name, token, registrations) in &results {
        println!(
            "| {name} | {:.0} | {:.2} | {} | {} | {:.0} | {:.2} |",
            token.rate(),
            token.rate() / sled_rate,
            millis(token.percentile(0.50)),
            millis(token.percentile(0.99)),
            registrations,
            registrations / sled_registrations,
        );
    }
    fake.shutdown();
}

// === the server and its clients ===

struct Server {
    addr: SocketAddr,
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn stop(self) {
        let _ = self.shutdown.send(());
        self.task.await.expect("the server task does not panic");
    }
}

fn config(
    fake: &FakeServiceTitan,
    data_dir: &Path,
    key_text: &SecretString,
    audit_sync: SyncPolicy,
    storage: Storage,
) -> Config {
    let endpoints = Endpoints {
        token_url: fake.token_url().parse().expect("the fake's URL parses"),
        api_url: fake.api_url().parse().expect("the fake's URL parses"),
    };
    Config {
        listen: "127.0.0.1:0".parse().expect("a valid address"),
        data_dir: data_dir.to_owned(),
        storage,
        master_key: MasterKeySource::Environment(key_text.clone()),
        client: ClientConfig {
            production: endpoints.clone(),
            integration: endpoints,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
        },
        broker: BrokerSettings {
            failure_cooldown: Duration::from_secs(2),
        },
        health: HealthSettings {
            interval: None,
            concurrency: 1,
        },
        tls: None,
        policy: None,
        shutdown_grace: Duration::from_secs(10),
        audit_sync,
        metrics: None,
        health_listen: None,
    }
}

async fn start_server(
    fake: &FakeServiceTitan,
    data_dir: &Path,
    key_text: &SecretString,
    audit_sync: SyncPolicy,
) -> Server {
    start_server_on(fake, data_dir, key_text, audit_sync, Storage::Sled).await
}

async fn start_server_on(
    fake: &FakeServiceTitan,
    data_dir: &Path,
    key_text: &SecretString,
    audit_sync: SyncPolicy,
    storage: Storage,
) -> Server {
    let opened = stvault::open(&config(fake, data_dir, key_text, audit_sync, storage))
        .await
        .expect("stvault opens a new data directory");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding 127.0.0.1:0 succeeds");
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let stopped = async {
            let _ = stop.await;
        };
        stvault::serve(opened, listener, stopped)
            .await
            .expect("the server runs until shutdown");
    });
    Server {
        addr,
        shutdown,
        task,
    }
}

async fn connect_channels(addr: SocketAddr) -> Vec<Channel> {
    let mut channels = Vec::new();
    for _ in 0..CHANNELS {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("a valid URI")
            .connect()
            .await
            .expect("the server accepts connections");
        channels.push(channel);
    }
    channels
}

fn client(channels: &[Channel], index: usize) -> VaultClient {
    VaultClient::new(channels[index % channels.len()].clone())
}

async fn register(client: &VaultClient, app: &FakeApp) -> String {
    let request = pb::RegisterConnectionRequest {
        environment: pb::Environment::Production as i32,
        tenant_id: app.tenant_id,
        client_id: app.client_id.clone(),
        client_secret: app.client_secrets[0].clone(),
        app_key: app.app_key.clone(),
        display_name: format!("tenant {}", app.tenant_id),
        // Verification would add a token request per connection, and the
        // cold storm counts them.
        skip_verification: true,
        ..Default::default()
    };
    client
        .clone()
        .register_connection(request)
        .await
        .expect("registration succeeds")
        .into_inner()
        .connection_id
}

/// Registers every app, `REGISTER_CONCURRENCY` at a time, returning the
/// connection ids in the order of `apps`.
async fn register_all(channels: &[Channel], apps: &[FakeApp]) -> Vec<String> {
    let apps = Arc::new(apps.to_vec());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..REGISTER_CONCURRENCY)
        .map(|worker| {
            let client = client(channels, worker);
            let apps = apps.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let mut done = Vec::new();
                loop {
                    let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(app) = apps.get(index) else {
                        return done;
                    };
                    done.push((index, register(&client, app).await));
                }
            })
        })
        .collect();
    let mut ids = vec![String::new(); apps.len()];
    for worker in workers {
        for (index, id) in worker.await.expect("the worker does not panic") {
            ids[index] = id;
        }
    }
    ids
}

async fn get_token(client: &VaultClient, connection_id: &str) -> Result<(), tonic::Status> {
    let request = pb::GetAccessTokenRequest {
        connection_id: connection_id.to_owned(),
        ..Default::default()
    };
    client.clone().get_access_token(request).await.map(|_| ())
}

// === throughput and latency ===

struct Measurement {
    calls: usize,
    failures: usize,
    elapsed: Duration,
    /// Sorted latencies of every measured call.
    latencies: Vec<Duration>,
    /// Calls made, warm-up included.
    all_calls: usize,
}

impl Measurement {
    fn rate(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, quantile: f64) -> Duration {
        let index = ((self.latencies.len() as f64 - 1.0) * quantile).round() as usize;
        self.latencies[index]
    }
}

/// Runs `call` from `concurrency` tasks in a closed loop: a warm-up, then
/// `MEASURE_FOR` of counted calls.
async fn measure<F, Fut>(channels: &[Channel], concurrency: usize, call: F) -> Measurement
where
    F: Fn(Channel) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let warm_up_until = Instant::now() + MEASURE_FOR / 10;
    let until = warm_up_until + MEASURE_FOR;
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let channel = channels[worker % channels.len()].clone();
            let call = call.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut failures = 0;
                let mut all_calls = 0;
                loop {
                    let started = Instant::now();
                    if started >= until {
                        return (latencies, failures, all_calls);
                    }
                    let ok = call(channel.clone()).await;
                    all_calls += 1;
                    if started < warm_up_until {
                        continue;
                    }
                    latencies.push(started.elapsed());
                    if !ok {
                        failures += 1;
                    }
                }
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut failures = 0;
    let mut all_calls = 0;
    for worker in workers {
        let (worker_latencies, worker_failures, worker_calls) =
            worker.await.expect("the worker does not panic");
        latencies.extend(worker_latencies);
        failures += worker_failures;
        all_calls += worker_calls;
    }
    latencies.sort_unstable();
    Measurement {
        calls: latencies.len(),
        failures,
        elapsed: MEASURE_FOR,
        latencies,
        all_calls,
    }
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1_000_000.0
}

/// Divides the server's CPU time over a measurement by the calls made.
fn cpu_per_call(cpu: Duration, measurement: &Measurement) -> Duration {
    cpu / measurement.all_calls.max(1) as u32
}

fn millis(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
}

// === the 100,000-connection store and startup ===

/// Writes `count` sealed connection records, as `RegisterConnection` would
/// store them, through `Store::insert_batch` with a single flush.
async fn build_store(data_dir: &Path, key_text: &SecretString, count: usize) {
    let master_key = MasterKey::from_base64(key_text.expose()).expect("a generated key parses");
    std::fs::create_dir_all(data_dir).expect("the data directory can be created");
    let store = Store::open(data_dir).expect("a new store opens");
    store
        .put_check_value(master_key.id(), &master_key.seal_check_value())
        .await
        .expect("a new store records the key");
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..count {
        let new = NewConnection {
            environment: Environment::Production,
            tenant_id: FIRST_TENANT * 10 + i as i64,
            client_id: format!("cid.stored.{i}"),
            client_secret: SecretString::new(format!("cs1.stored.{i}")),
            app_key: SecretString::new(format!("ak1.stored.{i}")),
            display_name: format!("stored tenant {i}"),
            labels: Default::default(),
            enterprise_hub: false,
            required_scope_groups: Vec::new(),
            skip_verification: true,
        };
        // Sealed exactly as RegisterConnection seals it.
        batch.push(new_record(
            &master_key,
            uuid::Uuid::now_v7().to_string(),
            &new,
            "benchmark",
        ));
        if batch.len() == batch.capacity() || i + 1 == count {
            store
                .insert_batch(&batch)
                .await
                .expect("records insert into a new store");
            batch.clear();
        }
    }
    assert_eq!(store.len().await.unwrap(), count);
}

/// Times `SYNC_SAMPLES` appends of an audit-sized line to a file, each
/// followed by `fdatasync`: the least a durable audit event can cost on
/// this disk.
fn measure_sync(path: &Path) -> Measurement {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("the probe file can be created");
    let line = [b'x'; 300];
    let mut latencies = Vec::with_capacity(SYNC_SAMPLES);
    for _ in 0..SYNC_SAMPLES {
        let started = Instant::now();
        file.write_all(&line)
            .expect("the probe file can be written");
        file.sync_data().expect("the probe file can be synced");
        latencies.push(started.elapsed());
    }
    latencies.sort();
    Measurement {
        calls: SYNC_SAMPLES,
        failures: 0,
        elapsed: latencies.iter().sum(),
        latencies,
        all_calls: SYNC_SAMPLES,
    }
}

/// A `stvault serve` process on loopback, killed when dropped.
struct ServerProcess {
    addr: SocketAddr,
    child: std::process::Child,
    /// From spawn until Health/Check first returned SERVING.
    startup: Duration,
}

impl ServerProcess {
    /// Spawns the real binary on `data_dir` with the fake ServiceTitan's
    /// endpoints, default settings otherwise (logs at the default level,
    /// discarded) and `env`, and returns once its Health/Check returns
    /// SERVING.
    async fn start(
        fake: &FakeServiceTitan,
        data_dir: &Path,
        key_text: &SecretString,
        env: &[(&str, &str)],
    ) -> Self {
        let addr = free_loopback_addr();
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_stvault"));
        child
            .arg("serve")
            .env_remove("RUST_LOG")
            .env("STVAULT_LISTEN", addr.to_string())
            .env("STVAULT_DATA_DIR", data_dir)
            .env("STVAULT_MASTER_KEY", key_text.expose())
            .env("STVAULT_PRODUCTION_TOKEN_URL", fake.token_url())
            .env("STVAULT_PRODUCTION_API_URL", fake.api_url())
            .env("STVAULT_INTEGRATION_TOKEN_URL", fake.token_url())
            .env("STVAULT_INTEGRATION_API_URL", fake.api_url())
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut server = Self {
            addr,
            child: child.spawn().expect("the stvault binary starts"),
            startup: Duration::ZERO,
        };
        let deadline = started + Duration::from_secs(60);
        loop {
            assert!(
                Instant::now() < deadline,
                "stvault did not start within 60 s"
            );
            if let Some(status) = server.child.try_wait().expect("the child can be polled") {
                panic!("stvault exited during startup: {status}");
            }
            if serving(addr).await {
                server.startup = started.elapsed();
                return server;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// User and system CPU time the process has used, its exited threads'
    /// included.
    fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("the child's stat is readable");
        // The command name, in parentheses, may contain spaces. Fields after
        // it are numbered from 3, so utime (14) and stime (15) are the 12th
        // and 13th after it.
        let after_name = &stat[stat.rfind(')').expect("stat names the command") + 2..];
        let mut fields = after_name.split(' ').skip(11);
        let mut ticks = || -> u64 {
            fields
                .next()
                .and_then(|field| field.parse().ok())
                .expect("stat has utime and stime")
        };
        // Counted in USER_HZ ticks, 100 a second on Linux.
        Duration::from_millis((ticks() + ticks()) * 10)
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the child's status is readable");
        status_field(&status, "VmRSS")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the real `stvault serve` binary on `data_dir`, and returns the time
/// until its Health/Check returns SERVING and its RSS at that point.
async fn measure_startup(
    fake: &FakeServiceTitan,
    data_dir: &Path,
    key_text: &SecretString,
) -> (Duration, u64) {
    let server = ServerProcess::start(fake, data_dir, key_text, &[]).await;
    (server.startup, server.rss_kib())
}

async fn serving(addr: SocketAddr) -> bool {
    let Ok(channel) = Channel::from_shared(format!("http://{addr}"))
        .expect("a valid URI")
        .connect()
        .await
    else {
        return false;
    };
    let request = HealthCheckRequest {
        service: String::new(),
    };
    HealthClient::new(channel).check(request).await.is_ok()
}

fn free_loopback_addr() -> SocketAddr {
    // The port is free once the listener is dropped; another process could
    // take it before stvault binds, which would fail the run loudly.
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0 succeeds");
    listener
        .local_addr()
        .expect("a bound listener has an address")
}

// === machine and memory ===

fn rss_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status exists");
    status_field(&status, field)
}

fn status_field(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Resets the peak RSS (VmHWM) to the current RSS, so the cold storm's peak
/// is its own. Linux supports this since 4.0.
fn reset_peak_rss() {
    if std::fs::write("/proc/self/clear_refs", "5").is_err() {
        println!("note: cannot reset the peak RSS; the peak covers the whole run");
    }
}

fn machine_summary() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|value| value.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gib = status_field(&meminfo, "MemTotal") as f64 / (1024.0 * 1024.0);
    format!("{cores} cores of {model}, {memory_gib:.0} GiB memory")
}
