//! The device API pipeline: SmartREST static templates on `<mode>/us[/<child>]` become one
//! `Command::Device` batch in the device's shard, committed before the PUBLISH is
//! acknowledged; the outcomes are answered on `s/e` and `s/ds` (c8y-mqtt.md §4, §5).
//!
//! The batch is proposed while the connection reads the PUBLISH (`Durable::propose_sent`),
//! so a device's messages are applied in the order it sent them.

pub mod deliver;
pub mod plan;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use fleetmq_cluster::ClusterError;
use fleetmq_smartrest::{encode_line, parse_records, Mode, SmartTopic};
use fleetmq_storage::domain::{DeviceBatch, Doc, Outcome, Source};
use fleetmq_storage::{Command, Response, SessionKey};

use crate::broker::Broker;
use crate::session::Session;
use plan::{Step, Then};

/// The answer to one committed PUBLISH of the device API.
pub type Work = Pin<Box<dyn Future<Output = Result<Response, ClusterError>> + Send>>;

/// Server time: ISO 8601 (UTC, milliseconds) and ms since the epoch.
pub fn now() -> (String, u64) {
    let t = chrono::Utc::now();
    (
        t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        u64::try_from(t.timestamp_millis()).unwrap_or_default(),
    )
}

/// Counts device-API outcomes by kind (`fleetmq_device_api_errors_total{code}`).
fn error_metric(code: &'static str) {
    metrics::counter!("fleetmq_device_api_errors_total", "code" => code).increment(1);
}

/// The mode's label for metrics.
fn mode_label(m: Mode) -> &'static str {
    match m {
        Mode::Persistent => "persistent",
        Mode::Transient => "transient",
        Mode::Quiescent => "quiescent",
        Mode::Cep => "cep",
    }
}

/// Starts the work of a static-template PUBLISH: answers what needs no data at once and
/// proposes the rest as one batch. `None`: nothing to commit (the PUBLISH can be acknowledged
/// now).
pub fn static_publish(
    broker: &Arc<Broker>,
    session: &Arc<Session>,
    owner: &str,
    topic: &str,
    payload: &[u8],
) -> Option<Work> {
    let st = SmartTopic::parse(topic)?;
    let key = &session.key;
    let serial = key.client_id.clone();
    let source = match &st.child {
        Some(c) => Source::Child {
            serial: serial.clone(),
            child: c.clone(),
        },
        None => Source::Device {
            serial: serial.clone(),
        },
    };
    let text = match std::str::from_utf8(payload) {
        Ok(t) => t,
        Err(_) => {
            error_metric("42");
            broker.send_downstream(session, "s/e", "42,,Malformed Request: not UTF-8".into());
            return None;
        }
    };
    let records = match parse_records(text) {
        Ok(r) => r,
        Err(e) => {
            error_metric("42");
            tracing::info!(client = %serial, error = %e, "malformed SmartREST payload");
            broker.send_downstream(
                session,
                "s/e",
                encode_line(&["42", "", &format!("Malformed Request: {e}")]).into(),
            );
            return None;
        }
    };
    let steps = plan::steps(&records, &source, &serial, st.mode);
    let mut ops = Vec::new();
    for s in &steps {
        if let Step::Op { op, .. } = s {
            ops.push(op.clone());
        }
    }
    metrics::counter!("fleetmq_device_api_lines_total", "mode" => mode_label(st.mode))
        .increment(records.len() as u64);
    if ops.is_empty() {
        answer_now(broker, session, &steps);
        return None;
    }
    let (now, now_ms) = now();
    let group = broker
        .durable
        .group_of(&SessionKey::new(key.tenant.clone(), serial));
    let cmd = Command::Device(DeviceBatch {
        tenant: key.tenant.to_string(),
        group,
        now,
        now_ms,
        owner: owner.to_string(),
        ops,
    });
    let sent = broker.durable.propose_sent(cmd);
    let broker = broker.clone();
    let session = session.clone();
    Some(Box::pin(async move {
        let result = match sent {
            Ok(f) => f.await,
            Err(e) => Err(e),
        };
        let outcomes = match &result {
            Ok(Response::Device(o)) => o.clone(),
            Ok(_) => Vec::new(),
            Err(e) => {
                tracing::warn!(error = %e, client = %session.key.client_id, "device data not committed");
                for s in &steps {
                    if let Step::Op { template, .. } = s {
                        error_metric("50");
                        broker.send_downstream(
                            &session,
                            "s/e",
                            encode_line(&["50", template, &format!("Server error: {e}")]).into(),
                        );
                    }
                }
                return result;
            }
        };
        let mut outcomes = outcomes.into_iter();
        for s in &steps {
            match s {
                Step::Op { then, template, .. } => {
                    let Some(o) = outcomes.next() else { break };
                    answer(&broker, &session, *then, template, o);
                }
                other => answer_now(&broker, &session, std::slice::from_ref(other)),
            }
        }
        result
    }))
}

/// Sends the answers that need no committed data (replies, errors), counting unstored data.
fn answer_now(broker: &Arc<Broker>, session: &Arc<Session>, steps: &[Step]) {
    for s in steps {
        match s {
            Step::Reply { topic, payload } => {
                broker.send_downstream(session, topic, payload.clone().into());
            }
            Step::Error(line) => {
                error_metric("40-45");
                broker.send_downstream(session, "s/e", line.clone().into());
            }
            Step::Unstored { kind } => {
                metrics::counter!("fleetmq_device_api_unstored_total", "kind" => *kind)
                    .increment(1);
            }
            Step::Op { .. } => {}
        }
    }
}

fn docs(v: &[String]) -> Vec<Doc> {
    v.iter().filter_map(|s| Doc::from_json(s)).collect()
}

/// Answers one op's outcome to the device.
fn answer(broker: &Arc<Broker>, session: &Arc<Session>, then: Then, template: &str, o: Outcome) {
    let send = |topic: &str, line: String| {
        broker.send_downstream(session, topic, line.into());
    };
    match (then, o) {
        (Then::Created, Outcome::Exists) => {
            error_metric("41");
            send(
                "s/e",
                encode_line(&["41", template, "Device already existing"]),
            );
        }
        (_, Outcome::NotFound(text)) => {
            error_metric("50");
            send("s/e", encode_line(&["50", template, &text]));
        }
        (_, Outcome::Invalid(text)) => {
            error_metric("45");
            send("s/e", encode_line(&["45", template, &text]));
        }
        (Then::MoId, Outcome::Many(v)) => {
            if let Some(d) = docs(&v).first() {
                send("s/ds", encode_line(&["124", &d.id.to_string()]));
            }
        }
        (Then::Children, Outcome::Many(v)) => {
            let mut f = vec!["106".to_string()];
            for c in docs(&v).iter().skip(1) {
                if let Some((_, x)) = c.external.iter().find(|(t, _)| t == "c8y_Serial") {
                    f.push(x.clone());
                }
            }
            send("s/ds", encode_line(&f));
        }
        (Then::Deliver, Outcome::Many(v)) => {
            for op in docs(&v) {
                for (topic, payload) in deliver::operation_messages(&op) {
                    send(topic, payload);
                }
            }
        }
        _ => {}
    }
}

/// After a downstream subscription (`s/ds`, `devicecontrol/notifications`): the device's
/// PENDING operations again (§2.4: "all operations not yet forwarded are published upon
/// subscription").
pub async fn resend_pending(broker: Arc<Broker>, session: Arc<Session>, owner: String) {
    let key = session.key.clone();
    let (now, now_ms) = now();
    let group = broker.durable.group_of(&key);
    let cmd = Command::Device(DeviceBatch {
        tenant: key.tenant.to_string(),
        group,
        now,
        now_ms,
        owner,
        ops: vec![fleetmq_storage::domain::DeviceOp::Pending {
            source: Source::Device {
                serial: key.client_id.to_string(),
            },
        }],
    });
    match broker.durable.propose(cmd).await {
        Ok(Response::Device(mut o)) => {
            if let Some(o) = o.pop() {
                answer(&broker, &session, Then::Deliver, "500", o);
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, client = %key.client_id, "pending operations not read")
        }
    }
}
