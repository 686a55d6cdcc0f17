//! Mutual TLS between members on the gRPC port: every node presents a certificate chaining to
//! the cluster's CA and accepts only peers whose certificate does, both as server and as
//! client. The cluster secret (`auth.rs`) still applies on top; TLS adds confidentiality (the
//! whole durable state crosses this port) and keeps hosts without a cluster certificate out.

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The TLS settings of one node, from PEM text.
#[derive(Debug, Clone)]
pub struct ClusterTls {
    identity: Identity,
    ca: Certificate,
}

impl ClusterTls {
    /// From the node's certificate chain, its private key and the cluster CA, all PEM.
    /// Fails on text that holds no PEM block (tonic parses the blocks when a channel or the
    /// server is built; a wrong key or CA then fails the handshakes and is logged).
    pub fn from_pem(cert: &[u8], key: &[u8], ca: &[u8]) -> Result<ClusterTls, String> {
        for (what, pem) in [("certificate", cert), ("key", key), ("CA", ca)] {
            if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
                return Err(format!("the cluster TLS {what} is not PEM"));
            }
        }
        Ok(ClusterTls {
            identity: Identity::from_pem(cert, key),
            ca: Certificate::from_pem(ca),
        })
    }

    /// For the gRPC server: this node's identity; clients must present a certificate of the
    /// cluster CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
    }

    /// For calls to peers: the peer's certificate must chain to the cluster CA and name the
    /// host (DNS name or IP address) of its advertised address; this node presents its own.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
    }
}
