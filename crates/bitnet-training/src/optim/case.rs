//! [`CaseOptimizer`]: routes every parameter to exactly one optimizer.

use std::any::Any;
use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId, Var};
use candle_nn::Optimizer;

use super::state::state_error;
use super::{check, OptimizerState};
use crate::TrainingError;

/// A predicate over `(index in the optimizer's list, var)`, used by [`Selector::Predicate`].
pub type VarPredicate = Box<dyn Fn(usize, &Var) -> bool>;

/// Which parameters a case claims.
pub enum Selector {
    /// These vars (by identity).
    Vars(Vec<Var>),
    /// The vars for which the predicate, given the var's index in the optimizer's list and the var,
    /// returns true.
    Predicate(VarPredicate),
    /// Every var that no other case claims (at most one case may use it).
    Rest,
}

impl Selector {
    /// [`Selector::Predicate`] from a closure.
    pub fn predicate(f: impl Fn(usize, &Var) -> bool + 'static) -> Self {
        Selector::Predicate(Box::new(f))
    }

    /// [`Selector::Vars`].
    pub fn vars(vars: Vec<Var>) -> Self {
        Selector::Vars(vars)
    }
}

impl std::fmt::Debug for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Vars(v) => write!(f, "Vars({} vars)", v.len()),
            Selector::Predicate(_) => write!(f, "Predicate"),
            Selector::Rest => write!(f, "Rest"),
        }
    }
}

/// An optimizer held by a [`CaseOptimizer`], with its concrete type erased.
trait Member: OptimizerState {
    fn step_dyn(&mut self, grads: &GradStore) -> Result<()>;
    fn as_any_mut(&mut self) -> &mut dyn Any;
    fn as_any(&self) -> &dyn Any;
}

impl<T: Optimizer + OptimizerState + 'static> Member for T {
    fn step_dyn(&mut self, grads: &GradStore) -> Result<()> {
        self.step(grads)
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

type Maker = Box<dyn FnOnce(Vec<Var>) -> Result<Box<dyn Member>>>;

/// The cases of a [`CaseOptimizer`]: a name, a [`Selector`] and a constructor of the optimizer that
/// receives the selected vars (in the order of the optimizer's list).
#[derive(Default)]
pub struct Cases {
    cases: Vec<(String, Selector, Maker)>,
}

impl std::fmt::Debug for Cases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.cases.iter().map(|(n, s, _)| (n, s)))
            .finish()
    }
}

impl Cases {
    /// No cases yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a case: the vars `selector` claims go to the optimizer `make` builds.
    pub fn case<O, F>(mut self, name: &str, selector: Selector, make: F) -> Self
    where
        O: Optimizer + OptimizerState + 'static,
        F: FnOnce(Vec<Var>) -> Result<O> + 'static,
    {
        let maker: Maker = Box::new(move |vars| Ok(Box::new(make(vars)?) as Box<dyn Member>));
        self.cases.push((name.to_string(), selector, maker));
        self
    }
}

/// Several optimizers over disjoint sets of parameters, stepped together: e.g. [`Bop`](super::Bop)
/// for binary weights and [`QatAdamW`](super::QatAdamW) for scales, norms and biases.
///
/// Routing rules, checked at construction: every var goes to exactly one case. A var claimed by two
/// cases (`Vars` or `Predicate`) is an error naming its index and shape and both cases; a var claimed
/// by none goes to the one [`Selector::Rest`] case, and without such a case it is an error (so a
/// forgotten parameter never silently stops training). A var listed in a `Vars` selector but not
/// given to the optimizer, a var given twice, two `Rest` cases, and two cases with the same name are
/// errors too.
///
/// ```
/// use bitnet_training::optim::{Bop, CaseOptimizer, Cases, ParamsBop, ParamsQatAdamW, QatAdamW, Selector};
/// use candle_core::{DType, Device, Var};
/// use candle_nn::Optimizer;
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let w = Var::ones((4, 4), DType::F32, &dev)?; // binary weights
/// let b = Var::zeros(4, DType::F32, &dev)?;
/// let cases = Cases::new()
///     .case("bop", Selector::predicate(|_, v| v.rank() == 2), |vars| Bop::new(vars, ParamsBop::default()))
///     .case("adam", Selector::Rest, |vars| QatAdamW::new(vars, ParamsQatAdamW::default()));
/// let mut opt = CaseOptimizer::new(vec![w.clone(), b.clone()], cases)?;
/// let loss = (w.as_tensor().sum_all()? + b.as_tensor().sum_all()?)?;
/// opt.backward_step(&loss)?;
/// assert_eq!(opt.case_mut::<QatAdamW>("adam").map(|o| o.step_count()), Some(1));
/// # Ok(()) }
/// ```
pub struct CaseOptimizer {
    members: Vec<(String, Box<dyn Member>)>,
}

impl std::fmt::Debug for CaseOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaseOptimizer")
            .field("cases", &self.names().collect::<Vec<_>>())
            .finish()
    }
}

fn param_error(index: usize, var: &Var, reason: String) -> candle_core::Error {
    TrainingError::Parameter {
        index,
        shape: var.shape().clone(),
        reason,
    }
    .into()
}

impl CaseOptimizer {
    /// Routes `vars` to the cases (see the type's documentation for the rules) and builds each
    /// case's optimizer.
    pub fn new(vars: Vec<Var>, cases: Cases) -> Result<Self> {
        let mut index_of: HashMap<TensorId, usize> = HashMap::with_capacity(vars.len());
        for (i, var) in vars.iter().enumerate() {
            if index_of.insert(var.as_tensor().id(), i).is_some() {
                return Err(param_error(
                    i,
                    var,
                    "given twice to the CaseOptimizer".to_string(),
                ));
            }
        }
        let mut rest = None;
        for (ci, (name, selector, _)) in cases.cases.iter().enumerate() {
            if cases.cases[..ci].iter().any(|(n, _, _)| n == name) {
                check("Cases.name", name, false, "distinct case names")?;
            }
            if let Selector::Rest = selector {
                if rest.is_some() {
                    check(
                        "Cases.selector",
                        name,
                        false,
                        "at most one Selector::Rest case",
                    )?;
                }
                rest = Some(ci);
            }
        }
        // owner[i] = the case claiming var i.
        let mut owner: Vec<Option<usize>> = vec![None; vars.len()];
        let mut claim = |i: usize, ci: usize| -> Result<()> {
            match owner[i] {
                Some(prev) if prev != ci => Err(param_error(
                    i,
                    &vars[i],
                    format!(
                        "claimed by two cases, `{}` and `{}`",
                        cases.cases[prev].0, cases.cases[ci].0
                    ),
                )),
                _ => {
                    owner[i] = Some(ci);
                    Ok(())
                }
            }
        };
        for (ci, (name, selector, _)) in cases.cases.iter().enumerate() {
            match selector {
                Selector::Vars(listed) => {
                    for (pos, var) in listed.iter().enumerate() {
                        match index_of.get(&var.as_tensor().id()) {
                            Some(&i) => claim(i, ci)?,
                            None => {
                                return Err(param_error(
                                    pos,
                                    var,
                                    format!(
                                        "listed (at this position) in case `{name}` but not given to the CaseOptimizer"
                                    ),
                                ))
                            }
                        }
                    }
                }
                Selector::Predicate(f) => {
                    for (i, var) in vars.iter().enumerate() {
                        if f(i, var) {
                            claim(i, ci)?;
                        }
                    }
                }
                Selector::Rest => {}
            }
        }
        let mut routed: Vec<Vec<Var>> = vec![Vec::new(); cases.cases.len()];
        for (i, var) in vars.into_iter().enumerate() {
            match owner[i].or(rest) {
                Some(ci) => routed[ci].push(var),
                None => {
                    return Err(param_error(
                        i,
                        &var,
                        "claimed by no case (add a Selector::Rest case to catch the rest)"
                            .to_string(),
                    ))
                }
            }
        }
        let members = cases
            .cases
            .into_iter()
            .zip(routed)
            .map(|((name, _, make), vars)| Ok((name, make(vars)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { members })
    }

    /// Steps every case's optimizer with the same gradients.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        for (_, m) in self.members.iter_mut() {
            m.step_dyn(grads)?;
        }
        Ok(())
    }

    /// `loss.backward()` then [`CaseOptimizer::step`].
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    /// The case names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.members.iter().map(|(n, _)| n.as_str())
    }

    /// The optimizer of case `name`, if it exists and has type `O` (to set its learning rate,
    /// apply a schedule, ...).
    pub fn case_mut<O: 'static>(&mut self, name: &str) -> Option<&mut O> {
        self.members
            .iter_mut()
            .find(|(n, _)| n == name)
            .and_then(|(_, m)| m.as_any_mut().downcast_mut::<O>())
    }

    /// The optimizer of case `name`, if it exists and has type `O`.
    pub fn case_ref<O: 'static>(&self, name: &str) -> Option<&O> {
        self.members
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, m)| m.as_any().downcast_ref::<O>())
    }
}

/// Entries: each case's entries prefixed by `"{case name}/"`.
impl OptimizerState for CaseOptimizer {
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, m) in &self.members {
            for (entry, t) in m.state()? {
                out.push((format!("{name}/{entry}"), t));
            }
        }
        Ok(out)
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let mut per_case: Vec<Vec<(String, Tensor)>> = vec![Vec::new(); self.members.len()];
        for (entry, t) in state {
            let slot = entry.split_once('/').and_then(|(case, rest)| {
                self.members
                    .iter()
                    .position(|(n, _)| n == case)
                    .map(|i| (i, rest))
            });
            match slot {
                Some((i, rest)) => per_case[i].push((rest.to_string(), t.clone())),
                None => {
                    return Err(state_error(
                        entry,
                        "names no case of this optimizer".to_string(),
                    ))
                }
            }
        }
        for ((name, m), s) in self.members.iter_mut().zip(per_case) {
            m.load_state(&s)
                .map_err(|e| state_error(&format!("{name}/"), e.to_string()))?;
        }
        Ok(())
    }
}
