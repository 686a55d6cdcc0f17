//! The Cumulocity ClientId: `[connectionType:]deviceIdentifier[:defaultTemplate]` (§1.4).

/// A parsed ClientId. The device identifier alone decides which session a connection is:
/// `dev1`, `d:dev1` and `d:dev1:tpl` are the same device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientId {
    pub connection_type: String,
    pub device_id: String,
    pub default_template: Option<String>,
}

/// Why a ClientId was refused (CONNACK 2 / 0x85).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientIdError {
    #[error("empty device identifier")]
    Empty,
    #[error("too many ':'-separated parts (':' is reserved)")]
    TooManyParts,
    #[error("empty part")]
    EmptyPart,
}

/// Parses a ClientId. Two parts are `d:<id>` when the first is the documented connection type
/// `d`, and otherwise the old cheat sheet's `<id>:<template>` form.
pub fn parse(raw: &str) -> Result<ClientId, ClientIdError> {
    if raw.is_empty() {
        return Err(ClientIdError::Empty);
    }
    let parts: Vec<&str> = raw.split(':').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(ClientIdError::EmptyPart);
    }
    let (connection_type, device_id, default_template) = match parts.as_slice() {
        [id] => ("d", *id, None),
        ["d", id] => ("d", *id, None),
        [id, tpl] => ("d", *id, Some(*tpl)),
        [ty, id, tpl] => (*ty, *id, Some(*tpl)),
        _ => return Err(ClientIdError::TooManyParts),
    };
    Ok(ClientId {
        connection_type: connection_type.to_string(),
        device_id: device_id.to_string(),
        default_template: default_template.map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_documented_forms_are_one_device() {
        for raw in ["dev1", "d:dev1", "d:dev1:tpl"] {
            assert_eq!(parse(raw).unwrap().device_id, "dev1", "{raw}");
        }
        assert_eq!(
            parse("d:dev1:tpl").unwrap().default_template.as_deref(),
            Some("tpl")
        );
        assert_eq!(parse("d:dev1").unwrap().default_template, None);
    }

    #[test]
    fn old_cheat_sheet_form_is_id_then_template() {
        let c = parse("1234:myDevice_10").unwrap();
        assert_eq!(c.device_id, "1234");
        assert_eq!(c.default_template.as_deref(), Some("myDevice_10"));
    }

    #[test]
    fn malformed_ids_are_refused() {
        assert_eq!(parse(""), Err(ClientIdError::Empty));
        assert_eq!(parse("d::tpl"), Err(ClientIdError::EmptyPart));
        assert_eq!(parse(":dev"), Err(ClientIdError::EmptyPart));
        assert_eq!(parse("a:b:c:d"), Err(ClientIdError::TooManyParts));
    }
}
