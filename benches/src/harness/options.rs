//! Command-line options of `seambus-bench`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use super::HarnessError;

/// Load simulation of a Seambus flow: publishes events from one module to
/// `--modules` subscribing modules over a transport and reports throughput,
/// end-to-end latency percentiles, allocations per publish and peak RSS.
/// Use it to see when a flow should climb from in-process to a broker.
#[derive(Debug, Clone, Parser)]
#[command(name = "seambus-bench", version)]
pub struct Options {
    /// Transport that carries the events.
    #[arg(long, value_enum, default_value_t = TransportKind::InProcess)]
    pub transport: TransportKind,

    /// NATS server URL (for `--transport nats`).
    #[arg(
        long,
        env = "SEAMBUS_TEST_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,

    /// RabbitMQ URI (for `--transport rabbitmq`).
    #[arg(
        long,
        env = "SEAMBUS_TEST_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: String,

    /// Kafka bootstrap servers (for `--transport kafka`).
    #[arg(
        long,
        env = "SEAMBUS_TEST_KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    pub kafka_brokers: String,

    /// Events per run (per offered rate in a sweep). Default: 100000 closed
    /// loop; open loop runs 5 s instead (`--quick`: 2000 events, 0.3 s).
    #[arg(long, conflicts_with = "duration", value_parser = clap::value_parser!(u64).range(1..))]
    pub events: Option<u64>,

    /// How long each run publishes, e.g. `10s`, `500ms`, `2m`.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Bytes of padding in each event (its JSON encoding on a broker is
    /// about 60 bytes more).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=16_777_216))]
    pub payload_size: u64,

    /// Subscribing modules; each is its own group and gets every event.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub modules: u32,

    /// Events each group handles at once (the subscription's concurrency).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency: u32,

    /// Partition keys: `on` publishes each event with a key (per-key order
    /// applies); `off` publishes without and subscribes unordered.
    #[arg(long, value_enum, default_value_t = Keys::Off)]
    pub keys: Keys,

    /// Distinct partition keys cycled through with `--keys on`.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub key_space: u64,

    /// In-process dispatch: `queued` (handlers on their own workers) or
    /// `inline` (the publisher runs the handlers inside `publish`).
    #[arg(long, value_enum, default_value_t = DispatchMode::Queued)]
    pub dispatch: DispatchMode,

    /// Open loop at this offered rate (events/s): sends are scheduled at
    /// fixed intervals and latency counts from the scheduled time. Without
    /// `--rate` or `--sweep` the run is closed loop.
    #[arg(long, conflicts_with = "sweep", value_parser = parse_rate)]
    pub rate: Option<f64>,

    /// Open-loop runs at several offered rates, one after another, e.g.
    /// `1000,5000,20000` (for the chart).
    #[arg(long, value_delimiter = ',', value_parser = parse_rate)]
    pub sweep: Option<Vec<f64>>,

    /// Publishing tasks (events are dealt round-robin; open loop, each
    /// keeps its share of the schedule).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub publishers: u32,

    /// Tokio worker threads (default: one per CPU). `0` runs everything on
    /// one current-thread runtime, which also makes allocations per event
    /// countable.
    #[arg(long)]
    pub workers: Option<usize>,

    /// Events published and awaited before measuring (consumers attached,
    /// connections warm); not reported.
    #[arg(long, default_value_t = 100)]
    pub warmup: u64,

    /// How long to wait for the last deliveries after the last publish.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Write the report as JSON to this file (`-`: stdout; the table then
    /// goes to stderr).
    #[arg(long)]
    pub json: Option<String>,

    /// Write an SVG chart of latency percentiles against offered rate.
    #[arg(long)]
    pub chart: Option<PathBuf>,

    /// A tiny run for smoke tests: 2000 events closed loop, then a sweep of
    /// 0.3 s at 1000, 2000 and 5000 events/s (explicit options win).
    #[arg(long)]
    pub quick: bool,

    /// No progress bar (it is also hidden when stdout is not a terminal).
    #[arg(long, short)]
    pub quiet: bool,
}

/// Which transport carries the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransportKind {
    /// The in-process transport (no broker).
    InProcess,
    /// NATS JetStream.
    Nats,
    /// RabbitMQ.
    Rabbitmq,
    /// Kafka (or any broker speaking its protocol).
    Kafka,
}

impl TransportKind {
    /// The name used in the table and the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InProcess => "in-process",
            Self::Nats => "nats",
            Self::Rabbitmq => "rabbitmq",
            Self::Kafka => "kafka",
        }
    }
}

/// Partition keys on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Keys {
    /// Every event has a key; subscriptions keep per-key order.
    On,
    /// No keys; subscriptions are unordered.
    Off,
}

/// Dispatch of the in-process transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DispatchMode {
    /// Handlers run on the transport's workers.
    Queued,
    /// Handlers run inside `publish`.
    Inline,
}

/// How much one run publishes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Amount {
    Events(u64),
    For(Duration),
}

/// One run of the plan: closed loop or open loop at a rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Step {
    pub(crate) rate: Option<f64>,
    pub(crate) amount: Amount,
}

impl Options {
    /// Checks what clap cannot, and lists the runs.
    pub(crate) fn plan(&self) -> Result<Vec<Step>, HarnessError> {
        if self.dispatch == DispatchMode::Inline && self.transport != TransportKind::InProcess {
            return Err(HarnessError::new(format!(
                "--dispatch inline needs --transport in-process (a broker always queues); got --transport {}",
                self.transport.as_str()
            )));
        }
        let rates: Vec<f64> = match (&self.sweep, self.rate) {
            (Some(sweep), _) => sweep.clone(),
            (None, Some(rate)) => vec![rate],
            (None, None) if self.quick => vec![1000.0, 2000.0, 5000.0],
            (None, None) => Vec::new(),
        };
        let closed_amount = match (self.events, self.duration) {
            (Some(n), _) => Amount::Events(n),
            (None, Some(d)) => Amount::For(d),
            (None, None) if self.quick => Amount::Events(2000),
            (None, None) => Amount::Events(100_000),
        };
        let open_amount = match (self.events, self.duration) {
            (Some(n), _) => Amount::Events(n),
            (None, Some(d)) => Amount::For(d),
            (None, None) if self.quick => Amount::For(Duration::from_millis(300)),
            (None, None) => Amount::For(Duration::from_secs(5)),
        };
        let mut steps = Vec::new();
        if rates.is_empty() || (self.quick && self.sweep.is_none() && self.rate.is_none()) {
            steps.push(Step {
                rate: None,
                amount: closed_amount,
            });
        }
        steps.extend(rates.into_iter().map(|rate| Step {
            rate: Some(rate),
            amount: open_amount,
        }));
        Ok(steps)
    }
}

/// `10s`, `500ms`, `2m`, `1.5s`, `250us`; a bare number is seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (try 10s, 500ms, 2m)"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown unit `{other}` (use ms, s, m or h)")),
    };
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(format!("`{text}`: the duration must be positive"));
    }
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("`{text}`: {e}"))
}

/// A positive, finite rate in events per second.
pub(crate) fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a rate in events/s"))?;
    if rate.is_finite() && rate > 0.0 && rate <= 1e9 {
        Ok(rate)
    } else {
        Err(format!(
            "`{text}`: the rate must be above 0 and at most 1e9"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("3 days").is_err());
    }

    #[test]
    fn plans() {
        let plan = |args: &[&str]| {
            let mut all = vec!["seambus-bench"];
            all.extend_from_slice(args);
            Options::try_parse_from(all).unwrap().plan().unwrap()
        };
        assert_eq!(
            plan(&[]),
            [Step {
                rate: None,
                amount: Amount::Events(100_000)
            }]
        );
        let quick = plan(&["--quick"]);
        assert_eq!(quick.len(), 4);
        assert_eq!(quick[0].rate, None);
        let sweep = plan(&["--sweep", "10,20", "--events", "7"]);
        assert_eq!(
            sweep,
            [
                Step {
                    rate: Some(10.0),
                    amount: Amount::Events(7)
                },
                Step {
                    rate: Some(20.0),
                    amount: Amount::Events(7)
                }
            ]
        );
        assert!(Options::try_parse_from(["x", "--rate", "0"]).is_err());
        assert!(Options::try_parse_from(["x", "--events", "5", "--duration", "1s"]).is_err());
        assert!(
            Options::try_parse_from(["x", "--transport", "nats", "--dispatch", "inline"])
                .unwrap()
                .plan()
                .is_err()
        );
    }
}
