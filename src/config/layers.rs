//! The layering machinery: `--set`, environment and MQTT overrides, aliases,
//! the walk of known keys (with did-you-mean) and the rewriting of type
//! errors so that each names its key and where the value came from.

use std::path::Path;

use super::{invalid, ConfigError, Settings, ENV_PREFIX, KEY_ALIASES};
use crate::engine::model::registry::{ArchConfigs, ConfigVisitor};

/// One `key=value` override and where it came from.
#[derive(Debug, Clone)]
pub struct Override {
    /// Dotted key, e.g. `train.optimizer.lr`.
    pub key: String,
    /// The value, parsed as a TOML literal where possible, else a string.
    pub value: toml::Value,
    /// Where it came from, for error messages.
    pub origin: String,
}

impl Override {
    /// Parses `key=value` as given to `--set`.
    pub fn parse_set(arg: &str) -> Result<Self, ConfigError> {
        let (key, raw) = arg
            .split_once('=')
            .ok_or_else(|| ConfigError::BadOverride {
                arg: arg.to_string(),
                reason: "expected KEY=VALUE".into(),
            })?;
        let key = key.trim();
        if key.is_empty() {
            return Err(ConfigError::BadOverride {
                arg: arg.to_string(),
                reason: "empty key".into(),
            });
        }
        Ok(Self {
            key: key.to_string(),
            value: parse_literal(raw.trim()),
            origin: format!("--set {arg}"),
        })
    }

    /// Builds an override from a JSON value (as sent in an MQTT command).
    pub fn from_json(
        key: &str,
        value: &serde_json::Value,
        origin: &str,
    ) -> Result<Self, ConfigError> {
        let value = json_to_toml(value).ok_or_else(|| ConfigError::BadOverride {
            arg: key.to_string(),
            reason: "null is not a value".into(),
        })?;
        Ok(Self {
            key: key.to_string(),
            value,
            origin: origin.to_string(),
        })
    }
}

/// Reads a value as a TOML literal (`0.01`, `true`, `[1, 2]`, `"x"`), falling back
/// to the raw text as a string.
fn parse_literal(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

fn json_to_toml(v: &serde_json::Value) -> Option<toml::Value> {
    Some(match v {
        serde_json::Value::Null => return None,
        serde_json::Value::Bool(b) => toml::Value::Boolean(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64()?),
        },
        serde_json::Value::String(s) => toml::Value::String(s.clone()),
        serde_json::Value::Array(a) => {
            toml::Value::Array(a.iter().map(json_to_toml).collect::<Option<Vec<_>>>()?)
        }
        serde_json::Value::Object(o) => {
            let mut t = toml::Table::new();
            for (k, v) in o {
                t.insert(k.clone(), json_to_toml(v)?);
            }
            toml::Value::Table(t)
        }
    })
}

fn toml_to_config(v: &toml::Value) -> config::Value {
    use config::ValueKind;
    let kind = match v {
        toml::Value::String(s) => ValueKind::String(s.clone()),
        toml::Value::Integer(i) => ValueKind::I64(*i),
        toml::Value::Float(f) => ValueKind::Float(*f),
        toml::Value::Boolean(b) => ValueKind::Boolean(*b),
        toml::Value::Datetime(d) => ValueKind::String(d.to_string()),
        toml::Value::Array(a) => ValueKind::Array(a.iter().map(toml_to_config).collect()),
        toml::Value::Table(t) => ValueKind::Table(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_config(v)))
                .collect(),
        ),
    };
    config::Value::new(None, kind)
}

/// Collects `EDGE_TRAINER__SECTION__KEY=value` variables from the given environment.
pub fn env_overrides<I>(vars: I) -> Vec<Override>
where
    I: IntoIterator<Item = (String, String)>,
{
    let mut out: Vec<Override> = vars
        .into_iter()
        .filter_map(|(name, value)| {
            let rest = name.strip_prefix(ENV_PREFIX)?;
            let key = rest
                .split("__")
                .map(|p| p.to_ascii_lowercase())
                .collect::<Vec<_>>()
                .join(".");
            Some(Override {
                key,
                value: parse_literal(value.trim()),
                origin: format!("environment variable {name}"),
            })
        })
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// The schema of known keys: the default settings as JSON, every key present.
fn schema() -> serde_json::Value {
    serde_json::to_value(Settings::default()).unwrap_or(serde_json::Value::Null)
}

/// The full form of a key that may be an alias (`train.lr` -> `train.optimizer.lr`).
pub fn resolve_alias(key: &str) -> String {
    KEY_ALIASES
        .iter()
        .find(|(alias, _)| *alias == key)
        .map(|(_, full)| full.to_string())
        .unwrap_or_else(|| key.to_string())
}

/// Tables whose keys are the user's own (names of tensors), not settings.
const FREE_FORM_TABLES: &[&str] = &["model.rename"];

/// Checks that `key` (dotted) names a known setting; suggests the nearest one if not.
fn check_key(schema: &serde_json::Value, key: &str, origin: &str) -> Result<(), ConfigError> {
    let mut node = schema;
    let mut walked = Vec::new();
    for part in key.split('.') {
        if !walked.is_empty() && FREE_FORM_TABLES.contains(&walked.join(".").as_str()) {
            return Ok(());
        }
        let obj = match node {
            serde_json::Value::Object(o) => o,
            // A leaf (or an optional list) reached before the key ended.
            _ => {
                return Err(ConfigError::UnknownKey {
                    key: key.to_string(),
                    origin: origin.to_string(),
                    hint: format!(" (`{}` is a value, not a section)", walked.join(".")),
                })
            }
        };
        match obj.get(part) {
            Some(child) => {
                walked.push(part.to_string());
                node = child;
            }
            None => {
                let best = obj
                    .keys()
                    .map(|k| (strsim::levenshtein(k, part), k))
                    .filter(|(d, _)| *d <= 3)
                    .min();
                let hint = match best {
                    Some((_, k)) => {
                        walked.push(k.clone());
                        format!("; did you mean `{}`?", walked.join("."))
                    }
                    None if walked.is_empty() => format!(
                        "; known sections: {}",
                        obj.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                    None => format!(
                        "; `{}` has: {}",
                        walked.join("."),
                        obj.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                };
                return Err(ConfigError::UnknownKey {
                    key: key.to_string(),
                    origin: origin.to_string(),
                    hint,
                });
            }
        }
    }
    Ok(())
}

/// Walks a TOML table and checks every leaf key against the schema.
fn check_table(
    schema: &serde_json::Value,
    table: &toml::Table,
    prefix: &str,
    origin: &str,
) -> Result<(), ConfigError> {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        let key = resolve_alias(&key);
        check_key(schema, &key, origin)?;
        if let toml::Value::Table(t) = v {
            if FREE_FORM_TABLES.contains(&key.as_str()) {
                continue;
            }
            // A table value must itself be a section in the schema.
            check_table(schema, t, &key, origin)?;
        }
    }
    Ok(())
}

/// Reads and parses a config file into its TOML table (no layering, no checks).
pub fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let file_error = |reason: String| ConfigError::File {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    toml::from_str(&text).map_err(|e| file_error(e.to_string()))
}

/// Loads settings from a file plus overrides (environment first, then `--set`).
pub fn load(path: &Path, overrides: &[Override]) -> Result<Settings, ConfigError> {
    let table = read_table(path)?;
    let settings = load_layers(&table, &path.display().to_string(), overrides)?;
    // Relative paths in the file are relative to the working directory, as a
    // user typing them at a shell expects; nothing to rewrite here.
    settings.validate()?;
    Ok(settings)
}

/// Builds settings from an already-parsed file table and overrides, without validation.
pub fn load_layers(
    file: &toml::Table,
    file_origin: &str,
    overrides: &[Override],
) -> Result<Settings, ConfigError> {
    let schema = schema();
    check_table(&schema, file, "", file_origin)?;
    let mut builder = config::Config::builder().add_source(config::File::from_str(
        &toml::to_string(&rename_aliases(file)).map_err(|e| ConfigError::Other(e.to_string()))?,
        config::FileFormat::Toml,
    ));
    for ov in overrides {
        let key = resolve_alias(&ov.key);
        check_key(&schema, &key, &ov.origin)?;
        if let toml::Value::Table(t) = &ov.value {
            check_table(&schema, t, &key, &ov.origin)?;
        }
        builder = builder
            .set_override(key.as_str(), toml_to_config(&ov.value))
            .map_err(|e| ConfigError::BadOverride {
                arg: ov.origin.clone(),
                reason: e.to_string(),
            })?;
    }
    let cfg = builder
        .build()
        .map_err(|e| ConfigError::Other(e.to_string()))?;
    // The architectures' keys are flattened into [model], where a wrong type
    // would be reported without its key: check them first, key by key.
    ArchConfigs::visit(&mut ModelKeys {
        model: cfg
            .get_table("model")
            .map(|t| config::Value::new(None, config::ValueKind::Table(t)))
            .ok(),
        overrides,
        file_origin,
    })?;
    let mut settings = cfg
        .try_deserialize::<Settings>()
        .map_err(|e| type_error(&e.to_string(), overrides, file_origin))?;
    let o = &mut settings.train.optimizer;
    o.weight_decay = Some(o.effective_weight_decay());
    Ok(settings)
}

/// Rewrites alias keys (`train.lr`) in a file table to their full form.
fn rename_aliases(table: &toml::Table) -> toml::Table {
    let mut out = table.clone();
    for (alias, full) in KEY_ALIASES {
        let (a_sec, a_key) = alias.split_once('.').unwrap_or(("", alias));
        let value = out
            .get_mut(a_sec)
            .and_then(|v| v.as_table_mut())
            .and_then(|t| t.remove(a_key));
        if let Some(value) = value {
            let mut node = &mut out;
            let parts: Vec<&str> = full.split('.').collect();
            for part in &parts[..parts.len() - 1] {
                let entry = node
                    .entry(part.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                match entry {
                    toml::Value::Table(t) => node = t,
                    _ => return out,
                }
            }
            if let Some(last) = parts.last() {
                node.insert(last.to_string(), value);
            }
        }
    }
    out
}

/// Deserialises each architecture's keys from the layered `[model]` table.
struct ModelKeys<'a> {
    model: Option<config::Value>,
    overrides: &'a [Override],
    file_origin: &'a str,
}

impl ConfigVisitor for ModelKeys<'_> {
    type Error = ConfigError;

    fn visit<T: serde::de::DeserializeOwned>(&mut self) -> Result<(), ConfigError> {
        let Some(model) = &self.model else {
            return Ok(());
        };
        match T::deserialize(model.clone()) {
            Ok(_) => Ok(()),
            // The keys are relative to [model].
            Err(e) => Err(type_error(
                &e.to_string().replacen("for key `", "for key `model.", 1),
                self.overrides,
                self.file_origin,
            )),
        }
    }
}

/// Turns a deserialisation error into one that names the key and its origin.
fn type_error(msg: &str, overrides: &[Override], file_origin: &str) -> ConfigError {
    let msg = msg.to_string();
    // config's messages end with "for key `a.b`" (sometimes "in <source>").
    let key = msg
        .split("for key `")
        .nth(1)
        .and_then(|s| s.split('`').next())
        .map(str::to_string);
    match key {
        Some(key) => {
            let origin = overrides
                .iter()
                .rev()
                .find(|o| resolve_alias(&o.key) == key || key.starts_with(&format!("{}.", o.key)))
                .map(|o| o.origin.clone())
                .unwrap_or_else(|| file_origin.to_string());
            let reason = msg.split(" for key `").next().unwrap_or(&msg).to_string();
            invalid(&key, format!("{reason} (from {origin})"))
        }
        None => ConfigError::Other(format!("{msg} (in {file_origin} or its overrides)")),
    }
}
