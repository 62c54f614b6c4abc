//! The `embedding` task: UTF-8 text in, a sentence embedding out.
//!
//! Texts are tokenized with the model's HuggingFace `tokenizer.json`,
//! grouped by length and padded to the longest of their group, run through
//! the model, and the
//! token embeddings are pooled (the mean over the attention mask, or the
//! first token) and L2-normalised, as sentence-transformers does.

use std::path::Path;

use tokenizers::{Encoding, Tokenizer, TruncationParams};

use crate::runtime::{ModelRuntime, RuntimeError};
use crate::task::{Decoded, Encoded, Task, TaskError};
use crate::tensor::{Tensor, TensorData};

/// Tokens a text is cut to when neither the configuration nor the tokenizer
/// says: BERT-family models have 512 positions.
pub const MAX_TOKENS_DEFAULT: usize = 512;

/// How token embeddings become one vector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The mean of the token embeddings, padding excluded.
    #[default]
    Mean,
    /// The first token's embedding ([CLS]).
    Cls,
}

#[derive(Debug, thiserror::Error)]
pub enum EmbeddingError {
    #[error("loading the tokenizer {path}: {reason}")]
    Tokenizer { path: String, reason: String },
    #[error("tokenizing: {0}")]
    Tokenize(String),
    #[error("the model has no '{0}' input; an embedding model takes input_ids and attention_mask")]
    MissingInput(&'static str),
    #[error("the model's output has shape {0:?}; expected [batch, tokens, dims] or [batch, dims]")]
    OutputShape(Vec<usize>),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

pub struct EmbeddingModel {
    tokenizer: Tokenizer,
    runtime: Box<dyn ModelRuntime>,
    pooling: Pooling,
    normalize: bool,
    /// Whether the model takes `token_type_ids` (BERT does; others not).
    token_type_ids: bool,
    pad_id: i64,
}

impl EmbeddingModel {
    pub fn new(
        runtime: Box<dyn ModelRuntime>,
        tokenizer_path: &Path,
        pooling: Pooling,
        normalize: bool,
        max_tokens: Option<usize>,
    ) -> Result<Self, EmbeddingError> {
        let tokenizer_error = |reason: String| EmbeddingError::Tokenizer {
            path: tokenizer_path.display().to_string(),
            reason,
        };
        let mut tokenizer = Tokenizer::from_file(tokenizer_path)
            .map_err(|error| tokenizer_error(error.to_string()))?;
        // Batches are padded here, per group of similar lengths, with the
        // tokenizer's own pad token when it names one.
        let pad_id = tokenizer
            .get_padding()
            .map(|padding| padding.pad_id)
            .or_else(|| tokenizer.token_to_id("[PAD]"))
            .unwrap_or(0) as i64;
        tokenizer.with_padding(None);
        let max_length = max_tokens
            .or_else(|| {
                tokenizer
                    .get_truncation()
                    .map(|truncation| truncation.max_length)
            })
            .unwrap_or(MAX_TOKENS_DEFAULT);
        let truncation = TruncationParams {
            max_length,
            ..tokenizer.get_truncation().cloned().unwrap_or_default()
        };
        tokenizer
            .with_truncation(Some(truncation))
            .map_err(|error| tokenizer_error(error.to_string()))?;
        let has_input = |name: &str| runtime.inputs().iter().any(|input| input.name == name);
        for required in ["input_ids", "attention_mask"] {
            if !has_input(required) {
                return Err(EmbeddingError::MissingInput(required));
            }
        }
        let token_type_ids = has_input("token_type_ids");
        Ok(Self {
            tokenizer,
            runtime,
            pooling,
            normalize,
            token_type_ids,
            pad_id,
        })
    }

    pub fn runtime(&self) -> &dyn ModelRuntime {
        self.runtime.as_ref()
    }

    /// Embeds a batch of texts in one inference.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbeddingError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|error| EmbeddingError::Tokenize(error.to_string()))?;
        let mut embeddings: Vec<Vec<f32>> = vec![Vec::new(); encodings.len()];
        for bucket in length_buckets(&encodings) {
            let rows: Vec<&Encoding> = bucket.iter().map(|&index| &encodings[index]).collect();
            for (index, embedding) in bucket.iter().zip(self.embed_padded(&rows)?) {
                embeddings[*index] = embedding;
            }
        }
        Ok(embeddings)
    }

    /// One inference over texts of similar length, padded to the longest.
    fn embed_padded(&self, rows: &[&Encoding]) -> Result<Vec<Vec<f32>>, EmbeddingError> {
        let batch = rows.len();
        let tokens = rows.iter().map(|row| row.len()).max().unwrap_or(0);
        let mut ids = vec![self.pad_id; batch * tokens];
        let mut mask = vec![0i64; batch * tokens];
        let mut types = vec![0i64; batch * tokens];
        for (row, encoding) in rows.iter().enumerate() {
            let start = row * tokens;
            for (offset, ((id, attention), kind)) in encoding
                .get_ids()
                .iter()
                .zip(encoding.get_attention_mask())
                .zip(encoding.get_type_ids())
                .enumerate()
            {
                ids[start + offset] = *id as i64;
                mask[start + offset] = *attention as i64;
                types[start + offset] = *kind as i64;
            }
        }
        let shape = vec![batch, tokens];
        let tensor = |name: &str, values: Vec<i64>| {
            Tensor::new(name, shape.clone(), TensorData::Int64(values))
                .map_err(|error| EmbeddingError::Tokenize(error.to_string()))
        };
        let mut inputs = vec![
            tensor("input_ids", ids)?,
            tensor("attention_mask", mask.clone())?,
        ];
        if self.token_type_ids {
            inputs.push(tensor("token_type_ids", types)?);
        }
        let outputs = self.runtime.run(inputs)?;
        let output = outputs
            .first()
            .ok_or_else(|| RuntimeError::Inference("the model returned no output".to_owned()))?;
        let values = output
            .as_f32()
            .ok_or_else(|| RuntimeError::UnsupportedOutput {
                name: output.name.clone(),
                element_type: output.data_type().name().to_owned(),
            })?;
        let mut embeddings = match output.shape.as_slice() {
            [b, t, dims] if *b == batch && *t == tokens => {
                pool(values, &mask, batch, tokens, *dims, self.pooling)
            }
            [b, dims] if *b == batch => values.chunks(*dims).map(<[f32]>::to_vec).collect(),
            other => return Err(EmbeddingError::OutputShape(other.to_vec())),
        };
        if self.normalize {
            embeddings.iter_mut().for_each(|vector| normalize(vector));
        }
        Ok(embeddings)
    }
}

/// Groups texts of similar token length, so that a batch of short and long
/// texts does not pay for padding every short one to the longest: the
/// attention costs grow with the padded length. Texts are sorted by length
/// and a group takes texts up to a quarter (at least 4 tokens) longer than
/// its shortest.
fn length_buckets(encodings: &[Encoding]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..encodings.len()).collect();
    order.sort_by_key(|&index| encodings[index].len());
    let mut buckets: Vec<Vec<usize>> = Vec::new();
    for index in order {
        let length = encodings[index].len();
        match buckets.last_mut() {
            Some(bucket) => {
                let shortest = encodings[bucket[0]].len();
                if length <= shortest + (shortest / 4).max(4) {
                    bucket.push(index);
                } else {
                    buckets.push(vec![index]);
                }
            }
            None => buckets.push(vec![index]),
        }
    }
    buckets
}

impl Task for EmbeddingModel {
    fn decode(&self, body: &[u8], _content_type: Option<&str>) -> Result<Decoded, String> {
        match std::str::from_utf8(body) {
            Ok(text) => Ok(Decoded::Text(text.to_owned())),
            Err(error) => Err(format!("the body is not UTF-8 text: {error}")),
        }
    }

    /// The text's tokens, as the model will see them (truncated).
    fn cost(&self, input: &Decoded) -> usize {
        match input {
            Decoded::Text(text) => self
                .tokenizer
                .encode(text.as_str(), true)
                .map_or(1, |encoding| encoding.len().max(1)),
            _ => 1,
        }
    }

    fn warm_up_request(&self) -> Option<Vec<u8>> {
        Some(b"Warren warms the model up with this sentence.".to_vec())
    }

    fn infer(&self, batch: Vec<Decoded>) -> Result<Vec<Encoded>, TaskError> {
        let texts: Vec<&str> = batch
            .iter()
            .map(|decoded| match decoded {
                Decoded::Text(text) => Ok(text.as_str()),
                _ => Err(TaskError::Failed("not text".to_owned())),
            })
            .collect::<Result<_, _>>()?;
        let embeddings = self.embed(&texts).map_err(|error| match error {
            EmbeddingError::Runtime(error) => TaskError::Runtime(error),
            other => TaskError::Failed(other.to_string()),
        })?;
        Ok(embeddings
            .iter()
            .map(|vector| Encoded {
                body: serde_json::to_vec(vector).expect("a vector of floats serialises"),
                content_type: "application/json",
            })
            .collect())
    }

    fn backend(&self) -> &'static str {
        self.runtime.backend()
    }
}

/// Pools `[batch, tokens, dims]` token embeddings into one vector per text.
fn pool(
    values: &[f32],
    mask: &[i64],
    batch: usize,
    tokens: usize,
    dims: usize,
    pooling: Pooling,
) -> Vec<Vec<f32>> {
    (0..batch)
        .map(|row| {
            let text = &values[row * tokens * dims..(row + 1) * tokens * dims];
            match pooling {
                Pooling::Cls => text[..dims].to_vec(),
                Pooling::Mean => {
                    let mut sum = vec![0.0f32; dims];
                    let mut counted = 0.0f32;
                    for (token, embedding) in text.chunks(dims).enumerate() {
                        if mask[row * tokens + token] == 0 {
                            continue;
                        }
                        counted += 1.0;
                        sum.iter_mut().zip(embedding).for_each(|(s, v)| *s += v);
                    }
                    // sentence-transformers clamps the count the same way.
                    let count = counted.max(1e-9);
                    sum.iter_mut().for_each(|s| *s /= count);
                    sum
                }
            }
        })
        .collect()
}

fn normalize(vector: &mut [f32]) {
    let norm = vector.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    vector.iter_mut().for_each(|v| *v /= norm);
}

/// Cosine similarity of two vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b)).max(1e-12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pooling_skips_padding() {
        // Two texts, three token slots, two dims; the second text has one
        // padding token whose embedding must not count.
        let values = [
            1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 2.0, 2.0, 4.0, 4.0, 100.0, 100.0,
        ];
        let mask = [1, 1, 1, 1, 1, 0];
        let pooled = pool(&values, &mask, 2, 3, 2, Pooling::Mean);
        assert_eq!(pooled, vec![vec![3.0, 4.0], vec![3.0, 3.0]]);
        let cls = pool(&values, &mask, 2, 3, 2, Pooling::Cls);
        assert_eq!(cls, vec![vec![1.0, 2.0], vec![2.0, 2.0]]);
    }

    #[test]
    fn normalised_vectors_have_unit_length() {
        let mut vector = vec![3.0, 4.0];
        normalize(&mut vector);
        assert_eq!(vector, vec![0.6, 0.8]);
        assert!((cosine(&[1.0, 0.0], &[0.0, 2.0])).abs() < 1e-6);
    }
}
