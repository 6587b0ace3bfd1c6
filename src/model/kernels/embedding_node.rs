//! The embedding lookup as a graph node whose table gradient goes to the gradient sink.
//!
//! A word table is the largest weight of an encoder (roberta-base: 50,265 × 768, a third of the
//! parameters). Through candle's graph its gradient costs full passes over the table on top of the
//! scatter-add itself: in bf16, the f32 scatter cast to bf16, a zero-filled bf16 entry for the
//! cast table and an add, the cast's backward to f32, a zero-filled f32 entry for the `Var` and an
//! add (about 1.4 GB of memory traffic a roberta-base step, whatever the batch). While a gradient
//! sink is in scope and knows the table's master (`grad_sink`), `lookup` gathers the rows from the
//! f32 master instead, and its backward deposits the scattered f32 gradient with the sink, which
//! hands it to the optimizer's store as it is. The rows are cast to the compute dtype after the
//! gather (`[tokens, n]`, small), so the model sees what it saw before; the table handed in may be
//! the cast or, once the sink has seen the node take it, the master itself (`model::casting`).
//!
//! The node has a CPU form (a gather and a scatter-add in f32) so that tests check it against the
//! plain lookup on the CPU; `ops::embedding` sends only CUDA tables through it.

use super::super::grad_sink::GradSink;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

/// Rows `ids` of `table` `[vocab, n]` (a cast of an f32 master, or the master itself), shaped
/// `[ids.., n]` in `dtype`, gathered from the f32 master with the gradient deposited in the sink in
/// scope; `None` where no sink is in scope or it does not know the table (the caller takes the
/// plain lookup).
pub fn lookup(table: &Tensor, ids: &Tensor, dtype: DType) -> Result<Option<Tensor>> {
    let Some(sink) = GradSink::active() else {
        return Ok(None);
    };
    let Some(masters) = sink.masters_of(&[table])? else {
        return Ok(None);
    };
    let master = &masters[0];
    if master.dtype() != DType::F32 || master.dims() != table.dims() || table.rank() != 2 {
        return Ok(None);
    }
    if ids.dtype() != DType::U32 {
        bail!("embedding: token ids must be u32, got {:?}", ids.dtype());
    }
    let mut dims = ids.dims().to_vec();
    dims.push(table.dim(D::Minus1)?);
    let rows = master.apply_op2(
        &ids.flatten_all()?.contiguous()?,
        SinkEmbedding {
            sink,
            master: master.clone(),
            dtype,
        },
    )?;
    // Already in `dtype` where the gather wrote it so (the CUDA kernel writes bf16 rows).
    Ok(Some(rows.to_dtype(dtype)?.reshape(dims)?))
}

/// The gather from an f32 master `[vocab, n]` (first operand) by u32 ids (second, flat), into
/// `dtype` where it is bf16 (else f32, cast by the caller); its backward deposits the table's
/// gradient in `sink` and gives candle's graph none.
struct SinkEmbedding {
    sink: GradSink,
    master: Tensor,
    /// The compute dtype the rows are for: the gather writes bf16 rows as they are (rounded as a
    /// cast rounds), so that no cast of `[tokens, n]` rows follows, forward or (as its gradient)
    /// backward.
    dtype: DType,
}

impl CustomOp2 for SinkEmbedding {
    fn name(&self) -> &'static str {
        "recycle-embedding-into-sink"
    }

    fn cpu_fwd(
        &self,
        table: &CpuStorage,
        tl: &Layout,
        ids: &CpuStorage,
        il: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(t), CpuStorage::U32(i)) = (table, ids) else {
            bail!("embedding into the sink: an f32 table and u32 ids");
        };
        let (Some((t0, t1)), Some((i0, i1))) = (tl.contiguous_offsets(), il.contiguous_offsets())
        else {
            bail!("embedding into the sink: contiguous operands");
        };
        let (t, i) = (&t[t0..t1], &i[i0..i1]);
        let (vocab, n) = tl.shape().dims2()?;
        let mut out = Vec::with_capacity(i.len() * n);
        for &id in i {
            let id = id as usize;
            if id >= vocab {
                bail!("embedding: token id {id} is past the table's {vocab} rows");
            }
            out.extend_from_slice(&t[id * n..(id + 1) * n]);
        }
        let out = match self.dtype {
            DType::BF16 => CpuStorage::BF16(out.into_iter().map(half::bf16::from_f32).collect()),
            _ => CpuStorage::F32(out),
        };
        Ok((out, Shape::from((i.len(), n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        table: &candle_core::CudaStorage,
        tl: &Layout,
        ids: &candle_core::CudaStorage,
        il: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::embedding_storage_as(table, tl, ids, il, self.dtype)
    }

    fn bwd(
        &self,
        table: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (vocab, n) = table.dims2()?;
        let g = table_grad(&grad.contiguous()?, ids, vocab, n)?;
        self.sink.deposit(&self.master, &g)?;
        Ok((None, None))
    }
}

/// The table's gradient `[vocab, n]` (f32): row `ids[r]` gets `grad[r]` (f32 or bf16) added, for
/// every r, in f32.
fn table_grad(grad: &Tensor, ids: &Tensor, vocab: usize, n: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if grad.device().is_cuda() {
        // The scatter kernel reads bf16 gradients as they are and adds in f32.
        return super::cuda::embedding_table_grad(grad, ids, vocab);
    }
    Tensor::zeros((vocab, n), DType::F32, grad.device())?.index_add(
        ids,
        &grad.to_dtype(DType::F32)?,
        0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The table's gradient through the sink is the scatter-add of the rows' incoming gradient
    /// in f32 (as the CUDA path always summed it), in f32 and through a bf16 cast registered as
    /// the table's alias (as `model::casting` does); in f32 it equals the plain lookup's gradient
    /// through the graph. Rows come out as the plain lookup's, in the table's dtype.
    #[test]
    fn the_sinks_table_gradient_is_the_scatter_of_the_rows_gradient() {
        let dev = Device::Cpu;
        let master = Var::randn(0f32, 1.0, (11, 6), &dev).unwrap();
        let ids = Tensor::new(&[[3u32, 0, 3, 10], [7, 3, 1, 1]], &dev).unwrap();
        let flat = ids.flatten_all().unwrap();
        let weights = Tensor::randn(0f32, 1.0, (2, 4, 6), &dev).unwrap();
        let max_diff = |a: &Tensor, b: &Tensor| {
            (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        // The table as a cast of the master, or the master itself handed over uncast.
        for (dtype, uncast) in [
            (DType::F32, false),
            (DType::BF16, false),
            (DType::BF16, true),
        ] {
            let cast = master.as_tensor().to_dtype(dtype).unwrap();
            let table = if uncast {
                master.as_tensor().clone()
            } else {
                cast.clone()
            };
            let plain = cast
                .index_select(&flat, 0)
                .unwrap()
                .reshape((2, 4, 6))
                .unwrap();
            let sink = GradSink::for_masters([master.as_tensor()]).unwrap();
            sink.alias(&cast, master.as_tensor()).unwrap();
            let rows = sink
                .scope(|| lookup(&table, &ids, dtype))
                .unwrap()
                .expect("the sink knows the table");
            assert_eq!((rows.dims(), rows.dtype()), (&[2, 4, 6][..], dtype));
            assert_eq!(max_diff(&rows, &plain), 0.0, "{dtype:?}: rows differ");
            let loss = |rows: &Tensor| {
                (rows.to_dtype(DType::F32).unwrap() * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let store = sink.backward(&loss(&rows)).unwrap();
            assert_eq!(sink.pending(), 0);
            let got = store.get(master.as_tensor()).expect("a table gradient");
            assert_eq!(got.dtype(), DType::F32);
            // The rows' gradient reaches them in their dtype (the cast's backward rounds it).
            let incoming = weights
                .to_dtype(dtype)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .reshape((8, 6))
                .unwrap();
            let want = Tensor::zeros((11, 6), DType::F32, &dev)
                .unwrap()
                .index_add(&flat, &incoming, 0)
                .unwrap();
            let err = max_diff(got, &want);
            assert!(err <= 1e-6, "{dtype:?}: table gradient off by {err}");
            if dtype == DType::F32 {
                let through_graph = loss(&plain).backward().unwrap();
                let graph = through_graph.get(master.as_tensor()).unwrap();
                let err = max_diff(got, graph);
                assert!(err <= 1e-6, "the graph's gradient differs by {err}");
            }
        }
    }

    #[test]
    fn without_a_sink_or_a_known_table_the_caller_keeps_the_plain_lookup() {
        let dev = Device::Cpu;
        let master = Var::randn(0f32, 1.0, (5, 3), &dev).unwrap();
        let ids = Tensor::new(&[1u32, 4], &dev).unwrap();
        assert!(lookup(master.as_tensor(), &ids, DType::F32)
            .unwrap()
            .is_none());
        let stranger = Tensor::zeros((5, 3), DType::F32, &dev).unwrap();
        let sink = GradSink::for_masters([master.as_tensor()]).unwrap();
        assert!(sink
            .scope(|| lookup(&stranger, &ids, DType::F32))
            .unwrap()
            .is_none());
        let past = Tensor::new(&[5u32], &dev).unwrap();
        let err = sink
            .scope(|| lookup(master.as_tensor(), &past, DType::F32))
            .unwrap_err()
            .to_string();
        assert!(err.contains("token id 5"), "{err}");
    }
}
