//! Mixed precision's forward: f32 master weights, the passes in a narrower dtype.
//!
//! Each forward of a `CastingModel` hands the architecture a copy of every weight cast to the
//! compute dtype (a recorded cast, so that the graph's gradient reaches the f32 `Var`) and builds
//! the architecture over them. On a GPU a cast is an allocation and a launch, about two hundred a
//! roberta-base forward, most of them for weights that no op reads: while training with a gradient
//! sink (`grad_sink`), the block nodes and the embedding node gather their weights from the masters
//! themselves, cast on the way, and deposit the gradients with the sink. So once a drained step
//! shows which masters the nodes took (`GradSink::claimed`), later forwards hand those over as they
//! are, uncast; only the others (the head, the embeddings' layer norm, whatever the graph
//! differentiates) are cast. A layer that meets an uncast master anyway casts it where it uses it
//! (`layers`), so its gradient still reaches the master through the graph: never lost, only one
//! launch dearer.

use super::grad_sink::GradSink;
use super::{ArchConfig, SequenceClassifier};
use super::{Batch, Mode};
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether claimed masters are handed over uncast (on by default): `gpu-check` turns it off to
/// time training with every weight cast, in the same run.
static UNCAST_CLAIMED: AtomicBool = AtomicBool::new(true);

/// Turns the handing over of claimed masters uncast on or off for the whole process.
pub fn set_uncast_claimed(on: bool) {
    UNCAST_CLAIMED.store(on, Ordering::Relaxed);
}

/// Whether claimed masters are handed over uncast (`set_uncast_claimed`).
pub fn uncast_claimed() -> bool {
    UNCAST_CLAIMED.load(Ordering::Relaxed)
}

thread_local! {
    /// Weights the last forward built on this thread handed over cast and uncast.
    static LAST_BUILD: std::cell::Cell<(usize, usize)> = const { std::cell::Cell::new((0, 0)) };
}

/// How many weights the last `CastingModel` forward on this thread cast, and how many it handed
/// over uncast: for checks that must know which way a forward went.
pub fn last_build() -> (usize, usize) {
    LAST_BUILD.with(|c| c.get())
}

/// A model that computes in a narrower dtype than its f32 master weights (see the module's
/// documentation).
pub(super) struct CastingModel {
    pub(super) varmap: VarMap,
    pub(super) arch_config: ArchConfig,
    pub(super) num_labels: usize,
    pub(super) compute: DType,
    pub(super) device: Device,
}

impl CastingModel {
    fn build(&self, detach: bool) -> Result<Box<dyn SequenceClassifier>> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        let mut tensors = HashMap::with_capacity(data.len());
        // A gradient sink in scope learns each cast's master, so that the nodes can hand their
        // weights' gradients to the f32 `Var`s directly; the masters it has seen them take are
        // handed over as they are.
        let sink = (!detach).then(GradSink::active).flatten();
        let uncast_ok = uncast_claimed();
        let (mut cast, mut uncast) = (0, 0);
        for (name, var) in data.iter() {
            let master = var.as_tensor();
            if let Some(sink) = sink.as_ref().filter(|s| uncast_ok && s.claimed(master)) {
                debug_assert!(sink.masters_of(&[master])?.is_some());
                tensors.insert(name.clone(), master.clone());
                uncast += 1;
                continue;
            }
            let t = if detach {
                master.detach()
            } else {
                master.clone()
            };
            let copy = t.to_dtype(self.compute)?;
            if let Some(sink) = &sink {
                sink.alias(&copy, master)?;
            }
            tensors.insert(name.clone(), copy);
            cast += 1;
        }
        drop(data);
        LAST_BUILD.with(|c| c.set((cast, uncast)));
        let backend = AsHanded(tensors);
        let vb = VarBuilder::from_backend(Box::new(backend), self.compute, self.device.clone());
        self.arch_config.build(vb, self.num_labels)
    }
}

impl SequenceClassifier for CastingModel {
    fn forward(&self, batch: &Batch, mode: Mode) -> Result<Tensor> {
        self.build(false)?.forward(batch, mode)
    }
    fn hidden_states(&self, batch: &Batch) -> Result<Vec<Tensor>> {
        self.build(true)?.hidden_states(batch)
    }
}

/// The weights of one forward by name, handed out in the dtype they were put in (a cast or an
/// uncast master; candle's own map would cast the masters, one launch each).
struct AsHanded(HashMap<String, Tensor>);

impl AsHanded {
    fn find(&self, name: &str) -> Result<&Tensor> {
        self.0.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("mixed precision: no weight named {name}"))
        })
    }
}

impl SimpleBackend for AsHanded {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        _: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let t = self.get_unchecked(name, DType::F32, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "mixed precision: weight {name} has shape {:?}, the model asks for {:?}",
                t.dims(),
                s.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _: DType, dev: &Device) -> Result<Tensor> {
        let t = self.find(name)?;
        if !t.device().same_device(dev) {
            candle_core::bail!("mixed precision: weight {name} is on another device");
        }
        Ok(t.clone())
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}
