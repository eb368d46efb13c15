//! An ONNX graph under construction: nodes, initializers (the weights) and
//! unique value names, built with the protobuf messages of [`super::proto`].
//! The layer emitters ([`super::layers`]) and each architecture's
//! [`Classifier::export_onnx`](crate::engine::model::Classifier::export_onnx)
//! add to it; [`Graph::into_model`] wraps it into a `ModelProto`.

use std::collections::{BTreeSet, HashMap};

use candle_core::Tensor;

use super::proto::{
    attribute_type, data_type, AttributeProto, Dimension, DimensionValue, GraphProto, ModelProto,
    NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto,
    TensorTypeProto, TypeProto, ValueInfoProto,
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
        self.nodes.push(NodeProto {
            op_type: op.to_string(),
            name: format!("{op}_{}", self.nodes.len()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.to_string()],
            attribute: attrs.iter().map(|(k, v)| attribute(k, v)).collect(),
        });
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
        self.initializers.push(TensorProto {
            name: name.clone(),
            data_type: data_type::FLOAT,
            dims: dims.iter().map(|&d| d as i64).collect(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        name
    }

    /// A one-dimensional int64 initializer (shapes, axes).
    pub fn ints(&mut self, hint: &str, values: &[i64]) -> String {
        let name = self.fresh(hint);
        self.initializers.push(TensorProto {
            name: name.clone(),
            data_type: data_type::INT64,
            dims: vec![values.len() as i64],
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
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
        let mut in_dims = vec![None];
        in_dims.extend(self.sample_shape.iter().map(|&d| Some(d)));
        let graph = GraphProto {
            name: "edge-trainer".into(),
            input: vec![value_info(input, &in_dims)],
            output: vec![value_info(output, &[None, Some(classes)])],
            node: self.nodes,
            initializer: self.initializers,
        };
        ModelProto {
            ir_version: ir_version(self.opset),
            producer_name: "edge-trainer".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(graph),
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: self.opset,
            }],
            metadata_props: metadata
                .iter()
                .map(|(k, v)| StringStringEntryProto {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
        }
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
    let mut a = AttributeProto {
        name: name.to_string(),
        ..Default::default()
    };
    match v {
        Attr::Int(i) => {
            a.r#type = attribute_type::INT;
            a.i = *i;
        }
        Attr::Ints(v) => {
            a.r#type = attribute_type::INTS;
            a.ints = v.clone();
        }
        Attr::Float(f) => {
            a.r#type = attribute_type::FLOAT;
            a.f = *f;
        }
    }
    a
}

/// An f32 tensor value of `dims` (`None`: the symbolic batch dim).
fn value_info(name: &str, dims: &[Option<usize>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Some(n) => DimensionValue::DimValue(*n as i64),
                None => DimensionValue::DimParam(BATCH_DIM.into()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: data_type::FLOAT,
                shape: Some(TensorShapeProto { dim }),
            }),
        }),
    }
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
