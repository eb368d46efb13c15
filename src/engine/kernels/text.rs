//! The TextCNN's two hot spots as custom ops:
//! - [`embedding`]: a row gather whose backward adds each position's gradient
//!   to its token's row and leaves the padding token's row at zero
//!   (`nn.Embedding(padding_idx=...)`), without the mask arithmetic;
//! - [`conv_relu_max_over_time`]: `max_t relu(conv(x)[t] + b)` of
//!   `Conv2d(1, F, (k, E))` over an embedded sequence `[B, L, E]`. The windows
//!   of consecutive positions overlap in memory, so the whole batch is one
//!   matrix product over a strided view of the input (no unfolding copy; the
//!   few windows that straddle two samples are computed and ignored). Only the
//!   maximum of each (sample, filter) gets a gradient, so the backward pass
//!   touches one window per (sample, filter) — `B·F·k·E` multiply-adds for each
//!   of `dW` and `dx` instead of two dense products.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::direct_grads;
use super::gemm::{matmul, pool_parallelism, Strides};

/// Names the kernels in errors.
const OP: &str = "text kernels";

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    super::f32_slice(OP, s, l, what)
}

fn cpu<'a>(s: &'a candle_core::Storage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    super::cpu_f32_slice(OP, s, l, what)
}

struct EmbeddingOp {
    ids: Arc<Vec<u32>>,
    pad: Option<usize>,
    dim: usize,
    out_shape: Shape,
}

impl CustomOp1 for EmbeddingOp {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = f32_slice(s, l, "embedding")?;
        let e = self.dim;
        let mut out = vec![0f32; self.ids.len() * e];
        out.par_chunks_mut(e * 256)
            .zip(self.ids.par_chunks(256))
            .for_each(|(o, ids)| {
                for (row, &id) in o.chunks_mut(e).zip(ids) {
                    let id = id as usize;
                    row.copy_from_slice(&w[id * e..(id + 1) * e]);
                }
            });
        Ok((CpuStorage::F32(out), self.out_shape.clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let e = self.dim;
        let mut dw = vec![0f32; arg.elem_count()];
        {
            let (gs, gl) = grad.storage_and_layout();
            let g = cpu(&gs, gl, "gradient")?;
            for (row, &id) in g.chunks(e).zip(self.ids.iter()) {
                let id = id as usize;
                if Some(id) == self.pad {
                    continue;
                }
                for (d, v) in dw[id * e..(id + 1) * e].iter_mut().zip(row) {
                    *d += v;
                }
            }
        }
        direct_grads::deliver(arg, Tensor::from_vec(dw, arg.shape(), arg.device())?)
    }
}

/// `nn.Embedding(weight, padding_idx=pad)(ids)`: rows of `weight` `[V, E]` for
/// the token ids `[B, L]` (given as f32 or integers), giving `[B, L, E]`; the
/// `pad` row gets no gradient. An id outside the vocabulary is an error.
pub fn embedding(weight: &Tensor, ids: &Tensor, pad: Option<usize>) -> Result<Tensor> {
    let (v, e) = weight.dims2()?;
    let mut out_dims = ids.dims().to_vec();
    out_dims.push(e);
    let flat = ids.to_dtype(candle_core::DType::U32)?.flatten_all()?;
    if !super::on_cpu_f32(&[weight]) {
        candle_core::bail!("embedding: the kernel runs on f32 CPU tensors only");
    }
    let ids: Vec<u32> = flat.to_vec1()?;
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= v) {
        candle_core::bail!("embedding: token id {bad} is outside the vocabulary of {v}");
    }
    let op = EmbeddingOp {
        ids: Arc::new(ids),
        pad,
        dim: e,
        out_shape: Shape::from(out_dims),
    };
    weight.contiguous()?.apply_op1(op)
}

struct ConvMaxOp {
    batch: usize,
    len: usize,
    embed: usize,
    k: usize,
    filters: usize,
    /// Per (sample, filter): the first position of the maximum, or -1 where
    /// the maximum is not positive (the ReLU passes no gradient); set by the
    /// forward pass, read by the backward pass.
    argmax: OnceLock<Vec<i32>>,
}

impl ConvMaxOp {
    fn windows(&self) -> usize {
        self.len + 1 - self.k
    }
}

impl CustomOp3 for ConvMaxOp {
    fn name(&self) -> &'static str {
        "conv-relu-max-over-time"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "input")?;
        let w = f32_slice(s2, l2, "weight")?;
        let b = f32_slice(s3, l3, "bias")?;
        let (e, k, f, l, n) = (self.embed, self.k, self.filters, self.len, self.windows());
        let ke = k * e;
        // Row r of the strided view is the window starting at position r of the
        // flattened batch: x[r*E .. r*E + k*E].
        let rows = self.batch * l - (k - 1);
        let mut out = vec![0f32; rows * f];
        matmul(
            (rows, f, ke),
            &mut out,
            Strides::rows(f),
            x,
            Strides { rs: e, cs: 1 },
            w,
            Strides::transposed(ke),
            false,
            pool_parallelism(),
        )?;
        let mut pooled = vec![0f32; self.batch * f];
        let mut argmax = vec![-1i32; self.batch * f];
        pooled
            .par_chunks_mut(f)
            .zip(argmax.par_chunks_mut(f))
            .enumerate()
            .for_each(|(s, (p, a))| {
                let base = s * l;
                for j in 0..f {
                    let mut best = f32::NEG_INFINITY;
                    let mut at = 0usize;
                    for t in 0..n {
                        let v = out[(base + t) * f + j] + b[j];
                        if v > best {
                            best = v;
                            at = t;
                        }
                    }
                    // ReLU: a maximum that is not positive (or NaN) gives 0
                    // and no gradient.
                    if best > 0.0 {
                        p[j] = best;
                        a[j] = at as i32;
                    }
                }
            });
        let _ = self.argmax.set(argmax);
        Ok((CpuStorage::F32(pooled), Shape::from((self.batch, f))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(argmax) = self.argmax.get() else {
            candle_core::bail!("conv-relu-max-over-time: backward before forward");
        };
        let grad = grad.contiguous()?;
        let (e, k, f, l) = (self.embed, self.k, self.filters, self.len);
        let ke = k * e;
        let need_dx = x.track_op();
        let (dx, dw, db) = {
            let (xs, xl) = x.storage_and_layout();
            let (ws, wl) = w.storage_and_layout();
            let (gs, gl) = grad.storage_and_layout();
            let xv = cpu(&xs, xl, "input")?;
            let wv = cpu(&ws, wl, "weight")?;
            let gv = cpu(&gs, gl, "gradient")?;
            // dW row j: the sum of each sample's winning window, weighted.
            let mut dw = vec![0f32; f * ke];
            dw.par_chunks_mut(ke).enumerate().for_each(|(j, row)| {
                for s in 0..self.batch {
                    let t = argmax[s * f + j];
                    if t < 0 {
                        continue;
                    }
                    let g = gv[s * f + j];
                    let start = (s * l + t as usize) * e;
                    for (d, v) in row.iter_mut().zip(&xv[start..start + ke]) {
                        *d += g * v;
                    }
                }
            });
            let mut db = vec![0f32; f];
            for s in 0..self.batch {
                for j in 0..f {
                    if argmax[s * f + j] >= 0 {
                        db[j] += gv[s * f + j];
                    }
                }
            }
            let dx = if need_dx {
                let mut dx = vec![0f32; self.batch * l * e];
                dx.par_chunks_mut(l * e).enumerate().for_each(|(s, xs)| {
                    for j in 0..f {
                        let t = argmax[s * f + j];
                        if t < 0 {
                            continue;
                        }
                        let g = gv[s * f + j];
                        let start = t as usize * e;
                        for (d, v) in xs[start..start + ke]
                            .iter_mut()
                            .zip(&wv[j * ke..(j + 1) * ke])
                        {
                            *d += g * v;
                        }
                    }
                });
                Some(dx)
            } else {
                None
            };
            (dx, dw, db)
        };
        let dev = x.device();
        let dx = match dx {
            Some(v) => Some(Tensor::from_vec(v, x.shape(), dev)?),
            None => None,
        };
        // Frozen (detached) parameters get no gradient.
        Ok((
            dx,
            direct_grads::param(w, || Tensor::from_vec(dw, w.shape(), dev))?,
            direct_grads::param(b, || Tensor::from_vec(db, f, dev))?,
        ))
    }
}

/// `relu(Conv2d(1, F, (k, E))(x.unsqueeze(1))).squeeze(3).max(dim=2).values`
/// for an embedded sequence `x` `[B, L, E]`, weight `[F, 1, k, E]` and bias
/// `[F]`: `[B, F]`, the gradient going to the first maximum of each filter.
/// CPU and f32 only (see [`super::on_cpu_f32`]).
pub fn conv_relu_max_over_time(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (batch, len, embed) = x.dims3()?;
    let (filters, one, k, we) = w.dims4()?;
    if one != 1 || we != embed || b.dims() != [filters] || k == 0 || k > len {
        candle_core::bail!(
            "conv over time: input {:?}, weight {:?}, bias {:?} do not fit",
            x.dims(),
            w.dims(),
            b.dims()
        );
    }
    if !super::on_cpu_f32(&[x, w, b]) {
        candle_core::bail!("conv over time: the kernel runs on f32 CPU tensors only");
    }
    let op = ConvMaxOp {
        batch,
        len,
        embed,
        k,
        filters,
        argmax: OnceLock::new(),
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{max_diff, rand};
    use super::*;
    use candle_core::{Device, Var};

    /// The same function from generic ops: unfolded windows, matmul, ReLU, and
    /// a max whose gradient goes to the first maximum.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        let (bsz, l, e) = x.dims3().unwrap();
        let (f, _, k, _) = w.dims4().unwrap();
        let n = l + 1 - k;
        let parts: Vec<Tensor> = (0..k).map(|j| x.narrow(1, j, n).unwrap()).collect();
        let windows = Tensor::cat(&parts, 2)
            .unwrap()
            .reshape((bsz * n, k * e))
            .unwrap();
        let out = windows
            .matmul(&w.reshape((f, k * e)).unwrap().t().unwrap())
            .unwrap()
            .broadcast_add(b)
            .unwrap()
            .relu()
            .unwrap()
            .reshape((bsz, n, f))
            .unwrap();
        let idx = out.detach().argmax_keepdim(1).unwrap();
        out.gather(&idx, 1).unwrap().squeeze(1).unwrap()
    }

    #[test]
    fn conv_max_matches_reference() {
        for k in [1, 2, 4] {
            let x = Var::from_tensor(&rand(&[3, 7, 5], 1)).unwrap();
            let w = Var::from_tensor(&rand(&[6, 1, k, 5], 2)).unwrap();
            let b = Var::from_tensor(&rand(&[6], 3)).unwrap();
            let r = reference(&x, &w, &b);
            let o = conv_relu_max_over_time(&x, &w, &b).unwrap();
            assert!(max_diff(&o, &r) < 1e-5);
            let wts = rand(&[3, 6], 4);
            let gr = (&r * &wts).unwrap().sum_all().unwrap().backward().unwrap();
            let go = (&o * &wts).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w, &b] {
                assert!(max_diff(go.get(v).unwrap(), gr.get(v).unwrap()) < 1e-5);
            }
        }
    }

    #[test]
    fn embedding_rows_and_padding_gradient() {
        let w = Var::from_tensor(&rand(&[6, 3], 1)).unwrap();
        let ids = Tensor::new(&[[1f32, 5., 1.], [0., 5., 5.]], &Device::Cpu).unwrap();
        let y = embedding(&w, &ids, Some(5)).unwrap();
        assert_eq!(y.dims(), &[2, 3, 3]);
        let wv = w.to_vec2::<f32>().unwrap();
        assert_eq!(
            y.get(0).unwrap().get(2).unwrap().to_vec1::<f32>().unwrap(),
            wv[1]
        );
        let g = y.sum_all().unwrap().backward().unwrap();
        let g = g.get(&w).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(g[1], vec![2.0; 3]);
        assert_eq!(g[0], vec![1.0; 3]);
        assert_eq!(g[5], vec![0.0; 3]);
        let bad = Tensor::new(&[[7f32]], &Device::Cpu).unwrap();
        assert!(embedding(&w, &bad, None).is_err());
    }
}
