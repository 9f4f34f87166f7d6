//! The transport conformance suite (feature `conformance`).
//!
//! **Not semver-stable**: cases are added and tightened as the design
//! evolves. It exists for transport crates' own tests.
//!
//! Every transport runs the same cases against its real broker. Each case
//! uses a fresh namespace, counts event ids and checks "none missing,
//! duplicates only where the transport admits them"
//! ([`Capabilities::duplicates`](crate::transport::Capabilities::duplicates)). A case that needs a capability the
//! transport does not report prints why and returns.
//!
//! A transport crate provides a [`Harness`] and generates one test per case:
//!
//! ```ignore
//! // transports/nats/tests/conformance.rs
//! struct Nats;
//! #[async_trait::async_trait]
//! impl seambus::conformance::Harness for Nats { /* ... */ }
//! seambus::conformance_tests!(Nats);
//! ```

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::transport::{DeadLetterReason, Ordering, Transport};
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

    /// A closure that stops and starts the broker, for case 15. `None` (the
    /// default) skips that case.
    fn restart_broker(&self) -> Option<BoxFuture<'static, ()>> {
        None
    }

    /// Why the broker cannot be reached, if it cannot (checked before each
    /// case). The case is then skipped with a loud message, or fails when
    /// `SEAMBUS_REQUIRE_BROKERS=1`.
    fn unavailable(&self) -> Option<String> {
        None
    }
}

/// Whether a case may run: false (with a message) when the harness's broker
/// is unavailable; panics instead when `SEAMBUS_REQUIRE_BROKERS=1`.
pub fn broker_ready(h: &dyn Harness) -> bool {
    match h.unavailable() {
        None => true,
        Some(why) if std::env::var("SEAMBUS_REQUIRE_BROKERS").is_ok_and(|v| v == "1") => {
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

/// Runs a case's future on a fresh two-worker runtime (what the generated
/// tests use).
pub fn block_on<F: Future<Output = ()>>(future: F) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SEAMBUS_LOG")
                .unwrap_or_else(|_| "error".into()),
        )
        .with_test_writer()
        .try_init();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(future)
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

fn skip(case: &str, why: &str) {
    eprintln!("conformance: skipping {case}: {why}");
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

async fn finish(h: &dyn Harness, ns: &str, bus: &Bus) {
    let _ = bus.shutdown(Duration::from_secs(10)).await;
    h.cleanup(ns).await;
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
    if !caps.consumer_groups {
        return skip("groups_fan_out_and_compete", "no consumer groups");
    }
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
    let _ = bus_b.shutdown(Duration::from_secs(10)).await;
    finish(h, &ns, &bus_a).await;
}

/// Case 5: per-key order holds under concurrency, across retries.
pub async fn per_key_order(h: &dyn Harness) {
    let ns = namespace("order");
    let transport = h.transport(&ns).await;
    if !transport.capabilities().per_key_order {
        return skip("per_key_order", "no per-key order");
    }
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
    if !caps.dead_letter_store {
        return skip(
            "dead_letter_after_max_attempts (listing)",
            "no dead-letter store",
        );
    }
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
    let _ = bus.shutdown(Duration::from_secs(10)).await;
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
    let report = bus
        .shutdown(Duration::from_millis(100))
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
    h.cleanup(&ns).await;
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
    let report = bus
        .shutdown(Duration::from_secs(20))
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
    h.cleanup(&ns).await;
}

/// Case 15: the broker restarts in the middle of a run; all ids still
/// arrive in two groups. Publishes that fail during the outage are retried
/// by the test; every publish that returned Ok must arrive.
pub async fn broker_restart(h: &dyn Harness, restart: BoxFuture<'static, ()>) {
    broker_restart_with(h, restart, 3000).await
}

/// Case 15 with `events` events (a third before the restart begins).
pub async fn broker_restart_with(h: &dyn Harness, restart: BoxFuture<'static, ()>, events: u64) {
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

/// Case 16: two consumers (two transport clients, as two processes would
/// have) in one group, keyed events whose first attempt fails: every event
/// is still handled (a retry never leaves its key stalled in one consumer
/// while the other takes the redelivery), and where the transport keeps
/// per-key order across consumers, in order.
pub async fn two_consumers_keyed_retries(h: &dyn Harness) {
    let ns = namespace("twokeyed");
    let first = h.transport(&ns).await;
    let caps = first.capabilities();
    if !caps.consumer_groups {
        return skip("two_consumers_keyed_retries", "no consumer groups");
    }
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
    let _ = bus_b.shutdown(Duration::from_secs(10)).await;
    finish(h, &ns, &bus_a).await;
}

/// Case 17: stopping never consumes attempts: events held (running, or
/// waiting behind their key) when a consumer shuts down at its deadline,
/// several times over, come back with their attempt unchanged and are never
/// dead-lettered for it (persistent transports).
pub async fn restarts_never_consume_attempts(h: &dyn Harness) {
    let ns = namespace("attempts");
    let transport = h.transport(&ns).await;
    if !transport.capabilities().persistent {
        return skip(
            "restarts_never_consume_attempts",
            "not persistent: shutdown hands events back in its report",
        );
    }
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
    let _ = bus.shutdown(Duration::from_millis(50)).await;
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
        let _ = bus.shutdown(Duration::from_millis(50)).await;
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

/// Runs every case the transport's capabilities allow, in order.
pub async fn run_all(h: &dyn Harness) {
    if !broker_ready(h) {
        return;
    }
    envelope_intact(h).await;
    many_publishers_and_subscribers(h).await;
    topics_isolated(h).await;
    groups_fan_out_and_compete(h).await;
    per_key_order(h).await;
    transient_failure_redelivered(h).await;
    many_failures_then_all_consumed(h).await;
    dead_letter_after_max_attempts(h).await;
    undecodable_dead_lettered(h).await;
    upcast_older_version(h).await;
    panic_caught(h).await;
    close_and_reopen(h).await;
    shutdown_under_load(h).await;
    publisher_closes_in_flight(h).await;
    two_consumers_keyed_retries(h).await;
    restarts_never_consume_attempts(h).await;
    match h.restart_broker() {
        Some(restart) => broker_restart(h, restart).await,
        None => skip("broker_restart", "the harness cannot restart its broker"),
    }
}

/// Generates one `#[test]` per conformance case for a [`Harness`] value.
///
/// ```ignore
/// seambus::conformance_tests!(MyHarness::new());
/// // one case at a time (for brokers that cannot take parallel clients):
/// seambus::conformance_tests!(serial: MyHarness::new());
/// ```
#[macro_export]
macro_rules! conformance_tests {
    (serial: $harness:expr) => {
        static SERIAL: ::std::sync::Mutex<()> = ::std::sync::Mutex::new(());
        // The guard lives for the whole test: one case at a time.
        $crate::conformance_tests!(@all {
            ::std::option::Option::Some(SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
        } $harness);
    };
    ($harness:expr) => {
        $crate::conformance_tests!(@all { ::std::option::Option::<()>::None } $harness);
    };
    (@all $guard:block $harness:expr) => {
        $crate::conformance_tests!(@cases $guard $harness;
            c01_envelope_intact => envelope_intact,
            c02_many_publishers_and_subscribers => many_publishers_and_subscribers,
            c03_topics_isolated => topics_isolated,
            c04_groups_fan_out_and_compete => groups_fan_out_and_compete,
            c05_per_key_order => per_key_order,
            c06_transient_failure_redelivered => transient_failure_redelivered,
            c07_many_failures_then_all_consumed => many_failures_then_all_consumed,
            c08_dead_letter_after_max_attempts => dead_letter_after_max_attempts,
            c09_undecodable_dead_lettered => undecodable_dead_lettered,
            c10_upcast_older_version => upcast_older_version,
            c11_panic_caught => panic_caught,
            c12_close_and_reopen => close_and_reopen,
            c13_shutdown_under_load => shutdown_under_load,
            c14_publisher_closes_in_flight => publisher_closes_in_flight,
            c16_two_consumers_keyed_retries => two_consumers_keyed_retries,
            c17_restarts_never_consume_attempts => restarts_never_consume_attempts,
        );
        #[test]
        fn c15_broker_restart() {
            let _guard = $guard;
            $crate::conformance::block_on(async {
                let harness = $harness;
                if !$crate::conformance::broker_ready(&harness) {
                    return;
                }
                match $crate::conformance::Harness::restart_broker(&harness) {
                    Some(restart) => $crate::conformance::broker_restart(&harness, restart).await,
                    None => eprintln!("conformance: skipping broker_restart: the harness cannot restart its broker"),
                }
            });
        }
    };
    (@cases $guard:block $harness:expr; $($test:ident => $case:ident,)*) => {
        $(
            #[test]
            fn $test() {
                let _guard = $guard;
                $crate::conformance::block_on(async {
                    let harness = $harness;
                    if $crate::conformance::broker_ready(&harness) {
                        $crate::conformance::$case(&harness).await;
                    }
                });
            }
        )*
    };
}
