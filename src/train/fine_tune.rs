//! `triage train --fine-tune`: the encoder itself learns the labels before the heads are fitted.
//!
//! ONNX Runtime's training API has no Rust binding that builds offline (its training C API is not
//! in any wheel here), so the training loop runs in Python (models/scripts/fine_tune.py, embedded
//! in this binary and written next to its data) under `.venv-train`, which `scripts/setup --train`
//! makes with PyPI `onnxruntime-training-cpu`. Everything around it stays here: the texts are
//! tokenized by the worker's own tokenizer (what the model sees in production is what it was
//! trained on), the split is this trainer's, and the result is quantized and handed back as an
//! ordinary encoder directory for the heads.
//!
//! Only the training part is used: a stratified tenth of it (the dev split) decides early
//! stopping, and the validation rows are never shown to the encoder, so their figures stay honest.

use super::card::write_err;
use super::{Progress, TrainError};
use crate::model::Rendered;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const FINE_TUNE_SCRIPT: &str = include_str!("../../models/scripts/fine_tune.py");
const QUANTIZE_SCRIPT: &str = include_str!("../../models/scripts/quantize_encoder.py");
/// The fine-tuned int8 encoder directory inside the model directory (the model's graph is a link
/// to its graph; train further heads over it with `--encoder <model>/encoder`).
pub const ENCODER_DIR: &str = "encoder";
/// Where `scripts/setup --train` puts the Python that has ONNX Runtime's training API.
pub const DEFAULT_PYTHON: &str = ".venv-train/bin/python";

#[derive(Debug, Clone)]
pub struct FineTuneOptions {
    /// A Python with `onnxruntime-training-cpu` (default: .venv-train/bin/python).
    pub python: PathBuf,
    /// Most epochs; early stopping may end sooner.
    pub epochs: usize,
    /// Epochs without a better dev accuracy before stopping.
    pub patience: usize,
    pub learning_rate: f64,
    pub batch_size: usize,
    /// Share of the training part held out to decide early stopping.
    pub dev_fraction: f64,
    /// Stop after this many optimizer steps in all (0: no limit): for smoke tests.
    pub max_steps: usize,
    /// ONNX Runtime threads while training (0: every core).
    pub threads: usize,
    /// Keep the work directory (the fp32 graph before quantization, the tokenized splits).
    pub keep_work: bool,
}

impl Default for FineTuneOptions {
    fn default() -> Self {
        FineTuneOptions {
            python: PathBuf::from(DEFAULT_PYTHON),
            epochs: 4,
            patience: 1,
            learning_rate: 8e-5,
            batch_size: 32,
            dev_fraction: 0.1,
            max_steps: 0,
            threads: 0,
            keep_work: false,
        }
    }
}

impl FineTuneOptions {
    pub fn checked(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Invalid(m));
        if self.epochs == 0 || self.epochs > 50 {
            return bad(format!("fine-tune epochs {}: use 1 to 50", self.epochs));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0 && self.learning_rate < 0.1) {
            return bad(format!("fine-tune learning rate {}: use a small positive number (e.g. 8e-5)", self.learning_rate));
        }
        if !(2..=1024).contains(&self.batch_size) {
            return bad(format!("fine-tune batch size {}: use 2 to 1024", self.batch_size));
        }
        if !(0.02..=0.5).contains(&self.dev_fraction) {
            return bad(format!("fine-tune dev fraction {}: use 0.02 to 0.5", self.dev_fraction));
        }
        Ok(())
    }
}

/// One epoch as the training script measured it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Epoch {
    pub epoch: usize,
    pub train_loss: Option<f64>,
    pub dev_accuracy: f64,
    pub seconds: f64,
}

/// What fine-tuning did, for metrics.json and the model card.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FineTuneReport {
    pub best_epoch: usize,
    pub best_dev_accuracy: f64,
    pub epochs: Vec<Epoch>,
    pub steps: usize,
    pub parameters: usize,
    pub seconds: f64,
    pub seed: u64,
    pub lr: f64,
    pub batch: usize,
    pub onnxruntime_training: String,
    /// Relative L2 distance between the weights before and after: what training moved.
    pub parameter_change: f64,
    #[serde(default)]
    pub train_rows: usize,
    #[serde(default)]
    pub dev_rows: usize,
    /// The frozen encoder it started from.
    #[serde(default)]
    pub base_encoder: String,
    /// Wall time of the whole step, quantization included.
    #[serde(default)]
    pub total_seconds: f64,
}

/// The labelled texts of the training part, as the trainer prepared them.
pub struct Examples<'a> {
    pub texts: &'a [Rendered],
    /// The first single-label head's label index per row (None: unlabelled, left out).
    pub labels: &'a [Option<usize>],
    pub label_count: usize,
    pub train_rows: &'a [usize],
    /// Seeds the dev split and the training (shuffling, the classifier's start).
    pub seed: u64,
}

/// Fine-tune `encoder_dir` (an fp32 pooled encoder directory) into `out`, an int8 encoder
/// directory with the same tokenizer; `work` holds the intermediate files and is removed after.
pub fn fine_tune(
    options: &FineTuneOptions,
    encoder: &crate::model::Model,
    encoder_dir: &Path,
    examples: &Examples<'_>,
    work: &Path,
    out: &Path,
    progress: &dyn Progress,
) -> Result<FineTuneReport, TrainError> {
    options.checked()?;
    let seed = examples.seed;
    let started = std::time::Instant::now();
    check_python(&options.python)?;
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work).map_err(write_err(work))?;

    let labelled: Vec<usize> = examples.train_rows.iter().copied().filter(|&r| examples.labels[r].is_some()).collect();
    let strata: Vec<usize> = labelled.iter().map(|&r| examples.labels[r].unwrap_or(0)).collect();
    let (fit, dev) = super::split::stratified_split(&strata, options.dev_fraction, seed ^ 0x5eed_f1e7);
    let tokenizer = encoder.encoder();
    let write_rows = |name: &str, picks: &[usize]| -> Result<PathBuf, TrainError> {
        let path = work.join(name);
        let file = std::fs::File::create(&path).map_err(write_err(&path))?;
        let mut file = std::io::BufWriter::new(file);
        for &pick in picks {
            let row = labelled[pick];
            let ids =
                tokenizer.encode_rendered(&examples.texts[row]).map_err(|e| TrainError::Invalid(format!("text {}: {e}", row + 1)))?.ids;
            let line = serde_json::json!({ "ids": ids, "label": examples.labels[row] });
            writeln!(file, "{line}").map_err(write_err(&path))?;
        }
        file.flush().map_err(write_err(&path))?;
        Ok(path)
    };
    let train_file = write_rows("train.jsonl", &fit)?;
    let dev_file = write_rows("dev.jsonl", &dev)?;
    progress.note(&format!(
        "fine-tuning {} on {} texts ({} held out to stop early; the {} validation rows are never shown to it)",
        encoder_dir.display(),
        fit.len(),
        dev.len(),
        examples.texts.len() - examples.train_rows.len()
    ));

    let script = work.join("fine_tune.py");
    std::fs::write(&script, FINE_TUNE_SCRIPT).map_err(write_err(&script))?;
    let trained = work.join("fp32");
    let mut command = Command::new(&options.python);
    command
        .arg(&script)
        .arg("--encoder")
        .arg(encoder_dir)
        .arg("--train")
        .arg(&train_file)
        .arg("--dev")
        .arg(&dev_file)
        .arg("--labels")
        .arg(examples.label_count.to_string())
        .arg("--out")
        .arg(&trained)
        .args(["--epochs", &options.epochs.to_string(), "--patience", &options.patience.to_string()])
        .args(["--lr", &options.learning_rate.to_string(), "--batch", &options.batch_size.to_string()])
        .args(["--seed", &seed.to_string(), "--threads", &options.threads.to_string()])
        .args(["--max-steps", &options.max_steps.to_string()]);
    run_script(command, "fine-tuning", progress)?;

    // The fp32 result becomes an encoder directory (the base's tokenizer and descriptor), then int8.
    for file in ["tokenizer.json", "model.toml"] {
        std::fs::copy(encoder_dir.join(file), trained.join(file)).map_err(write_err(&trained.join(file)))?;
    }
    let quantize = work.join("quantize_encoder.py");
    std::fs::write(&quantize, QUANTIZE_SCRIPT).map_err(write_err(&quantize))?;
    let name = format!("{}-fine-tuned", encoder.info().name);
    let mut command = Command::new(&options.python);
    command.arg(&quantize).arg("--src").arg(&trained).arg("--out").arg(out).args(["--name", &name]);
    run_script(command, "quantizing the fine-tuned encoder", progress)?;

    let summary = trained.join("fine_tune.json");
    let text = std::fs::read_to_string(&summary).map_err(|e| TrainError::Invalid(format!("{}: {e}", summary.display())))?;
    let mut report: FineTuneReport =
        serde_json::from_str(&text).map_err(|e| TrainError::Invalid(format!("{}: not a fine-tuning summary: {e}", summary.display())))?;
    report.train_rows = fit.len();
    report.dev_rows = dev.len();
    report.base_encoder = encoder_dir.display().to_string();
    report.total_seconds = started.elapsed().as_secs_f64();
    if options.keep_work {
        progress.note(&format!("kept {} (fp32/ is the fine-tuned encoder before quantization)", work.display()));
    } else {
        let _ = std::fs::remove_dir_all(work);
    }
    Ok(report)
}

/// The interpreter exists and has ONNX Runtime's training API, or a message saying how to get it.
fn check_python(python: &Path) -> Result<(), TrainError> {
    let probe = Command::new(python)
        .args(["-c", "import sys, onnxruntime, os; print(sys.version.split()[0]); print(onnxruntime.__version__); print(os.path.isdir(os.path.join(os.path.dirname(onnxruntime.__file__), 'training', 'api')))"])
        .output();
    let how = "run scripts/setup --train (it makes .venv-train with PyPI onnxruntime-training-cpu 1.19.2, which has wheels for CPython 3.11 and 3.12 only), or point --fine-tune-python at such a Python";
    match probe {
        Err(e) => Err(TrainError::Invalid(format!(
            "--fine-tune needs a Python with ONNX Runtime's training API; {} cannot run ({e}): {how}",
            python.display()
        ))),
        Ok(out) if !out.status.success() => Err(TrainError::Invalid(format!(
            "--fine-tune: {} has no onnxruntime ({}): {how}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
        ))),
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let lines: Vec<&str> = text.lines().collect();
            if lines.get(2) == Some(&"True") {
                Ok(())
            } else {
                Err(TrainError::Invalid(format!(
                    "--fine-tune: {} (Python {}) has onnxruntime {} without its training API: {how}",
                    python.display(),
                    lines.first().unwrap_or(&"?"),
                    lines.get(1).unwrap_or(&"?")
                )))
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum ScriptEvent {
    Start { parameters: usize, train: usize, dev: usize, seconds: f64 },
    Step { step: u64, total: u64 },
    Epoch { epoch: usize, train_loss: Option<f64>, dev_accuracy: f64, seconds: f64 },
    EarlyStop { epoch: usize, best_epoch: usize },
    Done { best_epoch: usize, best_dev_accuracy: f64, steps: usize, seconds: f64 },
}

/// Run a Python step, turning its JSON progress lines into progress; on failure the error names
/// the step and carries the end of its standard error.
fn run_script(mut command: Command, what: &str, progress: &dyn Progress) -> Result<(), TrainError> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| TrainError::Invalid(format!("{what}: cannot start {:?}: {e}", command.get_program())))?;
    let stderr = child.stderr.take().map(|pipe| {
        std::thread::spawn(move || {
            let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tail.len() == 20 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            tail.into_iter().collect::<Vec<_>>().join("\n")
        })
    });
    let mut stage_open = false;
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            match serde_json::from_str::<ScriptEvent>(&line) {
                Ok(ScriptEvent::Start { parameters, train, dev, seconds }) => progress.note(&format!(
                    "training graph ready in {seconds:.0}s: {parameters} parameter tensors, {train} training and {dev} dev texts"
                )),
                Ok(ScriptEvent::Step { step, total }) => {
                    // One stage for every epoch's steps: epochs are notes above it.
                    if !stage_open {
                        progress.stage(what, total);
                        progress.advance(step.saturating_sub(1));
                        stage_open = true;
                    }
                    progress.advance(1);
                }
                Ok(ScriptEvent::Epoch { epoch, train_loss, dev_accuracy, seconds }) => {
                    let loss = train_loss.map_or("-".to_string(), |l| format!("{l:.4}"));
                    progress.note(&format!("epoch {epoch}: training loss {loss}, dev accuracy {dev_accuracy:.4} ({seconds:.0}s in)"));
                }
                Ok(ScriptEvent::EarlyStop { epoch, best_epoch }) => {
                    progress.note(&format!("stopped early after epoch {epoch}: epoch {best_epoch} had the best dev accuracy"))
                }
                Ok(ScriptEvent::Done { best_epoch, best_dev_accuracy, steps, seconds }) => progress.note(&format!(
                    "fine-tuned in {seconds:.0}s ({steps} steps); kept epoch {best_epoch} (dev accuracy {best_dev_accuracy:.4})"
                )),
                Err(_) if !line.trim().is_empty() => progress.note(&line),
                Err(_) => {}
            }
        }
    }
    if stage_open {
        progress.finish_stage();
    }
    let status = child.wait().map_err(|e| TrainError::Invalid(format!("{what}: {e}")))?;
    let tail = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    if status.success() {
        Ok(())
    } else {
        Err(TrainError::Invalid(format!("{what} failed ({status}):\n{tail}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_no_data_can_fix_are_refused_with_the_setting_named() {
        let ok = FineTuneOptions::default();
        assert!(ok.checked().is_ok());
        for (broken, named) in [
            (FineTuneOptions { epochs: 0, ..ok.clone() }, "epochs"),
            (FineTuneOptions { learning_rate: 0.5, ..ok.clone() }, "learning rate"),
            (FineTuneOptions { learning_rate: f64::NAN, ..ok.clone() }, "learning rate"),
            (FineTuneOptions { batch_size: 1, ..ok.clone() }, "batch size"),
            (FineTuneOptions { dev_fraction: 0.9, ..ok.clone() }, "dev fraction"),
        ] {
            let message = broken.checked().unwrap_err().to_string();
            assert!(message.contains(named), "{message}");
        }
    }

    #[test]
    fn a_python_without_the_training_api_is_refused_with_how_to_get_one() {
        let missing = check_python(Path::new("/nonexistent/python3")).unwrap_err().to_string();
        assert!(missing.contains("cannot run") && missing.contains("scripts/setup --train"), "{missing}");
        // The system Python has no onnxruntime at all (or one without training).
        if let Err(e) = check_python(Path::new("/usr/bin/python3")) {
            let message = e.to_string();
            assert!(message.contains("scripts/setup --train") && message.contains("3.11 and 3.12"), "{message}");
        }
    }

    #[test]
    fn a_failing_step_reports_the_end_of_its_standard_error() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo '{\"event\": \"step\", \"step\": 1, \"total\": 3}'; echo 'first' >&2; echo 'the reason' >&2; exit 3"]);
        let error = run_script(command, "fine-tuning", &super::super::Silent).unwrap_err().to_string();
        assert!(error.contains("fine-tuning failed") && error.contains("the reason") && error.contains("first"), "{error}");
    }
}
