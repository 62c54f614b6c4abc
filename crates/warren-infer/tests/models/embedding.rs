//! all-MiniLM-L6-v2 embeddings from both backends against the values ONNX
//! Runtime itself gives through Python (tests/models/minilm-reference.json,
//! written by tests/models/reference.py). The model comes from
//! `scripts/fetch-models.sh`, which `scripts/test.sh` runs first.

use std::path::PathBuf;

use serde_json::Value;
use warren_infer::runtime::{self, Backend, RuntimeConfig};
use warren_infer::task::embedding::{EmbeddingModel, Pooling, cosine};

use crate::{onnxruntime_library, repository};

/// sentence-transformers cuts this model's inputs at 256 tokens (its
/// tokenizer.json says 128, which the library overrides).
const MAX_TOKENS: usize = 256;

fn model_dir() -> PathBuf {
    let dir = repository().join("models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.onnx").exists() && dir.join("tokenizer.json").exists(),
        "{} is missing the model; run `bash scripts/fetch-models.sh`",
        dir.display()
    );
    dir
}

fn reference() -> Value {
    let path = repository().join("tests/models/minilm-reference.json");
    serde_json::from_slice(&std::fs::read(path).expect("reference file")).expect("JSON")
}

fn model(backend: Backend) -> EmbeddingModel {
    let dir = model_dir();
    let config = RuntimeConfig {
        backend,
        onnxruntime_library: onnxruntime_library(),
        ..RuntimeConfig::default()
    };
    let runtime = runtime::load(&dir.join("model.onnx"), &config).expect("model loads");
    let expected_backend = match backend {
        Backend::Tract => "tract",
        _ => "onnxruntime",
    };
    assert_eq!(runtime.backend(), expected_backend);
    EmbeddingModel::new(
        runtime,
        &dir.join("tokenizer.json"),
        Pooling::Mean,
        true,
        Some(MAX_TOKENS),
    )
    .expect("tokenizer loads")
}

fn check(backend: Backend, tolerance: f32) {
    let reference = reference();
    let sentences = reference["sentences"].as_array().expect("sentences");
    let texts: Vec<&str> = sentences
        .iter()
        .map(|sentence| sentence["text"].as_str().expect("text"))
        .collect();
    let model = model(backend);
    let embeddings = model.embed(&texts).expect("inference");
    assert_eq!(embeddings.len(), texts.len());
    for (embedding, sentence) in embeddings.iter().zip(sentences) {
        assert_eq!(embedding.len(), 384);
        let norm: f32 = embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "normalised: {norm}");
        for (got, expected) in embedding
            .iter()
            .zip(sentence["embedding_first_dims"].as_array().expect("dims"))
        {
            let expected = expected.as_f64().expect("number") as f32;
            assert!(
                (got - expected).abs() < tolerance,
                "{backend:?} '{}': {got} vs {expected}",
                sentence["text"]
            );
        }
    }
    for pair in reference["cosines"].as_array().expect("cosines") {
        let a = pair["a"].as_u64().expect("a") as usize;
        let b = pair["b"].as_u64().expect("b") as usize;
        let expected = pair["cosine"].as_f64().expect("cosine") as f32;
        let got = cosine(&embeddings[a], &embeddings[b]);
        assert!(
            (got - expected).abs() < 1e-3,
            "{backend:?} cosine({a}, {b}) = {got}, ONNX Runtime says {expected}"
        );
    }
    let food_bread = cosine(&embeddings[0], &embeddings[1]);
    let food_market = cosine(&embeddings[0], &embeddings[2]);
    assert!((food_bread - 0.7535).abs() < 1e-3, "{food_bread}");
    assert!((food_market - -0.012).abs() < 1e-3, "{food_market}");
}

#[test]
fn onnx_runtime_matches_the_reference() {
    check(Backend::Onnxruntime, 1e-4);
}

#[test]
fn tract_matches_the_reference() {
    check(Backend::Tract, 1e-3);
}

#[test]
fn one_text_alone_embeds_as_in_a_batch() {
    let model = model(Backend::Onnxruntime);
    let texts = ["A man is eating food.", "The stock market fell today."];
    let batch = model.embed(&texts).expect("batch");
    let alone = model.embed(&texts[..1]).expect("alone");
    let difference = batch[0]
        .iter()
        .zip(&alone[0])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        difference < 1e-5,
        "padding changed the embedding by {difference}"
    );
}

#[test]
fn a_gpu_provider_the_library_lacks_leaves_the_model_on_the_cpu() {
    let dir = model_dir();
    let config = RuntimeConfig {
        backend: Backend::Onnxruntime,
        onnxruntime_library: onnxruntime_library(),
        execution_providers: vec!["cuda".to_owned()],
        ..RuntimeConfig::default()
    };
    let runtime = runtime::load(&dir.join("model.onnx"), &config).expect("loads on the CPU");
    let model = EmbeddingModel::new(
        runtime,
        &dir.join("tokenizer.json"),
        Pooling::Mean,
        true,
        Some(MAX_TOKENS),
    )
    .expect("tokenizer loads");
    let embeddings = model
        .embed(&["A man is eating food.", "A man is eating a piece of bread."])
        .expect("inference");
    let similarity = cosine(&embeddings[0], &embeddings[1]);
    assert!((similarity - 0.7535).abs() < 1e-3, "{similarity}");
}
