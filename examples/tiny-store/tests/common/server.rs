//! A `tiny-store` process under test: started with arguments, read
//! line by line, stopped with SIGTERM (or killed), never leaked.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Units of each SKU the server puts in stock.
pub const STOCK: u64 = 5;

/// How long a server may take to start and to stop.
pub const STARTUP: Duration = Duration::from_secs(60);

/// How long an order may take to reach a final state.
pub const SETTLE: Duration = Duration::from_secs(30);

/// How often the state of an order or of the stock is read while waiting.
pub const POLL: Duration = Duration::from_millis(50);

/// A running `tiny-store serve`; killed when dropped, so no test leaks one.
pub struct Server {
    child: Child,
    addr: SocketAddr,
    /// Lines of the server's stdout, read by a thread until EOF.
    stdout: mpsc::Receiver<String>,
    /// The lines read from `stdout` so far.
    seen: Vec<String>,
    pub http: reqwest::Client,
}

impl Server {
    /// Starts a server whose namespace is unique to `test`, and waits (at
    /// most [`STARTUP`]) until it says where it listens.
    pub fn start(test: &str) -> Self {
        let namespace = format!("http_{test}_{}", std::process::id());
        let stock = STOCK.to_string();
        Self::spawn(
            &[
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--stock",
                &stock,
                "--namespace",
                &namespace,
            ],
            &[],
        )
    }

    /// Starts `tiny-store` with `args` and `env` (on top of a
    /// clean environment: in-process routes, temporary storage), and waits
    /// until it is ready: for `serve`, until it says where it listens; for
    /// `reset`, not at all; otherwise (`run`), until it says it is ready.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tiny-store"))
            .args(args)
            // In-process routes and temporary storage, whatever the caller's
            // environment says.
            .env_remove("SEAMBUS_ROUTES")
            .env_remove("TINY_STORE_CONFIG")
            .env_remove("TINY_STORE_DATABASE_URL")
            .env_remove("TINY_STORE_DATA_DIR")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start tiny-store");
        let out = child.stdout.take().expect("stdout is piped");
        let (tx, stdout) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stdout,
            seen: Vec::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("cannot build the HTTP client"),
        };
        if args.contains(&"reset") || args.contains(&"check") {
            return server;
        }
        if !args.contains(&"serve") {
            server.wait_for_line("tiny-store: ready");
            return server;
        }
        let line = server.wait_for_line("tiny-store: listening on http://");
        let addr = line
            .trim()
            .strip_prefix("tiny-store: listening on http://")
            .expect("the line was matched on this prefix");
        server.addr = addr
            .parse()
            .unwrap_or_else(|e| panic!("`{addr}` is not a socket address: {e}"));
        server
    }

    /// Reads stdout until a line starts with `prefix`; panics at EOF or
    /// after [`STARTUP`].
    pub fn wait_for_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + STARTUP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "no line starting with `{prefix}` within {STARTUP:?}; stdout so far: {:#?}",
                    self.seen
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                    "tiny-store closed stdout before printing `{prefix}` (exit: {:?}); stdout: {:#?}",
                    self.child.try_wait(),
                    self.seen
                ),
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// Posts a raw body as `application/json`.
    pub async fn post_raw(&self, path: &str, body: &'static str) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// Places an order through `path`, checks the 201 and returns the order.
    pub async fn place(&self, path: &str, body: Value) -> Value {
        let resp = self.post_json(path, &body).await;
        let status = resp.status();
        let text = resp.text().await.expect("a response body");
        assert_eq!(
            status,
            reqwest::StatusCode::CREATED,
            "POST {path} {body}: {text}"
        );
        let order: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("POST {path}: body is not JSON ({e}): {text}"));
        let id = order["order_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no order_id in {order}"));
        uuid::Uuid::parse_str(id).unwrap_or_else(|e| panic!("order_id `{id}`: {e}"));
        let state = order["state"].as_str().unwrap_or_default();
        assert!(
            ["placed", "confirmed", "shipped", "cancelled"].contains(&state),
            "unknown state in {order}"
        );
        order
    }

    /// Reads the order until it is shipped or cancelled (at most
    /// [`SETTLE`]); returns it then.
    pub async fn settled(&self, order_id: &str) -> Value {
        let deadline = Instant::now() + SETTLE;
        loop {
            let resp = self.get(&format!("/orders/{order_id}")).await;
            assert_eq!(
                resp.status(),
                reqwest::StatusCode::OK,
                "GET order {order_id}"
            );
            let order: Value = resp.json().await.expect("an order as JSON");
            if matches!(order["state"].as_str(), Some("shipped" | "cancelled")) {
                return order;
            }
            assert!(
                Instant::now() < deadline,
                "order {order_id} did not settle within {SETTLE:?}: {order}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// `GET /orders/{id}` as JSON.
    pub async fn order(&self, order_id: &str) -> Value {
        let resp = self.get(&format!("/orders/{order_id}")).await;
        assert_eq!(
            resp.status(),
            reqwest::StatusCode::OK,
            "GET order {order_id}"
        );
        resp.json().await.expect("an order as JSON")
    }

    /// Reads the order until its state is `state` (at most [`SETTLE`]).
    pub async fn wait_state(&self, order_id: &str, state: &str) -> Value {
        let deadline = Instant::now() + SETTLE;
        loop {
            let order = self.order(order_id).await;
            if order["state"] == state {
                return order;
            }
            assert!(
                Instant::now() < deadline,
                "order {order_id} not {state} within {SETTLE:?}: {order}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// `GET /stock` as JSON.
    pub async fn stock(&self) -> Value {
        let resp = self.get("/stock").await;
        assert_eq!(resp.status(), reqwest::StatusCode::OK, "GET /stock");
        resp.json().await.expect("stock levels as JSON")
    }

    /// Reads the stock until `sku` is back to [`STOCK`] free units and none
    /// reserved (at most [`SETTLE`]): the release follows the cancellation
    /// by another event, so it may land a moment after it.
    pub async fn stock_restored(&self, sku: &str) {
        let want = json!({ "available": STOCK, "reserved": 0 });
        let deadline = Instant::now() + SETTLE;
        loop {
            let stock = self.stock().await;
            if stock[sku] == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "stock of `{sku}` not back to {want} within {SETTLE:?}: {stock}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Kills the process (SIGKILL: a crash) and waits for it.
    pub fn crash(&mut self) {
        self.child.kill().expect("cannot kill tiny-store");
        self.child.wait().expect("cannot wait for tiny-store");
    }

    /// Sends SIGTERM and waits (at most [`STARTUP`]) for the process to
    /// close stdout and exit; returns how it exited and everything it
    /// printed.
    pub fn stop(&mut self) -> (ExitStatus, Vec<String>) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("cannot run kill");
        assert!(sent.success(), "kill -TERM {pid}: {sent}");
        self.wait_exit(STARTUP)
    }

    /// Waits (at most `limit`) for the process to exit by itself; returns
    /// how it exited and everything it printed.
    pub fn wait_exit(&mut self, limit: Duration) -> (ExitStatus, Vec<String>) {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "tiny-store did not exit within {limit:?}; stdout: {:#?}",
                    self.seen
                ),
            }
        }
        let status = self.child.wait().expect("cannot wait for tiny-store");
        (status, self.seen.clone())
    }

    /// [`Server::stop`], asserting a clean stop.
    pub fn stop_cleanly(&mut self) {
        let (status, stdout) = self.stop();
        assert!(
            status.success(),
            "tiny-store exited with {status} after SIGTERM; stdout: {stdout:#?}"
        );
        assert!(
            stdout.iter().any(|l| l == "tiny-store: stopped"),
            "no `tiny-store: stopped` after SIGTERM; stdout: {stdout:#?}"
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Does nothing when the process has been waited for already.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
