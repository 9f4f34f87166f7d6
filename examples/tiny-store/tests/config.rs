//! The configuration files of the ladder (`config/*.toml`, shown in the
//! READMEs) say what the docs claim, and bad configuration is a clear
//! startup error.

use std::path::PathBuf;

use seambus::Dispatch;
use tiny_store::{Settings, Shop};
use tiny_store_platform::Storage;

fn file(name: &str) -> Settings {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut s = Settings::default();
    s.apply_toml(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    s
}

#[test]
fn each_rung_of_the_ladder_is_a_configuration() {
    let l0 = file("l0-inline.toml");
    let default = l0.routing().default_rule().unwrap();
    assert_eq!(default.dispatch, Some(Dispatch::Inline));
    assert_eq!(l0.routing().transports(), ["in-process"]);

    let l1 = file("l1-queued.toml");
    assert_eq!(
        l1.routing().default_rule().unwrap().dispatch,
        Some(Dispatch::Queued)
    );

    let broker = file("l1-broker.toml");
    assert_eq!(broker.routing().transports(), ["in-process", "nats"]);
    for event in ["orders.order_confirmed", "shipments.order_shipped"] {
        let rule = broker.routing().rule_for(event).unwrap();
        assert_eq!(rule.transport.as_deref(), Some("nats"), "{event}");
    }
    assert!(broker.routing().rule_for("orders.order_placed").is_none());
    assert_eq!(broker.modules, tiny_store::MODULES);

    // Extraction: the same routes in both processes, the modules split.
    let shop = file("l3-shop.toml");
    let shipping = file("l3-shipments.toml");
    assert_eq!(shop.routing(), broker.routing());
    assert_eq!(shipping.routing(), broker.routing());
    assert_eq!(shop.modules, ["orders", "inventory", "payments"]);
    assert_eq!(shipping.modules, ["shipments"]);
    // Both keep their data on disk, with no server.
    for s in [&shop, &shipping] {
        assert!(matches!(s.storage(), Storage::Sqlite { .. }), "{s:?}");
    }

    // Durable with no broker: every flow on the SQL transport, on SQLite.
    let durable = file("l1-durable.toml");
    assert_eq!(durable.routing().transports(), ["sql"]);
    let durable_doc: toml::Table = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/l1-durable.toml"),
    )
    .unwrap()
    .parse()
    .unwrap();
    assert!(durable_doc["transports"]["sql"]["url"]
        .as_str()
        .unwrap()
        .starts_with("sqlite://"));
    assert!(matches!(durable.storage(), Storage::Sqlite { .. }));

    let l2 = file("l2-postgres.toml");
    assert!(l2.database_url.is_some());
    assert_eq!(l2.routing(), l1.routing());
}

#[tokio::test]
async fn bad_configuration_is_a_startup_error_that_names_the_culprit() {
    let mut s = Settings::default();
    s.apply_toml("[routes]\n\"shipments.*\" = \"natz\"")
        .unwrap();
    let err = Shop::start(&s).await.err().expect("an unknown transport");
    // The library's error, naming the route and the transport, and what
    // this program has.
    assert!(
        err.to_string().contains("`shipments.*`") && err.to_string().contains("`natz`"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("in-process, nats, rabbitmq, kafka, sql"),
        "{err}"
    );

    // A key the transport does not have.
    let mut s = Settings::default();
    s.apply_toml("[routes]\n\"*\" = \"nats\"\n[transports.nats]\nserver = \"nats://x\"")
        .unwrap();
    let err = Shop::start(&s).await.err().expect("an unknown key");
    assert!(
        err.to_string().contains("[transports.nats]") && err.to_string().contains("server"),
        "{err}"
    );

    // A module split with an in-process route between the halves.
    let s = Settings::default().with_modules("shipments").unwrap();
    let err = Shop::start(&s)
        .await
        .err()
        .expect("a crossing on an in-process route");
    assert!(
        err.to_string().contains("`orders.order_confirmed`"),
        "{err}"
    );
    assert!(err.to_string().contains("route it to a broker"), "{err}");

    let mut s = Settings::default();
    let err = s
        .apply_toml("[routes]\n\"orders.*\" = \"nats\"\n\"orders.order_placed\" = \"kafka\"")
        .unwrap_err();
    assert!(err.to_string().contains("overlap"), "{err}");

    let err = s
        .apply_toml("[process]\nmodules = [\"orders\", \"billing\"]")
        .unwrap_err();
    assert!(
        err.to_string().contains("unknown module `billing`"),
        "{err}"
    );
    let err = s.apply_toml("[process]\nmodules = \"orders\"").unwrap_err();
    assert!(err.to_string().contains("list of module names"), "{err}");
}

#[test]
fn debug_output_hides_passwords() {
    let mut s = Settings {
        database_url: Some("postgres://shop:s3cret@db/shop".into()),
        ..Settings::default()
    };
    s.bus
        .table_mut("nats")
        .insert("servers".into(), vec!["nats://t0ken@nats:4222"].into());
    let text = format!("{s:?}");
    assert!(
        !text.contains("s3cret") && !text.contains("guest:guest"),
        "{text}"
    );
    assert!(text.contains("shop:<redacted>@db"), "{text}");
}

#[tokio::test]
async fn the_shop_declares_its_modules_and_refuses_a_misspelt_one() {
    let shop = Shop::start(&Settings::default()).await.unwrap();
    let declared: Vec<&str> = shop
        .bus
        .declared_modules()
        .iter()
        .map(|m| m.name())
        .collect();
    assert_eq!(declared, tiny_store::MODULES);
    let shipped = tiny_store_shipments_contract::OrderShipped {
        order_id: uuid::Uuid::now_v7(),
        tracking_number: "TS-1".into(),
    };
    let err = shop
        .bus
        .module("shipmnets")
        .publish(shipped)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("`shipmnets`"), "{err}");
    shop.shutdown(std::time::Duration::from_secs(5))
        .await
        .unwrap();
}
