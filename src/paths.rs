//! Finding the project's own files (the ONNX Runtime library, the default model) from an
//! installed binary or a checkout, without configuration.

use std::path::{Path, PathBuf};

/// The default model, relative to the project root.
pub const DEFAULT_MODEL_DIR: &str = "models/customer-service";

/// Directories that may be the project root: the executable's ancestors (a checkout's
/// target/release/triage, or /opt/triage/bin/triage in an image), then the working
/// directory's ancestors.
pub fn project_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    roots
}

/// The first `root/relative` that exists.
pub fn find_in_project(relative: &str) -> Option<PathBuf> {
    project_roots().into_iter().map(|root| root.join(relative)).find(|p| p.exists())
}
