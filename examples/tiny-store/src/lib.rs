//! Tiny Store: four modules (orders, inventory, payments, shipments) of one
//! program that talk only through Seambus events.
//!
//! Where each event flows is configuration ([`seambus::routing`]): all
//! in-process by default, one flow on a broker (L1), or one module in its own
//! process (L3, [`Settings::modules`]). No module's code changes between
//! these.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use seambus::config::{BusConfig, Kinds};
use seambus::routing::Routing;
use seambus::transport::support::redact_url;
use seambus::transport::Transport;
use seambus::{Bus, Stats, IN_PROCESS};
use tiny_store_inventory::Inventory;
use tiny_store_orders::Orders;
use tiny_store_payments::Payments;
use tiny_store_platform::{BoxError, Started, Storage};
use tiny_store_shipments::Shipments;

pub mod http;
pub mod simulate;

/// The modules of the shop, in the order the flow meets them.
pub const MODULES: [&str; 4] = ["orders", "inventory", "payments", "shipments"];

/// The transport kinds this program has compiled in: routes and
/// `[transports.<name>]` tables may name any of them.
pub fn kinds() -> Kinds {
    Kinds::new()
        .with::<seambus_nats::NatsTransport>()
        .with::<seambus_rabbitmq::RabbitMqTransport>()
        .with::<seambus_kafka::KafkaTransport>()
        .with::<seambus_sql::SqlTransport>()
}

/// The shop's own defaults under the user's configuration: events a
/// stopped process held come back after 5 s (not 30 s), and the SQL
/// transport's queue is an SQLite file next to the program.
const DEFAULTS: &str = r#"
[transports.nats]
ack_wait = "5s"

[transports.sql]
url = "sqlite://tiny-store-events.db"
lease = "5s"
"#;

/// How to run the shop: which modules, where events flow, where data lives.
/// `Debug` hides passwords.
#[derive(Clone)]
pub struct Settings {
    /// The modules this process runs (default: all four).
    pub modules: Vec<String>,
    /// Routes and transports (`[routes]`, `[transports.*]`), read by the
    /// library: which transport carries which events.
    pub bus: BusConfig,
    /// Prefix of every broker name (streams, exchanges, topics, the SQL
    /// transport's schema) and of the PostgreSQL schemas; two shops with
    /// different namespaces never meet.
    pub namespace: String,
    /// PostgreSQL URL: each module's data in its own schema. Wins over
    /// `data_dir`.
    pub database_url: Option<String>,
    /// A directory for each module's SQLite file (no server; the data
    /// survives a crash). With neither this nor `database_url`, the files
    /// are temporary.
    pub data_dir: Option<std::path::PathBuf>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("modules", &self.modules)
            .field("bus", &self.bus)
            .field("namespace", &self.namespace)
            .field(
                "database_url",
                &self.database_url.as_deref().map(redact_url),
            )
            .field("data_dir", &self.data_dir)
            .finish()
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            modules: MODULES.iter().map(|m| (*m).to_owned()).collect(),
            bus: BusConfig::from_toml_str(DEFAULTS).expect("the defaults parse"),
            namespace: "tiny_store".into(),
            database_url: None,
            data_dir: None,
        }
    }
}

impl Settings {
    /// Reads a `tiny-store.toml` (`[routes]` and `[transports.*]` for the
    /// bus, `[store]` and `[process]` for the shop), then applies the
    /// environment: `SEAMBUS_ROUTES` and each transport's own
    /// (`SEAMBUS_NATS_URL`, `SEAMBUS_RABBITMQ_URL`, `SEAMBUS_KAFKA_BROKERS`,
    /// `SEAMBUS_SQL_URL`, read when the bus is built), `TINY_STORE_NAMESPACE`,
    /// `TINY_STORE_DATABASE_URL`, `TINY_STORE_DATA_DIR`.
    pub fn load(config: Option<&Path>) -> Result<Self, BoxError> {
        let mut s = Self::default();
        if let Some(path) = config {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            s.apply_toml(&text)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        if let Some(routing) = Routing::from_env()? {
            s.bus.set_routing(routing);
        }
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let Some(v) = env("TINY_STORE_NAMESPACE") {
            s.namespace = v;
        }
        if let Some(v) = env("TINY_STORE_DATABASE_URL") {
            s.database_url = Some(v);
        }
        if let Some(v) = env("TINY_STORE_DATA_DIR") {
            s.data_dir = Some(v.into());
        }
        Ok(s)
    }

    /// Applies the settings of a TOML document.
    pub fn apply_toml(&mut self, text: &str) -> Result<(), BoxError> {
        let bus = BusConfig::from_toml_str(text)?;
        self.bus = std::mem::take(&mut self.bus).merge(bus);
        let doc: toml::Table = text.parse()?;
        let get = |key: &str| -> Result<Option<String>, BoxError> {
            match doc.get("store").and_then(|t| t.get(key)) {
                None => Ok(None),
                Some(toml::Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(format!("`store.{key}` must be a string").into()),
            }
        };
        if let Some(v) = get("namespace")? {
            self.namespace = v;
        }
        if let Some(v) = get("database_url")? {
            self.database_url = Some(v);
        }
        if let Some(v) = get("data_dir")? {
            self.data_dir = Some(v.into());
        }
        match doc.get("process").and_then(|p| p.get("modules")) {
            None => {}
            Some(toml::Value::Array(list)) => {
                let names: Option<Vec<&str>> = list.iter().map(toml::Value::as_str).collect();
                let names = names.ok_or("`process.modules` must be a list of module names")?;
                *self = std::mem::take(self).with_modules(&names.join(","))?;
            }
            Some(_) => return Err("`process.modules` must be a list of module names".into()),
        }
        Ok(())
    }

    /// Keeps the modules named in `list` (`orders,inventory`).
    pub fn with_modules(mut self, list: &str) -> Result<Self, BoxError> {
        let mut modules = Vec::new();
        for m in list.split(',').map(str::trim).filter(|m| !m.is_empty()) {
            if !MODULES.contains(&m) {
                return Err(
                    format!("unknown module `{m}`; modules: {}", MODULES.join(", ")).into(),
                );
            }
            if !modules.iter().any(|k| k == m) {
                modules.push(m.to_owned());
            }
        }
        if modules.is_empty() {
            return Err("--modules names no module".into());
        }
        self.modules = modules;
        Ok(self)
    }

    /// Whether this process runs `module`.
    pub fn runs(&self, module: &str) -> bool {
        self.modules.iter().any(|m| m == module)
    }

    /// The routes.
    pub fn routing(&self) -> &Routing {
        self.bus.routing()
    }

    /// The bus configuration with the shop's namespace.
    pub fn bus_config(&self) -> BusConfig {
        let mut bus = self.bus.clone();
        bus.set_namespace(&self.namespace);
        bus
    }

    /// Where the modules keep their data.
    pub fn storage(&self) -> Storage {
        match (&self.database_url, &self.data_dir) {
            (Some(url), _) => Storage::Postgres {
                url: url.clone(),
                schema_prefix: format!("{}_", self.namespace),
            },
            (None, Some(dir)) => Storage::Sqlite { dir: dir.clone() },
            (None, None) => Storage::Temporary,
        }
    }
}

/// A transport's own handle, for deleting its state.
enum Broker {
    Nats(seambus_nats::NatsTransport),
    RabbitMq(seambus_rabbitmq::RabbitMqTransport),
    Kafka(seambus_kafka::KafkaTransport, String),
    Sql(seambus_sql::SqlTransport),
}

impl Broker {
    /// Transport `name` of the routes as its own type (`None` for the
    /// in-process one, which keeps nothing).
    async fn connect(settings: &Settings, name: &str) -> Result<Option<Self>, BoxError> {
        let bus = settings.bus_config();
        Ok(Some(match bus.kind_of(name)? {
            "nats" => Self::Nats(bus.connect_as(name).await?),
            "rabbitmq" => Self::RabbitMq(bus.connect_as(name).await?),
            "kafka" => Self::Kafka(bus.connect_as(name).await?, settings.namespace.clone()),
            "sql" => Self::Sql(bus.connect_as(name).await?),
            _ => return Ok(None),
        }))
    }

    /// Deletes the groups of every flow (consumer, position, held and
    /// dead-lettered events), then the namespace's streams, exchanges and
    /// event topics. Joins no group and consumes nothing.
    async fn delete_state(&self) -> Result<(), BoxError> {
        let groups = FLOWS.iter().flat_map(|(event, _, handlers)| {
            handlers
                .iter()
                .map(move |module| seambus::transport::GroupId::new(*module, *event))
        });
        for group in groups {
            match self {
                Self::Nats(t) => t.delete_group(&group).await?,
                Self::RabbitMq(t) => t.delete_group(&group).await?,
                Self::Kafka(t, _) => t.delete_group(&group).await?,
                Self::Sql(t) => t.delete_group(&group).await?,
            }
        }
        match self {
            Self::Nats(t) => t.delete_streams().await?,
            Self::RabbitMq(t) => t.delete_topology().await?,
            Self::Sql(t) => t.drop_tables().await?,
            Self::Kafka(t, namespace) => {
                let topics: Vec<String> = FLOWS
                    .iter()
                    .map(|(e, _, _)| format!("{namespace}.{e}"))
                    .collect();
                let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
                t.delete_topics(&topics).await?
            }
        }
        Ok(())
    }

    async fn shutdown(&self) -> Result<(), BoxError> {
        let deadline = Duration::from_secs(5);
        match self {
            Self::Nats(t) => t.shutdown(deadline).await?,
            Self::RabbitMq(t) => t.shutdown(deadline).await?,
            Self::Kafka(t, _) => t.shutdown(deadline).await?,
            Self::Sql(t) => t.shutdown(deadline).await?,
        };
        Ok(())
    }
}

/// Deletes the namespace's state on every broker the routes name (each
/// flow's groups with their held and dead-lettered events, then streams,
/// exchanges and event topics), without starting a module: nothing is
/// consumed, no group is joined. `tiny-store reset`.
pub async fn reset(settings: &Settings) -> Result<(), BoxError> {
    for name in settings.routing().transports() {
        if let Some(broker) = Broker::connect(settings, name).await? {
            broker.delete_state().await?;
            broker.shutdown().await?;
        }
    }
    Ok(())
}

/// The shop's modules as each contract declares them (with the events
/// each publishes): a module name the shop does not have is refused.
pub const DECLARED: [&seambus::ModuleDecl; 4] = [
    &tiny_store_orders_contract::MODULE,
    &tiny_store_inventory_contract::MODULE,
    &tiny_store_payments_contract::MODULE,
    &tiny_store_shipments_contract::MODULE,
];

/// Every event of the shop: its name, the module that publishes it, and
/// the modules that handle it.
pub const FLOWS: [(&str, &str, &[&str]); 8] = [
    ("orders.order_placed", "orders", &["inventory"]),
    ("orders.order_confirmed", "orders", &["shipments"]),
    ("orders.order_cancelled", "orders", &["inventory"]),
    ("inventory.stock_reserved", "inventory", &["payments"]),
    ("inventory.stock_rejected", "inventory", &["orders"]),
    ("payments.payment_captured", "payments", &["orders"]),
    ("payments.payment_failed", "payments", &["orders"]),
    ("shipments.order_shipped", "shipments", &["orders"]),
];

/// An event between a module of this process and one of another process
/// must travel on a broker: on an in-process route it would reach no one
/// (or never arrive). A startup error, naming the event.
fn check_crossings(bus: &Bus, settings: &Settings) -> Result<(), BoxError> {
    for (event, publisher, handlers) in FLOWS {
        let (mut local, mut remote) = (false, false);
        for m in std::iter::once(publisher).chain(handlers.iter().copied()) {
            let runs = settings.runs(m);
            local |= runs;
            remote |= !runs;
        }
        if local && remote && bus.route_of(event) == IN_PROCESS {
            return Err(format!(
                "`{event}` (published by {publisher}, handled by {}) crosses between this \
                 process and another, but its route is in-process: route it to a broker",
                handlers.join(", ")
            )
            .into());
        }
    }
    Ok(())
}

/// The running shop: the bus and the modules this process runs.
pub struct Shop {
    /// The bus.
    pub bus: Bus,
    /// The orders module, when this process runs it.
    pub orders: Option<Orders>,
    /// The inventory module, when this process runs it.
    pub inventory: Option<Inventory>,
    /// The payments module, when this process runs it.
    pub payments: Option<Payments>,
    /// The shipments module, when this process runs it.
    pub shipments: Option<Shipments>,
    started: Vec<Started>,
    relays: std::sync::Mutex<Vec<seambus_sql::Relay>>,
    settings: Settings,
}

impl Shop {
    /// Connects the transports the routes name, opens each module's
    /// storage, and starts the modules' subscriptions.
    pub async fn start(settings: &Settings) -> Result<Self, BoxError> {
        let bus = settings
            .bus_config()
            .builder(&kinds())
            .await?
            .upcast::<tiny_store_orders_contract::OrderPlacedV1, tiny_store_orders_contract::OrderPlaced>()
            .declare(&DECLARED)
            .build()?;
        check_crossings(&bus, settings)?;
        let storage = settings.storage();
        let mut shop = Self {
            orders: None,
            inventory: None,
            payments: None,
            shipments: None,
            started: Vec::new(),
            relays: std::sync::Mutex::default(),
            settings: settings.clone(),
            bus,
        };
        // Consumers first, so nothing published below finds no subscriber.
        if settings.runs(tiny_store_shipments::MODULE) {
            let m = Shipments::open(&shop.bus, &storage).await?;
            shop.started.push(m.start().await?);
            shop.shipments = Some(m);
        }
        if settings.runs(tiny_store_payments::MODULE) {
            let m = Payments::open(&shop.bus, &storage).await?;
            shop.started.push(m.start().await?);
            shop.payments = Some(m);
        }
        if settings.runs(tiny_store_inventory::MODULE) {
            let m = Inventory::open(&shop.bus, &storage).await?;
            shop.started.push(m.start().await?);
            shop.inventory = Some(m);
        }
        if settings.runs(tiny_store_orders::MODULE) {
            let m = Orders::open(&shop.bus, &storage).await?;
            shop.started.push(m.start().await?);
            shop.orders = Some(m);
        }
        shop.started
            .sort_by_key(|s| MODULES.iter().position(|m| *m == s.module));
        let relays = shop.started.iter_mut().filter_map(|s| s.relay.take());
        shop.relays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(relays);
        tracing::info!(modules = ?settings.modules, routes = %settings.routing(), "shop started");
        Ok(shop)
    }

    /// Each running module's subscriptions and their stats.
    pub fn summary(&self) -> Summary {
        Summary {
            modules: self
                .started
                .iter()
                .map(|s| (s.module.to_owned(), s.stats()))
                .collect(),
        }
    }

    /// Stops forwarding the modules' outboxes (what they hold is forwarded
    /// at the next start), stops taking events, lets handlers finish (up
    /// to `deadline`) and closes the transports.
    pub async fn shutdown(&self, deadline: Duration) -> Result<(), BoxError> {
        let relays = std::mem::take(
            &mut *self
                .relays
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for relay in relays {
            relay.stop().await;
        }
        let report = self.bus.shutdown(deadline).await?;
        if !report.drained {
            tracing::warn!(
                unfinished = report.unfinished.len(),
                "shutdown left events for redelivery"
            );
        }
        Ok(())
    }
}

impl Shop {
    /// Deletes the namespace's state on this shop's brokers, as
    /// [`reset`] does: for demos and tests, after [`Shop::shutdown`].
    pub async fn delete_broker_state(&self) -> Result<(), BoxError> {
        reset(&self.settings).await
    }
}

/// Per-module counters of this process.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Module name, then each subscription's name and stats.
    pub modules: Vec<(String, Vec<(String, Stats)>)>,
}

impl Summary {
    /// The sum of a module's counters: (handled, retried, dead-lettered).
    pub fn totals(&self, module: &str) -> (u64, u64, u64) {
        self.modules
            .iter()
            .filter(|(m, _)| m == module)
            .flat_map(|(_, subs)| subs)
            .fold((0, 0, 0), |(h, r, d), (_, s)| {
                (h + s.succeeded, r + s.retried, d + s.dead_lettered)
            })
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<10} {:<26} {:>8} {:>8} {:>6} {:>10} {:>10}",
            "module", "subscription", "handled", "failures", "dead", "p50", "p99"
        )?;
        for (module, subs) in &self.modules {
            for (name, s) in subs {
                writeln!(
                    f,
                    "{:<10} {:<26} {:>8} {:>8} {:>6} {:>10} {:>10}",
                    module,
                    name,
                    s.succeeded,
                    s.retried,
                    s.dead_lettered,
                    format!("{:.1?}", s.handling_p50),
                    format!("{:.1?}", s.handling_p99),
                )?;
            }
            let (h, r, d) = self.totals(module);
            writeln!(f, "{:<10} {:<26} {h:>8} {r:>8} {d:>6}", module, "(all)")?;
        }
        Ok(())
    }
}

/// Stock levels by SKU.
pub type StockCounts = BTreeMap<String, tiny_store_inventory::Level>;
