//! Records: one line of comma-separated values each, several per payload (§3.1).
//!
//! Quoting (§3.2): a value containing `"`, `,`, a line break, a tab or leading/trailing
//! whitespace is quoted with `"`. Inside quotes the sources disagree on how a quote is
//! escaped — the current docs write `\"`, older docs and thin-edge write `""` — so both are
//! accepted. `\"` right before a field end is read as a backslash ending the value (what an
//! RFC 4180 writer sends for a value ending in `\`), not as an escaped quote. A line break inside quotes belongs to the value; the two characters `\n` are not
//! a line break. Downstream lines are written in the documented backslash style, and values
//! are quoted only where they must be.

/// One record: its fields as sent, the template (message) id first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub fields: Vec<String>,
    /// 1-based line of the payload the record starts on (for error messages).
    pub line: usize,
}

impl Record {
    /// The template / message id (the first field; `""` for an empty record).
    pub fn template(&self) -> &str {
        self.fields.first().map(String::as_str).unwrap_or("")
    }

    /// Field `i` after the template id (0-based), `None` when missing or empty: trailing empty
    /// fields may be left out (`100,,` is `100`), and optional ones may be empty.
    pub fn arg(&self, i: usize) -> Option<&str> {
        self.fields
            .get(i + 1)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    /// The values after the template id.
    pub fn args(&self) -> &[String] {
        self.fields.get(1..).unwrap_or(&[])
    }
}

/// What makes a payload unreadable as SmartREST records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// A quoted value is not closed before the payload ends.
    #[error("line {line}: a quoted value is not closed")]
    UnterminatedQuote { line: usize },
    /// Something other than `,` or a line break follows a closing quote.
    #[error("line {line}: unexpected character after a closing quote")]
    TextAfterQuote { line: usize },
}

/// Splits a payload into records. Blank lines are skipped; `\r\n` line ends are accepted; the
/// last line may lack its line break.
pub fn parse_records(payload: &str) -> Result<Vec<Record>, RecordError> {
    let mut out = Vec::new();
    let mut fields: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut line = 1usize;
    let mut start_line = 1usize;
    // Whether the current field was quoted (then an empty one still counts as a field).
    let mut quoted = false;
    let mut chars = payload.chars().peekable();
    let end_record =
        |fields: &mut Vec<String>, field: &mut String, out: &mut Vec<Record>, start: usize| {
            fields.push(std::mem::take(field));
            let f = std::mem::take(fields);
            // A blank line is no record.
            if !(f.len() == 1 && f[0].is_empty()) {
                out.push(Record {
                    fields: f,
                    line: start,
                });
            }
        };
    while let Some(c) = chars.next() {
        match c {
            '"' if field.is_empty() && !quoted => {
                quoted = true;
                let open_line = line;
                loop {
                    match chars.next() {
                        None => return Err(RecordError::UnterminatedQuote { line: open_line }),
                        // `\"` is an escaped quote, unless that quote ends the value (a
                        // field end follows it): then the backslash is the value's last
                        // character, as an RFC 4180 writer sends `"C:\"`.
                        Some('\\') if chars.peek() == Some(&'"') => {
                            let mut ahead = chars.clone();
                            ahead.next();
                            if matches!(ahead.peek(), None | Some(',') | Some('\n') | Some('\r')) {
                                field.push('\\');
                            } else {
                                chars.next();
                                field.push('"');
                            }
                        }
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            field.push('"');
                        }
                        Some('"') => break,
                        Some(ch) => {
                            if ch == '\n' {
                                line += 1;
                            }
                            field.push(ch);
                        }
                    }
                }
                // Only a separator, a line end or the end may follow.
                match chars.peek() {
                    None | Some(',') | Some('\n') => {}
                    Some('\r') => {}
                    Some(_) => return Err(RecordError::TextAfterQuote { line }),
                }
            }
            ',' => {
                fields.push(std::mem::take(&mut field));
                quoted = false;
            }
            '\r' if chars.peek() == Some(&'\n') || chars.peek().is_none() => {}
            '\n' => {
                end_record(&mut fields, &mut field, &mut out, start_line);
                quoted = false;
                line += 1;
                start_line = line;
            }
            other => field.push(other),
        }
    }
    if !fields.is_empty() || !field.is_empty() || quoted {
        end_record(&mut fields, &mut field, &mut out, start_line);
    }
    Ok(out)
}

/// Writes one record (no line break), quoting a value only where §3.2 requires it and escaping
/// a quote inside as `\"` (as `""` right before a `,`, a line break or the value's end, where
/// `\"` would be ambiguous). A value with a backslash right before a quote cannot be written
/// unambiguously in the backslash style; such values do not occur in the templates.
pub fn encode_line<S: AsRef<str>>(fields: &[S]) -> String {
    let mut out = String::new();
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let f = f.as_ref();
        let needs = f.contains(['"', ',', '\n', '\r', '\t'])
            || f.starts_with(char::is_whitespace)
            || f.ends_with(char::is_whitespace);
        if needs {
            out.push('"');
            let mut chars = f.chars().peekable();
            while let Some(ch) = chars.next() {
                if ch == '"' {
                    // `\"` before a field end would read as a backslash ending the value
                    // (see `parse_records`): there the quote is doubled instead.
                    let at_end = matches!(chars.peek(), None | Some(',') | Some('\n') | Some('\r'));
                    out.push(if at_end { '"' } else { '\\' });
                }
                out.push(ch);
            }
            out.push('"');
        } else {
            out.push_str(f);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(payload: &str) -> Vec<Vec<String>> {
        parse_records(payload)
            .expect("parses")
            .into_iter()
            .map(|r| r.fields)
            .collect()
    }

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn several_records_per_payload_with_or_without_final_line_break() {
        assert_eq!(
            fields("200,c8y_Temperature,T,25\n400,c8y_MyEvent,Something\n"),
            vec![
                v(&["200", "c8y_Temperature", "T", "25"]),
                v(&["400", "c8y_MyEvent", "Something"])
            ]
        );
        assert_eq!(fields("500"), vec![v(&["500"])]);
        assert_eq!(
            fields("100\r\n114,a,b\r\n"),
            vec![v(&["100"]), v(&["114", "a", "b"])]
        );
        assert_eq!(fields("\n\n110,1\n\n"), vec![v(&["110", "1"])]);
        assert!(fields("").is_empty());
    }

    #[test]
    fn both_quote_escapes_are_read() {
        // The current docs' example (backslash), and thin-edge's RFC 4180 doubling.
        assert_eq!(
            fields("511,myDeviceSerial,\"execute this\nand this\nand \\\"this\\\"\""),
            vec![v(&[
                "511",
                "myDeviceSerial",
                "execute this\nand this\nand \"this\""
            ])]
        );
        assert_eq!(
            fields("304,temperature_alarm,\"External \"\"sensor\"\" raised alarm\""),
            vec![v(&[
                "304",
                "temperature_alarm",
                "External \"sensor\" raised alarm"
            ])]
        );
        // A comma and a line break inside quotes belong to the value; `\n` as two characters
        // stays two characters.
        assert_eq!(
            fields("101,\"test;device\",\"a,b\"\n400,x,a\\nb"),
            vec![v(&["101", "test;device", "a,b"]), v(&["400", "x", "a\\nb"])]
        );
        let r = parse_records("402,\"multi\nline\"\n400,x").expect("parses");
        assert_eq!(r[0].line, 1);
        assert_eq!(r[1].line, 3, "the record after a quoted line break");
    }

    #[test]
    fn empty_and_missing_optional_fields() {
        let r = &parse_records("100,,").expect("parses")[0];
        assert_eq!(r.template(), "100");
        assert_eq!(r.arg(0), None);
        assert_eq!(r.arg(1), None);
        assert_eq!(r.arg(5), None);
        let r = &parse_records("100,\"\",type").expect("parses")[0];
        assert_eq!(r.arg(0), None);
        assert_eq!(r.arg(1), Some("type"));
        assert_eq!(r.args(), &v(&["", "type"])[..]);
    }

    #[test]
    fn malformed_quotes_are_errors_with_their_line() {
        assert_eq!(
            parse_records("100\n400,\"open"),
            Err(RecordError::UnterminatedQuote { line: 2 })
        );
        assert_eq!(
            parse_records("400,\"a\"b"),
            Err(RecordError::TextAfterQuote { line: 1 })
        );
        // A backslash ending a quoted value (an RFC 4180 writer's `"C:\"`).
        assert_eq!(
            fields("400,\"C:\\\",x\n400,\"D:\\\""),
            vec![v(&["400", "C:\\", "x"]), v(&["400", "D:\\"])]
        );
        // A quote that does not start a value is part of it.
        assert_eq!(fields("400,a\"b"), vec![v(&["400", "a\"b"])]);
    }

    #[test]
    fn lines_are_written_in_the_backslash_style_and_quoted_only_where_needed() {
        assert_eq!(encode_line(&["510", "serial"]), "510,serial");
        assert_eq!(
            encode_line(&["511", "dev", "say \"hi\" twice"]),
            "511,dev,\"say \\\"hi\\\" twice\""
        );
        // Before a comma (or at the end) a quote is doubled: `\"` there would be ambiguous.
        assert_eq!(
            encode_line(&["511", "dev", "say \"hi\", twice"]),
            "511,dev,\"say \\\"hi\"\", twice\""
        );
        let back = parse_records(&encode_line(&[
            "511",
            "dev",
            "say \"hi\", twice",
            "\"end\"",
        ]))
        .expect("parses");
        assert_eq!(
            back[0].fields,
            v(&["511", "dev", "say \"hi\", twice", "\"end\""])
        );
        assert_eq!(
            encode_line(&["511", "dev", " padded"]),
            "511,dev,\" padded\""
        );
        assert_eq!(
            encode_line(&["511", "dev", "two\nlines"]),
            "511,dev,\"two\nlines\""
        );
        assert_eq!(encode_line::<&str>(&[]), "");
    }
}
