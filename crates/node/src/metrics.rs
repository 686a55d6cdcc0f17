//! Metric names and pre-registered handles. Handles are looked up once at startup so that the
//! per-message path increments an atomic instead of hashing a name and labels every time.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS: &str = "fleetmq_connections";
pub const CONNECTS: &str = "fleetmq_connects_total";
pub const PACKETS_IN: &str = "fleetmq_packets_received_total";
pub const PACKETS_OUT: &str = "fleetmq_packets_sent_total";
pub const MESSAGES_IN: &str = "fleetmq_messages_received_total";
pub const MESSAGES_OUT: &str = "fleetmq_messages_sent_total";
pub const BYTES_IN: &str = "fleetmq_bytes_received_total";
pub const BYTES_OUT: &str = "fleetmq_bytes_sent_total";
pub const DROPPED: &str = "fleetmq_messages_dropped_total";
pub const SESSIONS: &str = "fleetmq_sessions";
pub const SUBSCRIPTIONS: &str = "fleetmq_subscriptions";
pub const RETAINED: &str = "fleetmq_retained_messages";
pub const DELIVER_LATENCY: &str = "fleetmq_publish_to_deliver_seconds";
pub const PROTOCOL_ERRORS: &str = "fleetmq_protocol_errors_total";
pub const DISCONNECTS: &str = "fleetmq_disconnects_total";
pub const RUNTIME_TASKS: &str = "fleetmq_runtime_tasks";

/// Installs the Prometheus recorder for this process. Returns `None` if one is installed
/// already (several nodes inside one test process share the first one).
pub fn install() -> Option<PrometheusHandle> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                0.25, 1.0, 5.0,
            ],
        )
        .ok()?
        .set_buckets_for_metric(
            Matcher::Full("fleetmq_raft_batch_size".into()),
            &[
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
            ],
        )
        .ok()?;
    let handle = builder.install_recorder().ok()?;
    describe();
    Some(handle)
}

fn describe() {
    describe_gauge!(CONNECTIONS, "Open MQTT connections");
    describe_counter!(CONNECTS, "CONNECT attempts by result");
    describe_counter!(PACKETS_IN, "MQTT packets received by type");
    describe_counter!(PACKETS_OUT, "MQTT packets sent by type");
    describe_counter!(MESSAGES_IN, "PUBLISH messages received by QoS");
    describe_counter!(MESSAGES_OUT, "PUBLISH messages sent by QoS");
    describe_counter!(BYTES_IN, "Bytes read from clients");
    describe_counter!(BYTES_OUT, "Bytes written to clients");
    describe_counter!(DROPPED, "Messages dropped by reason");
    describe_counter!(AUTH_FAILURES, "Failed logins by reason and transport");
    describe_counter!(ACL_DENIED, "PUBLISH/SUBSCRIBE refused by the topic ACL");
    describe_counter!(
        QUOTA_EXCEEDED,
        "Per-tenant quota reactions by tenant and quota"
    );
    describe_counter!(DEVICE_API, "Device-interface messages by kind");
    describe_gauge!(TENANT_CONNECTIONS, "Connections per tenant on this node");
    describe_gauge!(
        TENANT_SESSIONS,
        "Persistent sessions per tenant on this node"
    );
    describe_gauge!(
        TENANT_SUBSCRIPTIONS,
        "Free-form subscriptions per tenant on this node"
    );
    describe_gauge!(
        SESSIONS,
        "Sessions held by this node (connected and persistent offline)"
    );
    describe_gauge!(SUBSCRIPTIONS, "Subscriptions held by this node");
    describe_gauge!(RETAINED, "Retained messages");
    describe_histogram!(
        DELIVER_LATENCY,
        "Time from PUBLISH received to PUBLISH written to a subscriber (sampled)"
    );
    describe_counter!(
        PROTOCOL_ERRORS,
        "Connections closed for bad input, by reason"
    );
    describe_counter!(DISCONNECTS, "Connections ended, by reason");
    describe_gauge!(
        RUNTIME_TASKS,
        "Live tokio tasks (connections, timers, internals), sampled at scrape"
    );
}

/// Names of packet types 4..=7, the acknowledgements of QoS 1/2 flows.
pub const ACK_TYPES: [&str; 4] = ["puback", "pubrec", "pubrel", "pubcomp"];

/// Hot-path handles, created once.
pub struct Handles {
    pub connections: Gauge,
    pub sessions: Gauge,
    pub subscriptions: Gauge,
    pub retained: Gauge,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub messages_in: [Counter; 3],
    pub messages_out: [Counter; 3],
    pub publish_in: Counter,
    pub publish_out: Counter,
    /// PUBACK, PUBREC, PUBREL, PUBCOMP (index = packet type − 4), one per QoS 1/2 message.
    pub acks_in: [Counter; 4],
    pub acks_out: [Counter; 4],
    pub deliver_latency: Histogram,
}

impl Handles {
    /// Registers the handles with the installed recorder.
    pub fn new() -> Self {
        Handles {
            connections: gauge!(CONNECTIONS),
            sessions: gauge!(SESSIONS),
            subscriptions: gauge!(SUBSCRIPTIONS),
            retained: gauge!(RETAINED),
            bytes_in: counter!(BYTES_IN),
            bytes_out: counter!(BYTES_OUT),
            messages_in: [
                counter!(MESSAGES_IN, "qos" => "0"),
                counter!(MESSAGES_IN, "qos" => "1"),
                counter!(MESSAGES_IN, "qos" => "2"),
            ],
            messages_out: [
                counter!(MESSAGES_OUT, "qos" => "0"),
                counter!(MESSAGES_OUT, "qos" => "1"),
                counter!(MESSAGES_OUT, "qos" => "2"),
            ],
            publish_in: counter!(PACKETS_IN, "type" => "publish"),
            publish_out: counter!(PACKETS_OUT, "type" => "publish"),
            acks_in: ACK_TYPES.map(|t| counter!(PACKETS_IN, "type" => t)),
            acks_out: ACK_TYPES.map(|t| counter!(PACKETS_OUT, "type" => t)),
            deliver_latency: histogram!(DELIVER_LATENCY),
        }
    }
}

impl Default for Handles {
    fn default() -> Self {
        Self::new()
    }
}

/// Counts a packet other than PUBLISH received (rare enough for a lookup).
pub fn packet_in(kind: &'static str) {
    counter!(PACKETS_IN, "type" => kind).increment(1);
}

/// Counts a packet other than PUBLISH sent.
pub fn packet_out(kind: &'static str) {
    counter!(PACKETS_OUT, "type" => kind).increment(1);
}

/// Counts a dropped message.
pub fn dropped(reason: &'static str, n: u64) {
    counter!(DROPPED, "reason" => reason).increment(n);
}

/// Counts a connection closed for bad input.
pub fn counter_protocol_error(reason: &'static str) {
    counter!(PROTOCOL_ERRORS, "reason" => reason).increment(1);
}

/// Counts a CONNECT by result.
pub fn connect_result(result: &'static str) {
    counter!(CONNECTS, "result" => result).increment(1);
}

/// Counts an ended connection by reason.
pub fn disconnect(reason: &'static str) {
    counter!(DISCONNECTS, "reason" => reason).increment(1);
}

/// Failed logins by reason (`bad_credentials`, `not_authorized`, `throttled`, `unavailable`)
/// and transport.
pub const AUTH_FAILURES: &str = "fleetmq_auth_failures_total";
/// PUBLISH or SUBSCRIBE refused by the topic ACL.
pub const ACL_DENIED: &str = "fleetmq_acl_denied_total";
/// Per-tenant quota reactions (label `quota`: connections, sessions, subscriptions, rate,
/// packet_size). Labelled by tenant id: one series per tenant and quota, bounded by the
/// number of tenants.
pub const QUOTA_EXCEEDED: &str = "fleetmq_tenant_quota_exceeded_total";
/// Device-interface messages received, by kind (static, json, credentials, ...).
pub const DEVICE_API: &str = "fleetmq_device_api_messages_total";

/// Counts a failed login.
pub fn auth_failure(reason: &'static str, transport: &'static str) {
    counter!(AUTH_FAILURES, "reason" => reason, "transport" => transport).increment(1);
}

/// Counts an ACL refusal (`publish` or `subscribe`).
pub fn acl_denied(action: &'static str) {
    counter!(ACL_DENIED, "action" => action).increment(1);
}

/// Counts a quota reaction for a tenant.
pub fn quota_exceeded(tenant: &str, quota: &'static str) {
    counter!(QUOTA_EXCEEDED, "tenant" => tenant.to_string(), "quota" => quota).increment(1);
}

/// Counts a device-interface message.
pub fn device_api(kind: &'static str) {
    counter!(DEVICE_API, "kind" => kind).increment(1);
}

/// Per-tenant usage on this node, labelled by tenant id (bounded by the number of tenants).
pub const TENANT_CONNECTIONS: &str = "fleetmq_tenant_connections";
pub const TENANT_SESSIONS: &str = "fleetmq_tenant_persistent_sessions";
pub const TENANT_SUBSCRIPTIONS: &str = "fleetmq_tenant_subscriptions";

/// Sets a tenant's usage gauges.
pub fn tenant_usage(tenant: &str, connections: usize, sessions: usize, subscriptions: usize) {
    gauge!(TENANT_CONNECTIONS, "tenant" => tenant.to_string()).set(connections as f64);
    gauge!(TENANT_SESSIONS, "tenant" => tenant.to_string()).set(sessions as f64);
    gauge!(TENANT_SUBSCRIPTIONS, "tenant" => tenant.to_string()).set(subscriptions as f64);
}

/// A persistent session loaded here from durable state because it moved from another node.
pub fn counter_session_moved() {
    counter!("fleetmq_cluster_sessions_moved_total").increment(1);
}

/// Counts deliveries queued through Raft for sessions no live node held.
pub fn orphan_deliveries(n: usize) {
    counter!("fleetmq_cluster_orphan_deliveries_total").increment(n as u64);
}
