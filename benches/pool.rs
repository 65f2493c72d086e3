//! HybridMemoryPool against the system allocator: allocate a buffer, write every byte, free it.
//!
//! This is the pattern of kernel scratch space. The pool keeps freed blocks (and their already
//! mapped pages) for the next request and does not zero on allocation; `Vec` goes to the system
//! allocator each time. Both sides do the same writes, measured in the same run.

use std::hint::black_box;

use bitnet::core::{Category, HybridMemoryPool, PoolConfig};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn alloc_write_free(c: &mut Criterion) {
    let pool = HybridMemoryPool::new(PoolConfig::default()).expect("default config is valid");
    let mut group = c.benchmark_group("cpu_pool_alloc_write_free");
    // 64 MiB is above glibc's largest dynamic mmap threshold (32 MiB), so there the system
    // allocator maps and unmaps on every iteration; at 16 MiB glibc raises its threshold after the
    // first free and then reuses its own heap, which makes it nearly as warm as the pool.
    let sizes = [
        ("16MiB", 16usize << 20),
        ("64MiB", 64usize << 20),
        ("4KiB", 4usize << 10),
    ];
    for (label, size) in sizes {
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new(label, "pool"), &size, |b, &size| {
            b.iter(|| {
                let mut buf = pool
                    .allocate(size, 64, Category::Scratch)
                    .expect("within the cap");
                buf.as_mut_slice().fill(0xA5);
                black_box(buf.as_slice()[size - 1]);
            })
        });
        group.bench_with_input(BenchmarkId::new(label, "system"), &size, |b, &size| {
            b.iter(|| {
                let mut buf: Vec<u8> = Vec::with_capacity(size);
                buf.resize(size, 0xA5);
                black_box(buf[size - 1]);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, alloc_write_free);
criterion_main!(benches);
