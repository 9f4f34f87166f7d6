//! Publishing: confirmed publish with retries under one message id.

use std::time::Duration;

use async_nats::header::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use seambus::{Error, ErrorKind, Result};
use tokio::time::Instant;

use crate::error::connection_error;

fn publish_error(subject: &str, err: async_nats::jetstream::context::PublishError) -> Error {
    match err.kind() {
        PublishErrorKind::MaxPayloadExceeded => {
            Error::new(ErrorKind::PayloadTooLarge, format!("{subject}: {err}")).with_source(err)
        }
        // Also what a server answers while JetStream is still recovering its
        // streams after a restart, so it is retried until the timeout.
        PublishErrorKind::StreamNotFound => connection_error(
            format!(
                "no stream takes subject {subject} (JetStream starting up, or the stream was deleted)"
            ),
            err,
        ),
        _ => connection_error(format!("publish to {subject}"), err),
    }
}

/// Publishes one message and waits for the stream's ack. Failures that a
/// retry can fix (timeouts, a connection being re-established) are retried
/// with the same `Nats-Msg-Id` until `timeout`, so the server keeps exactly
/// one copy.
pub(crate) async fn publish_confirmed(
    js: &async_nats::jetstream::Context,
    subject: &str,
    msg_id: &str,
    headers: HeaderMap,
    payload: Bytes,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(50);
    loop {
        let message = PublishMessage::build()
            .payload(payload.clone())
            .headers(headers.clone())
            .message_id(msg_id);
        let attempt = async {
            js.send_publish(subject.to_owned(), message)
                .await?
                .await
                .map(|_ack| ())
        };
        let error = match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => publish_error(subject, e),
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!("publish to {subject} not confirmed within {timeout:?}"),
                ))
            }
        };
        if !error.is_retryable() || Instant::now() + pause >= deadline {
            return Err(error);
        }
        tracing::debug!(subject, %error, "publish failed; retrying with the same message id");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}
