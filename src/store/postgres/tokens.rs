//! Rows of `stvault_tokens`: the access token that replicas share for each
//! connection and the lease that lets one replica at a time refresh it.
//! Every decision is taken under the row's lock and every time is read from
//! the database's clock, so replicas whose clocks disagree still agree on
//! who holds a lease and how long a token has left.

use std::time::Duration;

use super::PostgresStore;
use crate::store::{ConnectionRecord, StoreError, decode};

/// The outcome of a claim: how a replica that needs a connection's token
/// gets it.
#[derive(Debug)]
pub enum Claim {
    /// Use this token, which another replica (or this one) stored.
    Shared(SharedToken),
    /// Request a token from ServiceTitan, then `publish` or `release`.
    Leased(Lease),
    /// Another replica holds the lease for this much longer; ask again
    /// soon, since it is likely to store a token before then.
    Busy(Duration),
    /// ServiceTitan asked for a pause with HTTP 429 that has this long left.
    Paused(Duration),
    /// The version asked for is not the connection's current one, so this
    /// replica's credentials are out of date.
    Stale,
}

/// A sealed token, the fields its seal binds, and its time left by the
/// database's clock.
pub struct SharedToken {
    pub sealed: Vec<u8>,
    pub binding: TokenBinding,
    pub remaining: Duration,
}

/// The fields of a stored token that its seal binds as associated data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBinding {
    pub token_type: String,
    /// Milliseconds since the Unix epoch, by the database's clock.
    pub expires_at_ms: i64,
    pub lifetime_ms: i64,
}

impl TokenBinding {
    pub fn lifetime(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.lifetime_ms).unwrap_or(0))
    }

    /// Returns the associated data of the token's seal.
    pub fn aad(&self) -> String {
        format!(
            "{}\0{}\0{}",
            self.token_type, self.expires_at_ms, self.lifetime_ms
        )
    }
}

impl std::fmt::Debug for SharedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedToken")
            .field("remaining", &self.remaining)
            .field("binding", &self.binding)
            .finish_non_exhaustive()
    }
}

/// A granted lease. Its sequence number fences the token store: once the
/// lease lapses and another replica takes it, `publish` stores nothing.
#[derive(Debug)]
pub struct Lease {
    pub connection_id: String,
    pub version: u32,
    sequence: i64,
    /// The database's clock when the lease was granted, in milliseconds
    /// since the Unix epoch, and this process's clock at that moment, to
    /// date the token's expiry by the database's clock.
    granted_at_ms: i64,
    granted: std::time::Instant,
}

impl Lease {
    /// Returns the database's clock now, in milliseconds since the Unix
    /// epoch, as this process's clock has advanced it since the grant.
    pub fn database_now_ms(&self) -> i64 {
        let elapsed = i64::try_from(self.granted.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.granted_at_ms.saturating_add(elapsed)
    }
}

/// The input of `claim_token`.
pub struct ClaimRequest<'a> {
    pub connection_id: &'a str,
    pub version: u32,
    /// The claiming replica, as stored in `lease_owner`.
    pub owner: &'a str,
    /// How long a granted lease lasts.
    pub lease_for: Duration,
    /// A stored token is handed out only while more than this share of its
    /// lifetime is left. Past that point, the caller is refreshing it.
    pub min_share_left: f64,
    /// ... and only while it has this much left, capped at half its
    /// lifetime, for a caller that asked for a margin.
    pub min_left: Duration,
}

impl PostgresStore {
    /// Starts a transaction that locks a token row. A row another session
    /// keeps locked fails it after a second, and the caller falls back,
    /// rather than holding a pooled connection that later calls would
    /// queue behind.
    async fn row_transaction<'a>(
        &self,
        client: &'a mut deadpool_postgres::Object,
    ) -> Result<deadpool_postgres::Transaction<'a>, StoreError> {
        let transaction = client.transaction().await.map_err(|e| self.error(e))?;
        transaction
            .batch_execute("SET LOCAL lock_timeout = '1s'; SET LOCAL statement_timeout = '2s'")
            .await
            .map_err(|e| self.error(e))?;
        Ok(transaction)
    }

    /// Decides, under the row's lock, whether the caller uses the stored
    /// token, refreshes it under a new lease, or waits.
    pub async fn claim_token(&self, request: &ClaimRequest<'_>) -> Result<Claim, StoreError> {
        let version = i32::try_from(request.version).unwrap_or(i32::MAX);
        let mut client = self.client().await?;
        let transaction = self.row_transaction(&mut client).await?;
        let select = transaction
            .prepare_cached(
                "SELECT version, token, token_type, \
                 (expires_at_ms - EXTRACT(EPOCH FROM now()) * 1000)::float8 / 1000, \
                 lifetime_ms, lease_owner, \
                 EXTRACT(EPOCH FROM lease_until - now())::float8, \
                 EXTRACT(EPOCH FROM retry_at - now())::float8, \
                 (EXTRACT(EPOCH FROM now()) * 1000)::bigint, expires_at_ms \
                 FROM stvault_tokens WHERE connection_id = $1 FOR UPDATE",
            )
            .await
            .map_err(|e| self.error(e))?;
        let mut row = transaction
            .query_opt(&select, &[&request.connection_id])
            .await
            .map_err(|e| self.error(e))?;
        if row.is_none() {
            // ON CONFLICT DO NOTHING waits for a concurrent insert to commit;
            // the second SELECT then locks whichever row won.
            transaction
                .execute(
                    "INSERT INTO stvault_tokens (connection_id, version) VALUES ($1, $2) \
                     ON CONFLICT (connection_id) DO NOTHING",
                    &[&request.connection_id, &version],
                )
                .await
                .map_err(|e| self.error(e))?;
            row = transaction
                .query_opt(&select, &[&request.connection_id])
                .await
                .map_err(|e| self.error(e))?;
        }
        let row = row.ok_or_else(|| StoreError::NotFound(request.connection_id.to_owned()))?;

        let stored_version: i32 = row.get(0);
        let current = stored_version == version;
        // Versions do not only grow: a rollback makes an older one current
        // again. The connection's record names the current one.
        if !current
            && !self
                .is_current_version(&transaction, request.connection_id, request.version)
                .await?
        {
            return Ok(Claim::Stale);
        }
        if current {
            let token: Option<Vec<u8>> = row.get(1);
            let token_type: Option<String> = row.get(2);
            let remaining: Option<f64> = row.get(3);
            let lifetime_ms: Option<i64> = row.get(4);
            let expires_at_ms: Option<i64> = row.get(9);
            if let (
                Some(sealed),
                Some(token_type),
                Some(remaining),
                Some(lifetime_ms),
                Some(expires_at_ms),
            ) = (token, token_type, remaining, lifetime_ms, expires_at_ms)
            {
                let binding = TokenBinding {
                    token_type,
                    expires_at_ms,
                    lifetime_ms,
                };
                let lifetime = binding.lifetime();
                let needed = request.min_left.min(lifetime / 2).as_secs_f64();
                // Time left beyond the lifetime means a clock jumped or the
                // row was edited. The seal catches an edit, and in both cases
                // the replica requests a new token.
                if remaining > lifetime.as_secs_f64() * request.min_share_left
                    && remaining >= needed
                    && remaining <= lifetime.as_secs_f64()
                {
                    return Ok(Claim::Shared(SharedToken {
                        sealed,
                        binding,
                        remaining: Duration::from_secs_f64(remaining),
                    }));
                }
            }
            let retry_in: Option<f64> = row.get(7);
            if let Some(left) = retry_in.filter(|left| *left > 0.0) {
                return Ok(Claim::Paused(Duration::from_secs_f64(left)));
            }
            let owner: Option<String> = row.get(5);
            let lease_left: Option<f64> = row.get(6);
            if let (Some(owner), Some(left)) = (owner, lease_left)
                && owner != request.owner
                && left > 0.0
            {
                // No replica grants itself more than its lease time, so a
                // lease far longer than this one's was written by hand and
                // would stall the connection: it is taken over.
                if left <= 2.0 * request.lease_for.as_secs_f64() {
                    return Ok(Claim::Busy(Duration::from_secs_f64(left)));
                }
                tracing::warn!(
                    connection.id = %request.connection_id,
                    lease.owner = %owner,
                    lease_left_s = left,
                    "taking over a token lease far longer than any replica grants"
                );
            }
        }

        // An older version's row is reset: its token belongs to replaced
        // credentials, and the new sequence fences out its refresher.
        let lease_secs = request.lease_for.as_secs_f64();
        let grant = transaction
            .prepare_cached(
                "UPDATE stvault_tokens SET \
                 lease_owner = $2, \
                 lease_until = now() + $3::float8 * interval '1 second', \
                 lease_seq = lease_seq + 1, \
                 version = $4, \
                 token = CASE WHEN version = $4 THEN token END, \
                 token_type = CASE WHEN version = $4 THEN token_type END, \
                 expires_at_ms = CASE WHEN version = $4 THEN expires_at_ms END, \
                 lifetime_ms = CASE WHEN version = $4 THEN lifetime_ms END, \
                 retry_at = CASE WHEN version = $4 THEN retry_at END \
                 WHERE connection_id = $1 RETURNING lease_seq",
            )
            .await
            .map_err(|e| self.error(e))?;
        let granted = transaction
            .query_one(
                &grant,
                &[
                    &request.connection_id,
                    &request.owner,
                    &lease_secs,
                    &version,
                ],
            )
            .await
            .map_err(|e| self.error(e))?;
        transaction.commit().await.map_err(|e| self.error(e))?;
        Ok(Claim::Leased(Lease {
            connection_id: request.connection_id.to_owned(),
            version: request.version,
            sequence: granted.get(0),
            granted_at_ms: row.get(8),
            granted: std::time::Instant::now(),
        }))
    }

    /// Returns whether `request.version` is the connection's current
    /// credential version in its stored record.
    async fn is_current_version(
        &self,
        client: &impl deadpool_postgres::GenericClient,
        connection_id: &str,
        version: u32,
    ) -> Result<bool, StoreError> {
        let row = client
            .query_opt(
                "SELECT record FROM stvault_connections WHERE id = $1",
                &[&connection_id],
            )
            .await
            .map_err(|e| self.error(e))?;
        let Some(row) = row else {
            return Err(StoreError::NotFound(connection_id.to_owned()));
        };
        let bytes: Vec<u8> = row.get(0);
        let record: ConnectionRecord = decode(connection_id, &bytes)?;
        Ok(record.current().version == version)
    }

    /// Stores a token requested under `lease`, sealed with `binding` as
    /// associated data, and ends the lease. Returns false, storing nothing,
    /// when the lease lapsed and another replica took it.
    pub async fn publish_token(
        &self,
        lease: &Lease,
        sealed: &[u8],
        binding: &TokenBinding,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "UPDATE stvault_tokens SET token = $3, token_type = $4, \
                 expires_at_ms = $5, lifetime_ms = $6, \
                 lease_owner = NULL, lease_until = NULL, retry_at = NULL \
                 WHERE connection_id = $1 AND lease_seq = $2",
            )
            .await
            .map_err(|e| self.error(e))?;
        let updated = client
            .execute(
                &statement,
                &[
                    &lease.connection_id,
                    &lease.sequence,
                    &sealed,
                    &binding.token_type,
                    &binding.expires_at_ms,
                    &binding.lifetime_ms,
                ],
            )
            .await
            .map_err(|e| self.error(e))?;
        Ok(updated == 1)
    }

    /// Pauses every replica's token requests for credential `version` of a
    /// connection after a `429` met outside a lease, as by a verification.
    /// A pause in force is only ever extended.
    pub async fn pause_token_requests(
        &self,
        connection_id: &str,
        version: u32,
        pause: Duration,
    ) -> Result<(), StoreError> {
        let stored_version = i32::try_from(version).unwrap_or(i32::MAX);
        let mut client = self.client().await?;
        let transaction = self.row_transaction(&mut client).await?;
        let row = transaction
            .query_opt(
                "SELECT version FROM stvault_tokens WHERE connection_id = $1 FOR UPDATE",
                &[&connection_id],
            )
            .await
            .map_err(|e| self.error(e))?;
        let seconds = pause.as_secs_f64();
        match row.map(|row| row.get::<_, i32>(0)) {
            // GREATEST ignores a NULL, so a row without a pause takes this
            // one, and a longer pause stays.
            Some(stored) if stored == stored_version => {
                transaction
                    .execute(
                        "UPDATE stvault_tokens SET retry_at = GREATEST(retry_at, \
                         now() + $2::float8 * interval '1 second') WHERE connection_id = $1",
                        &[&connection_id, &seconds],
                    )
                    .await
                    .map_err(|e| self.error(e))?;
            }
            // The row belongs to other credentials. If these are the
            // current ones, the row is reset to them as a claim resets it:
            // the old token goes, and the new sequence fences out a lease
            // on the old credentials.
            Some(_) => {
                if !self
                    .is_current_version(&transaction, connection_id, version)
                    .await?
                {
                    return Ok(());
                }
                transaction
                    .execute(
                        "UPDATE stvault_tokens SET version = $2, token = NULL, \
                         token_type = NULL, expires_at_ms = NULL, lifetime_ms = NULL, \
                         lease_owner = NULL, lease_until = NULL, lease_seq = lease_seq + 1, \
                         retry_at = now() + $3::float8 * interval '1 second' \
                         WHERE connection_id = $1",
                        &[&connection_id, &stored_version, &seconds],
                    )
                    .await
                    .map_err(|e| self.error(e))?;
            }
            // No row yet. One that another session inserts meanwhile, as a
            // first claim does, is not visible to the lock above: the insert
            // waits for it and then updates it, if its version matches.
            None => {
                transaction
                    .execute(
                        "INSERT INTO stvault_tokens (connection_id, version, retry_at) \
                         VALUES ($1, $2, now() + $3::float8 * interval '1 second') \
                         ON CONFLICT (connection_id) DO UPDATE \
                         SET retry_at = GREATEST(stvault_tokens.retry_at, EXCLUDED.retry_at) \
                         WHERE stvault_tokens.version = $2",
                        &[&connection_id, &stored_version, &seconds],
                    )
                    .await
                    .map_err(|e| self.error(e))?;
            }
        }
        transaction.commit().await.map_err(|e| self.error(e))
    }

    /// Returns how long token requests for credential `version` of a
    /// connection stay paused after a `429` that any replica met, if they
    /// are.
    pub async fn token_pause_left(
        &self,
        connection_id: &str,
        version: u32,
    ) -> Result<Option<Duration>, StoreError> {
        let version = i32::try_from(version).unwrap_or(i32::MAX);
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT EXTRACT(EPOCH FROM retry_at - now())::float8 FROM stvault_tokens \
                 WHERE connection_id = $1 AND version = $2",
                &[&connection_id, &version],
            )
            .await
            .map_err(|e| self.error(e))?;
        let left: Option<f64> = row.and_then(|row| row.get(0));
        Ok(left.filter(|left| *left > 0.0).map(Duration::from_secs_f64))
    }

    /// Ends `lease` without a token, after a failed request. With `pause`,
    /// every replica waits at least that long before the next request. A
    /// longer pause already stored, as by a verification, is kept.
    pub async fn release_token_lease(
        &self,
        lease: &Lease,
        pause: Option<Duration>,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        let pause_secs = pause.map(|d| d.as_secs_f64());
        client
            .execute(
                "UPDATE stvault_tokens SET lease_owner = NULL, lease_until = NULL, \
                 retry_at = CASE WHEN $3::float8 IS NULL THEN retry_at \
                 ELSE GREATEST(retry_at, now() + $3::float8 * interval '1 second') END \
                 WHERE connection_id = $1 AND lease_seq = $2",
                &[&lease.connection_id, &lease.sequence, &pause_secs],
            )
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }
}
