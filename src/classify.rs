//! `triage classify`: JSON lines in, one JSON result per line out, in input order.
//!
//! A reader thread decodes lines and feeds the engine; this thread collects outcomes and writes
//! them back in input order through a reorder buffer (bounded by what is in flight). A bad line
//! becomes an error record with its line number and the run goes on.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Map, Value};

use crate::engine::{Classified, ClassifyError, Engine, EngineConfig, Outcome, StatsSnapshot};
use crate::message::{Decoder, FieldMap};
use crate::model::{HeadOutput, Model, ModelError};

#[derive(Debug, Clone)]
pub struct ClassifyOptions {
    pub engine: EngineConfig,
    pub fields: FieldMap,
    pub max_message_bytes: usize,
    /// Also write embedding heads' vectors.
    pub include_embeddings: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ClassifyRunError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("reading input: {0}")]
    Read(std::io::Error),
    #[error("writing output: {0}")]
    Write(std::io::Error),
}

#[derive(Debug, Clone)]
pub struct ClassifySummary {
    pub lines: u64,
    pub classified: u64,
    pub errors: u64,
    pub seconds: f64,
    pub engine: StatsSnapshot,
    pub batch_sizes: Vec<crate::batcher::tuner::BucketChoice>,
}

impl ClassifySummary {
    pub fn messages_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.classified as f64 / self.seconds
        } else {
            0.0
        }
    }
}

impl std::fmt::Display for ClassifySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} messages ({} classified, {} errors) in {:.2}s: {:.1} messages/s; {} batches, mean batch size {:.1}, padding ratio {:.2} (padded/real tokens)",
            self.lines,
            self.classified,
            self.errors,
            self.seconds,
            self.messages_per_second(),
            self.engine.batches,
            self.engine.mean_batch_size(),
            self.engine.padding_ratio()
        )?;
        if !self.batch_sizes.is_empty() {
            write!(f, "\nbatch sizes tuned per text length: {}", crate::batcher::tuner::describe(&self.batch_sizes))?;
        }
        Ok(())
    }
}

/// Tag carried through the engine: output order and what identifies the line.
#[derive(Debug)]
struct LineTag {
    seq: u64,
    line: u64,
    id: Option<String>,
}

/// Classify every line of `input` into `output`. `progress` is told how many input bytes were
/// consumed so far.
pub fn classify_stream<R, W>(
    model: Arc<Model>,
    options: &ClassifyOptions,
    input: R,
    output: W,
    progress: impl Fn(u64) + Send + 'static,
) -> Result<ClassifySummary, ClassifyRunError>
where
    R: BufRead + Send + 'static,
    W: Write,
{
    let start = Instant::now();
    let decoder = Decoder::new(options.fields.clone(), model.template().clone(), options.max_message_bytes, model.encoder().max_chars());
    let (outcome_tx, outcome_rx) = flume::bounded::<Outcome<LineTag>>(options.engine.queue_capacity);
    let engine = Engine::start(model.clone(), &options.engine, outcome_tx.clone())?;
    let submitter = engine.submitter();
    let reader = std::thread::Builder::new()
        .name("triage-reader".into())
        .spawn(move || -> Result<(), std::io::Error> {
            let mut input = input;
            let mut buf = Vec::new();
            let (mut line, mut seq, mut consumed) = (0u64, 0u64, 0u64);
            loop {
                buf.clear();
                let n = input.read_until(b'\n', &mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                line += 1;
                consumed += n as u64;
                progress(consumed);
                while matches!(buf.last(), Some(b'\n' | b'\r')) {
                    buf.pop();
                }
                if buf.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let tag_seq = seq;
                seq += 1;
                let sent = match decoder.decode(&buf) {
                    Ok(msg) => submitter.submit(LineTag { seq: tag_seq, line, id: msg.id }, msg.text).is_ok(),
                    Err(e) => outcome_tx.send(Outcome { tag: LineTag { seq: tag_seq, line, id: None }, result: Err(e.into()) }).is_ok(),
                };
                if !sent {
                    return Ok(());
                }
            }
        })
        .map_err(ClassifyRunError::Read)?;

    // The outcome channel closes once the reader and every engine thread are done; shutting
    // the engine down (dropping its own submitter, joining its threads) runs beside the drain.
    let stats_handle = engine.stats_handle();
    let joiner =
        std::thread::Builder::new().name("triage-engine-stop".into()).spawn(move || engine.shutdown()).map_err(ClassifyRunError::Read)?;
    let mut writer = OrderedWriter::new(output, options.include_embeddings, model.info().name.clone(), model.info().version.clone());
    let mut write_result = Ok(());
    for outcome in outcome_rx.iter() {
        if let Err(e) = writer.accept(outcome) {
            write_result = Err(e);
            break;
        }
    }
    // On a write error, dropping the receiver makes the reader and engine stop early.
    drop(outcome_rx);
    let read_result = reader.join().unwrap_or_else(|_| Err(std::io::Error::other("reader thread panicked")));
    let _ = joiner.join();
    let stats = writer.stats;
    write_result.and_then(|()| writer.finish()).map_err(ClassifyRunError::Write)?;
    read_result.map_err(ClassifyRunError::Read)?;
    Ok(ClassifySummary {
        lines: stats.lines,
        classified: stats.classified,
        errors: stats.errors,
        seconds: start.elapsed().as_secs_f64(),
        engine: stats_handle.snapshot(),
        batch_sizes: stats_handle.batch_sizes(),
    })
}

#[derive(Default, Clone, Copy)]
struct WriterStats {
    lines: u64,
    classified: u64,
    errors: u64,
}

struct OrderedWriter<W: Write> {
    out: std::io::BufWriter<W>,
    next: u64,
    waiting: BTreeMap<u64, Value>,
    include_embeddings: bool,
    model_name: String,
    model_version: String,
    stats: WriterStats,
}

impl<W: Write> OrderedWriter<W> {
    fn new(out: W, include_embeddings: bool, model_name: String, model_version: String) -> Self {
        OrderedWriter {
            out: std::io::BufWriter::new(out),
            next: 0,
            waiting: BTreeMap::new(),
            include_embeddings,
            model_name,
            model_version,
            stats: WriterStats::default(),
        }
    }

    fn accept(&mut self, outcome: Outcome<LineTag>) -> std::io::Result<()> {
        self.stats.lines += 1;
        let record = match &outcome.result {
            Ok(c) => {
                self.stats.classified += 1;
                self.success_record(&outcome.tag, c)
            }
            Err(e) => {
                self.stats.errors += 1;
                error_record(&outcome.tag, e)
            }
        };
        self.waiting.insert(outcome.tag.seq, record);
        while let Some(record) = self.waiting.remove(&self.next) {
            serde_json::to_writer(&mut self.out, &record)?;
            self.out.write_all(b"\n")?;
            self.next += 1;
        }
        Ok(())
    }

    fn finish(mut self) -> std::io::Result<()> {
        // Anything left would mean a lost outcome; write it rather than drop it.
        for (_, record) in std::mem::take(&mut self.waiting) {
            serde_json::to_writer(&mut self.out, &record)?;
            self.out.write_all(b"\n")?;
        }
        self.out.flush()
    }

    fn success_record(&self, tag: &LineTag, c: &Classified) -> Value {
        let p = &c.prediction;
        let mut heads = Map::new();
        for h in &p.heads {
            let value = match &h.output {
                HeadOutput::Label(l) => json!({"label": l.label, "score": l.score}),
                HeadOutput::Tags(tags) => json!(tags),
                HeadOutput::Embedding(v) if self.include_embeddings => json!(v),
                HeadOutput::Embedding(_) => continue,
            };
            heads.insert(h.head.clone(), value);
        }
        let mut record = json!({
            "line": tag.line,
            "id": tag.id,
            "category": p.category.as_ref().map(|c| &c.label),
            "confidence": p.category.as_ref().map(|c| c.score),
            "priority": p.priority,
            "tags": p.tags.iter().map(|t| &t.label).collect::<Vec<_>>(),
            "heads": heads,
            "model": self.model_name,
            "model_version": self.model_version,
            "tokens": c.tokens,
            "truncated": c.truncated,
        });
        // Only models with an out-of-distribution gate have a score to give.
        if let (Some(score), Value::Object(fields)) = (p.ood_score, &mut record) {
            fields.insert("ood_score".into(), json!(score));
        }
        record
    }
}

fn error_record(tag: &LineTag, e: &ClassifyError) -> Value {
    let (reason, detail) = match e {
        ClassifyError::Input(d) => (d.reason.as_str(), d.detail.clone()),
        ClassifyError::Tokenize(d) => ("tokenize_failed", d.clone()),
        ClassifyError::Inference(d) => ("inference_failed", d.clone()),
        ClassifyError::Backend(d) => ("backend_failed", d.clone()),
    };
    json!({"line": tag.line, "id": tag.id, "error": {"reason": reason, "detail": detail}})
}
