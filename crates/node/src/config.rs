//! Node settings. Every setting can come from a flag, an `FLEETMQ_*` environment variable or
//! a TOML file (`--config`); a flag or variable wins over the file, the file over the default.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use serde::Deserialize;

/// Command line and environment. Every field is optional so that the TOML file can fill gaps.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "fleetmq",
    version,
    about = "Clustered multi-tenant MQTT broker"
)]
pub struct Cli {
    /// TOML file with any of the settings below (snake_case keys).
    #[arg(long, env = "FLEETMQ_CONFIG")]
    pub config: Option<PathBuf>,
    /// Health probe instead of a node: GET this `http://host:port/path` and exit 0 on a 2xx
    /// answer, 1 otherwise (for container health checks in images without curl).
    #[arg(long)]
    pub probe: Option<String>,
    /// MQTT over TCP listen address.
    #[arg(long, env = "FLEETMQ_MQTT_ADDR")]
    pub mqtt_addr: Option<SocketAddr>,
    /// HTTP listen address (REST API, /metrics, /health/*).
    #[arg(long, env = "FLEETMQ_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// gRPC listen/advertise address (cluster-internal and messaging API).
    #[arg(long, env = "FLEETMQ_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// Directory for the node's sled database.
    #[arg(long, env = "FLEETMQ_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Numeric node id, unique in the cluster (default: the one stored in the data directory,
    /// or a random one generated and stored there on first start).
    #[arg(long, env = "FLEETMQ_NODE_ID")]
    pub node_id: Option<u64>,
    /// Node id from the host name's trailing ordinal: `fleetmq-2` is node 3 (a Kubernetes
    /// StatefulSet pod). Ordinal 0 with an empty data directory forms the cluster when none of
    /// the other `--join` seeds answers within 10 s, and joins it otherwise.
    #[arg(long, env = "FLEETMQ_NODE_ID_FROM_HOSTNAME")]
    pub node_id_from_hostname: bool,
    /// Drain the node serving this HTTP base URL (`http://127.0.0.1:8080`) and exit: hands its
    /// Raft leaderships over and moves its clients away (a Kubernetes preStop hook). Uses
    /// `management/admin` with the password in `FLEETMQ_ADMIN_PASSWORD`.
    #[arg(long)]
    pub drain_url: Option<String>,
    /// host:port other nodes reach this node's gRPC listener at (default: the gRPC listen
    /// address when it names a specific IP, else this host's name with its port).
    #[arg(long, env = "FLEETMQ_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// gRPC host:port of an existing member to join through (repeatable; DNS names allowed).
    /// Used only on an empty data directory; a member restarts from its own state.
    #[arg(long = "join", env = "FLEETMQ_JOIN", value_delimiter = ',')]
    pub join: Vec<String>,
    /// Largest MQTT packet accepted or sent, in bytes.
    #[arg(long, env = "FLEETMQ_MAX_PACKET_SIZE")]
    pub max_packet_size: Option<usize>,
    /// Longest topic name or filter, in bytes.
    #[arg(long, env = "FLEETMQ_MAX_TOPIC_LENGTH")]
    pub max_topic_length: Option<usize>,
    /// Most levels in a topic name or filter.
    #[arg(long, env = "FLEETMQ_MAX_TOPIC_LEVELS")]
    pub max_topic_levels: Option<usize>,
    /// Receive Maximum the server announces: QoS 1/2 PUBLISHes a client may have unacknowledged.
    #[arg(long, env = "FLEETMQ_RECEIVE_MAXIMUM")]
    pub receive_maximum: Option<u16>,
    /// Outbound QoS 1/2 messages in flight per session when the client sets no Receive Maximum.
    #[arg(long, env = "FLEETMQ_MAX_INFLIGHT")]
    pub max_inflight: Option<u16>,
    /// Messages queued per session (offline or behind the inflight window) before new ones drop.
    #[arg(long, env = "FLEETMQ_MAX_QUEUED_MESSAGES")]
    pub max_queued_messages: Option<usize>,
    /// Connections this node accepts at once.
    #[arg(long, env = "FLEETMQ_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Subscriptions one session may hold; more are refused in SUBACK (0x97 / 0x80).
    #[arg(long, env = "FLEETMQ_MAX_SUBSCRIPTIONS")]
    pub max_subscriptions: Option<usize>,
    /// Largest keep-alive a client may use, in seconds; larger or 0 values are replaced and
    /// returned as Server Keep Alive (MQTT 5).
    #[arg(long, env = "FLEETMQ_MAX_KEEP_ALIVE")]
    pub max_keep_alive: Option<u16>,
    /// Longest session expiry interval granted, in seconds.
    #[arg(long, env = "FLEETMQ_MAX_SESSION_EXPIRY")]
    pub max_session_expiry: Option<u32>,
    /// Topic Alias Maximum the server announces to MQTT 5 clients.
    #[arg(long, env = "FLEETMQ_TOPIC_ALIAS_MAXIMUM")]
    pub topic_alias_maximum: Option<u16>,
    /// Seconds a new connection has to send CONNECT.
    #[arg(long, env = "FLEETMQ_CONNECT_TIMEOUT")]
    pub connect_timeout_secs: Option<u64>,
    /// Commands per Raft entry at most (group commit size).
    #[arg(long, env = "FLEETMQ_RAFT_MAX_BATCH")]
    pub raft_max_batch: Option<usize>,
    /// Session shards (Raft groups besides the meta group) when this node creates the cluster; fixed from then on (joining nodes take the cluster's).
    #[arg(long, env = "FLEETMQ_SHARDS")]
    pub shards: Option<u32>,
    /// Measurements and events older than this many seconds are removed (0: kept for ever).
    /// Default 90 days.
    #[arg(long, env = "FLEETMQ_RETENTION_SECS")]
    pub retention_secs: Option<u64>,
    /// How often the retention sweep runs, in seconds.
    #[arg(long, env = "FLEETMQ_RETENTION_SWEEP_SECS")]
    pub retention_sweep_secs: Option<u64>,
    /// Admit clients that send no credentials into this tenant (created if missing). Off by default.
    #[arg(long, env = "FLEETMQ_ANONYMOUS_TENANT")]
    pub anonymous_tenant: Option<String>,
    /// Password of management/admin, used only when an empty data directory is initialised (otherwise one is generated and printed once).
    #[arg(long, env = "FLEETMQ_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<String>,
    /// Password of the device bootstrap user management/devicebootstrap (no bootstrap user without it).
    #[arg(long, env = "FLEETMQ_BOOTSTRAP_PASSWORD", hide_env_values = true)]
    pub bootstrap_password: Option<String>,
    /// MQTT over TLS listen address (used when --tls-cert and --tls-key are set).
    #[arg(long, env = "FLEETMQ_TLS_ADDR")]
    pub tls_addr: Option<SocketAddr>,
    /// MQTT over WebSocket listen address (path /mqtt).
    #[arg(long, env = "FLEETMQ_WS_ADDR")]
    pub ws_addr: Option<SocketAddr>,
    /// MQTT over secure WebSocket listen address (used when a certificate is set).
    #[arg(long, env = "FLEETMQ_WSS_ADDR")]
    pub wss_addr: Option<SocketAddr>,
    /// Server certificate chain (PEM). Re-read on SIGHUP and when the file changes.
    #[arg(long, env = "FLEETMQ_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, env = "FLEETMQ_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Default largest packet on reserved Cumulocity topics (s/, t/, q/, c/, JSON via MQTT), bytes; per-tenant override.
    #[arg(long, env = "FLEETMQ_RESERVED_PACKET_SIZE")]
    pub reserved_packet_size: Option<usize>,
    /// Default per-tenant connections on this node (0 = unlimited); per-tenant override.
    #[arg(long, env = "FLEETMQ_TENANT_MAX_CONNECTIONS")]
    pub tenant_max_connections: Option<u32>,
    /// Default per-tenant persistent sessions on this node (0 = unlimited).
    #[arg(long, env = "FLEETMQ_TENANT_MAX_SESSIONS")]
    pub tenant_max_sessions: Option<u32>,
    /// Default per-tenant inbound PUBLISH rate on this node (0 = unlimited).
    #[arg(long, env = "FLEETMQ_TENANT_MESSAGES_PER_SECOND")]
    pub tenant_messages_per_second: Option<u32>,
    /// Default per-tenant inbound byte rate on this node (0 = unlimited).
    #[arg(long, env = "FLEETMQ_TENANT_BYTES_PER_SECOND")]
    pub tenant_bytes_per_second: Option<u64>,
    /// Default per-tenant subscriptions on this node (0 = unlimited).
    #[arg(long, env = "FLEETMQ_TENANT_MAX_SUBSCRIPTIONS")]
    pub tenant_max_subscriptions: Option<u32>,
    /// Failed logins one source address may make at once before it is throttled.
    #[arg(long, env = "FLEETMQ_LOGIN_IP_BURST")]
    pub login_ip_burst: Option<u32>,
    /// Failed logins per minute one source address is allowed after its burst.
    #[arg(long, env = "FLEETMQ_LOGIN_IP_PER_MINUTE")]
    pub login_ip_per_minute: Option<u32>,
    /// Failed logins against one tenant at once before only known credentials get in.
    #[arg(long, env = "FLEETMQ_LOGIN_TENANT_BURST")]
    pub login_tenant_burst: Option<u32>,
    /// Failed logins per minute against one tenant after its burst.
    #[arg(long, env = "FLEETMQ_LOGIN_TENANT_PER_MINUTE")]
    pub login_tenant_per_minute: Option<u32>,
    /// Lifetime of device tokens issued on s/uat, seconds.
    #[arg(long, env = "FLEETMQ_DEVICE_TOKEN_LIFETIME")]
    pub device_token_lifetime_secs: Option<u64>,
    /// On SIGTERM, leave the cluster (hand this node's place to another) before stopping:
    /// for scaling in, not for a restart.
    #[arg(long, env = "FLEETMQ_LEAVE_ON_SHUTDOWN")]
    pub leave_on_shutdown: bool,
    /// Shared secret every node-to-node gRPC call carries; calls without it are refused. Set
    /// the same value on every member (better through the environment than the command line).
    #[arg(long, env = "FLEETMQ_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// PEM certificate chain this node presents on the gRPC port and to the peers it calls
    /// (mutual TLS between members; give all three `--cluster-tls-*` or none).
    #[arg(long, env = "FLEETMQ_CLUSTER_TLS_CERT")]
    pub cluster_tls_cert: Option<PathBuf>,
    /// PEM private key of `--cluster-tls-cert`.
    #[arg(long, env = "FLEETMQ_CLUSTER_TLS_KEY")]
    pub cluster_tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) a peer's certificate must chain to, both ways.
    #[arg(long, env = "FLEETMQ_CLUSTER_TLS_CA")]
    pub cluster_tls_ca: Option<PathBuf>,
    /// Seconds a voting member may be unreachable before the Raft leader puts a live learner
    /// in its place (0: never).
    #[arg(long = "dead-node-after", env = "FLEETMQ_DEAD_NODE_AFTER")]
    pub dead_node_after_secs: Option<u64>,
    /// Print the bound addresses as one JSON line on stdout once listening (for tests/scripts).
    #[arg(long, env = "FLEETMQ_PRINT_ADDRS")]
    pub print_addrs: bool,
    /// Log filter, e.g. `info` or `fleetmq_node=debug`.
    #[arg(long, env = "FLEETMQ_LOG")]
    pub log: Option<String>,
}

/// The same settings as read from the TOML file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub mqtt_addr: Option<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    pub grpc_addr: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub node_id: Option<u64>,
    pub advertise_addr: Option<String>,
    pub join: Option<Vec<String>>,
    pub max_packet_size: Option<usize>,
    pub max_topic_length: Option<usize>,
    pub max_topic_levels: Option<usize>,
    pub receive_maximum: Option<u16>,
    pub max_inflight: Option<u16>,
    pub max_queued_messages: Option<usize>,
    pub max_connections: Option<usize>,
    pub max_subscriptions: Option<usize>,
    pub max_keep_alive: Option<u16>,
    pub max_session_expiry: Option<u32>,
    pub topic_alias_maximum: Option<u16>,
    pub connect_timeout_secs: Option<u64>,
    pub raft_max_batch: Option<usize>,
    pub shards: Option<u32>,
    pub retention_secs: Option<u64>,
    pub retention_sweep_secs: Option<u64>,
    pub anonymous_tenant: Option<String>,
    pub admin_password: Option<String>,
    pub bootstrap_password: Option<String>,
    pub tls_addr: Option<SocketAddr>,
    pub ws_addr: Option<SocketAddr>,
    pub wss_addr: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub reserved_packet_size: Option<usize>,
    pub tenant_max_connections: Option<u32>,
    pub tenant_max_sessions: Option<u32>,
    pub tenant_messages_per_second: Option<u32>,
    pub tenant_bytes_per_second: Option<u64>,
    pub tenant_max_subscriptions: Option<u32>,
    pub login_ip_burst: Option<u32>,
    pub login_ip_per_minute: Option<u32>,
    pub login_tenant_burst: Option<u32>,
    pub login_tenant_per_minute: Option<u32>,
    pub device_token_lifetime_secs: Option<u64>,
    pub print_addrs: Option<bool>,
    pub leave_on_shutdown: Option<bool>,
    pub dead_node_after_secs: Option<u64>,
    pub cluster_secret: Option<String>,
    pub cluster_tls_cert: Option<PathBuf>,
    pub cluster_tls_key: Option<PathBuf>,
    pub cluster_tls_ca: Option<PathBuf>,
    pub log: Option<String>,
}

/// Resolved settings of a node. `Debug` is written by hand so that the passwords it holds
/// can never reach a log line.
#[derive(Clone)]
pub struct Config {
    pub mqtt_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub data_dir: PathBuf,
    /// `None`: the data directory's stored id, or a new random one (see `node_id::resolve`).
    pub node_id: Option<u64>,
    /// The StatefulSet ordinal of this node (`--node-id-from-hostname`).
    pub ordinal: Option<u64>,
    pub advertise_addr: Option<String>,
    pub join: Vec<String>,
    pub max_packet_size: usize,
    pub max_topic_length: usize,
    pub max_topic_levels: usize,
    pub receive_maximum: u16,
    pub max_inflight: u16,
    pub max_queued_messages: usize,
    pub max_connections: usize,
    pub max_subscriptions: usize,
    pub max_keep_alive: u16,
    pub max_session_expiry: u32,
    pub topic_alias_maximum: u16,
    pub connect_timeout_secs: u64,
    pub raft_max_batch: usize,
    /// Session shards of a cluster this node creates.
    pub shards: u32,
    /// Age in seconds after which measurements and events go (0: never).
    pub retention_secs: u64,
    /// Seconds between retention sweeps.
    pub retention_sweep_secs: u64,
    pub anonymous_tenant: Option<String>,
    pub admin_password: Option<String>,
    pub bootstrap_password: Option<String>,
    pub tls_addr: SocketAddr,
    pub ws_addr: SocketAddr,
    pub wss_addr: SocketAddr,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub reserved_packet_size: usize,
    pub tenant_max_connections: u32,
    pub tenant_max_sessions: u32,
    pub tenant_messages_per_second: u32,
    pub tenant_bytes_per_second: u64,
    pub tenant_max_subscriptions: u32,
    pub login_ip_burst: u32,
    pub login_ip_per_minute: u32,
    pub login_tenant_burst: u32,
    pub login_tenant_per_minute: u32,
    pub device_token_lifetime_secs: u64,
    pub print_addrs: bool,
    pub leave_on_shutdown: bool,
    pub dead_node_after_secs: u64,
    pub cluster_secret: Option<String>,
    /// Mutual TLS on the gRPC port: `(cert, key, ca)` PEM files.
    pub cluster_tls: Option<(PathBuf, PathBuf, PathBuf)>,
    pub log: String,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("mqtt_addr", &self.mqtt_addr)
            .field("http_addr", &self.http_addr)
            .field("data_dir", &self.data_dir)
            .field("node_id", &self.node_id)
            .field("advertise_addr", &self.advertise_addr)
            .field("join", &self.join)
            .field("anonymous_tenant", &self.anonymous_tenant)
            .field(
                "cluster_secret",
                &self.cluster_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("cluster_tls", &self.cluster_tls)
            .field(
                "admin_password",
                &self.admin_password.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "bootstrap_password",
                &self.bootstrap_password.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mqtt_addr: ([0, 0, 0, 0], 1883).into(),
            http_addr: ([0, 0, 0, 0], 8080).into(),
            grpc_addr: ([0, 0, 0, 0], 7070).into(),
            data_dir: PathBuf::from("./fleetmq-data"),
            node_id: None,
            ordinal: None,
            advertise_addr: None,
            join: Vec::new(),
            max_packet_size: 1024 * 1024,
            max_topic_length: 65_535,
            max_topic_levels: 128,
            receive_maximum: 1024,
            max_inflight: 1024,
            max_queued_messages: 10_000,
            max_connections: 1_000_000,
            max_subscriptions: 1_000,
            max_keep_alive: 3_600,
            max_session_expiry: u32::MAX,
            topic_alias_maximum: 64,
            connect_timeout_secs: 10,
            raft_max_batch: 4_096,
            shards: fleetmq_cluster::durable::DEFAULT_SHARDS,
            retention_secs: 90 * 86_400,
            retention_sweep_secs: 60,
            anonymous_tenant: None,
            admin_password: None,
            bootstrap_password: None,
            tls_addr: ([0, 0, 0, 0], 8883).into(),
            ws_addr: ([0, 0, 0, 0], 8083).into(),
            wss_addr: ([0, 0, 0, 0], 8084).into(),
            tls_cert: None,
            tls_key: None,
            reserved_packet_size: 16_384,
            tenant_max_connections: 0,
            tenant_max_sessions: 0,
            tenant_messages_per_second: 0,
            tenant_bytes_per_second: 0,
            tenant_max_subscriptions: 0,
            login_ip_burst: 10,
            login_ip_per_minute: 20,
            login_tenant_burst: 200,
            login_tenant_per_minute: 600,
            device_token_lifetime_secs: 3600,
            print_addrs: false,
            leave_on_shutdown: false,
            dead_node_after_secs: 30,
            cluster_secret: None,
            cluster_tls: None,
            log: "info,openraft=warn".into(),
        }
    }
}

/// Error reading the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid setting: {0}")]
    Invalid(&'static str),
    #[error("--node-id-from-hostname: the host name has no trailing -<number>")]
    NoOrdinal,
}

/// This host's name (`HOSTNAME`, else `/etc/hostname`).
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_default()
}

/// The trailing ordinal of a StatefulSet pod name (`fleetmq-2` → 2).
pub fn ordinal_of(host: &str) -> Option<u64> {
    let short = host.split('.').next().unwrap_or(host);
    let (_, n) = short.rsplit_once('-')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

impl Config {
    /// Resolves flags/env over the TOML file over defaults.
    pub fn resolve(cli: Cli) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source,
                })?
            }
            None => FileConfig::default(),
        };
        let d = Config::default();
        let cfg =
            Config {
                mqtt_addr: cli.mqtt_addr.or(file.mqtt_addr).unwrap_or(d.mqtt_addr),
                http_addr: cli.http_addr.or(file.http_addr).unwrap_or(d.http_addr),
                grpc_addr: cli.grpc_addr.or(file.grpc_addr).unwrap_or(d.grpc_addr),
                data_dir: cli.data_dir.or(file.data_dir).unwrap_or(d.data_dir),
                node_id: cli
                    .node_id
                    .or(file.node_id)
                    .or(if cli.node_id_from_hostname {
                        Some(ordinal_of(&host_name()).ok_or(ConfigError::NoOrdinal)? + 1)
                    } else {
                        None
                    }),
                ordinal: if cli.node_id_from_hostname {
                    ordinal_of(&host_name())
                } else {
                    None
                },
                advertise_addr: cli.advertise_addr.or(file.advertise_addr),
                join: if cli.join.is_empty() {
                    file.join.unwrap_or_default()
                } else {
                    cli.join
                },
                max_packet_size: cli
                    .max_packet_size
                    .or(file.max_packet_size)
                    .unwrap_or(d.max_packet_size),
                max_topic_length: cli
                    .max_topic_length
                    .or(file.max_topic_length)
                    .unwrap_or(d.max_topic_length),
                max_topic_levels: cli
                    .max_topic_levels
                    .or(file.max_topic_levels)
                    .unwrap_or(d.max_topic_levels),
                receive_maximum: cli
                    .receive_maximum
                    .or(file.receive_maximum)
                    .unwrap_or(d.receive_maximum),
                max_inflight: cli
                    .max_inflight
                    .or(file.max_inflight)
                    .unwrap_or(d.max_inflight),
                max_queued_messages: cli
                    .max_queued_messages
                    .or(file.max_queued_messages)
                    .unwrap_or(d.max_queued_messages),
                max_connections: cli
                    .max_connections
                    .or(file.max_connections)
                    .unwrap_or(d.max_connections),
                max_subscriptions: cli
                    .max_subscriptions
                    .or(file.max_subscriptions)
                    .unwrap_or(d.max_subscriptions),
                max_keep_alive: cli
                    .max_keep_alive
                    .or(file.max_keep_alive)
                    .unwrap_or(d.max_keep_alive),
                max_session_expiry: cli
                    .max_session_expiry
                    .or(file.max_session_expiry)
                    .unwrap_or(d.max_session_expiry),
                topic_alias_maximum: cli
                    .topic_alias_maximum
                    .or(file.topic_alias_maximum)
                    .unwrap_or(d.topic_alias_maximum),
                connect_timeout_secs: cli
                    .connect_timeout_secs
                    .or(file.connect_timeout_secs)
                    .unwrap_or(d.connect_timeout_secs),
                raft_max_batch: cli
                    .raft_max_batch
                    .or(file.raft_max_batch)
                    .unwrap_or(d.raft_max_batch),
                shards: cli.shards.or(file.shards).unwrap_or(d.shards),
                retention_secs: cli
                    .retention_secs
                    .or(file.retention_secs)
                    .unwrap_or(d.retention_secs),
                retention_sweep_secs: cli
                    .retention_sweep_secs
                    .or(file.retention_sweep_secs)
                    .unwrap_or(d.retention_sweep_secs)
                    .max(1),
                anonymous_tenant: cli.anonymous_tenant.or(file.anonymous_tenant),
                admin_password: cli.admin_password.or(file.admin_password),
                bootstrap_password: cli.bootstrap_password.or(file.bootstrap_password),
                tls_addr: cli.tls_addr.or(file.tls_addr).unwrap_or(d.tls_addr),
                ws_addr: cli.ws_addr.or(file.ws_addr).unwrap_or(d.ws_addr),
                wss_addr: cli.wss_addr.or(file.wss_addr).unwrap_or(d.wss_addr),
                tls_cert: cli.tls_cert.or(file.tls_cert),
                tls_key: cli.tls_key.or(file.tls_key),
                reserved_packet_size: cli
                    .reserved_packet_size
                    .or(file.reserved_packet_size)
                    .unwrap_or(d.reserved_packet_size),
                tenant_max_connections: cli
                    .tenant_max_connections
                    .or(file.tenant_max_connections)
                    .unwrap_or(d.tenant_max_connections),
                tenant_max_sessions: cli
                    .tenant_max_sessions
                    .or(file.tenant_max_sessions)
                    .unwrap_or(d.tenant_max_sessions),
                tenant_messages_per_second: cli
                    .tenant_messages_per_second
                    .or(file.tenant_messages_per_second)
                    .unwrap_or(d.tenant_messages_per_second),
                tenant_bytes_per_second: cli
                    .tenant_bytes_per_second
                    .or(file.tenant_bytes_per_second)
                    .unwrap_or(d.tenant_bytes_per_second),
                tenant_max_subscriptions: cli
                    .tenant_max_subscriptions
                    .or(file.tenant_max_subscriptions)
                    .unwrap_or(d.tenant_max_subscriptions),
                login_ip_burst: cli
                    .login_ip_burst
                    .or(file.login_ip_burst)
                    .unwrap_or(d.login_ip_burst),
                login_ip_per_minute: cli
                    .login_ip_per_minute
                    .or(file.login_ip_per_minute)
                    .unwrap_or(d.login_ip_per_minute),
                login_tenant_burst: cli
                    .login_tenant_burst
                    .or(file.login_tenant_burst)
                    .unwrap_or(d.login_tenant_burst),
                login_tenant_per_minute: cli
                    .login_tenant_per_minute
                    .or(file.login_tenant_per_minute)
                    .unwrap_or(d.login_tenant_per_minute),
                device_token_lifetime_secs: cli
                    .device_token_lifetime_secs
                    .or(file.device_token_lifetime_secs)
                    .unwrap_or(d.device_token_lifetime_secs),
                print_addrs: cli.print_addrs || file.print_addrs.unwrap_or(false),
                leave_on_shutdown: cli.leave_on_shutdown || file.leave_on_shutdown.unwrap_or(false),
                dead_node_after_secs: cli
                    .dead_node_after_secs
                    .or(file.dead_node_after_secs)
                    .unwrap_or(d.dead_node_after_secs),
                cluster_secret: cli.cluster_secret.or(file.cluster_secret),
                cluster_tls: match (
                    cli.cluster_tls_cert.or(file.cluster_tls_cert),
                    cli.cluster_tls_key.or(file.cluster_tls_key),
                    cli.cluster_tls_ca.or(file.cluster_tls_ca),
                ) {
                    (None, None, None) => None,
                    (Some(c), Some(k), Some(a)) => Some((c, k, a)),
                    _ => return Err(ConfigError::Invalid(
                        "--cluster-tls-cert, --cluster-tls-key and --cluster-tls-ca go together",
                    )),
                },
                log: cli.log.or(file.log).unwrap_or(d.log),
            };
        if cfg.receive_maximum == 0 || cfg.max_inflight == 0 {
            return Err(ConfigError::Invalid(
                "receive_maximum and max_inflight must be at least 1",
            ));
        }
        if cfg.max_packet_size < 64 || cfg.max_packet_size > 268_435_460 {
            return Err(ConfigError::Invalid(
                "max_packet_size must be between 64 bytes and 256 MiB",
            ));
        }
        if cfg.shards > fleetmq_cluster::durable::MAX_SHARDS {
            return Err(ConfigError::Invalid("shards must be at most 128"));
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statefulset_ordinals() {
        assert_eq!(ordinal_of("fleetmq-0"), Some(0));
        assert_eq!(ordinal_of("fleetmq-12.fleetmq-headless.ns.svc"), Some(12));
        assert_eq!(ordinal_of("my-broker-3"), Some(3));
        assert_eq!(ordinal_of("fleetmq"), None);
        assert_eq!(ordinal_of("fleetmq-a"), None);
        assert_eq!(ordinal_of("fleetmq-"), None);
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(
            &path,
            "max_packet_size = 2048\nmax_keep_alive = 60\nanonymous_tenant = \"t1\"\n",
        )
        .unwrap();
        let cli = Cli {
            config: Some(path),
            max_keep_alive: Some(30),
            ..Cli::default()
        };
        let cfg = Config::resolve(cli).unwrap();
        assert_eq!(cfg.max_packet_size, 2048);
        assert_eq!(cfg.max_keep_alive, 30);
        assert_eq!(cfg.anonymous_tenant.as_deref(), Some("t1"));
        assert_eq!(
            cfg.max_queued_messages,
            Config::default().max_queued_messages
        );
    }

    #[test]
    fn env_var_sets_a_value_and_a_flag_beats_it() {
        use clap::Parser;
        // Only this test touches this variable, so setting it in-process is safe here.
        std::env::set_var("FLEETMQ_MAX_QUEUED_MESSAGES", "7");
        let from_env = Config::resolve(Cli::try_parse_from(["fleetmq"]).unwrap()).unwrap();
        let from_flag = Config::resolve(
            Cli::try_parse_from(["fleetmq", "--max-queued-messages", "9"]).unwrap(),
        )
        .unwrap();
        std::env::remove_var("FLEETMQ_MAX_QUEUED_MESSAGES");
        assert_eq!(from_env.max_queued_messages, 7);
        assert_eq!(from_flag.max_queued_messages, 9);
    }

    #[test]
    fn unknown_file_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(&path, "no_such_setting = 1\n").unwrap();
        let cli = Cli {
            config: Some(path),
            ..Cli::default()
        };
        assert!(matches!(
            Config::resolve(cli),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn cluster_tls_files_go_together() {
        let some = |p: &str| Some(PathBuf::from(p));
        let partial = Cli {
            cluster_tls_cert: some("c.pem"),
            cluster_tls_key: some("k.pem"),
            ..Cli::default()
        };
        assert!(matches!(
            Config::resolve(partial),
            Err(ConfigError::Invalid(_))
        ));
        let all = Cli {
            cluster_tls_cert: some("c.pem"),
            cluster_tls_key: some("k.pem"),
            cluster_tls_ca: some("ca.pem"),
            ..Cli::default()
        };
        let cfg = Config::resolve(all).expect("all three");
        assert_eq!(
            cfg.cluster_tls,
            Some(("c.pem".into(), "k.pem".into(), "ca.pem".into()))
        );
    }
}
