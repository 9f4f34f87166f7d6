//! Consumer-group membership: a subscription that closes leaves its group
//! at once, also before its first assignment.

mod common;

use std::time::Duration;

use seambus::conformance::{block_on, broker_ready, Harness};
use seambus::{Bus, Context, HandlerError, Received};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_placed")]
struct OrderPlaced {
    id: u64,
}

/// A subscription closed before its first assignment leaves its group:
/// no member stays behind holding partitions (on tansu one did, until its
/// session timed out, and the group's next consumer got nothing).
#[test]
fn a_consumer_closed_at_once_leaves_no_member_behind() {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    if !broker_ready(&common::Kafka { restart: false }) {
        return;
    }
    let _serial = common::one_at_a_time();
    block_on(async {
        let ns = seambus::conformance::namespace("leave");
        let bus = Bus::builder()
            .transport("kafka", common::transport(&ns).await)
            .build()
            .unwrap();
        bus.module("billing")
            .subscribe(|_e: Received<OrderPlaced>, _c: Context| async {
                Ok::<(), HandlerError>(())
            })
            .await
            .unwrap()
            .close()
            .await
            .unwrap();
        let group = format!("t-{ns}.billing.orders.order_placed");
        let probe: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", common::brokers())
            .create()
            .unwrap();
        // The member left when close returned; the broker may take a
        // moment to show it, well under the 10 s session timeout a member
        // that did not leave would stay for.
        let members = |probe: &BaseConsumer| {
            probe
                .fetch_group_list(Some(&group), Duration::from_secs(5))
                .map(|list| {
                    list.groups()
                        .iter()
                        .map(|g| g.members().len())
                        .sum::<usize>()
                })
                .unwrap_or(usize::MAX)
        };
        let started = std::time::Instant::now();
        let mut left = members(&probe);
        while left != 0 && started.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            left = members(&probe);
        }
        assert_eq!(left, 0, "members of {group} after the only consumer closed");
        bus.shutdown(Duration::from_secs(10)).await.unwrap();
        common::Kafka { restart: false }.cleanup(&ns).await;
    });
}
