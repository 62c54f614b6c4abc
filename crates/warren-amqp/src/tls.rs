//! TLS with rustls for AMQPS and HTTPS: the server configuration built from
//! PEM files (TLS 1.2 and 1.3 only, optionally verifying client
//! certificates against a CA), and the name a verified client certificate
//! carries, for the EXTERNAL mechanism.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// Where the certificates are and whether clients must present one.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The server's certificate chain, leaf first (PEM).
    pub cert_file: PathBuf,
    /// The server's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CAs whose client certificates are accepted (PEM). Without it, no
    /// client certificate is asked for and EXTERNAL is not offered.
    pub ca_file: Option<PathBuf>,
    /// Refuse clients without a certificate (RabbitMQ's
    /// `fail_if_no_peer_cert`); needs `ca_file`.
    pub verify_peer: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("tls.verify_peer needs tls.ca_file: the CAs client certificates are checked against")]
    VerifyWithoutCa,
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

/// ALPN protocols for HTTPS; AMQPS offers none.
pub const HTTPS_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// A rustls server configuration: TLS 1.2 and 1.3, the `ring` provider.
pub fn server_config(files: &TlsFiles, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = read_certificates(&files.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&files.key_file).map_err(|error| TlsError::Pem {
        path: files.key_file.clone(),
        reason: error.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|error| TlsError::Rustls(error.to_string()))?;
    let builder = match &files.ca_file {
        None if files.verify_peer => return Err(TlsError::VerifyWithoutCa),
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let mut roots = RootCertStore::empty();
            for certificate in read_certificates(ca_file)? {
                roots
                    .add(certificate)
                    .map_err(|error| TlsError::Rustls(error.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if files.verify_peer {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|error| TlsError::Rustls(error.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|error| TlsError::Rustls(error.to_string()))?;
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(Arc::new(config))
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |reason: String| TlsError::Pem {
        path: path.to_owned(),
        reason,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|error| pem_error(error.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| pem_error(error.to_string()))?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certificates)
}

/// The subject's common name of a certificate rustls has verified, which
/// EXTERNAL takes as the user name (RabbitMQ's `ssl_cert_login_from =
/// common_name`).
pub fn common_name(certificate: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
    let name = parsed
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_owned();
    Some(name)
}

/// When one certificate of a PEM file stops being valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateExpiry {
    /// Seconds since the UNIX epoch.
    pub not_after_unix: i64,
    /// RabbitMQ's rendering of it, "2027-01-31 9:05:00" (UTC, the hour
    /// not padded).
    pub not_after: String,
    /// Its validity has not started yet.
    pub not_yet_valid: bool,
}

/// The expiry of every certificate in a PEM file, for the
/// certificate-expiration health check; an error names what is wrong with
/// the file.
pub fn certificate_expiries(path: &Path) -> Result<Vec<CertificateExpiry>, String> {
    let certificates = read_certificates(path).map_err(|error| error.to_string())?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64);
    certificates
        .iter()
        .map(|certificate| {
            let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref())
                .map_err(|error| format!("{}: {error}", path.display()))?;
            let validity = parsed.validity();
            let not_after = validity.not_after.to_datetime();
            Ok(CertificateExpiry {
                not_after_unix: validity.not_after.timestamp(),
                not_after: format!(
                    "{}-{:02}-{:02} {}:{:02}:{:02}",
                    not_after.year(),
                    u8::from(not_after.month()),
                    not_after.day(),
                    not_after.hour(),
                    not_after.minute(),
                    not_after.second()
                ),
                not_yet_valid: validity.not_before.timestamp() > now,
            })
        })
        .collect()
}
