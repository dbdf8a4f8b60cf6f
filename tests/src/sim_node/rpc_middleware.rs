//! JSON-RPC middleware: counts every call that reaches the node and the calls it is answering
//! at once, then applies the `unresponsive` and `slow` faults before the call is answered.
//!
//! It runs for HTTP and WebSocket alike, and for `/health` (proxied to `system_health`), so a
//! fault looks the same on every path and the counts show exactly what reached the node.

use std::future::Future;
use std::sync::Arc;

use jsonrpsee::core::middleware::{Batch, BatchEntry, Notification, RpcServiceT};
use jsonrpsee::server::MethodResponse;
use jsonrpsee::types::Request;

use super::state::NodeState;

#[derive(Clone)]
pub struct FaultInjection<S> {
    inner: S,
    node: Arc<NodeState>,
}

impl<S> FaultInjection<S> {
    pub fn new(inner: S, node: Arc<NodeState>) -> Self {
        Self { inner, node }
    }
}

impl<S> RpcServiceT for FaultInjection<S>
where
    S: RpcServiceT<
            MethodResponse = MethodResponse,
            BatchResponse = MethodResponse,
            NotificationResponse = MethodResponse,
        > + Send
        + Sync
        + Clone
        + 'static,
{
    type MethodResponse = MethodResponse;
    type BatchResponse = MethodResponse;
    type NotificationResponse = MethodResponse;

    fn call<'a>(&self, request: Request<'a>) -> impl Future<Output = MethodResponse> + Send + 'a {
        let inner = self.inner.clone();
        let node = self.node.clone();
        async move {
            node.record_request(request.method_name());
            let _in_flight = node.start_call(request.method_name());
            delay_by_faults(&node).await;
            inner.call(request).await
        }
    }

    fn batch<'a>(&self, batch: Batch<'a>) -> impl Future<Output = MethodResponse> + Send + 'a {
        let inner = self.inner.clone();
        let node = self.node.clone();
        async move {
            for entry in batch.iter().flatten() {
                let method = match entry {
                    BatchEntry::Call(request) => request.method_name(),
                    BatchEntry::Notification(notification) => notification.method_name(),
                };
                node.record_request(method);
            }
            // One delay for the whole batch: the batch is one HTTP request / WS message.
            let _in_flight = node.start_call("batch");
            delay_by_faults(&node).await;
            inner.batch(batch).await
        }
    }

    fn notification<'a>(
        &self,
        notification: Notification<'a>,
    ) -> impl Future<Output = MethodResponse> + Send + 'a {
        let inner = self.inner.clone();
        let node = self.node.clone();
        async move {
            node.record_request(notification.method_name());
            delay_by_faults(&node).await;
            inner.notification(notification).await
        }
    }
}

/// Holds a call while the node is unresponsive (answering it if the fault clears before the
/// client gives up), then waits out the `slow` delay.
async fn delay_by_faults(node: &NodeState) {
    let mut faults = node.subscribe_faults();
    let node_alive = faults.wait_for(|faults| !faults.unresponsive).await.is_ok();
    if !node_alive {
        // The node is shutting down; its connections are about to be dropped.
        std::future::pending::<()>().await;
    }
    if let Some(delay) = node.faults().slow {
        tokio::time::sleep(delay).await;
    }
}
