//! The tract backend: pure Rust, nothing to install, the fallback that
//! always works. The model is optimised once with its variable dimensions
//! (batch, sequence length) left symbolic, so one plan serves every batch.

use std::path::Path;

use tract_onnx::prelude::{
    Datum, DatumType, Framework, InferenceModelExt, TValue, TVec, Tensor as TractTensor,
    TypedModel, TypedRunnableModel,
};
use tract_onnx::tract_hir::internal::DimLike;

use super::{ModelRuntime, RuntimeError};
use crate::tensor::{DataType, Tensor, TensorData, TensorInfo};

pub struct TractRuntime {
    plan: TypedRunnableModel<TypedModel>,
    inputs: Vec<TensorInfo>,
    outputs: Vec<TensorInfo>,
}

impl TractRuntime {
    pub fn load(model: &Path) -> Result<Self, RuntimeError> {
        let load_error = |reason: String| RuntimeError::Load {
            path: model.to_owned(),
            reason,
        };
        let typed = tract_onnx::onnx()
            .model_for_path(model)
            .and_then(|model| model.into_optimized())
            .map_err(|error| load_error(format!("{error:#}")))?;
        let describe = |outlets: &[tract_onnx::prelude::OutletId]| -> Vec<TensorInfo> {
            outlets
                .iter()
                .map(|outlet| {
                    let fact = typed.outlet_fact(*outlet).ok();
                    TensorInfo {
                        name: typed.node(outlet.node).name.clone(),
                        data_type: fact.and_then(|fact| data_type_of(fact.datum_type)),
                        shape: fact
                            .map(|fact| {
                                fact.shape
                                    .iter()
                                    .map(|dimension| dimension.to_usize().ok())
                                    .collect()
                            })
                            .unwrap_or_default(),
                    }
                })
                .collect()
        };
        let inputs = describe(
            typed
                .input_outlets()
                .map_err(|e| load_error(e.to_string()))?,
        );
        let outputs = describe(
            typed
                .output_outlets()
                .map_err(|e| load_error(e.to_string()))?,
        );
        let plan = typed
            .into_runnable()
            .map_err(|error| load_error(format!("{error:#}")))?;
        Ok(Self {
            plan,
            inputs,
            outputs,
        })
    }
}

impl ModelRuntime for TractRuntime {
    fn backend(&self) -> &'static str {
        "tract"
    }

    fn inputs(&self) -> &[TensorInfo] {
        &self.inputs
    }

    fn outputs(&self) -> &[TensorInfo] {
        &self.outputs
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
        // tract takes its inputs in the model's order.
        let mut ordered: Vec<Option<TValue>> = vec![None; self.inputs.len()];
        for tensor in inputs {
            let Some(index) = self
                .inputs
                .iter()
                .position(|input| input.name == tensor.name)
            else {
                return Err(RuntimeError::UnknownInput(tensor.name));
            };
            ordered[index] = Some(to_tract(&tensor)?.into());
        }
        let values: TVec<TValue> = ordered
            .into_iter()
            .zip(&self.inputs)
            .map(|(value, info)| {
                value.ok_or_else(|| RuntimeError::BadInput {
                    name: info.name.clone(),
                    reason: "missing".to_owned(),
                })
            })
            .collect::<Result<_, _>>()?;
        let outputs = self
            .plan
            .run(values)
            .map_err(|error| RuntimeError::Inference(format!("{error:#}")))?;
        outputs
            .iter()
            .zip(&self.outputs)
            .map(|(value, info)| from_tract(&info.name, value))
            .collect()
    }
}

fn data_type_of(datum: DatumType) -> Option<DataType> {
    Some(match datum {
        DatumType::F32 => DataType::Fp32,
        DatumType::F64 => DataType::Fp64,
        DatumType::I64 => DataType::Int64,
        DatumType::I32 => DataType::Int32,
        DatumType::I8 => DataType::Int8,
        DatumType::U8 => DataType::Uint8,
        DatumType::Bool => DataType::Bool,
        _ => return None,
    })
}

fn to_tract(tensor: &Tensor) -> Result<TractTensor, RuntimeError> {
    fn build<T: Datum + Copy>(
        shape: &[usize],
        values: &[T],
    ) -> tract_onnx::prelude::TractResult<TractTensor> {
        TractTensor::from_shape(shape, values)
    }
    let shape = &tensor.shape;
    let built = match &tensor.data {
        TensorData::Fp32(values) => build(shape, values),
        TensorData::Fp64(values) => build(shape, values),
        TensorData::Int64(values) => build(shape, values),
        TensorData::Int32(values) => build(shape, values),
        TensorData::Int8(values) => build(shape, values),
        TensorData::Uint8(values) => build(shape, values),
        TensorData::Bool(values) => build(shape, values),
    };
    built.map_err(|error| RuntimeError::BadInput {
        name: tensor.name.clone(),
        reason: format!("{error:#}"),
    })
}

fn from_tract(name: &str, value: &TractTensor) -> Result<Tensor, RuntimeError> {
    let failed =
        |error: tract_onnx::prelude::TractError| RuntimeError::Inference(format!("{error:#}"));
    let data = match value.datum_type() {
        DatumType::F32 => TensorData::Fp32(value.as_slice::<f32>().map_err(failed)?.to_vec()),
        DatumType::F64 => TensorData::Fp64(value.as_slice::<f64>().map_err(failed)?.to_vec()),
        DatumType::I64 => TensorData::Int64(value.as_slice::<i64>().map_err(failed)?.to_vec()),
        DatumType::I32 => TensorData::Int32(value.as_slice::<i32>().map_err(failed)?.to_vec()),
        DatumType::I8 => TensorData::Int8(value.as_slice::<i8>().map_err(failed)?.to_vec()),
        DatumType::U8 => TensorData::Uint8(value.as_slice::<u8>().map_err(failed)?.to_vec()),
        DatumType::Bool => TensorData::Bool(value.as_slice::<bool>().map_err(failed)?.to_vec()),
        other => {
            return Err(RuntimeError::UnsupportedOutput {
                name: name.to_owned(),
                element_type: format!("{other:?}"),
            });
        }
    };
    Tensor::new(name, value.shape().to_vec(), data)
        .map_err(|error| RuntimeError::Inference(error.to_string()))
}
