//! The encoder's block nodes as one graph node: the layers run outside candle's graph and one
//! custom op over the first block's input chains their backwards.
//!
//! Why: candle's backward gives every argument of every node a gradient slot by adding into a
//! zero-filled tensor (`or_insert` then `add`), so each block node's input costs a zero fill and a
//! full activation-sized add per step. Run `12d` of session 12 traced a roberta-base bf16 step at
//! batch 128 on an H200: 73 such adds (candle's `badd_bf16`, at 0.4 of a copy's bandwidth), 12 %
//! of the GPU's time. Chained here, the blocks hand each other their input gradients directly;
//! candle sees one node and adds once.
//!
//! How: `run` turns recording on for the layers' forward, over a detached input. Each block node
//! that would have become a graph node (`block_node::finish`, with a gradient sink in scope)
//! instead computes its output and is kept, with its input, in the recording. When the layers
//! return, the recording must be a chain — the first block's input is the layers' input, each
//! next block's the previous one's output, the last one's output what the layers returned — and
//! then one `Stack` node over the original input gives that output. Anything else (a layer that
//! composed its ops, which over a detached input records no gradient) runs the layers again,
//! ordinarily: correct, and only where the device would not take the block nodes anyway, which
//! `ops::blocks_expected` rules out beforehand.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use std::cell::RefCell;

use crate::model::grad_sink::GradSink;

/// A block's backward as the stack chains it: the gradient of the block's input `x` given that
/// of its output; the parameters' gradients go to the gradient sink.
pub(crate) trait ChainBackward: Send + Sync {
    fn backward(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor>;
}

struct Entry {
    x: Tensor,
    out: candle_core::TensorId,
    node: Box<dyn ChainBackward>,
}

thread_local! {
    static RECORDING: RefCell<Option<Vec<Entry>>> = const { RefCell::new(None) };
    /// Blocks in the last stack this thread made (0: the last `run` made none), for tests.
    static LAST: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The stack's switch: on by default (`RECYCLE_STACK=0` off).
pub static STACK: super::EnvSwitch = super::EnvSwitch::new("RECYCLE_STACK");

/// Turns the stack on or off (on by default); off, every block node is a graph node of its own.
/// `gpu-check` times both.
pub fn set_stack(on: bool) {
    STACK.set(on);
}

/// Whether the stack is on.
pub fn stack_on() -> bool {
    STACK.get()
}

/// How many blocks the last `run` on this thread chained (0: it made no stack).
pub fn last_stack_len() -> usize {
    LAST.with(|c| c.get())
}

/// Whether block nodes are being recorded for a stack on this thread.
pub(crate) fn recording() -> bool {
    RECORDING.with(|r| r.borrow().is_some())
}

/// Keeps a block that ran over `x` and gave `out`, for the stack being recorded.
pub(crate) fn push(x: &Tensor, out: &Tensor, node: Box<dyn ChainBackward>) {
    RECORDING.with(|r| {
        if let Some(entries) = r.borrow_mut().as_mut() {
            entries.push(Entry {
                x: x.clone(),
                out: out.id(),
                node,
            });
        }
    });
}

/// Ends a recording however `run` leaves (an error included).
struct Recording;

impl Recording {
    fn start() -> Self {
        RECORDING.with(|r| *r.borrow_mut() = Some(Vec::new()));
        Recording
    }

    fn take(&self) -> Vec<Entry> {
        RECORDING
            .with(|r| r.borrow_mut().take())
            .unwrap_or_default()
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        RECORDING.with(|r| r.borrow_mut().take());
    }
}

/// `layers` over `x` (the encoder's layers, `x` their input), as one stack node where `x` records
/// a gradient, a gradient sink is in scope, the stack is on and the device takes the block nodes
/// (`ops::blocks_expected`); else `layers(x)` as it is. `layers` may run twice (see the module's
/// documentation).
pub fn run(x: &Tensor, layers: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    LAST.with(|c| c.set(0));
    let stack = stack_on()
        && !recording()
        && x.track_op()
        && GradSink::active().is_some()
        && crate::model::ops::blocks_expected(x);
    if !stack {
        return layers(x);
    }
    let x0 = x.detach();
    let recording = Recording::start();
    let out = layers(&x0)?;
    let entries = recording.take();
    drop(recording);
    let chained = match (entries.first(), entries.last()) {
        (Some(first), Some(last)) => {
            first.x.id() == x0.id()
                && last.out == out.id()
                && entries.windows(2).all(|w| w[1].x.id() == w[0].out)
        }
        _ => false,
    };
    if !chained {
        return layers(x);
    }
    LAST.with(|c| c.set(entries.len()));
    x.apply_op1(Stack { entries, out })
}

/// The layers' output as a node over their input: the forward hands over the output the blocks
/// computed (a copy: a custom op returns new storage), the backward runs the blocks' backwards
/// last to first.
struct Stack {
    entries: Vec<Entry>,
    out: Tensor,
}

impl CustomOp1 for Stack {
    fn name(&self) -> &'static str {
        "recycle-block-stack"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        super::attention_node::cpu_storage_of(&self.out, self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        use candle_core::{bail, Storage};
        // A copy of the output's own elements, wherever its layout starts: the last block's
        // output may be a view into a buffer it shares (the one-pass tail writes `[s | y]` and
        // the output is `y`, past `s`), and candle's `try_clone` copies a whole buffer from its
        // start whatever the layout says (which handed over `s`, the residual sum).
        let (s, l) = self.out.storage_and_layout();
        match &*s {
            Storage::Cuda(c) => {
                let shape = self.out.shape();
                // SAFETY: every element is written by the copy below.
                let mut dst = unsafe { c.device().alloc_uninit(shape, self.out.dtype())? };
                c.copy_strided_src(&mut dst, 0, l)?;
                Ok((dst, shape.clone()))
            }
            _ => bail!("{}: the output is not on a CUDA device", self.name()),
        }
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let mut g = grad.clone();
        for e in self.entries.iter().rev() {
            g = e.node.backward(&e.x, &g)?;
        }
        Ok(Some(g))
    }
}
