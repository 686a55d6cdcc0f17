//! MQTT 3.1, 3.1.1 and 5.0 for fleetmq: framing and decoding of client packets over
//! `mqttbytes`, encoding of server packets, reason codes, topic validation and the topic trie.
//! Nothing in this crate does I/O, so all of it is tested with plain byte vectors.

pub mod decode;
pub mod encode;
pub mod error;
pub mod packet;
pub mod reason;
pub mod topic;
pub mod trie;

pub use decode::Decoder;
pub use error::DecodeError;
pub use packet::*;
