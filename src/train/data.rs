//! Labelled examples from CSV (with a header) or JSON lines, with every problem reported by
//! row number: bad rows are skipped with a warning, never a crash; a file that cannot be read
//! at all, or unknown columns, are errors.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Which columns make the text and the labels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Columns {
    /// (template placeholder, data column), in template order.
    pub text: Vec<(String, String)>,
    /// Single-label heads: (head name, column).
    pub labels: Vec<(String, String)>,
    /// Multi-label heads: (head name, columns whose values are its tags).
    pub multi_label: Vec<(String, Vec<String>)>,
}

impl Columns {
    /// From `--text`, `--label` and `--multi-label` entries (or a model's training record).
    pub fn parse(text: &[String], labels: &[String], multi_label: &[String]) -> Result<Columns, DataError> {
        Ok(Columns {
            text: Self::parse_text(text)?,
            labels: labels.iter().map(|l| Self::parse_label(l)).collect(),
            multi_label: multi_label.iter().map(|m| Self::parse_multi_label(m)).collect::<Result<_, _>>()?,
        })
    }

    /// `--text` entries: `column` or `placeholder=column`.
    pub fn parse_text(entries: &[String]) -> Result<Vec<(String, String)>, DataError> {
        entries
            .iter()
            .flat_map(|e| e.split(','))
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| match e.split_once('=') {
                Some((p, c)) if !p.trim().is_empty() && !c.trim().is_empty() => Ok((p.trim().to_string(), c.trim().to_string())),
                Some(_) => Err(DataError::Usage(format!("--text `{e}`: write COLUMN or PLACEHOLDER=COLUMN"))),
                None => Ok((e.to_string(), e.to_string())),
            })
            .collect()
    }

    /// `--label` entries: `column` or `head=column`.
    pub fn parse_label(entry: &str) -> (String, String) {
        match entry.split_once('=') {
            Some((h, c)) => (h.trim().to_string(), c.trim().to_string()),
            None => (entry.trim().to_string(), entry.trim().to_string()),
        }
    }

    /// `--multi-label` entries: `column` (tags separated by `|` or `;`, or a JSON array) or
    /// `head=col1,col2,...` (one tag per column, e.g. tag_1..tag_8).
    pub fn parse_multi_label(entry: &str) -> Result<(String, Vec<String>), DataError> {
        let (head, columns) = match entry.split_once('=') {
            Some((h, cols)) => (h.trim().to_string(), cols.split(',').map(|c| c.trim().to_string()).filter(|c| !c.is_empty()).collect()),
            None => (entry.trim().to_string(), vec![entry.trim().to_string()]),
        };
        if head.is_empty() || columns.is_empty() {
            return Err(DataError::Usage(format!("--multi-label `{entry}`: write COLUMN or HEAD=COL1,COL2")));
        }
        Ok((head, columns))
    }

    fn all(&self) -> impl Iterator<Item = &str> {
        self.text
            .iter()
            .map(|(_, c)| c.as_str())
            .chain(self.labels.iter().map(|(_, c)| c.as_str()))
            .chain(self.multi_label.iter().flat_map(|(_, cs)| cs.iter().map(String::as_str)))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: unknown column(s) {missing}; the file has: {available}", path.display())]
    UnknownColumns { path: PathBuf, missing: String, available: String },
    #[error("{}: {reason}", path.display())]
    Unreadable { path: PathBuf, reason: String },
    #[error("{0}")]
    Usage(String),
}

/// One usable row.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// 1-based data row (CSV: record after the header; JSONL: line).
    pub row: usize,
    /// Text field values by placeholder.
    pub fields: BTreeMap<String, String>,
    /// One per single-label head; None where the row has no label for it.
    pub labels: Vec<Option<String>>,
    /// One per multi-label head.
    pub tags: Vec<Vec<String>>,
}

impl Example {
    /// The text as the worker renders it with `template`.
    pub fn render(&self, template: &crate::model::Template, max_chars: usize) -> crate::model::Rendered {
        template.render(|f| self.fields.get(f).map(String::as_str), max_chars)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dataset {
    pub examples: Vec<Example>,
    /// Data rows seen, usable or not.
    pub rows_read: usize,
    pub warnings: Vec<String>,
}

/// Format by extension (.csv / .tsv, else JSON lines), falling back to the first character.
pub fn read(path: &Path, columns: &Columns) -> Result<Dataset, DataError> {
    let io = |e| DataError::Io { path: path.to_path_buf(), source: e };
    let file = std::fs::File::open(path).map_err(io)?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let mut reader = std::io::BufReader::new(file);
    let looks_json = reader.fill_buf().map_err(io)?.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let dataset = match ext.as_str() {
        "csv" => read_csv(path, reader, columns, b','),
        "tsv" => read_csv(path, reader, columns, b'\t'),
        "jsonl" | "ndjson" | "json" => read_jsonl(path, reader, columns),
        _ if looks_json => read_jsonl(path, reader, columns),
        _ => read_csv(path, reader, columns, b','),
    }?;
    if dataset.examples.is_empty() {
        return Err(DataError::Unreadable { path: path.to_path_buf(), reason: format!("no usable rows (of {} read)", dataset.rows_read) });
    }
    Ok(dataset)
}

/// Collects per-kind problems and reports each kind once, with the first few row numbers.
#[derive(Default)]
struct Problems(BTreeMap<String, Vec<usize>>);

impl Problems {
    fn add(&mut self, kind: &str, row: usize) {
        self.0.entry(kind.to_string()).or_default().push(row);
    }

    fn into_warnings(self) -> Vec<String> {
        self.0
            .into_iter()
            .map(|(kind, rows)| {
                let shown: Vec<String> = rows.iter().take(8).map(usize::to_string).collect();
                let more = if rows.len() > 8 { format!(" and {} more", rows.len() - 8) } else { String::new() };
                format!("{} row(s) skipped: {kind} (rows {}{more})", rows.len(), shown.join(", "))
            })
            .collect()
    }
}

fn build(row: usize, get: impl Fn(&str) -> Option<Value>, columns: &Columns, problems: &mut Problems) -> Option<Example> {
    let text_of = |v: Option<Value>| match v {
        Some(Value::String(s)) => s,
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    };
    let fields: BTreeMap<String, String> = columns.text.iter().map(|(p, c)| (p.clone(), text_of(get(c)))).collect();
    if fields.values().all(|v| v.trim().is_empty()) {
        problems.add("empty text", row);
        return None;
    }
    let labels = columns.labels.iter().map(|(_, c)| Some(text_of(get(c)).trim().to_string()).filter(|l| !l.is_empty())).collect::<Vec<_>>();
    let tags = columns
        .multi_label
        .iter()
        .map(|(_, cols)| {
            let mut tags: Vec<String> = Vec::new();
            for c in cols {
                match get(c) {
                    Some(Value::Array(items)) => tags.extend(items.into_iter().map(|v| text_of(Some(v)))),
                    other => {
                        let raw = text_of(other);
                        if cols.len() == 1 {
                            tags.extend(raw.split(['|', ';']).map(str::to_string));
                        } else {
                            tags.push(raw);
                        }
                    }
                }
            }
            let mut tags: Vec<String> = tags.into_iter().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
            tags.sort();
            tags.dedup();
            tags
        })
        .collect();
    Some(Example { row, fields, labels, tags })
}

fn read_csv(path: &Path, reader: impl std::io::Read, columns: &Columns, delimiter: u8) -> Result<Dataset, DataError> {
    let mut csv = csv::ReaderBuilder::new().delimiter(delimiter).flexible(true).from_reader(reader);
    let header: Vec<String> = csv
        .headers()
        .map_err(|e| DataError::Unreadable { path: path.to_path_buf(), reason: format!("header: {e}") })?
        .iter()
        .map(|h| h.trim().trim_start_matches('\u{feff}').to_string())
        .collect();
    let missing: Vec<&str> = columns.all().filter(|c| !header.iter().any(|h| h == c)).collect();
    if !missing.is_empty() {
        return Err(DataError::UnknownColumns { path: path.to_path_buf(), missing: missing.join(", "), available: header.join(", ") });
    }
    let index = |name: &str| header.iter().position(|h| h == name);
    let mut dataset = Dataset::default();
    let mut problems = Problems::default();
    for (i, record) in csv.records().enumerate() {
        let row = i + 1;
        dataset.rows_read += 1;
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                // A broken record (bad quoting, invalid UTF-8): skip it, say where.
                let at = e.position().map(|p| format!(" at line {}", p.line())).unwrap_or_default();
                problems.add(&format!("unparseable CSV{at}"), row);
                continue;
            }
        };
        if record.len() < header.len() {
            problems.add("missing fields (a cut-off row?)", row);
            continue;
        }
        let get = |name: &str| index(name).and_then(|i| record.get(i)).map(|v| Value::String(v.to_string()));
        if let Some(example) = build(row, get, columns, &mut problems) {
            dataset.examples.push(example);
        }
    }
    dataset.warnings = problems.into_warnings();
    Ok(dataset)
}

fn read_jsonl(path: &Path, reader: impl BufRead, columns: &Columns) -> Result<Dataset, DataError> {
    let mut dataset = Dataset::default();
    let mut problems = Problems::default();
    let mut seen_columns: std::collections::BTreeSet<String> = Default::default();
    for (i, line) in reader.split(b'\n').enumerate() {
        let row = i + 1;
        let line = line.map_err(|e| DataError::Io { path: path.to_path_buf(), source: e })?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        dataset.rows_read += 1;
        let object = match serde_json::from_slice::<Value>(&line) {
            Ok(Value::Object(o)) => o,
            Ok(_) => {
                problems.add("not a JSON object", row);
                continue;
            }
            Err(_) => {
                problems.add("invalid JSON", row);
                continue;
            }
        };
        seen_columns.extend(object.keys().cloned());
        let get = |name: &str| object.get(name).cloned();
        if let Some(example) = build(row, get, columns, &mut problems) {
            dataset.examples.push(example);
        }
    }
    // A column no row ever has is a typo, not missing data.
    let missing: Vec<&str> = columns.all().filter(|c| !seen_columns.contains(*c)).collect();
    if !missing.is_empty() && dataset.rows_read > 0 {
        return Err(DataError::UnknownColumns {
            path: path.to_path_buf(),
            missing: missing.join(", "),
            available: seen_columns.into_iter().collect::<Vec<_>>().join(", "),
        });
    }
    dataset.warnings = problems.into_warnings();
    Ok(dataset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns() -> Columns {
        Columns {
            text: Columns::parse_text(&["subject,body".into()]).unwrap(),
            labels: vec![("queue".into(), "queue".into())],
            multi_label: vec![Columns::parse_multi_label("tags=tag_1,tag_2").unwrap()],
        }
    }

    fn write(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn csv_rows_with_problems_are_skipped_and_reported_by_row() {
        let (_d, path) = write(
            "t.csv",
            "subject,body,queue,tag_1,tag_2\n\
             Refund,Where is my money,Billing,refund,\n\
             ,,Billing,x,y\n\
             Login,Cannot sign in,,auth,bug\n\
             Cut off row,no label",
        );
        let data = read(&path, &columns()).unwrap();
        assert_eq!(data.rows_read, 4);
        assert_eq!(data.examples.len(), 2);
        assert_eq!(data.examples[0].fields["body"], "Where is my money");
        assert_eq!(data.examples[0].labels, vec![Some("Billing".to_string())]);
        assert_eq!(data.examples[0].tags, vec![vec!["refund".to_string()]]);
        assert_eq!(data.examples[1].labels, vec![None], "an empty label is kept as missing");
        assert_eq!(data.examples[1].tags, vec![vec!["auth".to_string(), "bug".to_string()]]);
        let warnings = data.warnings.join("\n");
        assert!(warnings.contains("empty text (rows 2)"), "{warnings}");
        assert!(warnings.contains("missing fields (a cut-off row?) (rows 4)"), "{warnings}");
    }

    #[test]
    fn a_record_that_does_not_parse_is_skipped_with_its_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        let mut bytes = b"subject,body,queue,tag_1,tag_2\nA,fine,q,,\nB,".to_vec();
        bytes.extend_from_slice(&[0xff, 0xfe]);
        bytes.extend_from_slice(b" bad bytes,q,,\nC,also fine,q,,\n");
        std::fs::write(&path, bytes).unwrap();
        let data = read(&path, &columns()).unwrap();
        assert_eq!(data.examples.iter().map(|e| e.row).collect::<Vec<_>>(), vec![1, 3]);
        assert!(data.warnings.join("").contains("unparseable CSV at line 3 (rows 2)"), "{:?}", data.warnings);
    }

    #[test]
    fn unknown_columns_are_named_with_the_available_ones() {
        let (_d, path) = write("t.csv", "subject,body,team\na,b,c\n");
        let err = read(&path, &columns()).unwrap_err().to_string();
        assert!(err.contains("queue") && err.contains("available") || err.contains("the file has: subject, body, team"), "{err}");
    }

    #[test]
    fn jsonl_with_arrays_numbers_and_bad_lines() {
        let (_d, path) = write(
            "t.jsonl",
            "{\"subject\":\"a\",\"body\":\"b\",\"queue\":3,\"tag_1\":[\"x\",\"y\"],\"tag_2\":null}\nnot json\n[1]\n\n{\"body\":\"c\",\"queue\":\"Q\",\"tag_1\":\"z\"}\n",
        );
        let data = read(&path, &columns()).unwrap();
        assert_eq!(data.examples.len(), 2);
        assert_eq!(data.examples[0].labels, vec![Some("3".to_string())]);
        assert_eq!(data.examples[0].tags, vec![vec!["x".to_string(), "y".to_string()]]);
        assert_eq!(data.examples[1].row, 5);
        let warnings = data.warnings.join("\n");
        assert!(warnings.contains("invalid JSON (rows 2)") && warnings.contains("not a JSON object (rows 3)"), "{warnings}");
    }

    #[test]
    fn a_file_with_nothing_usable_is_an_error() {
        let (_d, path) = write("t.csv", "subject,body,queue,tag_1,tag_2\n,,x,,\n");
        assert!(read(&path, &columns()).unwrap_err().to_string().contains("no usable rows"));
        assert!(read(Path::new("/nonexistent/file.csv"), &columns()).is_err());
    }

    #[test]
    fn text_and_multi_label_arguments() {
        assert_eq!(Columns::parse_text(&["body=text".into()]).unwrap(), vec![("body".to_string(), "text".to_string())]);
        assert!(Columns::parse_text(&["=text".into()]).is_err());
        assert_eq!(Columns::parse_multi_label("tags").unwrap(), ("tags".to_string(), vec!["tags".to_string()]));
        assert!(Columns::parse_multi_label("tags=").is_err());
    }
}
