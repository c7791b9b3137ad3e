//! `WatchConnectionStatus`: forwards health state changes of the connections
//! a watcher selected, each change once, until the watcher leaves or the
//! server shuts down.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{broadcast, mpsc, watch};
use tonic::Status;

use crate::health::{HealthState, StatusEvent};
use crate::model::Environment;
use crate::pb;
use crate::vault::Vault;

use super::convert;

/// Events buffered per watcher before the forwarder waits for it.
pub const WATCH_BUFFER: usize = 16;

/// Connections selected by a watcher; a `None` field matches any.
pub struct StatusFilter {
    pub connection_id: Option<String>,
    pub tenant_id: Option<i64>,
    pub environment: Option<Environment>,
}

impl StatusFilter {
    fn matches(&self, connection_id: &str, environment: Environment, tenant_id: i64) -> bool {
        self.connection_id
            .as_deref()
            .is_none_or(|id| id == connection_id)
            && self.tenant_id.is_none_or(|t| t == tenant_id)
            && self.environment.is_none_or(|e| e == environment)
    }
}

pub type EventSender = mpsc::Sender<Result<pb::ConnectionStatusEvent, Status>>;

/// Checks that the watcher is still allowed to watch under the policy in
/// force.
pub type Recheck = Box<dyn Fn() -> Result<(), Status> + Send + Sync>;

/// How often an open watch checks its caller against the policy, besides
/// before each event.
const RECHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Starts forwarding to `sender`. Subscribes before reading the current
/// states, so no change between the two is lost.
pub async fn start(
    vault: &Vault,
    filter: StatusFilter,
    send_current_state: bool,
    sender: EventSender,
    recheck: Recheck,
) -> Result<(), Status> {
    let events = vault.subscribe_status();
    let mut current = Vec::new();
    if send_current_state {
        let mut records = std::pin::pin!(vault.store().records());
        while let Some(record) = records.next().await {
            let record = record.map_err(|e| super::status::to_status(e.into()))?;
            let Some(health) = record.health else {
                continue;
            };
            if filter.matches(&record.id, record.environment, record.tenant_id) {
                current.push(StatusEvent {
                    connection_id: record.id,
                    environment: record.environment,
                    tenant_id: record.tenant_id,
                    previous: None,
                    health,
                });
            }
        }
    }
    let watcher = Watcher {
        filter,
        stopping: vault.stopping(),
        sender,
        recheck,
    };
    tokio::spawn(forward(events, current, watcher));
    Ok(())
}

/// One open watch.
struct Watcher {
    filter: StatusFilter,
    stopping: watch::Receiver<bool>,
    sender: EventSender,
    recheck: Recheck,
}

impl Watcher {
    /// Ends the watch with the policy's denial if its caller may no longer
    /// watch; returns whether it did.
    async fn denied(&self) -> bool {
        match (self.recheck)() {
            Ok(()) => false,
            Err(status) => {
                let _ = self.sender.send(Err(status)).await;
                true
            }
        }
    }
}

async fn forward(
    mut events: broadcast::Receiver<StatusEvent>,
    current: Vec<StatusEvent>,
    watcher: Watcher,
) {
    let Watcher {
        filter,
        stopping,
        sender,
        ..
    } = &watcher;
    let mut stopping = stopping.clone();
    let mut recheck = tokio::time::interval(RECHECK_INTERVAL);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The state last sent per connection, so a change already reported by
    // the current-state events is not sent again.
    let mut last_sent: HashMap<String, HealthState> = HashMap::new();
    for event in current {
        last_sent.insert(event.connection_id.clone(), event.health.state);
        if sender
            .send(Ok(convert::status_event(&event, true)))
            .await
            .is_err()
        {
            return;
        }
    }
    loop {
        let received = tokio::select! {
            received = events.recv() => received,
            _ = recheck.tick() => {
                if watcher.denied().await {
                    return;
                }
                continue;
            }
            () = sender.closed() => return,
            () = stopped(&mut stopping) => {
                let status = Status::unavailable("stvault is shutting down; watch again");
                let _ = sender.send(Err(status)).await;
                return;
            }
        };
        let event = match received {
            Ok(event) => event,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                let status = Status::aborted(format!(
                    "this watch fell {missed} events behind; watch again with send_current_state set"
                ));
                let _ = sender.send(Err(status)).await;
                return;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if !filter.matches(&event.connection_id, event.environment, event.tenant_id) {
            continue;
        }
        if last_sent.get(&event.connection_id) == Some(&event.health.state) {
            continue;
        }
        if watcher.denied().await {
            return;
        }
        last_sent.insert(event.connection_id.clone(), event.health.state);
        if sender
            .send(Ok(convert::status_event(&event, false)))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Completes when the server shuts down.
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    // An error means the vault is gone, which also ends the watch.
    let _ = stopping.wait_for(|stopping| *stopping).await;
}
