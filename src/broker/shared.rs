//! Token requests shared between replicas on PostgreSQL, so that N
//! replicas cost ServiceTitan the token requests of one.
//!
//! Before asking ServiceTitan, a replica claims the connection's row in
//! `stvault_tokens`. A stored token with enough life left is used as it is.
//! Otherwise one replica gets the lease, requests a token and stores it
//! sealed under the connection's data key, while the others poll the row
//! until it appears. A lease lasts the upstream timeout plus a margin, so a
//! replica that dies mid-request is taken over once it lapses.
//!
//! The database is an optimisation here, not a dependency: when it cannot
//! be reached, or its row cannot be read, the replica requests the token
//! from ServiceTitan itself.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use rand::Rng;
use tokio::time::Instant;

use super::{Credentials, REFRESH_FRACTION, REFRESH_JITTER, TokenSource};
use crate::crypto::{DataKey, Sealed};
use crate::servicetitan::{IssuedToken, TokenError, decode_claims};
use crate::store::PostgresStore;
use crate::store::postgres::{Claim, ClaimRequest, Lease, SharedToken, TokenBinding};

/// How often a replica waiting for another's token reads the row again.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long a claim may take before the replica requests the token from
/// ServiceTitan directly, so a slow database delays a token by no more
/// than this.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(2);
/// Added to the upstream timeout to give a lease's holder time to store
/// the token it got.
const LEASE_MARGIN: Duration = Duration::from_secs(2);
/// A stored token is handed out only while more than this share of its
/// lifetime is left. Replicas refresh a token once `REFRESH_FRACTION`, less
/// its jitter, of its lifetime has passed, when less than this is left, so
/// a refreshing replica never gets back the token it is replacing. The
/// margin of 5% of the lifetime covers the time between a replica's clock
/// and the database's reading.
const MIN_SHARE_LEFT: f64 = 1.05 - (REFRESH_FRACTION - REFRESH_JITTER);

/// A `TokenSource` that shares tokens with other replicas through the
/// database and sends requests to `upstream` only under a lease.
pub struct SharedTokens {
    store: PostgresStore,
    upstream: Arc<dyn TokenSource>,
    /// This process, as recorded in the leases it holds.
    owner: String,
    lease_for: Duration,
}

impl SharedTokens {
    /// Shares tokens through `store`. `request_timeout` bounds one upstream
    /// request, and so how long a lease must last.
    pub fn new(
        store: PostgresStore,
        upstream: Arc<dyn TokenSource>,
        request_timeout: Duration,
    ) -> Self {
        Self {
            store,
            upstream,
            owner: owner_name(),
            lease_for: request_timeout + LEASE_MARGIN,
        }
    }

    /// Returns the name this process records in its leases.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    async fn request(
        &self,
        credentials: &Credentials,
        key: &DataKey,
        need: Duration,
    ) -> Result<IssuedToken, TokenError> {
        let request = ClaimRequest {
            connection_id: &credentials.connection_id,
            version: credentials.version,
            owner: &self.owner,
            lease_for: self.lease_for,
            min_share_left: MIN_SHARE_LEFT,
            min_left: need,
        };
        // A lease lapses after `lease_for`, so two of them bound the wait
        // for one held elsewhere, even if its holder keeps failing.
        let give_up = Instant::now() + 2 * self.lease_for;
        loop {
            let claim =
                match tokio::time::timeout(CLAIM_TIMEOUT, self.store.claim_token(&request)).await {
                    Ok(Ok(claim)) => claim,
                    Ok(Err(error)) => {
                        return self.unshared(credentials, need, &error.to_string()).await;
                    }
                    Err(_) => {
                        return self
                            .unshared(credentials, need, "the database did not answer")
                            .await;
                    }
                };
            crate::metrics::record_shared_token_claim(claim_outcome(&claim));
            match claim {
                Claim::Shared(shared) => {
                    return match open(&shared, credentials, key) {
                        Some(issued) => Ok(issued),
                        None => {
                            self.unshared(credentials, need, "the stored token does not open")
                                .await
                        }
                    };
                }
                Claim::Leased(lease) => return self.refresh(credentials, key, lease, need).await,
                Claim::Paused(left) => {
                    return Err(TokenError::RateLimited {
                        retry_after: Duration::from_secs(left.as_secs_f64().ceil().max(1.0) as u64),
                    });
                }
                Claim::Stale => return self.upstream.request_token(credentials, need).await,
                Claim::Busy(left) => {
                    if Instant::now() >= give_up {
                        return self
                            .unshared(credentials, need, "another replica keeps the lease")
                            .await;
                    }
                    tokio::time::sleep(left.min(POLL_INTERVAL)).await;
                }
            }
        }
    }

    /// Requests a token under `lease` and stores it for the other replicas.
    async fn refresh(
        &self,
        credentials: &Credentials,
        key: &DataKey,
        lease: Lease,
        need: Duration,
    ) -> Result<IssuedToken, TokenError> {
        let requested = Instant::now();
        let result = self.upstream.request_token(credentials, need).await;
        let stored = match &result {
            Ok(issued) => {
                let remaining = issued.expires_in.saturating_sub(requested.elapsed());
                let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
                let binding = TokenBinding {
                    token_type: issued.token_type.clone(),
                    expires_at_ms: lease.database_now_ms().saturating_add(millis(remaining)),
                    lifetime_ms: millis(issued.expires_in),
                };
                let sealed = key.seal_token(
                    &credentials.connection_id,
                    credentials.version,
                    &binding.aad(),
                    &issued.access_token,
                );
                self.store
                    .publish_token(&lease, sealed.as_bytes(), &binding)
                    .await
                    .map(|published| {
                        if !published {
                            tracing::debug!(
                                connection.id = %credentials.connection_id,
                                "token lease lapsed before the token was stored; \
                                 another replica refreshes it"
                            );
                        }
                    })
            }
            Err(TokenError::RateLimited { retry_after }) => {
                self.store
                    .release_token_lease(&lease, Some(*retry_after))
                    .await
            }
            Err(_) => self.store.release_token_lease(&lease, None).await,
        };
        if let Err(error) = stored {
            tracing::warn!(
                connection.id = %credentials.connection_id,
                %error,
                "cannot share a token request's outcome with other replicas"
            );
        }
        result
    }

    /// Asks ServiceTitan without the database's coordination.
    async fn unshared(
        &self,
        credentials: &Credentials,
        need: Duration,
        reason: &str,
    ) -> Result<IssuedToken, TokenError> {
        tracing::warn!(
            connection.id = %credentials.connection_id,
            reason,
            "requesting a token without sharing it with other replicas"
        );
        crate::metrics::record_shared_token_claim("unshared");
        self.upstream.request_token(credentials, need).await
    }
}

impl TokenSource for SharedTokens {
    fn request_token<'a>(
        &'a self,
        credentials: &'a Credentials,
        need: Duration,
    ) -> BoxFuture<'a, Result<IssuedToken, TokenError>> {
        Box::pin(async move {
            match &credentials.token_key {
                Some(key) => self.request(credentials, key, need).await,
                None => self.upstream.request_token(credentials, need).await,
            }
        })
    }
}

/// Opens a stored token, or returns `None` if it does not open with this
/// connection's key and version.
fn open(shared: &SharedToken, credentials: &Credentials, key: &DataKey) -> Option<IssuedToken> {
    let sealed = Sealed::from_bytes(shared.sealed.clone());
    let access_token = key
        .open_token(
            &credentials.connection_id,
            credentials.version,
            &shared.binding.aad(),
            &sealed,
        )
        .ok()?;
    let claims = decode_claims(access_token.expose());
    Some(IssuedToken {
        access_token,
        token_type: shared.binding.token_type.clone(),
        expires_in: shared.remaining,
        age: shared.binding.lifetime().saturating_sub(shared.remaining),
        claims,
    })
}

fn claim_outcome(claim: &Claim) -> &'static str {
    match claim {
        Claim::Shared(_) => "shared",
        Claim::Leased(_) => "leased",
        Claim::Busy(_) => "busy",
        Claim::Paused(_) => "paused",
        Claim::Stale => "stale",
    }
}

/// Names this process for the leases it holds: the host name (a pod's name
/// on Kubernetes) and a random suffix, so a restarted process never
/// mistakes its predecessor's lease for its own.
fn owner_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|host| !host.is_empty())
        .unwrap_or_else(|| "stvault".to_owned());
    let suffix: u32 = rand::thread_rng().r#gen();
    format!("{host}/{}/{suffix:08x}", std::process::id())
}
