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

/// A dataset of the shared data folder beside the checkout (every developer machine and CI
/// have it). A test that needs one fails without it: it never passes having checked nothing.
pub fn shared_data(relative: &str) -> PathBuf {
    let path = root().join("../shared/data").join(relative);
    assert!(path.exists(), "{} is absent: this test needs the shared datasets beside the checkout (../shared/data)", path.display());
    path
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

/// `text` with `from` replaced by `to`; fails when `from` is absent (an edit that silently
/// does nothing would run the test on something else than it says).
pub fn replaced(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "`{from}` is not in the text this test edits:\n{text}");
    text.replace(from, to)
}

/// A table's DDL as the first release made it: without the columns added since, versioned by
/// `processed_time_ms` (what `triage schema apply` must upgrade).
pub fn first_release_table(ddl: &str) -> String {
    use triage::sink::clickhouse::schema::ADDED_COLUMNS;
    let kept: Vec<&str> = ddl.lines().filter(|l| !ADDED_COLUMNS.iter().any(|c| l.contains(&format!("`{c}`")))).collect();
    let ddl = replaced(&kept.join("\n"), "`worker_id` String,", "`worker_id` String");
    replaced(&ddl, "row_version)", "processed_time_ms)")
}

pub mod worker;
