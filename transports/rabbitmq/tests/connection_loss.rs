//! The broker closes every connection while events flow (as an operator or
//! a network fault would); the transport reconnects, redeclares, resumes,
//! and every published id arrives. Alone in this binary.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use seambus::conformance::{block_on, Tally};
use seambus::{Bus, Context, HandlerError, Ordering, Received};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

#[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_placed")]
struct OrderPlaced {
    seq: u64,
}

#[test]
fn every_id_arrives_across_a_forced_connection_close() {
    if !common::local_broker_ready() {
        return;
    }
    block_on(async {
        let ns = seambus::conformance::namespace("connloss");
        let bus = Bus::builder()
            .transport("rabbitmq", common::transport(&ns).await)
            .build()
            .unwrap();
        let tally = Tally::new();
        let t = tally.clone();
        bus.module("billing")
            .subscribe(move |_e: Received<OrderPlaced>, ctx: Context| {
                let t = t.clone();
                async move {
                    t.record(ctx.envelope().id());
                    Ok::<(), HandlerError>(())
                }
            })
            .concurrency(4)
            .ordering(Ordering::Unordered)
            .await
            .unwrap();
        let halfway = Arc::new(Notify::new());
        let publishing = {
            let (orders, halfway) = (bus.module("orders"), halfway.clone());
            tokio::spawn(async move {
                let mut ids = HashSet::new();
                for seq in 0..3000 {
                    if seq == 1000 {
                        halfway.notify_one();
                    }
                    loop {
                        match orders.publish(OrderPlaced { seq }).await {
                            Ok(id) => {
                                ids.insert(id);
                                break;
                            }
                            Err(e) if e.is_retryable() => {
                                tokio::time::sleep(Duration::from_millis(50)).await
                            }
                            Err(e) => panic!("publish {seq}: {e}"),
                        }
                    }
                }
                ids
            })
        };
        halfway.notified().await;
        let closed = tokio::task::spawn_blocking(|| {
            std::process::Command::new("rabbitmqctl")
                .args(["close_all_connections", "seambus test: forced close"])
                .status()
                .expect("run rabbitmqctl close_all_connections")
        })
        .await
        .unwrap();
        assert!(
            closed.success(),
            "rabbitmqctl close_all_connections: {closed}"
        );
        let ids = publishing.await.unwrap();
        tally
            .wait_for_all("events across the connection loss", &ids)
            .await;
        tally.assert_all_of("events across the connection loss", &ids, true);
        bus.shutdown(Duration::from_secs(5)).await.unwrap();
        common::cleanup(&ns).await;
    });
}
