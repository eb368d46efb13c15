//! Starting a model from foreign weights (`model.init`, e.g. a PyTorch
//! `state_dict` saved with safetensors): keep only the tensors under
//! `model.init_prefix` (prefix removed), apply the `model.rename` table, leave
//! the parameters matching `model.reinit` freshly initialised, and load the rest
//! strictly. Every problem is listed in one error.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use candle_core::Tensor;

use super::params::{matches_pattern, LoadError, ParamStore};

/// How the tensors of an init file map onto the model's parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InitMapping {
    /// Only tensors whose name starts with this are used, with it removed.
    pub prefix: Option<String>,
    /// `(from, to)`: exact names, or prefixes when both end in `*`. The first
    /// matching rule applies.
    pub rename: Vec<(String, String)>,
    /// Parameter-name patterns that keep their fresh initialisation.
    pub reinit: Vec<String>,
}

/// What an init load did, for the log and the run's `warm_start` line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InitReport {
    /// Tensors loaded into the model.
    pub loaded: usize,
    /// Model tensors left at their fresh initialisation (`model.reinit`).
    pub reinitialised: Vec<String>,
    /// Tensors of the file outside `init_prefix`, ignored.
    pub outside_prefix: usize,
}

impl InitReport {
    /// A short description (`"12 tensors loaded, 2 re-initialised (head.bias, head.weight)"`).
    pub fn describe(&self) -> String {
        let mut s = format!("{} tensors loaded", self.loaded);
        if !self.reinitialised.is_empty() {
            s.push_str(&format!(
                ", {} re-initialised ({})",
                self.reinitialised.len(),
                self.reinitialised.join(", ")
            ));
        }
        if self.outside_prefix > 0 {
            s.push_str(&format!(
                ", {} outside init_prefix ignored",
                self.outside_prefix
            ));
        }
        s
    }
}

fn rename_one(name: &str, rules: &[(String, String)]) -> Option<(usize, String)> {
    for (i, (from, to)) in rules.iter().enumerate() {
        match (from.strip_suffix('*'), to.strip_suffix('*')) {
            (Some(fp), Some(tp)) => {
                if let Some(rest) = name.strip_prefix(fp) {
                    return Some((i, format!("{tp}{rest}")));
                }
            }
            _ if from == name => return Some((i, to.clone())),
            _ => {}
        }
    }
    None
}

/// Loads `tensors` (an init file's) into `store` as `mapping` says.
pub fn load_init(
    store: &ParamStore,
    tensors: HashMap<String, Tensor>,
    mapping: &InitMapping,
) -> Result<InitReport, LoadError> {
    let mut problems: Vec<String> = Vec::new();
    let mut report = InitReport::default();
    let model: BTreeMap<String, Vec<usize>> = store
        .state_dict()
        .into_iter()
        .map(|(n, t)| (n, t.dims().to_vec()))
        .collect();

    // 1. The prefix.
    let mut named: Vec<(String, Tensor)> = Vec::with_capacity(tensors.len());
    let file_names: BTreeSet<String> = tensors.keys().cloned().collect();
    match &mapping.prefix {
        Some(prefix) => {
            for (name, t) in tensors {
                match name.strip_prefix(prefix.as_str()) {
                    Some(rest) => named.push((rest.to_string(), t)),
                    None => report.outside_prefix += 1,
                }
            }
            if named.is_empty() {
                problems.push(format!(
                    "model.init_prefix {prefix:?} matches no tensor of the file (it has: {})",
                    preview(file_names.iter())
                ));
            }
        }
        None => named.extend(tensors),
    }

    // 2. The rename table.
    let mut used = vec![false; mapping.rename.len()];
    let mut mapped: BTreeMap<String, (String, Tensor)> = BTreeMap::new();
    for (name, t) in named {
        let target = match rename_one(&name, &mapping.rename) {
            Some((rule, to)) => {
                used[rule] = true;
                to
            }
            None => name.clone(),
        };
        if let Some((other, _)) = mapped.get(&target) {
            problems.push(format!(
                "tensors `{other}` and `{name}` of the file both map to `{target}`"
            ));
            continue;
        }
        mapped.insert(target, (name, t));
    }
    for ((from, to), hit) in mapping.rename.iter().zip(&used) {
        if !hit {
            problems.push(format!(
                "model.rename {from:?} = {to:?} matches no tensor of the file"
            ));
        }
    }

    // 3. Parameters re-initialised: tensors of the file for them are not used.
    for pattern in &mapping.reinit {
        if !model.keys().any(|n| matches_pattern(pattern, n)) {
            problems.push(format!(
                "model.reinit pattern {pattern:?} matches no parameter of the model (it has: {})",
                preview(model.keys())
            ));
        }
    }
    let reinit = |n: &str| mapping.reinit.iter().any(|p| matches_pattern(p, n));
    report.reinitialised = model.keys().filter(|n| reinit(n)).cloned().collect();
    mapped.retain(|n, _| !reinit(n));

    // 4. Strict comparison of the rest. A batch-norm counter missing from the
    // file (state dicts saved without `num_batches_tracked`) stays at 0.
    let mut mis_shaped_head: Option<String> = None;
    for (name, dims) in &model {
        if reinit(name) {
            continue;
        }
        match mapped.get(name) {
            None if name.ends_with(".num_batches_tracked") => {}
            None => problems.push(format!("missing tensor `{name}` {dims:?}")),
            Some((from, t)) if t.dims() != dims.as_slice() => {
                let origin = if from != name {
                    format!(" (file tensor `{from}`)")
                } else {
                    String::new()
                };
                problems.push(format!(
                    "`{name}`{origin} has shape {:?}, the model needs {dims:?}",
                    t.dims()
                ));
                if ["head.", "fc.", "classifier."]
                    .iter()
                    .any(|p| name.starts_with(p))
                {
                    let module = name.rsplit_once('.').map_or(name.as_str(), |(m, _)| m);
                    mis_shaped_head.get_or_insert(format!("{module}.*"));
                }
            }
            Some(_) => {}
        }
    }
    let unexpected: Vec<&String> = mapped.keys().filter(|n| !model.contains_key(*n)).collect();
    for name in &unexpected {
        let (from, _) = &mapped[*name];
        if from != *name {
            problems.push(format!("unexpected tensor `{name}` (file tensor `{from}`)"));
        } else {
            problems.push(format!("unexpected tensor `{name}`"));
        }
    }
    if !problems.is_empty() {
        let mut hints = Vec::new();
        if let Some(head) = mis_shaped_head {
            hints.push(format!(
                "the class count differs from the weights': re-initialise the head with model.reinit = [{head:?}]"
            ));
        }
        if let Some(p) = common_prefix_hint(&model, &unexpected) {
            hints.push(format!(
                "the file's names look like the model's under {p:?}: set model.init_prefix = {p:?}"
            ));
        }
        let mut msg = String::new();
        for p in &problems {
            msg.push_str("\n  ");
            msg.push_str(p);
        }
        for h in hints {
            msg.push_str("\n  hint: ");
            msg.push_str(&h);
        }
        return Err(LoadError::Mismatch(msg));
    }
    let load: HashMap<String, Tensor> = mapped.into_iter().map(|(n, (_, t))| (n, t)).collect();
    report.loaded = load.len();
    store.load_partial(&load)?;
    Ok(report)
}

/// A prefix that, removed from unexpected names, gives model names.
fn common_prefix_hint(
    model: &BTreeMap<String, Vec<usize>>,
    unexpected: &[&String],
) -> Option<String> {
    for u in unexpected {
        for m in model.keys() {
            if u.len() > m.len() && u.ends_with(m.as_str()) {
                let p = &u[..u.len() - m.len()];
                if p.ends_with('.') {
                    return Some(p.to_string());
                }
            }
        }
    }
    None
}

fn preview<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let all: Vec<&String> = names.collect();
    let shown: Vec<String> = all.iter().take(8).map(|s| format!("`{s}`")).collect();
    if all.len() > 8 {
        format!("{}, ... {} in all", shown.join(", "), all.len())
    } else {
        shown.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::Init;

    fn store() -> ParamStore {
        let s = ParamStore::new(0, &Device::Cpu);
        let vb = s.var_builder();
        vb.get_with_hints((2, 3), "features.0.weight", Init::Const(0.0))
            .unwrap();
        vb.get_with_hints((4, 2), "head.weight", Init::Const(7.0))
            .unwrap();
        vb.get_with_hints(4, "head.bias", Init::Const(7.0)).unwrap();
        s
    }

    fn t(shape: &[usize], v: f32) -> Tensor {
        (Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap() * v as f64).unwrap()
    }

    /// A half-precision state dict (as `model.half().state_dict()` saves it)
    /// is a valid `model.init`: read through the checkpoint reader, loaded as f32.
    #[test]
    fn an_f16_init_file_loads() {
        use safetensors::tensor::TensorView;
        use safetensors::Dtype;
        let half = |v: &[u16]| -> Vec<u8> { v.iter().flat_map(|h| h.to_le_bytes()).collect() };
        // 1.0 = 0x3c00, -2.0 = 0xc000, 0.5 = 0x3800
        let w = half(&[0x3c00, 0xc000, 0x3800, 0x3c00, 0xc000, 0x3800]);
        let hw = half(&[0x3800; 8]);
        let hb = half(&[0xc000; 4]);
        let views = vec![
            (
                "features.0.weight",
                TensorView::new(Dtype::F16, vec![2, 3], &w).unwrap(),
            ),
            (
                "head.weight",
                TensorView::new(Dtype::F16, vec![4, 2], &hw).unwrap(),
            ),
            (
                "head.bias",
                TensorView::new(Dtype::F16, vec![4], &hb).unwrap(),
            ),
        ];
        let bytes = safetensors::tensor::serialize(views, None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("init-f16.safetensors");
        std::fs::write(&path, bytes).unwrap();
        let (file, _) = crate::engine::checkpoint::read_tensors(&path, &Device::Cpu).unwrap();
        let s = store();
        let r = load_init(&s, file, &InitMapping::default()).unwrap();
        assert_eq!(r.loaded, 3);
        let sd: HashMap<String, Tensor> = s.state_dict().into_iter().collect();
        assert_eq!(sd["features.0.weight"].dtype(), DType::F32);
        assert_eq!(
            sd["features.0.weight"].to_vec2::<f32>().unwrap(),
            vec![vec![1.0, -2.0, 0.5], vec![1.0, -2.0, 0.5]]
        );
        assert_eq!(sd["head.bias"].to_vec1::<f32>().unwrap(), vec![-2.0; 4]);
    }

    /// A torchvision state dict saved without `num_batches_tracked` (or with
    /// it as f32 rather than i64) loads; the counters start at 0.
    #[test]
    fn batch_norm_counters_may_be_missing_or_f32() {
        let s = ParamStore::new(0, &Device::Cpu);
        let vb = s.var_builder();
        vb.get_with_hints(2, "bn1.weight", Init::Const(0.0))
            .unwrap();
        vb.get_with_hints(2, "bn1.running_mean", Init::Const(0.0))
            .unwrap();
        vb.get_with_hints((), "bn1.num_batches_tracked", Init::Const(0.0))
            .unwrap();
        vb.get_with_hints((), "bn2.num_batches_tracked", Init::Const(0.0))
            .unwrap();
        let mut file = HashMap::new();
        file.insert("bn1.weight".to_string(), t(&[2], 1.0));
        file.insert("bn1.running_mean".to_string(), t(&[2], 0.5));
        file.insert("bn2.num_batches_tracked".to_string(), t(&[], 7.0));
        let r = load_init(&s, file, &InitMapping::default()).unwrap();
        assert_eq!(r.loaded, 3);
        let sd: HashMap<String, Tensor> = s.state_dict().into_iter().collect();
        assert_eq!(
            sd["bn1.num_batches_tracked"].to_scalar::<f32>().unwrap(),
            0.0
        );
        assert_eq!(
            sd["bn2.num_batches_tracked"].to_scalar::<f32>().unwrap(),
            7.0
        );
    }

    #[test]
    fn a_mis_shaped_classifier_names_its_reinit_pattern() {
        let s = ParamStore::new(0, &Device::Cpu);
        let vb = s.var_builder();
        vb.get_with_hints((3, 2), "classifier.1.weight", Init::Const(0.0))
            .unwrap();
        let mut file = HashMap::new();
        file.insert("classifier.1.weight".to_string(), t(&[1000, 2], 1.0));
        let e = load_init(&s, file, &InitMapping::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.reinit = [\"classifier.1.*\"]"), "{e}");
    }

    #[test]
    fn prefix_rename_and_reinit() {
        let s = store();
        let mut file = HashMap::new();
        file.insert("model.features.0.weight".to_string(), t(&[2, 3], 1.0));
        file.insert("model.classifier.weight".to_string(), t(&[10, 2], 1.0));
        file.insert("model.classifier.bias".to_string(), t(&[10], 1.0));
        file.insert("optimizer_step".to_string(), t(&[1], 1.0));
        let mapping = InitMapping {
            prefix: Some("model.".into()),
            rename: vec![("classifier.*".into(), "head.*".into())],
            reinit: vec!["head.*".into()],
        };
        let r = load_init(&s, file, &mapping).unwrap();
        assert_eq!(r.loaded, 1);
        assert_eq!(r.outside_prefix, 1);
        assert_eq!(r.reinitialised, vec!["head.bias", "head.weight"]);
        let sd: HashMap<String, Tensor> = s.state_dict().into_iter().collect();
        assert_eq!(
            sd["features.0.weight"].to_vec2::<f32>().unwrap(),
            vec![vec![1.0; 3]; 2]
        );
        assert_eq!(sd["head.bias"].to_vec1::<f32>().unwrap(), vec![7.0; 4]);
    }

    #[test]
    fn every_problem_in_one_error() {
        let s = store();
        let mut file = HashMap::new();
        file.insert("net.features.0.weight".to_string(), t(&[2, 3], 1.0));
        file.insert("net.head.weight".to_string(), t(&[10, 2], 1.0));
        let mapping = InitMapping {
            prefix: None,
            rename: vec![("nothing".into(), "x".into())],
            reinit: vec!["tail.*".into()],
        };
        let e = load_init(&s, file.clone(), &mapping)
            .unwrap_err()
            .to_string();
        for want in [
            "model.rename \"nothing\" = \"x\" matches no tensor",
            "model.reinit pattern \"tail.*\" matches no parameter",
            "missing tensor `features.0.weight` [2, 3]",
            "missing tensor `head.bias` [4]",
            "unexpected tensor `net.head.weight`",
            "model.init_prefix = \"net.\"",
        ] {
            assert!(e.contains(want), "{want:?} not in {e}");
        }
        let e = load_init(
            &s,
            file,
            &InitMapping {
                prefix: Some("net.".into()),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`head.weight` has shape [10, 2], the model needs [4, 2]"),
            "{e}"
        );
        assert!(e.contains("model.reinit = [\"head.*\"]"), "{e}");
    }
}
