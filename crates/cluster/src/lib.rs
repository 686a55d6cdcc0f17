//! Raft replication of fleetmq's durable state: openraft 0.9 adapters over `fleetmq-storage`,
//! and the group-commit proposer the broker uses ([`Durable`]).

pub mod durable;
pub mod error;
pub mod grpc;
pub mod log_adapter;
pub mod pb;
pub mod placement;
mod proposer;
pub mod rebalance;
pub mod shard;
pub mod sm_adapter;
pub mod type_config;

pub use durable::{Durable, DurableConfig, Progress};
pub use error::ClusterError;
pub use sm_adapter::{Applied, OBSERVE_DEVICE_DATA};
pub use type_config::{Batch, Raft, TypeConfig};
