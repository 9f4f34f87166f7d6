//! What the Tiny Store modules share without being a module: where data
//! lives, and the handle of a started module. No module's events or rules
//! are here.

use std::fmt;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use seambus::{Stats, Subscription};

/// Boxed error of module set-up and queries.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Where a module keeps its data.
#[derive(Clone, Default)]
pub enum Storage {
    /// In memory, gone when the process ends. The default.
    #[default]
    Memory,
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
            Self::Memory => f.write_str("Memory"),
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
    /// The schema module `module` owns.
    pub fn schema(&self, module: &str) -> Option<String> {
        match self {
            Self::Memory => None,
            Self::Postgres { schema_prefix, .. } => Some(format!("{schema_prefix}{module}")),
        }
    }
}

/// Connections for one module: its schema is created if missing, and is
/// the only schema on the connections' `search_path`, so unqualified names
/// reach this module's tables and no other's. `migration` (idempotent SQL)
/// runs once.
pub async fn module_pool(url: &str, schema: &str, migration: &str) -> Result<Pool, BoxError> {
    if !schema
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(format!("schema name `{schema}`: use a-z, 0-9 and _").into());
    }
    let mut config: tokio_postgres::Config = url.parse()?;
    config.options(format!("-c search_path={schema}"));
    let manager = Manager::from_config(
        config,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager).max_size(8).build()?;
    let client = pool.get().await?;
    client
        .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema};"))
        .await?;
    client.batch_execute(migration).await?;
    tracing::debug!(schema, "module schema ready");
    Ok(pool)
}

/// The pool of module `module` when `storage` is PostgreSQL (its schema
/// created and migrated), `None` when data stays in memory.
pub async fn open_pool(
    storage: &Storage,
    module: &str,
    migration: &str,
) -> Result<Option<Pool>, BoxError> {
    match storage {
        Storage::Memory => Ok(None),
        Storage::Postgres { url, schema_prefix } => {
            let schema = format!("{schema_prefix}{module}");
            Ok(Some(module_pool(url, &schema, migration).await?))
        }
    }
}

/// A module that is running: its name and its subscriptions.
pub struct Started {
    /// The module's name.
    pub module: &'static str,
    /// Its subscriptions, for stats and shutdown.
    pub subscriptions: Vec<Subscription>,
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

/// Locks an in-memory store; a panic in another handler does not poison
/// the data for the rest (each update is done in one step under the lock).
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
