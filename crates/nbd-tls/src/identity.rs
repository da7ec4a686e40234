//! Who a peer is: the names in its certificate, for per-export allow lists.

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

/// The subject common names and SAN DNS names (and URIs, e.g. SPIFFE IDs)
/// of the end-entity certificate.
pub fn peer_identities(chain: Option<&[CertificateDer<'_>]>) -> Vec<String> {
    let Some(cert) = chain.and_then(|c| c.first()) else {
        return Vec::new();
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|a| a.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) | GeneralName::URI(d) => names.push(d.to_string()),
                _ => {}
            }
        }
    }
    names.dedup();
    names
}
