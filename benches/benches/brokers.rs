//! Each Seambus broker adapter beside the raw client on the same local
//! broker, with the same 512-byte JSON payload and the same guarantees.
//!
//! One criterion group per broker (`broker/nats`, `broker/rabbitmq`,
//! `broker/kafka`, and the SQL transport's `broker/sql_postgres` and
//! `broker/sql_sqlite`, see `mod sql`), four members each (five for
//! NATS, six for SQL with the outbox), all counted in events
//! (`Throughput::Elements`), so the report reads as events/s and
//! `seambus_x / raw_x` is the adapter's cost:
//!
//! - `seambus_publish` / `raw_publish`: N publishes, one after the other,
//!   each awaiting the broker's confirmation before the next (what
//!   `Module::publish(..).await` does with these transports). Nothing
//!   consumes; the stream or queue is purged between iterations, outside the
//!   measured time (Kafka topics just grow).
//! - `raw_publish_ce_headers` (NATS only): `raw_publish` plus the header set
//!   Seambus puts on every message (`ce-specversion`, `ce-id`, `ce-source`,
//!   `ce-type`, `ce-time`, `content-type`, `ce-dataversion`) and a UUID
//!   `Nats-Msg-Id`, so `seambus_publish / raw_publish_ce_headers` is the
//!   adapter's cost apart from the headers on the wire.
//! - `seambus_roundtrip` / `raw_roundtrip`: the same N confirmed publishes
//!   while one consumer, already subscribed, receives, decodes and
//!   acknowledges them one by one; the round ends when all N are handled.
//!
//! The settings, read from the transports' code and mirrored on the raw
//! side:
//!
//! - **NATS JetStream** (`SEAMBUS_TEST_NATS_URL`, default
//!   `nats://127.0.0.1:4222`). Publish: JetStream publish with a
//!   `Nats-Msg-Id` (deduplication), awaiting the stream's ack per message.
//!   Stream: file storage, 1 replica, limits retention, 2 min duplicate
//!   window, subjects `<prefix>.>`. Consume: a durable pull consumer,
//!   explicit acks, `max_ack_pending` 256, pulled in batches of 256
//!   (heartbeat 5 s, expires 30 s), each message acked after its handler.
//! - **RabbitMQ** (`SEAMBUS_TEST_AMQP_URL`, default
//!   `amqp://guest:guest@127.0.0.1:5672/%2f`). Publish: `basic.publish`
//!   with `mandatory` and persistent delivery mode on a confirm-mode
//!   channel, awaiting each confirm, to a durable topic exchange bound to a
//!   durable **quorum** queue. Consume: a second channel on the same
//!   connection, prefetch 256, manual `basic.ack` per message.
//! - **Kafka** (`SEAMBUS_TEST_KAFKA_BROKERS`, default `127.0.0.1:9092`;
//!   locally tansu, `scripts/kafka-broker start`). Publish: idempotent
//!   producer, `acks=all`, `linger.ms=5`, `message.timeout.ms=30000`,
//!   awaiting each delivery report; topics of 3 partitions, no key.
//!   Consume: a consumer group with `enable.auto.offset.store=false`, the
//!   offset stored after each handled record, auto-commit every 1 s,
//!   `auto.offset.reset=earliest`. tansu 0.6.0 cannot take several
//!   idempotent producers at once, so only one producer exists at a time.
//!
//! The raw side serializes the same event with `serde_json` per publish and
//! decodes it per delivery, as an application using the client would; what
//! it does not carry (but `raw_publish_ce_headers` does) is Seambus'
//! envelope (the CloudEvents headers).
//!
//! Every run uses fresh names (a timestamp) and deletes its streams,
//! queues, exchanges and topics afterwards. A broker that does not answer
//! is skipped with a one-line message.
//!
//! `cargo bench -p seambus-benches --bench brokers` (add `-- broker/nats`
//! to run one group).

use std::error::Error as StdError;
use std::future::Future;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode, Throughput,
};
use seambus::{Bus, Context, HandlerError, Module, Received, Subscription};
use tokio::runtime::Runtime;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

type Res<T> = Result<T, Box<dyn StdError + Send + Sync>>;

/// How long a round may wait for its deliveries before the bench fails.
const ROUND_LIMIT: Duration = Duration::from_secs(120);
/// The module that subscribes (the group is `sub` + the event name).
const SUBSCRIBER: &str = "sub";

/// The benchmark event: one string, 512 bytes as JSON.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, seambus::Event)]
#[event(name = "bench.blob", version = 1)]
struct Blob {
    note: String,
}

/// JSON bytes around the note: `{"note":""}`.
const JSON_FRAME: usize = 11;
const PAYLOAD_BYTES: usize = 512;

impl Blob {
    fn new() -> Self {
        Self {
            note: "x".repeat(PAYLOAD_BYTES - JSON_FRAME),
        }
    }

    /// The bytes both sides send (Seambus' JSON codec encodes the same).
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("encode Blob")
    }

    fn decode(bytes: &[u8]) -> Res<Self> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

/// Counts handled deliveries of a round and wakes the waiter at the target.
#[derive(Debug, Default)]
struct Counter {
    count: AtomicU64,
    target: AtomicU64,
    notify: Notify,
}

impl Counter {
    fn reset(&self, target: u64) {
        self.count.store(0, AtomicOrdering::SeqCst);
        self.target.store(target, AtomicOrdering::SeqCst);
    }

    fn hit(&self) {
        let now = self.count.fetch_add(1, AtomicOrdering::SeqCst) + 1;
        if now == self.target.load(AtomicOrdering::SeqCst) {
            self.notify.notify_one();
        }
    }

    async fn wait(&self) -> Res<()> {
        let reached = async {
            loop {
                let notified = self.notify.notified();
                if self.count.load(AtomicOrdering::SeqCst)
                    >= self.target.load(AtomicOrdering::SeqCst)
                {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(ROUND_LIMIT, reached)
            .await
            .map_err(|_| {
                format!(
                    "only {} of {} deliveries within {ROUND_LIMIT:?}",
                    self.count.load(AtomicOrdering::SeqCst),
                    self.target.load(AtomicOrdering::SeqCst)
                )
                .into()
            })
    }
}

/// The handler of every Seambus subscription here: decode (done by the
/// bus), count; the transport acks when it returns.
async fn subscribe(bus: &Bus, counter: &Arc<Counter>) -> Res<Subscription> {
    let counter = counter.clone();
    Ok(bus
        .module(SUBSCRIBER)
        .subscribe(move |event: Received<Blob>, _ctx: Context| {
            let counter = counter.clone();
            async move {
                std::hint::black_box(event.note.len());
                counter.hit();
                Ok::<(), HandlerError>(())
            }
        })
        .await?)
}

/// N confirmed Seambus publishes.
async fn seambus_publish_n(module: &Module, blob: &Blob, n: u64) -> Res<()> {
    for _ in 0..n {
        module.publish(blob.clone()).await?;
    }
    Ok(())
}

/// `iters` measured rounds of `events` publishes. Without a consumer
/// (`counter`), `purge` empties the destination before each round, outside
/// the measured time; with one, a round ends once it handled them all.
async fn timed_rounds<P, Q>(
    iters: u64,
    events: u64,
    counter: Option<&Counter>,
    purge: impl Fn() -> P,
    publish: impl Fn(u64) -> Q,
) -> Res<Duration>
where
    P: Future<Output = Res<()>>,
    Q: Future<Output = Res<()>>,
{
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        match counter {
            None => purge().await?,
            Some(c) => c.reset(events),
        }
        let start = Instant::now();
        publish(events).await?;
        if let Some(c) = counter {
            c.wait().await?;
        }
        total += start.elapsed();
    }
    Ok(total)
}

/// A consumer task of a raw client, stopped on request.
struct Background {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Background {
    fn spawn<F>(work: impl FnOnce(oneshot::Receiver<()>) -> F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel();
        Self {
            stop,
            task: tokio::spawn(work(stopped)),
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// One benchmark's set-up state.
trait Case: Sized {
    /// Runs `iters` rounds; returns the time of their measured parts.
    async fn rounds(&self, iters: u64) -> Res<Duration>;
    /// Deletes what the set-up made.
    async fn teardown(self) -> Res<()>;
}

/// Benchmarks `name`, setting up only if criterion runs it (filters), and
/// tears down after.
fn bench<S, F>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    label: &str,
    name: &str,
    setup: impl FnOnce() -> F,
) where
    S: Case,
    F: Future<Output = Res<S>>,
{
    let mut setup = Some(setup);
    let mut state: Option<S> = None;
    group.bench_function(name, |b| {
        if state.is_none() {
            let make = setup.take().expect("set up once");
            match rt.block_on(make()) {
                Ok(s) => state = Some(s),
                Err(e) => panic!("{label}/{name}: set-up failed: {e}"),
            }
        }
        let s = state.as_ref().expect("set up");
        b.to_async(rt).iter_custom(move |iters| async move {
            match s.rounds(iters).await {
                Ok(d) => d,
                Err(e) => panic!("{label}/{name}: {e}"),
            }
        });
    });
    if let Some(s) = state {
        if let Err(e) = rt.block_on(s.teardown()) {
            eprintln!("{label}/{name}: clean-up failed: {e}");
        }
    }
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>, events: u64, measure: Duration) {
    group.throughput(Throughput::Elements(events));
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(measure);
}

/// `host:port` of the first server of a URL list (scheme, credentials and
/// path dropped).
fn host_port(urls: &str, default_port: u16) -> String {
    let first = urls.split(',').next().unwrap_or_default().trim();
    let rest = first.split_once("://").map_or(first, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let host = rest.split(['/', '?']).next().unwrap_or(rest);
    if host
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        host.to_owned()
    } else {
        format!("{host}:{default_port}")
    }
}

fn answers(addr: &str) -> bool {
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
}

fn env_or(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

/// The TCP check, then a light client check; prints why when skipping.
/// With `SEAMBUS_REQUIRE_BROKERS=1` (CI) a missing broker ends the run with
/// a failure instead.
fn available(
    rt: &Runtime,
    label: &str,
    addr: &str,
    hint: &str,
    check: impl Future<Output = Res<()>>,
) -> bool {
    let why = if !answers(addr) {
        format!("no broker at {addr} ({hint})")
    } else {
        match rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), check).await }) {
            Ok(Ok(())) => return true,
            Ok(Err(e)) => format!("the broker at {addr} does not work: {e}"),
            Err(_) => format!("the broker at {addr} does not answer within 10 s"),
        }
    };
    if std::env::var("SEAMBUS_REQUIRE_BROKERS").as_deref() == Ok("1") {
        eprintln!("{label} failed: {why}, and SEAMBUS_REQUIRE_BROKERS=1");
        std::process::exit(1);
    }
    println!("{label} skipped: {why}");
    false
}

mod nats {
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    use async_nats::jetstream::message::PublishMessage;
    use async_nats::jetstream::{self, stream};
    use futures_util::StreamExt;
    use seambus_nats::{NatsConfig, NatsTransport};

    use super::*;

    const LABEL: &str = "broker/nats";
    const EVENTS: u64 = 2_000;

    pub(super) fn group(c: &mut Criterion, rt: &Runtime, run: &str) {
        let url = env_or("SEAMBUS_TEST_NATS_URL", "nats://127.0.0.1:4222");
        let addr = host_port(&url, 4222);
        let check = async {
            async_nats::connect(url.as_str()).await?;
            Ok(())
        };
        if !available(rt, LABEL, &addr, "start nats-server with -js", check) {
            return;
        }
        let mut group = c.benchmark_group(LABEL);
        configure(&mut group, EVENTS, Duration::from_secs(4));
        let (u, r) = (url.as_str(), run);
        bench(&mut group, rt, LABEL, "seambus_publish", || {
            Seambus::setup(u, r, "pub", false)
        });
        bench(&mut group, rt, LABEL, "raw_publish", || {
            Raw::setup(u, r, "pub", false)
        });
        bench(&mut group, rt, LABEL, "raw_publish_ce_headers", || async {
            let mut raw = Raw::setup(u, r, "pubce", false).await?;
            raw.ce_headers = true;
            Ok(raw)
        });
        bench(&mut group, rt, LABEL, "seambus_roundtrip", || {
            Seambus::setup(u, r, "rt", true)
        });
        bench(&mut group, rt, LABEL, "raw_roundtrip", || {
            Raw::setup(u, r, "rt", true)
        });
        group.finish();
    }

    struct Seambus {
        transport: NatsTransport,
        bus: Bus,
        module: Module,
        blob: Blob,
        /// Publish only: purged between iterations.
        stream: stream::Stream,
        /// Roundtrip only.
        counter: Option<Arc<Counter>>,
    }

    impl Seambus {
        async fn setup(url: &str, run: &str, mode: &str, consume: bool) -> Res<Self> {
            let config = NatsConfig::default()
                .with_servers([url])
                .with_stream_name(format!("SB_{run}_{mode}"))
                .with_subject_prefix(format!("sb-{run}-{mode}"));
            let transport = NatsTransport::connect(config).await?;
            let stream = jetstream::new(transport.client().clone())
                .get_stream(&transport.config().stream.name)
                .await?;
            let bus = Bus::builder()
                .transport("nats", transport.clone())
                .build()?;
            let module = bus.module("bench");
            let blob = Blob::new();
            let mut counter = None;
            if consume {
                let c = Arc::new(Counter::default());
                subscribe(&bus, &c).await?;
                c.reset(1);
                module.publish(blob.clone()).await?;
                c.wait().await?;
                counter = Some(c);
            }
            Ok(Self {
                transport,
                bus,
                module,
                blob,
                stream,
                counter,
            })
        }
    }

    impl Case for Seambus {
        async fn rounds(&self, iters: u64) -> Res<Duration> {
            let purge = || async { Ok(self.stream.clone().purge().await.map(|_| ())?) };
            let publish = |n| seambus_publish_n(&self.module, &self.blob, n);
            timed_rounds(iters, EVENTS, self.counter.as_deref(), purge, publish).await
        }

        async fn teardown(self) -> Res<()> {
            self.bus.shutdown(Duration::from_secs(5)).await?;
            self.transport.delete_streams().await?;
            Ok(())
        }
    }

    struct Raw {
        /// Send the CloudEvents headers Seambus sends, with a UUID
        /// `Nats-Msg-Id` (`raw_publish_ce_headers`).
        ce_headers: bool,
        js: jetstream::Context,
        stream: stream::Stream,
        stream_name: String,
        subject: String,
        run: String,
        seq: AtomicU64,
        blob: Blob,
        consumer: Option<(Arc<Counter>, Background)>,
    }

    impl Raw {
        async fn setup(url: &str, run: &str, mode: &str, consume: bool) -> Res<Self> {
            let client = async_nats::ConnectOptions::new()
                .max_reconnects(None)
                .connect(url)
                .await?;
            let js = jetstream::new(client);
            let prefix = format!("raw-{run}-{mode}");
            let stream_name = format!("RAW_{run}_{mode}");
            // The stream Seambus declares, field for field.
            let stream = js
                .create_stream(stream::Config {
                    name: stream_name.clone(),
                    subjects: vec![format!("{prefix}.>")],
                    storage: stream::StorageType::File,
                    num_replicas: 1,
                    retention: stream::RetentionPolicy::Limits,
                    max_bytes: -1,
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
                .await?;
            let subject = format!("{prefix}.bench.blob");
            let mut raw = Self {
                ce_headers: false,
                js,
                stream,
                stream_name,
                subject: subject.clone(),
                run: format!("{run}-{mode}"),
                seq: AtomicU64::new(0),
                blob: Blob::new(),
                consumer: None,
            };
            if consume {
                // The consumer Seambus creates for a group, field for field.
                let consumer: pull::Stream = raw
                    .stream
                    .create_consumer(pull::Config {
                        durable_name: Some("sub".into()),
                        filter_subject: subject,
                        ack_policy: AckPolicy::Explicit,
                        deliver_policy: DeliverPolicy::All,
                        ack_wait: Duration::from_secs(30),
                        max_deliver: 21,
                        max_ack_pending: 256,
                        ..Default::default()
                    })
                    .await?
                    .stream()
                    .max_messages_per_batch(256)
                    .heartbeat(Duration::from_secs(5))
                    .expires(Duration::from_secs(30))
                    .messages()
                    .await?;
                let counter = Arc::new(Counter::default());
                let c = counter.clone();
                let task = Background::spawn(move |mut stop| async move {
                    let mut messages = consumer;
                    loop {
                        tokio::select! {
                            _ = &mut stop => break,
                            next = messages.next() => match next {
                                Some(Ok(message)) => {
                                    match Blob::decode(&message.payload) {
                                        Ok(blob) => {
                                            std::hint::black_box(blob.note.len());
                                            c.hit();
                                        }
                                        Err(e) => eprintln!("{LABEL}: undecodable message: {e}"),
                                    }
                                    if let Err(e) = message.ack().await {
                                        eprintln!("{LABEL}: ack failed: {e}");
                                    }
                                }
                                Some(Err(e)) => eprintln!("{LABEL}: pull error: {e}"),
                                None => break,
                            },
                        }
                    }
                });
                counter.reset(1);
                raw.publish_n(1).await?;
                counter.wait().await?;
                raw.consumer = Some((counter, task));
            }
            Ok(raw)
        }

        async fn publish_n(&self, n: u64) -> Res<()> {
            for _ in 0..n {
                let seq = self.seq.fetch_add(1, AtomicOrdering::Relaxed);
                let message = if self.ce_headers {
                    // The header set of seambus-nats' `headers_of`.
                    let attrs = seambus::Attributes::new("bench", "bench.blob", 1);
                    let mut headers = async_nats::HeaderMap::new();
                    for (name, value) in attrs.to_wire_headers("ce-") {
                        if name == "ce-datacontenttype" {
                            headers.insert("content-type", value);
                        } else {
                            headers.insert(name.as_str(), value);
                        }
                    }
                    PublishMessage::build()
                        .payload(self.blob.encode().into())
                        .headers(headers)
                        .message_id(attrs.id.to_string())
                } else {
                    PublishMessage::build()
                        .payload(self.blob.encode().into())
                        .message_id(format!("{}-{seq}", self.run))
                };
                self.js
                    .send_publish(self.subject.clone(), message)
                    .await?
                    .await?;
            }
            Ok(())
        }
    }

    impl Case for Raw {
        async fn rounds(&self, iters: u64) -> Res<Duration> {
            let purge = || async { Ok(self.stream.clone().purge().await.map(|_| ())?) };
            let counter = self.consumer.as_ref().map(|(c, _)| &**c);
            timed_rounds(iters, EVENTS, counter, purge, |n| self.publish_n(n)).await
        }

        async fn teardown(self) -> Res<()> {
            if let Some((_, task)) = self.consumer {
                task.stop().await;
            }
            self.js.delete_stream(&self.stream_name).await?;
            Ok(())
        }
    }
}

mod rabbitmq {
    use futures_util::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
    };
    use lapin::types::{AMQPValue, FieldTable, LongString};
    use lapin::{
        BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    };
    use seambus_rabbitmq::{RabbitMqConfig, RabbitMqTransport};

    use super::*;

    const LABEL: &str = "broker/rabbitmq";
    const EVENTS: u64 = 500;
    const ROUTING_KEY: &str = "bench.blob";

    pub(super) fn group(c: &mut Criterion, rt: &Runtime, run: &str) {
        let url = env_or(
            "SEAMBUS_TEST_AMQP_URL",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
        );
        let addr = host_port(&url, 5672);
        let check = async {
            let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
            let _ = conn.close(200, "checked".into()).await;
            Ok(())
        };
        if !available(
            rt,
            LABEL,
            &addr,
            "start RabbitMQ: rabbitmq-server -detached",
            check,
        ) {
            return;
        }
        let mut group = c.benchmark_group(LABEL);
        configure(&mut group, EVENTS, Duration::from_secs(5));
        let (u, r) = (url.as_str(), run);
        bench(&mut group, rt, LABEL, "seambus_publish", || {
            Seambus::setup(u, r, "pub", false)
        });
        bench(&mut group, rt, LABEL, "raw_publish", || {
            Raw::setup(u, r, "pub", false)
        });
        bench(&mut group, rt, LABEL, "seambus_roundtrip", || {
            Seambus::setup(u, r, "rt", true)
        });
        bench(&mut group, rt, LABEL, "raw_roundtrip", || {
            Raw::setup(u, r, "rt", true)
        });
        group.finish();
    }

    struct Seambus {
        transport: RabbitMqTransport,
        bus: Bus,
        module: Module,
        blob: Blob,
        /// Publish only: a connection to purge the group's queue with.
        purge: Option<(Connection, Channel, String)>,
        counter: Option<Arc<Counter>>,
    }

    impl Seambus {
        async fn setup(url: &str, run: &str, mode: &str, consume: bool) -> Res<Self> {
            let exchange = format!("sb-{run}-{mode}");
            let transport = RabbitMqTransport::connect(
                RabbitMqConfig::default()
                    .with_uri(url)
                    .with_exchange(&exchange),
            )
            .await?;
            let bus = Bus::builder()
                .transport("rabbitmq", transport.clone())
                .build()?;
            let module = bus.module("bench");
            let blob = Blob::new();
            let counter = Arc::new(Counter::default());
            // Subscribing declares and binds the group's queue (publishes
            // are `mandatory`: without a bound queue they fail).
            let subscription = subscribe(&bus, &counter).await?;
            counter.reset(1);
            module.publish(blob.clone()).await?;
            counter.wait().await?;
            let mut this = Self {
                transport,
                bus,
                module,
                blob,
                purge: None,
                counter: None,
            };
            if consume {
                this.counter = Some(counter);
            } else {
                // Publish only: the queue stays bound, with no consumer.
                subscription.close().await?;
                let conn = Connection::connect(url, ConnectionProperties::default()).await?;
                let channel = conn.create_channel().await?;
                // The queue Seambus names `<exchange>:<module>:<subscription>`.
                let queue = format!("{exchange}:{SUBSCRIBER}:bench.blob");
                this.purge = Some((conn, channel, queue));
            }
            Ok(this)
        }
    }

    impl Case for Seambus {
        async fn rounds(&self, iters: u64) -> Res<Duration> {
            let purge = || async {
                if let Some((_, channel, queue)) = &self.purge {
                    channel
                        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
                        .await?;
                }
                Ok(())
            };
            let publish = |n| seambus_publish_n(&self.module, &self.blob, n);
            timed_rounds(iters, EVENTS, self.counter.as_deref(), purge, publish).await
        }

        async fn teardown(self) -> Res<()> {
            if let Some((conn, _, _)) = &self.purge {
                let _ = conn.close(200, "done".into()).await;
            }
            self.bus.shutdown(Duration::from_secs(5)).await?;
            self.transport.delete_topology().await?;
            Ok(())
        }
    }

    struct Raw {
        conn: Connection,
        publisher: Channel,
        exchange: String,
        queue: String,
        blob: Blob,
        consumer: Option<(Arc<Counter>, Background)>,
    }

    impl Raw {
        async fn setup(url: &str, run: &str, mode: &str, consume: bool) -> Res<Self> {
            let exchange = format!("raw-{run}-{mode}");
            let queue = format!("{exchange}:q");
            let conn = Connection::connect(url, ConnectionProperties::default()).await?;
            let publisher = conn.create_channel().await?;
            publisher
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            // Durable topic exchange, durable quorum queue, as Seambus
            // declares them (without its dead-letter arguments, which cost
            // nothing until a message is dead-lettered).
            publisher
                .exchange_declare(
                    exchange.as_str().into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            let mut args = FieldTable::default();
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from("quorum")),
            );
            publisher
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    args,
                )
                .await?;
            publisher
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    ROUTING_KEY.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let mut raw = Self {
                conn,
                publisher,
                exchange,
                queue,
                blob: Blob::new(),
                consumer: None,
            };
            if consume {
                let channel = raw.conn.create_channel().await?;
                channel.basic_qos(256, BasicQosOptions::default()).await?;
                let mut deliveries = channel
                    .basic_consume(
                        raw.queue.as_str().into(),
                        "raw-bench".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                let counter = Arc::new(Counter::default());
                let c = counter.clone();
                let task = Background::spawn(move |mut stop| async move {
                    loop {
                        tokio::select! {
                            _ = &mut stop => break,
                            next = deliveries.next() => match next {
                                Some(Ok(delivery)) => {
                                    match Blob::decode(&delivery.data) {
                                        Ok(blob) => {
                                            std::hint::black_box(blob.note.len());
                                            c.hit();
                                        }
                                        Err(e) => eprintln!("{LABEL}: undecodable message: {e}"),
                                    }
                                    if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                                        eprintln!("{LABEL}: ack failed: {e}");
                                    }
                                }
                                Some(Err(e)) => {
                                    eprintln!("{LABEL}: consumer failed: {e}");
                                    break;
                                }
                                None => break,
                            },
                        }
                    }
                    let _ = channel.close(200, "done".into()).await;
                });
                counter.reset(1);
                raw.publish_n(1).await?;
                counter.wait().await?;
                raw.consumer = Some((counter, task));
            }
            Ok(raw)
        }

        async fn publish_n(&self, n: u64) -> Res<()> {
            for _ in 0..n {
                let payload = self.blob.encode();
                let confirm = self
                    .publisher
                    .basic_publish(
                        self.exchange.as_str().into(),
                        ROUTING_KEY.into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &payload,
                        BasicProperties::default()
                            .with_content_type("application/json".into())
                            .with_delivery_mode(2),
                    )
                    .await?;
                match confirm.await? {
                    Confirmation::Ack(None) => {}
                    other => return Err(format!("publish not confirmed: {other:?}").into()),
                }
            }
            Ok(())
        }
    }

    impl Case for Raw {
        async fn rounds(&self, iters: u64) -> Res<Duration> {
            let purge = || async {
                self.publisher
                    .queue_purge(self.queue.as_str().into(), QueuePurgeOptions::default())
                    .await?;
                Ok(())
            };
            let counter = self.consumer.as_ref().map(|(c, _)| &**c);
            timed_rounds(iters, EVENTS, counter, purge, |n| self.publish_n(n)).await
        }

        async fn teardown(self) -> Res<()> {
            if let Some((_, task)) = self.consumer {
                task.stop().await;
            }
            self.publisher
                .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
            self.publisher
                .exchange_delete(
                    self.exchange.as_str().into(),
                    ExchangeDeleteOptions::default(),
                )
                .await?;
            let _ = self.conn.close(200, "done".into()).await;
            Ok(())
        }
    }
}

mod kafka {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::ClientConfig;
    use rdkafka::Message;
    use seambus_kafka::{KafkaConfig, KafkaTransport};

    use super::*;

    const LABEL: &str = "broker/kafka";
    /// Smaller than elsewhere: with `linger.ms=5` each awaited publish
    /// waits out the linger, so a sequential publish takes ~5 ms.
    const EVENTS: u64 = 200;
    const PARTITIONS: i32 = 3;
    const TIMEOUT: Duration = Duration::from_secs(30);

    pub(super) fn group(c: &mut Criterion, rt: &Runtime, run: &str) {
        let brokers = env_or("SEAMBUS_TEST_KAFKA_BROKERS", "127.0.0.1:9092");
        let addr = host_port(&brokers, 9092);
        let b = brokers.clone();
        let check = async move {
            let probe: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &b).create()?;
            tokio::task::spawn_blocking(move || probe.fetch_metadata(None, Duration::from_secs(8)))
                .await??;
            Ok(())
        };
        if !available(
            rt,
            LABEL,
            &addr,
            "start one with scripts/kafka-broker start",
            check,
        ) {
            return;
        }
        let mut group = c.benchmark_group(LABEL);
        configure(&mut group, EVENTS, Duration::from_secs(5));
        let (k, r) = (brokers.as_str(), run);
        bench(&mut group, rt, LABEL, "seambus_publish", || {
            Seambus::setup(k, r, "pub", false)
        });
        bench(&mut group, rt, LABEL, "raw_publish", || {
            Raw::setup(k, r, "pub", false)
        });
        bench(&mut group, rt, LABEL, "seambus_roundtrip", || {
            Seambus::setup(k, r, "rt", true)
        });
        bench(&mut group, rt, LABEL, "raw_roundtrip", || {
            Raw::setup(k, r, "rt", true)
        });
        group.finish();
    }

    struct Seambus {
        transport: KafkaTransport,
        bus: Bus,
        module: Module,
        blob: Blob,
        prefix: String,
        counter: Option<Arc<Counter>>,
    }

    impl Seambus {
        async fn setup(brokers: &str, run: &str, mode: &str, consume: bool) -> Res<Self> {
            let prefix = format!("sb-{run}-{mode}");
            let transport = KafkaTransport::connect(
                KafkaConfig::default()
                    .with_bootstrap_servers(brokers)
                    .with_topic_prefix(&prefix)
                    .with_group_prefix(&prefix)
                    .with_partitions(PARTITIONS),
            )
            .await?;
            let bus = Bus::builder()
                .transport("kafka", transport.clone())
                .build()?;
            let module = bus.module("bench");
            let blob = Blob::new();
            let mut counter = None;
            if consume {
                let c = Arc::new(Counter::default());
                subscribe(&bus, &c).await?;
                c.reset(1);
                module.publish(blob.clone()).await?;
                c.wait().await?;
                counter = Some(c);
            } else {
                // Creates the topic and the producer id.
                module.publish(blob.clone()).await?;
            }
            Ok(Self {
                transport,
                bus,
                module,
                blob,
                prefix,
                counter,
            })
        }
    }

    impl Case for Seambus {
        async fn rounds(&self, iters: u64) -> Res<Duration> {
            // Kafka topics just grow.
            let purge = || async { Ok(()) };
            let publish = |n| seambus_publish_n(&self.module, &self.blob, n);
            timed_rounds(iters, EVENTS, self.counter.as_deref(), purge, publish).await
        }

        async fn teardown(self) -> Res<()> {
            self.bus.shutdown(Duration::from_secs(5)).await?;
            let topic = format!("{}.bench.blob", self.prefix);
            let dead = format!("{}.dlq.{SUBSCRIBER}.bench.blob", self.prefix);
            let topics: &[&str] = if self.counter.is_some() {
                &[&topic, &dead]
            } else {
                &[&topic]
            };
            self.transport.delete_topics(topics).await?;
            Ok(())
        }
    }

    struct Raw {
        admin: AdminClient<DefaultClientContext>,
        producer: FutureProducer,
        topic: String,
        blob: Blob,
        consumer: Option<(Arc<Counter>, Background)>,
    }

    impl Raw {
        async fn setup(brokers: &str, run: &str, mode: &str, consume: bool) -> Res<Self> {
            let topic = format!("raw-{run}-{mode}.bench.blob");
            let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .create()?;
            for result in admin
                .create_topics(
                    [&NewTopic::new(
                        &topic,
                        PARTITIONS,
                        TopicReplication::Fixed(1),
                    )],
                    &AdminOptions::new(),
                )
                .await?
            {
                result.map_err(|(name, code)| format!("create topic {name}: {code}"))?;
            }
            // The producer settings of seambus-kafka.
            let producer: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .set("enable.idempotence", "true")
                .set("acks", "all")
                .set("linger.ms", "5")
                .set("message.timeout.ms", TIMEOUT.as_millis().to_string())
                .set("message.max.bytes", "1000000")
                .create()?;
            let mut raw = Self {
                admin,
                producer,
                topic,
                blob: Blob::new(),
                consumer: None,
            };
            if consume {
                // The consumer settings of seambus-kafka.
                let consumer: StreamConsumer = ClientConfig::new()
                    .set("bootstrap.servers", brokers)
                    .set("group.id", format!("raw-{run}-{mode}.sub"))
                    .set("enable.auto.commit", "true")
                    .set("auto.commit.interval.ms", "1000")
                    .set("enable.auto.offset.store", "false")
                    .set("auto.offset.reset", "earliest")
                    .set("enable.partition.eof", "false")
                    .set("session.timeout.ms", "10000")
                    .create()?;
                consumer.subscribe(&[&raw.topic])?;
                let counter = Arc::new(Counter::default());
                let c = counter.clone();
                let task = Background::spawn(move |mut stop| async move {
                    loop {
                        tokio::select! {
                            _ = &mut stop => break,
                            received = consumer.recv() => match received {
                                Ok(message) => {
                                    match Blob::decode(message.payload().unwrap_or_default()) {
                                        Ok(blob) => {
                                            std::hint::black_box(blob.note.len());
                                            c.hit();
                                        }
                                        Err(e) => eprintln!("{LABEL}: undecodable record: {e}"),
                                    }
                                    if let Err(e) = consumer.store_offset_from_message(&message) {
                                        eprintln!("{LABEL}: offset not stored: {e}");
                                    }
                                }
                                Err(e) => {
                                    eprintln!("{LABEL}: consumer error: {e}");
                                    tokio::time::sleep(Duration::from_millis(200)).await;
                                }
                            },
                        }
                    }
                });
                counter.reset(1);
                raw.publish_n(1).await?;
                counter.wait().await?;
                raw.consumer = Some((counter, task));
            } else {
                raw.publish_n(1).await?;
            }
            Ok(raw)
        }

        async fn publish_n(&self, n: u64) -> Res<()> {
            for _ in 0..n {
                let payload = self.blob.encode();
                self.producer
                    .send(
                        FutureRecord::<[u8], [u8]>::to(&self.topic).payload(&payload),
                        TIMEOUT,
                    )
                    .await
                    .map_err(|(e, _)| e)?;
            }
            Ok(())
        }
    }

    impl Case for Raw {
        async fn rounds(&self, iters: u64) -> Res<Duration> {
            let purge = || async { Ok(()) };
            let counter = self.consumer.as_ref().map(|(c, _)| &**c);
            timed_rounds(iters, EVENTS, counter, purge, |n| self.publish_n(n)).await
        }

        async fn teardown(self) -> Res<()> {
            if let Some((_, task)) = self.consumer {
                task.stop().await;
            }
            drop(self.producer);
            self.admin
                .delete_topics(&[&self.topic], &AdminOptions::new())
                .await?;
            Ok(())
        }
    }
}

mod sql {
    //! `broker/sql_postgres` and `broker/sql_sqlite`: the SQL transport
    //! beside a raw client doing the same SQL on the same database (sqlx):
    //! insert one row per publish (the schema's `queue` table layout), and
    //! a consumer that claims rows in batches of 32 with a lease
    //! (`UPDATE … WHERE id IN (SELECT … LIMIT 32 FOR UPDATE SKIP LOCKED)
    //! RETURNING …`, SQLite without `SKIP LOCKED`), decodes each and
    //! deletes it by id; when it finds nothing it waits 1 ms (the raw side
    //! polls; the transport wakes on `NOTIFY` or its own publishes).
    //!
    //! `seambus_outbox` / `raw_outbox`: the transactional outbox and its
    //! relay. Each of N events is written in a transaction of its own on
    //! the application's pool (`BEGIN`, insert into the outbox table,
    //! `COMMIT`) while the relay runs: it reads the oldest rows (batches of
    //! 32), forwards each to an in-process subscriber and deletes its row;
    //! the round ends when all N are handled. The raw side does the same
    //! SQL, forwards each payload over a tokio channel to a task that
    //! decodes it, and polls every 1 ms when the table is empty (the relay
    //! wakes on `NOTIFY`, or on its outbox's own writes on SQLite, and
    //! renews its lease once per batch).
    use seambus_sql::{Outbox, Relay, SqlConfig, SqlTransport};
    use sqlx::Row;

    use super::*;

    const EVENTS: u64 = 1_000;

    #[derive(Clone, Copy)]
    enum Db {
        Postgres,
        Sqlite,
    }

    impl Db {
        fn label(self) -> &'static str {
            match self {
                Db::Postgres => "broker/sql_postgres",
                Db::Sqlite => "broker/sql_sqlite",
            }
        }

        fn url(self, run: &str) -> String {
            match self {
                Db::Postgres => env_or(
                    "SEAMBUS_TEST_POSTGRES_URL",
                    "postgres://postgres@127.0.0.1:5432/test",
                ),
                Db::Sqlite => format!(
                    "sqlite://{}",
                    std::env::temp_dir()
                        .join(format!("seambus-bench-{run}.db"))
                        .display()
                ),
            }
        }

        /// A table name of `schema` (PostgreSQL schema or SQLite prefix).
        fn table(self, schema: &str, name: &str) -> String {
            match self {
                Db::Postgres => format!("\"{schema}\".{name}"),
                Db::Sqlite => format!("\"{schema}_{name}\""),
            }
        }
    }

    pub(super) fn group(c: &mut Criterion, rt: &Runtime, run: &str) {
        for db in [Db::Postgres, Db::Sqlite] {
            let url = db.url(run);
            if let Db::Postgres = db {
                let addr = host_port(&url, 5432);
                let check = async {
                    sqlx::PgPool::connect(&url).await?;
                    Ok(())
                };
                if !available(
                    rt,
                    db.label(),
                    &addr,
                    "scripts/broker start postgres",
                    check,
                ) {
                    continue;
                }
            }
            let mut group = c.benchmark_group(db.label());
            configure(&mut group, EVENTS, Duration::from_secs(8));
            for (name, consume) in [("publish", false), ("roundtrip", true)] {
                let schema = format!("bench_{run}_{name}");
                bench(
                    &mut group,
                    rt,
                    db.label(),
                    &format!("seambus_{name}"),
                    || Seambus::setup(db, url.clone(), format!("{schema}_s"), consume),
                );
                bench(&mut group, rt, db.label(), &format!("raw_{name}"), || {
                    Raw::setup(db, url.clone(), format!("{schema}_r"), consume)
                });
            }
            let schema = format!("bench_{run}_outbox");
            bench(&mut group, rt, db.label(), "seambus_outbox", || {
                SeambusOutbox::setup(db, url.clone(), format!("{schema}_s"))
            });
            bench(&mut group, rt, db.label(), "raw_outbox", || {
                RawOutbox::setup(db, url.clone(), format!("{schema}_r"))
            });
            group.finish();
        }
    }

    struct Seambus {
        transport: SqlTransport,
        bus: Bus,
        module: Module,
        blob: Blob,
        queue: String,
        counter: Option<Arc<Counter>>,
    }

    impl Seambus {
        async fn setup(db: Db, url: String, schema: String, consume: bool) -> Res<Self> {
            let transport =
                SqlTransport::connect(SqlConfig::new(url).with_schema(schema.clone())).await?;
            let bus = Bus::builder().transport("sql", transport.clone()).build()?;
            let module = bus.module("bench");
            let blob = Blob::new();
            let mut counter = None;
            let c = Arc::new(Counter::default());
            // Publishing reaches the groups that exist: one always does.
            let sub = subscribe(&bus, &c).await?;
            if consume {
                c.reset(1);
                module.publish(blob.clone()).await?;
                c.wait().await?;
                counter = Some(c);
            } else {
                sub.close().await?;
            }
            Ok(Self {
                transport,
                bus,
                module,
                blob,
                queue: db.table(&schema, "queue"),
                counter,
            })
        }
    }

    impl Case for Seambus {
        async fn rounds(&self, iters: u64) -> Res<Duration> {
            let purge = || self.transport_purge();
            let publish = |n| seambus_publish_n(&self.module, &self.blob, n);
            timed_rounds(iters, EVENTS, self.counter.as_deref(), purge, publish).await
        }

        async fn teardown(self) -> Res<()> {
            self.bus.shutdown(Duration::from_secs(5)).await?;
            let dropped = SqlTransport::connect(self.transport.config().clone()).await?;
            dropped.drop_tables().await?;
            Ok(())
        }
    }

    impl Seambus {
        /// Empties the queue between publish rounds (outside the time).
        async fn transport_purge(&self) -> Res<()> {
            raw_execute(
                self.transport.config(),
                &format!("DELETE FROM {}", self.queue),
            )
            .await
        }
    }

    async fn raw_execute(config: &SqlConfig, sql: &str) -> Res<()> {
        if config.url.starts_with("sqlite") {
            let pool = sqlx::SqlitePool::connect(&config.url).await?;
            sqlx::query(sql).execute(&pool).await?;
        } else {
            let pool = sqlx::PgPool::connect(&config.url).await?;
            sqlx::query(sql).execute(&pool).await?;
        }
        Ok(())
    }

    enum Pool {
        Postgres(sqlx::PgPool),
        Sqlite(sqlx::SqlitePool),
    }

    impl Pool {
        /// The application's pool: WAL and a busy timeout on SQLite, as the
        /// transport sets them.
        async fn open(db: Db, url: &str) -> Res<Self> {
            Ok(match db {
                Db::Postgres => Pool::Postgres(sqlx::PgPool::connect(url).await?),
                Db::Sqlite => {
                    let options: sqlx::sqlite::SqliteConnectOptions = url.parse()?;
                    Pool::Sqlite(
                        sqlx::SqlitePool::connect_with(
                            options
                                .create_if_missing(true)
                                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                                .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
                                .busy_timeout(Duration::from_secs(10)),
                        )
                        .await?,
                    )
                }
            })
        }
    }

    macro_rules! on {
        ($pool:expr, $p:ident => $body:expr) => {
            match $pool {
                Pool::Postgres($p) => $body,
                Pool::Sqlite($p) => $body,
            }
        };
    }

    struct Raw {
        pool: Arc<Pool>,
        insert: String,
        drop: Vec<String>,
        blob: Blob,
        consumer: Option<(Arc<Counter>, Background)>,
        queue: String,
    }

    impl Raw {
        async fn setup(db: Db, url: String, schema: String, consume: bool) -> Res<Self> {
            let queue = db.table(&schema, "queue");
            let (pool, create, drop, claim) = match db {
                Db::Postgres => {
                    let pool = sqlx::PgPool::connect(&url).await?;
                    (
                        Pool::Postgres(pool),
                        vec![
                            format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""),
                            format!(
                                "CREATE TABLE {queue} (id BIGSERIAL PRIMARY KEY, grp TEXT NOT NULL, \
                                 pkey TEXT, headers TEXT NOT NULL, payload BYTEA NOT NULL, \
                                 attempt BIGINT NOT NULL, delivered BIGINT NOT NULL, \
                                 available_at BIGINT NOT NULL, locked_until BIGINT NOT NULL, \
                                 locked_by TEXT)"
                            ),
                            format!("CREATE INDEX ON {queue} (grp, id)"),
                        ],
                        vec![format!("DROP SCHEMA \"{schema}\" CASCADE")],
                        format!(
                            "UPDATE {queue} SET locked_until = 1, locked_by = 'raw' WHERE id IN \
                             (SELECT id FROM {queue} WHERE grp = 'sub' AND locked_until = 0 \
                             ORDER BY id LIMIT 32 FOR UPDATE SKIP LOCKED) RETURNING id, payload"
                        ),
                    )
                }
                Db::Sqlite => (
                    Pool::open(db, &url).await?,
                    vec![
                        format!(
                            "CREATE TABLE {queue} (id INTEGER PRIMARY KEY AUTOINCREMENT, \
                                 grp TEXT NOT NULL, pkey TEXT, headers TEXT NOT NULL, \
                                 payload BLOB NOT NULL, attempt BIGINT NOT NULL, \
                                 delivered BIGINT NOT NULL, available_at BIGINT NOT NULL, \
                                 locked_until BIGINT NOT NULL, locked_by TEXT)"
                        ),
                        format!("CREATE INDEX \"{schema}_by_group\" ON {queue} (grp, id)"),
                    ],
                    vec![format!("DROP TABLE {queue}")],
                    format!(
                        "UPDATE {queue} SET locked_until = 1, locked_by = 'raw' WHERE id IN \
                             (SELECT id FROM {queue} WHERE grp = 'sub' AND locked_until = 0 \
                             ORDER BY id LIMIT 32) RETURNING id, payload"
                    ),
                ),
            };
            for statement in &create {
                on!(&pool, p => sqlx::query(statement).execute(p).await.map(|_| ()))?;
            }
            let pool = Arc::new(pool);
            let mut raw = Self {
                pool: pool.clone(),
                insert: format!(
                    "INSERT INTO {queue} (grp, pkey, headers, payload, attempt, delivered, \
                     available_at, locked_until) VALUES ('sub', NULL, $1, $2, 1, 0, 0, 0)"
                ),
                drop,
                blob: Blob::new(),
                consumer: None,
                queue: queue.clone(),
            };
            if consume {
                let counter = Arc::new(Counter::default());
                let c = counter.clone();
                let delete = format!("DELETE FROM {queue} WHERE id = $1");
                let task = Background::spawn(move |mut stop| async move {
                    loop {
                        let claimed: Result<Vec<(i64, Vec<u8>)>, sqlx::Error> = on!(&*pool, p => {
                            sqlx::query(&claim).fetch_all(p).await.and_then(|rows| {
                                rows.into_iter()
                                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                                    .collect()
                            })
                        });
                        let rows = match claimed {
                            Ok(rows) => rows,
                            Err(e) => {
                                eprintln!("{}: claim failed: {e}", db.label());
                                Vec::new()
                            }
                        };
                        if rows.is_empty() {
                            tokio::select! {
                                _ = &mut stop => break,
                                _ = tokio::time::sleep(Duration::from_millis(1)) => continue,
                            }
                        }
                        for (id, payload) in rows {
                            match Blob::decode(&payload) {
                                Ok(blob) => {
                                    std::hint::black_box(blob.note.len());
                                }
                                Err(e) => eprintln!("{}: undecodable row: {e}", db.label()),
                            }
                            let deleted = on!(&*pool, p => {
                                sqlx::query(&delete).bind(id).execute(p).await.map(|_| ())
                            });
                            if let Err(e) = deleted {
                                eprintln!("{}: delete failed: {e}", db.label());
                            }
                            c.hit();
                        }
                    }
                });
                counter.reset(1);
                raw.publish_n(1).await?;
                counter.wait().await?;
                raw.consumer = Some((counter, task));
            }
            Ok(raw)
        }

        /// N inserts, one after the other, each committed; the same
        /// headers column as the transport writes (CloudEvents pairs).
        async fn publish_n(&self, n: u64) -> Res<()> {
            for _ in 0..n {
                let attrs = seambus::Attributes::new("bench", "bench.blob", 1);
                let headers = serde_json::to_string(&attrs.to_wire_headers("ce_"))?;
                let payload = self.blob.encode();
                on!(&*self.pool, p => {
                    sqlx::query(&self.insert)
                        .bind(headers)
                        .bind(payload)
                        .execute(p)
                        .await
                        .map(|_| ())
                })?;
            }
            Ok(())
        }
    }

    impl Case for Raw {
        async fn rounds(&self, iters: u64) -> Res<Duration> {
            let purge = || async {
                let purge = format!("DELETE FROM {}", self.queue);
                on!(&*self.pool, p => sqlx::query(&purge).execute(p).await.map(|_| ()))?;
                Ok(())
            };
            let counter = self.consumer.as_ref().map(|(c, _)| &**c);
            timed_rounds(iters, EVENTS, counter, purge, |n| self.publish_n(n)).await
        }

        async fn teardown(self) -> Res<()> {
            if let Some((_, task)) = self.consumer {
                task.stop().await;
            }
            for statement in &self.drop {
                on!(&*self.pool, p => sqlx::query(statement).execute(p).await.map(|_| ()))?;
            }
            Ok(())
        }
    }

    /// The outbox with its relay forwarding to an in-process subscriber.
    struct SeambusOutbox {
        pool: Pool,
        config: SqlConfig,
        outbox: Outbox,
        _subscription: Subscription,
        relay: Relay,
        bus: Bus,
        module: Module,
        blob: Blob,
        counter: Arc<Counter>,
    }

    impl SeambusOutbox {
        async fn setup(db: Db, url: String, schema: String) -> Res<Self> {
            let config = SqlConfig::new(url.clone()).with_schema(schema);
            let outbox = Outbox::connect(config.clone()).await?;
            let bus = Bus::new();
            let counter = Arc::new(Counter::default());
            let subscription = subscribe(&bus, &counter).await?;
            let relay = outbox.relay(bus.clone());
            let this = Self {
                pool: Pool::open(db, &url).await?,
                config,
                outbox,
                _subscription: subscription,
                relay,
                module: bus.module("bench"),
                bus,
                blob: Blob::new(),
                counter,
            };
            this.counter.reset(1);
            this.publish_n(1).await?;
            this.counter.wait().await?;
            Ok(this)
        }

        /// N events, each written in a transaction of its own.
        async fn publish_n(&self, n: u64) -> Res<()> {
            for _ in 0..n {
                on!(&self.pool, p => {
                    let mut tx = p.begin().await?;
                    self.outbox.publish(&mut *tx, &self.module, self.blob.clone()).await?;
                    tx.commit().await?;
                });
            }
            Ok(())
        }
    }

    impl Case for SeambusOutbox {
        async fn rounds(&self, iters: u64) -> Res<Duration> {
            outbox_rounds(iters, &self.counter, |n| self.publish_n(n)).await
        }

        async fn teardown(self) -> Res<()> {
            self.relay.stop().await;
            self.bus.shutdown(Duration::from_secs(5)).await?;
            SqlTransport::connect(self.config)
                .await?
                .drop_tables()
                .await?;
            Ok(())
        }
    }

    /// Rounds of `EVENTS` writes, each ending when `counter` saw them all.
    async fn outbox_rounds<Q: Future<Output = Res<()>>>(
        iters: u64,
        counter: &Counter,
        publish: impl Fn(u64) -> Q,
    ) -> Res<Duration> {
        timed_rounds(iters, EVENTS, Some(counter), || async { Ok(()) }, publish).await
    }

    /// The same SQL by hand: an outbox table, a task that reads, forwards
    /// over a channel and deletes, and a task that decodes and counts.
    struct RawOutbox {
        pool: Arc<Pool>,
        insert: String,
        drop: Vec<String>,
        blob: Blob,
        counter: Arc<Counter>,
        relay: Background,
        consumer: JoinHandle<()>,
    }

    impl RawOutbox {
        async fn setup(db: Db, url: String, schema: String) -> Res<Self> {
            let outbox = db.table(&schema, "outbox");
            let pool = Pool::open(db, &url).await?;
            let (create, drop) = match db {
                Db::Postgres => (
                    vec![
                        format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""),
                        format!(
                            "CREATE TABLE {outbox} (id BIGSERIAL PRIMARY KEY, event_type TEXT NOT NULL, \
                             pkey TEXT, headers TEXT NOT NULL, payload BYTEA NOT NULL, \
                             created_at BIGINT NOT NULL)"
                        ),
                    ],
                    vec![format!("DROP SCHEMA \"{schema}\" CASCADE")],
                ),
                Db::Sqlite => (
                    vec![format!(
                        "CREATE TABLE {outbox} (id INTEGER PRIMARY KEY AUTOINCREMENT, \
                         event_type TEXT NOT NULL, pkey TEXT, headers TEXT NOT NULL, \
                         payload BLOB NOT NULL, created_at BIGINT NOT NULL)"
                    )],
                    vec![format!("DROP TABLE {outbox}")],
                ),
            };
            for statement in &create {
                on!(&pool, p => sqlx::query(statement).execute(p).await.map(|_| ()))?;
            }
            let pool = Arc::new(pool);
            let counter = Arc::new(Counter::default());
            let (forward, mut forwarded) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
            let c = counter.clone();
            let consumer = tokio::spawn(async move {
                while let Some(payload) = forwarded.recv().await {
                    match Blob::decode(&payload) {
                        Ok(blob) => {
                            std::hint::black_box(blob.note.len());
                        }
                        Err(e) => eprintln!("raw outbox: undecodable row: {e}"),
                    }
                    c.hit();
                }
            });
            let (take, delete) = (
                format!("SELECT id, headers, payload FROM {outbox} ORDER BY id LIMIT 32"),
                format!("DELETE FROM {outbox} WHERE id = $1"),
            );
            let p = pool.clone();
            let relay = Background::spawn(move |mut stop| async move {
                loop {
                    let taken: Result<Vec<(i64, String, Vec<u8>)>, sqlx::Error> =
                        on!(&*p, p => sqlx::query_as(&take).fetch_all(p).await);
                    let rows = taken.unwrap_or_else(|e| {
                        eprintln!("{}: raw relay read failed: {e}", db.label());
                        Vec::new()
                    });
                    if rows.is_empty() {
                        tokio::select! {
                            _ = &mut stop => break,
                            _ = tokio::time::sleep(Duration::from_millis(1)) => continue,
                        }
                    }
                    for (id, headers, payload) in rows {
                        std::hint::black_box(headers.len());
                        let _ = forward.send(payload);
                        let deleted = on!(&*p, p => {
                            sqlx::query(&delete).bind(id).execute(p).await.map(|_| ())
                        });
                        if let Err(e) = deleted {
                            eprintln!("{}: raw relay delete failed: {e}", db.label());
                        }
                    }
                }
            });
            let this = Self {
                pool,
                insert: format!(
                    "INSERT INTO {outbox} (event_type, pkey, headers, payload, created_at) \
                     VALUES ($1, $2, $3, $4, $5)"
                ),
                drop,
                blob: Blob::new(),
                counter,
                relay,
                consumer,
            };
            this.counter.reset(1);
            this.publish_n(1).await?;
            this.counter.wait().await?;
            Ok(this)
        }

        /// N events, each written in a transaction of its own, with the
        /// headers column the outbox writes.
        async fn publish_n(&self, n: u64) -> Res<()> {
            for _ in 0..n {
                let attrs = seambus::Attributes::new("bench", "bench.blob", 1);
                let headers = serde_json::to_string(&attrs.to_wire_headers("ce_"))?;
                let payload = self.blob.encode();
                let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
                on!(&*self.pool, p => {
                    let mut tx = p.begin().await?;
                    sqlx::query(&self.insert)
                        .bind("bench.blob")
                        .bind(None::<String>)
                        .bind(headers)
                        .bind(payload)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                });
            }
            Ok(())
        }
    }

    impl Case for RawOutbox {
        async fn rounds(&self, iters: u64) -> Res<Duration> {
            outbox_rounds(iters, &self.counter, |n| self.publish_n(n)).await
        }

        async fn teardown(self) -> Res<()> {
            self.relay.stop().await;
            self.consumer.abort();
            for statement in &self.drop {
                on!(&*self.pool, p => sqlx::query(statement).execute(p).await.map(|_| ()))?;
            }
            Ok(())
        }
    }
}

fn brokers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    // Fresh stream, queue and topic names for this run.
    let run = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
        .to_string();
    nats::group(c, &rt, &run);
    rabbitmq::group(c, &rt, &run);
    kafka::group(c, &rt, &run);
    sql::group(c, &rt, &run);
}

criterion_group!(benches, brokers);
criterion_main!(benches);
