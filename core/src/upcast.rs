//! Upcasting: turning an older version of an event into the one a
//! subscriber asks for, one step at a time.

use std::any::{Any, TypeId};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use crate::codec::{self, Codec};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::transport::DeadLetterReason;
use crate::Event;

type AnyBox = Box<dyn Any + Send>;

/// One registered step `from -> from + 1` of one event name.
struct Step {
    from_type: &'static str,
    from: TypeId,
    to: TypeId,
    decode: fn(&dyn Codec, &[u8]) -> Result<AnyBox>,
    clone_typed: fn(&(dyn Any + Send + Sync)) -> Option<AnyBox>,
    up: fn(AnyBox) -> Option<AnyBox>,
}

fn decode_as<A: Event>(codec: &dyn Codec, bytes: &[u8]) -> Result<AnyBox> {
    Ok(Box::new(codec::decode::<A>(codec, bytes)?))
}

fn clone_as<A: Event + Clone>(value: &(dyn Any + Send + Sync)) -> Option<AnyBox> {
    value
        .downcast_ref::<A>()
        .map(|a| Box::new(a.clone()) as AnyBox)
}

fn step_up<A: Event, B: Event + From<A>>(value: AnyBox) -> Option<AnyBox> {
    value
        .downcast::<A>()
        .ok()
        .map(|a| Box::new(B::from(*a)) as AnyBox)
}

/// The registered upcast steps, keyed by event name and source version.
#[derive(Default)]
pub(crate) struct Upcasters {
    steps: HashMap<(Cow<'static, str>, u32), Step>,
}

/// Why a delivery could not become the subscriber's type.
pub(crate) type Rejection = (DeadLetterReason, String);

impl Upcasters {
    pub(crate) fn register<A, B>(&mut self) -> Result<()>
    where
        A: Event + Clone,
        B: Event + From<A>,
    {
        if A::NAME != B::NAME || B::VERSION != A::VERSION + 1 {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "an upcast step goes from one version to the next of one event; got {} v{} -> {} v{}",
                    A::NAME,
                    A::VERSION,
                    B::NAME,
                    B::VERSION
                ),
            ));
        }
        let key = (Cow::Borrowed(A::NAME), A::VERSION);
        if self.steps.contains_key(&key) {
            return Err(Error::new(
                ErrorKind::Config,
                format!("upcast {} v{} registered twice", A::NAME, A::VERSION),
            ));
        }
        self.steps.insert(
            key,
            Step {
                from_type: std::any::type_name::<A>(),
                from: TypeId::of::<A>(),
                to: TypeId::of::<B>(),
                decode: decode_as::<A>,
                clone_typed: clone_as::<A>,
                up: step_up::<A, B>,
            },
        );
        Ok(())
    }

    /// Checks that every version from 1 up to `E::VERSION` can reach `E`
    /// itself: a step for each version, each step starting from the type the
    /// previous one produced, the last one producing `E`.
    pub(crate) fn check_chain<E: Event>(&self) -> Result<()> {
        let mut produced: Option<TypeId> = None;
        for v in 1..E::VERSION {
            let Some(step) = self.steps.get(&(Cow::Borrowed(E::NAME), v)) else {
                return Err(Error::new(
                    ErrorKind::MissingUpcast,
                    format!(
                        "{} wants {} v{} but no upcast from v{v} to v{} is registered; \
                         add BusBuilder::upcast::<V{v}, V{}>()",
                        std::any::type_name::<E>(),
                        E::NAME,
                        E::VERSION,
                        v + 1,
                        v + 1
                    ),
                ));
            };
            if produced.is_some_and(|t| t != step.from) {
                return Err(Error::new(
                    ErrorKind::MissingUpcast,
                    format!(
                        "the upcast from {} v{v} starts from {}, not from the type the step to v{v} produces",
                        E::NAME,
                        step.from_type
                    ),
                ));
            }
            produced = Some(step.to);
        }
        if produced.is_some_and(|t| t != TypeId::of::<E>()) {
            return Err(Error::new(
                ErrorKind::MissingUpcast,
                format!(
                    "the upcast chain of {} ends in another type than {}",
                    E::NAME,
                    std::any::type_name::<E>()
                ),
            ));
        }
        Ok(())
    }

    /// Turns an envelope into `E`: shares the typed value when it is
    /// already `E`, decodes bytes, and upcasts older versions.
    pub(crate) fn resolve<E: Event>(
        &self,
        envelope: &Envelope,
        codecs: &Codecs,
    ) -> std::result::Result<Resolved<E>, Rejection> {
        let attrs = envelope.attributes();
        if attrs.event_type != E::NAME {
            return Err((
                DeadLetterReason::UnknownEvent,
                format!(
                    "event `{}` delivered to a subscription of `{}`",
                    attrs.event_type,
                    E::NAME
                ),
            ));
        }
        let version = attrs.data_version;
        if version > E::VERSION {
            return Err((
                DeadLetterReason::UnknownVersion,
                format!(
                    "{} v{version} is newer than v{}, the newest this subscriber knows",
                    E::NAME,
                    E::VERSION
                ),
            ));
        }
        if version == 0 {
            return Err((
                DeadLetterReason::UnknownVersion,
                format!("{} v0: versions start at 1", E::NAME),
            ));
        }
        if version == E::VERSION {
            if let Some(shared) = envelope.downcast::<E>() {
                return Ok(Resolved::Shared(shared));
            }
            let bytes = bytes_of(envelope)?;
            let codec = codecs.get(&attrs.data_content_type)?;
            return codec::decode::<E>(codec, bytes)
                .map(Resolved::Owned)
                .map_err(|e| (DeadLetterReason::Undecodable, e.to_string()));
        }
        // Older version: start from the step that knows its type.
        let missing = |v: u32| {
            (
                DeadLetterReason::UnknownVersion,
                format!("no upcast step from {} v{v}", E::NAME),
            )
        };
        let first = self
            .steps
            .get(&(Cow::Borrowed(E::NAME), version))
            .ok_or_else(|| missing(version))?;
        let mut value = match envelope.value() {
            Some(typed) => (first.clone_typed)(typed).ok_or_else(|| {
                (
                    DeadLetterReason::Undecodable,
                    format!("typed value is not {}", first.from_type),
                )
            })?,
            None => {
                let codec = codecs.get(&attrs.data_content_type)?;
                (first.decode)(codec, bytes_of(envelope)?)
                    .map_err(|e| (DeadLetterReason::Undecodable, e.to_string()))?
            }
        };
        for v in version..E::VERSION {
            let step = self
                .steps
                .get(&(Cow::Borrowed(E::NAME), v))
                .ok_or_else(|| missing(v))?;
            value = (step.up)(value).ok_or_else(|| {
                (
                    DeadLetterReason::Undecodable,
                    format!("upcast step from v{v} got a value of the wrong type"),
                )
            })?;
        }
        value
            .downcast::<E>()
            .map(|e| Resolved::Owned(*e))
            .map_err(|_| {
                (
                    DeadLetterReason::Undecodable,
                    format!("upcast chain did not end in {}", std::any::type_name::<E>()),
                )
            })
    }
}

fn bytes_of(envelope: &Envelope) -> std::result::Result<&[u8], Rejection> {
    envelope.payload_bytes().map(|b| &b[..]).ok_or_else(|| {
        (
            DeadLetterReason::Undecodable,
            "typed value of another type under this event name and version".to_owned(),
        )
    })
}

/// The value a handler gets: shared with the publisher (in-process) or
/// decoded for this delivery.
pub(crate) enum Resolved<E> {
    Shared(Arc<crate::envelope::Typed<E>>),
    Owned(E),
}

/// Codecs by content type, with the one used for publishing.
pub(crate) struct Codecs {
    pub(crate) default: Arc<dyn Codec>,
    by_type: HashMap<&'static str, Arc<dyn Codec>>,
}

impl Default for Codecs {
    fn default() -> Self {
        let json: Arc<dyn Codec> = Arc::new(crate::codec::JsonCodec);
        let mut by_type = HashMap::new();
        by_type.insert(json.content_type(), json.clone());
        Self {
            default: json,
            by_type,
        }
    }
}

impl Codecs {
    pub(crate) fn add(&mut self, codec: Arc<dyn Codec>, make_default: bool) {
        if make_default {
            self.default = codec.clone();
        }
        self.by_type.insert(codec.content_type(), codec);
    }

    fn get(&self, content_type: &str) -> std::result::Result<&dyn Codec, Rejection> {
        // Parameters such as `; charset=utf-8` do not change the codec.
        let bare = content_type.split(';').next().unwrap_or("").trim();
        self.by_type.get(bare).map(|c| &**c).ok_or_else(|| {
            (
                DeadLetterReason::Undecodable,
                format!("no codec for content type {content_type:?}"),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Attributes;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, crate::Event)]
    #[event(name = "orders.order_placed", version = 1)]
    struct V1 {
        id: u64,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, crate::Event)]
    #[event(name = "orders.order_placed", version = 2)]
    struct V2 {
        id: u64,
        note: String,
    }

    impl From<V1> for V2 {
        fn from(v: V1) -> Self {
            Self {
                id: v.id,
                note: "from v1".into(),
            }
        }
    }

    fn resolve<E: Event>(up: &Upcasters, env: &Envelope) -> std::result::Result<E, Rejection> {
        match up.resolve::<E>(env, &Codecs::default())? {
            Resolved::Owned(e) => Ok(e),
            Resolved::Shared(_) => panic!("bytes never resolve to a shared value"),
        }
    }

    fn upcasters() -> Upcasters {
        let mut up = Upcasters::default();
        up.register::<V1, V2>().unwrap();
        up
    }

    #[test]
    fn unknown_event_name_on_a_subscription_is_rejected() {
        let env = Envelope::from_bytes(Attributes::new("x", "x.other", 1), &b"{}"[..]);
        let (reason, error) = resolve::<V2>(&upcasters(), &env).unwrap_err();
        assert_eq!(reason, DeadLetterReason::UnknownEvent);
        assert!(error.contains("x.other"), "{error}");
    }

    #[test]
    fn newer_and_zero_versions_are_unknown() {
        for v in [0, 3] {
            let env = Envelope::from_bytes(
                Attributes::new("orders", "orders.order_placed", v),
                &b"{}"[..],
            );
            let (reason, _) = resolve::<V2>(&upcasters(), &env).unwrap_err();
            assert_eq!(reason, DeadLetterReason::UnknownVersion, "v{v}");
        }
    }

    #[test]
    fn bytes_and_typed_values_upcast_alike() {
        let up = upcasters();
        let bytes = Envelope::from_bytes(
            Attributes::new("orders", "orders.order_placed", 1),
            &br#"{"id":4}"#[..],
        );
        let typed = Envelope::typed(
            Attributes::new("orders", "orders.order_placed", 1),
            V1 { id: 4 },
        );
        let want = V2 {
            id: 4,
            note: "from v1".into(),
        };
        assert_eq!(resolve::<V2>(&up, &bytes).unwrap(), want);
        assert_eq!(resolve::<V2>(&up, &typed).unwrap(), want);
    }

    #[test]
    fn unknown_content_type_and_bad_bytes_are_undecodable() {
        let mut attrs = Attributes::new("orders", "orders.order_placed", 2);
        attrs.data_content_type = "application/x-protobuf".into();
        let env = Envelope::from_bytes(attrs, &b"\x08\x01"[..]);
        let (reason, error) = resolve::<V2>(&upcasters(), &env).unwrap_err();
        assert_eq!(reason, DeadLetterReason::Undecodable);
        assert!(error.contains("no codec"), "{error}");
        let env = Envelope::from_bytes(
            Attributes::new("orders", "orders.order_placed", 1),
            &b"[1,"[..],
        );
        let (reason, _) = resolve::<V2>(&upcasters(), &env).unwrap_err();
        assert_eq!(reason, DeadLetterReason::Undecodable);
    }

    #[test]
    fn decode_errors_of_every_version_name_the_field_not_the_value() {
        // v1 is decoded by its upcast step, v2 directly: both through
        // `codec::decode`, so both are redacted alike.
        for (version, payload) in [
            (1, &br#"{"id":"s3cr3t"}"#[..]),
            (2, br#"{"id":"s3cr3t","note":""}"#),
        ] {
            let env = Envelope::from_bytes(
                Attributes::new("orders", "orders.order_placed", version),
                payload,
            );
            let (reason, error) = resolve::<V2>(&upcasters(), &env).unwrap_err();
            assert_eq!(reason, DeadLetterReason::Undecodable);
            assert!(!error.contains("s3cr3t"), "v{version}: {error}");
            assert!(
                error.contains("id: invalid type: string, expected u64"),
                "v{version}: {error}"
            );
        }
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, crate::Event)]
    #[event(name = "orders.order_placed", version = 2)]
    struct OtherV2 {
        id: u64,
    }

    impl From<V1> for OtherV2 {
        fn from(v: V1) -> Self {
            Self { id: v.id }
        }
    }

    #[test]
    fn chain_must_end_in_the_subscribers_type() {
        let mut up = Upcasters::default();
        up.register::<V1, OtherV2>().unwrap();
        let err = up.check_chain::<V2>().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingUpcast);
        up.check_chain::<OtherV2>().unwrap();
    }

    #[test]
    fn chain_check_names_the_missing_step() {
        let err = Upcasters::default().check_chain::<V2>().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingUpcast);
        upcasters().check_chain::<V2>().unwrap();
    }
}
