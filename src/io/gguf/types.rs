//! [`GgmlType`]: the tensor types this module reads (and which of them it writes), with their
//! block sizes as llama.cpp's `ggml-common.h` defines them.

/// A tensor type of a GGUF file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 4-byte floats.
    F32,
    /// IEEE half floats.
    F16,
    /// bfloat16.
    BF16,
    /// Blocks of 32: an f16 scale and 32 `i8` (34 bytes).
    Q8_0,
    /// Blocks of 256 in 16 groups of 16: 6-bit quants, `i8` group scales, an f16 super-scale
    /// (210 bytes). Read only (embeddings).
    Q6K,
    /// Ternary, blocks of 256: 240 trits 5 per byte, 16 trits 4 per byte, an f16 scale
    /// (54 bytes, 1.6875 bits per weight).
    TQ1_0,
    /// Ternary, blocks of 256: 2-bit codes `level + 1`, an f16 scale (66 bytes).
    TQ2_0,
    /// bitnet.cpp's ternary type: 2-bit codes in 128-weight blocks over the flattened tensor and
    /// one f32 scale for the tensor, stored after the codes in a 32-byte tail.
    I2S,
}

impl GgmlType {
    /// The type of GGUF tag `id` (`None`: one this module does not read).
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            8 => Self::Q8_0,
            14 => Self::Q6K,
            30 => Self::BF16,
            34 => Self::TQ1_0,
            35 => Self::TQ2_0,
            // bitnet.cpp's ggml (3rdparty/llama.cpp, ggml.h): GGML_TYPE_I2_S = 36. Upstream
            // llama.cpp has no type 36 and cannot load these tensors.
            36 => Self::I2S,
            _ => return None,
        })
    }

    /// The GGUF tag.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 8,
            Self::Q6K => 14,
            Self::BF16 => 30,
            Self::TQ1_0 => 34,
            Self::TQ2_0 => 35,
            Self::I2S => 36,
        }
    }

    /// Weights per block (a row's length must be a multiple of it).
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q8_0 => 32,
            Self::Q6K | Self::TQ1_0 | Self::TQ2_0 => 256,
            Self::I2S => 128,
        }
    }

    /// Bytes per block (for I2_S, per 128 weights, without the tensor's 32-byte tail).
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q8_0 => 34,
            Self::Q6K => 210,
            Self::TQ1_0 => 54,
            Self::TQ2_0 => 66,
            Self::I2S => 32,
        }
    }

    /// Bytes of a tensor of `elements` weights whose rows are `row` long, or `None` when the row
    /// is not a whole number of blocks or the size overflows.
    pub fn tensor_bytes(self, row: u64, elements: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if row == 0 || row % bs != 0 {
            return None;
        }
        let body = (elements / bs).checked_mul(self.block_bytes() as u64)?;
        match self {
            Self::I2S => body.checked_add(32),
            _ => Some(body),
        }
    }

    /// Whether the type holds ternary codes (loaded as packed weights).
    pub fn is_ternary(self) -> bool {
        matches!(self, Self::TQ1_0 | Self::TQ2_0 | Self::I2S)
    }

    /// The lower-case name llama.cpp prints (`tq2_0`, `i2_s`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q6K => "q6_k",
            Self::TQ1_0 => "tq1_0",
            Self::TQ2_0 => "tq2_0",
            Self::I2S => "i2_s",
        }
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
