//! Raft over gRPC: the client side (`client.rs`, openraft's network for one group), the server
//! side (`server.rs`, one tonic service for every group of a node) and the encoding of
//! openraft's messages inside the protobuf envelopes (`convert.rs`).

pub mod client;
pub mod convert;
pub mod server;

pub use client::{Channels, GrpcNetwork};
pub use server::RaftServer;
