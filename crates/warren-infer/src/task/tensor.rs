//! The `tensor` task: any model, with requests and replies in the KServe v2
//! JSON tensor shape:
//!
//! ```json
//! {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
//! ```
//!
//! and the reply `{"model_name": ..., "id": ..., "outputs": [...]}`.
//! Requests whose inputs agree in everything but the first (batch)
//! dimension run as one inference, concatenated along it; the outputs are
//! split back by each request's share of the batch.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::runtime::ModelRuntime;
use crate::task::{Decoded, Encoded, Task, TaskError};
use crate::tensor::{DataType, Tensor, TensorData, TensorInfo};

/// Elements one request may carry in all its inputs together (16 Mi
/// values): a JSON body larger than that is refused, not parsed into memory.
pub const ELEMENTS_PER_REQUEST_MAX: usize = 16 * 1024 * 1024;

#[derive(Debug, Deserialize)]
struct Request {
    id: Option<String>,
    inputs: Vec<WireTensor>,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireTensor {
    name: String,
    shape: Vec<usize>,
    datatype: DataType,
    data: Value,
}

#[derive(Debug, Serialize)]
struct Response<'a> {
    model_name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    outputs: Vec<WireTensor>,
}

/// A decoded request: its id and its input tensors.
pub struct TensorRequest {
    id: Option<String>,
    inputs: Vec<Tensor>,
}

pub struct TensorModel {
    name: String,
    runtime: Box<dyn ModelRuntime>,
    /// Whether every input's first dimension varies, so that requests can
    /// be concatenated along it.
    dynamic_batch: bool,
}

impl TensorModel {
    pub fn new(name: String, runtime: Box<dyn ModelRuntime>) -> Self {
        let dynamic_batch = runtime
            .inputs()
            .iter()
            .all(|input| matches!(input.shape.first(), Some(None)));
        Self {
            name,
            runtime,
            dynamic_batch,
        }
    }

    fn parse(&self, body: &[u8]) -> Result<TensorRequest, String> {
        let request: Request = serde_json::from_slice(body)
            .map_err(|error| format!("the body is not a KServe v2 request: {error}"))?;
        let mut elements = 0usize;
        let mut inputs = Vec::with_capacity(request.inputs.len());
        for wire in request.inputs {
            let Some(info) = self
                .runtime
                .inputs()
                .iter()
                .find(|info| info.name == wire.name)
            else {
                return Err(format!("the model has no input named '{}'", wire.name));
            };
            if let Some(expected) = info.data_type
                && expected != wire.datatype
            {
                return Err(format!(
                    "input '{}' is {}, the model takes {}",
                    wire.name,
                    wire.datatype.name(),
                    expected.name()
                ));
            }
            if !info.shape.is_empty() && info.shape.len() != wire.shape.len() {
                return Err(format!(
                    "input '{}' has {} dimensions, the model takes {}",
                    wire.name,
                    wire.shape.len(),
                    info.shape.len()
                ));
            }
            for (index, (got, want)) in wire.shape.iter().zip(&info.shape).enumerate() {
                if let Some(want) = want
                    && got != want
                {
                    return Err(format!(
                        "input '{}' has size {got} in dimension {index}, the model takes {want}",
                        wire.name
                    ));
                }
            }
            elements = elements.saturating_add(wire.shape.iter().product());
            if elements > ELEMENTS_PER_REQUEST_MAX {
                return Err(format!(
                    "the request holds more than {ELEMENTS_PER_REQUEST_MAX} values"
                ));
            }
            let data = parse_data(&wire.name, wire.datatype, &wire.data)?;
            let tensor = Tensor::new(wire.name, wire.shape, data).map_err(|e| e.to_string())?;
            inputs.push(tensor);
        }
        for info in self.runtime.inputs() {
            if !inputs.iter().any(|input| input.name == info.name) {
                return Err(format!("the request lacks input '{}'", info.name));
            }
        }
        Ok(TensorRequest {
            id: request.id,
            inputs,
        })
    }

    fn run_group(&self, group: Vec<TensorRequest>) -> Result<Vec<Encoded>, TaskError> {
        let shares: Vec<usize> = group
            .iter()
            .map(|request| batch_rows(request).unwrap_or(1))
            .collect();
        let ids: Vec<Option<String>> = group.iter().map(|request| request.id.clone()).collect();
        let inputs = if group.len() == 1 {
            group.into_iter().next().expect("one").inputs
        } else {
            concatenate(group)
        };
        let outputs = self.runtime.run(inputs)?;
        let total: usize = shares.iter().sum();
        let mut replies = Vec::with_capacity(shares.len());
        let mut offset = 0;
        for (share, id) in shares.iter().zip(ids) {
            let outputs = outputs
                .iter()
                .map(|output| slice_batch(output, offset, *share, total))
                .collect::<Result<Vec<_>, _>>()?;
            offset += share;
            let response = Response {
                model_name: &self.name,
                id,
                outputs,
            };
            replies.push(Encoded {
                body: serde_json::to_vec(&response).expect("tensors serialise"),
                content_type: "application/json",
            });
        }
        Ok(replies)
    }
}

impl Task for TensorModel {
    fn decode(&self, body: &[u8], _content_type: Option<&str>) -> Result<Decoded, String> {
        self.parse(body).map(Decoded::Tensors)
    }

    fn infer(&self, batch: Vec<Decoded>) -> Result<Vec<Encoded>, TaskError> {
        let requests = batch
            .into_iter()
            .map(|decoded| match decoded {
                Decoded::Tensors(request) => Ok(request),
                _ => Err(TaskError::Failed("not a tensor request".to_owned())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Requests that can share an inference do; the others run alone.
        // Replies keep the order of the requests.
        let mut replies: Vec<Option<Encoded>> = (0..requests.len()).map(|_| None).collect();
        let mut groups: Vec<(Vec<usize>, Vec<TensorRequest>)> = Vec::new();
        for (index, request) in requests.into_iter().enumerate() {
            let joinable = groups
                .iter_mut()
                .filter(|_| self.dynamic_batch)
                .find(|(_, members)| batchable(&members[0], &request));
            match joinable {
                Some((indices, members)) => {
                    indices.push(index);
                    members.push(request);
                }
                None => groups.push((vec![index], vec![request])),
            }
        }
        for (indices, members) in groups {
            for (index, reply) in indices.into_iter().zip(self.run_group(members)?) {
                replies[index] = Some(reply);
            }
        }
        Ok(replies
            .into_iter()
            .map(|reply| reply.expect("every request answered"))
            .collect())
    }

    fn backend(&self) -> &'static str {
        self.runtime.backend()
    }

    fn tensors(&self) -> Option<(Vec<TensorInfo>, Vec<TensorInfo>)> {
        Some((
            self.runtime.inputs().to_vec(),
            self.runtime.outputs().to_vec(),
        ))
    }

    /// Zeros in every input, a dimension that varies taken as 1; none
    /// when an input's type is not known.
    fn warm_up_request(&self) -> Option<Vec<u8>> {
        let inputs = self
            .runtime
            .inputs()
            .iter()
            .map(|input| {
                let shape: Vec<usize> = input.shape.iter().map(|size| size.unwrap_or(1)).collect();
                let count: usize = shape.iter().product();
                let datatype = input.data_type?.name();
                let zero = if datatype == "BOOL" {
                    serde_json::json!(false)
                } else {
                    serde_json::json!(0)
                };
                Some(serde_json::json!({
                    "name": input.name, "datatype": datatype, "shape": shape,
                    "data": vec![zero; count],
                }))
            })
            .collect::<Option<Vec<_>>>()?;
        serde_json::to_vec(&serde_json::json!({ "inputs": inputs })).ok()
    }
}

/// The rows of a request: the first dimension its inputs share, if they do.
fn batch_rows(request: &TensorRequest) -> Option<usize> {
    let rows = *request.inputs.first()?.shape.first()?;
    request
        .inputs
        .iter()
        .all(|input| input.shape.first() == Some(&rows))
        .then_some(rows)
}

/// Whether two requests can be concatenated along the batch dimension.
fn batchable(a: &TensorRequest, b: &TensorRequest) -> bool {
    batch_rows(a).is_some()
        && batch_rows(b).is_some()
        && a.inputs.len() == b.inputs.len()
        && a.inputs.iter().all(|left| {
            b.inputs.iter().any(|right| {
                right.name == left.name
                    && right.data_type() == left.data_type()
                    && right.shape[1..] == left.shape[1..]
            })
        })
}

fn concatenate(group: Vec<TensorRequest>) -> Vec<Tensor> {
    let names: Vec<String> = group[0].inputs.iter().map(|t| t.name.clone()).collect();
    names
        .into_iter()
        .map(|name| {
            let parts: Vec<&Tensor> = group
                .iter()
                .map(|request| {
                    request
                        .inputs
                        .iter()
                        .find(|t| t.name == name)
                        .expect("batchable requests share input names")
                })
                .collect();
            let mut shape = parts[0].shape.clone();
            shape[0] = parts.iter().map(|t| t.shape[0]).sum();
            let data = join(parts.iter().map(|t| &t.data));
            Tensor::new(name, shape, data).expect("concatenated shapes add up")
        })
        .collect()
}

fn join<'a>(parts: impl Iterator<Item = &'a TensorData>) -> TensorData {
    let mut parts = parts.peekable();
    macro_rules! gather {
        ($variant:ident) => {
            TensorData::$variant(
                parts
                    .flat_map(|part| match part {
                        TensorData::$variant(values) => values.clone(),
                        _ => unreachable!("batchable requests share element types"),
                    })
                    .collect(),
            )
        };
    }
    match parts.peek().expect("at least one part") {
        TensorData::Fp32(_) => gather!(Fp32),
        TensorData::Fp64(_) => gather!(Fp64),
        TensorData::Int64(_) => gather!(Int64),
        TensorData::Int32(_) => gather!(Int32),
        TensorData::Int8(_) => gather!(Int8),
        TensorData::Uint8(_) => gather!(Uint8),
        TensorData::Bool(_) => gather!(Bool),
    }
}

/// Rows `offset .. offset + share` of an output whose first dimension is
/// the batch (`total` rows).
fn slice_batch(
    output: &Tensor,
    offset: usize,
    share: usize,
    total: usize,
) -> Result<WireTensor, TaskError> {
    let (shape, range) = match output.shape.first() {
        Some(&rows) if rows == total && total > 0 => {
            let row = output.data.len() / rows;
            let mut shape = output.shape.clone();
            shape[0] = share;
            (shape, offset * row..(offset + share) * row)
        }
        _ if offset == 0 && share == total => (output.shape.clone(), 0..output.data.len()),
        _ => {
            return Err(TaskError::Failed(format!(
                "output '{}' has shape {:?}, which cannot be split by request",
                output.name, output.shape
            )));
        }
    };
    macro_rules! part {
        ($values:expr) => {
            serde_json::to_value(&$values[range.clone()]).expect("numbers serialise")
        };
    }
    let data = match &output.data {
        TensorData::Fp32(values) => part!(values),
        TensorData::Fp64(values) => part!(values),
        TensorData::Int64(values) => part!(values),
        TensorData::Int32(values) => part!(values),
        TensorData::Int8(values) => part!(values),
        TensorData::Uint8(values) => part!(values),
        TensorData::Bool(values) => part!(values),
    };
    Ok(WireTensor {
        name: output.name.clone(),
        shape,
        datatype: output.data_type(),
        data,
    })
}

/// Reads `data`, flat or nested as KServe allows, as the declared type.
fn parse_data(name: &str, datatype: DataType, data: &Value) -> Result<TensorData, String> {
    let mut flat = Vec::new();
    flatten(data, &mut flat);
    let bad = |what: &str| format!("input '{name}': data holds {what}, not {}", datatype.name());
    macro_rules! numbers {
        ($variant:ident, $convert:expr) => {
            TensorData::$variant(
                flat.iter()
                    .map(|value| $convert(*value).ok_or_else(|| bad("a value out of range")))
                    .collect::<Result<_, _>>()?,
            )
        };
    }
    Ok(match datatype {
        DataType::Fp32 => numbers!(Fp32, |v: &Value| v.as_f64().map(|x| x as f32)),
        DataType::Fp64 => numbers!(Fp64, |v: &Value| v.as_f64()),
        DataType::Int64 => numbers!(Int64, |v: &Value| v.as_i64()),
        DataType::Int32 => numbers!(Int32, |v: &Value| v
            .as_i64()
            .and_then(|x| i32::try_from(x).ok())),
        DataType::Int8 => numbers!(Int8, |v: &Value| v
            .as_i64()
            .and_then(|x| i8::try_from(x).ok())),
        DataType::Uint8 => numbers!(Uint8, |v: &Value| v
            .as_u64()
            .and_then(|x| u8::try_from(x).ok())),
        DataType::Bool => numbers!(Bool, |v: &Value| v.as_bool()),
    })
}

fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| flatten(item, out)),
        other => out.push(other),
    }
}
