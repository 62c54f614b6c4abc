//! The `tensor` task (KServe v2 JSON) on the tiny CNN: shapes and types
//! round-trip, concatenated requests are split back, and a request that
//! does not fit the model is refused with a reason.

use std::path::PathBuf;

use serde_json::{Value, json};
use warren_infer::runtime::{self, Backend, RuntimeConfig};
use warren_infer::task::tensor::TensorModel;
use warren_infer::task::{Decoded, Task};

use crate::{repository, test_models};

fn models() -> PathBuf {
    test_models()
}

fn read(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(models().join(name)).expect("file")).expect("JSON")
}

fn model() -> TensorModel {
    let config = RuntimeConfig {
        backend: Backend::Tract,
        ..RuntimeConfig::default()
    };
    let runtime = runtime::load(&models().join("tiny-cnn.onnx"), &config).expect("model loads");
    TensorModel::new("tiny-cnn".to_owned(), runtime)
}

fn decode(model: &TensorModel, request: &Value) -> Result<Decoded, String> {
    model.decode(
        &serde_json::to_vec(request).expect("JSON"),
        Some("application/json"),
    )
}

#[test]
fn requests_round_trip_and_batch() {
    let model = model();
    let request = read("tiny-cnn-tensor-request.json");
    let expected: Vec<f64> = read("tiny-cnn-tensor-response.json")["outputs"][0]["data"]
        .as_array()
        .expect("logits")
        .iter()
        .map(|value| value.as_f64().expect("number"))
        .collect();
    let mut second = request.clone();
    second["id"] = json!("second");
    let batch = vec![
        decode(&model, &request).expect("valid"),
        decode(&model, &second).expect("valid"),
    ];
    let replies = model.infer(batch).expect("inference");
    assert_eq!(replies.len(), 2);
    for (reply, id) in replies.iter().zip([request["id"].clone(), json!("second")]) {
        let body: Value = serde_json::from_slice(&reply.body).expect("JSON reply");
        assert_eq!(body["model_name"], "tiny-cnn");
        assert_eq!(body["id"], id);
        let output = &body["outputs"][0];
        assert_eq!(output["name"], "logits");
        assert_eq!(output["datatype"], "FP32");
        assert_eq!(output["shape"], json!([1, 5]));
        for (got, want) in output["data"]
            .as_array()
            .expect("data")
            .iter()
            .zip(&expected)
        {
            let got = got.as_f64().expect("number");
            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        }
    }
}

#[test]
fn requests_that_do_not_fit_the_model_are_refused() {
    let model = model();
    let request = read("tiny-cnn-tensor-request.json");
    let mut wrong_type = request.clone();
    wrong_type["inputs"][0]["datatype"] = json!("INT64");
    let error = decode(&model, &wrong_type).err().expect("refused");
    assert!(error.contains("FP32"), "{error}");
    let mut wrong_shape = request.clone();
    wrong_shape["inputs"][0]["shape"] = json!([1, 3, 16, 64]);
    let error = decode(&model, &wrong_shape).err().expect("refused");
    assert!(error.contains("dimension 2"), "{error}");
    let mut wrong_count = request.clone();
    wrong_count["inputs"][0]["shape"] = json!([2, 3, 32, 32]);
    let error = decode(&model, &wrong_count).err().expect("refused");
    assert!(error.contains("elements"), "{error}");
    let mut unknown = request;
    unknown["inputs"][0]["name"] = json!("pixels");
    assert!(decode(&model, &unknown).is_err());
    assert!(model.decode(b"not json", None).is_err());
}

#[test]
fn integer_inputs_and_float_outputs_keep_their_types() {
    let dir = repository().join("models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.onnx").exists(),
        "run `bash scripts/fetch-models.sh`"
    );
    let runtime = runtime::load(
        &dir.join("model.onnx"),
        &RuntimeConfig {
            backend: Backend::Tract,
            ..RuntimeConfig::default()
        },
    )
    .expect("model loads");
    let model = TensorModel::new("minilm".to_owned(), runtime);
    let ids = json!([[101, 1037, 2158, 102]]);
    let request = json!({"inputs": [
        {"name": "input_ids", "shape": [1, 4], "datatype": "INT64", "data": ids},
        {"name": "attention_mask", "shape": [1, 4], "datatype": "INT64", "data": [1, 1, 1, 1]},
        {"name": "token_type_ids", "shape": [1, 4], "datatype": "INT64", "data": [0, 0, 0, 0]}
    ]});
    let reply = model
        .infer(vec![decode(&model, &request).expect("valid")])
        .expect("inference");
    let body: Value = serde_json::from_slice(&reply[0].body).expect("JSON");
    let output = &body["outputs"][0];
    assert_eq!(output["name"], "last_hidden_state");
    assert_eq!(output["datatype"], "FP32");
    assert_eq!(output["shape"], json!([1, 4, 384]));
    assert_eq!(output["data"].as_array().expect("data").len(), 4 * 384);
    let mut fractional = request.clone();
    fractional["inputs"][0]["data"] = json!([101, 1.5, 2158, 102]);
    assert!(decode(&model, &fractional).is_err(), "1.5 is not an INT64");
}
