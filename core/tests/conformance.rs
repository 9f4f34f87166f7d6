//! The conformance suite against the in-process transport.
//!
//! A harness returns one transport per namespace, so the two "processes" of
//! the group cases share it (in-process events live in one process).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use seambus::conformance::Harness;
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

seambus::conformance_tests!(InProcess::default());

#[test]
fn run_all_entry_point() {
    seambus::conformance::block_on(async {
        seambus::conformance::run_all(&InProcess::default()).await;
    });
}
