//! `x @ W^T` for a few rows of `x` (decoding, scoring) with AVX-512: every weight row is
//! read from memory once, straight from its row-major storage.
//!
//! At few rows this product is bound by reading the weights. The gemm crate packs the
//! weight into panels first, so each call reads it, writes a copy and reads that again; in a
//! SmolLM2 check at 5 to 15 sequences its 1-row microkernel and that packing were half of
//! all cycles.
//!
//! Each output is one dot product summed in 16 lanes over `k` in order, then across lanes:
//! the same value whatever the number of rows or how the work is split over threads, so a
//! sequence decodes the same tokens alone and in a batch.

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    /// Rows of `x` per tile (x rows are padded to a multiple of it).
    const X_ROWS: usize = 4;
    /// Weight rows per tile: 4 x 4 accumulators, 4 x loads and a weight load fit the 32
    /// vector registers.
    const W_ROWS: usize = 4;
    /// Weight rows per parallel task.
    const TASK_ROWS: usize = 32;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    /// Where the tasks write: y [m, n], each task its own columns.
    struct Out(*mut f32);
    // SAFETY: tasks write disjoint elements (their own columns) and nothing reads y meanwhile.
    unsafe impl Sync for Out {}
    impl Out {
        fn column(&self, col: usize) -> *mut f32 {
            self.0.wrapping_add(col)
        }
    }

    /// y [m, n] = x [m, k] · w [n, k]^T, all row-major. Call only when [`available`].
    pub fn matmul(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        assert!(available() && x.len() == m * k && w.len() == n * k);
        let mp = m.div_ceil(X_ROWS) * X_ROWS;
        let mut xp = vec![0f32; mp * k];
        xp[..m * k].copy_from_slice(x);
        let mut y = vec![0f32; m * n];
        let out = Out(y.as_mut_ptr());
        w.par_chunks(TASK_ROWS * k).enumerate().for_each(|(t, task)| {
            let rows = task.len() / k;
            let mut j = 0;
            while j < rows {
                let c = W_ROWS.min(rows - j);
                let ws = &task[j * k..(j + c) * k];
                // The next tile of this task, fetched into the cache while this one computes.
                let next = &task[(j + c) * k..task.len().min((j + 2 * c) * k)];
                let col = t * TASK_ROWS + j;
                // SAFETY: avx512f was detected; `ws` holds c rows of k and `xp` mp rows of k;
                // columns col..col + c of y belong to this task alone and exist (col + c <= n).
                unsafe {
                    let dst = out.column(col);
                    match c {
                        4 => tile::<4>(&xp, m, mp, k, ws, next, dst, n),
                        3 => tile::<3>(&xp, m, mp, k, ws, next, dst, n),
                        2 => tile::<2>(&xp, m, mp, k, ws, next, dst, n),
                        _ => tile::<1>(&xp, m, mp, k, ws, next, dst, n),
                    }
                }
                j += c;
            }
        });
        y
    }

    /// `dst[i * n + c]` = row i of `xp` · row c of `ws`, for C weight rows and the first m
    /// of the mp rows.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const C: usize>(
        xp: &[f32],
        m: usize,
        mp: usize,
        k: usize,
        ws: &[f32],
        next: &[f32],
        dst: *mut f32,
        n: usize,
    ) {
        // Spread the prefetch of `next` (64-byte lines) over the first block's chunks.
        let lines = next.len().div_ceil(16);
        let per_chunk = lines.div_ceil(k.div_ceil(16)).max(1);
        for i0 in (0..mp).step_by(X_ROWS) {
            let mut acc = [[_mm512_setzero_ps(); C]; X_ROWS];
            let xr = xp[i0 * k..].as_ptr();
            let wr = ws.as_ptr();
            for (q, o) in (0..k).step_by(16).enumerate() {
                if i0 == 0 {
                    for l in q * per_chunk..lines.min((q + 1) * per_chunk) {
                        _mm_prefetch::<_MM_HINT_T0>(next.as_ptr().add(16 * l) as *const i8);
                    }
                }
                // The last chunk of a row not a multiple of 16 long reads only its own lanes.
                let lanes: __mmask16 = if k - o >= 16 { u16::MAX } else { ((1u32 << (k - o)) - 1) as u16 };
                let mut xv = [_mm512_setzero_ps(); X_ROWS];
                for (r, v) in xv.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(lanes, xr.add(r * k + o));
                }
                for c in 0..C {
                    let wv = _mm512_maskz_loadu_ps(lanes, wr.add(c * k + o));
                    for r in 0..X_ROWS {
                        acc[r][c] = _mm512_fmadd_ps(xv[r], wv, acc[r][c]);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate().take(m.saturating_sub(i0)) {
                for (c, a) in row.iter().enumerate() {
                    *dst.add((i0 + r) * n + c) = _mm512_reduce_add_ps(*a);
                }
            }
        }
    }
}

/// Whether [`matmul`] runs on this CPU.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return avx512::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// y [m, n] = x [m, k] · w [n, k]^T, all row-major f32. Call only when [`available`].
pub fn matmul(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    return avx512::matmul(x, w, m, k, n);
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("few_rows::matmul without AVX-512 ({m}x{k}x{n})")
}
