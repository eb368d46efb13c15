//! Cross-entropy on logits with optional class weights and label smoothing,
//! with `torch.nn.functional.cross_entropy`'s `reduction="mean"` semantics.

use candle_core::{DType, Device, Tensor, D};

/// The loss function of a run.
#[derive(Debug, Clone)]
pub struct CrossEntropy {
    /// Per-class weights `[C]`, if any.
    weights: Option<Tensor>,
    label_smoothing: f64,
}

/// A loss over a batch kept as numerator and denominator, so that losses of
/// several batches combine into the exact mean over all their samples.
pub struct LossParts {
    /// The scalar loss of the batch (what backward starts from).
    pub loss: Tensor,
    /// The weight sum the batch's loss was divided by (the batch size without weights).
    pub denom: f64,
}

impl CrossEntropy {
    /// A loss with optional class weights and label smoothing in [0, 1].
    pub fn new(
        class_weights: Option<&[f64]>,
        label_smoothing: f64,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let weights = match class_weights {
            Some(w) => Some(Tensor::from_vec(
                w.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                w.len(),
                device,
            )?),
            None => None,
        };
        Ok(Self {
            weights,
            label_smoothing,
        })
    }

    /// Mean loss of `logits` [B, C] against `targets` [B] (u32).
    pub fn forward(&self, logits: &Tensor, targets: &Tensor) -> candle_core::Result<LossParts> {
        let (b, c) = logits.dims2()?;
        if let Some(w) = &self.weights {
            if w.dim(0)? != c {
                candle_core::bail!(
                    "train.class_weights has {} entries but the model has {c} classes",
                    w.dim(0)?
                );
            }
        }
        let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?; // [B]
        let (nll_sum, denom, w_row) = match &self.weights {
            None => (
                picked.sum_all()?,
                Tensor::new(b as f32, logits.device())?,
                None,
            ),
            Some(w) => {
                let wy = w.index_select(targets, 0)?; // [B]
                (
                    (&picked * &wy)?.sum_all()?,
                    wy.sum_all()?,
                    Some(w.unsqueeze(0)?),
                )
            }
        };
        let mut total = nll_sum;
        if self.label_smoothing > 0.0 {
            let eps = self.label_smoothing;
            let all = match &w_row {
                None => logp.sum_all()?.neg()?,
                Some(w) => logp.broadcast_mul(w)?.sum_all()?.neg()?,
            };
            total = ((total * (1.0 - eps))? + (all * (eps / c as f64))?)?;
        }
        let denom_v = denom.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let loss = total.broadcast_div(&denom)?;
        Ok(LossParts {
            loss,
            denom: denom_v,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }

    fn setup() -> (Tensor, Tensor) {
        let logits = Tensor::new(&[[2.0f32, 0.5, -1.0], [0.1, 0.2, 0.3]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
        (logits, y)
    }

    // Reference values printed by torch 2.x: F.cross_entropy(l, y, weight=..., label_smoothing=...).
    #[test]
    fn plain_cross_entropy() {
        let (l, y) = setup();
        let ce = CrossEntropy::new(None, 0.0, &Device::Cpu).unwrap();
        let p = ce.forward(&l, &y).unwrap();
        close(p.loss.to_scalar::<f32>().unwrap() as f64, 0.6216271);
        close(p.denom, 2.0);
    }

    #[test]
    fn weighted_and_smoothed() {
        let (l, y) = setup();
        let ce = CrossEntropy::new(Some(&[1.0, 2.0, 3.0]), 0.0, &Device::Cpu).unwrap();
        close(
            ce.forward(&l, &y).unwrap().loss.to_scalar::<f32>().unwrap() as f64,
            0.8117850,
        );
        let ce = CrossEntropy::new(None, 0.1, &Device::Cpu).unwrap();
        close(
            ce.forward(&l, &y).unwrap().loss.to_scalar::<f32>().unwrap() as f64,
            0.7016271,
        );
        let ce = CrossEntropy::new(Some(&[1.0, 2.0, 3.0]), 0.2, &Device::Cpu).unwrap();
        close(
            ce.forward(&l, &y).unwrap().loss.to_scalar::<f32>().unwrap() as f64,
            0.9804201,
        );
    }
}
