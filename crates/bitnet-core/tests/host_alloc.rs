//! `keep_freed_memory` changes where glibc serves large blocks from and whether it trims the heap.
//! The only test in its own process, so that glibc's dynamic thresholds start from their defaults.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn large_blocks_come_from_the_heap_and_stay_there() {
    use std::hint::black_box;
    // SAFETY: `mallinfo2` only reads allocator statistics.
    let info = || unsafe { libc::mallinfo2() };

    // Before: glibc's default threshold (128 KiB) sends 8 MiB to its own mmap.
    let before = info().hblks;
    let first: Vec<u8> = black_box(Vec::with_capacity(8 << 20));
    assert_eq!(
        info().hblks,
        before + 1,
        "8 MiB should be mmapped by default"
    );

    assert!(bitnet_core::host_alloc::keep_freed_memory());
    let second: Vec<u8> = black_box(Vec::with_capacity(16 << 20));
    assert_eq!(
        info().hblks,
        before + 1,
        "16 MiB should come from the heap once tuned"
    );

    // Freed at the top of the heap: kept as free heap memory instead of trimmed back to the kernel.
    let free_before = info().fordblks;
    drop(second);
    let kept = info().fordblks - free_before;
    assert!(kept >= 16 << 20, "{kept} bytes kept after freeing 16 MiB");
    drop(first);
    assert_eq!(info().hblks, before);
}
