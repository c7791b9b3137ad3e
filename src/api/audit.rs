//! `ListAuditEvents`: request checks, paging and conversion of events.

use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tonic::Status;

use crate::audit::{AuditLog, Filter, StoredEvent};
use crate::auth::Rpc;
use crate::commands::REWRAP_EVENT;
use crate::pb;

use super::{convert, validate};

/// Events read per call at most, so a selective filter over a long trail
/// returns a partial page with a token instead of scanning it all at once.
const SCAN_LIMIT: usize = 100_000;
const PAGE_TOKEN_PREFIX: &str = "audit:";
const MAX_CALLER_BYTES: usize = 256;

/// Returns one page of audit events matching the request's filters.
pub async fn list_events(
    audit: &AuditLog,
    request: pb::ListAuditEventsRequest,
) -> Result<pb::ListAuditEventsResponse, Status> {
    let page_size = validate::page_size(request.page_size)?;
    let after = page_token(&request.page_token)?;
    let filter = filter(request)?;
    let page = audit
        .list(after, page_size, SCAN_LIMIT, &filter)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "cannot read the audit trail");
            Status::internal("cannot read the audit trail; see the server log")
        })?;
    Ok(pb::ListAuditEventsResponse {
        events: page.events.iter().map(event).collect(),
        next_page_token: page
            .next_after
            .map(|sequence| URL_SAFE_NO_PAD.encode(format!("{PAGE_TOKEN_PREFIX}{sequence}")))
            .unwrap_or_default(),
    })
}

fn filter(request: pb::ListAuditEventsRequest) -> Result<Filter, Status> {
    let connection_id = match request.connection_id.as_str() {
        "" => None,
        id => Some(validate::connection_id("connection_id", id)?),
    };
    let environment = match request.environment {
        0 => None,
        value => Some(validate::environment("environment", value)?),
    };
    let tenant_id = match request.tenant_id {
        0 => None,
        value => Some(validate::tenant_id("tenant_id", value)?),
    };
    if request.caller.len() > MAX_CALLER_BYTES {
        return Err(validate::invalid(
            "caller",
            format!("is longer than {MAX_CALLER_BYTES} bytes"),
        ));
    }
    let names = || {
        Rpc::ALL
            .iter()
            .map(|rpc| rpc.as_str())
            .chain([REWRAP_EVENT])
    };
    let rpc = match request.rpc.as_str() {
        "" => None,
        name if names().any(|known| known == name) => Some(name.to_owned()),
        _ => {
            let names: Vec<&str> = names().collect();
            return Err(validate::invalid(
                "rpc",
                format!("must be one of {}", names.join(", ")),
            ));
        }
    };
    let start_time = time("start_time", request.start_time)?;
    let end_time = time("end_time", request.end_time)?;
    if let (Some(start), Some(end)) = (start_time, end_time) {
        if end <= start {
            return Err(validate::invalid("end_time", "must be after start_time"));
        }
    }
    Ok(Filter {
        connection_id,
        environment,
        tenant_id,
        caller: (!request.caller.is_empty()).then_some(request.caller),
        rpc,
        credential_version: (request.credential_version != 0).then_some(request.credential_version),
        start_time,
        end_time,
    })
}

fn time(field: &str, value: Option<prost_types::Timestamp>) -> Result<Option<SystemTime>, Status> {
    value
        .map(|timestamp| {
            SystemTime::try_from(timestamp)
                .map_err(|_| validate::invalid(field, "is not a valid timestamp"))
        })
        .transpose()
}

fn page_token(value: &str) -> Result<u64, Status> {
    if value.is_empty() {
        return Ok(0);
    }
    URL_SAFE_NO_PAD
        .decode(value)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| text.strip_prefix(PAGE_TOKEN_PREFIX)?.parse().ok())
        .ok_or_else(|| {
            validate::invalid(
                "page_token",
                "is not a token returned by ListAuditEvents; start again without it",
            )
        })
}

fn event(stored: &StoredEvent) -> pb::AuditEvent {
    let event = &stored.event;
    pb::AuditEvent {
        sequence: event.sequence,
        time: Some(event.time.into()),
        request_id: event.request_id.clone(),
        caller: event.caller.clone(),
        auth_method: event.auth_method.clone(),
        peer: event.peer.clone().unwrap_or_default(),
        rpc: event.rpc.clone(),
        connection_id: event.connection_id.clone().unwrap_or_default(),
        environment: event
            .environment
            .map_or(pb::Environment::Unspecified, convert::environment) as i32,
        tenant_id: event.tenant_id.unwrap_or_default(),
        credential_version: event.credential_version.unwrap_or_default(),
        code: event.code.clone(),
        hash: stored.hash.clone(),
        previous_hash: event.previous_hash.clone(),
    }
}
