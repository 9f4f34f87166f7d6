//! One queue that stops taking messages (its process suspended on the
//! broker, as a quorum queue without a leader does) holds up only the
//! publishes routed to it: the publishes of every other event, and the
//! retry and dead-letter copies of other groups, are confirmed as before.
//! Alone in this binary: it suspends a queue process through
//! `rabbitmqctl eval` and always resumes it.

mod common;

use std::time::Duration;

use seambus::conformance::block_on;
use seambus::{Bus, Context, ErrorKind, HandlerError, Received};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_placed")]
struct OrderPlaced {
    seq: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_cancelled")]
struct OrderCancelled {
    seq: u64,
}

/// Runs an Erlang expression on the local node.
fn eval(expr: &str) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["eval", expr])
        .output()
        .expect("run rabbitmqctl eval");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "rabbitmqctl eval failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The Erlang expression giving the process of queue `queue` (a classic
/// queue's process receives what is published to it as messages, which
/// pile up in its mailbox while it is suspended).
fn queue_process(queue: &str) -> String {
    format!(
        "{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, <<\"{queue}\">>)), \
         case amqqueue:get_pid(Q) of {{Name, _}} -> whereis(Name); Pid -> Pid end"
    )
}

/// Suspends the queue's process until dropped. A suspension ends with
/// the process that made it, so a process spawned on the broker makes it
/// and holds it until told to resume.
struct Suspended(String);

impl Suspended {
    fn new(queue: &str) -> Self {
        let out = eval(&format!(
            "P = begin {} end, Me = self(), \
             S = spawn(fun() -> true = erlang:suspend_process(P), Me ! suspended, \
                 receive resume -> erlang:resume_process(P) end end), \
             register('{}', S), \
             receive suspended -> suspended after 5000 -> timeout end.",
            queue_process(queue),
            suspender(queue)
        ));
        assert!(
            out.contains("suspended"),
            "could not suspend {queue}: {out}"
        );
        Self(queue.to_owned())
    }
}

/// The name of the process holding the suspension of `queue`.
fn suspender(queue: &str) -> String {
    format!("seambus_suspends_{}", queue.replace(['\'', ':'], "_"))
}

impl Suspended {
    /// Waits until the suspended process has at least `n` messages waiting.
    async fn wait_for_mailbox(&self, n: usize) {
        let expr = format!(
            "P = begin {} end, {{message_queue_len, N}} = erlang:process_info(P, message_queue_len), N.",
            queue_process(&self.0)
        );
        for _ in 0..300 {
            let out = tokio::task::spawn_blocking({
                let expr = expr.clone();
                move || eval(&expr)
            })
            .await
            .unwrap();
            let len: usize = out.trim().parse().unwrap_or(0);
            if len >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the publishes never reached the suspended queue {}", self.0);
    }
}

impl Drop for Suspended {
    fn drop(&mut self) {
        // Never panics (a failing test drops it while unwinding).
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["eval", &format!("'{}' ! resume.", suspender(&self.0))])
            .output();
    }
}

#[test]
fn a_stuck_queue_holds_up_only_the_publishes_routed_to_it() {
    if !common::local_broker_ready() {
        return;
    }
    block_on(async {
        let ns = seambus::conformance::namespace("stuck");
        let config = common::config(&ns)
            .with_publish_timeout(Duration::from_secs(5))
            .with_queue_type(seambus_rabbitmq::QueueType::Classic);
        let transport = seambus_rabbitmq::RabbitMqTransport::connect(config)
            .await
            .expect("connect");
        let bus = Bus::builder()
            .transport("rabbitmq", transport.clone())
            .build()
            .unwrap();
        let _placed = bus
            .module("billing")
            .subscribe(|_e: Received<OrderPlaced>, _ctx: Context| async {
                Ok::<(), HandlerError>(())
            })
            .await
            .unwrap();
        let (handled, mut handled_rx) = tokio::sync::mpsc::unbounded_channel();
        let _cancelled = bus
            .module("shipping")
            .subscribe(move |e: Received<OrderCancelled>, _ctx: Context| {
                let handled = handled.clone();
                async move {
                    let _ = handled.send(e.seq);
                    Ok::<(), HandlerError>(())
                }
            })
            .await
            .unwrap();
        let orders = bus.module("orders");

        let stuck = format!("t-{ns}:billing:orders.order_placed");
        let suspended = Suspended::new(&stuck);
        // Enough unconfirmed publishes to the stuck queue to use up the
        // broker's flow-control credit for them.
        let blocked: Vec<_> = (0..1000)
            .map(|seq| {
                let orders = orders.clone();
                tokio::spawn(async move { orders.publish(OrderPlaced { seq }).await })
            })
            .collect();
        // Wait until they reach the queue (its mailbox fills up).
        suspended.wait_for_mailbox(20).await;
        // Another event, another queue: confirmed although the stuck
        // queue's publishes are not.
        for seq in 0..20 {
            let result = orders.publish(OrderCancelled { seq }).await;
            assert!(
                result.is_ok(),
                "publish {seq} of another event failed while one queue was stuck: {result:?}"
            );
        }
        for seq in 0..20 {
            assert_eq!(handled_rx.recv().await, Some(seq));
        }
        drop(suspended);
        // The stuck publishes either succeeded once the queue came back or
        // failed with a retryable timeout that names the event.
        for p in blocked {
            match p.await.unwrap() {
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
                    assert!(e.is_retryable(), "{e}");
                    assert!(e.to_string().contains("orders.order_placed"), "{e}");
                }
            }
        }
        // After the timeouts, publishing to the queue that came back works.
        orders
            .publish(OrderPlaced { seq: 1000 })
            .await
            .expect("publish after the queue came back");
        bus.shutdown(Duration::from_secs(5)).await.unwrap();
        let _ = transport.delete_topology().await;
    });
}
