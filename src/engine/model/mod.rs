//! Model architectures and the registry that builds one from its spec. Every
//! architecture is built through a `VarBuilder`, so parameter names follow the
//! module tree and match the PyTorch twin's `state_dict` keys.

pub mod backbone;
pub mod cnn;
pub mod error;
pub mod finetune;
pub mod import;
pub mod layers;
pub mod mlp;
pub mod mobilenet;
pub mod mobilenet_v3;
pub mod params;
pub mod registry;
pub mod resnet;
pub mod split;
pub mod textcnn;

pub use layers::batchnorm;

use candle_core::{Device, Tensor};
pub use cnn::{CnnConfig, CnnSpec, ConvBlockSpec, ConvNet, PerBlock};
pub use error::{KeyError, KeyProblem, ModelError, SpecError};
pub use finetune::{FineTune, FineTuneError};
pub use import::{load_init, InitMapping, InitReport};
pub use layers::Activation;
pub use mlp::{Mlp, MlpConfig, MlpSpec};
pub use mobilenet::{MobileNetConfig, MobileNetSpec, MobileNetV2};
pub use mobilenet_v3::MobileNetV3Small;
pub use params::{matches_pattern, LoadError, ParamStore};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
pub use registry::{ArchConfigs, ArchKind, ModelSpec, ModelTemplate};
pub use resnet::{ResNet, ResNetConfig, ResNetSpec};
pub use split::SplitPoint;
pub use textcnn::{TextCnn, TextCnnConfig, TextCnnSpec};

/// Which implementation the layers compute with (see [`layers`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KernelPolicy {
    /// Our CPU kernels where they apply (f32 CPU tensors), candle's generic
    /// ops elsewhere.
    #[default]
    Ours,
    /// Candle's generic ops everywhere: the path CUDA takes, testable on the CPU.
    Generic,
}

impl KernelPolicy {
    /// The process-wide default: `EDGE_TRAINER_KERNELS=generic` (or `off`)
    /// switches our kernels off, anything else leaves them on.
    pub fn from_env() -> Self {
        static POLICY: std::sync::OnceLock<KernelPolicy> = std::sync::OnceLock::new();
        *POLICY.get_or_init(|| match std::env::var("EDGE_TRAINER_KERNELS").as_deref() {
            Ok("generic") | Ok("off") => KernelPolicy::Generic,
            _ => KernelPolicy::Ours,
        })
    }
}

/// Per-forward state: training or evaluation mode, the RNG for dropout, the
/// frozen parameters and which kernels the layers use.
pub struct ForwardCtx {
    /// `true` as after `model.train()`, `false` as after `model.eval()`.
    pub train: bool,
    rng: ChaCha8Rng,
    /// Parameter-name patterns held fixed (`model.freeze`): batch-norm layers
    /// whose weight matches keep their running statistics.
    frozen: Vec<String>,
    kernels: KernelPolicy,
}

impl ForwardCtx {
    /// Training mode with a seeded dropout RNG.
    pub fn train(seed: u64) -> Self {
        Self {
            train: true,
            rng: ChaCha8Rng::seed_from_u64(seed),
            frozen: Vec::new(),
            kernels: KernelPolicy::from_env(),
        }
    }

    /// Evaluation mode (no dropout).
    pub fn eval() -> Self {
        Self {
            train: false,
            rng: ChaCha8Rng::seed_from_u64(0),
            frozen: Vec::new(),
            kernels: KernelPolicy::from_env(),
        }
    }

    /// The same context with frozen parameter-name patterns (`model.freeze`).
    pub fn with_frozen(mut self, patterns: Vec<String>) -> Self {
        self.frozen = patterns;
        self
    }

    /// The same context computing with `policy`'s kernels.
    pub fn with_kernels(mut self, policy: KernelPolicy) -> Self {
        self.kernels = policy;
        self
    }

    /// The kernel policy in force.
    pub fn kernels(&self) -> KernelPolicy {
        self.kernels
    }

    /// Whether a layer computes with our CPU kernels on these tensors: they
    /// are on and every tensor is f32 on the CPU.
    pub fn use_kernels(&self, ts: &[&Tensor]) -> bool {
        self.kernels == KernelPolicy::Ours && crate::engine::kernels::on_cpu_f32(ts)
    }

    /// Whether the parameter `name` is frozen.
    pub fn is_frozen(&self, name: &str) -> bool {
        self.frozen.iter().any(|p| matches_pattern(p, name))
    }

    /// The RNG state, for resume.
    pub fn rng(&self) -> &ChaCha8Rng {
        &self.rng
    }

    /// Position of the dropout RNG in its stream (saved for resume).
    pub fn rng_word_pos(&self) -> u128 {
        self.rng.get_word_pos()
    }

    /// Moves the dropout RNG to a saved position.
    pub fn set_rng_word_pos(&mut self, pos: u128) {
        self.rng.set_word_pos(pos);
    }

    /// Dropout with probability `p` (inverted: kept values scaled by `1/(1-p)`);
    /// the identity in evaluation mode.
    pub fn dropout(&mut self, x: &Tensor, p: f64) -> candle_core::Result<Tensor> {
        if !self.train || p <= 0.0 {
            return Ok(x.clone());
        }
        use rand::Rng;
        let scale = (1.0 / (1.0 - p)) as f32;
        let n = x.elem_count();
        let mask: Vec<f32> = (0..n)
            .map(|_| {
                if self.rng.random::<f64>() < p {
                    0.0
                } else {
                    scale
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?;
        x.mul(&mask)
    }
}

/// A classifier: maps a batch `[B, ...]` to logits `[B, classes]`.
pub trait Classifier: Send {
    /// The forward pass; `ctx` says train or eval mode.
    fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> candle_core::Result<Tensor>;

    /// Adds the evaluation-mode forward pass to an ONNX graph, from the
    /// (normalised) input `x` `[N, ...sample_shape]`; returns the logits'
    /// name. Built from the layers' emitters ([`crate::engine::export::layers`]).
    fn export_onnx(
        &self,
        _g: &mut crate::engine::export::Graph,
        _x: &str,
    ) -> Result<String, crate::engine::export::ExportError> {
        Err(crate::engine::export::ExportError::Unsupported)
    }

    /// The network as consecutive stages, for architectures that cut for
    /// the frozen-feature cache (see [`split`]); `None` by default.
    fn staged(&self) -> Option<&dyn split::Staged> {
        None
    }

    /// Where the forward pass can be cut into a frozen prefix and a trainable
    /// rest, shallow to deep; none for an architecture that is not staged.
    fn split_points(&self) -> Vec<SplitPoint> {
        self.staged().map(split::points).unwrap_or_default()
    }

    /// The part of the forward pass before split point `point` (an index
    /// into [`Self::split_points`]): its output is what the feature cache stores.
    fn forward_prefix(
        &self,
        x: &Tensor,
        point: usize,
        ctx: &mut ForwardCtx,
    ) -> candle_core::Result<Tensor> {
        match self.staged() {
            Some(net) => split::forward_prefix(net, x, point, ctx),
            None => candle_core::bail!("this architecture has no split point {point}"),
        }
    }

    /// The part of the forward pass after split point `point`, from the
    /// prefix's output `features`: `forward_rest(forward_prefix(x))` is `forward(x)`.
    fn forward_rest(
        &self,
        features: &Tensor,
        point: usize,
        ctx: &mut ForwardCtx,
    ) -> candle_core::Result<Tensor> {
        match self.staged() {
            Some(net) => split::forward_rest(net, features, point, ctx),
            None => candle_core::bail!("this architecture has no split point {point}"),
        }
    }
}

/// Builds the model of `spec`, creating its parameters in `store`.
pub fn build(spec: &ModelSpec, store: &ParamStore) -> candle_core::Result<Box<dyn Classifier>> {
    let net = spec.build(store.var_builder())?;
    // Batch-norm running statistics are state, not parameters.
    for (name, _) in store.trainable() {
        if batchnorm::BUFFER_SUFFIXES.iter().any(|s| name.ends_with(s)) {
            store.mark_buffer(&name);
        }
    }
    Ok(net)
}

/// A model with its parameters, ready to train or evaluate.
pub struct Model {
    pub spec: ModelSpec,
    pub params: ParamStore,
    pub net: Box<dyn Classifier>,
}

impl Model {
    /// A freshly initialised model (seeded).
    pub fn new(spec: ModelSpec, seed: u64, device: &Device) -> candle_core::Result<Self> {
        let params = ParamStore::new(seed, device);
        let net = build(&spec, &params)?;
        Ok(Self { spec, params, net })
    }

    /// Logits for a batch.
    pub fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> candle_core::Result<Tensor> {
        self.net.forward(x, ctx)
    }

    /// Logits for a batch that starts at split point `from` (features from
    /// the cache), or at the input when `from` is `None`.
    pub fn forward_from(
        &self,
        x: &Tensor,
        from: Option<usize>,
        ctx: &mut ForwardCtx,
    ) -> candle_core::Result<Tensor> {
        match from {
            Some(p) => self.net.forward_rest(x, p, ctx),
            None => self.net.forward(x, ctx),
        }
    }
}
