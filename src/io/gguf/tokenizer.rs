//! [`SpmTokenizer`]: the sentencepiece (`tokenizer.ggml.model = "llama"`) tokenizer stored in a
//! GGUF file's metadata, encoding as llama.cpp's `llm_tokenizer_spm` (and sentencepiece's BPE)
//! do: spaces become `▁`, a `▁` is prepended, adjacent pieces are merged best score first
//! (leftmost on ties) while the merged piece is in the vocabulary, and a piece that is not falls
//! back to its bytes (`<0xNN>` tokens).

use super::read::GgufFile;
use super::value::Value;
use candle_core::Result;
use std::collections::{BinaryHeap, HashMap};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TYPE_CONTROL: i32 = 3;
const TYPE_BYTE: i32 = 6;

/// A sentencepiece tokenizer built from GGUF metadata. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct SpmTokenizer {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    ids: HashMap<String, u32>,
    bytes: [Option<u32>; 256],
    /// `tokenizer.ggml.bos_token_id`.
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk: Option<u32>,
    /// Whether a prompt starts with BOS (`tokenizer.ggml.add_bos_token`, default true).
    pub add_bos: bool,
    /// Whether a `▁` is prepended (`tokenizer.ggml.add_space_prefix`, default true).
    pub add_space_prefix: bool,
}

const SPACE: &str = "\u{2581}";

#[derive(PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    len: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // Highest score first, then leftmost.
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl SpmTokenizer {
    /// The tokenizer of `file`, `Ok(None)` when it has no `tokenizer.ggml.model`; an error for a
    /// model other than `llama` or malformed lists.
    pub fn from_gguf(file: &GgufFile) -> Result<Option<Self>> {
        let Some(model) = file.get("tokenizer.ggml.model") else {
            return Ok(None);
        };
        if model.as_str() != Some("llama") {
            return Err(file.err(format!(
                "tokenizer.ggml.model is {model:?}; this reader builds \"llama\" (sentencepiece) tokenizers"
            )));
        }
        let list = |key: &str| -> Result<&[Value]> {
            file.get(key)
                .and_then(Value::as_array)
                .ok_or_else(|| file.err(format!("`{key}` is missing or not an array")))
        };
        let tokens: Vec<String> = list("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| file.err("`tokenizer.ggml.tokens` holds a non-string"))?;
        let n = tokens.len();
        let scores: Vec<f32> = match file.get("tokenizer.ggml.scores") {
            None => vec![0.0; n],
            Some(_) => list("tokenizer.ggml.scores")?
                .iter()
                .map(|v| v.as_f64().map(|x| x as f32))
                .collect::<Option<_>>()
                .ok_or_else(|| file.err("`tokenizer.ggml.scores` holds a non-number"))?,
        };
        let types: Vec<i32> = match file.get("tokenizer.ggml.token_type") {
            None => vec![1; n],
            Some(_) => list("tokenizer.ggml.token_type")?
                .iter()
                .map(|v| match v {
                    Value::I32(t) => Some(*t),
                    v => v.as_u64().map(|t| t as i32),
                })
                .collect::<Option<_>>()
                .ok_or_else(|| file.err("`tokenizer.ggml.token_type` holds a non-integer"))?,
        };
        if scores.len() != n || types.len() != n {
            return Err(file.err(format!(
                "{n} tokens but {} scores and {} token types",
                scores.len(),
                types.len()
            )));
        }
        let id = |key: &str| -> Result<Option<u32>> {
            match file.get(key) {
                None => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(i) if (i as usize) < n => Ok(Some(i as u32)),
                    _ => Err(file.err(format!("`{key}` is {v:?}, expected a token id below {n}"))),
                },
            }
        };
        let flag = |key: &str| file.get(key).and_then(Value::as_bool).unwrap_or(true);
        let mut ids = HashMap::with_capacity(n);
        let mut bytes = [None; 256];
        for (i, t) in tokens.iter().enumerate() {
            ids.entry(t.clone()).or_insert(i as u32);
            if types[i] == TYPE_BYTE {
                if let Some(b) = t
                    .strip_prefix("<0x")
                    .and_then(|h| h.strip_suffix('>'))
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    bytes[b as usize] = Some(i as u32);
                }
            }
        }
        Ok(Some(Self {
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            add_bos: flag("tokenizer.ggml.add_bos_token"),
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix"),
            tokens,
            scores,
            types,
            ids,
            bytes,
        }))
    }

    /// Tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The ids of `text` (without BOS; see [`Self::add_bos`]).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut s = String::with_capacity(text.len() + 3);
        if self.add_space_prefix {
            s.push_str(SPACE);
        }
        s.push_str(&text.replace(' ', SPACE));
        // Symbols as (start, len) byte ranges, linked left and right.
        let starts: Vec<usize> = s.char_indices().map(|(i, _)| i).collect();
        let mut sym: Vec<(usize, usize)> = starts
            .iter()
            .enumerate()
            .map(|(k, &st)| (st, starts.get(k + 1).copied().unwrap_or(s.len()) - st))
            .collect();
        let m = sym.len();
        let mut prev: Vec<Option<usize>> = (0..m).map(|k| k.checked_sub(1)).collect();
        let mut next: Vec<Option<usize>> = (0..m).map(|k| (k + 1 < m).then_some(k + 1)).collect();
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<Bigram>, sym: &[(usize, usize)], l: usize, r: usize| {
            let text = &s[sym[l].0..sym[r].0 + sym[r].1];
            if let Some(&id) = self.ids.get(text) {
                heap.push(Bigram {
                    score: self.scores[id as usize],
                    left: l,
                    len: text.len(),
                });
            }
        };
        for k in 1..m {
            push(&mut heap, &sym, k - 1, k);
        }
        while let Some(b) = heap.pop() {
            let l = b.left;
            let Some(r) = next[l] else { continue };
            // A stale pair: one side already merged into something else.
            if sym[l].1 == 0 || sym[r].1 == 0 || sym[l].1 + sym[r].1 != b.len {
                continue;
            }
            sym[l].1 += sym[r].1;
            sym[r].1 = 0;
            next[l] = next[r];
            if let Some(nr) = next[r] {
                prev[nr] = Some(l);
            }
            if let Some(pl) = prev[l] {
                push(&mut heap, &sym, pl, l);
            }
            if let Some(nl) = next[l] {
                push(&mut heap, &sym, l, nl);
            }
        }
        let mut out = Vec::new();
        let mut k = Some(0);
        while let Some(i) = k {
            let piece = &s[sym[i].0..sym[i].0 + sym[i].1];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        match (self.bytes[b as usize], self.unk) {
                            (Some(id), _) | (None, Some(id)) => out.push(id),
                            (None, None) => {}
                        }
                    }
                }
            }
            k = next[i];
        }
        out
    }

    /// The text of `ids`: byte tokens become their bytes, `▁` a space, control tokens nothing;
    /// the prepended space is dropped when `strip_prefix` (the start of a sequence).
    pub fn decode(&self, ids: &[u32], strip_prefix: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(t) = self.tokens.get(id as usize) else {
                continue;
            };
            match self.types[id as usize] {
                TYPE_CONTROL => {}
                TYPE_BYTE => {
                    if let Some(b) = t
                        .strip_prefix("<0x")
                        .and_then(|h| h.strip_suffix('>'))
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                    {
                        bytes.push(b);
                    }
                }
                _ => bytes.extend_from_slice(t.replace(SPACE, " ").as_bytes()),
            }
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        match (
            strip_prefix && self.add_space_prefix,
            text.strip_prefix(' '),
        ) {
            (true, Some(rest)) => rest.to_string(),
            _ => text,
        }
    }
}
