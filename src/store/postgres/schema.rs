//! Schema migrations, embedded in the binary and run at startup. They run
//! in one transaction under a transaction-level advisory lock, so replicas
//! that start together apply each migration once (the version table records
//! it), and a failed migration rolls back with the whole transaction.

use deadpool_postgres::Client;

use super::database_error;
use crate::store::StoreError;

/// A schema change, applied once and recorded in `stvault_schema_migrations`.
struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

/// Every migration, in the order they apply. Never edit a released one:
/// add the next instead. `migrate` applies every listed version that the
/// database lacks, in list order.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "connections",
        sql: include_str!("migrations/0001_connections.sql"),
    },
    Migration {
        version: 2,
        name: "audit",
        sql: include_str!("migrations/0002_audit.sql"),
    },
    Migration {
        version: 3,
        name: "tokens",
        sql: include_str!("migrations/0003_tokens.sql"),
    },
    Migration {
        version: 4,
        name: "audit_spool",
        sql: include_str!("migrations/0004_audit_spool.sql"),
    },
    Migration {
        version: 5,
        name: "policy",
        sql: include_str!("migrations/0005_policy.sql"),
    },
    Migration {
        version: 6,
        name: "policy_seal",
        sql: include_str!("migrations/0006_policy_seal.sql"),
    },
];

/// Key of the transaction-level advisory lock that serializes migrations
/// ("stvault" in ASCII).
const MIGRATION_LOCK_KEY: i64 = 0x0073_7476_6175_6c74;

const CREATE_VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS stvault_schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// Applies the migrations that the version table does not list yet.
/// Rejects a database whose schema version is newer than any migration of
/// this binary.
pub async fn migrate(client: &mut Client, target: &str) -> Result<(), StoreError> {
    let error = |e| database_error(target, e);
    let transaction = client.transaction().await.map_err(error)?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(error)?;
    transaction
        .batch_execute(CREATE_VERSION_TABLE)
        .await
        .map_err(error)?;
    let applied: Vec<i32> = transaction
        .query("SELECT version FROM stvault_schema_migrations", &[])
        .await
        .map_err(error)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let known = MIGRATIONS.last().map_or(0, |m| m.version);
    if let Some(newest) = applied.iter().copied().filter(|v| *v > known).max() {
        return Err(StoreError::Database(format!(
            "{target}: the schema is at version {newest}, but this stvault knows versions up to \
             {known}; upgrade stvault"
        )));
    }
    for migration in MIGRATIONS {
        if applied.contains(&migration.version) {
            continue;
        }
        transaction
            .batch_execute(migration.sql)
            .await
            .map_err(error)?;
        transaction
            .execute(
                "INSERT INTO stvault_schema_migrations (version, name) VALUES ($1, $2)",
                &[&migration.version, &migration.name],
            )
            .await
            .map_err(error)?;
        tracing::info!(
            database = %target,
            migration.version = migration.version,
            migration.name = migration.name,
            "database migration applied"
        );
    }
    transaction.commit().await.map_err(error)?;
    Ok(())
}
