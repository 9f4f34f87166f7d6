//! Configuration of the NATS JetStream transport.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::ConnectOptions;
use seambus::transport::support::redact_url;
use serde::Deserialize;

use crate::error::{config_error, connection_error};

/// Where a stream keeps its messages.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    /// On disk: survives a server restart. The default.
    #[default]
    File,
    /// In memory: faster, lost on restart.
    Memory,
}

/// When the stream may drop a message.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Retention {
    /// Kept until the stream's limits (age, bytes) say otherwise, whatever
    /// the groups did. Groups created later can still read. The default.
    #[default]
    Limits,
    /// Removed once every group that exists has acknowledged it. Events
    /// published while no group exists are not kept.
    Interest,
}

/// The JetStream streams the transport declares (idempotently).
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct StreamSettings {
    /// Stream of events, with subjects `<subject_prefix>.>`. Default `SEAMBUS`.
    /// Dead letters go to the stream `<name>_DLQ`, subjects
    /// `<subject_prefix>_dlq.>`.
    pub name: String,
    /// Default [`Storage::File`].
    pub storage: Storage,
    /// Copies in a cluster. Default 1 (a single server).
    pub replicas: usize,
    /// Default [`Retention::Limits`].
    pub retention: Retention,
    /// Oldest event kept; `None` (default) keeps events until other limits.
    #[serde(with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// Largest stream size in bytes; `None` (default) is unlimited.
    pub max_bytes: Option<i64>,
    /// How long the server remembers message ids to drop duplicate
    /// publishes (a retried publish keeps its id). Default 2 minutes.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            name: "SEAMBUS".into(),
            storage: Storage::File,
            replicas: 1,
            retention: Retention::Limits,
            max_age: None,
            max_bytes: None,
            duplicate_window: Duration::from_secs(120),
        }
    }
}

/// TLS settings. With none of them set, TLS is used only if the server asks.
#[non_exhaustive]
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct TlsSettings {
    /// Refuse to connect without TLS.
    pub require: bool,
    /// PEM file of the certificate authorities to trust.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (with `client_key`) for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
}

/// How the client authenticates.
#[non_exhaustive]
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Auth {
    /// No credentials (or credentials in the server URL).
    #[default]
    None,
    /// A token.
    Token {
        /// The token.
        token: String,
    },
    /// User and password.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// A `.creds` file (JWT and NKey seed).
    CredsFile {
        /// Path of the file.
        path: PathBuf,
    },
    /// An NKey seed.
    NKey {
        /// The seed (`SU...`).
        seed: String,
    },
}

impl fmt::Debug for Auth {
    /// Never shows a token, password or seed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Token { .. } => f.write_str("Token { token: <redacted> }"),
            Self::UserPassword { user, .. } => {
                write!(f, "UserPassword {{ user: {user:?}, password: <redacted> }}")
            }
            Self::CredsFile { path } => write!(f, "CredsFile {{ path: {path:?} }}"),
            Self::NKey { .. } => f.write_str("NKey { seed: <redacted> }"),
        }
    }
}

type Customize = Arc<dyn Fn(ConnectOptions) -> ConnectOptions + Send + Sync>;

/// Configuration of [`crate::NatsTransport`].
///
/// ```
/// use std::time::Duration;
/// let config = seambus_nats::NatsConfig::default()
///     .with_servers(["nats://127.0.0.1:4222"])
///     .with_subject_prefix("shop")
///     .with_ack_wait(Duration::from_secs(10));
/// assert_eq!(config.stream.name, "SEAMBUS");
/// ```
#[non_exhaustive]
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URLs. Default `nats://127.0.0.1:4222`.
    pub servers: Vec<String>,
    /// First token of every subject: events go to
    /// `<subject_prefix>.<event name>`. Default `seambus`.
    pub subject_prefix: String,
    /// The streams.
    pub stream: StreamSettings,
    /// How long the server waits for an ack before redelivering. Handlers
    /// that run longer send progress acks, so this bounds how soon a crashed
    /// worker's events come back. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Deliveries of one event after which it is dead-lettered as a crash
    /// loop (processes dying or stopping while they held it). Counted by
    /// the server, so it includes shutdowns; the attempt itself travels in
    /// a header and never grows on a shutdown, and retries are not
    /// redeliveries. The server's own cap (`max_deliver`) is one more, so
    /// that a message the client library cannot even read stops coming
    /// back (each delivery of one costs a reconnect) and is dead-lettered
    /// from the server's advisory. Default 20.
    pub delivery_limit: u32,
    /// Events of one group held at once by one process (the consumer's
    /// `max_ack_pending` and the fetch batch). Default 256.
    pub max_in_flight: usize,
    /// How long `publish` keeps trying (across reconnects, with the same
    /// message id, so the server drops duplicates) before it fails.
    /// Default 30 s.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Connection name shown by the server. Default `seambus`.
    pub connection_name: Option<String>,
    /// TLS.
    pub tls: TlsSettings,
    /// Credentials.
    pub auth: Auth,
    #[serde(skip)]
    customize: Option<Customize>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            servers: vec!["nats://127.0.0.1:4222".into()],
            subject_prefix: "seambus".into(),
            stream: StreamSettings::default(),
            ack_wait: Duration::from_secs(30),
            delivery_limit: 20,
            max_in_flight: 256,
            publish_timeout: Duration::from_secs(30),
            connection_name: Some("seambus".into()),
            tls: TlsSettings::default(),
            auth: Auth::None,
            customize: None,
        }
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let servers: Vec<String> = self.servers.iter().map(|s| redact_url(s)).collect();
        f.debug_struct("NatsConfig")
            .field("servers", &servers)
            .field("subject_prefix", &self.subject_prefix)
            .field("stream", &self.stream)
            .field("ack_wait", &self.ack_wait)
            .field("delivery_limit", &self.delivery_limit)
            .field("max_in_flight", &self.max_in_flight)
            .field("publish_timeout", &self.publish_timeout)
            .field("connection_name", &self.connection_name)
            .field("tls", &self.tls)
            .field("auth", &self.auth)
            .field("customize", &self.customize.as_ref().map(|_| "<fn>"))
            .finish()
    }
}

impl NatsConfig {
    /// Sets the server URLs.
    pub fn with_servers<S: Into<String>>(mut self, servers: impl IntoIterator<Item = S>) -> Self {
        self.servers = servers.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the subject prefix.
    pub fn with_subject_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.subject_prefix = prefix.into();
        self
    }

    /// Sets the stream name (the dead-letter stream is `<name>_DLQ`).
    pub fn with_stream_name(mut self, name: impl Into<String>) -> Self {
        self.stream.name = name.into();
        self
    }

    /// Sets the stream settings.
    pub fn with_stream(mut self, stream: StreamSettings) -> Self {
        self.stream = stream;
        self
    }

    /// Sets the ack wait.
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// Sets [`NatsConfig::delivery_limit`].
    pub fn with_delivery_limit(mut self, n: u32) -> Self {
        self.delivery_limit = n;
        self
    }

    /// Sets the events one process holds per group.
    pub fn with_max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n;
        self
    }

    /// Sets how long a publish may keep trying.
    pub fn with_publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Sets the credentials.
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    /// Sets TLS.
    pub fn with_tls(mut self, tls: TlsSettings) -> Self {
        self.tls = tls;
        self
    }

    /// Escape hatch: adjusts async-nats' own [`ConnectOptions`] after
    /// Seambus has applied its settings.
    pub fn with_connect_options(
        mut self,
        customize: impl Fn(ConnectOptions) -> ConnectOptions + Send + Sync + 'static,
    ) -> Self {
        self.customize = Some(Arc::new(customize));
        self
    }

    /// The dead-letter stream's name.
    pub fn dead_letter_stream(&self) -> String {
        format!("{}_DLQ", self.stream.name)
    }

    /// Checks names and limits before anything is sent.
    pub(crate) fn validate(&self) -> seambus::Result<()> {
        if self.servers.is_empty() {
            return Err(config_error("at least one server URL is needed"));
        }
        let token_ok = |t: &str| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if !token_ok(&self.subject_prefix) {
            return Err(config_error(format!(
                "subject prefix {:?} must be one subject token of A-Z a-z 0-9 - _ (no dots or wildcards)",
                self.subject_prefix
            )));
        }
        if !token_ok(&self.stream.name) {
            return Err(config_error(format!(
                "stream name {:?} must be A-Z a-z 0-9 - _",
                self.stream.name
            )));
        }
        if self.max_in_flight == 0 || self.max_in_flight > i64::MAX as usize {
            return Err(config_error("max_in_flight must be at least 1"));
        }
        if self.delivery_limit == 0 || self.delivery_limit == u32::MAX {
            return Err(config_error("delivery_limit must be at least 1"));
        }
        if self.ack_wait < Duration::from_millis(100) {
            return Err(config_error("ack_wait must be at least 100 ms"));
        }
        Ok(())
    }

    /// Connects with these settings.
    pub(crate) async fn connect(&self) -> seambus::Result<async_nats::Client> {
        self.validate()?;
        let mut options = ConnectOptions::new().max_reconnects(None);
        if let Some(name) = &self.connection_name {
            options = options.name(name);
        }
        if self.tls.require {
            options = options.require_tls(true);
        }
        if let Some(ca) = &self.tls.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        match (&self.tls.client_cert, &self.tls.client_key) {
            (Some(cert), Some(key)) => {
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
            (None, None) => {}
            _ => {
                return Err(config_error(
                    "tls.client_cert and tls.client_key go together",
                ))
            }
        }
        // Credentials in a server URL go to the client as options, and the
        // URLs it keeps (and prints in its debug logs) carry none.
        let mut url_auth = None;
        let servers: Vec<async_nats::ServerAddr> = self
            .servers
            .iter()
            .map(|s| {
                let shown = || redact_url(s);
                let addr: async_nats::ServerAddr = s
                    .parse()
                    .map_err(|e| config_error(format!("server URL {}: {e}", shown())))?;
                let (user, password) = (addr.username(), addr.password());
                if user.is_none() && password.is_none() {
                    return Ok(addr);
                }
                url_auth.get_or_insert_with(|| match password {
                    Some(password) => Auth::UserPassword {
                        user: user.unwrap_or_default().to_owned(),
                        password: password.to_owned(),
                    },
                    None => Auth::Token {
                        token: user.unwrap_or_default().to_owned(),
                    },
                });
                let mut url = addr.into_inner();
                let stripped = url.set_password(None).and_then(|()| url.set_username(""));
                stripped
                    .ok()
                    .and_then(|()| async_nats::ServerAddr::from_url(url).ok())
                    .ok_or_else(|| config_error(format!("server URL {}: unusable", shown())))
            })
            .collect::<seambus::Result<_>>()?;
        let auth = match (&self.auth, &url_auth) {
            (Auth::None, Some(from_url)) => from_url,
            (auth, _) => auth,
        };
        options = match auth {
            Auth::None => options,
            Auth::Token { token } => options.token(token.clone()),
            Auth::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.clone())
            }
            Auth::CredsFile { path } => options
                .credentials_file(path)
                .await
                .map_err(|e| config_error(format!("cannot read credentials file {path:?}: {e}")))?,
            Auth::NKey { seed } => options.nkey(seed.clone()),
        };
        if let Some(customize) = &self.customize {
            options = customize(options);
        }
        options.connect(servers).await.map_err(|e| {
            let shown: Vec<String> = self.servers.iter().map(|s| redact_url(s)).collect();
            connection_error(format!("cannot connect to {}", shown.join(", ")), e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_secrets() {
        let config = NatsConfig::default()
            .with_servers(["nats://alice:hunter2@nats.internal:4222"])
            .with_auth(Auth::UserPassword {
                user: "alice".into(),
                password: "hunter2".into(),
            });
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("alice"));
        for auth in [
            Auth::Token {
                token: "s3cr3t".into(),
            },
            Auth::NKey {
                seed: "SUAGIEYODKBBTUMOB666Z5KA4FCWAZV7HWSGRHOD7MK6UM5IZX2QGOFR".into(),
            },
        ] {
            let shown = format!("{auth:?}");
            assert!(
                !shown.contains("s3cr3t") && !shown.contains("SUAG"),
                "{shown}"
            );
        }
    }

    #[test]
    fn bad_names_are_config_errors() {
        for config in [
            NatsConfig::default().with_subject_prefix("a.b"),
            NatsConfig::default().with_subject_prefix("a*"),
            NatsConfig::default().with_subject_prefix(""),
            NatsConfig::default().with_stream_name("my stream"),
            NatsConfig::default().with_max_in_flight(0),
        ] {
            let err = config.validate().unwrap_err();
            assert_eq!(err.kind(), seambus::ErrorKind::Config, "{err}");
        }
        NatsConfig::default().validate().unwrap();
    }

    #[test]
    fn deserializes_with_defaults() {
        let config: NatsConfig = serde_json::from_str(
            r#"{"subject_prefix":"shop","ack_wait":"5s","auth":{"kind":"token","token":"t"}}"#,
        )
        .unwrap();
        assert_eq!(config.subject_prefix, "shop");
        assert_eq!(config.ack_wait, Duration::from_secs(5));
        assert_eq!(config.stream.name, "SEAMBUS");
        assert!(matches!(config.auth, Auth::Token { .. }));
    }
}
