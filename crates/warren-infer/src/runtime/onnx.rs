//! The ONNX Runtime backend. The library is loaded at run time
//! (`ort`'s `load-dynamic`): from the configured path, `ORT_DYLIB_PATH`, or
//! the copy inside an installed `onnxruntime` Python package. ONNX Runtime
//! has one environment per process, created by the first model loaded.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor as OrtTensor, TensorElementType, ValueType};
use parking_lot::Mutex;

use super::{ModelRuntime, RuntimeConfig, RuntimeError};
use crate::tensor::{DataType, Tensor, TensorData, TensorInfo};

/// The library file name inside the `onnxruntime` Python package.
const PYTHON_PACKAGE_LIBRARY_PREFIX: &str = "libonnxruntime.so";

pub struct OnnxRuntime {
    /// `Session::run` takes `&mut self`; a model instance runs one batch at
    /// a time anyway (more instances run side by side).
    session: Mutex<Session>,
    inputs: Vec<TensorInfo>,
    outputs: Vec<TensorInfo>,
}

/// The process-wide environment, or why it could not be made. The first
/// library path wins: ONNX Runtime cannot be loaded twice.
static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

impl OnnxRuntime {
    pub fn load(model: &Path, config: &RuntimeConfig) -> Result<Self, RuntimeError> {
        let environment = environment(config)?;
        let load_error = |reason: String| RuntimeError::Load {
            path: model.to_owned(),
            reason,
        };
        let mut builder = Session::builder(environment)
            .map_err(|error| load_error(error.to_string()))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|error| load_error(error.to_string()))?;
        if let Some(threads) = config.threads.filter(|threads| *threads > 0) {
            builder = builder
                .with_intra_threads(threads)
                .map_err(|error| load_error(error.to_string()))?;
        }
        let providers = execution_providers(&config.execution_providers)?;
        if !providers.is_empty() {
            builder = builder
                .with_execution_providers(providers)
                .map_err(|error| load_error(error.to_string()))?;
        }
        let session = builder
            .commit_from_file(model)
            .map_err(|error| load_error(error.to_string()))?;
        let describe = |outlets: &[ort::value::Outlet]| -> Vec<TensorInfo> {
            outlets
                .iter()
                .map(|outlet| describe_outlet(outlet.name(), outlet.dtype()))
                .collect()
        };
        Ok(Self {
            inputs: describe(session.inputs()),
            outputs: describe(session.outputs()),
            session: Mutex::new(session),
        })
    }
}

impl ModelRuntime for OnnxRuntime {
    fn backend(&self) -> &'static str {
        "onnxruntime"
    }

    fn inputs(&self) -> &[TensorInfo] {
        &self.inputs
    }

    fn outputs(&self) -> &[TensorInfo] {
        &self.outputs
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
        let mut values: Vec<(Cow<'static, str>, SessionInputValue<'static>)> =
            Vec::with_capacity(inputs.len());
        for tensor in inputs {
            if !self.inputs.iter().any(|input| input.name == tensor.name) {
                return Err(RuntimeError::UnknownInput(tensor.name));
            }
            let value = to_ort(&tensor)?;
            values.push((Cow::Owned(tensor.name), SessionInputValue::from(value)));
        }
        let mut session = self.session.lock();
        let outputs = session
            .run(values)
            .map_err(|error| RuntimeError::Inference(error.to_string()))?;
        self.outputs
            .iter()
            .map(|info| {
                let value = outputs.get(&info.name).ok_or_else(|| {
                    RuntimeError::Inference(format!("no output '{}' came back", info.name))
                })?;
                from_ort(&info.name, value)
            })
            .collect()
    }
}

fn environment(config: &RuntimeConfig) -> Result<&'static Environment, RuntimeError> {
    let result = ENVIRONMENT.get_or_init(|| {
        let path = find_library(config.onnxruntime_library.as_deref())?;
        let environment = ort::init_from(&path)
            .map_err(|error| format!("{}: {error}", path.display()))?
            .with_name("warren")
            .build()
            .map_err(|error| format!("{}: {error}", path.display()))?;
        tracing::info!(library = %path.display(), "ONNX Runtime loaded");
        Ok(environment)
    });
    match result {
        Ok(environment) => Ok(environment),
        Err(reason) if reason.starts_with(NOT_FOUND) => {
            Err(RuntimeError::LibraryNotFound(reason.clone()))
        }
        Err(reason) => Err(RuntimeError::LibraryUnusable {
            path: config.onnxruntime_library.clone().unwrap_or_default(),
            reason: reason.clone(),
        }),
    }
}

const NOT_FOUND: &str = "not found";

/// Where `libonnxruntime` is: the configured path, `ORT_DYLIB_PATH`, or
/// inside an `onnxruntime` Python package in the active virtualenv, a
/// `.venv` in the working directory, or the system's site-packages.
pub fn find_library(configured: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = configured {
        return Ok(path.to_owned());
    }
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        return Ok(PathBuf::from(path));
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        roots.push(PathBuf::from(venv).join("lib"));
    }
    roots.push(PathBuf::from(".venv/lib"));
    if let Some(home) = std::env::var_os("HOME") {
        roots.push(PathBuf::from(home).join(".local/lib"));
    }
    roots.extend(["/usr/local/lib", "/usr/lib"].map(PathBuf::from));
    for root in &roots {
        if let Some(found) = library_under(root) {
            return Ok(found);
        }
    }
    Err(format!(
        "{NOT_FOUND}: set onnxruntime_library in the model's [runtime], set ORT_DYLIB_PATH, \
         or pip install onnxruntime (looked under {})",
        roots
            .iter()
            .map(|root| root.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// `ROOT/python3*/{site,dist}-packages/onnxruntime/capi/libonnxruntime.so*`.
fn library_under(root: &Path) -> Option<PathBuf> {
    let mut pythons: Vec<PathBuf> = std::fs::read_dir(root)
        .ok()?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("python3"))
        })
        .collect();
    pythons.sort();
    for python in pythons.iter().rev() {
        for packages in ["site-packages", "dist-packages"] {
            let capi = python.join(packages).join("onnxruntime").join("capi");
            let Ok(entries) = std::fs::read_dir(&capi) else {
                continue;
            };
            let mut libraries: Vec<PathBuf> = entries
                .filter_map(|entry| entry.ok().map(|entry| entry.path()))
                .filter(|path| {
                    path.file_name()
                        .and_then(|name| name.to_str())
                        .is_some_and(|name| name.starts_with(PYTHON_PACKAGE_LIBRARY_PREFIX))
                })
                .collect();
            // The fully versioned name (libonnxruntime.so.1.31.1) sorts last.
            libraries.sort();
            if let Some(library) = libraries.pop() {
                return Some(library);
            }
        }
    }
    None
}

fn execution_providers(
    names: &[String],
) -> Result<Vec<ort::ep::ExecutionProviderDispatch>, RuntimeError> {
    names
        .iter()
        .filter(|name| name.as_str() != "cpu")
        .map(|name| match name.as_str() {
            #[cfg(feature = "cuda")]
            "cuda" => Ok(ort::ep::CUDA::default().build()),
            #[cfg(not(feature = "cuda"))]
            "cuda" => Err(not_built_in(name)),
            #[cfg(feature = "tensorrt")]
            "tensorrt" => Ok(ort::ep::TensorRT::default().build()),
            #[cfg(not(feature = "tensorrt"))]
            "tensorrt" => Err(not_built_in(name)),
            other => Err(RuntimeError::Load {
                path: PathBuf::new(),
                reason: format!(
                    "unknown execution provider '{other}'; expected 'cpu', 'cuda' or 'tensorrt'"
                ),
            }),
        })
        .collect()
}

/// An execution provider this build was compiled without.
#[allow(dead_code)] // used only in builds without some provider
fn not_built_in(name: &str) -> RuntimeError {
    RuntimeError::Load {
        path: PathBuf::new(),
        reason: format!(
            "this build of Warren has no '{name}' execution provider; build with \
             `--features warren-infer/{name}`"
        ),
    }
}

fn describe_outlet(name: &str, value_type: &ValueType) -> TensorInfo {
    let (data_type, shape) = match value_type {
        ValueType::Tensor { ty, shape, .. } => (
            data_type_of(*ty),
            shape
                .iter()
                .map(|dimension| usize::try_from(*dimension).ok())
                .collect(),
        ),
        _ => (None, Vec::new()),
    };
    TensorInfo {
        name: name.to_owned(),
        data_type,
        shape,
    }
}

fn data_type_of(element: TensorElementType) -> Option<DataType> {
    Some(match element {
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Bool => DataType::Bool,
        _ => return None,
    })
}

fn to_ort(tensor: &Tensor) -> Result<DynValue, RuntimeError> {
    let shape: Vec<i64> = tensor
        .shape
        .iter()
        .map(|&dimension| dimension as i64)
        .collect();
    let bad = |error: ort::Error| RuntimeError::BadInput {
        name: tensor.name.clone(),
        reason: error.to_string(),
    };
    Ok(match &tensor.data {
        TensorData::Fp32(values) => OrtTensor::from_array((shape, values.clone()))
            .map_err(bad)?
            .into_dyn(),
        TensorData::Fp64(values) => OrtTensor::from_array((shape, values.clone()))
            .map_err(bad)?
            .into_dyn(),
        TensorData::Int64(values) => OrtTensor::from_array((shape, values.clone()))
            .map_err(bad)?
            .into_dyn(),
        TensorData::Int32(values) => OrtTensor::from_array((shape, values.clone()))
            .map_err(bad)?
            .into_dyn(),
        TensorData::Int8(values) => OrtTensor::from_array((shape, values.clone()))
            .map_err(bad)?
            .into_dyn(),
        TensorData::Uint8(values) => OrtTensor::from_array((shape, values.clone()))
            .map_err(bad)?
            .into_dyn(),
        TensorData::Bool(values) => OrtTensor::from_array((shape, values.clone()))
            .map_err(bad)?
            .into_dyn(),
    })
}

fn from_ort(name: &str, value: &DynValue) -> Result<Tensor, RuntimeError> {
    let failed = |error: ort::Error| RuntimeError::Inference(error.to_string());
    let element = match value.dtype() {
        ValueType::Tensor { ty, .. } => *ty,
        other => {
            return Err(RuntimeError::UnsupportedOutput {
                name: name.to_owned(),
                element_type: format!("{other:?}"),
            });
        }
    };
    macro_rules! extract {
        ($element:ty, $variant:ident) => {{
            let (shape, values) = value.try_extract_tensor::<$element>().map_err(failed)?;
            (
                shape.iter().map(|&d| d as usize).collect::<Vec<_>>(),
                TensorData::$variant(values.to_vec()),
            )
        }};
    }
    let (shape, data) = match element {
        TensorElementType::Float32 => extract!(f32, Fp32),
        TensorElementType::Float64 => extract!(f64, Fp64),
        TensorElementType::Int64 => extract!(i64, Int64),
        TensorElementType::Int32 => extract!(i32, Int32),
        TensorElementType::Int8 => extract!(i8, Int8),
        TensorElementType::Uint8 => extract!(u8, Uint8),
        TensorElementType::Bool => extract!(bool, Bool),
        other => {
            return Err(RuntimeError::UnsupportedOutput {
                name: name.to_owned(),
                element_type: format!("{other:?}"),
            });
        }
    };
    Tensor::new(name, shape, data).map_err(|error| RuntimeError::Inference(error.to_string()))
}
