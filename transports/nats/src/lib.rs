#![doc = include_str!("../README.md")]

mod config;
mod error;
mod publisher;
mod source;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use seambus::transport::engine::Host;
use seambus::transport::support::outgoing;
use seambus::transport::{
    Capabilities, Consumer, DeadLetter, DeliveryHandler, GroupId, ShutdownReport, SubscriptionSpec,
    Transport,
};
use seambus::{Envelope, Result};
use uuid::Uuid;

pub use config::{Auth, NatsConfig, Retention, Storage, StreamSettings, TlsSettings};

use crate::error::{api_error, config_error};
use crate::publisher::publish_confirmed;
use crate::wire::{
    consumer_name, dead_letter_of, dead_letter_subject, event_subject, headers_of, redrive_headers,
    DL_SUBJECT,
};

/// Room kept for headers below the server's `max_payload`.
const HEADER_ROOM: usize = 8 * 1024;

/// A [`Transport`] over NATS JetStream. See the crate docs for the mapping.
#[derive(Clone)]
pub struct NatsTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsTransport")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) config: NatsConfig,
    /// Shut down or not, the subscriptions and their signals.
    pub(crate) host: Host,
    max_payload: usize,
}

fn storage(s: Storage) -> stream::StorageType {
    match s {
        Storage::Memory => stream::StorageType::Memory,
        _ => stream::StorageType::File,
    }
}

impl NatsTransport {
    /// Connects and declares the event and dead-letter streams
    /// (idempotently: existing streams are used as they are).
    pub async fn connect(config: NatsConfig) -> Result<Self> {
        let client = config.connect().await?;
        let js = jetstream::new(client.clone());
        let prefix = &config.subject_prefix;
        let settings = &config.stream;
        let events = stream::Config {
            name: settings.name.clone(),
            subjects: vec![format!("{prefix}.>")],
            storage: storage(settings.storage),
            num_replicas: settings.replicas,
            retention: match settings.retention {
                Retention::Interest => stream::RetentionPolicy::Interest,
                _ => stream::RetentionPolicy::Limits,
            },
            max_age: settings.max_age.unwrap_or_default(),
            max_bytes: settings.max_bytes.unwrap_or(-1),
            duplicate_window: settings.duplicate_window,
            ..Default::default()
        };
        let dead = stream::Config {
            name: config.dead_letter_stream(),
            subjects: vec![format!("{prefix}_dlq.>")],
            storage: storage(settings.storage),
            num_replicas: settings.replicas,
            retention: stream::RetentionPolicy::Limits,
            duplicate_window: settings.duplicate_window,
            ..Default::default()
        };
        for wanted in [events, dead] {
            let mut stream = js
                .get_or_create_stream(wanted.clone())
                .await
                .map_err(|e| api_error(&format!("declare stream {}", wanted.name), e))?;
            let info = stream
                .info()
                .await
                .map_err(|e| api_error(&format!("stream {}", wanted.name), e))?;
            if info.config.subjects != wanted.subjects {
                return Err(config_error(format!(
                    "stream {} exists with subjects {:?}, not {:?}",
                    wanted.name, info.config.subjects, wanted.subjects
                )));
            }
        }
        let max_payload = client.server_info().max_payload.saturating_sub(HEADER_ROOM);
        let host = Host::new("NATS");
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                js,
                config,
                host,
                max_payload,
            }),
        })
    }

    /// The async-nats client, for anything this crate does not cover.
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// The configuration in use.
    pub fn config(&self) -> &NatsConfig {
        &self.inner.config
    }

    /// Deletes the event and dead-letter streams, with every event and
    /// group in them. For tests and tear-down; there is no undo.
    pub async fn delete_streams(&self) -> Result<()> {
        for name in [
            self.inner.config.stream.name.clone(),
            self.inner.config.dead_letter_stream(),
        ] {
            if let Err(e) = self.inner.js.delete_stream(&name).await {
                if !e.to_string().contains("not found") {
                    return Err(api_error(&format!("delete stream {name}"), e));
                }
            }
        }
        Ok(())
    }

    /// Deletes one group: its durable consumer (where it stands in the
    /// stream, what it holds) and its dead letters, without subscribing:
    /// for a subscription that is retired, or a reset. The events stay in
    /// the stream for the other groups. Deleting a group that does not
    /// exist is Ok. There is no undo.
    pub async fn delete_group(&self, group: &GroupId) -> Result<()> {
        let name = consumer_name(group);
        let stream = &self.inner.config.stream.name;
        if let Err(e) = self
            .inner
            .js
            .delete_consumer_from_stream(&name, stream)
            .await
        {
            if !e.to_string().contains("not found") {
                return Err(api_error(&format!("delete consumer {name}"), e));
            }
        }
        let dead = self.inner.config.dead_letter_stream();
        match self.inner.js.get_stream(&dead).await {
            Ok(stream) => {
                let subject = dead_letter_subject(&self.inner.config.subject_prefix, group);
                stream
                    .purge()
                    .filter(subject)
                    .await
                    .map_err(|e| api_error(&format!("purge the dead letters of {group}"), e))?;
            }
            Err(e) if e.to_string().contains("not found") => {}
            Err(e) => return Err(api_error(&format!("get stream {dead}"), e)),
        }
        Ok(())
    }

    /// The group's stored dead letters with their stream sequences.
    async fn stored_dead_letters(
        &self,
        group: &GroupId,
    ) -> Result<Vec<(u64, async_nats::jetstream::message::StreamMessage)>> {
        let name = self.inner.config.dead_letter_stream();
        let stream = self
            .inner
            .js
            .get_stream(&name)
            .await
            .map_err(|e| api_error(&format!("get stream {name}"), e))?;
        let subject = dead_letter_subject(&self.inner.config.subject_prefix, group);
        let mut out = Vec::new();
        let mut next = 1;
        loop {
            let found = stream
                .raw_message_builder()
                .sequence(next)
                .next_by_subject(subject.clone())
                .send()
                .await;
            match found {
                Ok(message) => {
                    next = message.sequence + 1;
                    out.push((message.sequence, message));
                }
                Err(e) if is_no_message(&e) => return Ok(out),
                Err(e) => return Err(api_error("read dead letters", e)),
            }
        }
    }
}

fn is_no_message(e: &async_nats::jetstream::stream::RawMessageError) -> bool {
    use async_nats::jetstream::stream::RawMessageErrorKind;
    match e.kind() {
        RawMessageErrorKind::NoMessageFound => true,
        RawMessageErrorKind::JetStream(js) => js.to_string().contains("no message found"),
        _ => false,
    }
}

#[async_trait]
impl Transport for NatsTransport {
    fn name(&self) -> &str {
        "nats"
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::none();
        caps.persistent = self.inner.config.stream.storage == Storage::File;
        caps.consumer_groups = true;
        caps.per_key_order = true;
        caps.max_payload = Some(self.inner.max_payload);
        caps.dead_letter_store = true;
        caps.duplicates = true;
        caps
    }

    async fn publish(&self, envelope: Envelope) -> Result<()> {
        let _open = self.inner.host.admit().await?;
        let payload = outgoing(&envelope, "NATS", Some(self.inner.max_payload))?.clone();
        let attrs = envelope.attributes();
        let subject = event_subject(&self.inner.config.subject_prefix, &attrs.event_type);
        let id = attrs.id.to_string();
        publish_confirmed(
            &self.inner.js,
            &subject,
            &id,
            headers_of(attrs),
            payload,
            self.inner.config.publish_timeout,
        )
        .await
    }

    async fn subscribe(
        &self,
        spec: SubscriptionSpec,
        handler: Arc<dyn DeliveryHandler>,
    ) -> Result<Box<dyn Consumer>> {
        let _open = self.inner.host.admit().await?;
        if spec.concurrency == 0 {
            return Err(config_error("concurrency must be at least 1"));
        }
        source::subscribe(&self.inner, spec, handler).await
    }

    async fn dead_letters(&self, group: &GroupId) -> Result<Vec<DeadLetter>> {
        Ok(self
            .stored_dead_letters(group)
            .await?
            .into_iter()
            .map(|(_, m)| dead_letter_of(group, &m.headers, m.payload))
            .collect())
    }

    async fn redrive(&self, group: &GroupId, ids: Option<&[Uuid]>) -> Result<usize> {
        let stored = self.stored_dead_letters(group).await?;
        let dlq = self
            .inner
            .js
            .get_stream(self.inner.config.dead_letter_stream())
            .await
            .map_err(|e| api_error("get dead-letter stream", e))?;
        let mut n = 0;
        for (seq, message) in stored {
            let dl = dead_letter_of(group, &message.headers, message.payload.clone());
            if ids.is_some_and(|ids| !ids.contains(&dl.envelope.id())) {
                continue;
            }
            // Back on the subject it came from, for this group only, with a
            // fresh message id (the original is still in the duplicate
            // window). Deleted from the dead letters only once stored.
            let subject = message
                .headers
                .get(DL_SUBJECT)
                .map(|s| s.as_str().to_owned())
                .unwrap_or_else(|| {
                    event_subject(&self.inner.config.subject_prefix, dl.envelope.event_type())
                });
            let msg_id = format!("redrive:{}:{seq}", consumer_name(group));
            let headers = redrive_headers(&message.headers, &consumer_name(group), &msg_id);
            publish_confirmed(
                &self.inner.js,
                &subject,
                &msg_id,
                headers,
                message.payload,
                self.inner.config.publish_timeout,
            )
            .await?;
            dlq.delete_message(seq)
                .await
                .map_err(|e| api_error("delete a redriven dead letter", e))?;
            n += 1;
        }
        Ok(n)
    }

    async fn shutdown(&self, deadline: Duration) -> Result<ShutdownReport> {
        let report = self.inner.host.shut_down(deadline).await;
        if let Err(e) = self.inner.client.flush().await {
            tracing::warn!(error = %e, "flushing the NATS connection on shutdown failed");
        }
        Ok(report)
    }
}

#[async_trait::async_trait]
impl seambus::config::Configurable for NatsTransport {
    const KIND: &'static str = "nats";
    type Config = NatsConfig;

    /// `SEAMBUS_NATS_URL`: the servers, comma-separated.
    fn apply_env(config: &mut NatsConfig, env: seambus::config::Env<'_>) -> Result<()> {
        if let Some(urls) = env("SEAMBUS_NATS_URL") {
            let servers: Vec<String> = urls.split(',').map(|u| u.trim().to_owned()).collect();
            *config = std::mem::take(config).with_servers(servers);
        }
        Ok(())
    }

    /// The stream is the namespace in capitals, subjects start with it.
    fn apply_namespace(config: &mut NatsConfig, namespace: &str) {
        *config = std::mem::take(config)
            .with_stream_name(namespace.to_uppercase())
            .with_subject_prefix(namespace);
    }

    async fn connect_config(config: NatsConfig) -> Result<Self> {
        Self::connect(config).await
    }
}
