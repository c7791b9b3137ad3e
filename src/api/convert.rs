//! Conversions from stored records and reports to protobuf messages. Only
//! non-secret fields are copied.

use crate::health::{Health, HealthState, StatusEvent};
use crate::model::Environment;
use crate::pb;
use crate::store::{ConnectionRecord, VersionState};
use crate::verify::{CheckStatus, Failure, Report};

pub fn environment(environment: Environment) -> pb::Environment {
    match environment {
        Environment::Production => pb::Environment::Production,
        Environment::Integration => pb::Environment::Integration,
    }
}

pub fn connection(record: &ConnectionRecord) -> pb::Connection {
    let current = record.current();
    let mut versions: Vec<pb::CredentialVersion> = record
        .versions
        .iter()
        .map(|v| pb::CredentialVersion {
            version: v.version,
            state: match v.state {
                VersionState::Current => pb::credential_version::State::Current,
                VersionState::Previous => pb::credential_version::State::Previous,
                VersionState::Pending => pb::credential_version::State::Pending,
            } as i32,
            client_id: v.client_id.clone(),
            app_key_hint: v.app_key_hint.clone(),
            created_at: Some(v.created_at.into()),
            created_by: v.created_by.clone(),
        })
        .collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.version));
    pb::Connection {
        connection_id: record.id.clone(),
        environment: environment(record.environment) as i32,
        tenant_id: record.tenant_id,
        client_id: current.client_id.clone(),
        app_key_hint: current.app_key_hint.clone(),
        display_name: record.display_name.clone(),
        labels: record.labels.clone().into_iter().collect(),
        credential_version: current.version,
        created_at: Some(record.created_at.into()),
        updated_at: Some(record.updated_at.into()),
        last_verified_at: record.last_verified_at.map(Into::into),
        enterprise_hub: record.enterprise_hub,
        required_scope_groups: record.required_scope_groups.clone(),
        versions,
        health: record.health.as_ref().map(health),
    }
}

pub fn health_state(state: Option<HealthState>) -> pb::HealthState {
    match state {
        None => pb::HealthState::Unspecified,
        Some(HealthState::Healthy) => pb::HealthState::Healthy,
        Some(HealthState::Degraded) => pb::HealthState::Degraded,
        Some(HealthState::NeedsAttention) => pb::HealthState::NeedsAttention,
    }
}

fn health(health: &Health) -> pb::ConnectionHealth {
    pb::ConnectionHealth {
        state: health_state(Some(health.state)) as i32,
        state_since: Some(health.since.into()),
        last_checked_at: Some(health.last_checked_at.into()),
        // The enclosing Connection carries the id already.
        last_report: Some(report("", &health.report)),
    }
}

/// Converts a health change, or with `current_state` the stored health sent
/// to a new watcher.
pub fn status_event(event: &StatusEvent, current_state: bool) -> pb::ConnectionStatusEvent {
    pb::ConnectionStatusEvent {
        connection_id: event.connection_id.clone(),
        environment: environment(event.environment) as i32,
        tenant_id: event.tenant_id,
        previous_state: health_state(event.previous) as i32,
        state: health_state(Some(event.health.state)) as i32,
        changed_at: Some(event.health.since.into()),
        report: Some(report(&event.connection_id, &event.health.report)),
        current_state,
    }
}

pub fn report(connection_id: &str, report: &Report) -> pb::VerificationReport {
    use pb::verification_check::Status;
    use pb::verification_report::Outcome;
    let outcome = match report.failure {
        None => Outcome::Passed,
        Some(Failure::Setup) => Outcome::SetupProblem,
        Some(Failure::Upstream) => Outcome::UpstreamUnavailable,
        Some(Failure::RateLimited(_)) => Outcome::RateLimited,
    };
    pb::VerificationReport {
        connection_id: connection_id.to_owned(),
        ok: report.ok(),
        checks: report
            .checks
            .iter()
            .map(|check| pb::VerificationCheck {
                name: check.name.clone(),
                status: match check.status {
                    CheckStatus::Passed => Status::Passed,
                    CheckStatus::Failed => Status::Failed,
                    CheckStatus::Skipped => Status::Skipped,
                    CheckStatus::Warning => Status::Warning,
                } as i32,
                message: check.message.clone(),
                remediation: check.remediation.clone(),
                checked_at: Some(check.checked_at.into()),
            })
            .collect(),
        checked_at: Some(report.checked_at.into()),
        granted_scopes: report.granted_scopes.clone(),
        outcome: outcome as i32,
    }
}
