//! L2, data isolation: with a database URL each module keeps its data in
//! its own PostgreSQL schema. The whole scenario runs on it, the books
//! balance, every table sits in its owner's schema (none in `public`, none
//! in another module's), and the data outlives the process.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tiny_store::simulate::{self, Plan};
use tiny_store::Shop;
use tiny_store_orders::OrderState;

/// The tables `seambus-sql` makes in a module's schema.
const SEAMBUS_TABLES: [&str; 7] = [
    "dead_letters",
    "groups",
    "inbox",
    "leases",
    "meta",
    "outbox",
    "queue",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_module_owns_a_schema_and_the_books_balance() {
    let url = common::database_url();
    let Some(admin) = common::postgres(&url).await else {
        return;
    };
    let mut settings = common::settings("pg", "");
    settings.database_url = Some(url.clone());
    let ns = settings.namespace.clone();

    let shop = Shop::start(&settings).await.expect("start on PostgreSQL");
    let plan = Plan::new(150);
    let initial = simulate::seed(&shop, &plan).await.unwrap();
    let report = simulate::run(&shop, &plan, |_| {}).await.unwrap();
    let audit = simulate::audit(&shop, &initial, &report).await.unwrap();
    shop.shutdown(Duration::from_secs(10)).await.unwrap();
    assert!(report.all_settled(), "{report:?}");
    assert!(audit.problems.is_empty(), "{:#?}", audit.problems);
    assert!(report.count(OrderState::Shipped) > 0);
    assert!(report.count(OrderState::Cancelled) > 0);

    // Every table is in its module's schema, and only there.
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_schema::text, table_name::text FROM information_schema.tables \
         WHERE table_schema LIKE $1 || '\\_%' OR (table_schema = 'public' \
         AND table_name IN ('orders', 'stock', 'reservations', 'payments', 'shipments'))",
    )
    .bind(&ns)
    .fetch_all(&admin)
    .await
    .unwrap();
    let mut tables: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (schema, table) in rows {
        tables.entry(schema).or_default().insert(table);
    }
    let expected: BTreeMap<String, BTreeSet<String>> = [
        ("orders", &["orders"][..]),
        ("inventory", &["reservations", "stock"][..]),
        ("payments", &["payments"][..]),
        ("shipments", &["shipments"][..]),
    ]
    .into_iter()
    .map(|(m, t)| {
        // With the module's outbox and inbox (the SQL transport's tables).
        let seambus = SEAMBUS_TABLES.iter();
        (
            format!("{ns}_{m}"),
            t.iter().chain(seambus).map(|s| (*s).to_owned()).collect(),
        )
    })
    .collect();
    assert_eq!(tables, expected);

    // The data outlives the process: a new shop on the same schemas sees
    // the same orders and stock.
    let again = Shop::start(&settings).await.unwrap();
    let orders = again.orders.as_ref().unwrap();
    for o in &report.orders {
        assert_eq!(orders.get(o.order_id).await.unwrap().as_ref(), Some(o));
    }
    let levels = again.inventory.as_ref().unwrap().levels().await.unwrap();
    assert_eq!(
        levels,
        shop.inventory.as_ref().unwrap().levels().await.unwrap()
    );
    again.shutdown(Duration::from_secs(10)).await.unwrap();

    for m in tiny_store::MODULES {
        common::drop_schema(&admin, &format!("{ns}_{m}")).await;
    }
}
