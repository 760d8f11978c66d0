//! Avro records -> JSON, walking the writer's schema beside the value (decimals need their
//! scale). The mapping, chosen for people and field maps rather than for round trips:
//! - records -> objects (field order kept), maps -> objects, arrays -> arrays, enums -> symbols;
//! - unions -> the branch's value itself (`["null", "string"]` is `null` or a string, a record in
//!   a union is that record's object), not Avro JSON's `{"type": value}` wrapper;
//! - bytes and fixed -> base64 text; float NaN / infinities -> null;
//! - logical types -> text a reader and `fields.timestamp` understand: timestamp-millis/micros/
//!   nanos -> RFC 3339 in UTC (`2024-03-01T12:00:00.000Z`), local-timestamp-* -> the same without
//!   the `Z`, date -> `2024-03-01`, time-millis/micros -> `12:00:00.000`, decimal -> its exact
//!   decimal text (`123.45`), uuid -> text, duration -> `{"months", "days", "millis"}`.

use std::collections::HashMap;

use apache_avro::schema::{InnerDecimalSchema, Name, Schema, UuidSchema};
use apache_avro::types::Value as Avro;
use base64::Engine as _;
use serde_json::{Map, Number, Value};

/// A writer schema ready to read datums: the schema, the schemas it references, and every
/// named type by its full name.
#[derive(Debug)]
pub struct AvroReader {
    schema: Schema,
    schemata: Vec<Schema>,
    names: HashMap<Name, Schema>,
}

impl AvroReader {
    /// `references`: the texts of the schemas `schema` names (Confluent's schema references).
    pub fn parse(schema: &str, references: &[String]) -> Result<Self, String> {
        let (schema, schemata) = if references.is_empty() {
            (Schema::parse_str(schema).map_err(|e| e.to_string())?, Vec::new())
        } else {
            Schema::parse_str_with_list(schema, references).map_err(|e| e.to_string())?
        };
        let mut names = HashMap::new();
        for s in std::iter::once(&schema).chain(&schemata) {
            collect_names(s, &mut names);
        }
        Ok(AvroReader { schema, schemata, names })
    }

    /// One datum (the whole payload) as JSON, read straight from the binary encoding while
    /// walking the writer's schema (no intermediate Avro value tree: this is the per-message
    /// hot path, and building the tree cost twice a JSON parse).
    pub fn read(&self, payload: &[u8]) -> Result<Value, String> {
        let mut datum = Datum { rest: payload, depth: 0 };
        let value = self.decode(&self.schema, &mut datum)?;
        if !datum.rest.is_empty() {
            return Err(format!("{} bytes left after the record: written with another schema?", datum.rest.len()));
        }
        Ok(value)
    }

    /// A JSON record (Avro's shapes: numbers for timestamps, the branch's value for unions) as
    /// a datum: what `triage produce --format avro` writes.
    pub fn write(&self, json: &Value) -> Result<Vec<u8>, String> {
        let value = Avro::try_from(json.clone()).and_then(|v| v.resolve_schemata(&self.schema, self.all())).map_err(|e| e.to_string())?;
        apache_avro::writer::datum::GenericDatumWriter::builder(&self.schema)
            .schemata(self.all())
            .and_then(|b| b.build())
            .and_then(|w| w.write_value_to_vec(value))
            .map_err(|e| e.to_string())
    }

    /// The schema and the ones it references: where its names resolve.
    fn all(&self) -> Vec<&Schema> {
        // Referenced schemas first: a name is defined before it is used.
        self.schemata.iter().chain(std::iter::once(&self.schema)).collect()
    }

    fn named<'a>(&'a self, schema: &'a Schema) -> &'a Schema {
        match schema {
            Schema::Ref { name } => self.names.get(name).unwrap_or(schema),
            other => other,
        }
    }

    fn decode(&self, schema: &Schema, datum: &mut Datum<'_>) -> Result<Value, String> {
        let b64 = |b: &[u8]| Value::String(base64::engine::general_purpose::STANDARD.encode(b));
        Ok(match self.named(schema) {
            Schema::Null => Value::Null,
            Schema::Boolean => match datum.take(1)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                other => return Err(format!("a boolean byte is {other}, not 0 or 1")),
            },
            Schema::Int => Value::from(datum.int()?),
            Schema::Long => Value::from(datum.long()?),
            Schema::Float => {
                let f = f32::from_le_bytes(datum.array::<4>()?);
                Number::from_f64(f64::from(f)).map_or(Value::Null, Value::Number)
            }
            Schema::Double => Number::from_f64(f64::from_le_bytes(datum.array::<8>()?)).map_or(Value::Null, Value::Number),
            Schema::Bytes => b64(datum.bytes()?),
            Schema::String | Schema::Uuid(UuidSchema::String) => Value::String(datum.string()?.to_owned()),
            Schema::Fixed(fixed) => b64(datum.take(fixed.size)?),
            Schema::Enum(e) => {
                let i = datum.long()?;
                let symbol = usize::try_from(i).ok().and_then(|i| e.symbols.get(i));
                Value::String(symbol.ok_or_else(|| format!("enum {} has no symbol {i}", e.name))?.clone())
            }
            Schema::Union(union) => {
                let i = datum.long()?;
                let branch = usize::try_from(i).ok().and_then(|i| union.variants().get(i));
                let branch = branch.ok_or_else(|| format!("union branch {i} does not exist"))?;
                datum.nest(|d| self.decode(branch, d))?
            }
            Schema::Record(record) => {
                let mut object = Map::with_capacity(record.fields.len());
                datum.nest(|d| {
                    for field in &record.fields {
                        object.insert(field.name.clone(), self.decode(&field.schema, d)?);
                    }
                    Ok(())
                })?;
                Value::Object(object)
            }
            Schema::Array(array) => {
                let mut items = Vec::new();
                datum.nest(|d| {
                    d.blocks(|d| {
                        items.push(self.decode(&array.items, d)?);
                        Ok(())
                    })
                })?;
                Value::Array(items)
            }
            Schema::Map(map) => {
                let mut entries = Vec::new();
                datum.nest(|d| {
                    d.blocks(|d| {
                        let key = d.string()?.to_owned();
                        entries.push((key, self.decode(&map.types, d)?));
                        Ok(())
                    })
                })?;
                // Sorted: the same record always gives the same JSON (and the same row).
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                Value::Object(entries.into_iter().collect())
            }
            Schema::Decimal(decimal) => {
                let bytes = match &decimal.inner {
                    InnerDecimalSchema::Bytes => datum.bytes()?,
                    InnerDecimalSchema::Fixed(fixed) => datum.take(fixed.size)?,
                };
                let unscaled = num_bigint::BigInt::from_signed_bytes_be(bytes);
                Value::String(decimal_text(&unscaled.to_string(), decimal.scale))
            }
            Schema::BigDecimal => {
                let mut inner = Datum { rest: datum.bytes()?, depth: datum.depth };
                let unscaled = num_bigint::BigInt::from_signed_bytes_be(inner.bytes()?);
                let scale = inner.long()?;
                Value::String(match usize::try_from(scale) {
                    Ok(scale) => decimal_text(&unscaled.to_string(), scale),
                    // A negative scale multiplies by a power of ten.
                    Err(_) => format!("{unscaled}{}", "0".repeat(scale.unsigned_abs().min(4096) as usize)),
                })
            }
            Schema::Uuid(UuidSchema::Bytes) => {
                let bytes = datum.bytes()?;
                let bytes: [u8; 16] = bytes.try_into().map_err(|_| format!("a uuid of {} bytes, not 16", bytes.len()))?;
                Value::String(uuid_text(&bytes))
            }
            Schema::Uuid(UuidSchema::Fixed(_)) => Value::String(uuid_text(&datum.array::<16>()?)),
            Schema::Date => Value::String(date_text(i64::from(datum.int()?))),
            Schema::TimeMillis => Value::String(time_text(i64::from(datum.int()?) * 1_000_000, 3)),
            Schema::TimeMicros => Value::String(time_text(datum.long()?.wrapping_mul(1_000), 6)),
            Schema::TimestampMillis => Value::String(timestamp_text(i128::from(datum.long()?) * 1_000_000, 3, true)),
            Schema::TimestampMicros => Value::String(timestamp_text(i128::from(datum.long()?) * 1_000, 6, true)),
            Schema::TimestampNanos => Value::String(timestamp_text(i128::from(datum.long()?), 9, true)),
            Schema::LocalTimestampMillis => Value::String(timestamp_text(i128::from(datum.long()?) * 1_000_000, 3, false)),
            Schema::LocalTimestampMicros => Value::String(timestamp_text(i128::from(datum.long()?) * 1_000, 6, false)),
            Schema::LocalTimestampNanos => Value::String(timestamp_text(i128::from(datum.long()?), 9, false)),
            Schema::Duration(_) => {
                let b = datum.array::<12>()?;
                let part = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
                serde_json::json!({"months": part(0), "days": part(4), "millis": part(8)})
            }
            Schema::Ref { name } => return Err(format!("the schema names {name}, which it does not define")),
        })
    }
}

/// Deeper than this, a payload is an attack or a bug (a recursive schema lets each level cost
/// one byte, and a 1 MB message would otherwise overflow the stack).
const MAX_DEPTH: u32 = 256;

/// The rest of a datum being read: every read checks the length first, so a payload cut short
/// or written with another schema is an error, never a panic or a huge allocation.
struct Datum<'a> {
    rest: &'a [u8],
    depth: u32,
}

impl<'a> Datum<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.rest.len() {
            return Err("the payload ends inside the record: cut short, or written with another schema".into());
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A zig-zag varint of at most 10 bytes.
    fn long(&mut self) -> Result<i64, String> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1)?[0];
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok((value >> 1) as i64 ^ -((value & 1) as i64));
            }
        }
        Err("a number longer than 10 bytes: not Avro".into())
    }

    fn int(&mut self) -> Result<i32, String> {
        let long = self.long()?;
        i32::try_from(long).map_err(|_| format!("{long} does not fit an int"))
    }

    fn len(&mut self) -> Result<usize, String> {
        let len = self.long()?;
        usize::try_from(len).map_err(|_| format!("a negative length ({len})"))
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let len = self.len()?;
        self.take(len)
    }

    fn string(&mut self) -> Result<&'a str, String> {
        std::str::from_utf8(self.bytes()?).map_err(|e| format!("a string that is not UTF-8: {e}"))
    }

    /// Array and map items: blocks of a count (negative: followed by the block's size in
    /// bytes) and that many items, ended by a zero count.
    fn blocks(&mut self, mut item: impl FnMut(&mut Self) -> Result<(), String>) -> Result<(), String> {
        loop {
            let count = self.long()?;
            if count == 0 {
                return Ok(());
            }
            if count < 0 {
                self.len()?;
            }
            let count = count.unsigned_abs();
            // Items of zero bytes (nulls, empty records) would let a few bytes claim billions.
            if count > self.rest.len() as u64 + 1024 {
                return Err(format!("a block of {count} items in {} bytes: not this schema", self.rest.len()));
            }
            for _ in 0..count {
                item(self)?;
            }
        }
    }

    fn nest<T>(&mut self, inner: impl FnOnce(&mut Self) -> Result<T, String>) -> Result<T, String> {
        if self.depth >= MAX_DEPTH {
            return Err(format!("nested deeper than {MAX_DEPTH} levels"));
        }
        self.depth += 1;
        let out = inner(self);
        self.depth -= 1;
        out
    }
}

// The insert stays in the arm, not in a match guard: a guard with a side effect reads as a test.
#[allow(clippy::collapsible_match)]
fn collect_names(schema: &Schema, names: &mut HashMap<Name, Schema>) {
    match schema {
        Schema::Record(r) => {
            if names.insert(r.name.clone(), schema.clone()).is_none() {
                for f in &r.fields {
                    collect_names(&f.schema, names);
                }
            }
        }
        Schema::Enum(e) => {
            names.insert(e.name.clone(), schema.clone());
        }
        Schema::Fixed(f) => {
            names.insert(f.name.clone(), schema.clone());
        }
        Schema::Array(a) => collect_names(&a.items, names),
        Schema::Map(m) => collect_names(&m.types, names),
        Schema::Union(u) => u.variants().iter().for_each(|v| collect_names(v, names)),
        _ => {}
    }
}

/// `digits` (an integer, maybe negative) with `scale` digits after the point.
fn decimal_text(digits: &str, scale: usize) -> String {
    let (sign, digits) = match digits.strip_prefix('-') {
        Some(d) => ("-", d),
        None => ("", digits),
    };
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (whole, fraction) = padded.split_at(padded.len() - scale);
    format!("{sign}{whole}.{fraction}")
}

/// The hyphenated lower-case form: 8-4-4-4-12 hex digits.
fn uuid_text(bytes: &[u8; 16]) -> String {
    let mut text = String::with_capacity(36);
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            text.push('-');
        }
        text.push_str(&format!("{b:02x}"));
    }
    text
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil(days: i64) -> (i64, u32, u32) {
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

fn date_text(days: i64) -> String {
    let (y, m, d) = civil(days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Time of day from nanoseconds after midnight, with `digits` of fraction.
fn time_text(nanos: i64, digits: u32) -> String {
    let nanos = nanos.rem_euclid(86_400 * 1_000_000_000);
    let (secs, frac) = (nanos / 1_000_000_000, nanos % 1_000_000_000);
    let fraction = frac / 10i64.pow(9 - digits);
    format!("{:02}:{:02}:{:02}.{fraction:0width$}", secs / 3600, secs / 60 % 60, secs % 60, width = digits as usize)
}

/// RFC 3339 of nanoseconds since the epoch (negative: before 1970), `digits` of fraction.
fn timestamp_text(nanos: i128, digits: u32, utc: bool) -> String {
    let day_nanos = 86_400i128 * 1_000_000_000;
    let (days, in_day) = (nanos.div_euclid(day_nanos), nanos.rem_euclid(day_nanos));
    format!("{}T{}{}", date_text(days as i64), time_text(in_day as i64, digits), if utc { "Z" } else { "" })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const TICKET: &str = r#"{
        "type": "record", "name": "Ticket", "namespace": "shop",
        "fields": [
            {"name": "id", "type": "string"},
            {"name": "subject", "type": ["null", "string"], "default": null},
            {"name": "body", "type": "string"},
            {"name": "created", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "due", "type": {"type": "int", "logicalType": "date"}},
            {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}},
            {"name": "ref", "type": {"type": "string", "logicalType": "uuid"}},
            {"name": "channel", "type": {"type": "enum", "name": "Channel", "symbols": ["EMAIL", "WEB"]}},
            {"name": "tags", "type": {"type": "array", "items": "string"}},
            {"name": "attrs", "type": {"type": "map", "values": "long"}},
            {"name": "customer", "type": ["null", {"type": "record", "name": "Customer", "fields": [
                {"name": "tier", "type": "Channel"}, {"name": "since", "type": {"type": "long", "logicalType": "timestamp-micros"}}
            ]}]}
        ]}"#;

    #[test]
    fn a_record_with_unions_logical_types_and_nesting_reads_as_plain_json() {
        let reader = AvroReader::parse(TICKET, &[]).unwrap();
        let value = Avro::Record(vec![
            ("id".into(), Avro::String("T-1".into())),
            ("subject".into(), Avro::Union(1, Box::new(Avro::String("Refund".into())))),
            ("body".into(), Avro::String("where is my money".into())),
            ("created".into(), Avro::TimestampMillis(1_709_294_400_123)),
            ("due".into(), Avro::Date(19_783)),
            ("amount".into(), Avro::Decimal(apache_avro::Decimal::from(vec![0xff, 0x85]))), // -123 -> -1.23
            ("ref".into(), Avro::Uuid("67e55044-10b1-426f-9247-bb680e5fe0c8".parse().unwrap())),
            ("channel".into(), Avro::Enum(1, "WEB".into())),
            ("tags".into(), Avro::Array(vec![Avro::String("a".into())])),
            ("attrs".into(), Avro::Map([("n".to_string(), Avro::Long(3))].into())),
            (
                "customer".into(),
                Avro::Union(
                    1,
                    Box::new(Avro::Record(vec![
                        ("tier".into(), Avro::Enum(0, "EMAIL".into())),
                        ("since".into(), Avro::TimestampMicros(-1_000_001)),
                    ])),
                ),
            ),
        ]);
        let bytes = apache_avro::writer::datum::GenericDatumWriter::builder(&reader.schema)
            .schemata(reader.all())
            .and_then(|b| b.build())
            .and_then(|w| w.write_value_to_vec(value))
            .unwrap();
        assert_eq!(
            reader.read(&bytes).unwrap(),
            json!({
                "id": "T-1", "subject": "Refund", "body": "where is my money",
                "created": "2024-03-01T12:00:00.123Z", "due": "2024-03-01", "amount": "-1.23",
                "ref": "67e55044-10b1-426f-9247-bb680e5fe0c8", "channel": "WEB", "tags": ["a"], "attrs": {"n": 3},
                "customer": {"tier": "EMAIL", "since": "1969-12-31T23:59:58.999999Z"}
            })
        );
    }

    #[test]
    fn what_produce_writes_reads_back_and_a_null_union_is_null() {
        let reader = AvroReader::parse(TICKET, &[]).unwrap();
        let record = json!({
            "id": "T-2", "subject": null, "body": "hello", "created": 0, "due": 0, "amount": "\u{1}\u{0}",
            "ref": "67e55044-10b1-426f-9247-bb680e5fe0c8", "channel": "EMAIL", "tags": [], "attrs": {}, "customer": null
        });
        let bytes = reader.write(&record).unwrap();
        let back = reader.read(&bytes).unwrap();
        assert_eq!(back["subject"], Value::Null);
        assert_eq!(back["created"], "1970-01-01T00:00:00.000Z");
        assert_eq!(back["amount"], "2.56");
        assert_eq!(back["customer"], Value::Null);
    }

    #[test]
    fn bytes_that_are_not_the_record_are_errors_not_panics() {
        let reader = AvroReader::parse(TICKET, &[]).unwrap();
        assert!(reader.read(b"").is_err());
        assert!(reader.read(&[0x02, 0x41]).is_err(), "cut short");
        let good = reader
            .write(&json!({"id": "x", "subject": null, "body": "b", "created": 1, "due": 1, "amount": "\u{1}", "ref": "67e55044-10b1-426f-9247-bb680e5fe0c8", "channel": "WEB", "tags": [], "attrs": {}, "customer": null}))
            .unwrap();
        let mut longer = good.clone();
        longer.push(0);
        assert!(reader.read(&longer).unwrap_err().contains("left after the record"));
        assert!(AvroReader::parse("{\"type\": \"record\"}", &[]).is_err());
    }

    #[test]
    fn hostile_payloads_are_errors_not_crashes_or_huge_allocations() {
        // A linked list: each level costs one byte, so depth is bounded by the reader, not the payload.
        let list = r#"{"type": "record", "name": "Node", "fields": [{"name": "next", "type": ["null", "Node"]}]}"#;
        let reader = AvroReader::parse(list, &[]).unwrap();
        let mut deep = vec![0x02; 100_000];
        deep.push(0x00);
        assert!(reader.read(&deep).unwrap_err().contains("nested deeper"));
        let mut shallow = vec![0x02; 10];
        shallow.push(0x00);
        assert_eq!(reader.read(&shallow).unwrap().to_string().matches("next").count(), 11);
        // Three bytes claiming 2^62 nulls.
        let nulls = AvroReader::parse(r#"{"type": "array", "items": "null"}"#, &[]).unwrap();
        let huge = [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        assert!(nulls.read(&huge).unwrap_err().contains("block of"));
        assert_eq!(nulls.read(&[0x06, 0x00]).unwrap(), json!([null, null, null]));
        // A negative count is followed by the block's size in bytes (writers that allow skipping).
        let ints = AvroReader::parse(r#"{"type": "array", "items": "int"}"#, &[]).unwrap();
        assert_eq!(ints.read(&[0x03, 0x04, 0x02, 0x04, 0x02, 0x06, 0x00]).unwrap(), json!([1, 2, 3]));
        // A negative length, a string that is not UTF-8, a varint that never ends.
        let text = AvroReader::parse(r#""string""#, &[]).unwrap();
        assert!(text.read(&[0x01]).unwrap_err().contains("negative length"));
        assert!(text.read(&[0x02, 0xff]).unwrap_err().contains("UTF-8"));
        assert!(text.read(&[0xff; 12]).unwrap_err().contains("10 bytes"));
        let int = AvroReader::parse(r#""int""#, &[]).unwrap();
        assert!(int.read(&[0x80, 0x80, 0x80, 0x80, 0x20]).unwrap_err().contains("does not fit"));
    }

    #[test]
    fn a_referenced_schema_is_resolved_by_name() {
        let customer = r#"{"type": "record", "name": "Customer", "namespace": "crm", "fields": [{"name": "tier", "type": "string"}]}"#;
        let order = r#"{"type": "record", "name": "Order", "fields": [{"name": "customer", "type": "crm.Customer"}, {"name": "note", "type": "string"}]}"#;
        let reader = AvroReader::parse(order, &[customer.to_string()]).unwrap();
        let bytes = reader.write(&json!({"customer": {"tier": "gold"}, "note": "n"})).unwrap();
        assert_eq!(reader.read(&bytes).unwrap(), json!({"customer": {"tier": "gold"}, "note": "n"}));
    }

    #[test]
    fn texts_of_logical_values() {
        assert_eq!(decimal_text("12345", 2), "123.45");
        assert_eq!(decimal_text("-5", 3), "-0.005");
        assert_eq!(decimal_text("7", 0), "7");
        assert_eq!(date_text(0), "1970-01-01");
        let uuid = [0x67, 0xe5, 0x50, 0x44, 0x10, 0xb1, 0x42, 0x6f, 0x92, 0x47, 0xbb, 0x68, 0x0e, 0x5f, 0xe0, 0xc8];
        assert_eq!(uuid_text(&uuid), "67e55044-10b1-426f-9247-bb680e5fe0c8");
        assert_eq!(date_text(-1), "1969-12-31");
        assert_eq!(date_text(11_016), "2000-02-29");
        assert_eq!(time_text(45_296_789_000_000, 3), "12:34:56.789");
        assert_eq!(timestamp_text(1_709_294_400_000_000_000, 3, false), "2024-03-01T12:00:00.000");
    }
}
