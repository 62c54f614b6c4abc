//! The ONNX Runtime backend. The library is loaded at run time
//! (`ort`'s `load-dynamic`): from the configured path, `ORT_DYLIB_PATH`, or
//! the copy inside an installed `onnxruntime` Python package, wherever pip
//! put it (the Python on PATH is asked). ONNX Runtime has one environment
//! per process, created by the first model loaded.

use std::borrow::Cow;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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

/// The ONNX Runtime library this process loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedLibrary {
    pub path: PathBuf,
    /// Its release, e.g. "1.31.1": from the build's release branch when the
    /// library names one, else from its versioned file name (a pip
    /// package's library is built from a detached HEAD and names none).
    pub version: Option<String>,
}

static LOADED: OnceLock<LoadedLibrary> = OnceLock::new();

/// The ONNX Runtime library loaded, once a model has loaded it.
pub fn loaded_library() -> Option<&'static LoadedLibrary> {
    LOADED.get()
}

/// The release of the library at `path`: from its build information
/// ("... git-branch=rel-1.19.0, ..."), else from its file name
/// (`libonnxruntime.so.1.31.1`).
fn version_of(build_info: &str, path: &Path) -> Option<String> {
    let is_release =
        |text: &str| !text.is_empty() && text.split('.').all(|part| part.parse::<u32>().is_ok());
    let branch = build_info
        .split("git-branch=")
        .nth(1)
        .and_then(|rest| rest.split([',', ' ']).next())
        .and_then(|branch| branch.strip_prefix("rel-"))
        .filter(|version| is_release(version));
    let file_name = path
        .file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| name.strip_prefix(PYTHON_PACKAGE_LIBRARY_PREFIX))
        .and_then(|suffix| suffix.strip_prefix('.'))
        .filter(|version| is_release(version));
    branch.or(file_name).map(str::to_owned)
}

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
        let version = version_of(ort::info(), &path);
        tracing::info!(library = %path.display(), version = version.as_deref().unwrap_or("unknown"),
            "ONNX Runtime loaded");
        let _ = LOADED.set(LoadedLibrary { path, version });
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
/// inside an `onnxruntime` Python package: in the active virtualenv, a
/// `.venv` in the working directory, wherever the Python on PATH finds
/// it, or the user's and the system's site-packages.
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
    for root in &roots {
        if let Some(found) = library_under(root) {
            return Ok(found);
        }
    }
    for python in PYTHONS {
        if let Some(package) = python_package_dir(python)
            && let Some(found) = library_in(&package.join("capi"))
        {
            return Ok(found);
        }
    }
    let mut system_roots: Vec<PathBuf> = Vec::new();
    if let Some(home) = std::env::var_os("HOME") {
        system_roots.push(PathBuf::from(home).join(".local/lib"));
    }
    system_roots.extend(["/usr/local/lib", "/usr/lib"].map(PathBuf::from));
    for root in &system_roots {
        if let Some(found) = library_under(root) {
            return Ok(found);
        }
    }
    roots.extend(system_roots);
    Err(format!(
        "{NOT_FOUND}: set onnxruntime_library in the model's [runtime], set ORT_DYLIB_PATH, \
         or pip install onnxruntime (asked {} on PATH, looked under {})",
        PYTHONS.join(" and "),
        roots
            .iter()
            .map(|root| root.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// The interpreters asked where `onnxruntime` is installed, in order.
const PYTHONS: [&str; 2] = ["python3", "python"];
/// How long one is given to answer: an interpreter that hangs must not
/// hold up the broker's start.
const PYTHON_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Finds the package without importing it, which would load the library
/// into that interpreter for nothing.
const FIND_PACKAGE: &str = "import importlib.util, sys\n\
spec = importlib.util.find_spec('onnxruntime')\n\
locations = spec.submodule_search_locations if spec else None\n\
sys.stdout.write(locations[0] if locations else '')";

/// The directory of the `onnxruntime` package `python` imports, if it
/// runs and has one.
fn python_package_dir(python: &str) -> Option<PathBuf> {
    let mut child = Command::new(python)
        .args(["-c", FIND_PACKAGE])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + PYTHON_ANSWER_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let mut answer = String::new();
    child.stdout.take()?.read_to_string(&mut answer).ok()?;
    let answer = answer.trim();
    (!answer.is_empty()).then(|| PathBuf::from(answer))
}

/// The entries of `directory` whose names start with `prefix`, sorted by
/// name; None when the directory cannot be read.
fn entries_named(directory: &Path, prefix: &str) -> Option<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(directory)
        .ok()?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(prefix))
        })
        .collect();
    entries.sort();
    Some(entries)
}

/// `ROOT/python3*/{site,dist}-packages/onnxruntime/capi/libonnxruntime.so*`.
fn library_under(root: &Path) -> Option<PathBuf> {
    let pythons = entries_named(root, "python3")?;
    for python in pythons.iter().rev() {
        for packages in ["site-packages", "dist-packages"] {
            let capi = python.join(packages).join("onnxruntime").join("capi");
            if let Some(library) = library_in(&capi) {
                return Some(library);
            }
        }
    }
    None
}

/// `CAPI/libonnxruntime.so*`: the package's `capi` directory holds it.
fn library_in(capi: &Path) -> Option<PathBuf> {
    // The fully versioned name (libonnxruntime.so.1.31.1) sorts last.
    entries_named(capi, PYTHON_PACKAGE_LIBRARY_PREFIX)?.pop()
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::version_of;

    #[test]
    fn the_version_comes_from_the_release_branch_or_the_file_name() {
        let plain = Path::new("/usr/lib/libonnxruntime.so");
        let versioned = Path::new("/venv/onnxruntime/capi/libonnxruntime.so.1.31.1");
        let release = "ORT Build Info: git-branch=rel-1.19.0, git-commit-id=26250ae";
        let detached = "ORT Build Info: git-branch=HEAD, git-commit-id=26250ae";
        assert_eq!(version_of(release, plain).as_deref(), Some("1.19.0"));
        assert_eq!(version_of(detached, versioned).as_deref(), Some("1.31.1"));
        assert_eq!(version_of(detached, plain), None);
    }
}
