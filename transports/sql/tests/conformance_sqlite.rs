//! The core conformance suite against SQLite, each case in a fresh database
//! file. There is no server to restart: case 15 is reported ignored.

mod common;

seambus::conformance_tests!(common::Sql {
    backend: common::Backend::Sqlite,
    restart: false,
});
