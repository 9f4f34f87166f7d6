//! Mapping async-nats errors into `seambus::Error`. The client's error
//! stays behind `source()`.

use seambus::{Error, ErrorKind};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

pub(crate) fn config_error(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config, message.into())
}

/// A failure talking to the server: retryable.
pub(crate) fn connection_error(message: impl Into<String>, source: impl Into<BoxError>) -> Error {
    Error::new(ErrorKind::Connection, message.into()).with_source(source)
}

/// A JetStream API call that failed: retryable unless the server said no.
pub(crate) fn api_error(what: &str, source: impl Into<BoxError>) -> Error {
    let source = source.into();
    Error::new(ErrorKind::Connection, format!("{what}: {source}")).with_source(source)
}
