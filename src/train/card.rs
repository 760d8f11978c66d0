//! Writing a trained model directory: the encoder graph and tokenizer (linked or copied),
//! heads.safetensors, model.toml, metrics.json and MODEL_CARD.md. Each file is written to a
//! temporary name and renamed, so a crash never leaves a half-written file behind.

use std::fmt::Write as _;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::fitting::{MultiHeadFit, SingleHeadFit};
use super::{TrainError, TrainOptions, TrainReport};
use crate::model::linear::{self, DenseMatrix, LexicalFeatures, LexicalVocabulary};
use crate::model::{Model, MODEL_FILE, TOKENIZER_FILE};

pub(super) struct Output<'a> {
    pub options: &'a TrainOptions,
    pub name: &'a str,
    pub template: &'a str,
    pub encoder: &'a Model,
    pub embedding_output: &'a str,
    pub vocabulary: &'a LexicalVocabulary,
    pub single: &'a [SingleHeadFit],
    pub multi: &'a [MultiHeadFit],
    pub centroids: Option<&'a DenseMatrix>,
    pub priority: Option<&'a crate::model::PrioritySpec>,
    pub report: &'a TrainReport,
    pub data_rows: usize,
    /// (head, label, text) for `few_shot.jsonl`.
    pub few_shot: &'a [super::few_shot::Example],
}

pub(super) fn write_err(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Write { path: path.to_path_buf(), source }
}

/// A temporary name beside `path`, removed first: writing through an existing name could
/// write through a hard link into another model's file.
fn temporary(path: &Path) -> Result<std::path::PathBuf, TrainError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    match std::fs::remove_file(&tmp) {
        Ok(()) => Ok(tmp),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(tmp),
        Err(e) => Err(write_err(&tmp)(e)),
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let tmp = temporary(path)?;
    std::fs::write(&tmp, bytes).map_err(write_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(write_err(path))
}

/// Hard link when possible (same filesystem), else copy; nothing when `target` already is
/// `source` (the same file, e.g. retraining into the encoder's own directory).
fn place(source: &Path, target: &Path) -> Result<(), TrainError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(source).map_err(write_err(source))?;
    if let Ok(existing) = std::fs::metadata(target) {
        if existing.dev() == meta.dev() && existing.ino() == meta.ino() {
            return Ok(());
        }
    }
    let tmp = temporary(target)?;
    if std::fs::hard_link(source, &tmp).is_err() {
        std::fs::copy(source, &tmp).map_err(write_err(&tmp))?;
    }
    std::fs::rename(&tmp, target).map_err(write_err(target))
}

pub(super) fn write_model_dir(o: &Output<'_>) -> Result<(), TrainError> {
    let out = &o.options.out;
    std::fs::create_dir_all(out).map_err(write_err(out))?;
    let encoder_dir = &o.encoder.info().dir;
    place(&encoder_dir.join(MODEL_FILE), &out.join(MODEL_FILE))?;
    place(&encoder_dir.join(TOKENIZER_FILE), &out.join(TOKENIZER_FILE))?;

    let weights = weights_bytes(o).map_err(TrainError::Invalid)?;
    let version = hex::encode(Sha256::digest(&weights))[..12].to_string();
    write_atomic(&out.join(linear::WEIGHTS_FILE), &weights)?;
    write_atomic(&out.join(crate::model::descriptor::DESCRIPTOR_FILE), descriptor(o, &version)?.as_bytes())?;
    // An earlier model's examples would not match these labels: replaced, or removed.
    let examples = out.join(crate::llm::prompt::EXAMPLES_FILE);
    if o.few_shot.is_empty() {
        match std::fs::remove_file(&examples) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(write_err(&examples)(e)),
            _ => {}
        }
    } else {
        write_atomic(&examples, super::few_shot::to_jsonl(o.few_shot).as_bytes())?;
    }
    let metrics = serde_json::to_vec_pretty(o.report).map_err(|e| TrainError::Invalid(e.to_string()))?;
    write_atomic(&out.join("metrics.json"), &metrics)?;
    let notes = match &o.options.card_notes {
        Some(path) => Some(std::fs::read_to_string(path).map_err(write_err(path))?),
        None => None,
    };
    write_atomic(&out.join("MODEL_CARD.md"), model_card(o.report, o.options, &version, notes.as_deref()).as_bytes())?;
    Ok(())
}

fn weights_bytes(o: &Output<'_>) -> Result<Vec<u8>, String> {
    let mut f32s: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut any_lexical = false;
    for head in o.single {
        let name = &head.report.name;
        let (d, l) = head.dense.weight.dim();
        f32s.push((linear::weight_name(name), vec![l, d], head.dense.weight_label_major()));
        f32s.push((linear::bias_name(name), vec![l], head.dense.bias.clone()));
        if let Some(lexical) = head.lexical.as_ref().filter(|_| head.settings.lexical_share > 0.0) {
            any_lexical = true;
            let prefix = linear::lexical_prefix(name);
            let (f, l) = lexical.weight.dim();
            f32s.push((linear::weight_name(&prefix), vec![f, l], lexical.weight.iter().copied().collect()));
            f32s.push((linear::bias_name(&prefix), vec![l], lexical.bias.clone()));
        }
    }
    for head in o.multi {
        let (d, l) = head.fit.weight.dim();
        f32s.push((linear::weight_name(&head.report.name), vec![l, d], head.fit.weight_label_major()));
        f32s.push((linear::bias_name(&head.report.name), vec![l], head.fit.bias.clone()));
    }
    if let Some(c) = o.centroids {
        f32s.push((linear::OOD_CENTROIDS.to_string(), vec![c.rows, c.cols], c.data.clone()));
    }
    let mut u64s: Vec<(String, Vec<usize>, Vec<u64>)> = Vec::new();
    if any_lexical {
        f32s.push((linear::LEXICAL_IDF.to_string(), vec![o.vocabulary.len()], o.vocabulary.idf().to_vec()));
        u64s.push((linear::LEXICAL_FEATURES.to_string(), vec![o.vocabulary.len()], o.vocabulary.keys().to_vec()));
    }
    let f32_refs: Vec<(String, Vec<usize>, &[f32])> = f32s.iter().map(|(n, s, d)| (n.clone(), s.clone(), d.as_slice())).collect();
    let u64_refs: Vec<(String, Vec<usize>, &[u64])> = u64s.iter().map(|(n, s, d)| (n.clone(), s.clone(), d.as_slice())).collect();
    linear::serialize(&f32_refs, &u64_refs)
}

fn descriptor(o: &Output<'_>, version: &str) -> Result<String, TrainError> {
    use crate::model::{DescriptorFile, EscalationSpec, HeadKind, HeadSpec, OodSpec, PrioritySpec};
    let head = |name: &str, kind: HeadKind| HeadSpec {
        name: name.to_string(),
        output: o.embedding_output.to_string(),
        kind,
        labels: Vec::new(),
        activation: None,
        threshold: None,
        thresholds: Default::default(),
        weights: None,
        lexical_share: None,
    };
    let mut heads = Vec::new();
    for h in o.single {
        heads.push(HeadSpec {
            weights: Some(h.report.name.clone()),
            lexical_share: (h.report.lexical_share > 0.0).then(|| round(f64::from(h.report.lexical_share)) as f32),
            labels: h.report.labels.clone(),
            ..head(&h.report.name, HeadKind::SingleLabel)
        });
    }
    for h in o.multi {
        heads.push(HeadSpec {
            weights: Some(h.report.name.clone()),
            threshold: Some(round(f64::from(h.report.threshold)) as f32),
            labels: h.report.labels.clone(),
            ..head(&h.report.name, HeadKind::MultiLabel)
        });
    }
    // The embedding stays an output, so this model can be the encoder of the next training.
    let taken: Vec<&str> = o.single.iter().map(|h| h.report.name.as_str()).chain(o.multi.iter().map(|h| h.report.name.as_str())).collect();
    heads.push(head(if taken.contains(&"embedding") { "sentence_embedding" } else { "embedding" }, HeadKind::Embedding));
    let priority = match o.priority {
        Some(p) => Some(p.clone()),
        // A head trained on a priority column gives the priority as it is.
        None if o.single.iter().any(|h| h.report.name == "priority") => {
            Some(PrioritySpec { from_head: "priority".into(), default: None, map: Default::default() })
        }
        None => None,
    };
    let escalation = o.report.escalation.as_ref().and_then(|e| e.recommended).map(|point| EscalationSpec {
        threshold: round(f64::from(point.threshold)) as f32,
        target_accuracy: o.options.target_accuracy.map(|t| t as f32),
        escalated_share: Some(round(point.escalated) as f32),
    });
    let ood = o.report.ood.as_ref().map(|ood| OodSpec {
        output: o.embedding_output.to_string(),
        threshold: round(f64::from(ood.threshold)) as f32,
        auroc: ood.foreign.as_ref().map(|f| round(f.auroc) as f32),
    });
    let training = crate::model::TrainingRecord {
        text: o.options.columns.text.iter().map(|(p, c)| if p == c { c.clone() } else { format!("{p}={c}") }).collect(),
        labels: o.options.columns.labels.iter().map(|(h, c)| format!("{h}={c}")).collect(),
        multi_label: o.options.columns.multi_label.iter().map(|(h, cs)| format!("{h}={}", cs.join(","))).collect(),
        seed: o.options.seed,
        validation_fraction: o.options.validation_fraction,
        validation_fold: o.options.validation_fold.map(|f| f.to_string()),
        min_examples: o.options.min_examples,
        encoder: o.options.encoder.display().to_string(),
        data: o.options.data.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        data_rows: o.data_rows,
        trained_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        refit_full: o.options.refit_full,
        fitted: o
            .single
            .iter()
            .map(|h| crate::model::FittedHead {
                head: h.report.name.clone(),
                c: h.settings.c,
                lexical_c: (h.settings.lexical_share > 0.0).then_some(h.settings.lexical_c),
                lexical_features: (h.settings.lexical_share > 0.0).then_some(h.settings.lexical_features),
            })
            .chain(o.multi.iter().map(|h| crate::model::FittedHead {
                head: h.report.name.clone(),
                c: h.report.c,
                lexical_c: None,
                lexical_features: None,
            }))
            .collect(),
    };
    let file = DescriptorFile {
        name: Some(o.name.to_string()),
        version: Some(version.to_string()),
        max_length: Some(o.encoder.info().max_length),
        template: Some(o.template.to_string()),
        category_head: o.single.first().map(|h| h.report.name.clone()),
        threshold: None,
        heads,
        priority,
        escalation,
        ood,
        architecture: o.encoder.descriptor().architecture,
        training: Some(training),
    };
    file.to_toml(
        "# Written by `triage train` (see MODEL_CARD.md for how and how well). Retrain rather than edit:\n\
         # heads.safetensors holds weights for exactly these labels, in this order.\n",
    )
    .map_err(|e| TrainError::Invalid(e.to_string()))
}

fn round(v: f64) -> f64 {
    (v * 10_000.0).round() / 10_000.0
}

fn pct(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}

/// The model card: what was trained on what, and how well, against the TF-IDF baseline.
pub fn model_card(r: &TrainReport, o: &TrainOptions, version: &str, notes: Option<&str>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Model card: {} ({version})\n", r.model);
    let _ = writeln!(
        s,
        "Trained by `triage train` on `{}` ({} rows read, {} usable): {} ({}, \
         {} dimensions) with linear heads fitted on CPU. Split: {} train / {} validation, stratified ({}). \
         Regularisation, the lexical features and the lexical share were chosen by {}-fold cross-validation on \
         the training part; the validation figures below come from heads fitted on the training part alone.{}\n",
        r.data,
        r.rows_read,
        r.examples,
        if r.fine_tune.is_some() {
            "a sentence encoder fine-tuned on the training part (see Fine-tuning)"
        } else {
            "a frozen sentence encoder"
        },
        r.encoder,
        r.embedding_dim,
        r.train_examples,
        r.validation_examples,
        o.holdout(),
        o.folds,
        if r.refit_full {
            format!(
                " The shipped heads were then refitted on every usable row with those settings; their figure is the \
                 recipe's out-of-fold accuracy over every row ({} folds, each with its own vocabulary and centroids), and \
                 the escalation threshold and OOD gate were calibrated on those out-of-fold predictions.",
                o.folds
            )
        } else {
            " The shipped heads are the ones fitted on the training part; thresholds were calibrated on the validation split.".into()
        }
    );
    let _ = writeln!(s, "Embedding took {:.0} s, fitting {:.0} s.\n", r.embed_seconds, r.fit_seconds);
    if let Some(f) = &r.fine_tune {
        fine_tune_section(&mut s, f);
    }
    if let Some(c) = &r.compared {
        comparison_section(&mut s, r, c);
    }
    if let Some(notes) = notes {
        let _ = writeln!(s, "{}\n", notes.trim());
    }
    for h in &r.single {
        let _ = writeln!(s, "## Head `{}` (column `{}`, {} labels)\n", h.name, h.column, h.labels.len());
        let lexical_name = match h.lexical_features {
            LexicalFeatures::WordPieces => "word-piece 1-2 grams",
            LexicalFeatures::WordPiecesAndCharacters => "word-piece 1-2 grams + character 3-5 grams",
        };
        let _ = writeln!(
            s,
            "| validation split ({} rows), fitted on the training part | accuracy | macro-F1 |\n|---|---|---|",
            r.validation_examples
        );
        let row = |s: &mut String, name: &str, q: &super::metrics::Report| {
            let _ = writeln!(s, "| {name} | {:.3} | {:.3} |", q.accuracy, q.macro_f1);
        };
        row(&mut s, "TF-IDF (word-piece 1-2 grams) + logistic regression baseline", &h.validation_tfidf_baseline);
        row(&mut s, "embedding layer alone", &h.validation_embedding_only);
        row(&mut s, &format!("lexical layer alone ({lexical_name})"), &h.validation_lexical_only);
        let averaged = if h.lexical_share > 0.0 {
            format!("embedding + {:.0}% lexical (as shipped)", h.lexical_share * 100.0)
        } else {
            "embedding alone (as shipped)".into()
        };
        row(&mut s, &averaged, &h.validation);
        if let Some(refit) = &h.refit {
            let _ = writeln!(
                s,
                "\nRefitted on all {} rows. Out-of-fold over every row ({} folds): accuracy **{:.4}** (± {:.4} across folds), \
                 macro-F1 {:.4}; the embedding layer alone, same folds: {:.4}.",
                refit.examples, refit.folds, refit.accuracy, refit.fold_accuracy_std, refit.macro_f1, refit.accuracy_embedding_only
            );
        }
        let cv_lexical: Vec<String> = h
            .cv_accuracy_lexical
            .iter()
            .map(|(f, a)| {
                format!(
                    "{a:.3} {}",
                    match f {
                        LexicalFeatures::WordPieces => "word pieces",
                        LexicalFeatures::WordPiecesAndCharacters => "with character n-grams",
                    }
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "\nC = {} (embedding), {} (lexical). Cross-validated accuracy on the training part: {:.3} embedding alone, \
             lexical alone {}, {:.3} as chosen.\n",
            h.c,
            h.lexical_c,
            h.cv_accuracy_embedding,
            cv_lexical.join(" / "),
            h.cv_accuracy_combined
        );
        if h.validation_tfidf_baseline.accuracy >= h.validation_embedding_only.accuracy {
            let _ = writeln!(
                s,
                "Here the encoder does not earn its cost on its own: the TF-IDF baseline is as good or better than the embedding \
                 layer (a domain or language the encoder was not trained for). The lexical share carries the head; the \
                 embedding still gives the out-of-distribution score.\n"
            );
        }
        let _ =
            writeln!(s, "<details><summary>Per label</summary>\n\n| label | precision | recall | F1 | support |\n|---|---|---|---|---|");
        for l in &h.validation.per_label {
            let _ = writeln!(s, "| {} | {:.2} | {:.2} | {:.2} | {} |", l.label, l.precision, l.recall, l.f1, l.support);
        }
        let _ = writeln!(s, "\n</details>\n");
        if !h.validation.confused.is_empty() {
            let _ = writeln!(
                s,
                "Most confused (true -> predicted): {}.\n",
                h.validation
                    .confused
                    .iter()
                    .take(5)
                    .map(|c| format!("{} -> {} ({})", c.truth, c.predicted, c.count))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
    }
    for h in &r.multi {
        let _ = writeln!(
            s,
            "## Multi-label head `{}` ({} tags from {})\n\nMicro-F1 {:.3} (TF-IDF baseline {:.3}) at threshold {:.2}, C = {}.\n",
            h.name,
            h.labels.len(),
            h.columns.join(", "),
            h.validation_micro_f1,
            h.validation_tfidf_baseline_micro_f1,
            h.threshold,
            h.c
        );
    }
    if let Some(e) = &r.escalation {
        let _ = writeln!(s, "## Escalation: accuracy on what is kept vs share escalated (head `{}`)\n", e.head);
        let _ = writeln!(s, "Measured on {}.\n", r.calibrated_on);
        let _ = writeln!(s, "| confidence threshold | escalated | accuracy on the rest |\n|---|---|---|");
        let mut shown: Vec<f32> = vec![0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9];
        if let Some(p) = e.recommended {
            shown.push(p.threshold);
        }
        shown.sort_by(f32::total_cmp);
        shown.dedup();
        for t in shown {
            if let Some(p) = e.curve.iter().find(|p| (p.threshold - t).abs() < 1e-6) {
                let mark = if e.recommended.is_some_and(|r| (r.threshold - t).abs() < 1e-6) { " (recommended)" } else { "" };
                let _ = writeln!(s, "| {:.2}{mark} | {} | {} |", p.threshold, pct(p.escalated), pct(p.kept_accuracy));
            }
        }
        match (e.target_accuracy, e.recommended) {
            (Some(t), Some(p)) => {
                let _ = writeln!(
                    s,
                    "\nFor {} accuracy on what is not escalated, model.toml recommends threshold {:.2} (escalates {} of validation).\n",
                    pct(t),
                    p.threshold,
                    pct(p.escalated)
                );
            }
            (Some(t), None) => {
                let _ = writeln!(s, "\nNo threshold reaches {} on validation; none was written.\n", pct(t));
            }
            _ => {
                let _ = writeln!(s, "\nNo target accuracy was given (`--target-accuracy`), so no threshold was written.\n");
            }
        }
    }
    if let Some(ood) = &r.ood {
        let _ = writeln!(
            s,
            "## Out-of-distribution gate\n\n`ood_score` = 1 - cosine similarity of the message's embedding to the nearest class centroid. \
             Threshold {:.3} (the 99th percentile of in-domain validation scores: {} of them are above it).\n",
            ood.threshold,
            pct(ood.in_domain_flagged)
        );
        match &ood.foreign {
            Some(f) => {
                let _ = writeln!(
                    s,
                    "On a held-out foreign set (`{}`, {} texts): AUROC {:.3} for the OOD score vs {:.3} for 1 - confidence; \
                     the threshold catches {} of them. Mean confidence on foreign texts {:.3} vs {:.3} in domain.\n",
                    f.data,
                    f.examples,
                    f.auroc,
                    f.confidence_auroc,
                    pct(f.caught),
                    f.foreign_mean_confidence,
                    f.in_domain_mean_confidence
                );
            }
            None => {
                let _ = writeln!(s, "No foreign set was given (`--foreign`), so its AUROC is not measured.\n");
            }
        }
    }
    if !r.warnings.is_empty() {
        let _ = writeln!(s, "## Data warnings\n");
        for w in &r.warnings {
            let _ = writeln!(s, "- {w}");
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "## Use\n\nPoint a route's `model` at this directory. `triage eval --model <dir> --data {}` re-derives the same split and \
         prints these tables. The data's licence decides where this model may be used.",
        r.data
    );
    s
}

fn fine_tune_section(s: &mut String, f: &super::fine_tune::FineTuneReport) {
    let _ = writeln!(
        s,
        "## Fine-tuning\n\nThe encoder `{}` was trained end to end ({} parameter tensors; AdamW, learning rate {}, batch {}, \
         seed {}; ONNX Runtime training {}) through a cosine classifier on the first head, on {} texts of the training part; \
         {} more of it (the dev split) decided early stopping; the validation rows were never shown to it. Then int8-quantized \
         (dynamic, MatMul weights) and the heads fitted over it as over a frozen encoder. {:.0} s in all ({:.0} s training, {} steps).\n",
        f.base_encoder,
        f.parameters,
        f.lr,
        f.batch,
        f.seed,
        f.onnxruntime_training,
        f.train_rows,
        f.dev_rows,
        f.total_seconds,
        f.seconds,
        f.steps
    );
    let _ = writeln!(s, "| epoch | training loss | dev accuracy | seconds in |\n| --- | --- | --- | --- |");
    for e in &f.epochs {
        let loss = e.train_loss.map_or("-".to_string(), |l| format!("{l:.4}"));
        let kept = if e.epoch == f.best_epoch { " (kept)" } else { "" };
        let _ = writeln!(s, "| {}{kept} | {loss} | {:.4} | {:.0} |", e.epoch, e.dev_accuracy, e.seconds);
    }
    s.push('\n');
}

fn comparison_section(s: &mut String, r: &TrainReport, c: &super::Compared) {
    let _ = writeln!(s, "## Against `{}`\n", c.model_dir);
    if !c.same_split {
        let _ =
            writeln!(s, "Not comparable: `{}` was measured on a different validation split (other data, seed or fraction).\n", c.model_dir);
        return;
    }
    let Some(head) = r.single.first() else { return };
    let _ = writeln!(
        s,
        "The same {} validation rows, heads fitted on the same training part (head `{}`):\n\n\
         | | this model | `{}` | difference |\n| --- | --- | --- | --- |",
        r.validation_examples, head.name, c.model_dir
    );
    let rows = [
        ("accuracy", head.validation.accuracy, c.accuracy),
        ("macro-F1", head.validation.macro_f1, c.macro_f1),
        ("accuracy, embedding layer alone", head.validation_embedding_only.accuracy, c.embedding_accuracy),
    ];
    for (what, ours, theirs) in rows {
        let _ = writeln!(s, "| {what} | {ours:.4} | {theirs:.4} | {:+.2} points |", (ours - theirs) * 100.0);
    }
    s.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placing_and_rewriting_never_write_through_to_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let (encoder, out) = (dir.path().join("encoder.onnx"), dir.path().join("out"));
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(&encoder, b"graph").unwrap();
        let target = out.join("model.onnx");
        // Twice: the second time target and source are already one file.
        place(&encoder, &target).unwrap();
        place(&encoder, &target).unwrap();
        write_atomic(&out.join("model.toml"), b"descriptor").unwrap();
        write_atomic(&out.join("model.toml"), b"descriptor 2").unwrap();
        assert_eq!(std::fs::read(&encoder).unwrap(), b"graph");
        assert_eq!(std::fs::read(&target).unwrap(), b"graph");
        assert_eq!(std::fs::read(out.join("model.toml")).unwrap(), b"descriptor 2");
        let leftovers: Vec<_> =
            std::fs::read_dir(&out).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains("tmp")).collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // Overwriting a hard-linked target replaces the name, not the shared file.
        write_atomic(&target, b"other").unwrap();
        assert_eq!(std::fs::read(&encoder).unwrap(), b"graph");
    }
}
