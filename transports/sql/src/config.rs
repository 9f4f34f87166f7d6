//! Configuration of the SQL transport.

use std::fmt;
use std::time::Duration;

use seambus::transport::support::redact_url;
use serde::Deserialize;

/// Configuration of a [`SqlTransport`](crate::SqlTransport).
///
/// `Debug` hides the password of the URL (its `user:password@` part and a
/// `password=` parameter).
#[non_exhaustive]
#[derive(Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SqlConfig {
    /// The database: `postgres://user:password@host/db` (or `postgresql://`),
    /// or `sqlite://path/to/file.db` (created if missing). Default
    /// `sqlite://seambus.db`.
    pub url: String,
    /// Where the transport's tables live: the PostgreSQL schema (created
    /// if missing), or the table-name prefix on SQLite (`<schema>_queue`).
    /// Default `seambus`. Letters, digits and `_` only.
    pub schema: String,
    /// How long a claimed event stays this process's before another may
    /// take it (a process that died holds its events this long). Held
    /// events are kept alive every third of it. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often a waiting consumer looks for events when nothing woke it:
    /// a safety net on PostgreSQL (`LISTEN/NOTIFY` wakes consumers at
    /// once), the way other processes' events are seen on SQLite (events of
    /// this process wake its consumers at once). Default 2 s on PostgreSQL,
    /// 100 ms on SQLite.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Option<Duration>,
    /// Events claimed by one query. Default 32.
    pub batch: usize,
    /// Events one subscription holds at most (waiting, running or waiting
    /// to retry). Default 256.
    pub max_in_flight: usize,
    /// Claims of one event after which it is dead-lettered as a crash loop
    /// (a process that keeps dying while handling it). Default 20.
    pub delivery_limit: u32,
    /// Connections in the pool. Default 10 (PostgreSQL), 4 (SQLite).
    pub max_connections: Option<u32>,
    /// Largest payload accepted, in bytes. Default 16 MiB.
    pub max_payload: usize,
}

impl Default for SqlConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://seambus.db".into(),
            schema: "seambus".into(),
            lease: Duration::from_secs(30),
            poll_interval: None,
            batch: 32,
            max_in_flight: 256,
            delivery_limit: 20,
            max_connections: None,
            max_payload: 16 * 1024 * 1024,
        }
    }
}

impl fmt::Debug for SqlConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlConfig")
            .field("url", &redact(&self.url))
            .field("schema", &self.schema)
            .field("lease", &self.lease)
            .field("poll_interval", &self.poll_interval)
            .field("batch", &self.batch)
            .field("max_in_flight", &self.max_in_flight)
            .field("delivery_limit", &self.delivery_limit)
            .field("max_connections", &self.max_connections)
            .field("max_payload", &self.max_payload)
            .finish()
    }
}

/// The URL with its password hidden, in both places a database URL can
/// carry one.
pub(crate) fn redact(url: &str) -> String {
    let url = redact_url(url);
    let Some((base, query)) = url.split_once('?') else {
        return url;
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if name.eq_ignore_ascii_case("password") => {
                format!("{name}=<redacted>")
            }
            _ => pair.to_owned(),
        })
        .collect();
    format!("{base}?{}", query.join("&"))
}

impl SqlConfig {
    /// A configuration for the database at `url`, defaults otherwise.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }

    /// Sets [`SqlConfig::schema`].
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Sets [`SqlConfig::lease`].
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets [`SqlConfig::poll_interval`].
    pub fn with_poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = Some(every);
        self
    }

    /// Sets [`SqlConfig::batch`] (at least 1).
    pub fn with_batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// Sets [`SqlConfig::max_in_flight`] (at least 1).
    pub fn with_max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Sets [`SqlConfig::delivery_limit`] (at least 1).
    pub fn with_delivery_limit(mut self, n: u32) -> Self {
        self.delivery_limit = n.max(1);
        self
    }

    /// Sets [`SqlConfig::max_connections`].
    pub fn with_max_connections(mut self, n: u32) -> Self {
        self.max_connections = Some(n.max(1));
        self
    }

    /// Sets [`SqlConfig::max_payload`].
    pub fn with_max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_passwords() {
        let shown = format!(
            "{:?}",
            SqlConfig::new("postgres://app:s3cr3t@db/shop?sslmode=require&password=other")
        );
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(!shown.contains("other"), "{shown}");
        assert!(shown.contains("app:<redacted>@db/shop"), "{shown}");
        assert!(shown.contains("sslmode=require"), "{shown}");
    }
}
