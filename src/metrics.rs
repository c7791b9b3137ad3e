//! Prometheus metrics, served as OpenMetrics text on `GET /metrics` of a
//! separate listener (`STVAULT_METRICS_LISTEN`, off by default).
//!
//! Metrics live in one process-wide registry, so the RPC layer and the
//! broker record into it with one call and no handle to pass around. Label
//! values are method names, status codes, outcomes, environments and
//! states, never a secret, token or connection id. Tenant ids appear only on
//! upstream token requests, only when `STVAULT_METRICS_TENANT_LABELS` is set,
//! and for at most `MAX_TENANT_LABELS` distinct tenants.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use axum::http::header::CONTENT_TYPE;
use futures::StreamExt;
use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;

use crate::model::Environment;
use crate::servicetitan::TokenError;
use crate::store::{ConnectionRecord, Store};

/// Distinct tenant ids labelled before further tenants share the label
/// value "other", so opting in cannot grow the series count without bound.
pub const MAX_TENANT_LABELS: usize = 1000;
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct UpstreamLabels {
    environment: String,
    outcome: String,
    /// Empty, and then left out of the label set, unless tenant labels are
    /// enabled.
    tenant_id: String,
}

impl EncodeLabelSet for UpstreamLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let mut labels = vec![
            ("environment", self.environment.as_str()),
            ("outcome", self.outcome.as_str()),
        ];
        if !self.tenant_id.is_empty() {
            labels.push(("tenant_id", self.tenant_id.as_str()));
        }
        labels.encode(encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EnvironmentLabels {
    environment: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    environment: String,
    state: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets from 1 ms to about 33 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

struct Metrics {
    registry: Registry,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_duration: HistogramFamily<MethodLabels>,
    token_cache: Family<CacheLabels, Counter>,
    shared_token_claims: Family<CacheLabels, Counter>,
    upstream_requests: Family<UpstreamLabels, Counter>,
    upstream_duration: HistogramFamily<EnvironmentLabels>,
    connections: Family<ConnectionLabels, Gauge>,
    audit_events: Counter,
    audit_spooled: Gauge,
    tenant_labels: AtomicBool,
    labelled_tenants: Mutex<HashSet<i64>>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let rpc_requests = Family::default();
        registry.register(
            "stvault_rpc_requests",
            "gRPC requests handled, by method and status code",
            rpc_requests.clone(),
        );

        let rpc_duration = HistogramFamily::new_with_constructor(latency_histogram as fn() -> _);
        registry.register_with_unit(
            "stvault_rpc_duration",
            "Time to handle a gRPC request, by method",
            Unit::Seconds,
            rpc_duration.clone(),
        );

        let token_cache = Family::default();
        registry.register(
            "stvault_token_cache_requests",
            "Token lookups served from the cache (hit) or needing an upstream request (miss)",
            token_cache.clone(),
        );

        let shared_token_claims = Family::default();
        registry.register(
            "stvault_shared_token_claims",
            "With PostgreSQL, how each token need was met: a token another replica stored \
             (shared), a lease to request one (leased), a wait for another replica's request \
             (busy), a rate-limit pause (paused), out-of-date credentials (stale), or a request \
             made without the database (unshared)",
            shared_token_claims.clone(),
        );

        let upstream_requests = Family::default();
        registry.register(
            "stvault_upstream_token_requests",
            "Token requests sent to ServiceTitan, by environment and outcome",
            upstream_requests.clone(),
        );

        let upstream_duration =
            HistogramFamily::new_with_constructor(latency_histogram as fn() -> _);
        registry.register_with_unit(
            "stvault_upstream_token_duration",
            "Time for ServiceTitan to answer a token request, by environment",
            Unit::Seconds,
            upstream_duration.clone(),
        );

        let connections = Family::default();
        registry.register(
            "stvault_connections",
            "Stored connections by environment and state, counted at scrape time",
            connections.clone(),
        );

        let audit_events = Counter::default();
        registry.register(
            "stvault_audit_events_written",
            "Audit events written durably",
            audit_events.clone(),
        );

        let audit_spooled = Gauge::default();
        registry.register(
            "stvault_audit_spooled_events",
            "Audit events in this server's local spool, written while the database was \
             unreachable and not yet forwarded to it",
            audit_spooled.clone(),
        );

        Self {
            registry,
            rpc_requests,
            rpc_duration,
            token_cache,
            shared_token_claims,
            upstream_requests,
            upstream_duration,
            connections,
            audit_events,
            audit_spooled,
            tenant_labels: AtomicBool::new(false),
            labelled_tenants: Mutex::new(HashSet::new()),
        }
    }

    fn tenant_label(&self, tenant_id: i64) -> String {
        if !self.tenant_labels.load(Ordering::Relaxed) {
            return String::new();
        }
        let mut seen = self
            .labelled_tenants
            .lock()
            .expect("tenant label set is never poisoned");
        if seen.contains(&tenant_id) || seen.len() < MAX_TENANT_LABELS {
            seen.insert(tenant_id);
            tenant_id.to_string()
        } else {
            "other".into()
        }
    }
}

/// Turns the `tenant_id` label of upstream token requests on or off.
pub fn set_tenant_labels(enabled: bool) {
    METRICS.tenant_labels.store(enabled, Ordering::Relaxed);
}

/// Records one finished RPC with its gRPC status code and latency.
pub fn record_rpc(method: &str, code: tonic::Code, latency: Duration) {
    let metrics = &*METRICS;
    metrics
        .rpc_requests
        .get_or_create(&RpcLabels {
            method: method.to_owned(),
            code: format!("{code:?}"),
        })
        .inc();
    metrics
        .rpc_duration
        .get_or_create(&MethodLabels {
            method: method.to_owned(),
        })
        .observe(latency.as_secs_f64());
}

/// Records a token lookup served from the cache (`hit`) or not (`miss`).
pub fn record_token_cache(hit: bool) {
    let result = if hit { "hit" } else { "miss" };
    METRICS
        .token_cache
        .get_or_create(&CacheLabels {
            result: result.into(),
        })
        .inc();
}

/// Records how a replica sharing tokens through PostgreSQL met one need
/// for a token.
pub fn record_shared_token_claim(result: &'static str) {
    METRICS
        .shared_token_claims
        .get_or_create(&CacheLabels {
            result: result.into(),
        })
        .inc();
}

/// Records a finished upstream token request.
pub fn record_upstream_token<T>(
    environment: Environment,
    tenant_id: i64,
    result: &Result<T, TokenError>,
    latency: Duration,
) {
    let metrics = &*METRICS;
    let outcome = match result {
        Ok(_) => "ok",
        Err(TokenError::Rejected { .. }) => "rejected",
        Err(TokenError::RateLimited { .. }) => "rate_limited",
        Err(TokenError::Unavailable(_)) => "unavailable",
        Err(TokenError::InvalidResponse(_)) => "invalid_response",
        Err(TokenError::OtherTenant { .. }) => "other_tenant",
    };
    metrics
        .upstream_requests
        .get_or_create(&UpstreamLabels {
            environment: environment.as_str().into(),
            outcome: outcome.into(),
            tenant_id: metrics.tenant_label(tenant_id),
        })
        .inc();
    metrics
        .upstream_duration
        .get_or_create(&EnvironmentLabels {
            environment: environment.as_str().into(),
        })
        .observe(latency.as_secs_f64());
}

/// Records one audit event written durably.
pub fn record_audit_event() {
    METRICS.audit_events.inc();
}

/// Sets the number of audit events in the local spool that are not yet
/// forwarded to the database.
pub fn set_audit_spooled(events: u64) {
    METRICS
        .audit_spooled
        .set(i64::try_from(events).unwrap_or(i64::MAX));
}

/// Returns the state a connection is counted under: its health state
/// (`healthy`, `degraded`, `needs_attention`) once a verification has run,
/// else `unchecked`.
pub fn connection_state(record: &ConnectionRecord) -> &'static str {
    match &record.health {
        Some(health) => health.state.as_str(),
        None => "unchecked",
    }
}

/// Returns the metrics as OpenMetrics text, with connection counts read
/// from `store` now.
pub async fn render(store: &Store) -> String {
    let metrics = &*METRICS;
    let mut counts: BTreeMap<(Environment, &'static str), i64> = BTreeMap::new();
    let mut records = std::pin::pin!(store.records());
    while let Some(record) = records.next().await {
        let Ok(record) = record else {
            continue;
        };
        *counts
            .entry((record.environment, connection_state(&record)))
            .or_default() += 1;
    }
    metrics.connections.clear();
    for ((environment, state), count) in counts {
        metrics
            .connections
            .get_or_create(&ConnectionLabels {
                environment: environment.as_str().into(),
                state: state.into(),
            })
            .set(count);
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &metrics.registry)
        .expect("writing to a String does not fail");
    text
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    store: Store,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let store = store.clone();
            async move {
                let body = render(&store).await;
                ([(CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body)
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
