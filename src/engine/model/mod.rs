//! Model architectures and the registry that builds one from its spec. Every
//! architecture is built through a `VarBuilder`, so parameter names follow the
//! module tree and match the PyTorch twin's `state_dict` keys.

pub mod batchnorm;
pub mod cnn;
pub mod import;
mod layers;
mod mlp;
pub mod params;
pub mod pool;
pub mod textcnn;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use cnn::{CnnSpec, ConvBlockSpec, ConvNet};
pub use import::{load_init, InitMapping, InitReport};
pub use layers::Activation;
pub use mlp::{Mlp, MlpSpec};
pub use params::{matches_pattern, LoadError, ParamStore};
pub use textcnn::{TextCnn, TextCnnSpec};

/// An architecture and its sizes: everything needed to rebuild the model.
/// Stored as JSON in every checkpoint's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "lowercase")]
pub enum ModelSpec {
    Mlp(MlpSpec),
    /// Image classifier over `[C, H, W]` samples.
    Cnn(CnnSpec),
    /// Signal classifier over `[C, L]` samples.
    Cnn1d(CnnSpec),
    /// Text classifier over token ids.
    TextCnn(TextCnnSpec),
}

impl ModelSpec {
    /// Number of classes the model predicts.
    pub fn num_classes(&self) -> usize {
        match self {
            ModelSpec::Mlp(s) => s.num_classes,
            ModelSpec::Cnn(s) | ModelSpec::Cnn1d(s) => s.num_classes,
            ModelSpec::TextCnn(s) => s.num_classes,
        }
    }

    /// Short name of the architecture.
    pub fn arch_name(&self) -> &'static str {
        match self {
            ModelSpec::Mlp(_) => "mlp",
            ModelSpec::Cnn(_) => "cnn",
            ModelSpec::Cnn1d(_) => "cnn1d",
            ModelSpec::TextCnn(_) => "textcnn",
        }
    }
}

/// Per-forward state: training or evaluation mode, and the RNG for dropout.
pub struct ForwardCtx {
    /// `true` as after `model.train()`, `false` as after `model.eval()`.
    pub train: bool,
    rng: ChaCha8Rng,
    /// Parameter-name patterns held fixed (`model.freeze`): batch-norm layers
    /// whose weight matches keep their running statistics.
    frozen: Vec<String>,
}

impl ForwardCtx {
    /// Training mode with a seeded dropout RNG.
    pub fn train(seed: u64) -> Self {
        Self {
            train: true,
            rng: ChaCha8Rng::seed_from_u64(seed),
            frozen: Vec::new(),
        }
    }

    /// Evaluation mode (no dropout).
    pub fn eval() -> Self {
        Self {
            train: false,
            rng: ChaCha8Rng::seed_from_u64(0),
            frozen: Vec::new(),
        }
    }

    /// The same context with frozen parameter-name patterns (`model.freeze`).
    pub fn with_frozen(mut self, patterns: Vec<String>) -> Self {
        self.frozen = patterns;
        self
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
}

/// Builds the model of `spec`, creating its parameters in `store`.
pub fn build(spec: &ModelSpec, store: &ParamStore) -> candle_core::Result<Box<dyn Classifier>> {
    let vb = store.var_builder();
    let net: Box<dyn Classifier> = match spec {
        ModelSpec::Mlp(s) => Box::new(Mlp::new(s, vb)?),
        ModelSpec::Cnn(s) | ModelSpec::Cnn1d(s) => {
            let want = if matches!(spec, ModelSpec::Cnn(_)) {
                2
            } else {
                1
            };
            if s.input_size.len() != want {
                candle_core::bail!(
                    "{} takes samples of {} but the spec has input size {:?}",
                    spec.arch_name(),
                    if want == 2 { "[C, H, W]" } else { "[C, L]" },
                    s.input_size
                );
            }
            Box::new(ConvNet::new(s, vb)?)
        }
        ModelSpec::TextCnn(s) => Box::new(TextCnn::new(s, vb)?),
    };
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
}
