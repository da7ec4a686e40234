//! A server configuration that can be replaced while the server runs:
//! each handshake takes the configuration current when it starts, so a
//! reload reaches the next client while sessions already established keep
//! the certificate they were shown.

use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

pub struct ReloadableServerConfig(RwLock<Arc<ServerConfig>>);

impl ReloadableServerConfig {
    pub fn new(config: Arc<ServerConfig>) -> Self {
        ReloadableServerConfig(RwLock::new(config))
    }

    /// An acceptor with the current configuration; one read lock and an
    /// `Arc` clone per handshake.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = self.0.read().unwrap_or_else(|e| e.into_inner()).clone();
        TlsAcceptor::from(config)
    }

    /// Handshakes from now on use `config`.
    pub fn replace(&self, config: Arc<ServerConfig>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = config;
    }
}
