//! Each layer of the kit as ONNX nodes: an architecture's export is the
//! sequence of its layers' [`Emit::emit`] calls, as its `forward` is the
//! sequence of their `forward` calls. Everything here is in evaluation mode
//! (dropout is the identity, batch-norm uses its running statistics) and uses
//! operators of opset 11 and later that TensorRT 8 supports: `Gemm`, `Conv`
//! (with groups), `BatchNormalization`, `MaxPool`, `AveragePool`,
//! `GlobalAveragePool`, `GlobalMaxPool`, `Gather`, `Relu`, `Clip` (ReLU6),
//! `HardSigmoid` (and hard swish through it), `Add`, `Concat`, `Flatten`,
//! `Reshape` and element-wise maths.

use super::graph::{Attr, Graph};
use super::ExportError;
use crate::engine::model::layers::{
    Activation, AvgPool, BatchNorm, Conv, Embedding, Linear, MaxPool, PoolConfig, SqueezeExcite,
    TextConv,
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
    /// `BatchNormalization` with the running statistics and the layer's `epsilon`.
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
            &[("epsilon", Attr::Float(self.eps() as f32))],
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

/// `relu6(x + 3) / 6` (PyTorch's hard sigmoid) as `HardSigmoid` with
/// alpha 1/6 and beta 1/2 (an operator since opset 6).
pub fn hard_sigmoid(g: &mut Graph, x: &str) -> String {
    g.node(
        "HardSigmoid",
        &[x],
        &[
            ("alpha", Attr::Float(1.0 / 6.0)),
            ("beta", Attr::Float(0.5)),
        ],
    )
}

/// `x * relu6(x + 3) / 6` (PyTorch's hard swish) as `Mul(x, HardSigmoid(x))`:
/// `HardSwish` is an operator only from opset 14 on.
pub fn hard_swish(g: &mut Graph, x: &str) -> String {
    let s = hard_sigmoid(g, x);
    g.node("Mul", &[x, &s], &[])
}

impl Emit for SqueezeExcite {
    /// `x * HardSigmoid(Conv(Relu(Conv(GlobalAveragePool(x)))))`.
    fn emit(&self, g: &mut Graph, x: &str) -> Result<String, ExportError> {
        let (fc1, fc2) = self.convs();
        let s = g.node("GlobalAveragePool", &[x], &[]);
        let s = fc1.emit(g, &s)?;
        let s = g.node("Relu", &[&s], &[]);
        let s = fc2.emit(g, &s)?;
        let s = hard_sigmoid(g, &s);
        Ok(g.node("Mul", &[x, &s], &[]))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::export::{INPUT_NAME, OUTPUT_NAME};
    use crate::engine::model::layers::{conv, linear, ConvConfig};
    use crate::engine::model::{ForwardCtx, ParamStore};
    use candle_core::{Device, Tensor};
    use prost::Message;
    use rand::{Rng, SeedableRng};

    /// Runs an ONNX model with tract on one f32 input.
    fn run_in_tract(bytes: &[u8], shape: &[usize], values: &[f32]) -> Vec<f32> {
        use tract_onnx::prelude::*;
        let model = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        let input = Tensor::from_shape(shape, values).unwrap();
        let out = model.run(tvec!(input.into())).unwrap();
        let view = out[0].to_plain_array_view::<f32>().unwrap();
        view.iter().copied().collect()
    }

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 4.0 - 2.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The emitters the backbones need (grouped and dilated convolutions, a
    /// depthwise one, batch-norm with moved statistics, ReLU6, padded average
    /// and max pools, a residual add, global average pooling, every
    /// activation) give what the layers compute, as tract runs them.
    #[test]
    fn every_emitter_matches_its_layer_in_tract() {
        let store = ParamStore::new(5, &Device::Cpu);
        let vb = store.var_builder();
        let grouped = ConvConfig {
            stride: 1,
            padding: 2,
            dilation: 2,
            groups: 2,
        };
        let c1 = conv(2, (4, 6), 3, grouped, true, vb.pp("c1")).unwrap();
        let bn = BatchNorm::new(6, vb.pp("bn")).unwrap();
        let depthwise = ConvConfig {
            stride: 1,
            padding: 1,
            dilation: 1,
            groups: 6,
        };
        let c2 = conv(2, (6, 6), 3, depthwise, false, vb.pp("c2")).unwrap();
        let avg = AvgPool::new(PoolConfig {
            kernel: 3,
            stride: 2,
            padding: 1,
        })
        .unwrap();
        let max = MaxPool::new(PoolConfig {
            kernel: 3,
            stride: 2,
            padding: 1,
        })
        .unwrap();
        let fc1 = linear(6, 5, vb.pp("fc1")).unwrap();
        let fc2 = linear(5, 3, vb.pp("fc2")).unwrap();
        let x = random(&[3, 4, 9, 9], 1);
        // Running statistics away from 0 and 1.
        let warm = c1.forward(&x, &ForwardCtx::eval()).unwrap();
        for _ in 0..3 {
            bn.forward(&warm, &ForwardCtx::train(0)).unwrap();
        }

        let ctx = ForwardCtx::eval();
        let acts = [
            Activation::Gelu,
            Activation::Silu,
            Activation::LeakyRelu,
            Activation::Tanh,
            Activation::Sigmoid,
        ];
        let want = {
            let y = bn.forward(&c1.forward(&x, &ctx).unwrap(), &ctx).unwrap();
            let y = y.clamp(0f32, 6f32).unwrap();
            let y = avg.forward(&y, &ctx).unwrap();
            let y = (c2.forward(&y, &ctx).unwrap() + &y).unwrap();
            let y = Activation::Relu.apply(&y).unwrap();
            let y = max.forward(&y, &ctx).unwrap();
            let y = y.mean((2, 3)).unwrap();
            let mut y = fc1.forward(&y, &ctx).unwrap();
            for a in &acts[..3] {
                y = a.apply(&y).unwrap();
            }
            let mut y = fc2.forward(&y, &ctx).unwrap();
            for a in &acts[3..] {
                y = a.apply(&y).unwrap();
            }
            y.to_vec2::<f32>().unwrap()
        };

        let mut g = Graph::new(13, &[4, 9, 9]);
        let y = c1.emit(&mut g, INPUT_NAME).unwrap();
        let y = bn.emit(&mut g, &y).unwrap();
        let y = relu6(&mut g, &y);
        let y = avg_pool(&mut g, &avg, 2, &y);
        let z = c2.emit(&mut g, &y).unwrap();
        let y = add(&mut g, &z, &y);
        let y = activation(&mut g, Activation::Relu, &y);
        let y = max_pool(&mut g, &max, 2, &y);
        let y = global_avg_pool(&mut g, &y);
        let mut y = fc1.emit(&mut g, &y).unwrap();
        for a in &acts[..3] {
            y = activation(&mut g, *a, &y);
        }
        let mut y = fc2.emit(&mut g, &y).unwrap();
        for a in &acts[3..] {
            y = activation(&mut g, *a, &y);
        }
        g.node_into("Identity", &[&y], &[], OUTPUT_NAME);
        let bytes = g
            .into_model(INPUT_NAME, OUTPUT_NAME, 3, &[])
            .encode_to_vec();
        let got = run_in_tract(
            &bytes,
            &[3, 4, 9, 9],
            &x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let want: Vec<f32> = want.into_iter().flatten().collect();
        assert_eq!(got.len(), want.len());
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "ONNX and the layers differ by {diff}");
    }
}
