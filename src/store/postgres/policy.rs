//! The caller policy shared between replicas: one row, replaced by the
//! replica that loaded a policy file last, and announced on
//! `POLICY_CHANNEL` in the same statement.

use super::PostgresStore;
use crate::crypto::Sealed;
use crate::store::StoreError;

/// The notification channel; each payload is the new policy's SHA-256.
pub const POLICY_CHANNEL: &str = "stvault_policy";

/// A policy as stored: its text, the hex SHA-256 of that text, and the seal
/// of that SHA-256 under a master key.
pub struct SharedPolicy {
    pub document: String,
    pub sha256: String,
    /// Id of the master key that sealed the policy. `None`, as is `seal`,
    /// for a row stored before policies were sealed.
    pub master_key_id: Option<String>,
    pub seal: Option<Sealed>,
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
        let seal = policy.seal.as_ref().map(Sealed::as_bytes);
        client
            .execute(
                "WITH stored AS ( \
                 INSERT INTO stvault_policy (id, document, sha256, master_key_id, seal, loaded_by) \
                 VALUES (true, $1, $2, $3, $4, $5) \
                 ON CONFLICT (id) DO UPDATE SET document = EXCLUDED.document, \
                 sha256 = EXCLUDED.sha256, master_key_id = EXCLUDED.master_key_id, \
                 seal = EXCLUDED.seal, loaded_by = EXCLUDED.loaded_by, loaded_at = now() \
                 RETURNING sha256) \
                 SELECT pg_notify($6, sha256) FROM stored",
                &[
                    &policy.document,
                    &policy.sha256,
                    &policy.master_key_id,
                    &seal,
                    &loaded_by,
                    &POLICY_CHANNEL,
                ],
            )
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Returns the shared policy, if a replica has stored one. The caller
    /// verifies the seal.
    pub async fn read_policy(&self) -> Result<Option<SharedPolicy>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT document, sha256, master_key_id, seal FROM stvault_policy",
                &[],
            )
            .await
            .map_err(|e| self.error(e))?;
        Ok(row.map(|row| SharedPolicy {
            document: row.get(0),
            sha256: row.get(1),
            master_key_id: row.get(2),
            seal: row.get::<_, Option<Vec<u8>>>(3).map(Sealed::from_bytes),
        }))
    }
}
