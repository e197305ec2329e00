//! Input rules shared by every entry point. A breach of a configured size
//! or count limit is `ResourceExhausted` naming the limit; a malformed value,
//! or a duration or timestamp out of its range, is `InvalidArgument` naming
//! the field (and the limit, when one applies).

use std::collections::BTreeMap;

use crate::config::Limits;
use crate::error::Error;

/// The last millisecond a `google.protobuf.Timestamp` may hold
/// (9999-12-31T23:59:59.999Z); an agent's time past it is not taken.
pub const LAST_TIMESTAMP_MS: u64 = 253_402_300_799_999;

/// The characters a name may hold, for messages.
pub const NAME_CHARSET: &str = "[A-Za-z0-9._:/-], starting with a letter or digit";

/// Checks a size or count against a limit.
pub fn within(field: &str, what: &str, actual: usize, limit: usize, limit_name: &str) -> Result<(), Error> {
    if actual > limit {
        return Err(Error::ResourceExhausted(format!(
            "{field}: {actual} {what} is over the limit of {limit} ({limit_name})"
        )));
    }
    Ok(())
}

/// A capability, queue or agent name: non-empty, bounded, plain.
pub fn name(field: &str, value: &str, limits: &Limits) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    within(field, "characters", value.chars().count(), limits.max_name_len, "max_name_len")?;
    let mut chars = value.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok || !value.chars().all(|c| c.is_ascii_alphanumeric() || "._:/-".contains(c)) {
        return Err(Error::invalid(field, format!("'{}' must use only {NAME_CHARSET}", truncate(value, 64))));
    }
    Ok(())
}

/// A label, selector or metadata map.
pub fn string_map(
    field: &str,
    map: &BTreeMap<String, String>,
    max_entries: usize,
    max_entries_name: &str,
    limits: &Limits,
) -> Result<(), Error> {
    within(field, "entries", map.len(), max_entries, max_entries_name)?;
    for (key, value) in map {
        let key_field = format!("{field}[{}]", truncate(key, 64));
        if key.is_empty() {
            return Err(Error::invalid(field, "keys must not be empty"));
        }
        within(&key_field, "key characters", key.chars().count(), limits.max_key_len, "max_key_len")?;
        if !key.chars().all(|c| c.is_ascii_alphanumeric() || "._:/-".contains(c)) {
            return Err(Error::invalid(key_field, format!("keys must use only {NAME_CHARSET}")));
        }
        within(&key_field, "value characters", value.chars().count(), limits.max_value_len, "max_value_len")?;
        if value.chars().any(char::is_control) {
            return Err(Error::invalid(key_field, "values must not contain control characters"));
        }
    }
    Ok(())
}

/// Free text from a client: bounded, rejected when too long.
pub fn text(field: &str, value: &str, limits: &Limits) -> Result<(), Error> {
    within(field, "characters", value.chars().count(), limits.max_message_len, "max_message_len")
}

/// Free text from an agent: truncated rather than rejected, so a long
/// error message never loses the report it belongs to.
pub fn clip(mut value: String, limits: &Limits) -> String {
    cut(&mut value, limits.max_message_len);
    value
}

/// Cuts `value` to at most `max` bytes at a character boundary, marking the
/// cut with `…`.
pub(crate) fn cut(value: &mut String, max: usize) {
    if value.len() > max {
        value.truncate(value.floor_char_boundary(max));
        value.push('…');
    }
}

/// A duration limit as people write it: in its largest whole unit (`30d`,
/// `12h`, `90s`), else as humantime spells it.
pub fn limit_text(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 || secs == 0 {
        return humantime::format_duration(d).to_string();
    }
    for (unit, size) in [("d", 24 * 3600), ("h", 3600), ("m", 60)] {
        if secs.is_multiple_of(size) {
            return format!("{}{unit}", secs / size);
        }
    }
    format!("{secs}s")
}

/// The start of `value`, at most `max` bytes, for quoting it in a message.
fn truncate(value: &str, max: usize) -> String {
    let mut quoted = value[..value.floor_char_boundary(max.min(value.len()))].to_owned();
    if quoted.len() < value.len() {
        quoted.push('…');
    }
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_reject_empty_long_and_odd_characters() {
        let limits = Limits::default();
        assert!(name("capability", "shell", &limits).is_ok());
        assert!(name("capability", "gpu.render/v2", &limits).is_ok());
        assert!(matches!(name("capability", "", &limits), Err(Error::InvalidArgument { .. })));
        assert!(matches!(name("capability", "-x", &limits), Err(Error::InvalidArgument { .. })));
        assert!(matches!(name("capability", "a b", &limits), Err(Error::InvalidArgument { .. })));
        let long = "a".repeat(limits.max_name_len + 1);
        let err = name("capability", &long, &limits).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("max_name_len"), "{err}");
    }

    #[test]
    fn maps_name_the_offending_key_and_limit() {
        let limits = Limits::default();
        let mut map = BTreeMap::new();
        map.insert("ok".to_owned(), "v".repeat(limits.max_value_len + 1));
        let err = string_map("metadata", &map, 4, "max_metadata_entries", &limits)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("metadata[ok]") && err.contains("max_value_len"), "{err}");
        let many: BTreeMap<String, String> = (0..5).map(|i| (format!("k{i}"), String::new())).collect();
        let err = string_map("metadata", &many, 4, "max_metadata_entries", &limits)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("max_metadata_entries"), "{err}");
    }

    #[test]
    fn duration_limits_are_written_in_their_largest_whole_unit() {
        use std::time::Duration;
        assert_eq!(limit_text(Duration::from_secs(365 * 24 * 3600)), "365d");
        assert_eq!(limit_text(Duration::from_secs(36 * 3600)), "36h");
        assert_eq!(limit_text(Duration::from_secs(90)), "90s");
        assert_eq!(limit_text(Duration::from_secs(120)), "2m");
        assert_eq!(limit_text(Duration::from_millis(1500)), "1s 500ms");
    }

    #[test]
    fn agent_text_is_clipped_on_a_char_boundary() {
        let limits = Limits { max_message_len: 5, ..Limits::default() };
        assert_eq!(clip("héllo world".into(), &limits), "héll…");
        assert_eq!(clip("hi".into(), &limits), "hi");
    }
}
