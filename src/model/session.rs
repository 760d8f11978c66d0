//! One ONNX Runtime session: padded batch tensors in, per-message predictions out.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use ndarray::Array2;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::{Outlet, Tensor, TensorElementType};

use super::{Encoded, HeadSet, InferenceOptions, ModelError, OptimizationLevel, Prediction, Provider, Runtime};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    InputIds,
    AttentionMask,
    TokenTypeIds,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdType {
    I64,
    I32,
}

/// The graph's inputs as detected from the graph, in the graph's order.
#[derive(Debug, Clone)]
pub(crate) struct InputLayout {
    inputs: Vec<(String, Role, IdType)>,
}

impl InputLayout {
    pub(crate) fn detect(inputs: &[Outlet]) -> Result<Self, ModelError> {
        let mut out = Vec::new();
        for input in inputs {
            let role = match input.name() {
                "input_ids" => Role::InputIds,
                "attention_mask" => Role::AttentionMask,
                "token_type_ids" => Role::TokenTypeIds,
                other => return Err(ModelError::UnsupportedInput { name: other.to_string() }),
            };
            let id_type = match input.dtype().tensor_type() {
                Some(TensorElementType::Int64) => IdType::I64,
                Some(TensorElementType::Int32) => IdType::I32,
                _ => return Err(ModelError::UnsupportedInput { name: input.name().to_string() }),
            };
            out.push((input.name().to_string(), role, id_type));
        }
        if !out.iter().any(|(_, r, _)| *r == Role::InputIds) {
            return Err(ModelError::UnsupportedInput { name: "(no input_ids input)".into() });
        }
        Ok(InputLayout { inputs: out })
    }
}

pub(crate) fn check_outputs(outputs: &[Outlet], heads: &HeadSet) -> Result<(), ModelError> {
    let available = || outputs.iter().map(|o| o.name().to_string()).collect::<Vec<_>>().join(", ");
    let specs = heads.heads();
    for (index, head) in specs.iter().enumerate() {
        let Some(outlet) = outputs.iter().find(|o| o.name() == head.output) else {
            return Err(ModelError::MissingOutput { head: head.name.clone(), output: head.output.clone(), available: available() });
        };
        let Some(shape) = outlet.dtype().tensor_shape() else {
            continue;
        };
        let dims: Vec<i64> = shape.iter().copied().collect();
        let expected = heads.expected_width(index);
        let width_ok = expected.is_none_or(|w| dims.last().is_none_or(|&d| d <= 0 || d as usize == w));
        if dims.len() != 2 || !width_ok {
            return Err(ModelError::OutputShape {
                head: head.name.clone(),
                output: head.output.clone(),
                expected: expected.map_or_else(|| "[batch, dim]".to_string(), |w| format!("[batch, {w}]")),
                found: format!("{dims:?}"),
            });
        }
    }
    if let Some(ood) = heads.ood() {
        if !outputs.iter().any(|o| o.name() == ood.output) {
            return Err(ModelError::MissingOutput { head: "ood".into(), output: ood.output.clone(), available: available() });
        }
    }
    Ok(())
}

/// Build a session with the requested providers, falling back to CPU (with a warning) when a
/// provider cannot be registered. Returns the provider actually in use.
/// Load the CUDA / cuDNN libraries from the configured folders, once per process. Returns the
/// ones found nowhere (the provider then fails to register and triage falls back to CPU).
fn preload_cuda(dirs: &[std::path::PathBuf]) -> Vec<&'static str> {
    static MISSING: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    MISSING
        .get_or_init(|| {
            let mut missing = Vec::new();
            for name in ort::ep::cuda::CUDA_DYLIBS.iter().chain(ort::ep::cuda::CUDNN_DYLIBS) {
                let loaded = dirs.iter().map(|d| d.join(name)).filter(|p| p.is_file()).any(|p| ort::util::preload_dylib(&p).is_ok());
                if !loaded {
                    missing.push(*name);
                }
            }
            missing
        })
        .clone()
}

pub(crate) fn build(runtime: &Runtime, path: &Path, options: &InferenceOptions) -> Result<(Session, Provider), ModelError> {
    let graph_err = |e: ort::Error| ModelError::Graph { path: path.to_path_buf(), detail: e.to_string() };
    let builder_err = |e: ort::Error<ort::session::builder::SessionBuilder>| graph_err(ort::Error::<()>::from(e));
    let mut builder = Session::builder(&runtime.environment).map_err(graph_err)?;
    builder = builder
        .with_optimization_level(match options.optimization {
            OptimizationLevel::Disable => GraphOptimizationLevel::Disable,
            OptimizationLevel::Basic => GraphOptimizationLevel::Level1,
            OptimizationLevel::Extended => GraphOptimizationLevel::Level2,
            OptimizationLevel::All => GraphOptimizationLevel::All,
        })
        .map_err(builder_err)?;
    if options.intra_threads > 0 {
        builder = builder.with_intra_threads(options.intra_threads).map_err(builder_err)?;
    }
    let mut active = Provider::Cpu;
    let wants_gpu = options.providers.iter().any(|p| *p != Provider::Cpu);
    if wants_gpu && !options.cuda_library_dirs.is_empty() {
        let missing = preload_cuda(&options.cuda_library_dirs);
        if !missing.is_empty() {
            tracing::warn!(missing = %missing.join(", "), dirs = ?options.cuda_library_dirs, "CUDA/cuDNN libraries not found in cuda_library_dirs");
        }
    }
    for provider in &options.providers {
        let dispatch = match provider {
            Provider::Cpu => break,
            Provider::Cuda => ort::ep::CUDA::default().with_device_id(options.gpu_device_id).build(),
            Provider::Tensorrt => ort::ep::TensorRT::default().with_device_id(options.gpu_device_id).build(),
        };
        match builder.with_execution_providers([dispatch.error_on_failure()]) {
            Ok(b) => {
                builder = b;
                active = *provider;
                break;
            }
            Err(e) => {
                tracing::warn!(provider = %provider, error = %e, "execution provider unavailable; falling back");
                builder = e.recover();
            }
        }
    }
    if active == Provider::Cpu && options.providers.iter().any(|p| *p != Provider::Cpu) {
        tracing::warn!("running on CPU: no requested GPU execution provider could be registered with this ONNX Runtime library");
    }
    let session = builder.commit_from_file(path).map_err(graph_err)?;
    Ok((session, active))
}

/// A session owned by one inference thread.
pub struct InferenceSession {
    session: Session,
    layout: InputLayout,
    heads: Arc<HeadSet>,
}

impl InferenceSession {
    pub(crate) fn new(session: Session, layout: InputLayout, heads: Arc<HeadSet>) -> Self {
        InferenceSession { session, layout, heads }
    }

    /// Run one batch (padded to its longest member); predictions come back in batch order.
    pub fn run(&mut self, batch: &[&Encoded]) -> Result<Vec<Prediction>, ModelError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let rows = batch.len();
        let width = batch.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let mut ids = Array2::<i64>::zeros((rows, width));
        let mut mask = Array2::<i64>::zeros((rows, width));
        let mut types = Array2::<i64>::zeros((rows, width));
        for (r, enc) in batch.iter().enumerate() {
            for (c, (&id, &ty)) in enc.ids.iter().zip(&enc.type_ids).enumerate() {
                ids[[r, c]] = i64::from(id);
                mask[[r, c]] = 1;
                types[[r, c]] = i64::from(ty);
            }
        }
        let err = |e: ort::Error| ModelError::Inference(e.to_string());
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(self.layout.inputs.len());
        for (name, role, id_type) in &self.layout.inputs {
            let source = match role {
                Role::InputIds => &ids,
                Role::AttentionMask => &mask,
                Role::TokenTypeIds => &types,
            };
            let value: SessionInputValue<'_> = match id_type {
                IdType::I64 => Tensor::from_array(source.clone()).map_err(err)?.into(),
                IdType::I32 => Tensor::from_array(source.mapv(|v| v as i32)).map_err(err)?.into(),
            };
            inputs.push((Cow::Owned(name.clone()), value));
        }
        let outputs = self.session.run(inputs).map_err(err)?;

        let mut per_output: Vec<(&[f32], usize)> = Vec::with_capacity(self.heads.outputs().len());
        for name in self.heads.outputs() {
            let value = outputs.get(name.as_str()).ok_or_else(|| ModelError::MissingOutput {
                head: "(any)".into(),
                output: name.clone(),
                available: String::new(),
            })?;
            let (shape, data) = value.try_extract_tensor::<f32>().map_err(err)?;
            let dims: Vec<i64> = shape.iter().copied().collect();
            let width = dims.get(1).copied().unwrap_or(0) as usize;
            if dims.len() != 2 || dims[0] as usize != rows {
                return Err(ModelError::OutputShape {
                    head: "(any)".into(),
                    output: name.clone(),
                    expected: format!("[{rows}, width]"),
                    found: format!("{dims:?}"),
                });
            }
            per_output.push((data, width));
        }
        // A graph with dynamic output shapes can only be checked here, on real rows.
        for (index, head) in self.heads.heads().iter().enumerate() {
            let output = self.heads.output_of(index);
            if let Some(expected) = self.heads.expected_width(index) {
                if per_output[output].1 != expected {
                    return Err(ModelError::OutputShape {
                        head: head.name.clone(),
                        output: head.output.clone(),
                        expected: format!("[{rows}, {expected}]"),
                        found: format!("[{rows}, {}]", per_output[output].1),
                    });
                }
            }
        }
        let mut predictions = Vec::with_capacity(rows);
        let mut row_slices: Vec<&[f32]> = Vec::with_capacity(per_output.len());
        for (r, encoded) in batch.iter().enumerate() {
            row_slices.clear();
            row_slices.extend(per_output.iter().map(|(data, width)| &data[r * width..(r + 1) * width]));
            predictions.push(self.heads.predict(&row_slices, encoded.lexical_input()));
        }
        Ok(predictions)
    }
}
