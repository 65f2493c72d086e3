//! Choosing the device to train on, and saying what was chosen and why.
//!
//! [`select`] with [`Preference::Auto`] tries CUDA, then Metal, then falls back to the CPU;
//! [`select_with_reason`] returns the same device together with a sentence explaining the choice
//! (which backends were compiled out, which failed to open). Asking explicitly for a backend whose
//! cargo feature is off is an error naming the feature, never a silent CPU fallback.

use candle_core::{Device, DeviceLocation};

use crate::CoreError;

/// Which device the caller wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preference {
    /// CUDA device 0 if available, else Metal device 0, else the CPU.
    #[default]
    Auto,
    /// The host CPU.
    Cpu,
    /// The CUDA device with this ordinal (needs the `cuda` feature).
    Cuda(usize),
    /// The Metal device with this ordinal (needs the `metal` feature).
    Metal(usize),
}

/// The kind of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// Host CPU.
    Cpu,
    /// NVIDIA GPU through CUDA.
    Cuda,
    /// Apple GPU through Metal.
    Metal,
}

/// A description of a device, from [`describe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// What kind of device it is.
    pub kind: DeviceKind,
    /// The GPU ordinal; `None` for the CPU.
    pub ordinal: Option<usize>,
    /// A human-readable name ("cpu (8 threads)", "cuda:0").
    pub name: String,
    /// Whether bitnet's own kernels for this kind of device are compiled in (always true for the
    /// CPU; `cfg!(feature = "cuda")` / `cfg!(feature = "metal")` for GPUs).
    pub gpu_kernels_compiled: bool,
}

/// A chosen device, what it is, and why it was chosen.
#[derive(Debug, Clone)]
pub struct Selection {
    /// The device to use.
    pub device: Device,
    /// Its description.
    pub info: DeviceInfo,
    /// Why this device: for `Auto`, each backend tried before it and why it was passed over.
    pub reason: String,
}

/// Parses the spellings a command line would use: `auto`, `cpu`, `cuda`, `cuda:N`, `metal`,
/// `metal:N` (case-insensitive; no ordinal means device 0).
///
/// ```
/// use bitnet_core::device::Preference;
/// assert_eq!("cuda:1".parse::<Preference>().unwrap(), Preference::Cuda(1));
/// assert!("gpu".parse::<Preference>().is_err());
/// ```
impl std::str::FromStr for Preference {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, CoreError> {
        let bad = || CoreError::InvalidConfig {
            field: "device",
            value: format!("{s:?}"),
            allowed: "auto, cpu, cuda, cuda:N, metal or metal:N",
        };
        let lower = s.trim().to_ascii_lowercase();
        let (kind, ordinal) = match lower.split_once(':') {
            Some((k, n)) => (k, Some(n.parse::<usize>().map_err(|_| bad())?)),
            None => (lower.as_str(), None),
        };
        match (kind, ordinal) {
            ("auto", None) => Ok(Preference::Auto),
            ("cpu", None) => Ok(Preference::Cpu),
            ("cuda", n) => Ok(Preference::Cuda(n.unwrap_or(0))),
            ("metal", n) => Ok(Preference::Metal(n.unwrap_or(0))),
            _ => Err(bad()),
        }
    }
}

/// Opens the preferred device. See [`select_with_reason`] for the explanation of the choice.
pub fn select(preference: Preference) -> candle_core::Result<Device> {
    Ok(select_with_reason(preference)?.device)
}

/// Opens the preferred device and explains the choice.
///
/// Explicit requests fail with [`CoreError::FeatureDisabled`] when the backend is compiled out
/// and [`CoreError::DeviceUnavailable`] when it cannot be opened. `Auto` never fails: it records
/// each skipped backend in `reason` and ends at the CPU.
pub fn select_with_reason(preference: Preference) -> candle_core::Result<Selection> {
    Ok(choose(preference)?)
}

fn choose(preference: Preference) -> Result<Selection, CoreError> {
    match preference {
        Preference::Cpu => Ok(selection(Device::Cpu, "the CPU was requested".to_string())),
        Preference::Cuda(ordinal) => {
            let device = open_cuda(ordinal)?;
            Ok(selection(
                device,
                format!("CUDA device {ordinal} was requested"),
            ))
        }
        Preference::Metal(ordinal) => {
            let device = open_metal(ordinal)?;
            Ok(selection(
                device,
                format!("Metal device {ordinal} was requested"),
            ))
        }
        Preference::Auto => {
            let mut skipped = Vec::new();
            match open_cuda(0) {
                Ok(device) => {
                    return Ok(selection(device, "auto: CUDA device 0 is available".into()))
                }
                Err(e) => skipped.push(skip_reason("CUDA", &e)),
            }
            match open_metal(0) {
                Ok(device) => {
                    let reason =
                        format!("auto: {}; Metal device 0 is available", skipped.join("; "));
                    return Ok(selection(device, reason));
                }
                Err(e) => skipped.push(skip_reason("Metal", &e)),
            }
            let reason = format!("auto: {}; using the CPU", skipped.join("; "));
            Ok(selection(Device::Cpu, reason))
        }
    }
}

/// "cpu (1 thread)", "cpu (8 threads)".
fn cpu_name(threads: usize) -> String {
    match threads {
        1 => "cpu (1 thread)".to_string(),
        t => format!("cpu ({t} threads)"),
    }
}

/// Describes a device: its kind, ordinal, a name, and whether our GPU kernels are compiled in.
pub fn describe(device: &Device) -> DeviceInfo {
    match device.location() {
        DeviceLocation::Cpu => DeviceInfo {
            kind: DeviceKind::Cpu,
            ordinal: None,
            name: cpu_name(candle_core::utils::get_num_threads()),
            gpu_kernels_compiled: true,
        },
        DeviceLocation::Cuda { gpu_id } => DeviceInfo {
            kind: DeviceKind::Cuda,
            ordinal: Some(gpu_id),
            name: format!("cuda:{gpu_id}"),
            gpu_kernels_compiled: cfg!(feature = "cuda"),
        },
        DeviceLocation::Metal { gpu_id } => DeviceInfo {
            kind: DeviceKind::Metal,
            ordinal: Some(gpu_id),
            name: format!("metal:{gpu_id}"),
            gpu_kernels_compiled: cfg!(feature = "metal"),
        },
    }
}

fn selection(device: Device, reason: String) -> Selection {
    let info = describe(&device);
    Selection {
        device,
        info,
        reason,
    }
}

fn skip_reason(name: &str, e: &CoreError) -> String {
    match e {
        CoreError::FeatureDisabled { feature, .. } => {
            format!("{name} skipped (built without the `{feature}` feature)")
        }
        other => format!("{name} skipped (no device found: {other})"),
    }
}

// Our feature, not candle's, decides: candle-core may have CUDA enabled by another crate in the
// build (cargo unifies features) while bitnet's own CUDA kernels are still compiled out.
fn open_cuda(ordinal: usize) -> Result<Device, CoreError> {
    if !cfg!(feature = "cuda") {
        return Err(CoreError::FeatureDisabled {
            device: "CUDA",
            feature: "cuda",
        });
    }
    Device::new_cuda(ordinal).map_err(|e| CoreError::DeviceUnavailable {
        device: "CUDA",
        ordinal,
        reason: e.to_string(),
    })
}

fn open_metal(ordinal: usize) -> Result<Device, CoreError> {
    if !cfg!(feature = "metal") {
        return Err(CoreError::FeatureDisabled {
            device: "Metal",
            feature: "metal",
        });
    }
    Device::new_metal(ordinal).map_err(|e| CoreError::DeviceUnavailable {
        device: "Metal",
        ordinal,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preference_parses_command_line_spellings() {
        let ok = [
            ("auto", Preference::Auto),
            ("cpu", Preference::Cpu),
            (" CPU ", Preference::Cpu),
            ("cuda", Preference::Cuda(0)),
            ("cuda:3", Preference::Cuda(3)),
            ("Metal", Preference::Metal(0)),
            ("metal:1", Preference::Metal(1)),
        ];
        for (text, want) in ok {
            assert_eq!(text.parse::<Preference>().unwrap(), want, "{text:?}");
        }
        for text in [
            "", "gpu", "cuda:", "cuda:x", "cuda:-1", "cpu:0", "auto:1", "cuda:1:2",
        ] {
            let e = text.parse::<Preference>().unwrap_err().to_string();
            assert!(
                e.contains("`device`") && e.contains("cuda:N"),
                "{text:?}: {e}"
            );
        }
    }

    #[test]
    fn cpu_preference_gives_cpu() {
        let s = select_with_reason(Preference::Cpu).unwrap();
        assert!(s.device.is_cpu());
        assert_eq!(s.info.kind, DeviceKind::Cpu);
        assert_eq!(s.info.ordinal, None);
        assert!(s.info.name.starts_with("cpu"), "{}", s.info.name);
        assert!(select(Preference::Cpu).unwrap().is_cpu());
    }

    #[test]
    fn describe_cpu() {
        let info = describe(&Device::Cpu);
        assert_eq!(info.kind, DeviceKind::Cpu);
        assert!(info.gpu_kernels_compiled);
        assert!(info.name.starts_with("cpu ("), "{}", info.name);
        for (threads, name) in [
            (1, "cpu (1 thread)"),
            (2, "cpu (2 threads)"),
            (16, "cpu (16 threads)"),
        ] {
            assert_eq!(cpu_name(threads), name);
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_names_the_feature() {
        let err = select(Preference::Cuda(0)).unwrap_err().to_string();
        assert!(
            err.contains("CUDA requested but bitnet was built without the `cuda` feature"),
            "{err}"
        );
    }

    #[cfg(not(feature = "metal"))]
    #[test]
    fn metal_without_feature_names_the_feature() {
        let err = select(Preference::Metal(1)).unwrap_err().to_string();
        assert!(
            err.contains("Metal requested but bitnet was built without the `metal` feature"),
            "{err}"
        );
    }

    #[cfg(not(any(feature = "cuda", feature = "metal")))]
    #[test]
    fn auto_without_gpu_features_falls_back_to_cpu_and_says_why() {
        let s = select_with_reason(Preference::Auto).unwrap();
        assert!(s.device.is_cpu());
        for part in [
            "CUDA skipped",
            "`cuda` feature",
            "Metal skipped",
            "`metal` feature",
            "CPU",
        ] {
            assert!(
                s.reason.contains(part),
                "reason {:?} lacks {part:?}",
                s.reason
            );
        }
        assert!(select(Preference::Auto).unwrap().is_cpu());
    }

    /// With the `cuda` feature, Auto must pick CUDA when a device opens and say why otherwise.
    #[cfg(feature = "cuda")]
    #[test]
    fn auto_with_cuda_feature_prefers_cuda_or_explains() {
        let s = select_with_reason(Preference::Auto).unwrap();
        match Device::new_cuda(0) {
            Ok(_) => {
                assert!(s.device.is_cuda(), "{}", s.reason);
                assert_eq!(s.info.ordinal, Some(0));
                assert!(s.info.gpu_kernels_compiled);
            }
            Err(_) => assert!(
                s.reason.contains("CUDA skipped (no device found"),
                "{}",
                s.reason
            ),
        }
    }
}
