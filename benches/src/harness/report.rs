//! What a harness run reports: the JSON document, the human table, and
//! where they go.

use std::fmt::Write as _;
use std::io::Write as _;

use serde::{Deserialize, Serialize};

use super::{broker, write_chart, DispatchMode, HarnessError, Keys, Options, TransportKind};

/// Everything one `seambus-bench` invocation measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `seambus-bench`.
    pub tool: String,
    /// Version of the harness.
    pub version: String,
    /// What was simulated.
    pub settings: Settings,
    /// One result per run (closed loop, or one per offered rate).
    pub runs: Vec<RunResult>,
    /// What each measure means exactly.
    pub definitions: Vec<String>,
}

/// The simulated flow, the same for every run of a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// `in-process`, `nats`, `rabbitmq` or `kafka`.
    pub transport: TransportKind,
    /// Broker address (passwords redacted); none in-process.
    pub broker: Option<String>,
    /// Queued or inline (inline only in-process).
    pub dispatch: DispatchMode,
    /// Bytes of padding per event.
    pub payload_size: u64,
    /// Subscribing modules (groups); each gets every event.
    pub modules: u32,
    /// Concurrency of each group.
    pub concurrency: u32,
    /// Distinct partition keys, or none when published without keys
    /// (unordered subscriptions).
    pub key_space: Option<u64>,
    /// Publishing tasks.
    pub publishers: u32,
    /// The tokio runtime.
    pub runtime: String,
    /// Events published and awaited before measuring.
    pub warmup: u64,
}

impl Settings {
    pub(crate) fn of(options: &Options, runtime: &str) -> Self {
        Self {
            transport: options.transport,
            broker: broker::broker_address(options),
            dispatch: options.dispatch,
            payload_size: options.payload_size,
            modules: options.modules,
            concurrency: options.concurrency,
            key_space: (options.keys == Keys::On).then_some(options.key_space),
            publishers: options.publishers,
            runtime: runtime.to_owned(),
            warmup: options.warmup,
        }
    }
}

/// One run: closed loop, or open loop at one offered rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// `closed` (publish as fast as `publish` returns) or `open` (fixed
    /// offered rate).
    pub mode: String,
    /// Offered rate in events/s (open loop).
    pub offered_rate: Option<f64>,
    /// Events published.
    pub events: u64,
    /// `events × modules`.
    pub expected_deliveries: u64,
    /// Deliveries handled (more than expected only if a broker redelivered).
    pub deliveries: u64,
    /// From the first scheduled send to the return of the last `publish`.
    pub publish_secs: f64,
    /// From the first scheduled send to the last delivery handled.
    pub elapsed_secs: f64,
    /// `events / publish_secs`.
    pub events_per_sec: f64,
    /// `deliveries / elapsed_secs`.
    pub deliveries_per_sec: f64,
    /// End-to-end latency per delivery, in microseconds.
    pub latency_us: Latency,
    /// Heap allocations made while polling one `publish` call, on average
    /// (none when not counted).
    pub allocs_per_publish: Option<f64>,
    /// Bytes allocated while polling one `publish` call, on average.
    pub alloc_bytes_per_publish: Option<f64>,
    /// Heap allocations of the runtime's thread during the run, per event,
    /// the harness's building of events and keys excepted: only with
    /// `--workers 0` (everything on one thread).
    pub allocs_per_event: Option<f64>,
    /// Peak resident set size (VmHWM) in MiB.
    pub peak_rss_mib: Option<f64>,
    /// Whether the peak was reset at the start of this run (otherwise it is
    /// the process's peak so far).
    pub peak_rss_since_start_of_run: bool,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Deliveries recorded.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Report {
    pub(crate) fn new(settings: Settings, runs: Vec<RunResult>) -> Self {
        let definitions = [
            "latency: from the time an event was sent (closed loop: just before publish; open loop: its scheduled send time, so a late publisher counts against latency) to the start of its handler, per delivery, all modules merged; hdrhistogram, 3 significant digits",
            "events_per_sec: events published / time from the first scheduled send to the return of the last publish",
            "deliveries_per_sec: deliveries handled (events x modules) / time from the first scheduled send to the last delivery handled",
            "allocs_per_publish: heap allocations counted by allocation-counter while polling the publish future on the polling thread, averaged over every measured publish; building the event and the key is excluded; work done by other tasks or threads (queued handlers, broker client I/O tasks, librdkafka's C threads, which do not use the Rust allocator) is not in it; inline dispatch runs the handlers inside publish, so theirs is",
            "allocs_per_event: with --workers 0 only, the heap allocations of the runtime's single thread during the run (publishing, queueing, handling, the broker client's tasks) / events published, except the harness building events and keys; threads outside the runtime (librdkafka's, blocking-pool tasks) are not counted",
            "peak_rss_mib: VmHWM of the process from /proc/self/status, reset at the start of each run when /proc/self/clear_refs allows",
        ]
        .map(str::to_owned)
        .to_vec();
        Self {
            tool: "seambus-bench".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            settings,
            runs,
            definitions,
        }
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> Result<String, HarnessError> {
        serde_json::to_string_pretty(self).map_err(|e| HarnessError::new(format!("JSON: {e}")))
    }

    /// The human table: one row per run.
    pub fn table(&self) -> String {
        let s = &self.settings;
        let mut out = String::new();
        let keys = s
            .key_space
            .map_or("no keys (unordered)".to_owned(), |k| format!("{k} keys"));
        let _ = writeln!(
            out,
            "seambus-bench: {}{}, {} dispatch, {} B payload, {} module(s) x concurrency {}, {}, {} publisher(s), {} runtime",
            s.transport.as_str(),
            s.broker.as_ref().map_or(String::new(), |b| format!(" ({b})")),
            match s.dispatch {
                DispatchMode::Queued => "queued",
                DispatchMode::Inline => "inline",
            },
            s.payload_size,
            s.modules,
            s.concurrency,
            keys,
            s.publishers,
            s.runtime,
        );
        let header = [
            "transport",
            "rate/s",
            "events",
            "events/s",
            "deliv/s",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "max",
            "allocs/pub",
            "allocs/ev",
            "RSS MiB",
        ];
        let mut rows = vec![header.map(str::to_owned).to_vec()];
        for r in &self.runs {
            let l = &r.latency_us;
            rows.push(vec![
                s.transport.as_str().to_owned(),
                r.offered_rate
                    .map_or("closed".to_owned(), |x| format!("{x:.0}")),
                r.events.to_string(),
                format!("{:.0}", r.events_per_sec),
                format!("{:.0}", r.deliveries_per_sec),
                micros(l.p50),
                micros(l.p90),
                micros(l.p99),
                micros(l.p999),
                micros(l.max),
                r.allocs_per_publish
                    .map_or("-".to_owned(), |a| format!("{a:.1}")),
                r.allocs_per_event
                    .map_or("-".to_owned(), |a| format!("{a:.1}")),
                r.peak_rss_mib.map_or("-".to_owned(), |m| format!("{m:.1}")),
            ]);
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        for row in &rows {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(c, (cell, w))| {
                    if c == 0 {
                        format!("{cell:<w$}")
                    } else {
                        format!("{cell:>w$}")
                    }
                })
                .collect();
            let _ = writeln!(out, "{}", cells.join("  "));
        }
        for r in &self.runs {
            if r.deliveries != r.expected_deliveries {
                let _ = writeln!(
                    out,
                    "note: {} deliveries for {} expected at rate {} (broker redeliveries)",
                    r.deliveries,
                    r.expected_deliveries,
                    r.offered_rate
                        .map_or("closed".to_owned(), |x| format!("{x:.0}"))
                );
            }
        }
        if self.runs.iter().any(|r| r.allocs_per_publish.is_some()) {
            let _ = writeln!(
                out,
                "allocs/pub: heap allocations while polling one publish call (on its thread; event and key built beforehand); allocs/ev: allocations of the single runtime thread per event, harness excepted (--workers 0 only)"
            );
        }
        out
    }
}

/// `12.3µs`, `1.52ms`, `2.10s`.
fn micros(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.1}µs")
    } else if us < 1_000_000.0 {
        format!("{:.2}ms", us / 1e3)
    } else {
        format!("{:.2}s", us / 1e6)
    }
}

/// Prints the table (stdout; stderr when the JSON goes to stdout), writes
/// the JSON (`--json`) and the chart (`--chart`).
pub fn emit(report: &Report, options: &Options) -> Result<(), HarnessError> {
    let table = report.table();
    match options.json.as_deref() {
        Some("-") => {
            eprint!("{table}");
            let json = report.to_json()?;
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "{json}")
                .and_then(|()| stdout.flush())
                .map_err(|e| HarnessError::new(format!("cannot write the JSON to stdout: {e}")))?;
        }
        Some(path) => {
            print!("{table}");
            let json = report.to_json()?;
            let dir = std::path::Path::new(path).parent();
            if let Some(dir) = dir.filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| {
                    HarnessError::new(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
            std::fs::write(path, json + "\n")
                .map_err(|e| HarnessError::new(format!("cannot write {path}: {e}")))?;
        }
        None => print!("{table}"),
    }
    if let Some(path) = &options.chart {
        write_chart(report, path)?;
    }
    Ok(())
}
