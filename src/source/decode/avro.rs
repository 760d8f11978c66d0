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

use apache_avro::schema::{Name, Schema};
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

    /// One datum (the whole payload) as JSON.
    pub fn read(&self, payload: &[u8]) -> Result<Value, String> {
        let mut reader = Tracked { rest: payload, ran_out: false };
        let value = apache_avro::reader::datum::GenericDatumReader::builder(&self.schema)
            .writer_schemata(self.all())
            .and_then(|b| b.build())
            .and_then(|r| r.read_value(&mut reader))
            .map_err(|e| e.to_string())?;
        // apache-avro answers some reads past the end with null instead of an error.
        if reader.ran_out || !value.validate_schemata(&self.all()) {
            return Err("the payload ends inside the record: cut short, or written with another schema".into());
        }
        if !reader.rest.is_empty() {
            return Err(format!("{} bytes left after the record: written with another schema?", reader.rest.len()));
        }
        self.to_json(&value, &self.schema)
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

    fn to_json(&self, value: &Avro, schema: &Schema) -> Result<Value, String> {
        let schema = self.named(schema);
        Ok(match (value, schema) {
            (Avro::Union(i, inner), Schema::Union(union)) => {
                let branch = union.variants().get(*i as usize).ok_or_else(|| format!("union branch {i} does not exist"))?;
                self.to_json(inner, branch)?
            }
            (Avro::Union(_, inner), other) => self.to_json(inner, other)?,
            (Avro::Record(fields), Schema::Record(record)) => {
                let mut object = Map::with_capacity(fields.len());
                for (name, v) in fields {
                    let field_schema = record.fields.iter().find(|f| &f.name == name).map(|f| &f.schema).unwrap_or(schema);
                    object.insert(name.clone(), self.to_json(v, field_schema)?);
                }
                Value::Object(object)
            }
            (Avro::Array(items), Schema::Array(array)) => {
                Value::Array(items.iter().map(|v| self.to_json(v, &array.items)).collect::<Result<_, _>>()?)
            }
            (Avro::Map(entries), Schema::Map(map)) => {
                let mut keys: Vec<&String> = entries.keys().collect();
                keys.sort();
                let mut object = Map::with_capacity(entries.len());
                for k in keys {
                    object.insert(k.clone(), self.to_json(&entries[k], &map.types)?);
                }
                Value::Object(object)
            }
            (Avro::Decimal(d), Schema::Decimal(decimal)) => {
                let unscaled: num_bigint::BigInt = d.clone().into();
                Value::String(decimal_text(&unscaled.to_string(), decimal.scale))
            }
            (v, _) => plain(v)?,
        })
    }
}

/// The payload being read, noting any attempt to read past its end.
struct Tracked<'a> {
    rest: &'a [u8],
    ran_out: bool,
}

impl std::io::Read for Tracked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !buf.is_empty() && buf.len() > self.rest.len() {
            self.ran_out = true;
        }
        self.rest.read(buf)
    }
}

/// Values whose JSON does not depend on the schema.
fn plain(value: &Avro) -> Result<Value, String> {
    let b64 = |b: &[u8]| Value::String(base64::engine::general_purpose::STANDARD.encode(b));
    Ok(match value {
        Avro::Null => Value::Null,
        Avro::Boolean(b) => Value::Bool(*b),
        Avro::Int(i) => Value::from(*i),
        Avro::Long(l) => Value::from(*l),
        Avro::Float(f) => Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number),
        Avro::Double(d) => Number::from_f64(*d).map_or(Value::Null, Value::Number),
        Avro::Bytes(b) | Avro::Fixed(_, b) => b64(b),
        Avro::String(s) => Value::String(s.clone()),
        Avro::Enum(_, symbol) => Value::String(symbol.clone()),
        Avro::Union(_, inner) => plain(inner)?,
        Avro::Array(items) => Value::Array(items.iter().map(plain).collect::<Result<_, _>>()?),
        Avro::Map(entries) => {
            let mut keys: Vec<&String> = entries.keys().collect();
            keys.sort();
            Value::Object(keys.into_iter().map(|k| Ok((k.clone(), plain(&entries[k])?))).collect::<Result<_, String>>()?)
        }
        Avro::Record(fields) => Value::Object(fields.iter().map(|(k, v)| Ok((k.clone(), plain(v)?))).collect::<Result<_, String>>()?),
        Avro::Date(days) => Value::String(date_text(i64::from(*days))),
        // Without its schema's scale a decimal is its unscaled integer (the walker passes the
        // scale wherever the schema has one).
        Avro::Decimal(d) => Value::String(num_bigint::BigInt::from(d.clone()).to_string()),
        Avro::BigDecimal(d) => Value::String(d.to_string()),
        Avro::TimeMillis(ms) => Value::String(time_text(i64::from(*ms) * 1_000_000, 3)),
        Avro::TimeMicros(us) => Value::String(time_text(us * 1_000, 6)),
        Avro::TimestampMillis(ms) => Value::String(timestamp_text(i128::from(*ms) * 1_000_000, 3, true)),
        Avro::TimestampMicros(us) => Value::String(timestamp_text(i128::from(*us) * 1_000, 6, true)),
        Avro::TimestampNanos(ns) => Value::String(timestamp_text(i128::from(*ns), 9, true)),
        Avro::LocalTimestampMillis(ms) => Value::String(timestamp_text(i128::from(*ms) * 1_000_000, 3, false)),
        Avro::LocalTimestampMicros(us) => Value::String(timestamp_text(i128::from(*us) * 1_000, 6, false)),
        Avro::LocalTimestampNanos(ns) => Value::String(timestamp_text(i128::from(*ns), 9, false)),
        Avro::Duration(d) => serde_json::json!({
            "months": u32::from(d.months()),
            "days": u32::from(d.days()),
            "millis": u32::from(d.millis()),
        }),
        Avro::Uuid(u) => Value::String(u.to_string()),
    })
}

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
        assert_eq!(date_text(-1), "1969-12-31");
        assert_eq!(date_text(11_016), "2000-02-29");
        assert_eq!(time_text(45_296_789_000_000, 3), "12:34:56.789");
        assert_eq!(timestamp_text(1_709_294_400_000_000_000, 3, false), "2024-03-01T12:00:00.000");
    }
}
