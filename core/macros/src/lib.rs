//! `#[derive(Event)]` for [seambus](https://docs.rs/seambus).
//!
//! Use it through the re-export `seambus::Event`; see the `seambus` crate docs.

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::quote;
use syn::{parse_macro_input, DeriveInput, LitInt, LitStr};

/// Implements `seambus::Event` for a serde type.
///
/// ```text
/// #[derive(Serialize, Deserialize, Event)]
/// #[event(name = "orders.order_placed", version = 2)]
/// struct OrderPlaced { .. }
/// ```
///
/// `name` is required. `version` defaults to 1. `module` (the owning module)
/// defaults to the part of the name before the first `.`.
#[proc_macro_derive(Event, attributes(event))]
pub fn derive_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(tokens) => tokens.into(),
        Err(err) => err.to_compile_error().into(),
    }
}

fn expand(input: &DeriveInput) -> syn::Result<proc_macro2::TokenStream> {
    let mut name: Option<LitStr> = None;
    let mut version: Option<LitInt> = None;
    let mut module: Option<LitStr> = None;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("event")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") {
                name = Some(meta.value()?.parse()?);
            } else if meta.path.is_ident("version") {
                version = Some(meta.value()?.parse()?);
            } else if meta.path.is_ident("module") {
                module = Some(meta.value()?.parse()?);
            } else {
                return Err(meta.error("expected `name`, `version` or `module`"));
            }
            Ok(())
        })?;
    }
    let name = name.ok_or_else(|| {
        syn::Error::new(
            Span::call_site(),
            "missing #[event(name = \"module.event_name\")] on a type deriving seambus::Event",
        )
    })?;
    let name_value = name.value();
    if let Err(why) = check_name(&name_value) {
        return Err(syn::Error::new(name.span(), why));
    }
    let version_value: u32 = match &version {
        Some(lit) => {
            let v: u32 = lit.base10_parse()?;
            if v == 0 {
                return Err(syn::Error::new(lit.span(), "event versions start at 1"));
            }
            v
        }
        None => 1,
    };
    let module_value = match &module {
        Some(lit) => {
            let m = lit.value();
            if let Err(why) = check_name(&m) {
                return Err(syn::Error::new(lit.span(), why));
            }
            m
        }
        None => name_value
            .split('.')
            .next()
            .unwrap_or(&name_value)
            .to_owned(),
    };
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        impl #impl_generics ::seambus::Event for #ident #ty_generics #where_clause {
            const NAME: &'static str = #name_value;
            const VERSION: u32 = #version_value;
            const MODULE: &'static str = #module_value;
        }
    })
}

/// The same rule as `seambus::validate_name`, checked at compile time.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an event or module name must not be empty".into());
    }
    if name.len() > 200 {
        return Err("an event or module name must be at most 200 bytes".into());
    }
    if name.split('.').any(str::is_empty) {
        return Err(format!("`{name}`: empty segment between dots"));
    }
    if let Some(c) = name.chars().find(|c| {
        !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-' || *c == '.')
    }) {
        return Err(format!(
            "`{name}`: character {c:?} is not allowed (use a-z, 0-9, '_', '-', '.')"
        ));
    }
    Ok(())
}
