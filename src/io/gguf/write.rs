//! [`GgufWriter`]: builds a GGUF v3 file (metadata, then tensors at aligned offsets) and writes
//! it through a temporary file and a rename.

use super::read::{DEFAULT_ALIGNMENT, MAGIC};
use super::types::GgmlType;
use super::value::Value;
use crate::error::ModelError;
use std::io::Write;
use std::path::Path;

/// A GGUF file being built: metadata pairs and tensors, in the order they are added.
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_str(out, s),
        Value::Array(t, items) => {
            out.extend_from_slice(&t.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) metadata `key`.
    pub fn set(&mut self, key: impl Into<String>, v: Value) {
        let key = key.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = v,
            None => self.metadata.push((key, v)),
        }
    }

    /// Adds tensor `name` with `shape` in candle's order (`[rows, row length]`) and its encoded
    /// bytes; the size must be what `dtype` takes for that shape.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        dtype: GgmlType,
        bytes: Vec<u8>,
    ) -> candle_core::Result<()> {
        let name = name.into();
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let elements: u64 = dims.iter().product();
        let want = dims
            .first()
            .and_then(|&row| dtype.tensor_bytes(row, elements));
        if want != Some(bytes.len() as u64) {
            candle_core::bail!(
                "GGUF tensor `{name}`: {} bytes for {dtype} {shape:?}, expected {want:?}",
                bytes.len()
            );
        }
        self.tensors.push((name, dims, dtype, bytes));
        Ok(())
    }

    /// The whole file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = DEFAULT_ALIGNMENT;
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        let has_align = self.metadata.iter().any(|(k, _)| k == "general.alignment");
        let n_kv = self.metadata.len() + usize::from(!has_align);
        out.extend_from_slice(&(n_kv as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut out, v);
        }
        if !has_align {
            put_str(&mut out, "general.alignment");
            out.extend_from_slice(&4u32.to_le_bytes());
            out.extend_from_slice(&(align as u32).to_le_bytes());
        }
        let mut offset = 0u64;
        for (name, dims, dtype, bytes) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&dtype.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + bytes.len() as u64).div_ceil(align) * align;
        }
        let pad = |out: &mut Vec<u8>| {
            let n = (out.len() as u64).div_ceil(align) * align;
            out.resize(n as usize, 0);
        };
        pad(&mut out);
        for (_, _, _, bytes) in &self.tensors {
            out.extend_from_slice(bytes);
            pad(&mut out);
        }
        out
    }

    /// Writes the file to `path` (a temporary file beside it, then a rename).
    pub fn write(&self, path: impl AsRef<Path>) -> candle_core::Result<()> {
        let path = path.as_ref();
        let tmp = path.with_extension("gguf.tmp");
        let res = std::fs::File::create(&tmp).and_then(|mut f| {
            f.write_all(&self.to_bytes())?;
            f.sync_all()
        });
        res.map_err(|e| ModelError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))?;
        Ok(())
    }
}
