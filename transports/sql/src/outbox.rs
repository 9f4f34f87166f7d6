//! The transactional outbox: events written in the application's own
//! database transaction, so an event exists if and only if the
//! transaction commits, and a relay that forwards committed events to
//! their routes (any transport: in-process, a broker, the SQL transport).

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use seambus::transport::{DeadLetter, GroupId};
use seambus::{Bus, Envelope, Error, ErrorKind, Event, Module, PublishOptions, Result};
use sqlx::Row;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::config::SqlConfig;
use crate::db::{db_error, on_pool, Pool, Sql};
use crate::source::{listen, Wakers};
use crate::wire::{envelope_of, headers_of};

/// Where the relay's wakeups are kept in [`Wakers`].
const RELAY: &str = "outbox";

/// The outbox of one schema (the tables of a [`SqlTransport`](crate::SqlTransport)
/// with the same configuration, which it creates if missing).
///
/// ```no_run
/// # async fn run(bus: seambus::Bus, pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// # #[derive(serde::Serialize, serde::Deserialize, seambus::Event)]
/// # #[event(name = "orders.order_placed", version = 1)]
/// # struct OrderPlaced { id: u64 }
/// use seambus_sql::{Outbox, SqlConfig};
///
/// let outbox = Outbox::connect(SqlConfig::new("postgres://app@db/shop")).await?;
/// let relay = outbox.relay(bus.clone()); // forwards committed events
///
/// let mut tx = pool.begin().await?;
/// sqlx::query("INSERT INTO orders (id) VALUES (7)").execute(&mut *tx).await?;
/// outbox.publish(&mut *tx, &bus.module("orders"), OrderPlaced { id: 7 }).await?;
/// tx.commit().await?; // the order and its event, or neither
/// # relay.stop().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct Inner {
    pool: Pool,
    sql: Sql,
    config: SqlConfig,
    wakers: Arc<Wakers>,
    /// This outbox's name in the relay lease.
    worker: String,
}

/// A connection of the application's transaction that
/// [`Outbox::publish`] writes on: `&mut *tx` of an
/// `sqlx::Transaction<'_, Postgres>`, `<'_, Sqlite>` or `<'_, Any>` (on
/// PostgreSQL or SQLite), or a plain connection, which then commits the
/// event at once.
pub trait OutboxConnection: Send {
    #[doc(hidden)]
    fn insert<'a>(self, sql: &'a str, row: OutboxRow) -> BoxFuture<'a, Result<()>>
    where
        Self: 'a;

    #[doc(hidden)]
    fn is_postgres(&self) -> bool;
}

/// One outbox row to write (hidden: the binding of an event).
#[doc(hidden)]
#[derive(Debug)]
pub struct OutboxRow {
    event_type: String,
    key: Option<String>,
    headers: String,
    payload: Vec<u8>,
    channel: String,
}

macro_rules! outbox_connection {
    ($conn:ty, $this:ident => $postgres:expr) => {
        impl OutboxConnection for &mut $conn {
            fn insert<'a>(self, sql: &'a str, row: OutboxRow) -> BoxFuture<'a, Result<()>>
            where
                Self: 'a,
            {
                Box::pin(async move {
                    let mut query = sqlx::query(sql)
                        .bind(row.event_type)
                        .bind(row.key)
                        .bind(row.headers)
                        .bind(row.payload);
                    if self.is_postgres() {
                        query = query.bind(row.channel);
                    }
                    query
                        .execute(self)
                        .await
                        .map(|_| ())
                        .map_err(|e| db_error("write an event to the outbox", e))
                })
            }

            fn is_postgres(&self) -> bool {
                let $this = self;
                $postgres
            }
        }
    };
}
outbox_connection!(sqlx::PgConnection, _c => true);
outbox_connection!(sqlx::SqliteConnection, _c => false);
outbox_connection!(sqlx::AnyConnection, c => crate::db::any_is_postgres(c.backend_name()));

impl Outbox {
    /// Connects and creates the tables if they are missing.
    pub async fn connect(config: SqlConfig) -> Result<Self> {
        let (pool, sql) = crate::db::open(&config).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                sql,
                config,
                wakers: Arc::default(),
                worker: Uuid::now_v7().to_string(),
            }),
        })
    }

    /// Writes `event`, published by `module`, on the application's
    /// connection `conn` (inside its transaction): the event is forwarded
    /// to its route by a [`Relay`] once, and only if, the transaction
    /// commits. The envelope is built and checked as
    /// [`Module::publish`] would (owner, name, headers, size), and encoded
    /// with the bus's codec. Returns the event's id.
    pub async fn publish<E: Event>(
        &self,
        conn: impl OutboxConnection,
        module: &Module,
        event: E,
    ) -> Result<Uuid> {
        self.publish_with(conn, module, event, PublishOptions::new())
            .await
    }

    /// [`Outbox::publish`] with [`PublishOptions`].
    pub async fn publish_with<E: Event>(
        &self,
        conn: impl OutboxConnection,
        module: &Module,
        event: E,
        options: PublishOptions,
    ) -> Result<Uuid> {
        let postgres = matches!(self.inner.pool, Pool::Postgres(_));
        if conn.is_postgres() != postgres {
            return Err(Error::new(
                ErrorKind::Config,
                "the transaction's database is not the outbox's (PostgreSQL and SQLite mixed)",
            ));
        }
        let envelope = module.encode(event, options)?;
        let attrs = envelope.attributes();
        let payload = envelope
            .payload_bytes()
            .map(|b| b.to_vec())
            .unwrap_or_default();
        let row = OutboxRow {
            event_type: attrs.event_type.to_string(),
            key: attrs.partition_key.clone(),
            headers: headers_of(attrs),
            payload,
            channel: self.inner.sql.channel.clone(),
        };
        conn.insert(&self.inner.sql.outbox_insert, row).await?;
        if !postgres {
            // Committed or not, looking costs the relay one query.
            self.inner.wakers.wake(RELAY);
        }
        Ok(envelope.id())
    }

    /// The group under which events no route would take are set aside
    /// (`seambus:outbox`): discard them with
    /// [`SqlTransport::discard_dead_letters`](seambus::transport::Transport::discard_dead_letters)
    /// on this group.
    pub fn group() -> GroupId {
        GroupId::new("seambus", "outbox")
    }

    /// The events set aside because no route would take them (or their
    /// row was not an envelope), as dead letters with the reason.
    pub async fn set_aside(&self) -> Result<Vec<DeadLetter>> {
        let group = Self::group();
        let rows = crate::dead_rows(&self.inner.pool, &self.inner.sql, &group).await?;
        Ok(rows.iter().map(|row| row.dead_letter(&group)).collect())
    }

    /// Events written and not forwarded yet.
    pub async fn pending(&self) -> Result<u64> {
        let n: i64 = on_pool!(&self.inner.pool, p => {
            sqlx::query_scalar(&self.inner.sql.outbox_count).fetch_one(p).await
        })
        .map_err(|e| db_error("count the outbox", e))?;
        Ok(n.max(0) as u64)
    }

    /// Starts forwarding committed events to their routes on `bus`, in the
    /// order they were written, until [`Relay::stop`]. Several relays (one
    /// per process) may run: one forwards at a time (it holds a lease), the
    /// others take over when it stops or dies.
    pub fn relay(&self, bus: Bus) -> Relay {
        let stop = Arc::new(Stop::default());
        let inner = self.inner.clone();
        let listener = listen(&inner.pool, &inner.sql.channel, inner.wakers.clone());
        let halt = stop.clone();
        let task = tokio::spawn(async move {
            relay(&inner, &bus, &halt).await;
            release_lease(&inner).await;
        });
        Relay {
            stop,
            task,
            listener,
        }
    }
}

/// Asks a relay to stop between two events.
#[derive(Debug, Default)]
struct Stop {
    asked: std::sync::atomic::AtomicBool,
    woken: Notify,
}

impl Stop {
    fn asked(&self) -> bool {
        self.asked.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A running relay (see [`Outbox::relay`]).
#[derive(Debug)]
pub struct Relay {
    stop: Arc<Stop>,
    task: JoinHandle<()>,
    listener: Option<JoinHandle<()>>,
}

impl Relay {
    /// Stops forwarding once the event being forwarded is done, and gives
    /// the lease up (the next relay takes over at once). A relay that dies
    /// instead may have sent an event whose row it did not delete yet: the
    /// next relay sends it again (at least once, with the same id).
    pub async fn stop(self) {
        self.stop
            .asked
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.stop.woken.notify_one();
        let _ = self.task.await;
        if let Some(listener) = self.listener {
            listener.abort();
        }
    }
}

/// Backoff of a relay that cannot forward or cannot reach the database.
const AGAIN: Duration = Duration::from_millis(200);
const AGAIN_MAX: Duration = Duration::from_secs(10);

async fn relay(inner: &Inner, bus: &Bus, stop: &Stop) {
    let mut wake = inner.wakers.of(RELAY);
    let poll = inner.config.poll_interval.unwrap_or(match inner.pool {
        Pool::Postgres(_) => Duration::from_secs(2),
        Pool::Sqlite(_) => Duration::from_millis(100),
    });
    let mut failures = 0u32;
    while !stop.asked() {
        wake.borrow_and_update();
        let step = async {
            if !take_lease(inner).await? {
                return Ok::<_, Error>(false);
            }
            forward_batch(inner, bus, stop).await
        };
        let pause = match step.await {
            Ok(true) => {
                failures = 0;
                continue;
            }
            Ok(false) => {
                failures = 0;
                poll
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "the outbox relay cannot forward; trying again");
                AGAIN.saturating_mul(1 << failures.min(6)).min(AGAIN_MAX)
            }
        };
        tokio::select! {
            _ = wake.changed() => {}
            () = tokio::time::sleep(pause) => {}
            () = stop.woken.notified() => {}
        }
    }
}

/// Forwards the oldest rows, one after the other; true if there were any.
async fn forward_batch(inner: &Inner, bus: &Bus, stop: &Stop) -> Result<bool> {
    let sql = &inner.sql;
    let rows: Vec<(i64, String, Vec<u8>)> = on_pool!(&inner.pool, p => {
        sqlx::query(&sql.outbox_take)
            .bind(inner.config.batch as i64)
            .fetch_all(p)
            .await
            .and_then(|rows| {
                rows.into_iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                    .collect()
            })
    })
    .map_err(|e| db_error("read the outbox", e))?;
    if rows.is_empty() {
        return Ok(false);
    }
    for (id, headers, payload) in rows {
        if stop.asked() {
            break;
        }
        match envelope_of(&headers, payload) {
            Ok(envelope) => forward(inner, bus, id, envelope).await?,
            Err(why) => {
                tracing::error!(row = id, reason = %why, "an outbox row is not an envelope; moved to the outbox's dead letters");
                set_aside(inner, id, "undecodable", &why).await?;
            }
        }
    }
    Ok(true)
}

/// Forwards one event; deletes its row once its route took it. An error
/// a retry can change stops the batch (the row is forwarded again, in
/// order); one it cannot (no route takes it) sets the row aside.
async fn forward(inner: &Inner, bus: &Bus, id: i64, envelope: Envelope) -> Result<()> {
    match bus.forward(envelope).await {
        Ok(()) => {
            on_pool!(&inner.pool, p => {
                sqlx::query(&inner.sql.outbox_delete).bind(id).execute(p).await.map(|_| ())
            })
            .map_err(|e| db_error("delete a forwarded outbox row", e))?;
            Ok(())
        }
        Err(e) if e.is_retryable() => Err(e),
        Err(e) => {
            tracing::error!(row = id, error = %e, "an outbox event cannot be forwarded; moved to the outbox's dead letters");
            set_aside(inner, id, "rejected", e.message()).await
        }
    }
}

/// Moves an outbox row no retry can forward to the dead letters of the
/// group [`Outbox::group`], where [`Outbox::set_aside`] lists them.
async fn set_aside(inner: &Inner, id: i64, reason: &str, error: &str) -> Result<()> {
    let failed = |e| db_error("set an outbox row aside", e);
    let error = seambus::transport::support::header_text(error);
    on_pool!(&inner.pool, p => {
        let mut tx = p.begin().await.map_err(failed)?;
        sqlx::query(&inner.sql.outbox_set_aside)
            .bind(id)
            .bind(reason)
            .bind(&error)
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        sqlx::query(&inner.sql.outbox_delete)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        tx.commit().await.map_err(failed)
    })
}

/// Takes or renews the relay lease; false while another relay holds it.
async fn take_lease(inner: &Inner) -> Result<bool> {
    let lease = inner.config.lease.as_millis().min(i64::MAX as u128) as i64;
    let taken = on_pool!(&inner.pool, p => {
        sqlx::query(&inner.sql.relay_lease)
            .bind(&inner.worker)
            .bind(lease)
            .execute(p)
            .await
            .map(|r| r.rows_affected())
    })
    .map_err(|e| db_error("take the relay lease", e))?;
    Ok(taken > 0)
}

async fn release_lease(inner: &Inner) {
    let released = on_pool!(&inner.pool, p => {
        sqlx::query(&inner.sql.relay_release)
            .bind(&inner.worker)
            .execute(p)
            .await
            .map(|_| ())
    });
    if let Err(e) = released {
        tracing::debug!(error = %e, "could not give the relay lease up; it ends by itself");
    }
}
