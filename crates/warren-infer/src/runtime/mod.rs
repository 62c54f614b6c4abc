//! Running a model: the [`ModelRuntime`] trait and its two backends.
//!
//! * [`onnx::OnnxRuntime`]: ONNX Runtime through the `ort` crate, loading
//!   `libonnxruntime` at run time (nothing is downloaded at build time);
//!   execution providers such as CUDA where the library has them.
//! * [`tract::TractRuntime`]: `tract`, pure Rust, always available; used
//!   when ONNX Runtime cannot be found.

pub mod onnx;
pub mod tract;

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::tensor::{Tensor, TensorInfo};

/// A loaded model that runs batches.
pub trait ModelRuntime: Send + Sync {
    /// Which backend runs the model: "onnxruntime" or "tract".
    fn backend(&self) -> &'static str;
    fn inputs(&self) -> &[TensorInfo];
    fn outputs(&self) -> &[TensorInfo];
    /// Runs one batch; inputs are matched to the model's by name, and the
    /// outputs come back in the model's order.
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError>;
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("ONNX Runtime's library was not found ({0})")]
    LibraryNotFound(String),
    #[error("ONNX Runtime could not be loaded from {path}: {reason}")]
    LibraryUnusable { path: PathBuf, reason: String },
    #[error("loading model {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("the model has no input named '{0}'")]
    UnknownInput(String),
    #[error("input '{name}': {reason}")]
    BadInput { name: String, reason: String },
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("output '{name}' has an element type Warren does not handle ({element_type})")]
    UnsupportedOutput { name: String, element_type: String },
}

/// Which backend to use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// ONNX Runtime when its library is found, else tract.
    #[default]
    Auto,
    Onnxruntime,
    Tract,
}

/// How models are run; the `[runtime]` part of a model's configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    #[serde(default)]
    pub backend: Backend,
    /// `libonnxruntime.so` to load; otherwise `ORT_DYLIB_PATH`, then the
    /// library inside an installed `onnxruntime` Python package.
    pub onnxruntime_library: Option<PathBuf>,
    /// ONNX Runtime execution providers to try in order, e.g. ["cuda"];
    /// the CPU is always the last resort.
    #[serde(default)]
    pub execution_providers: Vec<String>,
    /// Threads one inference may use (0 or absent: the cores the process
    /// may use, shared between the model's instances; see
    /// `ModelConfig::threads`).
    pub threads: Option<usize>,
}

/// Loads a model with the configured backend. With `Backend::Auto`, a
/// machine without ONNX Runtime gets tract and one log line saying so.
pub fn load(model: &Path, config: &RuntimeConfig) -> Result<Box<dyn ModelRuntime>, RuntimeError> {
    match config.backend {
        Backend::Onnxruntime => Ok(Box::new(onnx::OnnxRuntime::load(model, config)?)),
        Backend::Tract => Ok(Box::new(tract::TractRuntime::load(model)?)),
        Backend::Auto => match onnx::OnnxRuntime::load(model, config) {
            Ok(runtime) => Ok(Box::new(runtime)),
            Err(
                error @ (RuntimeError::LibraryNotFound(_) | RuntimeError::LibraryUnusable { .. }),
            ) => {
                tracing::warn!(model = %model.display(), reason = %error,
                    "ONNX Runtime is not available; running the model on tract (pure Rust)");
                Ok(Box::new(tract::TractRuntime::load(model)?))
            }
            Err(other) => Err(other),
        },
    }
}
