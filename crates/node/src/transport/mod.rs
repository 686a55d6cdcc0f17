//! Transports that carry MQTT besides plain TCP: MQTT over TLS (port 8883) and MQTT over
//! WebSocket (`/mqtt`, plain or inside TLS on 8084). Each one turns an accepted TCP stream into
//! a byte stream (`AsyncRead + AsyncWrite`) that the connection task reads MQTT packets from
//! exactly as it does on TCP; TLS additionally reports the client certificate chain, if the
//! client presented one, for certificate logins. The TLS configuration (server certificate and
//! the tenants' trusted CAs) can be swapped at runtime without touching open connections.

pub mod tls;
pub mod ws;
