//! Verification of a connection's credentials against ServiceTitan, as
//! ordered checks that each name the setup step to revisit when they fail.
//!
//! The setup steps are those of ServiceTitan's own onboarding: register the
//! app and its scope groups in the Developer Portal, allow it in the tenant's
//! Settings > Integrations > API Application Access, then copy the Tenant ID
//! and Client ID and generate a Client Secret in the portal's App Connections.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::broker::Credentials;
use crate::model::Environment;
use crate::servicetitan::{IssuedToken, OAuthError, ProbeOutcome, ServiceTitanClient, TokenError};

/// A ServiceTitan scope group with the read-only list call that probes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScopeGroup {
    /// Check-name suffix and the value used in `required_scope_groups`.
    pub key: &'static str,
    /// The group's name in the Developer Portal.
    pub title: &'static str,
    /// API path of the probe, with `{tenant}` for the tenant id.
    pub probe_path: &'static str,
    pub scope: &'static str,
}

/// Probes from ServiceTitan's OpenAPI specs; each needs only paging
/// parameters and the one scope listed.
pub const SCOPE_GROUPS: [ScopeGroup; 10] = [
    group(
        "accounting",
        "Accounting",
        "/accounting/v2/tenant/{tenant}/payment-types",
        "tn.acc.paymenttypes:r",
    ),
    group(
        "crm",
        "CRM",
        "/crm/v2/tenant/{tenant}/customers",
        "tn.crm.customers:r",
    ),
    group(
        "dispatch",
        "Dispatch",
        "/dispatch/v2/tenant/{tenant}/zones",
        "tn.dis.zones:r",
    ),
    group(
        "forms",
        "Forms",
        "/forms/v2/tenant/{tenant}/forms",
        "tn.frm.forms:r",
    ),
    group(
        "job_booking",
        "Job Booking",
        "/jbce/v2/tenant/{tenant}/call-reasons",
        "tn.jbce.callreasons:r",
    ),
    group(
        "job_planning",
        "Job Planning and Management",
        "/jpm/v2/tenant/{tenant}/job-types",
        "tn.jpm.jobtypes:r",
    ),
    group(
        "marketing",
        "Marketing",
        "/marketing/v2/tenant/{tenant}/categories",
        "tn.mrk.categories:r",
    ),
    group(
        "pricebook",
        "Pricebook",
        "/pricebook/v2/tenant/{tenant}/categories",
        "tn.pb.categories:r",
    ),
    group(
        "settings",
        "Settings",
        "/settings/v2/tenant/{tenant}/business-units",
        "tn.stt.businessunits:r",
    ),
    group(
        "timesheets",
        "Timesheets",
        "/timesheets/v2/tenant/{tenant}/activity-types",
        "tn.tms.activitytypes:r",
    ),
];

const fn group(
    key: &'static str,
    title: &'static str,
    probe_path: &'static str,
    scope: &'static str,
) -> ScopeGroup {
    ScopeGroup {
        key,
        title,
        probe_path,
        scope,
    }
}

pub fn scope_group(key: &str) -> Option<&'static ScopeGroup> {
    SCOPE_GROUPS.iter().find(|g| g.key == key)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    Passed,
    Failed,
    Skipped,
    /// Failed, but the connection does not require it.
    Warning,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub status: CheckStatus,
    pub message: String,
    pub remediation: String,
    pub checked_at: SystemTime,
}

/// Why a verification failed, which decides the gRPC status of a register or
/// rotate that it blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// The credentials or the ServiceTitan setup are wrong.
    Setup,
    /// ServiceTitan throttled the vault; retry after the delay.
    RateLimited(Duration),
    /// ServiceTitan was down, slow or returned an unusable response.
    Upstream,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub checks: Vec<Check>,
    pub granted_scopes: Vec<String>,
    pub checked_at: SystemTime,
    pub failure: Option<Failure>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }

    /// Returns the first failed check.
    pub fn first_failure(&self) -> Option<&Check> {
        self.checks.iter().find(|c| c.status == CheckStatus::Failed)
    }
}

const REMEDIATE_SECRET: &str = "In the Developer Portal, open App Connections for this app and compare the Client ID; \
generate a new Client Secret (it is shown once) if the stored one was lost or deactivated, then rotate it into the vault.";
const REMEDIATE_TENANT_ID: &str = "Copy the Tenant ID from the Developer Portal's App Connections for this app; \
the registered tenant id belongs to another connection.";
const REMEDIATE_APP_KEY: &str = "Copy the Application Key from the app's page in the Developer Portal (Our organization), \
and check that the app is not disabled; then rotate the app key into the vault.";
const REMEDIATE_TENANT_ACCESS: &str = "In ServiceTitan, open Settings > Integrations > API Application Access, \
connect this app and allow access (a tenant admin may also have disabled it there).";
const REMEDIATE_HUB_MISSING: &str = "If these are Enterprise Hub credentials shared by several tenants, \
register the connection with enterprise_hub set, so token requests name the tenant.";
const REMEDIATE_HUB_TENANT: &str = "Check in Enterprise Hub that this tenant belongs to the group that \
shares these credentials.";
const REMEDIATE_UPSTREAM: &str =
    "Nothing is known to be wrong with the credentials; retry the verification later.";

/// Builds the report recorded when ServiceTitan rejects a connection's
/// credentials with `invalid_client` on an ordinary token request.
pub fn rejected_token_report() -> Report {
    let mut report = ReportBuilder::default();
    report.fail(
        "token",
        Failure::Setup,
        "ServiceTitan rejected the client id or client secret (invalid_client) when the vault \
         requested a token"
            .to_owned(),
        REMEDIATE_SECRET,
    );
    report.skip_rest(
        &["tenant", "app_key", "tenant_access"],
        "skipped because no token was issued",
    );
    report.finish()
}

/// Builds the report of a verification not sent because token requests for
/// the credentials are paused after a `429`, with the wait left.
pub fn paused_token_report(retry_after: Duration) -> Report {
    let mut report = ReportBuilder::default();
    report.fail(
        "token",
        Failure::RateLimited(retry_after),
        format!(
            "token requests for these credentials are paused because ServiceTitan rate limited \
             them (HTTP 429); retry after {} s",
            retry_after.as_secs().max(1)
        ),
        REMEDIATE_UPSTREAM,
    );
    report.skip_rest(
        &["tenant", "app_key", "tenant_access"],
        "skipped because no token was issued",
    );
    report.finish()
}

impl Report {
    /// Returns ServiceTitan's wait when the token request was rate limited.
    pub fn token_rate_limit(&self) -> Option<Duration> {
        match (&self.failure, self.first_failure()) {
            (Some(Failure::RateLimited(wait)), Some(check)) if check.name == "token" => Some(*wait),
            _ => None,
        }
    }
}

/// Runs every check for `credentials`, stopping at the first failure that
/// makes the later checks meaningless.
pub async fn verify(
    client: &ServiceTitanClient,
    credentials: &Credentials,
    required_groups: &[String],
) -> Report {
    let mut report = ReportBuilder::default();
    let token = match token_check(client, credentials, &mut report).await {
        Some(token) => token,
        None => return report.finish(),
    };
    report.granted_scopes = token.claims.scopes.clone();
    tenant_check(credentials, &token, &mut report);
    if report.failure.is_some() {
        report.skip_rest(
            &["app_key", "tenant_access"],
            "skipped because the tenant check failed",
        );
        return report.finish();
    }
    probe_checks(client, credentials, &token, required_groups, &mut report).await;
    report.finish()
}

#[derive(Default)]
struct ReportBuilder {
    checks: Vec<Check>,
    granted_scopes: Vec<String>,
    failure: Option<Failure>,
}

impl ReportBuilder {
    fn push(&mut self, name: &str, status: CheckStatus, message: String, remediation: &str) {
        self.checks.push(Check {
            name: name.to_owned(),
            status,
            message,
            remediation: remediation.to_owned(),
            checked_at: SystemTime::now(),
        });
    }

    fn fail(&mut self, name: &str, failure: Failure, message: String, remediation: &str) {
        self.push(name, CheckStatus::Failed, message, remediation);
        // Setup problems outrank upstream trouble: they need a person.
        match (&self.failure, &failure) {
            (None, _) | (Some(Failure::Upstream | Failure::RateLimited(_)), Failure::Setup) => {
                self.failure = Some(failure)
            }
            _ => {}
        }
    }

    fn skip_rest(&mut self, names: &[&str], reason: &str) {
        for name in names {
            self.push(name, CheckStatus::Skipped, reason.to_owned(), "");
        }
        for group in &SCOPE_GROUPS {
            self.push(
                &format!("scope:{}", group.key),
                CheckStatus::Skipped,
                reason.to_owned(),
                "",
            );
        }
    }

    fn finish(self) -> Report {
        Report {
            checks: self.checks,
            granted_scopes: self.granted_scopes,
            checked_at: SystemTime::now(),
            failure: self.failure,
        }
    }
}

/// Requests a token and records the request in the upstream metrics, as the
/// broker records its own.
async fn counted_token_request(
    client: &ServiceTitanClient,
    request: &crate::servicetitan::TokenRequest<'_>,
    tenant_id: i64,
) -> Result<IssuedToken, TokenError> {
    let started = std::time::Instant::now();
    let result = client.request_token(request).await;
    crate::metrics::record_upstream_token(
        request.environment,
        tenant_id,
        &result,
        started.elapsed(),
    );
    result
}

async fn token_check(
    client: &ServiceTitanClient,
    credentials: &Credentials,
    report: &mut ReportBuilder,
) -> Option<IssuedToken> {
    let environment = credentials.environment;
    let request = crate::servicetitan::TokenRequest {
        environment,
        client_id: &credentials.client_id,
        client_secret: &credentials.client_secret,
        tenant: credentials.enterprise_hub.then_some(credentials.tenant_id),
    };
    let error = match counted_token_request(client, &request, credentials.tenant_id).await {
        Ok(token) => {
            report.push(
                "token",
                CheckStatus::Passed,
                format!("the {environment} token endpoint issued a token"),
                "",
            );
            return Some(token);
        }
        Err(error) => error,
    };

    let skip_reason = "skipped because no token was issued";
    match error {
        TokenError::Rejected {
            error: OAuthError::InvalidClient,
            ..
        } => {
            let other = match environment {
                Environment::Production => Environment::Integration,
                Environment::Integration => Environment::Production,
            };
            let other_request = crate::servicetitan::TokenRequest {
                environment: other,
                ..request
            };
            let other_result =
                counted_token_request(client, &other_request, credentials.tenant_id).await;
            if other_result.is_ok() {
                report.fail(
                    "token",
                    Failure::Setup,
                    format!(
                        "ServiceTitan rejected the client id and secret in the {environment} environment \
                         (invalid_client), but the {other} environment accepts them"
                    ),
                    &format!(
                        "These credentials belong to the {other} environment: register them there, or \
                         generate {environment} credentials in the Developer Portal."
                    ),
                );
            } else {
                report.fail(
                    "token",
                    Failure::Setup,
                    "ServiceTitan rejected the client id or client secret (invalid_client)"
                        .to_owned(),
                    REMEDIATE_SECRET,
                );
            }
        }
        TokenError::Rejected { error, status } => {
            // NOTE: ServiceTitan does not document its response to an
            // Enterprise Hub request without a tenant, or for a tenant outside
            // the hub. The OAuth codes invalid_request and invalid_grant are
            // the likely ones.
            let hub_hint = match (error, credentials.enterprise_hub) {
                (OAuthError::InvalidRequest, false) => Some(REMEDIATE_HUB_MISSING),
                (OAuthError::InvalidGrant | OAuthError::InvalidRequest, true) => {
                    Some(REMEDIATE_HUB_TENANT)
                }
                _ => None,
            };
            let remediation = match hub_hint {
                Some(hint) => format!("{hint} {REMEDIATE_SECRET}"),
                None => REMEDIATE_SECRET.to_owned(),
            };
            report.fail(
                "token",
                Failure::Setup,
                format!("ServiceTitan refused the token request ({error}, HTTP {status})"),
                &remediation,
            )
        }
        TokenError::RateLimited { retry_after } => report.fail(
            "token",
            Failure::RateLimited(retry_after),
            format!(
                "ServiceTitan is rate limiting token requests (HTTP 429); retry after {} s",
                retry_after.as_secs()
            ),
            REMEDIATE_UPSTREAM,
        ),
        TokenError::Unavailable(reason) => report.fail(
            "token",
            Failure::Upstream,
            format!("ServiceTitan's token endpoint is unavailable: {reason}"),
            REMEDIATE_UPSTREAM,
        ),
        TokenError::InvalidResponse(reason) => report.fail(
            "token",
            Failure::Upstream,
            format!("ServiceTitan's token endpoint answered with an unusable response: {reason}"),
            REMEDIATE_UPSTREAM,
        ),
        TokenError::OtherTenant {
            expected,
            claimed,
            single,
        } => report.fail(
            "token",
            Failure::Setup,
            if single {
                format!(
                    "the token was issued for tenant {claimed}, but the connection is registered \
                     for tenant {expected}"
                )
            } else {
                format!(
                    "the token's tenant claim ({claimed}) does not name one tenant; the \
                     connection is registered for tenant {expected}"
                )
            },
            REMEDIATE_TENANT_ID,
        ),
    }
    report.skip_rest(&["tenant", "app_key", "tenant_access"], skip_reason);
    None
}

fn tenant_check(credentials: &Credentials, token: &IssuedToken, report: &mut ReportBuilder) {
    let expected = credentials.tenant_id;
    match token.claims.names_tenant(expected) {
        None => report.push(
            "tenant",
            CheckStatus::Skipped,
            "the token carries no tenant claim".to_owned(),
            "",
        ),
        Some(true) => report.push(
            "tenant",
            CheckStatus::Passed,
            format!("the token was issued for tenant {expected}"),
            "",
        ),
        Some(false) => {
            let claimed = token.claims.shown_tenant();
            let message = if token.claims.names_one_tenant() {
                format!(
                    "the token was issued for tenant {claimed}, but the connection is \
                     registered for tenant {expected}"
                )
            } else {
                format!(
                    "the token's tenant claim ({claimed}) does not name one tenant; the \
                     connection is registered for tenant {expected}"
                )
            };
            report.fail("tenant", Failure::Setup, message, REMEDIATE_TENANT_ID);
        }
    }
}

async fn probe_checks(
    client: &ServiceTitanClient,
    credentials: &Credentials,
    token: &IssuedToken,
    required_groups: &[String],
    report: &mut ReportBuilder,
) {
    let tenant = credentials.tenant_id.to_string();
    let probes = SCOPE_GROUPS.iter().map(|group| {
        let path = group.probe_path.replace("{tenant}", &tenant);
        async move {
            client
                .probe(
                    credentials.environment,
                    &path,
                    &credentials.app_key,
                    &token.access_token,
                )
                .await
        }
    });
    let outcomes: Vec<ProbeOutcome> = futures::future::join_all(probes).await;

    // app_key: any 401 means the gateway refused the app key or the app.
    let unauthorized = outcomes.iter().find_map(|o| match o {
        ProbeOutcome::Unauthorized { subscription_key } => Some(*subscription_key),
        _ => None,
    });
    let upstream = outcomes.iter().find_map(|o| match o {
        ProbeOutcome::RateLimited { retry_after } => Some(Failure::RateLimited(*retry_after)),
        ProbeOutcome::Unavailable(_) | ProbeOutcome::Unexpected(_) => Some(Failure::Upstream),
        _ => None,
    });
    if let Some(subscription_key) = unauthorized {
        let message = if subscription_key {
            "ServiceTitan's API gateway rejected the app key (HTTP 401, invalid subscription key)"
        } else {
            "ServiceTitan's API rejected calls made with this app key and token (HTTP 401)"
        };
        report.fail(
            "app_key",
            Failure::Setup,
            message.to_owned(),
            REMEDIATE_APP_KEY,
        );
        report.skip_rest(
            &["tenant_access"],
            "skipped because the app key check failed",
        );
        return;
    }
    if outcomes
        .iter()
        .all(|o| !matches!(o, ProbeOutcome::Ok | ProbeOutcome::Forbidden { .. }))
    {
        let failure = upstream.unwrap_or(Failure::Upstream);
        let first_problem = outcomes.iter().find(|o| {
            matches!(
                o,
                ProbeOutcome::RateLimited { .. }
                    | ProbeOutcome::Unavailable(_)
                    | ProbeOutcome::Unexpected(_)
            )
        });
        let message = match first_problem {
            Some(ProbeOutcome::RateLimited { retry_after }) => format!(
                "ServiceTitan's API rate limited the verification calls (HTTP 429); retry after {} s",
                retry_after.as_secs().max(1)
            ),
            Some(ProbeOutcome::Unavailable(reason)) => {
                format!("ServiceTitan's API did not answer the verification calls: {reason}")
            }
            Some(ProbeOutcome::Unexpected(status)) => {
                format!("ServiceTitan's API answered the verification calls with HTTP {status}")
            }
            // Every call got 404: the API URL is not ServiceTitan's, or
            // lacks a path that a proxy needs.
            _ if outcomes.iter().all(|o| *o == ProbeOutcome::NotFound) => {
                let setting = match credentials.environment {
                    Environment::Production => "STVAULT_PRODUCTION_API_URL",
                    Environment::Integration => "STVAULT_INTEGRATION_API_URL",
                };
                report.fail(
                    "app_key",
                    failure,
                    format!(
                        "ServiceTitan's API answered every verification call with HTTP 404 \
                         Not Found, so {setting} of this server likely names the wrong base URL"
                    ),
                    "Nothing is known to be wrong with the credentials; check the API URL \
                     setting of the vault, then verify again.",
                );
                report.skip_rest(&["tenant_access"], "skipped because the API is unavailable");
                return;
            }
            _ => "ServiceTitan's API did not answer the verification calls".to_owned(),
        };
        report.fail("app_key", failure, message, REMEDIATE_UPSTREAM);
        report.skip_rest(&["tenant_access"], "skipped because the API is unavailable");
        return;
    }
    report.push(
        "app_key",
        CheckStatus::Passed,
        "the API accepted the app key".to_owned(),
        "",
    );

    // tenant_access: every probe forbidden although the token grants some
    // of the probed scopes means the tenant has not allowed the app.
    let any_ok = outcomes.contains(&ProbeOutcome::Ok);
    let granted = |scope: &str| token.claims.scopes.iter().any(|s| s == scope);
    let all_forbidden = outcomes
        .iter()
        .all(|o| matches!(o, ProbeOutcome::Forbidden { .. }));
    let granted_any = SCOPE_GROUPS.iter().any(|g| granted(g.scope));
    if any_ok {
        report.push(
            "tenant_access",
            CheckStatus::Passed,
            format!("the app can read data of tenant {tenant}"),
            "",
        );
    } else if all_forbidden && (granted_any || token.claims.scopes.is_empty()) {
        report.fail(
            "tenant_access",
            Failure::Setup,
            format!("every API call for tenant {tenant} was refused (HTTP 403)"),
            REMEDIATE_TENANT_ACCESS,
        );
        report.skip_rest(&[], "skipped because the app has no access to the tenant");
        return;
    } else {
        report.push(
            "tenant_access",
            CheckStatus::Skipped,
            "no probe succeeded, so tenant access could not be confirmed".to_owned(),
            "",
        );
    }

    for (group, outcome) in SCOPE_GROUPS.iter().zip(&outcomes) {
        let name = format!("scope:{}", group.key);
        let required = required_groups.iter().any(|g| g == group.key);
        let remediation = format!(
            "In the Developer Portal, add the {} scope group ({}) to the app, then have a tenant admin \
             accept the new app version in Settings > Integrations > API Application Access.",
            group.title, group.scope
        );
        match outcome {
            ProbeOutcome::Ok => report.push(
                &name,
                CheckStatus::Passed,
                format!("{} is readable ({})", group.title, group.scope),
                "",
            ),
            ProbeOutcome::Forbidden { .. } | ProbeOutcome::NotFound => {
                let in_claim = if granted(group.scope) {
                    "although the token's scope claim lists it"
                } else {
                    "and the token's scope claim does not list it"
                };
                let message = format!(
                    "{} is not readable: {} was refused {in_claim}",
                    group.title, group.scope
                );
                if required {
                    report.fail(&name, Failure::Setup, message, &remediation);
                } else {
                    report.push(&name, CheckStatus::Warning, message, &remediation);
                }
            }
            ProbeOutcome::RateLimited { retry_after } => {
                let message = format!(
                    "the {} probe was rate limited (HTTP 429); retry after {} s",
                    group.title,
                    retry_after.as_secs()
                );
                if required {
                    report.fail(
                        &name,
                        Failure::RateLimited(*retry_after),
                        message,
                        REMEDIATE_UPSTREAM,
                    );
                } else {
                    report.push(&name, CheckStatus::Warning, message, REMEDIATE_UPSTREAM);
                }
            }
            ProbeOutcome::Unavailable(_)
            | ProbeOutcome::Unexpected(_)
            | ProbeOutcome::Unauthorized { .. } => {
                let message = format!(
                    "the {} probe did not get an answer from ServiceTitan",
                    group.title
                );
                if required {
                    report.fail(&name, Failure::Upstream, message, REMEDIATE_UPSTREAM);
                } else {
                    report.push(&name, CheckStatus::Warning, message, REMEDIATE_UPSTREAM);
                }
            }
        }
    }
}
