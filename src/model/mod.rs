//! A model directory: `model.onnx`, `tokenizer.json` and a descriptor (`model.toml` and/or an
//! HF Optimum `config.json`), loaded into something that turns text into [`Prediction`]s.
//!
//! Loading validates the directory against the graph itself (inputs it can feed, outputs the
//! heads name, label counts), so a broken model fails at start-up with the problem named,
//! never at the first message.

pub mod descriptor;
pub mod heads;
pub mod linear;
pub mod runtime;
mod session;
pub mod text;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use descriptor::{
    Activation, Architecture, Descriptor, DescriptorFile, EscalationSpec, FittedHead, HeadKind, HeadSpec, OodSpec, PrioritySpec,
    TrainingRecord,
};
pub use heads::{HeadOutput, HeadResult, HeadSet, LabelScore, Prediction};
pub use runtime::{Runtime, RuntimeError};
pub use session::InferenceSession;
pub use text::{Encoded, Rendered, Template, TextEncoder};

pub const MODEL_FILE: &str = "model.onnx";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: missing {what}", path.display())]
    MissingFile { path: PathBuf, what: &'static str },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: no model.toml or config.json describes this model", dir.display())]
    NoDescriptor { dir: PathBuf },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{}: ONNX Runtime could not load the graph: {detail}", path.display())]
    Graph { path: PathBuf, detail: String },
    #[error("head `{head}` reads output `{output}`, but the graph has no such output (it has: {available})")]
    MissingOutput { head: String, output: String, available: String },
    #[error("graph input `{name}` is not one triage can feed (input_ids, attention_mask, token_type_ids as int64 or int32)")]
    UnsupportedInput { name: String },
    #[error("head `{head}`: output `{output}` has shape {found}, expected {expected}")]
    OutputShape { head: String, output: String, expected: String, found: String },
    #[error("inference failed: {0}")]
    Inference(String),
}

impl ModelError {
    pub(crate) fn invalid(path: impl AsRef<Path>, reason: impl Into<String>) -> Self {
        ModelError::Invalid { path: path.as_ref().to_path_buf(), reason: reason.into() }
    }

    pub(crate) fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        ModelError::Io { path: path.as_ref().to_path_buf(), source }
    }
}

/// Where inference runs. Anything but CPU falls back to CPU with a warning when the loaded
/// ONNX Runtime library (or the machine) cannot provide it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Cpu,
    Cuda,
    Tensorrt,
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
            Provider::Tensorrt => "tensorrt",
        })
    }
}

impl std::str::FromStr for Provider {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Provider::Cpu),
            "cuda" => Ok(Provider::Cuda),
            "tensorrt" => Ok(Provider::Tensorrt),
            other => Err(format!("unknown execution provider `{other}` (cpu, cuda, tensorrt)")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizationLevel {
    Disable,
    Basic,
    Extended,
    All,
}

/// How sessions are built: which library, which providers, how many threads.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceOptions {
    /// Path to libonnxruntime.so; unset: ORT_DYLIB_PATH, then runtime/onnxruntime/.
    pub ort_library: Option<PathBuf>,
    /// Providers in order of preference; CPU is always the last resort.
    pub providers: Vec<Provider>,
    pub gpu_device_id: i32,
    /// Folders holding the CUDA 13 and cuDNN 9 libraries the CUDA provider needs (e.g. the
    /// `lib` folders of pip's nvidia-* packages), loaded before the first GPU session; unset:
    /// the system's library path.
    pub cuda_library_dirs: Vec<PathBuf>,
    /// Intra-op threads per session (0: ONNX Runtime's default, one per core).
    pub intra_threads: usize,
    pub optimization: OptimizationLevel,
    /// Override the descriptor's max_length (tokens).
    pub max_length: Option<usize>,
    /// Override the descriptor's text template.
    pub template: Option<String>,
}

impl Default for InferenceOptions {
    fn default() -> Self {
        InferenceOptions {
            ort_library: None,
            providers: vec![Provider::Cpu],
            gpu_device_id: 0,
            cuda_library_dirs: Vec::new(),
            intra_threads: 0,
            optimization: OptimizationLevel::All,
            max_length: None,
            template: None,
        }
    }
}

/// Identity of a loaded model, carried by every result.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub name: String,
    /// The descriptor's version, else the fingerprint.
    pub version: String,
    /// First 12 hex digits of model.onnx's SHA-256.
    pub fingerprint: String,
    pub dir: PathBuf,
    pub max_length: usize,
    /// The provider sessions actually run on (after any fallback).
    pub provider: Provider,
}

/// A loaded model directory. Cheap to share (`Arc`); each inference thread takes its own
/// [`InferenceSession`] from it.
pub struct Model {
    info: ModelInfo,
    encoder: TextEncoder,
    template: Template,
    heads: Arc<HeadSet>,
    descriptor: Descriptor,
    onnx_path: PathBuf,
    runtime: Runtime,
    options: InferenceOptions,
    layout: session::InputLayout,
    /// The session built while validating; handed to the first caller instead of building again.
    spare: Mutex<Option<ort::session::Session>>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("info", &self.info).finish_non_exhaustive()
    }
}

impl Model {
    pub fn load(dir: impl AsRef<Path>, options: &InferenceOptions) -> Result<Model, ModelError> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(ModelError::MissingFile { path: dir.to_path_buf(), what: "model directory" });
        }
        let descriptor = Descriptor::load(dir)?;
        let onnx_path = dir.join(MODEL_FILE);
        if !onnx_path.is_file() {
            return Err(ModelError::MissingFile { path: onnx_path, what: "ONNX graph (for the default model, `scripts/setup` builds it)" });
        }
        let max_length = options.max_length.unwrap_or(descriptor.max_length);
        let encoder = TextEncoder::from_file(&dir.join(TOKENIZER_FILE), max_length)?;
        let template_text = options.template.clone().unwrap_or_else(|| descriptor.template.clone());
        let template =
            Template::parse(&template_text).map_err(|reason| ModelError::invalid(dir.join(descriptor::DESCRIPTOR_FILE), reason))?;
        let runtime = runtime::init(options.ort_library.as_deref())?;
        let fingerprint = fingerprint(&onnx_path)?;
        let weights = linear::HeadWeights::load(dir, &descriptor)?;
        let heads = Arc::new(HeadSet::new(
            descriptor.heads.clone(),
            descriptor.category_head,
            descriptor.priority.clone(),
            weights,
            descriptor.ood.clone(),
        ));

        let (first, provider) = session::build(&runtime, &onnx_path, options)?;
        let layout = session::InputLayout::detect(first.inputs())?;
        session::check_outputs(first.outputs(), &heads)?;

        let info = ModelInfo {
            name: descriptor.name.clone(),
            version: descriptor.version.clone().unwrap_or_else(|| fingerprint.clone()),
            fingerprint,
            dir: dir.to_path_buf(),
            max_length,
            provider,
        };
        tracing::info!(model = %info.name, version = %info.version, provider = %info.provider, max_length, "model loaded");
        Ok(Model {
            info,
            encoder,
            template,
            heads,
            descriptor,
            onnx_path,
            runtime,
            options: options.clone(),
            layout,
            spare: Mutex::new(Some(first)),
        })
    }

    /// What the model directory says about itself (recommended thresholds, training record).
    pub fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn encoder(&self) -> &TextEncoder {
        &self.encoder
    }

    pub fn template(&self) -> &Template {
        &self.template
    }

    pub fn heads(&self) -> &HeadSet {
        &self.heads
    }

    /// Intra-op threads per session as configured (0: ONNX Runtime's default).
    pub fn intra_threads(&self) -> usize {
        self.options.intra_threads
    }

    /// A session with `intra` intra-op threads (None: as configured).
    pub fn session_with_threads(&self, intra: Option<usize>) -> Result<InferenceSession, ModelError> {
        match intra {
            Some(n) if n != self.options.intra_threads => {
                let options = InferenceOptions { intra_threads: n, ..self.options.clone() };
                Ok(InferenceSession::new(
                    session::build(&self.runtime, &self.onnx_path, &options)?.0,
                    self.layout.clone(),
                    self.heads.clone(),
                ))
            }
            _ => self.session(),
        }
    }

    /// A session for one inference thread (`Session::run` needs `&mut`).
    pub fn session(&self) -> Result<InferenceSession, ModelError> {
        let spare = self.spare.lock().map(|mut s| s.take()).unwrap_or(None);
        let session = match spare {
            Some(s) => s,
            None => session::build(&self.runtime, &self.onnx_path, &self.options)?.0,
        };
        Ok(InferenceSession::new(session, self.layout.clone(), self.heads.clone()))
    }
}

fn fingerprint(path: &Path) -> Result<String, ModelError> {
    let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| ModelError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize())[..12].to_string())
}
