//! Helpers for transport authors: the bookkeeping every broker transport
//! needs for subscriptions and shutdown.

use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, ErrorKind, Result};
use crate::transport::{Consumer, Unfinished};

/// The running subscriptions of a transport, and what they left
/// unfinished when they stopped.
#[derive(Debug, Default)]
pub struct Subscriptions {
    state: Mutex<(usize, Vec<Unfinished>)>,
    changed: Notify,
}

/// Counts one running subscription until dropped.
#[derive(Debug)]
pub struct Running(Arc<Subscriptions>);

impl Running {
    /// Records what the subscription leaves unfinished, then ends it.
    pub fn finish(self, unfinished: Vec<Unfinished>) {
        self.0
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            .extend(unfinished);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0 -= 1;
        self.0.changed.notify_waiters();
    }
}

impl Subscriptions {
    /// Counts a subscription that starts running.
    pub fn start(self: &Arc<Self>) -> Running {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).0 += 1;
        Running(self.clone())
    }

    /// Waits until no subscription runs.
    pub async fn idle(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.state.lock().unwrap_or_else(PoisonError::into_inner).0 == 0 {
                return;
            }
            changed.await;
        }
    }

    /// How many subscriptions run.
    pub fn running(&self) -> usize {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).0
    }

    /// Takes what stopped subscriptions left unfinished.
    pub fn take_unfinished(&self) -> Vec<Unfinished> {
        std::mem::take(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner).1)
    }
}

/// A [`Consumer`] backed by a task that stops when `detach` is
/// cancelled.
#[derive(Debug)]
pub struct TaskConsumer {
    detach: CancellationToken,
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl TaskConsumer {
    /// Wraps the subscription task and its stop signal.
    pub fn new(detach: CancellationToken, task: JoinHandle<()>) -> Self {
        Self {
            detach,
            task: tokio::sync::Mutex::new(Some(task)),
        }
    }
}

#[async_trait]
impl Consumer for TaskConsumer {
    async fn close(&self) -> Result<()> {
        self.detach.cancel();
        if let Some(task) = self.task.lock().await.take() {
            task.await.map_err(|e| {
                Error::new(ErrorKind::Other, format!("subscription task failed: {e}"))
            })?;
        }
        Ok(())
    }
}

/// Calls a delivery handler, turning a panic into a transient failure.
/// This is the one place a handler's panic is caught (the bus's own
/// handlers count it and let it unwind to here).
pub async fn call_guarded(
    handler: &dyn crate::transport::DeliveryHandler,
    delivery: crate::transport::Delivery,
) -> crate::transport::Outcome {
    use futures_util::FutureExt;
    use std::panic::AssertUnwindSafe;
    let panicked = |payload: Box<dyn std::any::Any + Send>| crate::transport::Outcome::Retry {
        error: format!(
            "handler panicked: {}",
            crate::handler::panic_message(&*payload)
        ),
    };
    match std::panic::catch_unwind(AssertUnwindSafe(|| handler.handle(delivery))) {
        Ok(fut) => AssertUnwindSafe(fut)
            .catch_unwind()
            .await
            .unwrap_or_else(panicked),
        Err(payload) => panicked(payload),
    }
}

/// The dead-letter headers every broker transport writes, by name (the
/// transport adds its prefix, e.g. `seambus-dl-`, and where the event was
/// published): `reason`, `error`, `attempts`, `time` (now), `group` and
/// `id` (all but `group` read back by [`dead_letter_from`]).
pub fn dead_letter_fields(
    verdict: &crate::transport::engine::Verdict,
    group: &crate::transport::GroupId,
    id: uuid::Uuid,
) -> [(&'static str, String); 6] {
    [
        ("reason", verdict.reason.as_str().to_owned()),
        ("error", verdict.error.clone()),
        ("attempts", verdict.attempts.to_string()),
        ("time", chrono::Utc::now().to_rfc3339()),
        ("group", group.to_string()),
        ("id", id.to_string()),
    ]
}

/// A dead letter read back from a broker: `get(name)` returns the
/// transport's dead-letter header `name` (`reason`, `error`,
/// `attempts`, `time`, `id`, and `origin`, where the event was
/// published). A stored message that is not an envelope is described
/// by those headers, with version 0 and its origin as event type.
pub fn dead_letter_from(
    group: &crate::transport::GroupId,
    envelope: std::result::Result<crate::transport::Envelope, crate::Error>,
    payload: &[u8],
    get: impl Fn(&str) -> Option<String>,
) -> crate::transport::DeadLetter {
    let envelope = envelope.unwrap_or_else(|_| {
        let mut attrs = crate::Attributes::new("unknown", get("origin").unwrap_or_default(), 0);
        if let Some(id) = get("id").and_then(|s| s.parse().ok()) {
            attrs.id = id;
        }
        crate::transport::Envelope::from_bytes(attrs, payload.to_vec())
    });
    let reason = get("reason")
        .and_then(|r| crate::transport::DeadLetterReason::parse(&r))
        .unwrap_or(crate::transport::DeadLetterReason::Undecodable);
    let mut dl = crate::transport::DeadLetter::new(
        envelope,
        group.clone(),
        reason,
        get("error").unwrap_or_else(|| "dead-lettered by the broker".into()),
        get("attempts").and_then(|a| a.parse().ok()).unwrap_or(0),
    );
    if let Some(time) = get("time").and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok()) {
        dl.time = time.with_timezone(&chrono::Utc);
    }
    dl
}

/// The checks every broker transport makes before sending: headers
/// without CR/LF and not posing as CloudEvents attributes, an event
/// name fit for a topic or subject, an encoded payload (which a
/// [`crate::Bus`] always provides to transports that do not share
/// values), no larger than `max_payload` bytes if given
/// ([`ErrorKind::PayloadTooLarge`]). Returns the payload.
pub fn outgoing<'a>(
    envelope: &'a crate::transport::Envelope,
    transport: &str,
    max_payload: Option<usize>,
) -> Result<&'a bytes::Bytes> {
    let attrs = envelope.attributes();
    attrs.validate()?;
    crate::validate_name(&attrs.event_type)?;
    let payload = envelope.payload_bytes().ok_or_else(|| {
        Error::new(
            ErrorKind::Encode,
            format!("the {transport} transport carries encoded payloads; publish through a Bus"),
        )
    })?;
    match max_payload {
        Some(max) if payload.len() > max => Err(Error::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "{} bytes is over the {transport} transport's limit of {max}",
                payload.len()
            ),
        )),
        _ => Ok(payload),
    }
}

/// Whether `name` starts with `prefix`, ASCII case ignored. Never
/// slices inside a character (names from the wire may be anything).
pub fn starts_with_ignore_case(name: &str, prefix: &str) -> bool {
    name.as_bytes()
        .get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix.as_bytes()))
}

/// Error text fit for a message header: control characters (CR, LF)
/// become spaces, at most 1024 characters.
pub fn header_text(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1024)
        .collect()
}

/// The common end of a broker transport's shutdown, once it refuses new
/// work and has told its subscriptions to stop (`closing`): waits until
/// publishes in flight (holding `gate` shared) and subscriptions finish,
/// up to `deadline`; then fires `stop` so handlers still running give
/// their events back, and reports.
pub async fn drain(
    deadline: std::time::Duration,
    gate: &tokio::sync::RwLock<()>,
    subscriptions: &Subscriptions,
    stop: &CancellationToken,
) -> crate::transport::ShutdownReport {
    let in_time = tokio::time::timeout(deadline, async {
        drop(gate.write().await);
        subscriptions.idle().await;
    })
    .await
    .is_ok();
    stop.cancel();
    // Each subscription gives up on its broker calls `STOP_GRACE` after
    // the deadline; this wait is bounded too, so a shutdown always returns.
    let stopped = tokio::time::timeout(super::engine::STOP_GRACE * 4, subscriptions.idle())
        .await
        .is_ok();
    if !stopped {
        tracing::error!(
            running = subscriptions.running(),
            "subscriptions did not stop after the shutdown deadline; shutting down without them"
        );
    }
    let unfinished = subscriptions.take_unfinished();
    let mut report = crate::transport::ShutdownReport::drained();
    report.drained = in_time && stopped && unfinished.is_empty();
    report.unfinished = unfinished;
    report
}

/// A URL with the password of its `user:password@` part hidden, for
/// logs, errors and `Debug`.
///
/// ```
/// use seambus::transport::support::redact_url;
/// assert_eq!(redact_url("amqp://app:s3cr3t@mq:5672/"), "amqp://app:<redacted>@mq:5672/");
/// assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        // `user:password@`: the user stays; a lone `token@` goes.
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
            None => format!("{scheme}://<redacted>@{host}"),
        },
        None => url.to_owned(),
    }
}
