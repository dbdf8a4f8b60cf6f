//! A typed client of the admin API, for the CLI and the tests. It speaks the wire types of
//! [`crate::api::model`], the same the server answers with.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use reqwest::{Method, StatusCode};
use serde::{Serialize, de::DeserializeOwned};
use thiserror::Error;

use crate::{
    api::model::{
        BackendConnections, BackendInfo, BlockInfo, CapsChange, ClosedClients, ClusterHealth,
        ErrorBody, ErrorDetail, EventInfo, GatewayInfo, HaStatus, HandoverInfo, HandoverRequest,
        JoinRequest, KeyCreated, KeyInfo, LimitChange, NewBackend, NewBlock, NewKey, NewService,
        NewToken, RoleChange, ServiceInfo, StatsReport, TierChange, TokenCreated, TokenInfo,
        WeightChange,
    },
    ha::Role,
    model::{AdminState, ApiKeyId, Backend, BackendId, JoinTokenId, Service, ServiceId, Tier},
};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot connect: is lb-control running? (admin API at {url})")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The API's own error answer.
    #[error("{}", describe_error(.detail))]
    Api {
        status: StatusCode,
        detail: ErrorDetail,
    },
    #[error("admin API at {url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("admin API at {url}: unexpected answer {status}: {body}")]
    Unexpected {
        url: String,
        status: StatusCode,
        body: String,
    },
}

fn describe_error(detail: &ErrorDetail) -> String {
    match &detail.field {
        // Messages about a field already start with its name when serde wrote them.
        Some(field) if !detail.message.contains(field.as_str()) => {
            format!("{field}: {}", detail.message)
        }
        _ => detail.message.clone(),
    }
}

/// `http://` + the address the API listens on; a wildcard listen address is reached on
/// loopback.
pub fn admin_url(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, listen.port()))
}

#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl AdminClient {
    /// `base` is e.g. `http://127.0.0.1:9900`.
    pub fn new(base: &str, token: &str) -> Self {
        AdminClient {
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn services(&self) -> Result<Vec<ServiceInfo>, ClientError> {
        self.call(Method::GET, "/v1/services", None::<&()>).await
    }

    pub async fn service(&self, id: ServiceId) -> Result<ServiceInfo, ClientError> {
        self.call(Method::GET, &format!("/v1/services/{id}"), None::<&()>)
            .await
    }

    pub async fn add_service(&self, new: &NewService) -> Result<ServiceInfo, ClientError> {
        self.call(Method::POST, "/v1/services", Some(new)).await
    }

    pub async fn remove_service(&self, id: ServiceId) -> Result<Service, ClientError> {
        self.call(Method::DELETE, &format!("/v1/services/{id}"), None::<&()>)
            .await
    }

    pub async fn backends(
        &self,
        service: Option<ServiceId>,
    ) -> Result<Vec<BackendInfo>, ClientError> {
        let path = match service {
            Some(service) => format!("/v1/backends?service={service}"),
            None => "/v1/backends".to_owned(),
        };
        self.call(Method::GET, &path, None::<&()>).await
    }

    pub async fn backend(&self, id: BackendId) -> Result<BackendInfo, ClientError> {
        self.call(Method::GET, &format!("/v1/backends/{id}"), None::<&()>)
            .await
    }

    pub async fn add_backend(&self, new: &NewBackend) -> Result<BackendInfo, ClientError> {
        self.call(Method::POST, "/v1/backends", Some(new)).await
    }

    pub async fn remove_backend(&self, id: BackendId) -> Result<Backend, ClientError> {
        self.call(Method::DELETE, &format!("/v1/backends/{id}"), None::<&()>)
            .await
    }

    /// What a backend still carries: open kernel flows and gateway WebSocket clients.
    pub async fn backend_connections(
        &self,
        id: BackendId,
    ) -> Result<BackendConnections, ClientError> {
        self.call(
            Method::GET,
            &format!("/v1/backends/{id}/connections"),
            None::<&()>,
        )
        .await
    }

    /// Closes the gateway's WebSocket clients of a backend's node (1012: reconnect).
    pub async fn close_backend_clients(&self, id: BackendId) -> Result<ClosedClients, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/backends/{id}/close-clients"),
            None::<&()>,
        )
        .await
    }

    /// Drains, enables, disables a backend, or puts it back through the join gate.
    pub async fn set_admin(
        &self,
        id: BackendId,
        admin: AdminState,
    ) -> Result<BackendInfo, ClientError> {
        let action = match admin {
            AdminState::Enabled => "enable",
            AdminState::Draining => "drain",
            AdminState::Disabled => "disable",
            AdminState::Joining => "rejoin",
        };
        self.call(
            Method::POST,
            &format!("/v1/backends/{id}/{action}"),
            None::<&()>,
        )
        .await
    }

    pub async fn set_weight(&self, id: BackendId, weight: u32) -> Result<BackendInfo, ClientError> {
        self.call(
            Method::PUT,
            &format!("/v1/backends/{id}/weight"),
            Some(&WeightChange { weight }),
        )
        .await
    }

    pub async fn set_tier(&self, id: BackendId, tier: Tier) -> Result<BackendInfo, ClientError> {
        self.call(
            Method::PUT,
            &format!("/v1/backends/{id}/tier"),
            Some(&TierChange { tier }),
        )
        .await
    }

    pub async fn keys(&self) -> Result<Vec<KeyInfo>, ClientError> {
        self.call(Method::GET, "/v1/keys", None::<&()>).await
    }

    pub async fn create_key(&self, new: &NewKey) -> Result<KeyCreated, ClientError> {
        self.call(Method::POST, "/v1/keys", Some(new)).await
    }

    pub async fn revoke_key(&self, id: ApiKeyId) -> Result<KeyInfo, ClientError> {
        self.call(Method::DELETE, &format!("/v1/keys/{id}"), None::<&()>)
            .await
    }

    pub async fn set_key_limit(
        &self,
        id: ApiKeyId,
        change: &LimitChange,
    ) -> Result<KeyInfo, ClientError> {
        self.call(Method::PUT, &format!("/v1/keys/{id}/limit"), Some(change))
            .await
    }

    pub async fn set_key_caps(
        &self,
        id: ApiKeyId,
        change: &CapsChange,
    ) -> Result<KeyInfo, ClientError> {
        self.call(Method::PUT, &format!("/v1/keys/{id}/caps"), Some(change))
            .await
    }

    pub async fn tokens(&self) -> Result<Vec<TokenInfo>, ClientError> {
        self.call(Method::GET, "/v1/tokens", None::<&()>).await
    }

    pub async fn create_token(&self, new: &NewToken) -> Result<TokenCreated, ClientError> {
        self.call(Method::POST, "/v1/tokens", Some(new)).await
    }

    pub async fn revoke_token(&self, id: JoinTokenId) -> Result<TokenInfo, ClientError> {
        self.call(Method::DELETE, &format!("/v1/tokens/{id}"), None::<&()>)
            .await
    }

    /// Adds this host's own address as a joining backend (a join token's one change).
    pub async fn join(&self, request: &JoinRequest) -> Result<BackendInfo, ClientError> {
        self.call(Method::POST, "/v1/join", Some(request)).await
    }

    /// Every blocked prefix with its expiry.
    pub async fn blocklist(&self) -> Result<Vec<BlockInfo>, ClientError> {
        self.call(Method::GET, "/v1/blocklist", None::<&()>).await
    }

    pub async fn block(&self, new: &NewBlock) -> Result<BlockInfo, ClientError> {
        self.call(Method::POST, "/v1/blocklist", Some(new)).await
    }

    /// Unblocks exactly `prefix`; the entry as it was.
    pub async fn unblock(&self, prefix: IpNet) -> Result<BlockInfo, ClientError> {
        // The prefix is one path segment: its `/` (and an IPv6 address's `:`) URL-encoded.
        let segment: String =
            form_urlencoded::byte_serialize(prefix.to_string().as_bytes()).collect();
        self.call(
            Method::DELETE,
            &format!("/v1/blocklist/{segment}"),
            None::<&()>,
        )
        .await
    }

    pub async fn stats(&self) -> Result<StatsReport, ClientError> {
        self.call(Method::GET, "/v1/stats", None::<&()>).await
    }

    pub async fn health(&self) -> Result<ClusterHealth, ClientError> {
        self.call(Method::GET, "/v1/health", None::<&()>).await
    }

    /// Events after `after` (the newest when None), oldest first.
    pub async fn events(
        &self,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<EventInfo>, ClientError> {
        let path = match after {
            Some(after) => format!("/v1/events?after={after}&limit={limit}"),
            None => format!("/v1/events?limit={limit}"),
        };
        self.call(Method::GET, &path, None::<&()>).await
    }

    /// This lb-control's role in its HA pair.
    pub async fn gateway(&self) -> Result<GatewayInfo, ClientError> {
        self.call(Method::GET, "/v1/gateway", None::<&()>).await
    }

    pub async fn ha_status(&self) -> Result<HaStatus, ClientError> {
        self.call(Method::GET, "/v1/ha", None::<&()>).await
    }

    /// Tells the daemon the role keepalived gave this host.
    pub async fn set_role(&self, role: Role) -> Result<HaStatus, ClientError> {
        self.call(Method::POST, "/v1/ha/role", Some(&RoleChange { role }))
            .await
    }

    /// Starts a planned handover to the other host of the pair (see `ha::handover`).
    pub async fn hand_over(&self, request: &HandoverRequest) -> Result<HandoverInfo, ClientError> {
        self.call(Method::POST, "/v1/ha/handover", Some(request))
            .await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics_text(&self) -> Result<String, ClientError> {
        let url = self.url("/metrics");
        let response = self.send(self.http.get(&url), &url).await?;
        response
            .text()
            .await
            .map_err(|source| ClientError::Http { url, source })
    }

    /// The OpenAPI document.
    pub async fn openapi(&self) -> Result<serde_json::Value, ClientError> {
        self.call(Method::GET, "/openapi.json", None::<&()>).await
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let url = self.url(path);
        let mut request = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = self.send(request, &url).await?;
        let status = response.status();
        let text = response.text().await.map_err(|source| ClientError::Http {
            url: url.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|error| ClientError::Unexpected {
            url,
            status,
            body: format!("{error}: {text}"),
        })
    }

    /// Sends a request; an error answer becomes [`ClientError::Api`].
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let response = request.send().await.map_err(|source| {
            if source.is_connect() {
                ClientError::Unreachable {
                    url: self.base.clone(),
                    source,
                }
            } else {
                ClientError::Http {
                    url: url.to_owned(),
                    source,
                }
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&body) {
            Ok(error) => Err(ClientError::Api {
                status,
                detail: error.error,
            }),
            Err(_) => Err(ClientError::Unexpected {
                url: url.to_owned(),
                status,
                body,
            }),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}
