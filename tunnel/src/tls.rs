//! TLS for the tunnel: the hub's identity (given, or self-signed once and kept) and the edge's
//! ways of trusting it (certificate pin, CA file, or explicitly none).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::tickets::StableTicketer;

/// ALPN protocol id of the TLS tunnel.
pub const ALPN: &[u8] = b"remoteingress/1";
/// File names of the generated identity inside the state directory.
const CERT_FILE: &str = "hub-cert.pem";
const KEY_FILE: &str = "hub-key.pem";

/// Why TLS material could not be loaded or used.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is missing or wrong.
        what: String,
    },
    /// The certificate could not be generated.
    #[error("generating the hub certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// A pin that is not 64 hex digits.
    #[error("hub pin must be 64 hex digits (SHA-256 of the certificate)")]
    BadPin,
    /// The system's trust store holds no CA certificate.
    #[error(
        "no CA certificate found in the system's trust store ({0}): install ca-certificates, \
         set SSL_CERT_FILE to a CA bundle, or give the hub's pin or --ca-file"
    )]
    NoSystemRoots(String),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// The hub's certificate chain and private key.
#[derive(Debug)]
pub struct HubIdentity {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// Handshakes that resumed a session from a ticket, over both transports.
    resumed: Arc<AtomicU64>,
}

impl HubIdentity {
    /// Loads a certificate chain and key from PEM files.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let pem_error = |path: &Path, what: String| TlsError::Pem {
            path: path.to_owned(),
            what,
        };
        let cert_pem = fs::read(cert).map_err(io_error(cert))?;
        let certs = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_error(cert, e.to_string()))?;
        if certs.is_empty() {
            return Err(pem_error(cert, "no certificate found".into()));
        }
        let key_pem = fs::read(key).map_err(io_error(key))?;
        let key_der =
            PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| pem_error(key, e.to_string()))?;
        Ok(Self {
            certs,
            key: key_der,
            resumed: Arc::default(),
        })
    }

    /// Loads the identity kept in `state_dir`, generating a self-signed one the first time.
    pub fn load_or_generate(state_dir: &Path) -> Result<Self, TlsError> {
        let cert = state_dir.join(CERT_FILE);
        let key = state_dir.join(KEY_FILE);
        if cert.exists() || key.exists() {
            return Self::from_pem_files(&cert, &key);
        }
        fs::create_dir_all(state_dir).map_err(io_error(state_dir))?;
        let generated = rcgen::generate_simple_self_signed(vec![
            "remoteingress-hub".to_owned(),
            "localhost".to_owned(),
        ])?;
        write_private(&key, generated.key_pair.serialize_pem().as_bytes())?;
        write_private(&cert, generated.cert.pem().as_bytes())?;
        Self::from_pem_files(&cert, &key)
    }

    /// SHA-256 of the leaf certificate, lowercase hex: what edges pin.
    pub fn pin(&self) -> String {
        certificate_pin(&self.certs[0])
    }

    /// A TLS 1.3 server configuration for the tunnel listener. Its session tickets outlive a
    /// restart of the hub and are read by every hub with this identity, so a reconnecting edge
    /// resumes instead of paying (and making the hub pay) for a full handshake.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(self.certs.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.ticketer = Arc::new(StableTicketer::new(
            self.key.secret_der(),
            self.resumed.clone(),
        ));
        Ok(Arc::new(config))
    }

    /// Handshakes so far that resumed a session instead of a full handshake.
    pub fn resumed_handshakes(&self) -> Arc<AtomicU64> {
        self.resumed.clone()
    }
}

/// Writes a file readable only by its owner, atomically (temporary file, fsync, rename).
fn write_private(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp).map_err(io_error(&tmp))?;
    file.write_all(contents).map_err(io_error(&tmp))?;
    file.sync_all().map_err(io_error(&tmp))?;
    fs::rename(&tmp, path).map_err(io_error(path))
}

/// SHA-256 of a DER certificate, lowercase hex.
pub fn certificate_pin(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

/// How an edge decides that it talks to its hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubTrust {
    /// The hub's leaf certificate must have this SHA-256 (hex).
    Pin(String),
    /// The hub's certificate must chain to a CA in this PEM file and match the host name.
    CaFile(PathBuf),
    /// The hub's certificate must chain to a CA of the system's trust store and match the host
    /// name, as a browser checks a web site: a hub with a publicly trusted certificate.
    /// `SSL_CERT_FILE` and `SSL_CERT_DIR` name another store, as they do for OpenSSL.
    System,
    /// No verification at all (explicit `--insecure`).
    Insecure,
}

/// A TLS 1.3 client configuration that trusts the hub as `trust` says.
pub fn client_config(trust: &HubTrust) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut config = match trust {
        HubTrust::CaFile(path) => {
            let pem = fs::read(path).map_err(io_error(path))?;
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| TlsError::Pem {
                    path: path.clone(),
                    what: e.to_string(),
                })?;
                roots.add(cert)?;
            }
            if roots.is_empty() {
                return Err(TlsError::Pem {
                    path: path.clone(),
                    what: "no CA certificate found".into(),
                });
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        HubTrust::System => builder
            .with_root_certificates(system_roots()?)
            .with_no_client_auth(),
        HubTrust::Pin(pin) => {
            let pin =
                remoteingress_wire::token::normalize_pin(pin).map_err(|_| TlsError::BadPin)?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinVerifier {
                    pin: Some(pin),
                    provider: provider(),
                }))
                .with_no_client_auth()
        }
        HubTrust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pin: None,
                provider: provider(),
            }))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The CA certificates of the system's trust store (`SSL_CERT_FILE`/`SSL_CERT_DIR` when set).
fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        let why = if errors.is_empty() {
            "no certificates".to_owned()
        } else {
            errors.join("; ")
        };
        return Err(TlsError::NoSystemRoots(why));
    }
    Ok(roots)
}

/// Accepts exactly the certificate with the pinned hash (or, without a pin, any certificate),
/// while still checking the handshake signatures.
#[derive(Debug)]
struct PinVerifier {
    pin: Option<String>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.pin {
            Some(pin) if *pin != certificate_pin(end_entity) => Err(rustls::Error::General(
                format!("hub certificate does not match the pin {pin}"),
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_identity_is_kept_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let first = HubIdentity::load_or_generate(dir.path()).unwrap();
        let second = HubIdentity::load_or_generate(dir.path()).unwrap();
        assert_eq!(first.pin(), second.pin());
        assert_eq!(first.pin().len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "key readable by others: {mode:o}");
        }
        first.server_config().unwrap();
    }

    #[test]
    fn unreadable_material_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(CERT_FILE), "not pem").unwrap();
        let err = HubIdentity::load_or_generate(dir.path()).unwrap_err();
        assert!(err.to_string().contains(CERT_FILE), "{err}");
        assert!(matches!(
            client_config(&HubTrust::Pin("zz".into())),
            Err(TlsError::BadPin)
        ));
        let missing = dir.path().join("missing.pem");
        assert!(client_config(&HubTrust::CaFile(missing)).is_err());
    }
}
