//! Authentication of REST calls and the per-role rules of what a caller may do.
//!
//! `Authorization: Basic base64(<tenant id or domain>/<user>:<password>)` goes through the
//! same login as MQTT (`Auth::login_password`, throttled per client address);
//! `Authorization: Bearer <device token>` is checked with `identity::token::verify`. Neither
//! the header nor the password is ever logged.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use base64::Engine;

use super::error::ApiError;
use super::RestState;
use crate::identity::auth::Identity;
use crate::identity::records::{Role, TenantRec, MANAGEMENT};
use crate::identity::token;

/// Credentials found in an `Authorization` header.
#[derive(PartialEq, Eq)]
pub enum Credentials {
    /// `<tenant>/<user>` and the password bytes.
    Basic {
        username: String,
        password: Vec<u8>,
    },
    Bearer(String),
}

impl std::fmt::Debug for Credentials {
    // Never print a secret, not even in a debug log or a failed assertion.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Basic { username, .. } => {
                write!(
                    f,
                    "Basic {{ username: {username:?}, password: <redacted> }}"
                )
            }
            Credentials::Bearer(_) => write!(f, "Bearer(<redacted>)"),
        }
    }
}

/// Parses an `Authorization` header value. `None` when it is neither a well-formed Basic nor
/// a Bearer credential. The decoded Basic text is split at its first ':', so passwords may
/// contain ':'; the password need not be UTF-8, the username must be.
pub fn parse_authorization(value: &[u8]) -> Option<Credentials> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, rest) = text.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let colon = decoded.iter().position(|&b| b == b':')?;
        let username = String::from_utf8(decoded[..colon].to_vec()).ok()?;
        if username.is_empty() {
            return None;
        }
        Some(Credentials::Basic {
            username,
            password: decoded[colon + 1..].to_vec(),
        })
    } else if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        Some(Credentials::Bearer(rest.to_string()))
    } else {
        None
    }
}

/// The authenticated caller of a REST request, plus what the responses need (the base URL).
#[derive(Debug, Clone)]
pub struct Caller {
    pub id: Identity,
    /// `http://<Host header>`, for `self` links.
    pub base: String,
}

impl Caller {
    pub fn tenant(&self) -> &Arc<TenantRec> {
        &self.id.tenant
    }

    /// An administrator of the management tenant: may do everything on every tenant.
    pub fn is_management_admin(&self) -> bool {
        self.id.role == Role::Admin && self.id.tenant.id == MANAGEMENT
    }

    /// Any administrator.
    pub fn is_admin(&self) -> bool {
        self.id.role == Role::Admin
    }

    /// May administer `tenant_id`.
    pub fn may_admin(&self, tenant_id: &str) -> bool {
        self.is_management_admin() || (self.is_admin() && self.id.tenant.id == tenant_id)
    }

    /// 403 unless an administrator of the management tenant.
    pub fn require_management_admin(&self) -> Result<(), ApiError> {
        if self.is_management_admin() {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "only administrators of the management tenant may do this",
            ))
        }
    }

    /// 403 unless an administrator (of any tenant).
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "only tenant administrators may do this",
            ))
        }
    }

    /// 403 unless the caller may administer `tenant_id`.
    pub fn require_admin_of(&self, tenant_id: &str) -> Result<(), ApiError> {
        if self.may_admin(tenant_id) {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "administrators may only manage their own tenant",
            ))
        }
    }

    /// 403 for the bootstrap user, whose only call is device credentials.
    pub fn require_not_bootstrap(&self) -> Result<(), ApiError> {
        if self.id.role == Role::Bootstrap {
            Err(ApiError::forbidden(
                "the bootstrap user may only request device credentials",
            ))
        } else {
            Ok(())
        }
    }

    /// The tenant named in a path (`{tenant}`: id or domain) for an administrator of it.
    /// A tenant that does not exist is 404 for management administrators and 403 for anyone
    /// else, so tenant admins cannot probe which tenants exist.
    pub fn admin_tenant(
        &self,
        state: &RestState,
        id_or_domain: &str,
        api: super::error::Api,
    ) -> Result<Arc<TenantRec>, ApiError> {
        self.require_admin()?;
        match state.auth.dir.resolve_tenant(id_or_domain) {
            Some(t) => {
                self.require_admin_of(&t.id)?;
                Ok(t)
            }
            None if self.is_management_admin() => Err(ApiError::not_found(
                api,
                format!("tenant {id_or_domain} not found"),
            )),
            None => Err(ApiError::forbidden(
                "administrators may only manage their own tenant",
            )),
        }
    }
}

fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && !h.contains(['/', ' ', '"', '\\']))
        .unwrap_or("localhost");
    format!("http://{host}")
}

impl FromRequestParts<Arc<RestState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<RestState>,
    ) -> Result<Caller, ApiError> {
        let base = base_url(&parts.headers);
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized());
        };
        let id = match parse_authorization(value.as_bytes()) {
            None => return Err(ApiError::unauthorized()),
            Some(Credentials::Basic { username, password }) => state
                .auth
                .login_password(ip, &username, &password)
                .await
                .map_err(ApiError::auth)?,
            Some(Credentials::Bearer(t)) => bearer(state, &t).await?,
        };
        Ok(Caller { id, base })
    }
}

/// A device token: valid signature and expiry, and the user it names still exists.
async fn bearer(state: &RestState, t: &str) -> Result<Identity, ApiError> {
    let dir = &state.auth.dir;
    let claims = token::verify(dir, t)
        .await
        .ok_or_else(ApiError::unauthorized)?;
    let tenant = dir.tenant(&claims.ten).ok_or_else(ApiError::unauthorized)?;
    let user = dir
        .user(&tenant.id, &claims.sub)
        .ok_or_else(ApiError::unauthorized)?;
    Ok(Identity {
        tenant,
        user: user.user_name.clone(),
        role: user.role,
        cert: false,
        anonymous: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(s: &[u8]) -> Vec<u8> {
        let mut v = b"Basic ".to_vec();
        v.extend_from_slice(
            base64::engine::general_purpose::STANDARD
                .encode(s)
                .as_bytes(),
        );
        v
    }

    #[test]
    fn basic_splits_at_first_colon() {
        assert_eq!(
            parse_authorization(&basic(b"t12345678/admin:pa:ss:")),
            Some(Credentials::Basic {
                username: "t12345678/admin".into(),
                password: b"pa:ss:".to_vec()
            })
        );
        assert_eq!(
            parse_authorization(&basic(b"acme.example/bob:")),
            Some(Credentials::Basic {
                username: "acme.example/bob".into(),
                password: vec![]
            })
        );
    }

    #[test]
    fn basic_scheme_is_case_insensitive_and_trimmed() {
        let mut v = b"  bAsIc   ".to_vec();
        v.extend_from_slice(
            base64::engine::general_purpose::STANDARD
                .encode(b"m/a:p")
                .as_bytes(),
        );
        assert_eq!(
            parse_authorization(&v),
            Some(Credentials::Basic {
                username: "m/a".into(),
                password: b"p".to_vec()
            })
        );
    }

    #[test]
    fn binary_password_is_kept() {
        assert_eq!(
            parse_authorization(&basic(b"m/a:\xff\x00x")),
            Some(Credentials::Basic {
                username: "m/a".into(),
                password: b"\xff\x00x".to_vec()
            })
        );
    }

    #[test]
    fn malformed_basic_is_rejected() {
        assert_eq!(parse_authorization(&basic(b"no-colon")), None);
        assert_eq!(parse_authorization(&basic(b":password-only")), None);
        assert_eq!(parse_authorization(&basic(b"\xffuser:pw")), None);
        assert_eq!(parse_authorization(b"Basic !!!not-base64!!!"), None);
        assert_eq!(parse_authorization(b"Basic"), None);
        assert_eq!(parse_authorization(b"Digest abc"), None);
        assert_eq!(parse_authorization(b""), None);
        assert_eq!(parse_authorization(b"Bearer "), None);
    }

    #[test]
    fn bearer() {
        assert_eq!(
            parse_authorization(b"Bearer abc.def.ghi"),
            Some(Credentials::Bearer("abc.def.ghi".into()))
        );
    }

    #[test]
    fn debug_never_shows_secrets() {
        let c = parse_authorization(&basic(b"m/a:hunter2")).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        let b = parse_authorization(b"Bearer tok-secret").unwrap();
        assert!(!format!("{b:?}").contains("tok-secret"));
    }

    #[test]
    fn base_url_from_host() {
        let mut h = HeaderMap::new();
        assert_eq!(base_url(&h), "http://localhost");
        h.insert(header::HOST, "example.com:8080".parse().unwrap());
        assert_eq!(base_url(&h), "http://example.com:8080");
        h.insert(header::HOST, "evil/path".parse().unwrap());
        assert_eq!(base_url(&h), "http://localhost");
    }
}
