//! Topic name and topic filter validation, shared-subscription parsing and
//! the reference topic matcher (MQTT 3.1.1 §4.7, MQTT 5.0 §4.7 and §4.8).
//!
//! Everything here works on `&str`: the codec has already checked that the
//! wire bytes are well-formed UTF-8 (MQTT-1.5.3-1), so only the MQTT-level
//! rules are enforced. All checks are byte-based, which is sound because the
//! ASCII bytes `/`, `+`, `#` and NUL never occur inside a multi-byte UTF-8
//! sequence.

use thiserror::Error;

/// Prefix of a shared subscription filter (MQTT 5.0 §4.8.2).
const SHARE_PREFIX: &str = "$share/";

/// Broker-configurable limits applied on top of the protocol rules, so a
/// tenant cannot make the subscription trie arbitrarily deep or wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    /// Maximum length in bytes (the protocol maximum is 65535, the size of
    /// a UTF-8 encoded string length prefix).
    pub max_len: usize,
    /// Maximum number of `/`-separated levels (`"a/b"` has two levels).
    pub max_levels: usize,
}

impl Default for TopicLimits {
    /// The protocol's own string limit and a level limit generous enough for
    /// real deployments yet small enough to bound trie recursion depth.
    fn default() -> Self {
        TopicLimits {
            max_len: 65535,
            max_levels: 128,
        }
    }
}

/// Why a topic name, topic filter or shared subscription was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TopicError {
    /// Topic names and filters must be at least one character long
    /// (MQTT-4.7.3-1).
    #[error("topic is empty")]
    Empty,
    /// Longer than [`TopicLimits::max_len`].
    #[error("topic is {len} bytes long, the limit is {max}")]
    TooLong {
        /// Actual length in bytes.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// More levels than [`TopicLimits::max_levels`].
    #[error("topic has more than {max} levels")]
    TooManyLevels {
        /// Configured maximum.
        max: usize,
    },
    /// A topic name (PUBLISH) contains `+` or `#` (MQTT-3.3.2-2).
    #[error("wildcard character in topic name")]
    WildcardInName,
    /// A filter uses `+` or `#` other than as a whole level, or `#` other
    /// than as the last level (MQTT-4.7.1-2, MQTT-4.7.1-3).
    #[error("wildcard not occupying a whole level, or '#' not last")]
    InvalidWildcard,
    /// Contains U+0000 (MQTT-4.7.3-2).
    #[error("topic contains the NUL character")]
    NulChar,
    /// A `$share/...` filter is malformed (MQTT 5.0 §4.8.2).
    #[error("invalid shared subscription: {0}")]
    InvalidShare(&'static str),
}

/// Length and emptiness checks common to names and filters.
fn check_len(topic: &str, limits: &TopicLimits) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > limits.max_len {
        return Err(TopicError::TooLong {
            len: topic.len(),
            max: limits.max_len,
        });
    }
    Ok(())
}

/// Validates a topic name as used in PUBLISH (and the Will topic).
///
/// An empty name is rejected: the MQTT 5 "empty topic + topic alias" case is
/// resolved by the codec before a name reaches this function.
pub fn validate_topic_name(topic: &str, limits: &TopicLimits) -> Result<(), TopicError> {
    check_len(topic, limits)?;
    // One pass over the bytes: this runs for every PUBLISH, so avoid
    // separate scans for each character class.
    let mut levels = 1usize;
    for &b in topic.as_bytes() {
        match b {
            b'+' | b'#' => return Err(TopicError::WildcardInName),
            0 => return Err(TopicError::NulChar),
            b'/' => {
                levels += 1;
                if levels > limits.max_levels {
                    return Err(TopicError::TooManyLevels {
                        max: limits.max_levels,
                    });
                }
            }
            _ => {}
        }
    }
    // Covers max_levels == 0 (a misconfiguration, but must not pass).
    if levels > limits.max_levels {
        return Err(TopicError::TooManyLevels {
            max: limits.max_levels,
        });
    }
    Ok(())
}

/// Validates a topic filter as used in SUBSCRIBE / UNSUBSCRIBE.
///
/// `$share/<group>/<filter>` is accepted here as an ordinary filter (it is
/// structurally one); use [`parse_shared`] to split and check the share
/// syntax itself.
pub fn validate_topic_filter(filter: &str, limits: &TopicLimits) -> Result<(), TopicError> {
    check_len(filter, limits)?;
    check_filter_structure(filter, limits.max_levels)
}

/// Wildcard, NUL and level-count rules for a filter (length is checked by
/// the caller), so [`parse_shared`] can reuse them without length limits.
fn check_filter_structure(filter: &str, max_levels: usize) -> Result<(), TopicError> {
    let bytes = filter.as_bytes();
    let mut levels = 1usize;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            0 => return Err(TopicError::NulChar),
            b'/' => {
                levels += 1;
                if levels > max_levels {
                    return Err(TopicError::TooManyLevels { max: max_levels });
                }
            }
            b'+' | b'#' => {
                // A wildcard must be preceded by '/' or the start, and
                // followed by '/' or the end; '#' must additionally be last.
                let starts_level = i == 0 || bytes[i - 1] == b'/';
                let next = bytes.get(i + 1).copied();
                let ends_level = next.is_none() || next == Some(b'/');
                if !starts_level || !ends_level || (b == b'#' && next.is_some()) {
                    return Err(TopicError::InvalidWildcard);
                }
            }
            _ => {}
        }
    }
    if levels > max_levels {
        return Err(TopicError::TooManyLevels { max: max_levels });
    }
    Ok(())
}

/// Splits a shared subscription `$share/<group>/<filter>` into
/// `(group, filter)`.
///
/// Returns `Ok(None)` for a filter that is not shared. The group must be
/// non-empty and contain none of `/`, `+`, `#` or NUL; the inner filter must
/// be non-empty and structurally valid. Length and level limits are not
/// applied here: run [`validate_topic_filter`] on the whole filter, which
/// bounds the inner filter too.
pub fn parse_shared(filter: &str) -> Result<Option<(&str, &str)>, TopicError> {
    let Some(rest) = filter.strip_prefix(SHARE_PREFIX) else {
        return Ok(None);
    };
    // The group ends at the first '/'; without one there is no inner filter.
    let Some((group, inner)) = rest.split_once('/') else {
        return Err(TopicError::InvalidShare("missing filter after share name"));
    };
    if group.is_empty() {
        return Err(TopicError::InvalidShare("empty share name"));
    }
    if group.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(TopicError::InvalidShare("wildcard in share name"));
    }
    if group.bytes().any(|b| b == 0) {
        return Err(TopicError::NulChar);
    }
    if inner.is_empty() {
        return Err(TopicError::InvalidShare("empty filter after share name"));
    }
    check_filter_structure(inner, usize::MAX)?;
    Ok(Some((group, inner)))
}

/// Reference matcher: does `filter` match topic name `topic`?
///
/// Implements MQTT §4.7: `+` matches exactly one (possibly empty) level,
/// `#` matches the parent level and any number of child levels, and a topic
/// starting with `$` is not matched by a filter whose first level is a
/// wildcard (MQTT-4.7.2-1). The result is only meaningful for a valid
/// filter; this is the oracle the trie is tested against, so it favours
/// obviousness over speed.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') {
        let first = filter.split('/').next().unwrap_or("");
        if first == "+" || first == "#" {
            return false;
        }
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            // '#' is last in a valid filter and also matches the parent
            // level, i.e. when the topic has already ended.
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name_ok(t: &str) -> bool {
        validate_topic_name(t, &TopicLimits::default()).is_ok()
    }
    fn filter_ok(t: &str) -> bool {
        validate_topic_filter(t, &TopicLimits::default()).is_ok()
    }

    // §4.7.1.2: multi-level wildcard examples.
    #[test]
    fn spec_multi_level_wildcard() {
        let f = "sport/tennis/player1/#";
        assert!(matches(f, "sport/tennis/player1"));
        assert!(matches(f, "sport/tennis/player1/ranking"));
        assert!(matches(f, "sport/tennis/player1/score/wimbledon"));
        assert!(matches("sport/#", "sport"));
        assert!(filter_ok("sport/#"));
        assert!(filter_ok("#"));
        assert!(filter_ok("sport/tennis/#"));
        assert_eq!(
            validate_topic_filter("sport/tennis#", &TopicLimits::default()),
            Err(TopicError::InvalidWildcard)
        );
        assert_eq!(
            validate_topic_filter("sport/tennis/#/ranking", &TopicLimits::default()),
            Err(TopicError::InvalidWildcard)
        );
    }

    // §4.7.1.3: single-level wildcard examples.
    #[test]
    fn spec_single_level_wildcard() {
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(matches("sport/tennis/+", "sport/tennis/player2"));
        assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("sport/+", "sport/"));
        for f in ["+", "+/tennis/#", "sport/+/player1", "+/+", "/+"] {
            assert!(filter_ok(f), "{f}");
        }
        assert_eq!(
            validate_topic_filter("sport+", &TopicLimits::default()),
            Err(TopicError::InvalidWildcard)
        );
        assert!(!filter_ok("sport/+x"));
        assert!(!filter_ok("+#"));
        assert!(!filter_ok("#+"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
    }

    // §4.7.2: topics beginning with '$'.
    #[test]
    fn spec_dollar_topics() {
        assert!(!matches("#", "$SYS"));
        assert!(!matches("#", "$SYS/broker/clients"));
        assert!(!matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/#", "$SYS"));
        assert!(matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        // Only the first level is special.
        assert!(matches("a/+", "a/$b"));
        assert!(matches("a/#", "a/$b/c"));
        assert!(matches("#", "a$"));
    }

    // §4.7.3: topic semantics and usage.
    #[test]
    fn spec_semantics() {
        assert!(!name_ok(""));
        assert!(!filter_ok(""));
        assert_eq!(
            validate_topic_name("", &TopicLimits::default()),
            Err(TopicError::Empty)
        );
        // Case-sensitive; spaces allowed; a lone '/' is valid (two empty levels).
        assert!(!matches("ACCOUNTS", "Accounts"));
        assert!(name_ok("Accounts payable"));
        assert!(name_ok("/"));
        assert!(name_ok("/finance"));
        assert!(!matches("/finance", "finance"));
        assert!(matches("+", ""));
        assert!(matches("a//b", "a//b"));
        assert!(matches("a/+/b", "a//b"));
        assert_eq!(
            validate_topic_name("a\0b", &TopicLimits::default()),
            Err(TopicError::NulChar)
        );
        assert_eq!(
            validate_topic_filter("a/\0", &TopicLimits::default()),
            Err(TopicError::NulChar)
        );
    }

    #[test]
    fn names_reject_wildcards() {
        for t in ["+", "#", "a/+", "a/#", "a+b", "sport/tennis#"] {
            assert_eq!(
                validate_topic_name(t, &TopicLimits::default()),
                Err(TopicError::WildcardInName),
                "{t}"
            );
        }
        assert!(name_ok("$SYS/broker"));
        assert!(name_ok("ünïcödé/トピック"));
    }

    #[test]
    fn limits() {
        let l = TopicLimits {
            max_len: 5,
            max_levels: 3,
        };
        assert!(validate_topic_name("a/b/c", &l).is_ok());
        assert_eq!(
            validate_topic_name("abcdef", &l),
            Err(TopicError::TooLong { len: 6, max: 5 })
        );
        assert_eq!(
            validate_topic_name("a/b/c/", &TopicLimits { max_len: 10, ..l }),
            Err(TopicError::TooManyLevels { max: 3 })
        );
        assert_eq!(
            validate_topic_filter("+/+/+/#", &TopicLimits { max_len: 10, ..l }),
            Err(TopicError::TooManyLevels { max: 3 })
        );
        assert!(validate_topic_filter("+/+/#", &l).is_ok());
        let zero = TopicLimits {
            max_len: 10,
            max_levels: 0,
        };
        assert!(validate_topic_name("a", &zero).is_err());
        assert!(validate_topic_filter("a", &zero).is_err());
        let big = "a".repeat(65536);
        assert!(!name_ok(&big));
        assert!(name_ok(&big[..65535]));
        let deep = "a/".repeat(128);
        assert!(!name_ok(&deep)); // 129 levels
        assert!(name_ok(&deep[..deep.len() - 1])); // 128 levels
    }

    // MQTT 5.0 §4.8.2: shared subscriptions.
    #[test]
    fn shared_subscriptions() {
        assert_eq!(parse_shared("sport/#"), Ok(None));
        assert_eq!(parse_shared("$share"), Ok(None));
        assert_eq!(parse_shared("$SYS/x"), Ok(None));
        assert_eq!(
            parse_shared("$share/consumer1/sport/tennis/+"),
            Ok(Some(("consumer1", "sport/tennis/+")))
        );
        assert_eq!(
            parse_shared("$share/consumer2/sport/tennis/+"),
            Ok(Some(("consumer2", "sport/tennis/+")))
        );
        assert_eq!(parse_shared("$share/g/#"), Ok(Some(("g", "#"))));
        assert_eq!(parse_shared("$share/g//"), Ok(Some(("g", "/"))));
        assert_eq!(parse_shared("$share/g/$SYS/x"), Ok(Some(("g", "$SYS/x"))));
        for bad in [
            "$share/g",
            "$share/g/",
            "$share//x",
            "$share/",
            "$share/g+/x",
            "$share/+/x",
            "$share/#/x",
            "$share/g#/x",
        ] {
            assert!(
                matches!(parse_shared(bad), Err(TopicError::InvalidShare(_))),
                "{bad}"
            );
        }
        assert_eq!(
            parse_shared("$share/g/a/#/b"),
            Err(TopicError::InvalidWildcard)
        );
        assert_eq!(parse_shared("$share/g\0/a"), Err(TopicError::NulChar));
        assert_eq!(parse_shared("$share/g/a\0"), Err(TopicError::NulChar));
        // The whole shared filter is also a structurally valid filter.
        assert!(filter_ok("$share/g/a/+"));
    }
}
