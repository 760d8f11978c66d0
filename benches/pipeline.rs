//! Stage benchmarks: decoding a message (JSON vs Avro, side by side), tokenization, batch
//! assembly (FIFO vs length-bucketed), and inference per batch size and sequence length. Run with `cargo bench --bench pipeline`; `cargo test
//! --all-targets` runs each once as a smoke test. Texts: ../shared/data/banking77 when present,
//! generated otherwise (said on stderr).

use std::path::PathBuf;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use triage::batcher::{Assembler, BatchPolicy};
use triage::model::{InferenceOptions, Model};
use triage::source::decode::avro::AvroReader;
use triage::source::decode::{Format, PinnedSchema, RecordReader, Step};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn short_texts(n: usize) -> Vec<String> {
    let path = root().join("../shared/data/banking77/train.csv");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let texts: Vec<String> =
            text.lines().skip(1).filter_map(|l| l.rsplit_once(',').map(|(t, _)| t.trim_matches('"').to_string())).take(n).collect();
        if texts.len() == n {
            return texts;
        }
    }
    eprintln!("bench: {} absent, using generated texts", path.display());
    let words = ["my", "card", "has", "not", "arrived", "yet", "why", "was", "I", "charged", "twice", "for", "a", "top", "up"];
    (0..n).map(|i| (0..(5 + i % 15)).map(|j| words[(i + j * 7) % words.len()]).collect::<Vec<_>>().join(" ")).collect()
}

fn mixed_lengths(n: usize) -> Vec<usize> {
    // A ticket-like spread: many short, a long tail truncated at 128.
    (0..n).map(|i| [14, 22, 35, 60, 95, 128, 18, 45][i % 8] + (i * 13) % 9).map(|l| l.min(128)).collect()
}

fn bench_tokenize(c: &mut Criterion) {
    let model = Model::load(root().join("models/customer-service"), &InferenceOptions::default()).expect("run scripts/setup first");
    let texts = short_texts(512);
    let long: Vec<String> = texts.chunks(8).map(|c| c.join(" ")).collect();
    let mut g = c.benchmark_group("tokenize");
    for (name, set) in [("short", &texts), ("long", &long)] {
        g.throughput(Throughput::Elements(set.len() as u64));
        g.bench_function(name, |b| b.iter(|| set.iter().map(|t| model.encoder().encode(t).map(|e| e.len()).unwrap_or(0)).sum::<usize>()));
    }
    g.finish();
}

fn bench_assembly(c: &mut Criterion) {
    let lens = mixed_lengths(4096);
    let mut g = c.benchmark_group("assemble");
    g.throughput(Throughput::Elements(lens.len() as u64));
    for (name, window) in [("fifo", 1), ("bucketed", 4)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut a = Assembler::new(BatchPolicy { bucket_window: window, ..BatchPolicy::default() });
                let now = Instant::now();
                let (mut real, mut padded) = (0, 0);
                for (i, &l) in lens.iter().enumerate() {
                    a.push(i, l, now);
                    while let Some(batch) = a.pop_due(now, false) {
                        real += batch.real_tokens();
                        padded += batch.padded_tokens();
                    }
                }
                while let Some(batch) = a.pop_due(now, true) {
                    real += batch.real_tokens();
                    padded += batch.padded_tokens();
                }
                padded as f64 / real as f64
            })
        });
    }
    g.finish();
}

fn bench_inference(c: &mut Criterion) {
    let model = Model::load(root().join("models/customer-service"), &InferenceOptions::default()).expect("run scripts/setup first");
    let mut session = model.session().expect("session");
    let mut g = c.benchmark_group("inference");
    g.sample_size(10);
    for &seq in &[16usize, 128] {
        let text = "card ".repeat(seq);
        let enc = {
            let mut e = model.encoder().encode(&text).expect("tokenize");
            e.ids.truncate(seq);
            e.type_ids.truncate(seq);
            e
        };
        for &batch in &[1usize, 8, 32] {
            let rows: Vec<_> = (0..batch).map(|_| &enc).collect();
            g.throughput(Throughput::Elements(batch as u64));
            g.bench_with_input(BenchmarkId::new(format!("seq{seq}"), batch), &rows, |b, rows| {
                b.iter(|| session.run(rows).expect("run").len())
            });
        }
    }
    g.finish();
}

/// What reading one message into its JSON record costs: the same 1,000 tickets (Banking77 texts
/// in the demo's ticket shape) as JSON and as raw Avro with the demo's schema
/// (deploy/demo/ticket.avsc, read as a pinned-schema route reads it). Issue 20's bar: Avro may
/// cost no more per message than JSON.
fn bench_decode(c: &mut Criterion) {
    let schema_path = root().join("deploy/demo/ticket.avsc");
    let schema = std::fs::read_to_string(&schema_path).expect("deploy/demo/ticket.avsc");
    let writer = AvroReader::parse(&schema, &[]).expect("the demo's Avro schema");
    let records: Vec<serde_json::Value> = short_texts(1_000)
        .into_iter()
        .enumerate()
        .map(|(i, text)| {
            serde_json::json!({
                "id": format!("T-{i}"), "subject": format!("ticket {i}"), "body": text,
                "created_at": "2026-11-20T08:12:00Z", "customer": {"tier": if i % 2 == 0 { "gold" } else { "standard" }},
            })
        })
        .collect();
    let json: Vec<Vec<u8>> = records.iter().map(|r| r.to_string().into_bytes()).collect();
    let avro: Vec<Vec<u8>> = records.iter().map(|r| writer.write(r).expect("a demo record fits its schema")).collect();
    let json_reader = RecordReader::json(1 << 20);
    let pinned = PinnedSchema { file: Some(schema_path), message: None };
    let avro_reader = RecordReader::new(Format::Avro, &pinned, None, 1 << 20).expect("pinned Avro reader");
    let read_all = |reader: &RecordReader, set: &[Vec<u8>]| set.iter().filter(|m| matches!(reader.read(m), Step::Record(_))).count();
    assert_eq!(read_all(&avro_reader, &avro), records.len(), "every Avro message reads");
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(records.len() as u64));
    g.bench_function("json", |b| b.iter(|| read_all(&json_reader, &json)));
    g.bench_function("avro", |b| b.iter(|| read_all(&avro_reader, &avro)));
    g.finish();
}

criterion_group!(benches, bench_decode, bench_tokenize, bench_assembly, bench_inference);
criterion_main!(benches);
