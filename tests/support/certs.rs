//! Test certificates made with rcgen: a CA, a server certificate for
//! 127.0.0.1 and localhost, and client certificates, written as PEM files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate and its private key as PEM files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A test certificate authority writing its files into a directory.
pub struct Pki {
    dir: PathBuf,
    name: String,
    ca: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate as PEM.
    pub ca_path: PathBuf,
}

impl Pki {
    /// Creates a CA called `name`, its certificate written to `NAME-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Pki {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca_path = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_path, ca.pem()).unwrap();
        Pki {
            dir: dir.to_owned(),
            name: name.to_owned(),
            ca,
            ca_path,
        }
    }

    /// Issues the server certificate for 127.0.0.1 and localhost.
    pub fn server(&self) -> CertFiles {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "stvault test server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue("server", params)
    }

    /// Issues a client certificate whose URI SAN is `identity`.
    pub fn client(&self, file_name: &str, identity: &str) -> CertFiles {
        self.issue(file_name, client_params(identity))
    }

    /// Issues a client certificate that expired in 2021.
    pub fn expired_client(&self, file_name: &str, identity: &str) -> CertFiles {
        let mut params = client_params(identity);
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        self.issue(file_name, params)
    }

    fn issue(&self, file_name: &str, params: CertificateParams) -> CertFiles {
        use std::os::unix::fs::PermissionsExt;
        let key = KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.ca).unwrap();
        let files = CertFiles {
            cert: self.dir.join(format!("{}-{file_name}.pem", self.name)),
            key: self.dir.join(format!("{}-{file_name}.key", self.name)),
        };
        std::fs::write(&files.cert, certificate.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o600)).unwrap();
        files
    }
}

fn client_params(identity: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "stvault test client");
    params.subject_alt_names = vec![SanType::URI(identity.try_into().unwrap())];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}
