//! The shop itself killed (`SIGKILL`, no clean shutdown) and started
//! again, its data and its event flows durable:
//!
//! - in the middle of a run with every flow on the SQL transport, on
//!   SQLite files (no server) and on PostgreSQL: every order the API
//!   accepted ends shipped or cancelled, the books balance, nothing was
//!   applied twice (`tiny-store check`);
//! - between the commit of orders and their forwarding to a broker (a NATS
//!   server of this test's own, stopped meanwhile): the events committed
//!   in the outboxes are forwarded after the restart.

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::server::Server;
use futures_util::StreamExt;
use serde_json::json;
use sqlx::AnyPool;

/// Units of each SKU in stock at the start (some orders find none).
const STOCK: u64 = 40;
/// Orders offered in the first run, at once, and how many the API has
/// accepted when the shop is killed.
const ORDERS: usize = 300;
const CONCURRENCY: usize = 8;
const KILL_AFTER: usize = 80;
/// Orders placed after the restart.
const AFTER: usize = 40;

/// The body of order `i`: one to three lines of the catalogue.
fn order(i: usize) -> serde_json::Value {
    let catalogue = tiny_store::simulate::CATALOGUE;
    let lines: Vec<_> = (0..1 + i % 3)
        .map(|k| {
            let (sku, price) = catalogue[(i * 7 + k * 3) % catalogue.len()];
            json!({ "sku": sku, "quantity": 1 + (i + k) % 3, "unit_price_cents": price })
        })
        .collect();
    let customer = if i % 23 == 22 {
        format!("blocked-{i}")
    } else {
        format!("customer-{}", i % 40)
    };
    json!({ "customer": customer, "lines": lines })
}

/// Where a run keeps its data and its queue.
struct Store {
    env: Vec<(String, String)>,
    /// The orders module's database and table, for the test's own reads.
    orders_url: String,
    orders_table: String,
    dir: tempfile::TempDir,
    postgres: Option<(sqlx::PgPool, String)>,
}

impl Store {
    fn sqlite(test: &str, routes: &str) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let data = dir.path().display().to_string();
        let env = vec![
            ("SEAMBUS_ROUTES".into(), routes.into()),
            (
                "SEAMBUS_SQL_URL".into(),
                format!("sqlite://{data}/events.db"),
            ),
            ("TINY_STORE_DATA_DIR".into(), data.clone()),
            ("TINY_STORE_NAMESPACE".into(), common::namespace(test)),
        ];
        Self {
            env,
            orders_url: format!("sqlite://{data}/orders.db"),
            orders_table: "orders".into(),
            dir,
            postgres: None,
        }
    }

    async fn postgres(test: &str, routes: &str) -> Option<Self> {
        let url = common::database_url();
        let admin = common::postgres(&url).await?;
        let namespace = common::namespace(test);
        let env = vec![
            ("SEAMBUS_ROUTES".into(), routes.into()),
            ("SEAMBUS_SQL_URL".into(), url.clone()),
            ("TINY_STORE_DATABASE_URL".into(), url.clone()),
            ("TINY_STORE_NAMESPACE".into(), namespace.clone()),
        ];
        Some(Self {
            env,
            orders_table: format!("{namespace}_orders.orders"),
            orders_url: url,
            dir: tempfile::tempdir().expect("a temporary directory"),
            postgres: Some((admin, namespace)),
        })
    }

    fn env(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    fn serve(&self) -> Server {
        let stock = STOCK.to_string();
        Server::spawn(
            &["serve", "--addr", "127.0.0.1:0", "--stock", &stock],
            &self.env(),
        )
    }

    /// Every order and its state, read from the orders module's database.
    async fn states(&self) -> Vec<(String, String)> {
        sqlx::any::install_default_drivers();
        let pool = AnyPool::connect(&self.orders_url)
            .await
            .expect("open the orders database");
        let rows = sqlx::query_as(&format!(
            "SELECT order_id, state FROM {}",
            self.orders_table
        ))
        .fetch_all(&pool)
        .await
        .expect("read the orders");
        pool.close().await;
        rows
    }

    /// `tiny-store check`: resumes what is pending, waits until every
    /// order settled and checks the books; fails the test if they do not
    /// balance.
    fn check(&self) {
        let stock = STOCK.to_string();
        let mut check = Server::spawn(
            &["check", "--stock", &stock, "--timeout", "120"],
            &self.env(),
        );
        let (status, stdout) = check.wait_exit(Duration::from_secs(180));
        assert!(
            status.success() && stdout.iter().any(|l| l.starts_with("books balance")),
            "tiny-store check: {status}; stdout: {stdout:#?}"
        );
    }

    async fn cleanup(self) {
        if let Some((admin, ns)) = &self.postgres {
            for m in tiny_store::MODULES {
                common::drop_schema(admin, &format!("{ns}_{m}")).await;
            }
            // The SQL transport's own schema.
            common::drop_schema(admin, ns).await;
        }
        drop(self.dir);
    }
}

/// Offers `ORDERS` orders, `CONCURRENCY` at a time, and returns the ids
/// the API accepted (201) as they come; the others failed (the shop was
/// killed under them).
fn place_in_background(
    shop: &Server,
) -> (
    Arc<Mutex<Vec<String>>>,
    tokio::sync::watch::Receiver<usize>,
    tokio::task::JoinHandle<()>,
) {
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let (count, counted) = tokio::sync::watch::channel(0);
    let (url, http, list) = (shop.url("/orders"), shop.http.clone(), accepted.clone());
    let task = tokio::spawn(async move {
        let mut replies = futures_util::stream::iter(0..ORDERS)
            .map(|i| {
                let (url, http) = (url.clone(), http.clone());
                async move {
                    let resp = http.post(&url).json(&order(i)).send().await.ok()?;
                    if resp.status() != reqwest::StatusCode::CREATED {
                        return None;
                    }
                    let body: serde_json::Value = resp.json().await.ok()?;
                    body["order_id"].as_str().map(str::to_owned)
                }
            })
            .buffer_unordered(CONCURRENCY);
        while let Some(reply) = replies.next().await {
            if let Some(id) = reply {
                let mut list = list.lock().unwrap();
                list.push(id);
                count.send_replace(list.len());
            }
        }
    });
    (accepted, counted, task)
}

/// Checks that every accepted order exists and is final.
async fn all_final(store: &Store, accepted: &[String]) {
    let states = store.states().await;
    for id in accepted {
        let state = states
            .iter()
            .find(|(o, _)| o == id)
            .map(|(_, s)| s.as_str());
        assert!(
            matches!(state, Some("shipped" | "cancelled")),
            "accepted order {id} is {state:?}"
        );
    }
}

async fn killed_mid_run(store: Store) {
    let mut shop = store.serve();
    let (accepted, mut count, placing) = place_in_background(&shop);
    tokio::time::timeout(
        Duration::from_secs(120),
        count.wait_for(|n| *n >= KILL_AFTER),
    )
    .await
    .unwrap_or_else(|_| panic!("{KILL_AFTER} orders not accepted in 120 s"))
    .expect("the placing task");
    shop.crash();
    placing.await.expect("the placing task");
    let mut accepted = accepted.lock().unwrap().clone();

    // The kill came in the middle of the run: orders were under way.
    let open = store
        .states()
        .await
        .iter()
        .filter(|(_, s)| s == "placed" || s == "confirmed")
        .count();
    assert!(open > 0, "every order had settled before the kill");

    let shop = store.serve();
    for i in 0..AFTER {
        let placed = shop.place("/orders", order(ORDERS + i)).await;
        accepted.push(placed["order_id"].as_str().unwrap().to_owned());
    }
    drop(shop); // killed again, with the last orders under way
    store.check();
    all_final(&store, &accepted).await;
    store.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_run_durable_on_sqlite() {
    killed_mid_run(Store::sqlite("killed_sqlite", "*=sql")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_run_durable_on_postgres() {
    let Some(store) = Store::postgres("killed_pg", "*=sql").await else {
        return;
    };
    killed_mid_run(store).await;
}

/// A NATS server with JetStream of this test's own, on a free port, with
/// its store in a directory of its own: the test may stop it.
struct Nats {
    port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
}

impl Nats {
    /// `None` (skipped) when `nats-server` is not installed; a failure
    /// instead under `SEAMBUS_REQUIRE_BROKERS=1`.
    fn start() -> Option<Self> {
        let exe = Path::new("/usr/sbin/nats-server");
        if !exe.exists() {
            let why = "nats-server is not installed at /usr/sbin/nats-server";
            assert!(
                std::env::var("SEAMBUS_REQUIRE_BROKERS").as_deref() != Ok("1"),
                "required (SEAMBUS_REQUIRE_BROKERS=1): {why}"
            );
            eprintln!("SKIPPED: {why}");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut nats = Self {
            port,
            store: tempfile::tempdir().expect("a temporary directory"),
            child: None,
        };
        nats.restart();
        Some(nats)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again, on the same store) and waits until it
    /// accepts connections.
    fn restart(&mut self) {
        let child = Command::new("/usr/sbin/nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (SIGTERM: a clean stop keeps its store) and waits.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let _ = child.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_commit_and_forwarding_to_a_broker() {
    let Some(mut nats) = Nats::start() else {
        return;
    };
    let mut store = Store::sqlite("killed_fwd", "*=nats");
    store.env.push(("SEAMBUS_NATS_URL".into(), nats.url()));
    let mut shop = store.serve();
    let mut accepted = Vec::new();
    for i in 0..10 {
        let placed = shop.place("/orders", order(i)).await;
        accepted.push(placed["order_id"].as_str().unwrap().to_owned());
    }
    for id in &accepted {
        shop.settled(id).await;
    }

    // The broker goes away: orders are still taken (stored with their
    // event in one transaction), and none can move on.
    nats.stop();
    let mut waiting = Vec::new();
    for i in 10..30 {
        let placed = shop.place("/orders", order(i)).await;
        waiting.push(placed["order_id"].as_str().unwrap().to_owned());
    }
    shop.crash();
    let states = store.states().await;
    for id in &waiting {
        assert!(
            states.iter().any(|(o, s)| o == id && s == "placed"),
            "order {id} moved on with no broker: {states:?}"
        );
    }
    let outbox: i64 = {
        sqlx::any::install_default_drivers();
        let pool = AnyPool::connect(&store.orders_url).await.unwrap();
        let n = sqlx::query_scalar("SELECT COUNT(*) FROM seambus_outbox")
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        n
    };
    assert!(
        outbox >= waiting.len() as i64,
        "{outbox} events in the orders outbox for {} orders",
        waiting.len()
    );

    // The broker and the shop come back: the committed events go out.
    nats.restart();
    let mut shop = store.serve();
    for id in &waiting {
        shop.settled(id).await;
    }
    shop.stop_cleanly();
    accepted.extend(waiting);
    store.check();
    all_final(&store, &accepted).await;
    store.cleanup().await;
}
