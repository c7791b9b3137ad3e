//! The token broker under load and upstream trouble.
//!
//! Two layers. Tests about expiry or long waits (refresh ahead of expiry,
//! short lifetimes, a 30-second `Retry-After`, a token served through an
//! outage) drive `Broker` directly with paused tokio time and a scripted
//! token source. Over HTTP, reqwest's timeouts and the fake's sleeps would
//! run on the paused clock, and auto-advance would fire them early.
//! Tests whose point is the wire (single flight under 500 concurrent gRPC
//! calls, statuses and their details, a hanging HTTP endpoint, isolation of
//! tenants) run the real server against the fake ServiceTitan on real time,
//! with short delays and timeouts, on sled and on PostgreSQL.

mod support;

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::future::BoxFuture;
use stvault::broker::{Broker, BrokerSettings, Credentials, Slot, TokenSource};
use stvault::config::{Config, MasterKeySource, Storage};
use stvault::crypto::MasterKey;
use stvault::health::HealthSettings;
use stvault::model::Environment;
use stvault::pb;
use stvault::pb::credential_vault_client::CredentialVaultClient;
use stvault::secret::SecretString;
use stvault::servicetitan::{
    ClientConfig, Endpoints, IssuedToken, ServiceTitanClient, TokenClaims, TokenError,
};
use support::backend::{Backend, Database, contains};
use support::fake_servicetitan::{FakeApp, FakeServiceTitan, Fault};
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

const COOLDOWN: Duration = Duration::from_secs(2);

// === scripted token source, for paused time ===

/// A token source whose responses a test scripts. Its delay runs on tokio's
/// clock, so paused time advances through it.
struct ScriptedSource {
    requests: AtomicUsize,
    script: Mutex<Script>,
}

struct Script {
    lifetime: Duration,
    delay: Duration,
    /// Errors returned by the next requests, in order, before `failing`.
    next_errors: VecDeque<TokenError>,
    /// Error returned by every request once `next_errors` is empty.
    failing: Option<TokenError>,
}

impl ScriptedSource {
    fn new(lifetime: Duration, delay: Duration) -> Arc<ScriptedSource> {
        Arc::new(ScriptedSource {
            requests: AtomicUsize::new(0),
            script: Mutex::new(Script {
                lifetime,
                delay,
                next_errors: VecDeque::new(),
                failing: None,
            }),
        })
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn fail_next(&self, error: TokenError) {
        self.script.lock().unwrap().next_errors.push_back(error);
    }

    fn set_failing(&self, error: Option<TokenError>) {
        self.script.lock().unwrap().failing = error;
    }

    fn set_delay(&self, delay: Duration) {
        self.script.lock().unwrap().delay = delay;
    }
}

impl TokenSource for ScriptedSource {
    fn request_token<'a>(
        &'a self,
        credentials: &'a Credentials,
        _need: Duration,
    ) -> BoxFuture<'a, Result<IssuedToken, TokenError>> {
        Box::pin(async move {
            let number = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
            let (delay, lifetime) = {
                let script = self.script.lock().unwrap();
                (script.delay, script.lifetime)
            };
            tokio::time::sleep(delay).await;
            let error = {
                let mut script = self.script.lock().unwrap();
                script.next_errors.pop_front().or(script.failing.clone())
            };
            if let Some(error) = error {
                return Err(error);
            }
            Ok(IssuedToken {
                access_token: SecretString::new(format!(
                    "token-{}-{number}",
                    credentials.connection_id
                )),
                token_type: "Bearer".to_owned(),
                expires_in: lifetime,
                age: Duration::ZERO,
                claims: TokenClaims::default(),
            })
        })
    }
}

fn unused_endpoints() -> Endpoints {
    let url = "http://127.0.0.1:9/connect/token".parse().unwrap();
    Endpoints {
        token_url: url,
        api_url: "http://127.0.0.1:9".parse().unwrap(),
    }
}

/// Builds a broker over `source`. Its HTTP client points at a closed
/// loopback port and is never used by these tests.
fn scripted_broker(source: Arc<ScriptedSource>) -> Arc<Broker> {
    let client = ServiceTitanClient::new(ClientConfig {
        production: unused_endpoints(),
        integration: unused_endpoints(),
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(1),
    })
    .unwrap();
    let settings = BrokerSettings {
        failure_cooldown: COOLDOWN,
    };
    Arc::new(Broker::with_token_source(client, source, settings))
}

fn install(broker: &Broker, connection_id: &str) -> Arc<Slot> {
    let credentials = Credentials {
        connection_id: connection_id.to_owned(),
        version: 1,
        environment: Environment::Production,
        tenant_id: 8450,
        client_id: "cid.scripted".to_owned(),
        client_secret: SecretString::new("cs1.scripted".to_owned()),
        app_key: SecretString::new("ak1.scripted".to_owned()),
        enterprise_hub: false,
        token_key: None,
    };
    broker
        .install(0, credentials)
        .expect("no concurrent change")
}

fn unavailable() -> TokenError {
    TokenError::Unavailable("HTTP 503".to_owned())
}

#[tokio::test(start_paused = true)]
async fn refresh_replaces_token_before_expiry() {
    let source = ScriptedSource::new(Duration::from_secs(900), Duration::from_millis(300));
    let broker = scripted_broker(source.clone());
    let slot = install(&broker, "conn-refresh");
    let min_valid_for = Duration::from_secs(60);

    let first = broker.token(&slot, min_valid_for).await.unwrap();
    let mut previous = first.access_token.expose().to_owned();
    let mut replacements = 0;
    // One call every 5 s for 50 simulated minutes, a little over three
    // token lifetimes.
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let sent = Instant::now();
        let token = broker.token(&slot, min_valid_for).await.unwrap();
        assert_eq!(sent.elapsed(), Duration::ZERO, "a caller waited");
        assert!(
            token.remaining(Instant::now()) >= min_valid_for,
            "token handed out with {:?} left",
            token.remaining(Instant::now())
        );
        if token.access_token.expose() != previous {
            replacements += 1;
            previous = token.access_token.expose().to_owned();
        }
    }
    // Refreshes at 70-80 % of 900 s: three or four in 3000 s.
    assert!(replacements >= 3, "{replacements} replacements");
    assert!(source.requests() <= 5, "{} requests", source.requests());
}

#[tokio::test(start_paused = true)]
async fn refresh_runs_in_background() {
    let source = ScriptedSource::new(Duration::from_secs(900), Duration::from_secs(5));
    let broker = scripted_broker(source.clone());
    let slot = install(&broker, "conn-background");
    let min_valid_for = Duration::from_secs(60);
    let first = broker.token(&slot, min_valid_for).await.unwrap();

    // Past the latest refresh point (80 %) the call returns the cached token
    // at once and starts the refresh.
    tokio::time::sleep(Duration::from_secs(721)).await;
    let during = broker.token(&slot, min_valid_for).await.unwrap();
    assert_eq!(during.access_token.expose(), first.access_token.expose());
    // Let the spawned refresh start.
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(source.requests(), 2);

    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = broker.token(&slot, min_valid_for).await.unwrap();
    assert_ne!(after.access_token.expose(), first.access_token.expose());
    assert_eq!(source.requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn short_lifetime_does_not_loop() {
    let source = ScriptedSource::new(Duration::from_secs(30), Duration::from_millis(100));
    let broker = scripted_broker(source.clone());
    let slot = install(&broker, "conn-short");
    // The default margin of 60 s is longer than the whole lifetime.
    let min_valid_for = Duration::from_secs(60);

    let mut calls = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(600) {
        let token = broker.token(&slot, min_valid_for).await.unwrap();
        assert!(!token.remaining(Instant::now()).is_zero());
        calls += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Each token is used until half its lifetime is left: about one request
    // every 15 s, 40 in 10 minutes, against one per call in a loop.
    assert!(calls > 2000, "{calls} calls");
    assert!(source.requests() <= 42, "{} requests", source.requests());
}

#[tokio::test(start_paused = true)]
async fn rate_limit_honours_retry_after() {
    let source = ScriptedSource::new(Duration::from_secs(900), Duration::from_millis(100));
    source.fail_next(TokenError::RateLimited {
        retry_after: Duration::from_secs(30),
    });
    let broker = scripted_broker(source.clone());
    let slot = install(&broker, "conn-limited");
    let min_valid_for = Duration::from_secs(60);

    let error = broker.token(&slot, min_valid_for).await.err().unwrap();
    assert!(
        matches!(error, TokenError::RateLimited { retry_after } if retry_after.as_secs() == 30)
    );
    // Calls during the wait get the error from memory, with the time left.
    for second in 1..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let sent = Instant::now();
        let error = broker.token(&slot, min_valid_for).await.err().unwrap();
        assert_eq!(sent.elapsed(), Duration::ZERO);
        let TokenError::RateLimited { retry_after } = error else {
            panic!("expected a rate limit, got {error}");
        };
        assert!(retry_after.as_secs() <= 30 - second + 1, "{retry_after:?}");
    }
    assert_eq!(source.requests(), 1);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    broker.token(&slot, min_valid_for).await.unwrap();
    assert_eq!(source.requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn failure_reaches_every_waiter_once() {
    let source = ScriptedSource::new(Duration::from_secs(900), Duration::from_millis(300));
    source.fail_next(unavailable());
    let broker = scripted_broker(source.clone());
    let slot = install(&broker, "conn-fail-once");
    let min_valid_for = Duration::from_secs(60);

    let calls: Vec<_> = (0..50)
        .map(|_| {
            let broker = broker.clone();
            let slot = slot.clone();
            tokio::spawn(async move { broker.token(&slot, min_valid_for).await })
        })
        .collect();
    for call in calls {
        let error = call.await.unwrap().err().unwrap();
        assert!(matches!(error, TokenError::Unavailable(_)), "{error}");
    }
    assert_eq!(source.requests(), 1);

    // Within the cooldown the error comes from memory.
    let error = broker.token(&slot, min_valid_for).await.err().unwrap();
    assert!(matches!(error, TokenError::Unavailable(_)));
    assert_eq!(source.requests(), 1);

    tokio::time::sleep(COOLDOWN).await;
    broker.token(&slot, min_valid_for).await.unwrap();
    assert_eq!(source.requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn valid_token_served_through_outage() {
    let source = ScriptedSource::new(Duration::from_secs(900), Duration::from_millis(100));
    let broker = scripted_broker(source.clone());
    let slot = install(&broker, "conn-outage");
    let min_valid_for = Duration::from_secs(60);
    let cached = broker.token(&slot, min_valid_for).await.unwrap();
    source.set_failing(Some(unavailable()));

    // Through the refresh window and into the last minute of the token's
    // life, callers keep the cached token while the refresh keeps failing.
    let mut now = Duration::ZERO;
    while now < Duration::from_secs(895) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        now += Duration::from_secs(5);
        let token = broker.token(&slot, min_valid_for).await.unwrap();
        assert_eq!(token.access_token.expose(), cached.access_token.expose());
    }
    // One request per cooldown at most, not one per call.
    let failed = source.requests() - 1;
    assert!((1..=100).contains(&failed), "{failed} failed requests");

    tokio::time::sleep(Duration::from_secs(10)).await;
    let error = broker.token(&slot, min_valid_for).await.err().unwrap();
    assert!(matches!(error, TokenError::Unavailable(_)), "{error}");

    source.set_failing(None);
    tokio::time::sleep(COOLDOWN).await;
    let fresh = broker.token(&slot, min_valid_for).await.unwrap();
    assert_ne!(fresh.access_token.expose(), cached.access_token.expose());
}

#[tokio::test(start_paused = true)]
async fn hanging_refresh_serves_unexpired_token() {
    let source = ScriptedSource::new(Duration::from_secs(900), Duration::ZERO);
    let broker = scripted_broker(source.clone());
    let slot = install(&broker, "conn-hanging-refresh");
    let min_valid_for = Duration::from_secs(60);
    let cached = broker.token(&slot, min_valid_for).await.unwrap();

    // 50 s before expiry, less than callers ask for, ServiceTitan hangs.
    tokio::time::sleep(Duration::from_secs(850)).await;
    source.set_delay(Duration::from_secs(3600));
    let sent = Instant::now();
    let first = broker.token(&slot, min_valid_for).await.unwrap();
    let first_wait = sent.elapsed();

    // A later caller finds the request already past its patience.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let sent = Instant::now();
    let later = broker.token(&slot, min_valid_for).await.unwrap();
    let later_wait = sent.elapsed();

    assert_eq!(first.access_token.expose(), cached.access_token.expose());
    assert_eq!(later.access_token.expose(), cached.access_token.expose());
    assert_eq!(first_wait, Duration::from_secs(2));
    assert_eq!(later_wait, Duration::ZERO);
    assert_eq!(source.requests(), 2, "callers share the hanging request");
}

// === the real server against the fake ServiceTitan, on real time ===

backend_tests!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    cold_callers_share_one_request,
    failed_request_reaches_waiters_then_retries,
    rate_limit_returns_retry_info,
    hanging_endpoint_is_bounded,
    shared_credentials_keep_tokens_apart,
    other_tenant_token_rejected,
    hanging_refresh_within_deadline,
    tokens_never_reach_disk,
    concurrent_registrations_finish,
);

struct Server {
    addr: std::net::SocketAddr,
    client: CredentialVaultClient<Channel>,
    data_dir: tempfile::TempDir,
    database: Option<Database>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Starts stvault on `backend` with production on `production` and
    /// integration on `integration`, both loopback fakes.
    async fn start(
        backend: Backend,
        production: &FakeServiceTitan,
        integration: &FakeServiceTitan,
        upstream_timeout: Duration,
        cooldown: Duration,
    ) -> Server {
        let data_dir = tempfile::tempdir().unwrap();
        let endpoints = |fake: &FakeServiceTitan| Endpoints {
            token_url: fake.token_url().parse().unwrap(),
            api_url: fake.api_url().parse().unwrap(),
        };
        let (_, key_text) = MasterKey::generate();
        let database = match backend {
            Backend::Sled => None,
            Backend::Postgres => Some(Database::create().await),
        };
        let storage = database.as_ref().map_or(Storage::Sled, Database::storage);
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: data_dir.path().to_owned(),
            storage,
            master_key: MasterKeySource::Environment(key_text),
            client: ClientConfig {
                production: endpoints(production),
                integration: endpoints(integration),
                connect_timeout: upstream_timeout,
                request_timeout: upstream_timeout,
            },
            broker: BrokerSettings {
                failure_cooldown: cooldown,
            },
            health: HealthSettings {
                interval: None,
                concurrency: 1,
            },
            tls: None,
            policy: None,
            shutdown_grace: Duration::from_secs(10),
            audit_sync: Default::default(),
            metrics: None,
            health_listen: None,
        };
        let opened = stvault::open(&config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            stvault::serve(opened, listener, async {
                let _ = stop.await;
            })
            .await
            .unwrap();
        });
        let client = CredentialVaultClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        Server {
            addr,
            client,
            data_dir,
            database,
            shutdown: Some(shutdown),
            task,
        }
    }

    /// Starts stvault with a 5-second upstream timeout and the default
    /// failure cooldown.
    async fn start_default(
        backend: Backend,
        production: &FakeServiceTitan,
        integration: &FakeServiceTitan,
    ) -> Server {
        Self::start(
            backend,
            production,
            integration,
            Duration::from_secs(5),
            COOLDOWN,
        )
        .await
    }

    /// Opens a client on a connection of its own.
    async fn connect(&self) -> CredentialVaultClient<Channel> {
        CredentialVaultClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    async fn register(&self, environment: Environment, app: &FakeApp, hub: bool) -> String {
        let environment = match environment {
            Environment::Production => pb::Environment::Production,
            Environment::Integration => pb::Environment::Integration,
        };
        let request = pb::RegisterConnectionRequest {
            environment: environment as i32,
            tenant_id: app.tenant_id,
            client_id: app.client_id.clone(),
            client_secret: app.client_secrets[0].clone(),
            app_key: app.app_key.clone(),
            // Verification would request a token, and these tests count them.
            skip_verification: true,
            enterprise_hub: hub,
            ..Default::default()
        };
        let connection = self
            .client
            .clone()
            .register_connection(request)
            .await
            .unwrap();
        connection.into_inner().connection_id
    }

    /// Stops the server and returns its data directory and database.
    async fn stop(mut self) -> (tempfile::TempDir, Option<Database>) {
        let _ = self.shutdown.take().unwrap().send(());
        self.task.await.unwrap();
        (self.data_dir, self.database)
    }
}

async fn get_token(
    client: &CredentialVaultClient<Channel>,
    connection_id: &str,
) -> Result<pb::AccessToken, tonic::Status> {
    let request = pb::GetAccessTokenRequest {
        connection_id: connection_id.to_owned(),
        ..Default::default()
    };
    client
        .clone()
        .get_access_token(request)
        .await
        .map(|r| r.into_inner())
}

fn jwt_tenant(token: &str) -> String {
    let payload = token.split('.').nth(1).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    claims["tenant"].as_str().unwrap().to_owned()
}

async fn fakes_with_apps() -> (FakeServiceTitan, FakeServiceTitan, FakeApp, FakeApp) {
    let production = FakeServiceTitan::start().await;
    let integration = FakeServiceTitan::start().await;
    let slow = FakeApp::new("cid.slow", "cs1.slow", 1001, "ak1.slow");
    let fast = FakeApp::new("cid.fast", "cs1.fast", 2002, "ak1.fast");
    production.add_app(slow.clone());
    integration.add_app(fast.clone());
    (production, integration, slow, fast)
}

async fn cold_callers_share_one_request(backend: Backend) {
    let (production, integration, slow, fast) = fakes_with_apps().await;
    production.set_token_delay(Duration::from_millis(300));
    let server = Server::start_default(backend, &production, &integration).await;
    let slow_id = server.register(Environment::Production, &slow, false).await;
    let fast_id = server
        .register(Environment::Integration, &fast, false)
        .await;

    let calls: Vec<_> = (0..500)
        .map(|_| {
            let client = server.client.clone();
            let id = slow_id.clone();
            tokio::spawn(async move { get_token(&client, &id).await })
        })
        .collect();

    // Another tenant, cold too, is served while the first one waits. It has
    // its own HTTP/2 connection, because the 500 calls may fill the shared
    // one's stream limit.
    let other_client = server.connect().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let sent = std::time::Instant::now();
    get_token(&other_client, &fast_id).await.unwrap();
    let other_tenant = sent.elapsed();
    // Served while the first tenant's callers still wait for their token.
    let waiting = calls.iter().filter(|call| !call.is_finished()).count();
    assert!(
        waiting > 0,
        "other tenant took {other_tenant:?}, after the slow calls finished"
    );

    let mut tokens = HashSet::new();
    for call in calls {
        tokens.insert(call.await.unwrap().unwrap().access_token);
    }
    assert_eq!(tokens.len(), 1);
    assert_eq!(production.token_requests(), 1);
    assert_eq!(integration.token_requests(), 1);
    server.stop().await;
}

async fn failed_request_reaches_waiters_then_retries(backend: Backend) {
    let (production, integration, slow, _) = fakes_with_apps().await;
    production.set_token_delay(Duration::from_millis(300));
    production.set_token_fault(Fault::FailOnce(503));
    let cooldown = Duration::from_millis(500);
    let server = Server::start(
        backend,
        &production,
        &integration,
        Duration::from_secs(5),
        cooldown,
    )
    .await;
    let id = server.register(Environment::Production, &slow, false).await;

    let calls: Vec<_> = (0..20)
        .map(|_| {
            let client = server.client.clone();
            let id = id.clone();
            tokio::spawn(async move { get_token(&client, &id).await })
        })
        .collect();
    for call in calls {
        let status = call.await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    assert_eq!(production.token_requests(), 1);

    // During the cooldown the error is returned without a request.
    let status = get_token(&server.client, &id).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(production.token_requests(), 1);
    // The retry delay is what is left of the cooldown.
    let retry = status.get_details_retry_info().expect("RetryInfo detail");
    let delay = retry.retry_delay.expect("a retry delay");
    assert!(
        delay <= cooldown && delay > cooldown / 2,
        "{delay:?} of {cooldown:?}"
    );

    tokio::time::sleep(cooldown).await;
    get_token(&server.client, &id).await.unwrap();
    assert_eq!(production.token_requests(), 2);
    server.stop().await;
}

async fn rate_limit_returns_retry_info(backend: Backend) {
    let (production, integration, slow, _) = fakes_with_apps().await;
    production.set_token_fault(Fault::RateLimited {
        retry_after_secs: 30,
    });
    let server = Server::start_default(backend, &production, &integration).await;
    let id = server.register(Environment::Production, &slow, false).await;

    let status = get_token(&server.client, &id).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let retry = status.get_details_retry_info().expect("RetryInfo detail");
    assert_eq!(retry.retry_delay, Some(Duration::from_secs(30)));

    // Past the default cooldown the delay from ServiceTitan still holds.
    tokio::time::sleep(COOLDOWN + Duration::from_millis(200)).await;
    for _ in 0..20 {
        let sent = std::time::Instant::now();
        let status = get_token(&server.client, &id).await.unwrap_err();
        // Well under a request to ServiceTitan; the call still waits for
        // its audit event's flush.
        assert!(
            sent.elapsed() < Duration::from_secs(1),
            "{:?}",
            sent.elapsed()
        );
        assert_eq!(status.code(), Code::ResourceExhausted);
        let delay = status
            .get_details_retry_info()
            .unwrap()
            .retry_delay
            .unwrap();
        assert!(delay <= Duration::from_secs(28), "{delay:?}");
        assert!(delay >= Duration::from_secs(25), "{delay:?}");
    }
    assert_eq!(production.token_requests(), 1);
    server.stop().await;
}

async fn hanging_endpoint_is_bounded(backend: Backend) {
    let (production, integration, slow, fast) = fakes_with_apps().await;
    production.set_token_fault(Fault::Hang);
    let timeout = Duration::from_secs(1);
    let server = Server::start(backend, &production, &integration, timeout, COOLDOWN).await;
    let slow_id = server.register(Environment::Production, &slow, false).await;
    let fast_id = server
        .register(Environment::Integration, &fast, false)
        .await;

    let client = server.client.clone();
    let id = slow_id.clone();
    let hanging = tokio::spawn(async move {
        let sent = std::time::Instant::now();
        let status = get_token(&client, &id).await.unwrap_err();
        (status, sent.elapsed())
    });

    // The other tenant is served while the request hangs.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sent = std::time::Instant::now();
    get_token(&server.client, &fast_id).await.unwrap();
    // Shorter than the 1 s upstream timeout the hanging tenant waits for.
    assert!(
        sent.elapsed() < Duration::from_millis(900),
        "{:?}",
        sent.elapsed()
    );

    let (status, waited) = hanging.await.unwrap();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(waited >= timeout, "{waited:?}");
    assert!(waited < timeout + Duration::from_millis(1500), "{waited:?}");
    assert_eq!(production.token_requests(), 1);

    // A caller with a shorter deadline gets UNAVAILABLE before it passes.
    production.shutdown();
    let hanging_again = FakeServiceTitan::start().await;
    hanging_again.set_token_fault(Fault::Hang);
    let server2 = Server::start(backend, &hanging_again, &integration, timeout, COOLDOWN).await;
    let id = server2
        .register(Environment::Production, &slow, false)
        .await;
    let mut request = tonic::Request::new(pb::GetAccessTokenRequest {
        connection_id: id,
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(1000));
    let sent = std::time::Instant::now();
    let status = server2
        .client
        .clone()
        .get_access_token(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        sent.elapsed() < Duration::from_millis(1000),
        "{:?}",
        sent.elapsed()
    );
    hanging_again.shutdown();
    server2.stop().await;
    server.stop().await;
}

async fn shared_credentials_keep_tokens_apart(backend: Backend) {
    let production = FakeServiceTitan::start().await;
    let integration = FakeServiceTitan::start().await;
    // An Enterprise Hub client id shared by two tenants.
    let mut hub = FakeApp::new("cid.hub", "cs1.hub", 3001, "ak1.hub");
    hub.enterprise_hub_tenants = vec![3001, 3002];
    let mut hub_other = hub.clone();
    hub_other.tenant_id = 3002;
    // Two client ids of one app, sharing its app key.
    let first = FakeApp::new("cid.first", "cs1.first", 4001, "ak1.shared");
    let second = FakeApp::new("cid.second", "cs1.second", 4002, "ak1.shared");
    production.add_app(hub.clone());
    production.add_app(first.clone());
    production.add_app(second.clone());
    let server = Server::start_default(backend, &production, &integration).await;

    let cases = [
        (&hub, true),
        (&hub_other, true),
        (&first, false),
        (&second, false),
    ];
    let mut tokens = HashSet::new();
    for (app, hub) in cases {
        let id = server.register(Environment::Production, app, hub).await;
        for _ in 0..3 {
            let token = get_token(&server.client, &id).await.unwrap();
            assert_eq!(token.connection_id, id);
            assert_eq!(token.tenant_id, app.tenant_id);
            assert_eq!(token.app_key, app.app_key);
            assert_eq!(jwt_tenant(&token.access_token), app.tenant_id.to_string());
            tokens.insert(token.access_token);
        }
    }
    assert_eq!(tokens.len(), 4);
    assert_eq!(production.token_requests(), 4);
    server.stop().await;
}

async fn other_tenant_token_rejected(backend: Backend) {
    let (production, integration, slow, _) = fakes_with_apps().await;
    // The app is connected to tenant 1001, and its credentials are
    // registered, unverified, for tenant 9009.
    let mut misplaced = slow.clone();
    misplaced.tenant_id = 9009;
    let server = Server::start_default(backend, &production, &integration).await;
    let id = server
        .register(Environment::Production, &misplaced, false)
        .await;

    let status = get_token(&server.client, &id).await.unwrap_err();
    let again = get_token(&server.client, &id).await.unwrap_err();

    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status
            .message()
            .contains("issued this connection's token for another tenant"),
        "{status:?}"
    );
    assert!(status.message().contains("tenant 9009"), "{status:?}");
    assert!(!status.message().contains("1001"), "{status:?}");
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
    assert_eq!(
        production.token_requests(),
        1,
        "the refusal is kept for the cooldown"
    );
    server.stop().await;
}

async fn hanging_refresh_within_deadline(backend: Backend) {
    let (production, integration, slow, _) = fakes_with_apps().await;
    production.set_token_lifetime(4);
    let server = Server::start_default(backend, &production, &integration).await;
    let id = server.register(Environment::Production, &slow, false).await;
    let cached = get_token(&server.client, &id).await.unwrap();

    // Past half the lifetime, the cached token no longer covers the
    // default `min_valid_for`, and ServiceTitan hangs.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    production.set_token_fault(Fault::Hang);
    let mut request = tonic::Request::new(pb::GetAccessTokenRequest {
        connection_id: id.clone(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(1));
    let sent = std::time::Instant::now();
    let token = server.client.clone().get_access_token(request).await;
    let waited = sent.elapsed();

    let token = token.expect("the unexpired token").into_inner();
    assert_eq!(token.access_token, cached.access_token);
    assert!(waited < Duration::from_secs(1), "{waited:?}");
    assert_eq!(production.token_requests(), 2);
    server.stop().await;
}

async fn tokens_never_reach_disk(backend: Backend) {
    let (production, integration, slow, _) = fakes_with_apps().await;
    let server = Server::start_default(backend, &production, &integration).await;
    let id = server.register(Environment::Production, &slow, false).await;
    let token = get_token(&server.client, &id).await.unwrap().access_token;
    let (data_dir, database) = server.stop().await;

    let signature = token.rsplit('.').next().unwrap().to_owned();
    let mut files = 0;
    for path in files_under(data_dir.path()) {
        let bytes = std::fs::read(&path).unwrap();
        files += 1;
        for needle in [token.as_bytes(), signature.as_bytes()] {
            let found = bytes.windows(needle.len()).any(|w| w == needle);
            assert!(!found, "token found in {}", path.display());
        }
    }
    assert!(files > 0);
    if let Some(database) = database {
        let dump = database.dump();
        for needle in [&token, &signature] {
            assert!(!contains(&dump, needle), "token found in the database dump");
        }
    }
}

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

async fn concurrent_registrations_finish(backend: Backend) {
    let production = FakeServiceTitan::start().await;
    let integration = FakeServiceTitan::start().await;
    let server = Server::start_default(backend, &production, &integration).await;
    let server = Arc::new(server);

    // Durable writes from many callers at once once deadlocked sled (a
    // transaction against concurrent flushes) within a few thousand writes.
    let workers: Vec<_> = (0..64)
        .map(|worker| {
            let server = server.clone();
            tokio::spawn(async move {
                for i in 0..40 {
                    let tenant = 10_000 + worker * 100 + i;
                    let app =
                        FakeApp::new(format!("cid.{tenant}"), "cs1.secret", tenant, "ak1.key");
                    server.register(Environment::Production, &app, false).await;
                }
            })
        })
        .collect();
    // A deadlock blocks the runtime's threads, so a tokio timeout would
    // never fire: a plain thread ends the process instead.
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watched = finished.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(120));
        if !watched.load(Ordering::SeqCst) {
            eprintln!("concurrent registrations did not finish in 120 s: deadlock");
            std::process::exit(1);
        }
    });
    for worker in futures::future::join_all(workers).await {
        worker.unwrap();
    }
    finished.store(true, Ordering::SeqCst);
}
