//! Mixed precision: [`PrecisionPolicy`] maps layer names to weight / activation schemes.
//!
//! BitNet-style networks usually keep the first and last layers at 8 bits and quantize the rest
//! to ternary; a policy says that in one rule instead of one config per layer.

use crate::config::QATConfig;
use crate::error::TrainingError;
use bitnet_quant::Scheme;
use serde::{Deserialize, Serialize};

/// One rule: layers whose name matches `pattern` get these schemes.
///
/// `pattern` is one or more globs separated by `|`; in a glob `*` matches any run of characters
/// (dots included) and every other character matches itself. A rule sets both schemes; `None`
/// means full precision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrecisionRule {
    /// `glob` or `glob|glob|...`.
    pub pattern: String,
    /// The weight scheme of matching layers (`None`: full precision).
    #[serde(default)]
    pub weight: Option<Scheme>,
    /// The activation scheme of matching layers (`None`: full precision).
    #[serde(default)]
    pub activation: Option<Scheme>,
}

impl PrecisionRule {
    /// Whether `name` matches one of the rule's globs.
    pub fn matches(&self, name: &str) -> bool {
        self.pattern.split('|').any(|g| glob_match(g, name))
    }
}

/// Layer name -> [`QATConfig`]: the first matching rule's schemes over `default` (whose STE,
/// granularities and schedules every layer shares), or `default` itself when no rule matches.
///
/// ```
/// use bitnet_training::policy::PrecisionPolicy;
/// use bitnet_quant::Scheme;
/// let policy = PrecisionPolicy::from_toml_str(r#"
///     rules = [{ pattern = "fc1|fc3", weight = { MultiBit = { bits = 8 } }, activation = "Int8PerToken" }]
/// "#).unwrap();
/// assert_eq!(policy.config_for("fc1").weight, Some(Scheme::MultiBit { bits: 8 }));
/// assert_eq!(policy.config_for("fc2").weight, Some(Scheme::TernaryAbsmean)); // the default
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct PrecisionPolicy {
    /// Tried in order; the first match wins.
    pub rules: Vec<PrecisionRule>,
    /// The config of layers no rule matches, and the base of every rule's config.
    pub default: QATConfig,
}

impl PrecisionPolicy {
    /// A policy with no rules: every layer gets `default`.
    pub fn new(default: QATConfig) -> Self {
        Self {
            rules: Vec::new(),
            default,
        }
    }

    /// Appends a rule (tried after the existing ones).
    pub fn rule(
        mut self,
        pattern: &str,
        weight: Option<Scheme>,
        activation: Option<Scheme>,
    ) -> Self {
        self.rules.push(PrecisionRule {
            pattern: pattern.to_string(),
            weight,
            activation,
        });
        self
    }

    /// The config of layer `name`.
    pub fn config_for(&self, name: &str) -> QATConfig {
        match self.rules.iter().find(|r| r.matches(name)) {
            Some(r) => self.config_for_rule(r),
            None => self.default,
        }
    }

    /// Rejects empty patterns (or empty `|` alternatives) and any rule whose config is invalid.
    pub fn validate(&self) -> Result<(), TrainingError> {
        self.default.validate()?;
        for r in &self.rules {
            if r.pattern.split('|').any(str::is_empty) {
                return Err(TrainingError::InvalidConfig {
                    field: "rules.pattern",
                    value: format!("{:?}", r.pattern),
                    allowed: "non-empty globs separated by |",
                });
            }
            self.config_for_rule(r).validate()?;
        }
        Ok(())
    }

    fn config_for_rule(&self, r: &PrecisionRule) -> QATConfig {
        // A rule fixes the weight scheme, so a default bit schedule must not override it.
        QATConfig {
            weight: r.weight,
            activation: r.activation,
            bit_schedule: None,
            ..self.default
        }
    }

    /// Parses TOML and validates.
    pub fn from_toml_str(s: &str) -> Result<Self, TrainingError> {
        let p: Self = toml::from_str(s)
            .map_err(|e| TrainingError::Parse(format!("PrecisionPolicy TOML: {e}")))?;
        p.validate()?;
        Ok(p)
    }

    /// Parses JSON and validates.
    pub fn from_json_str(s: &str) -> Result<Self, TrainingError> {
        let p: Self = serde_json::from_str(s)
            .map_err(|e| TrainingError::Parse(format!("PrecisionPolicy JSON: {e}")))?;
        p.validate()?;
        Ok(p)
    }

    /// TOML text that [`PrecisionPolicy::from_toml_str`] reads back.
    pub fn to_toml_string(&self) -> Result<String, TrainingError> {
        toml::to_string(self)
            .map_err(|e| TrainingError::Parse(format!("PrecisionPolicy TOML: {e}")))
    }

    /// Reads a policy file: JSON when its name ends in `.json`, TOML otherwise; validated.
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self, TrainingError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| TrainingError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let parsed = match path.extension().and_then(|e| e.to_str()) {
            Some("json") => Self::from_json_str(&text),
            _ => Self::from_toml_str(&text),
        };
        parsed.map_err(|e| match e {
            TrainingError::Parse(m) => TrainingError::Parse(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    /// The average nominal bits per weight of `layers` (`(name, weight count)`) under this
    /// policy, weighted by the weight counts (see [`bits_per_weight`]); 0 for no weights.
    ///
    /// ```
    /// use bitnet_training::policy::PrecisionPolicy;
    /// use bitnet_training::QATConfig;
    /// use bitnet_quant::Scheme;
    /// let p = PrecisionPolicy::new(QATConfig::ternary()).rule("big", Some(Scheme::MultiBit { bits: 4 }), None);
    /// // 300 weights at 4 bits and 100 at log2(3) bits.
    /// let avg = p.average_bits([("big", 300), ("small", 100)]);
    /// assert!((avg - (300.0 * 4.0 + 100.0 * 3f64.log2()) / 400.0).abs() < 1e-12);
    /// ```
    pub fn average_bits<'a>(&self, layers: impl IntoIterator<Item = (&'a str, usize)>) -> f64 {
        let (mut bits, mut count) = (0.0, 0usize);
        for (name, n) in layers {
            bits += n as f64 * bits_per_weight(self.config_for(name).weight);
            count += n;
        }
        if count == 0 {
            0.0
        } else {
            bits / count as f64
        }
    }
}

/// The nominal storage cost of one weight under `scheme`, in bits: binary 1, ternary
/// `log2(3)` (about 1.58, what an ideal ternary code spends), multi-bit its `bits`, int8 8, and
/// full precision (`None`) 32. Scales and padding are not counted: a packed file's real size is
/// a separate figure.
pub fn bits_per_weight(scheme: Option<Scheme>) -> f64 {
    match scheme {
        None => 32.0,
        Some(Scheme::Binary { .. } | Scheme::BinaryCentered) => 1.0,
        Some(
            Scheme::TernaryAbsmean | Scheme::TernaryAbsmeanHf | Scheme::TernaryThreshold { .. },
        ) => 3f64.log2(),
        Some(Scheme::MultiBit { bits }) => bits as f64,
        Some(Scheme::Int8PerToken) => 8.0,
    }
}

/// `*` matches any run of characters; everything else matches itself. Iterative with
/// backtracking to the last `*`, so it is linear-ish and never recurses deeply.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if i < p.len() && p[i] == n[j] {
            i += 1;
            j += 1;
        } else if let Some((si, sj)) = star {
            // Let the last `*` swallow one more character and retry.
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_by_hand() {
        let cases = [
            ("fc1", "fc1", true),
            ("fc1", "fc10", false),
            ("fc*", "fc10", true),
            ("*", "", true),
            ("", "", true),
            ("", "a", false),
            ("layers.*.attn", "layers.3.attn", true),
            ("layers.*.attn", "layers.3.mlp", false),
            ("*.mlp.*", "model.layers.0.mlp.up", true),
            ("a*b*c", "abxbc", true),
            ("a*b*c", "abxbd", false),
            ("*ab", "aab", true),
            ("a**", "a", true),
        ];
        for (p, n, want) in cases {
            assert_eq!(glob_match(p, n), want, "{p} vs {n}");
        }
    }

    #[test]
    fn first_and_last_eight_bit_the_rest_ternary() {
        let b8 = Some(Scheme::MultiBit { bits: 8 });
        // The one line of the issue: first and last layer 8-bit, the rest (the default) ternary.
        let text = r#"rules = [{ pattern = "layers.0|layers.5", weight = { MultiBit = { bits = 8 } }, activation = "Int8PerToken" }]"#;
        let p = PrecisionPolicy::from_toml_str(text).unwrap();
        assert_eq!(
            p,
            PrecisionPolicy::new(QATConfig::ternary()).rule(
                "layers.0|layers.5",
                b8,
                Some(Scheme::Int8PerToken)
            )
        );
        for i in 0..6 {
            let want = if i == 0 || i == 5 {
                b8
            } else {
                Some(Scheme::TernaryAbsmean)
            };
            assert_eq!(
                p.config_for(&format!("layers.{i}")).weight,
                want,
                "layer {i}"
            );
        }
        // First match wins; a later broader rule only catches the rest.
        let p = PrecisionPolicy::new(QATConfig::ternary())
            .rule("head", None, None)
            .rule("*", Some(Scheme::Binary { scaled: true }), None);
        assert_eq!(p.config_for("head"), QATConfig::full_precision());
        assert_eq!(
            p.config_for("body").weight,
            Some(Scheme::Binary { scaled: true })
        );
        assert_eq!(p.config_for("body").activation, None);
        // serde round trips.
        assert_eq!(
            PrecisionPolicy::from_toml_str(&p.to_toml_string().unwrap()).unwrap(),
            p
        );
        assert_eq!(
            PrecisionPolicy::from_json_str(&serde_json::to_string(&p).unwrap()).unwrap(),
            p
        );
        let bad = [
            (r#"rules = [{ pattern = "a||b" }]"#, "rules.pattern"),
            (
                r#"rules = [{ pattern = "a", weight = { MultiBit = { bits = 9 } } }]"#,
                "bits",
            ),
            (r#"rules = [{ patern = "a" }]"#, "unknown field"),
        ];
        for (t, field) in bad {
            let e = PrecisionPolicy::from_toml_str(t).unwrap_err().to_string();
            assert!(e.contains(field), "{t}: {e}");
        }
    }

    #[test]
    fn average_bits_weighs_each_layer_by_its_weights() {
        let ternary = 3f64.log2();
        let cases: [(Option<Scheme>, f64); 5] = [
            (None, 32.0),
            (Some(Scheme::Binary { scaled: true }), 1.0),
            (Some(Scheme::TernaryAbsmean), ternary),
            (Some(Scheme::MultiBit { bits: 4 }), 4.0),
            (Some(Scheme::MultiBit { bits: 8 }), 8.0),
        ];
        for (scheme, bits) in cases {
            assert_eq!(bits_per_weight(scheme), bits, "{scheme:?}");
            // One wide layer of 3 weights beside a ternary one of 1 weight.
            let p = PrecisionPolicy::new(QATConfig::ternary()).rule("wide", scheme, None);
            let avg = p.average_bits([("wide", 3), ("rest", 1)]);
            assert!(
                (avg - (3.0 * bits + ternary) / 4.0).abs() < 1e-12,
                "{scheme:?}"
            );
        }
        assert_eq!(PrecisionPolicy::default().average_bits([]), 0.0);
    }

    #[test]
    fn load_reads_toml_and_json_files_and_names_the_file_in_errors() {
        let dir = std::env::temp_dir().join(format!("policy-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = PrecisionPolicy::new(QATConfig::ternary()).rule(
            "*.output.dense",
            Some(Scheme::MultiBit { bits: 4 }),
            Some(Scheme::Int8PerToken),
        );
        let toml_path = dir.join("p.toml");
        std::fs::write(&toml_path, p.to_toml_string().unwrap()).unwrap();
        assert_eq!(PrecisionPolicy::load(&toml_path).unwrap(), p);
        let json_path = dir.join("p.json");
        std::fs::write(&json_path, serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(PrecisionPolicy::load(&json_path).unwrap(), p);
        std::fs::write(&json_path, "{ not json").unwrap();
        let e = PrecisionPolicy::load(&json_path).unwrap_err().to_string();
        assert!(e.contains("p.json"), "{e}");
        let e = PrecisionPolicy::load(dir.join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.toml"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
