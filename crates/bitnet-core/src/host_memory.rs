//! What the process holds in RAM, for the examples' reports: the peak resident set size.
//!
//! ```
//! let big = vec![1u8; 64 << 20];
//! if let Some(peak) = bitnet_core::host_memory::peak_resident_bytes() {
//!     // The 64 MiB just written are resident, so the high-water mark is at least that.
//!     assert!(peak >= 64 << 20, "{peak}");
//! }
//! # drop(big);
//! ```

/// The process's peak resident set size in bytes (`VmHWM` of `/proc/self/status`), or `None`
/// where the platform does not report it (not Linux) or the file cannot be read.
pub fn peak_resident_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|k| k * 1024)
}

/// The process's current resident set size in bytes (`VmRSS`), or `None` as above.
pub fn resident_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|k| k * 1024)
}

fn status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_kib(&status, key)
}

/// `key   1234 kB` in `/proc/self/status` text.
fn parse_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    let mut words = line[key.len()..].split_whitespace();
    let value = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::parse_kib;

    #[test]
    fn parses_the_status_lines() {
        let status =
            "Name:\tx\nVmPeak:\t  9000 kB\nVmHWM:\t    1234 kB\nVmRSS:\t 17 kB\nBad:\t12 MB\n";
        for (key, want) in [
            ("VmHWM:", Some(1234)),
            ("VmRSS:", Some(17)),
            ("VmPeak:", Some(9000)),
            ("Bad:", None),
            ("Missing:", None),
        ] {
            assert_eq!(parse_kib(status, key), want, "{key}");
        }
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn the_peak_is_at_least_the_current_size() {
        // The current size first: the peak read after it can only be as large or larger, even
        // while other test threads allocate in between.
        let now = super::resident_bytes();
        let peak = super::peak_resident_bytes();
        assert!(peak.unwrap() >= now.unwrap() && now.unwrap() > 0);
    }
}
