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

/// The sum of two or three lookups, `tables[k]` rows `ids[k]` (one shape of ids each), as one
/// node: the f32 masters' rows summed in order in `dtype`, rounded exactly as separate lookups and
/// adds round (the same bits, so that training does not depend on which path a step took), the
/// gradient of the sum scattered into each table and deposited in the sink in scope. `None` where no sink is
/// in scope or it does not know every table as an f32 master of one width (the caller sums the
/// plain lookups).
///
/// Why: an encoder's word, position and token-type embeddings were three gathers, two adds of
/// `[tokens, hidden]` rows, and backward a zero-filled gradient slot and an add for each of the
/// five (candle's gradient store); in one node there are one pass forward and three scatters
/// backward.
pub fn lookup_sum(tables: &[&Tensor], ids: &[&Tensor], dtype: DType) -> Result<Option<Tensor>> {
    if !(2..=3).contains(&tables.len()) || ids.len() != tables.len() {
        bail!("embedding sum: two or three tables, each with its ids");
    }
    let Some(sink) = GradSink::active() else {
        return Ok(None);
    };
    let Some(masters) = sink.masters_of(tables)? else {
        return Ok(None);
    };
    let n = tables[0].dim(D::Minus1)?;
    for (m, t) in masters.iter().zip(tables) {
        if m.dtype() != DType::F32 || m.dims() != t.dims() || m.rank() != 2 || m.dim(1)? != n {
            return Ok(None);
        }
    }
    for i in ids {
        if i.dtype() != DType::U32 || i.dims() != ids[0].dims() {
            bail!(
                "embedding sum: token ids must be u32 of one shape, got {:?} {:?} and {:?}",
                i.dtype(),
                i.dims(),
                ids[0].dims()
            );
        }
    }
    let mut dims = ids[0].dims().to_vec();
    dims.push(n);
    let flat = ids
        .iter()
        .map(|i| i.flatten_all()?.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let rows = masters[0].apply_op1(SinkEmbeddingSum {
        sink,
        masters: masters.clone(),
        ids: flat,
        dtype,
    })?;
    Ok(Some(rows.to_dtype(dtype)?.reshape(dims)?))
}

/// `lookup_sum`'s node, over the first master (the others and the ids held): forward the summed
/// rows in bf16 where `dtype` is (else f32), backward each table's scatter deposited in `sink`.
struct SinkEmbeddingSum {
    sink: GradSink,
    masters: Vec<Tensor>,
    ids: Vec<Tensor>,
    dtype: DType,
}

impl candle_core::CustomOp1 for SinkEmbeddingSum {
    fn name(&self) -> &'static str {
        "recycle-embedding-sum-into-sink"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        // Each master's rows in the rows' dtype (bf16 where asked, else f32), added in order in
        // it: what the separate lookups and adds gave, and what the kernel reproduces.
        let dtype = if self.dtype == DType::BF16 {
            DType::BF16
        } else {
            DType::F32
        };
        let mut sum: Option<Tensor> = None;
        for (m, i) in self.masters.iter().zip(&self.ids) {
            let rows = m.detach().index_select(i, 0)?.to_dtype(dtype)?;
            sum = Some(match sum {
                Some(s) => (s + rows)?,
                None => rows,
            });
        }
        let Some(sum) = sum else {
            bail!("embedding sum: no tables")
        };
        super::attention_node::cpu_storage_of(&sum, self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let guards: Vec<_> = self
            .masters
            .iter()
            .chain(&self.ids)
            .map(|t| t.storage_and_layout())
            .collect();
        let mut parts = Vec::with_capacity(guards.len());
        for (storage, layout) in &guards {
            let candle_core::Storage::Cuda(s) = &**storage else {
                bail!("embedding sum: a table or its ids not on a CUDA device")
            };
            parts.push((s, *layout));
        }
        let k = self.masters.len();
        let dtype = if self.dtype == DType::BF16 {
            DType::BF16
        } else {
            DType::F32
        };
        super::cuda::embedding_sum_storage(&parts[..k], &parts[k..], dtype)
    }

    fn bwd(&self, _: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        for (m, i) in self.masters.iter().zip(&self.ids) {
            let (vocab, n) = m.dims2()?;
            let g = table_grad(&grad, i, vocab, n)?;
            self.sink.deposit(m, &g)?;
        }
        Ok(None)
    }
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

    /// The largest difference between two tensors of any float dtype, in f32.
    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

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

    /// The summed lookup's rows are the separate lookups' rows added in order in the dtype, bit for
    /// bit; each table's gradient is the scatter of the sum's incoming gradient; with two or
    /// three tables, repeated ids included; `None` when the sink does not know every table.
    #[test]
    fn the_summed_lookup_is_the_f32_sum_and_scatters_its_gradient_to_every_table() {
        let dev = Device::Cpu;
        let masters: Vec<Var> = [(11, 6), (5, 6), (2, 6)]
            .iter()
            .map(|&d| Var::randn(0f32, 1.0, d, &dev).unwrap())
            .collect();
        let ids = [
            Tensor::new(&[[3u32, 0, 3, 10], [7, 3, 1, 1]], &dev).unwrap(),
            Tensor::new(&[[0u32, 1, 2, 3], [0, 1, 2, 4]], &dev).unwrap(),
            Tensor::new(&[[0u32, 0, 1, 1], [1, 0, 0, 0]], &dev).unwrap(),
        ];
        let weights = Tensor::randn(0f32, 1.0, (2, 4, 6), &dev).unwrap();
        for (dtype, tables) in [(DType::F32, 3), (DType::BF16, 3), (DType::BF16, 2)] {
            let sink = GradSink::for_masters(masters.iter().map(|m| m.as_tensor())).unwrap();
            let t: Vec<&Tensor> = masters[..tables].iter().map(|m| m.as_tensor()).collect();
            let i: Vec<&Tensor> = ids[..tables].iter().collect();
            let rows = sink
                .scope(|| lookup_sum(&t, &i, dtype))
                .unwrap()
                .expect("the sink knows every table");
            assert_eq!((rows.dims(), rows.dtype()), (&[2, 4, 6][..], dtype));
            // The separate lookups in the dtype, added in order in it.
            let lookup = |k: usize| {
                t[k].index_select(&i[k].flatten_all().unwrap(), 0)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let mut want = lookup(0);
            for k in 1..tables {
                want = (want + lookup(k)).unwrap();
            }
            let want = want.reshape((2, 4, 6)).unwrap();
            assert_eq!(
                max_diff(&rows, &want),
                0.0,
                "{dtype:?} {tables} tables: rows differ"
            );
            let loss = (rows.to_dtype(DType::F32).unwrap() * &weights)
                .unwrap()
                .sum_all()
                .unwrap();
            let store = sink.backward(&loss).unwrap();
            let incoming = weights
                .to_dtype(dtype)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .reshape((8, 6))
                .unwrap();
            for k in 0..tables {
                let (vocab, n) = t[k].dims2().unwrap();
                let want = Tensor::zeros((vocab, n), DType::F32, &dev)
                    .unwrap()
                    .index_add(&i[k].flatten_all().unwrap(), &incoming, 0)
                    .unwrap();
                let got = store.get(t[k]).expect("a table gradient");
                let err = max_diff(got, &want);
                assert!(err <= 1e-6, "{dtype:?} table {k}: gradient off by {err}");
            }
            assert_eq!(sink.pending(), 0);
        }
        // A table the sink does not know: the caller's plain lookups.
        let stranger = Tensor::zeros((5, 6), DType::F32, &dev).unwrap();
        let sink = GradSink::for_masters([masters[0].as_tensor()]).unwrap();
        let none = sink
            .scope(|| {
                lookup_sum(
                    &[masters[0].as_tensor(), &stranger],
                    &[&ids[0], &ids[1]],
                    DType::F32,
                )
            })
            .unwrap();
        assert!(none.is_none());
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
