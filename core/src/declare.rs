//! Modules declared once: a name and the events the module publishes, as a
//! constant checked at compile time, so a module is never a bare string
//! that a typo turns into another module.
//!
//! ```
//! use seambus::{Bus, EventDecl, ModuleDecl};
//! # #[derive(serde::Serialize, serde::Deserialize, seambus::Event)]
//! # #[event(name = "orders.order_placed", version = 1)]
//! # struct OrderPlaced { id: u64 }
//!
//! /// The orders module: what it publishes.
//! pub const ORDERS: ModuleDecl =
//!     ModuleDecl::new("orders", &[EventDecl::of::<OrderPlaced>()]);
//!
//! # async fn run() -> seambus::Result<()> {
//! let bus = Bus::builder().declare(&[&ORDERS]).build()?;
//! bus.module_of(&ORDERS).publish(OrderPlaced { id: 7 }).await?;
//! // A name no declaration has: its publishes and subscriptions fail.
//! assert!(bus.module("ordres").publish(OrderPlaced { id: 8 }).await.is_err());
//! # Ok(())
//! # }
//! ```
//!
//! `ModuleDecl::new` refuses, at compile time when the declaration is a
//! `const`, a name that is not a valid module name and an event the
//! module does not own (its name does not start with `<module>.`):
//!
//! ```compile_fail
//! use seambus::{EventDecl, ModuleDecl};
//! # #[derive(serde::Serialize, serde::Deserialize, seambus::Event)]
//! # #[event(name = "orders.order_placed", version = 1)]
//! # struct OrderPlaced { id: u64 }
//! // `shipments` cannot declare an event of `orders`: a compile error.
//! const SHIPMENTS: ModuleDecl = ModuleDecl::new("shipments", &[EventDecl::of::<OrderPlaced>()]);
//! ```

use crate::event::{name_is_valid, Event};

/// One event type a module publishes: its wire name and version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventDecl {
    /// The event's wire name (`orders.order_placed`).
    pub name: &'static str,
    /// Its version.
    pub version: u32,
    /// The module that owns it.
    pub module: &'static str,
}

impl EventDecl {
    /// The declaration of event type `E`.
    pub const fn of<E: Event>() -> Self {
        Self {
            name: E::NAME,
            version: E::VERSION,
            module: E::MODULE,
        }
    }
}

/// A module: its name and the events it publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleDecl {
    name: &'static str,
    publishes: &'static [EventDecl],
}

impl ModuleDecl {
    /// Module `name`, publishing `publishes`. Panics (a compile error in a
    /// `const`) on an invalid name or an event another module owns.
    pub const fn new(name: &'static str, publishes: &'static [EventDecl]) -> Self {
        assert!(
            name_is_valid(name) && !contains_dot(name),
            "a module name is lower-case letters, digits, `_` and `-`"
        );
        let mut i = 0;
        while i < publishes.len() {
            assert!(
                str_eq(publishes[i].module, name),
                "a module declares only events it owns (named `<module>.<event>`)"
            );
            i += 1;
        }
        Self { name, publishes }
    }

    /// The module's name.
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// The events it publishes.
    pub const fn publishes(&self) -> &'static [EventDecl] {
        self.publishes
    }

    /// Whether it declares event `E`, of that version.
    pub(crate) fn declares<E: Event>(&self) -> bool {
        self.publishes
            .iter()
            .any(|e| e.version == E::VERSION && e.name == E::NAME)
    }
}

const fn contains_dot(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'.' {
            return true;
        }
        i += 1;
    }
    false
}

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}
