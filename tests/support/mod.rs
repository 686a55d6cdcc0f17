//! Byte-level MQTT client helpers on top of `common::Raw`, for tests that must control every
//! packet (packet ids, DUP, when an acknowledgement is sent or withheld).
#![allow(dead_code)]

use std::io::Read;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::{frame, Node, Raw};

pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBACK: u8 = 9;
pub const DISCONNECT: u8 = 14;

/// One packet as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkt {
    pub byte1: u8,
    pub body: Vec<u8>,
}

impl Pkt {
    /// The packet type (upper nibble).
    pub fn kind(&self) -> u8 {
        self.byte1 >> 4
    }

    /// Packet id of an ack (PUBACK/PUBREC/PUBREL/PUBCOMP/SUBACK).
    pub fn pid(&self) -> u16 {
        u16::from_be_bytes([self.body[0], self.body[1]])
    }
}

/// A decoded server PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub topic: String,
    pub pid: u16,
    pub qos: u8,
    pub dup: bool,
    pub retain: bool,
    pub payload: Vec<u8>,
}

impl Msg {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// Reads one whole packet, or None on timeout/EOF before its first byte.
pub fn read_packet(raw: &mut Raw, timeout: Duration) -> Option<Pkt> {
    raw.s.set_read_timeout(Some(timeout)).ok()?;
    let mut b = [0u8; 1];
    match raw.s.read(&mut b) {
        Ok(1) => {}
        _ => return None,
    }
    let byte1 = b[0];
    // The rest of a packet the broker wrote at once arrives promptly.
    raw.s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut len = 0usize;
    for i in 0..4 {
        let got = raw.read_n(1);
        let &[x] = got.as_slice() else {
            return None;
        };
        len |= ((x & 0x7f) as usize) << (7 * i);
        if x & 0x80 == 0 {
            break;
        }
    }
    let body = raw.read_n(len);
    if body.len() != len {
        return None;
    }
    Some(Pkt { byte1, body })
}

/// Builds a CONNECT: 3.1.1 or 5 (with an optional Session Expiry Interval).
pub fn connect_packet(id: &str, v5: bool, clean: bool, expiry: Option<u32>) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', if v5 { 5 } else { 4 }];
    body.push(if clean { 0x02 } else { 0x00 });
    body.extend_from_slice(&0u16.to_be_bytes()); // keep-alive 0: tests never ping
    if v5 {
        match expiry {
            Some(e) => {
                body.push(5);
                body.push(0x11);
                body.extend_from_slice(&e.to_be_bytes());
            }
            None => body.push(0),
        }
    }
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    frame(0x10, &body)
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// A PUBLISH from a client.
pub fn publish_packet(
    v5: bool,
    topic: &[u8],
    qos: u8,
    pid: u16,
    dup: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, topic);
    if qos > 0 {
        body.extend_from_slice(&pid.to_be_bytes());
    }
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    frame(0x30 | ((dup as u8) << 3) | (qos << 1), &body)
}

/// A SUBSCRIBE with one filter.
pub fn subscribe_packet(v5: bool, pid: u16, filter: &[u8], qos: u8) -> Vec<u8> {
    let mut body = pid.to_be_bytes().to_vec();
    if v5 {
        body.push(0);
    }
    put_str(&mut body, filter);
    body.push(qos);
    frame(0x82, &body)
}

/// PUBACK/PUBREC/PUBREL/PUBCOMP (2-byte form, valid in both versions).
pub fn ack_packet(kind: u8, pid: u16) -> Vec<u8> {
    let byte1 = (kind << 4) | if kind == PUBREL { 0x02 } else { 0 };
    let p = pid.to_be_bytes();
    vec![byte1, 2, p[0], p[1]]
}

/// Decodes a PUBLISH sent by the server.
pub fn parse_publish(p: &Pkt, v5: bool) -> Msg {
    assert_eq!(p.kind(), PUBLISH, "expected PUBLISH, got {p:?}");
    let qos = (p.byte1 >> 1) & 3;
    let b = &p.body;
    let tlen = u16::from_be_bytes([b[0], b[1]]) as usize;
    let topic = String::from_utf8(b[2..2 + tlen].to_vec()).expect("utf8 topic");
    let mut i = 2 + tlen;
    let mut pid = 0;
    if qos > 0 {
        pid = u16::from_be_bytes([b[i], b[i + 1]]);
        i += 2;
    }
    if v5 {
        let mut plen = 0usize;
        let mut shift = 0;
        loop {
            let x = b[i];
            i += 1;
            plen |= ((x & 0x7f) as usize) << shift;
            shift += 7;
            if x & 0x80 == 0 {
                break;
            }
        }
        i += plen;
    }
    Msg {
        topic,
        pid,
        qos,
        dup: p.byte1 & 0x08 != 0,
        retain: p.byte1 & 0x01 != 0,
        payload: b[i..].to_vec(),
    }
}

/// A connected byte-level client.
pub struct Client {
    pub raw: Raw,
    pub v5: bool,
    next_pid: u16,
}

impl Client {
    /// Connects and asserts a successful CONNACK; returns the client and session-present.
    pub fn connect(
        addr: SocketAddr,
        id: &str,
        v5: bool,
        clean: bool,
        expiry: Option<u32>,
    ) -> (Client, bool) {
        let mut raw = Raw::connect(addr);
        raw.send(&connect_packet(id, v5, clean, expiry));
        let ack = read_packet(&mut raw, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{id}: no CONNACK"));
        assert_eq!(ack.kind(), CONNACK, "{id}: {ack:?}");
        assert_eq!(ack.body[1], 0, "{id}: CONNACK refused: {ack:?}");
        let present = ack.body[0] & 1 == 1;
        (
            Client {
                raw,
                v5,
                next_pid: 1,
            },
            present,
        )
    }

    /// A persistent session: 3.1.1 clean_session=false, or 5 clean_start=false + expiry 3600.
    pub fn persistent(addr: SocketAddr, id: &str, v5: bool) -> (Client, bool) {
        Client::connect(addr, id, v5, false, v5.then_some(3600))
    }

    /// A clean, non-persistent session.
    pub fn clean(addr: SocketAddr, id: &str, v5: bool) -> Client {
        Client::connect(addr, id, v5, true, None).0
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.raw.send(bytes);
    }

    /// Next packet within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Option<Pkt> {
        read_packet(&mut self.raw, timeout)
    }

    /// Next packet, which must be of `kind`.
    pub fn expect(&mut self, kind: u8, what: &str) -> Pkt {
        let p = self
            .recv(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{what}: no packet (wanted type {kind})"));
        assert_eq!(p.kind(), kind, "{what}: unexpected packet {p:?}");
        p
    }

    /// Subscribes to one filter and returns the SUBACK reason codes.
    pub fn subscribe(&mut self, filter: &str, qos: u8) -> Vec<u8> {
        let pid = self.pid();
        self.send(&subscribe_packet(self.v5, pid, filter.as_bytes(), qos));
        let ack = self.expect(SUBACK, "SUBACK");
        assert_eq!(ack.pid(), pid);
        let skip = if self.v5 { 3 } else { 2 };
        ack.body[skip..].to_vec()
    }

    /// Subscribes and asserts the granted QoS.
    pub fn sub_ok(&mut self, filter: &str, qos: u8) {
        assert_eq!(self.subscribe(filter, qos), vec![qos], "subscribe {filter}");
    }

    fn pid(&mut self) -> u16 {
        let p = self.next_pid;
        self.next_pid = if p == u16::MAX { 1 } else { p + 1 };
        p
    }

    /// Sends a PUBLISH and completes its flow (PUBACK, or PUBREC/PUBREL/PUBCOMP).
    pub fn publish(&mut self, topic: &str, payload: &[u8], qos: u8) {
        let pid = self.pid();
        self.send(&publish_packet(
            self.v5,
            topic.as_bytes(),
            qos,
            pid,
            false,
            payload,
        ));
        match qos {
            0 => {}
            1 => {
                let a = self.expect(PUBACK, "PUBACK");
                assert_eq!(a.pid(), pid);
            }
            _ => {
                let r = self.expect(PUBREC, "PUBREC");
                assert_eq!(r.pid(), pid);
                self.send(&ack_packet(PUBREL, pid));
                let c = self.expect(PUBCOMP, "PUBCOMP");
                assert_eq!(c.pid(), pid);
            }
        }
    }

    /// Publishes `n` messages pipelined (all sent first), then waits for every flow to finish.
    pub fn publish_many(&mut self, topic: &str, payloads: &[Vec<u8>], qos: u8) {
        assert!(qos > 0);
        let pids: Vec<u16> = payloads.iter().map(|_| self.pid()).collect();
        let mut out = Vec::new();
        for (p, pid) in payloads.iter().zip(&pids) {
            out.extend(publish_packet(
                self.v5,
                topic.as_bytes(),
                qos,
                *pid,
                false,
                p,
            ));
        }
        self.send(&out);
        let want = if qos == 1 { PUBACK } else { PUBREC };
        let mut acked = Vec::new();
        for _ in 0..pids.len() {
            let a = self.expect(want, "publish ack");
            if qos == 2 {
                self.send(&ack_packet(PUBREL, a.pid()));
            }
            acked.push(a.pid());
        }
        assert_eq!(acked, pids, "acks in order");
        if qos == 2 {
            for pid in &pids {
                let c = self.expect(PUBCOMP, "PUBCOMP");
                assert_eq!(c.pid(), *pid);
            }
        }
    }

    /// Receives PUBLISHes until `timeout` passes without one (other packets are returned too).
    pub fn drain(&mut self, idle: Duration) -> Vec<Pkt> {
        let mut v = Vec::new();
        while let Some(p) = self.recv(idle) {
            v.push(p);
        }
        v
    }

    /// Receives up to `n` PUBLISHes within `secs`, acknowledging each as a normal client
    /// does (PUBACK; PUBREC then PUBCOMP on PUBREL).
    pub fn receive_acking(&mut self, n: usize, secs: u64) -> Vec<Msg> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut got = Vec::new();
        while got.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let Some(p) = self.recv(left) else { break };
            match p.kind() {
                PUBLISH => {
                    let m = parse_publish(&p, self.v5);
                    match m.qos {
                        1 => self.send(&ack_packet(PUBACK, m.pid)),
                        2 => self.send(&ack_packet(PUBREC, m.pid)),
                        _ => {}
                    }
                    got.push(m);
                }
                PUBREL => self.send(&ack_packet(PUBCOMP, p.pid())),
                other => panic!("unexpected packet type {other}: {p:?}"),
            }
        }
        got
    }

    /// Sends DISCONNECT (reason 0) and closes.
    pub fn disconnect(mut self) {
        self.send(&[0xE0, 0x00]);
        let _ = self.raw.s.shutdown(std::net::Shutdown::Write);
        // Wait for the server to close so its session detach has happened.
        let _ = self.raw.closed();
    }
}

/// A v5 DISCONNECT's reason code, if `p` is one.
pub fn disconnect_reason(p: &Pkt) -> Option<u8> {
    (p.kind() == DISCONNECT).then(|| p.body.first().copied().unwrap_or(0))
}

/// Payloads `prefix0..prefix{n-1}`.
pub fn payloads(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{prefix}{i}").into_bytes())
        .collect()
}

/// Waits until the node accepts MQTT connections again after a restart.
pub fn wait_ready(node: &Node) {
    crate::common::wait_until(20, "node ready", || node.http_get("/health/ready").0 == 200);
}

// ----- logins with credentials (tests/tenancy.rs) ------------------------------------------------

/// A CONNECT with an optional username and password: 3.1.1 or 5 (with an optional Session
/// Expiry Interval), keep-alive 0.
pub fn connect_packet_auth(
    id: &str,
    v5: bool,
    clean: bool,
    expiry: Option<u32>,
    user: Option<&str>,
    password: Option<&[u8]>,
) -> Vec<u8> {
    let mut flags = if clean { 0x02 } else { 0x00 };
    if user.is_some() {
        flags |= 0x80;
    }
    if password.is_some() {
        flags |= 0x40;
    }
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', if v5 { 5 } else { 4 }, flags];
    body.extend_from_slice(&0u16.to_be_bytes());
    if v5 {
        match expiry {
            Some(e) => {
                body.push(5);
                body.push(0x11);
                body.extend_from_slice(&e.to_be_bytes());
            }
            None => body.push(0),
        }
    }
    put_str(&mut body, id.as_bytes());
    if let Some(u) = user {
        put_str(&mut body, u.as_bytes());
    }
    if let Some(p) = password {
        put_str(&mut body, p);
    }
    frame(0x10, &body)
}

/// Sends a CONNECT with credentials on an open socket and reads the CONNACK: `Ok` with the
/// connected client and session-present, or `Err` with the refusal's reason code (0xFF when no
/// CONNACK came).
pub fn try_login_on(
    mut raw: Raw,
    id: &str,
    v5: bool,
    clean: bool,
    expiry: Option<u32>,
    user: Option<&str>,
    password: Option<&[u8]>,
) -> Result<(Client, bool), u8> {
    raw.send(&connect_packet_auth(id, v5, clean, expiry, user, password));
    let Some(ack) = read_packet(&mut raw, Duration::from_secs(10)) else {
        return Err(0xFF);
    };
    assert_eq!(ack.kind(), CONNACK, "{id}: {ack:?}");
    if ack.body[1] != 0 {
        return Err(ack.body[1]);
    }
    let present = ack.body[0] & 1 == 1;
    Ok((
        Client {
            raw,
            v5,
            next_pid: 1,
        },
        present,
    ))
}

/// `try_login_on` over a new connection to `addr`.
pub fn try_login(
    addr: SocketAddr,
    id: &str,
    v5: bool,
    clean: bool,
    expiry: Option<u32>,
    user: Option<&str>,
    password: Option<&[u8]>,
) -> Result<(Client, bool), u8> {
    try_login_on(Raw::connect(addr), id, v5, clean, expiry, user, password)
}

impl Client {
    /// Connects with `user`/`password` and a clean session; asserts CONNACK success.
    pub fn login(addr: SocketAddr, id: &str, v5: bool, user: &str, password: &str) -> Client {
        match try_login(
            addr,
            id,
            v5,
            true,
            None,
            Some(user),
            Some(password.as_bytes()),
        ) {
            Ok((c, _)) => c,
            Err(code) => panic!("login {user} as {id}: CONNACK refused with {code:#04x}"),
        }
    }

    /// The next packet id this client would use (and reserves it).
    pub fn take_pid(&mut self) -> u16 {
        self.pid()
    }
}
