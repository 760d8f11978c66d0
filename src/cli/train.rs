//! `triage train`: heads over a frozen encoder from labelled CSV / JSON lines.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use triage::model::linear::LexicalFeatures;
use triage::train::fine_tune::FineTuneOptions;
use triage::train::{Columns, LexicalMode, TrainOptions};

use super::{model_dir, BatchArgs, RuntimeArgs, StageProgress};

/// The library's defaults, shown by --help and used when a flag is absent.
fn defaults() -> TrainOptions {
    TrainOptions::new(PathBuf::new(), Columns::default(), PathBuf::new(), PathBuf::new())
}

#[derive(Args)]
pub struct TrainArgs {
    /// Labelled data: CSV with a header row, or JSON lines.
    #[arg(long)]
    data: PathBuf,
    /// Text columns in template order: COLUMN or PLACEHOLDER=COLUMN (e.g. subject,body or body=text).
    #[arg(long, required = true, value_delimiter = ',')]
    text: Vec<String>,
    /// A single-label head per column: COLUMN or HEAD=COLUMN (repeatable; the first is the category).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// A multi-label head: COLUMN (tags split on | or ;, or a JSON array) or HEAD=COL1,COL2,...
    #[arg(long = "multi-label")]
    multi_label: Vec<String>,
    /// Model directory whose embedding head is the frozen encoder (default: the default model).
    #[arg(long, env = "TRIAGE_TRAIN_ENCODER")]
    encoder: Option<PathBuf>,
    /// Where to write the model directory.
    #[arg(long)]
    out: PathBuf,
    /// Model name (default: the --out folder's name).
    #[arg(long)]
    name: Option<String>,
    /// How the worker assembles text, e.g. "{subject}\n{body}" (default: the text placeholders, one per line).
    #[arg(long)]
    template: Option<String>,
    /// Recommend (and write) the confidence threshold reaching this accuracy on what is not escalated, e.g. 0.95.
    #[arg(long)]
    target_accuracy: Option<f64>,
    /// Texts unlike the training data (CSV / JSON lines) to measure the out-of-distribution gate.
    #[arg(long)]
    foreign: Option<PathBuf>,
    /// Text columns of --foreign (default: --text).
    #[arg(long, value_delimiter = ',')]
    foreign_text: Vec<String>,
    /// Lexical (TF-IDF) layer averaged with the embedding layer: auto (if it helps in cross-validation), on, off.
    #[arg(long, default_value = "auto")]
    lexical: LexicalMode,
    /// The lexical layer's features: auto (chosen by cross-validation), word-pieces (1-2 grams), or
    /// characters (word-piece 1-2 grams and character 3-5 grams within words).
    #[arg(long, value_enum, default_value_t = LexicalFeaturesArg::Auto)]
    lexical_features: LexicalFeaturesArg,
    /// After cross-validation chose the settings, refit the shipped heads on every usable row; figures and
    /// thresholds then come from out-of-fold predictions over every row. `--refit-full false` ships the heads
    /// fitted on the training part.
    #[arg(long, default_value_t = defaults().refit_full, action = clap::ArgAction::Set)]
    refit_full: bool,
    /// A TOML file with a [priority] table (from_head, default, map) for model.toml (default: a head named
    /// `priority`, if one is trained, gives the priority).
    #[arg(long)]
    priority: Option<PathBuf>,
    #[arg(long, default_value_t = defaults().seed)]
    seed: u64,
    /// Share of the data held out for validation.
    #[arg(long, default_value_t = defaults().validation_fraction)]
    validation_fraction: f64,
    /// Hold out fold NUMBER of FOLDS stratified folds instead (e.g. 2/3). Runs of 1/K..K/K hold
    /// out every row once: their validation figures pooled are out of fold (scripts/fine-tune-oof).
    #[arg(long, value_name = "NUMBER/FOLDS", conflicts_with = "validation_fraction")]
    validation_fold: Option<triage::train::split::ValidationFold>,
    /// Labels with fewer examples are left out (with a warning).
    #[arg(long, default_value_t = defaults().min_examples)]
    min_examples: usize,
    /// Regularisation strengths tried by cross-validation (C, larger: weaker).
    #[arg(long, value_delimiter = ',', default_values_t = defaults().c_grid)]
    c: Vec<f64>,
    /// Cross-validation folds (2 to 10).
    #[arg(long, default_value_t = defaults().folds)]
    folds: usize,
    /// Replace a model.toml already in --out.
    #[arg(long)]
    force: bool,
    /// Markdown added to MODEL_CARD.md (architecture, data credit and licence, business rules).
    #[arg(long)]
    card_notes: Option<PathBuf>,
    /// Few-shot examples per label written to few_shot.jsonl for `triage escalate` (the most
    /// typical training messages of each label; they go to the LLM provider). 0: none.
    #[arg(long, default_value_t = defaults().few_shot)]
    few_shot: usize,
    /// Fine-tune the encoder end to end on the first --label head before fitting the heads (needs
    /// scripts/setup --train; --encoder must be an fp32 encoder directory such as runtime/encoders/minilm-l6).
    /// The result is int8-quantized into OUT/encoder; the heads are then fitted on the training part and
    /// calibrated on the validation split, which the encoder never sees.
    #[arg(long)]
    fine_tune: bool,
    /// Most fine-tuning epochs (early stopping on a dev split of the training part may end sooner).
    #[arg(long, default_value_t = FineTuneOptions::default().epochs)]
    fine_tune_epochs: usize,
    /// Epochs without a better dev accuracy before fine-tuning stops.
    #[arg(long, default_value_t = FineTuneOptions::default().patience)]
    fine_tune_patience: usize,
    /// Peak learning rate (linear warm-up over 6% of the steps, then linear decay).
    #[arg(long, default_value_t = FineTuneOptions::default().learning_rate)]
    fine_tune_lr: f64,
    #[arg(long, default_value_t = FineTuneOptions::default().batch_size)]
    fine_tune_batch: usize,
    /// Stop fine-tuning after this many steps in all (0: no limit); for trying the pipeline quickly.
    #[arg(long, default_value_t = 0)]
    fine_tune_max_steps: usize,
    /// Keep OUT/.fine-tune (the fp32 encoder before quantization, the tokenized splits).
    #[arg(long)]
    fine_tune_keep_work: bool,
    /// The Python with ONNX Runtime's training API.
    #[arg(long, env = "TRIAGE_TRAIN_PYTHON", default_value = triage::train::fine_tune::DEFAULT_PYTHON)]
    fine_tune_python: PathBuf,
    /// Another model directory trained on the same data (e.g. the frozen recipe): its validation
    /// figures go beside this model's in the card.
    #[arg(long)]
    compare: Option<PathBuf>,
    #[command(flatten)]
    runtime: RuntimeArgs,
    #[command(flatten)]
    batch: BatchArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LexicalFeaturesArg {
    Auto,
    WordPieces,
    Characters,
}

impl TrainArgs {
    fn options(self) -> Result<TrainOptions> {
        let columns = Columns::parse(&self.text, &self.labels, &self.multi_label)?;
        let mut options = TrainOptions::new(self.data, columns, model_dir(&self.encoder)?, self.out);
        options.name = self.name;
        options.template = self.template.map(|t| t.replace("\\n", "\n"));
        options.target_accuracy = self.target_accuracy;
        options.foreign = self.foreign;
        if !self.foreign_text.is_empty() {
            options.foreign_text = Some(Columns::parse_text(&self.foreign_text)?);
        }
        options.lexical = self.lexical;
        options.lexical_features = match self.lexical_features {
            LexicalFeaturesArg::Auto => None,
            LexicalFeaturesArg::WordPieces => Some(LexicalFeatures::WordPieces),
            LexicalFeaturesArg::Characters => Some(LexicalFeatures::WordPiecesAndCharacters),
        };
        options.refit_full = self.refit_full;
        options.priority = self.priority;
        options.seed = self.seed;
        options.validation_fraction = self.validation_fraction;
        options.validation_fold = self.validation_fold;
        options.min_examples = self.min_examples;
        options.c_grid = self.c;
        options.folds = self.folds;
        options.inference = self.runtime.options();
        options.engine = self.batch.engine();
        options.force = self.force;
        options.card_notes = self.card_notes;
        options.few_shot = self.few_shot;
        options.compare = self.compare;
        if self.fine_tune {
            options.fine_tune = Some(FineTuneOptions {
                python: self.fine_tune_python,
                epochs: self.fine_tune_epochs,
                patience: self.fine_tune_patience,
                learning_rate: self.fine_tune_lr,
                batch_size: self.fine_tune_batch,
                max_steps: self.fine_tune_max_steps,
                keep_work: self.fine_tune_keep_work,
                threads: options.inference.intra_threads,
                ..FineTuneOptions::default()
            });
        }
        Ok(options)
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    let options = args.options()?;
    let report = triage::train::train(&options, &StageProgress::new())?;
    for h in &report.single {
        println!(
            "{}: accuracy {:.3}, macro-F1 {:.3} (embedding alone {:.3}; TF-IDF baseline {:.3})",
            h.name,
            h.validation.accuracy,
            h.validation.macro_f1,
            h.validation_embedding_only.accuracy,
            h.validation_tfidf_baseline.accuracy
        );
    }
    for m in &report.multi {
        println!("{}: micro-F1 {:.3} (TF-IDF baseline {:.3})", m.name, m.validation_micro_f1, m.validation_tfidf_baseline_micro_f1);
    }
    if let Some(p) = report.escalation.as_ref().and_then(|e| e.recommended) {
        println!("escalation threshold {:.2}: escalates {:.1}% of validation", p.threshold, p.escalated * 100.0);
    }
    if let Some(f) = report.ood.as_ref().and_then(|o| o.foreign.as_ref()) {
        println!("out-of-distribution AUROC {:.3} (1 - confidence: {:.3})", f.auroc, f.confidence_auroc);
    }
    println!("model written to {} (see MODEL_CARD.md)", options.out.display());
    Ok(())
}
