//! Shared helpers for integration tests: where the project's generated files are.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use triage::model::{InferenceOptions, Model};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn default_model_dir() -> PathBuf {
    root().join("models/customer-service")
}

pub fn test_model_dir(name: &str) -> PathBuf {
    let dir = root().join("runtime/test-models").join(name);
    assert!(dir.is_dir(), "{} is missing: run scripts/setup (it generates the test models)", dir.display());
    dir
}

/// The shared data folder beside the checkout, if this machine has it.
pub fn shared_data(relative: &str) -> Option<PathBuf> {
    let path = root().join("../shared/data").join(relative);
    if path.exists() {
        Some(path)
    } else {
        eprintln!("skipping: {} is absent on this machine", path.display());
        None
    }
}

pub fn load(dir: &std::path::Path) -> Arc<Model> {
    Arc::new(Model::load(dir, &InferenceOptions::default()).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display())))
}

/// The default model, loaded once per test binary (loading composes sessions: not free).
pub fn default_model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL.get_or_init(|| load(&default_model_dir())).clone()
}

/// Copy a model directory into a temp dir so a test can break it.
pub fn copy_model(src: &std::path::Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(src).expect("read model dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
    }
    dir
}

pub mod worker;
