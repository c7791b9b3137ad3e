//! Token broker: one cached ServiceTitan access token per connection and
//! credential version, refreshed ahead of expiry, with at most one upstream
//! request in flight per connection however many callers wait.
//!
//! Expiry is tracked on the monotonic clock (`tokio::time::Instant`), so a
//! wall-clock step neither expires a token early nor keeps a dead one alive.
//! The broker map's lock is never held across an upstream call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::model::Environment;
use crate::secret::SecretString;
use crate::servicetitan::{ServiceTitanClient, TokenClaims, TokenError, TokenRequest};

/// Share of a token's lifetime after which it is refreshed in the background.
const REFRESH_FRACTION: f64 = 0.75;
/// Random spread around `REFRESH_FRACTION`, so connections registered
/// together do not refresh together.
const REFRESH_JITTER: f64 = 0.05;

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
    fn from_issued(issued: crate::servicetitan::IssuedToken, now: Instant) -> Self {
        let jitter = rand::thread_rng().gen_range(-REFRESH_JITTER..=REFRESH_JITTER);
        let refresh_after = issued.expires_in.mul_f64(REFRESH_FRACTION + jitter);
        Self {
            expires_at: now + issued.expires_in,
            expires_at_wall: SystemTime::now() + issued.expires_in,
            refresh_at: now + refresh_after,
            lifetime: issued.expires_in,
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
        self.expires_at.saturating_duration_since(now) >= required.max(Duration::from_millis(1))
    }
}

#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// How long a failed token request is answered from memory before the
    /// next caller tries ServiceTitan again.
    pub failure_cooldown: Duration,
}

type FetchResult = Result<Arc<CachedToken>, TokenError>;

/// The cache entry of one connection at one credential version.
pub struct Slot {
    pub credentials: Credentials,
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    token: Option<Arc<CachedToken>>,
    inflight: Option<watch::Receiver<Option<FetchResult>>>,
    cooldown: Option<(Instant, TokenError)>,
}

/// What a caller learns from the cache without waiting.
enum Lookup {
    Ready(FetchResult),
    Wait(watch::Receiver<Option<FetchResult>>),
}

#[derive(Default)]
struct Entry {
    /// Bumped whenever the connection's credentials change or it is deleted,
    /// so a slot built from credentials read before the change is discarded.
    epoch: u64,
    slot: Option<Arc<Slot>>,
}

pub struct Broker {
    client: ServiceTitanClient,
    settings: BrokerSettings,
    entries: Mutex<HashMap<String, Entry>>,
    upstream_requests: std::sync::atomic::AtomicU64,
}

impl Broker {
    pub fn new(client: ServiceTitanClient, settings: BrokerSettings) -> Self {
        Self {
            client,
            settings,
            entries: Mutex::new(HashMap::new()),
            upstream_requests: Default::default(),
        }
    }

    pub fn client(&self) -> &ServiceTitanClient {
        &self.client
    }

    /// Returns the number of token requests this broker has sent.
    pub fn upstream_requests(&self) -> u64 {
        self.upstream_requests
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Returns the cached slot of a connection, if any, and the epoch to pass
    /// to `install` otherwise.
    pub fn slot(&self, connection_id: &str) -> Result<Arc<Slot>, u64> {
        let entries = self.entries.lock().expect("broker lock is never poisoned");
        match entries.get(connection_id) {
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
        let entry = entries
            .entry(credentials.connection_id.clone())
            .or_default();
        if entry.epoch != epoch {
            return None;
        }
        if let Some(slot) = &entry.slot {
            return Some(slot.clone());
        }
        let slot = Arc::new(Slot {
            credentials,
            state: Mutex::new(SlotState::default()),
        });
        entry.slot = Some(slot.clone());
        Some(slot)
    }

    /// Drops the cached token and credentials of a connection at once.
    /// Waiters of an in-flight request still get its result, but no later
    /// caller is served from the dropped entry.
    pub fn invalidate(&self, connection_id: &str) {
        let mut entries = self.entries.lock().expect("broker lock is never poisoned");
        let entry = entries.entry(connection_id.to_owned()).or_default();
        entry.epoch += 1;
        entry.slot = None;
    }

    /// Returns a token with at least `min_valid_for` left (see
    /// `CachedToken::satisfies`), fetching one if needed.
    pub async fn token(self: &Arc<Self>, slot: &Arc<Slot>, min_valid_for: Duration) -> FetchResult {
        loop {
            let mut receiver = match self.lookup(slot, min_valid_for) {
                Lookup::Ready(result) => return result,
                Lookup::Wait(receiver) => receiver,
            };
            let result = match receiver.wait_for(Option::is_some).await {
                Ok(value) => value.clone().expect("waited for Some"),
                // The fetch task ended without sending, which happens only if
                // it panicked; look again and start a new request.
                Err(_) => continue,
            };
            match result {
                Ok(token) if token.satisfies(min_valid_for, Instant::now()) => return Ok(token),
                Ok(_) => continue,
                Err(error) => return Err(error),
            }
        }
    }

    fn lookup(self: &Arc<Self>, slot: &Arc<Slot>, min_valid_for: Duration) -> Lookup {
        let now = Instant::now();
        let mut state = slot.state.lock().expect("slot lock is never poisoned");
        let cooling = match &state.cooldown {
            Some((until, _)) if now < *until => true,
            Some(_) => {
                state.cooldown = None;
                false
            }
            None => false,
        };

        if let Some(token) = state.token.clone() {
            if token.satisfies(min_valid_for, now) {
                if now >= token.refresh_at && state.inflight.is_none() && !cooling {
                    self.start_fetch(slot, &mut state);
                }
                crate::metrics::record_token_cache(true);
                return Lookup::Ready(Ok(token));
            }
        }
        if let Some((_, error)) = &state.cooldown {
            return Lookup::Ready(Err(error.clone()));
        }
        crate::metrics::record_token_cache(false);
        match &state.inflight {
            Some(receiver) => Lookup::Wait(receiver.clone()),
            None => Lookup::Wait(self.start_fetch(slot, &mut state)),
        }
    }

    /// Spawns the one upstream request of this slot. The request runs in its
    /// own task, so a caller that gives up does not cancel it for the others.
    fn start_fetch(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        state: &mut SlotState,
    ) -> watch::Receiver<Option<FetchResult>> {
        let (sender, receiver) = watch::channel(None);
        state.inflight = Some(receiver.clone());
        let broker = self.clone();
        let slot = slot.clone();
        tokio::spawn(async move {
            broker
                .upstream_requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let started = Instant::now();
            let result = broker
                .client
                .request_token(&slot.credentials.token_request())
                .await
                .map(|issued| Arc::new(CachedToken::from_issued(issued, started)));
            let credentials = &slot.credentials;
            crate::metrics::record_upstream_token(
                credentials.environment,
                credentials.tenant_id,
                &result,
                started.elapsed(),
            );
            let connection_id = &slot.credentials.connection_id;
            match &result {
                Ok(token) => tracing::debug!(
                    connection.id = %connection_id,
                    lifetime_s = token.lifetime.as_secs(),
                    "token issued"
                ),
                Err(error) => tracing::warn!(
                    connection.id = %connection_id,
                    tenant.id = slot.credentials.tenant_id,
                    %error,
                    "token request failed"
                ),
            }
            {
                let mut state = slot.state.lock().expect("slot lock is never poisoned");
                state.inflight = None;
                match &result {
                    Ok(token) => {
                        state.token = Some(token.clone());
                        state.cooldown = None;
                    }
                    Err(error) => {
                        let wait = match error {
                            TokenError::RateLimited { retry_after } => *retry_after,
                            _ => broker.settings.failure_cooldown,
                        };
                        state.cooldown = Some((Instant::now() + wait, error.clone()));
                    }
                }
            }
            let _ = sender.send(Some(result));
        });
        receiver
    }
}
