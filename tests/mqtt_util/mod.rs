//! Helpers shared by the MQTT feature tests: a scripted MQTT 5 client that acknowledges only
//! what the test tells it to (so flow control, exactly-once and reason codes can be checked
//! packet by packet), and small wrappers around rumqttc's event loops.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectProperties, Disconnect, DisconnectReasonCode, Filter, LastWill,
    Packet, PubAck, PubComp, PubRec, PubRel, Publish, PublishProperties, SubAck, Subscribe,
    SubscribeProperties,
};
use rumqttc::v5::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound for any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// What one read attempt produced.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Recv {
    Packet(Packet),
    Timeout,
    Closed,
}

/// A scripted MQTT 5 client over a raw socket.
pub struct C5 {
    pub s: TcpStream,
    buf: BytesMut,
    next_pid: u16,
    /// Packets read while waiting for something else, handed out first by `recv`.
    backlog: VecDeque<Packet>,
    /// Raw bytes of every DISCONNECT received, for byte-level assertions.
    pub raw_disconnects: Vec<Vec<u8>>,
}

/// CONNECT options for `C5::connect_with`.
#[derive(Default, Clone)]
pub struct Opts {
    pub clean_start: bool,
    pub keep_alive: u16,
    pub props: ConnectProperties,
    pub will: Option<LastWill>,
}

impl Opts {
    /// Clean start, keep-alive 30 s, no properties.
    pub fn clean() -> Opts {
        Opts {
            clean_start: true,
            keep_alive: 30,
            props: ConnectProperties::new(),
            will: None,
        }
    }
}

impl C5 {
    /// Opens the TCP connection only.
    pub async fn open(addr: SocketAddr) -> C5 {
        let s = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect timeout")
            .expect("connect");
        s.set_nodelay(true).unwrap();
        C5 {
            s,
            buf: BytesMut::with_capacity(4096),
            next_pid: 1,
            backlog: VecDeque::new(),
            raw_disconnects: Vec::new(),
        }
    }

    /// Connects with clean start and no properties; asserts success.
    pub async fn connect(addr: SocketAddr, id: &str) -> C5 {
        Self::connect_with(addr, id, Opts::clean()).await.0
    }

    /// Connects with the given options; asserts CONNACK success and returns it.
    pub async fn connect_with(addr: SocketAddr, id: &str, o: Opts) -> (C5, ConnAck) {
        let mut c = C5::open(addr).await;
        let connect = Connect {
            keep_alive: o.keep_alive,
            client_id: id.to_string(),
            clean_start: o.clean_start,
            properties: Some(o.props),
        };
        c.send(Packet::Connect(connect, o.will, None)).await;
        match c.next().await {
            Packet::ConnAck(ack) => {
                assert_eq!(
                    ack.code,
                    rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success,
                    "CONNACK for {id}"
                );
                (c, ack)
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Encodes and writes one packet.
    pub async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        p.write(&mut out, None).expect("encode");
        self.send_raw(&out).await;
    }

    /// Writes bytes as they are.
    pub async fn send_raw(&mut self, b: &[u8]) {
        tokio::time::timeout(WAIT, self.s.write_all(b))
            .await
            .expect("write timeout")
            .expect("write");
    }

    fn pid(&mut self) -> u16 {
        let p = self.next_pid;
        self.next_pid = self.next_pid.wrapping_add(1).max(1);
        p
    }

    /// Reads the next packet within `dur`.
    pub async fn recv(&mut self, dur: Duration) -> Recv {
        if let Some(p) = self.backlog.pop_front() {
            return Recv::Packet(p);
        }
        let deadline = tokio::time::Instant::now() + dur;
        loop {
            if let Some(p) = self.try_decode() {
                return Recv::Packet(p);
            }
            match tokio::time::timeout_at(deadline, self.s.read_buf(&mut self.buf)).await {
                Err(_) => return Recv::Timeout,
                Ok(Ok(0)) | Ok(Err(_)) => return Recv::Closed,
                Ok(Ok(_)) => {}
            }
        }
    }

    fn try_decode(&mut self) -> Option<Packet> {
        // Frame length from the fixed header.
        let mut len = 0usize;
        let mut mult = 1usize;
        let mut i = 1;
        loop {
            let b = *self.buf.get(i)?;
            len += (b as usize & 0x7f) * mult;
            mult *= 128;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            assert!(i < 5, "malformed remaining length from server");
        }
        if self.buf.len() < i + len {
            return None;
        }
        if self.buf[0] == 0xE0 {
            self.raw_disconnects.push(self.buf[..i + len].to_vec());
            if len < 2 {
                // rumqttc's decoder refuses the short forms the spec allows (no reason: 0; no
                // property length: none); rewrite them in the long form.
                let reason = if len == 1 { self.buf[i] } else { 0 };
                let _ = self.buf.split_to(i + len);
                let mut long = BytesMut::from(&[0xE0, 2, reason, 0][..]);
                return Some(Packet::read(&mut long, None).expect("decode DISCONNECT"));
            }
        }
        Some(Packet::read(&mut self.buf, None).expect("decode packet from server"))
    }

    /// The next packet; panics on timeout or close.
    pub async fn next(&mut self) -> Packet {
        match self.recv(WAIT).await {
            Recv::Packet(p) => p,
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    /// Subscribes (one SUBSCRIBE with all filters) and returns the SUBACK. PUBLISHes that
    /// arrive before it are kept for `recv`.
    pub async fn subscribe(&mut self, filters: Vec<Filter>, sub_id: Option<usize>) -> SubAck {
        let pkid = self.pid();
        let props = sub_id.map(|id| SubscribeProperties {
            id: Some(id),
            user_properties: vec![],
        });
        let mut sub = Subscribe::new_many(filters, props);
        sub.pkid = pkid;
        self.send(Packet::Subscribe(sub)).await;
        let mut early = VecDeque::new();
        let ack = loop {
            match self.next().await {
                Packet::SubAck(a) if a.pkid == pkid => break a,
                p => early.push_back(p),
            }
        };
        early.extend(self.backlog.drain(..));
        self.backlog = early;
        ack
    }

    /// Subscribes to one filter at a QoS.
    pub async fn sub(&mut self, filter: &str, qos: QoS) -> SubAck {
        self.subscribe(vec![Filter::new(filter, qos)], None).await
    }

    /// Publishes and completes the QoS handshake (PUBACK, or PUBREC/PUBREL/PUBCOMP).
    pub async fn publish(
        &mut self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: impl Into<Bytes>,
        props: Option<PublishProperties>,
    ) {
        let mut p = Publish::new(topic, qos, payload.into(), props);
        p.retain = retain;
        if qos != QoS::AtMostOnce {
            p.pkid = self.pid();
        }
        let pkid = p.pkid;
        self.send(Packet::Publish(p)).await;
        let mut early = VecDeque::new();
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => loop {
                match self.next().await {
                    Packet::PubAck(a) if a.pkid == pkid => break,
                    p => early.push_back(p),
                }
            },
            QoS::ExactlyOnce => {
                loop {
                    match self.next().await {
                        Packet::PubRec(a) if a.pkid == pkid => break,
                        p => early.push_back(p),
                    }
                }
                self.send(Packet::PubRel(PubRel::new(pkid, None))).await;
                loop {
                    match self.next().await {
                        Packet::PubComp(a) if a.pkid == pkid => break,
                        p => early.push_back(p),
                    }
                }
            }
        }
        early.extend(self.backlog.drain(..));
        self.backlog = early;
    }

    /// Waits for the next PUBLISH (skipping nothing else: any other packet is an error) and
    /// acknowledges it fully.
    pub async fn expect_publish(&mut self) -> Publish {
        let p = self.expect_publish_noack().await;
        self.ack(&p).await;
        p
    }

    /// Waits for the next PUBLISH without acknowledging it.
    pub async fn expect_publish_noack(&mut self) -> Publish {
        match self.next().await {
            Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Acknowledges a received PUBLISH (QoS 2: PUBREC, then waits for PUBREL, sends PUBCOMP).
    pub async fn ack(&mut self, p: &Publish) {
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(Packet::PubAck(PubAck::new(p.pkid, None))).await,
            QoS::ExactlyOnce => {
                self.send(Packet::PubRec(PubRec::new(p.pkid, None))).await;
                let mut early = VecDeque::new();
                loop {
                    match self.next().await {
                        Packet::PubRel(r) if r.pkid == p.pkid => break,
                        Packet::PubRel(r) => {
                            panic!("PUBREL {} while waiting for {}", r.pkid, p.pkid)
                        }
                        other => early.push_back(other),
                    }
                }
                early.extend(self.backlog.drain(..));
                self.backlog = early;
                self.send(Packet::PubComp(PubComp::new(p.pkid, None))).await;
            }
        }
    }

    /// Collects every packet that arrives within `dur` (stops early if the server closes).
    pub async fn quiet(&mut self, dur: Duration) -> Vec<Packet> {
        let deadline = tokio::time::Instant::now() + dur;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await {
                Recv::Packet(p) => out.push(p),
                _ => return out,
            }
        }
    }

    /// Asserts nothing arrives for `dur`.
    pub async fn assert_silent(&mut self, dur: Duration, what: &str) {
        let got = self.quiet(dur).await;
        assert!(got.is_empty(), "{what}: expected nothing, got {got:?}");
    }

    /// Sends DISCONNECT with a reason and optional session expiry.
    pub async fn disconnect(&mut self, reason: DisconnectReasonCode, expiry: Option<u32>) {
        let mut d = Disconnect::new(reason);
        if let Some(e) = expiry {
            d.properties = Some(rumqttc::v5::mqttbytes::v5::DisconnectProperties {
                session_expiry_interval: Some(e),
                reason_string: None,
                user_properties: vec![],
                server_reference: None,
            });
        }
        self.send(Packet::Disconnect(d)).await;
        let _ = self.s.shutdown().await;
    }

    /// Waits until the server closes the connection; returns what it sent before.
    pub async fn wait_closed(&mut self, dur: Duration) -> Option<Vec<Packet>> {
        let deadline = tokio::time::Instant::now() + dur;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await {
                Recv::Packet(p) => out.push(p),
                Recv::Closed => return Some(out),
                Recv::Timeout => return None,
            }
        }
    }
}

/// A filter with MQTT 5 options.
pub fn filter(path: &str, qos: QoS, no_local: bool, rap: bool, rh: u8) -> Filter {
    let mut f = Filter::new(path, qos);
    f.nolocal = no_local;
    f.preserve_retain = rap;
    f.retain_forward_rule = match rh {
        0 => rumqttc::v5::mqttbytes::v5::RetainForwardRule::OnEverySubscribe,
        1 => rumqttc::v5::mqttbytes::v5::RetainForwardRule::OnNewSubscribe,
        _ => rumqttc::v5::mqttbytes::v5::RetainForwardRule::Never,
    };
    f
}

/// A v5 will with an optional delay.
pub fn will5(topic: &str, payload: &str, delay: Option<u32>) -> LastWill {
    let props = delay.map(|d| rumqttc::v5::mqttbytes::v5::LastWillProperties {
        delay_interval: Some(d),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: vec![],
    });
    LastWill::new(
        topic,
        payload.as_bytes().to_vec(),
        QoS::AtLeastOnce,
        false,
        props,
    )
}

/// Connect properties with a session expiry.
pub fn expiry_props(secs: u32) -> ConnectProperties {
    let mut p = ConnectProperties::new();
    p.session_expiry_interval = Some(secs);
    p
}

/// QoS from a number.
pub fn qos(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Number from a QoS.
pub fn qn(q: QoS) -> u8 {
    q as u8
}

/// Topic of a v5 PUBLISH as a string.
pub fn topic(p: &Publish) -> String {
    String::from_utf8(p.topic.to_vec()).unwrap()
}

/// Subscription identifiers of a v5 PUBLISH.
pub fn sub_ids(p: &Publish) -> Vec<usize> {
    let mut v = p
        .properties
        .as_ref()
        .map(|p| p.subscription_identifiers.clone())
        .unwrap_or_default();
    v.sort();
    v
}

/// A rumqttc 3.1.1 client whose event loop runs in a task; every incoming packet is forwarded.
/// Aborting `task` drops the socket without DISCONNECT.
pub struct V4 {
    pub client: rumqttc::AsyncClient,
    pub rx: tokio::sync::mpsc::UnboundedReceiver<rumqttc::Packet>,
    pub task: tokio::task::JoinHandle<()>,
}

impl V4 {
    /// Connects and waits for CONNACK.
    pub async fn connect(opts: rumqttc::MqttOptions) -> V4 {
        let (client, mut el) = rumqttc::AsyncClient::new(opts, 100);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok(ev) = el.poll().await {
                if let rumqttc::Event::Incoming(p) = ev {
                    if tx.send(p).is_err() {
                        break;
                    }
                }
            }
        });
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(rumqttc::Packet::ConnAck(a))) => {
                assert_eq!(a.code, rumqttc::ConnectReturnCode::Success)
            }
            other => panic!("no CONNACK: {other:?}"),
        }
        V4 { client, rx, task }
    }

    /// Default options for a client id on the node's port.
    pub fn opts(port: u16, id: &str) -> rumqttc::MqttOptions {
        let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_inflight(100);
        o
    }

    /// Subscribes and waits for the SUBACK.
    pub async fn sub(&mut self, filter: &str, q: rumqttc::QoS) -> rumqttc::SubAck {
        self.client.subscribe(filter, q).await.unwrap();
        loop {
            match self.next().await {
                rumqttc::Packet::SubAck(a) => return a,
                rumqttc::Packet::PingResp => {}
                other => panic!("expected SUBACK, got {other:?}"),
            }
        }
    }

    /// Next incoming packet, bounded.
    pub async fn next(&mut self) -> rumqttc::Packet {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("timed out waiting for a packet")
            .expect("event loop ended")
    }

    /// Next incoming PUBLISH within `dur`, skipping acks; None on timeout.
    pub async fn publish_within(&mut self, dur: Duration) -> Option<rumqttc::Publish> {
        let deadline = tokio::time::Instant::now() + dur;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(rumqttc::Packet::Publish(p))) => return Some(p),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Next incoming PUBLISH; panics after `WAIT`.
    pub async fn expect_publish(&mut self) -> rumqttc::Publish {
        self.publish_within(WAIT)
            .await
            .expect("timed out waiting for PUBLISH")
    }
}

/// A rumqttc MQTT 5 client whose event loop runs in a task; every incoming packet is forwarded.
pub struct V5 {
    pub client: rumqttc::v5::AsyncClient,
    pub rx: tokio::sync::mpsc::UnboundedReceiver<Packet>,
    pub task: tokio::task::JoinHandle<()>,
    pub connack: ConnAck,
}

impl V5 {
    /// Connects and waits for CONNACK.
    pub async fn connect(opts: rumqttc::v5::MqttOptions) -> V5 {
        let (client, mut el) = rumqttc::v5::AsyncClient::new(opts, 100);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok(ev) = el.poll().await {
                if let rumqttc::v5::Event::Incoming(p) = ev {
                    if tx.send(p).is_err() {
                        break;
                    }
                }
            }
        });
        let connack = match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(Packet::ConnAck(a))) => a,
            other => panic!("no CONNACK: {other:?}"),
        };
        V5 {
            client,
            rx,
            task,
            connack,
        }
    }

    /// Default options for a client id on the node's port.
    pub fn opts(port: u16, id: &str) -> rumqttc::v5::MqttOptions {
        let mut o = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    /// Subscribes and waits for the SUBACK.
    pub async fn sub(&mut self, filter: &str, q: QoS) -> SubAck {
        self.client.subscribe(filter, q).await.unwrap();
        loop {
            match self.next().await {
                Packet::SubAck(a) => return a,
                Packet::PingResp(_) => {}
                other => panic!("expected SUBACK, got {other:?}"),
            }
        }
    }

    /// Next incoming packet, bounded.
    pub async fn next(&mut self) -> Packet {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("timed out waiting for a packet")
            .expect("event loop ended")
    }

    /// Next incoming PUBLISH within `dur`, skipping acks; None on timeout.
    pub async fn publish_within(&mut self, dur: Duration) -> Option<Publish> {
        let deadline = tokio::time::Instant::now() + dur;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Packet::Publish(p))) => return Some(p),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }
}
