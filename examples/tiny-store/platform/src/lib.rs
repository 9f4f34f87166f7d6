//! What the Tiny Store modules share without being a module: where data
//! lives, each module's database (with its outbox and inbox), and the
//! handle of a started module. No module's events or rules are here.
//!
//! Every module owns one database: an SQLite file, or a schema of a
//! PostgreSQL database. Its own tables, the outbox its events are written
//! to (in the transaction that changes its data) and the inbox that
//! records the events its handlers applied all live there, so a change and
//! the events it causes commit together or not at all. The modules' SQL is
//! written once for both databases, through `sqlx::Any`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::Duration;

use seambus::{Bus, Event, Module, PublishOptions, Stats, Subscription};
use seambus_sql::{Inbox, Outbox, Relay, SqlConfig};
use sqlx::any::AnyPoolOptions;
use sqlx::{Any, AnyConnection, AnyPool, Executor, Transaction};

/// Boxed error of module set-up and queries.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The table prefix (SQLite) of the outbox and inbox in a module's file.
const SEAMBUS_TABLES: &str = "seambus";

/// Where a module keeps its data.
#[derive(Clone, Default)]
pub enum Storage {
    /// SQLite files in a temporary directory, deleted when the module's
    /// database is dropped. The default.
    #[default]
    Temporary,
    /// SQLite: module `m` in the file `<dir>/<m>.db`, created if missing.
    /// No server; survives a crash of the process.
    Sqlite {
        /// The directory of the files.
        dir: PathBuf,
    },
    /// In PostgreSQL: each module in its own schema, `<prefix><module>`,
    /// reached through its own connections whose `search_path` holds only
    /// that schema.
    Postgres {
        /// `postgres://user@host:port/database`.
        url: String,
        /// Prepended to each module's schema name (to keep runs apart).
        schema_prefix: String,
    },
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Temporary => f.write_str("Temporary"),
            Self::Sqlite { dir } => f.debug_struct("Sqlite").field("dir", dir).finish(),
            // The URL may hold a password: never printed.
            Self::Postgres { schema_prefix, .. } => f
                .debug_struct("Postgres")
                .field("url", &"<redacted>")
                .field("schema_prefix", schema_prefix)
                .finish(),
        }
    }
}

impl Storage {
    /// The schema module `module` owns on PostgreSQL.
    pub fn schema(&self, module: &str) -> Option<String> {
        match self {
            Self::Postgres { schema_prefix, .. } => Some(format!("{schema_prefix}{module}")),
            _ => None,
        }
    }
}

/// One module's database: its pool, its outbox and its inbox.
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    outbox: Outbox,
    inbox: Inbox<Any>,
    sqlite: bool,
    /// The directory of a temporary database, deleted with the last clone.
    _temporary: Option<Arc<tempfile::TempDir>>,
}

impl fmt::Debug for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Db")
            .field("sqlite", &self.sqlite)
            .finish_non_exhaustive()
    }
}

impl Db {
    /// Opens the database of `module` (creating its file or schema), runs
    /// `migration` (idempotent SQL that both SQLite and PostgreSQL
    /// accept), and creates its outbox and inbox tables.
    pub async fn open(storage: &Storage, module: &str, migration: &str) -> Result<Self, BoxError> {
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let (temporary, dir) = match storage {
            Storage::Temporary => {
                let dir = tempfile::Builder::new().prefix("tiny-store-").tempdir()?;
                let path = dir.path().to_owned();
                (Some(Arc::new(dir)), Some(path))
            }
            Storage::Sqlite { dir } => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                (None, Some(dir.clone()))
            }
            Storage::Postgres { .. } => (None, None),
        };
        let (pool, config) = match (&dir, storage) {
            (Some(dir), _) => sqlite_pool(dir, module).await?,
            (None, Storage::Postgres { url, schema_prefix }) => {
                postgres_pool(url, &format!("{schema_prefix}{module}")).await?
            }
            (None, _) => unreachable!("every storage but PostgreSQL has a directory"),
        };
        pool.execute(sqlx::raw_sql(migration)).await?;
        let inbox = Inbox::any(pool.clone(), &config.schema).await?;
        let outbox = Outbox::connect(config).await?;
        tracing::debug!(module, "module database ready");
        Ok(Self {
            pool,
            outbox,
            inbox,
            sqlite: dir.is_some(),
            _temporary: temporary,
        })
    }

    /// The module's pool.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// A transaction that will write (on SQLite it takes the write lock at
    /// once, so two never deadlock upgrading from a read).
    pub async fn begin(&self) -> Result<Transaction<'static, Any>, sqlx::Error> {
        if self.sqlite {
            self.pool.begin_with("BEGIN IMMEDIATE").await
        } else {
            self.pool.begin().await
        }
    }

    /// The inbox: wrap a handler with [`Inbox::handler`] so its work and
    /// the record of the event commit together.
    pub fn inbox(&self) -> &Inbox<Any> {
        &self.inbox
    }

    /// Writes `event`, published by `module` under `key`, to the outbox
    /// in the transaction of `conn`: it is sent once the transaction
    /// commits, and never if it rolls back.
    pub async fn publish<E: Event>(
        &self,
        conn: &mut AnyConnection,
        module: &Module,
        key: impl ToString,
        event: E,
    ) -> seambus::Result<()> {
        self.outbox
            .publish_with(
                conn,
                module,
                event,
                PublishOptions::new().key(key.to_string()),
            )
            .await
            .map(|_| ())
    }

    /// Starts forwarding the committed events of the outbox to their
    /// routes on `bus`.
    pub fn relay(&self, bus: Bus) -> Relay {
        self.outbox.relay(bus)
    }
}

/// Events a killed process's relay held come back after this.
const LEASE: Duration = Duration::from_secs(5);

async fn sqlite_pool(dir: &Path, module: &str) -> Result<(AnyPool, SqlConfig), BoxError> {
    let file = dir.join(format!("{module}.db"));
    let url = format!("sqlite://{}", file.display());
    let pool = AnyPoolOptions::new()
        .max_connections(4)
        .after_connect(|conn, _| {
            Box::pin(async move {
                // WAL: readers never wait for the writer; NORMAL survives
                // a crash of the process.
                conn.execute(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                     PRAGMA busy_timeout = 10000;",
                )
                .await
                .map(|_| ())
            })
        })
        .connect(&format!("{url}?mode=rwc"))
        .await
        .map_err(|e| format!("cannot open {}: {e}", file.display()))?;
    let config = SqlConfig::new(url)
        .with_schema(SEAMBUS_TABLES)
        .with_max_connections(2)
        .with_lease(LEASE);
    Ok((pool, config))
}

async fn postgres_pool(url: &str, schema: &str) -> Result<(AnyPool, SqlConfig), BoxError> {
    if !schema
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(format!("schema name `{schema}`: use a-z, 0-9 and _").into());
    }
    let set_path = format!("SET search_path TO {schema}");
    let pool = AnyPoolOptions::new()
        .max_connections(4)
        .after_connect(move |conn, _| {
            let set_path = set_path.clone();
            Box::pin(async move { conn.execute(set_path.as_str()).await.map(|_| ()) })
        })
        .connect(url)
        .await
        .map_err(|e| {
            let url = seambus::transport::support::redact_url(url);
            format!("cannot connect to {url}: {e}")
        })?;
    pool.execute(format!("CREATE SCHEMA IF NOT EXISTS {schema}").as_str())
        .await?;
    // The outbox and inbox tables sit in the module's own schema.
    let config = SqlConfig::new(url)
        .with_schema(schema)
        .with_max_connections(2)
        .with_lease(LEASE);
    Ok((pool, config))
}

/// A module that is running: its name, its subscriptions and the relay
/// of its outbox.
pub struct Started {
    /// The module's name.
    pub module: &'static str,
    /// Its subscriptions, for stats and shutdown.
    pub subscriptions: Vec<Subscription>,
    /// Forwards the events its outbox holds; stopped at shutdown.
    pub relay: Option<Relay>,
}

impl Started {
    /// Each subscription's name and stats.
    pub fn stats(&self) -> Vec<(String, Stats)> {
        self.subscriptions
            .iter()
            .map(|s| (s.group().subscription().to_owned(), s.stats()))
            .collect()
    }
}

/// A `bigint` column as a count or an amount (never negative here).
pub fn unsigned(v: i64) -> Result<u64, BoxError> {
    Ok(u64::try_from(v)?)
}

/// A count or an amount as a `bigint` (amounts are checked far below its
/// limit).
pub fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `handler`, and a bump of `changed` after each delivery it handled (its
/// transaction committed by then), for code that waits for the data to
/// change.
pub fn notifying<E, H, Fut>(
    handler: H,
    changed: tokio::sync::watch::Sender<u64>,
) -> impl Fn(
    seambus::Received<E>,
    seambus::Context,
) -> futures_util::future::BoxFuture<'static, Result<(), seambus::HandlerError>>
       + Send
       + Sync
       + 'static
where
    E: Event,
    H: Fn(seambus::Received<E>, seambus::Context) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), seambus::HandlerError>> + Send + 'static,
{
    move |event, ctx| {
        let (done, changed) = (handler(event, ctx), changed.clone());
        Box::pin(async move {
            done.await?;
            changed.send_modify(|n| *n += 1);
            Ok(())
        })
    }
}
