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
}
