//! Connection health: the state each verification leaves on a connection,
//! the events sent when that state changes, and the background checker that
//! verifies every connection periodically.
//!
//! The checker paces its work: each connection is checked once per interval,
//! the starts are spread evenly over the interval, and at most `concurrency`
//! verifications run at once, so ServiceTitan never receives a burst.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use crate::broker::RejectedCredentials;
use crate::model::Environment;
use crate::vault::{Vault, VaultError};
use crate::verify::{Failure, Report};

/// Share of the interval by which a cycle may be shortened at random, so
/// vaults started together drift apart. Cycles are never lengthened, so a
/// connection is checked at least once per interval.
const CYCLE_JITTER: f64 = 0.1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    Healthy,
    /// ServiceTitan was unavailable or rate limited the last verification.
    Degraded,
    /// Credentials, app key, tenant access or a required scope group failed.
    NeedsAttention,
}

impl HealthState {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Healthy => "healthy",
            HealthState::Degraded => "degraded",
            HealthState::NeedsAttention => "needs_attention",
        }
    }
}

/// Health stored on a connection record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Health {
    pub state: HealthState,
    /// When the connection entered `state`.
    pub since: SystemTime,
    pub last_checked_at: SystemTime,
    /// Credential version that `report` is about.
    pub version: u32,
    pub report: Report,
}

impl Health {
    /// Returns the health after `report` on credential `version`, given the
    /// stored health.
    ///
    /// Upstream trouble does not clear `NeedsAttention`: a verification that
    /// could not reach ServiceTitan shows nothing about whether the setup
    /// problem was fixed.
    pub fn after(previous: Option<&Health>, version: u32, report: &Report) -> Health {
        let mut state = match report.failure {
            None => HealthState::Healthy,
            Some(Failure::Setup) => HealthState::NeedsAttention,
            Some(Failure::Upstream | Failure::RateLimited(_)) => HealthState::Degraded,
        };
        let previous_state = previous.map(|p| p.state);
        if state == HealthState::Degraded
            && previous_state == Some(HealthState::NeedsAttention)
            && previous.is_some_and(|p| p.version == version)
        {
            state = HealthState::NeedsAttention;
        }
        let since = match previous {
            Some(p) if p.state == state => p.since,
            _ => report.checked_at,
        };
        Health {
            state,
            since,
            last_checked_at: report.checked_at,
            version,
            report: report.clone(),
        }
    }
}

/// A change of a connection's health state.
#[derive(Clone, Debug)]
pub struct StatusEvent {
    pub connection_id: String,
    pub environment: Environment,
    pub tenant_id: i64,
    /// `None` when the connection had never been verified.
    pub previous: Option<HealthState>,
    pub health: Health,
}

/// Settings of the background checker.
#[derive(Clone, Debug)]
pub struct HealthSettings {
    /// Time between two checks of the same connection; `None` disables the
    /// checker.
    pub interval: Option<Duration>,
    /// Maximum verifications running at once.
    pub concurrency: usize,
}

/// Runs the background checker and applies the broker's reports of rejected
/// credentials, until the task is aborted.
pub async fn run(
    vault: Arc<Vault>,
    settings: HealthSettings,
    rejections: Option<mpsc::Receiver<RejectedCredentials>>,
) {
    let listener = async {
        let Some(mut rejections) = rejections else {
            return std::future::pending().await;
        };
        while let Some(rejected) = rejections.recv().await {
            record_rejection(&vault, &rejected).await;
        }
    };
    let checker = async {
        match settings.interval {
            Some(interval) => check_periodically(&vault, interval, settings.concurrency).await,
            None => std::future::pending().await,
        }
    };
    tokio::join!(listener, checker);
}

async fn record_rejection(vault: &Vault, rejected: &RejectedCredentials) {
    match vault
        .record_token_rejection(&rejected.connection_id, rejected.version)
        .await
    {
        Ok(()) | Err(VaultError::NotFound(_)) => {}
        Err(error) => tracing::warn!(
            connection.id = %rejected.connection_id,
            %error,
            "failed to record a rejected token request in the connection's health"
        ),
    }
}

async fn check_periodically(vault: &Arc<Vault>, interval: Duration, concurrency: usize) {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    // Start at a random point of the first interval, so vaults restarted
    // together do not check in step.
    let first_delay = interval.mul_f64(rand::thread_rng().gen_range(0.0..1.0));
    let mut cycle_start = Instant::now() + first_delay;
    loop {
        tokio::time::sleep_until(cycle_start).await;
        let shortened_by = rand::thread_rng().gen_range(0.0..=CYCLE_JITTER);
        let cycle = interval.mul_f64(1.0 - shortened_by);
        let ids = match connection_ids(vault).await {
            Ok(ids) => ids,
            Err(error) => {
                tracing::warn!(%error, "health check could not list connections");
                Vec::new()
            }
        };
        let spacing = match u32::try_from(ids.len()) {
            Ok(count) if count > 0 => cycle / count,
            _ => cycle,
        };
        for (index, id) in ids.into_iter().enumerate() {
            let start = cycle_start + spacing * u32::try_from(index).unwrap_or(u32::MAX);
            tokio::time::sleep_until(start).await;
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let vault = vault.clone();
            tokio::spawn(async move {
                check_one(&vault, &id).await;
                drop(permit);
            });
        }
        // A cycle that overran starts the next one now rather than in the
        // past, so the late checks are not started back to back.
        cycle_start = (cycle_start + cycle).max(Instant::now());
    }
}

async fn connection_ids(vault: &Vault) -> Result<Vec<String>, VaultError> {
    let mut ids = Vec::new();
    let mut records = std::pin::pin!(vault.store().records());
    while let Some(record) = records.next().await {
        ids.push(record?.id);
    }
    Ok(ids)
}

async fn check_one(vault: &Vault, id: &str) {
    match vault.verify(id).await {
        Ok(report) => tracing::debug!(
            connection.id = %id,
            ok = report.ok(),
            "health check finished"
        ),
        // Deleted since the cycle listed it.
        Err(VaultError::NotFound(_)) => {}
        Err(error) => tracing::warn!(connection.id = %id, %error, "health check failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::{Check, CheckStatus};

    fn report(failure: Option<Failure>) -> Report {
        Report {
            checks: vec![Check {
                name: "token".into(),
                status: if failure.is_some() {
                    CheckStatus::Failed
                } else {
                    CheckStatus::Passed
                },
                message: String::new(),
                remediation: String::new(),
                checked_at: SystemTime::now(),
            }],
            granted_scopes: Vec::new(),
            checked_at: SystemTime::now(),
            failure,
        }
    }

    #[test]
    fn state_follows_failure_kind() {
        let healthy = Health::after(None, 1, &report(None));
        assert_eq!(healthy.state, HealthState::Healthy);
        let degraded = Health::after(Some(&healthy), 1, &report(Some(Failure::Upstream)));
        assert_eq!(degraded.state, HealthState::Degraded);
        let limited = Health::after(
            Some(&healthy),
            1,
            &report(Some(Failure::RateLimited(Duration::from_secs(5)))),
        );
        assert_eq!(limited.state, HealthState::Degraded);
        let broken = Health::after(Some(&healthy), 1, &report(Some(Failure::Setup)));
        assert_eq!(broken.state, HealthState::NeedsAttention);
    }

    #[test]
    fn upstream_trouble_keeps_needs_attention() {
        let broken = Health::after(None, 1, &report(Some(Failure::Setup)));
        let unreachable = Health::after(Some(&broken), 1, &report(Some(Failure::Upstream)));
        assert_eq!(unreachable.state, HealthState::NeedsAttention);
        assert_eq!(unreachable.since, broken.since);
        // New credentials start from what their own verification shows.
        let rotated = Health::after(Some(&broken), 2, &report(Some(Failure::Upstream)));
        assert_eq!(rotated.state, HealthState::Degraded);
    }

    #[test]
    fn since_kept_while_state_unchanged() {
        let first = Health::after(None, 1, &report(None));
        std::thread::sleep(Duration::from_millis(5));
        let second = Health::after(Some(&first), 1, &report(None));
        assert_eq!(second.since, first.since);
        assert!(second.last_checked_at > first.last_checked_at);
    }
}
