//! The tasks on real models, against reference values ONNX Runtime gives
//! through Python (tests/models in the repository). One test binary, so
//! the release build links the runtimes once.

mod classification;
mod embedding;
mod tensor;

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The test models and reference files.
pub fn test_models() -> PathBuf {
    repository().join("tests/models")
}

/// ONNX Runtime as `scripts/fetch-models.sh` installed it into the
/// repository's virtualenv, unless ORT_DYLIB_PATH names a library (then
/// None: the runtime finds it there itself).
pub fn onnxruntime_library() -> Option<PathBuf> {
    if std::env::var_os("ORT_DYLIB_PATH").is_some() {
        return None;
    }
    let venv = repository().join(".venv/lib");
    let found = std::fs::read_dir(venv).ok().and_then(|pythons| {
        pythons.flatten().find_map(|python| {
            let capi = python.path().join("site-packages/onnxruntime/capi");
            std::fs::read_dir(capi).ok()?.flatten().find_map(|entry| {
                let path = entry.path();
                let name = path.file_name()?.to_str()?.to_owned();
                name.starts_with("libonnxruntime.so.").then_some(path)
            })
        })
    });
    Some(found.expect("ONNX Runtime in .venv; run `bash scripts/fetch-models.sh`"))
}
