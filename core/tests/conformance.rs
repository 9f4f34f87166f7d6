//! The conformance suite against the in-process transport (a
//! `harness = false` test target: one test per case, cases that do not
//! apply reported ignored).
//!
//! A harness returns one transport per namespace, so the two "processes" of
//! the group cases share it (in-process events live in one process).

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use seambus::conformance::{Harness, Suite};
use seambus::transport::Transport;
use seambus::{InProcessConfig, InProcessTransport};

#[derive(Default)]
struct InProcess {
    by_namespace: Mutex<HashMap<String, Arc<dyn Transport>>>,
}

#[async_trait::async_trait]
impl Harness for InProcess {
    async fn transport(&self, namespace: &str) -> Arc<dyn Transport> {
        self.by_namespace
            .lock()
            .unwrap()
            .entry(namespace.to_owned())
            .or_insert_with(|| {
                Arc::new(InProcessTransport::new(
                    InProcessConfig::default().with_queue_capacity(256),
                ))
            })
            .clone()
    }
}

fn main() -> ExitCode {
    Suite::new(InProcess::default())
        // `run_all`, the entry point that runs every applicable case in turn.
        .with_test("run_all_entry_point", |h| {
            Box::pin(seambus::conformance::run_all(h))
        })
        .run()
}
