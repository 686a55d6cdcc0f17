//! Every REST failure as one Cumulocity-style JSON error:
//! `{"error": "<api>/<code>", "message": "...", "info": "see docs/security.md"}`.
//!
//! Each error response counts in `fleetmq_rest_errors_total{status}`. Messages are written for
//! the caller; they never contain a password, a hash or an Authorization header.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::identity::auth::AuthError;
use crate::identity::directory::DirError;

/// Error responses by status code.
pub const ERRORS_METRIC: &str = "fleetmq_rest_errors_total";

const INFO: &str = "see docs/security.md";
const CONTENT_TYPE: &str = "application/vnd.com.nsn.cumulocity.error+json;charset=UTF-8;ver=0.9";

/// The API an error belongs to (the part before the `/` of `error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Tenant,
    User,
    DeviceControl,
    General,
    Security,
    Cluster,
    Inventory,
    Identity,
    Measurement,
    Event,
    Alarm,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Tenant => "tenant",
            Api::User => "user",
            Api::DeviceControl => "devicecontrol",
            Api::General => "general",
            Api::Security => "security",
            Api::Cluster => "cluster",
            Api::Inventory => "inventory",
            Api::Identity => "identity",
            Api::Measurement => "measurement",
            Api::Event => "event",
            Api::Alarm => "alarm",
        }
    }
}

/// A REST error: status, `<api>/<code>` and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub api: Api,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, api: Api, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            api,
            message: message.into(),
        }
    }

    /// 400 `general/Bad Request`.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, Api::General, message)
    }

    /// 400 for a mandatory field that is absent (or null/empty).
    pub fn missing(field: &str) -> ApiError {
        ApiError::bad_request(format!("missing mandatory field '{field}'"))
    }

    /// 401 `security/Unauthorized`.
    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            Api::Security,
            "authentication required: invalid or missing credentials",
        )
    }

    /// 403 `security/Forbidden`.
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, Api::Security, message)
    }

    /// 404 `<api>/Not Found`.
    pub fn not_found(api: Api, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, api, message)
    }

    /// The answer for a path or method the API does not have (the router's fallback).
    pub fn no_such_resource() -> ApiError {
        ApiError::not_found(Api::General, "no such resource or method")
    }

    /// 409 `<api>/Duplicate`.
    pub fn duplicate(api: Api, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, api, message)
    }

    /// 422 `<api>/Unprocessable Entity`.
    pub fn unprocessable(api: Api, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, api, message)
    }

    /// 429 `security/Too Many Requests`.
    pub fn throttled() -> ApiError {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            Api::Security,
            "too many failed logins; try again later",
        )
    }

    /// 503 `general/Service Unavailable`.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, Api::General, message)
    }

    /// 500 `general/Internal Server Error`.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, Api::General, message)
    }

    /// A directory error in the context of `api`; `what` names the object ("tenant t123").
    pub fn dir(api: Api, what: &str, e: DirError) -> ApiError {
        match e {
            DirError::Exists => ApiError::duplicate(api, format!("{what} already exists")),
            DirError::NotFound => ApiError::not_found(api, format!("{what} not found")),
            DirError::Invalid(m) => ApiError::unprocessable(api, m),
            DirError::Storage(e) => {
                tracing::warn!(error = %e, "REST: directory storage unavailable");
                ApiError::unavailable("storage is unavailable; retry later")
            }
            DirError::Encoding(e) => {
                tracing::error!(error = %e, "REST: directory record encoding failed");
                ApiError::internal("internal error")
            }
            DirError::Hash(e) => {
                tracing::error!(error = %e, "REST: password hashing failed");
                ApiError::internal("internal error")
            }
        }
    }

    /// A failed login.
    pub fn auth(e: AuthError) -> ApiError {
        match e {
            AuthError::BadCredentials | AuthError::NotAuthorized(_) => ApiError::unauthorized(),
            AuthError::Throttled => ApiError::throttled(),
            AuthError::Unavailable => ApiError::unavailable("authentication is unavailable"),
        }
    }

    /// `<api>/<code>`, e.g. `tenant/Duplicate`.
    pub fn error_code(&self) -> String {
        let code = match self.status {
            StatusCode::BAD_REQUEST => "Bad Request",
            StatusCode::UNAUTHORIZED => "Unauthorized",
            StatusCode::FORBIDDEN => "Forbidden",
            StatusCode::NOT_FOUND => "Not Found",
            StatusCode::CONFLICT => "Duplicate",
            StatusCode::UNPROCESSABLE_ENTITY => "Unprocessable Entity",
            StatusCode::TOO_MANY_REQUESTS => "Too Many Requests",
            StatusCode::SERVICE_UNAVAILABLE => "Service Unavailable",
            s => s.canonical_reason().unwrap_or("Error"),
        };
        format!("{}/{}", self.api.as_str(), code)
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": self.error_code(),
            "message": self.message,
            "info": INFO,
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.error_code(),
            self.message
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!(ERRORS_METRIC, "status" => self.status.as_str().to_string()).increment(1);
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut resp = (self.status, body).into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"fleetmq\""),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(
            ApiError::missing("company").error_code(),
            "general/Bad Request"
        );
        assert_eq!(
            ApiError::missing("company").message,
            "missing mandatory field 'company'"
        );
        assert_eq!(
            ApiError::unauthorized().error_code(),
            "security/Unauthorized"
        );
        assert_eq!(ApiError::forbidden("x").error_code(), "security/Forbidden");
        assert_eq!(
            ApiError::throttled().error_code(),
            "security/Too Many Requests"
        );
        assert_eq!(
            ApiError::dir(Api::Tenant, "tenant x", DirError::Exists).error_code(),
            "tenant/Duplicate"
        );
        let nf = ApiError::dir(Api::User, "user x", DirError::NotFound);
        assert_eq!(
            (nf.status, nf.error_code().as_str()),
            (StatusCode::NOT_FOUND, "user/Not Found")
        );
        let inv = ApiError::dir(
            Api::DeviceControl,
            "request",
            DirError::Invalid("bad id".into()),
        );
        assert_eq!(inv.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(inv.error_code(), "devicecontrol/Unprocessable Entity");
        assert_eq!(inv.message, "bad id");
        let hash = ApiError::dir(Api::User, "user", DirError::Hash("secret detail".into()));
        assert_eq!(hash.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!hash.message.contains("secret"));
    }

    #[test]
    fn auth_errors() {
        assert_eq!(
            ApiError::auth(AuthError::BadCredentials).status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            ApiError::auth(AuthError::NotAuthorized("x")).status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            ApiError::auth(AuthError::Throttled).status,
            StatusCode::TOO_MANY_REQUESTS
        );
        let u = ApiError::auth(AuthError::Unavailable);
        assert_eq!(
            (u.status, u.error_code().as_str()),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "general/Service Unavailable"
            )
        );
    }

    #[test]
    fn response_shape() {
        let resp = ApiError::unauthorized().into_response();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            resp.headers()[header::WWW_AUTHENTICATE],
            "Basic realm=\"fleetmq\""
        );
        assert!(resp.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/vnd.com.nsn.cumulocity.error+json"));
        let resp = ApiError::forbidden("no").into_response();
        assert!(resp.headers().get(header::WWW_AUTHENTICATE).is_none());
        let body = ApiError::duplicate(Api::Tenant, "dup").body();
        assert_eq!(body["error"], "tenant/Duplicate");
        assert_eq!(body["message"], "dup");
        assert_eq!(body["info"], "see docs/security.md");
    }
}
