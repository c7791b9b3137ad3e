//! A fake ServiceTitan for tests and demos: the OAuth token endpoint and the
//! ten read-only probe endpoints, served over plain HTTP on loopback, with
//! faults that can be switched on to mimic a failing upstream.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream as StdTcpStream};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use rand::RngCore;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Lifetime of issued tokens unless changed, as ServiceTitan documents it.
pub const DEFAULT_TOKEN_LIFETIME_SECS: i64 = 900;

/// The scopes that the ten probe endpoints need, in the order of [`PROBES`].
pub const ALL_PROBE_SCOPES: &[&str] = &[
    "tn.acc.paymenttypes:r",
    "tn.crm.customers:r",
    "tn.dis.zones:r",
    "tn.frm.forms:r",
    "tn.jbce.callreasons:r",
    "tn.jpm.jobtypes:r",
    "tn.mrk.categories:r",
    "tn.pb.categories:r",
    "tn.stt.businessunits:r",
    "tn.tms.activitytypes:r",
];

/// A cheap read-only list endpoint that proves access to one scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub module: &'static str,
    pub resource: &'static str,
    pub scope: &'static str,
}

impl Probe {
    /// Builds the request path of this probe for `tenant`, without a query.
    pub fn path(&self, tenant: i64) -> String {
        format!("/{}/v2/tenant/{tenant}/{}", self.module, self.resource)
    }
}

/// The probe endpoints that the fake serves. Every other API path gets 404.
pub const PROBES: &[Probe] = &[
    probe("accounting", "payment-types", "tn.acc.paymenttypes:r"),
    probe("crm", "customers", "tn.crm.customers:r"),
    probe("dispatch", "zones", "tn.dis.zones:r"),
    probe("forms", "forms", "tn.frm.forms:r"),
    probe("jbce", "call-reasons", "tn.jbce.callreasons:r"),
    probe("jpm", "job-types", "tn.jpm.jobtypes:r"),
    probe("marketing", "categories", "tn.mrk.categories:r"),
    probe("pricebook", "categories", "tn.pb.categories:r"),
    probe("settings", "business-units", "tn.stt.businessunits:r"),
    probe("timesheets", "activity-types", "tn.tms.activitytypes:r"),
];

const fn probe(module: &'static str, resource: &'static str, scope: &'static str) -> Probe {
    Probe {
        module,
        resource,
        scope,
    }
}

/// Message of Azure API Management, which fronts the ServiceTitan API, for a
/// missing or invalid subscription key (`ST-App-Key`).
pub const APP_KEY_REJECTED_MESSAGE: &str = "Access denied due to missing/invalid subscription key. \
     Make sure to include subscription key when making requests to an API.";

/// Title of the 403 for a token whose tenant the app may not access.
pub const TENANT_NOT_ALLOWED_TITLE: &str = "Tenant access is not allowed for this application";

/// One app connection as the Developer Portal shows it.
#[derive(Clone)]
pub struct FakeApp {
    pub client_id: String,
    /// Active client secrets. The real portal allows at most two.
    pub client_secrets: Vec<String>,
    /// The tenant this client id is connected to.
    pub tenant_id: i64,
    pub app_key: String,
    /// False when a tenant admin disabled the app, so API calls get 401.
    pub app_enabled: bool,
    /// False when the app is not connected, or access is not allowed, in the
    /// tenant's Settings > Integrations > API Application Access, so API calls
    /// get 403.
    pub tenant_connected: bool,
    /// Granted scopes, such as `tn.crm.customers:r`.
    pub scopes: Vec<String>,
    /// Tenants of an Enterprise Hub credential. When non-empty, a token
    /// request must name one of them in the form field `tenant`.
    pub enterprise_hub_tenants: Vec<i64>,
}

impl FakeApp {
    /// Creates an enabled, connected app with one secret and every probe scope.
    pub fn new(
        client_id: impl Into<String>,
        secret: impl Into<String>,
        tenant_id: i64,
        app_key: impl Into<String>,
    ) -> FakeApp {
        FakeApp {
            client_id: client_id.into(),
            client_secrets: vec![secret.into()],
            tenant_id,
            app_key: app_key.into(),
            app_enabled: true,
            tenant_connected: true,
            scopes: ALL_PROBE_SCOPES.iter().map(|s| s.to_string()).collect(),
            enterprise_hub_tenants: Vec::new(),
        }
    }
}

/// How an endpoint misbehaves. Every variant except `None` replaces the
/// normal processing of a request, so credentials are not checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    /// Normal behaviour.
    #[default]
    None,
    /// Every request gets this status. A 4xx carries an OAuth error body on
    /// the token endpoint and an RFC 7807 body on the API. A 5xx carries a
    /// gateway's HTML page, except a 500 from the API, which is RFC 7807
    /// JSON. A code outside 200..=599 is sent as 500.
    Status(u16),
    /// 429 with a `Retry-After` header and an RFC 7807 body whose title
    /// states the wait in seconds.
    RateLimited { retry_after_secs: u64 },
    /// 200 with an HTML page, which is not JSON.
    Garbage,
    /// 200 with a token JSON that lacks `access_token`. API endpoints treat
    /// it as `None`.
    MissingAccessToken,
    /// The connection stays open and no response is sent until shutdown.
    Hang,
    /// The next request gets `Status(code)`, and the fault then resets to `None`.
    FailOnce(u16),
}

/// A handle to a running fake. Clones share the same server.
#[derive(Clone)]
pub struct FakeServiceTitan {
    shared: Arc<Shared>,
}

struct Shared {
    addr: SocketAddr,
    state: Mutex<FakeState>,
    token_requests: AtomicUsize,
    api_requests: AtomicUsize,
    connections: Arc<Mutex<Connections>>,
    shutdown: watch::Sender<bool>,
}

struct FakeState {
    apps: HashMap<String, FakeApp>,
    tokens: HashMap<String, IssuedToken>,
    token_fault: Fault,
    api_fault: Fault,
    token_delay: Duration,
    token_lifetime_secs: i64,
    expires_in_override: Option<Value>,
    last_token_form: Option<Vec<(String, String)>>,
    /// Path the API is served under, as behind a proxy; empty by default.
    api_prefix: String,
    /// `tenant` claim of later tokens in place of the tenant's id, such as
    /// a list of several.
    tenant_claim: Option<Value>,
}

/// What the fake remembers about an access token to validate API calls.
struct IssuedToken {
    client_id: String,
    tenant: i64,
    scopes: Vec<String>,
    /// `None` when the lifetime is too large to represent as an `Instant`.
    expires_at: Option<Instant>,
}

impl IssuedToken {
    fn is_expired(&self) -> bool {
        self.expires_at.is_some_and(|at| Instant::now() >= at)
    }
}

// === impl FakeServiceTitan ===

impl FakeServiceTitan {
    /// Starts a fake on an ephemeral port of 127.0.0.1.
    pub async fn start() -> FakeServiceTitan {
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        FakeServiceTitan::start_on(addr)
            .await
            .expect("binding 127.0.0.1:0 fails only without a loopback interface")
    }

    /// Starts a fake on `addr`, which must be a loopback address.
    pub async fn start_on(addr: SocketAddr) -> io::Result<FakeServiceTitan> {
        if !addr.ip().is_loopback() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fake ServiceTitan listens only on loopback, but {addr} is not"),
            ));
        }
        let listener = TcpListener::bind(addr).await?;
        let shared = Arc::new(Shared {
            addr: listener.local_addr()?,
            state: Mutex::new(FakeState::new()),
            token_requests: AtomicUsize::new(0),
            api_requests: AtomicUsize::new(0),
            connections: Arc::new(Mutex::new(Connections::default())),
            shutdown: watch::channel(false).0,
        });
        let listener = TrackingListener {
            inner: listener,
            connections: shared.connections.clone(),
        };
        let router = Router::new()
            .route("/connect/token", post(token_endpoint))
            .fallback(api_endpoint)
            .with_state(shared.clone());
        let stopped = shared.wait_for_shutdown();
        tokio::spawn(async move {
            // The serve future ends only after the shutdown signal, and axum
            // handles connection errors inside it, so its result carries nothing.
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(stopped)
                .await;
        });
        Ok(FakeServiceTitan { shared })
    }

    /// Returns the bound address, with the real port when started on port 0.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Returns the token endpoint URL, such as `http://127.0.0.1:PORT/connect/token`.
    pub fn token_url(&self) -> String {
        format!("http://{}/connect/token", self.shared.addr)
    }

    /// Returns the API base URL, such as `http://127.0.0.1:PORT`.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// Registers a connection, replacing any app with the same client id.
    pub fn add_app(&self, app: FakeApp) {
        let mut state = self.shared.lock_state();
        state.apps.insert(app.client_id.clone(), app);
    }

    /// Changes a registered app in place. API calls check the app as it is
    /// now, so a change also affects tokens already issued, except that
    /// removing a secret revokes nothing (see [`FakeServiceTitan::revoke_tokens`]).
    ///
    /// Panics if no app has `client_id`, because that is a mistake in the test.
    pub fn update_app(&self, client_id: &str, f: impl FnOnce(&mut FakeApp)) {
        let mut state = self.shared.lock_state();
        let Some(mut app) = state.apps.remove(client_id) else {
            panic!("fake ServiceTitan has no app with client id {client_id:?}");
        };
        f(&mut app);
        state.apps.insert(app.client_id.clone(), app);
    }

    /// Removes an app, so that its tokens are then rejected with 401.
    pub fn remove_app(&self, client_id: &str) {
        self.shared.lock_state().apps.remove(client_id);
    }

    /// Invalidates every token issued to `client_id`. ServiceTitan may do so
    /// when a secret is deactivated, but whether it does is not documented.
    pub fn revoke_tokens(&self, client_id: &str) {
        let mut state = self.shared.lock_state();
        state.tokens.retain(|_, token| token.client_id != client_id);
    }

    /// Counts POST requests to the token endpoint, whatever their outcome.
    pub fn token_requests(&self) -> usize {
        self.shared.token_requests.load(Ordering::SeqCst)
    }

    /// Counts requests to any other path, whatever their outcome.
    pub fn api_requests(&self) -> usize {
        self.shared.api_requests.load(Ordering::SeqCst)
    }

    /// Returns the decoded form fields of the last token request, in order.
    /// It is `None` before the first request and when the last one was not
    /// a form or was not valid UTF-8 after percent-decoding.
    pub fn last_token_form(&self) -> Option<Vec<(String, String)>> {
        self.shared.lock_state().last_token_form.clone()
    }

    /// Sets how the token endpoint misbehaves from the next request on.
    pub fn set_token_fault(&self, fault: Fault) {
        self.shared.lock_state().token_fault = fault;
    }

    /// Sets how the API endpoints misbehave from the next request on.
    pub fn set_api_fault(&self, fault: Fault) {
        self.shared.lock_state().api_fault = fault;
    }

    /// Puts `claim` in the `tenant` claim of later tokens instead of the
    /// tenant's id; `None` restores it.
    pub fn set_tenant_claim(&self, claim: Option<Value>) {
        self.shared.lock_state().tenant_claim = claim;
    }

    /// Serves the API endpoints under `prefix` only, such as `/gateway`, as
    /// a proxy in front of ServiceTitan would; other paths get 404.
    pub fn set_api_prefix(&self, prefix: &str) {
        self.shared.lock_state().api_prefix = prefix.to_owned();
    }

    /// Delays every later token response by `delay`, faulted ones included.
    pub fn set_token_delay(&self, delay: Duration) {
        self.shared.lock_state().token_delay = delay;
    }

    /// Sets the lifetime of later tokens in seconds. Zero or less issues
    /// tokens that are already expired.
    pub fn set_token_lifetime(&self, secs: i64) {
        self.shared.lock_state().token_lifetime_secs = secs;
    }

    /// Replaces `expires_in` of later token responses with `value` verbatim,
    /// or omits it for `Some(Value::Null)`. The token's real lifetime, which
    /// the API enforces, still follows [`FakeServiceTitan::set_token_lifetime`].
    pub fn set_expires_in_override(&self, value: Option<Value>) {
        self.shared.lock_state().expires_in_override = value;
    }

    /// Stops listening, closes every open connection (hanging ones too) and
    /// ends the server task shortly after.
    pub fn shutdown(&self) {
        // Sockets close before hanging handlers wake, so those handlers can
        // never deliver their response.
        close_all(&self.shared.connections);
        self.shared.shutdown.send_replace(true);
    }
}

// === impl Shared and FakeState ===

impl Shared {
    fn lock_state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until [`FakeServiceTitan::shutdown`] is called.
    fn wait_for_shutdown(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut receiver = self.shutdown.subscribe();
        async move {
            // An error means the sender is gone, which also ends the server.
            let _ = receiver.wait_for(|stopped| *stopped).await;
        }
    }
}

impl FakeState {
    fn new() -> FakeState {
        FakeState {
            apps: HashMap::new(),
            tokens: HashMap::new(),
            token_fault: Fault::None,
            api_fault: Fault::None,
            token_delay: Duration::ZERO,
            token_lifetime_secs: DEFAULT_TOKEN_LIFETIME_SECS,
            expires_in_override: None,
            last_token_form: None,
            api_prefix: String::new(),
            tenant_claim: None,
        }
    }
}

/// Returns the fault for the current request and clears a `FailOnce`.
fn take_fault(slot: &mut Fault) -> Fault {
    match slot {
        Fault::FailOnce(_) => std::mem::take(slot),
        other => other.clone(),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Token,
    Api,
}

/// Builds the response for an active fault, or returns `None` to process
/// the request normally.
async fn fault_response(shared: &Shared, fault: Fault, endpoint: Endpoint) -> Option<Response> {
    match fault {
        Fault::None => None,
        Fault::MissingAccessToken if endpoint == Endpoint::Api => None,
        Fault::MissingAccessToken => Some(token_json_response(json!({
            "expires_in": DEFAULT_TOKEN_LIFETIME_SECS,
            "token_type": "Bearer",
            "scope": ALL_PROBE_SCOPES.join(" "),
        }))),
        Fault::Status(code) | Fault::FailOnce(code) => Some(status_fault(code, endpoint)),
        Fault::RateLimited { retry_after_secs } => Some(rate_limited(retry_after_secs)),
        Fault::Garbage => Some(html_page(
            StatusCode::OK,
            "Service Unavailable",
            "The service is temporarily unavailable for maintenance.",
        )),
        Fault::Hang => {
            shared.wait_for_shutdown().await;
            // The socket is already closed, so this response is never sent.
            Some(StatusCode::SERVICE_UNAVAILABLE.into_response())
        }
    }
}

fn status_fault(code: u16, endpoint: Endpoint) -> Response {
    let status = StatusCode::from_u16(code)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let reason = status.canonical_reason().unwrap_or("Error");
    match (endpoint, status.as_u16()) {
        (Endpoint::Api, 500) => problem(status, reason, json!({})),
        (_, 500..) => html_page(status, reason, "The upstream server did not respond."),
        (Endpoint::Token, 401) => oauth_error_with_status(status, "invalid_client"),
        (Endpoint::Token, 403) => oauth_error_with_status(status, "unauthorized_client"),
        (Endpoint::Token, _) => oauth_error_with_status(status, "invalid_request"),
        (Endpoint::Api, _) => problem(status, reason, json!({})),
    }
}

// NOTE: the title copies Azure API Management's rate-limit message, on the
// assumption that the ServiceTitan gateway forwards it. The real body is not documented.
fn rate_limited(retry_after_secs: u64) -> Response {
    let title = format!("Rate limit is exceeded. Try again in {retry_after_secs} seconds.");
    let mut response = problem(StatusCode::TOO_MANY_REQUESTS, &title, json!({}));
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
    response
}

// === token endpoint ===

async fn token_endpoint(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.token_requests.fetch_add(1, Ordering::SeqCst);
    let form = if has_form_content_type(&headers) {
        decode_form(&body)
    } else {
        None
    };
    let (fault, delay) = {
        let mut state = shared.lock_state();
        state.last_token_form = form.clone();
        (take_fault(&mut state.token_fault), state.token_delay)
    };
    if !delay.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shared.wait_for_shutdown() => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
        }
    }
    if let Some(response) = fault_response(&shared, fault, Endpoint::Token).await {
        return response;
    }
    // IdentityServer, which the endpoint resembles, rejects a body that is
    // not a form with invalid_request.
    let Some(form) = form else {
        return oauth_error("invalid_request");
    };
    let issuer = format!("http://{}", shared.addr);
    match shared.lock_state().issue_token(&form, &issuer) {
        Ok(body) => token_json_response(body),
        Err(error) => oauth_error(error),
    }
}

impl FakeState {
    /// Validates a token request and returns the success JSON, or the OAuth
    /// error code. The checks run in the order of the error list below.
    ///
    /// NOTE: ServiceTitan does not document its token errors, so these codes
    /// follow RFC 6749 section 5.2. A repeated field, missing credentials or
    /// an Enterprise Hub request without a numeric `tenant` is invalid_request.
    /// A `tenant` outside the hub is invalid_grant.
    fn issue_token(
        &mut self,
        form: &[(String, String)],
        issuer: &str,
    ) -> Result<Value, &'static str> {
        if has_repeated_field(form) {
            return Err("invalid_request");
        }
        if form_field(form, "grant_type") != Some("client_credentials") {
            return Err("unsupported_grant_type");
        }
        let client_id = form_field(form, "client_id").filter(|v| !v.is_empty());
        let secret = form_field(form, "client_secret").filter(|v| !v.is_empty());
        let (Some(client_id), Some(secret)) = (client_id, secret) else {
            return Err("invalid_request");
        };
        let app = self.apps.get(client_id).ok_or("invalid_client")?;
        if !app.client_secrets.iter().any(|s| s == secret) {
            return Err("invalid_client");
        }
        let tenant = token_tenant(app, form_field(form, "tenant"))?;
        let scopes = granted_scopes(app, form_field(form, "scope"))?;

        let lifetime = self.token_lifetime_secs;
        let claim = self
            .tenant_claim
            .clone()
            .unwrap_or_else(|| json!(tenant.to_string()));
        let access_token = mint_jwt(issuer, client_id, claim, &scopes, lifetime);
        let scope_text = scopes.join(" ");
        self.remember_token(&access_token, client_id, tenant, scopes, lifetime);

        let mut body = json!({
            "access_token": access_token,
            "expires_in": lifetime,
            "token_type": "Bearer",
            "scope": scope_text,
        });
        match &self.expires_in_override {
            None => {}
            Some(Value::Null) => {
                body.as_object_mut().map(|o| o.remove("expires_in"));
            }
            Some(value) => body["expires_in"] = value.clone(),
        }
        Ok(body)
    }

    fn remember_token(
        &mut self,
        token: &str,
        client_id: &str,
        tenant: i64,
        scopes: Vec<String>,
        lifetime: i64,
    ) {
        // Forget expired tokens so a long-running demo does not grow forever.
        self.tokens.retain(|_, t| !t.is_expired());
        let now = Instant::now();
        let expires_at = match u64::try_from(lifetime) {
            Ok(secs) => now.checked_add(Duration::from_secs(secs)),
            Err(_) => Some(now),
        };
        let issued = IssuedToken {
            client_id: client_id.to_string(),
            tenant,
            scopes,
            expires_at,
        };
        self.tokens.insert(token.to_string(), issued);
    }
}

/// Picks the tenant a token is for. A plain connection ignores any `tenant`
/// field, because the real endpoint is assumed to ignore unknown fields.
fn token_tenant(app: &FakeApp, requested: Option<&str>) -> Result<i64, &'static str> {
    if app.enterprise_hub_tenants.is_empty() {
        return Ok(app.tenant_id);
    }
    let tenant = requested
        .and_then(|t| t.parse::<i64>().ok())
        .ok_or("invalid_request")?;
    if app.enterprise_hub_tenants.contains(&tenant) {
        Ok(tenant)
    } else {
        Err("invalid_grant")
    }
}

/// Grants every scope of the app, or the requested subset when the request
/// carries `scope`, as IdentityServer does for client credentials.
fn granted_scopes(app: &FakeApp, requested: Option<&str>) -> Result<Vec<String>, &'static str> {
    let Some(requested) = requested.filter(|r| !r.trim().is_empty()) else {
        return Ok(app.scopes.clone());
    };
    let mut scopes: Vec<String> = Vec::new();
    for scope in requested.split_whitespace() {
        if !app.scopes.iter().any(|s| s == scope) {
            return Err("invalid_scope");
        }
        if !scopes.iter().any(|s| s == scope) {
            scopes.push(scope.to_string());
        }
    }
    Ok(scopes)
}

/// Builds an RS256-shaped JWT whose signature is random bytes of the length
/// a 2048-bit RSA key produces, so only its payload means anything.
fn mint_jwt(
    issuer: &str,
    client_id: &str,
    tenant: Value,
    scopes: &[String],
    lifetime: i64,
) -> String {
    let issued_at = unix_now();
    let header = json!({ "alg": "RS256", "typ": "at+jwt" });
    let payload = json!({
        "nbf": issued_at,
        "exp": issued_at.saturating_add(lifetime),
        "iat": issued_at,
        "iss": issuer,
        "jti": uuid::Uuid::new_v4().to_string(),
        "client_id": client_id,
        "tenant": tenant,
        "scope": scopes,
    });
    let mut signature = [0u8; 256];
    rand::thread_rng().fill_bytes(&mut signature);
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(payload.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

fn unix_now() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX)
}

fn token_json_response(body: Value) -> Response {
    let mut response = (StatusCode::OK, axum::Json(body)).into_response();
    add_no_store(&mut response);
    response
}

fn oauth_error(code: &str) -> Response {
    oauth_error_with_status(StatusCode::BAD_REQUEST, code)
}

fn oauth_error_with_status(status: StatusCode, code: &str) -> Response {
    let mut response = (status, axum::Json(json!({ "error": code }))).into_response();
    add_no_store(&mut response);
    response
}

/// Marks a token response uncacheable, as RFC 6749 section 5.1 requires.
fn add_no_store(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

fn has_form_content_type(headers: &HeaderMap) -> bool {
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next());
    media_type.is_some_and(|m| {
        m.trim()
            .eq_ignore_ascii_case("application/x-www-form-urlencoded")
    })
}

fn form_field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// RFC 6749 section 3.2 forbids sending a request parameter more than once.
fn has_repeated_field(form: &[(String, String)]) -> bool {
    form.iter()
        .enumerate()
        .any(|(i, (name, _))| form[..i].iter().any(|(earlier, _)| earlier == name))
}

/// Decodes `application/x-www-form-urlencoded` bytes as the WHATWG URL
/// standard does, except that the result must be valid UTF-8 (`None`
/// otherwise) so that a secret compares byte for byte.
fn decode_form(body: &[u8]) -> Option<Vec<(String, String)>> {
    body.split(|b| *b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = match pair.iter().position(|b| *b == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &pair[pair.len()..]),
            };
            Some((percent_decode(name)?, percent_decode(value)?))
        })
        .collect()
}

/// Turns `+` into a space and `%XX` into its byte. A `%` without two hex
/// digits stays as it is.
fn percent_decode(input: &[u8]) -> Option<String> {
    let mut bytes = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let high = input.get(i + 1).and_then(|b| hex_digit(*b));
        let low = input.get(i + 2).and_then(|b| hex_digit(*b));
        match (input[i], high, low) {
            (b'%', Some(high), Some(low)) => {
                bytes.push(high << 4 | low);
                i += 3;
            }
            (b'+', _, _) => {
                bytes.push(b' ');
                i += 1;
            }
            (byte, _, _) => {
                bytes.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(bytes).ok()
}

fn hex_digit(byte: u8) -> Option<u8> {
    char::from(byte)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

// === API endpoints ===

async fn api_endpoint(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    shared.api_requests.fetch_add(1, Ordering::SeqCst);
    let fault = take_fault(&mut shared.lock_state().api_fault);
    if let Some(response) = fault_response(&shared, fault, Endpoint::Api).await {
        return response;
    }
    // NOTE: an unknown path or method gets API Management's own 404, on the
    // assumption that the gateway matches operations before checking keys.
    let prefix = shared.lock_state().api_prefix.clone();
    let probe = uri
        .path()
        .strip_prefix(prefix.as_str())
        .and_then(match_probe)
        .filter(|_| method == Method::GET);
    let Some((tenant, probe)) = probe else {
        return gateway_error(StatusCode::NOT_FOUND, "Resource not found");
    };
    if let Err(rejection) = shared.lock_state().authorize(&headers, tenant, probe) {
        return rejection.into_response();
    }
    list_page(uri.query().unwrap_or(""))
}

/// Finds the probe for a path `/{module}/v2/tenant/{tenant}/{resource}`.
fn match_probe(path: &str) -> Option<(i64, &'static Probe)> {
    let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
    let [module, "v2", "tenant", tenant, resource] = segments.as_slice() else {
        return None;
    };
    let tenant = tenant.parse::<i64>().ok()?;
    let probe = PROBES
        .iter()
        .find(|p| p.module == *module && p.resource == *resource)?;
    Some((tenant, probe))
}

/// Why an API call was rejected, each with the response the real service
/// is expected to send.
enum Rejection {
    AppKey,
    MissingToken,
    InvalidToken,
    TenantNotAllowed,
    MissingScope(&'static str),
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        match self {
            Rejection::AppKey => gateway_error(StatusCode::UNAUTHORIZED, APP_KEY_REJECTED_MESSAGE),
            Rejection::MissingToken => token_rejected("Missing access token", "Bearer"),
            Rejection::InvalidToken => token_rejected(
                "The access token is invalid or has expired",
                "Bearer error=\"invalid_token\"",
            ),
            Rejection::TenantNotAllowed => {
                problem(StatusCode::FORBIDDEN, TENANT_NOT_ALLOWED_TITLE, json!({}))
            }
            Rejection::MissingScope(scope) => {
                let title = format!("The access token does not grant the scope {scope}");
                problem(StatusCode::FORBIDDEN, &title, json!({}))
            }
        }
    }
}

impl FakeState {
    /// Checks an API call in the order the real service is expected to: the
    /// gateway's app key first, then the bearer token, the tenant and the scope.
    ///
    /// NOTE: ServiceTitan does not document what a disabled app gets. The
    /// fake returns the gateway's 401, as for an invalid app key.
    fn authorize(&self, headers: &HeaderMap, tenant: i64, probe: &Probe) -> Result<(), Rejection> {
        let app_key = headers
            .get("st-app-key")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .ok_or(Rejection::AppKey)?;
        // Several connections may share one app key, so the key stays valid
        // while any of them is enabled.
        let key_usable = self
            .apps
            .values()
            .any(|app| app.app_key == app_key && app.app_enabled);
        if !key_usable {
            return Err(Rejection::AppKey);
        }

        let presented = bearer_token(headers).ok_or(Rejection::MissingToken)?;
        let token = self.tokens.get(presented).filter(|t| !t.is_expired());
        let app = token.and_then(|t| self.apps.get(&t.client_id));
        let (Some(token), Some(app)) = (token, app) else {
            return Err(Rejection::InvalidToken);
        };

        // App keys identify apps, so a key of another app means that this
        // app is not the one connected through the presented key.
        if app.app_key != app_key || token.tenant != tenant || !app.tenant_connected {
            return Err(Rejection::TenantNotAllowed);
        }
        if !app.app_enabled {
            return Err(Rejection::AppKey);
        }
        // The scope must be in the token and still granted to the app, so a
        // scope removed behind a cached token's back is rejected at once.
        let in_token = token.scopes.iter().any(|s| s == probe.scope);
        let granted = app.scopes.iter().any(|s| s == probe.scope);
        if !(in_token && granted) {
            return Err(Rejection::MissingScope(probe.scope));
        }
        Ok(())
    }
}

/// Reads `Authorization: Bearer X`, or a bare `X` as in ServiceTitan's curl example.
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let token = match value.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
        _ => value,
    };
    (!token.is_empty()).then_some(token)
}

/// Returns an empty page, honouring `page` and `pageSize` (default 50).
fn list_page(query: &str) -> Response {
    let params = decode_form(query.as_bytes()).unwrap_or_default();
    let mut errors = serde_json::Map::new();
    let mut read_positive = |name: &str, default: i64| match form_field(&params, name) {
        None => default,
        Some(text) => match text.parse::<i64>() {
            Ok(n) if n >= 1 => n,
            _ => {
                let message = format!("The value '{text}' is not valid for {name}.");
                errors.insert(name.to_string(), json!([message]));
                default
            }
        },
    };
    let page = read_positive("page", 1);
    let page_size = read_positive("pageSize", 50);
    if !errors.is_empty() {
        let title = "One or more validation errors occurred.";
        return problem(StatusCode::BAD_REQUEST, title, Value::Object(errors));
    }
    let body = json!({
        "page": page,
        "pageSize": page_size,
        "totalCount": 0,
        "hasMore": false,
        "data": [],
    });
    (StatusCode::OK, axum::Json(body)).into_response()
}

fn token_rejected(title: &str, challenge: &'static str) -> Response {
    let mut response = problem(StatusCode::UNAUTHORIZED, title, json!({}));
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

/// Builds an Azure API Management error, which has its own body shape.
fn gateway_error(status: StatusCode, message: &str) -> Response {
    let body = json!({ "statusCode": status.as_u16(), "message": message });
    (status, axum::Json(body)).into_response()
}

/// Builds an RFC 7807 problem in ServiceTitan's shape.
fn problem(status: StatusCode, title: &str, errors: Value) -> Response {
    let body = json!({
        "type": problem_type(status),
        "title": title,
        "status": status.as_u16(),
        "traceId": trace_id(),
        "errors": errors,
        "data": {},
    });
    let content_type = [(
        header::CONTENT_TYPE,
        "application/problem+json; charset=utf-8",
    )];
    (status, content_type, body.to_string()).into_response()
}

/// Returns the RFC section that ASP.NET Core links as a problem's `type`.
fn problem_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "https://tools.ietf.org/html/rfc7231#section-6.5.1",
        401 => "https://tools.ietf.org/html/rfc7235#section-3.1",
        403 => "https://tools.ietf.org/html/rfc7231#section-6.5.3",
        404 => "https://tools.ietf.org/html/rfc7231#section-6.5.4",
        429 => "https://tools.ietf.org/html/rfc6585#section-4",
        _ => "https://tools.ietf.org/html/rfc7231#section-6.6.1",
    }
}

/// Builds a W3C trace context id, the form ASP.NET Core puts in `traceId`.
fn trace_id() -> String {
    let span_id: u64 = rand::random();
    format!("00-{}-{span_id:016x}-00", uuid::Uuid::new_v4().simple())
}

fn html_page(status: StatusCode, title: &str, text: &str) -> Response {
    let code = status.as_u16();
    let page = format!(
        "<html><head><title>{code} {title}</title></head>\
         <body><h1>{code} {title}</h1><p>{text}</p></body></html>"
    );
    (status, [(header::CONTENT_TYPE, "text/html")], page).into_response()
}

// === connection tracking ===

/// Open server-side sockets, kept so that shutdown can close connections
/// that a hanging handler would otherwise keep open.
#[derive(Default)]
struct Connections {
    closing: bool,
    next_id: u64,
    open: HashMap<u64, StdTcpStream>,
}

fn lock_connections(connections: &Mutex<Connections>) -> MutexGuard<'_, Connections> {
    connections.lock().unwrap_or_else(PoisonError::into_inner)
}

fn close_all(connections: &Mutex<Connections>) {
    let mut connections = lock_connections(connections);
    connections.closing = true;
    for socket in connections.open.values() {
        // An error means the peer already closed, which is the goal anyway.
        let _ = socket.shutdown(Shutdown::Both);
    }
}

/// A TCP listener that records a duplicate of each accepted socket.
struct TrackingListener {
    inner: TcpListener,
    connections: Arc<Mutex<Connections>>,
}

impl TrackingListener {
    fn track(&self, stream: TcpStream) -> io::Result<TrackedStream> {
        let stream = stream.into_std()?;
        let duplicate = stream.try_clone()?;
        let stream = TcpStream::from_std(stream)?;
        let mut connections = lock_connections(&self.connections);
        if connections.closing {
            let _ = duplicate.shutdown(Shutdown::Both);
        }
        let id = connections.next_id;
        connections.next_id += 1;
        connections.open.insert(id, duplicate);
        Ok(TrackedStream {
            stream,
            id,
            connections: self.connections.clone(),
        })
    }
}

impl axum::serve::Listener for TrackingListener {
    type Io = TrackedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TrackedStream, SocketAddr) {
        loop {
            let accepted = self.inner.accept().await;
            match accepted.and_then(|(stream, peer)| Ok((self.track(stream)?, peer))) {
                Ok(connection) => return connection,
                // Accept fails on conditions such as running out of file
                // descriptors, which may pass, so wait and retry.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An accepted socket that leaves the registry when the connection ends.
struct TrackedStream {
    stream: TcpStream,
    id: u64,
    connections: Arc<Mutex<Connections>>,
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        lock_connections(&self.connections).open.remove(&self.id);
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
