//! The bus from configuration, with no broker: what is refused at start
//! (and how the error reads), and a bus built from a file delivering.

use std::sync::Arc;
use std::time::Duration;

use seambus::config::{BusConfig, Kinds};
use seambus::{Context, ErrorKind, HandlerError, Received};
use tokio::sync::Notify;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, seambus::Event)]
#[event(name = "shop.ping", version = 1)]
struct Ping {
    n: u32,
}

#[tokio::test]
async fn a_route_to_a_transport_the_program_lacks_names_both() {
    let config = BusConfig::from_toml_str("[routes]\n\"shipments.*\" = \"natz\"").unwrap();
    let err = config.build(&Kinds::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(!err.is_retryable());
    let msg = err.message();
    assert!(
        msg.contains("`shipments.*`") && msg.contains("`natz`"),
        "{msg}"
    );
    assert!(msg.contains("in-process"), "lists what it has: {msg}");
}

#[tokio::test]
async fn a_table_of_a_kind_not_compiled_in_names_table_and_kind() {
    let text = "[routes]\n\"*\" = \"in-process\"\n\n[transports.audit]\nkind = \"mqtt\"\n";
    let config = BusConfig::from_toml_str(text).unwrap();
    let err = config.build(&Kinds::new()).await.unwrap_err();
    let msg = err.message();
    assert!(msg.contains("`audit`") && msg.contains("`mqtt`"), "{msg}");
}

#[test]
fn the_bus_table_knows_only_the_namespace() {
    let config = BusConfig::from_toml_str("[bus]\nnamespace = \"shop\"").unwrap();
    assert_eq!(config.namespace(), Some("shop"));
    let err = BusConfig::from_toml_str("[bus]\nnamspace = \"shop\"").unwrap_err();
    assert!(
        err.message().contains("`bus.namspace`"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn an_in_process_configuration_builds_a_bus_that_delivers() {
    let text = "[routes]\n\"*\" = { transport = \"in-process\", dispatch = \"inline\" }\n";
    let bus = BusConfig::from_toml_str(text)
        .unwrap()
        .build(&Kinds::new())
        .await
        .unwrap();
    let seen = Arc::new(Notify::new());
    let notify = seen.clone();
    let _sub = bus
        .module("b")
        .subscribe(move |p: Received<Ping>, _ctx: Context| {
            let notify = notify.clone();
            async move {
                assert_eq!(p.n, 7);
                notify.notify_one();
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .unwrap();
    bus.module("shop").publish(Ping { n: 7 }).await.unwrap();
    // Inline: handled inside the publish.
    tokio::time::timeout(Duration::from_secs(1), seen.notified())
        .await
        .expect("delivered");
    bus.shutdown(Duration::from_secs(1)).await.unwrap();
}
