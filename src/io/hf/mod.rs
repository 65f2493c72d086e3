//! Hugging Face `BitNetForCausalLM` checkpoint directories, in and out.
//!
//! A directory holds `config.json`, the weights as `model.safetensors` or as shards listed by
//! `model.safetensors.index.json`, and usually `tokenizer.json`. The projections come in one of
//! two forms (`quantization_config.quantization_mode`):
//! * **online**: latent weights (bf16, f16 or f32) that transformers ternarizes at every forward
//!   (`linear_class = "autobitlinear"`);
//! * **offline**: the ternary codes packed 4 per byte along the rows (`pack_weights`: byte row
//!   `i`, bits `2j..2j+2` hold original row `j * out / 4 + i`, code = level + 1) plus a
//!   `weight_scale`, which `"autobitlinear"` multiplies the output by (it is `mean|W|`) and the
//!   legacy `"bitlinear"` class divides it by (it is `1 / mean|W|`).
//!
//! * [`HfCheckpoint::open`] memory-maps the safetensors (nothing is copied until a tensor is
//!   used) and checks every tensor's name, dtype and shape against the config before anything
//!   is built, so that a bad file is an error naming the tensor, not a failure halfway through.
//!   [`HfCheckpoint::load_model`] builds the packed (or f32) inference model one tensor at a
//!   time; [`HfCheckpoint::load_varmap`] gives latent f32 weights for training.
//! * `hub::download` (feature `hub`) fetches a repository from the Hugging Face Hub into its
//!   local cache and returns the folder.
//! * [`save`] writes either form (`config.json` and `model.safetensors` through a temporary file
//!   and a rename each), which transformers' `from_pretrained` loads.
//!
//! ```no_run
//! use bitnet::io::hf::HfCheckpoint;
//! use bitnet::models::bitnet::{generate, GenerateConfig, Runtime};
//! # fn main() -> candle_core::Result<()> {
//! let ckpt = HfCheckpoint::open("path/to/bitnet-b1.58-2B-4T")?;
//! let model = ckpt.load_model(Runtime::Packed)?;
//! let out = generate(&model, &[128000, 791, 6864], &GenerateConfig::default(), |_| Ok(true))?;
//! println!("{:?}", out.tokens);
//! # Ok(()) }
//! ```

#[cfg(feature = "hub")]
pub mod hub;
mod load;
mod save;

pub use load::HfCheckpoint;
pub use save::{save, SaveForm};
