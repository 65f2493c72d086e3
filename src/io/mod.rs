//! Model file formats that are not one safetensors file of named tensors: Hugging Face
//! checkpoint directories ([`hf`]) and GGUF files ([`gguf`]).

pub mod gguf;
pub mod hf;
