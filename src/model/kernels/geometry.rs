//! Launch geometry of recycle's CUDA kernels, pure so that it is tested without a GPU (and used by
//! `kernels::cuda`, which only the `cuda` build compiles).

/// The copy unit of the head split/merge kernel (`swap12_u16` … `swap12_u128`): the widest of 16,
/// 8, 4 and 2 bytes that divides a run of `d` elements of `elem` bytes and the input's byte offset
/// into its buffer (`offset` elements; the output is a fresh allocation, aligned for any unit).
/// Returns the unit in bytes and `d` in units.
pub fn swap_unit(elem: usize, d: usize, offset: usize) -> (usize, usize) {
    let run = d * elem;
    let at = offset * elem;
    let unit = [16, 8, 4, 2]
        .into_iter()
        .find(|&u| run.is_multiple_of(u) && at.is_multiple_of(u))
        .unwrap_or(elem);
    (unit, run / unit)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swap_unit_is_the_widest_that_divides_the_run_and_the_offset() {
        // bf16 head of 64: 128-byte runs, 8 units of 16 bytes
        assert_eq!(swap_unit(2, 64, 0), (16, 8));
        // f32 head of 64: 16 units of 16 bytes
        assert_eq!(swap_unit(4, 64, 0), (16, 16));
        // an offset of one bf16 element allows only 2-byte units
        assert_eq!(swap_unit(2, 64, 1), (2, 64));
        // f32 offset by 2 elements (8 bytes): 8-byte units
        assert_eq!(swap_unit(4, 64, 2), (8, 32));
        // bf16 runs of 6 elements (12 bytes): 4-byte units
        assert_eq!(swap_unit(2, 6, 0), (4, 3));
        // an odd bf16 run is copied element by element
        assert_eq!(swap_unit(2, 3, 0), (2, 3));
        // f32 never goes below 4 bytes
        assert_eq!(swap_unit(4, 3, 0), (4, 3));
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
