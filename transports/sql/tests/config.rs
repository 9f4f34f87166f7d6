//! The SQL transport built from configuration (an SQLite file, no
//! server): a key it does not have is refused by name (its value never
//! shown), the environment and the namespace apply, and the bus delivers.

use std::sync::Arc;
use std::time::Duration;

use seambus::config::{BusConfig, Kinds};
use seambus::{Context, HandlerError, Received};
use seambus_sql::SqlTransport;
use tokio::sync::Notify;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, seambus::Event)]
#[event(name = "shop.ping", version = 1)]
struct Ping {
    n: u32,
}

fn kinds() -> Kinds {
    Kinds::new().with::<SqlTransport>()
}

#[tokio::test]
async fn an_unknown_key_is_refused_by_name_without_its_value() {
    let text =
        "[routes]\n\"*\" = \"sql\"\n\n[transports.sql]\nurll = \"postgres://app:s3cret@db/shop\"\n";
    let err = BusConfig::from_toml_str(text)
        .unwrap()
        .build(&kinds())
        .await
        .unwrap_err();
    let msg = err.message();
    assert!(
        msg.contains("urll") && msg.contains("[transports.sql]"),
        "{msg}"
    );
    assert!(!msg.contains("s3cret"), "{msg}");
    // A wrong type: the value is not quoted either.
    let text =
        "[routes]\n\"*\" = \"sql\"\n\n[transports.sql]\nbatch = \"postgres://app:s3cret@db\"\n";
    let err = BusConfig::from_toml_str(text)
        .unwrap()
        .build(&kinds())
        .await
        .unwrap_err();
    assert!(err.message().contains("batch"), "{}", err.message());
    assert!(!err.message().contains("s3cret"), "{}", err.message());
}

#[tokio::test]
async fn a_configured_sql_route_delivers_in_the_namespace() {
    let dir = std::env::temp_dir().join(format!("seambus-config-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("events.db");
    // The table names one file; the environment override another, which wins.
    let text = "[bus]\nnamespace = \"shop-1\"\n\n[routes]\n\"*\" = \"queue\"\n\n\
                [transports.queue]\nkind = \"sql\"\nurl = \"sqlite://nowhere/never.db\"\n";
    let config = BusConfig::from_toml_str(text).unwrap();
    let url = format!("sqlite://{}", file.display());
    let env = move |k: &str| (k == "SEAMBUS_SQL_URL").then(|| url.clone());
    let transports = config.connect_with_env(&kinds(), &env).await.unwrap();
    assert_eq!(transports.len(), 1);
    let mut builder = seambus::Bus::builder().routing(config.routing());
    for (name, t) in transports {
        builder = builder.transport_arc(name, t);
    }
    let bus = builder.build().unwrap();
    let seen = Arc::new(Notify::new());
    let notify = seen.clone();
    let _sub = bus
        .module("b")
        .subscribe(move |p: Received<Ping>, _ctx: Context| {
            let notify = notify.clone();
            async move {
                assert_eq!(p.n, 3);
                notify.notify_one();
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .unwrap();
    bus.module("shop").publish(Ping { n: 3 }).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), seen.notified())
        .await
        .expect("delivered through the SQLite file");
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    // The namespace is the schema (table prefix, `-` made `_`).
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", file.display()))
        .await
        .unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'shop_1_%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(tables.iter().any(|t| t == "shop_1_queue"), "{tables:?}");
    drop(pool);
    let _ = std::fs::remove_dir_all(&dir);
}
