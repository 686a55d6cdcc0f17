//! `fleetmq-bench`: a small, cheap MQTT 3.1.1 load generator.
//!
//! It talks MQTT directly over `TcpStream`: framing via the `mqttbytes` v4
//! codec (`mqttbytes::check`, `v4::*::write` for control packets) and a
//! hand-rolled, allocation-free encoder/decoder for PUBLISH on the hot path.
//! Socket writes are batched (many packets encoded into one `BytesMut`, one
//! `write_all`), reads use a large buffer and every complete packet in it is
//! decoded before the next read.
//!
//! Every scenario prints exactly one JSON line on stdout and a human summary on
//! stderr, and is bounded by `--timeout-secs`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BufMut, BytesMut};
use clap::{Args, Parser, Subcommand};
use mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Disconnect, Subscribe};
use mqttbytes::QoS;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Barrier, Semaphore};
use tokio::time::{sleep_until, timeout_at, Instant as TInstant};

/// Bytes of bench header at the start of each payload: ts_ns u64, pub_id u32, seq u32.
const HDR: usize = 16;
/// Largest packet we accept from the broker.
const MAX_PACKET: usize = 16 * 1024 * 1024;
/// Read buffer size.
const RBUF: usize = 256 * 1024;
/// Soft cap on how many bytes of publishes we encode before one write.
const WBATCH_BYTES: usize = 64 * 1024;

static T0: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since process start on a monotonic clock shared by all tasks.
fn now_ns() -> u64 {
    T0.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

#[derive(Parser, Debug)]
#[command(
    name = "fleetmq-bench",
    about = "MQTT 3.1.1 load generator (fan-in, fan-out, latency, idle, connects)"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Debug, Clone)]
struct Common {
    #[arg(long, global = true, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, global = true, default_value_t = 1883)]
    port: u16,
    /// Clean session flag for subscribers (`--clean false` = persistent session).
    #[arg(long, global = true, default_value_t = true, action = clap::ArgAction::Set)]
    clean: bool,
    /// Client id prefix; the process id is appended so parallel runs do not collide.
    #[arg(long, global = true, default_value = "fmqb")]
    client_prefix: String,
    /// Topic root, topics are `<root>/fanin/<i>`, `<root>/fanout/t`, `<root>/latency/t`.
    #[arg(long, global = true, default_value = "bench")]
    topic_root: String,
    /// Hard deadline for the whole scenario; it stops and reports what it has.
    #[arg(long, global = true, default_value_t = 60)]
    timeout_secs: u64,
    /// Broker pid: report broker CPU seconds / RSS during the run.
    #[arg(long, global = true)]
    broker_pid: Option<u32>,
    /// Tokio worker threads (the generator shares the CPU with the broker).
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    /// Free-form label copied into the JSON (e.g. broker name).
    #[arg(long, global = true)]
    label: Option<String>,
    /// Seconds of silence after all publishers finished before declaring the rest lost.
    #[arg(long, global = true, default_value_t = 3)]
    drain_secs: u64,
    /// Username for every CONNECT; `{}` is replaced by the connection number modulo
    /// `--login-users` (e.g. `bench/u{}`), so each connection can log in as its own user.
    #[arg(long, global = true)]
    username: Option<String>,
    /// Password for every CONNECT (with `--username`).
    #[arg(long, global = true)]
    password: Option<String>,
    /// How many distinct users `{}` in `--username` cycles through.
    #[arg(long, global = true, default_value_t = 1)]
    login_users: usize,
    /// File of `username password` lines; connections log in with them in turn (instead of
    /// `--username`/`--password`), e.g. credentials issued by device registration.
    #[arg(long, global = true)]
    logins_file: Option<std::path::PathBuf>,
    /// Port the subscribers connect to instead of `--port` (publisher and subscriber on
    /// different cluster nodes).
    #[arg(long, global = true)]
    sub_port: Option<u16>,
}

/// Credentials read from `--logins-file`.
static LOGIN_LIST: OnceLock<Vec<(String, String)>> = OnceLock::new();

/// Credentials used by every CONNECT of this run (set once from the command line).
static LOGIN: OnceLock<Option<(String, String, usize)>> = OnceLock::new();
/// Connections made so far, to pick the next user of `--username`'s `{}`.
static LOGINS: AtomicUsize = AtomicUsize::new(0);

fn login_for_next_connect() -> Option<(String, String)> {
    if let Some(list) = LOGIN_LIST.get().filter(|l| !l.is_empty()) {
        let n = LOGINS.fetch_add(1, Ordering::Relaxed) % list.len();
        return list.get(n).cloned();
    }
    let (user, pw, users) = LOGIN.get()?.as_ref()?;
    let n = LOGINS.fetch_add(1, Ordering::Relaxed) % (*users).max(1);
    Some((user.replace("{}", &n.to_string()), pw.clone()))
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// N publishers -> 1 subscriber on `<root>/fanin/#`.
    Fanin {
        #[arg(long, default_value_t = 10)]
        pubs: usize,
        #[command(flatten)]
        flow: Flow,
        /// All publishers use one topic `<root>/fanin/t` instead of one each.
        #[arg(long)]
        shared_topic: bool,
    },
    /// 1 publisher -> N subscribers on `<root>/fanout/t`.
    Fanout {
        #[arg(long, default_value_t = 10)]
        subs: usize,
        #[command(flatten)]
        flow: Flow,
    },
    /// One publisher at a steady rate, one subscriber; latency percentiles.
    Latency {
        #[arg(long, default_value_t = 20000)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        secs: u64,
        #[arg(long, default_value_t = 0)]
        qos: u8,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 128)]
        window: usize,
    },
    /// Open N idle connections and measure broker RSS per connection.
    Idle {
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        #[arg(long, default_value_t = 5)]
        hold_secs: u64,
        #[arg(long, default_value_t = 200)]
        concurrency: usize,
    },
    /// N devices publish SmartREST `200` measurements on `s/us` at QoS 1 (or, with `--plain`,
    /// the same payload to `<root>/ingest/<i>`); throughput and publish-to-PUBACK latency.
    Ingest {
        #[arg(long, default_value_t = 10)]
        devices: usize,
        /// Total messages over all devices.
        #[arg(long, default_value_t = 100_000)]
        msgs: u64,
        /// Max unacknowledged publishes per device.
        #[arg(long, default_value_t = 32)]
        window: usize,
        /// Free-form topic instead of `s/us` (the plain QoS 1 reference).
        #[arg(long)]
        plain: bool,
    },
    /// CONNECT + CONNACK + DISCONNECT cycles.
    Connects {
        #[arg(long, default_value_t = 5000)]
        conns: usize,
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
    },
}

#[derive(Args, Debug, Clone)]
struct Flow {
    #[arg(long, default_value_t = 0)]
    qos: u8,
    /// Total messages published (split across publishers).
    #[arg(long, default_value_t = 100_000)]
    msgs: u64,
    /// Payload size in bytes (minimum 16: timestamp + ids).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Total publish rate limit in msg/s across all publishers (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Max unacknowledged QoS1/2 publishes per publisher.
    #[arg(long, default_value_t = 128)]
    window: usize,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    T0.get_or_init(Instant::now);
    let c = &cli.common;
    let _ = LOGIN.set(
        c.username
            .clone()
            .map(|u| (u, c.password.clone().unwrap_or_default(), c.login_users)),
    );
    if let Some(path) = &c.logins_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let list = text
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(u, p)| (u.to_string(), p.to_string()))
            .collect();
        let _ = LOGIN_LIST.set(list);
    }
    raise_nofile();
    let rt = if cli.common.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.common.threads)
            .enable_all()
            .build()?
    };
    let scenario = match &cli.cmd {
        Cmd::Fanin { .. } => "fanin",
        Cmd::Fanout { .. } => "fanout",
        Cmd::Latency { .. } => "latency",
        Cmd::Idle { .. } => "idle",
        Cmd::Connects { .. } => "connects",
        Cmd::Ingest { .. } => "ingest",
    };
    // Fatal errors still produce one JSON line (with "error") so scripts can
    // keep going; the exit code is 1.
    let (mut out, code) = match rt.block_on(run(cli.cmd, cli.common.clone())) {
        Ok(v) => (v, 0),
        Err(e) => {
            eprintln!("{scenario}: error: {e:#}");
            (json!({"scenario": scenario, "error": format!("{e:#}")}), 1)
        }
    };
    if let (Some(l), Value::Object(m)) = (cli.common.label.as_ref(), &mut out) {
        m.insert("label".into(), json!(l));
    }
    println!("{}", serde_json::to_string(&out)?);
    // Do not wait for lingering tasks (e.g. stuck sockets) at shutdown.
    rt.shutdown_background();
    std::process::exit(code);
}

async fn run(cmd: Cmd, c: Common) -> Result<Value> {
    let addr: SocketAddr = format!("{}:{}", c.host, c.port)
        .parse()
        .with_context(|| format!("bad address {}:{}", c.host, c.port))?;
    match cmd {
        Cmd::Fanin {
            pubs,
            flow,
            shared_topic,
        } => {
            let topics: Vec<String> = (0..pubs.max(1))
                .map(|i| {
                    if shared_topic {
                        format!("{}/fanin/t", c.topic_root)
                    } else {
                        format!("{}/fanin/{}", c.topic_root, i)
                    }
                })
                .collect();
            let filter = if shared_topic {
                format!("{}/fanin/t", c.topic_root)
            } else {
                format!("{}/fanin/#", c.topic_root)
            };
            pubsub("fanin", addr, &c, &flow, topics, filter, 1).await
        }
        Cmd::Fanout { subs, flow } => {
            let topic = format!("{}/fanout/t", c.topic_root);
            pubsub(
                "fanout",
                addr,
                &c,
                &flow,
                vec![topic.clone()],
                topic,
                subs.max(1),
            )
            .await
        }
        Cmd::Latency {
            rate,
            secs,
            qos,
            size,
            window,
        } => {
            let flow = Flow {
                qos,
                msgs: rate.saturating_mul(secs).max(1),
                size,
                rate: rate.max(1),
                window,
            };
            let topic = format!("{}/latency/t", c.topic_root);
            pubsub("latency", addr, &c, &flow, vec![topic.clone()], topic, 1).await
        }
        Cmd::Idle {
            conns,
            hold_secs,
            concurrency,
        } => idle(addr, &c, conns, hold_secs, concurrency).await,
        Cmd::Connects { conns, concurrency } => connects(addr, &c, conns, concurrency).await,
        Cmd::Ingest {
            devices,
            msgs,
            window,
            plain,
        } => {
            ingest(
                addr,
                &c,
                devices.max(1),
                msgs,
                window.clamp(1, 60000),
                plain,
            )
            .await
        }
    }
}

// ---------------------------------------------------------------------------
// Process metrics
// ---------------------------------------------------------------------------

fn raise_nofile() {
    // SAFETY: plain libc calls on a stack-allocated struct.
    unsafe {
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

fn nofile_limit() -> u64 {
    // SAFETY: see raise_nofile.
    unsafe {
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 {
            rl.rlim_cur
        } else {
            0
        }
    }
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime+stime in seconds of a process (`self` or a pid).
fn cpu_secs(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces/parens: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15.
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / clk_tck())
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU snapshot of the broker and of ourselves.
struct CpuMark {
    broker: Option<f64>,
    me: Option<f64>,
}

impl CpuMark {
    fn take(c: &Common) -> Self {
        CpuMark {
            broker: c.broker_pid.and_then(|p| cpu_secs(&p.to_string())),
            me: cpu_secs("self"),
        }
    }
    /// Adds broker_cpu_sec, gen_cpu_sec and per-cpu-second rates to `m`.
    fn report(&self, c: &Common, m: &mut serde_json::Map<String, Value>, work: f64, key: &str) {
        let now = CpuMark::take(c);
        if let (Some(a), Some(b)) = (self.broker, now.broker) {
            let d = b - a;
            m.insert("broker_cpu_sec".into(), json!(round3(d)));
            if d > 0.0 {
                m.insert(key.into(), json!(round1(work / d)));
            }
        }
        if let Some(pid) = c.broker_pid {
            if let Some(r) = rss_bytes(pid) {
                m.insert("broker_rss_bytes".into(), json!(r));
            }
        }
        if let (Some(a), Some(b)) = (self.me, now.me) {
            m.insert("gen_cpu_sec".into(), json!(round3(b - a)));
        }
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

// ---------------------------------------------------------------------------
// Latency histogram (log-linear, ~1.5% precision, fixed size)
// ---------------------------------------------------------------------------

const H_LINEAR: u64 = 2048;
const H_SUB_BITS: u32 = 6;

#[derive(Clone)]
struct Hist {
    buckets: Vec<u64>,
    count: u64,
    max: u64,
}

impl Hist {
    fn new() -> Self {
        Hist {
            buckets: vec![0; H_LINEAR as usize + 54 * 64],
            count: 0,
            max: 0,
        }
    }
    fn idx(v: u64) -> usize {
        if v < H_LINEAR {
            v as usize
        } else {
            let k = 63 - v.leading_zeros(); // >= 11
            let sub = (v >> (k - H_SUB_BITS)) & 63;
            H_LINEAR as usize + (k as usize - 11) * 64 + sub as usize
        }
    }
    fn value(i: usize) -> u64 {
        if (i as u64) < H_LINEAR {
            i as u64
        } else {
            let j = i - H_LINEAR as usize;
            let k = (j / 64) as u32 + 11;
            let sub = (j % 64) as u64;
            (64 + sub) << (k - H_SUB_BITS)
        }
    }
    #[inline]
    fn record(&mut self, v: u64) {
        let i = Self::idx(v).min(self.buckets.len() - 1);
        self.buckets[i] += 1;
        self.count += 1;
        if v > self.max {
            self.max = v;
        }
    }
    fn merge(&mut self, o: &Hist) {
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += *b;
        }
        self.count += o.count;
        self.max = self.max.max(o.max);
    }
    fn pct(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let target = ((self.count as f64) * p / 100.0).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            acc += n;
            if acc >= target {
                return Self::value(i).min(self.max);
            }
        }
        self.max
    }
}

// ---------------------------------------------------------------------------
// Wire helpers
// ---------------------------------------------------------------------------

fn qos_of(q: u8) -> Result<QoS> {
    match q {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        2 => Ok(QoS::ExactlyOnce),
        _ => bail!("qos must be 0, 1 or 2"),
    }
}

fn put_varint(buf: &mut BytesMut, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        buf.put_u8(b);
        if n == 0 {
            break;
        }
    }
}

/// Encodes one PUBLISH with the bench header in its payload.
#[allow(clippy::too_many_arguments)]
#[inline]
fn put_publish(
    buf: &mut BytesMut,
    topic: &[u8],
    qos: u8,
    pkid: u16,
    pub_id: u32,
    seq: u32,
    size: usize,
) {
    let size = size.max(HDR);
    let rem = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + size;
    buf.reserve(rem + 5);
    buf.put_u8(0x30 | (qos << 1));
    put_varint(buf, rem);
    buf.put_u16(topic.len() as u16);
    buf.put_slice(topic);
    if qos > 0 {
        buf.put_u16(pkid);
    }
    buf.put_u64(now_ns());
    buf.put_u32(pub_id);
    buf.put_u32(seq);
    buf.put_bytes(0, size - HDR);
}

/// `[type<<4 | flags, 2, pkid]` — PUBACK/PUBREC/PUBREL/PUBCOMP.
#[inline]
fn put_ack(buf: &mut BytesMut, byte1: u8, pkid: u16) {
    buf.put_u8(byte1);
    buf.put_u8(2);
    buf.put_u16(pkid);
}

const PUBACK: u8 = 0x40;
const PUBREC: u8 = 0x50;
const PUBREL: u8 = 0x62;
const PUBCOMP: u8 = 0x70;

/// One complete packet found at the front of a read buffer.
enum Pkt<'a> {
    Publish {
        qos: u8,
        pkid: u16,
        payload: &'a [u8],
    },
    /// (type nibble, packet id) for PUBACK/PUBREC/PUBREL/PUBCOMP/SUBACK/UNSUBACK.
    Ack(u8, u16),
    Other,
}

/// Frames the next packet of `buf` with `mqttbytes::check`. Returns the packet
/// and its frame length, `None` if more bytes are needed.
fn next_packet(buf: &[u8]) -> Result<Option<(Pkt<'_>, usize)>> {
    let fh = match mqttbytes::check(buf.iter(), MAX_PACKET) {
        Ok(fh) => fh,
        Err(mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
        Err(e) => bail!("malformed packet from broker: {e:?}"),
    };
    let len = fh.frame_length();
    let frame = buf.get(..len).ok_or_else(|| anyhow!("short frame"))?;
    let byte1 = frame[0];
    // Fixed header = byte1 + the remaining-length varint (check() validated it).
    let hl = 1
        + frame
            .iter()
            .skip(1)
            .take(4)
            .position(|b| b & 0x80 == 0)
            .ok_or_else(|| anyhow!("bad remaining length"))?
        + 1;
    let body = frame.get(hl..).ok_or_else(|| anyhow!("short frame"))?;
    let ty = byte1 >> 4;
    let pkt = match ty {
        3 => {
            let qos = (byte1 >> 1) & 3;
            if qos > 2 {
                bail!("publish with qos 3");
            }
            let tl = u16::from_be_bytes(
                body.get(..2)
                    .ok_or_else(|| anyhow!("short publish"))?
                    .try_into()?,
            ) as usize;
            let mut off = 2 + tl;
            let pkid = if qos > 0 {
                let p = body
                    .get(off..off + 2)
                    .ok_or_else(|| anyhow!("short publish"))?;
                off += 2;
                u16::from_be_bytes([p[0], p[1]])
            } else {
                0
            };
            let payload = body.get(off..).ok_or_else(|| anyhow!("short publish"))?;
            Pkt::Publish { qos, pkid, payload }
        }
        4..=7 | 9 | 11 => {
            let p = body.get(..2).ok_or_else(|| anyhow!("short ack"))?;
            Pkt::Ack(ty, u16::from_be_bytes([p[0], p[1]]))
        }
        _ => Pkt::Other,
    };
    Ok(Some((pkt, len)))
}

fn parse_hdr(payload: &[u8]) -> Option<(u64, u32, u32)> {
    let h = payload.get(..HDR)?;
    let ts = u64::from_be_bytes(h[0..8].try_into().ok()?);
    let id = u32::from_be_bytes(h[8..12].try_into().ok()?);
    let seq = u32::from_be_bytes(h[12..16].try_into().ok()?);
    Some((ts, id, seq))
}

/// TCP connect + CONNECT + wait CONNACK. Returns the stream and session_present.
async fn mqtt_connect(
    addr: SocketAddr,
    client_id: &str,
    clean: bool,
    keep_alive: u16,
    deadline: TInstant,
) -> Result<(TcpStream, bool)> {
    let mut s = timeout_at(deadline, TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("timeout connecting to {addr}"))?
        .with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    let login = login_for_next_connect();
    // A device user (`<tenant>/device_<id>`) may only connect as its own device id.
    let own_id = login
        .as_ref()
        .and_then(|(u, _)| u.split_once("/device_").map(|(_, id)| id.to_string()));
    let mut c = Connect::new(own_id.as_deref().unwrap_or(client_id));
    c.keep_alive = keep_alive;
    c.clean_session = clean;
    if let Some((user, pw)) = login {
        c.set_login(user, pw);
    }
    let mut b = BytesMut::with_capacity(64);
    c.write(&mut b)
        .map_err(|e| anyhow!("encode connect: {e:?}"))?;
    s.write_all(&b).await?;
    let mut r = BytesMut::with_capacity(64);
    loop {
        match mqttbytes::v4::read(&mut r, 1024) {
            Ok(mqttbytes::v4::Packet::ConnAck(ConnAck {
                code,
                session_present,
            })) => {
                if code != ConnectReturnCode::Success {
                    bail!("connack refused: {code:?}");
                }
                return Ok((s, session_present));
            }
            Ok(p) => bail!("expected CONNACK, got {p:?}"),
            Err(mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => bail!("bad CONNACK: {e:?}"),
        }
        let n = timeout_at(deadline, s.read_buf(&mut r))
            .await
            .map_err(|_| anyhow!("timeout waiting for CONNACK"))??;
        if n == 0 {
            bail!("broker closed connection before CONNACK");
        }
    }
}

async fn mqtt_subscribe(
    s: &mut TcpStream,
    filter: &str,
    qos: QoS,
    deadline: TInstant,
) -> Result<()> {
    let mut sub = Subscribe::new(filter, qos);
    sub.pkid = 1;
    let mut b = BytesMut::new();
    sub.write(&mut b)
        .map_err(|e| anyhow!("encode subscribe: {e:?}"))?;
    s.write_all(&b).await?;
    let mut r = BytesMut::with_capacity(64);
    loop {
        match mqttbytes::v4::read(&mut r, 1024) {
            Ok(mqttbytes::v4::Packet::SubAck(a)) => {
                use mqttbytes::v4::SubscribeReasonCode as R;
                return match a.return_codes.first() {
                    Some(R::Success(_)) => Ok(()),
                    other => Err(anyhow!("subscribe refused: {other:?}")),
                };
            }
            // A persistent session may deliver queued messages before SUBACK;
            // they are stale, drop them (acks are not needed: clean runs use fresh ids).
            Ok(_) => {}
            Err(mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => bail!("bad SUBACK: {e:?}"),
        }
        let n = timeout_at(deadline, s.read_buf(&mut r))
            .await
            .map_err(|_| anyhow!("timeout waiting for SUBACK"))??;
        if n == 0 {
            bail!("broker closed connection before SUBACK");
        }
    }
}

async fn mqtt_disconnect(mut s: TcpStream) {
    let mut b = BytesMut::with_capacity(2);
    if Disconnect.write(&mut b).is_ok() {
        let _ = s.write_all(&b).await;
    }
    let _ = s.shutdown().await;
}

/// DISCONNECT, then wait for the broker to close first. The side that closes first keeps the
/// TIME_WAIT entry; leaving tens of thousands of them on the generator side made the
/// generator's own connect() the bottleneck of the connect-rate scenario for every broker.
async fn mqtt_disconnect_wait(mut s: TcpStream, deadline: TInstant) {
    let mut b = BytesMut::with_capacity(2);
    if Disconnect.write(&mut b).is_ok() {
        let _ = s.write_all(&b).await;
    }
    let mut buf = [0u8; 64];
    let wait = deadline.min(TInstant::now() + Duration::from_secs(2));
    while let Ok(Ok(n)) = timeout_at(wait, s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
}

// ---------------------------------------------------------------------------
// Publisher / subscriber
// ---------------------------------------------------------------------------

struct PubCfg {
    id: u32,
    topic: String,
    qos: u8,
    msgs: u64,
    size: usize,
    /// msg/s for this publisher, 0 = unlimited.
    rate: f64,
    window: usize,
    deadline: TInstant,
}

#[derive(Default)]
struct PubResult {
    sent: u64,
    acked: u64,
    error: Option<String>,
}

/// Publishes `msgs` messages; for QoS1/2 keeps at most `window` in flight.
async fn publisher(mut s: TcpStream, cfg: PubCfg, start: Arc<Barrier>) -> PubResult {
    let mut r = PubResult::default();
    start.wait().await;
    if let Err(e) = publisher_loop(&mut s, &cfg, &mut r).await {
        r.error = Some(format!("{e:#}"));
    }
    // Do not DISCONNECT before the broker forwarded everything: closing is fine
    // for QoS1/2 (all acked) and for QoS0 the broker already read the data.
    mqtt_disconnect(s).await;
    r
}

async fn publisher_loop(s: &mut TcpStream, cfg: &PubCfg, r: &mut PubResult) -> Result<()> {
    let topic = cfg.topic.as_bytes();
    let window = if cfg.qos == 0 {
        usize::MAX
    } else {
        cfg.window.clamp(1, 65000)
    };
    let mut wbuf = BytesMut::with_capacity(WBATCH_BYTES * 2);
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    let mut in_use = vec![false; 65536];
    let mut next_pkid: u16 = 1;
    let mut inflight = 0usize;
    let t_start = TInstant::now();
    let per_msg = cfg.size.max(HDR) + topic.len() + 6;
    let batch_max = (WBATCH_BYTES / per_msg).max(1) as u64;
    loop {
        if TInstant::now() >= cfg.deadline {
            bail!("deadline reached (sent {}, acked {})", r.sent, r.acked);
        }
        // 1. Harvest whatever the broker sent us, without blocking.
        loop {
            rbuf.reserve(32 * 1024);
            match s.try_read_buf(&mut rbuf) {
                Ok(0) => bail!("broker closed the publisher connection"),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        handle_pub_acks(&mut rbuf, &mut wbuf, &mut in_use, &mut inflight, r)?;

        // 2. Work out how many publishes we may send now.
        let remaining = cfg.msgs - r.sent;
        let mut n = remaining.min(batch_max);
        n = n.min(window.saturating_sub(inflight) as u64);
        let mut next_due: Option<TInstant> = None;
        if cfg.rate > 0.0 && n > 0 {
            let el = t_start.elapsed().as_secs_f64();
            let allowed = ((el * cfg.rate) as u64 + 1).min(cfg.msgs);
            let due = allowed.saturating_sub(r.sent);
            if due < n {
                n = due;
                next_due = Some(t_start + Duration::from_secs_f64((r.sent + n) as f64 / cfg.rate));
            }
        }
        for _ in 0..n {
            let pkid = if cfg.qos > 0 {
                while in_use[next_pkid as usize] {
                    next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                }
                let p = next_pkid;
                in_use[p as usize] = true;
                inflight += 1;
                next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                p
            } else {
                0
            };
            put_publish(
                &mut wbuf,
                topic,
                cfg.qos,
                pkid,
                cfg.id,
                r.sent as u32,
                cfg.size,
            );
            r.sent += 1;
        }
        if !wbuf.is_empty() {
            timeout_at(cfg.deadline, s.write_all(&wbuf))
                .await
                .map_err(|_| anyhow!("deadline while writing"))??;
            wbuf.clear();
        }
        if r.sent >= cfg.msgs && inflight == 0 {
            return Ok(());
        }
        if n > 0 {
            continue;
        }
        // 3. Nothing to send: wait for acks or for the pacing clock.
        // When pacing, acks are harvested at the next tick (fewer wakeups);
        // otherwise we are window-limited or draining and wait for acks.
        match next_due {
            Some(t) => sleep_until(t.min(cfg.deadline)).await,
            None if inflight > 0 => {
                tokio::select! {
                    res = s.readable() => res?,
                    _ = sleep_until(cfg.deadline) => {}
                }
            }
            None => sleep_until(cfg.deadline).await,
        }
    }
}

fn handle_pub_acks(
    rbuf: &mut BytesMut,
    wbuf: &mut BytesMut,
    in_use: &mut [bool],
    inflight: &mut usize,
    r: &mut PubResult,
) -> Result<()> {
    while let Some((pkt, len)) = next_packet(rbuf)? {
        match pkt {
            Pkt::Ack(4, pkid) | Pkt::Ack(7, pkid) => {
                if let Some(u) = in_use.get_mut(pkid as usize) {
                    if *u {
                        *u = false;
                        *inflight -= 1;
                        r.acked += 1;
                    }
                }
            }
            Pkt::Ack(5, pkid) => put_ack(wbuf, PUBREL, pkid),
            _ => {}
        }
        rbuf.advance(len);
    }
    Ok(())
}

struct SubCfg {
    qos: u8,
    /// Messages expected per publisher id.
    per_pub: Vec<u64>,
    deadline: TInstant,
    drain: Duration,
}

struct SubResult {
    received: u64,
    distinct: u64,
    dups: u64,
    stray: u64,
    hist: Hist,
    last_recv: Option<Instant>,
    error: Option<String>,
}

/// Receives until every expected message arrived, or publishers are done and
/// the broker stayed silent for `drain`, or the deadline.
async fn subscriber(
    mut s: TcpStream,
    cfg: Arc<SubCfg>,
    pubs_done: Arc<AtomicBool>,
    received_total: Arc<AtomicU64>,
) -> (TcpStream, SubResult) {
    let mut seen: Vec<Vec<u64>> = cfg
        .per_pub
        .iter()
        .map(|n| vec![0u64; (*n as usize).div_ceil(64)])
        .collect();
    let expected: u64 = cfg.per_pub.iter().sum();
    let mut res = SubResult {
        received: 0,
        distinct: 0,
        dups: 0,
        stray: 0,
        hist: Hist::new(),
        last_recv: None,
        error: None,
    };
    let mut rbuf = BytesMut::with_capacity(RBUF);
    let mut wbuf = BytesMut::with_capacity(64 * 1024);
    let mut last_activity = Instant::now();
    let r: Result<()> = async {
        while res.distinct < expected {
            let now = TInstant::now();
            if now >= cfg.deadline {
                break;
            }
            if pubs_done.load(Ordering::Acquire) && last_activity.elapsed() >= cfg.drain {
                break;
            }
            rbuf.reserve(RBUF / 2);
            let wake = (now + Duration::from_millis(200)).min(cfg.deadline);
            let n = match timeout_at(wake, s.read_buf(&mut rbuf)).await {
                Err(_) => continue,
                Ok(r) => r?,
            };
            if n == 0 {
                bail!("broker closed the subscriber connection");
            }
            let t_now = now_ns();
            last_activity = Instant::now();
            let before = res.received;
            while let Some((pkt, len)) = next_packet(&rbuf)? {
                match pkt {
                    Pkt::Publish { qos, pkid, payload } => {
                        res.received += 1;
                        match qos {
                            1 => put_ack(&mut wbuf, PUBACK, pkid),
                            2 => put_ack(&mut wbuf, PUBREC, pkid),
                            _ => {}
                        }
                        match parse_hdr(payload) {
                            Some((ts, id, seq)) => {
                                let slot = seen
                                    .get_mut(id as usize)
                                    .and_then(|v| v.get_mut(seq as usize / 64));
                                let ok = (seq as u64) < *cfg.per_pub.get(id as usize).unwrap_or(&0);
                                match slot {
                                    Some(w) if ok => {
                                        let bit = 1u64 << (seq % 64);
                                        if *w & bit != 0 {
                                            res.dups += 1;
                                        } else {
                                            *w |= bit;
                                            res.distinct += 1;
                                            res.hist.record(t_now.saturating_sub(ts) / 1000);
                                        }
                                    }
                                    _ => res.stray += 1,
                                }
                            }
                            None => res.stray += 1,
                        }
                    }
                    Pkt::Ack(6, pkid) => put_ack(&mut wbuf, PUBCOMP, pkid),
                    _ => {}
                }
                rbuf.advance(len);
            }
            if res.received > before {
                res.last_recv = Some(Instant::now());
                received_total.fetch_add(res.received - before, Ordering::Relaxed);
            }
            if !wbuf.is_empty() {
                timeout_at(cfg.deadline, s.write_all(&wbuf))
                    .await
                    .map_err(|_| anyhow!("deadline while writing acks"))??;
                wbuf.clear();
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = r {
        res.error = Some(format!("{e:#}"));
    }
    (s, res)
}

#[allow(clippy::too_many_arguments)]
async fn pubsub(
    scenario: &str,
    addr: SocketAddr,
    c: &Common,
    flow: &Flow,
    topics: Vec<String>,
    filter: String,
    nsubs: usize,
) -> Result<Value> {
    let qos = qos_of(flow.qos)?;
    let npubs = topics.len();
    let deadline = TInstant::now() + Duration::from_secs(c.timeout_secs);
    let run_id = format!("{}-{}", c.client_prefix, std::process::id());
    let size = flow.size.max(HDR);

    if flow.msgs / npubs as u64 >= u32::MAX as u64
        || flow.msgs.saturating_mul(nsubs as u64) > 4_000_000_000
    {
        bail!("--msgs too large (sequence numbers are u32, bitsets are in memory)");
    }
    // Split M messages over the publishers.
    let per_pub: Vec<u64> = (0..npubs as u64)
        .map(|i| flow.msgs / npubs as u64 + u64::from(i < flow.msgs % npubs as u64))
        .collect();

    // Subscribers first (connect + SUBACK), publishers next, then start together.
    let sub_cfg = Arc::new(SubCfg {
        qos: flow.qos,
        per_pub: per_pub.clone(),
        deadline,
        drain: Duration::from_secs(c.drain_secs),
    });
    let _ = sub_cfg.qos;
    let pubs_done = Arc::new(AtomicBool::new(false));
    let received_total = Arc::new(AtomicU64::new(0));
    let mut sub_streams = Vec::with_capacity(nsubs);
    let mut session_present_any = false;
    let sub_addr = match c.sub_port {
        Some(p) => SocketAddr::new(addr.ip(), p),
        None => addr,
    };
    for i in 0..nsubs {
        let id = format!("{run_id}-sub-{i}");
        let (mut s, sp) = mqtt_connect(sub_addr, &id, c.clean, 600, deadline)
            .await
            .with_context(|| format!("subscriber {i}"))?;
        session_present_any |= sp;
        mqtt_subscribe(&mut s, &filter, qos, deadline).await?;
        sub_streams.push(s);
    }
    let start = Arc::new(Barrier::new(npubs + 1));
    let mut pub_handles = Vec::with_capacity(npubs);
    for (i, topic) in topics.iter().enumerate() {
        let id = format!("{run_id}-pub-{i}");
        let (s, _) = mqtt_connect(addr, &id, true, 600, deadline)
            .await
            .with_context(|| format!("publisher {i}"))?;
        let cfg = PubCfg {
            id: i as u32,
            topic: topic.clone(),
            qos: flow.qos,
            msgs: per_pub[i],
            size,
            rate: if flow.rate > 0 {
                flow.rate as f64 / npubs as f64
            } else {
                0.0
            },
            window: flow.window,
            deadline,
        };
        pub_handles.push(tokio::spawn(publisher(s, cfg, start.clone())));
    }
    let mut sub_handles = Vec::with_capacity(nsubs);
    for s in sub_streams {
        sub_handles.push(tokio::spawn(subscriber(
            s,
            sub_cfg.clone(),
            pubs_done.clone(),
            received_total.clone(),
        )));
    }

    let cpu = CpuMark::take(c);
    let t_start = Instant::now();
    start.wait().await;

    let mut sent = 0;
    let mut acked = 0;
    let mut errors: Vec<String> = Vec::new();
    for h in pub_handles {
        let r = h.await?;
        sent += r.sent;
        acked += r.acked;
        if let Some(e) = r.error {
            errors.push(format!("publisher: {e}"));
        }
    }
    let pub_elapsed = t_start.elapsed().as_secs_f64();
    pubs_done.store(true, Ordering::Release);
    let mut hist = Hist::new();
    let (mut received, mut distinct, mut dups, mut stray) = (0, 0, 0, 0);
    let mut last_recv: Option<Instant> = None;
    let mut subs_back = Vec::new();
    for h in sub_handles {
        let (s, r) = h.await?;
        subs_back.push(s);
        received += r.received;
        distinct += r.distinct;
        dups += r.dups;
        stray += r.stray;
        hist.merge(&r.hist);
        last_recv = match (last_recv, r.last_recv) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if let Some(e) = r.error {
            errors.push(format!("subscriber: {e}"));
        }
    }
    let end = last_recv.unwrap_or_else(Instant::now).max(t_start);
    let elapsed = end.duration_since(t_start).as_secs_f64().max(1e-9);
    let expected = flow.msgs * nsubs as u64;
    let _ = received_total.load(Ordering::Relaxed);

    let mut m = serde_json::Map::new();
    m.insert("scenario".into(), json!(scenario));
    m.insert("qos".into(), json!(flow.qos));
    m.insert("pubs".into(), json!(npubs));
    m.insert("subs".into(), json!(nsubs));
    m.insert("size".into(), json!(size));
    m.insert("clean".into(), json!(c.clean));
    m.insert("rate_target".into(), json!(flow.rate));
    m.insert("expected".into(), json!(expected));
    m.insert("sent".into(), json!(sent));
    m.insert("acked".into(), json!(acked));
    m.insert("received".into(), json!(received));
    m.insert("lost".into(), json!(expected - distinct.min(expected)));
    m.insert(
        "lost_of_sent".into(),
        json!((sent * nsubs as u64).saturating_sub(distinct)),
    );
    m.insert("timed_out".into(), json!(TInstant::now() >= deadline));
    m.insert("duplicates".into(), json!(dups));
    m.insert("stray".into(), json!(stray));
    m.insert("elapsed_sec".into(), json!(round3(elapsed)));
    m.insert("publish_sec".into(), json!(round3(pub_elapsed)));
    m.insert(
        "msgs_per_sec".into(),
        json!(round1(received as f64 / elapsed)),
    );
    m.insert(
        "sent_per_sec".into(),
        json!(round1(sent as f64 / pub_elapsed.max(1e-9))),
    );
    m.insert("p50_us".into(), json!(hist.pct(50.0)));
    m.insert("p99_us".into(), json!(hist.pct(99.0)));
    m.insert("p999_us".into(), json!(hist.pct(99.9)));
    m.insert("max_us".into(), json!(hist.max));
    if session_present_any {
        m.insert("session_present".into(), json!(true));
    }
    cpu.report(c, &mut m, received as f64, "msgs_per_cpu_sec");
    if !errors.is_empty() {
        m.insert("errors".into(), json!(errors));
    }
    eprintln!(
        "{scenario} qos{} pubs={npubs} subs={nsubs} size={size}: sent {sent} received {received}/{expected} lost {} dup {dups} in {:.3}s = {:.0} msg/s; latency us p50 {} p99 {} p999 {} max {}{}",
        flow.qos,
        expected - distinct.min(expected),
        elapsed,
        received as f64 / elapsed,
        hist.pct(50.0),
        hist.pct(99.0),
        hist.pct(99.9),
        hist.max,
        m.get("broker_cpu_sec").map(|v| format!("; broker cpu {v}s")).unwrap_or_default(),
    );
    for e in &errors {
        eprintln!("  error: {e}");
    }

    // Persistent sessions: close them and wipe the session so it does not pile up.
    for s in subs_back {
        mqtt_disconnect(s).await;
    }
    if !c.clean {
        let wipe_deadline = TInstant::now() + Duration::from_secs(5);
        for i in 0..nsubs {
            let id = format!("{run_id}-sub-{i}");
            if let Ok((s, _)) = mqtt_connect(addr, &id, true, 600, wipe_deadline).await {
                mqtt_disconnect(s).await;
            }
        }
    }
    Ok(Value::Object(m))
}

// ---------------------------------------------------------------------------
// idle / connects
// ---------------------------------------------------------------------------

async fn idle(
    addr: SocketAddr,
    c: &Common,
    conns: usize,
    hold_secs: u64,
    concurrency: usize,
) -> Result<Value> {
    if conns > 10_000 {
        bail!("--conns is capped at 10000");
    }
    let limit = nofile_limit();
    if (conns as u64 + 64) > limit {
        bail!(
            "RLIMIT_NOFILE is {limit}, need {} (run with `ulimit -n 65536`)",
            conns + 64
        );
    }
    let deadline = TInstant::now() + Duration::from_secs(c.timeout_secs);
    let run_id = format!("{}-{}", c.client_prefix, std::process::id());
    let rss_before = c.broker_pid.and_then(rss_bytes);
    let cpu = CpuMark::take(c);
    let t0 = Instant::now();
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..conns {
        let permit = sem.clone().acquire_owned().await?;
        let id = format!("{run_id}-idle-{i}");
        set.spawn(async move {
            let r = mqtt_connect(addr, &id, true, 600, deadline).await;
            drop(permit);
            r
        });
        if TInstant::now() >= deadline {
            break;
        }
    }
    let mut streams = Vec::with_capacity(conns);
    let mut failures = 0u64;
    let mut first_err = None;
    while let Some(r) = set.join_next().await {
        match r? {
            Ok((s, _)) => streams.push(s),
            Err(e) => {
                failures += 1;
                first_err.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    // Let the broker settle (lazy allocations, freed connect buffers).
    tokio::time::sleep(Duration::from_millis(1000).min(deadline - TInstant::now().min(deadline)))
        .await;
    let rss_after = c.broker_pid.and_then(rss_bytes);
    let hold_until = (TInstant::now() + Duration::from_secs(hold_secs)).min(deadline);
    sleep_until(hold_until).await;
    let rss_after_hold = c.broker_pid.and_then(rss_bytes);
    // Check that the connections are still open: a read must not return EOF.
    let mut closed = 0u64;
    let mut buf = [0u8; 64];
    for s in &streams {
        match s.try_read(&mut buf) {
            Ok(0) => closed += 1,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => closed += 1,
        }
    }
    let open = streams.len() as u64;
    let mut m = serde_json::Map::new();
    m.insert("scenario".into(), json!("idle"));
    m.insert("conns".into(), json!(conns));
    m.insert("opened".into(), json!(open));
    m.insert("failed".into(), json!(failures));
    m.insert("closed_by_broker".into(), json!(closed));
    m.insert("connect_sec".into(), json!(round3(connect_secs)));
    m.insert("hold_sec".into(), json!(hold_secs));
    if let (Some(b), Some(a)) = (rss_before, rss_after) {
        m.insert("rss_before_bytes".into(), json!(b));
        m.insert("rss_after_bytes".into(), json!(a));
        if let Some(h) = rss_after_hold {
            m.insert("rss_after_hold_bytes".into(), json!(h));
        }
        if open > 0 {
            m.insert(
                "rss_per_conn_bytes".into(),
                json!(((a as i64 - b as i64) as f64 / open as f64).round()),
            );
        }
    }
    cpu.report(c, &mut m, open as f64, "conns_per_cpu_sec");
    if let Some(e) = &first_err {
        m.insert("first_error".into(), json!(e));
    }
    eprintln!(
        "idle: opened {open}/{conns} ({failures} failed, {closed} closed by broker) in {:.2}s; broker rss {:?} -> {:?} => {} bytes/conn",
        connect_secs,
        rss_before,
        rss_after,
        m.get("rss_per_conn_bytes").map(|v| v.to_string()).unwrap_or_else(|| "n/a (no --broker-pid)".into())
    );
    drop(streams);
    Ok(Value::Object(m))
}

async fn connects(addr: SocketAddr, c: &Common, conns: usize, concurrency: usize) -> Result<Value> {
    let deadline = TInstant::now() + Duration::from_secs(c.timeout_secs);
    let run_id = Arc::new(format!("{}-{}", c.client_prefix, std::process::id()));
    let next = Arc::new(AtomicUsize::new(0));
    let cpu = CpuMark::take(c);
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..concurrency.clamp(1, conns.max(1)) {
        let next = next.clone();
        let run_id = run_id.clone();
        set.spawn(async move {
            let mut h = Hist::new();
            let mut ok = 0u64;
            let mut fail = 0u64;
            let mut first_err = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= conns || TInstant::now() >= deadline {
                    break;
                }
                let t = Instant::now();
                match mqtt_connect(addr, &format!("{run_id}-c-{i}"), true, 60, deadline).await {
                    Ok((s, _)) => {
                        mqtt_disconnect_wait(s, deadline).await;
                        ok += 1;
                        h.record(t.elapsed().as_micros() as u64);
                    }
                    Err(e) => {
                        fail += 1;
                        first_err.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            (ok, fail, h, first_err)
        });
    }
    let (mut ok, mut fail, mut hist, mut first_err) = (0, 0, Hist::new(), None);
    while let Some(r) = set.join_next().await {
        let (o, f, h, e) = r?;
        ok += o;
        fail += f;
        hist.merge(&h);
        if first_err.is_none() {
            first_err = e;
        }
    }
    let el = t0.elapsed().as_secs_f64().max(1e-9);
    let mut m = serde_json::Map::new();
    m.insert("scenario".into(), json!("connects"));
    m.insert("conns".into(), json!(conns));
    m.insert("concurrency".into(), json!(concurrency));
    m.insert("ok".into(), json!(ok));
    m.insert("failed".into(), json!(fail));
    m.insert("elapsed_sec".into(), json!(round3(el)));
    m.insert("connects_per_sec".into(), json!(round1(ok as f64 / el)));
    m.insert("p50_us".into(), json!(hist.pct(50.0)));
    m.insert("p99_us".into(), json!(hist.pct(99.0)));
    m.insert("max_us".into(), json!(hist.max));
    cpu.report(c, &mut m, ok as f64, "connects_per_cpu_sec");
    if let Some(e) = &first_err {
        m.insert("first_error".into(), json!(e));
    }
    eprintln!(
        "connects: {ok} ok, {fail} failed in {el:.2}s = {:.0}/s; connect+connack us p50 {} p99 {} max {}",
        ok as f64 / el,
        hist.pct(50.0),
        hist.pct(99.0),
        hist.max
    );
    Ok(Value::Object(m))
}

// ---------------------------------------------------------------------------
// Device ingestion
// ---------------------------------------------------------------------------

/// A QoS 1 PUBLISH with a text payload.
fn put_publish_text(buf: &mut BytesMut, topic: &[u8], pkid: u16, payload: &[u8]) {
    let rem = 2 + topic.len() + 2 + payload.len();
    buf.reserve(rem + 5);
    buf.put_u8(0x30 | (1 << 1));
    put_varint(buf, rem);
    buf.put_u16(topic.len() as u16);
    buf.put_slice(topic);
    buf.put_u16(pkid);
    buf.put_slice(payload);
}

struct IngestResult {
    sent: u64,
    acked: u64,
    hist: Hist,
    error: Option<String>,
}

async fn ingest_device(
    mut s: TcpStream,
    topic: String,
    msgs: u64,
    window: usize,
    deadline: TInstant,
    start: Arc<Barrier>,
) -> IngestResult {
    let mut r = IngestResult {
        sent: 0,
        acked: 0,
        hist: Hist::new(),
        error: None,
    };
    start.wait().await;
    let mut sent_at = vec![0u64; 65536];
    let mut in_use = vec![false; 65536];
    let mut next_pkid: u16 = 1;
    let mut inflight = 0usize;
    let mut wbuf = BytesMut::with_capacity(64 * 1024);
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    let res: Result<()> = async {
        loop {
            if TInstant::now() >= deadline {
                bail!("deadline reached (sent {}, acked {})", r.sent, r.acked);
            }
            while inflight < window && r.sent < msgs {
                while in_use[next_pkid as usize] {
                    next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                }
                let p = next_pkid;
                next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                in_use[p as usize] = true;
                sent_at[p as usize] = now_ns();
                inflight += 1;
                let line = format!("200,c8y_Bench,T,{}", r.sent);
                put_publish_text(&mut wbuf, topic.as_bytes(), p, line.as_bytes());
                r.sent += 1;
            }
            if !wbuf.is_empty() {
                timeout_at(deadline, s.write_all(&wbuf))
                    .await
                    .map_err(|_| anyhow!("deadline while writing"))??;
                wbuf.clear();
            }
            if r.sent >= msgs && inflight == 0 {
                return Ok(());
            }
            rbuf.reserve(32 * 1024);
            match timeout_at(deadline, s.read_buf(&mut rbuf)).await {
                Err(_) => bail!("deadline while reading"),
                Ok(Ok(0)) => bail!("broker closed the connection"),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
            }
            while let Some((pkt, len)) = next_packet(&rbuf)? {
                if let Pkt::Ack(4, pkid) = pkt {
                    if in_use[pkid as usize] {
                        in_use[pkid as usize] = false;
                        inflight -= 1;
                        r.acked += 1;
                        r.hist.record((now_ns() - sent_at[pkid as usize]) / 1000);
                    }
                }
                rbuf.advance(len);
            }
        }
    }
    .await;
    if let Err(e) = res {
        r.error = Some(format!("{e:#}"));
    }
    mqtt_disconnect(s).await;
    r
}

async fn ingest(
    addr: SocketAddr,
    c: &Common,
    devices: usize,
    msgs: u64,
    window: usize,
    plain: bool,
) -> Result<Value> {
    let deadline = TInstant::now() + Duration::from_secs(c.timeout_secs);
    let run_id = format!("{}{}", c.client_prefix, std::process::id());
    let start = Arc::new(Barrier::new(devices + 1));
    let mut tasks = Vec::with_capacity(devices);
    let per = msgs / devices as u64;
    for i in 0..devices {
        let id = format!("{run_id}d{i}");
        let (s, _) = mqtt_connect(addr, &id, true, 600, deadline)
            .await
            .with_context(|| format!("connecting device {id}"))?;
        let topic = if plain {
            format!("{}/ingest/{i}", c.topic_root)
        } else {
            "s/us".to_string()
        };
        let n = per + u64::from((i as u64) < msgs % devices as u64);
        tasks.push(tokio::spawn(ingest_device(
            s,
            topic,
            n,
            window,
            deadline,
            start.clone(),
        )));
    }
    let cpu = CpuMark::take(c);
    start.wait().await;
    let t0 = Instant::now();
    let mut hist = Hist::new();
    let (mut sent, mut acked) = (0u64, 0u64);
    let mut errors = Vec::new();
    for t in tasks {
        let r = t.await?;
        sent += r.sent;
        acked += r.acked;
        hist.merge(&r.hist);
        errors.extend(r.error);
    }
    let elapsed = t0.elapsed().as_secs_f64().max(1e-9);
    let mut m = serde_json::Map::new();
    m.insert(
        "scenario".into(),
        json!(if plain {
            "ingest_plain"
        } else {
            "ingest_smartrest"
        }),
    );
    m.insert("devices".into(), json!(devices));
    m.insert("window".into(), json!(window));
    m.insert("sent".into(), json!(sent));
    m.insert("acked".into(), json!(acked));
    m.insert("elapsed_sec".into(), json!(round3(elapsed)));
    m.insert("msgs_per_sec".into(), json!(round1(acked as f64 / elapsed)));
    m.insert("ack_p50_us".into(), json!(hist.pct(50.0)));
    m.insert("ack_p99_us".into(), json!(hist.pct(99.0)));
    m.insert("ack_max_us".into(), json!(hist.max));
    m.insert("errors".into(), json!(errors));
    cpu.report(c, &mut m, acked as f64, "msgs_per_broker_cpu_sec");
    Ok(Value::Object(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hist_roundtrip() {
        let mut h = Hist::new();
        for v in 0..100_000u64 {
            h.record(v);
        }
        let p50 = h.pct(50.0) as f64;
        assert!((p50 - 50_000.0).abs() / 50_000.0 < 0.02, "{p50}");
        assert_eq!(h.max, 99_999);
        for v in [0u64, 1, 2047, 2048, 5000, 1 << 40, u64::MAX] {
            let i = Hist::idx(v);
            assert!(i < h.buckets.len() + 1000);
            assert!(Hist::value(i.min(h.buckets.len() - 1)) <= v);
        }
    }

    #[test]
    fn publish_roundtrip() {
        let mut b = BytesMut::new();
        put_publish(&mut b, b"a/b", 1, 7, 3, 42, 300);
        put_publish(&mut b, b"a/b", 0, 0, 4, 43, 10);
        let (p, len) = next_packet(&b).unwrap().unwrap();
        match p {
            Pkt::Publish { qos, pkid, payload } => {
                assert_eq!((qos, pkid, payload.len()), (1, 7, 300));
                let (_, id, seq) = parse_hdr(payload).unwrap();
                assert_eq!((id, seq), (3, 42));
            }
            _ => panic!(),
        }
        // Same bytes decode with mqttbytes.
        let mut bb = BytesMut::from(&b[..len]);
        match mqttbytes::v4::read(&mut bb, MAX_PACKET).unwrap() {
            mqttbytes::v4::Packet::Publish(p) => {
                assert_eq!((p.topic.as_str(), p.pkid, p.payload.len()), ("a/b", 7, 300))
            }
            _ => panic!(),
        }
        b.advance(len);
        let (p, _) = next_packet(&b).unwrap().unwrap();
        assert!(matches!(p, Pkt::Publish { qos: 0, payload, .. } if payload.len() == HDR));
        assert!(next_packet(&b[..5]).unwrap().is_none());
    }
}
