//! The transactional outbox on PostgreSQL and SQLite: an event written in
//! the application's transaction exists if and only if it commits, and the
//! relay forwards committed events, in order, also those committed while
//! no relay ran (a crash between the commit and the forwarding).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Backend;
use seambus::conformance::{broker_ready, namespace, poll_until, Harness, Ping};
use seambus::{Bus, Context, HandlerError, PublishOptions, Received};
use seambus_sql::{Outbox, SqlTransport};

/// The handled pings, by partition key, in the order handled.
type Seen = Arc<Mutex<HashMap<String, Vec<u64>>>>;

async fn subscribe(bus: &Bus, seen: &Seen) -> seambus::Subscription {
    let seen = seen.clone();
    bus.module("shop")
        .subscribe(move |ping: Received<Ping>, ctx: Context| {
            let key = ctx
                .envelope()
                .attributes()
                .partition_key
                .clone()
                .unwrap_or_default();
            seen.lock().unwrap().entry(key).or_default().push(ping.seq);
            async { Ok::<(), HandlerError>(()) }
        })
        .concurrency(4)
        .await
        .expect("subscribe")
}

/// Distinct pings handled.
fn handled(seen: &Seen) -> usize {
    let seen = seen.lock().unwrap();
    let mut all: Vec<u64> = seen.values().flatten().copied().collect();
    all.sort_unstable();
    all.dedup();
    all.len()
}

/// Writes `pings` in one transaction of the application's own pool (its
/// backend's, or `sqlx::Any` when `any`), and commits it or rolls it back.
#[allow(clippy::too_many_arguments)]
async fn write(
    backend: Backend,
    any: bool,
    url: &str,
    outbox: &Outbox,
    bus: &Bus,
    pings: &[u64],
    commit: bool,
) {
    let module = bus.module("conformance");
    let ping = |seq: u64| Ping {
        seq,
        body: format!("ping {seq}"),
    };
    let key = |seq: u64| PublishOptions::new().key(format!("key-{}", seq % 5));
    macro_rules! in_tx {
        ($pool:expr) => {{
            let pool = $pool;
            let mut tx = pool.begin().await.expect("begin");
            for &seq in pings {
                outbox
                    .publish_with(&mut *tx, &module, ping(seq), key(seq))
                    .await
                    .expect("publish in the transaction");
            }
            if commit {
                tx.commit().await.expect("commit");
            } else {
                tx.rollback().await.expect("rollback");
            }
        }};
    }
    if any {
        sqlx::any::install_default_drivers();
        in_tx!(sqlx::AnyPool::connect(url).await.expect("connect"));
        return;
    }
    match backend {
        Backend::Postgres => in_tx!(sqlx::PgPool::connect(url).await.expect("connect")),
        Backend::Sqlite => in_tx!(sqlx::SqlitePool::connect(url).await.expect("connect")),
    }
}

async fn rolled_back_is_never_sent_committed_is(backend: Backend) {
    let harness = common::Sql {
        backend,
        restart: false,
    };
    if !broker_ready(&harness) {
        return;
    }
    let ns = namespace("outbox");
    let config = common::config(backend, &ns);
    let outbox = Outbox::connect(config.clone()).await.expect("outbox");
    // The route is the in-process default: the outbox works whatever the
    // route is.
    let bus = Bus::new();
    let seen = Seen::default();
    let _sub = subscribe(&bus, &seen).await;
    let relay = outbox.relay(bus.clone());
    write(backend, false, &config.url, &outbox, &bus, &[1, 2], false).await;
    write(backend, true, &config.url, &outbox, &bus, &[5], false).await;
    write(backend, false, &config.url, &outbox, &bus, &[3], true).await;
    // Through `sqlx::Any` too.
    write(backend, true, &config.url, &outbox, &bus, &[4], true).await;
    poll_until("the committed events forwarded", || async {
        handled(&seen) >= 2
    })
    .await;
    // Forwarded in the order written: a rolled-back event, had it been
    // stored, would have come first and be seen here.
    let mut all: Vec<u64> = seen.lock().unwrap().values().flatten().copied().collect();
    all.sort_unstable(); // two keys
    assert_eq!(all, vec![3, 4], "only the committed events are sent");
    poll_until("the outbox empty", || async {
        outbox.pending().await.unwrap() == 0
    })
    .await;
    relay.stop().await;
    bus.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    harness.cleanup(&ns).await;
}

async fn committed_while_no_relay_ran_is_forwarded_in_order(backend: Backend) {
    let harness = common::Sql {
        backend,
        restart: false,
    };
    if !broker_ready(&harness) {
        return;
    }
    let ns = namespace("outbox-crash");
    let config = common::config(backend, &ns);
    let outbox = Outbox::connect(config.clone()).await.expect("outbox");
    let transport = SqlTransport::connect(config.clone())
        .await
        .expect("transport");
    // The route is durable: the SQL transport itself.
    let bus = Bus::builder()
        .transport("sql", transport)
        .build()
        .expect("bus");
    let seen = Seen::default();
    let _sub = subscribe(&bus, &seen).await;
    // Committed, and the process "dies" before any relay forwards them.
    let pings: Vec<u64> = (0..60).collect();
    write(backend, false, &config.url, &outbox, &bus, &pings, true).await;
    assert_eq!(outbox.pending().await.unwrap(), 60);
    assert_eq!(handled(&seen), 0, "nothing is sent before a relay runs");
    // A first relay forwards part and stops (as at a crash, its lease
    // given up or run out); the next one forwards the rest.
    let first = outbox.relay(bus.clone());
    poll_until("the first relay forwarding", || async {
        outbox.pending().await.unwrap() < 60
    })
    .await;
    first.stop().await;
    let second = Outbox::connect(config.clone())
        .await
        .expect("outbox")
        .relay(bus.clone());
    poll_until("every event handled", || async { handled(&seen) >= 60 }).await;
    let seen = seen.lock().unwrap().clone();
    for (key, seqs) in &seen {
        assert_eq!(seqs.len(), 12, "key {key}: {seqs:?}");
        // A relay that stops finishes the event it forwards: no duplicate,
        // and never out of order.
        let mut last = None;
        for s in seqs {
            assert!(
                last.is_none_or(|l| l < *s),
                "key {key} out of order: {seqs:?}"
            );
            last = Some(*s);
        }
    }
    second.stop().await;
    bus.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    harness.cleanup(&ns).await;
}

async fn an_event_no_route_takes_is_set_aside_not_blocking(backend: Backend) {
    let harness = common::Sql {
        backend,
        restart: false,
    };
    if !broker_ready(&harness) {
        return;
    }
    let ns = namespace("outbox-aside");
    let config = common::config(backend, &ns);
    let outbox = Outbox::connect(config.clone()).await.expect("outbox");
    // The route takes at most 40 bytes: ping 1 fits, ping 2's body not.
    let transport = SqlTransport::connect(config.clone().with_max_payload(40))
        .await
        .expect("transport");
    let bus = Bus::builder()
        .transport("sql", transport)
        .build()
        .expect("bus");
    let seen = Seen::default();
    let _sub = subscribe(&bus, &seen).await;
    let module = bus.module("conformance");
    macro_rules! in_tx {
        ($pool:expr) => {{
            let pool = $pool;
            let mut tx = pool.begin().await.expect("begin");
            for (seq, body) in [(2, "x".repeat(100)), (1, String::new())] {
                outbox
                    .publish(&mut *tx, &module, Ping { seq, body })
                    .await
                    .expect("publish in the transaction");
            }
            tx.commit().await.expect("commit");
        }};
    }
    match backend {
        Backend::Postgres => in_tx!(sqlx::PgPool::connect(&config.url).await.expect("connect")),
        Backend::Sqlite => in_tx!(sqlx::SqlitePool::connect(&config.url)
            .await
            .expect("connect")),
    }
    let relay = outbox.relay(bus.clone());
    poll_until("the event after the refused one", || async {
        handled(&seen) == 1
    })
    .await;
    let aside = outbox.set_aside().await.expect("set aside");
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(aside[0].error.contains("limit"), "{}", aside[0].error);
    assert_eq!(outbox.pending().await.unwrap(), 0);
    relay.stop().await;
    bus.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    harness.cleanup(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_event_no_route_takes_is_set_aside_not_blocking() {
    an_event_no_route_takes_is_set_aside_not_blocking(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_an_event_no_route_takes_is_set_aside_not_blocking() {
    an_event_no_route_takes_is_set_aside_not_blocking(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rolled_back_is_never_sent_committed_is() {
    rolled_back_is_never_sent_committed_is(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_rolled_back_is_never_sent_committed_is() {
    rolled_back_is_never_sent_committed_is(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_committed_while_no_relay_ran_is_forwarded_in_order() {
    committed_while_no_relay_ran_is_forwarded_in_order(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_committed_while_no_relay_ran_is_forwarded_in_order() {
    committed_while_no_relay_ran_is_forwarded_in_order(Backend::Sqlite).await;
}
