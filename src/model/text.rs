//! From a message's fields to token ids: template rendering, a hard cut on characters (so a
//! 1 MB body costs no more than a short one), then WordPiece/BPE tokenization with truncation.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationParams};

use super::ModelError;

/// Characters kept per token of `max_length` before tokenizing. WordPiece tokens of real text
/// average 3-6 characters, so 16 leaves ample room: a text cut here still fills `max_length`.
pub const CHARS_PER_TOKEN_BOUND: usize = 16;

/// A parsed `{field}` template, e.g. "{subject}\n{body}".
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Literal(String),
    Field(String),
}

impl Template {
    pub fn parse(template: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or_else(|| format!("template `{template}` has an unclosed `{{`"))?;
            let name = after[..close].trim();
            if name.is_empty() || name.contains('{') {
                return Err(format!("template `{template}` has an empty or nested placeholder"));
            }
            parts.push(Part::Field(name.to_string()));
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        if !parts.iter().any(|p| matches!(p, Part::Field(_))) {
            return Err(format!("template `{template}` names no field (write e.g. {{body}})"));
        }
        Ok(Template { parts })
    }

    /// Field names the template reads, in order.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(f) => Some(f.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// Render with at most `max_chars` characters. Returns the text, whether it was cut, and
    /// whether any field had text. Separators around missing fields are trimmed away, so a
    /// message with only a body renders as the body alone (the form heads are trained on).
    pub fn render<'a>(&self, lookup: impl Fn(&str) -> Option<&'a str>, max_chars: usize) -> Rendered {
        let mut text = String::new();
        let mut chars = 0usize;
        let mut cut = false;
        let mut has_text = false;
        for part in &self.parts {
            let piece = match part {
                Part::Literal(s) => s.as_str(),
                Part::Field(name) => match lookup(name) {
                    Some(v) if !v.trim().is_empty() => {
                        has_text = true;
                        v
                    }
                    _ => "",
                },
            };
            let room = max_chars.saturating_sub(chars);
            let (kept, kept_chars, was_cut) = prefix_chars(piece, room);
            text.push_str(kept);
            chars += kept_chars;
            if was_cut {
                cut = true;
                break;
            }
        }
        let trimmed = text.trim();
        if trimmed.len() != text.len() {
            text = trimmed.to_string();
        }
        Rendered { text, cut, has_text }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub text: String,
    pub cut: bool,
    pub has_text: bool,
}

/// The longest prefix of `s` with at most `max` characters: (prefix, its chars, whether cut).
pub(crate) fn prefix_chars(s: &str, max: usize) -> (&str, usize, bool) {
    match s.char_indices().nth(max) {
        Some((byte, _)) => (&s[..byte], max, true),
        None => (s, s.chars().count(), false),
    }
}

/// Token ids of one message, unpadded; batches pad them.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// The text was cut (characters or tokens) to fit `max_length`.
    pub truncated: bool,
    /// Characters of text that reached the tokenizer.
    pub chars: usize,
    /// That text: a lexical layer with character n-grams reads it.
    pub text: String,
}

impl Encoded {
    pub fn lexical_input(&self) -> super::linear::LexicalInput<'_> {
        super::linear::LexicalInput { ids: &self.ids, text: &self.text }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Tokenizer configured for one model: truncation on, padding off (the batcher pads).
#[derive(Clone)]
pub struct TextEncoder {
    tokenizer: Tokenizer,
    max_length: usize,
    max_chars: usize,
}

impl TextEncoder {
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self, ModelError> {
        if !path.is_file() {
            return Err(ModelError::MissingFile { path: path.to_path_buf(), what: "tokenizer (HF tokenizers format)" });
        }
        let mut tokenizer = Tokenizer::from_file(path).map_err(|e| ModelError::invalid(path, e.to_string()))?;
        tokenizer
            .with_truncation(Some(TruncationParams { max_length, ..Default::default() }))
            .map_err(|e| ModelError::invalid(path, e.to_string()))?;
        // Shipped tokenizer.json files often pad to a fixed 128; batches pad to their own longest.
        tokenizer.with_padding(None);
        Ok(TextEncoder { tokenizer, max_length, max_chars: max_length.saturating_mul(CHARS_PER_TOKEN_BOUND) })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The character budget applied before tokenizing.
    pub fn max_chars(&self) -> usize {
        self.max_chars
    }

    /// Tokenize already-rendered text (cut to `max_chars` if it is longer).
    pub fn encode(&self, text: &str) -> Result<Encoded, String> {
        let (kept, chars, cut) = prefix_chars(text, self.max_chars);
        self.encode_prepared(kept, chars, cut)
    }

    pub fn encode_rendered(&self, rendered: &Rendered) -> Result<Encoded, String> {
        self.encode_prepared(&rendered.text, rendered.text.chars().count(), rendered.cut)
    }

    fn encode_prepared(&self, text: &str, chars: usize, cut: bool) -> Result<Encoded, String> {
        let encoding = self.tokenizer.encode_fast(text, true).map_err(|e| e.to_string())?;
        let truncated = cut || !encoding.get_overflowing().is_empty();
        Ok(Encoded {
            ids: encoding.get_ids().to_vec(),
            type_ids: encoding.get_type_ids().to_vec(),
            truncated,
            chars,
            text: text.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> + 'a {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
    }

    #[test]
    fn renders_subject_newline_body() {
        let t = Template::parse("{subject}\n{body}").unwrap();
        let r = t.render(fields(&[("subject", "Refund"), ("body", "Where is my money?")]), 1000);
        assert_eq!(r.text, "Refund\nWhere is my money?");
        assert!(!r.cut && r.has_text);
    }

    #[test]
    fn missing_subject_renders_body_alone() {
        let t = Template::parse("{subject}\n{body}").unwrap();
        let r = t.render(fields(&[("body", "card lost")]), 1000);
        assert_eq!(r.text, "card lost");
        let none = t.render(fields(&[("subject", "  ")]), 1000);
        assert!(!none.has_text);
    }

    #[test]
    fn cuts_on_characters_not_bytes() {
        let t = Template::parse("{body}").unwrap();
        let body = "é".repeat(50);
        let r = t.render(fields(&[("body", &body)]), 10);
        assert_eq!(r.text.chars().count(), 10);
        assert!(r.cut);
    }

    #[test]
    fn template_errors_are_explained() {
        assert!(Template::parse("{subject").unwrap_err().contains("unclosed"));
        assert!(Template::parse("no fields").unwrap_err().contains("names no field"));
        assert!(Template::parse("{}").unwrap_err().contains("empty"));
        let t = Template::parse("Subject: {subject} Body: {body}").unwrap();
        assert_eq!(t.fields().collect::<Vec<_>>(), vec!["subject", "body"]);
    }

    #[test]
    fn prefix_chars_handles_boundaries() {
        assert_eq!(prefix_chars("abc", 3), ("abc", 3, false));
        assert_eq!(prefix_chars("abcd", 3), ("abc", 3, true));
        assert_eq!(prefix_chars("", 3), ("", 0, false));
        assert_eq!(prefix_chars("日本語", 2), ("日本", 2, true));
    }
}
