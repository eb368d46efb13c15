//! Validation: the value rules of each section, each error naming its key.
//! Rules owned by the engine (the optimiser's, each architecture's) are the
//! engine's own, mapped onto keys here.

use super::{invalid, key_error, ConfigError, DataFormat, NormalizeKind, Settings};
use crate::engine::model::registry::ConfigContext;

fn check_range(
    key: &str,
    v: f64,
    lo: f64,
    hi: f64,
    lo_incl: bool,
    hi_incl: bool,
) -> Result<(), ConfigError> {
    let ok_lo = if lo_incl { v >= lo } else { v > lo };
    let ok_hi = if hi_incl { v <= hi } else { v < hi };
    if v.is_finite() && ok_lo && ok_hi {
        Ok(())
    } else {
        let l = if lo_incl { "[" } else { "(" };
        let h = if hi_incl { "]" } else { ")" };
        Err(invalid(key, format!("{v} is outside {l}{lo}, {hi}{h}")))
    }
}

impl Settings {
    /// Refuses secret files (`mqtt.password_file`, `mqtt.tls.client_key`) that
    /// other users can read, or that are missing. Checked by the daemon at start
    /// and by `check-config`.
    pub fn check_secret_files(&self) -> Result<(), ConfigError> {
        use std::os::unix::fs::PermissionsExt;
        let secrets = [
            ("mqtt.password_file", self.mqtt.password_file.as_ref()),
            ("mqtt.tls.client_key", self.mqtt.tls.client_key.as_ref()),
        ];
        for (key, path) in secrets {
            let Some(path) = path else { continue };
            let meta = std::fs::metadata(path)
                .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o007 != 0 {
                return Err(invalid(
                    key,
                    format!(
                        "{} is accessible to every user (mode {mode:04o}); run `chmod 600 {}`",
                        path.display(),
                        path.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks ranges and cross-field rules, section by section; the error
    /// names the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_data()?;
        self.validate_model()?;
        self.validate_train()?;
        self.validate_mqtt()?;
        self.validate_retrain()?;
        self.validate_output()?;
        self.validate_retention()?;
        super::checks::check(self)?;
        self.check_budget()
    }

    /// `[data]`: ranges and cross-field rules.
    fn validate_data(&self) -> Result<(), ConfigError> {
        let d = &self.data;
        check_range("data.val_fraction", d.val_fraction, 0.0, 1.0, true, false)?;
        check_range("data.test_fraction", d.test_fraction, 0.0, 1.0, true, false)?;
        if d.val_fraction <= 0.0 {
            return Err(invalid(
                "data.val_fraction",
                "must be > 0: training needs a validation split to evaluate on",
            ));
        }
        if d.val_fraction + d.test_fraction >= 1.0 {
            return Err(invalid(
                "data.test_fraction",
                format!(
                    "data.val_fraction + data.test_fraction = {} leaves no training data",
                    d.val_fraction + d.test_fraction
                ),
            ));
        }
        if d.delimiter.len() != 1 {
            return Err(invalid(
                "data.delimiter",
                "must be a single ASCII character",
            ));
        }
        if d.x_key.is_empty() {
            return Err(invalid("data.x_key", "must not be empty"));
        }
        if d.y_key.is_empty() {
            return Err(invalid("data.y_key", "must not be empty"));
        }
        if d.image_size.contains(&0) {
            return Err(invalid("data.image_size", "both sides must be > 0"));
        }
        if !matches!(d.channels, 1 | 3) {
            return Err(invalid("data.channels", "must be 1 or 3"));
        }
        if !(d.max_abs_value.is_finite() && d.max_abs_value > 0.0) {
            return Err(invalid(
                "data.max_abs_value",
                "must be a finite number > 0 (e.g. 1e6)",
            ));
        }
        if d.max_file_mb == 0 {
            return Err(invalid("data.max_file_mb", "must be >= 1"));
        }
        // image-folder streaming (issue 14)
        if d.workers > 16 {
            return Err(invalid("data.workers", "must be 0 to 16"));
        }
        if !(1..=16).contains(&d.prefetch) {
            return Err(invalid("data.prefetch", "must be 1 to 16"));
        }
        if let Some((key, reason)) = d.augment.invalid() {
            return Err(invalid(key, reason));
        }
        let images = d.format == DataFormat::ImageFolder;
        if !images && (d.normalize != NormalizeKind::Dataset || !d.augment.is_off()) {
            let key = if d.normalize != NormalizeKind::Dataset {
                "data.normalize"
            } else {
                "data.augment"
            };
            return Err(invalid(key, "applies to image-folder data only"));
        }
        if d.max_len == 0 {
            return Err(invalid("data.max_len", "must be > 0"));
        }
        if let Some(c) = &d.classes {
            if c.len() < 2 {
                return Err(invalid("data.classes", "needs at least two classes"));
            }
        }
        Ok(())
    }

    /// `[model]`: ranges and cross-field rules.
    fn validate_model(&self) -> Result<(), ConfigError> {
        let d = &self.data;
        let m = &self.model;
        if let Some(d) = m.dropout {
            check_range("model.dropout", d, 0.0, 1.0, true, false)?;
        }
        m.archs
            .validate(&ConfigContext {
                arch: m.arch,
                max_len: d.max_len,
            })
            .map_err(key_error)?;
        if d.max_vocab == 0 {
            return Err(invalid("data.max_vocab", "must be >= 1"));
        }
        if m.init_prefix.as_deref() == Some("") {
            return Err(invalid(
                "model.init_prefix",
                "must not be empty (omit it instead)",
            ));
        }
        for (from, to) in &m.rename {
            let wild = |s: &str| s.contains('*');
            let ok = !from.is_empty()
                && !to.is_empty()
                && ((!wild(from) && !wild(to))
                    || (from.ends_with('*')
                        && to.ends_with('*')
                        && !wild(&from[..from.len() - 1])
                        && !wild(&to[..to.len() - 1])));
            if !ok {
                return Err(invalid(
                    "model.rename",
                    format!(
                        "{from:?} = {to:?}: give two names, or two prefixes ending in `*` (\"classifier.*\" = \"head.*\")"
                    ),
                ));
            }
        }
        for (key, patterns) in [("model.reinit", &m.reinit), ("model.freeze", &m.freeze)] {
            if patterns.iter().any(|p| p.is_empty()) {
                return Err(invalid(key, "patterns must not be empty"));
            }
        }
        if (m.init_prefix.is_some() || !m.rename.is_empty() || !m.reinit.is_empty())
            && m.init.is_none()
        {
            let key = if m.init_prefix.is_some() {
                "model.init_prefix"
            } else if !m.rename.is_empty() {
                "model.rename"
            } else {
                "model.reinit"
            };
            return Err(invalid(
                key,
                "only applies to weights loaded with model.init; set model.init",
            ));
        }
        Ok(())
    }

    /// `[train]`: ranges and cross-field rules.
    fn validate_train(&self) -> Result<(), ConfigError> {
        let t = &self.train;
        if t.max_epochs == 0 {
            return Err(invalid("train.max_epochs", "must be >= 1"));
        }
        if t.max_steps == Some(0) {
            return Err(invalid(
                "train.max_steps",
                "must be >= 1 (omit it for no limit)",
            ));
        }
        if t.batch_size == 0 {
            return Err(invalid("train.batch_size", "must be >= 1"));
        }
        check_range(
            "train.label_smoothing",
            t.label_smoothing,
            0.0,
            1.0,
            true,
            true,
        )?;
        if let Some(w) = &t.class_weights {
            for (i, v) in w.iter().enumerate() {
                if !(v.is_finite() && *v >= 0.0) {
                    return Err(invalid(
                        "train.class_weights",
                        format!("weight {i} is {v}; weights must be finite and >= 0"),
                    ));
                }
            }
            if w.iter().all(|v| *v == 0.0) {
                return Err(invalid("train.class_weights", "all weights are zero"));
            }
        }

        // The optimiser's value rules are the engine's; its error names the field.
        self.optimizer_config()
            .validate_all()
            .map_err(|e| invalid(&format!("train.optimizer.{}", e.field), e.reason))?;

        let s = &t.scheduler;
        check_range("train.scheduler.factor", s.factor, 0.0, 1.0, false, false)?;
        check_range(
            "train.scheduler.threshold",
            s.threshold,
            0.0,
            f64::MAX,
            true,
            true,
        )?;
        check_range(
            "train.scheduler.min_lr",
            s.min_lr,
            0.0,
            f64::MAX,
            true,
            true,
        )?;
        check_range("train.scheduler.eps", s.eps, 0.0, f64::MAX, true, true)?;

        let e = &t.early_stopping;
        check_range(
            "train.early_stopping.min_delta",
            e.min_delta,
            0.0,
            f64::MAX,
            true,
            true,
        )?;
        Ok(())
    }

    /// `[mqtt]`: ranges and cross-field rules.
    fn validate_mqtt(&self) -> Result<(), ConfigError> {
        if self.mqtt.host.trim().is_empty() {
            return Err(invalid("mqtt.host", "must not be empty"));
        }
        if self.mqtt.topic_prefix.is_empty() || self.mqtt.topic_prefix.contains(['#', '+']) {
            return Err(invalid(
                "mqtt.topic_prefix",
                "must be non-empty and contain no MQTT wildcards (# +)",
            ));
        }
        if let Some(id) = &self.mqtt.device_id {
            if id.is_empty() || id.contains(['#', '+', '/']) {
                return Err(invalid(
                    "mqtt.device_id",
                    "must be non-empty and contain no '/', '#' or '+'",
                ));
            }
        }
        if self.mqtt.keep_alive_s == 0 {
            return Err(invalid("mqtt.keep_alive_s", "must be >= 1"));
        }
        check_range(
            "mqtt.reconnect_max_s",
            self.mqtt.reconnect_max_s,
            0.1,
            86_400.0,
            true,
            true,
        )?;
        if self.mqtt.outbox_capacity < 10 {
            return Err(invalid("mqtt.outbox_capacity", "must be >= 10"));
        }
        let (c, k) = (&self.mqtt.tls.client_cert, &self.mqtt.tls.client_key);
        if c.is_some() != k.is_some() {
            return Err(invalid(
                "mqtt.tls.client_cert",
                "mqtt.tls.client_cert and mqtt.tls.client_key go together: set both or neither",
            ));
        }
        if c.is_some() && self.mqtt.tls.ca.is_none() {
            return Err(invalid(
                "mqtt.tls.ca",
                "a client certificate needs TLS: set mqtt.tls.ca to the broker's CA file",
            ));
        }
        if self.mqtt.password_file.is_some() && self.mqtt.username.is_none() {
            return Err(invalid("mqtt.password_file", "needs mqtt.username"));
        }
        Ok(())
    }

    /// `[retrain]`: ranges and cross-field rules.
    fn validate_retrain(&self) -> Result<(), ConfigError> {
        let r = &self.retrain;
        check_range(
            "retrain.file_settle_s",
            r.file_settle_s,
            0.0,
            3_600.0,
            true,
            true,
        )?;
        check_range("retrain.rescan_s", r.rescan_s, 0.1, 86_400.0, true, true)?;
        Ok(())
    }

    /// `[output]`: ranges and cross-field rules.
    fn validate_output(&self) -> Result<(), ConfigError> {
        if self.output.dir.as_os_str().is_empty() {
            return Err(invalid("output.dir", "must not be empty"));
        }
        Ok(())
    }
}
