//! Convolution → batch-norm → activation layers (and a residual join) run as
//! one fused kernel ([`kernels::conv_bn_chain`]) in training where it applies:
//! the blocks of ResNet and MobileNetV2 call [`forward`] first and run their
//! layers one by one when it returns `None` (evaluation, kernels off, other
//! devices or dtypes: the generic path CUDA takes).

use candle_core::Tensor;

use super::batchnorm::BnAct;
use super::{BatchNorm, Conv, MaxPool};
use crate::engine::kernels::conv_bn_chain::{self as kernel, ChainPool, ChainShortcut, ChainUnit};
use crate::engine::model::ForwardCtx;

/// One unit of a chain: a convolution, its batch-norm and the activation
/// after it (after the residual sum for the last unit of a joined chain).
#[derive(Clone, Copy)]
pub struct ChainPart<'a> {
    pub conv: &'a Conv,
    pub bn: &'a BatchNorm,
    pub act: BnAct,
}

/// What is added to the last unit's batch-norm output.
#[derive(Clone, Copy)]
pub enum Join<'a> {
    None,
    /// The block's input.
    Identity,
    /// A convolution and batch-norm of the block's input (ResNet's `downsample`).
    Projected(&'a Conv, &'a BatchNorm),
}

/// The unit of `conv` and `bn` on an input with `cin` channels, or `None`
/// where the kernel does not apply to `conv`.
fn unit(
    x: &Tensor,
    cin: usize,
    (conv, bn, act): (&Conv, &BatchNorm, BnAct),
    ctx: &ForwardCtx,
) -> candle_core::Result<Option<ChainUnit>> {
    let Some((weight, depthwise)) = conv.chain_weight(x, cin, ctx) else {
        return Ok(None);
    };
    let (bn_weight, bn_bias, stats) = bn.kernel_inputs(ctx)?;
    if !ctx.use_kernels(&[&bn_weight, &bn_bias]) {
        return Ok(None);
    }
    let cfg = conv.config();
    Ok(Some(ChainUnit {
        weight,
        depthwise,
        stride: cfg.stride,
        padding: cfg.padding,
        bn_weight,
        bn_bias,
        stats,
        eps: bn.eps(),
        act,
    }))
}

/// The parts applied to `x` `[B, C, H, W]` in order, joined as `join` says,
/// as one kernel: `Some(output)` in training with our kernels on f32 CPU
/// tensors (plain or depthwise 2-D convolutions without bias), the running
/// statistics updated as the layers' own would; `None` elsewhere (the caller
/// runs the layers).
pub fn forward(
    x: &Tensor,
    parts: &[ChainPart],
    join: Join,
    ctx: &ForwardCtx,
) -> candle_core::Result<Option<Tensor>> {
    forward_pooled(x, parts, join, None, ctx)
}

/// [`forward`], then `pool` (a max-pooling) where given, in the same kernel:
/// the unpooled output is never kept (ResNet's stem).
pub fn forward_pooled(
    x: &Tensor,
    parts: &[ChainPart],
    join: Join,
    pool: Option<&MaxPool>,
    ctx: &ForwardCtx,
) -> candle_core::Result<Option<Tensor>> {
    if !ctx.train || parts.is_empty() || x.rank() != 4 || !ctx.use_kernels(&[x]) {
        return Ok(None);
    }
    let mut units = Vec::with_capacity(parts.len());
    let mut cin = x.dim(1)?;
    for p in parts {
        let Some(u) = unit(x, cin, (p.conv, p.bn, p.act), ctx)? else {
            return Ok(None);
        };
        cin = u.weight.dim(0)?;
        units.push(u);
    }
    let shortcut = match join {
        Join::None => ChainShortcut::None,
        Join::Identity => ChainShortcut::Identity,
        Join::Projected(conv, bn) => match unit(x, x.dim(1)?, (conv, bn, BnAct::None), ctx)? {
            Some(u) => ChainShortcut::Unit(u),
            None => return Ok(None),
        },
    };
    let pool = pool.map(|p| {
        let c = p.config();
        ChainPool {
            kernel: c.kernel,
            stride: c.stride,
            padding: c.padding,
        }
    });
    let (y, moments) = kernel::conv_bn_chain(x, units, shortcut, pool)?;
    let bns = parts.iter().map(|p| p.bn).chain(match join {
        Join::Projected(_, bn) => Some(bn),
        _ => None,
    });
    for (bn, m) in bns.zip(moments) {
        if let Some((m, n)) = m {
            bn.record_batch(m, n)?;
        }
    }
    Ok(Some(y))
}
