//! `seambus-bench`: load simulation of a Seambus flow, in-process or over a
//! broker. Run with
//! `cargo run --release -p seambus-benches --bin seambus-bench -- --help`.

use std::process::ExitCode;

use clap::Parser;
use seambus_benches::harness::{self, AllocCount, AllocMeter, Options};

/// Counts the current thread's heap allocations while `f` runs, with the
/// counting global allocator that `allocation-counter` installs in this
/// binary.
fn count_allocations(f: &mut dyn FnMut()) -> AllocCount {
    let info = allocation_counter::measure(f);
    AllocCount {
        count: info.count_total,
        bytes: info.bytes_total,
    }
}

/// Runs `f` without counting its allocations.
fn not_counted(f: &mut dyn FnMut()) {
    allocation_counter::opt_out(f);
}

fn main() -> ExitCode {
    let options = Options::parse();
    let meter = AllocMeter {
        measure: count_allocations,
        opt_out: not_counted,
    };
    let outcome =
        harness::run(&options, Some(meter)).and_then(|report| harness::emit(&report, &options));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("seambus-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}
