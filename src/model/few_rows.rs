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

use super::packed::PackedWeight;

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    use super::PackedWeight;

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

    /// A weight [n, k] the tiles read 16 columns at a time.
    pub trait Rows: Sync {
        fn n(&self) -> usize;
        fn k(&self) -> usize;
        /// Columns `o..o + 16` of row `r` as f32, lanes outside `lanes` zero.
        ///
        /// # Safety
        /// avx512f is available, `r < n` and the lanes in `lanes` lie inside the row.
        unsafe fn load(&self, r: usize, o: usize, lanes: __mmask16) -> __m512;
        /// The bytes that hold rows `rows`, for prefetching.
        fn bytes(&self, rows: std::ops::Range<usize>) -> &[u8];
    }

    pub struct Plain<'a> {
        pub w: &'a [f32],
        pub k: usize,
    }

    impl Rows for Plain<'_> {
        fn n(&self) -> usize {
            self.w.len() / self.k
        }
        fn k(&self) -> usize {
            self.k
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load(&self, r: usize, o: usize, lanes: __mmask16) -> __m512 {
            _mm512_maskz_loadu_ps(lanes, self.w.as_ptr().add(r * self.k + o))
        }
        fn bytes(&self, rows: std::ops::Range<usize>) -> &[u8] {
            let w = &self.w[rows.start * self.k..rows.end * self.k];
            // SAFETY: any initialised f32 slice is readable as bytes.
            unsafe { std::slice::from_raw_parts(w.as_ptr() as *const u8, std::mem::size_of_val(w)) }
        }
    }

    impl Rows for PackedWeight {
        fn n(&self) -> usize {
            self.n
        }
        fn k(&self) -> usize {
            self.k
        }
        /// `k` is a multiple of the block (16 or 32), so 16 columns share one scale and no
        /// lane is ever masked.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load(&self, r: usize, o: usize, _lanes: __mmask16) -> __m512 {
            let at = r * self.k + o;
            let b = at / self.block;
            let q = _mm_loadu_si128(self.q.as_ptr().add(at) as *const __m128i);
            let w = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), _mm512_set1_ps(*self.scale.get_unchecked(b)));
            match &self.offset {
                Some(off) => _mm512_add_ps(w, _mm512_set1_ps(*off.get_unchecked(b))),
                None => w,
            }
        }
        fn bytes(&self, rows: std::ops::Range<usize>) -> &[u8] {
            let q = &self.q[rows.start * self.k..rows.end * self.k];
            // SAFETY: i8 and u8 have the same layout.
            unsafe { std::slice::from_raw_parts(q.as_ptr() as *const u8, q.len()) }
        }
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

    /// y [m, n] = x [m, k] · w [n, k]^T, row-major. Call only when [`available`].
    pub fn matmul<R: Rows>(x: &[f32], w: &R, m: usize) -> Vec<f32> {
        let (n, k) = (w.n(), w.k());
        assert!(available() && x.len() == m * k);
        let mp = m.div_ceil(X_ROWS) * X_ROWS;
        let mut xp = vec![0f32; mp * k];
        xp[..m * k].copy_from_slice(x);
        let mut y = vec![0f32; m * n];
        let out = Out(y.as_mut_ptr());
        (0..n.div_ceil(TASK_ROWS)).into_par_iter().for_each(|t| {
            let end = n.min((t + 1) * TASK_ROWS);
            let mut j = t * TASK_ROWS;
            while j < end {
                let c = W_ROWS.min(end - j);
                // The next tile of this task, fetched into the cache while this one computes.
                let next = w.bytes(j + c..end.min(j + 2 * c));
                // SAFETY: avx512f was detected; rows j..j + c of w exist and `xp` holds mp
                // rows of k; columns j..j + c of y belong to this task alone.
                unsafe {
                    let dst = out.column(j);
                    match c {
                        4 => tile::<4, R>(&xp, m, mp, w, j, next, dst, n),
                        3 => tile::<3, R>(&xp, m, mp, w, j, next, dst, n),
                        2 => tile::<2, R>(&xp, m, mp, w, j, next, dst, n),
                        _ => tile::<1, R>(&xp, m, mp, w, j, next, dst, n),
                    }
                }
                j += c;
            }
        });
        y
    }

    /// `dst[i * n + c]` = row i of `xp` · row j0 + c of `w`, for C weight rows and the
    /// first m of the mp rows.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const C: usize, R: Rows>(
        xp: &[f32],
        m: usize,
        mp: usize,
        w: &R,
        j0: usize,
        next: &[u8],
        dst: *mut f32,
        n: usize,
    ) {
        let k = w.k();
        // Spread the prefetch of `next` (64-byte lines) over the first block's chunks.
        let lines = next.len().div_ceil(64);
        let per_chunk = lines.div_ceil(k.div_ceil(16)).max(1);
        for i0 in (0..mp).step_by(X_ROWS) {
            let mut acc = [[_mm512_setzero_ps(); C]; X_ROWS];
            let xr = xp[i0 * k..].as_ptr();
            for (q, o) in (0..k).step_by(16).enumerate() {
                if i0 == 0 {
                    for l in q * per_chunk..lines.min((q + 1) * per_chunk) {
                        _mm_prefetch::<_MM_HINT_T0>(next.as_ptr().add(64 * l) as *const i8);
                    }
                }
                // The last chunk of a row not a multiple of 16 long reads only its own lanes.
                let lanes: __mmask16 = if k - o >= 16 { u16::MAX } else { ((1u32 << (k - o)) - 1) as u16 };
                let mut xv = [_mm512_setzero_ps(); X_ROWS];
                for (r, v) in xv.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(lanes, xr.add(r * k + o));
                }
                for c in 0..C {
                    let wv = w.load(j0 + c, o, lanes);
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
    assert_eq!(w.len(), n * k, "few_rows::matmul: weight is not [{n}, {k}]");
    #[cfg(target_arch = "x86_64")]
    return avx512::matmul(x, &avx512::Plain { w, k }, m);
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("few_rows::matmul without AVX-512 ({m}x{k}x{n})")
}

/// [`matmul`] over a weight kept packed: the same value, bit for bit, as over its f32 copy.
pub fn matmul_packed(x: &[f32], w: &PackedWeight, m: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    return avx512::matmul(x, w, m);
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("few_rows::matmul_packed without AVX-512 ({m}x{}x{})", w.k, w.n)
}
