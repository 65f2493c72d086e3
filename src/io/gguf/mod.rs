//! GGUF files (llama.cpp's format) of BitNet models, in and out.
//!
//! candle 0.11's `quantized::gguf_file` rejects the ternary tensor types ("unknown dtype"), so
//! this module parses GGUF v2/v3 itself and memory-maps the file:
//! * [`GgufFile`] ([`read`]): header, metadata, tensor infos, alignment (`general.alignment`) and
//!   data offsets, every count and size checked against the file's length before anything sized
//!   by it is allocated; [`GgufWriter`] ([`write`]) builds a v3 file.
//! * Tensor types ([`GgmlType`]): TQ1_0, TQ2_0 (llama.cpp) and I2_S (bitnet.cpp) convert to and
//!   from our [`bitnet_quant::PackedTernary`] code for code ([`ternary`]); F32, F16, BF16, Q8_0
//!   and Q6_K are read as llama.cpp dequantizes them, and all but Q6_K written ([`dequant`]).
//! * [`bitnet`]: llama.cpp's `bitnet` architecture. [`GgufModel`] loads a file into a
//!   [`crate::models::bitnet::BitNetForCausalLM`] (packed runtime) with its
//!   [`SpmTokenizer`] ([`tokenizer`]); [`export`] writes a model so that llama.cpp loads it.
//!
//! ```no_run
//! use bitnet::io::gguf::GgufModel;
//! use bitnet::models::bitnet::{generate, GenerateConfig, Runtime};
//! # fn main() -> candle_core::Result<()> {
//! let gguf = GgufModel::open("model-tq2_0.gguf")?;
//! let tok = gguf.tokenizer()?.expect("the file has a tokenizer");
//! let model = gguf.load_model(Runtime::Packed)?;
//! let mut ids: Vec<u32> = tok.bos.into_iter().collect();
//! ids.extend(tok.encode("To be"));
//! let out = generate(&model, &ids, &GenerateConfig::default(), |_| Ok(true))?;
//! println!("{}", tok.decode(&out.tokens, false));
//! # Ok(()) }
//! ```

pub mod bitnet;
pub mod dequant;
pub mod read;
pub mod ternary;
pub mod tokenizer;
pub mod types;
pub mod value;
pub mod write;

pub use bitnet::{export, gguf_name, tokenizer_metadata, ExportOptions, GgufModel};
pub use read::{Bytes, GgufFile, TensorInfo};
pub use tokenizer::SpmTokenizer;
pub use types::GgmlType;
pub use value::Value;
pub use write::GgufWriter;
