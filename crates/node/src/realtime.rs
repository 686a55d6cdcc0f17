//! Real-time notifications (the consumer that gives the processing modes their meaning):
//! every node applies every device-data command of every shard, turns what changed into
//! notifications on Cumulocity's channels (`/measurements/<source>`, `/events/<source>`,
//! `/alarms/<source>`, `/operations/<agent>`, `/managedobjects/<id>`) and hands them to the
//! applications subscribed on that node's WebSocket endpoint (`rest::realtime`).
//!
//! Quiescent batches (`q/`) are applied but not notified; transient ones (`t/`) are notified
//! but never stored; CEP ones (`c/`) are neither.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use fleetmq_storage::domain::{DeviceBatch, DeviceOp, Doc, Outcome, RecordKind};
use serde_json::Value;
use tokio::sync::broadcast;

/// One notification.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    pub tenant: String,
    /// The concrete channel, e.g. `/measurements/259`.
    pub channel: String,
    /// `CREATE`, `UPDATE` or `DELETE`.
    pub action: &'static str,
    pub data: Value,
}

/// Open notification clients per node at most.
pub const MAX_CLIENTS: usize = 1000;

/// The node's notification fan-out.
pub struct Hub {
    tx: broadcast::Sender<Arc<Note>>,
    clients: std::sync::atomic::AtomicUsize,
}

/// One client's place in the hub; leaving it (drop) lets the Raft observers stop passing
/// device data once nobody listens.
pub struct Subscription<'a> {
    hub: &'a Hub,
    pub rx: broadcast::Receiver<Arc<Note>>,
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        if self.hub.clients.fetch_sub(1, Ordering::AcqRel) == 1 {
            fleetmq_cluster::OBSERVE_DEVICE_DATA.store(false, Ordering::Relaxed);
        }
    }
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

impl Hub {
    /// A hub whose slow subscribers lose the oldest of more than 4096 waiting notifications
    /// (and are told how many), instead of growing memory.
    pub fn new() -> Hub {
        Hub {
            tx: broadcast::channel(4096).0,
            clients: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// A new subscriber (`None` when `MAX_CLIENTS` are open). While there is one, the Raft
    /// observers pass device data here.
    pub fn subscribe(&self) -> Option<Subscription<'_>> {
        if self.clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            self.clients.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        fleetmq_cluster::OBSERVE_DEVICE_DATA.store(true, Ordering::Relaxed);
        Some(Subscription {
            hub: self,
            rx: self.tx.subscribe(),
        })
    }

    /// An applied device batch with its outcomes.
    pub fn observe(&self, batch: &DeviceBatch, outcomes: &[Outcome]) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        for n in notes(batch, outcomes) {
            metrics::counter!("fleetmq_realtime_notifications_total").increment(1);
            let _ = self.tx.send(Arc::new(n));
        }
    }
}

fn docs(o: &Outcome) -> Vec<Doc> {
    match o {
        Outcome::Done(j) => Doc::from_json(j).into_iter().collect(),
        Outcome::Many(v) => v.iter().filter_map(|j| Doc::from_json(j)).collect(),
        _ => Vec::new(),
    }
}

fn kind_channel(k: RecordKind) -> &'static str {
    match k {
        RecordKind::Measurement => "measurements",
        RecordKind::Event => "events",
        RecordKind::Alarm => "alarms",
        RecordKind::Operation => "operations",
    }
}

/// What a batch's outcomes notify (pure).
pub fn notes(batch: &DeviceBatch, outcomes: &[Outcome]) -> Vec<Note> {
    if batch.quiet {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut push = |channel: String, action: &'static str, d: &Doc| {
        let mut data = d.body.clone();
        data.insert("id".into(), Value::from(d.id.to_string()));
        if d.id == 0 {
            data.remove("id"); // transient data has no id
        }
        out.push(Note {
            tenant: batch.tenant.clone(),
            channel,
            action,
            data: Value::Object(data),
        });
    };
    let src = |d: &Doc| d.parent.unwrap_or_default();
    for (op, o) in batch.ops.iter().zip(outcomes) {
        for d in docs(o) {
            match op {
                DeviceOp::Measurement { .. } => {
                    push(format!("/measurements/{}", src(&d)), "CREATE", &d)
                }
                DeviceOp::Event { .. } => push(format!("/events/{}", src(&d)), "CREATE", &d),
                DeviceOp::Alarm { .. } => {
                    let counted = d.body.get("count").and_then(Value::as_u64).unwrap_or(1) > 1;
                    let action = if counted { "UPDATE" } else { "CREATE" };
                    push(format!("/alarms/{}", src(&d)), action, &d)
                }
                DeviceOp::Transient { kind, .. } => push(
                    format!("/{}/{}", kind_channel(*kind), src(&d)),
                    "CREATE",
                    &d,
                ),
                DeviceOp::AlarmChange { .. } => push(format!("/alarms/{}", src(&d)), "UPDATE", &d),
                DeviceOp::EventClear { .. } => push(format!("/events/{}", src(&d)), "UPDATE", &d),
                DeviceOp::RecordUpdate { kind, .. } => push(
                    format!("/{}/{}", kind_channel(*kind), src(&d)),
                    "UPDATE",
                    &d,
                ),
                DeviceOp::RecordDelete { kind, .. } => push(
                    format!("/{}/{}", kind_channel(*kind), src(&d)),
                    "DELETE",
                    &d,
                ),
                DeviceOp::Operation { .. } | DeviceOp::OperationStatus { .. } => {
                    let action = if matches!(op, DeviceOp::Operation { .. }) {
                        "CREATE"
                    } else {
                        "UPDATE"
                    };
                    let agent = d.agent.as_ref().map(|a| a.0).unwrap_or(src(&d));
                    push(format!("/operations/{agent}"), action, &d)
                }
                DeviceOp::CreateDevice { .. }
                | DeviceOp::CreateChild { .. }
                | DeviceOp::CreateService { .. }
                | DeviceOp::CreateObject { .. } => {
                    push(format!("/managedobjects/{}", d.id), "CREATE", &d)
                }
                DeviceOp::Update { .. }
                | DeviceOp::ListEdit { .. }
                | DeviceOp::AddChild { .. }
                | DeviceOp::Connection { .. } => {
                    push(format!("/managedobjects/{}", d.id), "UPDATE", &d)
                }
                DeviceOp::DeleteObject { .. } => {
                    push(format!("/managedobjects/{}", d.id), "DELETE", &d)
                }
                DeviceOp::AddExternalId { .. }
                | DeviceOp::DeleteExternalId { .. }
                | DeviceOp::Describe { .. }
                | DeviceOp::Pending { .. }
                | DeviceOp::Prune { .. } => {}
            }
        }
    }
    out
}

/// Whether a subscription (`/measurements/*`, `/alarms/259`, `/*`) covers a channel.
pub fn covers(subscription: &str, channel: &str) -> bool {
    if subscription == "/*" || subscription == "/**" {
        return true;
    }
    match subscription.strip_suffix("/*") {
        Some(prefix) => channel
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/') && !rest[1..].contains('/')),
        None => subscription == channel,
    }
}

/// Whether a subscription names a channel fleetmq notifies on.
pub fn valid_subscription(s: &str) -> bool {
    let mut parts = s.split('/');
    let (Some(""), Some(kind), Some(id), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return s == "/*";
    };
    [
        "measurements",
        "events",
        "alarms",
        "operations",
        "managedobjects",
    ]
    .contains(&kind)
        && (id == "*" || (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetmq_storage::domain::Source;

    fn batch(quiet: bool, ops: Vec<DeviceOp>) -> DeviceBatch {
        DeviceBatch {
            tenant: "t1".into(),
            group: 1,
            now: "now".into(),
            now_ms: 0,
            owner: "o".into(),
            quiet,
            device: None,
            ops,
        }
    }

    fn done(id: u64, parent: u64, body: Value) -> Outcome {
        let d = Doc {
            id,
            parent: Some(parent),
            body: body.as_object().cloned().unwrap_or_default(),
            ..Doc::default()
        };
        Outcome::Done(serde_json::to_string(&d).unwrap())
    }

    #[test]
    fn measurements_go_to_their_source_channel_and_quiet_batches_to_none() {
        let op = DeviceOp::Measurement {
            source: Source::Id(3),
            doc: "{}".into(),
        };
        let o = [done(259, 3, serde_json::json!({"type": "m"}))];
        let n = notes(&batch(false, vec![op.clone()]), &o);
        assert_eq!(n.len(), 1);
        assert_eq!(
            (n[0].channel.as_str(), n[0].action),
            ("/measurements/3", "CREATE")
        );
        assert_eq!(n[0].data["id"], "259");
        assert!(notes(&batch(true, vec![op]), &o).is_empty());
    }

    #[test]
    fn subscriptions() {
        assert!(covers("/measurements/*", "/measurements/3"));
        assert!(!covers("/measurements/*", "/events/3"));
        assert!(covers("/alarms/3", "/alarms/3"));
        assert!(!covers("/alarms/3", "/alarms/33"));
        assert!(covers("/*", "/operations/9"));
        assert!(valid_subscription("/operations/12") && valid_subscription("/events/*"));
        assert!(!valid_subscription("/nope/*") && !valid_subscription("/events/x"));
    }
}
