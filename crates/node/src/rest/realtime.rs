//! The real-time notification endpoint: Cumulocity's Bayeux (CometD) protocol over a
//! WebSocket at `/notification/realtime` (and `/cep/realtime`). Supported: `/meta/handshake`
//! (credentials in the upgrade's `Authorization` header or in the handshake's
//! `ext.com.cumulocity.authn.token`, base64 `tenant/user:password`), `/meta/subscribe` and
//! `/meta/unsubscribe` to `/<measurements|events|alarms|operations|managedobjects>/<id|*>`,
//! `/meta/connect` (answered after its timeout, notifications go out as they come) and
//! `/meta/disconnect`. A notification is `{"channel", "data": {"realtimeAction", "data"}}`.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use base64::Engine;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use super::{ApiError, Caller, RestState, St};
use crate::identity::auth::Identity;
use crate::identity::records::Role;
use crate::realtime::{covers, valid_subscription, Note};

/// How long a `/meta/connect` is held before it is answered.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that has not completed its handshake by then is closed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that does not take a message within this is closed.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Subscriptions per client at most.
const MAX_SUBSCRIPTIONS: usize = 100;

/// `GET /notification/realtime` (WebSocket upgrade).
pub async fn upgrade(
    State(s): St,
    caller: Result<Caller, ApiError>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
    let ip = peer.ip();
    let who = caller.ok().map(|c| c.id);
    // Bayeux control messages are small; a client cannot make the node buffer megabytes
    // (the library's default limit is 64 MiB) before it has even handshaken.
    ws.max_message_size(64 * 1024)
        .max_frame_size(64 * 1024)
        .on_upgrade(move |socket| session(s, who, ip, socket))
}

fn reply(m: &Value, extra: Value) -> Value {
    let mut r = json!({"channel": m.get("channel").cloned().unwrap_or(Value::Null),
        "successful": true});
    if let Some(id) = m.get("id") {
        r["id"] = id.clone();
    }
    if let (Value::Object(r), Value::Object(e)) = (&mut r, extra) {
        r.extend(e);
    }
    r
}

fn failure(m: &Value, error: &str) -> Value {
    let mut r = reply(m, json!({"error": error}));
    r["successful"] = json!(false);
    r
}

/// Credentials from a handshake's `ext.com.cumulocity.authn.token`.
fn handshake_credentials(m: &Value) -> Option<(String, String)> {
    let token = m
        .pointer("/ext/com.cumulocity.authn/token")
        .and_then(Value::as_str)?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

async fn session(s: Arc<RestState>, mut who: Option<Identity>, ip: IpAddr, mut ws: WebSocket) {
    let Some(mut sub) = s.realtime.subscribe() else {
        metrics::counter!("fleetmq_realtime_refused_total").increment(1);
        let _ = ws
            .send(WsMessage::Text(
                json!([{"channel": "/meta/handshake", "successful": false,
                    "error": "503::Too many clients"}])
                .to_string()
                .into(),
            ))
            .await;
        return;
    };
    metrics::gauge!("fleetmq_realtime_clients").increment(1.0);
    let started = tokio::time::Instant::now();
    let client_id = format!("{:016x}", rand::random::<u64>());
    let mut subs: BTreeSet<String> = BTreeSet::new();
    let mut handshaken = false;
    let mut connect: Option<(Value, tokio::time::Instant)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        let mut out: Vec<Value> = Vec::new();
        let mut close = false;
        tokio::select! {
            msg = ws.recv() => {
                let Some(Ok(msg)) = msg else { break };
                let text = match msg {
                    WsMessage::Text(t) => t.to_string(),
                    WsMessage::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
                    WsMessage::Close(_) => break,
                    _ => continue,
                };
                let msgs = match serde_json::from_str::<Value>(&text) {
                    Ok(Value::Array(a)) => a,
                    Ok(v @ Value::Object(_)) => vec![v],
                    _ => {
                        out.push(json!({"channel": "/meta/unknown", "successful": false,
                            "error": "400::invalid JSON"}));
                        Vec::new()
                    }
                };
                for m in msgs {
                    let channel = m.get("channel").and_then(Value::as_str).unwrap_or_default();
                    match channel {
                        "/meta/handshake" => {
                            if who.is_none() {
                                if let Some((u, p)) = handshake_credentials(&m) {
                                    who = s.auth.login_password(ip, &u, p.as_bytes()).await.ok();
                                }
                            }
                            match &who {
                                Some(i) if matches!(i.role, Role::Admin | Role::User) => {
                                    handshaken = true;
                                    out.push(reply(&m, json!({"clientId": client_id,
                                        "version": "1.0",
                                        "supportedConnectionTypes": ["websocket"],
                                        "advice": {"reconnect": "retry", "interval": 0,
                                            "timeout": CONNECT_TIMEOUT.as_millis() as u64}})));
                                }
                                Some(_) => out.push(failure(&m, "403::Forbidden")),
                                None => out.push(failure(&m, "401::Unauthorized")),
                            }
                        }
                        _ if !handshaken => {
                            out.push(failure(&m, "402::Unknown client"));
                        }
                        "/meta/subscribe" | "/meta/unsubscribe" => {
                            let sub = m.get("subscription").and_then(Value::as_str).unwrap_or_default().to_string();
                            if !valid_subscription(&sub) {
                                out.push(failure(&m, "403::Invalid subscription"));
                            } else if channel == "/meta/subscribe" && subs.len() >= MAX_SUBSCRIPTIONS && !subs.contains(&sub) {
                                out.push(failure(&m, "403::Too many subscriptions"));
                            } else {
                                if channel == "/meta/subscribe" {
                                    subs.insert(sub.clone());
                                } else {
                                    subs.remove(&sub);
                                }
                                out.push(reply(&m, json!({"subscription": sub, "clientId": client_id})));
                            }
                        }
                        "/meta/connect" => {
                            connect = Some((m.clone(), tokio::time::Instant::now() + CONNECT_TIMEOUT));
                        }
                        "/meta/disconnect" => {
                            out.push(reply(&m, json!({"clientId": client_id})));
                            close = true;
                        }
                        _ => out.push(failure(&m, "400::Unknown channel")),
                    }
                }
            }
            note = sub.rx.recv() => {
                match note {
                    Ok(n) => {
                        if let Some(tenant) = who.as_ref().map(|i| i.tenant.id.as_str()) {
                            if handshaken && n.tenant == tenant && subs.iter().any(|x| covers(x, &n.channel)) {
                                out.push(message(&n));
                            }
                        }
                    }
                    Err(RecvError::Lagged(k)) => {
                        metrics::counter!("fleetmq_realtime_dropped_total").increment(k);
                    }
                    Err(RecvError::Closed) => break,
                }
            }
            _ = tick.tick() => {
                if !handshaken && started.elapsed() > HANDSHAKE_TIMEOUT {
                    break;
                }
                if let Some((m, due)) = &connect {
                    if tokio::time::Instant::now() >= *due {
                        out.push(reply(m, json!({"clientId": client_id,
                            "advice": {"interval": 0, "timeout": CONNECT_TIMEOUT.as_millis() as u64}})));
                        connect = None;
                    }
                }
            }
        }
        if !out.is_empty() {
            let text = Value::Array(out).to_string();
            match tokio::time::timeout(SEND_TIMEOUT, ws.send(WsMessage::Text(text.into()))).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
        if close {
            break;
        }
    }
    metrics::gauge!("fleetmq_realtime_clients").decrement(1.0);
}

fn message(n: &Note) -> Value {
    json!({"channel": n.channel, "data": {"realtimeAction": n.action, "data": n.data}})
}
