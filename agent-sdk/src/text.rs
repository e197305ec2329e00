//! Text helpers shared by the context and the log buffers.

/// The longest prefix of `text` of at most `max` bytes that ends at a
/// character boundary.
pub(crate) fn prefix_at_char_boundary(text: &str, max: usize) -> &str {
    &text[..text.floor_char_boundary(max)]
}

/// Cuts `text` to at most `max` bytes without splitting a character.
pub(crate) fn truncate_at_char_boundary(text: &mut String, max: usize) {
    let end = prefix_at_char_boundary(text, max).len();
    text.truncate(end);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters() {
        let mut text = "aé".to_owned();
        truncate_at_char_boundary(&mut text, 2);
        assert_eq!(text, "a");
        assert_eq!(prefix_at_char_boundary("aé", 2), "a");
        assert_eq!(prefix_at_char_boundary("aé", 3), "aé");
        let mut short = "abc".to_owned();
        truncate_at_char_boundary(&mut short, 10);
        assert_eq!(short, "abc");
    }
}
