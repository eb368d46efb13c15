use super::*;

fn table(s: &str) -> toml::Table {
    toml::from_str(s).unwrap()
}

#[test]
fn defaults_are_valid() {
    Settings::default().validate().unwrap();
}

#[test]
fn file_values_override_defaults() {
    let s = load_layers(
        &table("[train]\nbatch_size = 32\n[train.optimizer]\nlr = 0.01\n"),
        "test.toml",
        &[],
    )
    .unwrap();
    assert_eq!(s.train.batch_size, 32);
    assert_eq!(s.train.optimizer.lr, 0.01);
    assert_eq!(s.train.max_epochs, 100);
}

#[test]
fn set_beats_env_beats_file() {
    let file = table("[train]\nbatch_size = 32\nseed = 1\nmax_epochs = 7\n");
    let mut ovs = env_overrides(vec![
        (
            "EDGE_TRAINER__TRAIN__BATCH_SIZE".to_string(),
            "16".to_string(),
        ),
        ("EDGE_TRAINER__TRAIN__SEED".to_string(), "2".to_string()),
        ("UNRELATED".to_string(), "x".to_string()),
    ]);
    ovs.push(Override::parse_set("train.batch_size=8").unwrap());
    let s = load_layers(&file, "f.toml", &ovs).unwrap();
    assert_eq!(s.train.batch_size, 8);
    assert_eq!(s.train.seed, 2);
    assert_eq!(s.train.max_epochs, 7);
}

#[test]
fn alias_train_lr() {
    let ovs = vec![Override::parse_set("train.lr=0.5").unwrap()];
    let s = load_layers(&table(""), "f", &ovs).unwrap();
    assert_eq!(s.train.optimizer.lr, 0.5);
    let s = load_layers(&table("[train]\nlr = 0.25\n"), "f", &[]).unwrap();
    assert_eq!(s.train.optimizer.lr, 0.25);
}

#[test]
fn lists_and_strings_from_set() {
    let ovs = vec![
        Override::parse_set("model.hidden=[32, 16]").unwrap(),
        Override::parse_set("train.eval_every=50").unwrap(),
        Override::parse_set("data.dir=some/where").unwrap(),
    ];
    let s = load_layers(&table(""), "f", &ovs).unwrap();
    assert_eq!(s.model.archs.mlp.hidden, vec![32, 16]);
    assert_eq!(s.train.eval_every, EvalEvery::Steps(50));
    assert_eq!(s.data.dir, PathBuf::from("some/where"));
}

#[test]
fn unknown_key_is_named_with_suggestion() {
    let err = load_layers(&table("[train.optimizer]\nlrr = 0.1\n"), "my.toml", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("train.optimizer.lrr"), "{err}");
    assert!(err.contains("my.toml"), "{err}");
    assert!(err.contains("did you mean `train.optimizer.lr`"), "{err}");
    let err = load_layers(&table("[trian]\nx = 1\n"), "my.toml", &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`trian`") && err.contains("did you mean `train`"),
        "{err}"
    );
    let err = load_layers(
        &table(""),
        "f",
        &[Override::parse_set("train.nope=1").unwrap()],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("train.nope") && err.contains("--set"), "{err}");
}

#[test]
fn wrong_type_names_key() {
    let err = load_layers(&table("[train]\nbatch_size = \"big\"\n"), "f.toml", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("train.batch_size"), "{err}");
}

#[test]
fn architecture_keys_stay_flat_and_name_their_key() {
    // The architectures' own keys are flattened into [model]: the effective
    // settings (summary.json, resume state) keep the flat shape.
    let j = Settings::default().masked_json();
    for key in [
        "hidden",
        "conv_channels",
        "kernel_size",
        "embed_dim",
        "filter_sizes",
    ] {
        assert!(j["model"].get(key).is_some(), "model.{key} missing: {j}");
    }
    // A wrong type in an architecture's key names the key and its origin,
    // from the file, --set and the environment alike.
    let err = load_layers(&table("[model]\nhidden = \"big\"\n"), "f.toml", &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.hidden") && err.contains("f.toml"),
        "{err}"
    );
    let ovs = vec![Override::parse_set("model.embed_dim=wide").unwrap()];
    let err = load_layers(&table(""), "f", &ovs).unwrap_err().to_string();
    assert!(
        err.contains("model.embed_dim") && err.contains("--set"),
        "{err}"
    );
    let env = env_overrides(vec![(
        "EDGE_TRAINER__MODEL__CONV_CHANNELS".to_string(),
        "[8, 16]".to_string(),
    )]);
    let s = load_layers(&table(""), "f", &env).unwrap();
    assert_eq!(s.model.archs.cnn.conv_channels, vec![8, 16]);
    // Validation of an architecture's key names it as before.
    let s = load_layers(&table("[model]\nnum_filters = 0\n"), "f", &[]).unwrap();
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("model.num_filters"), "{err}");
}

#[test]
fn optimiser_rules_are_the_engines() {
    let mut s = Settings::default();
    s.train.optimizer.lr = 0.0;
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("train.optimizer.lr"), "{err}");
    assert!(s.optimizer_config().validate().is_err());
    let mut s = Settings::default();
    s.train.optimizer.dampening = 1.5;
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("train.optimizer.dampening"), "{err}");
    let mut sgd = s.optimizer_config();
    sgd.kind = OptimizerKind::Sgd;
    assert!(sgd.validate().is_err());
    let mut s = Settings::default();
    s.train.optimizer.betas = [0.9, 1.0];
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("train.optimizer.betas"), "{err}");
}

#[test]
fn out_of_range_names_key() {
    let mut s = Settings::default();
    s.train.optimizer.lr = -1.0;
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("train.optimizer.lr"), "{err}");
    let mut s = Settings::default();
    s.data.val_fraction = 0.6;
    s.data.test_fraction = 0.5;
    assert!(s
        .validate()
        .unwrap_err()
        .to_string()
        .contains("data.test_fraction"));
    let mut s = Settings::default();
    s.train.optimizer.nesterov = true;
    assert!(s.validate().unwrap_err().to_string().contains("nesterov"));
}

#[test]
fn eval_every_forms() {
    for (src, want) in [
        ("eval_every = \"epoch\"", EvalEvery::Epoch),
        ("eval_every = 10", EvalEvery::Steps(10)),
    ] {
        let s = load_layers(&table(&format!("[train]\n{src}\n")), "f", &[]).unwrap();
        assert_eq!(s.train.eval_every, want);
    }
    assert!(load_layers(&table("[train]\neval_every = 0\n"), "f", &[]).is_err());
    assert!(load_layers(&table("[train]\neval_every = \"often\"\n"), "f", &[]).is_err());
}

#[test]
fn model_keys_for_every_architecture() {
    let s = load_layers(
        &table(
            "[data]\nformat = \"image-folder\"\n[model]\narch = \"cnn\"\nconv_channels = [8, 16, 32]\nkernel_size = [5, 3, 3]\npool = 2\nbatch_norm = [true, true, false]\ninit = \"w.safetensors\"\ninit_prefix = \"model.\"\nreinit = [\"head.*\"]\n[model.rename]\n\"classifier.*\" = \"head.*\"\n\"Block.0.W\" = \"features.0.conv.weight\"\n",
        ),
        "f.toml",
        &[],
    )
    .unwrap();
    s.validate().unwrap();
    assert_eq!(
        s.model.rename.get("classifier.*").map(String::as_str),
        Some("head.*")
    );
    assert_eq!(
        s.model.rename.get("Block.0.W").map(String::as_str),
        Some("features.0.conv.weight")
    );
    assert_eq!(s.model.archs.cnn.kernel_size, PerBlock::Each(vec![5, 3, 3]));
    assert_eq!(s.model.archs.cnn.pool, PerBlock::One(2));
    let c = s.model_template().unwrap();
    assert_eq!(c.arch, ArchKind::Cnn);
    let kernels: Vec<usize> = c
        .archs
        .cnn
        .blocks()
        .unwrap()
        .iter()
        .map(|b| b.kernel_size)
        .collect();
    assert_eq!(kernels, vec![5, 3, 3]);
    assert_eq!(c.dropout, 0.0);
    assert!(
        s.masked_toml().contains("\"classifier.*\" = \"head.*\""),
        "{}",
        s.masked_toml()
    );
    // A list of the wrong length names the key.
    let ovs = vec![Override::parse_set("model.stride=[1, 2, 1]").unwrap()];
    let bad = load_layers(&table("[model]\narch = \"cnn1d\"\n"), "f", &ovs).unwrap();
    let e = bad.model_template().unwrap_err().to_string();
    assert!(e.contains("model.stride") && e.contains("3 values"), "{e}");
    // textcnn: the seed's defaults, and text only.
    let t = load_layers(
        &table("[data]\nformat = \"text-tsv\"\n[model]\narch = \"textcnn\"\n"),
        "f",
        &[],
    )
    .unwrap();
    let tt = t.model_template().unwrap();
    assert_eq!(tt.arch, ArchKind::Textcnn);
    let tc = &tt.archs.textcnn;
    assert_eq!((tc.embed_dim, tc.num_filters, tt.dropout), (300, 256, 0.5));
    assert_eq!(tc.filter_sizes, vec![2, 3, 4]);
    assert_eq!(t.data.max_len, 32);
    let e = load_layers(&table("[model]\narch = \"textcnn\"\n"), "f", &[])
        .unwrap()
        .model_template()
        .unwrap_err()
        .to_string();
    assert!(e.contains("text-tsv"), "{e}");
    // Mapping keys without model.init are a mistake.
    let e = load_layers(&table("[model]\nreinit = [\"head.*\"]\n"), "f", &[])
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.reinit") && e.contains("model.init"),
        "{e}"
    );
}

#[test]
fn adamw_weight_decay_defaults_like_torch() {
    let s = load_layers(&table("[train.optimizer]\nkind = \"adamw\"\n"), "f", &[]).unwrap();
    assert_eq!(s.train.optimizer.weight_decay, Some(0.01));
    let s = load_layers(&table("[train.optimizer]\nkind = \"adam\"\n"), "f", &[]).unwrap();
    assert_eq!(s.train.optimizer.weight_decay, Some(0.0));
    let s = load_layers(
        &table("[train.optimizer]\nkind = \"adamw\"\nweight_decay = 0.0\n"),
        "f",
        &[],
    )
    .unwrap();
    assert_eq!(s.train.optimizer.weight_decay, Some(0.0));
}

#[test]
fn world_readable_secrets_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pw");
    std::fs::write(&p, "secret").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut s = Settings::default();
    s.mqtt.password_file = Some(p.clone());
    let e = s.check_secret_files().unwrap_err().to_string();
    assert!(
        e.contains("mqtt.password_file") && e.contains("0644"),
        "{e}"
    );
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    s.check_secret_files().unwrap();
    s.mqtt.tls.client_key = Some(dir.path().join("missing.key"));
    let e = s.check_secret_files().unwrap_err().to_string();
    assert!(e.contains("mqtt.tls.client_key"), "{e}");
}

#[test]
fn masked_output_hides_username() {
    let mut s = Settings::default();
    s.mqtt.username = Some("alice".into());
    let t = s.masked_toml();
    assert!(!t.contains("alice"));
    assert!(t.contains("***"));
}

// --- image-folder streaming and augmentation keys (issue 14) ---

#[test]
fn image_pipeline_keys_load_reach_the_spec_and_are_checked() {
    let s = load_layers(
        &table(
            "[data]\nformat = \"image-folder\"\nnormalize = \"imagenet\"\nresize = \"center-crop\"\ncache_mb = 64\nworkers = 3\n[data.augment]\nrandom_resized_crop = true\nscale = [0.2, 1.0]\nhorizontal_flip = 0.5\nhue = 0.1\n",
        ),
        "f.toml",
        &[Override::parse_set("data.augment.brightness=0.4").unwrap()],
    )
    .unwrap();
    s.validate().unwrap();
    let spec = s.data_spec();
    assert_eq!(spec.images.normalize, NormalizeKind::Imagenet);
    assert_eq!(spec.images.resize, ResizeMode::CenterCrop);
    assert_eq!(spec.images.cache_bytes, 64 << 20);
    assert_eq!(spec.images.workers, 3);
    assert!(spec.images.augment.random_resized_crop);
    assert_eq!(spec.images.augment.scale, [0.2, 1.0]);
    assert_eq!(spec.images.augment.brightness, 0.4);
    let err = |t: &str| {
        load_layers(&table(t), "f.toml", &[])
            .and_then(|s| s.validate())
            .unwrap_err()
            .to_string()
    };
    let e = err("[data]\nformat = \"image-folder\"\n[data.augment]\nhue = 0.9\n");
    assert!(e.contains("data.augment.hue"), "{e}");
    let e = err("[data]\nformat = \"image-folder\"\n[data.augment]\nscale = [0.5, 0.1]\n");
    assert!(e.contains("data.augment.scale"), "{e}");
    let e = err("[data]\nformat = \"image-folder\"\n[data.augment]\nflip = 0.5\n");
    assert!(e.contains("data.augment.flip"), "{e}");
    let e = err("[data]\nformat = \"csv\"\nnormalize = \"imagenet\"\n");
    assert!(
        e.contains("data.normalize") && e.contains("image-folder"),
        "{e}"
    );
    let e = err("[data]\nnormalize = \"imagenet-ish\"\n");
    assert!(e.contains("normalize"), "{e}");
}
