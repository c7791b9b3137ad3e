//! HTTP client for ServiceTitan: the OAuth 2.0 client-credentials token
//! request and read-only API probes, with every failure classified.
//!
//! Upstream bodies are never logged or returned: only the classification and
//! the few fields the vault needs (OAuth error code, rate-limit delay).

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use url::Url;

use crate::model::Environment;
use crate::secret::SecretString;

/// Upper bound on an upstream body read into memory.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// Maximum token lifetime accepted, in seconds. ServiceTitan documents
/// 900-second tokens, so a day leaves ample room.
const MAX_EXPIRES_IN_SECS: i64 = 24 * 60 * 60;
/// Wait assumed after a 429 that names no delay.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);
/// Maximum rate-limit wait honoured. ServiceTitan counts its limits per
/// second, so a longer wait more likely comes from a faulty header, and a
/// retry after five minutes costs one request.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

pub const PRODUCTION_TOKEN_URL: &str = "https://auth.servicetitan.io/connect/token";
pub const PRODUCTION_API_URL: &str = "https://api.servicetitan.io";
pub const INTEGRATION_TOKEN_URL: &str = "https://auth-integration.servicetitan.io/connect/token";
pub const INTEGRATION_API_URL: &str = "https://api-integration.servicetitan.io";

/// Token and API URLs of one environment.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub token_url: Url,
    pub api_url: Url,
}

#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub production: Endpoints,
    pub integration: Endpoints,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

/// Parses an endpoint URL, accepting plain `http` only for loopback hosts.
pub fn parse_endpoint(setting: &str, value: &str) -> Result<Url, String> {
    let url = Url::parse(value).map_err(|e| format!("{setting} is not a valid URL: {e}"))?;
    // The URL is logged at startup, and ServiceTitan takes no credentials
    // in it.
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{setting} must not contain a user name or password; remove the part before '@'"
        ));
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback_host(&url) => Ok(url),
        "http" => Err(format!(
            "{setting} must use https; plain http is accepted only for loopback hosts"
        )),
        other => Err(format!(
            "{setting} has unsupported scheme {other:?}; use https"
        )),
    }
}

/// Parses an API base URL, as `parse_endpoint` does. Callers append paths
/// to it, so it may have a path, but no query or fragment.
pub fn parse_api_endpoint(setting: &str, value: &str) -> Result<Url, String> {
    let url = parse_endpoint(setting, value)?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{setting} must not contain a query or fragment; remove the part from '?' or '#'"
        ));
    }
    Ok(url)
}

fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => {
            name.eq_ignore_ascii_case("localhost")
                || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        None => false,
    }
}

/// A token request that ServiceTitan did not grant, classified.
#[derive(Clone, Debug, thiserror::Error)]
pub enum TokenError {
    /// The token endpoint rejected the credentials (`invalid_client` and
    /// other OAuth errors). `error` is a known OAuth error code, never
    /// upstream free text.
    #[error("ServiceTitan rejected the credentials ({error}, HTTP {status})")]
    Rejected { error: OAuthError, status: u16 },
    /// HTTP 429: ServiceTitan throttles new-token requests.
    #[error("ServiceTitan is rate limiting token requests; retry after {} s", retry_after.as_secs())]
    RateLimited { retry_after: Duration },
    /// Timeouts, connection failures and 5xx responses.
    #[error("ServiceTitan is unavailable: {0}")]
    Unavailable(String),
    /// A response that is not a usable token response.
    #[error("ServiceTitan returned an invalid token response: {0}")]
    InvalidResponse(String),
    /// A token whose `tenant` claim does not name the connection's tenant.
    /// With `single` set, the claim names one other tenant, so the stored
    /// credentials are that tenant's. Otherwise it names several tenants,
    /// or none that can be read.
    #[error("{}", other_tenant_text(*expected, claimed, *single))]
    OtherTenant {
        expected: i64,
        claimed: String,
        single: bool,
    },
}

fn other_tenant_text(expected: i64, claimed: &str, single: bool) -> String {
    if single {
        format!(
            "ServiceTitan issued the token for tenant {claimed}, not for the connection's tenant \
             {expected}"
        )
    } else {
        format!(
            "ServiceTitan issued the token with a tenant claim that does not name one tenant \
             ({claimed}), so it is not known to be for the connection's tenant {expected}"
        )
    }
}

/// OAuth 2.0 error codes from RFC 6749, section 5.2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OAuthError {
    InvalidClient,
    InvalidRequest,
    InvalidGrant,
    UnauthorizedClient,
    UnsupportedGrantType,
    InvalidScope,
    /// A 400 or 401 without a recognised OAuth error code.
    Unrecognized,
}

impl OAuthError {
    fn parse(code: &str) -> Self {
        match code {
            "invalid_client" => Self::InvalidClient,
            "invalid_request" => Self::InvalidRequest,
            "invalid_grant" => Self::InvalidGrant,
            "unauthorized_client" => Self::UnauthorizedClient,
            "unsupported_grant_type" => Self::UnsupportedGrantType,
            "invalid_scope" => Self::InvalidScope,
            _ => Self::Unrecognized,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidClient => "invalid_client",
            Self::InvalidRequest => "invalid_request",
            Self::InvalidGrant => "invalid_grant",
            Self::UnauthorizedClient => "unauthorized_client",
            Self::UnsupportedGrantType => "unsupported_grant_type",
            Self::InvalidScope => "invalid_scope",
            Self::Unrecognized => "unrecognized OAuth error",
        }
    }
}

impl std::fmt::Display for OAuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A granted access token.
#[derive(Debug)]
pub struct IssuedToken {
    pub access_token: SecretString,
    pub token_type: String,
    pub expires_in: Duration,
    /// Time since ServiceTitan issued the token: zero for one just
    /// requested, more for one another replica stored.
    pub age: Duration,
    /// Claims read from the JWT payload without checking its signature. They
    /// serve diagnostics and the rejection of a token issued for another
    /// tenant, never to grant anything.
    pub claims: TokenClaims,
}

#[derive(Clone, Debug, Default)]
pub struct TokenClaims {
    pub tenant: Option<String>,
    pub scopes: Vec<String>,
}

impl TokenClaims {
    /// Returns whether the `tenant` claim names `tenant_id`, or `None` when
    /// the token has no such claim.
    pub fn names_tenant(&self, tenant_id: i64) -> Option<bool> {
        let claim = self.tenant.as_ref()?;
        Some(claim.parse::<i64>() == Ok(tenant_id))
    }

    /// Returns whether the `tenant` claim reads as exactly one tenant id.
    pub fn names_one_tenant(&self) -> bool {
        self.tenant
            .as_ref()
            .is_some_and(|claim| claim.parse::<i64>().is_ok())
    }

    /// Returns the `tenant` claim for a message: at most 40 of its digits,
    /// signs, points and commas.
    pub fn shown_tenant(&self) -> String {
        let printable: String = self
            .tenant
            .iter()
            .flat_map(|claim| claim.chars())
            .filter(|c| c.is_ascii_digit() || matches!(c, '-' | '.' | ','))
            .take(40)
            .collect();
        if printable.is_empty() {
            "(unreadable)".to_owned()
        } else {
            printable
        }
    }
}

/// The credentials of one token request.
pub struct TokenRequest<'a> {
    pub environment: Environment,
    pub client_id: &'a str,
    pub client_secret: &'a SecretString,
    /// Tenant named in the request, for Enterprise Hub credentials shared by
    /// several tenants.
    pub tenant: Option<i64>,
}

/// Result of one read-only API call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    Ok,
    /// HTTP 401; `subscription_key` is true when the body is the API
    /// gateway's response for a missing or invalid subscription (app) key.
    Unauthorized {
        subscription_key: bool,
    },
    /// 403, with the problem title when it is short enough to be a title.
    Forbidden {
        title: Option<String>,
    },
    NotFound,
    RateLimited {
        retry_after: Duration,
    },
    Unavailable(String),
    Unexpected(u16),
}

#[derive(Clone)]
pub struct ServiceTitanClient {
    http: reqwest::Client,
    config: ClientConfig,
}

impl ServiceTitanClient {
    pub fn new(config: ClientConfig) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .https_only(false)
            .user_agent(concat!("stvault/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("failed to build the HTTP client: {e}"))?;
        Ok(Self { http, config })
    }

    pub fn endpoints(&self, environment: Environment) -> &Endpoints {
        match environment {
            Environment::Production => &self.config.production,
            Environment::Integration => &self.config.integration,
        }
    }

    pub fn request_timeout(&self) -> Duration {
        self.config.request_timeout
    }

    /// Requests an access token with the client-credentials grant.
    pub async fn request_token(
        &self,
        request: &TokenRequest<'_>,
    ) -> Result<IssuedToken, TokenError> {
        let url = self.endpoints(request.environment).token_url.clone();
        let tenant = request.tenant.map(|t| t.to_string());
        let mut form: Vec<(&str, &str)> = vec![
            ("grant_type", "client_credentials"),
            ("client_id", request.client_id),
            ("client_secret", request.client_secret.expose()),
        ];
        if let Some(tenant) = &tenant {
            form.push(("tenant", tenant));
        }
        let body = SecretString::new(
            serde_urlencoded::to_string(&form).expect("string pairs always encode"),
        );

        let response = self
            .http
            .post(url)
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json")
            .body(body.expose().to_owned())
            .send()
            .await
            .map_err(|e| TokenError::Unavailable(describe_transport_error(&e)))?;
        drop(body);

        let status = response.status().as_u16();
        let retry_after_header = retry_after_header(&response);
        let bytes = read_limited(response)
            .await
            .map_err(TokenError::Unavailable)?;
        classify_token_response(status, retry_after_header, &bytes)
    }

    /// Calls `GET {api}{path}` with the app key and token, for verification.
    /// A path in the API URL, as behind a proxy, comes first: callers are
    /// handed the same URL as their base.
    pub async fn probe(
        &self,
        environment: Environment,
        path: &str,
        app_key: &SecretString,
        access_token: &SecretString,
    ) -> ProbeOutcome {
        let mut url = self.endpoints(environment).api_url.clone();
        let joined = format!("{}{path}", url.path().trim_end_matches('/'));
        url.set_path(&joined);
        url.set_query(Some("pageSize=1"));
        let result = self
            .http
            .get(url)
            .header("ST-App-Key", app_key.expose())
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", access_token.expose()),
            )
            .header(http::header::ACCEPT, "application/json")
            .send()
            .await;
        let response = match result {
            Ok(response) => response,
            Err(e) => return ProbeOutcome::Unavailable(describe_transport_error(&e)),
        };
        let status = response.status().as_u16();
        let retry_after = retry_after_header(&response);
        let bytes = match read_limited(response).await {
            Ok(bytes) => bytes,
            Err(reason) => return ProbeOutcome::Unavailable(reason),
        };
        classify_probe_response(status, retry_after, &bytes)
    }
}

fn describe_transport_error(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "the request timed out".to_owned()
    } else if error.is_connect() {
        "the connection failed".to_owned()
    } else {
        "the request failed before a response arrived".to_owned()
    }
}

async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(format!("the response body exceeded {MAX_BODY_BYTES} bytes"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) if e.is_timeout() => return Err("the response timed out".to_owned()),
            Err(_) => return Err("the response was cut off".to_owned()),
        }
    }
}

fn retry_after_header(response: &reqwest::Response) -> Option<Duration> {
    let value = response
        .headers()
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    parse_retry_after(value, SystemTime::now())
}

/// Reads a `Retry-After` value, a number of seconds or an HTTP date (RFC
/// 9110 allows both), as the wait from `now`.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is still a wait, and the cap applies.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// Takes the wait from the header, else from the first number in the problem
/// title ("... try again in 30 seconds"), else a default, capped.
fn rate_limit_delay(header: Option<Duration>, body: &[u8]) -> Duration {
    let from_title = || {
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        let title = value.get("title")?.as_str()?;
        let digits: String = title
            .chars()
            .skip_while(|c| !c.is_ascii_digit())
            .take_while(|c| c.is_ascii_digit())
            .collect();
        digits.parse::<u64>().ok().map(Duration::from_secs)
    };
    header
        .or_else(from_title)
        .unwrap_or(DEFAULT_RETRY_AFTER)
        .clamp(Duration::from_secs(1), MAX_RETRY_AFTER)
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct OAuthErrorBody {
    error: Option<String>,
}

fn classify_token_response(
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Result<IssuedToken, TokenError> {
    match status {
        200 => parse_token(body),
        429 => Err(TokenError::RateLimited {
            retry_after: rate_limit_delay(retry_after, body),
        }),
        400 | 401 => {
            let code = serde_json::from_slice::<OAuthErrorBody>(body)
                .ok()
                .and_then(|b| b.error);
            match code {
                Some(code) => Err(TokenError::Rejected {
                    error: OAuthError::parse(&code),
                    status,
                }),
                None if status == 401 => Err(TokenError::Rejected {
                    error: OAuthError::Unrecognized,
                    status,
                }),
                None => Err(TokenError::InvalidResponse(
                    "HTTP 400 without an OAuth error code".to_owned(),
                )),
            }
        }
        408 | 500..=599 => Err(TokenError::Unavailable(format!("HTTP {status}"))),
        other => Err(TokenError::InvalidResponse(format!(
            "unexpected HTTP {other}"
        ))),
    }
}

fn parse_token(body: &[u8]) -> Result<IssuedToken, TokenError> {
    let invalid = |reason: &str| TokenError::InvalidResponse(reason.to_owned());
    let response: TokenResponse =
        serde_json::from_slice(body).map_err(|_| invalid("the body is not a JSON object"))?;
    let access_token = match response.access_token {
        Some(token) if !token.is_empty() => SecretString::new(token),
        _ => return Err(invalid("access_token is missing")),
    };
    if !is_bearer_token(access_token.expose()) {
        return Err(invalid(
            "access_token contains characters not allowed in a bearer token",
        ));
    }
    let expires_in = parse_expires_in(response.expires_in.as_ref()).map_err(|r| invalid(&r))?;
    let token_type = response.token_type.unwrap_or_else(|| "Bearer".to_owned());
    if !token_type.eq_ignore_ascii_case("bearer") {
        return Err(invalid("token_type is not Bearer"));
    }
    let claims = decode_claims(access_token.expose());
    Ok(IssuedToken {
        access_token,
        token_type: "Bearer".to_owned(),
        expires_in,
        age: Duration::ZERO,
        claims,
    })
}

/// Checks the RFC 6750 `b64token` syntax, so a token with control characters
/// or spaces is never handed to callers that put it in an HTTP header.
fn is_bearer_token(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    !body.is_empty()
        && body.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        })
}

/// Accepts a positive whole number of seconds, as a JSON number or a numeric
/// string, up to a day. Anything else makes the response unusable, because a
/// token of unknown lifetime cannot be cached safely.
fn parse_expires_in(value: Option<&serde_json::Value>) -> Result<Duration, String> {
    let seconds = match value {
        None | Some(serde_json::Value::Null) => return Err("expires_in is missing".to_owned()),
        Some(serde_json::Value::Number(n)) => n.as_i64(),
        Some(serde_json::Value::String(s)) => s.trim().parse::<i64>().ok(),
        Some(_) => None,
    };
    match seconds {
        None => Err("expires_in is not a whole number of seconds".to_owned()),
        Some(s) if s <= 0 => Err("expires_in is not positive".to_owned()),
        Some(s) if s > MAX_EXPIRES_IN_SECS => {
            Err(format!("expires_in exceeds {MAX_EXPIRES_IN_SECS} seconds"))
        }
        Some(s) => Ok(Duration::from_secs(s as u64)),
    }
}

/// Reads `tenant` and `scope` from a JWT payload without verifying it.
pub fn decode_claims(token: &str) -> TokenClaims {
    let Some(payload) = token.split('.').nth(1) else {
        return TokenClaims::default();
    };
    let Ok(bytes) = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')) else {
        return TokenClaims::default();
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return TokenClaims::default();
    };
    // A value other than a string, a number or a list of exactly one of
    // them reads as no tenant id, so the tenant check fails for it.
    let scalar = |value: &serde_json::Value| match value {
        serde_json::Value::String(s) => s.trim().to_owned(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => "?".to_owned(),
    };
    let tenant = match value.get("tenant") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Array(items)) => {
            Some(items.iter().map(scalar).collect::<Vec<_>>().join(","))
        }
        Some(other) => Some(scalar(other)),
    };
    let scopes = match value.get("scope") {
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect(),
        Some(serde_json::Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        _ => Vec::new(),
    };
    TokenClaims { tenant, scopes }
}

const APIM_KEY_MESSAGE: &str = "subscription key";

fn classify_probe_response(
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
) -> ProbeOutcome {
    match status {
        200..=299 => ProbeOutcome::Ok,
        401 => {
            let text = String::from_utf8_lossy(body).to_ascii_lowercase();
            ProbeOutcome::Unauthorized {
                subscription_key: text.contains(APIM_KEY_MESSAGE),
            }
        }
        403 => ProbeOutcome::Forbidden {
            title: problem_title(body),
        },
        404 => ProbeOutcome::NotFound,
        429 => ProbeOutcome::RateLimited {
            retry_after: rate_limit_delay(retry_after, body),
        },
        408 | 500..=599 => ProbeOutcome::Unavailable(format!("HTTP {status}")),
        other => ProbeOutcome::Unexpected(other),
    }
}

/// Returns the RFC 7807 `title` if it is short, printable text; titles can
/// name a missing scope, which helps the admin.
fn problem_title(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let title = value.get("title")?.as_str()?;
    let clean = title.len() <= 200 && title.chars().all(|c| !c.is_control());
    clean.then(|| title.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_requires_https_except_loopback() {
        assert!(parse_endpoint("X", "https://auth.servicetitan.io/connect/token").is_ok());
        assert!(parse_endpoint("X", "http://127.0.0.1:9000/connect/token").is_ok());
        assert!(parse_endpoint("X", "http://[::1]:9000/").is_ok());
        assert!(parse_endpoint("X", "http://localhost:9000/").is_ok());
        assert!(parse_endpoint("X", "http://auth.servicetitan.io/connect/token").is_err());
        assert!(parse_endpoint("X", "ftp://127.0.0.1/").is_err());
        assert!(parse_endpoint("X", "not a url").is_err());
        assert!(parse_api_endpoint("X", "https://proxy.internal/servicetitan").is_ok());
        assert!(parse_api_endpoint("X", "https://api.servicetitan.io/?v=2").is_err());
        assert!(parse_api_endpoint("X", "https://api.servicetitan.io/#top").is_err());
        assert!(parse_api_endpoint("X", "http://auth.servicetitan.io/").is_err());
        assert!(parse_endpoint("X", "https://proxy.internal/connect/token?route=st").is_ok());
    }

    #[test]
    fn expires_in_accepts_positive_seconds() {
        use serde_json::json;
        assert_eq!(
            parse_expires_in(Some(&json!(900))).unwrap(),
            Duration::from_secs(900)
        );
        assert_eq!(
            parse_expires_in(Some(&json!("900"))).unwrap(),
            Duration::from_secs(900)
        );
        for bad in [
            json!(0),
            json!(-5),
            json!("abc"),
            json!(1e12),
            json!(12.5),
            json!(true),
        ] {
            assert!(parse_expires_in(Some(&bad)).is_err(), "{bad} accepted");
        }
        assert!(parse_expires_in(None).is_err());
        assert!(parse_expires_in(Some(&serde_json::Value::Null)).is_err());
    }

    #[test]
    fn token_errors_are_classified() {
        let rejected = classify_token_response(400, None, br#"{"error":"invalid_client"}"#);
        assert!(matches!(
            rejected,
            Err(TokenError::Rejected {
                error: OAuthError::InvalidClient,
                status: 400
            })
        ));
        let limited = classify_token_response(429, Some(Duration::from_secs(30)), b"");
        assert!(
            matches!(limited, Err(TokenError::RateLimited { retry_after }) if retry_after.as_secs() == 30)
        );
        let from_title = classify_token_response(
            429,
            None,
            br#"{"title":"Rate limit is exceeded. Try again in 12 seconds."}"#,
        );
        assert!(
            matches!(from_title, Err(TokenError::RateLimited { retry_after }) if retry_after.as_secs() == 12)
        );
        assert!(matches!(
            classify_token_response(503, None, b"<html>"),
            Err(TokenError::Unavailable(_))
        ));
        assert!(matches!(
            classify_token_response(200, None, b"<html>"),
            Err(TokenError::InvalidResponse(_))
        ));
        assert!(matches!(
            classify_token_response(200, None, br#"{"expires_in":900}"#),
            Err(TokenError::InvalidResponse(_))
        ));
    }

    #[test]
    fn access_token_syntax_is_checked() {
        assert!(is_bearer_token("eyJhbGciOi.eyJzdWIi.c2ln"));
        assert!(is_bearer_token("abc+/~_-.=="));
        for bad in ["", "tok\r\nX-Evil: 1", "a b", "tok\u{0}", "===", "é"] {
            assert!(!is_bearer_token(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn retry_after_in_seconds_or_date() {
        let now = httpdate::parse_http_date("Sat, 05 Dec 2026 02:00:00 GMT").unwrap();
        let wait = |value| parse_retry_after(value, now);
        assert_eq!(wait(" 30 "), Some(Duration::from_secs(30)));
        assert_eq!(
            wait("18446744073709551617"),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(
            wait("Sat, 05 Dec 2026 02:00:20 GMT"),
            Some(Duration::from_secs(20))
        );
        assert_eq!(wait("Sat, 05 Dec 2026 01:59:00 GMT"), Some(Duration::ZERO));
        assert_eq!(wait("-5"), None);
        assert_eq!(wait("soon"), None);
    }

    #[test]
    fn retry_after_capped_at_five_minutes() {
        let huge = Some(Duration::from_secs(99_999_999_999));
        assert_eq!(rate_limit_delay(huge, b""), Duration::from_secs(300));
        assert_eq!(
            rate_limit_delay(Some(Duration::ZERO), b""),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn claims_are_read_from_jwt_payload() {
        let payload = URL_SAFE_NO_PAD
            .encode(br#"{"tenant":"8450","scope":["tn.crm.customers:r","tn.pb.categories:r"]}"#);
        let claims = decode_claims(&format!("e30.{payload}.sig"));
        assert_eq!(claims.tenant.as_deref(), Some("8450"));
        assert_eq!(
            claims.scopes,
            vec!["tn.crm.customers:r", "tn.pb.categories:r"]
        );
        assert!(decode_claims("opaque").tenant.is_none());
    }

    #[test]
    fn tenant_claim_forms() {
        let claims =
            |json: &str| decode_claims(&format!("e30.{}.sig", URL_SAFE_NO_PAD.encode(json)));
        // The claim, whether it names tenant 8450, whether it names one.
        let cases = [
            (r#"{"tenant":"8450"}"#, Some(true), true),
            (r#"{"tenant":" 8450 "}"#, Some(true), true),
            (r#"{"tenant":"08450"}"#, Some(true), true),
            (r#"{"tenant":8450}"#, Some(true), true),
            (r#"{"tenant":["8450"]}"#, Some(true), true),
            (r#"{"tenant":"1001"}"#, Some(false), true),
            (r#"{"tenant":["1001"]}"#, Some(false), true),
            (r#"{"tenant":["8450","1001"]}"#, Some(false), false),
            (r#"{"tenant":"8450,1001"}"#, Some(false), false),
            (r#"{"tenant":8450.5}"#, Some(false), false),
            (r#"{"tenant":{"id":8450}}"#, Some(false), false),
            (r#"{"tenant":true}"#, Some(false), false),
            (r#"{"tenant":null}"#, None, false),
            (r#"{}"#, None, false),
        ];
        for (json, names, one) in cases {
            assert_eq!(claims(json).names_tenant(8450), names, "{json}");
            assert_eq!(claims(json).names_one_tenant(), one, "{json}");
        }
        assert_eq!(
            claims(r#"{"tenant":["8450","1001"]}"#).shown_tenant(),
            "8450,1001"
        );
        assert_eq!(
            claims(r#"{"tenant":{"id":1}}"#).shown_tenant(),
            "(unreadable)"
        );
    }
}
