//! Logins: `<tenant id or domain>/<user>` with a password (MQTT CONNECT, REST Basic), and
//! client certificates whose leaf CN is the device identifier (§1.3, §1.5).

use std::net::IpAddr;
use std::sync::Arc;

use super::directory::{DirError, Directory};
use super::records::{Role, TenantRec, UserRec};
use super::throttle::{Budget, Throttle};
use super::PeerCert;
use crate::transport::tls;

/// An authenticated client.
#[derive(Debug, Clone)]
pub struct Identity {
    pub tenant: Arc<TenantRec>,
    pub user: String,
    pub role: Role,
    /// Logged in with a client certificate.
    pub cert: bool,
    /// Admitted without credentials (`--anonymous-tenant`).
    pub anonymous: bool,
}

/// Why a login failed; each maps to one CONNACK code and one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Wrong tenant, user or password (CONNACK 4 / 0x86, HTTP 401).
    #[error("bad username or password")]
    BadCredentials,
    /// Known but not allowed (CONNACK 5 / 0x87, HTTP 401/403).
    #[error("not authorized: {0}")]
    NotAuthorized(&'static str),
    /// Too many failed logins from this address or against this tenant (CONNACK 3 / 0x9F,
    /// HTTP 429).
    #[error("too many failed logins")]
    Throttled,
    /// Storage could not record an auto-registration (CONNACK 3 / 0x88, HTTP 503).
    #[error("server unavailable")]
    Unavailable,
}

impl AuthError {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            AuthError::BadCredentials => "bad_credentials",
            AuthError::NotAuthorized(_) => "not_authorized",
            AuthError::Throttled => "throttled",
            AuthError::Unavailable => "unavailable",
        }
    }
}

/// Login logic shared by MQTT and REST.
pub struct Auth {
    pub dir: Arc<Directory>,
    pub throttle: Throttle,
    anonymous_tenant: Option<String>,
}

impl Auth {
    /// Logins against `dir`; `anonymous_tenant` admits clients without credentials.
    pub fn new(
        dir: Arc<Directory>,
        per_ip: Budget,
        per_tenant: Budget,
        anonymous_tenant: Option<String>,
    ) -> Auth {
        Auth {
            dir,
            throttle: Throttle::new(per_ip, per_tenant),
            anonymous_tenant,
        }
    }

    /// Password login with `<tenant>/<user>`.
    ///
    /// Order matters: a credential verified recently is accepted first (a constant-time
    /// digest compare), before any throttle, so devices that were connected before still get
    /// in while an attacker behind the same address or against the same tenant is throttled.
    /// Everything else needs budget left at its address and in its tenant before argon2 runs.
    pub async fn login_password(
        &self,
        ip: IpAddr,
        username: &str,
        password: &[u8],
    ) -> Result<Identity, AuthError> {
        let parsed = username
            .split_once('/')
            .and_then(|(t, u)| Some((self.dir.resolve_tenant(t)?, u)));
        let Some((tenant, user_name)) = parsed else {
            if !self.throttle.ip_allowed(ip) {
                return Err(AuthError::Throttled);
            }
            self.fail(ip, None, password).await;
            return Err(AuthError::BadCredentials);
        };
        let user = self.dir.user(&tenant.id, user_name);
        let phc = user.as_ref().and_then(|u| u.password_hash.clone());
        if let (Some(u), Some(h)) = (&user, &phc) {
            if self
                .dir
                .passwords
                .cached(&tenant.id, user_name, h, password)
            {
                return Ok(identity(&tenant, u, false));
            }
        }
        if !self.throttle.ip_allowed(ip) || !self.throttle.tenant_allowed(&tenant.id) {
            return Err(AuthError::Throttled);
        }
        let ok = self
            .dir
            .passwords
            .verify(&tenant.id, user_name, phc.as_deref(), password)
            .await;
        match (ok, user) {
            (true, Some(u)) => Ok(identity(&tenant, &u, false)),
            _ => {
                self.throttle.failed(ip, Some(&tenant.id));
                Err(AuthError::BadCredentials)
            }
        }
    }

    /// An unknown tenant or a malformed username: burn the same time as a real check, so
    /// timing does not tell which tenants exist, and count the failure against the address.
    async fn fail(&self, ip: IpAddr, tenant: Option<&str>, password: &[u8]) {
        let _ = self.dir.passwords.verify("", "", None, password).await;
        self.throttle.failed(ip, tenant);
    }

    /// The identity of a client that sent no credentials, if anonymous access is on.
    pub fn anonymous(&self) -> Option<Identity> {
        let name = self.anonymous_tenant.as_deref()?;
        let tenant = self.dir.resolve_tenant(name)?;
        Some(Identity {
            tenant,
            user: String::new(),
            role: Role::User,
            cert: false,
            anonymous: true,
        })
    }

    /// Certificate login: the leaf CN must be `device_id`; the tenant is the one whose
    /// trusted CA anchors the chain and that has (or auto-registers) the device user.
    pub async fn login_cert(
        &self,
        cert: &PeerCert,
        device_id: &str,
    ) -> Result<Identity, AuthError> {
        let Some(leaf) = cert.chain.first() else {
            return Err(AuthError::NotAuthorized("no client certificate"));
        };
        let Some(cn) = tls::leaf_common_name(leaf) else {
            return Err(AuthError::NotAuthorized("client certificate without CN"));
        };
        if cn != device_id {
            return Err(AuthError::NotAuthorized(
                "certificate CN is not the device identifier",
            ));
        }
        let user_name = format!("device_{cn}");
        let anchors: Vec<_> = self
            .dir
            .all_enabled_certs()
            .into_iter()
            .filter(|ca| {
                tls::parse_ca_pem(&ca.pem)
                    .map(|info| tls::issued_by(&cert.chain, &info.der))
                    .unwrap_or(false)
            })
            .collect();
        if anchors.is_empty() {
            return Err(AuthError::NotAuthorized(
                "no tenant trusts this certificate",
            ));
        }
        let mut tenants: Vec<&str> = anchors.iter().map(|c| c.tenant.as_str()).collect();
        tenants.sort_unstable();
        tenants.dedup();
        let registered: Vec<Arc<UserRec>> = tenants
            .iter()
            .filter_map(|t| self.dir.user(t, &user_name))
            .collect();
        match registered.as_slice() {
            [u] => {
                let tenant = self.dir.tenant(&u.tenant).ok_or(AuthError::Unavailable)?;
                return Ok(identity(&tenant, u, true));
            }
            [] => {}
            _ => {
                return Err(AuthError::NotAuthorized(
                    "device registered in several tenants",
                ))
            }
        }
        let auto: Vec<&str> = {
            let mut v: Vec<&str> = anchors
                .iter()
                .filter(|c| c.auto_registration)
                .map(|c| c.tenant.as_str())
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let [tenant_id] = auto.as_slice() else {
            return Err(AuthError::NotAuthorized(
                "device not registered and no single CA allows auto-registration",
            ));
        };
        let tenant = self.dir.tenant(tenant_id).ok_or(AuthError::Unavailable)?;
        match self
            .dir
            .create_user(tenant_id, &user_name, None, Role::Device, false)
            .await
        {
            Ok(u) => {
                tracing::info!(tenant = %tenant.id, device = %cn, "device auto-registered by certificate");
                Ok(identity(&tenant, &u, true))
            }
            // Two connections of the same new device raced: the other one created it.
            Err(DirError::Exists) => match self.dir.user(tenant_id, &user_name) {
                Some(u) => Ok(identity(&tenant, &u, true)),
                None => Err(AuthError::Unavailable),
            },
            Err(e) => {
                tracing::error!(error = %e, "auto-registration failed");
                Err(AuthError::Unavailable)
            }
        }
    }
}

fn identity(tenant: &Arc<TenantRec>, u: &UserRec, cert: bool) -> Identity {
    Identity {
        tenant: tenant.clone(),
        user: u.user_name.clone(),
        role: u.role,
        cert,
        anonymous: false,
    }
}
