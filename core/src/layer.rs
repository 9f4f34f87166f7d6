//! Layers around a subscription's handler, as [tower] layers.
//!
//! A layer sees every delivery of the subscriptions it wraps, as a
//! [`Request`] (the [`Context`]: envelope, attempt, group; the decoded event
//! travels inside, opaque), and answers with the handler's result. Any
//! `tower::Layer` whose service takes a [`Request`] and answers
//! `Result<(), HandlerError>` fits: rate limiting, a circuit breaker around
//! a downstream call, metrics. Add one for every subscription of a bus with
//! [`BusBuilder::layer`](crate::BusBuilder::layer), or for one subscription
//! with [`SubscribeBuilder::layer`](crate::SubscribeBuilder::layer); the
//! first layer added sees the event first, and bus layers come before
//! subscription layers. Where they sit among the steps Seambus runs itself
//! (span, decoding, statistics, timeout, causation) is listed on
//! [`Handler`](crate::Handler)'s page of the crate README, "The delivery
//! pipeline".
//!
//! ```
//! use seambus::layer::{HandlerService, Request};
//! use seambus::HandlerError;
//! use tower::{Layer, Service, ServiceExt};
//!
//! /// Refuses events from a source it does not trust.
//! #[derive(Clone)]
//! struct OnlyFrom(&'static str);
//!
//! impl<S> Layer<S> for OnlyFrom {
//!     type Service = OnlyFromService<S>;
//!     fn layer(&self, inner: S) -> Self::Service {
//!         OnlyFromService { inner, source: self.0 }
//!     }
//! }
//!
//! #[derive(Clone)]
//! struct OnlyFromService<S> { inner: S, source: &'static str }
//!
//! impl<S> Service<Request> for OnlyFromService<S>
//! where
//!     S: Service<Request, Response = (), Error = HandlerError> + Clone + Send + 'static,
//!     S::Future: Send,
//! {
//!     type Response = ();
//!     type Error = HandlerError;
//!     type Future = futures_util::future::BoxFuture<'static, Result<(), HandlerError>>;
//!
//!     fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), HandlerError>> {
//!         self.inner.poll_ready(cx)
//!     }
//!
//!     fn call(&mut self, request: Request) -> Self::Future {
//!         if request.context().envelope().attributes().source != self.source {
//!             return Box::pin(async { Err(HandlerError::reject("untrusted source")) });
//!         }
//!         Box::pin(self.inner.call(request))
//!     }
//! }
//!
//! let bus = seambus::Bus::builder().layer(OnlyFrom("orders")).build()?;
//! # Ok::<(), seambus::Error>(())
//! ```

use std::any::Any;
use std::future::Future;
use std::sync::Arc;

use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};

use crate::error::HandlerError;
use crate::handler::{Context, Received};

/// One delivery, as a layer sees it.
pub struct Request {
    ctx: Context,
    event: Box<dyn Any + Send>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("ctx", &self.ctx)
            .finish_non_exhaustive()
    }
}

impl Request {
    pub(crate) fn new<E: Send + Sync + 'static>(ctx: Context, event: Received<E>) -> Self {
        Self {
            ctx,
            event: Box::new(event),
        }
    }

    /// The delivery's context: envelope, attempt, group.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    pub(crate) fn into_parts(self) -> (Context, Box<dyn Any + Send>) {
        (self.ctx, self.event)
    }
}

/// The service a layer wraps: the rest of the pipeline, down to the
/// handler.
pub type HandlerService = BoxCloneSyncService<Request, (), HandlerError>;

/// A tower layer that fits around a handler: its service takes a
/// [`Request`] and answers `Result<(), HandlerError>`, and can be cloned
/// and shared. Implemented for every such [`Layer`]; this is what
/// [`BusBuilder::layer`](crate::BusBuilder::layer) and
/// [`SubscribeBuilder::layer`](crate::SubscribeBuilder::layer) take.
pub trait HandlerLayer: Send + Sync + 'static {
    /// Wraps `inner`, the rest of the pipeline.
    fn wrap(&self, inner: HandlerService) -> HandlerService;
}

impl<L> HandlerLayer for L
where
    L: Layer<HandlerService> + Send + Sync + 'static,
    L::Service:
        Service<Request, Response = (), Error = HandlerError> + Clone + Send + Sync + 'static,
    <L::Service as Service<Request>>::Future: Send + 'static,
{
    fn wrap(&self, inner: HandlerService) -> HandlerService {
        BoxCloneSyncService::new(self.layer(inner))
    }
}

/// A layer, type-erased for the bus.
pub(crate) type LayerFn = Arc<dyn HandlerLayer>;

/// The layers of one subscription around its innermost step.
pub(crate) struct Stack {
    service: HandlerService,
}

impl Stack {
    /// `layers` in the order added: the first is the outermost.
    pub(crate) fn new<F, Fut>(layers: &[LayerFn], innermost: F) -> Self
    where
        F: Fn(Request) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let mut service = BoxCloneSyncService::new(tower::service_fn(innermost));
        for layer in layers.iter().rev() {
            service = layer.wrap(service);
        }
        Self { service }
    }

    /// Runs one request through the stack (waiting until it is ready).
    pub(crate) async fn call(&self, request: Request) -> Result<(), HandlerError> {
        self.service.clone().oneshot(request).await
    }
}
