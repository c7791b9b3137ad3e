//! The storage a test server runs on: sled in its data directory, or a
//! database of its own in the PostgreSQL cluster that every test of one test
//! binary shares. `backend_tests!` runs a test function once per backend.
#![allow(dead_code)]

use std::path::Path;
use std::process::Child;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use stvault::config::Storage;
use stvault::secret::SecretString;
use stvault::store::DatabaseSettings;
use stvault::store::postgres::DatabaseUrl;

use super::postgres::Postgres;

/// Storage backend of a test server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sled,
    Postgres,
}

/// An empty database in the shared cluster, left in place when dropped,
/// since the whole cluster goes when the test binary exits.
pub struct Database {
    pub name: String,
    pub url: String,
}

impl Database {
    /// Creates an empty database with a name no other test of this binary
    /// uses, starting the shared cluster on first use.
    pub async fn create() -> Database {
        let shared = shared_cluster();
        let number = shared.databases.fetch_add(1, Ordering::Relaxed);
        let name = format!("test_{number}");
        let url = shared.cluster.create_database(&name).await;
        Database { name, url }
    }

    /// Returns the storage setting that points `stvault::open` at this
    /// database.
    pub fn storage(&self) -> Storage {
        let url = DatabaseUrl {
            text: SecretString::new(self.url.clone()),
            setting: "STVAULT_DATABASE_URL",
        };
        let settings =
            DatabaseSettings::parse(&url, None).expect("the shared cluster's URLs are valid");
        Storage::Postgres(Box::new(settings))
    }

    /// Returns `pg_dump`'s plain SQL dump of the database.
    pub fn dump(&self) -> Vec<u8> {
        shared_cluster().cluster.dump(&self.name)
    }

    /// Runs `sql` in the database.
    pub async fn execute(&self, sql: &str) {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        let driver = tokio::spawn(connection);
        client.batch_execute(sql).await.expect("run SQL");
        drop(client);
        let _ = driver.await;
    }

    /// Returns the dump of `tables` only.
    pub fn dump_tables(&self, tables: &[&str]) -> Vec<u8> {
        shared_cluster().cluster.dump_tables(&self.name, tables)
    }
}

/// The cluster of this test binary, the watcher that stops it at exit and
/// the number of databases created in it.
struct SharedCluster {
    cluster: Postgres,
    watcher: Child,
    databases: AtomicUsize,
}

/// Returns the cluster shared by this test binary, starting it on the first
/// call. Each test binary is its own process, so each starts one cluster
/// (about 2.5 s) if any of its tests runs on PostgreSQL.
fn shared_cluster() -> &'static SharedCluster {
    static CLUSTER: OnceLock<SharedCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let cluster = Postgres::start();
        let watcher = cluster.stop_at_exit();
        SharedCluster {
            cluster,
            watcher,
            databases: AtomicUsize::new(0),
        }
    })
}

/// Returns the paths of the files under `dir` whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
        } else {
            let bytes = std::fs::read(&path).unwrap();
            if contains(&bytes, needle) {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

/// Returns whether `bytes` contain `needle`.
pub fn contains(bytes: &[u8], needle: &str) -> bool {
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Generates, for each async function `NAME(backend: Backend)` listed, the
/// tests `on_sled::NAME` and `on_postgres::NAME`. An optional leading
/// attribute replaces `#[tokio::test(flavor = "multi_thread")]`.
#[macro_export]
macro_rules! backend_tests {
    (#[$attribute:meta] $($name:ident),+ $(,)?) => {
        mod on_sled {
            $(
                #[$attribute]
                async fn $name() {
                    super::$name($crate::support::backend::Backend::Sled).await;
                }
            )+
        }

        mod on_postgres {
            $(
                #[$attribute]
                async fn $name() {
                    super::$name($crate::support::backend::Backend::Postgres).await;
                }
            )+
        }
    };
    ($($name:ident),+ $(,)?) => {
        $crate::backend_tests!(#[tokio::test(flavor = "multi_thread")] $($name),+);
    };
}
