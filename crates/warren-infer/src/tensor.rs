//! Tensors as the tasks and the runtimes exchange them: a name, a shape and
//! row-major data of one element type. Kept free of any runtime's own types
//! so that both backends, and the KServe v2 JSON codec, meet on common
//! ground.

use serde::{Deserialize, Serialize};

/// Element types a model's inputs and outputs may have; named as in the
/// KServe v2 protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DataType {
    Fp32,
    Fp64,
    Int64,
    Int32,
    Int8,
    Uint8,
    Bool,
}

impl DataType {
    pub fn name(self) -> &'static str {
        match self {
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Int64 => "INT64",
            DataType::Int32 => "INT32",
            DataType::Int8 => "INT8",
            DataType::Uint8 => "UINT8",
            DataType::Bool => "BOOL",
        }
    }
}

/// The elements of a tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Fp32(Vec<f32>),
    Fp64(Vec<f64>),
    Int64(Vec<i64>),
    Int32(Vec<i32>),
    Int8(Vec<i8>),
    Uint8(Vec<u8>),
    Bool(Vec<bool>),
}

impl TensorData {
    pub fn data_type(&self) -> DataType {
        match self {
            TensorData::Fp32(_) => DataType::Fp32,
            TensorData::Fp64(_) => DataType::Fp64,
            TensorData::Int64(_) => DataType::Int64,
            TensorData::Int32(_) => DataType::Int32,
            TensorData::Int8(_) => DataType::Int8,
            TensorData::Uint8(_) => DataType::Uint8,
            TensorData::Bool(_) => DataType::Bool,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            TensorData::Fp32(values) => values.len(),
            TensorData::Fp64(values) => values.len(),
            TensorData::Int64(values) => values.len(),
            TensorData::Int32(values) => values.len(),
            TensorData::Int8(values) => values.len(),
            TensorData::Uint8(values) => values.len(),
            TensorData::Bool(values) => values.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

/// A tensor whose element count does not match its shape.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("tensor '{name}' has shape {shape:?} ({expected} elements) but {actual} elements")]
pub struct ShapeMismatch {
    pub name: String,
    pub shape: Vec<usize>,
    pub expected: usize,
    pub actual: usize,
}

impl Tensor {
    pub fn new(
        name: impl Into<String>,
        shape: Vec<usize>,
        data: TensorData,
    ) -> Result<Self, ShapeMismatch> {
        let name = name.into();
        let expected = shape.iter().product::<usize>();
        if expected != data.len() {
            return Err(ShapeMismatch {
                name,
                shape,
                expected,
                actual: data.len(),
            });
        }
        Ok(Self { name, shape, data })
    }

    pub fn data_type(&self) -> DataType {
        self.data.data_type()
    }

    /// The elements as f32, for outputs the tasks post-process.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::Fp32(values) => Some(values),
            _ => None,
        }
    }
}

/// What a model declares about one input or output: its name, element type
/// and shape, with `None` for a dimension that varies (batch, sequence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub data_type: Option<DataType>,
    pub shape: Vec<Option<usize>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_element_count_must_match_the_shape() {
        assert!(Tensor::new("x", vec![2, 3], TensorData::Fp32(vec![0.0; 6])).is_ok());
        let error = Tensor::new("x", vec![2, 3], TensorData::Int64(vec![0; 5])).unwrap_err();
        assert_eq!((error.expected, error.actual), (6, 5));
    }
}
