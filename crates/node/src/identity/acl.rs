//! Which topics are the Cumulocity device interface (reserved) and which are the tenant's
//! free-form space, and who may publish or subscribe where (§2.2, §2.4). Pure functions.
//!
//! Reserved topics never reach the tenant's subscription trie: an upstream publish goes to the
//! device-API pipeline of the publishing device, and a downstream message is delivered only to
//! the one device it is for. So a `#` subscription sees free-form topics only, and one device
//! can never read another device's `s/ds` or `s/dcr`.

use super::records::Role;

/// What a topic name is, for a PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicClass {
    /// The tenant's free-form space (MQTT Connect style): routed to matching subscriptions.
    Free,
    /// Device → platform.
    Upstream(Upstream),
    /// Platform → device: devices subscribe to these, never publish them.
    Downstream,
    /// Inside a reserved namespace (`s/`, `t/`, `q/`, `c/`, JSON API prefixes) but no topic of
    /// the device interface.
    Unknown,
}

/// The kinds of upstream topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    /// `s/us[/child]` static templates.
    Static,
    /// `s/uc/<xid>[/child]` custom templates.
    Custom,
    /// `s/ud[/child]` default collection.
    Default,
    /// `s/ut/<xid>` template collection management.
    Template,
    /// `s/ucr` bootstrap poll.
    Credentials,
    /// `s/uat` device token request.
    Token,
    /// `s/ul/<xid>` SmartREST 1.0.
    SmartRest1,
    /// `<api>/<resource>/<action>[/<id>]` JSON via MQTT.
    Json,
}

/// What a topic filter is, for a SUBSCRIBE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterClass {
    /// Goes into the tenant's trie and sees free-form publishes.
    Free,
    /// Matched only against messages addressed to this device.
    Downstream,
    /// Would read upstream or unknown reserved topics: refused.
    Forbidden,
}

const MODES: [&str; 4] = ["s", "t", "q", "c"];
const DOWNSTREAM: [&str; 9] = ["ds", "dc", "dd", "dt", "dcr", "dat", "e", "dl", "ol"];
const JSON_APIS: [(&str, &str); 4] = [
    ("measurement", "measurements"),
    ("event", "events"),
    ("alarm", "alarms"),
    ("inventory", "managedObjects"),
];

fn is_json_api(api: &str, resource: &str) -> bool {
    JSON_APIS.iter().any(|(a, r)| *a == api && *r == resource)
}

/// Classifies a topic name (no wildcards).
pub fn classify_topic(topic: &str) -> TopicClass {
    let mut levels = topic.split('/');
    let first = levels.next().unwrap_or("");
    let second = levels.next();
    let rest: Vec<&str> = levels.collect();
    if MODES.contains(&first) {
        let Some(second) = second else {
            return TopicClass::Unknown;
        };
        let persistent = first == "s";
        let up = match (second, rest.len()) {
            ("us", 0 | 1) => Some(Upstream::Static),
            ("uc", 1 | 2) => Some(Upstream::Custom),
            ("ud", 0 | 1) => Some(Upstream::Default),
            ("ul", 1 | 2) => Some(Upstream::SmartRest1),
            ("ut", 1) if persistent => Some(Upstream::Template),
            ("ucr", 0) if persistent => Some(Upstream::Credentials),
            ("uat", 0) if persistent => Some(Upstream::Token),
            _ => None,
        };
        if let Some(u) = up {
            return TopicClass::Upstream(u);
        }
        if persistent && DOWNSTREAM.contains(&second) {
            return TopicClass::Downstream;
        }
        // `t/measurement/measurements/create`: JSON via MQTT with a processing mode.
        if !persistent && rest.len() >= 2 && is_json_api(second, rest[0]) {
            return TopicClass::Upstream(Upstream::Json);
        }
        return TopicClass::Unknown;
    }
    match (first, second) {
        ("error", None) => TopicClass::Downstream,
        ("devicecontrol", Some("notifications")) if rest.is_empty() => TopicClass::Downstream,
        // The docs print update/delete topics with a leading `/` (§8).
        ("", Some(api)) if rest.len() >= 2 && is_json_api(api, rest[0]) => {
            TopicClass::Upstream(Upstream::Json)
        }
        (api, Some(resource)) if is_json_api(api, resource) => {
            if rest.is_empty() {
                TopicClass::Unknown
            } else {
                TopicClass::Upstream(Upstream::Json)
            }
        }
        _ => TopicClass::Free,
    }
}

/// Classifies a topic filter (the part after any `$share/<group>/`).
pub fn classify_filter(filter: &str) -> FilterClass {
    let mut levels = filter.split('/');
    let first = levels.next().unwrap_or("");
    let second = levels.next();
    let third = levels.next();
    if first == "s" {
        return match second {
            Some(l) if l == "#" || l == "+" || DOWNSTREAM.contains(&l) => FilterClass::Downstream,
            _ => FilterClass::Forbidden,
        };
    }
    if MODES.contains(&first) {
        // t/, q/ and c/ hold only upstream topics.
        return FilterClass::Forbidden;
    }
    match (first, second, third) {
        ("error", None, _) | ("error", Some("#"), None) => FilterClass::Downstream,
        ("devicecontrol", Some("notifications"), None) => FilterClass::Downstream,
        (api, Some(resource), _) if is_json_api(api, resource) => FilterClass::Forbidden,
        _ => FilterClass::Free,
    }
}

/// Whether a user of `role` may publish to a topic of class `class`.
pub fn may_publish(role: Role, class: TopicClass) -> bool {
    match role {
        Role::Bootstrap => class == TopicClass::Upstream(Upstream::Credentials),
        _ => matches!(class, TopicClass::Free | TopicClass::Upstream(_)),
    }
}

/// Whether a user of `role` may subscribe to `filter` (already classified as `class`).
pub fn may_subscribe(role: Role, filter: &str, class: FilterClass) -> bool {
    match role {
        Role::Bootstrap => filter == "s/dcr" || filter == "s/e",
        _ => class != FilterClass::Forbidden,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smartrest_topics() {
        use TopicClass::*;
        assert_eq!(classify_topic("s/us"), Upstream(super::Upstream::Static));
        assert_eq!(
            classify_topic("s/us/child1"),
            Upstream(super::Upstream::Static)
        );
        assert_eq!(classify_topic("t/us"), Upstream(super::Upstream::Static));
        assert_eq!(
            classify_topic("q/uc/xid/child"),
            Upstream(super::Upstream::Custom)
        );
        assert_eq!(
            classify_topic("s/ut/xid"),
            Upstream(super::Upstream::Template)
        );
        assert_eq!(classify_topic("t/ut/xid"), Unknown);
        assert_eq!(
            classify_topic("s/ucr"),
            Upstream(super::Upstream::Credentials)
        );
        assert_eq!(classify_topic("s/uat"), Upstream(super::Upstream::Token));
        assert_eq!(
            classify_topic("/event/events/update/42"),
            Upstream(super::Upstream::Json)
        );
        for d in [
            "s/ds",
            "s/dcr",
            "s/e",
            "s/dc/xid",
            "s/dat",
            "error",
            "devicecontrol/notifications",
        ] {
            assert_eq!(classify_topic(d), Downstream, "{d}");
        }
        assert_eq!(classify_topic("s/nonsense"), Unknown);
        assert_eq!(classify_topic("s"), Unknown);
    }

    #[test]
    fn json_topics_and_free_space() {
        use TopicClass::*;
        assert_eq!(
            classify_topic("measurement/measurements/create"),
            Upstream(super::Upstream::Json)
        );
        assert_eq!(
            classify_topic("c/event/events/createBulk"),
            Upstream(super::Upstream::Json)
        );
        assert_eq!(
            classify_topic("inventory/managedObjects/update/dev1"),
            Upstream(super::Upstream::Json)
        );
        for f in [
            "sensors/t1",
            "measurement/foo",
            "error/x",
            "devicecontrol/x",
            "ss/us",
            "S/us",
        ] {
            assert_eq!(classify_topic(f), Free, "{f}");
        }
    }

    #[test]
    fn filters() {
        use FilterClass::*;
        for f in [
            "s/ds",
            "s/dc/xid",
            "s/dc/#",
            "s/#",
            "s/+",
            "error",
            "devicecontrol/notifications",
        ] {
            assert_eq!(classify_filter(f), Downstream, "{f}");
        }
        for f in [
            "s/us",
            "s/ucr",
            "t/#",
            "c/us",
            "measurement/measurements/create",
            "alarm/alarms/#",
            "s",
        ] {
            assert_eq!(classify_filter(f), Forbidden, "{f}");
        }
        for f in ["#", "+/ds", "sensors/#", "measurement/+/create"] {
            assert_eq!(classify_filter(f), Free, "{f}");
        }
    }

    #[test]
    fn roles() {
        assert!(may_publish(Role::Device, classify_topic("s/us")));
        assert!(!may_publish(Role::Device, classify_topic("s/ds")));
        assert!(!may_publish(Role::Device, classify_topic("s/foo")));
        assert!(may_publish(Role::Device, classify_topic("free/topic")));
        assert!(may_publish(Role::Bootstrap, classify_topic("s/ucr")));
        assert!(!may_publish(Role::Bootstrap, classify_topic("s/us")));
        assert!(!may_publish(Role::Bootstrap, classify_topic("free/topic")));
        assert!(may_subscribe(
            Role::Bootstrap,
            "s/dcr",
            classify_filter("s/dcr")
        ));
        assert!(!may_subscribe(Role::Bootstrap, "#", classify_filter("#")));
        assert!(!may_subscribe(
            Role::Device,
            "s/us",
            classify_filter("s/us")
        ));
    }
}
