//! Decode errors, each mapped to the reason code the spec prescribes.

use crate::reason::v5;

/// Why a byte stream could not be turned into a packet. Every variant closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    PacketTooLarge { size: usize, max: usize },
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("unsupported protocol name or level {0}")]
    UnsupportedProtocol(u8),
    #[error("first packet was not CONNECT")]
    FirstPacketNotConnect,
}

impl DecodeError {
    /// The MQTT 5 reason code for the DISCONNECT (or CONNACK, before a session exists).
    pub fn reason_code(&self) -> u8 {
        match self {
            DecodeError::PacketTooLarge { .. } => v5::PACKET_TOO_LARGE,
            DecodeError::Malformed(_) => v5::MALFORMED_PACKET,
            DecodeError::Protocol(_) | DecodeError::FirstPacketNotConnect => v5::PROTOCOL_ERROR,
            DecodeError::UnsupportedProtocol(_) => v5::UNSUPPORTED_PROTOCOL_VERSION,
        }
    }

    /// Label for the `reason` of the protocol-error metric.
    pub fn label(&self) -> &'static str {
        match self {
            DecodeError::PacketTooLarge { .. } => "packet_too_large",
            DecodeError::Malformed(_) => "malformed",
            DecodeError::Protocol(_) => "protocol_error",
            DecodeError::UnsupportedProtocol(_) => "unsupported_protocol",
            DecodeError::FirstPacketNotConnect => "first_packet_not_connect",
        }
    }
}

/// Maps an `mqttbytes` error raised inside an already framed packet.
pub(crate) fn from_mqttbytes(e: mqttbytes::Error) -> DecodeError {
    use mqttbytes::Error as E;
    match e {
        E::PayloadSizeLimitExceeded(size) => DecodeError::PacketTooLarge { size, max: 0 },
        E::InvalidProtocol => DecodeError::UnsupportedProtocol(0),
        E::InvalidProtocolLevel(l) => DecodeError::UnsupportedProtocol(l),
        E::TopicNotUtf8 => DecodeError::Malformed("invalid UTF-8 string"),
        E::PacketIdZero => DecodeError::Malformed("packet identifier 0"),
        E::InvalidQoS(_) => DecodeError::Malformed("invalid QoS"),
        E::InvalidRetainForwardRule(_) => DecodeError::Malformed("invalid retain handling"),
        E::InvalidPropertyType(_) => DecodeError::Malformed("unknown property"),
        E::BoundaryCrossed(_) => DecodeError::Malformed("length crosses packet boundary"),
        E::MalformedRemainingLength => DecodeError::Malformed("remaining length"),
        E::IncorrectPacketFormat => DecodeError::Malformed("incorrect packet format"),
        E::SubscriptionIdZero => DecodeError::Protocol("subscription identifier 0"),
        E::InvalidReason(_) => DecodeError::Malformed("invalid reason code"),
        E::InsufficientBytes(_) => DecodeError::Malformed("packet shorter than its contents"),
        _ => DecodeError::Malformed("malformed packet"),
    }
}
