//! A throwaway certificate authority and the gateway certificates it signs (rcgen), for the
//! lab and the gateway tests: clients trust the CA, the gateway serves a leaf certificate for
//! `localhost` and the addresses it is reached at.

use std::{
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};

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
}

/// A CA made for one lab run; its key never leaves memory.
pub struct LabCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate and its key, PEM.
pub struct LeafCert {
    pub cert_pem: String,
    pub key_pem: String,
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

    /// A server certificate for `localhost` and `addresses`, signed by this CA.
    pub fn issue(&self, addresses: &[IpAddr]) -> Result<LeafCert, CertError> {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
        params
            .subject_alt_names
            .extend(addresses.iter().map(|address| SanType::IpAddress(*address)));
        params
            .distinguished_name
            .push(DnType::CommonName, "lb lab gateway");
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(LeafCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Writes `text` to `path` (creating or replacing it).
pub fn write_pem(path: &Path, text: &str) -> Result<(), CertError> {
    fs::write(path, text).map_err(|source| CertError::Write {
        path: path.to_owned(),
        source,
    })
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
