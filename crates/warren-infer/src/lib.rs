//! Warren's model workers: a trained model attached to a queue.
//!
//! This is the only crate that knows about machine learning. A model runs
//! on a [`runtime::ModelRuntime`] (ONNX Runtime, or tract when ONNX Runtime
//! is not installed); a task ([`task`]) turns message bodies into model
//! inputs and model outputs into reply bodies.

pub mod deploy;
pub mod metrics;
pub mod runtime;
pub mod schedule;
pub mod task;
pub mod tensor;
pub mod worker;
