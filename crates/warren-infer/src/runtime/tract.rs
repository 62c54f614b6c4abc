//! The tract backend: pure Rust, nothing to install, the fallback that
//! always works. The model is optimised once with its variable dimensions
//! (batch, sequence length) left symbolic where tract can, so one plan
//! serves every batch; otherwise it is planned for each set of input
//! shapes it meets, and those plans are cached.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use tract_onnx::prelude::{
    Datum, DatumType, Framework, InferenceFact, InferenceModel, InferenceModelExt, OutletId,
    TValue, TVec, Tensor as TractTensor, TypedModel, TypedRunnableModel,
};
use tract_onnx::tract_hir::internal::{DimLike, Factoid};

use super::{ModelRuntime, RuntimeError};
use crate::tensor::{DataType, Tensor, TensorData, TensorInfo};

/// Plans for concrete input shapes kept per model when the model cannot be
/// planned with symbolic dimensions; past this many the cache starts over.
/// Callers that bucket their shapes (the embedding task pads to a multiple
/// of 8 tokens) keep the count small.
pub const CONCRETE_PLANS_MAX: usize = 64;

type Plan = Arc<TypedRunnableModel<TypedModel>>;

pub struct TractRuntime {
    model: InferenceModel,
    /// One plan for every shape, when tract could optimise the model with
    /// its batch and sequence dimensions left symbolic.
    symbolic: Option<Plan>,
    /// Otherwise one plan per set of input shapes.
    concrete: Mutex<HashMap<Vec<Vec<usize>>, Plan>>,
    path: PathBuf,
    inputs: Vec<TensorInfo>,
    outputs: Vec<TensorInfo>,
}

impl TractRuntime {
    pub fn load(path: &Path) -> Result<Self, RuntimeError> {
        let load_error = |reason: String| RuntimeError::Load {
            path: path.to_owned(),
            reason,
        };
        // The shapes an exporter wrote on intermediate values (value_info)
        // can contradict what tract infers, symbolic names against the sizes
        // of an actual batch; tract works them out itself.
        let onnx = tract_onnx::onnx();
        let mut proto = onnx
            .proto_model_for_path(path)
            .map_err(|error| load_error(format!("{error:#}")))?;
        // Unsqueeze and Slice take their axes as inputs from opset 13 on,
        // which the rewrite below relies on.
        let opset = proto
            .opset_import
            .iter()
            .find(|opset| opset.domain.is_empty() || opset.domain == "ai.onnx")
            .map_or(0, |opset| opset.version);
        if let Some(graph) = proto.graph.as_mut() {
            graph.value_info.clear();
            if opset >= 13 {
                slice_position_ranges(graph);
            }
        }
        let directory = path.parent().and_then(|dir| dir.to_str());
        let parsed = onnx
            .parse(&proto, directory)
            .map_err(|error| load_error(format!("{error:#}")))?;
        if !parsed.unresolved_inputs.is_empty() {
            return Err(load_error(format!(
                "unresolved inputs {:?}",
                parsed.unresolved_inputs
            )));
        }
        let model = parsed.model;
        let describe = |outlets: &[OutletId]| -> Vec<TensorInfo> {
            outlets
                .iter()
                .map(|outlet| {
                    let fact = model.outlet_fact(*outlet).ok();
                    TensorInfo {
                        // An output is named by its label (the ONNX value
                        // name), not by the node that computes it.
                        name: model
                            .outlet_label(*outlet)
                            .map(str::to_owned)
                            .unwrap_or_else(|| model.node(outlet.node).name.clone()),
                        data_type: fact
                            .and_then(|fact| fact.datum_type.concretize())
                            .and_then(data_type_of),
                        shape: fact
                            .and_then(|fact| fact.shape.concretize())
                            .map(|shape| {
                                shape
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
            model
                .input_outlets()
                .map_err(|e| load_error(e.to_string()))?,
        );
        let outputs = describe(
            model
                .output_outlets()
                .map_err(|e| load_error(e.to_string()))?,
        );
        let symbolic = match model
            .clone()
            .into_optimized()
            .and_then(|typed| typed.into_runnable())
        {
            Ok(plan) => Some(Arc::new(plan)),
            Err(error) => {
                tracing::debug!(model = %path.display(), error = %format!("{error:#}"),
                    "tract plans this model per input shape");
                None
            }
        };
        Ok(Self {
            model,
            symbolic,
            concrete: Mutex::new(HashMap::new()),
            path: path.to_owned(),
            inputs,
            outputs,
        })
    }

    fn plan_for(&self, values: &[TValue]) -> Result<Plan, RuntimeError> {
        if let Some(plan) = &self.symbolic {
            return Ok(Arc::clone(plan));
        }
        let shapes: Vec<Vec<usize>> = values.iter().map(|value| value.shape().to_vec()).collect();
        if let Some(plan) = self.concrete.lock().get(&shapes) {
            return Ok(Arc::clone(plan));
        }
        let mut model = self.model.clone();
        for (index, value) in values.iter().enumerate() {
            model
                .set_input_fact(
                    index,
                    InferenceFact::dt_shape(value.datum_type(), value.shape()),
                )
                .map_err(|error| RuntimeError::Inference(format!("{error:#}")))?;
        }
        let plan = model
            .into_optimized()
            .and_then(|typed| typed.into_runnable())
            .map(Arc::new)
            .map_err(|error| RuntimeError::Load {
                path: self.path.clone(),
                reason: format!("planning for input shapes {shapes:?}: {error:#}"),
            })?;
        let mut concrete = self.concrete.lock();
        if concrete.len() >= CONCRETE_PLANS_MAX {
            concrete.clear();
        }
        concrete.insert(shapes, Arc::clone(&plan));
        Ok(plan)
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
        let plan = self.plan_for(&values)?;
        let outputs = plan
            .run(values)
            .map_err(|error| RuntimeError::Inference(format!("{error:#}")))?;
        outputs
            .iter()
            .zip(&self.outputs)
            .map(|(value, info)| from_tract(&info.name, value))
            .collect()
    }
}

/// Positions a rewritten `Range` can produce: far beyond any transformer's
/// context, and 64 KiB of int64 once per model.
const RANGE_POSITIONS_MAX: i64 = 8_192;

/// Rewrites `Range(0, limit, 1)` as a slice of a constant `[0, 1, 2, ...]`.
///
/// Exporters build position ids with a `Range` whose limit comes from
/// `Shape`. tract treats shape values as symbolic dimensions (TDim), so
/// that `Range` yields TDim where the rest of the graph mixes it with
/// int64, and translation fails. Slicing an int64 constant gives the same
/// values with the type the graph declares.
fn slice_position_ranges(graph: &mut tract_onnx::pb::GraphProto) {
    let scalar = |name: &str| -> Option<i64> {
        let tensor = graph
            .initializer
            .iter()
            .find(|tensor| tensor.name == name)?;
        const ONNX_INT64: i32 = 7;
        if tensor.data_type != ONNX_INT64 || tensor.dims.iter().product::<i64>() != 1 {
            return None;
        }
        match (tensor.int64_data.first(), tensor.raw_data.get(..8)) {
            (Some(value), _) => Some(*value),
            (None, Some(raw)) => Some(i64::from_le_bytes(raw.try_into().ok()?)),
            _ => None,
        }
    };
    let rewritable: Vec<usize> = graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, node)| {
            node.op_type == "Range"
                && node.input.len() == 3
                && scalar(&node.input[0]) == Some(0)
                && scalar(&node.input[2]) == Some(1)
        })
        .map(|(index, _)| index)
        .collect();
    if rewritable.is_empty() {
        return;
    }
    let int64_vector = |name: &str, values: Vec<i64>| tract_onnx::pb::TensorProto {
        name: name.to_owned(),
        dims: vec![values.len() as i64],
        data_type: 7,
        int64_data: values,
        ..Default::default()
    };
    const POSITIONS: &str = "warren.range.positions";
    const ZERO: &str = "warren.range.zero";
    graph
        .initializer
        .push(int64_vector(POSITIONS, (0..RANGE_POSITIONS_MAX).collect()));
    graph.initializer.push(int64_vector(ZERO, vec![0]));
    // Replace from the back so earlier indices stay valid.
    for index in rewritable.into_iter().rev() {
        let range = graph.node.remove(index);
        let limit = format!("{}.limit", range.name);
        let unsqueeze = tract_onnx::pb::NodeProto {
            name: format!("{}.unsqueeze", range.name),
            op_type: "Unsqueeze".to_owned(),
            input: vec![range.input[1].clone(), ZERO.to_owned()],
            output: vec![limit.clone()],
            ..Default::default()
        };
        let slice = tract_onnx::pb::NodeProto {
            name: format!("{}.slice", range.name),
            op_type: "Slice".to_owned(),
            input: vec![
                POSITIONS.to_owned(),
                ZERO.to_owned(),
                limit,
                ZERO.to_owned(),
            ],
            output: range.output.clone(),
            ..Default::default()
        };
        graph.node.insert(index, slice);
        graph.node.insert(index, unsqueeze);
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
