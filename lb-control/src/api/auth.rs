//! Authentication of the `/v1` routes: the admin token, or a join token of narrow scope.
//!
//! The admin token is compared through its SHA-256 in constant time, so neither the
//! comparison's timing nor the token's length leaks. A join token is looked up in the store
//! ([`JoinTokens`]); it reaches only the routes of [`NODE_ROUTES`], and there only its own
//! backends (its request's source address, in the services it names): every handler of those
//! routes asks the [`Caller`]. Tokens are never logged.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use axum::{
    extract::{ConnectInfo, MatchedPath, Request, State},
    http::{Method, header},
    middleware::Next,
    response::Response,
};

use super::{
    error::{ApiError, ApiResult},
    model::ErrorCode,
    run_blocking,
};
use crate::{
    backends::Requester,
    keys::{digest, digests_equal},
    model::{Backend, JoinTokenRecord, ServiceKey},
    tokens::{self, JoinTokens},
};

/// What a join token may ask for besides nothing: the scope, as data. The handlers of these
/// routes hold a node to its own backends.
const NODE_ROUTES: &[(Method, &str)] = &[
    (Method::POST, "/v1/join"),
    (Method::GET, "/v1/backends"),
    (Method::GET, "/v1/backends/{id}"),
    (Method::POST, "/v1/backends/{id}/drain"),
    (Method::GET, "/v1/backends/{id}/connections"),
    (Method::POST, "/v1/backends/{id}/close-clients"),
    (Method::DELETE, "/v1/backends/{id}"),
];

/// How `/v1` requests are told apart: the admin token's SHA-256 and the join tokens.
#[derive(Clone)]
pub struct Credentials {
    admin: Arc<[u8; 32]>,
    tokens: JoinTokens,
}

impl Credentials {
    pub fn new(admin_token: &str, tokens: JoinTokens) -> Self {
        Credentials {
            admin: Arc::new(digest(admin_token)),
            tokens,
        }
    }
}

/// Who sent a `/v1` request; every handler can take it as `Extension<Caller>`.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The admin token: everything.
    Operator,
    /// A join token, from `address`.
    Node {
        token: Arc<JoinTokenRecord>,
        address: IpAddr,
    },
}

impl Caller {
    /// Who the event log names for a change this caller makes.
    pub fn requester(&self) -> Requester {
        match self {
            Caller::Operator => Requester::Operator,
            Caller::Node { token, .. } => {
                Requester::JoinToken(tokens::describe(token.id, &token.name))
            }
        }
    }

    /// Whether the caller may join `service`; a 403 naming what it may join otherwise.
    pub fn may_join(&self, service: ServiceKey) -> ApiResult<()> {
        match self {
            Caller::Operator => Ok(()),
            Caller::Node { token, .. } if token.services.contains(&service) => Ok(()),
            Caller::Node { token, .. } => Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "{} may not join {service}: it may join {}",
                    tokens::describe(token.id, &token.name),
                    tokens::list(&token.services)
                ),
            )),
        }
    }

    /// Whether `backend` (of the service named `service`) is the caller's to see and change:
    /// any for the operator; for a node, one at its own address in a service of its token.
    pub fn owns(&self, service: &str, backend: &Backend) -> bool {
        match self {
            Caller::Operator => true,
            Caller::Node { token, address } => {
                backend.def.address.ip() == *address
                    && token.services.iter().any(|key| key.to_string() == service)
            }
        }
    }

    /// [`Caller::owns`], as a 403 naming the backend when it does not.
    pub fn must_own(&self, service: &str, backend: &Backend) -> ApiResult<()> {
        match self {
            Caller::Node { token, address } if !self.owns(service, backend) => Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "{} from {address} may not touch backend {} ({} of {service}): only its \
                         own address's backends of {}",
                    tokens::describe(token.id, &token.name),
                    backend.id,
                    backend.def.address,
                    tokens::list(&token.services)
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// Tells the caller by its bearer token, refuses a join token outside [`NODE_ROUTES`], and
/// hands the [`Caller`] to the handler.
pub async fn authenticate(
    State(credentials): State<Credentials>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(|token| token.trim().to_owned());
    let Some(presented) = presented else {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "missing bearer token: send `Authorization: Bearer <token>` (the token is \
             LB_ADMIN_TOKEN, the config's admin.token or admin.token_file, or \
             <state_dir>/admin.token; or a join token)",
        ));
    };
    let caller = if digests_equal(&digest(&presented), &credentials.admin) {
        Caller::Operator
    } else {
        let tokens = credentials.tokens.clone();
        let token = run_blocking(move || Ok(tokens.find(&presented)?)).await?;
        let Some(token) = token else {
            return Err(ApiError::new(ErrorCode::Unauthorized, "wrong bearer token"));
        };
        if token.revoked.is_some() {
            return Err(ApiError::new(
                ErrorCode::Unauthorized,
                format!(
                    "{} is revoked: ask the operator for a new one",
                    tokens::describe(token.id, &token.name)
                ),
            ));
        }
        let address = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(peer)| peer.ip().to_canonical())
            .ok_or_else(|| ApiError::internal("the connection's source address is unknown"))?;
        let route = request
            .extensions()
            .get::<MatchedPath>()
            .map(MatchedPath::as_str)
            .unwrap_or_default();
        if !NODE_ROUTES
            .iter()
            .any(|(method, path)| method == request.method() && *path == route)
        {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "{} may not {} {route}: a join token may only join its own address to {} \
                     (POST /v1/join), and see, drain and remove that backend",
                    tokens::describe(token.id, &token.name),
                    request.method(),
                    tokens::list(&token.services)
                ),
            ));
        }
        Caller::Node {
            token: Arc::new(token),
            address,
        }
    };
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}
