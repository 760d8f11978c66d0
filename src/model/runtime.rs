//! Finding and loading the ONNX Runtime shared library.
//!
//! `ort` is built with `load-dynamic`: nothing is downloaded at build time, and the library is
//! dlopen'ed at run time. The lookup order is: an explicit path (config / `--ort-library`),
//! then `ORT_DYLIB_PATH`, then the project-local `runtime/onnxruntime/` folder that
//! `scripts/setup` fills from the PyPI wheel, searched upwards from the executable and from the
//! working directory. ONNX Runtime's environment is process-wide, so the first successful
//! initialisation wins and later calls reuse it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// ONNX Runtime minor version the `ort` crate's API needs (ort 2.0.0-rc.15 -> 1.31).
pub const REQUIRED_ORT_MINOR: u32 = ort::MINOR_VERSION;

/// Where `scripts/setup` installs the library, relative to the project root.
pub const PROJECT_LOCAL_DIR: &str = "runtime/onnxruntime";
const LIBRARY_FILE: &str = "libonnxruntime.so";

const INSTALL_HINT: &str = "run `scripts/setup` (installs the PyPI onnxruntime wheel's library into runtime/onnxruntime/), or point ORT_DYLIB_PATH / --ort-library at a libonnxruntime.so";

#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error("ONNX Runtime library not found (looked for {searched}); {INSTALL_HINT}")]
    NotFound { searched: String },
    #[error("ONNX Runtime library at {path} could not be loaded ({detail}); {INSTALL_HINT}")]
    Unloadable { path: PathBuf, detail: String },
    #[error("ONNX Runtime library at {path} is version {found}, but triage needs 1.{REQUIRED_ORT_MINOR} or newer; {INSTALL_HINT}")]
    TooOld { path: PathBuf, found: String },
    #[error("ONNX Runtime environment could not be created: {0}")]
    Environment(String),
}

/// A loaded ONNX Runtime: where it came from and the process-wide environment.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub library: PathBuf,
    pub(crate) environment: ort::environment::Environment,
}

static RUNTIME: OnceLock<Result<Runtime, RuntimeError>> = OnceLock::new();

/// Load ONNX Runtime once per process. `explicit` is the configured path, if any; it only
/// matters on the first call (ORT cannot be unloaded or swapped once loaded).
pub fn init(explicit: Option<&Path>) -> Result<Runtime, RuntimeError> {
    RUNTIME.get_or_init(|| load(explicit)).clone()
}

fn load(explicit: Option<&Path>) -> Result<Runtime, RuntimeError> {
    let path = locate(explicit, std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))?;
    let builder = ort::init_from(&path).map_err(|e| classify_load_error(&path, e))?;
    let environment = builder.with_name("triage").with_telemetry(false).build().map_err(|e| RuntimeError::Environment(e.to_string()))?;
    tracing::debug!(library = %path.display(), "ONNX Runtime loaded");
    Ok(Runtime { library: path, environment })
}

fn classify_load_error(path: &Path, error: ort::LoadDynamicError) -> RuntimeError {
    match error {
        ort::LoadDynamicError::BadVersion { version_str, .. } => RuntimeError::TooOld { path: path.to_path_buf(), found: version_str },
        other => RuntimeError::Unloadable { path: path.to_path_buf(), detail: other.to_string() },
    }
}

/// Resolve the library path without loading it.
pub fn locate(explicit: Option<&Path>, env_path: Option<PathBuf>) -> Result<PathBuf, RuntimeError> {
    if let Some(path) = explicit {
        return existing(path);
    }
    if let Some(path) = env_path.filter(|p| !p.as_os_str().is_empty()) {
        return existing(&path);
    }
    let roots = crate::paths::project_roots();
    let candidates: Vec<PathBuf> = roots.iter().map(|root| root.join(PROJECT_LOCAL_DIR).join(LIBRARY_FILE)).collect();
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| RuntimeError::NotFound {
        searched: format!(
            "ORT_DYLIB_PATH (unset) and {PROJECT_LOCAL_DIR}/{LIBRARY_FILE} above the executable and the working directory ({} places)",
            candidates.len()
        ),
    })
}

fn existing(path: &Path) -> Result<PathBuf, RuntimeError> {
    if path.is_file() {
        Ok(path.to_path_buf())
    } else {
        Err(RuntimeError::NotFound { searched: path.display().to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_path_that_does_not_exist_is_named() {
        let err = locate(Some(Path::new("/nonexistent/libonnxruntime.so")), None).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/nonexistent/libonnxruntime.so"), "{text}");
        assert!(text.contains("scripts/setup"), "{text}");
    }

    #[test]
    fn env_path_is_used_before_project_local() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libonnxruntime.so.1.31.1");
        std::fs::write(&lib, b"not really a library").unwrap();
        assert_eq!(locate(None, Some(lib.clone())).unwrap(), lib);
    }

    #[test]
    fn explicit_path_wins_over_env() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.so");
        let b = dir.path().join("b.so");
        std::fs::write(&a, b"").unwrap();
        std::fs::write(&b, b"").unwrap();
        assert_eq!(locate(Some(&a), Some(b)).unwrap(), a);
    }
}
