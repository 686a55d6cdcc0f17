//! Who a client is and what it may do: tenants and users in the durable directory, password
//! and certificate logins, login throttling, the Cumulocity ClientId, topic ACLs, device
//! tokens, and registration (bootstrap).

pub mod acl;
pub mod auth;
pub mod bootstrap;
pub mod client_id;
pub mod directory;
pub mod password;
pub mod records;
pub mod throttle;
pub mod token;

use rustls::pki_types::CertificateDer;

/// The certificate chain a TLS client presented (leaf first). The TLS layer has already
/// verified it against the union of every tenant's enabled trusted CAs; `auth` decides which
/// tenant it belongs to.
#[derive(Debug, Clone)]
pub struct PeerCert {
    pub chain: Vec<CertificateDer<'static>>,
}
