//! Inference with packed weights: ternary weights at 2 bits each (binary weights at 1 bit), int8
//! activations, integer dot products and one dequantizing multiply per output.
//!
//! * [`layout`]: [`PackedTernary`], our SIMD-friendly layout and the Hugging Face transformers
//!   layout (`to_hf` / `from_hf`).
//! * [`kernels`]: `sum(code * x)` over packed codes and int8 activations: scalar, AVX2,
//!   AVX-VNNI and AVX-512 VNNI (x86-64, chosen at run time), NEON (aarch64; 2-bit only, 1-bit
//!   runs the scalar kernel there); single products and tiles of rows x tokens.
//! * `matmul`: the blocked product of a [`PackedBitLinear`] from those tiles (register tiles,
//!   token tiles sized for L2, threads over tokens or rows); `act_quant`: the int8
//!   quantization of its input.
//! * [`linear`]: [`PackedBitLinear`], built from a trained [`BitLinear`](crate::BitLinear); its
//!   forward equals the training forward up to f32 rounding.
//! * `cuda` (feature `cuda`): the same forward as CUDA kernels, for a layer moved to a GPU with
//!   [`PackedBitLinear::to_device`]; equal to the CPU forward.
//! * [`multibit`]: [`PackedMultiBit`] / [`PackedMultiBitLinear`], 4- and 8-bit weights with a
//!   scalar integer kernel, for the layers a mixed-precision policy keeps wider than ternary.
//! * [`mixed`]: [`PackedLayer`], either kind of packed linear.
//! * [`io`]: [`save_packed`] / [`load_packed`] (and [`save_packed_layers`] /
//!   [`load_packed_layers`] for mixed precision), a safetensors file with the layout and version
//!   in its metadata, written atomically and checked thoroughly on load.

mod act_quant;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(test)]
mod cuda_emulation;
#[cfg(any(feature = "cuda", test))]
mod gpu_plan;
pub mod io;
pub mod kernels;
pub mod layout;
pub mod linear;
mod matmul;
pub mod mixed;
#[cfg(test)]
mod mma_emulation;
pub mod multibit;

pub use io::{
    load_packed, load_packed_bytes, load_packed_layers, load_packed_layers_bytes, save_packed,
    save_packed_layers, FORMAT, LAYOUT, VERSION,
};
pub use kernels::Kernel;
pub use layout::{HfLinearClass, PackedTernary, BLOCK, BLOCK_BYTES_1BIT};
pub use linear::PackedBitLinear;
pub use mixed::PackedLayer;
pub use multibit::{PackedMultiBit, PackedMultiBitLinear};
