//! A broker that stops answering, made so on the local node through
//! `rabbitmqctl eval` (processes suspended by a process spawned there,
//! always resumed): one queue that stops taking messages (as a quorum
//! queue without a leader does) holds up only the publishes routed to it,
//! and a shutdown returns when the broker answers nothing at all.

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

/// The Erlang expression giving, as a list, the process of queue `queue`
/// (a classic queue's process receives what is published to it as
/// messages, which pile up in its mailbox while it is suspended).
fn queue_process(queue: &str) -> String {
    format!(
        "{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, <<\"{queue}\">>)), \
         [case amqqueue:get_pid(Q) of {{Name, _}} -> whereis(Name); Pid -> Pid end]"
    )
}

/// The Erlang expression giving the reader processes of the connections
/// named `name` (a connection still in its handshake has no client
/// properties yet, `none`): suspended, the broker reads nothing more from them (it
/// still sends heartbeats, so the client sees a live connection that
/// answers nothing).
fn connection_readers(name: &str) -> String {
    format!(
        "[P || I <- rabbit_networking:connection_info_all([pid, client_properties]), \
               {{pid, P}} <- [lists:keyfind(pid, 1, I)], \
               {{client_properties, C}} <- [lists:keyfind(client_properties, 1, I)], \
               is_list(C), lists:member({{<<\"connection_name\">>, longstr, <<\"{name}\">>}}, C)]"
    )
}

/// Suspends the processes an expression lists until dropped. A
/// suspension ends with the process that made it, so a process spawned on
/// the broker makes it and holds it until told to resume.
struct Suspended {
    label: String,
    processes: String,
}

impl Suspended {
    fn new(label: &str, processes: String) -> Self {
        let out = eval(&format!(
            "Ps = begin {processes} end, Me = self(), \
             S = spawn(fun() -> [true = erlang:suspend_process(P) || P <- Ps], Me ! suspended, \
                 receive resume -> [erlang:resume_process(P) || P <- Ps] end end), \
             register('{}', S), \
             receive suspended -> length(Ps) after 5000 -> timeout end.",
            suspender(label)
        ));
        let count: usize = out.trim().parse().unwrap_or(0);
        assert!(count > 0, "could not suspend {label}: {out}");
        Self {
            label: label.to_owned(),
            processes,
        }
    }

    /// Waits until the first suspended process has at least `n` messages
    /// waiting.
    async fn wait_for_mailbox(&self, n: usize) {
        let expr = format!(
            "[P | _] = begin {} end, \
             {{message_queue_len, N}} = erlang:process_info(P, message_queue_len), N.",
            self.processes
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
        panic!("the publishes never reached the suspended {}", self.label);
    }
}

/// The name of the process holding the suspension of `label`.
fn suspender(label: &str) -> String {
    format!("seambus_suspends_{}", label.replace(['\'', ':'], "_"))
}

impl Drop for Suspended {
    fn drop(&mut self) {
        // Never panics (a failing test drops it while unwinding).
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["eval", &format!("'{}' ! resume.", suspender(&self.label))])
            .output();
    }
}

/// Shipping's subscription to `OrderCancelled`, with the numbers it
/// handled.
async fn shipping(
    bus: &Bus,
) -> (
    seambus::Subscription,
    tokio::sync::mpsc::UnboundedReceiver<u64>,
) {
    let (handled, rx) = tokio::sync::mpsc::unbounded_channel();
    let subscription = bus
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
    (subscription, rx)
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
        let (_cancelled, mut handled_rx) = shipping(&bus).await;
        let orders = bus.module("orders");

        let stuck = format!("t-{ns}:billing:orders.order_placed");
        let suspended = Suspended::new(&stuck, queue_process(&stuck));
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

/// The broker stops answering the transport (its connections' readers
/// suspended) after the events arrived: `shutdown` still returns, past its
/// deadline by the bounded grace of its broker calls, and reports that it
/// did not drain. Before, it waited for the broker's answers to the
/// consumer's cancel and the connection's close for ever.
#[test]
fn shutdown_returns_when_the_broker_stops_answering() {
    if !common::local_broker_ready() {
        return;
    }
    block_on(async {
        let ns = seambus::conformance::namespace("mute");
        let mut config = common::config(&ns);
        config.connection_name = Some(ns.clone());
        let transport = seambus_rabbitmq::RabbitMqTransport::connect(config)
            .await
            .expect("connect");
        let bus = Bus::builder()
            .transport("rabbitmq", transport.clone())
            .build()
            .unwrap();
        let (_s, mut handled_rx) = shipping(&bus).await;
        bus.module("orders")
            .publish(OrderCancelled { seq: 1 })
            .await
            .unwrap();
        assert_eq!(handled_rx.recv().await, Some(1));

        let muted = Suspended::new(&ns, connection_readers(&ns));
        let report = tokio::time::timeout(
            Duration::from_secs(90),
            bus.shutdown(Duration::from_secs(2)),
        )
        .await
        .expect("shutdown returns although the broker answers nothing")
        .unwrap();
        assert!(!report.drained, "{report:?}");
        drop(muted);
        let cleanup = seambus_rabbitmq::RabbitMqTransport::connect(common::config(&ns))
            .await
            .unwrap();
        let _ = cleanup
            .delete_group(&seambus::transport::GroupId::new(
                "shipping",
                "orders.order_cancelled",
            ))
            .await;
        let _ = cleanup.delete_topology().await;
    });
}
