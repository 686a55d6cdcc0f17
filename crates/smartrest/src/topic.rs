//! The SmartREST topic grammar (§2.1, §2.2): `<mode>/<direction><type>[/<X-ID>][/<child>]`.

/// Processing mode, the first topic level (§2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `s/`: stored and passed to real-time processing (the default).
    Persistent,
    /// `t/`: real-time processing only, not stored.
    Transient,
    /// `q/`: stored and processed, no real-time notifications.
    Quiescent,
    /// `c/`: to real-time processing only, notifications off.
    Cep,
}

/// Who sends on the topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `u`: device to platform.
    Up,
    /// `d`: platform to device.
    Down,
    /// `e`: errors for the device.
    Error,
}

/// What the topic carries (the letters after the direction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `us` / `ds`: static templates.
    Static,
    /// `uc/<X-ID>` / `dc/<X-ID>`: a custom template collection.
    Custom(String),
    /// `ud` / `dd`: the default collection (X-ID from the ClientId).
    Default,
    /// `ut/<X-ID>` / `dt`: template collection management.
    Templates(Option<String>),
    /// `ucr` / `dcr`: bootstrap credentials.
    Credentials,
    /// `uat` / `dat`: device access token.
    Token,
    /// `ul/<X-ID>` / `dl/<X-ID>`: SmartREST 1.0.
    Legacy(String),
    /// `ol/<X-ID>`: SmartREST 1.0 operations.
    LegacyOperations(String),
    /// `e`: the error topic.
    Errors,
}

/// A parsed SmartREST topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmartTopic {
    pub mode: Mode,
    pub direction: Direction,
    pub kind: Kind,
    /// The child device's external ID (§2.3), when the topic addresses one.
    pub child: Option<String>,
}

impl SmartTopic {
    /// Parses a topic name; `None` when it is not a SmartREST topic (JSON via MQTT and
    /// free-form topics are not). Only upstream topics take the `t/ q/ c/` modes.
    pub fn parse(topic: &str) -> Option<SmartTopic> {
        let mut levels = topic.split('/');
        let mode = match levels.next()? {
            "s" => Mode::Persistent,
            "t" => Mode::Transient,
            "q" => Mode::Quiescent,
            "c" => Mode::Cep,
            _ => return None,
        };
        let code = levels.next()?;
        let rest: Vec<&str> = levels.collect();
        if rest.iter().any(|l| l.is_empty()) {
            return None;
        }
        let (direction, kind_code) = match code.split_at_checked(1)? {
            ("u", k) => (Direction::Up, k),
            ("d", k) => (Direction::Down, k),
            ("o", "l") => (Direction::Down, "ol"),
            ("e", "") => (Direction::Error, "e"),
            _ => return None,
        };
        if mode != Mode::Persistent && direction != Direction::Up {
            return None;
        }
        // Levels after the type: an X-ID where the type takes one, then at most a child.
        let takes_xid = matches!(
            (direction, kind_code),
            (_, "c") | (_, "l") | (_, "ol") | (Direction::Up, "t")
        );
        let (xid, child_levels) = if takes_xid {
            let (x, r) = rest.split_first()?;
            (Some(x.to_string()), r)
        } else {
            (None, &rest[..])
        };
        let child_allowed = direction == Direction::Up && matches!(kind_code, "s" | "c" | "d");
        let child = match child_levels {
            [] => None,
            [c] if child_allowed => Some(c.to_string()),
            _ => return None,
        };
        let kind = match (kind_code, xid) {
            ("s", None) => Kind::Static,
            ("c", Some(x)) => Kind::Custom(x),
            ("d", None) => Kind::Default,
            ("t", x) => Kind::Templates(x),
            ("cr", None) => Kind::Credentials,
            ("at", None) => Kind::Token,
            ("l", Some(x)) => Kind::Legacy(x),
            ("ol", Some(x)) => Kind::LegacyOperations(x),
            ("e", None) => Kind::Errors,
            _ => return None,
        };
        Some(SmartTopic {
            mode,
            direction,
            kind,
            child,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(t: &str) -> Option<SmartTopic> {
        SmartTopic::parse(t)
    }

    #[test]
    fn the_catalogue_topics_parse() {
        let st = p("s/us").expect("s/us");
        assert_eq!(
            (st.mode, st.direction, st.kind, st.child),
            (Mode::Persistent, Direction::Up, Kind::Static, None)
        );
        let child = p("t/us/main:device:child1").expect("child");
        assert_eq!(child.mode, Mode::Transient);
        assert_eq!(child.child.as_deref(), Some("main:device:child1"));
        let c = p("q/uc/myxid/kid").expect("custom with child");
        assert_eq!(c.kind, Kind::Custom("myxid".into()));
        assert_eq!(c.child.as_deref(), Some("kid"));
        assert_eq!(p("s/ud/kid").expect("default").kind, Kind::Default);
        assert_eq!(
            p("s/ut/xid").expect("templates").kind,
            Kind::Templates(Some("xid".into()))
        );
        assert_eq!(p("s/dt").expect("dt").kind, Kind::Templates(None));
        assert_eq!(p("s/ds").expect("ds").direction, Direction::Down);
        assert_eq!(p("s/dc/xid").expect("dc").kind, Kind::Custom("xid".into()));
        assert_eq!(p("s/ucr").expect("ucr").kind, Kind::Credentials);
        assert_eq!(p("s/dcr").expect("dcr").kind, Kind::Credentials);
        assert_eq!(p("s/uat").expect("uat").kind, Kind::Token);
        assert_eq!(p("s/e").expect("e").kind, Kind::Errors);
        assert_eq!(p("c/ul/x").expect("ul").kind, Kind::Legacy("x".into()));
        assert_eq!(
            p("s/ol/x").expect("ol").kind,
            Kind::LegacyOperations("x".into())
        );
    }

    #[test]
    fn other_topics_are_not_smartrest() {
        for t in [
            "event/events/create",
            "s",
            "s/",
            "s/xx",
            "t/ds", // downstream topics exist only under s/
            "q/e",
            "s/ds/kid", // no per-child downstream subscription
            "s/us/a/b", // one child level at most
            "s/us/",
            "s/uc", // custom needs its X-ID
            "s/ucr/x",
            "x/us",
            "s/e/x",
        ] {
            assert_eq!(p(t), None, "{t}");
        }
    }
}
