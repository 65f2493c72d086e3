//! Metadata values of a GGUF file: [`Value`] and its type tags.

/// A metadata value. Arrays keep their element type so that an empty array writes back as it
/// was read.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7.
    Bool(bool),
    /// Type 8 (UTF-8; invalid bytes are replaced when read).
    String(String),
    /// Type 9: the element type and the elements.
    Array(u32, Vec<Value>),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 12.
    F64(f64),
}

/// The type tag of a string value (also the element type of token lists).
pub const TYPE_STRING: u32 = 8;
/// The type tag of an array value.
pub const TYPE_ARRAY: u32 = 9;

impl Value {
    /// The GGUF type tag.
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => TYPE_STRING,
            Value::Array(..) => TYPE_ARRAY,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// The smallest number of bytes a value of type `t` takes in a file (`None`: unknown type).
    /// Counts read from a header are checked against this before anything is allocated.
    pub fn min_size(t: u32) -> Option<usize> {
        Some(match t {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            TYPE_STRING => 8,
            TYPE_ARRAY => 12,
            _ => return None,
        })
    }

    /// An integer value of any width that fits in `u64` (negative ones do not).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// A number of any type as `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// A string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// A boolean value.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The elements of an array value.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, v) => Some(v),
            _ => None,
        }
    }

    /// An array of strings.
    pub fn strings(v: impl IntoIterator<Item = String>) -> Self {
        Value::Array(TYPE_STRING, v.into_iter().map(Value::String).collect())
    }

    /// An array of f32.
    pub fn f32s(v: impl IntoIterator<Item = f32>) -> Self {
        Value::Array(6, v.into_iter().map(Value::F32).collect())
    }

    /// An array of i32.
    pub fn i32s(v: impl IntoIterator<Item = i32>) -> Self {
        Value::Array(5, v.into_iter().map(Value::I32).collect())
    }
}
