//! Durable state of a fleetmq node in one sled database: Raft logs and hard state, deterministic
//! state machines, and the key encodings they share. No openraft and no MQTT in here.

pub mod db;
pub mod domain;
pub mod error;
pub mod keys;
pub mod log_store;
mod overlay;
pub mod records;
mod sm_read;
pub mod state_machine;

pub use db::Storage;
pub use error::{Result, StorageError};
pub use log_store::LogStore;
pub use records::*;
pub use sm_read::OutboxEntry;
pub use state_machine::{validate, StateMachineStore, MAX_COMMANDS_PER_ENTRY, NO_SESSION_SEQ};

#[cfg(test)]
mod sim_tests;
#[cfg(test)]
mod tests;
