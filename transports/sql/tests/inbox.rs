//! The inbox on PostgreSQL and SQLite: a handler's database work commits
//! with the record of the event, so a redelivered event is skipped and a
//! failed attempt leaves no effect.

mod common;

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use common::Backend;
use seambus::conformance::{broker_ready, namespace, poll_until, Harness, Ping};
use seambus::{Bus, Context, HandlerError, PublishOptions, Received, RetryPolicy};
use seambus_sql::Inbox;

macro_rules! inbox_case {
    ($name:ident, $backend:expr, $pool:ty, $ctor:path, $open:expr, $effects:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let backend = $backend;
            let harness = common::Sql {
                backend,
                restart: false,
            };
            if !broker_ready(&harness) {
                return;
            }
            let ns = namespace("inbox");
            let config = common::config(backend, &ns);
            let pool: $pool = ($open)(&config.url).await;
            let inbox = $ctor(pool.clone(), &config.schema).await.expect("inbox");
            let effects: String = ($effects)(&config.schema);
            sqlx::query(&format!(
                "CREATE TABLE {effects} (event_id TEXT NOT NULL, seq BIGINT NOT NULL)"
            ))
            .execute(&pool)
            .await
            .expect("create the effects table");

            let bus = Bus::new();
            let calls = Arc::new(AtomicU32::new(0));
            let (counted, insert) = (
                calls.clone(),
                format!("INSERT INTO {effects} VALUES ($1, $2)"),
            );
            let _sub = bus
                .module("shop")
                .subscribe(
                    inbox.handler(move |ping: Received<Ping>, ctx: Context, mut tx| {
                        let (counted, insert) = (counted.clone(), insert.clone());
                        async move {
                            let call = counted.fetch_add(1, SeqCst) + 1;
                            sqlx::query(&insert)
                                .bind(ctx.envelope().id().to_string())
                                .bind(ping.seq as i64)
                                .execute(&mut *tx)
                                .await
                                .map_err(HandlerError::retry)?;
                            // Ping 2 fails once after its write: rolled back.
                            if ping.seq == 2 && ctx.attempt() == 1 {
                                return Err(HandlerError::retry(format!("call {call} fails")));
                            }
                            Ok(tx)
                        }
                    }),
                )
                .retry(
                    RetryPolicy::default()
                        .with_max_attempts(3)
                        .with_backoff(Duration::from_millis(5), Duration::from_millis(20)),
                )
                .await
                .expect("subscribe");

            let module = bus.module("conformance");
            let ping = |seq: u64| Ping {
                seq,
                body: String::new(),
            };
            let first = module
                .encode(ping(1), PublishOptions::new())
                .expect("encode");
            // Delivered twice (as a broker may after a crash), then ping 2.
            bus.forward(first.clone()).await.expect("forward");
            bus.forward(first.clone()).await.expect("forward again");
            module.publish(ping(2)).await.expect("publish");
            let count = format!("SELECT COUNT(*) FROM {effects}");
            poll_until("both events' effects", || async {
                let n: i64 = sqlx::query_scalar(&count).fetch_one(&pool).await.unwrap();
                n == 2
            })
            .await;
            let report = bus
                .shutdown(Duration::from_secs(5))
                .await
                .expect("shutdown");
            assert!(report.drained, "{report:?}");
            // Ping 1 ran once (its redelivery skipped), ping 2 twice; each
            // left one effect.
            assert_eq!(calls.load(SeqCst), 3);
            let rows: Vec<(String, i64)> =
                sqlx::query_as(&format!("SELECT event_id, seq FROM {effects} ORDER BY seq"))
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            assert_eq!(rows.len(), 2, "{rows:?}");
            assert_eq!(rows[0], (first.id().to_string(), 1));
            assert_eq!(rows[1].1, 2);
            harness.cleanup(&ns).await;
        }
    };
}

inbox_case!(
    postgres_a_redelivered_event_is_applied_once,
    Backend::Postgres,
    sqlx::PgPool,
    Inbox::postgres,
    |url: &str| {
        let url = url.to_owned();
        async move { sqlx::PgPool::connect(&url).await.expect("connect") }
    },
    |schema: &str| format!("\"{schema}\".effects")
);

inbox_case!(
    sqlite_a_redelivered_event_is_applied_once,
    Backend::Sqlite,
    sqlx::SqlitePool,
    Inbox::sqlite,
    |url: &str| {
        let url = url.to_owned();
        async move {
            let options: sqlx::sqlite::SqliteConnectOptions = url.parse().expect("url");
            sqlx::SqlitePool::connect_with(options.create_if_missing(true))
                .await
                .expect("connect")
        }
    },
    |schema: &str| format!("\"{schema}_effects\"")
);

inbox_case!(
    any_postgres_a_redelivered_event_is_applied_once,
    Backend::Postgres,
    sqlx::AnyPool,
    Inbox::any,
    |url: &str| {
        let url = url.to_owned();
        async move {
            sqlx::any::install_default_drivers();
            sqlx::AnyPool::connect(&url).await.expect("connect")
        }
    },
    |schema: &str| format!("\"{schema}\".effects")
);

// In memory: one connection, so every query sees the same database, and
// the inbox's tables are made through the application's pool.
inbox_case!(
    any_sqlite_in_memory_a_redelivered_event_is_applied_once,
    Backend::Sqlite,
    sqlx::AnyPool,
    Inbox::any,
    |_url: &str| async move {
        sqlx::any::install_default_drivers();
        sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .expect("connect")
    },
    |schema: &str| format!("\"{schema}_effects\"")
);
