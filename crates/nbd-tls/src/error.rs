use std::path::PathBuf;

/// Why TLS credentials could not be set up. Each message is one line a
/// user can act on.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key found")]
    NoKey { path: PathBuf },
    #[error("{path}: {message}")]
    BadPem { path: PathBuf, message: String },
    #[error("{path}: certificate {what}")]
    Validity { path: PathBuf, what: String },
    #[error("{0} is needed to verify peers but does not exist")]
    MissingCa(PathBuf),
    #[error("{key} is not the key of {cert}: certificate and key do not belong together")]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("TLS setup: {0}")]
    Config(String),
    #[error("certificate generation: {0}")]
    Generate(String),
    #[error("'{0}' is not a valid TLS server name")]
    BadServerName(String),
}

/// Which end of the handshake is explaining a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// A one-line explanation of a failed TLS handshake, with the likely fix.
pub fn describe_handshake_error(e: &std::io::Error, side: Side) -> String {
    let text = e.to_string();
    let has = |words: &[&str]| words.iter().any(|w| text.contains(w));
    let hint = match side {
        // BadSignature: an issuer with the right name (say, another
        // `certs init` CA) that did not sign the certificate.
        Side::Client if has(&["UnknownIssuer", "invalid peer certificate: BadSignature"]) => {
            " (the server's certificate is not signed by our ca-cert.pem)"
        }
        Side::Client if has(&["NotValidForName"]) => {
            " (the server certificate does not name this host: set tls-hostname)"
        }
        Side::Client if has(&["CertificateRequired"]) => {
            " (the server requires a client certificate: client-cert.pem/client-key.pem)"
        }
        Side::Client if has(&["DecryptError", "BadCertificate", "UnknownCA"]) => {
            " (the server rejected our client certificate: is it signed by the server's CA?)"
        }
        Side::Server if has(&["UnknownIssuer", "BadSignature"]) => {
            " (client certificate not signed by our CA)"
        }
        Side::Server if has(&["NoCertificatesPresented"]) => " (client sent no certificate)",
        _ if has(&["Expired"]) => " (the peer's certificate has expired)",
        _ => "",
    };
    format!("TLS handshake failed: {text}{hint}")
}
