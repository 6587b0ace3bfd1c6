//! Launch geometry of recycle's CUDA kernels, pure so that it is tested without a GPU (and used by
//! `kernels::cuda`, which only the `cuda` build compiles).

/// The copy unit of the head split/merge kernel (`swap12_u16` … `swap12_u128`): the widest of 16,
/// 8, 4 and 2 bytes that divides a run of `d` elements of `elem` bytes and each of `aligned`
/// (element counts the kernel adds to a pointer: offsets into buffers, row strides), never less
/// than an element. Returns the unit in bytes and `d` in units.
pub fn swap_unit(elem: usize, d: usize, aligned: &[usize]) -> (usize, usize) {
    let run = d * elem;
    let unit = [16, 8, 4, 2]
        .into_iter()
        .find(|&u| run.is_multiple_of(u) && aligned.iter().all(|a| (a * elem).is_multiple_of(u)))
        .unwrap_or(elem)
        .max(elem);
    (unit, run / unit)
}

/// One launch of the swap kernel, `y [a, c, b, d]` from `x [a, b, c, d]`, everything in the
/// kernel's units: `x`'s `(a, b)` rows lie `x_row` apart and `y`'s `(a, c)` slabs `y_row` apart
/// (wider than `c · d` and `b · d` when a tensor holds several parts side by side), and the kernel
/// starts `x_offset` and `y_offset` units into the buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwapPlan {
    /// Bytes per unit.
    pub unit: usize,
    pub d: u32,
    pub x_row: u32,
    pub y_row: u32,
    pub x_offset: usize,
    pub y_offset: usize,
}

/// The plan for `[a, b, c, d]` elements of `elem` bytes, with rows of `x_row` and `y_row`
/// elements and offsets of `x_offset` and `y_offset` elements; `None` where an index would pass
/// the kernel's 32 bits.
pub fn swap_plan(
    elem: usize,
    [a, b, c, d]: [usize; 4],
    (x_row, y_row): (usize, usize),
    (x_offset, y_offset): (usize, usize),
) -> Option<SwapPlan> {
    let (unit, d_units) = swap_unit(elem, d, &[x_row, y_row, x_offset, y_offset]);
    let per = unit / elem;
    let fits = |v: usize| u32::try_from(v).ok();
    // The kernel takes the sizes and strides as 32-bit values and forms the slab `b · d` and the
    // index within it in 32 bits (the rest in 64); `c` is the grid's x dimension.
    fits(b * d_units)?;
    fits(a)?;
    if c > i32::MAX as usize {
        return None;
    }
    Some(SwapPlan {
        unit,
        d: fits(d_units)?,
        x_row: fits(x_row / per)?,
        y_row: fits(y_row / per)?,
        x_offset: x_offset / per,
        y_offset: y_offset / per,
    })
}

/// Grid and block of the swap kernel for `[a, b, c, d]` with `d` in units: one block per
/// `(ic, ia)` (blocks stride over `ia` past the grid's 65,535 rows), whole warps up to 256 threads
/// along a slab of `b · d` units.
pub fn swap_launch(a: usize, b: usize, c: usize, d_units: usize) -> ((u32, u32, u32), u32) {
    let slab = b * d_units;
    let threads = (slab.div_ceil(32) * 32).clamp(32, 256) as u32;
    ((c as u32, a.clamp(1, 65_535) as u32, 1), threads)
}

/// Blocks and threads of a kernel that gives each of `rows` rows of `n` elements to one block
/// (striding past 2^31 - 1 rows) and walks the row with whole warps, up to 256 threads.
pub fn rows_launch(rows: usize, n: usize) -> (u32, u32) {
    let threads = (n.div_ceil(32) * 32).clamp(32, 256) as u32;
    (rows.clamp(1, i32::MAX as usize) as u32, threads)
}

/// Threads an elementwise kernel needs for `n` elements of `elem` bytes: one per 16-byte pack
/// (`map1`/`map2` in kernels.cu; when a pointer is not 16-byte aligned the same threads stride over
/// single elements).
pub fn packs(n: usize, elem: usize) -> usize {
    n.div_ceil(16 / elem)
}

/// Whether the bias kernel takes 16-byte packs of columns (`bias_add` in kernels.cu) for rows of
/// `n` elements of `elem` bytes whose operands start `offsets` elements into their buffers (the
/// output is a fresh allocation or one of them): when a row is whole packs and every operand is
/// aligned to one. Returns the columns one thread takes (the pack's elements, or 1).
pub fn bias_columns_per_thread(elem: usize, n: usize, offsets: &[usize]) -> usize {
    let packed =
        (n * elem).is_multiple_of(16) && offsets.iter().all(|o| (o * elem).is_multiple_of(16));
    if packed {
        16 / elem
    } else {
        1
    }
}

/// Warps a block of the one-pass layer norm backward (`LN_FUSED_WARPS` in kernels.cu) has.
pub const LN_FUSED_WARPS: usize = 8;

/// Blocks of the one-pass layer norm backward (`layer_norm_bwd_fused`) for `rows` rows: one per 16
/// rows (each warp takes two), at most 512 (past 8,192 rows each warp takes more, and the blocks'
/// partial sums stay at most 512 rows of `2n`).
pub fn ln_fused_blocks(rows: usize) -> u32 {
    rows.div_ceil(2 * LN_FUSED_WARPS).clamp(1, 512) as u32
}

/// Packs of 16 bytes a lane holds in the packed layer norm kernels (`ln_vec_slots` in kernels.cu)
/// for rows of `n` elements of `elem` bytes, one warp a row: `n` a whole number of 32 packs and at
/// most 32 elements a lane, in the counts the kernels are built for (1 to 4, and 6 or 8 for f32).
/// 0: the row does not fit them.
pub fn ln_vec_slots(elem: usize, n: usize) -> usize {
    let per = 16 / elem;
    if n == 0 || !n.is_multiple_of(32 * per) || n / 32 > 32 {
        return 0;
    }
    match n / (32 * per) {
        s @ 1..=4 => s,
        s @ (6 | 8) if elem == 4 => s,
        _ => 0,
    }
}

/// Elements a lane holds in the chunked softmax kernels (`softmax_vec_width` in kernels.cu) for
/// rows of `k` elements of `elem` bytes: `k / 32` where that is 2, 4 or 8 and its bytes (4, 8 or
/// 16) one access; 0 where `k` takes the per-element kernels. Every pointer must also be aligned
/// to `width · elem` bytes.
pub fn softmax_vec_width(elem: usize, k: usize) -> usize {
    let v = k / 32;
    if k.is_multiple_of(32) && matches!(v, 2 | 4 | 8) && v * elem <= 16 {
        v
    } else {
        0
    }
}

/// Rows a block of the packed layer norm's column sums (`layer_norm_dwdb_cols`) takes: `rows / 256`
/// rounded up to a multiple of 8 (its eight row groups), at least 32, so that a batch has at most
/// 256 chunks of partial sums to add (roberta-base at batch 128: 64 rows a chunk, 256 chunks).
pub fn ln_col_chunk(rows: usize) -> usize {
    rows.div_ceil(256).next_multiple_of(8).max(32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_layer_norm_rows_are_whole_packs_a_lane_within_the_registers() {
        // bf16: 8 elements a pack, 256 a warp's pass
        assert_eq!(ln_vec_slots(2, 768), 3);
        assert_eq!(ln_vec_slots(2, 256), 1);
        assert_eq!(ln_vec_slots(2, 1024), 4);
        assert_eq!(ln_vec_slots(2, 384), 0);
        assert_eq!(ln_vec_slots(2, 2048), 0);
        // f32: 4 a pack, 128 a pass
        assert_eq!(ln_vec_slots(4, 768), 6);
        assert_eq!(ln_vec_slots(4, 384), 3);
        assert_eq!(ln_vec_slots(4, 1024), 8);
        assert_eq!(ln_vec_slots(4, 640), 0);
        assert_eq!(ln_vec_slots(4, 896), 0);
        assert_eq!(ln_vec_slots(4, 0), 0);
    }

    #[test]
    fn chunked_softmax_rows_are_one_access_a_lane() {
        // bf16: rows of 64, 128, 256 (4, 8, 16 bytes a lane)
        assert_eq!(softmax_vec_width(2, 64), 2);
        assert_eq!(softmax_vec_width(2, 128), 4);
        assert_eq!(softmax_vec_width(2, 256), 8);
        assert_eq!(softmax_vec_width(2, 512), 0);
        assert_eq!(softmax_vec_width(2, 96), 0);
        assert_eq!(softmax_vec_width(2, 130), 0);
        // f32: 64 and 128 only (256 would be 32 bytes a lane)
        assert_eq!(softmax_vec_width(4, 64), 2);
        assert_eq!(softmax_vec_width(4, 128), 4);
        assert_eq!(softmax_vec_width(4, 256), 0);
        assert_eq!(softmax_vec_width(4, 32), 0);
    }

    #[test]
    fn layer_norm_column_chunks_cap_the_partial_sums() {
        assert_eq!(ln_col_chunk(1), 32);
        assert_eq!(ln_col_chunk(4096), 32);
        assert_eq!(ln_col_chunk(16384), 64);
        assert_eq!(ln_col_chunk(32768), 128);
        assert_eq!(ln_col_chunk(16385), 72);
        for rows in [1, 100, 8191, 16384, 65537, 1 << 22] {
            let chunk = ln_col_chunk(rows);
            assert!(
                chunk.is_multiple_of(8) && rows.div_ceil(chunk) <= 256,
                "{rows}"
            );
        }
    }

    #[test]
    fn ln_fused_blocks_give_every_warp_rows_and_cap_the_partial_sums() {
        assert_eq!(ln_fused_blocks(0), 1);
        assert_eq!(ln_fused_blocks(5), 1);
        assert_eq!(ln_fused_blocks(17), 2);
        // roberta-base at batch 32 and seq 128: 4,096 rows, two a warp
        assert_eq!(ln_fused_blocks(32 * 128), 256);
        // batch 128: capped, four rows a warp
        assert_eq!(ln_fused_blocks(128 * 128), 512);
        assert_eq!(ln_fused_blocks(1 << 30), 512);
    }

    #[test]
    fn swap_unit_is_the_widest_that_divides_the_run_and_the_offset() {
        // bf16 head of 64: 128-byte runs, 8 units of 16 bytes
        assert_eq!(swap_unit(2, 64, &[0]), (16, 8));
        // f32 head of 64: 16 units of 16 bytes
        assert_eq!(swap_unit(4, 64, &[0]), (16, 16));
        // an offset of one bf16 element allows only 2-byte units
        assert_eq!(swap_unit(2, 64, &[1]), (2, 64));
        // f32 offset by 2 elements (8 bytes): 8-byte units
        assert_eq!(swap_unit(4, 64, &[2]), (8, 32));
        // bf16 runs of 6 elements (12 bytes): 4-byte units
        assert_eq!(swap_unit(2, 6, &[0]), (4, 3));
        // an odd bf16 run is copied element by element
        assert_eq!(swap_unit(2, 3, &[0]), (2, 3));
        // f32 never goes below 4 bytes
        assert_eq!(swap_unit(4, 3, &[0]), (4, 3));
        // a row stride counts like an offset: 12 bf16 elements (24 bytes) allow 8-byte units
        assert_eq!(swap_unit(2, 64, &[0, 12]), (8, 16));
    }

    #[test]
    fn swap_plan_for_q_k_v_parts_of_one_product() {
        // roberta-base at batch 128, bf16: k is part 1 of [128, 128, 3 * 768]; x = [b, s, h, d]
        // with rows of 3 * 768, starting 768 elements in; y dense.
        let p = swap_plan(2, [128, 128, 12, 64], (3 * 768, 128 * 64), (768, 0)).unwrap();
        assert_eq!(
            p,
            SwapPlan {
                unit: 16,
                d: 8,
                x_row: 3 * 96,
                y_row: 1024,
                x_offset: 96,
                y_offset: 0
            }
        );
        // the merge of dv into part 2 of [b, s, 3 * 768]: x = [b, h, s, d] dense, y slabs of
        // 3 * 768 from 2 * 768 in
        let p = swap_plan(2, [128, 12, 128, 64], (128 * 64, 3 * 768), (0, 2 * 768)).unwrap();
        assert_eq!((p.x_row, p.y_row, p.y_offset), (1024, 288, 192));
        // a part offset of one f32 element: 4-byte units, everything in elements
        let p = swap_plan(4, [2, 3, 4, 8], (96, 24), (1, 0)).unwrap();
        assert_eq!((p.unit, p.d, p.x_row, p.x_offset), (4, 8, 96, 1));
        // a slab past 32 bits
        assert_eq!(
            swap_plan(2, [2, 1 << 30, 2, 64], (128, 1 << 30), (0, 0)),
            None
        );
        // a row stride past 32 bits
        assert_eq!(swap_plan(4, [2, 2, 2, 1], (1 << 34, 2), (0, 0)), None);
    }

    #[test]
    fn swap_launch_covers_every_slab_with_whole_warps() {
        // roberta-base split at batch 128: a = 128, b = seq 128, c = heads 12, 8 units a head
        assert_eq!(swap_launch(128, 128, 12, 8), ((12, 128, 1), 256));
        // the merge: b = heads 12, c = seq 128: 96-unit slabs, three warps
        assert_eq!(swap_launch(128, 12, 128, 8), ((128, 128, 1), 96));
        // a batch past the grid's y limit is strided over
        assert_eq!(swap_launch(70_000, 2, 3, 1), ((3, 65_535, 1), 32));
    }

    #[test]
    fn packs_hold_16_bytes() {
        assert_eq!(packs(3072, 2), 384);
        assert_eq!(packs(3072, 4), 768);
        assert_eq!(packs(3001, 4), 751);
        assert_eq!(packs(1, 2), 1);
    }

    #[test]
    fn bias_takes_packs_only_when_rows_and_bias_are_whole_packs() {
        assert_eq!(bias_columns_per_thread(2, 768, &[0, 0]), 8);
        assert_eq!(bias_columns_per_thread(4, 3072, &[0, 0]), 4);
        assert_eq!(bias_columns_per_thread(2, 300, &[0, 0]), 1);
        // the bias, or the input, one pack off alignment
        assert_eq!(bias_columns_per_thread(4, 768, &[0, 2]), 1);
        assert_eq!(bias_columns_per_thread(4, 768, &[2, 0]), 1);
        assert_eq!(bias_columns_per_thread(4, 768, &[4, 4]), 4);
    }

    #[test]
    fn rows_launch_gives_each_row_a_block() {
        assert_eq!(rows_launch(4096, 768), (4096, 256));
        assert_eq!(rows_launch(3, 20), (3, 32));
        assert_eq!(rows_launch(0, 20), (1, 32));
    }
}
