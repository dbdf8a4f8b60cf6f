//! TLS termination: the certificate chain and key from PEM files, ALPN for HTTP/2 and
//! HTTP/1.1, and a reload (SIGHUP) that swaps the config new connections get while open ones
//! keep theirs. The certificate's expiry is reported (a gauge, a warning at load) so that an
//! operator renews it before clients are refused.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, OnceLock, atomic::AtomicU64},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use prometheus_client::metrics::gauge::Gauge;
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};
use thiserror::Error;
use tokio_rustls::TlsAcceptor;
use tracing::warn;

/// A certificate closer to its end than this is warned about at load.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

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
    current: ArcSwap<InForce>,
    /// Where the leaf's expiry goes, once the gateway's metrics are there.
    expiry: OnceLock<Gauge<f64, AtomicU64>>,
}

/// A loaded certificate: what new connections get, and when the leaf certificate ends (Unix
/// seconds; None when x509-parser cannot read it, which rustls does not need).
struct InForce {
    config: Arc<ServerConfig>,
    not_after: Option<f64>,
}

impl Certificates {
    pub fn load(cert: &Path, key: &Path) -> Result<Certificates, TlsError> {
        Ok(Certificates {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: ArcSwap::from_pointee(in_force(cert, key)?),
            expiry: OnceLock::new(),
        })
    }

    /// Reads the files again. On error the running certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let loaded = in_force(&self.cert, &self.key)?;
        self.report(&loaded);
        self.current.store(Arc::new(loaded));
        Ok(())
    }

    /// An acceptor with the certificate in force now, for one connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load().config.clone())
    }

    /// Sets `gauge` to the leaf certificate's end (Unix seconds), now and at every reload.
    pub fn report_expiry_to(&self, gauge: Gauge<f64, AtomicU64>) {
        let _ = self.expiry.set(gauge);
        self.report(&self.current.load());
    }

    fn report(&self, loaded: &InForce) {
        if let (Some(gauge), Some(not_after)) = (self.expiry.get(), loaded.not_after) {
            gauge.set(not_after);
        }
    }
}

fn in_force(cert: &Path, key: &Path) -> Result<InForce, TlsError> {
    let (config, leaf) = server_config(cert, key)?;
    let not_after = match x509_parser::parse_x509_certificate(&leaf) {
        Ok((_, parsed)) => Some(parsed.validity().not_after.timestamp()),
        Err(error) => {
            warn!(file = %cert.display(), "gateway: reading the certificate's validity: {error}");
            None
        }
    };
    if let Some(not_after) = not_after {
        let ends = SystemTime::UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64);
        match ends.duration_since(SystemTime::now()) {
            Err(_) => warn!(
                file = %cert.display(),
                "gateway: the TLS certificate has expired: clients refuse it; renew it and send SIGHUP"
            ),
            Ok(left) if left < EXPIRY_WARNING => warn!(
                file = %cert.display(),
                "gateway: the TLS certificate expires in {} hours; renew it and send SIGHUP",
                left.as_secs() / 3600
            ),
            Ok(_) => {}
        }
    }
    Ok(InForce {
        config,
        not_after: not_after.map(|seconds| seconds as f64),
    })
}

/// The server config of `cert` and `key`, and the chain's first (leaf) certificate.
fn server_config(
    cert: &Path,
    key: &Path,
) -> Result<(Arc<ServerConfig>, CertificateDer<'static>), TlsError> {
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
    let leaf = chain[0].clone();
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
    Ok((Arc::new(config), leaf))
}
