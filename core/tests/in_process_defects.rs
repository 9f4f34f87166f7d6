//! Regression tests for issue 12: inline dispatch during shutdown (item 4)
//! and the in-process dead-letter store (item 5).
//!
//! Where a test must show that something has *not* happened yet (a
//! shutdown still waiting, a publish still held back), it runs on tokio's
//! paused clock: a paused runtime moves its clock forward only once every
//! task is idle, so `sleep(1 s)` returns after everything that could run
//! has run, deterministically.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use seambus::transport::{GroupId, Transport};
use seambus::{
    Attributes, Bus, Context, Dispatch, Envelope, ErrorKind, HandlerError, InProcessConfig,
    InProcessTransport, Received, Subscription,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_placed", version = 1)]
struct OrderPlaced {
    n: u64,
}

/// Accepted by every handler below: once a group's single worker runs it,
/// everything published before it has been handled to the end (stored as
/// a dead letter or waiting for room).
const SENTINEL: u64 = u64::MAX;

fn ok() -> Result<(), HandlerError> {
    Ok(())
}

fn bus_on(transport: &Arc<InProcessTransport>) -> Bus {
    Bus::builder()
        .transport_arc("memory", transport.clone() as Arc<dyn Transport>)
        .build()
        .unwrap()
}

fn ids_of(dead: &[seambus::transport::DeadLetter]) -> Vec<Uuid> {
    dead.iter().map(|d| d.envelope.id()).collect()
}

// ---------------------------------------------------------------------
// Item 4: inline dispatch and shutdown
// ---------------------------------------------------------------------

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_inline_retry_wait_ends_at_the_shutdown_deadline_unfinished_not_dead_lettered() {
    let bus = Bus::new();
    let (tx, mut attempts) = mpsc::unbounded_channel();
    let sub = bus
        .module("billing")
        .subscribe(move |_e: Received<OrderPlaced>, ctx: Context| {
            let tx = tx.clone();
            async move {
                tx.send((ctx.envelope().id(), ctx.attempt())).unwrap();
                Err::<(), _>(HandlerError::retry("payment provider down"))
            }
        })
        .dispatch(Dispatch::Inline)
        .max_attempts(3)
        .backoff(Duration::from_secs(3600), Duration::from_secs(3600))
        .await
        .unwrap();
    let orders = bus.module("orders");
    let publishing = tokio::spawn(async move { orders.publish(OrderPlaced { n: 1 }).await });
    // The first attempt failed; the publisher now waits an hour to retry.
    let (id, attempt) = attempts.recv().await.unwrap();
    assert_eq!(attempt, 1);

    let report = bus.shutdown(Duration::from_millis(100)).await.unwrap();
    assert!(
        !report.drained,
        "an inline run waiting to retry is not drained"
    );
    let unfinished: Vec<_> = report
        .unfinished
        .iter()
        .map(|u| (u.group.clone(), u.envelope.id()))
        .collect();
    assert_eq!(unfinished, vec![(sub.group().clone(), id)]);

    // The publisher was let go at the deadline (its event is in the report).
    publishing.await.unwrap().unwrap();
    assert!(
        attempts.try_recv().is_err(),
        "no attempt after the deadline"
    );
    assert!(
        sub.dead_letters().await.unwrap().is_empty(),
        "cancellation never dead-letters"
    );
    let stats = sub.stats();
    assert_eq!(stats.retried, 1, "only the attempt that ran and failed");
    assert_eq!(stats.dead_lettered, 0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn shutdown_waits_for_a_running_inline_handler() {
    let transport = Arc::new(InProcessTransport::default());
    let bus = bus_on(&transport);
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let finished = Arc::new(AtomicBool::new(false));
    let (r, f) = (release.clone(), finished.clone());
    let sub = bus
        .module("billing")
        .subscribe(move |_e: Received<OrderPlaced>, ctx: Context| {
            let (tx, r, f) = (started_tx.clone(), r.clone(), f.clone());
            async move {
                tx.send(ctx.envelope().id()).unwrap();
                r.notified().await;
                f.store(true, SeqCst);
                ok()
            }
        })
        .dispatch(Dispatch::Inline)
        .await
        .unwrap();
    let orders = bus.module("orders");
    let publishing = tokio::spawn(async move { orders.publish(OrderPlaced { n: 1 }).await });
    started.recv().await.unwrap();

    let b = bus.clone();
    let f = finished.clone();
    let shutdown = tokio::spawn(async move {
        let report = b.shutdown(Duration::from_secs(10)).await.unwrap();
        (report, f.load(SeqCst))
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !shutdown.is_finished(),
        "shutdown returned while an inline handler still runs"
    );

    // A publish that starts now is refused, on the transport too.
    let late = Envelope::from_bytes(Attributes::new("orders", "orders.order_placed", 1), "{}");
    let err = transport.publish(late).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    let err = bus
        .module("orders")
        .publish(OrderPlaced { n: 2 })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);

    release.notify_one();
    let (report, finished_before_report) = shutdown.await.unwrap();
    assert!(finished_before_report, "the report came after the handler");
    assert!(report.drained);
    assert!(report.unfinished.is_empty());
    publishing.await.unwrap().unwrap();
    assert_eq!(sub.stats().succeeded, 1);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_inline_handler_still_running_at_the_deadline_is_unfinished_not_failed() {
    let bus = Bus::new();
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let sub = bus
        .module("billing")
        .subscribe(move |_e: Received<OrderPlaced>, ctx: Context| {
            let tx = started_tx.clone();
            async move {
                tx.send(ctx.envelope().id()).unwrap();
                std::future::pending::<()>().await;
                ok()
            }
        })
        .dispatch(Dispatch::Inline)
        .await
        .unwrap();
    let orders = bus.module("orders");
    let publishing = tokio::spawn(async move { orders.publish(OrderPlaced { n: 1 }).await });
    let id = started.recv().await.unwrap();

    let report = bus.shutdown(Duration::from_millis(100)).await.unwrap();
    assert!(!report.drained);
    let back: Vec<_> = report.unfinished.iter().map(|u| u.envelope.id()).collect();
    assert_eq!(back, vec![id]);
    publishing.await.unwrap().unwrap();
    assert!(sub.dead_letters().await.unwrap().is_empty());
    let stats = sub.stats();
    assert_eq!(
        (stats.retried, stats.dead_lettered, stats.succeeded),
        (0, 0, 0),
        "a run cut off by the deadline is no failure"
    );
}

// ---------------------------------------------------------------------
// Item 5: one dead-letter store per group, nothing evicted
// ---------------------------------------------------------------------

/// A subscription whose handler rejects every event but the sentinel and
/// those `accept` lets through (checked at call time), and reports the
/// sentinel on `done`.
async fn rejecting(
    bus: &Bus,
    module: &'static str,
    accept: impl Fn(u64) -> bool + Send + Sync + 'static,
) -> (Subscription, mpsc::UnboundedReceiver<()>) {
    let (tx, done) = mpsc::unbounded_channel();
    let accept = Arc::new(accept);
    let sub = bus
        .module(module)
        .subscribe(move |e: Received<OrderPlaced>, _c: Context| {
            let (tx, accept) = (tx.clone(), accept.clone());
            async move {
                if e.n == SENTINEL {
                    tx.send(()).unwrap();
                    return ok();
                }
                if accept(e.n) {
                    return ok();
                }
                Err(HandlerError::reject("no stock"))
            }
        })
        .concurrency(1)
        .await
        .unwrap();
    (sub, done)
}

async fn publish_all(bus: &Bus, ns: impl IntoIterator<Item = u64>) -> Vec<Uuid> {
    let orders = bus.module("orders");
    let mut ids = Vec::new();
    for n in ns {
        ids.push(orders.publish(OrderPlaced { n }).await.unwrap());
    }
    ids
}

#[tokio::test]
async fn a_noisy_group_does_not_evict_another_groups_dead_letters() {
    let transport = Arc::new(InProcessTransport::new(
        InProcessConfig::default().with_dead_letter_capacity(3),
    ));
    let bus = bus_on(&transport);
    let (noisy, mut noisy_done) = rejecting(&bus, "noisy", |_| false).await;
    let (quiet, mut quiet_done) = rejecting(&bus, "quiet", |n| n >= 3).await;
    // Both groups reject 0..3; only the noisy one rejects 3..10.
    let ids = publish_all(&bus, 0..10).await;
    publish_all(&bus, [SENTINEL]).await;
    noisy_done.recv().await.unwrap();
    quiet_done.recv().await.unwrap();

    assert_eq!(
        ids_of(&quiet.dead_letters().await.unwrap()),
        ids[..3],
        "the quiet group keeps every dead letter"
    );
    assert_eq!(
        ids_of(&noisy.dead_letters().await.unwrap()),
        ids[..3],
        "a full store keeps what it has (oldest first) and evicts nothing"
    );
}

#[tokio::test]
async fn dead_letters_waiting_for_room_enter_the_store_when_room_is_made() {
    let transport = Arc::new(InProcessTransport::new(
        InProcessConfig::default().with_dead_letter_capacity(3),
    ));
    let bus = bus_on(&transport);
    let healed = Arc::new(AtomicBool::new(false));
    let h = healed.clone();
    let (sub, mut done) = rejecting(&bus, "noisy", move |_| h.load(SeqCst)).await;
    let ids = publish_all(&bus, 0..6).await;
    publish_all(&bus, [SENTINEL]).await;
    done.recv().await.unwrap();
    assert_eq!(ids_of(&sub.dead_letters().await.unwrap()), ids[..3]);

    // Discarding one makes room for exactly one of those waiting.
    assert_eq!(sub.discard_dead_letters(Some(&[ids[0]])).await.unwrap(), 1);
    assert_eq!(ids_of(&sub.dead_letters().await.unwrap()), ids[1..4]);

    // Redriving one does too; the redriven event is handled again.
    healed.store(true, SeqCst);
    assert_eq!(sub.redrive(Some(&[ids[1]])).await.unwrap(), 1);
    assert_eq!(ids_of(&sub.dead_letters().await.unwrap()), ids[2..5]);

    // Discarding everything listed lets the last one in.
    assert_eq!(sub.discard_dead_letters(None).await.unwrap(), 3);
    assert_eq!(ids_of(&sub.dead_letters().await.unwrap()), ids[5..]);
    assert_eq!(sub.discard_dead_letters(None).await.unwrap(), 1);
    assert!(sub.dead_letters().await.unwrap().is_empty());

    let report = bus.shutdown(Duration::from_secs(5)).await.unwrap();
    assert!(report.drained, "nothing is left: {:?}", report.unfinished);
    assert_eq!(
        sub.stats().succeeded,
        2,
        "the redriven event and the sentinel"
    );
}

#[tokio::test]
async fn discard_removes_exactly_what_was_asked() {
    let transport = Arc::new(InProcessTransport::new(
        InProcessConfig::default().with_dead_letter_capacity(10),
    ));
    let bus = bus_on(&transport);
    let (a, mut a_done) = rejecting(&bus, "alpha", |_| false).await;
    let (b, mut b_done) = rejecting(&bus, "beta", |_| false).await;
    let ids = publish_all(&bus, 0..4).await;
    publish_all(&bus, [SENTINEL]).await;
    a_done.recv().await.unwrap();
    b_done.recv().await.unwrap();

    // Unknown ids and an empty list remove nothing.
    assert_eq!(a.discard_dead_letters(Some(&[])).await.unwrap(), 0);
    let unknown = Uuid::now_v7();
    assert_eq!(
        a.discard_dead_letters(Some(&[ids[1], unknown, ids[3]]))
            .await
            .unwrap(),
        2
    );
    assert_eq!(ids_of(&a.dead_letters().await.unwrap()), [ids[0], ids[2]]);
    assert_eq!(
        ids_of(&b.dead_letters().await.unwrap()),
        ids,
        "another group's dead letters are untouched"
    );
    // Discarding the same ids again finds nothing.
    assert_eq!(a.discard_dead_letters(Some(&[ids[1]])).await.unwrap(), 0);
    assert_eq!(a.discard_dead_letters(None).await.unwrap(), 2);
    assert!(a.dead_letters().await.unwrap().is_empty());
    assert_eq!(b.dead_letters().await.unwrap().len(), 4);

    // Through the transport, for a group with no store yet: nothing.
    let nobody = GroupId::new("nobody", "orders.order_placed");
    assert_eq!(
        transport.discard_dead_letters(&nobody, None).await.unwrap(),
        0
    );
}

#[tokio::test]
async fn a_dead_letter_capacity_of_zero_does_not_drop_dead_letters() {
    let transport = Arc::new(InProcessTransport::new(
        InProcessConfig::default().with_dead_letter_capacity(0),
    ));
    let bus = bus_on(&transport);
    let (sub, mut done) = rejecting(&bus, "noisy", |_| false).await;
    let ids = publish_all(&bus, 0..2).await;
    publish_all(&bus, [SENTINEL]).await;
    done.recv().await.unwrap();
    // Capacity 0 is raised to 1: the first is stored, the second waits.
    assert_eq!(ids_of(&sub.dead_letters().await.unwrap()), ids[..1]);
    let report = bus.shutdown(Duration::from_secs(5)).await.unwrap();
    let back: Vec<_> = report.unfinished.iter().map(|u| u.envelope.id()).collect();
    assert_eq!(back, ids[1..], "the waiting one is handed back, not lost");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_full_dead_letter_store_holds_back_publishers_through_the_queue() {
    let transport = Arc::new(InProcessTransport::new(
        InProcessConfig::default()
            .with_queue_capacity(1)
            .with_dead_letter_capacity(1),
    ));
    let bus = bus_on(&transport);
    let (sub, _done) = rejecting(&bus, "noisy", |_| false).await;
    let ids = publish_all(&bus, 0..2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The first is stored; the second waits for room and keeps its slot.
    assert_eq!(ids_of(&sub.dead_letters().await.unwrap()), ids[..1]);
    let orders = bus.module("orders");
    let mut third = tokio::spawn(async move { orders.publish(OrderPlaced { n: 2 }).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!third.is_finished(), "the queue is full: publish waits");

    assert_eq!(sub.discard_dead_letters(Some(&ids[..1])).await.unwrap(), 1);
    let third_id = (&mut third).await.unwrap().unwrap();
    assert_eq!(ids_of(&sub.dead_letters().await.unwrap()), ids[1..]);

    // The third is rejected too and waits for room when shutdown comes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = bus.shutdown(Duration::from_secs(5)).await.unwrap();
    assert!(!report.drained);
    let back: Vec<_> = report
        .unfinished
        .iter()
        .map(|u| (u.group.clone(), u.envelope.id()))
        .collect();
    assert_eq!(back, vec![(sub.group().clone(), third_id)]);
    assert_eq!(ids_of(&sub.dead_letters().await.unwrap()), ids[1..]);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_inline_publish_waits_for_room_in_a_full_dead_letter_store() {
    let transport = Arc::new(InProcessTransport::new(
        InProcessConfig::default().with_dead_letter_capacity(1),
    ));
    let bus = bus_on(&transport);
    let sub = bus
        .module("billing")
        .subscribe(|_e: Received<OrderPlaced>, _c: Context| async {
            Err::<(), _>(HandlerError::reject("no stock"))
        })
        .dispatch(Dispatch::Inline)
        .await
        .unwrap();
    let first = publish_all(&bus, [0]).await;
    assert_eq!(ids_of(&sub.dead_letters().await.unwrap()), first);

    let orders = bus.module("orders");
    let mut second = tokio::spawn(async move { orders.publish(OrderPlaced { n: 1 }).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!second.is_finished(), "the store is full: publish waits");
    assert_eq!(sub.discard_dead_letters(None).await.unwrap(), 1);
    let second_id = (&mut second).await.unwrap().unwrap();
    assert_eq!(ids_of(&sub.dead_letters().await.unwrap()), [second_id]);

    // Waiting for room when shutdown's deadline passes: handed back.
    let orders = bus.module("orders");
    let third = tokio::spawn(async move { orders.publish(OrderPlaced { n: 2 }).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !third.is_finished(),
        "the store is full again: publish waits"
    );
    let report = bus.shutdown(Duration::from_millis(100)).await.unwrap();
    assert!(!report.drained);
    assert_eq!(report.unfinished.len(), 1);
    assert_eq!(report.unfinished[0].group, *sub.group());
    let third_id = third.await.unwrap().unwrap();
    assert_eq!(report.unfinished[0].envelope.id(), third_id);
    assert_eq!(ids_of(&sub.dead_letters().await.unwrap()), [second_id]);
}

#[tokio::test]
async fn a_dead_letter_waiting_for_room_keeps_its_key() {
    let transport = Arc::new(InProcessTransport::new(
        InProcessConfig::default().with_dead_letter_capacity(1),
    ));
    let bus = bus_on(&transport);
    let (tx, mut handled) = mpsc::unbounded_channel();
    let sub = bus
        .module("billing")
        .subscribe(move |e: Received<OrderPlaced>, _c: Context| {
            let tx = tx.clone();
            async move {
                if e.n < 2 {
                    return Err(HandlerError::reject("no stock"));
                }
                tx.send(e.n).unwrap();
                ok()
            }
        })
        // One worker: once it has handled the `other` event, everything
        // published before it has been handled to the end.
        .concurrency(1)
        .await
        .unwrap();
    let orders = &bus.module("orders");
    let keyed = |n| async move {
        orders
            .publish_with(OrderPlaced { n }, seambus::PublishOptions::new().key("k"))
            .await
            .unwrap()
    };
    let stored = keyed(0).await;
    let waiting = keyed(1).await;
    keyed(2).await;
    // Another key still flows while `k` is held by the waiting dead letter.
    bus.module("orders")
        .publish_with(
            OrderPlaced { n: 3 },
            seambus::PublishOptions::new().key("other"),
        )
        .await
        .unwrap();
    assert_eq!(handled.recv().await.unwrap(), 3);
    assert!(
        handled.try_recv().is_err(),
        "k's next event waits behind the dead letter waiting for room"
    );
    assert_eq!(ids_of(&sub.dead_letters().await.unwrap()), [stored]);

    assert_eq!(sub.discard_dead_letters(None).await.unwrap(), 1);
    assert_eq!(handled.recv().await.unwrap(), 2, "the key is released");
    assert_eq!(ids_of(&sub.dead_letters().await.unwrap()), [waiting]);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn redrive_works_when_waiting_dead_letters_hold_every_queue_slot() {
    let transport = Arc::new(InProcessTransport::new(
        InProcessConfig::default()
            .with_queue_capacity(2)
            .with_dead_letter_capacity(1),
    ));
    let bus = bus_on(&transport);
    let healed = Arc::new(AtomicBool::new(false));
    let h = healed.clone();
    let (sub, _done) = rejecting(&bus, "noisy", move |_| h.load(SeqCst)).await;
    let ids = publish_all(&bus, 0..3).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // One stored, two waiting for room, holding both queue slots.
    assert_eq!(ids_of(&sub.dead_letters().await.unwrap()), ids[..1]);

    healed.store(true, SeqCst);
    let redriven = tokio::time::timeout(Duration::from_secs(60), sub.redrive(None))
        .await
        .expect("redrive does not wait for a slot only it could free");
    assert_eq!(redriven.unwrap(), 1);
    assert_eq!(ids_of(&sub.dead_letters().await.unwrap()), ids[1..2]);

    let report = bus.shutdown(Duration::from_secs(5)).await.unwrap();
    assert!(!report.drained);
    let back: Vec<_> = report.unfinished.iter().map(|u| u.envelope.id()).collect();
    assert_eq!(back, ids[2..], "the one still waiting is handed back");
    assert_eq!(sub.stats().succeeded, 1, "the redriven one was handled");
}
