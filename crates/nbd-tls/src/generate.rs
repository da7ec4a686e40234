//! `nbdferry certs init`: a CA, a server and a client certificate for
//! trying TLS out, in the layout qemu, nbdkit and libnbd read.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::creds::{CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY};
use crate::error::TlsError;

/// The files written, in the order written.
pub type GeneratedFiles = Vec<PathBuf>;

const CA_KEY: &str = "ca-key.pem";

fn gen_err(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e.to_string())
}

fn write(dir: &Path, name: &str, text: &str, secret: bool) -> Result<PathBuf, TlsError> {
    let path = dir.join(name);
    let mode = if secret { 0o600 } else { 0o644 };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .map_err(|source| TlsError::Write {
            path: path.clone(),
            source,
        })?;
    f.write_all(text.as_bytes())
        .map_err(|source| TlsError::Write {
            path: path.clone(),
            source,
        })?;
    Ok(path)
}

/// Writes a fresh CA, a server certificate valid for `server_names` (plus
/// localhost and the loopback addresses) and a client certificate whose
/// CN is `client_name`. Refuses to overwrite existing files.
pub fn generate_test_pki(
    dir: &Path,
    server_names: &[String],
    client_name: &str,
) -> Result<GeneratedFiles, TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    for name in [
        CA_CERT,
        CA_KEY,
        SERVER_CERT,
        SERVER_KEY,
        CLIENT_CERT,
        CLIENT_KEY,
    ] {
        if dir.join(name).exists() {
            return Err(TlsError::Write {
                path: dir.join(name),
                source: std::io::ErrorKind::AlreadyExists.into(),
            });
        }
    }
    let ca_key = KeyPair::generate().map_err(gen_err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "nbdferry test CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).map_err(gen_err)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut sans: Vec<String> = server_names.to_vec();
    for default in ["localhost", "127.0.0.1", "::1"] {
        if !sans.iter().any(|s| s == default) {
            sans.push(default.to_string());
        }
    }
    let server_key = KeyPair::generate().map_err(gen_err)?;
    let mut server = CertificateParams::new(sans.clone()).map_err(gen_err)?;
    server
        .distinguished_name
        .push(DnType::CommonName, sans[0].as_str());
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &issuer).map_err(gen_err)?;

    let (client_cert, client_key) = client_cert(&issuer, client_name)?;
    Ok(vec![
        write(dir, CA_CERT, &ca_cert.pem(), false)?,
        write(dir, CA_KEY, &issuer.key().serialize_pem(), true)?,
        write(dir, SERVER_CERT, &server_cert.pem(), false)?,
        write(dir, SERVER_KEY, &server_key.serialize_pem(), true)?,
        write(dir, CLIENT_CERT, &client_cert, false)?,
        write(dir, CLIENT_KEY, &client_key, true)?,
    ])
}

/// A client certificate whose CN (and SAN) is `name`: (cert, key) PEM.
fn client_cert(issuer: &Issuer<'_, KeyPair>, name: &str) -> Result<(String, String), TlsError> {
    let key = KeyPair::generate().map_err(gen_err)?;
    let mut params = CertificateParams::new(vec![name.to_string()]).map_err(gen_err)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, issuer).map_err(gen_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Issues a client certificate for identity `name` from the CA in
/// `ca_dir` (its ca-cert.pem and ca-key.pem) into `out`: ca-cert.pem,
/// client-cert.pem and client-key.pem, the directory a client's
/// `tls-certificates=` or `--tls-creds` names. Refuses to overwrite.
pub fn issue_client_cert(
    ca_dir: &Path,
    name: &str,
    out: &Path,
) -> Result<GeneratedFiles, TlsError> {
    std::fs::create_dir_all(out).map_err(|source| TlsError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let ca_pem = read(&ca_dir.join(CA_CERT))?;
    let key = KeyPair::from_pem(&read(&ca_dir.join(CA_KEY))?).map_err(gen_err)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).map_err(gen_err)?;
    let (cert, key) = client_cert(&issuer, name)?;
    Ok(vec![
        write(out, CA_CERT, &ca_pem, false)?,
        write(out, CLIENT_CERT, &cert, false)?,
        write(out, CLIENT_KEY, &key, true)?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClientCreds, ServerCreds, client_config, peer_identities, server_config};
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn generated_pki_loads_and_names_the_client() {
        let dir = tempfile::tempdir().unwrap();
        let files = generate_test_pki(dir.path(), &["nbd.example".into()], "backup-01").unwrap();
        assert_eq!(files.len(), 6);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(SERVER_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        server_config(&ServerCreds::from_dir(dir.path()), true).unwrap();
        client_config(&ClientCreds::from_dir(dir.path()), true).unwrap();
        let cert = CertificateDer::from_pem_file(dir.path().join(CLIENT_CERT)).unwrap();
        assert_eq!(
            peer_identities(Some(&[cert])),
            vec!["backup-01".to_string()]
        );
        assert!(
            generate_test_pki(dir.path(), &[], "x").is_err(),
            "must not overwrite"
        );
        // A second identity from the same CA.
        let out = dir.path().join("viewer");
        assert_eq!(
            issue_client_cert(dir.path(), "viewer-01", &out)
                .unwrap()
                .len(),
            3
        );
        client_config(&ClientCreds::from_dir(&out), true).unwrap();
        let cert = CertificateDer::from_pem_file(out.join(CLIENT_CERT)).unwrap();
        assert_eq!(
            peer_identities(Some(&[cert])),
            vec!["viewer-01".to_string()]
        );
        assert!(issue_client_cert(dir.path(), "again", &out).is_err());
    }

    #[test]
    fn mismatched_key_is_named() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        generate_test_pki(a.path(), &[], "c").unwrap();
        generate_test_pki(b.path(), &[], "c").unwrap();
        let creds = ServerCreds {
            key: b.path().join(SERVER_KEY),
            ..ServerCreds::from_dir(a.path())
        };
        let err = server_config(&creds, false).unwrap_err().to_string();
        assert!(err.contains("do not belong together"), "{err}");
        assert!(
            err.contains(&b.path().join(SERVER_KEY).display().to_string()),
            "{err}"
        );
        let missing = ServerCreds::from_dir(&a.path().join("nope"));
        assert!(
            server_config(&missing, false)
                .unwrap_err()
                .to_string()
                .contains("cannot read")
        );
    }
}
