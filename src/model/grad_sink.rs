//! Gradients handed by a graph node straight to the trainable weights, past candle's graph.
//!
//! candle's backward gives every tensor on the way from a node to a `Var` its own gradient entry:
//! each entry starts as a zero-filled tensor that the incoming gradient is added to, so a weight
//! that reaches a block node through a cast, a flatten and a concatenation costs about ten launches
//! and three full passes over its size per step, before the node's product has even started. A
//! block node (`kernels::block_node`) built while a sink is in scope (`GradSink::scope`) packs
//! detached copies of its weights instead and, in its backward, deposits each weight's gradient
//! here, keyed by the weight's master `Var`; `GradSink::backward` runs candle's backward and then
//! adds the deposits into the returned `GradStore`, so the optimizer sees the same store either
//! way (`cargo test --test it grad_sink` checks it on the fixtures).
//!
//! A weight is known to the sink by its master's tensor (a `Var` of the `VarMap` it was made from)
//! or by a tensor registered as a plain copy of one (`alias`: the bf16 casts of
//! `model::casting`). A node whose weights are not all known, or whose input records no
//! gradient, keeps them in the graph as before.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId};
use candle_nn::VarMap;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Inner {
    /// The masters, by id.
    masters: HashMap<TensorId, Tensor>,
    /// Copies of masters registered during the current forward, by id: their masters.
    aliases: HashMap<TensorId, Tensor>,
    /// Deposited gradients by master id, in the master's dtype and shape.
    grads: HashMap<TensorId, Tensor>,
    /// Masters that a drained step had deposits for: the nodes take them from the sink, so the
    /// next forward may hand them over uncast (`claimed`).
    claimed: HashSet<TensorId>,
}

/// Where block nodes deposit their weights' gradients during one forward and backward (cheap to
/// clone: a shared handle).
#[derive(Clone, Default)]
pub struct GradSink(Arc<Mutex<Inner>>);

thread_local! {
    static ACTIVE: RefCell<Option<GradSink>> = const { RefCell::new(None) };
}

/// Whether sinks in scope are offered to the block nodes (on by default): `gpu-check` turns it
/// off to measure training without them in the same run.
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the gradient sinks on or off for the whole process (off: `active` answers `None`, and
/// every gradient flows back through the graph).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the gradient sinks are on (`set_enabled`).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

impl GradSink {
    /// A sink for the `Var`s of `varmap`.
    pub fn new(varmap: &VarMap) -> Result<Self> {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        Self::for_masters(data.values().map(|v| v.as_tensor()))
    }

    /// A sink for these master tensors.
    pub fn for_masters<'a>(masters: impl IntoIterator<Item = &'a Tensor>) -> Result<Self> {
        let sink = GradSink::default();
        {
            let mut inner = sink.lock()?;
            for m in masters {
                inner.masters.insert(m.id(), m.clone());
            }
        }
        Ok(sink)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("gradient sink lock poisoned".into()))
    }

    /// The sink in scope on this thread, if any (what a block node being built asks).
    pub fn active() -> Option<GradSink> {
        if !enabled() {
            return None;
        }
        ACTIVE.with(|a| a.borrow().clone())
    }

    /// Runs `f` (a forward pass) with this sink in scope on this thread; the sink in scope before
    /// is restored afterwards, also when `f` fails or panics.
    pub fn scope<T>(&self, f: impl FnOnce() -> T) -> T {
        struct Restore(Option<GradSink>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let previous = self.0.take();
                ACTIVE.with(|a| *a.borrow_mut() = previous);
            }
        }
        let _restore = Restore(ACTIVE.with(|a| a.borrow_mut().replace(self.clone())));
        f()
    }

    /// Registers `copy` (a cast of `master`, a tensor the sink knows) as standing for `master`.
    pub fn alias(&self, copy: &Tensor, master: &Tensor) -> Result<()> {
        let mut inner = self.lock()?;
        if let Some(m) = inner.masters.get(&master.id()).cloned() {
            inner.aliases.insert(copy.id(), m);
        }
        Ok(())
    }

    /// The masters of `tensors`, in order, when every one of them is known.
    pub fn masters_of(&self, tensors: &[&Tensor]) -> Result<Option<Vec<Tensor>>> {
        let inner = self.lock()?;
        Ok(tensors
            .iter()
            .map(|t| {
                let id = t.id();
                inner.masters.get(&id).or(inner.aliases.get(&id)).cloned()
            })
            .collect())
    }

    /// Adds `grad` (any float dtype; `master`'s number of elements) to `master`'s deposit.
    pub fn deposit(&self, master: &Tensor, grad: &Tensor) -> Result<()> {
        let grad = grad.to_dtype(master.dtype())?.reshape(master.shape())?;
        let mut inner = self.lock()?;
        let sum = match inner.grads.remove(&master.id()) {
            Some(old) => (old + grad)?,
            None => grad,
        };
        inner.grads.insert(master.id(), sum);
        Ok(())
    }

    /// candle's backward from `loss`, with this sink's deposits (made during it) added in; the
    /// deposits are taken, so the sink is empty afterwards and can serve the next step.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut store = loss.backward()?;
        self.drain_into(&mut store)?;
        Ok(store)
    }

    /// Adds the deposits into `store` and empties them; forgets the aliases (the next forward
    /// registers its own).
    pub fn drain_into(&self, store: &mut GradStore) -> Result<()> {
        let mut inner = self.lock()?;
        inner.aliases.clear();
        let grads = std::mem::take(&mut inner.grads);
        inner.claimed.extend(grads.keys().copied());
        for (id, grad) in grads {
            let master =
                inner.masters.get(&id).cloned().ok_or_else(|| {
                    candle_core::Error::Msg("gradient sink: unknown master".into())
                })?;
            let sum = match store.remove(&master) {
                Some(g) => (g + grad)?,
                None => grad,
            };
            store.insert(&master, sum);
        }
        Ok(())
    }

    /// Whether a step drained from this sink had a deposit for `master`: a node took the master's
    /// gradient from the sink instead of the graph, and gathers its weights from the master
    /// itself, so a mixed-precision forward need not cast it (`model::casting`).
    pub fn claimed(&self, master: &Tensor) -> bool {
        self.0
            .lock()
            .is_ok_and(|i| i.claimed.contains(&master.id()))
    }

    /// How many masters are `claimed`.
    pub fn claimed_count(&self) -> usize {
        self.0.lock().map_or(0, |i| i.claimed.len())
    }

    /// How many gradients are deposited and not yet drained.
    pub fn pending(&self) -> usize {
        self.0.lock().map_or(0, |i| i.grads.len())
    }

    /// How many copies of masters are registered (until the next drain).
    pub fn aliases(&self) -> usize {
        self.0.lock().map_or(0, |i| i.aliases.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn deposits_reach_the_store_added_to_the_graphs_own() {
        let dev = Device::Cpu;
        let w = Var::new(&[1f32, 2.0, 3.0], &dev).unwrap();
        let sink = GradSink::for_masters([w.as_tensor()]).unwrap();
        let cast = w.as_tensor().to_dtype(DType::BF16).unwrap();
        sink.alias(&cast, w.as_tensor()).unwrap();
        let [m] = sink
            .masters_of(&[&cast])
            .unwrap()
            .unwrap()
            .try_into()
            .unwrap();
        assert_eq!(m.id(), w.as_tensor().id());
        // The graph's own gradient of w is 2 per element; the deposits add 0.5 and 0.25.
        let loss = (w.as_tensor() * 2.0).unwrap().sum_all().unwrap();
        let half = Tensor::new(&[0.5f32, 0.5, 0.5], &dev)
            .unwrap()
            .to_dtype(DType::BF16);
        sink.deposit(&m, &half.unwrap()).unwrap();
        sink.deposit(&m, &Tensor::new(&[0.25f32; 3], &dev).unwrap())
            .unwrap();
        assert_eq!(sink.pending(), 1);
        let store = sink.backward(&loss).unwrap();
        let g: Vec<f32> = store.get(w.as_tensor()).unwrap().to_vec1().unwrap();
        assert_eq!(g, vec![2.75; 3]);
        assert_eq!((sink.pending(), sink.aliases()), (0, 0));
    }

    #[test]
    fn a_master_is_claimed_once_a_drained_step_had_its_deposit() {
        let dev = Device::Cpu;
        let (w, u) = (
            Var::new(&[1f32, 2.0], &dev).unwrap(),
            Var::new(&[3f32], &dev).unwrap(),
        );
        let sink = GradSink::for_masters([w.as_tensor(), u.as_tensor()]).unwrap();
        sink.deposit(w.as_tensor(), &Tensor::new(&[1f32, 1.0], &dev).unwrap())
            .unwrap();
        // Deposited but not yet drained: not claimed.
        assert!(!sink.claimed(w.as_tensor()));
        let loss = (u.as_tensor() * 2.0).unwrap().sum_all().unwrap();
        sink.backward(&loss).unwrap();
        assert!(sink.claimed(w.as_tensor()));
        // `u`'s gradient came through the graph.
        assert!(!sink.claimed(u.as_tensor()));
        assert_eq!(sink.claimed_count(), 1);
        // A later step without a deposit for `w` keeps it claimed.
        sink.backward(&loss).unwrap();
        assert_eq!(sink.claimed_count(), 1);
    }

    #[test]
    fn an_unknown_tensor_has_no_master_and_scope_restores() {
        let dev = Device::Cpu;
        let w = Var::new(&[1f32], &dev).unwrap();
        let other = Tensor::new(&[1f32], &dev).unwrap();
        let sink = GradSink::for_masters([w.as_tensor()]).unwrap();
        assert!(sink.masters_of(&[w.as_tensor(), &other]).unwrap().is_none());
        assert!(GradSink::active().is_none());
        let inner = sink.scope(|| GradSink::active().map(|s| s.pending()));
        assert_eq!(inner, Some(0));
        assert!(GradSink::active().is_none());
    }
}
