//! Raft over gRPC: the client side (`client.rs`, openraft's network for one group), the server
//! side (`server.rs`, one tonic service for every group of a node) and the encoding of
//! openraft's messages inside the protobuf envelopes (`convert.rs`).

pub mod auth;
pub mod client;
pub mod convert;
pub mod server;
pub mod tls;

pub use auth::{AddSecret, CheckSecret};
pub use client::{Channels, GrpcNetwork, PeerChannel};
pub use server::RaftServer;
pub use tls::ClusterTls;

/// Largest gRPC message accepted or sent between nodes. tonic's default (4 MiB) is far below
/// what a Raft append of big group-committed entries, a snapshot chunk or a forwarded batch
/// of large payloads can reach; a message over the limit would fail forever and wedge
/// replication to that peer.
pub const MAX_MESSAGE_BYTES: usize = 512 * 1024 * 1024;
