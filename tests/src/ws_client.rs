//! A minimal JSON-RPC WebSocket client for tests: calls matched to their answers by id,
//! notifications kept apart, and the close frame a server ends with. Over plain TCP to a
//! sim-node, or over any stream (a TLS connection to the gateway).

use std::{collections::VecDeque, time::Duration};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{Message, protocol::CloseFrame},
};

/// How long a test waits for any one message.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub struct WsClient<S> {
    stream: WebSocketStream<S>,
    next_id: u64,
    notifications: VecDeque<Value>,
    /// The close frame, once the server closed.
    closed: Option<Option<CloseFrame>>,
}

impl WsClient<MaybeTlsStream<tokio::net::TcpStream>> {
    /// Connects to `url` (`ws://…`).
    pub async fn connect(url: &str) -> Self {
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .unwrap_or_else(|error| panic!("WebSocket to {url}: {error}"));
        WsClient::new(stream)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsClient<S> {
    pub fn new(stream: WebSocketStream<S>) -> Self {
        WsClient {
            stream,
            next_id: 0,
            notifications: VecDeque::new(),
            closed: None,
        }
    }

    /// The next text message as JSON; None once the server closed.
    pub async fn next_message(&mut self) -> Option<Value> {
        if self.closed.is_some() {
            return None;
        }
        loop {
            let message = tokio::time::timeout(PATIENCE, self.stream.next())
                .await
                .expect("a WebSocket message in time");
            match message {
                Some(Ok(Message::Text(text))) => {
                    return Some(serde_json::from_str(&text).expect("WebSocket JSON"));
                }
                Some(Ok(Message::Close(frame))) => {
                    self.closed = Some(frame);
                    return None;
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => {
                    self.closed = Some(None);
                    return None;
                }
            }
        }
    }

    /// Sends `text` as it is.
    pub async fn send_text(&mut self, text: String) {
        self.stream
            .send(Message::text(text))
            .await
            .expect("WebSocket send");
    }

    /// Calls `method` and waits for its answer (the whole JSON-RPC response); notifications
    /// that come first are kept for [`WsClient::notification`].
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.try_call(method, params)
            .await
            .unwrap_or_else(|| panic!("the server closed before answering {method}"))
    }

    /// [`WsClient::call`], None when the server closes first.
    pub async fn try_call(&mut self, method: &str, params: Value) -> Option<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let body = json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
        if self
            .stream
            .send(Message::text(body.to_string()))
            .await
            .is_err()
        {
            self.closed.get_or_insert(None);
            return None;
        }
        self.answer(id).await
    }

    /// The answer with `id`, keeping notifications that come first.
    pub async fn answer(&mut self, id: u64) -> Option<Value> {
        loop {
            let message = self.next_message().await?;
            if message["id"] == json!(id) {
                return Some(message);
            }
            self.notifications.push_back(message);
        }
    }

    /// The next notification.
    pub async fn notification(&mut self) -> Value {
        match self.notifications.pop_front() {
            Some(notification) => notification,
            None => self
                .next_message()
                .await
                .expect("notification before close"),
        }
    }

    /// Reads until the server closes; its close frame, if it sent one.
    pub async fn closed(&mut self) -> Option<CloseFrame> {
        while self.next_message().await.is_some() {}
        self.closed.clone().flatten()
    }
}
