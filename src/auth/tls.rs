//! TLS settings of the gRPC listener: the server certificate and key, and
//! the CA that client certificates must chain to when mutual TLS is on.
//! Files are read and parsed at startup, so a bad file stops the server
//! with a message naming the setting.

use std::path::Path;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::secret::SecretBytes;

/// Longest TLS handshake accepted before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// PEM contents of the TLS files, checked to parse.
#[derive(Clone)]
pub struct TlsFiles {
    certificate_chain: Vec<u8>,
    key: SecretBytes,
    /// CA bundle for client certificates; set for mutual TLS.
    client_ca: Option<Vec<u8>>,
}

impl TlsFiles {
    /// Reads and checks the files named by `STVAULT_TLS_CERT`,
    /// `STVAULT_TLS_KEY` and `STVAULT_CLIENT_CA`.
    pub fn load(
        certificate: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<TlsFiles, Vec<String>> {
        let mut errors = Vec::new();
        let certificate_chain = read_certificates("STVAULT_TLS_CERT", certificate)
            .map_err(|e| errors.push(e))
            .ok();
        let key = read_key(key).map_err(|e| errors.push(e)).ok();
        let client_ca = match client_ca {
            Some(path) => read_certificates("STVAULT_CLIENT_CA", path)
                .map_err(|e| errors.push(e))
                .ok(),
            None => None,
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        let unwrap = "checked: errors is empty only when every file parsed";
        Ok(TlsFiles {
            certificate_chain: certificate_chain.expect(unwrap),
            key: key.expect(unwrap),
            client_ca,
        })
    }

    pub fn requires_client_certificates(&self) -> bool {
        self.client_ca.is_some()
    }

    /// Builds the tonic server configuration: ALPN `h2`, and client
    /// certificates required when a client CA is set.
    pub fn server_config(&self) -> ServerTlsConfig {
        let identity = Identity::from_pem(&self.certificate_chain, self.key.expose());
        let mut config = ServerTlsConfig::new()
            .identity(identity)
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        config
    }
}

/// Reads a PEM file of certificates, checking that it has at least one.
/// Errors start with `setting`.
pub(crate) fn read_certificates(setting: &str, path: &Path) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path)
        .map_err(|e| format!("{setting}: cannot read {}: {e}", path.display()))?;
    let certificates: Vec<CertificateDer<'_>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{setting}: {} is not valid PEM: {e}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!(
            "{setting}: {} holds no PEM CERTIFICATE block",
            path.display()
        ));
    }
    Ok(pem)
}

fn read_key(path: &Path) -> Result<SecretBytes, String> {
    use std::os::unix::fs::PermissionsExt;
    let pem = SecretBytes::new(
        std::fs::read(path)
            .map_err(|e| format!("STVAULT_TLS_KEY: cannot read {}: {e}", path.display()))?,
    );
    PrivateKeyDer::from_pem_slice(pem.expose()).map_err(|e| {
        format!(
            "STVAULT_TLS_KEY: {} holds no usable PEM private key ({e})",
            path.display()
        )
    })?;
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0);
    if mode & 0o077 != 0 {
        // A warning only: secret volumes in container platforms are often
        // mounted with mode 0644 inside a private directory.
        tracing::warn!(
            path = %path.display(),
            mode = format!("{mode:o}"),
            "the TLS private key file is readable by other users; run chmod 600 on it"
        );
    }
    Ok(pem)
}
