//! The delivery pipeline: shared state, user layers (bus and subscription,
//! in the documented order), panics caught and counted once, retry or dead
//! letter decided once.

use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use seambus::layer::Request;
use seambus::{
    Bus, Context, DeadLetterReason, Dispatch, HandlerError, Received, RetryPolicy, State,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tower::{Layer, Service};

#[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_placed")]
struct OrderPlaced {
    id: u64,
}

/// Writes its name to a shared log before passing the request on.
#[derive(Clone)]
struct Mark {
    name: &'static str,
    log: Arc<Mutex<Vec<&'static str>>>,
}

impl<S> Layer<S> for Mark {
    type Service = MarkService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MarkService {
            inner,
            mark: self.clone(),
        }
    }
}

#[derive(Clone)]
struct MarkService<S> {
    inner: S,
    mark: Mark,
}

impl<S> Service<Request> for MarkService<S>
where
    S: Service<Request, Response = (), Error = HandlerError> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<(), HandlerError>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        self.mark.log.lock().unwrap().push(self.mark.name);
        if request.context().attempt() == 1 && self.mark.name == "reject-first" {
            return Box::pin(async { Err(HandlerError::reject("refused by a layer")) });
        }
        Box::pin(self.inner.call(request))
    }
}

fn fast() -> RetryPolicy {
    RetryPolicy::default()
        .with_max_attempts(3)
        .with_backoff(Duration::from_millis(1), Duration::from_millis(2))
}

#[tokio::test]
async fn state_is_given_to_the_handler() {
    let bus = Bus::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    async fn handle(
        tx: State<mpsc::UnboundedSender<u64>>,
        order: Received<OrderPlaced>,
        _ctx: Context,
    ) -> Result<(), HandlerError> {
        tx.send(order.id)?;
        Ok(())
    }
    let _sub = bus
        .module("audit")
        .subscribe(handle)
        .with_state(tx)
        .await
        .unwrap();
    bus.module("orders")
        .publish(OrderPlaced { id: 7 })
        .await
        .unwrap();
    assert_eq!(rx.recv().await, Some(7));
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn layers_run_in_the_order_added_bus_layers_first() {
    let log: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    let mark = |name| Mark {
        name,
        log: log.clone(),
    };
    let bus = Bus::builder()
        .layer(mark("bus-1"))
        .layer(mark("bus-2"))
        .default_dispatch(Dispatch::Inline)
        .build()
        .unwrap();
    let handled = log.clone();
    let _sub = bus
        .module("audit")
        .subscribe(move |_o: Received<OrderPlaced>, _ctx: Context| {
            let handled = handled.clone();
            async move {
                handled.lock().unwrap().push("handler");
                Ok::<(), HandlerError>(())
            }
        })
        .layer(mark("sub-1"))
        .layer(mark("sub-2"))
        .await
        .unwrap();
    bus.module("orders")
        .publish(OrderPlaced { id: 1 })
        .await
        .unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        ["bus-1", "bus-2", "sub-1", "sub-2", "handler"]
    );
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn a_layer_can_reject_and_the_event_is_dead_lettered_once() {
    let log: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    let bus = Bus::builder()
        .default_dispatch(Dispatch::Inline)
        .build()
        .unwrap();
    let sub = bus
        .module("audit")
        .subscribe(|_o: Received<OrderPlaced>, _ctx: Context| async { Ok::<(), HandlerError>(()) })
        .layer(Mark {
            name: "reject-first",
            log: log.clone(),
        })
        .retry(fast())
        .await
        .unwrap();
    bus.module("orders")
        .publish(OrderPlaced { id: 1 })
        .await
        .unwrap();
    let dead = sub.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, DeadLetterReason::Rejected);
    assert!(
        dead[0].error.contains("refused by a layer"),
        "{}",
        dead[0].error
    );
    let stats = sub.stats();
    assert_eq!((stats.dead_lettered, stats.retried), (1, 0));
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn a_panic_is_caught_once_counted_once_and_retried_by_the_policy() {
    for dispatch in [Dispatch::Inline, Dispatch::Queued] {
        let bus = Bus::builder().default_dispatch(dispatch).build().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sub = bus
            .module("audit")
            .subscribe(move |_o: Received<OrderPlaced>, ctx: Context| {
                let tx = tx.clone();
                async move {
                    tx.send(ctx.attempt()).unwrap();
                    if ctx.attempt() < 3 {
                        panic!("attempt {} panics", ctx.attempt());
                    }
                    Ok::<(), HandlerError>(())
                }
            })
            .retry(fast())
            .await
            .unwrap();
        bus.module("orders")
            .publish(OrderPlaced { id: 1 })
            .await
            .unwrap();
        for expected in 1..=3 {
            assert_eq!(rx.recv().await, Some(expected), "{dispatch:?}");
        }
        let report = bus.shutdown(Duration::from_secs(5)).await.unwrap();
        assert!(report.drained, "{dispatch:?}");
        let stats = sub.stats();
        assert_eq!(
            (
                stats.panicked,
                stats.retried,
                stats.succeeded,
                stats.dead_lettered
            ),
            (2, 2, 1, 0),
            "{dispatch:?}"
        );
    }
}
