//! One check of one node, I/O only: connect, and for a Substrate node ask over that connection
//! for its health, best block, finalized block and genesis hash.
//!
//! Each check opens a fresh connection (no pool): a node that accepts no new connections must
//! fail its check even when an old connection still works.

use std::{net::SocketAddr, time::Duration};

use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Method, Request, StatusCode,
    body::Bytes,
    client::conn::http1::{self, SendRequest},
    header::{CONTENT_TYPE, HOST},
};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, json};
use tokio::net::TcpStream;

use super::judge::{ChainStatus, Observation, ProbeFailure};
use crate::model::HealthCheck;

/// Far more than any answer to the check's calls; a node sending more is not answering them.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

const HEALTH_ID: u64 = 0;
const BEST_HEADER_ID: u64 = 1;
const FINALIZED_HEAD_ID: u64 = 2;
const GENESIS_HASH_ID: u64 = 3;
const FINALIZED_HEADER_ID: u64 = 4;

/// Checks `endpoint` the way `check` says, all of it within `timeout`.
pub async fn probe(endpoint: SocketAddr, check: HealthCheck, timeout: Duration) -> Observation {
    tokio::time::timeout(timeout, probe_without_timeout(endpoint, check))
        .await
        .unwrap_or(Observation::Failed(ProbeFailure::Timeout(timeout)))
}

async fn probe_without_timeout(endpoint: SocketAddr, check: HealthCheck) -> Observation {
    let outcome = match check {
        HealthCheck::Substrate => match connect(endpoint).await {
            Ok(stream) => ask_chain_status(stream, endpoint)
                .await
                .map(Observation::Chain),
            Err(failure) => Err(failure),
        },
        HealthCheck::Tcp => connect(endpoint).await.map(|_| Observation::Connected),
        // Nothing to ask: such a node counts as answering.
        HealthCheck::None => Ok(Observation::Connected),
    };
    outcome.unwrap_or_else(Observation::Failed)
}

async fn connect(endpoint: SocketAddr) -> Result<TcpStream, ProbeFailure> {
    TcpStream::connect(endpoint)
        .await
        .map_err(|error| ProbeFailure::Unreachable(format!("connect: {error}")))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SystemHealth {
    peers: u64,
    is_syncing: bool,
    should_have_peers: bool,
}

#[derive(Deserialize)]
struct Header {
    /// Hex, as Substrate prints block numbers: `"0x1a"`.
    number: String,
}

impl Header {
    fn number(&self) -> Result<u64, ProbeFailure> {
        self.number
            .strip_prefix("0x")
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .ok_or_else(|| {
                ProbeFailure::BadAnswer(format!("block number {:?} is not hex", self.number))
            })
    }
}

async fn ask_chain_status(
    stream: TcpStream,
    endpoint: SocketAddr,
) -> Result<ChainStatus, ProbeFailure> {
    // Small requests and answers: do not let Nagle hold them back.
    let _ = stream.set_nodelay(true);
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| transport_failure("HTTP handshake", &error))?;
    let mut rpc = RpcConnection { sender, endpoint };
    let exchange = async {
        let answers = rpc
            .call_all(&[
                call(HEALTH_ID, "system_health", json!([])),
                call(BEST_HEADER_ID, "chain_getHeader", json!([])),
                call(FINALIZED_HEAD_ID, "chain_getFinalizedHead", json!([])),
                call(GENESIS_HASH_ID, "chain_getBlockHash", json!([0])),
            ])
            .await?;
        let health: SystemHealth = result_of(&answers, HEALTH_ID, "system_health")?;
        let best: Header = result_of(&answers, BEST_HEADER_ID, "chain_getHeader")?;
        let finalized_hash: String =
            result_of(&answers, FINALIZED_HEAD_ID, "chain_getFinalizedHead")?;
        let genesis: String = result_of(&answers, GENESIS_HASH_ID, "chain_getBlockHash")?;
        let finalized_call = call(
            FINALIZED_HEADER_ID,
            "chain_getHeader",
            json!([finalized_hash]),
        );
        let finalized_answer = rpc.post(&finalized_call).await?;
        let finalized: Header = result_of(
            &[finalized_answer],
            FINALIZED_HEADER_ID,
            "chain_getHeader(finalized)",
        )?;
        Ok(ChainStatus {
            genesis,
            best: best.number()?,
            finalized: finalized.number()?,
            peers: health.peers,
            is_syncing: health.is_syncing,
            should_have_peers: health.should_have_peers,
        })
    };
    // The connection does the reading and writing; it only finishes first when it breaks.
    tokio::select! {
        biased;
        status = exchange => status,
        closed = connection => Err(match closed {
            Ok(()) => ProbeFailure::Unreachable("connection closed by the node".to_owned()),
            Err(error) => transport_failure("connection", &error),
        }),
    }
}

fn call(id: u64, method: &str, params: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params })
}

struct RpcConnection {
    sender: SendRequest<Full<Bytes>>,
    endpoint: SocketAddr,
}

impl RpcConnection {
    /// Sends `calls` as one batch; a node that refuses batches (`--rpc-disable-batch-requests`)
    /// gets them one by one.
    async fn call_all(&mut self, calls: &[Value]) -> Result<Vec<Value>, ProbeFailure> {
        if let Value::Array(answers) = self.post(&Value::from(calls)).await? {
            return Ok(answers);
        }
        let mut answers = Vec::with_capacity(calls.len());
        for call in calls {
            answers.push(self.post(call).await?);
        }
        Ok(answers)
    }

    async fn post(&mut self, body: &Value) -> Result<Value, ProbeFailure> {
        let request = Request::builder()
            .method(Method::POST)
            .uri("/")
            .header(HOST, self.endpoint.to_string())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|error| ProbeFailure::Unreachable(format!("building the request: {error}")))?;
        self.sender
            .ready()
            .await
            .map_err(|error| transport_failure("request", &error))?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|error| transport_failure("request", &error))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|error| ProbeFailure::BadAnswer(format!("reading the answer: {error}")))?
            .to_bytes();
        if status != StatusCode::OK {
            let text = String::from_utf8_lossy(&body);
            return Err(ProbeFailure::BadAnswer(format!(
                "HTTP {status}: {text:.200}"
            )));
        }
        serde_json::from_slice(&body)
            .map_err(|error| ProbeFailure::BadAnswer(format!("answer is not JSON: {error}")))
    }
}

/// A broken connection is the node being unreachable; an answer that is not HTTP is a bad
/// answer.
fn transport_failure(step: &str, error: &hyper::Error) -> ProbeFailure {
    let message = match std::error::Error::source(error) {
        Some(source) => format!("{step}: {error}: {source}"),
        None => format!("{step}: {error}"),
    };
    if error.is_parse() || error.is_parse_status() {
        ProbeFailure::BadAnswer(message)
    } else {
        ProbeFailure::Unreachable(message)
    }
}

/// The result of call `id` among `answers`, as a `T`.
fn result_of<T: DeserializeOwned>(
    answers: &[Value],
    id: u64,
    method: &str,
) -> Result<T, ProbeFailure> {
    let bad = |what: String| ProbeFailure::BadAnswer(format!("{method}: {what}"));
    let answer = answers
        .iter()
        .find(|answer| answer["id"] == id)
        .ok_or_else(|| bad("no answer".to_owned()))?;
    if let Some(error) = answer.get("error") {
        return Err(bad(format!("error {error}")));
    }
    let result = answer
        .get("result")
        .ok_or_else(|| bad("no result".to_owned()))?;
    serde_json::from_value(result.clone()).map_err(|error| bad(format!("{error} in {result}")))
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
        net::TcpListener,
    };

    use super::*;

    /// A node that refuses batches, as `--rpc-disable-batch-requests` makes it, and answers
    /// single calls over one keep-alive connection; returns its address.
    async fn start_batchless_node() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut stream = BufReader::new(stream);
            loop {
                let mut content_length = 0;
                loop {
                    let mut line = String::new();
                    if stream.read_line(&mut line).await.unwrap() == 0 {
                        return;
                    }
                    if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        content_length = value.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; content_length];
                stream.read_exact(&mut body).await.unwrap();
                let call: Value = serde_json::from_slice(&body).unwrap();
                let result = match call["method"].as_str() {
                    None => {
                        json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32005, "message": "Batched requests are not supported by this server"}})
                    }
                    Some("system_health") => {
                        json!({"peers": 3, "isSyncing": false, "shouldHavePeers": true})
                    }
                    Some("chain_getHeader") if call["params"] == json!([]) => {
                        json!({"number": "0x64"})
                    }
                    Some("chain_getHeader") => json!({"number": "0x62"}),
                    Some("chain_getFinalizedHead") => json!("0xf1"),
                    Some(_) => json!("0x91b1"),
                };
                let answer = match call["method"] {
                    Value::Null => result,
                    _ => json!({"jsonrpc": "2.0", "id": call["id"], "result": result}),
                }
                .to_string();
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                    answer.len()
                );
                stream.write_all(response.as_bytes()).await.unwrap();
            }
        });
        address
    }

    #[tokio::test]
    async fn a_node_refusing_batches_is_asked_call_by_call() {
        let address = start_batchless_node().await;
        let observation = probe(address, HealthCheck::Substrate, Duration::from_secs(5)).await;
        assert_eq!(
            observation,
            Observation::Chain(ChainStatus {
                genesis: "0x91b1".to_owned(),
                best: 100,
                finalized: 98,
                peers: 3,
                is_syncing: false,
                should_have_peers: true,
            })
        );
    }

    #[test]
    fn results_are_found_by_id_and_errors_named_by_method() {
        let answers = [
            json!({"jsonrpc": "2.0", "id": 1, "result": {"number": "0x1a"}}),
            json!({"jsonrpc": "2.0", "id": 0, "error": {"code": -32601, "message": "Method not found"}}),
            json!({"jsonrpc": "2.0", "id": 2, "result": null}),
        ];
        let header: Header = result_of(&answers, 1, "chain_getHeader").unwrap();
        assert_eq!(header.number().unwrap(), 26);

        let error = result_of::<SystemHealth>(&answers, 0, "system_health").err();
        let Some(ProbeFailure::BadAnswer(message)) = error else {
            panic!("{error:?}")
        };
        assert!(message.starts_with("system_health: error"), "{message}");
        assert!(message.contains("Method not found"), "{message}");

        assert!(result_of::<Header>(&answers, 2, "chain_getHeader").is_err());
        assert!(result_of::<Header>(&answers, 3, "chain_getHeader").is_err());
    }

    #[test]
    fn block_numbers_must_be_hex() {
        let header = |number: &str| Header {
            number: number.to_owned(),
        };
        assert_eq!(header("0x0").number().unwrap(), 0);
        assert!(header("26").number().is_err());
        assert!(header("0xzz").number().is_err());
    }
}
