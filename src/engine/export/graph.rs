//! An ONNX graph under construction: nodes, initializers (the weights) and
//! unique value names, built with the protobuf messages of `onnx-protobuf`.
//! The layer emitters ([`super::layers`]) and each architecture's
//! [`Classifier::export_onnx`](crate::engine::model::Classifier::export_onnx)
//! add to it; [`Graph::into_model`] wraps it into a `ModelProto`.

use std::collections::{BTreeSet, HashMap};

use candle_core::Tensor;
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::tensor_shape_proto::{dimension, Dimension};
use onnx_protobuf::type_proto::{self, Value};
use onnx_protobuf::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

use super::ExportError;

/// The name of the batch dimension of the input and the output.
pub const BATCH_DIM: &str = "N";

/// A node attribute's value.
#[derive(Debug, Clone)]
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
}

/// A graph being built for one opset.
pub struct Graph {
    opset: i64,
    sample_shape: Vec<usize>,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    used: HashMap<String, usize>,
}

impl Graph {
    /// An empty graph whose input holds samples of `sample_shape`.
    pub fn new(opset: i64, sample_shape: &[usize]) -> Self {
        Self {
            opset,
            sample_shape: sample_shape.to_vec(),
            nodes: Vec::new(),
            initializers: Vec::new(),
            used: HashMap::new(),
        }
    }

    /// The opset the graph is built for (emitters pick operator forms by it).
    pub fn opset(&self) -> i64 {
        self.opset
    }

    /// The shape of one sample of the graph's input (without the batch dim).
    pub fn sample_shape(&self) -> &[usize] {
        &self.sample_shape
    }

    /// A value name not used yet, from `hint`.
    fn fresh(&mut self, hint: &str) -> String {
        let n = self.used.entry(hint.to_string()).or_insert(0);
        *n += 1;
        if *n == 1 {
            hint.to_string()
        } else {
            format!("{hint}_{}", *n - 1)
        }
    }

    /// Adds a node with one output and returns the output's name.
    pub fn node(&mut self, op: &str, inputs: &[&str], attrs: &[(&str, Attr)]) -> String {
        let out = self.fresh(&op.to_lowercase());
        self.node_into(op, inputs, attrs, &out);
        out
    }

    /// Adds a node writing to the value `out`.
    pub fn node_into(&mut self, op: &str, inputs: &[&str], attrs: &[(&str, Attr)], out: &str) {
        let mut n = NodeProto::new();
        n.op_type = op.to_string();
        n.name = format!("{op}_{}", self.nodes.len());
        n.input = inputs.iter().map(|s| s.to_string()).collect();
        n.output = vec![out.to_string()];
        n.attribute = attrs.iter().map(|(k, v)| attribute(k, v)).collect();
        self.nodes.push(n);
    }

    /// An f32 initializer holding `t` (any shape), named after `hint`.
    pub fn tensor(&mut self, hint: &str, t: &Tensor) -> Result<String, ExportError> {
        let err = |source| ExportError::Tensor {
            name: hint.to_string(),
            source,
        };
        let values = t
            .to_dtype(candle_core::DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(err)?;
        Ok(self.floats(hint, &values, t.dims()))
    }

    /// An f32 initializer of `dims` holding `values` (row-major).
    pub fn floats(&mut self, hint: &str, values: &[f32], dims: &[usize]) -> String {
        let name = self.fresh(hint);
        let mut t = TensorProto::new();
        t.name = name.clone();
        t.data_type = DataType::FLOAT as i32;
        t.dims = dims.iter().map(|&d| d as i64).collect();
        t.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(t);
        name
    }

    /// A one-dimensional int64 initializer (shapes, axes).
    pub fn ints(&mut self, hint: &str, values: &[i64]) -> String {
        let name = self.fresh(hint);
        let mut t = TensorProto::new();
        t.name = name.clone();
        t.data_type = DataType::INT64 as i32;
        t.dims = vec![values.len() as i64];
        t.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(t);
        name
    }

    /// The operator types used so far, sorted.
    pub fn operators(&self) -> BTreeSet<String> {
        self.nodes.iter().map(|n| n.op_type.clone()).collect()
    }

    /// The model: this graph with its input `input` (`[N, ...sample_shape]`,
    /// f32), its output `output` (`[N, classes]`, f32) and `metadata` as the
    /// model's `metadata_props`.
    pub fn into_model(
        self,
        input: &str,
        output: &str,
        classes: usize,
        metadata: &[(String, String)],
    ) -> ModelProto {
        let mut g = GraphProto::new();
        g.name = "edge-trainer".into();
        let mut in_dims = vec![None];
        in_dims.extend(self.sample_shape.iter().map(|&d| Some(d)));
        g.input = vec![value_info(input, &in_dims)];
        g.output = vec![value_info(output, &[None, Some(classes)])];
        g.node = self.nodes;
        g.initializer = self.initializers;
        let mut m = ModelProto::new();
        m.ir_version = ir_version(self.opset);
        m.producer_name = "edge-trainer".into();
        m.producer_version = env!("CARGO_PKG_VERSION").into();
        let mut op = OperatorSetIdProto::new();
        op.version = self.opset;
        m.opset_import = vec![op];
        m.metadata_props = metadata
            .iter()
            .map(|(k, v)| {
                let mut e = StringStringEntryProto::new();
                e.key = k.clone();
                e.value = v.clone();
                e
            })
            .collect();
        m.graph = protobuf::MessageField::some(g);
        m
    }
}

/// The IR version of the ONNX release that introduced `opset` (what runtimes
/// of that age, TensorRT 8.2 for opset 13, accept).
pub fn ir_version(opset: i64) -> i64 {
    match opset {
        ..=11 => 6,
        12..=14 => 7,
        15..=18 => 8,
        19..=20 => 9,
        _ => 10,
    }
}

fn attribute(name: &str, v: &Attr) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.to_string();
    match v {
        Attr::Int(i) => {
            a.type_ = AttributeType::INT.into();
            a.i = *i;
        }
        Attr::Ints(v) => {
            a.type_ = AttributeType::INTS.into();
            a.ints = v.clone();
        }
        Attr::Float(f) => {
            a.type_ = AttributeType::FLOAT.into();
            a.f = *f;
        }
    }
    a
}

/// An f32 tensor value of `dims` (`None`: the symbolic batch dim).
fn value_info(name: &str, dims: &[Option<usize>]) -> ValueInfoProto {
    let mut shape = TensorShapeProto::new();
    shape.dim = dims
        .iter()
        .map(|d| {
            let mut dim = Dimension::new();
            dim.value = Some(match d {
                Some(n) => dimension::Value::DimValue(*n as i64),
                None => dimension::Value::DimParam(BATCH_DIM.into()),
            });
            dim
        })
        .collect();
    let mut tt = type_proto::Tensor::new();
    tt.elem_type = DataType::FLOAT as i32;
    tt.shape = protobuf::MessageField::some(shape);
    let mut ty = TypeProto::new();
    ty.value = Some(Value::TensorType(tt));
    let mut vi = ValueInfoProto::new();
    vi.name = name.to_string();
    vi.type_ = protobuf::MessageField::some(ty);
    vi
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_ir_follows_the_opset() {
        let mut g = Graph::new(13, &[4]);
        let a = g.node("Relu", &["x"], &[]);
        let b = g.node("Relu", &[&a], &[]);
        assert_eq!((a.as_str(), b.as_str()), ("relu", "relu_1"));
        let w = g.floats("w", &[1.0, 2.0], &[2]);
        let w2 = g.floats("w", &[1.0], &[1]);
        assert_ne!(w, w2);
        assert_eq!(ir_version(13), 7);
        assert_eq!(ir_version(17), 8);
        assert_eq!(
            g.operators().into_iter().collect::<Vec<_>>(),
            vec!["Relu".to_string()]
        );
    }
}
