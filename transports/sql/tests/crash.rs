//! Faults of the consuming process, on PostgreSQL and SQLite:
//!
//! - a consumer killed with `SIGKILL` in the middle of a run loses nothing:
//!   this test starts itself again as the consuming process
//!   (`SEAMBUS_SQL_CHILD`), kills it once it has handled a third of the
//!   events, and consumes the rest in the same group;
//! - an event whose handler never finishes (every process holding it is
//!   stopped) is dead-lettered at the delivery limit, without running the
//!   handler again.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Backend;
use libtest_mimic::{Arguments, Failed, Trial};
use seambus::conformance::{block_on, brokers_required, namespace, patience, Harness, Ping};
use seambus::{Bus, Context, HandlerError, PublishOptions, Received};
use uuid::Uuid;

const CHILD: &str = "SEAMBUS_SQL_CHILD";
const EVENTS: u64 = 300;

fn main() -> std::process::ExitCode {
    if let Ok(spec) = std::env::var(CHILD) {
        child(&spec);
    }
    let mut trials = Vec::new();
    for backend in [Backend::Postgres, Backend::Sqlite] {
        let name = format!("{backend:?}").to_lowercase();
        let harness = common::Sql {
            backend,
            restart: false,
        };
        let skip = harness.unavailable().filter(|_| !brokers_required());
        for (case, run) in [
            (
                "a_killed_consumer_loses_nothing",
                killed_consumer as fn(Backend),
            ),
            ("a_handler_that_never_finishes_is_dead_lettered", crash_loop),
        ] {
            let trial = Trial::test(format!("{name}::{case}"), move || {
                run(backend);
                Ok::<(), Failed>(())
            });
            trials.push(match &skip {
                Some(why) => trial.with_ignored_flag(true).with_kind(why.clone()),
                None => trial,
            });
        }
    }
    libtest_mimic::run(&Arguments::from_args(), trials).exit_code()
}

fn bus_on(transport: seambus_sql::SqlTransport) -> Bus {
    Bus::builder()
        .transport("sql", transport)
        .build()
        .expect("bus")
}

/// The consuming process: handles pings slowly, printing each id, until
/// it is killed.
fn child(spec: &str) -> ! {
    let (backend, ns) = spec.split_once(':').expect("backend:namespace");
    let backend = if backend == "postgres" {
        Backend::Postgres
    } else {
        Backend::Sqlite
    };
    block_on(async move {
        let bus = bus_on(common::transport(backend, ns).await);
        let _sub = bus
            .module("shop")
            .subscribe(|_ping: Received<Ping>, ctx: Context| async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                println!("handled {}", ctx.envelope().id());
                Ok::<(), HandlerError>(())
            })
            .concurrency(4)
            .await
            .expect("subscribe");
        println!("ready");
        std::future::pending::<()>().await;
    });
    unreachable!("the child runs until it is killed")
}

/// Kills the child process when dropped (a failed test leaves none).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn killed_consumer(backend: Backend) {
    let ns = namespace("crash");
    let label = if backend == Backend::Postgres {
        "postgres"
    } else {
        "sqlite"
    };
    let mut child = Killed(
        Command::new(std::env::current_exe().expect("test binary"))
            .env(CHILD, format!("{label}:{ns}"))
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the consuming process"),
    );
    let child = &mut child.0;
    let seen: Arc<Mutex<HashMap<Uuid, u32>>> = Arc::default();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().expect("child stdout");
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line == "ready" {
                    let _ = ready_tx.send(());
                } else if let Some(id) = line.strip_prefix("handled ") {
                    let id: Uuid = id.parse().expect("an id");
                    *seen.lock().unwrap().entry(id).or_default() += 1;
                }
            }
        })
    };
    ready_rx
        .recv_timeout(patience())
        .expect("the consuming process subscribed");
    block_on(async {
        let bus = bus_on(common::transport(backend, &ns).await);
        let mut ids = Vec::new();
        for seq in 0..EVENTS {
            let ping = Ping {
                seq,
                body: format!("ping {seq}"),
            };
            let opts = PublishOptions::new().key(format!("key-{}", seq % 10));
            ids.push(
                bus.module("conformance")
                    .publish_with(ping, opts)
                    .await
                    .expect("publish"),
            );
        }
        seambus::conformance::poll_until("the consuming process to handle a third", || async {
            seen.lock().unwrap().len() as u64 >= EVENTS / 3
        })
        .await;
        child.kill().expect("SIGKILL the consuming process");
        child.wait().expect("reap the consuming process");
        reader.join().expect("stdout reader");
        let by_child = seen.lock().unwrap().len();
        assert!(
            (by_child as u64) < EVENTS,
            "the child handled everything before the kill"
        );

        // The same group, in this process: it gets what the child held
        // (when the leases end) and what it never claimed.
        let record = seen.clone();
        let _sub = bus
            .module("shop")
            .subscribe(move |_ping: Received<Ping>, ctx: Context| {
                let record = record.clone();
                async move {
                    *record
                        .lock()
                        .unwrap()
                        .entry(ctx.envelope().id())
                        .or_default() += 1;
                    Ok::<(), HandlerError>(())
                }
            })
            .concurrency(4)
            .await
            .expect("subscribe");
        seambus::conformance::poll_until("every event handled after the kill", || async {
            let seen = seen.lock().unwrap();
            ids.iter().all(|id| seen.contains_key(id))
        })
        .await;
        let seen = seen.lock().unwrap().clone();
        let twice = seen.values().filter(|n| **n > 1).count();
        // Only what the child held when it died may come twice.
        assert!(twice <= 256, "{twice} events handled twice");
        assert_eq!(
            seen.len(),
            ids.len(),
            "events nobody published were handled"
        );
        bus.shutdown(Duration::from_secs(5))
            .await
            .expect("shutdown");
    });
    block_on(
        common::Sql {
            backend,
            restart: false,
        }
        .cleanup(&ns),
    );
}

fn crash_loop(backend: Backend) {
    let ns = namespace("crashloop");
    let (dead, id, counted) = block_on(seambus::conformance::crash_loop(2, || {
        let config = common::config(backend, &ns).with_delivery_limit(2);
        async move {
            Arc::new(
                seambus_sql::SqlTransport::connect(config)
                    .await
                    .expect("connect"),
            ) as Arc<dyn seambus::transport::Transport>
        }
    }));
    assert_eq!(dead.envelope.id(), id);
    assert_eq!(
        dead.reason,
        seambus::transport::DeadLetterReason::MaxAttempts
    );
    assert!(dead.error.contains("delivery limit"), "{}", dead.error);
    assert_eq!(counted, 1, "the dead letter is counted in the stats");
    block_on(
        common::Sql {
            backend,
            restart: false,
        }
        .cleanup(&ns),
    );
}
