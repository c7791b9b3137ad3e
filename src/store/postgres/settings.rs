//! The PostgreSQL connection settings: the database URL, which contains a
//! password, and the TLS roots. Errors and `Debug` name the user, host,
//! port and database, never the password.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_postgres::config::{Host, SslMode};

use crate::secret::SecretString;

/// Setting names, for messages.
pub const ENV_DATABASE_URL: &str = "STVAULT_DATABASE_URL";
pub const ENV_DATABASE_URL_FILE: &str = "STVAULT_DATABASE_URL_FILE";
pub const ENV_DATABASE_CA: &str = "STVAULT_DATABASE_CA";

/// Connect timeout used when the URL sets none.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const EXAMPLE_URL: &str = "postgres://USER:PASSWORD@HOST:5432/DATABASE";

/// Validated settings of a PostgreSQL database.
#[derive(Clone)]
pub struct DatabaseSettings {
    /// The parsed URL, password included.
    // NOTE: tokio-postgres keeps the password in a plain `Vec<u8>`, so it is
    // not zeroized when the settings are dropped.
    pub(super) config: tokio_postgres::Config,
    /// Root certificates the server's certificate must chain to, when the
    /// URL requests TLS.
    pub(super) tls_roots: Option<Arc<RootCertStore>>,
    /// `postgres://USER@HOST:PORT/DATABASE`, for logs and errors.
    target: String,
    /// The setting the URL came from, for errors.
    setting: &'static str,
}

/// A database URL and the setting it came from.
pub struct DatabaseUrl {
    pub text: SecretString,
    /// `STVAULT_DATABASE_URL` or `STVAULT_DATABASE_URL_FILE`, for errors.
    pub setting: &'static str,
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl(<from {} redacted>)", self.setting)
    }
}

impl fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("target", &self.target)
            .field("tls", &self.tls_roots.is_some())
            .finish_non_exhaustive()
    }
}

impl DatabaseSettings {
    /// Parses a `postgres://` URL and reads the CA file. `sslmode=require`,
    /// `verify-ca` and `verify-full` turn on TLS, and each verifies the
    /// server's certificate chain and host name, against `ca_file` if set,
    /// else the Mozilla roots of `webpki-roots`. `sslmode=disable` or no
    /// `sslmode` means plain TCP. `prefer` and `allow` are rejected,
    /// because they fall back to plain TCP without saying so.
    ///
    /// Errors start with the setting they are about, and never contain the
    /// URL's password.
    pub fn parse(url: &DatabaseUrl, ca_file: Option<&Path>) -> Result<Self, String> {
        let setting = url.setting;
        let text = url.text.expose().trim();
        if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
            return Err(format!("{setting}: expected a URL such as {EXAMPLE_URL}"));
        }
        let (text, ssl_mode) = take_ssl_mode(text);
        let text = SecretString::new(text);

        let mut config: tokio_postgres::Config = text.expose().parse().map_err(|e| {
            format!("{setting}: invalid URL ({e}); expected a URL such as {EXAMPLE_URL}")
        })?;
        if config.get_hosts().is_empty() {
            return Err(format!(
                "{setting}: the URL names no host; expected a URL such as {EXAMPLE_URL}"
            ));
        }
        if config.get_user().is_none_or(str::is_empty) {
            return Err(format!(
                "{setting}: the URL names no user; expected a URL such as {EXAMPLE_URL}"
            ));
        }
        let target = describe(&config);

        let tls = uses_tls(setting, ssl_mode.as_deref())?;
        let tls_roots = match (tls, ca_file) {
            (true, Some(path)) => Some(Arc::new(read_roots(path)?)),
            (true, None) => Some(Arc::new(RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            })),
            (false, Some(_)) => {
                return Err(format!(
                    "{ENV_DATABASE_CA} is set but {setting} does not request TLS; add \
                     sslmode=verify-full to the URL, or unset {ENV_DATABASE_CA}"
                ));
            }
            (false, None) => None,
        };

        config.ssl_mode(if tls {
            SslMode::Require
        } else {
            SslMode::Disable
        });

        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("stvault");
        }
        Ok(Self {
            config,
            tls_roots,
            target,
            setting,
        })
    }

    /// Returns the database as `postgres://USER@HOST:PORT/DATABASE`,
    /// without the password.
    pub fn target(&self) -> &str {
        &self.target
    }

    pub fn uses_tls(&self) -> bool {
        self.tls_roots.is_some()
    }

    /// Returns the setting the URL came from.
    pub fn setting(&self) -> &'static str {
        self.setting
    }
}

/// Returns whether `sslmode` turns on TLS, rejecting the modes that could
/// fall back to plain TCP and unknown ones.
fn uses_tls(setting: &str, ssl_mode: Option<&str>) -> Result<bool, String> {
    match ssl_mode {
        None | Some("disable") => Ok(false),
        Some("require" | "verify-ca" | "verify-full") => Ok(true),
        Some(mode @ ("allow" | "prefer")) => Err(format!(
            "{setting}: sslmode={mode} would fall back to an unencrypted connection \
             without notice; set sslmode=verify-full for TLS, or sslmode=disable"
        )),
        Some(_) => Err(format!(
            "{setting}: sslmode must be disable, require, verify-ca or verify-full"
        )),
    }
}

/// Removes every `sslmode` query parameter from a URL, because
/// tokio-postgres 0.7 accepts only `disable`, `prefer` and `require`. Returns
/// the rest of the URL and the last `sslmode` value.
fn take_ssl_mode(url: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None);
    };
    let mut ssl_mode = None;
    let mut kept = Vec::new();
    for parameter in query.split('&') {
        match parameter.split_once('=') {
            Some(("sslmode", value)) => ssl_mode = Some(value.to_owned()),
            _ => kept.push(parameter),
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (rest, ssl_mode)
}

/// Describes the database without its password.
fn describe(config: &tokio_postgres::Config) -> String {
    let user = config.get_user().unwrap_or_default();
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(index, host)| {
            let name = match host {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            };
            // A single port applies to every host; none means 5432.
            let port = ports.get(index).or(ports.first()).copied().unwrap_or(5432);
            format!("{name}:{port}")
        })
        .collect();
    let database = config.get_dbname().unwrap_or(user);
    format!("postgres://{user}@{}/{database}", hosts.join(","))
}

fn read_roots(path: &Path) -> Result<RootCertStore, String> {
    let pem = crate::auth::tls::read_certificates(ENV_DATABASE_CA, path)?;
    let mut roots = RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(&pem) {
        let added = certificate
            .map_err(|e| e.to_string())
            .and_then(|certificate| roots.add(certificate).map_err(|e| e.to_string()));
        added.map_err(|e| {
            format!(
                "{ENV_DATABASE_CA}: {} holds an unusable certificate: {e}",
                path.display()
            )
        })?;
    }
    Ok(roots)
}

/// Reads the database URL from `STVAULT_DATABASE_URL` or the file named by
/// `STVAULT_DATABASE_URL_FILE`; setting both is an error.
pub fn read_url(
    env_url: Option<SecretString>,
    file: Option<&PathBuf>,
) -> Result<DatabaseUrl, String> {
    match (env_url, file) {
        (Some(_), Some(_)) => Err(format!(
            "{ENV_DATABASE_URL} and {ENV_DATABASE_URL_FILE} are both set; set only one"
        )),
        (Some(text), None) => Ok(DatabaseUrl {
            text,
            setting: ENV_DATABASE_URL,
        }),
        (None, Some(path)) => {
            crate::config::check_private_file_mode(path, "database URL file")
                .map_err(|e| format!("{ENV_DATABASE_URL_FILE}: {e}"))?;
            let text = std::fs::read_to_string(path).map_err(|e| {
                format!(
                    "{ENV_DATABASE_URL_FILE}: cannot read {}: {e}",
                    path.display()
                )
            })?;
            let text = SecretString::new(text);
            Ok(DatabaseUrl {
                text: SecretString::new(text.expose().trim().to_owned()),
                setting: ENV_DATABASE_URL_FILE,
            })
        }
        (None, None) => Err(format!(
            "STVAULT_STORAGE=postgres needs the database URL: set {ENV_DATABASE_URL} or \
             {ENV_DATABASE_URL_FILE} (a file containing it), such as {EXAMPLE_URL}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWORD: &str = "SENTINEL-db-password-31f7";

    fn from_env(url: &str) -> DatabaseUrl {
        DatabaseUrl {
            text: SecretString::new(url.to_owned()),
            setting: ENV_DATABASE_URL,
        }
    }

    fn parse(url: &str) -> Result<DatabaseSettings, String> {
        DatabaseSettings::parse(&from_env(url), None)
    }

    #[test]
    fn target_omits_password() {
        let settings = parse(&format!(
            "postgres://stvault:{PASSWORD}@127.0.0.1:5433/vault"
        ))
        .unwrap();
        assert_eq!(settings.target(), "postgres://stvault@127.0.0.1:5433/vault");
        assert!(!settings.uses_tls());
        let debug = format!("{settings:?}");
        assert!(!debug.contains(PASSWORD), "{debug}");
    }

    #[test]
    fn errors_never_echo_password() {
        let bad = [
            format!("postgres://stvault:{PASSWORD}@127.0.0.1:notaport/vault"),
            format!("postgres://stvault:{PASSWORD}@127.0.0.1/vault?sslmode=prefer"),
            format!("postgres://stvault:{PASSWORD}@127.0.0.1/vault?sslmode=bogus"),
            format!("postgres://stvault:{PASSWORD}@127.0.0.1/vault?nosuchoption=1"),
            format!("postgres://stvault:{PASSWORD}@/vault"),
            format!("host=127.0.0.1 user=stvault password={PASSWORD}"),
            format!("postgres://:{PASSWORD}@127.0.0.1/vault"),
        ];
        for url in bad {
            let error = parse(&url).expect_err(&url);
            assert!(error.starts_with(ENV_DATABASE_URL), "{error}");
            assert!(!error.contains(PASSWORD), "{error}");
        }
    }

    #[test]
    fn ssl_modes_choose_tls() {
        for mode in ["require", "verify-ca", "verify-full"] {
            let settings = parse(&format!(
                "postgresql://stvault@db.example:5432/vault?sslmode={mode}&application_name=x"
            ))
            .unwrap();
            assert!(settings.uses_tls(), "sslmode={mode}");
        }
        let plain = parse("postgres://stvault@127.0.0.1/vault?sslmode=disable").unwrap();
        assert!(!plain.uses_tls());
    }

    #[test]
    fn ca_file_needs_tls() {
        let error = DatabaseSettings::parse(
            &from_env("postgres://stvault@127.0.0.1/vault"),
            Some(Path::new("/nonexistent/ca.pem")),
        )
        .unwrap_err();
        assert!(error.starts_with(ENV_DATABASE_CA), "{error}");
    }

    #[test]
    fn unreadable_ca_file_names_setting() {
        let error = DatabaseSettings::parse(
            &from_env("postgres://stvault@127.0.0.1/vault?sslmode=verify-full"),
            Some(Path::new("/nonexistent/ca.pem")),
        )
        .unwrap_err();
        assert!(error.starts_with(ENV_DATABASE_CA), "{error}");
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
    }

    #[test]
    fn url_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("url");
        std::fs::write(
            &path,
            format!("postgres://stvault:{PASSWORD}@127.0.0.1/vault\n"),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = read_url(None, Some(&path)).unwrap_err();
        assert!(error.contains("chmod 600"), "{error}");
        assert!(!error.contains(PASSWORD), "{error}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let url = read_url(None, Some(&path)).unwrap();
        assert_eq!(
            url.text.expose(),
            format!("postgres://stvault:{PASSWORD}@127.0.0.1/vault")
        );
        assert_eq!(url.setting, ENV_DATABASE_URL_FILE);
        let error =
            DatabaseSettings::parse(&url, Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(error.contains(ENV_DATABASE_URL_FILE), "{error}");
    }

    #[test]
    fn url_from_env_or_file_not_both() {
        let url = || Some(SecretString::new("postgres://a@b/c".into()));
        let file = PathBuf::from("/nonexistent/url");
        let error = read_url(url(), Some(&file)).unwrap_err();
        assert!(error.contains("both set"), "{error}");
        let error = read_url(None, None).unwrap_err();
        assert!(error.contains(ENV_DATABASE_URL), "{error}");
        assert_eq!(
            read_url(url(), None).unwrap().text.expose(),
            "postgres://a@b/c"
        );
    }
}
