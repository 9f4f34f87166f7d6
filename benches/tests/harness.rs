//! The `seambus-bench` harness run as a library: a quick in-process run with
//! its JSON and chart, a current-thread run that counts every allocation,
//! a missing broker, and a small run against a real NATS server (skipped
//! when none answers, unless `SEAMBUS_REQUIRE_BROKERS=1`).

use std::path::PathBuf;

use clap::Parser;
use seambus_benches::harness::{self, AllocCount, AllocMeter, Options, Report, RunResult};

/// The counting allocator of `allocation-counter`, as the binary uses it.
const METER: AllocMeter = AllocMeter {
    measure: |f| {
        let info = allocation_counter::measure(f);
        AllocCount {
            count: info.count_total,
            bytes: info.bytes_total,
        }
    },
    opt_out: |f| allocation_counter::opt_out(f),
};

fn options(args: &[&str]) -> Options {
    let mut all = vec!["seambus-bench", "--quiet"];
    all.extend_from_slice(args);
    Options::try_parse_from(all).expect("valid options")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("seambus-bench-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// What must hold for every run, whatever the machine's speed.
fn check_run(run: &RunResult, modules: u64) {
    assert!(run.events > 0, "{run:?}");
    assert_eq!(run.expected_deliveries, run.events * modules, "{run:?}");
    assert_eq!(run.deliveries, run.expected_deliveries, "{run:?}");
    let l = &run.latency_us;
    assert_eq!(l.count, run.deliveries, "one latency per delivery: {run:?}");
    assert!(l.p50 > 0.0, "{l:?}");
    assert!(
        l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.p999 && l.p999 <= l.max,
        "percentiles not monotonic: {l:?}"
    );
    assert!(
        run.events_per_sec > 0.0 && run.deliveries_per_sec > 0.0,
        "{run:?}"
    );
    assert!(run.publish_secs <= run.elapsed_secs, "{run:?}");
    if let Some(rss) = run.peak_rss_mib {
        assert!(rss > 0.0);
    }
}

/// Broker reachable; otherwise skip with a message, or fail under
/// `SEAMBUS_REQUIRE_BROKERS=1` (as `seambus::conformance::broker_ready`).
fn broker_ready(options: &Options) -> bool {
    match harness::unavailable(options) {
        None => true,
        Some(why) if std::env::var("SEAMBUS_REQUIRE_BROKERS").is_ok_and(|v| v == "1") => {
            panic!("broker required (SEAMBUS_REQUIRE_BROKERS=1) but unavailable: {why}")
        }
        Some(why) => {
            eprintln!(
                "SKIPPED: broker unavailable: {why} (set SEAMBUS_REQUIRE_BROKERS=1 to fail instead)"
            );
            false
        }
    }
}

#[test]
fn quick_in_process_writes_table_json_and_chart() {
    let dir = scratch("quick");
    let json = dir.join("bench.json");
    let chart = dir.join("bench.svg");
    let options = options(&[
        "--quick",
        "--modules",
        "3",
        "--concurrency",
        "2",
        "--json",
        json.to_str().unwrap(),
        "--chart",
        chart.to_str().unwrap(),
    ]);
    let report = harness::run(&options, Some(METER)).expect("quick run");
    harness::emit(&report, &options).expect("outputs");

    // Closed loop, then the quick sweep of three rates.
    assert_eq!(report.runs.len(), 4);
    assert_eq!(report.runs[0].mode, "closed");
    assert_eq!(report.runs[0].offered_rate, None);
    let rates: Vec<f64> = report.runs[1..]
        .iter()
        .map(|r| r.offered_rate.expect("open loop"))
        .collect();
    assert_eq!(rates, [1000.0, 2000.0, 5000.0]);
    for run in &report.runs {
        check_run(run, 3);
        assert!(
            run.allocs_per_publish.is_some_and(f64::is_finite),
            "{run:?}"
        );
        assert_eq!(run.allocs_per_event, None, "only with --workers 0");
    }
    assert_eq!(report.runs[0].events, 2000);

    let back: Report = serde_json::from_str(&std::fs::read_to_string(&json).expect("JSON written"))
        .expect("JSON parses back");
    assert_eq!(back.runs.len(), report.runs.len());
    for (b, r) in back.runs.iter().zip(&report.runs) {
        assert_eq!(
            (b.events, b.deliveries, b.latency_us.count),
            (r.events, r.deliveries, r.latency_us.count)
        );
    }
    assert_eq!(back.settings, report.settings);
    // (Floats are not compared exactly: serde_json's parsing may differ in
    // the last bit.)
    for (b, r) in back.runs.iter().zip(&report.runs) {
        assert!((b.latency_us.p99 - r.latency_us.p99).abs() <= 1e-6 * r.latency_us.p99);
    }

    let svg = std::fs::read_to_string(&chart).expect("chart written");
    assert!(
        svg.contains("<svg"),
        "not an SVG: {}",
        &svg[..svg.len().min(200)]
    );
    assert!(svg.contains("p99.9"), "the legend names the percentiles");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn current_thread_counts_every_allocation() {
    let options = options(&[
        "--workers",
        "0",
        "--events",
        "500",
        "--warmup",
        "10",
        "--keys",
        "on",
        "--dispatch",
        "inline",
        "--modules",
        "2",
    ]);
    let report = harness::run(&options, Some(METER)).expect("run");
    assert_eq!(report.runs.len(), 1);
    let run = &report.runs[0];
    check_run(run, 2);
    assert_eq!(run.events, 500);
    let per_publish = run.allocs_per_publish.expect("counted");
    let per_event = run.allocs_per_event.expect("counted on one thread");
    // The thread's total contains every publish call's own allocations.
    assert!(
        per_event >= per_publish,
        "{per_event} per event < {per_publish} per publish"
    );
    assert_eq!(report.settings.key_space, Some(64));
    assert!(report.table().contains("in-process"));
}

#[test]
fn a_missing_broker_is_an_error_not_a_panic() {
    let options = options(&["--transport", "nats", "--nats-url", "nats://127.0.0.1:9"]);
    let error = harness::run(&options, None).expect_err("nothing listens on port 9");
    assert!(
        error
            .to_string()
            .contains("no NATS server answers at 127.0.0.1:9"),
        "{error}"
    );
}

#[test]
fn small_nats_run() {
    let dir = scratch("nats");
    let json = dir.join("nats.json");
    let options = options(&[
        "--transport",
        "nats",
        "--events",
        "300",
        "--warmup",
        "20",
        "--modules",
        "2",
        "--concurrency",
        "4",
        "--keys",
        "on",
        "--json",
        json.to_str().unwrap(),
    ]);
    if !broker_ready(&options) {
        return;
    }
    let report = harness::run(&options, Some(METER)).expect("NATS run");
    harness::emit(&report, &options).expect("outputs");
    assert_eq!(report.runs.len(), 1);
    let run = &report.runs[0];
    assert_eq!(run.events, 300);
    check_run(run, 2);
    let back: Report = serde_json::from_str(&std::fs::read_to_string(&json).expect("JSON written"))
        .expect("JSON parses back");
    assert_eq!(back.runs[0].deliveries, run.deliveries);
    assert_eq!(back.settings.broker, report.settings.broker);
    let _ = std::fs::remove_dir_all(dir);
}
