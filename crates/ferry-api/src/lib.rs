//! The admin API of an nbdferry daemon: the request and answer types
//! (shared by the daemon, which serves them as JSON, and its clients), the
//! routes, and the client the CLI and remote jobs use. Every route is
//! under `/v1`; the README lists them with these shapes.
//!
//! The daemon listens on a Unix socket and, for remote hosts, on TCP with
//! mutual TLS ([`Endpoint`]).

mod client;
mod routes;
mod types;

pub use client::{AdminClient, ClientError, Endpoint};
pub use routes::{HEALTH, METRICS, READY, RELOAD, Role, path_segment, validate_name};
pub use types::*;
