//! The caller policy shared between replicas: one row, replaced by the
//! replica that loaded a policy file last, and announced on
//! `POLICY_CHANNEL` in the same statement.

use super::PostgresStore;
use crate::store::StoreError;

/// The notification channel; each payload is the new policy's SHA-256.
pub const POLICY_CHANNEL: &str = "stvault_policy";

/// A policy as stored: its text and the hex SHA-256 of that text.
pub struct SharedPolicy {
    pub document: String,
    pub sha256: String,
}

impl PostgresStore {
    /// Makes `policy` the one every enforcing replica applies, and
    /// notifies them when the statement commits.
    pub async fn publish_policy(
        &self,
        policy: &SharedPolicy,
        loaded_by: &str,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "WITH stored AS ( \
                 INSERT INTO stvault_policy (id, document, sha256, loaded_by) \
                 VALUES (true, $1, $2, $3) \
                 ON CONFLICT (id) DO UPDATE SET document = EXCLUDED.document, \
                 sha256 = EXCLUDED.sha256, loaded_by = EXCLUDED.loaded_by, loaded_at = now() \
                 RETURNING sha256) \
                 SELECT pg_notify($4, sha256) FROM stored",
                &[
                    &policy.document,
                    &policy.sha256,
                    &loaded_by,
                    &POLICY_CHANNEL,
                ],
            )
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Returns the shared policy, if a replica has stored one.
    pub async fn read_policy(&self) -> Result<Option<SharedPolicy>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT document, sha256 FROM stvault_policy", &[])
            .await
            .map_err(|e| self.error(e))?;
        Ok(row.map(|row| SharedPolicy {
            document: row.get(0),
            sha256: row.get(1),
        }))
    }
}
