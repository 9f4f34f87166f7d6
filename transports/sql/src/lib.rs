#![doc = include_str!("../README.md")]

mod config;
mod db;
mod inbox;
mod outbox;
mod source;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use seambus::transport::engine::Host;
use seambus::transport::support::outgoing;
use seambus::transport::{
    Capabilities, Consumer, DeadLetter, DeliveryHandler, GroupId, ShutdownReport, SubscriptionSpec,
    Transport,
};
use seambus::{Envelope, Error, ErrorKind, Result};
use sqlx::Row;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub use config::SqlConfig;
pub use inbox::{Inbox, InboxResult};
pub use outbox::{Outbox, OutboxConnection, Relay};

use crate::db::{db_error, on_pool, Pool, Sql};
use crate::source::Wakers;
use crate::wire::{headers_of, DeadRow};

/// A [`Transport`] on a SQL database: PostgreSQL, or an SQLite file. See
/// the crate docs for the mapping.
#[derive(Clone)]
pub struct SqlTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SqlTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlTransport")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub(crate) pool: Pool,
    pub(crate) sql: Sql,
    pub(crate) config: SqlConfig,
    pub(crate) host: Host,
    pub(crate) wakers: Arc<Wakers>,
    /// This transport's name in the leases it holds.
    pub(crate) worker: String,
    pub(crate) poll_interval: Duration,
    listener: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl SqlTransport {
    /// Connects and creates the transport's tables if they are missing (in
    /// one transaction; several processes may start at once).
    pub async fn connect(config: SqlConfig) -> Result<Self> {
        if config.lease < Duration::from_millis(300) {
            return Err(Error::new(
                ErrorKind::Config,
                "the lease must be at least 300 ms",
            ));
        }
        let (pool, sql) = db::open(&config).await?;
        let poll_interval = config.poll_interval.unwrap_or(match pool {
            Pool::Postgres(_) => Duration::from_secs(2),
            Pool::Sqlite(_) => Duration::from_millis(100),
        });
        let inner = Arc::new(Inner {
            pool,
            sql,
            config,
            host: Host::new("SQL"),
            wakers: Arc::default(),
            worker: Uuid::now_v7().to_string(),
            poll_interval,
            listener: Default::default(),
        });
        *inner
            .listener
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            source::listen(&inner.pool, &inner.sql.channel, inner.wakers.clone());
        Ok(Self { inner })
    }

    /// The configuration in use.
    pub fn config(&self) -> &SqlConfig {
        &self.inner.config
    }

    /// Whether this transport runs on PostgreSQL (else SQLite).
    pub fn is_postgres(&self) -> bool {
        matches!(self.inner.pool, Pool::Postgres(_))
    }

    /// Drops the transport's tables (on PostgreSQL its schema), with every
    /// event, group and dead letter in them. For tests and tear-down; there
    /// is no undo.
    pub async fn drop_tables(&self) -> Result<()> {
        db::drop_all(&self.inner.pool, &self.inner.sql).await
    }

    /// Deletes one group: its pending events, its dead letters and the
    /// group itself (later publishes no longer reach it), without
    /// subscribing. Deleting a group that does not exist is Ok. There is
    /// no undo.
    pub async fn delete_group(&self, group: &GroupId) -> Result<()> {
        let failed = |e| db_error(&format!("delete group {group}"), e);
        on_pool!(&self.inner.pool, p => {
            let mut tx = p.begin().await.map_err(failed)?;
            for statement in &self.inner.sql.delete_group {
                sqlx::query(statement)
                    .bind(group.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(failed)?;
            }
            tx.commit().await.map_err(failed)
        })
    }

    async fn dead_rows(&self, group: &GroupId) -> Result<Vec<DeadRow>> {
        dead_rows(&self.inner.pool, &self.inner.sql, group).await
    }

    /// Declares the group (idempotently); an existing group of another
    /// event is a configuration error.
    async fn declare_group(&self, spec: &SubscriptionSpec) -> Result<()> {
        let group = spec.group.to_string();
        let failed = |e| db_error(&format!("declare group {group}"), e);
        let sql = &self.inner.sql;
        let event_type: String = on_pool!(&self.inner.pool, p => {
            sqlx::query(&sql.declare_group)
                .bind(&group)
                .bind(spec.event_type.as_ref())
                .execute(p)
                .await
                .map_err(failed)?;
            sqlx::query_scalar(&sql.group_event_type)
                .bind(&group)
                .fetch_one(p)
                .await
                .map_err(failed)?
        });
        if event_type != spec.event_type {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "group {group} is subscribed to {event_type}, not {}",
                    spec.event_type
                ),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Transport for SqlTransport {
    fn name(&self) -> &str {
        "sql"
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::none();
        caps.persistent = true;
        caps.consumer_groups = true;
        caps.per_key_order = true;
        caps.per_key_order_across_consumers = true;
        caps.max_payload = Some(self.inner.config.max_payload);
        caps.dead_letter_store = true;
        caps.duplicates = true;
        caps
    }

    async fn publish(&self, envelope: Envelope) -> Result<()> {
        let _open = self.inner.host.admit().await?;
        let payload = outgoing(&envelope, "SQL", Some(self.inner.config.max_payload))?;
        let attrs = envelope.attributes();
        let sql = &self.inner.sql;
        let groups: Vec<String> = on_pool!(&self.inner.pool, p => {
            let mut query = sqlx::query(&sql.publish)
                .bind(attrs.event_type.as_ref())
                .bind(attrs.partition_key.as_deref())
                .bind(headers_of(attrs))
                .bind(&payload[..]);
            if sql.notify.is_some() {
                query = query.bind(&sql.channel);
            }
            query
                .fetch_all(p)
                .await
                .map_err(|e| db_error("publish", e))?
                .into_iter()
                .filter_map(|row| row.try_get::<String, _>(0).ok())
                .collect()
        });
        if sql.notify.is_none() {
            for group in groups {
                self.inner.wakers.wake(&group);
            }
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        spec: SubscriptionSpec,
        handler: Arc<dyn DeliveryHandler>,
    ) -> Result<Box<dyn Consumer>> {
        let _open = self.inner.host.admit().await?;
        if spec.concurrency == 0 {
            return Err(Error::new(
                ErrorKind::Config,
                "concurrency must be at least 1",
            ));
        }
        self.declare_group(&spec).await?;
        source::subscribe(&self.inner, spec, handler).await
    }

    async fn dead_letters(&self, group: &GroupId) -> Result<Vec<DeadLetter>> {
        Ok(self
            .dead_rows(group)
            .await?
            .iter()
            .map(|row| row.dead_letter(group))
            .collect())
    }

    async fn redrive(&self, group: &GroupId, ids: Option<&[Uuid]>) -> Result<usize> {
        let _open = self.inner.host.admit().await?;
        let sql = &self.inner.sql;
        let mut n = 0;
        for row in self.dead_rows(group).await? {
            if ids.is_some_and(|ids| !ids.contains(&row.dead_letter(group).envelope.id())) {
                continue;
            }
            // Back in the group's queue as a first attempt, and out of the
            // dead letters, in one transaction.
            let failed = |e| db_error(&format!("redrive a dead letter of {group}"), e);
            let moved = on_pool!(&self.inner.pool, p => {
                let mut tx = p.begin().await.map_err(failed)?;
                let moved = sqlx::query(&sql.redrive)
                    .bind(row.id)
                    .execute(&mut *tx)
                    .await
                    .map_err(failed)?
                    .rows_affected();
                sqlx::query(&sql.delete_dead)
                    .bind(row.id)
                    .execute(&mut *tx)
                    .await
                    .map_err(failed)?;
                tx.commit().await.map_err(failed)?;
                moved
            });
            n += moved as usize;
        }
        if n > 0 {
            source::announce(&self.inner, &group.to_string()).await;
        }
        Ok(n)
    }

    async fn discard_dead_letters(&self, group: &GroupId, ids: Option<&[Uuid]>) -> Result<usize> {
        let sql = &self.inner.sql;
        let failed = |e| db_error(&format!("discard dead letters of {group}"), e);
        let Some(ids) = ids else {
            let gone = on_pool!(&self.inner.pool, p => {
                sqlx::query(&sql.delete_dead_of_group)
                    .bind(group.to_string())
                    .execute(p)
                    .await
                    .map_err(failed)?
                    .rows_affected()
            });
            return Ok(gone as usize);
        };
        let mut n = 0;
        for row in self.dead_rows(group).await? {
            if !ids.contains(&row.dead_letter(group).envelope.id()) {
                continue;
            }
            let gone = on_pool!(&self.inner.pool, p => {
                sqlx::query(&sql.delete_dead)
                    .bind(row.id)
                    .execute(p)
                    .await
                    .map_err(failed)?
                    .rows_affected()
            });
            n += gone as usize;
        }
        Ok(n)
    }

    async fn shutdown(&self, deadline: Duration) -> Result<ShutdownReport> {
        let report = self.inner.host.shut_down(deadline).await;
        let listener = self
            .inner
            .listener
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(listener) = listener {
            listener.abort();
        }
        on_pool!(&self.inner.pool, p => p.close().await);
        Ok(report)
    }
}

/// The stored dead letters of `group`, oldest first.
pub(crate) async fn dead_rows(pool: &Pool, sql: &Sql, group: &GroupId) -> Result<Vec<DeadRow>> {
    let failed = |e| db_error(&format!("read the dead letters of {group}"), e);
    on_pool!(pool, p => {
        sqlx::query(&sql.list_dead)
            .bind(group.to_string())
            .fetch_all(p)
            .await
            .map_err(failed)?
            .into_iter()
            .map(|row| {
                Ok(DeadRow {
                    id: row.try_get("id")?,
                    headers: row.try_get("headers")?,
                    payload: row.try_get("payload")?,
                    reason: row.try_get("reason")?,
                    error: row.try_get("error")?,
                    attempts: row.try_get("attempts")?,
                    dead_at: row.try_get("dead_at")?,
                })
            })
            .collect::<std::result::Result<Vec<_>, sqlx::Error>>()
            .map_err(failed)
    })
}

#[async_trait]
impl seambus::config::Configurable for SqlTransport {
    const KIND: &'static str = "sql";
    type Config = SqlConfig;

    /// `SEAMBUS_SQL_URL`: the database.
    fn apply_env(config: &mut SqlConfig, env: seambus::config::Env<'_>) -> Result<()> {
        if let Some(url) = env("SEAMBUS_SQL_URL") {
            config.url = url;
        }
        Ok(())
    }

    /// The schema (SQLite: the table prefix) is the namespace, with every
    /// character but letters, digits and `_` made `_`.
    fn apply_namespace(config: &mut SqlConfig, namespace: &str) {
        config.schema = namespace
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
    }

    async fn connect_config(config: SqlConfig) -> Result<Self> {
        Self::connect(config).await
    }
}
