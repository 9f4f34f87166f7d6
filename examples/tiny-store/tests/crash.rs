//! A broker killed (SIGKILL, no clean shutdown) in the middle of a
//! multi-thousand-order run and started again: every order still ends
//! shipped or cancelled, nothing is dead-lettered, and the books (stock and
//! money) balance. One broker at a time; only a broker on this machine,
//! under `scripts/broker`'s control, is killed: the others are reported as
//! skipped.

mod common;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use libtest_mimic::{Arguments, Failed, Trial};
use tiny_store::simulate::{self, Plan, Progress};
use tiny_store::{Settings, Shop};

/// Orders per run, and how many are placed before the kill.
const ORDERS: usize = 2_000;
const KILL_AFTER: usize = 400;

/// How old the broker's queues are when the run starts. RabbitMQ 3.10.8
/// loses a quorum queue declared a moment before it is killed (it comes
/// back with no leader and refuses every publish:
/// `transports/rabbitmq/tests/broker_crash.rs` shows it with a raw
/// client), which no client can repair; queues that existed for a few
/// seconds recover. Nothing on the broker tells when that is, so the run
/// waits a fixed time after declaring.
fn settle(broker: &str) -> Duration {
    match broker {
        "rabbitmq" => Duration::from_secs(10),
        _ => Duration::ZERO,
    }
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let trials = ["nats", "rabbitmq", "kafka"]
        .into_iter()
        .map(|broker| {
            let settings = common::settings(&format!("crash_{broker}"), &format!("*={broker}"));
            let skip = why_not(broker);
            if let Some(why) = &skip {
                eprintln!("SKIPPED: {broker}_killed_mid_run: {why}");
            }
            Trial::test(format!("{broker}_killed_mid_run"), move || {
                killed_mid_run(broker, settings)
            })
            .with_ignored_flag(skip.is_some())
        })
        .collect();
    // One at a time: each kills a broker.
    let args = Arguments {
        test_threads: Some(1),
        ..args
    };
    libtest_mimic::run(&args, trials).exit_code()
}

/// Why this broker's run does not apply here, if it does not.
fn why_not(broker: &str) -> Option<String> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let remote = match broker {
        "nats" => env("SEAMBUS_TEST_NATS_URL"),
        "rabbitmq" => env("SEAMBUS_TEST_AMQP_URL"),
        _ => env("SEAMBUS_TEST_KAFKA_BROKERS"),
    };
    if let Some(remote) = remote {
        let remote = seambus::transport::support::redact_url(&remote);
        return Some(format!("{remote} is not a broker this test may kill"));
    }
    if broker == "kafka" {
        let dir = env("SEAMBUS_TANSU_DIR").unwrap_or_else(|| "/var/tmp/seambus-tansu".into());
        if !std::path::Path::new(&dir).join("tansu.pid").exists() {
            return Some("the local Kafka broker was not started by scripts/kafka-broker".into());
        }
    }
    (!common::broker_ready(broker)).then(|| format!("{broker} is not running"))
}

/// `scripts/broker ACTION BROKER`.
fn broker(action: &str, broker: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/broker");
    let status = std::process::Command::new(script)
        .args([action, broker])
        .status()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(
        status.success(),
        "scripts/broker {action} {broker}: {status}"
    );
}

/// Starts the broker again when dropped (a failed run included).
struct Restart(&'static str);

impl Drop for Restart {
    fn drop(&mut self) {
        broker("start", self.0);
    }
}

fn killed_mid_run(name: &'static str, settings: Settings) -> Result<(), Failed> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let shop = Arc::new(Shop::start(&settings).await?);
        let plan = Plan {
            timeout: Duration::from_secs(300),
            ..Plan::new(ORDERS)
        };
        let initial = simulate::seed(&shop, &plan).await?;
        tokio::time::sleep(settle(name)).await;
        let (placed, mut placed_rx) = tokio::sync::watch::channel(0);
        let run = tokio::spawn({
            let (shop, plan) = (shop.clone(), plan.clone());
            async move {
                simulate::run(&shop, &plan, move |p| {
                    if let Progress::Placed(n) = p {
                        placed.send_replace(n);
                    }
                })
                .await
                .map_err(|e| e.to_string())
            }
        });
        placed_rx.wait_for(|n| *n >= KILL_AFTER).await?;
        {
            let _restart = Restart(name);
            tokio::task::spawn_blocking(move || broker("kill", name)).await?;
        }
        let report = run.await??;
        let audit = simulate::audit(&shop, &initial, &report).await?;
        let summary = shop.summary();
        shop.shutdown(Duration::from_secs(10)).await?;
        shop.delete_broker_state().await?;
        if !report.all_settled() || !audit.problems.is_empty() {
            return Err(format!("after the kill: {:#?}\n{summary}", audit.problems).into());
        }
        for module in tiny_store::MODULES {
            let (handled, _, dead) = summary.totals(module);
            if handled == 0 || dead > 0 {
                return Err(format!("{module}: {handled} handled, {dead} dead\n{summary}").into());
            }
        }
        Ok::<_, Failed>(())
    })
}
