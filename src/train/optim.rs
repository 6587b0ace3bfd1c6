//! AdamW as `torch.optim.AdamW` (decoupled weight decay, bias correction) with global-norm gradient
//! clipping, over the named `Var`s of a `VarMap`. Pure tensor code: a fused in-place kernel on CPU
//! f32; off the CPU, tensor ops over all parameters of a weight-decay group at once (on a GPU each
//! tensor op is a kernel launch, so a dozen per parameter would be thousands per step).

use anyhow::{bail, ensure, Context, Result};
use candle_core::{CpuStorage, DType, Layout, Tensor, Var, D};
use candle_nn::VarMap;

/// Whether a parameter gets weight decay: not biases, not LayerNorm weights. The one rule is the
/// architectures' (`model::gets_weight_decay`, checked against torch's no-decay set per
/// architecture), so the loop and `LoadedModel::decay_mask` cannot disagree.
pub use crate::model::gets_weight_decay as decays;

/// AdamW's hyper-parameters other than the (scheduled) learning rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Which implementation updates the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// For f32 weights: the fused in-place step on the CPU (`Fused`), and on CUDA (in a build with
    /// the `cuda` feature) the same arithmetic over every parameter in one launch; `Flat` for f32
    /// weights elsewhere, `TensorOps` for other dtypes.
    Auto,
    /// The fused in-place kernels, one pair of launches per parameter (f32 weights on the CPU or,
    /// in a build with the `cuda` feature, on CUDA; `Flat` for f32 weights elsewhere).
    Fused,
    /// Tensor ops, one parameter at a time (the reference the others are tested against).
    TensorOps,
    /// Tensor ops over each weight-decay group's parameters concatenated into one vector (f32
    /// weights only; others fall back to `TensorOps`).
    Flat,
}

impl Kernel {
    /// The implementation for `vars`: they share a device and a dtype in every model recycle builds,
    /// and one that differs takes the per-parameter tensor ops.
    fn resolve(self, vars: &[&Tensor]) -> Kernel {
        let all_f32 = vars.iter().all(|t| t.dtype() == DType::F32);
        let all_cpu = vars.iter().all(|t| t.device().is_cpu());
        // The fused step's two in-place ops have CUDA kernels in a build with them.
        let all_cuda = crate::model::ops::CUDA_KERNELS && vars.iter().all(|t| t.device().is_cuda());
        match self {
            Kernel::Auto if all_f32 && all_cuda => Kernel::Auto,
            Kernel::Auto | Kernel::Fused if all_f32 && (all_cpu || all_cuda) => Kernel::Fused,
            Kernel::Auto | Kernel::Fused | Kernel::Flat if all_f32 => Kernel::Flat,
            _ => Kernel::TensorOps,
        }
    }
}

/// Adam's moments of one parameter.
enum Moments {
    /// `[2 × numel]` f32: first moments, then second moments (updated in place on CPU).
    Fused(Tensor),
    /// Separate f32 tensors shaped like the parameter.
    Split { m: Tensor, v: Tensor },
}

/// The moments of a bucket of one weight-decay group's parameters, concatenated in parameter order.
struct FlatGroup {
    decay: bool,
    /// Indices into `AdamW::params`, ascending.
    members: Vec<usize>,
    m: Tensor,
    v: Tensor,
}

/// Where the moments live.
enum State {
    /// One entry per parameter, index-aligned with `AdamW::params`.
    PerParam(Vec<Moments>),
    /// `Moments::Fused` per parameter, index-aligned with `AdamW::params`, all updated by one
    /// launch (`Kernel::Auto` on CUDA).
    AllAtOnce(Vec<Tensor>),
    /// One entry per bucket of each weight-decay group (`flat_groups`).
    Flat(Vec<FlatGroup>),
}

struct Param {
    name: String,
    var: Var,
    decay: bool,
}

/// The optimiser: one entry per trainable `Var`, in name order (so runs are reproducible).
pub struct AdamW {
    params: Vec<Param>,
    state: State,
    hp: AdamWParams,
    /// Updates taken so far (torch's `state['step']`).
    steps: u64,
}

impl AdamW {
    /// Optimises every `Var` of `varmap`; `decay(name)` says which get weight decay.
    pub fn new(
        varmap: &VarMap,
        hp: AdamWParams,
        decay: impl Fn(&str) -> bool,
        kernel: Kernel,
    ) -> Result<Self> {
        Self::with_buckets(varmap, hp, decay, kernel, FLAT_BUCKET_ELEMS)
    }

    /// `new` with `Kernel::Flat`'s buckets capped at `bucket_elems` elements.
    fn with_buckets(
        varmap: &VarMap,
        hp: AdamWParams,
        decay: impl Fn(&str) -> bool,
        kernel: Kernel,
        bucket_elems: usize,
    ) -> Result<Self> {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("optimizer: the VarMap lock is poisoned"))?;
        let mut named: Vec<(String, Var)> =
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        drop(data);
        named.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, var) in &named {
            ensure!(
                var.dtype().is_float(),
                "optimizer: parameter {name} has non-float dtype {:?}",
                var.dtype()
            );
        }
        let params: Vec<Param> = named
            .into_iter()
            .map(|(name, var)| Param {
                decay: decay(&name),
                name,
                var,
            })
            .collect();
        let tensors: Vec<&Tensor> = params.iter().map(|p| p.var.as_tensor()).collect();
        let state = match kernel.resolve(&tensors) {
            Kernel::Flat => State::Flat(flat_groups(&params, bucket_elems)?),
            Kernel::Auto => State::AllAtOnce(
                tensors
                    .iter()
                    .map(|t| Tensor::zeros(2 * t.elem_count(), DType::F32, t.device()))
                    .collect::<candle_core::Result<_>>()?,
            ),
            kernel => State::PerParam(
                tensors
                    .iter()
                    .map(|t| per_param_moments(t, kernel))
                    .collect::<Result<_>>()?,
            ),
        };
        Ok(Self {
            params,
            state,
            hp,
            steps: 0,
        })
    }

    /// The optimised parameters' names, in the order `step` expects their gradients.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }

    /// The optimised variables, in the order `step` expects their gradients.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.params.iter().map(|p| &p.var)
    }

    /// The gradients `store` holds for the optimised variables, in the order `step` expects them.
    pub fn gradients(&self, store: &candle_core::backprop::GradStore) -> Vec<Option<Tensor>> {
        self.vars()
            .map(|v| store.get(v.as_tensor()).cloned())
            .collect()
    }

    /// Whether the parameter at `index` (in `names()` order) gets weight decay.
    pub fn decays_at(&self, index: usize) -> bool {
        self.params.get(index).is_some_and(|p| p.decay)
    }

    /// Updates taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update with learning rate `lr`. `grads[i]` is the gradient of the i-th parameter (`None`:
    /// the parameter did not take part in the loss; torch skips it, and so do we). Gradients are
    /// multiplied by `grad_scale` first (the clipping coefficient; 1.0 for none).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64, grad_scale: f64) -> Result<()> {
        self.step_scaled(grads, lr, grad_scale, None)
    }

    /// `step` with the gradients scaled by `clip`'s coefficient, read where it lies: one launch for
    /// every parameter (`Kernel::Auto` on CUDA) reads a coefficient left on the device without the
    /// host waiting for it; every other path reads it back first.
    pub fn step_clipped(&mut self, grads: &[Option<Tensor>], lr: f64, clip: &Clip) -> Result<()> {
        match (clip, &self.state) {
            (Clip::Device(scale), State::AllAtOnce(_)) => {
                self.step_scaled(grads, lr, 1.0, Some(scale))
            }
            _ => self.step(grads, lr, clip.coefficient()?),
        }
    }

    fn step_scaled(
        &mut self,
        grads: &[Option<Tensor>],
        lr: f64,
        grad_scale: f64,
        device_scale: Option<&Tensor>,
    ) -> Result<()> {
        ensure!(
            grads.len() == self.params.len(),
            "optimizer: {} gradients for {} parameters",
            grads.len(),
            self.params.len()
        );
        for (p, g) in self.params.iter().zip(grads) {
            if let Some(g) = g {
                ensure!(
                    g.shape() == p.var.shape(),
                    "optimizer: the gradient of {} has shape {:?}, the weight {:?}",
                    p.name,
                    g.shape(),
                    p.var.shape()
                );
            }
        }
        self.steps += 1;
        let t = self.steps as i32;
        let bc1 = 1.0 - self.hp.beta1.powi(t);
        let bc2 = 1.0 - self.hp.beta2.powi(t);
        let hp = self.hp;
        let coefficients = |decay: bool| {
            let wd = if decay { hp.weight_decay } else { 0.0 };
            StepCoefficients {
                beta1: hp.beta1,
                beta2: hp.beta2,
                eps: hp.eps,
                decay_factor: 1.0 - lr * wd,
                step_size: lr / bc1,
                bc2_sqrt: bc2.sqrt(),
                grad_scale,
            }
        };
        match &mut self.state {
            State::PerParam(moments) => {
                for ((p, moments), g) in self.params.iter().zip(moments).zip(grads) {
                    let Some(g) = g else { continue };
                    update_one(&p.var, moments, g, &coefficients(p.decay))
                        .with_context(|| format!("optimizer: updating parameter {}", p.name))?;
                }
            }
            State::AllAtOnce(states) => {
                all_at_once(&self.params, states, grads, coefficients, device_scale)
                    .context("optimizer: updating every parameter in one launch")?
            }
            State::Flat(groups) => {
                for group in groups {
                    let c = coefficients(group.decay);
                    update_group(&self.params, group, grads, &c).with_context(|| {
                        let kind = if group.decay { "" } else { "no-" };
                        format!("optimizer: updating the {kind}decay parameters")
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// One update of every parameter that has a gradient, in one launch (`Kernel::Auto` on CUDA).
#[cfg(feature = "cuda")]
fn all_at_once(
    params: &[Param],
    states: &[Tensor],
    grads: &[Option<Tensor>],
    coefficients: impl Fn(bool) -> StepCoefficients,
    device_scale: Option<&Tensor>,
) -> Result<()> {
    use crate::model::kernels::cuda::{adamw_multi, AdamwItem, AdamwScalars};
    let present: Vec<(usize, Tensor)> = grads
        .iter()
        .enumerate()
        .filter_map(|(i, g)| Some((i, g.as_ref()?)))
        .map(|(i, g)| Ok((i, g.to_dtype(DType::F32)?.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    let items: Vec<AdamwItem> = present
        .iter()
        .map(|(i, g)| AdamwItem {
            w: params[*i].var.as_tensor(),
            state: &states[*i],
            g,
            decay: coefficients(params[*i].decay).decay_factor as f32,
        })
        .collect();
    // Everything but the decay factor is the same for both groups.
    let c = coefficients(false);
    adamw_multi(
        &items,
        AdamwScalars {
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            grad_scale: c.grad_scale as f32,
            step: c.step_size as f32,
            inv_bc2: (1.0 / c.bc2_sqrt) as f32,
            eps: c.eps as f32,
        },
        device_scale,
    )?;
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn all_at_once(
    _: &[Param],
    _: &[Tensor],
    _: &[Option<Tensor>],
    _: impl Fn(bool) -> StepCoefficients,
    _: Option<&Tensor>,
) -> Result<()> {
    bail!("one launch for every parameter needs a build with the cuda feature")
}

fn per_param_moments(t: &Tensor, kernel: Kernel) -> Result<Moments> {
    Ok(if kernel == Kernel::Fused {
        Moments::Fused(Tensor::zeros(2 * t.elem_count(), DType::F32, t.device())?)
    } else {
        let m = Tensor::zeros(t.shape(), DType::F32, t.device())?;
        Moments::Split {
            v: m.zeros_like()?,
            m,
        }
    })
}

/// The most elements one flat update concatenates (128 MiB of f32). An update holds about eight
/// vectors of its size at once (weights, gradients, old and new moments, temporaries), so the cap
/// bounds that transient memory (about 1 GiB) whatever the model's size, at the cost of one more
/// dozen launches per 32M parameters. A parameter larger than the cap is a bucket of its own.
const FLAT_BUCKET_ELEMS: usize = 32 << 20;

/// `params` split by weight decay, each group into buckets of consecutive members of at most
/// `max_elems` elements (or one member), with zero moments.
fn flat_groups(params: &[Param], max_elems: usize) -> Result<Vec<FlatGroup>> {
    let mut groups = Vec::new();
    for decay in [true, false] {
        let mut buckets: Vec<(Vec<usize>, usize)> = Vec::new();
        for i in (0..params.len()).filter(|&i| params[i].decay == decay) {
            let n = params[i].var.elem_count();
            match buckets.last_mut() {
                Some((members, elems)) if *elems + n <= max_elems => {
                    members.push(i);
                    *elems += n;
                }
                _ => buckets.push((vec![i], n)),
            }
        }
        for (members, elems) in buckets {
            let m = Tensor::zeros(elems, DType::F32, params[members[0]].var.device())?;
            groups.push(FlatGroup {
                decay,
                members,
                v: m.zeros_like()?,
                m,
            });
        }
    }
    Ok(groups)
}

/// The per-step scalars of one update.
#[derive(Debug, Clone, Copy)]
struct StepCoefficients {
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// `1 - lr·wd`: the decoupled weight decay, applied to the weight before the Adam step.
    decay_factor: f64,
    /// `lr / (1 - β1^t)`.
    step_size: f64,
    /// `sqrt(1 - β2^t)`.
    bc2_sqrt: f64,
    grad_scale: f64,
}

fn update_one(var: &Var, moments: &mut Moments, g: &Tensor, c: &StepCoefficients) -> Result<()> {
    let w = var.as_tensor();
    match moments {
        Moments::Fused(state) => {
            let g = g.to_dtype(DType::F32)?.contiguous()?;
            state.inplace_op2(&g, &MomentsUpdate(*c))?;
            w.inplace_op2(state, &WeightUpdate(*c))?;
        }
        Moments::Split { m, v } => {
            let w32 = w.detach().to_dtype(DType::F32)?;
            let (new_w, new_m, new_v) = adam_tensors(&w32, g, m, v, c)?;
            (*m, *v) = (new_m, new_v);
            var.set(&new_w.to_dtype(w.dtype())?)?;
        }
    }
    Ok(())
}

/// AdamW's arithmetic as tensor ops, any shape and device: returns the new weight, first and second
/// moments (all f32).
fn adam_tensors(
    w: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    c: &StepCoefficients,
) -> Result<(Tensor, Tensor, Tensor)> {
    let g = g.to_dtype(DType::F32)?.affine(c.grad_scale, 0.0)?;
    // torch: m ← β1·m + (1-β1)·g ; v ← β2·v + (1-β2)·g²
    let m = ((m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
    let v = ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
    // denom = sqrt(v)/sqrt(1-β2^t) + eps ; w ← w·(1-lr·wd) - step_size · m / denom
    let denom = v.sqrt()?.affine(1.0 / c.bc2_sqrt, c.eps)?;
    let w = ((w * c.decay_factor)? - (m.div(&denom)? * c.step_size)?)?;
    Ok((w, m, v))
}

/// One update of a flat group: the members' weights and gradients are concatenated, updated by one
/// `adam_tensors`, and copied back into the `Var`s. A member without a gradient (torch skips it)
/// enters with a zero gradient, keeps its old moments and is not written back.
fn update_group(
    params: &[Param],
    group: &mut FlatGroup,
    grads: &[Option<Tensor>],
    c: &StepCoefficients,
) -> Result<()> {
    if group.members.iter().all(|&i| grads[i].is_none()) {
        return Ok(());
    }
    let mut ws = Vec::with_capacity(group.members.len());
    let mut gs = Vec::with_capacity(group.members.len());
    for &i in &group.members {
        let w = params[i].var.as_tensor();
        ws.push(w.detach().flatten_all()?);
        gs.push(match &grads[i] {
            Some(g) => g.flatten_all()?.to_dtype(DType::F32)?,
            None => Tensor::zeros(w.elem_count(), DType::F32, w.device())?,
        });
    }
    let (w, m, v) = adam_tensors(
        &Tensor::cat(&ws, 0)?,
        &Tensor::cat(&gs, 0)?,
        &group.m,
        &group.v,
        c,
    )?;
    let mut offset = 0;
    for &i in &group.members {
        let var = &params[i].var;
        let n = var.elem_count();
        if grads[i].is_some() {
            var.set(&w.narrow(0, offset, n)?.reshape(var.shape())?)?;
        } else {
            m.slice_set(&group.m.narrow(0, offset, n)?, 0, offset)?;
            v.slice_set(&group.v.narrow(0, offset, n)?, 0, offset)?;
        }
        offset += n;
    }
    (group.m, group.v) = (m, v);
    Ok(())
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("adamw: {what} must be f32")
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("adamw: {what} must be contiguous")
    };
    Ok(&data[start..end])
}

/// In place on the `[2n]` moments, reading the gradient: m ← β1·m + (1-β1)·g·s, v ← β2·v + (1-β2)·(g·s)².
struct MomentsUpdate(StepCoefficients);

impl candle_core::InplaceOp2 for MomentsUpdate {
    fn name(&self) -> &'static str {
        "adamw-moments"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        let g = contiguous_f32(src, src_l, "gradient")?;
        let CpuStorage::F32(state) = dst else {
            candle_core::bail!("adamw: moments must be f32")
        };
        let Some((start, end)) = dst_l.contiguous_offsets() else {
            candle_core::bail!("adamw: moments must be contiguous")
        };
        let state = &mut state[start..end];
        if state.len() != 2 * g.len() {
            candle_core::bail!("adamw: {} moments for {} gradients", state.len(), g.len());
        }
        let (m, v) = state.split_at_mut(g.len());
        let c = &self.0;
        let (b1, b2, s) = (c.beta1 as f32, c.beta2 as f32, c.grad_scale as f32);
        let (one_b1, one_b2) = ((1.0 - c.beta1) as f32, (1.0 - c.beta2) as f32);
        for ((m, v), g) in m.iter_mut().zip(v.iter_mut()).zip(g) {
            let g = g * s;
            *m = b1 * *m + one_b1 * g;
            *v = b2 * *v + one_b2 * (g * g);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        src: &candle_core::CudaStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        let c = &self.0;
        crate::model::kernels::cuda::adamw_moments(
            dst,
            dst_l,
            src,
            src_l,
            c.beta1 as f32,
            c.beta2 as f32,
            c.grad_scale as f32,
        )
    }
}

/// In place on the weight, reading the moments: w ← w·(1-lr·wd) - step_size · m / (sqrt(v)/sqrt(bc2) + eps).
struct WeightUpdate(StepCoefficients);

impl candle_core::InplaceOp2 for WeightUpdate {
    fn name(&self) -> &'static str {
        "adamw-weights"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        let state = contiguous_f32(src, src_l, "moments")?;
        let CpuStorage::F32(w) = dst else {
            candle_core::bail!("adamw: fused weights must be f32")
        };
        let Some((start, end)) = dst_l.contiguous_offsets() else {
            candle_core::bail!("adamw: weights must be contiguous")
        };
        let w = &mut w[start..end];
        if state.len() != 2 * w.len() {
            candle_core::bail!("adamw: {} moments for {} weights", state.len(), w.len());
        }
        let (m, v) = state.split_at(w.len());
        let c = &self.0;
        let (decay, step, inv_bc2, eps) = (
            c.decay_factor as f32,
            c.step_size as f32,
            (1.0 / c.bc2_sqrt) as f32,
            c.eps as f32,
        );
        for ((w, m), v) in w.iter_mut().zip(m).zip(v) {
            let denom = v.sqrt() * inv_bc2 + eps;
            *w = *w * decay - step * (m / denom);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        src: &candle_core::CudaStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        let c = &self.0;
        crate::model::kernels::cuda::adamw_weights(
            dst,
            dst_l,
            src,
            src_l,
            c.decay_factor as f32,
            c.step_size as f32,
            (1.0 / c.bc2_sqrt) as f32,
            c.eps as f32,
        )
    }
}

/// The gradients present, where there are some and every one is f32 on a CUDA device: what the
/// multi-tensor kernels (`sum_squares_multi`, `clip_scale`) take.
#[cfg(feature = "cuda")]
fn all_f32_on_cuda(grads: &[Option<Tensor>]) -> Option<Vec<&Tensor>> {
    let present: Vec<&Tensor> = grads.iter().flatten().collect();
    let fits = |g: &&Tensor| g.device().is_cuda() && g.dtype() == DType::F32;
    (!present.is_empty() && present.iter().all(fits)).then_some(present)
}

/// The global L2 norm of all gradients together (as `torch.nn.utils.clip_grad_norm_` computes it).
/// Each gradient's sum of squares is reduced on its device in f32 and the sums are read back in one
/// transfer (one device synchronisation per step, not one per parameter), then added in f64.
pub fn global_grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    #[cfg(feature = "cuda")]
    if let Some(present) = all_f32_on_cuda(grads) {
        let sums = crate::model::kernels::cuda::sums_of_squares(&present)?;
        return Ok(sums.iter().map(|&s| f64::from(s)).sum::<f64>().sqrt());
    }
    let sums = grads
        .iter()
        .flatten()
        .map(|g| {
            let sq = g.to_dtype(DType::F32)?.sqr()?;
            // Rows first: candle's CUDA reduction gives each output one block, so a whole-tensor
            // sum of the 38M-element embedding gradient would run on one block.
            if sq.rank() >= 2 {
                sq.sum_keepdim(D::Minus1)?.sum_all()
            } else {
                sq.sum_all()
            }
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    if sums.is_empty() {
        return Ok(0.0);
    }
    let sums: Vec<f32> = Tensor::stack(&sums, 0)?.to_vec1()?;
    Ok(sums.iter().map(|&s| f64::from(s)).sum::<f64>().sqrt())
}

/// A step's global gradient norm and its clipping coefficient (1 without clipping), computed where
/// the gradients are. With every gradient f32 on a CUDA device they stay there
/// (`cuda::clip_on_device`, the same bits as the host's arithmetic): `AdamW::step_clipped` reads
/// the coefficient on the device, so the host goes on to the next step without waiting for the
/// backward to finish, and `norm` reads the norm back only when asked.
#[derive(Debug)]
pub enum Clip {
    Host {
        norm: f64,
        coefficient: f64,
    },
    /// `[coefficient, norm]`, f64, on the device.
    Device(Tensor),
}

impl Clip {
    /// The clipping of `grads` to a global norm of at most `max_norm` (`None`: no clipping, the
    /// norm only), on the gradients' device where it can be.
    pub fn of(grads: &[Option<Tensor>], max_norm: Option<f64>) -> Result<Self> {
        if let Some(m) = max_norm {
            ensure!(
                m > 0.0 && m.is_finite(),
                "clipping: max_norm must be > 0, got {m}"
            );
        }
        #[cfg(feature = "cuda")]
        if let Some(present) = all_f32_on_cuda(grads) {
            let at =
                crate::model::kernels::cuda::clip_on_device(&present, max_norm.unwrap_or(0.0))?;
            return Ok(Clip::Device(at));
        }
        Self::on_host(grads, max_norm)
    }

    /// The same, the norm read back to the host at once (a synchronisation on a device).
    pub fn on_host(grads: &[Option<Tensor>], max_norm: Option<f64>) -> Result<Self> {
        let norm = global_grad_norm(grads)?;
        let coefficient = max_norm.map_or(1.0, |m| clip_coefficient(norm, m));
        Ok(Clip::Host { norm, coefficient })
    }

    /// The global norm of the gradients before clipping.
    pub fn norm(&self) -> Result<f64> {
        self.read(1)
    }

    /// The factor the gradients are scaled by.
    pub fn coefficient(&self) -> Result<f64> {
        self.read(0)
    }

    fn read(&self, at: usize) -> Result<f64> {
        match self {
            Clip::Host { norm, coefficient } => Ok(if at == 0 { *coefficient } else { *norm }),
            Clip::Device(t) => Ok(t.get(at)?.to_scalar::<f64>()?),
        }
    }
}

/// The factor that brings gradients of global norm `norm` down to at most `max_norm`
/// (torch: `clamp(max_norm / (norm + 1e-6), max=1)`).
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// Scales gradients so that their global norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    if !(max_norm > 0.0) {
        bail!("clip_grad_norm: max_norm must be > 0, got {max_norm}");
    }
    let norm = global_grad_norm(grads)?;
    let coef = clip_coefficient(norm, max_norm);
    for g in grads.iter_mut().flatten() {
        *g = g.affine(coef, 0.0)?;
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn hp(wd: f64) -> AdamWParams {
        AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: wd,
        }
    }

    fn one_var_map(name: &str, w: &[f32]) -> VarMap {
        let vm = VarMap::new();
        let var = Var::from_slice(w, w.len(), &Device::Cpu).unwrap();
        vm.data().lock().unwrap().insert(name.to_string(), var);
        vm
    }

    fn weights(opt: &AdamW) -> Vec<f32> {
        opt.vars().next().unwrap().as_tensor().to_vec1().unwrap()
    }

    /// torch.optim.AdamW's update, written out for one element.
    fn by_hand(w: f64, g: f64, m: f64, v: f64, t: i32, lr: f64, wd: f64) -> (f64, f64, f64) {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        let w = w * (1.0 - lr * wd);
        let m = b1 * m + (1.0 - b1) * g;
        let v = b2 * v + (1.0 - b2) * g * g;
        let mhat = m / (1.0 - b1.powi(t));
        let vhat = v / (1.0 - b2.powi(t));
        (w - lr * mhat / (vhat.sqrt() + eps), m, v)
    }

    #[test]
    fn two_steps_match_the_formula_on_both_kernels() {
        let (w0, g1, g2, lr, wd) = ([0.5f32, -1.5], [0.2f32, -0.03], [-0.1f32, 0.4], 0.01, 0.1);
        for kernel in [Kernel::Auto, Kernel::TensorOps, Kernel::Flat] {
            let vm = one_var_map("encoder.weight", &w0);
            let mut opt = AdamW::new(&vm, hp(wd), decays, kernel).unwrap();
            let gt = |g: &[f32]| vec![Some(Tensor::from_slice(g, 2, &Device::Cpu).unwrap())];
            opt.step(&gt(&g1), lr, 1.0).unwrap();
            opt.step(&gt(&g2), lr, 1.0).unwrap();
            let got = weights(&opt);
            for i in 0..2 {
                let (w, m, v) = by_hand(w0[i] as f64, g1[i] as f64, 0.0, 0.0, 1, lr, wd);
                let (w, _, _) = by_hand(w, g2[i] as f64, m, v, 2, lr, wd);
                assert!(
                    (got[i] as f64 - w).abs() < 1e-6,
                    "{kernel:?} element {i}: {} vs {w}",
                    got[i]
                );
            }
        }
    }

    #[test]
    fn excluded_parameters_get_no_decay() {
        assert!(decays("bert.encoder.layer.0.attention.self.query.weight"));
        assert!(decays("classifier.weight"));
        assert!(!decays("bert.encoder.layer.0.attention.self.query.bias"));
        assert!(!decays("bert.embeddings.LayerNorm.weight"));
        assert!(!decays("roberta.encoder.layer.3.output.layer_norm.weight"));
        assert!(!decays("deberta.encoder.rel_embeddings.layernorm.weight"));
        // With a zero gradient Adam's step is 0, so only weight decay moves the weight.
        let zero = vec![Some(Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap())];
        for (name, expect_decay) in [
            ("dense.weight", true),
            ("dense.bias", false),
            ("LayerNorm.weight", false),
        ] {
            for kernel in [Kernel::Auto, Kernel::Flat] {
                let vm = one_var_map(name, &[1.0, -2.0]);
                let mut opt = AdamW::new(&vm, hp(0.5), decays, kernel).unwrap();
                opt.step(&zero, 0.1, 1.0).unwrap();
                let factor = if expect_decay { 1.0 - 0.1 * 0.5 } else { 1.0 };
                assert_eq!(
                    weights(&opt),
                    vec![factor as f32, -2.0 * factor as f32],
                    "{name} {kernel:?}"
                );
            }
        }
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let d = &Device::Cpu;
        let mut grads = vec![
            Some(Tensor::new(&[3f32, 0.0], d).unwrap()),
            None,
            Some(Tensor::new(&[[0f32, 4.0]], d).unwrap()),
        ];
        let before = clip_grad_norm(&mut grads, 1.0).unwrap();
        assert!((before - 5.0).abs() < 1e-6);
        let after = global_grad_norm(&grads).unwrap();
        assert!((after - 1.0).abs() < 1e-5, "{after}");
        let a: Vec<f32> = grads[0].as_ref().unwrap().to_vec1().unwrap();
        assert!((a[0] - 0.6).abs() < 1e-5);
        // Below the threshold nothing changes.
        let mut small = vec![Some(Tensor::new(&[0.3f32, 0.4], d).unwrap())];
        clip_grad_norm(&mut small, 1.0).unwrap();
        assert_eq!(
            small[0].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.3, 0.4]
        );
    }

    /// `Clip` on the CPU: the norm and coefficient of `global_grad_norm` and `clip_coefficient`
    /// (none without a maximum), a maximum that is not positive refused, and `step_clipped` the
    /// same update as `step` with the coefficient.
    #[test]
    fn clip_gives_the_norm_and_coefficient_and_steps_as_scaled() {
        let d = &Device::Cpu;
        let grads = vec![
            Some(Tensor::new(&[3f32, 0.0], d).unwrap()),
            None,
            Some(Tensor::new(&[[0f32, 4.0]], d).unwrap()),
        ];
        let clip = Clip::of(&grads, Some(1.0)).unwrap();
        assert!(matches!(clip, Clip::Host { .. }));
        assert_eq!(clip.norm().unwrap(), global_grad_norm(&grads).unwrap());
        assert_eq!(clip.coefficient().unwrap(), clip_coefficient(5.0, 1.0));
        let none = Clip::of(&grads, None).unwrap();
        assert_eq!(none.coefficient().unwrap(), 1.0);
        assert_eq!(none.norm().unwrap(), clip.norm().unwrap());
        for bad in [0.0, -2.0, f64::NAN] {
            let err = Clip::of(&grads, Some(bad)).unwrap_err().to_string();
            assert!(err.contains("max_norm"), "{err}");
        }
        let g = vec![Some(Tensor::new(&[0.7f32, -0.2], d).unwrap())];
        let clip = Clip::of(&g, Some(0.5)).unwrap();
        assert!(clip.coefficient().unwrap() < 1.0);
        let mut out = vec![];
        for by_clip in [false, true] {
            let vm = one_var_map("dense.weight", &[0.5, -1.5]);
            let mut opt = AdamW::new(&vm, hp(0.1), decays, Kernel::Auto).unwrap();
            for _ in 0..2 {
                if by_clip {
                    opt.step_clipped(&g, 0.01, &clip).unwrap();
                } else {
                    opt.step(&g, 0.01, clip.coefficient().unwrap()).unwrap();
                }
            }
            out.push(weights(&opt));
        }
        assert_eq!(out[0], out[1]);
    }

    #[test]
    fn fused_and_tensor_kernels_agree_on_a_large_parameter() {
        let n = 10_000;
        let w: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 100.0)
            .collect();
        let mut out = vec![];
        for kernel in [Kernel::Auto, Kernel::TensorOps] {
            let vm = one_var_map("w", &w);
            let mut opt = AdamW::new(&vm, hp(0.01), decays, kernel).unwrap();
            for _ in 0..3 {
                opt.step(
                    &[Some(Tensor::from_slice(&g, n, &Device::Cpu).unwrap())],
                    1e-3,
                    0.5,
                )
                .unwrap();
            }
            out.push(weights(&opt));
        }
        let max_diff = out[0]
            .iter()
            .zip(&out[1])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max_diff < 1e-6, "{max_diff}");
        assert_ne!(out[0], w);
    }

    /// Five parameters of several shapes in both weight-decay groups; the gradient of one member of
    /// each group is missing on the second step (when the moments are no longer zero).
    fn mixed_var_map() -> VarMap {
        let vm = VarMap::new();
        let shapes: [(&str, &[usize]); 5] = [
            ("a.dense.weight", &[3, 4]),
            ("a.dense.bias", &[3]),
            ("b.LayerNorm.weight", &[4]),
            ("b.query.weight", &[2, 2, 2]),
            ("c.classifier.weight", &[5]),
        ];
        for (k, (name, shape)) in shapes.into_iter().enumerate() {
            let n: usize = shape.iter().product();
            let w: Vec<f32> = (0..n)
                .map(|i| ((i * 29 + k * 7) % 23) as f32 / 11.0 - 1.0)
                .collect();
            let var = Var::from_vec(w, shape, &Device::Cpu).unwrap();
            vm.data().lock().unwrap().insert(name.to_string(), var);
        }
        vm
    }

    fn mixed_grads(opt: &AdamW, step: usize) -> Vec<Option<Tensor>> {
        opt.vars()
            .zip(opt.names())
            .enumerate()
            .map(|(k, (v, name))| {
                let skip = step == 1 && (name == "a.dense.bias" || name == "b.query.weight");
                let n = v.elem_count();
                let g: Vec<f32> = (0..n)
                    .map(|i| ((i * 17 + k * 5 + step * 3) % 19) as f32 / 9.0 - 1.0)
                    .collect();
                (!skip).then(|| Tensor::from_vec(g, v.shape(), &Device::Cpu).unwrap())
            })
            .collect()
    }

    fn all_weights(opt: &AdamW) -> Vec<Vec<f32>> {
        opt.vars()
            .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    }

    #[test]
    fn flat_groups_match_per_parameter_ops_exactly() {
        let mut runs = vec![];
        // Flat in one bucket per group, and in buckets of at most 8 elements: the decay group's
        // 12, 8 and 5 elements one bucket each, the no-decay group's 3 and 4 together.
        let runs_of = [
            (Kernel::TensorOps, FLAT_BUCKET_ELEMS),
            (Kernel::Flat, FLAT_BUCKET_ELEMS),
            (Kernel::Flat, 8),
            (Kernel::Auto, FLAT_BUCKET_ELEMS),
        ];
        for (kernel, bucket) in runs_of {
            let vm = mixed_var_map();
            let mut opt = AdamW::with_buckets(&vm, hp(0.1), decays, kernel, bucket).unwrap();
            if let State::Flat(groups) = &opt.state {
                let sizes: Vec<usize> = groups.iter().map(|g| g.members.len()).collect();
                let want: &[usize] = if bucket == 8 { &[1, 1, 1, 2] } else { &[3, 2] };
                assert_eq!(sizes, want, "buckets of at most {bucket}");
            }
            let (mut before, mut after) = (vec![], vec![]);
            for step in 0..4 {
                let grads = mixed_grads(&opt, step);
                if step == 1 {
                    before = all_weights(&opt);
                }
                opt.step(&grads, 0.05, 0.7).unwrap();
                if step == 1 {
                    after = all_weights(&opt);
                }
            }
            // Parameters without a gradient are left alone; the others moved.
            for (k, name) in opt.names().enumerate() {
                let skipped = name == "a.dense.bias" || name == "b.query.weight";
                assert_eq!(after[k] == before[k], skipped, "{kernel:?} {name}");
            }
            runs.push(all_weights(&opt));
        }
        // Same tensor ops on the same numbers: identical, skipped moments included.
        assert_eq!(runs[0], runs[1], "flat vs per-parameter tensor ops");
        assert_eq!(
            runs[0], runs[2],
            "small buckets vs per-parameter tensor ops"
        );
        let max_diff = runs[0]
            .iter()
            .flatten()
            .zip(runs[3].iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max_diff < 1e-6, "fused kernel vs tensor ops: {max_diff}");
    }

    #[test]
    fn auto_picks_fused_on_cpu_f32_and_tensor_ops_for_other_dtypes() {
        let f32 = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let bf16 = f32.to_dtype(DType::BF16).unwrap();
        assert_eq!(Kernel::Auto.resolve(&[&f32]), Kernel::Fused);
        assert_eq!(Kernel::Fused.resolve(&[&f32]), Kernel::Fused);
        assert_eq!(Kernel::Fused.resolve(&[&bf16]), Kernel::TensorOps);
        assert_eq!(Kernel::Flat.resolve(&[&f32]), Kernel::Flat);
        assert_eq!(Kernel::TensorOps.resolve(&[&f32]), Kernel::TensorOps);
        assert_eq!(Kernel::Auto.resolve(&[&f32, &bf16]), Kernel::TensorOps);
        assert_eq!(Kernel::Flat.resolve(&[&bf16]), Kernel::TensorOps);
    }

    #[test]
    fn grad_norm_reads_all_sums_at_once() {
        let d = &Device::Cpu;
        assert_eq!(global_grad_norm(&[None]).unwrap(), 0.0);
        let grads = [
            Some(Tensor::new(&[1f32, 2.0], d).unwrap()),
            None,
            Some(
                Tensor::new(&[[2f32]], d)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap(),
            ),
        ];
        assert!((global_grad_norm(&grads).unwrap() - 3.0).abs() < 1e-9);
    }
}
