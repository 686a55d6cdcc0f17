//! The Cumulocity device API end to end: a real MQTT client (rumqttc) speaks SmartREST on
//! `s/us` as a device would, and the platform side reads and writes over the REST API
//! (c8y-mqtt.md §3–§5, §11).
mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use rumqttc::{Client, Event, LastWill, MqttOptions, Packet, QoS};
use serde_json::{json, Value};

const T_ADMIN_PW: &str = "acme-admin-pw";
const DEV_PW: &str = "dev-secret-1";

/// A tenant `acme` with device users `device_<id>` for `devices`; returns the tenant id.
fn tenant(node: &Node, devices: &[&str]) -> String {
    let (s, v) = rest(
        node,
        "POST",
        "/tenant/tenants",
        "management/admin",
        ADMIN_PW,
        Some(
            json!({"company": "Acme", "domain": "acme", "adminName": "admin", "adminPass": T_ADMIN_PW}),
        ),
    );
    assert_eq!(s, 201, "{v}");
    let tid = v["id"].as_str().expect("tenant id").to_string();
    for d in devices {
        let (s, v) = rest(
            node,
            "POST",
            &format!("/user/{tid}/users"),
            &format!("{tid}/admin"),
            T_ADMIN_PW,
            Some(json!({"userName": format!("device_{d}"), "password": DEV_PW})),
        );
        assert_eq!(s, 201, "{v}");
    }
    tid
}

/// The platform side: the tenant administrator over REST.
struct Api<'a> {
    node: &'a Node,
    user: String,
}

impl Api<'_> {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        rest(self.node, method, path, &self.user, T_ADMIN_PW, body)
    }
    fn get(&self, path: &str) -> Value {
        let (s, v) = self.call("GET", path, None);
        assert_eq!(s, 200, "GET {path}: {v}");
        v
    }
    fn post(&self, path: &str, body: Value) -> Value {
        let (s, v) = self.call("POST", path, Some(body));
        assert_eq!(s, 201, "POST {path}: {v}");
        v
    }
    /// The managed object id of a device by its serial.
    fn id_of(&self, serial: &str) -> String {
        let v = self.get(&format!("/identity/externalIds/c8y_Serial/{serial}"));
        v["managedObject"]["id"].as_str().expect("id").to_string()
    }
    fn list(&self, path: &str) -> Vec<Value> {
        let v = self.get(path);
        let key = path
            .split('?')
            .next()
            .and_then(|p| p.rsplit('/').next())
            .unwrap_or_default()
            .to_string();
        v[key].as_array().cloned().unwrap_or_default()
    }
}

/// A device: one MQTT connection (client id = its serial), what it receives in a channel.
struct Device {
    client: Client,
    rx: mpsc::Receiver<(String, String)>,
}

impl Device {
    fn opts(node: &Node, serial: &str, tid: &str) -> MqttOptions {
        let mut o = MqttOptions::new(serial, "127.0.0.1", node.mqtt.port());
        o.set_credentials(format!("{tid}/device_{serial}"), DEV_PW);
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    /// Options with a full ClientId (`d:<serial>:<X-ID>`) for device user `device_<serial>`.
    fn opts_with_id(node: &Node, client_id: &str, serial: &str, tid: &str) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, "127.0.0.1", node.mqtt.port());
        o.set_credentials(format!("{tid}/device_{serial}"), DEV_PW);
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    fn connect(node: &Node, serial: &str, tid: &str) -> Device {
        Device::connect_with(Device::opts(node, serial, tid))
    }

    fn connect_with(o: MqttOptions) -> Device {
        let (client, mut conn) = Client::new(o, 64);
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let text = String::from_utf8_lossy(&p.payload).into_owned();
                        if tx.send((p.topic.clone(), text)).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("CONNACK");
        Device { client, rx }
    }

    /// DISCONNECT and wait for the connection to end.
    fn close(self) {
        let _ = self.client.disconnect();
        std::thread::sleep(Duration::from_millis(200));
    }

    fn subscribe_downstream(&self) {
        for t in ["s/e", "s/ds", "devicecontrol/notifications"] {
            self.client
                .subscribe(t, QoS::AtLeastOnce)
                .expect("subscribe");
        }
        // The SUBACKs are not surfaced here; give them a moment.
        std::thread::sleep(Duration::from_millis(300));
    }

    fn send(&self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
            .expect("publish");
    }

    /// The next message on `topic` whose payload satisfies `f` (others are skipped).
    fn expect(&self, topic: &str, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok((t, p)) if t == topic && f(&p) => return p,
                Ok(other) => seen.push(other),
                Err(_) => break,
            }
        }
        panic!("no {what} on {topic}; got {seen:?}");
    }

    /// Everything received within `d`.
    fn drain(&self, d: Duration) -> Vec<(String, String)> {
        let end = Instant::now() + d;
        let mut out = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok(m) => out.push(m),
                Err(_) => break,
            }
        }
        out
    }
}

/// Polls until `f` gives `Some`.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_device_creates_itself_sends_data_and_reads_its_errors() {
    let node = Node::start_secure();
    let tid = tenant(&node, &["dev1"]);
    let api = Api {
        node: &node,
        user: format!("{tid}/admin"),
    };
    let dev = Device::connect(&node, "dev1", &tid);
    dev.subscribe_downstream();

    dev.send("s/us", "100,Pump 1,c8y_Pump");
    let id = eventually("device dev1", || {
        let (s, v) = api.call("GET", "/identity/externalIds/c8y_Serial/dev1", None);
        (s == 200)
            .then(|| v["managedObject"]["id"].as_str().map(str::to_string))
            .flatten()
    });
    let mo = api.get(&format!("/inventory/managedObjects/{id}"));
    assert_eq!(mo["name"], "Pump 1");
    assert_eq!(mo["type"], "c8y_Pump");
    assert!(mo["c8y_IsDevice"].is_object() && mo["com_cumulocity_model_Agent"].is_object());
    assert_eq!(mo["owner"], "device_dev1");

    // A second 100 is refused the way thin-edge's connection check expects.
    dev.send("s/us", "100,Other name");
    dev.expect("s/e", "41 for an existing device", |p| {
        p == "41,100,Device already existing"
    });
    assert_eq!(
        api.get(&format!("/inventory/managedObjects/{id}"))["name"],
        "Pump 1"
    );

    // Several records in one message; inventory fragments; measurements.
    dev.send(
        "s/us",
        "114,c8y_Restart,c8y_Command\n110,SN-1,M1,r2\n200,c8y_Temperature,T,21.5,C\n201,c8y_Multi,2026-11-30T10:00:00.000Z,c8y_A,x,1,u1,c8y_B,y,2.5,",
    );
    let ms = eventually("two measurements", || {
        let l = api.list(&format!(
            "/measurement/measurements?source={id}&pageSize=100"
        ));
        (l.len() == 2).then_some(l)
    });
    let temp = ms
        .iter()
        .find(|m| m["type"] == "c8y_Temperature")
        .expect("200");
    assert_eq!(temp["c8y_Temperature"]["T"]["value"], 21.5);
    assert_eq!(temp["c8y_Temperature"]["T"]["unit"], "C");
    assert_eq!(temp["source"]["id"], id.as_str());
    let multi = ms.iter().find(|m| m["type"] == "c8y_Multi").expect("201");
    assert_eq!(multi["time"], "2026-11-30T10:00:00.000Z");
    assert_eq!(multi["c8y_A"]["x"]["value"], 1);
    assert_eq!(multi["c8y_B"]["y"]["value"], 2.5);
    let mo = api.get(&format!("/inventory/managedObjects/{id}"));
    assert_eq!(
        mo["c8y_SupportedOperations"],
        json!(["c8y_Restart", "c8y_Command"])
    );
    assert_eq!(
        mo["c8y_Hardware"],
        json!({"serialNumber": "SN-1", "model": "M1", "revision": "r2"})
    );
    assert!(mo["c8y_Availability"]["lastMessage"].is_string(), "{mo}");

    // Alarms: a repeated one counts up; severity change; clear.
    dev.send("s/us", "301,c8y_Hot,Too hot\n301,c8y_Hot,Still too hot");
    let a = eventually("a counted alarm", || {
        let l = api.list(&format!("/alarm/alarms?source={id}"));
        l.into_iter().find(|a| a["count"] == 2)
    });
    assert_eq!(a["severity"], "CRITICAL");
    assert_eq!(a["status"], "ACTIVE");
    assert_eq!(a["text"], "Still too hot");
    dev.send("s/us", "305,c8y_Hot,MINOR");
    eventually("severity MINOR", || {
        let v = api.get(&format!("/alarm/alarms/{}", a["id"].as_str().unwrap()));
        (v["severity"] == "MINOR").then_some(())
    });
    dev.send("s/us", "306,c8y_Hot");
    eventually("alarm cleared", || {
        let l = api.list(&format!("/alarm/alarms?source={id}&status=CLEARED"));
        (l.len() == 1).then_some(())
    });
    dev.send("s/us", "303,c8y_Hot");
    let fresh = eventually("a new alarm after clearing", || {
        let l = api.list(&format!("/alarm/alarms?source={id}&status=ACTIVE"));
        l.into_iter().next()
    });
    assert_eq!(fresh["count"], 1);
    assert_eq!(fresh["text"], "Alarm of type c8y_Hot raised");

    // Events.
    dev.send("s/us", "400,c8y_Boot,\"Booted, \"\"fast\"\"\"");
    let ev = eventually("event", || {
        api.list(&format!("/event/events?source={id}&type=c8y_Boot"))
            .into_iter()
            .next()
    });
    assert_eq!(ev["text"], "Booted, \"fast\"");

    // Child devices: 101, then data on s/us/<child> (and an unknown child is created).
    dev.send("s/us", "101,child1,Child One");
    dev.send("s/us/child1", "211,25.5");
    dev.send("s/us/child2", "212,80");
    let child = eventually("child1", || {
        let (s, v) = api.call("GET", "/identity/externalIds/c8y_Serial/child1", None);
        (s == 200)
            .then(|| v["managedObject"]["id"].as_str().map(str::to_string))
            .flatten()
    });
    let c = api.get(&format!("/inventory/managedObjects/{child}"));
    assert_eq!(c["name"], "Child One");
    assert_eq!(c["type"], "c8y_MQTTChildDevice");
    let m = eventually("child measurement", || {
        api.list(&format!("/measurement/measurements?source={child}"))
            .into_iter()
            .next()
    });
    assert_eq!(m["c8y_TemperatureMeasurement"]["T"]["value"], 25.5);
    let child2 = eventually("child2", || {
        let (s, v) = api.call("GET", "/identity/externalIds/c8y_Serial/child2", None);
        (s == 200)
            .then(|| v["managedObject"]["id"].as_str().map(str::to_string))
            .flatten()
    });
    let kids = api.get(&format!(
        "/inventory/managedObjects/{id}/childDevices?pageSize=10"
    ));
    let kid_ids: Vec<&str> = kids["references"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["managedObject"]["id"].as_str())
        .collect();
    assert_eq!(kid_ids, vec![child.as_str(), child2.as_str()]);

    // Answers on s/ds.
    dev.send("s/us", "123\n105\n600\n602");
    dev.expect("s/ds", "124", |p| p == format!("124,{id}"));
    dev.expect("s/ds", "106", |p| p == "106,child1,child2");
    dev.expect("s/ds", "601", |p| p.starts_with("601,"));
    dev.expect("s/ds", "603", |p| {
        p.starts_with("603,100,101,") && p.contains(",511,")
    });

    // Errors: each answered on s/e, nothing stored.
    let before = api
        .list(&format!(
            "/measurement/measurements?source={id}&pageSize=100"
        ))
        .len();
    dev.send("s/us", "999,foo");
    dev.expect("s/e", "40", |p| {
        p == "40,999,No static template for this message id"
    });
    dev.send("s/us", "200,c8y_T,T,warm");
    dev.expect("s/e", "45 not a number", |p| {
        p.starts_with("45,200,") && p.contains("NUMBER")
    });
    dev.send("s/us", "200,c8y_T");
    dev.expect("s/e", "45 missing", |p| {
        p == "45,200,Mandatory field series is missing" || p.starts_with("45,200,Mandatory field")
    });
    dev.send("s/us", "301,\"unterminated");
    dev.expect("s/e", "42", |p| p.starts_with("42,"));
    dev.send("s/us", "306,c8y_NoSuchAlarm");
    dev.expect("s/e", "50 for no open alarm", |p| p.starts_with("50,306,"));
    // A good line after bad ones in the same message still counts.
    dev.send("s/us", "999\n200,c8y_T,T,1");
    dev.expect("s/e", "40", |p| p.starts_with("40,999"));
    let after = eventually("only the good measurement", || {
        let n = api
            .list(&format!(
                "/measurement/measurements?source={id}&pageSize=100"
            ))
            .len();
        (n == before + 1).then_some(n)
    });
    assert_eq!(after, before + 1);
    // Device users cannot read the platform API.
    let (s, _) = rest(
        &node,
        "GET",
        "/inventory/managedObjects",
        &format!("{tid}/device_dev1"),
        DEV_PW,
        None,
    );
    assert_eq!(s, 403);
}

#[test]
fn an_operation_created_over_rest_reaches_the_device_and_its_status_comes_back() {
    let node = Node::start_secure();
    let tid = tenant(&node, &["dev2"]);
    let api = Api {
        node: &node,
        user: format!("{tid}/admin"),
    };
    let dev = Device::connect(&node, "dev2", &tid);
    dev.send("s/us", "100\n101,kid");
    dev.subscribe_downstream();
    let id = eventually("dev2", || {
        let (s, v) = api.call("GET", "/identity/externalIds/c8y_Serial/dev2", None);
        (s == 200)
            .then(|| v["managedObject"]["id"].as_str().map(str::to_string))
            .flatten()
    });
    let kid = eventually("kid", || {
        let (s, v) = api.call("GET", "/identity/externalIds/c8y_Serial/kid", None);
        (s == 200)
            .then(|| v["managedObject"]["id"].as_str().map(str::to_string))
            .flatten()
    });

    let cmd = api.post(
        "/devicecontrol/operations",
        json!({"deviceId": id, "description": "list", "c8y_Command": {"text": "ls -l"}}),
    );
    assert_eq!(cmd["status"], "PENDING");
    let cmd_id = cmd["id"].as_str().unwrap().to_string();
    dev.expect("s/ds", "511", |p| p == "511,dev2,ls -l");
    let j = dev.expect("devicecontrol/notifications", "JSON operation", |p| {
        p.contains(&cmd_id)
    });
    let j: Value = serde_json::from_str(&j).unwrap();
    assert_eq!(j["externalSource"]["externalId"], "dev2");
    assert_eq!(j["c8y_Command"]["text"], "ls -l");

    dev.send("s/us", "501,c8y_Command");
    eventually("EXECUTING", || {
        let v = api.get(&format!("/devicecontrol/operations/{cmd_id}"));
        (v["status"] == "EXECUTING").then_some(())
    });
    dev.send("s/us", "503,c8y_Command,\"total 0\"");
    let done = eventually("SUCCESSFUL", || {
        let v = api.get(&format!("/devicecontrol/operations/{cmd_id}"));
        (v["status"] == "SUCCESSFUL").then_some(v)
    });
    assert_eq!(done["c8y_Command"]["result"], "total 0");

    // An operation for the child goes to the agent's connection, addressed to the child.
    let restart = api.post(
        "/devicecontrol/operations",
        json!({"deviceId": kid, "c8y_Restart": {}}),
    );
    let rid = restart["id"].as_str().unwrap().to_string();
    assert_eq!(restart["agentId"], id.as_str());
    dev.expect("s/ds", "510 for the child", |p| p == "510,kid");
    // By id, on the child's topic (as thin-edge does).
    dev.send("s/us/kid", &format!("504,{rid}"));
    dev.send("s/us/kid", &format!("505,{rid},\"disk full\""));
    let failed = eventually("FAILED", || {
        let v = api.get(&format!("/devicecontrol/operations/{rid}"));
        (v["status"] == "FAILED").then_some(v)
    });
    assert_eq!(failed["failureReason"], "disk full");
    // A finished operation stays finished; the device is told why.
    dev.send("s/us/kid", &format!("506,{rid}"));
    dev.expect("s/e", "45 for a finished operation", |p| {
        p.starts_with("45,506,")
    });
    assert_eq!(
        api.get(&format!("/devicecontrol/operations/{rid}"))["status"],
        "FAILED"
    );

    // The device is CONNECTED while subscribed downstream, DISCONNECTED when it goes.
    let status = |api: &Api| {
        api.get(&format!("/inventory/managedObjects/{id}"))["c8y_Connection"]["status"]
            .as_str()
            .map(str::to_string)
    };
    assert_eq!(status(&api).as_deref(), Some("CONNECTED"));
    let avail = api.get(&format!("/inventory/managedObjects/{id}"))["c8y_Availability"].clone();
    assert_eq!(avail["status"], "AVAILABLE", "{avail}");
    // Operations created while the device is away arrive when it subscribes again, and on 500.
    dev.close();
    eventually("DISCONNECTED", || {
        (status(&api).as_deref() == Some("DISCONNECTED")).then_some(())
    });
    let later = api.post(
        "/devicecontrol/operations",
        json!({"deviceId": id, "c8y_Restart": {}}),
    );
    let dev = Device::connect(&node, "dev2", &tid);
    dev.subscribe_downstream();
    dev.expect("s/ds", "510 after resubscribing", |p| p == "510,dev2");
    assert_eq!(status(&api).as_deref(), Some("CONNECTED"));
    // A takeover: the new connection's CONNECTED is not undone by the old one's end.
    let dev = {
        let newer = Device::connect(&node, "dev2", &tid);
        newer.subscribe_downstream();
        drop(dev);
        newer
    };
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(status(&api).as_deref(), Some("CONNECTED"));
    dev.send("s/us", "500");
    dev.expect("s/ds", "510 again on 500", |p| p == "510,dev2");
    let listed = api.list(&format!(
        "/devicecontrol/operations?deviceId={id}&status=PENDING"
    ));
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], later["id"]);
    let by_agent = api.list(&format!(
        "/devicecontrol/operations?agentId={id}&pageSize=10"
    ));
    assert_eq!(by_agent.len(), 3, "{by_agent:?}");
}

#[test]
fn processing_modes_store_or_not_as_documented() {
    let node = Node::start_secure();
    let tid = tenant(&node, &["dev3"]);
    let api = Api {
        node: &node,
        user: format!("{tid}/admin"),
    };
    let dev = Device::connect(&node, "dev3", &tid);
    dev.subscribe_downstream();
    dev.send("s/us", "100");
    let id = eventually("dev3", || {
        let (s, v) = api.call("GET", "/identity/externalIds/c8y_Serial/dev3", None);
        (s == 200)
            .then(|| v["managedObject"]["id"].as_str().map(str::to_string))
            .flatten()
    });
    dev.send("t/us", "200,c8y_Mode,transient,1");
    dev.send("c/us", "200,c8y_Mode,cep,1\n400,c8y_Mode,cep");
    dev.send("q/us", "200,c8y_Mode,quiescent,1");
    dev.send("s/us", "200,c8y_Mode,persistent,1");
    let l = eventually("two stored measurements", || {
        let l = api.list(&format!(
            "/measurement/measurements?source={id}&type=c8y_Mode&pageSize=10"
        ));
        (l.len() >= 2).then_some(l)
    });
    std::thread::sleep(Duration::from_millis(500));
    let l2 = api.list(&format!(
        "/measurement/measurements?source={id}&type=c8y_Mode&pageSize=10"
    ));
    assert_eq!(l.len(), 2, "{l:?}");
    assert_eq!(l2.len(), 2, "{l2:?}");
    let series: Vec<bool> = ["quiescent", "persistent"]
        .iter()
        .map(|s| l2.iter().any(|m| m["c8y_Mode"].get(*s).is_some()))
        .collect();
    assert_eq!(series, vec![true, true]);
    assert!(api
        .list(&format!("/event/events?source={id}&type=c8y_Mode"))
        .is_empty());
    assert!(dev
        .drain(Duration::from_millis(300))
        .iter()
        .all(|(t, _)| t != "s/e"));
    // c/ twice (CEP: neither stored nor notified); t/ goes to notifications only.
    assert!(node.metric("fleetmq_device_api_unstored_total") >= 2.0);
}

#[test]
fn a_last_will_on_s_us_raises_an_event() {
    let node = Node::start_secure();
    let tid = tenant(&node, &["dev4"]);
    let api = Api {
        node: &node,
        user: format!("{tid}/admin"),
    };
    let mut o = Device::opts(&node, "dev4", &tid);
    o.set_last_will(LastWill::new(
        "s/us",
        "400,c8y_ConnectionEvent,\"Device connection was lost.\"",
        QoS::AtLeastOnce,
        false,
    ));
    o.set_keep_alive(Duration::from_secs(5));
    let dev = Device::connect_with(o);
    dev.send("s/us", "100");
    let id = eventually("dev4", || {
        let (s, v) = api.call("GET", "/identity/externalIds/c8y_Serial/dev4", None);
        (s == 200)
            .then(|| v["managedObject"]["id"].as_str().map(str::to_string))
            .flatten()
    });
    // A second connection with the same identifier takes over: the first one's will fires.
    let _other = Device::connect(&node, "dev4", &tid);
    let ev = eventually("connection event", || {
        api.list(&format!(
            "/event/events?source={id}&type=c8y_ConnectionEvent"
        ))
        .into_iter()
        .next()
    });
    assert_eq!(ev["text"], "Device connection was lost.");
    drop(dev);
}

#[test]
fn bad_rest_input_gets_clear_errors_and_stores_nothing() {
    let node = Node::start_secure();
    let tid = tenant(&node, &[]);
    let api = Api {
        node: &node,
        user: format!("{tid}/admin"),
    };
    let mo = api.post(
        "/inventory/managedObjects",
        json!({"name": "Gateway", "type": "acme_Gateway", "c8y_IsDevice": {}}),
    );
    let id = mo["id"].as_str().unwrap().to_string();
    let x = api.post(
        &format!("/identity/globalIds/{id}/externalIds"),
        json!({"type": "c8y_Serial", "externalId": "gw-1"}),
    );
    assert_eq!(x["managedObject"]["id"], id.as_str());
    assert_eq!(api.id_of("gw-1"), id);
    // Missing mandatory fields, unknown sources, bad severities, bad ids.
    let cases = [
        ("/measurement/measurements", json!({"type": "m"}), 422),
        (
            "/measurement/measurements",
            json!({"source": {"id": id}}),
            422,
        ),
        (
            "/event/events",
            json!({"source": {"id": id}, "type": "e"}),
            422,
        ),
        (
            "/alarm/alarms",
            json!({"source": {"id": id}, "type": "a", "text": "t", "severity": "BAD"}),
            422,
        ),
        (
            "/alarm/alarms",
            json!({"source": {"id": "999999999"}, "type": "a", "text": "t", "severity": "MAJOR"}),
            422,
        ),
        ("/devicecontrol/operations", json!({"c8y_Restart": {}}), 422),
        (
            "/devicecontrol/operations",
            json!({"deviceId": "1", "c8y_Restart": {}}),
            404,
        ),
    ];
    for (path, body, want) in cases {
        let (s, v) = api.call("POST", path, Some(body.clone()));
        assert_eq!(s, want, "POST {path} {body}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| e.contains('/')), "{v}");
    }
    // A bulk with one bad item stores none of it.
    let (s, _) = api.call(
        "POST",
        "/measurement/measurements",
        Some(json!({"measurements": [
            {"source": {"id": id}, "type": "ok", "ok": {"v": {"value": 1}}},
            {"source": {"id": id}}
        ]})),
    );
    assert_eq!(s, 422);
    assert!(api
        .list(&format!("/measurement/measurements?source={id}"))
        .is_empty());
    // A good bulk stores all.
    let (s, v) = api.call(
        "POST",
        "/measurement/measurements",
        Some(json!({"measurements": [
            {"source": {"id": id}, "type": "ok", "time": "2026-01-01T00:00:00+0100", "ok": {"v": {"value": 1}}},
            {"source": {"id": id}, "type": "ok", "time": "2026-01-02T00:00:00.000Z", "ok": {"v": {"value": 2}}}
        ]})),
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["measurements"].as_array().map(Vec::len), Some(2));
    let jan1 = api.list(&format!(
        "/measurement/measurements?source={id}&dateFrom=2025-12-31T00:00:00Z&dateTo=2026-01-01T12:00:00Z"
    ));
    assert_eq!(jan1.len(), 1);
    assert_eq!(jan1[0]["ok"]["v"]["value"], 1);
    let newest = api.list(&format!(
        "/measurement/measurements?source={id}&revert=true&pageSize=1"
    ));
    assert_eq!(newest[0]["ok"]["v"]["value"], 2);
    // The same external id cannot go to a second object.
    let other = api.post("/inventory/managedObjects", json!({"name": "Other"}));
    let (s, _) = api.call(
        "POST",
        &format!(
            "/identity/globalIds/{}/externalIds",
            other["id"].as_str().unwrap()
        ),
        Some(json!({"type": "c8y_Serial", "externalId": "gw-1"})),
    );
    assert_eq!(s, 409);
    let (s, _) = api.call("GET", "/inventory/managedObjects/notanid", None);
    assert_eq!(s, 404);

    // Paging: 7 events of the gateway, 5 per page; the links keep the filter.
    let events: Vec<Value> = (0..7)
        .map(|i| json!({"source": {"id": id}, "type": "p", "text": format!("e{i}")}))
        .collect();
    let (s, _) = api.call("POST", "/event/events", Some(json!({ "events": events })));
    assert_eq!(s, 201);
    let first = api.get(&format!("/event/events?source={id}&type=p&pageSize=5"));
    assert_eq!(first["events"].as_array().map(Vec::len), Some(5));
    let next = first["next"].as_str().expect("a next link").to_string();
    assert!(
        next.contains(&format!("source={id}")) && next.contains("type=p"),
        "{next}"
    );
    let second = api.get(&next);
    assert_eq!(second["events"].as_array().map(Vec::len), Some(2));
    assert!(second.get("next").is_none());
    assert!(second["prev"].is_string());
    let (s, _) = api.call("GET", "/event/events?pageSize=2000&currentPage=1000", None);
    assert_eq!(s, 400);
}

/// Three nodes: a device connected to C gets an operation created over REST on A; its data
/// and the operation's status read the same on every node.
#[test]
fn a_device_on_one_node_receives_an_operation_created_on_another() {
    let a = Node::start_cluster_secure(1, free_port(), &[], &[]);
    let b = Node::start_cluster_secure(2, free_port(), &[a.grpc_addr()], &[]);
    let c = Node::start_cluster_secure(3, free_port(), &[a.grpc_addr(), b.grpc_addr()], &[]);
    let tid = tenant(&a, &["edge7"]);
    let on = |n| Api {
        node: n,
        user: format!("{tid}/admin"),
    };
    // The new device user must have reached C before it can log in there.
    eventually("the device user on C", || {
        let (s, _) = rest(
            &c,
            "GET",
            "/user/currentUser",
            &format!("{tid}/device_edge7"),
            DEV_PW,
            None,
        );
        (s == 200).then_some(())
    });
    let dev = Device::connect(&c, "edge7", &tid);
    dev.send("s/us", "100,Edge 7\n200,c8y_T,T,7");
    dev.subscribe_downstream();
    let id = eventually("edge7 on B", || {
        let (s, v) = on(&b).call("GET", "/identity/externalIds/c8y_Serial/edge7", None);
        (s == 200)
            .then(|| v["managedObject"]["id"].as_str().map(str::to_string))
            .flatten()
    });
    assert_eq!(
        on(&b)
            .list(&format!("/measurement/measurements?source={id}"))
            .len(),
        1
    );
    let op = on(&a).post(
        "/devicecontrol/operations",
        json!({"deviceId": id, "c8y_Command": {"text": "uptime"}}),
    );
    let op_id = op["id"].as_str().unwrap().to_string();
    dev.expect("s/ds", "511 from A", |p| p == "511,edge7,uptime");
    dev.send("s/us", "501,c8y_Command\n503,c8y_Command,up 3 days");
    for n in [&a, &b, &c] {
        let v = eventually("SUCCESSFUL everywhere", || {
            let v = on(n).get(&format!("/devicecontrol/operations/{op_id}"));
            (v["status"] == "SUCCESSFUL").then_some(v)
        });
        assert_eq!(v["c8y_Command"]["result"], "up 3 days");
    }
}

/// JSON via MQTT (§8): creates (one and bulk) with `externalSource` children, inventory
/// updates by external ID (`null` removes a fragment), updates by id with the documented
/// leading `/`, transient mode, and errors on `error`.
#[test]
fn json_via_mqtt_both_ways() {
    let node = Node::start_secure();
    let tid = tenant(&node, &["jdev"]);
    let api = Api {
        node: &node,
        user: format!("{tid}/admin"),
    };
    let dev = Device::connect(&node, "jdev", &tid);
    dev.client
        .subscribe("error", QoS::AtLeastOnce)
        .expect("subscribe");
    dev.send("s/us", "100");
    dev.subscribe_downstream();
    let id = eventually("jdev", || {
        let (s, v) = api.call("GET", "/identity/externalIds/c8y_Serial/jdev", None);
        (s == 200)
            .then(|| v["managedObject"]["id"].as_str().map(str::to_string))
            .flatten()
    });
    dev.send(
        "measurement/measurements/create",
        r#"{"type":"c8y_Env","time":"2026-11-30T12:00:00.000Z","c8y_Env":{"T":{"value":20.5,"unit":"C"}}}"#,
    );
    dev.send(
        "measurement/measurements/create",
        r#"{"externalSource":{"externalId":"jdev:device:kid","type":"c8y_Serial"},"type":"c8y_Env","c8y_Env":{"T":{"value":1.0}}}"#,
    );
    dev.send(
        "event/events/createBulk",
        r#"{"events":[{"type":"e1","text":"one"},{"type":"e2","text":"two"}]}"#,
    );
    dev.send(
        "t/measurement/measurements/create",
        r#"{"type":"c8y_Transient","c8y_Transient":{"x":{"value":1}}}"#,
    );
    dev.send(
        "inventory/managedObjects/update/jdev",
        r#"{"c8y_Firmware":{"name":"fw","version":"1.2"},"c8y_Agent":{"name":"x"}}"#,
    );
    let m = eventually("device measurement", || {
        api.list(&format!("/measurement/measurements?source={id}"))
            .into_iter()
            .next()
    });
    assert_eq!(m["c8y_Env"]["T"]["value"], 20.5);
    assert_eq!(m["time"], "2026-11-30T12:00:00.000Z");
    // The child's message is a separate PUBLISH: it may commit after the one awaited above.
    let kid = eventually("the child created by externalSource", || {
        let (s, v) = api.call(
            "GET",
            "/identity/externalIds/c8y_Serial/jdev:device:kid",
            None,
        );
        (s == 200)
            .then(|| v["managedObject"]["id"].as_str().map(str::to_string))
            .flatten()
    });
    assert_eq!(
        api.list(&format!("/measurement/measurements?source={kid}"))
            .len(),
        1
    );
    let evs = eventually("two events", || {
        let l = api.list(&format!("/event/events?source={id}&pageSize=10"));
        (l.len() == 2).then_some(l)
    });
    assert!(api
        .list("/measurement/measurements?type=c8y_Transient")
        .is_empty());
    let mo = eventually("firmware", || {
        let v = api.get(&format!("/inventory/managedObjects/{id}"));
        v["c8y_Firmware"].is_object().then_some(v)
    });
    assert_eq!(mo["c8y_Firmware"]["version"], "1.2");
    dev.send(
        "inventory/managedObjects/update/jdev",
        r#"{"c8y_Agent":null}"#,
    );
    eventually("fragment removed", || {
        let v = api.get(&format!("/inventory/managedObjects/{id}"));
        v.get("c8y_Agent").is_none().then_some(())
    });
    let e1 = evs.iter().find(|e| e["type"] == "e1").unwrap();
    let e1_id = e1["id"].as_str().unwrap();
    dev.send(
        &format!("/event/events/update/{e1_id}"),
        r#"{"text":"changed"}"#,
    );
    eventually("event updated", || {
        let v = api.get(&format!("/event/events/{e1_id}"));
        (v["text"] == "changed").then_some(())
    });

    // Errors: a missing field, bad JSON, an unknown id; nothing stored.
    dev.send("alarm/alarms/create", r#"{"type":"a","text":"t"}"#);
    let e = dev.expect("error", "validation error", |p| {
        p.contains("alarm/validationError")
    });
    let e: Value = serde_json::from_str(&e).unwrap();
    assert_eq!(
        e["message"],
        "Following mandatory fields should be included: severity"
    );
    assert!(e["messageId"].is_u64());
    dev.send("event/events/create", "{nope");
    dev.expect("error", "bad JSON", |p| p.contains("event/validationError"));
    dev.send("event/events/update/999999999", r#"{"text":"x"}"#);
    dev.expect("error", "unknown id", |p| p.contains("event/Not Found"));
    assert!(api.list(&format!("/alarm/alarms?source={id}")).is_empty());
    assert_eq!(
        api.list(&format!("/event/events?source={id}&pageSize=10"))
            .len(),
        2
    );
}

/// Custom templates both ways (§7): a collection created over MQTT (`s/ut`, answered on
/// `s/dt`), request templates on `s/uc`, response templates for GET answers and operations on
/// `s/dc`; a collection created over REST the way c8ydm does, used as the ClientId's default
/// collection on `s/ud`.
#[test]
fn custom_templates_both_ways() {
    let node = Node::start_secure();
    let tid = tenant(&node, &["cdev"]);
    let api = Api {
        node: &node,
        user: format!("{tid}/admin"),
    };
    let dev = Device::connect(&node, "cdev", &tid);
    for t in ["s/dt", "s/dc/acme-v1"] {
        dev.client
            .subscribe(t, QoS::AtLeastOnce)
            .expect("subscribe");
    }
    dev.subscribe_downstream();
    dev.send("s/ut/nope", "");
    dev.expect("s/dt", "41 for a missing collection", |p| p == "41,nope");
    dev.send(
        "s/ut/acme-v1",
        "10,m1,POST,MEASUREMENT,,c8y_Custom,,c8y_Custom.v.value,NUMBER,\n\
         10,g1,GET,INVENTORY,,true\n\
         10,op1,PUT,OPERATION,,c8y_Command,status,OPERATIONSTATUS,SUCCESSFUL,c8y_Command.result,STRING,\n\
         11,r1,,c8y_Command,c8y_Command.text\n\
         11,r2,,c8y_Hardware,c8y_Hardware.model",
    );
    let created = dev.expect("s/dt", "20 for the new collection", |p| {
        p.starts_with("20,acme-v1,")
    });
    dev.send("s/ut/acme-v1", "");
    dev.expect("s/dt", "20 on the existence query", |p| p == created);
    dev.send("s/ut/acme-v1", "10,x,POST,EVENT,,t,x,");
    dev.expect("s/e", "41 for a second creation", |p| {
        p == "41,acme-v1,Cannot create templates for already existing template object"
    });
    let coll_id = created.rsplit(',').next().unwrap().to_string();
    let coll = api.get(&format!("/inventory/managedObjects/{coll_id}"));
    assert_eq!(coll["type"], "c8y_SmartRest2Template");
    assert_eq!(
        coll["com_cumulocity_model_smartrest_csv_CsvSmartRestTemplate"]["requestTemplates"][0]
            ["msgId"],
        "m1"
    );

    dev.send("s/us", "100\n110,SN9,ModelX,1");
    let id = eventually("cdev", || {
        let (s, v) = api.call("GET", "/identity/externalIds/c8y_Serial/cdev", None);
        (s == 200)
            .then(|| v["managedObject"]["id"].as_str().map(str::to_string))
            .flatten()
    });
    dev.send("s/uc/acme-v1", "m1,,42.5");
    let m = eventually("custom measurement", || {
        api.list(&format!(
            "/measurement/measurements?source={id}&type=c8y_Custom"
        ))
        .into_iter()
        .next()
    });
    assert_eq!(m["c8y_Custom"]["v"]["value"], 42.5);
    dev.send("s/uc/acme-v1", &format!("g1,{id}"));
    dev.expect("s/dc/acme-v1", "r2 for the GET", |p| p == "r2,ModelX");

    let op = api.post(
        "/devicecontrol/operations",
        json!({"deviceId": id, "c8y_Command": {"text": "echo hi"}}),
    );
    dev.expect("s/dc/acme-v1", "r1 for the operation", |p| {
        p == "r1,cdev,echo hi"
    });
    dev.send("s/uc/acme-v1", "op1,hi");
    let done = eventually("SUCCESSFUL via the template", || {
        let v = api.get(&format!(
            "/devicecontrol/operations/{}",
            op["id"].as_str().unwrap()
        ));
        (v["status"] == "SUCCESSFUL").then_some(v)
    });
    assert_eq!(done["c8y_Command"]["result"], "hi");

    // Errors: unknown collection, unknown message id, a value of the wrong type.
    dev.send("s/uc/unknown-v9", "m1,,1");
    dev.expect("s/e", "41 unknown collection", |p| {
        p.starts_with("41,unknown-v9,")
    });
    dev.send("s/uc/acme-v1", "zz,1");
    dev.expect("s/e", "40 unknown message id", |p| p.starts_with("40,zz,"));
    dev.send("s/uc/acme-v1", "m1,,warm");
    dev.expect("s/e", "45 not a number", |p| {
        p == "45,m1,Value is not a NUMBER: warm"
    });
    assert_eq!(
        api.list(&format!(
            "/measurement/measurements?source={id}&type=c8y_Custom"
        ))
        .len(),
        1
    );

    // A collection created over REST (as c8ydm does), as the default collection of a ClientId.
    let mo = api.post(
        "/inventory/managedObjects",
        json!({"name": "rest-v1", "type": "c8y_SmartRest2Template",
            "com_cumulocity_model_smartrest_csv_CsvSmartRestTemplate": {
                "requestTemplates": [{"msgId": "e1", "method": "POST", "api": "EVENT",
                    "response": false, "mandatoryValues": ["c8y_Note", "", ""],
                    "customValues": []}],
                "responseTemplates": [{"msgId": "n1", "base": "", "condition": "c8y_Restart",
                    "pattern": ["deviceId"]}]}}),
    );
    api.post(
        &format!(
            "/identity/globalIds/{}/externalIds",
            mo["id"].as_str().unwrap()
        ),
        json!({"type": "c8y_SmartRest2DeviceIdentifier", "externalId": "rest-v1"}),
    );
    drop(dev);
    let dev = Device::connect_with(Device::opts_with_id(&node, "d:cdev:rest-v1", "cdev", &tid));
    dev.client
        .subscribe("s/dd", QoS::AtLeastOnce)
        .expect("subscribe");
    dev.subscribe_downstream();
    dev.send("s/ud", "e1,\"a note\"");
    let ev = eventually("event from the default collection", || {
        api.list(&format!("/event/events?source={id}&type=c8y_Note"))
            .into_iter()
            .next()
    });
    assert_eq!(ev["text"], "a note");
    api.post(
        "/devicecontrol/operations",
        json!({"deviceId": id, "c8y_Restart": {}}),
    );
    dev.expect("s/dd", "n1 on s/dd", |p| p == format!("n1,cdev,{id}"));
}

/// Measurements and events older than `--retention-secs` go; alarms, operations and the
/// inventory stay.
#[test]
fn old_measurements_and_events_are_removed_by_retention() {
    let node = Node::start_secure_with(&["--retention-secs", "2", "--retention-sweep-secs", "1"]);
    let tid = tenant(&node, &["rdev"]);
    let api = Api {
        node: &node,
        user: format!("{tid}/admin"),
    };
    let dev = Device::connect(&node, "rdev", &tid);
    dev.send("s/us", "100\n200,c8y_T,T,1\n400,c8y_E,old\n301,c8y_A");
    let id = eventually("rdev", || {
        let (s, v) = api.call("GET", "/identity/externalIds/c8y_Serial/rdev", None);
        (s == 200)
            .then(|| v["managedObject"]["id"].as_str().map(str::to_string))
            .flatten()
    });
    assert_eq!(
        eventually("the measurement", || {
            let l = api.list(&format!("/measurement/measurements?source={id}"));
            (!l.is_empty()).then_some(l.len())
        }),
        1
    );
    eventually("the measurement and event to expire", || {
        let m = api.list(&format!("/measurement/measurements?source={id}"));
        let e = api.list(&format!("/event/events?source={id}"));
        (m.is_empty() && e.is_empty()).then_some(())
    });
    assert_eq!(api.list(&format!("/alarm/alarms?source={id}")).len(), 1);
    assert_eq!(
        api.get(&format!("/inventory/managedObjects/{id}"))["id"],
        id.as_str()
    );
    assert!(node.metric("fleetmq_device_data_pruned_total") >= 2.0);
}

/// A Bayeux (CometD) client over the real-time WebSocket.
struct Realtime {
    ws: tokio_tungstenite::tungstenite::WebSocket<std::net::TcpStream>,
    next_id: u64,
}

impl Realtime {
    fn open(node: &Node, auth: Option<(&str, &str)>) -> Realtime {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://{}/notification/realtime", node.http)
            .into_client_request()
            .expect("request");
        if let Some((u, p)) = auth {
            let v = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            );
            req.headers_mut()
                .insert("Authorization", v.parse().expect("header"));
        }
        let stream = std::net::TcpStream::connect(node.http).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let (ws, _) = tokio_tungstenite::tungstenite::client::client(req, stream)
            .unwrap_or_else(|e| panic!("websocket handshake: {e}"));
        Realtime { ws, next_id: 1 }
    }

    fn send(&mut self, mut m: Value) {
        m["id"] = json!(self.next_id.to_string());
        self.next_id += 1;
        self.ws
            .send(tokio_tungstenite::tungstenite::Message::Text(
                json!([m]).to_string().into(),
            ))
            .expect("send");
    }

    /// Every message received within `d`.
    fn read_for(&mut self, d: Duration) -> Vec<Value> {
        let end = Instant::now() + d;
        let mut out = Vec::new();
        while Instant::now() < end {
            match self.ws.read() {
                Ok(tokio_tungstenite::tungstenite::Message::Text(t)) => {
                    if let Ok(Value::Array(a)) = serde_json::from_str::<Value>(&t) {
                        out.extend(a);
                    }
                }
                Ok(_) => {}
                Err(tokio_tungstenite::tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("websocket: {e}"),
            }
        }
        out
    }

    fn meta(&mut self, m: Value) -> Value {
        let channel = m["channel"].clone();
        self.send(m);
        self.read_for(Duration::from_millis(500))
            .into_iter()
            .find(|r| r["channel"] == channel)
            .unwrap_or_else(|| panic!("no answer on {channel}"))
    }
}

/// Applications see device data as it is processed (§2.1): persistent and transient data are
/// notified, quiescent and CEP data are not; alarms and operations too; a handshake without
/// valid credentials is refused.
#[test]
fn realtime_notifications_follow_the_processing_modes() {
    let node = Node::start_secure();
    let tid = tenant(&node, &["rt1"]);
    let admin = format!("{tid}/admin");
    let api = Api {
        node: &node,
        user: admin.clone(),
    };
    let dev = Device::connect(&node, "rt1", &tid);
    dev.send("s/us", "100");
    let id = eventually("rt1", || {
        let (s, v) = api.call("GET", "/identity/externalIds/c8y_Serial/rt1", None);
        (s == 200)
            .then(|| v["managedObject"]["id"].as_str().map(str::to_string))
            .flatten()
    });

    let mut bad = Realtime::open(&node, None);
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{admin}:wrong"));
    let r = bad.meta(json!({"channel": "/meta/handshake", "version": "1.0",
        "ext": {"com.cumulocity.authn": {"token": token}}}));
    assert_eq!(r["successful"], false, "{r}");
    assert_eq!(r["error"], "401::Unauthorized");

    // Credentials in the handshake's ext, as the Cumulocity SDKs send them.
    let mut rt = Realtime::open(&node, None);
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{admin}:{T_ADMIN_PW}"));
    let h = rt.meta(json!({"channel": "/meta/handshake", "version": "1.0",
        "supportedConnectionTypes": ["websocket"],
        "ext": {"com.cumulocity.authn": {"token": token}}}));
    assert_eq!(h["successful"], true, "{h}");
    for sub in [
        format!("/measurements/{id}"),
        "/alarms/*".into(),
        "/operations/*".into(),
    ] {
        let r = rt.meta(json!({"channel": "/meta/subscribe", "subscription": sub,
            "clientId": h["clientId"]}));
        assert_eq!(r["successful"], true, "{r}");
    }
    let r = rt.meta(json!({"channel": "/meta/subscribe", "subscription": "/nope/*"}));
    assert_eq!(r["successful"], false);
    rt.send(
        json!({"channel": "/meta/connect", "connectionType": "websocket",
        "clientId": h["clientId"]}),
    );

    dev.send("s/us", "200,c8y_Mode,persistent,1");
    dev.send("t/us", "200,c8y_Mode,transient,2");
    dev.send("q/us", "200,c8y_Mode,quiescent,3");
    dev.send("c/us", "200,c8y_Mode,cep,4");
    dev.send("s/us", "302,c8y_Door,open");
    let op = api.post(
        "/devicecontrol/operations",
        json!({"deviceId": id, "c8y_Restart": {}}),
    );
    let got = rt.read_for(Duration::from_secs(4));
    let on = |prefix: &str| -> Vec<&Value> {
        got.iter()
            .filter(|m| m["channel"].as_str().is_some_and(|c| c.starts_with(prefix)))
            .collect()
    };
    let modes: Vec<String> = on("/measurements/")
        .iter()
        .filter_map(|m| {
            m["data"]["data"]["c8y_Mode"]
                .as_object()
                .and_then(|o| o.keys().next().cloned())
        })
        .collect();
    assert_eq!(modes, vec!["persistent", "transient"], "{got:?}");
    assert!(on("/measurements/")
        .iter()
        .all(|m| m["channel"] == format!("/measurements/{id}")
            && m["data"]["realtimeAction"] == "CREATE"));
    let alarms = on("/alarms/");
    assert_eq!(alarms.len(), 1, "{got:?}");
    assert_eq!(alarms[0]["data"]["data"]["type"], "c8y_Door");
    let ops = on("/operations/");
    assert_eq!(ops.len(), 1, "{got:?}");
    assert_eq!(ops[0]["data"]["data"]["id"], op["id"]);
    assert_eq!(ops[0]["channel"], format!("/operations/{id}"));
    // Stored: persistent and quiescent only.
    let stored = api.list(&format!(
        "/measurement/measurements?source={id}&type=c8y_Mode&pageSize=10"
    ));
    assert_eq!(stored.len(), 2, "{stored:?}");
}

/// The public Python client `c8y-api` (PyPI) works against the REST API: identity lookup,
/// inventory, measurements, events, alarms, operations, objects and external IDs
/// (`tests/c8y_api_client.py`). `.ci/run` installs the package; without it the test says so
/// and passes.
#[test]
fn the_public_python_client_works() {
    let have = std::process::Command::new("python3")
        .args(["-c", "import c8y_api"])
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        eprintln!("SKIPPED: python3 with c8y-api is not installed (pip install c8y-api)");
        return;
    }
    let node = Node::start_secure();
    let tid = tenant(&node, &["pydev"]);
    let dev = Device::connect(&node, "pydev", &tid);
    dev.send("s/us", "100,Pump,c8y_Pump\n200,c8y_T,T,1");
    let api = Api {
        node: &node,
        user: format!("{tid}/admin"),
    };
    eventually("the measurement", || {
        let id = {
            let (s, v) = api.call("GET", "/identity/externalIds/c8y_Serial/pydev", None);
            (s == 200)
                .then(|| v["managedObject"]["id"].as_str().map(str::to_string))
                .flatten()
        }?;
        (!api
            .list(&format!("/measurement/measurements?source={id}"))
            .is_empty())
        .then_some(())
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/c8y_api_client.py");
    let out = std::process::Command::new("python3")
        .args([
            script,
            &format!("http://{}", node.http),
            &tid,
            "admin",
            T_ADMIN_PW,
            "pydev",
        ])
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("OK"),
        "c8y-api failed:\n{stdout}\n{stderr}"
    );
}
