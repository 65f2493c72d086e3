//! Truncated and corrupted GGUF files give errors, never a panic, and no allocation sized by an
//! unchecked header field: a proptest over truncation points, random bytes anywhere in the
//! header, and chosen fields (counts, string lengths, integer metadata, n_dims, dims, types,
//! offsets) set to arbitrary values. Whatever parses is then loaded as a model and every tensor dequantized.
//!
//! The allocation half: every count is checked against the bytes left before a `Vec` is sized by
//! it, so a field of `u64::MAX` is an error at once. This binary's allocator refuses any request
//! above 512 MiB, which aborts it: a case that sized an allocation by an unchecked field crashes
//! the run instead of passing (it found `bitnet.block_count`, now checked against the tensors).

use bitnet::io::gguf::{Bytes, GgufFile, GgufModel};
use std::alloc::{GlobalAlloc, Layout, System};

/// The largest allocation any case may make: the fixture is 467 KB, and what a valid header may
/// size (rotary tables for `context_length` up to 2^18 positions, dequantized tensors) stays far
/// below this. A larger request fails, which aborts the test binary: a crash, never a pass.
const MAX_ALLOCATION: usize = 512 << 20;

struct Capped;

// SAFETY: forwards to the system allocator, refusing (null) only requests above the cap.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Capped = Capped;
use proptest::prelude::*;
use std::path::Path;

fn fixture() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/gguf/tiny-tq1_0.gguf"),
        )
        .unwrap()
    })
}

/// Offsets of interesting fields in the fixture's header: the counts, and for each metadata
/// pair and tensor info the positions of its length, type and (for tensors) n_dims, dims, type
/// and offset.
fn field_offsets() -> &'static [(usize, usize)] {
    static OFFS: std::sync::OnceLock<Vec<(usize, usize)>> = std::sync::OnceLock::new();
    OFFS.get_or_init(|| {
        let b = fixture();
        let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap());
        let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap());
        let mut out = vec![(8, 8), (16, 8)];
        let n_tensors = u64_at(8) as usize;
        let n_kv = u64_at(16) as usize;
        let mut p = 24;
        fn skip(b: &[u8], p: &mut usize, t: u32, out: &mut Vec<(usize, usize)>) {
            let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap());
            let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap());
            match t {
                0 | 1 | 7 => *p += 1,
                2 | 3 => *p += 2,
                4..=6 => *p += 4,
                10..=12 => *p += 8,
                8 => {
                    out.push((*p, 8));
                    *p += 8 + u64_at(*p) as usize;
                }
                9 => {
                    out.push((*p, 4));
                    out.push((*p + 4, 8));
                    let et = u32_at(*p);
                    let n = u64_at(*p + 4) as usize;
                    *p += 12;
                    for _ in 0..n {
                        skip(b, p, et, out);
                    }
                }
                _ => unreachable!("the fixture is valid"),
            }
        }
        for _ in 0..n_kv {
            out.push((p, 8));
            p += 8 + u64_at(p) as usize;
            out.push((p, 4));
            let t = u32_at(p);
            p += 4;
            // Integer values (hyperparameters, token ids) too.
            match t {
                4 | 5 => out.push((p, 4)),
                10 | 11 => out.push((p, 8)),
                _ => {}
            }
            // Token lists hold hundreds of strings: keep their first entries only.
            let mut inner = Vec::new();
            skip(b, &mut p, t, &mut inner);
            out.extend(inner.into_iter().take(4));
        }
        for _ in 0..n_tensors {
            out.push((p, 8));
            p += 8 + u64_at(p) as usize;
            out.push((p, 4));
            let nd = u32_at(p) as usize;
            p += 4;
            for _ in 0..nd {
                out.push((p, 8));
                p += 8;
            }
            out.push((p, 4));
            out.push((p + 4, 8));
            p += 12;
        }
        out
    })
}

/// Parses `bytes`; whatever parses is loaded and dequantized. Only errors may come out.
fn exercise(bytes: Vec<u8>) {
    let Ok(file) = GgufFile::parse("fuzz", Bytes::Owned(bytes)) else {
        return;
    };
    for t in file.tensors() {
        let _ = file.tensor_bytes(&t.name).unwrap();
    }
    let names: Vec<String> = file.tensors().iter().map(|t| t.name.clone()).collect();
    let Ok(model) = GgufModel::from_file(file) else {
        return;
    };
    for n in names {
        let _ = model.tensor_f32(&n);
    }
    let _ = model
        .tokenizer()
        .map(|t| t.map(|t| t.encode("To be, or not")));
    let _ = model.load_model(bitnet::models::bitnet::Runtime::Packed);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn truncated_files_are_errors(cut in 0usize..=fixture().len()) {
        let bytes = fixture()[..cut].to_vec();
        let res = GgufFile::parse("t", Bytes::Owned(bytes));
        if cut < fixture().len() {
            // The last tensor's data reaches the end of the file: any cut loses some of it.
            prop_assert!(res.is_err(), "a file cut at {cut} parsed");
        }
    }

    #[test]
    fn random_header_bytes_are_errors_or_load(
        edits in prop::collection::vec((0usize..4096, any::<u8>()), 1..8),
    ) {
        let mut bytes = fixture().to_vec();
        for (at, v) in edits {
            let at = at % bytes.len();
            bytes[at] = v;
        }
        exercise(bytes);
    }

    #[test]
    fn corrupted_blocks_are_errors_or_load(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..32),
    ) {
        // Data bytes: codes and f16 scales (NaN, infinities) of the ternary blocks.
        let mut bytes = fixture().to_vec();
        let start = bytes.len() / 2;
        for (i, v) in edits {
            let at = start + i.index(bytes.len() - start);
            bytes[at] = v;
        }
        exercise(bytes);
    }
}

proptest! {
    // Cheap cases (most are errors within the header): enough of them to reach every field.
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn fields_set_to_any_value_are_errors_or_load(
        which in any::<prop::sample::Index>(),
        value in prop_oneof![
            Just(u64::MAX), Just(u64::MAX / 2), Just(1u64 << 40), Just(0u64), Just(1u64),
            0u64..64, any::<u64>(),
        ],
    ) {
        let (at, width) = field_offsets()[which.index(field_offsets().len())];
        let mut bytes = fixture().to_vec();
        bytes[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
        exercise(bytes);
    }
}

#[test]
fn huge_counts_fail_before_allocating() {
    for (at, what) in [(8usize, "tensor_count"), (16, "metadata_kv_count")] {
        let mut bytes = fixture().to_vec();
        bytes[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = GgufFile::parse("t", Bytes::Owned(bytes))
            .unwrap_err()
            .to_string();
        assert!(err.contains(what), "{err}");
    }
    // The first key's length.
    let mut bytes = fixture().to_vec();
    bytes[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
    let err = GgufFile::parse("t", Bytes::Owned(bytes))
        .unwrap_err()
        .to_string();
    assert!(err.contains("metadata key 0"), "{err}");
}
