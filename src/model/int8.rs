//! `x @ W^T` in integer dot products, the `mixed` precision's product for passes without a
//! gradient (decoding, prefill, scoring).
//!
//! The weight keeps its GGUF block integers (or is quantised to 8-bit blocks of 32 when its
//! file has none), and each row of `x` is quantised per block of the same length to 8-bit
//! integers with one f32 scale, as llama.cpp does for its Q8 activations. Within a block
//! the products are summed exactly in 32-bit integers; blocks are then summed in f32:
//!
//! ```text
//! y[r, c] = sum over blocks b of  sw[c, b] * sx[r, b] * (sum over k in b of q[c, k] * qx[r, k])
//!                               + off[c, b] * sx[r, b] * (sum over k in b of qx[r, k])
//! ```
//!
//! Layout: weight rows are stored in strips of 16, so that one 64-byte vector holds 4
//! consecutive weights of each of 16 rows and one `vpdpbusd` against 4 broadcast bytes of `x`
//! adds 4 products into each row's lane. The instruction multiplies unsigned by signed bytes,
//! so the weights are stored as `q + 128` and every block's integer sum starts from
//! `-128 * sum(qx)`, which makes it exactly `sum(q * qx)`.
//!
//! Every kernel (AVX-512 VNNI, AVX2, scalar) computes each block's integer sum exactly and
//! adds the blocks in the same order with the same roundings (`(i * sw) * sx + acc` fused,
//! then `off * sum + acc` fused), so all three give the same bits, and a row's result never
//! depends on the other rows of the batch.

use rayon::prelude::*;

use super::packed::PackedWeight;

/// Weight rows per strip: the 16 lanes of a 512-bit vector of 32-bit sums.
const STRIP: usize = 16;
/// Added to every weight integer so that it fits an unsigned byte.
const ZERO: i32 = 128;

/// A weight [n, k] as unsigned block integers in strips of 16 rows.
pub struct Int8Weight {
    pub n: usize,
    pub k: usize,
    /// Weights per scale: 16 or 32.
    block: usize,
    /// `[strip][block][k / 4 within the block][row of the strip][4]`, each `q + 128`.
    codes: Vec<u8>,
    /// `[strip][block][row of the strip]`; rows past `n` have scale 0.
    scale: Vec<f32>,
    offset: Option<Vec<f32>>,
}

impl Int8Weight {
    fn blocks(&self) -> usize {
        self.k / self.block
    }
    fn strips(&self) -> usize {
        self.n.div_ceil(STRIP)
    }

    /// The same integers and scales as `p`, rearranged into strips.
    pub fn from_packed(p: &PackedWeight) -> Self {
        let (n, k, block) = (p.n, p.k, p.block);
        let (blocks, strips) = (k / block, n.div_ceil(STRIP));
        let mut codes = vec![ZERO as u8; strips * STRIP * k];
        let mut scale = vec![0f32; strips * blocks * STRIP];
        let mut offset = p.offset.as_ref().map(|_| vec![0f32; strips * blocks * STRIP]);
        for row in 0..n {
            let (s, lane) = (row / STRIP, row % STRIP);
            for b in 0..blocks {
                let meta = (s * blocks + b) * STRIP + lane;
                scale[meta] = p.scale[row * blocks + b];
                if let (Some(dst), Some(src)) = (offset.as_mut(), p.offset.as_ref()) {
                    dst[meta] = src[row * blocks + b];
                }
                let base = (s * blocks + b) * block * STRIP;
                for j in 0..block {
                    let q = p.q[row * k + b * block + j] as i32;
                    codes[base + (j / 4) * 4 * STRIP + lane * 4 + j % 4] = (q + ZERO) as u8;
                }
            }
        }
        Int8Weight { n, k, block, codes, scale, offset }
    }

    /// An f32 weight [n, k] (k a multiple of 32) quantised to 8-bit blocks of 32, one scale
    /// each (GGUF's Q8_0), for weights whose file holds no block integers.
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Self {
        assert!(k % 32 == 0 && w.len() == n * k, "Int8Weight::quantize: [{n}, {k}]");
        let mut q = vec![0i8; n * k];
        let mut scale = Vec::with_capacity(n * k / 32);
        for (src, dst) in w.chunks_exact(32).zip(q.chunks_exact_mut(32)) {
            scale.push(quantize_block(src, dst).0);
        }
        Int8Weight::from_packed(&PackedWeight { n, k, block: 32, q, scale, offset: None })
    }

    /// Whether `k` columns can be quantised in this module's blocks.
    pub fn fits(k: usize) -> bool {
        k % 32 == 0
    }
}

/// `dst` = round(src / d) with d = max|src| / 127 (0 when the block is all zeros); returns d
/// and the sum of `dst`.
fn quantize_block(src: &[f32], dst: &mut [i8]) -> (f32, i32) {
    let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0;
    for (q, &v) in dst.iter_mut().zip(src) {
        *q = (v * inv).round() as i8;
        sum += *q as i32;
    }
    (d, sum)
}

/// Rows of `x` [m, k] quantised per block of the weight's length.
pub struct QuantRows {
    q: Vec<i8>,
    /// Per row and block: the scale, `-128 * sum(q)` (the start of its integer sum) and
    /// `scale * sum(q)` (what a weight offset multiplies).
    scale: Vec<f32>,
    start: Vec<i32>,
    sum: Vec<f32>,
}

impl QuantRows {
    pub fn new(x: &[f32], k: usize, block: usize) -> Self {
        let m = x.len() / k;
        let blocks = m * k / block;
        let mut rows = QuantRows {
            q: vec![0; m * k],
            scale: Vec::with_capacity(blocks),
            start: Vec::with_capacity(blocks),
            sum: Vec::with_capacity(blocks),
        };
        for (src, dst) in x.chunks_exact(block).zip(rows.q.chunks_exact_mut(block)) {
            let (d, s) = quantize_block(src, dst);
            rows.scale.push(d);
            rows.start.push(-ZERO * s);
            rows.sum.push(d * s as f32);
        }
        rows
    }
}

/// The instruction sets a kernel may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// 512-bit `vpdpbusd`: avx512f, avx512bw and avx512vnni.
    Avx512Vnni,
    /// 16-bit multiply-adds (`vpmaddwd`): avx2 and fma.
    Avx2,
    /// Plain Rust: any CPU.
    Scalar,
}

/// What a CPU reports, for [`Kernel::choose`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Features {
    pub avx512_vnni: bool,
    pub avx2: bool,
}

impl Features {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        return Features {
            avx512_vnni: is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni"),
            avx2: is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
        };
        #[cfg(not(target_arch = "x86_64"))]
        Features::default()
    }
}

impl Kernel {
    /// The fastest kernel the features allow.
    pub fn choose(f: Features) -> Self {
        if f.avx512_vnni {
            Kernel::Avx512Vnni
        } else if f.avx2 {
            Kernel::Avx2
        } else {
            Kernel::Scalar
        }
    }

    /// The kernel for this CPU, detected once.
    pub fn best() -> Self {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| Kernel::choose(Features::detect()))
    }
}

/// Where the tasks write: y [m, n], each task its own columns.
struct Out(*mut f32);
// SAFETY: tasks write disjoint columns of y and nothing reads y meanwhile.
unsafe impl Sync for Out {}

/// y [m, n] = x [m, k] · w^T with the fastest kernel of this CPU.
pub fn matmul(x: &[f32], w: &Int8Weight) -> Vec<f32> {
    matmul_with(Kernel::best(), x, w)
}

/// y [m, n] = x [m, k] · w^T with `kernel`, which the CPU must support
/// ([`Kernel::choose`] of [`Features::detect`] or a slower one).
pub fn matmul_with(kernel: Kernel, x: &[f32], w: &Int8Weight) -> Vec<f32> {
    assert_eq!(x.len() % w.k, 0, "int8::matmul: x is not [m, {}]", w.k);
    let supported = Kernel::choose(Features::detect());
    assert!(
        kernel == Kernel::Scalar || kernel == supported || (kernel == Kernel::Avx2 && Features::detect().avx2),
        "int8::matmul: {kernel:?} kernel on a CPU that supports {supported:?}"
    );
    let m = x.len() / w.k;
    let xq = QuantRows::new(x, w.k, w.block);
    let mut y = vec![0f32; m * w.n];
    let out = Out(y.as_mut_ptr());
    // Two strips per task: a task's weights (2 x 16 rows) are read from memory once and
    // stay in the cache while every row of x passes over them.
    (0..w.strips().div_ceil(2)).into_par_iter().for_each(|t| {
        let (s0, count) = (2 * t, (w.strips() - 2 * t).min(2));
        for s in s0..s0 + count {
            // SAFETY: the kernel's features were checked above; strip s writes only columns
            // 16 s .. 16 s + 16 (clipped to n) of each row of y, which no other task writes.
            unsafe { strip(kernel, w, s, &xq, &out, m) };
        }
    });
    y
}

/// Columns of strip `s` for every row of `x`.
unsafe fn strip(kernel: Kernel, w: &Int8Weight, s: usize, x: &QuantRows, out: &Out, m: usize) {
    let cols = STRIP.min(w.n - s * STRIP);
    let mut r = 0;
    while r < m {
        let rows = match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => avx512::rows(w, s, x, r, m - r, out.0, cols),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => avx2::row(w, s, x, r, out.0, cols),
            _ => scalar_row(w, s, x, r, out.0, cols),
        };
        r += rows;
    }
}

/// Row `r` of y over strip `s`, in plain Rust: the reference the SIMD kernels equal.
unsafe fn scalar_row(w: &Int8Weight, s: usize, x: &QuantRows, r: usize, y: *mut f32, cols: usize) -> usize {
    let (k, block, blocks) = (w.k, w.block, w.blocks());
    let mut acc = [0f32; STRIP];
    for b in 0..blocks {
        let xq = &x.q[r * k + b * block..][..block];
        let codes = &w.codes[(s * blocks + b) * block * STRIP..][..block * STRIP];
        let meta = (s * blocks + b) * STRIP;
        let xb = r * blocks + b;
        for (lane, a) in acc.iter_mut().enumerate() {
            let mut dot = x.start[xb];
            for (j, &q) in xq.iter().enumerate() {
                dot += codes[(j / 4) * 4 * STRIP + lane * 4 + j % 4] as i32 * q as i32;
            }
            *a = (dot as f32 * w.scale[meta + lane]).mul_add(x.scale[xb], *a);
            if let Some(off) = &w.offset {
                *a = off[meta + lane].mul_add(x.sum[xb], *a);
            }
        }
    }
    for (c, a) in acc.iter().take(cols).enumerate() {
        *y.add(r * w.n + s * STRIP + c) = *a;
    }
    1
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Int8Weight, QuantRows, STRIP};

    /// Rows of x per call: 4 integer and 4 float accumulators, the weight vector and the
    /// broadcast bytes of x stay in registers.
    const R: usize = 4;

    /// Up to R rows of y from row `r0` over strip `s`; returns how many.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn rows(w: &Int8Weight, s: usize, x: &QuantRows, r0: usize, left: usize, y: *mut f32, cols: usize) -> usize {
        match left.min(R) {
            4 => group::<4>(w, s, x, r0, y, cols),
            3 => group::<3>(w, s, x, r0, y, cols),
            2 => group::<2>(w, s, x, r0, y, cols),
            _ => group::<1>(w, s, x, r0, y, cols),
        }
        left.min(R)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn group<const N: usize>(w: &Int8Weight, s: usize, x: &QuantRows, r0: usize, y: *mut f32, cols: usize) {
        let (k, block, blocks) = (w.k, w.block, w.blocks());
        let mut acc = [_mm512_setzero_ps(); N];
        for b in 0..blocks {
            let codes = w.codes.as_ptr().add((s * blocks + b) * block * STRIP);
            let xq = x.q.as_ptr().add(r0 * k + b * block);
            let mut dot = [_mm512_setzero_si512(); N];
            for (i, d) in dot.iter_mut().enumerate() {
                *d = _mm512_set1_epi32(x.start[(r0 + i) * blocks + b]);
            }
            for g in 0..block / 4 {
                let wv = _mm512_loadu_si512(codes.add(g * 64) as *const _);
                for (i, d) in dot.iter_mut().enumerate() {
                    let xv = _mm512_set1_epi32((xq.add(i * k + 4 * g) as *const i32).read_unaligned());
                    *d = _mm512_dpbusd_epi32(*d, wv, xv);
                }
            }
            let meta = (s * blocks + b) * STRIP;
            let sw = _mm512_loadu_ps(w.scale.as_ptr().add(meta));
            let off = w.offset.as_ref().map(|o| _mm512_loadu_ps(o.as_ptr().add(meta)));
            for i in 0..N {
                let xb = (r0 + i) * blocks + b;
                let scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(dot[i]), sw);
                acc[i] = _mm512_fmadd_ps(scaled, _mm512_set1_ps(x.scale[xb]), acc[i]);
                if let Some(off) = off {
                    acc[i] = _mm512_fmadd_ps(off, _mm512_set1_ps(x.sum[xb]), acc[i]);
                }
            }
        }
        let lanes: __mmask16 = if cols == STRIP { u16::MAX } else { ((1u32 << cols) - 1) as u16 };
        for (i, a) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(y.add((r0 + i) * w.n + s * STRIP), lanes, *a);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Int8Weight, QuantRows, STRIP};

    /// Row `r` of y over strip `s`. A 64-byte group (4 weights of 16 rows) is widened to
    /// 16-bit integers in four parts of 4 rows, each multiplied with the 4 bytes of x by
    /// `vpmaddwd` into 2 pair sums per row; the pairs are added at the end of the block.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row(w: &Int8Weight, s: usize, x: &QuantRows, r: usize, y: *mut f32, cols: usize) -> usize {
        let (k, block, blocks) = (w.k, w.block, w.blocks());
        let mut acc = [_mm256_setzero_ps(); 2];
        // hadd leaves rows in the order 0 1 4 5 2 3 6 7 of its two inputs.
        let order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
        for b in 0..blocks {
            let codes = w.codes.as_ptr().add((s * blocks + b) * block * STRIP);
            let xq = x.q.as_ptr().add(r * k + b * block);
            let mut pairs = [_mm256_setzero_si256(); 4];
            for g in 0..block / 4 {
                let four = _mm_cvtsi32_si128((xq.add(4 * g) as *const i32).read_unaligned());
                let xv = _mm256_broadcastq_epi64(_mm_cvtepi8_epi16(four));
                for (p, pair) in pairs.iter_mut().enumerate() {
                    let bytes = _mm_loadu_si128(codes.add(g * 64 + 16 * p) as *const __m128i);
                    *pair = _mm256_add_epi32(*pair, _mm256_madd_epi16(_mm256_cvtepu8_epi16(bytes), xv));
                }
            }
            let xb = r * blocks + b;
            let start = _mm256_set1_epi32(x.start[xb]);
            let meta = (s * blocks + b) * STRIP;
            for h in 0..2 {
                let rows = _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(pairs[2 * h], pairs[2 * h + 1]), order);
                let dot = _mm256_add_epi32(rows, start);
                let sw = _mm256_loadu_ps(w.scale.as_ptr().add(meta + 8 * h));
                let scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), sw);
                acc[h] = _mm256_fmadd_ps(scaled, _mm256_set1_ps(x.scale[xb]), acc[h]);
                if let Some(off) = &w.offset {
                    let off = _mm256_loadu_ps(off.as_ptr().add(meta + 8 * h));
                    acc[h] = _mm256_fmadd_ps(off, _mm256_set1_ps(x.sum[xb]), acc[h]);
                }
            }
        }
        let mut out = [0f32; STRIP];
        _mm256_storeu_ps(out.as_mut_ptr(), acc[0]);
        _mm256_storeu_ps(out.as_mut_ptr().add(8), acc[1]);
        std::ptr::copy_nonoverlapping(out.as_ptr(), y.add(r * w.n + s * STRIP), cols);
        1
    }
}
