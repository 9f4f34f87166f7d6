//! Architecture fitness: the crate graph of Tiny Store keeps its modules
//! apart.
//!
//! - a module's internals (`tiny-store-<m>`) depend on no other module's
//!   internals (only on contracts, the platform and outside crates);
//! - a contract (`tiny-store-<m>-contract`) depends on no Tiny Store crate;
//! - the platform (`tiny-store-platform`) depends on no module, no contract
//!   and not on the app.
//!
//! Every kind of dependency counts (normal, build and dev): a test-only
//! dependency on another module's internals couples them all the same.

use std::collections::BTreeSet;
use std::path::PathBuf;

use cargo_metadata::MetadataCommand;

/// The modules of the shop.
const MODULES: [&str; 4] = ["orders", "inventory", "payments", "shipments"];

const PREFIX: &str = "tiny-store-";
const APP: &str = "tiny-store";
const PLATFORM: &str = "tiny-store-platform";

/// What a crate is, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind<'a> {
    /// `tiny-store`, the program that wires the modules together.
    App,
    /// `tiny-store-platform`.
    Platform,
    /// `tiny-store-<m>`: the internals of module `m`.
    Module(&'a str),
    /// `tiny-store-<m>-contract`: the public events of module `m`.
    Contract(&'a str),
    /// Any crate outside Tiny Store.
    Outside,
}

fn kind(name: &str) -> Kind<'_> {
    if name == APP {
        return Kind::App;
    }
    if name == PLATFORM {
        return Kind::Platform;
    }
    match name.strip_prefix(PREFIX) {
        None | Some("") => Kind::Outside,
        Some(rest) => match rest.strip_suffix("-contract") {
            Some(m) => Kind::Contract(m),
            None => Kind::Module(rest),
        },
    }
}

/// The rules broken by `package` depending on `deps`, one message each.
fn violations(package: &str, deps: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for &dep in deps {
        let why = match (kind(package), kind(dep)) {
            (_, Kind::Outside) => None,
            (Kind::Module(m), Kind::Module(other)) if other != m => Some(format!(
                "the internals of module `{m}` must not depend on the internals of module \
                 `{other}`; depend on `{PREFIX}{other}-contract` and talk through its events"
            )),
            (Kind::Module(m), Kind::App) => Some(format!(
                "the internals of module `{m}` must not depend on the app crate"
            )),
            (Kind::Contract(m), _) => Some(format!(
                "the contract of module `{m}` must depend on no Tiny Store crate \
                 (only on seambus, serde and the like)"
            )),
            (Kind::Platform, _) => {
                Some("the platform must not depend on a module, a contract or the app".to_owned())
            }
            _ => None,
        };
        if let Some(why) = why {
            found.push(format!("`{package}` depends on `{dep}`: {why}"));
        }
    }
    found
}

#[test]
fn the_checker_catches_a_module_depending_on_another_modules_internals() {
    let v = violations(
        "tiny-store-payments",
        &["seambus", "tiny-store-orders", "tiny-store-orders-contract"],
    );
    assert_eq!(v.len(), 1, "{v:#?}");
    assert!(
        v[0].contains("`tiny-store-payments` depends on `tiny-store-orders`"),
        "{v:#?}"
    );
    assert_eq!(violations("tiny-store-shipments", &["tiny-store"]).len(), 1);
}

#[test]
fn the_checker_catches_a_contract_depending_on_any_tiny_store_crate() {
    for dep in [
        "tiny-store-inventory",
        "tiny-store-orders-contract",
        "tiny-store-platform",
        "tiny-store",
    ] {
        let v = violations("tiny-store-payments-contract", &["serde", dep]);
        assert_eq!(v.len(), 1, "{dep}: {v:#?}");
        assert!(v[0].contains(dep), "{v:#?}");
    }
}

#[test]
fn the_checker_catches_the_platform_depending_on_a_module_or_contract() {
    for dep in [
        "tiny-store-orders",
        "tiny-store-shipments-contract",
        "tiny-store",
    ] {
        let v = violations(PLATFORM, &["seambus", dep]);
        assert_eq!(v.len(), 1, "{dep}: {v:#?}");
        assert!(v[0].contains(dep), "{v:#?}");
    }
}

#[test]
fn the_checker_allows_contracts_the_platform_and_outside_crates() {
    let allowed = [
        "tiny-store-payments-contract",
        "tiny-store-inventory-contract",
        "tiny-store-platform",
        "seambus",
        "serde",
        "tiny-storefront",
    ];
    assert_eq!(
        violations("tiny-store-payments", &allowed),
        Vec::<String>::new()
    );
    assert_eq!(
        violations("tiny-store-orders-contract", &["seambus", "serde", "uuid"]),
        Vec::<String>::new()
    );
    assert_eq!(
        violations(PLATFORM, &["seambus", "seambus-sql", "sqlx"]),
        Vec::<String>::new()
    );
    // The app wires everything together: no rule for it.
    assert_eq!(
        violations(APP, &["tiny-store-orders", "tiny-store-platform"]),
        Vec::<String>::new()
    );
}

#[test]
fn the_workspace_keeps_its_modules_apart() {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let metadata = MetadataCommand::new()
        .manifest_path(&manifest)
        .no_deps()
        .exec()
        .unwrap_or_else(|e| panic!("cargo metadata on {}: {e}", manifest.display()));

    let ours: Vec<_> = metadata
        .workspace_packages()
        .into_iter()
        .filter(|p| p.name.starts_with(PREFIX))
        .collect();

    // The rules below mean something only if they meet the crates they are
    // about: a rename must fail here rather than check nothing.
    let mut modules = BTreeSet::new();
    let mut contracts = BTreeSet::new();
    let mut platform = 0;
    for p in &ours {
        match kind(&p.name) {
            Kind::Module(m) => assert!(modules.insert(m), "two crates for module `{m}`"),
            Kind::Contract(m) => assert!(contracts.insert(m), "two contracts for module `{m}`"),
            Kind::Platform => platform += 1,
            other => panic!("`{}` classified as {other:?}", p.name),
        }
    }
    let expected: BTreeSet<&str> = MODULES.into_iter().collect();
    assert_eq!(
        modules, expected,
        "module internals crates found in the workspace"
    );
    assert_eq!(
        contracts, expected,
        "contract crates found in the workspace"
    );
    assert_eq!(platform, 1, "`{PLATFORM}` found in the workspace");

    let mut all = Vec::new();
    for p in &ours {
        let deps: Vec<&str> = p.dependencies.iter().map(|d| d.name.as_str()).collect();
        // The dependency lists were read: each module uses its own contract.
        if let Kind::Module(m) = kind(&p.name) {
            let own = format!("{PREFIX}{m}-contract");
            assert!(
                deps.contains(&own.as_str()),
                "`{}` does not depend on `{own}`; dependencies read: {deps:?}",
                p.name
            );
        }
        all.extend(violations(&p.name, &deps));
    }
    assert!(
        all.is_empty(),
        "the crate graph breaks {} architecture rule(s):\n  {}",
        all.len(),
        all.join("\n  ")
    );
}
