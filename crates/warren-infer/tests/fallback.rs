//! With ONNX Runtime unavailable, `auto` runs the model on tract. (One test
//! in its own binary: ONNX Runtime's environment is per process.)

use std::path::Path;

use warren_infer::runtime::{self, Backend, RuntimeConfig};

#[test]
fn auto_falls_back_to_tract_when_onnx_runtime_cannot_be_loaded() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/models/tiny-cnn.onnx");
    let config = RuntimeConfig {
        backend: Backend::Auto,
        onnxruntime_library: Some("/nonexistent/libonnxruntime.so".into()),
        ..RuntimeConfig::default()
    };
    let runtime = runtime::load(&model, &config).expect("tract takes over");
    assert_eq!(runtime.backend(), "tract");
    // Asking for ONNX Runtime explicitly is an error that says why.
    let explicit = RuntimeConfig {
        backend: Backend::Onnxruntime,
        ..config
    };
    let error = runtime::load(&model, &explicit)
        .err()
        .expect("no ONNX Runtime");
    assert!(error.to_string().contains("ONNX Runtime"), "{error}");
}
