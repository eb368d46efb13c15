//! Element-wise activations in the training path, one pass each way:
//! ReLU6 (MobileNetV2's) and the residual join `relu(a + b)` (ResNet's
//! `BasicBlock`). Their backward passes mask the incoming gradient with the
//! op's output, so nothing but the output is kept; candle's generic versions
//! allocate a tensor for every comparison, conversion and product. CPU and
//! f32 only.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::batchnorm::BnAct;

/// `relu6(x)` (`min(max(x, 0), 6)`, PyTorch's gradient: 1 strictly between 0
/// and 6): one pass forward, one masked pass backward. CPU and f32 only.
pub fn relu6(x: &Tensor) -> Result<Tensor> {
    if !super::on_cpu_f32(&[x]) {
        candle_core::bail!("relu6: the kernel runs on f32 CPU tensors only");
    }
    x.contiguous()?.apply_op1(Relu6Op)
}

struct Relu6Op;

impl CustomOp1 for Relu6Op {
    fn name(&self) -> &'static str {
        "relu6"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::f32_slice("relu6", s, l, "input")?;
        let y: Vec<f32> = x.par_iter().map(|&v| BnAct::Relu6.apply(v)).collect();
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let dx: Vec<f32> = {
            let (ys, yl) = res.storage_and_layout();
            let (gs, gl) = grad.storage_and_layout();
            let y = super::cpu_f32_slice("relu6", &ys, yl, "output")?;
            let g = super::cpu_f32_slice("relu6", &gs, gl, "gradient")?;
            y.par_iter()
                .zip(g)
                .map(|(&y, &g)| if BnAct::Relu6.passes(y) { g } else { 0.0 })
                .collect()
        };
        Ok(Some(Tensor::from_vec(dx, res.shape(), res.device())?))
    }
}

/// `relu(a + b)` for two tensors of the same shape (ResNet's residual join),
/// `relu` only when asked: one pass forward; backward, the output's mask
/// applied once and the same gradient handed to both inputs. CPU and f32 only.
pub fn add_act(a: &Tensor, b: &Tensor, relu: bool) -> Result<Tensor> {
    if !super::on_cpu_f32(&[a, b]) {
        candle_core::bail!("add: the kernel runs on f32 CPU tensors only");
    }
    if a.dims() != b.dims() {
        candle_core::bail!("add: shapes {:?} and {:?} differ", a.dims(), b.dims());
    }
    let act = if relu { BnAct::Relu } else { BnAct::None };
    a.contiguous()?.apply_op2(&b.contiguous()?, AddOp(act))
}

struct AddOp(BnAct);

impl CustomOp2 for AddOp {
    fn name(&self) -> &'static str {
        "add-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = super::f32_slice("add", s1, l1, "lhs")?;
        let b = super::f32_slice("add", s2, l2, "rhs")?;
        let act = self.0;
        let y: Vec<f32> = a
            .par_iter()
            .zip(b)
            .with_min_len(1 << 14)
            .map(|(&a, &b)| act.apply(a + b))
            .collect();
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !a.track_op() && !b.track_op() {
            return Ok((None, None));
        }
        let g = if self.0 == BnAct::None {
            grad.clone()
        } else {
            let grad = grad.contiguous()?;
            let dx: Vec<f32> = {
                let (ys, yl) = res.storage_and_layout();
                let (gs, gl) = grad.storage_and_layout();
                let y = super::cpu_f32_slice("add", &ys, yl, "output")?;
                let g = super::cpu_f32_slice("add", &gs, gl, "gradient")?;
                let act = self.0;
                y.par_iter()
                    .zip(g)
                    .with_min_len(1 << 14)
                    .map(|(&y, &g)| if act.passes(y) { g } else { 0.0 })
                    .collect()
            };
            Tensor::from_vec(dx, res.shape(), res.device())?
        };
        Ok((a.track_op().then(|| g.clone()), b.track_op().then_some(g)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{max_diff, rand};
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn relu6_values_and_gradient_are_torchs() {
        let x = Var::new(&[-1f32, 0.0, 0.5, 5.9, 6.0, 7.5], &Device::Cpu).unwrap();
        let y = relu6(&x).unwrap();
        assert_eq!(
            y.to_vec1::<f32>().unwrap(),
            vec![0.0, 0.0, 0.5, 5.9, 6.0, 6.0]
        );
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(
            g.get(&x).unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
        );
    }

    #[test]
    fn add_relu_matches_candle() {
        let a = Var::from_tensor(&rand(&[3, 4, 5, 6], 1)).unwrap();
        let b = Var::from_tensor(&rand(&[3, 4, 5, 6], 2)).unwrap();
        let wts = rand(&[3, 4, 5, 6], 3);
        for relu in [false, true] {
            let want = (&*a + &*b).unwrap();
            let want = if relu { want.relu().unwrap() } else { want };
            let ours = add_act(&a, &b, relu).unwrap();
            assert!(max_diff(&ours, &want) < 1e-6);
            let gw = (&want * &wts)
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
            for v in [&a, &b] {
                assert!(max_diff(go.get(v).unwrap(), gw.get(v).unwrap()) < 1e-6);
            }
        }
        // Data on one side gets no gradient.
        let x = rand(&[2, 3], 4);
        let y = add_act(
            &a.narrow(0, 0, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .narrow(0, 0, 6)
                .unwrap()
                .reshape((2, 3))
                .unwrap(),
            &x,
            true,
        )
        .unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_none() && g.get(&a).is_some());
        let _ = Device::Cpu;
    }
}
