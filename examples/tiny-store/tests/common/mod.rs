//! Shared by the tiny-store tests: broker availability and fresh
//! namespaces.

#![allow(dead_code, unreachable_pub)]

pub mod server;

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use tiny_store::Settings;

/// The brokers the tests use: `SEAMBUS_TEST_*` when set (as the other
/// test suites), else the local ones.
pub struct Brokers {
    pub nats_url: String,
    pub rabbitmq_url: String,
    pub kafka_brokers: String,
}

pub fn brokers() -> Brokers {
    let env = |k: &str, default: &str| {
        std::env::var(k)
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| default.to_owned())
    };
    Brokers {
        nats_url: env("SEAMBUS_TEST_NATS_URL", "nats://127.0.0.1:4222"),
        rabbitmq_url: env(
            "SEAMBUS_TEST_AMQP_URL",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
        ),
        kafka_brokers: env("SEAMBUS_TEST_KAFKA_BROKERS", "127.0.0.1:9092"),
    }
}

/// Whether the broker behind `transport` answers; when it does not, the
/// test is skipped with a message, or fails when
/// `SEAMBUS_REQUIRE_BROKERS=1` (as in CI).
pub fn broker_ready(transport: &str) -> bool {
    let b = brokers();
    let addr = match transport {
        "nats" => host_port(&b.nats_url),
        "rabbitmq" => host_port(&b.rabbitmq_url),
        "kafka" => b
            .kafka_brokers
            .split(',')
            .next()
            .unwrap_or_default()
            .to_owned(),
        _ => return true,
    };
    let up = addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
    if up {
        return true;
    }
    let why = format!("{transport} does not answer at {addr}");
    if std::env::var("SEAMBUS_REQUIRE_BROKERS").is_ok_and(|v| v == "1") {
        panic!("broker required (SEAMBUS_REQUIRE_BROKERS=1) but unavailable: {why}");
    }
    eprintln!("SKIPPED: {why} (set SEAMBUS_REQUIRE_BROKERS=1 to fail instead)");
    false
}

/// `scheme://user:pw@host:port/path` -> `host:port`.
fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

/// A namespace no other run uses.
pub fn namespace(test: &str) -> String {
    format!(
        "ts_{test}_{}",
        uuid::Uuid::now_v7().simple().to_string()[20..].to_owned()
    )
}

/// Sets key `key` of transport `name`'s table.
pub fn set(s: &mut Settings, name: &str, key: &str, value: impl Into<toml::Value>) {
    s.bus.table_mut(name).insert(key.to_owned(), value.into());
}

/// Settings read from the environment, the test brokers, `routes` and a
/// fresh namespace.
pub fn settings(test: &str, routes: &str) -> Settings {
    let mut s = Settings::load(None).expect("settings");
    let b = brokers();
    set(&mut s, "nats", "servers", vec![b.nats_url]);
    set(&mut s, "rabbitmq", "uri", b.rabbitmq_url);
    set(&mut s, "kafka", "bootstrap_servers", b.kafka_brokers);
    s.bus
        .set_routing(seambus::routing::Routing::parse_env(routes).expect("routes"));
    // Temporary SQLite files unless a test says otherwise.
    s.database_url = None;
    s.data_dir = None;
    s.namespace = namespace(test);
    s
}

/// The PostgreSQL the tests use.
pub fn database_url() -> String {
    std::env::var("TINY_STORE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A pool, or `None` (skip) when PostgreSQL is absent; panics instead
/// under `SEAMBUS_REQUIRE_BROKERS=1`.
pub async fn postgres(url: &str) -> Option<sqlx::PgPool> {
    match sqlx::PgPool::connect(url).await {
        Ok(pool) => Some(pool),
        Err(e) => {
            let url = seambus::transport::support::redact_url(url);
            let why = format!("PostgreSQL unavailable at {url}: {e}");
            if std::env::var("SEAMBUS_REQUIRE_BROKERS").is_ok_and(|v| v == "1") {
                panic!("required (SEAMBUS_REQUIRE_BROKERS=1): {why}");
            }
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

/// Drops a schema and everything in it.
pub async fn drop_schema(db: &sqlx::PgPool, schema: &str) {
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(db)
        .await
        .unwrap_or_else(|e| panic!("drop schema {schema}: {e}"));
}
