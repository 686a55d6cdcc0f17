//! The JSON shapes of the REST API (Cumulocity spelling: camelCase), and the small formatting
//! helpers they need (RFC 3339 times, path segments in `self` links).
//!
//! Request bodies have every field optional so that a missing mandatory field is reported by
//! name (400) instead of as a serde error; unknown fields are ignored, as Cumulocity clients
//! send extra fragments.

use serde::{Deserialize, Serialize};

use crate::identity::records::{
    DeviceRequestRec, Role, TenantLimits, TenantRec, TrustedCertRec, UserRec,
};

// ----- requests --------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewTenant {
    pub company: Option<String>,
    pub domain: Option<String>,
    pub admin_name: Option<String>,
    pub admin_pass: Option<String>,
    pub admin_email: Option<String>,
    pub fleetmq_limits: Option<TenantLimits>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantUpdate {
    pub company: Option<String>,
    pub domain: Option<String>,
    pub fleetmq_limits: Option<TenantLimits>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewUser {
    pub user_name: Option<String>,
    pub password: Option<String>,
    pub email: Option<String>,
    pub fleetmq_role: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserUpdate {
    pub password: Option<String>,
    /// `""` clears the address.
    pub email: Option<String>,
    pub fleetmq_role: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewDeviceRequest {
    pub id: Option<String>,
    pub group_id: Option<String>,
    #[serde(rename = "type")]
    pub device_type: Option<String>,
    /// Management administrators may register a device for another tenant.
    pub tenant_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRequestUpdate {
    pub status: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsRequest {
    pub id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewCert {
    pub name: Option<String>,
    pub cert_in_pem_format: Option<String>,
    pub status: Option<String>,
    pub auto_registration_enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertUpdate {
    pub name: Option<String>,
    pub status: Option<String>,
    pub auto_registration_enabled: Option<bool>,
}

// ----- responses -------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantOut {
    pub id: String,
    #[serde(rename = "self")]
    pub self_: String,
    pub company: String,
    pub domain: String,
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_name: Option<String>,
    pub creation_time: String,
    pub fleetmq_limits: TenantLimits,
}

impl TenantOut {
    pub fn new(base: &str, t: &TenantRec, admin_name: Option<String>) -> TenantOut {
        TenantOut {
            id: t.id.clone(),
            self_: format!("{base}/tenant/tenants/{}", seg(&t.id)),
            company: t.company.clone(),
            domain: t.domain.clone(),
            status: "ACTIVE",
            admin_name,
            creation_time: rfc3339(t.created_ms),
            fleetmq_limits: t.limits.clone(),
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CurrentTenant {
    pub name: String,
    pub domain_name: String,
    pub company_name: String,
    #[serde(rename = "self")]
    pub self_: String,
}

impl CurrentTenant {
    pub fn new(base: &str, t: &TenantRec) -> CurrentTenant {
        CurrentTenant {
            name: t.id.clone(),
            domain_name: t.domain.clone(),
            company_name: t.company.clone(),
            self_: format!("{base}/tenant/currentTenant"),
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserOut {
    pub id: String,
    pub user_name: String,
    #[serde(rename = "self")]
    pub self_: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    pub fleetmq_role: &'static str,
    pub creation_time: String,
    pub tenant: String,
}

impl UserOut {
    /// Never carries the password hash.
    pub fn new(base: &str, u: &UserRec) -> UserOut {
        UserOut {
            id: u.user_name.clone(),
            user_name: u.user_name.clone(),
            self_: user_url(base, &u.tenant, &u.user_name),
            email: u.email.clone(),
            fleetmq_role: role_str(u.role),
            creation_time: rfc3339(u.created_ms),
            tenant: u.tenant.clone(),
        }
    }
}

pub fn user_url(base: &str, tenant: &str, user: &str) -> String {
    format!("{base}/user/{}/users/{}", seg(tenant), seg(user))
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CurrentUser {
    pub id: String,
    pub user_name: String,
    #[serde(rename = "self")]
    pub self_: String,
    pub fleetmq_role: &'static str,
    pub tenant: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRequestOut {
    pub id: String,
    pub status: &'static str,
    #[serde(rename = "self")]
    pub self_: String,
    pub owner: String,
    pub creation_time: String,
    pub tenant_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub device_type: Option<String>,
}

impl DeviceRequestOut {
    pub fn new(base: &str, r: &DeviceRequestRec) -> DeviceRequestOut {
        DeviceRequestOut {
            id: r.id.clone(),
            status: r.status.as_str(),
            self_: format!("{base}/devicecontrol/newDeviceRequests/{}", seg(&r.id)),
            owner: r.owner.clone(),
            creation_time: rfc3339(r.created_ms),
            tenant_id: r.tenant.clone(),
            group_id: r.group_id.clone(),
            device_type: r.device_type.clone(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCredentialsOut {
    pub id: String,
    pub tenant_id: String,
    pub username: String,
    pub password: String,
    #[serde(rename = "self")]
    pub self_: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertOut {
    pub fingerprint: String,
    pub name: String,
    pub status: &'static str,
    pub auto_registration_enabled: bool,
    pub cert_in_pem_format: String,
    pub subject: String,
    pub issuer: String,
    pub not_before: String,
    pub not_after: String,
    pub creation_time: String,
    pub tenant_id: String,
    #[serde(rename = "self")]
    pub self_: String,
}

impl CertOut {
    pub fn new(base: &str, c: &TrustedCertRec) -> CertOut {
        CertOut {
            fingerprint: c.fingerprint.clone(),
            name: c.name.clone(),
            status: if c.enabled { "ENABLED" } else { "DISABLED" },
            auto_registration_enabled: c.auto_registration,
            cert_in_pem_format: c.pem.clone(),
            subject: c.subject.clone(),
            issuer: c.issuer.clone(),
            not_before: c.not_before.clone(),
            not_after: c.not_after.clone(),
            creation_time: rfc3339(c.created_ms),
            tenant_id: c.tenant.clone(),
            self_: format!(
                "{base}/tenant/tenants/{}/trusted-certificates/{}",
                seg(&c.tenant),
                seg(&c.fingerprint)
            ),
        }
    }
}

// ----- values ----------------------------------------------------------------------------------

/// The REST spelling of a role.
pub fn role_str(r: Role) -> &'static str {
    match r {
        Role::Admin => "admin",
        Role::User => "user",
        Role::Device => "device",
        Role::Bootstrap => "bootstrap",
    }
}

/// A role a REST caller may assign (`bootstrap` is reserved to the node's own user).
pub fn parse_role(s: &str) -> Option<Role> {
    match s.to_ascii_lowercase().as_str() {
        "admin" => Some(Role::Admin),
        "user" => Some(Role::User),
        "device" => Some(Role::Device),
        _ => None,
    }
}

/// `ENABLED` / `DISABLED` → enabled.
pub fn parse_cert_status(s: &str) -> Option<bool> {
    match s.to_ascii_uppercase().as_str() {
        "ENABLED" => Some(true),
        "DISABLED" => Some(false),
        _ => None,
    }
}

/// Milliseconds since the epoch as RFC 3339 UTC with milliseconds, e.g.
/// `2024-03-01T12:00:00.000Z`.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Percent-encodes a path segment (everything but RFC 3986 unreserved characters).
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_709_294_400_000), "2024-03-01T12:00:00.000Z");
        assert_eq!(rfc3339(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn segments() {
        assert_eq!(seg("device_abc-1.2~x"), "device_abc-1.2~x");
        assert_eq!(seg("a b/c?"), "a%20b%2Fc%3F");
        assert_eq!(seg("ü"), "%C3%BC");
    }

    #[test]
    fn roles() {
        for r in [Role::Admin, Role::User, Role::Device] {
            assert_eq!(parse_role(role_str(r)), Some(r));
        }
        assert_eq!(parse_role("bootstrap"), None);
        assert_eq!(parse_role("root"), None);
        assert_eq!(parse_cert_status("enabled"), Some(true));
        assert_eq!(parse_cert_status("DISABLED"), Some(false));
        assert_eq!(parse_cert_status("ON"), None);
    }

    #[test]
    fn user_shape_has_no_secret() {
        let u = UserRec {
            tenant: "t00000001".into(),
            user_name: "bob smith".into(),
            password_hash: Some("$argon2id$secret".into()),
            role: Role::User,
            created_ms: 0,
            email: None,
            cert_auth: false,
        };
        let v = serde_json::to_value(UserOut::new("http://h", &u)).unwrap();
        assert!(!v.to_string().contains("argon2"));
        assert_eq!(v["self"], "http://h/user/t00000001/users/bob%20smith");
        assert_eq!(v["fleetmqRole"], "user");
        assert_eq!(v["userName"], "bob smith");
        assert!(v.get("email").is_none());
    }

    #[test]
    fn request_bodies_are_lenient() {
        let t: NewTenant = serde_json::from_str(
            r#"{"company":"A","domain":"a","adminName":"x","adminPass":"y","extra":{},
                "fleetmqLimits":{"maxConnections":5}}"#,
        )
        .unwrap();
        assert_eq!(t.fleetmq_limits.unwrap().max_connections, Some(5));
        let r: NewDeviceRequest = serde_json::from_str(r#"{"id":"d","type":"c8y_X"}"#).unwrap();
        assert_eq!(r.device_type.as_deref(), Some("c8y_X"));
    }
}
