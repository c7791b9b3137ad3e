//! The PostgreSQL backend of `Store`, for several replicas sharing one
//! database. Records are stored as the same sealed bytes as in sled, next to
//! their environment and tenant, which a unique constraint keeps to one
//! connection per tenant. Every write is a single statement or one
//! transaction, committed before it returns.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime,
};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{ConnectionRecord, StoreError, decode, encode};
use crate::crypto::Sealed;
use crate::model::Environment;

mod changes;
mod policy;
mod schema;
mod settings;
mod tokens;

pub use changes::{CHANGES_CHANNEL, Change};
pub use policy::{POLICY_CHANNEL, SharedPolicy};
pub use tokens::{Claim, ClaimRequest, Lease, SharedToken, TokenBinding};

pub use settings::{
    DatabaseSettings, DatabaseUrl, ENV_DATABASE_CA, ENV_DATABASE_URL, ENV_DATABASE_URL_FILE,
    read_url,
};

/// Maximum open connections per server. Every statement is short, so a few
/// connections serve many concurrent calls.
const MAX_CONNECTIONS: usize = 8;
/// How long a call waits for a pooled connection or for a new one, so calls
/// fail with UNAVAILABLE soon after the database goes away.
const POOL_TIMEOUT: Duration = Duration::from_secs(5);

/// The PostgreSQL backend of `Store`.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// The database without its password, for errors.
    target: Arc<str>,
    /// For the connection that listens for changes, outside the pool.
    listener: Arc<ListenerSettings>,
}

struct ListenerSettings {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
}

impl PostgresStore {
    /// Connects to the database and applies pending schema migrations.
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self, StoreError> {
        let store = Self::connect_unmigrated(settings)?;
        let mut client = store.client().await?;
        schema::migrate(&mut client, &store.target).await?;
        Ok(store)
    }

    /// Sets up the connection pool without touching the schema, for
    /// commands that only read. Connections open on first use.
    pub fn connect_unmigrated(settings: &DatabaseSettings) -> Result<Self, StoreError> {
        let target: Arc<str> = settings.target().into();
        let tls = tls_connector(settings)
            .map_err(|e| StoreError::Database(format!("{target}: cannot set up TLS: {e}")))?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = Manager::from_config(settings.config.clone(), tls.clone(), manager_config);
        let pool = Pool::builder(manager)
            .max_size(MAX_CONNECTIONS)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .build()
            .map_err(|e| {
                StoreError::Database(format!("{target}: cannot build the connection pool: {e}"))
            })?;
        Ok(Self {
            pool,
            target,
            listener: Arc::new(ListenerSettings {
                config: settings.config.clone(),
                tls,
            }),
        })
    }

    /// Returns a pooled connection.
    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| pool_error(&self.target, e))
    }

    /// Classifies a failed statement, naming the database.
    pub(crate) fn error(&self, error: tokio_postgres::Error) -> StoreError {
        database_error(&self.target, error)
    }

    /// Returns the database without its password, for messages.
    pub fn target(&self) -> &str {
        &self.target
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    pub async fn count(&self) -> Result<usize, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT count(*) FROM stvault_connections", &[])
            .await
            .map_err(|e| self.error(e))?;
        let count: i64 = row.get(0);
        Ok(usize::try_from(count).unwrap_or(usize::MAX))
    }

    pub async fn get_bytes(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT record FROM stvault_connections WHERE id = $1")
            .await
            .map_err(|e| self.error(e))?;
        let row = client
            .query_opt(&statement, &[&id])
            .await
            .map_err(|e| self.error(e))?;
        Ok(row.map(|row| row.get(0)))
    }

    /// Returns the id and stored bytes of the tenant's record.
    pub async fn find_by_tenant(
        &self,
        environment: Environment,
        tenant_id: i64,
    ) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT id, record FROM stvault_connections \
                 WHERE environment = $1 AND tenant_id = $2",
            )
            .await
            .map_err(|e| self.error(e))?;
        let row = client
            .query_opt(&statement, &[&environment.as_str(), &tenant_id])
            .await
            .map_err(|e| self.error(e))?;
        Ok(row.map(|row| (row.get(0), row.get(1))))
    }

    pub async fn insert(&self, record: &ConnectionRecord) -> Result<(), StoreError> {
        let client = self.client().await?;
        self.insert_with(&client, record).await
    }

    /// Inserts every record in one transaction: all of them or none.
    pub async fn insert_batch(&self, records: &[ConnectionRecord]) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(|e| self.error(e))?;
        for record in records {
            self.insert_with(&transaction, record).await?;
        }
        transaction.commit().await.map_err(|e| self.error(e))
    }

    /// Inserts one record with `client`, which may be a transaction. A
    /// record whose tenant already has a connection is `TenantTaken`.
    async fn insert_with(
        &self,
        client: &impl GenericClient,
        record: &ConnectionRecord,
    ) -> Result<(), StoreError> {
        // ON CONFLICT DO NOTHING waits for a concurrent insert of the same
        // tenant to commit, so the lookup below then finds its row.
        let inserted = client
            .execute(
                "INSERT INTO stvault_connections (id, environment, tenant_id, record) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                &[
                    &record.id,
                    &record.environment.as_str(),
                    &record.tenant_id,
                    &encode(record),
                ],
            )
            .await
            .map_err(|e| self.error(e))?;
        if inserted == 1 {
            return Ok(());
        }
        let existing = client
            .query_opt(
                "SELECT id FROM stvault_connections WHERE environment = $1 AND tenant_id = $2",
                &[&record.environment.as_str(), &record.tenant_id],
            )
            .await
            .map_err(|e| self.error(e))?;
        match existing {
            Some(row) => Err(StoreError::TenantTaken {
                environment: record.environment,
                tenant_id: record.tenant_id,
                existing_id: row.get(0),
            }),
            // The id itself was taken, or the tenant's connection was
            // deleted right after it blocked this insert.
            None => Err(StoreError::Conflict(record.id.clone())),
        }
    }

    pub async fn replace(
        &self,
        previous_bytes: &[u8],
        next: &ConnectionRecord,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        // The notification is sent when the update commits, so the other
        // servers drop what they cached of the connection.
        let statement = client
            .prepare_cached(&format!(
                "WITH updated AS (UPDATE stvault_connections SET record = $2 \
                 WHERE id = $1 AND record = $3 RETURNING id) \
                 SELECT pg_notify('{CHANGES_CHANNEL}', id) FROM updated"
            ))
            .await
            .map_err(|e| self.error(e))?;
        let updated = client
            .query(&statement, &[&next.id, &encode(next), &previous_bytes])
            .await
            .map_err(|e| self.error(e))?;
        if updated.is_empty() {
            return Err(StoreError::Conflict(next.id.clone()));
        }
        Ok(())
    }

    /// Deletes a connection and returns its stored bytes.
    pub async fn delete(&self, id: &str) -> Result<Vec<u8>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "WITH deleted AS (DELETE FROM stvault_connections WHERE id = $1 \
                     RETURNING id, record) \
                     SELECT record, pg_notify('{CHANGES_CHANNEL}', id) FROM deleted"
                ),
                &[&id],
            )
            .await
            .map_err(|e| self.error(e))?;
        match row {
            Some(row) => Ok(row.get(0)),
            None => Err(StoreError::NotFound(id.to_owned())),
        }
    }

    /// Returns up to `limit` (id, bytes) pairs with ids after `after`, in id
    /// order.
    pub async fn page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let client = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = match after {
            Some(after) => {
                client
                    .query(
                        "SELECT id, record FROM stvault_connections WHERE id > $1 \
                         ORDER BY id LIMIT $2",
                        &[&after, &limit],
                    )
                    .await
            }
            None => {
                client
                    .query(
                        "SELECT id, record FROM stvault_connections ORDER BY id LIMIT $1",
                        &[&limit],
                    )
                    .await
            }
        }
        .map_err(|e| self.error(e))?;
        Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    }

    pub async fn check_values(&self) -> Result<Vec<(String, Sealed)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT key_id, sealed FROM stvault_master_key_checks ORDER BY key_id",
                &[],
            )
            .await
            .map_err(|e| self.error(e))?;
        let mut values = Vec::new();
        for row in rows {
            let key_id: String = row.get(0);
            let bytes: Vec<u8> = row.get(1);
            let sealed: Sealed = decode(&format!("master key check {key_id}"), &bytes)?;
            values.push((key_id, sealed));
        }
        Ok(values)
    }

    pub async fn put_check_value(&self, key_id: &str, sealed: &Sealed) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO stvault_master_key_checks (key_id, sealed) VALUES ($1, $2) \
                 ON CONFLICT (key_id) DO UPDATE SET sealed = EXCLUDED.sealed",
                &[&key_id, &encode(sealed)],
            )
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    pub async fn remove_check_value(&self, key_id: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM stvault_master_key_checks WHERE key_id = $1",
                &[&key_id],
            )
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }
}

/// Builds the TLS connector. Without TLS roots the URL asked for no TLS,
/// so the connection runs with `sslmode=disable` and never uses it.
fn tls_connector(settings: &DatabaseSettings) -> Result<MakeRustlsConnect, rustls::Error> {
    let roots = settings
        .tls_roots
        .clone()
        .unwrap_or_else(|| Arc::new(rustls::RootCertStore::empty()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// Classifies a failed statement. Lost connections and a database that is
/// shutting down or not accepting connections are `Unavailable`; errors
/// that PostgreSQL reports about a statement are `Database`.
fn database_error(target: &str, error: tokio_postgres::Error) -> StoreError {
    // The error's own text is only "db error" when PostgreSQL sent one.
    let message = match error.as_db_error() {
        Some(db_error) => format!("{target}: {db_error}"),
        None => format!("{target}: {}", with_causes(&error)),
    };
    let Some(code) = error.code() else {
        return StoreError::Unavailable(message);
    };
    let code = code.code();
    // Class 08 is connection exceptions; 57P01 to 57P03 are admin shutdown,
    // crash shutdown and cannot connect now; 53300 is too many connections.
    let unavailable =
        code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300");
    if unavailable || error.is_closed() {
        StoreError::Unavailable(message)
    } else {
        StoreError::Database(message)
    }
}

/// Formats an error followed by its causes, which tokio-postgres leaves out
/// of its own text (such as "Connection refused" after "error connecting to
/// server").
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(&format!(": {inner}"));
        cause = inner.source();
    }
    text
}

fn pool_error(target: &str, error: PoolError) -> StoreError {
    match error {
        PoolError::Backend(error) => database_error(target, error),
        other => StoreError::Unavailable(format!("{target}: {other}")),
    }
}
