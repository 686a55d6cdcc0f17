//! SmartREST 2.0 as a Cumulocity device speaks it over MQTT (`../shared/c8y-mqtt.md` §2, §3):
//! the records of a PUBLISH payload ([`record`]), operations as `s/ds` lines ([`downstream`]), the static templates and their `s/e` errors
//! ([`templates`]) and the topic grammar ([`topic`]). Plain values
//! in and out, no I/O: the node's device API builds on this.

pub mod custom;
pub mod downstream;
pub mod record;
pub mod templates;
pub mod topic;

pub use downstream::operation_lines;
pub use record::{encode_line, parse_records, Record, RecordError};
pub use templates::{check, lookup, SmartError, Template};
pub use topic::{Direction, Kind, Mode, SmartTopic};
