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

/// A lapin error with what we were doing. The broker's refusals that no
/// retry changes are not retryable: a queue or exchange that exists with
/// other arguments (PRECONDITION_FAILED) or that the user may not use
/// (ACCESS_REFUSED) is a configuration error, a missing one (NOT_FOUND)
/// an error of its own; everything else is a retryable connection error.
pub(crate) fn amqp_error(what: &str, err: lapin::Error) -> Error {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    let refused = match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => match e.kind() {
            AMQPErrorKind::Soft(
                AMQPSoftError::PRECONDITIONFAILED | AMQPSoftError::ACCESSREFUSED,
            ) => Some(ErrorKind::Config),
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => Some(ErrorKind::Other),
            _ => None,
        },
        _ => None,
    };
    match refused {
        Some(kind) => Error::new(kind, format!("{what}: {err}")).with_source(err),
        None => connection_error(format!("{what}: {err}"), err),
    }
}
