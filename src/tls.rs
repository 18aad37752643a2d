//! TLS with rustls (ring provider, no OpenSSL): the listener's server config (optionally
//! requiring client certificates from a CA: mutual TLS between relays), and the client
//! config relays use for `https://` parents, the origin and the monitor.

use std::path::Path;
use std::sync::{Arc, RwLock};

use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Why TLS could not be set up; names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS client certificate verifier: {0}")]
    Verifier(String),
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file (a chain: leaf first).
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, format!("cannot read certificates: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "holds no certificate"));
    }
    Ok(certs)
}

/// The private key of a PEM file, refused when every user may read it.
pub fn private_key(path: &Path, key: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    crate::config::read_secret(path, key).map_err(|e| file_error(path, e))?;
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| file_error(path, format!("not a PEM private key: {e}")))
}

fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca)? {
        roots
            .add(cert)
            .map_err(|e| file_error(ca, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// The listener's TLS settings: certificate and key files, and the CA whose client
/// certificates are required (mutual TLS), if any.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: Option<std::path::PathBuf>,
    /// With `client_ca`: whether a client without a certificate is refused (true), or
    /// served as an anonymous client, such as an agent (false).
    pub require_client_cert: bool,
}

/// Builds the server config from its files.
pub fn server_config(files: &ServerFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = certificates(&files.cert)?;
    let key = private_key(&files.key, "relay.tls_key")?;
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider(),
            );
            let verifier = if files.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The listener's current server config; replaced on reload (SIGHUP) with new files.
#[derive(Debug)]
pub struct Listener {
    files: ServerFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl Listener {
    pub fn new(files: ServerFiles) -> Result<Self, TlsError> {
        let current = RwLock::new(server_config(&files)?);
        Ok(Self { files, current })
    }

    /// The config new connections use.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the certificate and key files again; on error the old config stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = server_config(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }
}

/// How a relay connects to `https://` upstreams: the CA bundle parents are verified
/// against, and the client certificate to present (for parents requiring mutual TLS).
#[derive(Debug, Clone, PartialEq)]
pub struct ClientFiles {
    pub ca: std::path::PathBuf,
    pub cert_and_key: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// Builds the client config from its files.
pub fn client_config(files: &ClientFiles) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(&files.ca)?);
    // ALPN is left to the HTTP connector, which offers what it speaks.
    Ok(match &files.cert_and_key {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder.with_client_auth_cert(
            certificates(cert)?,
            private_key(key, "upstream.client_key")?,
        )?,
    })
}

/// The connector of every outgoing client: plain `http://`, and `https://` verified
/// against `files` (without files, `https://` URLs fail: there is no CA to trust).
pub type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

pub fn connector(http: HttpConnector, files: Option<&ClientFiles>) -> Result<Connector, TlsError> {
    let tls = match files {
        Some(files) => client_config(files)?,
        None => ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth(),
    };
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write_pair(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        (cert_path, key_path)
    }

    #[test]
    fn reload_swaps_the_certificate_and_keeps_the_old_one_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path(), "one.example");
        let listener = Listener::new(ServerFiles {
            cert: cert.clone(),
            key,
            client_ca: None,
            require_client_cert: true,
        })
        .unwrap();
        let before = listener.current();

        write_pair(dir.path(), "two.example");
        listener.reload().unwrap();
        let after = listener.current();
        assert!(
            !Arc::ptr_eq(&before, &after),
            "new connections use the new files"
        );

        std::fs::write(&cert, "not a certificate").unwrap();
        let err = listener.reload().unwrap_err().to_string();
        assert!(err.contains("cert.pem"), "{err}");
        assert!(
            Arc::ptr_eq(&after, &listener.current()),
            "the running config stays"
        );
    }

    #[test]
    fn a_key_every_user_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path(), "one.example");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = server_config(&ServerFiles {
            cert,
            key,
            client_ca: None,
            require_client_cert: true,
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }
}
