//! Token broker: one cached ServiceTitan access token per connection and
//! credential version, refreshed ahead of expiry, with at most one upstream
//! request in flight per connection however many callers wait.
//!
//! Expiry is tracked on the monotonic clock (`tokio::time::Instant`), so a
//! wall-clock step neither expires a token early nor keeps a dead one alive.
//! No lock is held across an upstream call, and tokens live in memory only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use rand::Rng;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

mod shared;

pub use shared::SharedTokens;

use crate::crypto::DataKey;
use crate::model::Environment;
use crate::secret::SecretString;
use crate::servicetitan::{IssuedToken, ServiceTitanClient, TokenClaims, TokenError, TokenRequest};

/// Share of a token's lifetime after which it is refreshed in the background.
const REFRESH_FRACTION: f64 = 0.75;
/// Random spread around `REFRESH_FRACTION`, so connections registered
/// together do not refresh together.
const REFRESH_JITTER: f64 = 0.05;
/// Token requests in flight at once per environment. Each environment has
/// its own token endpoint, so a hanging one does not hold the other's
/// permits. This bounds the sockets a cold start opens and keeps a burst of
/// new connections from stampeding ServiceTitan, which throttles token
/// requests without publishing the limit.
pub const MAX_CONCURRENT_TOKEN_REQUESTS: usize = 64;

/// Source of new tokens: ServiceTitan in production, a scripted source in
/// tests that need paused time.
pub trait TokenSource: Send + Sync + 'static {
    /// Requests an access token for `credentials`. `need` is the time left
    /// that the call which started the request asked for (zero for a
    /// background refresh). A source that keeps tokens already issued
    /// returns one only if it has that much left, capped at half its
    /// lifetime as `CachedToken::satisfies` caps it.
    fn request_token<'a>(
        &'a self,
        credentials: &'a Credentials,
        need: Duration,
    ) -> BoxFuture<'a, Result<IssuedToken, TokenError>>;
}

impl TokenSource for ServiceTitanClient {
    fn request_token<'a>(
        &'a self,
        credentials: &'a Credentials,
        _need: Duration,
    ) -> BoxFuture<'a, Result<IssuedToken, TokenError>> {
        Box::pin(async move {
            let started = Instant::now();
            // Checked here, before a shared token source stores the token
            // for other servers.
            let result = ServiceTitanClient::request_token(self, &credentials.token_request())
                .await
                .and_then(|issued| for_connection_tenant(credentials, issued));
            crate::metrics::record_upstream_token(
                credentials.environment,
                credentials.tenant_id,
                &result,
                started.elapsed(),
            );
            result
        })
    }
}

/// Decrypted credentials of one connection at one credential version. They
/// live in memory only, for as long as the connection's cache entry does.
pub struct Credentials {
    pub connection_id: String,
    pub version: u32,
    pub environment: Environment,
    pub tenant_id: i64,
    pub client_id: String,
    pub client_secret: SecretString,
    pub app_key: SecretString,
    /// Enterprise Hub credentials name the tenant in the token request.
    pub enterprise_hub: bool,
    /// The connection's data key, which seals the tokens that replicas
    /// share through the database. `None` for credentials that are only
    /// verified, never cached.
    pub token_key: Option<DataKey>,
}

impl Credentials {
    fn token_request(&self) -> TokenRequest<'_> {
        TokenRequest {
            environment: self.environment,
            client_id: &self.client_id,
            client_secret: &self.client_secret,
            tenant: self.enterprise_hub.then_some(self.tenant_id),
        }
    }
}

/// A token in the cache.
pub struct CachedToken {
    pub access_token: SecretString,
    pub token_type: String,
    pub expires_at: Instant,
    /// Wall-clock expiry reported to callers, computed once when issued.
    pub expires_at_wall: SystemTime,
    pub lifetime: Duration,
    pub claims: TokenClaims,
    refresh_at: Instant,
}

impl CachedToken {
    /// Builds a cache entry for a token requested at `requested` (monotonic)
    /// and `requested_wall`, so its expiry errs on the early side by the
    /// request's duration. The lifetime and refresh time count from when
    /// ServiceTitan issued the token, which is earlier for a token another
    /// replica stored.
    fn from_issued(issued: IssuedToken, requested: Instant, requested_wall: SystemTime) -> Self {
        let jitter = rand::thread_rng().gen_range(-REFRESH_JITTER..=REFRESH_JITTER);
        let lifetime = issued.expires_in + issued.age;
        let refresh_after = lifetime
            .mul_f64(REFRESH_FRACTION + jitter)
            .saturating_sub(issued.age);
        Self {
            expires_at: requested + issued.expires_in,
            expires_at_wall: requested_wall + issued.expires_in,
            refresh_at: requested + refresh_after,
            lifetime,
            access_token: issued.access_token,
            token_type: issued.token_type,
            claims: issued.claims,
        }
    }

    /// Returns whether the token may be handed out to a caller asking for
    /// `min_valid_for`. A token whose whole lifetime is shorter than twice
    /// that is accepted with half its lifetime left, so short-lived tokens are
    /// reused rather than fetched on every call.
    fn satisfies(&self, min_valid_for: Duration, now: Instant) -> bool {
        let required = min_valid_for.min(self.lifetime / 2);
        self.remaining(now) >= required.max(Duration::from_millis(1))
    }

    /// Returns the time left before the token expires, zero once it has.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires_at.saturating_duration_since(now)
    }

    fn is_expired(&self, now: Instant) -> bool {
        self.remaining(now).is_zero()
    }

    /// Returns when the next background refresh is due.
    pub fn refresh_at(&self) -> Instant {
        self.refresh_at
    }
}

#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// How long callers get the stored error of a failed token request
    /// before the next caller tries ServiceTitan again.
    pub failure_cooldown: Duration,
}

type FetchResult = Result<Arc<CachedToken>, TokenError>;

/// Token lifetimes below this are logged once per connection and credential
/// version. ServiceTitan documents 900 s.
const SHORT_LIFETIME: Duration = Duration::from_secs(60);

/// Time after a token request starts at which its waiters stop waiting and
/// get the cached token, if that has not expired. An estimate: ServiceTitan
/// usually issues a token in under a second.
const STALE_TOKEN_PATIENCE: Duration = Duration::from_secs(2);

/// The cache entry of one connection at one credential version.
pub struct Slot {
    pub credentials: Credentials,
    state: Mutex<SlotState>,
    /// Set once a short token lifetime has been logged for this entry.
    short_lifetime_logged: AtomicBool,
}

#[derive(Default)]
struct SlotState {
    token: Option<Arc<CachedToken>>,
    inflight: Option<watch::Receiver<Option<FetchResult>>>,
    /// When the request in flight, or the last one, started, its wait for a
    /// permit or for another server's lease included.
    inflight_since: Option<Instant>,
    cooldown: Option<Cooldown>,
}

/// A failed token request, whose error is returned from memory until `until`.
struct Cooldown {
    until: Instant,
    error: TokenError,
}

impl Cooldown {
    /// Returns the error for a caller at `now`; a rate limit reports the wait
    /// still left rather than the one ServiceTitan named.
    fn error_at(&self, now: Instant) -> TokenError {
        match self.error {
            TokenError::RateLimited { .. } => {
                let left = self.until.saturating_duration_since(now);
                TokenError::RateLimited {
                    retry_after: Duration::from_secs(left.as_secs_f64().ceil().max(1.0) as u64),
                }
            }
            ref other => other.clone(),
        }
    }
}

impl Slot {
    /// Returns the cached token unless it has expired, and the time until
    /// which a caller that needs a newer one waits for the request in flight.
    fn fallback(&self, now: Instant) -> Option<(Arc<CachedToken>, Instant)> {
        let state = self.state.lock().expect("slot lock is never poisoned");
        let token = state.token.clone().filter(|token| !token.is_expired(now))?;
        let sent = state.inflight_since.unwrap_or(now);
        let until = (sent + STALE_TOKEN_PATIENCE).min(token.expires_at);
        Some((token, until))
    }

    /// Returns the cached token unless it has expired, whatever its margin.
    pub fn unexpired_token(&self, now: Instant) -> Option<Arc<CachedToken>> {
        let state = self.state.lock().expect("slot lock is never poisoned");
        state.token.clone().filter(|token| !token.is_expired(now))
    }
}

/// Result of a cache lookup: a token or error now, or a request to wait on.
enum Lookup {
    Ready(FetchResult),
    Wait(watch::Receiver<Option<FetchResult>>),
}

/// The broker's cache entries, indexed by connection id and by tenant.
#[derive(Default)]
struct Entries {
    by_connection: HashMap<String, Entry>,
    /// Connection id of the installed slot of each environment and tenant,
    /// so a token request that names a tenant finds its slot without the
    /// database. Each value names a connection whose entry has a slot of
    /// that tenant.
    by_tenant: HashMap<(Environment, i64), String>,
}

impl Entries {
    /// Drops the slot of `entry` and its tenant index entry, if the index
    /// still points at this connection.
    fn drop_slot(by_tenant: &mut HashMap<(Environment, i64), String>, entry: &mut Entry) {
        let Some(slot) = entry.slot.take() else {
            return;
        };
        let credentials = &slot.credentials;
        let key = (credentials.environment, credentials.tenant_id);
        if by_tenant.get(&key) == Some(&credentials.connection_id) {
            by_tenant.remove(&key);
        }
    }
}

#[derive(Default)]
struct Entry {
    /// Bumped whenever the connection's credentials change or it is deleted,
    /// so a slot built from credentials read before the change is discarded.
    epoch: u64,
    slot: Option<Arc<Slot>>,
}

/// Credentials that ServiceTitan rejected with `invalid_client` on a token
/// request.
pub struct RejectedCredentials {
    pub connection_id: String,
    pub version: u32,
}

/// Capacity of the queue of rejections sent to the health checker. A full
/// queue drops new ones, which only delays NEEDS_ATTENTION for that
/// connection until its next background check.
const REJECTION_QUEUE: usize = 1024;

pub struct Broker {
    /// Client for verification probes; tokens come from `source`.
    client: ServiceTitanClient,
    source: Arc<dyn TokenSource>,
    settings: BrokerSettings,
    entries: Mutex<Entries>,
    /// Permits for token requests, one semaphore per environment.
    permits: [Semaphore; 2],
    upstream_requests: AtomicU64,
    rejections: std::sync::OnceLock<tokio::sync::mpsc::Sender<RejectedCredentials>>,
}

impl Broker {
    /// Creates a broker that requests tokens from ServiceTitan through `client`.
    pub fn new(client: ServiceTitanClient, settings: BrokerSettings) -> Self {
        let source = Arc::new(client.clone());
        Self::with_token_source(client, source, settings)
    }

    /// Creates a broker that requests tokens from `source`, keeping `client`
    /// for verification.
    pub fn with_token_source(
        client: ServiceTitanClient,
        source: Arc<dyn TokenSource>,
        settings: BrokerSettings,
    ) -> Self {
        Self {
            client,
            source,
            settings,
            entries: Mutex::new(Entries::default()),
            permits: [
                Semaphore::new(MAX_CONCURRENT_TOKEN_REQUESTS),
                Semaphore::new(MAX_CONCURRENT_TOKEN_REQUESTS),
            ],
            upstream_requests: AtomicU64::new(0),
            rejections: std::sync::OnceLock::new(),
        }
    }

    /// Returns the receiver of rejected credentials, or `None` if it was
    /// already taken.
    pub fn take_rejections(&self) -> Option<tokio::sync::mpsc::Receiver<RejectedCredentials>> {
        let (sender, receiver) = tokio::sync::mpsc::channel(REJECTION_QUEUE);
        self.rejections.set(sender).ok().map(|()| receiver)
    }

    fn report_rejection(&self, credentials: &Credentials) {
        if let Some(sender) = self.rejections.get() {
            let _ = sender.try_send(RejectedCredentials {
                connection_id: credentials.connection_id.clone(),
                version: credentials.version,
            });
        }
    }

    pub fn client(&self) -> &ServiceTitanClient {
        &self.client
    }

    /// Returns how long calls still get a connection's last failed token
    /// request's error from memory, if they do.
    pub fn failure_cooldown_left(&self, connection_id: &str) -> Option<Duration> {
        let slot = self.slot(connection_id).ok()?;
        let state = slot.state.lock().expect("slot lock is never poisoned");
        let left = state
            .cooldown
            .as_ref()?
            .until
            .saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Returns the number of token requests this broker has sent.
    pub fn upstream_requests(&self) -> u64 {
        self.upstream_requests.load(Ordering::Relaxed)
    }

    /// Returns the cached slot of a connection, if any, and the epoch to pass
    /// to `install` otherwise.
    pub fn slot(&self, connection_id: &str) -> Result<Arc<Slot>, u64> {
        let entries = self.entries.lock().expect("broker lock is never poisoned");
        match entries.by_connection.get(connection_id) {
            Some(Entry {
                slot: Some(slot), ..
            }) => Ok(slot.clone()),
            Some(entry) => Err(entry.epoch),
            None => Err(0),
        }
    }

    /// Installs credentials read from the store at `epoch`. Returns `None`
    /// when the connection changed since then, so the caller reads again.
    pub fn install(&self, epoch: u64, credentials: Credentials) -> Option<Arc<Slot>> {
        let mut entries = self.entries.lock().expect("broker lock is never poisoned");
        let Entries {
            by_connection,
            by_tenant,
        } = &mut *entries;
        let entry = by_connection
            .entry(credentials.connection_id.clone())
            .or_default();
        if entry.epoch != epoch {
            return None;
        }
        if let Some(slot) = &entry.slot {
            return Some(slot.clone());
        }
        // A tenant has one connection per environment, so another
        // connection indexed here was deleted, and this one replaces it.
        by_tenant.insert(
            (credentials.environment, credentials.tenant_id),
            credentials.connection_id.clone(),
        );
        let slot = Arc::new(Slot {
            credentials,
            state: Mutex::new(SlotState::default()),
            short_lifetime_logged: AtomicBool::new(false),
        });
        entry.slot = Some(slot.clone());
        Some(slot)
    }

    /// Drops the cached token and credentials of a connection at once.
    /// Waiters of an in-flight request still get its result, but no later
    /// caller is served from the dropped entry.
    pub fn invalidate(&self, connection_id: &str) {
        let mut entries = self.entries.lock().expect("broker lock is never poisoned");
        let Entries {
            by_connection,
            by_tenant,
        } = &mut *entries;
        let entry = by_connection.entry(connection_id.to_owned()).or_default();
        entry.epoch += 1;
        Entries::drop_slot(by_tenant, entry);
    }

    /// Drops the cached tokens and credentials of every connection, as
    /// `invalidate` does for one.
    pub fn invalidate_all(&self) {
        let mut entries = self.entries.lock().expect("broker lock is never poisoned");
        for entry in entries.by_connection.values_mut() {
            entry.epoch += 1;
            entry.slot = None;
        }
        entries.by_tenant.clear();
    }

    /// Returns the wait left of the `429` pause of a connection's token
    /// requests at credential `version`, if one is in force.
    pub fn rate_limit_left(&self, connection_id: &str, version: u32) -> Option<Duration> {
        let slot = self.installed(connection_id, version)?;
        let state = slot.state.lock().expect("slot lock is never poisoned");
        let cooldown = state.cooldown.as_ref()?;
        let TokenError::RateLimited { retry_after } = cooldown.error_at(Instant::now()) else {
            return None;
        };
        (Instant::now() < cooldown.until).then_some(retry_after)
    }

    /// Pauses a connection's token requests at credential `version` after a
    /// `429` met outside the broker, unless a token is already in flight.
    /// A pause in force is only ever extended.
    pub fn pause_after_rate_limit(&self, connection_id: &str, version: u32, wait: Duration) {
        let Some(slot) = self.installed(connection_id, version) else {
            return;
        };
        let mut state = slot.state.lock().expect("slot lock is never poisoned");
        let until = Instant::now() + wait;
        let extends = state.cooldown.as_ref().is_none_or(|c| c.until < until);
        if state.inflight.is_none() && extends {
            state.cooldown = Some(Cooldown {
                until,
                error: TokenError::RateLimited { retry_after: wait },
            });
        }
    }

    fn installed(&self, connection_id: &str, version: u32) -> Option<Arc<Slot>> {
        self.slot(connection_id)
            .ok()
            .filter(|slot| slot.credentials.version == version)
    }

    /// Returns the cached slot of the connection of `tenant_id` in
    /// `environment`, without reading the database.
    pub fn tenant_slot(&self, environment: Environment, tenant_id: i64) -> Option<Arc<Slot>> {
        let entries = self.entries.lock().expect("broker lock is never poisoned");
        let connection_id = entries.by_tenant.get(&(environment, tenant_id))?;
        entries.by_connection.get(connection_id)?.slot.clone()
    }

    /// Returns a token with at least `min_valid_for` left (see
    /// `CachedToken::satisfies`), fetching one if needed.
    ///
    /// Three cases return less. A freshly issued token is returned even when
    /// ServiceTitan granted less than `min_valid_for`, because asking again
    /// would get no more. While ServiceTitan fails, the cached token is
    /// returned until it expires, rather than the error. And a request that
    /// has run for `STALE_TOKEN_PATIENCE` releases its waiters with the
    /// cached token, if that has not expired.
    pub async fn token(self: &Arc<Self>, slot: &Arc<Slot>, min_valid_for: Duration) -> FetchResult {
        loop {
            let mut receiver = match self.lookup(slot, min_valid_for) {
                Lookup::Ready(result) => return result,
                Lookup::Wait(receiver) => receiver,
            };
            // While a token that has not expired is cached, a slow or hanging
            // ServiceTitan delays callers only briefly.
            let fallback = slot.fallback(Instant::now());
            let answer = receiver.wait_for(Option::is_some);
            let waited = match &fallback {
                Some((_, until)) => tokio::time::timeout_at(*until, answer).await,
                None => Ok(answer.await),
            };
            let result = match waited {
                Ok(Ok(value)) => value
                    .clone()
                    .expect("wait_for returns only once the value is Some"),
                // The fetch task ended without sending, which happens only if
                // it panicked; `lookup` then starts a new request.
                Ok(Err(_)) => continue,
                Err(_) => match fallback {
                    Some((token, _)) if !token.is_expired(Instant::now()) => return Ok(token),
                    _ => continue,
                },
            };
            let now = Instant::now();
            return match result {
                Ok(token) if token.is_expired(now) => Err(TokenError::InvalidResponse(
                    "the token expired before it could be handed out".to_owned(),
                )),
                Ok(token) => Ok(token),
                Err(error) => slot.unexpired_token(now).ok_or(error),
            };
        }
    }

    /// Returns the slot's cached token if it satisfies `min_valid_for`,
    /// without requesting or refreshing one.
    pub fn cached_token(&self, slot: &Slot, min_valid_for: Duration) -> Option<Arc<CachedToken>> {
        let state = slot.state.lock().expect("slot lock is never poisoned");
        let token = state.token.clone()?;
        let hit = token.satisfies(min_valid_for, Instant::now());
        crate::metrics::record_token_cache(hit);
        hit.then_some(token)
    }

    fn lookup(self: &Arc<Self>, slot: &Arc<Slot>, min_valid_for: Duration) -> Lookup {
        let now = Instant::now();
        let mut state = slot.state.lock().expect("slot lock is never poisoned");
        if state.cooldown.as_ref().is_some_and(|c| now >= c.until) {
            state.cooldown = None;
        }
        // A closed channel means the fetch task panicked before it sent.
        let inflight = state
            .inflight
            .clone()
            .filter(|receiver| receiver.has_changed().is_ok());

        if let Some(token) = state.token.clone() {
            if token.satisfies(min_valid_for, now) {
                if now >= token.refresh_at && inflight.is_none() && state.cooldown.is_none() {
                    self.start_fetch(slot, &mut state, Duration::ZERO);
                }
                crate::metrics::record_token_cache(true);
                return Lookup::Ready(Ok(token));
            }
        }
        if let Some(cooldown) = &state.cooldown {
            // ServiceTitan is failing: a token that has not expired is still
            // more use to the caller than the error.
            return match state.token.clone().filter(|t| !t.is_expired(now)) {
                Some(token) => Lookup::Ready(Ok(token)),
                None => Lookup::Ready(Err(cooldown.error_at(now))),
            };
        }
        crate::metrics::record_token_cache(false);
        match inflight {
            Some(receiver) => Lookup::Wait(receiver),
            None => Lookup::Wait(self.start_fetch(slot, &mut state, min_valid_for)),
        }
    }

    /// Spawns the one upstream request of this slot. The request runs in its
    /// own task, so a caller that gives up does not cancel it for the others.
    fn start_fetch(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        state: &mut SlotState,
        need: Duration,
    ) -> watch::Receiver<Option<FetchResult>> {
        let (sender, receiver) = watch::channel(None);
        state.inflight = Some(receiver.clone());
        state.inflight_since = Some(Instant::now());
        let broker = self.clone();
        let slot = slot.clone();
        tokio::spawn(async move {
            let result = broker.fetch(&slot.credentials, need).await;
            broker.record(&slot, &result);
            // Waiters may all have given up; the result is cached regardless.
            let _ = sender.send(Some(result));
        });
        receiver
    }

    /// Requests a token once a permit of the connection's environment is free.
    async fn fetch(&self, credentials: &Credentials, need: Duration) -> FetchResult {
        let permits = match credentials.environment {
            Environment::Production => &self.permits[0],
            Environment::Integration => &self.permits[1],
        };
        let _permit = permits
            .acquire()
            .await
            .expect("the broker never closes its semaphores");

        self.upstream_requests.fetch_add(1, Ordering::Relaxed);
        let requested = Instant::now();
        let requested_wall = SystemTime::now();
        // Checked again for a token another server stored.
        let result = self
            .source
            .request_token(credentials, need)
            .await
            .and_then(|issued| for_connection_tenant(credentials, issued));

        let connection_id = &credentials.connection_id;
        match &result {
            Ok(issued) => tracing::debug!(
                connection.id = %connection_id,
                lifetime_s = issued.expires_in.as_secs(),
                "token issued"
            ),
            Err(error) => tracing::warn!(
                connection.id = %connection_id,
                tenant.id = credentials.tenant_id,
                %error,
                "token request failed"
            ),
        }
        if let Err(TokenError::Rejected {
            error: crate::servicetitan::OAuthError::InvalidClient,
            ..
        }) = &result
        {
            self.report_rejection(credentials);
        }
        result.map(|issued| Arc::new(CachedToken::from_issued(issued, requested, requested_wall)))
    }

    /// Stores a fetch result in the slot: a token replaces the cached one, a
    /// failure starts the cooldown. Either way the request is no longer in
    /// flight, so the first call after the cooldown tries again.
    fn record(&self, slot: &Slot, result: &FetchResult) {
        if let Ok(token) = result {
            if token.lifetime < SHORT_LIFETIME
                && !slot.short_lifetime_logged.swap(true, Ordering::Relaxed)
            {
                tracing::warn!(
                    connection.id = %slot.credentials.connection_id,
                    lifetime_s = token.lifetime.as_secs(),
                    "ServiceTitan issued a token valid for less than a minute, so this \
                     connection needs a new token about that often (ServiceTitan documents 900 s)"
                );
            }
        }
        let mut state = slot.state.lock().expect("slot lock is never poisoned");
        state.inflight = None;
        match result {
            Ok(token) => {
                state.token = Some(token.clone());
                state.cooldown = None;
            }
            Err(error) => {
                let wait = match error {
                    TokenError::RateLimited { retry_after } => *retry_after,
                    _ => self.settings.failure_cooldown,
                };
                state.cooldown = Some(Cooldown {
                    until: Instant::now() + wait,
                    error: error.clone(),
                });
            }
        }
    }
}

/// Rejects a token whose `tenant` claim does not name the connection's
/// tenant, because a caller allowed only that tenant must not receive it.
/// The claim is unsigned, so it can only make the broker reject a token,
/// never accept one. A token without the claim is accepted.
fn for_connection_tenant(
    credentials: &Credentials,
    issued: IssuedToken,
) -> Result<IssuedToken, TokenError> {
    let expected = credentials.tenant_id;
    match issued.claims.names_tenant(expected) {
        Some(false) => Err(TokenError::OtherTenant {
            expected,
            claimed: issued.claims.shown_tenant(),
            single: issued.claims.names_one_tenant(),
        }),
        _ => Ok(issued),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issued(expires_in: u64, age: u64) -> IssuedToken {
        IssuedToken {
            access_token: SecretString::new("token".to_owned()),
            token_type: "Bearer".to_owned(),
            expires_in: Duration::from_secs(expires_in),
            age: Duration::from_secs(age),
            claims: TokenClaims::default(),
        }
    }

    fn broker() -> Broker {
        let unreachable = crate::servicetitan::Endpoints {
            token_url: "http://127.0.0.1:9/token".parse().unwrap(),
            api_url: "http://127.0.0.1:9/api".parse().unwrap(),
        };
        let client = ServiceTitanClient::new(crate::servicetitan::ClientConfig {
            production: unreachable.clone(),
            integration: unreachable,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
        })
        .unwrap();
        Broker::new(
            client,
            BrokerSettings {
                failure_cooldown: Duration::from_secs(1),
            },
        )
    }

    fn credentials(connection_id: &str, tenant_id: i64) -> Credentials {
        Credentials {
            connection_id: connection_id.to_owned(),
            version: 1,
            environment: Environment::Integration,
            tenant_id,
            client_id: "cid.unit".to_owned(),
            client_secret: SecretString::new("cs.unit".to_owned()),
            app_key: SecretString::new("ak.unit".to_owned()),
            enterprise_hub: false,
            token_key: None,
        }
    }

    fn tenant_connection(broker: &Broker, tenant_id: i64) -> Option<String> {
        broker
            .tenant_slot(Environment::Integration, tenant_id)
            .map(|slot| slot.credentials.connection_id.clone())
    }

    #[test]
    fn tenant_index_follows_install_and_invalidate() {
        let broker = broker();
        broker.install(0, credentials("a", 1)).unwrap();
        broker.install(0, credentials("b", 2)).unwrap();
        assert_eq!(tenant_connection(&broker, 1).as_deref(), Some("a"));
        assert_eq!(tenant_connection(&broker, 2).as_deref(), Some("b"));
        assert!(
            broker.tenant_slot(Environment::Production, 1).is_none(),
            "the index is per environment"
        );

        broker.invalidate("a");
        assert_eq!(tenant_connection(&broker, 1), None);
        assert_eq!(tenant_connection(&broker, 2).as_deref(), Some("b"));

        // A connection that replaces a deleted one of the same tenant keeps
        // the index when the deleted one is invalidated afterwards.
        let epoch = broker.slot("a").err().expect("invalidate dropped the slot");
        broker.install(epoch, credentials("a", 1)).unwrap();
        broker.install(0, credentials("c", 1)).unwrap();
        assert_eq!(tenant_connection(&broker, 1).as_deref(), Some("c"));
        broker.invalidate("a");
        assert_eq!(tenant_connection(&broker, 1).as_deref(), Some("c"));

        broker.invalidate_all();
        assert_eq!(tenant_connection(&broker, 1), None);
        assert_eq!(tenant_connection(&broker, 2), None);
        assert!(broker.slot("c").is_err());
    }

    #[test]
    fn stored_token_keeps_its_lifetime_and_refresh_point() {
        let now = Instant::now();
        let wall = SystemTime::now();
        // Issued 500 s ago with 900 s of life: 400 s left, and the refresh
        // due at 70% to 80% of 900 s after issue.
        let token = CachedToken::from_issued(issued(400, 500), now, wall);
        assert_eq!(token.lifetime, Duration::from_secs(900));
        assert_eq!(token.remaining(now), Duration::from_secs(400));
        let refresh_in = token.refresh_at() - now;
        assert!(refresh_in >= Duration::from_secs(130), "{refresh_in:?}");
        assert!(refresh_in <= Duration::from_secs(220), "{refresh_in:?}");
        // The margin asked for is capped at half the whole lifetime (450 s),
        // not half of what is left (200 s).
        assert!(!token.satisfies(Duration::from_secs(600), now));
        assert!(token.satisfies(Duration::from_secs(300), now));

        let fresh = CachedToken::from_issued(issued(900, 0), now, wall);
        assert_eq!(fresh.lifetime, Duration::from_secs(900));
        assert!(fresh.refresh_at() - now >= Duration::from_secs(630));
    }
}
