//! [`GgufFile`]: a parsed GGUF v2/v3 file (header, metadata, tensor infos) over its bytes.
//!
//! Every count, length, offset and size the header states is checked against the bytes left in
//! the file before anything sized by it is allocated, so that a truncated or corrupt file is an
//! error naming the field, never a panic or a huge allocation.

use super::types::GgmlType;
use super::value::{Value, TYPE_ARRAY, TYPE_STRING};
use crate::error::ModelError;
use std::collections::HashMap;
use std::path::Path;

/// `GGUF` in the file's first four bytes (little-endian).
pub const MAGIC: u32 = 0x4655_4747;
/// The data section's alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;
/// How deep arrays may nest (GGUF files in practice nest none).
const MAX_NESTING: u32 = 3;

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Its name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Its dimensions in ggml's order: `dims[0]` is the row length (innermost).
    pub dims: Vec<u64>,
    /// Its type.
    pub dtype: GgmlType,
    /// Offset of its data from the start of the data section.
    pub offset: u64,
    /// Size of its data in bytes.
    pub size: u64,
}

impl TensorInfo {
    /// The dimensions in candle's (row-major) order: `[rows, row length]` for a matrix.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// The number of weights.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// The bytes of a GGUF file: memory-mapped, or owned (tests, files built in memory).
pub enum Bytes {
    /// A read-only map of the file.
    Mapped(memmap2::Mmap),
    /// Bytes in memory.
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file. See the [module docs](self).
pub struct GgufFile {
    name: String,
    bytes: Bytes,
    version: u32,
    metadata: Vec<(String, Value)>,
    index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    alignment: u64,
    data_start: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// A cursor over the header that checks every read against the bytes left.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

type Res<T> = std::result::Result<T, String>;

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.b.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Res<&'a [u8]> {
        if n > self.left() {
            return Err(format!(
                "{what}: needs {n} bytes at offset {}, the file has {} left (truncated?)",
                self.pos,
                self.left()
            ));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Res<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Res<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &str) -> Res<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    /// A count of items of at least `min_each` bytes each, checked against the bytes left.
    fn count(&mut self, what: &str, min_each: usize) -> Res<usize> {
        let n = self.u64(what)?;
        let max = (self.left() / min_each.max(1)) as u64;
        if n > max {
            return Err(format!(
                "{what} is {n}, but the {} bytes left hold at most {max}",
                self.left()
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Res<String> {
        let n = self.count(what, 1)?;
        Ok(String::from_utf8_lossy(self.take(n, what)?).into_owned())
    }

    fn value(&mut self, t: u32, what: &str, depth: u32) -> Res<Value> {
        Ok(match t {
            0 => Value::U8(self.arr::<1>(what)?[0]),
            1 => Value::I8(self.arr::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.arr(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.arr(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.arr(what)?)),
            7 => match self.arr::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{what}: bool byte is {b}, allowed 0 or 1")),
            },
            TYPE_STRING => Value::String(self.string(what)?),
            TYPE_ARRAY => {
                if depth >= MAX_NESTING {
                    return Err(format!("{what}: arrays nested deeper than {MAX_NESTING}"));
                }
                let et = self.u32(what)?;
                let min = Value::min_size(et).ok_or_else(|| {
                    format!("{what}: unknown array element type {et} (allowed 0..=12)")
                })?;
                let n = self.count(&format!("{what}: array length"), min)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(et, what, depth + 1)?);
                }
                Value::Array(et, v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.arr(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(what)?)),
            t => return Err(format!("{what}: unknown value type {t} (allowed 0..=12)")),
        })
    }
}

/// Bytes a key/value pair takes at least (key length, an empty key, type, one byte).
const MIN_KV: usize = 8 + 4 + 1;
/// Bytes a tensor info takes at least (name length, dims count, one dim, type, offset).
const MIN_TENSOR_INFO: usize = 8 + 4 + 8 + 4 + 8;

impl GgufFile {
    /// Memory-maps and parses `path`.
    pub fn open(path: impl AsRef<Path>) -> candle_core::Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: a read-only map; as with every memory-mapped model loader (candle's
        // safetensors included), this relies on nobody truncating the file while it is mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        Self::parse(path.display().to_string(), Bytes::Mapped(map))
    }

    /// Parses `bytes` (named `name` in errors).
    pub fn parse(name: impl Into<String>, bytes: Bytes) -> candle_core::Result<Self> {
        let name = name.into();
        Self::parse_inner(&name, bytes).map_err(|what| ModelError::checkpoint(name, what).into())
    }

    fn parse_inner(name: &str, bytes: Bytes) -> Res<Self> {
        let mut c = Cursor { b: &bytes, pos: 0 };
        let magic = c.u32("magic")?;
        if magic != MAGIC {
            return Err(format!(
                "not a GGUF file (magic {magic:#010x}, expected \"GGUF\")"
            ));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(format!("GGUF version {version}, supported 2 and 3"));
        }
        let n_tensors = c.count("tensor_count", MIN_TENSOR_INFO)?;
        let n_kv = c.count("metadata_kv_count", MIN_KV)?;
        let mut metadata = Vec::with_capacity(n_kv);
        let mut index = HashMap::with_capacity(n_kv);
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key {i}"))?;
            let t = c.u32(&format!("type of metadata `{key}`"))?;
            let v = c.value(t, &format!("metadata `{key}`"), 0)?;
            if index.insert(key.clone(), metadata.len()).is_some() {
                return Err(format!("metadata key `{key}` appears twice"));
            }
            metadata.push((key, v));
        }
        let alignment = match index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if a.is_power_of_two() => *a as u64,
            Some(v) => {
                return Err(format!(
                    "general.alignment is {v:?}, expected a u32 power of two"
                ))
            }
        };
        let mut tensors = Vec::with_capacity(n_tensors);
        let mut by_name = HashMap::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let tname = c.string(&format!("name of tensor {i}"))?;
            let what = format!("tensor `{tname}`");
            let nd = c.u32(&format!("{what}: n_dims"))?;
            if nd == 0 || nd > MAX_DIMS {
                return Err(format!("{what}: n_dims is {nd}, allowed 1..={MAX_DIMS}"));
            }
            let mut dims = Vec::with_capacity(nd as usize);
            for _ in 0..nd {
                dims.push(c.u64(&format!("{what}: dims"))?);
            }
            let tid = c.u32(&format!("{what}: type"))?;
            let dtype = GgmlType::from_id(tid).ok_or_else(|| {
                format!("{what}: tensor type {tid} is not supported (F32 0, F16 1, Q8_0 8, Q6_K 14, BF16 30, TQ1_0 34, TQ2_0 35, I2_S 36)")
            })?;
            let offset = c.u64(&format!("{what}: offset"))?;
            let elements = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{what}: dims {dims:?} are empty or overflow"))?;
            let size = dtype.tensor_bytes(dims[0], elements).ok_or_else(|| {
                format!(
                    "{what}: row length {} is not a multiple of {}'s block of {} weights",
                    dims[0],
                    dtype,
                    dtype.block_size()
                )
            })?;
            if offset % alignment != 0 {
                return Err(format!(
                    "{what}: offset {offset} is not a multiple of the alignment {alignment}"
                ));
            }
            if by_name.insert(tname.clone(), tensors.len()).is_some() {
                return Err(format!("tensor `{tname}` appears twice"));
            }
            tensors.push(TensorInfo {
                name: tname,
                dims,
                dtype,
                offset,
                size,
            });
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let len = bytes.len() as u64;
        for t in &tensors {
            let end = data_start
                .checked_add(t.offset)
                .and_then(|o| o.checked_add(t.size));
            match end {
                Some(end) if end <= len => {}
                _ => {
                    return Err(format!(
                        "tensor `{}`: data at {} + {} (+{} bytes) lies past the end of the file ({len} bytes; truncated?)",
                        t.name, data_start, t.offset, t.size
                    ))
                }
            }
        }
        Ok(Self {
            name: name.to_string(),
            bytes,
            version,
            metadata,
            index,
            tensors,
            by_name,
            alignment,
            data_start,
        })
    }

    /// The file's name, as errors give it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The data section's alignment.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Every metadata pair, in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// The value of metadata `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// Every tensor's info, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info of tensor `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of tensor `name` (in range: checked when parsed).
    pub fn tensor_bytes(&self, name: &str) -> candle_core::Result<(&TensorInfo, &[u8])> {
        let t = self.tensor_info(name).ok_or_else(|| {
            ModelError::checkpoint(&self.name, format!("missing tensor `{name}`"))
        })?;
        let start = (self.data_start + t.offset) as usize;
        Ok((t, &self.bytes[start..start + t.size as usize]))
    }

    /// An error about this file.
    pub fn err(&self, what: impl Into<String>) -> candle_core::Error {
        ModelError::checkpoint(&self.name, what).into()
    }
}
