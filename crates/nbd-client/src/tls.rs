//! TLS for `nbds://` URIs: credentials from `tls-certificates=DIR` (as
//! libnbd spells it), the name to verify from the host or `tls-hostname`,
//! and `tls-verify-peer=false` to skip verification.

use std::path::PathBuf;

use nbd_tls::{ClientCreds, ServerName, TlsConnector};

use crate::error::{Error, Result};
use crate::uri::{NbdUri, Transport};

/// What STARTTLS needs: a configured connector and the server's name.
#[derive(Clone)]
pub struct TlsSetup {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
}

/// TLS settings a program may give besides the URI (URI parameters win).
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    pub certificates: Option<PathBuf>,
    pub hostname: Option<String>,
    pub verify_peer: Option<bool>,
}

impl TlsSetup {
    /// The setup for `uri`, or None for a plaintext URI.
    pub fn for_uri(uri: &NbdUri, opts: &TlsOptions) -> Result<Option<TlsSetup>> {
        if !uri.tls {
            return Ok(None);
        }
        let param = |k: &str| {
            uri.params
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        if param("tls-type").is_some_and(|t| t != "x509") || param("tls-psk-file").is_some() {
            return Err(Error::Tls("only X.509 TLS is supported (no PSK)".into()));
        }
        let dir = param("tls-certificates")
            .map(PathBuf::from)
            .or_else(|| opts.certificates.clone());
        let verify = match param("tls-verify-peer") {
            Some("false" | "0" | "no" | "off") => false,
            Some(_) => true,
            None => opts.verify_peer.unwrap_or(true),
        };
        let creds = match &dir {
            Some(d) => ClientCreds::from_dir(d),
            None if verify => {
                return Err(Error::Tls(
                    "TLS needs a CA to verify the server: add ?tls-certificates=DIR (with ca-cert.pem)".into(),
                ));
            }
            None => ClientCreds::default(),
        };
        let config =
            nbd_tls::client_config(&creds, verify).map_err(|e| Error::Tls(e.to_string()))?;
        let host = param("tls-hostname")
            .map(str::to_string)
            .or_else(|| opts.hostname.clone())
            .unwrap_or_else(|| match &uri.transport {
                Transport::Tcp { host, .. } => host.clone(),
                // A Unix socket has no host name; certificates for local
                // servers name localhost.
                Transport::Unix { .. } => "localhost".into(),
            });
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| Error::Tls(format!("'{host}' is not a valid TLS server name")))?;
        Ok(Some(TlsSetup {
            connector: TlsConnector::from(config),
            server_name,
        }))
    }
}
