//! A throwaway PostgreSQL cluster per test: `initdb` into a temporary
//! directory, a server listening only on 127.0.0.1 at a free port with its
//! socket inside that directory, stopped with `pg_ctl stop -m fast` on drop.
//!
//! PostgreSQL refuses to run as root, so under root the cluster belongs to
//! the `postgres` user that Debian's package creates, or else to a
//! `stvault-test` system user created on first use, and every server command
//! runs through `runuser`. Starting a cluster took about 2.5 s (initdb
//! included) when measured on a 2-core machine.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use super::certs::CertFiles;

/// Superuser of every test cluster, and the password it logs in with.
pub const USER: &str = "stvault";
pub const PASSWORD: &str = "pg-test-password-5e1c";
const INSTALL_HINT: &str = "install the Debian postgresql package (apt-get install postgresql)";

/// A running PostgreSQL cluster, stopped and deleted on drop.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    /// The user the server runs as when the tests run as root.
    run_as: Option<String>,
}

impl Postgres {
    /// Creates and starts a cluster that accepts plain TCP.
    pub fn start() -> Postgres {
        Self::start_inner(None)
    }

    /// Creates and starts a cluster that also accepts TLS with `server`'s
    /// certificate.
    pub fn start_with_tls(server: &CertFiles) -> Postgres {
        Self::start_inner(Some(server))
    }

    fn start_inner(tls: Option<&CertFiles>) -> Postgres {
        let bin = bin_dir();
        let run_as = server_user();
        let dir = tempfile::tempdir().expect("create temporary directory");
        let password_file = dir.path().join("password");
        std::fs::write(&password_file, PASSWORD).expect("write password file");
        if let Some(user) = &run_as {
            chown(dir.path(), user);
        }
        let mut cluster = Postgres {
            dir,
            bin,
            port: 0,
            run_as,
        };
        cluster.run_checked(
            "initdb",
            &[
                "-D",
                &cluster.data_dir().display().to_string(),
                "-U",
                USER,
                &format!("--pwfile={}", password_file.display()),
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--no-sync",
            ],
        );
        let mut settings = format!(
            "listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             fsync = off\n",
            cluster.dir.path().display()
        );
        if let Some(files) = tls {
            let cert = cluster.dir.path().join("server.pem");
            let key = cluster.dir.path().join("server.key");
            std::fs::copy(&files.cert, &cert).expect("copy server certificate");
            std::fs::copy(&files.key, &key).expect("copy server key");
            set_mode(&key, 0o600);
            if let Some(user) = &cluster.run_as {
                chown(&cert, user);
                chown(&key, user);
            }
            settings.push_str(&format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                cert.display(),
                key.display()
            ));
        }
        let config = cluster.data_dir().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&config).expect("read postgresql.conf");
        text.push_str(&settings);
        std::fs::write(&config, text).expect("write postgresql.conf");

        // A free port can be taken by another process before the server
        // binds it, so a failed start tries another port.
        for _ in 0..3 {
            cluster.port = free_port();
            if cluster.pg_ctl_start() {
                return cluster;
            }
        }
        panic!(
            "PostgreSQL did not start; its log:\n{}",
            cluster.server_log()
        );
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Returns the URL of `database`, password included.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// Creates an empty database and returns its URL.
    pub async fn create_database(&self, name: &str) -> String {
        let (client, connection) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
                .await
                .expect("connect to the test cluster");
        let task = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        drop(client);
        let _ = task.await;
        self.url(name)
    }

    /// Stops the server, keeping its data.
    pub fn stop(&self) {
        let output = self.stop_command().output().expect("run pg_ctl");
        assert!(
            output.status.success(),
            "pg_ctl stop failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Returns the command that stops the server in fast mode, which ends
    /// open sessions rather than waiting for them, and waits until it has
    /// stopped.
    fn stop_command(&self) -> Command {
        self.command(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir().display().to_string(),
                "-w",
                "stop",
                "-m",
                "fast",
            ],
        )
    }

    /// Starts the stopped server again on the same port.
    pub fn restart(&self) {
        assert!(
            self.pg_ctl_start(),
            "PostgreSQL did not restart; its log:\n{}",
            self.server_log()
        );
    }

    fn pg_ctl_start(&self) -> bool {
        let output = self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir().display().to_string(),
                "-l",
                &self.log_path().display().to_string(),
                "-o",
                &format!("-p {}", self.port),
                "-w",
                "start",
            ],
        );
        output.status.success()
    }

    /// Returns `pg_dump`'s plain SQL dump of `database`, with each bytea
    /// value decoded, so that a search finds the bytes stored in records
    /// and audit events rather than their hex form.
    pub fn dump(&self, database: &str) -> Vec<u8> {
        self.dump_tables(database, &[])
    }

    /// Returns the dump of `tables` only, or of the whole database when
    /// `tables` is empty, with bytea values decoded as `dump` does.
    pub fn dump_tables(&self, database: &str, tables: &[&str]) -> Vec<u8> {
        let output = Command::new(self.bin.join("pg_dump"))
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--username", USER, "--no-password", database])
            .args(tables.iter().map(|table| format!("--table={table}")))
            .env("PGPASSWORD", PASSWORD)
            .output()
            .expect("run pg_dump");
        assert!(
            output.status.success(),
            "pg_dump failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        decode_bytea(&output.stdout)
    }

    /// Starts a watcher process that stops the cluster and deletes its
    /// directory once this process exits, for a cluster that is never
    /// dropped, such as one kept in a static. Returns the watcher, whose
    /// stdin must stay open until the process exits.
    ///
    /// The watcher waits for end-of-file on its stdin, and the returned
    /// child keeps the only write end of that pipe (Rust opens pipes
    /// close-on-exec), so the cluster stops however this process ends, a
    /// panic or SIGKILL included. The watcher ignores SIGINT, SIGHUP and
    /// SIGTERM, which reach the whole process group on Ctrl-C.
    pub fn stop_at_exit(&self) -> Child {
        let stop = self.stop_command();
        Command::new("sh")
            .args([
                "-c",
                "trap '' INT HUP TERM; cat >/dev/null; cd /; shift; \"$@\"; rm -rf \"$0\"",
            ])
            .arg(self.dir.path())
            .arg("--")
            .arg(stop.get_program())
            .args(stop.get_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the PostgreSQL watcher")
    }

    /// Runs a server program from the PostgreSQL bin directory as the
    /// cluster's user.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program, args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
    }

    /// Returns the command that runs `program` from the PostgreSQL bin
    /// directory as the cluster's user.
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let program = self.bin.join(program);
        let mut command = match &self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(&program);
                command
            }
            None => Command::new(&program),
        };
        command.args(args);
        command
    }

    fn run_checked(&self, program: &str, args: &[&str]) {
        let output = self.run(program, args);
        assert!(
            output.status.success(),
            "{program} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.stop_command().output();
    }
}

/// Replaces each bytea value in a plain dump, which COPY data prints as
/// `\\x` followed by hex digits, with the bytes it encodes.
fn decode_bytea(dump: &[u8]) -> Vec<u8> {
    const MARKER: &[u8] = b"\\\\x";
    let mut decoded = Vec::with_capacity(dump.len());
    let mut rest = dump;
    while let Some(start) = rest.windows(MARKER.len()).position(|w| w == MARKER) {
        decoded.extend_from_slice(&rest[..start]);
        let after = &rest[start + MARKER.len()..];
        let digits = after.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        match hex::decode(&after[..digits]) {
            Ok(bytes) if digits > 0 => decoded.extend_from_slice(&bytes),
            _ => decoded.extend_from_slice(&rest[start..start + MARKER.len() + digits]),
        }
        rest = &after[digits..];
    }
    decoded.extend_from_slice(rest);
    decoded
}

/// Returns the bin directory of the newest PostgreSQL installed under
/// `/usr/lib/postgresql`, where Debian puts `initdb` and `pg_ctl`.
fn bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL is not installed: no /usr/lib/postgresql/*/bin/initdb; {INSTALL_HINT}"
        ),
    }
}

/// Returns the user to run the server as: none unless the tests run as
/// root.
fn server_user() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().expect("run id -u");
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return None;
    }
    for user in ["postgres", "stvault-test"] {
        if user_exists(user) {
            return Some(user.to_owned());
        }
    }
    let status = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
        ])
        .arg("stvault-test")
        .status()
        .expect("run useradd");
    // A concurrent test may have created the user first.
    assert!(
        status.success() || user_exists("stvault-test"),
        "cannot create the stvault-test user to run PostgreSQL as"
    );
    Some("stvault-test".to_owned())
}

fn user_exists(user: &str) -> bool {
    Command::new("id")
        .arg(user)
        .output()
        .is_ok_and(|output| output.status.success())
}

fn chown(path: &Path, user: &str) {
    let status = Command::new("chown")
        .arg(user)
        .arg(path)
        .status()
        .expect("run chown");
    assert!(status.success(), "chown {user} {} failed", path.display());
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind an ephemeral port")
        .port()
}
