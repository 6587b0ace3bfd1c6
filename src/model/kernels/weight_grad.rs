//! The weight gradient of a dense layer, `dW = dyᵀ·x` summed over every row of a batch, optionally
//! split over the rows ("split-K"): `parts` products over a slice of the rows each, run as one
//! batched product, then added.
//!
//! Why: at roberta-base's shapes the weight gradient reduces over `batch × seq` rows (16,384 at
//! batch 128) into a small result (768 × 768 for q, k, v and the output projection), so one product
//! has few output tiles for a GPU's many multiprocessors; an H200 ran the h→4h layer's two backward
//! products at 290 TFLOP/s against 480 forward (docs/cuda.md, "Why not 40 % MFU"). Split in
//! `parts`, the same work has `parts` times the tiles, for one extra pass over the small result.
//! Whether it pays is measured by `recycle gpu-check` (the weight-gradient product rows and an A/B
//! row), so the split is off unless `set_split` turns it on.

use candle_core::{bail, DType, Result, Tensor};
use std::sync::atomic::{AtomicUsize, Ordering};

static SPLIT: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    /// Split products run on this thread, for tests that must know the split ran.
    static SPLITS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many weight gradients this thread has computed split.
pub fn splits_made() -> usize {
    SPLITS.with(|c| c.get())
}

/// Splits every weight gradient the dense layers on the device compute (the block nodes' and the
/// CUDA dense layer's) into `parts` products over the rows (1: one product, the default).
pub fn set_split(parts: usize) {
    SPLIT.store(parts.max(1), Ordering::Relaxed);
}

/// The split `set_split` chose.
pub fn split() -> usize {
    SPLIT.load(Ordering::Relaxed)
}

/// How many products a split in `parts` of `rows` rows runs: `parts` where it divides the rows
/// evenly, else one (a batch whose rows do not divide, such as an epoch's last, runs unsplit).
pub fn parts_for(rows: usize, parts: usize) -> usize {
    if parts > 1 && rows >= parts && rows.is_multiple_of(parts) {
        parts
    } else {
        1
    }
}

/// `dyᵀ·x` (`dy` `[rows, out]`, `x` `[rows, in]`, one dtype) as `[out, in]`, split as `set_split`
/// chose.
pub fn weight_grad(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    weight_grad_split(dy, x, split())
}

/// `dyᵀ·x` split over the rows in `parts` (`parts_for`): each part's product rounds to the
/// operands' dtype, and the parts are added in f32 and rounded once.
pub fn weight_grad_split(dy: &Tensor, x: &Tensor, parts: usize) -> Result<Tensor> {
    let (rows, out) = dy.dims2()?;
    let (x_rows, inp) = x.dims2()?;
    if rows != x_rows {
        bail!("weight gradient: {rows} rows of output gradient against {x_rows} rows of input");
    }
    let parts = parts_for(rows, parts);
    if parts == 1 {
        return dy.t()?.matmul(x);
    }
    let per = rows / parts;
    SPLITS.with(|c| c.set(c.get() + 1));
    // [parts, out, per]: a transposed view, which the batched product reads as it is.
    let dy = dy
        .contiguous()?
        .reshape((parts, per, out))?
        .transpose(1, 2)?;
    let x = x.contiguous()?.reshape((parts, per, inp))?;
    sum_parts(&dy.matmul(&x)?)
}

/// The sum over the first dimension of `partial`, accumulated in f32, in `partial`'s dtype.
fn sum_parts(partial: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if partial.device().is_cuda() {
        return super::cuda::split_sum(partial);
    }
    partial
        .to_dtype(DType::F32)?
        .sum(0)?
        .to_dtype(partial.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.to_dtype(DType::F32).unwrap();
        let b = b.to_dtype(DType::F32).unwrap();
        let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
        let scale = b.abs().unwrap().max_all().unwrap();
        diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap()
    }

    #[test]
    fn a_split_divides_the_rows_or_does_not_happen() {
        assert_eq!(parts_for(4096, 4), 4);
        assert_eq!(parts_for(4096, 1), 1);
        assert_eq!(parts_for(4096, 0), 1);
        assert_eq!(parts_for(30, 4), 1);
        assert_eq!(parts_for(3, 4), 1);
        assert_eq!(parts_for(8, 8), 8);
    }

    #[test]
    fn split_products_add_up_to_the_whole_product() {
        let dev = Device::Cpu;
        let dy = Tensor::randn(0f32, 1.0, (48, 5), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (48, 7), &dev).unwrap();
        let whole = dy.t().unwrap().matmul(&x).unwrap();
        for parts in [2, 3, 4, 8, 48] {
            let split = weight_grad_split(&dy, &x, parts).unwrap();
            assert_eq!(split.dims(), &[5, 7]);
            let rel = max_rel(&split, &whole);
            assert!(rel < 1e-5, "{parts} parts: relative difference {rel}");
        }
        // Five parts do not divide 48 rows: the one product.
        let five = weight_grad_split(&dy, &x, 5).unwrap();
        assert_eq!(max_rel(&five, &whole), 0.0);
    }

    #[test]
    fn split_products_in_bf16_stay_close_to_the_f32_product() {
        let dev = Device::Cpu;
        let dy = Tensor::randn(0f32, 1.0, (256, 6), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (256, 9), &dev).unwrap();
        let whole = dy.t().unwrap().matmul(&x).unwrap();
        let (dyb, xb) = (
            dy.to_dtype(DType::BF16).unwrap(),
            x.to_dtype(DType::BF16).unwrap(),
        );
        let split = weight_grad_split(&dyb, &xb, 4).unwrap();
        assert_eq!(split.dtype(), DType::BF16);
        let rel = max_rel(&split, &whole);
        assert!(rel < 2e-2, "relative difference {rel}");
    }

    #[test]
    fn rows_must_agree() {
        let dev = Device::Cpu;
        let dy = Tensor::zeros((8, 3), DType::F32, &dev).unwrap();
        let x = Tensor::zeros((9, 3), DType::F32, &dev).unwrap();
        let err = weight_grad_split(&dy, &x, 2).unwrap_err().to_string();
        assert!(err.contains("8 rows") && err.contains("9 rows"), "{err}");
    }
}
