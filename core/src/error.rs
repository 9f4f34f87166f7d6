//! The one error type of the crate, and what a handler returns when it fails.

use std::borrow::Cow;
use std::fmt;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong, in a form a program can match on.
///
/// New kinds may be added in minor releases.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// An event, module, group or header name is empty or has characters that
    /// are not allowed.
    InvalidName,
    /// A module tried to publish an event owned by another module.
    NotOwner,
    /// A subscription with the same module and name exists already.
    DuplicateSubscription,
    /// A subscriber wants version N but no upcast step leads there from an
    /// older version.
    MissingUpcast,
    /// The payload could not be encoded with the codec.
    Encode,
    /// The payload could not be decoded (bad bytes, wrong shape, unknown
    /// content type).
    Decode,
    /// The event name is not the one a subscription expects.
    UnknownEvent,
    /// The event version is newer than any the subscriber knows.
    UnknownVersion,
    /// A header name or value is not allowed (CR/LF, NUL, empty name).
    InvalidHeader,
    /// The encoded payload is over the configured maximum size.
    PayloadTooLarge,
    /// A bounded queue is full and the configuration says to fail instead of
    /// waiting. Retrying later can help.
    QueueFull,
    /// The bus or transport is shut down.
    Closed,
    /// The route's transport cannot give what was asked (for example inline
    /// dispatch or per-key order).
    Unsupported,
    /// Configuration is invalid (unknown transport, bad option).
    Config,
    /// The broker or the connection to it failed. Retrying can help.
    Connection,
    /// An operation did not finish in time. Retrying can help.
    Timeout,
    /// Anything else a transport reports.
    Other,
}

impl ErrorKind {
    /// Whether retrying the same operation later can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::QueueFull | Self::Connection | Self::Timeout)
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::InvalidName => "invalid name",
            Self::NotOwner => "not the owning module",
            Self::DuplicateSubscription => "duplicate subscription",
            Self::MissingUpcast => "missing upcast step",
            Self::Encode => "encode failed",
            Self::Decode => "decode failed",
            Self::UnknownEvent => "unknown event",
            Self::UnknownVersion => "unknown version",
            Self::InvalidHeader => "invalid header",
            Self::PayloadTooLarge => "payload too large",
            Self::QueueFull => "queue full",
            Self::Closed => "closed",
            Self::Unsupported => "unsupported",
            Self::Config => "invalid configuration",
            Self::Connection => "connection failed",
            Self::Timeout => "timed out",
            Self::Other => "error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of every fallible Seambus operation.
///
/// Match on [`Error::kind`]; ask [`Error::is_retryable`] whether trying
/// again can help. Errors of client libraries stay behind
/// [`std::error::Error::source`].
pub struct Error {
    kind: ErrorKind,
    message: Cow<'static, str>,
    retryable: bool,
    source: Option<BoxError>,
}

impl Error {
    /// A new error of `kind`; retryable as the kind says.
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind,
            message: message.into(),
            retryable: kind.is_retryable(),
            source: None,
        }
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Overrides whether a retry can help (for transports that know better
    /// than the kind).
    pub fn with_retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether retrying the operation later can succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The human-readable message, without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn closed() -> Self {
        Self::new(ErrorKind::Closed, "the bus is shut down")
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind)
            .field("message", &self.message)
            .field("retryable", &self.retryable);
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a handler returns when it cannot handle an event.
///
/// A **transient** error ([`HandlerError::retry`]) is retried with backoff
/// until the subscription's maximum number of attempts, then dead-lettered.
/// A **permanent** error ([`HandlerError::reject`]) is dead-lettered at once.
///
/// Any error type converts into a transient `HandlerError` with `?`:
///
/// ```
/// use seambus::HandlerError;
/// fn parse(input: &str) -> Result<u32, HandlerError> {
///     let n: u32 = input.parse()?; // transient by default
///     if n == 0 {
///         return Err(HandlerError::reject("zero is never valid"));
///     }
///     Ok(n)
/// }
/// assert!(parse("x").unwrap_err().is_transient());
/// assert!(!parse("0").unwrap_err().is_transient());
/// ```
pub struct HandlerError {
    transient: bool,
    error: BoxError,
}

impl HandlerError {
    /// A transient failure: the event is retried.
    pub fn retry(error: impl Into<BoxError>) -> Self {
        Self {
            transient: true,
            error: error.into(),
        }
    }

    /// A permanent failure: the event goes to the dead letter at once.
    pub fn reject(error: impl Into<BoxError>) -> Self {
        Self {
            transient: false,
            error: error.into(),
        }
    }

    /// Whether a retry can help.
    pub fn is_transient(&self) -> bool {
        self.transient
    }

    /// The underlying error.
    pub fn error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.error
    }
}

impl<E: Into<BoxError>> From<E> for HandlerError {
    fn from(error: E) -> Self {
        Self::retry(error)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("transient", &self.transient)
            .field("error", &self.error)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.transient {
            "transient"
        } else {
            "permanent"
        };
        write!(f, "{kind}: {}", self.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_follows_kind_and_can_be_overridden() {
        assert!(Error::new(ErrorKind::Connection, "x").is_retryable());
        assert!(!Error::new(ErrorKind::NotOwner, "x").is_retryable());
        assert!(!Error::new(ErrorKind::Connection, "x")
            .with_retryable(false)
            .is_retryable());
    }

    #[test]
    fn display_has_kind_and_message_and_source_is_kept() {
        let io = std::io::Error::other("socket closed");
        let err = Error::new(ErrorKind::Connection, "publish failed").with_source(io);
        assert_eq!(err.to_string(), "connection failed: publish failed");
        let source = std::error::Error::source(&err).expect("source kept");
        assert_eq!(source.to_string(), "socket closed");
    }
}
