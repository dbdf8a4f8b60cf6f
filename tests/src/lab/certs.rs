//! A throwaway certificate authority and the gateway certificates it signs (rcgen), for the
//! lab and the gateway tests: clients trust the CA, the gateway serves a leaf certificate for
//! `localhost` and the addresses it is reached at.

use std::{
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::{CertificateDer, pem::PemObject};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating a lab certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the CA certificate {}: {source}", path.display())]
    ReadCa {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("a TLS client trusting {}: {source}", path.display())]
    Client {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// A CA made for one lab run; its key never leaves memory.
pub struct LabCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate and its key, PEM.
pub struct LeafCert {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate's end (notAfter), as Unix seconds.
    pub not_after_unix: i64,
}

impl LabCa {
    pub fn new() -> Result<LabCa, CertError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "lb lab CA (throwaway)");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ok(LabCa {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)?,
        })
    }

    /// The CA certificate clients trust.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `localhost` and `addresses`, signed by this CA, valid until
    /// rcgen's default end (4096), far beyond any test.
    pub fn issue(&self, addresses: &[IpAddr]) -> Result<LeafCert, CertError> {
        self.issue_until(addresses, (4096, 1, 1))
    }

    /// [`LabCa::issue`], valid until the start of the day `(year, month, day)` (UTC).
    pub fn issue_until(
        &self,
        addresses: &[IpAddr],
        (year, month, day): (i32, u8, u8),
    ) -> Result<LeafCert, CertError> {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
        params
            .subject_alt_names
            .extend(addresses.iter().map(|address| SanType::IpAddress(*address)));
        params
            .distinguished_name
            .push(DnType::CommonName, "lb lab gateway");
        params.not_after = rcgen::date_time_ymd(year, month, day);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(LeafCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after_unix: params.not_after.unix_timestamp(),
        })
    }
}

/// A gateway's certificate files from a new lab CA: what the gateway serves and what its
/// clients trust.
#[derive(Debug, Clone)]
pub struct GatewayCerts {
    /// The CA's certificate, which clients trust.
    pub ca: PathBuf,
    /// The gateway's leaf certificate and key (a test may renew them in place).
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl GatewayCerts {
    /// Makes a CA and a leaf certificate for `addresses`, and writes `<prefix>-ca.crt`,
    /// `<prefix>.crt` and `<prefix>.key` to `dir`.
    pub fn write(
        dir: &Path,
        prefix: &str,
        addresses: &[IpAddr],
    ) -> Result<GatewayCerts, CertError> {
        let authority = LabCa::new()?;
        let leaf = authority.issue(addresses)?;
        let certs = GatewayCerts {
            ca: dir.join(format!("{prefix}-ca.crt")),
            cert: dir.join(format!("{prefix}.crt")),
            key: dir.join(format!("{prefix}.key")),
        };
        write_pem(&certs.ca, &authority.cert_pem())?;
        write_pem(&certs.cert, &leaf.cert_pem)?;
        write_pem(&certs.key, &leaf.key_pem)?;
        Ok(certs)
    }
}

/// Writes `text` to `path` (creating or replacing it).
pub fn write_pem(path: &Path, text: &str) -> Result<(), CertError> {
    fs::write(path, text).map_err(|source| CertError::Write {
        path: path.to_owned(),
        source,
    })
}

/// A TLS client (rustls, ring) that trusts only the CA in `ca_file` and offers HTTP/1.1, the
/// protocol of a WebSocket upgrade.
pub fn trusting_client(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, CertError> {
    let read_error = |source| CertError::ReadCa {
        path: ca_file.to_owned(),
        source,
    };
    let client_error = |source| CertError::Client {
        path: ca_file.to_owned(),
        source,
    };
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca_file).map_err(read_error)?)
        .map_err(client_error)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(client_error)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// How to make common clients trust the lab CA in `ca_file`.
pub fn trust_hint(ca_file: &Path) -> String {
    let ca = ca_file.display();
    format!(
        "the gateway's certificate is signed by the lab's throwaway CA {ca}; trust it per client:\n\
         \x20 curl --cacert {ca} https://localhost:<port>/<key> …\n\
         \x20 NODE_EXTRA_CA_CERTS={ca} node …   (polkadot.js)\n\
         \x20 SSL_CERT_FILE={ca} <rustls/openssl client> …\n\
         never install it system-wide: its key only lived in this lab run"
    )
}
