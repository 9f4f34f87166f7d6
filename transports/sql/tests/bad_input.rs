//! Rows that are not envelopes (written by hand or by another program) go
//! to the group's dead letters with the reason, at once, and the queue
//! goes on; on PostgreSQL and SQLite.

mod common;

use std::time::Duration;

use common::Backend;
use seambus::conformance::{broker_ready, namespace, poll_until, Harness, Ping, Tally};
use seambus::transport::DeadLetterReason;
use seambus::{Bus, Context, HandlerError, Received};

async fn foreign_rows_are_dead_lettered(backend: Backend) {
    let harness = common::Sql {
        backend,
        restart: false,
    };
    if !broker_ready(&harness) {
        return;
    }
    let ns = namespace("badrows");
    let config = common::config(backend, &ns);
    let transport = seambus_sql::SqlTransport::connect(config.clone())
        .await
        .expect("connect");
    let bus = Bus::builder()
        .transport("sql", transport)
        .build()
        .expect("bus");
    let tally = Tally::new();
    let seen = tally.clone();
    let sub = bus
        .module("shop")
        .subscribe(move |_ping: Received<Ping>, ctx: Context| {
            seen.record(ctx.envelope().id());
            async { Ok::<(), HandlerError>(()) }
        })
        .await
        .expect("subscribe");
    let group = sub.group().to_string();

    // Two rows no Seambus publisher would write: headers that are not JSON,
    // and headers without an id.
    let queue = match backend {
        Backend::Postgres => format!("\"{}\".queue", config.schema),
        Backend::Sqlite => format!("\"{}_queue\"", config.schema),
    };
    let insert = format!(
        "INSERT INTO {queue} (grp, pkey, headers, payload, attempt, delivered, available_at, \
         locked_until) VALUES ($1, NULL, $2, $3, 1, 0, 0, 0)"
    );
    let rows = [
        "card 4111 1111 1111 1111",
        r#"[["ce_type","conformance.ping"],["ce_dataversion","1"]]"#,
    ];
    macro_rules! insert_rows {
        ($pool:expr) => {{
            let pool = $pool;
            for headers in rows {
                sqlx::query(&insert)
                    .bind(&group)
                    .bind(headers)
                    .bind(&b"{}"[..])
                    .execute(&pool)
                    .await
                    .expect("insert a foreign row");
            }
        }};
    }
    match backend {
        Backend::Postgres => {
            insert_rows!(sqlx::PgPool::connect(&config.url).await.expect("connect"))
        }
        Backend::Sqlite => {
            insert_rows!(sqlx::SqlitePool::connect(&config.url)
                .await
                .expect("connect"))
        }
    }
    let id = bus
        .module("conformance")
        .publish(Ping {
            seq: 1,
            body: "after the bad rows".into(),
        })
        .await
        .expect("publish");
    tally
        .wait_for_all("the event after the bad rows", &[id].into())
        .await;
    poll_until("two dead letters", || async {
        sub.dead_letters().await.is_ok_and(|d| d.len() == 2)
    })
    .await;
    for dl in sub.dead_letters().await.expect("dead letters") {
        assert_eq!(dl.reason, DeadLetterReason::Undecodable, "{dl:?}");
        assert!(
            !dl.error.contains("4111"),
            "the error quotes the row: {}",
            dl.error
        );
    }
    let report = bus
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    assert!(report.drained, "{report:?}");
    harness.cleanup(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_foreign_rows_are_dead_lettered() {
    foreign_rows_are_dead_lettered(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_foreign_rows_are_dead_lettered() {
    foreign_rows_are_dead_lettered(Backend::Sqlite).await;
}
