//! TLS termination: the certificate chain and key from PEM files, ALPN for HTTP/2 and
//! HTTP/1.1, and a reload (SIGHUP) that swaps the config new connections get while open ones
//! keep theirs.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use arc_swap::ArcSwap;
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};
use thiserror::Error;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("gateway.tls_cert {}: {source}", file.display())]
    Cert {
        file: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("gateway.tls_cert {}: no certificate in the file (want PEM \"BEGIN CERTIFICATE\")", file.display())]
    NoCert { file: PathBuf },
    #[error("gateway.tls_key {}: {source} (want a PEM private key: PKCS#8, PKCS#1 or SEC1)", file.display())]
    Key {
        file: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("gateway.tls_cert {} and gateway.tls_key {}: {source}", cert.display(), key.display())]
    Config {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// The certificate in force, reloadable.
pub struct Certificates {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<ServerConfig>,
}

impl Certificates {
    pub fn load(cert: &Path, key: &Path) -> Result<Certificates, TlsError> {
        Ok(Certificates {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: ArcSwap::new(server_config(cert, key)?),
        })
    }

    /// Reads the files again. On error the running certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.current.store(server_config(&self.cert, &self.key)?);
        Ok(())
    }

    /// An acceptor with the certificate in force now, for one connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }
}

fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Cert {
            file: cert.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCert {
            file: cert.to_owned(),
        });
    }
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Key {
        file: key.to_owned(),
        source,
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| {
            builder
                .with_no_client_auth()
                .with_single_cert(chain, private_key)
        })
        .map_err(|source| TlsError::Config {
            cert: cert.to_owned(),
            key: key.to_owned(),
            source,
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
