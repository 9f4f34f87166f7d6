//! Consuming: each subscription claims rows of its group (a lease, with
//! `FOR UPDATE SKIP LOCKED` on PostgreSQL) and feeds them to the core
//! delivery engine ([`seambus::transport::engine`]), which keeps per-key
//! order, retries and attempts. Waiting consumers wake on `NOTIFY`
//! (PostgreSQL), on this process's own publishes, or at the poll interval.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use seambus::transport::engine::{self, Fetch, Fetched, Limits, Verdict};
use seambus::transport::{Consumer, DeliveryHandler, Ordering, SubscriptionSpec};
use seambus::{Envelope, Result};
use sqlx::Row;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::db::{db_error, on_pool, Pool};
use crate::wire::envelope_of;
use crate::Inner;

/// The wakeups of this process's consumers, by group: a watch channel
/// per group, so a consumer sees every wakeup since it last looked, even
/// one that came while it was not waiting.
#[derive(Debug, Default)]
pub(crate) struct Wakers {
    groups: Mutex<HashMap<String, watch::Sender<()>>>,
}

impl Wakers {
    /// A receiver of `group`'s wakeups.
    pub(crate) fn of(&self, group: &str) -> watch::Receiver<()> {
        self.groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(group.to_owned())
            .or_insert_with(|| watch::channel(()).0)
            .subscribe()
    }

    /// Wakes the waiting consumers of `group`.
    pub(crate) fn wake(&self, group: &str) {
        let found = self
            .groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(group)
            .cloned();
        if let Some(wake) = found {
            wake.send_replace(());
        }
    }

    /// Wakes every waiting consumer (notifications may have been missed).
    pub(crate) fn wake_all(&self) {
        let all: Vec<_> = self
            .groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for wake in all {
            wake.send_replace(());
        }
    }
}

/// Listens on the schema's channel (PostgreSQL) and wakes the groups named
/// in the notifications, until aborted. After a lost connection it wakes
/// everybody, since notifications may have been missed. `None` on SQLite.
pub(crate) fn listen(pool: &Pool, channel: &str, wakers: Arc<Wakers>) -> Option<JoinHandle<()>> {
    let Pool::Postgres(pool) = pool else {
        return None;
    };
    let (pool, channel) = (pool.clone(), channel.to_owned());
    Some(tokio::spawn(async move {
        loop {
            let listener = async {
                let mut l = sqlx::postgres::PgListener::connect_with(&pool).await?;
                l.listen(&channel).await?;
                Ok::<_, sqlx::Error>(l)
            };
            let mut listener = match listener.await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for new events; polling meanwhile");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            wakers.wake_all();
            loop {
                match listener.try_recv().await {
                    Ok(Some(n)) => wakers.wake(n.payload()),
                    // Reconnected: what came meanwhile is unknown.
                    Ok(None) => wakers.wake_all(),
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the notification connection; listening again");
                        break;
                    }
                }
            }
        }
    }))
}

pub(crate) async fn subscribe(
    inner: &Arc<Inner>,
    spec: SubscriptionSpec,
    handler: Arc<dyn DeliveryHandler>,
) -> Result<Box<dyn Consumer>> {
    let group = spec.group.to_string();
    let wake = inner.wakers.of(&group);
    let sink = Arc::new(SqlSink {
        inner: inner.clone(),
        group: group.clone(),
    });
    let source = SqlSource {
        inner: inner.clone(),
        group,
        ordered: spec.ordering == Ordering::ByKey,
        buffer: VecDeque::new(),
        pending: None,
        wake,
        woken: false,
        drained: false,
        wait_until: None,
    };
    let limits = Limits::new(inner.config.max_in_flight)
        .with_delivery_limit(Some(inner.config.delivery_limit));
    Ok(engine::spawn(
        &inner.host,
        spec,
        handler,
        source,
        sink,
        limits,
    ))
}

/// What [`SqlSink::keep_alive`] does (the one row operation that does not
/// settle the event).
const KEEP_ALIVE: &str = "extend a lease";

/// A claimed row: this process's until its lease is lost.
#[derive(Debug)]
pub(crate) struct Claimed {
    id: i64,
    keyed: bool,
    lost: AtomicBool,
    /// Acknowledged, retried, dead-lettered or given back: a keep-alive
    /// that finds no row then is not a lost lease.
    settled: AtomicBool,
}

type Claim = Result<Vec<Fetched<Claimed>>>;

struct SqlSource {
    inner: Arc<Inner>,
    group: String,
    ordered: bool,
    buffer: VecDeque<Fetched<Claimed>>,
    /// A claim under way: kept across cancelled fetches, so rows it claimed
    /// are never dropped on the floor.
    pending: Option<JoinHandle<Claim>>,
    wake: watch::Receiver<()>,
    /// The last wait ended with a wakeup, not at its time.
    woken: bool,
    /// The last claim found less than a batch: wait for a wakeup (or the
    /// time) before claiming again.
    drained: bool,
    /// The end of the wait under way.
    wait_until: Option<tokio::time::Instant>,
}

impl SqlSource {
    async fn claim(&mut self) -> Claim {
        let pending = self.pending.get_or_insert_with(|| {
            let inner = self.inner.clone();
            let (group, ordered) = (self.group.clone(), self.ordered);
            tokio::spawn(async move { claim(&inner, &group, ordered).await })
        });
        let claimed = pending.await;
        self.pending = None;
        claimed.unwrap_or_else(|e| {
            Err(seambus::Error::new(
                seambus::ErrorKind::Other,
                format!("claim task failed: {e}"),
            ))
        })
    }

    /// Milliseconds until the group's next row becomes claimable (a
    /// delayed retry, a lease running out), if any.
    async fn next_due(&self) -> Result<Option<Duration>> {
        let due: Option<i64> = on_pool!(&self.inner.pool, p => {
            sqlx::query_scalar(&self.inner.sql.next_due)
                .bind(&self.group)
                .fetch_one(p)
                .await
        })
        .map_err(|e| db_error("look for delayed events", e))?;
        Ok(due.map(|ms| Duration::from_millis(ms.max(1) as u64)))
    }
}

async fn claim(inner: &Inner, group: &str, ordered: bool) -> Claim {
    let sql = if ordered {
        &inner.sql.claim_ordered
    } else {
        &inner.sql.claim_unordered
    };
    let rows = on_pool!(&inner.pool, p => {
        sqlx::query(sql)
            .bind(group)
            .bind(&inner.worker)
            .bind(lease_ms(inner))
            .bind(inner.config.batch as i64)
            .fetch_all(p)
            .await
            .map_err(|e| db_error("claim events", e))?
            .into_iter()
            .map(|row| {
                let id: i64 = row.try_get("id")?;
                let key: Option<String> = row.try_get("pkey")?;
                let headers: String = row.try_get("headers")?;
                let payload: Vec<u8> = row.try_get("payload")?;
                let attempt: i64 = row.try_get("attempt")?;
                let delivered: i64 = row.try_get("delivered")?;
                Ok::<_, sqlx::Error>(Fetched {
                    token: Claimed {
                        id,
                        keyed: key.is_some(),
                        lost: AtomicBool::new(false),
                        settled: AtomicBool::new(false),
                    },
                    envelope: envelope_of(&headers, payload),
                    attempt: attempt.clamp(1, i64::from(u32::MAX)) as u32,
                    delivered: Some(delivered.clamp(0, i64::from(u32::MAX)) as u32),
                })
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| db_error("read claimed events", e))?
    });
    let mut rows = rows;
    rows.sort_by_key(|f| f.token.id);
    Ok(rows)
}

fn lease_ms(inner: &Inner) -> i64 {
    inner.config.lease.as_millis().min(i64::MAX as u128) as i64
}

#[async_trait]
impl engine::Source for SqlSource {
    type Token = Claimed;

    async fn fetch(&mut self) -> Result<Fetch<Claimed>> {
        let poll = self.inner.poll_interval;
        loop {
            if let Some(fetched) = self.buffer.pop_front() {
                return Ok(Fetch::Message(fetched));
            }
            // The engine drops this future whenever something else
            // happens (a handler finishing, a keep-alive): a claim under
            // way is awaited first, and a wait keeps its deadline.
            if self.drained && self.pending.is_none() {
                let until = match self.wait_until {
                    Some(until) => until,
                    None => {
                        // When the last wait ended with a wakeup (busy
                        // times), wait for the next one or the poll; when
                        // it ended at its time, ask when the next delayed
                        // row is due (a retry of another process, a lease
                        // running out). This process's own retries wake
                        // it when due.
                        let wait = if self.woken {
                            poll
                        } else {
                            self.next_due().await?.map_or(poll, |due| due.min(poll))
                        };
                        *self.wait_until.insert(tokio::time::Instant::now() + wait)
                    }
                };
                self.woken = tokio::select! {
                    changed = self.wake.changed() => changed.is_ok(),
                    () = tokio::time::sleep_until(until) => false,
                };
                self.wait_until = None;
            }
            // Seen: a wakeup from now on makes the next wait end at once.
            self.wake.borrow_and_update();
            let claimed = self.claim().await?;
            self.drained = claimed.len() < self.inner.config.batch;
            self.buffer.extend(claimed);
        }
    }

    async fn close(&mut self) {
        if let Some(pending) = self.pending.take() {
            if let Ok(Ok(claimed)) = pending.await {
                self.buffer.extend(claimed);
            }
        }
        let sink = SqlSink {
            inner: self.inner.clone(),
            group: self.group.clone(),
        };
        for fetched in std::mem::take(&mut self.buffer) {
            engine::Sink::release(&sink, &fetched.token).await;
        }
    }
}

struct SqlSink {
    inner: Arc<Inner>,
    group: String,
}

impl SqlSink {
    /// Runs one statement on the token's row (bound as `$1`, `$2` the
    /// worker, then `more`); false when the row is no longer ours.
    async fn on_row(&self, what: &str, sql: &str, token: &Claimed, more: &[i64]) -> Result<bool> {
        let keep_alive = what == KEEP_ALIVE;
        if !keep_alive {
            token.settled.store(true, SeqCst);
        }
        let done = on_pool!(&self.inner.pool, p => {
            let mut query = sqlx::query(sql).bind(token.id).bind(&self.inner.worker);
            for value in more {
                query = query.bind(*value);
            }
            query.execute(p).await.map(|r| r.rows_affected())
        })
        .map_err(|e| db_error(what, e))?;
        if done == 0 && !(keep_alive && token.settled.load(SeqCst)) {
            token.lost.store(true, SeqCst);
            return Ok(false);
        }
        Ok(true)
    }

    async fn give_back(&self, sql: &str, token: &Claimed) {
        match self.on_row("give an event back", sql, token, &[]).await {
            Ok(_) => self.claimable().await,
            Err(e) => {
                tracing::warn!(group = %self.group, error = %e, "could not give an event back; it comes again when its lease ends")
            }
        }
    }

    /// The row can be claimed again (or its key's next row can).
    async fn claimable(&self) {
        announce(&self.inner, &self.group).await;
    }
}

/// Events of `group` became claimable: wakes this process's consumers of
/// the group, and on PostgreSQL the other processes' (a failure only
/// delays them until they poll).
pub(crate) async fn announce(inner: &Inner, group: &str) {
    inner.wakers.wake(group);
    if let Some(notify) = &inner.sql.notify {
        let sent = on_pool!(&inner.pool, p => {
            sqlx::query(notify)
                .bind(&inner.sql.channel)
                .bind(group)
                .execute(p)
                .await
                .map(|_| ())
        });
        if let Err(e) = sent {
            tracing::debug!(error = %e, "could not notify other consumers; they find the event when they poll");
        }
    }
}

#[async_trait]
impl engine::Sink for SqlSink {
    type Token = Claimed;

    fn owns(&self, token: &Claimed) -> bool {
        !token.lost.load(SeqCst)
    }

    async fn ack(&self, token: &Claimed) -> Result<()> {
        self.on_row("acknowledge an event", &self.inner.sql.ack, token, &[])
            .await?;
        if token.keyed {
            self.claimable().await;
        }
        Ok(())
    }

    async fn release(&self, token: &Claimed) {
        self.give_back(&self.inner.sql.release, token).await;
    }

    async fn abandon(&self, token: &Claimed) {
        // Counted as a delivery, as a crash would be.
        self.give_back(&self.inner.sql.abandon, token).await;
    }

    fn keep_alive_every(&self) -> Option<Duration> {
        Some(self.inner.config.lease / 3)
    }

    async fn keep_alive(&self, token: &Claimed) {
        let sql = &self.inner.sql.keep_alive;
        match self
            .on_row(KEEP_ALIVE, sql, token, &[lease_ms(&self.inner)])
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(group = %self.group, "the lease of a held event ran out; another consumer may handle it too")
            }
            Err(e) => tracing::warn!(group = %self.group, error = %e, "could not extend a lease"),
        }
    }

    async fn retry_later(
        &self,
        token: &Claimed,
        _envelope: &Envelope,
        attempt: u32,
        delay: Duration,
    ) -> Result<bool> {
        let delay = delay.as_millis().min(i64::MAX as u128) as i64;
        let sql = &self.inner.sql.retry_later;
        let ours = self
            .on_row("schedule a retry", sql, token, &[i64::from(attempt), delay])
            .await?;
        if ours {
            self.claimable().await;
            // This process's consumers look again when it is due.
            let (wakers, group) = (self.inner.wakers.clone(), self.group.clone());
            let due = Duration::from_millis(delay.max(0) as u64);
            tokio::spawn(async move {
                tokio::time::sleep(due).await;
                wakers.wake(&group);
            });
        }
        Ok(true)
    }

    async fn dead_letter(
        &self,
        token: &Claimed,
        _envelope: Option<&Envelope>,
        verdict: &Verdict,
    ) -> Result<()> {
        let (sql, worker) = (&self.inner.sql, &self.inner.worker);
        let failed = |e| db_error("store a dead letter", e);
        let moved = on_pool!(&self.inner.pool, p => {
            let mut tx = p.begin().await.map_err(failed)?;
            let copied = sqlx::query(&sql.dead_letter)
                .bind(token.id)
                .bind(worker)
                .bind(verdict.reason.as_str())
                .bind(&verdict.error)
                .bind(i64::from(verdict.attempts))
                .execute(&mut *tx)
                .await
                .map_err(failed)?
                .rows_affected();
            sqlx::query(&sql.ack)
                .bind(token.id)
                .bind(worker)
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
            tx.commit().await.map_err(failed)?;
            copied
        });
        if moved == 0 {
            token.lost.store(true, SeqCst);
        } else if token.keyed {
            self.claimable().await;
        }
        Ok(())
    }
}
