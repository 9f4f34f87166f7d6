//! The test harness: a real PostgreSQL server (`SEAMBUS_TEST_POSTGRES_URL`,
//! default postgres://postgres@127.0.0.1:5432/test) with a fresh schema per
//! case, or a fresh SQLite file per case.

#![allow(dead_code, unreachable_pub)]

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use seambus::conformance::Harness;
use seambus::transport::{GroupId, Transport};
use seambus_sql::{SqlConfig, SqlTransport};

pub const LOCAL_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The PostgreSQL server under test.
pub fn postgres_url() -> String {
    std::env::var("SEAMBUS_TEST_POSTGRES_URL").unwrap_or_else(|_| LOCAL_POSTGRES.to_owned())
}

/// A schema name (or SQLite file name) for a case's namespace.
pub fn schema(namespace: &str) -> String {
    let (case, id) = namespace.rsplit_once('-').unwrap_or((namespace, ""));
    let case: String = case
        .chars()
        .take(24)
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("t_{case}_{id}")
}

/// Where the SQLite files of the tests live.
pub fn sqlite_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join("seambus-sql-tests");
    std::fs::create_dir_all(&dir).expect("create the SQLite test directory");
    dir
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

pub fn config(backend: Backend, namespace: &str) -> SqlConfig {
    let url = match backend {
        Backend::Postgres => postgres_url(),
        Backend::Sqlite => format!(
            "sqlite://{}",
            sqlite_dir()
                .join(format!("{}.db", schema(namespace)))
                .display()
        ),
    };
    SqlConfig::new(url)
        .with_schema(schema(namespace))
        // Short, so events a stopped consumer held come back quickly.
        .with_lease(Duration::from_secs(2))
}

pub async fn transport(backend: Backend, namespace: &str) -> SqlTransport {
    SqlTransport::connect(config(backend, namespace))
        .await
        .expect("connect to the database")
}

pub fn postgres_unreachable() -> Option<String> {
    let url = postgres_url();
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let host = rest.rsplit('@').next().unwrap_or(rest);
    let host = host.split('/').next().unwrap_or(host);
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5432")
    };
    let addr = host.to_socket_addrs().ok().and_then(|mut a| a.next());
    match addr {
        Some(addr) if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok() => None,
        _ => Some(format!("no PostgreSQL server answers at {host}")),
    }
}

pub struct Sql {
    pub backend: Backend,
    pub restart: bool,
}

#[async_trait::async_trait]
impl Harness for Sql {
    async fn transport(&self, namespace: &str) -> Arc<dyn Transport> {
        Arc::new(transport(self.backend, namespace).await)
    }

    async fn cleanup(&self, namespace: &str) {
        if let Ok(t) = SqlTransport::connect(config(self.backend, namespace)).await {
            let _ = t.drop_tables().await;
            let _ = t.shutdown(Duration::from_secs(5)).await;
        }
        if self.backend == Backend::Sqlite {
            let base = sqlite_dir().join(format!("{}.db", schema(namespace)));
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", base.display()));
            }
        }
    }

    fn delete_group(
        &self,
        namespace: &str,
        group: &GroupId,
    ) -> Option<BoxFuture<'static, seambus::Result<()>>> {
        let (backend, namespace, group) = (self.backend, namespace.to_owned(), group.clone());
        Some(Box::pin(async move {
            let t = SqlTransport::connect(config(backend, &namespace)).await?;
            let deleted = t.delete_group(&group).await;
            let _ = t.shutdown(Duration::from_secs(5)).await;
            deleted
        }))
    }

    fn has_server(&self) -> bool {
        self.backend == Backend::Postgres
    }

    fn unavailable(&self) -> Option<String> {
        match self.backend {
            Backend::Postgres => postgres_unreachable(),
            Backend::Sqlite => None,
        }
    }

    fn restart_broker(&self) -> Option<BoxFuture<'static, ()>> {
        (self.restart && self.backend == Backend::Postgres && postgres_url() == LOCAL_POSTGRES)
            .then(|| {
                Box::pin(async {
                    let _restore = RestoreServer;
                    tokio::task::spawn_blocking(|| server("restart"))
                        .await
                        .expect("restart task");
                }) as BoxFuture<'static, ()>
            })
    }
}

/// `scripts/broker ACTION postgres`.
pub fn server(action: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/broker");
    seambus::conformance::run_script(script, &[action, "postgres"]);
}

/// Starts the local server again when dropped, if a test left it stopped.
pub struct RestoreServer;

impl Drop for RestoreServer {
    fn drop(&mut self) {
        if postgres_unreachable().is_some() {
            server("start");
        }
    }
}
