//! The `classification` task: an image in (PNG or JPEG body, or a raw
//! float32 tensor already preprocessed), the top-k labels with their scores
//! out.
//!
//! Preprocessing is declared in the model's configuration, as torchvision
//! pipelines do it: decode to RGB, resize the shorter side (bilinear),
//! center-crop, scale to [0, 1], normalise per channel with mean and std,
//! and lay out as NCHW or NHWC.

use std::path::Path;

use image::imageops::FilterType;
use serde::{Deserialize, Serialize};

use crate::runtime::{ModelRuntime, RuntimeError};
use crate::task::{Decoded, Encoded, Task, TaskError};
use crate::tensor::{Tensor, TensorData};

/// Labels a model may have; a labels file longer than this is refused.
pub const LABELS_MAX: usize = 100_000;
/// Pixels a decoded image may have (a 64-megapixel photo); larger bodies
/// are poison rather than a way to exhaust memory.
pub const IMAGE_PIXELS_MAX: u64 = 64 * 1024 * 1024;

/// The content type of a request that is already a preprocessed tensor:
/// float32, little-endian, in the model's layout for one image.
pub const RAW_TENSOR_CONTENT_TYPE: &str = "application/x-warren-tensor-f32le";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    #[default]
    Nchw,
    Nhwc,
}

/// How an image becomes the model's input.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocessing {
    /// The shorter side is resized to this, keeping the aspect ratio.
    pub resize_shorter: u32,
    /// Then a centered square of this side is cut out.
    pub crop: u32,
    #[serde(default = "imagenet_mean")]
    pub mean: [f32; 3],
    #[serde(default = "imagenet_std")]
    pub std: [f32; 3],
    #[serde(default)]
    pub layout: Layout,
}

fn imagenet_mean() -> [f32; 3] {
    [0.485, 0.456, 0.406]
}

fn imagenet_std() -> [f32; 3] {
    [0.229, 0.224, 0.225]
}

#[derive(Debug, thiserror::Error)]
pub enum ClassificationError {
    #[error("reading the labels {path}: {reason}")]
    Labels { path: String, reason: String },
    #[error("the model must take one image input and give one output of scores")]
    Signature,
    #[error("the preprocessing crop ({crop}) must not exceed resize_shorter ({resize})")]
    Crop { crop: u32, resize: u32 },
}

pub struct ClassificationModel {
    runtime: Box<dyn ModelRuntime>,
    labels: Vec<String>,
    preprocessing: Preprocessing,
    top_k: usize,
    input: String,
}

/// One entry of a reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    pub label: String,
    pub index: usize,
    pub score: f32,
}

impl ClassificationModel {
    pub fn new(
        runtime: Box<dyn ModelRuntime>,
        labels_path: &Path,
        preprocessing: Preprocessing,
        top_k: usize,
    ) -> Result<Self, ClassificationError> {
        let labels_error = |reason: String| ClassificationError::Labels {
            path: labels_path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(labels_path)
            .map_err(|error| labels_error(error.to_string()))?;
        let labels: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .map(str::to_owned)
            .collect();
        if labels.is_empty() || labels.len() > LABELS_MAX {
            return Err(labels_error(format!(
                "expected 1 to {LABELS_MAX} labels, one per line"
            )));
        }
        if preprocessing.crop > preprocessing.resize_shorter || preprocessing.crop == 0 {
            return Err(ClassificationError::Crop {
                crop: preprocessing.crop,
                resize: preprocessing.resize_shorter,
            });
        }
        if runtime.inputs().len() != 1 || runtime.outputs().is_empty() {
            return Err(ClassificationError::Signature);
        }
        let input = runtime.inputs()[0].name.clone();
        Ok(Self {
            runtime,
            labels,
            preprocessing,
            top_k: top_k.max(1),
            input,
        })
    }

    fn pixels_per_image(&self) -> usize {
        let side = self.preprocessing.crop as usize;
        3 * side * side
    }

    /// Decodes and preprocesses one image body into the model's layout.
    pub fn preprocess(&self, body: &[u8], content_type: Option<&str>) -> Result<Vec<f32>, String> {
        if content_type == Some(RAW_TENSOR_CONTENT_TYPE) {
            if body.len() != self.pixels_per_image() * 4 {
                return Err(format!(
                    "a raw tensor body must hold {} float32 values ({} bytes), not {} bytes",
                    self.pixels_per_image(),
                    self.pixels_per_image() * 4,
                    body.len()
                ));
            }
            return Ok(body
                .chunks_exact(4)
                .map(|bytes| f32::from_le_bytes(bytes.try_into().expect("4 bytes")))
                .collect());
        }
        let reader = image::ImageReader::new(std::io::Cursor::new(body))
            .with_guessed_format()
            .map_err(|error| format!("the body is not an image: {error}"))?;
        let (width, height) = reader
            .into_dimensions()
            .map_err(|error| format!("the body is not a PNG or JPEG image: {error}"))?;
        if width as u64 * height as u64 > IMAGE_PIXELS_MAX {
            return Err(format!(
                "the image is {width}x{height}, more than {IMAGE_PIXELS_MAX} pixels"
            ));
        }
        let decoded = image::load_from_memory(body)
            .map_err(|error| format!("the image cannot be decoded: {error}"))?
            .to_rgb8();
        Ok(self.tensor_from(&decoded))
    }

    fn tensor_from(&self, image: &image::RgbImage) -> Vec<f32> {
        let Preprocessing {
            resize_shorter,
            crop,
            mean,
            std,
            layout,
        } = &self.preprocessing;
        let (width, height) = image.dimensions();
        let scale = |longer: u32, shorter: u32| -> u32 {
            ((longer as f64 * *resize_shorter as f64 / shorter as f64).round() as u32).max(*crop)
        };
        let (resized_width, resized_height) = if width <= height {
            (*resize_shorter, scale(height, width))
        } else {
            (scale(width, height), *resize_shorter)
        };
        let resized =
            image::imageops::resize(image, resized_width, resized_height, FilterType::Triangle);
        let left = (resized_width - crop) / 2;
        let top = (resized_height - crop) / 2;
        let side = *crop as usize;
        let mut values = vec![0.0f32; 3 * side * side];
        for y in 0..side {
            for x in 0..side {
                let pixel = resized.get_pixel(left + x as u32, top + y as u32);
                for channel in 0..3 {
                    let value = (pixel[channel] as f32 / 255.0 - mean[channel]) / std[channel];
                    let index = match layout {
                        Layout::Nchw => channel * side * side + y * side + x,
                        Layout::Nhwc => (y * side + x) * 3 + channel,
                    };
                    values[index] = value;
                }
            }
        }
        values
    }

    /// Runs a batch of preprocessed images; the top-k labels of each.
    pub fn classify(&self, images: Vec<Vec<f32>>) -> Result<Vec<Vec<Scored>>, RuntimeError> {
        let batch = images.len();
        let side = self.preprocessing.crop as usize;
        let shape = match self.preprocessing.layout {
            Layout::Nchw => vec![batch, 3, side, side],
            Layout::Nhwc => vec![batch, side, side, 3],
        };
        let data: Vec<f32> = images.into_iter().flatten().collect();
        let input =
            Tensor::new(self.input.clone(), shape, TensorData::Fp32(data)).map_err(|error| {
                RuntimeError::BadInput {
                    name: self.input.clone(),
                    reason: error.to_string(),
                }
            })?;
        let outputs = self.runtime.run(vec![input])?;
        let output = &outputs[0];
        let logits = output
            .as_f32()
            .ok_or_else(|| RuntimeError::UnsupportedOutput {
                name: output.name.clone(),
                element_type: output.data_type().name().to_owned(),
            })?;
        let classes = logits.len() / batch.max(1);
        Ok(logits
            .chunks(classes)
            .map(|row| self.top(&softmax(row)))
            .collect())
    }

    fn top(&self, scores: &[f32]) -> Vec<Scored> {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]));
        order
            .into_iter()
            .take(self.top_k)
            .map(|index| Scored {
                label: self
                    .labels
                    .get(index)
                    .cloned()
                    .unwrap_or_else(|| index.to_string()),
                index,
                score: scores[index],
            })
            .collect()
    }
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exponentials: Vec<f32> = logits.iter().map(|logit| (logit - max).exp()).collect();
    let sum: f32 = exponentials.iter().sum();
    exponentials.iter().map(|value| value / sum).collect()
}

impl Task for ClassificationModel {
    fn decode(&self, body: &[u8], content_type: Option<&str>) -> Result<Decoded, String> {
        self.preprocess(body, content_type).map(Decoded::Image)
    }

    fn infer(&self, batch: Vec<Decoded>) -> Result<Vec<Encoded>, TaskError> {
        let images = batch
            .into_iter()
            .map(|decoded| match decoded {
                Decoded::Image(values) => Ok(values),
                _ => Err(TaskError::Failed("not an image".to_owned())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self
            .classify(images)?
            .into_iter()
            .map(|top| Encoded {
                body: serde_json::to_vec(&top).expect("scores serialise"),
                content_type: "application/json",
            })
            .collect())
    }

    fn backend(&self) -> &'static str {
        self.runtime.backend()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let scores = softmax(&[1.0, 3.0, 2.0]);
        assert!((scores.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(scores[1] > scores[2] && scores[2] > scores[0]);
    }
}
