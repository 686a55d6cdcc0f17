//! Operations as a SmartREST device receives them on `s/ds` (c8y-mqtt.md §4.7): the static
//! downstream line for each operation fragment that has one, `<id>,<target external ID>,...`.
//! An operation can carry several such fragments; each gives a line. Fragments without a
//! static template reach devices only as JSON or through custom templates (not here).

use serde_json::Value;

use crate::record::encode_line;

/// The `s/ds` lines for an operation (its JSON object) addressed to the device or child with
/// external ID `target`, in template-id order. Empty when no fragment has a static template.
pub fn operation_lines(target: &str, op: &Value) -> Vec<String> {
    let mut lines: Vec<(u16, Vec<String>)> = Vec::new();
    let mut add = |id: u16, fields: Vec<String>| lines.push((id, fields));
    let get = |frag: &str| op.get(frag);
    if get("c8y_Restart").is_some() {
        add(510, vec![]);
    }
    if let Some(c) = get("c8y_Command") {
        add(511, vec![text(c.get("text"))]);
    }
    if let Some(c) = get("c8y_Configuration") {
        add(513, vec![text(c.get("config"))]);
    }
    if let Some(f) = get("c8y_Firmware") {
        let patch = f.get("isPatch").and_then(Value::as_bool) == Some(true);
        let mut v = vec![
            text(f.get("name")),
            text(f.get("version")),
            text(f.get("url")),
        ];
        if patch {
            v.push(text(f.get("dependency")));
            add(525, v);
        } else {
            add(515, v);
        }
    }
    if let Some(Value::Array(list)) = get("c8y_SoftwareList") {
        let v = list
            .iter()
            .flat_map(|s| {
                [
                    text(s.get("name")),
                    text(s.get("version")),
                    text(s.get("url")),
                ]
            })
            .collect();
        add(516, v);
    }
    if let Some(m) = get("c8y_MeasurementRequestOperation") {
        add(517, vec![text(m.get("requestName"))]);
    }
    if let Some(r) = get("c8y_Relay") {
        add(518, vec![text(r.get("relayState"))]);
    }
    if let Some(Value::Array(states)) = get("c8y_RelayArray") {
        add(519, states.iter().map(|s| text(Some(s))).collect());
    }
    if let Some(u) = get("c8y_UploadConfigFile") {
        match u.get("type") {
            Some(t) => add(526, vec![text(Some(t))]),
            None => add(520, vec![]),
        }
    }
    if let Some(d) = get("c8y_DownloadConfigFile") {
        match d.get("type") {
            Some(t) => add(524, vec![text(d.get("url")), text(Some(t))]),
            None => add(521, vec![text(d.get("url"))]),
        }
    }
    if let Some(l) = get("c8y_LogfileRequest") {
        add(
            522,
            [
                "logFile",
                "dateFrom",
                "dateTo",
                "searchText",
                "maximumLines",
            ]
            .iter()
            .map(|k| text(l.get(*k)))
            .collect(),
        );
    }
    if let Some(c) = get("c8y_CommunicationMode") {
        add(523, vec![text(c.get("mode"))]);
    }
    if let Some(Value::Array(items)) = get("c8y_SoftwareUpdate") {
        let typed = items.iter().any(|i| i.get("softwareType").is_some());
        let v = items
            .iter()
            .flat_map(|i| {
                let mut f = vec![text(i.get("name")), text(i.get("version"))];
                if typed {
                    f.push(text(i.get("softwareType")));
                }
                f.push(text(i.get("url")));
                f.push(text(i.get("action")));
                f
            })
            .collect();
        add(if typed { 529 } else { 528 }, v);
    }
    if let Some(r) = get("c8y_RemoteAccessConnect") {
        add(
            530,
            vec![
                text(r.get("hostname")),
                text(r.get("port")),
                text(r.get("connectionKey")),
            ],
        );
    }
    if let Some(p) = get("c8y_DeviceProfile") {
        // 527 always; 531 too when a software item has a type (§4.7).
        let fw = p.get("firmware");
        let head = vec![
            "$FW".to_string(),
            text(fw.and_then(|f| f.get("name"))),
            text(fw.and_then(|f| f.get("version"))),
            text(fw.and_then(|f| f.get("url"))),
            text(fw.and_then(|f| f.get("isPatch"))),
            text(fw.and_then(|f| f.get("dependency"))),
            "$SW".to_string(),
        ];
        let software: Vec<&Value> = p
            .get("software")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        let conf: Vec<String> = p
            .get("configuration")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .flat_map(|c| [text(c.get("url")), text(c.get("type"))])
                    .collect()
            })
            .unwrap_or_default();
        let line = |typed: bool, head: &[String]| {
            let mut v = head.to_vec();
            for sw in &software {
                v.push(text(sw.get("name")));
                v.push(text(sw.get("version")));
                if typed {
                    v.push(text(sw.get("softwareType")));
                }
                v.push(text(sw.get("url")));
                v.push(text(sw.get("action")));
            }
            v.push("$CONF".to_string());
            v.extend(conf.iter().cloned());
            v
        };
        add(527, line(false, &head));
        if software.iter().any(|s| s.get("softwareType").is_some()) {
            add(531, line(true, &head));
        }
    }
    lines.sort_by_key(|(id, _)| *id);
    lines
        .into_iter()
        .map(|(id, fields)| {
            let mut all = vec![id.to_string(), target.to_string()];
            all.extend(fields);
            encode_line(&all)
        })
        .collect()
}

/// A JSON value as a SmartREST field: strings as they are, numbers and booleans as written,
/// absent or null as empty.
fn text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_fragments_of_the_table_become_their_lines() {
        let cases = [
            (json!({"c8y_Restart": {}}), vec!["510,dev"]),
            (
                json!({"c8y_Command": {"text": "ls -la, then \"pwd\"\nexit"}}),
                // A quote right before a line break is doubled (see `encode_line`).
                vec!["511,dev,\"ls -la, then \\\"pwd\"\"\nexit\""],
            ),
            (
                json!({"c8y_Configuration": {"config": "a=1"}}),
                vec!["513,dev,a=1"],
            ),
            (
                json!({"c8y_Firmware": {"name": "fw", "version": "1.0", "url": "http://x/fw"}}),
                vec!["515,dev,fw,1.0,http://x/fw"],
            ),
            (
                json!({"c8y_Firmware": {"name": "fw", "version": "1.1", "url": "u", "dependency": "1.0", "isPatch": true}}),
                vec!["525,dev,fw,1.1,u,1.0"],
            ),
            (
                json!({"c8y_SoftwareList": [{"name": "a", "version": "1", "url": "u1"}, {"name": "b", "version": "2", "url": ""}]}),
                vec!["516,dev,a,1,u1,b,2,"],
            ),
            (
                json!({"c8y_Relay": {"relayState": "OPEN"}}),
                vec!["518,dev,OPEN"],
            ),
            (
                json!({"c8y_RelayArray": ["OPEN", "CLOSED"]}),
                vec!["519,dev,OPEN,CLOSED"],
            ),
            (json!({"c8y_UploadConfigFile": {}}), vec!["520,dev"]),
            (
                json!({"c8y_UploadConfigFile": {"type": "ssh"}}),
                vec!["526,dev,ssh"],
            ),
            (
                json!({"c8y_DownloadConfigFile": {"url": "u"}}),
                vec!["521,dev,u"],
            ),
            (
                json!({"c8y_DownloadConfigFile": {"url": "u", "type": "ssh"}}),
                vec!["524,dev,u,ssh"],
            ),
            (
                json!({"c8y_LogfileRequest": {"logFile": "syslog", "dateFrom": "2024-01-01T00:00:00+0100", "dateTo": "2024-01-02T00:00:00+0100", "searchText": "", "maximumLines": 1000}}),
                vec!["522,dev,syslog,2024-01-01T00:00:00+0100,2024-01-02T00:00:00+0100,,1000"],
            ),
            (
                json!({"c8y_CommunicationMode": {"mode": "SMS"}}),
                vec!["523,dev,SMS"],
            ),
            (
                json!({"c8y_SoftwareUpdate": [{"name": "a", "version": "1", "url": "u", "action": "install"}]}),
                vec!["528,dev,a,1,u,install"],
            ),
            (
                json!({"c8y_SoftwareUpdate": [{"name": "a", "version": "1", "softwareType": "apt", "url": "u", "action": "delete"}]}),
                vec!["529,dev,a,1,apt,u,delete"],
            ),
            (
                json!({"c8y_RemoteAccessConnect": {"hostname": "127.0.0.1", "port": 22, "connectionKey": "k"}}),
                vec!["530,dev,127.0.0.1,22,k"],
            ),
            (json!({"c8y_Custom": {"x": 1}}), vec![]),
        ];
        for (op, want) in cases {
            assert_eq!(operation_lines("dev", &op), want, "{op}");
        }
    }

    #[test]
    fn several_fragments_give_several_lines_and_a_child_is_addressed_by_its_id() {
        let op = json!({"c8y_Restart": {}, "c8y_Command": {"text": "reboot"}, "deviceId": "42"});
        assert_eq!(
            operation_lines("main:device:child1", &op),
            vec!["510,main:device:child1", "511,main:device:child1,reboot"]
        );
    }

    #[test]
    fn a_device_profile_gives_527_and_with_typed_software_531() {
        let op = json!({"c8y_DeviceProfile": {
            "firmware": {"name": "fw", "version": "2", "url": "http://f", "isPatch": false},
            "software": [{"name": "a", "version": "1", "url": "u", "action": "install", "softwareType": "apt"}],
            "configuration": [{"url": "http://c", "type": "cfg"}]}});
        let l = operation_lines("dev", &op);
        assert_eq!(
            l,
            vec![
                "527,dev,$FW,fw,2,http://f,false,,$SW,a,1,u,install,$CONF,http://c,cfg",
                "531,dev,$FW,fw,2,http://f,false,,$SW,a,1,apt,u,install,$CONF,http://c,cfg",
            ]
        );
        let plain = json!({"c8y_DeviceProfile": {"software": [{"name": "a", "version": "1"}]}});
        assert_eq!(operation_lines("d", &plain).len(), 1);
    }

    #[test]
    fn lines_read_back_as_records() {
        let op = json!({"c8y_Command": {"text": "echo \"a, b\" \n done "}});
        let line = &operation_lines("dev", &op)[0];
        let r = crate::record::parse_records(line).expect("parses");
        assert_eq!(r[0].fields, vec!["511", "dev", "echo \"a, b\" \n done "]);
    }
}
