//! Change notifications between servers that share a database. Every update
//! or deletion of a connection sends its id on `CHANGES_CHANNEL` when it
//! commits (`pg_notify` in the same statement). Every server listens on a
//! connection of its own. A rotation or deletion made through one server
//! therefore drops the cached credentials and tokens of the others. A
//! policy stored by one server is announced on `POLICY_CHANNEL` the same
//! way.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_postgres::AsyncMessage;

use super::PostgresStore;
use super::policy::POLICY_CHANNEL;

/// The notification channel; each payload is one connection id.
pub const CHANGES_CHANNEL: &str = "stvault_connections";
/// Wait before connecting again after the listening connection is lost.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// A change: to one connection, to the shared caller policy, or to
/// anything (after the listening connection was lost, when notifications
/// may have been missed).
#[derive(Debug, PartialEq, Eq)]
pub enum Change<'a> {
    Connection(&'a str),
    Policy,
    Unknown,
}

impl PostgresStore {
    /// Calls `on_change` for every change another server (or this one)
    /// commits, until `stopping` turns true. Reconnects when the listening
    /// connection is lost, and reports `Change::Unknown` each time it
    /// starts listening.
    pub async fn watch_changes(
        &self,
        on_change: impl Fn(Change<'_>),
        mut stopping: watch::Receiver<bool>,
    ) {
        let mut connected_before = false;
        loop {
            let listened = tokio::select! {
                _ = stopping.wait_for(|stopping| *stopping) => return,
                listened = self.listen(&on_change, &mut connected_before) => listened,
            };
            if let Err(error) = listened {
                tracing::warn!(
                    database = %self.target,
                    %error,
                    "lost the connection that listens for changes from other servers; \
                     reconnecting"
                );
            }
            tokio::select! {
                _ = stopping.wait_for(|stopping| *stopping) => return,
                () = tokio::time::sleep(RECONNECT_DELAY) => {}
            }
        }
    }

    /// Listens until the connection ends.
    async fn listen(
        &self,
        on_change: &impl Fn(Change<'_>),
        connected_before: &mut bool,
    ) -> Result<(), tokio_postgres::Error> {
        let settings = &self.listener;
        let (client, mut connection) = settings.config.connect(settings.tls.clone()).await?;
        let (sender, mut received) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message? {
                    AsyncMessage::Notification(notification) => {
                        let policy = notification.channel() == POLICY_CHANNEL;
                        let _ = sender.send((policy, notification.payload().to_owned()));
                    }
                    AsyncMessage::Notice(_) => {}
                    _ => {}
                }
            }
            Ok::<(), tokio_postgres::Error>(())
        });
        let listening = client
            .batch_execute(&format!(
                "LISTEN {CHANGES_CHANNEL}; LISTEN {POLICY_CHANNEL}"
            ))
            .await;
        if let Err(error) = listening {
            driver.abort();
            return Err(error);
        }
        // Changes committed before this LISTEN, while the connection was
        // down or before the first one, reached no one here.
        on_change(Change::Unknown);
        if *connected_before {
            tracing::info!(database = %self.target, "listening for changes again");
        }
        *connected_before = true;
        while let Some((policy, payload)) = received.recv().await {
            if policy {
                on_change(Change::Policy);
            } else {
                on_change(Change::Connection(&payload));
            }
        }
        // The driver dropped its sender: the connection ended.
        drop(client);
        match driver.await {
            Ok(result) => result,
            Err(_) => Ok(()),
        }
    }
}
