//! Mapping lapin errors into `seambus::Error`. The client's error stays
//! behind `source()`.

use seambus::{Error, ErrorKind};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

pub(crate) fn config_error(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config, message.into())
}

/// A failure talking to the broker: retryable.
pub(crate) fn connection_error(message: impl Into<String>, source: impl Into<BoxError>) -> Error {
    Error::new(ErrorKind::Connection, message.into()).with_source(source)
}

/// A lapin error with what we were doing.
pub(crate) fn amqp_error(what: &str, err: lapin::Error) -> Error {
    connection_error(format!("{what}: {err}"), err)
}
