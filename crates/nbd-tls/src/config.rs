//! rustls configurations built from PEM files, with the checks that turn
//! the usual mistakes (expired certificate, key of another certificate,
//! missing CA) into one-line errors before any client connects.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::creds::{ClientCreds, ServerCreds};
use crate::error::TlsError;

/// aws-lc-rs with AES-128-GCM as the first choice. Bulk data is what these
/// connections carry, and on two shared cores the client's decryption
/// decides the copy's speed: AES-128 (10 rounds) costs about 30% less than
/// AES-256 (14 rounds), and is TLS 1.3's mandatory suite. The others stay
/// on offer for peers that do not have it.
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |e: rustls::pki_types::pem::Error| match e {
        rustls::pki_types::pem::Error::Io(source) => TlsError::Read {
            path: path.to_path_buf(),
            source,
        },
        other => TlsError::BadPem {
            path: path.to_path_buf(),
            message: other.to_string(),
        },
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(bad)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    for c in &certs {
        check_validity(path, c)?;
    }
    Ok(certs)
}

/// Refuses certificates that are expired or not yet valid, naming the date.
fn check_validity(path: &Path, cert: &CertificateDer<'_>) -> Result<(), TlsError> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Err(TlsError::BadPem {
            path: path.to_path_buf(),
            message: "not a valid X.509 certificate".into(),
        });
    };
    let v = parsed.validity();
    let now = x509_parser::time::ASN1Time::now();
    let what = if now > v.not_after {
        format!("expired on {}", v.not_after)
    } else if now < v.not_before {
        format!("is not valid before {}", v.not_before)
    } else {
        return Ok(());
    };
    Err(TlsError::Validity {
        path: path.to_path_buf(),
        what,
    })
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::Io(source) => TlsError::Read {
            path: path.to_path_buf(),
            source,
        },
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_path_buf(),
        },
        other => TlsError::BadPem {
            path: path.to_path_buf(),
            message: other.to_string(),
        },
    })
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    if !path.exists() {
        return Err(TlsError::MissingCa(path.to_path_buf()));
    }
    let mut store = RootCertStore::empty();
    for c in load_certs(path)? {
        store.add(c).map_err(|e| TlsError::BadPem {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    }
    Ok(store)
}

/// rustls' "inconsistent keys" as a message naming both files.
fn key_mismatch(cert: &Path, key: &Path) -> impl FnOnce(rustls::Error) -> TlsError {
    move |e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
            key: key.to_path_buf(),
            cert: cert.to_path_buf(),
        },
        other => TlsError::Config(other.to_string()),
    }
}

/// A server configuration. With `verify_clients`, clients must present a
/// certificate signed by the CA (qemu's `verify-peer=on` default).
pub fn server_config(
    creds: &ServerCreds,
    verify_clients: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let chain = load_certs(&creds.cert)?;
    let key = load_key(&creds.key)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = if verify_clients {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&creds.ca)?), provider)
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut cfg = builder
        .with_single_cert(chain, key)
        .map_err(key_mismatch(&creds.cert, &creds.key))?;
    // Our order (see `provider`), not the client's: GnuTLS clients
    // (nbdcopy, qemu) list AES-256-GCM first.
    cfg.ignore_client_order = true;
    Ok(Arc::new(cfg))
}

/// A client configuration. Without `verify_server` any server certificate
/// is accepted (libnbd's `tls-verify-peer=false`); the link is still
/// encrypted but not authenticated.
pub fn client_config(
    creds: &ClientCreds,
    verify_server: bool,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = if verify_server {
        let ca = creds
            .ca
            .as_deref()
            .ok_or_else(|| TlsError::MissingCa(crate::creds::CA_CERT.into()))?;
        builder.with_root_certificates(roots(ca)?)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
    };
    let cfg = match (&creds.cert, &creds.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(key_mismatch(cert, key))?,
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

/// Checks signatures (so the handshake is sound) but trusts any certificate.
#[derive(Debug)]
struct AcceptAnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
