//! The MQTT listeners: TCP (1883), TLS (8883, optional client certificates), WebSocket (8083)
//! and secure WebSocket (8084), all feeding the same connection task. Handshakes run in the
//! connection's own task, so a slow or silent client never holds up the accept loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::broker::Broker;
use crate::config::Config;
use crate::connection::{self, Transport, TransportKind};
use crate::identity::directory::Directory;
use crate::identity::PeerCert;
use crate::transport::{tls, ws};

/// Bound listeners, before they accept.
pub struct Bound {
    pub mqtt: TcpListener,
    pub mqtt_addr: SocketAddr,
    pub ws: TcpListener,
    pub ws_addr: Option<SocketAddr>,
    pub tls: Option<(TcpListener, TcpListener, Arc<tls::TlsState>)>,
    pub tls_addr: Option<SocketAddr>,
    pub wss_addr: Option<SocketAddr>,
}

async fn bind_one(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {what} {addr}"))
}

/// Every enabled CA certificate of every tenant, as DER, for the TLS client verifier.
pub fn trusted_cas(dir: &Directory) -> Vec<CertificateDer<'static>> {
    dir.all_enabled_certs()
        .iter()
        .filter_map(|c| match tls::parse_ca_pem(&c.pem) {
            Ok(info) => Some(CertificateDer::from(info.der)),
            Err(e) => {
                tracing::warn!(tenant = %c.tenant, fingerprint = %c.fingerprint, error = %e, "skipping unusable trusted certificate");
                None
            }
        })
        .collect()
}

/// Binds every configured listener (TLS and WSS only with a certificate and key).
pub async fn bind(cfg: &Config, dir: &Directory) -> anyhow::Result<Bound> {
    let mqtt = bind_one(cfg.mqtt_addr, "MQTT").await?;
    let ws = bind_one(cfg.ws_addr, "MQTT over WebSocket").await?;
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => {
            let state = tls::TlsState::new(cert, key, trusted_cas(dir))
                .context("loading the TLS certificate")?;
            let t = bind_one(cfg.tls_addr, "MQTT over TLS").await?;
            let w = bind_one(cfg.wss_addr, "MQTT over secure WebSocket").await?;
            Some((t, w, state))
        }
        (None, None) => None,
        _ => anyhow::bail!("--tls-cert and --tls-key must be given together"),
    };
    Ok(Bound {
        mqtt_addr: mqtt.local_addr()?,
        ws_addr: Some(ws.local_addr()?),
        tls_addr: tls.as_ref().map(|t| t.0.local_addr()).transpose()?,
        wss_addr: tls.as_ref().map(|t| t.1.local_addr()).transpose()?,
        mqtt,
        ws,
        tls,
    })
}

/// Starts the accept loops (and the TLS reloaders); they end when the broker shuts down.
pub fn spawn(broker: Arc<Broker>, dir: Arc<Directory>, bound: Bound) -> Vec<JoinHandle<()>> {
    let mut tasks = vec![
        tokio::spawn(accept_loop(broker.clone(), bound.mqtt, Kind::Tcp)),
        tokio::spawn(accept_loop(broker.clone(), bound.ws, Kind::Ws)),
    ];
    if let Some((t, w, state)) = bound.tls {
        tls::spawn_reloader(state.clone(), broker.shutdown.subscribe());
        tasks.push(tokio::spawn(follow_trusted_cas(
            state.clone(),
            dir,
            broker.shutdown.subscribe(),
        )));
        tasks.push(tokio::spawn(accept_loop(
            broker.clone(),
            t,
            Kind::Tls(state.clone()),
        )));
        tasks.push(tokio::spawn(accept_loop(broker, w, Kind::Wss(state))));
    }
    tasks
}

/// Rebuilds the TLS client verifier whenever a tenant's trusted certificates change, so an
/// uploaded CA is trusted by the next handshake without a restart.
async fn follow_trusted_cas(
    state: Arc<tls::TlsState>,
    dir: Arc<Directory>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut changes = dir.certs_watch();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
                state.set_trusted_cas(trusted_cas(&dir));
                tracing::info!("trusted CA certificates reloaded");
            }
        }
    }
}

#[derive(Clone)]
enum Kind {
    Tcp,
    Ws,
    Tls(Arc<tls::TlsState>),
    Wss(Arc<tls::TlsState>),
}

async fn accept_loop(broker: Arc<Broker>, listener: TcpListener, kind: Kind) {
    let mut shutdown = broker.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    match &kind {
                        // Plain TCP goes straight to the connection task: no extra future
                        // layer on the hot path.
                        Kind::Tcp => {
                            tokio::spawn(connection::serve(broker.clone(), stream, peer, Transport::tcp()));
                        }
                        k => {
                            tokio::spawn(handshake(broker.clone(), stream, peer, k.clone()));
                        }
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn handshake(broker: Arc<Broker>, stream: TcpStream, peer: SocketAddr, kind: Kind) {
    match kind {
        Kind::Tcp => connection::serve(broker, stream, peer, Transport::tcp()).await,
        Kind::Ws => match ws::accept(stream).await {
            Ok(s) => {
                let t = Transport {
                    kind: TransportKind::Ws,
                    peer_cert: None,
                };
                connection::serve(broker, s, peer, t).await
            }
            Err(e) => handshake_failed("ws", peer, &e),
        },
        Kind::Tls(state) => match tls::accept(&state, stream).await {
            Ok((s, chain)) => {
                let t = Transport {
                    kind: TransportKind::Tls,
                    peer_cert: chain.map(|chain| Box::new(PeerCert { chain })),
                };
                connection::serve(broker, s, peer, t).await
            }
            Err(e) => handshake_failed("tls", peer, &e),
        },
        Kind::Wss(state) => match tls::accept(&state, stream).await {
            // §1.1: certificate authentication is not offered over WebSocket; a client
            // certificate presented there is ignored and the CONNECT credentials decide.
            Ok((s, _)) => match ws::accept(s).await {
                Ok(s) => {
                    let t = Transport {
                        kind: TransportKind::Wss,
                        peer_cert: None,
                    };
                    connection::serve(broker, s, peer, t).await
                }
                Err(e) => handshake_failed("wss", peer, &e),
            },
            Err(e) => handshake_failed("wss", peer, &e),
        },
    }
}

fn handshake_failed(transport: &'static str, peer: SocketAddr, e: &dyn std::fmt::Display) {
    crate::metrics::counter_protocol_error(match transport {
        "tls" => "tls_handshake",
        "ws" => "ws_handshake",
        _ => "wss_handshake",
    });
    tracing::info!(%peer, transport, error = %e, "handshake failed");
}
