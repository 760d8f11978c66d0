//! Fuzz message decoding: whatever bytes a producer writes, decoding returns a message or a
//! dead-letter reason, never panics, and never renders more than the character budget.
//!     cargo +nightly fuzz run --fuzz-dir tests/fuzz decode -- -max_total_time=300
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use triage::message::{Decoder, FieldMap};
use triage::model::Template;

fn decoder() -> &'static Decoder {
    static D: OnceLock<Decoder> = OnceLock::new();
    D.get_or_init(|| {
        let mut fields = FieldMap::default();
        fields.timestamp = vec!["created_at".into(), "/meta/ts".into()];
        fields.text.insert("extra".into(), vec!["/a/b/0".into()]);
        Decoder::new(fields, Template::parse("{subject}\n{body} {extra}").expect("template"), 64 * 1024, 512)
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decoder().decode(data) {
        assert!(m.text.text.chars().count() <= 512);
        assert!(m.text.has_text);
    }
});
