//! The feed-forward: `down(ffn_sub_norm(relu(gate(x))^2 * up(x)))`.

use super::linear::Projection;
use bitnet_quant::RmsNorm;
use candle_core::{Module, Result, Tensor};

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
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.relu()?.sqr()?;
        let h = (gate * self.up_proj.forward(x)?)?;
        self.down_proj.forward(&self.ffn_sub_norm.forward(&h)?)
    }
}
