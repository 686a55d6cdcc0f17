//! The static upstream templates of c8y-mqtt.md §4 (what a device publishes on `s/us`): their
//! fields in order, which are mandatory, which must be numbers, and the errors a device gets on
//! `s/e` for a line that does not fit (§5.1): `40,<id>,No static template for this message id`
//! for an unknown id, `45,<id>,...` for missing or malformed arguments.

use crate::record::{encode_line, Record};

/// What a field must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Text,
    /// A decimal number (`25`, `-1.5`, `1e3`).
    Number,
    /// A whole number.
    Integer,
    /// `true` or `false` (any case).
    Bool,
}

/// One field of a template.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub name: &'static str,
    pub required: bool,
    pub ty: Type,
}

const fn m(name: &'static str) -> Field {
    Field {
        name,
        required: true,
        ty: Type::Text,
    }
}
const fn o(name: &'static str) -> Field {
    Field {
        name,
        required: false,
        ty: Type::Text,
    }
}
const fn mn(name: &'static str) -> Field {
    Field {
        name,
        required: true,
        ty: Type::Number,
    }
}
const fn on(name: &'static str) -> Field {
    Field {
        name,
        required: false,
        ty: Type::Number,
    }
}
const fn oi(name: &'static str) -> Field {
    Field {
        name,
        required: false,
        ty: Type::Integer,
    }
}
const fn ob(name: &'static str) -> Field {
    Field {
        name,
        required: false,
        ty: Type::Bool,
    }
}
const fn mb(name: &'static str) -> Field {
    Field {
        name,
        required: true,
        ty: Type::Bool,
    }
}

/// A static upstream template: fixed fields, then optionally a group repeated to the end of the
/// line (`min_groups` of them at least).
#[derive(Debug, Clone, Copy)]
pub struct Template {
    pub id: u16,
    pub name: &'static str,
    pub fields: &'static [Field],
    pub repeat: &'static [Field],
    pub min_groups: usize,
}

const fn t(id: u16, name: &'static str, fields: &'static [Field]) -> Template {
    Template {
        id,
        name,
        fields,
        repeat: &[],
        min_groups: 0,
    }
}
const fn r(
    id: u16,
    name: &'static str,
    fields: &'static [Field],
    repeat: &'static [Field],
    min_groups: usize,
) -> Template {
    Template {
        id,
        name,
        fields,
        repeat,
        min_groups,
    }
}

const ALARM: &[Field] = &[m("type"), o("text"), o("time")];
const LOCATION: &[Field] = &[
    on("latitude"),
    on("longitude"),
    on("altitude"),
    on("accuracy"),
    o("time"),
];

/// Every static upstream template (§4.1–4.6), by id.
pub const STATIC: &[Template] = &[
    t(100, "Device creation", &[o("name"), o("type")]),
    t(
        101,
        "Child device creation",
        &[m("child id"), o("name"), o("type"), ob("is device")],
    ),
    t(
        102,
        "Service creation",
        &[m("external id"), m("service type"), m("name"), m("status")],
    ),
    t(104, "Service status update", &[m("status")]),
    t(105, "Get child devices", &[]),
    r(107, "Clear device fragments", &[], &[m("fragment")], 1),
    t(
        110,
        "Configure hardware",
        &[o("serial number"), o("model"), o("revision")],
    ),
    t(
        111,
        "Configure mobile",
        &[
            o("imei"),
            o("iccid"),
            o("imsi"),
            o("mcc"),
            o("mnc"),
            o("lac"),
            o("cell id"),
        ],
    ),
    t(
        112,
        "Configure position",
        &[
            on("latitude"),
            on("longitude"),
            on("altitude"),
            oi("accuracy"),
        ],
    ),
    t(113, "Set configuration", &[o("configuration")]),
    r(114, "Set supported operations", &[], &[o("operation")], 0),
    t(115, "Set firmware", &[o("name"), o("version"), o("url")]),
    r(
        116,
        "Set software list",
        &[],
        &[o("name"), o("version"), o("url")],
        0,
    ),
    t(117, "Set required availability", &[oi("interval")]),
    r(118, "Set supported logs", &[], &[o("log type")], 0),
    r(
        119,
        "Set supported configurations",
        &[],
        &[o("configuration type")],
        0,
    ),
    t(
        120,
        "Set currently installed configuration",
        &[m("type"), m("url"), o("file name"), o("time")],
    ),
    t(
        121,
        "Set device profile being applied",
        &[mb("executed"), o("profile id")],
    ),
    t(
        122,
        "Set agent information",
        &[m("name"), m("version"), o("url"), m("maintainer")],
    ),
    t(123, "Get device managed object id", &[]),
    t(125, "Send heartbeat", &[]),
    r(
        140,
        "Set advanced software list",
        &[],
        &[m("name"), m("version"), o("type"), o("url")],
        0,
    ),
    r(
        141,
        "Append advanced software items",
        &[],
        &[m("name"), m("version"), o("type"), o("url")],
        1,
    ),
    r(
        142,
        "Remove advanced software items",
        &[],
        &[m("name"), m("version")],
        1,
    ),
    r(143, "Set supported software types", &[], &[o("type")], 0),
    r(
        150,
        "Set supported remote access protocols",
        &[],
        &[o("protocol")],
        0,
    ),
    t(
        200,
        "Custom measurement",
        &[
            m("fragment"),
            m("series"),
            mn("value"),
            o("unit"),
            o("time"),
        ],
    ),
    r(
        201,
        "Measurement with multiple fragments and series",
        &[m("type"), o("time")],
        &[m("fragment"), m("series"), mn("value"), o("unit")],
        1,
    ),
    t(210, "Signal strength", &[on("rssi"), on("ber"), o("time")]),
    t(211, "Temperature", &[mn("value"), o("time")]),
    t(212, "Battery", &[mn("value"), o("time")]),
    t(301, "CRITICAL alarm", ALARM),
    t(302, "MAJOR alarm", ALARM),
    t(303, "MINOR alarm", ALARM),
    t(304, "WARNING alarm", ALARM),
    t(305, "Update severity", &[m("type"), m("severity")]),
    t(306, "Clear alarm", &[m("type")]),
    r(
        307,
        "Clear alarm fragments",
        &[m("type")],
        &[m("fragment")],
        1,
    ),
    t(400, "Basic event", &[m("type"), m("text"), o("time")]),
    t(401, "Location update", LOCATION),
    t(402, "Location update and device update", LOCATION),
    r(
        407,
        "Clear event fragments",
        &[m("type")],
        &[o("fragment")],
        0,
    ),
    r(
        408,
        "Device parameter update events",
        &[o("text"), o("time"), ob("change detect")],
        &[m("path"), m("type"), o("value")],
        1,
    ),
    t(500, "Get PENDING operations", &[]),
    t(501, "Set operation to EXECUTING", &[m("fragment")]),
    t(
        502,
        "Set operation to FAILED",
        &[m("fragment"), o("failure reason")],
    ),
    r(
        503,
        "Set operation to SUCCESSFUL",
        &[m("fragment")],
        &[o("parameter")],
        0,
    ),
    t(
        504,
        "Set operation to EXECUTING by id",
        &[m("operation id")],
    ),
    t(
        505,
        "Set operation to FAILED by id",
        &[m("operation id"), o("failure reason")],
    ),
    r(
        506,
        "Set operation to SUCCESSFUL by id",
        &[m("operation id")],
        &[o("parameter")],
        0,
    ),
    t(
        507,
        "Set EXECUTING operations to FAILED",
        &[o("fragment"), o("failure reason")],
    ),
    t(600, "Get platform version", &[]),
    t(602, "Get valid template ids", &[]),
];

/// A line refused, as it goes to the device on `s/e`: `<code>,<template>,<text>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmartError {
    pub code: u16,
    pub template: String,
    pub text: String,
}

impl SmartError {
    /// The `s/e` line.
    pub fn line(&self) -> String {
        encode_line(&[self.code.to_string().as_str(), &self.template, &self.text])
    }

    fn args(template: &str, text: impl Into<String>) -> SmartError {
        SmartError {
            code: 45,
            template: template.to_string(),
            text: text.into(),
        }
    }
}

/// The static template of an id, if there is one.
pub fn lookup(id: &str) -> Option<&'static Template> {
    let n: u16 = id.parse().ok()?;
    STATIC.iter().find(|t| t.id == n)
}

/// Checks a record against its static template: the template, or the `s/e` error.
pub fn check(record: &Record) -> Result<&'static Template, SmartError> {
    let id = record.template();
    let Some(t) = lookup(id) else {
        return Err(SmartError {
            code: 40,
            template: id.to_string(),
            text: "No static template for this message id".into(),
        });
    };
    let args = record.args();
    let fixed = t.fields.len();
    if t.repeat.is_empty() && args.len() > fixed && args[fixed..].iter().any(|a| !a.is_empty()) {
        return Err(SmartError::args(id, "Wrong number of arguments"));
    }
    for (i, f) in t.fields.iter().enumerate() {
        value_ok(id, f, args.get(i).map(String::as_str))?;
    }
    if t.id == 210 && record.arg(0).is_none() && record.arg(1).is_none() {
        return Err(SmartError::args(
            id,
            "Mandatory field rssi or ber is missing",
        ));
    }
    if !t.repeat.is_empty() {
        let rest = args.get(fixed..).unwrap_or(&[]);
        // Trailing empty fields may be left out, so the last group may be short.
        let groups: Vec<&[String]> = rest.chunks(t.repeat.len()).collect();
        let groups: Vec<&[String]> = groups
            .into_iter()
            .filter(|g| g.iter().any(|v| !v.is_empty()))
            .collect();
        if groups.len() < t.min_groups {
            return Err(SmartError::args(id, "Wrong number of arguments"));
        }
        for g in groups {
            for (i, f) in t.repeat.iter().enumerate() {
                value_ok(id, f, g.get(i).map(String::as_str))?;
            }
        }
    }
    Ok(t)
}

fn value_ok(id: &str, f: &Field, v: Option<&str>) -> Result<(), SmartError> {
    let v = v.filter(|s| !s.is_empty());
    let Some(v) = v else {
        return if f.required {
            Err(SmartError::args(
                id,
                format!("Mandatory field {} is missing", f.name),
            ))
        } else {
            Ok(())
        };
    };
    let ok = match f.ty {
        Type::Text => true,
        Type::Number => v.trim().parse::<f64>().is_ok_and(f64::is_finite),
        Type::Integer => v.trim().parse::<i64>().is_ok(),
        Type::Bool => v.eq_ignore_ascii_case("true") || v.eq_ignore_ascii_case("false"),
    };
    if ok {
        Ok(())
    } else {
        let ty = match f.ty {
            Type::Number => "NUMBER",
            Type::Integer => "INTEGER",
            Type::Bool => "BOOLEAN",
            Type::Text => "STRING",
        };
        Err(SmartError::args(id, format!("Value is not a {ty}: {v}")))
    }
}

/// The downstream template ids fleetmq sends on `s/ds` (§4.7).
pub const DOWNSTREAM_IDS: &[u16] = &[
    106, 124, 510, 511, 513, 515, 516, 517, 518, 519, 520, 521, 522, 523, 524, 525, 526, 527, 528,
    529, 530, 531, 601, 603,
];

/// Every valid static template id, up and down, in order (the `603` answer to `602`).
pub fn all_ids() -> Vec<u16> {
    let mut ids: Vec<u16> = STATIC.iter().map(|t| t.id).collect();
    ids.extend_from_slice(DOWNSTREAM_IDS);
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::parse_records;

    fn chk(line: &str) -> Result<u16, String> {
        let r = parse_records(line).expect("parses").remove(0);
        check(&r).map(|t| t.id).map_err(|e| e.line())
    }

    #[test]
    fn every_documented_upstream_id_is_known_once() {
        let ids: Vec<u16> = STATIC.iter().map(|t| t.id).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len(), "duplicate ids");
        for id in [
            100, 101, 102, 104, 105, 107, 110, 114, 117, 121, 122, 123, 125, 140, 150, 200, 201,
            210, 211, 212, 301, 304, 307, 400, 401, 402, 407, 408, 500, 503, 507, 600, 602,
        ] {
            assert!(lookup(&id.to_string()).is_some(), "{id}");
        }
        // Downstream-only ids are not upstream templates.
        for id in ["106", "124", "510", "601", "603", "999", "abc", ""] {
            assert!(lookup(id).is_none(), "{id}");
        }
    }

    #[test]
    fn good_lines_pass() {
        for line in [
            "100",
            "100,,",
            "100,My Device,c8y_MQTTDevice",
            "101,child-1,Child,c8y_MQTTChildDevice,false",
            "110,S123,M1,1.0",
            "114,c8y_Restart,c8y_Configuration",
            "114",
            "200,c8y_Temperature,T,25,C",
            "200,c8y_Temperature,T,-1.5e1",
            "201,KPI,2024-01-01T00:00:00Z,c8y_T,T,25,C,c8y_H,H,60",
            "210,-90",
            "210,,5",
            "211,25",
            "301,c8y_TemperatureAlarm",
            "307,c8y_A,frag1,frag2",
            "400,c8y_MyEvent,Something was triggered",
            "408,,,true,c8y_Relay.left,BOOLEAN,true,c8y_Relay.right,BOOLEAN",
            "503,c8y_Restart",
            "506,1234,a,b",
        ] {
            assert!(chk(line).is_ok(), "{line}: {:?}", chk(line));
        }
    }

    #[test]
    fn bad_lines_get_their_s_e_answer() {
        assert_eq!(
            chk("999,x"),
            Err("40,999,No static template for this message id".into())
        );
        assert_eq!(
            chk("301"),
            Err("45,301,Mandatory field type is missing".into())
        );
        assert_eq!(
            chk("211,warm"),
            Err("45,211,Value is not a NUMBER: warm".into())
        );
        assert_eq!(
            chk("200,c8y_T,T"),
            Err("45,200,Mandatory field value is missing".into())
        );
        assert_eq!(
            chk("210,,,2024-01-01T00:00:00Z"),
            Err("45,210,Mandatory field rssi or ber is missing".into())
        );
        assert_eq!(
            chk("201,KPI,,c8y_T,T"),
            Err("45,201,Mandatory field value is missing".into())
        );
        assert_eq!(
            chk("307,c8y_A"),
            Err("45,307,Wrong number of arguments".into())
        );
        assert_eq!(
            chk("211,25,now,extra"),
            Err("45,211,Wrong number of arguments".into())
        );
        assert_eq!(
            chk("101,kid,,,maybe"),
            Err("45,101,Value is not a BOOLEAN: maybe".into())
        );
    }
}
