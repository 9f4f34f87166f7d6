//! The load-simulation harness behind the `seambus-bench` binary.
//!
//! It publishes a stream of [`LoadEvent`]s from one module to `--modules`
//! subscribing modules (one group each) over the chosen transport, closed
//! loop (as fast as `publish` returns) or open loop at fixed offered rates,
//! and measures throughput, end-to-end latency per delivery, heap
//! allocations per publish and peak RSS. [`run`] measures and returns a
//! [`Report`]; [`emit`] prints the table and writes the JSON and the chart.
//!
//! ```no_run
//! use clap::Parser;
//! use seambus_benches::harness::{self, Options};
//!
//! let options = Options::parse_from(["seambus-bench", "--quick"]);
//! let report = harness::run(&options, None)?; // no allocation counts
//! harness::emit(&report, &options)?;
//! # Ok::<(), harness::HarnessError>(())
//! ```

mod broker;
mod chart;
mod options;
mod report;
mod run;

use std::fmt;

pub use broker::unavailable;
pub use chart::write_chart;
pub use options::{DispatchMode, Keys, Options, TransportKind};
pub use report::{emit, Latency, Report, RunResult, Settings};
pub use run::{run, AllocCount, AllocMeter};

/// The event the harness publishes (owned by module `bench`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, seambus::Event)]
#[event(name = "bench.load", version = 1)]
pub struct LoadEvent {
    /// Sequence number within a run.
    pub seq: u64,
    /// When the event was (or, open loop, should have been) sent:
    /// nanoseconds since the harness's time base in this process.
    pub sent_at_nanos: u64,
    /// Filler, `--payload-size` bytes long.
    pub padding: String,
}

/// Why a run failed: a broker that does not answer, a publish that failed,
/// deliveries that did not arrive in time, an output that could not be
/// written. Never a panic.
#[derive(Debug)]
pub struct HarnessError {
    message: String,
}

impl HarnessError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// Adds what was being done in front of the message.
    pub(crate) fn context(self, what: &str) -> Self {
        Self::new(format!("{what}: {}", self.message))
    }
}

impl fmt::Display for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HarnessError {}

impl From<seambus::Error> for HarnessError {
    fn from(e: seambus::Error) -> Self {
        Self::new(e.to_string())
    }
}
