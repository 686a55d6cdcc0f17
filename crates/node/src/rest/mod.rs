//! The Cumulocity-style REST API for the platform side (§6.2, §11): tenants, users, device
//! registration (new device requests and bootstrap credentials) and trusted certificates.
//!
//! `routes(state)` returns a router with its state applied; the HTTP listener merges it and
//! serves it with `into_make_service_with_connect_info::<SocketAddr>()` so that login
//! throttling sees the client address.
//!
//! Who may do what:
//! - administrators of the `management` tenant: everything, on every tenant;
//! - administrators of another tenant: their own tenant only (403 elsewhere; listings only
//!   ever contain their own tenant's items);
//! - users and devices: `GET /tenant/currentTenant` and `GET /user/currentUser`;
//! - the bootstrap user: `POST /devicecontrol/deviceCredentials` only.
//!
//! fleetmq's own endpoints: `/fleetmq/cluster/...` (the members, draining a node) for
//! management administrators only; `POST /fleetmq/devices/{device}/messages` (a service pushes a
//! message to one device) for administrators of the device's tenant.

pub mod basic;
pub mod certs;
pub mod cluster;
pub mod data;
pub mod devices;
pub mod error;
pub mod inventory;
pub mod model;
pub mod operations;
pub mod push;
pub mod realtime;
pub mod records;
pub mod tenants;
pub mod users;

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::identity::auth::Auth;
pub use basic::Caller;
pub use error::{Api, ApiError};

/// Requests by route group (`tenant`, `user`, `device_requests`, `device_credentials`,
/// `trusted_certificates`).
pub const REQUESTS_METRIC: &str = "fleetmq_rest_requests_total";

/// What the REST handlers need.
pub struct RestState {
    pub auth: Arc<Auth>,
    /// The cluster services, for the operators' endpoints.
    pub cluster: Arc<crate::cluster::Cluster>,
    /// Durable state: the device data of every shard.
    pub durable: fleetmq_cluster::Durable,
    /// Real-time notifications of device data.
    pub realtime: Arc<crate::realtime::Hub>,
}

/// The REST routes, state applied.
pub fn routes(state: Arc<RestState>) -> Router {
    let tenant = Router::new()
        .route("/tenant/tenants", get(tenants::list).post(tenants::create))
        .route(
            "/tenant/tenants/{id}",
            get(tenants::get_one)
                .put(tenants::update)
                .delete(tenants::delete),
        )
        .route("/tenant/currentTenant", get(tenants::current))
        .route_layer(middleware::from_fn(|req: Request, next: Next| {
            counted("tenant", req, next)
        }));
    let certs = Router::new()
        .route(
            "/tenant/tenants/{tenant}/trusted-certificates",
            get(certs::list).post(certs::create),
        )
        .route(
            "/tenant/tenants/{tenant}/trusted-certificates/{fingerprint}",
            get(certs::get_one).put(certs::update).delete(certs::delete),
        )
        .route_layer(middleware::from_fn(|req: Request, next: Next| {
            counted("trusted_certificates", req, next)
        }));
    let user = Router::new()
        .route("/user/{tenant}/users", get(users::list).post(users::create))
        .route(
            "/user/{tenant}/users/{name}",
            get(users::get_one).put(users::update).delete(users::delete),
        )
        .route("/user/currentUser", get(users::current))
        .route_layer(middleware::from_fn(|req: Request, next: Next| {
            counted("user", req, next)
        }));
    let requests = Router::new()
        .route(
            "/devicecontrol/newDeviceRequests",
            get(devices::list).post(devices::create),
        )
        .route(
            "/devicecontrol/newDeviceRequests/{id}",
            get(devices::get_one)
                .put(devices::update)
                .delete(devices::delete),
        )
        .route_layer(middleware::from_fn(|req: Request, next: Next| {
            counted("device_requests", req, next)
        }));
    let credentials = Router::new()
        .route(
            "/devicecontrol/deviceCredentials",
            post(devices::credentials),
        )
        .route_layer(middleware::from_fn(|req: Request, next: Next| {
            counted("device_credentials", req, next)
        }));
    let cluster = Router::new()
        .route("/fleetmq/cluster/nodes", get(cluster::nodes))
        .route("/fleetmq/cluster/nodes/{id}/drain", post(cluster::drain))
        .route("/fleetmq/devices/{device}/messages", post(push::push))
        .route_layer(middleware::from_fn(|req: Request, next: Next| {
            counted("cluster", req, next)
        }));
    use records::{alarms, events, measurements};
    let data = Router::new()
        .route(
            "/inventory/managedObjects",
            get(inventory::list).post(inventory::create),
        )
        .route(
            "/inventory/managedObjects/{id}",
            get(inventory::get_one)
                .put(inventory::update)
                .delete(inventory::delete),
        )
        .route(
            "/inventory/managedObjects/{id}/childDevices",
            get(inventory::children).post(inventory::add_child),
        )
        .route(
            "/identity/externalIds/{type}/{external}",
            get(inventory::external).delete(inventory::delete_external),
        )
        .route(
            "/identity/globalIds/{id}/externalIds",
            get(inventory::externals_of).post(inventory::add_external),
        )
        .route(
            "/measurement/measurements",
            get(measurements::list).post(measurements::create),
        )
        .route(
            "/measurement/measurements/{id}",
            get(measurements::get_one).delete(measurements::delete),
        )
        .route("/event/events", get(events::list).post(events::create))
        .route(
            "/event/events/{id}",
            get(events::get_one)
                .put(events::update)
                .delete(events::delete),
        )
        .route("/alarm/alarms", get(alarms::list).post(alarms::create))
        .route(
            "/alarm/alarms/{id}",
            get(alarms::get_one).put(alarms::update),
        )
        .route(
            "/devicecontrol/operations",
            get(operations::list).post(operations::create),
        )
        .route(
            "/devicecontrol/operations/{id}",
            get(operations::get_one).put(operations::update),
        )
        .route("/notification/realtime", get(realtime::upgrade))
        .route("/cep/realtime", get(realtime::upgrade))
        .route_layer(middleware::from_fn(|req: Request, next: Next| {
            counted("device_data", req, next)
        }));
    Router::new()
        .merge(data)
        .merge(tenant)
        .merge(cluster)
        .merge(certs)
        .merge(user)
        .merge(requests)
        .merge(credentials)
        .with_state(state)
}

/// Collapses repeated `/` and drops a trailing one (`/alarm/alarms//5/` → `/alarm/alarms/5`).
pub async fn normalize_path(mut req: Request) -> Request {
    let path = req.uri().path();
    if path.len() > 1 && (path.ends_with('/') || path.contains("//")) {
        let mut clean = String::with_capacity(path.len());
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            clean.push('/');
            clean.push_str(seg);
        }
        if clean.is_empty() {
            clean.push('/');
        }
        if let Some(q) = req.uri().query() {
            clean.push('?');
            clean.push_str(q);
        }
        let mut parts = req.uri().clone().into_parts();
        if let Ok(pq) = clean.parse() {
            parts.path_and_query = Some(pq);
            if let Ok(uri) = axum::http::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
    req
}

async fn counted(group: &'static str, req: Request, next: Next) -> Response {
    metrics::counter!(REQUESTS_METRIC, "route_group" => group).increment(1);
    next.run(req).await
}

/// Shared state as handlers receive it.
pub type St = axum::extract::State<Arc<RestState>>;

/// A JSON response with a Cumulocity media type (`tenant`, `userCollection`, ...).
pub fn json<T: Serialize>(status: StatusCode, media: &str, body: &T) -> Response {
    let bytes = match serde_json::to_vec(body) {
        Ok(b) => b,
        Err(_) => return ApiError::internal("response encoding failed").into_response(),
    };
    let mut resp = (status, bytes).into_response();
    let ct = format!("application/vnd.com.nsn.cumulocity.{media}+json;charset=UTF-8;ver=0.9");
    if let Ok(v) = HeaderValue::from_str(&ct) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

/// 204 No Content.
pub fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

/// Parses a JSON request body whatever its Content-Type (Cumulocity clients send
/// `application/vnd.com.nsn.cumulocity.<type>+json`).
pub fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("a JSON request body is required"));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        // serde's message names the field and the expected type; it can quote a rejected
        // value, which goes back only to the caller who sent it and is never logged.
        ApiError::bad_request(format!("invalid JSON body: {e}"))
    })
}

/// A mandatory, non-empty string field.
pub fn required(v: Option<String>, field: &str) -> Result<String, ApiError> {
    match v {
        Some(s) if !s.trim().is_empty() => Ok(s),
        _ => Err(ApiError::missing(field)),
    }
}

/// Path parameters, with a JSON 400 when they cannot be decoded.
pub struct P<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for P<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(t)| P(t))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// Paging query parameters: `pageSize` (default 5, at most 2000) and `currentPage` (from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub size: usize,
    pub current: usize,
}

pub const DEFAULT_PAGE_SIZE: usize = 5;
pub const MAX_PAGE_SIZE: usize = 2000;

impl Page {
    /// From query parameters; a value that is not a positive number is a 400.
    pub fn from_query(q: &HashMap<String, String>) -> Result<Page, ApiError> {
        let num = |name: &str, default: usize| -> Result<usize, ApiError> {
            match q.get(name) {
                None => Ok(default),
                Some(v) => match v.trim().parse::<usize>() {
                    Ok(n) if n >= 1 => Ok(n),
                    _ => Err(ApiError::bad_request(format!(
                        "{name} must be a positive integer"
                    ))),
                },
            }
        };
        Ok(Page {
            size: num("pageSize", DEFAULT_PAGE_SIZE)?.min(MAX_PAGE_SIZE),
            current: num("currentPage", 1)?,
        })
    }

    /// A collection response: `{self, <key>: [...], statistics, next?, prev?}` for `items`
    /// (already ordered) at `url` (absolute, without query).
    pub fn collection<T: Serialize>(
        &self,
        media: &str,
        key: &str,
        url: &str,
        items: Vec<T>,
    ) -> Response {
        let total = items.len();
        let start = (self.current - 1).saturating_mul(self.size).min(total);
        let end = start.saturating_add(self.size).min(total);
        let page: Vec<T> = items.into_iter().skip(start).take(end - start).collect();
        let sep = if url.contains('?') { '&' } else { '?' };
        let link = |n: usize| format!("{url}{sep}pageSize={}&currentPage={n}", self.size);
        let mut body = serde_json::Map::new();
        body.insert("self".into(), link(self.current).into());
        body.insert(
            key.into(),
            serde_json::to_value(page).unwrap_or_else(|_| serde_json::Value::Array(vec![])),
        );
        body.insert(
            "statistics".into(),
            serde_json::json!({ "pageSize": self.size, "currentPage": self.current }),
        );
        if end < total {
            body.insert("next".into(), link(self.current + 1).into());
        }
        if self.current > 1 {
            body.insert("prev".into(), link(self.current - 1).into());
        }
        json(StatusCode::OK, media, &serde_json::Value::Object(body))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Page {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(q) = Query::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        Page::from_query(&q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn paging_params() {
        assert_eq!(
            Page::from_query(&q(&[])).unwrap(),
            Page {
                size: 5,
                current: 1
            }
        );
        assert_eq!(
            Page::from_query(&q(&[("pageSize", "5000"), ("currentPage", "3")])).unwrap(),
            Page {
                size: 2000,
                current: 3
            }
        );
        for bad in ["0", "-1", "x", ""] {
            let e = Page::from_query(&q(&[("pageSize", bad)])).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(Page::from_query(&q(&[("currentPage", bad)])).is_err());
        }
    }

    #[test]
    fn bodies() {
        #[derive(serde::Deserialize)]
        struct B {
            #[allow(dead_code)]
            a: Option<u32>,
        }
        assert_eq!(
            body::<B>(b"").err().unwrap().status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            body::<B>(b"{").err().unwrap().status,
            StatusCode::BAD_REQUEST
        );
        assert!(body::<B>(br#"{"a":1}"#).is_ok());
        assert_eq!(
            required(Some(" ".into()), "x").unwrap_err().message,
            "missing mandatory field 'x'"
        );
        assert_eq!(required(Some("v".into()), "x").unwrap(), "v");
    }
}
