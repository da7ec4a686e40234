//! TLS for NBD, shared by the server and the client: X.509 credentials in
//! the directory layout qemu and libnbd use, rustls configurations, the
//! identities of a peer's certificate, a server configuration that reloads,
//! and test certificate generation.

mod config;
mod creds;
mod error;
mod generate;
mod identity;
mod prefixed;
mod reloadable;

pub use config::{client_config, server_config};
pub use creds::{
    CA_CERT, CLIENT_CERT, CLIENT_KEY, ClientCreds, SERVER_CERT, SERVER_KEY, ServerCreds,
};
pub use error::{Side, TlsError, describe_handshake_error};
pub use generate::{GeneratedFiles, generate_test_pki, issue_client_cert};
pub use identity::peer_identities;
pub use prefixed::Prefixed;
pub use reloadable::ReloadableServerConfig;
pub use rustls::pki_types::ServerName;
pub use rustls::{ClientConfig, ServerConfig};
pub use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};
