//! [`PackedLayer`]: a packed linear of any precision a mixed-precision model uses: binary or
//! ternary ([`PackedBitLinear`]) or 4- and 8-bit ([`PackedMultiBitLinear`]).

use super::linear::PackedBitLinear;
use super::multibit::PackedMultiBitLinear;
use crate::error::invalid;
use crate::scheme::Scheme;
use crate::BitLinear;
use candle_core::{Module, Result, Tensor};

/// One packed linear layer, whichever its weight precision.
///
/// ```
/// use bitnet_quant::packed::PackedLayer;
/// use bitnet_quant::{BitLinear, BitLinearConfig, Estimator, Quantizer, Scheme};
/// use candle_core::{Device, Module, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let w = Tensor::randn(0f32, 1.0, (8, 128), &Device::Cpu)?;
/// for scheme in [Scheme::TernaryAbsmean, Scheme::MultiBit { bits: 4 }] {
///     let config = BitLinearConfig { weight: Quantizer::new(scheme, Estimator::Identity)?, ..Default::default() };
///     let packed = PackedLayer::from_trained(&BitLinear::from_parts(w.clone(), None, None, config))?;
///     assert_eq!(packed.forward(&Tensor::ones((2, 128), candle_core::DType::F32, &Device::Cpu)?)?.dims(), &[2, 8]);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub enum PackedLayer {
    /// Binary (1 bit) or ternary (2 bits) weights.
    Ternary(PackedBitLinear),
    /// 4- or 8-bit weights.
    MultiBit(PackedMultiBitLinear),
}

impl PackedLayer {
    /// Packs a trained layer with the packed form its weight scheme has: multi-bit weights go
    /// to [`PackedMultiBitLinear::from_trained`], binary and ternary ones to
    /// [`PackedBitLinear::from_trained`] (each names what it rejects).
    pub fn from_trained(layer: &BitLinear) -> Result<Self> {
        match layer.config().weight.scheme() {
            Scheme::MultiBit { .. } => {
                Ok(Self::MultiBit(PackedMultiBitLinear::from_trained(layer)?))
            }
            Scheme::Int8PerToken => Err(invalid(
                "weight.scheme",
                "Int8PerToken",
                "a weight scheme (Binary, Ternary*, MultiBit)",
            )
            .into()),
            _ => Ok(Self::Ternary(PackedBitLinear::from_trained(layer)?)),
        }
    }

    /// Bits per stored weight: 1, 2, 4 or 8.
    pub fn bits(&self) -> u8 {
        match self {
            Self::Ternary(l) => l.weight().bits(),
            Self::MultiBit(l) => l.weight().bits(),
        }
    }

    /// `(in, out)` features.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Self::Ternary(l) => l.dims(),
            Self::MultiBit(l) => l.dims(),
        }
    }

    /// Bytes of packed weights and scales (bias and norm weight not included).
    pub fn weight_bytes(&self) -> usize {
        match self {
            Self::Ternary(l) => l.weight().size_bytes(),
            Self::MultiBit(l) => l.weight().size_bytes(),
        }
    }
}

impl Module for PackedLayer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Ternary(l) => l.forward(x),
            Self::MultiBit(l) => l.forward(x),
        }
    }
}
