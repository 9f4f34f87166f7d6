//! The database side: the pool of either backend, the schema, and every
//! statement the transport runs, written once with the few places where
//! PostgreSQL and SQLite differ.

use std::str::FromStr;
use std::time::Duration;

use seambus::{Error, ErrorKind, Result};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::config::{redact, SqlConfig};

/// The version of the tables this crate creates.
const SCHEMA_VERSION: i64 = 1;

/// A pool of one backend.
#[derive(Clone, Debug)]
pub(crate) enum Pool {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Runs `$body` with `$p` bound to the pool of whichever backend is in use
/// (the body is compiled once per backend).
macro_rules! on_pool {
    ($pool:expr, $p:ident => $body:expr) => {
        match $pool {
            $crate::db::Pool::Postgres($p) => $body,
            $crate::db::Pool::Sqlite($p) => $body,
        }
    };
}
pub(crate) use on_pool;

/// Whether a `sqlx::Any` connection's backend (`backend_name`) is
/// PostgreSQL; the others that can reach here are SQLite.
pub(crate) fn any_is_postgres(backend: &str) -> bool {
    backend.eq_ignore_ascii_case("postgresql")
}

/// A database error as a Seambus error: lost connections and timeouts are
/// retryable, the rest is not.
pub(crate) fn db_error(what: &str, e: sqlx::Error) -> Error {
    let kind = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => ErrorKind::Connection,
        sqlx::Error::PoolTimedOut => ErrorKind::Timeout,
        sqlx::Error::Configuration(_) => ErrorKind::Config,
        sqlx::Error::Database(db) if is_busy(db.code().as_deref()) => ErrorKind::Timeout,
        _ => ErrorKind::Other,
    };
    Error::new(kind, format!("{what}: {e}"))
}

/// SQLite's "database is locked" and PostgreSQL's serialization and
/// connection-class errors: worth trying again.
fn is_busy(code: Option<&str>) -> bool {
    matches!(
        code,
        Some("5" | "6" | "40001" | "40P01" | "57P01" | "57P03")
    ) || code.is_some_and(|c| c.starts_with("08"))
}

/// The statements of one schema on one backend.
#[derive(Debug)]
pub(crate) struct Sql {
    /// Channel of `LISTEN/NOTIFY` (PostgreSQL).
    pub(crate) channel: String,
    pub(crate) publish: String,
    pub(crate) declare_group: String,
    pub(crate) group_event_type: String,
    pub(crate) claim_ordered: String,
    pub(crate) claim_unordered: String,
    pub(crate) next_due: String,
    pub(crate) ack: String,
    pub(crate) release: String,
    pub(crate) abandon: String,
    pub(crate) keep_alive: String,
    pub(crate) retry_later: String,
    pub(crate) dead_letter: String,
    pub(crate) notify: Option<String>,
    pub(crate) list_dead: String,
    pub(crate) redrive: String,
    pub(crate) delete_dead: String,
    pub(crate) delete_dead_of_group: String,
    pub(crate) delete_group: [String; 3],
    pub(crate) outbox_insert: String,
    pub(crate) outbox_count: String,
    pub(crate) outbox_take: String,
    pub(crate) outbox_delete: String,
    pub(crate) outbox_set_aside: String,
    pub(crate) relay_lease: String,
    pub(crate) relay_release: String,
    pub(crate) inbox_insert: String,
    create: Vec<String>,
    read_version: String,
    write_version: String,
    drop: Vec<String>,
}

impl Sql {
    pub(crate) fn new(postgres: bool, schema: &str) -> Self {
        let table = |name: &str| {
            if postgres {
                format!("\"{schema}\".{name}")
            } else {
                format!("\"{schema}_{name}\"")
            }
        };
        let (groups, queue, dead, meta) = (
            table("groups"),
            table("queue"),
            table("dead_letters"),
            table("meta"),
        );
        let (outbox, leases, inbox) = (table("outbox"), table("leases"), table("inbox"));
        // Times are the database's, in milliseconds since the epoch, so
        // leases do not depend on the clocks of the processes.
        let now = if postgres {
            "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT"
        } else {
            "CAST(unixepoch('subsec') * 1000 AS INTEGER)"
        };
        let (serial, bytes, greatest) = if postgres {
            ("BIGSERIAL PRIMARY KEY", "BYTEA", "GREATEST")
        } else {
            ("INTEGER PRIMARY KEY AUTOINCREMENT", "BLOB", "MAX")
        };
        let skip_locked = if postgres {
            " FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        let channel = format!("seambus_{schema}");
        // On PostgreSQL publishing tells every process (`pg_notify` with the
        // channel as `$5`, delivered at commit); on SQLite the transport
        // wakes its own consumers and other processes poll.
        let notifying = |statement: String, returning: &str| {
            if postgres {
                format!(
                    "WITH changed AS ({statement} RETURNING {returning}) \
                     SELECT pg_notify($5, grp) FROM changed"
                )
            } else {
                format!("{statement} RETURNING {returning}")
            }
        };
        let claim = |ordered: bool| {
            let key_free = if ordered {
                format!(
                    " AND (q.pkey IS NULL OR NOT EXISTS (SELECT 1 FROM {queue} e \
                     WHERE e.grp = q.grp AND e.pkey = q.pkey AND e.id < q.id))"
                )
            } else {
                String::new()
            };
            format!(
                "UPDATE {queue} SET locked_until = {now} + $3, locked_by = $2, \
                 delivered = delivered + 1 \
                 WHERE id IN (SELECT q.id FROM {queue} q WHERE q.grp = $1 \
                 AND q.available_at <= {now} AND q.locked_until <= {now}{key_free} \
                 ORDER BY q.id LIMIT $4{skip_locked}) \
                 RETURNING id, pkey, headers, payload, attempt, delivered"
            )
        };
        let index = |name: &str| {
            if postgres {
                name.to_owned()
            } else {
                format!("\"{schema}_{name}\"")
            }
        };
        let mut create = Vec::new();
        if postgres {
            create.push(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""));
        }
        create.extend([
            format!("CREATE TABLE IF NOT EXISTS {meta} (version BIGINT NOT NULL)"),
            format!(
                "CREATE TABLE IF NOT EXISTS {groups} (name TEXT PRIMARY KEY, \
                 event_type TEXT NOT NULL, created_at BIGINT NOT NULL)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {queue} (id {serial}, grp TEXT NOT NULL, \
                 pkey TEXT, headers TEXT NOT NULL, payload {bytes} NOT NULL, \
                 attempt BIGINT NOT NULL, delivered BIGINT NOT NULL, \
                 available_at BIGINT NOT NULL, locked_until BIGINT NOT NULL, locked_by TEXT)"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {} ON {queue} (grp, id)",
                index("queue_by_group")
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {} ON {queue} (grp, pkey, id) WHERE pkey IS NOT NULL",
                index("queue_by_key")
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {dead} (id {serial}, grp TEXT NOT NULL, \
                 pkey TEXT, headers TEXT NOT NULL, payload {bytes} NOT NULL, \
                 reason TEXT NOT NULL, error TEXT NOT NULL, attempts BIGINT NOT NULL, \
                 dead_at BIGINT NOT NULL)"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {} ON {dead} (grp, id)",
                index("dead_by_group")
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {outbox} (id {serial}, event_type TEXT NOT NULL, \
                 pkey TEXT, headers TEXT NOT NULL, payload {bytes} NOT NULL, \
                 created_at BIGINT NOT NULL)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {leases} (name TEXT PRIMARY KEY, holder TEXT NOT NULL, \
                 until BIGINT NOT NULL)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {inbox} (grp TEXT NOT NULL, id TEXT NOT NULL, \
                 handled_at BIGINT NOT NULL, PRIMARY KEY (grp, id))"
            ),
        ]);
        let drop = if postgres {
            vec![format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE")]
        } else {
            [&groups, &queue, &dead, &meta, &outbox, &leases, &inbox]
                .iter()
                .map(|t| format!("DROP TABLE IF EXISTS {t}"))
                .collect()
        };
        Self {
            publish: notifying(
                format!(
                    "INSERT INTO {queue} (grp, pkey, headers, payload, attempt, delivered, \
                     available_at, locked_until) \
                     SELECT name, $2, $3, $4, 1, 0, {now}, 0 FROM {groups} WHERE event_type = $1"
                ),
                "grp",
            ),
            declare_group: format!(
                "INSERT INTO {groups} (name, event_type, created_at) VALUES ($1, $2, {now}) \
                 ON CONFLICT (name) DO NOTHING"
            ),
            group_event_type: format!("SELECT event_type FROM {groups} WHERE name = $1"),
            claim_ordered: claim(true),
            claim_unordered: claim(false),
            next_due: format!(
                "SELECT MIN({greatest}(available_at, locked_until)) - {now} FROM {queue} \
                 WHERE grp = $1 AND {greatest}(available_at, locked_until) > {now}"
            ),
            ack: format!("DELETE FROM {queue} WHERE id = $1 AND locked_by = $2"),
            release: format!(
                "UPDATE {queue} SET locked_until = 0, locked_by = NULL, \
                 delivered = delivered - 1 WHERE id = $1 AND locked_by = $2"
            ),
            abandon: format!(
                "UPDATE {queue} SET locked_until = 0, locked_by = NULL \
                 WHERE id = $1 AND locked_by = $2"
            ),
            keep_alive: format!(
                "UPDATE {queue} SET locked_until = {now} + $3 WHERE id = $1 AND locked_by = $2"
            ),
            retry_later: format!(
                "UPDATE {queue} SET attempt = $3, available_at = {now} + $4, locked_until = 0, \
                 locked_by = NULL WHERE id = $1 AND locked_by = $2"
            ),
            dead_letter: format!(
                "INSERT INTO {dead} (grp, pkey, headers, payload, reason, error, attempts, dead_at) \
                 SELECT grp, pkey, headers, payload, $3, $4, $5, {now} FROM {queue} \
                 WHERE id = $1 AND locked_by = $2"
            ),
            notify: postgres.then(|| "SELECT pg_notify($1, $2)".to_owned()),
            list_dead: format!(
                "SELECT id, headers, payload, reason, error, attempts, dead_at FROM {dead} \
                 WHERE grp = $1 ORDER BY id"
            ),
            redrive: format!(
                "INSERT INTO {queue} (grp, pkey, headers, payload, attempt, delivered, \
                 available_at, locked_until) \
                 SELECT grp, pkey, headers, payload, 1, 0, {now}, 0 FROM {dead} WHERE id = $1"
            ),
            delete_dead: format!("DELETE FROM {dead} WHERE id = $1"),
            delete_dead_of_group: format!("DELETE FROM {dead} WHERE grp = $1"),
            delete_group: [
                format!("DELETE FROM {queue} WHERE grp = $1"),
                format!("DELETE FROM {dead} WHERE grp = $1"),
                format!("DELETE FROM {groups} WHERE name = $1"),
            ],
            outbox_insert: if postgres {
                format!(
                    "WITH written AS (INSERT INTO {outbox} (event_type, pkey, headers, payload, \
                     created_at) VALUES ($1, $2, $3, $4, {now}) RETURNING id) \
                     SELECT pg_notify($5, 'outbox') FROM written"
                )
            } else {
                format!(
                    "INSERT INTO {outbox} (event_type, pkey, headers, payload, created_at) \
                     VALUES ($1, $2, $3, $4, {now})"
                )
            },
            outbox_count: format!("SELECT COUNT(*) FROM {outbox}"),
            outbox_take: format!("SELECT id, headers, payload FROM {outbox} ORDER BY id LIMIT $1"),
            outbox_delete: format!("DELETE FROM {outbox} WHERE id = $1"),
            outbox_set_aside: format!(
                "INSERT INTO {dead} (grp, pkey, headers, payload, reason, error, attempts, dead_at) \
                 SELECT 'seambus:outbox', pkey, headers, payload, $2, $3, 0, {now} FROM {outbox} \
                 WHERE id = $1"
            ),
            relay_lease: format!(
                "INSERT INTO {leases} (name, holder, until) VALUES ('relay', $1, {now} + $2) \
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until = excluded.until \
                 WHERE {leases}.holder = excluded.holder OR {leases}.until < {now}"
            ),
            relay_release: format!(
                "UPDATE {leases} SET until = 0 WHERE name = 'relay' AND holder = $1"
            ),
            inbox_insert: format!(
                "INSERT INTO {inbox} (grp, id, handled_at) VALUES ($1, $2, {now}) \
                 ON CONFLICT (grp, id) DO NOTHING"
            ),
            read_version: format!("SELECT MAX(version) FROM {meta}"),
            write_version: format!("INSERT INTO {meta} (version) VALUES ($1)"),
            create,
            drop,
            channel,
        }
    }
}

/// Whether `url` names a PostgreSQL database (else SQLite).
fn is_postgres(url: &str) -> Result<bool> {
    let scheme = url.split(':').next().unwrap_or_default();
    match scheme {
        "postgres" | "postgresql" => Ok(true),
        "sqlite" => Ok(false),
        _ => Err(Error::new(
            ErrorKind::Config,
            format!(
                "unsupported database URL {}: expected postgres://… or sqlite://…",
                redact(url)
            ),
        )),
    }
}

/// A schema name is part of the SQL text: letters, digits and `_` only.
pub(crate) fn check_schema(schema: &str) -> Result<()> {
    if schema.is_empty()
        || schema.len() > 40
        || !schema
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(Error::new(
            ErrorKind::Config,
            format!("schema {schema:?} must be 1 to 40 letters, digits or `_`"),
        ));
    }
    Ok(())
}

/// Connects, then creates or checks the schema (idempotently, safe with
/// several processes starting at once).
pub(crate) async fn open(config: &SqlConfig) -> Result<(Pool, Sql)> {
    let schema = &config.schema;
    check_schema(schema)?;
    let postgres = is_postgres(&config.url)?;
    let shown = redact(&config.url);
    let connect_error = |e: sqlx::Error| db_error(&format!("connect to {shown}"), e);
    let pool = if postgres {
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections.unwrap_or(10))
            .acquire_timeout(Duration::from_secs(10))
            .connect(&config.url)
            .await
            .map_err(connect_error)?;
        Pool::Postgres(pool)
    } else {
        // WAL: readers do not block the writer; NORMAL synchronous in WAL
        // mode survives a crash of the process (a power cut may lose the
        // last commits).
        let options = SqliteConnectOptions::from_str(&config.url)
            .map_err(connect_error)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(config.max_connections.unwrap_or(4))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(connect_error)?;
        Pool::Sqlite(pool)
    };
    let sql = Sql::new(postgres, schema);
    migrate(&pool, &sql, schema).await?;
    Ok((pool, sql))
}

pub(crate) async fn migrate(pool: &Pool, sql: &Sql, schema: &str) -> Result<()> {
    let postgres = matches!(pool, Pool::Postgres(_));
    on_pool!(pool, p => migrate_on!(p, postgres, sql, schema))
}

/// [`migrate`] through the application's `sqlx::Any` pool.
pub(crate) async fn migrate_any(
    pool: &sqlx::AnyPool,
    postgres: bool,
    sql: &Sql,
    schema: &str,
) -> Result<()> {
    migrate_on!(pool, postgres, sql, schema)
}

/// Creates the tables in one transaction on pool `$p` (of any backend,
/// `sqlx::Any` included: only integers and text cross) and checks the
/// schema version.
macro_rules! migrate_on {
    ($p:expr, $postgres:expr, $sql:expr, $schema:expr) => {{
        let (sql, schema) = ($sql, $schema);
        let failed = |e| db_error(&format!("create the tables of schema {schema}"), e);
        let mut tx = $p.begin().await.map_err(failed)?;
        if $postgres {
            // Processes starting at once create the schema one at a time.
            sqlx::query(
                "SELECT count(*) FROM (SELECT pg_advisory_xact_lock(hashtext($1))) AS locked",
            )
            .bind(format!("seambus:{schema}"))
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        }
        for statement in &sql.create {
            sqlx::query(statement)
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
        }
        let version: Option<i64> = sqlx::query_scalar(&sql.read_version)
            .fetch_one(&mut *tx)
            .await
            .map_err(failed)?;
        match version {
            None => {
                sqlx::query(&sql.write_version)
                    .bind(SCHEMA_VERSION)
                    .execute(&mut *tx)
                    .await
                    .map_err(failed)?;
            }
            Some(v) if v > SCHEMA_VERSION => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "schema {schema} has version {v}, made by a newer seambus-sql \
                         (this one knows {SCHEMA_VERSION})"
                    ),
                ))
            }
            Some(_) => {}
        }
        tx.commit().await.map_err(failed)
    }};
}
use migrate_on;

/// Drops the transport's tables (and the PostgreSQL schema) with every
/// event and dead letter in them.
pub(crate) async fn drop_all(pool: &Pool, sql: &Sql) -> Result<()> {
    on_pool!(pool, p => {
        for statement in &sql.drop {
            sqlx::query(statement)
                .execute(p)
                .await
                .map_err(|e| db_error("drop the tables", e))?;
        }
        Ok(())
    })
}
