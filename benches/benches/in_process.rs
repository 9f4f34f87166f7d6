//! In-process publish -> handler throughput, with 1 and 8 subscribing
//! modules, queued and inline, on a current-thread and a 2-worker runtime;
//! beside raw baselines doing the same fan-out to the same trivial handler
//! (a tokio mpsc channel and a flume channel per subscriber). Read the
//! ratio bus / raw in the report: same group, same element count.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use seambus::{Bus, Context, Dispatch, HandlerError, Received};
use seambus_benches::{Done, Tick};
use tokio::runtime::Runtime;

/// Events per measured iteration.
const EVENTS: u64 = 10_000;

fn runtime(workers: usize) -> Runtime {
    let mut b = if workers == 0 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    b.enable_all().build().expect("a tokio runtime")
}

async fn bus_with(modules: usize, dispatch: Dispatch, done: &Arc<Done>) -> Bus {
    let bus = Bus::new();
    for m in 0..modules {
        let done = done.clone();
        bus.module(format!("m{m}"))
            .subscribe(move |_t: Received<Tick>, _c: Context| {
                let done = done.clone();
                async move {
                    done.hit();
                    Ok::<(), HandlerError>(())
                }
            })
            .dispatch(dispatch)
            .ordering(seambus::Ordering::Unordered)
            .await
            .expect("subscribe");
    }
    bus
}

fn fan_out(c: &mut Criterion) {
    for (rt_name, workers) in [("current_thread", 0), ("2_workers", 2)] {
        for modules in [1usize, 8] {
            let mut group = c.benchmark_group(format!("fan_out/{rt_name}/{modules}_modules"));
            group.throughput(Throughput::Elements(EVENTS));
            group.measurement_time(Duration::from_secs(3));
            group.sample_size(20);
            let rt = runtime(workers);
            let target = EVENTS * modules as u64;

            for (name, dispatch) in [
                ("bus_queued", Dispatch::Queued),
                ("bus_inline", Dispatch::Inline),
            ] {
                let done = Done::new();
                let bus = rt.block_on(bus_with(modules, dispatch, &done));
                let publisher = bus.module("bench");
                group.bench_function(BenchmarkId::from_parameter(name), |b| {
                    b.to_async(&rt).iter(|| async {
                        done.reset(target);
                        for seq in 0..EVENTS {
                            publisher.publish(Tick::new(seq)).await.expect("publish");
                        }
                        done.wait().await;
                    })
                });
                rt.block_on(bus.shutdown(Duration::from_secs(5)))
                    .expect("shutdown");
            }

            // Raw: one bounded tokio mpsc per subscriber, the same handler.
            let done = Done::new();
            let senders: Vec<_> = (0..modules)
                .map(|_| {
                    let (tx, mut rx) = tokio::sync::mpsc::channel::<Arc<Tick>>(1024);
                    let done = done.clone();
                    rt.spawn(async move {
                        while let Some(_t) = rx.recv().await {
                            done.hit();
                        }
                    });
                    tx
                })
                .collect();
            group.bench_function(BenchmarkId::from_parameter("raw_tokio_mpsc"), |b| {
                b.to_async(&rt).iter(|| async {
                    done.reset(target);
                    for seq in 0..EVENTS {
                        let t = Arc::new(Tick::new(seq));
                        for tx in &senders {
                            tx.send(t.clone()).await.expect("send");
                        }
                    }
                    done.wait().await;
                })
            });
            drop(senders);

            // Raw: one bounded flume channel per subscriber.
            let done = Done::new();
            let senders: Vec<_> = (0..modules)
                .map(|_| {
                    let (tx, rx) = flume::bounded::<Arc<Tick>>(1024);
                    let done = done.clone();
                    rt.spawn(async move {
                        while let Ok(_t) = rx.recv_async().await {
                            done.hit();
                        }
                    });
                    tx
                })
                .collect();
            group.bench_function(BenchmarkId::from_parameter("raw_flume"), |b| {
                b.to_async(&rt).iter(|| async {
                    done.reset(target);
                    for seq in 0..EVENTS {
                        let t = Arc::new(Tick::new(seq));
                        for tx in &senders {
                            tx.send_async(t.clone()).await.expect("send");
                        }
                    }
                    done.wait().await;
                })
            });
            drop(senders);
            group.finish();
        }
    }
}

criterion_group!(benches, fan_out);
criterion_main!(benches);
