//! `tiny-store`: run the shop.
//!
//! ```text
//! tiny-store                                   # simulate 500 orders, all in-process
//! tiny-store --modules shipments               # an extracted module: `run`
//! tiny-store simulate --orders 2000
//! tiny-store serve --addr 127.0.0.1:8080
//! tiny-store --config tiny-store.toml --modules shipments run
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tiny_store::simulate::{self, Plan, Progress};
use tiny_store::{Settings, Shop};
use tiny_store_orders::OrderState;
use tiny_store_platform::BoxError;

#[derive(Parser)]
#[command(version, about = "Tiny Store: a modular monolith on Seambus")]
struct Cli {
    /// A TOML file with `[routes]`, `[transports.*]` and `[store]`.
    #[arg(long, env = "TINY_STORE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// The modules this process runs, comma-separated (default: all).
    #[arg(long, global = true)]
    modules: Option<String>,
    /// Prefix of broker names and database schemas.
    #[arg(long, global = true)]
    namespace: Option<String>,
    /// PostgreSQL URL: each module keeps its data in its own schema.
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// A directory where each module keeps its data in its own SQLite
    /// file (no server). Default: temporary files.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Place N orders, wait until each is shipped or cancelled, print a
    /// per-module summary and check the books (the default command when
    /// this process runs the orders module; `run` otherwise).
    Simulate {
        /// How many orders.
        #[arg(long, default_value_t = 500)]
        orders: usize,
        /// Seed of the order generator.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Orders placed at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Seconds to wait for every order to settle.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Serve the HTTP API until Ctrl-C or SIGTERM.
    Serve {
        /// Address to listen on (port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: String,
        /// Units of each SKU put in stock at start (when inventory runs here).
        #[arg(long, default_value_t = 100)]
        stock: u64,
    },
    /// Run the modules' handlers only, until Ctrl-C or SIGTERM (an
    /// extracted module's process).
    Run,
    /// Wait until every order in the database is shipped or cancelled,
    /// then check the books (after a crash, say): every shipped order paid
    /// and shipped once, stock conserved. Needs every module here.
    Check {
        /// Units of each SKU in stock at the very start (`serve --stock`).
        #[arg(long, default_value_t = 100)]
        stock: u64,
        /// Seconds to wait for every order to settle.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Delete this namespace's broker state (streams, queues, exchanges,
    /// topics) on every broker the routes name. Events still queued there
    /// are lost.
    Reset,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tiny-store: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tiny-store: error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, BoxError> {
    let mut settings = Settings::load(cli.config.as_deref())?;
    if let Some(m) = &cli.modules {
        settings = settings.with_modules(m)?;
    }
    if let Some(ns) = cli.namespace {
        settings.namespace = ns;
    }
    if let Some(url) = cli.database_url {
        settings.database_url = Some(url);
    }
    if let Some(dir) = cli.data_dir {
        settings.data_dir = Some(dir);
    }
    // No command: simulate where orders are taken here, else just handle
    // events (`tiny-store --modules shipments` is an extracted module).
    let command = cli
        .command
        .unwrap_or(if settings.runs(tiny_store_orders::MODULE) {
            Command::Simulate {
                orders: 500,
                seed: 7,
                concurrency: 16,
                timeout: 120,
                quiet: false,
            }
        } else {
            Command::Run
        });
    if matches!(command, Command::Reset) {
        // Only deletes: no module starts, nothing is consumed.
        tiny_store::reset(&settings).await?;
        println!(
            "tiny-store: broker state of namespace `{}` deleted",
            settings.namespace
        );
        return Ok(ExitCode::SUCCESS);
    }
    let shop = Arc::new(Shop::start(&settings).await?);
    let routes = if settings.routing().is_empty() {
        "everything in-process".to_owned()
    } else {
        settings.routing().to_string()
    };
    println!(
        "tiny-store: modules {} | routes: {routes}",
        settings.modules.join(",")
    );
    let code = match command {
        Command::Simulate {
            orders,
            seed,
            concurrency,
            timeout,
            quiet,
        } => {
            let plan = Plan {
                seed,
                concurrency,
                timeout: Duration::from_secs(timeout),
                ..Plan::new(orders)
            };
            simulate_command(&shop, &plan, quiet).await?
        }
        Command::Serve { addr, stock } => {
            if shop.inventory.is_some() {
                let plan = Plan {
                    stock_per_sku: stock,
                    ..Plan::new(0)
                };
                simulate::stock_new(&shop, plan.stock_per_sku).await?;
            }
            let listener = tokio::net::TcpListener::bind(&addr).await?;
            let stop = stop_signal();
            println!("tiny-store: listening on http://{}", listener.local_addr()?);
            println!("tiny-store: ready");
            let served = axum::serve(listener, tiny_store::http::router(shop.clone()))
                .with_graceful_shutdown(stop)
                .await;
            if let Err(e) = served {
                eprintln!("tiny-store: the HTTP server failed: {e}");
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Check { stock, timeout } => {
            let (report, audit) =
                simulate::check(&shop, stock, Duration::from_secs(timeout)).await?;
            print_outcome(&report);
            if print_audit(&audit) && report.all_settled() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Run => {
            let stop = stop_signal();
            println!("tiny-store: ready");
            stop.await;
            ExitCode::SUCCESS
        }
        // Handled above, before any module starts.
        Command::Reset => ExitCode::SUCCESS,
    };
    shop.shutdown(Duration::from_secs(10)).await?;
    println!("\n{}", shop.summary());
    println!("tiny-store: stopped");
    Ok(code)
}

async fn simulate_command(shop: &Shop, plan: &Plan, quiet: bool) -> Result<ExitCode, BoxError> {
    let initial = match shop.inventory {
        Some(_) => Some(simulate::seed(shop, plan).await?),
        None => None,
    };
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(plan.orders as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{msg:>9} [{bar:40}] {pos}/{len} orders ({elapsed})")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    bar.set_message("placing");
    let report = simulate::run(shop, plan, |p| match p {
        Progress::Placed(n) => bar.set_position(n as u64),
        Progress::Settled(n) => {
            bar.set_message("settling");
            bar.set_position(n as u64);
        }
    })
    .await?;
    bar.finish_and_clear();
    print_outcome(&report);
    let mut ok = report.all_settled();
    if let Some(initial) = initial.filter(|_| shop.payments.is_some() && shop.shipments.is_some()) {
        let audit = simulate::audit(shop, &initial, &report).await?;
        ok &= print_audit(&audit);
    } else {
        println!("(books not checked: not every module runs in this process)");
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Prints how the orders ended.
fn print_outcome(report: &simulate::Report) {
    let secs = report.elapsed.as_secs_f64();
    println!(
        "placed {} orders ({} through the legacy checkout, OrderPlaced v1) in {:.2?}: \
         {} shipped, {} cancelled, {} still open; {:.0} orders/s",
        report.placed.len(),
        report.legacy,
        report.elapsed,
        report.count(OrderState::Shipped),
        report.count(OrderState::Cancelled),
        report.placed.len()
            - report.count(OrderState::Shipped)
            - report.count(OrderState::Cancelled),
        report.placed.len() as f64 / secs.max(1e-9),
    );
}

/// Prints the audit; true when the books balance.
fn print_audit(audit: &simulate::Audit) -> bool {
    if audit.problems.is_empty() {
        println!(
            "books balance: {} captured = {} shipped; stock at start = free + held, held = shipped",
            cents(audit.captured_cents),
            cents(audit.shipped_value_cents)
        );
    } else {
        for p in &audit.problems {
            println!("BOOKS DO NOT BALANCE: {p}");
        }
    }
    audit.problems.is_empty()
}

fn cents(c: u64) -> String {
    format!("{}.{:02}", c / 100, c % 100)
}

/// Ctrl-C or SIGTERM. The handlers are installed when this is called, so
/// call it before saying "ready".
fn stop_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let ctrl_c = tokio::signal::ctrl_c();
    async move {
        #[cfg(unix)]
        if let Some(mut term) = term {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = ctrl_c.await;
    }
}
