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

    /// Rows of `x` per group (the last group of a product may have fewer).
    const X_ROWS: usize = 4;
    /// Weight rows per tile: 4 x 4 accumulators, 4 x loads and a weight load fit the 32
    /// vector registers.
    const W_ROWS: usize = 4;
    /// Weight rows per parallel task.
    const TASK_ROWS: usize = 32;

    /// A weight [n, k] the tiles read as f32 rows.
    pub trait Rows: Sync {
        fn n(&self) -> usize;
        fn k(&self) -> usize;
        /// Rows `rows` as row-major f32, from storage or written into `scratch`.
        fn f32_rows<'a>(
            &'a self,
            rows: std::ops::Range<usize>,
            scratch: &'a mut Vec<f32>,
        ) -> &'a [f32];
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
        fn f32_rows<'a>(&'a self, rows: std::ops::Range<usize>, _: &'a mut Vec<f32>) -> &'a [f32] {
            &self.w[rows.start * self.k..rows.end * self.k]
        }
        fn bytes(&self, rows: std::ops::Range<usize>) -> &[u8] {
            let w = &self.w[rows.start * self.k..rows.end * self.k];
            // SAFETY: any initialised f32 slice is readable as bytes.
            unsafe { std::slice::from_raw_parts(w.as_ptr() as *const u8, std::mem::size_of_val(w)) }
        }
    }

    /// Packed rows are widened once per tile into a few KB that stay in the cache, and every
    /// row of x reads them from there: a tile's integers are turned into floats once, not
    /// once per group of x rows.
    impl Rows for PackedWeight {
        fn n(&self) -> usize {
            self.n
        }
        fn k(&self) -> usize {
            self.k
        }
        fn f32_rows<'a>(
            &'a self,
            rows: std::ops::Range<usize>,
            scratch: &'a mut Vec<f32>,
        ) -> &'a [f32] {
            let (lo, hi) = (rows.start * self.k, rows.end * self.k);
            scratch.resize(hi - lo, 0.0);
            // SAFETY: avx512f is available wherever a tile runs ([`matmul`] asserts it).
            unsafe { widen(self, lo, scratch) };
            scratch
        }
        fn bytes(&self, rows: std::ops::Range<usize>) -> &[u8] {
            let q = &self.q[rows.start * self.k..rows.end * self.k];
            // SAFETY: i8 and u8 have the same layout.
            unsafe { std::slice::from_raw_parts(q.as_ptr() as *const u8, q.len()) }
        }
    }

    /// `out[i]` = weight `lo + i` of `w` as f32: q * scale, then + offset, 16 at a time, a
    /// block (16 or 32 weights, one scale) after the other: `lo` and `out.len()` are multiples
    /// of k, so of the block, and no weight's block needs a division to find.
    #[target_feature(enable = "avx512f")]
    unsafe fn widen(w: &PackedWeight, lo: usize, out: &mut [f32]) {
        let q = w.q[lo..lo + out.len()].as_ptr();
        let first = lo / w.block;
        for (b, block) in out.chunks_exact_mut(w.block).enumerate() {
            let scale = _mm512_set1_ps(w.scale[first + b]);
            let offset = w.offset.as_ref().map(|o| _mm512_set1_ps(o[first + b]));
            for (c, dst) in block.chunks_exact_mut(16).enumerate() {
                let ints = _mm512_cvtepi8_epi32(_mm_loadu_si128(
                    q.add(b * w.block + 16 * c) as *const __m128i
                ));
                let mut v = _mm512_mul_ps(_mm512_cvtepi32_ps(ints), scale);
                if let Some(off) = offset {
                    v = _mm512_add_ps(v, off);
                }
                _mm512_storeu_ps(dst.as_mut_ptr(), v);
            }
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
        assert!(super::available() && x.len() == m * k);
        let mut y = vec![0f32; m * n];
        let out = Out(y.as_mut_ptr());
        (0..n.div_ceil(TASK_ROWS)).into_par_iter().for_each_init(Vec::new, |scratch, t| {
            let end = n.min((t + 1) * TASK_ROWS);
            let mut j = t * TASK_ROWS;
            while j < end {
                let c = W_ROWS.min(end - j);
                // The next tile of this task, fetched into the cache while this one computes.
                let next = w.bytes(j + c..end.min(j + 2 * c));
                let ws = w.f32_rows(j..j + c, scratch);
                // SAFETY: avx512f was detected; `ws` holds c rows of k and `x` m rows of k;
                // columns j..j + c of y belong to this task alone and exist (j + c <= n).
                unsafe {
                    let dst = out.column(j);
                    match c {
                        4 => tile::<4>(x, m, k, ws, next, dst, n),
                        3 => tile::<3>(x, m, k, ws, next, dst, n),
                        2 => tile::<2>(x, m, k, ws, next, dst, n),
                        _ => tile::<1>(x, m, k, ws, next, dst, n),
                    }
                }
                j += c;
            }
        });
        y
    }

    /// `dst[i * n + c]` = row i of `x` · row c of `ws`, for C weight rows and m rows of x,
    /// taken X_ROWS at a time.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const C: usize>(
        x: &[f32],
        m: usize,
        k: usize,
        ws: &[f32],
        next: &[u8],
        dst: *mut f32,
        n: usize,
    ) {
        for i0 in (0..m).step_by(X_ROWS) {
            // The first group fetches the next tile, which the others then find in the cache.
            let next = if i0 == 0 { next } else { &[] };
            let (xr, dst) = (x[i0 * k..].as_ptr(), dst.add(i0 * n));
            match (m - i0).min(X_ROWS) {
                4 => group::<C, 4>(xr, k, ws, next, dst, n),
                3 => group::<C, 3>(xr, k, ws, next, dst, n),
                2 => group::<C, 2>(xr, k, ws, next, dst, n),
                _ => group::<C, 1>(xr, k, ws, next, dst, n),
            }
        }
    }

    /// `dst[r * n + c]` = row r of `xr` · row c of `ws`, for R rows of x and C of the weight,
    /// prefetching `next` along the way.
    #[target_feature(enable = "avx512f")]
    unsafe fn group<const C: usize, const R: usize>(
        xr: *const f32,
        k: usize,
        ws: &[f32],
        next: &[u8],
        dst: *mut f32,
        n: usize,
    ) {
        // Spread the prefetch of `next` (64-byte lines) over the chunks.
        let lines = next.len().div_ceil(64);
        let per_chunk = lines.div_ceil(k.div_ceil(16)).max(1);
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let wr = ws.as_ptr();
        for (q, o) in (0..k).step_by(16).enumerate() {
            for l in q * per_chunk..lines.min((q + 1) * per_chunk) {
                _mm_prefetch::<_MM_HINT_T0>(next.as_ptr().add(64 * l) as *const i8);
            }
            // The last chunk of a row not a multiple of 16 long reads only its own lanes.
            let lanes: __mmask16 =
                if k - o >= 16 { u16::MAX } else { ((1u32 << (k - o)) - 1) as u16 };
            let mut xv = [_mm512_setzero_ps(); R];
            for (r, v) in xv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(lanes, xr.add(r * k + o));
            }
            #[allow(clippy::needless_range_loop)] // c indexes the weights' rows and acc's columns
            for c in 0..C {
                let wv = _mm512_maskz_loadu_ps(lanes, wr.add(c * k + o));
                for r in 0..R {
                    acc[r][c] = _mm512_fmadd_ps(xv[r], wv, acc[r][c]);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, a) in row.iter().enumerate() {
                *dst.add(r * n + c) = _mm512_reduce_add_ps(*a);
            }
        }
    }
}

/// Whether [`matmul`] runs on this CPU (with `GREATER_ISA` allowing AVX-512).
pub fn available() -> bool {
    cfg!(target_arch = "x86_64") && super::isa::features().avx512
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
