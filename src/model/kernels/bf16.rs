//! Matrix products of the gradient pass in bf16 with f32 sums (`vdpbf16ps`, AVX512-BF16),
//! for the `mixed` precision: `x @ W^T` forward and `g @ W` for the input gradient.
//!
//! Each `vdpbf16ps` multiplies 16 pairs of bf16 values and adds both products of a pair to an
//! f32 lane: twice the products of an f32 fused multiply-add. Inputs are rounded to bf16
//! (8 bits of mantissa) once; every sum stays in f32.
//!
//! Layout (as in BLIS-style kernels): the left operand is read row by row, two consecutive
//! values of the summed dimension broadcast as one 32-bit pair; the right operand is packed
//! once per call into panels of 32 output columns, where each 64-byte vector holds the same
//! pair for 16 columns. A tile of 6 rows by 32 columns keeps its 12 accumulators in
//! registers over the whole summed dimension.

use rayon::prelude::*;

/// Output columns per panel: two vectors of 16 lanes.
const COLS: usize = 32;
/// Rows of the left operand per tile.
const ROWS: usize = 6;
/// Rows of the left operand per parallel chunk at most: its bf16 copy stays in the cache
/// while every panel passes over it.
const CHUNK_ROWS: usize = 384;

/// Whether this CPU has the bf16 dot product (and the AVX-512 around it), and
/// `GREATER_ISA` allows it.
pub fn available() -> bool {
    cfg!(target_arch = "x86_64") && super::isa::features().avx512_bf16
}

/// How the right operand `w` [rows, cols] (row-major f32) enters the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    /// `a @ w^T`: sums over w's columns; the output has one column per row of w.
    Transposed,
    /// `a @ w`: sums over w's rows; the output has one column per column of w.
    Plain,
}

/// f32 to bf16 bits, rounding to nearest even (as `vcvtne2ps2bf16` does, denormals kept;
/// NaN stays NaN). Without branches, so that the packing loops vectorise.
#[inline(always)]
fn to_bf16(v: f32) -> u32 {
    let bits = v.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16;
    if v.is_nan() {
        (bits >> 16) | 0x40
    } else {
        rounded
    }
}

/// Two values as the bf16 pair `vdpbf16ps` reads as one 32-bit lane (the first in the low
/// half).
#[inline(always)]
fn pair(first: f32, second: f32) -> u32 {
    to_bf16(first) | (to_bf16(second) << 16)
}

/// `w` packed into panels: `[panel][pair of the summed dimension][32 columns]` bf16 pairs,
/// zeros past the ends.
fn pack_right(w: &[f32], rows: usize, cols: usize, right: Right) -> (Vec<u32>, usize, usize) {
    let (sum_len, out_cols) = match right {
        Right::Transposed => (cols, rows),
        Right::Plain => (rows, cols),
    };
    let pairs = sum_len.div_ceil(2);
    let panels = out_cols.div_ceil(COLS);
    let mut packed = vec![0u32; panels * pairs * COLS];
    packed.par_chunks_mut(pairs * COLS).enumerate().for_each(|(p, panel)| {
        let first = p * COLS;
        let width = COLS.min(out_cols - first);
        // SAFETY: only `matmul` packs, after asserting available().
        #[cfg(target_arch = "x86_64")]
        unsafe {
            fill_panel(w, cols, sum_len, first, width, right, panel)
        };
    });
    (packed, pairs, out_cols)
}

/// One panel of [`pack_right`]: output columns `first..first + width`. Compiled for
/// AVX-512 so that the conversions run 16 at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn fill_panel(
    w: &[f32],
    cols: usize,
    sum_len: usize,
    first: usize,
    width: usize,
    right: Right,
    panel: &mut [u32],
) {
    match right {
        Right::Transposed => {
            // A row of w holds one output column: its pairs are adjacent values.
            let mut column = vec![0u32; sum_len.div_ceil(2)];
            for c in 0..width {
                pack_row(&w[(first + c) * cols..][..cols], &mut column);
                for (p, &v) in column.iter().enumerate() {
                    panel[p * COLS + c] = v;
                }
            }
        }
        Right::Plain => {
            // A pair spans two rows of w.
            for (p, dst) in panel.chunks_exact_mut(COLS).enumerate() {
                let r0 = &w[2 * p * cols + first..][..width];
                if 2 * p + 1 < sum_len {
                    let r1 = &w[(2 * p + 1) * cols + first..][..width];
                    for ((d, &a), &b) in dst.iter_mut().zip(r0).zip(r1) {
                        *d = pair(a, b);
                    }
                } else {
                    for (d, &a) in dst.iter_mut().zip(r0) {
                        *d = pair(a, 0.0);
                    }
                }
            }
        }
    }
}

/// A row's values as bf16 pairs, the last one padded with zero.
#[inline(always)]
fn pack_row(src: &[f32], dst: &mut [u32]) {
    let mut chunks = src.chunks_exact(2);
    for (d, two) in dst.iter_mut().zip(&mut chunks) {
        *d = pair(two[0], two[1]);
    }
    if let [last] = chunks.remainder() {
        dst[src.len() / 2] = pair(*last, 0.0);
    }
}

/// Rows of `a` [m, k] as bf16 pairs, each row padded to a whole pair.
fn pack_left(a: &[f32], k: usize) -> Vec<u32> {
    let pairs = k.div_ceil(2);
    let mut out = vec![0u32; a.len() / k * pairs];
    out.par_chunks_mut(pairs).zip(a.par_chunks(k)).for_each(|(dst, src)| {
        // SAFETY: only `matmul` packs, after asserting available().
        #[cfg(target_arch = "x86_64")]
        unsafe {
            pack_row_avx512(src, dst)
        };
    });
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_row_avx512(src: &[f32], dst: &mut [u32]) {
    pack_row(src, dst)
}

/// `a` [m, k] times `w` as `right` says, in bf16 products with f32 sums. Call only when
/// [`available`].
pub fn matmul(a: &[f32], k: usize, w: &[f32], rows: usize, cols: usize, right: Right) -> Vec<f32> {
    assert!(available(), "bf16::matmul without AVX512-BF16");
    let sum_len = if right == Right::Transposed { cols } else { rows };
    assert!(
        k == sum_len && a.len().is_multiple_of(k) && w.len() == rows * cols,
        "bf16::matmul: shapes do not match"
    );
    let m = a.len() / k;
    let (panels, pairs, n) = pack_right(w, rows, cols, right);
    let left = pack_left(a, k);
    let mut y = vec![0f32; m * n];
    // At least four chunks per thread, so that a few hundred rows also keep every core busy.
    let chunk_rows =
        m.div_ceil(4 * rayon::current_num_threads()).next_multiple_of(ROWS).min(CHUNK_ROWS);
    y.par_chunks_mut(chunk_rows * n).enumerate().for_each(|(chunk, out)| {
        let left = &left[chunk * chunk_rows * pairs..][..out.len() / n * pairs];
        for panel in 0..n.div_ceil(COLS) {
            let b = &panels[panel * pairs * COLS..][..pairs * COLS];
            // SAFETY: available() was asserted; `left` holds the chunk's rows of `pairs`
            // bf16 pairs, `b` a panel of `pairs` pairs, and `out` the chunk's rows of y.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                kernel::panel(left, b, pairs, out, n, panel * COLS)
            };
        }
    });
    y
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    use super::{COLS, ROWS};

    /// Columns `col..col + 32` (clipped to n) of `out` [rows, n] = `left` rows · panel `b`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn panel(
        left: &[u32],
        b: &[u32],
        pairs: usize,
        out: &mut [f32],
        n: usize,
        col: usize,
    ) {
        let rows = left.len() / pairs;
        let cols = COLS.min(n - col);
        let mut r = 0;
        while r < rows {
            let take = ROWS.min(rows - r);
            let a = left.as_ptr().add(r * pairs);
            let y = out.as_mut_ptr().add(r * n + col);
            match take {
                6 => tile::<6>(a, b, pairs, y, n, cols),
                5 => tile::<5>(a, b, pairs, y, n, cols),
                4 => tile::<4>(a, b, pairs, y, n, cols),
                3 => tile::<3>(a, b, pairs, y, n, cols),
                2 => tile::<2>(a, b, pairs, y, n, cols),
                _ => tile::<1>(a, b, pairs, y, n, cols),
            }
            r += take;
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn tile<const R: usize>(
        a: *const u32,
        b: &[u32],
        pairs: usize,
        y: *mut f32,
        n: usize,
        cols: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let bp = b.as_ptr();
        for p in 0..pairs {
            let b0: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(bp.add(p * COLS) as *const _));
            let b1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(bp.add(p * COLS + 16) as *const _));
            for (i, row) in acc.iter_mut().enumerate() {
                let av: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*a.add(i * pairs + p) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], av, b0);
                row[1] = _mm512_dpbf16_ps(row[1], av, b1);
            }
        }
        let mask = |lanes: usize| -> __mmask16 {
            if lanes >= 16 {
                u16::MAX
            } else {
                ((1u32 << lanes) - 1) as u16
            }
        };
        let (m0, m1) = (mask(cols), mask(cols.saturating_sub(16)));
        for (i, row) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(y.add(i * n), m0, row[0]);
            _mm512_mask_storeu_ps(y.add(i * n + 16), m1, row[1]);
        }
    }
}
