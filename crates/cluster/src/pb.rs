//! Code generated from `proto/fleetmq/cluster/v1/*.proto` (tonic + prost).
#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("fleetmq.cluster.v1");
