//! Optimizer state buffers (moments, momentum) and their export / import as named tensors.
//!
//! A parameter that lives on the CPU in f32 is updated by a fused kernel and keeps its state in a
//! host `Vec<f32>`; any other parameter (another float dtype, or a CUDA / Metal device) is updated
//! by plain tensor ops and keeps its state as a tensor of its own dtype on its own device.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, Var};

use crate::TrainingError;

/// True when `var` takes the fused CPU path.
pub(crate) fn is_fused(var: &Var) -> bool {
    var.device().is_cpu() && var.dtype() == DType::F32
}

/// Checks that every var is a float tensor; the error names the offending index.
pub(crate) fn check_float(vars: &[Var], first_index: usize) -> Result<()> {
    for (i, var) in vars.iter().enumerate() {
        if !var.dtype().is_float() {
            return Err(TrainingError::Parameter {
                index: first_index + i,
                shape: var.shape().clone(),
                reason: format!(
                    "dtype {:?} is not a float type, optimizers update float parameters",
                    var.dtype()
                ),
            }
            .into());
        }
    }
    Ok(())
}

/// One per-element state buffer of a parameter.
#[derive(Debug)]
pub(crate) enum Buf {
    /// Fused path: host f32 elements in the parameter's logical order.
    Host(Vec<f32>),
    /// Tensor-op path: a tensor of the parameter's shape, dtype and device.
    Device(Tensor),
}

impl Buf {
    /// A zero buffer for `var`.
    pub(crate) fn zeros(var: &Var) -> Result<Self> {
        if is_fused(var) {
            Ok(Buf::Host(vec![0f32; var.elem_count()]))
        } else {
            Ok(Buf::Device(var.zeros_like()?))
        }
    }

    /// The buffer as a tensor of `var`'s shape (host buffers become CPU f32 tensors).
    pub(crate) fn to_tensor(&self, var: &Var) -> Result<Tensor> {
        match self {
            Buf::Host(v) => Tensor::from_slice(v, var.shape(), &Device::Cpu),
            Buf::Device(t) => t.copy(),
        }
    }

    /// Replaces the buffer's content by `t`, which must have `var`'s shape.
    pub(crate) fn load(&mut self, entry: &str, t: &Tensor, var: &Var) -> Result<()> {
        check_shape(entry, t, var)?;
        match self {
            Buf::Host(v) => {
                let data = t
                    .to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                v.copy_from_slice(&data);
            }
            Buf::Device(d) => *d = t.to_device(var.device())?.to_dtype(var.dtype())?.copy()?,
        }
        Ok(())
    }
}

/// Errors unless state entry `t` (named `entry`) has `var`'s shape.
pub(crate) fn check_shape(entry: &str, t: &Tensor, var: &Var) -> Result<()> {
    if t.shape() != var.shape() {
        return Err(state_error(
            entry,
            format!("shape {:?}, the parameter has {:?}", t.shape(), var.shape()),
        ));
    }
    Ok(())
}

/// An [`TrainingError::OptimizerState`] as a candle error.
pub(crate) fn state_error(entry: &str, reason: String) -> candle_core::Error {
    TrainingError::OptimizerState {
        entry: entry.to_string(),
        reason,
    }
    .into()
}

/// The step counter as a state entry (a CPU i64 scalar).
pub(crate) fn step_tensor(step: usize) -> Result<Tensor> {
    Tensor::new(step as i64, &Device::Cpu)
}

/// Named state entries being loaded: every entry must be taken exactly once.
pub(crate) struct Entries<'a> {
    map: HashMap<&'a str, &'a Tensor>,
}

impl<'a> Entries<'a> {
    /// Indexes `state` by name; duplicated names are an error.
    pub(crate) fn new(state: &'a [(String, Tensor)]) -> Result<Self> {
        let mut map = HashMap::with_capacity(state.len());
        for (name, t) in state {
            if map.insert(name.as_str(), t).is_some() {
                return Err(state_error(name, "given twice".to_string()));
            }
        }
        Ok(Self { map })
    }

    /// Takes entry `name`, which must be present.
    pub(crate) fn take(&mut self, name: &str) -> Result<&'a Tensor> {
        self.map
            .remove(name)
            .ok_or_else(|| state_error(name, "missing".to_string()))
    }

    /// Takes the step counter stored under `name`.
    pub(crate) fn take_step(&mut self, name: &str) -> Result<usize> {
        let t = self.take(name)?;
        let step = match t.dtype() {
            DType::I64 => t.to_scalar::<i64>()?,
            DType::U32 => t.to_scalar::<u32>()? as i64,
            other => {
                return Err(state_error(
                    name,
                    format!("dtype {other:?}, expected an i64 scalar"),
                ))
            }
        };
        usize::try_from(step).map_err(|_| state_error(name, format!("negative step {step}")))
    }

    /// Errors if an entry was not taken.
    pub(crate) fn finish(self) -> Result<()> {
        match self.map.keys().min() {
            Some(name) => Err(state_error(name, "unknown to this optimizer".to_string())),
            None => Ok(()),
        }
    }
}
