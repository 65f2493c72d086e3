//! The feed-forward: `down(ffn_sub_norm(relu(gate(x))^2 * up(x)))` (or `silu(gate(x))`).

use super::linear::Projection;
use super::Config;
use bitnet_quant::RmsNorm;
use candle_core::{Module, Result, Tensor};

/// The gate's activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnAct {
    /// `relu2`: ReLU squared, BitNet b1.58's.
    Relu2,
    /// `silu`: what llama.cpp's `bitnet` graph computes.
    Silu,
}

impl FfnAct {
    /// The activation `cfg.hidden_act` names (a validated config names one of the two).
    pub fn of(cfg: &Config) -> Self {
        match cfg.hidden_act.as_str() {
            "silu" => FfnAct::Silu,
            _ => FfnAct::Relu2,
        }
    }
}

/// BitNet's gated ReLU² feed-forward with its sub-norm (transformers' `BitNetMLP`).
#[derive(Debug)]
pub struct Mlp {
    /// `[hidden -> intermediate]`, through ReLU².
    pub gate_proj: Projection,
    /// `[hidden -> intermediate]`, multiplied in.
    pub up_proj: Projection,
    /// `[intermediate -> hidden]`.
    pub down_proj: Projection,
    /// RMSNorm over the intermediate width, before `down_proj`.
    pub ffn_sub_norm: RmsNorm,
    /// The gate's activation.
    pub act: FfnAct,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        let gate = match self.act {
            FfnAct::Relu2 => gate.relu()?.sqr()?,
            FfnAct::Silu => candle_nn::ops::silu(&gate)?,
        };
        let h = (gate * self.up_proj.forward(x)?)?;
        self.down_proj.forward(&self.ffn_sub_norm.forward(&h)?)
    }
}
