//! Why model settings do not work: [`KeyError`] names the `[model]` key and
//! its [`KeyProblem`]; [`ModelError`] says why an architecture does not fit
//! the data (or a spec's sizes do not fit each other, [`SpecError`]).

/// What is wrong with one `[model]` key's value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KeyProblem {
    /// A size that must be at least 1.
    #[error("must be >= 1")]
    Zero,
    /// `model.filter_sizes` empty or with a zero width.
    #[error("needs at least one width, each >= 1")]
    NoWidths,
    /// A filter wider than the text samples.
    #[error("filter size {size} is longer than data.max_len = {max_len}")]
    FilterTooLong { size: usize, max_len: usize },
    /// A text architecture on non-text data.
    #[error("{arch:?} reads text: set data.format = \"text-tsv\"")]
    ArchNeedsText { arch: &'static str },
    /// Text data with an architecture that cannot read it.
    #[error("text data (data.format = \"text-tsv\") needs model.arch = \"textcnn\"")]
    TextNeedsTextArch,
    /// A zero layer width in `model.hidden`.
    #[error("every layer width must be > 0")]
    ZeroWidth,
    /// No conv block, or one with zero channels.
    #[error("needs at least one block, each with >= 1 channel")]
    NoChannels,
    /// No conv block.
    #[error("needs at least one block")]
    NoBlocks,
    /// A per-block list with a zero in it.
    #[error("every value must be >= 1")]
    ZeroValue,
    /// A per-block list whose length is neither 1 nor the number of blocks.
    #[error("has {got} values but model.conv_channels makes {blocks} blocks; give one value or {blocks}")]
    PerBlockLength { got: usize, blocks: usize },
    /// `model.width_mult` not a positive finite number (at most 16).
    #[error("must be a number > 0 and <= 16, got {0}")]
    WidthMult(f64),
    /// `model.activation` set on an architecture whose activations are fixed.
    #[error(
        "{arch:?} has torchvision's fixed activations; leave model.activation unset (or \"relu\")"
    )]
    FixedActivation { arch: &'static str },
}

/// A config key (its full, documented name) and what is wrong with its value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{key} {problem}")]
pub struct KeyError {
    pub key: &'static str,
    pub problem: KeyProblem,
}

impl KeyError {
    /// The error for `key`.
    pub fn new(key: &'static str, problem: KeyProblem) -> Self {
        Self { key, problem }
    }
}

/// Why a resolved spec's sizes do not fit each other.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A conv net without blocks.
    #[error("needs at least one conv block")]
    NoConvBlocks,
    /// A block with a zero size.
    #[error("block {block}: channels, kernel_size, stride and pool must be >= 1")]
    ZeroBlockSize { block: usize },
    /// The (padded) input of a block is smaller than its kernel.
    #[error("block {block}: input of size {input:?} (padded {padded}) is smaller than kernel_size {kernel}")]
    ShapeTooSmall {
        block: usize,
        input: Vec<usize>,
        padded: usize,
        kernel: usize,
    },
    /// A block's feature map is smaller than its pool.
    #[error("block {block}: feature map of size {size} is smaller than pool {pool} (input {input:?} is too small for this many blocks)")]
    PoolTooLarge {
        block: usize,
        size: usize,
        pool: usize,
        input: Vec<usize>,
    },
    /// A TextCNN with a zero size.
    #[error("vocab_size, embed_dim and num_filters must be >= 1")]
    ZeroTextSize,
    /// The padding row is outside the embedding.
    #[error("pad_index {pad_index} is outside the vocabulary of {vocab_size}")]
    PadOutside { pad_index: usize, vocab_size: usize },
    /// No filter width, or a zero one.
    #[error("filter_sizes needs at least one width, each >= 1")]
    NoFilterWidths,
    /// A filter wider than the sequences.
    #[error("filter size {size} is longer than the sequence length {seq_len} (data.max_len)")]
    FilterTooLong { size: usize, seq_len: usize },
}

/// Why the model settings cannot be resolved for the data.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// A `[model]` key's value is wrong.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Token ids given to an architecture that reads numbers.
    #[error("model.arch = {arch:?} cannot read text (token ids); use \"textcnn\"")]
    CannotReadText { arch: &'static str },
    /// A text architecture without a vocabulary.
    #[error("model.arch = {arch:?} reads text: set data.format = \"text-tsv\"")]
    NeedsText { arch: &'static str },
    /// Samples of a shape the architecture does not take.
    #[error("{}", sample_rank_text(.arch, *.spatial_dims, .shape))]
    SampleShape {
        arch: &'static str,
        /// Spatial dims the architecture works on (1 or 2); 0 for token sequences.
        spatial_dims: usize,
        shape: Vec<usize>,
    },
    /// The sizes do not fit each other.
    #[error("model.arch = {arch:?}: {source}")]
    Spec {
        arch: &'static str,
        #[source]
        source: SpecError,
    },
}

impl ModelError {
    /// The `[model]` key the error is about, when it is about one key.
    pub fn key(&self) -> Option<&'static str> {
        match self {
            ModelError::Key(k) => Some(k.key),
            _ => None,
        }
    }
}

fn sample_rank_text(arch: &str, spatial_dims: usize, shape: &[usize]) -> String {
    match spatial_dims {
        0 => format!("{arch} takes token sequences [L], the data has {shape:?}"),
        2 => format!(
            "model.arch = {arch:?} takes samples of shape [C, H, W] or [H, W], but the data has {shape:?}"
        ),
        _ => format!(
            "model.arch = {arch:?} takes samples of shape [C, L] or [L], but the data has {shape:?}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_as_before() {
        let e = KeyError::new(
            "model.stride",
            KeyProblem::PerBlockLength { got: 2, blocks: 3 },
        );
        assert_eq!(
            e.to_string(),
            "model.stride has 2 values but model.conv_channels makes 3 blocks; give one value or 3"
        );
        let e = ModelError::SampleShape {
            arch: "textcnn",
            spatial_dims: 0,
            shape: vec![2, 3],
        };
        assert_eq!(
            e.to_string(),
            "textcnn takes token sequences [L], the data has [2, 3]"
        );
        let e = ModelError::SampleShape {
            arch: "cnn",
            spatial_dims: 2,
            shape: vec![5],
        };
        assert_eq!(
            e.to_string(),
            "model.arch = \"cnn\" takes samples of shape [C, H, W] or [H, W], but the data has [5]"
        );
        let e = ModelError::Spec {
            arch: "cnn1d",
            source: SpecError::PoolTooLarge {
                block: 2,
                size: 1,
                pool: 2,
                input: vec![8],
            },
        };
        assert_eq!(
            e.to_string(),
            "model.arch = \"cnn1d\": block 2: feature map of size 1 is smaller than pool 2 (input [8] is too small for this many blocks)"
        );
        assert_eq!(e.key(), None);
        let e: ModelError = KeyError::new("model.hidden", KeyProblem::ZeroWidth).into();
        assert_eq!(e.key(), Some("model.hidden"));
        assert_eq!(e.to_string(), "model.hidden every layer width must be > 0");
    }
}
