//! The `stvault.v1.Admin` gRPC service, and the client side of
//! `stvault backup`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use tonic::{Request, Response, Status};

use crate::api::VaultService;
use crate::auth::Rpc;
use crate::backup::Backup;
use crate::pb;
use crate::pb::admin_client::AdminClient;
use crate::pb::admin_server::Admin;
use crate::store::StoreError;
use crate::vault::Vault;

/// Size of one `BackupChunk`, well under gRPC's default 4 MiB message limit.
const CHUNK_SIZE: usize = 256 * 1024;

pub struct AdminService {
    vault: Arc<Vault>,
    /// The vault service, whose `observe` authenticates, authorizes and
    /// audits admin calls exactly like the vault's own.
    api: Arc<VaultService>,
}

impl AdminService {
    pub fn new(vault: Arc<Vault>, api: Arc<VaultService>) -> Self {
        Self { vault, api }
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::BackupChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Admin for AdminService {
    type CreateBackupStream = ChunkStream;

    async fn create_backup(
        &self,
        request: Request<pb::CreateBackupRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        self.api
            .observe(Rpc::CreateBackup, request, |_caller, _request| {
                self.snapshot_stream()
            })
            .await
    }
}

impl AdminService {
    async fn snapshot_stream(&self) -> Result<Response<ChunkStream>, Status> {
        let started = Instant::now();
        let snapshot = self.vault.store().snapshot().await.map_err(|e| {
            let status = match e {
                StoreError::Unsupported(reason) => Status::failed_precondition(reason),
                other => {
                    tracing::warn!(error = %other, "backup snapshot failed");
                    Status::internal("cannot read the data directory; see the server log")
                }
            };
            crate::metrics::record_rpc("CreateBackup", status.code(), started.elapsed());
            status
        })?;
        let backup = Backup::new(snapshot);
        let bytes = backup.encode();
        tracing::info!(
            connections = backup.connection_count,
            bytes = bytes.len(),
            latency_ms = started.elapsed().as_secs_f64() * 1000.0,
            "backup snapshot taken"
        );
        crate::metrics::record_rpc("CreateBackup", tonic::Code::Ok, started.elapsed());
        let chunks: Vec<Result<pb::BackupChunk, Status>> = bytes
            .chunks(CHUNK_SIZE)
            .map(|chunk| {
                Ok(pb::BackupChunk {
                    data: chunk.to_vec(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }
}

/// Environment variable holding the bearer key `stvault backup` sends.
pub const ADMIN_KEY_VARIABLE: &str = "STVAULT_ADMIN_KEY";

/// Fetches a backup from the server at `url` and checks it whole.
pub async fn fetch_backup(url: &str) -> Result<(Backup, Vec<u8>), String> {
    let mut client = AdminClient::connect(url.to_owned())
        .await
        .map_err(|e| format!("cannot connect to stvault at {url}: {e}"))?;
    let mut request = Request::new(pb::CreateBackupRequest {});
    // With a policy file, only an admin caller may take a backup.
    if let Ok(key) = std::env::var(ADMIN_KEY_VARIABLE) {
        let value = format!("Bearer {}", key.trim())
            .parse()
            .map_err(|_| format!("{ADMIN_KEY_VARIABLE} is not a valid bearer key"))?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut stream = client
        .create_backup(request)
        .await
        .map_err(|status| match status.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => format!(
                "CreateBackup failed: {}; set {ADMIN_KEY_VARIABLE} to the bearer key of an \
                 admin caller",
                status.message()
            ),
            _ => format!("CreateBackup failed: {}", status.message()),
        })?
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|status| format!("backup stream failed: {}", status.message()))?
    {
        bytes.extend_from_slice(&chunk.data);
    }
    let backup = Backup::decode(&bytes).map_err(|e| format!("received backup: {e}"))?;
    Ok((backup, bytes))
}
