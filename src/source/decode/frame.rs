//! Confluent's wire format: what Confluent's serializers (and Apicurio's, Redpanda's, Karapace's
//! clients in their compatible mode) put before the payload. Byte 0 is the magic 0, bytes 1-4 the
//! schema id (big-endian), and for Protobuf the message-index path into the schema's file (a
//! zig-zag varint count, then that many zig-zag varint indexes; a lone 0 byte means [0], the
//! file's first message). Pure: tested on bytes alone.

/// The framing of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    pub schema_id: u32,
    /// Protobuf only: which message of the schema's file (top level, then nested), e.g. [0].
    pub message_indexes: Vec<usize>,
    pub payload: &'a [u8],
}

/// Why bytes are not framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("no Confluent framing: the message does not start with the magic byte 0 ({0})")]
    NoMagic(String),
    #[error("the message ends inside its framing ({0} bytes)")]
    Short(usize),
    #[error("bad Protobuf message-index list: {0}")]
    BadIndexes(String),
}

/// Largest message-index path taken: deeper is a corrupt frame, not a real schema.
const MAX_INDEXES: usize = 64;

/// Split a framed message. `protobuf`: a message-index list follows the schema id.
pub fn parse(bytes: &[u8], protobuf: bool) -> Result<Frame<'_>, FrameError> {
    match bytes.first() {
        None => return Err(FrameError::Short(0)),
        Some(0) => {}
        Some(b) => return Err(FrameError::NoMagic(format!("first byte {b:#04x}"))),
    }
    if bytes.len() < 5 {
        return Err(FrameError::Short(bytes.len()));
    }
    let schema_id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let mut rest = &bytes[5..];
    let mut message_indexes = Vec::new();
    if protobuf {
        let count = zigzag(read_varint(&mut rest)?);
        if count < 0 || count as usize > MAX_INDEXES {
            return Err(FrameError::BadIndexes(format!("{count} indexes")));
        }
        if count == 0 {
            message_indexes.push(0);
        }
        for _ in 0..count {
            let index = zigzag(read_varint(&mut rest)?);
            if index < 0 {
                return Err(FrameError::BadIndexes(format!("negative index {index}")));
            }
            message_indexes.push(index as usize);
        }
    }
    Ok(Frame { schema_id, message_indexes, payload: rest })
}

/// Confluent's framing of `payload` (what `triage produce` writes).
pub fn write(schema_id: u32, message_indexes: Option<&[usize]>, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.push(0);
    out.extend_from_slice(&schema_id.to_be_bytes());
    if let Some(indexes) = message_indexes {
        if indexes == [0] {
            out.push(0);
        } else {
            write_varint(&mut out, unzigzag(indexes.len() as i64));
            for &i in indexes {
                write_varint(&mut out, unzigzag(i as i64));
            }
        }
    }
    out.extend_from_slice(payload);
    out
}

fn read_varint(bytes: &mut &[u8]) -> Result<u64, FrameError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first().ok_or(FrameError::BadIndexes("the list ends early".into()))?;
        *bytes = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(FrameError::BadIndexes("a varint longer than 10 bytes".into()))
}

fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn zigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn unzigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn an_avro_frame_is_magic_id_payload() {
        let f = parse(&[0, 0, 0, 1, 2, 0xaa, 0xbb], false).unwrap();
        assert_eq!((f.schema_id, f.message_indexes.as_slice(), f.payload), (258, &[][..], &[0xaa, 0xbb][..]));
    }

    #[test]
    fn protobuf_indexes_follow_the_id_and_a_lone_zero_means_the_first_message() {
        let first = parse(&[0, 0, 0, 0, 7, 0, 0x08, 0x01], true).unwrap();
        assert_eq!((first.schema_id, first.message_indexes.as_slice(), first.payload), (7, &[0][..], &[0x08, 0x01][..]));
        // [1, 2]: count 2 -> zigzag 4, 1 -> 2, 2 -> 4 (Confluent's ProtobufSerializer writes these).
        let nested = parse(&[0, 0, 0, 0, 7, 4, 2, 4, 0x08], true).unwrap();
        assert_eq!(nested.message_indexes, vec![1, 2]);
        assert_eq!(nested.payload, &[0x08]);
    }

    #[test]
    fn every_malformed_frame_has_its_error() {
        assert!(matches!(parse(b"{\"json\": 1}", false), Err(FrameError::NoMagic(_))));
        assert_eq!(parse(&[], false), Err(FrameError::Short(0)));
        assert_eq!(parse(&[0, 0, 1], false), Err(FrameError::Short(3)));
        assert!(matches!(parse(&[0, 0, 0, 0, 1], true), Err(FrameError::BadIndexes(_))), "index list missing");
        assert!(matches!(parse(&[0, 0, 0, 0, 1, 3], true), Err(FrameError::BadIndexes(_))), "negative count");
        assert!(matches!(parse(&[0, 0, 0, 0, 1, 0xff, 0x01], true), Err(FrameError::BadIndexes(_))), "too many");
        assert!(matches!(parse(&[0, 0, 0, 0, 1, 2, 0x80], true), Err(FrameError::BadIndexes(_))), "cut varint");
        assert!(matches!(parse(&[0, 0, 0, 0, 1, 2, 1], true), Err(FrameError::BadIndexes(_))), "negative index");
        assert!(matches!(
            parse(&[0, 0, 0, 0, 1, 2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01], true),
            Err(FrameError::BadIndexes(_))
        ));
    }

    proptest! {
        #[test]
        fn what_is_written_parses_back(id in any::<u32>(), indexes in proptest::collection::vec(0usize..5000, 1..6), payload in proptest::collection::vec(any::<u8>(), 0..40)) {
            let bytes = write(id, Some(&indexes), &payload);
            let f = parse(&bytes, true).unwrap();
            prop_assert_eq!((f.schema_id, f.message_indexes, f.payload), (id, indexes, payload.as_slice()));
            let plain = write(id, None, &payload);
            let g = parse(&plain, false).unwrap();
            prop_assert_eq!((g.schema_id, g.payload), (id, payload.as_slice()));
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..30), protobuf in any::<bool>()) {
            let _ = parse(&bytes, protobuf);
        }
    }
}
