//! One task per client connection: read and decode packets, apply them to the session, write
//! the answers and the session's deliveries. Writes are batched: everything produced while
//! handling one wake-up goes out in a single write. Work that waits for a durable commit is
//! kept in an ordered queue so acknowledgements and deliveries leave in the order the client
//! sent its packets, while the commits of many packets share one flush.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use fleetmq_cluster::ClusterError;
use fleetmq_protocol::encode::{self, ConnAckProps, OutPublish};
use fleetmq_protocol::reason::v5 as rc;
use fleetmq_protocol::topic::{parse_shared, validate_topic_filter, validate_topic_name};
use fleetmq_protocol::{
    Connect, DecodeError, Decoder, Incoming, ProtocolVersion, Publish, Subscribe, Unsubscribe, Will,
};
use fleetmq_storage::records::{Command, Response, SessionKey, SubscriptionRecord};
use futures_util::stream::{FuturesOrdered, StreamExt};
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::broker::{Broker, Prepared};
use crate::identity::acl::{self, FilterClass, TopicClass, Upstream};
use crate::identity::auth::{AuthError, Identity};
use crate::identity::records::Role;
use crate::identity::{bootstrap, client_id, token};
use crate::message::{now_ms, Message};
use crate::metrics;
use crate::quota::Limits;
use crate::session::{Delivery, Emit, InflightState, Kick, Session};
use crate::tenant::Tenant;

/// Read buffer growth step under load; an idle connection keeps no read buffer at all.
const READ_CHUNK: usize = 64 * 1024;
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Output kept unwritten at most before the connection stops reading and filling.
const MAX_UNWRITTEN: usize = 1024 * 1024;
/// Deliveries encoded per wake-up at most, so one busy subscriber cannot starve its own reads.
const FILL_BUDGET_BYTES: usize = 256 * 1024;

/// How a connection ended; decides the will and what the client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// DISCONNECT with reason 0: no will.
    Normal,
    /// DISCONNECT with reason 0x04: will wanted.
    WithWill,
    /// The socket closed or failed without DISCONNECT.
    PeerClosed,
    /// Bad input or a broken rule: DISCONNECT with this reason (MQTT 5), then close.
    Violation(u8, &'static str),
    /// No packet within 1.5 × keep-alive.
    KeepAlive,
    /// Another connection took the session.
    Kicked(Kick),
    /// The node is shutting down (0x8B) or drained (0x9C): DISCONNECT with this reason.
    Shutdown(u8),
}

impl Close {
    fn will_fires(self) -> bool {
        !matches!(self, Close::Normal | Close::Shutdown(_))
    }
    fn label(self) -> &'static str {
        match self {
            Close::Normal => "normal",
            Close::WithWill => "disconnect_with_will",
            Close::PeerClosed => "peer_closed",
            Close::Violation(..) => "violation",
            Close::KeepAlive => "keep_alive_timeout",
            Close::Kicked(_) => "taken_over",
            Close::Shutdown(rc::USE_ANOTHER_SERVER) => "drained",
            Close::Shutdown(_) => "shutdown",
        }
    }
}

/// An acknowledgement owed to the client once its PUBLISH is committed.
#[derive(Debug, Clone, Copy)]
enum Ack {
    Nothing,
    /// QoS 1: PUBACK.
    Puback(u16),
    /// QoS 2: PUBREC.
    Pubrec(u16),
}

/// Work that finished its durable commit, in client order.
enum Done {
    Publish {
        prepared: Prepared,
        ack: Ack,
        result: Result<Response, ClusterError>,
    },
    Suback {
        pkid: u16,
        codes: Vec<u8>,
        result: Result<(), ClusterError>,
    },
    Unsuback {
        pkid: u16,
        codes: Vec<u8>,
        result: Result<(), ClusterError>,
    },
    /// Outbound QoS 2: the Release is durable, PUBREL may go (on failure the connection
    /// closes instead: a PUBREL without a durable Release could lead to the PUBLISH being
    /// resent after a crash and delivered twice).
    Released {
        pid: u16,
        result: Result<(), ClusterError>,
    },
    /// Inbound QoS 2 retransmission whose original has now been committed (`ok`) or failed.
    DupPubrec { pid: u16, ok: bool },
    /// Inbound QoS 2: the packet id is forgotten durably, PUBCOMP may go.
    InboundReleased {
        pid: u16,
        result: Result<(), ClusterError>,
    },
}

type Pending = FuturesOrdered<Pin<Box<dyn Future<Output = Done> + Send>>>;

/// The ordered queue of work waiting for commits, allocated only while something waits:
/// `FuturesOrdered::new` allocates, and most connections never wait for anything.
#[derive(Default)]
struct PendingQueue(Option<Box<Pending>>);

impl PendingQueue {
    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|p| p.is_empty())
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |p| p.len())
    }

    fn push_back(&mut self, f: Pin<Box<dyn Future<Output = Done> + Send>>) {
        self.0
            .get_or_insert_with(|| Box::new(FuturesOrdered::new()))
            .push_back(f);
    }

    async fn next(&mut self) -> Option<Done> {
        let done = match &mut self.0 {
            Some(p) => p.next().await,
            None => None,
        };
        if self.is_empty() {
            self.0 = None;
        }
        done
    }
}

/// Waits until the original of a retransmitted QoS 2 PUBLISH is committed (or failed).
fn await_inbound_commit(
    session: Arc<Session>,
    pid: u16,
) -> Pin<Box<dyn Future<Output = Done> + Send>> {
    Box::pin(async move {
        // The original's commit is a group commit away (milliseconds); give up after 30 s.
        for _ in 0..15_000 {
            match session.state.lock().inbound_qos2.get(&pid).copied() {
                Some(true) => return Done::DupPubrec { pid, ok: true },
                None => return Done::DupPubrec { pid, ok: false },
                Some(false) => {}
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Done::DupPubrec { pid, ok: false }
    })
}

/// Commits an outbound QoS 2 Release, then lets the connection send PUBREL.
fn release_then_pubrel(
    durable: fleetmq_cluster::Durable,
    key: SessionKey,
    seq: u64,
    pid: u16,
) -> Pin<Box<dyn Future<Output = Done> + Send>> {
    Box::pin(async move {
        let result = durable
            .propose(Command::Release { key, seq })
            .await
            .map(|_| ());
        Done::Released { pid, result }
    })
}

/// Proposes commands together (they join the same group commit, in order) and waits for all.
async fn commit_all(
    durable: &fleetmq_cluster::Durable,
    cmds: Vec<Command>,
) -> Result<(), ClusterError> {
    commit_all_indexed(durable, cmds).await.map(|_| ())
}

/// Commits `cmds`; returns where they were committed (the highest index per group).
async fn commit_all_indexed(
    durable: &fleetmq_cluster::Durable,
    cmds: Vec<Command>,
) -> Result<fleetmq_cluster::Progress, ClusterError> {
    let done =
        futures_util::future::try_join_all(cmds.into_iter().map(|c| durable.propose_indexed(c)))
            .await?;
    let mut progress = fleetmq_cluster::Progress::default();
    for (_, p) in &done {
        progress.merge(p);
    }
    Ok(progress)
}

/// What `poll_io` saw first.
enum Io {
    Wrote(std::io::Result<usize>),
    Read(std::io::Result<usize>),
}

/// Waits until some of `wbuf` is written or something is read into `rbuf` (if `read`).
///
/// Once `wbuf` is empty after writes, the stream is flushed (`flush_owed`): TLS and WebSocket
/// streams buffer what `poll_write` accepted and send it only on a flush (plain TCP's flush is a
/// no-op), so without it a CONNACK could sit in a WebSocket buffer until the client pings.
fn poll_io<'a, S: AsyncRead + AsyncWrite + Unpin>(
    stream: &'a mut S,
    rbuf: &'a mut BytesMut,
    wbuf: &'a BytesMut,
    read: bool,
    flush_owed: &'a mut bool,
) -> impl Future<Output = Io> + 'a {
    std::future::poll_fn(move |cx| {
        if !wbuf.is_empty() {
            if let Poll::Ready(r) = Pin::new(&mut *stream).poll_write(cx, wbuf) {
                return Poll::Ready(Io::Wrote(r));
            }
        } else if *flush_owed {
            match Pin::new(&mut *stream).poll_flush(cx) {
                Poll::Ready(Ok(())) => *flush_owed = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Io::Wrote(Err(e))),
                Poll::Pending => {}
            }
        }
        if read {
            if rbuf.capacity() == rbuf.len() {
                rbuf.reserve(64);
            }
            let mut rb = ReadBuf::uninit(rbuf.spare_capacity_mut());
            if let Poll::Ready(r) = Pin::new(&mut *stream).poll_read(cx, &mut rb) {
                let n = rb.filled().len();
                // SAFETY: `poll_read` initialised the first `n` bytes of the spare capacity.
                unsafe { rbuf.set_len(rbuf.len() + n) };
                return Poll::Ready(Io::Read(r.map(|()| n)));
            }
        }
        Poll::Pending
    })
}

/// MQTT 5 topic aliases in both directions, allocated on first use.
#[derive(Default)]
struct Aliases {
    /// Topic → alias we assigned for this client.
    out: HashMap<String, u16>,
    /// Alias → topic the client assigned.
    inbound: HashMap<u16, String>,
}

/// How a connection reached the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    Tcp,
    Tls,
    Ws,
    Wss,
}

impl TransportKind {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Tls => "tls",
            TransportKind::Ws => "ws",
            TransportKind::Wss => "wss",
        }
    }
}

/// What the listener knows about a connection besides its bytes.
#[derive(Debug, Clone)]
pub struct Transport {
    pub kind: TransportKind,
    /// The client certificate chain, on TLS with a client certificate (never on WSS: §1.1).
    pub peer_cert: Option<Box<crate::identity::PeerCert>>,
}

impl Transport {
    /// Plain TCP.
    pub fn tcp() -> Transport {
        Transport {
            kind: TransportKind::Tcp,
            peer_cert: None,
        }
    }
}

/// Serves one client connection until it closes.
pub async fn serve<S>(broker: Arc<Broker>, stream: S, peer: SocketAddr, transport: Transport)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    broker.metrics.connections.increment(1.0);

    let mut conn = Conn {
        decoder: Decoder::new(broker.cfg.max_packet_size),
        broker: broker.clone(),
        stream,
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        peer,
        conn_id: broker.next_id(),
        version: ProtocolVersion::V311,
        flush_owed: false,
        last_write: Instant::now(),
        counts: Counts::default(),
    };
    conn.run(transport).await;
    broker.metrics.connections.decrement(1.0);
}

struct Conn<S> {
    broker: Arc<Broker>,
    /// Not split into halves: one future polls both directions (see `poll_io`), which spares
    /// every connection the `Arc` that `tokio::io::split` allocates.
    stream: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    decoder: Decoder,
    peer: SocketAddr,
    conn_id: u64,
    version: ProtocolVersion,
    /// Bytes were written since the last completed flush (see `poll_io`).
    flush_owed: bool,
    /// Last time a write made progress (for the stalled-write timeout).
    last_write: Instant,
    /// Message counts not yet added to the shared metrics (see `Counts`).
    counts: Counts,
}

/// Per-connection message counters, added to the shared Prometheus counters once per socket
/// read or write pass instead of once per message: four shared atomic increments per message
/// were a tenth of the broker's CPU under QoS 0 fan-in (cache lines bouncing between cores).
#[derive(Default)]
struct Counts {
    // u32: flushed every pass, and half the size in every connection's task.
    messages_in: [u32; 3],
    messages_out: [u32; 3],
    acks_in: [u32; 4],
    acks_out: [u32; 4],
}

/// Who is connected, the limits of their tenant, whether reading is paused for its rate, and
/// the other per-connection settings that are read rarely. Boxed: one pointer in every idle
/// connection's task instead of ~150 bytes. The task's future (888 bytes, measured with
/// `size_of_val` in the accept loop) plus tokio's 128-byte-aligned header must stay within
/// jemalloc's 1 KiB size class: at 936 bytes it fell into the 1280 class and every idle
/// connection cost ~190 bytes more RSS.
struct Who {
    identity: Identity,
    limits: Limits,
    /// Reading is paused until then: the tenant is over its message or byte rate.
    paused_until: Option<Instant>,
    tenant: Arc<Tenant>,
    /// Boxed: most devices have no will, and an inline one would size every connection.
    will: Option<Box<Will>>,
    /// Expiry requested at CONNECT, to check DISCONNECT's change against (MQTT-3.14.2-2).
    connect_expiry: u32,
    expiry_override: Option<u32>,
    client_max_packet: usize,
    aliases: Option<Box<Aliases>>,
    /// Subscribed to a device-API downstream topic: the device's `c8y_Connection` follows
    /// this connection.
    downstream: bool,
}

/// Per-connection state once CONNECT is accepted.
struct Active {
    session: Arc<Session>,
    /// What is rarely touched lives behind this one pointer (see `Who`).
    who: Box<Who>,
    persistent: bool,
    keep_alive: Option<Duration>,
    window: usize,
    client_alias_max: u16,
    /// Durable deliveries acknowledged during the current read, committed together.
    acks: Vec<u64>,
    inbound_unacked: usize,
    pending: PendingQueue,
    kick: oneshot::Receiver<Kick>,
    problem_info: bool,
    sample: u32,
    last_activity: Instant,
}

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn run(&mut self, transport: Transport) {
        // The rare phases (CONNECT, teardown) are boxed so their large state does not size
        // the task of every idle connection.
        let connect = match Box::pin(self.read_connect()).await {
            Ok(Some(c)) => c,
            Ok(None) => return,
            Err(e) => {
                metrics::counter_protocol_error(e.label());
                tracing::info!(peer = %self.peer, error = %e, "rejected before CONNECT");
                if let DecodeError::UnsupportedProtocol(_) = e {
                    // 3.1.1 format: the only CONNACK every client version can parse.
                    self.wbuf.extend_from_slice(&[0x20, 0x02, 0x00, 0x01]);
                    let _ = self.flush().await;
                }
                return;
            }
        };
        let Some(mut active) = Box::pin(self.accept_connect(connect, transport)).await else {
            let _ = self.flush().await;
            return;
        };
        let close = self.serve_session(&mut active).await;
        Box::pin(self.finish(active, close)).await;
    }

    /// Reads until CONNECT arrives (or the connect timeout passes).
    async fn read_connect(&mut self) -> Result<Option<Box<Connect>>, DecodeError> {
        let deadline = Instant::now() + Duration::from_secs(self.broker.cfg.connect_timeout_secs);
        loop {
            if let Some(packet) = self.decoder.decode(&mut self.rbuf)? {
                return match packet {
                    Incoming::Connect(c) => Ok(Some(c)),
                    _ => Err(DecodeError::FirstPacketNotConnect),
                };
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.rbuf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(n)) => self.broker.metrics.bytes_in.increment(n as u64),
                Err(_) => {
                    tracing::debug!(peer = %self.peer, "no CONNECT in time");
                    metrics::counter_protocol_error("connect_timeout");
                    return Ok(None);
                }
            }
        }
    }

    fn connack_error(&mut self, code: u8, why: &'static str) {
        metrics::connect_result(why);
        tracing::info!(peer = %self.peer, code, why, "CONNECT refused");
        encode::encode_connack(
            self.version,
            false,
            code,
            &ConnAckProps::default(),
            &mut self.wbuf,
        );
    }

    /// Validates CONNECT, attaches the session and writes CONNACK plus any redeliveries.
    async fn accept_connect(&mut self, c: Box<Connect>, transport: Transport) -> Option<Active> {
        // Moved out so the box is freed now, not when the connection ends.
        let c = *c;
        let broker = self.broker.clone();
        let cfg = &broker.cfg;
        self.version = c.version;
        metrics::packet_in("connect");
        if broker.draining.load(std::sync::atomic::Ordering::Acquire) {
            // Before authentication: a drained node does no work for new clients.
            self.connack_error(rc::USE_ANOTHER_SERVER, "draining");
            return None;
        }
        if c.authentication_method.is_some() {
            self.connack_error(rc::BAD_AUTHENTICATION_METHOD, "bad_auth_method");
            return None;
        }
        let mut assigned = None;
        let client_id = if c.client_id.is_empty() {
            if !c.version.is_v5() && !c.clean_start {
                self.connack_error(rc::CLIENT_ID_NOT_VALID, "empty_client_id");
                return None;
            }
            let id = format!("fleetmq-{:016x}", rand::random::<u64>());
            assigned = Some(id.clone());
            id
        } else {
            c.client_id.clone()
        };
        if client_id.len() > 256 || client_id.contains('\0') {
            self.connack_error(rc::CLIENT_ID_NOT_VALID, "bad_client_id");
            return None;
        }
        // `[d:]<device id>[:<template>]`: the device identifier alone names the session.
        let mut default_xid = None;
        let device_id = if assigned.is_some() {
            client_id.clone()
        } else {
            match client_id::parse(&client_id) {
                Ok(id) => {
                    default_xid = id.default_template;
                    id.device_id
                }
                Err(e) => {
                    tracing::info!(peer = %self.peer, error = %e, "malformed ClientId");
                    self.connack_error(rc::CLIENT_ID_NOT_VALID, "bad_client_id");
                    return None;
                }
            }
        };
        let identity = match self.authenticate(&c, &device_id, &transport).await {
            Ok(i) => i,
            Err(e) => {
                metrics::auth_failure(e.label(), transport.kind.label());
                let code = match e {
                    AuthError::BadCredentials => rc::BAD_USERNAME_OR_PASSWORD,
                    AuthError::NotAuthorized(_) => rc::NOT_AUTHORIZED,
                    AuthError::Throttled => rc::CONNECTION_RATE_EXCEEDED,
                    AuthError::Unavailable => rc::SERVER_UNAVAILABLE,
                };
                // The username is logged to trace attacks; the password never is.
                tracing::info!(peer = %self.peer, user = ?c.username, device = %device_id, error = %e, "login refused");
                self.connack_error(code, e.label());
                return None;
            }
        };
        if let Some(w) = &c.will {
            if validate_topic_name(&w.topic, &broker.limits).is_err() {
                self.connack_error(rc::TOPIC_NAME_INVALID, "bad_will_topic");
                return None;
            }
            if !acl::may_publish(identity.role, acl::classify_topic(&w.topic)) {
                tracing::info!(peer = %self.peer, topic = %w.topic, "will on a forbidden topic");
                self.connack_error(rc::NOT_AUTHORIZED, "forbidden_will_topic");
                return None;
            }
        }
        let limits = broker.tenant_limits(&identity.tenant);
        let tenant_rt = broker.tenant(&identity.tenant.id);
        let requested_expiry = if c.version.is_v5() {
            c.session_expiry.unwrap_or(0)
        } else if c.clean_start {
            0
        } else {
            u32::MAX
        };
        let expiry = requested_expiry.min(cfg.max_session_expiry);
        let keep_alive =
            if c.version.is_v5() && (c.keep_alive == 0 || c.keep_alive > cfg.max_keep_alive) {
                cfg.max_keep_alive
            } else {
                c.keep_alive
            };
        let key = SessionKey::new(identity.tenant.id.clone(), device_id);
        // A takeover replaces a connection rather than adding one: the connection limits
        // must not lock a device out while its old connection (e.g. behind a dead NAT) lingers.
        let takeover = broker.is_connected(&key);
        if !takeover
            && broker
                .connections
                .load(std::sync::atomic::Ordering::Relaxed)
                >= cfg.max_connections
        {
            self.connack_error(rc::QUOTA_EXCEEDED, "connection_limit");
            return None;
        }
        if !takeover
            && tenant_rt
                .usage
                .connections
                .load(std::sync::atomic::Ordering::Relaxed)
                >= limits.connections
        {
            metrics::quota_exceeded(&identity.tenant.id, "connections");
            self.connack_error(rc::QUOTA_EXCEEDED, "tenant_connection_quota");
            return None;
        }
        if expiry > 0
            && tenant_rt
                .usage
                .sessions
                .load(std::sync::atomic::Ordering::Relaxed)
                >= limits.sessions
            && !broker.has_persistent_session(&key)
        {
            metrics::quota_exceeded(&identity.tenant.id, "sessions");
            self.connack_error(rc::QUOTA_EXCEEDED, "tenant_session_quota");
            return None;
        }
        self.decoder.set_max_packet_size(limits.max_packet());
        let attached = match broker
            .attach(
                key.clone(),
                self.conn_id,
                c.clean_start,
                expiry,
                c.version.level(),
            )
            .await
        {
            Ok(a) => a,
            Err(_) if broker.draining.load(std::sync::atomic::Ordering::Acquire) => {
                broker.abandon(&key, self.conn_id);
                self.connack_error(rc::USE_ANOTHER_SERVER, "draining");
                return None;
            }
            Err(e) => {
                tracing::error!(error = %e, "durable session write failed");
                // The session was attached in memory before the commit failed: let go of it,
                // so it does not look connected forever.
                broker.abandon(&key, self.conn_id);
                self.connack_error(rc::SERVER_UNAVAILABLE, "storage_error");
                return None;
            }
        };
        self.broker
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        attached
            .tenant
            .usage
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let props = ConnAckProps {
            session_expiry: (c.version.is_v5() && expiry != requested_expiry).then_some(expiry),
            receive_maximum: Some(cfg.receive_maximum),
            maximum_packet_size: Some(u32::try_from(limits.max_packet()).unwrap_or(u32::MAX)),
            assigned_client_id: assigned,
            topic_alias_maximum: Some(cfg.topic_alias_maximum),
            server_keep_alive: (keep_alive != c.keep_alive).then_some(keep_alive),
            ..ConnAckProps::default()
        };
        encode::encode_connack(
            self.version,
            attached.session_present,
            rc::SUCCESS,
            &props,
            &mut self.wbuf,
        );
        metrics::packet_out("connack");
        metrics::connect_result("accepted");
        tracing::debug!(peer = %self.peer, client = %client_id, present = attached.session_present, "connected");
        let window = c.receive_maximum.unwrap_or(u16::MAX).min(cfg.max_inflight) as usize;
        attached.session.state.lock().default_xid = default_xid;
        let mut active = Active {
            session: attached.session,
            who: Box::new(Who {
                identity,
                limits,
                paused_until: None,
                tenant: attached.tenant,
                will: c.will.map(Box::new),
                connect_expiry: requested_expiry,
                expiry_override: None,
                client_max_packet: c
                    .maximum_packet_size
                    .map(|m| m as usize)
                    .unwrap_or(usize::MAX),
                aliases: None,
                downstream: false,
            }),
            persistent: expiry > 0,
            keep_alive: (keep_alive > 0).then(|| Duration::from_millis(keep_alive as u64 * 1500)),
            window,
            client_alias_max: if c.version.is_v5() {
                c.topic_alias_maximum.unwrap_or(0)
            } else {
                0
            },
            acks: Vec::new(),
            inbound_unacked: 0,
            pending: PendingQueue::default(),
            kick: attached.kick,
            problem_info: c.request_problem_info.unwrap_or(1) == 1,
            sample: 0,
            last_activity: Instant::now(),
        };
        self.redeliver(&mut active);
        Some(active)
    }

    /// Decides who the client is: a client certificate wins over a username (§1.5: a device
    /// presenting a certificate is judged on it), then `<tenant>/<user>` with a password, then
    /// anonymous access if the node allows it.
    async fn authenticate(
        &mut self,
        c: &Connect,
        device_id: &str,
        transport: &Transport,
    ) -> Result<Identity, AuthError> {
        let auth = self.broker.auth.clone();
        let identity = if let Some(cert) = &transport.peer_cert {
            auth.login_cert(cert, device_id).await?
        } else if let Some(user) = &c.username {
            match c.password.as_deref() {
                // §1.7: an empty password is "not authorized", not "bad password".
                None | Some([]) => return Err(AuthError::NotAuthorized("empty password")),
                Some(pw) => auth.login_password(self.peer.ip(), user, pw).await?,
            }
        } else {
            auth.anonymous()
                .ok_or(AuthError::NotAuthorized("credentials required"))?
        };
        // A device user may only be its own device: otherwise one device's credentials could
        // take over (and read) another device's session.
        if identity.role == Role::Device && !identity.cert {
            let bound = identity.user.strip_prefix("device_");
            if bound != Some(device_id) {
                return Err(AuthError::NotAuthorized(
                    "device user connects with another device identifier",
                ));
            }
        }
        Ok(identity)
    }

    /// After (re)connecting: resend unacknowledged PUBLISHes with DUP, and PUBRELs, in order.
    fn redeliver(&mut self, a: &mut Active) {
        let session = a.session.clone();
        let mut st = session.state.lock();
        let now = now_ms();
        // Everything in flight counts against the client's (possibly smaller) new Receive
        // Maximum (MQTT-3.3.4-9). PUBLISHes beyond it go back to the front of the queue, in
        // order, and are resent as the window opens.
        let in_order = st.inflight_in_order();
        // QoS 2 deliveries past PUBREC must be completed whatever the window: they count first.
        let releasing = in_order
            .iter()
            .filter(|(_, i)| i.state != InflightState::AwaitAck)
            .count();
        let mut budget = a.window.saturating_sub(releasing);
        let mut requeue = Vec::new();
        for (pid, inflight) in in_order {
            match inflight.state {
                InflightState::AwaitAck if budget == 0 => {
                    st.inflight.remove(&pid);
                    let mut d = inflight.delivery;
                    d.dup = true;
                    requeue.push(d);
                }
                InflightState::AwaitAck => {
                    budget -= 1;
                    if !self.encode_delivery(a, pid, &inflight.delivery, true, now) {
                        st.inflight.remove(&pid);
                        if let Some(seq) = inflight.delivery.seq {
                            self.broker.durable.propose_nowait(Command::Ack {
                                key: a.session.key.clone(),
                                seq,
                            });
                        }
                    }
                }
                InflightState::Releasing if inflight.delivery.seq.is_some() => {
                    // The previous connection's Release may not be durable yet: PUBREL waits
                    // for it, as in `on_pubrec`.
                    if let Some(seq) = inflight.delivery.seq {
                        let durable = self.broker.durable.clone();
                        a.pending.push_back(release_then_pubrel(
                            durable,
                            a.session.key.clone(),
                            seq,
                            pid,
                        ));
                    }
                }
                InflightState::Releasing | InflightState::AwaitComp => {
                    if let Some(e) = st.inflight.get_mut(&pid) {
                        e.state = InflightState::AwaitComp;
                    }
                    self.write_ack(6, pid, 0);
                }
            }
        }
        for d in requeue.into_iter().rev() {
            st.queue.push_front(d);
        }
    }

    /// The main loop of a connected client.
    async fn serve_session(&mut self, a: &mut Active) -> Close {
        let session = a.session.clone();
        // One timer serves both the keep-alive and a write that makes no progress.
        let timer = tokio::time::sleep_until(self.next_deadline(a));
        tokio::pin!(timer);
        // Deliveries already queued (a resumed session) go out with the CONNACK.
        self.fill(a);
        loop {
            self.flush_counts();
            let max_pending = self.broker.cfg.receive_maximum as usize * 2;
            let spare_before = self.rbuf.capacity() - self.rbuf.len();
            // A client that does not read stops being read from (and fed) once its output
            // backs up; its messages wait in the bounded session queue instead.
            let backed_up = self.wbuf.len() >= MAX_UNWRITTEN;
            tokio::select! {
                biased;
                // Takeover and node shutdown both arrive here (one channel instead of two
                // futures in every idle connection).
                kick = &mut a.kick => {
                    return match kick {
                        Ok(Kick::Shutdown) => Close::Shutdown(rc::SERVER_SHUTTING_DOWN),
                        Ok(Kick::Drain) => Close::Shutdown(rc::USE_ANOTHER_SERVER),
                        Ok(k) => Close::Kicked(k),
                        Err(_) => Close::Kicked(Kick::TakenOver { session_continues: true }),
                    };
                }
                // One future for both directions: writing what is buffered (a single `write`,
                // cancel-safe, so other branches keep being served while a slow client
                // drains) and reading unless backpressure says not to.
                io = poll_io(
                    &mut self.stream,
                    &mut self.rbuf,
                    &self.wbuf,
                    a.pending.len() < max_pending && !backed_up && a.who.paused_until.is_none(),
                    &mut self.flush_owed,
                ) => {
                    match io {
                        Io::Wrote(Ok(0)) | Io::Wrote(Err(_)) | Io::Read(Ok(0)) | Io::Read(Err(_)) => {
                            return Close::PeerClosed;
                        }
                        Io::Wrote(Ok(n)) => {
                            self.flush_owed = true;
                            self.wrote(n);
                            if !self.wbuf.is_empty() {
                                let due = self.next_deadline(a);
                                if due < timer.deadline() {
                                    timer.as_mut().reset(due);
                                }
                            }
                        }
                        Io::Read(Ok(n)) => {
                            self.broker.metrics.bytes_in.increment(n as u64);
                            a.last_activity = Instant::now();
                            let handled = self.on_bytes(a);
                            self.flush_acks(a);
                            if let Err(close) = handled {
                                return close;
                            }
                            self.size_read_buffer(n, spare_before);
                            // Over the tenant's rate: the one timer also ends the pause.
                            if let Some(until) = a.who.paused_until {
                                if until < timer.deadline() {
                                    timer.as_mut().reset(until);
                                }
                            }
                        }
                    }
                }
                Some(done) = a.pending.next(), if !a.pending.is_empty() => {
                    if let Err(close) = self.on_done(a, done) {
                        return close;
                    }
                }
                _ = session.notify.notified(), if !backed_up => self.fill(a),
                _ = &mut timer => {
                    let now = Instant::now();
                    if a.who.paused_until.is_some_and(|until| now >= until) {
                        // The rate pause is over: handle what is already buffered (it may pause
                        // again), and do not count the pause against the client's keep-alive.
                        a.who.paused_until = None;
                        a.last_activity = now;
                        let handled = self.on_bytes(a);
                        self.flush_acks(a);
                        if let Err(close) = handled {
                            return close;
                        }
                    }
                    if let Some(ka) = a.keep_alive.filter(|_| a.who.paused_until.is_none()) {
                        if now >= a.last_activity + ka {
                            tracing::info!(peer = %self.peer, client = %a.session.key.client_id, "keep-alive timeout");
                            return Close::KeepAlive;
                        }
                    }
                    if !self.wbuf.is_empty() && now >= self.last_write + WRITE_TIMEOUT {
                        tracing::info!(peer = %self.peer, client = %a.session.key.client_id, "client stopped reading");
                        return Close::PeerClosed;
                    }
                    timer.as_mut().reset(self.next_deadline(a));
                }
            }
        }
    }

    /// Adds the locally counted messages to the shared metrics.
    fn flush_counts(&mut self) {
        let m = &self.broker.metrics;
        let c = &mut self.counts;
        for t in 0..4 {
            if c.acks_in[t] > 0 {
                m.acks_in[t].increment(u64::from(c.acks_in[t]));
                c.acks_in[t] = 0;
            }
            if c.acks_out[t] > 0 {
                m.acks_out[t].increment(u64::from(c.acks_out[t]));
                c.acks_out[t] = 0;
            }
        }
        for q in 0..3 {
            if c.messages_in[q] > 0 {
                m.messages_in[q].increment(u64::from(c.messages_in[q]));
                m.publish_in.increment(u64::from(c.messages_in[q]));
                c.messages_in[q] = 0;
            }
            if c.messages_out[q] > 0 {
                m.messages_out[q].increment(u64::from(c.messages_out[q]));
                m.publish_out.increment(u64::from(c.messages_out[q]));
                c.messages_out[q] = 0;
            }
        }
    }

    /// When the timer must next look: keep-alive expiry, or a stalled write's deadline.
    fn next_deadline(&self, a: &Active) -> Instant {
        if let Some(until) = a.who.paused_until {
            return until;
        }
        let ka = a.keep_alive.map(|k| a.last_activity + k);
        let write = (!self.wbuf.is_empty()).then(|| self.last_write + WRITE_TIMEOUT);
        match (ka, write) {
            (Some(k), Some(w)) => k.min(w),
            (Some(k), None) => k,
            (None, Some(w)) => w,
            // Nothing to watch: look again later (a write may start meanwhile).
            (None, None) => Instant::now() + WRITE_TIMEOUT,
        }
    }

    /// Accounts for `n` bytes written from the front of the output buffer.
    fn wrote(&mut self, n: usize) {
        self.broker.metrics.bytes_out.increment(n as u64);
        self.last_write = Instant::now();
        if n >= self.wbuf.len() {
            // Everything is out: keep no buffer, so an idle connection holds none (a busy
            // one re-allocates per batch, which the allocator's thread cache absorbs).
            self.wbuf = BytesMut::new();
        } else {
            bytes::Buf::advance(&mut self.wbuf, n);
        }
    }

    /// Grows the read buffer while reads fill it (a busy publisher gets 64 KiB reads) and
    /// gives memory back once it drains, so an idle connection holds only a few hundred bytes.
    fn size_read_buffer(&mut self, last_read: usize, spare_before: usize) {
        if last_read >= spare_before {
            // The read filled the buffer: more is probably waiting, so read bigger next time.
            let grow = if last_read >= 4096 { READ_CHUNK } else { 4096 };
            self.rbuf.reserve(grow);
        } else if self.rbuf.is_empty() && (self.rbuf.capacity() > 4096 || last_read < 256) {
            // Traffic is quiet: an idle connection keeps no buffer (the next read starts with
            // a few bytes and grows again; jemalloc's thread cache makes that cheap).
            self.rbuf = BytesMut::new();
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.wbuf.is_empty() {
            let r = tokio::time::timeout(WRITE_TIMEOUT, self.stream.write_all(&self.wbuf)).await;
            self.wbuf.clear();
            r.map_err(|_| std::io::ErrorKind::TimedOut)??;
        }
        self.stream.flush().await
    }

    /// Decodes and handles every complete packet in the read buffer (until a rate pause).
    fn on_bytes(&mut self, a: &mut Active) -> Result<(), Close> {
        loop {
            if a.who.paused_until.is_some() {
                return Ok(());
            }
            let packet = match self.decoder.decode(&mut self.rbuf) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()),
                Err(e) => {
                    metrics::counter_protocol_error(e.label());
                    tracing::info!(peer = %self.peer, client = %a.session.key.client_id, error = %e, "closing on bad input");
                    return Err(Close::Violation(e.reason_code(), e.label()));
                }
            };
            match packet {
                Incoming::Publish(p) => self.on_publish(a, p)?,
                Incoming::PubAck { pkid, .. } => {
                    self.counts.acks_in[0] += 1;
                    self.on_outbound_done(a, pkid, InflightState::AwaitAck, 1);
                }
                Incoming::PubRec { pkid, reason } => {
                    self.counts.acks_in[1] += 1;
                    self.on_pubrec(a, pkid, reason);
                }
                Incoming::PubComp { pkid } => {
                    self.counts.acks_in[3] += 1;
                    self.on_outbound_done(a, pkid, InflightState::AwaitComp, 2);
                }
                Incoming::PubRel { pkid } => {
                    self.counts.acks_in[2] += 1;
                    self.on_pubrel(a, pkid);
                }
                Incoming::Subscribe(s) => {
                    metrics::packet_in("subscribe");
                    self.on_subscribe(a, s)?;
                }
                Incoming::Unsubscribe(u) => {
                    metrics::packet_in("unsubscribe");
                    self.on_unsubscribe(a, u);
                }
                Incoming::PingReq => {
                    metrics::packet_in("pingreq");
                    encode::encode_pingresp(&mut self.wbuf);
                    metrics::packet_out("pingresp");
                }
                Incoming::Disconnect(d) => {
                    metrics::packet_in("disconnect");
                    if let Some(e) = d.session_expiry {
                        if a.who.connect_expiry == 0 && e != 0 {
                            return Err(Close::Violation(
                                rc::PROTOCOL_ERROR,
                                "session expiry set on DISCONNECT after 0",
                            ));
                        }
                        a.who.expiry_override = Some(e.min(self.broker.cfg.max_session_expiry));
                    }
                    // Only reason 0x00 discards the will (MQTT-3.14.4-3): 0x04 asks for it, and
                    // a client reporting an error (>= 0x80) gets it too.
                    return Err(if d.reason == rc::SUCCESS {
                        Close::Normal
                    } else {
                        Close::WithWill
                    });
                }
                Incoming::Auth => {
                    metrics::counter_protocol_error("auth_unsupported");
                    return Err(Close::Violation(
                        rc::PROTOCOL_ERROR,
                        "AUTH without authentication method",
                    ));
                }
                Incoming::Connect(_) => {
                    return Err(Close::Violation(rc::PROTOCOL_ERROR, "second CONNECT"))
                }
            }
        }
    }

    fn on_publish(&mut self, a: &mut Active, p: Publish) -> Result<(), Close> {
        let broker = self.broker.clone();
        if let Some(c) = self.counts.messages_in.get_mut(p.qos as usize) {
            *c += 1;
        }
        if p.qos > 0
            && a.inbound_unacked >= broker.cfg.receive_maximum as usize
            && self.version.is_v5()
        {
            metrics::counter_protocol_error("receive_maximum_exceeded");
            return Err(Close::Violation(
                rc::RECEIVE_MAXIMUM_EXCEEDED,
                "receive maximum exceeded",
            ));
        }
        let topic = self.resolve_alias(a, &p)?;
        if topic.contains('\0') {
            // MQTT-1.5.4-2: a string with U+0000 makes the packet malformed.
            metrics::counter_protocol_error("malformed");
            return Err(Close::Violation(
                rc::MALFORMED_PACKET,
                "NUL character in topic name",
            ));
        }
        if validate_topic_name(&topic, &broker.limits).is_err() {
            metrics::counter_protocol_error("topic_name_invalid");
            tracing::info!(peer = %self.peer, client = %a.session.key.client_id, "invalid topic name in PUBLISH");
            return Err(Close::Violation(
                rc::TOPIC_NAME_INVALID,
                "invalid topic name",
            ));
        }
        let class = acl::classify_topic(&topic);
        let size = self.decoder.last_packet_size();
        let limit = if class == TopicClass::Free {
            a.who.limits.freeform_packet
        } else {
            a.who.limits.reserved_packet
        };
        if size > limit {
            metrics::counter_protocol_error("packet_too_large");
            metrics::quota_exceeded(&a.who.identity.tenant.id, "packet_size");
            tracing::info!(peer = %self.peer, client = %a.session.key.client_id, size, limit, topic = %topic, "PUBLISH over the topic's size limit");
            return Err(Close::Violation(
                rc::PACKET_TOO_LARGE,
                "packet too large for this topic",
            ));
        }
        if !acl::may_publish(a.who.identity.role, class) {
            metrics::acl_denied("publish");
            tracing::info!(peer = %self.peer, client = %a.session.key.client_id, topic = %topic, "PUBLISH to a forbidden topic");
            if !self.version.is_v5() {
                // 3.1.1 has no way to refuse a PUBLISH but closing (MQTT-3.3.5-2's
                // alternative to a positive ack); Cumulocity closes too (§1.7, code 5).
                return Err(Close::Violation(
                    rc::NOT_AUTHORIZED,
                    "publish not authorized",
                ));
            }
            match p.qos {
                0 => {}
                1 => self.write_ack(4, p.pkid, rc::NOT_AUTHORIZED),
                _ => self.write_ack(5, p.pkid, rc::NOT_AUTHORIZED),
            }
            return Ok(());
        }
        if let Some(wait) = a.who.tenant.usage.charge(&a.who.limits, size) {
            metrics::quota_exceeded(&a.who.identity.tenant.id, "rate");
            a.who.paused_until = Some(Instant::now() + wait);
        }
        if p.qos == 2 {
            let known = {
                let mut st = a.session.state.lock();
                let known = st.inbound_qos2.get(&p.pkid).copied();
                if known.is_none() {
                    st.inbound_qos2.insert(p.pkid, false);
                }
                known
            };
            match known {
                Some(true) => {
                    // Retransmission of a message we already took: acknowledge, never route
                    // it again.
                    self.write_ack(5, p.pkid, 0);
                    return Ok(());
                }
                Some(false) => {
                    // The original is still being committed (perhaps by the previous
                    // connection): PUBREC only once it is durable.
                    a.pending
                        .push_back(await_inbound_commit(a.session.clone(), p.pkid));
                    return Ok(());
                }
                None => {}
            }
        }
        let mut msg = Message::new(topic, p.payload, p.qos, p.retain, p.props);
        if p.retain {
            // Kept indefinitely: must not pin the 64 KiB read buffer its payload was sliced from.
            msg = msg.detached();
        }
        // §1.10: RETAIN on a device-interface topic is accepted and behaves as RETAIN=0.
        let retain_cmd =
            (p.retain && class == TopicClass::Free).then(|| broker.retain(&a.who.tenant, &msg));
        let mut prepared = broker.route(&a.who.tenant, &msg, Some(a.session.id));
        if let TopicClass::Upstream(kind) = class {
            // After the QoS 2 duplicate check: a retransmission is never processed twice.
            if let Some(work) =
                self.device_upstream(a, kind, &prepared.msg.topic, &prepared.msg.payload, p.pkid)
            {
                // Acknowledged once the device's data is committed, in the order sent.
                let ack = match p.qos {
                    0 => Ack::Nothing,
                    1 => Ack::Puback(p.pkid),
                    _ => Ack::Pubrec(p.pkid),
                };
                if p.qos > 0 {
                    a.inbound_unacked += 1;
                }
                a.pending.push_back(Box::pin(async move {
                    let result = work.await;
                    Done::Publish {
                        prepared,
                        ack,
                        result,
                    }
                }));
                return Ok(());
            }
        }
        if !p.retain && prepared.needs_commit() {
            // Queued for persistent sessions, possibly for a long time (offline devices): own
            // the payload instead of pinning the publisher's read buffer. Messages to
            // connected clean sessions stay zero-copy.
            prepared.msg = prepared.msg.detached();
        }
        // Other nodes with subscribers get it too (a QoS 1/2 publish is acknowledged once they
        // took it); persistent sessions elsewhere get it through Raft (`orphan_cmd`).
        let mut forward = None;
        let mut orphan_cmd = None;
        let mut share_cmd = None;
        if !prepared.device_api && !broker.cluster.is_alone() {
            let mut remote = broker.cluster.remote_nodes(&a.who.tenant.name, &msg.topic);
            remote.extend(prepared.share_remote.keys());
            if !remote.is_empty() {
                let f = broker.cluster.forward(
                    &remote,
                    &prepared.share_remote,
                    &a.who.tenant.name,
                    &prepared.msg,
                );
                if p.qos == 0 {
                    tokio::spawn(f);
                } else {
                    forward = Some(f);
                }
            }
            // Persistent sessions this node does not hold get it through Raft.
            orphan_cmd = broker.orphan_command(&a.who.tenant, &prepared.msg, Some(&a.session.key));
            // Shared groups no live node serves: one persistent member, through Raft.
            let served = &prepared.shares_served;
            share_cmd = broker.share_orphan_command(
                &a.who.tenant,
                &prepared.msg,
                Some(&a.session.key),
                |k| served.iter().any(|s| s == k),
            );
            prepared.remote = !remote.is_empty() || orphan_cmd.is_some() || share_cmd.is_some();
        }
        let inbound = (p.qos == 2 && a.persistent).then(|| (a.session.key.clone(), p.pkid));
        let with_inbound = inbound.is_some();
        let mut cmd = broker.publish_command(&prepared, Some(&a.session.key), inbound);
        if let Some(c) = cmd.take_if(|_| with_inbound) {
            // With the publisher's inbound QoS 2 id, every durable target goes in one command:
            // recorded in the publisher's shard with the id, so no target can be missed or
            // queued twice when the client sends the PUBLISH again.
            cmd = Some(crate::broker::with_outbox(
                c,
                orphan_cmd.take(),
                share_cmd.take(),
            ));
        }
        let ack = match p.qos {
            0 => Ack::Nothing,
            1 => Ack::Puback(p.pkid),
            _ => Ack::Pubrec(p.pkid),
        };
        if p.qos > 0 {
            a.inbound_unacked += 1;
        }
        if cmd.is_none()
            && retain_cmd.is_none()
            && forward.is_none()
            && orphan_cmd.is_none()
            && share_cmd.is_none()
            && a.pending.is_empty()
        {
            self.complete_publish(a, prepared, ack, Ok(Response::Ok))
        } else {
            let durable = broker.durable.clone();
            let fallback = broker.clone();
            // For a failed forward: which shared groups the failed nodes were to serve, and
            // what re-queueing them takes. Only built when a group went to another node (no
            // allocation on the usual path).
            let share_fallback =
                (forward.is_some() && !prepared.share_remote.is_empty()).then(|| {
                    (
                        prepared.share_remote.clone(),
                        prepared.msg.clone(),
                        a.who.tenant.clone(),
                        a.session.key.clone(),
                    )
                });
            a.pending.push_back(Box::pin(async move {
                // Both proposals are made at the first poll, in this order, so a later publish
                // of the same client can never get an earlier queue position.
                let retained = async {
                    match retain_cmd {
                        Some(rc) => durable.propose(rc).await.map(|_| ()),
                        None => Ok(()),
                    }
                };
                let published = async {
                    match cmd {
                        Some(c) => durable.propose(c).await,
                        None => Ok(Response::Ok),
                    }
                };
                let queue = |cmd: Option<Command>| {
                    let durable = durable.clone();
                    async move {
                        match cmd {
                            Some(c) => durable.propose(c).await.map(|_| ()),
                            None => Ok(()),
                        }
                    }
                };
                let queued = async {
                    let (o, s) =
                        futures_util::future::join(queue(orphan_cmd), queue(share_cmd)).await;
                    o.and(s)
                };
                let forwarded = async {
                    let Some(f) = forward else {
                        return Ok(());
                    };
                    let failed = f.await;
                    if failed.is_empty() {
                        return Ok(());
                    }
                    fallback.forward_failed(&failed);
                    let Some((share_remote, msg, tenant, publisher)) = share_fallback else {
                        return Ok(());
                    };
                    // The shared groups those nodes were picked for go to one persistent
                    // member each, through Raft, before the publisher is acknowledged.
                    let lost: Vec<&String> = share_remote
                        .iter()
                        .filter(|(n, _)| failed.contains(n))
                        .flat_map(|(_, keys)| keys)
                        .collect();
                    if lost.is_empty() {
                        return Ok(());
                    }
                    match fallback.share_orphan_command(&tenant, &msg, Some(&publisher), |k| {
                        !lost.iter().any(|l| *l == k)
                    }) {
                        Some(c) => durable.propose(c).await.map(|_| ()),
                        None => Ok(()),
                    }
                };
                let (r, p, q, f) =
                    futures_util::future::join4(retained, published, queued, forwarded).await;
                let result = r.and(q).and(f).and(p);
                Done::Publish {
                    prepared,
                    ack,
                    result,
                }
            }));
            Ok(())
        }
    }

    /// Device-interface requests this layer answers itself: the bootstrap poll (`s/ucr`) and
    /// the token request (`s/uat`). The rest of the device API (SmartREST, JSON via MQTT) is
    /// counted here and processed by the device pipeline.
    fn device_upstream(
        &mut self,
        a: &Active,
        kind: Upstream,
        topic: &str,
        payload: &bytes::Bytes,
        pkid: u16,
    ) -> Option<crate::device::Work> {
        metrics::device_api(match kind {
            Upstream::Static => "static",
            Upstream::Custom => "custom",
            Upstream::Default => "default",
            Upstream::Template => "template",
            Upstream::Credentials => "credentials",
            Upstream::Token => "token",
            Upstream::SmartRest1 => "smartrest1",
            Upstream::Json => "json",
        });
        let broker = self.broker.clone();
        let session = a.session.clone();
        match kind {
            Upstream::Static
            | Upstream::Json
            | Upstream::Custom
            | Upstream::Default
            | Upstream::Template => {
                return crate::device::publish(
                    &broker,
                    &session,
                    &a.who.identity.user,
                    topic,
                    payload,
                    pkid,
                );
            }
            Upstream::Credentials if a.who.identity.role == Role::Bootstrap => {
                tokio::spawn(async move {
                    match bootstrap::poll(&broker.auth.dir, &session.key.client_id).await {
                        Ok(Some(creds)) => {
                            broker.send_downstream(&session, "s/dcr", creds.smartrest().into());
                        }
                        Ok(None) => {}
                        Err(e) => tracing::error!(error = %e, "bootstrap poll failed"),
                    }
                });
            }
            Upstream::Token => {
                let identity = a.who.identity.clone();
                let lifetime = broker.cfg.device_token_lifetime_secs;
                tokio::spawn(async move {
                    if !identity.cert {
                        broker.send_downstream(
                            &session,
                            "s/e",
                            "41,,MqttAuth: Cannot publish token for device that do not use certificate authentication".into(),
                        );
                        return;
                    }
                    match token::issue(&broker.auth.dir, &identity, lifetime).await {
                        Ok(jwt) => {
                            broker.send_downstream(&session, "s/dat", format!("71,{jwt}").into());
                        }
                        Err(e) => tracing::error!(error = %e, "issuing a device token failed"),
                    }
                });
            }
            _ => {}
        }
        None
    }

    /// MQTT 5 topic aliases from the client: set or use the mapping; errors per spec 3.3.2.3.4.
    fn resolve_alias(&mut self, a: &mut Active, p: &Publish) -> Result<String, Close> {
        let Some(alias) = p.props.topic_alias else {
            return Ok(p.topic.clone());
        };
        if alias > self.broker.cfg.topic_alias_maximum {
            metrics::counter_protocol_error("topic_alias_invalid");
            return Err(Close::Violation(
                rc::TOPIC_ALIAS_INVALID,
                "topic alias above maximum",
            ));
        }
        if p.topic.is_empty() {
            match a.who.aliases.as_ref().and_then(|x| x.inbound.get(&alias)) {
                Some(t) => Ok(t.clone()),
                None => {
                    metrics::counter_protocol_error("topic_alias_unknown");
                    Err(Close::Violation(rc::PROTOCOL_ERROR, "unknown topic alias"))
                }
            }
        } else {
            a.who
                .aliases
                .get_or_insert_with(Box::default)
                .inbound
                .insert(alias, p.topic.clone());
            Ok(p.topic.clone())
        }
    }

    /// Delivers a committed (or non-durable) message and acknowledges it to its publisher.
    fn complete_publish(
        &mut self,
        a: &mut Active,
        prepared: Prepared,
        ack: Ack,
        result: Result<Response, ClusterError>,
    ) -> Result<(), Close> {
        let (reason, ok) = match result {
            Ok(Response::Published { seqs } | Response::Outboxed { seqs, .. }) => {
                let matched =
                    !prepared.matches.is_empty() || prepared.device_api || prepared.remote;
                self.broker.deliver(prepared, &seqs);
                (
                    if matched {
                        rc::SUCCESS
                    } else {
                        rc::NO_MATCHING_SUBSCRIBERS
                    },
                    true,
                )
            }
            Ok(Response::DuplicateInbound) => (rc::SUCCESS, true),
            Ok(Response::Ok | Response::Exists | Response::Kept | Response::Device(_)) => {
                let matched =
                    !prepared.matches.is_empty() || prepared.device_api || prepared.remote;
                self.broker.deliver(prepared, &[]);
                (
                    if matched {
                        rc::SUCCESS
                    } else {
                        rc::NO_MATCHING_SUBSCRIBERS
                    },
                    true,
                )
            }
            Err(e) => {
                tracing::error!(error = %e, client = %a.session.key.client_id, "durable publish failed");
                metrics::dropped("storage_error", 1);
                (rc::IMPLEMENTATION_SPECIFIC, false)
            }
        };
        if let Ack::Pubrec(pid) = ack {
            let mut st = a.session.state.lock();
            if ok {
                st.inbound_qos2.insert(pid, true);
            } else {
                // Not taken: a retransmission must be routed, not acknowledged.
                st.inbound_qos2.remove(&pid);
            }
        }
        if !ok && !self.version.is_v5() && !matches!(ack, Ack::Nothing) {
            // 3.1.1 cannot refuse a PUBLISH: closing without an ack makes the client resend.
            return Err(Close::Violation(
                rc::UNSPECIFIED_ERROR,
                "storage unavailable",
            ));
        }
        match ack {
            Ack::Nothing => {}
            Ack::Puback(pid) => {
                self.write_ack(4, pid, reason);
                a.inbound_unacked = a.inbound_unacked.saturating_sub(1);
            }
            Ack::Pubrec(pid) => {
                if !ok {
                    a.inbound_unacked = a.inbound_unacked.saturating_sub(1);
                }
                self.write_ack(5, pid, reason);
            }
        }
        Ok(())
    }

    /// Writes PUBACK (4), PUBREC (5), PUBREL (6) or PUBCOMP (7) and counts it.
    fn write_ack(&mut self, packet_type: u8, pkid: u16, reason: u8) {
        encode::encode_ack(self.version, packet_type, pkid, reason, &mut self.wbuf);
        if let Some(c) = self
            .counts
            .acks_out
            .get_mut(packet_type.wrapping_sub(4) as usize)
        {
            *c += 1;
        }
    }

    fn on_pubrel(&mut self, a: &mut Active, pkid: u16) {
        let known = a.session.state.lock().inbound_qos2.remove(&pkid).is_some();
        if !known {
            self.write_ack(7, pkid, rc::PACKET_ID_NOT_FOUND);
            return;
        }
        a.inbound_unacked = a.inbound_unacked.saturating_sub(1);
        if a.persistent {
            // PUBCOMP only after the id is durably forgotten: otherwise a crash would make a new
            // message that reuses the id look like a duplicate and be lost.
            let durable = self.broker.durable.clone();
            let key = a.session.key.clone();
            a.pending.push_back(Box::pin(async move {
                let result = durable
                    .propose(Command::InboundRelease { key, pid: pkid })
                    .await
                    .map(|_| ());
                Done::InboundReleased { pid: pkid, result }
            }));
        } else if a.pending.is_empty() {
            self.write_ack(7, pkid, 0);
        } else {
            a.pending.push_back(Box::pin(async move {
                Done::InboundReleased {
                    pid: pkid,
                    result: Ok(()),
                }
            }));
        }
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) from the client ends a delivery.
    fn on_outbound_done(&mut self, a: &mut Active, pkid: u16, expected: InflightState, qos: u8) {
        let removed = {
            let mut st = a.session.state.lock();
            match st.inflight.get(&pkid) {
                Some(i) if i.state == expected && i.delivery.qos == qos => {
                    st.inflight.remove(&pkid)
                }
                _ => None,
            }
        };
        if let Some(i) = removed {
            if let Some(seq) = i.delivery.seq {
                // Collected and committed as one command per read (see `flush_acks`).
                a.acks.push(seq);
            }
            self.fill(a);
        }
    }

    /// Commits the acknowledgements collected while handling one read.
    fn flush_acks(&mut self, a: &mut Active) {
        if !a.acks.is_empty() {
            let seqs = std::mem::take(&mut a.acks);
            self.broker.durable.propose_nowait(Command::AckMany {
                key: a.session.key.clone(),
                seqs,
            });
        }
    }

    fn on_pubrec(&mut self, a: &mut Active, pkid: u16, reason: u8) {
        let mut st = a.session.state.lock();
        let Some(entry) = st.inflight.get_mut(&pkid) else {
            drop(st);
            self.write_ack(6, pkid, rc::PACKET_ID_NOT_FOUND);
            return;
        };
        if entry.state != InflightState::AwaitAck || entry.delivery.qos != 2 {
            // A duplicate PUBREC: answer with PUBREL again, as the flow expects.
            let releasing = entry.state == InflightState::Releasing;
            drop(st);
            if !releasing {
                self.write_ack(6, pkid, 0);
            }
            return;
        }
        if reason >= 0x80 {
            // The client refused the message: the delivery is over.
            let seq = entry.delivery.seq;
            st.inflight.remove(&pkid);
            drop(st);
            if let Some(seq) = seq {
                self.broker.durable.propose_nowait(Command::Ack {
                    key: a.session.key.clone(),
                    seq,
                });
            }
            self.fill(a);
            return;
        }
        match entry.delivery.seq {
            Some(seq) => {
                // After PUBREC the PUBLISH must never be sent again; make that durable first.
                entry.state = InflightState::Releasing;
                drop(st);
                let durable = self.broker.durable.clone();
                let key = a.session.key.clone();
                a.pending
                    .push_back(release_then_pubrel(durable, key, seq, pkid));
            }
            None => {
                entry.state = InflightState::AwaitComp;
                drop(st);
                self.write_ack(6, pkid, 0);
            }
        }
    }

    fn on_subscribe(&mut self, a: &mut Active, s: Subscribe) -> Result<(), Close> {
        let broker = self.broker.clone();
        if a.session.state.lock().conn != Some(self.conn_id) {
            // Taken over while this packet was still in our buffer: the session is no longer
            // ours to change (the kick that closes us is on its way).
            return Ok(());
        }
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut cmds = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut wants_operations = false;
        for f in s.filters {
            let (shared, inner) = match parse_shared(&f.filter) {
                Ok(Some((_, inner))) => (true, inner.to_string()),
                Ok(None) => (false, f.filter.clone()),
                Err(_) => {
                    codes.push(self.sub_failure(rc::TOPIC_FILTER_INVALID));
                    continue;
                }
            };
            if shared && f.no_local && self.version.is_v5() {
                metrics::counter_protocol_error("no_local_on_shared");
                return Err(Close::Violation(
                    rc::PROTOCOL_ERROR,
                    "no local on a shared subscription",
                ));
            }
            if f.filter.contains('\0') {
                // U+0000 makes the whole packet malformed (MQTT-1.5.4-2), not just this filter.
                metrics::counter_protocol_error("malformed");
                return Err(Close::Violation(
                    rc::MALFORMED_PACKET,
                    "NUL in topic filter",
                ));
            }
            if validate_topic_filter(&inner, &broker.limits).is_err() {
                tracing::info!(client = %a.session.key.client_id, filter = %f.filter, "invalid topic filter");
                codes.push(self.sub_failure(rc::TOPIC_FILTER_INVALID));
                continue;
            }
            let class = acl::classify_filter(&inner);
            if !acl::may_subscribe(a.who.identity.role, &f.filter, class)
                || (shared && class != FilterClass::Free)
            {
                metrics::acl_denied("subscribe");
                tracing::info!(client = %a.session.key.client_id, filter = %f.filter, "SUBSCRIBE to a forbidden filter");
                codes.push(self.sub_failure(rc::NOT_AUTHORIZED));
                continue;
            }
            let (count, known) = {
                let st = a.session.state.lock();
                (
                    st.subscriptions.len(),
                    st.subscriptions.contains_key(&f.filter),
                )
            };
            if !known && count >= broker.cfg.max_subscriptions {
                metrics::dropped("subscription_quota", 1);
                codes.push(self.sub_failure(rc::QUOTA_EXCEEDED));
                continue;
            }
            if !known
                && class == FilterClass::Free
                && a.who
                    .tenant
                    .usage
                    .subscriptions
                    .load(std::sync::atomic::Ordering::Relaxed)
                    >= a.who.limits.subscriptions
            {
                metrics::quota_exceeded(&a.who.identity.tenant.id, "subscriptions");
                codes.push(self.sub_failure(rc::QUOTA_EXCEEDED));
                continue;
            }
            let granted = f.qos.min(2);
            let opts = SubscriptionRecord {
                filter: f.filter,
                qos: granted,
                no_local: f.no_local,
                retain_as_published: f.retain_as_published,
                retain_handling: f.retain_handling,
                subscription_id: s.subscription_id,
            };
            let existed = broker.subscribe(&a.who.tenant, &a.session, opts.clone());
            // Retained messages go out now, before SUBACK (allowed by both versions), so a live
            // publish can never overtake the older retained one. A filter repeated within one
            // packet is served once, and the session queue bound caps the total.
            let first_time = seen.insert(opts.filter.clone());
            if first_time
                && !shared
                && class == FilterClass::Free
                && (opts.retain_handling == 0 || (opts.retain_handling == 1 && !existed))
            {
                for m in a.who.tenant.retained_matching(&inner) {
                    let d = Delivery {
                        qos: m.qos.min(granted),
                        msg: m,
                        retain: true,
                        sub_ids: opts.subscription_id.into_iter().collect(),
                        seq: None,
                        dup: false,
                    };
                    if !broker.enqueue(&a.session, d) {
                        break;
                    }
                }
            }
            if a.persistent {
                cmds.push(Command::Subscribe {
                    key: a.session.key.clone(),
                    sub: opts,
                });
            }
            if class == FilterClass::Downstream
                && ["s/ds", crate::device::deliver::NOTIFICATIONS]
                    .iter()
                    .any(|t| fleetmq_protocol::topic::matches(&inner, t))
            {
                wants_operations = true;
            }
            codes.push(granted);
        }
        let pkid = s.pkid;
        // (The bootstrap user may subscribe to s/dcr and s/e only: never here.)
        if wants_operations {
            a.who.downstream = true;
            // §2.4: pending operations go out again on every downstream subscription. They
            // usually follow the SUBACK (a Raft round later); MQTT allows them before it too.
            tokio::spawn(crate::device::resend_pending(
                broker.clone(),
                a.session.clone(),
                a.who.identity.user.clone(),
                self.conn_id,
            ));
        }
        // A new route must be known to every node before SUBACK, so that no publish made
        // after the SUBACK anywhere in the cluster misses this subscription.
        let routes = broker.cluster.routes_pending();
        if cmds.is_empty() && routes.is_none() && a.pending.is_empty() {
            self.write_suback(pkid, &codes);
        } else {
            let durable = broker.durable.clone();
            let cluster = broker.cluster.clone();
            a.pending.push_back(Box::pin(async move {
                let persistent = !cmds.is_empty();
                let result = commit_all_indexed(&durable, cmds).await;
                match &result {
                    // A persistent subscription: every node must have applied it (publishers
                    // queue for it from their copy of the log) and have the routes.
                    Ok(index) if persistent => cluster.sync_peers(index.clone()).await,
                    _ => {
                        if let Some(r) = routes {
                            r.await;
                        }
                    }
                }
                let result = result.map(|_| ());
                Done::Suback {
                    pkid,
                    codes,
                    result,
                }
            }));
        }
        Ok(())
    }

    fn sub_failure(&self, v5_code: u8) -> u8 {
        if self.version.is_v5() {
            v5_code
        } else {
            fleetmq_protocol::reason::v3::SUBACK_FAILURE
        }
    }

    fn write_suback(&mut self, pkid: u16, codes: &[u8]) {
        encode::encode_suback(self.version, pkid, codes, &mut self.wbuf);
        metrics::packet_out("suback");
    }

    fn on_unsubscribe(&mut self, a: &mut Active, u: Unsubscribe) {
        if a.session.state.lock().conn != Some(self.conn_id) {
            return; // taken over; see on_subscribe
        }
        let mut codes = Vec::with_capacity(u.filters.len());
        let mut cmds = Vec::new();
        for f in u.filters {
            let existed = self.broker.unsubscribe(&a.who.tenant, &a.session, &f);
            codes.push(if existed {
                rc::SUCCESS
            } else {
                rc::NO_SUBSCRIPTION_EXISTED
            });
            if existed && a.persistent {
                cmds.push(Command::Unsubscribe {
                    key: a.session.key.clone(),
                    filter: f,
                });
            }
        }
        let pkid = u.pkid;
        if cmds.is_empty() && a.pending.is_empty() {
            encode::encode_unsuback(self.version, pkid, &codes, &mut self.wbuf);
            metrics::packet_out("unsuback");
        } else {
            let durable = self.broker.durable.clone();
            a.pending.push_back(Box::pin(async move {
                let result = commit_all(&durable, cmds).await;
                Done::Unsuback {
                    pkid,
                    codes,
                    result,
                }
            }));
        }
    }

    fn on_done(&mut self, a: &mut Active, done: Done) -> Result<(), Close> {
        match done {
            Done::Publish {
                prepared,
                ack,
                result,
            } => self.complete_publish(a, prepared, ack, result)?,
            Done::Suback {
                pkid,
                mut codes,
                result,
            } => {
                if let Err(e) = result {
                    tracing::error!(error = %e, "durable subscribe failed");
                    let fail = self.sub_failure(rc::UNSPECIFIED_ERROR);
                    codes.iter_mut().for_each(|c| *c = fail);
                }
                self.write_suback(pkid, &codes);
            }
            Done::Unsuback {
                pkid,
                codes,
                result,
            } => {
                if let Err(e) = result {
                    tracing::error!(error = %e, "durable unsubscribe failed");
                }
                encode::encode_unsuback(self.version, pkid, &codes, &mut self.wbuf);
                metrics::packet_out("unsuback");
            }
            Done::Released { pid, result } => {
                if let Err(e) = result {
                    tracing::error!(error = %e, "durable release failed");
                    return Err(Close::Violation(
                        rc::UNSPECIFIED_ERROR,
                        "storage unavailable",
                    ));
                }
                if let Some(e) = a.session.state.lock().inflight.get_mut(&pid) {
                    e.state = InflightState::AwaitComp;
                }
                self.write_ack(6, pid, 0);
            }
            Done::DupPubrec { pid, ok } => {
                if !ok && !self.version.is_v5() {
                    return Err(Close::Violation(
                        rc::UNSPECIFIED_ERROR,
                        "storage unavailable",
                    ));
                }
                let reason = if ok {
                    rc::SUCCESS
                } else {
                    rc::UNSPECIFIED_ERROR
                };
                self.write_ack(5, pid, reason);
            }
            Done::InboundReleased { pid, result } => {
                let reason = if result.is_ok() {
                    0
                } else {
                    rc::UNSPECIFIED_ERROR
                };
                self.write_ack(7, pid, reason);
            }
        }
        Ok(())
    }

    /// Moves queued deliveries into the write buffer, within the client's inflight window.
    fn fill(&mut self, a: &mut Active) {
        let session = a.session.clone();
        let mut dropped_acks = Vec::new();
        {
            let mut st = session.state.lock();
            if st.conn != Some(self.conn_id) {
                return;
            }
            let now = now_ms();
            let start = self.wbuf.len();
            let mut budget_hit = false;
            st.take_sendable(a.window, |pid, d| {
                if self.wbuf.len() - start > FILL_BUDGET_BYTES {
                    budget_hit = true;
                    return Emit::Stop;
                }
                if self.encode_delivery(a, pid, d, d.dup, now) {
                    Emit::Sent
                } else {
                    if let Some(seq) = d.seq {
                        dropped_acks.push(seq);
                    }
                    Emit::Dropped
                }
            });
            if budget_hit && !st.queue.is_empty() {
                // More is waiting: wake ourselves again after this batch is written.
                session.notify.notify_one();
            }
        }
        for seq in dropped_acks {
            self.broker.durable.propose_nowait(Command::Ack {
                key: a.session.key.clone(),
                seq,
            });
        }
    }

    /// Encodes one PUBLISH for this client. Returns false if the message was dropped instead
    /// (expired, or larger than the client's Maximum Packet Size: MQTT-3.1.2-25).
    fn encode_delivery(
        &mut self,
        a: &mut Active,
        pid: u16,
        d: &Delivery,
        dup: bool,
        now: u64,
    ) -> bool {
        if d.msg.is_expired(now) {
            metrics::dropped("expired", 1);
            return false;
        }
        let mut out = OutPublish {
            topic: &d.msg.topic,
            payload: &d.msg.payload,
            qos: d.qos,
            retain: d.retain,
            dup,
            pkid: pid,
            props: Some(&d.msg.props),
            message_expiry: d.msg.remaining_expiry(now),
            subscription_ids: &d.sub_ids,
            topic_alias: None,
            alias_only: false,
        };
        // The alias is chosen first so the size check sees the packet as it will be sent; a
        // new alias is recorded only once the packet is really sent.
        let mut new_alias = None;
        if a.client_alias_max > 0 {
            let aliases = a.who.aliases.get_or_insert_with(Box::default);
            match aliases.out.get(d.msg.topic.as_str()) {
                Some(alias) => {
                    out.topic_alias = Some(*alias);
                    out.alias_only = true;
                }
                None => {
                    let next = aliases.out.len() + 1;
                    if next <= a.client_alias_max as usize {
                        out.topic_alias = Some(next as u16);
                        new_alias = Some(next as u16);
                    }
                }
            }
        }
        if encode::publish_len(self.version, &out) > a.who.client_max_packet {
            metrics::dropped("client_packet_too_large", 1);
            return false;
        }
        if let (Some(alias), Some(aliases)) = (new_alias, a.who.aliases.as_mut()) {
            aliases.out.insert(d.msg.topic.clone(), alias);
        }
        encode::encode_publish(self.version, &out, &mut self.wbuf);
        if let Some(c) = self.counts.messages_out.get_mut(d.qos as usize) {
            *c += 1;
        }
        a.sample = a.sample.wrapping_add(1);
        if a.sample.is_multiple_of(16) {
            self.broker
                .metrics
                .deliver_latency
                .record(d.msg.received_at.elapsed().as_secs_f64());
        }
        true
    }

    /// Ends the connection: tell the client why (MQTT 5), fire the will if due, detach.
    async fn finish(&mut self, mut a: Active, close: Close) {
        self.flush_counts();
        metrics::disconnect(close.label());
        match close {
            Close::Violation(code, why) => {
                let reason = a.problem_info.then_some(why);
                encode::encode_disconnect(self.version, code, reason, &mut self.wbuf);
            }
            Close::KeepAlive => encode::encode_disconnect(
                self.version,
                rc::KEEP_ALIVE_TIMEOUT,
                None,
                &mut self.wbuf,
            ),
            Close::Kicked(_) => encode::encode_disconnect(
                self.version,
                rc::SESSION_TAKEN_OVER,
                None,
                &mut self.wbuf,
            ),
            Close::Shutdown(code) => {
                encode::encode_disconnect(self.version, code, None, &mut self.wbuf)
            }
            _ => {}
        }
        match close {
            Close::PeerClosed => {}
            // The client said goodbye and nothing is left to send: dropping the socket closes
            // it (one syscall fewer per connection than an explicit shutdown).
            Close::Normal | Close::WithWill if self.wbuf.is_empty() => {}
            _ => {
                // A half-close first, so our last packet (e.g. a DISCONNECT with a reason) is
                // not lost to a reset if unread input is still in the socket.
                let _ = self.flush().await;
                let _ = self.stream.shutdown().await;
            }
        }
        self.broker
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        a.who
            .tenant
            .usage
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        // Work already committed still gets delivered to its subscribers; its acks are moot.
        while let Some(done) = a.pending.next().await {
            if let Done::Publish {
                ack: Ack::Pubrec(pid),
                result,
                ..
            } = &done
            {
                // Record the outcome for a retransmission on the next connection.
                let mut st = a.session.state.lock();
                if result.is_ok() {
                    st.inbound_qos2.insert(*pid, true);
                } else {
                    st.inbound_qos2.remove(pid);
                }
            }
            if let Done::Publish {
                prepared,
                result: Ok(resp),
                ..
            } = done
            {
                let seqs = match resp {
                    Response::Published { seqs } | Response::Outboxed { seqs, .. } => seqs,
                    Response::DuplicateInbound => continue,
                    Response::Ok | Response::Exists | Response::Kept | Response::Device(_) => {
                        Vec::new()
                    }
                };
                self.broker.deliver(prepared, &seqs);
            }
        }
        let will = if close.will_fires() {
            a.who.will.take()
        } else {
            None
        };
        if a.who.downstream && !matches!(close, Close::Kicked(Kick::Shutdown | Kick::Drain)) {
            // A node shutting down or draining leaves the status alone: its devices are
            // about to reconnect elsewhere.
            tokio::spawn(crate::device::connection_ended(
                self.broker.clone(),
                a.session.key.clone(),
                self.conn_id,
            ));
        }
        match close {
            Close::Kicked(Kick::Shutdown | Kick::Drain) => {}
            Close::Kicked(Kick::TakenOver { session_continues }) => {
                if let Some(w) = will {
                    // A resumed session cancels a delayed will; an immediate one still fires.
                    if !session_continues || w.delay_secs == 0 {
                        self.broker.schedule_will(
                            a.who.tenant.clone(),
                            a.session.clone(),
                            *w,
                            true,
                        );
                    }
                }
            }
            _ => {
                let (expiry, owner) = {
                    let st = a.session.state.lock();
                    (a.who.expiry_override.unwrap_or(st.expiry_secs), st.conn)
                };
                if let Some(w) = will {
                    match owner {
                        Some(c) if c == self.conn_id => self.broker.schedule_will(
                            a.who.tenant.clone(),
                            a.session.clone(),
                            *w,
                            expiry == 0,
                        ),
                        // We closed just as a new connection resumed the session: as in a
                        // takeover, only an immediate will fires (a delayed one must not be
                        // parked on a session that is back).
                        Some(_) => {
                            if w.delay_secs == 0 {
                                self.broker.schedule_will(
                                    a.who.tenant.clone(),
                                    a.session.clone(),
                                    *w,
                                    true,
                                );
                            }
                        }
                        // ... or as a clean start ended it: the session is over, the will is due.
                        None => self.broker.schedule_will(
                            a.who.tenant.clone(),
                            a.session.clone(),
                            *w,
                            true,
                        ),
                    }
                }
                self.broker.detach(
                    &a.who.tenant,
                    &a.session,
                    self.conn_id,
                    a.who.expiry_override,
                );
            }
        }
        tracing::debug!(peer = %self.peer, client = %a.session.key.client_id, reason = close.label(), "connection closed");
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    #[test]
    fn print_sizes() {
        eprintln!(
            "Active {} Conn {} Pending {} Sleep {} Will {} HashMap {} Notified {}",
            std::mem::size_of::<Active>(),
            std::mem::size_of::<Conn<tokio::net::TcpStream>>(),
            std::mem::size_of::<Pending>(),
            std::mem::size_of::<tokio::time::Sleep>(),
            std::mem::size_of::<Will>(),
            std::mem::size_of::<HashMap<String, u16>>(),
            std::mem::size_of::<tokio::sync::futures::Notified<'static>>(),
        );
    }
}
