//! Version-independent MQTT packets as the broker sees them. The decoder turns MQTT 3.1, 3.1.1
//! and 5.0 packets into these shapes so that session logic is written once.

use bytes::Bytes;

/// The protocol level a connection negotiated in its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProtocolVersion {
    /// MQTT 3.1 (`MQIsdp`, level 3).
    V31,
    /// MQTT 3.1.1 (level 4).
    V311,
    /// MQTT 5.0 (level 5).
    V5,
}

impl ProtocolVersion {
    /// The protocol level byte of CONNECT.
    pub fn level(self) -> u8 {
        match self {
            ProtocolVersion::V31 => 3,
            ProtocolVersion::V311 => 4,
            ProtocolVersion::V5 => 5,
        }
    }

    /// Whether MQTT 5 properties and reason codes are on the wire.
    pub fn is_v5(self) -> bool {
        self == ProtocolVersion::V5
    }

    /// Inverse of [`ProtocolVersion::level`].
    pub fn from_level(level: u8) -> Option<Self> {
        match level {
            3 => Some(ProtocolVersion::V31),
            4 => Some(ProtocolVersion::V311),
            5 => Some(ProtocolVersion::V5),
            _ => None,
        }
    }
}

/// MQTT 5 properties carried by PUBLISH (and by a will, minus alias and subscription ids).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishProps {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub topic_alias: Option<u16>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
    pub subscription_ids: Vec<u32>,
    pub content_type: Option<String>,
}

/// A will message from CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 Will Delay Interval in seconds (0 when absent).
    pub delay_secs: u32,
    pub props: PublishProps,
}

/// CONNECT, normalised across versions. `Debug` leaves the password out, so a log line can
/// never carry it.
#[derive(Clone, PartialEq, Eq)]
pub struct Connect {
    pub version: ProtocolVersion,
    pub client_id: String,
    /// Clean Session (3.1.1) / Clean Start (5.0).
    pub clean_start: bool,
    pub keep_alive: u16,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    pub will: Option<Will>,
    /// MQTT 5 Session Expiry Interval; 3.1.x sessions are mapped by the broker.
    pub session_expiry: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub maximum_packet_size: Option<u32>,
    pub topic_alias_maximum: Option<u16>,
    pub request_problem_info: Option<u8>,
    pub request_response_info: Option<u8>,
    pub user_properties: Vec<(String, String)>,
    pub authentication_method: Option<String>,
}

/// PUBLISH as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    /// May be empty in MQTT 5 when a topic alias stands for it.
    pub topic: String,
    pub pkid: u16,
    pub payload: Bytes,
    pub props: PublishProps,
}

/// One entry of SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeFilter {
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0 send retained on subscribe, 1 only for a new subscription, 2 never.
    pub retain_handling: u8,
}

/// SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub pkid: u16,
    pub filters: Vec<SubscribeFilter>,
    pub subscription_id: Option<u32>,
    pub user_properties: Vec<(String, String)>,
}

/// UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub pkid: u16,
    pub filters: Vec<String>,
}

/// DISCONNECT from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    /// MQTT 5 reason code; 0 for 3.1.x.
    pub reason: u8,
    /// MQTT 5 may change the session expiry on disconnect.
    pub session_expiry: Option<u32>,
}

/// Every packet a server can receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Connect(Box<Connect>),
    Publish(Publish),
    PubAck {
        pkid: u16,
        reason: u8,
    },
    PubRec {
        pkid: u16,
        reason: u8,
    },
    PubRel {
        pkid: u16,
    },
    PubComp {
        pkid: u16,
    },
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    PingReq,
    Disconnect(Disconnect),
    /// MQTT 5 AUTH: enhanced authentication is not offered, so this is a protocol error.
    Auth,
}

impl Incoming {
    /// Name for logs and the `type` label of packet metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Incoming::Connect(_) => "connect",
            Incoming::Publish(_) => "publish",
            Incoming::PubAck { .. } => "puback",
            Incoming::PubRec { .. } => "pubrec",
            Incoming::PubRel { .. } => "pubrel",
            Incoming::PubComp { .. } => "pubcomp",
            Incoming::Subscribe(_) => "subscribe",
            Incoming::Unsubscribe(_) => "unsubscribe",
            Incoming::PingReq => "pingreq",
            Incoming::Disconnect(_) => "disconnect",
            Incoming::Auth => "auth",
        }
    }
}

impl std::fmt::Debug for Connect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connect")
            .field("version", &self.version)
            .field("client_id", &self.client_id)
            .field("clean_start", &self.clean_start)
            .field("keep_alive", &self.keep_alive)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("will", &self.will)
            .field("session_expiry", &self.session_expiry)
            .finish_non_exhaustive()
    }
}
