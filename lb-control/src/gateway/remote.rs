//! Another site's gateway as an upstream of a tier (`[[gateway.remotes]]`): while no local node
//! of a lower tier is up, the gateway's clients are served by the fallback site's public
//! endpoint (`https://…/<key>`, `wss://…/<key>`), with an API key of that site and the CA that
//! signed its certificate.
//!
//! The remote is reached through a relay on a loopback port of this host: plain HTTP/1.1 and
//! WebSocket upgrades in, TLS with the remote's key in the path out, one remote connection per
//! relayed connection (keep-alive stays keep-alive, an upgrade becomes a spliced stream). To
//! the rest of lb-control the relay is one more node endpoint, so whatever a node gets applies
//! to the remote unchanged: the health checker's chain-aware checks (genesis, lag, stall,
//! saturation), the tier rule, the head and cache rules, the upstream pools and call budgets,
//! the chain follower. Logs and metrics name it by the relay's address: the start logs which
//! remote that is, and `lb_gateway_remote_info` maps one to the other.
//!
//! The relay listens on 127.0.0.1 only; like the nodes' RPC ports, it serves whoever runs on
//! this host.

use std::{
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode, Uri,
    body::{Bytes, Incoming},
    client::conn::http1::{self as client, SendRequest},
    header::{self, HeaderValue},
    server::conn::http1 as server,
    service::service_fn,
    upgrade::{self, OnUpgrade},
};
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use serde::Deserialize;
use thiserror::Error;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Mutex,
    task::JoinHandle,
};
use tokio_rustls::TlsConnector;
use tracing::{debug, warn};

use crate::{backends::validate_tier, model::Tier, section::Problem};

/// `[[gateway.remotes]]`: one other site's gateway.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RemoteSection {
    /// Its public endpoint without the key: `https://host[:port][/path]`. Calls go to
    /// `https://…/<key>`, WebSockets to `wss://` on the same host, port and path.
    pub url: String,
    /// A file holding an API key of the other site's gateway, on one line.
    pub key_file: PathBuf,
    /// The CA (PEM) that signed the other site's certificate: the only one trusted for it.
    pub ca_file: PathBuf,
    /// Clients go to it only while no local node of a lower tier is up: above the local
    /// nodes' tiers, it is the last.
    pub tier: Tier,
}

#[derive(Debug, Error)]
pub enum RemoteError {
    #[error("remote gateway {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("remote gateway {url}: key_file {}: {reason}", file.display())]
    Key {
        url: String,
        file: PathBuf,
        reason: String,
    },
    #[error("remote gateway {url}: ca_file {}: {reason}", file.display())]
    Ca {
        url: String,
        file: PathBuf,
        reason: String,
    },
    #[error("remote gateway {url}: TLS settings: {source}")]
    Tls {
        url: String,
        #[source]
        source: rustls::Error,
    },
    #[error("remote gateway {url}: the relay cannot listen on 127.0.0.1: {source}")]
    Listen {
        url: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where the remote is, from its URL.
#[derive(Debug, Clone)]
struct Address {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    /// The `Host` header: host and port as the URL has them.
    authority: HeaderValue,
    /// The URL's path without its trailing `/`: the key follows it.
    base_path: String,
}

impl Address {
    fn parse(url: &str) -> Result<Address, String> {
        let uri: Uri = url
            .parse()
            .map_err(|_| format!("{url:?} is not a URL: write https://host[:port][/path]"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!(
                "{url:?}: the remote is called over TLS: write https://host[:port][/path] (its \
                 WebSockets are wss:// on the same host)"
            ));
        }
        let (Some(authority), Some(host)) = (uri.authority(), uri.host()) else {
            return Err(format!("{url:?} names no host"));
        };
        if uri.query().is_some() {
            return Err(format!(
                "{url:?}: no query: the key goes in key_file, the path is the rest"
            ));
        }
        let base_path = uri.path().trim_end_matches('/').to_owned();
        if base_path
            .split('/')
            .any(|segment| segment.starts_with("lbk_"))
        {
            return Err(format!(
                "{url:?} holds an API key: put the key in key_file and leave it out of the URL"
            ));
        }
        // An IPv6 host keeps its brackets in the URL, not in a connect or a server name.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| format!("{url:?}: {host:?} is not a host name or address"))?;
        let authority = HeaderValue::from_str(authority.as_str())
            .map_err(|_| format!("{url:?}: {authority} is not a host header"))?;
        Ok(Address {
            host,
            port: uri.port_u16().unwrap_or(443),
            server_name,
            authority,
            base_path,
        })
    }
}

/// A remote's settings with its files read: where it is, the path with its key, the TLS
/// settings that trust its CA alone.
pub struct RemoteConfig {
    url: String,
    tier: Tier,
    address: Address,
    path: Uri,
    tls: Arc<ClientConfig>,
}

impl RemoteSection {
    /// What is wrong with the section, each under `field` (`gateway.remotes[0]`); the files
    /// are read by [`RemoteSection::read_files`].
    pub fn problems(&self, field: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        if let Err(reason) = Address::parse(&self.url) {
            problems.push(Problem::new(format!("{field}.url"), reason));
        }
        if let Err(error) = validate_tier(self.tier) {
            problems.push(Problem::new(format!("{field}.tier"), error.to_string()));
        }
        problems
    }

    /// Reads the key and the CA, as a start does (`check-config` reads them this way too).
    pub fn read_files(&self) -> Result<RemoteConfig, RemoteError> {
        let url = self.url.clone();
        let address = Address::parse(&url).map_err(|reason| RemoteError::Url {
            url: url.clone(),
            reason,
        })?;
        let key_error = |reason| RemoteError::Key {
            url: url.clone(),
            file: self.key_file.clone(),
            reason,
        };
        let key = read_key(&self.key_file).map_err(key_error)?;
        let path: Uri = format!("{}/{key}", address.base_path)
            .parse()
            .map_err(|_| key_error("the key does not fit in a URL path".to_owned()))?;
        let roots = read_roots(&self.ca_file).map_err(|reason| RemoteError::Ca {
            url: url.clone(),
            file: self.ca_file.clone(),
            reason,
        })?;
        let mut tls =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|source| RemoteError::Tls {
                    url: url.clone(),
                    source,
                })?
                .with_root_certificates(roots)
                .with_no_client_auth();
        // HTTP/1.1 only: a WebSocket upgrade needs it.
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(RemoteConfig {
            url,
            tier: self.tier,
            address,
            path,
            tls: Arc::new(tls),
        })
    }
}

/// A remote gateway, relayed: its relay serves until this is dropped.
pub struct Remote {
    url: String,
    tier: Tier,
    endpoint: SocketAddr,
    relay: JoinHandle<()>,
}

impl Remote {
    /// Starts the relay on a loopback port. Call it within a Tokio runtime. `timeout` bounds
    /// each connection to the remote (connect and TLS handshake).
    pub fn start(config: RemoteConfig, timeout: Duration) -> Result<Remote, RemoteError> {
        let RemoteConfig {
            url,
            tier,
            address,
            path,
            tls,
        } = config;
        let listen_error = |source| RemoteError::Listen {
            url: url.clone(),
            source,
        };
        let listener =
            std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(listen_error)?;
        listener.set_nonblocking(true).map_err(listen_error)?;
        let endpoint = listener.local_addr().map_err(listen_error)?;
        let listener = TcpListener::from_std(listener).map_err(listen_error)?;
        let relay = Arc::new(Relay {
            url: url.clone(),
            address,
            path,
            connector: TlsConnector::from(tls),
            timeout,
        });
        Ok(Remote {
            url,
            tier,
            endpoint,
            relay: tokio::spawn(relay.accept(listener)),
        })
    }

    /// The remote's URL, as configured (without the key).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// Where the relay listens: the remote's endpoint for the rest of lb-control.
    pub fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.relay.abort();
    }
}

/// The key: one line of characters a URL path takes as they are.
fn read_key(file: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(file).map_err(|error| error.to_string())?;
    let key = text.trim();
    if key.is_empty() {
        return Err("empty: write the other site's API key in it".to_owned());
    }
    if !key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~'))
    {
        return Err("not an API key: one line of letters, digits, '-', '_', '.' or '~'".to_owned());
    }
    Ok(key.to_owned())
}

fn read_roots(file: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(file).map_err(|error| error.to_string())? {
        let cert = cert.map_err(|error| error.to_string())?;
        roots
            .add(cert)
            .map_err(|error| format!("not a CA certificate: {error}"))?;
    }
    if roots.is_empty() {
        return Err("no certificate in the file (want PEM \"BEGIN CERTIFICATE\")".to_owned());
    }
    Ok(roots)
}

type RelayBody = BoxBody<Bytes, hyper::Error>;

/// What every relayed connection shares.
struct Relay {
    url: String,
    address: Address,
    /// The remote's path with the key: where every call and upgrade goes.
    path: Uri,
    connector: TlsConnector,
    timeout: Duration,
}

impl Relay {
    async fn accept(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(self.clone().serve(stream));
                }
                Err(error) => {
                    // Out of file descriptors, typically: try again shortly.
                    warn!(remote = %self.url, "relay: accepting a connection: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Relays one local connection's requests over one remote connection, made at its first
    /// request (and again if the remote closed it between requests).
    async fn serve(self: Arc<Self>, local: TcpStream) {
        let remote: Arc<Mutex<Option<SendRequest<Incoming>>>> = Arc::default();
        let service = service_fn(move |request| {
            let (relay, remote) = (self.clone(), remote.clone());
            async move { Ok::<_, Infallible>(relay.forward(request, &remote).await) }
        });
        if let Err(error) = server::Builder::new()
            .serve_connection(TokioIo::new(local), service)
            .with_upgrades()
            .await
        {
            debug!("relay: a local connection ended: {error}");
        }
    }

    async fn forward(
        &self,
        mut request: Request<Incoming>,
        remote: &Mutex<Option<SendRequest<Incoming>>>,
    ) -> Response<RelayBody> {
        let mut slot = remote.lock().await;
        let mut sender = match slot.take() {
            Some(sender) if !sender.is_closed() => sender,
            _ => match self.connect().await {
                Ok(sender) => sender,
                Err(reason) => return self.bad_gateway(&reason),
            },
        };
        if sender.ready().await.is_err() {
            sender = match self.connect().await {
                Ok(sender) => sender,
                Err(reason) => return self.bad_gateway(&reason),
            };
        }
        let local_upgrade = is_upgrade(&request).then(|| upgrade::on(&mut request));
        *request.uri_mut() = self.path.clone();
        request
            .headers_mut()
            .insert(header::HOST, self.address.authority.clone());
        let mut response = match sender.send_request(request).await {
            Ok(response) => response,
            Err(error) => return self.bad_gateway(&format!("request: {error}")),
        };
        match local_upgrade {
            Some(local) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
                // The remote connection becomes the upgraded stream: not reused.
                tokio::spawn(splice(local, upgrade::on(&mut response)));
            }
            _ => *slot = Some(sender),
        }
        response.map(BodyExt::boxed)
    }

    /// A new TLS connection to the remote, within the timeout.
    async fn connect(&self) -> Result<SendRequest<Incoming>, String> {
        let address = &self.address;
        let connected = tokio::time::timeout(self.timeout, async {
            let tcp = TcpStream::connect((address.host.as_str(), address.port))
                .await
                .map_err(|error| format!("connect: {error}"))?;
            let _ = tcp.set_nodelay(true);
            self.connector
                .connect(address.server_name.clone(), tcp)
                .await
                .map_err(|error| format!("TLS: {error}"))
        })
        .await
        .map_err(|_| format!("no connection within {:?}", self.timeout))??;
        let (sender, connection) = client::handshake(TokioIo::new(connected))
            .await
            .map_err(|error| format!("HTTP: {error}"))?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                debug!("relay: a remote connection ended: {error}");
            }
        });
        Ok(sender)
    }

    /// HTTP 502, naming the remote and why: what the health checker reports for it.
    fn bad_gateway(&self, reason: &str) -> Response<RelayBody> {
        debug!(remote = %self.url, "relay: {reason}");
        let body = Full::new(Bytes::from(format!(
            "remote gateway {}: {reason}",
            self.url
        )))
        .map_err(|never| match never {})
        .boxed();
        let mut response = Response::new(body);
        *response.status_mut() = StatusCode::BAD_GATEWAY;
        response
    }
}

fn is_upgrade(request: &Request<Incoming>) -> bool {
    request.headers().contains_key(header::UPGRADE)
}

/// Copies both ways between an upgraded local connection and its remote one until either
/// side closes.
async fn splice(local: OnUpgrade, remote: OnUpgrade) {
    match tokio::try_join!(local, remote) {
        Ok((local, remote)) => {
            let _ =
                tokio::io::copy_bidirectional(&mut TokioIo::new(local), &mut TokioIo::new(remote))
                    .await;
        }
        Err(error) => debug!("relay: an upgrade failed: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_tls_endpoint_without_its_key() {
        let address = Address::parse("https://fallback.example.org").unwrap();
        assert_eq!(
            (
                address.host.as_str(),
                address.port,
                address.base_path.as_str()
            ),
            ("fallback.example.org", 443, "")
        );
        let address = Address::parse("https://[fd00::1]:8443/rpc/").unwrap();
        assert_eq!(
            (
                address.host.as_str(),
                address.port,
                address.base_path.as_str()
            ),
            ("fd00::1", 8443, "/rpc")
        );
        assert_eq!(address.authority, "[fd00::1]:8443");
        for (url, says) in [
            ("http://fallback.example.org", "called over TLS"),
            ("wss://fallback.example.org", "called over TLS"),
            ("fallback.example.org", "called over TLS"),
            ("https://fallback.example.org/lbk_0123", "holds an API key"),
            ("https://fallback.example.org/?apikey=x", "no query"),
            ("https://exa mple.org", "is not a URL"),
        ] {
            let error = Address::parse(url).unwrap_err();
            assert!(error.contains(says), "{url}: {error}");
        }
    }

    #[test]
    fn a_remote_section_names_each_bad_field() {
        let section = RemoteSection {
            url: "http://fallback.example.org".to_owned(),
            key_file: PathBuf::from("/nonexistent"),
            ca_file: PathBuf::from("/nonexistent"),
            tier: 12,
        };
        let fields: Vec<String> = section
            .problems("gateway.remotes[0]")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(fields.len(), 2, "{fields:?}");
        assert!(
            fields[0].starts_with("gateway.remotes[0].url: "),
            "{fields:?}"
        );
        assert!(
            fields[1].starts_with("gateway.remotes[0].tier: "),
            "{fields:?}"
        );
    }

    #[test]
    fn unreadable_keys_and_cas_are_refused_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("lb-remote-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key_file = dir.join("key");
        std::fs::write(&key_file, "lbk_has space\n").unwrap();
        let section = RemoteSection {
            url: "https://fallback.example.org".to_owned(),
            key_file: key_file.clone(),
            ca_file: dir.join("missing-ca.pem"),
            tier: 2,
        };
        let error = section.read_files().err().unwrap().to_string();
        assert!(
            error.contains("key_file") && error.contains("not an API key"),
            "{error}"
        );
        std::fs::write(&key_file, "lbk_0123\n").unwrap();
        let error = section.read_files().err().unwrap().to_string();
        assert!(
            error.contains("ca_file") && error.contains("missing-ca.pem"),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
