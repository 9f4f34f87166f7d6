//! The core conformance suite against a real PostgreSQL server
//! (`SEAMBUS_TEST_POSTGRES_URL`, default postgres://postgres@127.0.0.1:5432/test),
//! each case in a fresh schema. The server restart case (c15) restarts the
//! local server while events flow, alone after every other case, and leaves
//! it running.

mod common;

seambus::conformance_tests!(common::Sql {
    backend: common::Backend::Postgres,
    restart: true,
});
