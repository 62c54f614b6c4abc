//! What a model does with a message: the tasks. A task decodes each
//! request body (a body it cannot decode is a poison input, reported with
//! a reason and never retried), runs a batch of decoded requests through
//! the model in one inference, and encodes one reply body per request.

pub mod classification;
pub mod embedding;
pub mod tensor;

use crate::runtime::RuntimeError;
use crate::tensor::TensorInfo;

/// A request body the task could decode, ready for batching.
pub enum Decoded {
    Text(String),
    /// One preprocessed image in the model's layout.
    Image(Vec<f32>),
    /// A KServe v2 request's tensors.
    Tensors(tensor::TensorRequest),
}

/// A reply body and its content type.
pub struct Encoded {
    pub body: Vec<u8>,
    pub content_type: &'static str,
}

pub trait Task: Send + Sync {
    /// Decodes one request; `Err` carries the reason the input is poison.
    fn decode(&self, body: &[u8], content_type: Option<&str>) -> Result<Decoded, String>;

    /// Runs one batch; one reply per request, in order. An error fails the
    /// whole batch (it is retried, up to the queue's delivery limit).
    fn infer(&self, batch: Vec<Decoded>) -> Result<Vec<Encoded>, TaskError>;

    /// The backend running the model, for reply headers and logs.
    fn backend(&self) -> &'static str;

    /// The input and output tensors requests carry as they are, for a task
    /// whose requests are the model's own tensors; None for a task that
    /// turns texts or images into them.
    fn tensors(&self) -> Option<(Vec<TensorInfo>, Vec<TensorInfo>)> {
        None
    }

    /// What a decoded request costs a batch, for the batch's budget
    /// (`max_batch_tokens`): its tokens for a text model, else 1.
    fn cost(&self, _input: &Decoded) -> usize {
        1
    }

    /// What a request body will cost once decoded; None for a body the
    /// task refuses (it never reaches a batch).
    fn body_cost(&self, body: &[u8], content_type: Option<&str>) -> Option<usize> {
        let decoded = self.decode(body, content_type).ok()?;
        Some(self.cost(&decoded))
    }

    /// A request body the task takes, for one inference before a new
    /// version is given traffic (the first run of a model pays for its
    /// allocations and kernels); None when the task has no such body.
    fn warm_up_request(&self) -> Option<Vec<u8>> {
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{0}")]
    Failed(String),
}
