//! The inbox (idempotent consumer): a handler's database work and the
//! record that its group handled the event commit in one transaction, so
//! a redelivered event (any transport delivers at least once) is
//! recognised and skipped, and its effects are applied once.

use std::future::Future;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use seambus::{Context, Event, HandlerError, Received, Result};
use sqlx::{Any, Postgres, Sqlite, Transaction};

use crate::db::{any_is_postgres, check_schema, db_error, migrate, migrate_any, Pool, Sql};

/// The inbox of one schema on the application's own pool (PostgreSQL or
/// SQLite). Its table, `inbox` (`<schema>_inbox` on SQLite), holds
/// `(group, event id)` for every event a wrapped handler committed. The
/// constructors create the schema's tables as
/// [`SqlTransport::connect`](crate::SqlTransport::connect) does.
///
/// ```no_run
/// # async fn run(bus: seambus::Bus, pool: sqlx::PgPool) -> Result<(), seambus::Error> {
/// # #[derive(serde::Serialize, serde::Deserialize, seambus::Event)]
/// # #[event(name = "orders.order_placed", version = 1)]
/// # struct OrderPlaced { id: i64 }
/// use seambus::{Context, HandlerError, Received};
/// use seambus_sql::Inbox;
///
/// let inbox = Inbox::postgres(pool, "seambus").await?;
/// let _sub = bus
///     .module("shipments")
///     .subscribe(inbox.handler(
///         |order: Received<OrderPlaced>, _ctx: Context, mut tx: sqlx::Transaction<'static, sqlx::Postgres>| async move {
///             sqlx::query("INSERT INTO shipments (order_id) VALUES ($1)")
///                 .bind(order.id)
///                 .execute(&mut *tx)
///                 .await
///                 .map_err(HandlerError::retry)?;
///             Ok(tx) // committed with the inbox record; a redelivery is skipped
///         },
///     ))
///     .await?;
/// # Ok(())
/// # }
/// ```
pub struct Inbox<DB: sqlx::Database> {
    pool: sqlx::Pool<DB>,
    insert: Arc<str>,
}

impl<DB: sqlx::Database> Clone for Inbox<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            insert: self.insert.clone(),
        }
    }
}

impl<DB: sqlx::Database> std::fmt::Debug for Inbox<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").finish_non_exhaustive()
    }
}

impl Inbox<Postgres> {
    /// The inbox in `schema` (created with its table if missing) on the
    /// application's PostgreSQL pool.
    pub async fn postgres(pool: sqlx::PgPool, schema: &str) -> Result<Self> {
        check_schema(schema)?;
        let sql = Sql::new(true, schema);
        migrate(&Pool::Postgres(pool.clone()), &sql, schema).await?;
        Ok(Self {
            pool,
            insert: sql.inbox_insert.into(),
        })
    }
}

impl Inbox<Sqlite> {
    /// The inbox with table prefix `schema` (created if missing) on the
    /// application's SQLite pool.
    pub async fn sqlite(pool: sqlx::SqlitePool, schema: &str) -> Result<Self> {
        check_schema(schema)?;
        let sql = Sql::new(false, schema);
        migrate(&Pool::Sqlite(pool.clone()), &sql, schema).await?;
        Ok(Self {
            pool,
            insert: sql.inbox_insert.into(),
        })
    }
}

impl Inbox<Any> {
    /// The inbox in `schema` on the application's `sqlx::Any` pool, when
    /// it reaches PostgreSQL or SQLite (the tables are created through
    /// that pool, so an in-memory SQLite database works too). Call
    /// `sqlx::any::install_default_drivers` before making the pool.
    pub async fn any(pool: sqlx::AnyPool, schema: &str) -> Result<Self> {
        check_schema(schema)?;
        let backend = pool
            .acquire()
            .await
            .map_err(|e| db_error("connect for the inbox", e))?
            .backend_name()
            .to_owned();
        let postgres = any_is_postgres(&backend);
        if !postgres && !backend.eq_ignore_ascii_case("sqlite") {
            return Err(seambus::Error::new(
                seambus::ErrorKind::Config,
                format!("the inbox works on PostgreSQL and SQLite, not on {backend}"),
            ));
        }
        let sql = Sql::new(postgres, schema);
        migrate_any(&pool, postgres, &sql, schema).await?;
        Ok(Self {
            pool,
            insert: sql.inbox_insert.into(),
        })
    }
}

/// What a handler wrapped by [`Inbox::handler`] returns.
pub type InboxResult<DB> = std::result::Result<Transaction<'static, DB>, HandlerError>;

macro_rules! inbox_handler {
    ($db:ty) => {
        impl Inbox<$db> {
            /// Wraps `handler` for [`Module::subscribe`](seambus::Module::subscribe):
            /// each delivery opens a transaction on the inbox's pool and
            /// records `(group, event id)` in it. An event the group
            /// already handled is skipped (acknowledged without running
            /// the handler). Otherwise the handler does its work on the
            /// transaction and returns it, and it is committed with the
            /// record; a handler error rolls both back (and is retried or
            /// dead-lettered as usual), and a failed commit is retried.
            pub fn handler<E, F, Fut>(
                &self,
                handler: F,
            ) -> impl Fn(Received<E>, Context) -> BoxFuture<'static, std::result::Result<(), HandlerError>>
                   + Send
                   + Sync
                   + 'static
            where
                E: Event,
                F: Fn(Received<E>, Context, Transaction<'static, $db>) -> Fut
                    + Send
                    + Sync
                    + 'static,
                Fut: Future<Output = InboxResult<$db>> + Send + 'static,
            {
                let inbox = self.clone();
                let handler = Arc::new(handler);
                move |event: Received<E>, ctx: Context| {
                    let (inbox, handler) = (inbox.clone(), handler.clone());
                    Box::pin(async move {
                        let mut tx = inbox.pool.begin().await.map_err(HandlerError::retry)?;
                        let first = sqlx::query(&inbox.insert)
                            .bind(ctx.group().to_string())
                            .bind(ctx.envelope().attributes().wire_id())
                            .execute(&mut *tx)
                            .await
                            .map_err(HandlerError::retry)?
                            .rows_affected()
                            > 0;
                        if !first {
                            tracing::debug!(group = %ctx.group(), id = %ctx.envelope().id(), "already handled (inbox); skipped");
                            return Ok(());
                        }
                        let tx = handler(event, ctx, tx).await?;
                        tx.commit().await.map_err(HandlerError::retry)
                    })
                }
            }
        }
    };
}
inbox_handler!(Postgres);
inbox_handler!(Sqlite);
inbox_handler!(Any);
