//! Parameter gradients handed straight to the gradient store.
//!
//! candle's back-propagation accumulates every gradient a custom op returns
//! into a fresh zero tensor (`zeros_like` + `add`): for a parameter that is two
//! extra passes and two allocations the size of the parameter, every step (a
//! third of the wide MLP's backward time). Our kernels compute each
//! parameter's gradient in full in one place, so [`backward`] lets them hand it
//! over directly: while it runs, [`deliver`] takes the gradient of a trainable
//! variable (a leaf: nothing further back needs it) and returns `None` to
//! candle; afterwards the gradients are inserted into the store (added to any
//! gradient candle computed for the same variable through another path).
//!
//! Outside [`backward`] (e.g. a plain `loss.backward()`) [`deliver`] hands the
//! gradient back, and candle accumulates it as usual.

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};

thread_local! {
    /// `Some` while [`backward`] runs on this thread: the gradients delivered so far.
    static CAPTURED: RefCell<Option<Vec<(Tensor, Tensor)>>> = const { RefCell::new(None) };
}

/// Ends the capture when dropped (also when the backward pass fails).
struct Capture;

impl Capture {
    fn begin() -> Self {
        CAPTURED.with(|c| *c.borrow_mut() = Some(Vec::new()));
        Capture
    }

    fn take(&self) -> Vec<(Tensor, Tensor)> {
        CAPTURED.with(|c| c.borrow_mut().take().unwrap_or_default())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        CAPTURED.with(|c| *c.borrow_mut() = None);
    }
}

/// `loss.backward()`, with the parameter gradients our kernels deliver stored
/// directly. The resulting store holds the same gradients as candle's own.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    let capture = Capture::begin();
    let mut grads = loss.backward()?;
    for (param, grad) in capture.take() {
        let grad = match grads.remove(&param) {
            Some(other) => (other + grad)?,
            None => grad,
        };
        grads.insert(&param, grad);
    }
    Ok(grads)
}

/// The gradient `grad` of `param`, as a custom op's `bwd` returns it: `None`
/// when it was taken directly (a variable, inside [`backward`]), else
/// `Some(grad)` for candle to accumulate.
pub fn deliver(param: &Tensor, grad: Tensor) -> Result<Option<Tensor>> {
    if !param.is_variable() {
        return Ok(Some(grad));
    }
    CAPTURED.with(|c| {
        let mut c = c.borrow_mut();
        let Some(list) = c.as_mut() else {
            return Ok(Some(grad));
        };
        // A parameter used twice in one graph (shared weights) sums its parts.
        if let Some((_, g)) = list.iter_mut().find(|(p, _)| p.id() == param.id()) {
            *g = (&*g + grad)?;
        } else {
            list.push((param.clone(), grad));
        }
        Ok(None)
    })
}

/// A kernel's gradient for parameter `p`: none for a frozen (detached)
/// tensor (`make` is not called), else as [`deliver`].
pub fn param(p: &Tensor, make: impl FnOnce() -> Result<Tensor>) -> Result<Option<Tensor>> {
    if !p.track_op() {
        return Ok(None);
    }
    deliver(p, make()?)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::max_diff;
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn same_gradients_as_candle_with_shared_and_mixed_paths() {
        let dev = Device::Cpu;
        let w = Var::new(&[[1f32, -2.0], [0.5, 3.0]], &dev).unwrap();
        let b = Var::new(&[0.25f32, -1.0], &dev).unwrap();
        let x = Tensor::new(&[[1f32, 2.0], [-3.0, 0.5], [2.0, -1.0]], &dev).unwrap();
        // w feeds the fused linear twice (shared weights) and also an L2 term
        // through candle's own ops; b only the kernel.
        let loss = |x: &Tensor| -> Tensor {
            let h = crate::engine::kernels::linear_relu(x, &w, &b).unwrap();
            let y = crate::engine::kernels::linear(&h, &w, &b).unwrap();
            let l2 = w.sqr().unwrap().sum_all().unwrap();
            (y.sqr().unwrap().sum_all().unwrap() + l2).unwrap()
        };
        let plain = loss(&x).backward().unwrap();
        let direct = backward(&loss(&x)).unwrap();
        for v in [w.as_tensor(), b.as_tensor()] {
            let (p, d) = (plain.get(v).unwrap(), direct.get(v).unwrap());
            assert!(max_diff(p, d) < 1e-5, "{p} vs {d}");
        }
        // The data gets no gradient either way; the capture has ended.
        assert!(direct.get(&x).is_none());
        CAPTURED.with(|c| assert!(c.borrow().is_none()));
    }
}
