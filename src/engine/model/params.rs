//! The parameter store: named trainable variables, created with a seeded RNG so
//! that a run is reproducible, and loaded from / exported to state dicts.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Why weights could not be loaded into a model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("weights do not fit the model:{0}")]
    Mismatch(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

struct Inner {
    vars: BTreeMap<String, Var>,
    /// Non-trainable state (e.g. batch-norm running statistics), by name.
    buffers: BTreeMap<String, Var>,
    rng: ChaCha8Rng,
}

/// Named model variables. A model is built through [`ParamStore::var_builder`];
/// each variable it asks for is created once, with its init drawn from a seeded RNG.
#[derive(Clone)]
pub struct ParamStore {
    inner: Arc<Mutex<Inner>>,
    device: Device,
}

impl ParamStore {
    /// An empty store whose initial values come from `seed`.
    pub fn new(seed: u64, device: &Device) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                vars: BTreeMap::new(),
                buffers: BTreeMap::new(),
                rng: ChaCha8Rng::seed_from_u64(seed),
            })),
            device: device.clone(),
        }
    }

    /// A VarBuilder that creates (or returns) variables in this store.
    pub fn var_builder(&self) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, self.device.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks a variable as a buffer (saved and loaded, never optimised).
    pub fn mark_buffer(&self, name: &str) {
        let mut g = self.lock();
        if let Some(v) = g.vars.remove(name) {
            g.buffers.insert(name.to_string(), v);
        }
    }

    /// Trainable variables, sorted by name.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.lock()
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Every tensor of the state dict (parameters and buffers), sorted by name.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        let g = self.lock();
        let mut out: Vec<(String, Tensor)> = g
            .vars
            .iter()
            .chain(g.buffers.iter())
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Deep copies of every tensor (a snapshot that later steps do not change).
    pub fn snapshot(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        self.state_dict()
            .into_iter()
            .map(|(k, t)| Ok((k, t.copy()?)))
            .collect()
    }

    /// Number of scalar parameters (trainable only).
    pub fn num_params(&self) -> usize {
        self.lock().vars.values().map(|v| v.elem_count()).sum()
    }

    /// Overwrites every variable from `tensors`. Strict: a missing, unexpected or
    /// mis-shaped tensor is an error, and all of them are listed in it.
    pub fn load(&self, tensors: &HashMap<String, Tensor>) -> Result<(), LoadError> {
        let g = self.lock();
        let mut problems = String::new();
        let all: Vec<(&String, &Var)> = g.vars.iter().chain(g.buffers.iter()).collect();
        for (name, var) in &all {
            match tensors.get(*name) {
                None => problems.push_str(&format!("\n  missing tensor `{name}` {:?}", var.dims())),
                Some(t) if t.dims() != var.dims() => problems.push_str(&format!(
                    "\n  `{name}` has shape {:?}, the model needs {:?}",
                    t.dims(),
                    var.dims()
                )),
                Some(_) => {}
            }
        }
        let mut unexpected: Vec<&String> = tensors
            .keys()
            .filter(|k| !g.vars.contains_key(*k) && !g.buffers.contains_key(*k))
            .collect();
        unexpected.sort();
        for k in unexpected {
            problems.push_str(&format!("\n  unexpected tensor `{k}`"));
        }
        if !problems.is_empty() {
            return Err(LoadError::Mismatch(problems));
        }
        for (name, var) in all {
            if let Some(t) = tensors.get(name) {
                let t = t.to_dtype(var.dtype())?.to_device(var.device())?;
                var.set(&t)?;
            }
        }
        Ok(())
    }

    /// Overwrites the variables named in `tensors` and leaves the others as they
    /// are. Every name must exist with the same shape; all problems are listed.
    pub fn load_partial(&self, tensors: &HashMap<String, Tensor>) -> Result<(), LoadError> {
        let g = self.lock();
        let mut problems = String::new();
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        for name in &names {
            match g.vars.get(*name).or_else(|| g.buffers.get(*name)) {
                None => problems.push_str(&format!("\n  unexpected tensor `{name}`")),
                Some(v) if v.dims() != tensors[*name].dims() => problems.push_str(&format!(
                    "\n  `{name}` has shape {:?}, the model needs {:?}",
                    tensors[*name].dims(),
                    v.dims()
                )),
                Some(_) => {}
            }
        }
        if !problems.is_empty() {
            return Err(LoadError::Mismatch(problems));
        }
        for name in names {
            if let Some(var) = g.vars.get(name).or_else(|| g.buffers.get(name)) {
                let t = tensors[name]
                    .to_dtype(var.dtype())?
                    .to_device(var.device())?;
                var.set(&t)?;
            }
        }
        Ok(())
    }

    /// Restores values from a snapshot taken with [`ParamStore::snapshot`].
    pub fn restore(&self, snapshot: &[(String, Tensor)]) -> Result<(), LoadError> {
        let map: HashMap<String, Tensor> = snapshot.iter().cloned().collect();
        self.load(&map)
    }

    fn sample(rng: &mut ChaCha8Rng, shape: &Shape, init: Init) -> Vec<f32> {
        let n = shape.elem_count();
        match init {
            Init::Const(v) => vec![v as f32; n],
            Init::Uniform { lo, up } => draw(rng, n, UNIFORM_WORDS, |r| {
                (lo + (up - lo) * r.random::<f64>()) as f32
            }),
            Init::Randn { mean, stdev } => draw(rng, n, NORMAL_WORDS, |r| {
                (mean + stdev * standard_normal(r)) as f32
            }),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let fan = fan.for_shape(shape) as f64;
                let std = non_linearity.gain() / fan.max(1.0).sqrt();
                match dist {
                    candle_nn::init::NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        draw(rng, n, UNIFORM_WORDS, |r| {
                            (-bound + 2.0 * bound * r.random::<f64>()) as f32
                        })
                    }
                    candle_nn::init::NormalOrUniform::Normal => {
                        draw(rng, n, NORMAL_WORDS, |r| (std * standard_normal(r)) as f32)
                    }
                }
            }
        }
    }
}

/// 32-bit generator words one uniform f64 draw consumes (one `next_u64`).
const UNIFORM_WORDS: u128 = 2;
/// Words one [`standard_normal`] draw consumes (two uniform draws).
const NORMAL_WORDS: u128 = 4;

/// `n` values of `f`, each consuming exactly `words` words of the generator.
/// Large tensors are drawn in parallel chunks, each on a copy of the generator
/// moved to the chunk's first word (ChaCha can seek), so the values and the
/// generator's position afterwards are exactly those of a sequential loop —
/// only faster (a TextCNN embedding is 1.5 million normal draws).
fn draw<F>(rng: &mut ChaCha8Rng, n: usize, words: u128, f: F) -> Vec<f32>
where
    F: Fn(&mut ChaCha8Rng) -> f32 + Sync,
{
    const PARALLEL_MIN: usize = 1 << 16;
    if n < PARALLEL_MIN {
        return (0..n).map(|_| f(rng)).collect();
    }
    use rayon::prelude::*;
    let start = rng.get_word_pos();
    let base = rng.clone();
    let per = n.div_ceil(rayon::current_num_threads().max(1) * 4);
    let mut out = vec![0f32; n];
    out.par_chunks_mut(per).enumerate().for_each(|(i, chunk)| {
        let mut r = base.clone();
        r.set_word_pos(start + (i * per) as u128 * words);
        for v in chunk.iter_mut() {
            *v = f(&mut r);
        }
    });
    rng.set_word_pos(start + n as u128 * words);
    out
}

/// One draw from N(0, 1) (Box-Muller).
fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

impl candle_nn::var_builder::SimpleBackend for ParamStore {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut g = self.lock();
        if let Some(v) = g.vars.get(name).or_else(|| g.buffers.get(name)) {
            if v.shape() != &s {
                candle_core::bail!(
                    "parameter `{name}` exists with shape {:?}, asked for {:?}",
                    v.dims(),
                    s.dims()
                );
            }
            return Ok(v.as_tensor().clone());
        }
        let values = Self::sample(&mut g.rng, &s, h);
        let t = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        g.vars.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let g = self.lock();
        match g.vars.get(name).or_else(|| g.buffers.get(name)) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("no parameter named `{name}`"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        let g = self.lock();
        g.vars.contains_key(name) || g.buffers.contains_key(name)
    }
}

/// Whether `name` matches a pattern with `*` wildcards (`features.*`, `*.bias`).
pub fn matches_pattern(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_init_is_reproducible() {
        let a = ParamStore::new(3, &Device::Cpu);
        let b = ParamStore::new(3, &Device::Cpu);
        let init = Init::Uniform { lo: -1.0, up: 1.0 };
        let ta = a.var_builder().get_with_hints((4, 3), "w", init).unwrap();
        let tb = b.var_builder().get_with_hints((4, 3), "w", init).unwrap();
        assert_eq!(ta.to_vec2::<f32>().unwrap(), tb.to_vec2::<f32>().unwrap());
        let c = ParamStore::new(4, &Device::Cpu);
        let tc = c.var_builder().get_with_hints((4, 3), "w", init).unwrap();
        assert_ne!(ta.to_vec2::<f32>().unwrap(), tc.to_vec2::<f32>().unwrap());
        let v = ta.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
    }

    #[test]
    fn strict_load_lists_every_problem() {
        let s = ParamStore::new(0, &Device::Cpu);
        let vb = s.var_builder();
        vb.get_with_hints((2, 2), "a.weight", Init::Const(0.0))
            .unwrap();
        vb.get_with_hints(2, "a.bias", Init::Const(0.0)).unwrap();
        let mut m = HashMap::new();
        m.insert(
            "a.weight".to_string(),
            Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap(),
        );
        m.insert(
            "b.weight".to_string(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        );
        let err = s.load(&m).unwrap_err().to_string();
        assert!(err.contains("missing tensor `a.bias`"), "{err}");
        assert!(err.contains("`a.weight` has shape [3, 2]"), "{err}");
        assert!(err.contains("unexpected tensor `b.weight`"), "{err}");
        m.remove("b.weight");
        m.insert(
            "a.weight".to_string(),
            Tensor::ones((2, 2), DType::F32, &Device::Cpu).unwrap(),
        );
        m.insert(
            "a.bias".to_string(),
            Tensor::ones(2, DType::F32, &Device::Cpu).unwrap(),
        );
        s.load(&m).unwrap();
        let w = s.state_dict();
        assert_eq!(w[1].1.to_vec2::<f32>().unwrap(), vec![vec![1.0, 1.0]; 2]);
    }

    #[test]
    fn parallel_draws_equal_sequential_ones() {
        let shape = Shape::from(100_003);
        for init in [
            Init::Uniform { lo: -0.5, up: 0.5 },
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        ] {
            let mut a = ChaCha8Rng::seed_from_u64(9);
            let mut b = ChaCha8Rng::seed_from_u64(9);
            let got = ParamStore::sample(&mut a, &shape, init);
            let want: Vec<f32> = (0..shape.elem_count())
                .map(|_| match init {
                    Init::Uniform { lo, up } => (lo + (up - lo) * b.random::<f64>()) as f32,
                    _ => standard_normal(&mut b) as f32,
                })
                .collect();
            assert_eq!(got, want);
            // The generator continues where the sequential loop would.
            assert_eq!(a.random::<u64>(), b.random::<u64>());
        }
        // Kaiming (conv and linear defaults elsewhere), both distributions.
        use candle_nn::init::{FanInOut, NonLinearity, NormalOrUniform};
        let shape = Shape::from((1000, 101));
        let std = NonLinearity::ReLU.gain() / 101f64.sqrt();
        for dist in [NormalOrUniform::Uniform, NormalOrUniform::Normal] {
            let init = Init::Kaiming {
                dist,
                fan: FanInOut::FanIn,
                non_linearity: NonLinearity::ReLU,
            };
            let mut a = ChaCha8Rng::seed_from_u64(3);
            let mut b = ChaCha8Rng::seed_from_u64(3);
            let got = ParamStore::sample(&mut a, &shape, init);
            let bound = 3f64.sqrt() * std;
            let want: Vec<f32> = (0..shape.elem_count())
                .map(|_| match dist {
                    NormalOrUniform::Uniform => (-bound + 2.0 * bound * b.random::<f64>()) as f32,
                    NormalOrUniform::Normal => (std * standard_normal(&mut b)) as f32,
                })
                .collect();
            assert_eq!(got, want);
            assert_eq!(a.random::<u64>(), b.random::<u64>());
        }
    }

    #[test]
    fn wildcard_patterns() {
        assert!(matches_pattern("features.*", "features.0.weight"));
        assert!(matches_pattern("*.bias", "head.bias"));
        assert!(!matches_pattern("features.*", "head.weight"));
        assert!(matches_pattern("head.weight", "head.weight"));
    }
}
