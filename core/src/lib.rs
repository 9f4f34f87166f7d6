#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

extern crate self as seambus;

mod bus;
pub mod codec;
pub mod config;
mod declare;
mod delivery;
mod envelope;
mod error;
mod event;
mod handler;
mod in_process;
pub mod layer;
pub mod routing;
pub mod testing;
pub mod transport;
mod upcast;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use bus::{
    Bus, BusBuilder, Module, PublishOptions, SubscribeBuilder, Subscription, DEFAULT_MAX_PAYLOAD,
    IN_PROCESS,
};
pub use declare::{EventDecl, ModuleDecl};
pub use envelope::{Attributes, Envelope, SPEC_VERSION};
pub use error::{Error, ErrorKind, HandlerError, Result};
pub use event::{validate_header, validate_name, Event};
pub use handler::{Context, Handler, Received, State, Stats};
pub use in_process::{InProcessConfig, InProcessTransport, WhenFull};
pub use transport::{
    DeadLetter, DeadLetterReason, Dispatch, GroupId, Ordering, RetryPolicy, ShutdownReport,
};

/// Derives [`Event`]: `#[derive(Event)] #[event(name = "orders.order_placed", version = 2)]`.
///
/// `name` is required and checked at compile time; `version` defaults to 1;
/// `module` defaults to the name's first segment.
///
/// A name that no broker could carry does not compile:
///
/// ```compile_fail
/// #[derive(serde::Serialize, serde::Deserialize, seambus::Event)]
/// #[event(name = "Orders Placed!")]
/// struct Bad;
/// ```
///
/// Neither does a missing name, or version 0:
///
/// ```compile_fail
/// #[derive(serde::Serialize, serde::Deserialize, seambus::Event)]
/// #[event(version = 2)]
/// struct Nameless;
/// ```
///
/// ```compile_fail
/// #[derive(serde::Serialize, serde::Deserialize, seambus::Event)]
/// #[event(name = "orders.placed", version = 0)]
/// struct Zero;
/// ```
pub use seambus_macros::Event;
