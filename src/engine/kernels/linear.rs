//! The fully-connected layer `y = x Wᵀ + b` (PyTorch's `F.linear`) as one
//! custom op: the forward product writes onto the bias, and the backward pass
//! computes `dW = dYᵀ x` straight into the weight's layout, `db` as column
//! sums, and `dx = dY W` only when the input needs a gradient (the first layer's
//! input is data and needs none). candle's generic path computes `dx` always,
//! adds the bias in a second pass and accumulates a transposed `dW` through a
//! strided copy.
//!
//! [`linear_relu`] fuses the ReLU that follows a hidden layer: the forward pass
//! clamps the product in place, and the backward pass masks the incoming
//! gradient once (where the output is positive, as PyTorch's
//! `threshold_backward`) instead of candle's five element-wise passes.
//!
//! On a CPU with f32 tensors [`linear`] uses this kernel; elsewhere candle's
//! `matmul` + `broadcast_add` (and `relu`).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::direct_grads;
use super::gemm::{matmul, pool_parallelism, Parallelism, Strides};

struct LinearOp {
    batch: usize,
    input: usize,
    output: usize,
    /// ReLU applied to the output.
    relu: bool,
}

/// Element-wise passes over at least this many values run in parallel (below
/// it, waking the pool costs more than the pass).
const PARALLEL_MIN_ELEMS: usize = 1 << 18;

/// `f` applied to every value of `src` (zipped with `other`) into a new
/// vector, across the thread pool when it is large.
fn map2(src: &[f32], other: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    if src.len() < PARALLEL_MIN_ELEMS {
        src.iter().zip(other).map(|(&a, &b)| f(a, b)).collect()
    } else {
        src.par_iter().zip(other).map(|(&a, &b)| f(a, b)).collect()
    }
}

/// Products smaller than this many multiply-adds run on one thread.
const PARALLEL_MIN_FLOPS: usize = 1 << 18;

impl LinearOp {
    fn parallelism(&self, flops: usize) -> Parallelism {
        if flops >= PARALLEL_MIN_FLOPS {
            pool_parallelism()
        } else {
            Parallelism::None
        }
    }
}

/// Names the kernel in errors.
const OP: &str = "linear";

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    super::f32_slice(OP, s, l, what)
}

fn cpu<'a>(s: &'a candle_core::Storage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    super::cpu_f32_slice(OP, s, l, what)
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
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
        let (m, n, k) = (self.batch, self.output, self.input);
        let mut y = Vec::with_capacity(m * n);
        for _ in 0..m {
            y.extend_from_slice(b);
        }
        matmul(
            (m, n, k),
            &mut y,
            Strides::rows(n),
            x,
            Strides::rows(k),
            w,
            Strides::transposed(k),
            true,
            self.parallelism(m * n * k),
        )?;
        if self.relu {
            // `v < 0` keeps NaN as NaN, as torch.relu does. A select, not a
            // conditional store: it vectorises, and half the values being
            // negative costs no branch misses.
            let relu = |v: &mut f32| *v = if *v < 0.0 { 0.0 } else { *v };
            if y.len() < PARALLEL_MIN_ELEMS {
                y.iter_mut().for_each(relu);
            } else {
                use rayon::prelude::*;
                y.par_iter_mut().for_each(relu);
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (bsz, inp, out) = (self.batch, self.input, self.output);
        // Frozen (detached) parameters and data get no gradient.
        let (need_dw, need_db) = (w.track_op(), b.track_op());
        let grad = grad.contiguous()?;
        let need_dx = x.track_op();
        let (dx, dw, db) = {
            let (xs, xl) = x.storage_and_layout();
            let (ws, wl) = w.storage_and_layout();
            let (gs, gl) = grad.storage_and_layout();
            let xv = cpu(&xs, xl, "input")?;
            let wv = cpu(&ws, wl, "weight")?;
            let gv = cpu(&gs, gl, "gradient")?;
            // Through the ReLU: the gradient where the output is positive.
            let masked;
            let gv = if self.relu {
                let (rs, rl) = res.storage_and_layout();
                let yv = cpu(&rs, rl, "output")?;
                if yv.len() != gv.len() {
                    candle_core::bail!("linear: output and gradient sizes differ");
                }
                masked = map2(gv, yv, |g, y| if y <= 0.0 { 0.0 } else { g });
                &masked[..]
            } else {
                gv
            };
            let par = self.parallelism(bsz * inp * out);
            let dx = if need_dx {
                let mut dx = vec![0f32; bsz * inp];
                matmul(
                    (bsz, inp, out),
                    &mut dx,
                    Strides::rows(inp),
                    gv,
                    Strides::rows(out),
                    wv,
                    Strides::rows(inp),
                    false,
                    par,
                )?;
                Some(dx)
            } else {
                None
            };
            let dw = if need_dw {
                let mut dw = vec![0f32; out * inp];
                matmul(
                    (out, inp, bsz),
                    &mut dw,
                    Strides::rows(inp),
                    gv,
                    Strides::transposed(out),
                    xv,
                    Strides::rows(inp),
                    false,
                    par,
                )?;
                Some(dw)
            } else {
                None
            };
            let db = need_db.then(|| {
                let mut db = vec![0f32; out];
                for row in gv.chunks(out) {
                    for (a, g) in db.iter_mut().zip(row) {
                        *a += g;
                    }
                }
                db
            });
            (dx, dw, db)
        };
        let dev = x.device();
        let tensor = |v: Option<Vec<f32>>, shape: &Shape| -> Result<Option<Tensor>> {
            v.map(|v| Tensor::from_vec(v, shape, dev)).transpose()
        };
        let param = |v: Option<Vec<f32>>, p: &Tensor| -> Result<Option<Tensor>> {
            match tensor(v, p.shape())? {
                Some(g) => direct_grads::deliver(p, g),
                None => Ok(None),
            }
        };
        Ok((tensor(dx, x.shape())?, param(dw, w)?, param(db, b)?))
    }
}

/// `F.linear(x, w, b)`: x `[B, in]`, w `[out, in]`, b `[out]` → `[B, out]`.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    linear_with(x, w, b, false)
}

/// `F.relu(F.linear(x, w, b))` as one op (see the module notes).
pub fn linear_relu(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    linear_with(x, w, b, true)
}

fn linear_with(x: &Tensor, w: &Tensor, b: &Tensor, relu: bool) -> Result<Tensor> {
    let (batch, input) = x.dims2()?;
    let (output, win) = w.dims2()?;
    if win != input || b.dims() != [output] {
        candle_core::bail!(
            "linear: input {:?}, weight {:?} and bias {:?} do not fit",
            x.dims(),
            w.dims(),
            b.dims()
        );
    }
    if !super::on_cpu_f32(&[x, w, b]) {
        candle_core::bail!("linear: the kernel runs on f32 CPU tensors only");
    }
    let op = LinearOp {
        batch,
        input,
        output,
        relu,
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{max_diff, rand};
    use super::*;
    use candle_core::Var;

    #[test]
    fn matches_candle_matmul_and_gradients() {
        // Small (one thread) and large (parallel) products.
        for (b, i, o) in [(3, 5, 4), (64, 300, 70)] {
            let x = Var::from_tensor(&rand(&[b, i], 1)).unwrap();
            let w = Var::from_tensor(&rand(&[o, i], 2)).unwrap();
            let bias = Var::from_tensor(&rand(&[o], 3)).unwrap();
            let reference = x
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            let ours = linear(&x, &w, &bias).unwrap();
            assert!(max_diff(&ours, &reference) < 1e-4);
            let wts = rand(&[b, o], 4);
            let gr = (&reference * &wts)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let go = (&ours * &wts)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &w, &bias] {
                assert!(max_diff(go.get(v).unwrap(), gr.get(v).unwrap()) < 1e-3);
            }
        }
    }

    #[test]
    fn fused_relu_matches_linear_then_relu() {
        // One thread and the parallel element-wise passes.
        for (b, i, o) in [(3, 5, 4), (256, 40, 1100)] {
            let x = Var::from_tensor(&rand(&[b, i], 11)).unwrap();
            let w = Var::from_tensor(&rand(&[o, i], 12)).unwrap();
            let bias = Var::from_tensor(&rand(&[o], 13)).unwrap();
            let reference = linear(&x, &w, &bias).unwrap().relu().unwrap();
            let ours = linear_relu(&x, &w, &bias).unwrap();
            assert_eq!(
                ours.to_vec2::<f32>().unwrap(),
                reference.to_vec2::<f32>().unwrap()
            );
            // Both sides of the ReLU are exercised.
            let flat = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let positive = flat.iter().filter(|v| **v > 0.0).count();
            assert!(
                positive > 0 && positive < flat.len(),
                "{positive} of {}",
                flat.len()
            );
            let wts = rand(&[b, o], 8);
            let gr = (&reference * &wts).unwrap().sum_all().unwrap();
            let go = (&ours * &wts).unwrap().sum_all().unwrap();
            let (gr, go) = (gr.backward().unwrap(), go.backward().unwrap());
            for v in [&x, &w, &bias] {
                assert!(max_diff(go.get(v).unwrap(), gr.get(v).unwrap()) < 1e-4);
            }
        }
    }

    #[test]
    fn data_input_gets_no_gradient() {
        let x = rand(&[4, 3], 1);
        let w = Var::from_tensor(&rand(&[2, 3], 2)).unwrap();
        let b = Var::from_tensor(&rand(&[2], 3)).unwrap();
        let g = linear(&x, &w, &b)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&x).is_none());
        assert!(g.get(&w).is_some() && g.get(&b).is_some());
    }
}
