//! Each layer of the kit as ONNX nodes: an architecture's export is the
//! sequence of its layers' [`Emit::emit`] calls, as its `forward` is the
//! sequence of their `forward` calls. Everything here is in evaluation mode
//! (dropout is the identity, batch-norm uses its running statistics) and uses
//! operators of opset 11 and later that TensorRT 8 supports: `Gemm`, `Conv`
//! (with groups), `BatchNormalization`, `MaxPool`, `AveragePool`,
//! `GlobalAveragePool`, `GlobalMaxPool`, `Gather`, `Relu`, `Clip` (ReLU6),
//! `Add`, `Concat`, `Flatten`, `Reshape` and element-wise maths.

use super::graph::{Attr, Graph};
use super::ExportError;
use crate::engine::model::batchnorm::EPS;
use crate::engine::model::layers::{
    Activation, AvgPool, BatchNorm, Conv, Embedding, Linear, MaxPool, PoolConfig, TextConv,
};

/// A layer that can write itself into an ONNX graph.
pub trait Emit {
    /// Adds the nodes computing this layer on the value `x`; returns the
    /// name of the result.
    fn emit(&self, g: &mut Graph, x: &str) -> Result<String, ExportError>;
}

impl Emit for Linear {
    /// `Gemm(x, W, b, transB = 1)`: `x Wᵀ + b` on `[N, in]`.
    fn emit(&self, g: &mut Graph, x: &str) -> Result<String, ExportError> {
        let (w, b) = self.params();
        let w = g.tensor(w.name(), w.tensor())?;
        let b = g.tensor(b.name(), b.tensor())?;
        Ok(g.node("Gemm", &[x, &w, &b], &[("transB", Attr::Int(1))]))
    }
}

impl Emit for Conv {
    /// `Conv` with the layer's strides, pads, dilations and groups (1-D or 2-D).
    fn emit(&self, g: &mut Graph, x: &str) -> Result<String, ExportError> {
        let (w, b, dims) = self.params();
        let cfg = *self.config();
        let kernel: Vec<i64> = w.tensor().dims()[2..].iter().map(|&k| k as i64).collect();
        let wn = g.tensor(w.name(), w.tensor())?;
        let mut inputs = vec![wn];
        if let Some(b) = b {
            inputs.push(g.tensor(b.name(), b.tensor())?);
        }
        let each = |v: usize| vec![v as i64; dims];
        let attrs = [
            ("kernel_shape", Attr::Ints(kernel)),
            ("strides", Attr::Ints(each(cfg.stride))),
            ("pads", Attr::Ints(vec![cfg.padding as i64; 2 * dims])),
            ("dilations", Attr::Ints(each(cfg.dilation))),
            ("group", Attr::Int(cfg.groups as i64)),
        ];
        let mut all: Vec<&str> = vec![x];
        all.extend(inputs.iter().map(String::as_str));
        Ok(g.node("Conv", &all, &attrs))
    }
}

impl Emit for BatchNorm {
    /// `BatchNormalization` with the running statistics (`epsilon = 1e-5`).
    fn emit(&self, g: &mut Graph, x: &str) -> Result<String, ExportError> {
        let (w, b, mean, var) = self.params();
        let prefix = w.name().strip_suffix(".weight").unwrap_or(w.name());
        let wn = g.tensor(w.name(), w.tensor())?;
        let bn = g.tensor(b.name(), b.tensor())?;
        let mn = g.tensor(&format!("{prefix}.running_mean"), mean)?;
        let vn = g.tensor(&format!("{prefix}.running_var"), var)?;
        Ok(g.node(
            "BatchNormalization",
            &[x, &wn, &bn, &mn, &vn],
            &[("epsilon", Attr::Float(EPS as f32))],
        ))
    }
}

/// `kernel_shape`, `strides` and `pads` of a pool over `dims` spatial dims.
fn pool_attrs(cfg: &PoolConfig, dims: usize) -> Vec<(&'static str, Attr)> {
    vec![
        ("kernel_shape", Attr::Ints(vec![cfg.kernel as i64; dims])),
        ("strides", Attr::Ints(vec![cfg.stride as i64; dims])),
        ("pads", Attr::Ints(vec![cfg.padding as i64; 2 * dims])),
    ]
}

/// A max-pool over `dims` spatial dims (floor mode, padding never the maximum).
pub fn max_pool(g: &mut Graph, pool: &MaxPool, dims: usize, x: &str) -> String {
    g.node("MaxPool", &[x], &pool_attrs(pool.config(), dims))
}

/// An average pool over `dims` spatial dims; padding counts as zeros, as
/// PyTorch's default (`count_include_pad = 1`).
pub fn avg_pool(g: &mut Graph, pool: &AvgPool, dims: usize, x: &str) -> String {
    let mut attrs = pool_attrs(pool.config(), dims);
    attrs.push(("count_include_pad", Attr::Int(1)));
    g.node("AveragePool", &[x], &attrs)
}

/// Mean over every spatial dim: `[N, C, ...] -> [N, C]`.
pub fn global_avg_pool(g: &mut Graph, x: &str) -> String {
    let y = g.node("GlobalAveragePool", &[x], &[]);
    flatten(g, &y)
}

/// `[N, ...] -> [N, rest]`.
pub fn flatten(g: &mut Graph, x: &str) -> String {
    g.node("Flatten", &[x], &[("axis", Attr::Int(1))])
}

/// `[N, ...] -> [N, ...shape]`.
pub fn reshape(g: &mut Graph, x: &str, shape: &[usize]) -> String {
    let mut dims = vec![-1i64];
    dims.extend(shape.iter().map(|&d| d as i64));
    let s = g.ints("shape", &dims);
    g.node("Reshape", &[x, &s], &[])
}

/// `a + b` (a residual connection).
pub fn add(g: &mut Graph, a: &str, b: &str) -> String {
    g.node("Add", &[a, b], &[])
}

/// Concatenation along the channel (feature) dim 1.
pub fn concat(g: &mut Graph, xs: &[String]) -> String {
    let refs: Vec<&str> = xs.iter().map(String::as_str).collect();
    g.node("Concat", &refs, &[("axis", Attr::Int(1))])
}

/// `min(max(x, 0), 6)` (MobileNet's ReLU6) as `Clip` with its bounds as inputs.
pub fn relu6(g: &mut Graph, x: &str) -> String {
    let lo = g.floats("clip_min", &[0.0], &[]);
    let hi = g.floats("clip_max", &[6.0], &[]);
    g.node("Clip", &[x, &lo, &hi], &[])
}

/// An activation, with PyTorch's definitions. GELU is the exact (erf) form,
/// composed of `Div`, `Erf`, `Add` and `Mul` (`Gelu` is an operator only from
/// opset 20 on); SiLU is `x * Sigmoid(x)`.
pub fn activation(g: &mut Graph, act: Activation, x: &str) -> String {
    match act {
        Activation::Relu => g.node("Relu", &[x], &[]),
        Activation::Tanh => g.node("Tanh", &[x], &[]),
        Activation::Sigmoid => g.node("Sigmoid", &[x], &[]),
        Activation::LeakyRelu => g.node("LeakyRelu", &[x], &[("alpha", Attr::Float(0.01))]),
        Activation::Silu => {
            let s = g.node("Sigmoid", &[x], &[]);
            g.node("Mul", &[x, &s], &[])
        }
        Activation::Gelu => {
            let sqrt2 = g.floats("sqrt2", &[std::f32::consts::SQRT_2], &[]);
            let one = g.floats("one", &[1.0], &[]);
            let half = g.floats("half", &[0.5], &[]);
            let d = g.node("Div", &[x, &sqrt2], &[]);
            let e = g.node("Erf", &[&d], &[]);
            let p = g.node("Add", &[&e, &one], &[]);
            let m = g.node("Mul", &[x, &p], &[]);
            g.node("Mul", &[&m, &half], &[])
        }
    }
}

impl Emit for Embedding {
    /// `Gather(W, Cast(ids, int64))`: the input holds token ids as floats.
    fn emit(&self, g: &mut Graph, x: &str) -> Result<String, ExportError> {
        let w = self.weight();
        let wn = g.tensor(w.name(), w.tensor())?;
        // TensorProto.DataType INT64 = 7.
        let ids = g.node("Cast", &[x], &[("to", Attr::Int(7))]);
        Ok(g.node("Gather", &[&wn, &ids], &[("axis", Attr::Int(0))]))
    }
}

impl Emit for TextConv {
    /// `[N, L, E]` -> `GlobalMaxPool(Relu(Conv2d(1, F, (k, E))))` -> `[N, F]`.
    fn emit(&self, g: &mut Graph, x: &str) -> Result<String, ExportError> {
        let (w, b) = self.params();
        let dims = w.tensor().dims();
        let (k, e) = (dims[2], dims[3]);
        let wn = g.tensor(w.name(), w.tensor())?;
        let bn = g.tensor(b.name(), b.tensor())?;
        let s = g.ints("shape", &[0, 1, -1, e as i64]);
        let img = g.node("Reshape", &[x, &s], &[]);
        let c = g.node(
            "Conv",
            &[&img, &wn, &bn],
            &[("kernel_shape", Attr::Ints(vec![k as i64, e as i64]))],
        );
        let r = g.node("Relu", &[&c], &[]);
        let m = g.node("GlobalMaxPool", &[&r], &[]);
        Ok(flatten(g, &m))
    }
}
