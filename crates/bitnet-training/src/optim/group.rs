//! Parameter groups: subsets of the parameters with their own learning rate, weight decay and
//! latent-weight clipping.

use candle_core::{Result, Var};

use super::check;

/// A set of parameters updated with their own hyper-parameters.
///
/// The effective learning rate of a group is `optimizer lr * lr_scale` and its weight decay is
/// `optimizer weight_decay * weight_decay_scale`, so that a learning-rate or weight-decay schedule
/// applied to the optimizer moves every group together while keeping their ratios. Typical QAT
/// setup: latent quantized weights (scale 1, weight decay, clipping to `[-1, 1]`), quantizer scales
/// and temperatures (smaller lr, no weight decay), full-precision norms and biases (no weight decay).
///
/// ```
/// use bitnet_training::optim::ParamGroup;
/// use candle_core::{DType, Device, Var};
/// # fn main() -> candle_core::Result<()> {
/// let w = Var::zeros((4, 4), DType::F32, &Device::Cpu)?;
/// let s = Var::ones(1, DType::F32, &Device::Cpu)?;
/// let latent = ParamGroup::new(vec![w]).clip(1.0);
/// let scales = ParamGroup::new(vec![s]).lr_scale(0.1).no_weight_decay();
/// assert_eq!(latent.get_clip(), Some(1.0));
/// assert_eq!(scales.get_lr_scale(), 0.1);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct ParamGroup {
    pub(crate) vars: Vec<Var>,
    pub(crate) lr_scale: f64,
    pub(crate) weight_decay_scale: f64,
    pub(crate) clip: Option<f32>,
}

impl ParamGroup {
    /// A group of `vars` with the optimizer's own learning rate and weight decay, and no clipping.
    pub fn new(vars: Vec<Var>) -> Self {
        Self {
            vars,
            lr_scale: 1.0,
            weight_decay_scale: 1.0,
            clip: None,
        }
    }

    /// Multiplies the optimizer's learning rate for this group (>= 0, finite).
    pub fn lr_scale(mut self, scale: f64) -> Self {
        self.lr_scale = scale;
        self
    }

    /// Multiplies the optimizer's weight decay for this group (>= 0, finite).
    pub fn weight_decay_scale(mut self, scale: f64) -> Self {
        self.weight_decay_scale = scale;
        self
    }

    /// No weight decay for this group (`weight_decay_scale(0.0)`).
    pub fn no_weight_decay(self) -> Self {
        self.weight_decay_scale(0.0)
    }

    /// Clips the parameters to `[-c, c]` after every step (BinaryConnect latent weights; c > 0).
    pub fn clip(mut self, c: f32) -> Self {
        self.clip = Some(c);
        self
    }

    /// The group's parameters.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The learning-rate multiplier.
    pub fn get_lr_scale(&self) -> f64 {
        self.lr_scale
    }

    /// The weight-decay multiplier.
    pub fn get_weight_decay_scale(&self) -> f64 {
        self.weight_decay_scale
    }

    /// The clipping bound, if any.
    pub fn get_clip(&self) -> Option<f32> {
        self.clip
    }

    /// Checks the multipliers and the clipping bound.
    pub fn validate(&self) -> Result<()> {
        check(
            "ParamGroup.lr_scale",
            self.lr_scale,
            self.lr_scale >= 0.0 && self.lr_scale.is_finite(),
            "finite, >= 0",
        )?;
        check(
            "ParamGroup.weight_decay_scale",
            self.weight_decay_scale,
            self.weight_decay_scale >= 0.0 && self.weight_decay_scale.is_finite(),
            "finite, >= 0",
        )?;
        if let Some(c) = self.clip {
            check(
                "ParamGroup.clip",
                c,
                c > 0.0 && c.is_finite(),
                "finite, > 0",
            )?;
        }
        Ok(())
    }
}
