//! Model file formats that are not one safetensors file of named tensors: Hugging Face
//! checkpoint directories ([`hf`]).

pub mod hf;
