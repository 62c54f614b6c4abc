//! The classification path on a tiny CNN (tests/models/make_cnn.py), on
//! both backends, against the top-3 labels and scores ONNX Runtime gives
//! through Python with the same preprocessing
//! (tests/models/tiny-cnn-reference.json).

use std::path::PathBuf;

use serde_json::Value;
use warren_infer::runtime::{self, Backend, RuntimeConfig};
use warren_infer::task::classification::{
    ClassificationModel, Layout, Preprocessing, RAW_TENSOR_CONTENT_TYPE,
};

use crate::{onnxruntime_library, repository, test_models};

/// Scores may differ from the reference by the resize's rounding.
const SCORE_TOLERANCE: f32 = 5e-3;

fn models() -> PathBuf {
    test_models()
}

fn json(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(models().join(name)).expect("file")).expect("JSON")
}

fn model(backend: Backend) -> ClassificationModel {
    let config = RuntimeConfig {
        backend,
        onnxruntime_library: onnxruntime_library(),
        ..RuntimeConfig::default()
    };
    let runtime = runtime::load(&models().join("tiny-cnn.onnx"), &config).expect("model loads");
    ClassificationModel::new(
        runtime,
        &models().join("tiny-cnn.labels.txt"),
        Preprocessing {
            resize_shorter: 36,
            crop: 32,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            layout: Layout::Nchw,
        },
        3,
    )
    .expect("classifier")
}

fn check(backend: Backend) {
    let reference = json("tiny-cnn-reference.json");
    let classifier = model(backend);
    let images = reference["images"].as_array().expect("images");
    let inputs: Vec<Vec<f32>> = images
        .iter()
        .map(|image| {
            let path = repository().join(image["file"].as_str().expect("file"));
            let body = std::fs::read(path).expect("image");
            classifier
                .preprocess(&body, Some("image/png"))
                .expect("decodes")
        })
        .collect();
    let results = classifier.classify(inputs).expect("inference");
    for (top, image) in results.iter().zip(images) {
        let expected = image["top3"].as_array().expect("top3");
        assert_eq!(top.len(), 3);
        for (got, want) in top.iter().zip(expected) {
            assert_eq!(
                got.label,
                want["label"].as_str().expect("label"),
                "{backend:?} {}",
                image["file"]
            );
            let score = want["score"].as_f64().expect("score") as f32;
            assert!(
                (got.score - score).abs() < SCORE_TOLERANCE,
                "{backend:?} {}: {} {} vs {score}",
                image["file"],
                got.label,
                got.score
            );
        }
    }
}

#[test]
fn onnx_runtime_gives_the_reference_top_3() {
    check(Backend::Onnxruntime);
}

#[test]
fn tract_gives_the_reference_top_3() {
    check(Backend::Tract);
}

#[test]
fn a_raw_tensor_body_skips_preprocessing() {
    let request = json("tiny-cnn-tensor-request.json");
    let response = json("tiny-cnn-tensor-response.json");
    let values: Vec<f32> = request["inputs"][0]["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|value| value.as_f64().expect("number") as f32)
        .collect();
    let body: Vec<u8> = values
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect();
    let classifier = model(Backend::Onnxruntime);
    let input = classifier
        .preprocess(&body, Some(RAW_TENSOR_CONTENT_TYPE))
        .expect("a raw tensor");
    assert_eq!(input, values);
    let top = classifier.classify(vec![input]).expect("inference");
    let logits: Vec<f32> = response["outputs"][0]["data"]
        .as_array()
        .expect("logits")
        .iter()
        .map(|value| value.as_f64().expect("number") as f32)
        .collect();
    let best = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(index, _)| index)
        .expect("a class");
    assert_eq!(top[0][0].index, best);
}

#[test]
fn corrupt_and_oversized_bodies_are_refused_with_a_reason() {
    let classifier = model(Backend::Tract);
    let corrupt = classifier
        .preprocess(b"\x89PNG\r\n\x1a\n garbage", Some("image/png"))
        .unwrap_err();
    assert!(corrupt.contains("image"), "{corrupt}");
    let short = classifier
        .preprocess(&[0u8; 12], Some(RAW_TENSOR_CONTENT_TYPE))
        .unwrap_err();
    assert!(short.contains("float32"), "{short}");
}
