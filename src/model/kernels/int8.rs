//! `x @ W^T` in integer dot products, the `mixed` precision's product for passes without a
//! gradient (decoding, prefill, scoring).
//!
//! The weight keeps its GGUF block integers (or is quantised to 8-bit blocks of 32 when its
//! file has none), and each row of `x` is quantised per block of the same length to 8-bit
//! integers with one f32 scale, as llama.cpp does for its Q8 activations (or, for the
//! `mixed16` precision, to 16-bit integers written as two rows of bytes, see
//! [`InputBits::Sixteen`], which brings the result within rounding of f32's). Within a block
//! the products are summed exactly in 32-bit integers; blocks are then summed in f32:
//!
//! ```text
//! y[r, c] = sum over blocks b of  sw[c, b] * sx[r, b] * (sum over k in b of q[c, k] * qx[r, k])
//!                               + off[c, b] * sx[r, b] * (sum over k in b of qx[r, k])
//! ```
//!
//! Layout: weight rows are stored in strips of 16, so that one 64-byte vector (a group) holds
//! 4 consecutive weights of each of 16 rows and one `vpdpbusd` against 4 broadcast bytes of
//! `x` adds 4 products into each row's lane. The instruction multiplies unsigned by signed
//! bytes, so a group is unpacked to `q + 128` and every block's integer sum starts from
//! `-128 * sum(qx)`, which makes it exactly `sum(q * qx)`. Decoding one sequence is bound by
//! reading the weights, so a weight whose integers span at most 16 or 32 values (Q4 and Q5
//! formats) is stored as 4-bit codes (and a fifth bit in a plane of its own): 32 or 40 bytes a
//! group instead of 64. With more than a few rows of `x`, a strip is unpacked once into a
//! buffer in the cache and every row reads it from there.
//!
//! Every kernel (AVX-512 VNNI, AVX2, scalar) computes each block's integer sum exactly and
//! adds the blocks in the same order with the same roundings (`(i * sw) * sx + acc` fused,
//! then `off * sum + acc` fused), so all three give the same bits, and a row's result never
//! depends on the other rows of the batch.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::isa::{self, Features};
use super::packed::PackedWeight;

/// Weight rows per strip: the 16 lanes of a 512-bit vector of 32-bit sums.
const STRIP: usize = 16;
/// Added to every weight integer so that it fits an unsigned byte.
const ZERO: i32 = 128;

/// How a group of 64 integers (4 weights of 16 rows) is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codes {
    /// 64 bytes, `q + 128`.
    Eight,
    /// 32 bytes of 4-bit codes `q - min`: byte j holds integer j in its low and j + 32 in
    /// its high half.
    Four,
    /// As `Four`, then 8 bytes whose bit j is bit 4 of integer j's code.
    Five,
}

impl Codes {
    fn bytes(self) -> usize {
        match self {
            Codes::Eight => 64,
            Codes::Four => 32,
            Codes::Five => 40,
        }
    }
}

/// A weight [n, k] as unsigned block integers in strips of 16 rows.
pub struct Int8Weight {
    /// Rows (outputs).
    pub n: usize,
    /// Columns (inputs), a multiple of the block.
    pub k: usize,
    /// Weights per scale: 16 or 32.
    block: usize,
    form: Codes,
    /// Added to a 4- or 5-bit code to give `q + 128`.
    bias: u8,
    /// `[strip][block][k / 4 within the block]` groups, each the integers of
    /// `[row of the strip][4]` in the form of `form`.
    codes: Vec<u8>,
    /// `[strip][block][row of the strip]`; rows past `n` have scale 0.
    scale: Vec<f32>,
    offset: Option<Vec<f32>>,
    /// What [`argmax_sixteen`] bounds its screening with, computed on first use.
    mass: OnceLock<Mass>,
}

/// How far a weight row's result can move when its input moves: per row and block,
/// `|scale| * sum |q| + |offset| * block`, so that inputs off by at most `e[b]` in block b
/// move the row's result by at most `sum over b of per_block[b] * e[b]`.
struct Mass {
    /// [n][blocks]
    per_block: Vec<f32>,
    /// [n]: the sum of a row's `per_block`.
    total: Vec<f32>,
    /// [strips]: the largest `total` of a strip's rows.
    strip_total: Vec<f32>,
}

impl Int8Weight {
    fn blocks(&self) -> usize {
        self.k / self.block
    }
    fn strips(&self) -> usize {
        self.n.div_ceil(STRIP)
    }

    /// Bytes of one strip's groups for one block.
    fn block_bytes(&self) -> usize {
        self.block / 4 * self.form.bytes()
    }

    /// The same integers and scales as `p`, rearranged into strips, in 4 or 5 bits when
    /// their range allows.
    pub fn from_packed(p: &PackedWeight) -> Self {
        let (n, k, block) = (p.n, p.k, p.block);
        let (blocks, strips) = (k / block, n.div_ceil(STRIP));
        let (min, max) =
            p.q.iter().fold((0i32, 0i32), |(lo, hi), &q| (lo.min(q as i32), hi.max(q as i32)));
        let form = match max - min {
            0..=15 => Codes::Four,
            16..=31 => Codes::Five,
            _ => Codes::Eight,
        };
        let bias = (ZERO + min) as u8;
        let mut scale = vec![0f32; strips * blocks * STRIP];
        let mut offset = p.offset.as_ref().map(|_| vec![0f32; strips * blocks * STRIP]);
        let mut codes = Vec::with_capacity(strips * blocks * block / 4 * form.bytes());
        // Rows past n: integers that unpack to 0 (+ 128), with scale 0.
        let mut group = [0i32; 64];
        for s in 0..strips {
            for b in 0..blocks {
                for lane in 0..STRIP {
                    let (row, meta) = (s * STRIP + lane, (s * blocks + b) * STRIP + lane);
                    if row < n {
                        scale[meta] = p.scale[row * blocks + b];
                        if let (Some(dst), Some(src)) = (offset.as_mut(), p.offset.as_ref()) {
                            dst[meta] = src[row * blocks + b];
                        }
                    }
                }
                for g in 0..block / 4 {
                    for (e, v) in group.iter_mut().enumerate() {
                        let row = s * STRIP + e / 4;
                        *v = if row < n {
                            p.q[row * k + b * block + 4 * g + e % 4] as i32
                        } else {
                            0
                        };
                    }
                    store_group(form, min, &group, &mut codes);
                }
            }
        }
        Int8Weight { n, k, block, form, bias, codes, scale, offset, mass: OnceLock::new() }
    }

    /// These integers in the layout `kernel` reads without unpacking them: the AVX-512
    /// kernel unpacks 4- and 5-bit groups in registers as it goes, the others read bytes,
    /// so for them every group is unpacked here once instead of in every product.
    pub fn for_kernel(self, kernel: Kernel) -> Self {
        if kernel == Kernel::Avx512Vnni || self.form == Codes::Eight {
            return self;
        }
        let mut codes = Vec::new();
        unpack_groups(self.form, self.bias, &self.codes, &mut codes);
        Int8Weight { form: Codes::Eight, bias: 0, codes, ..self }
    }

    /// The [`Mass`] of every row, from the integers as stored.
    fn mass(&self) -> &Mass {
        self.mass.get_or_init(|| {
            let (blocks, mut group) = (self.blocks(), [0u8; 64]);
            let mut per_block = vec![0f32; self.n * blocks];
            for s in 0..self.strips() {
                let codes = StripCodes::of(self, s);
                for b in 0..blocks {
                    let mut sums = [0i32; STRIP];
                    for g in 0..self.block / 4 {
                        unpack_group(self.form, self.bias, codes.group(b, g), &mut group);
                        for (e, &v) in group.iter().enumerate() {
                            sums[e / 4] += (v as i32 - ZERO).abs();
                        }
                    }
                    for (lane, &sum) in sums.iter().enumerate().take(self.n - s * STRIP) {
                        let meta = (s * blocks + b) * STRIP + lane;
                        let offset = self.offset.as_ref().map_or(0.0, |o| o[meta].abs());
                        per_block[(s * STRIP + lane) * blocks + b] =
                            self.scale[meta].abs() * sum as f32 + offset * self.block as f32;
                    }
                }
            }
            let total: Vec<f32> = per_block.chunks_exact(blocks).map(|m| m.iter().sum()).collect();
            let strip_total =
                total.chunks(STRIP).map(|t| t.iter().fold(0f32, |a, &v| a.max(v))).collect();
            Mass { per_block, total, strip_total }
        })
    }

    /// An f32 weight [n, k] (k a multiple of 32) quantised to 8-bit blocks of 32, one scale
    /// each (GGUF's Q8_0), for weights whose file holds no block integers.
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Self {
        assert!(k.is_multiple_of(32) && w.len() == n * k, "Int8Weight::quantize: [{n}, {k}]");
        let mut q = vec![0i8; n * k];
        let mut scale = Vec::with_capacity(n * k / 32);
        for (src, dst) in w.chunks_exact(32).zip(q.chunks_exact_mut(32)) {
            scale.push(quantize_block(src, dst).0);
        }
        Int8Weight::from_packed(&PackedWeight { n, k, block: 32, q, scale, offset: None })
    }

    /// Whether `k` columns can be quantised in this module's blocks.
    pub fn fits(k: usize) -> bool {
        k.is_multiple_of(32)
    }
}

/// Appends the 64 integers of a group to `out` in `form` (codes `q - min` for 4 and 5 bits).
fn store_group(form: Codes, min: i32, q: &[i32; 64], out: &mut Vec<u8>) {
    match form {
        Codes::Eight => out.extend(q.iter().map(|&v| (v + ZERO) as u8)),
        Codes::Four | Codes::Five => {
            let code = |e: usize| (q[e] - min) as u8;
            out.extend((0..32).map(|j| (code(j) & 15) | ((code(j + 32) & 15) << 4)));
            if form == Codes::Five {
                let high = (0..64).fold(0u64, |h, e| h | (((code(e) >> 4) as u64 & 1) << e));
                out.extend(high.to_le_bytes());
            }
        }
    }
}

/// The 64 integers of a group stored in `form`, as `q + 128` (plain loops, which the
/// compiler vectorises).
fn unpack_group(form: Codes, bias: u8, src: &[u8], out: &mut [u8; 64]) {
    match form {
        Codes::Eight => out.copy_from_slice(&src[..64]),
        Codes::Four | Codes::Five => {
            let (low, high) = out.split_at_mut(32);
            for ((l, h), &b) in low.iter_mut().zip(high.iter_mut()).zip(&src[..32]) {
                *l = (b & 15) + bias;
                *h = (b >> 4) + bias;
            }
            if form == Codes::Five {
                for (e, o) in out.iter_mut().enumerate() {
                    *o += ((src[32 + e / 8] >> (e % 8)) & 1) * 16;
                }
            }
        }
    }
}

/// Every group of `src`, stored in `form`, unpacked by [`unpack_group`] into `dst` in the
/// same order.
fn unpack_groups(form: Codes, bias: u8, src: &[u8], dst: &mut Vec<u8>) {
    dst.resize(src.len() / form.bytes() * 64, 0);
    for (src, dst) in src.chunks_exact(form.bytes()).zip(dst.chunks_exact_mut(64)) {
        unpack_group(form, bias, src, dst.try_into().unwrap());
    }
}

/// The largest |v| of `src` (0 when empty), compared as bits: for floats that are not NaN
/// the order is the same, and integer maxima vectorise where `f32::max` does not. A NaN
/// wins, so it reaches the product's output as it would in f32.
#[inline(always)]
fn abs_max(src: &[f32]) -> f32 {
    f32::from_bits(src.iter().map(|v| v.to_bits() & 0x7FFF_FFFF).max().unwrap_or(0))
}

/// `dst` = round(src / d) with d = max|src| / 127 (0 when the block is all zeros); returns d
/// and the sum of `dst`.
#[inline(always)]
fn quantize_block(src: &[f32], dst: &mut [i8]) -> (f32, i32) {
    let amax = abs_max(src);
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0;
    for (q, &v) in dst.iter_mut().zip(src) {
        *q = (v * inv).round() as i8;
        sum += *q as i32;
    }
    (d, sum)
}

/// How finely each row of `x` is quantised per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputBits {
    /// Integers in [-127, 127] (llama.cpp's Q8 activations): one row of bytes.
    Eight,
    /// Integers in [-16256, 16256], 128 times finer, each kept as a high byte `h` and a low
    /// byte `l` (`q = 128 h + l`): the kernels multiply both with the same weight bytes and
    /// add `128 x high + low` exactly in 32 bits, so a block costs two byte products instead
    /// of one and the rest of the product is unchanged.
    Sixteen,
}

impl InputBits {
    /// Rows of bytes per row of `x`.
    fn parts(self) -> usize {
        match self {
            InputBits::Eight => 1,
            InputBits::Sixteen => 2,
        }
    }
}

/// `hi` and `lo` such that round(src / d) = 128 hi + lo, with d = max|src| / 16256 (0 when
/// the block is all zeros); returns d and the sum of round(src / d).
#[inline(always)]
fn quantize_block_16(src: &[f32], hi: &mut [i8], lo: &mut [i8]) -> (f32, i32) {
    let amax = abs_max(src);
    let d = amax / (127.0 * 128.0);
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0;
    for ((h, l), &v) in hi.iter_mut().zip(lo.iter_mut()).zip(src) {
        let q = (v * inv).round() as i32;
        let high = (q + 64).div_euclid(128);
        (*h, *l) = (high as i8, (q - 128 * high) as i8);
        sum += q;
    }
    (d, sum)
}

/// Rows of `x` [m, k] quantised per block of the weight's length: per row, `parts` rows of
/// bytes (the high bytes, then the low ones, for 16 bits).
pub struct QuantRows {
    q: Vec<i8>,
    parts: usize,
    /// For the AVX2 kernel: the whole integers as 16 bits, `k` per row, so that a pass over
    /// several rows broadcasts each row's four values with one load.
    wide: Vec<i16>,
    /// Per row and block: the scale, `-128 * sum(q)` (the start of its integer sum) and
    /// `scale * sum(q)` (what a weight offset multiplies), q the whole integers.
    scale: Vec<f32>,
    start: Vec<i32>,
    sum: Vec<f32>,
}

impl QuantRows {
    /// `x` [rows, k] quantised per block of `block` values, compiled for AVX-512 when the
    /// product runs in `kernel`'s (the same values either way).
    pub fn new(x: &[f32], k: usize, block: usize, bits: InputBits, kernel: Kernel) -> Self {
        let (parts, per_row, m) = (bits.parts(), k / block, x.len() / k);
        let mut out = QuantRows {
            q: vec![0; m * parts * k],
            parts,
            wide: Vec::new(),
            scale: vec![0.0; m * per_row],
            start: vec![0; m * per_row],
            sum: vec![0.0; m * per_row],
        };
        // Rows in parallel: with a few dozen rows this is a measurable part of a product.
        x.par_chunks(k)
            .zip(out.q.par_chunks_mut(parts * k))
            .zip(out.scale.par_chunks_mut(per_row))
            .zip(out.start.par_chunks_mut(per_row))
            .zip(out.sum.par_chunks_mut(per_row))
            .with_min_len(4)
            .for_each(|((((x, q), scale), start), sum)| {
                let row = RowOut { q, scale, start, sum };
                #[cfg(target_arch = "x86_64")]
                if kernel == Kernel::Avx512Vnni {
                    // SAFETY: that kernel is only chosen where avx512f and avx512bw exist.
                    return unsafe { quantize_row_avx512(x, block, bits, row) };
                }
                quantize_row(x, block, bits, row)
            });
        if kernel == Kernel::Avx2 {
            out.wide = (0..m * k).map(|i| out.whole(i / k, k, i % k) as i16).collect();
        }
        out
    }

    /// The whole integer of entry (r, j): the byte, or 128 x high byte + low byte.
    fn whole(&self, r: usize, k: usize, j: usize) -> i32 {
        let at = self.row(r, k) + j;
        match self.parts {
            1 => self.q[at] as i32,
            _ => 128 * self.q[at] as i32 + self.q[at + k] as i32,
        }
    }

    /// Where row `r`'s (high) bytes start; the low bytes follow `k` later.
    fn row(&self, r: usize, k: usize) -> usize {
        r * self.parts * k
    }
}

/// What one row of [`QuantRows::new`] fills: its bytes (`parts` rows of `k`), and per block
/// the scale, the start of the integer sum and the scaled sum.
struct RowOut<'a> {
    q: &'a mut [i8],
    scale: &'a mut [f32],
    start: &'a mut [i32],
    sum: &'a mut [f32],
}

#[inline(always)]
fn quantize_row(x: &[f32], block: usize, bits: InputBits, out: RowOut) {
    let RowOut { q, scale, start, sum } = out;
    let (high, low) = q.split_at_mut(x.len());
    for (b, src) in x.chunks_exact(block).enumerate() {
        let at = b * block..(b + 1) * block;
        let (d, s) = match bits {
            InputBits::Eight => quantize_block(src, &mut high[at]),
            InputBits::Sixteen => quantize_block_16(src, &mut high[at.clone()], &mut low[at]),
        };
        (scale[b], start[b], sum[b]) = (d, -ZERO * s, d * s as f32);
    }
}

/// [`quantize_row`] compiled for AVX-512, where its loops run 16 values at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_row_avx512(x: &[f32], block: usize, bits: InputBits, out: RowOut) {
    quantize_row(x, block, bits, out)
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

    /// The kernel for this CPU, capped by `GREATER_ISA` ([`isa::features`]).
    pub fn best() -> Self {
        Kernel::choose(isa::features())
    }
}

/// Where the tasks write: y [m, n], each task its own columns.
struct Out(*mut f32);
// SAFETY: tasks write disjoint columns of y and nothing reads y meanwhile.
unsafe impl Sync for Out {}

/// y [m, n] = x [m, k] · w^T with the fastest kernel of this CPU, `x` quantised to `bits`.
pub fn matmul(x: &[f32], w: &Int8Weight, bits: InputBits) -> Vec<f32> {
    matmul_with(Kernel::best(), x, w, bits)
}

/// y [m, n] = x [m, k] · w^T with `kernel`, which the CPU must support
/// ([`Kernel::choose`] of [`Features::of_cpu`] or a slower one).
pub fn matmul_with(kernel: Kernel, x: &[f32], w: &Int8Weight, bits: InputBits) -> Vec<f32> {
    assert!(x.len().is_multiple_of(w.k), "int8::matmul: x is not [m, {}]", w.k);
    let f = Features::of_cpu();
    let runs = match kernel {
        Kernel::Avx512Vnni => f.avx512_vnni,
        Kernel::Avx2 => f.avx2,
        Kernel::Scalar => true,
    };
    assert!(runs, "int8::matmul: {kernel:?} kernel on a CPU without its features ({f:?})");
    product(kernel, &QuantRows::new(x, w.k, w.block, bits, kernel), w, None)
}

/// y [m, n] = the quantised rows `xq` · w^T, in `kernel` (supported by the CPU); with
/// `maxima` ([strips][m]), also each strip's largest value per row ([`finite_max`]), taken
/// while the strip's results are still in the cache.
fn product(kernel: Kernel, xq: &QuantRows, w: &Int8Weight, maxima: Option<&mut [f32]>) -> Vec<f32> {
    let m = xq.scale.len() / w.blocks();
    let mut y = vec![0f32; m * w.n];
    let out = Out(y.as_mut_ptr());
    let maxima = maxima.map(|mx| Out(mx.as_mut_ptr()));
    // Two strips per task: a task's weights (2 x 16 rows) are read from memory once and
    // stay in the cache while every row of x passes over them.
    (0..w.strips().div_ceil(2)).into_par_iter().for_each_init(Vec::new, |unpacked, t| {
        for s in 2 * t..w.strips().min(2 * t + 2) {
            // SAFETY: the caller checked the kernel's features; strip s writes only columns
            // 16 s .. 16 s + 16 (clipped to n) of each row of y and maxima [s][..], which no
            // other task writes or reads.
            unsafe {
                strip(kernel, w, s, xq, &out, m, unpacked);
                if let Some(mx) = &maxima {
                    let cols = STRIP.min(w.n - s * STRIP);
                    for r in 0..m {
                        let row = std::slice::from_raw_parts(out.0.add(r * w.n + s * STRIP), cols);
                        *mx.0.add(s * m + r) = finite_max(row);
                    }
                }
            }
        }
    });
    y
}

/// Per row of x [m, k], the column of the largest value of x · w^T with 16-bit inputs (the
/// first of equal ones): what an argmax over `matmul(x, w, InputBits::Sixteen)` gives, at
/// about the cost of the 8-bit product. The 8-bit product screens the columns: both
/// products are within rounding of the exact one, by at most each block's input rounding
/// (half a step of each) times the row's mass in that block (`|scale| * sum |q|`), plus
/// the f32 sums' rounding; only the columns whose 8-bit value could still reach the best
/// column's lower bound are computed again with 16-bit inputs, in the kernels' own order
/// of operations, so the answer is the same bits' argmax. Greedy decoding needs no more of
/// the vocabulary head than this.
pub fn argmax_sixteen(x: &[f32], w: &Int8Weight) -> Vec<u32> {
    let kernel = Kernel::best();
    let x8 = QuantRows::new(x, w.k, w.block, InputBits::Eight, kernel);
    let m = x.len() / w.k;
    let mut maxima = vec![0f32; w.strips() * m];
    let y8 = product(kernel, &x8, w, Some(&mut maxima));
    let x16 = QuantRows::new(x, w.k, w.block, InputBits::Sixteen, kernel);
    let screen = Screen { w, mass: w.mass(), x8: &x8, x16: &x16, y8: &y8, maxima: &maxima, m };
    let picked: Vec<Option<u32>> = (0..m).into_par_iter().map(|r| screen.best_column(r)).collect();
    // A row with a value that is not finite is computed whole, as the argmax would see it.
    let whole_row = |r: usize| {
        first_max(&matmul_with(kernel, &x[r * w.k..][..w.k], w, InputBits::Sixteen)) as u32
    };
    picked.iter().enumerate().map(|(r, c)| c.unwrap_or_else(|| whole_row(r))).collect()
}

/// The index of the first largest value (a NaN never wins after the first value).
fn first_max(y: &[f32]) -> usize {
    let mut best = 0;
    for (c, &v) in y.iter().enumerate() {
        if v > y[best] {
            best = c;
        }
    }
    best
}

/// The largest of `v`, NaN when one of them is not finite.
fn finite_max(v: &[f32]) -> f32 {
    v.iter().fold(f32::NEG_INFINITY, |a, &x| if x.is_finite() { a.max(x) } else { f32::NAN })
}

/// What [`argmax_sixteen`] screens a row with: the 8-bit product `y8` [m, n] and its
/// maxima per strip ([strips][m]), both quantised inputs, the weight and its mass.
struct Screen<'a> {
    w: &'a Int8Weight,
    mass: &'a Mass,
    x8: &'a QuantRows,
    x16: &'a QuantRows,
    y8: &'a [f32],
    maxima: &'a [f32],
    m: usize,
}

impl Screen<'_> {
    /// Row `r`'s column of [`argmax_sixteen`]; None when one of its values is not finite.
    fn best_column(&self, r: usize) -> Option<u32> {
        let (w, mass, blocks) = (self.w, self.mass, self.w.blocks());
        let strip_max = |s: usize| self.maxima[s * self.m + r];
        if (0..w.strips()).any(|s| strip_max(s).is_nan()) {
            return None;
        }
        let y8 = &self.y8[r * w.n..][..w.n];
        let columns = |s: usize| s * STRIP..w.n.min((s + 1) * STRIP);
        // How far the 8-bit and the 16-bit results can each be from the exact one per unit
        // of mass: half a quantisation step (and a little for the rounding of v / step),
        // and the f32 sums' rounding, a few units of 2^-24 of the block's largest input per
        // block.
        let rounding = 8.0 * (blocks + 2) as f32 * f32::EPSILON / 2.0;
        let slack: Vec<f32> = (0..blocks)
            .map(|b| {
                let (d8, d16) = (self.x8.scale[r * blocks + b], self.x16.scale[r * blocks + b]);
                0.52 * (d8 + d16) + rounding * 128.0 * d8
            })
            .collect();
        let widest = slack.iter().fold(0f32, |a, &v| a.max(v)) * 1.001;
        let bound = |c: usize| {
            let per_block = &mass.per_block[c * blocks..][..blocks];
            per_block.iter().zip(&slack).map(|(m, e)| m * e).sum::<f32>() * 1.001
        };
        let top_strip =
            (0..w.strips()).fold(0, |b, s| if strip_max(s) > strip_max(b) { s } else { b });
        let top = columns(top_strip).start + first_max(&y8[columns(top_strip)]);
        // Below this no column's 16-bit value can be, since the top one's is not.
        let floor = y8[top] - bound(top) - 1e-4 * (1.0 + y8[top].abs());
        let mut best: Option<(usize, f32)> = None;
        for s in 0..w.strips() {
            if strip_max(s) + widest * mass.strip_total[s] < floor {
                continue;
            }
            for c in columns(s) {
                if y8[c] + widest * mass.total[c] < floor || y8[c] + bound(c) < floor {
                    continue;
                }
                let exact = column_value(w, StripCodes::of(w, s), s, c % STRIP, self.x16, r);
                if best.is_none_or(|(_, b)| exact > b) {
                    best = Some((c, exact));
                }
            }
        }
        Some(best.expect("the top column passes its own screen").0 as u32)
    }
}

/// A strip's groups for the kernels: where block b's start and how they are stored.
#[derive(Clone, Copy)]
struct StripCodes<'a> {
    codes: &'a [u8],
    form: Codes,
    bias: u8,
    block_bytes: usize,
}

impl<'a> StripCodes<'a> {
    fn of(w: &'a Int8Weight, s: usize) -> Self {
        let len = w.blocks() * w.block_bytes();
        StripCodes {
            codes: &w.codes[s * len..][..len],
            form: w.form,
            bias: w.bias,
            block_bytes: w.block_bytes(),
        }
    }

    /// Every group unpacked to `q + 128` into `buf`, in the same order, by `kernel`'s
    /// instructions.
    unsafe fn unpacked(self, kernel: Kernel, buf: &'a mut Vec<u8>) -> Self {
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => {
                buf.resize(self.codes.len() / self.form.bytes() * 64, 0);
                let pairs =
                    self.codes.chunks_exact(self.form.bytes()).zip(buf.chunks_exact_mut(64));
                pairs.for_each(|(src, dst)| avx512::unpack(self, src, dst))
            }
            _ => unpack_groups(self.form, self.bias, self.codes, buf),
        }
        StripCodes {
            codes: buf,
            form: Codes::Eight,
            bias: 0,
            block_bytes: self.block_bytes / self.form.bytes() * 64,
        }
    }

    /// Group g of block b, as stored.
    fn group(&self, b: usize, g: usize) -> &'a [u8] {
        &self.codes[b * self.block_bytes + g * self.form.bytes()..][..self.form.bytes()]
    }
}

/// Columns of strip `s` for every row of `x`; `unpacked` is this task's buffer.
unsafe fn strip(
    kernel: Kernel,
    w: &Int8Weight,
    s: usize,
    x: &QuantRows,
    out: &Out,
    m: usize,
    unpacked: &mut Vec<u8>,
) {
    let cols = STRIP.min(w.n - s * STRIP);
    let stored = StripCodes::of(w, s);
    // Past a few rows, unpacking once is cheaper than once per pass of ROWS rows; groups
    // stored in bytes are read as they are.
    let unpack = m > UNPACK_ONCE_ROWS || kernel != Kernel::Avx512Vnni;
    let codes = if unpack && stored.form != Codes::Eight {
        stored.unpacked(kernel, unpacked)
    } else {
        stored
    };
    let mut r = 0;
    while r < m {
        let rows = ROWS.min(m - r);
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => avx512::rows(w, codes, s, x, r, rows, out.0, cols),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => match rows {
                4 => avx2::rows::<4>(w, codes, s, x, r, out.0, cols),
                3 => avx2::rows::<3>(w, codes, s, x, r, out.0, cols),
                2 => avx2::rows::<2>(w, codes, s, x, r, out.0, cols),
                _ => avx2::rows::<1>(w, codes, s, x, r, out.0, cols),
            },
            _ => (r..r + rows).for_each(|r| scalar_row(w, codes, s, x, r, out.0, cols)),
        }
        r += rows;
    }
}

/// Rows of x per pass over a strip: 4 integer and 4 float accumulators per strip, the
/// weight group and the broadcast bytes of x stay in registers.
const ROWS: usize = 4;
/// Rows of x above which the AVX-512 kernel unpacks a strip once into a buffer instead of
/// in registers on every pass.
const UNPACK_ONCE_ROWS: usize = 8;

/// Row `r` of y over strip `s`, in plain Rust: the reference the SIMD kernels equal.
unsafe fn scalar_row(
    w: &Int8Weight,
    codes: StripCodes,
    s: usize,
    x: &QuantRows,
    r: usize,
    y: *mut f32,
    cols: usize,
) {
    for lane in 0..cols {
        *y.add(r * w.n + s * STRIP + lane) = column_value(w, codes, s, lane, x, r);
    }
}

/// Entry (r, 16 s + lane) of y, with the SIMD kernels' operations in their order: each
/// block's integer sum exact, then `(sum * sw) * sx + acc` fused and `off * sum + acc`
/// fused, block after block.
fn column_value(
    w: &Int8Weight,
    codes: StripCodes,
    s: usize,
    lane: usize,
    x: &QuantRows,
    r: usize,
) -> f32 {
    let (k, block, blocks) = (w.k, w.block, w.blocks());
    let mut acc = 0f32;
    let mut group = [0u8; 64];
    for b in 0..blocks {
        let xq = |j: usize| x.whole(r, k, b * block + j);
        let (meta, xb) = ((s * blocks + b) * STRIP + lane, r * blocks + b);
        let mut dot = x.start[xb];
        for g in 0..block / 4 {
            // Groups stored in 8 bits (and every group the scalar kernel sees) are read as
            // they are; the others are unpacked first.
            let stored = codes.group(b, g);
            let ints = match codes.form {
                Codes::Eight => stored,
                _ => {
                    unpack_group(codes.form, codes.bias, stored, &mut group);
                    &group[..]
                }
            };
            dot += (0..4).map(|j| ints[lane * 4 + j] as i32 * xq(4 * g + j)).sum::<i32>();
        }
        acc = (dot as f32 * w.scale[meta]).mul_add(x.scale[xb], acc);
        if let Some(off) = &w.offset {
            acc = off[meta].mul_add(x.sum[xb], acc);
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Codes, Int8Weight, QuantRows, StripCodes, STRIP};

    /// `rows` (1 to 4) rows of y from row `r0` over strip `s`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn rows(
        w: &Int8Weight,
        codes: StripCodes,
        s: usize,
        x: &QuantRows,
        r0: usize,
        rows: usize,
        y: *mut f32,
        cols: usize,
    ) {
        if x.parts == 2 {
            group_rows::<true>(w, codes, s, x, r0, rows, y, cols)
        } else {
            group_rows::<false>(w, codes, s, x, r0, rows, y, cols)
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn group_rows<const SPLIT: bool>(
        w: &Int8Weight,
        codes: StripCodes,
        s: usize,
        x: &QuantRows,
        r0: usize,
        rows: usize,
        y: *mut f32,
        cols: usize,
    ) {
        match (rows, codes.form) {
            (4, Codes::Eight) => group::<4, 8, SPLIT>(w, codes, s, x, r0, y, cols),
            (3, Codes::Eight) => group::<3, 8, SPLIT>(w, codes, s, x, r0, y, cols),
            (2, Codes::Eight) => group::<2, 8, SPLIT>(w, codes, s, x, r0, y, cols),
            (_, Codes::Eight) => group::<1, 8, SPLIT>(w, codes, s, x, r0, y, cols),
            (4, Codes::Four) => group::<4, 4, SPLIT>(w, codes, s, x, r0, y, cols),
            (3, Codes::Four) => group::<3, 4, SPLIT>(w, codes, s, x, r0, y, cols),
            (2, Codes::Four) => group::<2, 4, SPLIT>(w, codes, s, x, r0, y, cols),
            (_, Codes::Four) => group::<1, 4, SPLIT>(w, codes, s, x, r0, y, cols),
            (4, Codes::Five) => group::<4, 5, SPLIT>(w, codes, s, x, r0, y, cols),
            (3, Codes::Five) => group::<3, 5, SPLIT>(w, codes, s, x, r0, y, cols),
            (2, Codes::Five) => group::<2, 5, SPLIT>(w, codes, s, x, r0, y, cols),
            (_, Codes::Five) => group::<1, 5, SPLIT>(w, codes, s, x, r0, y, cols),
        }
    }

    /// The group at `src`, stored as `codes` says, unpacked to `q + 128` into `dst`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn unpack(codes: StripCodes, src: &[u8], dst: &mut [u8]) {
        let bias = _mm512_set1_epi8(codes.bias as i8);
        let v = match codes.form {
            Codes::Eight => load_group::<8>(src.as_ptr(), bias),
            Codes::Four => load_group::<4>(src.as_ptr(), bias),
            Codes::Five => load_group::<5>(src.as_ptr(), bias),
        };
        _mm512_storeu_si512(dst.as_mut_ptr() as *mut _, v);
    }

    /// A group of 64 integers as `q + 128`, from its `BITS`-bit storage at `src`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn load_group<const BITS: u8>(src: *const u8, bias: __m512i) -> __m512i {
        if BITS == 8 {
            return _mm512_loadu_si512(src as *const _);
        }
        let packed = _mm256_loadu_si256(src as *const __m256i);
        let both =
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(packed), _mm256_srli_epi16::<4>(packed));
        let mut codes = _mm512_and_si512(both, _mm512_set1_epi8(15));
        if BITS == 5 {
            let high = (src.add(32) as *const u64).read_unaligned();
            codes = _mm512_mask_add_epi8(codes, high, codes, _mm512_set1_epi8(16));
        }
        _mm512_add_epi8(codes, bias)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn group<const N: usize, const BITS: u8, const SPLIT: bool>(
        w: &Int8Weight,
        codes: StripCodes,
        s: usize,
        x: &QuantRows,
        r0: usize,
        y: *mut f32,
        cols: usize,
    ) {
        let (k, block, blocks) = (w.k, w.block, w.blocks());
        let bias = _mm512_set1_epi8(codes.bias as i8);
        let mut acc = [_mm512_setzero_ps(); N];
        let stride = x.parts * k;
        for b in 0..blocks {
            let xq = x.q.as_ptr().add(x.row(r0, k) + b * block);
            let four = |at: usize| _mm512_set1_epi32((xq.add(at) as *const i32).read_unaligned());
            let mut dot = [_mm512_setzero_si512(); N];
            for (i, d) in dot.iter_mut().enumerate() {
                *d = _mm512_set1_epi32(x.start[(r0 + i) * blocks + b]);
            }
            if SPLIT {
                // High bytes apart, then 128 x high + (low + start), exact in 32 bits.
                let mut high = [_mm512_setzero_si512(); N];
                for g in 0..block / 4 {
                    let wv = load_group::<BITS>(codes.group(b, g).as_ptr(), bias);
                    for i in 0..N {
                        high[i] = _mm512_dpbusd_epi32(high[i], wv, four(i * stride + 4 * g));
                        dot[i] = _mm512_dpbusd_epi32(dot[i], wv, four(i * stride + k + 4 * g));
                    }
                }
                for (d, h) in dot.iter_mut().zip(high) {
                    *d = _mm512_add_epi32(_mm512_slli_epi32::<7>(h), *d);
                }
            } else {
                for g in 0..block / 4 {
                    let wv = load_group::<BITS>(codes.group(b, g).as_ptr(), bias);
                    for (i, d) in dot.iter_mut().enumerate() {
                        *d = _mm512_dpbusd_epi32(*d, wv, four(i * stride + 4 * g));
                    }
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

    use super::{Int8Weight, QuantRows, StripCodes, STRIP};

    /// Rows `r0 .. r0 + R` of y over strip `s` (groups unpacked), in two halves of 8
    /// columns. A half group (4 weights of 8 columns) is widened to 16-bit integers once for
    /// the R rows and multiplied with each row's 4 values by `vpmaddwd` into 2 pair sums per
    /// column; the pairs are added at the block's end. Every row sees the same operations in
    /// the same order whatever R is.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows<const R: usize>(
        w: &Int8Weight,
        codes: StripCodes,
        s: usize,
        x: &QuantRows,
        r0: usize,
        y: *mut f32,
        cols: usize,
    ) {
        let (k, block, blocks) = (w.k, w.block, w.blocks());
        // hadd leaves columns in the order 0 1 4 5 2 3 6 7 of its two inputs.
        let order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
        for h in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..blocks {
                let mut pairs = [[_mm256_setzero_si256(); 2]; R];
                for g in 0..block / 4 {
                    let group = codes.group(b, g).as_ptr().add(32 * h);
                    let widen = |at: usize| {
                        _mm256_cvtepu8_epi16(_mm_loadu_si128(group.add(at) as *const __m128i))
                    };
                    let wv = [widen(0), widen(16)];
                    for (i, pair) in pairs.iter_mut().enumerate() {
                        let four = x.wide.as_ptr().add((r0 + i) * k + b * block + 4 * g);
                        let xv = _mm256_set1_epi64x((four as *const i64).read_unaligned());
                        pair[0] = _mm256_add_epi32(pair[0], _mm256_madd_epi16(wv[0], xv));
                        pair[1] = _mm256_add_epi32(pair[1], _mm256_madd_epi16(wv[1], xv));
                    }
                }
                let meta = (s * blocks + b) * STRIP + 8 * h;
                let sw = _mm256_loadu_ps(w.scale.as_ptr().add(meta));
                for (i, (pair, acc)) in pairs.iter().zip(acc.iter_mut()).enumerate() {
                    let xb = (r0 + i) * blocks + b;
                    let columns =
                        _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(pair[0], pair[1]), order);
                    let dot = _mm256_add_epi32(columns, _mm256_set1_epi32(x.start[xb]));
                    let scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), sw);
                    *acc = _mm256_fmadd_ps(scaled, _mm256_set1_ps(x.scale[xb]), *acc);
                    if let Some(off) = &w.offset {
                        let off = _mm256_loadu_ps(off.as_ptr().add(meta));
                        *acc = _mm256_fmadd_ps(off, _mm256_set1_ps(x.sum[xb]), *acc);
                    }
                }
            }
            let width = cols.saturating_sub(8 * h).min(8);
            for (i, acc) in acc.iter().enumerate() {
                let mut out = [0f32; 8];
                _mm256_storeu_ps(out.as_mut_ptr(), *acc);
                let dst = y.add((r0 + i) * w.n + s * STRIP + 8 * h);
                std::ptr::copy_nonoverlapping(out.as_ptr(), dst, width);
            }
        }
    }
}
