//! The device API pipeline: SmartREST static templates on `<mode>/us[/<child>]` become one
//! `Command::Device` batch in the device's shard, committed before the PUBLISH is
//! acknowledged; the outcomes are answered on `s/e` and `s/ds` (c8y-mqtt.md §4, §5).
//!
//! The batch is proposed while the connection reads the PUBLISH (`Durable::propose_sent`),
//! so a device's messages are applied in the order it sent them.

pub mod custom;
pub mod deliver;
pub mod json;
pub mod plan;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use fleetmq_cluster::ClusterError;
use fleetmq_smartrest::{encode_line, parse_records, Kind, Mode, SmartTopic};
use fleetmq_storage::domain::{group_of_id, DeviceBatch, DeviceOp, Doc, Outcome, Source, SERIAL};
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

/// Starts the work of a device-API PUBLISH (static templates on `<mode>/us[/<child>]`, JSON
/// via MQTT): answers what needs no data at once and proposes the rest. `None`: nothing to
/// commit (the PUBLISH can be acknowledged now).
pub fn publish(
    broker: &Arc<Broker>,
    session: &Arc<Session>,
    owner: &str,
    topic: &str,
    payload: &[u8],
    pkid: u16,
) -> Option<Work> {
    let serial = session.key.client_id.to_string();
    let quiet;
    let steps = if let Some(st) = SmartTopic::parse(topic) {
        quiet = st.mode == Mode::Quiescent;
        match &st.kind {
            Kind::Static => static_steps(broker, session, &st, &serial, payload)?,
            Kind::Custom(xid) => {
                let topic = format!("s/dc/{xid}");
                if custom::load(broker, &session.key.tenant, xid).is_none() {
                    return Some(deferred_custom(
                        broker,
                        session,
                        owner,
                        st.clone(),
                        xid,
                        payload,
                        topic,
                    ));
                }
                custom_steps(broker, session, &st, xid, payload, &topic)?
            }
            Kind::Default => {
                let xid = session.state.lock().default_xid.clone();
                let Some(xid) = xid else {
                    error_metric("41");
                    broker.send_downstream(
                        session,
                        "s/e",
                        "41,,No default template collection in the ClientId (d:<id>:<X-ID>)".into(),
                    );
                    return None;
                };
                if custom::load(broker, &session.key.tenant, &xid).is_none() {
                    return Some(deferred_custom(
                        broker,
                        session,
                        owner,
                        st.clone(),
                        &xid,
                        payload,
                        "s/dd".into(),
                    ));
                }
                custom_steps(broker, session, &st, &xid, payload, "s/dd")?
            }
            Kind::Templates(Some(xid)) => template_steps(broker, session, xid, payload)?,
            _ => return None,
        }
    } else {
        let jt = json::JsonTopic::parse(topic)?;
        quiet = jt.mode == Mode::Quiescent;
        metrics::counter!("fleetmq_device_api_lines_total", "mode" => mode_label(jt.mode))
            .increment(1);
        json::steps(&jt, payload, &serial, pkid)
    };
    run(broker, session, owner, steps, quiet)
}

/// A static-template message as steps (`None` when it cannot be read at all: answered).
fn static_steps(
    broker: &Arc<Broker>,
    session: &Arc<Session>,
    st: &SmartTopic,
    serial: &str,
    payload: &[u8],
) -> Option<Vec<Step>> {
    let source = match &st.child {
        Some(c) => Source::Child {
            serial: serial.to_string(),
            child: c.clone(),
        },
        None => Source::Device {
            serial: serial.to_string(),
        },
    };
    let records = records(broker, session, payload)?;
    metrics::counter!("fleetmq_device_api_lines_total", "mode" => mode_label(st.mode))
        .increment(records.len() as u64);
    Some(plan::steps(&records, &source, serial, st.mode))
}

/// Parses a payload as SmartREST records, answering `42` on `s/e` when it cannot be read.
fn records(
    broker: &Arc<Broker>,
    session: &Arc<Session>,
    payload: &[u8],
) -> Option<Vec<fleetmq_smartrest::Record>> {
    let text = match std::str::from_utf8(payload) {
        Ok(t) => t,
        Err(_) => {
            error_metric("42");
            broker.send_downstream(session, "s/e", "42,,Malformed Request: not UTF-8".into());
            return None;
        }
    };
    match parse_records(text) {
        Ok(r) => Some(r),
        Err(e) => {
            error_metric("42");
            tracing::info!(client = %session.key.client_id, error = %e, "malformed SmartREST payload");
            broker.send_downstream(
                session,
                "s/e",
                encode_line(&["42", "", &format!("Malformed Request: {e}")]).into(),
            );
            None
        }
    }
}

/// Usage lines of a collection this node has not applied (yet): it may have been created an
/// instant ago through another node. Wait until this node has applied what the collection's
/// group had committed, then look again. (Proposed after that wait, so a later message of the
/// same device can commit before this one; only on this path.)
fn deferred_custom(
    broker: &Arc<Broker>,
    session: &Arc<Session>,
    owner: &str,
    st: SmartTopic,
    xid: &str,
    payload: &[u8],
    answer_topic: String,
) -> Work {
    let (broker, session) = (broker.clone(), session.clone());
    let (owner, xid, payload) = (owner.to_string(), xid.to_string(), payload.to_vec());
    Box::pin(async move {
        // Every group: a collection created over REST lives in the group of its name.
        if let Err(e) = broker.durable.read_barrier().await {
            tracing::warn!(error = %e, "read barrier for a template collection failed");
        }
        let quiet = st.mode == Mode::Quiescent;
        let Some(steps) = custom_steps(&broker, &session, &st, &xid, &payload, &answer_topic)
        else {
            return Ok(Response::Ok);
        };
        match run(&broker, &session, &owner, steps, quiet) {
            Some(w) => w.await,
            None => Ok(Response::Ok),
        }
    })
}

/// Usage lines of a custom collection (`s/uc/<X-ID>`, `s/ud`).
fn custom_steps(
    broker: &Arc<Broker>,
    session: &Arc<Session>,
    st: &SmartTopic,
    xid: &str,
    payload: &[u8],
    answer_topic: &str,
) -> Option<Vec<Step>> {
    let Some((_, c)) = custom::load(broker, &session.key.tenant, xid) else {
        error_metric("41");
        broker.send_downstream(
            session,
            "s/e",
            encode_line(&["41", xid, "Template collection not found"]).into(),
        );
        return None;
    };
    let records = records(broker, session, payload)?;
    metrics::counter!("fleetmq_device_api_lines_total", "mode" => mode_label(st.mode))
        .increment(records.len() as u64);
    let serial = session.key.client_id.to_string();
    let source = match &st.child {
        Some(ch) => Source::Child {
            serial,
            child: ch.clone(),
        },
        None => Source::Device { serial },
    };
    Some(custom::steps(
        &c,
        &records,
        &source,
        st.mode,
        &now().0,
        answer_topic,
    ))
}

/// `s/ut/<X-ID>`: an empty payload asks whether the collection exists (`20`/`41` on
/// `s/dt`); template lines create it, once.
fn template_steps(
    broker: &Arc<Broker>,
    session: &Arc<Session>,
    xid: &str,
    payload: &[u8],
) -> Option<Vec<Step>> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        let line = match custom::load(broker, &session.key.tenant, xid) {
            Some((id, _)) => encode_line(&["20", xid, &id.to_string()]),
            None => encode_line(&["41", xid]),
        };
        return Some(vec![Step::Reply {
            topic: "s/dt",
            payload: line,
        }]);
    }
    let records = records(broker, session, payload)?;
    match fleetmq_smartrest::custom::Collection::from_lines(&records) {
        Ok(c) => Some(vec![Step::Op {
            op: custom::create_op(xid, &c),
            then: Then::TemplatesCreated {
                xid: xid.to_string(),
            },
            template: xid.to_string(),
        }]),
        Err(e) => Some(vec![Step::Error(e.line())]),
    }
}

/// The group holding the device's data: its shard, unless its identity was bound over REST
/// to an object in another group (then that group, so the device is not created twice).
fn device_group(broker: &Broker, key: &SessionKey) -> u64 {
    let d = &broker.durable;
    let home = d.group_of(key);
    let found = |g: u64| {
        d.device_store(g).is_some_and(|st| {
            st.device_external(&key.tenant, SERIAL, &key.client_id)
                .ok()
                .flatten()
                .is_some()
        })
    };
    if found(home) {
        return home;
    }
    d.device_groups()
        .into_iter()
        .find(|g| *g != home && found(*g))
        .unwrap_or(home)
}

/// The group an op must run in: by-id ops in the id's group, new collections in their
/// X-ID's, the rest in the device's.
fn op_group(broker: &Broker, tenant: &str, op: &DeviceOp, device: u64) -> u64 {
    match op {
        DeviceOp::RecordUpdate { id, .. }
        | DeviceOp::RecordDelete { id, .. }
        | DeviceOp::Describe {
            source: Source::Id(id),
        }
        | DeviceOp::Update {
            source: Source::Id(id),
            ..
        } => group_of_id(*id),
        DeviceOp::CreateObject {
            external: Some((kind, xid)),
            ..
        } if kind == fleetmq_smartrest::custom::XID_TYPE => {
            custom::group_of_xid(broker, tenant, xid)
        }
        _ => device,
    }
}

/// Proposes the steps' ops (one batch per group, in order, now) and returns the work that
/// answers their outcomes.
fn run(
    broker: &Arc<Broker>,
    session: &Arc<Session>,
    owner: &str,
    steps: Vec<Step>,
    quiet: bool,
) -> Option<Work> {
    // A line whose key text (serial, child id, alarm type, ...) is too long is refused here,
    // on its own, instead of failing the whole batch when it is proposed.
    let steps: Vec<Step> = steps
        .into_iter()
        .map(|s| match s {
            Step::Op { op, then, template } => match op.check() {
                Ok(()) => Step::Op { op, then, template },
                Err(why) => match then {
                    Then::Json { mid } => Step::JsonError(json::error_payload(
                        &template,
                        "validationError",
                        &why,
                        mid,
                    )),
                    _ => Step::Error(encode_line(&["45", &template, &why])),
                },
            },
            other => other,
        })
        .collect();
    if !steps.iter().any(|s| matches!(s, Step::Op { .. })) {
        answer_now(broker, session, &steps);
        return None;
    }
    let device = device_group(broker, &session.key);
    let mut batches: Vec<(u64, Vec<DeviceOp>)> = Vec::new();
    // The ops move into their batches; each step keeps where its outcome will be.
    let answers: Vec<Answer> = steps
        .into_iter()
        .map(|s| match s {
            Step::Op { op, then, template } => {
                let g = op_group(broker, &session.key.tenant, &op, device);
                let b = match batches.iter().position(|(x, _)| *x == g) {
                    Some(b) => b,
                    None => {
                        batches.push((g, Vec::new()));
                        batches.len() - 1
                    }
                };
                let at = (b, batches[b].1.len());
                batches[b].1.push(op);
                Answer::Op { then, template, at }
            }
            other => Answer::Now(other),
        })
        .collect();
    let serial = session.key.client_id.to_string();
    let sent: Vec<_> = batches
        .into_iter()
        .map(|(group, ops)| {
            if broker.durable.device_store(group).is_none() {
                return Err(ClusterError::InvalidCommand("no such group".into()));
            }
            let cmd = batch(&session.key.tenant, group, owner, Some(&serial), quiet, ops);
            broker.durable.propose_sent(cmd)
        })
        .collect();
    let broker = broker.clone();
    let session = session.clone();
    Some(Box::pin(async move {
        let mut results: Vec<Result<Vec<Option<Outcome>>, String>> = Vec::new();
        let mut failure = None;
        for f in sent {
            let r = match f {
                Ok(f) => f.await,
                Err(e) => Err(e),
            };
            results.push(match r {
                Ok(Response::Device(o)) => Ok(o.into_iter().map(Some).collect()),
                Ok(_) => Ok(Vec::new()),
                Err(e) => {
                    tracing::warn!(error = %e, client = %session.key.client_id, "device data not committed");
                    let text = e.to_string();
                    // An id of no group here is the caller's mistake, not the storage's.
                    if !matches!(e, ClusterError::InvalidCommand(_)) {
                        failure = Some(e);
                    }
                    Err(text)
                }
            });
        }
        for a in answers {
            match a {
                Answer::Op {
                    then,
                    template,
                    at: (b, i),
                } => {
                    let o = match results.get_mut(b) {
                        Some(Ok(v)) => v
                            .get_mut(i)
                            .and_then(Option::take)
                            .unwrap_or(Outcome::NotFound("no outcome".into())),
                        Some(Err(text)) => Outcome::NotFound(format!("Server error: {text}")),
                        None => Outcome::NotFound("no outcome".into()),
                    };
                    answer(&broker, &session, &then, &template, o);
                }
                Answer::Now(step) => answer_now(&broker, &session, std::slice::from_ref(&step)),
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(Response::Ok),
        }
    }))
}

/// A step once its op went into a batch: how to answer it and where its outcome will be
/// (batch, position), or a step answered without committing anything.
enum Answer {
    Op {
        then: Then,
        template: String,
        at: (usize, usize),
    },
    Now(Step),
}

/// A `Command::Device` at the server time now: every batch the node proposes is made here.
pub fn batch(
    tenant: &str,
    group: u64,
    owner: &str,
    device: Option<&str>,
    quiet: bool,
    ops: Vec<DeviceOp>,
) -> Command {
    let (now, now_ms) = now();
    Command::Device(DeviceBatch {
        tenant: tenant.to_string(),
        group,
        now,
        now_ms,
        owner: owner.to_string(),
        quiet,
        device: device.map(str::to_string),
        ops,
    })
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
            Step::JsonError(payload) => {
                error_metric("json");
                broker.send_downstream(session, "error", payload.clone().into());
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
fn answer(broker: &Arc<Broker>, session: &Arc<Session>, then: &Then, template: &str, o: Outcome) {
    let send = |topic: &str, line: String| {
        broker.send_downstream(session, topic, line.into());
    };
    match (then, o) {
        (Then::Json { mid }, Outcome::NotFound(text)) => {
            error_metric("json");
            send(
                "error",
                json::error_payload(template, "Not Found", &text, *mid),
            );
        }
        (Then::Json { mid }, Outcome::Invalid(text)) => {
            error_metric("json");
            send(
                "error",
                json::error_payload(template, "validationError", &text, *mid),
            );
        }
        (Then::TemplatesCreated { xid }, Outcome::Exists) => {
            error_metric("41");
            send(
                "s/e",
                encode_line(&[
                    "41",
                    xid,
                    "Cannot create templates for already existing template object",
                ]),
            );
        }
        (Then::TemplatesCreated { xid }, Outcome::Done(j)) => {
            if let Some(d) = Doc::from_json(&j) {
                send("s/dt", encode_line(&["20", xid, &d.id.to_string()]));
            }
        }
        (Then::Respond { topic, collection }, o @ (Outcome::Done(_) | Outcome::Many(_))) => {
            let doc = match o {
                Outcome::Done(j) => Doc::from_json(&j),
                Outcome::Many(v) => v.first().and_then(|j| Doc::from_json(j)),
                _ => None,
            };
            if let Some(d) = doc {
                let v = serde_json::Value::Object(d.body);
                let lines =
                    fleetmq_smartrest::custom::response_lines(&collection.responses, &v, None);
                if !lines.is_empty() {
                    send(topic, lines.join("\n"));
                }
            }
        }
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
                deliver::to_session(broker, session, &op);
            }
        }
        _ => {}
    }
}

/// After a downstream subscription (`s/ds`, `devicecontrol/notifications`): the device's
/// PENDING operations again (§2.4: "all operations not yet forwarded are published upon
/// subscription").
pub async fn resend_pending(broker: Arc<Broker>, session: Arc<Session>, owner: String, conn: u64) {
    let key = session.key.clone();
    let group = device_group(&broker, &key);
    let source = Source::Device {
        serial: key.client_id.to_string(),
    };
    let ops = vec![
        DeviceOp::Connection {
            source: source.clone(),
            conn,
            connected: true,
        },
        DeviceOp::Pending { source },
    ];
    let cmd = batch(&key.tenant, group, &owner, Some(&key.client_id), false, ops);
    match broker.durable.propose(cmd).await {
        Ok(Response::Device(mut o)) => {
            if let Some(o) = o.pop() {
                answer(&broker, &session, &Then::Deliver, "500", o);
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, client = %key.client_id, "pending operations not read")
        }
    }
}

/// Removes measurements and events older than the retention from the groups this node leads,
/// every `retention_sweep_secs` (so disks do not fill). Each round removes at most
/// `PRUNE_BATCH` records per command, so a large backlog never makes one huge Raft entry.
pub async fn retention_loop(broker: Arc<Broker>) {
    const PRUNE_BATCH: u32 = 1000;
    const ROUNDS: usize = 50;
    let retention_ms = broker.cfg.retention_secs.saturating_mul(1000);
    if retention_ms == 0 {
        return;
    }
    let every = std::time::Duration::from_secs(broker.cfg.retention_sweep_secs);
    let mut shutdown = broker.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let me = broker.durable.node_id();
        let groups = broker.durable.device_groups();
        for (g, _, leader) in broker.durable.layout() {
            if leader != Some(me) || !groups.contains(&g) {
                continue;
            }
            for _ in 0..ROUNDS {
                let before_ms = now().1.saturating_sub(retention_ms);
                let cmd = batch(
                    "",
                    g,
                    "",
                    None,
                    true,
                    vec![DeviceOp::Prune {
                        before_ms,
                        limit: PRUNE_BATCH,
                    }],
                );
                let removed = match broker.durable.propose(cmd).await {
                    Ok(Response::Device(o)) => match o.first() {
                        Some(Outcome::Done(n)) => n.parse::<u32>().unwrap_or(0),
                        _ => 0,
                    },
                    Ok(_) => 0,
                    Err(e) => {
                        tracing::warn!(error = %e, group = g, "retention sweep failed");
                        0
                    }
                };
                metrics::counter!("fleetmq_device_data_pruned_total").increment(u64::from(removed));
                if removed < PRUNE_BATCH {
                    break;
                }
            }
        }
    }
}

/// A connection that had subscribed to downstream topics ended: the device is DISCONNECTED,
/// unless a newer connection has made it CONNECTED since.
pub async fn connection_ended(broker: Arc<Broker>, key: SessionKey, conn: u64) {
    let group = device_group(&broker, &key);
    let op = DeviceOp::Connection {
        source: Source::Device {
            serial: key.client_id.to_string(),
        },
        conn,
        connected: false,
    };
    let cmd = batch(
        &key.tenant,
        group,
        "",
        Some(&key.client_id),
        false,
        vec![op],
    );
    if let Err(e) = broker.durable.propose(cmd).await {
        tracing::warn!(error = %e, client = %key.client_id, "device connection status not stored");
    }
}
