//! Directory records: tenants, users, device registration requests and trusted certificates.
//! Stored as JSON values of directory entries (see `fleetmq_storage::Space`), so a field added
//! later (with `#[serde(default)]`) never breaks a record written before it.

use serde::{Deserialize, Serialize};

/// The tenant every node creates on first start; it manages the other tenants.
pub const MANAGEMENT: &str = "management";
/// The device bootstrap user of the management tenant (§6.1).
pub const BOOTSTRAP_USER: &str = "devicebootstrap";
/// The management tenant's first administrator.
pub const ADMIN_USER: &str = "admin";

/// A tenant: an id (`t` + 8 digits, or `management`), a unique domain/name, and its limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRec {
    pub id: String,
    pub domain: String,
    pub company: String,
    pub created_ms: u64,
    #[serde(default)]
    pub limits: TenantLimits,
}

/// Per-tenant overrides of the node's default limits and quotas; `None` = node default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantLimits {
    /// Largest packet on a reserved (Cumulocity) topic, bytes including headers.
    pub reserved_packet_size: Option<u32>,
    /// Largest packet on a free-form topic, bytes including headers.
    pub freeform_packet_size: Option<u32>,
    pub max_connections: Option<u32>,
    /// Persistent sessions (clean start 0 / session expiry > 0) held at once.
    pub max_sessions: Option<u32>,
    /// Inbound PUBLISH packets per second over all the tenant's connections (0 = unlimited).
    pub messages_per_second: Option<u32>,
    /// Inbound bytes per second over all the tenant's connections (0 = unlimited).
    pub bytes_per_second: Option<u64>,
    pub max_subscriptions: Option<u32>,
}

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Manages its tenant (users, registrations, certificates); in `management`, all tenants.
    Admin,
    /// A person or service of the tenant: MQTT and read-only REST on itself.
    User,
    /// A device user (`device_<id>`): may connect only as its own device identifier.
    Device,
    /// `management/devicebootstrap`: only `s/ucr` and `s/dcr`, and device credentials.
    Bootstrap,
}

/// A user of a tenant. `password_hash` is an argon2 PHC string; `None` for certificate-only
/// devices, which can never log in with a password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRec {
    pub tenant: String,
    pub user_name: String,
    pub password_hash: Option<String>,
    pub role: Role,
    pub created_ms: u64,
    #[serde(default)]
    pub email: Option<String>,
    /// Created by certificate auto-registration (or meant for certificate login).
    #[serde(default)]
    pub cert_auth: bool,
}

impl UserRec {
    /// The device identifier a `device_<id>` user is bound to.
    pub fn device_id(&self) -> Option<&str> {
        self.user_name.strip_prefix("device_")
    }
}

/// States of a new-device request (§6.1, §11.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RequestStatus {
    WaitingForConnection,
    PendingAcceptance,
    Accepted,
}

impl RequestStatus {
    /// The Cumulocity spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::WaitingForConnection => "WAITING_FOR_CONNECTION",
            RequestStatus::PendingAcceptance => "PENDING_ACCEPTANCE",
            RequestStatus::Accepted => "ACCEPTED",
        }
    }
}

/// A device registration request made by a tenant admin for a device identifier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRequestRec {
    pub tenant: String,
    pub id: String,
    pub status: RequestStatus,
    pub created_ms: u64,
    pub owner: String,
    #[serde(default)]
    pub group_id: Option<String>,
    #[serde(default)]
    pub device_type: Option<String>,
}

/// A CA certificate a tenant trusts for device certificates (§1.5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustedCertRec {
    pub tenant: String,
    /// Lower-case hex SHA-1 of the DER, as Cumulocity names trusted certificates.
    pub fingerprint: String,
    pub name: String,
    pub pem: String,
    pub auto_registration: bool,
    pub enabled: bool,
    pub created_ms: u64,
    pub subject: String,
    pub issuer: String,
    pub not_before: String,
    pub not_after: String,
}
