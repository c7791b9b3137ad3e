//! Settings of `stvault serve`, from flags or `STVAULT_*` environment
//! variables. Secrets come from a file or the environment, never a flag.
//! Every problem is collected and reported together before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use crate::audit::SyncPolicy;
use crate::auth::policy::Policy;
use crate::auth::tls::TlsFiles;
use crate::broker::BrokerSettings;
use crate::health::HealthSettings;
use crate::secret::SecretString;
use crate::servicetitan::{self, ClientConfig, Endpoints};
use crate::store::postgres::{self, DatabaseSettings};

pub const ENV_MASTER_KEY: &str = "STVAULT_MASTER_KEY";
pub const DEFAULT_KEY_FILE_NAME: &str = "master.key";

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address of the gRPC listener. A non-loopback address requires TLS
    /// and a policy file.
    #[arg(long, env = "STVAULT_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,

    /// Directory of the embedded database and the audit trail (created if
    /// missing, mode 0700). With PostgreSQL storage it holds the lock, the
    /// generated master key and, while the database is unreachable, the
    /// audit spool (audit-spool.jsonl), so give each replica a persistent
    /// directory of its own.
    #[arg(long, env = "STVAULT_DATA_DIR", default_value = "./stvault-data")]
    pub data_dir: PathBuf,

    /// Storage of connection records: "sled", the embedded database in the
    /// data directory, or "postgres", a PostgreSQL database that several
    /// servers can share. PostgreSQL needs STVAULT_DATABASE_URL or
    /// STVAULT_DATABASE_URL_FILE.
    #[arg(long, env = "STVAULT_STORAGE", default_value = DEFAULT_STORAGE)]
    pub storage: String,

    /// File containing the PostgreSQL URL, such as
    /// postgres://USER:PASSWORD@HOST:5432/DATABASE?sslmode=verify-full.
    /// STVAULT_DATABASE_URL may contain the URL instead.
    #[arg(long, env = "STVAULT_DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,

    /// PEM CA certificates that the PostgreSQL server's certificate must
    /// chain to, instead of the Mozilla roots. Needs sslmode=verify-full (or
    /// require or verify-ca) in the URL.
    #[arg(long, env = "STVAULT_DATABASE_CA")]
    pub database_ca: Option<PathBuf>,

    /// File with the master keyring: one base64 key (32 bytes) per line,
    /// optionally preceded by its id, oldest first. New data is wrapped under
    /// the last key. The file must not be readable by group or others.
    /// STVAULT_MASTER_KEY may contain the same text instead.
    #[arg(long, env = "STVAULT_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,

    /// Token endpoint for production credentials.
    #[arg(long, env = "STVAULT_PRODUCTION_TOKEN_URL", default_value = servicetitan::PRODUCTION_TOKEN_URL)]
    pub production_token_url: String,

    /// API base URL for production.
    #[arg(long, env = "STVAULT_PRODUCTION_API_URL", default_value = servicetitan::PRODUCTION_API_URL)]
    pub production_api_url: String,

    /// Token endpoint for integration (sandbox) credentials.
    #[arg(long, env = "STVAULT_INTEGRATION_TOKEN_URL", default_value = servicetitan::INTEGRATION_TOKEN_URL)]
    pub integration_token_url: String,

    /// API base URL for integration (sandbox).
    #[arg(long, env = "STVAULT_INTEGRATION_API_URL", default_value = servicetitan::INTEGRATION_API_URL)]
    pub integration_api_url: String,

    /// Timeout for connecting to ServiceTitan, such as "5s" or "500ms".
    #[arg(long, env = "STVAULT_UPSTREAM_CONNECT_TIMEOUT", default_value = "5s")]
    pub upstream_connect_timeout: String,

    /// Timeout for a whole request to ServiceTitan, such as "10s".
    #[arg(long, env = "STVAULT_UPSTREAM_TIMEOUT", default_value = "10s")]
    pub upstream_timeout: String,

    /// How long callers get the error of a failed token request before the
    /// next call tries ServiceTitan again. A 429 uses its Retry-After instead.
    #[arg(long, env = "STVAULT_TOKEN_FAILURE_COOLDOWN", default_value = "2s")]
    pub token_failure_cooldown: String,

    /// Time between two background verifications of each connection, such
    /// as "15m", or "off". Each costs one token request and ten API calls.
    #[arg(long, env = "STVAULT_HEALTH_CHECK_INTERVAL", default_value = "15m")]
    pub health_check_interval: String,

    /// Maximum background verifications running at once.
    #[arg(long, env = "STVAULT_HEALTH_CHECK_CONCURRENCY", default_value_t = 4)]
    pub health_check_concurrency: usize,

    /// PEM certificate chain of the gRPC listener; with STVAULT_TLS_KEY it
    /// turns on TLS.
    #[arg(long, env = "STVAULT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of the listener's certificate.
    #[arg(long, env = "STVAULT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates that client certificates must chain to. Setting
    /// it makes a client certificate required (mutual TLS).
    #[arg(long, env = "STVAULT_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,

    /// TOML policy naming each caller, its roles and its tenants. Without
    /// it, on a loopback listener, every caller may do everything.
    /// Reloaded on SIGHUP.
    #[arg(long, env = "STVAULT_POLICY_FILE")]
    pub policy_file: Option<PathBuf>,

    /// After SIGTERM or SIGINT, how long in-flight RPCs may take to finish
    /// before open connections are closed, such as "10s".
    #[arg(long, env = "STVAULT_SHUTDOWN_GRACE", default_value = DEFAULT_SHUTDOWN_GRACE)]
    pub shutdown_grace: String,

    /// Address of the Prometheus metrics listener (GET /metrics), such as
    /// 127.0.0.1:9090. Metrics are off when unset.
    #[arg(long, env = "STVAULT_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,

    /// Address of a plaintext listener that serves only the gRPC health
    /// service, for probes that cannot speak TLS (such as Kubernetes gRPC
    /// probes), such as 0.0.0.0:8081. Off when unset.
    #[arg(long, env = "STVAULT_HEALTH_LISTEN")]
    pub health_listen: Option<String>,

    /// When audit events reach the disk. "always" syncs each event before
    /// its call returns, and calls in flight share a sync. A duration such
    /// as "10ms" writes each event before its call returns and syncs within
    /// that time, so a power loss can lose that much of the trail. With
    /// PostgreSQL storage each event is committed, or synced to the audit
    /// spool, before its call returns, and this setting does not apply.
    #[arg(long, env = "STVAULT_AUDIT_SYNC", default_value = "always")]
    pub audit_sync: String,

    /// Label upstream token request metrics with the tenant id, for at most
    /// 1000 tenants.
    #[arg(long, env = "STVAULT_METRICS_TENANT_LABELS")]
    pub metrics_tenant_labels: bool,
}

pub const DEFAULT_SHUTDOWN_GRACE: &str = "10s";
pub const DEFAULT_STORAGE: &str = "sled";

/// Settings of the metrics listener.
#[derive(Clone, Debug)]
pub struct MetricsSettings {
    pub listen: SocketAddr,
    /// Whether upstream token request metrics carry a `tenant_id` label.
    pub tenant_labels: bool,
}

/// Source of the master keyring.
pub enum MasterKeySource {
    File(PathBuf),
    Environment(crate::secret::SecretString),
    /// The embedded default: a key file in the data directory, generated on
    /// first start.
    DataDir(PathBuf),
}

/// Storage of connection records.
#[derive(Debug)]
pub enum Storage {
    /// sled, in the data directory.
    Sled,
    /// A PostgreSQL database, which several servers may share.
    Postgres(Box<DatabaseSettings>),
}

pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub storage: Storage,
    pub master_key: MasterKeySource,
    pub client: ClientConfig,
    pub broker: BrokerSettings,
    pub health: HealthSettings,
    /// TLS files; plaintext when unset.
    pub tls: Option<TlsFiles>,
    /// The policy file and its validated contents; every caller is allowed
    /// when unset.
    pub policy: Option<(PathBuf, Policy)>,
    pub shutdown_grace: Duration,
    pub audit_sync: SyncPolicy,
    pub metrics: Option<MetricsSettings>,
    pub health_listen: Option<SocketAddr>,
}

impl Config {
    /// Validates the arguments, returning every problem found.
    pub fn from_args(args: ServeArgs) -> Result<Config, Vec<String>> {
        let mut errors = Vec::new();

        let listen = match args.listen.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                errors.push(
                    "STVAULT_LISTEN: expected an address and port such as 127.0.0.1:50051".into(),
                );
                None
            }
        };

        let master_key = master_key_source(args.master_key_file, &args.data_dir)
            .and_then(|source| crate::keyring::check_configured(&source).map(|()| source))
            .map_err(|e| errors.push(e))
            .ok();
        let storage = storage(
            &args.storage,
            args.database_url_file.as_ref(),
            args.database_ca.as_deref(),
        )
        .map_err(|e| errors.push(e))
        .ok();

        type Parse = fn(&str, &str) -> Result<url::Url, String>;
        let mut url = |parse: Parse, setting: &str, value: &str| match parse(setting, value) {
            Ok(url) => Some(url),
            Err(message) => {
                errors.push(message);
                None
            }
        };
        let (token, api): (Parse, Parse) = (
            servicetitan::parse_endpoint,
            servicetitan::parse_api_endpoint,
        );
        let production_token = url(
            token,
            "STVAULT_PRODUCTION_TOKEN_URL",
            &args.production_token_url,
        );
        let production_api = url(api, "STVAULT_PRODUCTION_API_URL", &args.production_api_url);
        let integration_token = url(
            token,
            "STVAULT_INTEGRATION_TOKEN_URL",
            &args.integration_token_url,
        );
        let integration_api = url(
            api,
            "STVAULT_INTEGRATION_API_URL",
            &args.integration_api_url,
        );

        let mut duration = |setting: &str, value: &str| match parse_duration(value) {
            Ok(d) => Some(d),
            Err(message) => {
                errors.push(format!("{setting}: {message}"));
                None
            }
        };
        let connect_timeout = duration(
            "STVAULT_UPSTREAM_CONNECT_TIMEOUT",
            &args.upstream_connect_timeout,
        );
        let request_timeout = duration("STVAULT_UPSTREAM_TIMEOUT", &args.upstream_timeout);
        let cooldown = duration(
            "STVAULT_TOKEN_FAILURE_COOLDOWN",
            &args.token_failure_cooldown,
        );
        let shutdown_grace = duration("STVAULT_SHUTDOWN_GRACE", &args.shutdown_grace);
        let audit_sync = parse_audit_sync(&args.audit_sync)
            .map_err(|e| errors.push(format!("STVAULT_AUDIT_SYNC: {e}")))
            .ok();

        let metrics_listen = match args.metrics_listen.as_deref().filter(|v| !v.is_empty()) {
            None => None,
            Some(value) => match value.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    errors.push(
                        "STVAULT_METRICS_LISTEN: expected an address and port such as 127.0.0.1:9090"
                            .into(),
                    );
                    None
                }
            },
        };
        let health_listen = match args.health_listen.as_deref().filter(|v| !v.is_empty()) {
            None => None,
            Some(value) => match value.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    errors.push(
                        "STVAULT_HEALTH_LISTEN: expected an address and port such as 0.0.0.0:8081"
                            .into(),
                    );
                    None
                }
            },
        };
        if args.metrics_tenant_labels && metrics_listen.is_none() {
            errors.push(
                "STVAULT_METRICS_TENANT_LABELS is set but metrics are off; set STVAULT_METRICS_LISTEN too"
                    .into(),
            );
        }

        let health_interval = match parse_check_interval(&args.health_check_interval) {
            Ok(interval) => Some(interval),
            Err(message) => {
                errors.push(format!("STVAULT_HEALTH_CHECK_INTERVAL: {message}"));
                None
            }
        };
        if !(1..=MAX_HEALTH_CHECK_CONCURRENCY).contains(&args.health_check_concurrency) {
            errors.push(format!(
                "STVAULT_HEALTH_CHECK_CONCURRENCY: must be between 1 and {MAX_HEALTH_CHECK_CONCURRENCY}"
            ));
        }
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => match TlsFiles::load(cert, key, args.client_ca.as_deref()) {
                Ok(files) => Some(files),
                Err(tls_errors) => {
                    errors.extend(tls_errors);
                    None
                }
            },
            (None, None) => {
                if args.client_ca.is_some() {
                    errors.push(
                        "STVAULT_CLIENT_CA: client certificates need TLS; set STVAULT_TLS_CERT \
                         and STVAULT_TLS_KEY too"
                            .into(),
                    );
                }
                None
            }
            _ => {
                errors.push("STVAULT_TLS_CERT and STVAULT_TLS_KEY must be set together".into());
                None
            }
        };
        let policy = match &args.policy_file {
            Some(path) => match Policy::load(path) {
                Ok(policy) => Some((path.clone(), policy)),
                Err(message) => {
                    errors.push(format!("STVAULT_POLICY_FILE: {message}"));
                    None
                }
            },
            None => None,
        };
        if let Some(addr) = listen {
            let secured = args.tls_cert.is_some() && args.policy_file.is_some();
            if !addr.ip().is_loopback() && !secured {
                errors.push(format!(
                    "STVAULT_LISTEN: {addr} is not a loopback address; a network listener needs \
                     TLS (STVAULT_TLS_CERT, STVAULT_TLS_KEY) and a policy (STVAULT_POLICY_FILE), \
                     or else anyone who reaches the port could read credentials and tokens; \
                     set both, or listen on 127.0.0.1 or ::1"
                ));
            }
        }

        if !errors.is_empty() {
            return Err(errors);
        }
        let unwrap = "checked: errors is empty only when every setting parsed";
        Ok(Config {
            listen: listen.expect(unwrap),
            data_dir: args.data_dir,
            storage: storage.expect(unwrap),
            master_key: master_key.expect(unwrap),
            client: ClientConfig {
                production: Endpoints {
                    token_url: production_token.expect(unwrap),
                    api_url: production_api.expect(unwrap),
                },
                integration: Endpoints {
                    token_url: integration_token.expect(unwrap),
                    api_url: integration_api.expect(unwrap),
                },
                connect_timeout: connect_timeout.expect(unwrap),
                request_timeout: request_timeout.expect(unwrap),
            },
            broker: BrokerSettings {
                failure_cooldown: cooldown.expect(unwrap),
            },
            health: HealthSettings {
                interval: health_interval.expect(unwrap),
                concurrency: args.health_check_concurrency,
            },
            tls,
            policy,
            shutdown_grace: shutdown_grace.expect(unwrap),
            audit_sync: audit_sync.expect(unwrap),
            metrics: metrics_listen.map(|listen| MetricsSettings {
                listen,
                tenant_labels: args.metrics_tenant_labels,
            }),
            health_listen,
        })
    }
}

/// Chooses the master key source: `STVAULT_MASTER_KEY_FILE`, else
/// `STVAULT_MASTER_KEY`, else the key file in the data directory.
pub fn master_key_source(
    file: Option<PathBuf>,
    data_dir: &Path,
) -> Result<MasterKeySource, String> {
    let env_key = std::env::var(ENV_MASTER_KEY).ok().filter(|v| !v.is_empty());
    match (file, env_key) {
        (Some(_), Some(_)) => Err(format!(
            "STVAULT_MASTER_KEY_FILE and {ENV_MASTER_KEY} are both set; set only one"
        )),
        (Some(path), None) => Ok(MasterKeySource::File(path)),
        (None, Some(text)) => Ok(MasterKeySource::Environment(text.into())),
        (None, None) => Ok(MasterKeySource::DataDir(
            data_dir.join(DEFAULT_KEY_FILE_NAME),
        )),
    }
}

/// Chooses the storage from `STVAULT_STORAGE`, with the database URL from
/// `STVAULT_DATABASE_URL` or `url_file` for PostgreSQL.
pub fn storage(
    value: &str,
    url_file: Option<&PathBuf>,
    ca_file: Option<&Path>,
) -> Result<Storage, String> {
    let env_url = std::env::var(postgres::ENV_DATABASE_URL)
        .ok()
        .filter(|v| !v.is_empty())
        .map(SecretString::new);
    match value {
        "sled" => {
            let database_settings = [
                (postgres::ENV_DATABASE_URL, env_url.is_some()),
                (postgres::ENV_DATABASE_URL_FILE, url_file.is_some()),
                (postgres::ENV_DATABASE_CA, ca_file.is_some()),
            ];
            match database_settings.iter().find(|(_, set)| *set) {
                Some((name, _)) => Err(format!(
                    "{name} is set but STVAULT_STORAGE is sled; set STVAULT_STORAGE=postgres to \
                     use PostgreSQL, or unset {name}"
                )),
                None => Ok(Storage::Sled),
            }
        }
        "postgres" => {
            let url = postgres::read_url(env_url, url_file)?;
            DatabaseSettings::parse(&url, ca_file).map(|s| Storage::Postgres(Box::new(s)))
        }
        _ => Err("STVAULT_STORAGE: expected sled or postgres".into()),
    }
}

fn parse_duration(value: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(value)
        .map_err(|_| format!("{value:?} is not a duration such as \"5s\" or \"500ms\""))?;
    if duration.is_zero() || duration > Duration::from_secs(600) {
        return Err(format!("{value:?} must be between 1ms and 10m"));
    }
    Ok(duration)
}

/// Parses `STVAULT_AUDIT_SYNC`: "always", or the longest time a written
/// event may wait for its sync.
fn parse_audit_sync(value: &str) -> Result<SyncPolicy, String> {
    if value.eq_ignore_ascii_case("always") {
        return Ok(SyncPolicy::Always);
    }
    let interval = humantime::parse_duration(value)
        .map_err(|_| format!("{value:?} is neither \"always\" nor a duration such as \"10ms\""))?;
    if !(Duration::from_millis(1)..=Duration::from_secs(1)).contains(&interval) {
        return Err(format!(
            "{value:?} must be between 1ms and 1s, or \"always\""
        ));
    }
    Ok(SyncPolicy::Within(interval))
}

/// Bounds of the health check interval. Intervals under a minute suit only
/// tests against a fake ServiceTitan.
const MIN_HEALTH_CHECK_INTERVAL: Duration = Duration::from_millis(100);
const MAX_HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);
const MAX_HEALTH_CHECK_CONCURRENCY: usize = 64;

/// Parses the health check interval; "off" disables the checker.
fn parse_check_interval(value: &str) -> Result<Option<Duration>, String> {
    if value.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let interval = humantime::parse_duration(value)
        .map_err(|_| format!("{value:?} is not a duration such as \"15m\", or \"off\""))?;
    if !(MIN_HEALTH_CHECK_INTERVAL..=MAX_HEALTH_CHECK_INTERVAL).contains(&interval) {
        return Err(format!(
            "{value:?} must be between 100ms and 24h, or \"off\""
        ));
    }
    Ok(Some(interval))
}

/// Refuses a key file that group or others can read or write.
pub fn check_key_file_mode(path: &Path) -> Result<(), String> {
    check_private_file_mode(path, "master key file")
}

/// Refuses a file holding a secret, called `description` in messages, that
/// group or others can read or write.
pub fn check_private_file_mode(path: &Path, description: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {description} {}: {e}", path.display()))?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{description} {} has mode {mode:o}, which lets other users read it; run chmod 600 on it",
            path.display()
        ));
    }
    Ok(())
}
