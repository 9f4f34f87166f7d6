//! Running the plan: publishers, handlers, histograms, allocation counts.

use std::future::Future;
use std::io::IsTerminal;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::Poll;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use seambus::{Bus, Context, Dispatch, HandlerError, Module, PublishOptions, Received};
use tokio::sync::Notify;

use super::broker;
use super::options::{Amount, Step};
use super::report::{Latency, Report, RunResult, Settings};
use super::{DispatchMode, HarnessError, Keys, LoadEvent, Options};

/// Allocations counted by an [`AllocMeter`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocCount {
    /// Number of allocations.
    pub count: u64,
    /// Bytes allocated.
    pub bytes: u64,
}

impl std::ops::AddAssign for AllocCount {
    fn add_assign(&mut self, other: Self) {
        self.count += other.count;
        self.bytes += other.bytes;
    }
}

/// Counts heap allocations for the harness. The binary builds one from
/// `allocation-counter` (`measure` and `opt_out`), whose counting global
/// allocator is then installed in the binary only: the library does not
/// link that allocator itself, so the criterion benches keep the system
/// allocator.
#[derive(Debug, Clone, Copy)]
pub struct AllocMeter {
    /// Runs the closure and returns the heap allocations the current thread
    /// made meanwhile.
    pub measure: fn(&mut dyn FnMut()) -> AllocCount,
    /// Runs the closure without counting its allocations (the harness
    /// building events and keys).
    pub opt_out: fn(&mut dyn FnMut()),
}

/// Histogram bounds: 1 ns to 1 h, 3 significant digits.
const HIGHEST_NANOS: u64 = 3_600_000_000_000;

fn histogram() -> Result<Histogram<u64>, HarnessError> {
    Histogram::new_with_bounds(1, HIGHEST_NANOS, 3)
        .map_err(|e| HarnessError::new(format!("histogram: {e}")))
}

/// The time base that `sent_at_nanos` counts from.
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn now_nanos() -> u64 {
    base().elapsed().as_nanos() as u64
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// State shared by the handlers, the publishers, the waiter and the
/// progress bar.
struct Shared {
    /// Deliveries handled since the start (warm-up included).
    handled: AtomicU64,
    /// The count the waiter waits for.
    target: AtomicU64,
    /// When the latest delivery was handled (nanos since [`base`]).
    last_nanos: AtomicU64,
    /// Events published since the start.
    published: AtomicU64,
    /// Ctrl-C was pressed.
    interrupted: AtomicBool,
    notify: Notify,
    /// End-to-end latency in nanoseconds, one histogram per module.
    latency: Vec<Mutex<Histogram<u64>>>,
}

impl Shared {
    /// One delivery handled by module `module`: the whole handler.
    fn hit(&self, module: usize, event: &LoadEvent) {
        let now = now_nanos();
        let latency = now.saturating_sub(event.sent_at_nanos).max(1);
        lock(&self.latency[module]).saturating_record(latency);
        self.last_nanos.fetch_max(now, AcqRel);
        if self.handled.fetch_add(1, AcqRel) + 1 >= self.target.load(Acquire) {
            self.notify.notify_one();
        }
    }

    /// Waits until `target` deliveries were handled since the start, at
    /// most `timeout`.
    async fn wait_for(&self, target: u64, timeout: Duration) -> Result<(), HarnessError> {
        self.target.store(target, Release);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            let handled = self.handled.load(Acquire);
            if handled >= target {
                return Ok(());
            }
            if self.interrupted.load(Acquire) {
                return Err(HarnessError::new("interrupted"));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(HarnessError::new(format!(
                    "timed out after {timeout:?} waiting for deliveries: {handled} of {target} handled \
                     (raise --drain-timeout, or lower the load)"
                )));
            }
            // Wake up now and then to notice Ctrl-C and the deadline.
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
    }

    /// The merged latency histogram of all modules; resets them.
    fn take_latency(&self) -> Result<Histogram<u64>, HarnessError> {
        let mut all = histogram()?;
        for h in &self.latency {
            let mut h = lock(h);
            all.add(&*h)
                .map_err(|e| HarnessError::new(format!("histogram: {e}")))?;
            h.reset();
        }
        Ok(all)
    }
}

/// Everything a step needs.
struct Ctx {
    shared: Arc<Shared>,
    publisher: Module,
    modules: u64,
    keys: Option<u64>,
    padding: String,
    publishers: u64,
    drain_timeout: Duration,
    /// Publishers may block their thread while pacing (single publisher on
    /// the `block_on` thread of a multi-thread runtime).
    may_block: bool,
    meter: Option<AllocMeter>,
}

/// What one publisher did.
#[derive(Default)]
struct Published {
    events: u64,
    publish_calls_metered: u64,
    allocs: AllocCount,
}

/// Measures the allocations made while polling `future` on the polling
/// thread, adding them to `tally`.
async fn metered<F: Future>(meter: AllocMeter, tally: &mut AllocCount, future: F) -> F::Output {
    let mut future = pin!(future);
    std::future::poll_fn(|cx| {
        let mut out = None;
        let counted = (meter.measure)(&mut || out = Some(future.as_mut().poll(cx)));
        *tally += counted;
        out.unwrap_or(Poll::Pending)
    })
    .await
}

/// Waits until `at` (nanos since [`base`]).
async fn pace(at: u64, may_block: bool) {
    loop {
        let now = now_nanos();
        if now >= at {
            return;
        }
        let left = Duration::from_nanos(at - now);
        if left > Duration::from_millis(2) {
            // The tokio timer has 1 ms resolution: sleep short of the mark.
            tokio::time::sleep(left - Duration::from_millis(1)).await;
        } else if may_block && left > Duration::from_micros(150) {
            // Alone on this thread: a thread sleep is finer than the timer
            // but overshoots by some 50 us (timer slack): spin the rest.
            std::thread::sleep(left - Duration::from_micros(100));
        } else if may_block {
            std::thread::yield_now();
        } else {
            tokio::task::yield_now().await;
        }
    }
}

/// One publisher: events `first, first + stride, ...` of the step.
async fn publish_share(
    ctx: &Ctx,
    step: Step,
    first: u64,
    start: u64,
    end: Option<u64>,
    seq_base: u64,
) -> Result<Published, HarnessError> {
    let mut out = Published::default();
    let mut i = first;
    loop {
        if ctx.shared.interrupted.load(Relaxed) {
            return Err(HarnessError::new("interrupted"));
        }
        if let Amount::Events(n) = step.amount {
            if i >= n {
                break;
            }
        }
        let sent_at = match step.rate {
            Some(rate) => {
                let at = start + (i as f64 * 1e9 / rate) as u64;
                if end.is_some_and(|end| at >= end) {
                    break;
                }
                pace(at, ctx.may_block).await;
                at
            }
            None => {
                let now = now_nanos();
                if end.is_some_and(|end| now >= end) {
                    break;
                }
                now
            }
        };
        let seq = seq_base + i;
        let build = || {
            let event = LoadEvent {
                seq,
                sent_at_nanos: sent_at,
                padding: ctx.padding.clone(),
            };
            let options = ctx
                .keys
                .map(|space| PublishOptions::new().key(format!("k{}", seq % space)));
            (event, options)
        };
        // The harness's own allocations are not the bus's: not counted.
        let (event, options) = match ctx.meter {
            Some(meter) => {
                let mut built = None;
                (meter.opt_out)(&mut || built = Some(build()));
                built.unwrap_or_else(build)
            }
            None => build(),
        };
        let publishing = async {
            match options {
                Some(options) => ctx.publisher.publish_with(event, options).await,
                None => ctx.publisher.publish(event).await,
            }
        };
        let result = match ctx.meter {
            Some(meter) => {
                out.publish_calls_metered += 1;
                metered(meter, &mut out.allocs, publishing).await
            }
            None => publishing.await,
        };
        result.map_err(|e| HarnessError::new(format!("publish of event {seq} failed: {e}")))?;
        out.events += 1;
        ctx.shared.published.fetch_add(1, Relaxed);
        i += ctx.publishers;
    }
    Ok(out)
}

/// What a step measured, before it becomes a [`RunResult`].
struct Outcome {
    events: u64,
    expected: u64,
    deliveries: u64,
    publish_secs: f64,
    elapsed_secs: f64,
    latency: Histogram<u64>,
    publish_allocs: Option<(u64, AllocCount)>,
}

async fn run_step(ctx: Arc<Ctx>, step: Step, seq_base: u64) -> Result<Outcome, HarnessError> {
    let shared = &ctx.shared;
    let before = shared.handled.load(Acquire);
    let start = now_nanos();
    let end = match step.amount {
        Amount::For(d) => Some(start + d.as_nanos() as u64),
        Amount::Events(_) => None,
    };
    let shares: Vec<Result<Published, HarnessError>> = if ctx.publishers == 1 {
        vec![publish_share(&ctx, step, 0, start, end, seq_base).await]
    } else {
        let tasks: Vec<_> = (0..ctx.publishers)
            .map(|p| {
                let ctx = ctx.clone();
                tokio::spawn(
                    async move { publish_share(&ctx, step, p, start, end, seq_base).await },
                )
            })
            .collect();
        let mut shares = Vec::new();
        for task in tasks {
            shares.push(
                task.await
                    .unwrap_or_else(|e| Err(HarnessError::new(format!("publisher task: {e}")))),
            );
        }
        shares
    };
    let publish_end = now_nanos();
    let mut total = Published::default();
    for share in shares {
        let share = share?;
        total.events += share.events;
        total.publish_calls_metered += share.publish_calls_metered;
        total.allocs += share.allocs;
    }
    let expected = total.events * ctx.modules;
    shared
        .wait_for(before + expected, ctx.drain_timeout)
        .await?;
    let deliveries = shared.handled.load(Acquire) - before;
    let last = shared.last_nanos.load(Acquire).max(publish_end);
    Ok(Outcome {
        events: total.events,
        expected,
        deliveries,
        publish_secs: (publish_end - start) as f64 / 1e9,
        elapsed_secs: (last - start) as f64 / 1e9,
        latency: shared.take_latency()?,
        publish_allocs: ctx
            .meter
            .map(|_| (total.publish_calls_metered, total.allocs)),
    })
}

/// Subscribes the `m0 .. m{n-1}` modules, each its own group.
async fn subscribe(bus: &Bus, options: &Options, shared: &Arc<Shared>) -> Result<(), HarnessError> {
    for m in 0..options.modules as usize {
        let shared = shared.clone();
        let subscription = bus
            .module(format!("m{m}"))
            .subscribe(move |event: Received<LoadEvent>, _ctx: Context| {
                shared.hit(m, &event);
                std::future::ready(Ok::<(), HandlerError>(()))
            })
            .concurrency(options.concurrency as usize)
            .ordering(match options.keys {
                Keys::On => seambus::Ordering::ByKey,
                Keys::Off => seambus::Ordering::Unordered,
            })
            .dispatch(match options.dispatch {
                DispatchMode::Queued => Dispatch::Queued,
                DispatchMode::Inline => Dispatch::Inline,
            })
            .await;
        subscription.map_err(|e| HarnessError::from(e).context(&format!("subscribe m{m}")))?;
    }
    Ok(())
}

/// Peak resident set size of the process (VmHWM), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Resets the kernel's peak RSS to the current RSS (Linux, best effort).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn progress_bar(options: &Options, length: Option<u64>, label: &str) -> ProgressBar {
    if options.quiet || !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match length {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::no_length(),
    };
    let template = match length {
        Some(_) => "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} deliveries, {msg}",
        None => "{spinner} {elapsed_precise} {pos} deliveries, {msg}",
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(label.to_owned());
    bar
}

/// Keeps a progress bar up to date from another thread (so the counted
/// thread does no drawing) until dropped.
struct Tracker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Tracker {
    fn start(bar: ProgressBar, shared: &Arc<Shared>, from: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = (!bar.is_hidden()).then(|| {
            let (stop, shared) = (stop.clone(), shared.clone());
            std::thread::spawn(move || {
                while !stop.load(Acquire) {
                    bar.set_position(shared.handled.load(Relaxed).saturating_sub(from));
                    bar.tick();
                    std::thread::sleep(Duration::from_millis(50));
                }
                bar.finish_and_clear();
            })
        });
        Self { stop, thread }
    }
}

impl Drop for Tracker {
    /// Stops the thread and waits until the bar is cleared.
    fn drop(&mut self) {
        self.stop.store(true, Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn runtime(workers: Option<usize>) -> Result<tokio::runtime::Runtime, HarnessError> {
    let mut builder = match workers {
        Some(0) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder
        .enable_all()
        .build()
        .map_err(|e| HarnessError::new(format!("cannot start the tokio runtime: {e}")))
}

/// Runs the plan that `options` describe and returns what it measured.
///
/// Blocking: it starts its own tokio runtime, so call it outside one. With
/// `alloc_meter`, heap allocations are counted: those made while polling
/// each `publish` call (on the polling thread) and, with `--workers 0`,
/// those of the runtime's only thread during each run (the harness's
/// building of events and keys excepted). Without it, the allocation
/// fields are `None`. Ctrl-C stops the run; the broker state is
/// deleted either way.
pub fn run(options: &Options, alloc_meter: Option<AllocMeter>) -> Result<Report, HarnessError> {
    let steps = options.plan()?;
    let rt = runtime(options.workers)?;
    base();
    let id = broker::run_id();
    let modules = options.modules as usize;
    let shared = Arc::new(Shared {
        handled: AtomicU64::new(0),
        target: AtomicU64::new(u64::MAX),
        last_nanos: AtomicU64::new(0),
        published: AtomicU64::new(0),
        interrupted: AtomicBool::new(false),
        notify: Notify::new(),
        latency: (0..modules)
            .map(|_| histogram().map(Mutex::new))
            .collect::<Result<_, _>>()?,
    });
    let (bus, cleanup) = rt.block_on(async {
        let (bus, cleanup) = broker::bus(options, &id).await?;
        match subscribe(&bus, options, &shared).await {
            Ok(()) => Ok((bus, cleanup)),
            Err(e) => {
                let _ = bus.shutdown(Duration::from_secs(5)).await;
                cleanup.run().await;
                Err(e)
            }
        }
    })?;
    {
        let shared = shared.clone();
        rt.spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("seambus-bench: interrupted; cleaning up");
                shared.interrupted.store(true, Release);
                shared.notify.notify_one();
            }
        });
    }
    let current_thread = options.workers == Some(0);
    let ctx = Arc::new(Ctx {
        shared: shared.clone(),
        publisher: bus.module("bench"),
        modules: modules as u64,
        keys: (options.keys == Keys::On).then_some(options.key_space),
        padding: "x".repeat(options.payload_size as usize),
        publishers: u64::from(options.publishers),
        drain_timeout: options.drain_timeout,
        may_block: options.publishers == 1 && !current_thread,
        meter: alloc_meter,
    });
    let measured = measure_all(&rt, options, &ctx, &steps, current_thread);
    rt.block_on(async {
        if let Err(e) = bus.shutdown(Duration::from_secs(10)).await {
            eprintln!("seambus-bench: warning: shutdown: {e}");
        }
        cleanup.run().await;
    });
    drop(rt);
    let runs = measured?;
    Ok(Report::new(Settings::of(options, &rt_label(options)), runs))
}

fn rt_label(options: &Options) -> String {
    match options.workers {
        Some(0) => "current-thread".to_owned(),
        Some(n) => format!("multi-thread, {n} workers"),
        None => format!(
            "multi-thread, {} workers",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
    }
}

/// Warm-up, then every step in turn.
fn measure_all(
    rt: &tokio::runtime::Runtime,
    options: &Options,
    ctx: &Arc<Ctx>,
    steps: &[Step],
    current_thread: bool,
) -> Result<Vec<RunResult>, HarnessError> {
    let shared = &ctx.shared;
    if options.warmup > 0 {
        let warmup = Step {
            rate: None,
            amount: Amount::Events(options.warmup),
        };
        let bar = progress_bar(options, Some(options.warmup * ctx.modules), "warming up");
        let tracker = Tracker::start(bar, shared, 0);
        let warm = ctx.clone();
        let result = rt.block_on(async move {
            let warm_ctx = Ctx {
                shared: warm.shared.clone(),
                publisher: warm.publisher.clone(),
                modules: warm.modules,
                keys: warm.keys,
                padding: warm.padding.clone(),
                publishers: 1,
                drain_timeout: warm.drain_timeout,
                may_block: false,
                meter: None,
            };
            run_step(Arc::new(warm_ctx), warmup, 0).await
        });
        drop(tracker);
        result.map_err(|e| e.context("warm-up"))?;
    }
    let mut runs = Vec::new();
    let mut seq_base = options.warmup;
    for step in steps {
        let label = match step.rate {
            Some(rate) => format!("open loop at {rate} events/s"),
            None => "closed loop".to_owned(),
        };
        let length = match (step.amount, step.rate) {
            (Amount::Events(n), _) => Some(n * ctx.modules),
            (Amount::For(d), Some(rate)) => {
                Some((d.as_secs_f64() * rate).ceil() as u64 * ctx.modules)
            }
            (Amount::For(_), None) => None,
        };
        let from = shared.handled.load(Acquire);
        let bar = progress_bar(options, length, &label);
        let tracker = Tracker::start(bar, shared, from);
        let rss_reset = reset_peak_rss();
        let (outcome, thread_allocs) = match (ctx.meter, current_thread) {
            (Some(meter), true) => {
                let mut out = None;
                let counted = (meter.measure)(&mut || {
                    out = Some(rt.block_on(run_step(ctx.clone(), *step, seq_base)));
                });
                let outcome = out.unwrap_or_else(|| Err(HarnessError::new("the run did not run")));
                (outcome, Some(counted))
            }
            _ => (rt.block_on(run_step(ctx.clone(), *step, seq_base)), None),
        };
        drop(tracker);
        let outcome = outcome.map_err(|e| e.context(&label))?;
        seq_base += outcome.events;
        runs.push(result_of(*step, outcome, thread_allocs, rss_reset));
    }
    Ok(runs)
}

fn result_of(
    step: Step,
    o: Outcome,
    thread_allocs: Option<AllocCount>,
    rss_reset: bool,
) -> RunResult {
    let per = |total: u64, n: u64| (n > 0).then(|| total as f64 / n as f64);
    let h = &o.latency;
    let us = |nanos: u64| nanos as f64 / 1e3;
    RunResult {
        mode: if step.rate.is_some() {
            "open"
        } else {
            "closed"
        }
        .to_owned(),
        offered_rate: step.rate,
        events: o.events,
        expected_deliveries: o.expected,
        deliveries: o.deliveries,
        publish_secs: o.publish_secs,
        elapsed_secs: o.elapsed_secs,
        events_per_sec: per_sec(o.events, o.publish_secs),
        deliveries_per_sec: per_sec(o.deliveries, o.elapsed_secs),
        latency_us: Latency {
            count: h.len(),
            p50: us(h.value_at_quantile(0.5)),
            p90: us(h.value_at_quantile(0.9)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
            mean: h.mean() / 1e3,
        },
        allocs_per_publish: o.publish_allocs.and_then(|(n, a)| per(a.count, n)),
        alloc_bytes_per_publish: o.publish_allocs.and_then(|(n, a)| per(a.bytes, n)),
        allocs_per_event: thread_allocs.and_then(|a| per(a.count, o.events)),
        peak_rss_mib: peak_rss().map(|b| b as f64 / (1024.0 * 1024.0)),
        peak_rss_since_start_of_run: rss_reset,
    }
}

fn per_sec(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}
