//! Shakespeare lines as tokenised batches, and sentence embeddings of many lines.

use bitnet::models::bert::BertEncoder;
use candle_core::{Device, Result, Tensor};
use tokenizers::Tokenizer;

/// Lines of at least 5 words, trimmed, in corpus order, without repeats.
pub fn lines(text: &[u8]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    String::from_utf8_lossy(text)
        .lines()
        .map(str::trim)
        .filter(|l| l.split_whitespace().count() >= 5)
        .filter(|l| seen.insert(l.to_string()))
        .map(str::to_string)
        .collect()
}

/// Token ids and mask `[n, len]` (right-padded to the longest line, truncated to `max_len`).
pub fn encode(tok: &Tokenizer, lines: &[&str], max_len: usize) -> Result<(Tensor, Tensor)> {
    let enc = tok
        .encode_batch(lines.to_vec(), true)
        .map_err(|e| candle_core::Error::msg(format!("tokenizer: {e}")))?;
    let ids: Vec<&[u32]> = enc
        .iter()
        .map(|e| {
            let real = e.get_attention_mask().iter().filter(|&&m| m == 1).count();
            &e.get_ids()[..real.min(max_len)]
        })
        .collect();
    let len = ids.iter().map(|i| i.len()).max().unwrap_or(1).max(1);
    let (mut flat, mut mask) = (Vec::new(), Vec::new());
    for i in &ids {
        flat.extend(
            i.iter()
                .copied()
                .chain(std::iter::repeat_n(0, len - i.len())),
        );
        mask.extend((0..len).map(|k| (k < i.len()) as u32));
    }
    let shape = (ids.len(), len);
    Ok((
        Tensor::from_vec(flat, shape, &Device::Cpu)?,
        Tensor::from_vec(mask, shape, &Device::Cpu)?,
    ))
}

/// Embeddings of `lines` in batches of 64, `[n, hidden]`.
pub fn embed_all(
    enc: &BertEncoder,
    tok: &Tokenizer,
    lines: &[&str],
    max_len: usize,
) -> Result<Tensor> {
    let parts = lines
        .chunks(64)
        .map(|c| {
            let (ids, mask) = encode(tok, c, max_len)?;
            Ok(enc.embed(&ids, &mask)?.detach())
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}
