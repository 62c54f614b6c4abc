//! KServe v2 inference bodies as they travel over HTTP: plain JSON, or a
//! JSON header followed by raw tensor bytes (the binary tensor data
//! extension, which NVIDIA's `tritonclient` uses by default).
//!
//! With the extension the `Inference-Header-Content-Length` header gives
//! the length of the JSON part; each input whose `parameters` carry
//! `binary_data_size` has that many bytes after it, in the order of the
//! inputs. Numbers are little-endian and row-major; a BYTES element is a
//! 4-byte little-endian length and then its bytes. Responses use the same
//! layout for the outputs a client asks to get as binary.

use std::borrow::Cow;

use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::error::{ApiError, ApiResult};

/// The header that gives the length of the JSON part of a body that
/// carries binary tensor data.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

fn bad(reason: impl Into<String>) -> ApiError {
    ApiError::BadRequest(reason.into())
}

/// An inference request: its JSON, and for each input sent as binary data,
/// those bytes.
pub struct InferBody {
    pub json: Value,
    binary: Vec<Option<Bytes>>,
}

impl InferBody {
    /// Splits a request body by its `Inference-Header-Content-Length`, or
    /// reads it all as JSON when the header is absent.
    pub fn parse(headers: &HeaderMap, body: Bytes) -> ApiResult<Self> {
        let Some(length) = headers.get(HEADER_LENGTH) else {
            let json = serde_json::from_slice(&body)
                .map_err(|error| bad(format!("malformed JSON body: {error}")))?;
            return Ok(Self {
                json,
                binary: Vec::new(),
            });
        };
        let length: usize = length
            .to_str()
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .ok_or_else(|| bad("Inference-Header-Content-Length is not a number"))?;
        if length > body.len() {
            return Err(bad(format!(
                "Inference-Header-Content-Length is {length}, but the body has {} bytes",
                body.len()
            )));
        }
        let json: Value = serde_json::from_slice(&body[..length])
            .map_err(|error| bad(format!("malformed JSON inference header: {error}")))?;
        let mut rest = body.slice(length..);
        let mut binary = Vec::new();
        for (index, input) in inputs(&json)?.iter().enumerate() {
            let size = input
                .pointer("/parameters/binary_data_size")
                .map(|size| {
                    size.as_u64().ok_or_else(|| {
                        bad(format!("input {index}: binary_data_size is not a count"))
                    })
                })
                .transpose()?;
            binary.push(match size {
                None => None,
                Some(size) => {
                    let size = usize::try_from(size).unwrap_or(usize::MAX);
                    if size > rest.len() {
                        return Err(bad(format!(
                            "input {index} has binary_data_size {size}, but only {} bytes follow",
                            rest.len()
                        )));
                    }
                    let data = rest.split_to(size);
                    Some(data)
                }
            });
        }
        if !rest.is_empty() {
            return Err(bad(format!(
                "{} bytes follow the inputs' binary data",
                rest.len()
            )));
        }
        Ok(Self { json, binary })
    }

    pub fn inputs(&self) -> ApiResult<&Vec<Value>> {
        inputs(&self.json)
    }

    /// The elements of a BYTES input, from its JSON `data` (strings, read
    /// with `from_json`) or its binary data.
    pub fn byte_elements(
        &self,
        index: usize,
        from_json: impl Fn(&str) -> ApiResult<Vec<u8>>,
    ) -> ApiResult<Vec<Vec<u8>>> {
        let tensor = &self.inputs()?[index];
        let name = tensor_name(tensor);
        let datatype = tensor.get("datatype").and_then(Value::as_str);
        if datatype != Some("BYTES") {
            return Err(bad(format!(
                "input '{name}' must have datatype BYTES, not {}",
                datatype.unwrap_or("(none)")
            )));
        }
        let items = match self.binary.get(index).cloned().flatten() {
            Some(data) => split_bytes_elements(name, &data)?,
            None => {
                let data = tensor
                    .get("data")
                    .ok_or_else(|| bad(format!("input '{name}' has no \"data\" list")))?;
                let mut flat = Vec::new();
                flatten(data, &mut flat);
                flat.into_iter()
                    .map(|item| {
                        item.as_str()
                            .ok_or_else(|| bad(format!("input '{name}' holds a non-string")))
                            .and_then(&from_json)
                    })
                    .collect::<ApiResult<_>>()?
            }
        };
        if items.len() as u64 != element_count(tensor)? {
            return Err(bad(format!(
                "input '{name}': its shape does not match its {} data items",
                items.len()
            )));
        }
        Ok(items)
    }

    /// The request as JSON alone, each binary input turned into its `data`
    /// list: what a worker of a tensor model reads.
    pub fn into_json(self) -> ApiResult<Value> {
        let Self { mut json, binary } = self;
        if binary.iter().all(Option::is_none) {
            return Ok(json);
        }
        let inputs = json
            .get_mut("inputs")
            .and_then(Value::as_array_mut)
            .ok_or_else(|| bad("the request has no \"inputs\" list"))?;
        for (tensor, data) in inputs.iter_mut().zip(binary) {
            let Some(data) = data else { continue };
            let name = tensor_name(tensor).to_owned();
            let datatype = tensor
                .get("datatype")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("input '{name}' has no datatype")))?;
            let values = decode_numbers(&name, datatype, &data)?;
            if values.len() as u64 != element_count(tensor)? {
                return Err(bad(format!(
                    "input '{name}': its shape does not match its {} binary values",
                    values.len()
                )));
            }
            let object = tensor
                .as_object_mut()
                .ok_or_else(|| bad(format!("input '{name}' is not an object")))?;
            object.insert("data".to_owned(), Value::Array(values));
            if let Some(Value::Object(parameters)) = object.get_mut("parameters") {
                parameters.remove("binary_data_size");
            }
        }
        Ok(json)
    }

    /// The request's own timeout: Triton's `timeout` parameter, in
    /// microseconds; 0 or absent is none.
    pub fn timeout(&self) -> ApiResult<Option<std::time::Duration>> {
        match self.json.pointer("/parameters/timeout") {
            None => Ok(None),
            Some(value) => match value.as_u64() {
                Some(0) => Ok(None),
                Some(micros) => Ok(Some(std::time::Duration::from_micros(micros))),
                None => Err(bad("parameters.timeout is a whole number of microseconds")),
            },
        }
    }

    /// Which outputs the client wants, and which of them as binary data.
    pub fn output_choice(&self) -> ApiResult<OutputChoice> {
        let binary_by_default = self
            .json
            .pointer("/parameters/binary_data_output")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let named = match self.json.get("outputs") {
            None | Some(Value::Null) => None,
            Some(Value::Array(outputs)) => Some(
                outputs
                    .iter()
                    .map(|output| {
                        let name = output
                            .get("name")
                            .and_then(Value::as_str)
                            .ok_or_else(|| bad("a requested output has no name"))?;
                        let binary = output
                            .pointer("/parameters/binary_data")
                            .and_then(Value::as_bool)
                            .unwrap_or(binary_by_default);
                        Ok((name.to_owned(), binary))
                    })
                    .collect::<ApiResult<Vec<_>>>()?,
            ),
            Some(_) => return Err(bad("\"outputs\" is not a list")),
        };
        Ok(OutputChoice {
            named,
            binary_by_default,
        })
    }
}

fn inputs(json: &Value) -> ApiResult<&Vec<Value>> {
    json.get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("the request has no \"inputs\" list"))
}

fn tensor_name(tensor: &Value) -> &str {
    tensor
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)")
}

/// The number of elements a tensor's shape holds.
fn element_count(tensor: &Value) -> ApiResult<u64> {
    let name = tensor_name(tensor);
    let shape = tensor
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(format!("input '{name}' has no shape")))?;
    shape.iter().try_fold(1u64, |count, dimension| {
        dimension
            .as_u64()
            .and_then(|dimension| count.checked_mul(dimension))
            .ok_or_else(|| bad(format!("input '{name}' has a bad shape")))
    })
}

fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| flatten(item, out)),
        other => out.push(other),
    }
}

/// BYTES elements from their binary form: each a 4-byte little-endian
/// length and its bytes.
fn split_bytes_elements(name: &str, mut data: &[u8]) -> ApiResult<Vec<Vec<u8>>> {
    let mut items = Vec::new();
    while !data.is_empty() {
        let Some((length, rest)) = data.split_first_chunk::<4>() else {
            return Err(bad(format!(
                "input '{name}': binary BYTES data ends inside an element's length"
            )));
        };
        let length = u32::from_le_bytes(*length) as usize;
        if length > rest.len() {
            return Err(bad(format!(
                "input '{name}': a binary BYTES element of {length} bytes overruns the data"
            )));
        }
        items.push(rest[..length].to_vec());
        data = &rest[length..];
    }
    Ok(items)
}

/// The size of one element of a numeric KServe datatype.
fn element_size(datatype: &str) -> Option<usize> {
    Some(match datatype {
        "BOOL" | "UINT8" | "INT8" => 1,
        "UINT16" | "INT16" => 2,
        "UINT32" | "INT32" | "FP32" => 4,
        "UINT64" | "INT64" | "FP64" => 8,
        _ => return None,
    })
}

/// Numbers from their binary form, as JSON values.
fn decode_numbers(name: &str, datatype: &str, data: &[u8]) -> ApiResult<Vec<Value>> {
    let size = element_size(datatype).ok_or_else(|| {
        bad(format!(
            "input '{name}': binary data of datatype {datatype} is not supported here \
             (numbers of BOOL, INT8 to INT64, UINT8 to UINT64, FP32 and FP64 are)"
        ))
    })?;
    if !data.len().is_multiple_of(size) {
        return Err(bad(format!(
            "input '{name}': {} bytes of binary data is not a whole number of {datatype} values",
            data.len()
        )));
    }
    let values = data.chunks_exact(size).map(|bytes| {
        let word = |n: usize| {
            let mut array = [0u8; 8];
            array[..n].copy_from_slice(&bytes[..n]);
            u64::from_le_bytes(array)
        };
        match datatype {
            "BOOL" => json!(bytes[0] != 0),
            "UINT8" | "UINT16" | "UINT32" | "UINT64" => json!(word(size)),
            "INT8" => json!(bytes[0] as i8),
            "INT16" => json!(i16::from_le_bytes([bytes[0], bytes[1]])),
            "INT32" => json!(word(4) as u32 as i32),
            "INT64" => json!(word(8) as i64),
            "FP32" => json!(f32::from_bits(word(4) as u32)),
            _ => json!(f64::from_bits(word(8))),
        }
    });
    Ok(values.collect())
}

/// Which outputs a response carries, and in which form.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OutputChoice {
    /// The outputs the request named, each with whether it wants binary
    /// data; None for all of them.
    named: Option<Vec<(String, bool)>>,
    binary_by_default: bool,
}

impl OutputChoice {
    /// Refuses an output the model does not have, before any work is done
    /// for the request (when the outputs are known beforehand).
    pub fn check_known(&self, outputs: &[&str]) -> ApiResult<()> {
        for (name, _) in self.named.iter().flatten() {
            if !outputs.contains(&name.as_str()) {
                return Err(bad(format!("the model has no output named '{name}'")));
            }
        }
        Ok(())
    }

    /// The outputs asked for, taken out of `response`, each with whether
    /// it goes as binary data.
    fn chosen(&self, response: &mut Value) -> ApiResult<Vec<(Value, bool)>> {
        let outputs = match response.get_mut("outputs").map(Value::take) {
            Some(Value::Array(outputs)) => outputs,
            _ => Vec::new(),
        };
        match &self.named {
            None => Ok(outputs
                .into_iter()
                .map(|output| (output, self.binary_by_default))
                .collect()),
            Some(named) => {
                let mut outputs = outputs;
                named
                    .iter()
                    .map(|(name, binary)| {
                        let position = outputs
                            .iter()
                            .position(|output| tensor_name(output) == name)
                            .ok_or_else(|| {
                                bad(format!("the model has no output named '{name}'"))
                            })?;
                        Ok((outputs.remove(position), *binary))
                    })
                    .collect()
            }
        }
    }

    /// The response with only the outputs asked for, all of them as JSON
    /// (for a result kept to be fetched later, which has no binary part).
    pub fn select(&self, mut response: Value) -> ApiResult<Value> {
        let chosen = self.chosen(&mut response)?;
        response["outputs"] = Value::Array(chosen.into_iter().map(|(output, _)| output).collect());
        Ok(response)
    }

    /// The HTTP response for a v2 response whose outputs hold their data as
    /// JSON: only the outputs asked for, those wanted as binary data moved
    /// after the JSON.
    pub fn respond(&self, mut response: Value) -> ApiResult<Response> {
        let chosen = self.chosen(&mut response)?;
        let mut tail = Vec::new();
        let mut kept = Vec::with_capacity(chosen.len());
        for (mut output, binary) in chosen {
            if binary {
                let bytes = encode_output(&output)?;
                let object = output
                    .as_object_mut()
                    .expect("an output tensor is a JSON object");
                object.remove("data");
                let parameters = object
                    .entry("parameters")
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(parameters) = parameters {
                    parameters.insert("binary_data_size".to_owned(), json!(bytes.len()));
                }
                tail.extend_from_slice(&bytes);
            }
            kept.push(output);
        }
        response["outputs"] = Value::Array(kept);
        let header = serde_json::to_vec(&response).expect("a JSON value serialises");
        if tail.is_empty() {
            return Ok((
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                header,
            )
                .into_response());
        }
        let header_length = HeaderValue::from(header.len());
        let mut body = header;
        body.extend_from_slice(&tail);
        Ok((
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                ),
                (
                    header::HeaderName::from_static(HEADER_LENGTH),
                    header_length,
                ),
            ],
            body,
        )
            .into_response())
    }
}

/// An output's JSON `data` in binary form.
fn encode_output(output: &Value) -> ApiResult<Vec<u8>> {
    let name = tensor_name(output);
    let datatype = output
        .get("datatype")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut flat = Vec::new();
    if let Some(data) = output.get("data") {
        flatten(data, &mut flat);
    }
    let internal = |what: &str| {
        ApiError::Internal(format!(
            "output '{name}' of datatype {datatype} holds {what}"
        ))
    };
    let mut bytes = Vec::new();
    for value in flat {
        match datatype {
            "BYTES" => {
                let text: Cow<str> = match value {
                    Value::String(text) => Cow::Borrowed(text),
                    other => Cow::Owned(other.to_string()),
                };
                let length = u32::try_from(text.len()).map_err(|_| internal("a huge string"))?;
                bytes.extend_from_slice(&length.to_le_bytes());
                bytes.extend_from_slice(text.as_bytes());
            }
            "BOOL" => bytes.push(u8::from(
                value.as_bool().ok_or_else(|| internal("a non-boolean"))?,
            )),
            "FP32" => bytes.extend_from_slice(
                &(value.as_f64().ok_or_else(|| internal("a non-number"))? as f32).to_le_bytes(),
            ),
            "FP64" => bytes.extend_from_slice(
                &value
                    .as_f64()
                    .ok_or_else(|| internal("a non-number"))?
                    .to_le_bytes(),
            ),
            _ => {
                let size = element_size(datatype)
                    .ok_or_else(|| internal("a type binary data cannot carry"))?;
                let word = match value.as_i64() {
                    Some(signed) => signed as u64,
                    None => value.as_u64().ok_or_else(|| internal("a non-integer"))?,
                };
                bytes.extend_from_slice(&word.to_le_bytes()[..size]);
            }
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary_request(json: &Value, tail: &[u8]) -> (HeaderMap, Bytes) {
        let header = serde_json::to_vec(json).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_LENGTH, HeaderValue::from(header.len()));
        let mut body = header;
        body.extend_from_slice(tail);
        (headers, Bytes::from(body))
    }

    #[test]
    fn binary_bytes_elements_are_split_by_their_lengths() {
        let mut tail = Vec::new();
        for text in ["ab", "", "xyz"] {
            tail.extend_from_slice(&(text.len() as u32).to_le_bytes());
            tail.extend_from_slice(text.as_bytes());
        }
        let json = json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3],
            "parameters": {"binary_data_size": tail.len()}}]});
        let (headers, body) = binary_request(&json, &tail);
        let request = InferBody::parse(&headers, body).unwrap();
        let items = request
            .byte_elements(0, |_| unreachable!("no JSON data"))
            .unwrap();
        assert_eq!(items, vec![b"ab".to_vec(), Vec::new(), b"xyz".to_vec()]);
    }

    #[test]
    fn binary_numbers_become_json_data_for_the_worker() {
        let tail: Vec<u8> = [1.5f32, -2.0, 0.25, 8.0]
            .iter()
            .flat_map(|value| value.to_le_bytes())
            .collect();
        let json = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2],
            "parameters": {"binary_data_size": 16}}]});
        let (headers, body) = binary_request(&json, &tail);
        let request = InferBody::parse(&headers, body)
            .unwrap()
            .into_json()
            .unwrap();
        assert_eq!(request["inputs"][0]["data"], json!([1.5, -2.0, 0.25, 8.0]));
        assert!(
            request["inputs"][0]["parameters"]
                .get("binary_data_size")
                .is_none()
        );
    }

    #[test]
    fn sizes_that_do_not_add_up_are_refused() {
        let json = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2],
            "parameters": {"binary_data_size": 8}}]});
        let (headers, body) = binary_request(&json, &[0; 12]);
        assert!(InferBody::parse(&headers, body).is_err(), "extra bytes");
        let (headers, body) = binary_request(&json, &[0; 4]);
        assert!(InferBody::parse(&headers, body).is_err(), "too few bytes");
        let json = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3],
            "parameters": {"binary_data_size": 8}}]});
        let (headers, body) = binary_request(&json, &[0; 8]);
        let request = InferBody::parse(&headers, body).unwrap();
        assert!(request.into_json().is_err(), "shape of 3 for 2 values");
    }

    #[tokio::test]
    async fn outputs_asked_as_binary_follow_the_json_header() {
        let request = InferBody {
            json: json!({"inputs": [], "outputs": [
                {"name": "labels", "parameters": {"binary_data": false}},
                {"name": "embedding", "parameters": {"binary_data": true}}]}),
            binary: Vec::new(),
        };
        let response = json!({"outputs": [
            {"name": "embedding", "datatype": "FP32", "shape": [2], "data": [1.0, -0.5]},
            {"name": "labels", "datatype": "BYTES", "shape": [1], "data": ["cat"]},
            {"name": "unasked", "datatype": "INT64", "shape": [1], "data": [7]}]});
        let response = request.output_choice().unwrap().respond(response).unwrap();
        let length: usize = response.headers()[HEADER_LENGTH]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let header: Value = serde_json::from_slice(&body[..length]).unwrap();
        let names: Vec<&str> = header["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(tensor_name)
            .collect();
        assert_eq!(names, ["labels", "embedding"]);
        assert_eq!(header["outputs"][0]["data"], json!(["cat"]));
        assert_eq!(
            header["outputs"][1]["parameters"]["binary_data_size"],
            json!(8)
        );
        let expected: Vec<u8> = [1.0f32, -0.5]
            .iter()
            .flat_map(|value| value.to_le_bytes())
            .collect();
        assert_eq!(&body[length..], expected.as_slice());
    }
}
