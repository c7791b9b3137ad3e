//! The one place where vault errors become gRPC statuses. Each known cause
//! gets its own code and a message naming the resource and the fix. Storage
//! failures get a generic message, and the cause is logged on the server.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::servicetitan::{OAuthError, TokenError};
use crate::store::StoreError;
use crate::vault::VaultError;
use crate::verify::{CheckStatus, Failure, Report};

const ERROR_DOMAIN: &str = "stvault";

pub fn to_status(error: VaultError) -> Status {
    match error {
        VaultError::NotFound(_) | VaultError::TenantNotFound { .. } => {
            Status::not_found(error.to_string())
        }
        VaultError::TenantTaken { .. } => Status::already_exists(error.to_string()),
        VaultError::VerificationFailed(report) => verification_status(&report),
        VaultError::NoPreviousVersion(_) => Status::failed_precondition(error.to_string()),
        VaultError::Token(token_error) => token_status(&token_error),
        VaultError::Integrity(id) => Status::data_loss(format!(
            "stored credentials of connection {id} failed integrity checks: the record was altered or \
             holds ciphertext from another record; restore it from a backup, or delete the connection and register it again"
        )),
        VaultError::Busy(_) => Status::aborted(error.to_string()),
        VaultError::NoCachedToken(_) => Status::unavailable(error.to_string()),
        VaultError::Store(StoreError::Corrupt { key, reason }) => {
            tracing::error!(record = %key, %reason, "stored record is not readable");
            Status::data_loss(format!("stored record {key} is not readable"))
        }
        VaultError::Store(StoreError::NotFound(id)) => {
            Status::not_found(format!("connection {id} not found"))
        }
        VaultError::Store(StoreError::Conflict(id)) => Status::aborted(format!(
            "connection {id} was changed by another request; retry"
        )),
        VaultError::Store(StoreError::Unavailable(reason)) => {
            tracing::error!(error = %reason, "database unavailable");
            Status::unavailable("the database is unavailable; retry later")
        }
        VaultError::Store(other) => {
            tracing::error!(error = %other, "storage operation failed");
            Status::internal("storage operation failed; see the server log")
        }
    }
}

/// Maps a failed token request for a stored connection.
fn token_status(error: &TokenError) -> Status {
    match error {
        TokenError::Rejected {
            error: OAuthError::InvalidClient,
            ..
        } => Status::failed_precondition(
            "ServiceTitan rejected the stored client id or client secret (invalid_client); \
             run VerifyConnection, then RotateCredentials with a new client secret from the Developer Portal",
        ),
        TokenError::Rejected { error, status } => Status::failed_precondition(format!(
            "ServiceTitan refused the token request ({error}, HTTP {status}); run VerifyConnection for details"
        )),
        TokenError::RateLimited { retry_after } => rate_limited(
            format!(
                "ServiceTitan is rate limiting token requests for this connection; retry after {} s",
                retry_after.as_secs().max(1)
            ),
            *retry_after,
        ),
        TokenError::Unavailable(reason) => Status::unavailable(format!(
            "ServiceTitan's token endpoint is unavailable: {reason}"
        )),
        TokenError::InvalidResponse(reason) => Status::unavailable(format!(
            "ServiceTitan's token endpoint returned an unusable response: {reason}"
        )),
        TokenError::OtherTenant {
            expected,
            single: true,
            ..
        } => Status::failed_precondition(format!(
            "ServiceTitan issued this connection's token for another tenant, so its credentials \
             are not tenant {expected}'s; run VerifyConnection, then register the credentials \
             under their own tenant, or RotateCredentials with those of tenant {expected}"
        )),
        TokenError::OtherTenant {
            expected,
            single: false,
            ..
        } => Status::failed_precondition(format!(
            "ServiceTitan issued this connection's token with a tenant claim that does not name \
             one tenant, so it is not handed out; run VerifyConnection, and check in the \
             Developer Portal that the app is connected to tenant {expected}"
        )),
    }
}

/// Maps a failed GetAccessToken. ServiceTitan's own failures carry what is
/// left of the failure cooldown as RetryInfo, since calls before it ends get
/// the same error from memory.
pub fn access_token_status(error: VaultError, cooldown: Duration) -> Status {
    let from_memory = matches!(
        error,
        VaultError::Token(TokenError::Unavailable(_) | TokenError::InvalidResponse(_))
    );
    let status = to_status(error);
    if !from_memory {
        return status;
    }
    let details = ErrorDetails::with_retry_info(Some(cooldown));
    Status::with_error_details(status.code(), status.message(), details)
}

fn rate_limited(message: String, retry_after: Duration) -> Status {
    let details = ErrorDetails::with_retry_info(Some(retry_after));
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

/// Builds the status of a failed verification. The message names the first
/// failed check, its reason and its remediation, and the details list every
/// failed check.
pub fn verification_status(report: &Report) -> Status {
    let first = report.first_failure();
    let summary = match first {
        Some(check) => format!(
            "verification failed at check {:?}: {}. {}",
            check.name, check.message, check.remediation
        ),
        None => "verification failed".to_owned(),
    };
    let mut details = ErrorDetails::new();
    for check in report
        .checks
        .iter()
        .filter(|c| c.status == CheckStatus::Failed)
    {
        details.add_precondition_failure_violation(
            check.name.clone(),
            "servicetitan",
            format!("{}. {}", check.message, check.remediation),
        );
    }
    let (code, reason) = match report.failure {
        Some(Failure::RateLimited(retry_after)) => {
            details.set_retry_info(Some(retry_after));
            (Code::ResourceExhausted, "UPSTREAM_RATE_LIMITED")
        }
        Some(Failure::Upstream) => (Code::Unavailable, "UPSTREAM_UNAVAILABLE"),
        Some(Failure::Setup) | None => (Code::FailedPrecondition, "VERIFICATION_FAILED"),
    };
    let check = first.map(|c| c.name.clone()).unwrap_or_default();
    details.set_error_info(reason, ERROR_DOMAIN, [("check".to_owned(), check)]);
    Status::with_error_details(code, summary, details)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_claim_refusals_say_which_kind() {
        let status = |single| {
            token_status(&TokenError::OtherTenant {
                expected: 8450,
                claimed: "8450,1001".into(),
                single,
            })
        };
        let other = status(true);
        assert_eq!(other.code(), Code::FailedPrecondition);
        assert!(other.message().contains("for another tenant"), "{other:?}");
        let unclear = status(false);
        assert_eq!(unclear.code(), Code::FailedPrecondition);
        assert!(
            unclear.message().contains("does not name one tenant"),
            "{unclear:?}"
        );
        assert!(!unclear.message().contains("another tenant"), "{unclear:?}");
        assert!(!unclear.message().contains("1001"), "{unclear:?}");
    }
}
