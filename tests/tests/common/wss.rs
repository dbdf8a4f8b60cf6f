//! `wss://` clients that follow new heads through the gateway and through a close of their
//! connection (an upgrade of lb-control, a handover to the other host of a pair): how they were
//! closed and how soon they were back.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use lb_tests::ws_client::WsClient;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// How one WebSocket client went through the close of its connection.
#[derive(Debug)]
pub struct Reconnect {
    pub close_code: Option<CloseCode>,
    /// From the close frame to the subscription's answer on the new connection.
    pub subscribed: Duration,
    /// From the close frame to the first head on the new connection.
    pub first_head: Duration,
}

/// `min …, median …, max …` of one duration of every reconnect.
pub fn spread(reconnects: &[Reconnect], of: fn(&Reconnect) -> Duration) -> String {
    let mut took: Vec<Duration> = reconnects.iter().map(of).collect();
    took.sort();
    match (took.first(), took.last()) {
        (Some(min), Some(max)) => format!(
            "min {min:?}, median {:?}, max {max:?}",
            took[took.len() / 2]
        ),
        _ => "none".to_owned(),
    }
}

/// A `wss://` client from a lab namespace.
pub struct WssConnector {
    netns: String,
    address: SocketAddr,
    url: String,
    tls: tokio_rustls::TlsConnector,
}

type Wss = WsClient<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl WssConnector {
    /// Connects from `netns` to the gateway at `address` (its `url`, `wss://…/<key>`),
    /// trusting the lab CA in `ca`.
    pub fn new(ca: &Path, url: String, netns: &str, address: SocketAddr) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(ca)?)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(WssConnector {
            netns: netns.to_owned(),
            address,
            url,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// Connects and subscribes to new heads.
    async fn subscribe(&self) -> anyhow::Result<Wss> {
        let (netns, address) = (self.netns.clone(), self.address);
        let tcp =
            tokio::task::spawn_blocking(move || super::connect_from(&netns, address)).await??;
        tcp.set_read_timeout(None)?;
        tcp.set_nonblocking(true)?;
        let tls = self
            .tls
            .connect(
                ServerName::from(self.address.ip()),
                tokio::net::TcpStream::from_std(tcp)?,
            )
            .await?;
        let (stream, _) = tokio_tungstenite::client_async(&self.url, tls).await?;
        let mut ws = WsClient::new(stream);
        let subscribed = ws
            .try_call("chain_subscribeNewHeads", serde_json::json!([]))
            .await
            .context("closed before subscribing")?;
        ensure!(subscribed["result"].is_string(), "{subscribed}");
        Ok(ws)
    }

    /// Waits for a head on a subscribed connection.
    async fn first_head(ws: &mut Wss) -> anyhow::Result<()> {
        let head = ws.next_message().await.context("closed before a head")?;
        ensure!(head["method"] == "chain_newHead", "{head}");
        Ok(())
    }

    /// Follows heads (counted in `following` once the first came) until the gateway closes
    /// the connection, then reconnects until a new connection brings a head.
    pub async fn follow_through_close(
        &self,
        following: Arc<AtomicUsize>,
    ) -> anyhow::Result<Reconnect> {
        let mut ws = self.subscribe().await?;
        WssConnector::first_head(&mut ws).await?;
        following.fetch_add(1, Ordering::SeqCst);
        let frame = tokio::time::timeout(Duration::from_secs(60), ws.closed())
            .await
            .context("not closed within 60 s")?;
        let closed_at = Instant::now();
        loop {
            match self.subscribe().await {
                Ok(mut ws) => {
                    let subscribed = closed_at.elapsed();
                    WssConnector::first_head(&mut ws).await?;
                    return Ok(Reconnect {
                        close_code: frame.map(|frame| frame.code),
                        subscribed,
                        first_head: closed_at.elapsed(),
                    });
                }
                Err(error) => {
                    ensure!(
                        closed_at.elapsed() < Duration::from_secs(10),
                        "no way back in 10 s after the close: {error}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}
