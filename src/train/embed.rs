//! Running a model directory over many texts with the worker's own engine (tokenizer pool,
//! batcher, inference threads), collecting predictions in input order with progress.

use std::sync::Arc;
use std::time::Instant;

use ndarray::Array2;

use super::{Progress, TrainError};
use crate::engine::{Engine, EngineConfig, Outcome};
use crate::model::{HeadKind, HeadOutput, Model, Prediction, Rendered};

pub struct EmbedRun {
    /// [texts, dim]: the model's embedding head, row per text.
    pub embeddings: Array2<f32>,
    /// The graph output that head reads (what trained heads will read too).
    pub embedding_output: String,
    /// Token ids as the worker produces them (truncated, with special tokens).
    pub ids: Vec<Vec<u32>>,
    pub predictions: Vec<Prediction>,
    pub seconds: f64,
}

/// Predictions for every text, in order.
pub fn predict_all(
    model: Arc<Model>,
    texts: &[Rendered],
    engine: &EngineConfig,
    progress: &dyn Progress,
    stage: &str,
) -> Result<(Vec<Prediction>, f64), TrainError> {
    let start = Instant::now();
    let (tx, rx) = flume::bounded::<Outcome<usize>>(engine.queue_capacity);
    let engine = Engine::start(model, engine, tx)?;
    progress.stage(stage, texts.len() as u64);
    let mut out: Vec<Option<Prediction>> = vec![None; texts.len()];
    let mut failure = None;
    std::thread::scope(|scope| {
        let submitter = engine.submitter();
        scope.spawn(move || {
            for (i, text) in texts.iter().enumerate() {
                if submitter.submit(i, text.clone()).is_err() {
                    return;
                }
            }
        });
        for _ in 0..texts.len() {
            let Ok(outcome) = rx.recv() else { break };
            match outcome.result {
                Ok(c) => out[outcome.tag] = Some(c.prediction),
                Err(e) => {
                    failure.get_or_insert_with(|| format!("text {}: {e}", outcome.tag + 1));
                }
            }
            progress.advance(1);
        }
    });
    engine.shutdown();
    progress.finish_stage();
    if let Some(f) = failure {
        return Err(TrainError::Invalid(format!("the model failed on {f}")));
    }
    let predictions: Option<Vec<Prediction>> = out.into_iter().collect();
    let predictions = predictions.ok_or_else(|| TrainError::Invalid("the inference engine stopped before every text was done".into()))?;
    Ok((predictions, start.elapsed().as_secs_f64()))
}

/// Embed every text with the model's embedding head (and keep its token ids), one text per
/// batch so the embeddings do not depend on batching.
pub fn embed(
    model: Arc<Model>,
    texts: &[Rendered],
    engine: &EngineConfig,
    progress: &dyn Progress,
    stage: &str,
) -> Result<EmbedRun, TrainError> {
    let head = model.heads().heads().iter().find(|h| h.kind == HeadKind::Embedding).cloned().ok_or_else(|| {
        TrainError::Invalid(format!(
            "{} has no embedding head (a [[heads]] entry with kind = \"embedding\") to train on",
            model.info().dir.display()
        ))
    })?;
    let ids = texts
        .iter()
        .enumerate()
        .map(|(i, t)| model.encoder().encode_rendered(t).map(|e| e.ids).map_err(|e| TrainError::Invalid(format!("text {}: {e}", i + 1))))
        .collect::<Result<Vec<_>, _>>()?;
    // One text per batch: an int8 encoder with dynamic quantization scales each layer's input
    // over the whole batch, so batched embeddings would depend on which texts happened to run
    // together, and a retrain would not reproduce its heads. Alone, every run (and the Python
    // reference) agrees; on CPU it costs little (batching gains 1.0-1.4x here).
    let mut one_by_one = engine.clone();
    one_by_one.policy.max_batch_size = 1;
    one_by_one.policy.tune_batch_size = false;
    let (predictions, seconds) = predict_all(model, texts, &one_by_one, progress, stage)?;
    let dim = predictions.first().and_then(|p| match p.head(&head.name) {
        Some(HeadOutput::Embedding(v)) => Some(v.len()),
        _ => None,
    });
    let dim = dim.unwrap_or(0);
    let mut embeddings = Array2::<f32>::zeros((texts.len(), dim));
    for (mut row, p) in embeddings.outer_iter_mut().zip(&predictions) {
        if let Some(HeadOutput::Embedding(v)) = p.head(&head.name) {
            if v.len() == dim {
                row.iter_mut().zip(v).for_each(|(r, x)| *r = *x);
            }
        }
    }
    Ok(EmbedRun { embeddings, embedding_output: head.output, ids, predictions, seconds })
}
