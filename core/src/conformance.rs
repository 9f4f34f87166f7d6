//! The transport conformance suite (feature `conformance`).
//!
//! **Not semver-stable**: cases are added and tightened as the design
//! evolves. It exists for transport crates' own tests.
//!
//! Every transport runs the same cases against its real broker. Each case
//! uses a fresh namespace, counts event ids and checks "none missing,
//! duplicates only where the transport admits them"
//! ([`Capabilities::duplicates`](crate::transport::Capabilities::duplicates)).
//! Whether a case applies is decided in one place, from the transport's
//! [`Capabilities`] ([`cases`], [`Case::applies`]); a case that does not
//! apply is *registered* as ignored with the reason, so the test output
//! and cargo's `test result:` line show it, instead of passing silently.
//!
//! A transport crate provides a [`Harness`] and makes its
//! `tests/conformance.rs` a `harness = false` test target whose `main` is
//! the [`Suite`]:
//!
//! ```ignore
//! // transports/nats/Cargo.toml:
//! //   [[test]]
//! //   name = "conformance"
//! //   harness = false
//!
//! // transports/nats/tests/conformance.rs
//! struct Nats;
//! #[async_trait::async_trait]
//! impl seambus::conformance::Harness for Nats { /* ... */ }
//! seambus::conformance_tests!(Nats);
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::{BoxFuture, LocalBoxFuture};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use uuid::Uuid;

pub use libtest_mimic;

use crate::transport::{Capabilities, DeadLetterReason, GroupId, Ordering, Transport};
use crate::{
    Attributes, Bus, Context, Envelope, ErrorKind, HandlerError, PublishOptions, Received,
    RetryPolicy,
};

/// What a transport crate provides to run the suite.
#[async_trait]
pub trait Harness: Send + Sync {
    /// A transport for one case. `namespace` is fresh for every case; use it
    /// to name streams, topics, exchanges, queues. The suite may call this
    /// again with the same namespace to get a second client of the same
    /// topology (another process), for example after a shutdown.
    async fn transport(&self, namespace: &str) -> Arc<dyn Transport>;

    /// Deletes what the case created. Called at the end of each case.
    async fn cleanup(&self, namespace: &str) {
        let _ = namespace;
    }

    /// A future that stops and starts the broker, for case 15 (which
    /// [`Suite`] runs alone, after every other case). `None` (the default):
    /// the case is reported ignored, or fails for a persistent transport
    /// when `SEAMBUS_REQUIRE_BROKERS=1`. Make the future start the broker
    /// again if it is dropped half-way (a failed case), so later tests find
    /// it running.
    fn restart_broker(&self) -> Option<BoxFuture<'static, ()>> {
        None
    }

    /// A future that deletes `group` of the transport for `namespace`
    /// (the broker crate's own `delete_group`), for case 23. `None` (the
    /// default): the transport cannot delete a group, and the case is
    /// reported ignored. The future must do nothing until polled.
    fn delete_group(
        &self,
        namespace: &str,
        group: &GroupId,
    ) -> Option<BoxFuture<'static, crate::Result<()>>> {
        let _ = (namespace, group);
        None
    }

    /// Whether publishers may go on publishing while the broker restarts
    /// (default true). A broker that cannot take it sets false: case 15
    /// then publishes every event first and restarts the broker while the
    /// groups consume them.
    fn publishes_across_restart(&self) -> bool {
        true
    }

    /// How many events case 15 sends through the restart (default 3000).
    fn restart_events(&self) -> u64 {
        3000
    }

    /// Whether the transport has a broker or server of its own (default
    /// true). An embedded one (SQLite: a file, no server) has none to
    /// restart, and case 15 does not apply; its crate tests killing the
    /// consuming process instead.
    fn has_server(&self) -> bool {
        true
    }

    /// Why the broker cannot be reached, if it cannot (checked once, before
    /// the suite runs). Every case is then reported ignored with that reason,
    /// or fails when `SEAMBUS_REQUIRE_BROKERS=1`.
    fn unavailable(&self) -> Option<String> {
        None
    }
}

/// Whether `SEAMBUS_REQUIRE_BROKERS=1`: an unavailable broker is then a
/// failure, not a skip.
pub fn brokers_required() -> bool {
    std::env::var("SEAMBUS_REQUIRE_BROKERS").is_ok_and(|v| v == "1")
}

/// Runs `script` with `args` (a test's broker control, e.g. this
/// repository's `scripts/broker stop nats`) and panics, naming both, when
/// it cannot be run or fails.
pub fn run_script(script: &str, args: &[&str]) {
    let status = std::process::Command::new(script)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(status.success(), "{script} {}: {status}", args.join(" "));
}

/// Whether a broker test may run (for a crate's own tests beside the
/// suite): false (with a loud message) when the harness's broker is
/// unavailable; panics instead when `SEAMBUS_REQUIRE_BROKERS=1`.
pub fn broker_ready(h: &dyn Harness) -> bool {
    match h.unavailable() {
        None => true,
        Some(why) if brokers_required() => {
            panic!("broker required (SEAMBUS_REQUIRE_BROKERS=1) but unavailable: {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED: broker unavailable: {why} (set SEAMBUS_REQUIRE_BROKERS=1 to fail instead)");
            false
        }
    }
}

/// Payload of most cases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, crate::Event)]
#[event(name = "conformance.ping", version = 1)]
pub struct Ping {
    /// Sequence number within the case.
    pub seq: u64,
    /// Free text (exercises payload transport).
    pub body: String,
}

/// A second event type (topic isolation, causation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, crate::Event)]
#[event(name = "conformance.pong", version = 1)]
pub struct Pong {
    /// Sequence number within the case.
    pub seq: u64,
}

/// A third event type (topic isolation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, crate::Event)]
#[event(name = "conformance.tick", version = 1)]
pub struct Tick {
    /// Sequence number within the case.
    pub seq: u64,
}

/// Version 1 of the upcast test event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, crate::Event)]
#[event(name = "conformance.sized", version = 1)]
pub struct SizedV1 {
    /// A number.
    pub n: u64,
}

/// Version 2 of the upcast test event: adds `twice`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, crate::Event)]
#[event(name = "conformance.sized", version = 2)]
pub struct SizedV2 {
    /// The number.
    pub n: u64,
    /// Twice the number (computed by the upcast from v1).
    pub twice: u64,
}

impl From<SizedV1> for SizedV2 {
    fn from(v1: SizedV1) -> Self {
        Self {
            n: v1.n,
            twice: v1.n * 2,
        }
    }
}

const MODULE: &str = "conformance";

/// How long any one wait may take (env `SEAMBUS_CONFORMANCE_TIMEOUT_SECS`,
/// default 90).
pub fn patience() -> Duration {
    let secs = std::env::var("SEAMBUS_CONFORMANCE_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(90);
    Duration::from_secs(secs)
}

/// Runs a future on a fresh two-worker runtime (what each case of the
/// [`Suite`] runs on). Logs go to the test output at level `error`, or as
/// `SEAMBUS_LOG` says (an `EnvFilter`, e.g. `seambus=debug`); in a case
/// of the [`Suite`] they are kept and shown with its failure.
pub fn block_on<F: Future>(future: F) -> F::Output {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SEAMBUS_LOG")
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(capture::Writer)
        .try_init();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    // A case's runtime threads carry its name, so its output is its own.
    if let Some(name) = capture::case_thread() {
        runtime.thread_name(name);
    }
    runtime
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(future)
}

/// Every log line of this test binary from the moment it is created, at
/// every level, kept for the test to read: for tests of what is logged
/// (a warning that must appear, a secret that must not). It installs the
/// global subscriber, so create it first, in a test binary of its own.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    /// Starts capturing. Panics if a subscriber is installed already.
    pub fn capture() -> Self {
        let logs = Self::default();
        let sink = logs.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .init();
        logs
    }

    /// What was logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The output of the [`Suite`]'s cases: libtest-mimic runs tests without
/// capturing what they print, so the logs and panic messages of a case's
/// threads (named after it) are kept here and shown with its failure, as
/// the built-in test harness does. Other threads print as usual.
mod capture {
    use std::collections::HashMap;
    use std::io;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use std::sync::{Mutex, Once, PoisonError};

    const PREFIX: &str = "conformance:";

    static ON: AtomicBool = AtomicBool::new(false);
    static KEPT: Mutex<Option<HashMap<String, Vec<u8>>>> = Mutex::new(None);

    /// The name of the threads that run `case`.
    pub(super) fn thread_name(case: &str) -> String {
        format!("{PREFIX}{case}")
    }

    /// The current thread's name when it runs a case.
    pub(super) fn case_thread() -> Option<String> {
        std::thread::current()
            .name()
            .filter(|n| n.starts_with(PREFIX))
            .map(str::to_owned)
    }

    fn keep(thread: &str, bytes: &[u8]) {
        KEPT.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(HashMap::new)
            .entry(thread.to_owned())
            .or_default()
            .extend_from_slice(bytes);
    }

    /// What the threads of a case printed (taken out).
    pub(super) fn take(thread: &str) -> String {
        let bytes = KEPT
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
            .and_then(|kept| kept.remove(thread))
            .unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Starts keeping the cases' output (not with `--nocapture`), panic
    /// messages included.
    pub(super) fn install(on: bool) {
        ON.store(on, SeqCst);
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                match case_thread().filter(|_| ON.load(SeqCst)) {
                    Some(thread) => keep(&thread, format!("thread '{thread}' {info}\n").as_bytes()),
                    None => default(info),
                }
            }));
        });
    }

    /// The log writer: a case's own buffer, else the test output.
    pub(super) struct Writer;

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Writer {
        type Writer = Out;

        fn make_writer(&'a self) -> Out {
            Out(case_thread().filter(|_| ON.load(SeqCst)))
        }
    }

    pub(super) struct Out(Option<String>);

    impl io::Write for Out {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            match &self.0 {
                Some(thread) => keep(thread, buf),
                // Through `eprint!`, so the built-in harness captures it.
                None => eprint!("{}", String::from_utf8_lossy(buf)),
            }
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}

/// A fresh namespace for one case.
pub fn namespace(case: &str) -> String {
    let id = Uuid::now_v7().simple().to_string();
    format!("{case}-{}", &id[id.len() - 10..])
}

/// Counts handled event ids and wakes waiters on every change.
#[derive(Default)]
pub struct Tally {
    seen: Mutex<HashMap<Uuid, u32>>,
    changed: Notify,
}

impl Tally {
    /// A new, shared tally.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Records one handling of `id`.
    pub fn record(&self, id: Uuid) {
        *self.seen.lock().unwrap().entry(id).or_default() += 1;
        self.changed.notify_waiters();
    }

    /// Distinct ids seen.
    pub fn distinct(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Ids seen, with counts.
    pub fn snapshot(&self) -> HashMap<Uuid, u32> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until `done(&seen)` holds; panics with `what` after
    /// [`patience`].
    pub async fn wait_until(&self, what: &str, done: impl Fn(&HashMap<Uuid, u32>) -> bool) {
        let waiting = async {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if done(&self.seen.lock().unwrap()) {
                    return;
                }
                changed.await;
            }
        };
        if tokio::time::timeout(patience(), waiting).await.is_err() {
            let seen = self.distinct();
            panic!("timed out waiting for {what} ({seen} distinct ids seen)");
        }
    }

    /// Waits until every id in `ids` was seen at least once.
    pub async fn wait_for_all(&self, what: &str, ids: &HashSet<Uuid>) {
        self.wait_until(what, |seen| ids.iter().all(|id| seen.contains_key(id)))
            .await
    }

    /// Checks that exactly `ids` were seen, each once unless duplicates are
    /// admitted.
    pub fn assert_exactly(&self, what: &str, ids: &HashSet<Uuid>, duplicates_ok: bool) {
        let seen = self.snapshot();
        let foreign = seen.keys().filter(|id| !ids.contains(id)).count();
        assert_eq!(
            foreign, 0,
            "{what}: {foreign} ids that were never published"
        );
        self.assert_all_of(what, ids, duplicates_ok);
    }

    /// Checks that every id in `ids` was seen, each once unless duplicates
    /// are admitted; other ids may have been seen too (a publish that
    /// failed may still have been stored).
    pub fn assert_all_of(&self, what: &str, ids: &HashSet<Uuid>, duplicates_ok: bool) {
        let seen = self.snapshot();
        let missing = ids.iter().filter(|id| !seen.contains_key(id)).count();
        assert_eq!(missing, 0, "{what}: {missing} of {} ids missing", ids.len());
        if !duplicates_ok {
            let doubled = ids
                .iter()
                .filter(|id| seen.get(id).is_some_and(|&n| n > 1))
                .count();
            assert_eq!(doubled, 0, "{what}: {doubled} ids handled more than once");
        }
    }
}

/// Polls `cond` every 10 ms until it holds (for state that has no change
/// notification, such as a broker's dead-letter queue); panics after
/// [`patience`].
pub async fn poll_until<F, Fut>(what: &str, cond: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + patience();
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A crash loop, for a broker crate's test of its delivery limit: over
/// each transport `connect` makes in turn, a group subscribes a handler
/// that never finishes; one [`Ping`] is published through the first, and
/// each of the first `stops` (at least 1) buses is shut down (deadline 200 ms) while
/// its handler holds it, as a crash would leave it, unsettled. The next
/// bus must then dead-letter it without running the handler again.
/// Returns that dead letter, the event's id and the dead letters its
/// subscription's stats count; fails when the handler runs once more.
pub async fn crash_loop<F, Fut>(
    stops: usize,
    connect: F,
) -> (crate::transport::DeadLetter, Uuid, u64)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Transport>>,
{
    let calls = Arc::new(AtomicUsize::new(0));
    let subscribe = |bus: Bus| {
        let c = calls.clone();
        async move {
            let sub = bus
                .module("billing")
                .subscribe(move |_ping: Received<Ping>, _ctx: Context| {
                    c.fetch_add(1, SeqCst);
                    std::future::pending::<std::result::Result<(), HandlerError>>()
                })
                .await
                .expect("subscribe");
            (bus, sub)
        }
    };
    let mut id = None;
    for round in 1..=stops {
        let (bus, _sub) = subscribe(bus_on(connect().await)).await;
        if id.is_none() {
            let ping = Ping {
                seq: 0,
                body: String::new(),
            };
            id = Some(bus.module(MODULE).publish(ping).await.expect("publish"));
        }
        poll_until("the handler holding the event", || async {
            calls.load(SeqCst) == round
        })
        .await;
        bus.shutdown(Duration::from_millis(200))
            .await
            .expect("shutdown");
    }
    let (bus, sub) = subscribe(bus_on(connect().await)).await;
    poll_until("the crash loop's dead letter", || async {
        sub.dead_letters().await.is_ok_and(|d| !d.is_empty())
    })
    .await;
    let mut dead = sub.dead_letters().await.expect("dead letters");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(calls.load(SeqCst), stops, "the handler ran again");
    let counted = sub.stats().dead_lettered;
    bus.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    (dead.remove(0), id.expect("stops is at least 1"), counted)
}

fn bus_on(transport: Arc<dyn Transport>) -> Bus {
    Bus::builder()
        .transport_arc("under-test", transport)
        .upcast::<SizedV1, SizedV2>()
        .build()
        .expect("conformance bus")
}

fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy::default()
        .with_max_attempts(max_attempts)
        .with_backoff(Duration::from_millis(5), Duration::from_millis(50))
}

fn ok() -> Result<(), HandlerError> {
    Ok(())
}

/// A handler that records the id of every event it handles in `tally`.
pub fn record_into<E: crate::Event>(
    tally: &Arc<Tally>,
) -> impl Fn(Received<E>, Context) -> BoxFuture<'static, Result<(), HandlerError>> + Send + Sync + 'static
{
    let tally = tally.clone();
    move |_event, ctx| {
        let tally = tally.clone();
        Box::pin(async move {
            tally.record(ctx.envelope().id());
            ok()
        })
    }
}

/// Publishes `n` pings from `publishers` concurrent tasks; returns the ids.
async fn publish_pings(bus: &Bus, n: u64, publishers: u64, key_count: u64) -> HashSet<Uuid> {
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let module = bus.module(MODULE);
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut seq = p;
            while seq < n {
                let mut opts = PublishOptions::new();
                if key_count > 0 {
                    opts = opts.key(format!("key-{}", seq % key_count));
                }
                let ping = Ping {
                    seq,
                    body: format!("ping {seq}"),
                };
                ids.push(module.publish_with(ping, opts).await.expect("publish"));
                seq += publishers;
            }
            ids
        }));
    }
    let mut all = HashSet::new();
    for t in tasks {
        all.extend(t.await.expect("publisher task"));
    }
    assert_eq!(all.len() as u64, n, "publish returned duplicate ids");
    all
}

/// Shuts `bus` down; fails the case when shutdown does not return in time
/// after its deadline (a shutdown that hangs is a defect to report, not a
/// wait to sit out).
async fn shut_down(bus: &Bus, deadline: Duration) -> crate::Result<crate::ShutdownReport> {
    tokio::time::timeout(deadline + patience(), bus.shutdown(deadline))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "shutdown did not return within {:?} after its deadline of {deadline:?}",
                patience()
            )
        })
}

/// The harness's cleanup of `ns`, failing the case if it hangs.
async fn clean_up(h: &dyn Harness, ns: &str) {
    tokio::time::timeout(patience(), h.cleanup(ns))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the harness's cleanup of {ns} did not finish within {:?}",
                patience()
            )
        })
}

async fn finish(h: &dyn Harness, ns: &str, bus: &Bus) {
    let _ = shut_down(bus, Duration::from_secs(10)).await;
    clean_up(h, ns).await;
}

/// Case 1: payload, name, version, every envelope attribute and header
/// arrive intact; an event published from a handler gets correlation and
/// causation.
pub async fn envelope_intact(h: &dyn Harness) {
    let ns = namespace("envelope");
    let bus = bus_on(h.transport(&ns).await);
    let got: Arc<Mutex<Vec<(Ping, Envelope, u32)>>> = Arc::default();
    let pongs: Arc<Mutex<Vec<Envelope>>> = Arc::default();
    let changed = Arc::new(Notify::new());
    let (g, c, publisher) = (got.clone(), changed.clone(), bus.module(MODULE));
    let _s1 = bus
        .module("receiver")
        .subscribe(move |ping: Received<Ping>, ctx: Context| {
            let (g, c, publisher) = (g.clone(), c.clone(), publisher.clone());
            async move {
                g.lock()
                    .unwrap()
                    .push(((*ping).clone(), ctx.envelope().clone(), ctx.attempt()));
                publisher.publish(Pong { seq: ping.seq }).await?;
                c.notify_waiters();
                ok()
            }
        })
        .await
        .expect("subscribe ping");
    let (p, c) = (pongs.clone(), changed.clone());
    let _s2 = bus
        .module("receiver")
        .subscribe(move |_pong: Received<Pong>, ctx: Context| {
            let (p, c) = (p.clone(), c.clone());
            async move {
                p.lock().unwrap().push(ctx.envelope().clone());
                c.notify_waiters();
                ok()
            }
        })
        .await
        .expect("subscribe pong");

    let before = chrono::Utc::now();
    let body = "héllo \"world\" \u{1F600} \\ / \n tab\t".to_string();
    let id = bus
        .module(MODULE)
        .publish_with(
            Ping {
                seq: 42,
                body: body.clone(),
            },
            PublishOptions::new()
                .key("key-1")
                .subject("subject-1")
                .correlation_id("corr-1")
                .traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
                .header("x-tenant", "acme")
                .header("x-empty", ""),
        )
        .await
        .expect("publish");
    let after = chrono::Utc::now();

    let waiting = async {
        loop {
            let n = changed.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if !got.lock().unwrap().is_empty() && !pongs.lock().unwrap().is_empty() {
                return;
            }
            n.await;
        }
    };
    tokio::time::timeout(patience(), waiting)
        .await
        .expect("ping and pong delivered");

    let (ping, env, attempt) = got.lock().unwrap()[0].clone();
    assert_eq!(ping, Ping { seq: 42, body });
    assert_eq!(attempt, 1);
    let a = env.attributes();
    assert_eq!(a.id, id);
    assert_eq!(a.event_type, "conformance.ping");
    assert_eq!(a.source, MODULE);
    assert_eq!(a.data_version, 1);
    assert_eq!(a.data_content_type, crate::codec::JSON_CONTENT_TYPE);
    assert_eq!(a.subject.as_deref(), Some("subject-1"));
    assert_eq!(a.partition_key.as_deref(), Some("key-1"));
    assert_eq!(a.correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(a.causation_id, None);
    assert_eq!(
        a.traceparent.as_deref(),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(a.header("x-tenant"), Some("acme"));
    assert_eq!(a.header("x-empty"), Some(""));
    // Brokers may store time with millisecond precision.
    let slack = chrono::Duration::milliseconds(1);
    assert!(
        a.time >= before - slack && a.time <= after + slack,
        "time {} outside [{before}, {after}]",
        a.time
    );

    let pong = pongs.lock().unwrap()[0].clone();
    let pa = pong.attributes();
    assert_eq!(pa.causation_id, Some(id.to_string()), "causation id");
    assert_eq!(
        pa.correlation_id.as_deref(),
        Some("corr-1"),
        "correlation id"
    );
    assert_eq!(pa.traceparent, a.traceparent, "traceparent propagated");
    assert_ne!(pa.id, id);
    finish(h, &ns, &bus).await;
}

/// Case 2: many concurrent publishers and subscribers, thousands of events,
/// none lost.
pub async fn many_publishers_and_subscribers(h: &dyn Harness) {
    let ns = namespace("many");
    let transport = h.transport(&ns).await;
    let dup = transport.capabilities().duplicates;
    let bus = bus_on(transport);
    let modules = ["alpha", "beta", "gamma"];
    let tallies: Vec<_> = modules.iter().map(|_| Tally::new()).collect();
    let mut subs = Vec::new();
    for (m, t) in modules.iter().zip(&tallies) {
        subs.push(
            bus.module(*m)
                .subscribe(record_into::<Ping>(t))
                .concurrency(4)
                .ordering(Ordering::Unordered)
                .await
                .expect("subscribe"),
        );
    }
    let ids = publish_pings(&bus, 4000, 8, 0).await;
    for (m, t) in modules.iter().zip(&tallies) {
        t.wait_for_all(m, &ids).await;
    }
    for (m, t) in modules.iter().zip(&tallies) {
        t.assert_exactly(m, &ids, dup);
    }
    finish(h, &ns, &bus).await;
}

/// Case 3: several event names at once stay isolated.
pub async fn topics_isolated(h: &dyn Harness) {
    let ns = namespace("topics");
    let transport = h.transport(&ns).await;
    let dup = transport.capabilities().duplicates;
    let bus = bus_on(transport);
    let (tp, tg, tt) = (Tally::new(), Tally::new(), Tally::new());
    let m = bus.module("listener");
    let s1 = m
        .subscribe(record_into::<Ping>(&tp))
        .concurrency(2)
        .await
        .unwrap();
    let s2 = m
        .subscribe(record_into::<Pong>(&tg))
        .concurrency(2)
        .await
        .unwrap();
    let s3 = m
        .subscribe(record_into::<Tick>(&tt))
        .concurrency(2)
        .await
        .unwrap();
    let publisher = bus.module(MODULE);
    let (mut ip, mut ig, mut it) = (HashSet::new(), HashSet::new(), HashSet::new());
    for seq in 0..300 {
        ip.insert(
            publisher
                .publish(Ping {
                    seq,
                    body: String::new(),
                })
                .await
                .unwrap(),
        );
        ig.insert(publisher.publish(Pong { seq }).await.unwrap());
        it.insert(publisher.publish(Tick { seq }).await.unwrap());
    }
    tp.wait_for_all("pings", &ip).await;
    tg.wait_for_all("pongs", &ig).await;
    tt.wait_for_all("ticks", &it).await;
    tp.assert_exactly("pings", &ip, dup);
    tg.assert_exactly("pongs", &ig, dup);
    tt.assert_exactly("ticks", &it, dup);
    for s in [&s1, &s2, &s3] {
        assert_eq!(
            s.stats().dead_lettered,
            0,
            "no event crossed into another topic"
        );
    }
    finish(h, &ns, &bus).await;
}

/// Case 4: two groups each receive everything; inside a group, split across
/// two processes, each event is handled once.
pub async fn groups_fan_out_and_compete(h: &dyn Harness) {
    let ns = namespace("groups");
    let transport = h.transport(&ns).await;
    let caps = transport.capabilities();
    let bus_a = bus_on(transport);
    let bus_b = bus_on(h.transport(&ns).await);
    let (audit, billing) = (Tally::new(), Tally::new());
    let (on_a, on_b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let _audit = bus_a
        .module("audit")
        .subscribe(record_into::<Ping>(&audit))
        .concurrency(2)
        .await
        .unwrap();
    let mut billing_subs = Vec::new();
    for (bus, counter) in [(&bus_a, &on_a), (&bus_b, &on_b)] {
        let (t, n) = (billing.clone(), counter.clone());
        billing_subs.push(
            bus.module("billing")
                .subscribe(move |_p: Received<Ping>, ctx: Context| {
                    let (t, n) = (t.clone(), n.clone());
                    async move {
                        n.fetch_add(1, SeqCst);
                        tokio::task::yield_now().await;
                        t.record(ctx.envelope().id());
                        ok()
                    }
                })
                .concurrency(2)
                .ordering(Ordering::Unordered)
                .await
                .unwrap(),
        );
    }
    let ids = publish_pings(&bus_a, 2000, 4, 0).await;
    audit.wait_for_all("audit group", &ids).await;
    billing.wait_for_all("billing group", &ids).await;
    audit.assert_exactly("audit group", &ids, caps.duplicates);
    billing.assert_exactly("billing group", &ids, caps.duplicates);
    let (a, b) = (on_a.load(SeqCst), on_b.load(SeqCst));
    assert!(
        a > 0 && b > 0,
        "both workers of the billing group took events ({a} / {b})"
    );
    let _ = shut_down(&bus_b, Duration::from_secs(10)).await;
    finish(h, &ns, &bus_a).await;
}

/// Case 5: per-key order holds under concurrency, across retries.
pub async fn per_key_order(h: &dyn Harness) {
    let ns = namespace("order");
    let transport = h.transport(&ns).await;
    let bus = bus_on(transport);
    const KEYS: u64 = 16;
    const N: u64 = 1600;
    let log: Arc<Mutex<HashMap<String, Vec<u64>>>> = Arc::default();
    let failed_once: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let (running, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let tally = Tally::new();
    let (l, f, r, p, t) = (
        log.clone(),
        failed_once.clone(),
        running.clone(),
        peak.clone(),
        tally.clone(),
    );
    let _sub = bus
        .module("ledger")
        .subscribe(move |ping: Received<Ping>, ctx: Context| {
            let (l, f, r, p, t) = (l.clone(), f.clone(), r.clone(), p.clone(), t.clone());
            async move {
                let now = r.fetch_add(1, SeqCst) + 1;
                p.fetch_max(now, SeqCst);
                tokio::task::yield_now().await;
                r.fetch_sub(1, SeqCst);
                // Every 7th event fails once: order must survive the retry.
                if ping.seq % 7 == 0 && f.lock().unwrap().insert(ping.seq) {
                    return Err(HandlerError::retry(
                        "first attempt of every 7th event fails",
                    ));
                }
                let key = ctx.envelope().attributes().partition_key.clone().unwrap();
                l.lock().unwrap().entry(key).or_default().push(ping.seq);
                t.record(ctx.envelope().id());
                ok()
            }
        })
        .concurrency(8)
        // Long enough that later events of the key are queued behind the
        // failed one on any broker, so an implementation that lets them
        // overtake is caught.
        .retry(
            RetryPolicy::default()
                .with_max_attempts(10)
                .with_backoff(Duration::from_millis(100), Duration::from_millis(100)),
        )
        .await
        .unwrap();
    // One publisher: publish order is seq order within each key.
    let ids = publish_pings(&bus, N, 1, KEYS).await;
    tally.wait_for_all("ordered events", &ids).await;
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len() as u64, KEYS);
    for (key, seqs) in &log {
        let mut dedup = seqs.clone();
        dedup.dedup();
        assert!(
            dedup.windows(2).all(|w| w[0] < w[1]),
            "key {key} handled out of order: {dedup:?}"
        );
        assert_eq!(dedup.len() as u64, N / KEYS, "key {key} incomplete");
    }
    assert!(
        peak.load(SeqCst) > 1,
        "different keys never ran concurrently (peak {})",
        peak.load(SeqCst)
    );
    finish(h, &ns, &bus).await;
}

/// Case 6: a transient failure is redelivered and then succeeds.
pub async fn transient_failure_redelivered(h: &dyn Harness) {
    let ns = namespace("redeliver");
    let transport = h.transport(&ns).await;
    let dup = transport.capabilities().duplicates;
    let bus = bus_on(transport);
    let tally = Tally::new();
    let attempts_seen: Arc<Mutex<HashMap<Uuid, Vec<u32>>>> = Arc::default();
    let (t, a) = (tally.clone(), attempts_seen.clone());
    let sub = bus
        .module("flaky")
        .subscribe(move |_p: Received<Ping>, ctx: Context| {
            let (t, a) = (t.clone(), a.clone());
            async move {
                let id = ctx.envelope().id();
                a.lock().unwrap().entry(id).or_default().push(ctx.attempt());
                if ctx.attempt() < 3 {
                    return Err(HandlerError::retry("not yet"));
                }
                t.record(id);
                ok()
            }
        })
        .concurrency(4)
        .retry(fast_retry(5))
        .await
        .unwrap();
    let ids = publish_pings(&bus, 50, 2, 0).await;
    tally.wait_for_all("redelivered events", &ids).await;
    tally.assert_exactly("redelivered events", &ids, dup);
    for (id, attempts) in attempts_seen.lock().unwrap().iter() {
        assert_eq!(&attempts[..3], &[1, 2, 3], "attempts of {id}");
    }
    assert!(
        sub.stats().retried >= 100,
        "retries counted: {:?}",
        sub.stats()
    );
    assert!(sub
        .dead_letters()
        .await
        .map(|d| d.is_empty())
        .unwrap_or(true));
    finish(h, &ns, &bus).await;
}

/// Case 7: many failures across subscribers, then everything is consumed.
pub async fn many_failures_then_all_consumed(h: &dyn Harness) {
    let ns = namespace("failures");
    let transport = h.transport(&ns).await;
    let dup = transport.capabilities().duplicates;
    let bus = bus_on(transport);
    let modules = ["m1", "m2", "m3", "m4"];
    let tallies: Vec<_> = modules.iter().map(|_| Tally::new()).collect();
    let mut subs = Vec::new();
    for (i, (m, t)) in modules.iter().zip(&tallies).enumerate() {
        let t = t.clone();
        subs.push(
            bus.module(*m)
                .subscribe(move |p: Received<Ping>, ctx: Context| {
                    let t = t.clone();
                    async move {
                        // A different third of the events fails for each module,
                        // once or twice.
                        let fails = (p.seq + i as u64) % 3 == 0;
                        if fails && ctx.attempt() <= 1 + (p.seq % 2) as u32 {
                            return Err(HandlerError::retry("transient"));
                        }
                        t.record(ctx.envelope().id());
                        ok()
                    }
                })
                .concurrency(3)
                .ordering(Ordering::Unordered)
                .retry(fast_retry(5))
                .await
                .unwrap(),
        );
    }
    let ids = publish_pings(&bus, 1000, 4, 0).await;
    for (m, t) in modules.iter().zip(&tallies) {
        t.wait_for_all(m, &ids).await;
        t.assert_exactly(m, &ids, dup);
    }
    for s in &subs {
        assert_eq!(s.stats().dead_lettered, 0);
        assert!(s.stats().retried > 0);
    }
    finish(h, &ns, &bus).await;
}

/// Case 8: max attempts reached (or a permanent error) -> dead letter with
/// reason, and the flow continues; then the dead letters are redriven.
pub async fn dead_letter_after_max_attempts(h: &dyn Harness) {
    let ns = namespace("deadletter");
    let transport = h.transport(&ns).await;
    let caps = transport.capabilities();
    let bus = bus_on(transport);
    let tally = Tally::new();
    let healed = Arc::new(AtomicBool::new(false));
    let (t, healed2) = (tally.clone(), healed.clone());
    let sub = bus
        .module("strict")
        .subscribe(move |p: Received<Ping>, ctx: Context| {
            let (t, healed) = (t.clone(), healed2.clone());
            async move {
                if !healed.load(SeqCst) {
                    if p.seq % 10 == 0 {
                        return Err(HandlerError::retry(format!("poison {}", p.seq)));
                    }
                    if p.seq % 10 == 5 {
                        return Err(HandlerError::reject(format!("invalid {}", p.seq)));
                    }
                }
                t.record(ctx.envelope().id());
                ok()
            }
        })
        .concurrency(4)
        .ordering(Ordering::Unordered)
        .retry(fast_retry(3))
        .await
        .unwrap();
    let mut by_seq = HashMap::new();
    let publisher = bus.module(MODULE);
    for seq in 0..200 {
        let id = publisher
            .publish(Ping {
                seq,
                body: String::new(),
            })
            .await
            .unwrap();
        by_seq.insert(seq, id);
    }
    let good: HashSet<Uuid> = by_seq
        .iter()
        .filter(|(s, _)| *s % 5 != 0)
        .map(|(_, id)| *id)
        .collect();
    tally.wait_for_all("healthy events", &good).await;
    poll_until("40 events dead-lettered", || async {
        sub.stats().dead_lettered >= 40
    })
    .await;
    // The reasons, read back from the store; then the redrive.
    if caps.dead_letter_store {
        let dead = sub.dead_letters().await.expect("list dead letters");
        assert_eq!(dead.len(), 40, "dead letters: {}", dead.len());
        for dl in &dead {
            let seq = by_seq
                .iter()
                .find(|(_, id)| **id == dl.envelope.id())
                .map(|(s, _)| *s)
                .expect("a published id");
            assert_eq!(dl.group.module(), "strict");
            if seq % 10 == 0 {
                assert_eq!(dl.reason, DeadLetterReason::MaxAttempts);
                assert_eq!(dl.attempts, 3);
                assert!(dl.error.contains(&format!("poison {seq}")), "{}", dl.error);
            } else {
                assert_eq!(dl.reason, DeadLetterReason::Rejected);
                assert_eq!(dl.attempts, 1);
                assert!(dl.error.contains(&format!("invalid {seq}")), "{}", dl.error);
            }
        }
        healed.store(true, SeqCst);
        assert_eq!(sub.redrive(None).await.unwrap(), 40);
        let all: HashSet<Uuid> = by_seq.values().copied().collect();
        tally.wait_for_all("redriven events", &all).await;
        tally.assert_exactly("all events", &all, caps.duplicates);
        assert!(sub.dead_letters().await.unwrap().is_empty());
    }
    finish(h, &ns, &bus).await;
}

fn raw(event_type: &str, version: u32, payload: &'static [u8]) -> Envelope {
    Envelope::from_bytes(
        Attributes::new(MODULE, event_type.to_owned(), version),
        payload,
    )
}

/// Case 9: an undecodable payload and an unknown version go to the dead
/// letter at once, never retried; good events keep flowing.
pub async fn undecodable_dead_lettered(h: &dyn Harness) {
    let ns = namespace("undecodable");
    let transport = h.transport(&ns).await;
    let caps = transport.capabilities();
    let bus = bus_on(transport.clone());
    let tally = Tally::new();
    let sub = bus
        .module("picky")
        .subscribe(record_into::<Ping>(&tally))
        .retry(fast_retry(5))
        .await
        .unwrap();
    let bad = [
        (
            raw("conformance.ping", 1, b"not json"),
            DeadLetterReason::Undecodable,
        ),
        (
            raw("conformance.ping", 1, b"{\"seq\":\"x\"}"),
            DeadLetterReason::Undecodable,
        ),
        (
            raw("conformance.ping", 99, b"{\"seq\":1,\"body\":\"\"}"),
            DeadLetterReason::UnknownVersion,
        ),
    ];
    for (env, _) in &bad {
        transport.publish(env.clone()).await.expect("raw publish");
    }
    let good = bus
        .module(MODULE)
        .publish(Ping {
            seq: 1,
            body: "fine".into(),
        })
        .await
        .unwrap();
    tally
        .wait_for_all("the good event", &HashSet::from([good]))
        .await;
    poll_until("3 bad events dead-lettered", || async {
        sub.stats().dead_lettered >= 3
    })
    .await;
    assert_eq!(sub.stats().retried, 0, "bad input is never retried");
    assert_eq!(tally.distinct(), 1);
    if caps.dead_letter_store {
        let dead = sub.dead_letters().await.unwrap();
        assert_eq!(dead.len(), 3);
        for (env, reason) in &bad {
            let dl = dead
                .iter()
                .find(|d| d.envelope.id() == env.id())
                .expect("dead letter of a bad event");
            assert_eq!(dl.reason, *reason, "{}", dl.error);
            assert_eq!(dl.attempts, 1);
            assert!(!dl.error.is_empty());
        }
    }
    finish(h, &ns, &bus).await;
}

/// Case 10: an older version is upcast for a newer subscriber, on live
/// delivery, redelivery and dead-letter redrive.
pub async fn upcast_older_version(h: &dyn Harness) {
    let ns = namespace("upcast");
    let transport = h.transport(&ns).await;
    let caps = transport.capabilities();
    let bus = bus_on(transport.clone());
    let got: Arc<Mutex<HashMap<u64, SizedV2>>> = Arc::default();
    let tally = Tally::new();
    let (g, t) = (got.clone(), tally.clone());
    let sub = bus
        .module("reader")
        .subscribe(move |e: Received<SizedV2>, ctx: Context| {
            let (g, t) = (g.clone(), t.clone());
            async move {
                // n == 3: fails once (redelivery path); n == 4: rejected until
                // redriven (dead-letter path).
                if e.n == 3 && ctx.attempt() == 1 {
                    return Err(HandlerError::retry("once"));
                }
                if e.n == 4 && ctx.attempt() == 1 && !g.lock().unwrap().contains_key(&99) {
                    return Err(HandlerError::reject("until redrive"));
                }
                g.lock().unwrap().insert(e.n, e.clone());
                t.record(ctx.envelope().id());
                ok()
            }
        })
        .retry(fast_retry(3))
        .await
        .unwrap();
    let m = bus.module(MODULE);
    let mut ids = HashSet::new();
    ids.insert(m.publish(SizedV1 { n: 1 }).await.unwrap());
    ids.insert(m.publish(SizedV2 { n: 2, twice: 4 }).await.unwrap());
    ids.insert(m.publish(SizedV1 { n: 3 }).await.unwrap());
    let raw_v1 = raw("conformance.sized", 1, b"{\"n\":5}");
    transport.publish(raw_v1.clone()).await.unwrap();
    ids.insert(raw_v1.id());
    let four = m.publish(SizedV1 { n: 4 }).await.unwrap();
    tally.wait_for_all("upcast events", &ids).await;
    for n in [1, 3, 5] {
        assert_eq!(got.lock().unwrap()[&n], SizedV2 { n, twice: n * 2 });
    }
    assert_eq!(got.lock().unwrap()[&2], SizedV2 { n: 2, twice: 4 });
    if caps.dead_letter_store {
        poll_until("n=4 dead-lettered", || async {
            !sub.dead_letters().await.unwrap().is_empty()
        })
        .await;
        got.lock().unwrap().insert(99, SizedV2 { n: 99, twice: 0 });
        assert_eq!(sub.redrive(Some(&[four])).await.unwrap(), 1);
        tally
            .wait_for_all("redriven v1 event", &HashSet::from([four]))
            .await;
        assert_eq!(got.lock().unwrap()[&4], SizedV2 { n: 4, twice: 8 });
    }
    finish(h, &ns, &bus).await;
}

/// Case 11: a handler panic is caught, retried and counted.
pub async fn panic_caught(h: &dyn Harness) {
    let ns = namespace("panic");
    let transport = h.transport(&ns).await;
    let dup = transport.capabilities().duplicates;
    let bus = bus_on(transport);
    let tally = Tally::new();
    let t = tally.clone();
    let sub = bus
        .module("fragile")
        .subscribe(move |p: Received<Ping>, ctx: Context| {
            let t = t.clone();
            async move {
                if ctx.attempt() == 1 {
                    panic!("boom on {}", p.seq);
                }
                t.record(ctx.envelope().id());
                ok()
            }
        })
        .concurrency(2)
        .retry(fast_retry(3))
        .await
        .unwrap();
    let ids = publish_pings(&bus, 20, 1, 0).await;
    tally.wait_for_all("events after panics", &ids).await;
    tally.assert_exactly("events after panics", &ids, dup);
    let stats = sub.stats();
    assert!(stats.panicked >= 20, "{stats:?}");
    assert_eq!(stats.dead_lettered, 0);
    finish(h, &ns, &bus).await;
}

/// Case 12: closing and reopening subscribers repeatedly loses nothing.
pub async fn close_and_reopen(h: &dyn Harness) {
    let ns = namespace("reopen");
    let transport = h.transport(&ns).await;
    let dup = transport.capabilities().duplicates;
    let bus = bus_on(transport);
    let tally = Tally::new();
    let m = bus.module("restless");
    // Declare the group before publishing so it receives everything.
    let mut sub = Some(
        m.subscribe(record_into::<Ping>(&tally))
            .concurrency(2)
            .ordering(Ordering::Unordered)
            .await
            .unwrap(),
    );
    let publishing = {
        let bus = bus.clone();
        tokio::spawn(async move { publish_pings(&bus, 2000, 2, 0).await })
    };
    for round in 1..=10 {
        let target = round * 150;
        tally
            .wait_until("progress between reopenings", |seen| seen.len() >= target)
            .await;
        sub.take().unwrap().close().await.expect("close");
        sub = Some(
            m.subscribe(record_into::<Ping>(&tally))
                .concurrency(2)
                .ordering(Ordering::Unordered)
                .await
                .expect("reopen"),
        );
    }
    let ids = publishing.await.unwrap();
    tally.wait_for_all("events across reopenings", &ids).await;
    tally.assert_exactly("events across reopenings", &ids, dup);
    drop(sub);
    finish(h, &ns, &bus).await;
}

/// Collects the ids a fresh client of the same group still delivers.
async fn drain_rest(
    h: &dyn Harness,
    ns: &str,
    module: &str,
    tally: &Arc<Tally>,
    ids: &HashSet<Uuid>,
) {
    let bus = bus_on(h.transport(ns).await);
    let _sub = bus
        .module(module.to_owned())
        .subscribe(record_into::<Ping>(tally))
        .concurrency(4)
        .ordering(Ordering::Unordered)
        .await
        .unwrap();
    tally
        .wait_for_all("events redelivered after shutdown", ids)
        .await;
    let _ = shut_down(&bus, Duration::from_secs(10)).await;
}

/// Case 13: graceful shutdown under load: nothing acknowledged unhandled,
/// nothing lost, nothing dead-lettered by the cancellation.
pub async fn shutdown_under_load(h: &dyn Harness) {
    let ns = namespace("shutdown");
    let transport = h.transport(&ns).await;
    let caps = transport.capabilities();
    let bus = bus_on(transport);
    let tally = Tally::new();
    let t = tally.clone();
    let sub = bus
        .module("busy")
        .subscribe(move |_p: Received<Ping>, ctx: Context| {
            let t = t.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                // Recorded last: nothing can cancel the handler after this.
                t.record(ctx.envelope().id());
                ok()
            }
        })
        .concurrency(4)
        .ordering(Ordering::Unordered)
        .await
        .unwrap();
    let ids = publish_pings(&bus, 1500, 4, 0).await;
    tally
        .wait_until("some progress", |seen| seen.len() >= 100)
        .await;
    let report = shut_down(&bus, Duration::from_millis(100))
        .await
        .expect("shutdown");
    let handled = tally.snapshot();
    let unfinished: HashSet<Uuid> = report.unfinished.iter().map(|u| u.envelope.id()).collect();
    if !caps.persistent {
        let lost = ids
            .iter()
            .filter(|id| !handled.contains_key(id) && !unfinished.contains(id))
            .count();
        assert_eq!(
            lost, 0,
            "{lost} accepted events neither handled nor reported"
        );
        let both = unfinished
            .iter()
            .filter(|id| handled.contains_key(id))
            .count();
        assert_eq!(
            both, 0,
            "{both} events both handled and reported unfinished"
        );
        assert!(!report.unfinished.is_empty() || handled.len() == ids.len());
    } else {
        drain_rest(h, &ns, "busy", &tally, &ids).await;
        tally.assert_exactly("events after shutdown", &ids, true);
    }
    if caps.dead_letter_store {
        if let Ok(dead) = sub.dead_letters().await {
            assert!(
                dead.is_empty(),
                "shutdown dead-lettered {} events",
                dead.len()
            );
        }
    }
    assert_eq!(sub.stats().dead_lettered, 0);
    clean_up(h, &ns).await;
}

/// Case 14: the publisher side closes with publishes in flight: every
/// publish either errors or is delivered.
pub async fn publisher_closes_in_flight(h: &dyn Harness) {
    let ns = namespace("pubclose");
    let transport = h.transport(&ns).await;
    let caps = transport.capabilities();
    let bus = bus_on(transport);
    let tally = Tally::new();
    let _sub = bus
        .module("sink")
        .subscribe(record_into::<Ping>(&tally))
        .concurrency(4)
        .ordering(Ordering::Unordered)
        .await
        .unwrap();
    let accepted = Arc::new(Mutex::new(HashSet::new()));
    let errors = Arc::new(AtomicU32::new(0));
    let started = Arc::new(Notify::new());
    let mut tasks = Vec::new();
    for p in 0..6u64 {
        let (m, acc, errs, started) = (
            bus.module(MODULE),
            accepted.clone(),
            errors.clone(),
            started.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for seq in 0..5000u64 {
                match m
                    .publish(Ping {
                        seq: p * 10_000 + seq,
                        body: String::new(),
                    })
                    .await
                {
                    Ok(id) => {
                        acc.lock().unwrap().insert(id);
                        if seq == 50 {
                            started.notify_one();
                        }
                    }
                    Err(e) => {
                        assert!(
                            matches!(e.kind(), ErrorKind::Closed | ErrorKind::Connection),
                            "unexpected publish error: {e}"
                        );
                        errs.fetch_add(1, SeqCst);
                        return;
                    }
                }
            }
        }));
    }
    tokio::time::timeout(patience(), started.notified())
        .await
        .expect("publishers started");
    let report = shut_down(&bus, Duration::from_secs(20))
        .await
        .expect("shutdown");
    for t in tasks {
        tokio::time::timeout(patience(), t)
            .await
            .expect("publisher ends after shutdown")
            .expect("publisher task");
    }
    assert!(
        errors.load(SeqCst) > 0,
        "publishing after shutdown must fail"
    );
    let accepted = accepted.lock().unwrap().clone();
    let unfinished: HashSet<Uuid> = report.unfinished.iter().map(|u| u.envelope.id()).collect();
    if caps.persistent {
        drain_rest(h, &ns, "sink", &tally, &accepted).await;
    } else {
        let seen = tally.snapshot();
        let lost = accepted
            .iter()
            .filter(|id| !seen.contains_key(id) && !unfinished.contains(id))
            .count();
        assert_eq!(lost, 0, "{lost} accepted publishes were never delivered");
    }
    clean_up(h, &ns).await;
}

/// Case 15: the broker restarts in the middle of a run; all ids still
/// arrive in two groups ([`Harness::restart_events`] events). Publishes that
/// fail during the outage are retried by the test; every publish that
/// returned Ok must arrive.
pub async fn broker_restart(h: &dyn Harness, restart: BoxFuture<'static, ()>) {
    broker_restart_with(h, restart, h.restart_events()).await
}

/// Case 15 with `events` events. When the harness
/// [publishes across the restart](Harness::publishes_across_restart), a
/// third is published before the restart begins and the rest during and
/// after it; otherwise every event is published (and acknowledged) first
/// and the broker restarts while both groups consume them.
pub async fn broker_restart_with(h: &dyn Harness, restart: BoxFuture<'static, ()>, events: u64) {
    if !h.publishes_across_restart() {
        return broker_restart_while_consuming(h, restart, events).await;
    }
    let ns = namespace("restart");
    let transport = h.transport(&ns).await;
    let dup = transport.capabilities().duplicates;
    let bus = bus_on(transport);
    let (t1, t2) = (Tally::new(), Tally::new());
    let _s1 = bus
        .module("first")
        .subscribe(record_into::<Ping>(&t1))
        .concurrency(4)
        .ordering(Ordering::Unordered)
        .await
        .unwrap();
    let _s2 = bus
        .module("second")
        .subscribe(record_into::<Ping>(&t2))
        .concurrency(4)
        .ordering(Ordering::Unordered)
        .await
        .unwrap();
    let halfway = Arc::new(Notify::new());
    let publishing = {
        let (m, halfway) = (bus.module(MODULE), halfway.clone());
        tokio::spawn(async move {
            let mut ids = HashSet::new();
            for seq in 0..events {
                if seq == events / 3 {
                    halfway.notify_one();
                }
                let mut tries = 0;
                loop {
                    match m
                        .publish(Ping {
                            seq,
                            body: String::new(),
                        })
                        .await
                    {
                        Ok(id) => {
                            ids.insert(id);
                            break;
                        }
                        Err(e) if e.is_retryable() && tries < 600 => {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => panic!("publish {seq} failed for good: {e}"),
                    }
                }
            }
            ids
        })
    };
    halfway.notified().await;
    restart.await;
    let ids = publishing.await.expect("publisher");
    t1.wait_for_all("first group after restart", &ids).await;
    t2.wait_for_all("second group after restart", &ids).await;
    t1.assert_all_of("first group", &ids, dup);
    t2.assert_all_of("second group", &ids, dup);
    finish(h, &ns, &bus).await;
}

/// A handler that records ids after a little work, so a restart finds the
/// groups mid-stream.
fn record_slowly(
    tally: &Arc<Tally>,
) -> impl Fn(Received<Ping>, Context) -> BoxFuture<'static, Result<(), HandlerError>>
       + Send
       + Sync
       + 'static {
    let tally = tally.clone();
    move |_event, ctx| {
        let tally = tally.clone();
        Box::pin(async move {
            tokio::time::sleep(Duration::from_micros(500)).await;
            tally.record(ctx.envelope().id());
            ok()
        })
    }
}

/// Case 15 for a broker that no producer may send across a restart of:
/// `events` keyed events are published (with bounded concurrency) and
/// acknowledged first, then the broker restarts while two groups consume
/// them; every id arrives in both.
async fn broker_restart_while_consuming(
    h: &dyn Harness,
    restart: BoxFuture<'static, ()>,
    events: u64,
) {
    use futures_util::StreamExt;
    let ns = namespace("restart");
    let transport = h.transport(&ns).await;
    let dup = transport.capabilities().duplicates;
    let bus = bus_on(transport);
    let (first, second) = (Tally::new(), Tally::new());
    let mut subs = Vec::new();
    for (module, tally) in [("first", &first), ("second", &second)] {
        subs.push(
            bus.module(module)
                .subscribe(record_slowly(tally))
                .concurrency(4)
                .ordering(Ordering::Unordered)
                .await
                .unwrap(),
        );
    }
    let publisher = bus.module(MODULE);
    // Both groups joined and assigned before the bulk arrives.
    let warm_up = publisher
        .publish(Ping {
            seq: u64::MAX,
            body: String::new(),
        })
        .await
        .expect("publish the warm-up event");
    first
        .wait_for_all("first group joined", &HashSet::from([warm_up]))
        .await;
    second
        .wait_for_all("second group joined", &HashSet::from([warm_up]))
        .await;
    let mut ids: HashSet<Uuid> = futures_util::stream::iter(0..events)
        .map(|seq| {
            let publisher = publisher.clone();
            async move {
                let key = PublishOptions::new().key(format!("k{}", seq % 64));
                let ping = Ping {
                    seq,
                    body: String::new(),
                };
                publisher.publish_with(ping, key).await
            }
        })
        .buffer_unordered(32)
        .map(|r| r.expect("publish"))
        .collect()
        .await;
    assert_eq!(ids.len() as u64, events, "publish returned duplicate ids");
    ids.insert(warm_up);
    assert!(
        first.distinct() < ids.len(),
        "the restart must come mid-stream (the first group had handled everything)"
    );
    restart.await;
    first
        .wait_for_all("first group after the restart", &ids)
        .await;
    second
        .wait_for_all("second group after the restart", &ids)
        .await;
    first.assert_exactly("first group", &ids, dup);
    second.assert_exactly("second group", &ids, dup);
    drop(subs);
    finish(h, &ns, &bus).await;
}

/// Case 16: two consumers (two transport clients, as two processes would
/// have) in one group, keyed events whose first attempt fails: every event
/// is still handled (a retry never leaves its key stalled in one consumer
/// while the other takes the redelivery), and where the transport keeps
/// per-key order across consumers, in order.
pub async fn two_consumers_keyed_retries(h: &dyn Harness) {
    let ns = namespace("twokeyed");
    let first = h.transport(&ns).await;
    let caps = first.capabilities();
    let second = h.transport(&ns).await;
    let (bus_a, bus_b) = (bus_on(first), bus_on(second));
    const KEYS: u64 = 6;
    const N: u64 = 120;
    let log: Arc<Mutex<HashMap<String, Vec<u64>>>> = Arc::default();
    let failed_once: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let tally = Tally::new();
    let mut subs = Vec::new();
    for bus in [&bus_a, &bus_b] {
        let (l, f, t) = (log.clone(), failed_once.clone(), tally.clone());
        subs.push(
            bus.module("keyed")
                .subscribe(move |ping: Received<Ping>, ctx: Context| {
                    let (l, f, t) = (l.clone(), f.clone(), t.clone());
                    async move {
                        if f.lock().unwrap().insert(ping.seq) {
                            return Err(HandlerError::retry("every first attempt fails"));
                        }
                        let key = ctx.envelope().attributes().partition_key.clone().unwrap();
                        l.lock().unwrap().entry(key).or_default().push(ping.seq);
                        t.record(ctx.envelope().id());
                        ok()
                    }
                })
                .concurrency(4)
                .retry(fast_retry(10))
                .await
                .unwrap(),
        );
    }
    let ids = publish_pings(&bus_a, N, 1, KEYS).await;
    tally
        .wait_for_all("keyed events on two consumers", &ids)
        .await;
    tally.assert_exactly("keyed events on two consumers", &ids, caps.duplicates);
    if caps.per_key_order_across_consumers {
        for (key, seqs) in log.lock().unwrap().iter() {
            let mut firsts = Vec::new();
            for s in seqs {
                if !firsts.contains(s) {
                    firsts.push(*s);
                }
            }
            assert!(
                firsts.windows(2).all(|w| w[0] < w[1]),
                "key {key} handled out of order across consumers: {firsts:?}"
            );
        }
    }
    for sub in &subs {
        assert_eq!(sub.stats().dead_lettered, 0);
    }
    let _ = shut_down(&bus_b, Duration::from_secs(10)).await;
    finish(h, &ns, &bus_a).await;
}

/// Case 17: stopping never consumes attempts: events held (running, or
/// waiting behind their key) when a consumer shuts down at its deadline,
/// several times over, come back with their attempt unchanged and are never
/// dead-lettered for it (persistent transports).
pub async fn restarts_never_consume_attempts(h: &dyn Harness) {
    let ns = namespace("attempts");
    let transport = h.transport(&ns).await;
    let bus = bus_on(transport);
    const N: u64 = 5;
    // Declare the group, then publish: one key, so one runs and the rest wait.
    let started = Arc::new(Notify::new());
    let s = started.clone();
    let first = bus
        .module("patient")
        .subscribe(move |_p: Received<Ping>, _ctx: Context| {
            let s = s.clone();
            async move {
                s.notify_one();
                std::future::pending::<()>().await;
                ok()
            }
        })
        .retry(fast_retry(2))
        .await
        .unwrap();
    let ids = publish_pings(&bus, N, 1, 1).await;
    started.notified().await;
    assert_eq!(first.stats().dead_lettered, 0);
    let _ = shut_down(&bus, Duration::from_millis(50)).await;
    // Three more consumers that stop at their deadline while holding them.
    for _ in 0..3 {
        let bus = bus_on(h.transport(&ns).await);
        let started = Arc::new(Notify::new());
        let s = started.clone();
        let sub = bus
            .module("patient")
            .subscribe(move |_p: Received<Ping>, _ctx: Context| {
                let s = s.clone();
                async move {
                    s.notify_one();
                    std::future::pending::<()>().await;
                    ok()
                }
            })
            .retry(fast_retry(2))
            .await
            .unwrap();
        tokio::time::timeout(patience(), started.notified())
            .await
            .expect("a held event is delivered again after a stop");
        assert_eq!(
            sub.stats().dead_lettered,
            0,
            "a stop dead-lettered an event"
        );
        let _ = shut_down(&bus, Duration::from_millis(50)).await;
    }
    // The last consumer handles them all, each on its first attempt.
    let bus = bus_on(h.transport(&ns).await);
    let attempts: Arc<Mutex<Vec<u32>>> = Arc::default();
    let tally = Tally::new();
    let (a, t) = (attempts.clone(), tally.clone());
    let sub = bus
        .module("patient")
        .subscribe(move |_p: Received<Ping>, ctx: Context| {
            let (a, t) = (a.clone(), t.clone());
            async move {
                a.lock().unwrap().push(ctx.attempt());
                t.record(ctx.envelope().id());
                ok()
            }
        })
        .retry(fast_retry(2))
        .await
        .unwrap();
    tally
        .wait_for_all("held events after four stops", &ids)
        .await;
    let attempts = attempts.lock().unwrap().clone();
    assert!(
        attempts.iter().all(|&a| a == 1),
        "stops counted as attempts: {attempts:?}"
    );
    assert_eq!(sub.stats().dead_lettered, 0);
    if let Ok(dead) = sub.dead_letters().await {
        assert!(dead.is_empty(), "stops dead-lettered {} events", dead.len());
    }
    finish(h, &ns, &bus).await;
}

/// Case 18: where a new group starts. A group that subscribes after events
/// were published receives only the events published after it first
/// existed; a group declared (subscribed, then closed) before the publishes
/// receives them when it subscribes again.
pub async fn where_a_new_group_starts(h: &dyn Harness) {
    let ns = namespace("newgroup");
    let transport = h.transport(&ns).await;
    let dup = transport.capabilities().duplicates;
    let bus = bus_on(transport);
    let (witness, declared, late) = (Tally::new(), Tally::new(), Tally::new());
    let _witness = bus
        .module("witness")
        .subscribe(record_into::<Ping>(&witness))
        .ordering(Ordering::Unordered)
        .await
        .unwrap();
    bus.module("declared")
        .subscribe(record_into::<Ping>(&declared))
        .await
        .expect("declare the group")
        .close()
        .await
        .expect("close the declared group");
    // One key: every transport keeps these in one partition, stream or
    // queue, and a group handles them one at a time in that order.
    let before = publish_pings(&bus, 20, 1, 1).await;
    // Published and delivered: the events exist before the late group does.
    witness.wait_for_all("the witness group", &before).await;
    let _late = bus
        .module("late")
        .subscribe(record_into::<Ping>(&late))
        .await
        .expect("subscribe a new group");
    let _declared = bus
        .module("declared")
        .subscribe(record_into::<Ping>(&declared))
        .await
        .expect("subscribe the declared group again");
    let after = publish_pings(&bus, 20, 1, 1).await;
    let all: HashSet<Uuid> = before.union(&after).copied().collect();
    late.wait_for_all("the new group: events published after it existed", &after)
        .await;
    declared
        .wait_for_all(
            "the declared group: events published while it was closed, and after",
            &all,
        )
        .await;
    witness.wait_for_all("the witness group", &all).await;
    // Old events a transport wrongly hands the new group sit before the new
    // ones in their key's order, so they were handled by now.
    let seen = late.snapshot();
    let old = before.iter().filter(|id| seen.contains_key(id)).count();
    assert_eq!(
        old,
        0,
        "a group that first subscribed after {} events were published received {old} of them \
         (a group receives every event published after it first existed, and none before)",
        before.len()
    );
    late.assert_exactly("the new group", &after, dup);
    declared.assert_exactly("the declared group", &all, dup);
    finish(h, &ns, &bus).await;
}

/// Case 23: a deleted group is gone with everything it held: subscribed
/// again, it has no dead letters, the event that waited for it while it
/// was closed never arrives, and it receives what is published after.
pub async fn deleted_group_starts_afresh(h: &dyn Harness) {
    let ns = namespace("deletegroup");
    let bus = bus_on(h.transport(&ns).await);
    let refusing = bus
        .module("retired")
        .subscribe(|_p: Received<Ping>, _ctx: Context| async {
            Err::<(), _>(HandlerError::reject("refused"))
        })
        .await
        .unwrap();
    publish_pings(&bus, 1, 1, 1).await;
    poll_until("the refused event in the group's dead letters", || async {
        !refusing.dead_letters().await.unwrap().is_empty()
    })
    .await;
    refusing.close().await.unwrap();
    // Waits for the closed group (one key: it would be handled before the
    // event published after the delete).
    let waiting = publish_pings(&bus, 1, 1, 1).await;
    let group = GroupId::new("retired", "conformance.ping");
    h.delete_group(&ns, &group)
        .expect("the case applies only where the harness deletes groups")
        .await
        .expect("delete the group");
    let tally = Tally::new();
    let again = bus
        .module("retired")
        .subscribe(record_into::<Ping>(&tally))
        .await
        .expect("subscribe the deleted group again");
    let after = publish_pings(&bus, 1, 1, 1).await;
    tally
        .wait_for_all("the event published after the delete", &after)
        .await;
    let seen = tally.snapshot();
    assert!(
        waiting.iter().all(|id| !seen.contains_key(id)),
        "the event that waited for the group arrived after the group was deleted"
    );
    let dead = again.dead_letters().await.expect("list dead letters");
    assert!(
        dead.is_empty(),
        "dead letters survived the delete: {dead:?}"
    );
    finish(h, &ns, &bus).await;
}

/// Case 19: publishing an event that no group subscribes to is Ok, before
/// anything is declared and while other groups exist; the flow goes on.
pub async fn unrouted_publish_is_ok(h: &dyn Harness) {
    let ns = namespace("unrouted");
    let transport = h.transport(&ns).await;
    let bus = bus_on(transport.clone());
    let publisher = bus.module(MODULE);
    publisher
        .publish(Tick { seq: 0 })
        .await
        .expect("publishing an event no group subscribes to, nothing declared yet, is Ok");
    transport
        .publish(raw("conformance.tick", 1, b"{\"seq\":1}"))
        .await
        .expect("a raw publish of an event no group subscribes to is Ok");
    let tally = Tally::new();
    let _sub = bus
        .module("listener")
        .subscribe(record_into::<Ping>(&tally))
        .await
        .unwrap();
    for seq in 0..5 {
        publisher
            .publish(Pong { seq })
            .await
            .expect("publishing an event no group subscribes to, while other groups exist, is Ok");
    }
    let id = publisher
        .publish(Ping {
            seq: 1,
            body: "routed".into(),
        })
        .await
        .expect("a routed publish after unrouted ones");
    tally
        .wait_for_all("the routed event", &HashSet::from([id]))
        .await;
    tally.assert_exactly("the routed event", &HashSet::from([id]), true);
    finish(h, &ns, &bus).await;
}

/// Publishes a ping that encodes to exactly `limit` bytes (delivered
/// whole), then one byte more (refused with
/// [`ErrorKind::PayloadTooLarge`], not retryable), then a small one
/// (delivered: the flow goes on).
async fn payload_limit_holds(
    bus: &Bus,
    limit: usize,
    what: &str,
    tally: &Arc<Tally>,
    bodies: &Arc<Mutex<HashMap<Uuid, usize>>>,
) {
    use crate::codec::Codec as _;
    let encoded = |ping: &Ping| crate::codec::JsonCodec.encode(ping).expect("encode").len();
    let overhead = encoded(&Ping {
        seq: 7,
        body: String::new(),
    });
    assert!(limit > overhead, "{what}: a limit of {limit} bytes");
    let at = Ping {
        seq: 7,
        body: "x".repeat(limit - overhead),
    };
    assert_eq!(encoded(&at), limit);
    let publisher = bus.module(MODULE);
    let id = publisher
        .publish(at)
        .await
        .unwrap_or_else(|e| panic!("{what}: a payload of exactly {limit} bytes is accepted: {e}"));
    tally
        .wait_for_all(
            &format!("{what}: the payload at the limit"),
            &HashSet::from([id]),
        )
        .await;
    assert_eq!(
        bodies.lock().unwrap().get(&id).copied(),
        Some(limit - overhead),
        "{what}: the payload at the limit arrives whole"
    );
    let err = publisher
        .publish(Ping {
            seq: 8,
            body: "x".repeat(limit - overhead + 1),
        })
        .await
        .expect_err(&format!(
            "{what}: a payload one byte over {limit} is refused"
        ));
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge, "{what}: {err}");
    assert!(!err.is_retryable(), "{what}: too large is not retryable");
    let small = publisher
        .publish(Ping {
            seq: 9,
            body: "small".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("{what}: a small publish after a refused one: {e}"));
    tally
        .wait_for_all(
            &format!("{what}: the small event after the refused one"),
            &HashSet::from([small]),
        )
        .await;
}

/// Case 20: a payload at the size limit (the transport's
/// [`max_payload`](crate::transport::Capabilities::max_payload), the bus's
/// [`DEFAULT_MAX_PAYLOAD`](crate::DEFAULT_MAX_PAYLOAD), or a smaller
/// [`BusBuilder::max_payload`](crate::BusBuilder::max_payload)) is
/// delivered, one byte over is refused at publish with
/// [`ErrorKind::PayloadTooLarge`] (not retryable), and the flow continues.
/// A transport that shares values (never encodes them) is checked with the
/// bus in `verify_codec` mode, where its payloads are encoded.
pub async fn payload_size_limit(h: &dyn Harness) {
    let ns = namespace("payload");
    let transport = h.transport(&ns).await;
    let caps = transport.capabilities();
    let verify = caps.shares_values;
    let bus = Bus::builder()
        .transport_arc("under-test", transport.clone())
        .verify_codec(verify)
        .build()
        .expect("conformance bus");
    let tally = Tally::new();
    let bodies: Arc<Mutex<HashMap<Uuid, usize>>> = Arc::default();
    let (t, b) = (tally.clone(), bodies.clone());
    let _sub = bus
        .module("sizer")
        .subscribe(move |p: Received<Ping>, ctx: Context| {
            let (t, b) = (t.clone(), b.clone());
            async move {
                b.lock().unwrap().insert(ctx.envelope().id(), p.body.len());
                t.record(ctx.envelope().id());
                ok()
            }
        })
        .await
        .unwrap();
    let limit = caps.max_payload.map_or(crate::DEFAULT_MAX_PAYLOAD, |m| {
        m.min(crate::DEFAULT_MAX_PAYLOAD)
    });
    payload_limit_holds(&bus, limit, "the default limit", &tally, &bodies).await;
    // A smaller limit set on the bus (a second bus on the same transport).
    let small = Bus::builder()
        .transport_arc("under-test", transport.clone())
        .verify_codec(verify)
        .max_payload(4096)
        .build()
        .expect("a bus with a small limit");
    payload_limit_holds(
        &small,
        limit.min(4096),
        "BusBuilder::max_payload(4096)",
        &tally,
        &bodies,
    )
    .await;
    // The transport's own check, for an envelope that did not come through
    // a bus.
    if let Some(max) = caps.max_payload {
        let oversized = Envelope::from_bytes(
            Attributes::new(MODULE, "conformance.ping", 1),
            vec![b' '; max + 1],
        );
        let err = transport
            .publish(oversized)
            .await
            .expect_err("the transport refuses a payload over its max_payload");
        assert_eq!(err.kind(), ErrorKind::PayloadTooLarge, "{err}");
        assert!(!err.is_retryable());
    }
    finish(h, &ns, &bus).await;
}

/// The ids of a dead-letter listing; fails if one is listed twice.
fn listed_ids(what: &str, listed: &[crate::transport::DeadLetter]) -> HashSet<Uuid> {
    let ids: HashSet<Uuid> = listed.iter().map(|d| d.envelope.id()).collect();
    assert_eq!(
        ids.len(),
        listed.len(),
        "{what}: {} entries for {} distinct ids (an id listed twice)",
        listed.len(),
        ids.len()
    );
    ids
}

/// Fails unless `listed` is exactly `expected`, naming what is missing or
/// foreign.
fn assert_listing(what: &str, listed: &HashSet<Uuid>, expected: &HashSet<Uuid>) {
    let missing = expected.difference(listed).count();
    let foreign = listed.difference(expected).count();
    assert!(
        missing == 0 && foreign == 0,
        "{what}: {missing} of {} dead letters missing, {foreign} listed that should not be",
        expected.len()
    );
}

/// Case 21: dead letters listed by two listers at the same time, and while
/// a redrive runs: every listing is complete and consistent (no id missing
/// that stays in the store, none twice), the redrive moves exactly what it
/// was asked to, and nothing is lost or duplicated in the store.
pub async fn dead_letters_listed_concurrently(h: &dyn Harness) {
    const N: u64 = 30;
    let ns = namespace("dllisting");
    let transport = h.transport(&ns).await;
    let dup = transport.capabilities().duplicates;
    let bus = bus_on(transport);
    let healed = Arc::new(AtomicBool::new(false));
    let tally = Tally::new();
    let (t, healed2) = (tally.clone(), healed.clone());
    let sub = bus
        .module("lister")
        .subscribe(move |_p: Received<Ping>, ctx: Context| {
            let (t, healed) = (t.clone(), healed2.clone());
            async move {
                if !healed.load(SeqCst) {
                    return Err(HandlerError::reject("refused until healed"));
                }
                t.record(ctx.envelope().id());
                ok()
            }
        })
        .concurrency(4)
        .ordering(Ordering::Unordered)
        .await
        .unwrap();
    let ids = publish_pings(&bus, N, 1, 0).await;
    poll_until("every event in the dead-letter store", || async {
        sub.dead_letters()
            .await
            .is_ok_and(|d| d.len() >= N as usize)
    })
    .await;
    assert_listing(
        "the dead letters",
        &listed_ids("the dead letters", &sub.dead_letters().await.unwrap()),
        &ids,
    );
    // Two listers at once, several times over.
    for round in 1..=5 {
        let (a, b) = tokio::join!(sub.dead_letters(), sub.dead_letters());
        for (which, listed) in [("first", a), ("second", b)] {
            let what = format!("round {round}, the {which} of two concurrent listings");
            let listed = listed.unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_listing(&what, &listed_ids(&what, &listed), &ids);
        }
    }
    // Listings while half of them are redriven.
    let mut sorted: Vec<Uuid> = ids.iter().copied().collect();
    sorted.sort();
    let (moved, stay) = sorted.split_at(sorted.len() / 2);
    let (moved_set, stay_set): (HashSet<Uuid>, HashSet<Uuid>) = (
        moved.iter().copied().collect(),
        stay.iter().copied().collect(),
    );
    healed.store(true, SeqCst);
    let listing = async {
        let mut listings = Vec::new();
        for _ in 0..5 {
            listings.push(sub.dead_letters().await);
            tokio::task::yield_now().await;
        }
        listings
    };
    let (redriven, listings) = tokio::join!(sub.redrive(Some(moved)), listing);
    assert_eq!(
        redriven.expect("redrive half beside listings"),
        moved.len(),
        "a redrive that ran beside listings moved the wrong number of dead letters"
    );
    for (i, listed) in listings.into_iter().enumerate() {
        let what = format!("listing {} during a redrive", i + 1);
        let listed = listed_ids(&what, &listed.unwrap_or_else(|e| panic!("{what}: {e}")));
        let lost = stay_set.difference(&listed).count();
        let foreign = listed.difference(&ids).count();
        assert_eq!(
            lost, 0,
            "{what}: {lost} dead letters that the redrive leaves in place were not listed"
        );
        assert_eq!(foreign, 0, "{what}: {foreign} ids never dead-lettered");
    }
    let rest = listed_ids("after the redrive", &sub.dead_letters().await.unwrap());
    assert_listing("the dead letters after redriving half", &rest, &stay_set);
    tally.wait_for_all("the redriven half", &moved_set).await;
    // The rest, redriven while another lister reads.
    let (redriven, listed) = tokio::join!(sub.redrive(None), sub.dead_letters());
    assert_eq!(redriven.expect("redrive the rest"), stay.len());
    let listed = listed_ids("a listing beside the last redrive", &listed.unwrap());
    let foreign = listed.difference(&stay_set).count();
    assert_eq!(
        foreign, 0,
        "a listing beside the last redrive: {foreign} foreign ids"
    );
    tally.wait_for_all("every redriven event", &ids).await;
    tally.assert_exactly("every redriven event", &ids, dup);
    assert!(
        sub.dead_letters().await.unwrap().is_empty(),
        "dead letters left after redriving them all"
    );
    if !dup {
        assert_eq!(
            sub.stats().dead_lettered,
            N,
            "each event dead-lettered once"
        );
    }
    finish(h, &ns, &bus).await;
}

/// Case 22 (transports with inline dispatch): a shutdown while an inline
/// handler runs waits for it and reports `drained` only once it ended; a
/// shutdown whose deadline passes first reports the event unfinished, not
/// drained.
pub async fn inline_shutdown_waits_for_the_handler(h: &dyn Harness) {
    // The deadline is long: the handler ends before it.
    let ns = namespace("inline");
    let bus = bus_on(h.transport(&ns).await);
    let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let done = Arc::new(AtomicBool::new(false));
    let (s, r, d) = (started.clone(), release.clone(), done.clone());
    let _sub = bus
        .module("inline")
        .subscribe(move |_p: Received<Ping>, _ctx: Context| {
            let (s, r, d) = (s.clone(), r.clone(), d.clone());
            async move {
                s.notify_one();
                r.notified().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                d.store(true, SeqCst);
                ok()
            }
        })
        .dispatch(crate::Dispatch::Inline)
        .await
        .expect("an inline subscription");
    let publishing = {
        let m = bus.module(MODULE);
        tokio::spawn(async move {
            m.publish(Ping {
                seq: 1,
                body: String::new(),
            })
            .await
        })
    };
    tokio::time::timeout(patience(), started.notified())
        .await
        .expect("the inline handler started");
    let shutting = {
        let bus = bus.clone();
        tokio::spawn(async move { bus.shutdown(Duration::from_secs(30)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !shutting.is_finished(),
        "shutdown returned while an inline handler was still running"
    );
    release.notify_one();
    let report = tokio::time::timeout(patience(), shutting)
        .await
        .expect("shutdown ends once the inline handler did")
        .expect("shutdown task")
        .expect("shutdown");
    assert!(
        done.load(SeqCst),
        "shutdown returned before the inline handler ended"
    );
    assert!(
        report.drained,
        "the inline handler ended before the deadline: drained"
    );
    assert!(report.unfinished.is_empty(), "{:?}", report.unfinished);
    tokio::time::timeout(patience(), publishing)
        .await
        .expect("the inline publish returns")
        .expect("publish task")
        .expect("the inline publish whose handler ran is Ok");
    clean_up(h, &ns).await;

    // The deadline passes while the handler still runs.
    let ns = namespace("inlinecut");
    let bus = bus_on(h.transport(&ns).await);
    let started = Arc::new(Notify::new());
    let s = started.clone();
    let _sub = bus
        .module("inline")
        .subscribe(move |_p: Received<Ping>, _ctx: Context| {
            let s = s.clone();
            async move {
                s.notify_one();
                std::future::pending::<()>().await;
                ok()
            }
        })
        .dispatch(crate::Dispatch::Inline)
        .await
        .expect("an inline subscription");
    let publishing = {
        let m = bus.module(MODULE);
        tokio::spawn(async move {
            m.publish(Ping {
                seq: 2,
                body: String::new(),
            })
            .await
        })
    };
    tokio::time::timeout(patience(), started.notified())
        .await
        .expect("the inline handler started");
    let report = tokio::time::timeout(patience(), bus.shutdown(Duration::from_millis(200)))
        .await
        .expect("shutdown ends at its deadline")
        .expect("shutdown");
    assert!(
        !report.drained,
        "shutdown reported drained while an inline handler was still running"
    );
    let published = tokio::time::timeout(patience(), publishing)
        .await
        .expect("an inline publish cut off by the deadline returns")
        .expect("publish task");
    if let Ok(id) = published {
        assert!(
            report.unfinished.iter().any(|u| u.envelope.id() == id),
            "the event whose inline run the deadline cut off is not in the report's unfinished"
        );
    }
    clean_up(h, &ns).await;
}

/// Whether a case applies to a transport: `Err` says why not.
pub type Applies = Result<(), &'static str>;

/// A case's body, as the [`Suite`] runs it.
pub type CaseFn = for<'a> fn(&'a dyn Harness) -> LocalBoxFuture<'a, ()>;

/// One case of the suite: its test name, when it applies, its body.
#[derive(Clone, Copy)]
pub struct Case {
    /// The test's name (`c01_envelope_intact`).
    pub name: &'static str,
    /// Whether the case applies, from the transport's capabilities (and,
    /// for the broker restart, whether the harness can restart its broker).
    /// The one place that decides; a body never skips itself.
    pub applies: fn(&Capabilities, &dyn Harness) -> Applies,
    /// The case.
    pub run: CaseFn,
    /// Runs alone, after every other case (it stops the broker).
    pub alone: bool,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Case")
            .field("name", &self.name)
            .field("alone", &self.alone)
            .finish_non_exhaustive()
    }
}

fn needs(has: bool, why: &'static str) -> Applies {
    if has {
        Ok(())
    } else {
        Err(why)
    }
}

fn always(_: &Capabilities, _: &dyn Harness) -> Applies {
    Ok(())
}

fn restart_applies(caps: &Capabilities, h: &dyn Harness) -> Applies {
    needs(
        caps.persistent,
        "not persistent: nothing is kept across a restart to check",
    )?;
    needs(h.has_server(), "embedded: no server to restart")?;
    // With brokers required, a persistent transport whose harness cannot
    // restart its broker runs the case, and fails: it never passes by
    // skipping.
    needs(
        h.restart_broker().is_some() || brokers_required(),
        "the harness cannot restart this broker (not the local one); \
         SEAMBUS_REQUIRE_BROKERS=1 makes this a failure",
    )
}

async fn broker_restart_case(h: &dyn Harness) {
    let restart = h.restart_broker().expect(
        "a persistent transport's harness must restart its broker when \
         SEAMBUS_REQUIRE_BROKERS=1 (Harness::restart_broker returned None)",
    );
    broker_restart(h, restart).await
}

macro_rules! case {
    ($name:literal, $body:ident, $applies:expr) => {
        case!($name, $body, $applies, false)
    };
    ($name:literal, $body:ident, $applies:expr, $alone:literal) => {
        Case {
            name: $name,
            applies: $applies,
            run: |h| Box::pin($body(h)),
            alone: $alone,
        }
    };
}

/// Every case, in the order [`run_all`] and the [`Suite`] run them (the
/// broker restart last), each with the one rule that says when it applies.
pub fn cases() -> Vec<Case> {
    vec![
        case!("c01_envelope_intact", envelope_intact, always),
        case!(
            "c02_many_publishers_and_subscribers",
            many_publishers_and_subscribers,
            always
        ),
        case!("c03_topics_isolated", topics_isolated, always),
        case!(
            "c04_groups_fan_out_and_compete",
            groups_fan_out_and_compete,
            |c, _| needs(c.consumer_groups, "no consumer groups")
        ),
        case!("c05_per_key_order", per_key_order, |c, _| needs(
            c.per_key_order,
            "no per-key order"
        )),
        case!(
            "c06_transient_failure_redelivered",
            transient_failure_redelivered,
            always
        ),
        case!(
            "c07_many_failures_then_all_consumed",
            many_failures_then_all_consumed,
            always
        ),
        case!(
            "c08_dead_letter_after_max_attempts",
            dead_letter_after_max_attempts,
            always
        ),
        case!(
            "c09_undecodable_dead_lettered",
            undecodable_dead_lettered,
            always
        ),
        case!("c10_upcast_older_version", upcast_older_version, always),
        case!("c11_panic_caught", panic_caught, always),
        case!("c12_close_and_reopen", close_and_reopen, always),
        case!("c13_shutdown_under_load", shutdown_under_load, always),
        case!(
            "c14_publisher_closes_in_flight",
            publisher_closes_in_flight,
            always
        ),
        case!(
            "c16_two_consumers_keyed_retries",
            two_consumers_keyed_retries,
            |c, _| needs(c.consumer_groups, "no consumer groups")
        ),
        case!(
            "c17_restarts_never_consume_attempts",
            restarts_never_consume_attempts,
            |c, _| needs(
                c.persistent,
                "not persistent: shutdown hands events back in its report"
            )
        ),
        case!(
            "c18_where_a_new_group_starts",
            where_a_new_group_starts,
            |c, _| needs(
                !c.replay,
                "a new group replays the events the transport keeps (its configuration says so)"
            )
        ),
        case!("c19_unrouted_publish_is_ok", unrouted_publish_is_ok, always),
        case!("c20_payload_size_limit", payload_size_limit, always),
        case!(
            "c23_deleted_group_starts_afresh",
            deleted_group_starts_afresh,
            |c, h| {
                needs(
                    h.delete_group("probe", &GroupId::new("probe", "probe"))
                        .is_some(),
                    "the harness does not delete groups of this broker (Harness::delete_group)",
                )?;
                needs(c.dead_letter_store, "no dead-letter store")?;
                needs(
                    !c.replay,
                    "a new group replays the events the transport keeps",
                )
            }
        ),
        case!(
            "c21_dead_letters_listed_concurrently",
            dead_letters_listed_concurrently,
            |c, _| needs(c.dead_letter_store, "no dead-letter store")
        ),
        case!(
            "c22_inline_shutdown_waits_for_the_handler",
            inline_shutdown_waits_for_the_handler,
            |c, _| needs(c.inline_dispatch, "no inline dispatch")
        ),
        case!(
            "c15_broker_restart",
            broker_restart_case,
            restart_applies,
            true
        ),
    ]
}

/// Runs every case that applies to the harness's transport, one after
/// another (the broker restart last); cases that do not apply are listed
/// on stderr. The [`Suite`] is the usual entry point: it reports each case
/// as its own test.
pub async fn run_all(h: &dyn Harness) {
    if !broker_ready(h) {
        return;
    }
    let caps = probe(h).await;
    for case in cases() {
        match (case.applies)(&caps, h) {
            Ok(()) => (case.run)(h).await,
            Err(why) => eprintln!("conformance: {} does not apply: {why}", case.name),
        }
    }
}

/// The capabilities of the harness's transport (one client, made and shut
/// down again).
async fn probe(h: &dyn Harness) -> Capabilities {
    let ns = namespace("capabilities");
    let transport = h.transport(&ns).await;
    let caps = transport.capabilities();
    let _ = tokio::time::timeout(patience(), transport.shutdown(Duration::from_secs(5))).await;
    clean_up(h, &ns).await;
    caps
}

/// The conformance suite as a test binary: one test per case, a case that
/// does not apply reported *ignored* with the reason, so cargo's
/// `test result:` line counts it.
///
/// Built for a `harness = false` test target (see
/// [`conformance_tests!`](crate::conformance_tests)):
/// it reads the usual test arguments (filters, `--list`,
/// `--test-threads`, ...). One transport is created up front to read its
/// capabilities. When the broker is unavailable every case is reported
/// ignored with the reason, or failed when `SEAMBUS_REQUIRE_BROKERS=1`.
/// Cases run on parallel threads (one at a time with [`Suite::serial`]);
/// the broker restart runs alone, after all the others.
pub struct Suite {
    harness: Arc<dyn Harness>,
    serial: bool,
    extra: Vec<(String, CaseFn)>,
}

impl fmt::Debug for Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Suite")
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

/// A case's turn: shared with the other cases, or alone.
enum Turn<'a> {
    Shared(#[allow(dead_code)] std::sync::RwLockReadGuard<'a, ()>),
    Alone(#[allow(dead_code)] std::sync::RwLockWriteGuard<'a, ()>),
}

/// What the up-front look at the harness found.
enum Probed {
    Ready(Capabilities),
    /// The broker does not answer (the harness says so).
    Unavailable(String),
    /// It answers, but no transport could be made.
    Broken(String),
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}

impl Suite {
    /// The suite for `harness`.
    pub fn new(harness: impl Harness + 'static) -> Self {
        Self {
            harness: Arc::new(harness),
            serial: false,
            extra: Vec::new(),
        }
    }

    /// One case at a time (for brokers that cannot take parallel clients).
    pub fn serial(mut self) -> Self {
        self.serial = true;
        self
    }

    /// Adds a test of the crate's own, run like a case that applies (after
    /// the cases, before the broker restart).
    pub fn with_test(mut self, name: impl Into<String>, run: CaseFn) -> Self {
        self.extra.push((name.into(), run));
        self
    }

    fn probe(&self) -> Probed {
        if let Some(why) = self.harness.unavailable() {
            return Probed::Unavailable(why);
        }
        let h = self.harness.clone();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| block_on(probe(&*h)))) {
            Ok(caps) => Probed::Ready(caps),
            Err(payload) => Probed::Broken(panic_text(&*payload)),
        }
    }

    /// The tests, in order: every case (the restart last), ignored with the
    /// reason where it does not apply.
    pub fn trials(&self) -> Vec<libtest_mimic::Trial> {
        self.trials_for(&self.probe())
    }

    fn trials_for(&self, probed: &Probed) -> Vec<libtest_mimic::Trial> {
        use libtest_mimic::{Completion, Failed, Trial};
        // Ordinary cases share the lock; a case that runs alone takes it
        // for itself (and comes last, so nothing starts after it).
        let lock = Arc::new(std::sync::RwLock::new(()));
        let mut bodies: Vec<(String, Applies, CaseFn, bool)> = Vec::new();
        let cases = cases();
        let (alone, others): (Vec<Case>, Vec<Case>) = cases.into_iter().partition(|c| c.alone);
        let applies = |case: &Case| match probed {
            Probed::Ready(caps) => (case.applies)(caps, &*self.harness),
            _ => Ok(()),
        };
        for case in &others {
            bodies.push((case.name.to_owned(), applies(case), case.run, false));
        }
        for (name, run) in &self.extra {
            bodies.push((name.clone(), Ok(()), *run, false));
        }
        for case in &alone {
            bodies.push((case.name.to_owned(), applies(case), case.run, true));
        }
        bodies
            .into_iter()
            .map(|(name, applies, run, alone)| match (probed, applies) {
                (Probed::Unavailable(why), _) if brokers_required() => {
                    let why = format!(
                        "broker required (SEAMBUS_REQUIRE_BROKERS=1) but unavailable: {why}"
                    );
                    Trial::test(name, move || Err(Failed::from(why)))
                }
                (Probed::Unavailable(why), _) => {
                    let why = format!("broker unavailable: {why}");
                    Trial::ignorable_test(name, move || Ok(Completion::ignored_with(why)))
                }
                (Probed::Broken(why), _) => {
                    let why = format!("no transport could be made: {why}");
                    Trial::test(name, move || Err(Failed::from(why)))
                }
                (Probed::Ready(_), Err(why)) => {
                    Trial::ignorable_test(name, move || Ok(Completion::ignored_with(why)))
                }
                (Probed::Ready(_), Ok(())) => {
                    let (h, lock) = (self.harness.clone(), lock.clone());
                    Trial::test(name.clone(), move || {
                        let _turn = if alone {
                            Turn::Alone(lock.write().unwrap_or_else(|e| e.into_inner()))
                        } else {
                            Turn::Shared(lock.read().unwrap_or_else(|e| e.into_inner()))
                        };
                        let thread = capture::thread_name(&name);
                        let ran = std::thread::Builder::new()
                            .name(thread.clone())
                            .spawn(move || block_on(run(&*h)))
                            .expect("a thread for the case")
                            .join();
                        let output = capture::take(&thread);
                        ran.map_err(|payload| {
                            let mut text = panic_text(&*payload);
                            if !output.is_empty() {
                                text.push_str("\n\n---- output ----\n");
                                text.push_str(&output);
                            }
                            Failed::from(text)
                        })
                    })
                }
            })
            .collect()
    }

    /// Runs the suite with the process's test arguments and returns the
    /// exit code (what `main` returns).
    pub fn run(self) -> ExitCode {
        let mut args = libtest_mimic::Arguments::from_args();
        if self.serial {
            args.test_threads = Some(1);
        }
        capture::install(!args.nocapture);
        let probed = if args.list {
            // Names only: no broker needed.
            Probed::Unavailable(String::new())
        } else {
            let probed = self.probe();
            match &probed {
                Probed::Unavailable(why) if !brokers_required() => eprintln!(
                    "SKIPPED: broker unavailable: {why}; every conformance case is ignored \
                     (set SEAMBUS_REQUIRE_BROKERS=1 to fail instead)"
                ),
                _ => {}
            }
            probed
        };
        libtest_mimic::run(&args, self.trials_for(&probed)).exit_code()
    }
}

/// Generates the `main` of a conformance test binary (a `harness = false`
/// test target) for a [`Harness`] value: one test per case, each case that
/// does not apply reported ignored with the reason (see [`Suite`]).
///
/// ```toml
/// # Cargo.toml
/// [[test]]
/// name = "conformance"
/// harness = false
/// ```
///
/// ```ignore
/// // tests/conformance.rs
/// seambus::conformance_tests!(MyHarness::new());
/// // one case at a time (for brokers that cannot take parallel clients):
/// seambus::conformance_tests!(serial: MyHarness::new());
/// ```
#[macro_export]
macro_rules! conformance_tests {
    (serial: $harness:expr) => {
        fn main() -> ::std::process::ExitCode {
            $crate::conformance::Suite::new($harness).serial().run()
        }
    };
    ($harness:expr) => {
        fn main() -> ::std::process::ExitCode {
            $crate::conformance::Suite::new($harness).run()
        }
    };
}
