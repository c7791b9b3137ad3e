//! Request validation. Every rejection names the field and the rule it
//! broke, and never echoes a secret value.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::model::Environment;
use crate::pb;
use crate::secret::SecretString;
use crate::verify;

/// Longest accepted value of any string field, in bytes.
pub const MAX_FIELD_BYTES: usize = 4096;
const MAX_LABELS: usize = 64;
const MAX_LABEL_KEY_BYTES: usize = 63;
pub const DEFAULT_MIN_VALID_FOR: Duration = Duration::from_secs(60);
/// Longest `min_valid_for` accepted. ServiceTitan tokens usually live 900
/// seconds, and a larger margin is capped at half a token's lifetime.
const MAX_MIN_VALID_FOR: Duration = Duration::from_secs(3600);
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;

/// Returns an `INVALID_ARGUMENT` status naming `field`, with a `BadRequest`
/// detail a client can read.
pub fn invalid(field: &str, description: impl Into<String>) -> Status {
    let description = description.into();
    let message = format!("{field}: {description}");
    let details = ErrorDetails::with_bad_request_violation(field, description);
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// Collects the rejections of several fields, so one reply names every
/// field to fix instead of the first.
#[derive(Default)]
pub struct Violations {
    violations: Vec<(String, String)>,
}

impl Violations {
    /// Returns the value, or `None` after noting why it was rejected.
    pub fn check<T>(&mut self, result: Result<T, Status>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(status) => {
                match status.get_details_bad_request() {
                    Some(bad_request) => self.violations.extend(
                        bad_request
                            .field_violations
                            .into_iter()
                            .map(|v| (v.field, v.description)),
                    ),
                    None => self
                        .violations
                        .push((String::new(), status.message().to_owned())),
                }
                None
            }
        }
    }

    /// Returns an `INVALID_ARGUMENT` status naming every field noted, with
    /// one `BadRequest` violation each, or `Ok` when none was.
    pub fn finish(self) -> Result<(), Status> {
        if self.violations.is_empty() {
            return Ok(());
        }
        let message = self
            .violations
            .iter()
            .map(|(field, description)| format!("{field}: {description}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut details = ErrorDetails::new();
        for (field, description) in self.violations {
            details.add_bad_request_violation(field, description);
        }
        Err(Status::with_error_details(
            Code::InvalidArgument,
            message,
            details,
        ))
    }
}

pub fn environment(field: &str, value: i32) -> Result<Environment, Status> {
    match pb::Environment::try_from(value) {
        Ok(pb::Environment::Production) => Ok(Environment::Production),
        Ok(pb::Environment::Integration) => Ok(Environment::Integration),
        _ => Err(invalid(
            field,
            "must be ENVIRONMENT_PRODUCTION or ENVIRONMENT_INTEGRATION",
        )),
    }
}

pub fn tenant_id(field: &str, value: i64) -> Result<i64, Status> {
    if value <= 0 {
        return Err(invalid(
            field,
            "must be a positive ServiceTitan tenant id, as shown in the Developer Portal's App Connections",
        ));
    }
    Ok(value)
}

pub fn connection_id(field: &str, value: &str) -> Result<String, Status> {
    if value.is_empty() {
        return Err(invalid(field, "is required"));
    }
    match uuid::Uuid::try_parse(value) {
        Ok(id) => Ok(id.hyphenated().to_string()),
        Err(_) => Err(invalid(
            field,
            "is not a connection id (expected a UUID as returned by RegisterConnection)",
        )),
    }
}

/// Validates a plain credential field such as the client id.
pub fn credential(field: &str, value: &str) -> Result<String, Status> {
    check_credential_text(field, value)?;
    Ok(value.to_owned())
}

/// Validates a secret credential field; the message never includes it.
pub fn secret(field: &str, value: String) -> Result<SecretString, Status> {
    let value = SecretString::new(value);
    check_credential_text(field, value.expose())?;
    Ok(value)
}

fn check_credential_text(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(invalid(field, "is required"));
    }
    if value.len() > MAX_FIELD_BYTES {
        return Err(invalid(
            field,
            format!("is longer than {MAX_FIELD_BYTES} bytes"),
        ));
    }
    if value.trim() != value {
        return Err(invalid(
            field,
            "has leading or trailing whitespace; paste the value exactly as the Developer Portal shows it",
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "contains control characters"));
    }
    Ok(())
}

pub fn display_name(value: &str) -> Result<String, Status> {
    if value.len() > MAX_FIELD_BYTES {
        return Err(invalid(
            "display_name",
            format!("is longer than {MAX_FIELD_BYTES} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid("display_name", "contains control characters"));
    }
    Ok(value.to_owned())
}

pub fn labels(value: HashMap<String, String>) -> Result<BTreeMap<String, String>, Status> {
    if value.len() > MAX_LABELS {
        return Err(invalid(
            "labels",
            format!("has more than {MAX_LABELS} entries"),
        ));
    }
    for (key, label) in &value {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_LABEL_KEY_BYTES
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'));
        if !key_ok {
            let shown: String = key.chars().take(64).collect();
            return Err(invalid(
                "labels",
                format!(
                    "key {shown:?} must be 1 to {MAX_LABEL_KEY_BYTES} characters of letters, digits, '_', '-', '.' or '/'"
                ),
            ));
        }
        if label.len() > MAX_FIELD_BYTES || label.chars().any(char::is_control) {
            return Err(invalid(
                "labels",
                format!(
                    "value of {key:?} must be at most {MAX_FIELD_BYTES} bytes without control characters"
                ),
            ));
        }
    }
    Ok(value.into_iter().collect())
}

pub fn scope_groups(field: &str, values: Vec<String>) -> Result<Vec<String>, Status> {
    let mut groups: Vec<String> = Vec::new();
    for value in values {
        if verify::scope_group(&value).is_none() {
            let known: Vec<&str> = verify::SCOPE_GROUPS.iter().map(|g| g.key).collect();
            let shown: String = value.chars().take(64).collect();
            return Err(invalid(
                field,
                format!(
                    "unknown scope group {shown:?}; known groups: {}",
                    known.join(", ")
                ),
            ));
        }
        if !groups.contains(&value) {
            groups.push(value);
        }
    }
    Ok(groups)
}

pub fn min_valid_for(value: Option<prost_types::Duration>) -> Result<Duration, Status> {
    let Some(value) = value else {
        return Ok(DEFAULT_MIN_VALID_FOR);
    };
    if value.seconds < 0 || value.nanos < 0 {
        return Err(invalid("min_valid_for", "must not be negative"));
    }
    let duration = Duration::new(
        value.seconds as u64,
        value.nanos.clamp(0, 999_999_999) as u32,
    );
    if duration > MAX_MIN_VALID_FOR {
        return Err(invalid(
            "min_valid_for",
            format!(
                "must be at most {}s; ServiceTitan tokens usually live 900s, and a request \
                 for more than half a token's lifetime gets a token with half its lifetime left",
                MAX_MIN_VALID_FOR.as_secs()
            ),
        ));
    }
    Ok(duration)
}

pub fn page_size(value: i32) -> Result<usize, Status> {
    match value {
        0 => Ok(DEFAULT_PAGE_SIZE),
        1.. if value as usize <= MAX_PAGE_SIZE => Ok(value as usize),
        _ => Err(invalid(
            "page_size",
            format!("must be between 0 and {MAX_PAGE_SIZE}"),
        )),
    }
}

/// The filters of a ListConnections request, as sent: a page token is valid
/// only with the filters of the request that returned it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ListFilters {
    pub environment: i32,
    pub tenant_id: i64,
}

/// Reads a page token: the last connection id of the previous page and the
/// request's filters, base64url.
pub fn page_token(value: &str, filters: ListFilters) -> Result<Option<String>, Status> {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    if value.is_empty() {
        return Ok(None);
    }
    let decoded = URL_SAFE_NO_PAD
        .decode(value)
        .ok()
        .and_then(|b| String::from_utf8(b).ok());
    let parsed = decoded.as_deref().and_then(|text| {
        let mut parts = text.split(':');
        let id = parts
            .next()
            .filter(|id| uuid::Uuid::try_parse(id).is_ok())?;
        let environment = parts.next()?.parse().ok()?;
        let tenant_id = parts.next()?.parse().ok()?;
        let issued_for = ListFilters {
            environment,
            tenant_id,
        };
        parts.next().is_none().then(|| (id.to_owned(), issued_for))
    });
    match parsed {
        Some((id, issued_for)) if issued_for == filters => Ok(Some(id)),
        Some(_) => Err(invalid(
            "page_token",
            "was returned for other environment or tenant_id filters; send the filters of the \
             first page with it, or start again without it",
        )),
        None => Err(invalid(
            "page_token",
            "is not a token returned by ListConnections; start again without it",
        )),
    }
}

pub fn encode_page_token(last_id: &str, filters: ListFilters) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    URL_SAFE_NO_PAD.encode(format!(
        "{last_id}:{}:{}",
        filters.environment, filters.tenant_id
    ))
}

/// Fields that UpdateConnection can change, as named in its update mask.
pub const UPDATABLE_FIELDS: [&str; 3] = ["display_name", "labels", "required_scope_groups"];

/// Validates an update mask and returns its paths without repeats.
pub fn update_mask(mask: Option<prost_types::FieldMask>) -> Result<Vec<String>, Status> {
    let paths = mask.map(|m| m.paths).unwrap_or_default();
    if paths.is_empty() {
        return Err(invalid(
            "update_mask",
            format!(
                "is required; name the fields to change: {}",
                UPDATABLE_FIELDS.join(", ")
            ),
        ));
    }
    let mut fields: Vec<String> = Vec::new();
    for path in paths {
        if !UPDATABLE_FIELDS.contains(&path.as_str()) {
            let shown: String = path.chars().take(64).collect();
            return Err(invalid(
                "update_mask",
                format!(
                    "cannot change {shown:?}; updatable fields are {} (use RotateCredentials for credentials)",
                    UPDATABLE_FIELDS.join(", ")
                ),
            ));
        }
        if !fields.contains(&path) {
            fields.push(path);
        }
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0190d3f4-0000-7000-8000-000000000000";
    const INTEGRATION_8450: ListFilters = ListFilters {
        environment: 2,
        tenant_id: 8450,
    };

    #[test]
    fn page_token_round_trip() {
        let token = encode_page_token(ID, INTEGRATION_8450);
        let read = page_token(&token, INTEGRATION_8450).expect("a valid token");
        assert_eq!(read.as_deref(), Some(ID));
        assert_eq!(page_token("", INTEGRATION_8450).unwrap(), None);
    }

    #[test]
    fn page_token_other_filters_rejected() {
        let token = encode_page_token(ID, INTEGRATION_8450);
        for filters in [
            ListFilters {
                environment: 0,
                tenant_id: 8450,
            },
            ListFilters {
                environment: 2,
                tenant_id: 0,
            },
        ] {
            let status = page_token(&token, filters).expect_err("other filters");
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(
                status
                    .message()
                    .contains("other environment or tenant_id filters")
            );
        }
    }
}
