//! Publishing in-process makes one heap allocation, whatever the number of
//! subscribing groups: the shared envelope. (Handling is measured by the
//! benchmarks.)

use std::future::Future;
use std::pin::pin;
use std::task::{Context as TaskContext, Poll};

use futures_util::task::noop_waker_ref;
use seambus::{Bus, Context, HandlerError, Received};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_placed")]
struct OrderPlaced {
    order_id: u64,
    sku: [u8; 16],
}

async fn noop(_e: Received<OrderPlaced>, _c: Context) -> Result<(), HandlerError> {
    Ok(())
}

/// Allocations of one publish, polled to completion on this thread (the
/// queues have room, so it finishes without waiting and without letting the
/// workers run).
fn allocations_of_one_publish(bus: &Bus, order_id: u64) -> u64 {
    let orders = bus.module("orders");
    allocation_counter::measure(|| {
        let mut publish = pin!(orders.publish(OrderPlaced {
            order_id,
            sku: [7; 16],
        }));
        let mut cx = TaskContext::from_waker(noop_waker_ref());
        match publish.as_mut().poll(&mut cx) {
            Poll::Ready(result) => {
                result.expect("publish");
            }
            Poll::Pending => panic!("publish had to wait"),
        }
    })
    .count_total
}

#[tokio::test(flavor = "current_thread")]
async fn one_allocation_per_publish_whatever_the_fan_out() {
    for groups in [1, 8] {
        let bus = Bus::new();
        let mut subs = Vec::new();
        for g in 0..groups {
            subs.push(
                bus.module(format!("module-{g}"))
                    .subscribe(noop)
                    .await
                    .unwrap(),
            );
        }
        // Steady state: thread-locals initialised and queues grown, then
        // drained by the workers (this thread runs them when we yield).
        for n in 0..32 {
            allocations_of_one_publish(&bus, n);
        }
        while subs.iter().any(|s| s.stats().succeeded < 32) {
            tokio::task::yield_now().await;
        }
        let counts: Vec<u64> = (10..20)
            .map(|n| allocations_of_one_publish(&bus, n))
            .collect();
        assert!(
            counts.iter().all(|&c| c == 1),
            "{groups} groups: allocations per publish {counts:?}"
        );
        bus.shutdown(std::time::Duration::from_secs(5))
            .await
            .unwrap();
    }
}
